"""Untrusted code: one table of hostile programs, each run in `collab_rl.tasks.sandbox`.

Every row states what the sandbox must answer (its status, the attempts refused, what must never
be printed), and after every run the caller is checked to be unharmed: same pid and cwd, the same
environment (with a secret in it the child never sees), signal handlers that received nothing,
the same open files and threads, no child or sandbox process left, no sandbox directory left, a
canary file untouched, a listening socket nobody reached, and a sandbox that still runs a good
program. Rows where the audit hook could be what stops the attack run twice, the second time
without it, so that the kernel layers are shown to hold on their own. Verdict integrity (forged
passes, early exits, tampering with unittest) is in tests/test_sandbox.py.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import secrets
import signal
import socket
import tempfile
import threading

import pytest

from collab_rl.tasks import sandbox

# Each test's sandbox workdirs in a directory of its own (tests/conftest.py), so the caller's
# `sandbox_dirs` do not include the other pytest-xdist process's sandboxes.
pytestmark = pytest.mark.usefixtures("own_tempdir")

TMP = tempfile.gettempdir()  # the machine's (read at import): where an escape would write
MARKER = "987.654"  # a sleep length no real process uses: finds escaped grandchildren
REFUSE = "try:\n  {}\nexcept Exception as e:\n  print('refused', e)\n"


def attempts(*statements: str) -> str:
  """A program that tries each statement and prints "refused" for each that raises."""
  return "import os, signal, socket\n" + "".join(REFUSE.format(s) for s in statements)


@dataclasses.dataclass(frozen=True)
class Hostile:
  program: str  # formatted with secret_name, port, canary, escape (a file name) and marker
  statuses: tuple[str, ...]
  refused: int = 0  # "refused" lines the program must print
  never: tuple[str, ...] = ()  # in neither output, after formatting
  needs: tuple[str, ...] = ()  # layers without which the row cannot hold (skipped if absent)
  kernel_needs: tuple[str, ...] = ()  # layers that must hold it when the audit hook is off
  hook_matters: bool = False  # run a second time without the audit hook
  timeout_s: float = 5.0
  memory_mb: int = 512
  max_output_bytes: int = 64_000


def _escape_targets(escape: str) -> list[str]:
  tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return [os.path.join(d, escape) for d in (TMP, "/var/tmp", "/dev/shm", os.getcwd(), tests_dir)]


WRITES = "\n".join(f"open({t!r}, 'w').write('x')" for t in _escape_targets("{escape}"))

HOSTILE = {
    # Time.
    "busy_loop": Hostile("while True:\n  pass\n", ("timeout",), timeout_s=1),
    "sleeps_forever": Hostile("import time\ntime.sleep(60)\n", ("timeout",), timeout_s=1),
    "closes_its_pipes_and_sleeps": Hostile("import os, time\nos.closerange(0, 64)\n"
                                           "time.sleep(60)\n", ("timeout",), timeout_s=1),
    "ignores_cpu_and_term_signals": Hostile(
        "import signal\nfor s in (signal.SIGXCPU, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
        "  signal.signal(s, signal.SIG_IGN)\nwhile True:\n  pass\n", ("timeout",), timeout_s=1),
    "stops_itself": Hostile("import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)\n",
                            ("failed", "timeout"), hook_matters=True, timeout_s=1),
    # Memory, processes, files, output.
    "allocates_16_gb": Hostile("x = bytearray(1 << 34)\n", ("memory",), memory_mb=128),
    "allocates_until_refused": Hostile("chunks = []\nwhile True:\n"
                                       "  chunks.append(bytearray(1 << 20))\n", ("memory",),
                                       memory_mb=128),
    "fork_bomb": Hostile("import os\nwhile True:\n  os.fork()\n", ("failed", "timeout"),
                         hook_matters=True, timeout_s=2),
    "thread_bomb": Hostile("import threading, time\nwhile True:\n"
                           "  threading.Thread(target=time.sleep, args=(60,)).start()\n",
                           ("failed",)),
    "escaping_grandchild": Hostile(
        attempts("__import__('subprocess').Popen(['sleep', '{marker}'], start_new_session=True)",
                 "os.fork() or (os.setsid(), __import__('time').sleep({marker}))"),
        ("passed",), refused=2, hook_matters=True, timeout_s=2),
    "opens_files_until_refused": Hostile(attempts("fs = [open('/dev/null') for _ in range(10**5)]"),
                                         ("passed",), refused=1),
    "fills_the_disk": Hostile(attempts("f = open('big', 'wb')\n  while True:\n"
                                       "    f.write(b'x' * (1 << 20))"), ("passed",), refused=1),
    "floods_stdout": Hostile("import sys\nwhile True:\n  sys.stdout.write('x' * 65536)\n",
                             ("output_limit",), max_output_bytes=10_000),
    "floods_stderr": Hostile("import sys\nwhile True:\n  sys.stderr.write('x' * 65536)\n",
                             ("output_limit",), max_output_bytes=10_000),
    "prints_one_100_mb_line": Hostile("print('x' * 10**8)\n", ("output_limit", "memory"),
                                      max_output_bytes=10_000),
    "crashes_the_interpreter": Hostile("import ctypes\nctypes.string_at(0)\n", ("failed",),
                                       hook_matters=True),
    # The file system.
    "writes_outside_its_directory": Hostile(
        attempts(*WRITES.splitlines()), ("passed",), refused=5, needs=("uid", "readonly_root"),
        hook_matters=True),
    "writes_through_parent_cwd": Hostile(attempts("open(f'/proc/{{os.getppid()}}/cwd/{escape}', "
                                                  "'w')"), ("passed",), refused=1,
                                         needs=("uid",)),
    "locks_a_symlink_to_a_canary": Hostile("import os\nos.makedirs('d')\n"
                                           "os.symlink('{canary}', 'd/link')\nos.chmod('d', 0)\n",
                                           ("passed",)),
    # Secrets.
    "reads_parent_environment": Hostile(
        "import os\nprint(dict(os.environ))\n" + attempts(
            "print(open(f'/proc/{{os.getppid()}}/environ', 'rb').read())"),
        ("passed",), refused=1, never=("{secret}", "{secret_name}"), needs=("uid",)),
    "scans_every_environment": Hostile(
        "import os\nfor pid in filter(str.isdigit, os.listdir('/proc')):\n  try:\n"
        "    print(open(f'/proc/{{pid}}/environ', 'rb').read())\n  except OSError:\n    pass\n",
        ("passed",), never=("{secret}",), needs=("uid",)),
    "reads_parent_memory": Hostile(attempts("open(f'/proc/{{os.getppid()}}/mem', 'rb')",
                                            "os.listdir(f'/proc/{{os.getppid()}}/fd')"),
                                   ("passed",), refused=2, needs=("uid",)),
    "reads_shadow_passwords": Hostile(attempts("print(open('/etc/shadow').read())"), ("passed",),
                                      refused=1, needs=("uid",)),
    # Signals.
    "sigkills_its_parent": Hostile(attempts("os.kill(os.getppid(), signal.SIGKILL)"),
                                   ("passed",), refused=1, kernel_needs=("uid",),
                                   hook_matters=True),
    "signals_parent_group": Hostile(
        attempts("os.killpg(os.getpgid(os.getppid()), signal.SIGTERM)",
                 "os.kill(os.getppid(), signal.SIGINT)", "os.kill(os.getppid(), signal.SIGUSR1)"),
        ("passed",), refused=3, kernel_needs=("uid",), hook_matters=True),
    "sigkills_every_process": Hostile("import os, signal\nos.kill(-1, signal.SIGKILL)\n",
                                      ("passed", "failed"), kernel_needs=("uid",),
                                      hook_matters=True),
    # Network and privileges.
    "connects_to_parent_port": Hostile(
        attempts("socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                 "  print('connected')"), ("passed",), refused=1, never=("connected",),
        kernel_needs=("netns",), hook_matters=True),
    "sends_udp_to_the_internet": Hostile(
        attempts("socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', "
                 "('8.8.8.8', 53))"), ("passed",), refused=1, kernel_needs=("netns",),
        hook_matters=True),
    "becomes_root": Hostile(attempts("os.setuid(0)", "os.setgid(0)"), ("passed",), refused=2,
                            needs=("uid",)),
    "mounts_over_tmp": Hostile("import ctypes\nlibc = ctypes.CDLL(None)\n"
                               "print('mount returned', libc.mount(b'none', b'/tmp', b'tmpfs', "
                               "0, None))\n", ("passed", "failed"), never=("mount returned 0",),
                               kernel_needs=("uid",), hook_matters=True),
}
CASES = [pytest.param(name, mode, id=f"{name}-{mode}") for name, row in HOSTILE.items()
         for mode in (("hook", "kernel_only") if row.hook_matters else ("hook",))]


@functools.cache
def granted_layers() -> tuple[str, ...]:
  """The layers this machine grants (root, CAP_SYS_ADMIN, no seccomp filter on unshare...)."""
  return sandbox.run("", "", 5).layers


def sandbox_pids(claimed: list[int]) -> list[int]:
  """Live processes running as a sandbox uid this test's runs `claimed`: an escaped grandchild
  keeps its uid, and the other pytest-xdist process's sandboxes run as others."""
  return [pid for pid, uids in sandbox._process_uids().items()  # pylint: disable=protected-access
          if any(uid in claimed for uid in uids)]


def children() -> list[int]:
  me, out = str(os.getpid()), []
  for stat in glob.glob("/proc/[0-9]*/stat"):
    try:
      with open(stat) as f:
        if f.read().rsplit(")", 1)[1].split()[1] == me:
          out.append(int(stat.split("/")[2]))
    except OSError:
      pass
  return out


def marker_processes() -> list[str]:
  found = []
  for path in glob.glob("/proc/[0-9]*/cmdline"):
    try:
      with open(path, "rb") as f:
        if MARKER.encode() in f.read():
          found.append(path)
    except OSError:
      pass
  return found


def state_of_caller(canary: str) -> dict:
  with open(canary, "rb") as f:
    canary_bytes = f.read()
  return {"pid": os.getpid(), "cwd": os.getcwd(), "env": dict(os.environ),
          "fds": sorted(os.listdir("/proc/self/fd")), "threads": threading.active_count(),
          "children": children(),
          "sandbox_dirs": sorted(glob.glob(f"{tempfile.gettempdir()}/sandbox_*")),
          "canary": (canary_bytes, os.stat(canary).st_mode)}


@pytest.fixture
def caller(tmp_path, monkeypatch):
  """The caller's secrets, listening port, canary file and signal handlers."""
  secret = secrets.token_hex(16)
  monkeypatch.setenv("SANDBOX_TEST_SECRET", secret)
  canary = tmp_path / "canary.txt"
  canary.write_text("keep me")
  received = []
  watched = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
  previous = {s: signal.signal(s, lambda sig, _: received.append(sig)) for s in watched}
  with socket.socket() as listener:
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.05)
    yield {"secret": secret, "secret_name": "SANDBOX_TEST_SECRET", "canary": str(canary),
           "port": listener.getsockname()[1], "escape": f"sandbox_escape_{secrets.token_hex(4)}",
           "marker": MARKER, "received": received, "listener": listener}
  for s, handler in previous.items():
    signal.signal(s, handler)


@pytest.mark.parametrize("name, mode", CASES)
def test_hostile_program_is_contained_and_caller_unharmed(name, mode, caller, monkeypatch):
  row = HOSTILE[name]
  needed = set(row.needs) | (set(row.kernel_needs) if mode == "kernel_only" else set())
  if missing := needed - set(granted_layers()):
    pytest.skip(f"layers {sorted(missing)} are not available here")
  monkeypatch.setattr(sandbox, "_use_audit_hook", mode == "hook")
  claimed, claim = [], sandbox._claim_uid  # pylint: disable=protected-access
  monkeypatch.setattr(sandbox, "_claim_uid", lambda: claimed.append(claim()) or claimed[-1])
  fill = lambda s: s.format(**{k: v for k, v in caller.items() if isinstance(v, (str, int))})
  before = state_of_caller(caller["canary"])

  r = sandbox.run(fill(row.program), "", row.timeout_s, memory_mb=row.memory_mb,
                  max_output_bytes=row.max_output_bytes)

  assert r.status in row.statuses, r
  assert r.stdout.count("refused") >= row.refused, r
  assert not [s for s in map(fill, row.never) if s in r.stdout + r.stderr], r
  assert len(r.stdout) + len(r.stderr) <= row.max_output_bytes
  assert r.duration_s < row.timeout_s + 1.0, r.duration_s
  # The caller, unharmed.
  assert state_of_caller(caller["canary"]) == before
  assert not caller["received"], caller["received"]
  with pytest.raises(TimeoutError):
    caller["listener"].accept()
  assert not sandbox_pids(claimed) and not marker_processes()
  assert not [t for t in _escape_targets(caller["escape"]) if os.path.exists(t)]
  assert sandbox.run("def add(a, b):\n  return a + b\n", "assert add(2, 3) == 5\n", 5).passed
