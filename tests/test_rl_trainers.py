"""PPO and online DPO end to end at toy size: they run, log, checkpoint, resume and check configs.

Whether they raise the reward from an SFT base is measured by the experiments, not here (a
meaningful run takes minutes on 2 cores).
"""

import jax
import numpy as np
import pytest

from collab_rl.trainers import dpo, ppo
from experiments import dpo_ambig_math, ppo_ambig_math


def _tiny(cfg):
  cfg.batch_size = 8
  cfg.eval_batch = 8
  cfg.turns = 2
  cfg.reply_tokens = 6
  cfg.reward.window = 1
  cfg.reward.samples = 2
  cfg.num_iterations = 2
  cfg.eval_every = 2
  cfg.checkpoint.every_iterations = 1
  return cfg


def test_ppo_runs_resumes_and_logs(tmp_path):
  cfg = _tiny(ppo_ambig_math.get_config("runlocal"))
  cfg.ppo.minibatches = 1
  first = ppo.train(cfg, str(tmp_path / "run"), stop_after=1)
  assert int(first["state"].step) == cfg.ppo.epochs  # one iteration of `epochs` minibatch steps
  out = ppo.train(cfg, str(tmp_path / "run"))
  assert out["how"] == "resumed step 1"
  final = out["final"]
  for key in ("loss", "kl_ref", "value_loss", "clip_fraction", "eval/score",
              "eval/ask_answer_macro_f1", "episode/tokens_read", "reward/per_turn"):
    assert np.isfinite(final[key]), key
  assert int(out["state"].step) == 2 * cfg.ppo.epochs


def test_dpo_runs(tmp_path):
  cfg = _tiny(dpo_ambig_math.get_config("runlocal"))
  out = dpo.train(cfg, str(tmp_path / "run"))
  for key in ("loss", "mr/mean", "pairs/kept_share", "eval/score"):
    assert np.isfinite(out["final"][key]), key
  leaves = jax.tree_util.tree_leaves(out["state"].params)
  assert all(np.isfinite(np.asarray(x)).all() for x in leaves)


@pytest.mark.parametrize("field, value, match", [
    ("reward.kind", "vibes", "reward.kind"),
    ("reward.window", 3, "longer than the turn budget"),
    ("model.vocab_size", 40, "must equal the vocabulary"),
    ("batch_size", 12, "multiple of the data-parallel size"),
])
def test_ppo_bad_config_fails_before_compiling(field, value, match, tmp_path, compile_counter):
  cfg = _tiny(ppo_ambig_math.get_config("runlocal"))
  node = cfg
  *path, last = field.split(".")
  for p in path:
    node = node[p]
  node[last] = value
  with compile_counter as counter, pytest.raises(ValueError, match=match):
    ppo.train(cfg, str(tmp_path / "bad"))
  assert counter.count == 0
