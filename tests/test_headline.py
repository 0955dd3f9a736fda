"""The headline sweep's scheduler: parallel runs wait for what they need, failures propagate;
the interactivity-weight sweep's commands and plot."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tqdm

from experiments import headline, headline_sweep


def _job(root, task_seed, arm, code="pass", partner=None):
  """A stand-in run: records its start and end times, then runs `code`. With `partner` (another
  job's directory) it waits, up to 60 s, for that job to have started before it ends, so two
  partners finish only if they ran at the same time, however loaded the machine is."""
  d = os.path.join(root, task_seed, arm)
  wait = "" if partner is None else (
      f"t0=time.time()\nwhile not os.path.exists(os.path.join({partner!r}, 'start')) "
      f"and time.time() - t0 < 60: time.sleep(0.05)\n")
  script = (f"import os,time\nopen(os.path.join({d!r}, 'start'), 'w').write(repr(time.time()))\n"
            f"time.sleep(0.3)\n{wait}{code}\n"
            f"open(os.path.join({d!r}, 'end'), 'w').write(repr(time.time()))")
  return d, [sys.executable, "-c", script]


def _t(d, what):
  with open(os.path.join(d, what)) as f:
    return float(f.read())


def test_parallel_runs_respect_dependencies_and_skip_after_a_failed_base(tmp_path):
  root = str(tmp_path)
  a = lambda arm: os.path.join(root, "a/seed0", arm)
  jobs = [_job(root, "a/seed0", "sft_base"),
          _job(root, "a/seed0", "ppo_ext", partner=a("data_engine")),
          _job(root, "a/seed0", "data_engine", partner=a("ppo_ext")),
          _job(root, "a/seed0", "dpo_offline"),
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
  jobs = [_job(root, "a/seed0", "sft_base", partner=os.path.join(root, "b/seed1/sft_base")),
          _job(root, "a/seed1", "sft_base"),
          _job(root, "a/seed0", "ppo_ext", code="raise SystemExit(1)"),
          _job(root, "a/seed1", "ppo_ext", code="assert os.environ['COLLAB_RL_MARK'] == 'x'"),
          _job(root, "b/seed1", "sft_base", partner=os.path.join(root, "a/seed0/sft_base"))]
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
  # Seeds added later: a (task, arm) with a finished run has its programs in the cache, so its
  # new seeds wait for nothing.
  more = [_job(root, f"a/seed{s}", arm) for arm in ("sft_base", "mediator") for s in (2, 3)]
  # An arm none of whose runs has finished still waits for its first seed.
  assert headline.warm_first(jobs + more) == {more[3][0]: more[2][0]}


def test_sweep_runs_every_rl_arm_per_value_from_one_base():
  sweep = headline_sweep.parse("w_int=0,0.25,1.0")
  assert sweep == headline_sweep.Sweep("w_int", "reward.w_int", ("0", "0.25", "1.0"))
  jobs = headline.commands("/r", ["ambig_math", "doc_edit"], ["0", "1"],
                           ["sft_base", "ppo_ext_int", "ppo_mr_w2", "mediator"], "small",
                           overrides=["--config.reward.w_int=0.7"], sweep=sweep)
  dirs = [d for d, _ in jobs]
  points = [f"{arm}@w_int={v}" for arm in ("ppo_ext_int", "ppo_mr_w2") for v in sweep.values]
  assert dirs[:8] == [f"/r/ambig_math/seed0/{n}" for n in ["sft_base", *points, "mediator"]]
  assert len(dirs) == 4 * 8 and len(set(dirs)) == len(dirs)
  argv = dict(jobs)["/r/doc_edit/seed1/ppo_mr_w2@w_int=0.25"]
  assert "--config=experiments/collab_arms.py:arm=ppo_mr_w2,task=doc_edit,seed=1,size=small" in argv
  assert "--config.init_from=/r/doc_edit/seed1/sft_base/checkpoints" in argv
  assert argv[-1] == "--config.reward.w_int=0.25"  # after --override, so the sweep's value wins
  assert not any("w_int" in a for a in dict(jobs)["/r/doc_edit/seed1/mediator"])
  assert headline.needs("/r/doc_edit/seed1/ppo_mr_w2@w_int=0.25") == [
      "/r/doc_edit/seed1/sft_base"]
  with pytest.raises(ValueError, match="none of --arms"):
    headline.commands("/r", ["ambig_math"], ["0"], ["sft_base", "mediator"], "small",
                      sweep=sweep)
  with pytest.raises(ValueError, match="'reward.w_intt' is not in arm ppo_ext_int"):
    headline.commands("/r", ["ambig_math"], ["0"], ["ppo_ext_int"], "small",
                      sweep=headline_sweep.parse("reward.w_intt=0,1"))
  for bad in ("w_int", "w_int=0,0", "w_int=0,a/b", "=1"):
    with pytest.raises(ValueError, match="--sweep"):
      headline_sweep.parse(bad)


def test_print_only_shows_the_sweep_commands():
  out = subprocess.run(
      [sys.executable, "-m", "experiments.headline", "--print_only", "--workdir", "/r",
       "--arms", "sft_base,ppo_ext_int", "--sweep", "w_int=0,0.1"],
      capture_output=True, text=True, check=True, cwd=os.path.dirname(os.path.dirname(
          os.path.abspath(__file__)))).stdout.splitlines()
  assert len(out) == 3
  assert out[1].endswith("--config.reward.w_int=0") and "ppo_ext_int@w_int=0 " in out[1]
  assert out[2].endswith("--config.reward.w_int=0.1")


def _row(score, ask, seeds=3, guess=None):
  stat = lambda v: {"mean": v, "ci": 0.05 if seeds > 1 else float("nan")}
  per_seed = [{"score_ambiguous": {"mean": g, "ci": 0.1}} for g in (guess or [])]
  return {"over_seeds": {"score": stat(score), "ask_when_ambiguous": stat(ask), "seeds": seeds},
          "per_seed": per_seed}


def test_sweep_plot_from_a_results_dict(tmp_path):
  results = {"t:sft_base": _row(0.6, 0.0, guess=[0.3, 0.4]),
             "t:ppo_ext_int[w_int=0.5]": _row(0.8, 1.0),
             "t:ppo_ext_int[w_int=0]": _row(0.6, 0.0),
             "t:ppo_ext_int[w_int=0.1]": _row(0.6, 0.0, seeds=1),
             "t:ppo_ext_int[w_int=0.1]@noisy": _row(0.1, 0.1),  # another user: not a point
             "t:ppo_mr_w2[w_int=0]": _row(0.85, 1.0),
             "t:ppo_ext_int": _row(0.8, 1.0),  # no sweep value: not a point
             "u:ppo_mr_w2[w_int=1.0]": _row(0.9, 1.0)}
  pts = headline_sweep.points(results, "w_int")
  assert set(pts) == {"t", "u"} and set(pts["t"]["arms"]) == {"ppo_ext_int", "ppo_mr_w2"}
  assert pts["t"]["arms"]["ppo_ext_int"]["ask_when_ambiguous"][0] == [0.0, 0.0, 0.05]
  assert [x for x, _, _ in pts["t"]["arms"]["ppo_ext_int"]["score"]] == [0.0, 0.1, 0.5]
  assert pts["t"]["guess"] == pytest.approx(0.35) and np.isnan(pts["u"]["guess"])
  paths = headline_sweep.write(results, "w_int", str(tmp_path))
  assert paths == [str(tmp_path / "plots" / f"{t}_w_int_sweep.png") for t in ("t", "u")]
  assert all(os.path.getsize(p) > 0 for p in paths)
  with open(tmp_path / "w_int_sweep.json") as f:
    assert json.load(f)["t"]["guess_per_seed"] == [0.3, 0.4]
  assert headline_sweep.points(results, "w_ext") == {}


def test_sweep_guess_value_from_a_one_turn_evaluation(tmp_path):
  """The vertical line is the first reply's value where a 1-turn evaluation is given."""
  results = {"t:sft_base": _row(0.6, 0.0, guess=[0.5, 0.7]),
             "t:ppo_mr_w2[w_int=0]": _row(0.85, 1.0)}
  one_turn = {"t:sft_base": _row(0.2, 0.0, guess=[0.1, 0.2])}
  assert headline_sweep.points(results, "w_int")["t"]["guess"] == pytest.approx(0.6)
  assert headline_sweep.points(results, "w_int", one_turn)["t"]["guess"] == pytest.approx(0.15)
  path = tmp_path / "guess.json"
  path.write_text(json.dumps({"results": one_turn}))
  assert headline_sweep.read_results(str(path)) == one_turn
  path.write_text("{}")
  with pytest.raises(SystemExit, match="guess.json: not an evaluation"):
    headline_sweep.read_results(str(path))
