"""Compile time of a run's programs, cold: what a fresh run pays before its first step.

  python -m experiments.bench.compile_time --out bench_out/compile_time.json

Each job runs its trainer as `collab_rl.main` would (the mesh set, the arm's config from
`experiments/collab_arms.py`, one iteration or step, evaluation at the end), in a fresh process
with the persistent compilation cache off, and records JAX's own compile events per program
(`jax.monitoring`: tracing to a jaxpr, lowering to StableHLO, XLA's backend compile). The
figure that matters is the backend compile; tracing and lowering are the Python side. A
program compiled twice (two shapes, or rebuilt) counts twice.

Jobs: `base` (the SFT base, `arm=sft_base`), `ppo_mr` (PPO with MR w = 2, `arm=ppo_mr_w2`:
the MR collection, the update, the greedy evaluation) and `ppo_mr_one_call` (the same with the
update's steps as one call). `--size` picks the arms' model size, `--layers` overrides its depth
(32: Llama-8B's) and `--scan_layers` scans the layers (`model.scan_layers`). The "before" of a
change is this file run from an older checkout (PYTHONPATH=.).
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", None, "Where to write the JSON result (optional).")
_TASK = flags.DEFINE_string("task", "ambig_math", "The arms' task.")
_SIZE = flags.DEFINE_string("size", "small", "The arms' model size (collab_arms.py).")
_LAYERS = flags.DEFINE_integer("layers", None, "num_hidden_layers (default: the size's).")
_SCAN = flags.DEFINE_boolean("scan_layers", False, "The model's scan_layers: one scanned "
                             "layer instead of num_hidden_layers unrolled.")
_JOBS = flags.DEFINE_list("jobs", ["base", "ppo_mr", "ppo_mr_one_call"], "What to compile.")
_CHILD = flags.DEFINE_string("child", None, "Internal: run one job in this process.")

EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
          "/jax/core/compile/backend_compile_duration": "compile_s"}


def _config(job: str):
  from experiments import collab_arms  # pylint: disable=g-import-not-at-top
  arm = "sft_base" if job == "base" else "ppo_mr_w2"
  config = collab_arms.get_config(f"arm={arm},task={_TASK.value},size={_SIZE.value}")
  config.num_steps = 1
  config.eval_every = 1
  if job == "ppo_mr_one_call":
    config.ppo.one_call = True
  if _LAYERS.value is not None:
    config.model.num_hidden_layers = _LAYERS.value
  config.model.scan_layers = _SCAN.value
  return config


def run_child(job: str) -> dict:
  """Runs `job`'s trainer for one step in this process; returns its compile events."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax import monitoring  # pylint: disable=g-import-not-at-top

  from collab_rl import main as main_lib  # pylint: disable=g-import-not-at-top
  from collab_rl import sharding  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_enable_compilation_cache", False)  # cold: nothing read from disk
  programs = collections.defaultdict(lambda: collections.defaultdict(float))
  order = []

  def listen(event, seconds, **kwargs):
    if event in EVENTS:
      name = kwargs.get("fun_name", "?")
      if name not in programs:
        order.append(name)
      programs[name][EVENTS[event]] += seconds
      if event.endswith("backend_compile_duration"):
        programs[name]["compiles"] += 1

  monitoring.register_event_duration_secs_listener(listen)
  config = _config(job)
  mesh = sharding.make_mesh(config.mesh_shape)
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as d, jax.set_mesh(mesh):
    main_lib.entry_point(config.trainer)(config, d)
  wall = time.perf_counter() - t0
  rows = [{"program": n, **programs[n]} for n in order]
  return {"job": job, "wall_s": wall, "programs": rows,
          **{k: sum(r.get(k, 0.0) for r in rows) for k in EVENTS.values()}}


def main(argv):
  del argv
  if _CHILD.value:
    print("RESULT " + json.dumps({**run_child(_CHILD.value),
                                  "xla_flags": os.environ.get("XLA_FLAGS", "")}))
    return
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()
  result = {"commit": commit, "cpu_count": os.cpu_count(), "task": _TASK.value,
            "size": _SIZE.value, "layers": _LAYERS.value, "scan_layers": _SCAN.value, "jobs": []}
  for job in _JOBS.value:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-m", "experiments.bench.compile_time",
                          f"--child={job}", f"--task={_TASK.value}", f"--size={_SIZE.value}",
                          f"--scan_layers={_SCAN.value}"]
                         + ([] if _LAYERS.value is None else [f"--layers={_LAYERS.value}"]),
                         capture_output=True, text=True, check=True, env=env)
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    r = json.loads(line[len("RESULT "):])
    result["jobs"].append(r)
    print(f"{job}: backend compile {r['compile_s']:.1f} s, lowering {r['lower_s']:.1f} s, "
          f"tracing {r['trace_s']:.1f} s; the whole one-step run {r['wall_s']:.1f} s "
          f"(XLA_FLAGS={r.get('xla_flags', '')!r})")
    for p in sorted(r["programs"], key=lambda p: -p.get("compile_s", 0.0)):
      if p.get("compile_s", 0.0) >= 0.05:
        # (Tracing is recorded under the function's own name, without jit(): in the total.)
        print(f"  {p['program']:<40} compile {p['compile_s']:6.2f} s  x{int(p['compiles'])}  "
              f"lower {p.get('lower_s', 0.0):5.2f} s")
  if _OUT.value:
    from experiments.bench import common  # pylint: disable=g-import-not-at-top
    common.write_json(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)
