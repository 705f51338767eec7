"""A drop-in `attention_fn` for Flax's own multi-head attention classes.

    >>> import flax.linen as nn, attnjax
    >>> mha = nn.MultiHeadDotProductAttention(
    ...     num_heads=8,
    ...     attention_fn=attnjax.flax_attention_fn(mask=attnjax.masks.sliding_window(128)))

`attnjax.flax_attention_fn()` with no options computes what Flax's default
`dot_product_attention` computes (tested inside `flax.linen.MultiHeadDotProductAttention`
and `flax.nnx.MultiHeadAttention`); its options add attnjax masks, score mods, softcap
and implementations on top of the mask/bias Flax passes in.

Differences from Flax's default, by design:
- A query row whose keys are all masked returns 0 (attnjax's rule) instead of Flax's
  uniform average over all keys.
- Logits and softmax are float32 whatever the input dtype (Flax's default softmax runs in
  the input dtype unless `force_fp32_for_softmax`), so bf16 results differ at bf16
  precision.
- Attention-probability dropout and `sow_weights` need the probabilities: when Flax asks
  for either (`dropout_rate > 0` and not deterministic, or a `module` to sow into) this
  function computes them explicitly (O(T*S) memory, same random stream and scaling as
  Flax, so results equal Flax's); otherwise it calls `attnjax.attention`, which never
  materialises them.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from attnjax import masks as _masks
from attnjax.core.precision import einsum_f32
from attnjax.layers._core import _attention_fn

__all__ = ["flax_attention_fn"]


def _combine(mask_array, extra: _masks.Mask | None, causal: bool):
  m = extra
  if causal:
    m = _masks.causal() if m is None else (m & _masks.causal())
  if mask_array is not None:
    am = _masks.from_array(mask_array)
    m = am if m is None else (am & m)
  return m


def _materialized(q, k, v, *, mask, score_mod, bias, scale, softcap, dropout_rng, dropout_rate,
                  broadcast_dropout, deterministic, dtype, module):
  """Explicit-probabilities attention (for probability dropout / sowing), float32 logits."""
  B, T, N, H = q.shape
  S = k.shape[1]
  s_BNTS = einsum_f32("btnh,bsnh->bnts", q, k) * scale
  if bias is not None:
    s_BNTS = s_BNTS + jnp.asarray(bias, jnp.float32)
  b = jnp.arange(B)[:, None, None, None]
  h = jnp.arange(N)[None, :, None, None]
  qi = jnp.arange(T)[None, None, :, None]
  ki = jnp.arange(S)[None, None, None, :]
  if score_mod is not None:
    s_BNTS = score_mod(s_BNTS, b, h, qi, ki)
  if softcap is not None:
    s_BNTS = softcap * jnp.tanh(s_BNTS / softcap)
  if mask is not None:
    allowed = jnp.broadcast_to(jnp.asarray(mask.to_array(T, S, num_heads=N, batch=B)), s_BNTS.shape)
  else:
    allowed = jnp.ones(s_BNTS.shape, bool)
  s_BNTS = jnp.where(allowed, s_BNTS, -jnp.inf)
  row_max = jnp.max(s_BNTS, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  e = jnp.where(allowed, jnp.exp(s_BNTS - row_max), 0.0)
  denom = jnp.sum(e, axis=-1, keepdims=True)
  p_BNTS = (e / jnp.where(denom > 0, denom, 1.0)).astype(dtype)
  if module is not None:
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    if isinstance(module, nn.Module):
      module.sow("intermediates", "attention_weights", p_BNTS)
    else:
      from flax import nnx  # pylint: disable=import-outside-toplevel
      module.sow(nnx.Intermediate, "attention_weights", p_BNTS)
  if not deterministic and dropout_rate > 0.0:
    keep_prob = 1.0 - dropout_rate
    shape = (1, 1) + p_BNTS.shape[-2:] if broadcast_dropout else p_BNTS.shape
    keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
    p_BNTS = p_BNTS * (keep.astype(dtype) / jnp.asarray(keep_prob, dtype))
  return jnp.einsum("bnts,bsnh->btnh", p_BNTS, v.astype(dtype))


def flax_attention_fn(*, mask: Any = None, causal: bool = False, score_mod=None,
                      softcap: float | None = None, scale: float | None = None,
                      implementation=None, block_sizes=None):
  """An `attention_fn` for `flax.linen.MultiHeadDotProductAttention` /
  `flax.nnx.MultiHeadAttention`.

  `out = softmax(mask(mods(q.k / sqrt(H) + bias))) v`, `q [batch..., T, N, H]`,
  `k [batch..., S, K, H]`, `v [batch..., S, K, Hv]` -> `[batch..., T, N, Hv]`, where the
  mask is the AND of Flax's boolean `mask` (True = attend), `is_causal`, and the options
  here. Paper: "Attention Is All You Need" (scaled dot-product attention).

  Args:
    mask: an `attnjax.masks.Mask` (or boolean array) ANDed with Flax's mask.
    causal: AND with the causal mask `j <= i`.
    score_mod: `score_mod(score, b, h, q_idx, kv_idx)` applied to the float32 logits.
    softcap: `c * tanh(s / c)` logit capping.
    scale: logit scale (default `1/sqrt(H)`, Flax's).
    implementation, block_sizes: passed to `attnjax.attention`.

  Returns:
    `fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
    dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None, ...)`
    with the keyword names Flax passes (Linen filters keywords by this signature).
  """
  extra = _masks.as_mask(mask, "mask")
  if score_mod is not None and not callable(score_mod):
    raise TypeError(f"score_mod must be callable, got {type(score_mod).__name__}")
  if softcap is not None and not softcap > 0:
    raise ValueError(f"softcap must be a positive number, got softcap={softcap!r}")
  if scale is not None and not scale > 0:
    raise ValueError(f"scale must be a positive number, got scale={scale!r}")
  if not isinstance(causal, bool):
    raise TypeError(f"causal must be a bool, got {causal!r}")

  def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout: bool = True,
                   dropout_rng=None, dropout_rate: float = 0.0, deterministic: bool = False,
                   dtype=None, precision=None, module=None, force_fp32_for_softmax: bool = False,
                   qk_attn_weights_einsum=None, attn_weights_value_einsum=None,
                   is_causal: bool = False, promote_dtype=None):
    del precision, force_fp32_for_softmax, promote_dtype  # logits/softmax are always float32
    if qk_attn_weights_einsum is not None or attn_weights_value_einsum is not None:
      raise ValueError("qk_attn_weights_einsum / attn_weights_value_einsum are not supported by "
                       "attnjax.flax_attention_fn (leave them None)")
    if query.ndim < 4 or key.ndim != query.ndim or value.ndim != query.ndim:
      raise ValueError("query/key/value must be [batch..., length, heads, depth] of equal rank >= "
                       f"4, got {query.shape}, {key.shape}, {value.shape}")
    if query.shape[:-3] != key.shape[:-3] or key.shape[:-1] != value.shape[:-1]:
      raise ValueError(f"batch/length/heads mismatch: query {query.shape}, key {key.shape}, value "
                       f"{value.shape}")
    dtype = (jnp.dtype(dtype) if dtype is not None
             else jnp.result_type(query.dtype, key.dtype, value.dtype))
    batch = query.shape[:-3]
    nb = math.prod(batch)
    q, k, v = (a.astype(dtype).reshape((nb,) + a.shape[-3:]) for a in (query, key, value))
    T, N, H = q.shape[1:]

    def flat4(a, name):
      if a is None:
        return None
      a = jnp.asarray(a)
      if a.ndim != query.ndim:
        raise ValueError(f"{name} must have rank {query.ndim} ([batch..., heads, T, S]), got shape "
                         f"{a.shape}")
      lead = a.shape[:-3]
      if all(d == 1 for d in lead):
        return a.reshape((1,) + a.shape[-3:])
      return jnp.broadcast_to(a, batch + a.shape[-3:]).reshape((nb,) + a.shape[-3:])

    mask_arr = flat4(mask, "mask")
    bias_arr = flat4(bias, "bias")
    if mask_arr is not None and mask_arr.dtype != jnp.bool_:
      mask_arr = mask_arr.astype(jnp.bool_)
    m = _combine(mask_arr, extra, causal or bool(is_causal))
    scl = scale if scale is not None else 1.0 / math.sqrt(H)
    needs_probs = module is not None or (not deterministic and dropout_rate > 0.0)
    if needs_probs:
      if not deterministic and dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError("dropout_rate > 0 and deterministic=False need a dropout_rng")
      if N != k.shape[2]:  # GQA: repeat kv heads for the explicit path
        k = jnp.repeat(k, N // k.shape[2], axis=2)
        v = jnp.repeat(v, N // v.shape[2], axis=2)
      out = _materialized(q, k, v, mask=m, score_mod=score_mod, bias=bias_arr, scale=scl,
                          softcap=softcap, dropout_rng=dropout_rng, dropout_rate=dropout_rate,
                          broadcast_dropout=broadcast_dropout, deterministic=deterministic,
                          dtype=dtype, module=module)
    else:
      out = _attention_fn()(q, k, v, mask=m, score_mod=score_mod, bias=bias_arr, scale=scl,
                            softcap=softcap, implementation=implementation, block_sizes=block_sizes)
    return out.astype(dtype).reshape(batch + out.shape[1:])

  return attention_fn
