"""Pass@k on held-out prompts, with the unbiased estimator of Chen et al. (2021).

With n samples of which c are correct, pass@k = 1 - C(n - c, k) / C(n, k): the probability that k samples drawn
without replacement from the n contain a correct one. Averaging it over prompts estimates pass@k of the policy with
lower variance than drawing exactly k samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k for one prompt (the product form avoids huge binomials)."""
  if k > n:
    raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got {n}")
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def summarize(correct: Sequence[Sequence[bool]], ks: Sequence[int]) -> dict[str, float]:
  """Mean pass@k over prompts; `correct[p]` holds the verdicts of prompt p's n samples."""
  out = {}
  for k in ks:
    out[f"pass@{k}"] = float(np.mean([pass_at_k(len(c), int(sum(c)), k) for c in correct]))
  return out
