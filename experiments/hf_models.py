"""Hugging Face folders built here, with nothing downloaded: a byte-level BPE tokenizer trained with
`tokenizers` on the texts at hand, given Llama-3's or Qwen2's special tokens and chat template,
and a Llama- or Qwen2-architecture model saved next to it (`config.json`, `model.safetensors`,
`tokenizer.json`, `tokenizer_config.json`), which transformers loads as it loads a downloaded
checkpoint. The tests make tiny random ones; the language-tier demonstration
(`experiments/language_demo.py`) trains small ones with the project's own SFT.
"""

from __future__ import annotations

import pathlib
from typing import Iterable

import jax
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from collab_rl import tokenizer as tokenizer_lib
from collab_rl.models import hf, transformer

# Llama-3-Instruct's chat template.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")

# Qwen2.5-Instruct's template, without its tool-calling branches (whitespace control kept).
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\") %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + "
    "'\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")

STYLES = {
    "llama3": dict(template=LLAMA3_TEMPLATE, eot="<|eot_id|>", bos="<|begin_of_text|>",
                   eos="<|end_of_text|>", pad=None,
                   specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                             "<|end_header_id|>", "<|eot_id|>"]),
    "qwen2": dict(template=QWEN2_TEMPLATE, eot="<|im_end|>", bos=None, eos="<|endoftext|>",
                  pad="<|endoftext|>", specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
}
ARCHITECTURE = {"llama3": "llama", "qwen2": "qwen2"}


def train_tokenizer(texts: Iterable[str], style: str = "llama3",
                    vocab_size: int = 512) -> tokenizer_lib.Tokenizer:
  """A byte-level BPE trained on `texts` (every byte is in its alphabet, so any text encodes),
  with the special tokens and chat template of `style` (llama3 | qwen2)."""
  s = STYLES[style]
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=s["specials"],
                                show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(list(texts), trainer)
  special = {"bos_token": s["bos"], "eos_token": s["eos"], "pad_token": s["pad"]}
  return tokenizer_lib.Tokenizer(tok, s["template"], special, eot_token=s["eot"])


def model_config(tok: tokenizer_lib.Tokenizer, style: str = "llama3", *, hidden_size: int = 32,
                 intermediate_size: int = 64, num_hidden_layers: int = 2,
                 num_attention_heads: int = 4, num_key_value_heads: int = 2,
                 max_position_embeddings: int = 2048) -> transformer.TransformerConfig:
  """A model of `style`'s architecture (Qwen2 has biases on q/k/v) for `tok`'s vocabulary."""
  return transformer.TransformerConfig(
      vocab_size=tok.vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
      num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
      num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings,
      attention_bias=style == "qwen2", tie_word_embeddings=style == "qwen2")


def save_folder(folder: str | pathlib.Path, tok: tokenizer_lib.Tokenizer,
                cfg: transformer.TransformerConfig, params=None, seed: int = 0) -> str:
  """`folder` as a Hugging Face checkpoint of `cfg` (random weights from `seed` unless `params`
  are given) and its tokenizer, with the tokenizer's special token ids in config.json."""
  model = transformer.Transformer(cfg)
  if params is None:
    params = transformer.init_params(model, jax.random.key(seed))
  ids = {f"{k}_id": tok.token_to_id(v) for k, v in tok.special_tokens.items()
         if k in ("bos_token", "eos_token", "pad_token")}
  hf.save_pretrained(model, params, folder, hf_config=ids)
  tok.save(folder)
  return str(folder)


def logit_gap(folder: str | pathlib.Path, text: str = "Please compute 3 + ? * 2.") -> float:
  """The largest difference between transformers' logits and collab_rl's for a chat prompt,
  both loading `folder` (what a trained run's exported WORKDIR/hf must pass: 1e-4)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  tok = tokenizer_lib.Tokenizer.from_pretrained(folder)
  ids = np.asarray([tok.encode_chat([{"role": "user", "content": text}],
                                    add_generation_prompt=True)[0]])
  ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
  with torch.no_grad():
    want = ref(torch.tensor(ids)).logits.numpy()
  model, params = hf.load_pretrained(folder)
  got = np.asarray(model.apply({"params": params}, ids).logits_BxLxV)
  return float(np.abs(got - want).max())
