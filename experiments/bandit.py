"""Claim 1: against an expert with higher reward, forward CE improves the student; reverse KL and JSD can make it worse.

One-step problem (a bandit), student pi = softmax(z), expert q, reward r. J(pi) = E_pi r.
  - Natural-gradient forward CE (the mixture step pi' = (1 - eta) pi + eta q) gives dJ = eta (E_q r - J) >= 0 exactly.
  - Plain gradient steps on the logits: forward CE raises J in the worked case, reverse KL and JSD (beta = 0.5) lower
    it and raise the probability of the r = 0 action; over random problems, plain-gradient forward CE can also lower J
    (the claim holds in policy space, not for every parameterisation), which the sweep below counts honestly.
The gradients are the library's own (`losses.tokenwise_fce_loss`, `reverse_kl_loss`, `jsd_loss`) on a [1,1,V] batch.

  python -m experiments.bandit   # writes bandit.json and bandit.png
"""

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from distil_jax import losses

PI = np.array([0.05, 0.70, 0.25])
Q = np.array([0.3, 0.6, 0.1])
R = np.array([1.0, 0.0, 1.0])


@jax.jit
def _gradients(pi, q):
  z, t = jnp.log(pi)[None, None], jnp.log(q)[None, None]
  tok, m = jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1))
  fns = {
    "forward_ce": lambda z: losses.tokenwise_fce_loss(z, t, tok, m),
    "reverse_kl": lambda z: losses.reverse_kl_loss(z, t, tok, m),
    "jsd": lambda z: losses.jsd_loss(z, t, tok, m, jsd_beta=0.5),
  }
  return {k: jax.grad(f)(z)[0, 0] for k, f in fns.items()}


def logit_gradients(pi, q):
  """d loss / d z at z = log pi for each divergence (a single-token 'sequence')."""
  out = _gradients(jnp.asarray(pi, jnp.float32), jnp.asarray(q, jnp.float32))
  return {k: np.asarray(v, np.float64) for k, v in out.items()}


def first_order(pi, q, r):
  """dJ / d eta and d pi / d eta for a gradient-descent step on the logits, and for the natural (mixture) step."""
  fisher = np.diag(pi) - np.outer(pi, pi)  # d pi / d z
  out = {}
  for name, g in logit_gradients(pi, q).items():
    dpi = fisher @ (-g)
    out[name] = {"dJ": float(r @ dpi), "dpi": dpi.tolist()}
  out["forward_ce_natural"] = {"dJ": float(r @ (q - pi)), "dpi": (q - pi).tolist()}
  return out


def trajectory(pi, q, r, eta=0.2, steps=60):
  """J and pi of the r = 0 action over repeated small plain-gradient steps (and mixture steps)."""
  out = {}
  for name in ("forward_ce", "reverse_kl", "jsd", "forward_ce_natural"):
    p = np.array(pi, np.float64)
    js, worse = [float(r @ p)], [float(p[r == 0].sum())]
    for _ in range(steps):
      if name == "forward_ce_natural":
        p = (1 - eta) * p + eta * q
      else:
        z = np.log(p) - eta * logit_gradients(p, q)[name]
        p = np.exp(z - z.max())
        p /= p.sum()
      js.append(float(r @ p))
      worse.append(float(p[r == 0].sum()))
    out[name] = {"J": js, "pi_worse": worse}
  return out


def sweep(n=2000, seed=0):
  """Random 3-action problems with E_q r > J(pi): how often does a small step lower J?"""
  rng = np.random.default_rng(seed)
  counts = {k: 0 for k in ("forward_ce", "reverse_kl", "jsd", "forward_ce_natural")}
  kept, example = 0, None
  while kept < n:
    pi, q = rng.dirichlet(np.ones(3)), rng.dirichlet(np.ones(3))
    r = rng.integers(0, 2, 3).astype(float)
    if q @ r <= pi @ r + 1e-3:
      continue
    kept += 1
    fo = first_order(pi, q, r)
    for k in counts:
      if fo[k]["dJ"] < -1e-9:
        counts[k] += 1
        if k == "forward_ce" and example is None:
          example = {"pi": pi.round(4).tolist(), "q": q.round(4).tolist(), "r": r.tolist(), "dJ": fo[k]["dJ"]}
  return {
    "problems": n,
    "fraction_lowering_J": {k: v / n for k, v in counts.items()},
    "forward_ce_plain_counterexample": example,
  }


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="experiments/results")
  ap.add_argument("--sweep", type=int, default=2000, help="random problems in the sweep")
  args = ap.parse_args()
  result = {
    "pi": PI.tolist(),
    "q": Q.tolist(),
    "r": R.tolist(),
    "J": float(PI @ R),
    "E_q_r": float(Q @ R),
    "first_order": first_order(PI, Q, R),
    "trajectory": trajectory(PI, Q, R),
    "sweep": sweep(args.sweep),
  }
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "bandit.json"), "w") as f:
    json.dump(result, f, indent=1)
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  labels = {
    "forward_ce": "forward CE (gradient)",
    "forward_ce_natural": "forward CE (natural / mixture)",
    "reverse_kl": "reverse KL",
    "jsd": "JSD, beta = 0.5",
  }
  for name, tr in result["trajectory"].items():
    axes[0].plot(tr["J"], label=labels[name])
    axes[1].plot(tr["pi_worse"], label=labels[name])
  axes[0].axhline(result["E_q_r"], color="gray", ls=":", label="E_q r (expert)")
  axes[0].set(xlabel="step (eta = 0.2)", ylabel="J = E_pi r", title="expected reward")
  axes[1].set(xlabel="step (eta = 0.2)", ylabel="pi(r = 0 action)", title="mass on the worse action")
  axes[0].legend(fontsize=7)
  fig.suptitle("pi = (0.05, 0.70, 0.25), q = (0.3, 0.6, 0.1), r = (1, 0, 1)", fontsize=9)
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "bandit.png"), dpi=120)
  summary = {k: result[k] for k in ("J", "E_q_r")}
  summary |= {f"dJ/{k}": round(v["dJ"], 5) for k, v in result["first_order"].items()}
  summary |= {f"sweep_fraction_lowering_J/{k}": v for k, v in result["sweep"]["fraction_lowering_J"].items()}
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
