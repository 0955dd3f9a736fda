"""Sampler: greedy equals argmax of full forward passes, determinism, stops, no recompilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collab_rl import sampling
from collab_rl import sharding as sharding_lib
from collab_rl.models import transformer as tfm

CFG = tfm.TransformerConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def setup():
  model = tfm.Transformer(CFG)
  params = tfm.init_params(model, jax.random.key(0))
  prompt = jax.random.randint(jax.random.key(1), (4, 8), 1, 64)
  lengths = jnp.array([8, 3, 5, 1])
  return model, params, prompt, lengths


def test_greedy_equals_argmax_of_full_forward(setup):
  model, params, prompt, lengths = setup
  n = 6
  out = sampling.make_sampler(model, sampling.SamplingConfig(max_new_tokens=n, greedy=True))(
      params, prompt, lengths, jax.random.key(0))
  # Reference: one full forward pass (no cache) per step over right-padded sequences.
  b, l = prompt.shape
  forward = jax.jit(lambda t, v: model.apply({"params": params}, t, valid_BxL=v).logits_BxLxV)
  seqs = np.zeros((b, l + n), np.int32)
  for i in range(b):
    seqs[i, :lengths[i]] = prompt[i, :lengths[i]]
  for t in range(n):
    cur = np.asarray(lengths) + t
    logits = forward(seqs, np.arange(l + n)[None] < cur[:, None])
    last = np.asarray(logits)[np.arange(b), cur - 1]
    expected = last.argmax(-1)
    np.testing.assert_array_equal(out.tokens_BxN[:, t], expected)
    np.testing.assert_allclose(out.logprobs_BxN[:, t],
                               jax.nn.log_softmax(last)[np.arange(b), expected], atol=1e-5)
    seqs[np.arange(b), cur] = expected
  np.testing.assert_array_equal(out.lengths_B, n)


def test_same_key_same_sample_and_no_recompilation(setup, compile_counter):
  model, params, prompt, lengths = setup
  sample = sampling.make_sampler(
      model, sampling.SamplingConfig(max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.9))
  a = sample(params, prompt, lengths, jax.random.key(5))
  with compile_counter as counter:
    b = sample(params, prompt, lengths, jax.random.key(5))
    c = sample(params, prompt, lengths, jax.random.key(6))
    jax.block_until_ready(c)
  assert counter.count == 0
  np.testing.assert_array_equal(a.tokens_BxN, b.tokens_BxN)
  np.testing.assert_array_equal(a.logprobs_BxN, b.logprobs_BxN)
  assert not np.array_equal(a.tokens_BxN, c.tokens_BxN)


def test_stop_tokens_end_rows_and_pad_after(setup):
  model, params, prompt, lengths = setup
  greedy = sampling.make_sampler(model, sampling.SamplingConfig(max_new_tokens=6, greedy=True))
  ref = greedy(params, prompt, lengths, jax.random.key(0))
  stop = int(ref.tokens_BxN[0, 2])  # row 0 emits this at step 2 (maybe earlier elsewhere)
  out = sampling.make_sampler(model, sampling.SamplingConfig(
      max_new_tokens=6, greedy=True, stop_tokens=(stop,), pad_id=0))(
          params, prompt, lengths, jax.random.key(0))
  for b in range(4):
    row = list(np.asarray(ref.tokens_BxN[b]))
    n = row.index(stop) + 1 if stop in row else 6
    assert int(out.lengths_B[b]) == n
    assert bool(out.stopped_B[b]) == (stop in row)
    np.testing.assert_array_equal(out.tokens_BxN[b, :n], row[:n])
    assert np.all(np.asarray(out.tokens_BxN[b, n:]) == 0)
    assert np.all(np.asarray(out.logprobs_BxN[b, n:]) == 0)


def test_filter_logits_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.1]]))
  kept = lambda x: np.asarray(x[0] > -1e29)
  np.testing.assert_array_equal(kept(sampling.filter_logits(logits, 2, 1.0)),
                                [True, True, False, False])
  # Mass before each token: 0, .5, .75, .9 -> p = 0.7 keeps the first two, p = 0.8 three.
  np.testing.assert_array_equal(kept(sampling.filter_logits(logits, 0, 0.7)),
                                [True, True, False, False])
  np.testing.assert_array_equal(kept(sampling.filter_logits(logits, 0, 0.8)),
                                [True, True, True, False])
  np.testing.assert_array_equal(kept(sampling.filter_logits(logits, 0, 0.01)),
                                [True, False, False, False])


def test_sampled_tokens_respect_top_k(setup):
  model, params, prompt, lengths = setup
  out = sampling.make_sampler(model, sampling.SamplingConfig(max_new_tokens=1, top_k=1))(
      params, prompt, lengths, jax.random.key(3))
  greedy = sampling.make_sampler(model, sampling.SamplingConfig(max_new_tokens=1, greedy=True))(
      params, prompt, lengths, jax.random.key(3))
  np.testing.assert_array_equal(out.tokens_BxN, greedy.tokens_BxN)


def test_sharded_batch_gives_same_tokens(setup):
  model, params, prompt, lengths = setup
  cfg = sampling.SamplingConfig(max_new_tokens=5, temperature=1.0)
  one = sampling.make_sampler(model, cfg)(params, prompt, lengths, jax.random.key(9))
  mesh = sharding_lib.make_mesh((2, 2, 2))
  p_sh = jax.device_put(params, sharding_lib.param_shardings(params, mesh))
  batch = sharding_lib.shard_batch({"p": np.asarray(prompt), "l": np.asarray(lengths)}, mesh)
  many = sampling.make_sampler(model, cfg)(p_sh, batch["p"], batch["l"], jax.random.key(9))
  np.testing.assert_array_equal(one.tokens_BxN, many.tokens_BxN)
  np.testing.assert_allclose(one.logprobs_BxN, many.logprobs_BxN, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(max_new_tokens=0), dict(temperature=0.0),
                                dict(top_p=0.0), dict(top_k=-1)])
def test_bad_sampling_config(kw):
  with pytest.raises(ValueError):
    sampling.SamplingConfig(**kw)


def test_inverse_cdf_sampling_matches_the_distribution():
  probs = jnp.array([0.1, 0.0, 0.6, 0.3])
  logits = jnp.broadcast_to(jnp.log(probs), (20_000, 4))
  draws = np.asarray(sampling.sample_inverse_cdf(jax.random.key(0), logits))
  freq = np.bincount(draws, minlength=4) / draws.size
  assert freq[1] == 0.0  # a masked (zero-mass) token is never drawn
  np.testing.assert_allclose(freq, probs, atol=0.015)
