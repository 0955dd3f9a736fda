"""doc_edit: the user wants a short three-section document (MediumDocEdit-Chat's analog).

Intent: every section has a topic (the three topics distinct), a tone and a length: 9 slots named
`topic1 tone1 length1 topic2 ...`. The first request reads
`write doc on sports formal short then music ? long then food funny short` when slots are
missing. The answer is the document itself, one word per slot and no separators:
`answer sports formal short music casual long food funny short`. Separator words would match in
every document, wrong or not, and lift the score of a blind guess.

Metric: sentence BLEU of the document's words (the answer's tokens after `answer`) against the
intended document's, computed on token ids, batched in `jax.numpy`:

    BLEU = BP * exp(1/4 * sum_{n=1..4} log p_n),   BP = exp(min(0, 1 - r / c))
    p_1 = m_1 / t_1,   p_n = (m_n + 1) / (t_n + 1) for n > 1

with m_n the clipped n-gram matches (each hypothesis n-gram counts at most as often as it occurs
in the reference), t_n the hypothesis' n-grams, c and r the hypothesis and reference lengths.
The smoothing is Lin & Och's BLEU+1 (2004): add one to the counts of orders 2 to 4 only, so an
exact match scores exactly 1.0, a document sharing no word scores 0, and one whose 4-grams all
miss (two wrong words can do it) still earns partial credit; one wrong word in the middle of
the nine scores about 0.66. Answers that do not fit the template score 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from collab_rl.tasks import slots as slots_lib

TOPICS = ("sports", "music", "food", "travel", "science", "history")
TONES = ("formal", "casual", "funny", "serious")
LENGTHS = ("short", "long")
NUM_SECTIONS = 3
# Slot columns: section s has topic 3s, tone 3s + 1, length 3s + 2.
TOPIC_COLS = tuple(3 * s for s in range(NUM_SECTIONS))
MAX_ORDER = 4


def _section_slots() -> tuple[slots_lib.Slot, ...]:
  return tuple(slots_lib.Slot(f"{kind}{s + 1}", values) for s in range(NUM_SECTIONS)
               for kind, values in (("topic", TOPICS), ("tone", TONES), ("length", LENGTHS)))


def _request_template() -> tuple[str | int, ...]:
  out: list[str | int] = ["write", "doc", "on"]
  for s in range(NUM_SECTIONS):
    out += ([] if s == 0 else ["then"]) + [3 * s, 3 * s + 1, 3 * s + 2]
  return tuple(out)


# ------------------------------------------------------------------------------------------------
# BLEU on token ids.
# ------------------------------------------------------------------------------------------------


def bleu(hyp_BxN: jax.Array, hyp_len_B: jax.Array, ref_BxM: jax.Array, ref_len_B: jax.Array,
         max_order: int = MAX_ORDER) -> jax.Array:
  """Smoothed sentence BLEU (see the module docstring) of right-padded token rows, [B] float32.

  All orders at once (O = max_order): one [O, B, N, N + M] table says whether the n-gram starting
  at hypothesis position i equals the one starting at column j, where columns [0, N) are the
  hypothesis' own positions (to clip repeats) and [N, N + M) the reference's.
  """
  n_hyp, n_ref = hyp_BxN.shape[1], ref_BxM.shape[1]
  cols_BxC = jnp.concatenate([hyp_BxN, ref_BxM], 1)
  eq1_BxNxC = hyp_BxN[:, :, None] == cols_BxC[:, None, :]
  # eq_n[i, j] = AND over k < n of eq_1[i + k, j + k]. A shift that crosses from the hypothesis
  # block into the reference block, or off the end, only touches n-grams that overrun their
  # sentence, and the masks below drop those.
  n_cols = n_hyp + n_ref
  shifted = [jnp.pad(eq1_BxNxC[:, k:, k:], ((0, 0), (0, min(k, n_hyp)), (0, min(k, n_cols))))
             for k in range(max_order)]
  eq_OxBxNxC = jnp.cumprod(jnp.stack(shifted).astype(jnp.int32), 0) > 0
  order_O = jnp.arange(1, max_order + 1)
  row_ok_OxBxN = (jnp.arange(n_hyp)[None, None, :] + order_O[:, None, None]
                  <= hyp_len_B[None, :, None])
  ref_ok_OxBxM = (jnp.arange(n_ref)[None, None, :] + order_O[:, None, None]
                  <= ref_len_B[None, :, None])
  same_OxBxNxN = eq_OxBxNxC[..., :n_hyp] & row_ok_OxBxN[:, :, None, :]
  in_hyp_OxBxN = jnp.sum(same_OxBxNxN, -1)
  in_ref_OxBxN = jnp.sum(eq_OxBxNxC[..., n_hyp:] & ref_ok_OxBxM[:, :, None, :], -1)
  # Clipping: each distinct n-gram is counted once, at its first occurrence.
  earlier_NxN = jnp.tril(jnp.ones((n_hyp, n_hyp), bool), -1)  # [i, i2]: i2 < i
  first_OxBxN = row_ok_OxBxN & ~jnp.any(same_OxBxNxN & earlier_NxN, -1)
  hits_OxB = jnp.sum(jnp.where(first_OxBxN, jnp.minimum(in_hyp_OxBxN, in_ref_OxBxN), 0), -1)
  total_OxB = jnp.maximum(hyp_len_B[None, :] - order_O[:, None] + 1, 0)
  add_O = jnp.where(order_O > 1, 1.0, 0.0)  # BLEU+1: orders 2 and up only
  p_OxB = (hits_OxB + add_O[:, None]) / jnp.maximum(total_OxB + add_O[:, None], 1.0)
  log_p_B = jnp.mean(jnp.log(jnp.maximum(p_OxB, 1e-30)), 0)
  hyp_len = hyp_len_B.astype(jnp.float32)
  brevity_B = jnp.minimum(0.0, 1.0 - ref_len_B / jnp.maximum(hyp_len, 1.0))
  score_B = jnp.exp(log_p_B + brevity_B)
  return jnp.where((hits_OxB[0] > 0) & (hyp_len_B > 0), score_B, 0.0).astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# The task.
# ------------------------------------------------------------------------------------------------


class DocEdit(slots_lib.SlotTask):
  name = "doc_edit"
  slots = _section_slots()
  request_template = _request_template()
  answer_template = ("answer", *range(3 * NUM_SECTIONS))

  def sample_values(self, key, batch: int) -> jax.Array:
    """Tones and lengths uniform; the three topics a uniform draw without replacement."""
    k, t = len(self.slots), len(TOPICS)
    # One draw for everything: every jax.random call compiles its own copy of the hash.
    u_BxR = jax.random.uniform(key, (batch, k + t))
    values_BxK = jnp.floor(u_BxR[:, :k] * self.num_values_K).astype(jnp.int32)
    topics_BxT = jnp.argsort(u_BxR[:, k:], 1)[:, :NUM_SECTIONS].astype(jnp.int32)
    return values_BxK.at[:, TOPIC_COLS].set(topics_BxT)

  def document(self, values_BxK: jax.Array) -> jax.Array:
    """[B, 9] token ids of the document the values spell (the answer without `answer`)."""
    no_hole_BxK = jnp.zeros(values_BxK.shape, bool)
    return self._render(self.answer_template, jnp.maximum(values_BxK, 0), no_hole_BxK)[:, 1:]

  def metric(self, intent, answer_BxK):
    valid_B = jnp.all(answer_BxK >= 0, 1)
    hyp_BxN = self.document(answer_BxK)
    ref_BxN = self.document(intent.values_BxK)
    len_B = jnp.full(valid_B.shape, hyp_BxN.shape[1], jnp.int32)
    return jnp.where(valid_B, bleu(hyp_BxN, len_B, ref_BxN, len_B), 0.0)
