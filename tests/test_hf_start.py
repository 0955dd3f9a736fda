"""A run that starts from a Hugging Face folder (`config.init_from_hf`): the folder's config.json
sets the architecture, its weights the params and the RL reference, heads it lacks start fresh;
bad folders fail before anything compiles."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from collab_rl import restore as restore_lib
from collab_rl import run_rl
from collab_rl import sharding as sharding_lib
from collab_rl.models import hf, transformer
from experiments import ppo_ambig_math

# Not the PPO config's own model (width 64, 2 layers): the folder must decide.
HF_MODEL = transformer.TransformerConfig(
    vocab_size=37, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, rope_theta=5e4)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  model = transformer.Transformer(HF_MODEL)
  params = transformer.init_params(model, jax.random.key(7))
  folder = tmp_path_factory.mktemp("hf") / "tiny_llama"
  hf.save_pretrained(model, params, folder)
  return str(folder), params


def _config(folder: str):
  cfg = ppo_ambig_math.get_config("runlocal")
  cfg.init_from_hf = folder
  cfg.batch_size = cfg.eval_batch_size = 8
  return cfg


def _flat(params):
  return {sharding_lib.path_str(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_ppo_starts_from_the_folder_with_a_fresh_value_head(hf_folder, tmp_path):
  folder, hf_params = hf_folder
  cfg = _config(folder)
  task, mcfg, mesh, rcfg = run_rl.check_common(cfg)
  assert (mcfg.hidden_size, mcfg.num_hidden_layers, mcfg.rope_theta) == (32, 1, 5e4)
  assert mcfg.heads == ("lm", "value")  # the run's heads, not the checkpoint's
  setup = run_rl.build(cfg, str(tmp_path / "run"), task, mesh, rcfg)
  assert setup.how == f"init_from_hf {folder}"
  want, state, ref = _flat(hf_params), _flat(setup.state.params), _flat(setup.ref_params)
  assert set(want) < set(state) == set(ref)
  assert any("value_head" in k for k in set(state) - set(want))
  for k in want:
    np.testing.assert_array_equal(state[k], want[k], err_msg=k)
    np.testing.assert_array_equal(ref[k], want[k], err_msg=k)
  # The state and the reference do not share buffers: the update donates the state.
  leaf = "embed_tokens/embedding"
  a = next(x for p, x in jax.tree_util.tree_flatten_with_path(setup.state.params)[0]
           if sharding_lib.path_str(p) == leaf)
  b = next(x for p, x in jax.tree_util.tree_flatten_with_path(setup.ref_params)[0]
           if sharding_lib.path_str(p) == leaf)
  ptr = lambda x: [s.data.unsafe_buffer_pointer() for s in x.addressable_shards]
  assert not set(ptr(a)) & set(ptr(b))
  # The checkpoint's config carries the folder's architecture, so evaluate rebuilds this model.
  setup.checkpointer.save(1, setup.state, config=setup.config, force=True)
  setup.close()
  saved = restore_lib.read_config(str(tmp_path / "run" / "checkpoints"))
  assert saved["model"]["hidden_size"] == 32 and saved["init_from_hf"] == folder


def test_bad_hf_starts_fail_before_anything_compiles(hf_folder, tmp_path, compile_counter):
  folder, _ = hf_folder
  with compile_counter as counter:
    cfg = _config(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="init_from_hf=.*nowhere.*no config.json"):
      run_rl.check_common(cfg)
    cfg = _config(folder)
    cfg.init_from = folder
    with pytest.raises(ValueError, match="config.init_from=.* and config.init_from_hf=.* both"):
      run_rl.check_common(cfg)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps(
        {**json.load(open(f"{folder}/config.json")), "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="odd/config.json: unsupported architecture"):
      run_rl.check_common(_config(str(odd)))
    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_text(json.dumps(
        {**json.load(open(f"{folder}/config.json")), "vocab_size": 40}))
    with pytest.raises(ValueError, match="vocab_size=40 must equal the vocabulary"):
      run_rl.check_common(_config(str(big)))
  assert counter.count == 0
