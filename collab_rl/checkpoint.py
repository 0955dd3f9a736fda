"""Orbax checkpoints: train state, data iterator state and config, and the resume order.

A step directory holds three items: `state` (the train state pytree), `data` (the data
iterator's JSON state, when there is one) and `config` (the run's config as JSON).
`restore_or_init` is the one place that decides where a run starts:

  1. the workdir's latest finished checkpoint (a restarted or preempted run),
  2. else `init_from`: only the params of another run's checkpoint (ablations that start
     from one common SFT policy), on top of a fresh state,
  3. else a fresh state.

Every restore goes straight into the caller's shardings (`abstract_state` leaves are
`jax.ShapeDtypeStruct`s with `.sharding`), which may differ from those used when saving.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import json
import os
from typing import Any, TypeVar

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

from collab_rl import config_names
from collab_rl import storage
from collab_rl.models import lora as lora_lib
from collab_rl.models import transformer

State = TypeVar("State")
PyTree = Any

_STATE, _DATA, _CONFIG = "state", "data", "config"


class _QuietReadOnly:
  """Drops Orbax's warning that a manager opened to read is read-only: that is what we asked
  for, and evaluation opens one per run, burying the progress bar and any real warning."""

  def filter(self, record) -> bool:
    return not str(record.msg).startswith("Given directory is read only")


logging.get_absl_logger().addFilter(_QuietReadOnly())


def _handlers() -> dict[str, ocp.CheckpointHandler]:
  # Explicit handlers let a fresh manager read item metadata before any restore call.
  return {
      _STATE: ocp.StandardCheckpointHandler(),
      _DATA: ocp.JsonCheckpointHandler(),
      _CONFIG: ocp.JsonCheckpointHandler(),
  }


def _read_only_manager(path: str) -> ocp.CheckpointManager:
  """Another run's checkpoints, opened to read its params only (no saves, no deletions)."""
  # Orbax restores absolute paths only; a relative one is taken from the working directory.
  path = storage.absolute(path)
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  # PyTreeCheckpointHandler (same on-disk format as Standard) for its `partial_restore`.
  handlers = {**_handlers(), _STATE: ocp.PyTreeCheckpointHandler()}
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


def _check_against_metadata(abstract: PyTree, stored: PyTree, where: str) -> None:
  """Raises ValueError naming every leaf whose shape or presence differs from `stored`."""
  want, have = _flat_shapes(abstract), _flat_shapes(stored)
  problems = [f"  {k}: missing from the checkpoint" for k in sorted(set(want) - set(have))]
  problems += [
      f"  {k}: checkpoint has shape {have[k]}, expected {want[k]}"
      for k in sorted(want) if k in have and have[k] != want[k]
  ]
  problems += [f"  {k}: in the checkpoint, not expected" for k in sorted(set(have) - set(want))]
  if problems:
    raise ValueError(
        f"Checkpoint {where} does not match the expected state:\n" + "\n".join(problems))


def _params_of(tree: PyTree) -> PyTree:
  return tree["params"] if isinstance(tree, Mapping) else tree.params


def _with_params(tree: State, params: PyTree) -> State:
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
    items = {_STATE: ocp.args.StandardSave(state), _CONFIG: ocp.args.JsonSave(_to_json(config))}
    if data_state is not None:
      items[_DATA] = ocp.args.JsonSave(dict(data_state))
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
    """Restores (state, data_state) into `abstract_state`'s shardings; latest step if None."""
    step = self._resolve_step(step)
    stored = self._manager.item_metadata(step)
    _check_against_metadata(abstract_state, stored[_STATE].tree, self._step_dir(step))
    items = {_STATE: ocp.args.StandardRestore(abstract_state)}
    if _DATA in stored.keys():  # Json items have no metadata: only their presence counts.
      items[_DATA] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, FileNotFoundError) as e:
      raise ValueError(f"Restoring checkpoint {self._step_dir(step)} failed: {e}") from e
    logging.info("Restored checkpoint step %d from %s.", step, self.directory)
    return restored[_STATE], restored.get(_DATA)

  def restore_config(self, step: int | None = None) -> dict:
    return _config_at(self._manager, self._resolve_step(step))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ---------------------------------------------------------------------------------------------
# init_from and the resume order
# ---------------------------------------------------------------------------------------------


def check_init_from(path: str | None) -> None:
  """Fails fast, before anything compiles, when `init_from` points at no finished checkpoint."""
  if not path:
    return
  if not epath.Path(path).exists():
    raise ValueError(f"init_from={path!r}: the path does not exist.")
  manager = _read_only_manager(path)
  try:
    if manager.latest_step() is None:
      hint = ""
      if (epath.Path(path) / _STATE).exists():
        hint = " It looks like one step's directory: give its parent (and a step) instead."
      raise ValueError(
          f"init_from={path!r}: no finished checkpoint there (expected the checkpoint "
          f"directory of an earlier run, holding numbered step directories).{hint}")
  finally:
    manager.close()


def _config_at(manager: ocp.CheckpointManager, step: int) -> dict:
  """The config item alone of checkpoint `step` (no arrays are read), under today's names: a run
saved before a rename reads as if saved now (`config_names.upgrade`)."""
  saved = manager.restore(step, args=ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore()}))
  return config_names.upgrade(saved[_CONFIG])


def read_config(path: str, step: int | None = None) -> dict:
  """The config saved with another run's checkpoint (latest step if None), read-only."""
  check_init_from(path)
  manager = _read_only_manager(path)
  try:
    return _config_at(manager, manager.latest_step() if step is None else int(step))
  finally:
    manager.close()


def _restore_params_and_step(path: str, abstract_params: PyTree,
                             step: int | None) -> tuple[PyTree, int]:
  # PyTreeRestore with partial_restore reads only the leaves named in the target, so the
  # old run's optimizer state (whatever its structure) is never needed.
  check_init_from(path)
  manager = _read_only_manager(path)
  try:
    step = manager.latest_step() if step is None else int(step)
    if step is None or step not in manager.all_steps():
      raise ValueError(f"init_from={path!r}: no finished checkpoint step {step} there.")
    where = f"{path}/{step}"
    target = {"params": abstract_params}
    try:
      stored = manager.item_metadata(step)[_STATE]
    except Exception as e:  # noqa: BLE001  (metadata is only for a clearer error message)
      logging.warning("Could not read metadata of %s: %s", where, e)
      stored = None
    if stored is not None:
      stored_tree = getattr(stored, "tree", stored)
      if "params" not in stored_tree:
        raise ValueError(f"Checkpoint {where} has no 'params' in its state.")
      _check_against_metadata(target, {"params": stored_tree["params"]}, where)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**{_STATE: ocp.args.PyTreeRestore(
          item=target, restore_args=restore_args, partial_restore=True)}))
    except (ValueError, FileNotFoundError) as e:
      raise ValueError(f"Restoring params from {where} failed: {e}") from e
  finally:
    manager.close()
  logging.info("Restored params from %s.", where)
  return restored[_STATE]["params"], step


def _stored_params(path: str) -> Mapping | None:
  """The params tree (metadata) of the latest checkpoint in `path`; None if unreadable."""
  check_init_from(path)
  manager = _read_only_manager(path)
  try:
    step = manager.latest_step()
    if step is None:
      return None
    stored = manager.item_metadata(step)[_STATE]
    return getattr(stored, "tree", stored).get("params")
  except Exception as e:  # noqa: BLE001  (the restore that follows names what is wrong)
    logging.warning("Could not read the params metadata of %s: %s", path, e)
    return None
  finally:
    manager.close()


def restore_policy(checkpoints: str, config: Mapping):
  """(model, params) of the run checkpointed in `checkpoints`, built from its saved `config`
  (`read_config`'s dict or a ConfigDict); a run that trained LoRA adapters gives its base with
  the adapters merged in, one plain model (models/lora.py)."""
  plain = lambda d: d.to_dict() if hasattr(d, "to_dict") else dict(d or {})
  model = transformer.Transformer(transformer.TransformerConfig.from_dict(plain(config["model"])))
  abstract = jax.eval_shape(lambda: transformer.init_params(model, jax.random.key(0)))
  lcfg = lora_lib.LoraConfig.from_dict(plain(config.get("lora")))
  if not lcfg.enabled:
    return model, restore_params(checkpoints, abstract)
  adapters = jax.eval_shape(lambda: lora_lib.init_adapters(abstract, lcfg, jax.random.key(0)))
  params = restore_params(checkpoints, lora_lib.split(abstract, adapters))
  return model, jax.jit(lambda p: lora_lib.weights(p, lcfg))(params)


def restore_params(path: str, abstract_params: PyTree, *, step: int | None = None) -> PyTree:
  """Reads only the params of the run checkpointed in `path`, into `abstract_params`' shardings.

  The stored params must match `abstract_params` leaf for leaf (no silent partial loads); the
  rest of the stored state (optimizer, step, rng) is never read.
  """
  return _restore_params_and_step(path, abstract_params, step)[0]


def restore_or_init(checkpointer: Checkpointer, abstract_state: State,
                    init_fn: Callable[[], State], *,
                    init_from: str | None = None) -> tuple[State, dict | None, str]:
  """Returns (state, data_state, how): resume, else params from `init_from`, else fresh."""
  step = checkpointer.latest_step()
  if step is not None:
    state, data_state = checkpointer.restore(abstract_state, step)
    how = f"resumed step {step}"
  elif init_from:
    target = _params_of(abstract_state)
    # A run with adapters (params {"base", "lora"}, models/lora.py) started from a run without
    # them: the stored params are its base, its adapters fresh. From a run with adapters (an
    # ablation from a base plus adapters) both are read. The fresh state is built after the
    # read, so that a checkpoint that does not fit fails before anything compiles.
    into_base = (lora_lib.is_split(target)
                 and not lora_lib.is_split(_stored_params(init_from)))
    params, from_step = _restore_params_and_step(
        init_from, target["base"] if into_base else target, None)
    fresh = init_fn()
    if into_base:
      params = {"base": params, "lora": _params_of(fresh)["lora"]}
    state, data_state = _with_params(fresh, params), None
    how = f"init_from {init_from} step {from_step}"
  else:
    state, data_state, how = init_fn(), None, "fresh"
  logging.info("Train state: %s.", how)
  return state, data_state, how
