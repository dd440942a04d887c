"""DistIL's sequence-level forward cross-entropy, and the baselines beside it, from per-position terms.

`token_terms.py` computes the per-position terms (from logits, or fused from hidden states); DistIL's surrogate
is in `surrogate.py` (the estimator, its baseline and its terminal handling, with the maths), GRPO in `grpo.py`;
reverse KL, JSD and SFT are a term each. This module holds the options (`LossConfig`), the reduction to a scalar,
and the public entries (`distil_loss`, `fused_distil_loss`, ...), each one call of `compute_loss`.

Reduction to the scalar (`reduction`):
  "sequence"             sum over a sequence's tokens, mean over sequences: an unbiased estimate of J and grad J.
  "token"                the same sum divided by the batch's token count: per batch, a positive rescaling of the
                         "sequence" estimator (same direction, a step size that does not grow with response length);
                         in expectation it follows E[sum_t c_t] / E[|y|] with the divisor held fixed.
  "sequence_token_mean"  token mean within each sequence, then mean over sequences (original GRPO): weighs every
                         sequence equally whatever its length, i.e. optimises E[(1/|y|) sum_t c_t], not J.
  "auto"                 the kind's published convention: "sequence" for the distillation losses, "token" for SFT,
                         "sequence_token_mean" for GRPO (DeepSeekMath; DAPO's token-level mean is "token").

Which policy: pi_theta is the distribution the sampler draws from, softmax(logits / policy_temperature) over the
tokenizer's ids (as verl does), so on fresh rollouts the ratio is exactly 1 at any sampling temperature. Top-k and
top-p truncation would make the sampled policy a different, non-smooth function of theta (and give the expert's
mass outside the nucleus an infinite cost); the loop refuses them for the losses that use the ratio.

Dims: B sequences (groups of `group_size` consecutive rows share a prompt), T positions, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from distil_jax import checks, grpo, surrogate
from distil_jax import token_terms as tt
from distil_jax.token_terms import HiddenTeacher, Samples, TopK  # noqa: F401  (public target types)

KINDS = ("distil", "tokenwise_fce", "reverse_kl", "jsd", "grpo", "sft", "distil_grpo")
# What each kind is, in one place (the checks, the loop and the update read these):
SEQUENCE_LEVEL = ("distil", "distil_grpo")  # DistIL's score term: the reward-to-go of the costs, a LOO baseline
REWARDED = ("grpo", "distil_grpo")  # a group-relative advantage of the verifier's reward: groups of >= 2
USES_RATIO = ("distil", "grpo", "distil_grpo")  # the losses whose estimator compares log pi with the sampler's
ON_POLICY = ("grpo", "reverse_kl", "jsd", "distil_grpo")  # trained on fresh rollouts unless buffer.mix says otherwise
NO_TEACHER = ("grpo", "sft")  # read no expert distribution
OVER_STUDENT_TOPK = ("reverse_kl", "jsd")  # may be taken over the student's top k ids (loss.student_topk)
LABELLED_ONLY = ("distil", "tokenwise_fce", "reverse_kl", "jsd")  # read only labelled rows: the others may be skipped
BASELINES = ("none", "loo")
REDUCTIONS = ("auto", "sequence", "token", "sequence_token_mean")
_PUBLISHED_REDUCTION = {"grpo": "sequence_token_mean", "sft": "token"}  # every other kind: "sequence"


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Every option of every loss; the public functions below are thin entries into this one path."""

  kind: str = "distil"
  baseline: str = "none"  # distil: "none" or "loo" (leave-one-out over the group)
  baseline_parts: int = 1  # distil, loo: the baseline is taken within each of this many equal parts of a group
  reduction: str = "auto"
  cost: str = "ce"  # distil / tokenwise_fce: "ce" (the paper) or "kl" (CE minus the expert's entropy)
  clip_eps: float = 0.2  # PPO ratio clipping for the score term (distil, grpo)
  teacher_temperature: float = 1.0  # dense teachers: q = softmax(logits / teacher_temperature)
  policy_temperature: float = 1.0  # the student: pi = softmax(logits / policy_temperature) (sampling temperature)
  vocab_limit: int = 0  # ids >= vocab_limit (LM-head padding) have probability 0; 0: all rows are real ids
  topk_tail: str = "bucket"  # top-k teachers: "bucket" (coarsened, tail mass kept) or "renorm"
  jsd_beta: float = 0.5
  kl_coef: float = 0.0  # grpo: weight of the k3 KL estimate to a frozen reference policy
  std_eps: float = 1e-4  # grpo: advantage = (r - mean) / (std + eps)
  chunk_size: int = 64  # fused path: time steps per logits block (block = per-device batch x chunk x V)
  terminal: str = "free"  # distil / tokenwise_fce: "free" (costs end at EOS, the paper's J) or "hold"
  student_topk: int = 0  # dense teachers: divergences over the student's top k ids + a tail bucket (SDPO: 100)
  distil_weight: float = 1.0  # distil_grpo: GRPO + distil_weight * DistIL (whose gradient can be 100-1000x GRPO's)
  distil_weight_decay_iterations: int = 0  # distil_grpo: the weight falls linearly to 0 over these (0: constant)

  def __post_init__(self):
    def own(ch):
      check_section(ch)
      ch.number("loss.policy_temperature", lo=0, lo_open=True)

    checks.raise_problems("loss", dataclasses.asdict(self), own)

  @property
  def reduction_used(self) -> str:
    """`reduction`, with "auto" resolved to the kind's published convention."""
    if self.reduction != "auto":
      return self.reduction
    return _PUBLISHED_REDUCTION.get(self.kind, "sequence")

  @property
  def terms(self) -> tuple[str, ...]:
    """Which per-position terms to compute (the fused path computes nothing else): the objective's, and for every
    loss with a teacher the cross-entropy and the teacher's entropy, whose difference KL(q || pi) at the student's
    states is logged (a teacher flatter or sharper than the student shows there first)."""
    if not self.needs_teacher:
      return ()
    return ("ce", "teacher_entropy") + {"reverse_kl": ("rkl",), "jsd": ("jsd",)}.get(self.kind, ())

  @property
  def term_options(self) -> tt.TermOptions:
    return tt.TermOptions(
      terms=self.terms,
      topk_tail=self.topk_tail,
      teacher_temperature=self.teacher_temperature,
      jsd_beta=self.jsd_beta,
      policy_temperature=self.policy_temperature,
      vocab_limit=self.vocab_limit,
      student_topk=self.student_topk,
    )

  @property
  def needs_teacher(self) -> bool:
    return self.kind not in NO_TEACHER

  def distil_weight_at(self, iteration):
    """distil_grpo's weight on DistIL at a DAgger iteration (1-based): `distil_weight`, falling linearly to 0 over
    `distil_weight_decay_iterations` (the reward alone steers the end of a run; the expert's dense signal its
    start, when rewards are rare)."""
    if not self.distil_weight_decay_iterations:
      return self.distil_weight
    left = 1.0 - (iteration - 1) / self.distil_weight_decay_iterations
    return self.distil_weight * jnp.clip(left, 0.0, 1.0)


def check_section(ch: checks.Checks) -> None:
  """The `loss` section's enums and ranges, one line each (`checks.py`); what a loss needs from the other sections
  (a teacher on the device, group sizes, an untruncated sampler) is checked across sections, in `validate.py`."""
  kind_ok = ch.enum("loss.kind", KINDS)
  ch.enum("loss.baseline", BASELINES)
  ch.enum("loss.reduction", REDUCTIONS)
  ch.enum("loss.cost", ("ce", "kl"))
  ch.enum("loss.topk_tail", ("bucket", "renorm"))
  ch.enum("loss.terminal", ("free", "hold"))
  ch.number("loss.clip_eps", lo=0, lo_open=True)
  if ch.has("loss.teacher_temperature") and ch.value("loss.teacher_temperature") is not None:
    ch.number("loss.teacher_temperature", lo=0, lo_open=True)  # unset: the sampler's, for a teacher on the device
  ch.number("loss.jsd_beta", lo=0, hi=1)
  ch.number("loss.kl_coef", lo=0)
  ch.number("loss.std_eps", lo=0, lo_open=True)
  ch.count("loss.chunk_size")
  ch.number("loss.distil_weight", lo=0)
  ch.number("loss.distil_weight_decay_iterations", lo=0, integer=True)
  topk_ok = ch.number("loss.student_topk", lo=0, integer=True)
  if topk_ok and kind_ok and ch.value("loss.student_topk") and ch.value("loss.kind") not in OVER_STUDENT_TOPK:
    ch.fail(
      "loss.student_topk",
      "applies to loss.kind reverse_kl (SDPO) or jsd: a forward CE over buckets that move with theta is not J",
    )


def reduce_to_scalar(per_token_BxT, mask_BxT, how: str):
  """Reduce masked per-token values to the scalar loss; see the module docstring for what each optimises."""
  m = mask_BxT.astype(jnp.float32)
  per_seq = jnp.sum(jnp.where(m > 0, per_token_BxT, 0.0), axis=1)
  if how == "sequence":
    return jnp.mean(per_seq)
  if how == "token":
    return jnp.sum(per_seq) / jnp.maximum(jnp.sum(m), 1.0)
  return jnp.mean(per_seq / jnp.maximum(jnp.sum(m, axis=1), 1.0))


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
  whole_response_credit=None,
  labelled=None,
  distil_weight=None,
):
  """(scalar loss, metrics) of `cfg.kind` from per-position terms (see `token_terms`).

  score_weight [B]: optional per-sequence weight of DistIL's score term (1 on fresh rollouts, 0 on stale ones).
  whole_response_credit [B] bool: rows whose expert read the row's own response; their score weight is the whole
  response's cost at every token (module docstring). None: no such row.
  labelled [B]: rows the expert labelled (None: all). A loss with a teacher sees only these; distil_grpo's GRPO part
  sees every row (its reward needs no label).
  distil_weight: distil_grpo's weight on DistIL (a traced scalar from `cfg.distil_weight_at`); None: the config's.
  """
  mask = mask_BxT.astype(jnp.float32)
  if cfg.kind == "distil_grpo":
    weight = cfg.distil_weight if distil_weight is None else distil_weight
    rows = (rewards, behaviour_logprobs, ref_logprobs, score_weight, whole_response_credit, labelled)
    return _distil_grpo(cfg, terms, mask, group_size, *rows, weight)
  if labelled is not None:
    mask = mask * labelled.astype(jnp.float32)[:, None]
  loss_mask = mask
  if cfg.kind in ("distil", "tokenwise_fce"):
    per_token, metrics, loss_mask = surrogate.distil_per_token(
      cfg, terms, mask, group_size, behaviour_logprobs, cfg.kind == "distil", score_weight, whole_response_credit
    )
  elif cfg.kind == "reverse_kl":
    per_token, metrics = terms["rkl"], {}
  elif cfg.kind == "jsd":
    per_token, metrics = terms["jsd"], {}
  elif cfg.kind == "grpo":
    per_token, metrics = grpo.grpo_per_token(cfg, terms, mask, group_size, rewards, behaviour_logprobs, ref_logprobs)
  else:  # sft: the tokens are the expert's own response
    per_token, metrics = -terms["logp"], {}
  loss = reduce_to_scalar(per_token, loss_mask, cfg.reduction_used)
  return loss, _common_metrics(cfg, terms, mask, metrics, loss)


def _distil_grpo(cfg, terms, mask, group_size, rewards, behaviour, ref, score_weight, own, labelled, weight):
  """GRPO on every response plus `weight` x DistIL on the labelled ones, each reduced by its own convention
  ("auto"), or both by `reduction`."""
  labelled_mask = mask if labelled is None else mask * labelled.astype(jnp.float32)[:, None]
  per_token, metrics, cost_mask = surrogate.distil_per_token(
    cfg, terms, labelled_mask, group_size, behaviour, True, score_weight, own
  )
  grpo_token, grpo_metrics = grpo.grpo_per_token(cfg, terms, mask, group_size, rewards, behaviour, ref)
  auto = cfg.reduction == "auto"
  distil_part = reduce_to_scalar(per_token, cost_mask, "sequence" if auto else cfg.reduction)
  grpo_part = reduce_to_scalar(grpo_token, mask, "sequence_token_mean" if auto else cfg.reduction)
  loss = grpo_part + weight * distil_part
  metrics.update(grpo_metrics, distil_part=distil_part, grpo_part=grpo_part, distil_weight=jnp.asarray(weight))
  return loss, _common_metrics(cfg, terms, labelled_mask, metrics, loss)


def count_of(figure: str) -> str | None:
  """The figure counting the tokens that a step's token-mean `figure` divides by, so that an iteration can pool its
  updates token by token (a teacher loss's update with no labelled row has means of 0 over no token); None for a
  figure with one value per update (loss, cost, length, reward, grad_norm)."""
  if figure in ("ratio_mean", "clip_fraction", "kl_ref"):
    return "ratio_tokens"
  if figure in ("entropy", "logp", "advantage_abs", "teacher_nonfinite") or figure.endswith("_per_token"):
    return "loss_tokens"
  return None


def _common_metrics(cfg, terms, mask, metrics, loss):
  """Every kind's figures: the loss, the student's entropy and log pi(y_t), length, and the teacher's terms; the token
  means run over `mask`'s tokens, `loss_tokens` of them (`count_of`)."""
  metrics.update(
    loss=loss,
    loss_tokens=jnp.sum(mask),
    entropy=surrogate.token_mean(terms["entropy"], mask),
    logp=surrogate.token_mean(terms["logp"], mask),
    length=jnp.mean(jnp.sum(mask, axis=1)),
  )
  for name in cfg.terms:
    if name in terms:  # a caller's own terms may hold only what its objective needs
      metrics[f"{name}_per_token"] = surrogate.token_mean(jnp.where(mask > 0, terms[name], 0.0), mask)
  if "ce" in terms and "teacher_entropy" in terms:
    metrics["kl_per_token"] = metrics["ce_per_token"] - metrics["teacher_entropy_per_token"]  # KL(q || pi)
  if "teacher_nonfinite" in terms:  # the share of response positions where the expert's distribution is NaN or inf
    metrics["teacher_nonfinite"] = surrogate.token_mean(jnp.where(mask > 0, terms["teacher_nonfinite"], 0.0), mask)
  return jax.tree.map(jax.lax.stop_gradient, metrics)


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
  whole_response_credit=None,
  labelled=None,
  distil_weight=None,
  rows=None,
):
  """The loss from student logits, or fused from hidden states and the LM head when `hidden` is given.

  rows [K]: the batch rows that `logits` / `hidden` and the teacher hold, a superset of the `labelled` ones, for the
  kinds that read only those (`LABELLED_ONLY`); the other rows get zero terms and ratio 1, which their zero mask
  makes exact: the update need not run the student and the teacher over rows no label reaches. None: every row."""
  teacher = teacher if cfg.needs_teacher else None
  held_tokens, held_mask = (tokens, mask) if rows is None else (tokens[rows], mask[rows])
  if hidden is not None:
    terms = tt.fused_token_terms(
      hidden, lm_head, teacher, held_tokens, mask=held_mask, chunk_size=cfg.chunk_size, opts=cfg.term_options
    )
  else:
    terms = tt.token_terms(logits, teacher, held_tokens, mask=held_mask, opts=cfg.term_options)
  if rows is not None:
    if cfg.kind not in LABELLED_ONLY or labelled is None:
      raise ValueError(f"rows: loss.kind={cfg.kind!r} reads rows no label reaches, or no rows are marked labelled")
    full = {k: jnp.zeros(tokens.shape, v.dtype).at[rows].set(v) for k, v in terms.items()}
    if behaviour_logprobs is not None:  # ratio exactly 1 on the rows not held (their score is masked out anyway)
      full["logp"] = behaviour_logprobs.astype(terms["logp"].dtype).at[rows].set(terms["logp"])
    terms = full
  return loss_from_terms(
    cfg,
    terms,
    mask,
    group_size=group_size,
    rewards=rewards,
    behaviour_logprobs=behaviour_logprobs,
    ref_logprobs=ref_logprobs,
    score_weight=score_weight,
    whole_response_credit=whole_response_credit,
    labelled=labelled,
    distil_weight=distil_weight,
  )


# -- Public entry points: each is `compute_loss(LossConfig(kind=..., **options), ...)`, with LossConfig's names and
# defaults for every option (an unknown option is a TypeError naming it).


def _entry(kind, options, with_metrics, **inputs):
  out = compute_loss(LossConfig(kind=kind, **options), **inputs)
  return out if with_metrics else out[0]


def distil_loss(
  student_logits,
  teacher,
  tokens,
  mask,
  *,
  group_size=1,
  behaviour_logprobs=None,
  whole_response_credit=None,
  with_metrics=False,
  **options,
):
  """DistIL surrogate: its value estimates J, its gradient is the DistIL estimator (module docstring).

  student_logits [B,T,V]: row t is the student's distribution of tokens[:, t]. teacher: dense logits [B,T,V], a
  top-k pair (ids [B,T,K], logprobs [B,T,K]), `Samples(ids)` or `HiddenTeacher`. mask [B,T]: response positions.
  whole_response_credit [B] bool: rows whose expert read the row's own response (default: none).
  options: any LossConfig field, e.g. baseline="loo", cost="kl", terminal="hold", policy_temperature=0.7.
  Returns the scalar, or (scalar, metrics) with `with_metrics=True`.
  """
  rows = dict(group_size=group_size, behaviour_logprobs=behaviour_logprobs, whole_response_credit=whole_response_credit)
  inputs = dict(teacher=teacher, tokens=tokens, mask=mask, logits=student_logits)
  return _entry("distil", options, with_metrics, **inputs, **rows)


def fused_distil_loss(
  hidden,
  lm_head,
  teacher,
  tokens,
  mask,
  *,
  group_size=1,
  behaviour_logprobs=None,
  whole_response_credit=None,
  with_metrics=False,
  **options,
):
  """`distil_loss(hidden @ lm_head, ...)` in value and gradient, without a [B,T,V] array (chunked, recomputed)."""
  rows = dict(group_size=group_size, behaviour_logprobs=behaviour_logprobs, whole_response_credit=whole_response_credit)
  student = dict(hidden=hidden, lm_head=lm_head)
  return _entry("distil", options, with_metrics, teacher=teacher, tokens=tokens, mask=mask, **student, **rows)


def tokenwise_fce_loss(student_logits, teacher, tokens, mask, *, with_metrics=False, **options):
  """The local part of DistIL alone: sum_t c_t with no score term (DAgger with a distributional expert)."""
  return _entry(
    "tokenwise_fce", options, with_metrics, teacher=teacher, tokens=tokens, mask=mask, logits=student_logits
  )


def reverse_kl_loss(student_logits, teacher, tokens, mask, *, with_metrics=False, **options):
  """Per-token KL(pi_theta || q) at the student's positions (SDPO-style self-distillation), exact over buckets."""
  return _entry("reverse_kl", options, with_metrics, teacher=teacher, tokens=tokens, mask=mask, logits=student_logits)


def jsd_loss(student_logits, teacher, tokens, mask, *, with_metrics=False, **options):
  """Generalised JSD (GKD / OPSD): beta KL(q||m) + (1-beta) KL(pi||m), m = beta q + (1-beta) pi, as TRL defines it
  (beta is `jsd_beta`)."""
  return _entry("jsd", options, with_metrics, teacher=teacher, tokens=tokens, mask=mask, logits=student_logits)


def grpo_loss(
  student_logits,
  tokens,
  mask,
  rewards,
  *,
  group_size,
  behaviour_logprobs=None,
  ref_logprobs=None,
  with_metrics=False,
  **options,
):
  """GRPO as published (DeepSeekMath): group-normalised advantages (r - mean) / (std + eps) with the unbiased group
  std, PPO-clipped ratio, per-response token mean then batch mean (reduction="token" for DAPO's token-level mean),
  optional k3 KL to a reference policy (kl_coef, ref_logprobs)."""
  rows = dict(group_size=group_size, rewards=rewards, behaviour_logprobs=behaviour_logprobs, ref_logprobs=ref_logprobs)
  return _entry("grpo", options, with_metrics, teacher=None, tokens=tokens, mask=mask, logits=student_logits, **rows)


def sft_loss(student_logits, tokens, mask, *, with_metrics=False, **options):
  """Cross-entropy on expert-written response tokens (token mean by default)."""
  return _entry("sft", options, with_metrics, teacher=None, tokens=tokens, mask=mask, logits=student_logits)
