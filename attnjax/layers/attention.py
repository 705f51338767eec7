"""Flax NNX multi-head attention layer (self and cross, GQA, masks, RoPE, KV cache).

The math lives in `attnjax.layers._core` (shared with the Linen twin in
`attnjax.layers.linen`); this module only owns the parameters.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from attnjax.layers import _core
from attnjax.layers._core import AttentionConfig, KVCache, MaskSpec

__all__ = ["MultiHeadAttention", "make_param", "KVCache", "MaskSpec", "AttentionConfig"]


def make_param(rngs: nnx.Rngs, spec: _core.ParamSpec, dtype) -> nnx.Param:
  """An `nnx.Param` initialised from `spec`, carrying its logical axis names.

  The names are stored as `out_sharding` metadata with eager sharding off, so layers can
  be built without a mesh; `attnjax.parallel` maps them to mesh axes.
  """
  value = spec.init(rngs.params(), spec.shape, dtype)
  return nnx.Param(value, eager_sharding=False, sharding_names=spec.names)


class MultiHeadAttention(nnx.Module):
  """Multi-head (grouped-query) attention over any `attnjax` mask, Flax NNX.

  `y = concat_n softmax_j(mods(s * q_n(x_i) . k_g(n)(c_j)) | mask) v_g(n)(c_j) @ Wo`, with
  `q = x Wq [B,T,N,H]`, `k = c Wk [B,S,K,H]`, `v = c Wv [B,S,K,Hv]`, query head `n` using
  kv head `g(n) = n // (N/K)` (GQA), `s = scale` (default `1/sqrt(H)`), `c = x` for
  self-attention. The attention itself is `attnjax.attention` (any `implementation`).

  Papers: "Attention Is All You Need" (multi-head attention); "GQA: Training Generalized
  Multi-Query Transformer Models from Multi-Head Checkpoints"; "RoFormer" (rope);
  "Scaling Vision Transformers to 22 Billion Parameters" (qk-norm).

  Args:
    d_model: D, the width of `x` (and of the output unless `out_features`).
    num_heads: N query heads.
    num_kv_heads: K key/value heads (N % K == 0); default N.
    head_dim: H; default `d_model // num_heads`.
    v_head_dim: Hv; default H.
    kv_features: width of `context` for cross-attention; default D.
    out_features: output width; default D.
    use_bias: biases on the four projections.
    causal: AND the mask with `j <= i` (global positions when decoding).
    mask: an `attnjax.masks.Mask`, a `MaskSpec` (built for the input grid at call time)
      or a callable `(grid_shape, num_heads) -> Mask`.
    score_mod: `score_mod(score, b, h, q_idx, kv_idx) -> score` (see `attnjax.score_mods`).
    scale, softcap: passed to `attnjax.attention`.
    sinks: learnable per-head sink logits `[N]` (join the softmax denominator only).
    qk_norm: RMS-normalise q and k over H (learnable scales) before RoPE.
    rope: None, '1d' (positions [B,T]), 'axial' (grid coordinates, RoPE-Axial) or
      'mixed' (learnable per-head 2D frequencies, RoPE-Mixed over `rope_ndim` axes).
    rope_base: RoPE base frequency.
    alibi: add ALiBi's `-m_h |i - j|` (fixed slopes) to the logits.
    relpos_max_distance: learnable relative-position bias table `[N, prod(2R+1)]`; an int
      for 1D clipped distances, a tuple (one R per axis) for a grid (Swin/NAT tables).
    implementation, block_sizes: passed to `attnjax.attention`.
    dropout_rate: dropout on the layer output (after the output projection). There is no
      dropout on attention probabilities: the fused kernels never materialise them (see
      docs/layers.md; `attnjax.flax_attention_fn` offers it for Flax parity).
    dtype: compute dtype (default: the input's); params are `param_dtype` (float32).
    rngs: `nnx.Rngs` ('params' for init, 'dropout' when dropout_rate > 0).

  Call: `layer(x, context=None, *, segment_ids=None, context_segment_ids=None,
  positions=None, context_positions=None, cache=None, deterministic=True)`; `x` is
  `[B, T, D]` or `[B, *grid, D]`; returns the same leading shape with `out_features`, and
  `(y, new_cache)` when `cache` (from `init_cache`) is given.
  """

  def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: int | None = None,
               head_dim: int | None = None, v_head_dim: int | None = None,
               kv_features: int | None = None, out_features: int | None = None,
               use_bias: bool = False, causal: bool = False, mask: Any = None,
               score_mod: Any = None, scale: float | None = None, softcap: float | None = None,
               sinks: bool = False, qk_norm: bool = False, rope: str | None = None,
               rope_base: float = 10000.0, rope_ndim: int = 2, alibi: bool = False,
               relpos_max_distance: Any = None, implementation: Any = None,
               block_sizes: Any = None, dropout_rate: float = 0.0, dtype: Any = None,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if not isinstance(rngs, nnx.Rngs):
      raise TypeError(f"rngs must be an nnx.Rngs, got {type(rngs).__name__}")
    self.config = AttentionConfig(
        d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        v_head_dim=v_head_dim, kv_features=kv_features, out_features=out_features,
        use_bias=use_bias, causal=causal, mask=mask, score_mod=score_mod, scale=scale,
        softcap=softcap, sinks=sinks, qk_norm=qk_norm, rope=rope, rope_base=rope_base,
        rope_ndim=rope_ndim, alibi=alibi, relpos_max_distance=relpos_max_distance,
        implementation=implementation, block_sizes=block_sizes, dropout_rate=dropout_rate,
        dtype=dtype, param_dtype=param_dtype)
    specs = _core.param_specs(self.config)
    self._param_names = tuple(specs)
    for name, spec in specs.items():
      setattr(self, name, make_param(rngs, spec, self.config.param_dtype))
    self.dropout = nnx.Dropout(self.config.dropout_rate, rngs=rngs)

  def params_dict(self) -> dict:
    """The parameter arrays by name (the same names the Linen twin uses)."""
    return {name: getattr(self, name)[...] for name in self._param_names}

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty `KVCache` for `batch` sequences of up to `max_len` tokens."""
    return _core.init_kv_cache(self.config, batch, max_len, dtype)

  def __call__(self, x, context=None, *, segment_ids=None, context_segment_ids=None,
               positions=None, context_positions=None, cache=None, deterministic: bool = True):
    dropout = None
    if self.config.dropout_rate > 0 and not deterministic:
      dropout = lambda y: self.dropout(y, deterministic=False)
    return _core.attention_forward(
        self.config, self.params_dict(), x, context, segment_ids=segment_ids,
        context_segment_ids=context_segment_ids, positions=positions,
        context_positions=context_positions, cache=cache, dropout=dropout)
