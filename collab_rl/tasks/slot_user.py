"""The verifiable tasks' scripted user, all `jax.numpy` and batched (a mixin of `slots.SlotTask`).

It answers the policy's last reply from the hidden intent:
- a question about a slot it has not yet given: the value (`n2 is 7`), truthfully, unless noise
  makes it vague (`unclear`) or wrong;
- a question about a slot already known, or anything unparseable: nothing useful (`known`,
  `what ?`), counted as an irrelevant question;
- an answer that scores full marks: `thanks` and the conversation ends;
- a wrong answer: `wrong`, and optionally (config) the next missing slot;
- sharded mode (Lost-in-Conversation): every user turn also reveals the next missing slot unasked.
Its state (`SimState`) is the conversation's bookkeeping that the metrics read: what the policy
has been told and asked, its answers and their score, its first move, repeated rejections.
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp

# First-action codes, for ask-when-ambiguous / answer-when-clear.
NO_ACTION, ASKED, ANSWERED, OTHER = 0, 1, 2, 3
# Rejected answers remembered per conversation, for counting repeats (more than the 4 turns the
# experiments play: every earlier rejection is remembered).
REJECTED_MEMORY = 4


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


class ScriptedUser:
  """`init_sim`, `user_turn` and `interactivity` of a slot task; the task's `__init__` gives the
  ids, slots and templates they read (`slots.SlotTask`)."""

  # ---------------------------------------------------------------------------------------------
  # The scripted user.
  # ---------------------------------------------------------------------------------------------

  def init_sim(self, intent) -> SimState:
    b, k = intent.values_BxK.shape
    return SimState(known_BxK=~intent.missing_BxK, asked_BxK=jnp.zeros((b, k), bool),
                    irrelevant_B=jnp.zeros((b,), jnp.int32), answers_B=jnp.zeros((b,), jnp.int32),
                    answer_BxK=jnp.full((b, k), -1, jnp.int32),
                    score_B=jnp.zeros((b,), jnp.float32),
                    first_action_B=jnp.zeros((b,), jnp.int32),
                    asked_before_answer_B=jnp.zeros((b,), jnp.int32),
                    rejected_BxRxK=jnp.full((b, REJECTED_MEMORY, k), -1, jnp.int32),
                    repeats_B=jnp.zeros((b,), jnp.int32))

  def _reveal(self, intent, slot_B: jax.Array, value_B: jax.Array, on_B: jax.Array):
    """`<slot> is <value>` (3 tokens) where on_B, else nothing."""
    name = jnp.asarray(self.name_ids_K)[jnp.clip(slot_B, 0)]
    val = jnp.asarray(self.value_ids_KxM)[jnp.clip(slot_B, 0), jnp.clip(value_B, 0)]
    toks = jnp.stack([name, jnp.full_like(name, self.ids["is"]), val], 1)
    return toks, jnp.where(on_B, 3, 0).astype(jnp.int32)

  def _word(self, word: str, on_B: jax.Array, b: int):
    return jnp.full((b, 1), self.ids[word], jnp.int32), on_B.astype(jnp.int32)

  def user_turn(self, intent, sim: SimState, reply_BxN: jax.Array, len_B: jax.Array,
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

  def interactivity(self, intent, sim: SimState) -> jax.Array:
    """Share of missing slots asked about, less irrelevant questions per slot, in [-1, 1]."""
    n_missing = jnp.sum(intent.missing_BxK, 1)
    asked = jnp.sum(sim.asked_BxK & intent.missing_BxK, 1)
    share = jnp.where(n_missing > 0, asked / jnp.maximum(n_missing, 1), 0.0)
    return jnp.clip(share - sim.irrelevant_B / len(self.slots), -1.0, 1.0)
