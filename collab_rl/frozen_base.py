"""The frozen base of a run with LoRA adapters, kept out of its checkpoints (models/lora.py).

With adapters a run's params are `{"base", "lora"}`, and all of the base but the params
`lora.trainable` names (PPO's critic) is the checkpoint the run started from and never changes.
For the 8B config with LoRA r = 32 that base is 29.9 of a step's 30.85 GiB (fp32 master weights),
written again in each step directory of a gs:// bucket. So a checkpoint of such a run stores the
base's trained params only (0.94 GiB there), and a JSON item says where the rest comes from:

  {"source": {"kind": "init_from", "path": P, "step": N}   another run's checkpoint step
           | {"kind": "fresh", "init_from_hf": F},   its seed's init, under folder F if any
   "kept": [the base's params stored in full],
   "fingerprint": {param: [sum, sum of squares]} of every frozen param}

Restoring (restore.py) rebuilds the frozen params from the source (a source that is itself
such a run rebuilds its own), checks them against the fingerprint, so that a source folder or
run overwritten since fails with the param it differs in instead of training on another base,
and puts the stored params over them. A checkpoint holding the whole base restores as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from collab_rl import sharding as sharding_lib
from collab_rl import train_state as state_lib
from collab_rl.models import hf as hf_lib
from collab_rl.models import lora as lora_lib
from collab_rl.models import transformer

# Fingerprints are sums in fp32 over differently sharded arrays: the order of the additions may
# differ between the run that wrote them and the one that reads them.
RTOL = 1e-4


def paths(tree) -> list[str]:
  return [sharding_lib.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def kept_paths(base, lcfg: lora_lib.LoraConfig) -> list[str]:
  """The base params a run with adapters trains in full (`lora.trainable`): what it stores."""
  return [p for p in paths(base) if lora_lib.trained_in_full(p, lcfg)]


def prune(tree: Mapping, keep: Sequence[str]) -> dict:
  """The nested dict `tree` with only the leaves at `keep` (empty branches dropped)."""
  keep = set(keep)

  def visit(node, prefix):
    if not isinstance(node, Mapping):
      return node if prefix in keep else None
    out = {}
    for k, v in node.items():
      sub = visit(v, f"{prefix}/{k}" if prefix else str(k))
      if sub is not None and not (isinstance(sub, dict) and not sub):
        out[k] = sub
    return out

  return visit(tree, "")


def strip(params: Mapping, keep: Sequence[str]) -> dict:
  """A split tree as its checkpoint holds it: the adapters and the base's `keep` params."""
  return {"base": prune(params["base"], keep), "lora": params["lora"]}


def is_stripped(stored_base, base) -> bool:
  """Whether a checkpoint's base (its metadata tree) lacks some of `base`'s params."""
  return bool(set(paths(base)) - set(paths(stored_base)))


def as_stored(params, stored) -> tuple[Any, bool]:
  """`params` (a target tree: split, or only its `{"base"}`) cut to what a checkpoint whose
  params are `stored` (metadata) holds, and whether that checkpoint leaves its frozen base out;
  else `params` as they are."""
  if not (isinstance(params, Mapping) and "base" in params and lora_lib.is_split(stored)
          and is_stripped(stored["base"], params["base"])):
    return params, False
  return {**params, "base": prune(params["base"], paths(stored["base"]))}, True


def graft(base, stored: Mapping):
  """`base` with every param `stored` (a pruned tree) holds taken from it."""
  flat = {sharding_lib.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(stored)}
  return jax.tree_util.tree_map_with_path(
      lambda p, x: flat.get(sharding_lib.path_str(p), x), base)


@jax.jit
def _sums(leaves):
  return [jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.square(x.astype(jnp.float32)))])
          for x in leaves]


def fingerprint(base, keep: Sequence[str]) -> dict[str, list[float]]:
  """{param: [sum, sum of squares]} of every param of `base` not in `keep` (the frozen ones)."""
  keep = set(keep)
  flat = [(sharding_lib.path_str(p), x) for p, x in jax.tree_util.tree_leaves_with_path(base)]
  frozen = [(p, x) for p, x in flat if p not in keep]
  sums = jax.device_get(_sums([x for _, x in frozen]))
  return {p: [float(s[0]), float(s[1])] for (p, _), s in zip(frozen, sums)}


def check(base, record: Mapping, where: str) -> None:
  """Raises ValueError naming the frozen params of `base` that differ from `record`'s
  fingerprint: the source the checkpoint at `where` was trained on has changed."""
  have = fingerprint(base, record["kept"])
  want = record["fingerprint"]
  bad = sorted(set(want) ^ set(have))
  bad += [p for p in sorted(set(want) & set(have))
          if not np.allclose(have[p], want[p], rtol=RTOL, atol=1e-6)]
  if bad:
    shown = ", ".join(f"{p} (sum {have.get(p, ['-'])[0]} against {want.get(p, ['-'])[0]})"
                      for p in bad[:3])
    raise ValueError(
        f"{where}: this LoRA checkpoint stores its adapters but not its frozen base, which it "
        f"rebuilds from {describe(record['source'])}; that base is not the one it was trained "
        f"on: {len(bad)} param(s) differ, e.g. {shown}. Restore the source as it was.")


def describe(source: Mapping) -> str:
  if source["kind"] == "init_from":
    return f"init_from={source['path']} step {source['step']}"
  if source.get("init_from_hf"):
    return f"init_from_hf={source['init_from_hf']} over the run's seed's initialisation"
  return "the run's seed's initialisation"


def overlay_hf(params, folder: str, dtype: str, mesh, rules):
  """`params` (a plain tree) with the Hugging Face folder's weights wherever it has them, each
  in its param's sharding and dtype; the rest (heads the folder lacks) as they are. Stacked
  layers in `params` (`scan_layers`) are read stacked."""
  _, loaded = hf_lib.load_pretrained(folder, dtype=dtype, mesh=mesh, rules=rules,
                                     scan_layers="layers" in params)
  loaded = {sharding_lib.path_str(p): x
            for p, x in jax.tree_util.tree_flatten_with_path(loaded)[0]}

  def take(p, x):
    name = sharding_lib.path_str(p)
    if name not in loaded:
      return x
    return jax.device_put(loaded[name], x.sharding).astype(x.dtype)

  return jax.tree_util.tree_map_with_path(take, params)


def fresh_base(config: Mapping, abstract_base, folder: str | None = None) -> Any:
  """The base a run without `init_from` starts from, rebuilt from its saved `config` into
  `abstract_base`'s shardings: its seed's initialisation (`train_state.fresh_init_fn`), under
  the weights of its Hugging Face folder (`folder`, else the config's `init_from_hf`) where it
  has one."""
  plain = lambda d: d.to_dict() if hasattr(d, "to_dict") else dict(d or {})
  mcfg = transformer.TransformerConfig.from_dict(plain(config["model"]))
  model = transformer.Transformer(mcfg)
  shardings = jax.tree_util.tree_map(lambda x: getattr(x, "sharding", None), abstract_base)
  if any(s is None for s in jax.tree_util.tree_leaves(shardings, is_leaf=lambda s: s is None)):
    shardings = None  # unsharded targets (evaluation): the default device
  seed = int(config["seed"])
  base = jax.jit(lambda: state_lib.fresh_params(model, seed), out_shardings=shardings)()
  folder = folder or config.get("init_from_hf")
  if folder:
    leaf = jax.tree_util.tree_leaves(base)[0]
    mesh = getattr(leaf.sharding, "mesh", None)
    rules = sharding_lib.rules_from_config(config.get("partition_rules"))
    base = overlay_hf(base, folder, mcfg.param_dtype, mesh, rules)
  return base
