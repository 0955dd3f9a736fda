"""collab_rl against Hugging Face transformers on the same weights, in one process, as JSON.

  python -m experiments.bench.vs_transformers --out bench_out/vs_transformers.json

A tiny random Llama (width 256, 4 layers, 8 heads, 2 key/value heads, vocab 2048, fp32) is built
with transformers, saved, and loaded into collab_rl with `models.hf.load_pretrained`, so both run
identical weights. Both use 2 threads. Generation: 64-token prompts, 128 new tokens (no early
stop), greedy and sampled (temperature 1, no top-k/top-p), batch 1 and 16; new tokens/s from the
median wall time of `--repeats` calls after a warm-up (compilation excluded). Train step: batch
16 x 256, AdamW (lr 1e-3), next-token loss, forward + backward + update; tokens/s from the median
step time.

`--host_devices 2` (the default) splits XLA's CPU into 2 devices and runs the batch-16
generation and the train step data-parallel over them (`sharding.batch_sharding`): the decode
step's dots at 8-16 rows run on one thread each (YNNPACK never splits a dot that small over
threads, as a perfetto trace shows), so one device leaves the second core idle while torch uses
both. Batch 1 cannot be split and runs on one device. `--host_devices 1` gives the single-device
figures. The replicated weights of the batch-16 generation are one copy in host memory that
both devices read (`sharding.replicate_host_shared`), as torch's two threads read one copy.
"""

from __future__ import annotations

import os
import platform
import tempfile

from absl import app, flags

from experiments.bench import common

_OUT = flags.DEFINE_string("out", "bench_out/vs_transformers.json", "Where the JSON goes.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats (median reported).")
_THREADS = flags.DEFINE_integer("threads", 2, "Threads for torch (XLA uses the machine's cores).")
_HOST_DEVICES = flags.DEFINE_integer("host_devices", 2, "XLA CPU devices the batch-16 runs are "
                                     "split over (data parallel); 1: one device.", lower_bound=1)

HF_CONFIG = dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                 rms_norm_eps=1e-6, tie_word_embeddings=False)
PROMPT, NEW, TRAIN_BATCH, TRAIN_LEN = 64, 128, 16, 256


def bench_transformers(folder: str, repeats: int) -> dict:
  import torch
  import transformers

  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  out = {"generation": {}}
  for greedy in (True, False):
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0, do_sample=not greedy)
    if not greedy:
      kw.update(temperature=1.0, top_k=0, top_p=1.0)
    for batch in (1, 16):
      prompt = torch.randint(1, HF_CONFIG["vocab_size"], (batch, PROMPT))
      attn = torch.ones_like(prompt)
      with torch.no_grad():
        sec = common.median_seconds(
            lambda: model.generate(prompt, attention_mask=attn, **kw), repeats)
      name = f"{'greedy' if greedy else 'sampled'}_b{batch}"
      out["generation"][name] = {"seconds": sec, "new_tokens_per_s": batch * NEW / sec}
      print(f"transformers {name}: {batch * NEW / sec:,.0f} new tokens/s")

  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
  tokens = torch.randint(1, HF_CONFIG["vocab_size"], (TRAIN_BATCH, TRAIN_LEN + 1))

  def step():
    logits = model(input_ids=tokens[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             tokens[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  sec = common.median_seconds(step, repeats)
  out["train_step"] = {"seconds": sec, "tokens_per_s": TRAIN_BATCH * TRAIN_LEN / sec}
  print(f"transformers train step: {TRAIN_BATCH * TRAIN_LEN / sec:,.0f} tokens/s")
  return out


def bench_collab_rl(folder: str, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  import optax

  from collab_rl import sampling
  from collab_rl import sharding as sharding_lib
  from collab_rl import train_state as state_lib
  from collab_rl.models import hf
  from collab_rl.trainers import lm

  model, params = hf.load_pretrained(folder)
  mesh = sharding_lib.make_mesh((-1, 1, 1)) if len(jax.devices()) > 1 else None

  def place(tree, batched: bool):
    """On one device, or (batch > 1 and several devices) split over the mesh's data axis."""
    if mesh is None or not batched:
      return jax.device_put(tree, jax.devices()[0])
    return jax.device_put(tree, sharding_lib.batch_sharding(mesh))

  params_1 = place(params, False)
  params_n = params_1 if mesh is None else jax.device_put(params, sharding_lib.replicated(mesh))
  # Generation only reads the weights: the host devices share one copy (the train step donates
  # its state, so it keeps params_n, one copy per device).
  params_gen = params_1 if mesh is None else sharding_lib.replicate_host_shared(
      params, sharding_lib.replicated(mesh))
  out = {"generation": {}, "host_devices": len(jax.devices())}
  for greedy in (True, False):
    sample = sampling.make_sampler(model, sampling.SamplingConfig(
        max_new_tokens=NEW, greedy=greedy, temperature=1.0))
    for batch in (1, 16):
      prompt = place(jax.random.randint(jax.random.key(1), (batch, PROMPT), 1,
                                        HF_CONFIG["vocab_size"]), batch > 1)
      lengths = place(jnp.full((batch,), PROMPT), batch > 1)
      p = params_gen if batch > 1 else params_1
      sec = common.median_seconds(lambda: sample(p, prompt, lengths, jax.random.key(2)).tokens_BxN,
                                  repeats, jax.block_until_ready)
      name = f"{'greedy' if greedy else 'sampled'}_b{batch}"
      out["generation"][name] = {"seconds": sec, "new_tokens_per_s": batch * NEW / sec}
      print(f"collab_rl {name}: {batch * NEW / sec:,.0f} new tokens/s")

  tx = optax.adamw(1e-3)
  holder = [state_lib.create(params_n, tx, jax.random.key(3))]
  step = jax.jit(lambda s, b: lm.train_step(model, tx, s, b), donate_argnums=0)
  batch = place({"tokens": jax.random.randint(jax.random.key(4), (TRAIN_BATCH, TRAIN_LEN + 1), 1,
                                              HF_CONFIG["vocab_size"]),
                 "length": jnp.full((TRAIN_BATCH,), TRAIN_LEN + 1)}, True)

  def one():
    holder[0], m = step(holder[0], batch)
    return m["loss"]

  sec = common.median_seconds(one, repeats, jax.block_until_ready)
  out["train_step"] = {"seconds": sec, "tokens_per_s": TRAIN_BATCH * TRAIN_LEN / sec}
  print(f"collab_rl train step: {TRAIN_BATCH * TRAIN_LEN / sec:,.0f} tokens/s")
  return out


def main(argv):
  del argv
  # Before JAX initialises its CPU backend.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                             f"device_count={_HOST_DEVICES.value}")
  import jax
  import torch
  import transformers

  torch.set_num_threads(_THREADS.value)
  with tempfile.TemporaryDirectory() as folder:
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG)).save_pretrained(folder)
    ours = bench_collab_rl(folder, _REPEATS.value)
    theirs = bench_transformers(folder, _REPEATS.value)

  ratios = {name: ours["generation"][name]["new_tokens_per_s"]
            / theirs["generation"][name]["new_tokens_per_s"] for name in ours["generation"]}
  ratios["train_step"] = ours["train_step"]["tokens_per_s"] / theirs["train_step"]["tokens_per_s"]
  result = {"model": HF_CONFIG, "prompt_len": PROMPT, "new_tokens": NEW,
            "train_batch": [TRAIN_BATCH, TRAIN_LEN], "torch_threads": _THREADS.value,
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "jax": jax.__version__,
            "torch": torch.__version__, "transformers_version": transformers.__version__,
            "collab_rl": ours, "transformers": theirs, "ratio_collab_rl_over_transformers": ratios}
  for name, r in ratios.items():
    print(f"ratio {name}: {r:.2f}x")
  common.write_json(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)
