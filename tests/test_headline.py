"""The headline sweep's scheduler: parallel runs wait for what they need, failures propagate."""

import os
import sys

import tqdm

from experiments import headline


def _job(root, task_seed, arm, code="pass"):
  """A stand-in run: records its start and end times, then runs `code`."""
  d = os.path.join(root, task_seed, arm)
  script = (f"import os,time; open(os.path.join({d!r}, 'start'), 'w').write(repr(time.time()));"
            f"time.sleep(0.3); {code};"
            f"open(os.path.join({d!r}, 'end'), 'w').write(repr(time.time()))")
  return d, [sys.executable, "-c", script]


def _t(d, what):
  with open(os.path.join(d, what)) as f:
    return float(f.read())


def test_parallel_runs_respect_dependencies_and_skip_after_a_failed_base(tmp_path):
  root = str(tmp_path)
  jobs = [_job(root, "a/seed0", "sft_base"), _job(root, "a/seed0", "ppo_ext"),
          _job(root, "a/seed0", "data_engine"), _job(root, "a/seed0", "dpo_offline"),
          _job(root, "b/seed0", "sft_base", code="raise SystemExit(3)"),
          _job(root, "b/seed0", "ppo_ext")]
  bar = tqdm.tqdm(total=len(jobs), disable=True)
  failed = headline.run_all(jobs, 2, bar)
  assert sorted(failed) == sorted([jobs[4][0], jobs[5][0]])
  base, ppo, engine, offline = (j[0] for j in jobs[:4])
  for d in (base, ppo, engine, offline):
    assert os.path.exists(os.path.join(d, "DONE")), d
  assert _t(ppo, "start") >= _t(base, "end") and _t(engine, "start") >= _t(base, "end")
  assert _t(offline, "start") >= _t(engine, "end")
  assert not os.path.exists(os.path.join(jobs[5][0], "start"))  # never started
  # Two at a time: the ppo and engine runs overlapped.
  assert _t(ppo, "start") < _t(engine, "end") and _t(engine, "start") < _t(ppo, "end")
  # Finished runs are not repeated.
  assert headline.run_all(jobs[:4], 2, bar) == []
  assert _t(base, "start") < _t(ppo, "start")


def test_later_seeds_wait_for_the_first_seed_of_their_arm_even_when_it_fails(tmp_path):
  root = str(tmp_path)
  jobs = [_job(root, "a/seed0", "sft_base"), _job(root, "a/seed1", "sft_base"),
          _job(root, "a/seed0", "ppo_ext", code="raise SystemExit(1)"),
          _job(root, "a/seed1", "ppo_ext", code="assert os.environ['COLLAB_RL_MARK'] == 'x'"),
          _job(root, "b/seed1", "sft_base")]
  after = headline.warm_first(jobs)
  s0, s1, e0, e1, b1 = (j[0] for j in jobs)
  # Per (task, arm): task b's seed 1 is its first seed, so it waits for nothing.
  assert after == {s1: s0, e1: e0}
  bar = tqdm.tqdm(total=len(jobs), disable=True)
  env = dict(os.environ, COLLAB_RL_MARK="x")  # children get this environment
  failed = headline.run_all(jobs, 2, bar, env=env, after=after)
  assert failed == [e0]
  assert _t(s1, "start") >= _t(s0, "end") and _t(e1, "start") >= _t(s1, "end")
  assert os.path.exists(os.path.join(e1, "DONE"))  # ran although the first seed failed
  assert _t(b1, "start") < _t(s0, "end")  # another task's base ran beside the first
