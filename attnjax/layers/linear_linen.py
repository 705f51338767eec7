"""Flax Linen twin of `attnjax.layers.linear.LinearAttention` (every linear-attention variant).

Same constructor options, parameter names, shapes, initialisers and logical axis names
(`nn.with_logical_partitioning`) as the NNX layer, and the same forward function
(`attnjax.layers.linear.forward`), so identical parameters give identical outputs.

    >>> from attnjax import variants
    >>> layer = variants.get_linen("lightning")(d_model=64, num_heads=4, learnable_decay=True)
    >>> variables = layer.init(jax.random.key(0), x_BTD)
    >>> y = layer.apply(variables, x_BTD)
    >>> cache = layer.init_cache(B, max_len=128)                 # causal variants
    >>> y_t, cache = layer.apply(variables, x_BTD[:, :1], cache=cache)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from attnjax.layers import linear as _lin
from attnjax.layers import linen as _linen
from attnjax.ops import linear as L

__all__ = ["LinearAttention"]


class LinearAttention(nn.Module):
  """Linen twin of `attnjax.layers.linear.LinearAttention` (see there for every option).

  Call: `layer.apply(variables, x [B,T,D] or [B,Hh,Ww,D], *, segment_ids=None,
  positions=None, cache=None, deterministic=True)`; with `cache` (from `init_cache`) it
  returns `(y, new_cache)`. Dropout (when `dropout_rate > 0` and not deterministic) uses
  the 'dropout' RNG stream.
  """

  d_model: int
  num_heads: int
  mechanism: str
  num_kv_heads: int | None = None
  head_dim: int | None = None
  v_head_dim: int | None = None
  causal: bool | None = None
  feature_map: str | None = None
  decay: Any = None
  learnable_decay: bool = False
  gate: bool = False
  focusing_factor: float = 3.0
  dwc_size: int | None = None
  out_norm: bool | None = None
  chunk_size: int = 64
  implementation: str | None = None
  eps: float = L.DEFAULT_EPS
  rope: str | None = None
  rope_base: float = 10000.0
  use_bias: bool = False
  dropout_rate: float = 0.0
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def _config(self):
    options = {name: getattr(self, name) for name in _OPTIONS}
    return _lin.linear_config(self.d_model, self.num_heads, mechanism=self.mechanism, **options)

  def __post_init__(self):
    super().__post_init__()
    self._config()  # bad options raise at construction, as for the NNX layer

  def init_cache(self, batch: int, max_len: int) -> dict:
    """The decoding cache `{'state': ..., 'index': int32 [], 'lengths': int32 [B]}` (works
    on an unbound module)."""
    return _lin.init_state(self._config()[0], batch, max_len)

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None,
               deterministic: bool = True):
    lc, specs = self._config()
    params = _linen.params_from_specs(self, specs, lc.cfg.param_dtype)
    dropout = _linen.dropout_fn(lc.cfg.dropout_rate, deterministic)
    return _lin.forward(lc, params, x, segment_ids=segment_ids, positions=positions, cache=cache,
                        dropout=dropout)


_OPTIONS = tuple(name for name in LinearAttention.__dataclass_fields__
                 if name not in ("d_model", "num_heads", "mechanism", "parent", "name"))
