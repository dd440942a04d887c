"""DistIL's sequence-level forward cross-entropy, and the baselines beside it, from per-position terms.

DistIL minimises J(theta) = E_{y ~ pi_theta}[ sum_t c_t ], c_t = -sum_a q_t(a) log pi_theta(a | x, y_<t), with the
expert q_t held constant. Its gradient is
    sum_t grad c_t  +  sum_t (R_t - b_t) grad log pi_theta(y_t | x, y_<t),     R_t = sum_{t' > t} c_t'
The second (score-function) part charges later expert-student disagreement to the earlier tokens that led there;
dropping it leaves "tokenwise forward CE" (DAgger with a distributional expert), which is biased for J.
The surrogate below has exactly that gradient and, because the score term enters as `x - stop_gradient(x)`, its
value is the estimate of J itself (what the logs show).

Length: J sums positive costs over the tokens the student chose to write, so while the student is imperfect an
early EOS is the cheapest way to lower J (it forfeits every future cost), and responses shrink. `terminal="hold"`
evaluates J over the fixed horizon T instead: a response that stops at L < T holds its stopping state, and that
state's cost, for the T - L remaining steps. Stopping where the expert also stops then costs (almost) nothing, and
stopping where it would continue keeps paying for that disagreement. At pi = q both objectives agree up to the
expert's entropy at its stop states; with cost="kl", or an expert whose entropy is the same at every state, the
two differ only by a constant. "free" (the paper's J) is the default.

Normalisation (`normalize`):
  "sequence"             sum over a sequence's tokens, mean over sequences: an unbiased estimate of J and grad J.
  "token"                the same sum divided by the batch's token count: per batch, a positive rescaling of the
                         "sequence" estimator (same direction, a step size that does not grow with response length);
                         in expectation it follows E[sum_t c_t] / E[|y|] with the normaliser held fixed.
  "sequence_token_mean"  token mean within each sequence, then mean over sequences (original GRPO): weighs every
                         sequence equally whatever its length, i.e. optimises E[(1/|y|) sum_t c_t], not J.
Off-policy reuse: with `behaviour_logprobs` (from the sampler), the score term uses the clipped ratio
rho = pi_theta / pi_behaviour as PPO does, pessimistically for a cost: max(rho A, clip(rho, 1 +- eps) A).

Dims: B sequences (groups of `group_size` consecutive rows share a prompt), T positions, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from distil_jax import token_terms as tt
from distil_jax.token_terms import HiddenTeacher, Samples, TopK  # noqa: F401  (public target types)

KINDS = ("distil", "tokenwise_fce", "reverse_kl", "jsd", "grpo", "sft")
BASELINES = ("none", "loo")
NORMALIZATIONS = ("sequence", "token", "sequence_token_mean")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  kind: str = "distil"
  baseline: str = "loo"  # distil: "none" or leave-one-out over the group
  normalize: str = "sequence"
  cost: str = "ce"  # distil / tokenwise_fce: "ce" (the paper) or "kl" (CE minus the expert's entropy)
  clip_eps: float = 0.2  # PPO ratio clipping for the score term (distil, grpo)
  teacher_temperature: float = 1.0  # dense teachers: q = softmax(logits / temperature)
  topk_tail: str = "bucket"  # top-k teachers: "bucket" (coarsened, tail mass kept) or "renorm"
  jsd_beta: float = 0.5
  kl_coef: float = 0.0  # grpo: weight of the k3 KL estimate to a reference policy
  std_eps: float = 1e-4  # grpo: advantage = (r - mean) / (std + eps)
  chunk_size: int = 64  # fused path: time steps per logits block (block = per-device batch x chunk x V)
  terminal: str = "free"  # distil / tokenwise_fce: "free" (costs end at EOS, the paper's J) or "hold"

  def __post_init__(self):
    for name, value, allowed in [
      ("kind", self.kind, KINDS),
      ("baseline", self.baseline, BASELINES),
      ("normalize", self.normalize, NORMALIZATIONS),
      ("cost", self.cost, ("ce", "kl")),
      ("topk_tail", self.topk_tail, ("bucket", "renorm")),
      ("terminal", self.terminal, ("free", "hold")),
    ]:
      if value not in allowed:
        raise ValueError(f"loss.{name}={value!r}; expected one of {allowed}")

  @property
  def terms(self) -> tuple[str, ...]:
    """Which per-position terms the objective needs (so the fused path computes nothing else)."""
    if self.kind in ("distil", "tokenwise_fce"):
      return ("ce", "teacher_entropy") if self.cost == "kl" else ("ce",)
    return {"reverse_kl": ("rkl",), "jsd": ("jsd",)}.get(self.kind, ())

  @property
  def needs_teacher(self) -> bool:
    return self.kind not in ("grpo", "sft")


def normalize(per_token_BxT, mask_BxT, how: str):
  """Reduce masked per-token values to the scalar loss; see the module docstring for what each optimises."""
  m = mask_BxT.astype(jnp.float32)
  per_seq = jnp.sum(jnp.where(m > 0, per_token_BxT, 0.0), axis=1)
  if how == "sequence":
    return jnp.mean(per_seq)
  if how == "token":
    return jnp.sum(per_seq) / jnp.maximum(jnp.sum(m), 1.0)
  return jnp.mean(per_seq / jnp.maximum(jnp.sum(m, axis=1), 1.0))


def cost_to_go(c_BxT):
  """R_t = sum_{t' > t} c_t' (exclusive reverse cumulative sum)."""
  return jnp.cumsum(c_BxT[:, ::-1], axis=1)[:, ::-1] - c_BxT


def leave_one_out(x_BxT, group_size: int):
  """For each row, the mean of x over the other rows of its group (same prompt); independent of the row itself."""
  b = x_BxT.shape[0]
  if group_size < 2 or b % group_size:
    raise ValueError(f"leave-one-out needs group_size >= 2 dividing the batch; got {group_size} for {b} rows")
  g = x_BxT.reshape(b // group_size, group_size, *x_BxT.shape[1:])
  return ((jnp.sum(g, axis=1, keepdims=True) - g) / (group_size - 1)).reshape(x_BxT.shape)


def _ratio(logp_BxT, behaviour_logprobs):
  old = jax.lax.stop_gradient(logp_BxT) if behaviour_logprobs is None else behaviour_logprobs
  return jnp.exp(logp_BxT - old)


def hold_terminal(c_BxT, mask_BxT):
  """Costs over the whole horizon T when a response that stopped early holds its stopping state.

  A response of length L < T ended with EOS at position L-1; the state it stopped in, and so its cost c_{L-1}, is
  held for the T-L remaining steps. Returns (costs [B,T], horizon mask [B,T]). Gradients of the held copies flow to
  position L-1, so stopping early is charged for the disagreement it freezes instead of escaping all future cost.
  """
  t = c_BxT.shape[1]
  length = jnp.sum(mask_BxT, axis=1).astype(jnp.int32)
  ended = (length > 0) & (length < t)
  last = jnp.take_along_axis(c_BxT, jnp.maximum(length - 1, 0)[:, None], axis=1)
  after = (jnp.arange(t)[None, :] >= length[:, None]) & ended[:, None]
  return jnp.where(after, last, c_BxT), jnp.where(ended[:, None], 1.0, mask_BxT)


def _distil(cfg, terms, mask, group_size, behaviour_logprobs, sequence_term, score_weight):
  m = mask.astype(jnp.float32)
  c = terms["ce"] - (terms["teacher_entropy"] if cfg.cost == "kl" else 0.0)
  c = jnp.where(m > 0, c, 0.0)
  cost_mask = m
  if cfg.terminal == "hold":
    c, cost_mask = hold_terminal(c, m)
  metrics = {"cost": jnp.mean(jnp.sum(c, axis=1))}
  if not sequence_term:
    return c, metrics, cost_mask
  r = cost_to_go(jax.lax.stop_gradient(c))
  b = leave_one_out(r, group_size) if cfg.baseline == "loo" else jnp.zeros_like(r)
  adv = r - b
  ratio = _ratio(terms["logp"], behaviour_logprobs)
  clipped = jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)
  score = jnp.maximum(ratio * adv, clipped * adv) * m
  if score_weight is not None:  # e.g. 0 for stale buffer rows: their states still get the local (DAgger) term
    score = score * score_weight[:, None]
  metrics.update(
    advantage_abs=jnp.sum(jnp.abs(adv) * m) / jnp.maximum(jnp.sum(m), 1.0),
    clip_fraction=jnp.sum((jnp.abs(ratio - 1.0) > cfg.clip_eps) * m) / jnp.maximum(jnp.sum(m), 1.0),
  )
  # value: the cost alone (an estimate of J); gradient: local part + score part
  return c + score - jax.lax.stop_gradient(score), metrics, cost_mask


def _grpo(cfg, terms, mask, group_size, rewards_B, behaviour_logprobs, ref_logprobs):
  if rewards_B is None:
    raise ValueError("grpo needs scalar rewards per sequence")
  r = rewards_B.astype(jnp.float32).reshape(-1, group_size)
  std = jnp.std(r, axis=1, keepdims=True, ddof=1) if group_size > 1 else jnp.ones_like(r[:, :1])
  adv = ((r - jnp.mean(r, axis=1, keepdims=True)) / (std + cfg.std_eps)).reshape(-1, 1)
  ratio = _ratio(terms["logp"], behaviour_logprobs)
  clipped = jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)
  per_token = -jnp.minimum(ratio * adv, clipped * adv)
  metrics = {"reward": jnp.mean(r)}
  if cfg.kl_coef:
    if ref_logprobs is None:
      raise ValueError("grpo with kl_coef > 0 needs ref_logprobs")
    delta = ref_logprobs - terms["logp"]
    k3 = jnp.exp(delta) - delta - 1.0  # unbiased, non-negative estimate of KL(pi || ref)
    per_token = per_token + cfg.kl_coef * k3
    metrics["kl_ref"] = jnp.sum(k3 * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  return per_token, metrics


def loss_from_terms(
  cfg: LossConfig,
  terms,
  mask_BxT,
  *,
  group_size: int = 1,
  rewards=None,
  behaviour_logprobs=None,
  ref_logprobs=None,
  score_weight=None,
):
  """(scalar loss, metrics) of `cfg.kind` from per-position terms (see `token_terms`).

  score_weight [B]: optional per-sequence weight of DistIL's score term (1 on fresh rollouts, 0 on stale ones).
  """
  mask = mask_BxT.astype(jnp.float32)
  loss_mask = mask
  if cfg.kind in ("distil", "tokenwise_fce"):
    per_token, metrics, loss_mask = _distil(
      cfg, terms, mask, group_size, behaviour_logprobs, cfg.kind == "distil", score_weight
    )
  elif cfg.kind == "reverse_kl":
    per_token, metrics = terms["rkl"], {}
  elif cfg.kind == "jsd":
    per_token, metrics = terms["jsd"], {}
  elif cfg.kind == "grpo":
    per_token, metrics = _grpo(cfg, terms, mask, group_size, rewards, behaviour_logprobs, ref_logprobs)
  else:  # sft: the tokens are the expert's own response
    per_token, metrics = -terms["logp"], {}
  loss = normalize(per_token, loss_mask, cfg.normalize)
  n_tok = jnp.maximum(jnp.sum(mask), 1.0)
  metrics.update(
    loss=loss,
    entropy=jnp.sum(terms["entropy"] * mask) / n_tok,
    logp=jnp.sum(terms["logp"] * mask) / n_tok,
    length=jnp.mean(jnp.sum(mask, axis=1)),
  )
  for name in cfg.terms:
    metrics[f"{name}_per_token"] = jnp.sum(jnp.where(mask > 0, terms[name], 0.0)) / n_tok
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def compute_loss(
  cfg: LossConfig,
  *,
  teacher,
  tokens,
  mask,
  logits=None,
  hidden=None,
  lm_head=None,
  group_size=1,
  rewards=None,
  behaviour_logprobs=None,
  ref_logprobs=None,
  score_weight=None,
):
  """The loss from student logits, or fused from hidden states and the LM head when `hidden` is given."""
  teacher = teacher if cfg.needs_teacher else None
  opts = dict(terms=cfg.terms, topk_tail=cfg.topk_tail, temperature=cfg.teacher_temperature, jsd_beta=cfg.jsd_beta)
  if hidden is not None:
    terms = tt.fused_token_terms(hidden, lm_head, teacher, tokens, mask=mask, chunk_size=cfg.chunk_size, **opts)
  else:
    terms = tt.token_terms(logits, teacher, tokens, mask=mask, **opts)
  return loss_from_terms(
    cfg,
    terms,
    mask,
    group_size=group_size,
    rewards=rewards,
    behaviour_logprobs=behaviour_logprobs,
    ref_logprobs=ref_logprobs,
    score_weight=score_weight,
  )


def _public(kind, with_metrics, **kw):
  out = compute_loss(LossConfig(kind=kind, **kw.pop("cfg")), **kw)
  return out if with_metrics else out[0]


def _cfg(**kw):
  return {k: v for k, v in kw.items() if v is not None}


def distil_loss(
  student_logits,
  teacher,
  tokens,
  mask,
  *,
  group_size=1,
  baseline="none",
  behaviour_logprobs=None,
  normalize="sequence",
  cost="ce",
  clip_eps=0.2,
  temperature=1.0,
  topk_tail="bucket",
  terminal="free",
  with_metrics=False,
):
  """DistIL surrogate: its value estimates J, its gradient is the DistIL estimator (module docstring).

  student_logits [B,T,V]: row t is the student's distribution of tokens[:, t]. teacher: dense logits [B,T,V], a
  top-k pair (ids [B,T,K], logprobs [B,T,K]), `Samples(ids)` or `HiddenTeacher`. mask [B,T]: response positions.
  terminal="hold" charges a response that stopped before the horizon T = tokens.shape[1] its stopping state's cost
  for every remaining step (see `hold_terminal`). Returns the scalar, or (scalar, metrics) with `with_metrics=True`.
  """
  cfg = _cfg(
    baseline=baseline,
    normalize=normalize,
    cost=cost,
    clip_eps=clip_eps,
    teacher_temperature=temperature,
    topk_tail=topk_tail,
    terminal=terminal,
  )
  return _public(
    "distil",
    with_metrics,
    cfg=cfg,
    teacher=teacher,
    tokens=tokens,
    mask=mask,
    logits=student_logits,
    group_size=group_size,
    behaviour_logprobs=behaviour_logprobs,
  )


def fused_distil_loss(
  hidden,
  lm_head,
  teacher,
  tokens,
  mask,
  *,
  group_size=1,
  baseline="none",
  chunk_size=64,
  behaviour_logprobs=None,
  normalize="sequence",
  cost="ce",
  clip_eps=0.2,
  temperature=1.0,
  topk_tail="bucket",
  terminal="free",
  with_metrics=False,
):
  """`distil_loss(hidden @ lm_head, ...)` in value and gradient, without a [B,T,V] array (chunked, recomputed)."""
  cfg = _cfg(
    baseline=baseline,
    normalize=normalize,
    cost=cost,
    clip_eps=clip_eps,
    teacher_temperature=temperature,
    topk_tail=topk_tail,
    chunk_size=chunk_size,
    terminal=terminal,
  )
  return _public(
    "distil",
    with_metrics,
    cfg=cfg,
    teacher=teacher,
    tokens=tokens,
    mask=mask,
    hidden=hidden,
    lm_head=lm_head,
    group_size=group_size,
    behaviour_logprobs=behaviour_logprobs,
  )


def tokenwise_fce_loss(
  student_logits,
  teacher,
  tokens,
  mask,
  *,
  normalize="sequence",
  temperature=1.0,
  topk_tail="bucket",
  with_metrics=False,
):
  """The local part of DistIL alone: sum_t c_t with no score term (DAgger with a distributional expert)."""
  cfg = _cfg(normalize=normalize, teacher_temperature=temperature, topk_tail=topk_tail)
  return _public(
    "tokenwise_fce", with_metrics, cfg=cfg, teacher=teacher, tokens=tokens, mask=mask, logits=student_logits
  )


def reverse_kl_loss(
  student_logits,
  teacher,
  tokens,
  mask,
  *,
  normalize="sequence",
  temperature=1.0,
  topk_tail="bucket",
  with_metrics=False,
):
  """Per-token KL(pi_theta || q) at the student's positions (SDPO-style self-distillation), exact over buckets."""
  cfg = _cfg(normalize=normalize, teacher_temperature=temperature, topk_tail=topk_tail)
  return _public("reverse_kl", with_metrics, cfg=cfg, teacher=teacher, tokens=tokens, mask=mask, logits=student_logits)


def jsd_loss(
  student_logits,
  teacher,
  tokens,
  mask,
  *,
  beta=0.5,
  normalize="sequence",
  temperature=1.0,
  topk_tail="bucket",
  with_metrics=False,
):
  """Generalised JSD (GKD / OPSD): beta KL(q||m) + (1-beta) KL(pi||m), m = beta q + (1-beta) pi, as TRL defines it."""
  cfg = _cfg(jsd_beta=beta, normalize=normalize, teacher_temperature=temperature, topk_tail=topk_tail)
  return _public("jsd", with_metrics, cfg=cfg, teacher=teacher, tokens=tokens, mask=mask, logits=student_logits)


def grpo_loss(
  student_logits,
  tokens,
  mask,
  rewards,
  *,
  group_size,
  behaviour_logprobs=None,
  clip_eps=0.2,
  ref_logprobs=None,
  kl_coef=0.0,
  normalize="sequence_token_mean",
  with_metrics=False,
):
  """GRPO: group-normalised advantages (r - mean) / (std + eps) with the unbiased group std, clipped ratio,
  optional k3 KL to a reference policy."""
  cfg = _cfg(clip_eps=clip_eps, kl_coef=kl_coef, normalize=normalize)
  return _public(
    "grpo",
    with_metrics,
    cfg=cfg,
    teacher=None,
    tokens=tokens,
    mask=mask,
    logits=student_logits,
    group_size=group_size,
    rewards=rewards,
    behaviour_logprobs=behaviour_logprobs,
    ref_logprobs=ref_logprobs,
  )


def sft_loss(student_logits, tokens, mask, *, normalize="token", with_metrics=False):
  """Cross-entropy on expert-written response tokens."""
  return _public(
    "sft", with_metrics, cfg=_cfg(normalize=normalize), teacher=None, tokens=tokens, mask=mask, logits=student_logits
  )
