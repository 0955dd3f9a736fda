"""PPO (and GRPO/RLOO) over whole conversations with the user simulator.

One iteration: play `num_turns` assistant turns per conversation against the simulator, scoring each
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

from collab_rl import advantages as adv_lib
from collab_rl import conversation as conv_lib
from collab_rl import losses
from collab_rl import rewards
from collab_rl import rollout as rollout_lib
from collab_rl import run_rl
from collab_rl import sharding as sharding_lib
from collab_rl.tasks import scoring
from collab_rl.tokenizer import ASSISTANT

REWARDS = ("mr", "next_turn_ext", "next_turn_ext_int", "helpfulness", "final")
ADVANTAGES = ("gae", "grpo", "rloo")

# ------------------------------------------------------------------------------------------------
# Config checks (before anything compiles).
# ------------------------------------------------------------------------------------------------


def check_config(config):
  task, cfg, mesh, rcfg = run_rl.check_common(config)
  if config.reward.kind not in REWARDS:
    raise ValueError(f"config.reward.kind={config.reward.kind!r}; choose from {REWARDS}")
  if config.ppo.advantage not in ADVANTAGES:
    raise ValueError(f"config.ppo.advantage={config.ppo.advantage!r}; choose from {ADVANTAGES}")
  if "value" not in cfg.heads and config.ppo.advantage == "gae":
    raise ValueError("config.model.heads needs 'value' for advantage='gae' (or use grpo/rloo)")
  if config.reward.kind == "mr" and rcfg.window > config.num_turns:
    raise ValueError(f"config.reward.window={rcfg.window} is longer than the turn budget "
                     f"config.num_turns={config.num_turns}")
  for name in ("epochs", "minibatches"):
    if config.ppo[name] <= 0:
      raise ValueError(f"config.ppo.{name} must be positive, got {config.ppo[name]}")
  group = config.ppo.group_size if config.ppo.advantage != "gae" else 1
  if group < 1 or config.batch_size % group:
    raise ValueError(f"batch_size={config.batch_size} is not a multiple of "
                     f"ppo.group_size={group}")
  if config.batch_size % config.ppo.minibatches:
    raise ValueError(f"batch_size={config.batch_size} is not divisible by "
                     f"ppo.minibatches={config.ppo.minibatches}")
  sharding_lib.check_batch(config.batch_size // config.ppo.minibatches, mesh, "minibatch size")
  return task, cfg, mesh, rcfg


# ------------------------------------------------------------------------------------------------
# Collection: one jitted call plays the conversations and scores every reply.
# ------------------------------------------------------------------------------------------------


def collect(config, model, task, policy, rcfg, params, key):
  """Plays `config.num_turns` turns; returns the final conversation and per-turn arrays [B, T]."""
  b, t_max = config.batch_size, config.num_turns
  group = config.ppo.group_size if config.ppo.advantage != "gae" else 1
  k_int, k_play = jax.random.split(key)
  intent = task.sample_intents(k_int, b // group)
  intent = jax.tree_util.tree_map(lambda x: jnp.repeat(x, group, axis=0), intent)
  conv, sim = rollout_lib.start(task, intent, run_rl.max_len(config, task, rcfg))
  pstate = policy.init(params, conv, rollout_lib.opening_width(task))
  kind = config.reward.kind

  def turn(carry, t):
    conv, sim, pstate = carry
    k_pol, k_rew, k_user = jax.random.split(jax.random.fold_in(k_play, t), 3)
    active = ~conv.done_B
    header_pos = conv.cursor_B
    conv = rollout_lib.open_reply(task, conv)
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
    conv, sim = rollout_lib.answer_reply(task, conv, sim, reply, reply_len, k_user)
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
  batch = dict(tokens_BxL=conv.tokens_BxL, valid_BxL=valid_BxL, mask_BxL=mask_BxL,
               old_logprobs_BxL=old_logp_BxL, ref_logprobs_BxL=ref_logp_BxL,
               advantages_BxL=adv_BxL, header_pos_BxT=pos_BxT, old_values_BxT=values_BxT,
               returns_BxT=ret_BxT, turn_valid_BxT=valid_BxT)
  stats = {f"episode/{k}": v for k, v in scoring.episode_metrics(task, conv, sim).items()}
  stats.update({"reward/per_turn": rewards_BxT.sum(1), "reward/turns": valid_BxT.sum(1)})
  # R* of the collected conversations and its components, whatever reward drives the update.
  total, parts = rewards.conversation_reward(task, conv, sim, rcfg)
  stats.update({"rstar/total": total, **{f"rstar/{k}": v for k, v in parts.items()},
                "tokens/conversation": valid_BxL.sum(1)})
  return batch, stats


# ------------------------------------------------------------------------------------------------
# The update.
# ------------------------------------------------------------------------------------------------


def ppo_loss(model, config, params, mb):
  """`mb`: a minibatch of `prepare_batch`'s dictionary (its keys carry their shapes)."""
  p = config.ppo
  tokens_BxL, mask_BxL = mb["tokens_BxL"], mb["mask_BxL"]
  out = model.apply({"params": params}, tokens_BxL, valid_BxL=mb["valid_BxL"])
  logp_BxL = losses.token_logprobs(out.logits_BxLxV, tokens_BxL)
  pg, m = losses.ppo_policy_loss(logp_BxL, mb["old_logprobs_BxL"], mb["advantages_BxL"],
                                 mask_BxL, p.clip_eps)
  kl = losses.masked_mean(losses.kl_k3(logp_BxL, mb["ref_logprobs_BxL"]), mask_BxL)
  ent = losses.masked_mean(losses.token_entropy(out.logits_BxLxV), mask_BxL)
  loss = pg + p.kl_coef * kl - p.ent_coef * ent
  m.update(policy_loss=pg, kl_ref=kl, entropy=ent)
  if p.advantage == "gae":
    v_BxT = jnp.take_along_axis(out.value_BxL, mb["header_pos_BxT"], axis=1)
    vl = losses.value_loss(v_BxT, mb["old_values_BxT"], mb["returns_BxT"], mb["turn_valid_BxT"],
                           p.vf_clip)
    loss = loss + p.vf_coef * vl
    m["value_loss"] = vl
  return loss, m


# ------------------------------------------------------------------------------------------------
# The loop.
# ------------------------------------------------------------------------------------------------


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_after: int | None = None) -> dict[str, Any]:
  task, mcfg, mesh, rcfg = check_config(config)
  run = run_rl.build(config, workdir, task, mesh, rcfg)
  model, state = run.model, run.state
  policy = run_rl.rollout_policy(config, model, task, rcfg)
  prep = jax.jit(lambda p, r, k: prepare_batch(config, model, task, policy, rcfg, p, r, k))
  step = run_rl.jit_update(run, mesh, lambda p, mb: ppo_loss(model, config, p, mb))

  it0 = int(state.step) // (config.ppo.epochs * config.ppo.minibatches)
  n_mb = config.batch_size // config.ppo.minibatches
  history = run.baseline(it0)
  for it in run.steps(it0, stop_after, f"ppo[{config.reward.kind}]"):
    t0 = time.perf_counter()
    key = jax.random.fold_in(state.key, it)
    batch, stats = jax.block_until_ready(prep(state.params, run.ref_params, key))
    t_collect = time.perf_counter() - t0
    ms = []
    for epoch in range(config.ppo.epochs):
      perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, 1000 + epoch),
                                               config.batch_size))
      for i in range(config.ppo.minibatches):
        idx = perm[i * n_mb:(i + 1) * n_mb]
        state, m = step(state, jax.tree_util.tree_map(lambda x: x[idx], batch))
        ms.append(m)
    ms = sharding_lib.to_host(ms)
    bad_steps = int(sum(m.pop("nonfinite") for m in ms))
    # Means over the iteration's minibatch steps (skipped ones included: they show what broke).
    ms = run_rl.host_means({k: np.stack([m[k] for m in ms]) for k in ms[0]})
    scalars = {**ms, **run_rl.host_means(stats), "nonfinite/skipped": bad_steps,
               "time/collect_s": t_collect, "time/iteration_s": time.perf_counter() - t0}
    # Conversation tokens collected and trained on per second of the whole iteration.
    scalars["tokens_per_s"] = (scalars["tokens/conversation"] * config.batch_size
                               / scalars["time/iteration_s"])
    history.update(run.end_iteration(it, state, scalars, bad_steps))
  run.close()
  return {"state": state, "final": history, "how": run.how}
