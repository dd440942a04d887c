"""Multi-step arithmetic written as steps, shared by the built-in `arith` task and `math`'s generated word problems.

A problem is a start value and a chain of operations applied left to right. The solution writes one step per
operation, separated by spaces, then the answer: "7+5=12 12*3=36 36-4=32 #32".

The oracle expert is defined at every state the student can reach, mistakes included. It continues from the
student's own written values and recovers from them: after "7+5=13" it writes "13-1=12 12*3=36 ..." (a correction
step, then the rest of the chain); after "7-" (the problem said +5) it finishes "5=2" and then corrects 2 to 12.
Following it from any state ends with the right answer, so imitating it teaches recovery, which behaviour cloning on
clean solutions never sees; and an early slip costs later tokens, where sequence-level credit matters.
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


_PARTIAL = re.compile(r"(?P<x>-?\d*)(?P<op>[+\-*]?)(?P<a>\d*)(?P<eq>=?)(?P<y>-?\d*)")


def _steps(parts: list[str]) -> list[re.Match]:
  """The well-formed steps among completed parts, in order."""
  return [m for m in (_STEP.fullmatch(p) for p in parts) if m]


def _progress(chain: Chain, steps: list[re.Match]) -> tuple[int, int]:
  """(operations of the chain attempted, the student's current value). Every well-formed step is an attempt at the
  next operation (right or wrong), except a correction: a step that lands on the chain's current value from another
  number, which only moves the value."""
  values = chain.values()
  done, value = 0, chain.start
  for m in steps:
    x, y = int(m[1]), int(m[4])
    if done < len(chain.ops) and not (y == values[done] and x != values[done]):
      done += 1
    value = y
  return done, value


def _plan(chain: Chain, done: int, value: int, fmt: AnswerFormat) -> list[str]:
  """The expert's remaining steps: a correction to the chain's value if the student's is wrong, the operations not
  yet applied, then the answer."""
  right = chain.values()[done]
  steps = []
  if value != right:
    steps.append(f"{value}{'-' if value > right else '+'}{abs(value - right)}={right}")
  for op, a in chain.ops[done:]:
    steps.append(f"{right}{op}{a}={_APPLY[op](right, a)}")
    right = _APPLY[op](right, a)
  return steps + [fmt.write(right)]


class ChainOracle:
  """The expert continuation from any prefix of a response (see the module docstring).

  Inside a step it accepts what the student wrote (a wrong start value, operator or operand is kept and the step
  finished with the correct result for those numbers); a wrong result, or text that is not a step, is closed with a
  space. Then, if the student's value is not the chain's, it writes a correction step ("28-1=27") and finishes the
  chain. Following it from any state ends with the right answer, so recovering from a slip is worth learning, and
  a slip costs future tokens: the situation in which sequence-level credit matters.
  """

  def __init__(self, fmt: AnswerFormat):
    self.fmt = fmt

  def continuation(self, problem: Problem, response: str) -> str:
    chain: Chain = problem.meta
    *parts, current = response.split(" ")
    if any(self.fmt.read(p) is not None for p in parts):
      return ""  # an answer is already written
    done, value = _progress(chain, _steps(parts))
    plan = _plan(chain, done, value, self.fmt)
    target = " ".join(plan)
    if target.startswith(current):
      return target[len(current):]
    if len(plan) == 1:  # only the answer is due
      return "" if current.startswith(self.fmt.open) else " " + target
    m = _PARTIAL.fullmatch(current)
    if not m or m["x"] in ("", "-"):
      return " " + target
    first = _STEP.fullmatch(plan[0])
    op = m["op"] or first[2]
    a = m["a"] if (m["eq"] or not first[3].startswith(m["a"])) else first[3]
    a = a or first[3]
    result = _APPLY[op](int(m["x"]), int(a))
    step = f"{m['x']}{op}{a}={result}"
    if not step.startswith(current):  # the written result is wrong: close the step
      return " "
    after = _progress(chain, _steps(parts + [step]))
    return step[len(current):] + " " + " ".join(_plan(chain, *after, self.fmt))


def verify(chain: Chain, fmt: AnswerFormat, response: str) -> Verdict:
  """Correct iff the last written answer is the chain's value; the feedback is a step-by-step trace."""
  answer = fmt.read(response)
  parts = [p for p in response.split(" ") if p]
  lines = [f"'{p}' is not a step" for p in parts if not _STEP.fullmatch(p) and fmt.read(p) is None]
  steps = _steps(parts)[: len(chain.ops)]
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
