"""The engine behind the verifiable collaborative tasks: hidden slots, a scripted user, on device.

Each task's hidden intent is K slots (an operand, a section's tone, a filter's threshold...), each
taking one of its own words. The first request states some slots and shows "?" for the missing
ones (a per-episode ambiguity flag says whether any is missing). The policy either asks about a
slot (`ask <slot>`), or answers with the whole artifact written in the task's answer template
(`answer 3 + 7 * 2`); the task's metric scores the parsed answer against the intent.

The scripted user, all `jax.numpy` and batched:
- a question about a slot it has not yet given: the value (`n2 is 7`), truthfully, unless noise
  makes it vague (`unclear`) or wrong;
- a question about a slot already known, or anything unparseable: nothing useful (`known`,
  `what ?`), counted as an irrelevant question;
- an answer that scores full marks: `thanks` and the conversation ends;
- a wrong answer: `wrong`, and optionally (config) the next missing slot;
- sharded mode (Lost-in-Conversation): every user turn also reveals the next missing slot unasked.

The proactive instruction: with `instruction_rate` > 0, that share of episodes opens with the word
`clarify` before the request ("ask me if anything is unclear"), the way CollabLLM's Proactive
Base prompts a model. The scripted user ignores it; only a policy trained on data that follows
it (`trainers/sft.py`, `instruction_share`) reacts to it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from collab_rl import tokenizer as tokenizer_lib
from collab_rl.tasks import protocol
from collab_rl.tasks import users as users_lib
from collab_rl.tokenizer import CONTEXT, USER

# Words every slot task shares, after the tokenizer's specials.
CONTROL_WORDS = ("ask", "answer", "?", "is", "thanks", "wrong", "known", "unclear", "what", "also",
                 "clarify")
# First-action codes, for ask-when-ambiguous / answer-when-clear.
NO_ACTION, ASKED, ANSWERED, OTHER = 0, 1, 2, 3
# Rejected answers remembered per conversation, for counting repeats (more than the 4 turns the
# experiments play: every earlier rejection is remembered).
REJECTED_MEMORY = 4


@dataclasses.dataclass(frozen=True)
class Slot:
  name: str  # the word used to ask about it
  values: tuple[str, ...]  # the words it can take


@dataclasses.dataclass(frozen=True)
class SimConfig:
  ambiguous_rate: float = 0.5  # share of episodes whose first request leaves slots out
  min_missing: int = 1  # slots left out of an ambiguous request
  max_missing: int = 2
  noise_vague: float = 0.0  # chance a truthful answer is replaced by "unclear"
  noise_wrong: float = 0.0  # chance it gives a wrong value instead
  feedback_reveals: bool = False  # a wrong answer's feedback also gives the next missing slot
  sharded: bool = False  # every user turn reveals the next missing slot unasked
  max_user_len: int = 12  # user reply budget in tokens (header excluded)
  instruction_rate: float = 0.0  # share of first requests opening with the `clarify` instruction
  # Users drawn per episode (`users.py`: "reactive:2,sharded,noisy"); "": every episode is the
  # user the fields above describe. The mixture's users override those fields.
  mixture: str = ""


@flax.struct.dataclass
class Intent:
  values_BxK: jax.Array  # int32 value index of every slot
  missing_BxK: jax.Array  # bool: left out of the first request
  ambiguous_B: jax.Array  # bool: any slot missing
  extra: Any = None  # task-specific hidden data (e.g. test inputs of a program)
  instructed_B: Any = None  # bool: the request opens with `clarify` (None: no episode does)
  user: Any = None  # users.UserParams: this episode's user, drawn from a mixture (None: the task's)


@flax.struct.dataclass
class SimState:
  known_BxK: jax.Array  # bool: the policy has been told this slot
  asked_BxK: jax.Array  # bool: the policy asked about this slot while it was missing
  irrelevant_B: jax.Array  # int32 questions that could not help
  answers_B: jax.Array  # int32 answers given
  answer_BxK: jax.Array  # int32 the latest answer's parsed values (-1: none or invalid)
  score_B: jax.Array  # float32 the task metric of the latest answer
  first_action_B: jax.Array  # int32 NO_ACTION / ASKED / ANSWERED / OTHER
  asked_before_answer_B: jax.Array  # int32 relevant questions before the first answer
  # The last REJECTED answers (ring buffer, -1: empty) and how many answers repeated one of them:
  # a policy that learned nothing from `wrong` says the same thing again.
  rejected_BxRxK: jax.Array  # int32
  repeats_B: jax.Array  # int32


def pack(segments: Sequence[tuple[jax.Array, jax.Array]], width: int) -> tuple[jax.Array,
                                                                               jax.Array]:
  """Concatenates per-row variable-length segments into [B, width] (cut at width)."""
  b = segments[0][0].shape[0]
  out = jnp.zeros((b, width), jnp.int32)
  offset_B = jnp.zeros((b,), jnp.int32)
  pos_W = jnp.arange(width)
  for toks_BxN, len_B in segments:
    n = toks_BxN.shape[1]
    rel_BxW = pos_W[None, :] - offset_B[:, None]
    inside = (rel_BxW >= 0) & (rel_BxW < len_B[:, None])
    out = jnp.where(inside, jnp.take_along_axis(toks_BxN, jnp.clip(rel_BxW, 0, n - 1), 1), out)
    offset_B = offset_B + len_B
  return out, jnp.minimum(offset_B, width)


class SlotTask:
  """Base of the verifiable tasks. Subclasses give slots, templates and `metric`.

  The task protocol (`protocol.py`): single-token headers (`<assistant>`, `<user>`), the
  opening `<bos> <user> request <eot>`, nothing after a reply, and scores on device."""

  name: str = "slots"
  device_scored = True
  slots: tuple[Slot, ...] = ()
  # Templates: literal words, or an int k standing for slot k's value.
  request_template: tuple[str | int, ...] = ()
  answer_template: tuple[str | int, ...] = ()
  extra_words: tuple[str, ...] = ()

  def __init__(self, sim: SimConfig = SimConfig()):
    if not 0 <= sim.ambiguous_rate <= 1:
      raise ValueError(f"{self.name}: ambiguous_rate={sim.ambiguous_rate} must be in [0, 1]")
    if not 0 <= sim.instruction_rate <= 1:
      raise ValueError(f"{self.name}: instruction_rate={sim.instruction_rate} must be in [0, 1]")
    if not 1 <= sim.min_missing <= sim.max_missing <= len(self.slots):
      raise ValueError(f"{self.name}: need 1 <= min_missing <= max_missing <= "
                       f"{len(self.slots)} slots, got {sim.min_missing}, {sim.max_missing}")
    self.sim = sim
    self.mixture = (users_lib.Mixture(sim.mixture, dataclasses.asdict(sim), len(self.slots))
                    if sim.mixture else None)
    words = list(CONTROL_WORDS) + list(self.extra_words)
    for s in self.slots:
      words += [s.name, *s.values]
    for w in self.request_template + self.answer_template:
      if isinstance(w, str):
        words.append(w)
    self.tokenizer = tokenizer_lib.Tokenizer.for_words(words)
    tid = self.tokenizer.token_to_id
    self.vocab_size = self.tokenizer.vocab_size
    self.ids = {w: tid(w) for w in CONTROL_WORDS}
    self.eot_id, self.bos_id = tid("<eot>"), tid("<bos>")
    self.user_header_id, self.assistant_header_id = tid("<user>"), tid("<assistant>")
    k = len(self.slots)
    self.num_values = max(len(s.values) for s in self.slots)
    self.value_ids_KxM = np.zeros((k, self.num_values), np.int32)  # slot value -> token
    self.token_value_KxV = np.full((k, self.vocab_size), -1, np.int32)  # token -> slot value
    self.name_ids_K = np.array([tid(s.name) for s in self.slots], np.int32)
    self.token_slot_V = np.full((self.vocab_size,), -1, np.int32)  # token -> slot asked about
    for i, s in enumerate(self.slots):
      for j, v in enumerate(s.values):
        self.value_ids_KxM[i, j] = tid(v)
        self.token_value_KxV[i, tid(v)] = j
      self.token_slot_V[tid(s.name)] = i
    self.num_values_K = np.array([len(s.values) for s in self.slots], np.int32)
    self.answer_len = len(self.answer_template)
    self.stop_tokens = (self.eot_id,)
    self.assistant_header, self.user_header = (self.assistant_header_id,), (self.user_header_id,)

  # ---------------------------------------------------------------------------------------------
  # What the rollout writes, and the sizes it allocates (protocol.Task).
  # ---------------------------------------------------------------------------------------------

  @property
  def opening_width(self) -> int:
    """Columns of the opening `<bos> <user> request <eot>`: what a policy prefills first."""
    return 2 + self.request_width + 1

  @property
  def chunk_width(self) -> int:
    """The reply's last token (not in the policy's cache yet), `<user>`, the user's answer and
    its `<eot>` (`max_user_len + 1`), `<assistant>`."""
    return self.sim.max_user_len + 4

  def conversation_len(self, turns: int, reply_tokens: int) -> int:
    """The opening, then `turns` replies and user answers at their budgets (with headers and
    end-of-turn tokens)."""
    return 4 + self.request_width + turns * (reply_tokens + self.sim.max_user_len + 4)

  def opening(self, intent: Intent) -> list[protocol.Segment]:
    b = intent.values_BxK.shape[0]
    ones = jnp.ones((b,), jnp.int32)
    req, req_len = self.first_request(intent)
    return [protocol.Segment(jnp.full((b, 1), self.bos_id), ones, CONTEXT, True),
            protocol.Segment(jnp.full((b, 1), self.user_header_id), ones, CONTEXT, True),
            protocol.Segment(req, req_len, USER, False)]

  def close_reply(self, reply_BxN: jax.Array, len_B: jax.Array) -> None:
    return None  # a reply ends with its own `<eot>`; a cut one is left as it is

  def conversation_scores(self, conv, sim: "SimState") -> dict[str, jax.Array]:
    """R_ext (the latest answer's metric) and R_int (interactivity) of each conversation."""
    return {"r_ext": sim.score_B, "r_int": self.interactivity(conv.intent, sim)}

  # ---------------------------------------------------------------------------------------------
  # Intents and the first request.
  # ---------------------------------------------------------------------------------------------

  def sample_values(self, key, batch: int) -> jax.Array:
    """[B, K] value indices; tasks with constraints between slots override this."""
    u = jax.random.uniform(key, (batch, len(self.slots)))
    return jnp.floor(u * self.num_values_K).astype(jnp.int32)

  def sample_extra(self, key, values_BxK) -> Any:
    return None

  def sample_intents(self, key, batch: int) -> Intent:
    k_val, k_rest, k_extra = jax.random.split(key, 3)
    values = self.sample_values(k_val, batch)
    k = len(self.slots)
    # One draw for the ambiguity flag, the number missing and their choice: each random call
    # adds its own hash to the compiled program, and rollouts compile this for every config.
    u = jax.random.uniform(k_rest, (batch, k + 2))
    user, rate, lo, hi = None, self.sim.ambiguous_rate, self.sim.min_missing, self.sim.max_missing
    if self.mixture is not None:  # its own stream: the draws above stay what they were
      user, per_row = self.mixture.draw(jax.random.fold_in(k_rest, 2), batch)
      rate, lo, hi = per_row["ambiguous_rate"], per_row["min_missing"], per_row["max_missing"]
    ambiguous = u[:, 0] < rate
    span = hi - lo + 1
    n_missing = lo + jnp.minimum(jnp.floor(u[:, 1] * span), span - 1)
    # A random subset of n_missing slots: the n smallest of K random keys.
    rank = jnp.argsort(jnp.argsort(u[:, 2:], 1), 1)
    missing = (rank < n_missing[:, None]) & ambiguous[:, None]
    # Its own stream (fold_in), so that the episodes of every split stay what they were
    # before the instruction existed, whatever the rate.
    instructed = jax.random.uniform(jax.random.fold_in(k_rest, 1), (batch,)) < (
        self.sim.instruction_rate)
    return Intent(values, missing, ambiguous, self.sample_extra(k_extra, values), instructed,
                  user)

  def _render(self, template, values_BxK, hidden_BxK) -> jax.Array:
    cols = []
    b = values_BxK.shape[0]
    for item in template:
      if isinstance(item, str):
        cols.append(jnp.full((b,), self.tokenizer.token_to_id(item), jnp.int32))
      else:
        tok = jnp.asarray(self.value_ids_KxM)[item, values_BxK[:, item]]
        cols.append(jnp.where(hidden_BxK[:, item], self.ids["?"], tok))
    return jnp.stack(cols, 1)

  @property
  def request_width(self) -> int:
    """Columns of the first request's content: the template, and the instruction's word when
    any episode can carry it (a static width; uninstructed rows are one token shorter)."""
    return len(self.request_template) + (self.sim.instruction_rate > 0)

  def first_request(self, intent: Intent) -> tuple[jax.Array, jax.Array]:
    """The user's opening message (content + end of turn) and its lengths."""
    body = self._render(self.request_template, intent.values_BxK, intent.missing_BxK)
    b = body.shape[0]
    eot = jnp.full((b, 1), self.eot_id, jnp.int32)
    toks = jnp.concatenate([body, eot], 1)
    if self.sim.instruction_rate == 0:
      return toks, jnp.full((b,), toks.shape[1], jnp.int32)
    on_B = (jnp.zeros((b,), bool) if intent.instructed_B is None
            else jnp.asarray(intent.instructed_B, bool))
    with_word = jnp.concatenate([jnp.full((b, 1), self.ids["clarify"], jnp.int32), toks], 1)
    toks = jnp.where(on_B[:, None], with_word, jnp.pad(toks, ((0, 0), (0, 1))))
    return toks, toks.shape[1] - 1 + on_B.astype(jnp.int32)

  def ideal_answer(self, intent: Intent) -> jax.Array:
    """The full-marks answer's tokens (content only): what an oracle writes."""
    no_hole = jnp.zeros_like(intent.missing_BxK)
    return self._render(self.answer_template, intent.values_BxK, no_hole)

  # ---------------------------------------------------------------------------------------------
  # Reading the policy's reply.
  # ---------------------------------------------------------------------------------------------

  def parse_answer(self, reply_BxN: jax.Array, len_B: jax.Array) -> jax.Array:
    """[B, K] values of an `answer ...` reply; all -1 unless it fits the template exactly."""
    b, n = reply_BxN.shape
    k = len(self.slots)
    values = jnp.full((b, k), -1, jnp.int32)
    ok = len_B >= self.answer_len + 1  # the template, then end of turn
    for j, item in enumerate(self.answer_template):
      tok_B = reply_BxN[:, j] if j < n else jnp.zeros((b,), jnp.int32)
      if isinstance(item, str):
        ok &= tok_B == self.tokenizer.token_to_id(item)
      else:
        v_B = jnp.asarray(self.token_value_KxV)[item, tok_B]
        ok &= v_B >= 0
        values = values.at[:, item].set(v_B)
    if self.answer_len < n:
      ok &= reply_BxN[:, self.answer_len] == self.eot_id
    return jnp.where(ok[:, None], values, -1)

  def metric(self, intent: Intent, answer_BxK: jax.Array) -> jax.Array:
    """R_ext of a parsed answer, in [0, 1]; invalid answers (any -1) score 0."""
    raise NotImplementedError

  # ---------------------------------------------------------------------------------------------
  # The scripted user.
  # ---------------------------------------------------------------------------------------------

  def init_sim(self, intent: Intent) -> SimState:
    b, k = intent.values_BxK.shape
    return SimState(known_BxK=~intent.missing_BxK, asked_BxK=jnp.zeros((b, k), bool),
                    irrelevant_B=jnp.zeros((b,), jnp.int32), answers_B=jnp.zeros((b,), jnp.int32),
                    answer_BxK=jnp.full((b, k), -1, jnp.int32),
                    score_B=jnp.zeros((b,), jnp.float32),
                    first_action_B=jnp.zeros((b,), jnp.int32),
                    asked_before_answer_B=jnp.zeros((b,), jnp.int32),
                    rejected_BxRxK=jnp.full((b, REJECTED_MEMORY, k), -1, jnp.int32),
                    repeats_B=jnp.zeros((b,), jnp.int32))

  def _reveal(self, intent: Intent, slot_B: jax.Array, value_B: jax.Array, on_B: jax.Array):
    """`<slot> is <value>` (3 tokens) where on_B, else nothing."""
    name = jnp.asarray(self.name_ids_K)[jnp.clip(slot_B, 0)]
    val = jnp.asarray(self.value_ids_KxM)[jnp.clip(slot_B, 0), jnp.clip(value_B, 0)]
    toks = jnp.stack([name, jnp.full_like(name, self.ids["is"]), val], 1)
    return toks, jnp.where(on_B, 3, 0).astype(jnp.int32)

  def _word(self, word: str, on_B: jax.Array, b: int):
    return jnp.full((b, 1), self.ids[word], jnp.int32), on_B.astype(jnp.int32)

  def user_turn(self, intent: Intent, sim: SimState, reply_BxN: jax.Array, len_B: jax.Array,
                key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, SimState]:
    """The user's answer to the policy's last reply: (tokens_BxM incl. end of turn, lengths,
    done, new state). M = max_user_len + 1."""
    b, k = intent.values_BxK.shape
    cfg = self.sim
    # This episode's user: the mixture's draw per row, else the task's settings.
    user = intent.user
    noise_vague = cfg.noise_vague if user is None else user.noise_vague_B
    noise_wrong = cfg.noise_wrong if user is None else user.noise_wrong_B
    feedback_reveals = cfg.feedback_reveals if user is None else user.feedback_reveals_B
    sharded = cfg.sharded if user is None else user.sharded_B
    first_B, second_B = reply_BxN[:, 0], reply_BxN[:, 1]
    is_ask = first_B == self.ids["ask"]
    is_answer = first_B == self.ids["answer"]
    is_other = ~is_ask & ~is_answer

    # Questions.
    slot_B = jnp.asarray(self.token_slot_V)[second_B]
    slot_oh = jax.nn.one_hot(jnp.clip(slot_B, 0), k, dtype=bool) & (slot_B >= 0)[:, None]
    new_info = is_ask & jnp.any(slot_oh & ~sim.known_BxK, 1)
    irrelevant = is_ask & ~new_info
    k_noise, k_wrong = jax.random.split(key)
    u = jax.random.uniform(k_noise, (b,))
    vague = new_info & (u < noise_vague)
    wrong = new_info & ~vague & (u < noise_vague + noise_wrong)
    true_val = jnp.take_along_axis(intent.values_BxK, jnp.clip(slot_B, 0)[:, None], 1)[:, 0]
    n_vals = jnp.asarray(self.num_values_K)[jnp.clip(slot_B, 0)]
    shift = 1 + jax.random.randint(k_wrong, (b,), 0, jnp.maximum(n_vals - 1, 1))
    told_val = jnp.where(wrong, (true_val + shift) % n_vals, true_val)
    told = new_info & ~vague  # wrong values are "told" too: the user believes them
    known = sim.known_BxK | (slot_oh & told[:, None] & ~wrong[:, None])

    # Answers.
    parsed = self.parse_answer(reply_BxN, len_B)
    score = self.metric(intent, parsed)
    solved = is_answer & (score >= 1.0 - 1e-6)
    failed = is_answer & ~solved
    valid = jnp.all(parsed >= 0, 1)
    repeat = is_answer & valid & jnp.any(jnp.all(sim.rejected_BxRxK == parsed[:, None, :], 2), 1)
    slot_R = jax.nn.one_hot(sim.answers_B % REJECTED_MEMORY, REJECTED_MEMORY, dtype=bool)
    remember = (failed & valid)[:, None, None] & slot_R[:, :, None]
    rejected = jnp.where(remember, parsed[:, None, :], sim.rejected_BxRxK)

    # The next missing slot nobody has told yet: feedback and sharded reveals use it.
    pending = ~known
    nxt_B = jnp.argmax(pending, 1)
    has_next = jnp.any(pending, 1)
    reveal_fb = failed & has_next & feedback_reveals
    reveal_shard = has_next & ~solved & sharded & ~reveal_fb
    nxt_val = jnp.take_along_axis(intent.values_BxK, nxt_B[:, None], 1)[:, 0]
    known = known | (jax.nn.one_hot(nxt_B, k, dtype=bool) & (reveal_fb | reveal_shard)[:, None])

    segs = [
        self._word("thanks", solved, b),
        self._word("wrong", failed, b),
        self._reveal(intent, nxt_B, nxt_val, reveal_fb),
        self._reveal(intent, slot_B, told_val, told),
        self._word("unclear", vague, b),
        self._word("known", irrelevant & (slot_B >= 0), b),
        (jnp.tile(jnp.array([[self.ids["what"], self.ids["?"]]], jnp.int32), (b, 1)),
         jnp.where(is_other | (irrelevant & (slot_B < 0)), 2, 0).astype(jnp.int32)),
        self._word("also", reveal_shard, b),
        self._reveal(intent, nxt_B, nxt_val, reveal_shard),
    ]
    body, body_len = pack(segs, cfg.max_user_len)
    toks = jnp.concatenate([body, jnp.zeros((b, 1), jnp.int32)], 1)
    toks = toks.at[jnp.arange(b), body_len].set(self.eot_id)

    first = jnp.where(is_ask, ASKED, jnp.where(is_answer, ANSWERED, OTHER))
    new = SimState(
        known_BxK=known,
        asked_BxK=sim.asked_BxK | (slot_oh & new_info[:, None] & intent.missing_BxK),
        irrelevant_B=sim.irrelevant_B + irrelevant.astype(jnp.int32),
        answers_B=sim.answers_B + is_answer.astype(jnp.int32),
        answer_BxK=jnp.where(is_answer[:, None], parsed, sim.answer_BxK),
        score_B=jnp.where(is_answer, score, sim.score_B),
        first_action_B=jnp.where(sim.first_action_B == NO_ACTION, first, sim.first_action_B),
        asked_before_answer_B=sim.asked_before_answer_B
        + (new_info & (sim.answers_B == 0)).astype(jnp.int32),
        rejected_BxRxK=rejected, repeats_B=sim.repeats_B + repeat.astype(jnp.int32))
    return toks, body_len + 1, solved, new

  # ---------------------------------------------------------------------------------------------
  # Conversation-level scores.
  # ---------------------------------------------------------------------------------------------

  def interactivity(self, intent: Intent, sim: SimState) -> jax.Array:
    """Share of missing slots asked about, less irrelevant questions per slot, in [-1, 1]."""
    n_missing = jnp.sum(intent.missing_BxK, 1)
    asked = jnp.sum(sim.asked_BxK & intent.missing_BxK, 1)
    share = jnp.where(n_missing > 0, asked / jnp.maximum(n_missing, 1), 0.0)
    return jnp.clip(share - sim.irrelevant_B / len(self.slots), -1.0, 1.0)
