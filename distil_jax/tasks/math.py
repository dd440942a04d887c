"""Math word problems: a JSONL file of {"question", "answer", "solution"?}, or generated ones for CPU runs.

Answers are read from the last `\\boxed{...}` or "Answer: ..." in the response and compared by value (integers,
decimals, fractions, simple LaTeX and expressions, via sympy). Feedback is the verdict, plus the reference solution
when the record has one. Generated problems are arithmetic chains told as stories; they come with the chain oracle.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import sympy
from sympy.parsing.sympy_parser import parse_expr, standard_transformations

from distil_jax.tasks import chain as chain_lib
from distil_jax.tasks.arith import ChainProblems, _LazyList
from distil_jax.tasks.base import MAX_RECORD_BYTES as MAX_BYTES
from distil_jax.tasks.base import Problem, Verdict, read_jsonl, split_records

FORMAT = chain_lib.AnswerFormat("\\boxed{", "}")
_NAMES = ("Ann", "Ben", "Cy", "Dee", "Eli", "Fay")
_ITEMS = ("coins", "cards", "shells", "books")
_PHRASES = {"+": ("gets {a} more", "finds {a} more"), "-": ("loses {a}", "gives away {a}")}
_MULT = {2: "doubles them", 3: "triples them"}


def extract_answer(response: str) -> str | None:
  """The last \\boxed{...} (balanced braces) or, failing that, the text after the last 'Answer:'."""
  starts = [m.end() for m in re.finditer(r"\\boxed\{", response)]
  if starts:
    i, depth = starts[-1], 1
    for j in range(i, len(response)):
      depth += {"{": 1, "}": -1}.get(response[j], 0)
      if depth == 0:
        return response[i:j].strip()
    return None
  m = list(re.finditer(r"Answer:\s*(.+)", response))
  return m[-1][1].strip().rstrip(".") if m else None


def _to_sympy(text: str):
  t = text.strip().strip("$").replace("\\left", "").replace("\\right", "").replace("\\!", "")
  t = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", t)
  t = t.replace("\\cdot", "*").replace("\\times", "*").replace("^", "**").replace("{", "(").replace("}", ")")
  t = re.sub(r"(?<=\d),(?=\d{3}\b)", "", t)  # 1,000 -> 1000
  t = re.sub(r"\\text\(([^()]*)\)", "", t).replace("%", "")
  return parse_expr(t, transformations=standard_transformations, evaluate=True)


def equivalent(a: str, b: str) -> bool:
  """Same value: exact string match, else sympy says a - b simplifies to 0."""
  if a.strip() == b.strip():
    return True
  try:
    return bool(sympy.simplify(_to_sympy(a) - _to_sympy(b)) == 0)
  except Exception:  # unparsable answers are simply not equivalent
    return False


class MathTask:
  name = "math"

  def __init__(self, cfg):
    self.cfg = cfg
    if cfg.train_path:
      records = read_jsonl(
        cfg.train_path, ["question", "answer"], {"question": str}, max_bytes=cfg.get("max_record_bytes", MAX_BYTES)
      )
      self._records = split_records(
        [
          Problem(
            cfg.prompt_template.format(question=r["question"]),
            str(r["answer"]),
            r.get("solution"),
            source=f"{r.where}:question",
          )
          for r in records
        ],
        cfg.eval_size,
      )
      self.oracle = None  # a file brings no oracle: use the self, model or http expert
    else:
      self._records = None
      self.oracle = chain_lib.ChainOracle(FORMAT)
      self._generated = ChainProblems(cfg, self.render)

  def render(self, chain: chain_lib.Chain) -> Problem:
    rng = np.random.default_rng([self.cfg.seed, chain.start, *[a for _, a in chain.ops]])
    name, item = _NAMES[rng.integers(len(_NAMES))], _ITEMS[rng.integers(len(_ITEMS))]
    acts = [_MULT[a] if op == "*" else _PHRASES[op][rng.integers(2)].format(a=a) for op, a in chain.ops]
    question = f"{name} has {chain.start} {item}, " + ", ".join(acts) + f". How many {item}?"
    prompt = self.cfg.prompt_template.format(question=question)
    return Problem(prompt, str(chain.answer), chain_lib.solution(chain, FORMAT), chain)

  def problems(self, split):
    if self._records is not None:
      return self._records[split]
    if split == "eval":
      return self._generated.eval
    return _LazyList(self.cfg.train_size, self._generated.train)

  def verify(self, problem: Problem, response: str) -> Verdict:
    if problem.meta is not None:  # generated: the chain's step-by-step trace
      return chain_lib.verify(problem.meta, FORMAT, response)
    answer = extract_answer(response)
    correct = answer is not None and equivalent(answer, problem.answer)
    feedback = "correct" if correct else ("no final answer" if answer is None else f"answer {answer} is wrong")
    if problem.reference and not correct:
      feedback += f". Reference solution: {problem.reference}"
    return Verdict(correct, feedback)

  @functools.cached_property
  def _corpus(self):
    if self._records is not None:
      out = []
      for p in self._records["train"][:2000]:
        out += [p.prompt, p.reference or "", f"\\boxed{{{p.answer}}}", self.verify(p, "").feedback]
      return out
    out = []
    for i in range(500):
      p = self._generated.train(i)
      out += [
        p.prompt,
        p.reference,
        self.verify(p, p.reference.replace("=", "=1", 1)).feedback,
        self.verify(p, "").feedback,
      ]
    return out

  def corpus(self):
    return iter(self._corpus)
