"""User simulators that are language models, behind the scripted users' interface.

`LMSimulator` (verifiable tasks, on device, inside the rollout's jit): a transformer reads the
hidden goal and the conversation and samples the user's turn. Its view of a conversation is

  <bos> <system> answer 3 + 7 * 2 <eot> <user> calc 3 + ? * 2 <eot> <assistant> ask n2 <eot> ...

i.e. the policy's conversation with the goal (the task's full-marks answer, in the task's own
words) inserted after `<bos>`. `view_of` renders a finished conversation that way, which is what
`trainers/sim_sft.py` trains on, so SFT sequences and rollout-time views are the same tokens.
The simulator keeps its own KV cache across turns (prefilling only what each turn added, as
`rollout.LMPolicy` does), ends its turn at `<eot>` and ends the chat when its reply starts with
`thanks`, the convention of the scripted user it learns from. Its state also carries the task's
scripted bookkeeping, updated on the same policy replies (its tokens are thrown away), so every
metric that reads the simulator state (score, known/asked slots, irrelevant questions, first
action) stays exact whatever the LM writes; the state forwards those fields by name.

Params binding: `init_sim(intent)` cannot take params, so `LMSimulator.bind(params)` returns a
copy that holds them. Bind inside the jitted function (`make_lm_user_rollout` below does), so
that the params are a traced argument: new params then reuse the compiled rollout, where a
simulator bound outside jit would bake them in as constants and compile again for every new set.

`RolePlaySimulator` (language tier, on the host): a Hugging Face chat model prompted to play a
user who holds a goal, CollabLLM-style, with the roles swapped; the goal is in its system
message only, never in what it returns to the policy.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from collab_rl import conversation as conv_lib
from collab_rl import rollout as rollout_lib
from collab_rl import sampling
from collab_rl import sharding as sharding_lib
from collab_rl import tokenizer as tokenizer_lib
from collab_rl.models import hf
from collab_rl.models.attention import KVCache
from collab_rl.models.transformer import Transformer
from collab_rl.tasks import slots as slots_lib
from collab_rl.tokenizer import ASSISTANT, CONTEXT, USER

# ------------------------------------------------------------------------------------------------
# The simulator's view: the goal, then the conversation.
# ------------------------------------------------------------------------------------------------


def goal_tokens(task, intent) -> jax.Array:
  """`<system> answer 3 + 7 * 2 <eot>`: [B, answer_len + 2], the goal in the task's words.

  The full-marks answer, in the same template the policy answers with: the user's "is this what
  I wanted?" is then a token-by-token comparison, and each slot's value sits at a fixed place.
  """
  b = intent.values_BxK.shape[0]
  col = lambda tok: jnp.full((b, 1), tok, jnp.int32)
  return jnp.concatenate([col(task.tokenizer.token_to_id("<system>")),
                          task.ideal_answer(intent).astype(jnp.int32), col(task.eot_id)], 1)


def goal_width(task) -> int:
  return task.answer_len + 2


def view_of(task, conv: conv_lib.Conversation) -> conv_lib.Conversation:
  """The conversation as the simulator reads it: the goal inserted after `<bos>` (all rows start
  with `<bos>`, so this is a fixed-width concatenation). Turn indices shift by one (the goal)."""
  goal_BxG = goal_tokens(task, conv.intent)
  b, g = goal_BxG.shape
  cat = lambda first, mid, rest: jnp.concatenate([first, mid, rest], 1)
  return conv.replace(
      tokens_BxL=cat(conv.tokens_BxL[:, :1], goal_BxG, conv.tokens_BxL[:, 1:]),
      roles_BxL=cat(conv.roles_BxL[:, :1], jnp.full((b, g), CONTEXT, jnp.int32),
                    conv.roles_BxL[:, 1:]),
      turns_BxL=cat(conv.turns_BxL[:, :1], jnp.ones((b, g), jnp.int32),
                    jnp.where(conv.turns_BxL[:, 1:] >= 0, conv.turns_BxL[:, 1:] + 1, -1)),
      cursor_B=conv.cursor_B + g, num_turns_B=conv.num_turns_B + 1)


def first_reply_position(task) -> int:
  """View position where the simulator's own replies can start: after the goal and the task's
  first request (which the task writes, never the simulator)."""
  return 1 + goal_width(task) + 1 + task.request_width + 1


# ------------------------------------------------------------------------------------------------
# LMSimulator.
# ------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class LMSimState:
  """Every leaf is [B, ...]: the rollout keeps finished rows' state with a per-row select."""

  script: slots_lib.SimState  # the scripted user's bookkeeping on the same policy replies
  view: conv_lib.Conversation  # the simulator's tokens: goal + conversation (intent not kept)
  cache: KVCache  # `index` stored per row (all equal in use: the max is the shared index)
  upto_B: jax.Array  # view positions [0, upto) are in the cache
  turns_B: jax.Array  # int32 user turns written by the LM
  reply_match_B: jax.Array  # int32 turns where the LM's reply equals the scripted user's
  done_match_B: jax.Array  # int32 turns where the LM's done equals the scripted user's

  def __getattr__(self, name: str):
    # known_BxK, score_B, ...: what policies and metrics read from a scripted SimState.
    if name in slots_lib.SimState.__dataclass_fields__:
      return getattr(object.__getattribute__(self, "script"), name)
    raise AttributeError(name)


class LMSimulator:
  """A transformer playing the task's user; see the module docstring.

  max_len: the policy conversation's length (the view adds the goal's answer_len + 2 tokens).
  chunk_width: tokens prefilled per turn; at least the policy reply's width + 4 (the previous
    reply's last token, a forced `<eot>`, `<assistant>`, the reply, `<user>`).
  max_turns: user turns the KV cache has room for (a rollout's turns, plus MR's window when
    futures start from its last turn).
  params: bound params, or None (then `bind` them, inside jit).
  A zero-length policy reply marks a finished row (the rollout and MR pass them so): it writes
  nothing, and its state is whatever the caller keeps for it.
  """

  def __init__(self, task, model: Transformer, sampling_cfg: sampling.SamplingConfig, *,
               max_len: int, chunk_width: int = 32, max_turns: int = 8, params: Any = None):
    stops = tuple(sampling_cfg.stop_tokens)
    self.cfg = dataclasses.replace(
        sampling_cfg, stop_tokens=stops + ((task.eot_id,) if task.eot_id not in stops else ()))
    self.task, self.model, self.params = task, model, params
    self.max_len, self.chunk_width, self.max_turns = max_len, chunk_width, max_turns
    self.goal_width = goal_width(task)
    self.assistant_header_id, self.user_header_id = task.assistant_header_id, task.user_header_id
    self.thanks_id = task.ids["thanks"]

  def __getattr__(self, name: str):
    # Everything else the rollout and the metrics read from a task (sample_intents,
    # first_request, bos_id, metric, interactivity, tokenizer, ...) is the task's.
    if name.startswith("__") or name == "task":
      raise AttributeError(name)
    return getattr(self.task, name)

  def bind(self, params) -> "LMSimulator":
    bound = copy.copy(self)
    bound.params = params
    return bound

  def _params(self):
    if self.params is None:
      raise ValueError("LMSimulator has no params: use simulator.bind(params) (inside jit)")
    return self.params

  def init_sim(self, intent) -> LMSimState:
    params = self._params()
    b = intent.values_BxK.shape[0]
    ones = jnp.ones((b,), jnp.int32)
    view = conv_lib.empty(b, self.max_len + self.goal_width)
    view = conv_lib.append(view, jnp.full((b, 1), self.task.bos_id), ones, CONTEXT)
    view = conv_lib.append(view, goal_tokens(self.task, intent), ones * self.goal_width, CONTEXT)
    view = conv_lib.append(view, jnp.full((b, 1), self.user_header_id), ones, CONTEXT)
    req, req_len = self.task.first_request(intent)
    view = conv_lib.append(view, req, req_len, USER, new_turn=False)
    w = 2 + self.goal_width + req.shape[1]
    size = w + self.max_turns * (self.chunk_width + self.cfg.max_new_tokens - 1)
    cache = KVCache.init(self.model.cfg, b, size)
    out = self.model.apply({"params": params}, view.tokens_BxL[:, :w],
                           valid_BxL=jnp.arange(w)[None, :] < view.cursor_B[:, None],
                           cache=cache, heads=())
    zeros = jnp.zeros((b,), jnp.int32)
    return LMSimState(self.task.init_sim(intent), view, _per_row(out.cache, b), view.cursor_B,
                      zeros, zeros, zeros)

  def user_turn(self, intent, sim: LMSimState, reply_BxN, len_B, key):
    """(tokens_BxM incl. `<eot>`, lengths_B, done_B, new state); M = max_new_tokens + 1."""
    params = self._params()
    b, n = reply_BxN.shape
    if self.chunk_width < n + 4:
      raise ValueError(f"chunk_width={self.chunk_width} < policy reply width {n} + 4")
    k_script, k_lm = jax.random.split(key)
    s_toks, s_len, s_done, script = self.task.user_turn(intent, sim.script, reply_BxN, len_B,
                                                        k_script)
    # The rollout hands finished rows a zero-length reply: they must not write anything.
    active_B = len_B > 0
    ones = jnp.ones((b,), jnp.int32)
    view = conv_lib.append(sim.view, jnp.full((b, 1), self.assistant_header_id), ones, CONTEXT,
                           active_B)
    view = conv_lib.append(view, reply_BxN, len_B, ASSISTANT, active_B, new_turn=False)
    view = conv_lib.append(view, jnp.full((b, 1), self.user_header_id), ones, CONTEXT, active_B)
    chunk_BxW = rollout_lib.gather_rows(view.tokens_BxL, sim.upto_B, self.chunk_width)
    chunk_len_B = jnp.minimum(view.cursor_B - sim.upto_B, self.chunk_width)
    cache = sim.cache.replace(index=jnp.max(sim.cache.index))
    out, cache = sampling.prefill_and_decode(self.model, self.cfg, params, cache, chunk_BxW,
                                             chunk_len_B, sim.upto_B, k_lm, active_B)
    # A reply cut by the budget still ends its turn, so the policy always reads whole turns.
    rows = jnp.arange(b)
    toks_BxM = jnp.pad(out.tokens_BxN, ((0, 0), (0, 1)), constant_values=self.cfg.pad_id)
    forced_B = active_B & ~out.stopped_B
    toks_BxM = toks_BxM.at[rows, out.lengths_B].set(
        jnp.where(forced_B, self.task.eot_id, toks_BxM[rows, out.lengths_B]))
    lengths_B = out.lengths_B + forced_B.astype(jnp.int32)
    start_B = view.cursor_B
    view = conv_lib.append(view, toks_BxM, lengths_B, USER, active_B, new_turn=False)
    # Every generated token but the last went into the cache while decoding.
    upto_B = jnp.where(active_B, start_B + jnp.maximum(out.lengths_B - 1, 0), sim.upto_B)
    done_B = active_B & (toks_BxM[:, 0] == self.thanks_id)
    match_B = (lengths_B == s_len) & _same_prefix(toks_BxM, s_toks, lengths_B)
    count = lambda x_B: (active_B & x_B).astype(jnp.int32)
    new = LMSimState(script, view, _per_row(cache, b), upto_B, sim.turns_B + count(active_B),
                     sim.reply_match_B + count(match_B),
                     sim.done_match_B + count(done_B == s_done))
    return toks_BxM, lengths_B, done_B, new


def _per_row(cache: KVCache, b: int) -> KVCache:
  return cache.replace(index=jnp.broadcast_to(cache.index, (b,)))


def _same_prefix(a_BxN, b_BxM, len_B) -> jax.Array:
  """The first len_B tokens of both rows are equal."""
  w = max(a_BxN.shape[1], b_BxM.shape[1])
  a = jnp.pad(a_BxN, ((0, 0), (0, w - a_BxN.shape[1])))
  c = jnp.pad(b_BxM, ((0, 0), (0, w - b_BxM.shape[1])))
  inside = jnp.arange(w)[None, :] < len_B[:, None]
  return jnp.all((a == c) | ~inside, 1)


def make_lm_user_rollout(policy, simulator: LMSimulator, *, batch: int, num_turns: int,
                         max_len: int, mesh=None):
  """The jitted rollout against an LM simulator: `(params, sim_params, key) -> Rollout`.

  The simulator is bound to its params inside the trace, so both param trees are arguments and
  one compilation serves every step of a training run.
  """
  if max_len != simulator.max_len:
    raise ValueError(f"max_len={max_len} differs from the simulator's max_len="
                     f"{simulator.max_len}")
  if num_turns > simulator.max_turns:
    raise ValueError(f"num_turns={num_turns} > the simulator's max_turns={simulator.max_turns} "
                     "(its KV cache would run out of room)")
  if mesh is not None:
    sharding_lib.check_batch(batch, mesh)

  def run(params, sim_params, key):
    return rollout_lib.rollout(policy, simulator.bind(sim_params), params, key, batch,
                               num_turns=num_turns, max_len=max_len, mesh=mesh)
  return jax.jit(run)


# ------------------------------------------------------------------------------------------------
# RolePlaySimulator: a Hugging Face chat model plays the user (language tier, host side).
# ------------------------------------------------------------------------------------------------

TERMINATE = "[[TERMINATE CHAT]]"

ROLE_PLAY_PROMPT = """\
You are playing the part of a person who is chatting with an AI assistant. You came to it for \
help with one task. The assistant cannot see this message: it only sees what you write.

Your task, in your own words: {goal}
{target_line}
How to behave:
- Write as the person, in the first person, with short and plain messages.
- When the assistant asks about your task, answer truthfully and briefly, using only what is \
written above.
- Do not hand over your whole task or the answer you expect at once; give details when they \
are asked for or clearly needed.
- Never write the assistant's part and never say that you are an AI.
- When the assistant has given you what you need, or the chat has stopped being useful, reply \
with {marker} and nothing else."""

OPENING = "[The chat with the assistant starts now. Write your first message to it.]"
TARGET_LINE = "What a good answer would contain (keep it to yourself): {target}\n"

# The policy's messages are what the simulator's chat model reads; it writes the user's.
_SWAP = {"user": "assistant", "assistant": "user"}


def finish_reply(text: str) -> tuple[str, bool]:
  """(the reply without the termination marker, whether the user ended the chat)."""
  done = TERMINATE in text
  return text.replace(TERMINATE, "").strip(), done


class RolePlaySimulator:
  """`reply(goal, chat, key) -> (text, done)`: the user's next message in `chat`.

  chat: the conversation so far as the policy sees it, [{"role": "user" | "assistant", ...}]
  (a "system" message, the policy's own prompt, is not shown to the user). goal: what the user
  wants (e.g. a CollabLLM record's `single_turn_prompt`); target: the hidden answer they hope
  for (its `single_turn_completion`), or "". Prompts are padded to a multiple of `prompt_bucket`
  so that a run compiles the sampler a handful of times, not once per prompt length.
  """

  def __init__(self, folder, sampling_cfg: sampling.SamplingConfig | None = None, *,
               dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
               prompt_bucket: int = 128):
    self.tokenizer = tokenizer_lib.Tokenizer.from_pretrained(folder)
    self.model, self.params = hf.load_pretrained(folder, dtype, mesh)
    cfg = sampling_cfg or sampling.SamplingConfig(max_new_tokens=256, temperature=1.0)
    self.cfg = dataclasses.replace(cfg, stop_tokens=self.tokenizer.stop_tokens,
                                   pad_id=self.tokenizer.pad_id)
    self.mesh, self.prompt_bucket = mesh, prompt_bucket
    self._sample = sampling.make_sampler(self.model, self.cfg)

  def messages(self, goal: str, chat: Sequence[Mapping[str, str]],
               target: str = "") -> list[dict[str, str]]:
    """The simulator's own chat: the role-play system message, then `chat` with roles swapped."""
    target_line = TARGET_LINE.format(target=target) if target else ""
    system = ROLE_PLAY_PROMPT.format(goal=goal, target_line=target_line, marker=TERMINATE)
    # A stage direction opens the simulator's chat, so that templates which insist on a user
    # turn first accept it, and an empty chat asks the simulator for its opening message.
    swapped = [{"role": "user", "content": OPENING}]
    for i, m in enumerate(chat):
      if m["role"] == "system":
        continue
      if m["role"] not in _SWAP:
        raise ValueError(f"chat message {i}: role {m['role']!r} is not user/assistant/system")
      swapped.append({"role": _SWAP[m["role"]], "content": m["content"]})
    return [{"role": "system", "content": system}, *swapped]

  def reply(self, goal: str, chat: Sequence[Mapping[str, str]], key: jax.Array,
            target: str = "") -> tuple[str, bool]:
    return self.reply_batch([goal], [chat], key, [target])[0]

  def reply_batch(self, goals: Sequence[str], chats: Sequence[Sequence[Mapping[str, str]]],
                  key: jax.Array, targets: Sequence[str] | None = None) -> list[tuple[str, bool]]:
    targets = [""] * len(goals) if targets is None else targets
    if not len(goals) == len(chats) == len(targets):
      raise ValueError(f"{len(goals)} goals, {len(chats)} chats, {len(targets)} targets")
    prompts = [self.tokenizer.encode_chat(self.messages(g, c, t), add_generation_prompt=True)[0]
               for g, c, t in zip(goals, chats, targets)]
    longest = max(len(p) for p in prompts)
    width = -(-longest // self.prompt_bucket) * self.prompt_bucket
    limit = self.model.cfg.max_position_embeddings
    if longest + self.cfg.max_new_tokens > limit:
      raise ValueError(f"prompt of {longest} tokens + {self.cfg.max_new_tokens} new exceeds the "
                       f"model's {limit} positions")
    # With a mesh the batch is split over data x fsdp: pad it with empty rows to fit.
    dp = 1 if self.mesh is None else sharding_lib.data_parallel_size(self.mesh)
    rows = -(-len(prompts) // dp) * dp
    prompt_BxL = np.full((rows, width), self.tokenizer.pad_id, np.int32)
    len_B = np.ones((rows,), np.int32)
    for i, p in enumerate(prompts):
      prompt_BxL[i, :len(p)], len_B[i] = p, len(p)
    batch = (prompt_BxL, len_B)
    if self.mesh is not None:
      batch = sharding_lib.shard_batch(batch, self.mesh)
    out = jax.device_get(self._sample(self.params, *batch, key))
    stops = set(self.cfg.stop_tokens)
    replies = []
    for i in range(len(prompts)):
      ids = [int(t) for t in out.tokens_BxN[i, :out.lengths_B[i]] if int(t) not in stops]
      replies.append(finish_reply(self.tokenizer.decode(ids, skip_special_tokens=True)))
    return replies
