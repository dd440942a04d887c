"""What every expert reads: one iteration's rollouts, host side, and the left padding its rows are stored with."""

from __future__ import annotations

import dataclasses

import numpy as np

from distil_jax.tasks.base import Problem, Verdict


@dataclasses.dataclass
class Rollouts:
  """One iteration's samples, host side: Bp prompts x G responses of up to N tokens."""

  problems: list[Problem]
  prompt_tokens: np.ndarray  # [Bp,P] int32, left-padded
  prompt_mask: np.ndarray  # [Bp,P]
  tokens: np.ndarray  # [Bp,G,N] int32, pad after EOS
  mask: np.ndarray  # [Bp,G,N] 1 on response tokens (EOS included)
  logprobs: np.ndarray  # [Bp,G,N] behaviour log-probs
  texts: list[list[str]]
  verdicts: list[list[Verdict]]
