"""Python programming with sandboxed tests: JSONL {"prompt", "tests"} (or HumanEval's layout).

  python -m distil_jax.main --config=configs/code.py --workdir=/tmp/code     # generated problems, CPU smoke
The real job: a pretrained coder and a data file, the student re-prompted with the failing test as its own expert:
  python -m distil_jax.main --config=configs/code.py:real --workdir=gs://.../code \\
    --config.model.hf_path=/ckpt/Qwen2.5-Coder-1.5B --config.task.train_path=/data/code.jsonl
Model-written programs run only in distil_jax/sandbox/ (no network, CPU / memory / file / process limits).
"""

from distil_jax import config_base


def get_config(arg: str | None = None):
  c = config_base.get_config()
  c.task.update(name="code", train_size=2000, eval_size=32, timeout_s=5.0, memory_mb=512)
  c.tokenizer.update(model_type="bpe", vocab_size=256)
  c.sampling.update(max_prompt_tokens=48, prompt_buckets=(48,), max_new_tokens=24)
  c.expert.update(kind="self", max_prompt_tokens=160, reprompt="{prompt}# feedback: {feedback}\n")
  c.train.update(iterations=50, bc_steps=100, bc_reprompt_fraction=0.5)
  c.eval.update(every=10, num_prompts=32, samples=4, pass_at=(1, 4))
  if arg == "runlocal":
    config_base.runlocal(c)
  elif arg == "real":
    config_base.real(c)
    c.task.update(eval_size=64, timeout_s=10.0)
    c.tokenizer.add_bos = False
    c.sampling.update(prompt_buckets=(256, 512), max_new_tokens=512)
    c.expert.max_prompt_tokens = 2048
    c.train.update(iterations=300, prompts_per_iteration=32, group_size=8, batch_groups=16)
    c.eval.update(every=25, num_prompts=64, samples=8, pass_at=(1, 8))
  return c
