"""PPO and DPO update throughput, and where an RL iteration's time goes, as JSON.

  python -m experiments.bench.train_step --out bench_out/train_step.json

The configs are the experiments' own (`experiments/ppo_ambig_math.py` with reward=mr, window 2,
3 samples; `experiments/dpo_ambig_math.py`, online, 4 candidates), random weights, on this
machine's devices. For each: the collection call (rollout + rewards, MR futures included, + the
reference and old log-probs) and the update (PPO: epochs x minibatches jitted steps; DPO: one
step on chosen + rejected), timed separately after a warm-up; PPO's update also as one jitted
call (`config.ppo.one_call`: `update_one_call_s`), alternated with the loop of steps. Update
tokens/s counts every sequence position the update's forward + backward passes process
(conversations x columns x passes); `assistant_tokens_per_s` counts only the tokens the loss
is on.
"""

from __future__ import annotations

import tempfile

from absl import app, flags

from experiments.bench import common

_OUT = flags.DEFINE_string("out", "bench_out/train_step.json", "Where the JSON goes.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (median reported).")
_BATCH = flags.DEFINE_integer("batch", 64, "Conversations per iteration.")
_SCAN = flags.DEFINE_boolean("scan_layers", False, "config.model.scan_layers of both configs "
                             "(one scanned layer instead of the layers unrolled).")
_LAYERS = flags.DEFINE_integer("layers", None, "config.model.num_hidden_layers of both configs "
                               "(default: the configs' own).")
_LORA_RANK = flags.DEFINE_integer("lora_rank", 0, "config.lora.rank of both configs (0: full "
                                  "fine-tuning; > 0: adapters, the base frozen).")


def state_stats(state) -> dict:
  """What the train state holds: its bytes (params + optimizer state), and how many params
  the optimizer moves (those with optimizer moments: all of them, or the adapters + critic)."""
  import jax
  import optax
  leaves = lambda t: jax.tree_util.tree_leaves(t)
  nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in leaves(t))
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  adam = [s for s in jax.tree_util.tree_leaves(state.opt_state, is_leaf=is_adam) if is_adam(s)]
  return {"params_bytes": nbytes(state.params), "opt_state_bytes": nbytes(state.opt_state),
          "trained_params": sum(x.size for s in adam for x in leaves(s.mu))}


def _model_flags(config) -> None:
  config.model.scan_layers = _SCAN.value
  if _LAYERS.value is not None:
    config.model.num_hidden_layers = _LAYERS.value


def bench_ppo(workdir: str, repeats: int) -> dict:
  import jax
  import numpy as np

  from collab_rl import run_rl
  from collab_rl.trainers import ppo
  from experiments import ppo_ambig_math

  config = ppo_ambig_math.get_config("reward=mr,window=2")
  config.batch_size = _BATCH.value
  config.lora.rank = _LORA_RANK.value
  _model_flags(config)
  task, mcfg, mesh, rcfg = ppo.check_config(config)
  run = run_rl.build(config, workdir, task, mesh, rcfg)
  policy = run_rl.rollout_policy(config, run.model, task, rcfg)
  prep = jax.jit(lambda p, r, k: ppo.prepare_batch(config, run.model, task, policy, rcfg, p, r,
                                                   k))
  step = run_rl.jit_update(run, mesh,
                           lambda p, mb, key=None: ppo.ppo_loss(run.model, config, p, mb, key))
  key = jax.random.key(0)
  ref = run.reference(run.state.params)
  t_collect = common.median_seconds(lambda: prep(run.state.params, ref, key), repeats,
                                    jax.block_until_ready)
  batch, _ = prep(run.state.params, ref, key)
  holder = [run.state]
  held = state_stats(run.state)
  all_steps = ppo.jit_all_steps(
      run, mesh, lambda p, mb, key=None: ppo.ppo_loss(run.model, config, p, mb, key))

  def update():  # as ppo.train does it: the rows, a gather and a step per minibatch
    for rows_N in np.asarray(ppo.minibatch_rows(config, key)):
      holder[0], m = step(holder[0], jax.tree_util.tree_map(lambda x: x[rows_N], batch))
    return m["loss"]

  def update_one_call():  # config.ppo.one_call: every step in one jitted call
    holder[0], m = all_steps(holder[0], batch, ppo.minibatch_rows(config, key))
    return m["loss"]

  # Alternated, so that a machine's load changes both alike.
  t_update, t_one_call = [], []
  for _ in range(repeats):
    t_update.append(common.median_seconds(update, 1, jax.block_until_ready))
    t_one_call.append(common.median_seconds(update_one_call, 1, jax.block_until_ready))
  t_update, t_one_call = float(np.median(t_update)), float(np.median(t_one_call))
  positions = config.ppo.epochs * batch["tokens_BxL"].size
  assistant = config.ppo.epochs * int(np.asarray(batch["mask_BxL"]).sum())
  run.close()
  return {"config": "ppo_ambig_math.py:reward=mr,window=2", "batch": config.batch_size,
          "lora_rank": config.lora.rank, **held,
          "columns": int(batch["tokens_BxL"].shape[1]), "epochs": config.ppo.epochs,
          "minibatches": config.ppo.minibatches, "collect_s": t_collect, "update_s": t_update,
          "update_one_call_s": t_one_call,
          "update_tokens_per_s": positions / t_update,
          "assistant_tokens_per_s": assistant / t_update,
          "collect_share": t_collect / (t_collect + t_update)}


def bench_dpo(workdir: str, repeats: int) -> dict:
  import jax
  import numpy as np

  from collab_rl import run_rl
  from collab_rl.trainers import dpo
  from experiments import dpo_ambig_math

  config = dpo_ambig_math.get_config(None)
  config.batch_size = _BATCH.value
  config.lora.rank = _LORA_RANK.value
  _model_flags(config)
  task, mcfg, mesh, rcfg = dpo.check_config(config)
  run = run_rl.build(config, workdir, task, mesh, rcfg)
  policy = run_rl.rollout_policy(config, run.model, task, rcfg)
  collect = jax.jit(lambda p, r, k: dpo.collect_pairs(config, task, policy, rcfg, p, r,
                                                      run.model, k))
  step = run_rl.jit_update(run, mesh,
                           lambda p, b, key=None: dpo.dpo_loss(run.model, config, p, b, key))
  key = jax.random.key(0)
  ref = run.reference(run.state.params)
  t_collect = common.median_seconds(lambda: collect(run.state.params, ref, key),
                                    repeats, jax.block_until_ready)
  batch, _ = collect(run.state.params, ref, key)
  holder = [run.state]
  held = state_stats(run.state)

  def update():
    holder[0], m = step(holder[0], batch)
    return m["loss"]

  t_update = common.median_seconds(update, repeats, jax.block_until_ready)
  positions = 2 * batch["c_tokens"].size  # chosen and rejected
  scored = int(np.asarray(batch["c_mask"]).sum() + np.asarray(batch["r_mask"]).sum())
  run.close()
  return {"config": "dpo_ambig_math.py (online)", "batch": config.batch_size,
          "lora_rank": config.lora.rank, **held,
          "candidates": config.candidates, "columns": int(batch["c_tokens"].shape[1]),
          "collect_s": t_collect, "update_s": t_update,
          "update_tokens_per_s": positions / t_update,
          "assistant_tokens_per_s": scored / t_update,
          "collect_share": t_collect / (t_collect + t_update)}


def main(argv):
  del argv
  import os
  import platform

  import jax

  with tempfile.TemporaryDirectory() as d:
    result = {"cpu_count": os.cpu_count(), "machine": platform.machine(), "jax": jax.__version__,
              "devices": jax.device_count(), "scan_layers": _SCAN.value, "layers": _LAYERS.value,
              "ppo": bench_ppo(f"{d}/ppo", _REPEATS.value),
              "dpo": bench_dpo(f"{d}/dpo", _REPEATS.value)}
  for name in ("ppo", "dpo"):
    r = result[name]
    print(f"{name} (lora rank {r['lora_rank']}): collect {r['collect_s']:.2f} s, update "
          f"{r['update_s']:.2f} s ({r['update_tokens_per_s']:,.0f} tokens/s), collection share "
          f"{r['collect_share']:.0%}; state {r['params_bytes'] / 2**20:.1f} MiB params + "
          f"{r['opt_state_bytes'] / 2**20:.1f} MiB optimizer, {r['trained_params']:,} trained")
  common.write_json(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)
