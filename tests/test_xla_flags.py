"""The XLA flags a run sets for itself: LLVM -O1 only where nothing but the CPU can run, and
never over a level the user chose."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from collab_rl import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_plugins(monkeypatch):
  monkeypatch.setattr(xla_flags, "accelerator_plugins", lambda: [])


def test_cpu_only_install_gets_llvm_o1_after_the_flags_it_had(no_plugins):
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  assert xla_flags.set_run_defaults(env) == (
      "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=1")
  assert env["XLA_FLAGS"].endswith(xla_flags.CPU_OPT_LEVEL)
  assert xla_flags.set_run_defaults({}) == xla_flags.CPU_OPT_LEVEL


def test_a_level_the_user_named_wins(no_plugins):
  env = {"XLA_FLAGS": "--xla_backend_optimization_level=3"}
  assert xla_flags.set_run_defaults(env) == "--xla_backend_optimization_level=3"


@pytest.mark.parametrize("platforms, cpu_only", [("cpu", True), (" cpu ", True),
                                                 ("cuda,cpu", False), ("tpu", False)])
def test_jax_platforms_decides_when_set(monkeypatch, platforms, cpu_only):
  monkeypatch.setattr(xla_flags, "accelerator_plugins", lambda: ["jax_cuda12_plugin"])
  env = {"JAX_PLATFORMS": platforms}
  assert xla_flags.cpu_only(env) is cpu_only
  assert ("XLA_FLAGS" in env) is False
  assert (xla_flags.CPU_OPT_LEVEL in xla_flags.set_run_defaults(env)) is cpu_only


def test_an_installed_accelerator_plugin_leaves_the_flags_alone(tmp_path):
  """A module in the `jax_plugins` namespace (how JAX finds CUDA and ROCm) is seen, in a fresh
  interpreter, without JAX imported; the flags stay as they were."""
  (tmp_path / "jax_plugins").mkdir()
  (tmp_path / "jax_plugins" / "fake_gpu.py").write_text("")
  code = ("import os, sys; from collab_rl import xla_flags; "
          "print(xla_flags.accelerator_plugins(), repr(xla_flags.set_run_defaults()), "
          "'jax' in sys.modules)")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), ROOT])
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True).stdout.strip()
  assert out == "['fake_gpu'] '' False"
