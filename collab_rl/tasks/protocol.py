"""What a task gives the rollout, the rewards, the trainers and `evaluate`: one small protocol that
both tiers implement (`slots.SlotTask` for the verifiable tasks, `text.TextTask` for CollabLLM
records played against an LM user), so that none of them knows which tier it runs.

A conversation is a fixed-shape `Conversation` of the *policy's* token ids. The task writes
everything in it that the policy does not:

    opening(intent)        the conversation's start: template prefix, user header, first request
    assistant_header       ids appended before every reply (`rollout.open_reply`)
    close_reply(...)       ids appended after a reply (the rest of the template's end of turn)
    user_header            ids appended before every user turn
    user_turn(...)         the user's answer to the latest reply (its content and end of turn),
                           whether the user ended the chat, and the user's new state

and the sizes that buffers and caches are allocated with (`opening_width`, `chunk_width`,
`conversation_len`), so that no caller needs a slot task's widths. `init_sim(intent)` is the
user's state at the start (`sim` everywhere); the intent is the hidden goal, carried by the
conversation and never shown to the policy.

Scores. A task with `device_scored = True` scores a conversation inside `jit`
(`conversation_scores`: the task metric and interactivity, [B] each), so MR's futures are reduced
where they are played. A task without it (text metrics: answer matching, BLEU, sandboxed tests,
LM judges) hands the finished conversations back and they are scored on the host between jitted
phases, once per batch (`text_scores.py`).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, Sequence

import jax


class Segment(NamedTuple):
  """Ids appended in one go to every row: `tokens_BxN` (each row's first `lengths_B`), with one
  role, starting a new message (`new_turn`) or continuing the current one."""
  tokens_BxN: jax.Array
  lengths_B: jax.Array
  role: int
  new_turn: bool


class Task(Protocol):
  name: str
  tokenizer: Any  # the policy's tokenizer (`tokenizer.Tokenizer`)
  vocab_size: int  # ids the policy must be able to write (its model may have more)
  stop_tokens: tuple[int, ...]  # where a reply ends (the policy's end-of-turn token first)
  assistant_header: tuple[int, ...]
  user_header: tuple[int, ...]
  device_scored: bool

  @property
  def opening_width(self) -> int:
    """Columns of the longest opening: what a policy prefills first."""

  @property
  def chunk_width(self) -> int:
    """What a conversation gains between two replies, at most, counted from the previous reply's
    last token (not in the policy's cache yet) to the next assistant header included: the
    `chunk_width` of an `LMPolicy` that plays the task."""

  def conversation_len(self, turns: int, reply_tokens: int) -> int:
    """Columns of a conversation of `turns` replies of at most `reply_tokens` tokens each."""

  def opening(self, intent) -> Sequence[Segment]:
    ...

  def close_reply(self, reply_BxN: jax.Array, len_B: jax.Array) -> Segment | None:
    """What follows a reply of `len_B` tokens before the user's header (None: nothing)."""

  def init_sim(self, intent) -> Any:
    ...

  def user_turn(self, intent, sim, reply_BxN: jax.Array, len_B: jax.Array,
                key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
    """(tokens_BxM, lengths_B, done_B, new sim): the user's turn after the header; a row with
    `len_B == 0` (a finished conversation) gains nothing."""


def batch_size(intent) -> int:
  """Rows of an intent pytree (every leaf is [B, ...])."""
  return jax.tree_util.tree_leaves(intent)[0].shape[0]
