"""Defaults shared by every config in `configs/` (each file overrides what its task needs).

Every key a run reads is here, so `--config.section.key=value` on the command line can only set keys that exist:
ml_collections refuses an unknown key, and `main.py` turns that into one line naming it.
"""

import importlib.util
import os

import ml_collections

from distil_jax import sharding


def get_config() -> ml_collections.ConfigDict:
  """Every key a run reads, with its default; each section's own function below lists that section."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = _task()
  # chat_template: "auto" (the checkpoint's own, if it has one), "none", or a .jinja path; add_bos applies without one
  c.tokenizer = dict(
    path="", vocab_size=256, model_type="char", split_digits=True, add_bos=False, chat_template="auto", system_prompt=""
  )
  c.model = _model()
  c.mesh = dict(data=1, fsdp=-1, tensor=1, num_devices=0)  # num_devices 0: all devices of this host/slice
  c.sharding_rules = [list(rule) for rule in sharding.DEFAULT_RULES]  # logical axis -> mesh axes

  c.sampling = dict(
    max_new_tokens=48, max_prompt_tokens=32, prompt_buckets=(16, 32), temperature=1.0, top_k=0, top_p=1.0
  )
  c.expert = _expert()
  c.loss = _loss()
  c.optim = dict(
    lr=3e-4, lr_warmup_steps=20, schedule="constant", b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, max_grad_norm=1.0
  )
  c.train = _train()
  # mix: the fraction of training groups from the aggregated buffer; unset: 0.5 for DAgger's losses (distil,
  # tokenwise_fce, sft), 0 for the on-policy ones (grpo, reverse_kl, jsd); see build.buffer_mix.
  c.buffer = dict(mix=ml_collections.config_dict.placeholder(float), max_groups=4096)
  # split: "eval" (every held-out prompt), or its disjoint halves "validation" / "test" (evaluate.held_out)
  # log_samples: responses per prompt written to workdir/samples.jsonl at each evaluation (0: none)
  c.eval = dict(
    every=10, num_prompts=64, samples=8, pass_at=(1, 8), temperature=1.0, greedy=True, split="eval", log_samples=2
  )
  c.checkpoint = dict(every=10, keep=2)
  c.log = dict(progress=True, tensorboard=True)
  c.export = dict(dtype="bfloat16")
  return ml_collections.ConfigDict(c)


def _task() -> dict:
  """The task and its data: which task, its sizes, and the limits on what it reads and runs."""
  return dict(
    name="arith",
    seed=0,
    train_path="",
    eval_size=64,
    train_size=1_000_000,
    min_ops=1,
    max_ops=3,
    max_operand=9,
    max_value=60,
    ops="+-*",  # arithmetic chains (arith, generated math)
    prompt_template="{question}\n",  # math / science records
    answer_formats=("boxed", "####", "the answer is", "answer:"),  # math: the forms a final answer is read in
    timeout_s=5.0,
    memory_mb=512,
    include_prompt=True,  # code
    max_record_bytes=1 << 20,  # data files: a longer line is refused at load (with its file and line)
  )


def _model() -> dict:
  """The student: a Hugging Face checkpoint, a workdir to start from, or the architecture to initialise."""
  return dict(
    hf_path="",
    init_from="",  # init_from: a workdir whose latest parameters (and tokenizer) start this run
    arch="llama",
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=0,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    dtype="float32",
    remat="none",  # none | full (recompute each layer) | dots (keep the weight matmuls' outputs)
    attention="auto",  # auto (cudnn on GPU, splash on TPU, xla on CPU) | cudnn | splash | xla | einsum
    vocab_multiple=8,
  )


def _expert() -> dict:
  """Who labels the student's states (`experts/`), and what each kind needs."""
  return dict(
    kind="oracle",
    top_k=1,
    smoothing=1e-3,  # oracle: mass 1 - smoothing on the expert's token (the student learns it)
    reprompt="{prompt} [{feedback}] ",
    max_prompt_tokens=128,
    feedback="any",  # self / model: "sibling" labels only responses whose group has another, correct one;
    # "reference" shows the reference solution and the verdict (privileged information; reads no sibling)
    ema_decay=0.0,  # self: the teacher is an EMA of the student (SDPO); 1: frozen at the start (OPSD); 0: live
    model_path="",  # model
    url="",
    model_name="",
    timeout_s=30.0,  # http: one try as a whole, connect to last byte
    deadline_s=180.0,  # http: one request, every retry and wait included
    max_retries=3,  # http: on HTTP 429 / 5xx, resets, cut or late replies (after Retry-After when sent)
    backoff_s=0.5,
    max_reply_mb=64.0,  # http: one reply, read whole
    concurrency=8,  # http
    tokenizer_probe="distil_jax tokenizer probe 12+34=46",
  )


def _loss() -> dict:
  """The loss and its options (`losses.LossConfig`); teacher_temperature and the baseline's parts are the run's."""
  return dict(
    kind="distil",
    baseline="loo",
    reduction="auto",  # the kind's published convention (losses.py)
    cost="ce",
    clip_eps=0.2,
    # self / model teachers: q = softmax(logits / T); unset: the sampler's temperature (the student's own policy
    # when it is shown no feedback). Top-k experts (oracle, http) give log-probs already: unset or 1.
    teacher_temperature=ml_collections.config_dict.placeholder(float),
    topk_tail="bucket",
    jsd_beta=0.5,
    kl_coef=0.0,
    std_eps=1e-4,
    chunk_size=64,
    terminal="free",
    student_topk=0,  # self / model teachers: divergences over the student's top k ids + a tail (SDPO: 100)
    distil_weight=1.0,  # distil_grpo: GRPO + distil_weight * DistIL,
    distil_weight_decay_iterations=0,  # falling linearly to 0 over this many iterations (0: constant)
  )


def _train() -> dict:
  """The DAgger loop's sizes, and behaviour cloning before it."""
  return dict(
    iterations=100,
    prompts_per_iteration=16,
    group_size=8,
    updates_per_iteration=4,
    batch_groups=8,
    use_behaviour_logprobs=True,
    skip_unlabelled=True,  # the update runs the student and teacher over labelled rows only (update.kept_rows)
    score_max_staleness=0,
    bc_steps=0,
    bc_batch=64,
    bc_lr=3e-3,  # DAgger's round 0: behaviour cloning with an optimizer of its own (behaviour_cloning.py)
    bc_reprompt_fraction=0.0,  # of the behaviour-cloning rows, shown feedback as the self expert will show it
  )


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `:runlocal` preset of every config: a one-layer model and two tiny iterations, seconds on a CPU."""
  c.model.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
  c.train.update(
    iterations=2, prompts_per_iteration=2, group_size=4, updates_per_iteration=1, batch_groups=2, bc_steps=0
  )
  c.eval.update(every=1, num_prompts=4, samples=2, pass_at=(1, 2))
  c.sampling.max_new_tokens = 16
  c.checkpoint.every = 1
  c.log.progress = False
  return c


def real(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """What the `:real` preset of every task shares: a pretrained checkpoint post-trained in bf16 with remat, a small
  lr, no behaviour cloning (the checkpoint already knows the format) and a top-64 expert."""
  c.model.update(dtype="bfloat16", remat="full")
  c.sampling.max_prompt_tokens = 512
  c.expert.top_k = 64
  c.optim.update(lr=1e-6, lr_warmup_steps=10)
  c.train.update(bc_steps=0, bc_reprompt_fraction=0.0)
  return c


def from_file(spec: str, **overrides) -> ml_collections.ConfigDict:
  """`path/to/config.py[:arg]`'s `get_config(arg)` with dotted overrides (`**{"loss.kind": "grpo"}`), as `--config`
  and `--config.x.y=` read them, for scripts and tests that build a run without the command line."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(f"config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  return config
