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


def fused_projection(x_BxLxD, weights, dtype):
  """x @ [W_1 | W_2 | ...] (+ biases), split back into one output per projection."""
  kernels = [k.astype(dtype) for k, _ in weights]
  y = jnp.einsum("bld,df->blf", x_BxLxD.astype(dtype), jnp.concatenate(kernels, axis=1))
  if any(b is not None for _, b in weights):
    y = y + jnp.concatenate([b.astype(dtype) if b is not None else
                             jnp.zeros((k.shape[1],), dtype) for k, b in weights])
  splits = list(np.cumsum([k.shape[1] for k in kernels])[:-1])
  return jnp.split(y, splits, axis=-1)


class MLP(nn.Module):
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    d, pdt, f = x_BxLxD.shape[-1], jnp.dtype(cfg.param_dtype), cfg.intermediate_size
    gate, up = fused_projection(x_BxLxD, [Weights(f, False, pdt, name="gate_proj")(d),
                                          Weights(f, False, pdt, name="up_proj")(d)],
                                jnp.dtype(cfg.dtype))
    return dense(cfg.hidden_size, "down_proj", cfg)(nn.silu(gate) * up)
