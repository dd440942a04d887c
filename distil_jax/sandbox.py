"""Running untrusted (model-written) Python: a fresh process, a fresh temp dir, no network, hard limits.

Isolation is applied by a small trusted launcher inside the child process *before* any untrusted code runs (no
`preexec_fn`, which is unsafe in a multi-threaded parent such as a JAX process):
  - rlimits: CPU seconds, address space, file size, open files, no core dumps, process count;
  - every capability dropped (a root parent's child keeps uid 0, so it can still read the Python install under a
    private home, but cannot raise its hard limits or bypass file permissions);
  - Landlock (Linux >= 5.13): writes, deletes and new files are allowed only beneath the temp dir;
  - seccomp: `socket` and `io_uring_setup` fail, so no network connection can be opened; with `processes=1`,
    fork / vfork / clone of a process fail (threads are allowed); kill, tgkill, sigqueue and prlimit work only on
    the program itself (uid 0 could otherwise signal the trainer); ptrace, namespaces, bpf and perf are denied;
    a syscall of a foreign ABI kills the process;
  - a wall-clock timeout that kills the whole process group.
If the kernel lacks Landlock or seccomp, `run` raises `SandboxUnavailable` instead of running with less isolation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap


class SandboxUnavailable(RuntimeError):
  """This machine cannot give the promised isolation (no Landlock or seccomp)."""


@dataclasses.dataclass(frozen=True)
class Limits:
  wall_seconds: float = 10.0
  cpu_seconds: int = 5
  memory_bytes: int = 512 << 20
  file_bytes: int = 1 << 20
  open_files: int = 64
  processes: int = 1  # no fork at all by default


@dataclasses.dataclass(frozen=True)
class Result:
  returncode: int | None  # None when killed for the wall-clock limit
  stdout: str
  stderr: str
  timed_out: bool  # the wall-clock limit or the CPU-time limit (SIGXCPU) was reached; which one comes first is a race

  @property
  def signal(self) -> int | None:
    return -self.returncode if self.returncode is not None and self.returncode < 0 else None


# The launcher runs in the child before the program; it is trusted and must stay small.
_LAUNCHER = textwrap.dedent(r"""
  import ctypes, json, os, platform, resource, runpy, sys
  cfg = json.loads(sys.argv[1])
  libc = ctypes.CDLL(None, use_errno=True)

  def fail(msg):
    sys.stderr.write("SANDBOX-SETUP-FAILED: " + msg + "\n"); sys.stderr.flush(); os._exit(111)

  for name, value in [("RLIMIT_CPU", cfg["cpu"]), ("RLIMIT_AS", cfg["mem"]), ("RLIMIT_FSIZE", cfg["fsize"]),
                      ("RLIMIT_NOFILE", cfg["nofile"]), ("RLIMIT_CORE", 0), ("RLIMIT_NPROC", cfg["nproc"])]:
    hard = value + 1 if name == "RLIMIT_CPU" else value
    resource.setrlimit(getattr(resource, name), (value, hard))

  machine = platform.machine()
  NR = {  # syscall numbers
    "x86_64": dict(arch=0xC000003E, socket=41, fork=57, vfork=58, clone=56, kill=62, tkill=200, tgkill=234,
                   rt_sigqueueinfo=129, rt_tgsigqueueinfo=297, ptrace=101, process_vm_readv=310,
                   process_vm_writev=311, prlimit64=302, unshare=272, setns=308, bpf=321, perf_event_open=298,
                   capset=126),
    "aarch64": dict(arch=0xC00000B7, socket=198, clone=220, kill=129, tkill=130, tgkill=131, rt_sigqueueinfo=138,
                    rt_tgsigqueueinfo=240, ptrace=117, process_vm_readv=270, process_vm_writev=271, prlimit64=261,
                    unshare=97, setns=268, bpf=280, perf_event_open=241, capset=91),
  }.get(machine)
  if NR is None:
    fail("unsupported architecture " + machine)
  NR.update(io_uring_setup=425, pidfd_send_signal=424, pidfd_open=434, clone3=435)

  # Capabilities: none left (root can no longer raise its hard limits or bypass file permissions).
  for cap in range(64):
    libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP; EINVAL past the last capability
  libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL
  header = (ctypes.c_uint32 * 2)(0x20080522, 0)
  if libc.syscall(NR["capset"], header, (ctypes.c_uint32 * 6)()) != 0:
    fail("capset")
  if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
    fail("no_new_privs")

  # Landlock: handle every write-like right; allow them only beneath the temp dir.
  abi = libc.syscall(444, None, 0, 1)
  if abi < 1:
    fail("landlock unavailable")
  rights = sum(1 << bit for bit in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # WRITE_FILE, REMOVE_*, MAKE_*
  rights |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)  # REFER, TRUNCATE
  ruleset = libc.syscall(444, ctypes.byref(ctypes.c_uint64(rights)), 8, 0)
  class PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]
  fd = os.open(cfg["dir"], os.O_PATH | os.O_DIRECTORY)
  if ruleset < 0 or libc.syscall(445, ruleset, 1, ctypes.byref(PathBeneath(rights, fd)), 0) != 0:
    fail("landlock rule")
  if libc.syscall(446, ruleset, 0) != 0:
    fail("landlock restrict")
  os.close(fd); os.close(ruleset)

  # seccomp (a small BPF program with labels): no sockets, no new processes, signals/ptrace/prlimit only on self.
  LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
  ERR = lambda errno: 0x00050000 | errno
  code = [("ld", 4), ("jeq", NR["arch"], None, "kill"), ("ld", 0), ("jge", 0x40000000, "eacces", None)]
  for name in ("socket", "io_uring_setup", "ptrace", "process_vm_readv", "process_vm_writev", "unshare", "setns",
               "bpf", "perf_event_open", "tkill", "pidfd_open", "pidfd_send_signal"):
    code.append(("jeq", NR[name], "eacces", None))
  if cfg["nproc"] <= 1:
    code += [("jeq", NR[n], "eagain", None) for n in ("fork", "vfork") if n in NR]
    code += [("jeq", NR["clone3"], "enosys", None), ("jeq", NR["clone"], "clone", None)]
  code += [("jeq", NR[n], "self", None) for n in ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo",
                                                  "prlimit64")]
  code += [("ret", 0x7FFF0000), "clone", ("ld", 16), ("jset", 0x10000, "allow", "eagain"),
           "self", ("ld", 16), ("jeq", os.getpid(), "allow", None), ("jeq", 0, "allow", "eperm"),
           "allow", ("ret", 0x7FFF0000), "eacces", ("ret", ERR(13)), "eagain", ("ret", ERR(11)),
           "enosys", ("ret", ERR(38)), "eperm", ("ret", ERR(1)), "kill", ("ret", 0x80000000)]
  labels, ins = {}, []
  for item in code:
    if isinstance(item, str):
      labels[item] = len(ins)
    else:
      ins.append(item)
  class Ins(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]
  class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Ins))]
  def encode(i, item):
    op, k, *jumps = item
    jt, jf = [(labels[j] - i - 1) if j else 0 for j in (jumps + [None, None])[:2]]
    return Ins({"ld": LD, "jeq": JEQ, "jge": JGE, "jset": JSET, "ret": RET}[op], jt, jf, k & 0xFFFFFFFF)
  prog = (Ins * len(ins))(*[encode(i, item) for i, item in enumerate(ins)])
  if libc.prctl(22, 2, ctypes.byref(Prog(len(ins), prog)), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
    fail("seccomp")

  os.chdir(cfg["dir"])
  sys.argv = [cfg["program"]]
  sys.path.append(cfg["dir"])
  del ctypes, json, libc, resource, cfg
  runpy.run_path(sys.argv[0], run_name="__main__")
""")


def run(program: str, limits: Limits = Limits(), files: dict[str, str] | None = None) -> Result:
  """Run `program` (Python source) in a fresh temp dir under `limits`; the dir is removed afterwards."""
  workdir = tempfile.mkdtemp(prefix="distil-sandbox-")
  try:
    os.chmod(workdir, 0o700)
    path = os.path.join(workdir, "main.py")
    with open(path, "w") as f:
      f.write(program)
    for name, text in (files or {}).items():
      with open(os.path.join(workdir, name), "w") as f:
        f.write(text)
    cfg = json.dumps(
      {
        "dir": workdir,
        "program": path,
        "cpu": int(limits.cpu_seconds),
        "mem": int(limits.memory_bytes),
        "fsize": int(limits.file_bytes),
        "nofile": int(limits.open_files),
        "nproc": int(limits.processes),
      }
    )
    proc = subprocess.Popen(
      [sys.executable, "-I", "-S", "-c", _LAUNCHER, cfg],
      cwd=workdir,
      env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"},
      stdin=subprocess.DEVNULL,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      start_new_session=True,
    )
    try:
      out, err = proc.communicate(timeout=limits.wall_seconds)
      timed_out = False
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      out, err = proc.communicate()
      timed_out = True
    stderr = err.decode(errors="replace")
    if "SANDBOX-SETUP-FAILED" in stderr:
      raise SandboxUnavailable(stderr.strip().splitlines()[-1])
    returncode = None if timed_out else proc.returncode
    # A busy loop may spend its CPU seconds before the wall time ends; either limit is a time-out.
    timed_out = timed_out or returncode == -signal.SIGXCPU
    return Result(returncode, out.decode(errors="replace"), stderr, timed_out)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
