"""Claim 3 / 4: DistIL vs GRPO vs reverse KL vs tokenwise forward CE vs SFT on the built-in `arith` task.

Protocol (configs/arith.py:compare): per seed, one behaviour-cloning warm-up (300 steps on reference solutions) is
shared by every method, which then runs 40 DAgger iterations of 16 prompts x 8 samples from it (the same sampled-
token budget for all), evaluated every 10 iterations on 256 held-out prompts (Pass@1 and Pass@8 from 8 samples,
unbiased estimator), and at the end with 32 samples for Pass@N against N. `--expert self` (configs/arith.py:
compare_self) makes the student re-prompted with the verifier's feedback the expert of the distillation methods;
its warm-up also shows half of its rows with feedback in context, so the small model learns to use it, and its teacher
is an EMA of the student's parameters; `--expert self_live` uses the live parameters (the run that collapses), and
`--expert self_sibling` labels only responses whose group holds a correct one (see experiments/teacher_quality.py).

  python -m experiments.arith_comparison --expert oracle --seeds 0 1 2 --out docs --workdir /tmp/distil-compare
Writes docs/arith_<expert>.json and docs/arith_<expert>_curves.png, docs/arith_<expert>_passk.png. Reruns skip
finished runs. `--smoke` runs one seed of tiny settings (seconds), for the test suite.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

METHODS = {
  "DistIL": ["--config.loss.kind=distil"],
  "GRPO": ["--config.loss.kind=grpo", "--config.loss.normalize=sequence_token_mean", "--config.buffer.mix=0.0"],
  "reverse KL": ["--config.loss.kind=reverse_kl"],
  "tokenwise FCE": ["--config.loss.kind=tokenwise_fce"],
  "SFT": ["--config.loss.kind=sft"],
}
SMOKE = [
  "--config.train.iterations=2",
  "--config.train.warmup_steps=2",
  "--config.train.warmup_batch=8",
  "--config.train.prompts_per_iteration=4",
  "--config.train.group_size=2",
  "--config.train.batch_groups=2",
  "--config.train.updates_per_iteration=1",
  "--config.eval.every=1",
  "--config.eval.num_prompts=4",
  "--config.eval.samples=2",
  "--config.eval.pass_at=(1,2)",
  "--config.model.hidden_size=32",
  "--config.model.intermediate_size=64",
  "--config.model.num_hidden_layers=1",
  "--config.sampling.max_new_tokens=16",
  "--config.checkpoint.every=1",
  "--config.expert.max_prompt_tokens=64",
]
FINAL_SAMPLES = 32


def _main(args, log):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.setdefault("JAX_PLATFORMS", "cpu")
  t = time.time()
  out = subprocess.run([sys.executable, "-m", "distil_jax.main", *args], env=env, capture_output=True, text=True)
  with open(log, "w") as f:
    f.write(out.stdout + out.stderr)
  if out.returncode:
    raise RuntimeError(f"run failed ({log}): {out.stderr.strip().splitlines()[-1]}")
  return time.time() - t


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _done(workdir, iterations):
  path = os.path.join(workdir, "metrics.jsonl")
  return os.path.exists(path) and _metrics(workdir)[-1]["iteration"] == iterations


def _top_k(metrics) -> str:
  """The largest Pass@k key a run evaluates ("eval/pass@8" in the protocol)."""
  return max((k for k in metrics[-1] if k.startswith("eval/pass@")), key=lambda k: int(k.split("@")[1]))


def run_all(expert, seeds, workdir, smoke, methods=tuple(METHODS)):
  preset = "configs/arith.py:" + ("compare" if expert == "oracle" else f"compare_{expert}")
  common = [f"--config={preset}", "--config.log.tensorboard=False"] + (SMOKE if smoke else [])
  iterations = 2 if smoke else 40
  final_k = "(1,2)" if smoke else "(1,2,4,8,16,32)"
  final_n = 2 if smoke else FINAL_SAMPLES
  runs = []
  for seed in seeds:
    warm = os.path.join(workdir, expert, f"warmup_seed{seed}")
    if not os.path.exists(os.path.join(warm, "checkpoints")):
      _main(
        [*common, f"--workdir={warm}", f"--config.seed={seed}", "--config.train.iterations=0"],
        os.path.join(workdir, f"{expert}_warmup_seed{seed}.log"),
      )
    for method in methods:
      flags = METHODS[method]
      name = method.replace(" ", "_")
      wd = os.path.join(workdir, expert, f"{name}_seed{seed}")
      cmd = [
        *common,
        *flags,
        f"--workdir={wd}",
        f"--config.seed={seed}",
        f"--config.model.init_from={warm}",
        "--config.train.warmup_steps=0",
      ]
      if expert.startswith("self") and method in ("DistIL", "reverse KL", "tokenwise FCE"):
        cmd.append("--config.expert.kind=self")
      elif expert.startswith("self"):
        cmd.append("--config.expert.kind=oracle")  # GRPO and SFT use no expert distribution
      wall = os.path.join(wd, "wall_seconds.json")
      if not _done(wd, iterations):
        seconds = _main(cmd, os.path.join(workdir, f"{expert}_{name}_seed{seed}.log"))
        with open(wall, "w") as f:
          json.dump(seconds, f)
      with open(wall) as f:
        seconds = json.load(f)
      if not os.path.exists(os.path.join(wd, "eval.jsonl")):
        _main(
          [
            *cmd,
            "--mode=eval",
            f"--config.eval.samples={final_n}",
            f"--config.eval.pass_at={final_k}",
            "--config.eval.greedy=False",
          ],
          os.path.join(workdir, f"{expert}_{name}_seed{seed}_eval.log"),
        )
      with open(os.path.join(wd, "eval.jsonl")) as f:
        final = json.loads(f.readlines()[-1])
      runs.append(
        {
          "method": method,
          "seed": seed,
          "metrics": _metrics(wd),
          "final": final,
          "wall_seconds": seconds,
          "command": "python -m distil_jax.main " + " ".join(cmd),
        }
      )
  return runs


def plot(runs, expert, out):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  methods = list(dict.fromkeys(r["method"] for r in runs))
  top = _top_k(runs[0]["metrics"])
  for method in methods:
    mine = [r for r in runs if r["method"] == method]
    for ax, key in zip(axes, ("eval/pass@1", top), strict=True):
      rows = [[(m["samples/train_tokens"], m[key]) for m in r["metrics"] if key in m] for r in mine]
      n = min(len(x) for x in rows)
      xs = np.mean([[p[0] for p in x[:n]] for x in rows], 0)
      ys = np.array([[p[1] for p in x[:n]] for x in rows])
      (line,) = ax.plot(xs, ys.mean(0), marker="o", ms=3, label=method)
      ax.fill_between(xs, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.15)
  for ax, key in zip(axes, ("Pass@1", top.split("/")[1].replace("pass", "Pass")), strict=True):
    ax.set(xlabel="sampled training tokens", ylabel=f"held-out {key}", title=key)
  axes[0].legend(fontsize=8)
  seeds = sorted({r["seed"] for r in runs})
  fig.suptitle(f"arith, {expert} expert: mean over seeds {seeds}, band = min..max", fontsize=9)
  fig.tight_layout()
  fig.savefig(os.path.join(out, f"arith_{expert}_curves.png"), dpi=120)

  fig, ax = plt.subplots(figsize=(5, 3.8))
  for method in methods:
    mine = [r["final"] for r in runs if r["method"] == method]
    ks = sorted(int(k.split("@")[1]) for k in mine[0] if k.startswith("eval/pass@"))
    ys = np.array([[f[f"eval/pass@{k}"] for k in ks] for f in mine])
    (line,) = ax.plot(ks, ys.mean(0), marker="o", ms=3, label=method)
    ax.fill_between(ks, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.15)
  ax.set(xscale="log", xlabel="N (samples per prompt)", ylabel="held-out Pass@N", title="Pass@N at the end")
  ax.set_xticks(ks, [str(k) for k in ks])
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, f"arith_{expert}_passk.png"), dpi=120)


def summarize(runs):
  table = {}
  top = _top_k(runs[0]["metrics"])
  name = top.split("/")[1]
  for method in dict.fromkeys(r["method"] for r in runs):
    mine = [r for r in runs if r["method"] == method]
    start = [r["metrics"][0]["eval/pass@1"] for r in mine]
    end1 = [r["metrics"][-1]["eval/pass@1"] for r in mine]
    end_top = [r["metrics"][-1][top] for r in mine]
    table[method] = {
      "seeds": [r["seed"] for r in mine],
      "pass@1_start": float(np.mean(start)),
      "pass@1_end_mean": float(np.mean(end1)),
      "pass@1_end_std": float(np.std(end1)),
      f"{name}_end_mean": float(np.mean(end_top)),
      f"{name}_end_std": float(np.std(end_top)),
      "final_pass@k": {
        k: float(np.mean([r["final"][k] for r in mine])) for k in mine[0]["final"] if k.startswith("eval/pass@")
      },
      "sampled_tokens": float(np.mean([r["metrics"][-1]["samples/train_tokens"] for r in mine])),
      "wall_seconds_mean": float(np.mean([r["wall_seconds"] for r in mine if r["wall_seconds"]] or [0.0])),
    }
  return table


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--expert", choices=("oracle", "self", "self_live", "self_sibling"), default="oracle")
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--out", default="docs")
  ap.add_argument("--workdir", default="/tmp/distil-compare")
  ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
  ap.add_argument("--smoke", action="store_true")
  args = ap.parse_args()
  runs = run_all(args.expert, args.seeds, args.workdir, args.smoke, args.methods)
  os.makedirs(args.out, exist_ok=True)
  table = summarize(runs)
  with open(os.path.join(args.out, f"arith_{args.expert}.json"), "w") as f:
    json.dump({"table": table, "runs": runs}, f, indent=1)
  plot(runs, args.expert, args.out)
  print(json.dumps(table, indent=1))


if __name__ == "__main__":
  main()
