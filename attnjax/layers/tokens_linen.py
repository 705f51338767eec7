"""Linen twin of `attnjax.layers.tokens.TokenAttention` (agent, perceiver, lookupvit,
registers, isab, proxy, super_token, slot, simpool, mil_pool, class_attention): same
options, parameter names, shapes and math.

    >>> layer = variants.get_linen("slot")(d_model=32, num_heads=2, num_slots=3)
    >>> z = layer.apply(layer.init(jax.random.key(0), x_BnD), x_BnD)   # [B, 3, 32]
"""

from __future__ import annotations

import flax.linen as nn

from attnjax.layers import linen as _linen
from attnjax.layers import tokens as _tok

__all__ = ["TokenAttention"]


class TokenAttention(_linen.MechanismTwin):
  """Linen twin of `attnjax.layers.tokens.TokenAttention` (fields: `MechanismTwin`)."""

  config_fn = staticmethod(_tok.token_config)

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None,
               deterministic: bool = True):
    del positions
    _tok._check_call(cache)  # pylint: disable=protected-access
    cfg = self._config()
    params = _linen.params_from_specs(self, _tok.param_specs(cfg), cfg.param_dtype)
    key = self.make_rng("dropout") if not deterministic and _tok.needs_rng(cfg) else None
    return _tok.forward(cfg, params, x, segment_ids=segment_ids, key=key)
