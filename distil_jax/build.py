"""What a run is built from, before its first iteration: the checked config, the mesh, the task, the tokenizer,
the policy and a `model` expert's teacher, and the values the loop derives from the config (the loss as it runs,
the buffer's mix, the optimizer and its state).

`Run.build` reads and checks and writes nothing, so that a bad input leaves no workdir behind; `Run.write_workdir`
is a run's first write. `train.py` holds the loop that uses these; `modes.py` the eval and export modes.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from absl import logging
from flax import nnx

from distil_jax import checkpoint, checks, experts, hf, losses, metrics, sharding, tasks, update, validate
from distil_jax import model as model_lib
from distil_jax import tokenizer as tok_lib
from distil_jax.errors import CheckpointError, ConfigError, InputError


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
  """The student's architecture from the `model` section; the LM head has the tokenizer's `vocab_size` ids rounded
  up to `model.vocab_multiple` rows (the matmuls' tiles), and the padding rows are never sampled."""
  m = config.model
  rows = -(-vocab_size // m.vocab_multiple) * m.vocab_multiple
  return checks.typed(model_lib.ModelConfig, m, vocab_size=rows, head_dim=m.head_dim or None)


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
  path = config.expert.model_path  # checked by experts.check_section
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


def check(config, mode: str = "train"):
  """Every config value in range, every divisibility, every enum (`validate.py`); raises before any work."""
  validate.config(config, mode=mode)


def buffer_mix(config) -> float:
  """The fraction of training groups drawn from the aggregated buffer: DAgger's losses aggregate (0.5), the on-policy
  ones train on this iteration's rollouts (0), unless `buffer.mix` is set."""
  if config.buffer.mix is not None:
    return config.buffer.mix
  return 0.0 if config.loss.kind in losses.ON_POLICY else 0.5


def loss_config(config, tok, expert) -> losses.LossConfig:
  """The loss as the loop runs it: the config's `loss` section, plus what the rest of the run decides: the policy is
  the sampler's (its temperature, the tokenizer's ids), an expert that shows siblings splits the baseline, and an
  on-device teacher is scored at the sampler's temperature unless `loss.teacher_temperature` says otherwise (a self
  teacher shown nothing is then the student itself: at T != 1 a teacher at temperature 1 is a flatter policy, and
  forward CE to it drives the student towards uniform)."""
  teacher_temperature = config.loss.teacher_temperature
  if teacher_temperature is None:
    teacher_temperature = config.sampling.temperature if expert.on_device else 1.0
  return checks.typed(
    losses.LossConfig,
    config.loss,
    teacher_temperature=teacher_temperature,
    policy_temperature=config.sampling.temperature,
    vocab_limit=tok.vocab_size,
    baseline_parts=2 if expert.reads_siblings else 1,
  )


def _ema(config) -> bool:
  """Whether the train state keeps an EMA copy of the student as the `self` teacher."""
  return config.expert.kind == "self" and config.expert.ema_decay > 0


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

  def restore_params(self, step: int | None = None):
    """(parameters, meta) of checkpoint `step`, or of the newest usable one when `step` is None (export, eval); a
    `step` is one `require_step` found."""
    targets = {"params": checkpoint.abstract_like(self.params)}
    with checkpoint.Checkpointer(os.path.join(self.workdir, "checkpoints")) as ckpt:
      if step is not None:
        state, meta = ckpt.restore(step, targets)
        return state["params"], meta
      found = ckpt.restore_latest(targets)
    if found is None:
      raise CheckpointError(f"{self.workdir}/checkpoints holds no checkpoint")
    return found[1]["params"], found[2]


def require_step(workdir: str, step: int) -> int:
  """`step`, when `workdir` holds a checkpoint of it; else one error naming the steps it does hold (checked before
  the model is built)."""
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    held = sorted(ckpt.all_steps())
  if step not in held:
    have = f"it holds {', '.join(map(str, held))}" if held else "it holds none"
    raise CheckpointError(f"{workdir}/checkpoints holds no checkpoint of step {step} ({have}; see checkpoint.keep)")
  return step


@dataclasses.dataclass
class Learner:
  """How the student learns in this run: the expert that labels its states (and a `model` expert's teacher), the
  optimizer laid out for `total_updates`, the update's options, and whether the state keeps a frozen policy
  (GRPO's KL term)."""

  expert: object
  teacher_graphdef: object
  teacher_params: object
  tx: object
  total_updates: int
  frozen_policy: bool
  options: update.UpdateOptions

  def init_state(self, config, params, mesh):
    """A fresh train state on the mesh: parameters, optimizer moments, an EMA teacher and the frozen policy."""
    return update.init_state(self.tx, params, mesh, ema=_ema(config), ref=self.frozen_policy)


def learner(config, run: Run) -> Learner:
  """The expert, the teacher, the optimizer and the update's options of a run built by `Run.build`."""
  c = config
  expert = experts.make_expert(c.expert, run.task, run.tok, c.tokenizer.add_bos)
  teacher_graphdef, teacher_params = None, None
  if c.expert.kind == "model":
    teacher_graphdef, teacher_params = load_teacher(c, run.model_cfg, run.tok, run.mesh, run.rules)
  total_updates = c.train.iterations * c.train.updates_per_iteration
  tx = update.make_optimizer(c.optim, total_updates)
  loss_cfg = loss_config(c, run.tok, expert)
  frozen_policy = loss_cfg.kind in losses.REWARDED and loss_cfg.kl_coef > 0  # GRPO's KL is taken to it
  options = update.UpdateOptions(
    loss_cfg,
    labels=experts.labels(expert),
    ema_decay=c.expert.ema_decay,
    frozen_policy=frozen_policy,
    use_behaviour_logprobs=c.train.use_behaviour_logprobs,
    score_max_staleness=c.train.score_max_staleness,
  )
  if (loss_cfg.kind == "sft" or c.train.bc_steps) and run.task.problems("train")[0].reference is None:
    raise ConfigError(f"loss.kind='sft' and train.bc_steps need reference solutions; task {run.task.name!r} has none")
  return Learner(expert, teacher_graphdef, teacher_params, tx, total_updates, frozen_policy, options)
