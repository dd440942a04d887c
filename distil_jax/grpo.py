"""GRPO (Shao et al. 2024, DeepSeekMath), the reward-only baseline, as per-token losses from per-position terms.

Its advantage is the group-normalised reward, the same at every token of a response; its ratio is the PPO-clipped
one DistIL's score term uses (`surrogate.policy_ratio`), to the sampler's policy.

Dims: B sequences (groups of `group_size` consecutive rows share a prompt), T positions.
"""

from __future__ import annotations

import jax.numpy as jnp

from distil_jax import surrogate


def grpo_per_token(cfg, terms, mask, group_size, rewards_B, behaviour_logprobs, ref_logprobs):
  """GRPO (Shao et al. 2024, DeepSeekMath): advantage (r - mean_group r) / (std_group r + eps) on every token of a
  response, PPO-clipped ratio to the sampler's policy, optional k3 estimate of KL(pi || reference) per token."""
  if rewards_B is None:
    raise ValueError("grpo needs scalar rewards per sequence")
  if group_size < 2:
    raise ValueError(f"grpo needs group_size >= 2 (the advantage is relative to the group); got {group_size}")
  r = rewards_B.astype(jnp.float32).reshape(-1, group_size)
  std = jnp.std(r, axis=1, keepdims=True, ddof=1)
  adv = ((r - jnp.mean(r, axis=1, keepdims=True)) / (std + cfg.std_eps)).reshape(-1, 1)
  ratio = surrogate.policy_ratio(terms["logp"], behaviour_logprobs)
  clipped = jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)
  per_token = -jnp.minimum(ratio * adv, clipped * adv)
  metrics = {"reward": jnp.mean(r), **surrogate.ratio_metrics(ratio, mask, cfg.clip_eps)}
  if cfg.kl_coef:
    if ref_logprobs is None:
      raise ValueError("grpo with kl_coef > 0 needs ref_logprobs (the frozen reference policy's log pi(y_t))")
    delta = ref_logprobs - terms["logp"]
    k3 = jnp.exp(delta) - delta - 1.0  # unbiased, non-negative estimate of KL(pi || ref)
    per_token = per_token + cfg.kl_coef * k3
    metrics["kl_ref"] = surrogate.token_mean(k3, mask)
  return per_token, metrics
