"""Conversation-level reward R*, the multiturn-aware reward (MR) and next-turn baselines.

    R*(t | g) = w_ext * R_ext(t, g) - min(lambda * tokens_read(t), 1) + w_int * R_int(t)
    MR(m_j | history, g) = E_{S futures of `window` turns} [ R*(history + m_j + future | g) ]

R_ext is the task metric of the conversation's latest answer, tokens_read counts what the policy
wrote (what the user must read), R_int is the task's interactivity. A future is the user's answer
to m_j, then `window` more (policy, user) exchanges; window 0 scores m_j as it stands (the
immediate, next-turn reward). All B x S futures of a batch run in one batched call: every row's
conversation, simulator state and policy KV cache are tiled S times (the prefix is never
recomputed) and played forward with `rollout.take_turns`. `ranked_candidates` does the same for
G candidate replies per turn (B x G x S branches): what DPO's pairs and the data engine rank.

The simulator argument is whatever played the user (a scripted task is its own simulator, an
`LMSimulator` forwards the task's bookkeeping); `sim` is its state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from collab_rl import conversation as conv_lib
from collab_rl import rollout as rollout_lib
from collab_rl.tokenizer import ASSISTANT


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  w_ext: float = 1.0  # weight of the task metric
  w_int: float = 1.0  # weight of interactivity
  token_cost: float = 5e-4  # lambda per token read (paper: 5e-4; 1e-4 for documents)
  window: int = 2  # forward turns sampled after the reply (0..3)
  samples: int = 3  # futures per reply
  # Futures of each reply played at once (0: all `samples`): fewer hold fewer copies of the
  # conversations' KV caches, in S / samples_chunk turns of a loop (`play_futures`).
  samples_chunk: int = 0

  def __post_init__(self):
    if not 0 <= self.window <= 3:
      raise ValueError(f"window={self.window}: MR windows are 0 to 3 turns")
    if self.samples < 1:
      raise ValueError(f"samples={self.samples} must be >= 1")
    if self.samples_chunk < 0 or (self.samples_chunk and self.samples % self.samples_chunk):
      raise ValueError(f"samples_chunk={self.samples_chunk} must divide samples={self.samples} "
                       "(0: all at once)")
    if self.token_cost < 0:
      raise ValueError(f"token_cost={self.token_cost} must be >= 0")

  @classmethod
  def from_config(cls, reward) -> "RewardConfig":
    """An experiment's `config.reward` (its other fields, e.g. PPO's `kind`, are not R*'s)."""
    return cls(w_ext=reward.w_ext, w_int=reward.w_int, token_cost=reward.token_cost,
               window=reward.window, samples=reward.samples,
               samples_chunk=reward.get("samples_chunk", 0))  # absent in configs saved before it

  @property
  def chunk(self) -> int:
    """Futures of a reply played at once."""
    return self.samples_chunk or self.samples

  def horizon(self, turns: int) -> int:
    """Assistant turns a conversation of `turns` turns may reach: MR plays `window` more after
    its last reply. What conversation columns and an LM policy's cache are sized for."""
    return turns + self.window


def conversation_reward(simulator, conv: conv_lib.Conversation, sim, cfg: RewardConfig):
  """R* per conversation, and its components (all [B]), for a task scored on device
  (`protocol.Task.device_scored`; the language tier scores on the host: `text_scores.py`)."""
  scores = simulator.conversation_scores(conv, sim)
  r_ext, r_int = scores["r_ext"], scores["r_int"]
  tokens = jnp.sum(conv.roles_BxL == ASSISTANT, axis=1)
  cost = jnp.minimum(cfg.token_cost * tokens, 1.0)
  total = cfg.w_ext * r_ext - cost + cfg.w_int * r_int
  return total, {"r_ext": r_ext, "token_cost": cost, "r_int": r_int, "tokens_read": tokens}


def play_futures(policy, simulator, params, conv, sim, policy_state, reply_BxN, reply_len_B,
                 key, cfg: RewardConfig, keep=lambda conv, sim: (conv, sim)):
  """`keep(conv, sim)` of the S futures of each row's candidate reply, B x S rows (row b * S + s):
  the user's answer to the reply, then `window` more exchanges (window 0: the reply as it stands).

  `conv` ends with the assistant header (the reply is not appended yet); `policy_state` is the
  policy's state after it wrote the reply (for an LM policy: its KV cache), so futures continue
  from it. With G candidates per turn, pass the B x G candidate rows as the batch.

  With `cfg.samples_chunk` < S the futures are played that many at a time, in a loop of
  S / samples_chunk turns, each from its own key (so the draws differ from all at once): only one
  chunk's states are live, so `keep` should drop what the caller does not read of a future
  (an LM user's and policy's KV caches: `text.played` keeps the ids, `conversation_reward` the
  score); what it keeps of every chunk is stacked. Each leaf it returns leads with the rows.
  """
  def play(chunk: int, key):
    c, u, pstate, reply, reply_len = rollout_lib.tile_rows(
        (conv, sim, policy_state, reply_BxN, reply_len_B), chunk)
    k_user, k_future = jax.random.split(key)
    c, u = rollout_lib.answer_reply(simulator, c, u, reply, reply_len, k_user,
                                    append_user=cfg.window > 0)
    if cfg.window > 0:
      out = rollout_lib.take_turns(policy, simulator, params, c, u, k_future, cfg.window,
                                   policy_state=pstate)
      c, u = out.conv, out.sim
    return keep(c, u)

  s, chunk = cfg.samples, cfg.chunk
  if chunk == s:
    return play(s, key)
  # [S / chunk, B * chunk, ...] (row b * chunk + c of loop turn j is future j * chunk + c of
  # row b) -> [B * S, ...] in play(s)'s order.
  kept = jax.lax.map(lambda k: play(chunk, k), jax.random.split(key, s // chunk))
  b = reply_len_B.shape[0]
  def rows(x_JxR):
    if x_JxR.ndim < 2:  # a scalar of each chunk: a KV cache's write index, which may differ
      raise ValueError("with reward.samples_chunk, play_futures' `keep` must return row arrays "
                       "only (e.g. text.played's ids), not a state with a KV cache")
    x_JxBxC = x_JxR.reshape(s // chunk, b, chunk, *x_JxR.shape[2:])
    return jnp.swapaxes(x_JxBxC, 0, 1).reshape(b * s, *x_JxR.shape[2:])
  return jax.tree_util.tree_map(rows, kept)


def multiturn_aware_reward(policy, simulator, params, conv, sim, policy_state, reply_BxN,
                           reply_len_B, key, cfg: RewardConfig):
  """MR of each row's candidate reply: (mean_B, std_B, components of the mean, [B, S] samples),
  its futures (`play_futures`) scored on device."""
  b, s = conv.batch, cfg.samples
  total, parts = play_futures(policy, simulator, params, conv, sim, policy_state, reply_BxN,
                              reply_len_B, key, cfg,
                              keep=lambda c, u: conversation_reward(simulator, c, u, cfg))
  total_BxS = total.reshape(b, s)
  parts = {k: v.reshape(b, s).astype(jnp.float32).mean(1) for k, v in parts.items()}
  return total_BxS.mean(1), total_BxS.std(1), parts, total_BxS


@flax.struct.dataclass
class Candidates:
  """G candidate replies per conversation and their MR. The flat arrays have the B x G candidate
  rows, row b * G + g being candidate g of conversation b (`rows`)."""
  tokens_BGxN: jax.Array
  lengths_BG: jax.Array
  policy_state: Any  # the policy's state after writing them (an LM policy: a cache per row)
  mr_BxG: jax.Array
  mr_std_BxG: jax.Array

  @property
  def best_B(self) -> jax.Array:
    return jnp.argmax(self.mr_BxG, 1)

  @property
  def worst_B(self) -> jax.Array:
    return jnp.argmin(self.mr_BxG, 1)

  def rows(self, idx_B: jax.Array) -> jax.Array:
    """Flat rows of candidate idx_B[b] of each conversation b."""
    b, g = self.mr_BxG.shape
    return jnp.arange(b) * g + idx_B


def ranked_candidates(policy, simulator, params, conv, sim, policy_state, num: int, k_cand,
                      k_mr, cfg: RewardConfig) -> Candidates:
  """`num` candidate replies per row from the policy, each scored by MR.

  `conv` ends with the assistant header (`rollout.open_reply`); every row's conversation,
  simulator state and policy state are tiled `num` times, so the candidates share the history
  (and its KV cache) and all B x G x S futures run in one batched call.
  """
  b = conv.batch
  conv_g, sim_g, pstate_g = rollout_lib.tile_rows((conv, sim, policy_state), num)
  reply, _, reply_len, pstate_g = policy(params, conv_g, sim_g, pstate_g, k_cand)
  mr, mr_std, _, _ = multiturn_aware_reward(policy, simulator, params, conv_g, sim_g, pstate_g,
                                            reply, reply_len, k_mr, cfg)
  return Candidates(reply, reply_len, pstate_g, mr.reshape(b, num), mr_std.reshape(b, num))


# ------------------------------------------------------------------------------------------------
# Next-turn baselines of the paper's reward ablation (immediate rewards, window 0).
# ------------------------------------------------------------------------------------------------


def extrinsic_reward(simulator, conv, sim, reply_BxN, reply_len_B, key):
  """The task metric of the reply alone (0 unless it is an answer that scores)."""
  _, new_sim = rollout_lib.answer_reply(simulator, conv, sim, reply_BxN, reply_len_B, key,
                                        append_user=False)
  answered = new_sim.answers_B > sim.answers_B
  return jnp.where(answered, new_sim.score_B, 0.0)


def extrinsic_intrinsic_reward(simulator, conv, sim, reply_BxN, reply_len_B, key,
                               cfg: RewardConfig):
  """R* of the conversation ending with the reply, no future (MR with window 0, S = 1)."""
  conv, new_sim = rollout_lib.answer_reply(simulator, conv, sim, reply_BxN, reply_len_B, key,
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
