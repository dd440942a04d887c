"""Multiple choice: JSONL {"question", "choices", "answer", "explanation"?}.

`answer` is a letter, an index, or the text of a choice. The response is read for its last "Answer: X" (or a lone
letter at the end); feedback is the verdict and, when the record has one, the explanation. With no data file,
generated questions (the value of an arithmetic chain, with distractors) stand in for CPU runs.
"""

from __future__ import annotations

import re
import string

import numpy as np

from distil_jax.tasks import chain as chain_lib
from distil_jax.tasks.base import MAX_RECORD_BYTES as MAX_BYTES
from distil_jax.tasks.base import DataError, Problem, Verdict, read_jsonl, split_records

LETTERS = string.ascii_uppercase


def _letter(record, where) -> str:
  answer, choices = record["answer"], record["choices"]
  if isinstance(answer, int) and 0 <= answer < len(choices):
    return LETTERS[answer]
  if isinstance(answer, str) and len(answer) == 1 and answer.upper() in LETTERS[: len(choices)]:
    return answer.upper()
  if isinstance(answer, str) and answer in choices:
    return LETTERS[choices.index(answer)]
  raise DataError(f"{where}: field 'answer' ({answer!r}) is not a letter, index or text of one of the choices")


def extract_choice(response: str, n_choices: int) -> str | None:
  valid = LETTERS[:n_choices]
  m = re.findall(r"Answer:\s*\(?([A-Z])\)?", response)
  if m and m[-1] in valid:
    return m[-1]
  m = re.search(r"\b([A-Z])\W*$", response.strip())
  return m[1] if m and m[1] in valid else None


class ScienceTask:
  name = "science"
  oracle = None

  def __init__(self, cfg):
    self.cfg = cfg
    if cfg.train_path:
      records = read_jsonl(
        cfg.train_path,
        ["question", "choices", "answer"],
        {"question": str, "choices": list},
        max_bytes=cfg.get("max_record_bytes", MAX_BYTES),
      )
      problems = [
        self._render(
          r["question"], r["choices"], _letter(r, r.where), r.get("explanation"), f"{r.where}:question,choices"
        )
        for r in records
      ]
    else:
      rng = np.random.default_rng(cfg.seed)
      problems = [self._generated(rng) for _ in range(cfg.train_size + cfg.eval_size)]
    self._split = split_records(problems, cfg.eval_size)

  def _render(self, question, choices, letter, explanation, source=""):
    lines = [question] + [f"{LETTERS[i]}) {c}" for i, c in enumerate(choices)]
    prompt = self.cfg.prompt_template.format(question="\n".join(lines))
    reference = (explanation + " " if explanation else "") + f"Answer: {letter}"
    return Problem(prompt, letter, reference, {"n": len(choices), "explanation": explanation}, source)

  def _generated(self, rng):
    chain = chain_lib.sample_chain(rng, 2, 9, 60)
    answer = chain.answer
    wrong = sorted({answer + int(d) for d in rng.choice([-3, -2, -1, 1, 2, 3, 10], 3, replace=False)})
    choices = [answer] + wrong
    rng.shuffle(choices)
    question = "Value of " + " ".join([str(chain.start)] + [f"{op}{a}" for op, a in chain.ops]) + "?"
    explanation = chain_lib.solution(chain, chain_lib.AnswerFormat("", "")).rsplit(" ", 1)[0]
    return self._render(question, [str(c) for c in choices], LETTERS[choices.index(answer)], explanation)

  def problems(self, split):
    return self._split[split]

  def verify(self, problem: Problem, response: str) -> Verdict:
    choice = extract_choice(response, problem.meta["n"])
    correct = choice == problem.answer
    if correct:
      return Verdict(True, "correct")
    feedback = "no answer given" if choice is None else f"{choice} is wrong, the answer is {problem.answer}"
    if problem.meta["explanation"]:
      feedback += f". {problem.meta['explanation']}"
    return Verdict(False, feedback)

  def wrong_solution(self, problem: Problem) -> str:
    """The reference's explanation with the next choice's letter as the answer."""
    other = LETTERS[(LETTERS.index(problem.answer) + 1) % problem.meta["n"]]
    explanation = problem.meta["explanation"]
    return (explanation + " " if explanation else "") + f"Answer: {other}"

  def corpus(self):
    for p in self._split["train"][:2000]:
      yield p.prompt
      yield p.reference
      yield self.verify(p, "").feedback
