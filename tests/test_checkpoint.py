"""Tests for collab_rl.checkpoint: roundtrips, resharding, init_from and the resume order."""

import os

import flax
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding
import ml_collections
import numpy as np
import optax
import pytest

from collab_rl import checkpoint
from collab_rl import restore as restore_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  rng: jax.Array


def _params(seed: int = 0) -> dict:
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"dense": {"w_DxF": jax.random.normal(k1, (8, 4)), "b_F": jax.random.normal(k2, (4,))}}


def _state(tx=None, seed: int = 0, step: int = 0) -> TrainState:
  tx = tx or optax.adam(1e-3)
  params = _params(seed)
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)))


def _abstract(state, sharding_fn):
  """ShapeDtypeStructs of `state`, each with the sharding `sharding_fn(leaf)` gives."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(x)),
      jax.eval_shape(lambda: state))


def _single(_):
  return SingleDeviceSharding(jax.devices()[0])


def _assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_roundtrip_state_data_config(tmp_path):
  state = _state(step=5)
  config = ml_collections.ConfigDict({"lr": 1e-3, "model": {"layers": 2}, "shape": (2, 4)})
  data_state = {"next_index": 12, "worker": "a"}
  with checkpoint.Checkpointer(str(tmp_path / "ckpt"), async_save=True) as ckpt:
    assert ckpt.save(5, state, data_state=data_state, config=config)
    ckpt.wait()
    assert ckpt.latest_step() == 5
    restored, restored_data = ckpt.restore(_abstract(state, _single))
    assert isinstance(restored, TrainState)
    _assert_trees_equal(restored, state)
    assert restored_data == data_state
    assert ckpt.restore_config() == {"lr": 1e-3, "model": {"layers": 2}, "shape": [2, 4]}


def test_async_save_survives_donation(tmp_path):
  """Trainers donate the state to the next step right after `save` returns."""
  state = _state(step=2)
  expected = jax.device_get(state)
  with checkpoint.Checkpointer(str(tmp_path), async_save=True) as ckpt:
    ckpt.save(2, state)
    jax.tree.map(lambda x: x.delete(), state)  # What donation does to the buffers.
    restored, _ = ckpt.restore(_abstract(expected, _single))
  _assert_trees_equal(restored, expected)


def test_no_data_state_restores_none(tmp_path):
  state = _state()
  with checkpoint.Checkpointer(str(tmp_path), async_save=False) as ckpt:
    ckpt.save(1, state)
    assert ckpt.restore(_abstract(state, _single))[1] is None


def test_interval_max_to_keep_and_force(tmp_path):
  state = _state()
  with checkpoint.Checkpointer(str(tmp_path), max_to_keep=2, save_interval_steps=2) as ckpt:
    saved = [ckpt.save(s, state) for s in range(1, 8)]
    assert saved == [False, True, False, True, False, True, False]
    assert ckpt.save(7, state, force=True)
    assert not ckpt.save(7, state, force=True)  # Same step again: skipped, not an error.
    ckpt.wait()
    assert ckpt.all_steps() == [6, 7]
  assert sorted(os.listdir(tmp_path)) == ["6", "7"]


def test_stale_tmp_dir_is_not_latest(tmp_path):
  state = _state()
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(3, state)
  # What a run killed mid-save leaves behind: must not count as a checkpoint.
  (tmp_path / "9.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.latest_step() == 3


def test_restore_into_other_shardings(tmp_path):
  mesh8 = jax.make_mesh((8,), ("data",))
  state = _state()
  # Rows of the 2-D weight (and its Adam moments) over 8 devices, the rest replicated.
  row_sharded = lambda x: NamedSharding(mesh8, P("data") if x.ndim == 2 else P())
  state = jax.device_put(state, jax.tree.map(row_sharded, state))
  assert len(state.params["dense"]["w_DxF"].sharding.device_set) == 8
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, state)
    ckpt.wait()

    restored, _ = ckpt.restore(_abstract(state, _single))
    _assert_trees_equal(restored, state)
    assert restored.params["dense"]["w_DxF"].sharding == _single(None)

    mesh24 = jax.make_mesh((2, 4), ("fsdp", "model"))
    col_sharded = lambda x: NamedSharding(mesh24, P(None, "model") if x.ndim == 2 else P())
    restored, _ = ckpt.restore(_abstract(state, col_sharded))
    _assert_trees_equal(restored, state)
    w = restored.params["dense"]["w_DxF"]
    assert w.sharding.spec == P(None, "model") and w.sharding.mesh.devices.shape == (2, 4)


def test_shape_mismatch_names_leaf(tmp_path):
  state = _state()
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, state)
    abstract = _abstract(state, _single)
    bad = abstract.replace(params={"dense": {
        "w_DxF": jax.ShapeDtypeStruct((8, 6), jnp.float32, sharding=_single(None)),
        "b_F": abstract.params["dense"]["b_F"]}})
    with pytest.raises(ValueError, match=r"params/dense/w_DxF.*\(8, 4\).*\(8, 6\)") as err:
      ckpt.restore(bad)
    assert str(tmp_path) in str(err.value)


def test_restore_params_with_other_optimizer(tmp_path):
  old = str(tmp_path / "sft")
  saved = _state(optax.adam(1e-3), seed=1, step=40)
  with checkpoint.Checkpointer(old) as ckpt:
    ckpt.save(40, saved)
  new = _state(optax.sgd(0.1), seed=2)
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  sharding = lambda x: NamedSharding(mesh, P("data") if x.ndim == 2 else P())
  params = restore_lib.restore_params(old, _abstract(new, sharding).params)
  _assert_trees_equal(params, saved.params)
  assert params["dense"]["w_DxF"].sharding.spec == P("data")

  wider = {"dense": {**_abstract(new, _single).params["dense"],
                     "v_F": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=_single(None))}}
  with pytest.raises(ValueError, match=r"(?s)sft/40.*params/dense/v_F: missing"):
    restore_lib.restore_params(old, wider)


def test_restore_or_init_order(tmp_path):
  sft_dir, run_dir = str(tmp_path / "sft"), str(tmp_path / "run")
  sft = _state(seed=1, step=9)
  with checkpoint.Checkpointer(sft_dir) as ckpt:
    ckpt.save(9, sft)
  fresh = _state(optax.sgd(0.1), seed=2)
  abstract = _abstract(fresh, _single)
  init_fn = lambda: fresh

  with checkpoint.Checkpointer(run_dir) as ckpt:
    state, data_state, how = restore_lib.restore_or_init(ckpt, abstract, init_fn)
    assert how == "fresh" and data_state is None
    _assert_trees_equal(state, fresh)

    state, data_state, how = restore_lib.restore_or_init(ckpt, abstract, init_fn, init_from=sft_dir)
    assert how == f"init_from {sft_dir} step 9" and data_state is None
    _assert_trees_equal(state.params, sft.params)
    _assert_trees_equal(state.opt_state, fresh.opt_state)
    assert int(state.step) == 0

    ckpt.save(3, state.replace(step=jnp.asarray(3, jnp.int32)), data_state={"pos": 3})
    state, data_state, how = restore_lib.restore_or_init(ckpt, abstract, init_fn, init_from=sft_dir)
    assert how == "resumed step 3" and data_state == {"pos": 3}
    assert int(state.step) == 3


def test_check_init_from(tmp_path):
  restore_lib.check_init_from(None)
  missing = str(tmp_path / "nope")
  with pytest.raises(ValueError, match=missing):
    restore_lib.check_init_from(missing)
  empty = tmp_path / "empty"
  (empty / "5.orbax-checkpoint-tmp-77").mkdir(parents=True)  # Unfinished save only.
  with pytest.raises(ValueError, match=str(empty)):
    restore_lib.check_init_from(str(empty))


def test_check_init_from_step_dir_hint(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(2, _state())
  restore_lib.check_init_from(str(tmp_path))
  with pytest.raises(ValueError, match="give its parent"):
    restore_lib.check_init_from(str(tmp_path / "2"))


def test_a_relative_directory_is_taken_below_the_current_one(tmp_path, monkeypatch):
  """Orbax refuses relative paths; a relative workdir (the README's) must still save."""
  monkeypatch.chdir(tmp_path)
  with checkpoint.Checkpointer("runs/rel/checkpoints", async_save=False) as ck:
    ck.save(1, {"w": np.ones((2,), np.float32)})
    assert ck.directory == str(tmp_path / "runs/rel/checkpoints")
  assert (tmp_path / "runs/rel/checkpoints/1").is_dir()
