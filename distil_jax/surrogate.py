"""DistIL's surrogate: the per-token loss whose value estimates J and whose gradient is the DistIL estimator.

DistIL minimises J(theta) = E_{y ~ pi_theta}[ sum_t c_t ], c_t = -sum_a q_t(a) log pi_theta(a | x, y_<t), with the
expert q_t held constant. Its gradient is
    sum_t grad c_t  +  sum_t (R_t - b_t) grad log pi_theta(y_t | x, y_<t),     R_t = sum_{t' > t} c_t'
The second (score-function) part charges later expert-student disagreement to the earlier tokens that led there;
dropping it leaves "tokenwise forward CE" (DAgger with a distributional expert), which is biased for J.
The surrogate below has exactly that gradient and, because the score term enters as `x - stop_gradient(x)`, its
value is the estimate of J itself (what the logs show).

Length: J sums positive costs over the tokens the student chose to write, so while the student is imperfect an
early EOS is the cheapest way to lower J (it forfeits every future cost), and responses shrink. `terminal="hold"`
evaluates J over the fixed horizon T instead: a response that stops at L < T holds its stopping state, and that
state's cost, for the T - L remaining steps. Stopping where the expert also stops then costs (almost) nothing, and
stopping where it would continue keeps paying for that disagreement. At pi = q both objectives agree up to the
expert's entropy at its stop states; with cost="kl", or an expert whose entropy is the same at every state, the
two differ only by a constant. "free" (the paper's J) is the default.

Off-policy reuse: with `behaviour_logprobs` (from the sampler), the score term uses the clipped ratio
rho = pi_theta / pi_behaviour as PPO does, pessimistically for a cost: max(rho A, clip(rho, 1 +- eps) A).

Feedback that reads the row's own response: R_t assumes c_t' depends on the prefix y_<t' only, so that
E[c_t' grad log pi(y_t)] = 0 for t' <= t. An expert shown the verdict on this very response (`expert.feedback=
"reference"` always; "any" and the http expert on rows whose other half has no correct response) makes every q_t a
function of the whole response, and that zero no longer holds. For such a row (`whole_response_credit`, marked by
the expert) every token's score weight is the whole response's cost sum_t' c_t', which is exact: the row's cost is
then a function of y whose score-function gradient is sum_t' c_t' * sum_t grad log pi(y_t | y_<t). "Exact" means:
for each row's expected cost under its own sampling distribution, with the other responses its feedback shows held
as sampled (the expert is a constant given what it is shown, as in DAgger), and on fresh rows (ratio 1; a reused
row's clipped ratio is a first-order correction, as for unmarked rows).

Baseline: b_t must not depend on y_t. The leave-one-out mean over a group is such a baseline when the expert of row
j does not read row i; an expert that shows row j a correct sibling does. With `baseline_parts=2` each group is two
halves, the expert of a row reads only the other half (`experts.reprompt_texts`), and the baseline of a row is the
mean over the other *valid* rows of its own half, so it is a function of rows that are independent of y_i. Rows
with no tokens in `mask` (an expert that could not label them) do not enter anyone's baseline.

Dims: B sequences (groups of `group_size` consecutive rows share a prompt), T positions, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cost_to_go(c_BxT):
  """R_t = sum_{t' > t} c_t' (exclusive reverse cumulative sum)."""
  return jnp.cumsum(c_BxT[:, ::-1], axis=1)[:, ::-1] - c_BxT


def leave_one_out(x_BxT, group_size: int, *, parts: int = 1, valid_B=None):
  """For each row, the mean of x over the other valid rows of its part of its group; 0 where there is none.

  A group is `group_size` consecutive rows (one prompt); its parts are `parts` equal runs of consecutive rows. The
  value for row i never reads row i, nor whether row i is valid.
  """
  b = x_BxT.shape[0]
  size = group_size // parts if parts > 0 else 0
  if size < 2 or group_size % parts or b % group_size:
    raise ValueError(
      f"leave-one-out needs group_size >= 2 rows per part (parts={parts}) and group_size dividing the batch; "
      f"got group_size={group_size} for {b} rows"
    )
  valid = jnp.ones((b,), jnp.float32) if valid_B is None else valid_B.astype(jnp.float32)
  shape = (b // size, size) + (1,) * (x_BxT.ndim - 1)
  v = valid.reshape(shape)
  x = x_BxT.reshape(b // size, size, *x_BxT.shape[1:]) * v
  others = jnp.sum(x, axis=1, keepdims=True) - x
  count = jnp.sum(v, axis=1, keepdims=True) - v
  return jnp.where(count > 0, others / jnp.maximum(count, 1.0), 0.0).reshape(x_BxT.shape)


def hold_terminal(c_BxT, mask_BxT):
  """Costs over the whole horizon T when a response that stopped early holds its stopping state.

  A response of length L < T ended with EOS at position L-1; the state it stopped in, and so its cost c_{L-1}, is
  held for the T-L remaining steps. Returns (costs [B,T], horizon mask [B,T]). Gradients of the held copies flow to
  position L-1, so stopping early is charged for the disagreement it freezes instead of escaping all future cost.
  """
  t = c_BxT.shape[1]
  length = jnp.sum(mask_BxT, axis=1).astype(jnp.int32)
  ended = (length > 0) & (length < t)
  last = jnp.take_along_axis(c_BxT, jnp.maximum(length - 1, 0)[:, None], axis=1)
  after = (jnp.arange(t)[None, :] >= length[:, None]) & ended[:, None]
  return jnp.where(after, last, c_BxT), jnp.where(ended[:, None], 1.0, mask_BxT)


def policy_ratio(logp_BxT, behaviour_logprobs):
  """pi_theta / pi_behaviour per token; without behaviour log-probs exactly 1, with the gradient of log pi."""
  old = jax.lax.stop_gradient(logp_BxT) if behaviour_logprobs is None else behaviour_logprobs
  return jnp.exp(logp_BxT - old)


def token_mean(x_BxT, m_BxT):
  """The mean of x over the masked tokens of the whole batch (0 when there are none)."""
  return jnp.sum(x_BxT * m_BxT) / jnp.maximum(jnp.sum(m_BxT), 1.0)


def ratio_metrics(ratio, m, clip_eps):
  """How far the policy has moved from the sampler's: exactly 1 and 0 on fresh rollouts; over `ratio_tokens` tokens."""
  return {
    "ratio_tokens": jnp.sum(m),
    "ratio_mean": token_mean(ratio, m),
    "clip_fraction": token_mean((jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32), m),
  }


def distil_per_token(
  cfg, terms, mask, group_size, behaviour_logprobs, sequence_term, score_weight, whole_response_credit
):
  """(per-token loss [B,T], metrics, the mask it is reduced over): the cost c_t, plus with `sequence_term` the
  score term (R_t - b_t) grad log pi(y_t) entered as `x - stop_gradient(x)`; tokenwise forward CE is the cost
  alone. With `terminal="hold"` the costs and the mask cover the whole horizon (`hold_terminal`)."""
  m = mask.astype(jnp.float32)
  c = terms["ce"] - (terms["teacher_entropy"] if cfg.cost == "kl" else 0.0)
  c = jnp.where(m > 0, c, 0.0)
  cost_mask = m
  if cfg.terminal == "hold":
    c, cost_mask = hold_terminal(c, m)
  metrics = {"cost": jnp.mean(jnp.sum(c, axis=1))}
  if not sequence_term:
    return c, metrics, cost_mask
  r = cost_to_go(jax.lax.stop_gradient(c))
  if whole_response_credit is not None:  # the expert read y itself: every token is charged the response's cost
    whole_B = jnp.sum(jax.lax.stop_gradient(c), axis=1)
    r = jnp.where(whole_response_credit.astype(bool)[:, None], whole_B[:, None], r)
  if cfg.baseline == "loo":
    b = leave_one_out(r, group_size, parts=cfg.baseline_parts, valid_B=jnp.any(m > 0, axis=1))
  else:
    b = jnp.zeros_like(r)
  adv = r - b
  ratio = policy_ratio(terms["logp"], behaviour_logprobs)
  clipped = jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)
  score = jnp.maximum(ratio * adv, clipped * adv) * m
  scored = m
  if score_weight is not None:  # e.g. 0 for stale buffer rows: their states still get the local (DAgger) term
    score = score * score_weight[:, None]
    scored = m * (score_weight[:, None] > 0)
  # the ratio's figures over the tokens whose ratio enters the loss (a stale row's never does)
  metrics.update(ratio_metrics(ratio, scored, cfg.clip_eps), advantage_abs=token_mean(jnp.abs(adv), m))
  # value: the cost alone (an estimate of J); gradient: local part + score part
  return c + score - jax.lax.stop_gradient(score), metrics, cost_mask
