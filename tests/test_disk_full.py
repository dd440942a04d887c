"""A full disk during a checkpoint save: one CheckpointError naming the checkpoint lost and the one still intact, the
half-written folder removed, and a later resume from the intact one (a real 16 MB tmpfs: needs root to mount)."""

import os
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

from distil_jax import checkpoint
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
