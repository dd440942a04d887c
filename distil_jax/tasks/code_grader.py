"""The code task's grader: the verdict is decided in the trainer, from the program's outputs as plain data.

How a response is graded:
  1. The program (prompt + response) is loaded in a sandboxed process (`sandbox.py`) that holds no test: only a
     small server that, once the program has loaded, reads calls (function name and arguments) on fd 3 and writes
     what each returned, or the exception it raised, on fd 4.
  2. The trainer holds the tests, split by `code_suite.py`: for each *check* it sends the literal arguments after
     the program has loaded, decodes each output with `code_codec.py` (exact built-in types only, never pickle)
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
tests relying on module globals of the program other than its functions fail. Limits of the sandbox itself (CPU,
memory, wall clock, output) apply to each process; the second process's wall clock includes the program's time.
Feedback carries only the failing test's source (its inputs and expected value), the program's output or
exception on it, and the last lines of an error, each trimmed; never what the program printed.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import pathlib

from distil_jax import sandbox
from distil_jax.tasks import code_codec, code_suite
from distil_jax.tasks.base import Verdict

_CODEC = pathlib.Path(code_codec.__file__).read_text()
_SAFE_BUILTINS = {name: getattr(builtins, name) for name in code_suite.SAFE_CALLS}

_COMMON = (
  _CODEC
  + r"""
import os, traceback

def _send(obj):
  data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
  while data:
    data = data[os.write(4, data):]

def _error(e):
  where = ["line %d:" % f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == "solution.py"]
  return " ".join(where[-1:] + ["".join(traceback.format_exception_only(type(e), e)).strip()])
"""
)

# The program's process: load it, say so, then answer calls until the trainer closes fd 3.
_SERVER = (
  _COMMON
  + r"""
_ns = {"__name__": "solution"}
try:
  with open("solution.py") as f:
    exec(compile(f.read(), "solution.py", "exec"), _ns)
except BaseException as e:
  _send({"loaded": False, "error": _error(e)})
  raise SystemExit(0)
_send({"loaded": True})
with os.fdopen(3, "rb") as _requests:
  for _line in _requests:
    try:
      _req = json.loads(_line)
      _fn = _ns.get(_req["fn"])
      if not callable(_fn):
        raise NameError("name %r is not defined" % _req["fn"])
      _reply = {"ok": to_json(_fn(*from_json(_req["args"]), **from_json(_req["kwargs"])))}
    except BaseException as e:
      _reply = {"raised": _error(e)}
    _send(_reply)
"""
)

# The tests' process (trusted code only): the prompt's helpers, proxies for the program's functions, the tests.
_RUNNER = (
  _COMMON
  + r"""
import builtins
_requests = os.fdopen(3, "rb")
_last = {}

def _proxy(name):
  def call(*args, **kwargs):
    _send({"fn": name, "args": to_json(list(args)), "kwargs": to_json(dict(kwargs))})
    reply = json.loads(_requests.readline())
    _last.update(fn=name, args=to_json(list(args)), reply=reply)
    if "ok" in reply:
      return from_json(reply["ok"])
    kind, _, message = reply["raised"].splitlines()[-1].partition(":")
    cls = getattr(builtins, kind.strip(), None)
    try:
      error = cls(message.strip()) if isinstance(cls, type) and issubclass(cls, Exception) else None
    except Exception:
      error = None
    raise error or RuntimeError(reply["raised"].splitlines()[-1])
  call.__name__ = call.__qualname__ = name
  return call

_ns = {"__name__": "tests"}
with open("prompt.py") as f:
  _prompt = f.read()
try:
  exec(compile(_prompt, "prompt.py", "exec"), _ns)
except BaseException:
  pass  # a prompt that is not a complete program offers no helpers
for _name in json.load(open("names.json")):
  _ns[_name] = _proxy(_name)
try:
  with open("tests.py") as f:
    exec(compile(f.read(), "tests.py", "exec"), _ns)
  _send({"passed": True})
except BaseException as e:
  lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == "tests.py"]
  _send({"passed": False, "line": lines[-1] if lines else 0, "error": _error(e), "last": _last})
"""
)


def _trim(text: str, limit: int) -> str:
  text = str(text).strip()
  return text if len(text) <= limit else text[: limit // 2] + " ... " + text[-limit // 2 :]


def _error_lines(text: str, lines: int = 3, limit: int = 400) -> str:
  return _trim("\n".join(str(text).strip().splitlines()[-lines:]), limit)


def _call_text(fn: str, args) -> str:
  return f"{fn}({_trim(', '.join(repr(a) for a in args), 300)})"


def _message(box: sandbox.Sandbox) -> dict | None:
  line = box.receive()
  try:
    msg = json.loads(line) if line is not None else None
  except (ValueError, RecursionError):
    return None
  return msg if isinstance(msg, dict) else None


def _outcome(msg: dict | None):
  """('ok', value) | ('raised', error text) | None (no valid reply) from one reply of the program's process."""
  if msg is None:
    return None
  if "ok" in msg:
    try:
      return "ok", code_codec.from_json(msg["ok"])
    except (ValueError, TypeError, RecursionError, MemoryError) as e:  # a set of lists, a nesting bomb ...
      return "raised", f"the output is not plain data ({e})"
  return "raised", _error_lines(msg.get("raised", "an unknown error"), 1)


def _ended(box: sandbox.Sandbox, why: str) -> Verdict:
  """The program's process stopped answering: say how, from what the sandbox saw (never from its stdout)."""
  r = box.finish()
  if r.timed_out:
    return Verdict(False, f"timed out after {box.limits.wall_seconds:g}s")
  if r.flooded:
    return Verdict(False, f"killed: wrote more than {box.limits.flood_bytes} bytes of output")
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


def _request(fn: str, args, kwargs) -> bytes:
  return json.dumps({"fn": fn, "args": code_codec.to_json(list(args)), "kwargs": code_codec.to_json(kwargs)}).encode()


def _run_checks(suite: code_suite.Suite, server: sandbox.Sandbox) -> Verdict | None:
  """Every check's calls at once, then each condition evaluated here, in order; None when all hold."""
  for check in suite.checks:
    for call in check.calls:
      server.send(_request(*call))
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
    if msg is None or "passed" in msg:
      return None if msg is not None and msg["passed"] is True else _rest_failed(suite, runner, msg)
    try:
      if msg.get("fn") not in suite.names:
        raise ValueError(f"unknown function {msg.get('fn')!r}")
      server.send(_request(msg["fn"], code_codec.from_json(msg["args"]), code_codec.from_json(msg["kwargs"])))
    except (KeyError, ValueError, TypeError, RecursionError) as e:
      return Verdict(False, f"the tests could not call the program: {e}")
    outcome = _outcome(_message(server))
    if outcome is None:
      return _ended(server, "the program stopped answering")
    kind, value = outcome
    runner.send(json.dumps({"ok": code_codec.to_json(value)} if kind == "ok" else {"raised": value}).encode())


def grade(suite: code_suite.Suite, program: str, limits: sandbox.Limits) -> Verdict:
  """Run `program` against `suite` (see the module docstring); raises sandbox.SandboxUnavailable."""
  with contextlib.ExitStack() as stack:
    server = stack.enter_context(sandbox.Sandbox(_SERVER, limits, {"solution.py": program}, channel=True))
    runner = None
    if suite.rest is not None:  # started now, so that both interpreters start at once
      files = {"tests.py": suite.rest, "prompt.py": suite.prompt, "names.json": json.dumps(list(suite.names))}
      runner = stack.enter_context(sandbox.Sandbox(_RUNNER, limits, files, channel=True))
    loaded = _message(server)
    if loaded is None:
      return _ended(server, "the program did not run")
    if loaded.get("loaded") is not True:
      why = _error_lines(loaded.get("error", "")) or "it did not say it had loaded"
      return Verdict(False, f"the program did not run: {why}")
    verdict = _run_checks(suite, server) or (_relay(suite, server, runner) if runner is not None else None)
    if verdict is not None:
      return verdict
  return Verdict(True, f"all {len(suite.checks) + (suite.rest is not None)} tests passed")


def _rest_failed(suite: code_suite.Suite, runner: sandbox.Sandbox, msg: dict | None) -> Verdict:
  if msg is None:
    r = runner.finish()
    why = f"timed out after {runner.limits.wall_seconds:g}s" if r.timed_out else _error_lines(r.stderr)
    return Verdict(False, f"the tests did not finish: {why}")
  lines = suite.rest.splitlines()
  line = msg.get("line")
  source = lines[line - 1] if isinstance(line, int) and 0 < line <= len(lines) else "a test"
  feedback = f"failed test: {_trim(source.strip(), 300)}"
  last = msg.get("last") or {}
  if "reply" in last:
    try:
      call = _call_text(str(last["fn"]), code_codec.from_json(last["args"]))
      reply = last["reply"]
      result = (
        f"returned {_trim(repr(code_codec.from_json(reply['ok'])), 200)}"
        if "ok" in reply
        else f"raised {_error_lines(reply['raised'], 1)}"
      )
      feedback += f"\nlast call: {call} {result}"
    except (KeyError, TypeError, ValueError, RecursionError):
      pass
  return Verdict(False, f"{feedback}\n{_error_lines(msg.get('error', ''), 1)}")
