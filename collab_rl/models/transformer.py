"""A decoder-only Llama-family transformer in Flax linen, with LM, value and reward heads.

Config fields and parameter names mirror Hugging Face Llama and Qwen2 one to one, so that
`models/hf.py` maps checkpoints by renaming alone:

  HF `model.embed_tokens.weight`                     -> params["embed_tokens"]["embedding"]
  HF `model.layers.{i}.self_attn.{q,k,v,o}_proj.*`   -> params[f"layers_{i}"]["self_attn"][...]
  HF `model.layers.{i}.mlp.{gate,up,down}_proj.*`    -> params[f"layers_{i}"]["mlp"][...]
  HF `model.layers.{i}.{input,post_attention}_layernorm.weight` -> ...["scale"]
  HF `model.norm.weight`                             -> params["norm"]["scale"]
  HF `lm_head.weight` (transposed)                   -> params["lm_head"]["kernel"]

With `scan_layers` the layers are one scanned module, its params stacked: layer i of HF's
`model.layers.{i}.*` is row i of params["layers"][...] (`stack_layers`, `unstack_layers`).

The model is used purely: `model.apply({"params": params}, tokens_BxL, ...)`. Decoding passes an
explicit `KVCache` pytree in and gets the updated one back (no mutable Flax collections), so the
sampler's state is a plain pytree that jit can donate.

This file is the decoder stack and its heads; attention, rotary positions and the cache are in
`models/attention.py`, the other layers in `models/layers.py`, the config in `models/config.py`.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from collab_rl import sharding
from collab_rl.models.attention import Attention, KVCache
from collab_rl.models.config import TransformerConfig
from collab_rl.models.layers import MLP, RMSNorm, dense


class DecoderLayer(nn.Module):
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask_BxLxS, cache_kv=None, index=None):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    h = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="input_layernorm")(x_BxLxD)
    h, new_kv = Attention(cfg, name="self_attn")(h, positions_BxL, mask_BxLxS, cache_kv, index)
    x_BxLxD = x_BxLxD + h
    h = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="post_attention_layernorm")(x_BxLxD)
    return x_BxLxD + MLP(cfg, name="mlp")(h), new_kv


def _scan_body(layer, carry, positions_BxL, mask_BxLxS, index):
  """One step of the scanned stack: layer `i` of the carry (x, the whole cache, i)."""
  x_BxLxD, k, v, i = carry
  x_BxLxD, kv = layer(x_BxLxD, positions_BxL, mask_BxLxS, None if k is None else (k, v, i),
                      index)
  if k is not None:
    k, v = kv
  # Rows stay split between layers (FSDP), as in the unrolled stack.
  return (sharding.constrain_rows(x_BxLxD), k, v, i + 1), None


def _scan_layers(layer, cfg: TransformerConfig, x_BxLxD, positions_BxL, mask_BxLxS, cache,
                 index):
  """The decoder stack as one `nn.scan` over `layer` (`scan_layers`): its params (and a LoRA
  "lora" collection) stacked on a leading layer axis, a fresh init key and dropout key per
  layer, the cache carried whole so that each layer writes its new slots in place."""
  scan = nn.scan(_scan_body, variable_axes={"params": 0, "lora": 0},
                 split_rngs={"params": True, "dropout": True},
                 in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                 length=cfg.num_hidden_layers)
  k, v = (None, None) if cache is None else (cache.k, cache.v)
  (x_BxLxD, k, v, _), _ = scan(layer, (x_BxLxD, k, v, jnp.zeros((), jnp.int32)), positions_BxL,
                               mask_BxLxS, index)
  return x_BxLxD, k, v


@flax.struct.dataclass
class ModelOutput:
  logits_BxLxV: jax.Array | None
  value_BxL: jax.Array | None
  reward_BxL: jax.Array | None
  hidden_BxLxD: jax.Array
  cache: KVCache | None


class Transformer(nn.Module):
  """Llama/Qwen2 decoder. Right padding is honoured through `valid_BxL` (or the cache's mask)."""

  cfg: TransformerConfig

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array, *, valid_BxL: jax.Array | None = None,
               positions_BxL: jax.Array | None = None, cache: KVCache | None = None,
               heads: Sequence[str] | None = None,
               head_index_B: jax.Array | None = None) -> ModelOutput:
    """Without a cache: causal attention among the valid tokens of each row.

    With a cache: the L new tokens are written at slots [cache.index, cache.index + L) and
    attend to every earlier valid slot (and causally among themselves). `head_index_B`: the heads
    read only this position of each row (outputs get L = 1), e.g. a prefill's last tokens.
    """
    cfg = self.cfg
    b, l = tokens_BxL.shape
    if valid_BxL is None:
      valid_BxL = jnp.ones((b, l), bool)
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    if cache is None:
      causal_LxL = jnp.tril(jnp.ones((l, l), bool))
      mask_BxLxS = causal_LxL[None] & valid_BxL[:, None, :]
    else:
      size = cache.valid_BxS.shape[1]
      valid_all_BxS = jax.lax.dynamic_update_slice_in_dim(
          cache.valid_BxS, valid_BxL, cache.index, 1)
      pos_all_BxS = jax.lax.dynamic_update_slice_in_dim(
          cache.positions_BxS, positions_BxL.astype(jnp.int32), cache.index, 1)
      slot_query_L = cache.index + jnp.arange(l)
      causal_LxS = jnp.arange(size)[None, :] <= slot_query_L[:, None]
      mask_BxLxS = causal_LxS[None] & valid_all_BxS[:, None, :]

    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype),
                     param_dtype=jnp.dtype(cfg.param_dtype),
                     embedding_init=nn.initializers.normal(0.02), name="embed_tokens")
    x_BxLxD = sharding.constrain_rows(embed(tokens_BxL))
    layer_cls = DecoderLayer
    if cfg.remat:
      layer_cls = nn.remat(DecoderLayer, policy=getattr(jax.checkpoint_policies, cfg.remat_policy))
    idx = None if cache is None else cache.index
    if cfg.scan_layers:
      x_BxLxD, new_k, new_v = _scan_layers(layer_cls(cfg, name="layers"), cfg, x_BxLxD,
                                           positions_BxL, mask_BxLxS, cache, idx)
    else:
      new_kv = []
      for i in range(cfg.num_hidden_layers):
        cache_kv = None if cache is None else (cache.k[i], cache.v[i])
        x_BxLxD, kv = layer_cls(cfg, name=f"layers_{i}")(x_BxLxD, positions_BxL, mask_BxLxS,
                                                           cache_kv, idx)
        x_BxLxD = sharding.constrain_rows(x_BxLxD)  # rows stay split between layers (FSDP)
        new_kv.append(kv)
      if cache is not None:
        new_k, new_v = tuple(k for k, _ in new_kv), tuple(v for _, v in new_kv)
    hidden_BxLxD = RMSNorm(cfg.rms_norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype),
                           name="norm")(x_BxLxD)

    heads = cfg.heads if heads is None else tuple(heads)
    head_in_BxLxD = hidden_BxLxD if head_index_B is None else jnp.take_along_axis(
        hidden_BxLxD, head_index_B[:, None, None], axis=1)
    logits = value = reward = None
    if "lm" in cfg.heads and (self.is_initializing() or "lm" in heads):
      if cfg.tie_word_embeddings:
        logits = embed.attend(head_in_BxLxD)
      else:
        logits = dense(cfg.vocab_size, "lm_head", cfg)(head_in_BxLxD)
      # fp32 for log-probs and losses even under bf16; rows split, vocab over `model`.
      logits = sharding.constrain_rows(logits.astype(jnp.float32), last="model")
    if "value" in cfg.heads and (self.is_initializing() or "value" in heads):
      value = dense(1, "value_head", cfg, bias=True)(head_in_BxLxD)[..., 0].astype(jnp.float32)
    if "reward" in cfg.heads and (self.is_initializing() or "reward" in heads):
      reward = dense(1, "reward_head", cfg, bias=True)(head_in_BxLxD)[..., 0].astype(jnp.float32)

    new_cache = None if cache is None else KVCache(
        k=new_k, v=new_v, valid_BxS=valid_all_BxS, positions_BxS=pos_all_BxS,
        index=cache.index + l)
    return ModelOutput(logits, value, reward, hidden_BxLxD, new_cache)


def init_params(model: Transformer, key: jax.Array, seq_len: int = 8) -> dict:
  """Fresh params (a plain nested dict); jit it with out_shardings to create them sharded."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return model.init(key, tokens)["params"]


def lm_head_kernel(cfg: TransformerConfig, params) -> jax.Array:
  """The LM head's [D, V] matrix: the embedding, transposed, when tied (`embed.attend`)."""
  if cfg.tie_word_embeddings:
    return params["embed_tokens"]["embedding"].T
  return params["lm_head"]["kernel"]


def stack_layers(tree, num_layers: int) -> dict:
  """A tree with unrolled layers ("layers_0", ..., as params, LoRA adapters or their shapes)
  in `scan_layers`' layout: one "layers" subtree, every leaf stacked on a new leading axis."""
  names = [f"layers_{i}" for i in range(num_layers)]
  missing = [n for n in names if n not in tree]
  if missing or "layers" in tree:
    raise ValueError(f"stack_layers: expected unrolled layers {names[0]}..{names[-1]}; "
                     f"missing {missing}" if missing else "stack_layers: already stacked")
  out = {k: v for k, v in tree.items() if k not in names}
  out["layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[tree[n] for n in names])
  return out


def unstack_layers(tree) -> dict:
  """`stack_layers` undone: "layers" [L, ...] leaves back to "layers_0", ..., "layers_{L-1}"."""
  if "layers" not in tree:
    raise ValueError("unstack_layers: the tree has no stacked 'layers' subtree")
  num = jax.tree_util.tree_leaves(tree["layers"])[0].shape[0]
  out = {k: v for k, v in tree.items() if k != "layers"}
  for i in range(num):
    out[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], tree["layers"])
  return out


def count_params(params) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))
