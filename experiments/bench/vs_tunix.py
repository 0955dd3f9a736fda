"""collab_rl against Tunix (Google's JAX post-training library) on the same weights, as JSON.

  # Tunix is not a dependency of collab_rl: a venv of its own, where both resolve together
  # (jax 0.10.2, flax 0.12.8; checked with `pip install --dry-run`, 2026-12-07).
  python3 -m venv /tmp/tunix && /tmp/tunix/bin/pip install -e . google-tunix==0.1.7
  /tmp/tunix/bin/python -m experiments.bench.vs_tunix --out bench_out/vs_tunix.json

The tiny Llama of `vs_transformers` (`tiny_llama.HF_CONFIG`: width 256, 4 layers, 8 heads, 2
key/value heads, vocab 2048, fp32), random weights from collab_rl's own init, written as a
Hugging Face folder (`hf.save_pretrained`, no torch needed) and read by both: collab_rl with
`hf.load_pretrained` (`tiny_llama.collab_rl_programs`, the calls `vs_transformers` times), Tunix
with its Llama 3 loader (`tunix.models.llama3.params.create_model_from_safe_tensors`). RoPE base
1e6 (`ROPE_THETA`): the run first checks that both give the same logits on one prompt.

- Generation: `tunix.generate.Sampler`, 64-token prompts, 128 new tokens, batch 1 and 16, greedy
  (its default mode) and sampled (temperature 1, `top_p=1.0`: its sampling mode needs a top-p or
  a top-k); an end-of-sequence id outside the vocabulary, so no row stops early (collab_rl's
  sampler has no stop token here). Tunix's sampler takes strings and returns strings: the prompts
  are the ids written as text, read back by a whitespace tokenizer, and its host-side
  tokenization and detokenization are inside the timed call, as they are in its API.
- Train step: the jitted step of Tunix's `PeftTrainer` (all weights trained, `optax.adamw(1e-3)`,
  its default next-token loss, its example's causal mask and positions) called directly rather
  than through `train()`, whose host loop adds logging; 16 x 257 tokens, 256 predicted a row, as
  collab_rl's step. With `--lora_rank r` (8 by default) also the same step training rank-r LoRA
  adapters (alpha 16) on all seven projections of every layer, the base frozen: qwix's
  `apply_lora_to_model`, which Tunix uses, against collab_rl's `models/lora.py`.

Both run on `--host_devices` XLA CPU devices: collab_rl data-parallel as in `vs_transformers`
(batch 1 on one device), Tunix on an ('fsdp', 'tp') mesh of (host_devices, 1) with its default
shardings (training: weights split over fsdp; sampling: weights replicated, the batch split);
its batch-1 sampler on a mesh of one device. Every call is made twice untimed first (Tunix's
train step compiles again at its second call). Then each of `--rounds` rounds times every call
of collab_rl and then the same call of Tunix (the median of `--repeats` calls after one more
untimed call), so that the machine's drift falls on both; the ratio's median and range are over
the rounds. The sampled calls are not compared token for token (two samplers draw differently),
and greedy decoding of random weights is chaotic, so neither are the greedy ones.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile

from absl import app, flags

from experiments.bench import common
from experiments.bench.tiny_llama import HF_CONFIG, NEW, PROMPT, TRAIN_BATCH, TRAIN_LEN
from experiments.bench.tiny_llama import collab_rl_programs

_OUT = flags.DEFINE_string("out", "bench_out/vs_tunix.json", "Where the JSON goes.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per round (their median counts).")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Rounds over the calls, collab_rl's and Tunix's "
                               "alternated; the ratio's median and range are over the rounds.")
_LORA_RANK = flags.DEFINE_integer("lora_rank", 8, "Also a train step that trains rank-r LoRA "
                                  "adapters on every projection, the base frozen; 0: none.",
                                  lower_bound=0)
_HOST_DEVICES = flags.DEFINE_integer("host_devices", 2, "XLA CPU devices (see the docstring).",
                                     lower_bound=1)


class WhitespaceIds:
  """The tokenizer protocol Tunix's sampler accepts: text is token ids separated by spaces."""

  def encode(self, text: str, **kwargs) -> list[int]:
    del kwargs
    return [int(t) for t in text.split()]

  def decode(self, ids, **kwargs) -> str:
    del kwargs
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self) -> int:
    return 0  # falsy: Tunix prepends no BOS, so the prompt stays PROMPT ids long

  def eos_id(self) -> int:
    return HF_CONFIG["vocab_size"]  # never sampled

  def pad_id(self) -> int:
    return 0


# Tunix 0.1.7's Llama 3 attention rotates with `apply_rope`'s default base, 1e6, whatever the
# config's `rope_theta` says; the checkpoint uses that base so that both compute one function.
ROPE_THETA = 1_000_000


def write_folder(folder: str) -> None:
  """`folder` as a Hugging Face checkpoint of HF_CONFIG with collab_rl's random init."""
  import jax

  from collab_rl.models import hf
  from collab_rl.models import transformer

  cfg = hf.config_from_hf({**HF_CONFIG, "model_type": "llama", "rope_theta": float(ROPE_THETA)})
  model = transformer.Transformer(cfg)
  hf.save_pretrained(model, transformer.init_params(model, jax.random.key(0)), folder)


def logits_gap(folder: str) -> float:
  """Largest |difference| between collab_rl's and Tunix's logits for one 64-token prompt on
  the weights in `folder`: both load the same function, or the timings compare nothing."""
  import jax.numpy as jnp
  import numpy as np
  from tunix.models.llama3 import params as llama3_params
  from tunix.sft import utils as sft_utils

  from collab_rl.models import hf

  model, params = hf.load_pretrained(folder)
  theirs = llama3_params.create_model_from_safe_tensors(folder, tunix_config(False),
                                                        tunix_mesh(1))
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, HF_CONFIG["vocab_size"],
                                                         (2, PROMPT)), jnp.int32)
  mask = jnp.ones_like(tokens, bool)
  their_logits, _ = theirs(tokens, sft_utils.build_positions_from_mask(mask), None,
                           sft_utils.make_causal_attn_mask(mask))
  our_logits = model.apply({"params": params}, tokens).logits_BxLxV
  return float(jnp.max(jnp.abs(our_logits - their_logits)))


def tunix_config(sampling: bool):
  from tunix.models.llama3 import model as llama3

  h = HF_CONFIG["hidden_size"] // HF_CONFIG["num_attention_heads"]
  return llama3.ModelConfig(
      num_layers=HF_CONFIG["num_hidden_layers"], vocab_size=HF_CONFIG["vocab_size"],
      embed_dim=HF_CONFIG["hidden_size"], hidden_dim=HF_CONFIG["intermediate_size"],
      num_heads=HF_CONFIG["num_attention_heads"], head_dim=h,
      num_kv_heads=HF_CONFIG["num_key_value_heads"], rope_theta=ROPE_THETA,
      norm_eps=HF_CONFIG["rms_norm_eps"], weight_tying=HF_CONFIG["tie_word_embeddings"],
      shd_config=llama3.ShardingConfig.get_default_sharding(is_sampling=sampling))


def tunix_mesh(devices: int):
  import jax
  import numpy as np

  return jax.sharding.Mesh(np.array(jax.devices()[:devices]).reshape(devices, 1), ("fsdp", "tp"))


def tunix_programs(folder: str, devices: int, lora_rank: int = 0) -> dict:
  """Tunix's calls on the weights in `folder`, named as `tiny_llama.collab_rl_programs` names
  collab_rl's, each a zero-argument function that returns what to wait on."""
  import jax
  import numpy as np
  import optax
  from tunix.generate import sampler as sampler_lib
  from tunix.models.llama3 import params as llama3_params
  from tunix.sft import peft_trainer
  from tunix.sft import utils as sft_utils

  calls = {}
  rng = np.random.default_rng(1)
  cache = sampler_lib.CacheConfig(
      cache_size=PROMPT + NEW, num_layers=HF_CONFIG["num_hidden_layers"],
      num_kv_heads=HF_CONFIG["num_key_value_heads"],
      head_dim=HF_CONFIG["hidden_size"] // HF_CONFIG["num_attention_heads"])
  for batch in (1, 16):
    # The weights carry the mesh; no mesh in context (under `jax.set_mesh` of two devices the
    # sampler's own host-made scalars clash with it).
    mesh = tunix_mesh(devices if batch > 1 else 1)
    model = llama3_params.create_model_from_safe_tensors(folder, tunix_config(True), mesh)
    sampler = sampler_lib.Sampler(model, WhitespaceIds(), cache)
    prompts = [" ".join(map(str, rng.integers(1, HF_CONFIG["vocab_size"], PROMPT)))
               for _ in range(batch)]
    for greedy in (True, False):
      kw = dict(max_generation_steps=NEW, max_prompt_length=PROMPT,
                eos_tokens=[HF_CONFIG["vocab_size"]], pad_output=True)
      if not greedy:
        kw.update(temperature=1.0, top_p=1.0, seed=2)

      def call(sampler=sampler, prompts=prompts, kw=kw):
        text = sampler(prompts, **kw).text  # strings: already on the host
        assert all(len(t.split()) == NEW for t in text), "a row stopped early"
        return text

      calls[f"{'greedy' if greedy else 'sampled'}_b{batch}"] = call

  mesh = tunix_mesh(devices)
  tokens = rng.integers(1, HF_CONFIG["vocab_size"], (TRAIN_BATCH, TRAIN_LEN + 1), np.int32)
  batch = jax.device_put(
      peft_trainer.TrainingInput(input_tokens=tokens, input_mask=np.ones_like(tokens, bool)),
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp")))

  def model_input(x: peft_trainer.TrainingInput):
    return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
            "positions": sft_utils.build_positions_from_mask(x.input_mask),
            "attention_mask": sft_utils.make_causal_attn_mask(x.input_mask)}

  def train_call(model):
    with jax.set_mesh(mesh):
      trainer = peft_trainer.PeftTrainer(
          model, optax.adamw(1e-3), peft_trainer.TrainingConfig(eval_every_n_steps=10**9))
      step, _ = trainer.with_gen_model_input_fn(model_input).jit_train_and_eval_step()

    def train_step():
      with jax.set_mesh(mesh):
        return step(batch)[0]  # the loss

    return train_step

  with jax.set_mesh(mesh):
    model = llama3_params.create_model_from_safe_tensors(folder, tunix_config(False), mesh)
  calls["train_step"] = train_call(model)
  if lora_rank:
    from flax import nnx
    import qwix

    # The projections collab_rl's LoRA adapts by default (models/lora.py), alpha 16 as there.
    provider = qwix.LoraProvider(module_path=".*(q|k|v|o)_proj|.*(gate|up|down)_proj",
                                 rank=lora_rank, alpha=16.0)
    with jax.set_mesh(mesh):
      base = llama3_params.create_model_from_safe_tensors(folder, tunix_config(False), mesh)
      adapted = qwix.apply_lora_to_model(base, provider, rngs=nnx.Rngs(5),
                                         **base.get_model_input())
    calls["train_step_lora"] = train_call(adapted)
  return calls


def main(argv):
  del argv
  # Before JAX initialises its CPU backend.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                             f"device_count={_HOST_DEVICES.value}")
  import importlib.metadata
  import importlib.util

  if importlib.util.find_spec("tunix") is None:
    raise SystemExit("vs_tunix needs Tunix, which collab_rl does not depend on: python3 -m venv "
                     "/tmp/tunix && /tmp/tunix/bin/pip install -e . google-tunix==0.1.7, then "
                     "/tmp/tunix/bin/python -m experiments.bench.vs_tunix")
  import jax

  with tempfile.TemporaryDirectory() as folder:
    write_folder(folder)
    gap = logits_gap(folder)
    print(f"largest logit difference, collab_rl against Tunix: {gap:.2e}")
    if gap > 1e-4:
      raise SystemExit(f"collab_rl and Tunix disagree on the same weights (logits {gap:.2e} "
                       "apart): the comparison would time two different models")
    programs = {"collab_rl": collab_rl_programs(folder, lora_rank=_LORA_RANK.value),
                "tunix": tunix_programs(folder, _HOST_DEVICES.value, _LORA_RANK.value)}
  # One untimed call each here and `median_seconds`' warm-up call in the first round: Tunix's
  # train step compiles again at its second call (its optimizer state comes back placed
  # differently from how it went in).
  for calls in programs.values():
    for call in calls.values():
      jax.block_until_ready(call())
  # Alternated, so that the machine's drift falls on both: every round times each call of
  # collab_rl, then the same call of Tunix (median of --repeats after a warm-up call).
  seconds = {lib: {name: [] for name in calls} for lib, calls in programs.items()}
  for r in range(_ROUNDS.value):
    for name in programs["collab_rl"]:
      for lib, calls in programs.items():
        seconds[lib][name].append(
            common.median_seconds(calls[name], _REPEATS.value, jax.block_until_ready))
      print(f"round {r}: {name}: collab_rl {seconds['collab_rl'][name][-1]:.3f} s, "
            f"tunix {seconds['tunix'][name][-1]:.3f} s", flush=True)
  result = {"model": HF_CONFIG, "prompt_len": PROMPT, "new_tokens": NEW,
            "train_batch": [TRAIN_BATCH, TRAIN_LEN], "host_devices": _HOST_DEVICES.value,
            "lora_rank": _LORA_RANK.value,
            "rounds": _ROUNDS.value, "repeats": _REPEATS.value, "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "jax": jax.__version__,
            "tunix": importlib.metadata.version("google-tunix"), "logits_gap": gap,
            "seconds": seconds,
            "ratio_collab_rl_over_tunix": {}}
  for name in programs["collab_rl"]:
    # tokens/s ratio = Tunix's seconds / collab_rl's, per round.
    ratios = sorted(t / c for c, t in zip(seconds["collab_rl"][name], seconds["tunix"][name]))
    result["ratio_collab_rl_over_tunix"][name] = {"median": statistics.median(ratios),
                                                  "min": ratios[0], "max": ratios[-1]}
    training = name.startswith("train_step")
    rows = TRAIN_BATCH * TRAIN_LEN if training else int(name.split("_b")[1]) * NEW
    per_s = {lib: rows / statistics.median(seconds[lib][name]) for lib in programs}
    print(f"{name}: {statistics.median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f}); "
          f"collab_rl {per_s['collab_rl']:,.0f}, tunix {per_s['tunix']:,.0f} "
          f"{'tokens' if training else 'new tokens'}/s")
  common.write_json(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)
