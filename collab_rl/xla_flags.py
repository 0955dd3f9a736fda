"""XLA flags a run sets for itself before JAX starts its backend. Plain Python: no JAX here.

XLA reads `XLA_FLAGS` once, when the first backend starts; a flag set after that is ignored.
Entry points (`collab_rl.main`, `collab_rl.evaluate`, the compile-time benchmark) call
`set_run_defaults()` first thing in `main`, after `import jax` is fine, before any array exists.

The one default today: **LLVM -O1 for XLA:CPU's kernels** (`--xla_backend_optimization_level=1`
instead of -O3), set only where the run can use nothing but the CPU. Measured on the 2-core CPU
(README, issue 21): backend compile 9-20% shorter, run time unchanged, a train step's loss and
logits equal bit for bit. The same flag would reach a GPU's LLVM too, where it is not measured,
so it is left alone wherever an accelerator plugin is installed. A run that names the level
itself in `XLA_FLAGS` keeps its own (`--xla_backend_optimization_level=3` is XLA's default).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pkgutil
from typing import MutableMapping

CPU_OPT_LEVEL = "--xla_backend_optimization_level=1"


def accelerator_plugins() -> list[str]:
  """The installed packages through which JAX could start a GPU or TPU backend: modules of the
  `jax_plugins` namespace and `jax_plugins` entry points (how JAX finds CUDA and ROCm), and
  `libtpu`. Found without importing JAX."""
  found = []
  spec = importlib.util.find_spec("jax_plugins")
  if spec is not None and spec.submodule_search_locations:
    found += [name for _, name, _ in pkgutil.iter_modules(spec.submodule_search_locations)]
  found += [e.value for e in importlib.metadata.entry_points(group="jax_plugins")]
  if importlib.util.find_spec("libtpu") is not None:
    found.append("libtpu")
  return sorted(set(found))


def cpu_only(env: MutableMapping[str, str] | None = None) -> bool:
  """Whether JAX can start no backend but the CPU: `JAX_PLATFORMS` names only cpu, or it names
  nothing and no accelerator plugin is installed."""
  env = os.environ if env is None else env
  platforms = [p.strip() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return set(platforms) == {"cpu"}
  return not accelerator_plugins()


def set_run_defaults(env: MutableMapping[str, str] | None = None) -> str:
  """Adds the run defaults to `env["XLA_FLAGS"]` (the process's environment by default) where
  they apply and the flags do not already choose; returns the resulting XLA_FLAGS."""
  env = os.environ if env is None else env
  flags = env.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in flags and cpu_only(env):
    env["XLA_FLAGS"] = f"{flags} {CPU_OPT_LEVEL}".strip()
  return env.get("XLA_FLAGS", "")
