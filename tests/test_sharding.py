"""Mesh construction, partition rules and batch placement on 8 fake devices."""

import gc

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from collab_rl import sharding as sharding_lib
from collab_rl.models import transformer as tfm


def test_mesh_fill_and_axes():
  mesh = sharding_lib.make_mesh((-1, 2, 1))
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "model": 1}
  assert sharding_lib.data_parallel_size(mesh) == 8
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("shape, match", [
    ((4, 4, 1), "needs 16 devices, but only 8"),
    ((-1, -1, 1), "at most one -1"),
    ((3, -1, 1), "not divisible by 3"),
    ((2, 2, 1), "uses 4 of 8"),
    ((0, 8, 1), "positive"),
    ((8, 1), "3 entries"),
])
def test_bad_mesh_shapes(shape, match):
  with pytest.raises(ValueError, match=match):
    sharding_lib.make_mesh(shape)


def test_check_batch():
  mesh = sharding_lib.make_mesh((4, 2, 1))
  sharding_lib.check_batch(16, mesh)
  with pytest.raises(ValueError, match="batch_size=12 must be a positive multiple of the "
                     "data-parallel size 8"):
    sharding_lib.check_batch(12, mesh)


def test_llama_rules_shard_params():
  cfg = tfm.TransformerConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
  shapes = jax.eval_shape(lambda: tfm.init_params(tfm.Transformer(cfg), jax.random.key(0)))
  mesh = sharding_lib.make_mesh((2, 2, 2))
  specs = sharding_lib.param_specs(shapes, sharding_lib.LLAMA_RULES, mesh)
  attn = specs["layers_0"]["self_attn"]
  assert attn["q_proj"]["kernel"] == P("fsdp", "model")
  assert attn["o_proj"]["kernel"] == P("model", "fsdp")
  assert specs["layers_0"]["input_layernorm"]["scale"] == P()
  assert specs["embed_tokens"]["embedding"] == P("model", "fsdp")
  params = jax.jit(lambda: tfm.init_params(tfm.Transformer(cfg), jax.random.key(0)),
                   out_shardings=sharding_lib.param_shardings(shapes, mesh))()
  q = params["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.shard_shape(q.shape) == (16, 16)


def test_indivisible_param_names_param_and_axis():
  mesh = sharding_lib.make_mesh((1, 8, 1))
  shapes = {"layers_0": {"mlp": {"gate_proj": {"kernel": jax.ShapeDtypeStruct((12, 16), "f4")}}}}
  with pytest.raises(ValueError, match=r"layers_0/mlp/gate_proj/kernel .* not divisible by mesh "
                     "axis 'fsdp' of size 8"):
    sharding_lib.param_shardings(shapes, mesh)


def test_rules_from_config_validates_axes():
  rules = sharding_lib.rules_from_config([("mlp/.*/kernel", ("fsdp", None))])
  assert rules[-1] == (r".*", ())
  with pytest.raises(ValueError, match="unknown mesh axes \\['tensor'\\]"):
    sharding_lib.rules_from_config([("mlp", ("tensor",))])


def test_shard_batch_global_array():
  mesh = sharding_lib.make_mesh((4, 2, 1))
  batch = {"tokens": np.arange(16 * 3).reshape(16, 3), "length": np.arange(16)}
  out = sharding_lib.shard_batch(batch, mesh)
  assert out["tokens"].shape == (16, 3)
  assert out["tokens"].sharding.shard_shape((16, 3)) == (2, 3)
  np.testing.assert_array_equal(out["length"], batch["length"])


def test_replicate_host_shared_aliases_one_buffer_across_cpu_devices():
  mesh = sharding_lib.make_mesh((-1, 1, 1))
  tree = {"w": np.arange(24, dtype=np.float32).reshape(4, 6), "b": np.ones((3,), np.int32)}
  out = sharding_lib.replicate_host_shared(tree, sharding_lib.replicated(mesh))
  gc.collect()  # the aliased host buffers must outlive the function that made them
  for name, x in out.items():
    shards = x.addressable_shards
    assert len(shards) == len(jax.devices()) == 8 and x.sharding == sharding_lib.replicated(mesh)
    np.testing.assert_array_equal(np.asarray(x), tree[name])
    pointers = {s.data.unsafe_buffer_pointer() for s in shards}
    assert len(pointers) == 1, name  # one host copy, read by every device
    assert next(iter(pointers)) % 64 == 0
  # Usable as params of a jitted function over the mesh.
  total = jax.jit(lambda t: t["w"].sum() + t["b"].sum())(out)
  assert float(total) == float(tree["w"].sum() + 3)


def test_activations_keep_their_rows_split_under_the_callers_mesh():
  """Under jax.set_mesh the model's hidden states and logits stay split by rows over
  data x fsdp (vocab over `model`), so XLA gathers fsdp-sharded weights instead of the batch;
  the numbers do not change, and without a mesh nothing is constrained."""
  cfg = tfm.TransformerConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
  model = tfm.Transformer(cfg)
  mesh = sharding_lib.make_mesh((2, 2, 2))
  params = tfm.init_params(model, jax.random.key(0))
  params = jax.device_put(params, sharding_lib.param_shardings(params, mesh))
  tokens = jax.random.randint(jax.random.key(1), (8, 12), 0, 64)
  forward = jax.jit(lambda p, t: model.apply({"params": p}, t, heads=("lm",)))
  plain = forward(params, tokens)
  with jax.set_mesh(mesh):
    out = forward(params, tokens)
  rows = lambda *rest: jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None, *rest))
  assert out.logits_BxLxV.sharding.is_equivalent_to(rows("model"), 3)
  assert out.hidden_BxLxD.sharding.is_equivalent_to(rows(None), 3)
  np.testing.assert_allclose(out.logits_BxLxV, plain.logits_BxLxV, rtol=1e-5, atol=1e-5)
  # Rows that the mesh's 4 batch ways do not divide stay as XLA places them.
  with jax.set_mesh(mesh):
    odd = forward(params, tokens[:3])
  np.testing.assert_allclose(odd.logits_BxLxV, plain.logits_BxLxV[:3], rtol=1e-5, atol=1e-5)
