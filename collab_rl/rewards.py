"""Conversation-level reward R*, the multiturn-aware reward (MR) and next-turn baselines.

    R*(t | g) = w_ext * R_ext(t, g) - min(lambda * tokens_read(t), 1) + w_int * R_int(t)
    MR(m_j | history, g) = E_{S futures of `window` turns} [ R*(history + m_j + future | g) ]

R_ext is the task metric of the conversation's latest answer, tokens_read counts what the policy
wrote (what the user must read), R_int is the task's interactivity. A future is the user's answer
to m_j, then `window` more (policy, user) exchanges; window 0 scores m_j as it stands (the
immediate, next-turn reward). All B x S futures of a batch run in one batched call: every row's
conversation, simulator state and policy KV cache are tiled S times (the prefix is never
recomputed) and played forward with `rollout.take_turns`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from collab_rl import conversation as conv_lib
from collab_rl import rollout as rollout_lib
from collab_rl.tokenizer import ASSISTANT, CONTEXT, USER


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  w_ext: float = 1.0  # weight of the task metric
  w_int: float = 1.0  # weight of interactivity
  token_cost: float = 5e-4  # lambda per token read (paper: 5e-4; 1e-4 for documents)
  window: int = 2  # forward turns sampled after the reply (0..3)
  samples: int = 3  # futures per reply

  def __post_init__(self):
    if not 0 <= self.window <= 3:
      raise ValueError(f"window={self.window}: MR windows are 0 to 3 turns")
    if self.samples < 1:
      raise ValueError(f"samples={self.samples} must be >= 1")
    if self.token_cost < 0:
      raise ValueError(f"token_cost={self.token_cost} must be >= 0")


def conversation_reward(task, conv: conv_lib.Conversation, sim, cfg: RewardConfig):
  """R* per conversation, and its components (all [B])."""
  r_ext = sim.score_B
  tokens = jnp.sum(conv.roles_BxL == ASSISTANT, axis=1)
  cost = jnp.minimum(cfg.token_cost * tokens, 1.0)
  r_int = task.interactivity(conv.intent, sim)
  total = cfg.w_ext * r_ext - cost + cfg.w_int * r_int
  return total, {"r_ext": r_ext, "token_cost": cost, "r_int": r_int, "tokens_read": tokens}


def _where_rows(mask_B, new, old):
  return jax.tree_util.tree_map(
      lambda n, o: jnp.where(mask_B.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old)


def answer_reply(simulator, conv, sim, reply_BxN, reply_len_B, key, append_user: bool):
  """Appends the policy's reply; the simulator answers it (appended when `append_user`)."""
  b = conv.batch
  active = ~conv.done_B
  reply_len_B = jnp.where(active, reply_len_B, 0)
  conv = conv_lib.append(conv, reply_BxN, reply_len_B, ASSISTANT, new_turn=False)
  user, user_len, done, new_sim = simulator.user_turn(conv.intent, sim, reply_BxN, reply_len_B,
                                                      key)
  sim = _where_rows(active, new_sim, sim)
  if append_user:
    ones = jnp.ones((b,), jnp.int32)
    conv = conv_lib.append(conv, jnp.full((b, 1), simulator.user_header_id), ones, CONTEXT)
    conv = conv_lib.append(conv, user, user_len, USER, new_turn=False)
    conv = conv_lib.mark_done(conv, done & active)
  return conv, sim


def multiturn_aware_reward(policy, simulator, params, conv, sim, policy_state, reply_BxN,
                           reply_len_B, key, cfg: RewardConfig):
  """MR of each row's candidate reply: (mean_B, std_B, components of the mean, [B, S] samples).

  `conv` ends with the assistant header (the reply is not appended yet); `policy_state` is the
  policy's state after it wrote the reply (for an LM policy: its KV cache), so futures continue
  from it. With G candidates per turn, pass the B x G candidate rows as the batch.
  """
  b, s = conv.batch, cfg.samples
  conv, sim, pstate, reply_BxN, reply_len_B = rollout_lib.tile_rows(
      (conv, sim, policy_state, reply_BxN, reply_len_B), s)
  k_user, k_future = jax.random.split(key)
  conv, sim = answer_reply(simulator, conv, sim, reply_BxN, reply_len_B, k_user,
                           append_user=cfg.window > 0)
  if cfg.window > 0:
    out = rollout_lib.take_turns(policy, simulator, params, conv, sim, k_future, cfg.window,
                                 policy_state=pstate)
    conv, sim = out.conv, out.sim
  total, parts = conversation_reward(simulator, conv, sim, cfg)
  total_BxS = total.reshape(b, s)
  parts = {k: v.reshape(b, s).astype(jnp.float32).mean(1) for k, v in parts.items()}
  return total_BxS.mean(1), total_BxS.std(1), parts, total_BxS


# ------------------------------------------------------------------------------------------------
# Next-turn baselines of the paper's reward ablation (immediate rewards, window 0).
# ------------------------------------------------------------------------------------------------


def extrinsic_reward(simulator, conv, sim, reply_BxN, reply_len_B, key):
  """The task metric of the reply alone (0 unless it is an answer that scores)."""
  _, new_sim = answer_reply(simulator, conv, sim, reply_BxN, reply_len_B, key, append_user=False)
  answered = new_sim.answers_B > sim.answers_B
  return jnp.where(answered, new_sim.score_B, 0.0)


def extrinsic_intrinsic_reward(simulator, conv, sim, reply_BxN, reply_len_B, key,
                               cfg: RewardConfig):
  """R* of the conversation ending with the reply, no future (MR with window 0, S = 1)."""
  conv, new_sim = answer_reply(simulator, conv, sim, reply_BxN, reply_len_B, key,
                               append_user=False)
  return conversation_reward(simulator, conv, new_sim, cfg)[0]


def helpfulness_reward(simulator, conv, sim, reply_BxN, reply_len_B):
  """A scripted helpfulness judge for the verifiable tasks: it sees the conversation, not the goal.

  Like the LLM judges of CollabLLM's ablation, it rates the single reply: a well-formed answer
  scores the share of the slots stated so far (in the request or in the user's answers) that it
  writes as stated, while a question or anything else scores 0. It cannot tell a lucky guess of
  an unstated slot from knowledge, hence the failure mode the paper reports: guessing looks
  helpful, asking does not. The prompted LM judge of `reward_model.py` plays this role for the
  language tasks.
  """
  parsed_BxK = simulator.parse_answer(reply_BxN, reply_len_B)
  well_formed_B = jnp.all(parsed_BxK >= 0, axis=1)
  stated_BxK = sim.known_BxK  # what the conversation has told the assistant
  right_BxK = parsed_BxK == conv.intent.values_BxK
  share_B = jnp.sum(right_BxK & stated_BxK, 1) / jnp.maximum(jnp.sum(stated_BxK, 1), 1)
  return jnp.where(well_formed_B, share_B, 0.0).astype(jnp.float32)
