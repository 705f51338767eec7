"""Flax NNX attention layers (Linen twins in `attnjax.layers.linen`).

- `MultiHeadAttention`: self/cross attention, GQA, any `attnjax.masks.Mask` or `MaskSpec`,
  score mods, ALiBi, relative-position tables, sinks, softcap, qk-norm, RoPE (1D, axial,
  mixed), segment ids, `implementation=`, KV cache (`init_cache`, `cache=`).
- `LinearAttention`: the linear-attention family (`mechanism='linear' | 'lightning' |
  'retention' | 'efficient' | 'focused' | 'inline' | 'flow'`), recurrent-state decoding.
- `PoolingAttention`: Set Transformer's PMA.
- `RMSNorm`, `MLP`, `Embed`, `Dense`: the blocks the models use.
- `flax_attention_fn`: a drop-in `attention_fn` for Flax's own attention classes.
- `ParamSpec`, `make_param`, `constrain`: for building your own layers the way these are
  (parameters carrying logical axis names; activation sharding constraints by name).
- Named variants (`'swin'`, `'neighborhood'`, ...) are built through `attnjax.variants`.

Submodules are importable as `attnjax.layers.<name>` (the lazy ones on first access):
`linen` (Linen twins), `linear`, `linear_linen`, `presets`, the vision families
`spatial_masked`, `reduced`, `positional`, `channel` (CNN channel/spatial modules on
`[B, Hh, Ww, C]`), `routing`, `tokens`, `heads`, `linear_gated`, `linear_vision` and their
`*_linen` twins.
"""

import importlib as _importlib

from attnjax.layers._core import (
  AttentionConfig,
  KVCache,
  MaskSpec,
  ParamSpec,
  constrain,
  init_kv_cache,
)
from attnjax.layers.attention import MultiHeadAttention, make_param
from attnjax.layers.common import MLP, Dense, Embed, RMSNorm
from attnjax.layers.flax_compat import flax_attention_fn
from attnjax.layers.linear import LinearAttention
from attnjax.layers.pooling import PoolingAttention
from attnjax.layers.presets import PRESETS, variant_kwargs

__all__ = [
    "AttentionConfig", "KVCache", "MaskSpec", "init_kv_cache", "MultiHeadAttention",
    "LinearAttention", "PoolingAttention", "RMSNorm", "MLP", "Embed", "Dense",
    "flax_attention_fn", "PRESETS", "variant_kwargs", "ParamSpec", "make_param", "constrain",
]

_LAZY_SUBMODULES = ("linen", "linear_linen", "spatial_masked", "spatial_masked_linen",
                    "reduced", "reduced_linen", "positional", "positional_linen", "channel",
                    "channel_linen", "routing", "routing_linen", "tokens", "tokens_linen",
                    "heads", "heads_linen", "linear_gated", "linear_gated_linen",
                    "linear_vision", "linear_vision_linen")


def __getattr__(name):
  if name in _LAZY_SUBMODULES:
    return _importlib.import_module(f"attnjax.layers.{name}")
  raise AttributeError(f"module 'attnjax.layers' has no attribute {name!r}")
