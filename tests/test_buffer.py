"""The DAgger buffer's rows are checked like checkpoints: a flipped, deleted or truncated chunk is named with its
field and rows, at resume (the run falls back to a checkpoint whose window is intact, or stops before any update)
and when training reads a row."""

import json
import logging
import os

import numpy as np
import pytest
from run_helpers import load_config

from distil_jax import buffer as buffer_lib
from distil_jax import train
from distil_jax.errors import CheckpointError, DataError

SCHEMA = {"x": ((3,), "float32"), "n": ((), "int32")}


def _block(start, n):
  rows = np.arange(start, start + n)
  return {"x": np.stack([rows * 1.5, rows + 0.25, -rows], 1).astype(np.float32), "n": rows.astype(np.int32)}


def _chunk(folder, field, index):
  return os.path.join(folder, field, "c", str(index), *(["0"] if field == "x" else []))


def test_each_kind_of_damage_is_named_with_field_and_rows(tmp_path):
  folder = str(tmp_path / "buf")
  buf = buffer_lib.Buffer(folder, SCHEMA, max_groups=100)
  for start in (0, 10, 20):
    buf.append(_block(start, 10))
  buf.truncate(25)  # rows 25-29 forgotten, with their sums
  buf.append(_block(25, 5))
  assert buf.damage(0, 30) is None
  again = buffer_lib.Buffer(folder, SCHEMA, max_groups=100)  # the sums are read back from disk
  assert again.damage(0, 30) is None and again.rows == 30

  path = _chunk(folder, "x", 1)  # rows 16-31; row 18's second value is at byte (2 * 3 + 1) * 4
  raw = bytearray(open(path, "rb").read())
  raw[29] ^= 0x10
  open(path, "wb").write(bytes(raw))
  again = buffer_lib.Buffer(folder, SCHEMA, max_groups=100)
  assert again.damage(0, 30) == f"{folder}/x row 18 differs from its checksum (bytes changed or lost on disk)"
  assert again.damage(0, 18) is None
  rows = again.source(10, 30)
  assert rows[7]["n"] == 17
  with pytest.raises(DataError, match=rf"^{folder}/x row 18 differs from its checksum"):
    rows[8]

  os.remove(_chunk(folder, "n", 0))  # read back as the fill value: zeros
  assert again.damage(0, 16) == f"{folder}/n row 1 differs from its checksum (bytes changed or lost on disk)"
  with open(path, "r+b") as f:
    f.truncate(100)
  message = buffer_lib.Buffer(folder, SCHEMA, max_groups=100).damage(16, 30)
  assert message.startswith(f"{folder}/x rows 16-29 are unreadable ("), message


def _reward_chunk(workdir):
  return os.path.join(workdir, "buffer", "process_0", "reward", "c", "0", "0")


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in f]


def test_a_resume_falls_back_past_damaged_rows_or_stops_before_any_update(tmp_path, caplog):
  """3 iterations of 2 groups (rows 0-5), a checkpoint after each. Row 0 damaged: every checkpoint trains on it, so
  the run stops before any update. Row 5 damaged: checkpoint 3 is set aside, checkpoint 2 (rows 0-3) is resumed and
  iteration 3 replays the very rows that were damaged."""
  config = load_config("arith", **{"train.iterations": 3, "checkpoint.keep": 3, "eval.every": 10})
  workdir = str(tmp_path / "run")
  train.train(config, workdir)
  before = _metrics(workdir)
  good = open(_reward_chunk(workdir), "rb").read()  # float32 rows of 4 (the group size): 16 bytes a row

  bad = bytearray(good)
  bad[2] ^= 0x40
  open(_reward_chunk(workdir), "wb").write(bytes(bad))
  with pytest.raises(CheckpointError) as e:
    train.train(config, workdir)
  reward = os.path.join(workdir, "buffer", "process_0", "reward")
  damaged = f"its buffer rows are damaged: {reward} row 0 differs from its checksum (bytes changed or lost on disk)"
  assert str(e.value) == f"no usable checkpoint in {workdir}/checkpoints: 3: {damaged}; 2: {damaged}; 1: {damaged}"
  assert _metrics(workdir) == before

  bad = bytearray(good)
  bad[5 * 16 + 3] ^= 0x01
  open(_reward_chunk(workdir), "wb").write(bytes(bad))
  config.train.iterations = 4
  with caplog.at_level(logging.WARNING):
    train.train(config, workdir)
  warned = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
  assert warned == [
    f"checkpoint 3 is unusable (its buffer rows are damaged: {reward} row 5 differs from its checksum (bytes "
    "changed or lost on disk)); resuming from checkpoint 2 instead"
  ]
  assert open(_reward_chunk(workdir), "rb").read()[: 6 * 16] == good[: 6 * 16]  # iteration 3's rows, written again
  after = _metrics(workdir)
  assert [r["iteration"] for r in after] == [0, 1, 2, 3, 4] and after[:3] == before[:3]
  assert {k: v for k, v in after[3].items() if not k.startswith("eval/")} == {
    k: v for k, v in before[3].items() if not k.startswith("eval/")
  }
