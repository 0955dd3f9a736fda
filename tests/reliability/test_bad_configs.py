"""Bad configs: each kind fails with an error naming its field, before compiling or writing.

Configs are parsed exactly as `collab_rl.main` parses them (a config file, `--config.x=v`
overrides, locked against new fields) and handed to the trainer `config.trainer` names, in this
process, so that the compilation counter sees everything. The one-line CLI rendering of parse
errors is checked in tests/test_main.py.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np
import pytest

from collab_rl import checkpoint as ckpt_lib
from collab_rl import config_names
from collab_rl import main as main_lib
from collab_rl import sharding as sharding_lib
from collab_rl.trainers import lm

# ml_collections loads config files with importlib's deprecated load_module.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LM, PPO = "experiments/lm_synthetic.py:runlocal", "experiments/ppo_ambig_math.py:runlocal"
SFT, DPO = "experiments/sft_base.py:runlocal", "experiments/dpo_ambig_math.py:runlocal"
SIM = "experiments/sim_sft.py:runlocal"
# Keeps a config that wrongly passes its checks from training for long.
SHORT = {LM: "--config.num_steps=2", PPO: "--config.num_steps=1",
         SFT: "--config.num_steps=2", DPO: "--config.num_steps=1", SIM: "--config.num_steps=2"}


def load_config(spec: str, overrides: list[str]):
  """What `python -m collab_rl.main --config=SPEC OVERRIDES...` parses, on a private FlagValues."""
  argv = ["main", f"--config={os.path.join(ROOT, spec)}", *overrides]
  config_names.check_overrides(argv)  # main's parse_flags does this first
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


def set_rules(rules):
  def edit(config):  # list fields cannot be overridden on the command line
    config.partition_rules = rules
  return edit


@dataclasses.dataclass(frozen=True)
class Kind:
  config: str
  overrides: tuple[str, ...]
  match: str  # regex the error must match: it names the field
  edit: Callable | None = None
  resume_from: str | None = None  # a checkpoint directory copied into the workdir first


KINDS = {
    # Parsing.
    "unknown_field": Kind(LM, ("--config.no_such_field=1",), "no_such_field"),
    "misspelled_nested_field": Kind(LM, ("--config.model.hidden_sizes=64",),
                                    'hidden_sizes.*Did you mean "hidden_size"'),
    "wrong_type": Kind(LM, ("--config.batch_size=many",), "config.batch_size=many"),
    "float_for_int": Kind(LM, ("--config.num_steps=2.5",), "config.num_steps=2.5"),
    "unknown_trainer": Kind(LM, ("--config.trainer=ppo_v9",), "config.trainer='ppo_v9'"),
    # Zero and negative sizes.
    "zero_steps": Kind(LM, ("--config.num_steps=0",), "config.num_steps must be positive"),
    "negative_seq_len": Kind(LM, ("--config.seq_len=-4",), "config.seq_len must be positive"),
    "zero_eval_interval": Kind(LM, ("--config.eval_every=0",), "config.eval_every must be"),
    "zero_vocab": Kind(LM, ("--config.model.vocab_size=0",), "config.model.vocab_size must be"),
    "zero_width": Kind(LM, ("--config.model.hidden_size=0",), "config.model.hidden_size must be"),
    "zero_mlp_width": Kind(LM, ("--config.model.intermediate_size=0",),
                           "config.model.intermediate_size must be"),
    "negative_layers": Kind(LM, ("--config.model.num_hidden_layers=-1",),
                            "config.model.num_hidden_layers must be"),
    "zero_heads": Kind(LM, ("--config.model.num_attention_heads=0",),
                       "config.model.num_attention_heads must be"),
    "negative_batch": Kind(LM, ("--config.batch_size=-8",), "batch_size=-8 must be a positive"),
    "zero_checkpoint_interval": Kind(LM, ("--config.checkpoint.every_steps=0",),
                                     "config.checkpoint.every_steps must be >= 1"),
    "keeps_no_checkpoint": Kind(LM, ("--config.checkpoint.max_to_keep=0",),
                                "config.checkpoint.max_to_keep must be >= 1"),
    "zero_branching": Kind(LM, ("--config.corpus.branching=0",), "config.corpus.branching=0"),
    "negative_learning_rate": Kind(LM, ("--config.optimizer.learning_rate=-0.1",),
                                   "config.optimizer.learning_rate must be >= 0"),
    # Shapes that do not fit each other.
    "heads_not_grouped": Kind(LM, ("--config.model.num_key_value_heads=3",),
                              "num_key_value_heads=3"),
    "odd_head_dim": Kind(LM, ("--config.model.hidden_size=36",), "head dimension 9"),
    "unknown_dtype": Kind(LM, ("--config.model.dtype=float17",), "dtype='float17'"),
    "positions_shorter_than_sequence": Kind(LM, ("--config.model.max_position_embeddings=8",),
                                            "config.model.max_position_embeddings=8 < "),
    "record_too_short": Kind(LM, ("--config.corpus.min_len=1",), "config.corpus.min_len=1"),
    "corpus_smaller_than_batch": Kind(LM, ("--config.corpus.num_records=4",),
                                      "config.corpus.num_records=4 leaves 2 validation"),
    "batch_vs_mesh": Kind(LM, ("--config.batch_size=12",),
                          "batch_size=12 must be a positive multiple of the data-parallel size 8"),
    "mesh_larger_than_devices": Kind(LM, ("--config.mesh_shape=(4, 4, 1)",),
                                     "needs 16 devices, but only 8"),
    "mesh_wrong_rank": Kind(LM, ("--config.mesh_shape=(8, 1)",), "must have 3 entries"),
    "mesh_vs_param_shape": Kind(LM, ("--config.mesh_shape=(1, 1, 8)",
                                     "--config.model.intermediate_size=60"),
                                r"down_proj/kernel of shape \(60, 64\): dim 60 is not divisible "
                                "by mesh axis 'model'"),
    "bad_partition_regex": Kind(LM, (), r"config.partition_rules: bad regex '\(embed'",
                                edit=set_rules([("(embed", (None,))])),
    "unknown_mesh_axis_in_rule": Kind(LM, (), r"unknown mesh axes \['nope'\]",
                                      edit=set_rules([("embed", ("nope",))])),
    # Checkpoints to start from.
    "missing_init_from": Kind(LM, ("--config.init_from=/nonexistent/run/checkpoints",),
                              "init_from='/nonexistent/run/checkpoints': the path does not exist"),
    "init_from_a_step_directory": Kind(LM, ("--config.init_from={other}/1",), "give its parent"),
    "init_from_other_shape": Kind(LM, ("--config.init_from={other}",),
                                  r"embed_tokens/embedding: checkpoint has shape \(128, 96\), "
                                  r"expected \(128, 64\)"),
    "resume_other_shape": Kind(LM, (), r"embed_tokens/embedding: checkpoint has shape \(128, 96\)",
                               resume_from="{other}"),
    # The conversation trainers.
    "window_longer_than_turns": Kind(PPO, ("--config.reward.window=5",), "window"),
    "vocab_not_the_task's": Kind(PPO, ("--config.model.vocab_size=40",),
                                 "config.model.vocab_size=40 must equal the vocabulary"),
    "unknown_reward": Kind(PPO, ("--config.reward.kind=vibes",), "config.reward.kind='vibes'"),
    "minibatches_vs_batch": Kind(PPO, ("--config.ppo.minibatches=3",), "ppo.minibatches=3"),
    "conversation_longer_than_max_len": Kind(SFT, ("--config.max_len=8",),
                                             "config.max_len=8 cannot hold"),
    "context_turns_past_turns": Kind(DPO, ("--config.context_turns=9",),
                                     "config.context_turns=9"),
    "eval_batch_not_batches": Kind(SIM, ("--config.eval_batch_size=20",),
                                   "eval_batch_size=20 must be a multiple of config.batch_size"),
    # Older names (collab_rl/config_names.py): on the command line, in a config file.
    "old_name_on_the_command_line": Kind(PPO, ("--config.num_iterations=1",),
                                         "config.num_iterations was renamed config.num_steps"),
    "old_nested_name": Kind(DPO, ("--config.dpo.min_gap=0.2",),
                            "config.dpo.min_gap was renamed config.min_gap"),
    "old_name_in_a_config_file": Kind(PPO, (), "config.turns was renamed config.num_turns",
                                      edit=lambda c: old_turns(c)),
}


def old_turns(config):
  """A config file written before the rename: `turns`, no `num_turns`."""
  with config.unlocked():
    config.turns = config.num_turns
    del config["num_turns"]


@pytest.fixture(scope="module")
def other_shape_checkpoints(tmp_path_factory) -> str:
  """A finished LM checkpoint (step 1) of width 96, where the runlocal config has 64.

  Zeros in the layout `lm.build` describes, saved without running anything: no compilation.
  """
  config = load_config(LM, ["--config.model.hidden_size=96"])
  built = lm.build(config, sharding_lib.make_mesh(config.mesh_shape))
  state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), built.abstract)
  path = str(tmp_path_factory.mktemp("other_shape") / "checkpoints")
  with ckpt_lib.Checkpointer(path, async_save=False) as ckpt:
    ckpt.save(1, state, config=config)
  return path


def snapshot(root) -> dict[str, tuple[int, int]]:
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      out[os.path.relpath(path, root)] = (os.path.getsize(path), os.stat(path).st_mtime_ns)
  return out


@pytest.mark.parametrize("name", sorted(KINDS))
def test_bad_config_names_its_field_before_compiling_and_writes_nothing(
    name, tmp_path, compile_counter, other_shape_checkpoints):
  kind = KINDS[name]
  fill = lambda s: s.format(other=other_shape_checkpoints)
  workdir = tmp_path / "workdir"
  if kind.resume_from:
    os.makedirs(workdir)
    os.symlink(fill(kind.resume_from), workdir / "checkpoints")  # read, never written
  before = snapshot(tmp_path), snapshot(other_shape_checkpoints)
  with compile_counter as counter:
    with pytest.raises((ValueError, AttributeError, flags.Error)) as err:
      config = load_config(kind.config, [SHORT[kind.config], *map(fill, kind.overrides)])
      if kind.edit:
        kind.edit(config)
      config_names.check(config)  # as main does with the parsed config
      main_lib.entry_point(config.trainer)(config, str(workdir))
  assert re.search(kind.match, str(err.value)), str(err.value)
  assert counter.count == 0
  assert (snapshot(tmp_path), snapshot(other_shape_checkpoints)) == before
  assert kind.resume_from or not workdir.exists()
