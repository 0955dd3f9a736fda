"""Preemption: SIGKILL the LM training process at random moments, resume, and get the same run.

Every process here is a real `python -m collab_rl.main` on 2 fake CPU devices (or the same entry
point with one planted SIGKILL, `faulty_main.py`). After each kill the next process must resume
from the last checkpoint that is complete on disk (so it loses only the steps since), replay the
lost steps with bit-identical metrics, and the run's final train state must equal, bit for bit,
that of one uninterrupted reference run.

Cost: a process start is ~3 s of imports plus compilation; the processes of one test share a
persistent compilation cache, so only the first compiles. CI kills 3 times, at moments of each
kind (in a step, during an asynchronous save, during evaluation) and at steps drawn from a
seeded RNG; `--reliability-long` adds 10 kills of the unmodified entry point at random wall-clock
moments.
"""

from __future__ import annotations

import json
import random
import signal
import time

import pytest

from training_runs import EVERY, Process, assert_same_run, complete_steps, launch


def expected_start(before_restart: list[int]) -> str:
  """What the next process must do: resume from the last complete checkpoint, if any."""
  return f"resumed step {before_restart[-1]}" if before_restart else "fresh"


def resume_and_check(run_env, workdir, num_steps, fault=None,
                     fault_log=None) -> tuple[Process, int]:
  """Runs the next process to its end (or its planted kill); checks where it started from."""
  before = complete_steps(workdir)
  p = Process(launch(run_env, workdir, num_steps, fault, fault_log))
  rc = p.wait()
  assert p.how() == expected_start(before), (before, "".join(p.lines[-40:]))
  return p, rc


def plan_named_moments(rng: random.Random, num_steps: int, kills: int) -> list[tuple[str, int]]:
  """`kills` (moment, step) pairs at increasing steps: each kill lands after the last resume."""
  plan, low = [], 1
  for i in range(kills):
    moment = ("step", "save", "eval")[i % 3]
    # Saves and evaluations happen every EVERY steps, one of any EVERY consecutive steps.
    window = range(low, min(low + EVERY, num_steps))
    step = rng.choice([s for s in window if moment == "step" or s % EVERY == 0])
    plan.append((moment, step))
    low = step + 1
  return plan


@pytest.mark.parametrize("kills, num_steps", [
    pytest.param(3, 16, id="ci"),
    pytest.param(10, 48, id="long", marks=pytest.mark.reliability_long),
])
def test_sigkill_at_named_moments_then_resume_bit_identical(kills, num_steps, run_env,
                                                            reference_run, tmp_path):
  reference = reference_run(num_steps)
  workdir, fault_log = str(tmp_path / "run"), tmp_path / "faults.jsonl"
  plan = plan_named_moments(random.Random(kills), num_steps, kills)
  for i, (moment, step) in enumerate(plan):
    _, rc = resume_and_check(run_env, workdir, num_steps, f"{moment}:{step}", fault_log)
    assert rc == -signal.SIGKILL, (moment, step)
    seen = [json.loads(line) for line in fault_log.read_text().splitlines()]
    assert len(seen) == i + 1 and seen[-1]["moment"] == moment, seen
    after = complete_steps(workdir)
    assert all(s < step or (moment == "save" and s == step) for s in after), (moment, step, after)
    if moment == "save":  # it died with the save started and not yet committed
      assert seen[-1]["in_flight"], seen[-1]
  p, rc = resume_and_check(run_env, workdir, num_steps)
  assert rc == 0, "".join(p.lines[-40:])
  assert_same_run(reference, workdir, num_steps)


@pytest.mark.reliability_long
def test_sigkill_at_random_wall_clock_moments_then_resume_bit_identical(run_env, reference_run,
                                                                        tmp_path):
  num_steps, kills, rng = 48, 10, random.Random(2026)
  reference = reference_run(num_steps)
  workdir, killed = str(tmp_path / "run"), 0
  for _ in range(kills):
    before = complete_steps(workdir)
    p = Process(launch(run_env, workdir, num_steps))
    assert p.started.wait(timeout=240)
    time.sleep(rng.uniform(0.0, 2.0))  # after the restore: compile, steps, saves, evaluations
    if p.proc.poll() is None:
      p.proc.send_signal(signal.SIGKILL)
      killed += 1
    rc = p.wait()
    assert p.how() == expected_start(before), before
    if rc == 0:  # it finished before the kill landed
      break
    assert rc == -signal.SIGKILL
  if complete_steps(workdir)[-1:] != [num_steps]:
    p, rc = resume_and_check(run_env, workdir, num_steps)
    assert rc == 0, "".join(p.lines[-40:])
  assert killed >= kills // 2, killed
  assert_same_run(reference, workdir, num_steps)
