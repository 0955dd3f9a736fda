"""Task scores of language-tier conversations, from a record's verifier (host side, on text).

The artifact is the assistant's last message: what the user leaves the chat with. Which
verifier scores it is the record's choice (`single_turn_metadata.verifier`), else inferred:

  answer  MATH-Chat style: the final answer (`\\boxed{...}`, else what follows the last
          "answer is" / "answer:", else the last line) matches `metadata.answer` (or the
          completion) after normalisation: 1 or 0
  bleu    documents: sentence BLEU (sacrebleu, in [0, 1]) against the completion
  tests   BigCodeBench-Chat style: the message's code (its last ```python block, else all of it)
          run with `metadata.tests` in the sandbox (`sandbox.py`): 1 when every test passes
  judge   no verifier: an LM judge that sees the goal and the reference (`text_scores.py`)

Inferred: `tests` when the metadata has tests, `answer` when it has an answer, else `bleu`.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import sacrebleu

from collab_rl.tasks import sandbox

VERIFIERS = ("answer", "bleu", "tests", "judge")
_ANSWER_IS = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*", re.IGNORECASE)
_CODE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def verifier(metadata: Mapping[str, Any], default: str = "auto") -> str:
  """The verifier of a record (see the module docstring); `default` other than "auto" is used
  where the record names none."""
  name = metadata.get("verifier")
  if name is None and default != "auto":
    name = default
  if name is None:
    name = "tests" if metadata.get("tests") else "answer" if "answer" in metadata else "bleu"
  if name not in VERIFIERS:
    raise ValueError(f"single_turn_metadata.verifier={name!r}; choose from {VERIFIERS}")
  return name


def _boxed(text: str) -> str | None:
  at = text.rfind("\\boxed{")
  if at < 0:
    return None
  depth, i = 1, at + len("\\boxed{")
  for j in range(i, len(text)):
    depth += {"{": 1, "}": -1}.get(text[j], 0)
    if depth == 0:
      return text[i:j]
  return None


def final_answer(text: str) -> str:
  boxed = _boxed(text)
  if boxed is not None:
    return boxed
  found = list(_ANSWER_IS.finditer(text))
  if found:
    return text[found[-1].end():].split("\n")[0]
  lines = [line for line in text.strip().split("\n") if line.strip()]
  return lines[-1] if lines else ""


def normalize(answer: str) -> str:
  """Case, spaces, surrounding `$` and a final full stop do not count."""
  s = answer.strip().strip("$").strip()
  s = s[:-1] if s.endswith(".") else s
  return " ".join(s.lower().split())


def answer_match(text: str, reference: str) -> float:
  return float(normalize(final_answer(text)) == normalize(final_answer(reference))
               and bool(normalize(reference)))


def bleu(text: str, reference: str) -> float:
  if not text.strip():
    return 0.0
  return sacrebleu.sentence_bleu(text.strip(), [reference.strip()]).score / 100.0


def code_of(text: str) -> str:
  blocks = _CODE.findall(text)
  return blocks[-1] if blocks else text


def tests_pass(text: str, tests: str, timeout_s: float = 5.0) -> float:
  return float(sandbox.run(code_of(text), tests, timeout_s).passed)


def score(name: str, text: str, record: Mapping[str, Any], timeout_s: float = 5.0) -> float:
  """The task score of the assistant's last message `text` under verifier `name` (not judge)."""
  meta = record.get("single_turn_metadata") or {}
  reference = record["single_turn_completion"]
  if name == "answer":
    return answer_match(text, str(meta.get("answer", reference)))
  if name == "bleu":
    return bleu(text, reference)
  if name == "tests":
    return tests_pass(text, meta["tests"], timeout_s)
  raise ValueError(f"verifier {name!r} is not scored on text (the judge scores it)")
