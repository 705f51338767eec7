"""Flax Linen twins of the channel / spatial attention modules of `attnjax.layers.channel`.

Each twin has the fields of its NNX module's config (`channels` and the options) plus
`param_dtype`; same parameter names, shapes, initialisers and forward function
(`attnjax.layers.channel.forward`), so identical parameters give identical outputs.

    >>> from attnjax.layers import channel_linen
    >>> layer = channel_linen.get_module("eca")(channels=16)
    >>> variables = layer.init(jax.random.key(0), x_BHWC)
    >>> y = layer.apply(variables, x_BHWC)                 # [B, Hh, Ww, 16]
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from attnjax.layers import channel as _ch
from attnjax.layers import linen as _linen

__all__ = ["SqueezeExcitation", "EfficientChannelAttention", "CoordinateAttention",
           "EfficientLocalAttention", "CBAM", "TripletAttention", "PolarizedSelfAttention",
           "LargeKernelAttention", "LargeKernelConvAttention", "ULSAM", "AttentionInAttention",
           "SparseLargeSeparableKernelAttention", "GuidedContextGating", "MODULES", "get_module"]


class _LinenChannel(nn.Module):
  """Base of the twins: builds the config from the fields, the params from its specs."""

  CONFIG = None  # set per twin

  def _config(self):
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self.CONFIG)}
    return self.CONFIG(**fields)

  def __post_init__(self):
    super().__post_init__()
    self._config()  # bad options raise at construction, as for the NNX module

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):
    del deterministic
    cfg = self._config()
    params = _linen.params_from_specs(self, cfg.specs(), self.param_dtype)
    return _ch.forward(cfg, params, x)


def _twin(nnx_cls) -> type:
  """The Linen twin of `nnx_cls`: one dataclass field per config field, plus param_dtype."""
  config_cls = nnx_cls.CONFIG
  annotations, namespace = {}, {}
  for f in dataclasses.fields(config_cls):
    annotations[f.name] = f.type
    if f.default is not dataclasses.MISSING:
      namespace[f.name] = f.default
  annotations["param_dtype"] = Any
  namespace["param_dtype"] = jnp.float32
  namespace.update(__annotations__=annotations, CONFIG=config_cls, __module__=__name__,
                   __qualname__=nnx_cls.__name__,
                   __doc__=f"Linen twin of `attnjax.layers.channel.{nnx_cls.__name__}`.\n\n"
                           f"{nnx_cls.__doc__}")
  return type(nnx_cls.__name__, (_LinenChannel,), namespace)


SqueezeExcitation = _twin(_ch.SqueezeExcitation)
EfficientChannelAttention = _twin(_ch.EfficientChannelAttention)
CoordinateAttention = _twin(_ch.CoordinateAttention)
EfficientLocalAttention = _twin(_ch.EfficientLocalAttention)
CBAM = _twin(_ch.CBAM)
TripletAttention = _twin(_ch.TripletAttention)
PolarizedSelfAttention = _twin(_ch.PolarizedSelfAttention)
LargeKernelAttention = _twin(_ch.LargeKernelAttention)
LargeKernelConvAttention = _twin(_ch.LargeKernelConvAttention)
ULSAM = _twin(_ch.ULSAM)
AttentionInAttention = _twin(_ch.AttentionInAttention)
SparseLargeSeparableKernelAttention = _twin(_ch.SparseLargeSeparableKernelAttention)
GuidedContextGating = _twin(_ch.GuidedContextGating)


def _psa(mode):
  def factory(**fields):
    if "mode" in fields:
      raise TypeError(f"'psa_{mode}' fixes mode={mode!r}; use PolarizedSelfAttention for others")
    return PolarizedSelfAttention(mode=mode, **fields)
  factory.__name__ = f"psa_{mode}"
  return factory


MODULES = {
    "se": SqueezeExcitation, "eca": EfficientChannelAttention, "coord": CoordinateAttention,
    "ela": EfficientLocalAttention, "cbam": CBAM, "triplet": TripletAttention,
    "psa_parallel": _psa("parallel"), "psa_sequential": _psa("sequential"),
    "lka": LargeKernelAttention, "lkca": LargeKernelConvAttention, "ulsam": ULSAM,
    "a2n": AttentionInAttention, "sdlska": SparseLargeSeparableKernelAttention,
    "gcg": GuidedContextGating,
}
assert set(MODULES) == set(_ch.MODULES)


def get_module(name: str):
  """The Linen factory `(channels=..., **options) -> nn.Module` registered under `name`."""
  if name not in MODULES:
    close = difflib.get_close_matches(str(name), list(MODULES), n=3, cutoff=0.5)
    raise ValueError(f"unknown channel attention module name={name!r}; close matches: "
                     f"{close if close else 'none'}; known: {sorted(MODULES)}")
  return MODULES[name]
