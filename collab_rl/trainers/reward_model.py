"""A learned reward model fitted to the multiturn-aware reward, on data generated on device.

Every step draws fresh episodes of a verifiable task and stops at the policy's first turn
(`<bos> <user> calc 3 + ? * 2 <eot> <assistant>`). Each row gets G candidate replies from a
mixture of scripted behaviours, drawn per candidate:

  oracle      a clarifying question about a slot the request left out, or the ideal answer when
              the request is clear (`rollout.oracle_policy`)
  answer_now  an answer at once, guessing what it was not told (`rollout.answer_now_policy`)
  irrelevant  a question about a slot the user already gave (or about no slot at all)

Every candidate is scored by MR (`rewards.multiturn_aware_reward`, futures played by the oracle
against the scripted user: `reward.window` turns, `reward.samples` futures), all B x G x S
branches in one batched call. The reward model (`reward_model.score`) reads the conversation with
the candidate appended, never the intent, and is fitted by

  bradley_terry  on each row's (best, worst) candidates by MR, kept when the gap > min_gap
  regression     on the MR of every candidate

Evaluation, on held-out episodes (keys no training step uses): accuracy on the (best, worst) pairs
(`eval_pair_acc`), on every within-row pair whose MR differs by more than min_gap
(`eval_order_acc`), Spearman's rho of predicted reward with MR among each row's candidates
(`eval_spearman`, averaged over rows), Spearman and Pearson over all candidates pooled (only
meaningful for regression: Bradley-Terry leaves every context's offset free), and the share of
rows whose pair is kept. A fresh run evaluates at step 0 too.

Episodes are a function of (seed, step), so a resumed run sees the same data: no data iterator
state to checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from collab_rl import conversation as conv_lib
from collab_rl import reward_model as rm
from collab_rl import rewards
from collab_rl import rollout as rollout_lib
from collab_rl import run as run_lib
from collab_rl import sharding as sharding_lib
from collab_rl import train_state as state_lib
from collab_rl.models import transformer
from collab_rl.tasks import registry
from collab_rl.tokenizer import ASSISTANT

OBJECTIVES = ("bradley_terry", "regression")
BEHAVIOURS = ("oracle", "answer_now", "irrelevant")

# ------------------------------------------------------------------------------------------------
# Candidates: G replies per row from the behaviour mixture.
# ------------------------------------------------------------------------------------------------


def irrelevant_question(task, sim, key) -> tuple[jax.Array, jax.Array]:
  """`ask <slot>` about a random slot the user already gave (`what` when none is known): the
  user answers `known` / `what ?`, and R* charges it as an irrelevant question."""
  b, k = sim.known_BxK.shape
  pick_B = jnp.argmax(jnp.where(sim.known_BxK, jax.random.uniform(key, (b, k)), -1.0), 1)
  word_B = jnp.where(jnp.any(sim.known_BxK, 1), jnp.asarray(task.name_ids_K)[pick_B],
                     task.ids["what"])
  toks = jnp.stack([jnp.full((b,), task.ids["ask"]), word_B, jnp.full((b,), task.eot_id)], 1)
  toks = jnp.pad(toks, ((0, 0), (0, task.answer_len + 1 - 3)))
  return toks.astype(jnp.int32), jnp.full((b,), 3, jnp.int32)


def candidates(task, conv, sim, key, log_weights):
  """(reply_NxM, length_N, kind_N) for rows that are already one per candidate (N = B x G,
  M = answer template + `<eot>`); kind indexes BEHAVIOURS. Every behaviour writes every row and
  jnp.where keeps the drawn one: elementwise, so nothing crosses devices (an indexed gather
  would make XLA all-gather the batch) and the program has no per-candidate copies."""
  n = conv.batch
  k_kind, k_now, k_irr = jax.random.split(key, 3)
  kind_N = jax.random.categorical(k_kind, log_weights, shape=(n,)).astype(jnp.int32)
  outs = [rollout_lib.oracle_policy(task)(None, conv, sim, (), key)[::2],
          rollout_lib.answer_now_policy(task)(None, conv, sim, (), k_now)[::2],
          irrelevant_question(task, sim, k_irr)]
  toks, lens = outs[0]
  for i, (t, l) in enumerate(outs[1:], 1):
    toks = jnp.where((kind_N == i)[:, None], t, toks)
    lens = jnp.where(kind_N == i, l, lens)
  return toks, lens, kind_N


# ------------------------------------------------------------------------------------------------
# Data: episodes at the first policy turn, candidates, their MR and what the reward model reads.
# ------------------------------------------------------------------------------------------------


def reply_width(task) -> int:
  return task.answer_len + 1


def prompt_width(task) -> int:
  """`<bos> <user> request <eot> <assistant>`."""
  return 2 + task.request_width + 1 + 1


def model_width(task) -> int:
  """Tokens the reward model reads: the prompt and the longest candidate."""
  return prompt_width(task) + reply_width(task)


def future_width(task, window: int) -> int:
  """Room MR's futures need: the candidate, the user's answer, then `window` exchanges."""
  user = 1 + task.sim.max_user_len + 1
  return model_width(task) + user + window * (1 + reply_width(task) + user)


def make_batch(task, reward_cfg: rewards.RewardConfig, batch: int, num: int, log_weights, key,
               mesh=None) -> dict[str, jax.Array]:
  """One batch of candidates with their MR, every array [B, ...] (split over data x fsdp)."""
  k_int, k_cand, k_mr = jax.random.split(key, 3)
  intent = task.sample_intents(k_int, batch)
  conv, sim = rollout_lib.start(task, intent, future_width(task, reward_cfg.window))
  conv = rollout_lib.open_reply(task, conv)
  if mesh is not None:
    conv, sim = jax.lax.with_sharding_constraint((conv, sim), sharding_lib.batch_sharding(mesh))
  # Row b * G + g is candidate g of row b: [B, G] and [B * G] views share one layout.
  conv_G, sim_G = jax.tree_util.tree_map(lambda x: jnp.repeat(x, num, axis=0), (conv, sim))
  reply_N, len_N, kind_N = candidates(task, conv_G, sim_G, k_cand, log_weights)
  mr_N = rewards.multiturn_aware_reward(rollout_lib.oracle_policy(task), task, None, conv_G,
                                        sim_G, (), reply_N, len_N, k_mr, reward_cfg)[0]
  seen = conv_lib.append(conv_G, reply_N, len_N, ASSISTANT, new_turn=False)
  width = model_width(task)
  return {"tokens_BxGxL": seen.tokens_BxL[:, :width].reshape(batch, num, width),
          "last_BxG": (seen.cursor_B - 1).reshape(batch, num),
          "mr_BxG": mr_N.reshape(batch, num),
          "kind_BxG": kind_N.reshape(batch, num),
          "ambiguous_B": intent.ambiguous_B}


# ------------------------------------------------------------------------------------------------
# Loss and step.
# ------------------------------------------------------------------------------------------------


def _score_rows(model, params, tokens_NxL, last_N):
  valid_NxL = jnp.arange(tokens_NxL.shape[1])[None, :] <= last_N[:, None]
  return rm.score(model, params, tokens_NxL, valid_NxL, last_N)


def predict(model, params, batch) -> jax.Array:
  """reward_BxG of every candidate."""
  b, g, l = batch["tokens_BxGxL"].shape
  r_N = _score_rows(model, params, batch["tokens_BxGxL"].reshape(b * g, l),
                    batch["last_BxG"].reshape(-1))
  return r_N.reshape(b, g)


def rm_loss(model, objective: str, min_gap: float, params, batch):
  """The objective's loss; aux: pair accuracy on the kept pairs and the kept share."""
  tokens_BxGxL, last_BxG, mr_BxG = batch["tokens_BxGxL"], batch["last_BxG"], batch["mr_BxG"]
  b, _, l = tokens_BxGxL.shape
  chosen_B, rejected_B, keep_B = rm.make_pairs(mr_BxG, min_gap)
  if objective == "bradley_terry":
    # Only the two candidates of each pair go through the model: [B, 2] rows, kept per row so
    # that a row's pair stays on the device that holds the row.
    idx_Bx2 = jnp.stack([chosen_B, rejected_B], 1)
    tokens_Bx2xL = jnp.take_along_axis(tokens_BxGxL, idx_Bx2[:, :, None], 1)
    last_Bx2 = jnp.take_along_axis(last_BxG, idx_Bx2, 1)
    r_Bx2 = _score_rows(model, params, tokens_Bx2xL.reshape(2 * b, l),
                        last_Bx2.reshape(-1)).reshape(b, 2)
    r_c, r_r = r_Bx2[:, 0], r_Bx2[:, 1]
    loss = rm.bradley_terry_loss(r_c, r_r, keep_B)
  else:
    r_BxG = predict(model, params, batch)
    loss = rm.regression_loss(r_BxG.reshape(-1), mr_BxG.reshape(-1))
    r_c = jnp.take_along_axis(r_BxG, chosen_B[:, None], 1)[:, 0]
    r_r = jnp.take_along_axis(r_BxG, rejected_B[:, None], 1)[:, 0]
  kept = jnp.sum(keep_B)
  acc = jnp.sum(keep_B & (r_c > r_r)) / jnp.maximum(kept, 1)
  return loss, {"pair_acc": acc, "kept_share": kept / b,
                "mr_gap": jnp.mean(jnp.max(mr_BxG, 1) - jnp.min(mr_BxG, 1))}


def train_step(model, tx, objective, min_gap, state: state_lib.TrainState, batch):
  new, loss, aux, m = state_lib.update(state, tx,
                                       lambda p: rm_loss(model, objective, min_gap, p, batch))
  return new, {"loss": loss, **aux, **m}


# ------------------------------------------------------------------------------------------------
# Build and checks.
# ------------------------------------------------------------------------------------------------


class Built(NamedTuple):
  task: Any
  model: transformer.Transformer
  create_fn: Callable[[], state_lib.TrainState]
  abstract: state_lib.TrainState
  data_fn: Callable  # key -> batch of candidates with MR
  step_fn: Callable  # (state, batch) -> (state, metrics); the state is donated
  predict_fn: Callable  # (params, batch) -> reward_BxG


def _log_weights(config):
  return jnp.log(jnp.asarray([config.behaviour[k] for k in BEHAVIOURS], jnp.float32))


def build(config, mesh, task) -> Built:
  init = run_lib.init_state(config, mesh,
                            run_lib.make_optimizer(config.optimizer, config.num_steps))
  model, tx, shardings = init.model, init.tx, init.shardings
  batch_sh, repl = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)
  reward_cfg, log_w = rewards.RewardConfig.from_config(config.reward), _log_weights(config)
  data_fn = jax.jit(lambda key: make_batch(task, reward_cfg, config.batch_size,
                                           config.candidates, log_w, key, mesh),
                    out_shardings=batch_sh)
  objective, min_gap = config.objective, float(config.min_gap)
  step_fn = jax.jit(lambda s, b: train_step(model, tx, objective, min_gap, s, b),
                    in_shardings=(shardings, batch_sh), out_shardings=(shardings, repl),
                    donate_argnums=0)
  # Predictions stay split like the batch: no all-gather, and reading them waits for every
  # shard (see `evaluate`).
  predict_fn = jax.jit(lambda p, b: predict(model, p, b),
                       in_shardings=(shardings.params, batch_sh), out_shardings=batch_sh)
  return Built(task, model, init.create_fn, init.abstract, data_fn, step_fn, predict_fn)


def check_config(config):
  """Every check that can fail on the config, before anything compiles. Returns (mesh, task)."""
  mcfg = run_lib.check_model(config)
  if "reward" not in mcfg.heads:
    raise ValueError(f"config.model.heads={mcfg.heads} must include 'reward'")
  if config.objective not in OBJECTIVES:
    raise ValueError(f"config.objective={config.objective!r}; choose from {OBJECTIVES}")
  task = registry.config_task(config)
  if mcfg.vocab_size < task.vocab_size:
    raise ValueError(f"config.model.vocab_size={mcfg.vocab_size} is smaller than the "
                     f"{config.task} vocabulary ({task.vocab_size} words)")
  if mcfg.max_position_embeddings < model_width(task):
    raise ValueError(f"config.model.max_position_embeddings={mcfg.max_position_embeddings} < "
                     f"the {model_width(task)} tokens the reward model reads")
  rewards.RewardConfig.from_config(config.reward)  # window 0..3, samples >= 1, cost >= 0
  mesh = run_lib.check_run(config)
  run_lib.check_positive(config, ("num_steps", "log_every", "eval_every", "eval_batch_size"))
  run_lib.check_eval_batches(config)
  if config.candidates < 2:
    raise ValueError(f"config.candidates={config.candidates}: pairs need at least 2 per row")
  if config.min_gap < 0:
    raise ValueError(f"config.min_gap={config.min_gap} must be >= 0")
  weights = [config.behaviour[k] for k in BEHAVIOURS]
  if min(weights) < 0 or sum(weights) <= 0:
    raise ValueError(f"config.behaviour weights {weights} must be >= 0 with a positive sum")
  return mesh, task


# ------------------------------------------------------------------------------------------------
# The loop.
# ------------------------------------------------------------------------------------------------


def evaluate(b: Built, params, held_out: list, min_gap: float) -> dict[str, float]:
  pred, mr = [], []
  for batch in held_out:
    # Wait for all shards before anything else is dispatched: on fake CPU devices two
    # independent programs with collectives in flight at once can deadlock (their per-device
    # tasks share one thread pool, in no fixed order), and reading a replicated value waits for
    # one shard only.
    pred.append(sharding_lib.to_host(jax.block_until_ready(b.predict_fn(params, batch))))
    mr.append(sharding_lib.to_host(batch["mr_BxG"]))  # rows spread over the hosts
  pred_BxG, mr_BxG = np.concatenate(pred), np.concatenate(mr)
  chosen, rejected, keep = jax.device_get(rm.make_pairs(mr_BxG, min_gap))
  rows = np.arange(len(mr_BxG))
  right = pred_BxG[rows, chosen] > pred_BxG[rows, rejected]
  return {"eval_pair_acc": float(np.sum(right & keep) / max(int(keep.sum()), 1)),
          "eval_order_acc": rm.order_accuracy(pred_BxG, mr_BxG, min_gap)[0],
          "eval_spearman": rm.within_row_spearman(pred_BxG, mr_BxG),
          "eval_spearman_pooled": rm.spearman(pred_BxG, mr_BxG),
          "eval_pearson_pooled": rm.pearson(pred_BxG, mr_BxG),
          "eval_kept_share": float(keep.mean())}


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_after: int | None = None) -> dict[str, Any]:
  """Fits the reward model to MR for `config.num_steps` steps in `workdir` (resumed if it holds
  a checkpoint; `stop_after`: see `run.Run.steps`). Returns {"state", "final", "how"}."""
  mesh, task = check_config(config)
  b = build(config, mesh, task)
  run = run_lib.Run(config, workdir, b.abstract, b.create_fn)
  state = run.state
  held_out = [jax.block_until_ready(b.data_fn(jax.random.fold_in(run.keys.eval, i)))
              for i in range(config.eval_batch_size // config.batch_size)]
  min_gap = float(config.min_gap)
  history = run.baseline(lambda: evaluate(b, state.params, held_out, min_gap))
  for step in run.steps(int(state.step), config.num_steps, stop_after, "reward_model"):
    state, m = b.step_fn(state, b.data_fn(jax.random.fold_in(run.keys.train, step)))
    history.update(run.end_step(
        step, state, m, lambda: evaluate(b, state.params, held_out, min_gap),
        {"steps_per_s": 1}))
  run.close()
  return {"state": state, "final": history, "how": run.how}
