"""One set of config names (collab_rl/config_names.py): every config uses it, older names fail
with their new one, and checkpoints saved under older names read under the new ones."""

from __future__ import annotations

import importlib

import ml_collections
import numpy as np
import pytest

from collab_rl import checkpoint as ckpt_lib
from collab_rl import config_names
from collab_rl import restore as restore_lib
from experiments import collab_arms

# Every experiment config with a trainer, as `module:arg`.
CONFIGS = ["lm_synthetic:runlocal", "sft_base:runlocal", "ppo_ambig_math:runlocal",
           "dpo_ambig_math:runlocal", "dpo_ambig_math:source=offline", "data_engine:runlocal",
           "mediator:runlocal", "sim_sft:runlocal", "reward_model:runlocal"]


def _config(spec: str) -> ml_collections.ConfigDict:
  module, _, arg = spec.partition(":")
  return importlib.import_module(f"experiments.{module}").get_config(arg or None)


def _keys(tree, prefix=""):
  for k, v in tree.items():
    yield prefix + k
    if isinstance(v, ml_collections.ConfigDict):
      yield from _keys(v, prefix + k + ".")


@pytest.mark.parametrize("spec", CONFIGS + [f"collab_arms:arm={a}" for a in collab_arms.ARMS])
def test_every_config_uses_todays_names(spec):
  config = _config(spec)
  config_names.check(config)  # no older name anywhere
  keys = set(_keys(config))
  if "checkpoint" in keys:
    assert "checkpoint.every_steps" in keys
  if config.trainer != "data_engine":  # a job that plays conversations, not a run of steps
    assert {"num_steps", "eval_every"} <= keys
  if config.trainer != "data_engine":  # where a run's params start: a run, or an HF folder
    assert {"init_from", "init_from_hf"} <= keys
  if config.trainer != "lm":  # every conversation config: a task name and its user beside it
    assert isinstance(config.task, str) and "sim" in keys


def test_an_sft_base_and_the_rl_arm_that_starts_from_it_read_alike():
  base = collab_arms.get_config("arm=sft_base,task=doc_edit")
  rl = collab_arms.get_config("arm=ppo_mr_w2,task=doc_edit")
  shared = {"task", "sim", "model", "num_turns", "num_steps", "eval_every", "eval_batch_size",
            "log_every", "batch_size", "checkpoint", "init_from", "seed", "mesh_shape"}
  assert shared <= set(base.keys()) and shared <= set(rl.keys())
  assert (base.task, base.sim.to_dict(), base.model.to_dict()) == (
      rl.task, rl.sim.to_dict(), rl.model.to_dict())
  assert set(base.checkpoint.keys()) == set(rl.checkpoint.keys())


@pytest.mark.parametrize("old", sorted(config_names.RENAMED))
def test_an_older_name_fails_naming_the_new_one(old):
  new = config_names.RENAMED[old][0]
  with pytest.raises(ValueError, match=f"config.{old} was renamed config.{new}"):
    config_names.check_overrides(["main", "--config=x.py", f"--config.{old}=1"])
  tree: dict = {}
  node = tree
  *parents, leaf = old.split(".")
  for p in parents:
    node = node.setdefault(p, {})
  node[leaf] = 1
  with pytest.raises(ValueError, match=f"config.{old} was renamed"):
    config_names.check(ml_collections.ConfigDict(tree))


def test_todays_names_and_lookalikes_pass():
  config_names.check_overrides(["--config.num_turns=3", "--config.context_turns=1",
                                "--config.dpo.beta=0.1", "--config.task=doc_edit",
                                "--config.sim.sharded=True", "--workdir=/tmp/turns"])
  config_names.check(_config("ppo_ambig_math:runlocal"))


def test_a_config_saved_under_older_names_reads_under_the_new_ones(tmp_path):
  old = {"trainer": "dpo", "task": {"name": "ambig_math", "sim": {"sharded": False}},
         "turns": 4, "num_iterations": 60, "eval_batch": 64, "batch_size": 32,
         "checkpoint": {"every_iterations": 20, "max_to_keep": 3},
         "dpo": {"beta": 0.1, "candidates": 4, "min_gap": 0.1, "data_dir": "d"}}
  with ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False) as ckpt:
    ckpt.save(1, {"w": np.zeros(2, np.float32)}, config=old)
  got = restore_lib.read_config(str(tmp_path / "ck"))
  assert got == {"trainer": "dpo", "task": "ambig_math", "sim": {"sharded": False},
                 "num_turns": 4, "num_steps": 60, "eval_batch_size": 64, "batch_size": 32,
                 "checkpoint": {"every_steps": 20, "max_to_keep": 3},
                 "dpo": {"beta": 0.1}, "candidates": 4, "min_gap": 0.1, "data_dir": "d"}
  config_names.check(ml_collections.ConfigDict(got))
  assert old["turns"] == 4 and "name" in old["task"]  # the input is left as it was
  # eval_batches counted batches of batch_size; eval_batch_size counts examples.
  assert config_names.upgrade({"eval_batches": 4, "batch_size": 32})["eval_batch_size"] == 128
