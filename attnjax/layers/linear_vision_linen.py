"""Linen twin of `attnjax.layers.linear_vision.VisionLinearAttention` (L^2ViT, CARE, HIIF,
FEAT): same options, parameter names, shapes and math (the shared `forward`).

    >>> layer = variants.get_linen("l2vit")(d_model=32, num_heads=2)
    >>> y = layer.apply(layer.init(jax.random.key(0), x_BHWD), x_BHWD)
"""

from __future__ import annotations

import flax.linen as nn

from attnjax.layers import linear_vision as _lv
from attnjax.layers import linen as _linen

__all__ = ["VisionLinearAttention"]


class VisionLinearAttention(_linen.MechanismTwin):
  """Linen twin of `attnjax.layers.linear_vision.VisionLinearAttention` (fields:
  `MechanismTwin`)."""

  config_fn = staticmethod(_lv.vision_config)

  def __post_init__(self):
    super().__post_init__()
    self._config()  # bad options raise at construction, as for the NNX layer

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None,
               deterministic: bool = True):
    del deterministic
    _lv._check_call(segment_ids, positions, cache)  # pylint: disable=protected-access
    cfg = self._config()
    params = _linen.params_from_specs(self, _lv.param_specs(cfg), cfg.param_dtype)
    return _lv.forward(cfg, params, x)
