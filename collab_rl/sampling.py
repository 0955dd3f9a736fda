"""Jitted prefill + decode with a preallocated KV cache.

Prompts are right-padded with per-row lengths. The cache has one slot per position: the prompt
fills slots [0, L) (holes after each row's length are masked out), and decode step t writes slot
L + t for every row at once while each row keeps its own rotary position `len_b + t`. One shared
write index keeps every cache update a static-shaped `dynamic_update_slice`; the decode loop is a
`lax.while_loop` that stops early once every row has produced a stop token.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

from collab_rl.models.attention import KVCache
from collab_rl.models.transformer import Transformer

_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int = 128  # budget of new tokens per row
  temperature: float = 1.0
  top_k: int = 0  # 0 disables
  top_p: float = 1.0  # 1.0 disables
  greedy: bool = False
  stop_tokens: tuple[int, ...] = ()  # e.g. the chat template's end-of-turn token
  pad_id: int = 0  # written after a row has stopped

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if not self.greedy and self.temperature <= 0:
      raise ValueError(f"temperature must be > 0 (or greedy=True), got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@flax.struct.dataclass
class SampleOutput:
  tokens_BxN: jax.Array  # new tokens, pad_id after the stop token
  logprobs_BxN: jax.Array  # log p(token) under softmax(logits / temperature); 0 after stop
  lengths_B: jax.Array  # new tokens per row, the stop token included
  stopped_B: jax.Array  # True where the row emitted a stop token within the budget


def filter_logits(logits_BxV: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Masks everything outside the top-k and the top-p nucleus."""
  if top_k > 0:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, _NEG, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep a token while the mass strictly before it is below p (the top token always stays).
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    kept_BxV = mass_before_BxV < top_p
    threshold_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < threshold_Bx1, _NEG, logits_BxV)
  return logits_BxV


def sample_inverse_cdf(key, logits_BxV):
  """One categorical draw per row from a single uniform: the first token whose CDF exceeds it.

  Same distribution as `jax.random.categorical`, but one random number per row instead of V
  Gumbel draws: on CPU that is ~3x cheaper per decode step at V = 2048. Masked tokens have zero
  mass, so their CDF interval is empty and they are never drawn.
  """
  cdf_BxV = jnp.cumsum(jax.nn.softmax(logits_BxV, axis=-1), axis=-1)
  u_Bx1 = jax.random.uniform(key, (logits_BxV.shape[0], 1)) * cdf_BxV[:, -1:]
  return jnp.minimum(jnp.sum(cdf_BxV <= u_Bx1, axis=-1), logits_BxV.shape[-1] - 1)


def _choose(logits_BxV, key, cfg: SamplingConfig):
  """Picks one token per row; returns it with its log-prob under the unfiltered policy."""
  if cfg.greedy:
    # argmax, one (value, index) reduce. Not `min(where(logits == max(logits), iota, V - 1))`:
    # on GPU, XLA may compute the max inside a fusion that recomputes the logits (a softmax
    # diamond fused with its producer), so no entry need equal it and every row silently picks
    # token V - 1 (measured: full-size doc_edit evaluations wrote "then then ..."). The log-prob
    # is log_softmax at the chosen token, from the chosen logit itself, for the same reason.
    token_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    max_Bx1 = jnp.max(logits_BxV, axis=-1, keepdims=True)
    chosen_B = jnp.take_along_axis(logits_BxV, token_B[:, None], axis=-1)[:, 0]
    return token_B, chosen_B - max_Bx1[:, 0] - jnp.log(
        jnp.sum(jnp.exp(logits_BxV - max_Bx1), axis=-1))
  scaled_BxV = logits_BxV / cfg.temperature
  logp_BxV = jax.nn.log_softmax(scaled_BxV, axis=-1)
  token_B = sample_inverse_cdf(key, filter_logits(scaled_BxV, cfg.top_k, cfg.top_p))
  token_B = token_B.astype(jnp.int32)
  return token_B, jnp.take_along_axis(logp_BxV, token_B[:, None], axis=-1)[:, 0]


def _is_stop(token_B, cfg: SamplingConfig):
  stop_B = jnp.zeros(token_B.shape, bool)
  for s in cfg.stop_tokens:
    stop_B |= token_B == s
  return stop_B


def prefill_and_decode(model: Transformer, cfg: SamplingConfig, params, cache: KVCache,
                       chunk_BxW, chunk_len_B, start_pos_B, key, active_B=None):
  """Writes a right-padded chunk into the cache, then samples; returns (SampleOutput, cache).

  The chunk's tokens get positions `start_pos_B + i` (each row its own) and are written at the
  cache's shared index; decoding continues from each row's last chunk token. The final cache
  holds every generated token but the last of each row (it was never fed back), so a caller that
  continues the conversation starts its next chunk with that token. Inactive rows (finished
  conversations) write nothing valid and return length 0.
  """
  b, w = chunk_BxW.shape
  n = cfg.max_new_tokens
  chunk_len_B = chunk_len_B.astype(jnp.int32)
  start_pos_B = start_pos_B.astype(jnp.int32)
  active_B = jnp.ones((b,), bool) if active_B is None else active_B
  apply = functools.partial(model.apply, {"params": params}, heads=("lm",))

  # Prefill: the whole chunk in one pass, the LM head only at each row's last real token.
  valid_BxW = (jnp.arange(w)[None, :] < chunk_len_B[:, None]) & active_B[:, None]
  out = apply(chunk_BxW, valid_BxL=valid_BxW, positions_BxL=start_pos_B[:, None] + jnp.arange(w),
              cache=cache, head_index_B=jnp.clip(chunk_len_B - 1, 0, w - 1))
  last_BxV = out.logits_BxLxV[:, 0]
  token_B, logp_B = _choose(last_BxV, jax.random.fold_in(key, 0), cfg)
  token_B = jnp.where(active_B, token_B, cfg.pad_id)
  logp_B = jnp.where(active_B, logp_B, 0.0)
  next_pos_B = start_pos_B + chunk_len_B  # position of the first generated token

  tokens_BxN = jnp.full((b, n), cfg.pad_id, jnp.int32).at[:, 0].set(token_B)
  logprobs_BxN = jnp.zeros((b, n), jnp.float32).at[:, 0].set(logp_B)
  done_B = _is_stop(token_B, cfg) | ~active_B
  lengths_B = active_B.astype(jnp.int32)

  def cond(carry):
    t, _, _, _, _, done_B, _ = carry
    return (t < n) & ~jnp.all(done_B)

  def body(carry):
    t, cache, token_B, tokens_BxN, logprobs_BxN, done_B, lengths_B = carry
    # Feed the previous token at its row's own position; stopped rows are masked out of the cache.
    out = apply(token_B[:, None], valid_BxL=~done_B[:, None],
                positions_BxL=(next_pos_B + t - 1)[:, None], cache=cache)
    new_B, logp_B = _choose(out.logits_BxLxV[:, 0], jax.random.fold_in(key, t), cfg)
    new_B = jnp.where(done_B, cfg.pad_id, new_B)
    logp_B = jnp.where(done_B, 0.0, logp_B)
    tokens_BxN = jax.lax.dynamic_update_slice_in_dim(tokens_BxN, new_B[:, None], t, axis=1)
    logprobs_BxN = jax.lax.dynamic_update_slice_in_dim(logprobs_BxN, logp_B[:, None], t, axis=1)
    lengths_B = lengths_B + (~done_B).astype(jnp.int32)
    done_B = done_B | _is_stop(new_B, cfg)
    return t + 1, out.cache, new_B, tokens_BxN, logprobs_BxN, done_B, lengths_B

  carry = (jnp.int32(1), out.cache, token_B, tokens_BxN, logprobs_BxN, done_B, lengths_B)
  _, cache, _, tokens_BxN, logprobs_BxN, done_B, lengths_B = jax.lax.while_loop(cond, body, carry)
  stopped_B = done_B & active_B & (lengths_B > 0)
  stopped_B &= _is_stop(jnp.take_along_axis(tokens_BxN, jnp.maximum(lengths_B - 1, 0)[:, None],
                                            1)[:, 0], cfg)
  return SampleOutput(tokens_BxN, logprobs_BxN, lengths_B, stopped_B), cache


def _sample(model: Transformer, cfg: SamplingConfig, params, prompt_BxL, prompt_len_B, key):
  b, l = prompt_BxL.shape
  cache = KVCache.init(model.cfg, b, l + cfg.max_new_tokens)
  return prefill_and_decode(model, cfg, params, cache, prompt_BxL, prompt_len_B,
                            jnp.zeros((b,), jnp.int32), key)[0]


def make_sampler(model: Transformer, cfg: SamplingConfig) -> Callable[..., SampleOutput]:
  """Returns `sample(params, prompt_BxL, prompt_len_B, key) -> SampleOutput`, jitted once.

  Shapes are static, so one (batch, prompt length) pair compiles once; inputs keep the sharding
  they arrive with (shard the batch over `data` x `fsdp` with `sharding.shard_batch`).
  """
  return jax.jit(functools.partial(_sample, model, cfg))
