"""The jitted update: sharded (8 fake CPU devices) equals unsharded; teachers; the non-finite guard."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from distil_jax import data, losses, sharding, update
from distil_jax import model as model_lib

CFG = model_lib.ModelConfig(
  vocab_size=48,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
)
# eps=1e-6, not 1e-8: Adam's first steps are ~lr * g / (|g| + eps), so with a tiny eps a coordinate whose gradient is
# at rounding level (1e-9) takes a step whose size is rounding noise, and sharded and unsharded runs part by 1e-4.
OPTIM = ml_collections.ConfigDict(
  dict(lr=3e-3, lr_warmup_steps=0, schedule="constant", b1=0.9, b2=0.95, eps=1e-6, weight_decay=0.01, max_grad_norm=1.0)
)
BG, G, P, N, K, PT = 4, 2, 6, 7, 3, 9


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  mask = np.ones((BG, G, N), np.int32)
  mask[0, 1, 4:] = 0
  pmask = np.ones((BG, P), np.int32)
  pmask[1, :2] = 0
  tmask = np.ones((BG, G, PT), np.int32)
  tmask[:, :, :3] = 0
  logq = np.log(rng.dirichlet(np.ones(K + 1), (BG, G, N))[..., :K]).astype(np.float32)
  return {
    "prompt_tokens": rng.integers(1, 48, (BG, P)).astype(np.int32),
    "prompt_mask": pmask,
    "tokens": rng.integers(1, 48, (BG, G, N)).astype(np.int32),
    "mask": mask,
    "logprobs": np.full((BG, G, N), -2.0, np.float32),
    "reward": rng.integers(0, 2, (BG, G)).astype(np.float32),
    "iteration": np.array([3, 3, 2, 3], np.int32),
    "sft_tokens": rng.integers(1, 48, (BG, N)).astype(np.int32),
    "sft_mask": np.ones((BG, N), np.int32),
    "target_ids": rng.integers(0, 48, (BG, G, N, K)).astype(np.int32),
    "target_logprobs": logq,
    "teacher_tokens": rng.integers(1, 48, (BG, G, PT)).astype(np.int32),
    "teacher_mask": tmask,
    "teacher_valid": np.array([[1, 1], [1, 0], [1, 1], [0, 1]], np.int32),
    "whole_response_credit": np.array([[0, 1], [0, 0], [1, 1], [0, 0]], np.int32),
  }


def _run(mesh, options, steps=2):
  graphdef, params = sharding.init_params(lambda: model_lib.Transformer(CFG, rngs=nnx.Rngs(0)), mesh)
  tx = update.make_optimizer(OPTIM, 10)
  state = update.init_state(tx, params, mesh, ema=options.ema_decay > 0)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  step = update.make_update(graphdef, tx, options, state_shardings=shardings)
  figures = []
  with jax.set_mesh(mesh):
    for s in range(steps):
      batch = data.to_global(_batch(s), mesh)
      state, metrics = step(state, batch, None, jnp.int32(3))
      figures += [float(metrics["loss"]), float(metrics["grad_norm"])]
  return figures, jax.device_get(state)


@pytest.mark.parametrize("kind,labels", [("distil", "topk"), ("grpo", "topk"), ("distil", "device")])
def test_sharded_update_equals_single_device(kind, labels):
  """(data=2, fsdp=2, tensor=2) on 8 CPU devices vs 1 device, two updates, float32.

  Losses and gradient norms agree to 2e-5 relative (reduction order differs). Parameters agree to 3e-5 absolute,
  1% of one Adam step (lr = 3e-3): Adam divides by sqrt(v), so a coordinate whose gradient is ~0 turns rounding
  noise into a step of up to lr; anything wrong in the sharded program moves parameters by whole steps.
  """
  options = update.UpdateOptions(losses.LossConfig(kind=kind, chunk_size=4), labels=labels)
  one = _run(sharding.make_mesh({"fsdp": 1}, jax.devices()[:1]), options)
  eight = _run(sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), options)
  np.testing.assert_allclose(eight[0], one[0], rtol=2e-5)
  for a, b in zip(jax.tree.leaves(eight[1]), jax.tree.leaves(one[1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=3e-5)


def test_training_lowers_the_loss_and_ema_tracks():
  options = update.UpdateOptions(losses.LossConfig(kind="tokenwise_fce", chunk_size=4), labels="device", ema_decay=0.5)
  mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
  graphdef, params = sharding.init_params(lambda: model_lib.Transformer(CFG, rngs=nnx.Rngs(0)), mesh)
  tx = update.make_optimizer(OPTIM, 30)
  state = {"params": params, "opt_state": tx.init(params), "ema": jax.tree.map(jnp.copy, params)}
  step = update.make_update(graphdef, tx, options)
  batch = _batch(0)
  first = None
  for _ in range(25):
    prev_params, prev_ema = jax.device_get(state["params"]), jax.device_get(state["ema"])
    state, metrics = step(state, batch, None, jnp.int32(3))
    first = first if first is not None else float(metrics["loss"])
  # ema <- 0.5 ema + 0.5 params, checked on the last step
  want = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, prev_ema, jax.device_get(state["params"]))
  for a, b in zip(jax.tree.leaves(state["ema"]), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert not np.allclose(jax.tree.leaves(prev_params)[0], jax.tree.leaves(state["params"])[0])
  assert float(metrics["loss"]) < first


def test_nonfinite_step_leaves_state_untouched():
  options = update.UpdateOptions(losses.LossConfig(kind="distil", chunk_size=4), labels="topk")
  mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
  graphdef, params = sharding.init_params(lambda: model_lib.Transformer(CFG, rngs=nnx.Rngs(0)), mesh)
  tx = update.make_optimizer(OPTIM, 10)
  state = {"params": params, "opt_state": tx.init(params)}
  before = jax.device_get(state)
  batch = _batch(0)
  batch["logprobs"][0, 0, 0] = np.nan  # a corrupt behaviour log-prob makes the ratio NaN
  state, metrics = update.make_update(graphdef, tx, options)(state, batch, None, jnp.int32(3))
  assert float(metrics["nonfinite"]) == 1.0
  for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(before), strict=True):
    np.testing.assert_array_equal(a, b)


def test_nonfinite_guard_is_a_branch_not_a_pass_over_the_state():
  """The compiled step keeps or replaces the state in a conditional: no select between old and new parameters or
  moments outside it (a select would read and write every parameter and both moments once more each step)."""
  options = update.UpdateOptions(losses.LossConfig(kind="distil", chunk_size=4), labels="topk")
  mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
  graphdef, params = sharding.init_params(lambda: model_lib.Transformer(CFG, rngs=nnx.Rngs(0)), mesh)
  tx = update.make_optimizer(OPTIM, 10)
  state = {"params": params, "opt_state": tx.init(params)}
  hlo = update.make_update(graphdef, tx, options).lower(state, _batch(0), None, jnp.int32(3)).compile().as_text()
  assert " conditional(" in hlo
  shape = "f32[" + ",".join(map(str, params["lm_head"]["kernel"].shape)) + "]"  # a shape only the LM head has
  selects = [line for line in hlo.splitlines() if re.search(rf"= {re.escape(shape)}\S* select\(", line)]
  assert all("/cond/" in line for line in selects), selects  # e.g. optax's clipping: inside the update branch


def _bytes_on(tree, device):
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)


def test_optimizer_state_is_sharded_like_the_parameters():
  """fsdp=8: Adam's mu and nu carry their parameter's sharding, and a device holds about 3x its parameter bytes.

  The bound (<= 3.3x) is params + mu + nu (3x) plus replicated scalars; moments replicated on every device (the bug
  this guards) give ~15x at this shape.
  """
  mesh = sharding.make_mesh({"fsdp": 8})
  _, params = sharding.init_params(lambda: model_lib.Transformer(CFG, rngs=nnx.Rngs(0)), mesh)
  tx = update.make_optimizer(OPTIM, 10)
  state = update.init_state(tx, params, mesh)
  flat_params = dict(jax.tree_util.tree_leaves_with_path(params))
  moments = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(state["opt_state"]):
    names = [getattr(k, "name", None) for k in path]
    if "mu" in names or "nu" in names:
      moments += 1
      param_path = path[names.index("mu" if "mu" in names else "nu") + 1 :]
      assert leaf.sharding.is_equivalent_to(flat_params[param_path].sharding, leaf.ndim), jax.tree_util.keystr(path)
    else:
      assert leaf.sharding.is_fully_replicated, jax.tree_util.keystr(path)
  assert moments == 2 * len(flat_params)
  sharded = [x for x in flat_params.values() if not x.sharding.is_fully_replicated]
  assert sharded, "the test model must have fsdp-sharded parameters"
  device = jax.devices()[0]
  ratio = _bytes_on(state, device) / _bytes_on(params, device)
  assert 2.9 < ratio <= 3.3, ratio


def test_batch_rows_are_checked_where_they_are_built():
  """The layout names every field once; a row builder that drops a field or gets a shape wrong is stopped there."""
  from distil_jax import batch as batch_lib

  layout = batch_lib.fields(prompt=P, new=N, group=G, labels="topk", top_k=K)
  rows = {k: v for k, v in _batch().items() if k in layout}
  checked = batch_lib.check(rows, layout)
  assert {k: (v.shape[1:], v.dtype.name) for k, v in checked.items()} == layout
  with pytest.raises(ValueError, match="differ from the layout"):
    batch_lib.check({k: v for k, v in rows.items() if k != "reward"}, layout)
  with pytest.raises(ValueError, match="'tokens' has rows of shape"):
    batch_lib.check({**rows, "tokens": rows["tokens"][:, :, :-1]}, layout)


def test_a_frozen_teacher_stays_at_the_start():
  """expert.ema_decay=1 (OPSD's teacher, frozen at the initial checkpoint): the teacher copy is bitwise the starting
  parameters after updates that move the student."""
  options = update.UpdateOptions(losses.LossConfig(kind="jsd", chunk_size=4), labels="device", ema_decay=1.0)
  mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
  graphdef, params = sharding.init_params(lambda: model_lib.Transformer(CFG, rngs=nnx.Rngs(0)), mesh)
  start = jax.device_get(params)
  tx = update.make_optimizer(OPTIM, 30)
  state = update.init_state(tx, params, mesh, ema=True)
  step = update.make_update(graphdef, tx, options)
  for _ in range(3):
    state, _ = step(state, _batch(0), None, jnp.int32(3))
  for a, b in zip(jax.tree.leaves(jax.device_get(state["ema"])), jax.tree.leaves(start), strict=True):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(jax.tree.leaves(jax.device_get(state["params"]))[0], jax.tree.leaves(start)[0])


def test_kept_rows_hold_every_labelled_row_in_the_smallest_size_that_splits():
  """B = 8 rows: sizes 2 (B/4) and 4 (B/2), each a multiple of the shard count, else every row (None)."""
  two = np.array([[1, 0], [0, 0], [0, 1], [0, 0]])
  np.testing.assert_array_equal(update.kept_rows(two, 1), [0, 5])
  np.testing.assert_array_equal(update.kept_rows(two, 4), [0, 1, 2, 5])  # 2 rows do not split over 4 devices
  three = np.array([[0, 0], [1, 0], [0, 1], [1, 0]])
  np.testing.assert_array_equal(update.kept_rows(three, 1), [0, 2, 5, 6])
  np.testing.assert_array_equal(update.kept_rows(np.zeros((4, 2)), 2), [0, 1])  # nothing labelled: the step still runs
  np.testing.assert_array_equal(update.kept_rows(np.array([[1, 1], [1, 0], [1, 0], [0, 0]]), 1), [0, 1, 2, 4])  # B/2
  assert update.kept_rows(np.array([[1, 1], [1, 1], [1, 0], [0, 0]]), 1) is None  # 5 do not: every row
  assert update.kept_rows(two, 8) is None


def _steps(mesh, options, batch, kept, dtype, steps=2):
  cfg = CFG if dtype == "float32" else dataclasses.replace(CFG, dtype=dtype)
  graphdef, params = sharding.init_params(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
  tx = update.make_optimizer(OPTIM, 10)
  state = update.init_state(tx, params, mesh)
  step = update.make_update(graphdef, tx, options, state_shardings=jax.tree.map(lambda x: x.sharding, state))
  figures = []
  with jax.set_mesh(mesh):
    args = (data.to_global(batch, mesh), None, jnp.int32(3), kept)
    for _ in range(steps):
      state, metrics = step(state, *args)
      figures.append(jax.device_get(metrics))
    flops = step.lower(state, *args).compile().cost_analysis()["flops"]  # the program just run (cached)
  return figures, jax.device_get(state["params"]), flops


@pytest.mark.parametrize(
  "kind,dtype,devices",
  [("distil", "float32", 1), ("jsd", "bfloat16", 8)],
)  # fmt: skip
def test_skipping_unlabelled_rows_changes_no_figure_and_no_parameter(kind, dtype, devices):
  """Two updates over the labelled rows only (`kept_rows`: 2 of 8 rows labelled) against two over every row, from the
  same start: the loss, every metric and the parameters agree, for DistIL (the score term, the ratio, the baseline)
  in float32 on one device, and for a divergence (JSD; reverse KL and tokenwise FCE are the same path) in bfloat16 on
  8 devices (data=2, fsdp=2, tensor=2: 4 rows kept, split over 4 shards) against the full step on one. Tolerances:
  1e-5 relative on figures (float32; 2e-2 in bfloat16, whose rounding depends on the batch shape), parameters 3e-5
  absolute as in the sharded test above (1.2e-2 in bfloat16, where a coordinate whose gradient rounds to the other
  sign moves by up to 2 lr = 6e-3 a step; a wrong row moves the figures). And the work is skipped: the
  compiled step over the kept rows costs under half the FLOPs of the full one (XLA's cost analysis, per device)."""
  options = update.UpdateOptions(losses.LossConfig(kind=kind, chunk_size=4, baseline="loo"), labels="device")
  batch = _batch(0)
  batch["teacher_valid"] = np.array([[1, 0], [0, 0], [0, 1], [0, 0]], np.int32)
  one = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
  mesh = one if devices == 1 else sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  kept = update.kept_rows(batch["teacher_valid"], sharding.batch_shards(mesh))
  assert len(kept) == (2 if devices == 1 else 4)
  full = _steps(one, options, batch, None, dtype)
  held = _steps(mesh, options, batch, kept, dtype)
  rtol, atol = (1e-5, 3e-5) if dtype == "float32" else (2e-2, 1.2e-2)
  for a, b in zip(held[0], full[0], strict=True):
    assert a.keys() == b.keys()
    for name in a:
      np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=1e-6, err_msg=name)
  for a, b in zip(jax.tree.leaves(held[1]), jax.tree.leaves(full[1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=atol)
  assert held[2] < 0.5 * full[2], (held[2], full[2])
