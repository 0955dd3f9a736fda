"""Multi-turn DPO on MR-ranked candidate replies: online, or offline from the data engine.

Online (`dpo.source="online"`): each iteration plays `context_turns` turns of fresh conversations
with the current policy (so the candidates see real multi-turn histories), samples G candidate
replies per conversation from the current policy, scores each with the multiturn-aware reward
(futures with the policy itself) and keeps (best, worst) pairs whose MR gap passes `min_gap`.

Offline (`dpo.source="offline"`): the same pairs, read from the data engine's `mr_candidates`
dataset (`collab_rl/data/engine.py`) with grain; the iterator position is checkpointed, so a
resumed run continues with the next batch.

Either way the loss compares the candidates' summed log-probs (their own tokens only; the history
is context) under the policy and the frozen reference. Collection is one jitted call; the update
one jitted, donated step that refuses non-finite updates (`run_rl.jit_update`).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from collab_rl import conversation as conv_lib
from collab_rl import losses
from collab_rl import rewards
from collab_rl import rollout as rollout_lib
from collab_rl import run as run_lib
from collab_rl import run_rl
from collab_rl import sharding as sharding_lib
from collab_rl.data import engine
from collab_rl.data import loader as loader_lib
from collab_rl.models import lora as lora_lib
from collab_rl.tasks import text as text_lib
from collab_rl.tokenizer import ASSISTANT

SOURCES = ("online", "offline")

# ------------------------------------------------------------------------------------------------
# Config checks (before anything compiles).
# ------------------------------------------------------------------------------------------------


def check_config(config):
  task, cfg, mesh, rcfg = run_rl.check_common(config)
  d = config.dpo
  if d.source not in SOURCES:
    raise ValueError(f"config.dpo.source={d.source!r}; choose from {SOURCES}")
  run_lib.check_microbatches(config, config.batch_size)
  if config.candidates < 2:
    raise ValueError(f"config.candidates={config.candidates} must be >= 2")
  if d.beta <= 0:
    raise ValueError(f"config.dpo.beta={d.beta} must be > 0")
  if config.context_turns < 0 or config.context_turns >= config.num_turns:
    raise ValueError(f"config.context_turns={config.context_turns} must be in "
                     f"[0, num_turns={config.num_turns})")
  if d.source == "offline":
    meta = loader_lib.metadata(config.data_dir, engine.NAME)  # names the missing dataset if absent
    if meta.get("task") != config.task:
      raise ValueError(f"config.data_dir={config.data_dir!r}: the {engine.NAME} dataset there was "
                       f"made for task {meta.get('task')!r}, not {config.task!r}")
  return task, cfg, mesh, rcfg


# ------------------------------------------------------------------------------------------------
# Pairs: online (sampled and ranked now) or offline (read from the data engine's records).
# ------------------------------------------------------------------------------------------------


def play_history(config, task, policy, rcfg, params, k_int, k_ctx, intent=None):
  """`context_turns` turns of fresh conversations (from `k_int`, or `intent`), ending with the
  assistant header: (conv, sim, the policy's state), what G candidates are sampled after."""
  b = config.batch_size
  intent = task.sample_intents(k_int, b) if intent is None else intent
  conv, sim = rollout_lib.start(task, intent, run_rl.max_len(config, task, rcfg))
  pstate = policy.init(params, conv, rollout_lib.opening_width(task))
  if config.context_turns:
    out = rollout_lib.take_turns(policy, task, params, conv, sim, k_ctx, config.context_turns,
                                 policy_state=pstate)
    conv, sim = out.conv, out.sim
    pstate = policy.init(params, conv)  # the context, prefilled once more for the candidates
  return rollout_lib.open_reply(task, conv), sim, pstate


def collect_pairs(config, task, policy, rcfg, params, ref_params, model, key):
  """Histories, G candidates, their MR, and the (best, worst) pair of each conversation: all on
  device, for a task scored there."""
  k_int, k_ctx, k_cand, k_mr = jax.random.split(key, 4)
  conv, sim, pstate = play_history(config, task, policy, rcfg, params, k_int, k_ctx)
  cands = rewards.ranked_candidates(policy, task, params, conv, sim, pstate, config.candidates,
                                    k_cand, k_mr, rcfg)
  return pairs(config, model, ref_params, conv, cands.tokens_BGxN, cands.lengths_BG,
               cands.mr_BxG)


def candidate_futures(config, task, policy, rcfg, params, key, intent):
  """The language tier's first half of `collect_pairs`: histories of `intent`, G candidates
  and their B x G x S futures (`text.played`), which the host scores."""
  k_ctx, k_cand, k_mr = jax.random.split(key, 3)
  conv, sim, pstate = play_history(config, task, policy, rcfg, params, k_ctx, k_ctx,
                                   intent)
  conv_g, sim_g, pstate_g = rollout_lib.tile_rows((conv, sim, pstate), config.candidates)
  reply, _, reply_len, pstate_g = policy(params, conv_g, sim_g, pstate_g, k_cand)
  futures = rewards.play_futures(policy, task, params, conv_g, sim_g, pstate_g, reply,
                                 reply_len, k_mr, rcfg, keep=text_lib.played)
  return text_lib.played(conv, sim)[0], reply, reply_len, futures


def pairs(config, model, ref_params, conv, tokens_BGxN, lengths_BG, mr_BxG):
  """The (best, worst) candidate of each conversation by MR, kept when their gap passes
  `min_gap` and the conversation was still going: each as the history + the candidate, scored
  on the candidate's tokens alone."""
  g = config.candidates
  best, worst = jnp.argmax(mr_BxG, 1), jnp.argmin(mr_BxG, 1)
  gap = jnp.take_along_axis(mr_BxG, best[:, None], 1)[:, 0] - jnp.take_along_axis(
      mr_BxG, worst[:, None], 1)[:, 0]
  keep = (gap > config.min_gap) & ~conv.done_B

  def with_reply(idx):
    rows = jnp.arange(conv.batch) * g + idx
    full = conv_lib.append(conv, tokens_BGxN[rows], lengths_BG[rows], ASSISTANT, new_turn=False)
    # The candidate is the last assistant message: its tokens are the only ones scored.
    cand = (full.roles_BxL == ASSISTANT) & (full.turns_BxL == full.num_turns_B[:, None] - 1)
    return full.tokens_BxL, conv_lib.valid_mask(full), cand

  batch = _pair_batch(model, ref_params, with_reply(best), with_reply(worst), keep)
  return batch, _pair_stats(mr_BxG, gap, keep, batch)


def offline_pairs(config, model, ref_params, rec):
  """(best, worst) pairs of a batch of engine records: history + candidate, scored on the latter."""
  hist_BxL, hl_B = rec["history_tokens"], rec["history_len"]
  cand_BxGxN, cl_BxG, mr_BxG = rec["candidates"], rec["candidate_len"], rec["mr"]
  l = hist_BxL.shape[1]
  n = cand_BxGxN.shape[2]
  best, worst = jnp.argmax(mr_BxG, 1), jnp.argmin(mr_BxG, 1)
  gap = jnp.max(mr_BxG, 1) - jnp.min(mr_BxG, 1)
  j = jnp.arange(l + n)[None, :]

  def seq(idx_B):
    cand_BxN = jnp.take_along_axis(cand_BxGxN, idx_B[:, None, None], 1)[:, 0]
    cl_B = jnp.take_along_axis(cl_BxG, idx_B[:, None], 1)[:, 0]
    in_cand = (j >= hl_B[:, None]) & (j < (hl_B + cl_B)[:, None])
    from_hist = jnp.pad(hist_BxL, ((0, 0), (0, n)))
    from_cand = jnp.take_along_axis(cand_BxN, jnp.clip(j - hl_B[:, None], 0, n - 1), 1)
    tokens = jnp.where(j < hl_B[:, None], from_hist, jnp.where(in_cand, from_cand, 0))
    return tokens, j < (hl_B + cl_B)[:, None], in_cand

  chosen, rejected = seq(best), seq(worst)
  keep = gap > config.min_gap
  batch = _pair_batch(model, ref_params, chosen, rejected, keep)
  return batch, _pair_stats(mr_BxG, gap, keep, batch)


def _pair_stats(mr_BxG, gap_B, keep_B, batch) -> dict[str, jax.Array]:
  return {"mr/mean": mr_BxG.mean(), "mr/best": mr_BxG.max(1).mean(), "mr/gap": gap_B.mean(),
          "pairs/kept_share": keep_B.mean(),
          # chosen and rejected tokens the update trains on, counted on device
          "tokens/trained": batch["c_valid"].sum() + batch["r_valid"].sum()}


def _pair_batch(model, ref_params, chosen, rejected, keep):
  def ref_logp(seq):
    out = model.apply({"params": ref_params}, seq[0], valid_BxL=seq[1], heads=("lm",))
    return losses.sequence_logprob(losses.token_logprobs(out.logits_BxLxV, seq[0]), seq[2])

  return dict(c_tokens=chosen[0], c_valid=chosen[1], c_mask=chosen[2], r_tokens=rejected[0],
              r_valid=rejected[1], r_mask=rejected[2], ref_c=ref_logp(chosen),
              ref_r=ref_logp(rejected), keep=keep.astype(jnp.float32))


# ------------------------------------------------------------------------------------------------
# The update and the loop.
# ------------------------------------------------------------------------------------------------


def dpo_loss(model, config, params, batch, key=None):
  # Chosen and rejected in one forward pass: one set of larger matmuls instead of two. `key`:
  # the step's dropout key (LoRA dropout).
  b = batch["c_tokens"].shape[0]
  tokens, valid, mask = (jnp.concatenate([batch[f"c_{k}"], batch[f"r_{k}"]])
                         for k in ("tokens", "valid", "mask"))
  out = model.apply({"params": params}, tokens, valid_BxL=valid, heads=("lm",),
                    rngs=lora_lib.dropout_rngs(key))
  logp_2B = losses.sequence_logprob(losses.token_logprobs(out.logits_BxLxV, tokens), mask)
  return losses.dpo_loss(logp_2B[:b], logp_2B[b:], batch["ref_c"], batch["ref_r"],
                         config.dpo.beta, batch["keep"])


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_after: int | None = None) -> dict[str, Any]:
  task, mcfg, mesh, rcfg = check_config(config)
  run = run_rl.build(config, workdir, task, mesh, rcfg)
  model, state = run.model, run.state
  # Microbatches weighted by their kept pairs: the loss is a mean over them.
  step = run_rl.jit_update(run, mesh, lambda p, b, key=None: dpo_loss(model, config, p, b, key),
                           config.get("microbatches", 1), lambda b: b["keep"].sum())
  data_iter, world = None, run.world
  if config.dpo.source == "online" and world is None:
    policy = run_rl.rollout_policy(config, model, task, rcfg)
    collect = jax.jit(lambda p, r, k: collect_pairs(config, task, policy, rcfg, p, r, model, k))
  elif config.dpo.source == "online":
    policy = run_rl.rollout_policy(config, model, task, rcfg)
    futures = jax.jit(lambda p, u, k, i: candidate_futures(config, task.bind(u), policy, rcfg, p,
                                                           k, i))
    pair_fn = jax.jit(lambda r, *args: pairs(config, model, r, *args))

    def collect(params, ref_params, key):
      w = world.bind(ref_params)  # a user or judge sharing the policy's base reads it here
      intent, records = w.next_batch(jax.random.fold_in(key, 2))
      conv, reply, reply_len, fut = futures(params, w.user_params, key, intent)
      b, g, s = config.batch_size, config.candidates, rcfg.samples
      live = np.repeat(~np.asarray(sharding_lib.to_host(conv.done_B)), g * s)
      mr, _ = w.score(fut, live, records)
      return pair_fn(ref_params, conv, reply, reply_len, jnp.asarray(mr.reshape(b, g, s).mean(-1)))
  else:
    data_iter = iter(loader_lib.make_loader(config.data_dir, engine.NAME, "train",
                                            config.batch_size, seed=config.seed))
    if run.data_state is not None:
      data_iter.set_state(run.data_state)
    offline = jax.jit(lambda r, rec: offline_pairs(config, model, r, rec))

    def collect(params, ref_params, key):
      del params, key  # the pairs were ranked when the data was made
      fields = {k: v for k, v in next(data_iter).items() if k in engine.FIELDS}
      return offline(ref_params, sharding_lib.shard_batch(fields, mesh))

  def scalars_fn(device, host, seconds):
    scalars = {**run_rl.host_means(device), **host}
    bad_steps = int(scalars.pop("nonfinite"))
    scalars.update({"nonfinite/skipped": bad_steps,
                    "tokens_per_s": scalars["tokens/trained"] / seconds})
    return scalars, bad_steps

  reader = run_rl.LateReader(run, scalars_fn)
  start = int(state.step)
  history = run.baseline(start)
  for it in run.steps(start, stop_after, f"dpo[{config.dpo.source}]"):
    t0 = time.perf_counter()
    # Queued, not awaited, where the pairs are made on the device (the language tier's host
    # scoring waits for its futures, and offline data is read on the host).
    batch, stats = collect(state.params, run.reference(state.params),
                           jax.random.fold_in(state.key, it))
    host = {"time/collect_s": time.perf_counter() - t0} if world is not None else {}
    state, m = step(state, batch)
    position = data_iter if data_iter is not None else world.train if world else None
    history.update(reader.push(it, t0, {**m, **stats}, host, state,
                               None if position is None else position.get_state()))
  run.close()
  return {"state": state, "final": history, "how": run.how}
