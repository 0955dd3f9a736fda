"""Where a run's params come from: the resume order, `init_from`, and other runs' params.

`restore_or_init` is the one place that decides where a run starts:

  1. the workdir's latest finished checkpoint (a restarted or preempted run),
  2. else `init_from`: only the params of another run's checkpoint (ablations that start
     from one common SFT policy), on top of a fresh state,
  3. else a fresh state.

`restore_params`, `restore_policy` and `read_config` read another run's checkpoint without
writing to it. A run with LoRA adapters stores its adapters and trained params but not its frozen
base (frozen_base.py); every read here rebuilds that base from the source its checkpoint names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp

from collab_rl import checkpoint as ckpt_lib
from collab_rl import frozen_base
from collab_rl import storage
from collab_rl.models import lora as lora_lib
from collab_rl.models import transformer

State = TypeVar("State")
PyTree = Any


def check_init_from(path: str | None) -> None:
  """Fails fast, before anything compiles, when `init_from` points at no finished checkpoint."""
  if not path:
    return
  if not epath.Path(path).exists():
    raise ValueError(f"init_from={path!r}: the path does not exist.")
  manager = ckpt_lib.read_only_manager(path)
  try:
    if manager.latest_step() is None:
      hint = ""
      if (epath.Path(path) / ckpt_lib.STATE).exists():
        hint = " It looks like one step's directory: give its parent (and a step) instead."
      raise ValueError(
          f"init_from={path!r}: no finished checkpoint there (expected the checkpoint "
          f"directory of an earlier run, holding numbered step directories).{hint}")
  finally:
    manager.close()


def read_config(path: str, step: int | None = None) -> dict:
  """The config saved with another run's checkpoint (latest step if None), read-only."""
  check_init_from(path)
  manager = ckpt_lib.read_only_manager(path)
  try:
    return ckpt_lib.config_at(manager, manager.latest_step() if step is None else int(step))
  finally:
    manager.close()


def _restore_params_and_step(path: str, abstract_params: PyTree,
                             step: int | None) -> tuple[PyTree, int]:
  # PyTreeRestore with partial_restore reads only the leaves named in the target, so the
  # old run's optimizer state (whatever its structure) is never needed. A target may also name
  # only some of a split tree's parts ({"base": ...}: the base of a run with adapters).
  check_init_from(path)
  manager = ckpt_lib.read_only_manager(path)
  try:
    step = manager.latest_step() if step is None else int(step)
    if step is None or step not in manager.all_steps():
      raise ValueError(f"init_from={path!r}: no finished checkpoint step {step} there.")
    where = f"{path}/{step}"
    stripped = False
    to_run_layout = lambda params: params
    target = {"params": abstract_params}
    try:
      stored = manager.item_metadata(step)[ckpt_lib.STATE]
    except Exception as e:  # noqa: BLE001  (metadata is only for a clearer error message)
      logging.warning("Could not read metadata of %s: %s", where, e)
      stored = None
    if stored is not None:
      stored_tree = getattr(stored, "tree", stored)
      if "params" not in stored_tree:
        raise ValueError(f"Checkpoint {where} has no 'params' in its state.")
      have = stored_tree["params"]
      # Without its frozen base, only what is stored is read; the base is rebuilt below.
      pruned, stripped = frozen_base.as_stored(abstract_params, have)
      if not stripped:  # layers read as the checkpoint holds them, then stacked or unstacked
        pruned, to_run_layout = _layer_layout(pruned, have)
      target = {"params": pruned}
      if lora_lib.is_split(have) and isinstance(abstract_params, Mapping):
        have = {k: have[k] for k in abstract_params if k in have}
      ckpt_lib.check_against_metadata(target, {"params": have}, where)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**{
          ckpt_lib.STATE: ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                 partial_restore=True)}))
    except (ValueError, FileNotFoundError) as e:
      raise ValueError(f"Restoring params from {where} failed: {e}") from e
    params = to_run_layout(restored[ckpt_lib.STATE]["params"])
    if stripped:
      record = manager.restore(step, args=ocp.args.Composite(
          **{ckpt_lib.BASE: ocp.args.JsonRestore()}))[ckpt_lib.BASE]
      params = {**params, "base": _rebuilt_base(
          record, ckpt_lib.config_at(manager, step), where, abstract_params["base"],
          params["base"])}
  finally:
    manager.close()
  logging.info("Restored params from %s.", where)
  return params, step


def _layer_layout(abstract: PyTree, have: PyTree) -> tuple[PyTree, Callable[[PyTree], PyTree]]:
  """`abstract` (a run's params, or a part of them) as the stored tree `have` holds the decoder
  layers, where the two differ (one stacks them under "layers", `model.scan_layers`, the other
  unrolls them as "layers_0", ...), and the function that brings what is restored into
  `abstract`'s layout and shardings: a base trained unrolled starts a scanned run and back."""
  if not isinstance(abstract, Mapping) or not isinstance(have, Mapping):
    return abstract, lambda params: params
  stack = "layers" in abstract and "layers_0" in have
  if not stack and not ("layers_0" in abstract and "layers" in have):
    parts = {k: _layer_layout(v, have.get(k)) for k, v in abstract.items()}
    return ({k: t for k, (t, _) in parts.items()},
            lambda params: {k: parts[k][1](v) for k, v in params.items()})
  shardings = jax.tree_util.tree_map(lambda x: getattr(x, "sharding", None), abstract)
  sharded = all(x is not None for x in jax.tree_util.tree_leaves(shardings))
  convert = ((lambda f: jax.jit(f, out_shardings=shardings)) if sharded else jax.jit)
  rest = {k: v for k, v in abstract.items() if not k.startswith("layers")}
  if stack:
    n = jax.tree_util.tree_leaves(abstract["layers"])[0].shape[0]
    one = jax.tree_util.tree_map(lambda x: _relayout_leaf(x, drop=True), abstract["layers"])
    target = {**rest, **{f"layers_{i}": one for i in range(n)}}
    return target, convert(lambda params: transformer.stack_layers(params, n))
  n = sum(1 for k in abstract if k.startswith("layers_"))
  layers = jax.tree_util.tree_map(lambda x: _relayout_leaf(x, n=n), abstract["layers_0"])
  return {**rest, "layers": layers}, convert(transformer.unstack_layers)


def _relayout_leaf(x, *, drop: bool = False, n: int = 0) -> jax.ShapeDtypeStruct:
  """A stacked leaf's one layer (`drop`), or `n` layers of a leaf stacked, with its sharding's
  spec less or more a leading whole axis."""
  shape = x.shape[1:] if drop else (n, *x.shape)
  sharding = getattr(x, "sharding", None)
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (len(x.shape) - len(sharding.spec))
    spec = spec[1:] if drop else (None, *spec)
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
  return jax.ShapeDtypeStruct(shape, x.dtype, sharding=sharding)


def _rebuilt_base(record: Mapping, config: Mapping, where: str, abstract_base: PyTree,
                  stored_base: PyTree) -> PyTree:
  """The whole base of a checkpoint (at `where`, saved with `config`) that stores only its
  trained part (`stored_base`): the frozen params rebuilt from the source its `base` item
  (`record`) names, checked against its fingerprint (frozen_base.py)."""
  source = record["source"]
  try:
    if source["kind"] == "init_from":
      base = base_params(source["path"], abstract_base, step=source["step"])
    else:
      base = frozen_base.fresh_base(config, abstract_base, source.get("init_from_hf"))
  except (ValueError, FileNotFoundError, OSError) as e:  # a source moved or deleted since
    raise ValueError(f"{where}: this LoRA checkpoint stores its adapters but not its frozen "
                     f"base, which it rebuilds from {frozen_base.describe(source)}; that "
                     f"failed: {e}") from e
  frozen_base.check(base, record, where)
  return frozen_base.graft(base, stored_base)


def base_params(path: str, abstract_base: PyTree, *, step: int | None = None) -> PyTree:
  """The base another run's checkpoint gives a run with adapters: its params (a run without
  adapters), else its own base (a run with them: the base it rebuilds, its critic trained)."""
  stored = _stored_params(path, step)
  if lora_lib.is_split(stored):
    return _restore_params_and_step(path, {"base": abstract_base}, step)[0]["base"]
  return _restore_params_and_step(path, abstract_base, step)[0]


def _stored_params(path: str, step: int | None = None) -> Mapping | None:
  """The params tree (metadata) of checkpoint `step` (the latest if None) in `path`; None if
  unreadable."""
  check_init_from(path)
  manager = ckpt_lib.read_only_manager(path)
  try:
    step = manager.latest_step() if step is None else int(step)
    if step is None:
      return None
    stored = manager.item_metadata(step)[ckpt_lib.STATE]
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


def restore_or_init(checkpointer: ckpt_lib.Checkpointer, abstract_state: State,
                    init_fn: Callable[[], State], *,
                    init_from: str | None = None, lora: lora_lib.LoraConfig | None = None,
                    init_from_hf: str | None = None) -> tuple[State, dict | None, str]:
  """Returns (state, data_state, how): resume, else params from `init_from`, else fresh (which
  `init_fn` may have loaded from the Hugging Face folder `init_from_hf`). With adapters
  (`lora`), the checkpointer's saves leave the frozen base out, naming where it came from
  (frozen_base.py): the folder absolute, so that a run read from another directory finds it."""
  step = checkpointer.latest_step()
  source = {"kind": "fresh", "init_from_hf": storage.absolute(init_from_hf) if init_from_hf
            else ""}
  if step is not None:
    # A run with adapters whose checkpoint leaves its frozen base out: read what it holds, then
    # rebuild the rest from the source it names.
    params = ckpt_lib.params_of(abstract_state)
    pruned, stripped = frozen_base.as_stored(params, checkpointer.stored_params(step))
    state, data_state = checkpointer.restore(ckpt_lib.with_params(abstract_state, pruned), step)
    if stripped:
      got = ckpt_lib.params_of(state)
      base = _rebuilt_base(checkpointer.frozen, checkpointer.restore_config(step),
                           f"{checkpointer.directory}/{step}", params["base"], got["base"])
      state = ckpt_lib.with_params(state, {**got, "base": base})
    how = f"resumed step {step}"
  elif init_from:
    target = ckpt_lib.params_of(abstract_state)
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
      params = {"base": params, "lora": ckpt_lib.params_of(fresh)["lora"]}
    state, data_state = ckpt_lib.with_params(fresh, params), None
    how = f"init_from {init_from} step {from_step}"
    source = {"kind": "init_from", "path": storage.absolute(init_from), "step": from_step}
  else:
    state, data_state, how = init_fn(), None, "fresh"
  params = ckpt_lib.params_of(state)
  if lora is not None and lora.enabled and step is None and lora_lib.is_split(params):
    kept = frozen_base.kept_paths(params["base"], lora)
    checkpointer.frozen = {"source": source, "kept": kept,
                           "fingerprint": frozen_base.fingerprint(params["base"], kept)}
  logging.info("Train state: %s.", how)
  return state, data_state, how
