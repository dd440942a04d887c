"""The jitted update: student forward, teacher forward (on-device experts), fused loss, optax step.

A batch holds Bg prompt groups of G responses each (`batch.py`). The student reads [left-padded prompt | response]
with the sampler's exact positions and masks, so on fresh data the recomputed log-probs equal the behaviour ones.
Only the student is differentiated: a `self` teacher is the student's own parameters under stop_gradient (or an EMA
copy kept in the train state), a `model` teacher's parameters are passed in and never checkpointed (big_vision's
rule for teachers). GRPO's KL reference is a frozen copy of the starting parameters kept in the train state ("ref",
checkpointed so that a resumed run has the same reference), evaluated on device. A step whose loss or gradient is
not finite leaves the state untouched and says so in its metrics; the host loop stops with an error naming the
iteration (see train.py).

The batch: rows of `batch.fields` (numpy on host, global arrays on the mesh, rows over data x fsdp).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from distil_jax import checks, losses, sharding
from distil_jax import model as model_lib
from distil_jax import token_terms as tt


@dataclasses.dataclass(frozen=True)
class UpdateOptions:
  """What one jitted update is built for: the loss, where its labels are, and the state it keeps beside the policy."""

  loss: losses.LossConfig
  # Where the expert's labels are (batch.LABELS): "topk", targets in the batch; "device", a teacher forward inside the
  # update over the batch's re-prompts, with a model expert's parameters, else the student's EMA or live ones (self).
  labels: str
  ema_decay: float = 0.0  # self: 0 means the live parameters are the teacher
  frozen_policy: bool = False  # grpo with kl_coef > 0: state["ref"] holds the policy its KL term is taken to
  use_behaviour_logprobs: bool = True  # off-policy ratio from the sampler's log-probs
  score_max_staleness: int = 0  # DistIL's score term only on rollouts at most this many iterations old

  @property
  def skips_unlabelled(self) -> bool:
    """Whether the step may run the student and the teacher over the labelled rows only (`kept_rows`): a device
    teacher marks its rows (`teacher_valid`), and the loss reads nothing else."""
    return self.labels == "device" and self.loss.kind in losses.LABELLED_ONLY


def kept_rows(labelled_BgxG, shards: int) -> np.ndarray | None:
  """The rows [K] a step runs the student and the teacher over: every labelled one, then unlabelled ones up to K, the
  smallest of B/4 and B/2 that holds them and splits over `shards` devices; None (every row) when none does.

  Why: a self teacher shown a correct sibling labels only responses whose group has one, often a fifth of them or
  fewer; the others' loss is zero, so their forward and backward passes are work for nothing. Two sizes bound the
  compilations."""
  labelled = np.asarray(labelled_BgxG).reshape(-1) > 0
  b, n = labelled.size, int(labelled.sum())
  sizes = [k for k in (b // 4, b // 2) if k >= max(n, 1) and k % shards == 0]
  if not sizes:
    return None
  order = np.concatenate([np.flatnonzero(labelled), np.flatnonzero(~labelled)])
  return np.sort(order[: sizes[0]]).astype(np.int32)


def check_section(ch: checks.Checks) -> None:
  """The `optim` section, one line per problem (`checks.py`)."""
  ch.number("optim.lr", lo=0, lo_open=True)
  ch.number("optim.lr_warmup_steps", lo=0, integer=True)
  ch.enum("optim.schedule", ("constant", "cosine"))
  ch.number("optim.b1", lo=0, hi=1, hi_open=True)
  ch.number("optim.b2", lo=0, hi=1, hi_open=True)
  ch.number("optim.eps", lo=0, lo_open=True)
  ch.number("optim.weight_decay", lo=0)
  ch.number("optim.max_grad_norm", lo=0, lo_open=True)


def make_optimizer(cfg, total_updates: int) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; linear warmup, then constant or cosine decay (config `optim`)."""
  checks.raise_problems("optim", cfg, check_section)
  warmup = min(cfg.lr_warmup_steps, max(total_updates - 1, 0))
  if cfg.schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(total_updates, warmup + 1))
  else:  # "constant": always a schedule, so the optimizer state has one structure
    lr = optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)), optax.constant_schedule(cfg.lr)], [warmup]
    )
  return optax.chain(
    optax.clip_by_global_norm(cfg.max_grad_norm),
    optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
  )


def state_shardings(tx, params, mesh, *, ema: bool = False, ref: bool = False):
  """Shardings of the train state: every optimizer leaf shaped like a parameter (Adam's mu and nu) takes that
  parameter's sharding, everything else (step counts, schedule state) is replicated.

  `tx.init` builds its moments with `zeros_like`, which has no data dependence on the parameters, so a plain
  `jit(tx.init)` lets XLA place them anywhere (on one device, say, and then replicated: FSDP would save no optimizer
  memory). The layout is therefore derived from the abstract state, as nanodo does.
  """
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  abstract = jax.eval_shape(tx.init, params)
  everywhere = sharding.replicated(mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, abstract, param_sh, transform_non_params=lambda _: everywhere)
  out = {"params": param_sh, "opt_state": opt_sh}
  for name, wanted in (("ema", ema), ("ref", ref)):
    if wanted:
      out[name] = param_sh
  return out


def init_state(tx, params, mesh, *, ema: bool = False, ref: bool = False):
  """The train state on the mesh, created in place: moments sharded like their parameters, scalars replicated.

  Committed arrays from the start: the jitted update and sampler then see the same input layout on every call, and
  compile once.
  """
  shardings = state_shardings(tx, params, mesh, ema=ema, ref=ref)

  def init(params):
    state = {"params": params, "opt_state": tx.init(params)}
    for name in ("ema", "ref"):
      if name in shardings:
        state[name] = jax.tree.map(jnp.copy, params)
    return state

  return jax.jit(init, out_shardings=shardings)(params)


def response_hidden(model, prompts_BxP, prompt_mask_BxP, responses_BxN):
  """Hidden states [B,N,D] that predict each response token, as the sampler computed them."""
  p = prompts_BxP.shape[1]
  seq = jnp.concatenate([prompts_BxP, responses_BxN], axis=1)
  seg = jnp.concatenate([prompt_mask_BxP, jnp.ones_like(responses_BxN)], axis=1).astype(jnp.int32)
  hidden = model.hidden_states(seq[:, :-1], segment_ids_BxT=seg[:, :-1])
  return hidden[:, p - 1 :]


def _rows(x, g):
  """[Bg,G,...] -> [Bg*G,...]."""
  return x.reshape(x.shape[0] * g, *x.shape[2:])


def _reference_logprobs(ref_params, graphdef, prompts, pmask, responses, cfg):
  """log pi_ref(y_t) of the frozen reference policy, with the student's temperature and vocabulary."""
  ref = model_lib.merge_for_compute(graphdef, jax.lax.stop_gradient(ref_params))
  hidden = response_hidden(ref, prompts, pmask, responses)
  opts = dataclasses.replace(cfg.term_options, terms=())
  return tt.fused_token_terms(hidden, ref.lm_head_kernel(), None, responses, chunk_size=cfg.chunk_size, opts=opts)[
    "logp"
  ]


def topk_teacher(batch, g: int):
  """(the top-k targets [B,N,K] pair, [B] 1 where the response is labelled): a response whose top-k lists are all
  empty (-inf everywhere) was not labelled (the http expert leaves a response without feedback so) and stays out of
  the loss, as `teacher_valid` keeps it out for the device experts."""
  teacher = (_rows(batch["target_ids"], g), _rows(batch["target_logprobs"], g))
  return teacher, jnp.any(teacher[1] > -jnp.inf, axis=(1, 2)).astype(jnp.float32)


def loss_fn(
  params, batch, teacher_params, ref_params, iteration, kept=None, *, graphdef, teacher_graphdef, options: UpdateOptions
):
  """(loss, metrics) of a batch; `kept` [K]: the rows the student and the teacher run over (`kept_rows`), or None."""
  if kept is not None and not options.skips_unlabelled:
    raise ValueError(f"kept rows: loss.kind={options.loss.kind!r} with {options.labels!r} labels reads every row")
  model = model_lib.merge_for_compute(graphdef, params)
  cfg = options.loss
  bg, g, n = batch["tokens"].shape
  if cfg.kind == "sft":
    prompts, pmask = batch["prompt_tokens"], batch["prompt_mask"]
    responses, mask, group = batch["sft_tokens"], batch["sft_mask"], 1
  else:
    prompts, pmask = jnp.repeat(batch["prompt_tokens"], g, 0), jnp.repeat(batch["prompt_mask"], g, 0)
    responses, mask, group = _rows(batch["tokens"], g), _rows(batch["mask"], g), g
  mask = mask.astype(jnp.float32)
  held = (lambda x: x) if kept is None else (lambda x: x[kept])
  hidden = response_hidden(model, held(prompts), held(pmask), held(responses))
  teacher, labelled = None, None  # labelled [B]: the responses the expert labelled (the loss reads only these)
  if cfg.needs_teacher and options.labels == "topk":
    teacher, labelled = topk_teacher(batch, g)
  elif cfg.needs_teacher:
    if teacher_params is None:
      teacher_params = jax.lax.stop_gradient(params)
    tmodel = model_lib.merge_for_compute(teacher_graphdef, teacher_params)
    tprompts, tmask = held(_rows(batch["teacher_tokens"], g)), held(_rows(batch["teacher_mask"], g))
    thidden = response_hidden(tmodel, tprompts, tmask, held(responses))
    positions = jnp.broadcast_to(jnp.arange(n), (thidden.shape[0], n))
    teacher = losses.HiddenTeacher(thidden, tmodel.lm_head_kernel(), positions)
    labelled = _rows(batch["teacher_valid"], g).astype(jnp.float32)
  behaviour = None
  if options.use_behaviour_logprobs and cfg.kind in losses.USES_RATIO:
    behaviour = _rows(batch["logprobs"], g)
  ref_logprobs = None
  if options.frozen_policy:
    ref_logprobs = _reference_logprobs(ref_params, graphdef, prompts, pmask, responses, cfg)
  fresh = (iteration - batch["iteration"]) <= options.score_max_staleness
  own = None  # rows whose expert read their own response (a distil row's score weight is then its whole cost)
  if cfg.kind in losses.SEQUENCE_LEVEL and "whole_response_credit" in batch:
    own = _rows(batch["whole_response_credit"], g)
  return losses.compute_loss(
    cfg,
    teacher=teacher,
    tokens=responses,
    mask=mask,
    hidden=hidden,
    # The float32 master head: the fused loss casts it once and sums its gradient over chunks in float32, and hands
    # that sum back in float32 (a compute-dtype head would get it rounded to bf16 once more).
    lm_head=nnx.merge(graphdef, params).lm_head_kernel(),
    group_size=group,
    rewards=batch["reward"].reshape(-1),
    behaviour_logprobs=behaviour,
    ref_logprobs=ref_logprobs,
    score_weight=jnp.repeat(fresh, group).astype(jnp.float32),
    whole_response_credit=own,
    labelled=labelled,
    distil_weight=cfg.distil_weight_at(iteration) if cfg.kind == "distil_grpo" else None,
    rows=kept,
  )


def make_update(graphdef, tx, options: UpdateOptions, *, teacher_graphdef=None, state_shardings=None):
  """jit(update)(state, batch, teacher_params, iteration, kept=None) -> (state, metrics); `state` is donated. `kept`:
  the rows to run the student and the teacher over (`kept_rows`; one compilation per size).

  state: {"params", "opt_state"} (+ "ema" for a self teacher with ema_decay > 0, + "ref" for GRPO's KL reference).
  """
  teacher_graphdef = teacher_graphdef or graphdef

  def update(state, batch, teacher_params, iteration, kept=None):
    if teacher_params is None:  # a self teacher: its EMA, or (None) the live parameters
      teacher_params = state.get("ema")
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, metrics), grads = grad_fn(
      state["params"],
      batch,
      teacher_params,
      state.get("ref"),
      iteration,
      kept,
      graphdef=graphdef,
      teacher_graphdef=teacher_graphdef,
      options=options,
    )
    grad_norm = optax.global_norm(grads)

    def step(state):
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      new = {**state, "params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}
      if "ema" in state:
        d = options.ema_decay
        new["ema"] = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state["ema"], new["params"])
      return new

    # A branch, not a select between the new and the old state: that would be one more pass over every parameter
    # and moment each step. A non-finite gradient has a non-finite norm, so the norm is the whole check.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = jax.lax.cond(finite, step, lambda state: state, state)
    metrics.update(grad_norm=grad_norm, nonfinite=(~finite).astype(jnp.float32))
    return new, metrics

  out = None if state_shardings is None else (state_shardings, None)
  return jax.jit(update, donate_argnums=(0,), out_shardings=out)
