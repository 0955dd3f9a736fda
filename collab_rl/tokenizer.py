"""Tokenizers with chat templates, and a role for every token of a rendered conversation.

`Tokenizer.from_pretrained(folder)` reads a Hugging Face tokenizer folder: `tokenizer.json` (the
`tokenizers` library) and the chat template from `chat_template.jinja` (transformers 5) or
`tokenizer_config.json` (older). Templates are rendered the way transformers renders them: a
sandboxed jinja2 environment with trim_blocks / lstrip_blocks, `raise_exception`, the special
tokens (`bos_token`, `eos_token`, ...) as variables and `add_generation_prompt`.

`encode_chat` renders growing prefixes of the conversation and gives each new piece of text the
role of the message that produced it: an assistant turn's header is CONTEXT, its content and
end-of-turn token are ASSISTANT, so a loss masked to ASSISTANT trains exactly what the sampler
generates. The whole text is tokenized once (as `apply_chat_template` does) and each token takes
the role of its first character.

`Tokenizer.turn_frame(role)` gives the ids of a turn's header and end-of-turn wrapper (one or many
tokens, from the template), checked to tokenize as the rendered text does: what a device rollout
appends around each reply.

`Tokenizer.for_words(words)` builds a word-level tokenizer for the verifiable tasks' vocabularies,
with a small built-in chat template, so their conversations decode to readable text.
"""

from __future__ import annotations

import datetime
import json
import pathlib
from typing import Any, Mapping, NamedTuple, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
import tokenizers
from tokenizers import models, pre_tokenizers

# Token roles, shared with `conversation.py`. PAD must stay 0: padded arrays start as zeros.
PAD, CONTEXT, USER, ASSISTANT = 0, 1, 2, 3
ROLE_NAMES = ("pad", "context", "user", "assistant")
MESSAGE_ROLES = {"system": CONTEXT, "user": USER, "assistant": ASSISTANT}

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                 "mask_token")

# Word-level vocabularies: these specials come first, so "<pad>" is id 0.
WORD_SPECIALS = ("<pad>", "<unk>", "<bos>", "<eot>", "<system>", "<user>", "<assistant>")
WORD_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "<{{ message['role'] }}> {{ message['content'] | trim }} <eot>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}")

# What `Tokenizer.turn_frame` writes a turn with; the probe is content as a reply would start.
_PROBE = "the answer is 42"


class TurnFrame(NamedTuple):
  header_ids: tuple[int, ...]  # opens a message of the role, after earlier turns
  footer_ids: tuple[int, ...]  # closes it after its content (the end-of-turn token first)


# ------------------------------------------------------------------------------------------------
# Jinja, as transformers sets it up.
# ------------------------------------------------------------------------------------------------


class _Generation(jinja2.ext.Extension):
  """Accepts `{% generation %}...{% endgeneration %}` (transformers' assistant-mask markers)."""

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

  def _render(self, caller):
    return caller()


def _raise_exception(message: str):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # jinja's own tojson escapes HTML characters, which would change the rendered prompt.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def compile_template(source: str) -> jinja2.Template:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(source)


# ------------------------------------------------------------------------------------------------
# The tokenizer.
# ------------------------------------------------------------------------------------------------


class Tokenizer:
  """A `tokenizers.Tokenizer` plus its chat template and special tokens."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, chat_template: str | None,
               special_tokens: Mapping[str, str] | None = None, eot_token: str | None = None):
    """special_tokens: template variables such as {"bos_token": "<s>", "eos_token": "</s>"}.

    eot_token: the end-of-turn token the sampler stops at; None finds it from the template
    (the first token after an assistant message's content), else falls back to eos_token.
    """
    self.tokenizer = tokenizer
    self.chat_template = chat_template
    self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    self._template = compile_template(chat_template) if chat_template else None
    self.eot_token = eot_token or self._find_eot()
    self.eot_id = self.token_to_id(self.eot_token)

  # --- Vocabulary ---------------------------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int:
    token_id = self.tokenizer.token_to_id(token)
    if token_id is None:
      raise KeyError(f"token {token!r} is not in the vocabulary")
    return token_id

  def _special_id(self, key: str) -> int | None:
    token = self.special_tokens.get(key)
    return None if token is None else self.tokenizer.token_to_id(token)

  @property
  def pad_id(self) -> int:
    # Roles / valid masks, not this id, mark padding; 0 stands in where there is no pad token.
    pad = self._special_id("pad_token")
    return 0 if pad is None else pad

  @property
  def bos_id(self) -> int | None:
    return self._special_id("bos_token")

  @property
  def eos_id(self) -> int | None:
    return self._special_id("eos_token")

  @property
  def stop_tokens(self) -> tuple[int, ...]:
    """For `SamplingConfig.stop_tokens`: the end-of-turn token, and eos when it differs."""
    eos = self.eos_id
    return (self.eot_id,) if eos is None or eos == self.eot_id else (self.eot_id, eos)

  def encode(self, text: str) -> list[int]:
    """Plain text -> ids, without the post-processor's bos/eos (templates write their own)."""
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  # --- Chat template ------------------------------------------------------------------------

  def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
             **kwargs) -> str:
    """The template's text for `messages`, as `apply_chat_template(..., tokenize=False)`."""
    if self._template is None:
      raise ValueError("this tokenizer has no chat template")
    variables = {**self.special_tokens, **kwargs}
    return self._template.render(messages=[dict(m) for m in messages],
                                 add_generation_prompt=add_generation_prompt, **variables)

  def _find_eot(self) -> str:
    added = {t.content for t in self.tokenizer.get_added_tokens_decoder().values()}
    if self._template is not None:
      marker = "collab_rl_marker"
      try:
        text = self.render([{"role": "user", "content": "hi"},
                            {"role": "assistant", "content": marker}])
      except jinja2.exceptions.TemplateError:
        text = ""  # e.g. a template that insists on a system message: fall back to eos
      after = text[text.rfind(marker) + len(marker):] if marker in text else ""
      encoding = self.tokenizer.encode(after, add_special_tokens=False)
      if encoding.tokens and encoding.tokens[0] in added:
        return encoding.tokens[0]
    if "eos_token" in self.special_tokens:
      return self.special_tokens["eos_token"]
    raise ValueError("cannot tell the end-of-turn token from the chat template and there is no "
                     "eos_token; pass eot_token")

  def turn_frame(self, role: str) -> TurnFrame:
    """The ids a rollout writes around a `role` message that follows earlier turns (a user
    message after an assistant reply, an assistant reply after a user message): the template's
    header (one or many tokens) and its end-of-turn wrapper, computed once from the template so
    that a jitted rollout appends ids and never renders text.

    Checked against the template before anything uses it: a probe message written as header +
    content + footer ids must tokenize as the rendered text does (as `encode_chat` tokenizes
    what the model is trained on), and an assistant header must be the template's generation
    prompt. Otherwise ValueError: the template does not fit this tokenizer.
    """
    if role not in ("user", "assistant"):
      raise ValueError(f"turn_frame: role {role!r} is not 'user' or 'assistant'")
    prior = [{"role": "user", "content": "hi"}]
    if role == "user":
      prior.append({"role": "assistant", "content": "ok"})
    marker = "collab_rl_marker"
    try:
      before = self.render(prior)
      full = self.render([*prior, {"role": role, "content": marker}])
      probe_text = self.render([*prior, {"role": role, "content": _PROBE}])
      gen = self.render(prior, add_generation_prompt=True)
    except jinja2.exceptions.TemplateError as e:
      raise ValueError(f"the chat template cannot render a {role} turn after {prior}: {e}") from e
    if not full.startswith(before):
      raise ValueError(f"the chat template is not prefix-stable at a {role} message: rendering "
                       "one more message changed the text of the earlier ones")
    if marker not in full[len(before):]:
      raise ValueError(f"the chat template does not write a {role} message's content as it is "
                       "given, so no ids can be written around it")
    at = full.index(marker, len(before))
    header, footer = full[len(before):at], full[at + len(marker):]
    if role == "assistant" and gen[len(before):] != header:
      raise ValueError(f"the chat template's generation prompt {gen[len(before):]!r} is not the "
                       f"header {header!r} it writes before an assistant message")
    frame = TurnFrame(tuple(self.encode(header)), tuple(self.encode(footer)))
    framed = [*self.encode(before), *frame.header_ids, *self.encode(_PROBE), *frame.footer_ids]
    rendered = self.encode(probe_text)
    if framed != rendered:
      raise ValueError(
          f"the chat template does not fit this tokenizer: a {role} turn written as its header "
          f"{list(frame.header_ids)} + content + footer {list(frame.footer_ids)} gives ids "
          f"{framed}, the rendered text {rendered}; turns written on device would differ from "
          "what the model is trained on")
    return frame

  def encode_chat(self, messages: Sequence[Mapping[str, Any]],
                  add_generation_prompt: bool = False, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """(ids_L, roles_L) int32 of the rendered conversation; see the module docstring.

    With add_generation_prompt the assistant header ends the ids (as CONTEXT): the prompt to
    sample the next assistant turn from.
    """
    render = lambda msgs, gen=False: self.render(msgs, add_generation_prompt=gen, **kwargs)
    try:
      text = render([])  # e.g. bos or a default system prompt, before any message
    except jinja2.exceptions.TemplateError:
      text = ""
    marks = [(len(text), CONTEXT)]  # (end of a text span, its role)

    def extend(new: str, role: int, i: int):
      nonlocal text
      if not new.startswith(text):
        raise ValueError(f"the chat template is not prefix-stable at message {i}: rendering more "
                         "messages changed the text of earlier ones")
      text = new
      marks.append((len(text), role))

    for i, message in enumerate(messages):
      if message.get("role") not in MESSAGE_ROLES:
        raise ValueError(f"message {i}: role {message.get('role')!r} is not one of "
                         f"{sorted(MESSAGE_ROLES)}")
      role = MESSAGE_ROLES[message["role"]]
      full = render(messages[:i + 1])
      if role != ASSISTANT:
        extend(full, role, i)
        continue
      extend(render(messages[:i], True), CONTEXT, i)
      # What the template writes after the end-of-turn token (e.g. Qwen's "\n") is context.
      cut = full.rfind(self.eot_token, len(text))
      extend(full[:cut + len(self.eot_token)] if cut >= 0 else full, ASSISTANT, i)
      extend(full, CONTEXT, i)
    if add_generation_prompt:
      extend(render(messages, True), CONTEXT, len(messages))

    char_roles = np.zeros(len(text) + 1, np.int32)
    start = 0
    for end, role in marks:
      char_roles[start:end] = role
      start = end
    char_roles[-1] = marks[-1][1]
    encoding = self.tokenizer.encode(text, add_special_tokens=False)
    ids = np.asarray(encoding.ids, np.int32)
    starts = np.asarray([s for s, _ in encoding.offsets], np.int64).reshape(-1)
    return ids, char_roles[np.minimum(starts, len(text))]

  # --- Construction and saving --------------------------------------------------------------

  @classmethod
  def from_pretrained(cls, path: str | pathlib.Path, eot_token: str | None = None) -> "Tokenizer":
    folder = pathlib.Path(path)
    tok_file = folder / "tokenizer.json"
    if not tok_file.exists():
      raise FileNotFoundError(f"{folder}: no tokenizer.json")
    config = _read_json(folder / "tokenizer_config.json")
    special = {**_read_json(folder / "special_tokens_map.json"), **config}
    special_tokens = {k: _content(special[k]) for k in _SPECIAL_KEYS if special.get(k)}
    template_file = folder / "chat_template.jinja"
    template = template_file.read_text() if template_file.exists() else config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
      named = {t["name"]: t["template"] for t in template}
      if "default" not in named:
        raise ValueError(f"{folder / 'tokenizer_config.json'}: no 'default' chat template among "
                         f"{sorted(named)}")
      template = named["default"]
    return cls(tokenizers.Tokenizer.from_file(str(tok_file)), template, special_tokens, eot_token)

  def save(self, path: str | pathlib.Path) -> None:
    """tokenizer.json + tokenizer_config.json (with the template), loadable by transformers."""
    folder = pathlib.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    self.tokenizer.save(str(folder / "tokenizer.json"))
    config = {**self.special_tokens, "chat_template": self.chat_template,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

  @classmethod
  def for_words(cls, words: Sequence[str], chat_template: str = WORD_CHAT_TEMPLATE) -> "Tokenizer":
    """A word-level tokenizer: ids 0..6 are WORD_SPECIALS, then `words` in order (deduplicated).

    Text splits on whitespace and punctuation; decoding joins tokens with spaces.
    """
    vocab: dict[str, int] = {}
    for word in (*WORD_SPECIALS, *words):
      vocab.setdefault(word, len(vocab))
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(WORD_SPECIALS))
    special = {"bos_token": "<bos>", "eos_token": "<eot>", "pad_token": "<pad>",
               "unk_token": "<unk>"}
    return cls(tok, chat_template, special, eot_token="<eot>")


def _read_json(path: pathlib.Path) -> dict:
  return json.loads(path.read_text()) if path.exists() else {}


def _content(token: str | Mapping[str, Any]) -> str:
  """Special tokens are saved as strings or as AddedToken dicts."""
  return token["content"] if isinstance(token, Mapping) else token
