"""Checkpoint round trips: bit-identical state, and restores onto other meshes."""

import jax
import numpy as np
import optax
from flax import nnx

from distil_jax import checkpoint, sharding
from distil_jax import model as model_lib

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
