"""Runs an untrusted candidate program and its tests in a locked-down child process.

`run(program, tests)` starts `python -I -S -u` on `sandbox_harness.py`; the child (our harness,
still trusted) locks itself down, then executes the program and the tests in one module namespace
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

from collab_rl.tasks import sandbox_harness

SANDBOX_UIDS = range(2_000_000_000, 2_100_000_000)  # far above any uid a distribution hands out
_SIDE_CAP = 4096  # bytes kept from the sentinel pipe, which the program can also write to
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
    raise TypeError("program and tests must be str, got "
                    f"{type(program).__name__}, {type(tests).__name__}")
  if not _is_number(timeout_s, (int, float)) or not math.isfinite(timeout_s) or timeout_s <= 0:
    raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
  if not _is_number(memory_mb, int) or memory_mb < 64:
    raise ValueError(
        f"memory_mb must be an int >= 64 (the interpreter needs it), got {memory_mb!r}")
  if not _is_number(max_output_bytes, int) or max_output_bytes < 0:
    raise ValueError(f"max_output_bytes must be an int >= 0, got {max_output_bytes!r}")
  start = time.monotonic()
  try:
    return _run(program, tests, timeout_s, memory_mb, max_output_bytes, start)
  except Exception as e:  # the caller is a training loop: a broken run must not take it down
    return SandboxResult(False, "error", None, "", f"sandbox error: {e!r}",
                         time.monotonic() - start)


def _is_number(value, kinds: type | tuple[type, ...]) -> bool:
  return isinstance(value, kinds) and not isinstance(value, bool)  # True is an int in Python


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
    # The harness's arguments, in the order its `main` reads them.
    args = (workdir, uid, side_w, math.ceil(timeout_s) + 1, memory_mb, os.getpid(),
            int(_use_audit_hook))
    harness = os.path.abspath(sandbox_harness.__file__)
    argv = [sys.executable, "-I", "-S", "-u", harness, *map(str, args)]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, pass_fds=(side_w,), env=env, cwd="/",
                            start_new_session=True)
    os.close(fds.pop())
    with contextlib.suppress(BrokenPipeError):  # a child dead this early shows up as "error"
      proc.stdin.write(nonce.encode() + b"\n")
      proc.stdin.close()
    status, out, err, side = _collect(proc, side_r, start + timeout_s, cap)
    # A child that closed its pipes may still run: wait for its exit, up to the deadline.
    # WNOWAIT leaves it a zombie: its pid, our group id for killpg, cannot be reused meanwhile.
    exited = os.WEXITED | os.WNOHANG | os.WNOWAIT
    while status is None and not os.waitid(os.P_PID, proc.pid, exited):
      status = "timeout" if time.monotonic() > start + timeout_s else None
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
  # The harness writes "ready <layers>\n", then at most "<nonce> passed\n" or "<nonce> memory\n".
  lines = side.decode("utf-8", "replace").split("\n")
  ready = lines[0].startswith("ready ") and len(lines) > 1  # a whole line, not a cut-off one
  layers = tuple(lines[0][len("ready "):].split(",")) if ready else ()
  verdicts = ([f"{nonce} passed", ""], [f"{nonce} memory", ""])
  verdict = lines[1].split(" ", 1)[1] if lines[1:] in verdicts else None
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
