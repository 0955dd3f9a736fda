"""Sandbox: verdicts, limits and containment, each attack checked from the caller's side."""

from __future__ import annotations

import concurrent.futures
import functools
import glob
import os
import secrets
import signal
import socket
import tempfile

import pytest

from collab_rl.tasks import sandbox

ADD = "def add(a, b):\n  return a + b\n"


@functools.cache
def _layers() -> tuple[str, ...]:
  """The layers this machine grants (root, CAP_SYS_ADMIN, no seccomp filter on unshare...)."""
  return sandbox.run("", "", 5).layers


def _require(*layers: str) -> None:
  if missing := set(layers) - set(_layers()):
    pytest.skip(f"layers {sorted(missing)} are not available here")


def _has_cap_sys_admin() -> bool:
  with open("/proc/self/status") as f:
    cap_eff = next(line for line in f if line.startswith("CapEff:")).split()[1]
  return bool(int(cap_eff, 16) & (1 << 21))


@pytest.fixture(params=["hook", "kernel_only"])
def layers_mode(request, monkeypatch):
  """Attacks run twice: with the audit hook, and without it to prove the kernel layers hold."""
  if request.param == "kernel_only":
    monkeypatch.setattr(sandbox, "_use_audit_hook", False)
  return request.param


def _sandbox_pids() -> list[int]:
  return [pid for pid, uids in sandbox._process_uids().items() if any(uid in sandbox.SANDBOX_UIDS for uid in uids)]


def test_passing_program_and_its_layers():
  tests = ("assert add(2, 3) == 5\nimport decimal, json\n"  # decimal: an extension module from lib-dynload
           "open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\nprint('done')\n")
  before = set(glob.glob(os.path.join(tempfile.gettempdir(), "sandbox_*")))
  r = sandbox.run(ADD, tests, 5)
  assert (r.passed, r.status, r.returncode, r.stdout) == (True, "passed", 0, "done\n"), r
  assert {"rlimits", "no_new_privs", "audit_hook"} <= set(r.layers)
  if os.geteuid() == 0:
    assert "uid" in r.layers
    if _has_cap_sys_admin():  # a container can still refuse unshare, but this machine does not
      assert {"netns", "mountns", "readonly_root", "tmpfs_workdir"} <= set(r.layers)
  assert set(glob.glob(os.path.join(tempfile.gettempdir(), "sandbox_*"))) == before  # workdir removed


@pytest.mark.parametrize("program, tests, needle", [
    (ADD, "assert add(2, 2) == 5\n", "AssertionError"),
    ("def add(a, b:\n  return a\n", "assert add(1, 1) == 2\n", "SyntaxError"),
    (ADD, "assert add(1, 1) == 2\nundefined_name\n", "NameError"),
])
def test_failures(program, tests, needle):
  r = sandbox.run(program, tests, 5)
  assert (r.passed, r.status) == (False, "failed") and needle in r.stderr, r


UNITTEST = """
import unittest

class TestAdd(unittest.TestCase):
  def test_add(self):
    self.assertEqual(add(1, 2), {expected})

if __name__ == "__main__":
  unittest.main()
unittest.main()  # unguarded: a no-op, the harness runs the TestCase once itself
"""


@pytest.mark.parametrize("program, expected, status", [
    (ADD, 3, "passed"),
    (ADD, 4, "failed"),
    ("import unittest\ndef add(a, b):\n  raise unittest.SkipTest('skip me')\n", 3, "failed"),
    ("import unittest\nunittest.TestCase.assertEqual = lambda *a, **k: None\ndef add(a, b):\n  return 0\n",
     3, "failed"),
])
def test_unittest_style(program, expected, status):
  r = sandbox.run(program, UNITTEST.format(expected=expected), 5)
  assert r.status == status and r.passed == (status == "passed"), r


@pytest.mark.parametrize("program", [
    "import sys\nsys.exit(0)\n",
    "import os\nos._exit(0)\n",
    "import sys\ndef add(a, b):\n  sys.exit(0)\n",  # exits from inside the tests
    # Forges every protocol line it can guess on every descriptor, then exits cleanly.
    "import os\nfor fd in range(1, 64):\n  try:\n    os.write(fd, b'ready uid\\npassed\\n0 passed\\n')\n"
    "  except OSError:\n    pass\nos._exit(0)\n",
])
def test_early_exit_is_not_a_pass(program):
  r = sandbox.run(program, "add(1, 2)\nassert False\n", 5)
  assert (r.passed, r.status) == (False, "failed"), r


@pytest.mark.parametrize("program", [
    "while True:\n  pass\n",
    "import time\ntime.sleep(60)\n",
    "import os, time\nos.closerange(0, 64)\ntime.sleep(60)\n",  # no pipe left to wait on
])
def test_timeout(program):
  r = sandbox.run(program, "", 1.0)
  assert (r.passed, r.status) == (False, "timeout"), r
  assert r.duration_s < 1.5
  assert not _sandbox_pids()


@pytest.mark.parametrize("program", [
    "x = bytearray(1 << 34)\n",
    "chunks = []\nwhile True:\n  chunks.append(bytearray(1 << 20))\n",
])
def test_memory_bomb(program):
  r = sandbox.run(program, "", 5, memory_mb=128)
  assert (r.passed, r.status) == (False, "memory"), r


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_huge_output_is_capped(stream):
  r = sandbox.run(f"import sys\nwhile True:\n  sys.{stream}.write('x' * 65536)\n", "", 5, max_output_bytes=10_000)
  assert (r.passed, r.status) == (False, "output_limit"), r.status
  assert len(r.stdout) + len(r.stderr) <= 10_000 and r.duration_s < 2


def test_fork_bomb(layers_mode):
  del layers_mode
  r = sandbox.run("import os\nwhile True:\n  os.fork()\n", "", 2)
  assert not r.passed and r.status in ("failed", "timeout"), r
  assert os.getpid() > 0 and not _sandbox_pids()


def test_grandchild_does_not_survive(layers_mode):
  del layers_mode
  marker = "987.654"
  program = f"""
import os, subprocess, time
try:
  subprocess.Popen(["sleep", "{marker}"], start_new_session=True)
except Exception as e:
  print("popen refused:", e)
try:
  if os.fork() == 0:
    os.setsid()
    time.sleep({marker})
    os._exit(0)
except Exception as e:
  print("fork refused:", e)
"""
  r = sandbox.run(program, "", 2)
  assert "refused" in r.stdout, r
  assert not _sandbox_pids()
  for path in glob.glob("/proc/[0-9]*/cmdline"):
    try:
      with open(path, "rb") as f:
        assert marker.encode() not in f.read(), path
    except OSError:
      pass


def test_writes_outside_the_workdir_do_not_land(layers_mode):
  del layers_mode
  _require("uid", "readonly_root")
  name = f"sandbox_escape_{secrets.token_hex(4)}"
  targets = [os.path.join(d, name) for d in ("/tmp", "/var/tmp", "/dev/shm", os.getcwd(), os.path.dirname(__file__))]
  program = "".join(f"try:\n  open({t!r}, 'w').write('x')\nexcept OSError as e:\n  print('refused', e)\n" for t in targets)
  r = sandbox.run(program, "", 5)
  assert r.stdout.count("refused") == len(targets), r
  assert not [t for t in targets if os.path.exists(t)]


def test_no_network(layers_mode):
  if layers_mode == "kernel_only":
    _require("netns")
  with socket.socket() as listener:
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')\n"
    r = sandbox.run(program, "", 3)
    assert not r.passed and "connected" not in r.stdout, r
    listener.settimeout(0.2)
    with pytest.raises(TimeoutError):
      listener.accept()


def test_parent_environment_is_unreadable(monkeypatch):
  _require("uid")
  secret = secrets.token_hex(16)
  monkeypatch.setenv("SANDBOX_TEST_SECRET", secret)
  program = """
import os
print(dict(os.environ))
try:
  print(open(f"/proc/{os.getppid()}/environ", "rb").read())
except OSError as e:
  print("denied", e)
"""
  r = sandbox.run(program, "", 5)
  assert r.passed and "denied" in r.stdout and secret not in r.stdout + r.stderr, r
  assert "SANDBOX_TEST_SECRET" not in r.stdout


def test_cannot_signal_the_caller(layers_mode):
  del layers_mode
  _require("uid")
  received = []
  previous = signal.signal(signal.SIGTERM, lambda *_: received.append(True))  # survive a broken sandbox
  try:
    program = ("import os, signal\n"
               "for target in (lambda: os.kill(os.getppid(), signal.SIGTERM),\n"
               "               lambda: os.killpg(os.getpgid(os.getppid()), signal.SIGTERM)):\n"
               "  try:\n    target()\n  except OSError as e:\n    print('refused', e)\n")
    r = sandbox.run(program, "", 5)
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert not received and r.stdout.count("refused") == 2, r


def test_concurrent_runs_get_their_own_uid():
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    results = list(pool.map(lambda i: sandbox.run(ADD, f"assert add({i}, 1) == {i + 1}\nimport os\nprint(os.getuid())\n", 5),
                            range(4)))
  assert all(r.passed for r in results), results
  if os.geteuid() == 0:
    assert len({r.stdout for r in results}) == 4


def test_internal_failure_becomes_error(monkeypatch):
  def broken(*args, **kwargs):
    raise OSError("no processes today")
  monkeypatch.setattr(sandbox.subprocess, "Popen", broken)
  r = sandbox.run(ADD, "", 1)
  assert (r.passed, r.status, r.returncode) == (False, "error", None) and "no processes today" in r.stderr


def test_child_that_never_set_up_is_an_error_even_with_exit_code_0(monkeypatch):
  monkeypatch.setattr(sandbox.sys, "executable", "/bin/true")
  r = sandbox.run(ADD, "", 1)
  assert (r.passed, r.status, r.returncode, r.layers) == (False, "error", 0, ()), r


@pytest.mark.parametrize("kwargs, error", [
    ({"timeout_s": 0}, ValueError), ({"timeout_s": -1.0}, ValueError), ({"timeout_s": float("nan")}, ValueError),
    ({"timeout_s": float("inf")}, ValueError), ({"timeout_s": "5"}, ValueError), ({"memory_mb": 8}, ValueError),
    ({"max_output_bytes": -1}, ValueError), ({"program": None}, TypeError), ({"tests": b"assert 1"}, TypeError),
])
def test_invalid_arguments(kwargs, error):
  args = {"program": ADD, "tests": ""} | kwargs
  with pytest.raises(error):
    sandbox.run(**args)
