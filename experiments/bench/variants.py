"""The `vs_transformers` train step under model config variants, alternated in one process.

  python -m experiments.bench.variants --variants attention_recompute=False,attention_recompute=True

What a change to the model's arithmetic gives the train step, measured side by side: each
variant (a `TransformerConfig` field set to a value; `default` for the folder's config) builds
the same tiny Llama's train step (`tiny_llama.collab_rl_programs`, 2 host devices, data
parallel); then `--rounds` rounds time every variant in turn, a median of `--repeats` steps each,
so the machine's drift over the run falls on all variants alike. Prints and writes each
variant's median step time per round and its median over the rounds.
"""

from __future__ import annotations

import os
import statistics
import tempfile

from absl import app, flags

from experiments.bench import common
from experiments.bench import tiny_llama

_VARIANTS = flags.DEFINE_list("variants", ["attention_recompute=False", "attention_recompute=True"],
                              "field=value (a TransformerConfig field) or `default`, one per "
                              "variant.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds over the variants.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed steps a variant and round (median).")
_HOST_DEVICES = flags.DEFINE_integer("host_devices", 2, "XLA CPU devices.", lower_bound=1)
_OUT = flags.DEFINE_string("out", "bench_out/variants.json", "Where the JSON goes.")


def main(argv):
  del argv
  overrides = {v: tiny_llama.parse_variant(v) for v in _VARIANTS.value}  # before any work
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                             f"device_count={_HOST_DEVICES.value}")
  import jax
  import torch
  import transformers

  with tempfile.TemporaryDirectory() as folder:
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**tiny_llama.HF_CONFIG)).save_pretrained(folder)
    steps = {v: tiny_llama.collab_rl_programs(folder, **o)["train_step"]
             for v, o in overrides.items()}
  rounds = {v: [] for v in steps}
  for r in range(_ROUNDS.value):
    for v, step in steps.items():
      rounds[v].append(common.median_seconds(step, _REPEATS.value, jax.block_until_ready))
      print(f"round {r}: {v}: {rounds[v][-1] * 1e3:.0f} ms a step", flush=True)
  result = {"model": tiny_llama.HF_CONFIG, "host_devices": _HOST_DEVICES.value,
            "batch": [tiny_llama.TRAIN_BATCH, tiny_llama.TRAIN_LEN], "variants": {
                v: {"step_s_by_round": s, "step_s": statistics.median(s)}
                for v, s in rounds.items()}}
  for v, row in result["variants"].items():
    print(f"{v}: {row['step_s'] * 1e3:.0f} ms a step (median of {_ROUNDS.value} rounds)")
  common.write_json(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)
