"""XLA compile options side by side: `compile_time`'s jobs compiled under each, in one process.

  python -m experiments.bench.compile_options --jobs ppo_mr \\
      --options "default,xla_cpu_use_fusion_emitters=false" --rounds 3

On this project's CPU machine the same job's compile time moves by 20-30% from one process to
the next, more than most options change it. Here every round compiles each job under every
variant in turn, in one process, with the persistent cache off and JAX's in-memory caches
cleared before each, so the machine's drift falls on all variants alike.

A variant is `default` (the process's own options: XLA_FLAGS) or `key=value[;key=value...]`,
XLA DebugOptions fields added to every compilation's options (JAX's `env_options_overrides`,
what `.compile(compiler_options=...)` passes). JAX has no public switch for every compilation of
a process, and the trainers jit their own programs, so this benchmark wraps the private
`jax._src.compiler.get_compile_options`; it also times `backend_compile_and_load` in CPU seconds
of the process (less sensitive to the machine's other load than wall time). Prints, per
variant, job and round, XLA's backend compile in wall seconds (`jax.monitoring`, as
`compile_time` reports it) and in CPU seconds, then the medians over the rounds; the JSON adds
each round's seconds per program.
"""

from __future__ import annotations

import statistics
import time

from absl import app
from absl import flags

from experiments.bench import common
from experiments.bench import compile_time

FLAGS = flags.FLAGS  # --jobs, --task, --size, --layers, --scan_layers, --out: compile_time's
_OPTIONS = flags.DEFINE_list("options", ["default", "xla_cpu_use_fusion_emitters=false"],
                             "Variants: `default` or xla_field=value pairs joined by ';'.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds over the variants.", lower_bound=1)


class OptionsHook:
  """Adds `self.options` to every compilation's options and sums its CPU seconds in XLA."""

  def __init__(self):
    from jax._src import compiler  # pylint: disable=g-import-not-at-top

    self.options, self.cpu_s = {}, 0.0
    get_options, compile_call = compiler.get_compile_options, compiler.backend_compile_and_load

    def with_options(*args, **kwargs):
      merged = {**(kwargs.get("env_options_overrides") or {}), **self.options}
      return get_options(*args, **{**kwargs, "env_options_overrides": merged or None})

    def timed(*args, **kwargs):
      t0 = time.process_time()
      try:
        return compile_call(*args, **kwargs)
      finally:
        self.cpu_s += time.process_time() - t0

    compiler.get_compile_options = with_options
    compiler.backend_compile_and_load = timed


def main(argv):
  del argv
  variants = {v: common.parse_xla_options(v) for v in _OPTIONS.value}  # before any work
  import jax  # pylint: disable=g-import-not-at-top

  hook = OptionsHook()
  runs = {v: {job: [] for job in FLAGS.jobs} for v in variants}
  for r in range(_ROUNDS.value):
    for v, options in variants.items():
      for job in FLAGS.jobs:
        hook.options, hook.cpu_s = options, 0.0
        jax.clear_caches()  # every program compiles again (run_child turns the disk cache off)
        out = compile_time.run_child(job)
        runs[v][job].append({"compile_s": out["compile_s"], "compile_cpu_s": hook.cpu_s,
                             "programs": {p["program"]: p["compile_s"] for p in out["programs"]
                                          if p.get("compile_s", 0.0) >= 0.05}})
        print(f"round {r}: {v}: {job}: backend compile {out['compile_s']:.1f} s, "
              f"{hook.cpu_s:.1f} CPU s", flush=True)
  result = {"task": FLAGS.task, "size": FLAGS.size,
            "layers": FLAGS.layers, "scan_layers": FLAGS.scan_layers,
            "variants": {}}
  for v, by_job in runs.items():
    result["variants"][v] = {"options": variants[v], "jobs": {}}
    for job, rows in by_job.items():
      median = {k: statistics.median(row[k] for row in rows)
                for k in ("compile_s", "compile_cpu_s")}
      result["variants"][v]["jobs"][job] = {"rounds": rows, **median}
      print(f"{v}: {job}: backend compile {median['compile_s']:.1f} s, "
            f"{median['compile_cpu_s']:.1f} CPU s (medians of {_ROUNDS.value} rounds)")
  if FLAGS.out:
    common.write_json(FLAGS.out, result)


if __name__ == "__main__":
  app.run(main)
