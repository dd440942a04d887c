"""One pass over the whole config before any work starts, and over every prompt once the tokenizer exists.

Why a pass of its own: a value out of range would otherwise surface an iteration later as a ZeroDivisionError, an
IndexError or a JAX traceback, or not at all (a negative learning rate trains "fine"). Here every numeric range,
every divisibility the sharded batches need and every enum is checked up front, nothing is written before it
passes, and each failure is one line naming the key as it is written on the command line (`checks.py`), all
failures at once so that one run shows everything to fix.

A section with a typed value states its checks once, beside that value (`model`, `loss`, `mesh`, `sampling`,
`expert`, `optim`: each module's `check_section`), and the value runs them again on itself when it is built. This
module runs them all, checks the sections the loop reads directly (task, tokenizer, train, eval, buffer,
checkpoint, log), and what one section needs of another (a loss's group size, sampler and teacher: `_loss_checks`;
the batch sizes the mesh must divide: `_train_checks`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from distil_jax import experts
from distil_jax.checks import Checks
from distil_jax.errors import ConfigError, DataError

TOKENIZER_TYPES = ("char", "bpe", "unigram", "word")
MODES = ("train", "eval", "export")


def config(cfg, *, mode: str = "train", devices: int | None = None, processes: int | None = None) -> None:
  """Raise ConfigError listing every invalid value of `cfg` (one line each); return None when all pass.

  `devices` / `processes` default to this JAX runtime's (the mesh and per-process splits are checked against them).
  Nothing is read or written but the paths the config names (which must exist).
  """
  from distil_jax import hf, sampler, sharding, update

  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; expected one of {MODES}")
  if devices is None or processes is None:
    import jax

    devices = len(jax.devices()) if devices is None else devices
    processes = jax.process_count() if processes is None else processes
  ch = Checks(cfg)
  _task_checks(ch)
  _model_checks(ch, mode)
  sizes = sharding.check_mesh(ch, devices)
  sharding.check_rules(ch)
  shards = sizes["data"] * sizes["fsdp"] if sizes else 0  # batches are split over data x fsdp
  sampler.check_section(ch)
  experts.check_section(ch)
  _loss_checks(ch)
  update.check_section(ch)
  _train_checks(ch, mode, shards, processes)
  for key in ("log.progress", "log.tensorboard"):
    ch.flag(key)
  ch.enum("export.dtype", tuple(hf.DTYPES))  # what save_hf writes
  ch.number("seed", integer=True)
  if ch.lines:
    raise ConfigError("\n".join(ch.lines))


def _task_checks(ch: Checks) -> None:
  from distil_jax import tasks

  ch.enum("task.name", sorted(tasks.TASKS))
  for key in ("task.eval_size", "task.train_size", "task.min_ops", "task.max_operand", "task.max_value"):
    ch.count(key)
  if ch.count("task.max_ops") and ch.count("task.min_ops") and ch.value("task.max_ops") < ch.value("task.min_ops"):
    ch.fail("task.max_ops", f"must be >= task.min_ops ({ch.value('task.min_ops')})")
  if ch.has("task.ops"):
    ops = ch.value("task.ops")
    if not isinstance(ops, str) or not ops or set(ops) - set("+-*"):
      ch.fail("task.ops", "must be a non-empty string of the operations + - *")
  ch.template("task.prompt_template", ["question"])
  ch.number("task.timeout_s", lo=0, lo_open=True)
  ch.count("task.memory_mb")
  ch.count("task.max_record_bytes")
  ch.flag("task.include_prompt")
  if ch.has("task.train_path") and ch.value("task.train_path") and not os.path.isfile(ch.value("task.train_path")):
    ch.fail("task.train_path", "no such file")


def _model_checks(ch: Checks, mode: str) -> None:
  from distil_jax import model as model_lib

  if ch.has("tokenizer.path") and ch.value("tokenizer.path") and not os.path.exists(ch.value("tokenizer.path")):
    ch.fail("tokenizer.path", "no such file or folder")
  ch.count("tokenizer.vocab_size")
  ch.enum("tokenizer.model_type", TOKENIZER_TYPES)
  ch.flag("tokenizer.split_digits")
  ch.flag("tokenizer.add_bos")
  if ch.has("tokenizer.chat_template"):
    choice = ch.value("tokenizer.chat_template")
    if not isinstance(choice, str) or (choice not in ("auto", "none") and not os.path.isfile(choice)):
      ch.fail("tokenizer.chat_template", "must be 'auto', 'none' or the path of a Jinja file")
  ch.count("model.vocab_multiple")
  hf_path = ch.get("model.hf_path", "")
  if hf_path:
    ch.checkpoint_folder("model.hf_path")
  init_from = ch.get("model.init_from", "")
  if init_from and not hf_path and mode == "train" and not os.path.isdir(os.path.join(init_from, "checkpoints")):
    ch.fail("model.init_from", "not a workdir of this library (no checkpoints folder in it)")
  model_lib.check_section(ch, architecture=not hf_path)  # a checkpoint's config.json gives its architecture


def _loss_checks(ch: Checks) -> None:
  """The `loss` section's own checks (`losses.check_section`), and what each loss needs from the other sections."""
  from distil_jax import losses

  losses.check_section(ch)
  kind_ok = ch.get("loss.kind") in losses.KINDS
  if ch.get("loss.teacher_temperature") not in (None, 1) and ch.get("expert.kind") in ("oracle", "http"):
    ch.fail(
      "loss.teacher_temperature",
      f"applies to self and model teachers only; expert.kind={ch.value('expert.kind')!r} gives top-k log-probs "
      "that no temperature is applied to (leave it unset or 1)",
    )
  topk = ch.get("loss.student_topk")
  if isinstance(topk, int) and topk > 0 and ch.get("expert.kind") not in experts.ON_DEVICE:
    ch.fail("loss.student_topk", "needs a teacher on the device (expert.kind self or model) to read its mass")
  if not (kind_ok and ch.count("train.group_size")):
    return
  kind, group = ch.value("loss.kind"), ch.value("train.group_size")
  if kind in losses.SEQUENCE_LEVEL and ch.value("loss.baseline") == "loo":
    if group < 2:
      ch.fail("train.group_size", "loss.baseline='loo' needs at least 2 responses per prompt")
    elif experts.reads_siblings(ch.config.expert) and (group < 4 or group % 2):
      ch.fail(
        "train.group_size",
        f"loss.baseline='loo' with expert.kind={ch.value('expert.kind')!r}, expert.feedback="
        f"{ch.value('expert.feedback')!r} needs an even group of >= 4 (the baseline is taken within each half of a "
        "group, the feedback from the other; expert.feedback='reference' reads no sibling)",
      )
  if kind in losses.REWARDED and group < 2:
    why = "needs at least 2 responses per prompt (its advantage is 0 otherwise)"
    ch.fail("train.group_size", f"loss.kind={kind!r} {why}")
  # Settings under which a loss's estimator would be biased (losses.py: the policy is the sampler's).
  if kind in losses.USES_RATIO:
    for key, off in (("sampling.top_k", 0), ("sampling.top_p", 1.0)):
      if ch.value(key) != off:
        ch.fail(
          key,
          f"truncates the sampled policy; loss.kind={kind!r} compares log pi with the sampler's log-probs and would "
          "be biased: sample with a temperature alone",
        )
  mix = ch.value("buffer.mix")
  if kind in losses.REWARDED and mix:  # a group-relative advantage of stale rows would be biased
    name = "GRPO" if kind == "grpo" else f"loss.kind={kind!r}"
    ch.fail("buffer.mix", f"{name} is on-policy: stale buffer rows would bias it (leave it unset, or 0)")


def _train_checks(ch: Checks, mode: str, shards: int, processes: int) -> None:
  """The loop's sizes, and the divisibility sharded batches need: rows are split over data x fsdp (`shards`) and
  prompts over processes."""
  t = "train."
  ok = [ch.count(t + k) for k in ("prompts_per_iteration", "group_size", "updates_per_iteration", "batch_groups")]
  ok.append(ch.number(t + "iterations", lo=0, integer=True))
  ch.number(t + "score_max_staleness", lo=0, integer=True)
  ch.flag(t + "use_behaviour_logprobs")
  ch.flag(t + "skip_unlabelled")
  bc_on = ch.number(t + "bc_steps", lo=0, integer=True) and ch.value(t + "bc_steps") > 0
  ok.append(ch.count(t + "bc_batch"))
  ch.number(t + "bc_lr", lo=0, lo_open=True)
  ch.number(t + "bc_reprompt_fraction", lo=0, hi=1)
  if ch.value("buffer.mix") is not None:  # unset: the loss kind's default (build.buffer_mix)
    ch.number("buffer.mix", lo=0, hi=1, hi_open=True)  # 1 would never train on fresh rollouts (grain refuses it)
  ch.count("buffer.max_groups")
  ch.count("checkpoint.every")
  ch.count("checkpoint.keep")
  ch.count("eval.every")
  ch.number("eval.temperature", lo=0, lo_open=True)
  ch.flag("eval.greedy")
  ch.number("eval.log_samples", integer=True, lo=0)
  eval_ok = ch.count("eval.num_prompts") and ch.count("eval.samples")
  if eval_ok and ch.has("eval.pass_at"):
    ks, n = ch.value("eval.pass_at"), ch.value("eval.samples")
    if not isinstance(ks, Sequence) or not ks or not all(isinstance(k, int) and 1 <= k <= n for k in ks):
      ch.fail("eval.pass_at", f"must be a non-empty list of k in 1..eval.samples ({n})")
  if eval_ok and ch.count("task.eval_size") and ch.value("eval.num_prompts") > ch.value("task.eval_size"):
    ch.fail("eval.num_prompts", f"exceeds the held-out prompts (task.eval_size={ch.value('task.eval_size')})")
  if mode == "export" or not eval_ok or not all(ok):
    return
  v, mesh = ch.value, "the data x fsdp mesh size"
  ch.divides("eval.num_prompts * eval.samples", v("eval.num_prompts") * v("eval.samples"), shards, mesh)
  ch.divides("eval.num_prompts", v("eval.num_prompts"), processes, "the process count")
  if v("eval.greedy"):
    ch.divides("eval.num_prompts (greedy evaluation)", v("eval.num_prompts"), shards, mesh)
  if mode != "train":
    return
  per_iteration = v(t + "prompts_per_iteration") * v(t + "group_size")
  ch.divides("train.prompts_per_iteration * train.group_size", per_iteration, shards, mesh)
  ch.divides("train.batch_groups (batches are sharded by prompt group)", v(t + "batch_groups"), shards, mesh)
  for key in ("prompts_per_iteration", "batch_groups") + (("bc_batch",) if bc_on else ()):
    ch.divides(t + key, v(t + key), processes, "the process count")
  if bc_on:
    ch.divides("train.bc_batch", v(t + "bc_batch"), shards, mesh)


def prompts(task, tok, cfg) -> None:
  """Every prompt the run can draw, tokenized as the sampler will see it, must fit the largest sampling bucket.

  Data files are checked record by record (DataError naming file:line:field); generated tasks (whose training
  stream is a lazily made list of up to a million problems) are checked on their held-out set and the first 2000
  training problems, which share one generator and one length bound.
  """
  s = cfg.sampling
  limit = min(max(s.prompt_buckets), s.max_prompt_tokens)
  for split in ("train", "eval"):
    problems = task.problems(split)
    n = len(problems) if isinstance(problems, list | tuple) else min(len(problems), 2000)
    for i in range(n):
      p = problems[i]
      length = len(tok.prompt_ids(p.prompt, cfg.tokenizer.add_bos))
      if length > limit:
        where = getattr(p, "source", "") or f"task {task.name!r}, {split} problem {i}"
        raise DataError(
          f"{where}: the prompt is {length} tokens, more than the largest sampling bucket "
          f"(min(max(sampling.prompt_buckets), sampling.max_prompt_tokens) = {limit})"
        )
