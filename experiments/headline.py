"""The headline sweep: every arm of `experiments/collab_arms.py`, per task and seed, then one table.

  python -m experiments.headline --workdir runs/headline                       # README main job
  python -m experiments.headline --workdir runs/all --tasks ambig_math,doc_edit,code_spec \
      --seeds 0,1,2 --arms sft_base,ppo_helpfulness,ppo_ext,ppo_ext_int,ppo_mr_w1,ppo_mr_w2,\
ppo_mr_w3,dpo_online,data_engine,dpo_offline
  python -m experiments.headline --workdir runs/all --tasks ambig_math,doc_edit --seeds 0,1,2 \
      --arms sft_base,ppo_ext_int,ppo_mr_w2 --sweep w_int=0,0.1,0.25,0.5,1.0

Order per (task, seed): the SFT base first, then each arm from it (`init_from`), the data engine
before offline DPO (which reads its dataset). Each run is `python -m collab_rl.main` in a child
process, logging to `<run>/log.txt`, so a failed arm names its log and the others go on; a run
that finished before (`<run>/DONE`) is not repeated, and an interrupted one resumes from its
checkpoint. `--jobs N` runs N at a time on a many-core host, each child pinned to its own
share of the CPUs, every run waiting for the ones it needs. Children share a persistent JAX
compilation cache (`--compilation_cache`, by default `<workdir>/jax_cache`): the seeds of one
(task, arm) compile the same programs, so with `--jobs N` the later seeds wait for the first
seed's run to finish and then load its programs instead of compiling them again (at size full
on a GPU, compilation is most of a run's time); a (task, arm) with a run finished earlier waits
for nothing. `--print_only` prints the commands (what `launch/` turns into one job per arm on
Cloud TPU) without running them. Finally
`collab_rl.evaluate` plays the test episodes with every run and writes `results.json`,
`results.md`, plots and samples into the workdir (`--users` plays them against other users too).

`--sweep field=v1,v2,...` (`headline_sweep.py`) runs every RL arm once per value, in
`<task>/seed<k>/<arm>@field=<v>` with `--config.<field>=<v>`, all from the (task, seed)'s one
base, and plots each task's sweep into `plots/<task>_<field>_sweep.png`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from absl import app, flags, logging

from experiments import collab_arms, headline_sweep


def run_dir(workdir: str, task: str, seed: str, arm: str) -> str:
  return os.path.join(workdir, task, f"seed{seed}", arm)


def commands(workdir: str, tasks, seeds, arms, size: str, overrides=(),
             sweep: headline_sweep.Sweep | None = None) -> list[tuple[str, list[str]]]:
  """(run directory, argv) per run, in the order they must run; with `sweep`, every arm it
  sweeps once per value (`<arm>@<field>=<value>`), the value's override after `overrides`."""
  unknown = sorted(set(arms) - set(collab_arms.ARMS))
  if unknown:
    raise ValueError(f"unknown arms {unknown}; known: {collab_arms.ARMS}")
  if "dpo_offline" in arms and "data_engine" not in arms:
    raise ValueError("dpo_offline reads the data engine's dataset: add data_engine to --arms")
  order = ["sft_base"] + [a for a in collab_arms.ARMS if a != "sft_base" and a in arms]
  if sweep and tasks:
    headline_sweep.check(sweep, order, lambda arm: collab_arms.get_config(
        f"arm={arm},task={tasks[0]},size={size}"))
  out = []
  for task, seed, arm in ((t, s, a) for t in tasks for s in seeds for a in order):
    base = run_dir(workdir, task, seed, "sft_base")
    points = ([(f"{arm}@{sweep.tag(v)}", [sweep.override(v)]) for v in sweep.values]
              if sweep and headline_sweep.swept(arm) else [(arm, [])])
    for name, point in points:
      d = run_dir(workdir, task, seed, name)
      argv = [sys.executable, "-m", "collab_rl.main", "--workdir", d,
              f"--config=experiments/collab_arms.py:arm={arm},task={task},seed={seed},"
              f"size={size}"]
      if arm != "sft_base":
        argv.append(f"--config.init_from={base}/checkpoints")
        argv += list(overrides) if arm.startswith(("ppo", "dpo")) else []
      if arm == "mediator":  # the base is also the assistant it rewrites for
        argv.append(f"--config.assistant_from={base}/checkpoints")
      data = os.path.join(run_dir(workdir, task, seed, "data_engine"), "data")
      if arm == "data_engine":
        argv.append(f"--config.data_dir={data}")
      if arm == "dpo_offline":
        argv.append(f"--config.data_dir={data}")
      out.append((d, argv + point))
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
  flags.DEFINE_bool("evaluate", True, "Evaluate every finished run at the end (--noevaluate: "
                    "train only, e.g. to evaluate per task elsewhere).")
  flags.DEFINE_integer("jobs", 1, "Runs at a time (each pinned to its share of the CPUs); "
                       "a run starts once the runs it needs have finished.", lower_bound=1)
  flags.DEFINE_multi_string("override", [], "--config.x=y added to every RL arm.")
  flags.DEFINE_string("sweep", "", "field=v1,v2,...: every RL arm once per value, e.g. "
                      "w_int=0,0.1,0.25,0.5,1.0 (experiments/headline_sweep.py).")
  flags.DEFINE_string("users", "", "Users the evaluation plays (collab_rl/eval_users.py), e.g. "
                      "reactive,noisy,missing3,amb0.2,fresh; default: reactive, and sharded too "
                      "when --arms has the mediator.")
  flags.DEFINE_string("compilation_cache", "", "Persistent JAX compilation cache the runs share "
                      "(default <workdir>/jax_cache; 'none': no cache). JAX_COMPILATION_CACHE_DIR "
                      "in the environment wins.")


def needs(run: str) -> list[str]:
  """Runs that must have finished before `run` starts: the base of its (task, seed), and the
  data engine for offline DPO."""
  here, arm = os.path.split(run)
  arm = arm.split("@")[0]  # a sweep point needs what its arm needs
  if arm == "sft_base":
    return []
  return [os.path.join(here, "sft_base")] + (
      [os.path.join(here, "data_engine")] if arm == "dpo_offline" else [])


def warm_first(jobs: list[tuple[str, list[str]]]) -> dict[str, str]:
  """{run: the run it waits for}: every seed of a (task, arm) after the first waits for the first
  seed's run to end, so that it loads that run's compiled programs from the shared cache instead
  of compiling them alongside it. Only an order: the later seeds run even if the first failed.
  A (task, arm) with a finished run (`DONE`) already compiled its programs into the cache, so
  none of its seeds waits: a sweep that adds seeds does not queue them behind one another."""
  key_of = lambda d: (os.path.dirname(os.path.dirname(d)), os.path.basename(d))  # (task, arm)
  warm = {key_of(d) for d, _ in jobs if os.path.exists(os.path.join(d, "DONE"))}
  first, out = {}, {}
  for d, _ in jobs:
    key = key_of(d)
    if key in warm:
      continue
    if key in first:
      out[d] = first[key]
    else:
      first[key] = d
  return out


def cpu_groups(jobs: int) -> list[set[int] | None]:
  """Disjoint CPU sets, one per parallel job, so that N children (each sizing its XLA thread
  pool from its affinity) do not all spread over every core. None: no pinning (one job, or a
  platform without affinity)."""
  if jobs == 1 or not hasattr(os, "sched_getaffinity"):
    return [None] * jobs
  cpus = sorted(os.sched_getaffinity(0))
  if len(cpus) < jobs:
    raise ValueError(f"--jobs={jobs} is more than the {len(cpus)} CPUs this process may use")
  per = len(cpus) // jobs
  return [set(cpus[i * per:(i + 1) * per]) for i in range(jobs)]


def pinned(cmd: list[str], cpus: set[int] | None) -> list[str]:
  """`cmd` (a Python command) started on `cpus` only: the child sets its own affinity and then
  becomes the command (no `preexec_fn`, which forks a multithreaded parent unsafely)."""
  if cpus is None:
    return cmd
  boot = ("import os, sys; os.sched_setaffinity(0, %r); "
          "os.execv(sys.executable, [sys.executable] + sys.argv[1:])" % sorted(cpus))
  return [cmd[0], "-c", boot, *cmd[1:]]


def run_all(jobs: list[tuple[str, list[str]]], parallel: int, bar, env=None,
            after: dict[str, str] | None = None) -> list[str]:
  """Runs every job whose `DONE` marker is missing, up to `parallel` at a time, each after the
  runs it `needs`; a job whose dependency failed is not started. `after[run]` is a run that must
  have ended (finished or failed) before `run` starts. Children get `env` (default: this
  process's) with the working directory on PYTHONPATH. Returns the failed runs."""
  done = lambda d: os.path.exists(os.path.join(d, "DONE"))
  pending = [(d, cmd) for d, cmd in jobs if not done(d)]
  after = after or {}
  env = dict(os.environ if env is None else env)
  env["PYTHONPATH"] = os.pathsep.join(
      [os.getcwd()] + [p for p in [env.get("PYTHONPATH")] if p])
  bar.update(len(jobs) - len(pending))
  free, running, failed = cpu_groups(parallel), {}, []
  while pending or running:
    for d, cmd in list(pending):
      if not free:
        break
      if any(n in failed for n in needs(d)):
        failed.append(d)
        pending.remove((d, cmd))
        bar.write(f"SKIPPED: {d} (a run it needs failed)")
        bar.update()
        continue
      if not all(done(n) for n in needs(d)):
        continue
      if d in after and not (done(after[d]) or after[d] in failed):
        continue
      pending.remove((d, cmd))
      os.makedirs(d, exist_ok=True)
      cpus = free.pop()
      log = open(os.path.join(d, "log.txt"), "w")  # pylint: disable=consider-using-with
      proc = subprocess.Popen(pinned(cmd, cpus), stdout=log, stderr=subprocess.STDOUT, env=env)
      running[proc] = (d, time.perf_counter(), log, cpus)
      bar.set_postfix_str(", ".join(os.path.basename(r[0]) for r in running.values()))
    if not running:
      continue  # everything left waits on failed runs: the loop above drops them
    time.sleep(0.2)
    for proc in [p for p in running if p.poll() is not None]:
      d, t0, log, cpus = running.pop(proc)
      log.close()
      free.append(cpus)
      if proc.returncode:
        failed.append(d)
        bar.write(f"FAILED ({proc.returncode}): {d}; see {d}/log.txt")
      else:
        with open(os.path.join(d, "DONE"), "w") as f:
          f.write(f"{time.perf_counter() - t0:.1f} s\n")
      bar.update()
  return failed


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  workdir = os.path.abspath(f.workdir)
  logging.set_verbosity(logging.WARNING)  # the table, not Orbax's INFO narration of every read
  sweep = headline_sweep.parse(f.sweep)
  jobs = commands(workdir, f.tasks, f.seeds, f.arms, f.size, f.override, sweep)
  if f.print_only:
    for _, cmd in jobs:
      print(" ".join(cmd))
    return
  from collab_rl import eval_users, evaluate, metrics  # pylint: disable=g-import-not-at-top

  # Checked before hours of training, not after.
  users = eval_users.resolve([u for u in f.users.split(",") if u] if f.users else
                             evaluate.MODES if "mediator" in f.arms else ("reactive",))

  # Arm-major order: every base first, then each arm (in the order --arms lists them) over all
  # tasks and seeds, so that a sweep cut short has the first-listed arms everywhere (and a
  # swept arm its points in the order --sweep lists them: the sort is stable).
  rank = {a: i for i, a in enumerate(["sft_base"] + [a for a in f.arms if a != "sft_base"])}
  jobs.sort(key=lambda job: rank[os.path.basename(job[0]).split("@")[0]])
  env, after = dict(os.environ), {}
  cache = f.compilation_cache or os.path.join(workdir, "jax_cache")
  if cache != "none":
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(cache))
    if f.jobs > 1:
      after = warm_first(jobs)
  bar = metrics.progress(total=len(jobs), desc="headline")
  failed = run_all(jobs, f.jobs, bar, env=env, after=after)
  bar.close()
  if not f.evaluate:
    if failed:
      raise SystemExit(f"{len(failed)} run(s) failed: {failed}")
    return
  if cache != "none":  # the evaluation below compiles in this process
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_compilation_cache_dir", env["JAX_COMPILATION_CACHE_DIR"])
  runs = [r for r in evaluate.find_runs(workdir)
          if os.path.exists(os.path.join(r[0], "DONE"))]
  results = evaluate.evaluate_runs(runs, workdir, episodes=f.episodes, turns=4,
                                   batch=256, baselines=["oracle", "answer_now"], users=users)
  print(evaluate.table(results))
  print(f"results: {workdir}/results.md, plots/ and samples/")
  if sweep:
    # The value of a guess, as a next-turn reward pays it: the bases' score on ambiguous
    # requests after their first reply alone.
    bases = [r for r in runs if r[1] == "sft_base"]
    guess = evaluate.evaluate_runs(bases, os.path.join(workdir, "guess"), episodes=f.episodes,
                                   turns=1, batch=256) if bases else None
    for path in headline_sweep.write(results, sweep.name, workdir, guess):
      print(f"sweep: {path}")
  if failed:
    raise SystemExit(f"{len(failed)} run(s) failed: {failed}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
