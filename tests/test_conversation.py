"""Conversation: appends at per-row cursors, done rows frozen, overflow, role/turn reads."""

import jax
import jax.numpy as jnp
import numpy as np

from collab_rl import conversation as conv_lib
from collab_rl.tokenizer import ASSISTANT, CONTEXT, PAD, USER


def test_append_writes_at_each_rows_cursor():
  conv = conv_lib.empty(2, 8)
  conv = conv_lib.append(conv, jnp.array([[5, 6, 7], [8, 9, 0]]), jnp.array([3, 2]), USER)
  conv = conv_lib.append(conv, jnp.array([[1, 2], [3, 4]]), jnp.array([1, 2]), ASSISTANT)
  np.testing.assert_array_equal(conv.tokens_BxL, [[5, 6, 7, 1, 0, 0, 0, 0],
                                                  [8, 9, 3, 4, 0, 0, 0, 0]])
  np.testing.assert_array_equal(conv.roles_BxL, [[USER] * 3 + [ASSISTANT] + [PAD] * 4,
                                                 [USER] * 2 + [ASSISTANT] * 2 + [PAD] * 4])
  np.testing.assert_array_equal(conv.turns_BxL, [[0, 0, 0, 1, -1, -1, -1, -1],
                                                 [0, 0, 1, 1, -1, -1, -1, -1]])
  np.testing.assert_array_equal(conv.cursor_B, [4, 4])
  np.testing.assert_array_equal(conv.num_turns_B, [2, 2])


def test_continue_turn_done_rows_and_overflow():
  conv = conv_lib.empty(3, 4)
  conv = conv_lib.append(conv, jnp.array([[7], [7], [7]]), jnp.ones(3, jnp.int32), CONTEXT)
  conv = conv_lib.append(conv, jnp.array([[1, 2], [1, 2], [1, 2]]), jnp.array([2, 2, 2]),
                         ASSISTANT, new_turn=False)
  np.testing.assert_array_equal(conv.turns_BxL[0], [0, 0, 0, -1])  # header + body: one message
  conv = conv_lib.mark_done(conv, jnp.array([False, True, False]))
  before = jax.device_get(conv)
  conv = conv_lib.append(conv, jnp.array([[3, 4, 5]] * 3), jnp.array([1, 3, 3]), USER)
  np.testing.assert_array_equal(conv.tokens_BxL[1], before.tokens_BxL[1])  # done: unchanged
  np.testing.assert_array_equal(conv.tokens_BxL[0], [7, 1, 2, 3])
  np.testing.assert_array_equal(conv.tokens_BxL[2], [7, 1, 2, 3])  # cut to the room left
  np.testing.assert_array_equal(conv.overflow_B, [False, False, True])
  np.testing.assert_array_equal(conv.cursor_B, [4, 3, 4])


def test_counts_last_turn_and_tile():
  conv = conv_lib.empty(2, 10)
  conv = conv_lib.append(conv, jnp.array([[5, 6], [5, 6]]), jnp.array([2, 1]), USER)
  conv = conv_lib.append(conv, jnp.array([[9, 8, 7], [9, 8, 7]]), jnp.array([3, 2]), ASSISTANT)
  conv = conv_lib.append(conv, jnp.array([[4], [4]]), jnp.array([1, 1]), USER)
  conv = conv_lib.append(conv, jnp.array([[1, 2], [3, 0]]), jnp.array([2, 1]), ASSISTANT)
  np.testing.assert_array_equal(conv_lib.tokens_per_role(conv)[:, [USER, ASSISTANT]],
                                [[3, 5], [2, 3]])
  np.testing.assert_array_equal(conv_lib.tokens_per_turn(conv, 5), [[2, 3, 1, 2, 0],
                                                                    [1, 2, 1, 1, 0]])
  toks, lens = conv_lib.last_turn(conv, ASSISTANT, 4)
  np.testing.assert_array_equal(toks, [[1, 2, 0, 0], [3, 0, 0, 0]])
  np.testing.assert_array_equal(lens, [2, 1])
  tiled = conv_lib.tile(conv, 3)
  assert tiled.tokens_BxL.shape == (6, 10)
  np.testing.assert_array_equal(tiled.tokens_BxL[3:], np.repeat(conv.tokens_BxL[1:], 3, 0))


def test_append_is_jittable_without_recompiling(compile_counter):
  append = jax.jit(conv_lib.append, static_argnames=("new_turn",))
  conv = conv_lib.empty(4, 16)
  conv = append(conv, jnp.ones((4, 3), jnp.int32), jnp.array([1, 2, 3, 0]), USER)
  with compile_counter as counter:
    conv = append(conv, jnp.ones((4, 3), jnp.int32), jnp.array([3, 2, 1, 0]), ASSISTANT)
  assert counter.count == 0
  np.testing.assert_array_equal(conv.cursor_B, [4, 4, 4, 0])
