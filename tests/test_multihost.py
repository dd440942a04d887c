"""Two CPU processes on 127.0.0.1: a short training started from the launcher's variables, global figures, a resume
with another process count refused, and a dead peer that stops the other within seconds, named in one line."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from run_helpers import ROOT, child_env

from distil_jax import multihost, tokenizer

ARGS = [
  "--config=configs/arith.py:runlocal",
  "--config.log.tensorboard=False",
  "--config.eval.greedy=False",  # one sampler shape fewer to compile
]


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, *args, processes=2, port=None, peer_timeout_s=5, only=None):
  """`processes` copies of main, told where they are only through JAX_* variables; stderr to files. `only`:
  {process index: more arguments for it alone}."""
  port = port or _port()
  procs = []
  for index in range(processes):
    env = child_env()
    flags = []
    if processes > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes))
      env["JAX_PROCESS_ID"] = str(index)
      flags = ["--distributed", f"--peer_timeout_s={peer_timeout_s}"]
    err = open(os.path.join(workdir.parent, f"{workdir.name}.{processes}.{index}.err"), "w")
    mine = (only or {}).get(index, [])
    cmd = [sys.executable, "-m", "distil_jax.main", *flags, *ARGS, *args, *mine, f"--workdir={workdir}"]
    # a session of its own: a signal to its process group reaches the trainer and its stderr filter, as SLURM's does
    popen = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    procs.append((popen, err))
  return procs


def _finish(procs, timeout=400):
  out = []
  for proc, err in procs:
    proc.wait(timeout=timeout)
    err.close()
    with open(err.name) as f:
      out.append((proc.returncode, f.read()))
  return out


def _metrics(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def _buffer(workdir, process):
  import tensorstore as ts

  folder = workdir / "buffer" / f"process_{process}"
  spec = lambda name: {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(folder / name)}}
  names = ("tokens", "mask", "reward", "iteration")
  return {name: ts.open(spec(name), open=True).result().read().result() for name in names}


def test_settings_come_from_flags_then_the_launchers_variables():
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert multihost.settings(environ=env) == {
    "coordinator_address": "10.0.0.1:1234",
    "num_processes": 4,
    "process_id": 3,
  }
  flags = multihost.settings("h:1", 2, 0, environ=env)
  assert flags == {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0}
  assert multihost.settings(environ={}) == {"coordinator_address": None, "num_processes": None, "process_id": None}
  with pytest.raises(multihost.InputError, match="JAX_NUM_PROCESSES='two' is not an integer"):
    multihost.settings(environ={"JAX_NUM_PROCESSES": "two"})


def test_fatal_coordination_report_folds_into_one_line():
  """jax's C++ abort when the coordinator dies (text as jax 0.10.2 prints it), fed through the stderr filter: one line
  naming process 0 as the watchdog names any other dead peer (it used to read "the coordinator (process 0) stopped
  responding", worded apart from the watchdog's lines)."""
  report = (
    b"I1124 03:49:12.000000 1 other.cc:1] kept\n"
    b"\rprogress 3/10"
    b"\nW1124 03:49:13.076129 3417 preemption_sync_manager.cc:147] Failed to retrieve preemption notice from "
    b"coordination service: UNAVAILABLE: Socket closed\nAdditional GRPC error information\n"
    b"F1124 03:49:13.570414 1 client.h:80] Terminating process because the JAX distributed service detected fatal "
    b"errors. This most likely indicates that another task died. absl::Status: UNAVAILABLE: Failed to send RPC to "
    b"coordination service. Either the leader task was preempted/died/restarted unexpectedly\n"
    b"Additional GRPC error information from remote target coordination_service while calling "
    b"/xla.coordination.CoordinationService/PollForError:\n"
    b':UNKNOWN:Error received from peer  {grpc_status:14, grpc_message:"Socket closed"}\n'
    b"*** Check failure stack trace: ***\n    @     0x7fb737840634  absl::LogMessage::SendToLog()\n"
  )

  def filtered(text):
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    os.write(src_w, text)
    os.close(src_w)
    multihost._filter(src_r, dst_w, 1, count=2)
    os.close(dst_w)
    return os.read(dst_r, 1 << 16).decode()

  kept = "I1124 03:49:12.000000 1 other.cc:1] kept\n\rprogress 3/10\n"
  assert filtered(report) == (
    kept + "distil_jax: process 0 of 2 (the coordinator) died (its connection closed: Socket closed); stopping "
    "process 1 too\n"
  )
  # Without a closed connection in its details (e.g. a network fault): silent, not dead; the status says why.
  silent = report.replace(b"Socket closed", b"Deadline Exceeded")
  assert filtered(silent) == (
    kept + "distil_jax: process 0 of 2 (the coordinator) stopped responding (UNAVAILABLE: Failed to send RPC to "
    "coordination service. Either the leader task was preempted/died/restarted unexpectedly); stopping process 1 too\n"
  )
  heartbeat = b"F1 client.h:80] " + multihost._FATAL + b" absl::Status: UNAVAILABLE: Task 3 heartbeat timeout."
  assert multihost.fatal_line(heartbeat, 0, 4) == (
    b"distil_jax: process 3 of 4 stopped responding (jax's heartbeat timeout); stopping process 0 too\n"
  )


_PEER = """
import sys, time
from distil_jax import multihost
multihost.initialize(timeout_s=5)
print("joined", flush=True)
time.sleep(60)
"""


def test_a_killed_coordinator_is_named_like_any_other_peer(tmp_path):
  """Two processes that only join (no training): process 0 gets SIGKILL; process 1 stops within seconds with one
  line naming process 0, worded as the watchdog names a dead peer."""
  port, procs = _port(), []
  for index in range(2):
    env = child_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2")
    env.update(JAX_PROCESS_ID=str(index), PYTHONPATH=ROOT)
    err = open(tmp_path / f"{index}.err", "w")
    cmd = [sys.executable, "-c", _PEER]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, start_new_session=True))
  for proc, _ in zip(procs, range(2), strict=True):
    assert proc.stdout.readline() == b"joined\n", (tmp_path / "0.err").read_text() + (tmp_path / "1.err").read_text()
  procs[0].kill()
  killed = time.time()
  procs[1].wait(timeout=60)
  took = time.time() - killed
  for proc in procs:
    proc.wait()
    proc.stdout.close()
  err = (tmp_path / "1.err").read_text()
  closed = "Socket closed|Connection reset by peer|Connection refused|Broken pipe"  # gRPC's words (this jax: the first)
  line = (
    rf"distil_jax: process 0 of 2 \(the coordinator\) died \(its connection closed: ({closed})\); stopping process 1"
  )
  assert procs[1].returncode != 0 and re.fullmatch(line + " too\n", err), (procs[1].returncode, err[-3000:])
  assert took < 10, took


@pytest.mark.slow
def test_two_processes_train_with_global_figures_and_refuse_another_count(tmp_path):
  workdir = tmp_path / "run"
  results = _finish(_start(workdir, "--config.eval.every=2"))
  for rc, err in results:
    assert rc == 0, err[-3000:]
    assert "Traceback" not in err and "INFO" not in err and not any(line.startswith("I1") for line in err.splitlines())
  rows = _metrics(workdir)
  assert [r["iteration"] for r in rows] == [0, 1, 2]
  # The figures are those of both processes' rows, read back from their buffers.
  buffers = [_buffer(workdir, p) for p in (0, 1)]
  stop_ids = tokenizer.SentencePieceTokenizer.from_file(str(workdir / "tokenizer.model")).stop_ids
  tokens = 0
  for r in rows[1:]:
    mine = [{k: v[b["iteration"] == r["iteration"]] for k, v in b.items()} for b in buffers]
    assert [len(m["mask"]) for m in mine] == [1, 1]  # runlocal: 2 prompts per iteration, 1 on each process
    mask = np.concatenate([m["mask"] for m in mine])
    reward = np.concatenate([m["reward"] for m in mine])
    tokens += int(mask.sum())
    assert r["buffer/rows"] == 2 * r["iteration"]  # both processes' rows
    assert r["samples/train_tokens"] == tokens
    np.testing.assert_allclose(r["rollout/length"], mask.sum(-1).mean(), rtol=1e-6)
    np.testing.assert_allclose(r["rollout/reward"], reward.mean(), rtol=1e-6)
    responses = np.concatenate([m["tokens"] for m in mine]).reshape(-1, mask.shape[-1])
    lengths = mask.reshape(-1, mask.shape[-1]).sum(-1)
    cut = np.mean([n == 0 or int(t[n - 1]) not in stop_ids for t, n in zip(responses, lengths, strict=True)])
    np.testing.assert_allclose(r["rollout/cut"], cut, rtol=1e-6)  # each response's last token, one by one
  assert sorted(os.listdir(workdir / "logs")) == ["distil_jax.process_0.log", "distil_jax.process_1.log"]

  ((rc, err),) = _finish(_start(workdir, "--config.train.iterations=3", processes=1))
  last = err.strip().splitlines()[-1]
  assert rc != 0 and "was written by 2 processes, this run has 1" in last, last
  assert _metrics(workdir) == rows  # nothing written


@pytest.mark.slow
def test_a_dead_peer_stops_the_other_within_seconds_naming_it(tmp_path):
  workdir = tmp_path / "run"
  procs = _start(workdir, "--config.train.iterations=50", "--config.eval.every=100", peer_timeout_s=5)
  deadline = time.time() + 300
  while time.time() < deadline and not ((workdir / "metrics.jsonl").exists() and len(_metrics(workdir)) >= 2):
    assert all(p.poll() is None for p, _ in procs), _finish(procs)
    time.sleep(0.1)
  procs[1][0].kill()
  killed = time.time()
  procs[0][0].wait(timeout=60)
  took = time.time() - killed
  (rc, err), _ = _finish(procs)
  last = err.strip().splitlines()[-1]
  assert rc != 0 and "process 1 of 2 stopped responding" in last and "stopping process 0 too" in last, err[-3000:]
  assert took < 5 + 10, took  # the peer timeout, plus a watchdog beat and the exit


@pytest.mark.slow
def test_processes_refuse_different_configs_and_stop_together_at_sigterm(tmp_path):
  """Another train.iterations on one process: both refuse at start in one line (they used to hang). SIGTERM to
  process 1's process group alone (jax.distributed installs its own SIGTERM handler; ours replaces it): both stop
  after the same iteration, save it and exit 0."""
  workdir = tmp_path / "run"
  for rc, err in _finish(_start(workdir, only={1: ["--config.train.iterations=5"]}), timeout=120):
    last = err.strip().splitlines()[-1]
    assert rc != 0 and last == (
      "distil_jax: ConfigError: the processes were started with different configs: train.iterations is 2 on "
      "process 0, 5 on process 1"
    ), err[-3000:]
  assert not workdir.exists()

  procs = _start(workdir, "--config.train.iterations=40", "--config.eval.every=100", "--config.checkpoint.every=100")
  deadline = time.time() + 300
  while time.time() < deadline and not ((workdir / "metrics.jsonl").exists() and len(_metrics(workdir)) >= 3):
    assert all(p.poll() is None for p, _ in procs), _finish(procs)
    time.sleep(0.05)
  os.killpg(procs[1][0].pid, signal.SIGTERM)  # the trainer and its stderr filter, as srun / slurmstepd do
  results = _finish(procs, timeout=120)
  done = _metrics(workdir)[-1]["iteration"]
  assert [rc for rc, _ in results] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
  assert "Traceback" not in results[0][1] + results[1][1]
  assert results[0][1].strip().splitlines()[-1] == (
    f"distil_jax: stopped by a signal to another process; iteration {done} is checkpointed in "
    f"{workdir / 'checkpoints'}: run the same command to resume from iteration {done}"
  )
  assert 2 <= done < 40 and os.listdir(workdir / "checkpoints") == [str(done)]
  assert [len(_buffer(workdir, p)["mask"]) for p in (0, 1)] == [done, done]


class _FakeCoordinator:
  """The coordination service's key-value store, in memory, with its error for a missing key."""

  def __init__(self):
    self.store, self.lock = {}, threading.Lock()

  def key_value_set(self, key, value, allow_overwrite=False):
    with self.lock:
      if key in self.store and not allow_overwrite:
        raise RuntimeError(f"ALREADY_EXISTS: {key}")
      self.store[key] = value

  def key_value_try_get(self, key):
    with self.lock:
      if key not in self.store:
        raise RuntimeError(f"NOT_FOUND: Config key {key} not found.")
      return self.store[key]


def test_watchdogs_of_many_processes_all_stop_naming_the_dead_one(monkeypatch):
  """Six processes, each watching two neighbours on a ring: process 4 stops beating; all five others stop within
  the timeout and a few beats, each naming process 4 (most learn it from the stop key, not from watching it)."""
  said = {}
  monkeypatch.setattr(
    multihost, "exit_now", lambda message, code=1: said.setdefault(threading.current_thread().name, message)
  )
  coordinator = _FakeCoordinator()
  dogs = [multihost._Watchdog(coordinator, i, 6, timeout_s=0.3, interval_s=0.02) for i in range(6)]
  for i, dog in enumerate(dogs):
    dog.name = f"process {i}"
    dog.start()
  time.sleep(0.1)
  dogs[4]._stopped.set()  # killed: it beats no more (and says nothing)
  alive = [d for i, d in enumerate(dogs) if i != 4]
  deadline = time.time() + 5
  while time.time() < deadline and len(said) < 5:
    time.sleep(0.02)
  for dog in alive:  # exit_now was replaced, so the threads go on: stop them
    dog._stopped.set()
  assert sorted(said) == [f"process {i}" for i in (0, 1, 2, 3, 5)]
  for name, message in said.items():
    assert message == f"distil_jax: process 4 of 6 stopped responding (no sign of life for 0.3 s); stopping {name} too"
  assert coordinator.store["distil_jax/stop"].startswith("process 4 of 6 stopped responding")


def test_a_watchdog_names_a_coordinator_whose_connection_closed(monkeypatch):
  """The watchdog's own path to the same line: its key-value call to process 0 fails (the text as jax raises it)."""
  monkeypatch.setattr(multihost, "exit_now", lambda message, code=1: pytest.fail(message, pytrace=False))

  class Gone(_FakeCoordinator):
    def key_value_set(self, key, value, allow_overwrite=False):
      raise RuntimeError(
        "UNAVAILABLE: Failed to send RPC to coordination service.\nAdditional GRPC error information from remote "
        "target coordination_service:\n"
        ':UNKNOWN:Error received from peer  {grpc_status:14, grpc_message:"Socket closed"}'
      )

  dog = multihost._Watchdog(Gone(), 2, 3, timeout_s=5, interval_s=0.01)
  with pytest.raises(pytest.fail.Exception) as stopped:  # the watchdog's loop, run here until it stops the process
    dog.run()
  assert str(stopped.value) == (
    "distil_jax: process 0 of 3 (the coordinator) died (its connection closed: Socket closed); stopping process 2 too"
  )
