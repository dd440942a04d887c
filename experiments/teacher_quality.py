"""Is the `self` expert a better policy than the student? Self-distillation can only help if it is.

For a checkpoint (e.g. the comparison's warm-up), on held-out prompts: the student's Pass@1 from the plain prompt,
and the Pass@1 of the same parameters re-prompted the way the `self` expert is (`expert.reprompt`), with
  - own feedback: the verifier's feedback on one of the student's own responses (the expert's view of a failure);
  - sibling: a correct solution in context (the expert's view when a sibling response in the group succeeded;
    here the reference solution).
Samples at temperature 1; Pass@1 from `samples` responses per prompt.

  python -m experiments.teacher_quality --config=configs/arith.py:compare_self \\
    --workdir=/tmp/distil-compare/self/warmup_seed0 --out docs/arith_self_teacher.json
"""

import dataclasses
import json

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from distil_jax import evaluate, experts, rollout, train

config_flags.DEFINE_config_file("config", None, "Config file (the run's).", lock_config=True)
flags.DEFINE_string("workdir", None, "A workdir holding a checkpoint.", required=True)
flags.DEFINE_string("out", None, "JSON file to write the figures to.")
flags.DEFINE_integer("samples", 8, "Responses per prompt.")
FLAGS = flags.FLAGS


def pass_at_1(run, params, problems, rng, config):
  """(Pass@1, the rollouts) of `params` on `problems`."""
  r = rollout.rollout(
    run.graphdef,
    params,
    problems,
    rng,
    config=config,
    tok=run.tok,
    task=run.task,
    mesh=run.mesh,
    samples_per_prompt=FLAGS.samples,
    sampling_cfg=rollout.sampling_config(config, run.tok),
  )
  return evaluate.summarize([[v.correct for v in row] for row in r.verdicts], (1,))["pass@1"], r


def main(_):
  c = FLAGS.config
  run = train.Run.build(c, FLAGS.workdir)
  params, _ = run.restore_params()
  problems = run.task.problems("eval")[: c.eval.num_prompts]
  wide = c.copy_and_resolve_references()  # re-prompts are longer: sample them with the expert's prompt width
  wide.sampling.update(max_prompt_tokens=c.expert.max_prompt_tokens, prompt_buckets=(c.expert.max_prompt_tokens,))
  keys = jax.random.split(jax.random.key(c.seed), 3)
  with jax.set_mesh(run.mesh):
    student, r = pass_at_1(run, params, problems, keys[0], c)

    def reprompt(p, feedback):  # as the expert sees it: its last `expert.max_prompt_tokens` tokens
      ids = run.tok.prompt_ids(c.expert.reprompt.format(prompt=p.prompt, feedback=feedback), c.tokenizer.add_bos)
      return dataclasses.replace(p, prompt=run.tok.text_of(ids[-c.expert.max_prompt_tokens :]))

    own = [reprompt(p, v[0].feedback) for p, v in zip(problems, r.verdicts, strict=True)]
    sibling = [reprompt(p, experts.SIBLING + p.reference) for p in problems]
    wrong = np.array([not v[0].correct for v in r.verdicts])
    own_all, r_own = pass_at_1(run, params, own, keys[1], wide)
    own_wrong = float(
      np.mean([np.mean([v.correct for v in row]) for row, w in zip(r_own.verdicts, wrong, strict=True) if w])
    )
    out = {
      "student/pass@1": student,
      "self_expert_own_feedback/pass@1": own_all,
      "self_expert_own_feedback/pass@1_after_a_wrong_response": own_wrong,
      "self_expert_sibling/pass@1": pass_at_1(run, params, sibling, keys[2], wide)[0],
      "prompts": len(problems),
      "samples": FLAGS.samples,
    }
  print(json.dumps(out))
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  app.run(main)
