"""Policy and user simulator take turns on a batch of conversations, all on device.

A rollout is one `lax.scan` over assistant turns: the policy writes `<assistant> ... <eot>`,
the simulator answers `<user> ... <eot>`, a row whose user ended the chat stops changing. With a
scripted simulator the whole thing is one jitted function: no host round trip per turn.

A policy has `init(params, conv, prefix_width)` and `(params, conv, sim, state, key) ->
(tokens_BxN, logprobs_BxN, lengths_B, state)`:
`lm_policy` samples from a transformer (it reads the conversation tokens only); `oracle_policy`
and `answer_now_policy` are hand-written baselines that read the intent (to check the tasks).
A simulator has `init_sim(intent)` and `user_turn(intent, sim, reply_BxN, len_B, key)`, and
the task's episodes (`sample_intents`, `first_request`, the special tokens); the scripted tasks
in `collab_rl/tasks/` are their own simulators, and the LM simulator in `simulators.py` forwards
the task's. `sim` is always a simulator's state.

One assistant turn, wherever it is played (here, in MR's futures, in PPO's collection, in the data
engine): `open_reply` appends `<assistant>`, the policy (or G candidates of it) writes, and
`answer_reply` appends the reply, lets the simulator answer and marks the rows it ended.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from collab_rl import conversation as conv_lib
from collab_rl import sampling
from collab_rl import sharding as sharding_lib
from collab_rl.models.transformer import KVCache, Transformer
from collab_rl.tasks import protocol
from collab_rl.tokenizer import ASSISTANT, CONTEXT, USER


@flax.struct.dataclass
class Rollout:
  conv: conv_lib.Conversation
  sim: Any  # the simulator's state at the end (for the slot tasks: slots.SimState)
  logprobs_BxL: jax.Array  # sampling log-prob of every assistant token, 0 elsewhere
  reply_lengths_BxT: jax.Array  # tokens the policy wrote in each of its turns (0: row was done)
  watched: Any = None  # `watch(conv, sim)` after every turn, stacked [T, ...] (None: no watch)


# ------------------------------------------------------------------------------------------------
# Policies: `init(params, conv, prefix_width) -> state` and `(params, conv, sim, state, key) ->
# (tokens_BxN, logprobs_BxN, lengths_B, state)`; the state carries a KV cache across turns.
# ------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class LMState:
  cache: KVCache
  upto_B: jax.Array  # conversation positions [0, upto) are in the cache


class LMPolicy:
  """Samples replies from a transformer, with one KV cache for the whole conversation.

  `init` prefills the conversation so far; each turn then feeds only what it gained since (the
  previous reply's last token, the user's answer, the assistant header: at most `chunk_width`
  tokens) and decodes. Nothing is recomputed, so a turn costs its new tokens, not the whole
  history. The policy reads the conversation tokens only, never the intent.
  """

  def __init__(self, model: Transformer, cfg: sampling.SamplingConfig, *, chunk_width: int,
               max_turns: int):
    self.model, self.cfg = model, cfg
    self.chunk_width, self.max_turns = chunk_width, max_turns

  def init(self, params, conv: conv_lib.Conversation, prefix_width: int | None = None) -> LMState:
    w = conv.max_len if prefix_width is None else min(prefix_width, conv.max_len)
    size = w + self.max_turns * (self.chunk_width + self.cfg.max_new_tokens - 1)
    cache = KVCache.init(self.model.cfg, conv.batch, size)
    upto_B = jnp.minimum(conv.cursor_B, w)
    out = self.model.apply({"params": params}, conv.tokens_BxL[:, :w],
                           valid_BxL=jnp.arange(w)[None, :] < upto_B[:, None], cache=cache,
                           heads=())
    return LMState(out.cache, upto_B)

  def __call__(self, params, conv, sim, state: LMState, key):
    del sim  # the policy never sees the hidden intent or the simulator's state
    active_B = ~conv.done_B
    chunk_BxW = gather_rows(conv.tokens_BxL, state.upto_B, self.chunk_width)
    chunk_len_B = jnp.minimum(conv.cursor_B - state.upto_B, self.chunk_width)
    out, cache = sampling.prefill_and_decode(self.model, self.cfg, params, state.cache, chunk_BxW,
                                             chunk_len_B, state.upto_B, key, active_B)
    # Every generated token but the last went into the cache during decoding.
    upto_B = jnp.where(active_B, conv.cursor_B + jnp.maximum(out.lengths_B - 1, 0),
                       state.upto_B)
    return out.tokens_BxN, out.logprobs_BxN, out.lengths_B, LMState(cache, upto_B)


def lm_policy(model: Transformer, cfg: sampling.SamplingConfig, *, chunk_width: int = 32,
              max_turns: int = 8) -> LMPolicy:
  return LMPolicy(model, cfg, chunk_width=chunk_width, max_turns=max_turns)


def chunk_width(task) -> int:
  """What a conversation of `task` gains between two replies, at most (`protocol.Task`): the
  `chunk_width` of an `LMPolicy` that plays the task."""
  return task.chunk_width


class _Scripted:
  """Hand-written baselines: stateless, and they read the intent (to check the tasks)."""

  def __init__(self, fn):
    self._fn = fn

  def init(self, params, conv, prefix_width=None):
    return ()

  def __call__(self, params, conv, sim, state, key):
    return (*self._fn(conv, sim, key), state)


def oracle_policy(task) -> _Scripted:
  """Asks for every slot it has not been told, then answers with the intended artifact."""
  def policy(conv, sim, key):
    del key
    b = conv.batch
    pending_BxK = ~sim.known_BxK
    slot_B = jnp.argmax(pending_BxK, 1)
    ask_BxN = jnp.stack([jnp.full((b,), task.ids["ask"]),
                         jnp.asarray(task.name_ids_K)[slot_B],
                         jnp.full((b,), task.eot_id)], 1)
    ask_BxN = jnp.pad(ask_BxN, ((0, 0), (0, task.answer_len + 1 - 3)))
    answer_BxN = jnp.concatenate([task.ideal_answer(conv.intent),
                                  jnp.full((b, 1), task.eot_id, jnp.int32)], 1)
    asking = jnp.any(pending_BxK, 1)
    toks = jnp.where(asking[:, None], ask_BxN, answer_BxN)
    lengths = jnp.where(asking, 3, task.answer_len + 1)
    return toks, jnp.zeros(toks.shape, jnp.float32), lengths
  return _Scripted(policy)


def answer_now_policy(task, key_for_guess: int = 0) -> _Scripted:
  """Never asks: fills each slot it has not been told with a guess and answers at once. After
  `wrong` it does not say the rejected answer again: each slot it still guesses moves on to the
  value after its last guess (a systematic search, which a policy can learn from the
  conversation alone; a fresh random guess would repeat the rejected one by chance, and a
  greedy policy that imitates it repeats it every time)."""
  def policy(conv, sim, key):
    b = conv.batch
    guess_BxK = task.sample_values(jax.random.fold_in(key, key_for_guess), b)
    last_BxK = sim.answer_BxK  # the latest answer's values, -1 where none was valid
    next_BxK = (last_BxK + 1) % jnp.asarray(task.num_values_K)[None, :]
    guess_BxK = jnp.where(last_BxK >= 0, next_BxK, guess_BxK)
    values = jnp.where(sim.known_BxK, conv.intent.values_BxK, guess_BxK)
    no_hole = jnp.zeros_like(sim.known_BxK)
    body = task._render(task.answer_template, values, no_hole)
    toks = jnp.concatenate([body, jnp.full((b, 1), task.eot_id, jnp.int32)], 1)
    return toks, jnp.zeros(toks.shape, jnp.float32), jnp.full((b,), toks.shape[1], jnp.int32)
  return _Scripted(policy)


# ------------------------------------------------------------------------------------------------
# The loop.
# ------------------------------------------------------------------------------------------------


def opening_width(task) -> int:
  """Columns of the task's longest opening: what a policy prefills first."""
  return task.opening_width


def conversation_len(task, turns: int, reply_tokens: int) -> int:
  """Columns of a conversation of `turns` assistant turns, each reply and user answer at its
  budget (with headers and end-of-turn tokens): the opening, then the turns."""
  return task.conversation_len(turns, reply_tokens)


def tile_rows(tree, times: int):
  """Each row `times` times consecutively ([B] -> [B * times]); scalars (a KV cache's shared
  write index) stay as they are. How G candidates and S futures share one history."""
  return jax.tree_util.tree_map(lambda x: x if x.ndim == 0 else jnp.repeat(x, times, axis=0),
                                tree)


def gather_rows(src_BxL, start_B, width: int):
  """[B, width] windows src[b, start_b : start_b + width] (PAD past the end)."""
  l = src_BxL.shape[1]
  idx = start_B[:, None] + jnp.arange(width)[None, :]
  return jnp.where(idx < l, jnp.take_along_axis(src_BxL, jnp.clip(idx, 0, l - 1), 1), 0)


def scatter_rows(dst_BxL, src_BxN, start_B, len_B):
  """dst[b, start_b + i] = src[b, i] for i < len_b (a masked gather, like conversation.append)."""
  l, n = dst_BxL.shape[1], src_BxN.shape[1]
  off = jnp.arange(l)[None, :] - start_B[:, None]
  inside = (off >= 0) & (off < len_B[:, None])
  return jnp.where(inside, jnp.take_along_axis(src_BxN, jnp.clip(off, 0, n - 1), 1), dst_BxL)


def _where_rows(mask_B, new, old):
  """Row b of every leaf from `new` where mask_B[b], else from `old`; a KV cache is `new`'s
  whole. Sampling writes nothing valid for a row it is told is inactive
  (`sampling.prefill_and_decode`), so such a row's cache already reads as `old`'s; selecting
  would keep the old cache alive through the whole turn, and XLA then copies the cache (on a TPU
  slice the largest array of a rollout) before the turn writes it."""
  def pick(n, o):
    if isinstance(n, KVCache):
      return n
    return jnp.where(mask_B.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
  return jax.tree_util.tree_map(pick, new, old, is_leaf=lambda x: isinstance(x, KVCache))


def _frame(ids, b: int):
  """A turn frame's ids (`protocol.Task.assistant_header`, ...) for every row: ([B, n], [B])."""
  return (jnp.tile(jnp.asarray(ids, jnp.int32)[None, :], (b, 1)),
          jnp.full((b,), len(ids), jnp.int32))


def start(simulator, intent, max_len: int) -> tuple[conv_lib.Conversation, Any]:
  """The task's opening (for the slot tasks `<bos> <user> first request <eot>`), and the
  simulator's initial state."""
  conv = conv_lib.empty(protocol.batch_size(intent), max_len, intent)
  for seg in simulator.opening(intent):
    conv = conv_lib.append(conv, seg.tokens_BxN, seg.lengths_B, seg.role, new_turn=seg.new_turn)
  return conv, simulator.init_sim(intent)


def open_reply(simulator, conv: conv_lib.Conversation) -> conv_lib.Conversation:
  """Appends the assistant header: the conversation as the policy reads it when it writes."""
  return conv_lib.append(conv, *_frame(simulator.assistant_header, conv.batch), CONTEXT)


def append_reply(simulator, conv, reply_BxN, reply_len_B) -> conv_lib.Conversation:
  """The reply as the policy wrote it, then what the task closes a reply with (the rest of a
  chat template's end of turn). Rows that are done gain nothing."""
  reply_len_B = jnp.where(conv.done_B, 0, reply_len_B)
  conv = conv_lib.append(conv, reply_BxN, reply_len_B, ASSISTANT, new_turn=False)
  close = simulator.close_reply(reply_BxN, reply_len_B)
  if close is not None:
    conv = conv_lib.append(conv, close.tokens_BxN, close.lengths_B, close.role,
                           new_turn=close.new_turn)
  return conv


def answer_reply(simulator, conv, sim, reply_BxN, reply_len_B, key, append_user: bool = True):
  """The rest of the turn `open_reply` began: appends the policy's reply, the simulator answers
  it, and (when `append_user`) the user header and answer are appended and the rows it ended are
  marked done. Rows that were already done gain nothing and keep their simulator state."""
  active = ~conv.done_B
  reply_len_B = jnp.where(active, reply_len_B, 0)
  conv = append_reply(simulator, conv, reply_BxN, reply_len_B)
  user, user_len, done, new_sim = simulator.user_turn(conv.intent, sim, reply_BxN, reply_len_B,
                                                      key)
  sim = _where_rows(active, new_sim, sim)
  if append_user:
    conv = conv_lib.append(conv, *_frame(simulator.user_header, conv.batch), CONTEXT)
    conv = conv_lib.append(conv, user, user_len, USER, new_turn=False)
    conv = conv_lib.mark_done(conv, done & active)
  return conv, sim


def take_turns(policy, simulator, params, conv, sim, key, num_turns: int, *,
               logprobs_BxL=None, policy_state=None, prefix_width=None, watch=None) -> Rollout:
  """`num_turns` assistant turns, each answered by the simulator (MR's futures start here too).

  `watch(conv, sim) -> pytree`, if given, is read after every turn (the user's answer included):
  what a caller needs of the intermediate states (e.g. the mediator's cuts) without the scan
  returning every state.
  """
  if logprobs_BxL is None:
    logprobs_BxL = jnp.zeros(conv.tokens_BxL.shape, jnp.float32)

  def turn(carry, t):
    conv, sim, pstate, logprobs_BxL = carry
    k_pol, k_sim = jax.random.split(jax.random.fold_in(key, t))
    active = ~conv.done_B
    conv = open_reply(simulator, conv)
    reply, logp, reply_len, pstate = policy(params, conv, sim, pstate, k_pol)
    reply_len = jnp.where(active, reply_len, 0)
    logprobs_BxL = scatter_rows(logprobs_BxL, logp, conv.cursor_B, reply_len)
    conv, sim = answer_reply(simulator, conv, sim, reply, reply_len, k_sim)
    seen = None if watch is None else watch(conv, sim)
    return (conv, sim, pstate, logprobs_BxL), (reply_len, seen)

  if policy_state is None:
    policy_state = policy.init(params, conv, prefix_width)
  (conv, sim, _, logprobs_BxL), (lens_TxB, watched) = jax.lax.scan(
      turn, (conv, sim, policy_state, logprobs_BxL), jnp.arange(num_turns))
  return Rollout(conv, sim, logprobs_BxL, lens_TxB.T, watched)


def rollout(policy, simulator, params, key, batch: int, *, num_turns: int,
            max_len: int, intent=None, mesh=None, watch=None) -> Rollout:
  """Fresh episodes (or the given intents) played for `num_turns` assistant turns.

  With a mesh, every [B, ...] array is split over data x fsdp, so each device plays its rows.
  """
  k_int, k_turns = jax.random.split(key)
  intent = simulator.sample_intents(k_int, batch) if intent is None else intent
  conv, sim = start(simulator, intent, max_len)
  if mesh is not None:
    conv, sim = jax.lax.with_sharding_constraint((conv, sim), sharding_lib.batch_sharding(mesh))
  # Only the opening's columns need prefilling.
  return take_turns(policy, simulator, params, conv, sim, k_turns, num_turns,
                    prefix_width=opening_width(simulator), watch=watch)


def make_rollout(policy, simulator, *, batch: int, num_turns: int, max_len: int, mesh=None):
  """The jitted rollout: `(params, key) -> Rollout`, one compilation per config."""
  if mesh is not None:
    sharding_lib.check_batch(batch, mesh)
  return jax.jit(functools.partial(rollout, policy, simulator, batch=batch, num_turns=num_turns,
                                   max_len=max_len, mesh=mesh))
