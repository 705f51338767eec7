"""Flax Linen twins of the attnjax NNX layers.

Same constructor options, same parameter names and shapes, same math (both call
`attnjax.layers._core` / `attnjax.layers.common`), so given identical parameters the
outputs are identical. Parameters carry logical axis names through
`nn.with_logical_partitioning`.

    >>> import flax.linen as nn
    >>> from attnjax.layers import linen as ajl
    >>> layer = ajl.MultiHeadAttention(d_model=64, num_heads=4, causal=True, rope="1d")
    >>> variables = layer.init(jax.random.key(0), x_BTD)
    >>> y = layer.apply(variables, x_BTD)

Named variants: `attnjax.variants.get_linen(name)(d_model=..., num_heads=..., **options)`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from attnjax.layers import _core, common
from attnjax.layers._core import AttentionConfig, KVCache, _positive_int
from attnjax.layers.pooling import SEED_INIT, pooling_segment_ids

__all__ = ["MultiHeadAttention", "RMSNorm", "MLP", "PoolingAttention", "MechanismTwin"]


def _param(module: nn.Module, name: str, spec: _core.ParamSpec, dtype):
  return module.param(name, nn.with_logical_partitioning(spec.init, spec.names), spec.shape, dtype)


def params_from_specs(module: nn.Module, specs: dict, dtype) -> dict:
  """``{name: param}`` of a Linen twin, one ``module.param`` per ``ParamSpec`` (same
  names, shapes, initialisers and logical axes as the NNX layer's)."""
  return {name: _param(module, name, spec, dtype) for name, spec in specs.items()}


def dropout_fn(rate: float, deterministic: bool):
  """The ``dropout`` callable the shared forward functions take: None when ``rate`` is 0
  or ``deterministic``; else an ``nn.Dropout`` (call inside ``nn.compact``)."""
  if rate <= 0 or deterministic:
    return None
  drop = nn.Dropout(rate=rate)
  return lambda y: drop(y, deterministic=False)


class MechanismTwin(nn.Module):
  """Base of the Linen twins of the mechanism-family layers (heads, tokens, routing,
  reduced, linear_vision): the fields every one of them has, and ``_config()``, which
  builds the family's config through the subclass's ``config_fn`` (the NNX layer's
  ``*_config`` function).  ``options`` holds the mechanism's options as sorted
  ``(name, value)`` pairs (Linen fields must be hashable)."""

  d_model: int
  num_heads: int
  mechanism: str
  num_kv_heads: int | None = None
  head_dim: int | None = None
  options: tuple = ()

  config_fn = None  # set by each subclass: fn(mechanism, d_model, num_heads, **kw) -> config

  def _config(self):
    return type(self).config_fn(self.mechanism, self.d_model, self.num_heads,
                                num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                                **dict(self.options))


class MultiHeadAttention(nn.Module):
  """Linen twin of `attnjax.layers.MultiHeadAttention` (see there for every option)."""

  d_model: int
  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  v_head_dim: int | None = None
  kv_features: int | None = None
  out_features: int | None = None
  use_bias: bool = False
  causal: bool = False
  mask: Any = None
  score_mod: Any = None
  scale: float | None = None
  softcap: float | None = None
  sinks: bool = False
  qk_norm: bool = False
  rope: str | None = None
  rope_base: float = 10000.0
  rope_ndim: int = 2
  alibi: bool = False
  relpos_max_distance: Any = None
  implementation: Any = None
  block_sizes: Any = None
  dropout_rate: float = 0.0
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @property
  def config(self) -> AttentionConfig:
    names = [f.name for f in AttentionConfig.__dataclass_fields__.values()]
    return AttentionConfig(**{n: getattr(self, n) for n in names})

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty `KVCache` (works on an unbound module)."""
    return _core.init_kv_cache(self.config, batch, max_len, dtype)

  @nn.compact
  def __call__(self, x, context=None, *, segment_ids=None, context_segment_ids=None,
               positions=None, context_positions=None, cache=None, deterministic: bool = True):
    cfg = self.config
    params = params_from_specs(self, _core.param_specs(cfg), cfg.param_dtype)
    dropout = dropout_fn(cfg.dropout_rate, deterministic)
    return _core.attention_forward(
        cfg, params, x, context, segment_ids=segment_ids, context_segment_ids=context_segment_ids,
        positions=positions, context_positions=context_positions, cache=cache, dropout=dropout)


class RMSNorm(nn.Module):
  """Linen twin of `attnjax.layers.RMSNorm`."""

  dim: int
  eps: float = 1e-6
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    _positive_int("dim", self.dim)
    scale = _param(self, "scale", common.rms_norm_specs(self.dim)["scale"], self.param_dtype)
    return common.rms_norm_apply({"scale": scale}, x, eps=self.eps)


class MLP(nn.Module):
  """Linen twin of `attnjax.layers.MLP`."""

  d_model: int
  mlp_dim: int
  activation: str = "silu"
  gated: bool = True
  dropout_rate: float = 0.0
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):
    if self.activation not in common.ACTIVATIONS:
      raise ValueError(f"activation must be one of {sorted(common.ACTIVATIONS)}, got "
                       f"{self.activation!r}")
    params = {n: _param(self, n, s, self.param_dtype)
              for n, s in common.mlp_specs(self.d_model, self.mlp_dim, self.gated).items()}
    dropout = None
    if self.dropout_rate > 0 and not deterministic:
      drop = nn.Dropout(rate=self.dropout_rate)
      dropout = lambda h: drop(h, deterministic=False)
    return common.mlp_apply(params, x, activation=self.activation, gated=self.gated,
                            dtype=_core._canonical_dtype("dtype", self.dtype), dropout=dropout)


class PoolingAttention(nn.Module):
  """Linen twin of `attnjax.layers.PoolingAttention` (PMA, Set Transformer)."""

  d_model: int
  num_heads: int
  num_seeds: int = 1
  num_kv_heads: int | None = None
  head_dim: int | None = None
  param_dtype: Any = jnp.float32
  options: tuple = ()  # extra MultiHeadAttention options as (name, value) pairs

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None,
               deterministic: bool = True):
    if positions is not None or cache is not None:
      raise ValueError("PoolingAttention takes no positions and no cache")
    if x.ndim != 3:
      raise ValueError(f"x must be [B, n, D], got shape {x.shape}")
    _positive_int("num_seeds", self.num_seeds)
    options = dict(self.options)
    if options.get("causal") or options.get("rope") is not None:
      raise ValueError("PoolingAttention takes neither causal=True nor rope (sets have no order)")
    options.pop("causal", None)
    seeds = _param(self, "seeds", _core.ParamSpec((self.num_seeds, self.d_model), SEED_INIT,
                                                  (None, "embed")), self.param_dtype)
    q_seg, kv_seg = pooling_segment_ids(x, segment_ids, self.num_seeds)
    attn = MultiHeadAttention(d_model=self.d_model, num_heads=self.num_heads,
                              num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                              param_dtype=self.param_dtype, name="attention", **options)
    s = jnp.broadcast_to(seeds.astype(x.dtype), (x.shape[0],) + seeds.shape)
    return attn(s, x, segment_ids=q_seg, context_segment_ids=kv_seg, deterministic=deterministic)
