"""The device mesh, parameter partition rules and batch placement.

One `jax.jit` over a `Mesh` with axes (data, fsdp, model) replaces `pmap`: batches are split over
data x fsdp, parameters by regex rules on their path. Meshes use `AxisType.Auto` so that XLA
inserts the collectives (explicit axes reject plain matmuls over sharded contracting dims).
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# Llama-family rules: the larger dim of each matrix over fsdp, the head/MLP dim over model.
# Paths are "/"-joined, e.g. "layers_3/self_attn/q_proj/kernel".
LLAMA_RULES: tuple[tuple[str, tuple], ...] = (
    (r"embed_tokens/embedding", ("model", "fsdp")),
    (r"self_attn/(q_proj|k_proj|v_proj)/kernel", ("fsdp", "model")),
    (r"self_attn/(q_proj|k_proj|v_proj)/bias", ("model",)),
    (r"self_attn/o_proj/kernel", ("model", "fsdp")),
    (r"mlp/(gate_proj|up_proj)/kernel", ("fsdp", "model")),
    (r"mlp/down_proj/kernel", ("model", "fsdp")),
    (r"lm_head/kernel", ("fsdp", "model")),
    # LoRA adapters (models/lora.py) split like the kernel they adapt: A [in, r] by its rows,
    # B [r, out] by its columns, the rank whole.
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/lora_a", ("fsdp", None)),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/lora_b", (None, "model")),
    (r"(o_proj|down_proj)/lora_a", ("model", None)),
    (r"(o_proj|down_proj)/lora_b", (None, "fsdp")),
    (r".*", ()),  # norms, heads' biases, scalars: replicated
)


def mesh_shape(shape: Sequence[int], num_devices: int | None = None) -> tuple[int, ...]:
  """Resolves one -1 entry so that the product is the device count; checks the rest."""
  n = jax.device_count() if num_devices is None else num_devices
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(AXES):
    raise ValueError(f"mesh shape {shape} must have {len(AXES)} entries for axes {AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one -1")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh shape {shape}: sizes must be positive (or one -1)")
  fixed = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n % fixed:
      raise ValueError(f"mesh shape {shape}: {n} devices are not divisible by {fixed}")
    shape = tuple(n // fixed if s == -1 else s for s in shape)
  if math.prod(shape) > n:
    raise ValueError(f"mesh shape {dict(zip(AXES, shape))} needs {math.prod(shape)} devices, "
                     f"but only {n} are available")
  if math.prod(shape) != n:
    raise ValueError(f"mesh shape {dict(zip(AXES, shape))} uses {math.prod(shape)} of {n} "
                     "devices; use -1 to fill or match the device count")
  return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[Any] | None = None) -> Mesh:
  devices = jax.devices() if devices is None else list(devices)
  resolved = mesh_shape(shape, len(devices))
  return jax.make_mesh(resolved, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
  dp = data_parallel_size(mesh)
  if batch_size <= 0 or batch_size % dp:
    raise ValueError(f"{what}={batch_size} must be a positive multiple of the data-parallel size "
                     f"{dp} (mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _spec_for(name: str, shape: tuple[int, ...], rules, mesh: Mesh) -> P:
  for pattern, axes in rules:
    if re.search(pattern, name):
      break
  else:
    return P()
  axes = tuple(axes)
  if not axes:
    return P()
  if len(axes) > len(shape):
    # Rules describe matrices; a lower-rank leaf matching them (e.g. a bias) stays replicated.
    return P()
  axes = (None,) * (len(shape) - len(axes)) + axes
  for dim, axis in zip(shape, axes):
    if axis is not None and dim % mesh.shape[axis]:
      raise ValueError(f"param {name} of shape {shape}: dim {dim} is not divisible by mesh axis "
                       f"{axis!r} of size {mesh.shape[axis]}; change the mesh or the rule")
  return P(*axes)


def param_specs(params_shape, rules=LLAMA_RULES, mesh: Mesh | None = None):
  """PartitionSpecs for a params pytree (arrays or ShapeDtypeStructs), first matching rule wins."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: _spec_for(path_str(path), tuple(x.shape), rules, mesh), params_shape)


def param_shardings(params_shape, mesh: Mesh, rules=LLAMA_RULES):
  specs = param_specs(params_shape, rules, mesh)
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading dim over data x fsdp, the rest replicated (valid for any rank >= 1)."""
  return NamedSharding(mesh, P(BATCH_AXES))


def constrain_rows(x: jax.Array, last: str | None = None, axis: int = 0) -> jax.Array:
  """`x`'s rows (dim `axis`) over data x fsdp (and its last dim over `last`, e.g. "model" for
  logits), under the mesh the caller set with `jax.set_mesh`; unchanged without one, and per dim
  where the mesh's ways do not divide it.

  Activations carry this so that XLA's partitioner all-gathers fsdp-sharded weights for a
  matmul, as FSDP means, instead of gathering the batch: without it, a [D, V] LM head sharded
  on D meets rows sharded on the same axis, and the compiled 8B PPO step on v5e-64 held the
  whole batch's logits on every chip (127 GiB of temporaries, experiments/memory_compiled.py).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(AXES) <= set(mesh.axis_names):
    return x
  ways = math.prod(mesh.shape[a] for a in BATCH_AXES)
  rows = BATCH_AXES if x.shape[axis] % ways == 0 else None
  tail = last if last and x.shape[-1] % mesh.shape[last] == 0 else None
  spec = [None] * x.ndim
  spec[axis] = rows
  if x.ndim > axis + 1:
    spec[-1] = tail
  return jax.lax.with_sharding_constraint(x, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate_host_shared(tree, sharding: NamedSharding):
  """`tree` replicated over `sharding`'s CPU devices, every device reading one host copy.

  `jax.device_put(x, replicated)` gives each XLA CPU host device its own copy, though they
  share one RAM: with 2 devices a batch-split decode step streams every weight twice through the
  same caches (measured on the 2-core box: greedy generation at batch 16 ~15% slower). A
  64-byte-aligned numpy array is taken zero-copy, so each device's shard aliases one buffer.
  Read-only use: never donate these arrays (every device would write into the same memory).
  """
  devices = sorted(sharding.addressable_devices, key=lambda d: d.id)
  if any(d.platform != "cpu" for d in devices):
    raise ValueError("replicate_host_shared is for CPU host devices; an accelerator holds its "
                     f"own copy in its own memory (got {devices[0].platform})")

  def put(x):
    x = np.asarray(x)
    buf = np.empty(x.size + 64 // x.itemsize, x.dtype)
    start = (-buf.ctypes.data % 64) // x.itemsize
    host = buf[start:start + x.size].reshape(x.shape)
    host[...] = x
    return jax.make_array_from_single_device_arrays(
        x.shape, sharding, [jax.device_put(host, d) for d in devices])

  return jax.tree_util.tree_map(put, tree)


def shard_batch(batch: Mapping[str, np.ndarray] | np.ndarray, mesh: Mesh):
  """Host batch -> global arrays split over data x fsdp.

  Each process passes only its own rows (its slice of the global batch); with one process that is
  the whole batch. `make_array_from_process_local_data` assembles the global array either way.
  """
  def put(x):
    x = np.asarray(x)
    sharding = batch_sharding(mesh)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)
  return jax.tree_util.tree_map(put, batch)


def to_host(tree):
  """Global arrays -> numpy arrays of their full value, on every process.

  `jax.device_get` cannot read an array split over other processes' devices (a batch-sharded
  evaluation output on a multi-host slice); those are all-gathered. A collective: every process
  must call it at the same point, as SPMD code does.
  """
  def get(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree_util.tree_map(get, tree)


def rules_from_config(rules) -> tuple[tuple[str, tuple], ...]:
  """Config rules are a list of [regex, [axis or None, ...]]; None means LLAMA_RULES."""
  if rules is None:
    return LLAMA_RULES
  out = []
  for i, rule in enumerate(rules):
    if len(rule) != 2:
      raise ValueError(f"partition rule {i} must be (regex, axes), got {rule!r}")
    pattern, axes = rule
    bad = [a for a in axes if a is not None and a not in AXES]
    if bad:
      raise ValueError(f"partition rule {i} ({pattern!r}) names unknown mesh axes {bad}; "
                       f"use {AXES}")
    re.compile(pattern)
    out.append((pattern, tuple(axes)))
  return tuple(out) + ((r".*", ()),)
