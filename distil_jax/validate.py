"""One pass over the whole config before any work starts, and over every prompt once the tokenizer exists.

Why a pass of its own: a value out of range would otherwise surface an iteration later as a ZeroDivisionError, an
IndexError or a JAX traceback, or not at all (a negative learning rate trains "fine"). Here every numeric range,
every divisibility the sharded batches need and every enum is checked up front, nothing is written before it
passes, and each failure is one line naming the key as it is written on the command line (`checks.py`), all
failures at once so that one run shows everything to fix.

Checks that depend on what the loss can estimate (temperature or top-p against the loss kind, group sizes for
baselines) live in `_loss_checks`, beside the ranges of the `loss` section.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from distil_jax import experts
from distil_jax.checks import Checks
from distil_jax.errors import ConfigError, DataError

EXPERT_KINDS = ("oracle", "self", "model", "http")
TOKENIZER_TYPES = ("char", "bpe", "unigram", "word")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
MODES = ("train", "eval", "export")


def config(cfg, *, mode: str = "train", devices: int | None = None, processes: int | None = None) -> None:
  """Raise ConfigError listing every invalid value of `cfg` (one line each); return None when all pass.

  `devices` / `processes` default to this JAX runtime's (the mesh and per-process splits are checked against them).
  Nothing is read or written but the paths the config names (which must exist).
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; expected one of {MODES}")
  if devices is None or processes is None:
    import jax

    devices = len(jax.devices()) if devices is None else devices
    processes = jax.process_count() if processes is None else processes
  ch = Checks(cfg)
  _task_checks(ch)
  _model_checks(ch, mode)
  rows = _mesh_checks(ch, devices)
  _sampling_checks(ch)
  _expert_checks(ch)
  _loss_checks(ch)
  _optim_checks(ch)
  _train_checks(ch, mode, rows, processes)
  for key in ("log.progress", "log.tensorboard"):
    ch.flag(key)
  ch.enum("export.dtype", COMPUTE_DTYPES)
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
  from distil_jax import attention
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
  ch.enum("model.dtype", COMPUTE_DTYPES)
  ch.enum("model.remat", tuple(model_lib.REMAT_POLICIES))
  ch.enum("model.attention", attention.IMPLEMENTATIONS)
  ch.count("model.vocab_multiple")
  hf_path = ch.value("model.hf_path") if ch.has("model.hf_path") else ""
  if hf_path:
    _hf_folder(ch, "model.hf_path")
    return  # the architecture comes from the checkpoint's config.json
  init_from = ch.value("model.init_from") if ch.has("model.init_from") else ""
  if init_from and mode == "train" and not os.path.isdir(os.path.join(init_from, "checkpoints")):
    ch.fail("model.init_from", "not a workdir of this library (no checkpoints folder in it)")
  ch.enum("model.arch", model_lib.ARCHS)
  ch.flag("model.tie_word_embeddings")
  ch.number("model.rope_theta", lo=0, lo_open=True)
  sizes = [ch.count(f"model.{k}") for k in ("hidden_size", "intermediate_size", "num_hidden_layers")]
  heads = ch.count("model.num_attention_heads") and ch.count("model.num_key_value_heads")
  if heads and ch.value("model.num_attention_heads") % ch.value("model.num_key_value_heads"):
    ch.fail(
      "model.num_key_value_heads", f"must divide model.num_attention_heads ({ch.value('model.num_attention_heads')})"
    )
  if not (ch.number("model.head_dim", lo=0, integer=True) and sizes[0] and heads):
    return
  head_dim, hidden, n_heads = (ch.value(f"model.{k}") for k in ("head_dim", "hidden_size", "num_attention_heads"))
  if not head_dim and hidden % n_heads:
    ch.fail("model.hidden_size", f"must be divisible by model.num_attention_heads ({n_heads}) when model.head_dim=0")
  elif (head_dim or hidden // n_heads) % 2:
    ch.fail("model.head_dim" if head_dim else "model.hidden_size", "gives an odd head size; RoPE rotates pairs")


def _hf_folder(ch: Checks, key: str) -> None:
  path = ch.value(key)
  weights = ("model.safetensors", "model.safetensors.index.json")
  if not os.path.isfile(os.path.join(path, "config.json")):
    ch.fail(key, "not a Hugging Face checkpoint folder (no config.json in it)")
  elif not any(os.path.isfile(os.path.join(path, w)) for w in weights):
    ch.fail(key, f"holds neither {' nor '.join(weights)}")


def _mesh_checks(ch: Checks, devices: int) -> int:
  """Checks the mesh against `devices`; returns the number of batch shards (data x fsdp), 0 when unknown."""
  from distil_jax import sharding

  axes = {}
  for name in sharding.MESH_AXES:
    key = f"mesh.{name}"
    if not ch.number(key, integer=True):
      continue
    if ch.value(key) >= 1 or ch.value(key) == -1:
      axes[name] = ch.value(key)
    else:
      ch.fail(key, "must be >= 1, or -1 for the devices left")
  if not ch.number("mesh.num_devices", lo=0, hi=devices, integer=True) or len(axes) < len(sharding.MESH_AXES):
    return 0
  n = ch.value("mesh.num_devices") or devices
  known = math.prod(v for v in axes.values() if v != -1)
  shown = ", ".join(f"{k}={v}" for k, v in axes.items())
  if list(axes.values()).count(-1) > 1:
    ch.lines.append(f"mesh ({shown}): at most one axis may be -1")
    return 0
  if (-1 in axes.values() and n % known) or (-1 not in axes.values() and known != n):
    ch.lines.append(
      f"mesh ({shown}) does not fit the {n} devices in use (mesh.num_devices={ch.value('mesh.num_devices')})"
    )
    return 0
  sizes = {k: (n // known if v == -1 else v) for k, v in axes.items()}
  if ch.has("sharding_rules"):
    for rule in ch.value("sharding_rules"):
      targets = rule[1] if len(rule) == 2 else None
      names = (targets,) if isinstance(targets, str) else tuple(targets or ())
      if len(rule) != 2 or set(names) - set(sharding.MESH_AXES):
        ch.lines.append(
          f"sharding_rules: {list(rule)} is not [logical axis, mesh axis or axes among {sharding.MESH_AXES}]"
        )
  return sizes["data"] * sizes["fsdp"]


def _sampling_checks(ch: Checks) -> None:
  ch.count("sampling.max_new_tokens")
  ch.count("sampling.max_prompt_tokens")
  ch.number("sampling.temperature", lo=0, lo_open=True)
  ch.number("sampling.top_k", lo=0, integer=True)
  ch.number("sampling.top_p", lo=0, hi=1, lo_open=True)
  if not ch.has("sampling.prompt_buckets"):
    return
  buckets = ch.value("sampling.prompt_buckets")
  ok = isinstance(buckets, Sequence) and buckets and all(isinstance(b, int) and b >= 1 for b in buckets)
  if not ok:
    ch.fail("sampling.prompt_buckets", "must be a non-empty list of positive prompt lengths")
  elif ch.count("sampling.max_prompt_tokens") and max(buckets) > ch.value("sampling.max_prompt_tokens"):
    ch.fail(
      "sampling.prompt_buckets",
      f"the largest bucket exceeds sampling.max_prompt_tokens ({ch.value('sampling.max_prompt_tokens')}): a prompt "
      "sampled in full would be stored and trained truncated",
    )


def _expert_checks(ch: Checks) -> None:
  if not ch.enum("expert.kind", EXPERT_KINDS):
    return
  kind = ch.value("expert.kind")
  ch.count("expert.top_k")
  ch.count("expert.max_prompt_tokens")
  ch.template("expert.reprompt", ["prompt", "feedback"])
  ch.number("expert.ema_decay", lo=0, hi=1)
  if kind == "oracle":
    ch.number("expert.smoothing", lo=0, hi=1, lo_open=True, hi_open=True)
  feedback_ok = ch.enum("expert.feedback", experts.FEEDBACK)
  if feedback_ok and ch.value("expert.feedback") != "any" and kind not in ("self", "model"):
    # the same refusal as experts.make_expert, before any work: only device experts read siblings or references
    fb = ch.value("expert.feedback")
    ch.fail("expert.feedback", f"{fb!r} needs a device expert (expert.kind self or model), not {kind!r}")
  if kind == "model":
    path = ch.value("expert.model_path") if ch.has("expert.model_path") else ""
    if not path:
      ch.fail("expert.model_path", "expert.kind='model' needs a Hugging Face checkpoint folder")
    else:
      _hf_folder(ch, "expert.model_path")
  if kind == "http":
    url = ch.value("expert.url") if ch.has("expert.url") else ""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
      ch.fail("expert.url", "expert.kind='http' needs the server's http:// or https:// address")
    timeout_ok = ch.number("expert.timeout_s", lo=0, lo_open=True)
    if ch.number("expert.deadline_s", lo=0, lo_open=True) and timeout_ok:
      if ch.value("expert.deadline_s") < ch.value("expert.timeout_s"):
        ch.fail("expert.deadline_s", f"must be >= expert.timeout_s={ch.value('expert.timeout_s')} (one try fits in it)")
    ch.number("expert.max_retries", lo=0, integer=True)
    ch.number("expert.backoff_s", lo=0)
    ch.number("expert.max_reply_mb", lo=0, lo_open=True)
    ch.count("expert.concurrency")
    if ch.has("expert.tokenizer_probe") and not ch.value("expert.tokenizer_probe"):
      ch.fail("expert.tokenizer_probe", "must be a non-empty text (the tokenizer check sends it)")


def _loss_checks(ch: Checks) -> None:
  """The `loss` section's ranges and enums, and what each loss needs from the rest of the config."""
  from distil_jax import losses

  kind_ok = ch.enum("loss.kind", losses.KINDS)
  ch.enum("loss.baseline", losses.BASELINES)
  ch.enum("loss.normalize", losses.NORMALIZATIONS)
  ch.enum("loss.cost", ("ce", "kl"))
  ch.enum("loss.topk_tail", ("bucket", "renorm"))
  ch.enum("loss.terminal", ("free", "hold"))
  ch.number("loss.clip_eps", lo=0, lo_open=True)
  if ch.has("loss.teacher_temperature") and ch.value("loss.teacher_temperature") is not None:
    ch.number("loss.teacher_temperature", lo=0, lo_open=True)
    if ch.value("loss.teacher_temperature") != 1 and ch.value("expert.kind") in ("oracle", "http"):
      ch.fail(
        "loss.teacher_temperature",
        f"applies to self and model teachers only; expert.kind={ch.value('expert.kind')!r} gives top-k log-probs "
        "that no temperature is applied to (leave it unset or 1)",
      )
  ch.number("loss.jsd_beta", lo=0, hi=1)
  ch.number("loss.kl_coef", lo=0)
  ch.number("loss.std_eps", lo=0, lo_open=True)
  ch.count("loss.chunk_size")
  ch.number("loss.distil_weight", lo=0)
  ch.number("loss.distil_weight_decay_iterations", lo=0, integer=True)
  if ch.number("loss.student_topk", lo=0, integer=True) and ch.value("loss.student_topk"):
    if ch.value("expert.kind") not in ("self", "model"):
      ch.fail("loss.student_topk", "needs a teacher on the device (expert.kind self or model) to read its mass")
    if ch.value("loss.kind") not in ("reverse_kl", "jsd"):
      ch.fail(
        "loss.student_topk",
        "applies to loss.kind reverse_kl (SDPO) or jsd: a forward CE over buckets that move with theta is not J",
      )
  if not (kind_ok and ch.count("train.group_size")):
    return
  kind, group = ch.value("loss.kind"), ch.value("train.group_size")
  if kind in ("distil", "distil_grpo") and ch.value("loss.baseline") == "loo":
    if group < 2:
      ch.fail("train.group_size", "loss.baseline='loo' needs at least 2 responses per prompt")
    elif experts.reads_siblings(ch.config.expert) and (group < 4 or group % 2):
      ch.fail(
        "train.group_size",
        f"loss.baseline='loo' with expert.kind={ch.value('expert.kind')!r}, expert.feedback="
        f"{ch.value('expert.feedback')!r} needs an even group of >= 4 (the baseline is taken within each half of a "
        "group, the feedback from the other; expert.feedback='reference' reads no sibling)",
      )
  if kind in ("grpo", "distil_grpo") and group < 2:
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
  if kind in ("grpo", "distil_grpo") and mix:
    name = "GRPO" if kind == "grpo" else f"loss.kind={kind!r}"
    ch.fail("buffer.mix", f"{name} is on-policy: stale buffer rows would bias it (leave it unset, or 0)")


def _optim_checks(ch: Checks) -> None:
  ch.number("optim.lr", lo=0, lo_open=True)
  ch.number("optim.lr_warmup_steps", lo=0, integer=True)
  ch.enum("optim.schedule", ("constant", "cosine"))
  ch.number("optim.b1", lo=0, hi=1, hi_open=True)
  ch.number("optim.b2", lo=0, hi=1, hi_open=True)
  ch.number("optim.eps", lo=0, lo_open=True)
  ch.number("optim.weight_decay", lo=0)
  ch.number("optim.max_grad_norm", lo=0, lo_open=True)


def _train_checks(ch: Checks, mode: str, rows: int, processes: int) -> None:
  """The loop's sizes, and the divisibility sharded batches need: rows are split over data x fsdp (`rows`) and
  prompts over processes."""
  t = "train."
  ok = [ch.count(t + k) for k in ("prompts_per_iteration", "group_size", "updates_per_iteration", "batch_groups")]
  ok.append(ch.number(t + "iterations", lo=0, integer=True))
  ch.number(t + "score_max_staleness", lo=0, integer=True)
  ch.flag(t + "use_behaviour_logprobs")
  warm = ch.number(t + "warmup_steps", lo=0, integer=True) and ch.value(t + "warmup_steps") > 0
  ok.append(ch.count(t + "warmup_batch"))
  ch.number(t + "warmup_lr", lo=0, lo_open=True)
  ch.number(t + "warmup_reprompt_fraction", lo=0, hi=1)
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
  ch.divides("eval.num_prompts * eval.samples", v("eval.num_prompts") * v("eval.samples"), rows, mesh)
  ch.divides("eval.num_prompts", v("eval.num_prompts"), processes, "the process count")
  if v("eval.greedy"):
    ch.divides("eval.num_prompts (greedy evaluation)", v("eval.num_prompts"), rows, mesh)
  if mode != "train":
    return
  per_iteration = v(t + "prompts_per_iteration") * v(t + "group_size")
  ch.divides("train.prompts_per_iteration * train.group_size", per_iteration, rows, mesh)
  ch.divides("train.batch_groups (batches are sharded by prompt group)", v(t + "batch_groups"), rows, mesh)
  for key in ("prompts_per_iteration", "batch_groups") + (("warmup_batch",) if warm else ()):
    ch.divides(t + key, v(t + key), processes, "the process count")
  if warm:
    ch.divides("train.warmup_batch", v(t + "warmup_batch"), rows, mesh)


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
