"""The engine behind the verifiable collaborative tasks: hidden slots, a scripted user, on device.

Each task's hidden intent is K slots (an operand, a section's tone, a filter's threshold...), each
taking one of its own words. The first request states some slots and shows "?" for the missing
ones (a per-episode ambiguity flag says whether any is missing). The policy either asks about a
slot (`ask <slot>`), or answers with the whole artifact written in the task's answer template
(`answer 3 + 7 * 2`); the task's metric scores the parsed answer against the intent.

The scripted user (`slot_user.py`, a mixin of `SlotTask`) answers questions about missing slots,
says so for irrelevant ones, gives feedback on answers and ends the chat on a right one.

The proactive instruction: with `instruction_rate` > 0, that share of episodes opens with the word
`clarify` before the request ("ask me if anything is unclear"), the way CollabLLM's Proactive
Base prompts a model. The scripted user ignores it; only a policy trained on data that follows
it (`trainers/sft.py`, `instruction_share`) reacts to it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from collab_rl import tokenizer as tokenizer_lib
from collab_rl.tasks import protocol
from collab_rl.tasks import slot_user
from collab_rl.tasks.slot_user import (ANSWERED, ASKED, NO_ACTION, OTHER,  # noqa: F401
                                       REJECTED_MEMORY, SimState, pack)
from collab_rl.tasks import users as users_lib
from collab_rl.tokenizer import CONTEXT, USER

# Words every slot task shares, after the tokenizer's specials.
CONTROL_WORDS = ("ask", "answer", "?", "is", "thanks", "wrong", "known", "unclear", "what", "also",
                 "clarify")
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


class SlotTask(slot_user.ScriptedUser):
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

  def sample_intents(self, key, batch: int, instruction_rate=None) -> Intent:
    """`instruction_rate`: the share of instructed requests, a float or a traced scalar (None:
    the simulator's). A traced rate lets one compiled rollout serve every rate; the request's
    width is the simulator's (`request_width`), so its own rate must be above 0 for any row to
    carry the instruction."""
    if instruction_rate is not None and self.sim.instruction_rate == 0:
      raise ValueError(f"{self.name}: sample_intents(instruction_rate=...) needs a simulator "
                       "whose instruction_rate is above 0 (its requests have no room for the "
                       "instruction's word)")
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
    if instruction_rate is None:
      instruction_rate = self.sim.instruction_rate
    instructed = jax.random.uniform(jax.random.fold_in(k_rest, 1), (batch,)) < instruction_rate
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
