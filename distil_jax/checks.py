"""How a config check reports: one line per failed check, naming the key as it is written on the command line
(`train.iterations=-1: must be ...`), so that all failures are collected and shown at once (`validate.py`).

Each section's checks are written once, in the module that owns the section (`losses.check_section`,
`model.check_section`, `sharding.check_mesh`, `experts.check_section`): `validate.py` runs them all over the config
before work starts, and the section's typed value runs its own over itself when it is built (`raise_problems`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence


class Checks:
  """Collects one line per failed check; `key` is the dotted config key."""

  def __init__(self, config):
    self.config, self.lines = config, []

  def value(self, key: str):
    node = self.config
    for part in key.split("."):
      node = node[part]
    return node

  def get(self, key: str, default=None):
    """The value, or `default` when the key is missing (a line says so where the key's own check runs)."""
    try:
      return self.value(key)
    except (KeyError, AttributeError):
      return default

  def fail(self, key: str, why: str) -> None:
    try:
      shown = f"{key}={self.value(key)!r}"
    except (KeyError, AttributeError):
      shown = key
    self.lines.append(f"{shown}: {why}")

  def has(self, key: str) -> bool:
    try:
      self.value(key)
      return True
    except (KeyError, AttributeError):
      self.lines.append(f"{key}: missing from the config")
      return False

  def number(self, key, *, lo=None, hi=None, lo_open=False, hi_open=False, integer=False) -> bool:
    """A finite number (an integer if `integer`) in the interval given; False (and one line) otherwise."""
    if not self.has(key):
      return False
    v = self.value(key)
    kind = "an integer" if integer else "a number"
    if isinstance(v, bool) or not isinstance(v, int if integer else int | float) or not math.isfinite(v):
      self.fail(key, f"must be {kind}")
      return False
    below = lo is not None and (v <= lo if lo_open else v < lo)
    above = hi is not None and (v >= hi if hi_open else v > hi)
    if below or above:
      left = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
      right = "" if hi is None else f"{'<' if hi_open else '<='} {hi}"
      self.fail(key, f"must be {kind} {' and '.join(s for s in (left, right) if s)}")
      return False
    return True

  def count(self, key, lo=1) -> bool:
    return self.number(key, lo=lo, integer=True)

  def enum(self, key, allowed: Sequence[str]) -> bool:
    if not self.has(key):
      return False
    if self.value(key) not in allowed:
      self.fail(key, f"expected one of {', '.join(map(repr, allowed))}")
      return False
    return True

  def flag(self, key) -> None:
    if self.has(key) and not isinstance(self.value(key), bool):
      self.fail(key, "must be True or False")

  def template(self, key, fields: Sequence[str]) -> None:
    if not self.has(key):
      return
    text = self.value(key)
    try:
      text.format(**{f: "" for f in fields})
    except (KeyError, IndexError, ValueError, AttributeError) as e:
      self.fail(key, f"is not a format string with fields {', '.join('{' + f + '}' for f in fields)} ({e!r})")
      return
    missing = [f for f in fields if "{" + f + "}" not in text]
    if missing:
      self.fail(key, f"must contain {', '.join('{' + f + '}' for f in missing)}")

  def checkpoint_folder(self, key: str) -> None:
    """A Hugging Face checkpoint folder: its config.json and its weights."""
    path, weights = self.value(key), ("model.safetensors", "model.safetensors.index.json")
    if not os.path.isfile(os.path.join(path, "config.json")):
      self.fail(key, "not a Hugging Face checkpoint folder (no config.json in it)")
    elif not any(os.path.isfile(os.path.join(path, w)) for w in weights):
      self.fail(key, f"holds neither {' nor '.join(weights)}")

  def divides(self, what: str, value: int, by: int, by_what: str) -> None:
    if by and value % by:
      self.lines.append(f"{what} = {value} is not divisible by {by_what} ({by})")


def raise_problems(section: str, values, check: Callable[[Checks], object]):
  """`check` over one section's `values` (a mapping or a namespace; a typed value checking itself): ValueError
  listing every failed line; else what `check` returns."""
  ch = Checks({section: dict(values) if hasattr(values, "keys") else vars(values)})
  out = check(ch)
  if ch.lines:
    raise ValueError("\n".join(ch.lines))
  return out


def typed(cls, section, **derived):
  """A section's typed value: `cls` built from the section's keys that name its fields, and the values the run
  derives (these win). The one way a config section becomes a dataclass, so a new key reaches its value by name."""
  names = {f.name for f in dataclasses.fields(cls)}
  return cls(**{**{k: v for k, v in section.items() if k in names}, **derived})
