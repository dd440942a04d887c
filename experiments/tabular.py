"""Exact expectations over every sequence of a small tabular autoregressive problem (shared by the experiments).

A problem has vocabulary V and horizon T (fixed length, no EOS). The expert gives a distribution q(.|y_<t) at every
prefix. The student's logits come from `student_logits(theta, prefixes)`: one row per prefix (a full table) or one
row per position (a student that cannot see its own earlier tokens: limited capacity).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np


def all_sequences(vocab: int, horizon: int) -> np.ndarray:
  return np.array(list(itertools.product(range(vocab), repeat=horizon)), np.int32)


def prefix_ids(seqs: np.ndarray, vocab: int) -> np.ndarray:
  """A distinct id for each (position, prefix) pair: the state at which token t is chosen."""
  n, horizon = seqs.shape
  ids = np.zeros((n, horizon), np.int32)
  for row, y in enumerate(seqs):
    offset, code = 0, 0
    for t in range(horizon):
      ids[row, t] = offset + code
      offset += vocab**t
      code = code * vocab + int(y[t])
  return ids


def exact_cost(theta, log_q_states, seqs, states, logits_of):
  """J(theta) = sum_y p(y) sum_t CE(q_t, pi_t), computed exactly; also returns p(y)."""
  logp = jax.nn.log_softmax(logits_of(theta, states), -1)
  q = jnp.exp(log_q_states[states])
  c = -jnp.sum(q * logp, -1)
  logp_y = jnp.take_along_axis(logp, seqs[..., None], -1)[..., 0]
  p = jnp.exp(jnp.sum(logp_y, 1))
  return jnp.sum(p * jnp.sum(c, 1)), p


def expected_gradient(loss_fn, theta, log_q_states, seqs, states, logits_of):
  """sum_y p(y) grad loss(y), with p(y) held constant: the expected gradient of a per-sequence surrogate."""
  _, p = exact_cost(theta, log_q_states, seqs, states, logits_of)
  p = jax.lax.stop_gradient(p)
  ones = jnp.ones((1, seqs.shape[1]))

  def weighted(th):
    logits = logits_of(th, states)
    per = jax.vmap(lambda lg, st, y: loss_fn(lg[None], log_q_states[st][None], y[None], ones))(logits, states, seqs)
    return jnp.sum(p * per)

  return jax.grad(weighted)(theta)
