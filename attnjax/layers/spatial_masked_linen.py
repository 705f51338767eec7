"""Flax Linen twin of `attnjax.layers.spatial_masked.SpatialAttention` (halo, cswin, ccnet,
maxvit_block, maxvit_grid).

Same constructor options, parameter names, shapes, initialisers and logical axis names
(`nn.with_logical_partitioning`) as the NNX layer, and the same forward function
(`attnjax.layers.spatial_masked.forward`), so identical parameters give identical outputs.

    >>> from attnjax import variants
    >>> layer = variants.get_linen("cswin")(d_model=64, num_heads=4, stripe_width=2)
    >>> variables = layer.init(jax.random.key(0), x_BHWD)
    >>> y = layer.apply(variables, x_BHWD)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from attnjax.layers import linen as _linen
from attnjax.layers import spatial_masked as _sm

__all__ = ["SpatialAttention"]


class SpatialAttention(nn.Module):
  """Linen twin of `attnjax.layers.spatial_masked.SpatialAttention` (see there).

  Options left at None take the mechanism's defaults. Call: `layer.apply(variables,
  x [B, Hh, Ww, D], *, segment_ids=None, positions=None, cache=None, deterministic=True)`.
  """

  d_model: int
  num_heads: int
  mechanism: str
  num_kv_heads: int | None = None
  head_dim: int | None = None
  v_head_dim: int | None = None
  block_size: Any = None
  halo_size: Any = None
  stripe_width: Any = None
  lepe: bool | None = None
  recurrence: int | None = None
  grid_size: Any = None
  rpb: bool | None = None
  use_bias: bool = False
  qk_norm: bool = False
  rope: str | None = None
  rope_base: float = 10000.0
  scale: float | None = None
  implementation: Any = None
  block_sizes: Any = None
  dropout_rate: float = 0.0
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def _config(self):
    options = {name: getattr(self, name) for name in _FIELDS}
    own = {k: options.pop(k) for k in _sm._ALL_OPTIONS}  # pylint: disable=protected-access
    own = {k: v for k, v in own.items() if v is not None}
    return _sm.spatial_config(self.d_model, self.num_heads, mechanism=self.mechanism, **options,
                              **own)

  def __post_init__(self):
    super().__post_init__()
    self._config()  # bad options raise at construction, as for the NNX layer

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None,
               deterministic: bool = True):
    sc, specs = self._config()
    params = _linen.params_from_specs(self, specs, sc.cfg.param_dtype)
    dropout = _linen.dropout_fn(sc.cfg.dropout_rate, deterministic)
    return _sm.forward(sc, params, x, segment_ids=segment_ids, positions=positions, cache=cache,
                       dropout=dropout)


_FIELDS = tuple(name for name in SpatialAttention.__dataclass_fields__
                if name not in ("d_model", "num_heads", "mechanism", "parent", "name"))
