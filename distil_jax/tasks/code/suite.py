"""A code problem's tests, split (with `ast`, in the trainer) into checks the trainer evaluates itself and a rest.

A *check* is an assertion such as `assert candidate([1, 2]) == 3` or `assert abs(candidate(1.33) - 0.33) < 1e-6`:
every call of the program's function has literal arguments (constants, containers, arithmetic on them), and the
rest of the expression is drawn from a whitelist whose cost is at most about linear in the size of what the program
returns (comparisons, boolean and unary operators, +, -, /, % (not with an output as the format), indexing, a few
built-ins such as abs / len / sorted / set / tuple, and method calls other than format whose arguments do not
depend on the program). The trainer sends the arguments, gets
the outputs back as plain data and evaluates the expression on them. Everything else (loops, random inputs,
helpers, assignments, `*` on outputs) is the *rest*: trusted test code that runs in a second sandboxed process,
with the program's functions replaced by proxies that return the program's outputs as plain data.

Tests come in two layouts: HumanEval's (a module defining `check(candidate)`, and the name of the function under
test), or a list of statements run in order, whose free called names are the program's functions.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import functools

from distil_jax.tasks.code import codec as code_codec

# Built-ins a check may call on the program's outputs (each bounded by the output's size; no range, bytes or pow).
SAFE_CALLS = frozenset(
  "abs all any bool chr complex dict divmod enumerate float frozenset int isinstance len list max min ord repr "
  "reversed round set sorted str sum tuple type zip".split()
)
_EXPR_NODES = (
  ast.Expression, ast.Compare, ast.BoolOp, ast.UnaryOp, ast.BinOp, ast.Call, ast.Name, ast.Load, ast.Constant,
  ast.List, ast.Tuple, ast.Set, ast.Dict, ast.Subscript, ast.Slice, ast.Attribute, ast.IfExp, ast.keyword,
  ast.cmpop, ast.boolop, ast.unaryop, ast.operator,
)  # fmt: skip
_LITERAL_NODES = (
  ast.Constant, ast.List, ast.Tuple, ast.Set, ast.Dict, ast.UnaryOp, ast.BinOp, ast.unaryop, ast.operator, ast.Load,
)  # fmt: skip
_GROWING_OPS = (ast.Mult, ast.Pow, ast.LShift, ast.MatMult)  # results far larger than their operands


@dataclasses.dataclass(frozen=True)
class Check:
  source: str  # the assertion as the test wrote it (shown in feedback)
  calls: tuple  # ((function name, args tuple, kwargs dict), ...): plain data only
  expr: str  # the assertion's condition with call k replaced by the name _o{k}


@dataclasses.dataclass(frozen=True)
class Suite:
  tests: tuple[str, ...]  # the tests as given (tokenizer corpus)
  checks: tuple[Check, ...]
  rest: str | None  # trusted source for the second process, or None when every test is a check
  names: tuple[str, ...]  # the program's functions that `rest` calls (proxies of the same names)
  prompt: str  # the problem's own prompt: helpers the rest may call (never the program's redefinitions)


class Unsplittable(Exception):
  pass


@functools.lru_cache(maxsize=4096)
def compiled(expr: str):
  return compile(expr, "<check>", "eval")


def _literal(node: ast.AST):
  if isinstance(node, ast.Constant):
    return node.value
  if not all(isinstance(n, _LITERAL_NODES) for n in ast.walk(node)):
    raise Unsplittable
  value = eval(compile(ast.Expression(node), "<literal>", "eval"), {"__builtins__": {}})  # noqa: S307 (test data)
  code_codec.dumps(value)  # TypeError / ValueError (caught by split_check) unless it is plain data
  return value


def _depends(node: ast.AST) -> bool:
  return any(isinstance(n, ast.Name) and n.id.startswith("_o") for n in ast.walk(node))


class _Swap(ast.NodeTransformer):
  """Replaces each call of the program's functions by a placeholder _o{k}, collecting its literal arguments."""

  def __init__(self, functions: dict[str, str]):
    self.functions, self.calls = functions, []

  def visit_Name(self, node):
    if node.id.startswith("_o"):  # the test's own name could be mistaken for a placeholder
      raise Unsplittable
    return node

  def visit_Call(self, node):
    if not (isinstance(node.func, ast.Name) and node.func.id in self.functions):
      return self.generic_visit(node)
    if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
      raise Unsplittable
    args = tuple(_literal(a) for a in node.args)
    kwargs = {k.arg: _literal(k.value) for k in node.keywords}
    self.calls.append((self.functions[node.func.id], args, kwargs))
    return ast.copy_location(ast.Name(f"_o{len(self.calls) - 1}", ast.Load()), node)


def split_check(stmt: ast.stmt, functions: dict[str, str]) -> Check | None:
  """The check that `stmt` is, or None. `functions` maps names in the test to the program's function names."""
  if not isinstance(stmt, ast.Assert):
    return None
  source = ast.unparse(stmt)
  test = ast.parse(source).body[0].test  # a private copy to rewrite (parsing is cheaper than copy.deepcopy)
  try:
    swap = _Swap(functions)
    expr = swap.visit(ast.Expression(test))
    calls = swap.calls
    for node in ast.walk(expr):
      ok = isinstance(node, _EXPR_NODES)
      if isinstance(node, ast.Name):
        ok = node.id in SAFE_CALLS or node.id.startswith("_o")
      elif isinstance(node, ast.Attribute):  # an output's format string could ask for a gigabyte of padding
        ok = not node.attr.startswith("_") and node.attr not in ("format", "format_map")
      elif isinstance(node, ast.BinOp) and isinstance(node.op, _GROWING_OPS):
        ok = not _depends(node)
      elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):  # "%s" formatting by the output
        ok = not _depends(node.left)
      elif isinstance(node, ast.Call) and not isinstance(node.func, ast.Name):  # a method: its arguments are fixed
        ok = not any(_depends(a) for a in [*node.args, *node.keywords])
      if not ok:
        raise Unsplittable
    code_codec.dumps([list(c) for c in calls])
  except (Unsplittable, ValueError, TypeError, SyntaxError, RecursionError, OverflowError, ZeroDivisionError):
    return None
  return Check(source, tuple(calls), ast.unparse(expr))


def _trivial(stmt: ast.stmt) -> bool:
  """A statement that cannot fail and has no effect (a docstring, `pass`, a bare `print`)."""
  if isinstance(stmt, ast.Pass):
    return True
  return isinstance(stmt, ast.Expr) and (
    isinstance(stmt.value, ast.Constant) or isinstance(stmt.value, ast.Name) and hasattr(builtins, stmt.value.id)
  )


def _split_body(body: list[ast.stmt], functions: dict[str, str]) -> tuple[list[Check], list[ast.stmt]]:
  checks, rest = [], []
  for stmt in body:
    check = split_check(stmt, functions)
    if check is not None:
      checks.append(check)
    elif not _trivial(stmt):
      rest.append(stmt)
  return checks, rest


def human_eval(test: str, entry_point: str, prompt: str) -> Suite:
  """HumanEval's layout: `test` defines check(candidate); `entry_point` is the function under test.

  Raises SyntaxError / ValueError when `test` has no check function (the caller names the record)."""
  module = ast.parse(test)
  check = next((n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "check"), None)
  if check is None or not check.args.args:
    raise ValueError("the test defines no check(candidate) function")
  functions = {check.args.args[0].arg: entry_point, entry_point: entry_point}
  checks, rest = _split_body(check.body, functions)
  source = None
  if rest:
    check.body = rest
    source = ast.unparse(module) + f"\n\ncheck({entry_point})\n"
  return Suite((test,), tuple(checks), source, (entry_point,), prompt)


def statements(tests: list[str], prompt: str) -> Suite:
  """Tests as statements run in order; the names they call that they do not define are the program's functions.

  Raises SyntaxError when a test does not parse (the caller names the record)."""
  body = [stmt for t in tests for stmt in ast.parse(t).body]
  bound, called = set(), set()
  for node in (n for stmt in body for n in ast.walk(stmt)):
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
      bound.add(node.id)
    elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
      bound.add(node.name)
    elif isinstance(node, ast.alias):
      bound.add((node.asname or node.name).split(".")[0])
    elif isinstance(node, ast.arg):
      bound.add(node.arg)
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not hasattr(builtins, node.func.id):
      called.add(node.func.id)
  called -= bound
  checks, rest = _split_body(body, {name: name for name in called})
  source = "\n".join(ast.unparse(s) for s in rest) + "\n" if rest else None
  return Suite(tuple(tests), tuple(checks), source, tuple(sorted(called)), prompt)
