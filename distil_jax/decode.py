"""The policy as the sampler runs it: decode weights made once per rollout, the prompt's prefill through the model,
and one-token steps against a KV cache whose prompt part is shared by every response to that prompt.

Decoding one token per row is bound by the bytes each step reads (every weight, the filled cache) and by the number
of kernels it launches, not by FLOPs. Hence a second form of the layer, made inside the sampler's jit (the
checkpoint format and `model.py`'s parameters are untouched):
- Weights are cast to the compute dtype, gathered out of their FSDP shards and fused once per rollout: q/k/v into
  one [D,K,Q+2,E] kernel grouped by key/value head (so a `tensor` split of the kv heads keeps each group whole, and
  the product is already in the grouped layout attention reads), gate/up into one [D,2,F]. The decode loop then
  holds no all-gather and runs three matmuls fewer per layer.
- The step unrolls the layers over per-layer weights and caches, so every matmul reads a whole buffer: a layer's
  slice of a stacked (scanned) cache is a dynamic slice, which XLA may materialise before the matmul, per layer and
  per step. (Training scans the layers for compile time; a decode step is small enough to unroll.)
- The prompt's keys and values are computed once per prompt, with training's attention kernel (`model.py`'s
  prefill), and the R responses to a prompt read that one copy: R times fewer prompt-cache bytes per step.
- Response caches are laid out [B,K,S,E]: batch and kv head lead, so the score and value matmuls read them with no
  transpose. They hold only the slots that the current segment of the decode loop can fill (`grow` between
  segments), so early steps do not read empty slots.

Dims: L layers, Bp prompts, R responses per prompt, B = Bp * R rows, P prompt slots, S response slots, D width,
K key/value heads, Q query heads per key/value head, E head dim, F MLP width, V vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from distil_jax import attention, layers, sharding
from distil_jax import model as model_lib


class Cache(NamedTuple):
  """Keys and values per layer: the prompt part (one per prompt) and the response part (one per row)."""

  prompt_k: tuple[jax.Array, ...]  # L x [Bp,K,P,E]
  prompt_v: tuple[jax.Array, ...]
  prompt_valid_BpxP: jax.Array  # bool: real prompt tokens (prompts are left-padded)
  k: tuple[jax.Array, ...]  # L x [B,K,S,E]
  v: tuple[jax.Array, ...]


def _kv_spec(x):
  return sharding.constrain(x, ("batch", "kv_heads", None, None))


def prepare(model: model_lib.Transformer) -> dict:
  """The decode weights of a compute-dtype model (`model.merge_for_compute`): fused, per layer, FSDP-gathered.

  Each weight keeps its `tensor` split (kv heads, MLP width, vocabulary) and drops its `fsdp` one: a device holds
  the compute-dtype weights of its tensor shard whole, as decoding reads all of them at every step.
  """
  cfg, layers = model.config, model.model.layers
  attn, mlp = layers.self_attn, layers.mlp
  nl, k, e = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_size
  q = cfg.num_attention_heads // k
  grouped = lambda w, heads: w.reshape(w.shape[:-1] + (k, heads, e))  # [...,N*E] -> [...,K,N,E], head n = k*N + j
  qkv = jnp.concatenate(
    [grouped(attn.q_proj.kernel[...], q), grouped(attn.k_proj.kernel[...], 1), grouped(attn.v_proj.kernel[...], 1)],
    axis=-2,
  )
  gate_up = jnp.stack([mlp.gate_proj.kernel[...], mlp.up_proj.kernel[...]], axis=2)  # [L,D,2,F]
  per_layer = []
  for i in range(nl):
    w = {
      "input_norm": layers.input_layernorm.weight[i],
      "post_norm": layers.post_attention_layernorm.weight[i],
      "qkv": sharding.constrain(qkv[i], (None, "kv_heads", None, None)),
      "o": sharding.constrain(attn.o_proj.kernel[i], ("heads", None)),  # [H*E,D]: heads in kv-group order
      "gate_up": sharding.constrain(gate_up[i], (None, None, "mlp")),
      "down": sharding.constrain(mlp.down_proj.kernel[i], ("mlp", None)),
    }
    if cfg.qkv_bias:
      bias = [grouped(p.bias[i], n) for p, n in ((attn.q_proj, q), (attn.k_proj, 1), (attn.v_proj, 1))]
      w["qkv_bias"] = sharding.constrain(jnp.concatenate(bias, axis=-2), ("kv_heads", None, None))
    if cfg.qk_norm:
      w["q_norm"], w["k_norm"] = attn.q_norm.weight[i], attn.k_norm.weight[i]
    per_layer.append(w)
  table = model.model.embed_tokens.embedding[...]
  if cfg.tie_word_embeddings:
    head = sharding.constrain(table, ("vocab", None))  # read as [V,D]: no transposed copy
  else:
    head = sharding.constrain(model.lm_head.kernel[...], (None, "vocab"))
  return {
    "embed": sharding.constrain(table, (None, None)),  # the lookup reads B rows: whole on every device
    "head": head,
    "norm": model.model.norm.weight[...],
    "layers": per_layer,
  }


def prefill(model: model_lib.Transformer, prompt_BpxP, prompt_mask_BpxP):
  """(logits [Bp,V] float32 of each prompt's next token, the prompt part of the cache), by `model.py`'s forward.

  The prompt runs through the same attention kernel as training (cuDNN / splash / XLA); its keys and values are
  moved once into the decode layout.
  """
  cfg = model.config
  hidden, stacked = model.hidden_states(
    prompt_BpxP,
    positions_BxT=model_lib.default_positions(prompt_mask_BpxP),
    segment_ids_BxT=prompt_mask_BpxP,
    keep_kv=True,
  )
  logits = model.logits(hidden[:, -1:])[:, 0]
  k, v = (jnp.swapaxes(stacked[name], 2, 3) for name in ("k", "v"))  # [L,Bp,P,K,E] -> [L,Bp,K,P,E]
  layers = range(cfg.num_hidden_layers)
  prompt_k, prompt_v = tuple(_kv_spec(k[i]) for i in layers), tuple(_kv_spec(v[i]) for i in layers)
  return logits, Cache(prompt_k, prompt_v, prompt_mask_BpxP > 0, (), ())


def grow(cache: Cache, rows: int, slots: int, cfg: model_lib.ModelConfig) -> Cache:
  """The cache with `slots` response slots per row (new slots empty); one copy per segment, not per step."""
  if not cache.k:
    shape = (rows, cfg.num_key_value_heads, slots, cfg.head_size)
    empty = tuple(_kv_spec(jnp.zeros(shape, cfg.compute_dtype)) for _ in range(cfg.num_hidden_layers))
    return cache._replace(k=empty, v=empty)
  pad = lambda c: _kv_spec(jnp.pad(c, ((0, 0), (0, 0), (0, slots - c.shape[2]), (0, 0))))
  return cache._replace(k=tuple(map(pad, cache.k)), v=tuple(map(pad, cache.v)))


def _attend(q_BxKxQxE, cache: Cache, layer: int, k_BxKxSxE, v_BxKxSxE, filled_S):
  """Grouped-query attention of one new token over its prompt (shared by its group) and its own response slots.

  One softmax over both parts (float32 scores, as `attention.attend_einsum`), without concatenating them. The
  prompt part is computed in [Bp,K,R,Q,...] order (batch dims of its matmuls leading), so only query-sized
  arrays, never score- or cache-sized ones, change layout.
  """
  b, kv, q, e = q_BxKxQxE.shape
  prompt_k, prompt_v = cache.prompt_k[layer], cache.prompt_v[layer]
  bp = prompt_k.shape[0]
  r = b // bp
  to_rows = lambda x_PxKxRxQ_: jnp.swapaxes(x_PxKxRxQ_, 1, 2).reshape((b, kv, q) + x_PxKxRxQ_.shape[4:])
  to_groups = lambda x_BxKxQ_: jnp.swapaxes(x_BxKxQ_.reshape((bp, r, kv, q) + x_BxKxQ_.shape[3:]), 1, 2)
  scale = e**-0.5
  s_prompt = jnp.einsum("pkrqe,pkse->pkrqs", to_groups(q_BxKxQxE), prompt_k, preferred_element_type=jnp.float32)
  s_prompt = jnp.where(cache.prompt_valid_BpxP[:, None, None, None, :], s_prompt * scale, attention.NEG_INF)
  s_own = jnp.einsum("bkqe,bkse->bkqs", q_BxKxQxE, k_BxKxSxE, preferred_element_type=jnp.float32)
  s_own = jnp.where(filled_S, s_own * scale, attention.NEG_INF)
  top_BxKxQ = jnp.maximum(to_rows(jnp.max(s_prompt, -1)), jnp.max(s_own, -1))
  e_prompt = jnp.exp(s_prompt - to_groups(top_BxKxQ)[..., None])
  e_own = jnp.exp(s_own - top_BxKxQ[..., None])
  total_BxKxQ = to_rows(jnp.sum(e_prompt, -1)) + jnp.sum(e_own, -1)
  dtype = v_BxKxSxE.dtype
  p_prompt = (e_prompt / to_groups(total_BxKxQ)[..., None]).astype(dtype)
  out = to_rows(jnp.einsum("pkrqs,pkse->pkrqe", p_prompt, prompt_v, preferred_element_type=jnp.float32))
  p_own = (e_own / total_BxKxQ[..., None]).astype(dtype)
  out = out + jnp.einsum("bkqs,bkse->bkqe", p_own, v_BxKxSxE, preferred_element_type=jnp.float32)
  return out.astype(dtype)


def step(weights: dict, cfg: model_lib.ModelConfig, cache: Cache, token_B, position_B, slot):
  """Logits [B,V] float32 after `token_B` (at `position_B`, written to response slot `slot`), and the cache."""
  dtype = cfg.compute_dtype
  q = cfg.num_attention_heads // cfg.num_key_value_heads
  norm = lambda x, w: layers.rms_norm(x, w, cfg.rms_norm_eps, dtype)
  inv_freq = layers.rope_inverse_frequencies(cfg)
  rope = lambda x: layers.apply_rope(x, position_B[:, None], inv_freq)  # [B,K,N,E]: one position per row
  filled_S = jnp.arange(cache.k[0].shape[2]) <= slot
  x = sharding.constrain(jnp.take(weights["embed"], token_B, axis=0).astype(dtype), ("batch", None))
  new_k, new_v = [], []
  for i, w in enumerate(weights["layers"]):
    qkv = jnp.einsum("bd,dkce->bkce", norm(x, w["input_norm"]), w["qkv"])
    if cfg.qkv_bias:
      qkv = qkv + w["qkv_bias"]
    q_new, k_new, v_new = qkv[:, :, :q], qkv[:, :, q : q + 1], qkv[:, :, q + 1 :]
    if cfg.qk_norm:
      q_new, k_new = norm(q_new, w["q_norm"]), norm(k_new, w["k_norm"])
    q_new, k_new = rope(q_new), rope(k_new)
    k_cache = jax.lax.dynamic_update_slice(cache.k[i], k_new.astype(cache.k[i].dtype), (0, 0, slot, 0))
    v_cache = jax.lax.dynamic_update_slice(cache.v[i], v_new.astype(cache.v[i].dtype), (0, 0, slot, 0))
    new_k.append(k_cache)
    new_v.append(v_cache)
    out = _attend(q_new, cache, i, k_cache, v_cache, filled_S)
    x = x + out.reshape(out.shape[0], -1) @ w["o"]
    gate_up = jnp.einsum("bd,dcf->bcf", norm(x, w["post_norm"]), w["gate_up"])
    x = x + jnp.einsum("bf,fd->bd", jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1], w["down"])
    x = sharding.constrain(x, ("batch", None))
  hidden = norm(x, weights["norm"])
  spec = "bd,vd->bv" if cfg.tie_word_embeddings else "bd,dv->bv"
  logits = jnp.einsum(spec, hidden, weights["head"], preferred_element_type=jnp.float32)
  return sharding.constrain(logits, ("batch", "vocab")), cache._replace(k=tuple(new_k), v=tuple(new_v))
