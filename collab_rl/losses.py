"""Losses of the trainers, with their maths; every mean is over the masked (assistant) tokens.

PPO policy loss (clipped surrogate), ratio rho = exp(logp - logp_old):
    L = -mean( min(rho * A, clip(rho, 1 - eps, 1 + eps) * A) )
Value loss (clipped like PPO2):
    L = 0.5 * mean( max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2) )
DPO, with summed log-probs of the candidate tokens under policy and frozen reference:
    z = beta * ((logp_c - ref_c) - (logp_r - ref_r)),   L = -mean( log sigmoid(z) )
KL to the reference per token, the non-negative "k3" estimator:
    k3 = exp(ref - logp) - (ref - logp) - 1
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _masked_mean(x, mask):
  m = mask.astype(jnp.float32)
  return (x * m).sum() / jnp.maximum(m.sum(), 1.0)


def token_logprobs(logits_BxLxV: jax.Array, tokens_BxL: jax.Array) -> jax.Array:
  """log p(token_t | tokens_<t) aligned with tokens_BxL (position 0 gets 0: nothing predicts it)."""
  logp_BxLxV = jax.nn.log_softmax(logits_BxLxV[:, :-1].astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp_BxLxV, tokens_BxL[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(picked, ((0, 0), (1, 0)))


def token_entropy(logits_BxLxV: jax.Array) -> jax.Array:
  """Entropy of the next-token distribution, aligned like `token_logprobs`."""
  logp = jax.nn.log_softmax(logits_BxLxV[:, :-1].astype(jnp.float32), axis=-1)
  ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return jnp.pad(ent, ((0, 0), (1, 0)))


def head_token_stats(hidden_BxLxD: jax.Array, kernel_DxV: jax.Array, tokens_BxL: jax.Array,
                     chunk: int, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """`token_logprobs` and `token_entropy` of the LM head's logits `hidden @ kernel` (computed in
  `dtype`, as the head's Dense does), `chunk` positions at a time: each chunk's fp32 logits are
  made, reduced to [B, chunk] and recomputed in the backward pass (`jax.checkpoint`), so that
  the [B, L, V] logits, their log-softmax and their gradients never exist whole. With a
  128k vocabulary and 4k tokens those are 2 GiB each per conversation."""
  b, length, d = hidden_BxLxD.shape
  n = length - 1  # position t predicts token t + 1
  pad = -n % chunk
  h_BxNxD = jnp.pad(hidden_BxLxD[:, :-1], ((0, 0), (0, pad), (0, 0)))
  t_BxN = jnp.pad(tokens_BxL[:, 1:], ((0, 0), (0, pad)))
  h_CxBxKxD = h_BxNxD.reshape(b, -1, chunk, d).transpose(1, 0, 2, 3)
  t_CxBxK = t_BxN.reshape(b, -1, chunk).transpose(1, 0, 2)
  kernel_DxV = kernel_DxV.astype(dtype)

  @jax.checkpoint
  def one(args):
    h_BxKxD, t_BxK = args
    logp_BxKxV = jax.nn.log_softmax(
        jnp.einsum("bkd,dv->bkv", h_BxKxD.astype(dtype), kernel_DxV).astype(jnp.float32), -1)
    picked_BxK = jnp.take_along_axis(logp_BxKxV, t_BxK[..., None], axis=-1)[..., 0]
    return picked_BxK, -jnp.sum(jnp.exp(logp_BxKxV) * logp_BxKxV, axis=-1)

  picked_CxBxK, ent_CxBxK = jax.lax.map(one, (h_CxBxKxD, t_CxBxK))
  unchunk = lambda x_CxBxK: jnp.pad(x_CxBxK.transpose(1, 0, 2).reshape(b, -1)[:, :n],
                                    ((0, 0), (1, 0)))
  return unchunk(picked_CxBxK), unchunk(ent_CxBxK)


def ppo_policy_loss(logp_BxL, old_logp_BxL, adv_BxL, mask_BxL, clip_eps: float):
  ratio = jnp.exp(logp_BxL - old_logp_BxL)
  unclipped = ratio * adv_BxL
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv_BxL
  loss = -_masked_mean(jnp.minimum(unclipped, clipped), mask_BxL)
  metrics = {
      "clip_fraction": _masked_mean((jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32),
                                    mask_BxL),
      # Schulman's low-variance estimate of KL(old || new).
      "approx_kl": _masked_mean((ratio - 1.0) - (logp_BxL - old_logp_BxL), mask_BxL),
  }
  return loss, metrics


def value_loss(value_BxL, old_value_BxL, returns_BxL, mask_BxL, clip: float):
  clipped = old_value_BxL + jnp.clip(value_BxL - old_value_BxL, -clip, clip)
  err = jnp.maximum((value_BxL - returns_BxL) ** 2, (clipped - returns_BxL) ** 2)
  return 0.5 * _masked_mean(err, mask_BxL)


def kl_k3(logp_BxL, ref_logp_BxL):
  d = ref_logp_BxL - logp_BxL
  return jnp.exp(d) - d - 1.0


def dpo_loss(logp_chosen_B, logp_rejected_B, ref_chosen_B, ref_rejected_B, beta: float,
             weight_B=None):
  """Inputs are log-probs summed over each candidate's own tokens (history excluded)."""
  chosen_reward = beta * (logp_chosen_B - ref_chosen_B)
  rejected_reward = beta * (logp_rejected_B - ref_rejected_B)
  z = chosen_reward - rejected_reward
  per_pair = -jax.nn.log_sigmoid(z)
  if weight_B is None:
    loss = per_pair.mean()
  else:
    w = weight_B.astype(jnp.float32)
    loss = (per_pair * w).sum() / jnp.maximum(w.sum(), 1.0)
  metrics = {"reward_margin": z.mean(), "preference_accuracy": (z > 0).mean(),
             "chosen_reward": chosen_reward.mean(), "rejected_reward": rejected_reward.mean()}
  return loss, metrics


def sequence_logprob(logp_BxL, mask_BxL):
  """Sum of the masked tokens' log-probs per row (DPO's log pi(y | x))."""
  return jnp.sum(logp_BxL * mask_BxL.astype(jnp.float32), axis=1)


def masked_mean(x, mask):
  return _masked_mean(x, mask)
