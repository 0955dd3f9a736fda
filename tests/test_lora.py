"""LoRA as a transform of param trees (collab_rl/models/lora.py): targets by regex, a fresh
adapter that changes nothing, the merged kernel W + (alpha / r) A B, gradients that reach only
the adapters, shardings that follow the kernels', and config errors that name the field."""

import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collab_rl import frozen_base
from collab_rl import sharding as sharding_lib
from collab_rl.models import lora, transformer

CFG = transformer.TransformerConfig(vocab_size=40, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, heads=("lm", "value"))


@functools.cache  # every test reads the same arrays (immutable); built once, jitted
def _setup(rank=4, targets=lora.DEFAULT_TARGETS):
  model = transformer.Transformer(CFG)
  base = jax.jit(lambda k: transformer.init_params(model, k))(jax.random.key(0))
  cfg = lora.LoraConfig(rank=rank, alpha=8.0, targets=targets)
  return model, base, cfg, jax.jit(lambda b, k: lora.init_adapters(b, cfg, k))(
      base, jax.random.key(1))


def test_targets_are_the_projection_kernels_by_default_and_by_regex():
  _, base, cfg, adapters = _setup()
  paths = lora.target_paths(base, cfg)
  assert len(paths) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
  assert "layers_1/self_attn/k_proj/kernel" in paths and "lm_head/kernel" not in paths
  a = adapters["layers_0"]["self_attn"]["k_proj"]
  assert a["lora_a"].shape == (32, 4) and a["lora_b"].shape == (4, 16)  # k_proj is [32, 16]
  only_q = lora.LoraConfig(rank=2, targets=(r"self_attn/q_proj/kernel$",))
  assert lora.target_paths(base, only_q) == ["layers_0/self_attn/q_proj/kernel",
                                              "layers_1/self_attn/q_proj/kernel"]
  assert lora.count(adapters) == sum(
      (k.shape[0] + k.shape[1]) * 4
      for k in (jax.tree_util.tree_leaves(base["layers_0"]["self_attn"]) +
                jax.tree_util.tree_leaves(base["layers_0"]["mlp"]))) * 2


def test_a_fresh_adapter_leaves_the_model_unchanged_and_merge_is_w_plus_scaled_ab():
  model, base, cfg, adapters = _setup()
  tokens = jax.random.randint(jax.random.key(2), (2, 7), 1, 40)
  out0 = model.apply({"params": base}, tokens).logits_BxLxV
  np.testing.assert_array_equal(model.apply({"params": lora.merge(base, adapters, cfg)},
                                            tokens).logits_BxLxV, out0)
  # Untargeted leaves are the base's own arrays, not copies.
  merged = lora.merge(base, adapters, cfg)
  assert merged["lm_head"]["kernel"] is base["lm_head"]["kernel"]
  assert merged["layers_0"]["input_layernorm"]["scale"] is base["layers_0"]["input_layernorm"][
      "scale"]
  trained = jax.tree_util.tree_map(lambda x: x + 0.1, adapters)
  a = trained["layers_1"]["mlp"]["up_proj"]
  want = base["layers_1"]["mlp"]["up_proj"]["kernel"] + 2.0 * a["lora_a"] @ a["lora_b"]
  np.testing.assert_allclose(lora.merge(base, trained, cfg)["layers_1"]["mlp"]["up_proj"]["kernel"],
                             want, rtol=1e-6, atol=1e-6)


def test_gradients_reach_only_the_adapters_and_move_the_loss():
  model, base, cfg, adapters = _setup()
  tokens = jax.random.randint(jax.random.key(2), (4, 9), 1, 40)

  def loss(ad):
    logits = model.apply({"params": lora.merge(base, ad, cfg)}, tokens[:, :-1]).logits_BxLxV
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

  loss = jax.jit(loss)
  l0, g = jax.jit(jax.value_and_grad(loss))(adapters)
  assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(adapters)
  # B = 0 at the start: A's gradient is zero, B's is not (as in the LoRA paper's init).
  assert all(float(jnp.abs(x["lora_a"]).max()) == 0.0 for x in _pairs(g))
  assert all(float(jnp.abs(x["lora_b"]).max()) > 0.0 for x in _pairs(g))
  stepped = jax.tree_util.tree_map(lambda p, d: p - 0.5 * d, adapters, g)
  assert float(loss(stepped)) < float(l0)


def _pairs(tree):
  out = []
  def visit(t):
    if isinstance(t, dict) and "lora_a" in t:
      out.append(t)
    elif isinstance(t, dict):
      for v in t.values():
        visit(v)
  visit(tree)
  return out


def test_the_sharding_rules_split_adapters_like_their_kernels():
  _, base, _, adapters = _setup()
  mesh = sharding_lib.make_mesh((1, 4, 2))
  sh = sharding_lib.param_shardings(lora.split(base, adapters), mesh)
  for proj, part in (("self_attn", "q_proj"), ("self_attn", "o_proj"), ("mlp", "down_proj")):
    k = tuple(sh["base"]["layers_0"][proj][part]["kernel"].spec)
    a = sh["lora"]["layers_0"][proj][part]
    assert tuple(a["lora_a"].spec) == (k[0], None), part
    assert tuple(a["lora_b"].spec) == (None, k[1]), part
    assert k[0] is not None and k[1] is not None  # the kernels are split on this mesh
  placed = jax.device_put(adapters, sh["lora"])  # every adapter splits over the mesh as planned
  assert placed["layers_1"]["mlp"]["up_proj"]["lora_b"].sharding == sh["lora"]["layers_1"]["mlp"][
      "up_proj"]["lora_b"]


@pytest.mark.parametrize("fields, message", [
    ({"rank": -1}, r"lora.rank=-1 must be >= 0"),
    ({"rank": 4, "dropout": 1.0}, r"lora.dropout=1.0 must be in \[0, 1\)"),
    ({"rank": 4, "targets": ("q_proj(",)}, r"lora.targets: bad regex 'q_proj\('"),
])
def test_bad_lora_config_names_the_field(fields, message):
  with pytest.raises(ValueError, match=message):
    lora.LoraConfig.from_dict(fields)


def test_dropout_runs_the_adapters_unmerged_on_their_input_only():
  """With a "dropout" RNG the model adds dropout(x) A B unmerged: at rate 0 that equals the
  merged kernel; at 0.5 the output moves, the same key gives the same output, and each dropped
  input costs only its adapter term (the base path is untouched: with B = 0 nothing moves);
  without the RNG (rollouts, log-probs) the merged model runs. The train step hands the loss a
  fresh key every step, and a trainer whose loss takes none refuses a dropout."""
  from collab_rl import run as run_lib  # pylint: disable=g-import-not-at-top
  from collab_rl import train_state as state_lib  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  model, base, cfg, adapters = _setup()
  trained = jax.tree_util.tree_map(lambda x: x + 0.05, adapters)
  tokens = jax.random.randint(jax.random.key(2), (2, 7), 1, 40)
  # Jitted once per (model, with or without an RNG): eager Flax would dominate the test's time.
  jitted = {}

  def logits(m, params, rngs=None):
    if (m, rngs is None) not in jitted:
      jitted[m, rngs is None] = jax.jit(
          lambda p, r: m.apply({"params": p}, tokens, rngs=r).logits_BxLxV)
    return jitted[m, rngs is None](params, rngs)

  merged = logits(model, lora.merge(base, trained, cfg))
  params = lora.split(base, trained)
  at0 = lora.LoraModel(model, lora.LoraConfig(rank=4, alpha=8.0, dropout=1e-9))  # unmerged
  np.testing.assert_allclose(logits(at0, params, rngs=lora.dropout_rngs(jax.random.key(0))),
                             merged, rtol=1e-5, atol=1e-5)
  drop = lora.LoraModel(model, lora.LoraConfig(rank=4, alpha=8.0, dropout=0.5))
  np.testing.assert_array_equal(logits(drop, params), merged)  # no RNG: merged
  k0, k1 = lora.dropout_rngs(jax.random.key(0)), lora.dropout_rngs(jax.random.key(1))
  d0 = logits(drop, params, rngs=k0)
  assert float(jnp.abs(d0 - merged).max()) > 1e-3
  np.testing.assert_array_equal(logits(drop, params, rngs=k0), d0)
  assert float(jnp.abs(logits(drop, params, rngs=k1) - d0).max()) > 1e-3
  fresh = lora.split(base, adapters)  # B = 0: dropping the adapters' input changes nothing
  np.testing.assert_allclose(logits(drop, fresh, rngs=k0), logits(model, base), rtol=1e-6,
                             atol=1e-6)
  # The step's key: the step folded into the dropout branch of the state's key, so a step
  # differs from the next and repeats.
  tx = lora.trainable_only(__import__("optax").sgd(0.1), drop.lora)
  state = state_lib.create(params, tx, jax.random.key(5))
  loss_fn = lambda p, b, key=None: (jnp.mean(logits(drop, p, rngs=lora.dropout_rngs(key))), {})
  step = jax.jit(lambda st: state_lib.update(st, tx, loss_fn, {"x": tokens}, dropout=True)[1])
  later = state.replace(step=state.step + 1)
  assert float(step(state)) == float(step(state)) != float(step(later))
  bad = ml_collections.ConfigDict({"trainer": "reward_model",
                                   "lora": {"rank": 4, "dropout": 0.1}})
  with pytest.raises(ValueError, match=r"lora.dropout=0.1: the reward_model trainer's loss"):
    run_lib.lora_config(bad)


def test_targets_that_match_nothing_are_refused():
  _, base, _, _ = _setup()
  with pytest.raises(ValueError, match=r"lora.targets=\['attn/qkv'\] match no kernel"):
    lora.target_paths(base, lora.LoraConfig(rank=2, targets=("attn/qkv",)))


def test_ppo_with_adapters_trains_only_them_from_a_plain_base(tmp_path):
  """PPO (MR) with `lora.rank` > 0 from a checkpoint without adapters (an SFT base's, say): the
  base is that checkpoint's params and only its critic moves (`lora.trainable`), the adapters
  train, the reference is the base itself (no copy), and the checkpoint holds the adapters and
  the critic, the rest of the base rebuilt from that checkpoint when read."""
  from collab_rl import checkpoint as ckpt_lib
  from collab_rl import restore as restore_lib
  from collab_rl import run as run_lib
  from collab_rl import run_rl
  from collab_rl.trainers import ppo
  from experiments import ppo_ambig_math
  from test_rl_trainers import _tiny

  # The next-turn reward: the LoRA plumbing does not depend on the reward, and MR's futures
  # would only add compile time.
  c = _tiny(ppo_ambig_math.get_config("runlocal,reward=next_turn_ext"))
  c.ppo.minibatches = 1
  mesh = sharding_lib.make_mesh(c.mesh_shape)
  plain = run_lib.init_state(c, mesh, run_lib.make_optimizer(c.optimizer)).create_fn()
  with ckpt_lib.Checkpointer(str(tmp_path / "plain")) as ckpt:  # the "SFT base"
    ckpt.save(1, plain)
  base0 = jax.device_get(plain.params)
  c.init_from = str(tmp_path / "plain")
  c.lora.update(rank=4, alpha=8.0)
  c.num_steps = 1
  task, _, mesh, rcfg = ppo.check_config(c)
  setup = run_rl.build(c, str(tmp_path / "probe"), task, mesh, rcfg)
  ref = setup.reference(setup.state.params)
  assert ref["base"] is setup.state.params["base"] and ref["lora"] is None
  setup.close()
  out = ppo.train(c, str(tmp_path / "lora"))
  params = jax.device_get(out["state"].params)
  assert lora.is_split(params)
  moved = set()
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params["base"]),
                          jax.tree_util.tree_leaves(base0)):
    if not np.array_equal(a, b):
      moved.add(sharding_lib.path_str(path))
  # The checkpoint's params, untouched by training but for the critic (lora.trainable).
  assert moved == {"value_head/kernel", "value_head/bias"}
  assert all(float(np.abs(x["lora_b"]).max()) > 0 for x in _pairs(params["lora"]))
  # The checkpoint leaves the frozen base out and names where it comes from (frozen_base.py);
  # reading it rebuilds the base from that source, exactly.
  checkpoints = str(tmp_path / "lora" / "checkpoints")
  meta = ckpt_lib.read_only_manager(checkpoints).item_metadata(1)
  assert frozen_base.paths(meta["state"].tree["params"]["base"]) == [
      "value_head/bias", "value_head/kernel"]
  assert not os.path.exists(os.path.join(checkpoints, "1", "state", "params", "base", "layers_0"))
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  stored = restore_lib.restore_params(checkpoints, abstract)
  for a, b in zip(jax.tree_util.tree_leaves(stored), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)
  # An ablation from this run (`init_from` a run with adapters) gets its base the same way.
  for a, b in zip(jax.tree_util.tree_leaves(restore_lib.base_params(checkpoints, abstract["base"])),
                  jax.tree_util.tree_leaves(params["base"])):
    np.testing.assert_array_equal(a, b)
  # A resumed run reads it back whole, optimizer state included, and saves the same way.
  again = run_rl.build(c, str(tmp_path / "lora"), task, mesh, rcfg)
  assert again.run.how == "resumed step 1"
  for a, b in zip(jax.tree_util.tree_leaves(again.state),
                  jax.tree_util.tree_leaves(out["state"])):
    np.testing.assert_array_equal(a, b)
  assert again.run.checkpointer.frozen["source"] == {
      "kind": "init_from", "path": str(tmp_path / "plain"), "step": 1}
  again.close()
  # Evaluation reads the run as one plain model: its base with the adapters merged in.
  from collab_rl import evaluate
  _, _, merged, _, _ = evaluate.load_policy(str(tmp_path / "lora"), turns=2)
  want = lora.merge(params["base"], params["lora"], lora.LoraConfig(rank=4, alpha=8.0))
  for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # So does the data engine, whose candidates come from `init_from`; a model that differs from
  # the engine's own is refused, naming the param.
  from collab_rl.data import engine
  plain_abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                          merged)
  for a, b in zip(jax.tree_util.tree_leaves(engine.policy_params(checkpoints, plain_abstract)),
                  jax.tree_util.tree_leaves(merged)):
    np.testing.assert_array_equal(a, b)
  wider = dict(plain_abstract, lm_head={"kernel": jax.ShapeDtypeStruct(
      (plain_abstract["lm_head"]["kernel"].shape[0], 7), jnp.float32)})
  with pytest.raises(ValueError, match=r"against config.model\) does not match the expected "
                     r"state:\n  lm_head/kernel: checkpoint has shape"):
    engine.policy_params(checkpoints, wider)
  # The source gone, or overwritten since: reading the run fails, naming the source or a param,
  # instead of merging the adapters into another base.
  shutil.rmtree(tmp_path / "plain")
  with pytest.raises(ValueError, match=r"rebuilds from init_from=\S+plain step 1; that failed: "
                     r".*does not exist"):
    restore_lib.restore_params(checkpoints, abstract)
  other = jax.tree_util.tree_map(lambda x: x + 1, plain)
  with ckpt_lib.Checkpointer(str(tmp_path / "plain")) as ckpt:
    ckpt.save(1, other)
  with pytest.raises(ValueError, match=r"not the one it was trained on: \d+ param\(s\) differ, "
                     r"e\.g\. \S+ \(sum"):
    restore_lib.restore_params(checkpoints, abstract)


def test_a_fresh_base_is_rebuilt_from_the_config_alone():
  """A run with adapters and no `init_from` names its config as its base's source: the seed's
  initialisation (under `init_from_hf`'s folder, test_text_tier.py), rebuilt exactly, in the
  state's shardings."""
  from collab_rl import run as run_lib
  from experiments import ppo_ambig_math
  c = ppo_ambig_math.get_config("runlocal")
  c.lora.update(rank=4, alpha=8.0)
  mesh = sharding_lib.make_mesh(c.mesh_shape)
  init = run_lib.init_state(c, mesh, run_lib.make_optimizer(c.optimizer))
  base = init.create_fn().params["base"]
  rebuilt = frozen_base.fresh_base(c, init.abstract.params["base"])
  for a, b in zip(jax.tree_util.tree_leaves(rebuilt), jax.tree_util.tree_leaves(base)):
    assert a.sharding == b.sharding
    np.testing.assert_array_equal(a, b)
