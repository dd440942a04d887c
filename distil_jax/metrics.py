"""Where figures go: `workdir/metrics.jsonl` (one JSON object per line), TensorBoard, and a console progress bar.

Every line carries its `iteration`. On resume the file is cut back to the checkpoint's iteration before the run
replays, so the file of an interrupted-and-resumed run equals that of an uninterrupted one (wall-clock figures,
under `time/`, aside).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np


def _plain(v):
  v = np.asarray(v).item() if hasattr(v, "shape") or isinstance(v, np.generic) else v
  return None if isinstance(v, float) and not math.isfinite(v) else v


class MetricsWriter:
  def __init__(
    self,
    workdir: str,
    *,
    resume_iteration: int | None,
    tensorboard: bool,
    progress_total: int,
    show_progress: bool,
    enabled: bool = True,
  ):
    """`enabled=False` (every process but the first on a multi-host run) makes every method a no-op."""
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._file, self._tb, self._bar = None, None, None
    if not enabled:
      return
    self._truncate(resume_iteration)
    self._file = open(self.path, "a")
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    if show_progress:
      from tqdm import tqdm

      self._bar = tqdm(total=progress_total, initial=resume_iteration or 0, unit="it", dynamic_ncols=True)

  def _truncate(self, iteration):
    if not os.path.exists(self.path):
      return
    if iteration is None:
      os.remove(self.path)
      return
    with open(self.path) as f:
      keep = [line for line in f if line.strip() and json.loads(line)["iteration"] <= iteration]
    with open(self.path + ".tmp", "w") as f:
      f.writelines(keep)
    os.replace(self.path + ".tmp", self.path)

  def write(self, iteration: int, figures: dict) -> None:
    if self._file is None:
      return
    record = {"iteration": iteration, **{k: _plain(v) for k, v in sorted(figures.items())}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k != "iteration" and isinstance(v, int | float) and not isinstance(v, bool):
          self._tb.add_scalar(k, v, iteration)

  def progress(self, iteration: int, shown: dict) -> None:
    if self._bar is not None:
      self._bar.n = iteration
      self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items() if v is not None}, refresh=True)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
    if self._bar is not None:
      self._bar.close()
