"""The `oracle` expert: the task's own program gives the right continuation from any state, as top-k targets."""

from __future__ import annotations

import math

import numpy as np

from distil_jax.errors import ExpertError
from distil_jax.experts.base import Rollouts
from distil_jax.tasks.base import Problem
from distil_jax.tokenizer import Tokenizer


class OracleExpert:
  """Top-k targets from the task's oracle: mass 1 - smoothing on the token that starts the oracle's continuation
  (the longest vocabulary piece that is a prefix of it, or EOS when the oracle says stop), the rest in the tail."""

  on_device = False
  reads_siblings = False

  def __init__(self, oracle, tokenizer: Tokenizer, top_k: int, smoothing: float):
    if oracle is None:
      raise ExpertError("expert.kind='oracle' needs a task with an oracle (built-in tasks; not data files)")
    if not 0 < smoothing < 1:
      raise ExpertError(f"expert.smoothing={smoothing} must be in (0, 1): reverse KL needs full support")
    self.oracle, self.tok, self.top_k = oracle, tokenizer, top_k
    self.logq = math.log1p(-smoothing)
    self.piece = {}
    for i, s in enumerate(tokenizer.surfaces):
      if s and i != tokenizer.eos_id:
        self.piece.setdefault(s, i)
    self.longest = max(len(s) for s in self.piece)

  def next_token(self, problem: Problem, prefix: str) -> int:
    cont = self.oracle.continuation(problem, prefix)
    if not cont:
      return self.tok.eos_id
    for n in range(min(self.longest, len(cont)), 0, -1):
      if cont[:n] in self.piece:
        return self.piece[cont[:n]]
    raise ExpertError(f"oracle continuation {cont[:20]!r} starts with a character the tokenizer cannot write")

  def label(self, r: Rollouts) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    bp, g, n = r.tokens.shape
    ids = np.zeros((bp, g, n, self.top_k), np.int32)
    logq = np.full((bp, g, n, self.top_k), -np.inf, np.float32)
    surfaces = self.tok.surfaces
    for b in range(bp):
      for j in range(g):
        prefix = ""
        for t in range(int(r.mask[b, j].sum())):
          ids[b, j, t, 0] = self.next_token(r.problems[b], prefix)
          logq[b, j, t, 0] = self.logq
          prefix += surfaces[r.tokens[b, j, t]]
    own = np.zeros((bp, g), np.int32)  # the oracle's targets depend on the prefix only
    return {"target_ids": ids, "target_logprobs": logq, "whole_response_credit": own}, {}
