"""PPO (and GRPO/RLOO) over whole conversations with the user simulator.

One iteration: play `num_turns` assistant turns per conversation against the simulator, scoring each
reply with the configured per-turn reward (MR with window w, a next-turn baseline, or R* of the
whole conversation on its last turn); read values at each turn's assistant header; turn-level GAE
(or a group baseline over repeated intents) broadcast to the turn's tokens; then `epochs` passes
of clipped-ratio minibatch updates with a value loss, a k3 KL penalty to the frozen reference
policy and an entropy bonus. Collection is one jitted call (simulator, MR futures and all); the
update is one jitted, donated step per minibatch (all of them in one call with
`config.ppo.one_call`). The host queues an iteration without waiting for the device and reads
each iteration's metrics one iteration late (`run_rl.LateReader`).
"""

from __future__ import annotations

import functools
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
from collab_rl import run as run_lib
from collab_rl import run_rl
from collab_rl import sharding as sharding_lib
from collab_rl.models import lora as lora_lib
from collab_rl.models import transformer
from collab_rl.tasks import scoring
from collab_rl.tasks import text as text_lib
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
  run_lib.check_microbatches(config, config.batch_size // config.ppo.minibatches,
                             "batch_size / ppo.minibatches")
  return task, cfg, mesh, rcfg


# ------------------------------------------------------------------------------------------------
# Collection: one jitted call plays the conversations and scores every reply.
# ------------------------------------------------------------------------------------------------


def collect(config, model, task, policy, rcfg, params, key, intent=None):
  """Plays `config.num_turns` turns of `intent` (default: fresh episodes sampled on device);
  returns the final conversation and simulator state, each turn's rewards and [B, T] arrays.

  A task scored on device (`protocol.Task.device_scored`) gives rewards_TxB; the language tier
  gives instead, per turn, the conversations its rewards are read from (`text.played`: MR's
  B x S futures, or the conversation ending with the reply for next-turn rewards), which the
  host scores (`score_pending`) once for the whole batch.
  """
  b, t_max = config.batch_size, config.num_turns
  group = run_rl.group_size(config)
  k_int, k_play = jax.random.split(key)
  if intent is None:
    intent = task.sample_intents(k_int, b // group)
    intent = jax.tree_util.tree_map(lambda x: jnp.repeat(x, group, axis=0), intent)
  conv, sim = rollout_lib.start(task, intent, run_rl.max_len(config, task, rcfg))
  pstate = policy.init(params, conv, rollout_lib.opening_width(task))
  kind, host = config.reward.kind, not task.device_scored

  def turn(carry, t):
    conv, sim, pstate = carry
    k_pol, k_rew, k_user = jax.random.split(jax.random.fold_in(k_play, t), 3)
    active = ~conv.done_B
    header_pos = conv.cursor_B
    conv = rollout_lib.open_reply(task, conv)
    reply, _, reply_len, pstate = policy(params, conv, sim, pstate, k_pol)
    if host and kind == "mr":
      r = rewards.play_futures(policy, task, params, conv, sim, pstate, reply, reply_len, k_rew,
                               rcfg, keep=text_lib.played)
    elif host and kind != "final":
      r = text_lib.played(rollout_lib.append_reply(task, conv, reply, reply_len), sim)
    elif kind == "mr":
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
    if not host:
      r = jnp.where(active, r, 0.0)
    return (conv, sim, pstate), (r, done, active, header_pos)

  (conv, sim, _), (r_T, done_TxB, valid_TxB, pos_TxB) = jax.lax.scan(
      turn, (conv, sim, pstate), jnp.arange(t_max))
  valid_BxT = valid_TxB.T
  if not host and kind == "final":  # R* of the whole conversation, paid on each row's last turn
    total, _ = rewards.conversation_reward(task, conv, sim, rcfg)
    last = jnp.sum(valid_BxT, 1) - 1
    r_T = (jax.nn.one_hot(last, t_max) * total[:, None]).T
  return conv, sim, r_T, done_TxB.T, valid_BxT, pos_TxB.T


def jit_collect_text(config, model, task, policy, rcfg):
  """The language tier's collection as one jitted call of (policy params, the user's params,
  key, the records' intent): the played conversations and user chats, each turn's pending
  conversations for the host to score, and the [B, T] arrays. `train` runs it; so does
  experiments/memory_compiled.py, which compiles it for a TPU slice."""
  def collect_played(p, u, k, intent):
    conv, sim, pending, *per_turn = collect(config, model, task.bind(u), policy, rcfg, p, k,
                                            intent)
    return (*text_lib.played(conv, sim), pending, *per_turn)
  return jax.jit(collect_played)


def finish_batch(config, model, params, ref_params, conv, rewards_BxT, done_BxT, valid_BxT,
                 pos_BxT):
  """Values, old and reference log-probs, advantages of collected conversations: everything
  the update needs."""
  valid_BxL = conv_lib.valid_mask(conv)
  out, old_logp_BxL, _ = token_stats(model, config, params, conv.tokens_BxL, valid_BxL)
  _, ref_logp_BxL, _ = token_stats(model, config, ref_params, conv.tokens_BxL, valid_BxL,
                                   heads=())
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
  return dict(tokens_BxL=conv.tokens_BxL, valid_BxL=valid_BxL, mask_BxL=mask_BxL,
              old_logprobs_BxL=old_logp_BxL, ref_logprobs_BxL=ref_logp_BxL,
              advantages_BxL=adv_BxL, header_pos_BxT=pos_BxT, old_values_BxT=values_BxT,
              returns_BxT=ret_BxT, turn_valid_BxT=valid_BxT)


def prepare_batch(config, model, task, policy, rcfg, params, ref_params, key):
  """Collection + `finish_batch` for a task scored on device, in one jitted call."""
  conv, sim, r_TxB, done_BxT, valid_BxT, pos_BxT = collect(config, model, task, policy, rcfg,
                                                           params, key)
  rewards_BxT = r_TxB.T
  batch = finish_batch(config, model, params, ref_params, conv, rewards_BxT, done_BxT, valid_BxT,
                       pos_BxT)
  stats = {f"episode/{k}": v for k, v in scoring.episode_metrics(task, conv, sim).items()}
  stats.update({"reward/per_turn": rewards_BxT.sum(1), "reward/turns": valid_BxT.sum(1)})
  # R* of the collected conversations and its components, whatever reward drives the update.
  total, parts = rewards.conversation_reward(task, conv, sim, rcfg)
  stats.update({"rstar/total": total, **{f"rstar/{k}": v for k, v in parts.items()},
                "tokens/conversation": batch["valid_BxL"].sum(1)})
  return batch, stats


# ------------------------------------------------------------------------------------------------
# The language tier: collection on device, rewards on the host, the rest on device.
# ------------------------------------------------------------------------------------------------


def score_pending(world, kind: str, pending, valid_BxT, records) -> tuple[np.ndarray, dict]:
  """rewards_BxT of a language-tier collection: each turn's pending conversations (`collect`,
  leaves [T, N, ...]) scored on the host in one call, MR's S futures averaged; turns a row did
  not play score 0 and are not scored at all."""
  valid_BxT = np.asarray(valid_BxT)
  b, t = valid_BxT.shape
  n = pending[0].tokens_BxL.shape[1]
  per = n // b  # S futures per row for MR, else 1
  flat = jax.tree_util.tree_map(lambda x: x.reshape((t * n,) + x.shape[2:]), pending)
  r, stats = world.score(flat, np.repeat(valid_BxT.T.reshape(-1), per), records, kind)
  return r.reshape(t, b, per).mean(-1).T, stats


def text_iteration(config, world, collect_fn, finish_fn, params, ref_params, key):
  """One language-tier batch: records -> collection (jit) -> host rewards -> `finish_batch`
  (jit); returns the batch and the stats `prepare_batch` gives, as host means."""
  world = world.bind(ref_params)  # a user or judge sharing the policy's base reads it here
  intent, records = world.next_batch(jax.random.fold_in(key, 2), run_rl.group_size(config))
  conv, user, pending, done_BxT, valid_BxT, pos_BxT = collect_fn(params, world.user_params, key,
                                                                 intent)
  kind = config.reward.kind
  played_conv, counts, valid_host_BxT = sharding_lib.to_host((conv, user, valid_BxT))
  m, stats = world.scorer.episode_metrics(played_conv, counts, records)
  if kind == "final":  # R* of the whole conversation, paid on each row's last turn
    last_B = valid_host_BxT.sum(1) - 1
    rewards_BxT = np.eye(config.num_turns, dtype=np.float32)[last_B] * m["reward"][:, None]
  else:
    rewards_BxT, more = score_pending(world, kind, pending, valid_host_BxT, records)
    stats.update(more)
  batch = finish_fn(params, ref_params, conv, jnp.asarray(rewards_BxT), done_BxT, valid_BxT,
                    pos_BxT)
  means = {f"episode/{k}": float(np.mean(v)) for k, v in m.items()
           if k not in ("reward",) and np.isfinite(np.mean(v))}
  means.update({"reward/per_turn": float(rewards_BxT.sum(1).mean()),
                "reward/turns": float(valid_host_BxT.sum(1).mean()),
                "rstar/total": float(m["reward"].mean()),
                "tokens/conversation": float(played_conv.cursor_B.mean()), **stats})
  return batch, means


# ------------------------------------------------------------------------------------------------
# The update.
# ------------------------------------------------------------------------------------------------


def token_stats(model, config, params, tokens_BxL, valid_BxL, heads=("value",), key=None):
  """(model output with `heads`, log-probs [B, L], next-token entropies [B, L]) of the policy
  on `tokens_BxL`; with `config.ppo.logits_chunk` the LM head runs chunk by chunk on the final
  hidden states (losses.head_token_stats) and the output carries no logits. `key`: the update's
  dropout key (LoRA dropout; None for the log-probs of collected batches)."""
  chunk, rngs = config.ppo.logits_chunk, lora_lib.dropout_rngs(key)
  if not chunk:
    out = model.apply({"params": params}, tokens_BxL, valid_BxL=valid_BxL,
                      heads=("lm", *heads), rngs=rngs)
    return (out, losses.token_logprobs(out.logits_BxLxV, tokens_BxL),
            losses.token_entropy(out.logits_BxLxV))
  out = model.apply({"params": params}, tokens_BxL, valid_BxL=valid_BxL, heads=heads, rngs=rngs)
  head_DxV = transformer.lm_head_kernel(model.cfg, lora_lib.plain_params(model, params))
  logp_BxL, ent_BxL = losses.head_token_stats(out.hidden_BxLxD, head_DxV, tokens_BxL, chunk,
                                              jnp.dtype(model.cfg.dtype))
  return out, logp_BxL, ent_BxL


def ppo_loss(model, config, params, mb, key=None):
  """`mb`: a minibatch of `prepare_batch`'s dictionary (its keys carry their shapes); `key`:
  the step's dropout key (LoRA dropout)."""
  p = config.ppo
  tokens_BxL, mask_BxL = mb["tokens_BxL"], mb["mask_BxL"]
  out, logp_BxL, ent_BxL = token_stats(model, config, params, tokens_BxL, mb["valid_BxL"],
                                       key=key)
  pg, m = losses.ppo_policy_loss(logp_BxL, mb["old_logprobs_BxL"], mb["advantages_BxL"],
                                 mask_BxL, p.clip_eps)
  kl = losses.masked_mean(losses.kl_k3(logp_BxL, mb["ref_logprobs_BxL"]), mask_BxL)
  ent = losses.masked_mean(ent_BxL, mask_BxL)
  loss = pg + p.kl_coef * kl - p.ent_coef * ent
  m.update(policy_loss=pg, kl_ref=kl, entropy=ent)
  if p.advantage == "gae":
    v_BxT = jnp.take_along_axis(out.value_BxL, mb["header_pos_BxT"], axis=1)
    vl = losses.value_loss(v_BxT, mb["old_values_BxT"], mb["returns_BxT"], mb["turn_valid_BxT"],
                           p.vf_clip)
    loss = loss + p.vf_coef * vl
    m["value_loss"] = vl
  return loss, m


def minibatch_rows(config, key: jax.Array) -> jax.Array:
  """[epochs x minibatches, B / minibatches] the batch rows of an iteration's update steps in
  order: epoch e shuffles the batch with `fold_in(key, 1000 + e)` and cuts it in minibatches."""
  b, n = config.batch_size, config.ppo.minibatches
  perms = [jax.random.permutation(jax.random.fold_in(key, 1000 + e), b)
           for e in range(config.ppo.epochs)]
  return jnp.stack(perms).reshape(config.ppo.epochs * n, b // n)


def mean_stats(batch, stats):
  """(batch, each stat's mean over the batch in fp32): what the host reads of a collection."""
  return batch, {k: jnp.mean(v.astype(jnp.float32)) for k, v in stats.items()}


def take_rows(batch, rows_N: jax.Array):
  """The minibatch of `batch` at `rows_N`, gathered on the device, rows kept split."""
  return jax.tree_util.tree_map(
      lambda x: sharding_lib.constrain_rows(jnp.take(x, rows_N, axis=0)), batch)


def jit_steps(run, mesh, loss_fn, microbatches: int = 1, weight_fn=None):
  """Every update step of an iteration, one jitted call per step: `(state, batch, rows [S, N])
  -> (state, [each step's metrics])`, each minibatch gathered by one jitted call. The host
  queues the steps without waiting for any."""
  step = run_rl.jit_update(run, mesh, loss_fn, microbatches, weight_fn)

  def take_minibatch(batch, rows_SxN, i):
    return take_rows(batch, rows_SxN[i])

  take = jax.jit(take_minibatch)

  def all_steps(state, batch, rows_SxN):
    ms = []
    for i in range(rows_SxN.shape[0]):
      state, m = step(state, take(batch, rows_SxN, i))
      ms.append(m)
    return state, ms  # stacked when read (`stack_steps`): no device work for the host to queue

  return all_steps


def stack_steps(ms) -> dict[str, np.ndarray]:
  """The update metrics on the host, each [steps], from either `jit_steps` (a list of each
  step's) or `jit_all_steps` (already stacked)."""
  if isinstance(ms, dict):
    return ms
  return {k: np.stack([m[k] for m in ms]) for k in ms[0]}


def jit_all_steps(run, mesh, loss_fn, microbatches: int = 1, weight_fn=None):
  """Every update step of an iteration in one jitted call (`config.ppo.one_call`):
  `(state, batch, rows [S, N]) -> (state, metrics [S])`, a `lax.scan` of `run_rl`'s guarded
  step over the minibatches `rows` picks (gathered on the device, rows kept split), the state
  donated. The host then dispatches once per iteration instead of once per step, and gathers
  no minibatch itself."""
  dropout = lora_lib.uses_dropout(run.model)

  def all_steps(state, batch, rows_SxN):
    def body(st, rows_N):
      return run_rl.guarded_update(loss_fn, run.tx, st, take_rows(batch, rows_N), microbatches,
                                   weight_fn, dropout)
    return jax.lax.scan(body, state, rows_SxN)

  return jax.jit(all_steps, donate_argnums=0,
                 out_shardings=(run.shardings, sharding_lib.replicated(mesh)))


# ------------------------------------------------------------------------------------------------
# The loop.
# ------------------------------------------------------------------------------------------------


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_after: int | None = None) -> dict[str, Any]:
  task, mcfg, mesh, rcfg = check_config(config)
  run = run_rl.build(config, workdir, task, mesh, rcfg)
  model, state, world = run.model, run.state, run.world
  policy = run_rl.rollout_policy(config, model, task, rcfg)
  if world is None:
    # The batch's rows over data x fsdp, as the update reads them; the stats as means.
    def collect_batch(p, r, k):
      return mean_stats(*prepare_batch(config, model, task, policy, rcfg, p, r, k))

    prep = jax.jit(collect_batch, out_shardings=(sharding_lib.batch_sharding(mesh),
                                                 sharding_lib.replicated(mesh)))
  else:
    collect_fn = jit_collect_text(config, model, task, policy, rcfg)
    finish_fn = jax.jit(lambda p, r, conv, *per_turn: finish_batch(config, model, p, r, conv,
                                                                   *per_turn),
                        out_shardings=sharding_lib.batch_sharding(mesh))
  # Microbatches weighted by their reply tokens: the policy, KL and entropy terms are means over
  # them (the value term, a mean over turns, is then weighted by tokens too).
  loss_fn = lambda p, mb, key=None: ppo_loss(model, config, p, mb, key)
  weight_fn = lambda mb: mb["mask_BxL"].sum()
  one_call = config.ppo.get("one_call", False)  # absent in configs saved before it
  update = (jit_all_steps if one_call else jit_steps)(
      run, mesh, loss_fn, config.get("microbatches", 1), weight_fn)
  rows_fn = jax.jit(functools.partial(minibatch_rows, config),
                    out_shardings=sharding_lib.replicated(mesh))

  def scalars_fn(ms, stats, seconds):
    ms = stack_steps(ms)
    bad_steps = int(ms.pop("nonfinite").sum())
    # Means over the iteration's minibatch steps (skipped ones included: they show what broke).
    scalars = {**run_rl.host_means(ms), **run_rl.host_means(stats),
               "nonfinite/skipped": bad_steps}
    # Conversation tokens collected and trained on per second of the whole iteration.
    scalars["tokens_per_s"] = scalars["tokens/conversation"] * config.batch_size / seconds
    return scalars, bad_steps

  reader = run_rl.LateReader(run, scalars_fn)
  it0 = int(state.step) // (config.ppo.epochs * config.ppo.minibatches)
  history = run.baseline(it0)
  for it in run.steps(it0, stop_after, f"ppo[{config.reward.kind}]"):
    t0 = time.perf_counter()
    key = jax.random.fold_in(state.key, it)
    if world is None:  # queued, not awaited: the previous iteration is read meanwhile
      batch, stats = prep(state.params, run.reference(state.params), key)
    else:  # the host scores the rewards, so it waits for the collection anyway
      batch, stats = text_iteration(config, world, collect_fn, finish_fn, state.params,
                                    run.reference(state.params), key)
      stats["time/collect_s"] = time.perf_counter() - t0
    state, ms = update(state, batch, rows_fn(key))
    data_state = None if world is None else world.train.get_state()
    history.update(reader.push(it, t0, ms, stats, state, data_state))
  run.close()
  return {"state": state, "final": history, "how": run.how}
