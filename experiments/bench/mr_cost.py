"""What a multiturn-aware reward costs, and how it compares with CollabLLM's host loop.

  python -m experiments.bench.mr_cost --out bench_out/mr_cost.json

Policy: width 256, 4 layers, 8 heads, 2 key/value heads, fp32, ambig_math's vocabulary, random
weights (replies run to their 16-token budget: the expensive case). B = 64 candidate replies, each
the policy's first reply to a fresh episode; the scripted user with some noise, so futures differ.

1. Wall time of MR at every (window, samples) in {0,1,2,3} x {1,3,8}, one jitted call for all
   B x S futures, relative to one plain rollout turn (policy reply + user answer) of the same B.
2. CollabLLM's way on the same weights: for each reply and each of S futures, a Python loop over
   the window's turns that calls the scripted user on the host for one conversation, then
   transformers' `generate` for the policy's next reply. Reported as MR evaluations/s for both,
   and the ratio (timed on `--host_replies` replies; the per-reply cost does not depend on B).
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app, flags

from experiments.bench import common

_OUT = flags.DEFINE_string("out", "bench_out/mr_cost.json", "Where the JSON goes.")
_BATCH = flags.DEFINE_integer("batch", 64, "Candidate replies scored per call.")
_REPLY = flags.DEFINE_integer("reply_tokens", 16, "Budget of one assistant reply.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (median reported).")
_HOST_REPLIES = flags.DEFINE_integer("host_replies", 4, "Replies timed in the host loop.")
_HOST_WS = flags.DEFINE_string("host_window_samples", "2,3", "window,samples of the comparison.")


def host_loop_mr(task, hf_model, conv, sim, reply, reply_len, rows, window, samples, max_new):
  """CollabLLM-style MR: one conversation and one future at a time, generate() per policy turn."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from collab_rl import rewards
  from collab_rl import rollout as rollout_lib

  # The simulator itself runs jitted (one compilation for a single conversation), so the loop
  # is charged for its structure, not for op-by-op dispatch.
  answer = jax.jit(lambda c, s, r, l, k: rollout_lib.answer_reply(task, c, s, r, l, k))
  header = jax.jit(lambda c: rollout_lib.open_reply(task, c))
  values = []
  for r in rows:
    for s in range(samples):
      conv_r = jax.tree_util.tree_map(lambda x: x[r:r + 1], conv)
      sim_r = jax.tree_util.tree_map(lambda x: x[r:r + 1], sim)
      conv_r, sim_r = answer(conv_r, sim_r, reply[r:r + 1], reply_len[r:r + 1],
                             jax.random.key(s))
      for t in range(window):
        n = int(conv_r.cursor_B[0])
        ids = np.asarray(conv_r.tokens_BxL[0, :n]).tolist() + [task.assistant_header_id]
        with torch.no_grad():
          out = hf_model.generate(torch.tensor([ids]), do_sample=True, max_new_tokens=max_new,
                                  eos_token_id=task.eot_id, pad_token_id=0, top_k=0, top_p=1.0)
        new = out[0, len(ids):].tolist()
        new_arr = np.zeros((1, max_new), np.int32)
        new_arr[0, :len(new)] = new
        conv_r, sim_r = answer(header(conv_r), sim_r, jnp.asarray(new_arr),
                               jnp.array([len(new)], jnp.int32), jax.random.key(100 * s + t))
      total, _ = rewards.conversation_reward(task, conv_r, sim_r, rewards.RewardConfig())
      values.append(float(total[0]))
  return values


def main(argv):
  del argv
  import jax
  import torch
  import transformers

  from collab_rl import rewards
  from collab_rl import rollout as rollout_lib
  from collab_rl import sampling
  from collab_rl.models import hf
  from collab_rl.models import transformer as tfm
  from collab_rl.tasks import registry

  torch.set_num_threads(2)
  task = registry.make_task("ambig_math", {"noise_vague": 0.2, "noise_wrong": 0.1})
  cfg = tfm.TransformerConfig(vocab_size=task.vocab_size, hidden_size=256, intermediate_size=688,
                              num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2)
  model = tfm.Transformer(cfg)
  params = tfm.init_params(model, jax.random.key(0))
  b, n = _BATCH.value, _REPLY.value
  max_len = 16 + 5 * (n + task.sim.max_user_len + 4)
  policy = rollout_lib.lm_policy(model, sampling.SamplingConfig(
      max_new_tokens=n, temperature=1.0, stop_tokens=(task.eot_id,)),
      chunk_width=rollout_lib.chunk_width(task), max_turns=5)

  @jax.jit
  def first_reply(key):
    intent = task.sample_intents(key, b)
    conv, sim = rollout_lib.start(task, intent, max_len)
    pstate = policy.init(params, conv, 2 + task.first_request(intent)[0].shape[1])
    conv = rollout_lib.open_reply(task, conv)
    reply, _, reply_len, pstate = policy(params, conv, sim, pstate, jax.random.key(1))
    return conv, sim, pstate, reply, reply_len

  conv, sim, pstate, reply, reply_len = first_reply(jax.random.key(0))

  def one_turn(key, conv, sim, pstate, reply, reply_len):
    c, s = rollout_lib.answer_reply(task, conv, sim, reply, reply_len, key)
    return rollout_lib.take_turns(policy, task, params, c, s, key, 1,
                                  policy_state=pstate).conv.tokens_BxL

  turn_fn = jax.jit(one_turn)
  inputs = (conv, sim, pstate, reply, reply_len)
  turn_sec = common.median_seconds(lambda: turn_fn(jax.random.key(2), *inputs), _REPEATS.value,
                                   jax.block_until_ready)
  # The batching headroom: the same turn for 8x the rows (what S = 8 futures are). On hardware
  # far from its compute bound this costs well under 8x; where it costs ~8x, MR's S = 8 cannot
  # cost less than ~8x S = 1 whatever the implementation, since the futures' work is 8x.
  tiled = rollout_lib.tile_rows(inputs, 8)
  turn8_sec = common.median_seconds(lambda: turn_fn(jax.random.key(2), *tiled), _REPEATS.value,
                                    jax.block_until_ready)
  print(f"one turn: {turn_sec * 1e3:.1f} ms at B={b}, {turn8_sec * 1e3:.1f} ms at B={8 * b} "
        f"({turn8_sec / turn_sec:.2f}x)")
  grid = {}
  for window in (0, 1, 2, 3):
    for samples in (1, 3, 8):
      rc = rewards.RewardConfig(window=window, samples=samples)
      fn = jax.jit(lambda key, rc=rc: rewards.multiturn_aware_reward(
          policy, task, params, conv, sim, pstate, reply, reply_len, key, rc)[0])
      sec = common.median_seconds(lambda: fn(jax.random.key(3)), _REPEATS.value,
                                  jax.block_until_ready)
      grid[f"w{window}_s{samples}"] = {"seconds": sec, "relative_to_one_turn": sec / turn_sec,
                                       "mr_per_s": b / sec}
      print(f"w={window} S={samples}: {sec * 1e3:8.1f} ms  ({sec / turn_sec:5.2f} turns)")
  ratios_s8_over_s1 = {f"w{w}": grid[f"w{w}_s8"]["seconds"] / grid[f"w{w}_s1"]["seconds"]
                       for w in (0, 1, 2, 3)}

  # CollabLLM's way, on the same weights.
  hw, hs = (int(x) for x in _HOST_WS.value.split(","))
  with tempfile.TemporaryDirectory() as folder:
    hf.save_pretrained(model, params, folder)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  rows = list(range(_HOST_REPLIES.value))
  host_loop_mr(task, hf_model, conv, sim, reply, reply_len, rows[:1], 1, 1, n)  # warm up
  t0 = time.perf_counter()
  host_loop_mr(task, hf_model, conv, sim, reply, reply_len, rows, hw, hs, n)
  host_sec = time.perf_counter() - t0
  ours = grid[f"w{hw}_s{hs}"]
  result = {
      "batch": b, "reply_budget": n, "one_turn_seconds": turn_sec,
      "one_turn_8x_rows_seconds": turn8_sec, "one_turn_8x_rows_over_1x": turn8_sec / turn_sec,
      "grid": grid,
      "s8_over_s1": ratios_s8_over_s1, "cpu_count": os.cpu_count(), "jax": jax.__version__,
      "transformers": transformers.__version__,
      "host_loop": {"window": hw, "samples": hs, "replies": len(rows), "seconds": host_sec,
                    "mr_per_s": len(rows) / host_sec},
      "collab_rl_mr_per_s": ours["mr_per_s"],
      "ratio_collab_rl_over_host_loop": ours["mr_per_s"] / (len(rows) / host_sec),
  }
  print(f"S=8 / S=1 cost: {ratios_s8_over_s1}")
  print(f"MR/s at w={hw} S={hs}: collab_rl {ours['mr_per_s']:.1f}, host loop "
        f"{len(rows) / host_sec:.2f}, ratio {result['ratio_collab_rl_over_host_loop']:.1f}x")
  common.write_json(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)
