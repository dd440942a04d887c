"""The library's own error types: what `main.py` reports as one line, without a traceback.

Anything else that escapes (a `ValueError` from jax, an `IndexError` in our code) is a bug and keeps its traceback.
Each message names the cause the user can act on: a config key, a file:line:field, an expert's URL, a checkpoint.
`InputError` subclasses `ValueError`: a bad input is a bad value, and a caller that catches `ValueError` for it
catches this too.
"""

from __future__ import annotations

import errno


class Error(Exception):
  """Raised with a message written for the user; `main.py` prints it as `distil_jax: <Type>: <message>`."""


class InputError(Error, ValueError):
  """Bad input found before (or instead of) doing work: a config value, a data record, a workdir or a model
  checkpoint that does not fit the config."""


class ConfigError(InputError):
  """Config values out of range, of an unknown kind, or inconsistent with each other; one line per key."""


class DataError(InputError):
  """A data file is malformed; the message names the file, the line and the field."""


class CheckpointError(InputError):
  """No usable checkpoint where one is needed (every one is damaged, or none exists), or one that belongs to a run
  with another configuration (a parameter's shape, the process count)."""


class ExpertError(Error, RuntimeError):
  """An expert could not label a batch, or labelled it with content that cannot be right (the message names the
  expert and the cause; nothing of that batch reaches the buffer)."""


def disk_full(e: BaseException) -> str | None:
  """The first line of the error in `e`'s chain that says the disk is full (ENOSPC: an OSError, or tensorstore's
  text for it), else None: `main.py` reports it in one line, whichever write hit it."""
  while e is not None:
    text = (str(e).strip().splitlines() or [""])[0]
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in text:
      return text if len(text) <= 300 else text[:240] + " ... (no space left on device)"
    e = e.__cause__ or e.__context__
  return None
