"""The code task's grader: the verdict is decided in the trainer, from the program's outputs as plain data.

How a response is graded:
  1. The program (prompt + response) is loaded in a sandboxed process (`distil_jax/sandbox/`) that holds no test: only a
     small server that, once the program has loaded, reads calls (function name and arguments) on fd 3 and writes
     what each returned, or the exception it raised, on fd 4.
  2. The trainer holds the tests, split by `suite.py`: for each *check* it sends the literal arguments after
     the program has loaded, decodes each output with `codec.py` (exact built-in types only, never pickle)
     and evaluates the check's own condition on it, in the trainer.
  3. Tests that cannot be split run in a second, fresh sandboxed process with the problem's own prompt (for its
     helpers) and the trusted test code, where the program's functions are proxies: each call is relayed by the
     trainer to the first process, and only the decoded output goes back. That process reports pass or fail.

What this guarantees: nothing the program prints, patches (exec, json, AssertionError, ==, builtins), reads or
exits with (sys.exit, os._exit) can make a test pass: its stdout is never parsed, the tests, expected values and
any nonce are never in its process, and an output is only ever the plain value it decodes to. A check passes only
if the trusted condition holds for the values the program returned on the trusted inputs.
What it does not guarantee: a program that recognises the tests' inputs (it sees them when called) and returns
memorised answers passes, as it would anywhere; a check only sees return values, so a program that mutates its
arguments, depends on call order or keeps state between calls is judged on what it returns; outputs that are not
plain data (a generator, a numpy array, a custom class) fail even where the original test would accept them;
tests relying on module globals of the program other than its functions fail, and so do outputs that cannot
cross the channel (ints past Python's 4300-digit conversion limit, more than `flood_bytes` of data). The sandbox's
limits (CPU, memory, wall clock, output) apply to each process; the second one's wall clock includes the program's
time. Conditions evaluated in the trainer are trusted test code on plain data, restricted to operations whose cost
is about linear in the output's size (`suite.py`).
Feedback carries only the failing test's source (its inputs and expected value), the program's output or
exception on it, and the last lines of an error, each trimmed; never what the program printed.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import pathlib

from distil_jax import sandbox
from distil_jax.tasks.base import Verdict
from distil_jax.tasks.code import codec as code_codec
from distil_jax.tasks.code import suite as code_suite

_SAFE_BUILTINS = {name: getattr(builtins, name) for name in code_suite.SAFE_CALLS}

# Shared by both sandboxed harnesses (they import nothing that pulls in `re`: each interpreter starts faster).
_COMMON = (
  pathlib.Path(code_codec.__file__).read_text()
  + r"""
import os

def _send(obj):
  data = (dumps(obj) + "\n").encode()
  while data:
    data = data[os.write(4, data):]

def _where(e, filename):
  line, tb = 0, e.__traceback__
  while tb is not None:
    if tb.tb_frame.f_code.co_filename == filename:
      line = tb.tb_lineno
    tb = tb.tb_next
  return line

def _describe(e):
  try:
    text = str(e)
  except BaseException:
    text = ""
  return type(e).__name__ + (": " + text if text else "")
"""
)

# The program's process: load it, say so, then answer calls until the trainer closes fd 3.
_SERVER = (
  _COMMON
  + r"""
import sys
_module = sys.modules["solution"] = type(sys)("solution")  # a real module: dataclasses, pickle look it up
_ns = _module.__dict__
try:
  with open("solution.py", "rb") as f:
    exec(compile(f.read(), "solution.py", "exec"), _ns)
except BaseException as e:
  _send(["load failed", _describe(e) + ("" if isinstance(e, SyntaxError) else " (line %d)" % _where(e, "solution.py"))])
  raise SystemExit(0)
_send(["loaded"])
for _line in os.fdopen(3, "rb"):
  try:
    _fn, _args, _kwargs = unpack(_line)
    _f = _ns.get(_fn)
    if not callable(_f):
      raise NameError("name %r is not defined" % _fn)
    _reply = dumps(["ok", _f(*_args, **_kwargs)])
  except BaseException as e:
    _line = _where(e, "solution.py")
    _reply = dumps(["raised", _describe(e) + (" (line %d)" % _line if _line else "")])
  _reply = (_reply + "\n").encode()
  while _reply:
    _reply = _reply[os.write(4, _reply):]
"""
)

# The tests' process (trusted code only): the prompt's helpers, proxies for the program's functions, the tests.
_RUNNER = (
  _COMMON
  + r"""
import builtins
_requests = os.fdopen(3, "rb")
_last = []

def _proxy(name):
  def call(*args, **kwargs):
    _send(["call", name, list(args), dict(kwargs)])
    kind, value = unpack(_requests.readline())
    _last[:] = [[name, list(args), [kind, value]]]
    if kind == "ok":
      return value
    cls = getattr(builtins, value.partition(":")[0].partition(" ")[0], None)
    try:
      error = cls(value) if isinstance(cls, type) and issubclass(cls, Exception) else None
    except Exception:
      error = None
    raise error or RuntimeError(value)
  call.__name__ = call.__qualname__ = name
  return call

import sys
_ns = (sys.modules.setdefault("tests", type(sys)("tests"))).__dict__
try:
  with open("prompt.py", "rb") as f:
    exec(compile(f.read(), "prompt.py", "exec"), _ns)
except BaseException:
  pass  # a prompt that is not a complete program offers no helpers
with open("names.txt") as f:
  for _name in f.read().split():
    _ns[_name] = _proxy(_name)
try:
  with open("tests.py", "rb") as f:
    exec(compile(f.read(), "tests.py", "exec"), _ns)
  _send(["passed"])
except BaseException as e:
  _send(["failed", _where(e, "tests.py"), _describe(e), _last[0] if _last else None])
"""
)


def _trim(text: str, limit: int) -> str:
  text = str(text).strip()
  return text if len(text) <= limit else text[: limit // 2] + " ... " + text[-limit // 2 :]


def _error_lines(text: str, lines: int = 3, limit: int = 400) -> str:
  return _trim("\n".join(str(text).strip().splitlines()[-lines:]), limit)


def _call_text(fn: str, args) -> str:
  return f"{fn}({_trim(', '.join(repr(a) for a in args), 300)})"


def _message(box: sandbox.Sandbox) -> list | None:
  """One JSON line from a sandboxed process as [kind, ...], or None (closed, dead, or not such a line)."""
  line = box.receive()
  try:
    msg = json.loads(line) if line is not None else None
  except (ValueError, RecursionError):
    return None
  return msg if isinstance(msg, list) and msg and isinstance(msg[0], str) else None


def _outcome(msg: list | None):
  """('ok', value) | ('raised', error text) | None (no valid reply) from one reply of the program's process."""
  if msg is None or len(msg) != 2 or msg[0] not in ("ok", "raised"):
    return None
  if msg[0] == "raised":
    return "raised", _error_lines(msg[1], 1, 300)
  try:
    return "ok", code_codec.from_json(msg[1])
  except (ValueError, TypeError, RecursionError, MemoryError) as e:  # a set of lists, a nesting bomb ...
    return "raised", f"the output is not plain data ({_trim(e, 200)})"


def _ended(box: sandbox.Sandbox, why: str) -> Verdict:
  """The program's process stopped answering: say how, from what the sandbox saw (never from its stdout)."""
  r = box.finish()
  if r.timed_out:
    return Verdict(False, f"timed out after {box.limits.wall_seconds:g}s")
  if r.flooded:
    lim = box.limits
    return Verdict(False, f"killed: too much output (over {lim.flood_bytes} bytes, or a reply over {lim.output_bytes})")
  how = f"killed by signal {r.signal}" if r.signal else f"exited with code {r.returncode}"
  tail = _error_lines(r.stderr)
  return Verdict(False, f"{why}: the program {how}" + (f"\n{tail}" if tail else ""))


def _check(check: code_suite.Check, outcomes) -> str | None:
  """None when the check holds, else its feedback."""
  shown = [f"{_call_text(fn, args)} " for fn, args, _ in check.calls]
  for text, (kind, value) in zip(shown, outcomes, strict=True):
    if kind == "raised":
      return f"failed test: {_trim(check.source, 300)}\n{text}raised {value}"
  env = {f"_o{k}": value for k, (_, value) in enumerate(outcomes)}
  try:
    if eval(code_suite.compiled(check.expr), {"__builtins__": _SAFE_BUILTINS}, env):  # noqa: S307 (trusted test)
      return None
    error = ""
  except Exception as e:  # e.g. comparing a str with an int
    error = f"\n{type(e).__name__}: {_trim(e, 200)}"
  outputs = "\n".join(
    f"{text}returned {_trim(repr(value), 200)}" for text, (_, value) in zip(shown, outcomes, strict=True)
  )
  return f"failed test: {_trim(check.source, 300)}\n{outputs}{error}"


def _run_checks(suite: code_suite.Suite, server: sandbox.Sandbox) -> Verdict | None:
  """Every check's calls at once, then each condition evaluated here, in order; None when all hold."""
  for check in suite.checks:
    for call in check.calls:
      server.send(code_codec.pack(call))
  for check in suite.checks:
    outcomes = [_outcome(_message(server)) for _ in check.calls]
    if None in outcomes:
      return _ended(server, "the program stopped answering")
    feedback = _check(check, outcomes)
    if feedback is not None:
      return Verdict(False, feedback)
  return None


def _relay(suite: code_suite.Suite, server: sandbox.Sandbox, runner: sandbox.Sandbox) -> Verdict | None:
  """Serve the tests' process: each call it makes goes to the program, each output back, both decoded and
  re-encoded here (only plain data crosses); None when it reports that every test passed."""
  while True:
    msg = _message(runner)
    if msg is None or msg[0] != "call":
      return None if msg == ["passed"] else _rest_failed(suite, runner, msg)
    try:
      _, fn, args, kwargs = msg
      args, kwargs = code_codec.from_json(args), code_codec.from_json(kwargs)
      if fn not in suite.names or type(args) is not list or type(kwargs) is not dict:
        raise ValueError(f"not a call of the program: {_trim(msg, 200)}")
    except (ValueError, TypeError, RecursionError) as e:
      return Verdict(False, f"the tests could not call the program: {e}")
    server.send(code_codec.pack((fn, tuple(args), kwargs)))
    outcome = _outcome(_message(server))
    if outcome is None:
      return _ended(server, "the program stopped answering")
    runner.send(code_codec.pack(outcome))


def _rest_failed(suite: code_suite.Suite, runner: sandbox.Sandbox, msg: list | None) -> Verdict:
  if msg is None or msg[0] != "failed" or len(msg) != 4:
    r = runner.finish()
    why = f"timed out after {runner.limits.wall_seconds:g}s" if r.timed_out else _error_lines(r.stderr)
    return Verdict(False, f"the tests did not finish: {why}")
  _, line, error, last = msg
  lines = suite.rest.splitlines()
  source = lines[line - 1].strip() if type(line) is int and 0 < line <= len(lines) else "a test"
  feedback = f"failed test: {_trim(source, 300)}"
  try:
    fn, args, (kind, value) = last
    shown = f"returned {_trim(repr(code_codec.from_json(value)), 200)}" if kind == "ok" else f"raised {value}"
    feedback += f"\nlast call: {_call_text(str(fn), code_codec.from_json(args))} {shown}"
  except (TypeError, ValueError, RecursionError):  # no call yet
    pass
  return Verdict(False, f"{feedback}\n{_error_lines(error, 1, 300)}")


def grade(suite: code_suite.Suite, program: str, limits: sandbox.Limits) -> Verdict:
  """Run `program` against `suite` (see the module docstring); raises sandbox.SandboxUnavailable."""
  with contextlib.ExitStack() as stack:
    server = stack.enter_context(sandbox.Sandbox(_SERVER, limits, {"solution.py": program}, channel=True))
    runner = None
    if suite.rest is not None:  # started now, so that both interpreters start at once
      files = {"tests.py": suite.rest, "prompt.py": suite.prompt, "names.txt": " ".join(suite.names)}
      runner = stack.enter_context(sandbox.Sandbox(_RUNNER, limits, files, channel=True))
    loaded = _message(server)
    if loaded is None:
      return _ended(server, "the program did not run")
    if loaded != ["loaded"]:
      why = _error_lines(loaded[1] if len(loaded) == 2 else "") or "it did not say it had loaded"
      return Verdict(False, f"the program did not run: {why}")
    verdict = _run_checks(suite, server) or (_relay(suite, server, runner) if runner is not None else None)
    if verdict is not None:
      return verdict
  return Verdict(True, f"all {len(suite.checks) + (suite.rest is not None)} tests passed")
