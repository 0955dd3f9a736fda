"""Turn-level GAE and the losses against numbers worked out by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collab_rl import advantages as adv_lib
from collab_rl import losses
from collab_rl.tokenizer import ASSISTANT, CONTEXT, USER


def test_turn_gae_by_hand():
  gamma, lam = 0.9, 0.8
  rewards = jnp.array([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
  values = jnp.array([[0.5, 0.6, 0.7], [0.5, 0.6, 9.0]])
  done = jnp.array([[False, False, True], [False, True, False]])
  valid = jnp.array([[True, True, True], [True, True, False]])
  adv, ret = adv_lib.turn_gae(rewards, values, done, valid, gamma, lam)
  # Row 0: delta = (0.04, 0.03, 0.3); A_1 = 0.03 + 0.72 * 0.3; A_0 = 0.04 + 0.72 * A_1.
  np.testing.assert_allclose(adv[0], [0.21712, 0.246, 0.3], atol=1e-6)
  np.testing.assert_allclose(ret[0], [0.71712, 0.846, 1.0], atol=1e-6)
  # Row 1 ends after turn 1: turn 2 never happened (its reward and value must not leak).
  np.testing.assert_allclose(adv[1], [0.04 + 0.72 * 0.4, 0.4, 0.0], atol=1e-6)
  np.testing.assert_allclose(ret[1], [0.828, 1.0, 0.0], atol=1e-6)


def test_turn_gae_bootstraps_a_truncated_conversation():
  adv, _ = adv_lib.turn_gae(jnp.zeros((1, 2)), jnp.ones((1, 2)), jnp.zeros((1, 2), bool),
                            jnp.ones((1, 2), bool), gamma=0.5, lam=1.0,
                            last_value_B=jnp.array([2.0]))
  # delta_1 = 0.5 * 2 - 1 = 0; delta_0 = 0.5 * 1 - 1 = -0.5.
  np.testing.assert_allclose(adv, [[-0.5, 0.0]], atol=1e-6)


def test_advantages_broadcast_to_the_tokens_of_their_turn():
  C, U, A = CONTEXT, USER, ASSISTANT
  roles = jnp.array([[C, U, U, C, A, A, C, U, C, A, A, A, 0]])
  turns = jnp.array([[0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 4, -1]])
  idx = adv_lib.assistant_turn_index(roles, turns)
  np.testing.assert_array_equal(idx, [[-1, -1, -1, -1, 0, 0, -1, -1, -1, 1, 1, 1, -1]])
  out = adv_lib.broadcast_to_tokens(jnp.array([[0.5, -2.0]]), idx)
  np.testing.assert_allclose(out, [[0, 0, 0, 0, 0.5, 0.5, 0, 0, 0, -2, -2, -2, 0]])


def test_group_baselines():
  r = jnp.array([[1.0, 0.0, 0.0, 3.0]])
  np.testing.assert_allclose(adv_lib.group_baseline(r, leave_one_out=False), [[0, -1, -1, 2]])
  np.testing.assert_allclose(adv_lib.group_baseline(r, leave_one_out=True),
                             [[0.0, -4 / 3, -4 / 3, 8 / 3]], atol=1e-6)


def test_whiten_ignores_masked_entries():
  x = jnp.array([1.0, 3.0, 100.0])
  out = adv_lib.whiten(x, jnp.array([True, True, False]))
  np.testing.assert_allclose(out, [-1.0, 1.0, 0.0], atol=1e-4)


def test_ppo_policy_loss_by_hand():
  logp = jnp.log(jnp.array([[1.5, 1.5, 0.5]]))
  old = jnp.zeros((1, 3))
  mask = jnp.array([[True, False, False]])
  loss, m = losses.ppo_policy_loss(logp, old, jnp.array([[1.0, 0.0, 0.0]]), mask, 0.2)
  assert float(loss) == pytest.approx(-1.2)  # min(1.5 * 1, 1.2 * 1)
  assert float(m["clip_fraction"]) == 1.0
  loss, _ = losses.ppo_policy_loss(logp, old, jnp.array([[-1.0, 0.0, 0.0]]), mask, 0.2)
  assert float(loss) == pytest.approx(1.5)  # min(-1.5, -1.2) = -1.5
  both = jnp.array([[True, False, True]])  # ratios 1.5 and 0.5, advantages +1 and +1
  loss, m = losses.ppo_policy_loss(logp, old, jnp.ones((1, 3)), both, 0.2)
  assert float(loss) == pytest.approx(-(1.2 + 0.5) / 2)
  assert float(m["approx_kl"]) == pytest.approx(((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5)))
                                                / 2)


def test_value_loss_by_hand():
  loss = losses.value_loss(jnp.array([[2.0]]), jnp.array([[1.0]]), jnp.array([[3.0]]),
                           jnp.array([[True]]), clip=0.5)
  # Unclipped error (2-3)^2 = 1; clipped value 1.5 -> (1.5-3)^2 = 2.25; max -> 2.25, times 0.5.
  assert float(loss) == pytest.approx(1.125)


def test_dpo_loss_by_hand():
  loss, m = losses.dpo_loss(jnp.array([-10.0]), jnp.array([-15.0]), jnp.array([-12.0]),
                            jnp.array([-14.0]), beta=0.1)
  # z = 0.1 * ((-10 + 12) - (-15 + 14)) = 0.3; loss = log(1 + e^-0.3).
  assert float(loss) == pytest.approx(math.log1p(math.exp(-0.3)), rel=1e-6)
  assert float(m["preference_accuracy"]) == 1.0
  # Equal margins: log 2; a zero-weight pair does not count.
  loss, _ = losses.dpo_loss(jnp.array([-1.0, 5.0]), jnp.array([-1.0, -5.0]), jnp.zeros(2),
                            jnp.zeros(2), beta=1.0, weight_B=jnp.array([1.0, 0.0]))
  assert float(loss) == pytest.approx(math.log(2.0), rel=1e-6)


def test_token_logprobs_alignment_and_k3():
  logits = jnp.log(jnp.array([[[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]]))
  tokens = jnp.array([[0, 1, 0]])
  np.testing.assert_allclose(losses.token_logprobs(logits, tokens),
                             [[0.0, math.log(0.5), math.log(0.25)]], atol=1e-6)
  np.testing.assert_allclose(losses.kl_k3(jnp.log(0.5), jnp.log(0.25)),
                             0.5 - math.log(0.5) - 1, atol=1e-6)
  ent = losses.token_entropy(logits)
  np.testing.assert_allclose(ent[0, 1], math.log(2.0), atol=1e-6)


@pytest.mark.parametrize("chunk", [4, 7, 64])
def test_chunked_head_equals_the_whole_logits_in_value_and_gradient(chunk):
  # 13 positions: chunks of 4 and 7 leave a padded last chunk; 64 is one chunk.
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  hidden_BxLxD = jax.random.normal(k1, (3, 13, 8))
  kernel_DxV = jax.random.normal(k2, (8, 11))
  tokens_BxL = jax.random.randint(k3, (3, 13), 0, 11)

  def whole(h, w):
    logits = h @ w
    return losses.token_logprobs(logits, tokens_BxL), losses.token_entropy(logits)

  def chunked(h, w):
    return losses.head_token_stats(h, w, tokens_BxL, chunk)

  for got, want in zip(chunked(hidden_BxLxD, kernel_DxV), whole(hidden_BxLxD, kernel_DxV)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda h, w: sum(jnp.sum(x * jnp.arange(13.0)) for x in f(h, w))
  got = jax.grad(loss(chunked), argnums=(0, 1))(hidden_BxLxD, kernel_DxV)
  want = jax.grad(loss(whole), argnums=(0, 1))(hidden_BxLxD, kernel_DxV)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
