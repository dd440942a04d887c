"""The trusted launcher that the sandbox runs in the child (`python -I -S -c SOURCE CONFIG`) before the program.

It is kept in its own module so that it can be read in one sitting: it runs with the child's initial privileges
(root, when the trainer is root) and every line of it is part of the isolation. The order matters:
  read the program's files -> (root) fork the helper that writes the uid maps -> mount namespace (root) or user +
  mount namespace -> as root, uncover the interpreter
  for the unprivileged uid -> hide installed packages -> every mount read-only -> a capped tmpfs on the temp dir
  -> drop to the unprivileged uid (as root, in a user namespace of its own) and no capabilities -> write the files
  -> die with the trainer -> rlimits -> Landlock -> seccomp
  -> close the status pipe -> the program, as __main__.
Any failure before the program starts is written to the status pipe (which the program never sees) and the child
exits; the parent turns that into `SandboxUnavailable`.
"""

SOURCE = r"""
import binascii, ctypes, fcntl, marshal, os, resource, stat, sys

cfg = marshal.loads(binascii.a2b_base64(sys.argv[1]))  # marshal, not json: json imports re (~10 ms of start-up)
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 0x1000, 0x4000, 1 << 18
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x20000, 0x08000000, 0x10000000
NS_FLAGS, CLONE_THREAD = 0x7E020000, 0x10000
ALLOW = 0x7FFF0000

machine = os.uname().machine
NR = {  # syscall numbers of the two ABIs we know; those from 424 on are shared
  "x86_64": dict(arch=0xC000003E, socket=41, fcntl=72, fork=57, vfork=58, clone=56, kill=62, tkill=200, tgkill=234,
                 rt_sigqueueinfo=129, rt_tgsigqueueinfo=297, ptrace=101, process_vm_readv=310, process_vm_writev=311,
                 prlimit64=302, unshare=272, setns=308, bpf=321, perf_event_open=298, capset=126,
                 mount=165, umount2=166, pivot_root=155, chroot=161, name_to_handle_at=303, open_by_handle_at=304,
                 setsid=112, setpgid=109, add_key=248, request_key=249, keyctl=250),
  "aarch64": dict(arch=0xC00000B7, socket=198, fcntl=25, clone=220, kill=129, tkill=130, tgkill=131,
                  rt_sigqueueinfo=138, rt_tgsigqueueinfo=240, ptrace=117, process_vm_readv=270, process_vm_writev=271,
                  prlimit64=261, unshare=97, setns=268, bpf=280, perf_event_open=241, capset=91, mount=40,
                  umount2=39, pivot_root=41, chroot=51, name_to_handle_at=264, open_by_handle_at=265, setsid=157,
                  setpgid=154, add_key=217, request_key=218, keyctl=219),
}.get(machine, {})
NR.update(io_uring_setup=425, pidfd_send_signal=424, open_tree=428, move_mount=429, fsopen=430, fsconfig=431,
          fsmount=432, fspick=433, pidfd_open=434, clone3=435, mount_setattr=442)


class SetupError(Exception):
  pass


def check(ok, what):
  if not ok:
    err = ctypes.get_errno()
    raise SetupError(what + (": " + os.strerror(err) if err else ""))


def mount(source, target, fstype, flags, data=None):
  enc = lambda s: None if s is None else s.encode()
  check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) == 0, "mount " + target)


def namespaces(uid, gid):
  if cfg["mode"] == "root":
    flags, hint = CLONE_NEWNS | CLONE_NEWIPC, ("as root this needs CAP_SYS_ADMIN: in a container, allow unshare and "
                                               "mount, or run the trainer as a user with user namespaces")
  else:
    flags, hint = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWIPC, (
      "unprivileged user namespaces are off: sysctl kernel.unprivileged_userns_clone=1 / "
      "kernel.apparmor_restrict_unprivileged_userns=0, or run as root")
  check(libc.unshare(flags) == 0, "unshare (%s)" % hint)
  if cfg["mode"] != "root":
    for name, text in (("setgroups", "deny"), ("uid_map", "%d %d 1" % (uid, uid)), ("gid_map", "%d %d 1" % (gid, gid))):
      with open("/proc/self/" + name, "w") as f:
        f.write(text)
  mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks to the host, nothing of the host's to us


def uncover(paths):
  # As root, for the unprivileged uid: a directory it cannot search (a 0700 /root above a pyenv) is covered by a
  # tmpfs that holds only bind mounts of the paths it needs, at their own names.
  hidden = {}
  for path in paths:
    parts = path.split("/")
    for i in range(2, len(parts)):
      above = "/".join(parts[:i])
      if not os.stat(above).st_mode & 0o001:
        hidden.setdefault(above, []).append(path)
        break
  for top, inner in hidden.items():
    fds = [(p, os.open(p, os.O_PATH | os.O_CLOEXEC)) for p in inner if p != cfg["dir"]]
    mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for p, fd in fds:
      if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.makedirs(p, 0o755, exist_ok=True)
      else:
        os.makedirs(os.path.dirname(p), 0o755, exist_ok=True)
        open(p, "w").close()
      mount("/proc/self/fd/%d" % fd, p, None, MS_BIND | MS_REC)
      os.close(fd)
    if cfg["dir"] in inner:
      os.makedirs(cfg["dir"], 0o700, exist_ok=True)


def hide(paths):
  # Installed packages are not what the program needs, and they may hold the task's own data (HumanEval ships in
  # one): an empty read-only tmpfs covers each site-packages / dist-packages directory.
  for path in paths:
    if os.path.isdir(path):
      mount("tmpfs", path, "tmpfs", 1 | MS_NOSUID | MS_NODEV, "size=4k,mode=0755")


def read_only_but_dir(uid, gid):
  class MountAttr(ctypes.Structure):
    _fields_ = [("set", ctypes.c_uint64), ("clr", ctypes.c_uint64), ("prop", ctypes.c_uint64), ("ns", ctypes.c_uint64)]
  attr = MountAttr(1 | 2, 0, 0, 0)  # MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, on every mount (AT_RECURSIVE)
  check(libc.syscall(NR["mount_setattr"], -100, b"/", 0x8000, ctypes.byref(attr), ctypes.c_size_t(32)) == 0,
        "mount_setattr (Linux >= 5.12)")
  size = cfg["dir_bytes"]
  opts = "size=%d,nr_inodes=%d,mode=0700,uid=%d,gid=%d" % (size, max(64, size >> 12), uid, gid)
  mount("tmpfs", cfg["dir"], "tmpfs", MS_NOSUID | MS_NODEV, opts)


def map_helper(uid, gid):
  # As root, a user namespace's uid and gid maps are written from outside it, by this helper forked before the
  # mount namespace (whose /proc is read-only by the time the namespace exists). It waits for the word, writes
  # the maps of its parent, and exits; if the launcher dies first, the pipe's end frees it.
  go_r, go_w = os.pipe()
  pid = os.fork()
  if pid == 0:
    os.close(go_w)
    ok = False
    try:
      if os.read(go_r, 1) == b"u":
        for name, text in (("uid_map", "%d %d 1" % (uid, uid)), ("gid_map", "%d %d 1" % (gid, gid))):
          with open("/proc/%d/%s" % (os.getppid(), name), "w") as f:
            f.write(text)
        ok = True
    finally:
      os._exit(0 if ok else 1)
  os.close(go_r)
  return pid, go_w


def own_user_namespace(helper):
  # As root: a user namespace of its own that maps only the unprivileged uid and gid. The kernel counts
  # RLIMIT_NPROC per user namespace and uid, so the program's threads and processes are its own count whatever
  # other sandboxes (of the same uid) or the trainer run; and the namespace holds no capability outside it.
  pid, go = helper
  os.setgroups([])
  check(libc.unshare(CLONE_NEWUSER) == 0, "unshare of a user namespace (the program's own task count)")
  os.write(go, b"u")
  os.close(go)
  check(os.waitpid(pid, 0)[1] == 0, "uid and gid maps of the user namespace")


def drop_privileges(uid, gid):
  for cap in range(64):
    libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP; EINVAL past the last capability
  libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL
  if cfg["mode"] == "root":
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
  header = (ctypes.c_uint32 * 2)(0x20080522, 0)
  check(libc.syscall(NR["capset"], header, (ctypes.c_uint32 * 6)()) == 0, "capset")
  check(libc.prctl(38, 1, 0, 0, 0) == 0, "no_new_privs")


def tie_to_trainer():
  # SIGKILL when the trainer dies (SIGKILL, SIGTERM, a crash): set after the last credential change, which clears
  # it; and if the trainer died before it was set, the program never starts.
  check(libc.prctl(1, 9, 0, 0, 0) == 0, "PR_SET_PDEATHSIG")
  if os.getppid() != cfg["parent"]:
    os._exit(112)


def rlimits():
  # RLIMIT_NPROC counts threads and processes of the uid in the program's own user namespace: the program's alone
  limits = [("RLIMIT_CPU", cfg["cpu"]), ("RLIMIT_AS", cfg["mem"]), ("RLIMIT_FSIZE", cfg["fsize"]),
            ("RLIMIT_NOFILE", cfg["nofile"]), ("RLIMIT_CORE", 0), ("RLIMIT_NPROC", cfg["tasks"])]
  for name, value in limits:
    resource.setrlimit(getattr(resource, name), (value, value + 1 if name == "RLIMIT_CPU" else value))


def landlock():
  class PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]
  abi = libc.syscall(444, None, ctypes.c_size_t(0), 1)
  check(abi >= 1, "landlock unavailable (Linux >= 5.13 with lsm=landlock)")
  EXECUTE, WRITE, READ_FILE, READ_DIR, TRUNCATE, IOCTL_DEV = 1, 2, 4, 8, 1 << 14, 1 << 15
  handled = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | (TRUNCATE if abi >= 3 else 0)
  handled |= IOCTL_DEV if abi >= 5 else 0
  rules = [(cfg["dir"], handled & ~EXECUTE), ("/dev/null", READ_FILE | WRITE | TRUNCATE)]
  rules += [(p, READ_FILE | READ_DIR) for p in cfg["read"]]
  # ABI 6 (Linux 6.12): no signal to, and no abstract unix socket of, a process outside the sandbox (seccomp below
  # denies both on any kernel; this is the second lock)
  attr = (ctypes.c_uint64 * 3)(handled, 0, 3 if abi >= 6 else 0)
  ruleset = libc.syscall(444, attr, ctypes.c_size_t(24 if abi >= 6 else 8), 0)
  check(ruleset >= 0, "landlock ruleset")
  for path, allowed in rules:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    if not stat.S_ISDIR(os.fstat(fd).st_mode):
      allowed &= EXECUTE | WRITE | READ_FILE | TRUNCATE | IOCTL_DEV
    rule = PathBeneath(allowed & handled, fd)
    check(libc.syscall(445, ruleset, 1, ctypes.byref(rule), 0) == 0, "landlock rule for " + path)
    os.close(fd)
  check(libc.syscall(446, ruleset, 0) == 0, "landlock restrict")
  os.close(ruleset)


def seccomp():
  # A small BPF program with labels: no sockets, no new processes or namespaces, no mounts, signals / ptrace /
  # prlimit only on self.
  LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
  ERR = lambda errno: 0x00050000 | errno
  code = [("ld", 4), ("jeq", NR["arch"], None, "kill"), ("ld", 0), ("jge", 0x40000000, "eacces", None)]
  for name in ("socket", "io_uring_setup", "ptrace", "process_vm_readv", "process_vm_writev", "unshare", "setns",
               "bpf", "perf_event_open", "tkill", "pidfd_open", "pidfd_send_signal", "mount", "umount2",
               "pivot_root", "chroot", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
               "mount_setattr", "name_to_handle_at", "open_by_handle_at", "add_key", "request_key", "keyctl"):
    code.append(("jeq", NR[name], "eacces", None))
  code += [("jeq", NR[n], "eperm", None) for n in ("setsid", "setpgid")]  # stay in the group that is killed
  if cfg["nproc"] <= 1:
    code += [("jeq", NR[n], "eagain", None) for n in ("fork", "vfork") if n in NR]
  code += [("jeq", NR["clone3"], "enosys", None), ("jeq", NR["clone"], "clone", None)]  # clone3 args: unreadable
  code += [("jeq", NR["fcntl"], "fcntl", None)]
  code += [("jeq", NR[n], "self", None) for n in ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo",
                                                  "prlimit64")]
  code += [("ret", ALLOW), "clone", ("ld", 16), ("jset", NS_FLAGS, "eperm", None)]
  code += [("jset", CLONE_THREAD, "allow", "eagain")] if cfg["nproc"] <= 1 else [("ret", ALLOW)]
  # F_SETOWN, F_SETOWN_EX, F_SETSIG: the owner of an fd gets a signal (any, with F_SETSIG) when it is ready, so a
  # pipe to the trainer would be a way to signal the trainer
  code += ["fcntl", ("ld", 24), ("jeq", 8, "eperm", None), ("jeq", 15, "eperm", None), ("jeq", 10, "eperm", None),
           ("ret", ALLOW)]
  code += ["self", ("ld", 16), ("jeq", os.getpid(), "allow", None), ("jeq", 0, "allow", "eperm"),
           "allow", ("ret", ALLOW), "eacces", ("ret", ERR(13)), "eagain", ("ret", ERR(11)),
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
  check(libc.prctl(22, 2, ctypes.byref(Prog(len(ins), prog)), 0, 0) == 0, "seccomp")  # PR_SET_SECCOMP, FILTER


try:
  check("arch" in NR, "unsupported architecture " + machine)
  os.umask(0o022)
  uid, gid = (65534, 65534) if cfg["mode"] == "root" else (os.getuid(), os.getgid())
  files = {}
  for name in os.listdir(cfg["dir"]):
    with open(os.path.join(cfg["dir"], name), "rb") as f:
      files[name] = f.read()
  helper = map_helper(uid, gid) if cfg["mode"] == "root" else None
  namespaces(uid, gid)
  if cfg["mode"] == "root":
    uncover(cfg["read"] + [cfg["dir"]])
  hide(cfg["hide"])
  read_only_but_dir(uid, gid)
  if cfg["mode"] == "root":
    own_user_namespace(helper)
  drop_privileges(uid, gid)
  for name, data in files.items():
    with open(os.path.join(cfg["dir"], name), "wb") as f:
      f.write(data)
  try:
    os.listdir(os.path.dirname(os.__file__))
  except OSError as e:
    raise SetupError("uid %d cannot read the standard library (%s)" % (uid, e)) from None
  tie_to_trainer()
  rlimits()
  landlock()
  seccomp()
except BaseException as e:
  os.write(cfg["status"], ("sandbox setup failed: %s: %s" % (type(e).__name__, e)).encode())
  os._exit(111)
os.close(cfg["status"])
if cfg["channel"]:  # requests on fd 3, replies on fd 4
  high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in cfg["channel"]]
  for fd in cfg["channel"]:
    os.close(fd)
  for new, fd in zip((3, 4), high):
    os.dup2(fd, new)
    os.close(fd)
os.chdir(cfg["dir"])
sys.argv = [os.path.join(cfg["dir"], "main.py")]
sys.path.append(cfg["dir"])
main = type(sys)("__main__")
main.__file__ = sys.argv[0]
sys.modules["__main__"] = main
code = compile(files["main.py"], sys.argv[0], "exec")
del cfg, files, libc, marshal
exec(code, main.__dict__)
"""
