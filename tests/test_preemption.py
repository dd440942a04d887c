"""Stopping at SIGTERM / SIGINT: the iteration in flight is abandoned (before its first update) or finished, the last
completed one is checkpointed, and the resume equals a run that was never stopped; through `main` it is one line and
exit code 0; the SLURM script forwards the signal and requeues."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from run_helpers import ROOT, child_env, load_config, wait_for_file

from distil_jax import build, preemption, train

ARGS = [
  "--config=configs/arith.py:runlocal",
  "--config.log.tensorboard=False",
  "--config.train.iterations=40",
  "--config.checkpoint.every=100",
  "--config.eval.every=100",
]


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _state(workdir, step):
  import orbax.checkpoint as ocp

  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as mgr:
    return mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]


def _buffer(workdir):
  import tensorstore as ts

  folder = os.path.join(workdir, "buffer", "process_0")
  spec = lambda name: {"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(folder, name)}}
  return {n: ts.open(spec(n), open=True).result().read().result() for n in os.listdir(folder) if "." not in n}


def _signal_once(signum, when):
  """A wrapper that sends `signum` to this process the first time `when(*args)` holds, then calls through."""
  sent = []

  def wrap(fn):
    def inner(*args, **kwargs):
      if not sent and when(*args, **kwargs):
        sent.append(signum)
        os.kill(os.getpid(), signum)
      return fn(*args, **kwargs)

    return inner

  return wrap


def test_a_signal_abandons_or_finishes_the_iteration_and_the_resume_is_exact(tmp_path, monkeypatch):
  config = load_config("arith", **{"train.iterations": 4, "checkpoint.every": 4, "eval.every": 4})
  train.train(config, str(tmp_path / "whole"))
  cut = tmp_path / "cut"

  # SIGTERM while iteration 2 is labelled: abandoned before its first update; iteration 1 had no checkpoint.
  group_records = train.rollout_lib.group_records
  when = lambda r, labels, it, **kw: it == 2
  monkeypatch.setattr(train.rollout_lib, "group_records", _signal_once(signal.SIGTERM, when)(group_records))
  with pytest.raises(preemption.Preempted, match=r"^stopped by SIGTERM; iteration 1 is checkpointed in .*") as e:
    train.train(config, str(cut))
  assert e.value.iteration == 1 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone
  assert sorted(os.listdir(cut / "checkpoints")) == ["1"]
  assert [r["iteration"] for r in _metrics(cut)] == [0, 1]
  monkeypatch.setattr(train.rollout_lib, "group_records", group_records)

  # A signal during an update of iteration `at`: finished and saved when iteration `at - 1` has no checkpoint
  # (iteration 3), abandoned when it has one (iteration 4, after checkpoint 3).
  make_update = train.update.make_update
  for signum, at, stopped_at in ((signal.SIGINT, 3, 3), (signal.SIGTERM, 4, 3)):
    in_update = _signal_once(signum, lambda state, batch, teacher, it, kept=None, at=at: int(it) == at)
    monkeypatch.setattr(train.update, "make_update", lambda *a, wrap=in_update, **k: wrap(make_update(*a, **k)))
    name = signal.Signals(signum).name
    with pytest.raises(preemption.Preempted, match=rf"^stopped by {name}; iteration {stopped_at} is checkpointed"):
      train.train(config, str(cut))
    assert sorted(os.listdir(cut / "checkpoints")) == ["1", "3"]
    assert [r["iteration"] for r in _metrics(cut)] == [0, 1, 2, 3]
  monkeypatch.setattr(train.update, "make_update", make_update)
  train.train(config, str(cut))

  strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]
  assert strip(_metrics(cut)) == strip(_metrics(tmp_path / "whole"))
  whole_params, cut_params = _state(tmp_path / "whole", 4), _state(cut, 4)
  for x, y in zip(jax.tree.leaves(whole_params), jax.tree.leaves(cut_params), strict=True):
    np.testing.assert_array_equal(x, y)
  whole, cut = _buffer(tmp_path / "whole"), _buffer(cut)
  assert whole.keys() == cut.keys() and len(whole["reward"]) == 4 * 2
  for name in whole:
    np.testing.assert_array_equal(whole[name], cut[name])


def test_main_stops_at_sigterm_in_one_line_with_exit_code_0(tmp_path):
  env = child_env()
  err_path = tmp_path / "err"
  with open(err_path, "w") as err:
    proc = subprocess.Popen(
      [sys.executable, "-m", "distil_jax.main", *ARGS, f"--workdir={tmp_path / 'run'}"],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=err,
    )
    deadline = time.time() + 300
    metrics_path = tmp_path / "run" / "metrics.jsonl"
    while time.time() < deadline and not (metrics_path.exists() and len(metrics_path.read_text().splitlines()) >= 3):
      assert proc.poll() is None, err_path.read_text()[-3000:]
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    out, _ = proc.communicate(timeout=60)
    took = time.time() - sent
  text = err_path.read_text()
  last = text.strip().splitlines()[-1]
  assert proc.returncode == 0 and "Traceback" not in text and "never awaited" not in text, text[-3000:]
  done = max(r["iteration"] for r in _metrics(tmp_path / "run"))
  assert last == (
    f"distil_jax: stopped by SIGTERM; iteration {done} is checkpointed in {tmp_path / 'run' / 'checkpoints'}: "
    f"run the same command to resume from iteration {done}"
  )
  assert 2 <= done < 40 and os.listdir(tmp_path / "run" / "checkpoints") == [str(done)] and not out.strip()
  assert took < 20, took


def test_slurm_script_forwards_sigterm_and_requeues(tmp_path):
  """The batch script under a fake `srun` (a program that exits 0 at SIGTERM, as main does) and a fake `scontrol`:
  SIGTERM to the batch shell (what `--signal=B:TERM@...` sends) reaches the job step, and the job is requeued."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text(
    "#!/usr/bin/env python3\nimport signal, sys, time\n"
    f"signal.signal(signal.SIGTERM, lambda *a: (open('{tmp_path}/step', 'w').write('TERM'), sys.exit(0)))\n"
    f"open('{tmp_path}/started', 'w').close()\ntime.sleep(60)\nsys.exit(3)\n"
  )
  (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/scontrol\n')
  for name in ("srun", "scontrol"):
    (bin_dir / name).chmod(0o755)
  script = open(os.path.join(ROOT, "launch", "slurm.sbatch")).read()
  assert "#SBATCH --requeue" in script and "#SBATCH --signal=B:TERM@" in script
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", "SLURM_SUBMIT_DIR": ROOT}
  proc = subprocess.Popen(["bash", os.path.join(ROOT, "launch", "slurm.sbatch"), "--workdir=x"], env=env)
  wait_for_file(tmp_path / "started", proc, timeout=30)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=30) == 0
  assert (tmp_path / "step").read_text() == "TERM"
  assert (tmp_path / "scontrol").read_text().split() == ["requeue", "77"]


def test_a_signal_during_set_up_stops_before_any_work(tmp_path, monkeypatch):
  run_build = build.Run.build.__func__
  monkeypatch.setattr(build.Run, "build", classmethod(_signal_once(signal.SIGTERM, lambda *a: True)(run_build)))
  with pytest.raises(preemption.Preempted) as e:
    train.train(load_config("arith"), str(tmp_path))
  assert str(e.value) == (
    "stopped by SIGTERM before the first iteration completed; nothing to resume from: a rerun starts afresh"
  )
  assert (
    e.value.iteration is None
    and not (tmp_path / "checkpoints").exists()
    and not (tmp_path / "metrics.jsonl").read_text()
  )


def test_a_signal_during_behaviour_cloning_keeps_its_steps_and_the_resume_is_exact(tmp_path, monkeypatch):
  """SIGTERM during behaviour-cloning step 2 of 4 (a BC-only run: train.iterations=0): the 2 steps done are saved (they
  used to be lost: "nothing to resume from"), the rerun does only the 2 others and ends with the parameters and
  figures of a BC never stopped; its own checkpoint is gone then."""
  config = load_config("arith", **{"train.iterations": 0, "train.bc_steps": 4, "train.bc_batch": 2})
  config.eval.greedy = False  # one sampler shape fewer to compile
  train.train(config, str(tmp_path / "whole"))
  cut = tmp_path / "cut"

  calls = []
  make_update = train.update.make_update

  def counted(*a, **k):
    step = make_update(*a, **k)
    return lambda *args: (calls.append(1), step(*args))[1]

  in_second = _signal_once(signal.SIGTERM, lambda *args: len(calls) == 1)  # as the second step starts
  monkeypatch.setattr(train.update, "make_update", lambda *a, **k: in_second(counted(*a, **k)))
  with pytest.raises(preemption.Preempted) as e:
    train.train(config, str(cut))
  assert str(e.value) == (
    f"stopped by SIGTERM during behaviour cloning; 2 of its 4 steps are checkpointed in {cut / 'bc'}: run the same "
    "command to go on from there"
  )
  assert len(calls) == 2 and os.listdir(cut / "bc") == ["2"] and not (cut / "checkpoints").exists()
  assert not (cut / "metrics.jsonl").read_text()

  monkeypatch.setattr(train.update, "make_update", counted)
  calls.clear()
  train.train(config, str(cut))
  assert len(calls) == 2 and not (cut / "bc").exists()  # steps 3 and 4 only
  strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]
  assert strip(_metrics(cut)) == strip(_metrics(tmp_path / "whole"))
  assert _metrics(cut)[0]["bc/steps"] == 4 and "before_bc/eval/pass@1" in _metrics(cut)[0]
  for x, y in zip(jax.tree.leaves(_state(tmp_path / "whole", 0)), jax.tree.leaves(_state(cut, 0)), strict=True):
    np.testing.assert_array_equal(x, y)
