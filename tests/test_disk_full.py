"""A full disk during a checkpoint save: one CheckpointError naming the checkpoint lost and the one still intact, the
half-written folder removed, and a later resume from the intact one (a real 16 MB tmpfs: needs root to mount)."""

import os
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

from distil_jax import checkpoint, errors
from distil_jax.errors import CheckpointError


@pytest.fixture
def small_disk(tmp_path):
  folder = tmp_path / "disk"
  folder.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)], capture_output=True)
  if mounted.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()[:100]}")
  yield folder
  subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(small_disk):
  directory = str(small_disk / "checkpoints")
  small = {"params": {"w": jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64)}}
  big = {"params": {"w": jnp.asarray(np.random.default_rng(0).standard_normal((64, 96 * 1024), np.float32))}}  # 24 MiB
  ckpt = checkpoint.Checkpointer(directory)
  ckpt.save(1, small, {"iteration": 1})
  ckpt.save(2, big, {"iteration": 2})
  with pytest.raises(CheckpointError) as e:
    ckpt.close()
  assert str(e.value) == (
    f"the disk is full: checkpoint 2 could not be written in {directory} (no space left on device); checkpoint 1 "
    "is intact: free some space and run the same command to resume"
  )
  assert os.listdir(directory) == ["1"]
  with checkpoint.Checkpointer(directory) as again:
    step, state, meta = again.restore_latest(checkpoint.abstract_like(small))
  assert step == 1 and meta["iteration"] == 1
  np.testing.assert_array_equal(state["params"]["w"], small["params"]["w"])


def test_a_full_disk_anywhere_else_is_recognised_in_the_error_chain(small_disk):
  """A write of the buffer or the metrics that fails for space (an OSError, or tensorstore's error text) is told
  apart from other errors, for `main` to report in one line."""
  from distil_jax import buffer as buffer_lib

  with pytest.raises(OSError) as e:
    with open(small_disk / "metrics.jsonl", "wb") as f:
      f.write(b"x" * (17 << 20))
  assert errors.disk_full(e.value).endswith("No space left on device")
  os.remove(small_disk / "metrics.jsonl")
  buf = buffer_lib.Buffer(str(small_disk / "buffer"), {"x": ((1024, 1024), "float32")}, max_groups=8)
  with pytest.raises(ValueError) as e:
    buf.append({"x": np.random.default_rng(0).standard_normal((5, 1024, 1024), np.float32)})
  assert "no space left on device" in errors.disk_full(e.value).lower()
  assert errors.disk_full(ValueError("RESOURCE_EXHAUSTED: too many open files")) is None
