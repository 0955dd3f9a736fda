"""The memory savers an 8B run needs give the reference's numbers: gradient accumulation
(`config.microbatches`), remat policies (`model.remat_policy`) and bf16 compute and params
(`model.dtype`, `model.param_dtype`), each against fp32 on one whole batch.

Tolerances: accumulation and remat change only the order of fp32 sums, so they are held to
rtol 1e-5 (accumulation) and 1e-6 (remat). bf16 rounds every matmul input to 8 mantissa bits,
so it is held to what that allows on this model: the loss within 1% of fp32 and each gradient
leaf pointing the same way (cosine > 0.99), for bf16 compute with fp32 params, and with bf16
params too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from collab_rl import sft as sft_lib
from collab_rl import sharding as sharding_lib
from collab_rl import train_state as state_lib
from collab_rl.models import transformer
from collab_rl.models.config import REMAT_POLICIES
from collab_rl.tokenizer import ASSISTANT, CONTEXT, PAD
from collab_rl.trainers import lm, ppo
from experiments import lm_synthetic, ppo_ambig_math
from test_rl_trainers import ppo_minibatch

B, L, V = 16, 12, 48


def _model(**fields):
  cfg = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
  cfg.update(fields)
  return transformer.Transformer(transformer.TransformerConfig(**cfg))


def _sft_batch():
  """Rows with different numbers of assistant tokens, so that weighting slices equally would
  not give the whole batch's mean (the test below checks that it would not)."""
  tokens = jax.random.randint(jax.random.key(1), (B, L), 1, V)
  n_asst = 1 + jnp.arange(B) % 7  # 1..7 trained tokens per row
  pos = jnp.arange(L)[None, :]
  roles = jnp.where(pos < 4, CONTEXT, jnp.where(pos < 4 + n_asst[:, None], ASSISTANT, PAD))
  return {"tokens": tokens, "roles": roles}


def _grads(model, params, batch):
  fn = lambda p: sft_lib.sft_loss(model, p, batch["tokens"], batch["roles"])
  (loss, _), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
  return loss, grads


def _assert_trees_close(a, b, **tol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), **tol,
                               err_msg=sharding_lib.path_str(path))


def _cosine(a, b):
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def test_accumulated_sft_step_equals_one_batch_on_the_mesh():
  """4 microbatches inside the jitted step, the batch split over 8 devices: the same loss,
  gradient and updated params as one batch, although the slices hold different token counts."""
  model = _model()
  params = transformer.init_params(model, jax.random.key(0))
  batch = _sft_batch()
  tx = optax.adamw(1e-2)
  mesh = sharding_lib.make_mesh((-1, 1, 1))
  batch = jax.device_put(batch, sharding_lib.batch_sharding(mesh))
  out = {}
  with jax.set_mesh(mesh):
    for n in (1, 4):
      state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                   opt_state=tx.init(params), rng=jax.random.key(0))
      new, metrics = jax.jit(lambda s, b: sft_lib.train_step(model, tx, s, b, n))(state, batch)
      grads = jax.jit(lambda p, b: state_lib.accumulate(
          lambda q, mb: sft_lib.sft_loss(model, q, mb["tokens"], mb["roles"]), p, b, n,
          lambda mb: sft_lib.loss_mask(mb["roles"]).sum()))(params, batch)[2]
      out[n] = (metrics, grads, new.params)
  (m1, g1, p1), (m4, g4, p4) = out[1], out[4]
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m4["token_acc"], m1["token_acc"], rtol=1e-5)
  assert int(m4["assistant_tokens"]) == int(m1["assistant_tokens"])
  _assert_trees_close(g4, g1, rtol=1e-5, atol=1e-7)
  # AdamW's first step divides each gradient entry by its own size, which magnifies the fp32
  # rounding of near-zero entries: the params are held to 1/1000 of the learning rate.
  _assert_trees_close(p4, p1, rtol=0, atol=1e-5)
  # The weights matter: slices weighted equally give another loss on this batch.
  loss_eq, _, _ = jax.jit(lambda p, b: state_lib.accumulate(
      lambda q, mb: sft_lib.sft_loss(model, q, mb["tokens"], mb["roles"]), p, b, 4))(
          params, batch)
  assert abs(float(loss_eq) - float(m1["loss"])) > 1e-3


def test_accumulated_ppo_update_equals_one_minibatch():
  """PPO's update (run_rl.jit_update's loss, weighted by reply tokens) in 2 microbatches."""
  cfg = ppo_ambig_math.get_config("runlocal")
  model = transformer.Transformer(transformer.TransformerConfig.from_dict(cfg.model.to_dict()))
  params = transformer.init_params(model, jax.random.key(0))
  b, l = 8, 11
  # The same number of reply tokens in every row: the value term (a mean over turns) is then
  # weighted exactly too.
  mb = ppo_minibatch(cfg, b, l, jnp.tile(jnp.arange(l)[None] % 3 == 1, (b, 1)))
  loss_fn = lambda p, m: ppo.ppo_loss(model, cfg, p, m)
  (loss1, m1), g1 = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, mb)
  loss2, m2, g2 = jax.jit(lambda p, m: state_lib.accumulate(
      loss_fn, p, m, 2, lambda x: x["mask_BxL"].sum()))(params, mb)
  np.testing.assert_allclose(loss2, loss1, rtol=1e-5)
  for k in ("policy_loss", "kl_ref", "entropy", "value_loss"):
    np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, atol=1e-7, err_msg=k)
  _assert_trees_close(g2, g1, rtol=1e-4, atol=1e-7)


def test_lm_trainer_step_accumulates():
  """The LM trainer's own jitted step (`lm.build`) with config.microbatches = 2 on a batch of
  unequal lengths: the loss and updated params of one batch."""
  outs = {}
  for n in (1, 2):
    c = lm_synthetic.get_config("runlocal")
    c.model.update(vocab_size=64, hidden_size=32, intermediate_size=64)
    c.update(batch_size=8, seq_len=16, microbatches=n)
    b = lm.build(c, sharding_lib.make_mesh(c.mesh_shape))
    batch = {"tokens": jax.random.randint(jax.random.key(3), (8, 16), 1, 64),
             "length": jnp.arange(8, dtype=jnp.int32) + 6}
    outs[n] = b.step_fn(b.create_fn(), batch)
  (s1, m1), (s2, m2) = outs[1], outs[2]
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
  assert int(m2["target_tokens"]) == int(m1["target_tokens"]) == int(np.sum(np.arange(8) + 5))
  _assert_trees_close(s2.params, s1.params, rtol=0, atol=1e-5)


def test_microbatches_that_do_not_divide_the_update_are_refused(tmp_path):
  c = lm_synthetic.get_config("runlocal")
  c.update(batch_size=8, microbatches=3)
  with pytest.raises(ValueError, match=r"config.microbatches=3 must be >= 1 and divide the 8"):
    lm.train(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
  c = ppo_ambig_math.get_config("runlocal")
  c.update(batch_size=32, microbatches=3)
  c.ppo.minibatches = 2
  with pytest.raises(ValueError, match=r"divide the 16 rows .*batch_size / ppo.minibatches"):
    ppo.check_config(c)


def test_remat_policies_give_the_same_loss_and_gradient():
  params = transformer.init_params(_model(), jax.random.key(0))
  batch = _sft_batch()
  loss0, g0 = _grads(_model(), params, batch)
  for policy in REMAT_POLICIES:
    loss1, g1 = _grads(_model(remat=True, remat_policy=policy), params, batch)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6, err_msg=policy)
    _assert_trees_close(g1, g0, rtol=1e-5, atol=1e-8)


def test_an_unknown_remat_policy_is_refused():
  with pytest.raises(ValueError, match="remat_policy='dots'.*nothing_saveable"):
    transformer.TransformerConfig(remat=True, remat_policy="dots")


def test_bf16_loss_and_gradient_are_close_to_fp32():
  params = transformer.init_params(_model(), jax.random.key(0))
  batch = _sft_batch()
  loss0, g0 = _grads(_model(), params, batch)
  for param_dtype in ("float32", "bfloat16"):  # bf16 compute over fp32 params, then all bf16
    low = _model(dtype="bfloat16", param_dtype=param_dtype)
    params_low = jax.tree_util.tree_map(lambda x: x.astype(param_dtype), params)
    loss1, g1 = _grads(low, params_low, batch)
    assert jax.tree_util.tree_leaves(g1)[0].dtype == jnp.dtype(param_dtype)
    assert abs(float(loss1) - float(loss0)) < 0.01 * float(loss0), param_dtype
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1),
                            jax.tree_util.tree_leaves(g0)):
      assert _cosine(a, b) > 0.99, (param_dtype, sharding_lib.path_str(path))
