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


def test_a_buffer_on_any_kvstore_is_checked_like_a_local_one(tmp_path, caplog):
  """file:// and memory:// (stand-ins for gs://, which this machine cannot reach): the same calls find the buffer,
  read its checksums and name damage; a deleted checksums.json is named for every window with rows (a buffer whose
  arrays were created before checksums is still read unverified, with a warning)."""
  import tensorstore as ts

  for url in (str(tmp_path / "local" / "buf"), f"file://{tmp_path}/f/buf", f"memory://{tmp_path}/m/buf"):
    assert not buffer_lib.Buffer.exists(url, SCHEMA)
    buf = buffer_lib.Buffer(url, SCHEMA, max_groups=100)
    for start in (0, 10, 20):
      buf.append(_block(start, 10))
    assert buffer_lib.Buffer.exists(url, SCHEMA) and not buffer_lib.Buffer.exists(url, {"y": SCHEMA["x"]})
    again = buffer_lib.Buffer(url, SCHEMA, max_groups=100)
    assert again.rows == 30 and again.damage(0, 30) is None
    rows = again.source(0, 30)  # read back as the loop reads it
    np.testing.assert_array_equal([rows[i]["n"] for i in range(30)], np.arange(30))

    kv = ts.KvStore.open(buffer_lib._kvstore(url + "/"), context=buffer_lib._CONTEXT).result()
    key = "x/c/1/0"  # rows 16-31; row 18's second value is at byte (2 * 3 + 1) * 4
    good = kv.read(key).result().value
    bad = bytearray(good)
    bad[29] ^= 0x10
    kv.write(key, bytes(bad)).result()
    assert buffer_lib.Buffer(url, SCHEMA, max_groups=100).damage(0, 30) == (
      f"{url}/x row 18 differs from its checksum (bytes changed or lost on disk)"
    )
    kv.write(key, good).result()

    kv.write("checksums.json", None).result()  # deleted
    lost = buffer_lib.Buffer(url, SCHEMA, max_groups=100)
    missing = f"{url}/checksums.json is missing (deleted or lost): rows"
    assert lost.damage(0, 30) == f"{missing} 0-29 cannot be verified"
    assert lost.damage(4, 14) == f"{missing} 4-13 cannot be verified" and lost.damage(0, 0) is None
    lost.truncate(0)  # a fresh start: rows appended from now on are summed again
    lost.append(_block(0, 3))
    assert buffer_lib.Buffer(url, SCHEMA, max_groups=100).damage(0, 3) is None
    assert json.loads(kv.read("checksums.json").result().value)["sums"]["n"] == [
      buffer_lib._row_sum(np.int32(i)) for i in range(3)
    ]
  assert sorted(os.listdir(tmp_path)) == ["f", "local"]  # the memory:// buffer made no local folder

  # Arrays without the mark (written before checksums): no checksums.json is no damage, said once.
  legacy = str(tmp_path / "legacy")
  for name, (shape, dtype) in SCHEMA.items():
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{legacy}/{name}"}}
    ts.open(spec, create=True, dtype=dtype, shape=[5, *shape], fill_value=0).result()
  with caplog.at_level(logging.WARNING):
    old = buffer_lib.Buffer(legacy, SCHEMA, max_groups=100)
  assert old.rows == 5 and old.damage(0, 5) is None
  assert [r.getMessage() for r in caplog.records] == [
    f"{legacy} has 5 rows and no checksums.json: rows are read unverified"
  ]


def _reward_chunk(workdir):
  return os.path.join(workdir, "buffer", "process_0", "reward", "c", "0", "0")


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in f]


@pytest.mark.slow
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

  # checksums.json deleted: no row can be verified, so no checkpoint with rows is resumed (it used to train on).
  os.remove(os.path.join(workdir, "buffer", "process_0", "checksums.json"))
  config.train.iterations = 5
  with pytest.raises(CheckpointError) as e:
    train.train(config, workdir)
  lost = lambda rows: (
    f"its buffer rows are damaged: {workdir}/buffer/process_0/checksums.json is missing (deleted or lost): rows "
    f"0-{rows - 1} cannot be verified"
  )
  assert str(e.value) == f"no usable checkpoint in {workdir}/checkpoints: 4: {lost(8)}; 3: {lost(6)}; 2: {lost(4)}"
  assert _metrics(workdir) == after
