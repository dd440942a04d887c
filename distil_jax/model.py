"""The policy: a decoder-only transformer of the Llama family in Flax NNX.

One module covers Llama, Qwen2 (bias on q/k/v) and Qwen3 (RMSNorm on q and k per head), because the three differ
only in those two switches. Parameter names match Hugging Face's (`q_proj`, `gate_proj`, `input_layernorm`, ...) so
that `hf.py` is a rule plus transposes, and every parameter carries logical axis names for `sharding.py`.

Master parameters are float32; `dtype` picks the compute dtype (bf16 on accelerators). Attention softmax, RMSNorm
statistics and logits are computed in float32 whatever the compute dtype.

The KV cache is a plain pytree passed in and out (not NNX state), so the sampler's decode loop is an ordinary
`jax.lax.while_loop` over arrays.

Dims: B batch, T query time, S key time (sequence or cache slots), D model width, H query heads, K key/value heads,
G = H // K query heads per KV head, E head dim, F MLP width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from distil_jax import sharding

ARCHS = ("llama", "qwen2", "qwen3")
_NEG_INF = -1e30  # finite, so fully masked rows (padding queries) give a uniform softmax, not NaN


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyper-parameters; field names follow Hugging Face's `config.json`."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int | None = None  # None: hidden_size // num_attention_heads
  arch: str = "llama"
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None  # Llama-3 style frequency scaling, as sorted items
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  attention_bias: bool | None = None  # None: the arch's default (True for qwen2)
  max_position_embeddings: int = 4096
  initializer_range: float = 0.02
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  pad_token_id: int | None = None
  dtype: str = "float32"  # compute dtype; parameters are always float32
  remat: bool = False  # recompute each layer in the backward pass (activation memory ~ one layer)

  def __post_init__(self):
    if self.arch not in ARCHS:
      raise ValueError(f"model.arch={self.arch!r}; expected one of {ARCHS}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
        f"num_attention_heads={self.num_attention_heads} is not a multiple of "
        f"num_key_value_heads={self.num_key_value_heads}"
      )

  @property
  def head_size(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @property
  def qkv_bias(self) -> bool:
    return self.arch == "qwen2" if self.attention_bias is None else self.attention_bias

  @property
  def qk_norm(self) -> bool:
    return self.arch == "qwen3"

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def num_params(self) -> int:
    d, f, e = self.hidden_size, self.intermediate_size, self.head_size
    h, k = self.num_attention_heads, self.num_key_value_heads
    attn = d * e * (2 * h + 2 * k) + (e * (h + 2 * k) if self.qkv_bias else 0) + (2 * e if self.qk_norm else 0)
    layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_word_embeddings else d * self.vocab_size
    return self.vocab_size * d + self.num_hidden_layers * layer + d + head


def _init(cfg: ModelConfig, *axes: str):
  return nnx.with_partitioning(nnx.initializers.normal(cfg.initializer_range), axes, eager_sharding=False)


def _linear(cfg, rngs, d_in, d_out, axes, bias=False):
  return nnx.Linear(
    d_in,
    d_out,
    use_bias=bias,
    dtype=cfg.compute_dtype,
    param_dtype=jnp.float32,
    kernel_init=_init(cfg, *axes),
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
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(self.dtype) * x32.astype(self.dtype)


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
  if kind != "llama3":
    raise ValueError(f"rope scaling {kind!r} is not supported (supported: default, llama3)")
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


def attend(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, mask_BxTxS):
  """Grouped-query attention; softmax in float32."""
  b, t, h, e = q_BxTxHxE.shape
  kv = k_BxSxKxE.shape[2]
  q = q_BxTxHxE.reshape(b, t, kv, h // kv, e)
  logits = jnp.einsum("btkge,bske->bkgts", q, k_BxSxKxE, preferred_element_type=jnp.float32)
  logits = jnp.where(mask_BxTxS[:, None, None], logits * e**-0.5, _NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BxSxKxE.dtype)
  out = jnp.einsum("bkgts,bske->btkge", probs, v_BxSxKxE)
  return out.reshape(b, t, h, e)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, e = cfg.hidden_size, cfg.head_size
    h, k = cfg.num_attention_heads, cfg.num_key_value_heads
    self.cfg = cfg
    self.q_proj = _linear(cfg, rngs, d, h * e, ("embed", "heads"), cfg.qkv_bias)
    self.k_proj = _linear(cfg, rngs, d, k * e, ("embed", "kv_heads"), cfg.qkv_bias)
    self.v_proj = _linear(cfg, rngs, d, k * e, ("embed", "kv_heads"), cfg.qkv_bias)
    self.o_proj = _linear(cfg, rngs, h * e, d, ("heads", "embed"))
    if cfg.qk_norm:
      self.q_norm = RMSNorm(e, cfg.rms_norm_eps, cfg.compute_dtype, "head_dim")
      self.k_norm = RMSNorm(e, cfg.rms_norm_eps, cfg.compute_dtype, "head_dim")

  def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, inv_freq, kv_cache=None, cache_index=None):
    cfg = self.cfg
    b, t, _ = x_BxTxD.shape
    q = self.q_proj(x_BxTxD).reshape(b, t, cfg.num_attention_heads, cfg.head_size)
    k = self.k_proj(x_BxTxD).reshape(b, t, cfg.num_key_value_heads, cfg.head_size)
    v = self.v_proj(x_BxTxD).reshape(b, t, cfg.num_key_value_heads, cfg.head_size)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, positions_BxT, inv_freq), apply_rope(k, positions_BxT, inv_freq)
    if kv_cache is not None:
      start = (0, cache_index, 0, 0)
      kv_cache = {
        "k": jax.lax.dynamic_update_slice(kv_cache["k"], k.astype(kv_cache["k"].dtype), start),
        "v": jax.lax.dynamic_update_slice(kv_cache["v"], v.astype(kv_cache["v"].dtype), start),
      }
      k, v = kv_cache["k"].astype(q.dtype), kv_cache["v"].astype(q.dtype)
    out = attend(q, k, v, mask_BxTxS).reshape(b, t, -1)
    return self.o_proj(out), kv_cache


class MLP(nnx.Module):
  """SwiGLU."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = _linear(cfg, rngs, d, f, ("embed", "mlp"))
    self.up_proj = _linear(cfg, rngs, d, f, ("embed", "mlp"))
    self.down_proj = _linear(cfg, rngs, f, d, ("mlp", "embed"))

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.compute_dtype)
    self.self_attn = Attention(cfg, rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.compute_dtype)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, positions, mask, inv_freq, kv_cache=None, cache_index=None):
    attn, kv_cache = self.self_attn(self.input_layernorm(x), positions, mask, inv_freq, kv_cache, cache_index)
    x = x + attn
    x = x + self.mlp(self.post_attention_layernorm(x))
    return sharding.constrain(x, ("batch", None, None)), kv_cache


class Decoder(nnx.Module):
  """Hugging Face's `model.` prefix: embeddings, layers, final norm."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.embed_tokens = nnx.Embed(
      cfg.vocab_size,
      cfg.hidden_size,
      dtype=cfg.compute_dtype,
      param_dtype=jnp.float32,
      embedding_init=_init(cfg, "vocab", "embed"),
      rngs=rngs,
    )
    self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.compute_dtype)


def default_positions(segment_ids_BxT):
  """Position of each token inside its segment; padding (segment 0) gets 0.

  Covers left-padded rows (one segment after the padding) and packed rows (several segments).
  """
  t = segment_ids_BxT.shape[1]
  idx = jnp.arange(t)[None, :]
  starts = jnp.concatenate(
    [jnp.ones_like(segment_ids_BxT[:, :1], bool), segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], 1
  )
  seg_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return jnp.where(segment_ids_BxT > 0, idx - seg_start, 0).astype(jnp.int32)


def sequence_mask(segment_ids_BxT):
  """Causal mask restricted to the query's own segment; padding keys (segment 0) are never attended."""
  t = segment_ids_BxT.shape[1]
  causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
  same = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  return causal[None] & same & (segment_ids_BxT[:, None, :] > 0)


def cache_mask(valid_BxS, cache_index, t):
  """Queries sit in cache slots [cache_index, cache_index + t); each sees valid slots at or before its own."""
  s = valid_BxS.shape[1]
  query_slot = cache_index + jnp.arange(t)
  return valid_BxS[:, None, :] & (jnp.arange(s)[None, None, :] <= query_slot[None, :, None])


def init_cache(cfg: ModelConfig, batch: int, slots: int, dtype=None):
  """An empty KV cache: per layer k and v [B,S,K,E], and which slots hold real tokens."""
  dtype = dtype or cfg.compute_dtype
  shape = (batch, slots, cfg.num_key_value_heads, cfg.head_size)
  layers = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_hidden_layers)]
  return {"layers": layers, "valid": jnp.zeros((batch, slots), bool)}


class Transformer(nnx.Module):
  """Causal LM. `model(tokens)` gives float32 logits; `hidden_states` and `lm_head_kernel` feed the fused loss."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.model = Decoder(cfg, rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = _linear(cfg, rngs, cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"))

  def lm_head_kernel(self):
    """The LM head as a [D,V] float32 array (the transposed embedding when tied)."""
    if self.config.tie_word_embeddings:
      return self.model.embed_tokens.embedding[...].T
    return self.lm_head.kernel[...]

  def logits(self, hidden_BxTxD):
    kernel = self.lm_head_kernel().astype(self.config.compute_dtype)
    logits = jnp.einsum("btd,dv->btv", hidden_BxTxD, kernel, preferred_element_type=jnp.float32)
    return sharding.constrain(logits, ("batch", None, "vocab"))

  def hidden_states(self, tokens_BxT, *, positions_BxT=None, segment_ids_BxT=None, cache=None, cache_index=None):
    """Final-norm hidden states [B,T,D] (and the updated cache when one is given).

    segment_ids: 0 marks padding, equal positive ids mark one sequence (packing); default: all ones.
    With a cache, the tokens fill slots [cache_index, cache_index + T) and attend to every valid slot before.
    """
    cfg = self.config
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones(tokens_BxT.shape, jnp.int32)
    if positions_BxT is None:
      positions_BxT = default_positions(segment_ids_BxT)
    if cache is None:
      mask = sequence_mask(segment_ids_BxT)
    else:
      valid = jax.lax.dynamic_update_slice(cache["valid"], segment_ids_BxT > 0, (0, cache_index))
      mask = cache_mask(valid, cache_index, tokens_BxT.shape[1])
    inv_freq = rope_inverse_frequencies(cfg)
    # Gather the (fsdp / tensor sharded) table before the lookup, as FSDP does for every weight: a lookup into a
    # sharded table with batch-sharded ids has no efficient SPMD partitioning.
    table = sharding.constrain(self.model.embed_tokens.embedding[...], (None, None))
    x = jnp.take(table, tokens_BxT, axis=0).astype(cfg.compute_dtype)
    x = sharding.constrain(x, ("batch", None, None))
    new_layers = []
    for i, layer in enumerate(self.model.layers):
      kv = None if cache is None else cache["layers"][i]
      if cfg.remat:
        step = nnx.remat(lambda lyr, *a: lyr(*a))
        x, kv = step(layer, x, positions_BxT, mask, inv_freq, kv, cache_index)
      else:
        x, kv = layer(x, positions_BxT, mask, inv_freq, kv, cache_index)
      new_layers.append(kv)
    hidden = self.model.norm(x)
    if cache is None:
      return hidden
    return hidden, {"layers": new_layers, "valid": valid}

  def __call__(self, tokens_BxT, *, positions_BxT=None, segment_ids_BxT=None, return_hidden=False):
    hidden = self.hidden_states(tokens_BxT, positions_BxT=positions_BxT, segment_ids_BxT=segment_ids_BxT)
    logits = self.logits(hidden)
    return (logits, hidden) if return_hidden else logits


def create(cfg: ModelConfig, seed: int = 0) -> Transformer:
  """An unsharded model on the default device (tests, small CPU runs); `sharding.init_params` for meshes."""
  return Transformer(cfg, rngs=nnx.Rngs(seed))
