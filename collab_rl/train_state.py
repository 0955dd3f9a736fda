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


def fresh_init_fn(model, tx: optax.GradientTransformation, seed: int) -> Callable[[], TrainState]:
  """The state a run starts from without a checkpoint: params from fold_in(key(seed), 0), the
  run's RNG from fold_in(key(seed), 1). Every trainer derives it this way, on every process."""
  def init_fn():
    key = jax.random.key(seed)
    return create(transformer.init_params(model, jax.random.fold_in(key, 0)), tx,
                  jax.random.fold_in(key, 1))

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


def update(state: TrainState, tx: optax.GradientTransformation, loss_fn):
  """One optimizer step on `loss_fn(params) -> (loss, aux)`, applied only if it is finite.

  Returns (state, loss, aux, {"grad_norm", "nonfinite"}). When the loss or the gradient norm is
  NaN or inf, the state comes back unchanged (step count included): selecting inside the jitted
  step keeps the old values even though the caller donates the state, so a bad update never
  exists outside it, let alone in a checkpoint. `nonfinite` (1.0 or 0.0) tells the host.
  """
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                      opt_state=opt_state)
  new = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, state)
  return new, loss, aux, {"grad_norm": grad_norm, "nonfinite": (~finite).astype(jnp.float32)}


def stop_if_nonfinite(trainer: str, step: int, nonfinite, checkpointer) -> None:
  """Raises NonFiniteError if the step's update was refused, once pending saves are complete."""
  if not float(nonfinite):
    return
  checkpointer.wait()
  raise NonFiniteError(
      f"{trainer} step {step}: the loss or gradient is NaN/inf, so the update was not applied "
      f"and the run stops. The last good checkpoint is step {checkpointer.latest_step()} in "
      f"{checkpointer.directory}.")

