"""collab_rl.evaluate on real (tiny) runs, and the headline sweep's command plan."""

import json
import os

import numpy as np
import pytest

from collab_rl import eval_users, evaluate
from collab_rl import restore as restore_lib
from collab_rl.tasks import registry
from collab_rl.trainers import sft
from experiments import collab_arms, headline


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two seeds of a 5-step SFT 'arm' in the sweep's layout."""
  root = tmp_path_factory.mktemp("runs")
  for seed in (0, 1):
    cfg = collab_arms.get_config(f"arm=sft_base,seed={seed}")
    cfg.num_steps, cfg.eval_every, cfg.log_every = 5, 5, 5
    cfg.eval_batch_size = cfg.batch_size = 16
    cfg.model.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    sft.train(cfg, str(root / "ambig_math" / f"seed{seed}" / "sft_base"))
  return root


def test_evaluate_writes_tables_intervals_plots_and_samples(runs, tmp_path):
  found = evaluate.find_runs(str(runs))
  assert [(arm, seed) for _, arm, seed in found] == [("sft_base", 0), ("sft_base", 1)]
  results = evaluate.evaluate_runs(found, str(tmp_path), episodes=32, turns=3, batch=16,
                                   baselines=["oracle"])
  # The base once more with the instruction on every request: the Proactive Base.
  assert set(results) == {"ambig_math:sft_base", "ambig_math:proactive_base", "ambig_math:oracle"}
  oracle = results["ambig_math:oracle"]["over_seeds"]
  assert oracle["score"]["mean"] == 1.0 and oracle["ask_answer_macro_f1"]["mean"] == 1.0
  base = results["ambig_math:sft_base"]
  assert base["over_seeds"]["seeds"] == 2 and len(base["per_seed"]) == 2
  for metric in evaluate.METRICS:
    seed_means = [s[metric]["mean"] for s in base["per_seed"]]
    # nan_ok: a base that never asks has no score after asking.
    assert base["over_seeds"][metric]["mean"] == pytest.approx(np.mean(seed_means), nan_ok=True)
  assert base["per_seed"][0]["episodes"] == 32
  on_disk = json.load(open(tmp_path / "results.json"))
  assert on_disk["settings"]["split"] == "test"
  assert on_disk["settings"]["warnings"] == []  # as the runs' own evaluations found
  table = open(tmp_path / "results.md").read().splitlines()
  assert len(table) == 5 and all(line.count("|") == len(evaluate.METRICS) + 4 for line in table)
  for name in ("plots/ambig_math_bars.png", "plots/ambig_math_reward_curves.png",
               "samples/ambig_math_sft_base.txt", "samples/ambig_math_proactive_base.txt"):
    assert os.path.getsize(tmp_path / name) > 0, name
  assert "<user>" in open(tmp_path / "samples/ambig_math_sft_base.txt").read()
  assert "<user> clarify calc" in open(tmp_path / "samples/ambig_math_proactive_base.txt").read()


def test_runs_linked_into_a_sweep_are_found(runs, tmp_path):
  seed_dir = tmp_path / "ambig_math" / "seed0"
  seed_dir.mkdir(parents=True)
  os.symlink(runs / "ambig_math" / "seed0" / "sft_base", seed_dir / "sft_base")
  # A sweep point's directory names its row with the swept value, not a user (`@`).
  os.symlink(runs / "ambig_math" / "seed0" / "sft_base", seed_dir / "ppo_mr_w2@w_int=0.1")
  found = evaluate.find_runs(str(tmp_path))
  assert [(arm, seed) for _, arm, seed in found] == [("ppo_mr_w2[w_int=0.1]", 0),
                                                      ("sft_base", 0)]
  assert [r for r, _ in evaluate.rows_of("ppo_mr_w2[w_int=0.1]", ["reactive", "sharded"])] == [
      "ppo_mr_w2[w_int=0.1]", "ppo_mr_w2[w_int=0.1]@sharded"]
  # Every user plays every row: a next-turn arm's loss against the sharded user is measured too.
  assert [r for r, _ in evaluate.rows_of("ppo_ext", ["reactive", "sharded", "noisy"])] == [
      "ppo_ext", "ppo_ext@sharded", "ppo_ext@noisy"]


def test_relative_run_directories(runs, monkeypatch):
  monkeypatch.chdir(runs)
  task, _, params, _, config = evaluate.load_policy("ambig_math/seed0/sft_base", 2)
  assert task.name == config["task"] == "ambig_math" and params
  assert restore_lib.read_config("ambig_math/seed1/sft_base/checkpoints")["seed"] == 1
  found = evaluate.find_runs(".")
  assert [d for d, _, _ in found] == [str(runs / "ambig_math" / f"seed{s}" / "sft_base")
                                      for s in (0, 1)]


def test_users_other_than_the_training_one(runs, tmp_path):
  """Every row against the users asked for, each on episodes its own settings sampled."""
  # Two users, each a compile per row: the ad-hoc one covers noise and the fresh episodes.
  users = eval_users.resolve(["missing3"], ["hard:noise_wrong=0.5;source=fresh"])
  run = [r for r in evaluate.find_runs(str(runs)) if r[2] == 0]
  results = evaluate.evaluate_runs(run, str(tmp_path), episodes=16, turns=2, batch=16,
                                   users=users)
  assert set(results) == {f"ambig_math:{row}@{user}" for row in ("sft_base", "proactive_base")
                          for user in ("missing3", "hard")}
  per_seed = results["ambig_math:sft_base@missing3"]["per_seed"][0]
  assert per_seed["episodes"] == 16 and 0 <= per_seed["score_ambiguous"]["mean"] <= 1
  settings = json.load(open(tmp_path / "results.json"))["settings"]
  assert settings["users"]["hard"] == {"sim": {"noise_wrong": 0.5}, "source": "fresh"}
  assert "| ambig_math | sft_base@missing3 | 1 |" in open(tmp_path / "results.md").read()
  assert "<user>" in open(tmp_path / "samples" / "ambig_math_proactive_base@hard.txt").read()


def test_user_definitions_and_their_episodes():
  config = {"task": "ambig_math", "sim": collab_arms.get_config("arm=sft_base").sim.to_dict()}
  assert eval_users.named("amb0.2").sim == {"ambiguous_rate": 0.2}
  assert eval_users.sim_for(eval_users.named("missing7"), config) == {
      "min_missing": 5, "max_missing": 5}  # clipped to ambig_math's 5 slots
  assert eval_users.sim_for(eval_users.named("fresh"), config) == {}  # the training user
  mixed = {**config, "sim": {**config["sim"], "mixture": "reactive,noisy"}}
  assert eval_users.sim_for(eval_users.named("sharded"), mixed) == {"sharded": True,
                                                                     "mixture": ""}
  with pytest.raises(ValueError, match="min_missing <= max_missing"):
    eval_users.sim_for(eval_users.parse_custom("few:min_missing=3"), config)
  with pytest.raises(ValueError, match="unknown field 'noise'.*noise_wrong"):
    eval_users.parse_custom("x:noise=0.3")
  with pytest.raises(ValueError, match="sharded='maybe' is not a bool"):
    eval_users.parse_custom("x:sharded=maybe")
  with pytest.raises(ValueError, match="is a named user already"):
    eval_users.parse_custom("noisy:noise_wrong=0.3")
  with pytest.raises(ValueError, match="expected name:field=value"):
    eval_users.parse_custom("noise_wrong=0.3")
  with pytest.raises(ValueError, match="--users: unknown user 'lost'.*fresh"):
    eval_users.resolve(["lost"])
  # A user's episodes: the test split's keys sampled with its settings.
  n, base = 64, registry.make_task("ambig_math")
  test = eval_users.intents(base, n)
  for name in ("amb0.8", "missing3"):
    task = registry.make_task("ambig_math", eval_users.named(name).sim)
    other = eval_users.intents(task, n)
    np.testing.assert_array_equal(other.values_BxK, test.values_BxK)
    if name == "amb0.8":
      assert other.ambiguous_B.sum() > test.ambiguous_B.sum()
      assert np.all(other.ambiguous_B[test.ambiguous_B])  # the same uniforms, a higher rate
    else:
      np.testing.assert_array_equal(other.ambiguous_B, test.ambiguous_B)
      assert np.all(other.missing_BxK.sum(1)[other.ambiguous_B] == 3)
  fresh = eval_users.intents(base, n, "fresh")
  assert not np.array_equal(fresh.values_BxK, test.values_BxK)
  np.testing.assert_array_equal(fresh.values_BxK, eval_users.intents(base, n, "fresh").values_BxK)


def test_a_score_far_from_the_runs_own_evaluation_is_flagged(tmp_path):
  run = tmp_path / "seed0" / "ppo_ext"
  run.mkdir(parents=True)
  assert evaluate.own_score(str(run)) is None and evaluate.check_against_run(str(run), 0.1) is None
  rows = [{"step": 0, "eval/score": 0.5}, {"step": 10, "loss": 1.0},
          {"step": 20, "eval/score": 0.9}, {"step": 20, "eval/score": float("nan")}]
  (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert evaluate.own_score(str(run)) == 0.9  # the last finite one
  assert evaluate.check_against_run(str(run), 0.8) is None
  warning = evaluate.check_against_run(str(run), 0.07)
  assert str(run) in warning and "0.070" in warning and "0.900" in warning
  sft_run = tmp_path / "seed0" / "sft_base"  # SFT logs its greedy evaluation as `score`
  sft_run.mkdir()
  (sft_run / "metrics.jsonl").write_text(json.dumps({"step": 5, "score": 0.6}) + "\n")
  assert evaluate.own_score(str(sft_run)) == 0.6


def test_merge_joins_per_seed_evaluations(tmp_path):
  """Per-seed results.json (evaluations run in parallel) merge into the over-seed comparison;
  the scripted baselines, identical in every file, count once."""
  def summary(score):
    return {**{k: {"mean": score, "ci": 0.01} for k in evaluate.METRICS}, "episodes": 8}

  paths = []
  for seed, score in enumerate((0.5, 0.7, 0.9)):
    d = tmp_path / f"seed{seed}"
    d.mkdir()
    # Seed 1's evaluation flagged a run; seed 0's file predates warnings (no key).
    settings = {"episodes": 8, "turns": 4, "split": "test",
                **({"warnings": ["seed1/ppo_mr_w2: test score"]} if seed == 1 else {}),
                **({"warnings": []} if seed == 2 else {})}
    with open(d / "results.json", "w") as f:
      json.dump({"settings": settings, "results": {
          "t:ppo_mr_w2": {"per_seed": [summary(score)]},
          "t:oracle": {"per_seed": [summary(1.0)]}}}, f)
    paths.append(str(d / "results.json"))
  merged = evaluate.merge(paths, str(tmp_path / "all"))
  mr = merged["t:ppo_mr_w2"]["over_seeds"]
  assert mr["seeds"] == 3 and mr["score"]["mean"] == pytest.approx(0.7)
  assert mr["score"]["ci"] == pytest.approx(4.303 * 0.2 / np.sqrt(3))  # t(0.975, 2), sd 0.2
  assert merged["t:oracle"]["over_seeds"]["seeds"] == 1
  md = open(tmp_path / "all" / "results.md").read()
  assert "| t | ppo_mr_w2 | 3 | 0.700 ±" in md and "> warning: seed1/ppo_mr_w2" in md
  with open(tmp_path / "all" / "results.json") as f:
    assert json.load(f)["settings"]["warnings"] == ["seed1/ppo_mr_w2: test score"]
  with open(tmp_path / "seed2" / "results.json") as f:
    other = json.load(f)
  other["settings"]["episodes"] = 16
  with open(tmp_path / "seed2" / "results.json", "w") as f:
    json.dump(other, f)
  with pytest.raises(ValueError, match="16 episodes per run"):
    evaluate.merge(paths)


def test_same_episodes_for_every_arm():
  task = registry.make_task("ambig_math")
  a, b = evaluate.test_intents(task, 40), evaluate.test_intents(task, 40)
  np.testing.assert_array_equal(a.values_BxK, b.values_BxK)


def test_headline_plan_runs_the_base_first_and_the_engine_before_offline_dpo():
  jobs = headline.commands("/r", ["ambig_math"], ["0", "1"],
                           ["dpo_offline", "ppo_mr_w2", "data_engine"], "small")
  names = [d.split("/")[-1] for d, _ in jobs]
  assert names == ["sft_base", "ppo_mr_w2", "data_engine", "dpo_offline"] * 2
  offline = dict(jobs)["/r/ambig_math/seed1/dpo_offline"]
  assert "--config.init_from=/r/ambig_math/seed1/sft_base/checkpoints" in offline
  assert "--config.data_dir=/r/ambig_math/seed1/data_engine/data" in offline
  with pytest.raises(ValueError, match="add data_engine"):
    headline.commands("/r", ["ambig_math"], ["0"], ["dpo_offline"], "small")
  with pytest.raises(ValueError, match="unknown arms"):
    headline.commands("/r", ["ambig_math"], ["0"], ["ppo_vibes"], "small")
  mediator = dict(headline.commands("/r", ["ambig_math"], ["0"], ["mediator"], "small"))
  assert {"--config.init_from=/r/ambig_math/seed0/sft_base/checkpoints",
          "--config.assistant_from=/r/ambig_math/seed0/sft_base/checkpoints"} <= set(
              mediator["/r/ambig_math/seed0/mediator"])


def test_every_arm_config_builds_for_every_task():
  for task in collab_arms.TASKS:
    models = {collab_arms.get_config(f"arm={arm},task={task}").model.to_json()
              for arm in collab_arms.ARMS}
    assert len(models) == 1  # init_from restores the base strictly into every arm
