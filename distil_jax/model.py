"""The policy: a decoder-only transformer of the Llama family in Flax NNX.

One module covers Llama, Qwen2 (bias on q/k/v) and Qwen3 (RMSNorm on q and k per head), because the three differ
only in those two switches. Parameter names match Hugging Face's (`q_proj`, `gate_proj`, `input_layernorm`, ...) so
that `hf.py` is a rule plus transposes, and every parameter carries logical axis names for `sharding.py`.

Master parameters are float32; `dtype` picks the compute dtype (bf16 on accelerators), and `merge_for_compute`
casts the whole tree once per step. Attention softmax, RMSNorm statistics and logits are computed in float32
whatever the compute dtype. Attention runs through `attention.py` (`model.attention`: cuDNN, splash, XLA, einsum).

The decoder layers are stacked (every layer parameter has a leading "layers" axis) and run under `jax.lax.scan`, so
compile time and program size do not grow with depth; `model.remat` picks what the backward pass recomputes. The
stacking is an internal layout: `hf.py` reads and writes Hugging Face's per-layer names.

The blocks (norm, RoPE, attention, MLP, the decoder layer) are in `layers.py`; this module stacks and runs them.

There is one forward pass. The sampler's prefill is this forward with each layer's keys and values kept
(`keep_kv`), so a prompt runs training's attention kernel; its one-token steps and their cache are `decode.py`'s.

Dims: L layers, B batch, T query time, S key time (sequence or cache slots), D model width, H query heads, K key/value
heads, E head dim, F MLP width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distil_jax import attention, checks, layers, sharding
from distil_jax.layers import DecoderLayer, RMSNorm, linear, param_init

ARCHS = ("llama", "qwen2", "qwen3")
# What the backward pass keeps of each layer's forward: everything, only its input (recompute the layer), or its
# input plus the outputs of the weight matmuls (recompute only the cheap elementwise work and attention).
REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


DTYPES = ("float32", "bfloat16", "float16")  # compute dtypes; parameters are always float32


def check_section(ch: checks.Checks, architecture: bool = True) -> None:
  """The `model` section's checks, one line each (`checks.py`): how it computes, and (`architecture`; a Hugging Face
  checkpoint brings its own) the shape. `head_dim` 0 means hidden_size // num_attention_heads."""
  ch.enum("model.dtype", DTYPES)
  ch.enum("model.remat", tuple(REMAT_POLICIES))
  ch.enum("model.attention", attention.IMPLEMENTATIONS)
  if not architecture:
    return
  ch.enum("model.arch", ARCHS)
  ch.flag("model.tie_word_embeddings")
  ch.number("model.rope_theta", lo=0, lo_open=True)
  sizes = [ch.count(f"model.{k}") for k in ("hidden_size", "intermediate_size", "num_hidden_layers")]
  heads = ch.count("model.num_attention_heads") and ch.count("model.num_key_value_heads")
  if heads and ch.value("model.num_attention_heads") % ch.value("model.num_key_value_heads"):
    ch.fail(
      "model.num_key_value_heads", f"must divide model.num_attention_heads ({ch.value('model.num_attention_heads')})"
    )
  if not (ch.number("model.head_dim", lo=0, integer=True) and sizes[0] and heads):
    return
  head_dim, hidden, n_heads = (ch.value(f"model.{k}") for k in ("head_dim", "hidden_size", "num_attention_heads"))
  if not head_dim and hidden % n_heads:
    ch.fail("model.hidden_size", f"must be divisible by model.num_attention_heads ({n_heads}) when model.head_dim=0")
  elif (head_dim or hidden // n_heads) % 2:
    ch.fail("model.head_dim" if head_dim else "model.hidden_size", "gives an odd head size; RoPE rotates pairs")


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
  remat: str = "none"  # a key of REMAT_POLICIES; True / False are read as "full" / "none"
  attention: str = "auto"  # one of attention.IMPLEMENTATIONS

  def __post_init__(self):
    if isinstance(self.remat, bool | np.bool_):
      object.__setattr__(self, "remat", "full" if self.remat else "none")
    checks.raise_problems("model", {**dataclasses.asdict(self), "head_dim": self.head_dim or 0}, check_section)

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


def _stacked_layers(cfg: ModelConfig, rngs: nnx.Rngs) -> DecoderLayer:
  """One DecoderLayer whose parameters carry a leading [L] axis (logical axis "layers"), each layer its own init."""

  @nnx.split_rngs(splits=cfg.num_hidden_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(layer_rngs):
    return DecoderLayer(cfg, layer_rngs)

  return make(rngs)


class Decoder(nnx.Module):
  """Hugging Face's `model.` prefix: embeddings, layers, final norm."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.embed_tokens = nnx.Embed(
      cfg.vocab_size,
      cfg.hidden_size,
      dtype=cfg.compute_dtype,
      param_dtype=jnp.float32,
      embedding_init=param_init(cfg, "vocab", "embed"),
      rngs=rngs,
    )
    self.layers = _stacked_layers(cfg, rngs)
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


def merge_for_compute(graphdef, params):
  """The model with its float32 master parameters cast once to the compute dtype.

  One cast of the whole tree per step instead of one at every use (and again in every recomputation under remat);
  the gradient flows back through the casts to the float32 masters.
  """
  model = nnx.merge(graphdef, params)
  dtype = model.config.compute_dtype
  if dtype == jnp.float32:
    return model
  cast = lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p
  return nnx.merge(graphdef, jax.tree.map(cast, params))


class Transformer(nnx.Module):
  """Causal LM. `model(tokens)` gives float32 logits; `hidden_states` and `lm_head_kernel` feed the fused loss."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.model = Decoder(cfg, rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = linear(cfg, rngs, cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"))

  def lm_head_kernel(self):
    """The LM head as a [D,V] float32 array (the transposed embedding when tied)."""
    if self.config.tie_word_embeddings:
      return self.model.embed_tokens.embedding[...].T
    return self.lm_head.kernel[...]

  def logits(self, hidden_BxTxD):
    kernel = self.lm_head_kernel().astype(self.config.compute_dtype)
    logits = jnp.einsum("btd,dv->btv", hidden_BxTxD, kernel, preferred_element_type=jnp.float32)
    return sharding.constrain(logits, ("batch", None, "vocab"))

  def hidden_states(self, tokens_BxT, *, positions_BxT=None, segment_ids_BxT=None, packed=False, keep_kv=False):
    """Final-norm hidden states [B,T,D]; with `keep_kv`, also every layer's keys and values [L,B,T,K,E].

    segment_ids: 0 marks padding, equal positive ids mark one sequence; default: all ones. packed=True allows rows
    that hold several sequences; False promises one sequence per row (any padding), which spares the cuDNN kernel a
    mask (see attention.py).
    """
    cfg = self.config
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones(tokens_BxT.shape, jnp.int32)
    if positions_BxT is None:
      positions_BxT = default_positions(segment_ids_BxT)
    impl = attention.resolve(cfg.attention, cfg.compute_dtype, cfg.head_size)
    plan = attention.make_plan(impl, segment_ids_BxT, packed=packed)
    tokens_BxT, positions_BxT = plan.to_kernel_order(tokens_BxT), plan.to_kernel_order(positions_BxT)
    inv_freq = layers.rope_inverse_frequencies(cfg)
    # Gather the (fsdp / tensor sharded) table before the lookup, as FSDP does for every weight: a lookup into a
    # sharded table with batch-sharded ids has no efficient SPMD partitioning.
    table = sharding.constrain(self.model.embed_tokens.embedding[...], (None, None))
    x = jnp.take(table, tokens_BxT, axis=0).astype(cfg.compute_dtype)
    x = sharding.constrain(x, ("batch", None, None))
    x, kv = self._layers(x, positions_BxT, inv_freq, plan, keep_kv)
    hidden = plan.to_input_order(self.model.norm(x))
    return (hidden, {"k": kv[0], "v": kv[1]}) if keep_kv else hidden

  def _layers(self, x_BxTxD, positions_BxT, inv_freq, plan, keep_kv):
    """All decoder layers under one `lax.scan` over the stacked parameters; the keys and values as its outputs."""
    graphdef, stacked = nnx.split(self.model.layers)

    def body(x, layer_state):
      x, kv = nnx.merge(graphdef, layer_state)(x, positions_BxT, inv_freq, plan)
      return x, tuple(map(plan.to_input_order, kv)) if keep_kv else None

    if self.config.remat != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.config.remat], prevent_cse=False)
    return jax.lax.scan(body, x_BxTxD, stacked)

  def __call__(self, tokens_BxT, *, positions_BxT=None, segment_ids_BxT=None, packed=False, return_hidden=False):
    hidden = self.hidden_states(tokens_BxT, positions_BxT=positions_BxT, segment_ids_BxT=segment_ids_BxT, packed=packed)
    logits = self.logits(hidden)
    return (logits, hidden) if return_hidden else logits
