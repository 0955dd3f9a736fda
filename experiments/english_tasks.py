"""English renderings of the verifiable tasks, written as CollabLLM records (the language tier's
demonstration data, made here: nothing is downloaded).

ambig_math's episodes are played on device by the scripted user and a scripted behaviour
(`sft.AskOrAnswerMix`: ask for the missing pieces in `ask_share` of the conversations, else
answer at once with guesses), and each message is rewritten in English:

    calc 3 + ? * 2          ->  Please compute 3 + ? * 2.
    ask n2                  ->  What is the second number?
    n2 is 7                 ->  The second number is 7.
    answer 3 + 7 * 2        ->  The answer is 3 + 7 * 2.
    thanks / wrong          ->  Thanks, that is right. [[TERMINATE CHAT]] / No, that is not it.

Three kinds of records (`write`): `sft` (whole conversations, `turns`: the passive base's SFT
data), `user` (the same, with more questions: the user simulator's SFT data, trained on the
user's side) and `rl` (the opening request only, as `turns[0]`: the episodes RL and evaluation
play). Every record's goal is the fully specified request, its completion the right answer, and
its metadata the verifier (`answer`: the expression, matched after "The answer is"), whether the
request is ambiguous and how many pieces it leaves out.
"""

from __future__ import annotations

import json
from typing import Iterable

import jax
import numpy as np

from collab_rl import rollout as rollout_lib
from collab_rl import sft as sft_lib
from collab_rl.tasks import registry
from collab_rl import simulators
from collab_rl.tasks import text_records
from collab_rl.tokenizer import ASSISTANT, USER

NAMES = {"n1": "first number", "op1": "first operator", "n2": "second number",
         "op2": "second operator", "n3": "third number"}
WORDS = {"thanks": f"Thanks, that is right. {text_records.TERMINATE}",
         "wrong": "No, that is not it.",
         "known": "You already know that.", "unclear": "I am not sure."}


def request(words: list[str]) -> str:
  return "Please compute " + " ".join(words[1:]) + "."


def expression(words: list[str]) -> str:
  return " ".join(words[1:]) if words and words[0] == "answer" else ""


def assistant_message(words: list[str]) -> str:
  if words[:1] == ["ask"] and len(words) == 2 and words[1] in NAMES:
    return f"What is the {NAMES[words[1]]}?"
  if words[:1] == ["answer"]:
    return f"The answer is {expression(words)}."
  return " ".join(words)


def user_message(words: list[str]) -> str:
  """A scripted user turn, segment by segment (feedback, revelations, `what ?`)."""
  out, i = [], 0
  while i < len(words):
    w = words[i]
    if w in WORDS:
      out.append(WORDS[w])
      i += 1
    elif w == "what":
      out.append("I do not understand.")
      i += 2
    elif w == "also" and i + 3 < len(words) + 1 and words[i + 1] in NAMES:
      out.append(f"Also, the {NAMES[words[i + 1]]} is {words[i + 3]}.")
      i += 4
    elif w in NAMES and i + 2 < len(words) and words[i + 1] == "is":
      out.append(f"The {NAMES[w]} is {words[i + 2]}.")
      i += 3
    else:
      out.append(w)
      i += 1
  return " ".join(out)


def _messages(task, conv, row: int) -> list[tuple[int, list[str]]]:
  """(role, words) of each message of a played word-level conversation."""
  n = int(conv.cursor_B[row])
  toks, roles = np.asarray(conv.tokens_BxL[row, :n]), np.asarray(conv.roles_BxL[row, :n])
  turns = np.asarray(conv.turns_BxL[row, :n])
  out = []
  for t in np.unique(turns):
    sel = (turns == t) & np.isin(roles, (USER, ASSISTANT)) & (toks != task.eot_id)
    if sel.any():
      words = [task.tokenizer.tokenizer.id_to_token(int(i)) for i in toks[sel]]
      out.append((int(roles[sel][0]), words))
  return out


def _record(task, conv, row: int, whole: bool) -> dict:
  intent = jax.tree_util.tree_map(lambda x: np.asarray(x)[row], conv.intent)
  goal_words = ["calc", *[task.slots[k].values[v] for k, v in enumerate(intent.values_BxK)]]
  answer = " ".join(goal_words[1:])
  messages = _messages(task, conv, row)
  turns = []
  for i, (role, words) in enumerate(messages):
    if role == USER:
      turns.append({"role": "user", "content": request(words) if i == 0 else user_message(words)})
    else:
      turns.append({"role": "assistant", "content": assistant_message(words)})
  return {"single_turn_prompt": request(goal_words),
          "single_turn_completion": f"The answer is {answer}.",
          "single_turn_metadata": {"task": task.name, "verifier": "answer", "answer": answer,
                                   "ambiguous": bool(intent.ambiguous_B),
                                   "missing": int(np.sum(intent.missing_BxK))},
          "turns": turns if whole else turns[:1]}


def records(kind: str, n: int, seed: int, *, ask_share: float = 0.3,
            num_turns: int = 3) -> list[dict]:
  """`n` records of `kind` (sft | user | rl; see the module docstring) from episodes of
  `key(seed)`. The user's data asks more (`ask_share` 0.6) so that the user meets every
  question in it; rl records keep the opening request only."""
  task = registry.make_task("ambig_math", {})
  share = {"sft": ask_share, "user": 0.6, "rl": 0.0}[kind]
  policy = sft_lib.AskOrAnswerMix(task, share)
  batch = 256

  @jax.jit  # one program for every batch: played op by op, the batches took minutes
  def play(key):
    k_int, k_plan, k_play = jax.random.split(key, 3)
    intent = task.sample_intents(k_int, batch)
    plan = policy.choose(k_plan, intent)
    return rollout_lib.rollout(policy.planned(plan), task, None, k_play, batch,
                               num_turns=num_turns, max_len=task.conversation_len(num_turns, 8),
                               intent=intent).conv

  out = []
  for start in range(0, n, batch):
    conv = jax.device_get(play(jax.random.fold_in(jax.random.key(seed), start)))
    out += [_record(task, conv, r, kind != "rl") for r in range(min(batch, n - start))]
  return out


def write(path: str, recs: Iterable[dict]) -> str:
  with open(path, "w", encoding="utf-8") as f:
    for r in recs:
      f.write(json.dumps(r) + "\n")
  return path


def corpus(recs: Iterable[dict]) -> list[str]:
  """Texts a tokenizer for these records is trained on: every message, and the user's short
  role-play prompt as each record fills it in (its instructions then count as often as the
  records, so that byte-pair merges cover them), and CollabLLM's longer prompt once."""
  out = [simulators.ROLE_PLAY_PROMPT]
  for r in recs:
    target = text_records.SHORT_TARGET.format(target=r["single_turn_completion"])
    out += [text_records.SHORT_PROMPT.format(goal=r["single_turn_prompt"], target_line=target,
                                         marker=text_records.TERMINATE),
            simulators.OPENING, *[t["content"] for t in r.get("turns", [])]]
  return out
