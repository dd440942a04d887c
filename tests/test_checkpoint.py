"""Checkpoint round trips: bit-identical state, restores onto other meshes, content checksums, and what happens when
the latest checkpoint is damaged or does not fit the config."""

import logging
import os
import re
import shutil

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from run_helpers import rot_one_bit

from distil_jax import checkpoint, sharding
from distil_jax import model as model_lib
from distil_jax.errors import CheckpointError

CFG = model_lib.ModelConfig(
  vocab_size=64,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
)


def _state(mesh, seed):
  graphdef, params = sharding.init_params(lambda: model_lib.Transformer(CFG, rngs=nnx.Rngs(seed)), mesh)
  tx = optax.adamw(1e-2)
  opt_state = jax.jit(tx.init)(params)
  # One real update so that the moments are not zeros.
  grads = jax.tree.map(lambda p: 0.1 * p + 0.01, params)
  updates, opt_state = jax.jit(tx.update)(grads, opt_state, params)
  params = jax.jit(optax.apply_updates)(params, updates)
  rng = jax.random.key_data(jax.random.key(seed))
  return {"params": params, "opt_state": opt_state, "rng": rng}


def _assert_identical(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_restore_bit_identical_and_other_meshes(tmp_path):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  state = _state(mesh, seed=0)
  with checkpoint.Checkpointer(str(tmp_path), max_to_keep=2) as ckpt:
    ckpt.save(7, state, {"iteration": 7, "buffer_rows": 42})
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.latest_step() == 7
    restored, meta = ckpt.restore(7, checkpoint.abstract_like(state))
  assert meta == {"iteration": 7, "buffer_rows": 42}
  _assert_identical(restored, state)
  assert restored["params"]["model"]["embed_tokens"]["embedding"].sharding.spec == jax.sharding.PartitionSpec(
    "tensor", "fsdp"
  )

  for axes, devices in [({"fsdp": 8}, jax.devices()), ({"fsdp": 1}, jax.devices()[:1])]:
    other = sharding.make_mesh(axes, devices)
    target = checkpoint.abstract_like(_state(other, seed=1))  # different values, new layout
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
      restored, _ = ckpt.restore(7, target)
    _assert_identical(restored, state)
    leaf = restored["params"]["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert leaf.sharding.mesh.shape == other.shape


def test_keeps_last_n(tmp_path):
  mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
  state = {"x": jax.device_put(np.arange(4.0), sharding.replicated(mesh))}
  with checkpoint.Checkpointer(str(tmp_path), max_to_keep=2) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, state, {"step": step})
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.all_steps() == [2, 3]


# ---------------------------------------------------------------------------------------------------------------------
# Content checksums


def _fmix32_np(h):
  h = h ^ (h >> np.uint32(16))
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> np.uint32(13))
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> np.uint32(16))


def _reference_sum(x: np.ndarray) -> str:
  """The checksum's formula written again in numpy, on the host, over the whole array at once."""
  bits = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).astype(np.uint32)
  index = np.arange(bits.size, dtype=np.uint32).reshape(bits.shape)
  with np.errstate(over="ignore"):
    lane0 = _fmix32_np(bits ^ _fmix32_np(index * np.uint32(0x9E3779B1) + np.uint32(0x2545F491)))
    lane1 = _fmix32_np(
      (bits + np.uint32(0x68E31DA4)) ^ _fmix32_np(index * np.uint32(0x85EBCA77) + np.uint32(0x1B873593))
    )
  return "".join(f"{int(v.sum(dtype=np.uint32)):08x}" for v in (lane0, lane1))


def test_checksum_matches_a_numpy_reference_on_any_layout_and_sees_one_flipped_bit():
  """The on-device, sharded checksum equals a host reference whatever the mesh; one flipped bit in any element of
  any dtype changes it (the per-element hash is a bijection of the bits, so a lone change cannot cancel)."""
  import ml_dtypes

  rng = np.random.default_rng(0)
  arrays = {
    "f32": rng.normal(size=(16, 24)).astype(np.float32),
    "bf16": rng.normal(size=(8, 32)).astype(ml_dtypes.bfloat16),
    "i32": rng.integers(-(2**31), 2**31 - 1, size=(40,), dtype=np.int32),
    "u32": rng.integers(0, 2**32 - 1, size=(8, 2), dtype=np.uint32),
    "bool": rng.random((16,)) > 0.5,
  }
  want = {k: _reference_sum(v) for k, v in arrays.items()}
  for axes, devices in [({"fsdp": 8}, jax.devices()), ({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()), ({}, None)]:
    mesh = sharding.make_mesh(axes, devices or jax.devices()[:1])
    spec = jax.sharding.PartitionSpec("fsdp") if axes else jax.sharding.PartitionSpec()
    placed = {k: jax.device_put(v, jax.sharding.NamedSharding(mesh, spec)) for k, v in arrays.items()}
    got = checkpoint.content_sums(placed)
    assert {k: v[0] for k, v in got.items()} == want, axes
    assert got["f32"][1:] == [[16, 24], "float32"] and got["bf16"][2] == "bfloat16"
  for name, x in arrays.items():
    for flat in (0, x.size // 2, x.size - 1):
      bit = 1 << int(rng.integers(0, 8 * x.dtype.itemsize if x.dtype != bool else 1))
      raw = x.copy().view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).reshape(-1)
      raw[flat] ^= bit
      assert _reference_sum(raw.view(x.dtype).reshape(x.shape)) != want[name]
      assert checkpoint.content_sums({name: raw.view(x.dtype).reshape(x.shape)})[name][0] != want[name]


# ---------------------------------------------------------------------------------------------------------------------
# Damaged or incomplete checkpoints


def _small_state(seed):
  """A state shaped like a run's (params, optimizer moments, RNG key data), small enough to save in milliseconds."""
  mesh = sharding.make_mesh({"fsdp": 2}, jax.devices()[:2])
  rng = np.random.default_rng(seed)
  put = lambda x, spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))
  w = put(rng.normal(size=(64, 32)).astype(np.float32), ("fsdp",))
  return {
    "params": {"model": {"layers": [{"mlp": {"down_proj": {"kernel": w}}}], "norm": put(np.ones(32, np.float32), ())}},
    "opt_state": {"mu": put(rng.normal(size=(64, 32)).astype(np.float32), ("fsdp",)), "count": put(np.int32(3), ())},
    "rng": put(np.array([seed, 7], np.uint32), ()),
  }


def _two_checkpoints(tmp_path):
  state, later = _small_state(0), _small_state(1)
  with checkpoint.Checkpointer(str(tmp_path), max_to_keep=3) as ckpt:
    ckpt.save(1, state, {"iteration": 1})
    ckpt.save(2, later, {"iteration": 2})
  return state, later


def _data_files(folder):
  return [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if os.path.basename(d) == "d"]


def _flip_byte(path):
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x04
  open(path, "wb").write(bytes(data))


def _truncate(path):
  data = open(path, "rb").read()
  open(path, "wb").write(data[: len(data) // 2])


DAMAGE = {
  "bit rot": (
    lambda d: rot_one_bit(d / "2" / "params", "model.layers.0.mlp.down_proj.kernel", (5, 7)),
    r"content checksum differs for params/model/layers/0/mlp/down_proj/kernel \(bytes changed on disk\)",
  ),
  "flipped byte": (  # in a compressed chunk: a read error or a checksum mismatch, either way unusable
    lambda d: _flip_byte(max(_data_files(d / "2" / "params"), key=os.path.getsize)),
    r"content checksum differs|unreadable|error|corrupt|invalid",
  ),
  "truncated file": (lambda d: _truncate(max(_data_files(d / "2" / "opt_state"), key=os.path.getsize)), r"truncated"),
  "missing item": (lambda d: shutil.rmtree(d / "2" / "opt_state"), r"item 'opt_state' is missing"),
  "empty step folder": (lambda d: os.makedirs(d / "3"), r"the step folder is empty"),
  "changed meta": (
    lambda d: (d / "2" / "meta" / "metadata").write_text(
      (d / "2" / "meta" / "metadata").read_text().replace('"iteration": 2', '"iteration": 7')
    ),
    r"meta item's checksum differs",
  ),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_latest_checkpoint_falls_back_with_one_warning(damage, tmp_path, caplog):
  state, later = _two_checkpoints(tmp_path)
  harm, why = DAMAGE[damage]
  harm(tmp_path)
  newest = 3 if damage == "empty step folder" else 2
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt, caplog.at_level(logging.WARNING):
    step, restored, meta = ckpt.restore_latest(checkpoint.abstract_like(state))
    ckpt.set_aside_unusable()
    steps_after = ckpt.all_steps()
  expected = (2, later) if damage == "empty step folder" else (1, state)
  assert (step, meta["iteration"]) == (expected[0], expected[0])
  _assert_identical(restored, expected[1])
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "unusable" in r.getMessage()]
  assert len(warnings) == 1 and re.search(why, warnings[0]), warnings
  assert f"checkpoint {newest} is unusable" in warnings[0] and f"from checkpoint {step} instead" in warnings[0]
  assert newest not in steps_after and (tmp_path / f"{newest}.unusable").is_dir()  # kept aside, out of orbax's way


def test_no_usable_checkpoint_is_one_error_naming_each(tmp_path):
  state, _ = _two_checkpoints(tmp_path)
  rot_one_bit(tmp_path / "2" / "opt_state", "mu", (0, 0))
  shutil.rmtree(tmp_path / "1" / "params")
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    with pytest.raises(
      CheckpointError,
      match=r"no usable checkpoint in .*: 2: content checksum differs for opt_state/mu .*; 1: item 'params'",
    ):
      ckpt.restore_latest(checkpoint.abstract_like(state))
  assert checkpoint.Checkpointer(str(tmp_path / "empty")).restore_latest({"x": None}) is None


def test_a_changed_model_shape_names_the_parameter_and_both_shapes(tmp_path):
  state, _ = _two_checkpoints(tmp_path)
  wider = jax.tree.map(lambda x: x, state)
  kernel = wider["params"]["model"]["layers"][0]["mlp"]["down_proj"]
  kernel["kernel"] = jax.device_put(np.zeros((96, 32), np.float32), kernel["kernel"].sharding)
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    names = r"params/model/layers/0/mlp/down_proj/kernel is \(64, 32\) float32 there, \(96, 32\) float32 in this config"
    with pytest.raises(CheckpointError, match=names):
      ckpt.restore_latest(checkpoint.abstract_like(wider))
    with pytest.raises(CheckpointError, match=r"holds no item 'ema'"):
      ckpt.restore_latest({"ema": checkpoint.abstract_like(state["params"])})
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]  # a config mismatch is not damage: nothing set aside


def test_checkpoints_without_checksums_restore_with_a_warning(tmp_path, caplog):
  """Checkpoints written before checksums existed (plain orbax, as the previous version saved them) still load."""
  import orbax.checkpoint as ocp

  mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
  state = {"params": {"w": jax.device_put(np.arange(4.0), sharding.replicated(mesh))}}
  with ocp.CheckpointManager(str(tmp_path)) as mgr:
    items = {"meta": ocp.args.JsonSave({"iteration": 5}), "params": ocp.args.StandardSave(state["params"])}
    mgr.save(5, args=ocp.args.Composite(**items))
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt, caplog.at_level(logging.WARNING):
    step, restored, meta = ckpt.restore_latest(checkpoint.abstract_like(state))
  assert step == 5 and meta == {"iteration": 5}
  _assert_identical(restored, state)
  assert any("without content checksums" in r.getMessage() for r in caplog.records)
