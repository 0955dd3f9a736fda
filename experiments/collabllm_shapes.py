"""experiments/collabllm_8b.py's language task as shapes, with no file: what the memory plan
(`memory_plan.plan_collabllm`) and the compiled check (`memory_compiled`) build the run's
programs on (the LM user's model: `text.user_model_config`). Only sizes and Llama-3.1's
special ids matter to them, so no tokenizer or record is read."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp

from collab_rl import rewards
from collab_rl import tokenizer as tokenizer_lib
from collab_rl.models import transformer
from collab_rl.tasks import text as text_lib


class Llama3Tokenizer:
  """What `TextTask` reads of a tokenizer, as Llama-3.1-Instruct's tokenizer.json has it: the
  vocabulary, the stop token and the chat template's turn frames (`<|start_header_id|>` role
  `<|end_header_id|>` "\\n\\n" ... `<|eot_id|>`), the only things its sizes depend on. No
  download: `encode` gives bytes, which only the TERMINATE and confusion patterns read."""

  vocab_size = 128_256
  eot_id = 128_009  # <|eot_id|>, also Llama-3.1-Instruct's eos
  stop_tokens = (128_009,)
  ROLE_IDS = {"system": 9_125, "user": 882, "assistant": 78_191}
  tokenizer = types.SimpleNamespace(get_vocab=lambda with_added_tokens=True: {})

  def turn_frame(self, role: str) -> tokenizer_lib.TurnFrame:
    return tokenizer_lib.TurnFrame((128_006, self.ROLE_IDS[role], 128_007, 271), (128_009,))

  def encode(self, text: str) -> list[int]:
    return list(text.encode())


def task(config, user: transformer.Transformer, rcfg: rewards.RewardConfig) -> text_lib.TextTask:
  """The run's `TextTask` on Llama-3.1's token ids (no tokenizer file), `user` the LM user,
  long enough for MR's futures (`rcfg.horizon`)."""
  return text_lib.TextTask(Llama3Tokenizer(), user, Llama3Tokenizer(),
                           text_lib.UserConfig(**config.sim.to_dict()),
                           reply_tokens=config.reply_tokens,
                           max_turns=rcfg.horizon(config.num_turns))


def intent(task: text_lib.TextTask, rows: int, sharding_=None) -> text_lib.TextIntent:
  """The shapes of `rows` records' intent as `run_text.World.encode` gives them (with
  `sharding_`, placed as it places them)."""
  ucfg = task.ucfg
  row = lambda *shape: jax.ShapeDtypeStruct((rows, *shape), jnp.int32, sharding=sharding_)
  return text_lib.TextIntent(row(), row(ucfg.max_request_tokens), row(ucfg.max_request_tokens),
                             row(), row(ucfg.max_prompt_tokens), row(), row())
