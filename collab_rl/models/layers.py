"""The decoder's layers other than attention: Dense projections, RMSNorm and the SwiGLU MLP."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from collab_rl.models.config import TransformerConfig


class RMSNorm(nn.Module):
  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # Hugging Face casts back to the input dtype before multiplying by the weight.
    return x32.astype(self.dtype) * scale.astype(self.dtype)


def dense(features, name, cfg, bias=False):
  return nn.Dense(features, use_bias=bias, name=name, dtype=jnp.dtype(cfg.dtype),
                  param_dtype=jnp.dtype(cfg.param_dtype),
                  kernel_init=nn.initializers.normal(0.02))


class Weights(nn.Module):
  """A Dense layer's kernel (and bias) with nn.Dense's names and init, returned, not applied.

  Projections that read the same input (q/k/v; gate/up) concatenate their kernels and run one
  matmul: fewer, larger matmuls are markedly faster on CPU at decode batch sizes, while the
  params keep Hugging Face's one-tensor-per-projection layout.

  A LoRA adapter given unmerged (`lora_a` [in, r] and `lora_b` [r, out], already scaled by
  alpha / r, in the "lora" collection at this module's path: models/lora.py) adds x A B to the
  projection, its input x dropped at `rate` where a "dropout" RNG is given (`lora_delta`).
  """

  features: int
  use_bias: bool
  param_dtype: Any

  @nn.compact
  def __call__(self, in_features: int):
    kernel = self.param("kernel", nn.initializers.normal(0.02), (in_features, self.features),
                        self.param_dtype)
    bias = (self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            if self.use_bias else None)
    return kernel, bias

  def lora_delta(self, x_BxLxD, rate: float, dtype):
    """x A B of this projection's unmerged adapter (None without one); x dropped at `rate`
    (and rescaled) under a "dropout" RNG, as PEFT's LoRA dropout does."""
    if not self.has_variable("lora", "lora_a"):
      return None
    a_DxR, b_RxF = self.get_variable("lora", "lora_a"), self.get_variable("lora", "lora_b")
    x_BxLxD = x_BxLxD.astype(dtype)
    if rate and self.has_rng("dropout"):
      keep_BxLxD = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, x_BxLxD.shape)
      x_BxLxD = jnp.where(keep_BxLxD, x_BxLxD / (1.0 - rate), 0).astype(dtype)
    h_BxLxR = jnp.einsum("bld,dr->blr", x_BxLxD, a_DxR.astype(dtype))
    return jnp.einsum("blr,rf->blf", h_BxLxR, b_RxF.astype(dtype))


def fused_projection(x_BxLxD, projections, dtype, lora_dropout: float = 0.0):
  """x @ [W_1 | W_2 | ...] (+ biases) of `Weights` modules, split back into one output per
  projection, each plus its unmerged LoRA adapter's x A B where it has one."""
  weights = [p(x_BxLxD.shape[-1]) for p in projections]
  kernels = [k.astype(dtype) for k, _ in weights]
  y = jnp.einsum("bld,df->blf", x_BxLxD.astype(dtype), jnp.concatenate(kernels, axis=1))
  if any(b is not None for _, b in weights):
    y = y + jnp.concatenate([b.astype(dtype) if b is not None else
                             jnp.zeros((k.shape[1],), dtype) for k, b in weights])
  splits = list(np.cumsum([k.shape[1] for k in kernels])[:-1])
  outs = jnp.split(y, splits, axis=-1)
  deltas = [p.lora_delta(x_BxLxD, lora_dropout, dtype) for p in projections]
  return [o if d is None else o + d for o, d in zip(outs, deltas)]


class MLP(nn.Module):
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    pdt, f, dt = jnp.dtype(cfg.param_dtype), cfg.intermediate_size, jnp.dtype(cfg.dtype)
    gate, up = fused_projection(x_BxLxD, [Weights(f, False, pdt, name="gate_proj"),
                                          Weights(f, False, pdt, name="up_proj")],
                                dt, cfg.lora_dropout)
    (down,) = fused_projection(nn.silu(gate) * up,
                               [Weights(cfg.hidden_size, False, pdt, name="down_proj")],
                               dt, cfg.lora_dropout)
    return down
