"""The built-in arithmetic-chain task with its oracle expert: the CPU default for every comparison.

python -m distil_jax.main --config=configs/arith.py --workdir=/tmp/arith
python -m distil_jax.main --config=configs/arith.py:runlocal --workdir=/tmp/arith-smoke   # seconds, for smoke tests
--config.loss.kind=grpo|reverse_kl|jsd|tokenwise_fce|sft switches the objective (see configs/README in README.md).
"""

from distil_jax import config_base


def get_config(arg: str | None = None):
  c = config_base.get_config()
  c.task.name = "arith"
  c.sampling.max_prompt_tokens = 24
  c.sampling.prompt_buckets = (24,)
  c.sampling.max_new_tokens = 40
  # The protocol of experiments/arith_comparison.py: 640 held-out prompts, split by identity into validation (the
  # curves and the choice of learning rate) and test (reported once, by `--mode=eval --config.eval.split=test`).
  if arg in ("compare", "compare_self", "compare_self_live", "compare_self_sibling", "compare_self_reference"):
    c.task.eval_size = 640
    c.eval.update(every=10, num_prompts=256, samples=8, split="validation")
    c.train.update(iterations=40, bc_steps=300)
    c.checkpoint.every = 40
    c.log.progress = False
    if arg.startswith("compare_self"):  # the student re-prompted with the verifier's feedback is the expert
      c.expert.update(kind="self", max_prompt_tokens=96)
      c.train.bc_reprompt_fraction = 0.5
      # A teacher that moves with every update collapses together with the student (README, "Results"); an EMA
      # of the student's parameters (time constant ~100 updates) keeps it anchored. `_live` is the collapsing one.
      c.expert.ema_decay = 0.0 if arg == "compare_self_live" else 0.99
      if arg == "compare_self_sibling":  # label only responses whose group holds a correct one (teacher_quality.py)
        c.expert.feedback = "sibling"
      if arg == "compare_self_reference":  # privileged information (OPSD): the reference solution and the verdict
        c.expert.update(feedback="reference", max_prompt_tokens=192)
  if arg == "runlocal":
    config_base.runlocal(c)
  return c
