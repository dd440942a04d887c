"""Tasks: the oracle at hand-picked states, answer checking, data-file errors, multiple choice."""

import json
import re

import ml_collections
import numpy as np
import pytest

from distil_jax import tasks
from distil_jax.tasks import chain as chain_lib
from distil_jax.tasks import math as math_task
from distil_jax.tasks import science


def _cfg(**kw):
  base = dict(
    name="arith",
    seed=0,
    min_ops=1,
    max_ops=3,
    max_operand=9,
    max_value=60,
    ops="+-*",
    train_size=1000,
    eval_size=20,
    train_path="",
    prompt_template="{question}\n",
    timeout_s=5.0,
    memory_mb=256,
    include_prompt=True,
  )
  return ml_collections.ConfigDict({**base, **kw})


PROBLEM = tasks.Problem("9 *3 -2 =", "25", None, chain_lib.Chain(9, (("*", 3), ("-", 2))))
ORACLE = chain_lib.ChainOracle(chain_lib.AnswerFormat("#", ""))


@pytest.mark.parametrize(
  "prefix,next_text",
  [
    ("", "9"),  # start the first step from the problem's start value
    ("9*3=2", "7"),  # finish the correct result
    ("9*3=28", " "),  # a wrong result is closed ...
    ("9*3=28 ", "2"),  # ... and the next step starts from the student's own value: 28-2=26
    ("9*3=28 28-2=", "2"),  # 26
    ("9-", "3"),  # the student chose the wrong operator: keep it, 9-3=6
    ("9-3=", "6"),
    ("9*4", "="),  # wrong operand kept: 9*4=36
    ("x", " "),  # not a step: closed
    ("9*3=27 27-2=25 #2", "5"),
    ("9*3=27 27-2=25 #25", ""),  # answer written: stop
    ("9*3=27 27-2=25 #3", ""),  # a wrong answer is written: stop as well
  ],
)
def test_oracle_next_character(prefix, next_text):
  assert ORACLE.continuation(PROBLEM, prefix)[:1] == next_text


def _steps_are_consistent(response):
  """Every step's result is right for the numbers written in it, and each step starts where the last ended."""
  prev = None
  for part in response.split(" "):
    m = re.fullmatch(r"(-?\d+)([+\-*])(\d+)=(-?\d+)", part)
    if m:
      x, op, a, y = int(m[1]), m[2], int(m[3]), int(m[4])
      assert y == eval(f"{x}{op}{a}"), part  # noqa: S307 (our own digits and operators)
      assert prev is None or x == prev, response
      prev = y
  return prev


def test_oracle_recovers_from_random_states():
  """From random prefixes, following the oracle ends with an answer equal to the chain continued from the
  student's last written value, with arithmetically correct steps after the prefix."""
  task = tasks.make_task(_cfg())
  rng = np.random.default_rng(0)
  for i in range(300):
    p = task.problems("train")[i]
    prefix = "".join(rng.choice(list("0123456789+-*= "), rng.integers(0, 10)))
    s = prefix
    for _ in range(200):
      c = task.oracle.continuation(p, s)
      if not c:
        break
      s += c[0]
    tail = s[len(prefix) :]
    assert re.search(r"#-?\d+$", s), s
    _steps_are_consistent(tail.strip().rsplit(" ", 1)[0] if " " in tail.strip() else "")


def test_verifier_trace_names_the_mistakes():
  v = chain_lib.verify(PROBLEM.meta, ORACLE.fmt, "9*4=36 36-2=33 #33")
  assert not v.correct
  assert "step 1 applies *4, the problem says *3" in v.feedback and "36-2 is 34, not 33" in v.feedback
  assert chain_lib.verify(PROBLEM.meta, ORACLE.fmt, "9*3=27 27-2=25 #25") == tasks.Verdict(True, "correct")


@pytest.mark.parametrize(
  "response,answer",
  [
    ("so the total is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{3}{4}}", "0.75"),
    ("Answer: 1,000", "1000"),
    ("x \\boxed{2} then \\boxed{2^{3}}", "8"),
    ("Answer: 3/6", "1/2"),
    ("\\boxed{x+1}", "1+x"),
  ],
)
def test_math_answers_are_checked_by_value(response, answer):
  assert math_task.equivalent(math_task.extract_answer(response), answer)


@pytest.mark.parametrize("response,answer", [("\\boxed{41}", "42"), ("no answer here", "42"), ("\\boxed{}", "0")])
def test_math_wrong_or_missing_answers(response, answer):
  got = math_task.extract_answer(response)
  assert got is None or not math_task.equivalent(got, answer)


def test_math_data_file_errors_name_file_line_field(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text('{"question": "q", "answer": "1"}\n\n{"question": "q2", "answer": 2}\n[1, 2]\n')
  with pytest.raises(tasks.DataError, match=r"d\.jsonl:4: expected a JSON object, got list"):
    tasks.make_task(_cfg(name="math", train_path=str(path), eval_size=1))
  path.write_text('{"question": 5, "answer": "1"}\n')
  with pytest.raises(tasks.DataError, match=r"d\.jsonl:1: field 'question' should be str, got int"):
    tasks.make_task(_cfg(name="math", train_path=str(path), eval_size=1))
  path.write_text(
    "".join(json.dumps({"question": f"{i}+1?", "answer": str(i + 1), "solution": "add one"}) + "\n" for i in range(5))
  )
  task = tasks.make_task(_cfg(name="math", train_path=str(path), eval_size=2))
  p = task.problems("eval")[0]
  assert task.verify(p, "\\boxed{4}").correct and len(task.problems("train")) == 3
  assert task.verify(p, "\\boxed{5}").feedback == "answer 5 is wrong. Reference solution: add one"


def test_science_answers_and_formats(tmp_path):
  path = tmp_path / "s.jsonl"
  rows = [
    {"question": "Q1", "choices": ["a", "b", "c"], "answer": 1, "explanation": "because"},
    {"question": "Q2", "choices": ["x", "y"], "answer": "y"},
    {"question": "Q3", "choices": ["p", "q"], "answer": "A"},
  ]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  task = tasks.make_task(_cfg(name="science", train_path=str(path), eval_size=1))
  train = task.problems("train")
  assert [p.answer for p in train] == ["B", "B"]
  assert task.verify(train[0], "I think... Answer: B").correct and task.verify(train[0], "so (B)").correct
  assert task.verify(train[0], "Answer: C").feedback == "C is wrong, the answer is B. because"
  assert science.extract_choice("Answer: Z", 3) is None
  path.write_text(json.dumps({"question": "Q", "choices": ["a"], "answer": 7}) + "\n")
  with pytest.raises(tasks.DataError, match=r"s\.jsonl:1: field 'answer' \(7\)"):
    tasks.make_task(_cfg(name="science", train_path=str(path), eval_size=1))


REAL_RESPONSES = [  # as SmolLM2-135M-Instruct and larger instruct models write them
  ("She triples them: 9 x 3 = 27. Then she loses 2: 27 - 2 = 25. The answer is 25.", "25"),
  ("9 * 3 = 27\n27 - 2 = 25\n#### 25", "25"),
  ("**Answer:** 25 coins", "25"),
  ("The answer is: $25$.", "25"),
  ("First \\boxed{24}, no wait. The final answer is 25", "25"),  # the last one written wins
  ("The answer is 25. So the answer is \\boxed{25}.", "25"),
  ("The answer is 1,000 coins.", "1000"),
  ("The answer is $\\frac{3}{4}$.", "0.75"),
  ("She has -3 left. The answer is -3.", "-3"),
  ("Fay has 6 + 1 = 7 books. The answer is 6 + 1 = 7 books.", "7"),  # an equation states its last value
  ("The answer is 7 (check: 7 + 3 = 10).", "7"),  # a number that opens no equation is the answer
  ("The answer is 9 + 8.", "17"),  # an expression: its value
  ("The answer is 3 x 4.", "12"),
  ("The answer is 8 \\div 2.", "4"),
  ("The answer is 25, since 5 x 5 = 25.", "25"),  # a comma ends the number
  ("The answer is 10 - 2 = 8, so she has 8.", "8"),
]


@pytest.mark.parametrize("text", ["2 + 9^99999999", "1 + 10^10^10", "2 + 99999!", "2**(12345)"])
def test_math_refuses_to_evaluate_a_power_or_factorial_too_large(text):
  """A policy's text is evaluated by sympy; these would stall it (a grader that hangs stalls the run)."""
  with pytest.raises(ValueError, match="too large"):
    math_task._to_sympy(text)
  assert math_task._to_sympy("2^10 + 3!") == 1030  # small ones are read


@pytest.mark.parametrize("response,answer", REAL_RESPONSES)
def test_math_reads_the_answer_forms_instruct_models_write(response, answer):
  assert math_task.equivalent(math_task.extract_answer(response), answer)


def test_math_grades_the_value_an_equation_after_the_cue_states_not_its_first_number():
  """RL on SmolLM2 learned to write the right number after the cue and then an equation to another: 'The answer is
  9 + 8 = 17 shells.' to a problem whose answer is 9. It states 17, and is wrong, in every cue's form."""
  task = tasks.make_task(_cfg(name="math"))
  p = task.problems("eval")[0]
  right = int(p.answer)
  for cue in ("The answer is", "The final answer is", "Answer:", "####"):
    assert task.verify(p, f"{cue} {right} + 8 = {right + 8} shells.") == tasks.Verdict(
      False, f"answer {right + 8} is wrong"
    )
    assert task.verify(p, f"{cue} {right - 1} + 1 = {right}.") == tasks.Verdict(True, "correct")
  assert task.verify(p, f"The answer is ${right} \\times 2 = {2 * right}$") == tasks.Verdict(
    False, f"answer {2 * right} is wrong"
  )


def test_math_answer_formats_choose_the_forms_read():
  assert math_task.extract_answer("#### 7. The answer is 8", ("####",)) == "7"
  assert math_task.extract_answer("#### 7. The answer is 8") == "8"
  assert math_task.extract_answer("The answer is 8", ("boxed",)) is None
  with pytest.raises(tasks.ConfigError, match="task.answer_formats"):
    tasks.make_task(_cfg(name="math", answer_formats=("boxed", "last number")))


def test_generated_math_grades_a_final_answer_in_prose_and_traces_the_oracle_format():
  task = tasks.make_task(_cfg(name="math", max_ops=2))
  p = task.problems("eval")[0]
  right, wrong = p.answer, str(int(p.answer) + 1)
  assert task.verify(p, f"Let me think. The answer is {right}.") == tasks.Verdict(True, "correct")
  assert task.verify(p, f"#### {wrong}") == tasks.Verdict(False, f"answer {wrong} is wrong")
  assert task.verify(p, "I do not know.") == tasks.Verdict(False, "no final answer")
  assert task.verify(p, p.reference) == tasks.Verdict(True, "correct")  # the oracle's own format
  bad_step = p.reference.replace("=", "=9", 1)
  v = task.verify(p, bad_step)
  assert "step 1:" in v.feedback  # a response in the oracle's format gets its step-by-step trace


def test_each_task_has_a_wrong_solution_its_verifier_rejects(tmp_path):
  """Behaviour cloning's wrong solution, task by task: the reference passes, the wrong solution fails with feedback that
  says why (a wrong step, a wrong answer, a failing test), and it is written like the reference."""
  path = tmp_path / "d.jsonl"
  path.write_text(
    "".join(
      json.dumps({"question": f"{i}+1?", "answer": str(i + 1), "solution": f"\\boxed{{{i + 1}}}"}) + "\n"
      for i in range(3)
    )
  )
  science_path = tmp_path / "s.jsonl"
  science_path.write_text(
    "".join(json.dumps({"question": f"Q{i}", "choices": ["a", "b", "c"], "answer": 2}) + "\n" for i in range(3))
  )
  cases = [
    (_cfg(name="arith"), "train", "answer"),
    (_cfg(name="math", min_ops=2), "eval", "answer"),
    (_cfg(name="math", train_path=str(path), eval_size=1), "train", "is wrong. Reference solution"),
    (_cfg(name="science", eval_size=2, train_size=4), "train", "is wrong, the answer is"),
    (_cfg(name="science", train_path=str(science_path), eval_size=1), "train", "A is wrong, the answer is C"),
    (_cfg(name="code", train_size=3, eval_size=1), "train", "assert"),
  ]
  for cfg, split, said in cases:
    task = tasks.make_task(cfg)
    for p in list(task.problems(split))[:2]:
      wrong = task.wrong_solution(p)
      assert task.verify(p, p.reference).correct, (cfg.name, p.reference)
      verdict = task.verify(p, wrong)
      assert not verdict.correct and verdict.feedback, (cfg.name, wrong)
    assert said in verdict.feedback or said in wrong, (cfg.name, wrong, verdict.feedback)
