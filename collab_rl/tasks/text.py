"""The language tier on device: CollabLLM records played by a Hugging Face policy against an LM
user, inside the rollout's jit.

Per turn, the policy's reply (ids) is appended to the user's own chat between the user
template's frames (`Tokenizer.turn_frame`, precomputed ids; the policy's replies are the user
model's "user" turns), the user LM prefills what its KV cache lacks and samples its answer, and
the answer is written into the policy's conversation between the policy template's user header
and end of turn. Only the user's prompt holds the record's goal (`text_records.py` builds it on
the host). The two models share one vocabulary (checked: turns pass between them as ids, never
as strings), each with its own chat template. The user ends the chat with `TERMINATE` (a token
subsequence, found in any of its tokenizations); a user turn that writes the assistant's part
(`CONFUSION_PHRASES`, or a header of the template), one cut by its budget, and a chat that only
the turn cap ends are counted in the user's state and reported.

Scores are text metrics and LM judges: the task is not `device_scored`; `text_scores.py` scores
finished conversations between jitted phases.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from collab_rl import conversation as conv_lib
from collab_rl import rollout as rollout_lib
from collab_rl import sampling
from collab_rl import tokenizer as tokenizer_lib
from collab_rl.models import hf
from collab_rl.models.attention import KVCache
from collab_rl.models.transformer import Transformer
from collab_rl.tasks import protocol
from collab_rl.tasks import text_records
from collab_rl.tasks.text_records import (TERMINATE, TextIntent, UserConfig,  # noqa: F401
                                          UserSide, first_request, opening_ids)
from collab_rl.tokenizer import ASSISTANT, CONTEXT, USER

# What a user who slipped into the assistant's part writes (CollabLLM reports open simulators
# "often get confused" this way); matched on tokens, as written mid-message or at its start.
CONFUSION_PHRASES = ("As an AI", "I'm an AI", "How can I help you", "How can I assist you",
                     "Assistant:")


def _variants(tok: tokenizer_lib.Tokenizer, phrase: str) -> list[tuple[int, ...]]:
  """The phrase's token ids as it may be written: at a message's start, after a space or a
  line break (byte-level BPE tokenizes each differently); the shared tail where the first token
  differs, so that a match does not depend on what came before."""
  out = set()
  for text in (phrase, " " + phrase, "\n" + phrase):
    ids = tuple(tok.encode(text))
    out.add(ids[1:] if len(ids) > 2 else ids)
  return sorted(out)


def _contains(tokens_BxN: jax.Array, len_B: jax.Array, pattern: Sequence[int]) -> jax.Array:
  """[B] the first len_B tokens of a row hold `pattern` as a contiguous run."""
  b, n = tokens_BxN.shape
  m = len(pattern)
  if m > n:
    return jnp.zeros((b,), bool)
  starts = jnp.arange(n - m + 1)
  windows_BxSxM = tokens_BxN[:, starts[:, None] + jnp.arange(m)[None, :]]
  hit_BxS = jnp.all(windows_BxSxM == jnp.asarray(pattern, jnp.int32), -1)
  return jnp.any(hit_BxS & (starts[None, :] + m <= len_B[:, None]), 1)


@flax.struct.dataclass
class TextUserState:
  """The LM user's state; every leaf is [B, ...], so MR tiles it row by row with its cache."""
  view: conv_lib.Conversation  # the user's own chat, in its template (intent not kept)
  cache: KVCache  # `index` per row (all equal in use)
  upto_B: jax.Array  # view positions [0, upto) are in the cache
  turns_B: jax.Array  # int32 user turns written
  ended_B: jax.Array  # bool: the user wrote TERMINATE
  confused_B: jax.Array  # int32 turns in which it wrote the assistant's part
  cut_B: jax.Array  # int32 turns cut by `max_user_len`


@flax.struct.dataclass
class RecordRows:
  """The part of a `TextIntent` that scoring needs: which record each row plays."""
  row_B: jax.Array
  ambiguous_B: jax.Array


@flax.struct.dataclass
class UserCounts:
  """What the LM user did, per conversation (`TextUserState` without its chat and cache)."""
  turns_B: jax.Array
  ended_B: jax.Array
  confused_B: jax.Array
  cut_B: jax.Array


def played(conv: conv_lib.Conversation, sim: TextUserState):
  """(conv, user counts) of played conversations, light enough to bring to the host for scoring:
  the policy's ids and the record of each row, not the user's prompt, chat or cache."""
  rows = RecordRows(conv.intent.row_B, conv.intent.ambiguous_B)
  return conv.replace(intent=rows), UserCounts(sim.turns_B, sim.ended_B, sim.confused_B,
                                               sim.cut_B)


class TextTask:
  """`protocol.Task` for CollabLLM records with an LM user (see the module docstring).

  policy_tok: the policy's tokenizer; user_model / user_tok: the user LM (`hf.load_pretrained`
  and `Tokenizer.from_pretrained` of its folder; it may be the policy's checkpoint);
  reply_tokens: the policy's reply budget; max_turns: replies a conversation may reach (turns
  plus MR's window), which the user's cache is sized for. `bind(params)` gives the user its
  params, inside jit (as `simulators.LMSimulator`).
  """

  name = "collabllm"
  device_scored = False

  def __init__(self, policy_tok: tokenizer_lib.Tokenizer, user_model: Transformer,
               user_tok: tokenizer_lib.Tokenizer, ucfg: UserConfig, *, reply_tokens: int,
               max_turns: int, params: Any = None):
    if user_tok.tokenizer.get_vocab(True) != policy_tok.tokenizer.get_vocab(True):
      raise ValueError("the user's tokenizer has another vocabulary than the policy's: on the "
                       "device their turns pass as token ids, so both must use one vocabulary "
                       "(each may have its own chat template)")
    if user_model.cfg.vocab_size < user_tok.vocab_size:
      raise ValueError(f"the user model's vocab_size={user_model.cfg.vocab_size} is smaller "
                       f"than its tokenizer's {user_tok.vocab_size}")
    self.tokenizer, self.ucfg, self.params = policy_tok, ucfg, params
    self.user_model, self.user = user_model, UserSide(user_tok, ucfg)
    self.vocab_size = policy_tok.vocab_size
    self.stop_tokens = policy_tok.stop_tokens
    self.eot_id = policy_tok.eot_id
    asst, usr = policy_tok.turn_frame("assistant"), policy_tok.turn_frame("user")
    self.assistant_header, self.user_header = asst.header_ids, usr.header_ids
    self.assistant_footer, self.user_footer = asst.footer_ids, usr.footer_ids
    self.reply_tokens, self.max_turns = reply_tokens, max_turns
    if ucfg.first_turn == "user":
      self.first_prefix, self.first_footer = text_records.first_frame(policy_tok)
    self._opens = jax.jit(lambda u, i, k: self.bind(u).user_opens(i, k))
    greedy = ucfg.temperature == 0
    self.user_cfg = sampling.SamplingConfig(
        max_new_tokens=ucfg.max_user_len, temperature=1.0 if greedy else ucfg.temperature,
        greedy=greedy, stop_tokens=user_tok.stop_tokens, pad_id=0)
    uf = self.user
    # What the user's chat gains before it samples: its last token, its end of turn, the
    # policy's reply between the frames of a "user" turn, its own header.
    self.user_chunk = (1 + len(uf.own_frame.footer_ids) + len(uf.reply_frame.header_ids)
                       + reply_tokens + len(uf.reply_frame.footer_ids)
                       + len(uf.own_frame.header_ids))
    self.view_len = ucfg.max_prompt_tokens + max_turns * (self.user_chunk + ucfg.max_user_len)
    self.end_patterns = _variants(user_tok, TERMINATE)
    self.confusion_patterns = [p for phrase in CONFUSION_PHRASES
                               for p in _variants(user_tok, phrase)]
    for frame in (uf.reply_frame, policy_tok.turn_frame("assistant")):
      if len(frame.header_ids) > 1:  # a single id could be an ordinary word
        self.confusion_patterns.append(tuple(frame.header_ids))

  # --- protocol.Task: sizes and frames ---------------------------------------------------------

  @property
  def opening_width(self) -> int:
    return self.ucfg.max_request_tokens

  @property
  def chunk_width(self) -> int:
    # the reply's last token, the rest of its end of turn (all of it after a cut reply), the
    # user header, the user's turn and its end of turn, the assistant header
    return (1 + len(self.assistant_footer) + len(self.user_header) + self.ucfg.max_user_len
            + len(self.user_footer) + len(self.assistant_header))

  def conversation_len(self, turns: int, reply_tokens: int) -> int:
    per_turn = (len(self.assistant_header) + reply_tokens + len(self.assistant_footer)
                + len(self.user_header) + self.ucfg.max_user_len + len(self.user_footer))
    return self.ucfg.max_request_tokens + turns * per_turn

  def opening(self, intent: TextIntent) -> list[protocol.Segment]:
    return [protocol.Segment(intent.opening_BxN, intent.opening_len_B, intent.opening_roles_BxN,
                             True)]

  def _stopped(self, tokens_BxN, len_B) -> jax.Array:
    last_B = jnp.take_along_axis(tokens_BxN, jnp.maximum(len_B - 1, 0)[:, None], 1)[:, 0]
    return (len_B > 0) & jnp.isin(last_B, jnp.asarray(self.stop_tokens, jnp.int32))

  def close_reply(self, reply_BxN, len_B) -> protocol.Segment:
    """The rest of the template's end of turn after a reply that stopped (its first id is the
    stop token the policy wrote), all of it after a reply cut by its budget."""
    b = reply_BxN.shape[0]
    footer_F = jnp.asarray(self.assistant_footer, jnp.int32)
    stopped_B = self._stopped(reply_BxN, len_B)
    f = footer_F.shape[0]
    idx_BxF = jnp.arange(f)[None, :] + stopped_B[:, None].astype(jnp.int32)
    toks_BxF = jnp.where(idx_BxF < f, footer_F[jnp.clip(idx_BxF, 0, f - 1)], 0)
    len_B = jnp.where(len_B > 0, f - stopped_B.astype(jnp.int32), 0)
    return protocol.Segment(jnp.broadcast_to(toks_BxF, (b, f)), len_B, CONTEXT, False)

  # --- The LM user ------------------------------------------------------------------------------

  def bind(self, params) -> "TextTask":
    bound = copy.copy(self)
    bound.params = params
    return bound

  def init_sim(self, intent: TextIntent) -> TextUserState:
    if self.params is None:
      raise ValueError("TextTask has no user params: use task.bind(user_params) (inside jit)")
    b, p = intent.user_prompt_BxP.shape
    view = conv_lib.empty(b, self.view_len)
    view = conv_lib.append(view, intent.user_prompt_BxP, intent.user_prompt_len_B, CONTEXT)
    size = p + self.max_turns * (self.user_chunk + self.user_cfg.max_new_tokens - 1)
    cache = KVCache.init(self.user_model.cfg, b, size)
    valid_BxP = jnp.arange(p)[None, :] < intent.user_prompt_len_B[:, None]
    out = self.user_model.apply({"params": self.params}, intent.user_prompt_BxP,
                                valid_BxL=valid_BxP, cache=cache, heads=())
    zeros = jnp.zeros((b,), jnp.int32)
    cache = out.cache.replace(index=jnp.broadcast_to(out.cache.index, (b,)))
    return TextUserState(view, cache, intent.user_prompt_len_B, zeros, zeros > 0, zeros, zeros)

  def user_turn(self, intent, sim: TextUserState, reply_BxN, len_B, key):
    """(tokens_BxM, lengths_B, done_B, new state), M = max_user_len + the user footer."""
    del intent  # the goal is in the user's prompt, already in its cache
    b = reply_BxN.shape[0]
    active_B = len_B > 0
    content_B = len_B - self._stopped(reply_BxN, len_B).astype(jnp.int32)
    uf = self.user
    frame = lambda ids: rollout_lib._frame(ids, b)  # pylint: disable=protected-access
    view = conv_lib.append(sim.view, *frame(uf.reply_frame.header_ids), CONTEXT, active_B)
    view = conv_lib.append(view, reply_BxN, content_B, ASSISTANT, active_B, new_turn=False)
    view = conv_lib.append(view, *frame(uf.reply_frame.footer_ids), CONTEXT, active_B, False)
    view = conv_lib.append(view, *frame(uf.own_frame.header_ids), CONTEXT, active_B)
    chunk_BxW = rollout_lib.gather_rows(view.tokens_BxL, sim.upto_B, self.user_chunk)
    chunk_len_B = jnp.minimum(view.cursor_B - sim.upto_B, self.user_chunk)
    cache = sim.cache.replace(index=jnp.max(sim.cache.index))
    out, cache = sampling.prefill_and_decode(self.user_model, self.user_cfg, self.params, cache,
                                             chunk_BxW, chunk_len_B, sim.upto_B, key, active_B)
    said_B = out.lengths_B - out.stopped_B.astype(jnp.int32)  # without its stop token
    start_B = view.cursor_B
    view = conv_lib.append(view, out.tokens_BxN, said_B, USER, active_B, new_turn=False)
    view = conv_lib.append(view, *frame(uf.own_frame.footer_ids), CONTEXT, active_B, False)
    # Every generated token but the last went into the cache while decoding.
    upto_B = jnp.where(active_B, start_B + jnp.maximum(out.lengths_B - 1, 0), sim.upto_B)
    ended_B = active_B & jnp.any(jnp.stack(
        [_contains(out.tokens_BxN, said_B, p) for p in self.end_patterns]), 0)
    confused_B = active_B & jnp.any(jnp.stack(
        [_contains(out.tokens_BxN, out.lengths_B, p) for p in self.confusion_patterns]), 0)
    # The policy reads the user's words between its own template's user frames.
    footer_F = jnp.asarray(self.user_footer, jnp.int32)
    m = self.ucfg.max_user_len + footer_F.shape[0]
    pos_BxM = jnp.arange(m)[None, :]
    said = jnp.pad(out.tokens_BxN, ((0, 0), (0, m - out.tokens_BxN.shape[1])))
    tail_BxM = footer_F[jnp.clip(pos_BxM - said_B[:, None], 0, footer_F.shape[0] - 1)]
    toks_BxM = jnp.where(pos_BxM < said_B[:, None], said, tail_BxM)
    count = lambda x_B: (active_B & x_B).astype(jnp.int32)
    new = TextUserState(view, cache.replace(index=jnp.broadcast_to(cache.index, (b,))), upto_B,
                        sim.turns_B + count(active_B), sim.ended_B | ended_B,
                        sim.confused_B + count(confused_B), sim.cut_B + count(~out.stopped_B))
    lengths_B = jnp.where(active_B, said_B + footer_F.shape[0], 0)
    return toks_BxM, lengths_B, ended_B, new

  def user_opens(self, intent: TextIntent, key: jax.Array) -> TextIntent:
    """The intent with the opening message the bound LM user writes from its goal (its prompt
    ends with its own header): sampled once, written into its own chat with its end of turn,
    and into the policy's opening after the template's prefix, with the policy template's end
    of turn. What `sim.first_turn = "user"` plays (CollabLLM's simulator opens so)."""
    b, p = intent.user_prompt_BxP.shape
    cache = KVCache.init(self.user_model.cfg, b, p + self.user_cfg.max_new_tokens)
    out, _ = sampling.prefill_and_decode(self.user_model, self.user_cfg, self.params, cache,
                                         intent.user_prompt_BxP, intent.user_prompt_len_B,
                                         jnp.zeros((b,), jnp.int32), key)
    said_B = out.lengths_B - out.stopped_B.astype(jnp.int32)
    frame = lambda ids: rollout_lib._frame(ids, b)  # pylint: disable=protected-access

    def write(dst_BxL, len_B, pieces):
      for toks, n in pieces:
        dst_BxL = rollout_lib.scatter_rows(dst_BxL, toks, len_B, n)
        len_B = len_B + n
      return dst_BxL, len_B

    prompt, prompt_len = write(intent.user_prompt_BxP, intent.user_prompt_len_B,
                               [(out.tokens_BxN, said_B),
                                frame(self.user.own_frame.footer_ids)])
    opening, opening_len = write(intent.opening_BxN, intent.opening_len_B,
                                 [(out.tokens_BxN, said_B), frame(self.first_footer)])
    in_turn = jnp.arange(opening.shape[1])[None, :] >= intent.opening_len_B[:, None]
    return intent.replace(opening_BxN=opening, opening_len_B=opening_len,
                          opening_roles_BxN=jnp.where(in_turn, USER, intent.opening_roles_BxN),
                          user_prompt_BxP=prompt, user_prompt_len_B=prompt_len)

  def open_episodes(self, user_params, intent: TextIntent, key) -> TextIntent:
    """`intent` as the rollout plays it: unchanged when the records write the opening, else
    with the opening the LM user writes (`user_opens`, one jitted call per batch)."""
    if self.ucfg.first_turn != "user":
      return intent
    return self._opens(user_params, intent, key)

  # --- Records -> ids (host) --------------------------------------------------------------------

  def encode(self, records: Sequence[dict], first_row: int = 0) -> TextIntent:
    """`text_records.encode`: a batch of records as ids, each checked against its budgets."""
    return text_records.encode(self, records, first_row)


# ------------------------------------------------------------------------------------------------
# From an experiment config.
# ------------------------------------------------------------------------------------------------


def _hf_folder(folder: str, what: str) -> str:
  if not folder:
    raise ValueError(f"{what} is not set: the language tier needs a Hugging Face folder there")
  if not os.path.isfile(os.path.join(folder, "config.json")):
    raise FileNotFoundError(f"{what}={folder!r}: no config.json there (expected a Hugging Face "
                            "checkpoint folder: config.json, model.safetensors, tokenizer.json)")
  return folder


def tokenizer_folder(config) -> str:
  """Where the policy's tokenizer is: `config.tokenizer`, else the `init_from_hf` folder."""
  folder = config.get("tokenizer") or config.get("init_from_hf") or ""
  if not folder:
    raise ValueError("config.tokenizer (or config.init_from_hf) is not set: a language-tier run "
                     "needs the policy's tokenizer folder")
  if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
    raise FileNotFoundError(f"the policy's tokenizer folder {folder!r} has no tokenizer.json")
  return folder


def user_model_config(config, folder_cfg):
  """The LM user's model config: its folder's (`folder_cfg`), the layers laid out as the
  policy's (`config.model.scan_layers`), so that a user sharing the policy's reference reads its
  arrays, and its prefills attended in the policy's query chunks (`model.cache_query_chunk`)."""
  policy = config.get("model") or {}
  return dataclasses.replace(folder_cfg, scan_layers=bool(policy.get("scan_layers", False)),
                             cache_query_chunk=int(policy.get("cache_query_chunk", 0)))


def from_config(config, *, max_turns: int | None = None) -> TextTask:
  """The `TextTask` of a language-tier config (`task = "collabllm"`): the policy's tokenizer,
  the LM user of `config.sim.user_from` (its model built from its config.json; its params are
  loaded by `load_user_params`), the policy's reply budget and `max_turns` replies (default
  `config.num_turns`). Missing folders and templates that do not fit fail here."""
  ucfg = UserConfig(**config.sim.to_dict())
  folder = _hf_folder(ucfg.user_from, "config.sim.user_from")
  policy_tok = tokenizer_lib.Tokenizer.from_pretrained(tokenizer_folder(config))
  user_tok = tokenizer_lib.Tokenizer.from_pretrained(folder)
  # The dtype `load_user_params` loads its weights in.
  user_cfg = user_model_config(config, hf.folder_config(folder))
  turns = config.num_turns if max_turns is None else max_turns
  task = TextTask(policy_tok, Transformer(user_cfg), user_tok, ucfg,
                  reply_tokens=config.reply_tokens, max_turns=turns)
  if task.view_len > user_cfg.max_position_embeddings:
    raise ValueError(f"the user's chat may reach {task.view_len} tokens (sim.max_prompt_tokens + "
                     f"{turns} turns), more than its model's max_position_embeddings="
                     f"{user_cfg.max_position_embeddings}")
  return task


def load_user_params(task: TextTask, mesh=None):
  """The user's weights, placed on the mesh by the partition rules (frozen: never trained)."""
  return hf.load_pretrained(task.ucfg.user_from, mesh=mesh,
                            scan_layers=task.user_model.cfg.scan_layers)[1]

