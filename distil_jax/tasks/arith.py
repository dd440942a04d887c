"""The built-in synthetic task: left-to-right arithmetic chains, verified exactly, with an oracle expert.

Prompt "7 +5 *3 -4 =", solution "7+5=12 12*3=36 36-4=32 #32". A ~1M-parameter model learns it on two CPU cores in
minutes, so every comparison in this repository runs anywhere. Problems are a pure function of (seed, index), so
the training stream needs no storage and resumes exactly; held-out problems never appear in training.
"""

from __future__ import annotations

import functools

import numpy as np

from distil_jax.tasks import chain as chain_lib
from distil_jax.tasks.base import Problem, Verdict

FORMAT = chain_lib.AnswerFormat("#", "")


class ChainProblems:
  """Deterministic problems by index, with the eval set held out of the training stream."""

  def __init__(self, cfg, render):
    self.cfg, self.render = cfg, render

  def _chain(self, seed_key, index):
    rng = np.random.default_rng([self.cfg.seed, seed_key, index])
    n_ops = int(rng.integers(self.cfg.min_ops, self.cfg.max_ops + 1))
    return chain_lib.sample_chain(rng, n_ops, self.cfg.max_operand, self.cfg.max_value, self.cfg.ops)

  @functools.cached_property
  def eval(self) -> list[Problem]:
    return [self.render(self._chain(1, i)) for i in range(self.cfg.eval_size)]

  @functools.cached_property
  def _eval_prompts(self) -> frozenset[str]:
    return frozenset(p.prompt for p in self.eval)

  def train(self, index: int) -> Problem:
    for attempt in range(100):
      p = self.render(self._chain(0, index * 100 + attempt))
      if p.prompt not in self._eval_prompts:
        return p
    raise RuntimeError("the problem space is too small to hold out the eval set")


class _LazyList:
  """A Sequence of `size` items made on demand (Grain random access)."""

  def __init__(self, size, make):
    self.size, self.make = size, make

  def __len__(self):
    return self.size

  def __getitem__(self, i):
    if not 0 <= i < self.size:
      raise IndexError(i)
    return self.make(i)


class ArithTask:
  name = "arith"

  def __init__(self, cfg):
    self.cfg = cfg
    self.oracle = chain_lib.ChainOracle(FORMAT)
    self._problems = ChainProblems(cfg, self.render)

  @staticmethod
  def render(chain: chain_lib.Chain) -> Problem:
    prompt = " ".join([str(chain.start)] + [f"{op}{a}" for op, a in chain.ops]) + " ="
    return Problem(prompt, str(chain.answer), chain_lib.solution(chain, FORMAT), chain)

  def problems(self, split):
    if split == "eval":
      return self._problems.eval
    return _LazyList(self.cfg.train_size, self._problems.train)

  def verify(self, problem: Problem, response: str) -> Verdict:
    return chain_lib.verify(problem.meta, FORMAT, response)

  def wrong_solution(self, problem: Problem) -> str:
    return chain_lib.wrong_solution(problem.meta, FORMAT)

  def corpus(self):
    """Prompts, solutions and feedback, so that a tokenizer trained on it covers everything the run writes."""
    for i in range(500):
      p = self._problems.train(i)
      yield p.prompt
      yield p.reference
      wrong = p.reference.replace("=", "=1", 1)
      yield self.verify(p, wrong).feedback
      yield self.verify(p, "").feedback
