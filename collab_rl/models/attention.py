"""Grouped-query attention with rotary positions, and the explicit KV cache it reads and writes."""

from __future__ import annotations

import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from collab_rl.models.config import TransformerConfig
from collab_rl.models.layers import Weights, fused_projection

# ------------------------------------------------------------------------------------------------
# Rotary position embeddings.
# ------------------------------------------------------------------------------------------------


def rope_inv_freq(cfg: TransformerConfig) -> jax.Array:
  """Inverse frequencies [dim_per_head // 2], with Llama-3 scaling when configured."""
  dim = cfg.dim_per_head
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  scaling = dict(cfg.rope_scaling or ())
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    return inv_freq
  if kind == "linear":
    return inv_freq / scaling["factor"]
  if kind != "llama3":
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")
  # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
  factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
  old_len = scaling["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv_freq
  smooth = (old_len / wavelen - low) / (high - low)
  blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
  out = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  is_medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
  return jnp.where(is_medium, blended, out)


# The named scopes (here and on `attend`) only name the ops in a profile (bench/op_profile.py's
# parts); they change no computation.
@jax.named_scope("rope")
def apply_rope(x_BxLxNxH: jax.Array, positions_BxL: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates pairs (i, i + H/2), Hugging Face's `rotate_half` convention."""
  angles_BxLxF = positions_BxL[..., None].astype(jnp.float32) * inv_freq
  cos_BxLx1xF = jnp.cos(angles_BxLxF)[:, :, None, :]
  sin_BxLx1xF = jnp.sin(angles_BxLxF)[:, :, None, :]
  x = x_BxLxNxH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos_BxLx1xF - x2 * sin_BxLx1xF,
                         x2 * cos_BxLx1xF + x1 * sin_BxLx1xF], axis=-1)
  return out.astype(x_BxLxNxH.dtype)


# ------------------------------------------------------------------------------------------------
# KV cache: an explicit pytree, one slot per position, shared write index for the whole batch.
# ------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class KVCache:
  # Keys are kept transposed, [B, K, H, S]: a decode step's scores are then q [B, K, G, H] times
  # k [B, K, H, S], whose S-contiguous rows XLA's CPU dot reads ~5% faster (measured, b16).
  # Per layer ([B, K, H, S] keys, [B, K, S, H] values), or with `scan_layers` one array each,
  # [B, L, K, H, S] and [B, L, K, S, H]: rows stay the leading dim either way, so MR's futures
  # and G candidates tile and gather a cache like any other [B, ...] state.
  k: tuple[jax.Array, ...] | jax.Array
  v: tuple[jax.Array, ...] | jax.Array
  valid_BxS: jax.Array  # which slots hold real tokens (prompts are right-padded: holes exist)
  positions_BxS: jax.Array  # rotary position of the token in each slot
  index: jax.Array  # next slot to write (scalar int32, same for every row)

  @classmethod
  def init(cls, cfg: TransformerConfig, batch: int, size: int) -> "KVCache":
    dtype = jnp.dtype(cfg.dtype)
    k_shape = (batch, cfg.num_key_value_heads, cfg.dim_per_head, size)
    v_shape = (batch, cfg.num_key_value_heads, size, cfg.dim_per_head)
    def zeros(shape):  # distinct buffers for k and v, so a donated cache donates each once
      if cfg.scan_layers:
        return jnp.zeros((batch, cfg.num_hidden_layers, *shape[1:]), dtype)
      return tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers))
    return cls(k=zeros(k_shape), v=zeros(v_shape), valid_BxS=jnp.zeros((batch, size), bool),
               positions_BxS=jnp.zeros((batch, size), jnp.int32), index=jnp.zeros((), jnp.int32))


# ------------------------------------------------------------------------------------------------
# Attention.
# ------------------------------------------------------------------------------------------------


def _fold_heads(x_BxLxNxH: jax.Array, kv: int) -> jax.Array:
  """[B, L, N, H] -> [B, K, L * G, H]: each kv head's G query heads folded into its rows."""
  b, l, n, h = x_BxLxNxH.shape
  return x_BxLxNxH.reshape(b, l, kv, n // kv, h).transpose(0, 2, 1, 3, 4).reshape(
      b, kv, l * (n // kv), h)


def _unfold_heads(x_BxKxQxH: jax.Array, l: int) -> jax.Array:
  b, kv, q, h = x_BxKxQxH.shape
  g = q // l
  return x_BxKxQxH.reshape(b, kv, l, g, h).transpose(0, 2, 1, 3, 4).reshape(b, l, kv * g, h)


def _masked_logits(q_BxKxQxH, k_BxKxSxH, mask_BxLxS, keys_transposed: bool):
  """Scaled f32 scores [B, K, L, G, S], masked slots at -1e30. keys_transposed: the keys are
  [B, K, H, S], as the cache keeps them."""
  b, kv, rows, h = q_BxKxQxH.shape
  l = mask_BxLxS.shape[1]
  logits_BxKxQxS = jnp.einsum("bkqh,bkhs->bkqs" if keys_transposed else "bkqh,bksh->bkqs",
                              q_BxKxQxH, k_BxKxSxH,
                              preferred_element_type=jnp.float32) / math.sqrt(h)
  # A large finite negative keeps fully masked rows (padding queries) NaN-free.
  return jnp.where(mask_BxLxS[:, None, :, None, :],
                   logits_BxKxQxS.reshape(b, kv, l, rows // l, -1), -1e30)


@jax.named_scope("attend")
def attend(q_BxLxNxH, k_BxKxSxH, v_BxKxSxH, mask_BxLxS, keys_transposed: bool = False):
  """Grouped-query attention: N = K * G query heads share K key/value heads (HF's order).

  Keys and values are kept K-major ([B, K, S, H], the cache layout too) and each kv head's G
  query heads are folded into its query rows, so both products are plain batched matmuls over
  (B, K) with no transpose of the cache: on CPU this runs ~4x faster at decode and ~1.7x at
  training shapes than a 5-D einsum over [B, S, K, H].
  """
  b, l, _, _ = q_BxLxNxH.shape
  kv = k_BxKxSxH.shape[1]
  q_BxKxQxH = _fold_heads(q_BxLxNxH, kv)
  # keys_transposed: the keys arrive as the cache keeps them, [B, K, H, S].
  logits_BxKxLxGxS = _masked_logits(q_BxKxQxH, k_BxKxSxH, mask_BxLxS, keys_transposed)
  probs_BxKxQxS = jax.nn.softmax(logits_BxKxLxGxS, axis=-1).reshape(b, kv, q_BxKxQxH.shape[2], -1)
  out_BxKxQxH = jnp.einsum("bkqs,bksh->bkqh", probs_BxKxQxS.astype(v_BxKxSxH.dtype), v_BxKxSxH)
  return _unfold_heads(out_BxKxQxH, l)


# ------------------------------------------------------------------------------------------------
# Attention without a cache whose backward pass recomputes the probabilities (a custom VJP).
# ------------------------------------------------------------------------------------------------


def _attend_recompute_fwd(q_BxLxNxH, k_BxKxHxS, v_BxKxHxS, mask_BxLxS):
  b, l, n, h = q_BxLxNxH.shape
  kv = k_BxKxHxS.shape[1]
  q_BxKxQxH = _fold_heads(q_BxLxNxH, kv)
  logits_BxKxLxGxS = _masked_logits(q_BxKxQxH, k_BxKxHxS, mask_BxLxS, True)
  max_BxKxLxGx1 = jnp.max(logits_BxKxLxGxS, axis=-1, keepdims=True)
  exp_BxKxLxGxS = jnp.exp(logits_BxKxLxGxS - max_BxKxLxGx1)
  sum_BxKxLxGx1 = jnp.sum(exp_BxKxLxGxS, axis=-1, keepdims=True)
  # Normalise after the product: [Q, H] divisions instead of [Q, S].
  out_BxKxLxGxH = jnp.einsum("bkqs,bkhs->bkqh",
                             exp_BxKxLxGxS.reshape(b, kv, -1, k_BxKxHxS.shape[3]).astype(
                                 v_BxKxHxS.dtype), v_BxKxHxS,
                             preferred_element_type=jnp.float32).reshape(b, kv, l, n // kv, h)
  out_BxKxQxH = (out_BxKxLxGxH / sum_BxKxLxGx1).reshape(b, kv, -1, h).astype(q_BxLxNxH.dtype)
  # The max and the sum, not their log-sum-exp: at a fully masked row's max of -1e30, adding
  # log(sum) is lost to rounding.
  residuals = (q_BxKxQxH, k_BxKxHxS, v_BxKxHxS, mask_BxLxS, out_BxKxQxH, max_BxKxLxGx1,
               sum_BxKxLxGx1)
  return _unfold_heads(out_BxKxQxH, l), residuals


def _attend_recompute_bwd(residuals, dout_BxLxNxH):
  (q_BxKxQxH, k_BxKxHxS, v_BxKxHxS, mask_BxLxS, out_BxKxQxH, max_BxKxLxGx1,
   sum_BxKxLxGx1) = residuals
  b, kv, rows, h = q_BxKxQxH.shape
  l = mask_BxLxS.shape[1]
  dout_BxKxQxH = _fold_heads(dout_BxLxNxH, kv)
  # The probabilities again, from the saved max and sum. A fully masked (padding) query row
  # is uniform over its slots, as `attend`'s softmax makes it.
  probs_BxKxLxGxS = jnp.exp(_masked_logits(q_BxKxQxH, k_BxKxHxS, mask_BxLxS, True)
                            - max_BxKxLxGx1) * (1.0 / sum_BxKxLxGx1)  # [Q, 1] divisions
  probs_BxKxQxS = probs_BxKxLxGxS.reshape(b, kv, rows, -1)
  f32 = jnp.float32
  dv_BxKxHxS = jnp.einsum("bkqh,bkqs->bkhs", dout_BxKxQxH,
                          probs_BxKxQxS.astype(dout_BxKxQxH.dtype), preferred_element_type=f32)
  dprobs_BxKxQxS = jnp.einsum("bkqh,bkhs->bkqs", dout_BxKxQxH, v_BxKxHxS,
                              preferred_element_type=f32)
  # Softmax's backward with sum_s(dprobs * probs) = sum_h(dout * out): a [Q, H] reduction.
  delta_BxKxQx1 = jnp.sum(dout_BxKxQxH.astype(f32) * out_BxKxQxH.astype(f32), -1, keepdims=True)
  dlogits_BxKxLxGxS = jnp.where(
      mask_BxLxS[:, None, :, None, :],
      probs_BxKxLxGxS * (dprobs_BxKxQxS - delta_BxKxQx1).reshape(probs_BxKxLxGxS.shape), 0.0)
  dlogits_BxKxQxS = (dlogits_BxKxLxGxS / math.sqrt(h)).reshape(b, kv, rows, -1).astype(
      q_BxKxQxH.dtype)
  dq_BxKxQxH = jnp.einsum("bkqs,bkhs->bkqh", dlogits_BxKxQxS, k_BxKxHxS,
                          preferred_element_type=f32)
  dk_BxKxHxS = jnp.einsum("bkqh,bkqs->bkhs", q_BxKxQxH, dlogits_BxKxQxS,
                          preferred_element_type=f32)
  return (_unfold_heads(dq_BxKxQxH, l).astype(q_BxKxQxH.dtype), dk_BxKxHxS.astype(
      k_BxKxHxS.dtype), dv_BxKxHxS.astype(v_BxKxHxS.dtype), None)


@jax.custom_vjp
@jax.named_scope("attend")
def attend_recompute(q_BxLxNxH, k_BxKxHxS, v_BxKxHxS, mask_BxLxS):
  """`attend` (keys and values both [B, K, H, S]) whose backward pass keeps only the output
  and each query's softmax max and sum and recomputes the probabilities (FlashAttention's
  backward, unblocked): no [B, K, Q, S] tensor is saved for the backward pass, and the products
  there contract over the folded query rows in place. Equal to autodiff through `attend` up to
  float rounding (tests)."""
  return _attend_recompute_fwd(q_BxLxNxH, k_BxKxHxS, v_BxKxHxS, mask_BxLxS)[0]


attend_recompute.defvjp(jax.named_scope("attend")(_attend_recompute_fwd),
                        jax.named_scope("attend")(_attend_recompute_bwd))


def attend_filled(q_BxLxNxH, k_BxKxHxS, v_BxKxSxH, mask_BxLxS, filled, buckets: int):
  """`attend` over a cache's first `filled` slots only, rounded up to one of `buckets` equal
  prefixes of the cache (keys as the cache keeps them, [B, K, H, S]).

  Shapes are static, so the prefix cannot be cut at `filled` itself: a `lax.switch` picks one of
  the precompiled prefix widths at run time. Every row shares `filled` (the cache's write index
  after this chunk), so one branch serves the whole batch. The slots skipped are empty, masked
  out in every row, so the result equals attention over the whole cache up to float rounding.
  """
  size = k_BxKxHxS.shape[3]
  widths = sorted({-(-size * (i + 1) // buckets) for i in range(buckets)})  # ceil; the last: size
  if len(widths) == 1:
    return attend(q_BxLxNxH, k_BxKxHxS, v_BxKxSxH, mask_BxLxS, keys_transposed=True)

  def prefix(width):
    return lambda q, k, v, m: attend(q, k[..., :width], v[:, :, :width], m[..., :width],
                                     keys_transposed=True)

  # The narrowest width that holds every filled slot.
  which = jnp.sum(jnp.asarray(widths[:-1]) < filled).astype(jnp.int32)
  return jax.lax.switch(which, [prefix(w) for w in widths], q_BxLxNxH, k_BxKxHxS, v_BxKxSxH,
                        mask_BxLxS)


def attend_cached(q_BxLxNxH, k_BxKxHxS, v_BxKxSxH, mask_BxLxS, filled, buckets: int,
                  query_chunk: int):
  """`attend_filled`, `query_chunk` queries at a time when the chunk is longer (a `lax.map`
  over query slices, the last padded with queries that see nothing and are dropped): one
  slice's scores are live instead of the whole chunk's. 0: all at once."""
  b, l, n, h = q_BxLxNxH.shape
  if not query_chunk or l <= query_chunk:
    return attend_filled(q_BxLxNxH, k_BxKxHxS, v_BxKxSxH, mask_BxLxS, filled, buckets)
  pieces = -(-l // query_chunk)
  pad = pieces * query_chunk - l
  q_JxBxCxNxH = jnp.pad(q_BxLxNxH, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(
      b, pieces, query_chunk, n, h).swapaxes(0, 1)
  mask_JxBxCxS = jnp.pad(mask_BxLxS, ((0, 0), (0, pad), (0, 0))).reshape(
      b, pieces, query_chunk, -1).swapaxes(0, 1)
  out_JxBxCxNxH = jax.lax.map(
      lambda qm: attend_filled(qm[0], k_BxKxHxS, v_BxKxSxH, qm[1], filled, buckets),
      (q_JxBxCxNxH, mask_JxBxCxS))
  return out_JxBxCxNxH.swapaxes(0, 1).reshape(b, pieces * query_chunk, n, h)[:, :l]


class Attention(nn.Module):
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask_BxLxS, cache_kv=None, index=None):
    cfg = self.cfg
    n, k, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_per_head
    b, l, _ = x_BxLxD.shape
    pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    q, k_, v = fused_projection(x_BxLxD, [
        Weights(n * h, cfg.attention_bias, pdt, name="q_proj"),
        Weights(k * h, cfg.attention_bias, pdt, name="k_proj"),
        Weights(k * h, cfg.attention_bias, pdt, name="v_proj")], dt, cfg.lora_dropout)
    q_BxLxNxH = q.reshape(b, l, n, h)
    k_BxLxKxH = k_.reshape(b, l, k, h)
    v_BxLxKxH = v.reshape(b, l, k, h)
    inv_freq = rope_inv_freq(cfg)
    q_BxLxNxH = apply_rope(q_BxLxNxH, positions_BxL, inv_freq)
    k_BxKxLxH = apply_rope(k_BxLxKxH, positions_BxL, inv_freq).transpose(0, 2, 1, 3)
    v_BxKxLxH = v_BxLxKxH.transpose(0, 2, 1, 3)
    if cache_kv is not None:
      # Write this chunk at slot `index` and attend over the cache's filled part.
      ck, cv, *layer = cache_kv
      k_BxKxHxL = k_BxKxLxH.transpose(0, 1, 3, 2).astype(ck.dtype)
      if layer:
        # A scanned layer `i` gets the whole [B, layers, ...] cache (the scan's carry) and writes
        # only its new slots there, in place, then reads its own layer: handing each layer a
        # slice as a scanned input would copy the whole cache at every decoded token.
        (i,) = layer
        ck = jax.lax.dynamic_update_slice(ck, k_BxKxHxL[:, None], (0, i, 0, 0, index))
        cv = jax.lax.dynamic_update_slice(cv, v_BxKxLxH.astype(cv.dtype)[:, None],
                                          (0, i, 0, index, 0))
        k_all = jax.lax.dynamic_index_in_dim(ck, i, axis=1, keepdims=False)
        v_all = jax.lax.dynamic_index_in_dim(cv, i, axis=1, keepdims=False)
      else:
        ck = jax.lax.dynamic_update_slice_in_dim(ck, k_BxKxHxL, index, axis=3)
        cv = jax.lax.dynamic_update_slice_in_dim(cv, v_BxKxLxH.astype(cv.dtype), index, axis=2)
        k_all, v_all = ck, cv
      new_kv = (ck, cv)
    else:
      k_all, v_all, new_kv = k_BxKxLxH, v_BxKxLxH, None
    # At most 8 chunks: more would cost more in small ops than the skipped work saves.
    chunk = max(cfg.causal_query_chunk, -(-l // 8)) if cfg.causal_query_chunk else 0
    if cache_kv is not None:
      out_BxLxNxH = attend_cached(q_BxLxNxH, k_all, v_all, mask_BxLxS, index + l,
                                  cfg.cache_buckets, cfg.cache_query_chunk)
    else:
      attend_fn, slot_axis = attend, 2
      if cfg.attention_recompute:
        # Keys and values both [B, K, H, L], as attend_recompute's backward reads them.
        attend_fn, slot_axis = attend_recompute, 3
        k_all, v_all = k_all.swapaxes(2, 3), v_all.swapaxes(2, 3)
      def first(x, hi):  # a key or value array's first `hi` slots (all of them past its end)
        return jax.lax.slice_in_dim(x, 0, min(hi, x.shape[slot_axis]), axis=slot_axis)
      # Query rows [lo, hi) only see keys [0, hi): slice instead of computing masked scores.
      pieces = range(0, l, chunk) if chunk and l > chunk else [0]
      width = chunk if len(pieces) > 1 else l
      outs = [attend_fn(q_BxLxNxH[:, lo:lo + width], first(k_all, lo + width),
                        first(v_all, lo + width), mask_BxLxS[:, lo:lo + width, :lo + width])
              for lo in pieces]
      out_BxLxNxH = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    (out_BxLxD,) = fused_projection(out_BxLxNxH.reshape(b, l, n * h),
                                    [Weights(cfg.hidden_size, False, pdt, name="o_proj")], dt,
                                    cfg.lora_dropout)
    return out_BxLxD, new_kv
