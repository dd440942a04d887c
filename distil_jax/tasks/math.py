"""Math word problems: a JSONL file of {"question", "answer", "solution"?}, or generated ones for CPU runs.

Answers are read in the forms instruct models write (`\\boxed{21}`, "#### 21", "The answer is 21", "Answer: 21"; the
last one written wins, `task.answer_formats` chooses the forms) and compared by value (integers, decimals,
fractions, simple LaTeX and expressions, via sympy). Feedback is the verdict, plus the reference solution when the
record has one. Generated problems are arithmetic chains told as stories; they come with the chain oracle, and a
response is graded by its final answer, so a pretrained model that writes prose is scored too; one written in the
oracle's step format also gets the step-by-step trace as feedback.
"""

from __future__ import annotations

import fractions
import functools
import re

import numpy as np
import sympy
from sympy.parsing.sympy_parser import parse_expr, standard_transformations

from distil_jax.errors import ConfigError
from distil_jax.tasks import chain as chain_lib
from distil_jax.tasks.arith import ChainProblems, _LazyList
from distil_jax.tasks.base import MAX_RECORD_BYTES as MAX_BYTES
from distil_jax.tasks.base import Problem, Verdict, read_jsonl, split_records

FORMAT = chain_lib.AnswerFormat("\\boxed{", "}")
_NAMES = ("Ann", "Ben", "Cy", "Dee", "Eli", "Fay")
_ITEMS = ("coins", "cards", "shells", "books")
_PHRASES = {"+": ("gets {a} more", "finds {a} more"), "-": ("loses {a}", "gives away {a}")}
_MULT = {2: "doubles them", 3: "triples them"}


FORMATS = ("boxed", "####", "the answer is", "answer:")  # task.answer_formats: every one a response may use
_CUES = {  # the text after which each format's answer starts (\\boxed's ends at its balanced brace)
  "####": re.compile(r"####"),
  "the answer is": re.compile(r"the (?:final )?answer is:?", re.IGNORECASE),
  "answer:": re.compile(r"answer\s*:", re.IGNORECASE),
}
_LEADING_NUMBER = re.compile(r"[$\s]*(?P<n>[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?)(?![\d.,/]*\w)")
_GOES_ON = re.compile(r"\s*(?:(?:[-+*/×x]|\\times|\\cdot|\\div)\s*\d|=)")  # an expression or an equation follows
_PLAIN = re.compile(r"[-+]?\d+(?:\.\d+)?")
_HUGE = re.compile(r"\*\*\s*\(?\s*[-+]?\d{4,}|\*\*[^-+*/=]*\*\*|\d{4,}\s*!")  # a power or factorial sympy stalls on


def _boxed(response: str):
  """(start, text) of every \\boxed{...} with balanced braces."""
  for m in re.finditer(r"\\boxed\{", response):
    depth = 1
    for j in range(m.end(), len(response)):
      depth += {"{": 1, "}": -1}.get(response[j], 0)
      if depth == 0:
        yield m.end(), response[m.end() : j].strip()
        break


def _after_cue(text: str) -> str:
  """The answer written after a cue such as 'The answer is': a leading number if it starts with one ('25 coins.'
  is 25), else the rest of its line up to the sentence's end, without markdown bold or dollar signs. A number that
  opens an equation is not the answer: 'The answer is 9 + 8 = 17 shells.' states 17, the value after the sentence's
  last '=' (read as here), and an expression with no '=' is the expression ('9 + 8', whose value `equivalent`
  reads). Why: reading the 9 there paid a policy for writing the right number and then another (seen under RL)."""
  text = text.lstrip(" *\t")
  m = _LEADING_NUMBER.match(text)
  if m and _GOES_ON.match(text, m.end()):
    line = _sentence(text)
    return _after_cue(line.rsplit("=", 1)[1]) if "=" in line else line.strip().strip("$").strip()
  if m:
    return m["n"].replace(",", "") if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+", m["n"]) else m["n"]
  return _sentence(text).strip().strip("*").strip().strip("$").strip()


def _sentence(text: str) -> str:
  """`text` up to the end of its line or first sentence ('2.5' does not end one)."""
  return re.split(r"\n|\.(?:\s|$)", text, maxsplit=1)[0]


def extract_answer(response: str, formats=FORMATS) -> str | None:
  """The final answer: of every answer the response writes in one of `formats` (`\\boxed{}`, '#### 21',
  'The answer is 21', 'Answer: 21'), the one that starts last; None when there is none."""
  found = []
  for fmt in formats:
    if fmt == "boxed":
      found += list(_boxed(response))
    elif fmt in _CUES:
      found += [(m.end(), _after_cue(response[m.end() :])) for m in _CUES[fmt].finditer(response)]
    else:
      raise ValueError(f"task.answer_formats: {fmt!r} is not one of {FORMATS}")
  found = [(start, text) for start, text in found if text]
  return max(found)[1] if found else None


def _to_sympy(text: str):
  """sympy's reading of an answer. Text a policy wrote is parsed and evaluated here, so a power or factorial too
  large to evaluate at once ('9^99999999', '10^10^10', '99999!') is refused before sympy sees it."""
  t = text.strip().strip("$").replace("\\left", "").replace("\\right", "").replace("\\!", "")
  t = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", t)
  t = t.replace("\\cdot", "*").replace("\\times", "*").replace("\\div", "/").replace("×", "*")
  t = t.replace("^", "**").replace("{", "(").replace("}", ")")
  t = re.sub(r"(?<=\d)\s*x\s*(?=\d)", "*", t)  # 3 x 4
  t = re.sub(r"(?<=\d),(?=\d{3}\b)", "", t)  # 1,000 -> 1000
  t = re.sub(r"\\text\(([^()]*)\)", "", t).replace("%", "")
  if _HUGE.search(t):
    raise ValueError(f"too large to evaluate: {t[:40]!r}")
  return parse_expr(t, transformations=standard_transformations, evaluate=True)


def equivalent(a: str, b: str) -> bool:
  """Same value: exact string match, equal plain numbers, else sympy says a - b simplifies to 0."""
  if a.strip() == b.strip():
    return True
  if _PLAIN.fullmatch(a.strip()) and _PLAIN.fullmatch(b.strip()):  # the common case, without sympy
    return fractions.Fraction(a.strip()) == fractions.Fraction(b.strip())
  try:
    return bool(sympy.simplify(_to_sympy(a) - _to_sympy(b)) == 0)
  except Exception:  # unparsable answers are simply not equivalent
    return False


class MathTask:
  name = "math"

  def __init__(self, cfg):
    self.cfg = cfg
    unknown = [f for f in cfg.get("answer_formats", FORMATS) if f not in FORMATS]
    if unknown:
      raise ConfigError(f"task.answer_formats: {unknown} not among {FORMATS}")
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

  def _answer(self, response: str) -> str | None:
    return extract_answer(response, tuple(self.cfg.get("answer_formats", FORMATS)))

  def verify(self, problem: Problem, response: str) -> Verdict:
    if problem.meta is not None:  # generated: graded by the final answer, with the chain's trace as feedback
      answer = self._answer(response)
      value = problem.meta.answer
      read = lambda _: value if answer is not None and equivalent(answer, str(value)) else answer
      if chain_lib.has_steps(response):
        return chain_lib.verify(problem.meta, FORMAT, response, read=read)
      correct = read(response) == value
      wrong = "no final answer" if answer is None else f"answer {answer} is wrong"
      return Verdict(correct, "correct" if correct else wrong)
    answer = self._answer(response)
    correct = answer is not None and equivalent(answer, problem.answer)
    feedback = "correct" if correct else ("no final answer" if answer is None else f"answer {answer} is wrong")
    if problem.reference and not correct:
      feedback += f". Reference solution: {problem.reference}"
    return Verdict(correct, feedback)

  def wrong_solution(self, problem: Problem) -> str:
    if problem.meta is not None:
      return chain_lib.wrong_solution(problem.meta, FORMAT)
    try:
      other = str(int(problem.answer) + 1)
    except ValueError:
      other = problem.answer + "1"
    return f"The answer is \\boxed{{{other}}}."

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
