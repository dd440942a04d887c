"""The DAgger loop, top-down: rollouts -> feedback -> expert labels -> buffer -> updates -> eval / checkpoint.

The host owns the loop; sampling, the teacher forward, the loss and the update are jitted and sharded. Every random
choice is a function of (config.seed, iteration), so a run killed at any point and resumed from its last checkpoint
replays to the same parameters, buffer and metrics as a run that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from distil_jax import buffer as buffer_lib
from distil_jax import (
  checkpoint,
  data,
  evaluate,
  experts,
  hf,
  losses,
  metrics,
  preemption,
  run_config,
  sharding,
  tasks,
  update,
  validate,
)
from distil_jax import model as model_lib
from distil_jax import rollout as rollout_lib
from distil_jax import tokenizer as tok_lib
from distil_jax.errors import CheckpointError, ConfigError, ExpertError, InputError

# ---------------------------------------------------------------------------------------------------------------------
# Set-up


def make_tokenizer(config, task, workdir: str, *, save: bool = True) -> tok_lib.Tokenizer:
  """The configured tokenizer, the checkpoint's, or one trained on the task's text (saved in the workdir unless
  `save` is False: `keep_tokenizer` does it once the run's input has been checked), with its chat template
  (`tokenizer.chat_template`)."""
  t = config.tokenizer
  if t.path or config.model.hf_path:
    return tok_lib.load_tokenizer(t.path or config.model.hf_path, t.chat_template, t.system_prompt)
  saved = os.path.join(workdir, "tokenizer.model")
  if os.path.exists(saved):
    tok = tok_lib.SentencePieceTokenizer.from_file(saved)
  elif config.model.init_from:  # the run this one starts from trained it; keep a copy so the workdir stands alone
    tok = tok_lib.SentencePieceTokenizer.from_file(os.path.join(config.model.init_from, "tokenizer.model"))
  else:
    extra = [config.expert.reprompt.format(prompt="", feedback=experts.SIBLING)]
    tok = tok_lib.train_sentencepiece(
      list(task.corpus()) + extra,
      config.tokenizer.vocab_size,
      config.tokenizer.model_type,
      config.tokenizer.split_digits,
    )
  if save:
    keep_tokenizer(config, tok, workdir)
  return tok_lib.with_chat(tok, t.chat_template, None, t.system_prompt)


def keep_tokenizer(config, tok, workdir: str) -> None:
  """A trained (or `init_from`'s) tokenizer saved in the workdir, so that the workdir stands alone."""
  saved = os.path.join(workdir, "tokenizer.model")
  if config.tokenizer.path or config.model.hf_path or os.path.exists(saved) or jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  tok.save(saved)


def model_config(config, vocab_size: int) -> model_lib.ModelConfig:
  m = config.model
  multiple = m.vocab_multiple
  return model_lib.ModelConfig(
    vocab_size=-(-vocab_size // multiple) * multiple,
    hidden_size=m.hidden_size,
    intermediate_size=m.intermediate_size,
    num_hidden_layers=m.num_hidden_layers,
    num_attention_heads=m.num_attention_heads,
    num_key_value_heads=m.num_key_value_heads,
    head_dim=m.head_dim or None,
    arch=m.arch,
    rope_theta=m.rope_theta,
    tie_word_embeddings=m.tie_word_embeddings,
    dtype=m.dtype,
    remat=m.remat,
    attention=m.attention,
  )


def make_policy(config, tok, mesh, rules):
  """(graphdef, params, ModelConfig): from a Hugging Face checkpoint, or freshly initialised."""
  if config.model.hf_path:
    model, cfg = hf.load_hf(
      config.model.hf_path,
      mesh=mesh,
      rules=rules,
      dtype=config.model.dtype,
      remat=config.model.remat,
      attention=config.model.attention,
    )
    if tok.vocab_size > cfg.vocab_size:
      raise InputError(
        f"tokenizer has {tok.vocab_size} tokens but {config.model.hf_path} has vocab_size "
        f"{cfg.vocab_size}: they do not belong together"
      )
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params.to_pure_dict(), cfg
  cfg = dataclasses.replace(
    model_config(config, tok.vocab_size), eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id
  )
  graphdef, params = sharding.init_params(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(config.seed)), mesh, rules)
  if config.model.init_from:  # e.g. a behaviour-cloning run shared by several post-training runs
    with checkpoint.Checkpointer(os.path.join(config.model.init_from, "checkpoints")) as ckpt:
      found = ckpt.restore_latest({"params": checkpoint.abstract_like(params)})
    if found is None:
      raise CheckpointError(f"model.init_from={config.model.init_from}: no checkpoint there")
    params = found[1]["params"]
  return graphdef, params, cfg


def load_teacher(config, student_cfg, tok, mesh, rules):
  """The `model` expert: a frozen teacher on the mesh, checked to share the student's vocabulary."""
  path = config.expert.model_path
  if not path:
    raise ConfigError("expert.kind='model' needs expert.model_path (a Hugging Face checkpoint directory)")
  teacher, tcfg = hf.load_hf(path, mesh=mesh, rules=rules, dtype=config.model.dtype, attention=config.model.attention)
  if tcfg.vocab_size != student_cfg.vocab_size:
    raise InputError(
      f"expert vocabulary differs from the student's: {path} has vocab_size {tcfg.vocab_size}, "
      f"the student {student_cfg.vocab_size}"
    )
  if not any(os.path.exists(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer.model")):
    logging.warning(
      "expert.model_path=%s has no tokenizer.json or tokenizer.model: assuming it reads the student's tokenizer "
      "(%d tokens, fingerprint %s); only the vocabulary size (%d) was checked",
      path,
      tok.vocab_size,
      tok.fingerprint,
      tcfg.vocab_size,
    )
  for name in ("tokenizer.json", "tokenizer.model"):
    if os.path.exists(os.path.join(path, name)):
      theirs = tok_lib.load_tokenizer(os.path.join(path, name) if name.endswith(".model") else path)
      if theirs.fingerprint != tok.fingerprint:
        raise InputError(
          f"expert tokenizer ({path}, {theirs.fingerprint}) differs from the student's ({tok.fingerprint})"
        )
  graphdef, params = nnx.split(teacher, nnx.Param)
  return graphdef, params.to_pure_dict()


# ---------------------------------------------------------------------------------------------------------------------
# The run


def warm_up(params, run, *, config, mesh, stop=lambda: False, before=dict, allow_changed=()):
  """DAgger's round 0: `train.warmup_steps` behaviour-cloning updates on the expert's own responses to fresh
  prompts (no sampling), with an optimizer of its own at `train.warmup_lr`, as a separate SFT run would be.
  Returns the parameters and figures (with `before()`'s: the figures of the policy it starts from), or the number
  of steps done when `stop()` said to stop (asked before each step).

  Stopped, it saves what it has done (parameters, its optimizer's state, its figures) in `workdir/warmup`; a rerun
  goes on from there and ends where an uninterrupted warm-up would (step k's batch is `stream[k]`, a function of
  the seed and k), unless its config differs (refused as a resume is: `allow_changed`). The folder is removed once
  the warm-up is complete: from then on the run's own checkpoints hold its result."""
  c = config
  optim = c.optim.copy_and_resolve_references()
  optim.lr = c.train.warmup_lr
  tx = update.make_optimizer(optim, c.train.warmup_steps)
  state = update.init_state(tx, params, mesh)
  spec = update.UpdateSpec(losses.LossConfig(kind="sft", chunk_size=c.loss.chunk_size), teacher="topk")
  step = update.make_update(run.graphdef, tx, spec, state_shardings=jax.tree.map(lambda x: x.sharding, state))
  stream = data.prompt_stream(run.task.problems("train"), seed=c.seed + 1, per_iteration=c.train.warmup_batch)
  with checkpoint.Checkpointer(os.path.join(run.workdir, "warmup"), max_to_keep=1) as saved:
    found = saved.restore_latest(checkpoint.abstract_like(state))
    if found is None:
      first, losses_seen, figures = 0, [], dict(before())
    else:
      first, state, meta = found
      run_config.check_resume(meta["config"], c, allow_changed, saved.directory)
      losses_seen, figures = meta["losses"], meta["figures"]
    for k in range(first, c.train.warmup_steps):
      if stop():
        if saved.latest_step() != k:
          saved.save(k, state, {"config": run_config.flat(c), "losses": losses_seen, "figures": figures})
        return k
      problems = rollout_lib.with_feedback(stream[k], c.train.warmup_reprompt_fraction, config=c, task=run.task)
      batch = rollout_lib.warmup_batch(problems, config=c, tok=run.tok)
      state, m = step(state, data.to_global(batch, mesh), None, jnp.int32(0))
      losses_seen.append(float(m["loss"]))
      if not np.isfinite(losses_seen[-1]):
        raise FloatingPointError(f"non-finite loss in warm-up step {k + 1}")
  if found is not None and jax.process_index() == 0:  # (a warm-up never stopped has no folder)
    shutil.rmtree(saved.directory, ignore_errors=True)
  return state["params"], {
    **figures,
    "warmup/loss_first": losses_seen[0],
    "warmup/loss_last": losses_seen[-1],
    "warmup/steps": c.train.warmup_steps,
  }


# trained on this iteration's rollouts unless buffer.mix says otherwise
ON_POLICY = ("grpo", "reverse_kl", "jsd", "distil_grpo")


def buffer_mix(config) -> float:
  """The fraction of training groups drawn from the aggregated buffer: DAgger's losses aggregate (0.5), the on-policy
  ones train on this iteration's rollouts (0), unless `buffer.mix` is set."""
  if config.buffer.mix is not None:
    return config.buffer.mix
  return 0.0 if config.loss.kind in ON_POLICY else 0.5


def loss_config(config, tok, expert) -> losses.LossConfig:
  """The loss as the loop runs it: the config's `loss` section, plus what the rest of the run decides: the policy is
  the sampler's (its temperature, the tokenizer's ids), an expert that shows siblings splits the baseline, and an
  on-device teacher is scored at the sampler's temperature unless `loss.teacher_temperature` says otherwise (a self
  teacher shown nothing is then the student itself: at T != 1 a teacher at temperature 1 is a flatter policy, and
  forward CE to it drives the student towards uniform)."""
  teacher_temperature = config.loss.teacher_temperature
  if teacher_temperature is None:
    teacher_temperature = config.sampling.temperature if expert.on_device else 1.0
  return losses.LossConfig(
    **{**config.loss, "teacher_temperature": teacher_temperature},
    policy_temperature=config.sampling.temperature,
    vocab_size=tok.vocab_size,
    baseline_parts=2 if expert.reads_siblings else 1,
  )


def _check(config, mode: str = "train"):
  """Every config value in range, every divisibility, every enum (`validate.py`); raises before any work."""
  validate.config(config, mode=mode)


@dataclasses.dataclass
class Run:
  """Everything `train`, `evaluate` and `export` share, built once from the config."""

  config: object
  workdir: str
  mesh: object
  rules: tuple
  task: object
  tok: tok_lib.Tokenizer
  graphdef: object
  params: dict
  model_cfg: model_lib.ModelConfig

  @classmethod
  def build(cls, config, workdir):
    """Reads and checks everything (data records, prompt lengths, the model) and writes nothing: `write_workdir`
    does, once the rest of the input has been checked too."""
    axes = {k: v for k, v in config.mesh.items() if k != "num_devices"}
    mesh = sharding.make_mesh(axes, jax.devices()[: config.mesh.num_devices or None])
    rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.sharding_rules)
    task = tasks.make_task(config.task)
    tok = make_tokenizer(config, task, workdir, save=False)
    validate.prompts(task, tok, config)
    graphdef, params, model_cfg = make_policy(config, tok, mesh, rules)
    return cls(config, workdir, mesh, rules, task, tok, graphdef, params, model_cfg)

  def write_workdir(self):
    """The workdir, its log file and the tokenizer: the first writes of a run."""
    os.makedirs(self.workdir, exist_ok=True)
    metrics.log_to_file(os.path.join(self.workdir, "logs"))
    keep_tokenizer(self.config, self.tok, self.workdir)

  def restore_params(self):
    """The newest usable checkpoint's parameters (export, eval)."""
    with checkpoint.Checkpointer(os.path.join(self.workdir, "checkpoints")) as ckpt:
      found = ckpt.restore_latest({"params": checkpoint.abstract_like(self.params)})
    if found is None:
      raise CheckpointError(f"{self.workdir}/checkpoints holds no checkpoint")
    return found[1]["params"], found[2]


def _finite_or_raise(m, it, k, ckpt, writer, expert=None):
  """Update k's figures, or the error that stops the run when it was skipped for a non-finite loss or gradient.

  A teacher of its own whose distribution is not finite (a NaN or inf weight or activation) is named as the cause:
  the loss is NaN by construction (token_terms), and blaming the step would send the user to the student. (A `self`
  teacher is the student: the step's message holds.)"""
  if m.get("teacher_nonfinite", 0.0) > 0 and expert is not None and expert.kind != "self":
    name = f"the model teacher {expert.model_path}" if expert.kind == "model" else f"the {expert.kind} expert"
    raise ExpertError(
      f"{name} gives a distribution that is not finite (NaN or inf) at "
      f"{m['teacher_nonfinite']:.1%} of the response positions at iteration {it}, update {k}: check its weights "
      f"for NaN or inf; the update was skipped, the last checkpoint (iteration {ckpt.latest_step()}) and "
      f"{writer.path} are intact"
    )
  if m["nonfinite"]:
    raise FloatingPointError(
      f"non-finite loss or gradient at iteration {it}, update {k} (loss={m['loss']}, grad_norm={m['grad_norm']}); "
      f"the update was skipped, the last checkpoint (iteration {ckpt.latest_step()}) and {writer.path} are intact"
    )
  return m


def start_warnings(config) -> list[str]:
  """Valid settings that are likely mistakes, said once at start (the console shows warnings)."""
  out = []
  stale = config.train.score_max_staleness
  if stale > 0:
    out.append(
      f"train.score_max_staleness={stale}: buffer rows up to {stale} iterations old get DistIL's score term through "
      "a per-token ratio to the policy that sampled them, which can be far from the current one (clipped at "
      "1 +- loss.clip_eps); 0, the default, gives stale rows the local term only"
    )
  return out


def label_shares(groups: dict) -> dict[str, float]:
  """What the expert labelled this iteration: the fraction of responses with a label (`rollout/feedback_valid`), of
  those whose feedback read the response itself, and for top-k experts the mass their k entries cover at the
  student's states (a small mass means the tail bucket carries the target)."""
  out = {}
  if "teacher_valid" in groups:
    out["rollout/feedback_valid"] = float(groups["teacher_valid"].mean())
  if "target_logprobs" in groups:
    mass = np.exp(groups["target_logprobs"].astype(np.float64)).sum(-1)  # [Bg,G,N]
    at = groups["mask"] > 0
    labelled = (mass * at).sum(-1) > 0  # [Bg,G]: a response with no target anywhere is unlabelled
    out["rollout/feedback_valid"] = float(labelled.mean())
    out["rollout/teacher_topk_mass"] = float(mass[at & labelled[..., None]].mean()) if labelled.any() else 0.0
  if "whole_response_credit" in groups:
    out["rollout/own_feedback"] = float(groups["whole_response_credit"].mean())
  return out


def _ema(config) -> bool:
  return config.expert.kind == "self" and config.expert.ema_decay > 0


def _meta(config, iteration: int, buffer_rows: int, sampled_tokens: int, schedule_updates: int) -> dict:
  """The host-side state a checkpoint carries (`buffer_rows`: this process's rows, as many on every process: each
  labels an equal share of the prompts), the config it was trained with and the number of updates its learning-rate
  schedule was laid out for."""
  return {
    "iteration": iteration,
    "buffer_rows": buffer_rows,
    "sampled_tokens": sampled_tokens,
    "seed": config.seed,
    "processes": jax.process_count(),
    "config": run_config.flat(config),
    "schedule_updates": schedule_updates,
  }


def train(config, workdir: str, *, allow_changed=()) -> dict:
  """Run (or resume) the DAgger loop; returns the last iteration's figures. Raises `preemption.Preempted` when it
  stopped at SIGTERM or SIGINT, after saving the last completed iteration (see `preemption.py`).

  A resume must have the checkpoint's config except for the keys `allow_changed` names (`run_config.py`). Its
  learning-rate schedule is the one the run started with (laid out for that run's `train.iterations`), unless
  `allow_changed` names `train.iterations`: the schedule is then laid out anew for the new length."""
  with preemption.Stopper() as stopper:
    return _train(config, workdir, stopper, tuple(allow_changed))


def _train(config, workdir: str, stopper: preemption.Stopper, allow_changed: tuple) -> dict:
  _check(config, "train")
  for line in start_warnings(config):
    logging.warning(line)
  run_config.check_allowed_names(allow_changed, config)
  run_config.check_processes(config)
  run = Run.build(config, workdir)
  c, mesh, tok, task = config, run.mesh, run.tok, run.task
  expert = experts.make_expert(c.expert, task, tok, c.tokenizer.add_bos)
  teacher_graphdef, teacher_params = None, None
  if c.expert.kind == "model":
    teacher_graphdef, teacher_params = load_teacher(c, run.model_cfg, tok, mesh, run.rules)
  total_updates = c.train.iterations * c.train.updates_per_iteration
  tx = update.make_optimizer(c.optim, total_updates)
  loss_cfg = loss_config(c, tok, expert)
  reference = loss_cfg.kind in ("grpo", "distil_grpo") and loss_cfg.kl_coef > 0
  state = update.init_state(tx, run.params, mesh, ema=_ema(c), ref=reference)
  spec = update.UpdateSpec(
    loss_cfg,
    teacher="topk" if not expert.on_device else c.expert.kind,
    ema_decay=c.expert.ema_decay,
    reference=reference,
    use_behaviour_logprobs=c.train.use_behaviour_logprobs,
    score_max_staleness=c.train.score_max_staleness,
  )
  if (spec.loss.kind == "sft" or c.train.warmup_steps) and task.problems("train")[0].reference is None:
    raise ConfigError(f"loss.kind='sft' and train.warmup_steps need reference solutions; task {task.name!r} has none")

  # -- Resume (read and checked before anything is written) -----------------------------------------------------------
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=c.checkpoint.keep)
  start, sampled_tokens, rows_at, latest = 0, 0, {}, None
  # Each process labels its own prompts and keeps its own part of the aggregated data set.
  layout = rollout_lib.layout(c, expert)
  buffer_dir = os.path.join(workdir, "buffer", f"process_{jax.process_index()}")
  buf = None
  if buffer_lib.Buffer.exists(buffer_dir, layout):  # through tensorstore: a gs:// buffer is checked too
    try:
      buf = buffer_lib.Buffer(buffer_dir, layout, c.buffer.max_groups)
    except InputError:  # rows of another shape: the config's check below, or the second open, names it
      pass

  def buffer_damage(step, meta):
    """A checkpoint whose training window of the buffer is damaged is not resumed from (an older one may be)."""
    rows = meta.get("buffer_rows", 0)
    if buf is None or rows > buf.rows:  # rows lost altogether: `truncate` names them
      return None
    why = buf.damage(*buf.window(before=rows))
    return why and f"its buffer rows are damaged: {why}"

  try:
    found = ckpt.restore_latest(checkpoint.abstract_like(state), check=buffer_damage)
    if found is not None:
      latest, state, meta = found
      if "config" in meta:
        for key, before, now in run_config.check_resume(meta["config"], c, allow_changed, workdir):
          logging.warning("resuming %s with %s=%r (it was %r): --allow_changed names it", workdir, key, now, before)
      elif meta["seed"] != c.seed:  # every random stream is fold_in(key(seed), iteration): a new seed breaks replay
        raise ConfigError(f"{workdir} was trained with seed {meta['seed']}, this config has seed {c.seed}")
      if meta.get("schedule_updates") and "train.iterations" not in allow_changed:
        total_updates = meta["schedule_updates"]  # the same rates at every step as the run that was extended
        tx = update.make_optimizer(c.optim, total_updates)
      if meta.get("processes", 1) != jax.process_count():  # the buffer is split by process: rows would be lost
        raise CheckpointError(
          f"{workdir} was written by {meta.get('processes', 1)} processes, this run has {jax.process_count()}; "
          "resume it with the same process count"
        )
  except BaseException:
    ckpt.close()
    raise
  shardings = jax.tree.map(lambda x: x.sharding, state)
  step_fn = update.make_update(run.graphdef, tx, spec, teacher_graphdef=teacher_graphdef, state_shardings=shardings)
  run.write_workdir()
  ckpt.set_aside_unusable()
  buf = buf or buffer_lib.Buffer(buffer_dir, layout, c.buffer.max_groups)
  if found is not None:
    start, sampled_tokens = meta["iteration"], meta["sampled_tokens"]
    buf.truncate(meta["buffer_rows"])
    rows_at[latest] = meta["buffer_rows"]
  else:
    buf.truncate(0)
  writer = metrics.MetricsWriter(
    workdir,
    resume_iteration=start if latest is not None else None,
    tensorboard=c.log.tensorboard,
    progress_total=c.train.iterations,
    show_progress=c.log.progress,
    enabled=jax.process_index() == 0,
  )
  rollout_keys = jax.random.fold_in(jax.random.key(c.seed), 0)  # two streams, indexed by iteration
  eval_keys = jax.random.fold_in(jax.random.key(c.seed), 1)
  eval_fn = functools.partial(evaluate.evaluate_policy, config=c, tok=tok, task=task, mesh=mesh)
  prompts = data.prompt_stream(task.problems("train"), seed=c.seed, per_iteration=c.train.prompts_per_iteration)
  sampling_cfg = rollout_lib.sampling_config(c, tok)
  last = {}
  # The last completed iteration, what a stop at a signal saves: (iteration, buffer rows, sampled tokens).
  done = (start, buf.rows, sampled_tokens)

  def stop_here():
    """At a signal: the last completed iteration checkpointed (unless it is already), then `Preempted`."""
    it_done, rows, tokens = done
    if ckpt.latest_step() != it_done:
      ckpt.save(it_done, state, _meta(c, it_done, rows, tokens, total_updates))
    raise preemption.Preempted(stopper.signame, it_done, ckpt.directory)

  try:
    with sharding.use(mesh, run.rules):
      if latest is None:
        if stopper.requested():  # signalled while the run was being set up: nothing done yet, nothing to save
          raise preemption.Preempted(stopper.signame, None, ckpt.directory)
        t0 = time.time()
        figures = {}
        if c.train.warmup_steps:
          initial = state["params"]

          def before():  # not asked again when the warm-up goes on after a stop: its checkpoint holds them
            got = eval_fn(run.graphdef, initial, jax.random.fold_in(eval_keys, 0))
            return {f"before_warmup/{k}": v for k, v in got.items()}

          warmed = warm_up(
            initial, run, config=c, mesh=mesh, stop=stopper.requested, before=before, allow_changed=allow_changed
          )
          if isinstance(warmed, int):  # stopped after `warmed` steps, saved in workdir/warmup
            where = os.path.join(workdir, "warmup")
            raise preemption.Preempted(stopper.signame, None, where, warmup=(warmed, c.train.warmup_steps))
          params, figures = warmed
          state = update.init_state(tx, params, mesh, ema=_ema(c), ref=reference)
          figures["time/warmup_s"] = time.time() - t0
        t1 = time.time()
        shown = []
        last = eval_fn(run.graphdef, state["params"], jax.random.fold_in(eval_keys, 0), samples=shown)
        writer.write(0, {**figures, **last, "samples/train_tokens": 0, "time/eval_s": time.time() - t1})
        writer.write_samples(0, shown)
        if c.train.iterations == 0:  # a warm-up-only run (e.g. a shared start for model.init_from)
          ckpt.save(0, state, _meta(c, 0, 0, 0, total_updates))
      for it in range(start + 1, c.train.iterations + 1):
        # A signal abandons the iteration at any of these points, before its first update (a resume replays it
        # exactly); once updates began, the iteration is finished, then saved, unless the iteration before it is
        # checkpointed already: then it is abandoned between updates and before its evaluation too.
        if stopper.requested():
          stop_here()
        saved_before = ckpt.latest_step() == it - 1
        figures = {}
        t0 = time.time()
        # -- Rollouts and feedback --------------------------------------------------------------------------------
        r = rollout_lib.rollout(
          run.graphdef,
          state["params"],
          prompts[it - 1],
          jax.random.fold_in(rollout_keys, it),
          config=c,
          tok=tok,
          task=task,
          mesh=mesh,
          samples_per_prompt=c.train.group_size,
          sampling_cfg=sampling_cfg,
        )
        if stopper.requested():
          stop_here()
        sampled_tokens += metrics.global_sum(int(r.mask.sum()))
        t1 = time.time()
        # -- Expert labels, into the buffer -----------------------------------------------------------------------
        labels, label_figures = expert.label(r)
        figures.update(label_figures)
        groups = rollout_lib.group_records(r, labels, it, config=c, tok=tok, layout=layout)
        if stopper.requested():
          stop_here()
        old = buf.window(before=buf.rows)
        buf.append(groups)
        t2 = time.time()
        # -- Updates on fresh + aggregated data -------------------------------------------------------------------
        batches = data.training_batches(
          data.split_rows(groups),
          buf.source(*old),
          mix=buffer_mix(c),
          seed=c.seed * 1_000_003 + it,
          batch_groups=c.train.batch_groups // jax.process_count(),
          steps=c.train.updates_per_iteration,
        )
        # Metrics of update k are read after update k+1 is dispatched, so the host never waits on the device.
        step_figures, pending = [], None
        for k, batch in enumerate([*batches, None]):
          if k and batch is not None and saved_before and stopper.requested():
            stop_here()
          if batch is not None:
            state, m = step_fn(state, data.to_global(batch, mesh), teacher_params, jnp.int32(it))
          if pending is not None:
            step_figures.append(_finite_or_raise(jax.device_get(pending), it, k, ckpt, writer, c.expert))
          pending = m if batch is not None else None
        t3 = time.time()
        figures.update({f"train/{k}": float(np.mean([m[k] for m in step_figures])) for k in step_figures[0]})
        shares = {"rollout/reward": float(groups["reward"].mean()), "rollout/length": float(r.mask.sum(-1).mean())}
        shares.update(label_shares(groups))
        figures.update(metrics.global_mean(shares))
        figures.update(
          {
            "buffer/rows": metrics.global_sum(buf.rows),
            "samples/train_tokens": sampled_tokens,
            "time/rollout_s": t1 - t0,
            "time/label_s": t2 - t1,
            "time/update_s": t3 - t2,
          }
        )
        # -- Evaluation and checkpoint ----------------------------------------------------------------------------
        if saved_before and stopper.requested():
          stop_here()
        if it % c.eval.every == 0 or it == c.train.iterations:
          t4, shown = time.time(), []
          figures.update(eval_fn(run.graphdef, state["params"], jax.random.fold_in(eval_keys, it), samples=shown))
          figures["time/eval_s"] = time.time() - t4
          writer.write_samples(it, shown)
        # The figures of iteration `it` are on disk before its checkpoint can commit: a resume never lacks them.
        figures["time/iteration_s"] = time.time() - t0
        writer.write(it, figures)
        last = figures
        done = (it, buf.rows, sampled_tokens)
        if it % c.checkpoint.every == 0 or it == c.train.iterations:
          ckpt.save(it, state, _meta(c, it, buf.rows, sampled_tokens, total_updates))
          rows_at[it] = buf.rows
          kept = [rows_at[s] for s in ckpt.all_steps() if s in rows_at]
          if len(kept) == len(ckpt.all_steps()):
            buf.release(min(kept) - c.buffer.max_groups)
        writer.progress(
          it, {"reward": figures["rollout/reward"], "loss": figures["train/loss"], "pass@1": last.get("eval/pass@1")}
        )
  finally:
    ckpt.close()
    writer.close()
  return last


def evaluate_only(config, workdir: str) -> dict:
  """Pass@k of the latest checkpoint, printed and appended to `workdir/eval.jsonl`."""
  _check(config, "eval")
  run = Run.build(config, workdir)
  params, meta = run.restore_params()
  run.write_workdir()
  with sharding.use(run.mesh, run.rules):
    out = evaluate.evaluate_policy(
      run.graphdef, params, jax.random.key(config.seed), config=config, tok=run.tok, task=run.task, mesh=run.mesh
    )
  out["iteration"] = meta["iteration"]
  if jax.process_index() == 0:
    import json

    with open(os.path.join(workdir, "eval.jsonl"), "a") as f:
      f.write(json.dumps(out) + "\n")
  return out


def export(config, workdir: str, export_dir: str) -> str:
  """Write the latest checkpoint as a Hugging Face checkpoint (safetensors + config.json + tokenizer)."""
  _check(config, "export")
  run = Run.build(config, workdir)
  params, _ = run.restore_params()
  model = nnx.merge(run.graphdef, params)
  if jax.process_index() == 0:
    tok = run.tok
    hf.save_hf(model, run.model_cfg, export_dir, dtype=config.export.dtype)
    hf.save_generation_config(export_dir, bos_id=tok.bos_id, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
      for folder in (workdir, config.model.hf_path, config.tokenizer.path):
        if folder and os.path.isdir(folder) and os.path.exists(os.path.join(folder, name)):
          shutil.copy(os.path.join(folder, name), export_dir)
          break
    if tok.chat is not None:  # the template the run trained with, where transformers 5 reads it
      with open(os.path.join(export_dir, "chat_template.jinja"), "w") as f:
        f.write(tok.chat.source)
  return export_dir
