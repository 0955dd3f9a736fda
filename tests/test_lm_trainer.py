"""The LM trainer end to end: 1 vs 8 devices, bit-identical resume, config checks, compilation."""

import os
import jax
import numpy as np
import pytest

from collab_rl import sharding as sharding_lib
from collab_rl.trainers import lm
from experiments import lm_synthetic


def tiny_config(**overrides):
  c = lm_synthetic.get_config("runlocal")
  c.model.vocab_size = 64
  c.model.hidden_size = 32
  c.model.intermediate_size = 64
  c.batch_size = 8
  c.seq_len = 16
  c.corpus.min_len = 6
  c.corpus.num_records = 256
  c.num_steps = 6
  c.log_every = 2
  c.eval_every = 2
  c.checkpoint.every_steps = 2
  c.checkpoint.async_save = True
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def _run_steps(config, mesh, n):
  b = lm.build(config, mesh)
  state = b.create_fn()
  it = iter(lm.make_dataset(config, "train").to_iter_dataset())
  losses = []
  for _ in range(n):
    state, m = b.step_fn(state, sharding_lib.shard_batch(next(it), mesh))
    losses.append(float(m["loss"]))
  return losses, jax.device_get(state.params)


def test_one_device_equals_eight_devices():
  config = tiny_config()
  one = sharding_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  eight = sharding_lib.make_mesh((4, 2, 1))
  losses1, params1 = _run_steps(config, one, 3)
  losses8, params8 = _run_steps(config, eight, 3)
  np.testing.assert_allclose(losses1, losses8, rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         params1, params8)


def test_train_step_does_not_recompile(compile_counter):
  config = tiny_config()
  mesh = sharding_lib.make_mesh((4, 2, 1))
  b = lm.build(config, mesh)
  state = b.create_fn()
  it = iter(lm.make_dataset(config, "train").to_iter_dataset())
  state, _ = b.step_fn(state, sharding_lib.shard_batch(next(it), mesh))
  with compile_counter as counter:
    for _ in range(3):
      state, m = b.step_fn(state, sharding_lib.shard_batch(next(it), mesh))
    jax.block_until_ready(m)
  assert counter.count == 0


def test_resume_is_bit_identical(tmp_path):
  config = tiny_config()
  full = lm.train(config, str(tmp_path / "full"))
  first = lm.train(config, str(tmp_path / "split"), stop_after=3)  # "preempted" after step 3
  assert int(first["state"].step) == 3
  resumed = lm.train(config, str(tmp_path / "split"))
  assert resumed["how"] == "resumed step 3"
  assert int(resumed["state"].step) == 6
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(full["state"].params),
                         jax.device_get(resumed["state"].params))
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(full["state"].opt_state),
                         jax.device_get(resumed["state"].opt_state))


def test_init_from_takes_params_only(tmp_path):
  base = lm.train(tiny_config(), str(tmp_path / "base"))
  config = tiny_config(init_from=str(tmp_path / "base" / "checkpoints"), num_steps=1)
  config.optimizer.learning_rate = 0.0  # so the params after one step are the base's
  out = lm.train(config, str(tmp_path / "ablation"))
  assert out["how"].startswith("init_from")
  assert int(out["state"].step) == 1
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(base["state"].params),
                         jax.device_get(out["state"].params))


def test_loss_falls_towards_the_corpus_floor(tmp_path):
  config = tiny_config(num_steps=60, log_every=20, eval_every=20)
  config.optimizer.learning_rate = 1e-2
  out = lm.train(config, str(tmp_path / "run"))
  # log(64) = 4.16 at the start; the chain's floor is log(4) = 1.39.
  assert out["final"]["eval_loss"] < 2.5


@pytest.mark.parametrize("overrides, match", [
    ({"batch_size": 12}, "batch_size=12 must be a positive multiple of the data-parallel size 8"),
    ({"mesh_shape": (4, 4, 1)}, "needs 16 devices, but only 8"),
    ({"init_from": "/nonexistent/run/checkpoints"}, "/nonexistent/run/checkpoints"),
    ({"model.num_key_value_heads": 3}, "num_key_value_heads"),
    ({"num_steps": 0}, "num_steps must be positive"),
    ({"corpus.min_len": 1}, "min_len"),
])
def test_bad_config_fails_before_compiling(overrides, match, tmp_path, compile_counter):
  config = tiny_config(**overrides)
  with compile_counter as counter, pytest.raises(ValueError, match=match):
    lm.train(config, str(tmp_path / "bad"))
  assert counter.count == 0
  assert not (tmp_path / "bad").exists()  # nothing written either


def test_inf_loss_stops_before_the_bad_step_is_saved(tmp_path, monkeypatch):
  """An inf loss on step 3 (a host callback counts executions): the update is refused inside
  the step, the run stops naming the step, and the checkpoints on disk are steps 1-2, finite."""
  import itertools
  import jax.numpy as jnp
  from collab_rl import checkpoint as ckpt_lib
  from collab_rl import train_state as state_lib

  cfg = tiny_config(num_steps=5, **{"checkpoint.every_steps": 1})
  count, update = itertools.count(1), state_lib.update

  def factor():
    return jax.pure_callback(lambda: np.float32(np.inf if next(count) == 3 else 1.0),
                             jax.ShapeDtypeStruct((), jnp.float32))

  def poisoned(state, tx, loss_fn, *args, **kw):  # the training step only, not the evaluation
    return update(state, tx, lambda *a: (lambda l, aux: (l * factor(), aux))(*loss_fn(*a)), *args,
                  **kw)

  monkeypatch.setattr(state_lib, "update", poisoned)
  with pytest.raises(state_lib.NonFiniteError, match=r"lm step 3: .*last good checkpoint is "
                                                      r"step 2"):
    lm.train(cfg, str(tmp_path / "run"))
  ck = ckpt_lib.Checkpointer(str(tmp_path / "run" / "checkpoints"))
  assert ck.all_steps() == [1, 2]
  restored, _ = ck.restore(lm.build(cfg, lm.check_config(cfg)).abstract)
  ck.close()
  assert int(restored.step) == 2
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(restored))


def test_a_refused_update_between_logs_is_read_one_step_late(tmp_path, monkeypatch):
  """Step 2 neither logs, evaluates nor saves: its non-finite flag is read at step 3 (the host
  did not wait for step 2 before queueing step 3), and the run stops naming step 2, before any
  checkpoint is written."""
  import itertools
  import jax.numpy as jnp
  from collab_rl import train_state as state_lib

  cfg = tiny_config(num_steps=8, log_every=4, eval_every=4, **{"checkpoint.every_steps": 4})
  count, update = itertools.count(1), state_lib.update
  seen = []

  def factor():
    return jax.pure_callback(lambda: np.float32(np.inf if next(count) == 2 else 1.0),
                             jax.ShapeDtypeStruct((), jnp.float32))

  def poisoned(state, tx, loss_fn, *args, **kw):
    return update(state, tx, lambda *a: (lambda l, aux: (l * factor(), aux))(*loss_fn(*a)), *args,
                  **kw)

  stop = state_lib.stop_if_nonfinite

  def recording(trainer, step, nonfinite, checkpointer):
    seen.append(step)
    return stop(trainer, step, nonfinite, checkpointer)

  monkeypatch.setattr(state_lib, "update", poisoned)
  monkeypatch.setattr(state_lib, "stop_if_nonfinite", recording)
  with pytest.raises(state_lib.NonFiniteError, match=r"lm step 2: .*last good checkpoint is "
                                                      r"step None"):
    lm.train(cfg, str(tmp_path / "run"))
  assert seen == [1, 2]  # step 1's flag read at step 2, step 2's at step 3
  assert not os.path.exists(tmp_path / "run" / "checkpoints" / "4")
