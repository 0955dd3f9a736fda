"""`scan_layers`: the decoder stack as one scanned layer computes what the unrolled stack does.

Every check runs the same weights both ways (`stack_layers` of the unrolled params): forward,
gradients (with remat too), decoding with the cache, MR's futures from a tiled cache, LoRA merged
and unmerged, the sharding rules, Hugging Face folders in and out, `init_from` across layouts,
and a PPO run with MR that checkpoints (the stacked state read back) and exports.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from collab_rl import rewards
from collab_rl import rollout as rollout_lib
from collab_rl import sampling
from collab_rl import sharding as sharding_lib
from collab_rl.models import attention, hf, lora
from collab_rl.models import transformer as tfm
from collab_rl.tasks import registry

TINY = tfm.TransformerConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                             heads=("lm", "value"))


def _both(cfg=TINY):
  """(unrolled model, scanned model, unrolled params, the same params stacked)."""
  model = tfm.Transformer(cfg)
  scanned = tfm.Transformer(dataclasses.replace(cfg, scan_layers=True))
  params = tfm.init_params(model, jax.random.key(0))
  return model, scanned, params, tfm.stack_layers(params, cfg.num_hidden_layers)


def _flat(tree):
  return {sharding_lib.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_params_stack_under_one_name_and_unstack_back():
  _, scanned, params, stacked = _both()
  fresh = jax.eval_shape(lambda: tfm.init_params(scanned, jax.random.key(0)))
  assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(stacked)
  shapes = {k: x.shape for k, x in _flat(fresh).items()}
  assert shapes["layers/self_attn/q_proj/kernel"] == (3, 32, 32)
  assert shapes["layers/input_layernorm/scale"] == (3, 32)
  assert shapes["embed_tokens/embedding"] == (64, 32) and "layers_0" not in fresh
  back = tfm.unstack_layers(stacked)
  assert _flat(back).keys() == _flat(params).keys()
  for k, x in _flat(params).items():
    np.testing.assert_array_equal(_flat(back)[k], x, err_msg=k)
  with pytest.raises(ValueError, match="missing"):
    tfm.stack_layers(params, 4)
  with pytest.raises(ValueError, match="no stacked 'layers'"):
    tfm.unstack_layers(params)


def test_forward_and_gradients_equal_the_unrolled_stack_under_remat():
  # Remat inside the scan (the 8B config's setting); without it the forward is the decode
  # test's reference below and the gradient the PPO run's.
  cfg = dataclasses.replace(TINY, remat=True)
  model, scanned, params, stacked = _both(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 1, 64)
  valid = jnp.arange(12)[None] < jnp.array([[9], [12]])

  def loss(m):
    def f(p):
      out = m.apply({"params": p}, tokens, valid_BxL=valid)
      return jnp.mean(jax.nn.log_softmax(out.logits_BxLxV)[..., 3] * valid) + out.value_BxL.sum()
    return jax.jit(jax.value_and_grad(f))

  (l0, g0), (l1, g1) = loss(model)(params), loss(scanned)(stacked)
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  want = _flat(tfm.stack_layers(g0, cfg.num_hidden_layers))
  for k, g in _flat(g1).items():
    np.testing.assert_allclose(g, want[k], atol=1e-5, rtol=1e-4, err_msg=k)


def test_decoding_with_the_stacked_cache_equals_the_full_forward():
  # 4 buckets over a 16-slot cache: the steps fill 6..10 slots, across the boundary at 8.
  model, scanned, params, stacked = _both()
  tokens = jax.random.randint(jax.random.key(2), (2, 10), 1, 64)
  full = jax.jit(model.apply)({"params": params}, tokens).logits_BxLxV
  apply = jax.jit(lambda tokens, positions, cache: scanned.apply(
      {"params": stacked}, tokens, positions_BxL=positions, cache=cache))
  cache = attention.KVCache.init(scanned.cfg, 2, 16)
  assert cache.k.shape == (2, 3, 2, 8, 16) and cache.v.shape == (2, 3, 2, 16, 8)
  out = apply(tokens[:, :6], jnp.broadcast_to(jnp.arange(6), (2, 6)), cache)
  chunks = [out.logits_BxLxV]
  for t in range(6, 10):
    out = apply(tokens[:, t:t + 1], jnp.full((2, 1), t), out.cache)
    chunks.append(out.logits_BxLxV)
  np.testing.assert_allclose(jnp.concatenate(chunks, 1), full, atol=1e-5)
  # Each layer wrote its own row of the stacked cache, as the unrolled stack writes its own.
  unrolled = jax.jit(lambda t: model.apply(
      {"params": params}, t, cache=attention.KVCache.init(model.cfg, 2, 16)).cache)(tokens)
  np.testing.assert_allclose(out.cache.k, jnp.stack(unrolled.k, 1), atol=1e-5)
  np.testing.assert_allclose(out.cache.v, jnp.stack(unrolled.v, 1), atol=1e-5)


def test_mr_futures_from_a_tiled_stacked_cache_equal_the_unrolled_models():
  """MR tiles the policy's cache row by row (S futures per reply): the stacked cache keeps rows
  first, so the futures and their rewards are the unrolled model's."""
  task = registry.make_task("ambig_math", {"ambiguous_rate": 1.0})
  cfg = dataclasses.replace(TINY, vocab_size=task.vocab_size, heads=("lm",))
  model, scanned, params, stacked = _both(cfg)
  rcfg = rewards.RewardConfig(window=2, samples=2)

  def mr(m, p):
    policy = rollout_lib.lm_policy(m, sampling.SamplingConfig(
        max_new_tokens=4, temperature=1.0, stop_tokens=(task.eot_id,)), chunk_width=16,
        max_turns=3)

    @jax.jit
    def run(key):
      intent = task.sample_intents(jax.random.key(0), 8)
      conv, sim = rollout_lib.start(task, intent, max_len=64)
      conv = rollout_lib.open_reply(task, conv)
      pstate = policy.init(p, conv)
      reply, _, reply_len, pstate = policy(p, conv, sim, pstate, jax.random.key(1))
      out = rewards.multiturn_aware_reward(policy, task, p, conv, sim, pstate, reply,
                                           reply_len, key, rcfg)
      return reply, out[3]
    return run(jax.random.key(2))

  (r0, mr0), (r1, mr1) = mr(model, params), mr(scanned, stacked)
  np.testing.assert_array_equal(r1, r0)
  np.testing.assert_allclose(mr1, mr0, atol=1e-6)
  assert mr0.shape == (8, 2)


def test_lora_adapters_stack_like_their_kernels_merged_and_unmerged():
  model, scanned, params, stacked = _both()
  cfg = lora.LoraConfig(rank=2, alpha=4.0)
  paths = lora.target_paths(stacked, cfg)
  assert "layers/self_attn/q_proj/kernel" in paths and len(paths) == 7
  adapters = lora.init_adapters(stacked, cfg, jax.random.key(3))
  a = _flat(adapters)
  assert a["layers/mlp/down_proj/lora_a"].shape == (3, 64, 2)
  assert a["layers/mlp/down_proj/lora_b"].shape == (3, 2, 32)
  trained = jax.tree_util.tree_map(lambda x: x + 0.05, adapters)
  per_layer = tfm.unstack_layers(trained)
  tokens = jax.random.randint(jax.random.key(4), (2, 7), 1, 64)
  want = jax.jit(model.apply)({"params": lora.merge(params, per_layer, cfg)},
                              tokens).logits_BxLxV
  merged = lora.LoraModel(scanned, cfg)
  split = lora.split(stacked, trained)
  got = jax.jit(lambda p: merged.apply({"params": p}, tokens).logits_BxLxV)(split)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # Scanned, the adapters run unmerged even without dropout (no stacked merged copy): the
  # transformer itself with the adapters in its "lora" collection.
  direct = jax.jit(lambda p: scanned.apply({"params": p["base"], "lora": lora.scaled(
      p["lora"], cfg)}, tokens).logits_BxLxV)(split)
  np.testing.assert_array_equal(got, direct)
  # Merged (what `evaluate` and the export read): each layer's kernel plus its own A B.
  want_merged = _flat(tfm.stack_layers(lora.merge(params, per_layer, cfg), 3))
  for k, x in _flat(lora.merge(stacked, trained, cfg)).items():
    np.testing.assert_allclose(x, want_merged[k], rtol=1e-6, atol=1e-7, err_msg=k)
  # With dropout ~0 and its RNG: each scanned layer reads its own row of the adapters.
  unmerged = lora.LoraModel(scanned, lora.LoraConfig(rank=2, alpha=4.0, dropout=1e-9))
  got = jax.jit(lambda p, k: unmerged.apply({"params": p}, tokens,
                                            rngs=lora.dropout_rngs(k)).logits_BxLxV)(
                                                split, jax.random.key(5))
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_sharding_rules_keep_the_layer_axis_whole():
  _, scanned, _, stacked = _both(dataclasses.replace(TINY, intermediate_size=64))
  mesh = sharding_lib.make_mesh((2, 2, 2))
  specs = _flat(sharding_lib.param_specs(stacked, mesh=mesh))
  assert specs["layers/self_attn/q_proj/kernel"] == jax.sharding.PartitionSpec(
      None, "fsdp", "model")
  assert specs["layers/mlp/down_proj/kernel"] == jax.sharding.PartitionSpec(
      None, "model", "fsdp")
  assert specs["layers/input_layernorm/scale"] == jax.sharding.PartitionSpec()
  adapters = lora.init_adapters(stacked, lora.LoraConfig(rank=2), jax.random.key(0))
  a = _flat(sharding_lib.param_specs(adapters, mesh=mesh))
  assert a["layers/self_attn/q_proj/lora_a"] == jax.sharding.PartitionSpec(None, "fsdp", None)
  assert a["layers/self_attn/o_proj/lora_b"] == jax.sharding.PartitionSpec(None, None, "fsdp")


def test_hugging_face_folders_load_stacked_and_save_the_same_tensors(tmp_path):
  cfg = dataclasses.replace(TINY, attention_bias=True, heads=("lm",))  # Qwen2: q/k/v biases
  model, scanned, params, stacked = _both(cfg)
  hf.save_pretrained(model, params, tmp_path / "unrolled")
  mesh = sharding_lib.make_mesh((2, 2, 2))
  loaded_model, loaded = hf.load_pretrained(tmp_path / "unrolled", mesh=mesh, scan_layers=True)
  assert loaded_model.cfg.scan_layers
  for k, x in _flat(stacked).items():
    np.testing.assert_array_equal(np.asarray(_flat(loaded)[k]), x, err_msg=k)
  q_spec = _flat(loaded)["layers/self_attn/q_proj/kernel"].sharding.spec
  assert q_spec == jax.sharding.PartitionSpec(None, "fsdp", "model")
  hf.save_pretrained(scanned, loaded, tmp_path / "stacked")
  a, b = load_file(tmp_path / "unrolled" / "model.safetensors"), load_file(
      tmp_path / "stacked" / "model.safetensors")
  assert a.keys() == b.keys() and "model.layers.2.self_attn.q_proj.bias" in a
  for k in a:
    np.testing.assert_array_equal(b[k], a[k], err_msg=k)


def test_ppo_trains_checkpoints_and_exports_with_scanned_layers(tmp_path):
  from experiments import ppo_ambig_math  # pylint: disable=g-import-not-at-top
  from collab_rl import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from collab_rl.trainers import ppo  # pylint: disable=g-import-not-at-top
  # The next-turn reward: MR's futures from a stacked cache have their own test above
  # (test_mr_futures_from_a_tiled_stacked_cache_equal_the_unrolled_models); here they would
  # only double the collection's compile time (the suite's largest cost).
  cfg = ppo_ambig_math.get_config("runlocal,reward=next_turn_ext")
  cfg.batch_size = cfg.eval_batch_size = 8
  cfg.num_turns, cfg.reply_tokens = 2, 6
  cfg.num_steps = cfg.eval_every = cfg.checkpoint.every_steps = 1
  cfg.ppo.minibatches = 1
  cfg.export_hf = True
  cfg.model.scan_layers = True
  out = ppo.train(cfg, str(tmp_path / "run"))
  assert np.isfinite(out["final"]["eval/score"]) and np.isfinite(out["final"]["loss"])
  params = _flat(out["state"].params)
  # The stacked state as its checkpoint holds it (what a resume reads).
  with ckpt_lib.Checkpointer(str(tmp_path / "run" / "checkpoints")) as ckpt:
    state, _ = ckpt.restore(jax.eval_shape(lambda: out["state"]), 1)
  for k, x in _flat(state.params).items():
    np.testing.assert_array_equal(np.asarray(x), np.asarray(params[k]), err_msg=k)
  assert params["layers/self_attn/q_proj/kernel"].shape[0] == cfg.model.num_hidden_layers
  _, exported = hf.load_pretrained(tmp_path / "run" / "hf", scan_layers=True)
  for k, x in _flat(exported).items():
    np.testing.assert_array_equal(np.asarray(x), np.asarray(params[k]), err_msg=k)


def test_a_checkpoint_is_read_into_the_other_layout_and_a_resume_names_the_mismatch(tmp_path):
  """`init_from` a base trained unrolled into a scanned run (and back): the params are read as
  stored, then stacked (unstacked) into the run's shardings. Resuming a run in the other layout
  would need its optimizer state converted too: the error says so."""
  from collab_rl import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from collab_rl import restore as restore_lib  # pylint: disable=g-import-not-at-top
  _, scanned, params, stacked = _both()
  mesh = sharding_lib.make_mesh((2, 2, 2))
  for name, tree in (("unrolled", params), ("stacked", stacked)):
    with ckpt_lib.Checkpointer(str(tmp_path / name)) as ckpt:
      ckpt.save(3, {"params": tree})

  def abstract(tree):
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  tree, sharding_lib.param_shardings(tree, mesh))

  got = restore_lib.restore_params(str(tmp_path / "unrolled"), abstract(stacked))
  for k, x in _flat(stacked).items():
    np.testing.assert_array_equal(np.asarray(_flat(got)[k]), x, err_msg=k)
  assert _flat(got)["layers/mlp/up_proj/kernel"].sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp", "model")
  back = restore_lib.restore_params(str(tmp_path / "stacked"), abstract(params))
  for k, x in _flat(params).items():
    np.testing.assert_array_equal(np.asarray(_flat(back)[k]), x, err_msg=k)
  with ckpt_lib.Checkpointer(str(tmp_path / "unrolled")) as ckpt:
    with pytest.raises(ValueError, match=r"(?s)layers/mlp/up_proj/kernel: missing.*this run "
                                         r"stacks the decoder layers"):
      ckpt.restore({"params": abstract(stacked)}, 3)
