"""Plain data on the code grader's channel: JSON from the sandboxed processes, marshal towards them.

Only exact built-in types cross: None, bool, int, float (nan and inf included), str, bytes, complex, list, tuple,
set, frozenset and dict. In JSON, objects are tags ({"tuple": [...]}, {"dict": [[k, v], ...]}, ...), so a plain
dict is never confused with one. What an untrusted process writes is read with `loads`, which builds fresh objects
of these types and nothing else: a subclass with its own `__eq__`, a proxy or a pickle cannot come back. Nesting
is bounded by MAX_DEPTH.

Towards a sandboxed process the trainer writes `pack`ed lines (marshal, base64): only the trainer produces them,
and decoding them costs the child no import. Nothing here imports `re` at module level (through `json`), which
would cost each sandboxed interpreter ~10 ms of start-up: `dumps` writes JSON itself.

This file is self-contained (standard library only): the grader also embeds its source in the sandboxed harnesses.
"""

import binascii
import marshal

try:
  from _json import encode_basestring_ascii as _quote
except ImportError:  # an interpreter without the C accelerator
  from json.encoder import encode_basestring_ascii as _quote

MAX_DEPTH = 64
_INF = float("inf")
_CONTAINERS = {"tuple": tuple, "set": set, "frozenset": frozenset}


def _write(value, out: list, depth: int) -> None:
  kind = type(value)
  if value is None or kind is bool:
    out.append("null" if value is None else "true" if value else "false")
  elif kind is int:
    out.append(int.__repr__(value))
  elif kind is float:
    special = {_INF: "Infinity", -_INF: "-Infinity"}.get(value, "NaN" if value != value else None)
    out.append(special or float.__repr__(value))
  elif kind is str:
    out.append(_quote(value))
  elif depth >= MAX_DEPTH:
    raise ValueError(f"data nested deeper than {MAX_DEPTH}")
  elif kind is list:
    out.append("[")
    for i, v in enumerate(value):
      out.append("," if i else "")
      _write(v, out, depth + 1)
    out.append("]")
  elif kind in (tuple, set, frozenset):
    out.append(f'{{"{kind.__name__}":')
    _write(list(value), out, depth)
    out.append("}")
  elif kind is dict:
    out.append('{"dict":')
    _write([[k, v] for k, v in value.items()], out, depth)
    out.append("}")
  elif kind is bytes:
    out.append(f'{{"bytes":"{value.hex()}"}}')
  elif kind is complex:
    out.append('{"complex":')
    _write([value.real, value.imag], out, depth)
    out.append("}")
  else:
    raise TypeError(
      f"type {kind.__name__} is not plain data (None, bool, int, float, complex, str, bytes, list, tuple, set, "
      "frozenset, dict)"
    )


def dumps(value) -> str:
  """JSON text of plain data (tagged); TypeError / ValueError for anything else."""
  out = []
  _write(value, out, 0)
  return "".join(out)


def from_json(obj, depth=0):
  """Plain data from parsed, tagged JSON; ValueError / TypeError for anything else."""
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
    if tag in _CONTAINERS and type(items) is list:
      return _CONTAINERS[tag](from_json(v, depth + 1) for v in items)
    if tag == "dict" and type(items) is list and all(type(kv) is list and len(kv) == 2 for kv in items):
      return {from_json(k, depth + 1): from_json(v, depth + 1) for k, v in items}
  raise ValueError(f"not plain data: {str(obj)[:80]}")


def loads(text):
  """Plain data from JSON text written by an untrusted process."""
  import json  # the trainer has it already; the sandboxed processes never call this

  return from_json(json.loads(text))


def pack(value) -> bytes:
  """One line for a sandboxed process (trusted direction only: marshal is not safe against a crafted input)."""
  return binascii.b2a_base64(marshal.dumps(value))


def unpack(line: bytes):
  return marshal.loads(binascii.a2b_base64(line))
