"""What the launcher works out on this machine, before anything is created in the cloud.

The config exactly as `collab_rl.main` will load it on the workers (file, variant, overrides),
checked against the slice: an unknown field, a mesh that does not use the slice's chips, a batch
that does not split over data x fsdp or over the hosts, and for the language tier a folder the
workers will not have (`check_folders`). And sweeps: a sweep file's arms turned into one job each.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Sequence
import warnings

from absl import flags as absl_flags
from ml_collections import config_flags

from collab_rl import config_names
from collab_rl.models import lora
from collab_rl.tasks import registry
from experiments import pods
from launch import gcloud

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")  # what GCP accepts as a TPU name


class LaunchError(Exception):
  """A bad flag or a failed step: printed as one line, exit status 2."""


def check_name(name: str, what: str = "--name") -> str:
  if not _NAME.fullmatch(name):
    raise LaunchError(f"{what}={name!r} is not a valid TPU name: lowercase letters, digits and "
                      "hyphens, starting with a letter, at most 63 characters")
  return name


def check_workdir(workdir: str) -> str:
  if not workdir.startswith("gs://"):
    raise LaunchError(f"--workdir={workdir!r} must be a gs:// path: the VMs' disks do not "
                      "survive preemption, and every worker must see the same checkpoints")
  return workdir


def load_config(config: str, main_args: Sequence[str]):
  """The config exactly as collab_rl.main will see it: file, variant and --config.* overrides."""
  path, _, _ = config.partition(":")
  if not os.path.exists(os.path.join(ROOT, path)):
    raise LaunchError(f"--config={config}: no file {path} in {ROOT}")
  argv = ["launch", f"--config={os.path.join(ROOT, config)}",
          *[a for a in main_args if a.startswith("--config.")]]
  try:
    config_names.check_overrides(argv)
  except ValueError as e:
    raise LaunchError(f"--config={config}: {e}") from None
  values = absl_flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  try:
    with warnings.catch_warnings():  # ml_collections loads the file with importlib's load_module
      warnings.simplefilter("ignore", DeprecationWarning)
      values(argv)
      return values.config
  except (absl_flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    detail = str(e).strip().splitlines()[-1]  # config-file errors arrive with their traceback
    if isinstance(e, (AttributeError, KeyError)):
      detail = f"no field {detail.strip(chr(34) + chr(39))!r} in the config"
    raise LaunchError(f"--config={config} with overrides {argv[2:]}: {detail}") from None


def mesh_args(mesh: str, accelerator: pods.Slice) -> list[str]:
  """--mesh as a config override: '' keeps the config's, '8b' is pods.policy_8b_mesh."""
  if not mesh:
    return []
  if mesh == "8b":
    shape = pods.policy_8b_mesh(accelerator)
  else:
    try:
      shape = tuple(int(x) for x in mesh.split(","))
    except ValueError:
      raise LaunchError(f"--mesh={mesh!r}: give data,fsdp,model (e.g. 4,64,1) or 8b") from None
    try:
      shape = pods.check_mesh(shape, accelerator)
    except ValueError as e:
      raise LaunchError(f"--mesh={mesh}: {e}") from None
  return [f"--config.mesh_shape=({','.join(map(str, shape))})"]


def parse_stage(spec: str) -> tuple[str, str]:
  """--stage=LOCAL=gs://SOURCE -> (LOCAL normalised, SOURCE)."""
  local, sep, source = spec.partition("=")
  if not sep or not source.startswith("gs://") or not os.path.isabs(local) or local == "/":
    raise LaunchError(f"--stage={spec!r}: give LOCAL=gs://SOURCE with an absolute folder LOCAL "
                      "(e.g. --stage=/tmp/llama31=gs://BUCKET/models/Llama-3.1-8B-Instruct)")
  return os.path.normpath(local), source.rstrip("/")


# What the language tier reads as local folders on every worker (safetensors and tokenizer.json:
# run.py, tasks/text.py, text_scores.py; prepared records: run_text.py), never from gs://.
TEXT_FOLDERS = ("init_from_hf", "tokenizer", "sim.user_from", "judge.folder", "data_dir")


def _field(config, dotted: str):
  for part in dotted.split("."):
    config = config.get(part) if config is not None else None
  return config


def check_folders(config, job: gcloud.Job) -> None:
  """A language-tier config's folders: set where the run needs them (the records, the user, the
  policy's tokenizer: init_from_hf's unless `tokenizer`, the judge when `reward.w_int` > 0), and
  on the workers, which start with only the code: under a folder `--stage` copies there."""
  if config.get("task") != registry.TEXT_TASK:
    return
  needed = {"data_dir", "sim.user_from"}
  if not config.get("tokenizer"):  # the policy's tokenizer is then init_from_hf's
    needed.add("init_from_hf")
  if (_field(config, "reward.w_int") or 0) > 0:
    needed.add("judge.folder")
  staged = [local for local, _ in job.stage]
  for name in TEXT_FOLDERS:
    value = _field(config, name)
    if not value:
      if name in needed:
        raise LaunchError(f"config.{name} is not set: {job.config} needs it on every worker "
                          f"(--stage=/tmp/NAME=gs://... and --config.{name}=/tmp/NAME)")
      continue
    if value.startswith("gs://"):
      local = "/tmp/" + value.rstrip("/").rsplit("/", 1)[-1]
      raise LaunchError(f"config.{name}={value!r}: the workers read it as a local folder, not "
                        f"from GCS; copy it there with --stage={local}={value} and pass "
                        f"--config.{name}={local}")
    path = os.path.normpath(value)
    if not any(path == local or path.startswith(local.rstrip("/") + "/") for local in staged):
      raise LaunchError(f"config.{name}={value!r} is not on the workers (a fresh TPU VM has only "
                        f"the code): give a folder under a --stage=LOCAL=gs://... "
                        f"(staged: {staged or 'none'})")


def check_job(job: gcloud.Job) -> None:
  """Config, mesh, batch and the language tier's folders against the slice, on this machine."""
  config = load_config(job.config, job.main_args)
  s = job.accelerator
  if "mesh_shape" in config:
    try:
      data, fsdp, _ = pods.check_mesh(config.mesh_shape, s)
    except ValueError as e:
      raise LaunchError(f"config.mesh_shape={tuple(config.mesh_shape)} of {job.config}: {e}")
    batch = config.get("batch_size")
    if batch is not None and batch % (data * fsdp):
      raise LaunchError(f"config.batch_size={batch} of {job.config} is not a multiple of data x "
                        f"fsdp = {data * fsdp} on {s.accelerator_type}")
    if batch is not None and batch % s.hosts:
      raise LaunchError(f"config.batch_size={batch} of {job.config} does not split over the "
                        f"{s.hosts} hosts of {s.accelerator_type}")
  if "lora" in config:
    try:
      lora.LoraConfig.from_dict(config.lora.to_dict())
    except ValueError as e:
      raise LaunchError(f"{job.config}: {e}") from None
  check_folders(config, job)


def load_sweep(spec: str) -> list[dict]:
  """`path.py[:arg]` whose get_sweep(arg) lists arms: {name, config, overrides: {field: value}}."""
  path, _, arg = spec.partition(":")
  full = os.path.join(ROOT, path)
  if not os.path.exists(full):
    raise LaunchError(f"--sweep={spec}: no file {path} in {ROOT}")
  module_spec = importlib.util.spec_from_file_location("collab_rl_sweep", full)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise LaunchError(f"--sweep={spec}: {path} defines no get_sweep(arg)")
  arms = module.get_sweep(arg or None)
  names = [a.get("name") for a in arms]
  if not arms or len(set(names)) != len(names):
    raise LaunchError(f"--sweep={spec}: arms need distinct names, got {names}")
  return arms


def sweep_jobs(base: gcloud.Job, arms: list[dict]) -> list[gcloud.Job]:
  jobs = []
  for arm in arms:
    name = check_name(f"{base.name}-{arm['name']}", what=f"--name + arm {arm['name']!r}")
    overrides = [f"--config.{k}={str(v).format(workdir=base.workdir)}"
                 for k, v in arm.get("overrides", {}).items()]
    jobs.append(dataclasses.replace(base, name=name, config=arm["config"],
                                    workdir=f"{base.workdir}/{arm['name']}",
                                    main_args=(*overrides, *base.main_args)))
  return jobs
