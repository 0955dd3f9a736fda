"""SFT of the mediator: rewrite the conversation so far into one explicit request for the base.

The Mediator-Assistant arm ("Intent Mismatch") keeps the assistant as it is (the SFT base, read
from `config.assistant_from`, frozen and never saved here) and trains a mediator in front of it
(`collab_rl/mediator.py`). The mediator has the base's architecture and vocabulary and starts
from its weights (`config.init_from`; empty: fresh).

Data: each step plays fresh episodes on device, the task's scripted user against the SFT data's
behaviour mixture (`sft.AskOrAnswerMix` of `collab_rl/sft.py`: the asking oracle in `ask_share` of
the conversations, else answer-now), half of them with the reactive user (`sim.sharded=False`: it
only answers questions) and half with the sharded one (every user turn also reveals the next
missing slot). Each conversation is cut at its opening and after every user turn of a row still
going; a cut's input is the conversation so far and `<assistant>`, its target the explicit request
of the simulator's state at that point (`mediator.explicit_request`). The loss is `sft.sft_loss`,
on the target tokens only (the conversation's own replies are relabelled context):

    L = - sum_{r,t} m_rt log p(x_rt | x_r,<t) / sum_{r,t} m_rt,   m_rt = [x_rt is the target]

Evaluation (step 0 of a fresh run, every `eval_every` steps and at the end), per mode, on fixed
held-out episodes (about `eval_batch_size` each): the share of cuts whose greedy rewrite is the
target token for token (`<mode>/exact_match`), the teacher-forced loss (`<mode>/eval_loss`), and
the Mediator-Assistant playing `eval_turns` turns (`<mode>/score`, `<mode>/score_ambiguous`, ...
from `scoring.summarize`). The assistant alone, the baseline the pair must beat, is the
`sft_base` row of `collab_rl.evaluate`. As in sft.py, episodes are a function of (seed, step).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from collab_rl import losses
from collab_rl import mediator as mediator_lib
from collab_rl import restore as restore_lib
from collab_rl import rollout as rollout_lib
from collab_rl import run as run_lib
from collab_rl import sampling
from collab_rl import sft as sft_lib
from collab_rl import sharding as sharding_lib
from collab_rl.models import transformer
from collab_rl.tasks import registry, scoring

MODES = ("reactive", "sharded")

# ------------------------------------------------------------------------------------------------
# Config.
# ------------------------------------------------------------------------------------------------


def tasks_by_mode(config) -> dict[str, Any]:
  """The task once per mode: the reactive and the sharded scripted user."""
  return {m: registry.config_task(config, sharded=m == "sharded") for m in MODES}


def columns(config, task, turns: int) -> int:
  """Conversation columns: replies at the assistant's budget (the behaviour's are shorter)."""
  return rollout_lib.conversation_len(task, turns, config.reply_tokens)


def read_assistant_config(config) -> dict:
  """The assistant's saved config, or a ValueError that names `config.assistant_from`."""
  path = config.assistant_from
  if not path:
    raise ValueError("config.assistant_from is empty: give the checkpoint directory of the "
                     "assistant the mediator serves (the SFT base's WORKDIR/checkpoints)")
  try:
    return restore_lib.read_config(path)
  except (ValueError, FileNotFoundError) as e:
    raise ValueError(f"config.assistant_from={path!r} holds no finished checkpoint of an "
                     f"assistant: {e}") from e


def check_config(config):
  """Every check that can fail on the config, before anything compiles: (mesh, tasks, base)."""
  mcfg = run_lib.check_model(config)
  if "lm" not in mcfg.heads:
    raise ValueError(f"config.model.heads={mcfg.heads} must include 'lm' (the mediator writes)")
  run_lib.check_positive(config, ("num_steps", "num_turns", "eval_turns", "reply_tokens",
                                  "batch_size", "eval_batch_size", "log_every", "eval_every"))
  if not 1 <= config.cuts_per_episode <= config.num_turns + 1:
    raise ValueError(f"config.cuts_per_episode={config.cuts_per_episode} must be in [1, "
                     f"num_turns + 1 = {config.num_turns + 1}] (the opening and each user turn)")
  if not 0.0 <= config.ask_share <= 1.0:
    raise ValueError(f"config.ask_share={config.ask_share} must be in [0, 1]")
  tasks = tasks_by_mode(config)  # unknown task or simulator fields fail here
  task = tasks["reactive"]
  if mcfg.vocab_size < task.vocab_size:
    raise ValueError(f"config.model.vocab_size={mcfg.vocab_size} is smaller than the vocabulary "
                     f"of task {config.task!r} ({task.vocab_size} words)")
  width = columns(config, task, max(config.num_turns, config.eval_turns))
  if mcfg.max_position_embeddings < width + 1 + mediator_lib.request_len(task):
    raise ValueError(f"config.model.max_position_embeddings={mcfg.max_position_embeddings} "
                     f"cannot hold a conversation of {width} tokens and its rewrite")
  mesh = run_lib.check_run(config, batches=("eval_batch_size",))
  run_lib.check_microbatches(config, config.batch_size)
  if config.batch_size % (2 * jax.process_count()):
    raise ValueError(f"config.batch_size={config.batch_size} must split in two (reactive, "
                     f"sharded) over {jax.process_count()} processes")
  sharding_lib.check_batch(config.batch_size // 2, mesh, what="half of batch_size")
  base = read_assistant_config(config)
  if base.get("task") != config.task:
    raise ValueError(f"config.assistant_from={config.assistant_from!r}: the assistant was "
                     f"trained on task {base.get('task')!r}, the mediator is for {config.task!r}")
  base_vocab = base.get("model", {}).get("vocab_size")
  if base_vocab != mcfg.vocab_size:
    raise ValueError(f"config.assistant_from={config.assistant_from!r}: the assistant's "
                     f"vocabulary ({base_vocab}) differs from config.model.vocab_size="
                     f"{mcfg.vocab_size}; the mediator must write the assistant's words")
  return mesh, tasks, base


# ------------------------------------------------------------------------------------------------
# Data: the behaviour's episodes, cut after every user turn.
# ------------------------------------------------------------------------------------------------


def watch_cuts(conv, sim):
  """What a cut needs of the state after each turn (`rollout.take_turns`' `watch`)."""
  return conv.cursor_B, sim.known_BxK, conv.done_B


def keep_valid(rows: dict, keep: int, key) -> dict:
  """`keep` of the rows, the valid ones first in random order: a fixed-shape batch that spends
  little compute on cuts without a target (after the user said thanks)."""
  priority_R = rows["valid"] + 0.5 * jax.random.uniform(key, rows["valid"].shape)
  _, idx_K = jax.lax.top_k(priority_R, keep)
  return jax.tree_util.tree_map(lambda x: x[idx_K], rows)


def cut_source(config, tasks, mesh):
  """The jitted data: key -> {mode: rows} of `batch_size // 2` fresh episodes per mode, cut
  after every user turn, `cuts_per_episode` rows per episode (valid cuts first). Held-out
  batches come from the same function (other keys): one compilation for both."""
  per_mode = config.batch_size // 2

  def rows(key):
    out = {}
    for i, (mode, task) in enumerate(tasks.items()):
      k_play, k_keep = jax.random.split(jax.random.fold_in(key, i))
      policy = sft_lib.AskOrAnswerMix(task, config.ask_share)
      ro = rollout_lib.rollout(policy, task, None, k_play, per_mode, num_turns=config.num_turns,
                               max_len=columns(config, task, config.num_turns), mesh=mesh,
                               watch=watch_cuts)
      cut = mediator_lib.cut_examples(task, ro.conv, ro.conv.intent, ro.watched)
      out[mode] = keep_valid(cut, config.cuts_per_episode * per_mode, k_keep)
    return out

  return jax.jit(rows, out_shardings=sharding_lib.batch_sharding(mesh))


def merged(rows_by_mode: dict, keys=("tokens", "roles")) -> dict:
  """One batch of every mode's rows (what a train step reads)."""
  return {k: jnp.concatenate([r[k] for r in rows_by_mode.values()]) for k in keys}


# ------------------------------------------------------------------------------------------------
# Evaluation.
# ------------------------------------------------------------------------------------------------


def assistant_sampling(config, task) -> sampling.SamplingConfig:
  """The assistant as evaluation plays it: greedy, `reply_tokens` per reply."""
  return sampling.SamplingConfig(max_new_tokens=config.reply_tokens, greedy=True,
                                 stop_tokens=(task.eot_id,))


def rewrite_metrics(task, model, params, rows) -> dict[str, jax.Array]:
  """Exact match of the greedy rewrite and teacher-forced loss, over the valid cuts."""
  out = mediator_lib.generate(model, mediator_lib.rewrite_config(task), params, rows["tokens"],
                              rows["prompt_len"], jax.random.key(0), rows["valid"])
  exact_R = mediator_lib.exact_match(task, out, rows["target"])
  return {"exact_match": losses.masked_mean(exact_R.astype(jnp.float32), rows["valid"]),
          "eval_loss": sft_lib.sft_loss(model, params, rows["tokens"], rows["roles"])[0]}


def summarize(per_mode: dict[str, dict]) -> dict[str, float]:
  """Host-side `<mode>/<metric>` scalars of the evaluation."""
  out = {}
  for mode, m in per_mode.items():
    m = sharding_lib.to_host(m)
    scalars = {k: float(m.pop(k)) for k in ("exact_match", "eval_loss")}
    scalars.update(scoring.summarize(m))
    out.update({f"{mode}/{k}": v for k, v in scalars.items()})
  return out


# ------------------------------------------------------------------------------------------------
# The loop.
# ------------------------------------------------------------------------------------------------


def restore_assistant(path: str, base: dict, mesh, rules):
  """The frozen assistant: its model (from its own saved config) and params, sharded."""
  model = transformer.Transformer(transformer.TransformerConfig.from_dict(base["model"]))
  abstract = jax.eval_shape(lambda: transformer.init_params(model, jax.random.key(0)))
  shardings = sharding_lib.param_shardings(abstract, mesh, rules)
  abstract = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  return model, restore_lib.restore_params(path, abstract)


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_after: int | None = None) -> dict[str, Any]:
  """Trains to `config.num_steps`, resuming from `workdir`; returns {"state", "final", "how"}."""
  mesh, tasks, base = check_config(config)
  config = config.copy_and_resolve_references()
  # Saved with every checkpoint: evaluation finds the assistant from wherever it runs.
  if "://" not in config.assistant_from:
    config.assistant_from = os.path.abspath(config.assistant_from)
  init = run_lib.init_state(config, mesh,
                            run_lib.make_optimizer(config.optimizer, config.num_steps))
  model, tx, shardings = init.model, init.tx, init.shardings
  rules = sharding_lib.rules_from_config(config.get("partition_rules"))
  a_model, a_params = restore_assistant(config.assistant_from, base, mesh, rules)
  batch_sh, repl = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)

  data_fn = cut_source(config, tasks, mesh)
  microbatches = config.get("microbatches", 1)
  step_fn = jax.jit(lambda s, b: sft_lib.train_step(model, tx, s, merged(b), microbatches),
                    in_shardings=(shardings, batch_sh), out_shardings=(shardings, repl),
                    donate_argnums=0)
  pair = mediator_lib.MediatorAssistant(tasks["reactive"], model, a_model,
                                        assistant_sampling(config, tasks["reactive"]))

  def pair_episodes(policy, task, params, key):
    ro = rollout_lib.rollout(policy, task, params, key, config.eval_batch_size,
                             num_turns=config.eval_turns,
                             max_len=columns(config, task, config.eval_turns), mesh=mesh)
    return scoring.episode_metrics(task, ro.conv, ro.sim)

  def eval_pair(params, a_params, batches, key):
    out = {}
    for m, t in tasks.items():
      rows = {k: jnp.concatenate([b[m][k] for b in batches]) for k in batches[0][m]}
      out[m] = {**rewrite_metrics(t, model, params, rows),
                **pair_episodes(pair, t, {"mediator": params, "assistant": a_params}, key)}
    return out

  eval_fn = jax.jit(eval_pair)
  run = run_lib.Run(config, workdir, init.abstract, init.create_fn,
                    tokenizer=tasks["reactive"].tokenizer)
  state = run.state
  # Held-out cuts of about `eval_batch_size` episodes per mode, in training-shaped batches.
  rounds = max(1, config.eval_batch_size // (config.batch_size // 2))
  eval_rows = [data_fn(jax.random.fold_in(run.keys.eval, 100 + i)) for i in range(rounds)]
  eval_key = jax.random.fold_in(run.keys.eval, 1)

  def evaluate(params):
    return summarize(eval_fn(params, a_params, eval_rows, eval_key))

  history = run.baseline(lambda: evaluate(state.params))  # the starting mediator
  for step in run.steps(int(state.step), config.num_steps, stop_after, "mediator"):
    state, m = step_fn(state, data_fn(jax.random.fold_in(run.keys.train, step)))
    history.update(run.end_step(step, state, m, lambda: evaluate(state.params),
                                {"episodes_per_s": config.batch_size}))
  if "reactive/score" not in history:  # e.g. the workdir held a finished run
    history.update(evaluate(state.params))
  run.close()
  return {"state": state, "final": history, "how": run.how}
