"""What every task provides: problems, a verifier that returns a verdict with rich feedback, and (built-in tasks) an
oracle expert that knows the right continuation from any state the student can reach."""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from distil_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class Problem:
  prompt: str  # what the student sees
  answer: str  # the canonical final answer
  reference: str | None = None  # a reference solution (SFT target, and feedback for tasks that show it)
  meta: Any = None  # task-specific: the operation chain, the tests, the choices
  source: str = ""  # where a data file's problem came from, "file:line:field" of its prompt ("" when generated)


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

  def wrong_solution(self, problem: Problem) -> str:
    """A solution written like the reference that `verify` rejects: behaviour cloning shows the student the verifier's
    feedback on it, so it should be the kind of mistake a student makes (a wrong step, a wrong final answer)."""

  def corpus(self) -> Iterable[str]:
    """Text to train a tokenizer on when no pretrained one is given."""


MAX_RECORD_BYTES = 1 << 20  # the default of `task.max_record_bytes`


def _lines(path: str, max_bytes: int):
  """(line number, text) of every non-blank line, reading at most `max_bytes` + 1 bytes of any line: a 50 MB line is
  refused after 1 MB is read, not after it was read whole."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    f = opener(path, "rb")
  except OSError as e:
    raise DataError(f"{path}: cannot open ({e.strerror or e})") from None
  with f:
    lineno = 0
    while True:
      try:
        raw = f.readline(max_bytes + 1)
      except (OSError, EOFError) as e:  # gzip: a truncated or corrupt stream
        raise DataError(f"{path}:{lineno + 1}: cannot read ({e})") from None
      if not raw:
        return
      lineno += 1
      if len(raw) > max_bytes and not raw.endswith(b"\n"):
        raise DataError(
          f"{path}:{lineno}: the line is longer than task.max_record_bytes={max_bytes} bytes "
          "(raise it if such records are intended)"
        )
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataError(
          f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)"
        ) from None
      if text.strip():
        yield lineno, text


class Record(dict):
  """A data record (the JSON object of one line) that remembers where it came from, as "file:line"."""

  where: str = ""


def read_jsonl(
  path: str,
  required: Sequence[str],
  types: dict[str, type | tuple] | None = None,
  *,
  max_bytes: int = MAX_RECORD_BYTES,
) -> list[Record]:
  """Records of a JSONL file (gzip if it ends in .gz), each checked for encoding, size, its required fields and their
  types; every error names file:line (and the field)."""
  records = []
  for lineno, line in _lines(path, max_bytes):
    try:
      parsed = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(parsed, dict):
      raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(parsed).__name__}")
    for field in required:
      if field not in parsed:
        raise DataError(f"{path}:{lineno}: missing field {field!r} (have {sorted(parsed)})")
    for field, kind in (types or {}).items():
      if field in parsed and not isinstance(parsed[field], kind):
        raise DataError(
          f"{path}:{lineno}: field {field!r} should be {getattr(kind, '__name__', kind)}, "
          f"got {type(parsed[field]).__name__}"
        )
    record = Record(parsed)
    record.where = f"{path}:{lineno}"
    records.append(record)
  if not records:
    raise DataError(f"{path}: no records")
  return records


def split_records(records: Sequence, eval_size: int) -> dict[str, list]:
  """The last `eval_size` records are held out for evaluation (a stable split for a fixed file)."""
  if len(records) <= eval_size:
    raise DataError(f"{len(records)} records cannot give task.eval_size={eval_size} held-out ones and a training set")
  return {"train": list(records[:-eval_size]), "eval": list(records[-eval_size:])}
