"""Flax NNX attention layers (Linen twins in `attnjax.layers.linen`).

- `MultiHeadAttention`: self/cross attention, GQA, any `attnjax.masks.Mask` or `MaskSpec`,
  score mods, ALiBi, relative-position tables, sinks, softcap, qk-norm, RoPE (1D, axial,
  mixed), segment ids, `implementation=`, KV cache (`init_cache`, `cache=`).
- `PoolingAttention`: Set Transformer's PMA.
- `RMSNorm`, `MLP`, `Embed`, `Dense`: the blocks the models use.
- `flax_attention_fn`: a drop-in `attention_fn` for Flax's own attention classes.
- Named variants (`'swin'`, `'neighborhood'`, ...) are built through `attnjax.variants`.
"""

from attnjax.layers._core import AttentionConfig, KVCache, MaskSpec, init_kv_cache
from attnjax.layers.attention import MultiHeadAttention
from attnjax.layers.common import MLP, Dense, Embed, RMSNorm
from attnjax.layers.flax_compat import flax_attention_fn
from attnjax.layers.pooling import PoolingAttention
from attnjax.layers.presets import PRESETS, variant_kwargs

__all__ = [
    "AttentionConfig", "KVCache", "MaskSpec", "init_kv_cache", "MultiHeadAttention",
    "PoolingAttention", "RMSNorm", "MLP", "Embed", "Dense", "flax_attention_fn", "PRESETS",
    "variant_kwargs",
]

try: from attnjax.layers import linear as _linear  # noqa: F401  (registers the linear-attention variants)
except ImportError as _e: __import__("warnings").warn(f"attnjax.layers.linear not loaded: {_e}")
