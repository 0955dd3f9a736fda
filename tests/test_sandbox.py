"""Sandbox: verdicts, arguments and isolation layers.

Hostile programs (time, memory, processes, files, secrets, signals, network) and the checks that
the caller is unharmed are one table in tests/reliability/test_hostile_code.py.
"""

from __future__ import annotations

import concurrent.futures
import glob
import os
import tempfile

import pytest

from collab_rl.tasks import sandbox

# Each test's sandbox workdirs in a directory of its own (tests/conftest.py), so the workdir
# checks do not see the other pytest-xdist process's sandboxes.
pytestmark = pytest.mark.usefixtures("own_tempdir")

ADD = "def add(a, b):\n  return a + b\n"


def _has_cap_sys_admin() -> bool:
  with open("/proc/self/status") as f:
    cap_eff = next(line for line in f if line.startswith("CapEff:")).split()[1]
  return bool(int(cap_eff, 16) & (1 << 21))


def _sandbox_dirs() -> set[str]:
  return set(glob.glob(os.path.join(tempfile.gettempdir(), "sandbox_*")))


def test_passing_program_and_its_layers():
  tests = ("assert add(2, 3) == 5\n"
           "import decimal, json\n"  # decimal: an extension module from lib-dynload
           "open('scratch.txt', 'w').write('ok')\n"
           "assert open('scratch.txt').read() == 'ok'\n"
           "print('done')\n")
  before = _sandbox_dirs()
  r = sandbox.run(ADD, tests, 5)
  assert (r.passed, r.status, r.returncode, r.stdout) == (True, "passed", 0, "done\n"), r
  assert {"rlimits", "no_new_privs", "audit_hook"} <= set(r.layers)
  if os.geteuid() == 0:
    assert "uid" in r.layers
    if _has_cap_sys_admin():  # a container can still refuse unshare, but this machine does not
      assert {"netns", "mountns", "readonly_root", "tmpfs_workdir"} <= set(r.layers)
  assert _sandbox_dirs() == before  # workdir removed


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
    ("import unittest\nunittest.TestCase.assertEqual = lambda *a, **k: None\n"
     "def add(a, b):\n  return 0\n", 3, "failed"),
])
def test_unittest_style(program, expected, status):
  r = sandbox.run(program, UNITTEST.format(expected=expected), 5)
  assert r.status == status and r.passed == (status == "passed"), r


@pytest.mark.parametrize("program", [
    "import sys\nsys.exit(0)\n",
    "import os\nos._exit(0)\n",
    "import sys\ndef add(a, b):\n  sys.exit(0)\n",  # exits from inside the tests
    # Forges every protocol line it can guess on every descriptor, then exits cleanly.
    "import os\nfor fd in range(1, 64):\n  try:\n"
    "    os.write(fd, b'ready uid\\npassed\\n0 passed\\n')\n"
    "  except OSError:\n    pass\nos._exit(0)\n",
])
def test_early_exit_is_not_a_pass(program):
  r = sandbox.run(program, "add(1, 2)\nassert False\n", 5)
  assert (r.passed, r.status) == (False, "failed"), r


def test_concurrent_runs_get_their_own_uid():
  def run_one(i: int) -> sandbox.SandboxResult:
    return sandbox.run(ADD, f"assert add({i}, 1) == {i + 1}\nimport os\nprint(os.getuid())\n", 5)
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    results = list(pool.map(run_one, range(4)))
  assert all(r.passed for r in results), results
  if os.geteuid() == 0:
    assert len({r.stdout for r in results}) == 4


def test_internal_failure_becomes_error(monkeypatch):
  def broken(*args, **kwargs):
    raise OSError("no processes today")
  monkeypatch.setattr(sandbox.subprocess, "Popen", broken)
  r = sandbox.run(ADD, "", 1)
  assert (r.passed, r.status, r.returncode) == (False, "error", None)
  assert "no processes today" in r.stderr


def test_child_that_never_set_up_is_an_error_even_with_exit_code_0(monkeypatch):
  monkeypatch.setattr(sandbox.sys, "executable", "/bin/true")
  r = sandbox.run(ADD, "", 1)
  assert (r.passed, r.status, r.returncode, r.layers) == (False, "error", 0, ()), r


@pytest.mark.parametrize("kwargs, error", [
    ({"timeout_s": 0}, ValueError), ({"timeout_s": -1.0}, ValueError),
    ({"timeout_s": float("nan")}, ValueError), ({"timeout_s": float("inf")}, ValueError),
    ({"timeout_s": "5"}, ValueError), ({"memory_mb": 8}, ValueError),
    ({"max_output_bytes": -1}, ValueError), ({"program": None}, TypeError),
    ({"tests": b"assert 1"}, TypeError),
])
def test_invalid_arguments(kwargs, error):
  args = {"program": ADD, "tests": ""} | kwargs
  with pytest.raises(error):
    sandbox.run(**args)
