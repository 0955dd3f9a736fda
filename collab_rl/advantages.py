"""Turn-level advantages: rewards and values live per assistant turn, advantages go to tokens.

For assistant turns j = 0..T-1 of a conversation, with reward r_j, value V_j and `done_j` (the
user ended the conversation right after turn j):

    delta_j = r_j + gamma * (1 - done_j) * V_{j+1} - V_j
    A_j     = delta_j + gamma * lambda * (1 - done_j) * A_{j+1}
    R_j     = A_j + V_j                                  (the value target)

V_T is `last_value_B` (the value of the state after the last turn when the turn budget, not the
user, ended the conversation; 0 when it ended). Turns that never happened (`valid_j` False: the
row was already done) get A_j = R_j = 0 and do not leak into earlier turns. The recursion is a
reverse `lax.scan`, so it stays on device and compiles once. A_j is then broadcast to the tokens
of turn j.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from collab_rl.tokenizer import ASSISTANT


def turn_gae(rewards_BxT: jax.Array, values_BxT: jax.Array, done_BxT: jax.Array,
             valid_BxT: jax.Array, gamma: float, lam: float,
             last_value_B: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Returns (advantages_BxT, returns_BxT)."""
  b, _ = rewards_BxT.shape
  if last_value_B is None:
    last_value_B = jnp.zeros((b,), jnp.float32)
  valid = valid_BxT.astype(jnp.float32)
  # Bootstrapping stops at a done turn and at the last valid turn of a finished row.
  cont_BxT = (1.0 - done_BxT.astype(jnp.float32)) * valid

  def step(carry, xs):
    next_value_B, next_adv_B = carry
    r_B, v_B, c_B, m_B = xs
    delta_B = r_B + gamma * c_B * next_value_B - v_B
    adv_B = (delta_B + gamma * lam * c_B * next_adv_B) * m_B
    # An invalid turn passes on the carry of the turn after it unchanged (it is not a state).
    new_value_B = jnp.where(m_B > 0, v_B, next_value_B)
    new_adv_B = jnp.where(m_B > 0, adv_B, next_adv_B)
    return (new_value_B, new_adv_B), adv_B

  xs = tuple(x.T.astype(jnp.float32) for x in (rewards_BxT, values_BxT, cont_BxT, valid))
  _, adv_TxB = jax.lax.scan(step, (last_value_B.astype(jnp.float32), jnp.zeros((b,))), xs,
                            reverse=True)
  adv_BxT = adv_TxB.T
  return adv_BxT, (adv_BxT + values_BxT) * valid


def assistant_turn_index(roles_BxL: jax.Array, turns_BxL: jax.Array) -> jax.Array:
  """For every token, the ordinal of the assistant turn it belongs to (-1 for other tokens)."""
  is_asst = roles_BxL == ASSISTANT
  prev_turn = jnp.pad(turns_BxL[:, :-1], ((0, 0), (1, 0)), constant_values=-2)
  prev_asst = jnp.pad(is_asst[:, :-1], ((0, 0), (1, 0)))
  starts = is_asst & ~(prev_asst & (prev_turn == turns_BxL))
  ordinal = jnp.cumsum(starts, axis=1) - 1
  return jnp.where(is_asst, ordinal, -1)


def broadcast_to_tokens(per_turn_BxT: jax.Array, turn_index_BxL: jax.Array) -> jax.Array:
  """Each assistant token gets its turn's value; every other token 0."""
  t = per_turn_BxT.shape[1]
  idx = jnp.clip(turn_index_BxL, 0, t - 1)
  out = jnp.take_along_axis(per_turn_BxT, idx, axis=1)
  return jnp.where((turn_index_BxL >= 0) & (turn_index_BxL < t), out, 0.0)


def whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Zero-mean unit-variance over the masked entries (PPO's advantage normalisation)."""
  m = mask.astype(jnp.float32)
  n = jnp.maximum(m.sum(), 1.0)
  mean = (x * m).sum() / n
  var = (((x - mean) * m) ** 2).sum() / n
  return (x - mean) * jax.lax.rsqrt(var + eps) * m


def group_baseline(rewards_BxG: jax.Array, leave_one_out: bool = True) -> jax.Array:
  """Advantages without a critic: GRPO (minus the group mean) or RLOO (minus the others' mean)."""
  g = rewards_BxG.shape[1]
  total = rewards_BxG.sum(1, keepdims=True)
  if leave_one_out:
    return rewards_BxG - (total - rewards_BxG) / max(g - 1, 1)
  return rewards_BxG - total / g
