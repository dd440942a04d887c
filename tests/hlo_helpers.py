"""Reading compiled HLO text: the instructions a while loop runs (its body and everything the body calls)."""

import math
import re

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")
_CALLED = re.compile(r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_WHILE_BODY = re.compile(r"\bwhile\(.*\bbody=%?([\w.\-]+)")
_SHAPE = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (\w+)\[([\d,]*)\]")


def computations(hlo_text: str) -> dict[str, list[str]]:
  """Instruction lines by computation name."""
  out, name = {}, None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line.strip())
    if m:
      name = m.group(1)
      out[name] = []
    elif name is not None and line.strip() == "}":
      name = None
    elif name is not None:
      out[name].append(line)
  return out


def _called(line: str) -> list[str]:
  names = _CALLED.findall(line)
  for group in _BRANCHES.findall(line):
    names += [n.strip().lstrip("%") for n in group.split(",") if n.strip()]
  return names


def while_body_lines(hlo_text: str, carrying: str = "") -> list[str]:
  """Every instruction that runs inside the body of a while loop whose carried state names the array type
  `carrying` (e.g. "f32[4,2,8,12]"; "" for every loop), nested loops and fusions included."""
  comps = computations(hlo_text)
  todo = [
    m.group(1)
    for lines in comps.values()
    for line in lines
    if (m := _WHILE_BODY.search(line)) and carrying in line.split(" while(")[0]
  ]
  assert todo, f"no while loop carrying {carrying!r} in this HLO"
  seen, lines = set(), []
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    for line in comps[name]:
      lines.append(line)
      todo += _called(line)
  return lines


def opcode(line: str) -> str:
  """`fusion`, `transpose`, `all-gather`, ... of one instruction line."""
  m = re.search(r"= \S+ ([\w\-]+)\(", line)
  if m is None:  # tuple-shaped results: `= (f32[..], ...) op(`
    m = re.search(r"\) ([\w\-]+)\(", line)
  return m.group(1) if m else ""


def elements(line: str) -> int:
  """Number of elements of an array-shaped result (0 for tuples)."""
  m = _SHAPE.match(line)
  return math.prod(int(d) for d in m.group(2).split(",") if d) if m else 0
