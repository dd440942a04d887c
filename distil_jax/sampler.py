"""Batched sampling with a KV cache: one jitted prefill + `while_loop` decode, on the mesh.

Prompts are left-padded to a length bucket so that a run compiles once per (batch, bucket, max_new_tokens) instead of
once per prompt length. Left padding keeps every row's next token in the same cache slot, so one scalar index
drives the cache; the padded slots are masked out and positions restart at each row's first real token.

Returned log-probs are those of the sampled tokens under the *sampling* distribution (after temperature, top-k and
top-p). The training losses take the policy to be softmax(logits / temperature) over the tokenizer's ids
(`token_terms.restrict`), so without top-k / top-p they are exactly the policy's log-probs on fresh rollouts, which
is what the off-policy ratio in `losses.py` needs; the loop refuses top-k / top-p for the losses that use the ratio.

Dims: B batch, P prompt bucket, N new tokens, S = P + N cache slots, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distil_jax import model as model_lib


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1.0: off
  greedy: bool = False
  eos_id: int | None = None
  pad_id: int = 0
  vocab_limit: int | None = None  # ids >= this are never sampled (model rows past the tokenizer: padding)


class Generation(NamedTuple):
  """What the sampler returns (the expert-target type `losses.Samples` is another thing)."""

  tokens: jax.Array  # [B,N] int32, pad_id after EOS
  logprobs: jax.Array  # [B,N] float32, 0 after EOS
  lengths: jax.Array  # [B] int32, EOS included


def bucket_length(n: int, buckets: Sequence[int]) -> int:
  """Smallest bucket that holds n tokens."""
  for b in sorted(buckets):
    if n <= b:
      return b
  raise ValueError(f"prompt of {n} tokens exceeds the largest length bucket {max(buckets)}")


def left_pad(prompts: Sequence[Sequence[int]], buckets: Sequence[int], pad_id: int = 0):
  """(tokens [B,P], mask [B,P]) numpy arrays, prompts flush right, P the bucket of the longest prompt."""
  width = bucket_length(max(len(p) for p in prompts), buckets)
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    if len(p):
      tokens[i, width - len(p) :] = p
      mask[i, width - len(p) :] = 1
  return tokens, mask


def _filter_logits(logits_BxV, cfg: SamplingConfig, temperature):
  logits = logits_BxV / temperature
  if cfg.top_k:
    kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if cfg.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    cutoff_idx = jnp.sum(cum - jax.nn.softmax(sorted_logits, axis=-1) < cfg.top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx - 1, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def _pick(logits_BxV, rng, cfg: SamplingConfig, temperature):
  if cfg.vocab_limit is not None and cfg.vocab_limit < logits_BxV.shape[-1]:
    logits_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) < cfg.vocab_limit, logits_BxV, -jnp.inf)
  if cfg.greedy:
    token = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    return token, jax.nn.log_softmax(logits_BxV, axis=-1)[jnp.arange(token.shape[0]), token]
  logits = _filter_logits(logits_BxV, cfg, temperature)
  token = jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
  return token, jax.nn.log_softmax(logits, axis=-1)[jnp.arange(token.shape[0]), token]


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"))
def _generate(graphdef, params, prompt_BxP, prompt_mask_BxP, rng, temperature, *, cfg: SamplingConfig):
  model = nnx.merge(graphdef, params)
  b, p = prompt_BxP.shape
  n = cfg.max_new_tokens
  cache = model_lib.init_cache(model.config, b, p + n)
  positions = model_lib.default_positions(prompt_mask_BxP)
  hidden, cache = model.hidden_states(
    prompt_BxP, positions_BxT=positions, segment_ids_BxT=prompt_mask_BxP, cache=cache, cache_index=0
  )
  logits = model.logits(hidden[:, -1:])[:, 0]
  next_pos = jnp.sum(prompt_mask_BxP, axis=1).astype(jnp.int32)
  eos = -1 if cfg.eos_id is None else cfg.eos_id

  def body(state):
    step, cache, logits, pos, done, tokens, logprobs, rng = state
    rng, sub = jax.random.split(rng)
    token, logprob = _pick(logits, sub, cfg, temperature)
    token = jnp.where(done, cfg.pad_id, token)
    logprob = jnp.where(done, 0.0, logprob)
    tokens = tokens.at[:, step].set(token)
    logprobs = logprobs.at[:, step].set(logprob)
    new_done = done | (token == eos)
    hidden, cache = model.hidden_states(
      token[:, None],
      positions_BxT=pos[:, None],
      segment_ids_BxT=jnp.ones((b, 1), jnp.int32),
      cache=cache,
      cache_index=p + step,
    )
    return step + 1, cache, model.logits(hidden)[:, 0], pos + 1, new_done, tokens, logprobs, rng

  def cond(state):
    return (state[0] < n) & ~jnp.all(state[4])

  init = (
    jnp.int32(0),
    cache,
    logits,
    next_pos,
    jnp.zeros((b,), bool),
    jnp.full((b, n), cfg.pad_id, jnp.int32),
    jnp.zeros((b, n), jnp.float32),
    rng,
  )
  step, _, _, _, done, tokens, logprobs, _ = jax.lax.while_loop(cond, body, init)
  is_eos = tokens == eos
  first_eos = jnp.argmax(is_eos, axis=1)
  lengths = jnp.where(jnp.any(is_eos, axis=1), first_eos + 1, step).astype(jnp.int32)
  return Generation(tokens, logprobs, lengths)


def generate(graphdef, params, prompt_BxP, prompt_mask_BxP, rng, cfg: SamplingConfig) -> Generation:
  """Sample up to `cfg.max_new_tokens` tokens per row; rows stop at EOS (kept) and are padded after."""
  return _generate(
    graphdef,
    params,
    jnp.asarray(prompt_BxP, jnp.int32),
    jnp.asarray(prompt_mask_BxP, jnp.int32),
    rng,
    jnp.float32(cfg.temperature),
    cfg=dataclasses.replace(cfg, temperature=1.0),
  )
