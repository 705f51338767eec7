"""Linen twin of `attnjax.layers.heads.HeadsAttention` (MoH, head gates, SHViT, MW-MHA,
talking heads, cosine, Sinkhorn, additive, collapsed QK, log-n scaling): same options,
parameter names, shapes and math.

    >>> layer = variants.get_linen("moh")(d_model=32, num_heads=4, causal=True)
    >>> variables = layer.init(jax.random.key(0), x_BTD)
    >>> y, state = layer.apply(variables, x_BTD, mutable=["intermediates"])
    >>> aux_loss = state["intermediates"]["aux_loss"][0]   # MoH only
"""

from __future__ import annotations

import flax.linen as nn

from attnjax.layers import heads as _heads
from attnjax.layers import linen as _linen

__all__ = ["HeadsAttention"]


class HeadsAttention(_linen.MechanismTwin):
  """Linen twin of `attnjax.layers.heads.HeadsAttention` (fields: `MechanismTwin`).  MoH
  sows its weighted load-balance loss in the 'intermediates' collection as 'aux_loss'."""

  config_fn = staticmethod(_heads.heads_config)

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None,
               deterministic: bool = True):
    del deterministic
    _heads._check_call(cache)  # pylint: disable=protected-access
    cfg = self._config()
    params = _linen.params_from_specs(self, _heads.param_specs(cfg), cfg.param_dtype)
    y, aux = _heads.forward(cfg, params, x, segment_ids=segment_ids, positions=positions)
    if cfg.mechanism == "moh":
      self.sow("intermediates", "aux_loss", aux["aux_loss"])
    return y
