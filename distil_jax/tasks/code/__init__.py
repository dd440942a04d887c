"""Python programming: JSONL {"prompt", "tests"} (HumanEval's {"prompt", "test", "entry_point"} is read too).

The student's response completes the prompt (a signature and docstring); the program is prompt + response. The
tests are split when the data is read (`suite.py`) and graded by `grader.py`: the program runs in
`sandbox/` and only returns its functions' outputs, as plain data; the trainer decides each verdict. Feedback is
the first failing test with the program's output or error on it, trimmed; a timeout, a memory or CPU limit, too
much output or a blocked system call is reported the same way, as a failed test, never as a crash of the trainer.
With no data file, small generated function-writing problems stand in, so that the config runs on a CPU.
"""

from __future__ import annotations

import numpy as np

from distil_jax import sandbox
from distil_jax.tasks.base import MAX_RECORD_BYTES as MAX_BYTES
from distil_jax.tasks.base import DataError, Problem, Verdict, read_jsonl, split_records
from distil_jax.tasks.code import grader as code_grader
from distil_jax.tasks.code import suite as code_suite

_GENERATED = [
  ("Return x multiplied by {a} plus {b}.", "x * {a} + {b}", lambda x, a, b: x * a + b),
  ("Return the larger of x and {a}.", "max(x, {a})", lambda x, a, b: max(x, a)),
  ("Return x minus {b}, or 0 if that is negative.", "max(x - {b}, 0)", lambda x, a, b: max(x - b, 0)),
]


def _problem_from_record(record, path_hint) -> Problem:
  tests, prompt = record.get("tests"), record["prompt"]
  if tests is None and not (isinstance(record.get("test"), str) and isinstance(record.get("entry_point"), str)):
    raise DataError(f"{path_hint}: record needs 'tests' (or HumanEval's 'test' and 'entry_point', strings)")
  tests = [tests] if isinstance(tests, str) else tests
  if tests is not None and not (isinstance(tests, list) and all(isinstance(t, str) for t in tests)):
    raise DataError(f"{path_hint}: field 'tests' should be a string or a list of strings")
  try:
    if tests is None:  # HumanEval layout
      suite = code_suite.human_eval(record["test"], record["entry_point"], prompt)
    else:
      suite = code_suite.statements(tests, prompt)
  except (SyntaxError, ValueError) as e:
    field = "test" if tests is None else "tests"
    raise DataError(f"{path_hint}: field {field!r}: {type(e).__name__}: {e}") from None
  if not suite.checks and suite.rest is None:  # nothing could fail: every program that loads would be correct
    field = "test" if tests is None else "tests"
    raise DataError(f"{path_hint}: field {field!r} holds no test (an empty suite grades every program as correct)")
  solution = record.get("canonical_solution") or record.get("solution")
  return Problem(prompt, "", solution, suite, source=f"{path_hint}:prompt")


class CodeTask:
  name = "code"
  oracle = None

  def __init__(self, cfg):
    self.cfg = cfg
    self.limits = sandbox.Limits(
      wall_seconds=cfg.timeout_s, cpu_seconds=max(1, int(cfg.timeout_s)), memory_bytes=int(cfg.memory_mb) << 20
    )
    if cfg.train_path:
      records = read_jsonl(
        cfg.train_path, ["prompt"], {"prompt": str}, max_bytes=cfg.get("max_record_bytes", MAX_BYTES)
      )
      problems = [_problem_from_record(r, r.where) for r in records]
      self._split = split_records(problems, cfg.eval_size)
    else:
      rng = np.random.default_rng(cfg.seed)
      problems = [self._generated(rng, i) for i in range(cfg.train_size + cfg.eval_size)]
      self._split = {"train": problems[: cfg.train_size], "eval": problems[cfg.train_size :]}

  @staticmethod
  def _generated(rng, i) -> Problem:
    doc, body, fn = _GENERATED[i % len(_GENERATED)]
    a, b = (int(v) for v in rng.integers(1, 10, 2))
    prompt = f'def f(x):\n    """{doc.format(a=a, b=b)}"""\n'
    tests = [f"assert f({x}) == {fn(x, a, b)}" for x in (0, 3, 11)]
    return Problem(prompt, "", f"    return {body.format(a=a, b=b)}\n", code_suite.statements(tests, prompt))

  def problems(self, split):
    return self._split[split]

  def verify(self, problem: Problem, response: str) -> Verdict:
    program = (problem.prompt if self.cfg.include_prompt else "") + response
    return code_grader.grade(problem.meta, program, self.limits)

  def wrong_solution(self, problem: Problem) -> str:
    """A one-line `return` reference off by one (a failing test to read), else a body that returns None."""
    reference = problem.reference or ""
    if reference.strip().startswith("return ") and reference.count("\n") <= 1:
      return reference.rstrip("\n") + " + 1\n"
    return "    return None\n"

  def corpus(self):
    for p in self._split["train"][:2000]:
      yield p.prompt
      yield p.reference or ""
      yield from p.meta.tests
