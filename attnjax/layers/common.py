"""Small building blocks shared by the models: RMSNorm, (gated) MLP, embeddings, dense.

Each NNX module here has a Linen twin in `attnjax.layers.linen` with the same parameter
names and shapes; the math is in the `*_apply` functions below, used by both.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.layers._core import ParamSpec, _canonical_dtype, _positive_int, constrain
from attnjax.layers.attention import make_param

__all__ = ["RMSNorm", "MLP", "Embed", "Dense", "rms_norm_apply", "mlp_apply", "ACTIVATIONS"]

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": jax.nn.gelu,
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


def _ones(key, shape, dtype=jnp.float32):
  del key
  return jnp.ones(shape, dtype)


def _zeros(key, shape, dtype=jnp.float32):
  del key
  return jnp.zeros(shape, dtype)


# ----------------------------------------------------------------------------- RMSNorm

def rms_norm_specs(dim: int) -> dict:
  return {"scale": ParamSpec((dim,), _ones, ("embed",))}


def rms_norm_apply(params, x, *, eps: float = 1e-6):
  """`y = x / sqrt(mean(x^2) + eps) * scale`, computed in float32, returned in x.dtype.

  Paper: "Root Mean Square Layer Normalization" (Zhang & Sennrich, 2019).
  """
  scale = params["scale"]
  if x.shape[-1] != scale.shape[0]:
    raise ValueError(f"x last dimension must be {scale.shape[0]}, got shape {x.shape}")
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis (see `rms_norm_apply`). `x [..., dim]` -> same shape."""

  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32, rngs: nnx.Rngs):
    _positive_int("dim", dim)
    if not eps > 0:
      raise ValueError(f"eps must be > 0, got eps={eps}")
    self.eps = eps
    self.scale = make_param(rngs, rms_norm_specs(dim)["scale"], param_dtype)

  def __call__(self, x):
    return rms_norm_apply({"scale": self.scale[...]}, x, eps=self.eps)


# ----------------------------------------------------------------------------- MLP

def _dense_init(in_axis=0, out_axis=-1):
  return jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                              in_axis=in_axis, out_axis=out_axis)


def mlp_specs(d_model: int, mlp_dim: int, gated: bool) -> dict:
  specs = {"wi": ParamSpec((d_model, mlp_dim), _dense_init(), ("embed", "mlp"))}
  if gated:
    specs["wg"] = ParamSpec((d_model, mlp_dim), _dense_init(), ("embed", "mlp"))
  specs["wo"] = ParamSpec((mlp_dim, d_model), _dense_init(), ("mlp", "embed"))
  return specs


def mlp_apply(params, x, *, activation: str, gated: bool, dtype=None, dropout=None):
  """Gated: `y = (act(x Wg) * (x Wi)) Wo` (GLU variants, Shazeer 2020); plain:
  `y = act(x Wi) Wo`. `x [B, ..., D]` -> `[B, ..., D]`."""
  act = ACTIVATIONS[activation]
  dtype = dtype or x.dtype
  lead = x.shape[:-1]
  x_BTD = x.reshape(lead[0], math.prod(lead[1:]), x.shape[-1]).astype(dtype)
  h_BTF = jnp.einsum("btd,df->btf", x_BTD, params["wi"].astype(dtype))
  if gated:
    h_BTF = act(jnp.einsum("btd,df->btf", x_BTD, params["wg"].astype(dtype))) * h_BTF
  else:
    h_BTF = act(h_BTF)
  h_BTF = constrain(h_BTF, ("batch", "length", "mlp"))
  if dropout is not None:
    h_BTF = dropout(h_BTF)
  y_BTD = jnp.einsum("btf,fd->btd", h_BTF, params["wo"].astype(dtype))
  return y_BTD.reshape(lead + (y_BTD.shape[-1],))


class MLP(nnx.Module):
  """Feed-forward block: gated (SwiGLU by default, "GLU Variants Improve Transformer") or
  plain (`gated=False`, e.g. GELU for ViT). `x [..., d_model]` -> `[..., d_model]`.

  Dropout (rate `dropout_rate`) is applied to the hidden activations when not deterministic.
  """

  def __init__(self, d_model: int, mlp_dim: int, *, activation: str = "silu", gated: bool = True,
               dropout_rate: float = 0.0, dtype: Any = None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    _positive_int("d_model", d_model)
    _positive_int("mlp_dim", mlp_dim)
    if activation not in ACTIVATIONS:
      raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got "
                       f"activation={activation!r}")
    if not 0.0 <= dropout_rate < 1.0:
      raise ValueError(f"dropout_rate must be in [0, 1), got dropout_rate={dropout_rate}")
    self.activation, self.gated = activation, bool(gated)
    self.dtype = _canonical_dtype("dtype", dtype)
    self.dropout_rate = dropout_rate
    specs = mlp_specs(d_model, mlp_dim, self.gated)
    self._param_names = tuple(specs)
    for name, spec in specs.items():
      setattr(self, name, make_param(rngs, spec, param_dtype))
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

  def __call__(self, x, *, deterministic: bool = True):
    params = {n: getattr(self, n)[...] for n in self._param_names}
    dropout = None
    if self.dropout_rate > 0 and not deterministic:
      dropout = lambda h: self.dropout(h, deterministic=False)
    return mlp_apply(params, x, activation=self.activation, gated=self.gated, dtype=self.dtype,
                     dropout=dropout)


# ----------------------------------------------------------------------------- Embed / Dense

class Embed(nnx.Module):
  """Token embedding `[vocab, D]` (axes 'vocab', 'embed'); `attend(x)` gives tied logits."""

  def __init__(self, vocab_size: int, d_model: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
    _positive_int("vocab_size", vocab_size)
    _positive_int("d_model", d_model)
    self.vocab_size = vocab_size
    spec = ParamSpec((vocab_size, d_model), jax.nn.initializers.normal(1.0), ("vocab", "embed"))
    self.embedding = make_param(rngs, spec, param_dtype)

  def __call__(self, tokens):
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise TypeError(f"tokens must be integer, got dtype {tokens.dtype}")
    return jnp.take(self.embedding[...], tokens, axis=0)


class Dense(nnx.Module):
  """`y = x W + b` on the last axis, with logical axis names for W (`names`, 2 entries)."""

  def __init__(self, in_features: int, out_features: int, *, names=("embed", None),
               use_bias: bool = True, dtype: Any = None, param_dtype=jnp.float32,
               kernel_init=None, rngs: nnx.Rngs):
    _positive_int("in_features", in_features)
    _positive_int("out_features", out_features)
    names = tuple(names)
    if len(names) != 2:
      raise ValueError(f"names must have 2 entries (in, out), got names={names}")
    self.in_features, self.out_features = in_features, out_features
    self.dtype = _canonical_dtype("dtype", dtype)
    self.kernel = make_param(
        rngs, ParamSpec((in_features, out_features), kernel_init or _dense_init(), names),
        param_dtype)
    self.bias = (make_param(rngs, ParamSpec((out_features,), _zeros, (names[1],)), param_dtype)
                 if use_bias else None)

  def __call__(self, x):
    if x.shape[-1] != self.in_features:
      raise ValueError(f"x last dimension must be in_features={self.in_features}, got shape "
                       f"{x.shape}")
    dtype = self.dtype or x.dtype
    y = jnp.einsum("...d,df->...f", x.astype(dtype), self.kernel[...].astype(dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y
