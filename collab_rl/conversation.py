"""The fixed-shape `Conversation` pytree and the pure functions that grow and read it.

Every row is a right-padded token sequence with a role and a turn index per token, a write cursor
(its length), a done flag and the hidden intent of the simulated user. Shapes never change, so a
rollout compiles once per config; appending is a masked gather, no Python loop over rows or
tokens. The intent rides along for the simulator and the metric and is never shown to the policy
(the policy only ever reads `tokens_BxL`).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from collab_rl.tokenizer import ASSISTANT, CONTEXT, PAD, ROLE_NAMES, USER  # noqa: F401


@flax.struct.dataclass
class Conversation:
  tokens_BxL: jax.Array  # int32 token ids, PAD (0) after the cursor
  roles_BxL: jax.Array  # int32 PAD / CONTEXT / USER / ASSISTANT per token
  turns_BxL: jax.Array  # int32 index of the message each token belongs to (-1 for padding)
  cursor_B: jax.Array  # int32 next write position = current length
  num_turns_B: jax.Array  # int32 messages so far
  done_B: jax.Array  # bool: the user ended the conversation (or the budget did)
  overflow_B: jax.Array  # bool: a turn was cut because the row ran out of room
  intent: Any  # task-specific pytree of [B, ...] arrays, hidden from the policy

  @property
  def batch(self) -> int:
    return self.tokens_BxL.shape[0]

  @property
  def max_len(self) -> int:
    return self.tokens_BxL.shape[1]


def empty(batch: int, max_len: int, intent: Any = None) -> Conversation:
  zeros = jnp.zeros((batch, max_len), jnp.int32)
  return Conversation(tokens_BxL=zeros, roles_BxL=zeros, turns_BxL=zeros - 1,
                      cursor_B=jnp.zeros((batch,), jnp.int32),
                      num_turns_B=jnp.zeros((batch,), jnp.int32),
                      done_B=jnp.zeros((batch,), bool), overflow_B=jnp.zeros((batch,), bool),
                      intent=intent)


def append(conv: Conversation, tokens_BxN: jax.Array, lengths_B: jax.Array,
           roles_BxN: jax.Array | int, active_B: jax.Array | None = None,
           new_turn: bool = True) -> Conversation:
  """Writes each active row's first `lengths_B` tokens at its cursor.

  Rows that are done (or not `active_B`) are left unchanged. A segment longer than the room left
  is cut and the row marked `overflow_B`. `new_turn` starts a new message (turn index + 1);
  False continues the current one (e.g. an assistant header written before sampling its body).
  """
  b, l = conv.tokens_BxL.shape
  n = tokens_BxN.shape[1]
  active_B = ~conv.done_B if active_B is None else active_B & ~conv.done_B
  roles_BxN = jnp.broadcast_to(jnp.asarray(roles_BxN, jnp.int32), (b, n))
  room_B = l - conv.cursor_B
  write_B = jnp.where(active_B, jnp.minimum(lengths_B, room_B), 0)
  offset_BxL = jnp.arange(l)[None, :] - conv.cursor_B[:, None]
  inside_BxL = (offset_BxL >= 0) & (offset_BxL < write_B[:, None])
  src_BxL = jnp.clip(offset_BxL, 0, n - 1)
  turn_B = conv.num_turns_B if new_turn else jnp.maximum(conv.num_turns_B - 1, 0)
  return conv.replace(
      tokens_BxL=jnp.where(inside_BxL, jnp.take_along_axis(tokens_BxN, src_BxL, 1),
                           conv.tokens_BxL),
      roles_BxL=jnp.where(inside_BxL, jnp.take_along_axis(roles_BxN, src_BxL, 1),
                          conv.roles_BxL),
      turns_BxL=jnp.where(inside_BxL, turn_B[:, None], conv.turns_BxL),
      cursor_B=conv.cursor_B + write_B,
      num_turns_B=conv.num_turns_B + (active_B & new_turn).astype(jnp.int32),
      overflow_B=conv.overflow_B | (active_B & (lengths_B > room_B)))


def mark_done(conv: Conversation, done_B: jax.Array) -> Conversation:
  return conv.replace(done_B=conv.done_B | done_B)


def valid_mask(conv: Conversation) -> jax.Array:
  return jnp.arange(conv.max_len)[None, :] < conv.cursor_B[:, None]


def role_mask(conv: Conversation, role: int) -> jax.Array:
  return conv.roles_BxL == role


def turn_mask(conv: Conversation, turn_B: jax.Array) -> jax.Array:
  return conv.turns_BxL == turn_B[:, None]


def tokens_per_role(conv: Conversation) -> jax.Array:
  """[B, 4] token counts by role (PAD, CONTEXT, USER, ASSISTANT), padding after the cursor too."""
  return jnp.stack([jnp.sum(conv.roles_BxL == r, axis=1) for r in range(len(ROLE_NAMES))], 1)


def tokens_per_turn(conv: Conversation, num_turns: int) -> jax.Array:
  """[B, T] tokens of each message (0 for messages not yet written)."""
  t_T = jnp.arange(num_turns)
  return jnp.sum(conv.turns_BxL[:, None, :] == t_T[None, :, None], axis=2)


def last_turn(conv: Conversation, role: int, max_len: int) -> tuple[jax.Array, jax.Array]:
  """The tokens of each row's latest message of `role` (its content: role tokens only).

  Returns (tokens_BxN right-padded with PAD, lengths_B), N = max_len; rows without such a message
  get length 0. Used by simulators to read the policy's last reply.
  """
  is_role_BxL = conv.roles_BxL == role
  turn_of_BxL = jnp.where(is_role_BxL, conv.turns_BxL, -1)
  last_B = jnp.max(turn_of_BxL, axis=1)
  in_last_BxL = is_role_BxL & (conv.turns_BxL == last_B[:, None]) & (last_B[:, None] >= 0)
  # Stable compaction: positions of the selected tokens, in order, via a cumulative count.
  rank_BxL = jnp.cumsum(in_last_BxL, axis=1) - 1
  lengths_B = jnp.sum(in_last_BxL, axis=1)
  dest_BxL = jnp.where(in_last_BxL & (rank_BxL < max_len), rank_BxL, max_len)
  out = jnp.zeros((conv.batch, max_len + 1), jnp.int32)
  out = out.at[jnp.arange(conv.batch)[:, None], dest_BxL].set(conv.tokens_BxL)
  return out[:, :max_len], jnp.minimum(lengths_B, max_len)


def tile(conv: Conversation, times: int) -> Conversation:
  """Each row repeated `times` times consecutively: [B] -> [B * times] (MR's futures)."""
  return jax.tree_util.tree_map(lambda x: jnp.repeat(x, times, axis=0), conv)


def decode(conv: Conversation, tokenizer, rows: Sequence[int] | None = None) -> list[str]:
  """Readable text per row, one line per message, e.g. for logs and sample transcripts."""
  conv = jax.device_get(conv)
  rows = range(conv.tokens_BxL.shape[0]) if rows is None else rows
  texts = []
  for r in rows:
    n = int(conv.cursor_B[r])
    toks, turns = np.asarray(conv.tokens_BxL[r, :n]), np.asarray(conv.turns_BxL[r, :n])
    lines = []
    for t in sorted(set(turns.tolist())):
      lines.append(tokenizer.decode(toks[turns == t].tolist()))
    texts.append("\n".join(lines))
  return texts
