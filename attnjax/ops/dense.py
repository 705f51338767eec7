"""Dense softmax attention: argument checking, the float32 reference, the 'xla' path.

Formula (per batch ``b``, query head ``n`` with kv head ``n // (N / K)``):

    s_ij = softcap(score_mod(scale * q_i . k_j + bias_ij))      (float32)
    p_ij = exp(s_ij) / (sum_{j allowed} exp(s_ij) + exp(sink_n))
    o_i  = sum_{j allowed} p_ij v_j ,   lse_i = log(sum_j exp(s_ij) + exp(sink_n))

where ``allowed`` is the mask AND equal segment ids.  A row with no allowed key
(and no sink) returns 0 and ``lse = -inf``; its gradients are 0.

Paper: "Attention Is All You Need" (Vaswani et al., 2017); GQA: "GQA: Training
Generalized Multi-Query Transformer Models from Multi-Head Checkpoints".
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks as masks_lib

__all__ = ["reference_attention", "xla_attention", "AttentionArgs", "check_attention_args"]


@dataclasses.dataclass(frozen=True)
class AttentionArgs:
  """Validated, normalised keyword arguments shared by every implementation.

  ``bias`` is rank 4 (each dim 1 or full), ``q_segment_ids``/``kv_segment_ids`` are
  both set or both None, ``scale`` is a float, ``mask`` a Mask or None.
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
  scale: float
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
    for name, seg, L in (("q_segment_ids", q_segment_ids, T), ("kv_segment_ids", kv_segment_ids, S)):
      if not _is_array(seg):
        raise TypeError(f"{name} must be an integer array, got {type(seg).__name__}")
      if not jnp.issubdtype(seg.dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype, got {seg.dtype}")
      if tuple(seg.shape) != (B, L):
        raise ValueError(f"{name} must have shape [B, {'T' if name[0] == 'q' else 'S'}] = "
                         f"{[B, L]}, got {tuple(seg.shape)}")

  if scale is None:
    scale = 1.0 / math.sqrt(H)
  else:
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
      raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
      raise ValueError(f"scale must be a positive finite float, got {scale}")

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


def apply_logit_mods(s, b, h, q_idx, kv_idx, *, score_mod, softcap):
  """score_mod then softcap on float32 logits (shared by every XLA path)."""
  if score_mod is not None:
    s = score_mod(s, b, h, q_idx, kv_idx).astype(jnp.float32)
  if softcap is not None:
    s = softcap * jnp.tanh(s / softcap)
  return s


def allowed_keys(a: AttentionArgs, b, h, q_idx, kv_idx):
  """Mask AND segment equality on broadcasting index arrays, or None if all allowed."""
  allowed = None
  if a.mask is not None:
    allowed = a.mask(b, h, q_idx, kv_idx, num_heads=a.N, batch=a.B)
  if a.q_segment_ids is not None:
    seg = jnp.asarray(a.q_segment_ids)[b, q_idx] == jnp.asarray(a.kv_segment_ids)[b, kv_idx]
    allowed = seg if allowed is None else allowed & seg
  return allowed


def safe_softmax_out(s, allowed, v, sinks_bn, *, out_dtype, upcast):
  """Masked softmax with optional sink logit; returns (out, lse), no NaNs.

  s: f32 [B, K, G, T, S]; allowed: broadcastable bool or None;
  v: [B, S, K, Hv]; sinks_bn: f32 broadcastable to [B, K, G, T] or None.
  """
  if allowed is not None:
    s = jnp.where(allowed, s, -jnp.inf)
  m = jnp.max(s, axis=-1)
  if sinks_bn is not None:
    m = jnp.maximum(m, sinks_bn)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  e = jnp.exp(s - m[..., None])
  denom = jnp.sum(e, axis=-1)
  if sinks_bn is not None:
    denom = denom + jnp.exp(sinks_bn - m)
  pos = denom > 0
  safe = jnp.where(pos, denom, 1.0)
  p = e / safe[..., None]
  if upcast:
    out = jnp.einsum("bkgts,bskh->btkgh", p, v.astype(jnp.float32))
  else:
    out = jnp.einsum("bkgts,bskh->btkgh", p.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
  lse = jnp.where(pos, m + jnp.log(safe), -jnp.inf)
  B, T, K, G, Hv = out.shape
  return out.reshape(B, T, K * G, Hv).astype(out_dtype), lse.reshape(B, K * G, T)


def _dense(q, k, v, a: AttentionArgs, *, upcast: bool):
  B, T, N, H = q.shape
  S, K, G = k.shape[1], a.K, a.G
  qg = q.reshape(B, T, K, G, H)
  if upcast:
    s = jnp.einsum("btkgh,bskh->bkgts", qg.astype(jnp.float32), k.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  else:
    s = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
  s = s * a.scale
  # Index grids in [B, K, G, T, S] order; h is the query head.
  b = jnp.arange(B).reshape(B, 1, 1, 1, 1)
  h = (jnp.arange(K)[:, None] * G + jnp.arange(G)[None, :]).reshape(1, K, G, 1, 1)
  qi = jnp.arange(T).reshape(1, 1, 1, T, 1)
  ki = jnp.arange(S).reshape(1, 1, 1, 1, S)
  if a.bias is not None:
    Bb, Nb, Tb, Sb = a.bias.shape
    kg = (K, G) if Nb == N else (1, 1)
    s = s + a.bias.astype(jnp.float32).reshape(Bb, *kg, Tb, Sb)
  s = apply_logit_mods(s, b, h, qi, ki, score_mod=a.score_mod, softcap=a.softcap)
  allowed = allowed_keys(a, b, h, qi, ki)
  sinks = None
  if a.sinks is not None:
    sinks = a.sinks.astype(jnp.float32).reshape(1, K, G, 1)
  return safe_softmax_out(s, allowed, v, sinks, out_dtype=q.dtype, upcast=upcast)


def reference_attention(q, k, v, *, mask=None, score_mod=None, bias=None,
                        q_segment_ids=None, kv_segment_ids=None, scale=None, softcap=None,
                        sinks=None, return_lse=False):
  """The plain float32 einsum oracle every other implementation is tested against.

  Shapes: ``q [B, T, N, H]``, ``k [B, S, K, H]``, ``v [B, S, K, Hv]`` -> ``[B, T, N, Hv]``
  (and ``lse [B, N, T]`` float32 with ``return_lse``).  Materialises ``[B, N, T, S]``.
  See :func:`attnjax.attention` for the arguments and the module docstring for the formula.
  """
  a = check_attention_args(q, k, v, mask=mask, score_mod=score_mod, bias=bias,
                           q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                           scale=scale, softcap=softcap, sinks=sinks)
  out, lse = _dense(q, k, v, a, upcast=True)
  return (out, lse) if return_lse else out


def xla_attention(q, k, v, a: AttentionArgs, *, return_lse=False, block_sizes=None):
  """The 'xla' implementation: dense logits in the input dtype with float32
  accumulation, GQA without repeating K/V.  Memory ``O(B N T S)``: for short sequences."""
  if block_sizes is not None:
    raise NotImplementedError("'xla' takes no block_sizes")
  out, lse = _dense(q, k, v, a, upcast=False)
  return (out, lse) if return_lse else out
