"""Python programming: JSONL {"prompt", "tests"} (HumanEval's {"prompt", "test", "entry_point"} is read too).

The student's response completes the prompt (a signature and docstring); the program is prompt + response, run in
`sandbox.py`. Each test is a statement (e.g. an assert) run in order after the program; the first failure ends the
run. Feedback is the first failing test and the trimmed error output; a timeout, a memory or CPU limit, or a blocked
system call is reported the same way, as a failed test, never as a crash of the trainer. With no data file, small
generated function-writing problems stand in, so that the config runs on a CPU.
"""

from __future__ import annotations

import json
import secrets

import numpy as np

from distil_jax import sandbox
from distil_jax.tasks.base import MAX_RECORD_BYTES as MAX_BYTES
from distil_jax.tasks.base import DataError, Problem, Verdict, read_jsonl, split_records

_HARNESS = """
import json as _json, sys as _sys, traceback as _tb
def _run_tests(_tests, _nonce):
    for _i, _t in enumerate(_tests):
        try:
            exec(_t, globals())
        except BaseException as _e:
            _lines = _tb.format_exception(type(_e), _e, _e.__traceback__)
            print(_nonce + _json.dumps({"passed": _i, "failed": _t, "error": "".join(_lines[-6:])}))
            return
    print(_nonce + _json.dumps({"passed": len(_tests)}))
_run_tests(_json.loads({tests!r}), {nonce!r})
"""

_GENERATED = [
  ("Return x multiplied by {a} plus {b}.", "x * {a} + {b}", lambda x, a, b: x * a + b),
  ("Return the larger of x and {a}.", "max(x, {a})", lambda x, a, b: max(x, a)),
  ("Return x minus {b}, or 0 if that is negative.", "max(x - {b}, 0)", lambda x, a, b: max(x - b, 0)),
]


def _trim(text: str, limit: int = 600) -> str:
  text = text.strip()
  return text if len(text) <= limit else "..." + text[-limit:]


def _problem_from_record(record, path_hint) -> Problem:
  tests = record.get("tests")
  if tests is None:  # HumanEval layout
    if "test" not in record or "entry_point" not in record:
      raise DataError(f"{path_hint}: record needs 'tests' (or HumanEval's 'test' and 'entry_point')")
    tests = [record["test"] + f"\ncheck({record['entry_point']})"]
  if isinstance(tests, str):
    tests = [tests]
  if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
    raise DataError(f"{path_hint}: field 'tests' should be a string or a list of strings")
  solution = record.get("canonical_solution") or record.get("solution")
  return Problem(record["prompt"], "", solution, tuple(tests), source=f"{path_hint}:prompt")


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
    tests = tuple(f"assert f({x}) == {fn(x, a, b)}" for x in (0, 3, 11))
    return Problem(prompt, "", f"    return {body.format(a=a, b=b)}\n", tests)

  def problems(self, split):
    return self._split[split]

  def verify(self, problem: Problem, response: str) -> Verdict:
    nonce = "@@result-" + secrets.token_hex(8) + "@@"
    program = (problem.prompt if self.cfg.include_prompt else "") + response
    program += "\n" + _HARNESS.replace("{tests!r}", repr(json.dumps(list(problem.meta)))).replace(
      "{nonce!r}", repr(nonce)
    )
    result = sandbox.run(program, self.limits)
    report = next((line[len(nonce) :] for line in result.stdout.splitlines() if line.startswith(nonce)), None)
    if result.timed_out:
      return Verdict(False, f"timed out after {self.limits.wall_seconds:g}s")
    if report is None:  # the program itself failed before the tests: syntax error, limit, crash
      why = f"killed by signal {result.signal}" if result.signal else _trim(result.stderr) or "no output"
      return Verdict(False, f"the program did not run: {why}")
    report = json.loads(report)
    if "failed" in report:
      return Verdict(False, f"failed test: {_trim(report['failed'], 300)}\n{_trim(report['error'])}")
    return Verdict(True, f"all {report['passed']} tests passed")

  def corpus(self):
    for p in self._split["train"][:2000]:
      yield p.prompt
      yield p.reference or ""
      yield from p.meta
