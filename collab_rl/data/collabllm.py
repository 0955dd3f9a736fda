"""CollabLLM-format records from a local JSONL file, validated line by line.

One JSON object per line:

  {"single_turn_prompt": str (non-empty), "single_turn_completion": str,
   "single_turn_metadata": {...},
   "turns": [{"role": "user" | "assistant" | "system", "content": str}, ...]  (optional)}

Other keys are ignored (CollabLLM's releases carry more). Blank lines are skipped. The first bad
line stops reading with a `RecordError` that names the file, the line and the field, so a build
never goes ahead on data nobody looked at.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, Mapping

PROMPT = "single_turn_prompt"
COMPLETION = "single_turn_completion"
METADATA = "single_turn_metadata"
TURNS = "turns"
LINE = "line"  # 1-based line of the record in its source file: the record's id
ROLES = ("user", "assistant", "system")
DEFAULT_MAX_CHARS = 65_536  # per text field; a longer one is a broken export, not a document


class RecordError(ValueError):
  """A bad record: `path:line: field: problem`."""

  def __init__(self, path: str, line: int, field: str, problem: str):
    super().__init__(f"{path}:{line}: {field}: {problem}")
    self.path, self.line, self.field, self.problem = path, line, field, problem


@dataclasses.dataclass(frozen=True)
class Record:
  line: int
  prompt: str
  completion: str
  metadata_json: str  # sorted keys, so that the same record always writes the same bytes
  turns: tuple[tuple[str, str], ...] = ()  # (role, content)

  def features(self) -> dict[str, Any]:
    """The record as the TFDS builder's feature dict."""
    return {LINE: self.line, PROMPT: self.prompt, COMPLETION: self.completion,
            METADATA: self.metadata_json,
            TURNS: {"role": [r for r, _ in self.turns], "content": [c for _, c in self.turns]}}


def _type_name(x: Any) -> str:
  return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
          int: "number", float: "number"}.get(type(x), type(x).__name__)


def parse_record(obj: Any, *, path: str, line: int, max_chars: int = DEFAULT_MAX_CHARS) -> Record:
  """Checks one decoded JSON value; raises RecordError naming the first bad field."""

  def fail(field: str, problem: str):
    raise RecordError(path, line, field, problem)

  def text(value: Any, field: str, *, non_empty: bool = False) -> str:
    if not isinstance(value, str):
      fail(field, f"expected a string, got {_type_name(value)}")
    if non_empty and not value.strip():
      fail(field, "empty")
    if len(value) > max_chars:
      fail(field, f"too long: {len(value)} characters > max_chars={max_chars}")
    try:  # JSON escapes can spell lone surrogates, which no UTF-8 file can hold
      value.encode("utf-8")
    except UnicodeEncodeError as e:
      fail(field, f"not valid Unicode: {e.reason} at character {e.start}")
    return value

  if not isinstance(obj, dict):
    fail("record", f"expected a JSON object, got {_type_name(obj)}")
  for field in (PROMPT, COMPLETION, METADATA):
    if field not in obj:
      fail(field, "missing required field")
  prompt = text(obj[PROMPT], PROMPT, non_empty=True)
  completion = text(obj[COMPLETION], COMPLETION)
  if not isinstance(obj[METADATA], dict):
    fail(METADATA, f"expected an object, got {_type_name(obj[METADATA])}")
  metadata_json = text(json.dumps(obj[METADATA], sort_keys=True, ensure_ascii=False), METADATA)

  turns = []
  raw_turns = obj.get(TURNS)  # null counts as absent: exporters write it for single-turn rows
  if raw_turns is not None:
    if not isinstance(raw_turns, list):
      fail(TURNS, f"expected an array, got {_type_name(raw_turns)}")
    for i, turn in enumerate(raw_turns):
      where = f"{TURNS}[{i}]"
      if not isinstance(turn, dict):
        fail(where, f"expected an object, got {_type_name(turn)}")
      for key in ("role", "content"):
        if key not in turn:
          fail(f"{where}.{key}", "missing required field")
      role = text(turn["role"], f"{where}.role")
      if role not in ROLES:
        fail(f"{where}.role", f"{role!r} is not one of {list(ROLES)}")
      turns.append((role, text(turn["content"], f"{where}.content")))
  return Record(line, prompt, completion, metadata_json, tuple(turns))


def _loads(text: str, path: str, line: int) -> Any:
  """Strict JSON: no NaN/Infinity (not JSON, and no other reader takes them), no key given twice
  (Python would silently keep the last), and a nesting too deep is an error, not a crash."""

  def no_constant(name: str):
    raise RecordError(path, line, "record", f"invalid JSON: {name} is not a JSON value")

  def unique(pairs: list[tuple[str, Any]]) -> dict:
    seen = set()
    for key, _ in pairs:
      if key in seen:
        raise RecordError(path, line, key, "duplicate key")
      seen.add(key)
    return dict(pairs)

  try:
    return json.loads(text, parse_constant=no_constant, object_pairs_hook=unique)
  except json.JSONDecodeError as e:
    raise RecordError(path, line, "record", f"invalid JSON: {e.msg} (column {e.colno})") from None
  except RecursionError:
    raise RecordError(path, line, "record", "JSON nested too deeply") from None


def parse_jsonl(data: bytes, *, path: str, max_chars: int = DEFAULT_MAX_CHARS) -> list[Record]:
  """Validated records of a JSONL file's bytes, in file order (`path` names it in errors)."""
  records = []
  for line, raw in enumerate(data.splitlines(), start=1):
    try:  # decoded line by line, so that bad UTF-8 is reported with its line
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise RecordError(path, line, "record", f"invalid UTF-8 at byte {e.start}") from None
    if not text.strip():
      continue
    records.append(parse_record(_loads(text, path, line), path=path, line=line,
                                max_chars=max_chars))
  if not records:
    raise RecordError(path, 0, "record", "the file holds no records")
  return records


def read_records(path: str, *, max_chars: int = DEFAULT_MAX_CHARS) -> list[Record]:
  with open(path, "rb") as f:
    return parse_jsonl(f.read(), path=path, max_chars=max_chars)


def decode(example: Mapping[str, Any]) -> dict[str, Any]:
  """A record read back from the dataset (bytes, dict of lists) -> str fields and a turn list.

  The result is checked as the source line was, so a record damaged on disk raises ValueError
  "field: problem" instead of reaching training.
  """

  def s(x, field: str) -> str:
    try:
      return x.decode("utf-8") if isinstance(x, bytes) else str(x)
    except UnicodeDecodeError as e:
      raise ValueError(f"{field}: invalid UTF-8 at byte {e.start}") from None

  turns = example[TURNS]
  try:
    metadata = json.loads(s(example[METADATA], METADATA))
  except json.JSONDecodeError as e:
    raise ValueError(f"{METADATA}: invalid JSON: {e.msg} (column {e.colno})") from None
  out = {LINE: int(example[LINE]), PROMPT: s(example[PROMPT], PROMPT),
         COMPLETION: s(example[COMPLETION], COMPLETION), METADATA: metadata,
         TURNS: [{"role": s(r, f"{TURNS}[{i}].role"), "content": s(c, f"{TURNS}[{i}].content")}
                 for i, (r, c) in enumerate(zip(turns["role"], turns["content"]))]}
  try:
    parse_record(out, path="", line=out[LINE], max_chars=sys.maxsize)
  except RecordError as e:
    raise ValueError(f"{e.field}: {e.problem}") from None
  return out
