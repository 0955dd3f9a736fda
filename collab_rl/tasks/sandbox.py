"""Runs an untrusted candidate program and its tests in a locked-down child process.

`run(program, tests)` starts `python -I -S -u` on this very file; the child (our harness, still
trusted) locks itself down, then executes the program and the tests in one module namespace
(`__name__ == "solution"`, so main guards stay off) and runs every `unittest.TestCase` defined
(`unittest.main()` is a no-op). Only the standard library is importable (no site-packages).
Layers, each named in `SandboxResult.layers` when it took effect:

- netns: a fresh network namespace (loopback down): no host, not even 127.0.0.1.
- mountns, expose_python, readonly_root, tmpfs_workdir: a private mount namespace where every
  mount is read-only and nosuid, the cwd is a small fresh tmpfs that dies with the child, and
  a 0700 ancestor of the interpreter (e.g. /root) is replaced by an empty tmpfs holding only it.
- uid: a fresh uid per run (from SANDBOX_UIDS): the child cannot signal or ptrace the caller or
  other runs, nor read their /proc/<pid>/environ, and RLIMIT_NPROC = 0 binds (root is exempt).
- rlimits: CPU, address space, file size, open files, core dumps, processes (no fork, no threads).
- no_new_privs, pdeathsig: no setuid binaries; the child dies with the calling thread.
- audit_hook: refuses sockets, fork/exec/spawn, kill and ctypes calls: a second line, not a
  boundary (C extensions bypass it).
The caller also kills the child's session and every process of the run's uid when it is done.
Without root only rlimits, audit_hook, pdeathsig, no_new_privs and (if unprivileged user
namespaces exist) netns hold: the child then shares the caller's uid and can write to /tmp.

`passed` needs exit code 0 and a line "<nonce> passed" on a private pipe, written by the harness
after the tests; the nonce arrives on stdin and is never in argv, env or files, so exiting early
or printing cannot fake a pass. A program that introspects the harness in its own process (gc,
frames) could still forge it: the sentinel stops accidents and cheap hacks, not a determined one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pathlib
import random
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

SANDBOX_UIDS = range(2_000_000_000, 2_100_000_000)  # far above any uid a distribution hands out
_DISK_MB = 32  # tmpfs workdir size and RLIMIT_FSIZE
_MAX_OPEN_FILES = 64
_SIDE_CAP = 4096  # bytes kept from the sentinel pipe, which the program can also write to
_EXIT_SETUP = 4
_MODULE = "solution"
_use_audit_hook = True  # tests turn it off to check that the kernel layers hold on their own

_uid_lock = threading.Lock()
_uids_taken: set[int] = set()


@dataclasses.dataclass(frozen=True)
class SandboxResult:
  passed: bool
  status: str  # "passed" | "failed" | "timeout" | "error" | "memory" | "output_limit"
  returncode: int | None
  stdout: str
  stderr: str
  duration_s: float
  layers: tuple[str, ...] = ()  # isolation layers that were active; empty if setup never ended


def run(program: str, tests: str, timeout_s: float = 5.0, *, memory_mb: int = 512,
        max_output_bytes: int = 64_000) -> SandboxResult:
  """Runs `program` then `tests` in a sandbox; never raises once the arguments are valid.

  "failed" covers anything the candidate did wrong (exception, syntax error, early exit, failed
  test); "error" means the sandbox itself could not run it, so the result says nothing about it.
  """
  if not isinstance(program, str) or not isinstance(tests, str):
    raise TypeError(f"program and tests must be str, got {type(program).__name__}, {type(tests).__name__}")
  if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not math.isfinite(timeout_s) or timeout_s <= 0:
    raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
  if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < 64:
    raise ValueError(f"memory_mb must be an int >= 64 (the interpreter needs it), got {memory_mb!r}")
  if isinstance(max_output_bytes, bool) or not isinstance(max_output_bytes, int) or max_output_bytes < 0:
    raise ValueError(f"max_output_bytes must be an int >= 0, got {max_output_bytes!r}")
  start = time.monotonic()
  try:
    return _run(program, tests, timeout_s, memory_mb, max_output_bytes, start)
  except Exception as e:  # the caller is a training loop: a broken run must not take it down
    return SandboxResult(False, "error", None, "", f"sandbox error: {e!r}", time.monotonic() - start)


# ---------------------------------------------------------------- parent side


def _run(program: str, tests: str, timeout_s: float, memory_mb: int, cap: int,
         start: float) -> SandboxResult:
  uid, workdir, proc, fds = -1, None, None, []
  try:
    uid = _claim_uid() if os.geteuid() == 0 else -1
    workdir = tempfile.mkdtemp(prefix="sandbox_")
    side_r, side_w = fds = list(os.pipe())
    for name, text in (("program.py", program), ("tests.py", tests)):
      with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
        f.write(text)
    nonce = secrets.token_hex(16)
    argv = [sys.executable, "-I", "-S", "-u", os.path.abspath(__file__), workdir, str(uid), str(side_w),
            str(math.ceil(timeout_s) + 1), str(memory_mb), str(os.getpid()), str(int(_use_audit_hook))]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            pass_fds=(side_w,), env=env, cwd="/", start_new_session=True)
    os.close(fds.pop())
    with contextlib.suppress(BrokenPipeError):  # a child dead this early shows up as "error"
      proc.stdin.write(nonce.encode() + b"\n")
      proc.stdin.close()
    status, out, err, side = _collect(proc, side_r, start + timeout_s, cap)
    # WNOWAIT leaves it a zombie: its pid, our group id for killpg, cannot be reused meanwhile.
    while status is None and not os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
      status = "timeout" if time.monotonic() > start + timeout_s else None  # closed its pipes, kept running
      time.sleep(0.002)
  finally:
    if proc is not None:
      _kill(proc, uid)
    for fd in fds:
      os.close(fd)
    with _uid_lock:
      _uids_taken.discard(uid)
    if workdir is not None:
      _force_rmtree(workdir)
  lines = side.decode("utf-8", "replace").split("\n")
  layers = tuple(lines[0][len("ready "):].split(",")) if lines[0].startswith("ready ") and len(lines) > 1 else ()
  verdict = lines[1].split(" ", 1)[1] if lines[1:] in ([f"{nonce} passed", ""], [f"{nonce} memory", ""]) else None
  rc = proc.returncode
  if status is None:
    if not layers:
      status = "error"
    elif verdict == "passed" and rc == 0:
      status = "passed"
    elif verdict == "memory":
      status = "memory"
    elif rc in (-signal.SIGXCPU, -signal.SIGKILL):  # RLIMIT_CPU: soft limit, then hard
      status = "timeout"
    else:
      status = "failed"
  return SandboxResult(status == "passed", status, rc, out.decode("utf-8", "replace"),
                       err.decode("utf-8", "replace"), time.monotonic() - start, layers)


def _collect(proc: subprocess.Popen, side_r: int, deadline: float,
             cap: int) -> tuple[str | None, bytes, bytes, bytes]:
  """Reads stdout, stderr and the sentinel pipe until EOF, the deadline or the output cap."""
  bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray(), side_r: bytearray()}
  total, status = 0, None
  with selectors.DefaultSelector() as sel:
    for fd in bufs:
      sel.register(fd, selectors.EVENT_READ)
    while sel.get_map() and status is None:
      if (remaining := deadline - time.monotonic()) <= 0:
        status = "timeout"
        break
      for key, _ in sel.select(remaining):
        chunk = os.read(key.fd, 65536)
        if not chunk:
          sel.unregister(key.fd)
        elif key.fd == side_r:
          bufs[side_r] += chunk[:max(0, _SIDE_CAP - len(bufs[side_r]))]
        else:
          bufs[key.fd] += chunk[:max(0, cap - total)]
          total += len(chunk)
          if total > cap:  # kill now: a child printing gigabytes would otherwise run to the timeout
            status = "output_limit"
  return status, *(bytes(bufs[fd]) for fd in (proc.stdout.fileno(), proc.stderr.fileno(), side_r))


def _kill(proc: subprocess.Popen, uid: int) -> None:
  # The child is at worst a zombie until waited for here, so its pid (= its group id) is still ours.
  with contextlib.suppress(ProcessLookupError, PermissionError):
    os.killpg(proc.pid, signal.SIGKILL)
  if uid >= 0:  # catches anything that left the session with setsid()
    for _ in range(100):
      pids = [pid for pid, uids in _process_uids().items() if uid in uids]
      if not pids:
        break
      for pid in pids:
        with contextlib.suppress(ProcessLookupError):
          os.kill(pid, signal.SIGKILL)
      time.sleep(0.01)
  for stream in (proc.stdin, proc.stdout, proc.stderr):
    with contextlib.suppress(OSError):
      stream.close()
  with contextlib.suppress(subprocess.TimeoutExpired):  # unkillable (D state): do not hang
    proc.wait(timeout=5)


def _process_uids() -> dict[int, set[int]]:
  """pid -> {real, effective, saved, filesystem uid} for every live (not zombie) process."""
  result = {}
  for name in os.listdir("/proc"):
    if name.isdigit():
      try:
        with open(f"/proc/{name}/status", encoding="ascii", errors="replace") as f:
          fields = dict(line.split(":", 1) for line in f if ":" in line)
      except OSError:  # gone meanwhile
        continue
      if not fields.get("State", "Z").strip().startswith("Z"):
        result[int(name)] = {int(u) for u in fields.get("Uid", "").split()}
  return result


def _claim_uid() -> int:
  busy = set().union(*_process_uids().values())
  with _uid_lock:
    while True:
      uid = random.choice(SANDBOX_UIDS)
      if uid not in busy and uid not in _uids_taken:
        _uids_taken.add(uid)
        return uid


def _force_rmtree(path: str) -> None:
  def retry(unused_func, p, unused_exc_info):  # a 0000 directory the child made (sharing our uid)
    with contextlib.suppress(OSError):
      os.chmod(p, 0o700)
      if os.path.isdir(p):
        shutil.rmtree(p, ignore_errors=True)
      else:
        os.remove(p)
  shutil.rmtree(path, onerror=retry)


# ---------------------------------------------------------------- child side (python -I -S)
# Runs as the caller's uid (root when it can drop privileges) until _lock_down returns.

_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWNET = 0x20000, 0x10000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 0x40000
_SYS_MOUNT_SETATTR, _AT_FDCWD, _AT_RECURSIVE = 442, -100, 0x8000
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID = 0x1, 0x2
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38
_BLOCKED_EVENTS = frozenset({
    "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo",
    "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
    "subprocess.Popen", "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.call_function"})


def _child_main(args: list[str]) -> None:
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
    check(libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) == 0, f"mount {target}")

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
    attr = (ctypes.c_uint64 * 4)(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, 0, 0)  # struct mount_attr
    if libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_long(_AT_FDCWD), b"/", ctypes.c_uint(_AT_RECURSIVE),
                    attr, ctypes.c_size_t(ctypes.sizeof(attr))) == 0:  # kernel >= 5.12
      layers.append("readonly_root")
    with contextlib.suppress(OSError):  # mounted after the read-only pass, so it stays writable
      mount("tmpfs", workdir, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={_DISK_MB}m,mode=0700,uid={uid},gid={uid}")
      layers.append("tmpfs_workdir")
  if root:
    if "tmpfs_workdir" not in layers:
      os.chown(workdir, uid, uid)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    layers.append("uid")
  prctl = lambda option, value: check(libc.prctl(option, *map(ctypes.c_ulong, (value, 0, 0, 0))) == 0, "prctl")
  prctl(_PR_SET_NO_NEW_PRIVS, 1)
  # After setresuid, which clears it; the getppid check closes the race with a dying parent.
  prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
  if os.getppid() != parent:
    os._exit(_EXIT_SETUP)
  layers += ["no_new_privs", "pdeathsig"]
  limits = {resource.RLIMIT_CORE: 0, resource.RLIMIT_CPU: cpu_s, resource.RLIMIT_AS: memory_mb << 20,
            resource.RLIMIT_FSIZE: _DISK_MB << 20, resource.RLIMIT_NOFILE: _MAX_OPEN_FILES,
            resource.RLIMIT_NPROC: 0}
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
  """Covers each topmost ancestor of the interpreter's prefix that others cannot enter (a 0700 /root
  for pyenv) with a tmpfs holding only the prefix: imports work after the uid drop, the rest hides."""
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
  test_case, suite_cls, runner_cls, loader = unittest.TestCase, unittest.TestSuite, unittest.TextTestRunner, unittest.TestLoader()
  unittest.main = lambda *a, **k: None  # the harness runs every TestCase itself, once
  guarded = (unittest.TestCase, unittest.TestResult, unittest.TextTestResult, unittest.TestSuite,
             unittest.TestLoader, unittest.TextTestRunner, unittest.case._Outcome)  # pylint: disable=protected-access
  snapshot = [(cls, list(vars(cls).items())) for cls in guarded]
  module = types.ModuleType(_MODULE)
  sys.modules[_MODULE] = module
  sys.argv = ["program.py"]
  try:
    for name, source in sources:
      linecache.cache[name] = (len(source), None, source.splitlines(True), name)  # tracebacks show lines
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
      len(vars(cls)) != len(items) or any(vars(cls).get(k) is not v for k, v in items) for cls, items in snapshot)
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
  _child_main(sys.argv[1:])
