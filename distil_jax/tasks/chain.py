"""Multi-step arithmetic written as steps, shared by the built-in `arith` task and `math`'s generated word problems.

A problem is a start value and a chain of operations applied left to right. The solution writes one step per
operation, separated by spaces, then the answer: "7+5=12 12*3=36 36-4=32 #32".

The oracle expert is defined at every state the student can reach, mistakes included. It reads the student's
completed steps, counts a step as done when it applies the expected operation and operand (whatever numbers the
student wrote around them), and continues *correctly from the student's own written values*: after "7+5=13" it
writes "13*3=39", not "12*3=36". A partial step that has gone wrong is closed with a space and redone. So the expert
is a sensible next-token distribution everywhere, and an early slip changes every later target: the situation in
which sequence-level credit matters.
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


def sample_chain(rng: np.random.Generator, n_ops: int, max_operand: int, max_value: int,
                 ops: str = "+-*", max_multiplier: int = 3) -> Chain:
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


def _progress(chain: Chain, parts: list[str]) -> tuple[int, int, list[tuple[str, int | None]]]:
  """(steps done, the student's current value, per-part notes) from the completed parts of a response."""
  done, value, notes = 0, chain.start, []
  for part in parts:
    m = _STEP.fullmatch(part)
    if m and done < len(chain.ops) and (m[2], int(m[3])) == chain.ops[done]:
      notes.append((part, done))
      value = int(m[4])
      done += 1
    else:
      notes.append((part, None))
  return done, value, notes


class ChainOracle:
  """The expert continuation from any prefix of a response (see the module docstring)."""

  def __init__(self, fmt: AnswerFormat):
    self.fmt = fmt

  def continuation(self, problem: Problem, response: str) -> str:
    chain: Chain = problem.meta
    *parts, current = response.split(" ")
    done, value, _ = _progress(chain, parts)
    rest = []
    for op, a in chain.ops[done:]:
      nxt = _APPLY[op](value, a)
      rest.append(f"{value}{op}{a}={nxt}")
      value = nxt
    rest.append(self.fmt.write(value))
    target = " ".join(rest)
    expected = rest[0]
    if current == expected and len(rest) == 1:
      return ""  # the answer is written: stop
    if expected.startswith(current):
      return target[len(current):]
    return " " + target  # this partial step went wrong: close it and redo


def verify(chain: Chain, fmt: AnswerFormat, response: str) -> Verdict:
  """Correct iff the last written answer is the chain's value; the feedback is a step-by-step trace."""
  answer = fmt.read(response)
  parts = [p for p in response.split(" ") if p]
  _, _, notes = _progress(chain, parts)
  lines = []
  expected_values = chain.values()
  for part, step in notes:
    if step is None:
      if fmt.read(part) is None:
        lines.append(f"'{part}' is not a step")
      continue
    m = _STEP.fullmatch(part)
    x, op, a, y = int(m[1]), m[2], int(m[3]), int(m[4])
    right = _APPLY[op](x, a)
    if x != expected_values[step]:
      lines.append(f"step {step + 1} starts from {x}, should be {expected_values[step]}")
    if y != right:
      lines.append(f"step {step + 1}: {x}{op}{a} is {right}, not {y}")
  done = sum(1 for _, s in notes if s is not None)
  if done < len(chain.ops):
    op, a = chain.ops[done]
    lines.append(f"missing step {done + 1} ({op}{a})")
  correct = answer == chain.answer
  if answer is None:
    lines.append("no final answer")
  elif not correct:
    lines.append(f"answer {answer} is wrong")
  return Verdict(correct, "correct" if correct and not lines else "; ".join(lines) or "correct")
