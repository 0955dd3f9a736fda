"""Cloud TPU slices and how an 8B-class run is laid out on them.

  from experiments import pods
  pods.get_slice("v5e-256")          # Slice('v5litepod-256', chips=256, hosts=64, ...)
  pods.policy_8b_mesh("v4-64")       # (1, 32, 1): (data, fsdp, model)
  pods.check_mesh((4, 64, 1), "v5litepod-256")

A slice is one TPU VM per host: `hosts` JAX processes, each with `chips // hosts` devices (v4 and
v5p chips are megacore: one JAX device per chip). The launcher (launch/tpu.py) reads accelerator
types, host counts and default runtime images from here; experiments/memory_plan.py checks that
an 8B policy, its frozen reference, the simulator, the reward model and the KV caches fit.

8B layout: every matrix's larger dim over `fsdp` (collab_rl.sharding.LLAMA_RULES), batches over
data x fsdp. The frozen models use the same rules on the same mesh, so the reference's log-probs
and the simulator's turns run inside the policy's jit without any resharding; KV caches split
their rows over data x fsdp and their kv heads over `model`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import jax
from jax.sharding import PartitionSpec as P

from collab_rl import sharding


@dataclasses.dataclass(frozen=True)
class Generation:
  prefix: str  # gcloud's accelerator-type prefix
  cores_per_chip: int  # the number in "v4-64" counts TensorCores; v4/v5p chips have two
  chips_per_host: int  # multi-host slices; single-host ones hold up to `single_host_chips`
  single_host_chips: int
  hbm_gib: float  # per chip
  runtime_version: str  # default TPU VM image for JAX
  fsdp_8b: int  # fsdp ways for an 8B policy: enough for its state to fit, no more (collectives)
  topologies: dict[int, str]  # chips -> topology of the slices offered


GENERATIONS = {
    "v4": Generation("v4", 2, 4, 4, 32, "tpu-ubuntu2204-base", 32, {
        4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
        256: "4x8x8", 512: "8x8x8"}),
    "v5e": Generation("v5litepod", 1, 4, 8, 16, "v2-alpha-tpuv5-lite", 64, {
        1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
        256: "16x16"}),
    "v5p": Generation("v5p", 2, 4, 4, 95, "v2-alpha-tpuv5", 16, {
        4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
        256: "4x8x8"}),
    "v6e": Generation("v6e", 1, 4, 8, 32, "v2-alpha-tpuv6e", 32, {
        1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
        256: "16x16"}),
}


@dataclasses.dataclass(frozen=True)
class Slice:
  accelerator_type: str  # as gcloud spells it: v4-64, v5litepod-256, v5p-128, v6e-64
  generation: str
  chips: int  # = JAX devices
  hosts: int  # TPU VM workers = JAX processes
  topology: str
  hbm_gib: float  # per chip
  runtime_version: str

  @property
  def devices_per_host(self) -> int:
    return self.chips // self.hosts


def _slices() -> dict[str, Slice]:
  out = {}
  for gen_name, g in GENERATIONS.items():
    for chips, topology in g.topologies.items():
      hosts = 1 if chips <= g.single_host_chips else chips // g.chips_per_host
      name = f"{g.prefix}-{chips * g.cores_per_chip}"
      out[name] = Slice(name, gen_name, chips, hosts, topology, g.hbm_gib, g.runtime_version)
  return out


SLICES = _slices()


def get_slice(name: str) -> Slice:
  """An accelerator type as gcloud spells it, or with the generation's short name (v5e-256)."""
  m = re.fullmatch(r"(v5e|v5litepod)-(\d+)", name)
  key = f"v5litepod-{m.group(2)}" if m else name
  if key not in SLICES:
    raise ValueError(f"unknown accelerator type {name!r}; known: {', '.join(SLICES)} "
                     "(v5e-N is accepted for v5litepod-N)")
  return SLICES[key]


def check_mesh(shape: Sequence[int], accelerator: str | Slice) -> tuple[int, int, int]:
  """(data, fsdp, model) with one -1 filled, or a ValueError saying why it does not fit."""
  s = accelerator if isinstance(accelerator, Slice) else get_slice(accelerator)
  try:
    resolved = sharding.mesh_shape(shape, s.chips)
  except ValueError as e:
    raise ValueError(f"{e} (slice {s.accelerator_type} has {s.chips} chips)") from None
  return tuple(resolved)


def policy_8b_mesh(accelerator: str | Slice) -> tuple[int, int, int]:
  """The mesh for an 8B policy on a slice: fsdp as in the generation's table, the rest data."""
  s = accelerator if isinstance(accelerator, Slice) else get_slice(accelerator)
  fsdp = min(GENERATIONS[s.generation].fsdp_8b, s.chips)
  return check_mesh((-1, fsdp, 1), s)


# The Llama-3-8B shape (Hugging Face config.json of meta-llama/Meta-Llama-3-8B), in this
# project's TransformerConfig fields. Policies keep fp32 master weights and compute in bf16.
LLAMA3_8B = dict(
    vocab_size=128_256, hidden_size=4096, intermediate_size=14_336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500_000.0,
    max_position_embeddings=8192, tie_word_embeddings=False, dtype="bfloat16",
    param_dtype="float32", remat=True)


def frozen(model: dict, heads: Sequence[str] = ("lm",)) -> dict:
  """A frozen copy's config: bf16 weights (never updated, so no fp32 master), given heads."""
  return {**model, "param_dtype": "bfloat16", "heads": tuple(heads)}


# Params over fsdp, batches over data x fsdp: the library's Llama rules already shard every
# matrix's larger dim over fsdp (and its head/MLP dim over model, a no-op at model = 1). The
# frozen reference, simulator and reward model use the same rules on the same mesh.
RULES_8B = sharding.LLAMA_RULES


def kv_cache_specs(cache):
  """PartitionSpecs for a KVCache pytree: rows over data x fsdp, kv heads over model."""
  def spec(x):
    if x.ndim == 4:  # keys [B, K, H, S], values [B, K, S, H]
      return P(sharding.BATCH_AXES, "model", None, None)
    if x.ndim == 5:  # with model.scan_layers, every layer's in one array: [B, L, K, ...]
      return P(sharding.BATCH_AXES, None, "model", None, None)
    return P(sharding.BATCH_AXES) if x.ndim else P()  # valid/positions [B, S]; index
  return jax.tree_util.tree_map(spec, cache)


# Llama-3.1-8B-Instruct's config.json (meta-llama/Llama-3.1-8B-Instruct on the Hugging Face Hub),
# as published: what `init_from_hf` and `sim.user_from` read on the workers. The same sizes as
# Llama-3-8B; Llama-3.1 adds its RoPE scaling and a 128k context. Weights are bf16 (16 GB).
LLAMA31_8B_INSTRUCT_HF = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False,
    mlp_bias=False, hidden_act="silu", bos_token_id=128_000,
    eos_token_id=[128_001, 128_008, 128_009], vocab_size=128_256, hidden_size=4096,
    intermediate_size=14_336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=131_072, rms_norm_eps=1e-5,
    rope_theta=500_000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192),
    tie_word_embeddings=False, torch_dtype="bfloat16")
