"""The part of the run scaffold (`run.py`) that the conversation RL trainers share.

PPO and DPO (online and offline) check their configs the same way, play the same rollout
policy, start from a sharded train state in the resume order of `run.Run` with a frozen reference
(the run's starting policy), evaluate greedily on fixed held-out episodes, guard against
non-finite updates and end every iteration alike (`Setup.end_iteration`: check, evaluate, log,
save). Each trainer file keeps what is its own: what it collects and its loss.

Key streams: an iteration's keys are `fold_in(state.key, iteration)` (the state's RNG, branch 1
of `run.py`'s streams, checkpointed with the state); greedy evaluation replays the episodes of
`key(seed + 10_000)` every time.

Non-finite updates. Every update step checks its loss and gradient norm inside the jitted step and,
when either is NaN or inf, returns the state it was given (so bad params never exist, let alone
reach a checkpoint). `config.on_nonfinite` then decides on the host: "stop" raises
`NonFiniteError` after waiting for pending checkpoint saves (the last good checkpoint stays the
latest), "skip" drops the update, counts it in `nonfinite/skipped` and goes on.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, NamedTuple

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from collab_rl import checkpoint as ckpt_lib
from collab_rl import restore as restore_lib
from collab_rl import rewards
from collab_rl import rollout as rollout_lib
from collab_rl import run as run_lib
from collab_rl import run_text
from collab_rl import sampling
from collab_rl import sharding as sharding_lib
from collab_rl import train_state as state_lib
from collab_rl.models import lora as lora_lib
from collab_rl.models import transformer
from collab_rl.tasks import registry, scoring
from collab_rl.tasks import text as text_lib

ON_NONFINITE = ("stop", "skip")


NonFiniteError = state_lib.NonFiniteError  # a loss, gradient, reward or batch went NaN/inf


# ------------------------------------------------------------------------------------------------
# Config.
# ------------------------------------------------------------------------------------------------


def check_common(config):
  """The checks every RL config passes before anything compiles: (task, model cfg, mesh, rcfg).
  The language tier's task (`config.task = "collabllm"`) reads its folders here; its records,
  user weights and judge are loaded by `build`."""
  run_lib.check_positive(config, ("num_turns", "num_steps", "batch_size", "reply_tokens",
                                  "eval_batch_size", "eval_every", "log_every"))
  if config.on_nonfinite not in ON_NONFINITE:
    raise ValueError(f"config.on_nonfinite={config.on_nonfinite!r}; choose from {ON_NONFINITE}")
  rcfg = rewards.RewardConfig.from_config(config.reward)  # checks window, samples, token_cost
  text = config.task == registry.TEXT_TASK
  if text:
    run_text.check(config)
  task = registry.config_task(config, **(
      {"max_turns": rcfg.horizon(config.num_turns)} if text else {}))
  cfg = run_lib.check_model(config)  # sizes before anything divides by them
  if text and cfg.vocab_size < task.vocab_size:
    raise ValueError(f"config.model.vocab_size={cfg.vocab_size} is smaller than the policy "
                     f"tokenizer's vocabulary ({task.vocab_size})")
  if not text and cfg.vocab_size != task.vocab_size:
    raise ValueError(f"config.model.vocab_size={cfg.vocab_size} must equal the vocabulary of "
                     f"task {config.task!r} ({task.vocab_size})")
  columns = max_len(config, task, rcfg)
  if text and columns > cfg.max_position_embeddings:
    raise ValueError(f"a conversation may reach {columns} tokens (sim.max_request_tokens + "
                     f"{rcfg.horizon(config.num_turns)} turns of reply_tokens and "
                     f"sim.max_user_len), more than config.model.max_position_embeddings="
                     f"{cfg.max_position_embeddings}")
  mesh = run_lib.check_run(config, batches=("batch_size", "eval_batch_size"))
  rollout_policy(config, None, task, rcfg)  # SamplingConfig checks the temperature
  return task, cfg, mesh, rcfg


def max_len(config, task, rcfg: rewards.RewardConfig) -> int:
  """Columns of a conversation: the opening, then every turn (and MR's window) at its budget."""
  return rollout_lib.conversation_len(task, rcfg.horizon(config.num_turns), config.reply_tokens)


def rollout_policy(config, model, task, rcfg: rewards.RewardConfig,
                   temperature: float | None = None) -> rollout_lib.LMPolicy:
  """The policy as the RL rollouts play it: `config.reply_tokens` a reply, at
  `config.temperature` (or `temperature`; 0 is greedy), with a cache for MR's futures too."""
  t = config.temperature if temperature is None else temperature
  sc = sampling.SamplingConfig(max_new_tokens=config.reply_tokens, temperature=t,
                               greedy=t == 0.0, stop_tokens=task.stop_tokens)
  return rollout_lib.lm_policy(model, sc, chunk_width=rollout_lib.chunk_width(task),
                               max_turns=rcfg.horizon(config.num_turns))


# ------------------------------------------------------------------------------------------------
# State, reference and evaluation.
# ------------------------------------------------------------------------------------------------


def reference(params, ref_params) -> Any:
  """`Setup.reference`: the base of `params` without adapters when `ref_params` is None."""
  return lora_lib.reference(params) if ref_params is None else ref_params


class Setup(NamedTuple):
  model: transformer.Transformer
  tx: optax.GradientTransformation
  state: state_lib.TrainState
  # The frozen reference policy: the run's starting point (None with adapters: `reference`).
  ref_params: Any
  shardings: state_lib.TrainState
  run: run_lib.Run  # resume order, checkpointer, writer, and the loop's steps (`steps`)
  evaluate: Callable[[Any], dict[str, float]]  # params -> greedy held-out metrics
  config: ml_collections.ConfigDict
  world: run_text.World | None = None  # the language tier's records, user and scorer

  def reference(self, params) -> Any:
    """The reference policy's params beside the policy's `params`: with adapters the same base
    arrays without them (models/lora.py; the train state is donated every update, so it is
    taken from the current params, never kept), else the run's starting params."""
    return reference(params, self.ref_params)

  @property
  def checkpointer(self) -> ckpt_lib.Checkpointer:
    return self.run.checkpointer

  @property
  def how(self) -> str:  # "fresh", "resumed step N" or "init_from ..."
    return self.run.how

  @property
  def data_state(self) -> dict | None:  # a resumed run's data position (offline data only)
    return self.run.data_state

  def steps(self, start: int, stop_after: int | None, desc: str) -> Iterable[int]:
    """The iterations after `start` (`run.Run.steps`: `stop_after` ends this process early)."""
    return self.run.steps(start, self.config.num_steps, stop_after, desc)

  def baseline(self, start: int) -> dict[str, float]:
    """The starting policy's evaluation (fresh or `init_from`), logged at iteration 0: the
    curve's first point. {} when the run resumed (`start` > 0)."""
    if start:
      return {}
    return self.run.log(0, {f"eval/{k}": v for k, v in self.evaluate(self.state.params).items()})

  def read_now(self, it: int) -> bool:
    """Whether iteration `it` must be read before the next one is queued: it evaluates, may
    save (the checkpoint interval or a preemption) or is this process's last. Every other
    iteration is read one late (`LateReader`)."""
    return (it % self.config.eval_every == 0 or it == self.run.last
            or self.checkpointer.due(it))

  def end_iteration(self, it: int, state: state_lib.TrainState | None,
                    scalars: dict[str, float], bad_steps: int,
                    data_state: dict | None = None) -> dict[str, float]:
    """After an iteration's updates, in this order: the non-finite check (`check_finite`), the
    greedy evaluation when due (every `eval_every` iterations and at this process's last), the
    log (every `log_every` iterations, and with every evaluation), the checkpoint (always at the
    last). `state` is None for an iteration read late, whose state the next update consumed:
    such an iteration is never one that evaluates or saves (`read_now`). Returns `scalars`
    with the evaluation added."""
    config, last = self.config, self.run.last
    check_finite(config, it, scalars, bad_steps, self.checkpointer)
    evaluated = it % config.eval_every == 0 or it == last
    if state is None and evaluated:
      raise ValueError(f"iteration {it} evaluates but was read without its state")
    if evaluated:
      scalars.update({f"eval/{k}": v for k, v in self.evaluate(state.params).items()})
    if evaluated or it % config.log_every == 0:
      self.run.writer.write_scalars(it, scalars)
    if state is not None:
      self.run.save(it, state, data_state)
    return scalars

  def close(self) -> None:
    self.run.close()


def build(config, workdir: str, task, mesh, rcfg) -> Setup:
  init = run_lib.init_state(config, mesh, run_lib.make_optimizer(config.optimizer))
  run = run_lib.Run(config, workdir, init.abstract, init.create_fn, tokenizer=task.tokenizer)
  # The reference is the run's starting policy, rebuilt the same way on every resume (frozen
  # params are never saved with the train state).
  # With adapters the reference is the base inside the state (`Setup.reference`): no copy.
  if run_lib.lora_config(config).enabled:
    ref_params = None
  else:
    ref_params = (restore_lib.restore_params(config.init_from, init.abstract.params)
                  if config.init_from else init.create_fn().params)
  greedy = rollout_policy(config, init.model, task, rcfg, temperature=0.0)
  eval_key = jax.random.key(config.seed + 10_000)  # the same held-out episodes every time
  if not task.device_scored:
    return _build_text(config, task, mesh, rcfg, init, run, ref_params, greedy, eval_key)

  def episodes(params, key):
    ro = rollout_lib.rollout(greedy, task, params, key, config.eval_batch_size,
                             num_turns=config.num_turns, max_len=max_len(config, task, rcfg),
                             mesh=mesh)
    return {**scoring.episode_metrics(task, ro.conv, ro.sim),
            "reward": rewards.conversation_reward(task, ro.conv, ro.sim, rcfg)[0]}

  episodes = jax.jit(episodes)

  def evaluate(params) -> dict[str, float]:
    m = sharding_lib.to_host(episodes(params, eval_key))
    return {**scoring.summarize(m), "reward": float(np.mean(m["reward"]))}

  return Setup(init.model, init.tx, run.state, ref_params, init.shardings, run, evaluate, config)


def group_size(config) -> int:
  """Conversations per intent: a group baseline's repeats (PPO grpo/rloo), else 1."""
  ppo = config.get("ppo")
  return ppo.group_size if ppo is not None and ppo.advantage != "gae" else 1


def _build_text(config, task, mesh, rcfg, init, run, ref_params, greedy, eval_key) -> Setup:
  """`build` for the language tier: its world (records from the checkpointed data position,
  the user's weights, the scorer), and an evaluation that plays the fixed validation records
  on device and scores them on the host."""
  world = run_text.build(config, task, mesh, batch=config.batch_size // group_size(config),
                         seed=config.seed)
  run.resume(world.train)
  # A user that shares the policy's base reads it from the params at hand (`World.bind`).
  eval_intent = world.bind(reference(run.state.params, ref_params)).eval_intent(
      jax.random.fold_in(eval_key, 1))

  def episodes(params, user_params, intent, key):
    ro = rollout_lib.rollout(greedy, task.bind(user_params), params, key, config.eval_batch_size,
                             num_turns=config.num_turns, max_len=max_len(config, task, rcfg),
                             intent=intent, mesh=mesh)
    return text_lib.played(ro.conv, ro.sim)

  episodes = jax.jit(episodes)

  def evaluate(params) -> dict[str, float]:
    bound = world.bind(reference(params, ref_params))
    conv, user = sharding_lib.to_host(episodes(params, bound.user_params, eval_intent, eval_key))
    m, stats = bound.scorer.episode_metrics(conv, user, world.eval_records)
    return {**scoring.summarize(m), "reward": float(np.mean(m["reward"])), **stats}

  return Setup(init.model, init.tx, run.state, ref_params, init.shardings, run, evaluate, config,
               world)


# ------------------------------------------------------------------------------------------------
# Updates that never apply a non-finite step.
# ------------------------------------------------------------------------------------------------


def guarded_update(loss_fn, tx, state: state_lib.TrainState, batch, microbatches: int = 1,
                   weight_fn=None, dropout: bool = False):
  """One optimizer step on `loss_fn(params, batch) -> (loss, metrics)` (with `dropout`,
  `loss_fn(params, batch, key)`), kept only if finite; with `microbatches` > 1 accumulated over
  slices of the batch (`state_lib.update`)."""
  new, loss, m, extra = state_lib.update(state, tx, loss_fn, batch, microbatches, weight_fn,
                                         dropout)
  return new, {**m, "loss": loss, **extra}


def jit_update(run: Setup, mesh: jax.sharding.Mesh, loss_fn, microbatches: int = 1,
               weight_fn=None):
  """`guarded_update` jitted: `(state, batch) -> (state, metrics)`, the state donated and kept
  in its shardings, the metrics replicated. `loss_fn(params, batch, key=None)` gets the step's
  dropout key when the run's model has LoRA dropout."""
  dropout = lora_lib.uses_dropout(run.model)
  def update_step(state, batch):
    return guarded_update(loss_fn, run.tx, state, batch, microbatches, weight_fn, dropout)

  return jax.jit(update_step, donate_argnums=0,
                 out_shardings=(run.shardings, sharding_lib.replicated(mesh)))


class LateReader:
  """Reads an RL loop's iterations one late, so that the host never waits on the device.

  A trainer queues iteration i (collection and updates, all asynchronous on a device-scored
  task) and hands its results, still on the device, to `push`; only then is iteration i - 1
  read (its non-finite flags, metrics and stats copied to the host, checked and logged), by
  when the device has finished it and is busy with i. An iteration that evaluates, may save or
  ends the process (`Setup.read_now`) is read at once, with its state.

  `scalars_fn(device_values_on_host, host_values, seconds) -> (scalars, bad_steps)` turns what
  an iteration left into its logged scalars. `time/iteration_s` is the host's time from the
  iteration's start to the next one's (to the end of its reading when read at once): in a
  steady loop that is the time the iteration costs the run.

  With `config.on_nonfinite = "stop"`, a refused update is then seen one iteration late: the
  next iteration's update has run in memory (on the last good params) but nothing after the
  refused one is ever saved, since an iteration that may save is read at once.
  """

  def __init__(self, setup: Setup, scalars_fn: Callable[..., tuple[dict[str, float], int]]):
    self.setup, self.scalars_fn = setup, scalars_fn
    self._late = None  # (it, t0, device values, host values, data_state) not read yet

  def push(self, it: int, t0: float, device, host: dict, state: state_lib.TrainState,
           data_state: dict | None = None) -> dict[str, float]:
    """Iteration `it` (started at `t0`, `time.perf_counter`) is queued: reads the one before
    it, and `it` itself when `Setup.read_now(it)`; returns what they logged."""
    logged = {}
    if self._late is not None:
      logged.update(self._read(*self._late, end=t0, state=None))
    self._late = (it, t0, device, host, data_state)
    if self.setup.read_now(it):
      self._late, late = None, self._late
      logged.update(self._read(*late, end=None, state=state))
    return logged

  def _read(self, it, t0, device, host, data_state, *, end, state) -> dict[str, float]:
    device = sharding_lib.to_host(device)  # waits for iteration `it`, finished or nearly
    seconds = (time.perf_counter() if end is None else end) - t0
    scalars, bad_steps = self.scalars_fn(device, host, seconds)
    scalars["time/iteration_s"] = seconds
    return self.setup.end_iteration(it, state, scalars, bad_steps, data_state)


def host_means(stats) -> dict[str, float]:
  return {k: float(np.asarray(v).astype(np.float32).mean())
          for k, v in sharding_lib.to_host(stats).items()}


def check_finite(config, it: int, scalars: dict[str, float], bad_steps: int,
                 checkpointer: ckpt_lib.Checkpointer) -> None:
  """Stops the run (config.on_nonfinite="stop") when an update or a logged scalar was not finite.

  The jitted step has already refused the bad update, so the state in memory is the last good
  one; pending asynchronous saves are awaited so that the latest checkpoint on disk is complete.
  """
  bad = sorted(k for k, v in scalars.items() if not np.isfinite(v))
  if not bad and not bad_steps:
    return
  what = f"{bad_steps} non-finite update(s)" if bad_steps else "no non-finite update"
  message = (f"{config.trainer} iteration {it}: {what}; non-finite values in {bad or 'none'}")
  if config.on_nonfinite == "skip":
    logging.warning("%s; skipped (config.on_nonfinite='skip')", message)
    return
  checkpointer.wait()
  raise NonFiniteError(f"{message}. Stopped (config.on_nonfinite='stop'); the last good "
                       f"checkpoint is step {checkpointer.latest_step()} in "
                       f"{checkpointer.directory}; no update of this iteration was applied.")
