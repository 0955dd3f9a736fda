"""The device-idle share of a PPO iteration: how much of an iteration's wall time the device
waits for the host.

Two measurements of the same loop (`ppo.train` on `ppo_ambig_math.py:reward=mr,window=2`, the
MR headline arm's trainer, evaluating and saving at its last iteration only):

* traced (the figure reported): the loop runs under `jax.profiler.trace` (Python tracer off);
  every XLA execution appears as a `ThunkExecutor::Execute` span on XLA's threads, and each
  iteration as a `TraceAnnotation` on the host. Over the iterations after the first --warmup
  (they compile) and before the last (it evaluates and saves): idle share = 1 - (the union of
  the execution spans) / (the iterations' wall time).
* estimated (a cross-check without the profiler): the device seconds of one iteration's
  programs, each run alone and awaited (the collection, `ppo.prepare_batch` jitted, and the
  update steps: a jitted step per minibatch or all in one call with one_call), against the
  loop's median period between iteration starts: 1 - busy / period.

On this CPU the "device" is XLA's CPU runtime, which shares the 2 cores with the host's Python:
host work there also slows the device down, which no reordering removes. The script uses only
what older commits have too (`prepare_batch`, `minibatch_rows`, `jit_all_steps`,
`run_rl.jit_update`, `run.Run.steps`), so the "before" is this file run from an older checkout:

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


def traced_loop(config, workdir: str, trace_dir: str, warmup: int) -> dict:
  """Runs `ppo.train` under the profiler; returns the loop's periods between iteration starts
  and, over iterations warmup + 1 .. last - 1, the traced wall and device-busy seconds."""
  import glob  # pylint: disable=g-import-not-at-top
  import gzip  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  from collab_rl import run as run_lib  # pylint: disable=g-import-not-at-top
  from collab_rl.trainers import ppo  # pylint: disable=g-import-not-at-top

  stamps, steps = [], run_lib.Run.steps

  def timed_steps(self, *args, **kwargs):
    for it in steps(self, *args, **kwargs):
      stamps.append(time.perf_counter())
      with jax.profiler.TraceAnnotation(f"rl_idle iteration {it}"):
        yield it
    stamps.append(time.perf_counter())

  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0  # it would multiply the host's own time
  run_lib.Run.steps = timed_steps
  try:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True, profiler_options=options):
      ppo.train(config, workdir)
  finally:
    run_lib.Run.steps = steps
  (path,) = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
  with gzip.open(path) as f:
    trace = json.load(f)
  events = [e for e in (trace["traceEvents"] if isinstance(trace, dict) else trace)
            if e.get("ph") == "X"]
  iterations = {int(e["name"].rsplit(" ", 1)[1]): (e["ts"], e["ts"] + e["dur"])
                for e in events if e["name"].startswith("rl_idle iteration ")}
  its = sorted(iterations)
  timed = its[warmup:-1]
  lo, hi = iterations[timed[0]][0], iterations[timed[-1]][1]
  spans = sorted((max(e["ts"], lo), min(e["ts"] + e["dur"], hi)) for e in events
                 if e["name"] == "ThunkExecutor::Execute" and e["ts"] < hi
                 and e["ts"] + e["dur"] > lo)
  busy, end = 0.0, lo
  for a, b in spans:  # the union of the (nested, overlapping) execution spans
    if b > end:
      busy += b - max(a, end)
      end = b
  return {"periods_s": [b - a for a, b in zip(stamps, stamps[1:])],
          "traced_iterations": [timed[0], timed[-1]], "traced_wall_s": (hi - lo) / 1e6,
          "traced_busy_s": busy / 1e6}


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
      traced = traced_loop(config, f"{d}/loop", f"{d}/trace", warm)
      busy = busy_seconds(config, f"{d}/busy", _REPEATS.value)
    periods = traced.pop("periods_s")
    steady = periods[warm:warm + timed]
    period = statistics.median(steady)
    idle = 1.0 - traced["traced_busy_s"] / traced["traced_wall_s"]
    r = {"one_call": one_call, "idle_share": idle, **traced, **busy, "period_s": period,
         "period_range_s": [min(steady), max(steady)], "periods_s": periods,
         "estimated_idle_share": 1.0 - busy["busy_s"] / period}
    result["runs"].append(r)
    print(f"commit {commit} one_call={one_call}: idle share {idle:.1%} (traced: device busy "
          f"{traced['traced_busy_s']:.3f} s of {traced['traced_wall_s']:.3f} s over iterations "
          f"{traced['traced_iterations'][0]}-{traced['traced_iterations'][1]}); iteration "
          f"{period:.3f} s (range {min(steady):.3f}-{max(steady):.3f}), programs alone "
          f"{busy['busy_s']:.3f} s (collect {busy['collect_s']:.3f} + update "
          f"{busy['update_s']:.3f}): estimated idle share {r['estimated_idle_share']:.1%}")
  if _OUT.value:
    common.write_json(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)
