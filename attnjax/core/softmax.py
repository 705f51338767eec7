"""The float32 reference softmax math shared by ``ops``, ``kernels`` and ``cpu``.

Formula (per batch ``b``, query head ``n`` with kv head ``n // (N / K)``):

    s_ij = softcap(score_mod(scale * q_i . k_j + bias_ij))      (float32)
    p_ij = exp(s_ij) / (sum_{j allowed} exp(s_ij) + exp(sink_n))
    o_i  = sum_{j allowed} p_ij v_j ,   lse_i = log(sum_j exp(s_ij) + exp(sink_n))

where ``allowed`` is the mask AND equal segment ids.  A row with no allowed key
(and no sink) returns 0 and ``lse = -inf``; its gradients are 0.

Paper: "Attention Is All You Need" (Vaswani et al., 2017).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.core.args import AttentionArgs, check_attention_args
from attnjax.core.precision import einsum_f32

__all__ = ["apply_logit_mods", "allowed_keys", "safe_softmax_out", "dense_attention",
           "reference_attention", "row_dot", "merge_partials"]


def row_dot(a, b):
  """``sum(a * b, axis=-1)`` in float32 (e.g. the backward's ``delta = rowsum(dO * O)``),
  written as a dot batched over every leading axis, in order.  On XLA:CPU the plain
  reduction of a product of 4-D/5-D arrays runs about 40x slower (about 120 ms for
  ``[1, 16384, 8, 64]``, against 2-3 ms), as does a dot whose output reorders the axes.
  """
  letters = "abcdefghijklmnopqrstuvwxy"[:a.ndim - 1]
  return einsum_f32(f"{letters}z,{letters}z->{letters}", a, b)


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
    out = einsum_f32("bkgts,bskh->btkgh", p.astype(v.dtype), v)
  lse = jnp.where(pos, m + jnp.log(safe), -jnp.inf)
  B, T, K, G, Hv = out.shape
  return out.reshape(B, T, K * G, Hv).astype(out_dtype), lse.reshape(B, K * G, T)


def dense_attention(q, k, v, a: AttentionArgs, *, upcast: bool):
  """Dense logits ``[B, K, G, T, S]`` and the masked softmax; returns ``(out, lse)``.

  ``upcast``: float32 matmuls at HIGHEST precision (the reference) instead of the input
  dtype with float32 accumulation (the 'xla' path).
  """
  B, T, N, H = q.shape
  S, K, G = k.shape[1], a.K, a.G
  qg = q.reshape(B, T, K, G, H)
  if upcast:
    s = jnp.einsum("btkgh,bskh->bkgts", qg.astype(jnp.float32), k.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  else:
    s = einsum_f32("btkgh,bskh->bkgts", qg, k)
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
  out, lse = dense_attention(q, k, v, a, upcast=True)
  return (out, lse) if return_lse else out


def merge_partials(o_a, lse_a, o_b, lse_b):
  """Two normalised partial softmax results over disjoint key sets, merged into the
  softmax over their union (float32).

  ``o_* [..., Hv]`` and ``lse_* [...]`` (the log-sum-exp of each row, aligned with
  ``o``'s leading axes): ``lse = logaddexp(lse_a, lse_b)`` and
  ``o = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b``.  A row empty on both sides
  (``lse = -inf`` twice) gives ``o = 0``, ``lse = -inf`` and zero gradients, never NaN.
  Used to join attention over key sets computed by separate calls (the ring's steps,
  criss-cross's row and column calls, causal MoBA's own and chosen blocks).
  """
  for name, x, want in (("o_b", o_b, o_a.shape), ("lse_a", lse_a, o_a.shape[:-1]),
                        ("lse_b", lse_b, o_a.shape[:-1])):
    if x.shape != want:
      raise ValueError(f"merge_partials: {name} must have shape {want} (o_b that of o_a, "
                       f"lse_a and lse_b o_a's leading axes), got {x.shape}")
  lse_a, lse_b = lse_a.astype(jnp.float32), lse_b.astype(jnp.float32)
  mx = jnp.maximum(lse_a, lse_b)
  mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
  w_a, w_b = jnp.exp(lse_a - mx), jnp.exp(lse_b - mx)
  den = w_a + w_b
  live = den > 0
  den = jnp.where(live, den, 1.0)
  o = (o_a.astype(jnp.float32) * (w_a / den)[..., None]
       + o_b.astype(jnp.float32) * (w_b / den)[..., None])
  return o, jnp.where(live, mx + jnp.log(den), -jnp.inf)
