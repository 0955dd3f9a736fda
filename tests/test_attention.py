"""Attention masking, grouped-query heads and rotary positions, against numbers worked by hand."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from collab_rl.models import attention
from collab_rl.models.config import TransformerConfig


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
  out = np.asarray(attention.attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask))[0, :, 0]
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
  out = attention.attend(q, k, v, jnp.ones((1, 1, 1), bool))[0, 0]
  np.testing.assert_allclose(out, [[1, 1], [1, 1], [5, 5], [5, 5]])


def test_rotary_positions_by_hand():
  # head_dim 4, theta 10000: inverse frequencies (1, 10000^(-1/2) = 0.01).
  cfg = TransformerConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=1,
                          rope_theta=10_000.0)
  inv_freq = attention.rope_inv_freq(cfg)
  np.testing.assert_allclose(inv_freq, [1.0, 0.01], rtol=1e-6)
  x = jnp.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])[None, None]  # [1, 1, 2, 4]
  p = 3.0
  out = attention.apply_rope(jnp.broadcast_to(x, (1, 1, 2, 4)), jnp.array([[p]]), inv_freq)[0, 0]
  # rotate_half pairs (0, 2) and (1, 3): (x0, x2) -> (cos p, sin p); (x1, x3) -> at 0.01 p.
  np.testing.assert_allclose(out[0], [math.cos(p), 0.0, math.sin(p), 0.0], atol=1e-6)
  np.testing.assert_allclose(out[1], [0.0, math.cos(0.01 * p), 0.0, math.sin(0.01 * p)],
                             atol=1e-6)
  # Position 0 is the identity, and scores depend only on the offset between positions.
  np.testing.assert_allclose(attention.apply_rope(x, jnp.array([[0]]), inv_freq), x, atol=1e-7)
  rng = np.random.default_rng(0)
  qv, kv = (jnp.asarray(rng.normal(size=(1, 1, 1, 4)), jnp.float32) for _ in range(2))
  def score(m, n):
    return float(jnp.sum(attention.apply_rope(qv, jnp.array([[m]]), inv_freq)
                         * attention.apply_rope(kv, jnp.array([[n]]), inv_freq)))
  assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)


def test_llama3_rope_scaling_by_hand():
  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
  cfg = TransformerConfig.from_dict(dict(hidden_size=64, num_attention_heads=2,
                                         num_key_value_heads=1, rope_theta=10_000.0,
                                         rope_scaling=scaling))
  base = 1.0 / 10_000.0 ** (np.arange(0, 32, 2) / 32)
  got = np.asarray(attention.rope_inv_freq(cfg))
  wavelen = 2 * np.pi / base
  for i, (b, w) in enumerate(zip(base, wavelen)):
    if w < 64 / 4:  # high frequency: unchanged
      assert got[i] == pytest.approx(b, rel=1e-6)
    elif w > 64 / 1:  # low frequency: divided by the factor
      assert got[i] == pytest.approx(b / 8, rel=1e-6)
    else:  # in between: the smooth blend
      s = (64 / w - 1) / (4 - 1)
      assert got[i] == pytest.approx((1 - s) * b / 8 + s * b, rel=1e-5)
