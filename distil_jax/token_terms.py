"""Per-position terms of every loss (cross-entropy to the expert, reverse KL, JSD, log pi(y_t), entropy), computed
either from student logits or *fused* from hidden states and the LM head, chunk by chunk.

Every expert target becomes a pair of distributions over "buckets" at each position: log q (the expert) and log pi
(the student) on the same buckets.
  dense logits [B,T,V]            buckets = the vocabulary; q = softmax(logits / temperature)
  TopK(ids, logprobs) [B,T,K]     buckets = the K ids plus, with `topk_tail="bucket"`, one bucket for the rest of the
                                  vocabulary holding the expert's missing mass (a coarsened distribution); with
                                  `"renorm"` the expert's top-k is renormalised and the tail dropped
  dense, `student_topk=k`         buckets = the student's own k likeliest ids at each position plus the tail bucket
                                  (SDPO's reverse KL over the student's top 100: the teacher's mass on them is read
                                  from its full distribution)
  Samples(ids) [B,T,M]            buckets = M expert samples, weight 1/M each: a Monte Carlo estimate of the CE
  HiddenTeacher(hidden, lm_head, positions)  dense, with the teacher's logits computed here from its hidden states
Then CE = -sum_b q_b log pi_b, and the other divergences are sums over the same buckets, so one code path serves all
target kinds. Padding entries of a top-k list carry logprob -inf (zero mass).

The student's distribution is the policy the sampler draws from: softmax(logits / policy_temperature) over the
tokenizer's ids. The LM head may have more rows than the tokenizer (the vocabulary is padded to a multiple of 8 or
128 for the matmuls); those ids are never sampled, so they get probability 0 here too, for the student and for a
dense teacher, and a top-k tail bucket covers only real ids. Otherwise log pi(y_t) would differ from the sampler's
behaviour log-prob on fresh data, and the off-policy ratio would not be 1.

Fusion: the student's logits for T positions would be a float32 [B,T,V] array (4 GB at B*T=8k, V=128k), and the
teacher's another. `fused_token_terms` instead scans over chunks of `chunk_size` time steps, computes a [B,c,V]
logits block, reduces it to a few [B,c] numbers, and keeps nothing of the block. Its backward (a custom VJP) scans
again: it recomputes the block, takes the block terms' VJP at the incoming per-position cotangents (elementwise and
vocabulary reductions only), and does the two matmuls dh = dz W^T and dW += h^T dz. The LM head is cast to the
compute dtype once, and dW is accumulated in float32 over chunks whatever the compute dtype.
Why not Liger's one-pass form (logits gradient formed in the forward pass, no recomputation): that needs the
per-position cotangents before the forward ends, and DistIL's score term weights position t by the cost of every
later position. So the head costs 4 matmuls per step (1 forward, 3 backward), as under plain rematerialisation.
Batch stays on (data, fsdp) and the vocabulary on `tensor` inside each chunk.
Dims: B batch, T response positions, S teacher sequence, c chunk, D width, V vocabulary, K top-k or samples.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from distil_jax import sharding

TERMS = ("ce", "teacher_entropy", "rkl", "jsd")
METRIC_TERMS = ("entropy", "teacher_nonfinite")  # per-position outputs under stop_gradient: no cotangent
_MASKED = -1e30  # logit of an id outside the vocabulary: finite, so 0 * logit stays 0 (no NaN in entropy or grads)


@dataclasses.dataclass(frozen=True)
class TermOptions:
  """What to compute per position, and the two distributions it is computed between."""

  terms: tuple[str, ...] = ("ce",)  # which divergences besides logp and entropy (see TERMS)
  topk_tail: str = "bucket"  # top-k targets: "bucket" or "renorm"
  teacher_temperature: float = 1.0  # dense teachers: q = softmax(logits / teacher_temperature)
  jsd_beta: float = 0.5
  policy_temperature: float = 1.0  # the student: pi = softmax(logits / policy_temperature), the sampler's policy
  vocab_limit: int = 0  # ids >= vocab_limit have probability 0 (0: every row of the LM head is a real id)
  student_topk: int = 0  # dense teachers: buckets = the student's top k ids + a tail (SDPO); 0: the vocabulary

  def __post_init__(self):
    unknown = set(self.terms) - set(TERMS)
    if unknown:
      raise ValueError(f"unknown terms {sorted(unknown)}; known: {TERMS}")
    object.__setattr__(self, "terms", tuple(sorted(self.terms)))


def restrict(logits, temperature: float, vocab_limit: int):
  """float32 logits / temperature, with ids >= vocab_limit masked out (see the module docstring)."""
  z = logits.astype(jnp.float32)
  if temperature != 1.0:
    z = z / temperature
  if vocab_limit and vocab_limit < z.shape[-1]:
    z = jnp.where(jnp.arange(z.shape[-1]) < vocab_limit, z, _MASKED)
  return z


class TopK(NamedTuple):
  ids: jax.Array  # [B,T,K] int
  logprobs: jax.Array  # [B,T,K] float; -inf marks padding


class Samples(NamedTuple):
  ids: jax.Array  # [B,T,M] int, expert samples (duplicates allowed)


class HiddenTeacher(NamedTuple):
  hidden: jax.Array  # [B,S,D] teacher final hidden states (its sequence holds the feedback, so S >= T)
  lm_head: jax.Array  # [D,V]
  positions: jax.Array  # [B,T] int: teacher logits for response position t are hidden[b, positions[b,t]] @ lm_head


def as_target(teacher):
  """Normalise the `teacher` argument: an array is dense logits, a plain pair is (ids, logprobs)."""
  if isinstance(teacher, TopK | Samples | HiddenTeacher):
    return teacher
  if isinstance(teacher, tuple | list) and len(teacher) == 2:
    return TopK(*teacher)
  if hasattr(teacher, "shape") and teacher.ndim == 3:
    return teacher
  raise TypeError(
    "teacher must be dense logits [B,T,V], a (ids, logprobs) pair, Samples(ids) or HiddenTeacher; "
    f"got {type(teacher).__name__}"
  )


def _where_pos(q, x):
  """q * x with 0 wherever q == 0 (so 0 * -inf is 0, and no NaN reaches the gradient). A NaN q stays NaN: a broken
  expert's distribution must make the loss non-finite (the update is then skipped and the loop stops), never count
  as zero mass that trains silently to a loss of 0."""
  return jnp.where(q > 0, q * jnp.where(q > 0, x, 0.0), jnp.where(q == 0, 0.0, q))


def _nonfinite(log_q):
  """[B,c] 1.0 where the expert's distribution holds a NaN or a +inf log-prob (-inf is zero mass: top-k padding)."""
  return jax.lax.stop_gradient(jnp.any(jnp.isnan(log_q) | (log_q == jnp.inf), axis=-1).astype(jnp.float32))


def _buckets(z, lse, kind, arrays, opts: TermOptions, dense_log_q=None):
  """(log q, log pi, log pi normalised over the buckets or None) for one block of student logits z [B,c,V].
  `dense_log_q`: the expert's whole log-distribution behind top-k targets, when known (its tail is then taken in
  log space, finite however small, where 1 - sum q_k would round to 0 for a confident teacher)."""
  if kind == "dense":
    log_q = jax.nn.log_softmax(restrict(arrays[0], opts.teacher_temperature, opts.vocab_limit), axis=-1)
    if opts.student_topk:  # SDPO: the student's k likeliest ids (chosen without gradient) and one tail bucket
      ids = jax.lax.top_k(jax.lax.stop_gradient(z), opts.student_topk)[1]
      topk = (ids, jnp.take_along_axis(log_q, ids, axis=-1))
      opts = dataclasses.replace(opts, topk_tail="bucket", student_topk=0)
      return _buckets(z, lse, "topk", topk, opts, dense_log_q=log_q)
    log_pi = z - lse[..., None]
    return log_q, log_pi, log_pi
  ids = arrays[0]
  log_pi = jnp.take_along_axis(z, ids, axis=-1) - lse[..., None]  # gather first: no [B,c,V] log-softmax
  if kind == "samples":
    m = ids.shape[-1]
    return jnp.full(ids.shape, -math.log(m), jnp.float32), log_pi, None
  log_q = arrays[1].astype(jnp.float32)
  valid = log_q > -jnp.inf
  if opts.topk_tail == "renorm":
    log_q = log_q - jax.nn.logsumexp(log_q, axis=-1, keepdims=True)
    log_pi_norm = log_pi - jax.nn.logsumexp(jnp.where(valid, log_pi, -jnp.inf), axis=-1, keepdims=True)
    return log_q, log_pi, jnp.where(valid, log_pi_norm, -jnp.inf)
  # Tail bucket: the real vocabulary minus the listed ids. It exists only when the ids do not cover it.
  vocab = z.shape[-1]
  n_valid = jnp.sum(valid, axis=-1)
  has_tail = n_valid < (opts.vocab_limit or vocab)
  drop = jnp.where(valid, ids, vocab)  # out-of-range index: dropped by the scatter
  b, c = jnp.meshgrid(jnp.arange(z.shape[0]), jnp.arange(z.shape[1]), indexing="ij")
  # A boolean scatter (1 byte per entry) and a `where` that fuses into the reduction: no second float block.
  listed = jnp.zeros(z.shape, bool).at[b[..., None], c[..., None], drop].set(True, mode="drop")
  rest = jnp.where(listed & has_tail[..., None], -jnp.inf, z)  # finite everywhere when there is no tail
  log_pi_tail = jnp.where(has_tail, jax.nn.logsumexp(rest, axis=-1) - lse, -jnp.inf)
  if dense_log_q is None:
    q_tail = jnp.where(has_tail, jnp.clip(1.0 - jnp.sum(jnp.exp(log_q), axis=-1), 0.0, 1.0), 0.0)
    log_q_tail = jnp.log(q_tail)
  else:
    rest_q = jnp.where(listed & has_tail[..., None], -jnp.inf, dense_log_q)
    log_q_tail = jnp.where(has_tail, jax.nn.logsumexp(rest_q, axis=-1), -jnp.inf)
  log_q = jnp.concatenate([log_q, log_q_tail[..., None]], axis=-1)
  log_pi = jnp.concatenate([jnp.where(valid, log_pi, -jnp.inf), log_pi_tail[..., None]], axis=-1)
  return log_q, log_pi, log_pi


def _divergences(log_q, log_pi, log_pi_norm, opts: TermOptions):
  terms, jsd_beta = opts.terms, opts.jsd_beta
  q = jnp.exp(log_q)
  out = {}
  if "ce" in terms:
    out["ce"] = -jnp.sum(_where_pos(q, log_pi), axis=-1)
  if "teacher_entropy" in terms:
    out["teacher_entropy"] = -jnp.sum(_where_pos(q, log_q), axis=-1)
  if ("rkl" in terms or "jsd" in terms) and log_pi_norm is None:
    raise ValueError("reverse KL and JSD need the expert's probabilities; sampled targets only give CE")
  if "rkl" in terms:  # KL(pi || q): a mode-seeking divergence, the direction SDPO-style self-distillation uses
    pi = jnp.exp(log_pi_norm)
    out["rkl"] = jnp.sum(_where_pos(pi, log_pi_norm - log_q), axis=-1)
  if "jsd" in terms:  # TRL's generalized JSD: beta KL(q||m) + (1-beta) KL(pi||m), m = beta q + (1-beta) pi
    pi = jnp.exp(log_pi_norm)
    if jsd_beta == 0.0:
      out["jsd"] = jnp.sum(_where_pos(q, log_q - log_pi_norm), axis=-1)
    elif jsd_beta == 1.0:
      out["jsd"] = jnp.sum(_where_pos(pi, log_pi_norm - log_q), axis=-1)
    else:
      log_m = jnp.logaddexp(math.log(jsd_beta) + log_q, math.log1p(-jsd_beta) + log_pi_norm)
      kl_q = jnp.sum(_where_pos(q, log_q - log_m), axis=-1)
      kl_pi = jnp.sum(_where_pos(pi, log_pi_norm - log_m), axis=-1)
      out["jsd"] = jsd_beta * kl_q + (1.0 - jsd_beta) * kl_pi
  return out


def _sanitize(kind, arrays, mask, vocab):
  """Replace top-k targets outside the mask by a harmless one (K distinct ids, uniform mass with a tail).

  Positions outside the mask (chunk padding, or whatever a buffer holds past a response) can carry targets whose
  divergence is infinite; the mask zeroes their value, but 0 * inf in the backward pass would still be NaN.
  """
  if kind != "topk" or mask is None:
    return arrays
  ids, log_q = arrays
  k = ids.shape[-1]
  keep = mask[..., None] > 0
  safe_ids = jnp.broadcast_to(jnp.arange(k, dtype=ids.dtype) % vocab, ids.shape)
  safe_lq = jnp.full(log_q.shape, -math.log(k + 1 if k < vocab else k), log_q.dtype)
  return jnp.where(keep, ids, safe_ids), jnp.where(keep, log_q, safe_lq)


def _block_terms(z, tokens, kind, arrays, opts: TermOptions, mask=None):
  """All requested [B,c] terms from one block of raw float32 student logits z [B,c,V]."""
  arrays = _sanitize(kind, arrays, mask, opts.vocab_limit or z.shape[-1])
  z = restrict(z, opts.policy_temperature, opts.vocab_limit)
  lse = jax.nn.logsumexp(z, axis=-1)
  log_pi = z - lse[..., None]
  out = {
    "logp": jnp.take_along_axis(log_pi, tokens[..., None], axis=-1)[..., 0],
    # a metric only: no gradient is computed through it (0 * _MASKED is 0 at ids outside the vocabulary)
    "entropy": jax.lax.stop_gradient(-jnp.sum(jnp.exp(log_pi) * log_pi, axis=-1)),
  }
  if kind is not None and opts.terms:
    log_q, log_pi, log_pi_norm = _buckets(z, lse, kind, arrays, opts)
    out.update(_divergences(log_q, log_pi, log_pi_norm, opts), teacher_nonfinite=_nonfinite(log_q))
  return out


def _split_target(teacher):
  """(kind, per-position arrays [B,T,...], teacher LM head or None), teacher arrays held constant."""
  if teacher is None:
    return None, (), None
  teacher = as_target(teacher)
  sg = jax.lax.stop_gradient
  if isinstance(teacher, HiddenTeacher):
    hidden = jnp.take_along_axis(teacher.hidden, teacher.positions[..., None].astype(jnp.int32), axis=1)
    return "hidden", (sg(hidden),), sg(teacher.lm_head)
  if isinstance(teacher, Samples):
    return "samples", (teacher.ids.astype(jnp.int32),), None
  if isinstance(teacher, TopK):
    return "topk", (teacher.ids.astype(jnp.int32), sg(teacher.logprobs)), None
  return "dense", (sg(teacher),), None


def _teacher_logits(kind, arrays, teacher_head):
  if kind != "hidden":
    return kind, arrays
  h = arrays[0]
  logits = jnp.einsum("bcd,dv->bcv", h, teacher_head.astype(h.dtype), preferred_element_type=jnp.float32)
  return "dense", (sharding.constrain(logits, ("batch", None, "vocab")),)


def token_terms(student_logits, teacher, tokens, *, mask=None, opts: TermOptions = TermOptions()):
  """Per-position terms [B,T] from full student logits [B,T,V] (the unfused reference path).

  `teacher` may be None (GRPO, SFT need only log pi(y_t)). Returns a dict with `logp`, `entropy` and `opts.terms`,
  and with a teacher and terms also `teacher_nonfinite` (1.0 where the expert's distribution is not finite).
  """
  kind, arrays, head = _split_target(teacher)
  kind, arrays = _teacher_logits(kind, arrays, head)
  return _block_terms(student_logits, tokens.astype(jnp.int32), kind, arrays, opts, mask)


def fused_token_terms(hidden, lm_head, teacher, tokens, *, mask=None, chunk_size=64, opts: TermOptions = TermOptions()):
  """The same terms as `token_terms(hidden @ lm_head, ...)` without any [B,T,V] array.

  hidden [B,T,D] in the compute dtype; lm_head [D,V] (the float32 master kernel, or any dtype: it is cast to hidden's
  dtype once, and its gradient is summed in float32 and returned in lm_head's dtype). `entropy` and
  `teacher_nonfinite` are metrics: no gradient flows through them. Memory: O(B * chunk_size * V) for the logits
  block, plus O(D * V) for the head's gradient and one compute-dtype copy of the head.
  """
  kind, arrays, teacher_head = _split_target(teacher)
  b, t = tokens.shape
  c = min(chunk_size, t)
  n = -(-t // c)

  def split(x):  # [B,T,...] -> [n,B,c,...], padding the last chunk
    x = jnp.pad(x, [(0, 0), (0, n * c - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)

  mask = jnp.ones((b, t), jnp.float32) if mask is None else mask.astype(jnp.float32)
  if teacher_head is not None:
    teacher_head = teacher_head.astype(arrays[0].dtype)
  fixed = (split(tokens.astype(jnp.int32)), split(mask), tuple(split(a) for a in arrays), teacher_head)
  out = _fused_scan(kind, opts, jnp.dtype(lm_head.dtype))(split(hidden), lm_head, fixed)
  return {k: jnp.moveaxis(v, 0, 1).reshape(b, n * c)[:, :t] for k, v in out.items()}


def _fused_scan(kind, opts: TermOptions, head_dtype):
  """terms(hidden chunks [n,B,c,D], head [D,V], fixed inputs) with the custom VJP described in the module docstring.
  `fixed` (tokens, mask, teacher arrays, teacher head) gets no gradient: the teacher is a constant."""

  def block(h, head, xs, thead):
    tok, m, tarrays = xs
    z = jnp.einsum("bcd,dv->bcv", h, head, preferred_element_type=jnp.float32)
    z = sharding.constrain(z, ("batch", None, "vocab"))
    k, a = _teacher_logits(kind, tarrays, thead)
    return z, lambda z: _block_terms(z, tok, k, a, opts, m)

  def forward(h_n, lm_head, fixed):
    tok_n, m_n, tarrays_n, thead = fixed
    head = lm_head.astype(h_n.dtype)

    def body(_, xs):
      h, *rest = xs
      z, terms = block(h, head, rest, thead)
      return None, terms(z)

    return jax.lax.scan(body, None, (h_n, tok_n, m_n, tarrays_n))[1], head

  @jax.custom_vjp
  def fused(h_n, lm_head, fixed):
    return forward(h_n, lm_head, fixed)[0]

  def fwd(h_n, lm_head, fixed):
    out, head = forward(h_n, lm_head, fixed)
    return out, (h_n, head, fixed)

  def bwd(res, ct):
    h_n, head, fixed = res
    tok_n, m_n, tarrays_n, thead = fixed
    ct = {k: v for k, v in ct.items() if k not in METRIC_TERMS}

    def body(dw, xs):
      h, ct_chunk, *rest = xs
      z, terms = block(h, head, rest, thead)
      _, vjp = jax.vjp(lambda z: {k: v for k, v in terms(z).items() if k in ct_chunk}, z)
      dz = vjp(ct_chunk)[0].astype(h.dtype)
      dh = jnp.einsum("bcv,dv->bcd", dz, head, preferred_element_type=jnp.float32).astype(h.dtype)
      dw = dw + jnp.einsum("bcd,bcv->dv", h, dz, preferred_element_type=jnp.float32)
      return dw, dh

    dw0 = jnp.zeros(head.shape, jnp.float32)
    dw, dh_n = jax.lax.scan(body, dw0, (h_n, ct, tok_n, m_n, tarrays_n))
    return dh_n, dw.astype(head_dtype), jax.tree.map(_zero_cotangent, fixed)

  fused.defvjp(fwd, bwd)
  return fused


def _zero_cotangent(x):
  if jnp.issubdtype(x.dtype, jnp.floating):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)
