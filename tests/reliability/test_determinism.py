"""Determinism: the same seed gives the same run twice, in fresh processes.

Elsewhere: the same dataset built twice is byte-identical (tests/reliability/test_bad_data.py::
test_the_same_dataset_built_twice_is_byte_identical); 1 device and 8 agree to float tolerance
(tests/test_lm_trainer.py::test_one_device_equals_eight_devices); resuming in the same process
is bit-identical (tests/test_lm_trainer.py::test_resume_is_bit_identical).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from training_runs import Process, assert_same_run, launch, read_state


def run_to_end(run_env, workdir, num_steps, *extra_args) -> str:
  p = Process(launch(run_env, workdir, num_steps, extra_args=extra_args))
  assert p.wait() == 0, "".join(p.lines[-40:])
  return workdir


def test_same_seed_in_two_fresh_processes_is_bit_identical(run_env, reference_run, tmp_path):
  assert_same_run(reference_run(16), run_to_end(run_env, str(tmp_path / "again"), 16), 16)


@pytest.mark.reliability_long
def test_another_seed_gives_another_run(run_env, reference_run, tmp_path):
  """The equality above is not vacuous: one seed apart, no parameter is the same."""
  other = run_to_end(run_env, str(tmp_path / "seed1"), 16, "--config.seed=1")
  same = jax.tree.map(np.array_equal, read_state(reference_run(16), 16)["params"],
                      read_state(other, 16)["params"])
  assert not any(jax.tree.leaves(same))
