"""Parity of models/hf.py with Hugging Face transformers on tiny random Llama / Qwen2 checkpoints.

Checkpoints are built with transformers at test time (once per module), in fp32, with weights
larger than the default init so that greedy decoding has clear argmax margins.
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from collab_rl import sampling, sharding  # noqa: E402
from collab_rl.models import hf  # noqa: E402

SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
             bos_token_id=None, eos_token_id=None, pad_token_id=None)
# With head_dim 16 and theta 5e5 the wavelengths (6.3, 33, 170, ...) hit all three llama3 regimes:
# kept (< 64 / 4), blended, divided by `factor` (> 64 / 1).
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
KINDS = ("llama", "llama3_tied", "qwen2")


def _hf_model(kind: str):
  if kind == "qwen2":
    cfg = transformers.Qwen2Config(rope_theta=1e6, rms_norm_eps=1e-5, **SIZES)
    model = transformers.Qwen2ForCausalLM(cfg)
  elif kind == "llama3_tied":
    cfg = transformers.LlamaConfig(rope_theta=500_000.0, rope_scaling=dict(LLAMA3_ROPE),
                                   tie_word_embeddings=True, **SIZES)
    model = transformers.LlamaForCausalLM(cfg)
  else:
    cfg = transformers.LlamaConfig(**SIZES)
    model = transformers.LlamaForCausalLM(cfg)
  # transformers zero-inits biases and sets norms to one: randomize them so the mapping shows.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias"):
        p.normal_(0.0, 0.2)
      elif "norm" in name:
        p.normal_(1.0, 0.1)
  return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  torch.manual_seed(0)
  out = {}
  for kind in KINDS:
    folder = tmp_path_factory.mktemp(kind)
    model = _hf_model(kind)
    model.save_pretrained(folder)
    out[kind] = (folder, model)
  return out


@pytest.fixture(scope="module")
def tokens_BxL():
  return np.random.RandomState(0).randint(0, SIZES["vocab_size"], (2, 24)).astype(np.int32)


def _hf_logits(model, tokens_BxL) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens_BxL, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module")
def loaded(checkpoints, tokens_BxL):
  """kind -> (model, params, our logits), loaded on one device."""
  out = {}
  for kind, (folder, _) in checkpoints.items():
    model, params = hf.load_pretrained(folder)
    logits = jax.jit(model.apply)({"params": params}, tokens_BxL).logits_BxLxV
    out[kind] = (model, params, np.asarray(logits))
  return out


# ------------------------------------------------------------------------------------------------
# Parity.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(kind, checkpoints, loaded, tokens_BxL):
  model, params, logits_BxLxV = loaded[kind]
  assert model.cfg.tie_word_embeddings == (kind == "llama3_tied")
  assert model.cfg.attention_bias == (kind == "qwen2")
  assert ("lm_head" in params) != model.cfg.tie_word_embeddings
  ref = _hf_logits(checkpoints[kind][1], tokens_BxL)
  np.testing.assert_allclose(logits_BxLxV, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_matches_transformers(kind, checkpoints, loaded):
  model, params, _ = loaded[kind]
  rng = np.random.RandomState(1)
  prompts = [rng.randint(0, SIZES["vocab_size"], n) for n in (5, 9)]
  prompt_BxL = np.zeros((2, 9), np.int32)  # right-padded, as the sampler expects
  for row, prompt in enumerate(prompts):
    prompt_BxL[row, :len(prompt)] = prompt
  sample = sampling.make_sampler(model, sampling.SamplingConfig(max_new_tokens=32, greedy=True))
  out = sample(params, prompt_BxL, np.array([5, 9], np.int32), jax.random.key(0))
  for row, prompt in enumerate(prompts):
    ids = checkpoints[kind][1].generate(torch.tensor(prompt[None]), max_new_tokens=32,
                                        do_sample=False, attention_mask=torch.ones(1, len(prompt)))
    np.testing.assert_array_equal(np.asarray(out.tokens_BxN[row]), ids[0, len(prompt):].numpy())


@pytest.mark.parametrize("kind", ["llama3_tied", "qwen2"])
def test_save_pretrained_loads_in_transformers(kind, checkpoints, loaded, tokens_BxL, tmp_path):
  model, params, _ = loaded[kind]
  hf.save_pretrained(model, params, tmp_path)
  cls = type(checkpoints[kind][1])
  reloaded = cls.from_pretrained(tmp_path).eval()
  np.testing.assert_array_equal(_hf_logits(reloaded, tokens_BxL),
                                _hf_logits(checkpoints[kind][1], tokens_BxL))
  # And back: our loader reads what we wrote, bit for bit.
  _, again = hf.load_pretrained(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_save_pretrained_bfloat16(checkpoints, tmp_path):
  folder, ref = checkpoints["qwen2"]
  model, params = hf.load_pretrained(folder, dtype="bfloat16")
  assert model.cfg.param_dtype == "bfloat16"
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  hf.save_pretrained(model, params, tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
  reloaded = type(ref).from_pretrained(tmp_path)
  assert reloaded.dtype == torch.bfloat16
  for name, p in ref.state_dict().items():
    torch.testing.assert_close(reloaded.state_dict()[name], p.to(torch.bfloat16), rtol=0, atol=0)
  model2, _ = hf.load_pretrained(tmp_path)  # dtype=None keeps the checkpoint's
  assert model2.cfg.dtype == "bfloat16"


def test_mesh_loading_matches_one_device(checkpoints, loaded, tokens_BxL):
  mesh = sharding.make_mesh((1, 2, 4))
  model, params = hf.load_pretrained(checkpoints["qwen2"][0], mesh=mesh)
  want = sharding.param_shardings(params, mesh)
  for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
  q = params["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert q.addressable_shards[0].data.shape == (32, 16)  # fsdp=2 x model=4 of (64, 64)
  logits = jax.jit(model.apply)({"params": params}, tokens_BxL).logits_BxLxV
  np.testing.assert_allclose(np.asarray(logits), loaded["qwen2"][2], atol=1e-4, rtol=0)


def test_sharded_safetensors_with_index(checkpoints, loaded, tmp_path):
  checkpoints["llama"][1].save_pretrained(tmp_path, max_shard_size="40KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
  _, params = hf.load_pretrained(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, params, loaded["llama"][1])


# ------------------------------------------------------------------------------------------------
# Configs.
# ------------------------------------------------------------------------------------------------


def test_reads_old_and_new_config_keys(checkpoints):
  new = json.loads((checkpoints["llama3_tied"][0] / "config.json").read_text())
  assert "rope_parameters" in new  # what transformers 5 writes
  old = {k: v for k, v in new.items() if k not in ("rope_parameters", "dtype")}
  old.update(rope_theta=500_000.0, rope_scaling={"type": "llama3", **{
      k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}}, torch_dtype="bfloat16")
  cfg_new, cfg_old = hf.config_from_hf(new), hf.config_from_hf(old)
  assert cfg_old.dtype == "bfloat16"
  assert cfg_new == cfg_old.__class__(**{**cfg_old.__dict__, "dtype": "float32",
                                         "param_dtype": "float32"})
  assert dict(cfg_new.rope_scaling) == LLAMA3_ROPE and cfg_new.rope_theta == 500_000.0


@pytest.mark.parametrize("kind", KINDS)
def test_config_roundtrip(kind, loaded):
  cfg = loaded[kind][0].cfg
  assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg


# ------------------------------------------------------------------------------------------------
# Errors name the culprit.
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def broken(checkpoints, tmp_path):
  """A writable copy of the Llama checkpoint and its tensors."""
  shutil.copytree(checkpoints["llama"][0], tmp_path, dirs_exist_ok=True)
  return tmp_path, load_file(tmp_path / "model.safetensors")


def _rewrite(folder: pathlib.Path, tensors: dict) -> None:
  save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_unsupported_architecture(broken):
  folder, _ = broken
  config = json.loads((folder / "config.json").read_text())
  config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"config\.json.*GPT2LMHeadModel"):
    hf.load_pretrained(folder)


def test_missing_tensor(broken):
  folder, tensors = broken
  del tensors["model.layers.1.mlp.up_proj.weight"]
  _rewrite(folder, tensors)
  with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
    hf.load_pretrained(folder)


def test_extra_tensor(broken):
  folder, tensors = broken
  tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)  # ignored
  _rewrite(folder, tensors)
  with pytest.raises(ValueError, match=r"o_proj\.bias \(in .*model\.safetensors\)") as err:
    hf.load_pretrained(folder)
  assert "inv_freq" not in str(err.value)


def test_shape_mismatch(broken):
  folder, tensors = broken
  tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
  _rewrite(folder, tensors)
  culprit = r"model\.safetensors: tensor model\.layers\.0\.self_attn\.k_proj\.weight"
  with pytest.raises(ValueError, match=culprit + r" has shape \(16, 64\), expected \(32, 64\)"):
    hf.load_pretrained(folder)


def test_inv_freq_buffers_are_ignored(broken, loaded):
  folder, tensors = broken
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
  _rewrite(folder, tensors)
  _, params = hf.load_pretrained(folder)
  jax.tree.map(np.testing.assert_array_equal, params, loaded["llama"][1])
