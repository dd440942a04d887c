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


def left_pad_rows(rows: list[list[int]], width: int, pad_id: int):
  """(tokens, mask) [len(rows), width], each row flush right. A row longer than `width` is an error: cutting its
  beginning would train on a prompt other than the one sampled (callers that can drop a row check first)."""
  tokens = np.full((len(rows), width), pad_id, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    if len(r) > width:
      raise ValueError(f"a prompt row of {len(r)} tokens does not fit the {width} reserved for it")
    if r:
      tokens[i, width - len(r) :] = r
      mask[i, width - len(r) :] = 1
  return tokens, mask
