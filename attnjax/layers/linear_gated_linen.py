"""Flax Linen twin of `attnjax.layers.linear_gated.GatedLinearAttention` ('gla',
'deltanet', 'gated_deltanet', 'mamba2').

Same options, parameter names, shapes, initialisers and logical axis names as the NNX
layer, and the same forward function (`attnjax.layers.linear_gated.forward`), so identical
parameters give identical outputs.

    >>> layer = variants.get_linen("gated_deltanet")(d_model=64, num_heads=4)
    >>> variables = layer.init(jax.random.key(0), x_BTD)
    >>> cache = layer.init_cache(B, max_len=128)
    >>> y_t, cache = layer.apply(variables, x_BTD[:, :1], cache=cache)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from attnjax.layers import linear_gated as _lg
from attnjax.layers import linen as _linen

__all__ = ["GatedLinearAttention"]


class GatedLinearAttention(nn.Module):
  """Linen twin of `attnjax.layers.linear_gated.GatedLinearAttention` (see there)."""

  d_model: int
  num_heads: int
  mechanism: str
  num_kv_heads: int | None = None
  head_dim: int | None = None
  v_head_dim: int | None = None
  causal: bool = True
  conv_size: int = 4
  gate_rank: int = 16
  chunk_size: int = 64
  rope: str | None = None
  rope_base: float = 10000.0
  use_bias: bool = False
  dropout_rate: float = 0.0
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def _config(self):
    options = {name: getattr(self, name) for name in _OPTIONS}
    return _lg.gated_config(self.d_model, self.num_heads, mechanism=self.mechanism, **options)

  def __post_init__(self):
    super().__post_init__()
    self._config()  # bad options raise at construction, as for the NNX layer

  def init_cache(self, batch: int, max_len: int) -> dict:
    """The decoding cache (works on an unbound module)."""
    return _lg.init_state(self._config()[0], batch, max_len)

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None,
               deterministic: bool = True):
    gc, specs = self._config()
    params = _linen.params_from_specs(self, specs, gc.cfg.param_dtype)
    dropout = _linen.dropout_fn(gc.cfg.dropout_rate, deterministic)
    return _lg.forward(gc, params, x, segment_ids=segment_ids, positions=positions, cache=cache,
                       dropout=dropout)


_OPTIONS = tuple(name for name in GatedLinearAttention.__dataclass_fields__
                 if name not in ("d_model", "num_heads", "mechanism", "parent", "name"))
