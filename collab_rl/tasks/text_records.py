"""CollabLLM records as the language tier's episodes, on the host: what opens each conversation,
the LM user's prompt with the hidden goal, and both as fixed-width ids for the device
(`encode`, `TextIntent`), every record checked against its budgets first.

A record's hidden goal is its `single_turn_prompt` (what the user wants) and its
`single_turn_completion` (the answer they hope for). The conversation opens with the record's
first user message (`turns[0]`, e.g. an underspecified request), or with the `single_turn_prompt`
itself when the record has no turns; with `first_turn = "user"` the LM user writes the opening
message from its goal instead, as CollabLLM's simulator does (`text.TextTask.user_opens`, on
device). The user reads CollabLLM's role-play prompt (`simulators.ROLE_PLAY_PROMPT`) or the
shorter `SHORT_PROMPT` for small models, with the conversation's roles swapped: the policy's
replies are its "user" turns, its own messages "assistant" ones.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.struct
import jax
import numpy as np

from collab_rl import simulators
from collab_rl import tokenizer as tokenizer_lib
from collab_rl.tokenizer import CONTEXT, USER

TERMINATE = simulators.TERMINATE
SHORT_PROMPT = ("You are the user. Your request: {goal}\n{target_line}Answer the assistant's "
                "questions briefly and truthfully. When you have what you need, reply {marker}.")
SHORT_TARGET = "The answer you want: {target}\n"
USER_PROMPTS = {"collabllm": (simulators.ROLE_PLAY_PROMPT, simulators.TARGET_LINE),
                "short": (SHORT_PROMPT, SHORT_TARGET)}
@flax.struct.dataclass
class TextIntent:
  """One batch of records as ids (every leaf [B, ...]); `row_B` indexes the host's list of the
  batch's records, where the scorers find the goal, the reference and the metadata."""
  row_B: jax.Array  # int32
  opening_BxN: jax.Array  # int32 the policy's template prefix, user header, first request
  opening_roles_BxN: jax.Array  # int32 CONTEXT (prefix, header) / USER (message, end of turn)
  opening_len_B: jax.Array  # int32
  user_prompt_BxP: jax.Array  # int32 the user LM's chat so far: goal, stage direction, request
  user_prompt_len_B: jax.Array  # int32
  ambiguous_B: jax.Array  # int32 1 / 0 from the record's metadata, -1 where it does not say


FIRST_TURNS = ("record", "user")
_PROBE = "the answer is 42"


@dataclasses.dataclass(frozen=True)
class UserConfig:
  """The LM user (`config.sim` of a language-tier config)."""
  user_from: str = ""  # its Hugging Face folder (it may be the policy's own checkpoint)
  max_user_len: int = 48  # tokens of one user turn (its end of turn excluded)
  temperature: float = 1.0  # 0: greedy
  prompt: str = "collabllm"  # collabllm | short (USER_PROMPTS)
  show_target: bool = True  # the user's prompt also holds the reference answer
  max_request_tokens: int = 256  # the policy's opening (template prefix + first request)
  max_prompt_tokens: int = 1024  # the user's prompt (role-play instructions, goal, request)
  # Who writes the opening message: "record" (its first turn, else its prompt) or "user" (the
  # LM user, from its goal, as CollabLLM's simulator does; `text.TextTask.user_opens`).
  first_turn: str = "record"

  def __post_init__(self):
    if self.prompt not in USER_PROMPTS:
      raise ValueError(f"sim.prompt={self.prompt!r}; choose from {sorted(USER_PROMPTS)}")
    for name in ("max_user_len", "max_request_tokens", "max_prompt_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"sim.{name} must be positive, got {getattr(self, name)}")
    if self.temperature < 0:
      raise ValueError(f"sim.temperature={self.temperature} must be >= 0")
    if self.first_turn not in FIRST_TURNS:
      raise ValueError(f"sim.first_turn={self.first_turn!r}; choose from {FIRST_TURNS}")


def first_request(record: dict) -> str:
  """The opening user message: the record's first turn when it has turns, else its prompt."""
  turns = record.get("turns") or []
  if turns:
    if turns[0]["role"] != "user":
      raise ValueError(f"turns[0].role: the conversation must open with the user, got "
                       f"{turns[0]['role']!r}")
    return turns[0]["content"]
  return record["single_turn_prompt"]


def ambiguity(record: dict) -> int:
  """1 / 0 where the record's metadata says whether its opening is ambiguous, else -1."""
  value = (record.get("single_turn_metadata") or {}).get("ambiguous")
  return -1 if value is None else int(bool(value))


def opening_ids(tok: tokenizer_lib.Tokenizer, request: str) -> tuple[np.ndarray, np.ndarray]:
  """The policy's rendering of a chat holding the first request, its ids and roles: what the
  template writes before the message's content (bos, default system prompt, header) CONTEXT,
  the content and its end of turn USER."""
  ids, roles = tok.encode_chat([{"role": "user", "content": request}])
  text = tok.render([{"role": "user", "content": request}])
  at = text.rfind(request.strip()) if request.strip() else len(text)
  offsets = tok.tokenizer.encode(text, add_special_tokens=False).offsets
  starts = np.asarray([s for s, _ in offsets], np.int64)
  roles = np.where(starts < at, CONTEXT, USER).astype(np.int32)
  return ids, roles


def first_frame(tok: tokenizer_lib.Tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(prefix, footer) ids around the opening message's content in the policy's chat (bos, a
  default system prompt, the user header; the end of turn): what frames a first message the LM
  user writes on device. Checked to tokenize as the rendered text does."""
  marker = "collab_rl_marker"
  text = tok.render([{"role": "user", "content": marker}])
  at = text.find(marker)
  prefix = tuple(tok.encode(text[:at]))
  footer = tuple(tok.encode(text[at + len(marker):]))
  framed = [*prefix, *tok.encode(_PROBE), *footer]
  if framed != tok.encode(tok.render([{"role": "user", "content": _PROBE}])):
    raise ValueError("the chat template does not fit this tokenizer around an opening message: "
                     "a first message the user writes could not be framed by precomputed ids")
  return prefix, footer


class UserSide:
  """The user model's side of the chat: its tokenizer's frames and its prompt for a record."""

  def __init__(self, tok: tokenizer_lib.Tokenizer, ucfg: UserConfig):
    self.tok, self.ucfg = tok, ucfg
    # In the user's chat the policy's replies are "user" turns and its own are "assistant" ones.
    self.reply_frame = tok.turn_frame("user")
    self.own_frame = tok.turn_frame("assistant")
    self.template, self.target_line = USER_PROMPTS[ucfg.prompt]

  def messages(self, record: dict, with_opening: bool | None = None) -> list[dict[str, str]]:
    """The user's chat before the policy's first reply: the role-play system message with the
    goal, the stage direction, and (`with_opening`; default: unless it writes it on device)
    its opening message."""
    target = record["single_turn_completion"] if self.ucfg.show_target else ""
    target_line = self.target_line.format(target=target) if target.strip() else ""
    system = self.template.format(goal=record["single_turn_prompt"], target_line=target_line,
                                  marker=TERMINATE)
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": simulators.OPENING}]
    if not (self.ucfg.first_turn != "user" if with_opening is None else with_opening):
      return messages  # it writes the opening itself, next
    return [*messages, {"role": "assistant", "content": first_request(record)}]

  def prompt(self, record: dict) -> np.ndarray:
    """Its chat so far; when it writes the opening, up to its own header (the generation
    prompt)."""
    return self.tok.encode_chat(self.messages(record),
                                add_generation_prompt=self.ucfg.first_turn == "user")[0]


def _where(record: dict) -> str:
  return f"{record.get('source', 'record')}:{record.get('line', '?')}"


def _pad(rows: Sequence[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
  out = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out, np.asarray([len(r) for r in rows], np.int32)


def encode(task, records: Sequence[dict], first_row: int = 0) -> TextIntent:
  """A batch of decoded records (`data/collabllm.decode`, with `line` and, where known, the
  `source` file) as ids; a record that does not fit its budgets raises ValueError naming it.
  Row i plays record `first_row + i` of the batch's record list (this process's rows of a
  global batch start at its offset)."""
  openings, roles, prompts = [], [], []
  # When the user writes the opening, room is left for it (and its end of turn) in both chats.
  u = task.ucfg
  room = (u.max_user_len + max(len(task.user.own_frame.footer_ids), len(task.user_footer))
          if u.first_turn == "user" else 0)
  for r in records:
    try:
      if u.first_turn == "user":
        ids = np.asarray(task.first_prefix, np.int32)
        rl = np.full(ids.shape, CONTEXT, np.int32)
      else:
        ids, rl = opening_ids(task.tokenizer, first_request(r))
      prompt = task.user.prompt(r)
    except ValueError as e:
      raise ValueError(f"{_where(r)}: {e}") from None
    if len(ids) + room > u.max_request_tokens:
      raise ValueError(f"{_where(r)}: the policy's opening is {len(ids) + room} tokens, more "
                       f"than sim.max_request_tokens={u.max_request_tokens}")
    if len(prompt) + room > u.max_prompt_tokens:
      raise ValueError(f"{_where(r)}: the user's prompt (goal and instructions) is "
                       f"{len(prompt) + room} tokens, more than sim.max_prompt_tokens="
                       f"{u.max_prompt_tokens}")
    openings.append(ids)
    roles.append(rl)
    prompts.append(prompt)
  opening, opening_len = _pad(openings, task.ucfg.max_request_tokens)
  opening_roles, _ = _pad(roles, task.ucfg.max_request_tokens)
  prompt, prompt_len = _pad(prompts, task.ucfg.max_prompt_tokens)
  return TextIntent(first_row + np.arange(len(records), dtype=np.int32), opening, opening_roles,
                    opening_len, prompt, prompt_len,
                    np.asarray([ambiguity(r) for r in records], np.int32))
