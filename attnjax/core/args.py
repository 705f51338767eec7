"""Argument checking shared by every softmax-attention implementation.

:func:`check_attention_args` validates the keyword arguments of
:func:`attnjax.attention` once and returns an :class:`AttentionArgs` (shapes
``q [B, T, N, H]``, ``k [B, S, K, H]``, ``v [B, S, K, Hv]``, bias rank 4, both segment
id arrays or neither, ``scale`` a float or a float32 JAX scalar).

``mask`` may be a plain predicate ``fn(b, h, q_idx, kv_idx) -> bool`` (as FlexAttention
users write it); it is wrapped with :func:`attnjax.masks.from_fn`.  ``scale`` may be a
traced (learnable) JAX scalar; :func:`static_scale` folds it into ``q`` for the
implementations that need a static Python float.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks as masks_lib

__all__ = ["AttentionArgs", "check_attention_args", "normalize_args", "static_scale",
           "is_static_scale", "check_scale"]


@dataclasses.dataclass(frozen=True)
class AttentionArgs:
  """Validated, normalised keyword arguments shared by every implementation.

  ``bias`` is rank 4 (each dim 1 or full), ``q_segment_ids``/``kv_segment_ids`` are
  both set or both None, ``scale`` is a float or (traced / learnable) a float32 JAX
  scalar of shape ``()``, ``mask`` a Mask or None.
  """
  B: int
  T: int
  S: int
  N: int
  K: int
  H: int
  Hv: int
  mask: Optional[masks_lib.Mask]
  score_mod: Optional[Callable]
  bias: Optional[jax.Array]
  q_segment_ids: Optional[jax.Array]
  kv_segment_ids: Optional[jax.Array]
  scale: Union[float, jax.Array]
  softcap: Optional[float]
  sinks: Optional[jax.Array]

  @property
  def G(self) -> int:
    return self.N // self.K

  def kwargs(self) -> dict:
    """The attention keyword arguments (normalised) as a dict."""
    return dict(mask=self.mask, score_mod=self.score_mod, bias=self.bias,
                q_segment_ids=self.q_segment_ids, kv_segment_ids=self.kv_segment_ids,
                scale=self.scale, softcap=self.softcap, sinks=self.sinks)


def _is_array(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def check_scale(scale, H: int):
  """``scale`` checked: None -> ``1/sqrt(H)``; a positive Python float (static), or a
  float32 JAX scalar of shape ``()`` (traced / learnable). Raises TypeError/ValueError."""
  if scale is None:
    return 1.0 / math.sqrt(H)
  if isinstance(scale, bool):
    raise TypeError("scale must be a float or a float JAX scalar, got bool")
  if isinstance(scale, (int, float, np.floating, np.integer)):
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
      raise ValueError(f"scale must be a positive finite float, got {scale}")
    return scale
  if not _is_array(scale):
    raise TypeError(f"scale must be a float or a float JAX scalar of shape (), got "
                    f"{type(scale).__name__}")
  if not jnp.issubdtype(scale.dtype, jnp.floating):
    raise TypeError(f"scale must have a floating dtype, got {scale.dtype}")
  if tuple(scale.shape) != ():
    raise ValueError(f"scale must be a scalar (shape ()), got shape {tuple(scale.shape)}")
  if isinstance(scale, np.ndarray):
    return check_scale(float(scale), H)
  if not isinstance(scale, jax.core.Tracer):
    value = float(scale)
    if not math.isfinite(value) or value <= 0:
      raise ValueError(f"scale must be positive and finite, got {value}")
  return jnp.asarray(scale, jnp.float32)


def is_static_scale(scale) -> bool:
  """``scale`` is a Python float (not a JAX scalar)."""
  return isinstance(scale, float)


def static_scale(q, a: AttentionArgs):
  """``(q, a)`` with a static scale: a JAX-scalar ``scale`` is folded into ``q``
  (``q * scale`` in float32, cast back to ``q.dtype``) and ``a.scale`` becomes 1.0;
  gradients reach ``scale`` through that product.  A float scale returns the inputs."""
  if is_static_scale(a.scale):
    return q, a
  q = (q.astype(jnp.float32) * a.scale).astype(q.dtype)
  return q, dataclasses.replace(a, scale=1.0)


def check_attention_args(q, k, v, *, mask=None, score_mod=None, bias=None,
                         q_segment_ids=None, kv_segment_ids=None, scale=None,
                         softcap=None, sinks=None) -> AttentionArgs:
  """Validates the inputs of :func:`attnjax.attention`; raises ValueError/TypeError
  naming the offending argument and the expected value."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not _is_array(x):
      raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim != 4:
      raise ValueError(f"{name} must have rank 4 ([B, T|S, heads, head_dim], BTNH layout), "
                       f"got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be floating point, got dtype {x.dtype}")
  if not (q.dtype == k.dtype == v.dtype):
    raise TypeError(f"q, k, v must share a dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
  B, T, N, H = q.shape
  Bk, S, K, Hk = k.shape
  Bv, Sv, Kv, Hv = v.shape
  if Bk != B or Bv != B:
    raise ValueError(f"batch sizes differ: q has B={B}, k has {Bk}, v has {Bv}")
  if Sv != S:
    raise ValueError(f"k and v must have the same length S, got k S={S}, v S={Sv}")
  if Kv != K:
    raise ValueError(f"k and v must have the same number of kv heads, got k K={K}, v K={Kv}")
  if Hk != H:
    raise ValueError(f"q and k must have the same head_dim, got q H={H}, k H={Hk}")
  if min(B, T, N, H, S, K, Hv) <= 0:
    raise ValueError(f"all dimensions must be positive, got q {q.shape}, k {k.shape}, v {v.shape}")
  if N % K:
    raise ValueError(f"the number of query heads N={N} must be a multiple of the number of "
                     f"kv heads K={K} (GQA/MQA)")

  if mask is not None and not isinstance(mask, masks_lib.Mask) and not _is_array(mask):
    if not callable(mask):
      raise TypeError(f"mask must be None, a boolean array, an attnjax.masks.Mask or a "
                      f"callable (b, h, q_idx, kv_idx) -> bool, got {type(mask).__name__}")
    mask = masks_lib.from_fn(mask)
  mask = masks_lib.as_mask(mask, "mask")
  if mask is not None:
    mask.check_shape(T, S, N, B)

  if score_mod is not None and not callable(score_mod):
    raise TypeError(f"score_mod must be callable (score, b, h, q_idx, kv_idx) -> score, got "
                    f"{type(score_mod).__name__}")
  if getattr(score_mod, "check", None) is not None:
    score_mod.check(T, S, N)

  if bias is not None:
    if not _is_array(bias):
      raise TypeError(f"bias must be an array, got {type(bias).__name__}")
    if not jnp.issubdtype(bias.dtype, jnp.floating):
      raise TypeError(f"bias must be floating point, got dtype {bias.dtype}")
    if not 1 <= bias.ndim <= 4:
      raise ValueError(f"bias must have rank <= 4 (broadcastable to [B, N, T, S]), got shape "
                       f"{tuple(bias.shape)}")
    b4 = (1,) * (4 - bias.ndim) + tuple(bias.shape)
    for dim, want, name in zip(b4, (B, N, T, S), "BNTS"):
      if dim not in (1, want):
        raise ValueError(f"bias shape {tuple(bias.shape)} does not broadcast to [B, N, T, S] = "
                         f"{[B, N, T, S]}: dim {name} must be 1 or {want}, got {dim}")
    bias = bias.reshape(b4)

  if kv_segment_ids is not None and q_segment_ids is None:
    raise ValueError("kv_segment_ids was given without q_segment_ids; pass both (or only "
                     "q_segment_ids when T == S)")
  if q_segment_ids is not None:
    if kv_segment_ids is None:
      if S != T:
        raise ValueError(f"kv_segment_ids is required when T != S (T={T}, S={S})")
      kv_segment_ids = q_segment_ids
    for name, seg, L in (("q_segment_ids", q_segment_ids, T),
                         ("kv_segment_ids", kv_segment_ids, S)):
      if not _is_array(seg):
        raise TypeError(f"{name} must be an integer array, got {type(seg).__name__}")
      if not jnp.issubdtype(seg.dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype, got {seg.dtype}")
      if tuple(seg.shape) != (B, L):
        raise ValueError(f"{name} must have shape [B, {'T' if name[0] == 'q' else 'S'}] = "
                         f"{[B, L]}, got {tuple(seg.shape)}")

  scale = check_scale(scale, H)

  if softcap is not None:
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float, np.floating, np.integer)):
      raise TypeError(f"softcap must be a positive float or None, got {type(softcap).__name__}")
    softcap = float(softcap)
    if not math.isfinite(softcap) or softcap <= 0:
      raise ValueError(f"softcap must be a positive finite float, got {softcap}")

  if sinks is not None:
    if not _is_array(sinks):
      raise TypeError(f"sinks must be a float array of shape [N]={[N]}, got {type(sinks).__name__}")
    if not jnp.issubdtype(sinks.dtype, jnp.floating):
      raise TypeError(f"sinks must be floating point, got dtype {sinks.dtype}")
    if tuple(sinks.shape) != (N,):
      raise ValueError(f"sinks must have shape [N] = [{N}] (one logit per query head), got "
                       f"{tuple(sinks.shape)}")

  return AttentionArgs(B, T, S, N, K, H, Hv, mask, score_mod, bias, q_segment_ids,
                       kv_segment_ids, scale, softcap, sinks)



def normalize_args(q, k, v, a=None, **kwargs) -> AttentionArgs:
  """``AttentionArgs`` from either a ready one (``a``) or raw user keyword arguments."""
  if a is not None:
    if kwargs:
      raise TypeError("pass either an AttentionArgs or keyword arguments, not both")
    return a
  return check_attention_args(q, k, v, **kwargs)
