"""Unbiasedness of the DistIL gradient, by enumerating every sequence of a tabular autoregressive policy.

J(theta) = sum_y p_theta(y) sum_t c_t(theta; y_<t) is computed exactly and differentiated with jax.grad. That is an
independent derivation: it knows nothing of cost-to-go, baselines or score terms. The surrogate's expected gradient
sum_y p(y) grad surrogate(y) (p held constant) must equal it; tokenwise forward CE must not.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distil_jax import losses
from experiments import tabular

V, L, EOS = 3, 4, 2


def _sequences(with_eos):
  """All responses with their masks: fixed length L, or ending at EOS (kept) / at length L."""
  out = []
  for length in range(1, L + 1) if with_eos else [L]:
    for body in itertools.product(range(V), repeat=length):
      if with_eos and (EOS in body[:-1] or (length < L and body[-1] != EOS)):
        continue
      tokens = list(body) + [0] * (L - length)
      out.append((tokens, [1] * length + [0] * (L - length)))
  return np.array([s[0] for s in out]), np.array([s[1] for s in out], np.float32)


def _problem(seed):
  """Logits theta and expert log q for every prefix (state), indexed by the prefix's base-V code."""
  rng = np.random.default_rng(seed)
  n_states = sum(V**k for k in range(L))
  theta = jnp.asarray(rng.normal(size=(n_states, V)), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(n_states, V)) * 1.5, jnp.float32)
  return theta, teacher


def _state_ids(tokens):
  """State index of each prefix y_<t: a distinct id per (length, prefix)."""
  return tabular.prefix_ids(np.asarray(tokens), V)


def _exact_J(theta, teacher, tokens, mask, cost, terminal="free"):
  states = _state_ids(np.asarray(tokens))
  logp = jax.nn.log_softmax(theta[states], -1)  # [N,L,V]
  log_q = jax.nn.log_softmax(teacher[states], -1)
  q = jnp.exp(log_q)
  c = -jnp.sum(q * logp, -1)
  if cost == "kl":
    c = c + jnp.sum(q * log_q, -1)
  logp_y = jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]
  p = jnp.exp(jnp.sum(logp_y * mask, 1))
  per_seq = jnp.sum(c * mask, 1)
  if terminal == "hold":  # a response of length n < L is charged its stopping state's cost L - n more times
    n = np.asarray(mask).sum(1).astype(int)
    stop_cost = c[np.arange(len(n)), n - 1]
    per_seq = per_seq + (L - n) * stop_cost
  return jnp.sum(p * per_seq), p


def _expected_surrogate_grad(loss_fn, theta, teacher, tokens, mask, group):
  """sum over all groups of sequences of p(group) * grad surrogate(group)."""
  states, tokens, mask = jnp.asarray(_state_ids(tokens)), jnp.asarray(tokens), jnp.asarray(mask)
  _, p = _exact_J(theta, teacher, tokens, mask, "ce")
  p = jax.lax.stop_gradient(p)
  combos = np.array(list(itertools.product(range(len(tokens)), repeat=group)))

  def weighted(theta):
    def one(idx):
      logits = theta[states[idx]]
      return jnp.prod(p[idx]) * loss_fn(logits, teacher[states[idx]], tokens[idx], mask[idx])

    return jnp.sum(jax.vmap(one)(combos))

  return jax.grad(weighted)(theta)


@pytest.mark.parametrize("with_eos", [False, True])
@pytest.mark.parametrize("cost", ["ce", "kl"])
def test_distil_gradient_is_unbiased_baseline_none(with_eos, cost):
  theta, teacher = _problem(seed=1)
  tokens, mask = _sequences(with_eos)
  want = jax.grad(lambda th: _exact_J(th, teacher, tokens, mask, cost)[0])(theta)
  got = _expected_surrogate_grad(
    lambda lg, tch, tok, m: losses.distil_loss(lg, tch, tok, m, group_size=1, baseline="none", cost=cost),
    theta,
    teacher,
    tokens,
    mask,
    group=1,
  )
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  assert np.abs(want).max() > 0.05  # the check is not vacuous


@pytest.mark.parametrize("with_eos", [False, True])
def test_distil_gradient_is_unbiased_leave_one_out(with_eos):
  theta, teacher = _problem(seed=2)
  tokens, mask = _sequences(with_eos)
  want = jax.grad(lambda th: _exact_J(th, teacher, tokens, mask, "ce")[0])(theta)
  got = _expected_surrogate_grad(
    lambda lg, tch, tok, m: losses.distil_loss(lg, tch, tok, m, group_size=2, baseline="loo"),
    theta,
    teacher,
    tokens,
    mask,
    group=2,
  )
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("baseline,group", [("none", 1), ("loo", 2)])
def test_hold_terminal_gradient_is_unbiased(baseline, group):
  """terminal="hold": J over the horizon, a stopped response holding its last state's cost, by enumeration."""
  theta, teacher = _problem(seed=4)
  tokens, mask = _sequences(with_eos=True)
  want = jax.grad(lambda th: _exact_J(th, teacher, tokens, mask, "ce", "hold")[0])(theta)
  got = _expected_surrogate_grad(
    lambda lg, tch, tok, m: losses.distil_loss(lg, tch, tok, m, group_size=group, baseline=baseline, terminal="hold"),
    theta,
    teacher,
    tokens,
    mask,
    group=group,
  )
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  free = jax.grad(lambda th: _exact_J(th, teacher, tokens, mask, "ce")[0])(theta)
  assert np.abs(np.asarray(want - free)).max() > 0.05  # a different objective, not a relabelling


def test_surrogate_value_is_J():
  """The surrogate's expected value is J itself (the score term only shapes the gradient)."""
  theta, teacher = _problem(seed=3)
  tokens, mask = _sequences(True)
  J, p = _exact_J(theta, teacher, tokens, mask, "ce")
  vals = jax.vmap(lambda lg, tch, tok, m: losses.distil_loss(lg[None], tch[None], tok[None], m[None]))(
    theta[_state_ids(tokens)], teacher[_state_ids(tokens)], tokens, mask
  )
  np.testing.assert_allclose(jnp.sum(p * vals), J, rtol=1e-5)


def test_tokenwise_fce_is_biased():
  """Without the score term the expected gradient misses a real part of grad J."""
  theta, teacher = _problem(seed=1)
  tokens, mask = _sequences(False)
  want = jax.grad(lambda th: _exact_J(th, teacher, tokens, mask, "ce")[0])(theta)
  got = _expected_surrogate_grad(
    lambda lg, tch, tok, m: losses.tokenwise_fce_loss(lg, tch, tok, m), theta, teacher, tokens, mask, group=1
  )
  missing = np.abs(np.asarray(want - got))
  assert missing.max() > 0.05, missing.max()
  # The missing part is exactly the expected score term: E[sum_t R_t grad log pi(y_t)].
  score = _expected_surrogate_grad(
    lambda lg, tch, tok, m: losses.distil_loss(lg, tch, tok, m) - losses.tokenwise_fce_loss(lg, tch, tok, m),
    theta,
    teacher,
    tokens,
    mask,
    group=1,
  )
  np.testing.assert_allclose(got + score, want, atol=1e-5, rtol=1e-5)
