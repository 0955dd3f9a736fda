"""R*, MR and the next-turn baselines, on ambig_math with the scripted user."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collab_rl import conversation as conv_lib
from collab_rl import rewards
from collab_rl import rollout as rollout_lib
from collab_rl import sharding as sharding_lib
from collab_rl.tasks import registry
from collab_rl.tokenizer import CONTEXT

B = 64


def _at_first_turn(task, batch=B, seed=0):
  """Conversations just before the policy's first reply (header written)."""
  intent = task.sample_intents(jax.random.key(seed), batch)
  conv, sim = rollout_lib.start(task, intent, max_len=64)
  ones = jnp.ones((batch,), jnp.int32)
  conv = conv_lib.append(conv, jnp.full((batch, 1), task.assistant_header_id), ones, CONTEXT)
  return conv, sim


def _candidates(task, conv, sim):
  oracle, guess = rollout_lib.oracle_policy(task), rollout_lib.answer_now_policy(task)
  ask = oracle(None, conv, sim, (), jax.random.key(1))
  answer = guess(None, conv, sim, (), jax.random.key(2))
  return ask, answer


_MR_FNS = {}


def _mr(task, conv, sim, reply, cfg, key=3):
  """MR with oracle futures, jitted once per (task, config) so repeated keys do not recompile."""
  if (id(task), cfg) not in _MR_FNS:
    _MR_FNS[id(task), cfg] = jax.jit(lambda c, s, r, l, k: rewards.multiturn_aware_reward(
        rollout_lib.oracle_policy(task), task, None, c, s, (), r, l, k, cfg))
  return _MR_FNS[id(task), cfg](conv, sim, reply[0], reply[2], jax.random.key(key))


def test_conversation_reward_by_hand():
  task = registry.make_task("ambig_math")
  conv, sim = _at_first_turn(task, batch=2)
  sim = sim.replace(score_B=jnp.array([1.0, 0.0]))
  conv = conv_lib.append(conv, jnp.ones((2, 4), jnp.int32), jnp.array([4, 2]), 3,
                         new_turn=False)
  cfg = rewards.RewardConfig(w_ext=1.0, w_int=0.5, token_cost=0.1)
  total, parts = rewards.conversation_reward(task, conv, sim, cfg)
  # Interactivity is 0 here (nothing asked), so R* = R_ext - min(0.1 * tokens, 1).
  np.testing.assert_allclose(parts["tokens_read"], [4, 2])
  np.testing.assert_allclose(total, [1.0 - 0.4, 0.0 - 0.2], atol=1e-6)


def test_mr_prefers_asking_while_next_turn_reward_prefers_guessing():
  """The paper's Figure 6 in miniature, on ambiguous requests."""
  task = registry.make_task("ambig_math", {"ambiguous_rate": 1.0, "min_missing": 2,
                                           "max_missing": 2})
  conv, sim = _at_first_turn(task)
  ask, guess = _candidates(task, conv, sim)
  cfg = rewards.RewardConfig(window=2, samples=3)
  mr_ask = _mr(task, conv, sim, ask, cfg)[0]
  mr_guess = _mr(task, conv, sim, guess, cfg)[0]
  assert float(mr_ask.mean()) > float(mr_guess.mean()) + 0.5
  next_ask = rewards.extrinsic_reward(task, conv, sim, ask[0], ask[2], jax.random.key(4))
  next_guess = rewards.extrinsic_reward(task, conv, sim, guess[0], guess[2], jax.random.key(4))
  assert float(next_ask.mean()) == 0.0 and float(next_guess.mean()) > 0.0
  # The scripted helpfulness judge cannot see the goal: a guess that keeps the stated pieces is
  # fully "helpful", a question is not.
  help_ask = rewards.helpfulness_reward(task, conv, sim, ask[0], ask[2])
  help_guess = rewards.helpfulness_reward(task, conv, sim, guess[0], guess[2])
  np.testing.assert_allclose(help_ask, 0.0)
  np.testing.assert_allclose(help_guess, 1.0)


def test_window_zero_equals_the_immediate_reward():
  task = registry.make_task("ambig_math")
  conv, sim = _at_first_turn(task)
  _, guess = _candidates(task, conv, sim)
  cfg = rewards.RewardConfig(window=0, samples=2)
  mean, std, _, _ = _mr(task, conv, sim, guess, cfg)
  now = rewards.extrinsic_intrinsic_reward(task, conv, sim, guess[0], guess[2],
                                           jax.random.key(0), cfg)
  np.testing.assert_allclose(mean, now, atol=1e-6)
  np.testing.assert_allclose(std, 0.0, atol=1e-6)


def test_mr_spread_shrinks_with_more_samples():
  # A noisy user makes futures random; the MR estimate's spread over keys falls like 1/sqrt(S).
  task = registry.make_task("ambig_math", {"ambiguous_rate": 1.0, "noise_vague": 0.5})
  conv, sim = _at_first_turn(task, batch=8)
  ask, _ = _candidates(task, conv, sim)
  spreads = {}
  for s in (1, 16):
    cfg = rewards.RewardConfig(window=1, samples=s)
    estimates = np.stack([np.asarray(_mr(task, conv, sim, ask, cfg, key=k)[0])
                          for k in range(12)])
    spreads[s] = estimates.std(0).mean()
  assert spreads[16] < 0.5 * spreads[1]


def test_one_device_and_eight_devices_agree():
  task = registry.make_task("ambig_math", {"noise_vague": 0.3})
  conv, sim = _at_first_turn(task)
  ask, _ = _candidates(task, conv, sim)
  cfg = rewards.RewardConfig(window=2, samples=3)
  one = _mr(task, conv, sim, ask, cfg)
  mesh = sharding_lib.make_mesh((4, 2, 1))
  put = lambda x: jax.device_put(x, sharding_lib.batch_sharding(mesh))
  many = _mr(task, put(conv), put(sim), tuple(put(a) for a in ask), cfg)
  for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(many)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_futures_played_in_chunks_equal_all_at_once():
  """reward.samples_chunk: S = 4 futures two at a time (a loop over 2 chunks) give each row its
  own futures, in play_futures' row order; deterministic futures (the oracle against a user
  without noise) make them equal to all 4 at once."""
  task = registry.make_task("ambig_math", {"ambiguous_rate": 0.5})
  conv, sim = _at_first_turn(task, batch=16)
  ask, guess = _candidates(task, conv, sim)
  # Rows differ: half ask, half guess, on requests of both kinds.
  even = jnp.arange(16) % 2 == 0
  n = max(ask[0].shape[1], guess[0].shape[1])
  pad = lambda x: jnp.pad(x, ((0, 0), (0, n - x.shape[1])))
  reply = (jnp.where(even[:, None], pad(ask[0]), pad(guess[0])), None,
           jnp.where(even, ask[2], guess[2]))
  whole = _mr(task, conv, sim, reply, rewards.RewardConfig(window=2, samples=4))
  chunks = _mr(task, conv, sim, reply, rewards.RewardConfig(window=2, samples=4,
                                                            samples_chunk=2))
  assert len(set(np.asarray(whole[0]).round(6).tolist())) > 1
  for a, b in zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(chunks)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # What each chunk keeps is stacked row by row; a state's scalar (a cache's write index) is
  # refused, since chunks may leave it at different slots.
  with pytest.raises(ValueError, match="row arrays only"):
    jax.eval_shape(lambda: rewards.play_futures(
        rollout_lib.oracle_policy(task), task, None, conv, sim, (), reply[0], reply[2],
        jax.random.key(0), rewards.RewardConfig(samples=2, samples_chunk=1),
        keep=lambda c, u: c.cursor_B.sum()))


@pytest.mark.parametrize("kw", [dict(window=4), dict(samples=0), dict(token_cost=-1.0),
                                dict(samples=3, samples_chunk=2), dict(samples_chunk=-1)])
def test_bad_reward_config(kw):
  with pytest.raises(ValueError):
    rewards.RewardConfig(**kw)


def test_lm_policy_futures_from_the_tiled_cache_equal_a_recomputed_prefix():
  from collab_rl import sampling
  from collab_rl.models import transformer as tfm
  task = registry.make_task("ambig_math", {"ambiguous_rate": 1.0})
  model = tfm.Transformer(tfm.TransformerConfig(
      vocab_size=task.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2))
  params = tfm.init_params(model, jax.random.key(0))
  policy = rollout_lib.lm_policy(model, sampling.SamplingConfig(
      max_new_tokens=6, temperature=1.0, stop_tokens=(task.eot_id,)), chunk_width=16,
      max_turns=4)
  cfg = rewards.RewardConfig(window=2, samples=3)

  @jax.jit
  def from_policy_cache(key):
    conv, sim = _at_first_turn(task, batch=8)
    pstate = policy.init(params, conv)
    reply, _, reply_len, pstate = policy(params, conv, sim, pstate, jax.random.key(1))
    return rewards.multiturn_aware_reward(policy, task, params, conv, sim, pstate, reply,
                                          reply_len, key, cfg)

  tiled = from_policy_cache(jax.random.key(2))
  assert tiled[3].shape == (8, 3)
  # The same futures from a policy state rebuilt by prefilling conversation + reply from scratch.
  conv, sim = _at_first_turn(task, batch=8)
  reply, _, reply_len, _ = policy(params, conv, sim, policy.init(params, conv), jax.random.key(1))
  full = conv_lib.append(conv, reply, reply_len, 3, new_turn=False)
  rebuilt = policy.init(params, full)
  rebuilt = rebuilt.replace(upto_B=full.cursor_B - 1)
  # The rebuilt cache holds the reply's last token too; mask it out so both caches agree.
  valid = rebuilt.cache.valid_BxS & (jnp.arange(rebuilt.cache.valid_BxS.shape[1])[None]
                                     < rebuilt.upto_B[:, None])
  rebuilt = rebuilt.replace(cache=rebuilt.cache.replace(valid_BxS=valid))
  again = jax.jit(lambda key: rewards.multiturn_aware_reward(
      policy, task, params, conv, sim, rebuilt, reply, reply_len, key, cfg))(jax.random.key(2))
  np.testing.assert_allclose(tiled[3], again[3], atol=1e-5)
