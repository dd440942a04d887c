"""Attention kernels behind one call, and the form of the mask that each kernel reads.

The policy needs three masks: causal, left padding (the sampler's prompts and the update's [prompt | response] rows)
and packed segments (segment ids: 0 is padding, equal positive ids are one sequence). The reference (`einsum`) builds
float32 scores [B,K,G,T,S] against a dense [B,T,S] mask: 4 GiB per layer for a 1B model at 8 x 2048 tokens. The
kernels never build them:

  cudnn   cuDNN flash attention through `jax.nn.dot_product_attention`. It reads causal masking and per-row sequence
          lengths (right padding) natively, so a plan for it compacts each row (real tokens first, their order kept)
          once at the model's input and restores the order once at its output: exact, with no mask at all. Rows that
          hold several sequences (`packed=True`) take a boolean [B,1,T,S] mask instead (cuDNN adds it as a bias):
          never per head, never float32. bf16 / fp16 only.
  splash  Pallas splash attention (TPU; interpret mode elsewhere, for tests). It reads segment ids natively under a
          static causal mask, so left padding and packing need no change of layout.
  xla     `jax.nn.dot_product_attention`'s XLA path with the dense mask: the CPU default.
  einsum  the reference above.

`auto` is cudnn on GPU (when the dtype and head size allow it), splash on TPU, xla elsewhere. Decoding (one new
token against the KV cache) always takes the einsum path: it reads the cache once and is bound by that read.

Dims: B batch, T query time, S key time, H query heads, K key/value heads, G = H // K, E head dim.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from distil_jax import sharding

IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn", "splash")
NEG_INF = -1e30  # finite, so fully masked rows (padding queries) give a uniform softmax, not NaN
CUDNN_DTYPES = ("bfloat16", "float16")
_CUDNN = "cudnn"  # the `implementation` handed to jax for cudnn plans (tests run the same call through "xla")
_SPLASH_LANES = 128  # splash tiles the sequence in multiples of this


def _backend() -> str:
  return jax.default_backend()


def _cudnn_max_head_dim() -> int:
  capability = getattr(jax.devices()[0], "compute_capability", "0")
  return 256 if float(capability) >= 9.0 else 128  # Hopper and later take head dims up to 256


def resolve(name: str, dtype, head_dim: int) -> str:
  """The implementation `model.attention=name` runs as on this backend; an explicit choice it cannot run is refused."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"model.attention={name!r}; expected one of {IMPLEMENTATIONS}")
  backend, dtype = _backend(), jnp.dtype(dtype).name
  cudnn_ok = dtype in CUDNN_DTYPES and head_dim % 8 == 0
  if name == "auto":
    if backend in ("gpu", "cuda") and cudnn_ok and head_dim <= _cudnn_max_head_dim():
      return "cudnn"
    return "splash" if backend == "tpu" else "xla"
  if name == "cudnn":
    if backend not in ("gpu", "cuda"):
      raise ValueError(f"model.attention='cudnn' needs an NVIDIA GPU; this backend is {backend}")
    if not cudnn_ok:
      raise ValueError(
        f"model.attention='cudnn' needs model.dtype in {CUDNN_DTYPES} and a head dim that is a multiple of 8; "
        f"got {dtype}, {head_dim}"
      )
  return name


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Plan:
  """Which keys each query sees, in the form the chosen kernel reads; built once per forward pass, shared by layers.

  Arrays are in kernel row order. `order_BxT` (cudnn only) is the row permutation applied at the model's input:
  kernel row position j holds original position order[b, j].
  """

  impl: str = dataclasses.field(metadata=dict(static=True))
  segment_ids_BxT: jax.Array
  mask_BxTxS: jax.Array | None = None  # einsum, xla, packed cudnn
  lengths_B: jax.Array | None = None  # cudnn: real tokens per (compacted) row
  order_BxT: jax.Array | None = None
  inverse_BxT: jax.Array | None = None

  def to_kernel_order(self, x_BxT_):
    return x_BxT_ if self.order_BxT is None else _take_rows(x_BxT_, self.order_BxT)

  def to_input_order(self, x_BxT_):
    return x_BxT_ if self.inverse_BxT is None else _take_rows(x_BxT_, self.inverse_BxT)


def _take_rows(x, index_BxT):
  index = index_BxT.reshape(index_BxT.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def segment_mask(segment_ids_BxT):
  """Causal mask restricted to the query's own segment; padding keys (segment 0) are never attended."""
  t = segment_ids_BxT.shape[1]
  causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
  same = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  return causal[None] & same & (segment_ids_BxT[:, None, :] > 0)


def make_plan(impl: str, segment_ids_BxT, *, packed: bool = False) -> Plan:
  """The plan for self-attention over rows with these segment ids.

  packed=False promises that each row's real tokens form one sequence (left, right or no padding): the cudnn plan
  then needs no mask. The other kernels read segment ids and are exact either way.
  """
  if impl in ("einsum", "xla") or (impl == "cudnn" and packed):
    return Plan(impl, segment_ids_BxT, mask_BxTxS=segment_mask(segment_ids_BxT))
  if impl == "splash":
    return Plan(impl, segment_ids_BxT)
  if impl != "cudnn":
    raise ValueError(f"no attention plan for {impl!r}")
  real = segment_ids_BxT > 0
  order = jnp.argsort(~real, axis=1, stable=True).astype(jnp.int32)  # real tokens first, in their order
  inverse = jnp.argsort(order, axis=1).astype(jnp.int32)
  lengths = jnp.sum(real, axis=1, dtype=jnp.int32)
  return Plan(impl, _take_rows(segment_ids_BxT, order), lengths_B=lengths, order_BxT=order, inverse_BxT=inverse)


def attend_einsum(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, mask_BxTxS):
  """The reference: grouped-query attention with float32 scores and softmax."""
  b, t, h, e = q_BxTxHxE.shape
  kv = k_BxSxKxE.shape[2]
  q = q_BxTxHxE.reshape(b, t, kv, h // kv, e)
  logits = jnp.einsum("btkge,bske->bkgts", q, k_BxSxKxE, preferred_element_type=jnp.float32)
  logits = jnp.where(mask_BxTxS[:, None, None], logits * e**-0.5, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BxSxKxE.dtype)
  out = jnp.einsum("bkgts,bske->btkge", probs, v_BxSxKxE)
  return out.reshape(b, t, h, e)


def attend(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, plan: Plan):
  """Causal self-attention of T queries over the same T positions, masked as `plan` says; output [B,T,H,E]."""
  if plan.impl == "einsum":
    return attend_einsum(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, plan.mask_BxTxS)
  if plan.impl == "splash":
    return _splash(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, plan.segment_ids_BxT)
  implementation = "xla" if plan.impl == "xla" else _CUDNN
  if plan.lengths_B is not None:
    return jax.nn.dot_product_attention(
      q_BxTxHxE,
      k_BxTxKxE,
      v_BxTxKxE,
      is_causal=True,
      query_seq_lengths=plan.lengths_B,
      key_value_seq_lengths=plan.lengths_B,
      implementation=implementation,
    )
  return jax.nn.dot_product_attention(
    q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, mask=plan.mask_BxTxS[:, None], is_causal=True, implementation=implementation
  )


def _splash_block(t: int) -> int:
  return next(b for b in (512, 256, _SPLASH_LANES) if t % b == 0)


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, t: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # TPU kernels: imported only when used

  b = _splash_block(t)
  sizes = sa.BlockSizes(block_q=b, block_kv=b, block_q_dkv=b, block_kv_dkv=b, block_q_dq=b, block_kv_dq=b)
  mask = sa.MultiHeadMask([sa.CausalMask((t, t)) for _ in range(heads)])
  with jax.ensure_compile_time_eval():  # the block tables are constants, safe to reuse across traces
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret), sa


def _splash(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, segment_ids_BxT):
  """Splash attention per example (vmap over B) on [heads, T, E]; T padded to the kernel's tile, under shard_map
  on a mesh (a Pallas call has no automatic SPMD partitioning): examples over the batch axes, heads over `tensor`."""
  b, t, h, e = q_BxTxHxE.shape
  kv = k_BxTxKxE.shape[2]
  tp = -(-t // _SPLASH_LANES) * _SPLASH_LANES
  pad = ((0, 0), (0, tp - t), (0, 0), (0, 0))
  scale = jnp.asarray(e**-0.5, jnp.float32)
  q = jnp.pad((q_BxTxHxE.astype(jnp.float32) * scale).astype(q_BxTxHxE.dtype), pad).transpose(0, 2, 1, 3)
  k = jnp.pad(k_BxTxKxE, pad).transpose(0, 2, 1, 3)
  v = jnp.pad(v_BxTxKxE, pad).transpose(0, 2, 1, 3)
  seg = jnp.pad(segment_ids_BxT.astype(jnp.int32), ((0, 0), (0, tp - t)))  # padded tail: later keys, never seen

  mesh = jax.sharding.get_abstract_mesh()
  batch_axes, head_axis = _splash_axes(b, h, kv)
  shards = 1 if head_axis is None else mesh.shape[head_axis]
  kernel, sa = _splash_kernel(h // shards, tp, _backend() != "tpu")

  def run(q, k, v, seg):
    return jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, sa.SegmentIds(q=s1, kv=s1)))(q, k, v, seg)

  if batch_axes is not None or head_axis is not None:
    spec = jax.sharding.PartitionSpec(batch_axes, head_axis, None, None)
    seg_spec = jax.sharding.PartitionSpec(batch_axes, None)
    run = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec, seg_spec), out_specs=spec, check_vma=False)
  out = run(q, k, v, seg)
  return out.transpose(0, 2, 1, 3)[:, :t]


def _splash_axes(b: int, h: int, kv: int):
  """Mesh axes for the examples and for the heads (one axis that splits query and key/value heads evenly)."""
  spec = sharding.activation_spec(("batch", "heads"), (b, h))
  if spec is None:
    return None, None
  batch, heads = spec
  if heads is not None and (not isinstance(heads, str) or kv % jax.sharding.get_abstract_mesh().shape[heads]):
    heads = None
  return batch, heads
