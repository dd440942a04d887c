"""The statistics of the comparison protocol, in numpy alone (scipy is not a dependency).

Intervals are Student-t intervals over seeds: a seed is one independent replication of the whole pipeline
(behaviour cloning, rollouts, updates, evaluation sampling), and what a reader wants to know is how a method does across
such replications; the test prompts are one fixed set shared by every run, so their sampling error is common to all
methods and mostly cancels in the paired differences. Paired differences are taken seed by seed (same behaviour-cloned
start, same seed), and the sign test over seeds makes no assumption on their distribution. With 5 seeds the two-sided
sign test cannot go below 2/32 = 0.0625: a clean sweep is reported as such, not as p < 0.05.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def t_two_sided_mass(t: float, df: int) -> float:
  """P(|T| <= t) for Student's t with integer `df` degrees of freedom, in closed form (Abramowitz & Stegun 26.7.3-4)."""
  if df < 1 or int(df) != df:
    raise ValueError(f"df={df} must be a positive integer")
  theta = math.atan(t / math.sqrt(df))
  s, c2 = math.sin(theta), math.cos(theta) ** 2
  if df % 2 == 0:  # sin(theta) [1 + 1/2 cos^2 + (1*3)/(2*4) cos^4 + ... up to cos^(df-2)]
    term, total = 1.0, 1.0
    for k in range(1, df // 2):
      term *= (2 * k - 1) / (2 * k) * c2
      total += term
    return s * total
  if df == 1:
    return 2 * theta / math.pi
  # (2/pi) [theta + sin(theta) cos(theta) (1 + 2/3 cos^2 + (2*4)/(3*5) cos^4 + ... up to cos^(df-3))]
  term, total = 1.0, 1.0
  for k in range(1, (df - 1) // 2):
    term *= (2 * k) / (2 * k + 1) * c2
    total += term
  return 2 / math.pi * (theta + s * math.cos(theta) * total)


def t_quantile(level: float, df: int) -> float:
  """The t with P(|T| <= t) = level (e.g. 0.95 gives the 97.5% quantile), by bisection on the closed form."""
  lo, hi = 0.0, 1.0
  while t_two_sided_mass(hi, df) < level:
    hi *= 2
  for _ in range(200):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if t_two_sided_mass(mid, df) < level else (lo, mid)
  return (lo + hi) / 2


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict:
  """Mean and Student-t interval over independent replications; with one value there is no interval (None)."""
  x = np.asarray(values, np.float64)
  n = len(x)
  mean = float(np.mean(x))
  if n < 2:
    return {"n": n, "mean": mean, "std": None, "half_width": None, "ci": None}
  std = float(np.std(x, ddof=1))
  half = t_quantile(level, n - 1) * std / math.sqrt(n)
  return {"n": n, "mean": mean, "std": std, "half_width": half, "ci": [mean - half, mean + half]}


def sign_test(diffs: Sequence[float]) -> dict:
  """Exact binomial sign test of median difference 0; zero differences are dropped (the usual convention).

  p_two_sided = min(1, 2 P(X <= min(k, n - k))), p_greater = P(X >= k) with X ~ Binomial(n, 1/2), k positives.
  """
  d = np.asarray(diffs, np.float64)
  pos, neg = int(np.sum(d > 0)), int(np.sum(d < 0))
  n = pos + neg
  cdf = lambda k: sum(math.comb(n, i) for i in range(k + 1)) / 2**n
  if n == 0:
    return {"n": 0, "positive": 0, "negative": 0, "ties": len(d), "p_two_sided": 1.0, "p_greater": 1.0}
  return {
    "n": n,
    "positive": pos,
    "negative": neg,
    "ties": len(d) - n,
    "p_two_sided": min(1.0, 2 * cdf(min(pos, neg))),
    "p_greater": 1.0 - cdf(pos - 1) if pos > 0 else 1.0,
  }


def paired(a_by_seed: dict, b_by_seed: dict, level: float = 0.95) -> dict:
  """a - b seed by seed over the seeds both have: the differences, their t-interval and the sign test."""
  seeds = sorted(set(a_by_seed) & set(b_by_seed))
  diffs = [float(a_by_seed[s] - b_by_seed[s]) for s in seeds]
  return {"seeds": seeds, "diffs": diffs, **mean_ci(diffs, level), "sign_test": sign_test(diffs)}
