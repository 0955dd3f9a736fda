"""Chat templates and token roles in collab_rl.tokenizer, against transformers' apply_chat_template.

Tokenizers are built at test time: a small byte-level BPE trained on a few sentences, given the
special tokens of Llama-3 or Qwen2 and their chat templates (written out below).
"""

import json

import jinja2
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from collab_rl import tokenizer as tk
from experiments import hf_models

transformers = pytest.importorskip("transformers")

# Llama-3-Instruct's and Qwen2.5-Instruct's templates and special tokens.
STYLES = hf_models.STYLES

CORPUS = [
    "You are a helpful assistant. Ask a clarifying question when the request is ambiguous.",
    "What is the sum of 12 and 30? The answer is 42.",
    "Please edit the document: make the tone more formal, and fix the typos.",
    "Which language should the function use? Python, with numpy arrays.",
    "Café résumé naïve: unicode text works too.",
]

CONVERSATIONS = [
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What is the sum of 12 and 30?"},
     {"role": "assistant", "content": "Which numbers do you mean, exactly?"},
     {"role": "user", "content": "12 and 30, as written."},
     {"role": "assistant", "content": "The answer is 42."}],
    [{"role": "user", "content": "Please edit the document: café résumé."},
     {"role": "assistant", "content": "Should the tone be more formal?"},
     {"role": "user", "content": "Yes, and fix the typos."},
     {"role": "assistant", "content": "Done: a formal résumé, typos fixed."}],
]


def _bpe(specials):
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  return tok


@pytest.fixture(scope="module", params=sorted(STYLES))
def pair(request, tmp_path_factory):
  """(ours, transformers' reference) loaded from one folder saved by transformers."""
  style = STYLES[request.param]
  folder = tmp_path_factory.mktemp(request.param)
  ref = transformers.PreTrainedTokenizerFast(
      tokenizer_object=_bpe(style["specials"]), bos_token=style["bos"], eos_token=style["eos"])
  ref.chat_template = style["template"]
  ref.save_pretrained(folder)
  return request.param, tk.Tokenizer.from_pretrained(folder), ref


def _ref_ids(ref, messages, add_generation_prompt=False):
  return list(ref.apply_chat_template(messages, tokenize=True, return_dict=False,
                                      add_generation_prompt=add_generation_prompt))


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_render_matches_transformers(pair, conv, gen):
  _, ours, ref = pair
  messages = CONVERSATIONS[conv]
  text = ours.render(messages, add_generation_prompt=gen)
  assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
  ids, roles = ours.encode_chat(messages, add_generation_prompt=gen)
  assert ids.tolist() == _ref_ids(ref, messages, gen)
  assert ids.shape == roles.shape and ids.dtype == roles.dtype == np.int32
  assert set(roles.tolist()) <= {tk.CONTEXT, tk.USER, tk.ASSISTANT}


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_assistant_tokens_are_content_and_end_of_turn(pair, conv):
  style, ours, _ = pair
  messages = CONVERSATIONS[conv]
  ids, roles = ours.encode_chat(messages)
  eot = STYLES[style]["eot"]
  # One run of ASSISTANT tokens per assistant message, each ending with the end-of-turn token.
  is_asst = roles == tk.ASSISTANT
  starts = np.flatnonzero(is_asst & ~np.r_[False, is_asst[:-1]])
  ends = np.flatnonzero(is_asst & ~np.r_[is_asst[1:], False])
  replies = [m["content"] for m in messages if m["role"] == "assistant"]
  assert len(starts) == len(replies)
  for s, e, reply in zip(starts, ends, replies):
    assert ours.decode(ids[s:e + 1]) == reply + eot
    assert ids[e] == ours.eot_id
    assert roles[s - 1] == tk.CONTEXT  # the assistant header is context
  user_text = ours.decode(ids[roles == tk.USER])
  assert all(m["content"] in user_text for m in messages if m["role"] == "user")
  assert "<|im_start|>assistant" not in ours.decode(ids[roles == tk.USER])


def test_prompt_plus_reply_is_the_full_conversation(pair):
  """What the sampler sees (prompt + generated reply) tokenizes as the rendered conversation."""
  _, ours, _ = pair
  messages = CONVERSATIONS[0]
  prompt, prompt_roles = ours.encode_chat(messages[:-1], add_generation_prompt=True)
  full, full_roles = ours.encode_chat(messages)
  np.testing.assert_array_equal(full[:len(prompt)], prompt)
  np.testing.assert_array_equal(full_roles[:len(prompt)], prompt_roles)
  assert (full_roles[len(prompt):] == tk.ASSISTANT).all() or ours.decode(
      full[len(prompt):][full_roles[len(prompt):] != tk.ASSISTANT]).strip() == ""
  assert ours.decode(full[len(prompt):]).startswith(messages[-1]["content"])


def test_end_of_turn_and_stop_tokens(pair):
  style, ours, ref = pair
  assert ours.eot_token == STYLES[style]["eot"]
  assert ours.eot_id == ref.convert_tokens_to_ids(STYLES[style]["eot"])
  assert ours.stop_tokens == (ours.eot_id, ref.eos_token_id)


# What the templates write around a turn, as precomputed ids (multi-token headers).
FRAMES = {"llama3": {"user": ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
                     "assistant": ("<|start_header_id|>assistant<|end_header_id|>\n\n",
                                   "<|eot_id|>")},
          "qwen2": {"user": ("<|im_start|>user\n", "<|im_end|>\n"),
                    "assistant": ("<|im_start|>assistant\n", "<|im_end|>\n")}}


@pytest.mark.parametrize("role", ["user", "assistant"])
def test_turn_frames_are_the_templates_headers_and_fit_the_tokenizer(pair, role):
  style, ours, ref = pair
  frame = ours.turn_frame(role)
  header, footer = FRAMES[style][role]
  assert list(frame.header_ids) == ref.encode(header, add_special_tokens=False)
  assert list(frame.footer_ids) == ref.encode(footer, add_special_tokens=False)
  assert len(frame.header_ids) > 1 and frame.footer_ids[0] == ours.eot_id
  # A conversation written on device (frames around content ids) is what transformers renders.
  messages = CONVERSATIONS[1]
  ids = _ref_ids(ref, messages[:1])
  for m in messages[1:]:
    f = ours.turn_frame(m["role"])
    ids += [*f.header_ids, *ours.encode(m["content"]), *f.footer_ids]
  assert ids == _ref_ids(ref, messages)


def test_a_template_that_does_not_fit_the_tokenizer_is_refused(pair):
  style, ours, _ = pair
  specials = {"bos_token": STYLES[style]["bos"], "eos_token": STYLES[style]["eos"]}
  template = STYLES[style]["template"]
  # A header that ends in a space: " the" is one BPE piece in the rendered text, but a space
  # and "the" when ids are written around the content.
  spaced = template.replace("<|end_header_id|>\n\n", "<|end_header_id|> ").replace(
      "'\\n' + message.content", "' ' + message.content")
  with pytest.raises(ValueError, match="does not fit this tokenizer: a user turn"):
    tk.Tokenizer(ours.tokenizer, spaced, specials).turn_frame("user")
  # A template that rewrites the content it is given.
  upper = template.replace("message['content']", "(message['content'] | upper)").replace(
      "message.content", "(message.content | upper)")
  with pytest.raises(ValueError, match="does not write a user message's content as it is"):
    tk.Tokenizer(ours.tokenizer, upper, specials).turn_frame("user")
  with pytest.raises(ValueError, match="role 'system' is not"):
    ours.turn_frame("system")


def test_unknown_role_raises(pair):
  _, ours, _ = pair
  with pytest.raises(ValueError, match="message 1: role 'tool'"):
    ours.encode_chat([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}])


def test_older_tokenizer_config_format(pair, tmp_path):
  """Template inside tokenizer_config.json, special tokens as AddedToken dicts."""
  style, ours, ref = pair
  ours.tokenizer.save(str(tmp_path / "tokenizer.json"))
  config = {"chat_template": STYLES[style]["template"],
            "eos_token": {"__type": "AddedToken", "content": STYLES[style]["eos"]}}
  if STYLES[style]["bos"]:
    config["bos_token"] = {"__type": "AddedToken", "content": STYLES[style]["bos"]}
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  old = tk.Tokenizer.from_pretrained(tmp_path)
  messages = CONVERSATIONS[1]
  assert old.encode_chat(messages)[0].tolist() == _ref_ids(ref, messages)


# ------------------------------------------------------------------------------------------------
# Word-level task vocabularies.
# ------------------------------------------------------------------------------------------------

WORDS = ["what", "is", "the", "sum", "of", "?", "which", "numbers", "3", "4", "7", ".", "it", "+"]


@pytest.fixture(scope="module")
def words():
  return tk.Tokenizer.for_words(WORDS)


def test_word_vocabulary(words):
  assert words.pad_id == 0 == words.token_to_id("<pad>")
  assert words.vocab_size == len(tk.WORD_SPECIALS) + len(WORDS)
  assert words.stop_tokens == (words.token_to_id("<eot>"),)
  ids = words.encode("what is 3+4?")
  assert ids == [words.token_to_id(w) for w in ["what", "is", "3", "+", "4", "?"]]
  assert words.decode(ids) == "what is 3 + 4 ?"
  assert words.decode(words.encode("banana")) == "<unk>"


def test_word_frames_are_the_slot_tasks_single_token_headers(words):
  user, assistant = words.turn_frame("user"), words.turn_frame("assistant")
  assert user.header_ids == (words.token_to_id("<user>"),)
  assert assistant.header_ids == (words.token_to_id("<assistant>"),)
  assert user.footer_ids == assistant.footer_ids == (words.eot_id,)


def test_word_chat_roles_and_text(words):
  messages = [{"role": "user", "content": "what is the sum ?"},
              {"role": "assistant", "content": "which numbers ?"},
              {"role": "user", "content": "3 + 4"},
              {"role": "assistant", "content": "it is 7 ."}]
  ids, roles = words.encode_chat(messages)
  assert words.decode(ids) == ("<bos> <user> what is the sum ? <eot> <assistant> which numbers ? "
                               "<eot> <user> 3 + 4 <eot> <assistant> it is 7 . <eot>")
  assert words.decode(ids[roles == tk.ASSISTANT]) == "which numbers ? <eot> it is 7 . <eot>"
  assert words.decode(ids[roles == tk.USER]) == "<user> what is the sum ? <eot> <user> 3 + 4 <eot>"
  prompt, _ = words.encode_chat(messages[:1], add_generation_prompt=True)
  assert words.decode(prompt[-1:]) == "<assistant>"
  with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role"):
    words.render([{"role": "tool", "content": "x"}])


def test_word_tokenizer_saves_for_transformers(words, tmp_path):
  words.save(tmp_path)
  ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
  again = tk.Tokenizer.from_pretrained(tmp_path)
  messages = [{"role": "system", "content": "it is 7"},
              {"role": "user", "content": "what is 3 + 4 ?"}]
  for gen in (False, True):
    want = _ref_ids(ref, messages, gen)
    assert words.encode_chat(messages, add_generation_prompt=gen)[0].tolist() == want
    assert again.encode_chat(messages, add_generation_prompt=gen)[0].tolist() == want
  assert again.eot_token == "<eot>" and again.pad_id == 0
