"""Where figures and log lines go: `workdir/metrics.jsonl` (one JSON object per line), `workdir/samples.jsonl` (what
the model wrote at each evaluation), TensorBoard, a progress bar on the console, and the log file.

Every line carries its `iteration`. On resume the file is cut back to the checkpoint's iteration before the run
replays, so the file of an interrupted-and-resumed run equals that of an uninterrupted one (wall-clock figures,
under `time/`, aside); TensorBoard purges its events past that iteration the same way. Both are flushed at each
write, so a killed run loses nothing it reported.

Each evaluation's line also carries the best `eval/pass@1` so far and its iteration (`eval/best_pass@1`,
`eval/best_iteration`): a run that peaks early and then degrades shows both its last and its best checkpoint's figure.
It is a diagnostic: a maximum over noisy evaluations of the split it selects on, biased upwards as a result.

Figures are global: on a multi-process run each process computes its share and `global_mean` / `global_sum` combine
them (every process must call them, with the same keys, at the same point).

The console shows the config, the progress bar, warnings and errors. INFO lines (ours, orbax's asynchronous save
machinery, jax's) go to `workdir/logs/distil_jax.process_<i>.log`, or to absl's `--log_dir`; absl's `--logtostderr`
and `--alsologtostderr` put them back on the terminal. Until the workdir is known to be valid they are held in
memory, so that input refused at start leaves nothing behind.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import time

import jax
import numpy as np

from distil_jax.errors import InputError


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
    self.samples_path = os.path.join(workdir, "samples.jsonl")
    self._file, self._samples, self._tb, self._bar = None, None, None, None
    if not enabled:
      return
    for path in (self.path, self.samples_path):
      _truncate(path, resume_iteration)
    self.best = _best(self.path)
    self._file = open(self.path, "a")
    self._samples = open(self.samples_path, "a")
    if tensorboard:
      # events a killed run wrote past the checkpoint it resumes from are dropped, as in the JSONL file
      purge = None if resume_iteration is None else resume_iteration + 1
      self._tb = _Events(os.path.join(workdir, "tensorboard"), purge_step=purge)
    if show_progress:
      from tqdm import tqdm

      self._bar = tqdm(total=progress_total, initial=resume_iteration or 0, unit="it", dynamic_ncols=True)

  def write(self, iteration: int, figures: dict) -> None:
    if self._file is None:
      return
    if BEST in figures:
      if self.best is None or figures[BEST] > self.best[0]:
        self.best = (figures[BEST], iteration)
      figures = {**figures, "eval/best_pass@1": self.best[0], "eval/best_iteration": self.best[1]}
    record = {"iteration": iteration, **{k: _plain(v) for k, v in sorted(figures.items())}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      numbers = {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}
      self._tb.scalars(iteration, {k: v for k, v in numbers.items() if k != "iteration"})

  def write_samples(self, iteration: int, rows: list[dict]) -> None:
    """What the model wrote at an evaluation: one JSON line per response in `samples.jsonl`, and a TensorBoard
    text summary (a table of the rows)."""
    if self._samples is None or not rows:
      return
    for row in rows:
      self._samples.write(json.dumps({"iteration": iteration, **row}, ensure_ascii=False) + "\n")
    self._samples.flush()
    if self._tb is not None:
      cell = lambda v: str(v).replace("|", "\\|").replace("\n", "<br>")
      keys = [k for k in rows[0] if k != "prompt"]
      table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
      table += ["| " + " | ".join(cell(r[k]) for k in keys) + " |" for r in rows]
      self._tb.text(iteration, "eval/samples", "\n".join(table))

  def progress(self, iteration: int, shown: dict) -> None:
    if self._bar is not None:
      self._bar.n = iteration
      self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items() if v is not None}, refresh=True)

  def close(self) -> None:
    for f in (self._file, self._samples):
      if f is not None:
        f.close()
    if self._tb is not None:
      self._tb.close()
    if self._bar is not None:
      self._bar.close()


class _Events:
  """TensorBoard's event file, written synchronously: tensorboardX's SummaryWriter queues events for a background
  thread, so its flush() does not mean they are on disk, and a killed run lost them (0-byte files)."""

  def __init__(self, folder: str, *, purge_step: int | None):
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto import event_pb2

    self._pb = event_pb2
    os.makedirs(folder, exist_ok=True)
    # a suffix of its own: the file name holds only the second, and a resume within it would overwrite the last file
    self._writer = EventsWriter(os.path.join(folder, "events"), filename_suffix=f".{time.time_ns()}")
    if purge_step is not None:  # TensorBoard drops earlier events at steps >= this one
      start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
      self._writer.write_event(event_pb2.Event(step=purge_step, wall_time=time.time(), session_log=start))
      self._writer.flush()

  def scalars(self, step: int, values: dict) -> None:
    from tensorboardX.summary import scalar

    for tag, value in values.items():
      self._writer.write_event(self._pb.Event(step=step, wall_time=time.time(), summary=scalar(tag, value)))
    self._writer.flush()

  def text(self, step: int, tag: str, text: str) -> None:
    from tensorboardX.summary import text as text_summary

    self._writer.write_event(self._pb.Event(step=step, wall_time=time.time(), summary=text_summary(tag, text)))
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


BEST = "eval/pass@1"  # the figure whose best value and iteration every evaluation line carries


def _best(path: str) -> tuple[float, int] | None:
  """(the best `BEST` in a metrics file, its first iteration), or None: a resumed run goes on from its history."""
  if not os.path.exists(path):
    return None
  best = None
  with open(path) as f:
    for line in f:
      row = json.loads(line) if line.strip() else {}
      if BEST in row and (best is None or row[BEST] > best[0]):
        best = (row[BEST], row["iteration"])
  return best


def _truncate(path: str, iteration: int | None) -> None:
  """An append-only log of a resumed run cut back to the checkpoint's iteration (removed for a fresh run)."""
  if not os.path.exists(path):
    return
  if iteration is None:
    os.remove(path)
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  keep = []
  for n, line in enumerate(lines):
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      if n == len(lines) - 1:  # a crash mid-write cut the last line: it is dropped (its iteration is replayed)
        logging.warning("%s: its last line is cut (a crash while writing it); dropped", path)
        break
      raise InputError(f"{path}:{n + 1}: not valid JSON (only the last line of this log may be cut)") from None
    if record["iteration"] <= iteration:
      keep.append(line if line.endswith("\n") else line + "\n")
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------------------------------
# Figures from every process


def global_mean(figures: dict[str, float]) -> dict[str, float]:
  """Means over processes of per-process means (every process holds an equal share of the prompts)."""
  if jax.process_count() == 1 or not figures:
    return dict(figures)
  from jax.experimental import multihost_utils

  keys = sorted(figures)
  table = multihost_utils.process_allgather(np.asarray([figures[k] for k in keys], np.float32))
  return {k: float(v) for k, v in zip(keys, np.mean(np.asarray(table, np.float64), axis=0), strict=True)}


def global_sum(count: int) -> int:
  """The sum over processes of a per-process count (each below 2^31)."""
  if jax.process_count() == 1:
    return int(count)
  from jax.experimental import multihost_utils

  return int(np.sum(np.asarray(multihost_utils.process_allgather(np.int32(count)), np.int64)))


# ---------------------------------------------------------------------------------------------------------------------
# The console and the log file


class _Held(logging.Handler):
  """Log records kept in memory (the last 10k) until the log file's folder is known to be wanted."""

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.records = collections.deque(maxlen=10_000)

  def emit(self, record):
    self.records.append(record)


_held: _Held | None = None


def quiet_console() -> None:
  """Keep INFO lines off the terminal (warnings and errors stay on it), held in memory until `log_to_file`; call
  once, after flags are parsed. absl's `--alsologtostderr` keeps them on the terminal too, `--logtostderr` only
  there (no log file)."""
  global _held
  from absl import flags
  from absl import logging as absl_logging

  if flags.FLAGS.logtostderr:
    return
  if not flags.FLAGS.alsologtostderr:
    absl_logging.get_absl_handler().setLevel(logging.WARNING)
    # orbax logs a failed background save with its traceback, several times; `checkpoint.py` reports it in one line
    absl_logging.get_absl_handler().addFilter(lambda record: f"{os.sep}orbax{os.sep}" not in record.pathname)
  _held = _Held()
  logging.getLogger().addHandler(_held)


def log_to_file(folder: str) -> None:
  """Write the held INFO lines, and all later ones, to `folder/distil_jax.process_<i>.log` (once the process index
  is known; a no-op after the first call, or unless `quiet_console` held them)."""
  global _held
  if _held is None:
    return
  from absl import logging as absl_logging

  os.makedirs(folder, exist_ok=True)
  handler = logging.FileHandler(os.path.join(folder, f"distil_jax.process_{jax.process_index()}.log"))
  handler.setFormatter(absl_logging.PythonFormatter())
  for record in _held.records:
    handler.handle(record)
  root = logging.getLogger()
  root.addHandler(handler)
  root.removeHandler(_held)
  _held = None
