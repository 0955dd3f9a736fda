"""The device-idle share of a PPO iteration: how much of an iteration's wall time the device
waits for the host.

* busy: the device time of one iteration's programs, each run alone and awaited (medians over
  --repeats): the collection (`ppo.prepare_batch`, jitted) and the update steps (one jitted step
  per minibatch, or all of them in one call with --one_call; the minibatches are gathered before
  the clock starts).
* period: the trainer's own loop (`ppo.train`) timed between the starts of consecutive
  iterations (a wrapper around `run.Run.steps`), median over the iterations after the first
  --warmup (they compile) and before the last (it evaluates and saves).
* idle share = 1 - busy / period: the part of the loop in which the device has nothing queued
  (host reads, logging, dispatch, the host's own array work).

On this CPU the "device" is XLA's CPU runtime, which shares the 2 cores with the host's Python;
on an accelerator host work overlaps device work fully once the host never waits. The script
uses only what older commits have too (`prepare_batch`, `minibatch_rows`, `jit_all_steps`,
`run_rl.jit_update`), so the "before" is this file run from an older checkout:

  python -m experiments.bench.rl_idle --out runs/bench/rl_idle.json
  (cd OLD_CHECKOUT && PYTHONPATH=. python /path/to/experiments/bench/rl_idle.py ...)
"""

from __future__ import annotations

import tempfile
import time

from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", None, "Where to write the JSON result (optional).")
_ITERATIONS = flags.DEFINE_integer("iterations", 6, "Iterations timed in the trainer's loop.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Iterations not timed at the start (compilation).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats of each program alone.")
_ONE_CALL = flags.DEFINE_list("one_call", ["false", "true"],
                              "config.ppo.one_call values to measure, in order.")
_BATCH = flags.DEFINE_integer("batch", 64, "Conversations per iteration (config.batch_size).")


def _config(one_call: bool, num_steps: int):
  from experiments import ppo_ambig_math  # pylint: disable=g-import-not-at-top
  config = ppo_ambig_math.get_config("reward=mr,window=2")
  config.batch_size = _BATCH.value
  config.num_steps = num_steps
  config.eval_every = num_steps  # evaluates and saves at the last iteration only
  config.checkpoint.every_steps = num_steps
  config.log_every = 1
  config.ppo.one_call = one_call
  return config


def busy_seconds(config, workdir: str, repeats: int) -> dict:
  """Device seconds of one iteration's programs, each alone and awaited."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from collab_rl import run_rl  # pylint: disable=g-import-not-at-top
  from collab_rl.trainers import ppo  # pylint: disable=g-import-not-at-top
  from experiments.bench import common  # pylint: disable=g-import-not-at-top

  task, _, mesh, rcfg = ppo.check_config(config)
  run = run_rl.build(config, workdir, task, mesh, rcfg)
  policy = run_rl.rollout_policy(config, run.model, task, rcfg)
  prep = jax.jit(lambda p, r, k: ppo.prepare_batch(config, run.model, task, policy, rcfg, p, r,
                                                   k))
  key = jax.random.key(0)
  ref = run.reference(run.state.params)
  t_collect = common.median_seconds(lambda: prep(run.state.params, ref, key), repeats,
                                    jax.block_until_ready)
  batch, _ = prep(run.state.params, ref, key)
  loss_fn = lambda p, mb, key=None: ppo.ppo_loss(run.model, config, p, mb, key)
  weight_fn = lambda mb: mb["mask_BxL"].sum()
  rows_SxN = ppo.minibatch_rows(config, key)
  holder = [run.state]
  if config.ppo.one_call:
    all_steps = ppo.jit_all_steps(run, mesh, loss_fn, 1, weight_fn)

    def update():
      holder[0], m = all_steps(holder[0], batch, rows_SxN)
      return m["loss"]
  else:
    step = run_rl.jit_update(run, mesh, loss_fn, 1, weight_fn)
    minibatches = [jax.tree_util.tree_map(lambda x, r=r: x[r], batch)
                   for r in np.asarray(rows_SxN)]
    jax.block_until_ready(minibatches)

    def update():
      for mb in minibatches:
        holder[0], m = step(holder[0], mb)
      return m["loss"]

  t_update = common.median_seconds(update, repeats, jax.block_until_ready)
  run.close()
  return {"collect_s": t_collect, "update_s": t_update, "busy_s": t_collect + t_update}


def loop_periods(config, workdir: str) -> list[float]:
  """Seconds between the starts of consecutive iterations of `ppo.train` (the last: to the
  loop's end)."""
  from collab_rl import run as run_lib  # pylint: disable=g-import-not-at-top
  from collab_rl.trainers import ppo  # pylint: disable=g-import-not-at-top

  stamps, steps = [], run_lib.Run.steps

  def timed_steps(self, *args, **kwargs):
    for it in steps(self, *args, **kwargs):
      stamps.append(time.perf_counter())
      yield it
    stamps.append(time.perf_counter())

  run_lib.Run.steps = timed_steps
  try:
    ppo.train(config, workdir)
  finally:
    run_lib.Run.steps = steps
  return [b - a for a, b in zip(stamps, stamps[1:])]


def main(argv):
  del argv
  import os  # pylint: disable=g-import-not-at-top
  import platform  # pylint: disable=g-import-not-at-top
  import statistics  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  from experiments.bench import common  # pylint: disable=g-import-not-at-top

  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()
  result = {"commit": commit, "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "jax": jax.__version__, "devices": jax.device_count(), "batch": _BATCH.value,
            "runs": []}
  warm, timed = _WARMUP.value, _ITERATIONS.value
  for value in _ONE_CALL.value:
    one_call = value.lower() in ("1", "true", "yes")
    config = _config(one_call, warm + timed + 1)
    with tempfile.TemporaryDirectory() as d:
      periods = loop_periods(config, f"{d}/loop")
      busy = busy_seconds(config, f"{d}/busy", _REPEATS.value)
    steady = periods[warm:warm + timed]
    period = statistics.median(steady)
    r = {"one_call": one_call, **busy, "period_s": period,
         "period_range_s": [min(steady), max(steady)], "periods_s": periods,
         "idle_share": 1.0 - busy["busy_s"] / period}
    result["runs"].append(r)
    print(f"commit {commit} one_call={one_call}: iteration {period:.3f} s "
          f"(range {min(steady):.3f}-{max(steady):.3f}), device busy {busy['busy_s']:.3f} s "
          f"(collect {busy['collect_s']:.3f} + update {busy['update_s']:.3f}), "
          f"idle share {r['idle_share']:.1%}")
  if _OUT.value:
    common.write_json(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)
