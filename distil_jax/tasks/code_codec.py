"""Plain data as JSON, for the code grader's channel: what a program's function returned, and what it is called with.

Only exact built-in types cross: None, bool, int, float (nan and inf included), str, bytes, complex, list, tuple,
set, frozenset and dict. JSON objects are tags ({"tuple": [...]}, {"dict": [[k, v], ...]}, ...), so a plain dict
is never confused with one. Decoding builds fresh objects of these types and nothing else: a subclass with its own
`__eq__`, a proxy or a pickle cannot come back from an untrusted program. Nesting is bounded by MAX_DEPTH.

This file is self-contained (standard library only): the grader also embeds its source in the sandboxed harnesses.
"""

import json

MAX_DEPTH = 64


def to_json(value, depth=0):
  kind = type(value)
  if value is None or kind in (bool, int, float, str):
    return value
  if depth >= MAX_DEPTH:
    raise ValueError(f"data nested deeper than {MAX_DEPTH}")
  if kind is list:
    return [to_json(v, depth + 1) for v in value]
  if kind in (tuple, set, frozenset):
    return {kind.__name__: [to_json(v, depth + 1) for v in value]}
  if kind is dict:
    return {"dict": [[to_json(k, depth + 1), to_json(v, depth + 1)] for k, v in value.items()]}
  if kind is bytes:
    return {"bytes": value.hex()}
  if kind is complex:
    return {"complex": [value.real, value.imag]}
  raise TypeError(
    f"type {kind.__name__} is not plain data (None, bool, int, float, complex, str, bytes, list, "
    "tuple, set, frozenset, dict)"
  )


def from_json(obj, depth=0):
  kind = type(obj)
  if obj is None or kind in (bool, int, float, str):
    return obj
  if depth >= MAX_DEPTH:
    raise ValueError(f"data nested deeper than {MAX_DEPTH}")
  if kind is list:
    return [from_json(v, depth + 1) for v in obj]
  if kind is dict and len(obj) == 1:
    ((tag, items),) = obj.items()
    if tag == "bytes" and type(items) is str:
      return bytes.fromhex(items)
    if tag == "complex" and type(items) is list and len(items) == 2 and all(type(x) in (int, float) for x in items):
      return complex(*items)
    if type(items) is list:
      values = (from_json(v, depth + 1) for v in items)
      if tag in ("tuple", "set", "frozenset"):
        return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](values)
      if tag == "dict" and all(type(kv) is list and len(kv) == 2 for kv in items):
        return {from_json(k, depth + 1): from_json(v, depth + 1) for k, v in items}
  raise ValueError(f"not plain data: {str(obj)[:80]}")


def dumps(value) -> str:
  return json.dumps(to_json(value), separators=(",", ":"))


def loads(text):
  return from_json(json.loads(text))
