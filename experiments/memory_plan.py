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

  python -m experiments.memory_plan --collabllm            # the language tier, per slice
  python -m experiments.memory_plan --collabllm --nojudge --slices=v5e-64
  python -m experiments.memory_plan --collabllm --compile   # + XLA's own figures (libtpu)

`--collabllm` plans experiments/collabllm_8b.py (`slice=` each of --slices) instead: its policy
and value head (the config's dtypes), the frozen reference (the starting params as the train
state holds them), the LM user and the optional judge (Llama-3.1-8B-Instruct's config.json, as
the workers load them), the rollout state of the policy and the user (`rollout.start` and the
policy's `init` on a `TextTask` built from the config, x (1 + S) rows for MR's futures, or x
(1 + reward.samples_chunk) where they are played a chunk at a time), the pass that computes the
batch's old and reference log-probs, and the update.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from absl import app, flags
import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType, NamedSharding
import ml_collections

from collab_rl import rewards
from collab_rl import rollout as rollout_lib
from collab_rl import run as run_lib
from collab_rl import run_rl
from collab_rl import sharding
from collab_rl import train_state as state_lib
from collab_rl.models import attention, hf, transformer
from collab_rl.tasks import text as text_lib
from experiments import collabllm_8b
from experiments import collabllm_shapes
from experiments import lm_synthetic
from experiments import pods

_SLICES = flags.DEFINE_list("slices", ["v4-64", "v5e-256"], "Accelerator types to plan for.")
_CONTEXT = flags.DEFINE_integer("context", 4096, "Tokens per conversation: KV cache length and "
                                "training sequence length.")
_ROLLOUT_ROWS = flags.DEFINE_integer("rollout_rows", 512, "KV-cache rows decoded at once, "
                                     "global (conversations x MR futures).")
_TRAIN_ROWS = flags.DEFINE_integer("train_rows_per_chip", 1, "Conversations per chip in one "
                                   "gradient microbatch.")
_COLLABLLM = flags.DEFINE_bool("collabllm", False, "Plan experiments/collabllm_8b.py (the "
                                "language tier) on --slices (default: COLLABLLM_SLICES).")
_JUDGE = flags.DEFINE_bool("judge", True, "With --collabllm: its `judge` variant, an 8B LM judge.")
_SHARE = flags.DEFINE_bool("share_base", True, "With --collabllm: the LM user and judge are the "
                           "policy's folder (as collabllm_8b's command gives them) and read its "
                           "frozen reference (run_text.shared_models); --noshare_base plans a "
                           "copy of each.")
_COMPILE = flags.DEFINE_bool("compile", False, "With --collabllm: also compile the run's PPO "
                             "programs for each slice's TPU topology on this CPU and print their "
                             "memory_analysis() beside the plan (needs libtpu: pip install "
                             "'jax[tpu]'; experiments/memory_compiled.py).")
_LORA_RANK = flags.DEFINE_list("lora_ranks", ["0"], "With --compile: the LoRA ranks to compile "
                               "the PPO programs with (0: full fine-tuning), e.g. 0,32.")
_OVERRIDES = flags.DEFINE_list("compile_overrides", [], "With --compile: config fields set "
                                "before compiling, as key=value in order (e.g. model.param_dtype="
                                "bfloat16; a tuple as mesh_shape=1x32x2): a candidate plan for a "
                                "program that does not fit.")
_PROGRAMS = flags.DEFINE_list("compile_programs", ["update", "logprob_pass", "rollout"],
                              "With --compile: which programs to compile (update, logprob_pass, "
                              "rollout: the collection with the LM user and MR's futures).")
_OUT = flags.DEFINE_string("out", None, "Also write the Markdown here.")

COLLABLLM_SLICES = ("v5litepod-64", "v4-64", "v5litepod-256")

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


def _mesh(shape) -> AbstractMesh:
  return AbstractMesh(tuple(shape), sharding.AXES, axis_types=(AxisType.Auto,) * len(shape))


@functools.lru_cache(maxsize=None)  # the same per-chip shapes recur from slice to slice
def _update_bytes(cfg: transformer.TransformerConfig, rows: int, length: int) -> tuple:
  """(remat activations of an update on `rows` x `length` tokens, its fp32 logits): each layer's
  input is kept for the backward pass; the logits and their gradient coexist. The shapes come
  from a forward pass of a one-layer model of the same widths (the layer count changes none)."""
  model = transformer.Transformer(dataclasses.replace(cfg, num_hidden_layers=1))
  fwd = jax.eval_shape(lambda p, t: model.apply({"params": p}, t, heads=("lm",)),
                       _abstract_params(model), jax.ShapeDtypeStruct((rows, length), jnp.int32))
  hidden = math.prod(fwd.hidden_BxLxD.shape) * jnp.dtype(fwd.hidden_BxLxD.dtype).itemsize
  logits = math.prod(fwd.logits_BxLxV.shape) * jnp.dtype(fwd.logits_BxLxV.dtype).itemsize
  return cfg.num_hidden_layers * hidden + 2 * logits, logits


def plan_slice(accelerator: str, context: int, rollout_rows: int, train_rows: int) -> dict:
  """Per-chip bytes of every component on `accelerator`'s 8B mesh."""
  s = pods.get_slice(accelerator)
  shape = pods.policy_8b_mesh(s)
  mesh = _mesh(shape)
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
  out["activations"], _ = _update_bytes(policy.cfg, train_rows, context)

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


# ------------------------------------------------------------------------------------------------
# The language tier: experiments/collabllm_8b.py.
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)  # slice-independent shapes, computed once
def _rl_state(cfg: transformer.TransformerConfig, optimizer: tuple) -> state_lib.TrainState:
  tx = run_lib.make_optimizer(ml_collections.ConfigDict(dict(optimizer)))  # the RL trainers'
  return jax.eval_shape(lambda: state_lib.create(
      transformer.init_params(transformer.Transformer(cfg), jax.random.key(0)), tx,
      jax.random.key(1)))


@functools.lru_cache(maxsize=None)
def _user_params(cfg: transformer.TransformerConfig):
  return _abstract_params(transformer.Transformer(cfg))


def collabllm_config(accelerator: str, judge: bool):
  return collabllm_8b.get_config(f"slice={accelerator}" + (",judge" if judge else ""))


def plan_collabllm(accelerator: str, judge: bool = True, share: bool = True) -> dict:
  """Per-chip bytes of experiments/collabllm_8b.py on `accelerator` (its `judge` variant with an
  8B judge when `judge`); with `share` the user and judge hold no weights of their own (their
  bf16 checkpoint is the policy's, whose fp32 reference holds it exactly)."""
  config = collabllm_config(accelerator, judge)
  s = pods.get_slice(accelerator)
  shape = pods.check_mesh(config.mesh_shape, s)
  mesh = _mesh(shape)
  ways = shape[0] * shape[1]
  rules = sharding.rules_from_config(config.partition_rules)
  # What the workers build: the user (and judge) from config.json as it is (bf16 weights); the
  # policy with config.json's architecture and the config's heads, dtypes, remat.
  hf_cfg = hf.config_from_hf(pods.LLAMA31_8B_INSTRUCT_HF)
  arch = {k: getattr(hf_cfg, k) for k in run_lib.HF_ARCHITECTURE}
  policy = _model({**config.model.to_dict(), **arch})
  user = transformer.Transformer(text_lib.user_model_config(config, hf_cfg))
  state = _rl_state(policy.cfg, tuple(sorted(config.optimizer.items())))
  specs = _specs(state_lib.state_shardings(state, mesh, rules))
  out = {"slice": s, "mesh": shape, "config": config, "policy": policy.cfg, "user_cfg": hf_cfg,
         "policy_params": transformer.count_params(state.params)}
  out["params"] = _bytes_per_chip(state.params, specs.params, mesh)
  out["adam"] = _bytes_per_chip(state.opt_state, specs.opt_state, mesh)
  out["grads"] = out["params"]
  out["reference"] = out["params"]  # run_rl.build: the starting params, as the state holds them
  user_params = _user_params(user.cfg)
  out["user_params"] = transformer.count_params(user_params)
  # What a copy of the user's (and the judge's) weights costs a chip: hf.load_pretrained, bf16.
  out["user_copy"] = _bytes_per_chip(user_params, sharding.param_specs(user_params, rules, mesh),
                                     mesh)
  out["shared"] = share
  out["user"] = 0 if share else out["user_copy"]
  out["judge"] = out["user"] if config.reward.w_int > 0 else 0

  # Rollout: the conversations' and the user's state as `rollout.start` and the policy's `init`
  # make them; MR's S futures tile every row (`rollout.tile_rows`) beside the B originals.
  rcfg = rewards.RewardConfig.from_config(config.reward)
  task = collabllm_shapes.task(config, user, rcfg)
  rollout_policy = run_rl.rollout_policy(config, policy, task, rcfg)
  max_len = run_rl.max_len(config, task, rcfg)
  b = config.batch_size
  intent = collabllm_shapes.intent(task, b)

  def begin(params, u_params, intent):
    bound = task.bind(u_params)
    conv, sim = rollout_lib.start(bound, intent, max_len)
    return conv, sim, rollout_policy.init(params, conv, rollout_lib.opening_width(bound))

  conv, sim, pstate = jax.eval_shape(begin, state.params, user_params, intent)
  copies = 1 + rcfg.chunk if config.reward.kind == "mr" else 1  # the futures live at once
  per_chip = lambda tree: _bytes_per_chip(tree, pods.kv_cache_specs(tree), mesh)
  out["policy_kv"] = copies * per_chip((conv, pstate))
  out["user_kv"] = copies * per_chip(sim)
  out.update(rows=b // ways, copies=copies, max_len=max_len, view_len=task.view_len,
             policy_cache=pstate.cache.valid_BxS.shape[1], user_cache=sim.cache.valid_BxS.shape[1])
  # XLA's largest temporary (not in the peak): one layer's attention scores while the user
  # prefills its prompt against its cache (compute dtype).
  out["prefill_scores"] = (user.cfg.num_attention_heads * task.ucfg.max_prompt_tokens
                           * out["user_cache"] * jnp.dtype(user.cfg.dtype).itemsize)  # a row

  # ppo.finish_batch: old (and then reference) log-probs of the whole batch, fp32 logits and
  # their log-softmax, without microbatches.
  _, logits = _update_bytes(policy.cfg, b // ways, max_len)
  out["logprob_pass"] = 2 * logits
  # The update: one minibatch, split over the chips.
  out["train_rows"] = b // config.ppo.minibatches // ways
  out["activations"], _ = _update_bytes(policy.cfg, out["train_rows"], max_len)

  out["persistent"] = sum(out[k] for k in ("params", "adam", "reference", "user", "judge"))
  out["peak"] = out["persistent"] + max(out["policy_kv"] + out["user_kv"], out["logprob_pass"],
                                        out["grads"] + out["activations"])
  return out


COLLABLLM_COLUMNS = (("policy params", "params"), ("AdamW", "adam"), ("grads", "grads"),
                     ("reference", "reference"), ("LM user", "user"), ("judge", "judge"),
                     ("policy KV", "policy_kv"), ("user KV", "user_kv"),
                     ("log-prob pass", "logprob_pass"), ("activations", "activations"),
                     ("peak", "peak"))


def markdown_collabllm(plans: list[dict]) -> str:
  p = plans[0]
  c, cfg = p["config"], p["policy"]
  judged = c.reward.w_int > 0  # the `judge` variant (its weights may be shared: 0 bytes)
  lines = [
      f"`experiments/collabllm_8b.py:slice=SLICE{',judge' if judged else ''}` "
      f"({c.reward.kind}, w = {c.reward.window}, S = {c.reward.samples}): Llama-3.1-8B-Instruct "
      f"policy ({p['policy_params'] / 1e9:.2f}B params with its value head, {cfg.param_dtype} "
      f"master weights + AdamW, {cfg.dtype} compute{', remat' if cfg.remat else ''}); its frozen "
      f"reference is the starting params as the train state holds them ({cfg.param_dtype}). The "
      + (f"LM user{' and the judge' if judged else ''} (the policy's folder, "
         f"{p['user_cfg'].dtype}, {p['user_params'] / 1e9:.2f}B) read that reference, which "
         "holds their weights exactly: no copy of their own (`run_text.shared_models`)."
         if p["shared"] else
         f"LM user is the same checkpoint loaded again as it is stored, {p['user_cfg'].dtype} "
         f"({p['user_params'] / 1e9:.2f}B: a second copy)"
         + ("; the judge a third copy." if judged else "; no judge."))
      + " Rollout: each conversation and the MR futures it plays at once (1 + S rows, or 1 + "
      "`reward.samples_chunk` where set: "
      + ", ".join(f"{q['copies']} on {q['slice'].accelerator_type}" for q in plans)
      + "), the policy's KV "
      f"cache {p['policy_cache']} tokens a row (conversations of {p['max_len']} columns), the "
      f"user's {p['user_cache']} (its chat: {p['view_len']}). Log-prob pass: old and reference "
      f"log-probs of a chip's conversations. Update: {p['train_rows']} x {p['max_len']} tokens "
      f"a chip per step. Not counted: XLA's temporaries, the largest being one layer's "
      f"attention scores in the user's prompt prefill ({p['prefill_scores'] / GIB:.2f} GiB a "
      "conversation). GiB per chip:",
      "",
      "| slice | chips / hosts | mesh (data, fsdp, model) | batch (a chip) | "
      + " | ".join(title for title, _ in COLLABLLM_COLUMNS) + " | HBM | headroom |",
      "| --- | --- | --- | ---: | "
      + " | ".join("---:" for _ in range(len(COLLABLLM_COLUMNS) + 2)) + " |",
  ]
  for q in plans:
    s = q["slice"]
    cells = [f"{q[key] / GIB:.2f}" for _, key in COLLABLLM_COLUMNS]
    lines.append(f"| {s.accelerator_type} | {s.chips} / {s.hosts} | {q['mesh']} | "
                 f"{q['config'].batch_size} ({q['rows']}) | " + " | ".join(cells)
                 + f" | {s.hbm_gib:g} | {s.hbm_gib - q['peak'] / GIB:.2f} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if _COLLABLLM.value:
    slices = _SLICES.value if flags.FLAGS["slices"].present else COLLABLLM_SLICES
    plans = {a: plan_collabllm(a, _JUDGE.value, _SHARE.value) for a in slices}
    text = markdown_collabllm(list(plans.values()))
    if _COMPILE.value:
      from experiments import memory_compiled  # pylint: disable=g-import-not-at-top
      print(text, flush=True)
      compiled = {}
      for a, p in plans.items():  # minutes a slice: each printed as soon as it is compiled
        compiled[a] = []
        for rank in (int(r) for r in _LORA_RANK.value):
          done = memory_compiled.compile_collabllm(a, _JUDGE.value, p["max_len"], rank,
                                                   _OVERRIDES.value, _PROGRAMS.value)
          compiled[a] += done
          print(memory_compiled.markdown({a: done}, plans), flush=True)
      text += "\n" + memory_compiled.markdown(compiled, plans)
      if _OUT.value:
        with open(_OUT.value, "w", encoding="utf-8") as f:
          f.write(text)
      return
  else:
    if _COMPILE.value:
      raise app.UsageError("--compile compiles the language tier's programs: add --collabllm")
    plans = [plan_slice(a, _CONTEXT.value, _ROLLOUT_ROWS.value, _TRAIN_ROWS.value)
             for a in _SLICES.value]
    text = markdown(plans, _CONTEXT.value, _ROLLOUT_ROWS.value, _TRAIN_ROWS.value)
  print(text, end="")
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      f.write(text)


if __name__ == "__main__":
  app.run(main)
