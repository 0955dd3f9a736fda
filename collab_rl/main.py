"""The entry point: `python -m collab_rl.main --config experiments/x.py:variant --workdir DIR`.

Fields are overridden with `--config.field=value`; an unknown field is an error (the config is
locked). Multi-host runs pass `--distributed` (on Cloud TPU the coordinator is auto-detected;
elsewhere give `--coordinator_address`, `--num_processes` and `--process_id`, or the JAX_*
environment variables that `jax.distributed.initialize` reads).
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from absl import app, flags, logging
from ml_collections import config_flags

from collab_rl import config_names  # plain Python: touches no JAX before the flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def trainers() -> dict[str, Callable[..., dict[str, Any]]]:
  """`config.trainer` -> its entry point `(config, workdir) -> {"final": scalars, ...}`.

  Imported here rather than at the top so that nothing touches JAX before the flags are parsed
  and `jax.distributed.initialize` has run.
  """
  from collab_rl.data import engine
  from collab_rl.trainers import dpo, lm, mediator, ppo, reward_model, sft, sft_records, sim_sft

  return {
      "lm": lm.train,
      "ppo": ppo.train,
      "dpo": dpo.train,
      "sft": sft.train,
      "sft_records": sft_records.train,  # the language tier: CollabLLM records' conversations
      "reward_model": reward_model.train,
      "sim_sft": sim_sft.train,
      "mediator": mediator.train,
      # Not a trainer, but a job of the same shape: config in, dataset and metrics out.
      "data_engine": engine.run,
  }


def entry_point(name: str) -> Callable[..., dict[str, Any]]:
  table = trainers()
  if name not in table:
    raise ValueError(f"config.trainer={name!r} is not a known trainer; known: {sorted(table)}")
  return table[name]


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with config errors printed as one readable line instead of a traceback; an
older config name (`config_names.RENAMED`) is reported with the name it has now."""
  try:
    config_names.check_overrides(argv)
  except ValueError as e:
    sys.stderr.write(f"FATAL config error: {e}\n")
    sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    msg = str(e)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    msg = (f"bad config override among {overrides}: {type(e).__name__}: {e}. Field names and "
           "types are those of the config file; an unknown field is an error.")
  sys.stderr.write(f"FATAL config error: {msg}\n")
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Orbax narrates every save at INFO; keep its warnings and errors, drop the chatter.
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= logging.WARNING or "/orbax/" not in r.pathname)
  import jax  # after flag parsing, so that --jax_* flags and XLA_FLAGS take effect first
  from collab_rl import sharding  # pylint: disable=g-import-not-at-top

  if _DISTRIBUTED.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  config = _CONFIG.value
  try:  # a config file written with an older name: its new name, before anything runs
    config_names.check(config)
  except ValueError as e:
    raise app.UsageError(f"{_CONFIG.config_filename}: {e}") from None
  job = entry_point(config.trainer)
  logging.info("process %d/%d, %d devices (%d local), trainer %s", jax.process_index(),
               jax.process_count(), jax.device_count(), jax.local_device_count(), config.trainer)
  # The run's mesh in context: the model's activations keep their rows split over data x fsdp
  # (sharding.constrain_rows), so that XLA gathers fsdp-sharded weights, not the batch.
  try:
    mesh = sharding.make_mesh(config.mesh_shape) if "mesh_shape" in config else None
  except ValueError:
    mesh = None  # the trainer's own checks fail on it first, with the field named
  with jax.set_mesh(mesh):
    result = job(config, _WORKDIR.value)
  if jax.process_index() == 0:
    print({k: round(v, 4) for k, v in result.get("final", {}).items()})


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=parse_flags)
