"""Linen twin of `attnjax.layers.reduced.ReducedSpatialAttention` (PVT, Twins, HiLo,
S2AFormer, DaViT, CrossFormer): same options, parameter names, shapes and math.

    >>> layer = variants.get_linen("pvt")(d_model=32, num_heads=2, sr_ratio=2)
    >>> y = layer.apply(layer.init(jax.random.key(0), x_BHWD), x_BHWD)
"""

from __future__ import annotations

import flax.linen as nn

from attnjax.layers import linen as _linen
from attnjax.layers import reduced as _red

__all__ = ["ReducedSpatialAttention"]


class ReducedSpatialAttention(nn.Module):
  """Linen twin of `attnjax.layers.reduced.ReducedSpatialAttention`; `options` holds the
  mechanism's options as sorted `(name, value)` pairs (Linen fields must be hashable)."""

  d_model: int
  num_heads: int
  mechanism: str
  num_kv_heads: int | None = None
  head_dim: int | None = None
  options: tuple = ()

  def _config(self):
    return _red.reduced_config(self.mechanism, self.d_model, self.num_heads,
                               num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                               **dict(self.options))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None,
               deterministic: bool = True):
    _red._check_call(segment_ids, positions, cache)  # pylint: disable=protected-access
    cfg = self._config()
    params = _linen.params_from_specs(self, _red.param_specs(cfg), cfg.param_dtype)
    return _red.forward(cfg, params, x, dropout=_linen.dropout_fn(cfg.dropout_rate, deterministic))
