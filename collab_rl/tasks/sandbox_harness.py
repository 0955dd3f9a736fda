"""The sandbox's child side: locks its own process down, then runs the candidate and its tests.

`sandbox.run` starts `python -I -S -u` on this file with the arguments
`workdir uid side_fd cpu_s memory_mb parent_pid audit_hook`; the nonce comes on stdin. `-I -S`
keep site-packages and this package off the path, so the harness imports only the standard
library. It runs as the caller's uid (root when it can drop privileges) until `_lock_down`
returns; then it writes "ready <layers>" on the side pipe, runs the candidate and, unless the
candidate failed, writes "<nonce> passed" or "<nonce> memory".
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import sys

_DISK_MB = 32  # tmpfs workdir size and RLIMIT_FSIZE
_MAX_OPEN_FILES = 64
_EXIT_SETUP = 4
_MODULE = "solution"

_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWNET = 0x20000, 0x10000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 0x40000
_SYS_MOUNT_SETATTR, _AT_FDCWD, _AT_RECURSIVE = 442, -100, 0x8000
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID = 0x1, 0x2
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38
_BLOCKED_EVENTS = frozenset({
    "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo",
    "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
    "subprocess.Popen", "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.call_function"})


def main(args: list[str]) -> None:
  nonce = sys.stdin.buffer.readline().strip().decode()
  os.dup2(devnull := os.open(os.devnull, os.O_RDONLY), 0)  # input() sees EOF, not the nonce pipe
  os.close(devnull)
  workdir, uid, side_fd, cpu_s, memory_mb, parent, hook = args[0], *map(int, args[1:])
  try:
    names = ("program.py", "tests.py")  # read and removed before any candidate code runs
    sources = [(name, pathlib.Path(workdir, name).read_text("utf-8")) for name in names]
    for name in names:
      os.remove(os.path.join(workdir, name))
    layers = _lock_down(workdir, uid, cpu_s, memory_mb, parent, bool(hook))
    os.write(side_fd, f"ready {','.join(layers)}\n".encode())
  except BaseException as e:  # no "ready" line: the caller reports "error"
    print(f"sandbox setup failed: {e!r}", file=sys.stderr, flush=True)
    os._exit(_EXIT_SETUP)
  verdict = _run_candidate(sources)
  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(BaseException):  # the program may have replaced or closed them
      stream.flush()
  if verdict != "failed":
    with contextlib.suppress(OSError):
      os.write(side_fd, f"{nonce} {verdict}\n".encode())
  os._exit(0 if verdict == "passed" else 1)  # skips the program's atexit handlers


def _lock_down(workdir: str, uid: int, cpu_s: int, memory_mb: int, parent: int,
               hook: bool) -> list[str]:
  import ctypes  # pylint: disable=g-import-not-at-top  (child only)
  import resource  # pylint: disable=g-import-not-at-top
  libc = ctypes.CDLL(None, use_errno=True)

  def check(ok: bool, what: str) -> None:
    if not ok:
      raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")

  def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    enc = lambda s: None if s is None else s.encode()
    ok = libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) == 0
    check(ok, f"mount {target}")

  def prctl(option: int, value: int) -> None:
    check(libc.prctl(option, *map(ctypes.c_ulong, (value, 0, 0, 0))) == 0, "prctl")

  layers, root = [], uid >= 0
  if root:
    if libc.unshare(_CLONE_NEWNET) == 0:
      layers.append("netns")
  elif libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0:
    ids = {"uid_map": os.getuid(), "gid_map": os.getgid()}  # else the files we create have no owner
    for path, text in [("setgroups", "deny")] + [(k, f"{v} {v} 1") for k, v in ids.items()]:
      with open(f"/proc/self/{path}", "w") as f:
        f.write(text)
    layers.append("netns")
  if root and libc.unshare(_CLONE_NEWNS) == 0:
    layers.append("mountns")
    mount(None, "/", None, _MS_REC | _MS_PRIVATE, None)  # nothing we mount leaks to the host
    if _expose_python(mount):
      layers.append("expose_python")
    # struct mount_attr {attr_set, attr_clr, propagation, userns_fd}, for mount_setattr(2).
    attr = (ctypes.c_uint64 * 4)(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, 0, 0)
    setattr_args = (ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_long(_AT_FDCWD), b"/",
                    ctypes.c_uint(_AT_RECURSIVE), attr, ctypes.c_size_t(ctypes.sizeof(attr)))
    if libc.syscall(*setattr_args) == 0:  # kernel >= 5.12
      layers.append("readonly_root")
    with contextlib.suppress(OSError):  # mounted after the read-only pass, so it stays writable
      options = f"size={_DISK_MB}m,mode=0700,uid={uid},gid={uid}"
      mount("tmpfs", workdir, "tmpfs", _MS_NOSUID | _MS_NODEV, options)
      layers.append("tmpfs_workdir")
  if root:
    if "tmpfs_workdir" not in layers:
      os.chown(workdir, uid, uid)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    layers.append("uid")
  prctl(_PR_SET_NO_NEW_PRIVS, 1)
  # After setresuid, which clears it; the getppid check closes the race with a dying parent.
  prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
  if os.getppid() != parent:
    os._exit(_EXIT_SETUP)
  layers += ["no_new_privs", "pdeathsig"]
  limits = {resource.RLIMIT_CORE: 0, resource.RLIMIT_CPU: cpu_s,
            resource.RLIMIT_AS: memory_mb << 20, resource.RLIMIT_FSIZE: _DISK_MB << 20,
            resource.RLIMIT_NOFILE: _MAX_OPEN_FILES, resource.RLIMIT_NPROC: 0}
  for kind, value in limits.items():  # CPU: SIGXCPU at the soft limit, SIGKILL a second later
    resource.setrlimit(kind, (value, value + 1 if kind == resource.RLIMIT_CPU else value))
  layers.append("rlimits")
  os.chdir(workdir)
  for path in sys.path:  # fail setup, not the candidate, if the stdlib is out of reach
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
      os.listdir(path)
  if hook:
    def audit(event: str, args: tuple, blocked: frozenset = _BLOCKED_EVENTS) -> None:
      if event in blocked:
        raise PermissionError(f"sandbox: {event} is not allowed")
    sys.addaudithook(audit)
    layers.append("audit_hook")
  return layers


def _expose_python(mount) -> bool:
  """Covers each topmost ancestor of the interpreter's prefix that others cannot enter.

  Each such ancestor (a 0700 /root for pyenv) gets a tmpfs holding only the prefix: imports work
  after the uid drop, the rest hides.
  """
  keep = {sys.base_prefix, sys.base_exec_prefix}
  ancestors = {"/".join(p.split("/")[:i]) for p in keep for i in range(2, p.count("/") + 1)}
  closed = sorted(a for a in ancestors if not os.stat(a).st_mode & 0o001)
  tops = [a for a in closed if not any(a.startswith(b + "/") for b in closed)]
  if not tops:
    return False
  fds = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in keep}  # before they vanish
  for top in tops:
    mount("tmpfs", top, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755")
  for path, fd in fds.items():
    os.makedirs(path, exist_ok=True)
    mount(f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC, None)
    os.close(fd)
  return True


def _run_candidate(sources: list[tuple[str, str]]) -> str:
  """Executes program then tests; returns "passed", "failed" or "memory"."""
  import linecache  # pylint: disable=g-import-not-at-top
  import traceback  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  import unittest  # pylint: disable=g-import-not-at-top
  # Bound before the program runs, so that it cannot rebind what decides the verdict.
  test_case, suite_cls, runner_cls = unittest.TestCase, unittest.TestSuite, unittest.TextTestRunner
  loader = unittest.TestLoader()
  unittest.main = lambda *a, **k: None  # the harness runs every TestCase itself, once
  guarded = (unittest.TestCase, unittest.TestResult, unittest.TextTestResult, unittest.TestSuite,
             unittest.TestLoader, unittest.TextTestRunner,
             unittest.case._Outcome)  # pylint: disable=protected-access
  snapshot = [(cls, list(vars(cls).items())) for cls in guarded]
  module = types.ModuleType(_MODULE)
  sys.modules[_MODULE] = module
  sys.argv = ["program.py"]
  try:
    for name, source in sources:
      # Tracebacks show the candidate's lines.
      linecache.cache[name] = (len(source), None, source.splitlines(True), name)
      exec(compile(source, name, "exec"), module.__dict__)  # pylint: disable=exec-used
    cases = [v for v in list(vars(module).values())
             if isinstance(v, type) and issubclass(v, test_case) and v.__module__ == _MODULE]
    suite = suite_cls(loader.loadTestsFromTestCase(case) for case in cases)
    result = runner_cls(stream=sys.stderr, verbosity=1).run(suite) if cases else None
  except BaseException as e:  # SystemExit too: exiting before the tests end is not passing
    with contextlib.suppress(BaseException):
      traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # without the harness frame
    return "memory" if isinstance(e, MemoryError) else "failed"
  tampered = sys.modules.get("unittest") is not unittest or any(
      len(vars(cls)) != len(items) or any(vars(cls).get(k) is not v for k, v in items)
      for cls, items in snapshot)
  if tampered:
    print("sandbox: the program modified unittest", file=sys.stderr)
    return "failed"
  if result is not None:
    problems = result.failures + result.errors + result.unexpectedSuccesses + result.skipped
    if any("MemoryError" in str(p) for p in result.errors):
      return "memory"
    if problems or result.testsRun == 0:  # a skip raised from the program is no pass
      return "failed"
  return "passed"


if __name__ == "__main__":
  main(sys.argv[1:])
