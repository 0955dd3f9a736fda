"""Transformer: padding, the KV cache, dtypes, heads and config checks.

Attention and rotary positions by hand are in tests/test_attention.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collab_rl.models import attention
from collab_rl.models import transformer as tfm

TINY = tfm.TransformerConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             heads=("lm", "value", "reward"))


@pytest.fixture(scope="module")
def model_and_params():
  model = tfm.Transformer(TINY)
  return model, tfm.init_params(model, jax.random.key(0))


def test_padding_content_does_not_change_real_positions(model_and_params):
  model, params = model_and_params
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 1, 64)
  lengths = jnp.array([5, 8])
  valid = jnp.arange(8)[None] < lengths[:, None]
  other = jnp.where(valid, tokens, 7)  # different padding tokens
  a = model.apply({"params": params}, tokens, valid_BxL=valid)
  b = model.apply({"params": params}, other, valid_BxL=valid)
  np.testing.assert_allclose(a.logits_BxLxV[0, :5], b.logits_BxLxV[0, :5], atol=1e-6)
  np.testing.assert_allclose(a.value_BxL[0, :5], b.value_BxL[0, :5], atol=1e-6)
  # And a row's real logits equal those of the same row run alone without padding.
  alone = model.apply({"params": params}, tokens[:1, :5])
  np.testing.assert_allclose(a.logits_BxLxV[0, :5], alone.logits_BxLxV[0], atol=1e-5)
  assert a.logits_BxLxV.shape == (2, 8, 64)
  assert a.value_BxL.shape == a.reward_BxL.shape == (2, 8)


def test_incremental_decode_with_cache_matches_full_forward(model_and_params):
  model, params = model_and_params
  tokens = jax.random.randint(jax.random.key(2), (2, 10), 1, 64)
  full = model.apply({"params": params}, tokens).logits_BxLxV
  cache = attention.KVCache.init(TINY, 2, 16)
  out = model.apply({"params": params}, tokens[:, :6], cache=cache)
  chunks = [out.logits_BxLxV]
  for t in range(6, 10):
    out = model.apply({"params": params}, tokens[:, t:t + 1], positions_BxL=jnp.full((2, 1), t),
                      cache=out.cache)
    chunks.append(out.logits_BxLxV)
  np.testing.assert_allclose(jnp.concatenate(chunks, 1), full, atol=1e-5)


def test_bf16_compute_keeps_fp32_params_and_logits():
  cfg = tfm.TransformerConfig(**{**TINY.__dict__, "dtype": "bfloat16"})
  model = tfm.Transformer(cfg)
  params = tfm.init_params(model, jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  out = model.apply({"params": params}, jnp.ones((1, 4), jnp.int32))
  assert out.logits_BxLxV.dtype == jnp.float32 and out.hidden_BxLxD.dtype == jnp.bfloat16


def test_tied_embeddings_and_qkv_bias_params():
  cfg = tfm.TransformerConfig(**{**TINY.__dict__, "tie_word_embeddings": True,
                                 "attention_bias": True, "heads": ("lm",)})
  params = tfm.init_params(tfm.Transformer(cfg), jax.random.key(0))
  assert "lm_head" not in params
  attn = params["layers_0"]["self_attn"]
  assert {"bias"} <= set(attn["q_proj"]) and "bias" not in attn["o_proj"]


@pytest.mark.parametrize("bad, match", [
    (dict(num_attention_heads=4, num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(hidden_size=30, num_attention_heads=4), "set head_dim"),
    (dict(heads=("lm", "critic")), "unknown heads"),
    (dict(dtype="float16"), "dtype"),
])
def test_bad_model_config(bad, match):
  with pytest.raises(ValueError, match=match):
    tfm.TransformerConfig(**bad)


def test_unknown_model_field_named():
  with pytest.raises(ValueError, match="hidden_sise"):
    tfm.TransformerConfig.from_dict({"hidden_sise": 3})


def test_causal_query_chunks_match_one_block(model_and_params):
  model, params = model_and_params
  chunked = tfm.Transformer(tfm.TransformerConfig(**{**TINY.__dict__, "causal_query_chunk": 4}))
  whole = tfm.Transformer(tfm.TransformerConfig(**{**TINY.__dict__, "causal_query_chunk": 0}))
  tokens = jax.random.randint(jax.random.key(3), (2, 16), 1, 64)
  valid = jnp.arange(16)[None] < jnp.array([[11], [16]])
  a = chunked.apply({"params": params}, tokens, valid_BxL=valid).logits_BxLxV
  b = whole.apply({"params": params}, tokens, valid_BxL=valid).logits_BxLxV
  np.testing.assert_allclose(a, b, atol=1e-5)
