"""The transformer's hyperparameters, named as in Hugging Face's LlamaConfig and Qwen2Config."""

from __future__ import annotations

import dataclasses
from typing import Any

HEADS = ("lm", "value", "reward")
# The `jax.checkpoint_policies` that take no arguments, i.e. that a config string can name.
REMAT_POLICIES = ("nothing_saveable", "everything_saveable", "dots_saveable",
                  "dots_with_no_batch_dims_saveable")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Field names follow Hugging Face's LlamaConfig / Qwen2Config."""

  vocab_size: int = 2048
  hidden_size: int = 256  # D
  intermediate_size: int = 688  # MLP width
  num_hidden_layers: int = 4
  num_attention_heads: int = 8  # H
  num_key_value_heads: int = 2  # K; H % K == 0 (grouped-query attention)
  head_dim: int | None = None  # None: hidden_size // num_attention_heads
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10_000.0
  # Llama-3.x style frequency scaling: {"rope_type": "llama3", "factor", "low_freq_factor",
  # "high_freq_factor", "original_max_position_embeddings"}; None for plain RoPE.
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # Qwen2: bias on q/k/v (never on o_proj)
  heads: tuple[str, ...] = ("lm",)  # which of HEADS to build
  dtype: str = "float32"  # compute dtype: float32 or bfloat16
  param_dtype: str = "float32"
  remat: bool = False  # rematerialise each layer in the backward pass (saves activations)
  # With remat, what the backward pass may keep of a layer's forward (a `jax.checkpoint_policies`
  # name): "nothing_saveable" keeps only the layer's input (least memory, the forward run twice);
  # "dots_with_no_batch_dims_saveable" also keeps the projections' outputs (the matmuls are not
  # recomputed, the elementwise work and attention are).
  remat_policy: str = "nothing_saveable"
  # The decoder layers as one `nn.scan` instead of unrolled: every program holds one layer's
  # code, so compile time stops growing with depth (what a 32-layer Llama pays on TPU). Params
  # are stacked under "layers" with a leading [num_hidden_layers] axis
  # ("layers/self_attn/q_proj/kernel" [L, D, N*H] instead of "layers_0/...") and the KV cache
  # holds one [B, L, ...] array for keys and one for values; `transformer.stack_layers` and
  # `unstack_layers` convert between the two layouts (Hugging Face folders keep theirs).
  scan_layers: bool = False
  # Without a cache, queries are processed in chunks of this many rows, each against only the
  # keys it can see (causal): ~40% less attention work at L = 256 and smaller softmax tensors.
  # 0 disables. Numerics are unchanged (each query still sees all its keys at once).
  causal_query_chunk: int = 64
  # Attention without a cache (training, log-prob passes) keeps only its output and each
  # query's softmax max and sum for the backward pass, which recomputes the probabilities (a
  # custom VJP, `attention.attend_recompute`) instead of differentiating through the softmax:
  # no [B, K, L x G, L] probabilities are saved, and the backward's products contract over query
  # rows without transposing them (on CPU the arms' update 12-46% faster, the vs_transformers
  # step 0-3%; README "Benchmarks"). Gradients equal autodiff's up to float rounding, not bit
  # for bit: runs made before it replay bit for bit only with it off.
  attention_recompute: bool = True
  # With a KV cache, attention reads only the filled part of the cache, rounded up to one of this
  # many equal prefixes (a `lax.switch` between them; every row shares the write index): a short
  # conversation in a cache sized for the longest one does not pay for the empty slots. 1 reads
  # the whole cache at every step. The slots skipped are all masked, so results equal the whole
  # cache's up to float rounding (the softmax sums fewer terms: log-probs ~5e-7 apart, not bit for
  # bit; runs made before this option replay bit for bit only at 1).
  cache_buckets: int = 4
  # With a KV cache, a chunk of more queries than this (a prefill) is attended this many at a
  # time, in a `lax.map`, so only one slice's f32 scores ([B, K, chunk x G, cache]) are live:
  # an 8B user prefilling a 395-token reply against a 5564-slot cache holds 0.8 GiB of them a
  # row otherwise. 0: all at once. Each query's scores are the same either way.
  cache_query_chunk: int = 0
  # Dropout on the input of LoRA adapters given unmerged, in a "lora" variables collection, with
  # a "dropout" RNG (models/lora.py sets it; a checkpoint's model never carries it).
  lora_dropout: float = 0.0

  def __post_init__(self):
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads={self.num_attention_heads} is not a multiple of "
          f"num_key_value_heads={self.num_key_value_heads}")
    if self.head_dim is None and self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"hidden_size={self.hidden_size} is not a multiple of "
          f"num_attention_heads={self.num_attention_heads}; set head_dim")
    unknown = set(self.heads) - set(HEADS)
    if unknown:
      raise ValueError(f"unknown heads {sorted(unknown)}; choose from {HEADS}")
    if self.cache_buckets < 1:
      raise ValueError(f"cache_buckets={self.cache_buckets}: use 1 (the whole cache) or more")
    if self.cache_query_chunk < 0:
      raise ValueError(f"cache_query_chunk={self.cache_query_chunk}: use 0 (all at once) or more")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r}: use one of {REMAT_POLICIES}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16"):
        raise ValueError(f"{name}={getattr(self, name)!r}: use 'float32' or 'bfloat16'")

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @classmethod
  def from_dict(cls, d: dict) -> "TransformerConfig":
    """From a plain dict (an ml_collections config's `.to_dict()`); rope_scaling may be a dict."""
    d = dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ValueError(f"unknown model config fields {sorted(unknown)}")
    if isinstance(d.get("rope_scaling"), dict):
      d["rope_scaling"] = tuple(sorted(d["rope_scaling"].items()))
    if "heads" in d:
      d["heads"] = tuple(d["heads"])
    return cls(**d)
