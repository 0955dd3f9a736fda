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
from experiments.bench.tiny_llama import HF_CONFIG, NEW, PROMPT, TRAIN_BATCH, TRAIN_LEN
from experiments.bench.tiny_llama import collab_rl_programs

_OUT = flags.DEFINE_string("out", "bench_out/vs_transformers.json", "Where the JSON goes.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats (median reported).")
_THREADS = flags.DEFINE_integer("threads", 2, "Threads for torch (XLA uses the machine's cores).")
_HOST_DEVICES = flags.DEFINE_integer("host_devices", 2, "XLA CPU devices the batch-16 runs are "
                                     "split over (data parallel); 1: one device.", lower_bound=1)


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

  calls = collab_rl_programs(folder)
  out = {"generation": {}, "host_devices": len(jax.devices())}
  for name, call in calls.items():
    sec = common.median_seconds(call, repeats, jax.block_until_ready)
    if name == "train_step":
      out["train_step"] = {"seconds": sec, "tokens_per_s": TRAIN_BATCH * TRAIN_LEN / sec}
      print(f"collab_rl train step: {TRAIN_BATCH * TRAIN_LEN / sec:,.0f} tokens/s")
    else:
      batch = int(name.split("_b")[1])
      out["generation"][name] = {"seconds": sec, "new_tokens_per_s": batch * NEW / sec}
      print(f"collab_rl {name}: {batch * NEW / sec:,.0f} new tokens/s")
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
