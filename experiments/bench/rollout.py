"""Rollout throughput: the width-256 policy against the scripted user, 6 turns, batch 256.

  python -m experiments.bench.rollout --out bench_out/rollout.json

Policy: width 256, 4 layers, 8 heads, 2 key/value heads, fp32, the task's vocabulary; random
weights, so replies mostly run to the 16-token budget (the most expensive case). One jitted call
plays 6 assistant turns and 6 user turns for every conversation. Reported: conversations/s,
tokens/s (all tokens written, policy and user), and the share of the time spent in the scripted
simulator, measured as 6 standalone jitted `user_turn` calls on the same batch over the full
rollout's time. The oracle-policy rollout (no transformer at all) is reported too: it is the
cost of the simulator plus the conversation bookkeeping.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from experiments.bench import common

_OUT = flags.DEFINE_string("out", "bench_out/rollout.json", "Where the JSON goes.")
_TASK = flags.DEFINE_string("task", "ambig_math", "Task to play.")
_BATCH = flags.DEFINE_integer("batch", 256, "Conversations per call.")
_TURNS = flags.DEFINE_integer("turns", 6, "Assistant turns (each followed by a user turn).")
_REPLY = flags.DEFINE_integer("reply_tokens", 16, "Budget of one assistant reply.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (median reported).")
_BUCKETS = flags.DEFINE_integer("cache_buckets", 4, "The policy's cache_buckets (1: attention "
                                "over the whole conversation cache at every step).")


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp

  from collab_rl import rollout as rollout_lib
  from collab_rl import sampling
  from collab_rl.models import transformer as tfm
  from collab_rl.tasks import registry
  from collab_rl.tokenizer import ASSISTANT

  task = registry.make_task(_TASK.value)
  cfg = tfm.TransformerConfig(vocab_size=task.vocab_size, hidden_size=256, intermediate_size=688,
                              num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                              cache_buckets=_BUCKETS.value)
  model = tfm.Transformer(cfg)
  params = tfm.init_params(model, jax.random.key(0))
  b, turns = _BATCH.value, _TURNS.value
  max_len = 16 + turns * (_REPLY.value + task.sim.max_user_len + 4)
  policy = rollout_lib.lm_policy(model, sampling.SamplingConfig(
      max_new_tokens=_REPLY.value, temperature=1.0, stop_tokens=(task.eot_id,)),
      chunk_width=rollout_lib.chunk_width(task), max_turns=turns)
  run = rollout_lib.make_rollout(policy, task, batch=b, num_turns=turns, max_len=max_len)
  ro = run(params, jax.random.key(1))
  sec = common.median_seconds(lambda: run(params, jax.random.key(1)).conv.tokens_BxL,
                              _REPEATS.value, jax.block_until_ready)
  roles = jax.device_get(ro.conv.roles_BxL)
  policy_tokens = int((roles == ASSISTANT).sum())
  all_tokens = int(jax.device_get(ro.conv.cursor_B).sum())

  oracle = rollout_lib.make_rollout(rollout_lib.oracle_policy(task), task, batch=b,
                                    num_turns=turns, max_len=max_len)
  oracle_sec = common.median_seconds(lambda: oracle(None, jax.random.key(1)).conv.tokens_BxL,
                                     _REPEATS.value, jax.block_until_ready)

  intent = task.sample_intents(jax.random.key(2), b)
  sim = task.init_sim(intent)
  reply = jnp.asarray(jax.device_get(ro.conv.tokens_BxL))[:, :_REPLY.value]
  reply_len = jnp.full((b,), _REPLY.value, jnp.int32)
  user_turn = jax.jit(task.user_turn)

  def six_user_turns():
    s, out = sim, None
    for t in range(turns):
      out, _, _, s = user_turn(intent, s, reply, reply_len, jax.random.key(t))
    return out

  sim_sec = common.median_seconds(six_user_turns, _REPEATS.value, jax.block_until_ready)
  result = {
      "task": _TASK.value, "batch": b, "turns": turns, "reply_budget": _REPLY.value,
      "max_len": max_len, "policy": {"hidden_size": 256, "layers": 4, "heads": 8, "kv_heads": 2,
                                     "cache_buckets": _BUCKETS.value, "vocab": task.vocab_size,
                                     "params": tfm.count_params(params)},
      "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
      "seconds": sec, "conversations_per_s": b / sec, "tokens_per_s": all_tokens / sec,
      "policy_tokens_per_s": policy_tokens / sec,
      "simulator_seconds": sim_sec, "simulator_share": sim_sec / sec,
      "oracle_rollout_seconds": oracle_sec, "oracle_share": oracle_sec / sec,
  }
  print(json.dumps(result, indent=2))
  common.write_json(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)
