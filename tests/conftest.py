"""Test set-up: 8 fake CPU devices, asked for before JAX is imported anywhere."""

import os
import shutil
import tempfile

# Must run before the first `import jax`: XLA reads the flag when the CPU backend starts.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
# LLVM at -O1 instead of -O3 for XLA:CPU's own kernels: 9-20% less compile time (the suite's
# largest cost) at the same speed (bench.compile_time, a train step and the sampler, 2026-12-06;
# README "Benchmarks"). Tests only: one train step is bit-identical under it, but whole runs are
# not (the main job's table moves), and no test compares against the README's figures. Test
# subprocesses (test_main, test_multihost, reliability/) keep these flags with their own device
# count (`subprocess_env.xla_flags`).
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=1"
# XLA:CPU's older elemental emitters for its fusions instead of the MLIR fusion emitters: 12-22%
# less backend compile on top of -O1 (`bench.compile_options`, alternated in one process,
# 2026-12-07: base 12.5 -> 9.8 s, PPO with MR 17.7 -> 15.6 s) and the suite 730 s against 876 s
# (22.4 against 27.0 CPU minutes). Tests only: the programs run 5-23% slower (bench.train_step)
# and round differently, so runs keep XLA's defaults (README "Benchmarks").
if "xla_cpu_use_fusion_emitters" not in _flags:
  _flags += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the flag on purpose)
import pytest  # noqa: E402

# With 8 fake devices sharing 2 cores, two programs with collectives in flight at once can
# deadlock XLA:CPU's in-process rendezvous ("Expected 8 threads to join the rendezvous, but only
# 7 arrived"): reading a replicated output waits for one shard only, so the next program starts
# while the last still runs. Synchronous CPU dispatch rules that out in tests; real runs on
# accelerators keep asynchronous dispatch.
jax.config.update("jax_cpu_enable_async_dispatch", False)

# One persistent compilation cache for the whole session, fresh each run (nothing carries over
# between runs): the trainers' tests build the same tiny programs again and again, from new
# closures that jit's in-memory cache cannot match, and a cache hit skips XLA's compile (the
# suite's largest cost on 2 cores). `compile_counter` still sees every real compilation.
# Under pytest-xdist (the README's `-n 2`) the workers of one run share it: a program one worker
# compiled is a hit in the other. JAX writes an entry in place, so a worker may read one half
# written; it then warns and compiles the program itself.
# The process that made the directory (pytest's own, or xdist's controller, whose workers
# inherit the environment variable) removes it when the run ends, so runs leave nothing behind.
_CACHE_ENV = "COLLAB_RL_TESTS_JAX_CACHE"
_CACHE = os.environ.get(_CACHE_ENV)
_OWN_CACHE = not _CACHE
if _OWN_CACHE:
  _CACHE = tempfile.mkdtemp(prefix="collab_rl_tests_jax_")
  os.environ[_CACHE_ENV] = _CACHE
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
  assert jax.device_count() == 8, f"tests need 8 fake CPU devices, got {jax.device_count()}"


class CompileCounter:
  """Counts XLA backend compilations while active (a jit cache hit compiles nothing)."""

  EVENT = "/jax/core/compile/backend_compile_duration"

  def __init__(self):
    self.count = 0

  def _listener(self, event, duration, **kwargs):
    del duration, kwargs
    if event == self.EVENT:
      self.count += 1

  def __enter__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listener)


@pytest.fixture
def compile_counter():
  return CompileCounter()


@pytest.fixture
def own_tempdir(monkeypatch, tmp_path_factory):
  """A temporary directory of this test's own as `tempfile`'s default, so the code sandbox's
  workdirs (`sandbox_*`) land there: the suite runs in two processes (pytest-xdist), and a test
  that checks its sandboxes left no workdir behind would otherwise see the other process's."""
  tmp_path_factory.getbasetemp()  # pytest's own temporary root stays where it is
  d = tempfile.mkdtemp(prefix="collab_rl_tests_tmp_")
  os.chmod(d, 0o711)  # the sandbox's uid passes through it when no tmpfs is mounted on its workdir
  monkeypatch.setattr(tempfile, "tempdir", d)
  yield d
  shutil.rmtree(d, ignore_errors=True)
