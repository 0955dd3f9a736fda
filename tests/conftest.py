"""Test set-up: 8 fake CPU devices, asked for before JAX is imported anywhere."""

import os

# Must run before the first `import jax`: XLA reads the flag when the CPU backend starts.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the flag on purpose)
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
  assert jax.device_count() == 8, f"tests need 8 fake CPU devices, got {jax.device_count()}"
