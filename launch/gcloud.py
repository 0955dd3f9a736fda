"""The gcloud commands of a Cloud TPU job, as argv lists (nothing here runs them).

A job is one training run on one slice: a TPU VM (or a queued resource holding one node of the
same name), the code installed on every worker, and the same `python -m collab_rl.main` started
on all of them (`--worker=all`), each worker being one JAX process. The workdir is a GCS path, so
checkpoints outlive the VMs: a preempted job is deleted, created again and resumed.
"""

from __future__ import annotations

import dataclasses
import shlex

from experiments import pods

REMOTE_DIR = "collab_rl"  # on every worker, under the login user's home
REMOTE_ARCHIVE = "collab_rl.tar.gz"
REMOTE_VENV = "collab_rl_venv"
REMOTE_LOG = "collab_rl_run.log"
# libtpu comes with jax's `tpu` extra; gcsfs lets etils/Orbax open gs:// paths, and
# google-cloud-storage lets tensorboardX write event files there.
TPU_PACKAGES = ("jax[tpu]>=0.10.2,<0.11", "gcsfs", "google-cloud-storage")

# Node states (tpu-vm describe) and queued-resource states (queued-resources describe); any
# other state (CREATING, WAITING_FOR_RESOURCES, PROVISIONING, ...) is waited out.
UP_STATES = {"READY", "ACTIVE"}
LOST_STATES = {"PREEMPTED", "TERMINATED", "STOPPED", "SUSPENDING", "SUSPENDED", "FAILED"}


@dataclasses.dataclass(frozen=True)
class Job:
  name: str  # the TPU VM's name; also the queued resource's id when `queued`
  zone: str
  accelerator: pods.Slice | None  # None only to delete
  runtime_version: str
  config: str  # path[:arg], relative to the repository root
  workdir: str  # gs://...
  main_args: tuple[str, ...] = ()  # more collab_rl.main flags (--config.field=value ...)
  project: str | None = None
  spot: bool = False
  queued: bool = False
  # (local folder on every worker, gs:// source): copied there before each run (`stage_command`)
  stage: tuple[tuple[str, str], ...] = ()


def _where(job: Job) -> list[str]:
  return [f"--zone={job.zone}"] + ([f"--project={job.project}"] if job.project else [])


def _tpu_vm(job: Job, verb: str, *args: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, job.name, *_where(job), *args]


def _queued(job: Job, verb: str, *args: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", verb, job.name, *_where(job), *args]


def create(job: Job) -> list[str]:
  """Creates the VM now, or queues a request for it (which `describe` then watches)."""
  spot = ["--spot"] if job.spot else []
  if job.queued:
    return _queued(job, "create", f"--node-id={job.name}",
                   f"--accelerator-type={job.accelerator.accelerator_type}",
                   f"--runtime-version={job.runtime_version}", *spot)
  return _tpu_vm(job, "create", f"--accelerator-type={job.accelerator.accelerator_type}",
                 f"--version={job.runtime_version}", *spot)


def describe(job: Job) -> list[str]:
  """Prints one state word (see the *_STATES sets); fails when the resource does not exist."""
  if job.queued:
    return _queued(job, "describe", "--format=value(state.state)")
  return _tpu_vm(job, "describe", "--format=value(state)")


def delete(job: Job) -> list[str]:
  if job.queued:  # --force deletes the node first, whatever state the request is in
    return _queued(job, "delete", "--force", "--quiet")
  return _tpu_vm(job, "delete", "--quiet")


def copy_to_workers(job: Job, local_path: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local_path,
          f"{job.name}:{REMOTE_ARCHIVE}", "--worker=all", *_where(job)]


def on_workers(job: Job, command: str, worker: str = "all") -> list[str]:
  # Keep-alives: a training run is silent between log lines for minutes at a time.
  return _tpu_vm(job, "ssh", f"--worker={worker}", f"--command={command}",
                 "--ssh-flag=-o ServerAliveInterval=60")


def install_command(python: str = "3.11") -> str:
  """Unpacks the code shipped by `copy_to_workers` and installs it with TPU jax (every worker)."""
  # uv brings its own Python: TPU VM images ship 3.10 and collab_rl needs >= 3.11.
  uv = "$HOME/.local/bin/uv"
  steps = [
      f"rm -rf ~/{REMOTE_DIR}", f"mkdir -p ~/{REMOTE_DIR}",
      f"tar -xzf ~/{REMOTE_ARCHIVE} -C ~/{REMOTE_DIR}",
      "python3 -m pip install --quiet --user --upgrade uv",
      f"{uv} venv --quiet --allow-existing --python {python} ~/{REMOTE_VENV}",
      f"{uv} pip install --quiet --python ~/{REMOTE_VENV}/bin/python -e ~/{REMOTE_DIR} "
      + " ".join(shlex.quote(p) for p in TPU_PACKAGES),
  ]
  return " && ".join(steps)


def stage_command(job: Job) -> str:
  """Copies each staged gs:// folder onto the worker (rsync: a restart copies what is missing).
  What the library reads as local paths (Hugging Face folders, prepared records) gets there so."""
  return " && ".join(f"mkdir -p {shlex.quote(local)} && gcloud storage rsync --recursive "
                     f"{shlex.quote(source)} {shlex.quote(local)}" for local, source in job.stage)


def main_argv(job: Job) -> list[str]:
  """What every worker runs: one JAX process per host; initialize() finds the others itself."""
  return [f"~/{REMOTE_VENV}/bin/python", "-m", "collab_rl.main", f"--config={job.config}",
          f"--workdir={job.workdir}", "--distributed", *job.main_args]


def run_command(job: Job) -> str:
  """Starts training on a worker and streams its log; the exit status is python's."""
  python, *rest = main_argv(job)
  return (f"set -o pipefail; cd ~/{REMOTE_DIR} && {python} {shlex.join(rest)} 2>&1 "
          f"| tee -a ~/{REMOTE_LOG}")
