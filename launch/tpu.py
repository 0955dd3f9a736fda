"""Cloud TPU VM launcher (no Pathways): create, install, run, watch (resume on preemption), delete.

  python -m launch.tpu create --name=lm-v5e --zone=us-west4-a --accelerator=v5e-256 --spot
  python -m launch.tpu run    --name=lm-v5e --zone=us-west4-a --accelerator=v5e-256 \
      --config=experiments/lm_synthetic.py --workdir=gs://BUCKET/lm -- --config.batch_size=256
  python -m launch.tpu watch  ...same flags...   # create if needed, run, recreate + resume
  python -m launch.tpu delete --name=lm-v5e --zone=us-west4-a
  python -m launch.tpu sweep  --sweep=experiments/collab_arms_sweep.py --name=abl ...

Flags after `--` go to `python -m collab_rl.main` on every worker. `--stage=LOCAL=gs://SRC`
(repeatable) copies a GCS folder onto every worker before each run: what the library reads as
local folders (Hugging Face checkpoints, prepared records). `--dry-run` prints every
command (gcloud and local) instead of running it. The config and its overrides are loaded here
first, so that an unknown field, a mesh that does not fit the slice or a batch that does not split
over its hosts fails on this machine, before anything is created.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from typing import Callable, Sequence

from experiments import pods
from launch import checks
from launch import gcloud


# ------------------------------------------------------------------------------------------------
# Running commands (or printing them).
# ------------------------------------------------------------------------------------------------


class Shell:
  """Runs argv lists, streaming their output to `out`; with dry_run, prints them instead."""

  def __init__(self, dry_run: bool, out=None):
    self.dry_run = dry_run
    self.out = out or sys.stdout
    self._lock = threading.Lock()

  def say(self, line: str) -> None:
    with self._lock:
      self.out.write(line + "\n")
      self.out.flush()

  def run(self, argv: list[str], *, check: bool = True) -> int:
    self.say(shlex.join(argv) if self.dry_run else f"+ {shlex.join(argv)}")
    if self.dry_run:
      return 0
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
      self.say(line.rstrip("\n"))
    rc = proc.wait()
    if check and rc:
      raise checks.LaunchError(f"exit status {rc}: {shlex.join(argv)}")
    return rc

  def state(self, job: gcloud.Job) -> str | None:
    """The resource's state word, or None when it does not exist."""
    r = subprocess.run(gcloud.describe(job), capture_output=True, text=True)
    if r.returncode:
      return None
    return r.stdout.strip().upper() or None


def pack(shell: Shell, archive: str) -> None:
  """The working tree as git sees it (tracked + untracked, not ignored): what workers install."""
  shell.say(f"# pack the working tree (git ls-files) into {archive}")
  if shell.dry_run:
    return
  listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=checks.ROOT, capture_output=True, check=True).stdout
  files = listing.decode().split("\0")
  with tarfile.open(archive, "w:gz") as tar:
    for f in files:
      if f and os.path.isfile(os.path.join(checks.ROOT, f)):
        tar.add(os.path.join(checks.ROOT, f), arcname=f)


def wait_until_up(shell: Shell, job: gcloud.Job, poll_s: float) -> None:
  shell.say(f"# wait until {shlex.join(gcloud.describe(job))} prints READY or ACTIVE")
  if shell.dry_run:
    return
  while (state := shell.state(job)) not in gcloud.UP_STATES:
    if state is None or state in gcloud.LOST_STATES:
      raise checks.LaunchError(f"{job.name} is {state or 'gone'} while starting")
    time.sleep(poll_s)


def create(shell: Shell, job: gcloud.Job, poll_s: float) -> None:
  shell.run(gcloud.create(job))
  wait_until_up(shell, job, poll_s)


def install(shell: Shell, job: gcloud.Job, archive: str) -> None:
  """Ships `archive` (made by `pack`) to every worker and installs it there."""
  shell.run(gcloud.copy_to_workers(job, archive))
  shell.run(gcloud.on_workers(job, gcloud.install_command()))


def run(shell: Shell, job: gcloud.Job, *, check: bool = True) -> int:
  """The staged folders onto every worker (`--stage`), then training on all of them."""
  if job.stage:
    shell.run(gcloud.on_workers(job, gcloud.stage_command(job)))
  return shell.run(gcloud.on_workers(job, gcloud.run_command(job)), check=check)


def delete(shell: Shell, job: gcloud.Job) -> None:
  shell.run(gcloud.delete(job))


def watch(shell: Shell, job: gcloud.Job, archive: str, *, max_restarts: int, poll_s: float,
          delete_after: bool) -> None:
  """Until the run exits 0: (re)create, install, run; a lost VM is recreated and resumed."""
  if shell.dry_run:
    shell.say(f"# {shlex.join(gcloud.describe(job))}: create unless READY/ACTIVE")
    create(shell, job, poll_s)
    install(shell, job, archive)
    run(shell, job)
    shell.say(f"# on preemption (state in {sorted(gcloud.LOST_STATES)}), up to {max_restarts} "
              f"times: delete, create, install, run again; collab_rl.main resumes from "
              f"{job.workdir}/checkpoints")
    if delete_after:
      delete(shell, job)
    return
  restarts = 0
  while True:
    try:
      state = shell.state(job)
      if state in gcloud.LOST_STATES:
        delete(shell, job)
        state = None
      if state is None:
        create(shell, job, poll_s)
      elif state not in gcloud.UP_STATES:
        wait_until_up(shell, job, poll_s)
      install(shell, job, archive)
      rc = run(shell, job, check=False)
      failure = f"training exited {rc}"
    except checks.LaunchError as e:  # a step failed: the slice was lost under it, or a real error
      rc, failure = -1, str(e)
    if rc == 0:
      shell.say(f"# {job.name}: finished")
      break
    state = shell.state(job)
    if state in gcloud.UP_STATES:
      raise checks.LaunchError(f"{job.name}: {failure} on a healthy slice; not retrying "
                               f"(`run` resumes from {job.workdir} once fixed)")
    restarts += 1
    if restarts > max_restarts:
      raise checks.LaunchError(f"{job.name}: lost {restarts} times (last state {state}); "
                               "giving up")
    shell.say(f"# {job.name} is {state or 'gone'} ({failure}): restart {restarts}/{max_restarts}")
  if delete_after:
    delete(shell, job)


# ------------------------------------------------------------------------------------------------
# Sweeps: one job per arm.
# ------------------------------------------------------------------------------------------------


def run_sweep(shell: Shell, jobs: list[gcloud.Job], log_dir: str,
              job_fn: Callable[[Shell, gcloud.Job], None]) -> None:
  """Dry run: every arm's commands in turn. Otherwise: all arms at once, one log file each."""
  if shell.dry_run:
    for job in jobs:
      shell.say(f"# arm {job.name}: {job.config} -> {job.workdir}")
      job_fn(shell, job)
    return
  os.makedirs(log_dir, exist_ok=True)
  errors = {}

  def one(job):
    with open(os.path.join(log_dir, f"{job.name}.log"), "a", encoding="utf-8") as f:
      try:
        job_fn(Shell(False, f), job)
      except checks.LaunchError as e:
        errors[job.name] = str(e)
  threads = [threading.Thread(target=one, args=(job,)) for job in jobs]
  for t in threads:
    t.start()
  shell.say(f"# {len(jobs)} arms running; logs in {log_dir}/")
  for t in threads:
    t.join()
  if errors:
    raise checks.LaunchError("; ".join(f"{k}: {v}" for k, v in errors.items()))


# ------------------------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m launch.tpu", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--name", required=True, help="TPU VM name (sweeps: prefix of each arm's)")
  common.add_argument("--zone", required=True)
  common.add_argument("--project", default=None, help="default: gcloud's core/project")
  common.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                      help="print every command instead of running it")
  slice_flags = argparse.ArgumentParser(add_help=False)
  slice_flags.add_argument("--accelerator", required=True,
                           help="v4-64, v5litepod-256 (or v5e-256), v5p-128, v6e-64, ...")
  slice_flags.add_argument("--runtime_version", default=None, help="default: per generation")
  slice_flags.add_argument("--spot", action="store_true", help="Spot VMs (preemptible)")
  slice_flags.add_argument("--queued", action="store_true",
                           help="create through a queued resource (waits for capacity)")
  train = argparse.ArgumentParser(add_help=False)
  train.add_argument("--workdir", required=True, help="gs://... (sweeps: one folder per arm)")
  train.add_argument("--mesh", default="", help="data,fsdp,model or 8b (default: the config's)")
  train.add_argument("--stage", action="append", default=[], metavar="LOCAL=gs://SRC",
                     help="copy a GCS folder to LOCAL on every worker before each run "
                          "(repeatable): Hugging Face folders, prepared records")
  train.add_argument("main_args", nargs="*", help="after --: more collab_rl.main flags")
  loop = argparse.ArgumentParser(add_help=False)
  loop.add_argument("--max_restarts", type=int, default=20, help="recreations after preemption")
  loop.add_argument("--poll_s", type=float, default=30.0, help="seconds between state checks")
  loop.add_argument("--keep", action="store_true", help="keep the VM when the run is done")

  sub.add_parser("create", parents=[common, slice_flags], help="create the TPU VM")
  p = sub.add_parser("delete", parents=[common], help="delete the VM (or its queued resource)")
  p.add_argument("--queued", action="store_true", help="it was created as a queued resource")
  sub.add_parser("install", parents=[common, slice_flags], help="ship and install the code")
  p = sub.add_parser("run", parents=[common, slice_flags, train], help="run on all workers")
  p.add_argument("--config", required=True, help="experiments/x.py[:variant]")
  p = sub.add_parser("watch", parents=[common, slice_flags, train, loop],
                     help="create, install, run; recreate and resume after preemption")
  p.add_argument("--config", required=True, help="experiments/x.py[:variant]")
  p = sub.add_parser("sweep", parents=[common, slice_flags, train, loop],
                     help="one watched job per arm of a sweep")
  p.add_argument("--sweep", required=True, help="file.py[:arg] with get_sweep(arg)")
  p.add_argument("--log_dir", default="launch_logs", help="one log per arm (not in dry runs)")
  return parser.parse_args(argv)


def job_from_args(args: argparse.Namespace, config: str = "") -> gcloud.Job:
  s = None
  if getattr(args, "accelerator", None):
    try:
      s = pods.get_slice(args.accelerator)
    except ValueError as e:
      raise checks.LaunchError(f"--accelerator: {e}") from None
  main_args = tuple(getattr(args, "main_args", ()))
  if getattr(args, "mesh", ""):
    main_args = (*main_args, *checks.mesh_args(args.mesh, s))
  checks.check_name(args.name)
  workdir = getattr(args, "workdir", "")
  if "workdir" in args:
    checks.check_workdir(workdir)
  runtime = getattr(args, "runtime_version", None) or (s.runtime_version if s else "")
  return gcloud.Job(name=args.name, zone=args.zone, accelerator=s, runtime_version=runtime,
                    config=config, workdir=workdir, main_args=main_args,
                    project=args.project, spot=getattr(args, "spot", False), queued=args.queued,
                    stage=tuple(checks.parse_stage(x) for x in getattr(args, "stage", [])))


def main(argv: Sequence[str]) -> None:
  args = parse_args(argv)
  shell = Shell(args.dry_run)
  job = job_from_args(args, getattr(args, "config", ""))
  if args.command == "create":
    create(shell, job, poll_s=30.0)
    return
  if args.command == "delete":
    delete(shell, job)
    return
  jobs = [job]
  if args.command == "sweep":
    jobs = checks.sweep_jobs(job, checks.load_sweep(args.sweep))
  if args.command != "install":
    for j in jobs:  # every arm's config, before anything is created
      checks.check_job(j)
  if args.command == "run":
    run(shell, job)
    return
  with tempfile.TemporaryDirectory() as tmp:  # the code, packed once for every VM
    archive = os.path.join(tmp, gcloud.REMOTE_ARCHIVE)
    pack(shell, archive)
    if args.command == "install":
      install(shell, job, archive)
      return

    def job_fn(sh, j):
      watch(sh, j, archive, max_restarts=args.max_restarts, poll_s=args.poll_s,
            delete_after=not args.keep)
    run_sweep(shell, jobs, args.log_dir, job_fn) if args.command == "sweep" else job_fn(shell, job)


if __name__ == "__main__":
  try:
    main(sys.argv[1:])
  except checks.LaunchError as e:
    sys.stderr.write(f"launch.tpu: {e}\n")
    sys.exit(2)
