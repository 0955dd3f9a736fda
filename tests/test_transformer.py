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


def run(model, params, tokens_BxL, **kwargs):
  """`model.apply` jitted: one compile costs less than running the layers op by op."""
  return jax.jit(model.apply)({"params": params}, tokens_BxL, **kwargs)


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
  a = run(model, params, tokens, valid_BxL=valid)
  b = run(model, params, other, valid_BxL=valid)
  np.testing.assert_allclose(a.logits_BxLxV[0, :5], b.logits_BxLxV[0, :5], atol=1e-6)
  np.testing.assert_allclose(a.value_BxL[0, :5], b.value_BxL[0, :5], atol=1e-6)
  # And a row's real logits equal those of the same row run alone without padding.
  alone = run(model, params, tokens[:1, :5])
  np.testing.assert_allclose(a.logits_BxLxV[0, :5], alone.logits_BxLxV[0], atol=1e-5)
  assert a.logits_BxLxV.shape == (2, 8, 64)
  assert a.value_BxL.shape == a.reward_BxL.shape == (2, 8)


@pytest.mark.parametrize("buckets", [1, 3, 4])
def test_incremental_decode_with_cache_matches_full_forward(model_and_params, buckets):
  # Cache 16: with 4 buckets (widths 4, 8, 12, 16) the steps fill 6..10 slots, across the
  # boundary at 8; 3 buckets give uneven widths (6, 11, 16); 1 reads the whole cache.
  model, params = model_and_params
  model = tfm.Transformer(tfm.TransformerConfig(**{**TINY.__dict__, "cache_buckets": buckets}))
  tokens = jax.random.randint(jax.random.key(2), (2, 10), 1, 64)
  full = run(model, params, tokens).logits_BxLxV
  apply = jax.jit(lambda tokens, positions, cache: model.apply(
      {"params": params}, tokens, positions_BxL=positions, cache=cache))
  out = apply(tokens[:, :6], jnp.broadcast_to(jnp.arange(6), (2, 6)),
              attention.KVCache.init(model.cfg, 2, 16))
  chunks = [out.logits_BxLxV]
  for t in range(6, 10):
    out = apply(tokens[:, t:t + 1], jnp.full((2, 1), t), out.cache)
    chunks.append(out.logits_BxLxV)
  np.testing.assert_allclose(jnp.concatenate(chunks, 1), full, atol=1e-5)


def test_a_prefill_attended_in_query_chunks_equals_all_at_once(model_and_params):
  """cache_query_chunk = 4: a 10-token prefill into the cache is attended 4 queries at a time
  (the last slice padded); the logits and the cache it writes equal those of all 10 at once."""
  model, params = model_and_params
  tokens = jax.random.randint(jax.random.key(3), (2, 10), 1, 64)
  valid = jnp.arange(10)[None] < jnp.array([[7], [10]])
  outs = []
  for chunk in (0, 4):
    cfg = tfm.TransformerConfig(**{**TINY.__dict__, "cache_query_chunk": chunk})
    outs.append(run(tfm.Transformer(cfg), params, tokens, valid_BxL=valid,
                    cache=attention.KVCache.init(cfg, 2, 16)))
  np.testing.assert_allclose(outs[1].logits_BxLxV, outs[0].logits_BxLxV, atol=1e-6)
  jax.tree_util.tree_map(np.testing.assert_array_equal, outs[1].cache, outs[0].cache)


def test_decode_reads_only_the_filled_prefix_of_the_cache(model_and_params):
  """Garbage in slots past the bucket that holds the filled part cannot reach the output, while
  the same garbage in a slot the bucket reads would (were it not masked): the switch picks the
  narrowest prefix, checked by its output with every unread slot poisoned with NaN."""
  model, params = model_and_params
  model = tfm.Transformer(tfm.TransformerConfig(**{**TINY.__dict__, "cache_buckets": 4}))
  tokens = jax.random.randint(jax.random.key(4), (2, 5), 1, 64)
  clean = run(model, params, tokens, cache=attention.KVCache.init(model.cfg, 2, 16))
  # 5 slots filled: the bucket of width 8 holds them; slots 8.. are never read, so NaN there
  # changes nothing. In a slot that is read, a NaN value makes the output NaN although the slot is
  # masked (its weight is 0, and 0 * NaN is NaN): the whole-cache reading shows it.
  poison = lambda x, axis: x.at[(slice(None),) * axis + (slice(8, None),)].set(jnp.nan)
  cache = clean.cache.replace(k=tuple(poison(k, 3) for k in clean.cache.k),
                              v=tuple(poison(v, 2) for v in clean.cache.v))
  step = run(model, params, tokens[:, :1], positions_BxL=jnp.full((2, 1), 5),
                     cache=cache)
  assert np.isfinite(np.asarray(step.logits_BxLxV)).all()
  whole = tfm.Transformer(tfm.TransformerConfig(**{**TINY.__dict__, "cache_buckets": 1}))
  step_whole = run(whole, params, tokens[:, :1], positions_BxL=jnp.full((2, 1), 5),
                           cache=cache)
  assert np.isnan(np.asarray(step_whole.logits_BxLxV)).all()


def test_bf16_compute_keeps_fp32_params_and_logits():
  cfg = tfm.TransformerConfig(**{**TINY.__dict__, "dtype": "bfloat16"})
  model = tfm.Transformer(cfg)
  params = tfm.init_params(model, jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  out = run(model, params, jnp.ones((1, 4), jnp.int32))
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
    (dict(cache_buckets=0), "cache_buckets"),
    (dict(cache_query_chunk=-1), "cache_query_chunk"),
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
  a = run(chunked, params, tokens, valid_BxL=valid).logits_BxLxV
  b = run(whole, params, tokens, valid_BxL=valid).logits_BxLxV
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_attention_recompute_matches_autodiff():
  """The custom backward (`attention_recompute`) gives autodiff's loss and gradients, padding
  rows included (their outputs are in the loss; row 1's first two queries see no valid key),
  over causal query chunks of growing key widths (5, 10, 15, then a last chunk of one query
  against all 16), under remat and scan (one case: each extra compile costs the suite seconds)."""
  extra = dict(causal_query_chunk=5, remat=True, scan_layers=True)
  cfgs = [tfm.TransformerConfig(**{**TINY.__dict__, **extra, "attention_recompute": on})
          for on in (False, True)]
  params = tfm.init_params(tfm.Transformer(cfgs[0]), jax.random.key(4))
  tokens = jax.random.randint(jax.random.key(5), (2, 16), 1, 64)
  valid = jnp.stack([jnp.arange(16) < 11, jnp.arange(16) >= 2])  # right- and left-padded
  weights = jax.random.normal(jax.random.key(6), (2, 16, 64))

  def loss(params, cfg):
    out = tfm.Transformer(cfg).apply({"params": params}, tokens, valid_BxL=valid)
    return jnp.sum(out.logits_BxLxV * weights) + jnp.sum(out.value_BxL)

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  (off, g_off), (on, g_on) = grad(params, cfgs[0]), grad(params, cfgs[1])
  np.testing.assert_allclose(on, off, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_on), jax.tree.leaves(g_off)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
