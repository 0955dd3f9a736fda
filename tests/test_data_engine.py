"""The data engine (MR-ranked candidates -> TFDS) and offline DPO on what it writes."""

import jax
import numpy as np
import pytest

from collab_rl.data import engine
from collab_rl.data import loader
from collab_rl.tasks import registry
from collab_rl.trainers import dpo
from experiments import data_engine, dpo_ambig_math

TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1)


def _engine_config(data_dir):
  cfg = data_engine.get_config("runlocal")
  cfg.num_conversations, cfg.batch_size, cfg.candidates, cfg.num_turns = 20, 8, 3, 2
  cfg.reply_tokens, cfg.reward.window, cfg.reward.samples = 6, 1, 2
  cfg.validation_fraction, cfg.data_dir = 0.2, str(data_dir)
  cfg.model.update(TINY_MODEL)
  return cfg


@pytest.fixture(scope="module")
def engine_data(tmp_path_factory):
  root = tmp_path_factory.mktemp("engine")
  cfg = _engine_config(root / "data")
  out = engine.run(cfg, str(root / "work"))
  return cfg, out


def _records(data_dir, split):
  source = loader.data_source(data_dir, engine.NAME, split)
  return [source[i] for i in range(len(source))]


def test_engine_writes_ranked_candidates_and_continues_with_the_best(engine_data):
  cfg, out = engine_data
  task = registry.make_task(cfg.task, cfg.sim.to_dict())
  train, val = _records(cfg.data_dir, "train"), _records(cfg.data_dir, "validation")
  episodes = {s: {int(r["episode_id"]) for r in recs} for s, recs in (("t", train), ("v", val))}
  assert not episodes["t"] & episodes["v"]  # split by conversation
  assert episodes["t"] | episodes["v"] == set(range(cfg.num_conversations))
  assert len(episodes["v"]) == int(cfg.num_conversations * cfg.validation_fraction)
  assert out["final"]["records"] == len(train) + len(val)
  by_turn = {(int(r["episode_id"]), int(r["turn"])): r for r in train + val}
  for (ep, t), r in by_turn.items():
    assert r["candidates"].shape == (cfg.candidates, cfg.reply_tokens)
    assert r["mr"].shape == r["mr_std"].shape == (cfg.candidates,)
    assert np.all((r["candidate_len"] >= 1) & (r["candidate_len"] <= cfg.reply_tokens))
    n = int(r["history_len"])
    assert r["history_tokens"][n - 1] == task.assistant_header_id  # ends with the header
    nxt = by_turn.get((ep, t + 1))
    if nxt is not None:  # the next turn's history continues with this turn's best candidate
      best = int(np.argmax(r["mr"]))
      k = int(r["candidate_len"][best])
      np.testing.assert_array_equal(nxt["history_tokens"][:n], r["history_tokens"][:n])
      np.testing.assert_array_equal(nxt["history_tokens"][n:n + k], r["candidates"][best, :k])
  meta = loader.metadata(cfg.data_dir, engine.NAME)
  assert meta["task"] == cfg.task and meta["candidates"] == cfg.candidates


def _offline_config(data_dir):
  cfg = dpo_ambig_math.get_config("runlocal,source=offline")
  cfg.data_dir, cfg.min_gap = str(data_dir), 0.0
  cfg.batch_size, cfg.eval_batch_size, cfg.num_turns, cfg.reply_tokens = 8, 8, 2, 6
  cfg.reward.window, cfg.num_steps, cfg.eval_every = 1, 3, 3
  cfg.checkpoint.every_steps = 1
  cfg.model.update(TINY_MODEL)
  return cfg


def test_offline_dpo_trains_on_engine_pairs_and_resumes_its_data_position(engine_data, tmp_path):
  cfg = _offline_config(engine_data[0].data_dir)
  whole = dpo.train(cfg, str(tmp_path / "whole"))
  assert whole["final"]["pairs/kept_share"] > 0 and np.isfinite(whole["final"]["loss"])
  dpo.train(cfg, str(tmp_path / "cut"), stop_after=1)
  resumed = dpo.train(cfg, str(tmp_path / "cut"))
  assert resumed["how"] == "resumed step 1"
  # Bit-identical only if the resumed run read the same batches (data position restored).
  for a, b in zip(jax.tree_util.tree_leaves(whole["state"]),
                  jax.tree_util.tree_leaves(resumed["state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_offline_dpo_without_data_or_for_another_task_fails_before_compiling(
    engine_data, tmp_path, compile_counter):
  cfg = _offline_config(tmp_path / "nowhere")
  with compile_counter as counter, pytest.raises(FileNotFoundError, match="nowhere") as err:
    dpo.train(cfg, str(tmp_path / "a"))
  # The pairs are the data engine's output, not something `collab_rl.data prepare` builds.
  assert "experiments/data_engine.py" in str(err.value) and "data prepare" not in str(err.value)
  cfg = _offline_config(engine_data[0].data_dir)
  cfg.task = "doc_edit"
  cfg.model.vocab_size = registry.make_task("doc_edit", cfg.sim.to_dict()).vocab_size
  with compile_counter as counter2, pytest.raises(ValueError, match="made for task 'ambig_math'"):
    dpo.check_config(cfg)
  assert counter.count == 0 and counter2.count == 0
