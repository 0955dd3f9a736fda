"""The headline sweep: every arm of `experiments/collab_arms.py`, per task and seed, then one table.

  python -m experiments.headline --workdir runs/headline                       # README main job
  python -m experiments.headline --workdir runs/all --tasks ambig_math,doc_edit,code_spec \
      --seeds 0,1,2 --arms sft_base,ppo_helpfulness,ppo_ext,ppo_ext_int,ppo_mr_w1,ppo_mr_w2,\
ppo_mr_w3,dpo_online,data_engine,dpo_offline

Order per (task, seed): the SFT base first, then each arm from it (`init_from`), the data engine
before offline DPO (which reads its dataset). Each run is `python -m collab_rl.main` in a child
process, logging to `<run>/log.txt`, so a failed arm names its log and the others go on; a run
that finished before (`<run>/DONE`) is not repeated, and an interrupted one resumes from its
checkpoint. `--print_only` prints the commands (what `launch/` turns into one job per arm on
Cloud TPU) without running them. Finally `collab_rl.evaluate` plays the test episodes with
every run and writes `results.json`, `results.md`, plots and samples into the workdir.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from absl import app, flags, logging

from experiments import collab_arms

def run_dir(workdir: str, task: str, seed: str, arm: str) -> str:
  return os.path.join(workdir, task, f"seed{seed}", arm)


def commands(workdir: str, tasks, seeds, arms, size: str,
             overrides=()) -> list[tuple[str, list[str]]]:
  """(run directory, argv) per run, in the order they must run."""
  unknown = sorted(set(arms) - set(collab_arms.ARMS))
  if unknown:
    raise ValueError(f"unknown arms {unknown}; known: {collab_arms.ARMS}")
  if "dpo_offline" in arms and "data_engine" not in arms:
    raise ValueError("dpo_offline reads the data engine's dataset: add data_engine to --arms")
  order = ["sft_base"] + [a for a in collab_arms.ARMS if a != "sft_base" and a in arms]
  out = []
  for task in tasks:
    for seed in seeds:
      base = run_dir(workdir, task, seed, "sft_base")
      for arm in order:
        d = run_dir(workdir, task, seed, arm)
        argv = [sys.executable, "-m", "collab_rl.main", "--workdir", d,
                f"--config=experiments/collab_arms.py:arm={arm},task={task},seed={seed},"
                f"size={size}"]
        if arm != "sft_base":
          argv.append(f"--config.init_from={base}/checkpoints")
          argv += list(overrides) if arm.startswith(("ppo", "dpo")) else []
        data = os.path.join(run_dir(workdir, task, seed, "data_engine"), "data")
        if arm == "data_engine":
          argv.append(f"--config.data_dir={data}")
        if arm == "dpo_offline":
          argv.append(f"--config.dpo.data_dir={data}")
        out.append((d, argv))
  return out


def define_flags() -> None:
  """Flags of the command line only (importing this module defines none: tests import it)."""
  flags.DEFINE_string("workdir", "runs/headline", "Root of all runs and results.")
  flags.DEFINE_list("tasks", ["ambig_math"], f"Tasks, from {collab_arms.TASKS}.")
  flags.DEFINE_list("seeds", ["0"], "Seeds (each trains its own base).")
  flags.DEFINE_list("arms", ["sft_base", "ppo_ext", "ppo_mr_w2"],
                    f"Arms, from {collab_arms.ARMS}.")
  flags.DEFINE_enum("size", "small", list(collab_arms.SIZES), "Model and run length.")
  flags.DEFINE_integer("episodes", 512, "Test episodes per run in the evaluation.")
  flags.DEFINE_bool("print_only", False, "Print the commands, run nothing.")
  flags.DEFINE_multi_string("override", [], "--config.x=y added to every RL arm.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  workdir = os.path.abspath(f.workdir)
  logging.set_verbosity(logging.WARNING)  # the table, not Orbax's INFO narration of every read
  jobs = commands(workdir, f.tasks, f.seeds, f.arms, f.size, f.override)
  if f.print_only:
    for _, cmd in jobs:
      print(" ".join(cmd))
    return
  from collab_rl import evaluate, metrics  # pylint: disable=g-import-not-at-top

  failed = []
  bar = metrics.progress(jobs, desc="headline")
  for d, cmd in bar:
    bar.set_postfix_str(os.path.relpath(d, workdir))
    if os.path.exists(os.path.join(d, "DONE")):
      continue
    base_failed = any(f.startswith(os.path.dirname(d)) and f.endswith("sft_base") for f in failed)
    if base_failed:
      failed.append(d)
      continue
    os.makedirs(d, exist_ok=True)
    t0 = time.perf_counter()
    with open(os.path.join(d, "log.txt"), "w") as log:
      rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT,
                           env={**os.environ, "PYTHONPATH": os.getcwd()})
    if rc:
      failed.append(d)
      bar.write(f"FAILED ({rc}): {d}; see {d}/log.txt")
    else:
      with open(os.path.join(d, "DONE"), "w") as done:
        done.write(f"{time.perf_counter() - t0:.1f} s\n")
  runs = [r for r in evaluate.find_runs(workdir)
          if os.path.exists(os.path.join(r[0], "DONE"))]
  results = evaluate.evaluate_runs(runs, workdir, episodes=f.episodes, turns=4,
                                   batch=256, baselines=["oracle", "answer_now"])
  print(evaluate.table(results))
  print(f"results: {workdir}/results.md, plots/ and samples/")
  if failed:
    raise SystemExit(f"{len(failed)} run(s) failed: {failed}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
