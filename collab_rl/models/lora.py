"""LoRA (Hu et al., 2021) on the transformer's projection kernels, as a transform of param trees.

The adapters are a tree of their own, nested like the params, with `lora_a` [in, r] and `lora_b`
[r, out] where the base has `kernel` [in, out]:

    {"layers_0": {"self_attn": {"q_proj": {"lora_a": [D, r], "lora_b": [r, H*hd]}}}, ...}

(with `scan_layers`, under "layers" and stacked like the kernels: `lora_a` [L, D, r], ...)
and the policy's weights are `merge(base, adapters)`: every targeted kernel W becomes
W + (alpha / r) * A @ B (computed in fp32, cast to W's dtype), every other leaf is the base's own
array. So the base is held once and never trained: the train state holds only the adapters and
their optimizer state, the frozen reference policy is the base itself (no adapters: no second
copy), and an LM user or judge loaded from the same checkpoint can be handed the same arrays.
`lora_b` starts at zero, so a fresh adapter leaves the base's outputs unchanged. The sharding
rules (`sharding.LLAMA_RULES`) split A like its kernel's rows and B like its columns.

Why not qwix's LoRA (which Tunix uses): it intercepts each `dot_general`/`einsum` by module path
and adds its adapters there, but this model computes q/k/v and gate/up as one einsum over the
concatenated kernels (`layers.fused_projection`), so q_proj and k_proj could not be targeted
apart; and its adapters live inside the model's own params, next to the base weights, where a
donated train state would carry the base. A merge of two trees keeps the model untouched and the
targets regexes over the same paths as the sharding rules.

A run with adapters (`config.lora.rank` > 0) holds its params as one tree `{"base": ...,
"lora": ...}` (`split`), its model is `LoraModel` (the transformer behind a merge, with the base
behind `stop_gradient`), and its optimizer moves only the adapters (`trainable_only`). Every
`model.apply({"params": params}, ...)` of the trainers then works unchanged; the reference
policy is `reference(params)`: the same base arrays with no adapters.

Dropout on the adapters' input (`LoraConfig.dropout`, as PEFT's `lora_dropout`) needs the
unmerged form x W + dropout(x) A B: a training loss that passes a "dropout" RNG
(`model.apply(..., rngs=dropout_rngs(key))`; `train_state.update(dropout=True)` hands its loss a
fresh key every step) runs the transformer with the adapters in a "lora" variables collection
(`layers.Weights.lora_delta`) instead of merged. Without the RNG (rollouts, log-probs,
evaluation) or at dropout 0 the merged form runs, which equals the unmerged one up to float
rounding. With `scan_layers` the unmerged form always runs (no dropout without the RNG): the
scan would hold a merged tree whole, one stacked copy of every kernel and of its gradient.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from collab_rl import sharding

# Every projection matrix of the decoder layers (not the embedding, the LM or value heads).
DEFAULT_TARGETS = (r"self_attn/(q|k|v|o)_proj/kernel$", r"mlp/(gate|up|down)_proj/kernel$")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 0  # r; 0: no adapters (full fine-tuning)
  alpha: float = 16.0  # the update is scaled by alpha / r
  dropout: float = 0.0
  targets: tuple[str, ...] = DEFAULT_TARGETS  # regexes (re.search) over "layers_0/.../kernel"
  # Base params trained in full beside the adapters (regexes over their paths): PPO's critic,
  # a head the base checkpoint never trained (PEFT's `modules_to_save`).
  trainable: tuple[str, ...] = (r"^value_head/",)

  def __post_init__(self):
    if self.rank < 0:
      raise ValueError(f"lora.rank={self.rank} must be >= 0 (0: no adapters)")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"lora.dropout={self.dropout} must be in [0, 1)")
    for field in ("targets", "trainable"):
      for t in getattr(self, field):
        try:
          re.compile(t)
        except re.error as e:
          raise ValueError(f"lora.{field}: bad regex {t!r}: {e}") from None

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def from_dict(cls, d: dict | None) -> "LoraConfig":
    d = dict(d or {})
    for field in ("targets", "trainable"):
      if field in d:
        d[field] = tuple(d[field])
    return cls(**d)


def _is_kernel(path: str, shape) -> bool:
  """A projection matrix: 2-D, or 3-D under "layers/" (`scan_layers`: one per layer, stacked)."""
  return len(shape) == (3 if path.startswith("layers/") else 2)


def target_paths(params, cfg: LoraConfig) -> list[str]:
  """The kernels the adapters go on ("layers_0/self_attn/q_proj/kernel", ...; with
  `scan_layers`, "layers/self_attn/q_proj/kernel", stacked, one adapter per layer)."""
  out = [sharding.path_str(p) for p, x in jax.tree_util.tree_leaves_with_path(params)
         if _is_kernel(sharding.path_str(p), x.shape)
         and any(re.search(t, sharding.path_str(p)) for t in cfg.targets)]
  if not out:
    raise ValueError(f"lora.targets={list(cfg.targets)} match no kernel of the model "
                     "(its kernels are named like layers_0/self_attn/q_proj/kernel, or "
                     "layers/self_attn/q_proj/kernel with scan_layers)")
  return out


def _set(tree: dict, keys: Sequence[str], value) -> None:
  for k in keys[:-1]:
    tree = tree.setdefault(k, {})
  tree[keys[-1]] = value


def _get(tree, keys: Sequence[str]):
  for k in keys:
    tree = tree[k]
  return tree


def init_adapters(params, cfg: LoraConfig, key: jax.Array, dtype=jnp.float32) -> dict:
  """Fresh adapters for `params` (arrays or ShapeDtypeStructs): A ~ N(0, 1/in) (the
  fan-in scale of the kernel it adapts), B = 0. A stacked kernel [L, in, out] gets stacked
  adapters, [L, in, r] and [L, r, out]."""
  adapters: dict = {}
  for i, path in enumerate(target_paths(params, cfg)):
    keys = path.split("/")
    *lead, d_in, d_out = _get(params, keys).shape
    a = jax.random.normal(jax.random.fold_in(key, i), (*lead, d_in, cfg.rank),
                          dtype) / d_in ** 0.5
    _set(adapters, keys[:-1] + ["lora_a"], a)
    _set(adapters, keys[:-1] + ["lora_b"], jnp.zeros((*lead, cfg.rank, d_out), dtype))
  return adapters


def merge(base, adapters, cfg: LoraConfig):
  """The policy's params: the base with W + scale * A @ B on every adapted kernel. Leaves
  without an adapter are the base's own arrays (no copy)."""
  def visit(b, a):
    if not isinstance(b, dict):
      return b
    out = {}
    for k, v in b.items():
      sub = a.get(k) if isinstance(a, dict) else None
      if k == "kernel" and isinstance(a, dict) and "lora_a" in a:
        delta = jnp.einsum("...ir,...ro->...io", a["lora_a"].astype(jnp.float32),
                           a["lora_b"].astype(jnp.float32))
        out[k] = (v.astype(jnp.float32) + cfg.scale * delta).astype(v.dtype)
      else:
        out[k] = visit(v, sub) if sub is not None else v
    return out
  return visit(dict(base), adapters)


def count(adapters) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(adapters))


# ------------------------------------------------------------------------------------------------
# A run with adapters: params {"base", "lora"}, the model behind a merge, the optimizer on "lora".
# ------------------------------------------------------------------------------------------------


def is_split(params) -> bool:
  """A run-with-adapters tree (or its checkpoint metadata): exactly `{"base", "lora"}`."""
  return isinstance(params, Mapping) and set(params) == {"base", "lora"}


def split(base, adapters) -> dict:
  return {"base": base, "lora": adapters}


def reference(params) -> dict:
  """The frozen reference policy of a run with adapters: its base, no adapters (no copy)."""
  return {"base": params["base"], "lora": None}


def weights(params, cfg: "LoraConfig"):
  """The plain model's params of a split tree (base merged with its adapters; the base alone
  for `reference`'s tree); a plain tree unchanged."""
  if not is_split(params):
    return params
  if params["lora"] is None:
    return params["base"]
  return merge(_frozen_base(params["base"], cfg), params["lora"], cfg)


def trained_in_full(path: str, cfg: LoraConfig) -> bool:
  return any(re.search(t, path) for t in cfg.trainable)


def plain_params(model, params):
  """`params` as the plain transformer's: merged when `model` is a `LoraModel`."""
  return weights(params, model.lora) if isinstance(model, LoraModel) else params


def _frozen_base(base, cfg: LoraConfig):
  """The base with `stop_gradient` on everything but the params `cfg.trainable` names."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x if trained_in_full(sharding.path_str(p), cfg) else jax.lax.stop_gradient(x),
      base)


def scaled(adapters, cfg: LoraConfig) -> dict:
  """The adapters as the model's "lora" collection takes them: B scaled by alpha / r."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x * cfg.scale if sharding.path_str(p).endswith("lora_b") else x, adapters)


def dropout_rngs(key: jax.Array | None) -> dict | None:
  """`model.apply`'s rngs for a training loss's `key` (None: no dropout anywhere)."""
  return None if key is None else {"dropout": key}


def uses_dropout(model) -> bool:
  """Whether `model`'s training loss should get a dropout key (`train_state.update`)."""
  return isinstance(model, LoraModel) and model.lora.dropout > 0


class LoraModel:
  """The transformer with params `{"base", "lora"}`: `apply` merges them (the base never gets a
  gradient) and runs the model, or, given a "dropout" RNG and `dropout` > 0 (or always with
  `scan_layers`), runs it with the adapters unmerged and their input dropped (under the RNG);
  `cfg` and every other attribute are the transformer's."""

  def __init__(self, model, cfg: LoraConfig):
    self.model, self.lora = model, cfg
    self.unmerged = type(model)(dataclasses.replace(model.cfg, lora_dropout=cfg.dropout))

  def __getattr__(self, name):
    return getattr(self.model, name)

  def apply(self, variables, *args, rngs=None, **kwargs):
    params = variables["params"]
    dropout = bool(self.lora.dropout and rngs and "dropout" in rngs)
    # Scanned layers run unmerged too: a merged tree would be one stacked copy of every kernel
    # (and its gradient) that the scan holds whole, where x W + x A B merges nothing.
    if (dropout or self.model.cfg.scan_layers) and params["lora"] is not None:
      return self.unmerged.apply(
          {**variables, "params": _frozen_base(params["base"], self.lora),
           "lora": scaled(params["lora"], self.lora)}, *args, rngs=rngs, **kwargs)
    return self.model.apply({**variables, "params": weights(params, self.lora)}, *args,
                            rngs=rngs, **kwargs)


def trainable_only(tx: optax.GradientTransformation,
                   cfg: LoraConfig) -> optax.GradientTransformation:
  """`tx` on the adapters of a split tree and the base params `cfg.trainable` names; the rest of
  the base gets no update and no optimizer state."""
  def labels(params):
    base = jax.tree_util.tree_map_with_path(
        lambda p, _: "train" if trained_in_full(sharding.path_str(p), cfg) else "frozen",
        params["base"])
    return {"base": base, "lora": jax.tree_util.tree_map(lambda _: "train", params["lora"])}
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
