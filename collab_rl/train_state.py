"""The train state every trainer carries: a pytree of step, params, optimizer state and RNG.

It holds no functions (the model and optimizer are static arguments of the jitted step), so Orbax
saves and restores it as plain arrays, into whatever sharding the restoring run asks for.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from collab_rl import sharding as sharding_lib
from collab_rl.models import lora as lora_lib
from collab_rl.models import transformer


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data (jax.random.key_data), so it checkpoints as an array

  @property
  def key(self) -> jax.Array:
    return jax.random.wrap_key_data(self.rng)


def create(params, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(key))


def fresh_params(model, seed: int) -> dict:
  """A run's fresh params: from fold_in(key(seed), 0) (`fresh_init_fn`; the frozen base of a
  run with adapters is rebuilt from them too, frozen_base.py)."""
  return transformer.init_params(model, jax.random.fold_in(jax.random.key(seed), 0))


def fresh_init_fn(model, tx: optax.GradientTransformation, seed: int,
                  lora_cfg: lora_lib.LoraConfig | None = None) -> Callable[[], TrainState]:
  """The state a run starts from without a checkpoint: params from fold_in(key(seed), 0), the
  run's RNG from fold_in(key(seed), 1). Every trainer derives it this way, on every process.
  With adapters (`lora_cfg.rank` > 0) the params are `{"base", "lora"}` (models/lora.py), the
  adapters drawn from fold_in(key(seed), 4)."""
  def init_fn():
    key = jax.random.key(seed)
    params = fresh_params(model, seed)
    if lora_cfg is not None and lora_cfg.enabled:
      params = lora_lib.split(params, lora_lib.init_adapters(params, lora_cfg,
                                                             jax.random.fold_in(key, 4)))
    return create(params, tx, jax.random.fold_in(key, 1))

  return init_fn


def state_shardings(abstract_state: TrainState, mesh: Mesh, rules) -> TrainState:
  """Params by the partition rules; optimizer moments follow the param they belong to.

  optax states mirror the params tree inside their own containers, so a leaf whose path ends with
  a param's path and has its shape gets that param's sharding; counts and the like replicate.
  """
  params_sh = sharding_lib.param_shardings(abstract_state.params, mesh, rules)
  by_path = {}
  for path, sh in jax.tree_util.tree_leaves_with_path(params_sh):
    by_path[sharding_lib.path_str(path)] = sh
  repl = NamedSharding(mesh, P())
  param_shapes = {sharding_lib.path_str(p): x.shape
                  for p, x in jax.tree_util.tree_leaves_with_path(abstract_state.params)}

  def opt_leaf(path, x):
    parts = sharding_lib.path_str(path).split("/")
    for i in range(len(parts)):  # longest suffix that names a param of the same shape
      name = "/".join(parts[i:])
      if name in by_path and x.shape == param_shapes[name]:
        return by_path[name]
    return repl

  opt_sh = jax.tree_util.tree_map_with_path(opt_leaf, abstract_state.opt_state)
  return TrainState(step=repl, params=params_sh, opt_state=opt_sh, rng=repl)


def init_sharded(init_fn: Callable[[], TrainState], mesh: Mesh, rules):
  """Builds the state directly in its shardings (no full copy on one device first).

  Returns (state_fn, abstract_state_with_shardings, shardings): `state_fn()` creates the state;
  the abstract state is what checkpoint restores target.
  """
  abstract = jax.eval_shape(init_fn)
  shardings = state_shardings(abstract, mesh, rules)
  abstract = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  return jax.jit(init_fn, out_shardings=shardings), abstract, shardings


class NonFiniteError(FloatingPointError):
  """A loss, gradient, reward or batch went NaN/inf; the run stopped before saving it."""


# The dropout keys' own branch of the state's RNG: trainers fold iteration numbers into it
# (`fold_in(state.key, it)`), which never reach this value.
DROPOUT_STREAM = 2**32 - 1


def update(state: TrainState, tx: optax.GradientTransformation, loss_fn, batch=None,
           microbatches: int = 1, weight_fn=None, dropout: bool = False):
  """One optimizer step, applied only if it is finite.

  `loss_fn(params) -> (loss, aux)`, or with `batch`, `loss_fn(params, batch)`; with `dropout`,
  `loss_fn(params, batch, key)`, the key fresh at every step (the step folded into the
  `DROPOUT_STREAM` branch of `state.key`, each microbatch folding in its index) for the
  model's dropout (models/lora.py). With `microbatches` > 1 the batch (a pytree of [B, ...]
  arrays) is split into that many slices of B / microbatches rows and their gradients are
  accumulated in a `lax.scan` inside this step, so that only one slice's activations are alive
  at a time. The slices are weighted by `weight_fn(slice)` (e.g. the tokens a masked-mean loss
  averages over; None: equally), which makes the accumulated loss, gradient and float aux those
  of the whole batch at once for a loss that is a weighted mean over its slice
  (tests/test_train_state.py checks it).

  Returns (state, loss, aux, {"grad_norm", "nonfinite"}). When the loss or the gradient norm is
  NaN or inf, the state comes back unchanged (step count included): selecting inside the jitted
  step keeps the old values even though the caller donates the state, so a bad update never
  exists outside it, let alone in a checkpoint. `nonfinite` (1.0 or 0.0) tells the host.
  """
  key = (jax.random.fold_in(jax.random.fold_in(state.key, DROPOUT_STREAM), state.step)
         if dropout else None)
  if batch is None:
    if microbatches != 1 or dropout:
      raise ValueError("microbatches > 1 and dropout need the batch passed to update()")
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  elif microbatches == 1:
    fn = loss_fn if key is None else lambda p, b: loss_fn(p, b, key)
    (loss, aux), grads = jax.value_and_grad(fn, has_aux=True)(state.params, batch)
  else:
    loss, aux, grads = accumulate(loss_fn, state.params, batch, microbatches, weight_fn, key)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                      opt_state=opt_state)
  new = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, state)
  return new, loss, aux, {"grad_norm": grad_norm, "nonfinite": (~finite).astype(jnp.float32)}


def split_microbatches(batch, microbatches: int):
  """Every [B, ...] leaf as [microbatches, B / microbatches, ...], slice i holding rows i,
  i + microbatches, ...: each device's contiguous block of rows then holds an equal part of
  every slice, so a slice runs on all the devices (a contiguous split would put it on few)."""
  def split(x):
    b = x.shape[0]
    if b % microbatches:
      raise ValueError(f"a batch of {b} rows does not split into {microbatches} microbatches")
    x = x.reshape(b // microbatches, microbatches, *x.shape[1:])
    return sharding_lib.constrain_rows(jnp.swapaxes(x, 0, 1), axis=1)
  return jax.tree_util.tree_map(split, batch)


def accumulate(loss_fn, params, batch, microbatches: int, weight_fn=None, key=None):
  """(loss, aux, grads) of `loss_fn(params, batch)` computed slice by slice (`update`); with a
  `key`, `loss_fn(params, batch, fold_in(key, slice))`."""
  sliced = split_microbatches(batch, microbatches)
  grad_fn = jax.value_and_grad(
      loss_fn if key is None else lambda p, b: loss_fn(p, b[0], jax.random.fold_in(key, b[1])),
      has_aux=True)
  if key is not None:
    sliced = (sliced, jnp.arange(microbatches))

  def body(carry, mb):
    (loss, aux), grads = grad_fn(params, mb)
    w = jnp.asarray(1.0 if weight_fn is None else weight_fn(mb if key is None else mb[0]),
                    jnp.float32)
    scaled = jax.tree_util.tree_map(lambda x: w * x.astype(jnp.float32), (loss, aux, grads))
    return jax.tree_util.tree_map(jnp.add, carry, (scaled, w)), None

  first = jax.tree_util.tree_map(lambda x: x[0], sliced)
  shapes = jax.eval_shape(lambda mb: grad_fn(params, mb), first)
  (loss0, aux0), grads0 = shapes
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.float32),
                                 (loss0, aux0, grads0))
  (total, w_sum), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), sliced)
  w_sum = jnp.maximum(w_sum, 1e-9) if weight_fn is not None else w_sum
  loss, aux, grads = jax.tree_util.tree_map(lambda x: x / w_sum, total)
  grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, params)
  aux = jax.tree_util.tree_map(lambda a, s: a.astype(s.dtype), aux, aux0)
  return loss, aux, grads


def stop_if_nonfinite(trainer: str, step: int, nonfinite, checkpointer) -> None:
  """Raises NonFiniteError if the step's update was refused, once pending saves are complete."""
  if not float(nonfinite):
    return
  checkpointer.wait()
  raise NonFiniteError(
      f"{trainer} step {step}: the loss or gradient is NaN/inf, so the update was not applied "
      f"and the run stops. The last good checkpoint is step {checkpointer.latest_step()} in "
      f"{checkpointer.directory}.")

