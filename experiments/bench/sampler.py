"""Sampler and train-step throughput of the width-256 reference model, written as JSON.

  python -m experiments.bench.sampler --out bench_out/sampler.json

Model: width 256, 4 layers, 8 heads, 2 key/value heads, vocab 2048, fp32 (MLP 688, ~8/3 D).
Generation: 64-token prompts, 128 new tokens (no stop token, so every row decodes all 128), at
batch 1 and 16; new tokens/s = batch * 128 / wall time of one jitted call (median of repeats,
compilation excluded), for each `--cache_buckets` (the model's `cache_buckets`: 1 attends over the
whole cache at every step, more over only its filled prefix; `--new_tokens` sets the cache's
length, 64 + new tokens). Train step: batch 16 x 256, AdamW, the LM trainer's step, tokens/s =
16 * 256 / median step time.
"""

from __future__ import annotations

import os
import platform

from absl import app, flags

from experiments.bench import common

_OUT = flags.DEFINE_string("out", "bench_out/sampler.json", "Where the JSON goes.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats per measurement (median reported).")
_BUCKETS = flags.DEFINE_list("cache_buckets", ["4"], "The model's cache_buckets values to time "
                             "generation with (1: attention over the whole cache).")
_NEW = flags.DEFINE_integer("new_tokens", 128, "New tokens per generation call.")

MODEL = dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, dtype="float32")


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import optax

  from collab_rl import sampling
  from collab_rl import train_state as state_lib
  from collab_rl.models import transformer as tfm
  from collab_rl.trainers import lm

  cfg = tfm.TransformerConfig(**MODEL)
  model = tfm.Transformer(cfg)
  params = tfm.init_params(model, jax.random.key(0))
  results = {"model": MODEL, "params": tfm.count_params(params), "backend": jax.default_backend(),
             "devices": jax.device_count(), "cpu_count": os.cpu_count(),
             "machine": platform.machine(), "jax": jax.__version__, "generation": {}}

  prompt_len, new = 64, _NEW.value
  results["new_tokens"] = new
  for buckets in map(int, _BUCKETS.value):
    gen_model = tfm.Transformer(tfm.TransformerConfig(**MODEL, cache_buckets=buckets))
    timings = results["generation"][f"cache_buckets_{buckets}"] = {}
    for greedy in (True, False):
      sample = sampling.make_sampler(gen_model, sampling.SamplingConfig(
          max_new_tokens=new, greedy=greedy, temperature=1.0))
      for batch in (1, 16):
        prompt = jax.random.randint(jax.random.key(1), (batch, prompt_len), 1, cfg.vocab_size)
        lengths = jnp.full((batch,), prompt_len)
        sec = common.median_seconds(lambda: sample(params, prompt, lengths, jax.random.key(2)),
                                  _REPEATS.value, jax.block_until_ready)
        name = f"{'greedy' if greedy else 'sampled'}_b{batch}"
        timings[name] = {"seconds": sec, "new_tokens_per_s": batch * new / sec}
        print(f"cache_buckets {buckets} {name}: {batch * new / sec:,.0f} new tokens/s "
              f"({sec * 1e3:.0f} ms per call)")

  batch, seq = 16, 256
  tx = optax.adamw(1e-3)
  state = state_lib.create(params, tx, jax.random.key(3))
  step = jax.jit(lambda s, b: lm.train_step(model, tx, s, b), donate_argnums=0)
  data = {"tokens": jax.random.randint(jax.random.key(4), (batch, seq + 1), 1, cfg.vocab_size),
          "length": jnp.full((batch,), seq + 1)}
  holder = [state]

  def one_step():
    holder[0], m = step(holder[0], data)
    return m["loss"]

  sec = common.median_seconds(one_step, _REPEATS.value, jax.block_until_ready)
  results["train_step"] = {"batch": batch, "seq_len": seq, "seconds": sec,
                           "tokens_per_s": batch * seq / sec}
  print(f"train step {batch}x{seq}: {batch * seq / sec:,.0f} tokens/s ({sec * 1e3:.0f} ms)")

  common.write_json(_OUT.value, results)


if __name__ == "__main__":
  app.run(main)
