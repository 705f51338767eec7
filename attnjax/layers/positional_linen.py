"""Flax Linen twins of `attnjax.layers.positional` (PEG, LePE, GPSA, BoTNetAttention).

Same options, parameter names, shapes, initialisers and logical axis names
(`nn.with_logical_partitioning`) as the NNX layers, and the same forward functions, so
identical parameters give identical outputs.

    >>> from attnjax import variants
    >>> layer = variants.get_linen("convit")(d_model=64, num_heads=4)
    >>> variables = layer.init(jax.random.key(0), x_BHWD)
    >>> y = layer.apply(variables, x_BHWD)                      # [B, Hh, Ww, 64]
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from attnjax.layers import linen as _linen
from attnjax.layers import positional as _pos_layers
from attnjax.ops import positional as P

__all__ = ["PEG", "LePE", "GPSA", "BoTNetAttention"]


_params = _linen.params_from_specs


class PEG(nn.Module):
  """Linen twin of `attnjax.layers.positional.PEG`."""

  dim: int
  kernel: Any = 3
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    params = _params(self, _pos_layers.peg_specs(self.dim, self.kernel), self.param_dtype)
    return _pos_layers.peg_forward(params, x)


class LePE(nn.Module):
  """Linen twin of `attnjax.layers.positional.LePE`."""

  num_heads: int
  head_dim: int
  kernel: Any = 3
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, v_map):
    params = _params(self, _pos_layers.lepe_specs(self.num_heads, self.head_dim, self.kernel),
                     self.param_dtype)
    return P.lepe(v_map, params["kernel"], params["bias"])


def _base(m) -> Any:
  return _pos_layers._base_config(  # pylint: disable=protected-access
      m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.v_head_dim, m.out_features, m.rope,
      m.rope_base, m.scale, m.implementation, m.dtype, m.param_dtype)


class GPSA(nn.Module):
  """Linen twin of `attnjax.layers.positional.GPSA` (registry name 'convit')."""

  d_model: int
  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  v_head_dim: int | None = None
  out_features: int | None = None
  locality_strength: float = 1.0
  locality_distance: int = 1
  gate_init: float = 1.0
  rope: str | None = None
  rope_base: float = 10000.0
  scale: float | None = None
  implementation: Any = None
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def _config(self):
    return _pos_layers.GPSAConfig(_base(self), locality_strength=self.locality_strength,
                                  locality_distance=self.locality_distance,
                                  gate_init=self.gate_init)

  def __post_init__(self):
    super().__post_init__()
    self._config()  # bad options raise at construction, as for the NNX layer

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None,
               deterministic: bool = True):
    del deterministic
    _pos_layers._check_call(positions, segment_ids, cache)  # pylint: disable=protected-access
    cfg = self._config()
    params = _params(self, _pos_layers.gpsa_specs(cfg), cfg.base.param_dtype)
    return _pos_layers.gpsa_forward(cfg, params, x)


class BoTNetAttention(nn.Module):
  """Linen twin of `attnjax.layers.positional.BoTNetAttention` (registry name 'botnet')."""

  d_model: int
  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  v_head_dim: int | None = None
  out_features: int | None = None
  max_distance: Any = 7
  rope: str | None = None
  rope_base: float = 10000.0
  scale: float | None = None
  implementation: Any = None
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def _config(self):
    return _pos_layers.BoTNetConfig(_base(self), max_distance=self.max_distance)

  def __post_init__(self):
    super().__post_init__()
    self._config()

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None,
               deterministic: bool = True):
    del deterministic
    _pos_layers._check_call(positions, segment_ids, cache)  # pylint: disable=protected-access
    cfg = self._config()
    params = _params(self, _pos_layers.botnet_specs(cfg), cfg.base.param_dtype)
    return _pos_layers.botnet_forward(cfg, params, x)
