"""Online multi-turn DPO on MR-ranked candidate replies.

Each iteration plays `context_turns` turns of fresh conversations with the current policy (so the
candidates see real multi-turn histories), then samples G candidate replies per conversation
from the current policy, scores each with the multiturn-aware reward (futures with the policy
itself), and keeps (best, worst) pairs whose MR gap passes `min_gap`. The DPO loss compares the
candidates' summed log-probs (their own tokens only; the history is context) under the policy and
the frozen reference. Collection is one jitted call; the update one jitted, donated step.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from collab_rl import checkpoint as ckpt_lib
from collab_rl import conversation as conv_lib
from collab_rl import losses
from collab_rl import metrics as metrics_lib
from collab_rl import rewards
from collab_rl import rollout as rollout_lib
from collab_rl import sharding as sharding_lib
from collab_rl import train_state as state_lib
from collab_rl.models import transformer
from collab_rl.tasks import registry, scoring
from collab_rl.tokenizer import ASSISTANT, CONTEXT
from collab_rl.trainers import ppo  # shared config pieces: policy factory, lengths, evaluation


def check_config(config):
  task = registry.make_task(config.task, config.sim.to_dict())
  cfg = transformer.TransformerConfig.from_dict(config.model.to_dict())
  if cfg.vocab_size != task.vocab_size:
    raise ValueError(f"config.model.vocab_size={cfg.vocab_size} must equal the vocabulary of "
                     f"task {config.task!r} ({task.vocab_size})")
  if config.dpo.candidates < 2:
    raise ValueError(f"config.dpo.candidates={config.dpo.candidates} must be >= 2")
  if config.dpo.beta <= 0:
    raise ValueError(f"config.dpo.beta={config.dpo.beta} must be > 0")
  if config.context_turns < 0 or config.context_turns >= config.turns:
    raise ValueError(f"config.context_turns={config.context_turns} must be in "
                     f"[0, turns={config.turns})")
  rcfg = ppo.reward_config(config)
  mesh = sharding_lib.make_mesh(config.mesh_shape)
  sharding_lib.check_batch(config.batch_size, mesh)
  ckpt_lib.check_init_from(config.init_from or None)
  return task, cfg, mesh, rcfg


def _tile(tree, g):
  return jax.tree_util.tree_map(lambda x: x if x.ndim == 0 else jnp.repeat(x, g, axis=0), tree)


def collect_pairs(config, task, policy, rcfg, params, ref_params, model, key):
  """Histories, G candidates, their MR, and the (best, worst) pair of each conversation."""
  b, g = config.batch_size, config.dpo.candidates
  k_int, k_ctx, k_cand, k_mr = jax.random.split(key, 4)
  intent = task.sample_intents(k_int, b)
  conv, sim = rollout_lib.start(task, intent, ppo.max_len(config, task))
  pstate = policy.init(params, conv, 2 + len(task.request_template) + 1)
  if config.context_turns:
    out = rollout_lib.take_turns(policy, task, params, conv, sim, k_ctx, config.context_turns,
                                 policy_state=pstate)
    conv, sim = out.conv, out.sim
    pstate = policy.init(params, conv)  # the context, prefilled once more for the candidates
  ones = jnp.ones((b,), jnp.int32)
  conv = conv_lib.append(conv, jnp.full((b, 1), task.assistant_header_id), ones, CONTEXT)
  conv_g, sim_g, pstate_g = _tile((conv, sim, pstate), g)
  reply, _, reply_len, pstate_g = policy(params, conv_g, sim_g, pstate_g, k_cand)
  mr, _, _, _ = rewards.multiturn_aware_reward(policy, task, params, conv_g, sim_g, pstate_g,
                                               reply, reply_len, k_mr, rcfg)
  mr_BxG = mr.reshape(b, g)
  best, worst = jnp.argmax(mr_BxG, 1), jnp.argmin(mr_BxG, 1)
  gap = jnp.take_along_axis(mr_BxG, best[:, None], 1)[:, 0] - jnp.take_along_axis(
      mr_BxG, worst[:, None], 1)[:, 0]
  keep = (gap > config.dpo.min_gap) & ~conv.done_B

  def with_reply(idx):
    rows = jnp.arange(b) * g + idx
    full = conv_lib.append(conv, reply[rows], reply_len[rows], ASSISTANT, new_turn=False)
    # The candidate is the last assistant message: its tokens are the only ones scored.
    cand = (full.roles_BxL == ASSISTANT) & (full.turns_BxL == full.num_turns_B[:, None] - 1)
    return full.tokens_BxL, conv_lib.valid_mask(full), cand

  chosen, rejected = with_reply(best), with_reply(worst)

  def ref_logp(seq):
    out = model.apply({"params": ref_params}, seq[0], valid_BxL=seq[1], heads=("lm",))
    return losses.sequence_logprob(losses.token_logprobs(out.logits_BxLxV, seq[0]), seq[2])

  batch = dict(c_tokens=chosen[0], c_valid=chosen[1], c_mask=chosen[2], r_tokens=rejected[0],
               r_valid=rejected[1], r_mask=rejected[2], ref_c=ref_logp(chosen),
               ref_r=ref_logp(rejected), keep=keep.astype(jnp.float32))
  stats = {"mr/mean": mr_BxG.mean(), "mr/best": mr_BxG.max(1).mean(), "mr/gap": gap.mean(),
           "pairs/kept_share": keep.mean()}
  return batch, stats


def dpo_step(model, config, tx, state, batch):
  def loss_fn(params):
    def logp(tokens, valid, mask):
      out = model.apply({"params": params}, tokens, valid_BxL=valid, heads=("lm",))
      return losses.sequence_logprob(losses.token_logprobs(out.logits_BxLxV, tokens), mask)
    lc = logp(batch["c_tokens"], batch["c_valid"], batch["c_mask"])
    lr = logp(batch["r_tokens"], batch["r_valid"], batch["r_mask"])
    return losses.dpo_loss(lc, lr, batch["ref_c"], batch["ref_r"], config.dpo.beta,
                           batch["keep"])

  (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  m.update(loss=loss, grad_norm=optax.tree.norm(grads))
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state), m


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_after: int | None = None) -> dict[str, Any]:
  task, mcfg, mesh, rcfg = check_config(config)
  model = transformer.Transformer(mcfg)
  o = config.optimizer
  tx = optax.chain(optax.clip_by_global_norm(o.grad_clip),
                   optax.adamw(optax.warmup_constant_schedule(0.0, o.learning_rate,
                                                              max(o.warmup_steps, 1)),
                               b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))
  rules = sharding_lib.rules_from_config(config.get("partition_rules"))

  def init_fn():
    key = jax.random.key(config.seed)
    return state_lib.create(transformer.init_params(model, jax.random.fold_in(key, 0)), tx,
                            jax.random.fold_in(key, 1))

  create_fn, abstract, shardings = state_lib.init_sharded(init_fn, mesh, rules)
  checkpointer = ckpt_lib.Checkpointer(f"{workdir}/checkpoints",
                                       max_to_keep=config.checkpoint.max_to_keep,
                                       save_interval_steps=config.checkpoint.every_iterations,
                                       async_save=config.checkpoint.async_save)
  state, _, how = ckpt_lib.restore_or_init(checkpointer, abstract, create_fn,
                                           init_from=config.init_from or None)
  ref_params = (ckpt_lib.restore_params(config.init_from, abstract.params) if config.init_from
                else create_fn().params)
  logging.info("dpo: %s", how)
  policy = ppo.make_policy(config, model, task)
  collect = jax.jit(lambda p, r, k: collect_pairs(config, task, policy, rcfg, p, r, model, k))
  step = jax.jit(lambda s, b: dpo_step(model, config, tx, s, b), donate_argnums=0,
                 out_shardings=(shardings, sharding_lib.replicated(mesh)))
  greedy = ppo.make_policy(config, model, task, temperature=0.0)
  eval_fn = jax.jit(lambda p, k: rollout_lib.rollout(
      greedy, task, p, k, config.eval_batch, num_turns=config.turns,
      max_len=ppo.max_len(config, task), mesh=mesh))
  eval_key = jax.random.key(config.seed + 10_000)

  writer = metrics_lib.MetricWriter(workdir)
  writer.write_hparams(config.to_dict())
  start = int(state.step)
  last = config.num_iterations if stop_after is None else min(stop_after, config.num_iterations)
  history: dict[str, float] = {}
  for it in metrics_lib.progress(range(start + 1, last + 1), total=config.num_iterations,
                                 initial=start, desc="dpo"):
    t0 = time.perf_counter()
    batch, stats = jax.block_until_ready(collect(state.params, ref_params,
                                                 jax.random.fold_in(state.key, it)))
    t_collect = time.perf_counter() - t0
    state, m = step(state, batch)
    scalars = {k: float(v) for k, v in jax.device_get({**m, **stats}).items()}
    if not np.isfinite(scalars["loss"]):
      raise FloatingPointError(f"dpo iteration {it}: loss is {scalars['loss']}; stopping before "
                               f"saving (last good checkpoint: {checkpointer.latest_step()})")
    scalars.update({"time/collect_s": t_collect, "time/iteration_s": time.perf_counter() - t0})
    if it % config.eval_every == 0 or it == last:
      ro = eval_fn(state.params, eval_key)
      scalars.update({f"eval/{k}": v for k, v in scoring.summarize(
          scoring.episode_metrics(task, ro.conv, ro.sim)).items()})
    writer.write_scalars(it, scalars)
    history = scalars
    checkpointer.save(it, state, config=config, force=it == last)
  checkpointer.close()
  writer.close()
  return {"state": state, "final": history, "how": how}
