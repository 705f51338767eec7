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


class ReducedSpatialAttention(_linen.MechanismTwin):
  """Linen twin of `attnjax.layers.reduced.ReducedSpatialAttention` (fields:
  `MechanismTwin`; `options` holds the mechanism's options as sorted `(name, value)`
  pairs). Call: `(x [B, Hh, Ww, D], *, positions=None, deterministic=True)`, with
  `positions [B, Hh*Ww, 2]` the tokens' RoPE coordinates (needs `rope`), as for NNX."""

  config_fn = staticmethod(_red.reduced_config)

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None,
               deterministic: bool = True):
    _red._check_call(segment_ids, cache)  # pylint: disable=protected-access
    cfg = self._config()
    params = _linen.params_from_specs(self, _red.param_specs(cfg), cfg.param_dtype)
    return _red.forward(cfg, params, x, positions=positions,
                        dropout=_linen.dropout_fn(cfg.dropout_rate, deterministic))
