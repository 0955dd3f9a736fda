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
