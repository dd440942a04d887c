"""The blocks of the policy (`model.py`): RMSNorm, RoPE, grouped-query attention, the SwiGLU MLP and the decoder
layer that holds them, with Hugging Face's parameter names and logical axis names on every parameter.

`decode.py` reuses `rms_norm` and the RoPE functions, so that the sampler's decode step rounds as training does.

Dims: B batch, T query time, S key time (sequence or cache slots), D model width, H query heads, K key/value heads,
E head dim, F MLP width, N heads of either kind.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from distil_jax import attention, sharding

if TYPE_CHECKING:
  from distil_jax.model import ModelConfig


def param_init(cfg: ModelConfig, *axes: str):
  return nnx.with_partitioning(nnx.initializers.normal(cfg.initializer_range), axes, eager_sharding=False)


def linear(cfg, rngs, d_in, d_out, axes, bias=False):
  return nnx.Linear(
    d_in,
    d_out,
    use_bias=bias,
    dtype=cfg.compute_dtype,
    param_dtype=jnp.float32,
    kernel_init=param_init(cfg, *axes),
    bias_init=nnx.with_partitioning(nnx.initializers.zeros, axes[1:], eager_sharding=False),
    rngs=rngs,
  )


class RMSNorm(nnx.Module):
  """RMSNorm as Hugging Face computes it: statistics in float32, scale applied in the compute dtype."""

  def __init__(self, dim: int, eps: float, dtype, axis_name: str = "norm"):
    self.eps, self.dtype = eps, dtype
    init = nnx.with_partitioning(nnx.initializers.ones, (axis_name,), eager_sharding=False)
    self.weight = nnx.Param(init(jax.random.key(0), (dim,), jnp.float32))

  def __call__(self, x):
    return rms_norm(x, self.weight[...], self.eps, self.dtype)


def rms_norm(x, weight, eps: float, dtype):
  """RMSNorm's arithmetic, shared with the sampler's decode step (`decode.py`) so that both round alike."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight.astype(dtype) * x32.astype(dtype)


ROPE_SCALINGS = ("llama3",)  # rope_type values besides "default"


def rope_inverse_frequencies(cfg: ModelConfig):
  """Inverse frequencies [E/2], with Llama-3 scaling when the checkpoint asks for it."""
  e = cfg.head_size
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
  if cfg.rope_scaling is None:
    return inv
  rs = dict(cfg.rope_scaling)
  kind = rs.get("rope_type", rs.get("type", "default"))
  if kind == "default":
    return inv
  if kind not in ROPE_SCALINGS:
    raise ValueError(f"rope scaling {kind!r} is not supported (supported: default, {', '.join(ROPE_SCALINGS)})")
  factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
  old_len = rs["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv
  smooth = (old_len / wavelen - low) / (high - low)
  scaled = jnp.where(wavelen > old_len / low, inv / factor, inv)
  mid = (1 - smooth) * scaled / factor + smooth * scaled
  is_mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
  return jnp.where(is_mid, mid, scaled)


def apply_rope(x_BxTxNxE, positions_BxT, inv_freq):
  """Rotary embedding in Hugging Face's half-split layout (`rotate_half`)."""
  angles = positions_BxT.astype(jnp.float32)[..., None] * inv_freq  # [B,T,E/2]
  cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  x = x_BxTxNxE.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
  return (x * cos + rotated * sin).astype(x_BxTxNxE.dtype)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, e = cfg.hidden_size, cfg.head_size
    h, k = cfg.num_attention_heads, cfg.num_key_value_heads
    self.cfg = cfg
    self.q_proj = linear(cfg, rngs, d, h * e, ("embed", "heads"), cfg.qkv_bias)
    self.k_proj = linear(cfg, rngs, d, k * e, ("embed", "kv_heads"), cfg.qkv_bias)
    self.v_proj = linear(cfg, rngs, d, k * e, ("embed", "kv_heads"), cfg.qkv_bias)
    self.o_proj = linear(cfg, rngs, h * e, d, ("heads", "embed"))
    if cfg.qk_norm:
      self.q_norm = RMSNorm(e, cfg.rms_norm_eps, cfg.compute_dtype, "head_dim")
      self.k_norm = RMSNorm(e, cfg.rms_norm_eps, cfg.compute_dtype, "head_dim")

  def __call__(self, x_BxTxD, positions_BxT, inv_freq, plan):
    """(output [B,T,D], this layer's keys and values [B,T,K,E] in the kernel's token order)."""
    cfg = self.cfg
    b, t, _ = x_BxTxD.shape
    q = self.q_proj(x_BxTxD).reshape(b, t, cfg.num_attention_heads, cfg.head_size)
    k = self.k_proj(x_BxTxD).reshape(b, t, cfg.num_key_value_heads, cfg.head_size)
    v = self.v_proj(x_BxTxD).reshape(b, t, cfg.num_key_value_heads, cfg.head_size)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, positions_BxT, inv_freq), apply_rope(k, positions_BxT, inv_freq)
    out = attention.attend(q, k, v, plan)
    return self.o_proj(out.reshape(b, t, -1)), (k, v)


class MLP(nnx.Module):
  """SwiGLU."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = linear(cfg, rngs, d, f, ("embed", "mlp"))
    self.up_proj = linear(cfg, rngs, d, f, ("embed", "mlp"))
    self.down_proj = linear(cfg, rngs, f, d, ("mlp", "embed"))

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.compute_dtype)
    self.self_attn = Attention(cfg, rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.compute_dtype)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, positions, inv_freq, plan):
    attn, kv = self.self_attn(self.input_layernorm(x), positions, inv_freq, plan)
    x = x + attn
    x = x + self.mlp(self.post_attention_layernorm(x))
    return sharding.constrain(x, ("batch", None, None)), kv
