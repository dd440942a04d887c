"""Multi-step arithmetic written as steps, shared by the built-in `arith` task and `math`'s generated word problems.

A problem is a start value and a chain of operations applied left to right. The solution writes one step per
operation, separated by spaces, then the answer: "7+5=12 12*3=36 36-4=32 #32".

The oracle expert is defined at every state the student can reach, mistakes included. It counts the student's
well-formed steps and continues *correctly from the student's own written values*: after "7+5=13" it writes
"13*3=39", not "12*3=36"; after "7-" (the problem said +5) it writes "5=2". So the expert is a sensible next-token
distribution everywhere, and an early slip changes every later target: the situation in which sequence-level credit
matters.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from distil_jax.tasks.base import Problem, Verdict

_APPLY = {"+": lambda x, a: x + a, "-": lambda x, a: x - a, "*": lambda x, a: x * a}
_STEP = re.compile(r"(-?\d+)([+\-*])(\d+)=(-?\d+)")


@dataclasses.dataclass(frozen=True)
class Chain:
  start: int
  ops: tuple[tuple[str, int], ...]

  def values(self) -> list[int]:
    out = [self.start]
    for op, a in self.ops:
      out.append(_APPLY[op](out[-1], a))
    return out

  @property
  def answer(self) -> int:
    return self.values()[-1]


def sample_chain(
  rng: np.random.Generator, n_ops: int, max_operand: int, max_value: int, ops: str = "+-*", max_multiplier: int = 3
) -> Chain:
  """A chain whose running values stay in [0, max_value]; multipliers are small (2..max_multiplier)."""
  while True:
    start = int(rng.integers(1, max_operand + 1))
    chain, value = [], start
    for _ in range(n_ops):
      choices = []
      for op in ops:
        hi = max_multiplier if op == "*" else max_operand
        lo = 2 if op == "*" else 1
        for a in range(lo, hi + 1):
          if 0 <= _APPLY[op](value, a) <= max_value:
            choices.append((op, a))
      if not choices:
        break
      op, a = choices[int(rng.integers(len(choices)))]
      chain.append((op, a))
      value = _APPLY[op](value, a)
    if len(chain) == n_ops:
      return Chain(start, tuple(chain))


@dataclasses.dataclass(frozen=True)
class AnswerFormat:
  """How the final answer is written: "#32" (arith) or "\\boxed{32}" (math)."""

  open: str = "#"
  close: str = ""

  def write(self, value: int) -> str:
    return f"{self.open}{value}{self.close}"

  def read(self, response: str) -> int | None:
    found = re.findall(re.escape(self.open) + r"(-?\d+)" + re.escape(self.close), response)
    return int(found[-1]) if found else None


def solution(chain: Chain, fmt: AnswerFormat) -> str:
  steps = [f"{x}{op}{a}={_APPLY[op](x, a)}" for x, (op, a) in zip(chain.values(), chain.ops, strict=False)]
  return " ".join(steps + [fmt.write(chain.answer)])


def wrong_solution(chain: Chain, fmt: AnswerFormat) -> str:
  """The solution with its last step's result one too high, carried into the final answer: a slip that the verifier
  names and that makes the answer wrong (a wrong earlier step followed by right arithmetic still ends right)."""
  results = [_APPLY[op](x, a) for x, (op, a) in zip(chain.values(), chain.ops, strict=False)]
  results[-1] += 1
  steps = [f"{x}{op}{a}={y}" for x, (op, a), y in zip(chain.values(), chain.ops, results, strict=False)]
  return " ".join(steps + [fmt.write(results[-1])])


_PARTIAL = re.compile(r"(?P<x>-?\d*)(?P<op>[+\-*]?)(?P<a>\d*)(?P<eq>=?)(?P<y>-?\d*)")


def _steps(parts: list[str], n_ops: int) -> list[re.Match]:
  """The well-formed steps among completed parts, in order, at most one per operation of the chain."""
  return [m for m in (_STEP.fullmatch(p) for p in parts) if m][:n_ops]


def _plan(value: int, ops, fmt: AnswerFormat) -> str:
  """The rest of a correct solution from `value`: one step per remaining operation, then the answer."""
  out = []
  for op, a in ops:
    nxt = _APPLY[op](value, a)
    out.append(f"{value}{op}{a}={nxt}")
    value = nxt
  return " ".join(out + [fmt.write(value)])


class ChainOracle:
  """The expert continuation from any prefix of a response (see the module docstring).

  It accepts what the student wrote and completes it consistently: a wrong start value, operator or operand in
  the current step is kept and the step is finished with the correct result for those values; only a wrong result
  (or text that is not a step) is closed with a space. It never asks the student to undo a step, so imitating it
  cannot teach a restart loop.
  """

  def __init__(self, fmt: AnswerFormat):
    self.fmt = fmt

  def continuation(self, problem: Problem, response: str) -> str:
    chain: Chain = problem.meta
    *parts, current = response.split(" ")
    if any(self.fmt.read(p) is not None for p in parts):
      return ""  # an answer is already written
    steps = _steps(parts, len(chain.ops))
    value = int(steps[-1][4]) if steps else chain.start
    remaining = chain.ops[len(steps) :]
    if not remaining:  # the answer is due
      answer = self.fmt.write(value)
      if answer.startswith(current):
        return answer[len(current) :]
      return "" if current.startswith(self.fmt.open) else " " + answer
    target = _plan(value, remaining, self.fmt)
    if target.startswith(current):
      return target[len(current) :]
    m = _PARTIAL.fullmatch(current)
    if not m or m["x"] in ("", "-"):
      return " " + target
    op_k, a_k = remaining[0]
    op = m["op"] or op_k
    a = m["a"] if (m["eq"] or not str(a_k).startswith(m["a"])) else str(a_k)
    if not a:
      a = str(a_k)
    result = _APPLY[op](int(m["x"]), int(a))
    step = f"{m['x']}{op}{a}={result}"
    if not step.startswith(current):  # the written result is wrong: close the step, continue from it next time
      return " " + _plan(int(m["y"]), remaining[1:], self.fmt) if m["y"] not in ("", "-") else " " + target
    return step[len(current) :] + " " + _plan(result, remaining[1:], self.fmt)


def has_steps(response: str) -> bool:
  """Whether a response writes at least one step in the solution's format ("7+5=12")."""
  return any(_STEP.fullmatch(p) for p in response.split(" "))


def verify(chain: Chain, fmt: AnswerFormat, response: str, read=None) -> Verdict:
  """Correct iff the last written answer (`fmt.read`, or `read`) is the chain's value; the feedback is a
  step-by-step trace."""
  answer = (read or fmt.read)(response)
  parts = [p for p in response.split(" ") if p]
  lines = [f"'{p}' is not a step" for p in parts if not _STEP.fullmatch(p) and fmt.read(p) is None]
  steps = _steps(parts, len(chain.ops))
  expected = chain.values()
  for i, m in enumerate(steps):
    x, op, a, y = int(m[1]), m[2], int(m[3]), int(m[4])
    if x != expected[i]:
      lines.append(f"step {i + 1} starts from {x}, should be {expected[i]}")
    if (op, a) != chain.ops[i]:
      lines.append(f"step {i + 1} applies {op}{a}, the problem says {chain.ops[i][0]}{chain.ops[i][1]}")
    if y != _APPLY[op](x, a):
      lines.append(f"step {i + 1}: {x}{op}{a} is {_APPLY[op](x, a)}, not {y}")
  if len(steps) < len(chain.ops):
    op, a = chain.ops[len(steps)]
    lines.append(f"missing step {len(steps) + 1} ({op}{a})")
  correct = answer == chain.answer
  if answer is None:
    lines.append("no final answer")
  elif not correct:
    lines.append(f"answer {answer} is wrong")
  return Verdict(correct, "; ".join(lines) or "correct")
