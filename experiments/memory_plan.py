"""Per-chip HBM plan for an 8B policy with its reference, simulator, reward model and KV caches.

  python -m experiments.memory_plan --out memory_plan.md
  python -m experiments.memory_plan --slices=v5p-64 --context=8192 --rollout_rows=1024

Nothing is counted by hand: every array comes from `jax.eval_shape` of the real constructors
(the transformer's init, the trainers' optimizer over the train state, `KVCache.init`, a forward
pass for activations), and every per-chip size from that array's shard shape under the mesh and
partition rules of experiments/pods.py (an abstract mesh: no devices needed).

Phases: rollouts hold the policy's and the simulator's KV caches; the PPO update holds gradients
and remat activations (each layer's input, plus fp32 logits and their gradient for one
microbatch). They never coexist, so peak = persistent + the larger phase. XLA's temporaries (one
layer's recompute, collective buffers) are not in the table: that is what the headroom is for.
"""

from __future__ import annotations

import math

from absl import app, flags
import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType, NamedSharding

from collab_rl import run as run_lib
from collab_rl import sharding
from collab_rl import train_state as state_lib
from collab_rl.models import attention, transformer
from experiments import lm_synthetic
from experiments import pods

_SLICES = flags.DEFINE_list("slices", ["v4-64", "v5e-256"], "Accelerator types to plan for.")
_CONTEXT = flags.DEFINE_integer("context", 4096, "Tokens per conversation: KV cache length and "
                                "training sequence length.")
_ROLLOUT_ROWS = flags.DEFINE_integer("rollout_rows", 512, "KV-cache rows decoded at once, "
                                     "global (conversations x MR futures).")
_TRAIN_ROWS = flags.DEFINE_integer("train_rows_per_chip", 1, "Conversations per chip in one "
                                   "gradient microbatch.")
_OUT = flags.DEFINE_string("out", None, "Also write the Markdown here.")

GIB = 2**30


def _model(fields: dict) -> transformer.Transformer:
  return transformer.Transformer(transformer.TransformerConfig.from_dict(fields))


def _abstract_params(model: transformer.Transformer):
  return jax.eval_shape(lambda: transformer.init_params(model, jax.random.key(0)))


def _bytes_per_chip(tree, specs, mesh: AbstractMesh) -> int:
  def leaf(x, spec):
    shard = NamedSharding(mesh, spec).shard_shape(x.shape)
    return math.prod(shard) * jnp.dtype(x.dtype).itemsize
  return sum(jax.tree_util.tree_leaves(jax.tree_util.tree_map(leaf, tree, specs)))


def _specs(shardings):
  return jax.tree_util.tree_map(lambda s: s.spec, shardings)


def plan_slice(accelerator: str, context: int, rollout_rows: int, train_rows: int) -> dict:
  """Per-chip bytes of every component on `accelerator`'s 8B mesh."""
  s = pods.get_slice(accelerator)
  shape = pods.policy_8b_mesh(s)
  mesh = AbstractMesh(shape, sharding.AXES, axis_types=(AxisType.Auto,) * len(shape))
  batch_ways = shape[0] * shape[1]
  if rollout_rows % batch_ways:
    raise ValueError(f"--rollout_rows={rollout_rows} is not a multiple of data x fsdp = "
                     f"{batch_ways} on {s.accelerator_type}")
  policy_fields = {**pods.LLAMA3_8B, "heads": ("lm", "value")}  # PPO: the value head is the critic
  policy = _model(policy_fields)
  lm_config = lm_synthetic.get_config()  # the trainers' clip + AdamW
  tx = run_lib.make_optimizer(lm_config.optimizer, lm_config.num_steps)
  state = jax.eval_shape(lambda: state_lib.create(
      transformer.init_params(policy, jax.random.key(0)), tx, jax.random.key(1)))
  state_specs = _specs(state_lib.state_shardings(state, mesh, pods.RULES_8B))
  out = {"slice": s, "mesh": shape, "policy_params": transformer.count_params(state.params)}
  out["params"] = _bytes_per_chip(state.params, state_specs.params, mesh)
  out["adam"] = _bytes_per_chip(state.opt_state, state_specs.opt_state, mesh)
  out["grads"] = out["params"]  # same shapes, dtypes and shardings as the params

  frozen = (("reference", ("lm",)), ("simulator", ("lm",)), ("reward_model", ("reward",)))
  for name, heads in frozen:
    params = _abstract_params(_model(pods.frozen(pods.LLAMA3_8B, heads)))
    out[name] = _bytes_per_chip(params, sharding.param_specs(params, pods.RULES_8B, mesh), mesh)
    out[f"{name}_params"] = transformer.count_params(params)

  # Rollouts: one cache per model that decodes (the policy and the LM user simulator).
  cache = jax.eval_shape(lambda: attention.KVCache.init(policy.cfg, rollout_rows, context))
  out["kv_caches"] = 2 * _bytes_per_chip(cache, pods.kv_cache_specs(cache), mesh)

  # The update: shapes of one chip's microbatch (its shard of the global batch).
  fwd = jax.eval_shape(
      lambda p, t: policy.apply({"params": p}, t, heads=("lm",)), state.params,
      jax.ShapeDtypeStruct((train_rows, context), jnp.int32))
  hidden = math.prod(fwd.hidden_BxLxD.shape) * jnp.dtype(fwd.hidden_BxLxD.dtype).itemsize
  logits = math.prod(fwd.logits_BxLxV.shape) * jnp.dtype(fwd.logits_BxLxV.dtype).itemsize
  out["activations"] = policy.cfg.num_hidden_layers * hidden + 2 * logits

  out["persistent"] = sum(out[k] for k in ("params", "adam", "reference", "simulator",
                                           "reward_model"))
  out["peak"] = out["persistent"] + max(out["kv_caches"], out["grads"] + out["activations"])
  return out


# (column title, key of plan_slice's result), in GiB per chip.
COLUMNS = (("policy params", "params"), ("AdamW", "adam"), ("grads", "grads"),
           ("reference", "reference"), ("simulator", "simulator"),
           ("reward model", "reward_model"), ("KV caches", "kv_caches"),
           ("activations", "activations"), ("peak", "peak"))


def markdown(plans: list[dict], context: int, rollout_rows: int, train_rows: int) -> str:
  p = plans[0]
  billions = {k: p[f"{k}_params"] / 1e9 for k in ("policy", "reference", "simulator",
                                                  "reward_model")}
  lines = [
      f"Llama-3-8B-shaped policy ({billions['policy']:.2f}B params with its value head, fp32 "
      "master weights + AdamW, bf16 compute, remat); frozen bf16 reference "
      f"({billions['reference']:.2f}B), LM simulator ({billions['simulator']:.2f}B) and reward "
      f"model ({billions['reward_model']:.2f}B). Rollout: {rollout_rows} KV-cache rows x "
      f"{context} tokens for the policy and for the simulator. Update: {train_rows} x "
      f"{context}-token conversation(s) per chip per microbatch. GiB per chip:",
      "",
      "| slice | chips / hosts | mesh (data, fsdp, model) | "
      + " | ".join(title for title, _ in COLUMNS) + " | HBM | headroom |",
      "| --- | --- | --- | " + " | ".join("---:" for _ in range(len(COLUMNS) + 2)) + " |",
  ]
  for p in plans:
    s = p["slice"]
    cells = [f"{p[key] / GIB:.2f}" for _, key in COLUMNS]
    headroom = s.hbm_gib - p["peak"] / GIB
    lines.append(f"| {s.accelerator_type} | {s.chips} / {s.hosts} | {p['mesh']} | "
                 + " | ".join(cells) + f" | {s.hbm_gib:g} | {headroom:.2f} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  plans = [plan_slice(a, _CONTEXT.value, _ROLLOUT_ROWS.value, _TRAIN_ROWS.value)
           for a in _SLICES.value]
  text = markdown(plans, _CONTEXT.value, _ROLLOUT_ROWS.value, _TRAIN_ROWS.value)
  print(text, end="")
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      f.write(text)


if __name__ == "__main__":
  app.run(main)
