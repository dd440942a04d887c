"""The aggregated DAgger data set on disk: one tensorstore (zarr3) array per field, one row per prompt group.

Rows are appended each iteration and never rewritten, so a crash cannot corrupt data a checkpoint refers to: the
checkpoint records how many rows it saw, and a resumed run truncates the arrays back to that count before it
replays the lost iterations (which append the very same rows again).

Size cap (policy): training samples only the most recent `max_groups` groups (first in, first out). Rows that fall
out of that window for every checkpoint still kept are released: overwritten with the fill value, which tensorstore
stores as absent chunks, so disk use stays bounded by about `max_groups` plus one chunk per field.

A group keeps its G responses together, so leave-one-out baselines and GRPO's group statistics stay valid for old
data. Grain reads rows by index (`source`), which is what its random-access sources need.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import tensorstore as ts

from distil_jax.errors import InputError

_CHUNK_ROWS = 16


def _kvstore(path: str) -> dict:
  """A local folder, or a Cloud Storage path (gs://bucket/...) on TPU VMs."""
  if path.startswith("gs://"):
    bucket, _, key = path[len("gs://") :].partition("/")
    return {"driver": "gcs", "bucket": bucket, "path": key}
  return {"driver": "file", "path": path}


class Buffer:
  def __init__(self, directory: str, schema: Mapping[str, tuple[tuple[int, ...], str]], max_groups: int):
    """schema: field -> (shape of one row, dtype name). Opens existing arrays (resume) or creates them."""
    self.directory, self.schema, self.max_groups = directory, dict(schema), max_groups
    if not directory.startswith("gs://"):
      os.makedirs(directory, exist_ok=True)
    self._arrays = {name: self._open(name, shape, dtype) for name, (shape, dtype) in self.schema.items()}
    self.rows = min(a.shape[0] for a in self._arrays.values())
    self.released = 0

  def _open(self, name, shape, dtype):
    spec = {"driver": "zarr3", "kvstore": _kvstore(os.path.join(self.directory, name))}
    fill = -np.inf if np.dtype(dtype).kind == "f" else 0
    try:
      arr = ts.open(spec, open=True).result()
    except ValueError:  # not there yet
      arr = ts.open(
        spec,
        create=True,
        dtype=ts.dtype(dtype),
        shape=[0, *shape],
        fill_value=fill,
        chunk_layout=ts.ChunkLayout(chunk_shape=[_CHUNK_ROWS, *shape]),
      ).result()
    if tuple(arr.shape[1:]) != tuple(shape) or arr.dtype.numpy_dtype != np.dtype(dtype):
      raise InputError(
        f"{self.directory}/{name}: stored rows are {tuple(arr.shape[1:])} {arr.dtype.numpy_dtype}, this run "
        f"writes {tuple(shape)} {dtype}; the workdir belongs to a run with another configuration"
      )
    return arr

  def append(self, records: Mapping[str, np.ndarray]) -> None:
    """Append n rows (every field, first dimension n)."""
    missing = set(self.schema) - set(records)
    if missing:
      raise ValueError(f"buffer append is missing fields {sorted(missing)}")
    n = len(next(iter(records.values())))
    start, stop = self.rows, self.rows + n
    writes = []
    for name, arr in self._arrays.items():
      shape, dtype = self.schema[name]
      value = np.asarray(records[name], dtype)
      if value.shape != (n, *shape):
        raise ValueError(f"buffer field {name}: got {value.shape}, expected {(n, *shape)}")
      arr = self._arrays[name] = arr.resize(exclusive_max=[stop, *shape]).result()
      writes.append(arr[start:stop].write(value))
    for w in writes:
      w.result()
    self.rows = stop

  def truncate(self, rows: int) -> None:
    """Forget rows >= `rows` (those written after the checkpoint a run resumes from)."""
    if rows > self.rows:
      raise InputError(f"checkpoint expects {rows} buffer rows, {self.directory} holds only {self.rows}")
    for name, arr in self._arrays.items():
      self._arrays[name] = arr.resize(exclusive_max=[rows, *self.schema[name][0]]).result()
    self.rows = rows

  def window(self, before: int | None = None) -> tuple[int, int]:
    """The rows training may sample: the last `max_groups` of those before row `before` (default: all)."""
    stop = self.rows if before is None else before
    return max(0, stop - self.max_groups), stop

  def release(self, keep_from: int) -> None:
    """Drop whole chunks of rows below `keep_from` from disk (no kept checkpoint can reach them)."""
    stop = (keep_from // _CHUNK_ROWS) * _CHUNK_ROWS
    if stop <= self.released:
      return
    for name, arr in self._arrays.items():
      fill = np.full((stop - self.released, *self.schema[name][0]), arr.fill_value, arr.dtype.numpy_dtype)
      arr[self.released : stop].write(fill).result()
    self.released = stop

  def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
    return {name: arr[start:stop].read().result() for name, arr in self._arrays.items()}

  def source(self, start: int, stop: int):
    """A Grain random-access source over rows [start, stop): item i is a dict of one group's fields."""
    return _Rows(self, start, stop)


class _Rows:
  def __init__(self, buffer: Buffer, start: int, stop: int):
    self.buffer, self.start, self.stop = buffer, start, stop

  def __len__(self):
    return self.stop - self.start

  def __getitem__(self, i):
    if not 0 <= i < len(self):
      raise IndexError(i)
    row = self.start + i
    return {name: arr[row].read().result() for name, arr in self.buffer._arrays.items()}
