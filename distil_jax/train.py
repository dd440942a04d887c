"""The DAgger loop, top-down: rollout -> label -> aggregate -> update -> evaluate -> checkpoint.

The host owns the loop; sampling, the teacher forward, the loss and the update are jitted and sharded. Every random
choice is a function of (config.seed, iteration), so a run killed at any point and resumed from its last checkpoint
replays to the same parameters, buffer and metrics as a run that was never interrupted. What the loop is built from
is in `build.py`; the eval and export modes are in `modes.py`.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from distil_jax import behaviour_cloning as bc
from distil_jax import buffer as buffer_lib
from distil_jax import build, checkpoint, data, evaluate, losses, metrics, preemption, run_config, sharding, update
from distil_jax import rollout as rollout_lib
from distil_jax.errors import CheckpointError, ConfigError, ExpertError, InputError


def train(config, workdir: str, *, allow_changed=()) -> dict:
  """Run (or resume) the DAgger loop; returns the last iteration's figures. Raises `preemption.Preempted` when it
  stopped at SIGTERM or SIGINT, after saving the last completed iteration (see `preemption.py`).

  A resume must have the checkpoint's config except for the keys `allow_changed` names (`run_config.py`). Its
  learning-rate schedule is the one the run started with (laid out for that run's `train.iterations`), unless
  `allow_changed` names `train.iterations`: the schedule is then laid out anew for the new length."""
  with preemption.Stopper() as stopper:
    loop = Loop.set_up(config, workdir, stopper, tuple(allow_changed))
    last = {}
    try:
      with sharding.use(loop.run.mesh, loop.run.rules):
        if loop.latest is None:
          last = loop.iteration_zero()
        for it in range(loop.start + 1, config.train.iterations + 1):
          last = loop.iteration(it)
    finally:
      loop.ckpt.close()
      loop.writer.close()
    return last


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


def iteration_figures(step_figures: list[dict]) -> dict[str, float]:
  """An iteration's figures from its updates': a token mean pooled over the updates' tokens (weighted by the count it
  divides by, `losses.count_of`), any other figure the mean over updates. A teacher loss's update with no labelled row
  has means of 0 over no token; averaged in, it halved the iteration's KL, entropy or ratio. An iteration with no
  token at all for a mean logs no such figure: a 0 there read as a collapsed entropy or KL."""
  out = {}
  for k in step_figures[0]:
    values, count = np.array([m[k] for m in step_figures]), losses.count_of(k)
    weights = np.array([m[count] for m in step_figures]) if count in step_figures[0] else None
    if weights is None:
      out[f"train/{k}"] = float(values.mean())
    elif weights.sum() > 0:
      out[f"train/{k}"] = float(np.average(values, weights=weights))
  return out


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


def _buffer_dir(workdir: str) -> str:
  """This process's part of the aggregated data set: each process labels its own prompts and keeps its own rows."""
  return os.path.join(workdir, "buffer", f"process_{jax.process_index()}")


def _open_buffer(config, workdir: str, layout):
  """This process's part of the aggregated data set when the workdir holds one of this layout, else None."""
  if buffer_lib.Buffer.exists(_buffer_dir(workdir), layout):  # through tensorstore: a gs:// buffer is checked too
    try:
      return buffer_lib.Buffer(_buffer_dir(workdir), layout, config.buffer.max_groups)
    except InputError:  # rows of another shape: the config's check, or the second open, names it
      pass
  return None


def _restore(config, workdir, ckpt, state, buf, learner, allow_changed):
  """(checkpoint step, state, meta) of the newest usable checkpoint, or None; the resume's config is checked, and a
  run extended without `allow_changed` naming `train.iterations` keeps its schedule (`learner.tx` is rebuilt)."""

  def buffer_damage(step, meta):
    """A checkpoint whose training window of the buffer is damaged is not resumed from (an older one may be)."""
    rows = meta.get("buffer_rows", 0)
    if buf is None or rows > buf.rows:  # rows lost altogether: `truncate` names them
      return None
    why = buf.damage(*buf.window(before=rows))
    return why and f"its buffer rows are damaged: {why}"

  c = config
  found = ckpt.restore_latest(checkpoint.abstract_like(state), check=buffer_damage)
  if found is None:
    return None
  _, _, meta = found
  if "config" in meta:
    for key, before, now in run_config.check_resume(meta["config"], c, allow_changed, workdir):
      logging.warning("resuming %s with %s=%r (it was %r): --allow_changed names it", workdir, key, now, before)
  elif meta["seed"] != c.seed:  # every random stream is fold_in(key(seed), iteration): a new seed breaks replay
    raise ConfigError(f"{workdir} was trained with seed {meta['seed']}, this config has seed {c.seed}")
  if meta.get("schedule_updates") and "train.iterations" not in allow_changed:
    learner.total_updates = meta["schedule_updates"]  # the same rates at every step as the run that was extended
    learner.tx = update.make_optimizer(c.optim, learner.total_updates)
  if meta.get("processes", 1) != jax.process_count():  # the buffer is split by process: rows would be lost
    raise CheckpointError(
      f"{workdir} was written by {meta.get('processes', 1)} processes, this run has {jax.process_count()}; "
      "resume it with the same process count"
    )
  return found


class Loop:
  """One run's loop: what its phases share (built once by `set_up`) and what moves from iteration to iteration (the
  train state, the buffer, the sampled-token count and the last completed iteration, which a stop at a signal
  saves)."""

  @classmethod
  def set_up(cls, config, workdir: str, stopper: preemption.Stopper, allow_changed: tuple) -> Loop:
    """Everything the loop reads, checked (config, data, model, checkpoint, buffer) before anything is written."""
    build.check(config, "train")
    for line in build.start_warnings(config):
      logging.warning(line)
    run_config.check_allowed_names(allow_changed, config)
    run_config.check_processes(config)
    self = cls()
    self.config, self.workdir, self.stopper, self.allow_changed = config, workdir, stopper, allow_changed
    self.run = run = build.Run.build(config, workdir)
    self.learner = learner = build.learner(config, run)
    self.state = learner.init_state(config, run.params, run.mesh)
    # -- Resume (read and checked before anything is written) -----------------------------------------------------
    self.ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint.keep)
    self.layout = rollout_lib.layout(config, learner.expert)
    buf = _open_buffer(config, workdir, self.layout)
    try:
      found = _restore(config, workdir, self.ckpt, self.state, buf, learner, allow_changed)
    except BaseException:
      self.ckpt.close()
      raise
    self.latest = None if found is None else found[0]
    if found is not None:
      self.state = found[1]
    self._start_writing(buf, None if found is None else found[2])
    return self

  def _start_writing(self, buf, meta):
    """The first writes (workdir, buffer, metrics), the jitted step and the streams every iteration reads."""
    c, run, learner = self.config, self.run, self.learner
    shardings = jax.tree.map(lambda x: x.sharding, self.state)
    self.step_fn = update.make_update(
      run.graphdef, learner.tx, learner.options, teacher_graphdef=learner.teacher_graphdef, state_shardings=shardings
    )
    run.write_workdir()
    self.ckpt.set_aside_unusable()
    self.buf = buf or buffer_lib.Buffer(_buffer_dir(self.workdir), self.layout, c.buffer.max_groups)
    self.start, self.sampled_tokens, self.rows_at = 0, 0, {}
    if meta is not None:
      self.start, self.sampled_tokens = meta["iteration"], meta["sampled_tokens"]
      self.buf.truncate(meta["buffer_rows"])
      self.rows_at[self.latest] = meta["buffer_rows"]
    else:
      self.buf.truncate(0)
    self.writer = metrics.MetricsWriter(
      self.workdir,
      resume_iteration=self.start if self.latest is not None else None,
      tensorboard=c.log.tensorboard,
      progress_total=c.train.iterations,
      show_progress=c.log.progress,
      enabled=jax.process_index() == 0,
    )
    self.rollout_keys = jax.random.fold_in(jax.random.key(c.seed), 0)  # two streams, indexed by iteration
    self.eval_keys = jax.random.fold_in(jax.random.key(c.seed), 1)
    self.eval_fn = functools.partial(evaluate.evaluate_policy, config=c, tok=run.tok, task=run.task, mesh=run.mesh)
    self.prompts = data.prompt_stream(
      run.task.problems("train"), seed=c.seed, per_iteration=c.train.prompts_per_iteration
    )
    self.sampling_cfg = rollout_lib.sampling_config(c.sampling, run.tok)
    # The last completed iteration, what a stop at a signal saves: (iteration, buffer rows, sampled tokens).
    self.done = (self.start, self.buf.rows, self.sampled_tokens)

  def stop_here(self):
    """At a signal: the last completed iteration checkpointed (unless it is already), then `Preempted`."""
    it_done, rows, tokens = self.done
    if self.ckpt.latest_step() != it_done:
      self.ckpt.save(it_done, self.state, _meta(self.config, it_done, rows, tokens, self.learner.total_updates))
    raise preemption.Preempted(self.stopper.signame, it_done, self.ckpt.directory)

  def iteration_zero(self) -> dict:
    """A fresh run's start: behaviour cloning when configured (evaluated before and after), and the
    evaluation every later iteration is compared with."""
    c, run, stopper = self.config, self.run, self.stopper
    if stopper.requested():  # signalled while the run was being set up: nothing done yet, nothing to save
      raise preemption.Preempted(stopper.signame, None, self.ckpt.directory)
    t0 = time.time()
    figures = {}
    if c.train.bc_steps:
      initial = self.state["params"]

      def before():  # not asked again when behaviour cloning goes on after a stop: its checkpoint holds them
        got = self.eval_fn(run.graphdef, initial, jax.random.fold_in(self.eval_keys, 0))
        return {f"before_bc/{k}": v for k, v in got.items()}

      cloned = bc.train(
        initial, run, config=c, mesh=run.mesh, stop=stopper.requested, before=before, allow_changed=self.allow_changed
      )
      if isinstance(cloned, int):  # stopped after `cloned` steps, saved in workdir/bc
        where = os.path.join(self.workdir, "bc")
        raise preemption.Preempted(stopper.signame, None, where, bc=(cloned, c.train.bc_steps))
      params, figures = cloned
      self.state = self.learner.init_state(c, params, run.mesh)
      figures["time/bc_s"] = time.time() - t0
    t1 = time.time()
    shown = []
    last = self.eval_fn(run.graphdef, self.state["params"], jax.random.fold_in(self.eval_keys, 0), samples=shown)
    self.writer.write(0, {**figures, **last, "samples/train_tokens": 0, "time/eval_s": time.time() - t1})
    self.writer.write_samples(0, shown)
    if c.train.iterations == 0:  # a behaviour-cloning-only run (e.g. a shared start for model.init_from)
      self.ckpt.save(0, self.state, _meta(c, 0, 0, 0, self.learner.total_updates))
    return last

  def iteration(self, it: int) -> dict:
    """One DAgger iteration, in its phases; returns its figures.

    A signal abandons the iteration at any of the checks before its first update (a resume replays it exactly);
    once updates began, the iteration is finished, then saved, unless the iteration before it is checkpointed
    already: then it is abandoned between updates and before its evaluation too."""
    if self.stopper.requested():
      self.stop_here()
    saved_before = self.ckpt.latest_step() == it - 1
    t0 = time.time()
    r = self.rollout(it)
    if self.stopper.requested():
      self.stop_here()
    self.sampled_tokens += metrics.global_sum(int(r.mask.sum()))
    t1 = time.time()
    groups, figures = self.label(r, it)
    if self.stopper.requested():
      self.stop_here()
    old = self.aggregate(groups)
    t2 = time.time()
    figures.update(self.update(groups, old, it, saved_before))
    t3 = time.time()
    shares = {"rollout/reward": float(groups["reward"].mean()), "rollout/length": float(r.mask.sum(-1).mean())}
    shares["rollout/cut"] = float(1.0 - rollout_lib.stopped(r.tokens, r.mask, self.run.tok.stop_ids).mean())
    shares.update(label_shares(groups))
    figures.update(metrics.global_mean(shares))
    figures.update(
      {
        "buffer/rows": metrics.global_sum(self.buf.rows),
        "samples/train_tokens": self.sampled_tokens,
        "time/rollout_s": t1 - t0,
        "time/label_s": t2 - t1,
        "time/update_s": t3 - t2,
      }
    )
    if saved_before and self.stopper.requested():
      self.stop_here()
    self.evaluate(it, figures)
    # The figures of iteration `it` are on disk before its checkpoint can commit: a resume never lacks them.
    figures["time/iteration_s"] = time.time() - t0
    self.writer.write(it, figures)
    self.done = (it, self.buf.rows, self.sampled_tokens)
    self.checkpoint(it)
    progress = {
      "reward": figures["rollout/reward"],
      "loss": figures["train/loss"],
      "pass@1": figures.get("eval/pass@1"),
    }
    self.writer.progress(it, progress)
    return figures

  def rollout(self, it: int):
    """The group of responses to each of this iteration's prompts, with the task's verdicts."""
    c, run = self.config, self.run
    return rollout_lib.rollout(
      run.graphdef,
      self.state["params"],
      self.prompts[it - 1],
      jax.random.fold_in(self.rollout_keys, it),
      tok=run.tok,
      add_bos=c.tokenizer.add_bos,
      task=run.task,
      mesh=run.mesh,
      samples_per_prompt=c.train.group_size,
      sampling_cfg=self.sampling_cfg,
    )

  def label(self, r, it: int):
    """(one buffer row per prompt group, with the expert's labels; the expert's figures)."""
    labels, figures = self.learner.expert.label(r)
    groups = rollout_lib.group_records(r, labels, it, tok=self.run.tok, layout=self.layout)
    return groups, dict(figures)

  def aggregate(self, groups) -> tuple:
    """DAgger's aggregation: the groups appended to the buffer; returns the window of rows before them."""
    old = self.buf.window(before=self.buf.rows)
    self.buf.append(groups)
    return old

  def update(self, groups, old, it: int, saved_before: bool) -> dict:
    """`train.updates_per_iteration` steps on fresh and aggregated rows; their figures (`iteration_figures`)."""
    c = self.config
    batches = data.training_batches(
      data.split_rows(groups),
      self.buf.source(*old),
      mix=build.buffer_mix(c),
      seed=c.seed * 1_000_003 + it,
      batch_groups=c.train.batch_groups // jax.process_count(),
      steps=c.train.updates_per_iteration,
    )
    mesh = self.run.mesh
    skip = c.train.skip_unlabelled and self.learner.options.skips_unlabelled and jax.process_count() == 1
    shards = sharding.batch_shards(mesh)
    # Metrics of update k are read after update k+1 is dispatched, so the host never waits on the device.
    step_figures, pending = [], None
    for k, batch in enumerate([*batches, None]):
      if k and batch is not None and saved_before and self.stopper.requested():
        self.stop_here()
      if batch is not None:
        kept = update.kept_rows(batch["teacher_valid"], shards) if skip else None
        self.state, m = self.step_fn(
          self.state, data.to_global(batch, mesh), self.learner.teacher_params, jnp.int32(it), kept
        )
      if pending is not None:
        step_figures.append(_finite_or_raise(jax.device_get(pending), it, k, self.ckpt, self.writer, c.expert))
      pending = m if batch is not None else None
    return iteration_figures(step_figures)

  def evaluate(self, it: int, figures: dict) -> None:
    """Pass@k on held-out prompts every `eval.every` iterations and at the last, into `figures`."""
    c = self.config
    if it % c.eval.every == 0 or it == c.train.iterations:
      t4, shown = time.time(), []
      key = jax.random.fold_in(self.eval_keys, it)
      figures.update(self.eval_fn(self.run.graphdef, self.state["params"], key, samples=shown))
      figures["time/eval_s"] = time.time() - t4
      self.writer.write_samples(it, shown)

  def checkpoint(self, it: int) -> None:
    """A checkpoint every `checkpoint.every` iterations and at the last; buffer rows that no kept checkpoint's
    window reads any more are released."""
    c, buf, ckpt = self.config, self.buf, self.ckpt
    if it % c.checkpoint.every == 0 or it == c.train.iterations:
      ckpt.save(it, self.state, _meta(c, it, buf.rows, self.sampled_tokens, self.learner.total_updates))
      self.rows_at[it] = buf.rows
      kept = [self.rows_at[s] for s in ckpt.all_steps() if s in self.rows_at]
      if len(kept) == len(ckpt.all_steps()):
        buf.release(min(kept) - c.buffer.max_groups)
