"""The compiled memory check's bookkeeping, without libtpu: a refused program is reported with
the temporaries XLA asked for, and a machine without the TPU compiler gets a clear error."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from collab_rl import sharding
from experiments import memory_compiled, pods


class _Refused:
  """A jitted function whose compilation XLA refuses, as the TPU compiler words it."""

  def __init__(self, message: str):
    self.message = message

  def lower(self, *args):
    del args
    return self

  def compile(self):
    raise jax.errors.JaxRuntimeError(self.message)


# The two ways the TPU compiler has worded a refusal (measured, 2026-12-06).
_REFUSALS = {
    "temporaries": ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
                    "HLO temporaries (127.50G) exceeds available HBM (15.75G).", 127.5),
    "hbm_usage": ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent "
                  "error. Ran out of memory in memory space hbm. Used 15.80G of 15.75G hbm.\n"
                  "Program hbm requirement 15.10G:\n    global           10.84M\n    HLO temp"
                  "         14.65G (99.8% utilization: Unpadded (14.25G) Padded (14.27G))", 14.65),
}


@pytest.mark.parametrize("wording", sorted(_REFUSALS))
def test_a_refused_program_reports_what_it_asked_for(wording):
  message, temporaries = _REFUSALS[wording]
  mesh = sharding.make_mesh((-1, 1, 1))
  arg = jax.ShapeDtypeStruct((8, 1024), jnp.float32, sharding=NamedSharding(mesh, P("data")))
  c = memory_compiled._stats("update", _Refused(message), arg)  # pylint: disable=protected-access
  assert not c.fits and c.temporaries == int(temporaries * 2**30)
  assert c.arguments == 1024 * 4  # one row of the 8 on each of the 8 devices
  table = memory_compiled.markdown(
      {"v5litepod-64": [c]}, {"v5litepod-64": {"persistent": 0, "grads": 0, "activations": 0,
                                               "logprob_pass": 0}})
  assert "(refused)" in table and f"{temporaries:.2f}" in table


def test_compiled_programs_report_their_memory():
  mesh = sharding.make_mesh((-1, 1, 1))
  arg = jax.ShapeDtypeStruct((8, 256), jnp.float32, sharding=NamedSharding(mesh, P("data")))
  # The rollout takes a PRNG key, whose dtype numpy does not know.
  key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                             sharding=sharding.replicated(mesh))
  f = jax.jit(lambda x, k: jnp.tanh(x) * jax.random.uniform(k))
  c = memory_compiled._stats("f", f, arg, key)  # pylint: disable=protected-access
  assert c.fits and c.arguments > 0 and c.peak >= c.arguments


def test_each_program_sits_beside_its_phase_of_the_plan():
  plan = {"persistent": 1, "grads": 2, "activations": 4, "logprob_pass": 8, "policy_kv": 16,
          "user_kv": 32}
  programs = [memory_compiled.Compiled(name, 0, 0, 0, 0) for name in memory_compiled.PROGRAMS]
  rows = memory_compiled.markdown({"v5litepod-64": programs},
                                  {"v5litepod-64": {k: v * 2**30 for k, v in plan.items()}})
  planned = {r.split(" | ")[1]: r.split(" | ")[7] for r in rows.splitlines()[4:]}
  assert planned == {"update": "7.00", "logprob_pass": "9.00", "rollout": "49.00"}
  # An unknown program is refused before anything compiles (or libtpu is looked for).
  with pytest.raises(ValueError, match=r"no program \['rollouts'\]"):
    memory_compiled.compile_collabllm("v5litepod-64", True, 4028, programs=("rollouts",))


def test_without_the_tpu_compiler_the_error_says_what_is_missing(monkeypatch):
  pytest.importorskip("jax.experimental.topologies")
  try:
    import libtpu  # pylint: disable=g-import-not-at-top,unused-import
    pytest.skip("libtpu is installed here")
  except ImportError:
    pass
  # What topology_devices sets for libtpu, restored after the test.
  monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-64")
  monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  with pytest.raises(RuntimeError, match=r"v5litepod-64: no TPU compiler for topology "
                     r"v5e:8x8 .*pip install -e '.\[tpu\]'"):
    memory_compiled.topology_devices(pods.get_slice("v5litepod-64"))


def test_overrides_set_fields_as_their_type_and_refuse_unknown_ones():
  from experiments import collabllm_8b  # pylint: disable=g-import-not-at-top
  config = collabllm_8b.get_config("slice=v5litepod-64")
  memory_compiled.override(config, ["model.param_dtype=bfloat16", "ppo.logits_chunk=256",
                                    "model.remat=false", "mesh_shape=1x32x2"])
  assert config.model.param_dtype == "bfloat16" and config.ppo.logits_chunk == 256
  assert config.model.remat is False and config.mesh_shape == (1, 32, 2)
  with pytest.raises(ValueError, match="model.no_such_field"):
    memory_compiled.override(config, ["model.no_such_field=1"])
