"""Reward models that stand in for MR: a learned scorer and a prompted LM judge, both on the mesh.

**Learned reward model.** A transformer with a scalar `reward` head reads a conversation up to and
including a candidate reply; its reward is the head's output at the reply's last token. Two ways
to fit it to the multiturn-aware reward of `rewards.py`:

  Bradley-Terry, on pairs ranked by MR (chosen c = best of G candidates, rejected r = worst,
  kept when MR_c - MR_r > min_gap, the pairs DPO uses too):
      P(c > r) = sigmoid(r_c - r_r)
      loss     = E_pairs[ -log sigmoid(r_c - r_r) ] = E_pairs[ softplus(r_r - r_c) ]
  It fixes rewards up to a constant only, which is all a ranking (or PPO with a baseline) needs.
  Regression on R* / MR itself:  loss = E[ (r - MR)^2 ].

**LM judge** (CollabLLM's helpfulness and interactivity judges, run on the mesh instead of through
an API): a chat model gets a system prompt "rate the assistant's last reply ... from 1 to 10,
reply with the number only" and the conversation as text, with the generation prompt added, so
its next token is the rating. Instead of sampling a number, the judge reads the next-token
log-probabilities of the R rating tokens: with p = softmax over those R logits only and v_i the
rating values spread over [0, 1],

      rating = sum_i p_i v_i,        mass = sum_i softmax(all logits)_i

`mass` (the probability the model puts on any rating at all) tells whether it follows the format.
Only one position's logits are computed per prompt (hidden state at the last prompt token times
the output matrix), never the [B, L, V] logits of the whole prompt.

Word vocabularies (the verifiable tasks) hold no English: a judge prompt there keeps only the
conversation and the rating scale (`task_judge_prompt`); such a judge has to be trained, not
prompted. Rating words must be single tokens of the vocabulary: the digits "0".."9"
exist in ambig_math and code_spec; doc_edit has no digits, pass ordered words of its own (e.g.
("wrong", "unclear", "thanks")) there.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from collab_rl import sharding as sharding_lib
from collab_rl import tokenizer as tokenizer_lib
from collab_rl.models.transformer import Transformer, lm_head_kernel
from collab_rl.tokenizer import ASSISTANT, USER

RATINGS_1_TO_10 = tuple(str(i) for i in range(1, 11))
DIGITS = tuple(str(i) for i in range(10))

# ------------------------------------------------------------------------------------------------
# The learned reward model: scores and losses.
# ------------------------------------------------------------------------------------------------


def score(model: Transformer, params, tokens_BxL: jax.Array, valid_BxL: jax.Array,
          last_index_B: jax.Array) -> jax.Array:
  """reward_B: the reward head at each row's `last_index_B` (the candidate reply's last token)."""
  out = model.apply({"params": params}, tokens_BxL, valid_BxL=valid_BxL, heads=("reward",))
  return jnp.take_along_axis(out.reward_BxL, last_index_B[:, None].astype(jnp.int32), 1)[:, 0]


def _weighted_mean(x_B: jax.Array, weight_B: jax.Array | None) -> jax.Array:
  if weight_B is None:
    return jnp.mean(x_B)
  w_B = weight_B.astype(x_B.dtype)
  total = jnp.sum(w_B)
  # No pair kept: loss 0. The safe denominator keeps the gradient finite (no 0/0 in the branch
  # jnp.where discards, whose NaN would still flow back).
  return jnp.where(total > 0, jnp.sum(w_B * x_B) / jnp.where(total > 0, total, 1.0), 0.0)


def bradley_terry_loss(r_chosen_B: jax.Array, r_rejected_B: jax.Array,
                       weight_B: jax.Array | None = None) -> jax.Array:
  """Mean of -log sigmoid(r_c - r_r) over the pairs (weighted: sum w l / sum w, 0 if no weight).

  log_sigmoid(d) = -softplus(-d) stays finite for any margin, where log(sigmoid(d)) underflows to
  -inf once d < -100 or so. At d = 0 the loss is log 2; at d = ln 3, -log(3/4).
  """
  nll_B = -jax.nn.log_sigmoid(r_chosen_B - r_rejected_B)
  return _weighted_mean(nll_B, weight_B)


def regression_loss(pred_B: jax.Array, target_B: jax.Array,
                    weight_B: jax.Array | None = None) -> jax.Array:
  """Mean squared error of the predicted reward against its target (R* or MR)."""
  return _weighted_mean(jnp.square(pred_B - target_B), weight_B)


def make_pairs(mr_BxG: jax.Array, min_gap: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(chosen_B, rejected_B, keep_B): per row the best and worst of G candidates by MR, kept when
  their gap is larger than `min_gap` (ties go to the lower index)."""
  chosen_B = jnp.argmax(mr_BxG, 1)
  rejected_B = jnp.argmin(mr_BxG, 1)
  gap_B = jnp.max(mr_BxG, 1) - jnp.min(mr_BxG, 1)
  keep_B = (gap_B > min_gap) & (chosen_B != rejected_B)
  return chosen_B.astype(jnp.int32), rejected_B.astype(jnp.int32), keep_B


# ------------------------------------------------------------------------------------------------
# Held-out measures (host side, numpy).
# ------------------------------------------------------------------------------------------------


def _ranks(x: np.ndarray) -> np.ndarray:
  """Ranks 0..n-1, ties given their average rank (as Spearman's coefficient wants)."""
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.arange(len(x), dtype=np.float64)
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  sums = np.bincount(inverse, weights=ranks)
  return (sums / counts)[inverse]


def pearson(x, y) -> float:
  x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
  x, y = x - x.mean(), y - y.mean()
  denom = np.sqrt(np.sum(x * x) * np.sum(y * y))
  return float(np.sum(x * y) / denom) if denom > 0 else 0.0  # a constant has no correlation


def spearman(x, y) -> float:
  return pearson(_ranks(np.asarray(x).ravel()), _ranks(np.asarray(y).ravel()))


def within_row_spearman(pred_BxG, mr_BxG) -> float:
  """Mean over rows of Spearman's rho among the row's candidates (rows whose MR is constant are
  left out): how well candidates for the same context are ranked, all that Bradley-Terry fits
  (it leaves each context's offset free, which pooled correlations would mix in)."""
  pred, mr = np.asarray(pred_BxG), np.asarray(mr_BxG)
  rhos = [spearman(p, m) for p, m in zip(pred, mr) if np.ptp(m) > 0]
  return float(np.mean(rhos)) if rhos else 0.0


def order_accuracy(pred_BxG, mr_BxG, min_gap: float) -> tuple[float, int]:
  """Share of within-row candidate pairs whose MR differs by more than min_gap that the
  prediction orders the same way; and how many such pairs there were."""
  pred, mr = np.asarray(pred_BxG), np.asarray(mr_BxG)
  d_mr = mr[:, :, None] - mr[:, None, :]
  d_pred = pred[:, :, None] - pred[:, None, :]
  counted = d_mr > min_gap  # each unordered pair once, from its better side
  n = int(counted.sum())
  return (float(np.sum(counted & (d_pred > 0)) / n) if n else 0.0), n


# ------------------------------------------------------------------------------------------------
# The LM judge.
# ------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class JudgeOutput:
  rating_B: jax.Array  # expected rating in [0, 1]
  probs_BxR: jax.Array  # distribution over the rating tokens (renormalised among them)
  mass_B: jax.Array  # probability of any rating token under the full next-token distribution


def rating_readout(logits_BxV: jax.Array, rating_ids_R, values_R=None) -> JudgeOutput:
  """The expected rating from next-token logits (see the module docstring)."""
  ids_R = jnp.asarray(rating_ids_R, jnp.int32)
  r = ids_R.shape[0]
  values_R = (jnp.linspace(0.0, 1.0, r) if values_R is None
              else jnp.asarray(values_R, jnp.float32))
  logits_BxV = logits_BxV.astype(jnp.float32)
  logits_BxR = logits_BxV[:, ids_R]
  probs_BxR = jax.nn.softmax(logits_BxR, axis=-1)
  mass_B = jnp.exp(jax.nn.logsumexp(logits_BxR, -1) - jax.nn.logsumexp(logits_BxV, -1))
  return JudgeOutput(probs_BxR @ values_R, probs_BxR, mass_B)


class LMJudge:
  """A prompted judge on a transformer with an LM head: `judge(params, tokens_BxL, length_B)`.

  Prompts are right-padded token ids, each ending right before the rating (generation prompt
  included); `length_B` are their lengths. Jit-compiled once per prompt shape; the params may be
  sharded (e.g. as `hf.load_pretrained` places them) and, given a mesh, prompts are split over
  its data x fsdp axes. `values` are the ratings' values in [0, 1] (default: evenly spaced, in
  the order of `rating_ids`, worst first).
  """

  def __init__(self, model: Transformer, rating_ids: Sequence[int],
               values: Sequence[float] | None = None, mesh: jax.sharding.Mesh | None = None):
    if "lm" not in model.cfg.heads:
      raise ValueError(f"the judge reads next-token logits: its model needs the 'lm' head, "
                       f"has {model.cfg.heads}")
    ids = [int(i) for i in rating_ids]
    if len(ids) < 2 or len(set(ids)) != len(ids):
      raise ValueError(f"need at least two distinct rating tokens, got {ids}")
    if max(ids) >= model.cfg.vocab_size or min(ids) < 0:
      raise ValueError(f"rating ids {ids} outside the vocabulary of {model.cfg.vocab_size}")
    if values is not None and len(values) != len(ids):
      raise ValueError(f"{len(values)} values for {len(ids)} rating tokens")
    self.model, self.mesh = model, mesh
    self.rating_ids = np.asarray(ids, np.int32)
    self.values = None if values is None else np.asarray(values, np.float32)
    self._jitted = jax.jit(self.judge)

  def next_token_logits(self, params, tokens_BxL: jax.Array, length_B: jax.Array) -> jax.Array:
    """logits_BxV at each prompt's last token, the only position a rating needs."""
    cfg = self.model.cfg
    valid_BxL = jnp.arange(tokens_BxL.shape[1])[None, :] < length_B[:, None]
    hidden_BxLxD = self.model.apply({"params": params}, tokens_BxL, valid_BxL=valid_BxL,
                                    heads=()).hidden_BxLxD
    last_B = jnp.maximum(length_B - 1, 0).astype(jnp.int32)
    hidden_BxD = jnp.take_along_axis(hidden_BxLxD, last_B[:, None, None], 1)[:, 0]
    out_DxV = lm_head_kernel(cfg, params)
    dt = jnp.dtype(cfg.dtype)
    return (hidden_BxD.astype(dt) @ out_DxV.astype(dt)).astype(jnp.float32)

  def judge(self, params, tokens_BxL: jax.Array, length_B: jax.Array) -> JudgeOutput:
    """The pure function (use it inside other jitted code); `__call__` is its jitted form."""
    if self.mesh is not None:
      tokens_BxL, length_B = jax.lax.with_sharding_constraint(
          (tokens_BxL, length_B), sharding_lib.batch_sharding(self.mesh))
    logits_BxV = self.next_token_logits(params, tokens_BxL, length_B)
    return rating_readout(logits_BxV, self.rating_ids, self.values)

  def __call__(self, params, tokens_BxL, length_B) -> JudgeOutput:
    if self.mesh is not None:
      sharding_lib.check_batch(np.shape(tokens_BxL)[0], self.mesh, "judge batch")
    return self._jitted(params, jnp.asarray(tokens_BxL, jnp.int32),
                        jnp.asarray(length_B, jnp.int32))


# ------------------------------------------------------------------------------------------------
# Judge prompts.
# ------------------------------------------------------------------------------------------------

ASPECTS = {
    "helpfulness": "how much it helps the user reach their goal: correct, complete, and no "
                   "longer than needed",
    "interactivity": "how well it engages the user: asking a clarifying question when the "
                     "request is ambiguous or missing information, and not asking when it is "
                     "clear",
    "accuracy": "whether the final answer it leaves the user with accomplishes the user's goal "
                "as the reference answer does",
}


def rating_ids(tokenizer: tokenizer_lib.Tokenizer, words: Sequence[str]) -> list[int]:
  """The token id of each rating word; every word must be exactly one known token."""
  ids = []
  for w in words:
    enc = tokenizer.encode(w)
    unk = tokenizer.special_tokens.get("unk_token")
    if len(enc) != 1 or (unk is not None and enc[0] == tokenizer.tokenizer.token_to_id(unk)):
      raise ValueError(f"rating word {w!r} is not a single token of this vocabulary (it encodes "
                       f"to {enc}); choose single-token ratings, e.g. the digits 0-9")
    ids.append(enc[0])
  return ids


def task_rating_words(task) -> tuple[str, ...]:
  """The digits 0-9 where a task's vocabulary has them (ambig_math, code_spec)."""
  vocab = task.tokenizer.tokenizer.get_vocab()
  if all(d in vocab for d in DIGITS):
    return DIGITS
  raise ValueError(f"task {task.name!r} has no digit words; pass rating words of its own "
                   "vocabulary, worst first (see collab_rl/reward_model.py)")


def judge_messages(conversation: Sequence[Mapping[str, str]], aspect: str,
                   ratings: Sequence[str] = RATINGS_1_TO_10,
                   speakers: tuple[str, str] = ("User", "Assistant"), separator: str = ": ",
                   instruction: str | None = None, *, goal: str | None = None,
                   reference: str | None = None, whole: bool = False) -> list[dict[str, str]]:
  """CollabLLM-style judge messages: the instruction as system, the conversation as user text.

  `instruction` replaces the English system prompt (e.g. for vocabularies without English).
  `whole` rates the assistant's part of the whole conversation (CollabLLM's interactivity
  judge), else its last reply, which must end the conversation. `goal` / `reference` tell the
  judge what the user wanted (the helpfulness and accuracy judges); an interactivity judge is
  given neither: it sees the conversation alone.
  """
  if aspect not in ASPECTS:
    raise ValueError(f"unknown aspect {aspect!r}; known: {sorted(ASPECTS)}")
  if not conversation or (not whole and conversation[-1].get("role") != "assistant"):
    raise ValueError("the conversation to judge must end with the assistant's reply")
  what = "the assistant's replies in this conversation" if whole else "the assistant's last reply"
  word = "number" if all(r.isdigit() for r in ratings) else "rating"
  context = "".join([f" The user's goal, which the assistant was not told: {goal}" if goal else "",
                     f" The reference answer: {reference}" if reference else ""])
  system = instruction if instruction is not None else (
      f"You are a judge of conversations between a user and an AI assistant. Rate {what} for "
      f"{aspect}: {ASPECTS[aspect]}.{context} Rate it from {ratings[0]} (worst) to "
      f"{ratings[-1]} (best). Reply with the {word} only.")
  names = {"user": speakers[0], "assistant": speakers[1]}
  lines = []
  for i, m in enumerate(conversation):
    if m.get("role") not in names:
      raise ValueError(f"message {i}: role {m.get('role')!r} is neither user nor assistant")
    lines.append(f"{names[m['role']]}{separator}{m['content'].strip()}")
  return [{"role": "system", "content": system}, {"role": "user", "content": "\n".join(lines)}]


def judge_prompt(tokenizer: tokenizer_lib.Tokenizer, conversation: Sequence[Mapping[str, str]],
                 aspect: str, ratings: Sequence[str] = RATINGS_1_TO_10,
                 speakers: tuple[str, str] = ("User", "Assistant"), separator: str = ": ",
                 instruction: str | None = None, **context) -> np.ndarray:
  """int32 ids of the rendered judge prompt, generation prompt last: the rating comes next.
  `context`: `judge_messages`'s goal, reference and whole."""
  messages = judge_messages(conversation, aspect, ratings, speakers, separator, instruction,
                            **context)
  return tokenizer.encode_chat(messages, add_generation_prompt=True)[0]


def conversation_messages(tokenizer: tokenizer_lib.Tokenizer, conv, row: int) -> list[dict]:
  """One row of a `Conversation` as chat messages (headers and end-of-turn tokens dropped)."""
  conv = jax.device_get(conv)
  n = int(conv.cursor_B[row])
  toks, roles = np.asarray(conv.tokens_BxL[row, :n]), np.asarray(conv.roles_BxL[row, :n])
  turns = np.asarray(conv.turns_BxL[row, :n])
  names = {USER: "user", ASSISTANT: "assistant"}
  messages = []
  for t in sorted(set(turns.tolist())):
    in_turn = (turns == t) & np.isin(roles, list(names)) & (toks != tokenizer.eot_id)
    if in_turn.any():
      role = names[int(roles[in_turn][0])]
      messages.append({"role": role, "content": tokenizer.decode(toks[in_turn].tolist())})
  return messages


def task_judge_prompt(task, conv, row: int, aspect: str,
                      ratings: Sequence[str] | None = None) -> np.ndarray:
  """The judge prompt of one conversation of a verifiable task, in its word vocabulary.

  The vocabulary has no English, so the system message is the rating scale alone (worst to best)
  and speakers are the `<user>` / `<assistant>` tokens; the aspect cannot be named, so such a
  judge is trained per aspect. Ratings: the task's digits unless given.
  """
  ratings = task_rating_words(task) if ratings is None else tuple(ratings)
  rating_ids(task.tokenizer, ratings)  # fails early on words the vocabulary lacks
  messages = conversation_messages(task.tokenizer, conv, row)
  return judge_prompt(task.tokenizer, messages, aspect, ratings, ("<user>", "<assistant>"), " ",
                      instruction=" ".join(ratings))


def pad_prompts(prompts: Sequence[np.ndarray], width: int | None = None,
                pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(tokens_BxL right-padded, length_B) for `LMJudge`; a fixed `width` means one compilation."""
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  width = int(lengths.max()) if width is None else width
  if lengths.max() > width:
    raise ValueError(f"a prompt of {lengths.max()} tokens does not fit width {width}")
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  return tokens, lengths
