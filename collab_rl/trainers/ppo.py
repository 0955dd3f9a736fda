"""PPO (and GRPO/RLOO) over whole conversations with the user simulator.

One iteration: play `turns` assistant turns per conversation against the simulator, scoring each
reply with the configured per-turn reward (MR with window w, a next-turn baseline, or R* of the
whole conversation on its last turn); read values at each turn's assistant header; turn-level GAE
(or a group baseline over repeated intents) broadcast to the turn's tokens; then `epochs` passes
of clipped-ratio minibatch updates with a value loss, a k3 KL penalty to the frozen reference
policy and an entropy bonus. Collection is one jitted call (simulator, MR futures and all); the
update is one jitted, donated step per minibatch.
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

from collab_rl import advantages as adv_lib
from collab_rl import checkpoint as ckpt_lib
from collab_rl import conversation as conv_lib
from collab_rl import losses
from collab_rl import metrics as metrics_lib
from collab_rl import rewards
from collab_rl import rollout as rollout_lib
from collab_rl import sampling
from collab_rl import sharding as sharding_lib
from collab_rl import train_state as state_lib
from collab_rl.models import transformer
from collab_rl.tasks import registry, scoring
from collab_rl.tokenizer import ASSISTANT, CONTEXT

REWARDS = ("mr", "next_turn_ext", "next_turn_ext_int", "helpfulness", "final")
ADVANTAGES = ("gae", "grpo", "rloo")

# ------------------------------------------------------------------------------------------------
# Config checks (before anything compiles).
# ------------------------------------------------------------------------------------------------


def check_config(config):
  task = registry.make_task(config.task, config.sim.to_dict())
  cfg = transformer.TransformerConfig.from_dict(config.model.to_dict())
  if cfg.vocab_size != task.vocab_size:
    raise ValueError(f"config.model.vocab_size={cfg.vocab_size} must equal the vocabulary of "
                     f"task {config.task!r} ({task.vocab_size})")
  if "value" not in cfg.heads and config.ppo.advantage == "gae":
    raise ValueError("config.model.heads needs 'value' for advantage='gae' (or use grpo/rloo)")
  if config.reward.kind not in REWARDS:
    raise ValueError(f"config.reward.kind={config.reward.kind!r}; choose from {REWARDS}")
  if config.ppo.advantage not in ADVANTAGES:
    raise ValueError(f"config.ppo.advantage={config.ppo.advantage!r}; choose from {ADVANTAGES}")
  rcfg = reward_config(config)
  if config.reward.kind == "mr" and rcfg.window > config.turns:
    raise ValueError(f"config.reward.window={rcfg.window} is longer than the turn budget "
                     f"config.turns={config.turns}")
  for name in ("turns", "num_iterations", "batch_size", "reply_tokens"):
    if config[name] <= 0:
      raise ValueError(f"config.{name} must be positive, got {config[name]}")
  mesh = sharding_lib.make_mesh(config.mesh_shape)
  group = config.ppo.group_size if config.ppo.advantage != "gae" else 1
  if config.batch_size % group:
    raise ValueError(f"batch_size={config.batch_size} is not a multiple of "
                     f"ppo.group_size={group}")
  sharding_lib.check_batch(config.batch_size, mesh)
  if config.batch_size % config.ppo.minibatches:
    raise ValueError(f"batch_size={config.batch_size} is not divisible by "
                     f"ppo.minibatches={config.ppo.minibatches}")
  sharding_lib.check_batch(config.batch_size // config.ppo.minibatches, mesh, "minibatch size")
  ckpt_lib.check_init_from(config.init_from or None)
  return task, cfg, mesh, rcfg


def reward_config(config) -> rewards.RewardConfig:
  r = config.reward
  return rewards.RewardConfig(w_ext=r.w_ext, w_int=r.w_int, token_cost=r.token_cost,
                              window=r.window, samples=r.samples)


def max_len(config, task) -> int:
  per_turn = config.reply_tokens + task.sim.max_user_len + 4
  return 4 + len(task.request_template) + (config.turns + config.reward.window) * per_turn


# ------------------------------------------------------------------------------------------------
# Collection: one jitted call plays the conversations and scores every reply.
# ------------------------------------------------------------------------------------------------


def make_policy(config, model, task, temperature=None) -> rollout_lib.LMPolicy:
  sc = sampling.SamplingConfig(max_new_tokens=config.reply_tokens,
                               temperature=config.temperature if temperature is None
                               else temperature, greedy=temperature == 0.0,
                               stop_tokens=(task.eot_id,))
  return rollout_lib.lm_policy(model, sc, chunk_width=task.sim.max_user_len + 4,
                               max_turns=config.turns + config.reward.window)


def collect(config, model, task, policy, rcfg, params, key):
  """Plays `config.turns` turns; returns the final conversation and per-turn arrays [B, T]."""
  b, t_max = config.batch_size, config.turns
  group = config.ppo.group_size if config.ppo.advantage != "gae" else 1
  k_int, k_play = jax.random.split(key)
  intent = task.sample_intents(k_int, b // group)
  intent = jax.tree_util.tree_map(lambda x: jnp.repeat(x, group, axis=0), intent)
  conv, sim = rollout_lib.start(task, intent, max_len(config, task))
  pstate = policy.init(params, conv, 2 + len(task.request_template) + 1)
  ones = jnp.ones((b,), jnp.int32)
  kind = config.reward.kind

  def turn(carry, t):
    conv, sim, pstate = carry
    k_pol, k_rew, k_user = jax.random.split(jax.random.fold_in(k_play, t), 3)
    active = ~conv.done_B
    header_pos = conv.cursor_B
    conv = conv_lib.append(conv, jnp.full((b, 1), task.assistant_header_id), ones, CONTEXT)
    reply, _, reply_len, pstate = policy(params, conv, sim, pstate, k_pol)
    if kind == "mr":
      r = rewards.multiturn_aware_reward(policy, task, params, conv, sim, pstate, reply,
                                         reply_len, k_rew, rcfg)[0]
    elif kind == "next_turn_ext":
      r = rewards.extrinsic_reward(task, conv, sim, reply, reply_len, k_rew)
    elif kind == "next_turn_ext_int":
      r = rewards.extrinsic_intrinsic_reward(task, conv, sim, reply, reply_len, k_rew, rcfg)
    elif kind == "helpfulness":
      r = rewards.helpfulness_reward(task, conv, sim, reply, reply_len)
    else:
      r = jnp.zeros((b,))
    conv, sim = rewards.answer_reply(task, conv, sim, reply, reply_len, k_user, append_user=True)
    done = conv.done_B & active
    return (conv, sim, pstate), (jnp.where(active, r, 0.0), done, active, header_pos)

  (conv, sim, _), (r_TxB, done_TxB, valid_TxB, pos_TxB) = jax.lax.scan(
      turn, (conv, sim, pstate), jnp.arange(t_max))
  rewards_BxT, valid_BxT = r_TxB.T, valid_TxB.T
  if kind == "final":  # R* of the whole conversation, paid on each row's last turn
    total, _ = rewards.conversation_reward(task, conv, sim, rcfg)
    last = jnp.sum(valid_BxT, 1) - 1
    rewards_BxT = jax.nn.one_hot(last, t_max) * total[:, None]
  return conv, sim, rewards_BxT, done_TxB.T, valid_BxT, pos_TxB.T


def prepare_batch(config, model, task, policy, rcfg, params, ref_params, key):
  """Collection + values, old and reference log-probs, advantages: everything the update needs."""
  conv, sim, rewards_BxT, done_BxT, valid_BxT, pos_BxT = collect(config, model, task, policy,
                                                                 rcfg, params, key)
  valid_BxL = conv_lib.valid_mask(conv)
  out = model.apply({"params": params}, conv.tokens_BxL, valid_BxL=valid_BxL)
  old_logp_BxL = losses.token_logprobs(out.logits_BxLxV, conv.tokens_BxL)
  ref_out = model.apply({"params": ref_params}, conv.tokens_BxL, valid_BxL=valid_BxL, heads=("lm",))
  ref_logp_BxL = losses.token_logprobs(ref_out.logits_BxLxV, conv.tokens_BxL)
  turn_idx_BxL = adv_lib.assistant_turn_index(conv.roles_BxL, conv.turns_BxL)
  mask_BxL = conv.roles_BxL == ASSISTANT
  p = config.ppo
  if p.advantage == "gae":
    values_BxT = jnp.take_along_axis(out.value_BxL, pos_BxT, axis=1) * valid_BxT
    adv_BxT, ret_BxT = adv_lib.turn_gae(rewards_BxT, values_BxT, done_BxT, valid_BxT, p.gamma,
                                        p.lam)
  else:
    total_B = rewards_BxT.sum(1)
    g = p.group_size
    adv_B = adv_lib.group_baseline(total_B.reshape(-1, g), p.advantage == "rloo").reshape(-1)
    adv_BxT = adv_B[:, None] * valid_BxT
    values_BxT = ret_BxT = jnp.zeros_like(adv_BxT)
  adv_BxL = adv_lib.broadcast_to_tokens(adv_BxT, turn_idx_BxL)
  if p.whiten:
    adv_BxL = adv_lib.whiten(adv_BxL, mask_BxL)
  batch = dict(tokens=conv.tokens_BxL, valid=valid_BxL, mask=mask_BxL, old_logp=old_logp_BxL,
               ref_logp=ref_logp_BxL, adv=adv_BxL, pos=pos_BxT, old_values=values_BxT,
               returns=ret_BxT, turn_valid=valid_BxT)
  stats = {f"episode/{k}": v for k, v in scoring.episode_metrics(task, conv, sim).items()}
  stats.update({"reward/per_turn": rewards_BxT.sum(1), "reward/turns": valid_BxT.sum(1)})
  return batch, stats


# ------------------------------------------------------------------------------------------------
# The update.
# ------------------------------------------------------------------------------------------------


def ppo_loss(model, config, params, mb):
  p = config.ppo
  out = model.apply({"params": params}, mb["tokens"], valid_BxL=mb["valid"])
  logp = losses.token_logprobs(out.logits_BxLxV, mb["tokens"])
  pg, m = losses.ppo_policy_loss(logp, mb["old_logp"], mb["adv"], mb["mask"], p.clip_eps)
  kl = losses.masked_mean(losses.kl_k3(logp, mb["ref_logp"]), mb["mask"])
  ent = losses.masked_mean(losses.token_entropy(out.logits_BxLxV), mb["mask"])
  loss = pg + p.kl_coef * kl - p.ent_coef * ent
  m.update(policy_loss=pg, kl_ref=kl, entropy=ent)
  if p.advantage == "gae":
    v_BxT = jnp.take_along_axis(out.value_BxL, mb["pos"], axis=1)
    vl = losses.value_loss(v_BxT, mb["old_values"], mb["returns"], mb["turn_valid"], p.vf_clip)
    loss = loss + p.vf_coef * vl
    m["value_loss"] = vl
  return loss, m


def update_step(model, config, tx, state, mb):
  (loss, m), grads = jax.value_and_grad(lambda q: ppo_loss(model, config, q, mb),
                                        has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  m.update(loss=loss, grad_norm=optax.tree.norm(grads))
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state), m


def make_optimizer(config):
  o = config.optimizer
  sched = optax.warmup_constant_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1))
  return optax.chain(optax.clip_by_global_norm(o.grad_clip),
                     optax.adamw(sched, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))


# ------------------------------------------------------------------------------------------------
# The loop.
# ------------------------------------------------------------------------------------------------


def _host_means(stats) -> dict[str, float]:
  out = {}
  for k, v in jax.device_get(stats).items():
    v = np.asarray(v)
    out[k] = float(v.astype(np.float32).mean())
  return out


def evaluate(config, task, eval_fn, params, key) -> dict[str, float]:
  ro = eval_fn(params, key)
  return scoring.summarize(scoring.episode_metrics(task, ro.conv, ro.sim))


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_after: int | None = None) -> dict[str, Any]:
  task, mcfg, mesh, rcfg = check_config(config)
  model = transformer.Transformer(mcfg)
  tx = make_optimizer(config)
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
  # The frozen reference: the run's starting policy, rebuilt the same way on every resume.
  if config.init_from:
    ref_params = ckpt_lib.restore_params(config.init_from, abstract.params)
  else:
    ref_params = create_fn().params
  logging.info("ppo: %s; reward %s; advantage %s", how, config.reward.kind, config.ppo.advantage)

  policy = make_policy(config, model, task)
  prep = jax.jit(lambda p, r, k: prepare_batch(config, model, task, policy, rcfg, p, r, k))
  step = jax.jit(lambda s, mb: update_step(model, config, tx, s, mb), donate_argnums=0,
                 out_shardings=(shardings, sharding_lib.replicated(mesh)))
  greedy = make_policy(config, model, task, temperature=0.0)
  eval_fn = jax.jit(lambda p, k: rollout_lib.rollout(
      greedy, task, p, k, config.eval_batch, num_turns=config.turns,
      max_len=max_len(config, task), mesh=mesh))
  eval_key = jax.random.key(config.seed + 10_000)  # the same held-out episodes every time

  writer = metrics_lib.MetricWriter(workdir)
  writer.write_hparams(config.to_dict())
  it0 = int(state.step) // (config.ppo.epochs * config.ppo.minibatches)
  last = config.num_iterations if stop_after is None else min(stop_after, config.num_iterations)
  n_mb = config.batch_size // config.ppo.minibatches
  history: dict[str, float] = {}
  for it in metrics_lib.progress(range(it0 + 1, last + 1), total=config.num_iterations,
                                 initial=it0, desc=f"ppo[{config.reward.kind}]"):
    t0 = time.perf_counter()
    key = jax.random.fold_in(state.key, it)
    batch, stats = jax.block_until_ready(prep(state.params, ref_params, key))
    t_collect = time.perf_counter() - t0
    for epoch in range(config.ppo.epochs):
      perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, 1000 + epoch),
                                               config.batch_size))
      for i in range(config.ppo.minibatches):
        idx = perm[i * n_mb:(i + 1) * n_mb]
        mb = jax.tree_util.tree_map(lambda x: x[idx], batch)
        state, m = step(state, mb)
    m = _host_means(m)
    if not np.isfinite(m["loss"]):
      raise FloatingPointError(f"ppo iteration {it}: loss is {m['loss']}; stopping before "
                               f"saving (last good checkpoint: {checkpointer.latest_step()})")
    scalars = {**m, **_host_means(stats), "time/collect_s": t_collect,
               "time/iteration_s": time.perf_counter() - t0}
    if it % config.eval_every == 0 or it == last:
      scalars.update({f"eval/{k}": v for k, v in evaluate(config, task, eval_fn, state.params,
                                                           eval_key).items()})
    writer.write_scalars(it, scalars)
    history = scalars
    checkpointer.save(it, state, config=config, force=it == last)
  checkpointer.close()
  writer.close()
  return {"state": state, "final": history, "how": how}
