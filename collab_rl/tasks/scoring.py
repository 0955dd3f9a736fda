"""Per-conversation metrics of the verifiable tasks, and the ask/answer decision summary.

Task score (the metric of the latest answer), tokens read (what the policy wrote, the user's
reading cost) and typed (what the user wrote), turns (assistant replies), interactivity, and
whether the policy's first move was a question or an answer. The Abg-CoQA-style summary treats
"asked first" as the prediction of "the request is ambiguous" and reports both recalls and the
macro F1 of the two classes (ask, answer).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from collab_rl import conversation as conv_lib
from collab_rl.tasks import slots as slots_lib
from collab_rl.tokenizer import ASSISTANT, USER


def episode_metrics(task, conv: conv_lib.Conversation, sim: slots_lib.SimState) -> dict:
  """[B] arrays, one value per conversation."""
  return {
      "score": sim.score_B,
      "tokens_read": jnp.sum(conv.roles_BxL == ASSISTANT, 1),
      "tokens_typed": jnp.sum(conv.roles_BxL == USER, 1),
      # Assistant replies (each run of assistant tokens), not `num_turns_B`, which also counts
      # the opening context and the user's messages.
      "turns": jnp.sum((conv.roles_BxL == ASSISTANT)
                       & (jnp.roll(conv.roles_BxL, 1, axis=1) != ASSISTANT), 1),
      "interactivity": task.interactivity(conv.intent, sim),
      "ambiguous": conv.intent.ambiguous_B,
      "asked_first": sim.first_action_B == slots_lib.ASKED,
      "answered_first": sim.first_action_B == slots_lib.ANSWERED,
      "irrelevant_questions": sim.irrelevant_B,
      "solved": conv.done_B,
      "overflow": conv.overflow_B,
      "num_missing": jnp.sum(conv.intent.missing_BxK, 1),
      # Answers that repeat one the user has already rejected (`wrong`).
      "repeats_rejected": sim.repeats_B,
  }


def _f1(pred: np.ndarray, truth: np.ndarray) -> float:
  tp = np.sum(pred & truth)
  denom = 2 * tp + np.sum(pred & ~truth) + np.sum(~pred & truth)
  return float(2 * tp / denom) if denom else 1.0


def ask_answer_summary(ambiguous, asked_first, answered_first=None) -> dict[str, float]:
  """Ask-when-ambiguous, answer-when-clear and the macro F1 of ask vs not-ask.

  Answer-when-clear counts well-formed answers only (when `answered_first` is given), so a
  policy that writes nonsense on clear requests does not get credit for "not asking".
  """
  amb, ask = np.asarray(ambiguous, bool), np.asarray(asked_first, bool)
  ans = ~ask if answered_first is None else np.asarray(answered_first, bool)
  return {
      "ask_when_ambiguous": float(ask[amb].mean()) if amb.any() else float("nan"),
      "answer_when_clear": float(ans[~amb].mean()) if (~amb).any() else float("nan"),
      "ask_answer_macro_f1": 0.5 * (_f1(ask, amb) + _f1(~ask, ~amb)),
  }


def after_asking(m: dict) -> dict[str, dict]:
  """What a policy does with what it asked for: the task score of the ambiguous conversations
  that opened with a question, split by how many pieces the request left out
  (`score_after_ask_<n>`, [n] per-episode scores), and the share of conversations in which an
  answer repeated one the user had rejected (`repeats_rejected`). Values are the per-episode
  arrays under "x"; "mean" is their mean (nan where no conversation qualifies)."""
  if "num_missing" not in m:  # the language tier: records do not count missing pieces
    return {}
  amb, asked = np.asarray(m["ambiguous"], bool), np.asarray(m["asked_first"], bool)
  n_missing = np.asarray(m["num_missing"])
  out = {}
  for n in (1, 2):
    x = np.asarray(m["score"], np.float64)[amb & asked & (n_missing == n)]
    out[f"score_after_ask_{n}"] = {"x": x, "mean": float(x.mean()) if len(x) else float("nan")}
  x = (np.asarray(m["repeats_rejected"]) > 0).astype(np.float64)
  out["repeats_rejected"] = {"x": x, "mean": float(x.mean()) if len(x) else float("nan")}
  return out


def summarize(metrics: dict) -> dict[str, float]:
  """Batch means (tokens in thousands, as the paper reports them) plus the decision summary."""
  m = {k: np.asarray(v) for k, v in metrics.items()}
  amb = m["ambiguous"].astype(bool)
  out = {
      "score": float(m["score"].mean()),
      "score_ambiguous": float(m["score"][amb].mean()) if amb.any() else float("nan"),
      "score_clear": float(m["score"][~amb].mean()) if (~amb).any() else float("nan"),
      "tokens_read_k": float(m["tokens_read"].mean() / 1000),
      "tokens_typed_k": float(m["tokens_typed"].mean() / 1000),
      "turns": float(m["turns"].mean()),
      "interactivity": float(m["interactivity"].mean()),
  }
  out.update({k: v["mean"] for k, v in after_asking(m).items()})
  # Language-tier records may not say whether their request is ambiguous: the ask/answer
  # summary counts the ones that do.
  known = m["ambiguity_known"].astype(bool) if "ambiguity_known" in m else np.ones_like(amb)
  out.update(ask_answer_summary(amb[known], m["asked_first"][known],
                                m["answered_first"][known]))
  for k in ("user_ended", "user_confused", "user_cut"):  # what an LM user did
    if k in m:
      out[k] = float(m[k].mean())
  return out
