"""What every task provides: problems, a verifier that returns a verdict with rich feedback, and (built-in tasks) an
oracle expert that knows the right continuation from any state the student can reach."""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections.abc import Iterable, Sequence
from typing import Any, Protocol


@dataclasses.dataclass(frozen=True)
class Problem:
  prompt: str  # what the student sees
  answer: str  # the canonical final answer
  reference: str | None = None  # a reference solution (SFT target, and feedback for tasks that show it)
  meta: Any = None  # task-specific: the operation chain, the tests, the choices


@dataclasses.dataclass(frozen=True)
class Verdict:
  correct: bool
  feedback: str  # rich feedback: a trace, a failing test, a reference solution

  @property
  def reward(self) -> float:
    return float(self.correct)


class Oracle(Protocol):
  def continuation(self, problem: Problem, response: str) -> str:
    """The text an expert would write from here to the end of the response ('' means: stop now)."""


class Task(Protocol):
  name: str
  oracle: Oracle | None

  def problems(self, split: str) -> Sequence[Problem]:
    """'train' or 'eval' problems (a finite list; training repeats it)."""

  def verify(self, problem: Problem, response: str) -> Verdict: ...

  def corpus(self) -> Iterable[str]:
    """Text to train a tokenizer on when no pretrained one is given."""


class DataError(ValueError):
  """A data file is malformed; the message names the file, the line and the field."""


def read_jsonl(path: str, required: Sequence[str], types: dict[str, type | tuple] | None = None):
  """Records of a JSONL file (gzip if it ends in .gz), each checked for its required fields and their types."""
  opener = gzip.open if path.endswith(".gz") else open
  records = []
  with opener(path, "rt", encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(record, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
      for field in required:
        if field not in record:
          raise DataError(f"{path}:{lineno}: missing field {field!r} (have {sorted(record)})")
      for field, kind in (types or {}).items():
        if field in record and not isinstance(record[field], kind):
          raise DataError(
            f"{path}:{lineno}: field {field!r} should be {getattr(kind, '__name__', kind)}, "
            f"got {type(record[field]).__name__}"
          )
      records.append(record)
  if not records:
    raise DataError(f"{path}: no records")
  return records


def split_records(records: Sequence, eval_size: int) -> dict[str, list]:
  """The last `eval_size` records are held out for evaluation (a stable split for a fixed file)."""
  if len(records) <= eval_size:
    raise DataError(f"{len(records)} records cannot give {eval_size} held-out ones and a training set")
  return {"train": list(records[:-eval_size]), "eval": list(records[-eval_size:])}
