"""Math word problems. The defaults run on a CPU in a few minutes: generated problems, a ~0.6M-parameter model, a
SentencePiece tokenizer trained on the task's text, the task's oracle expert, a behaviour-cloning warm-up (DAgger's
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
    iterations=60, warmup_steps=250, prompts_per_iteration=16, group_size=8, updates_per_iteration=4, batch_groups=8
  )
  c.eval.update(every=20, num_prompts=128, samples=8)
  c.checkpoint.every = 20
  if arg == "runlocal":
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
