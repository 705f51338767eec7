"""Linen twin of `attnjax.layers.routing.RoutingAttention` (MoBA, BiFormer, dynamic mask
attention, Sparsifiner): same options, parameter names, shapes and math.

    >>> layer = variants.get_linen("biformer")(d_model=32, num_heads=2, num_regions=2)
    >>> y = layer.apply(layer.init(jax.random.key(0), x_BHWD), x_BHWD)
"""

from __future__ import annotations

import flax.linen as nn

from attnjax.layers import linen as _linen
from attnjax.layers import routing as _rt

__all__ = ["RoutingAttention"]


class RoutingAttention(_linen.MechanismTwin):
  """Linen twin of `attnjax.layers.routing.RoutingAttention` (fields: `MechanismTwin`)."""

  config_fn = staticmethod(_rt.routing_config)

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None,
               deterministic: bool = True):
    del deterministic
    cfg = self._config()
    params = _linen.params_from_specs(self, _rt.param_specs(cfg), cfg.param_dtype)
    return _rt.forward(cfg, params, x, segment_ids=segment_ids, positions=positions,
                       cache=cache)
