"""Experiment 3: how noisy is each part of DistIL's gradient along a run?

DistIL's gradient is a local part (the gradient of sum_t c_t at the visited states: what tokenwise forward CE follows)
plus a score part (sum_t (R_t - b_t) grad log pi(y_t): the sequence-level credit). The score part is a REINFORCE
estimate, so it may cost more variance than it brings signal. At every kept checkpoint of a run this script draws
`--minibatches` fresh minibatches exactly as an update sees them (`train.batch_groups` prompts x `train.group_size`
responses sampled from the checkpoint, labelled by the run's expert), and computes per minibatch
    g_local = grad of the tokenwise-FCE loss,   g_score = grad of the DistIL loss - g_local
with the loop's own loss construction (`build.loss_config`, `update.loss_fn`). Reported per part: the norm of the
mean over minibatches (signal), the total variance of one minibatch's estimate, E||g - mean g||^2 (noise), their
ratio, and the cosine between the two parts' means. The same prompts and sampling keys are used at every checkpoint.

Variance-reduction choices that keep the estimator unbiased are config overrides of the same command, e.g.
`--config.train.group_size=16 --config.train.batch_groups=4` (more samples per prompt, same responses per minibatch),
`--config.loss.baseline=none` (what the leave-one-out baseline buys). Fresh rollouts only: in training, buffer rows
older than `train.score_max_staleness` get the local part alone.

  python -m experiments.gradient_variance --config=configs/arith.py:compare \\
    --workdir=/tmp/distil-compare/oracle/DistIL_lr0.0003_seed0 --out=experiments/results/arith_gradient_variance.json \\
    --comparison=experiments/results/arith_oracle.json
(arith_comparison keeps a checkpoint every 10 iterations for its DistIL and tokenwise-FCE runs.)
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.flatten_util import ravel_pytree
from ml_collections import config_flags

from distil_jax import build, checkpoint, data, experts, rollout, sharding, update

config_flags.DEFINE_config_file("config", None, "Config file (the run's, with its overrides).", lock_config=True)
flags.DEFINE_string("workdir", None, "A DistIL run's workdir (its kept checkpoints are measured).", required=True)
flags.DEFINE_integer("minibatches", 16, "Fresh minibatches per checkpoint.")
flags.DEFINE_string("out", None, "JSON file to write the figures to (a PNG beside it).")
flags.DEFINE_string("comparison", None, "An arith_comparison JSON: adds Pass@1 against sampled tokens to the plot.")
FLAGS = flags.FLAGS


def part_stats(grads_MxP: np.ndarray) -> dict:
  """Signal and noise of a minibatch gradient estimate from M draws (rows). |mean|^2 overstates |E g|^2 by
  variance / M; `signal` removes that bias (floored at 0), and the ratio uses it."""
  m = len(grads_MxP)
  mean = grads_MxP.mean(0)
  noise = float(np.sum((grads_MxP - mean) ** 2) / (m - 1))
  signal = max(float(np.sum(mean**2)) - noise / m, 0.0)
  return {
    "mean_norm": float(np.linalg.norm(mean)),
    "signal": signal,
    "variance": noise,
    "signal_to_noise": signal / noise if noise > 0 else None,
    "minibatch_norm": float(np.mean(np.linalg.norm(grads_MxP, axis=1))),
  }


def measure(c, workdir, minibatches):
  """{checkpoint step: figures} for every kept checkpoint of `workdir`."""
  if minibatches < 2:
    raise ValueError(f"--minibatches={minibatches}: a variance needs at least two draws")
  if c.loss.kind != "distil":
    raise ValueError(f"loss.kind={c.loss.kind!r}: the score / local split is DistIL's (measure a DistIL run)")
  run = build.Run.build(c, workdir)
  expert = experts.make_expert(c.expert, run.task, run.tok, c.tokenizer.add_bos)
  distil = build.loss_config(c, run.tok, expert)
  options_by_kind = {
    kind: update.UpdateOptions(dataclasses.replace(distil, kind=kind), labels=experts.labels(expert))
    for kind in ("distil", "tokenwise_fce")
  }
  grads = {
    kind: jax.jit(
      jax.grad(
        lambda p, b, t, it, options=options: update.loss_fn(
          p, b, t, None, it, graphdef=run.graphdef, teacher_graphdef=run.graphdef, options=options
        ),
        has_aux=True,
      )
    )
    for kind, options in options_by_kind.items()
  }
  stream = data.prompt_stream(run.task.problems("train"), seed=c.seed + 7919, per_iteration=c.train.batch_groups)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  tokens_at = {}
  if os.path.exists(metrics_path):
    with open(metrics_path) as f:
      tokens_at = {m["iteration"]: m["samples/train_tokens"] for m in map(json.loads, f)}
  targets = {"params": checkpoint.abstract_like(run.params)}
  if c.expert.kind == "self" and c.expert.ema_decay > 0:  # the teacher the run trained with
    targets["ema"] = targets["params"]
  out = {}
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt, sharding.use(run.mesh, run.rules):
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint")
    for step in steps:
      state, _ = ckpt.restore(step, targets)
      params, teacher = state["params"], state.get("ema")
      rows = {"distil": [], "tokenwise_fce": []}
      for m in range(minibatches):
        r = rollout.rollout(
          run.graphdef, params, stream[m], jax.random.fold_in(jax.random.key(c.seed + 7919), m),
          tok=run.tok, add_bos=c.tokenizer.add_bos, task=run.task, mesh=run.mesh, samples_per_prompt=c.train.group_size,
          sampling_cfg=rollout.sampling_config(c.sampling, run.tok),
        )  # fmt: skip
        labels, _ = expert.label(r)
        rows_ = rollout.group_records(r, labels, step, tok=run.tok, layout=rollout.layout(c, expert))
        batch = data.to_global(rows_, run.mesh)
        for kind, fn in grads.items():
          g, _ = fn(params, batch, teacher, jnp.int32(step))
          rows[kind].append(np.asarray(ravel_pytree(jax.device_get(g))[0], np.float64))
      full, local = np.stack(rows["distil"]), np.stack(rows["tokenwise_fce"])
      score = full - local
      cos = float(local.mean(0) @ score.mean(0) / (np.linalg.norm(local.mean(0)) * np.linalg.norm(score.mean(0))))
      out[step] = {
        "sampled_tokens": tokens_at.get(step),
        "local": part_stats(local),
        "score": part_stats(score),
        "distil": part_stats(full),
        "cosine_local_score": cos,
      }
  return out


def plot(figures, comparison, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from experiments import arith_comparison as ac

  panels = 2 if comparison else 1
  fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8), squeeze=False)
  steps = sorted(figures, key=int)
  xs = [figures[s]["sampled_tokens"] or 0 for s in steps]
  for part in ("local", "score", "distil"):
    axes[0, 0].plot(xs, [figures[s][part]["variance"] for s in steps], marker="o", ms=3, label=f"{part}: variance")
  for part in ("local", "score"):
    axes[0, 0].plot(xs, [figures[s][part]["signal"] for s in steps], ls="--", label=f"{part}: |E g|^2")
  axes[0, 0].set(yscale="log", xlabel="sampled training tokens", title="one minibatch's gradient")
  axes[0, 0].legend(fontsize=7)
  if comparison:
    with open(comparison) as f:
      runs = [r for r in json.load(f)["runs"] if r["method"] in ("DistIL", "tokenwise FCE")]
    for method in ("DistIL", "tokenwise FCE"):
      mine = [[m for m in r["metrics"] if "eval/pass@1" in m] for r in runs if r["method"] == method]  # evaluated
      if mine:
        n = min(len(x) for x in mine)
        tokens = np.mean([[m["samples/train_tokens"] for m in x[:n]] for x in mine], 0)
        gains = [[m["eval/pass@1"] - x[0]["eval/pass@1"] for m in x[:n]] for x in mine]  # as arith_comparison's
        ac._band(axes[0, 1], tokens, gains, method)
    axes[0, 1].set(xlabel="sampled training tokens", ylabel="validation Pass@1 minus the start", title="Pass@1 gained")
    axes[0, 1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(_):
  figures = measure(FLAGS.config, FLAGS.workdir, FLAGS.minibatches)
  result = {"workdir": FLAGS.workdir, "minibatches": FLAGS.minibatches, "checkpoints": figures}
  print(json.dumps(result))
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(result, f, indent=1)
    plot(figures, FLAGS.comparison, os.path.splitext(FLAGS.out)[0] + ".png")


if __name__ == "__main__":
  app.run(main)
