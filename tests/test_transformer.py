"""Transformer: attention masking and rotary positions against numbers worked out by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collab_rl.models import transformer as tfm

TINY = tfm.TransformerConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             heads=("lm", "value", "reward"))


def test_attention_masks_right_padding_by_hand():
  # One head of width 4 (scale 1/sqrt(4) = 1/2), three positions, the last one padding.
  q = np.zeros((1, 3, 1, 4), np.float32)
  q[0, 1, 0, 0] = 2.0  # query 1 scores key j by k_j[0] * 2 / 2 = k_j[0]
  k = np.zeros((1, 3, 1, 4), np.float32)
  k[0, 1, 0, 0] = math.log(3.0)  # query 1: logits (0, ln 3) -> weights (1/4, 3/4)
  k[0, 2, 0, 0] = 100.0  # the padding key would dominate if it were not masked
  v = np.zeros((1, 3, 1, 4), np.float32)
  v[0, 0, 0] = [4.0, 0.0, 0.0, 0.0]
  v[0, 1, 0] = [0.0, 8.0, 0.0, 0.0]
  v[0, 2, 0] = [0.0, 0.0, 1000.0, 0.0]
  valid = jnp.array([[True, True, False]])
  mask = jnp.tril(jnp.ones((3, 3), bool))[None] & valid[:, None, :]
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # K-major, as attend takes them
  out = np.asarray(tfm.attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask))[0, :, 0]
  np.testing.assert_allclose(out[0], [4.0, 0.0, 0.0, 0.0], atol=1e-6)  # sees only itself
  np.testing.assert_allclose(out[1], [1.0, 6.0, 0.0, 0.0], atol=1e-5)  # 4/4, 3*8/4
  # The padding query (all-zero q): uniform over the two real keys, never the padding one.
  np.testing.assert_allclose(out[2], [2.0, 4.0, 0.0, 0.0], atol=1e-5)


def test_grouped_query_heads_share_kv_like_hugging_face():
  # 4 query heads, 2 kv heads: heads 0,1 read kv head 0 and heads 2,3 read kv head 1
  # (HF's repeat_kv order).
  q = jnp.zeros((1, 1, 4, 2))
  k = jnp.zeros((1, 2, 1, 2))  # [B, K, S, H]
  v = jnp.array([[[[1.0, 1.0]], [[5.0, 5.0]]]])
  out = tfm.attend(q, k, v, jnp.ones((1, 1, 1), bool))[0, 0]
  np.testing.assert_allclose(out, [[1, 1], [1, 1], [5, 5], [5, 5]])


def test_rotary_positions_by_hand():
  # head_dim 4, theta 10000: inverse frequencies (1, 10000^(-1/2) = 0.01).
  cfg = tfm.TransformerConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=1,
                              rope_theta=10_000.0)
  inv_freq = tfm.rope_inv_freq(cfg)
  np.testing.assert_allclose(inv_freq, [1.0, 0.01], rtol=1e-6)
  x = jnp.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])[None, None]  # [1, 1, 2, 4]
  p = 3.0
  out = tfm.apply_rope(jnp.broadcast_to(x, (1, 1, 2, 4)), jnp.array([[p]]), inv_freq)[0, 0]
  # rotate_half pairs (0, 2) and (1, 3): (x0, x2) -> (cos p, sin p); (x1, x3) -> at 0.01 p.
  np.testing.assert_allclose(out[0], [math.cos(p), 0.0, math.sin(p), 0.0], atol=1e-6)
  np.testing.assert_allclose(out[1], [0.0, math.cos(0.01 * p), 0.0, math.sin(0.01 * p)],
                             atol=1e-6)
  # Position 0 is the identity, and scores depend only on the offset between positions.
  np.testing.assert_allclose(tfm.apply_rope(x, jnp.array([[0]]), inv_freq), x, atol=1e-7)
  rng = np.random.default_rng(0)
  qv, kv = (jnp.asarray(rng.normal(size=(1, 1, 1, 4)), jnp.float32) for _ in range(2))
  def score(m, n):
    return float(jnp.sum(tfm.apply_rope(qv, jnp.array([[m]]), inv_freq)
                         * tfm.apply_rope(kv, jnp.array([[n]]), inv_freq)))
  assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)


def test_llama3_rope_scaling_by_hand():
  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
  cfg = tfm.TransformerConfig.from_dict(dict(hidden_size=64, num_attention_heads=2,
                                             num_key_value_heads=1, rope_theta=10_000.0,
                                             rope_scaling=scaling))
  base = 1.0 / 10_000.0 ** (np.arange(0, 32, 2) / 32)
  got = np.asarray(tfm.rope_inv_freq(cfg))
  wavelen = 2 * np.pi / base
  for i, (b, w) in enumerate(zip(base, wavelen)):
    if w < 64 / 4:  # high frequency: unchanged
      assert got[i] == pytest.approx(b, rel=1e-6)
    elif w > 64 / 1:  # low frequency: divided by the factor
      assert got[i] == pytest.approx(b / 8, rel=1e-6)
    else:  # in between: the smooth blend
      s = (64 / w - 1) / (4 - 1)
      assert got[i] == pytest.approx((1 - s) * b / 8 + s * b, rel=1e-5)


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
  cache = tfm.KVCache.init(TINY, 2, 16)
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
