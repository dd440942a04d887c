"""Multi-process start-up from the launcher's variables, and a watchdog that stops every process when one dies.

Where the processes meet: `--coordinator_address`, `--num_processes`, `--process_id`, else the variables
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (this jax reads only the first of them itself), else
jax's own cluster detection (Cloud TPU metadata, SLURM, Open MPI).

Why a watchdog: when a process dies, its peers block in the next collective. jax's coordination service notices
the missing heartbeats only after its timeout (100 s by default) and then aborts with a C++ stack trace; a gloo
collective may instead fail at once with "Connection reset by peer", which names no process. Each process here
publishes a counter in the coordination service's key-value store every second and reads those of its two
neighbours on a ring (a constant load per process at any scale): a counter that stops for `timeout_s`, or a
neighbour that reports it stopped with an error, is posted under one stop key that every process reads at each beat;
that, or a coordinator that no longer answers, ends every process within seconds with one line naming the culprit.
jax's own heartbeat timeout is set above ours, so that ours speaks first.

One case is jax's alone: when the coordinator (process 0) dies, the coordination client in every other process
aborts at once from C++ (a fatal log line and a stack trace; a Python callback for it is not usable in this jax:
`missed_heartbeat_callback` fails with std::bad_cast), before the watchdog's next beat. So that this too reads as
one line, a small child process forwards stderr and folds that report into one line, worded by the same function as
the watchdog's (`peer_gone`): "process 0 of N (the coordinator) died (...)" when its connection closed (the kernel
closes a killed process's sockets), "stopped responding (...)" otherwise. The process still ends by jax's abort
(SIGABRT: exit status 134), which Python cannot intercept.
"""

from __future__ import annotations

import os
import re
import select
import signal
import sys
import threading
import time

from distil_jax.errors import InputError

ENV = {"address": "JAX_COORDINATOR_ADDRESS", "count": "JAX_NUM_PROCESSES", "index": "JAX_PROCESS_ID"}
_PREFIX = "distil_jax/alive/"
_STOP = "distil_jax/stop"
_DONE, _FAILED = "done", "failed"
_FAILED_WORDS = "stopped with an error (see its output)"  # how peers name a process that posted _FAILED
_watchdog: _Watchdog | None = None


def _from_env(name: str, environ) -> int | None:
  raw = environ.get(name)
  if raw in (None, ""):
    return None
  try:
    return int(raw)
  except ValueError:
    raise InputError(f"{name}={raw!r} is not an integer") from None


def settings(address=None, count=None, index=None, environ=os.environ) -> dict:
  """Arguments for `jax.distributed.initialize`: flags first, then the environment; what is still None is left to
  jax's cluster detection."""
  return {
    "coordinator_address": address or environ.get(ENV["address"]) or None,
    "num_processes": count if count is not None else _from_env(ENV["count"], environ),
    "process_id": index if index is not None else _from_env(ENV["index"], environ),
  }


def initialize(address=None, count=None, index=None, *, timeout_s: float = 10.0) -> None:
  """Join the other processes and start the watchdog (`timeout_s`: how long a silent peer is given)."""
  import jax

  kwargs = settings(address, count, index)
  _fold_fatal_reports(kwargs["process_id"], kwargs["num_processes"])
  try:
    jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=int(timeout_s) + 30)
  except (ValueError, TypeError) as e:  # jax's own checks of the three settings
    given = ", ".join(f"{k}={v}" for k, v in kwargs.items() if v is not None) or "nothing"
    raise InputError(
      f"--distributed: {e} (given: {given}). Pass --coordinator_address, --num_processes and --process_id, or set "
      f"{', '.join(ENV.values())}, or run where jax detects the cluster (Cloud TPU, SLURM, Open MPI)"
    ) from None
  from jax._src import distributed  # the coordination client: jax has no public handle on it

  global _watchdog
  _watchdog = _Watchdog(distributed.global_state.client, jax.process_index(), jax.process_count(), timeout_s)
  _watchdog.start()


def finish(ok: bool) -> None:
  """Tell the peers this process is done (or failed) and stop watching them; call before exiting. Process 0 then
  waits (up to the peer timeout) until every peer has said so too: it hosts the coordination service, and a peer
  that still needs it when it leaves would stop with jax's abort instead of its own message (e.g. every process
  refusing the same bad input at once)."""
  if _watchdog is not None:
    _watchdog.stop(_DONE if ok else _FAILED)
    if _watchdog.index == 0:
      _watchdog.wait_for_peers()


def blame_peer_or_return(grace_s: float | None = None) -> None:
  """After an unexpected error in a multi-process run: give the watchdog time to find a dead peer (it then ends the
  process with one line naming it); return when every peer is still alive (the error is this process's own)."""
  if _watchdog is not None:
    deadline = time.monotonic() + (grace_s if grace_s is not None else _watchdog.timeout_s + 2 * _watchdog.interval_s)
    while time.monotonic() < deadline and _watchdog.is_alive():
      time.sleep(0.1)


def peer_gone(peer: int, count: int | None, how: str) -> str:
  """How a dead or failed process is named, by the watchdog and in jax's own report of a dead coordinator (process 0
  hosts the coordination service: it is named as such). `count`: None where it is not known (jax's cluster
  detection, before it ran)."""
  who = f"process {peer}" + (f" of {count}" if count else "") + (" (the coordinator)" if peer == 0 else "")
  return f"{who} {how}"


_CLOSED = re.compile(r"Socket closed|Connection reset by peer|Connection refused|Broken pipe", re.IGNORECASE)


def coordinator_gone(error: str, count: int | None) -> str:
  """Process 0 named from the error of a call to its coordination service (jax's fatal report, or an exception of
  the key-value store): dead when its connection closed, else silent."""
  closed = _CLOSED.search(error)
  if closed:
    return peer_gone(0, count, f"died (its connection closed: {closed[0]})")
  first = (error.strip().splitlines() or ["no reply"])[0][:200]
  return peer_gone(0, count, f"stopped responding ({first})")


def exit_now(message: str, code: int = 1, *, failed: bool = False) -> None:
  """Print one line and leave at once: a normal exit would wait in jax's shutdown barrier for peers that are gone,
  then print pages of C++ logs. `failed`: then tell the peers this process failed (after the line is out: once they
  know, process 0 may leave, and the coordination errors that follow would hold this process's output back)."""
  sys.stdout.flush()
  print(message, file=sys.stderr, flush=True)
  if failed:
    finish(ok=False)
  import logging

  for handler in logging.getLogger().handlers:
    handler.flush()
  os._exit(code)


class _Watchdog(threading.Thread):
  """Beats once a second in the key-value store and watches two neighbours on a ring of the processes (O(1) reads
  per process, whatever the process count); whoever finds a neighbour dead or failed posts the reason under one stop
  key, which every process reads at each beat."""

  def __init__(self, client, index: int, count: int, timeout_s: float, interval_s: float = 1.0):
    super().__init__(name="distil_jax-watchdog", daemon=True)
    self.client, self.index, self.count = client, index, count
    self.timeout_s, self.interval_s = timeout_s, interval_s
    self.leave_after_s = 1.0
    self.neighbours = sorted({(index + d) % count for d in (1, 2)} - {index})
    self._stopped = threading.Event()

  def stop(self, state: str) -> None:
    self._stopped.set()
    self.join()
    try:
      self.client.key_value_set(_PREFIX + str(self.index), state, allow_overwrite=True)
      if state == _FAILED:
        self._post(peer_gone(self.index, self.count, _FAILED_WORDS))
    except Exception:  # the coordinator is gone too; nobody is left to tell
      pass

  def wait_for_peers(self) -> None:
    deadline = time.monotonic() + self.timeout_s
    waiting = set(range(1, self.count))
    while waiting and time.monotonic() < deadline:
      try:
        waiting = {p for p in waiting if self._get(_PREFIX + str(p)) not in (_DONE, _FAILED)}
      except Exception:  # the service is going away: nothing left to wait for
        return
      if waiting:
        time.sleep(0.05)
    time.sleep(self.leave_after_s)  # a peer posts its state, then exits: it must not see this process gone first

  def _post(self, why: str) -> None:
    self.client.key_value_set(_STOP, why, allow_overwrite=False)

  def _get(self, key: str):
    try:
      return self.client.key_value_try_get(key)
    except Exception as e:
      if "NOT_FOUND" in str(e):
        return None
      raise

  def _stop_all(self, why: str, *, post: bool = True) -> None:
    if post:
      try:
        self._post(why)
      except Exception:  # another process posted first, or the coordinator is gone: this process still stops
        pass
    exit_now(f"distil_jax: {why}; stopping process {self.index} too")

  def run(self) -> None:
    seen = {p: (None, time.monotonic()) for p in self.neighbours}
    beat = 0
    while not self._stopped.wait(self.interval_s):
      beat += 1
      try:
        self.client.key_value_set(_PREFIX + str(self.index), str(beat), allow_overwrite=True)
        posted = self._get(_STOP)
        values = {p: self._get(_PREFIX + str(p)) for p in self.neighbours}
      except Exception as e:  # the coordination service (process 0) no longer answers
        if self._stopped.is_set():
          return
        self._stop_all(coordinator_gone(str(e) or type(e).__name__, self.count), post=False)
      if posted is not None and not self._stopped.is_set():
        self._stop_all(posted, post=False)
      now = time.monotonic()
      for peer, value in values.items():
        last, since = seen[peer]
        if value == _FAILED:
          self._stop_all(peer_gone(peer, self.count, _FAILED_WORDS))
        elif value == _DONE:
          continue
        elif value != last:
          seen[peer] = (value, now)
        elif now - since > self.timeout_s:
          self._stop_all(peer_gone(peer, self.count, f"stopped responding (no sign of life for {self.timeout_s:g} s)"))


_FATAL = b"Terminating process because the JAX distributed service detected fatal errors"
_COORDINATION = re.compile(rb"coordination|preemption_sync")
_C_LOG = re.compile(rb"^[IWEF]\d{4} ")  # glog's line prefix: such a line is written whole, wait for its end
_STACK = b"*** Check failure stack trace"  # where jax's fatal report ends and its stack trace begins


def _fold_fatal_reports(index, count=None) -> None:
  """Route this process's stderr through a child that passes everything on at once, except jax's fatal coordination
  report, which becomes one line (and the stack trace after it, nothing)."""
  read_fd, write_fd = os.pipe()
  if os.fork() == 0:  # the filter: only os.read / os.write, safe in a forked child
    try:
      os.close(write_fd)
      # Ctrl-C and a scheduler's SIGTERM (sent to every process of the job step) are for the trainer: the filter
      # drains its last words, and ends when the trainer's end closes the pipe
      signal.signal(signal.SIGINT, signal.SIG_IGN)
      signal.signal(signal.SIGTERM, signal.SIG_IGN)
      _filter(read_fd, 2, "?" if index is None else index, count=count)
    finally:
      os._exit(0)
  os.close(read_fd)
  os.dup2(write_fd, 2)
  os.close(write_fd)


def fatal_line(report: bytes, index, count=None) -> bytes:
  """The one line that replaces jax's fatal report (`report`: its first line, and the gRPC details that follow it,
  up to the stack trace)."""
  first, _, details = report.partition(b"\n")
  status = first.split(b"absl::Status:", 1)[-1].decode(errors="replace").strip()
  task = re.search(r"Task (\d+) heartbeat timeout|stopped sending heartbeats\):\s*(\d+)", status)
  if task:
    what = peer_gone(int(task[1] or task[2]), count, "stopped responding (jax's heartbeat timeout)")
  elif "leader" in status or "coordination service" in status:
    what = coordinator_gone(status + "\n" + details.decode(errors="replace"), count)
  else:
    what = f"jax's coordination service reported a fatal error ({status[:200]})"
  return f"distil_jax: {what}; stopping process {index} too\n".encode()


def _filter(src: int, dst: int, index, hold_s: float = 2.0, *, count=None, details_s: float = 1.0) -> None:
  """Copy `src` to `dst` as it comes. A C++ log line from the coordination machinery (they precede jax's fatal report:
  failed RPCs, preemption notices) and whatever follows it are held for `hold_s`: dropped if the fatal report comes,
  passed on otherwise. The fatal report's gRPC details (up to its stack trace, at most `details_s`) are read before
  its line is written: they say whether the coordinator's connection closed."""
  pending, held, deadline = b"", [], None
  while True:
    wait = None if deadline is None else max(0.0, deadline - time.monotonic())
    if not select.select([src], [], [], wait)[0]:  # the hold expired without a fatal report
      os.write(dst, b"".join(held))
      held, deadline = [], None
      continue
    chunk = os.read(src, 1 << 16)
    if not chunk:
      break
    *lines, pending = (pending + chunk).split(b"\n")
    out = []
    for i, line in enumerate(lines):
      if _FATAL in line:
        report = b"\n".join([line, *lines[i + 1 :], pending])
        until = time.monotonic() + details_s
        while _STACK not in report and select.select([src], [], [], max(0.0, until - time.monotonic()))[0]:
          more = os.read(src, 1 << 16)
          if not more:
            break
          report += more
        os.write(dst, b"".join(out) + fatal_line(report.split(_STACK, 1)[0], index, count))
        while os.read(src, 1 << 16):  # the rest is the C++ stack trace
          pass
        return
      if deadline is None and _C_LOG.match(line) and _COORDINATION.search(line):
        deadline = time.monotonic() + hold_s
      (held if deadline is not None else out).append(line + b"\n")
    if pending and not _C_LOG.match(pending):  # e.g. a progress bar's "\r..." update
      (held if deadline is not None else out).append(pending)
      pending = b""
    if out:
      os.write(dst, b"".join(out))
  os.write(dst, b"".join(held) + pending)
