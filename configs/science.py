"""Multiple-choice science questions: JSONL {"question", "choices", "answer", "explanation"?}.

  python -m distil_jax.main --config=configs/science.py --workdir=/tmp/science   # generated questions, CPU smoke
  python -m distil_jax.main --config=configs/science.py:real --workdir=... \\
    --config.model.hf_path=/ckpt/Qwen3-1.7B --config.task.train_path=/data/science.jsonl
Feedback is the verdict and, when the record has one, the explanation; the default expert is the student
re-prompted with it.
"""

from distil_jax import config_base


def get_config(arg: str | None = None):
  c = config_base.get_config()
  c.task.update(name="science", train_size=4000, eval_size=64, prompt_template="{question}\nAnswer:")
  c.tokenizer.update(model_type="bpe", vocab_size=192)
  c.sampling.update(max_prompt_tokens=48, prompt_buckets=(48,), max_new_tokens=24)
  c.expert.update(kind="self", max_prompt_tokens=128)
  c.train.update(iterations=60, bc_steps=150, bc_reprompt_fraction=0.5)
  c.eval.update(every=10, num_prompts=64, samples=4, pass_at=(1, 4))
  if arg == "runlocal":
    config_base.runlocal(c)
  elif arg == "real":
    config_base.real(c)
    c.task.update(eval_size=500, prompt_template="{question}\nThink, then end with 'Answer: X'.\n")
    c.tokenizer.add_bos = True
    c.sampling.update(prompt_buckets=(256, 512), max_new_tokens=512)
    c.expert.max_prompt_tokens = 1024
    c.train.update(iterations=300, prompts_per_iteration=64, batch_groups=32)
    c.eval.update(every=25, num_prompts=500, samples=8, pass_at=(1, 8))
  return c
