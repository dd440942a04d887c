"""Stopping cleanly at SIGTERM or SIGINT: what a preempted TPU VM, a SLURM job near its limit (`--signal`), a
Kubernetes pod being evicted (SIGTERM, then SIGKILL after a grace period: 30 s by default) or Ctrl-C sends.

Why a flag and not an exception: Python delivers a signal between two bytecodes of the main thread, wherever it is
(inside orbax's asynchronous save, a Grain iterator, tensorstore's futures). An exception raised there leaves a half
state behind (the `KeyboardInterrupt` traceback, "coroutine ... was never awaited"). The handler only records the
signal; the loop asks `requested()` at points where stopping is safe, and there either abandons the iteration in
flight (nothing of it is kept: a resume replays it) or finishes it, then saves the last completed iteration.

Why agreement: on a multi-process run the processes must stop after the same iteration (the checkpoint save is a
collective, and a process that trained on would wait for its peers forever). `requested()` is therefore itself a
collective on such a run: every process calls it at the same points and all get the same answer, true when any one
of them was signalled. jax's coordination service installs its own SIGTERM handler in `jax.distributed.initialize`
(its preemption notifier, which only the `reached_preemption_sync_point` API reads); `Stopper.install`, called after
it, replaces it, so that SIGTERM reaches this flag whichever launcher sent it.

A second signal while stopping ends the process at once with one line (the checkpoint then is the last one saved).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):  # noqa: N818 (not an error: the run stopped where it was asked to)
  """The run stopped at a signal; `main.py` prints the message as one line and exits 0."""

  def __init__(self, signame: str, iteration: int | None, checkpoint_dir: str, *, bc: tuple[int, int] | None = None):
    """`bc`: (steps done, steps in all) when it stopped during behaviour cloning (saved in `checkpoint_dir`)."""
    self.signame, self.iteration = signame, iteration
    if bc is not None:
      text = f"stopped by {signame} during behaviour cloning; {bc[0]} of its {bc[1]} steps are checkpointed in "
      text += f"{checkpoint_dir}: run the same command to go on from there"
    elif iteration is None:
      text = f"stopped by {signame} before the first iteration completed; nothing to resume from: a rerun starts afresh"
    else:
      text = f"stopped by {signame}; iteration {iteration} is checkpointed in {checkpoint_dir}: "
      text += f"run the same command to resume from iteration {iteration}"
    super().__init__(text)


class Stopper:
  """Records SIGTERM / SIGINT while installed (a context manager); the previous handlers come back on exit."""

  def __init__(self):
    self.signum: int | None = None
    self._previous = {}

  @property
  def signame(self) -> str:
    return signal.Signals(self.signum).name if self.signum is not None else "a signal to another process"

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:  # a second signal: the user (or the scheduler) will not wait
      sys.stderr.write(f"\ndistil_jax: second {signal.Signals(signum).name} while stopping: exiting now\n")
      sys.stderr.flush()
      os._exit(128 + signum)
    self.signum = signum

  def install(self) -> Stopper:
    if threading.current_thread() is threading.main_thread():  # signal handlers can be set from there only
      for s in SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def restore(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def __enter__(self):
    return self.install()

  def __exit__(self, *exc):
    self.restore()

  def requested(self) -> bool:
    """Whether to stop here: this process was signalled or (on a multi-process run, where this is a collective that
    every process must reach) any other was."""
    import jax

    mine = self.signum is not None
    if jax.process_count() == 1:
      return mine
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(mine))))
