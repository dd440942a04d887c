"""DistIL against its rivals on the built-in `arith` task, under the protocol of the README ("Results").

Protocol:
  1. Three disjoint prompt sets. Training draws from the task's stream, which excludes every held-out prompt; the
     held-out prompts are split by identity into validation and test (`evaluate.held_out`, `eval.split`).
  2. Per seed, one behaviour-cloning run (300 steps on reference solutions) shared by every method and rate.
  3. Per method, the learning rate is chosen from `--lrs` (>= 3 values) by the final validation Pass@1 of one seed
     (`--select_seed`); ties go to the smaller rate. Where a task checks its edge (`Task.check_edge`), a rate
     chosen at the grid's edge is tried one step beyond it and the choice made again.
  4. Every seed (`--seeds`, default five) runs each method at its chosen rate: 40 DAgger iterations of 16 prompts x 8
     samples and 4 updates each, identical for all methods (method flags may not touch `train.*` or `sampling.*`).
  5. The test set is evaluated once per final run, 32 samples per prompt (Pass@1/8/32, unbiased estimator), and
     reported as the mean with a 95% Student-t interval over seeds, and as per-seed paired differences DistIL minus
     each baseline with the exact sign test (experiments/stats.py says why these statistics).

  python -m experiments.arith_comparison --expert oracle --workdir /tmp/distil-compare
  python -m experiments.arith_comparison --expert self_reference ...   # privileged information (OPSD's setting)
  python -m experiments.arith_comparison --expert self_sibling ...     # a correct sibling (SDPO's setting)
  python -m experiments.arith_comparison --expert oracle --size 125m ... # experiment 1 at a larger model (a GPU's)
Writes experiments/results/arith_<expert>.json (every run's command, metrics and final figures; the selection; the
statistics), arith_<expert>_curves.png and arith_<expert>_passk.png beside it. Reruns skip finished runs. `--smoke`:
tiny settings.
`--jobs N` runs N runs at once, each pinned to its own core: a 0.6M-parameter model keeps one core busy at most, so
two one-core runs finish in about the time of one two-core run. Wall times are then per run on one core.

The same protocol on a real pretrained model (`--task smollm2`, issue 24; experiments/README.md, "Experiment 5"):
SmolLM2-135M-Instruct through its chat template on generated word problems (`configs/math.py:smollm2_*`), the self
expert shown a correct sibling (`--expert sibling`, DistIL's and SDPO's setting) or the reference solution
(`--expert reference`, OPSD's), and the harder two-to-three-step problems (`--expert hard`, `hard_reference`).
Differences from arithmetic, each because of the task: no behaviour cloning (the preset has
`train.bc_steps=0`: an instruct checkpoint already writes the answer format), so every run starts from the
checkpoint; seven methods, each as its authors run it (`REAL_METHODS`); the methods that read no teacher (GRPO, SFT)
are the same runs in both feedback settings of a task and run once; three seeds and 64 test prompts x 8 samples
(Pass@1/2/4/8), sized to the 2-core machine.
  python -m experiments.arith_comparison --task smollm2 --expert sibling --workdir ~/distil-real
What each task runs (methods, settings, grids, seeds) is `experiments/comparison_tasks.py`.
`--tag T` runs a setting again under other code (a mended grader: the same configs, other rewards) in folders
`<setting>-T` of its own, beside the first runs' (which a rerun would otherwise read back as done).
Runs resume: a run stopped by a signal or a session's end continues from its last checkpoint (the loop's resume is
exact) when the command is given again; finished runs and test evaluations are read back, not rerun.
"""

import argparse
import collections
import concurrent.futures
import contextlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import threading
import time

import numpy as np
from absl import flags as absl_flags
from ml_collections import config_flags

from distil_jax import config_base
from experiments import processes, stats
from experiments.comparison_tasks import SMOKE_FINAL, SMOKE_ITERATIONS, TASKS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


SHAPE = ("prompts_per_iteration", "group_size", "batch_groups")  # a variant may trade prompts for samples per prompt


def check_budget_is_shared(preset="compare", task="arith"):
  """The comparison is fair only if every method samples and updates alike: method flags set the objective (and the
  teacher's feedback or update) alone; a variant may regroup the same responses (prompts x samples per iteration,
  prompts x samples per update) and no more."""
  t = TASKS[task]
  train = config_base.from_file(os.path.join(ROOT, t.config) + f":{preset}").train
  for method, flags in [*t.methods.items(), *((m, t.methods[b] + f) for m, (b, f) in t.variants.items())]:
    shape = {k: train[k] for k in SHAPE}
    for flag in flags:
      key, value = flag.removeprefix("--config.").split("=", 1)
      if method in t.variants and key.removeprefix("train.") in SHAPE:
        shape[key.removeprefix("train.")] = int(value)
      elif key.startswith(("train.", "sampling.", "eval.", "optim.")):
        raise ValueError(f"{method}: {flag} would change the budget or the evaluation of one method only")
    mine = [shape[k] * shape["group_size"] for k in ("prompts_per_iteration", "batch_groups")]
    shared = [train[k] * train.group_size for k in ("prompts_per_iteration", "batch_groups")]
    if mine != shared:
      raise ValueError(f"{method}: {mine} responses per (iteration, update) where every other method has {shared}")


# CPython 3.11 builds its AST objects with one recursion counter per interpreter: two threads compiling at once (a
# config file, `ast.literal_eval` of a tuple flag) can fail with "SystemError: AST constructor recursion depth
# mismatch" (python/cpython#106905). The protocol's methods resolve their commands on threads of their own.
_PARSING = threading.Lock()


def resolve(cmd):
  """The config a command's `--config` and `--config.*` flags give, parsed by ml_collections as `python -m
  distil_jax.main` parses them, without starting a process; one thread at a time (`_PARSING`)."""
  path = cmd[0].split("=", 1)[1]  # a command starts with --config=configs/<task>.py:<preset>
  argv = [
    "arith_comparison",
    f"--config={os.path.join(ROOT, path)}",
    *(f for f in cmd[1:] if f.startswith("--config.")),
  ]
  with _PARSING:
    parsed = absl_flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=parsed, lock_config=True, sys_argv=argv)
    parsed(argv)
    return parsed.config


def _without_expert(config):
  return {k: v for k, v in config.to_dict().items() if k != "expert"}


class Comparison:
  """The runs of one expert setting under the protocol; every run is a subprocess and skipped if already done."""

  def __init__(self, expert, workdir, smoke=False, size="small", jobs=1, task="arith", record=None, tag=""):
    self.task = t = TASKS[task]
    self.workdir, self.record = workdir, record
    self.commit = code_commit()  # the orchestrator's own: restart it when its worktree moves
    if expert not in t.settings:
      raise ValueError(f"--expert {expert}: task {task!r} has the settings {sorted(t.settings)}")
    check_budget_is_shared(t.settings[expert], task)
    # A run takes a core for its whole life; with jobs=1 it is not pinned at all.
    self.cores = processes.Cores(sorted(os.sched_getaffinity(0))[:jobs] if jobs > 1 else [None])
    self.locks = collections.defaultdict(threading.Lock)  # one process per run, however many threads ask
    self.held = threading.local()  # the core a thread holds across several processes (`slot`)
    self.expert, self.smoke, self.task_name = expert, smoke, task
    # A tag names a second set of the setting's runs under other code (`--tag`): their own workdirs, records and
    # output files, "-" before it (no preset name has one).
    suffix = ("" if size == "small" else f"_{size}") + (f"-{tag}" if tag else "")
    self.name = expert + suffix
    self.label = f"{task}_{self.name}"  # the files written to --out
    prefix = "" if task == "arith" else f"{task}_"  # the arithmetic workdirs keep their names
    self.roots = {e: os.path.join(workdir, prefix + e + suffix) for e in t.settings}
    self.root = self.roots[expert]
    os.makedirs(self.root, exist_ok=True)
    self.size = size
    self.config = self._config(t.settings[expert])
    self.warm = self.config.train.bc_steps > 0  # no behaviour cloning where the preset has none
    self.shared = t.shares.get(expert, expert)  # where this setting's runs of methods that read no teacher live
    if self.shared != expert:
      if self.warm:
        raise ValueError(f"{expert}: runs are shared only without behaviour cloning (each setting clones its own)")
      if _without_expert(self.config) != _without_expert(self._config(t.settings[self.shared])):
        raise ValueError(f"{expert} and {self.shared} differ outside the expert: their runs cannot be shared")
    self.iterations = SMOKE_ITERATIONS if smoke else self.config.train.iterations
    self.final = SMOKE_FINAL if smoke else t.final
    self.prune = t.prune

  def drop_weights(self, wd):
    """A run's checkpoints and replay buffer, once its figures are all written: the test evaluation is done, or its
    rate was not chosen. Its metrics, samples and test figures stay; a pruned run is never resumed (it is finished)."""
    if self.prune:
      for part in ("checkpoints", "buffer"):
        shutil.rmtree(os.path.join(wd, part), ignore_errors=True)

  def _config(self, preset):
    """The preset as every run of it starts (the smoke's and the size's flags applied)."""
    return resolve(self._common(preset))

  def trained_config(self, cmd) -> str:
    """What a command trains, as the text a record keeps: its whole config, the checkpoint's folder by name only
    (machines put it in different homes)."""
    config = resolve(cmd).to_dict()
    config["model"]["hf_path"] = os.path.basename(config["model"]["hf_path"].rstrip("/"))
    return json.dumps(config, sort_keys=True, indent=1, default=str) + "\n"

  def _common(self, preset):
    common = [f"--config={self.task.config}:{preset}", "--config.log.tensorboard=False", *self.task.sizes[self.size]]
    return common + (self.task.smoke if self.smoke else [])

  @contextlib.contextmanager
  def slot(self):
    """Hold a run slot (a core) across several processes: a run and then its test, with no other run between them
    (the weights the test reads may not outlive the session). Nested holds are the outer one."""
    if hasattr(self.held, "core"):
      yield
      return
    self.held.core = self.cores.get()
    try:
      yield
    finally:
      self.cores.put(self.held.core)
      del self.held.core

  def tested(self, wd, cmd) -> bool:
    """Trained and tested already, here or in `--record` (a test follows its training, so its figures mark both)."""
    with self.locks[wd]:
      self.restore(wd, cmd)
    return os.path.exists(os.path.join(wd, "eval.jsonl"))

  def slot_for(self, wd, cmd):
    """A run slot while the run in `wd` has a part left to run, none to read it back: a method whose runs are done
    then reads them without waiting its turn behind another method's runs."""
    return contextlib.nullcontext() if self.tested(wd, cmd) else self.slot()

  def launch(self, args, log, elapsed=None, on_start=None):
    with self.slot():
      return processes.main_process(args, log, self.held.core, elapsed, on_start)

  def warmup(self, seed):
    warm = os.path.join(self.root, f"warmup_seed{seed}")
    with self.locks[warm]:
      if not os.path.exists(os.path.join(warm, "checkpoints")):
        cmd = [*self._common(self.task.settings[self.expert]), f"--workdir={warm}", f"--config.seed={seed}"]
        self.launch([*cmd, "--config.train.iterations=0"], os.path.join(self.root, f"warmup_seed{seed}.log"))
    return warm

  def command(self, method, seed, lr):
    """(name, workdir, flags) of one run. A method that reads no teacher runs in the setting it shares such runs with
    (the same command, so the same workdir: trained once, read by both)."""
    t = self.task
    name = f"{re.sub('[^A-Za-z0-9]+', '_', method)}_lr{lr:g}_seed{seed}"
    setting = self.expert if method in t.uses_expert else self.shared
    wd = os.path.join(self.roots[setting], name)
    base, extra = t.variants.get(method, (method, []))
    flags = [f.format(iterations=self.iterations) for f in t.methods[base]]
    cmd = [*self._common(t.settings[setting]), *flags, *extra, f"--workdir={wd}", f"--config.seed={seed}"]
    cmd.append(f"--config.optim.lr={lr!r}")
    if self.warm:
      cmd += [f"--config.model.init_from={self.warmup(seed)}", "--config.train.bc_steps=0"]
    if self.config.expert.kind != "oracle":
      # arith: GRPO and SFT read no expert distribution: they get the oracle with plain feedback, which validation
      # accepts; smollm2: they keep the self expert, whose teacher their losses never compute
      cmd += t.expert if method in t.uses_expert else t.no_expert
    if method in t.keep_checkpoints and not self.smoke:
      cmd += ["--config.checkpoint.every=10", "--config.checkpoint.keep=100"]
    return name, wd, cmd

  def finished(self, metrics_path):
    return os.path.exists(metrics_path) and read_jsonl(metrics_path)[-1]["iteration"] == self.iterations

  def train(self, method, seed, lr) -> dict:
    """Train (or find trained, or resume) one run; its validation curve. The wall time adds up the pieces of a run
    that was stopped and resumed."""
    name, wd, cmd = self.command(method, seed, lr)
    metrics_path, wall = os.path.join(wd, "metrics.jsonl"), os.path.join(wd, "wall_seconds.json")
    with self.locks[wd]:
      self.restore(wd, cmd)
      if not self.finished(metrics_path):
        before = _read_wall(wall)
        seconds = self.launch(
          cmd,
          os.path.join(os.path.dirname(wd), f"{name}.log"),
          lambda s: _write_wall(wall, before + s),
          lambda: self.note_commit(wd),
        )
        _write_wall(wall, before + seconds)
        if not self.finished(metrics_path):  # stopped at a signal: saved, exit 0; the next invocation resumes it
          raise RuntimeError(f"{wd} stopped before iteration {self.iterations}; run the same command to resume")
    run = {"method": method, "seed": seed, "lr": lr, "wall_seconds": _read_wall(wall), "workdir": wd}
    return {**run, "command": "python -m distil_jax.main " + " ".join(cmd), "metrics": read_jsonl(metrics_path)}

  def start(self, seed) -> dict:
    """The test figures of the checkpoint every run of the setting starts from (the model as loaded; a task with a
    warm-up tests its runs against each other only), taken and read back as a run's: the row a method's gain is
    read against, on each seed (the test's draw is the seed's, as a run's is, so each method minus the start pairs
    seed by seed). It lives with the runs that read no teacher, so settings that share those share it."""
    wd = os.path.join(self.roots[self.shared], f"start_seed{seed}")
    cmd = [*self._common(self.task.settings[self.shared]), f"--workdir={wd}", f"--config.seed={seed}"]
    cmd.append("--config.train.iterations=0")  # a checkpoint of the parameters as loaded
    with self.slot_for(wd, cmd), self.locks[wd]:  # slot_for restored a recorded start
      if not os.path.exists(os.path.join(wd, "eval.jsonl")):  # again if killed: a saved start returns at once
        wall = os.path.join(wd, "wall_seconds.json")
        _write_wall(wall, _read_wall(wall) + self.launch(cmd, f"{wd}.log", on_start=lambda: self.note_commit(wd)))
      return self._test(wd, cmd, {"method": "start", "seed": seed, "workdir": wd})

  def test(self, run) -> dict:
    """The test figures of a final run: evaluated once, then read back."""
    _, wd, cmd = self.command(run["method"], run["seed"], run["lr"])
    return self._test(wd, cmd, run)

  def _test(self, wd, cmd, run) -> dict:
    """The test figures of the checkpoint in `wd`, trained by `cmd`; its weights dropped and its figures recorded."""
    path = os.path.join(wd, "eval.jsonl")
    flags = ["--mode=eval", "--config.eval.split=test", "--config.eval.greedy=False"]
    flags += [f"--config.eval.samples={self.final['samples']}", f"--config.eval.pass_at={self.final['pass_at']}"]
    flags += [f"--config.eval.num_prompts={self.final['num_prompts']}"] if "num_prompts" in self.final else []
    with self.locks[path]:
      if not os.path.exists(path):
        if not os.path.isdir(os.path.join(wd, "checkpoints")):
          raise RuntimeError(f"{wd}: weights dropped before its test (a rate chosen after a grid change?): retrain it")
        log = os.path.join(os.path.dirname(wd), f"{os.path.basename(wd)}_test.log")
        self.launch([*cmd, *flags], log, on_start=lambda: self.note_commit(wd))
      self.drop_weights(wd)
      self.keep(wd, cmd)
    return {**run, "test": read_jsonl(path)[-1], "test_command": "python -m distil_jax.main " + " ".join(cmd + flags)}

  def _recorded(self, wd):
    return os.path.join(self.record, os.path.relpath(wd, self.workdir))

  def note_commit(self, wd):
    """The commit each launched part of a run (its training, each resumed part, its test) ran at, one line per part:
    a run may resume under other code."""
    os.makedirs(wd, exist_ok=True)
    with open(os.path.join(wd, "commits"), "a") as f:
      f.write(self.commit + "\n")

  def keep(self, wd, cmd):
    """Copy a trained and tested run's figures (no weights: a few KB) to `--record`, a folder that outlives the
    machine (a git checkout): a session may end on a fresh machine, where the workdir is gone. Written once, each
    file whole (a copy then a rename), with the config the run trained, the commits its parts ran at (`commits`,
    written at each launch), the responses it wrote at each validation (`samples.jsonl`, about 40 KB: what the
    report's answers table reads) and every response its test graded (`eval_samples.jsonl`, written by
    `--mode=eval`; a SmolLM2 test's 512, about 250 KB); eval.jsonl last, so that its presence marks a whole record."""
    if not self.record or os.path.exists(os.path.join(self._recorded(wd), RECORDED[-1])):
      return
    os.makedirs(self._recorded(wd), exist_ok=True)
    with open(os.path.join(self._recorded(wd), "config.json"), "w") as f:
      f.write(self.trained_config(cmd))
    for name in KEPT:
      if os.path.exists(os.path.join(wd, name)):
        _copy_whole(os.path.join(wd, name), os.path.join(self._recorded(wd), name))

  def restore(self, wd, cmd):
    """The recorded figures of a finished run, copied into a workdir that lacks them; the run is then read back.
    A record of another config (the preset changed since) is refused, not read as this run."""
    recorded = self._recorded(wd) if self.record else None
    if not recorded or not os.path.exists(os.path.join(recorded, RECORDED[-1])):
      return
    with open(os.path.join(recorded, "config.json")) as f:
      kept, now = _flat(json.load(f)), _flat(json.loads(self.trained_config(cmd)))
    if kept != now:
      keys = sorted(k for k in kept.keys() | now.keys() if kept.get(k) != now.get(k))
      raise RuntimeError(f"{recorded} was trained under another config ({', '.join(keys)}): move it aside to rerun it")
    if not os.path.exists(os.path.join(wd, RECORDED[-1])):
      os.makedirs(wd, exist_ok=True)
      for name in KEPT:
        if os.path.exists(os.path.join(recorded, name)):
          _copy_whole(os.path.join(recorded, name), os.path.join(wd, name))


def _copy_whole(src, dst):
  shutil.copyfile(src, dst + ".tmp")
  os.replace(dst + ".tmp", dst)


def _flat(tree, prefix=""):
  if not isinstance(tree, dict):
    return {prefix: tree}
  return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}


def code_commit() -> str:
  """The commit of the code the runs import (`-dirty` if the tree has changes), or "" outside git."""
  describe = ["git", "-C", ROOT, "describe", "--always", "--dirty", "--abbrev=40"]
  return subprocess.run(describe, capture_output=True, text=True).stdout.strip()


RECORDED = ("metrics.jsonl", "wall_seconds.json", "eval.jsonl")  # what a finished run is read back from, in order
# a record's files: the commits, what it wrote at each validation and at its test (graded again by a mended grader)
KEPT = ("commits", "samples.jsonl", "eval_samples.jsonl", *RECORDED)


def _write_wall(path, seconds):
  """Replaced whole (a kill mid-write leaves the previous figure, not a torn file)."""
  with open(path + ".tmp", "w") as f:
    json.dump(seconds, f)
  os.replace(path + ".tmp", path)


def _read_wall(path):
  if not os.path.exists(path):
    return 0.0
  with open(path) as f:
    return float(json.load(f))


def select_lr(grid_runs) -> tuple[float, dict]:
  """The rate with the best final validation Pass@1 (ties: the smaller rate), and every rate's figure."""
  scores = {r["lr"]: r["metrics"][-1]["eval/pass@1"] for r in grid_runs}
  return max(scores, key=lambda lr: (scores[lr], -lr)), scores


def _ladder(lr):
  """lr as (mantissa, exponent) where it is 1 or 3 times a power of ten, else None."""
  exp = math.floor(math.log10(lr) + 1e-9)
  mantissa = round(lr / 10.0**exp, 6)
  return (mantissa, exp) if mantissa in (1.0, 3.0) else None


def beyond_edge(lrs, lr):
  """The next rate past the grid's edge when `lr` sits on it, else None. A grid of consecutive 1-3-10 steps goes on
  along them (3e-6 -> 1e-6, 3e-5 -> 1e-4); any other grid by its own ratio at that edge. A rate chosen at the edge
  is the best only of those tried."""
  ordered = sorted(lrs)
  if len(ordered) < 2 or lr not in (ordered[0], ordered[-1]):
    return None
  down = lr == ordered[0]
  steps = [_ladder(x) for x in ordered]
  up = lambda step: (3.0, step[1]) if step[0] == 1.0 else (1.0, step[1] + 1)
  below = lambda step: (1.0, step[1]) if step[0] == 3.0 else (3.0, step[1] - 1)  # up's inverse
  if all(steps) and all(b == up(a) for a, b in itertools.pairwise(steps)):
    mantissa, exp = below(steps[0]) if down else up(steps[-1])
    return float(f"{mantissa}e{exp}")
  return float(f"{lr * lr / (ordered[1] if down else ordered[-2]):.3g}")


def run_protocol(cmp: Comparison, methods, seeds, lrs, select_seed):
  if len(lrs) < 3 and not cmp.smoke:
    raise ValueError(f"--lrs {lrs}: the protocol chooses each method's rate from at least three values")

  def one_method(method):
    """Grid on the selection seed, then every seed at the chosen rate; the methods run side by side (`--jobs`)."""
    base = cmp.task.variants.get(method, (method,))[0]  # a variant takes its method's rate
    grid = [trained(base, select_seed, lr) for lr in lrs]
    lr, scores = select_lr(grid)
    beyond = beyond_edge(lrs, lr) if cmp.task.check_edge else None
    if beyond is not None:
      grid.append(trained(base, select_seed, beyond))
      lr, scores = select_lr(grid)
    if base == method:  # a variant's runs read its method's grid; the method prunes it
      for r in grid:
        if r["lr"] != lr:
          cmp.drop_weights(r["workdir"])
    selection = {
      "chosen_lr": lr,
      "chosen_by": base,
      "validation_pass@1": {f"{k:g}": v for k, v in scores.items()},
      "edge_checked": beyond,  # the rate tried past the grid's edge, or None
      "at_edge": beyond is not None and lr in (min(scores), max(scores)),  # the rate past the edge won too
      "grid_commands": {f"{r['lr']:g}": r["command"] for r in grid},
      "grid_runs": [{k: r[k] for k in ("lr", "wall_seconds", "metrics")} for r in grid],  # seed 0's curves per rate
    }
    return selection, [cmp.test(trained(method, seed, lr)) for seed in seeds]

  def trained(method, seed, lr):
    """A run; where weights may not outlive the session that trained them, tested at once, in the same slot."""
    if not cmp.task.test_each_run:
      return cmp.train(method, seed, lr)
    _, wd, cmd = cmp.command(method, seed, lr)
    with cmp.slot_for(wd, cmd):
      return cmp.test(cmp.train(method, seed, lr))

  with concurrent.futures.ThreadPoolExecutor(len(seeds) + len(methods) + 1) as pool:
    starts = {s: pool.submit(cmp.start, s) for s in seeds} if cmp.task.test_start else {}  # first: they are short
    for seed in seeds if cmp.warm else ():  # queued first: no core waits for behaviour cloning that another could run
      pool.submit(cmp.warmup, seed)
    done = dict(zip(methods, pool.map(one_method, methods), strict=True))
  return (
    {m: done[m][0] for m in methods},
    [r for m in methods for r in done[m][1]],
    {s: f.result() for s, f in starts.items()},
  )


def pass_keys(run):
  return sorted((k for k in run["test"] if k.startswith("eval/pass@")), key=lambda k: int(k.split("@")[1]))


def summarize(selection, finals, reference="DistIL", starts=None, select_seed=0):
  """Per method: test Pass@k means with 95% t-intervals over seeds; paired differences `reference` minus each; and
  with `starts` (the start's run per seed), each method minus the start, seed by seed (the same seed's test draw),
  and as `start` the selection seed's (or the first seed's) test, the row a single-seed reader compares against."""
  keys = pass_keys(finals[0])
  by = {}
  for r in finals:
    by.setdefault(r["method"], {})[r["seed"]] = r
  table = {}
  for method, runs in by.items():
    rows = [runs[s] for s in sorted(runs)]
    table[method] = {
      **selection[method],
      "seeds": sorted(runs),
      "validation_pass@1_start": stats.mean_ci([r["metrics"][0]["eval/pass@1"] for r in rows]),
      "test": {k.split("/")[1]: stats.mean_ci([r["test"][k] for r in rows]) for k in keys},
      "sampled_tokens_mean": float(np.mean([r["metrics"][-1]["samples/train_tokens"] for r in rows])),
      "wall_seconds_mean": float(np.mean([r["wall_seconds"] for r in rows])),
    }
  differences = {}
  if reference in by:
    for method in by:
      if method != reference:
        differences[method] = {
          k.split("/")[1]: stats.paired(
            {s: r["test"][k] for s, r in by[reference].items()}, {s: r["test"][k] for s, r in by[method].items()}
          )
          for k in keys
        }
  out = {"table": table, f"paired_{reference}_minus": differences}
  if starts:
    start = starts.get(select_seed, next(iter(starts.values())))
    out["start"] = {"seed": start["seed"], "test": start["test"], "test_command": start["test_command"]}
    out["start_by_seed"] = {str(s): r["test"] for s, r in starts.items()}
    start_by = {k: {s: r["test"][k] for s, r in starts.items()} for k in keys}
    out["minus_start"] = {
      m: {k.split("/")[1]: stats.paired({s: r["test"][k] for s, r in runs.items()}, start_by[k]) for k in keys}
      for m, runs in by.items()
    }
  return out


def _band(ax, xs, rows, label):
  """Mean over seeds with its 95% t-interval as a band (the band is omitted with one seed)."""
  cis = [stats.mean_ci(col) for col in np.asarray(rows).T]
  mean = np.array([c["mean"] for c in cis])
  (line,) = ax.plot(xs, mean, marker="o", ms=3, label=label)
  if cis[0]["ci"] is not None:
    ax.fill_between(xs, [c["ci"][0] for c in cis], [c["ci"][1] for c in cis], color=line.get_color(), alpha=0.15)


def plot(finals, expert, out, task="arith"):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  methods = list(dict.fromkeys(r["method"] for r in finals))
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  top = max((k for k in finals[0]["metrics"][-1] if k.startswith("eval/pass@")), key=lambda k: int(k.split("@")[1]))
  for method in methods:
    mine = [r["metrics"] for r in finals if r["method"] == method]
    for ax, key in zip(axes, ("eval/pass@1", top), strict=True):
      # The gain over the run's own start: the seeds' behaviour-cloned starts differ far more than the methods do
      # (README), and every method shares them, so a band around the absolute figure would hide the differences.
      rows = [[(m["samples/train_tokens"], m[key] - run[0][key]) for m in run if key in m] for run in mine]
      n = min(len(x) for x in rows)
      _band(ax, np.mean([[p[0] for p in x[:n]] for x in rows], 0), [[p[1] for p in x[:n]] for x in rows], method)
  for ax, key in zip(axes, ("Pass@1", top.split("/")[1].replace("pass", "Pass")), strict=True):
    ax.set(xlabel="sampled training tokens", ylabel=f"validation {key} minus the start", title=f"{key} gained")
  axes[0].legend(fontsize=8)
  seeds = sorted({r["seed"] for r in finals})
  fig.suptitle(f"{task}, {expert} expert, chosen rates: mean over seeds {seeds}, band = 95% t-interval", fontsize=9)
  fig.tight_layout()
  fig.savefig(os.path.join(out, f"{task}_{expert}_curves.png"), dpi=120)

  fig, ax = plt.subplots(figsize=(5, 3.8))
  keys = pass_keys(finals[0])
  ks = [int(k.split("@")[1]) for k in keys]
  for method in methods:
    _band(ax, ks, [[r["test"][k] for k in keys] for r in finals if r["method"] == method], method)
  ax.set(xscale="log", xlabel="N (samples per prompt)", ylabel="test Pass@N", title="Pass@N at the end (test)")
  ax.set_xticks(ks, [str(k) for k in ks])
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, f"{task}_{expert}_passk.png"), dpi=120)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--task", choices=tuple(TASKS), default="arith", help="arith, or the real model (smollm2)")
  ap.add_argument("--expert", choices=sorted({e for t in TASKS.values() for e in t.settings}), default=None)
  ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the task's (arith 0-4, smollm2 0-2)")
  ap.add_argument("--lrs", type=float, nargs="+", default=None, help="default: the task's grid")
  ap.add_argument("--select_seed", type=int, default=0)
  ap.add_argument("--methods", nargs="+", default=None, help="default: every method of the task")
  ap.add_argument("--out", default="experiments/results")
  ap.add_argument("--workdir", default="/tmp/distil-compare")
  ap.add_argument("--size", default="small")
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--jobs", type=int, default=1, help="runs at once, one core each (see the docstring)")
  ap.add_argument("--record", default=None, help="a folder that outlives the machine: finished runs' figures")
  ap.add_argument(
    "--tag",
    default="",
    help="the setting's runs again under other code (a mended grader: the same configs, other rewards), in their "
    "own folders <setting>-<tag> beside the first ones, which stay as they are; letters, digits and '_'",
  )
  args = ap.parse_args()
  task = TASKS[args.task]
  args.expert = args.expert or next(iter(task.settings))
  args.seeds = args.seeds or list(task.seeds)
  args.lrs = args.lrs or list(task.lrs)
  args.methods = args.methods or list(task.methods)
  for what, value, known in (("--expert", [args.expert], task.settings), ("--size", [args.size], task.sizes)):
    if set(value) - set(known):
      ap.error(f"{what} {value[0]}: task {args.task} has {sorted(known)}")
  if not re.fullmatch(r"\w*", args.tag):
    ap.error(f"--tag {args.tag}: letters, digits and '_' only (it names folders)")
  if set(args.methods) - {*task.methods, *task.variants}:
    ap.error(f"--methods: task {args.task} has {[*task.methods, *task.variants]}")
  handlers = {s: signal.signal(s, processes.pass_signal_on) for s in (signal.SIGTERM, signal.SIGINT)}
  t0 = time.time()
  cmp = Comparison(args.expert, args.workdir, args.smoke, args.size, args.jobs, args.task, args.record, args.tag)
  try:
    selection, finals, starts = run_protocol(cmp, args.methods, args.seeds, args.lrs, args.select_seed)
  finally:
    for s, handler in handlers.items():
      signal.signal(s, handler)
  summary = summarize(selection, finals, starts=starts, select_seed=args.select_seed)
  protocol = {
    "task": args.task,
    "expert": args.expert,
    "preset": task.settings[args.expert],
    "size": args.size,
    "tag": args.tag,
    "lrs": args.lrs,
    "select_seed": args.select_seed,
    "seeds": args.seeds,
    "iterations": cmp.iterations,
    "warmup": cmp.warm,
    "final_eval": cmp.final,
    "interval": "95% Student-t over seeds; paired differences seed by seed with the exact sign test",
    "smoke": args.smoke,
    "jobs": args.jobs,
    "wall_seconds_total": time.time() - t0,
  }
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f"{cmp.label}.json"), "w") as f:
    json.dump({"protocol": protocol, **summary, "runs": finals}, f, indent=1)
  plot(finals, cmp.name, args.out, args.task)
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  main()
