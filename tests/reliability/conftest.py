"""Reliability suite set-up: the long variants run with `--reliability-long` or RELIABILITY_LONG=1.

The flag is registered here, so it is known when the command line names this directory
(`python -m pytest tests/reliability --reliability-long`); from the repository root, where only
`tests/conftest.py` is read before parsing, use the environment variable instead.
"""

import os

import pytest


def pytest_addoption(parser):
  parser.addoption("--reliability-long", action="store_true", default=False,
                   help="also run the long reliability variants (e.g. 10 SIGKILLs, not 3)")


def _long_requested(config) -> bool:
  flag = config.getoption("--reliability-long", default=False)
  return bool(flag) or os.environ.get("RELIABILITY_LONG", "") not in ("", "0")


def pytest_configure(config):
  config.addinivalue_line("markers", "reliability_long: a long reliability variant (off in CI)")


def pytest_collection_modifyitems(config, items):
  if _long_requested(config):
    return
  skip = pytest.mark.skip(reason="long variant: pass --reliability-long or set RELIABILITY_LONG=1")
  for item in items:
    if "reliability_long" in item.keywords:
      item.add_marker(skip)


@pytest.fixture(scope="session")
def run_env(tmp_path_factory) -> dict[str, str]:
  """Environment of the training processes: 2 CPU devices, one shared compilation cache."""
  import training_runs  # pylint: disable=g-import-not-at-top  (imports JAX)
  return training_runs.process_env(str(tmp_path_factory.mktemp("jit_cache")))


@pytest.fixture(scope="session")
def reference_run(run_env, tmp_path_factory):
  """`reference_run(num_steps)`: the workdir of one uninterrupted run, made on first use."""
  import training_runs  # pylint: disable=g-import-not-at-top
  made = {}

  def get(num_steps: int) -> str:
    if num_steps not in made:
      workdir = str(tmp_path_factory.mktemp(f"reference_{num_steps}"))
      p = training_runs.Process(training_runs.launch(run_env, workdir, num_steps))
      assert p.wait() == 0, "".join(p.lines[-40:])
      assert p.how() == "fresh" and training_runs.complete_steps(workdir)[-1] == num_steps
      made[num_steps] = workdir
    return made[num_steps]

  return get
