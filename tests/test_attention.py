"""Attention kernels against the einsum reference, on left-padded and packed rows, in float32 and bf16.

Splash runs in Pallas interpret mode on CPU (the kernel's own code, not a stand-in). cuDNN cannot run here: its tests
check what the cudnn plan hands to jax (rows compacted, causal + sequence lengths, or a mask for packed rows) by
running the identical `jax.nn.dot_product_attention` call with implementation="xla"; on a GPU the same call runs
cuDNN. Tolerances, as a fraction of the largest reference magnitude: float32 1e-5 (reduction order only; measured
<= 5e-7), bf16 1e-2 (two bf16 ulps; splash, which keeps its accumulators in float32, measured one ulp).
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distil_jax import attention, data, decode, sharding
from distil_jax import model as model_lib

B, T, H, K, E = 4, 20, 4, 2, 16
ONE_PER_ROW = np.array(
  [[0] * 5 + [1] * 15, [1] * 20, [0] * 19 + [1], [0] * 2 + [1] * 18], np.int32
)  # left padding, none, all but one
PACKED = np.array(
  [[0] * 3 + [1] * 6 + [2] * 11, [1] * 6 + [2] * 8 + [3] * 4 + [0] * 2, [1] * 20, [5] * 10 + [7] * 10], np.int32
)
TOL = {"float32": 1e-5, "bfloat16": 1e-2}
CFG = model_lib.ModelConfig(
  vocab_size=61,
  hidden_size=64,
  intermediate_size=80,
  num_hidden_layers=2,
  num_attention_heads=H,
  num_key_value_heads=K,
  head_dim=E,
  arch="qwen3",
  rope_theta=100.0,
)


@pytest.fixture
def as_if_gpu(monkeypatch):
  """Let resolve() pick cudnn and run the cudnn plan's jax call through the XLA implementation."""
  monkeypatch.setattr(attention, "_backend", lambda: "gpu")
  monkeypatch.setattr(attention, "_CUDNN", "xla")
  monkeypatch.setattr(attention, "CUDNN_DTYPES", ("float32", "bfloat16", "float16"))


def _qkv(dtype, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(B, T, n, E)), dtype) for n in (H, K, K)]


def _run(impl, q, k, v, segment_ids, packed):
  """Kernel output in input row order, as the model uses it (rows reordered at entry and restored at exit)."""
  plan = attention.make_plan(impl, jnp.asarray(segment_ids), packed=packed)
  out = attention.attend(plan.to_kernel_order(q), plan.to_kernel_order(k), plan.to_kernel_order(v), plan)
  return plan.to_input_order(out)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["xla", "splash", "cudnn"])
@pytest.mark.parametrize("segment_ids,packed", [(ONE_PER_ROW, False), (PACKED, True)], ids=["one_per_row", "packed"])
def test_kernel_matches_einsum(impl, dtype, segment_ids, packed, as_if_gpu):
  q, k, v = _qkv(dtype)
  real = segment_ids > 0
  cot = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, H, E)) * real[..., None, None], dtype)

  def value_and_vjp(fn):
    out, vjp = jax.vjp(fn, q, k, v)
    return [np.asarray(x, np.float32) for x in (out, *vjp(cot))]

  want = value_and_vjp(lambda q, k, v: attention.attend_einsum(q, k, v, attention.segment_mask(segment_ids)))
  got = value_and_vjp(lambda q, k, v: _run(impl, q, k, v, segment_ids, packed))
  tol = TOL[dtype]
  got[0], want[0] = got[0][real], want[0][real]  # outputs at padding queries are don't-care
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, atol=tol * np.abs(w).max(), rtol=0)


def test_cudnn_plan_is_maskless_and_exact_for_one_sequence_per_row():
  """One sequence per row: the kernel gets causal + lengths of compacted rows, no [B,T,S] array."""
  plan = attention.make_plan("cudnn", jnp.asarray(ONE_PER_ROW))
  assert plan.mask_BxTxS is None
  np.testing.assert_array_equal(plan.lengths_B, ONE_PER_ROW.sum(1))
  compacted = np.asarray(plan.segment_ids_BxT)
  for row, n in zip(compacted, ONE_PER_ROW.sum(1), strict=True):
    assert (row[:n] > 0).all() and (row[n:] == 0).all()  # real tokens first: causal masking is exact
  x = jnp.arange(B * T).reshape(B, T)
  np.testing.assert_array_equal(plan.to_input_order(plan.to_kernel_order(x)), x)
  packed = attention.make_plan("cudnn", jnp.asarray(PACKED), packed=True)
  assert packed.mask_BxTxS.shape == (B, T, T) and packed.mask_BxTxS.dtype == jnp.bool_  # one per row, not per head


def _model(impl, dtype, seed=0):
  cfg = dataclasses.replace(CFG, attention=impl, dtype=dtype)
  graphdef, params = nnx.split(model_lib.Transformer(cfg, rngs=nnx.Rngs(seed)), nnx.Param)
  return graphdef, params.to_pure_dict()


def _relative_error(got, want):
  """Largest |got - want| over the largest |want|, across the logits or across every gradient leaf."""
  pairs = zip(got, want, strict=True)
  return max(float(np.abs(np.float32(g) - np.float32(w)).max() / np.abs(np.float32(w)).max()) for g, w in pairs)


@functools.cache
def _logits_and_grads(impl, dtype, rows: str, packed: bool):
  """Logits at real positions and every parameter's gradient of a fixed projection of the logits."""
  segment_ids = jnp.asarray({"one_per_row": ONE_PER_ROW, "packed": PACKED}[rows])
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, CFG.vocab_size, (B, T)), jnp.int32)
  w = jnp.asarray(np.random.default_rng(3).normal(size=(B, T, CFG.vocab_size)), jnp.float32)
  graphdef, params = _model(impl, dtype)

  def f(p):
    logits = model_lib.merge_for_compute(graphdef, p)(tokens, segment_ids_BxT=segment_ids, packed=packed)
    return jnp.sum(jnp.where(segment_ids[..., None] > 0, logits * w, 0.0)), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
  return np.asarray(logits)[np.asarray(segment_ids) > 0], jax.tree.leaves(grads)


@pytest.mark.parametrize("impl,rows,packed", [("splash", "packed", True), ("cudnn", "one_per_row", False)])
def test_model_matches_einsum(impl, rows, packed, as_if_gpu):
  """Logits and parameter gradients of the whole model (2 scanned layers); rows left-padded, unpadded and packed
  (one sequence per row, the cuDNN plan without a mask, for cudnn). Every kernel in both dtypes and both layouts is
  covered above; the XLA path is the CPU default that the HF tests run.

  float32, within 1e-5 of the einsum model relative to the largest value (measured <= 8e-7).
  """
  want = _logits_and_grads("einsum", "float32", rows, packed)
  got = _logits_and_grads(impl, "float32", rows, packed)
  assert _relative_error([got[0]], [want[0]]) <= 1e-5, "logits"
  assert _relative_error(got[1], want[1]) <= 1e-5, "gradients"


@functools.cache
def _full_forward_cached():
  seq = jnp.asarray(np.random.default_rng(4).integers(1, CFG.vocab_size, (B, T)), jnp.int32)
  graphdef, params = _model("einsum", "float32", seed=1)
  return seq, np.asarray(
    jax.jit(lambda p: nnx.merge(graphdef, p)(seq, segment_ids_BxT=jnp.asarray(ONE_PER_ROW)))(params)
  )


@pytest.mark.parametrize("impl", ["splash", "cudnn"])  # xla: the default, in test_sampler
def test_prefill_with_the_kernel_then_decode(impl, as_if_gpu):
  """The sampler's prefill runs the kernel and keeps the keys and values in slot order; its decode steps continue
  exactly (f32, 1e-5) from the full forward pass's logits."""
  graphdef, params = _model(impl, "float32", seed=1)
  seq, full = _full_forward_cached()
  seg = np.asarray(ONE_PER_ROW)
  positions = np.asarray(model_lib.default_positions(jnp.asarray(seg)))
  p = 12

  @jax.jit
  def prefill(params):
    model = nnx.merge(graphdef, params)
    logits, cache = decode.prefill(model, seq[:, :p], jnp.asarray(seg[:, :p]))
    return decode.prepare(model), logits, decode.grow(cache, B, T - p, CFG)

  weights, logits, cache = prefill(params)
  step = jax.jit(decode.step, static_argnums=1)
  got = [np.asarray(logits)]
  for t in range(p, T - 1):
    logits, cache = step(weights, CFG, cache, seq[:, t], jnp.asarray(positions[:, t]), t - p)
    got.append(np.asarray(logits))
  got = np.stack(got, axis=1)
  valid = seg[:, p - 1 : T - 1] > 0
  np.testing.assert_allclose(got[valid], full[:, p - 1 : -1][valid], atol=1e-5, rtol=0)


@functools.cache
def _loss_and_grads(impl, mesh_axes: tuple):
  """Mean square of the logits at real positions (one sequence per row, left-padded) and its parameter gradients."""
  mesh = sharding.make_mesh(dict(mesh_axes), jax.devices()[: 1 if mesh_axes == (("fsdp", 1),) else None])
  tokens = np.random.default_rng(5).integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
  graphdef, params = sharding.init_params(
    lambda: model_lib.Transformer(dataclasses.replace(CFG, attention=impl), rngs=nnx.Rngs(0)), mesh
  )
  batch = data.to_global({"t": tokens, "s": ONE_PER_ROW}, mesh)

  @jax.jit
  def f(params, batch):
    def loss(p):  # over real positions: outputs at padding queries are don't-care
      logits = nnx.merge(graphdef, p)(batch["t"], segment_ids_BxT=batch["s"])
      return jnp.mean(jnp.where(batch["s"][..., None] > 0, logits, 0.0) ** 2)

    return jax.value_and_grad(loss)(params)

  with jax.set_mesh(mesh):
    return jax.device_get(f(params, batch))


@pytest.mark.parametrize("impl", ["splash", "cudnn"])
def test_sharded_kernel_equals_single_device(impl, as_if_gpu):
  """(data=2, fsdp=2, tensor=2): splash under shard_map (examples and heads split), cudnn's row compaction under
  GSPMD; loss and gradients equal the single-device einsum model's (float32; 1e-5 relative, gradients 1e-6
  absolute against values up to ~1e-2)."""
  want = _loss_and_grads("einsum", (("fsdp", 1),))
  got = _loss_and_grads(impl, (("data", 2), ("fsdp", 2), ("tensor", 2)))
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
    np.testing.assert_allclose(g, w, atol=1e-6, rtol=0)


def test_resolve_picks_per_backend_and_refuses_what_cannot_run(monkeypatch):
  monkeypatch.setattr(attention, "_cudnn_max_head_dim", lambda: 128)
  for backend, dtype, head_dim, want in [
    ("cpu", "bfloat16", 64, "xla"),
    ("gpu", "bfloat16", 128, "cudnn"),
    ("gpu", "float32", 128, "xla"),  # cuDNN flash has no float32
    ("gpu", "bfloat16", 256, "xla"),  # head dim above this GPU's limit
    ("tpu", "bfloat16", 128, "splash"),
  ]:
    monkeypatch.setattr(attention, "_backend", lambda b=backend: b)
    assert attention.resolve("auto", dtype, head_dim) == want, (backend, dtype, head_dim)
    assert attention.resolve("einsum", dtype, head_dim) == "einsum"
  monkeypatch.setattr(attention, "_backend", lambda: "cpu")
  with pytest.raises(ValueError, match="model.attention='cudnn' needs an NVIDIA GPU"):
    attention.resolve("cudnn", "bfloat16", 64)
  monkeypatch.setattr(attention, "_backend", lambda: "gpu")
  with pytest.raises(ValueError, match="model.dtype"):
    attention.resolve("cudnn", "float32", 64)
  with pytest.raises(ValueError, match="model.attention='flash'"):
    model_lib.ModelConfig(**{**CFG.__dict__, "attention": "flash"})


def test_splash_never_builds_the_score_matrix():
  """The compiled splash program (interpret mode) holds no [.., T, S] array: scores exist one tile at a time."""
  t = 1024  # two 512-tiles each way, so a whole score matrix would stand out
  q, k, v = (jax.ShapeDtypeStruct((1, t, n, E), jnp.bfloat16) for n in (H, K, K))
  plan = attention.make_plan("splash", jnp.ones((1, t), jnp.int32))
  hlo = jax.jit(attention.attend).lower(q, k, v, plan).compile().as_text()
  assert not re.search(rf"\[[\d,]*{t},{t}\]", hlo)
