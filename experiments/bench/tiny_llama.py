"""The tiny Llama `vs_transformers` and `op_profile` measure, and collab_rl's calls on it.

A random `transformers` Llama (width 256, 4 layers, 8 heads, 2 key/value heads, vocab 2048,
fp32) saved to a folder and read with `models.hf.load_pretrained`; generation from 64-token
prompts for 128 new tokens at batch 1 and 16, and a train step at 16 x 256 tokens.
"""

from __future__ import annotations

import dataclasses
import functools

from experiments.bench import common

HF_CONFIG = dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                 rms_norm_eps=1e-6, tie_word_embeddings=False)
PROMPT, NEW, TRAIN_BATCH, TRAIN_LEN = 64, 128, 16, 256


def parse_variant(variant: str) -> dict:
  """`field=value` -> {field: value}, the value read as a bool, int or float where it is one,
  else kept as text (`dtype=bfloat16`); `default` -> {}. The field must be a
  `TransformerConfig` field. For `collab_rl_programs(folder, **overrides)`."""
  from collab_rl.models.config import TransformerConfig

  if variant == "default":
    return {}
  field, sep, text = variant.partition("=")
  fields = [f.name for f in dataclasses.fields(TransformerConfig)]
  if not sep or field not in fields:
    raise ValueError(f"--variants: {variant!r} is not `default` or field=value with a "
                     f"TransformerConfig field ({', '.join(fields)})")
  return {field: common.typed(text)}


def collab_rl_programs(folder: str, lora_rank: int = 0, **model_overrides) -> dict:
  """The measured calls of collab_rl on the weights in `folder`, each a zero-argument function
  that returns what to wait on, inputs already placed: `greedy_b1`, `greedy_b16`, `sampled_b1`,
  `sampled_b16` (one `sample` call) and `train_step` (one AdamW step, its state donated); with
  `lora_rank` > 0 also `train_step_lora` (the same step training rank-`lora_rank` adapters on
  every projection, `models/lora.py`'s defaults, the base frozen). Each has `.hlo()`, the text of
  its compiled program (`bench/op_profile.py` names its ops by it). `model_overrides`:
  `TransformerConfig` fields changed from the folder's (`bench/variants.py`)."""
  import jax
  import jax.numpy as jnp
  import optax

  from collab_rl import sampling
  from collab_rl import sharding as sharding_lib
  from collab_rl import train_state as state_lib
  from collab_rl.models import hf
  from collab_rl.models import lora as lora_lib
  from collab_rl.trainers import lm

  model, params = hf.load_pretrained(folder)
  model = model.clone(cfg=dataclasses.replace(model.cfg, **model_overrides))
  mesh = sharding_lib.make_mesh((-1, 1, 1)) if len(jax.devices()) > 1 else None

  def place(tree, batched: bool):
    """On one device, or (batch > 1 and several devices) split over the mesh's data axis."""
    if mesh is None or not batched:
      return jax.device_put(tree, jax.devices()[0])
    return jax.device_put(tree, sharding_lib.batch_sharding(mesh))

  params_1 = place(params, False)
  # Generation only reads the weights: the host devices share one copy. The train step donates
  # its state, so it gets copies of its own (one per device): the generation calls can still
  # run after it.
  train_sharding = jax.devices()[0] if mesh is None else sharding_lib.replicated(mesh)
  params_n = jax.device_put(jax.tree.map(jnp.copy, params), train_sharding)
  params_gen = params_1 if mesh is None else sharding_lib.replicate_host_shared(
      params, sharding_lib.replicated(mesh))
  calls = {}
  for greedy in (True, False):
    sample = sampling.make_sampler(model, sampling.SamplingConfig(
        max_new_tokens=NEW, greedy=greedy, temperature=1.0))
    for batch in (1, 16):
      prompt = place(jax.random.randint(jax.random.key(1), (batch, PROMPT), 1,
                                        HF_CONFIG["vocab_size"]), batch > 1)
      lengths = place(jnp.full((batch,), PROMPT), batch > 1)
      p = params_gen if batch > 1 else params_1
      call = functools.partial(lambda s, p, x, n: s(p, x, n, jax.random.key(2)).tokens_BxN,
                               sample, p, prompt, lengths)
      call.hlo = functools.partial(lambda *a: sample.lower(*a).compile().as_text(), p, prompt,
                                   lengths, jax.random.key(2))
      calls[f"{'greedy' if greedy else 'sampled'}_b{batch}"] = call

  batch = place({"tokens": jax.random.randint(jax.random.key(4), (TRAIN_BATCH, TRAIN_LEN + 1), 1,
                                              HF_CONFIG["vocab_size"]),
                 "length": jnp.full((TRAIN_BATCH,), TRAIN_LEN + 1)}, True)

  def train_call(step_model, step_params, tx):
    # The whole state placed as the step returns it (the step counter and RNG too, which
    # `create` leaves on the default device): otherwise the second call compiles it again.
    holder = [jax.device_put(state_lib.create(step_params, tx, jax.random.key(3)),
                             train_sharding)]
    step = jax.jit(lambda s, b: lm.train_step(step_model, tx, s, b), donate_argnums=0)

    def train_step():
      holder[0], m = step(holder[0], batch)
      return m["loss"]

    train_step.hlo = lambda: step.lower(holder[0], batch).compile().as_text()
    return train_step

  calls["train_step"] = train_call(model, params_n, optax.adamw(1e-3))
  if lora_rank:
    cfg = lora_lib.LoraConfig(rank=lora_rank)
    adapters = lora_lib.init_adapters(params_n, cfg, jax.random.key(5))
    calls["train_step_lora"] = train_call(
        lora_lib.LoraModel(model, cfg),
        jax.device_put(lora_lib.split(jax.tree.map(jnp.copy, params), adapters), train_sharding),
        lora_lib.trainable_only(optax.adamw(1e-3), cfg))
  return calls
