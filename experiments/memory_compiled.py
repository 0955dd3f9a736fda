"""The compiled programs' own memory, per chip, on a TPU slice's real topology, from this CPU.

  pip install "jax[tpu]"    # libtpu: only its compiler is used; no TPU is needed
  python -m experiments.memory_plan --collabllm --compile --slices=v5litepod-64
  python -m experiments.memory_plan --collabllm --compile --slices=v4-64 \
      --compile_programs=rollout --compile_overrides=reward.samples_chunk=1

`memory_plan` sums array shards; this lowers and compiles the run's real jitted programs with
XLA's TPU compiler for the slice's topology (`jax.experimental.topologies`, compile-only devices)
and reads `memory_analysis()`: arguments, outputs, temporaries and what donation aliases, as
the chip will hold them, XLA's temporaries included. Programs of
experiments/collabllm_8b.py:slice=SLICE (PPO with MR on the language tier):

- `update`: `run_rl.jit_update` of `ppo.ppo_loss` (one minibatch step: forward, backward, AdamW;
  the train state donated), at the config's minibatch and conversation length;
- `logprob_pass`: `ppo.finish_batch` (values, old and reference log-probs, advantages of a
  collected batch);
- `rollout`: `ppo.jit_collect_text`, the collection of a batch (the policy's replies, the LM
  user's turns and MR's S futures of every reply, in one program), the user reading the
  policy's reference as `run_text.shared_models` has it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
from typing import Sequence

import jax
import jax.numpy as jnp

from collab_rl import conversation as conv_lib
from collab_rl import rewards
from collab_rl import run as run_lib
from collab_rl import run_rl
from collab_rl import sharding
from collab_rl import train_state as state_lib
from collab_rl.models import hf, lora, transformer
from collab_rl.tasks import text as text_lib
from collab_rl.trainers import ppo
from experiments import collabllm_8b
from experiments import collabllm_shapes
from experiments import pods

GIB = 2**30
PROGRAMS = ("update", "logprob_pass", "rollout")  # what compile_collabllm can compile


@dataclasses.dataclass(frozen=True)
class Compiled:
  program: str
  arguments: int  # bytes per chip
  outputs: int
  aliased: int  # outputs that reuse a donated argument's buffer
  temporaries: int
  fits: bool = True  # False: XLA refused it (the temporaries are what it asked for)
  lora_rank: int = 0  # > 0: the run trains LoRA adapters of this rank, the base frozen

  @property
  def peak(self) -> int:
    """What the chip holds while the program runs: its live arguments, the outputs that do not
    reuse a donated argument, and XLA's temporaries."""
    return self.arguments + self.outputs - self.aliased + self.temporaries


def topology_devices(s: pods.Slice):
  """Compile-only devices of the slice (one per chip: v4/v5p chips as megacore)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # libtpu reads these to place hosts; on a CPU machine they describe the slice compiled for.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", s.accelerator_type)
  # Compile-only: no chip is opened, so several checks may run at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  kwargs = {"chip_config_name": "megacore"} if pods.GENERATIONS[s.generation].cores_per_chip > 1 \
      else {}
  try:
    topo = topologies.get_topology_desc(topology_name=f"{s.generation}:{s.topology}",
                                        platform="tpu", **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    try:
      import libtpu  # pylint: disable=g-import-not-at-top,unused-import
      hint = ""
    except ImportError:
      hint = "; libtpu is not installed: pip install -e '.[tpu]'"
    raise RuntimeError(
        f"{s.accelerator_type}: no TPU compiler for topology {s.generation}:{s.topology} "
        f"({type(e).__name__}: {str(e)[:200]}){hint}") from e
  if len(topo.devices) != s.chips:
    raise RuntimeError(f"{s.accelerator_type}: the topology has {len(topo.devices)} devices, "
                       f"the slice {s.chips} chips")
  return topo.devices


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
# XLA's refusal names what the program asked for, e.g. "the total memory required for HLO
# temporaries (127.50G) exceeds available HBM (15.75G)".
# How XLA's TPU compiler words a refusal: "... required for HLO temporaries (127.50G) exceeds
# ..." or "Ran out of memory in memory space hbm ... HLO temp   14.65G (...".
_TOO_BIG = re.compile(r"(?:required for HLO temporaries \(|HLO temp\s+)([\d.]+)([KMGT])")


def _stats(name: str, jitted, *args, lora_rank: int = 0) -> Compiled:
  """`jitted` compiled for `args` (ShapeDtypeStructs with shardings), and its memory per chip;
  a program that does not fit is reported with the temporaries XLA asked for, not raised."""
  arg_bytes = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                  for x in jax.tree_util.tree_leaves(args))
  try:
    m = jitted.lower(*args).compile().memory_analysis()
  except jax.errors.JaxRuntimeError as e:
    found = _TOO_BIG.search(str(e))
    if "RESOURCE_EXHAUSTED" not in str(e) or not found:
      raise
    temps = int(float(found.group(1)) * _UNITS[found.group(2)])
    return Compiled(name, arg_bytes, 0, 0, temps, fits=False, lora_rank=lora_rank)
  return Compiled(name, m.argument_size_in_bytes, m.output_size_in_bytes,
                  m.alias_size_in_bytes, m.temp_size_in_bytes, lora_rank=lora_rank)


def override(config, assignments: Sequence[str]) -> None:
  """Sets `key=value` fields of `config` (dotted keys), in order, each value parsed as the
  field's type; a tuple's items are joined by "x" (`mesh_shape=1x32x2`)."""
  for a in assignments:
    key, sep, value = a.partition("=")
    *path, name = key.split(".")
    node = config
    for p in path:
      node = node[p]
    if not sep or name not in node:
      raise ValueError(f"override {a!r}: want key=value with an existing config field")
    old = node[name]
    if isinstance(old, (tuple, list)):
      node[name] = type(old)(type(old[0])(v) for v in value.split("x"))
    elif isinstance(old, bool):
      node[name] = value.lower() in ("1", "true")
    else:
      node[name] = type(old)(value) if old is not None else value


def compile_collabllm(accelerator: str, judge: bool, length: int, lora_rank: int = 0,
                      overrides: Sequence[str] = (),
                      programs: Sequence[str] = PROGRAMS) -> list[Compiled]:
  """Compiles experiments/collabllm_8b.py's PPO `programs` (of `PROGRAMS`) for `accelerator`'s
  topology, on conversations of `length` tokens (memory_plan.plan_collabllm's `max_len`); with
  `lora_rank` the run's LoRA state (config.lora: the base frozen, adapters and the critic
  trained); `overrides`: config fields set first (`override`)."""
  unknown = sorted(set(programs) - set(PROGRAMS))
  if unknown:
    raise ValueError(f"no program {unknown}: choose from {PROGRAMS}")
  config = collabllm_8b.get_config(f"slice={accelerator}" + (",judge" if judge else ""))
  config.lora.rank = lora_rank
  override(config, overrides)
  s = pods.get_slice(accelerator)
  mesh = sharding.make_mesh(pods.check_mesh(config.mesh_shape, s), devices=topology_devices(s))
  rules = sharding.rules_from_config(config.partition_rules)
  hf_cfg = hf.config_from_hf(pods.LLAMA31_8B_INSTRUCT_HF)
  arch = {k: getattr(hf_cfg, k) for k in run_lib.HF_ARCHITECTURE}
  model = transformer.Transformer(transformer.TransformerConfig.from_dict(
      {**config.model.to_dict(), **arch}))
  tx = run_lib.make_optimizer(config.optimizer, config.num_steps)
  lcfg = run_lib.lora_config(config)
  if lcfg.enabled:  # as run.init_state builds a run with adapters
    tx = lora.trainable_only(tx, lcfg)
  abstract = jax.eval_shape(lambda: state_lib.fresh_init_fn(model, tx, 0, lcfg)())
  if lcfg.enabled:
    model = lora.LoraModel(model, lcfg)
  state_sh = state_lib.state_shardings(abstract, mesh, rules)
  batch_sh = sharding.batch_sharding(mesh)
  turns = config.num_turns

  # Shapes of the batch as ppo.finish_batch returns it (its keys carry them).
  def batch(rows: int) -> dict:
    bxl = lambda dtype: jax.ShapeDtypeStruct((rows, length), dtype, sharding=batch_sh)
    bxt = lambda dtype: jax.ShapeDtypeStruct((rows, turns), dtype, sharding=batch_sh)
    return dict(tokens_BxL=bxl(jnp.int32), valid_BxL=bxl(jnp.bool_), mask_BxL=bxl(jnp.bool_),
                old_logprobs_BxL=bxl(jnp.float32), ref_logprobs_BxL=bxl(jnp.float32),
                advantages_BxL=bxl(jnp.float32), header_pos_BxT=bxt(jnp.int32),
                old_values_BxT=bxt(jnp.float32), returns_BxT=bxt(jnp.float32),
                turn_valid_BxT=bxt(jnp.float32))

  with_sh = lambda tree, sh: jax.tree_util.tree_map(
      lambda x, s_: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s_), tree, sh)
  state = with_sh(abstract, state_sh)
  rows = config.batch_size

  def update_program():
    # The trainer's own jitted step (ppo.train: run_rl.jit_update of ppo_loss), on what its
    # run scaffold would hold: the optimizer and the state's shardings.
    update = run_rl.jit_update(types.SimpleNamespace(model=model, tx=tx, shardings=state_sh),
                               mesh, lambda p, mb, key=None: ppo.ppo_loss(model, config, p, mb,
                                                                          key))
    return update, (state, batch(rows // config.ppo.minibatches))

  def logprob_program():
    # The log-prob pass over a whole collected batch: policy and reference (the starting params,
    # the train state's dtype and sharding; with adapters the base inside the params, no copy).
    played = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sh),
        jax.eval_shape(lambda: conv_lib.empty(rows, length)))
    per_turn = [jax.ShapeDtypeStruct((rows, turns), d, sharding=batch_sh)
                for d in (jnp.float32, jnp.bool_, jnp.float32, jnp.int32)]
    if lcfg.enabled:
      return jax.jit(lambda p, c, *t: ppo.finish_batch(config, model, p, lora.reference(p), c,
                                                       *t)), (state.params, played, *per_turn)
    return (jax.jit(lambda p, r, c, *t: ppo.finish_batch(config, model, p, r, c, *t)),
            (state.params, state.params, played, *per_turn))

  def rollout_program():
    # The trainer's own jitted collection (ppo.jit_collect_text): the policy, the LM user and
    # MR's futures in one program, on the batch's records' intent as the world places them.
    # The user shares the policy's reference (run_text.shared_models): its params are the
    # reference's arrays, the starting params (with adapters, the state's own base).
    rcfg = rewards.RewardConfig.from_config(config.reward)
    user = transformer.Transformer(text_lib.user_model_config(config, hf_cfg))
    task = collabllm_shapes.task(config, user, rcfg)
    policy = run_rl.rollout_policy(config, model, task, rcfg)
    reference = lora.weights(lora.reference(state.params) if lcfg.enabled else state.params,
                             None)
    names = jax.eval_shape(lambda: transformer.init_params(user, jax.random.key(0)))
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                               sharding=sharding.replicated(mesh))
    return (ppo.jit_collect_text(config, model, task, policy, rcfg),
            (state.params, {name: reference[name] for name in names}, key,
             collabllm_shapes.intent(task, rows, batch_sh)))

  build = {"update": update_program, "logprob_pass": logprob_program,
           "rollout": rollout_program}
  out = []
  with jax.set_mesh(mesh):  # as the trainers run: activations carry their row sharding
    for name in programs:
      jitted, args = build[name]()
      out.append(_stats(name, jitted, *args, lora_rank=lora_rank))
  return out


# The hand plan's phase of each program (memory_plan.plan_collabllm's keys), beside the
# persistent state.
_PLANNED = {"update": ("grads", "activations"), "logprob_pass": ("logprob_pass",),
            "rollout": ("policy_kv", "user_kv")}


def markdown(results: dict[str, list[Compiled]], plans: dict[str, dict]) -> str:
  lines = ["Compiled by XLA's TPU compiler for each slice's topology (compile-only devices on "
           "this CPU), GiB per chip; `plan` is memory_plan's sum of array shards for the same "
           "phase:", "",
           "| slice | program | arguments | outputs | aliased | temporaries | compiled peak | "
           "plan | HBM | headroom |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: "
           "| ---: | ---: |"]
  for accelerator, programs in results.items():
    p, s = plans[accelerator], pods.get_slice(accelerator)
    for c in programs:
      plan = p["persistent"] + sum(p[k] for k in _PLANNED[c.program])
      lines.append(
          f"| {s.accelerator_type} | {c.program}{f' (LoRA r={c.lora_rank})' if c.lora_rank else ''}"
          f" | {c.arguments / GIB:.2f} | "
          f"{c.outputs / GIB:.2f} | {c.aliased / GIB:.2f} | {c.temporaries / GIB:.2f} | "
          f"{c.peak / GIB:.2f}{'' if c.fits else ' (refused)'} | "
          f"{plan / GIB:.2f} | {s.hbm_gib:g} | {s.hbm_gib - c.peak / GIB:.2f} |")
  return "\n".join(lines) + "\n"
