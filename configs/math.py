"""Math word problems. The defaults run on a CPU in a few minutes: generated problems, a ~0.6M-parameter model, a
SentencePiece tokenizer trained on the task's text, the task's oracle expert, behaviour cloning (DAgger's
round 0), then DistIL.

  python -m distil_jax.main --config=configs/math.py --workdir=/tmp/math

The real job, on a TPU VM or GPU host (see launch/ and README.md):
  python -m distil_jax.main --config=configs/math.py:real --workdir=gs://.../run \\
    --config.model.hf_path=/ckpt/Qwen3-1.7B --config.task.train_path=/data/math.jsonl \\
    --config.expert.kind=self   # or model (with --config.expert.model_path) or http (with --config.expert.url)
"""

from distil_jax import config_base


def get_config(arg: str | None = None):
  c = config_base.get_config()
  c.task.update(name="math", min_ops=1, max_ops=2, max_operand=9, max_value=40, ops="+-*", eval_size=128)
  # Word pieces for the story, one token per digit for the arithmetic: prompts of at most ~21 tokens.
  c.tokenizer.update(model_type="bpe", vocab_size=192, split_digits=True)
  c.sampling.update(max_prompt_tokens=32, prompt_buckets=(32,), max_new_tokens=32)
  c.train.update(
    iterations=60, bc_steps=250, prompts_per_iteration=16, group_size=8, updates_per_iteration=4, batch_groups=8
  )
  c.eval.update(every=20, num_prompts=128, samples=8)
  c.checkpoint.every = 20
  if arg == "smollm2":  # a real instruct checkpoint post-trained on this CPU (README: "A real model")
    smollm2(c)
  elif arg in SMOLLM2_PROTOCOL:  # experiments/arith_comparison.py --task smollm2 (experiments/README.md)
    smollm2_protocol(smollm2(c), arg)
  elif arg == "runlocal":
    config_base.runlocal(c)
  elif arg == "real":  # a pretrained checkpoint and a data file; sizes for one 8-chip host
    config_base.real(c)
    c.task.update(train_path="", prompt_template="{question}\nPut the final answer in \\boxed{{}}.\n", eval_size=500)
    c.tokenizer.add_bos = True
    c.sampling.update(prompt_buckets=(128, 256, 512), max_new_tokens=1024)
    c.expert.update(
      kind="self", max_prompt_tokens=2048, reprompt="{prompt}\nFeedback: {feedback}\nNow solve it again.\n"
    )
    c.optim.weight_decay = 0.0
    c.train.update(iterations=500, prompts_per_iteration=64, group_size=8, updates_per_iteration=2, batch_groups=32)
    c.eval.update(every=25, num_prompts=500, samples=8)
    c.checkpoint.every = 25
  return c


SMOLLM2 = "~/.cache/distil_jax/SmolLM2-135M-Instruct"  # `python -m experiments.smollm2` writes it there


def smollm2(c):
  """DistIL with the self expert (sibling feedback) on SmolLM2-135M-Instruct, through its chat template, on the
  generated word problems, sized for two CPU cores: float32 (XLA:CPU has no bf16 x bf16 = f32 dot), the weight
  matmuls' outputs kept and the rest of each layer recomputed in the backward pass (XLA:CPU attention materialises
  its scores: kept for 30 layers they dominate memory; recomputing the matmuls too costs 10% more update time),
  rows only as wide as what they hold (a 64-token prompt, a 96-token response, a re-prompt of both), a checkpoint
  every iteration (one takes minutes)."""
  import os

  c.model.update(hf_path=os.path.expanduser(SMOLLM2), dtype="float32", remat="dots")
  c.task.update(min_ops=1, max_ops=1, prompt_template="{question}\nPut the final answer in \\boxed{{}}.", eval_size=128)
  c.tokenizer.chat_template = "auto"
  # T = 0.7: at T = 1 this small model writes noise after a few sentences (the self teacher is scored at the
  # sampler's temperature unless loss.teacher_temperature says otherwise)
  c.sampling.update(max_prompt_tokens=64, prompt_buckets=(64,), max_new_tokens=96, temperature=0.7)
  c.expert.update(
    kind="self",
    feedback="sibling",
    max_prompt_tokens=192,
    reprompt="{prompt}\n\n{feedback}\nUse it to write your own solution.",
  )
  c.loss.kind = "distil"
  c.optim.update(lr=1e-5, lr_warmup_steps=2, weight_decay=0.0)
  c.train.update(
    iterations=10, bc_steps=0, prompts_per_iteration=8, group_size=8, updates_per_iteration=2, batch_groups=2
  )
  c.eval.update(every=5, num_prompts=32, samples=4, pass_at=(1, 4), temperature=0.7, log_samples=1)
  c.checkpoint.every = 1
  return c


# The presets of the real-model comparison (issue 24, experiments/README.md "Experiment 5"): the task (generated
# one-step word problems, or the harder multi-step ones) x the self expert's feedback (a correct sibling: DistIL's and
# SDPO's setting; the reference solution and the verdict: OPSD's).
SMOLLM2_PROTOCOL = ("smollm2_sibling", "smollm2_reference", "smollm2_hard", "smollm2_hard_reference")


def smollm2_protocol(c, arg):
  """`smollm2` with three disjoint prompt sets, as the arithmetic protocol has them: training draws from the task's
  stream, the 256 held-out prompts split by identity into validation (the curves, the choice of rate) and test
  (reported once per final run, `--mode=eval --config.eval.split=test`). Evaluation only at the start and the end:
  on two cores one evaluation of 32 prompts costs about as much as an iteration, and the selection reads only the
  last figure. The harder variant chains two or three operations. SmolLM2 starts below 30% Pass@1 already on one
  operation (0.06-0.08 on test over three seeds, experiments/README.md) and at 0.016 on the harder one (16 validation
  prompts x 8, experiments/results/smollm2_hard_teacher_start.json)."""
  c.task.eval_size = 256
  # Two updates of 4 groups: every response an iteration samples can reach an update (the on-policy losses read
  # each of the 8 groups once; DAgger's draw half of theirs from the buffer). With 2 groups per update, half of the
  # fresh groups (on-policy) or about 3/4 (DAgger's) were never trained on, and 3 of DistIL's 10 iterations (3e-6,
  # seed 0) drew no labelled row at all.
  c.train.batch_groups = 4
  c.eval.update(split="validation", every=c.train.iterations)
  c.log.progress = False
  if arg.startswith("smollm2_hard"):
    c.task.update(min_ops=2, max_ops=3, max_value=60)
    # two or three operations make prompts of up to 67 tokens; the re-prompt keeps the same room for the feedback
    c.sampling.update(max_prompt_tokens=80, prompt_buckets=(80,))
    c.expert.max_prompt_tokens += 16
  if arg.endswith("_reference"):  # privileged information (OPSD): the reference solution and the verdict
    c.expert.feedback = "reference"
  return c
