"""Batched sampling with a KV cache: one jitted call per rollout (weights made, prefill, decode loop), on the mesh.

Prompts are left-padded to a length bucket so that a run compiles once per (prompts, bucket, samples per prompt,
max_new_tokens) instead of once per prompt length. Left padding keeps every row's next token in the same cache slot,
so one scalar index drives the cache; the padded slots are masked out and positions restart at each row's first
real token. A prompt is prefilled once and its cache is read by all `samples_per_prompt` responses to it
(`decode.py`); response g to prompt b is row b * samples_per_prompt + g, the loop's group layout.

The decode loop runs as a few while loops ("segments") over growing response caches, so that early steps do not
read slots no token has filled; inside each, a fixed-count loop of `check_every` steps runs between the checks for
"every row has ended", because on GPU a while loop's condition is a device-to-host read and a fixed count is not.

Returned log-probs are those of the sampled tokens under the *sampling* distribution (after temperature, top-k and
top-p). The training losses take the policy to be softmax(logits / temperature) over the tokenizer's ids
(`token_terms.restrict`), so without top-k / top-p they are exactly the policy's log-probs on fresh rollouts, which
is what the off-policy ratio in `losses.py` needs; the loop refuses top-k / top-p for the losses that use the ratio.
Greedy rows carry the same policy's log-probs of the chosen tokens.

Dims: Bp prompts, B rows (Bp x samples per prompt), P prompt bucket, N new tokens, V vocabulary, C candidates.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from distil_jax import checks, decode, sharding
from distil_jax import model as model_lib

# top-k / top-p narrow the vocabulary to the top 16 of each chunk of this many ids (16: the largest k of XLA's
# dedicated GPU TopK kernel; larger k lowers to a sort), then sort only those candidates.
_CHUNK = 2048
_PER_CHUNK = 16
# a draw picks one of the chunks of this many ids by their masses, then an id inside it
_DRAW_CHUNK = 256


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1.0: off
  greedy: bool = False
  eos_id: int | None = None
  stop_ids: tuple[int, ...] = ()  # more ids that end a row, as EOS does (generation_config.json, end of turn)
  pad_id: int = 0
  vocab_limit: int | None = None  # ids >= this are never sampled (model rows past the tokenizer: padding)
  cache_segments: int = 4  # while loops over growing response caches: more read fewer empty slots, compile more
  check_every: int = 8  # decode steps between the checks for "every row has ended"
  prompt_buckets: tuple[int, ...] = (64,)  # prompts are left-padded to the smallest that holds them
  max_prompt_tokens: int = 64  # the width prompts are stored at (the buffer's rows)


class Generation(NamedTuple):
  """What the sampler returns (the expert-target type `losses.Samples` is another thing)."""

  tokens: jax.Array  # [B,N] int32, pad_id after EOS
  logprobs: jax.Array  # [B,N] float32, 0 after EOS
  lengths: jax.Array  # [B] int32, EOS included
  steps: jax.Array  # [] int32: decode steps run, a multiple of check_every; fewer when every row ended early


def check_section(ch: checks.Checks) -> None:
  """The `sampling` section, one line per problem (`checks.py`)."""
  ch.count("sampling.max_new_tokens")
  prompt_ok = ch.count("sampling.max_prompt_tokens")
  ch.number("sampling.temperature", lo=0, lo_open=True)
  ch.number("sampling.top_k", lo=0, integer=True)
  ch.number("sampling.top_p", lo=0, hi=1, lo_open=True)
  if not ch.has("sampling.prompt_buckets"):
    return
  buckets = ch.value("sampling.prompt_buckets")
  ok = isinstance(buckets, Sequence) and buckets and all(isinstance(b, int) and b >= 1 for b in buckets)
  if not ok:
    ch.fail("sampling.prompt_buckets", "must be a non-empty list of positive prompt lengths")
  elif prompt_ok and max(buckets) > ch.value("sampling.max_prompt_tokens"):
    ch.fail(
      "sampling.prompt_buckets",
      f"the largest bucket exceeds sampling.max_prompt_tokens ({ch.value('sampling.max_prompt_tokens')}): a prompt "
      "sampled in full would be stored and trained truncated",
    )


def bucket_length(n: int, buckets: Sequence[int]) -> int:
  """Smallest bucket that holds n tokens."""
  for b in sorted(buckets):
    if n <= b:
      return b
  raise ValueError(f"prompt of {n} tokens exceeds the largest length bucket {max(buckets)}")


def left_pad(prompts: Sequence[Sequence[int]], buckets: Sequence[int], pad_id: int = 0):
  """(tokens [B,P], mask [B,P]) numpy arrays, prompts flush right, P the bucket of the longest prompt."""
  return left_pad_rows(prompts, bucket_length(max(len(p) for p in prompts), buckets), pad_id)


def left_pad_rows(rows: Sequence[Sequence[int]], width: int, pad_id: int):
  """(tokens, mask) [len(rows), width], each row flush right. A row longer than `width` is an error: cutting its
  beginning would train on a prompt other than the one sampled (callers that can drop a row check first)."""
  tokens = np.full((len(rows), width), pad_id, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    if len(r) > width:
      raise ValueError(f"a prompt row of {len(r)} tokens does not fit the {width} reserved for it")
    if len(r):
      tokens[i, width - len(r) :] = r
      mask[i, width - len(r) :] = 1
  return tokens, mask


# ---------------------------------------------------------------------------------------------------------------------
# Choosing the next token


def _candidates(z_BxV):
  """(values [B,C] descending, ids [B,C], bound [B]): a superset of the largest logits, and the largest logit left
  out (-inf when none is). The top 16 of each chunk of ids are candidates, so a token outside them is at most its
  chunk's 16th value."""
  b, v = z_BxV.shape
  if v <= _CHUNK:
    values, ids = jax.lax.top_k(z_BxV, v)
    return values, ids, jnp.full((b,), -jnp.inf)
  chunks = -(-v // _CHUNK)
  padded = jnp.pad(z_BxV, ((0, 0), (0, chunks * _CHUNK - v)), constant_values=-jnp.inf)
  values, ids = jax.lax.top_k(padded.reshape(b, chunks, _CHUNK), _PER_CHUNK)
  bound = jnp.max(values[..., -1], axis=-1)
  ids = (ids + _CHUNK * jnp.arange(chunks)[:, None]).reshape(b, -1)
  values, order = jax.lax.top_k(values.reshape(b, -1), chunks * _PER_CHUNK)
  return values, jnp.take_along_axis(ids, order, axis=-1), bound


def _truncation_threshold(sorted_z_BxC, lse_B, cfg: SamplingConfig):
  """(the smallest kept logit [B,1] under top-k then top-p, the lowest cut [B,1] that decided it) from logits sorted
  descending; ties with a cut are kept. The lowest cut is top-k's when it is on (it fixes the set that top-p
  renormalises over), else top-p's."""
  threshold = jnp.full(sorted_z_BxC.shape[:1] + (1,), -jnp.inf)
  if cfg.top_k:
    k = min(cfg.top_k, sorted_z_BxC.shape[1])
    threshold = sorted_z_BxC[:, k - 1 : k]
    lse_B = jax.nn.logsumexp(jnp.where(sorted_z_BxC >= threshold, sorted_z_BxC, -jnp.inf), axis=-1)
  lowest = threshold
  if cfg.top_p < 1.0:
    probs = jnp.exp(sorted_z_BxC - lse_B[:, None])  # the top-k renormalised distribution when top-k is on
    before = jnp.cumsum(probs, axis=-1) - probs
    count = jnp.sum((before < cfg.top_p) & (sorted_z_BxC >= threshold), axis=-1, keepdims=True)  # >= 1
    threshold = jnp.take_along_axis(sorted_z_BxC, count - 1, axis=-1)
  return threshold, lowest if cfg.top_k else threshold


def _first_above(weights_BxN, u_Bx1):
  """The first index whose cumulative weight exceeds u x the row's total, for u in [0, 1): index i with probability
  weights[i] / total. Never an index of zero weight: u x total can round up to the total, and then the last index
  of positive weight is taken. The cumulative sum is a product with a triangular matrix: where the index axis is
  split over devices, that is a sum of partial products, where a scan would gather the rows."""
  n = weights_BxN.shape[-1]
  upper_NxN = (jnp.arange(n)[:, None] <= jnp.arange(n)[None, :]).astype(weights_BxN.dtype)
  cdf_BxN = jnp.dot(weights_BxN, upper_NxN, precision=jax.lax.Precision.HIGHEST)
  index = jnp.sum(cdf_BxN <= u_Bx1 * cdf_BxN[:, -1:], axis=-1)
  last = n - 1 - jnp.argmax(weights_BxN[:, ::-1] > 0, axis=-1)
  return jnp.minimum(index, last)


def inverse_cdf(z_BxV, u_2xBx1):
  """Index [B] distributed as softmax(z), from two uniforms per row: the first picks a chunk of `_DRAW_CHUNK` ids by
  the chunks' masses, the second an id inside that chunk, so no cumulative sum runs over the whole vocabulary.

  Why not `jax.random.categorical`: its Gumbel noise needs random bits for every id of every row. On two CPU cores
  that is 30 ms a step at 16 x 49k ids, more than the rest of the sampling; this takes 2 ms."""
  b, v = z_BxV.shape
  width = min(_DRAW_CHUNK, v)
  chunks = -(-v // width)
  p = jnp.exp(z_BxV - jnp.max(z_BxV, axis=-1, keepdims=True))  # ids at -inf weigh 0
  p = jnp.pad(p, ((0, 0), (0, chunks * width - v))).reshape(b, chunks, width)
  chunk_B = _first_above(jnp.sum(p, axis=-1), u_2xBx1[0])
  picked_BxN = (jnp.arange(chunks) == chunk_B[:, None]).astype(p.dtype)
  inside_BxW = jnp.einsum("bn,bnw->bw", picked_BxN, p, precision=jax.lax.Precision.HIGHEST)
  return chunk_B * width + _first_above(inside_BxW, u_2xBx1[1])


def _draw(z_BxV, rng):
  """Index [B] sampled from softmax(z) (`inverse_cdf`)."""
  return inverse_cdf(z_BxV, jax.random.uniform(rng, (2, z_BxV.shape[0], 1)))


def _sample_kept(z_BxN, threshold_Bx1, rng):
  """(index [B], its log-prob) sampled from softmax(z) restricted to z >= threshold."""
  kept = jnp.where(z_BxN >= threshold_Bx1, z_BxN, -jnp.inf)
  index = _draw(kept, rng)
  return index, jnp.take_along_axis(jax.nn.log_softmax(kept, axis=-1), index[:, None], axis=-1)[:, 0]


def _truncated(z_BxV, lse_B, rng, cfg: SamplingConfig):
  """Top-k / top-p sampling with no full-vocabulary sort: the cut is found among the candidates; a step where some
  row's kept set reaches past them (a flat distribution under top-p) sorts the vocabulary instead (`lax.cond`)."""
  values, ids, bound = _candidates(z_BxV)
  threshold, lowest_cut = _truncation_threshold(values, lse_B, cfg)

  def among_candidates():
    index, logprob = _sample_kept(values, threshold, rng)
    return jnp.take_along_axis(ids, index[:, None], axis=-1)[:, 0], logprob

  def full_sort():
    full, _ = _truncation_threshold(jnp.sort(z_BxV, axis=-1)[:, ::-1], lse_B, cfg)
    return _sample_kept(z_BxV, full, rng)

  inside = (lowest_cut[:, 0] > bound) | (bound == -jnp.inf)  # every kept token is a candidate
  return jax.lax.cond(jnp.all(inside), among_candidates, full_sort)


def _pick(logits_BxV, rng, cfg: SamplingConfig, temperature):
  """(token [B] int32, its log-prob [B]) under softmax(logits / temperature) over ids < vocab_limit (then top-k,
  top-p). All in float32: these log-probs are compared with the update's recomputation."""
  z = logits_BxV.astype(jnp.float32) / temperature
  if cfg.vocab_limit is not None and cfg.vocab_limit < z.shape[-1]:
    z = jnp.where(jnp.arange(z.shape[-1]) < cfg.vocab_limit, z, -jnp.inf)
  lse = jax.nn.logsumexp(z, axis=-1)
  if cfg.greedy:
    token = jnp.argmax(z, axis=-1)
  elif cfg.top_k or cfg.top_p < 1.0:
    token, logprob = _truncated(z, lse, rng, cfg)
    return token.astype(jnp.int32), logprob
  else:
    token = _draw(z, rng)
  return token.astype(jnp.int32), jnp.take_along_axis(z, token[:, None], axis=-1)[:, 0] - lse


# ---------------------------------------------------------------------------------------------------------------------
# The loop


class _State(NamedTuple):
  step: jax.Array
  cache: decode.Cache
  logits: jax.Array  # [B,V] float32: the next token's
  done: jax.Array  # [B] bool
  tokens: jax.Array  # [B,steps]
  logprobs: jax.Array
  rng: jax.Array


def segment_ends(max_new_tokens: int, segments: int, check_every: int) -> list[int]:
  """The step at which each while loop of the decode ends: multiples of `check_every`, the last covering
  max_new_tokens, splitting the blocks of `check_every` steps as evenly as they allow."""
  blocks = -(-max_new_tokens // check_every)
  segments = min(segments, blocks)
  return sorted({-(-blocks * (i + 1) // segments) * check_every for i in range(segments)})


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "samples_per_prompt"))
def _generate(graphdef, params, prompt_BpxP, prompt_mask_BpxP, rng, temperature, *, cfg, samples_per_prompt):
  model = model_lib.merge_for_compute(graphdef, params)  # the one cast of the rollout
  model_cfg = model.config
  weights = decode.prepare(model)
  logits_BpxV, cache = decode.prefill(model, prompt_BpxP, prompt_mask_BpxP)
  rows = prompt_BpxP.shape[0] * samples_per_prompt
  logits = sharding.constrain(jnp.repeat(logits_BpxV, samples_per_prompt, axis=0), ("batch", "vocab"))
  start = jnp.repeat(jnp.sum(prompt_mask_BpxP, axis=1, dtype=jnp.int32), samples_per_prompt)
  ends = segment_ends(cfg.max_new_tokens, cfg.cache_segments, cfg.check_every)
  stops = jnp.asarray(sorted({*cfg.stop_ids} | ({cfg.eos_id} if cfg.eos_id is not None else set())) or [-1])
  is_stop = lambda t: jnp.any(t[..., None] == stops, axis=-1)

  def one_step(state: _State) -> _State:
    rng, sub = jax.random.split(state.rng)
    token, logprob = _pick(state.logits, sub, cfg, temperature)
    token = jnp.where(state.done, cfg.pad_id, token)
    logprob = jnp.where(state.done, 0.0, logprob)
    tokens = jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.step))
    logprobs = jax.lax.dynamic_update_slice(state.logprobs, logprob[:, None], (0, state.step))
    logits, cache = decode.step(weights, model_cfg, state.cache, token, start + state.step, state.step)
    return _State(state.step + 1, cache, logits, state.done | is_stop(token), tokens, logprobs, rng)

  def block(state: _State) -> _State:
    return jax.lax.fori_loop(0, cfg.check_every, lambda _, s: one_step(s), state)

  pad = lambda dtype, fill: sharding.constrain(jnp.full((rows, ends[-1]), fill, dtype), ("batch", None))
  state = _State(
    jnp.int32(0), cache, logits, jnp.zeros((rows,), bool), pad(jnp.int32, cfg.pad_id), pad(jnp.float32, 0.0), rng
  )
  for end in ends:
    state = state._replace(cache=decode.grow(state.cache, rows, end, model_cfg))
    state = jax.lax.while_loop(lambda s, end=end: (s.step < end) & ~jnp.all(s.done), block, state)
  n = cfg.max_new_tokens
  tokens, logprobs = state.tokens[:, :n], state.logprobs[:, :n]
  is_eos = is_stop(tokens)
  lengths = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, n).astype(jnp.int32)
  rows_spec = lambda x: sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))
  return Generation(rows_spec(tokens), rows_spec(logprobs), rows_spec(lengths), state.step)


def generate(
  graphdef, params, prompt_BxP, prompt_mask_BxP, rng, cfg: SamplingConfig, *, samples_per_prompt: int = 1
) -> Generation:
  """Sample up to `cfg.max_new_tokens` tokens for each of `samples_per_prompt` responses to each prompt row.

  `params` may be the float32 masters: they are cast to the model's compute dtype once, inside the call. Rows stop
  at EOS or any of `cfg.stop_ids` (kept) and are padded after. Output row b * samples_per_prompt + g is response g
  to prompt row b.
  """
  if cfg.max_new_tokens < 1 or samples_per_prompt < 1 or cfg.check_every < 1 or cfg.cache_segments < 1:
    raise ValueError(
      f"max_new_tokens={cfg.max_new_tokens}, samples_per_prompt={samples_per_prompt}, "
      f"check_every={cfg.check_every} and cache_segments={cfg.cache_segments} must all be >= 1"
    )
  return _generate(
    graphdef,
    params,
    jnp.asarray(prompt_BxP, jnp.int32),
    jnp.asarray(prompt_mask_BxP, jnp.int32),
    rng,
    jnp.float32(cfg.temperature),
    cfg=dataclasses.replace(cfg, temperature=1.0),
    samples_per_prompt=samples_per_prompt,
  )
