"""The training processes an orchestrator (`arith_comparison`) starts: each a `python -m distil_jax.main` of its own,
holding its workdir's lock, its wall time recorded as it runs, on a run slot (`Cores`); a SIGTERM / SIGINT to the
orchestrator stops them at their safe points (`pass_signal_on`), so that the next invocation resumes them exactly.
"""

import collections
import fcntl
import os
import subprocess
import sys
import threading
import time

WALL_EVERY = 60  # seconds between the wall-time records of a running run (`main_process`)


_LIVE = set()  # the runs this process has started: a SIGTERM / SIGINT to the orchestrator is passed on to them
_STOPPING = threading.Event()  # set at that signal: no further run starts
_STARTING = threading.Lock()  # a run being started when the signal comes is either refused or in _LIVE


def pass_signal_on(signum, frame):
  """Stop the runs at their safe points (each saves its last iteration and exits 0), then stop: the next invocation
  resumes them exactly instead of finding them half-written or still running. A signal while that is under way
  changes nothing: the handler would re-enter inside its own `p.wait()`, whose lock is not reentrant, and hang."""
  if _STOPPING.is_set():
    os.write(2, b"arith_comparison: already stopping; the runs stop at their safe points\n")
    return
  _STOPPING.set()
  with _STARTING:  # held by worker threads only, never by the main thread this handler runs in
    live = list(_LIVE)
  for p in live:
    p.send_signal(signum)  # once: a second signal would end the run at once, not at its safe point
  for p in live:
    p.wait()
  sys.exit(128 + signum)


def main_process(args, log, core=None, elapsed=None, on_start=None):
  """`python -m distil_jax.main ARGS` in a fresh process (on CPU `core` alone if given), its output streamed to `log`;
  the wall time in seconds. `elapsed(seconds)` is called every WALL_EVERY seconds while it runs, so that a run killed
  with its orchestrator (a session's end) keeps all but the last interval of its wall time. The process holds a lock
  on its workdir for its whole life (an inherited descriptor), so a second orchestrator started while an earlier
  one's run is still going refuses it instead of writing beside it. `on_start()` is called just before the process
  starts, and never once a signal has stopped the orchestrator, so a run's `commits` names only code that ran (a
  process that then fails to start at all leaves its line, and the orchestrator stops on that error).
  The environment passes through as given, XLA_FLAGS included (a user's compile flags apply to every run)."""
  env = {"JAX_PLATFORMS": "cpu", **os.environ}
  pin = ["taskset", "-c", str(core)] if core is not None else []
  workdir = next((a.split("=", 1)[1] for a in args if a.startswith("--workdir=")), None)
  os.makedirs(workdir, exist_ok=True)
  lock = os.open(os.path.join(workdir, ".orchestrator.lock"), os.O_CREAT | os.O_RDWR)
  try:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise RuntimeError(f"{workdir} is in use by another process (an earlier orchestrator's run?)") from None
    t = time.time()
    with open(log, "a") as f:
      with _STARTING:
        if _STOPPING.is_set():
          raise RuntimeError("stopping at a signal: not started")
        if on_start is not None:
          on_start()
        p = subprocess.Popen(
          [*pin, sys.executable, "-m", "distil_jax.main", *args], env=env, stdout=f, stderr=subprocess.STDOUT,
          pass_fds=(lock,),
        )  # fmt: skip
        _LIVE.add(p)
      try:
        while (code := _wait(p, WALL_EVERY)) is None:
          if elapsed is not None:
            elapsed(time.time() - t)
      finally:
        _LIVE.discard(p)
  finally:
    os.close(lock)
  if code:
    with open(log) as f:
      last = (f.read().strip().splitlines() or ["?"])[-1]
    raise RuntimeError(f"run failed ({log}): {last}")
  return time.time() - t


def _wait(p, seconds):
  """The process's exit code, or None if it is still running after `seconds`."""
  try:
    return p.wait(timeout=seconds)
  except subprocess.TimeoutExpired:
    return None


class Cores:
  """The run slots, handed out in the order they were asked for. A queue.Queue hands a freed core to whichever thread
  asks next, which is usually the thread that just freed it (it holds the GIL): one method then ran all its runs
  before another started. First come, first served makes the methods of a stage take turns, so that each has a
  table's worth of runs at about the same time."""

  def __init__(self, cores):
    self._free = collections.deque(cores)
    self._waiting = collections.deque()  # one token per thread asking, oldest first
    self._changed = threading.Condition()

  def get(self):
    with self._changed:
      token = object()
      self._waiting.append(token)
      self._changed.wait_for(lambda: self._free and self._waiting[0] is token)
      self._waiting.popleft()
      self._changed.notify_all()  # the next in line may find a core too
      return self._free.popleft()

  def put(self, core):
    with self._changed:
      self._free.append(core)
      self._changed.notify_all()
