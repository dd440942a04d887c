"""The aggregated DAgger data set on disk: one tensorstore (zarr3) array per field, one row per prompt group.

Rows are appended each iteration and never rewritten, so a crash cannot corrupt data a checkpoint refers to: the
checkpoint records how many rows it saw, and a resumed run truncates the arrays back to that count before it
replays the lost iterations (which append the very same rows again).

Size cap (policy): training samples only the most recent `max_groups` groups (first in, first out). Rows that fall
out of that window for every checkpoint still kept are released: overwritten with the fill value, which tensorstore
stores as absent chunks, so disk use stays bounded by about `max_groups` plus one chunk per field.

A group keeps its G responses together, so leave-one-out baselines and GRPO's group statistics stay valid for old
data. Grain reads rows by index (`source`), which is what its random-access sources need.

Why checksums: the buffer is training data, and tensorstore reads back whatever is on disk. Flipped bytes loaded as
other targets (the run stopped later on a "non-finite loss", blamed on the step), a deleted chunk read as its fill
value (silent -inf / zero rows), a truncated one failed inside Grain. Each append therefore records a 64-bit hash of
every appended row of every field in `checksums.json` (written whole, atomically, after the rows), and each row is
checked against it when training reads it; a resume checks the whole window it will train on first
(`damage`), so that damage is named in one line and the run falls back to a checkpoint whose window is intact, or
stops before any update. The arrays record at creation that their rows are checksummed (a zarr attribute): a
missing `checksums.json` is then damage too (every row of a window is unverifiable), not a buffer from before
checksums (whose rows are read unverified, with a warning).

Where: a local folder or any tensorstore kvstore URL (gs://bucket/..., file://..., memory://...), read and written
through the same calls (`exists` included: a resume checks a buffer it cannot see with `os.path`, e.g. on gs://,
like a local one). One tensorstore context serves every buffer of the process (so a memory:// buffer outlives one
`Buffer` object, as a file does).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping

import numpy as np
import tensorstore as ts
from absl import logging

from distil_jax.errors import DataError, InputError

_CHUNK_ROWS = 16
_SUMS = "checksums.json"  # {"first": row of sums[field][0], "sums": {field: [16 hex digits per row]}}
_MARK = {"distil_jax": {"checksums": _SUMS}}  # each array's zarr attributes: its rows are checksummed in _SUMS
_CONTEXT = ts.Context()


def _row_sum(value: np.ndarray) -> str:
  return hashlib.blake2b(np.ascontiguousarray(value).tobytes(), digest_size=8).hexdigest()


def _kvstore(path: str) -> dict | str:
  """A local folder, a Cloud Storage path (gs://bucket/...) on TPU VMs, or any other kvstore URL tensorstore reads."""
  if path.startswith("gs://"):
    bucket, _, key = path[len("gs://") :].partition("/")
    return {"driver": "gcs", "bucket": bucket, "path": key}
  if "://" in path:
    return path
  return {"driver": "file", "path": path}


def _open_kv(directory: str) -> ts.KvStore:
  """The buffer's folder as a key-value store: `checksums.json` and the arrays' metadata are read through it."""
  return ts.KvStore.open(_kvstore(directory.rstrip("/") + "/"), context=_CONTEXT).result()


class Buffer:
  def __init__(self, directory: str, schema: Mapping[str, tuple[tuple[int, ...], str]], max_groups: int):
    """schema: field -> (shape of one row, dtype name). Opens existing arrays (resume) or creates them."""
    self.directory, self.schema, self.max_groups = directory, dict(schema), max_groups
    if "://" not in directory:
      os.makedirs(directory, exist_ok=True)
    self._arrays = {name: self._open(name, shape, dtype) for name, (shape, dtype) in self.schema.items()}
    self.rows = min(a.shape[0] for a in self._arrays.values())
    self.released = 0
    self._kv = _open_kv(directory)
    self._lost = False  # rows checksummed when written, and `checksums.json` gone: no row can be verified
    self._first, self._sums = self._read_sums()

  @staticmethod
  def exists(directory: str, schema: Mapping) -> bool:
    """Whether a buffer with any of `schema`'s fields is stored at `directory` (any kvstore; nothing is written)."""
    kv = _open_kv(directory)
    return any(kv.read(f"{name}/zarr.json").result().state == "value" for name in schema)

  def _read_sums(self) -> tuple[int, dict[str, list[str]] | None]:
    """(first row, {field: per-row sums}); None for a buffer written before rows had checksums, or whose
    `checksums.json` is lost (`self._lost`: `damage` then names it)."""
    found = self._kv.read(_SUMS).result()
    if found.state != "value":
      if self.rows:
        marked = [a for a in self._arrays.values() if a.spec().to_json()["metadata"].get("attributes") == _MARK]
        if marked:
          self._lost = True
          return 0, None
        logging.warning("%s has %d rows and no %s: rows are read unverified", self.directory, self.rows, _SUMS)
        return 0, None
      return 0, {name: [] for name in self.schema}
    try:
      record = json.loads(found.value)
      return int(record["first"]), {name: list(record["sums"][name]) for name in self.schema}
    except (ValueError, KeyError, TypeError) as e:
      raise DataError(f"{self.directory}/{_SUMS} is unreadable ({e}): the buffer's rows cannot be verified") from None

  def _write_sums(self) -> None:
    if self._sums is not None:
      self._kv.write(_SUMS, json.dumps({"first": self._first, "sums": self._sums}).encode()).result()

  def _expected(self, name: str, row: int) -> str | None:
    if self._sums is None or row < self._first:
      return None
    sums = self._sums[name]
    return sums[row - self._first] if row - self._first < len(sums) else "(none recorded)"

  def _open(self, name, shape, dtype):
    spec = {"driver": "zarr3", "kvstore": _kvstore(os.path.join(self.directory, name))}
    fill = -np.inf if np.dtype(dtype).kind == "f" else 0
    try:
      arr = ts.open(spec, open=True, context=_CONTEXT).result()
    except ValueError:  # not there yet
      arr = ts.open(
        {**spec, "metadata": {"attributes": _MARK}},
        context=_CONTEXT,
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
    if self._sums is not None:
      for name in self._arrays:
        value = np.asarray(records[name], self.schema[name][1])
        self._sums[name] += [_row_sum(row) for row in value]
      self._write_sums()
    self.rows = stop

  def truncate(self, rows: int) -> None:
    """Forget rows >= `rows` (those written after the checkpoint a run resumes from)."""
    if rows > self.rows:
      raise InputError(f"checkpoint expects {rows} buffer rows, {self.directory} holds only {self.rows}")
    for name, arr in self._arrays.items():
      self._arrays[name] = arr.resize(exclusive_max=[rows, *self.schema[name][0]]).result()
    self.rows = rows
    if self._sums is None and rows == 0:  # nothing left unverified: the rows appended from now on are summed
      self._lost, self._first, self._sums = False, 0, {name: [] for name in self.schema}
      self._write_sums()
    elif self._sums is not None:
      self._first = min(self._first, rows)
      self._sums = {name: sums[: rows - self._first] for name, sums in self._sums.items()}
      self._write_sums()

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
    if self._sums is not None and stop > self._first:
      self._sums = {name: sums[stop - self._first :] for name, sums in self._sums.items()}
      self._first = stop
      self._write_sums()

  def damage(self, start: int, stop: int) -> str | None:
    """What is wrong with rows [start, stop), in a few words naming the field and rows, or None when every row reads
    back as it was written (read a chunk at a time: an unreadable chunk spoils its rows only)."""
    if self._lost and start < stop:
      return f"{self.directory}/{_SUMS} is missing (deleted or lost): rows {start}-{stop - 1} cannot be verified"
    for name, arr in self._arrays.items():
      lo = start
      while lo < stop:
        hi = min(stop, (lo // _CHUNK_ROWS + 1) * _CHUNK_ROWS)
        try:
          values = arr[lo:hi].read().result()
        except Exception as e:  # tensorstore: a truncated or garbled chunk file
          why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
          return f"{self.directory}/{name} rows {lo}-{hi - 1} are unreadable ({why})"
        for i, value in enumerate(values):
          want = self._expected(name, lo + i)
          if want is not None and _row_sum(value) != want:
            return f"{self.directory}/{name} row {lo + i} differs from its checksum (bytes changed or lost on disk)"
        lo = hi
    return None

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
    out = {}
    for name, arr in self.buffer._arrays.items():
      out[name] = value = arr[row].read().result()
      want = self.buffer._expected(name, row)
      if want is not None and _row_sum(value) != want:
        raise DataError(
          f"{self.buffer.directory}/{name} row {row} differs from its checksum (bytes changed on disk since the "
          "run started); the last checkpoint is intact: run the same command to resume from it"
        )
    return out
