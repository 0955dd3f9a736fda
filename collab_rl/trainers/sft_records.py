"""SFT on CollabLLM records' conversations (the language tier): a Hugging Face policy, or the user.

Each record's conversation (its `turns`, else its prompt answered by its completion) is rendered
by the model's chat template (`Tokenizer.encode_chat`) and trained with the next-token loss on
the assistant's tokens only (their contents and end-of-turn tokens, exactly what the sampler
writes; `sft.sft_loss`):

    L = - sum_{b,t} m_bt log p(x_bt | x_b,<t) / sum_{b,t} m_bt,   m_bt = [role_bt == ASSISTANT]

`side = "user"` trains the LM user instead, on the same conversations as the user sees them
(`text.UserSide`: the role-play system message with the record's goal, the stage direction, the
first request as its own message, then every turn with the roles swapped), so that its own turns
are the "assistant" tokens the loss reads: how a user simulator is made from data.

Records come through grain (`data/loader.py`), shuffled and split by process; the iterator's
position is saved with every checkpoint, so a resumed run reads the records it would have read.
A conversation longer than `max_len` is cut (its tail is not trained on) and counted
(`truncated`). Evaluation: the held-out loss and token accuracy on the validation split's first
`eval_batch_size` records. With `export_hf` the run ends by writing WORKDIR/hf, the trained model
as a Hugging Face folder, which RL runs start from (`init_from_hf`) or play as the user
(`sim.user_from`).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from collab_rl import run as run_lib
from collab_rl import run_text
from collab_rl import sft as sft_lib
from collab_rl import sharding as sharding_lib
from collab_rl import tokenizer as tokenizer_lib
from collab_rl.data import loader as loader_lib
from collab_rl.tasks import text as text_lib

SIDES = ("assistant", "user")
_SWAP = {"user": "assistant", "assistant": "user", "system": "system"}


def conversation(record: dict, side: str, user: text_lib.UserSide | None) -> list[dict]:
  """The chat messages of a record as `side` sees them (see the module docstring)."""
  turns = list(record.get("turns") or [])
  if not turns:
    turns = [{"role": "user", "content": record["single_turn_prompt"]},
             {"role": "assistant", "content": record["single_turn_completion"]}]
  if side == "assistant":
    return turns
  rest = [{"role": _SWAP[t["role"]], "content": t["content"]} for t in turns[1:]]
  return [*user.messages(record, with_opening=True), *rest]


def encode(tok: tokenizer_lib.Tokenizer, records, side: str, user, max_len: int):
  """{"tokens", "roles"} [B, max_len] of the records' conversations, and how many were cut."""
  tokens = np.zeros((len(records), max_len), np.int32)
  roles = np.zeros((len(records), max_len), np.int32)
  cut = 0
  for i, r in enumerate(records):
    try:
      ids, rl = tok.encode_chat(conversation(r, side, user))
    except ValueError as e:
      raise ValueError(f"{r.get('source', 'record')}:{r.get('line', '?')}: {e}") from None
    cut += len(ids) > max_len
    tokens[i, :min(len(ids), max_len)] = ids[:max_len]
    roles[i, :min(len(ids), max_len)] = rl[:max_len]
  return {"tokens": tokens, "roles": roles}, cut


def check_config(config):
  """Every check that can fail on the config, before anything loads or compiles."""
  if config.side not in SIDES:
    raise ValueError(f"config.side={config.side!r}; choose from {SIDES}")
  run_text.check(config)
  tok = tokenizer_lib.Tokenizer.from_pretrained(text_lib.tokenizer_folder(config))
  mcfg = run_lib.check_model(config)
  if "lm" not in mcfg.heads:
    raise ValueError(f"config.model.heads={mcfg.heads} must include 'lm'")
  if mcfg.vocab_size < tok.vocab_size:
    raise ValueError(f"config.model.vocab_size={mcfg.vocab_size} is smaller than the "
                     f"tokenizer's vocabulary ({tok.vocab_size})")
  run_lib.check_positive(config, ("num_steps", "max_len", "log_every", "eval_every",
                                  "eval_batch_size"))
  if mcfg.max_position_embeddings < config.max_len:
    raise ValueError(f"config.model.max_position_embeddings={mcfg.max_position_embeddings} < "
                     f"config.max_len={config.max_len}")
  mesh = run_lib.check_run(config, batches=("batch_size", "eval_batch_size"))
  run_lib.check_microbatches(config, config.batch_size)
  user = None
  if config.side == "user":
    user = text_lib.UserSide(tok, text_lib.UserConfig(**config.sim.to_dict()))
  return mesh, tok, user


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_after: int | None = None) -> dict[str, Any]:
  """Trains to `config.num_steps`, resuming from `workdir` if it holds a checkpoint (records
  from the saved position); `stop_after` ends this process at that step, with a checkpoint."""
  mesh, tok, user = check_config(config)
  init = run_lib.init_state(config, mesh,
                            run_lib.make_optimizer(config.optimizer, config.num_steps))
  model, tx, shardings = init.model, init.tx, init.shardings
  batch_sh, repl = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)
  microbatches = config.get("microbatches", 1)
  step_fn = jax.jit(lambda s, b: sft_lib.train_step(model, tx, s, b, microbatches),
                    in_shardings=(shardings, batch_sh), out_shardings=(shardings, repl),
                    donate_argnums=0)
  loss_fn = jax.jit(lambda p, b: sft_lib.sft_loss(model, p, b["tokens"], b["roles"]),
                    in_shardings=(shardings.params, batch_sh), out_shardings=repl)
  source = os.path.join(config.data_dir, run_text.RECORDS, "train")
  train_it = iter(loader_lib.make_loader(config.data_dir, run_text.RECORDS, "train",
                                         config.batch_size, seed=config.seed))
  held_out = loader_lib.first_records(config.data_dir, "validation", config.eval_batch_size)
  eval_batch, eval_cut = encode(tok, held_out, config.side, user, config.max_len)
  eval_batch = sharding_lib.shard_batch(eval_batch, mesh)
  run = run_lib.Run(config, workdir, init.abstract, init.create_fn, tokenizer=tok)
  train_it = run.resume(train_it)
  state = run.state

  def evaluate():
    loss, (acc, _) = loss_fn(state.params, eval_batch)
    return {"eval_loss": float(loss), "eval_token_acc": float(acc),
            "eval_truncated": eval_cut / config.eval_batch_size}

  history = run.baseline(evaluate)
  for step in run.steps(int(state.step), config.num_steps, stop_after, f"sft[{config.side}]"):
    records = loader_lib.records_of(next(train_it), source)
    batch, cut = encode(tok, records, config.side, user, config.max_len)
    state, m = step_fn(state, sharding_lib.shard_batch(batch, mesh))
    history.update(run.end_step(step, state, {**m, "truncated": cut / len(records)}, evaluate,
                                {"sequences_per_s": config.batch_size},
                                data_state=train_it.get_state()))
  run.close()
  return {"state": state, "final": history, "how": run.how}
