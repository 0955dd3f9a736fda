"""Orbax checkpoints: a run's own steps, each with its train state, data iterator state and config.

A step directory holds three items: `state` (the train state pytree), `data` (the data
iterator's JSON state, when there is one) and `config` (the run's config as JSON); a run with
LoRA adapters also `base`, where its frozen base comes from, which the state leaves out
(frozen_base.py). Where a run starts, and reading other runs' checkpoints: restore.py.

Every restore goes straight into the caller's shardings (`abstract_state` leaves are
`jax.ShapeDtypeStruct`s with `.sharding`), which may differ from those used when saving.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import os
import re
from typing import Any, TypeVar

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

from collab_rl import config_names
from collab_rl import frozen_base
from collab_rl import storage
from collab_rl.models import lora as lora_lib

State = TypeVar("State")
PyTree = Any

STATE, DATA, CONFIG, BASE = "state", "data", "config", "base"


class _QuietReadOnly:
  """Drops Orbax's warning that a manager opened to read is read-only: that is what we asked
  for, and evaluation opens one per run, burying the progress bar and any real warning."""

  def filter(self, record) -> bool:
    return not str(record.msg).startswith("Given directory is read only")


logging.get_absl_logger().addFilter(_QuietReadOnly())


def _handlers() -> dict[str, ocp.CheckpointHandler]:
  # Explicit handlers let a fresh manager read item metadata before any restore call.
  return {
      STATE: ocp.StandardCheckpointHandler(),
      DATA: ocp.JsonCheckpointHandler(),
      CONFIG: ocp.JsonCheckpointHandler(),
      BASE: ocp.JsonCheckpointHandler(),
  }


def read_only_manager(path: str) -> ocp.CheckpointManager:
  """Another run's checkpoints, opened to read its params only (no saves, no deletions)."""
  # Orbax restores absolute paths only; a relative one is taken from the working directory.
  path = storage.absolute(path)
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  # PyTreeCheckpointHandler (same on-disk format as Standard) for its `partial_restore`.
  handlers = {**_handlers(), STATE: ocp.PyTreeCheckpointHandler()}
  return ocp.CheckpointManager(path, options=options, item_handlers=handlers)


def _to_json(config: ml_collections.ConfigDict | Mapping | None) -> dict:
  """Best-effort JSON copy: anything JSON cannot hold becomes its repr."""
  if config is None:
    return {}
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())

  def fallback(obj):
    if isinstance(obj, (np.ndarray, np.generic, jax.Array)):
      return np.asarray(obj).tolist()
    if isinstance(obj, ml_collections.ConfigDict):
      return obj.to_dict()
    return repr(obj)

  return json.loads(json.dumps(dict(config), default=fallback))


# ---------------------------------------------------------------------------------------------
# Shape checks: Orbax's own error on a shape mismatch does not say which leaf.
# ---------------------------------------------------------------------------------------------


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
  """Leaf path ("opt_state/0/mu/w") -> shape, for every leaf that has a shape."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {
      "/".join(_key_name(k) for k in path): tuple(leaf.shape)
      for path, leaf in flat
      if getattr(leaf, "shape", None) is not None
  }


def check_against_metadata(abstract: PyTree, stored: PyTree, where: str) -> None:
  """Raises ValueError naming every leaf whose shape or presence differs from `stored`."""
  want, have = _flat_shapes(abstract), _flat_shapes(stored)
  problems = [f"  {k}: missing from the checkpoint" for k in sorted(set(want) - set(have))]
  problems += [
      f"  {k}: checkpoint has shape {have[k]}, expected {want[k]}"
      for k in sorted(want) if k in have and have[k] != want[k]
  ]
  problems += [f"  {k}: in the checkpoint, not expected" for k in sorted(set(have) - set(want))]
  layouts = [any(re.search(r"(^|/)layers/", k) for k in t) for t in (want, have)]
  if problems and layouts[0] != layouts[1]:
    stacked, unrolled = ("this run", "the checkpoint") if layouts[0] else ("the checkpoint",
                                                                            "this run")
    problems.append(f"  ({stacked} stacks the decoder layers under 'layers' "
                    f"(model.scan_layers=True), {unrolled} unrolls them (layers_0, ...): a run "
                    "resumes in the layout it started with; init_from converts between them)")
  if problems:
    raise ValueError(
        f"Checkpoint {where} does not match the expected state:\n" + "\n".join(problems))


def params_of(tree: PyTree) -> PyTree:
  return tree["params"] if isinstance(tree, Mapping) else tree.params


def with_params(tree: State, params: PyTree) -> State:
  if isinstance(tree, Mapping):
    return type(tree)({**tree, "params": params})
  return tree.replace(params=params)


# ---------------------------------------------------------------------------------------------
# Checkpointer
# ---------------------------------------------------------------------------------------------


class Checkpointer:
  """One run's checkpoints: saves every `save_interval_steps`, keeps the last `max_to_keep`."""

  @classmethod
  def for_run(cls, workdir: str, ckpt_config):
    """`<workdir>/checkpoints` with a trainer's `config.checkpoint` settings (`every_steps`,
    `max_to_keep`, `async_save`)."""
    return cls(os.path.join(str(workdir), "checkpoints"), max_to_keep=ckpt_config.max_to_keep,
               save_interval_steps=ckpt_config.every_steps,
               async_save=ckpt_config.async_save)

  def __init__(self, directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1,
               async_save: bool = True):
    # Checked here, before anything compiles: 0 would fail at the first save (interval) or keep
    # no checkpoint at all (max_to_keep), and a preempted run could then never resume.
    for name, value in {"max_to_keep": max_to_keep,
                        "save_interval_steps": save_interval_steps}.items():
      if value < 1:
        raise ValueError(f"checkpoint {name}={value} must be >= 1")
    directory = str(directory)
    # Orbax writes absolute paths only; a relative workdir means one below the current directory.
    self.directory = storage.absolute(directory)
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save,
        # The directory appears with the first save: a run that fails while restoring (a
        # checkpoint of another shape as init_from, say) leaves its workdir as it found it.
        create=False,
        # Preemption saves stay on; no forced save of the first step a run sees.
        save_decision_policy=ocp_managers.AnySavePolicy([
            ocp_managers.FixedIntervalPolicy(save_interval_steps),
            ocp_managers.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=ocp_managers.LatestN(n=max_to_keep),
        # Leftover `<step>.orbax-checkpoint-tmp-*` dirs of a killed run are never steps.
        cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_handlers=_handlers())
    # A run with adapters: where its frozen base comes from (frozen_base.py), set where the run
    # starts (`restore_or_init`); its saves then leave the frozen base out.
    self.frozen: dict | None = None

  def _step_dir(self, step: int) -> str:
    return f"{self.directory}/{step}"

  def save(self, step: int, state: PyTree, *, data_state: dict | None = None,
           config: ml_collections.ConfigDict | Mapping | None = None, force: bool = False) -> bool:
    """Starts a (possibly async) save; returns whether this step is saved."""
    step = int(step)
    if step in self._manager.all_steps():
      # A final forced save right after an interval save of the same step is not an error.
      logging.info("Checkpoint step %d already in %s, not saving again.", step, self.directory)
      return False
    items = {CONFIG: ocp.args.JsonSave(_to_json(config))}
    if self.frozen is not None and lora_lib.is_split(params_of(state)):
      state = with_params(state, frozen_base.strip(params_of(state), self.frozen["kept"]))
      items[BASE] = ocp.args.JsonSave(self.frozen)
    items[STATE] = ocp.args.StandardSave(state)
    if data_state is not None:
      items[DATA] = ocp.args.JsonSave(dict(data_state))
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("Saving checkpoint step %d to %s.", step, self.directory)
    return saved

  def due(self, step: int) -> bool:
    """Whether `save(step)` would save: the interval, or a preemption signal (on a multi-host
    run a collective: every process asks at the same point)."""
    return int(step) not in self._manager.all_steps() and self._manager.should_save(int(step))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def _resolve_step(self, step: int | None) -> int:
    self.wait()
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f"No finished checkpoint in {self.directory}.")
    if step not in self._manager.all_steps():
      raise FileNotFoundError(
          f"No checkpoint step {step} in {self.directory}; have {self.all_steps()}.")
    return step

  def restore(self, abstract_state: State, step: int | None = None) -> tuple[State, dict | None]:
    """Restores (state, data_state) into `abstract_state`'s shardings; latest step if None. A
    run with adapters whose checkpoint leaves its frozen base out gets the state as stored (the
    resume order rebuilds the base: restore.py), and `frozen` its record."""
    step = self._resolve_step(step)
    where = self._step_dir(step)
    stored = self._manager.item_metadata(step)
    check_against_metadata(abstract_state, stored[STATE].tree, where)
    items = {STATE: ocp.args.StandardRestore(abstract_state)}
    for name in (DATA, BASE):  # Json items have no metadata: only their presence counts.
      if name in stored.keys():
        items[name] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, FileNotFoundError) as e:
      raise ValueError(f"Restoring checkpoint {where} failed: {e}") from e
    if restored.get(BASE) is not None:
      self.frozen = dict(restored[BASE])  # its next saves name the same source
    logging.info("Restored checkpoint step %d from %s.", step, self.directory)
    return restored[STATE], restored.get(DATA)

  def stored_params(self, step: int | None = None) -> PyTree:
    """The params tree of checkpoint `step` as stored (metadata: shapes and dtypes)."""
    return self._manager.item_metadata(self._resolve_step(step))[STATE].tree.get("params")

  def restore_config(self, step: int | None = None) -> dict:
    return config_at(self._manager, self._resolve_step(step))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def config_at(manager: ocp.CheckpointManager, step: int) -> dict:
  """The config item alone of checkpoint `step` (no arrays are read), under today's names: a run
saved before a rename reads as if saved now (`config_names.upgrade`)."""
  saved = manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
  return config_names.upgrade(saved[CONFIG])
