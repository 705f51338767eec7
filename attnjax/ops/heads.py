"""Head-level attention mechanisms (catalog family E and F06): pure ops.

Layout BTNH as in :func:`attnjax.attention`: ``q [B, T, N, H]``, ``k [B, S, K, H]``,
``v [B, S, K, Hv]`` with GQA (query head ``n`` uses kv head ``n // (N / K)``).

- :func:`moh_head_weights` / :func:`moh_attention`: Mixture-of-Head attention (E01),
  "MoH: Multi-Head Attention as Mixture-of-Head Attention".
- :func:`gate_heads` / :func:`head_gated_attention`: head importance gates and head
  masking (E06), "Are Sixteen Heads Really Better than One?".
- :func:`single_head_partial_attention`: SHViT's single head on a channel fraction (E03),
  "SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design".
- :func:`multi_window_attention`: MW-MHA, one sliding window per head group (F06), "Masked
  Autoencoders with Multi-Window Local-Global Attention Are Better Audio Learners".
- :func:`relational_attention`: the Dual Attention Transformer's relational heads (E02),
  "Disentangling and Integrating Relational and Sensory Information in Transformer
  Architectures".
- :func:`talking_heads_attention`: linear mixing of the logits and of the weights across
  heads, "Talking-Heads Attention" (Shazeer et al., 2020).

Everything that is plain softmax attention goes through the dispatcher
(``hooks.attention``, so every implementation and kernel serves it); talking heads needs
the logits of all heads at once and is plain ``jnp`` with ``O(B N T S)`` memory.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from attnjax import masks as _masks
from attnjax.core import hooks
from attnjax.core.select import top_k as _top_k

__all__ = ["moh_head_weights", "moh_attention", "gate_heads", "head_gated_attention",
           "single_head_partial_attention", "check_windows", "multi_window_attention",
           "talking_heads_attention", "relational_attention", "plain_allowed",
           "masked_softmax"]


# ----------------------------------------------------------------------------- helpers

def _check_array(name, x, ndim=None):
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be an array, got {type(x).__name__}")
  if ndim is not None and x.ndim != ndim:
    raise ValueError(f"{name} must have rank {ndim}, got shape {x.shape}")


def _check_qkv(q, k, v):
  _check_array("q", q, 4)
  _check_array("k", k, 4)
  _check_array("v", v, 4)
  B, T, N, H = q.shape
  if k.shape[0] != B or k.shape[3] != H:
    raise ValueError(f"k must be [B={B}, S, K, H={H}], got shape {k.shape}")
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"v must be [B, S, K] = {k.shape[:3]} + [Hv], got shape {v.shape}")
  if N % k.shape[2]:
    raise ValueError(f"q heads N={N} must be a multiple of kv heads K={k.shape[2]}")
  return B, T, N, H, k.shape[1], k.shape[2], v.shape[3]


def plain_allowed(B, T, S, *, causal=False, q_segment_ids=None, kv_segment_ids=None):
  """Boolean ``[B, 1, T, S]``: ``j <= i + (S - T)`` if causal, AND equal segment ids."""
  ok = jnp.ones((B, 1, T, S), bool)
  if causal:
    ok = ok & (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + (S - T))
  if q_segment_ids is not None or kv_segment_ids is not None:
    if q_segment_ids is None or kv_segment_ids is None:
      raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    if q_segment_ids.shape != (B, T):
      raise ValueError(f"q_segment_ids must be [B, T] = {(B, T)}, got {q_segment_ids.shape}")
    if kv_segment_ids.shape != (B, S):
      raise ValueError(f"kv_segment_ids must be [B, S] = {(B, S)}, got {kv_segment_ids.shape}")
    ok = ok & (q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :])
  return ok


def masked_softmax(s, allowed, axis=-1):
  """Softmax of float32 logits over ``axis`` restricted to ``allowed``; a slice with no
  allowed entry gives 0 (and zero gradients), never NaN."""
  s = s.astype(jnp.float32)
  m = jax.lax.stop_gradient(jnp.max(jnp.where(allowed, s, -jnp.inf), axis=axis, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.where(allowed, jnp.exp(jnp.where(allowed, s - m, 0.0)), 0.0)
  den = jnp.sum(e, axis=axis, keepdims=True)
  return e / jnp.where(den > 0, den, 1.0)


def _expand_kv(x, N):
  return jnp.repeat(x, N // x.shape[2], axis=2)


# ----------------------------------------------------------------------------- MoH

def moh_head_weights(shared_logits, routed_logits, mix_logits=None, *, top_k: int, valid=None):
  """MoH's per-token head weights and load-balance loss.

  With ``h_s`` shared and ``h_r`` routed heads (heads ``0..h_s-1`` shared, then routed):

      g_i = a_1 softmax(W_s x)_i                       (shared, always on)
      g_i = a_2 softmax(W_r x)_i  if i in top_k(W_r x) else 0   (routed)
      [a_1, a_2] = softmax(W_h x)     (a_1 = a_2 = 1 when mix_logits is None)
      L_b = sum_{i routed} f_i P_i,  f_i = mean_t 1[t selects i],  P_i = mean_t softmax(W_r x_t)_i

  ``f_i`` (the top-k choice) is not differentiated; gradients reach the router through
  ``P_i`` and the selected weights.  Paper: "MoH: Multi-Head Attention as Mixture-of-Head
  Attention".

  Args:
    shared_logits: ``[B, T, h_s]`` (``h_s`` may be 0).
    routed_logits: ``[B, T, h_r]``, ``h_r >= 1``.
    mix_logits: ``[B, T, 2]`` or None.
    top_k: routed heads per token, ``1 <= top_k <= h_r``.
    valid: optional ``[B, T]`` bool; tokens that count in the load-balance means.

  Returns:
    ``(g [B, T, h_s + h_r] float32, aux)`` with ``aux = {'load_balance_loss': scalar,
    'selected': [B, T, h_r] bool}``.
  """
  _check_array("shared_logits", shared_logits, 3)
  _check_array("routed_logits", routed_logits, 3)
  B, T, Hr = routed_logits.shape
  if shared_logits.shape[:2] != (B, T):
    raise ValueError(f"shared_logits must be [B, T] = {(B, T)} + [h_s], got "
                     f"{shared_logits.shape}")
  if Hr < 1:
    raise ValueError(f"routed_logits must have at least one routed head, got {routed_logits.shape}")
  if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= Hr:
    raise ValueError(f"top_k must be an int in [1, h_r={Hr}], got top_k={top_k!r}")
  rp = jax.nn.softmax(routed_logits.astype(jnp.float32), -1)
  _, idx = _top_k(jax.lax.stop_gradient(rp), top_k)
  sel = jnp.sum(jax.nn.one_hot(idx, Hr, dtype=jnp.float32), -2) > 0
  g_r = jnp.where(sel, rp, 0.0)
  g_s = jax.nn.softmax(shared_logits.astype(jnp.float32), -1)
  if mix_logits is not None:
    _check_array("mix_logits", mix_logits, 3)
    if mix_logits.shape != (B, T, 2):
      raise ValueError(f"mix_logits must be [B, T, 2] = {(B, T, 2)}, got {mix_logits.shape}")
    a = jax.nn.softmax(mix_logits.astype(jnp.float32), -1)
    g_s = g_s * a[..., :1]
    g_r = g_r * a[..., 1:]
  g = jnp.concatenate([g_s, g_r], -1)
  if valid is None:
    w = jnp.ones((B, T), jnp.float32)
  else:
    if valid.shape != (B, T):
      raise ValueError(f"valid must be [B, T] = {(B, T)}, got {valid.shape}")
    w = valid.astype(jnp.float32)
  den = jnp.maximum(jnp.sum(w), 1.0)
  f = jnp.einsum("bt,bti->i", w, sel.astype(jnp.float32)) / den
  P = jnp.einsum("bt,bti->i", w, rp) / den
  loss = jnp.sum(jax.lax.stop_gradient(f) * P)
  return g, {"load_balance_loss": loss, "selected": sel}


def moh_attention(q, k, v, shared_logits, routed_logits, mix_logits=None, *, top_k: int,
                  valid=None, **attention_kwargs):
  """Mixture-of-Head attention: every head's attention output weighted per token.

  ``out[b, t, n] = g[b, t, n] * attention(q, k, v)[b, t, n]`` with ``g`` from
  :func:`moh_head_weights` (query heads ``0..h_s-1`` shared, the rest routed, so
  ``N = h_s + h_r``); the output projection of the layer then sums the weighted heads,
  ``O = sum_i g_i H^i W_O^i``.  All heads are computed (the dense form of the paper;
  unselected heads get weight 0 and no gradient).

  Args:
    q, k, v: ``[B, T, N, H]``, ``[B, S, K, H]``, ``[B, S, K, Hv]``.
    shared_logits, routed_logits, mix_logits, top_k, valid: see :func:`moh_head_weights`.
    **attention_kwargs: passed to :func:`attnjax.attention` (mask, scale, implementation,
      segment ids, ...).

  Returns:
    ``(out [B, T, N, Hv], aux)``; ``aux['load_balance_loss']`` is the loss to add (times a
    coefficient) to the training loss; ``aux['head_weights']`` is ``g``.
  """
  B, T, N, _, _, _, _ = _check_qkv(q, k, v)
  g, aux = moh_head_weights(shared_logits, routed_logits, mix_logits, top_k=top_k, valid=valid)
  if g.shape != (B, T, N):
    raise ValueError(f"shared_logits and routed_logits must have h_s + h_r = N = {N} heads and "
                     f"[B, T] = {(B, T)}, got h_s + h_r = {g.shape[-1]}, [B, T] = {g.shape[:2]}")
  o = hooks.attention(q, k, v, **attention_kwargs)
  out = (o.astype(jnp.float32) * g[..., None]).astype(o.dtype)
  return out, dict(aux, head_weights=g)


# ----------------------------------------------------------------------------- gates

def gate_heads(out, gates=None, head_mask=None):
  """Head importance gates and masking: ``out[..., n, :] * gates_n * head_mask_n``.

  Args:
    out: per-head attention outputs ``[B, T, N, Hv]``.
    gates: float, broadcastable to ``[B, T, N]`` (``[N]`` per head, ``[B, T, N]`` per
      token), or None.
    head_mask: bool/0-1, broadcastable to ``[B, T, N]``, or None (masked heads give 0 and
      no gradient).

  Paper: "Are Sixteen Heads Really Better than One?" (``xi_h`` in {0, 1} or a scale; the
  head importance ``|dL/dxi_h|`` is the gradient with respect to ``gates``).
  """
  _check_array("out", out, 4)
  lead = out.shape[:3]
  y = out.astype(jnp.float32)
  for name, a in (("gates", gates), ("head_mask", head_mask)):
    if a is None:
      continue
    a = jnp.asarray(a)
    try:
      jnp.broadcast_shapes(a.shape, lead)
    except ValueError:
      raise ValueError(f"{name} must broadcast to [B, T, N] = {lead}, got shape {a.shape}") \
          from None
    if name == "head_mask":
      y = jnp.where(a[..., None].astype(bool), y, 0.0)
    else:
      y = y * a.astype(jnp.float32)[..., None]
  return y.astype(out.dtype)


def head_gated_attention(q, k, v, *, gates=None, head_mask=None, **attention_kwargs):
  """:func:`attnjax.attention` with per-head gates / a head mask on its output
  (:func:`gate_heads`).  Returns ``[B, T, N, Hv]``."""
  _check_qkv(q, k, v)
  return gate_heads(hooks.attention(q, k, v, **attention_kwargs), gates, head_mask)


# ----------------------------------------------------------------------------- SHViT

def single_head_partial_attention(x, wq, wk, wv, **attention_kwargs):
  """SHViT's single-head attention on the first ``Dp`` channels; the rest pass through.

      x_p, x_r = x[..., :Dp], x[..., Dp:]
      o = softmax(scale (x_p Wq)(x_p Wk)^T) (x_p Wv)          (one head)
      out = concat([o, x_r], -1)

  The layer follows it with ReLU and the output projection (as the paper's code).

  Args:
    x: ``[B, T, D]``.
    wq, wk: ``[Dp, Hqk]``; wv: ``[Dp, Dp]`` (``Dp <= D`` is the attended channel count,
      about ``D / 4.67`` in the paper).
    **attention_kwargs: passed to :func:`attnjax.attention`.

  Returns: ``[B, T, D]``.  Paper: "SHViT: Single-Head Vision Transformer with Memory
  Efficient Macro Design".
  """
  _check_array("x", x, 3)
  _check_array("wq", wq, 2)
  _check_array("wk", wk, 2)
  _check_array("wv", wv, 2)
  Dp = wq.shape[0]
  if not 1 <= Dp <= x.shape[-1]:
    raise ValueError(f"wq must have 1 <= Dp <= D={x.shape[-1]} rows, got shape {wq.shape}")
  if wk.shape != wq.shape:
    raise ValueError(f"wk must have the shape of wq {wq.shape}, got {wk.shape}")
  if wv.shape != (Dp, Dp):
    raise ValueError(f"wv must be [Dp, Dp] = {(Dp, Dp)}, got {wv.shape}")
  xp = x[..., :Dp]
  dt = x.dtype
  q = jnp.einsum("btd,de->bte", xp, wq.astype(dt))[:, :, None]
  k = jnp.einsum("btd,de->bte", xp, wk.astype(dt))[:, :, None]
  v = jnp.einsum("btd,de->bte", xp, wv.astype(dt))[:, :, None]
  o = hooks.attention(q, k, v, **attention_kwargs)[:, :, 0]
  return jnp.concatenate([o.astype(dt), x[..., Dp:]], -1)


# ----------------------------------------------------------------------------- MW-MHA

def _window_mask(w, causal):
  if w is None:
    return _masks.causal() if causal else None
  return _masks.sliding_window(w) if causal else _masks.sliding_window(w, w)


def check_windows(windows, N: int, K: int):
  """Validates MW-MHA's ``windows`` for ``N`` query and ``K`` kv heads; returns
  ``(N / G, N / K)`` (ValueError naming ``windows`` otherwise)."""
  if isinstance(windows, (str, bytes)) or not hasattr(windows, "__len__") or not windows:
    raise ValueError(f"windows must be a non-empty sequence of ints or None, got {windows!r}")
  for w in windows:
    if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
      raise ValueError(f"windows entries must be ints >= 0 or None, got windows={windows!r}")
  G = len(windows)
  if N % G:
    raise ValueError(f"len(windows)={G} must divide num_heads N={N} (windows={windows!r})")
  Ng, r = N // G, N // K
  if Ng % r and r % Ng:
    raise ValueError(f"each window group's query heads must use whole kv heads: N/G={Ng} and "
                     f"N/K={r} must divide one another (windows={windows!r}, K={K})")
  return Ng, r


def multi_window_attention(q, k, v, *, windows: Sequence[Optional[int]], causal: bool = False,
                           **attention_kwargs):
  """Multi-Window Multi-Head Attention: head group ``g`` attends within window ``w_g``.

  The ``N`` query heads are split into ``G = len(windows)`` equal contiguous groups; group
  ``g`` sees keys ``|i - j| <= w_g`` (``i - w_g <= j <= i`` when ``causal``), or all keys
  (all past keys when causal) for ``w_g = None``.  Each group is one call of
  :func:`attnjax.attention` with its band mask, so the kernels skip the tiles outside the
  band (``sum_g O(T w_g H)`` work).

  Args:
    q, k, v: ``[B, T, N, H]``, ``[B, S, K, H]``, ``[B, S, K, Hv]``; the kv heads of each
      group must be whole (``N/K`` divides ``N/G`` or ``N/G`` divides ``N/K``).
    windows: one window (int >= 0) or None per head group; ``G`` must divide ``N``.
    causal: one-sided windows and causal global heads.
    **attention_kwargs: passed on (no ``mask``: the windows are the mask).

  Returns: ``[B, T, N, Hv]``.  Paper: "Masked Autoencoders with Multi-Window Local-Global
  Attention Are Better Audio Learners".
  """
  _, _, N, _, _, K, _ = _check_qkv(q, k, v)
  if "mask" in attention_kwargs:
    raise TypeError("mask: multi_window_attention builds the masks from windows; pass none")
  Ng, r = check_windows(windows, N, K)
  outs = []
  for g, w in enumerate(windows):
    lo, hi = g * Ng // r, ((g + 1) * Ng - 1) // r + 1
    outs.append(hooks.attention(q[:, :, g * Ng:(g + 1) * Ng], k[:, :, lo:hi], v[:, :, lo:hi],
                                mask=_window_mask(w, causal), **attention_kwargs))
  return jnp.concatenate(outs, 2)


# ----------------------------------------------------------------------------- talking heads

def talking_heads_attention(q, k, v, *, pre_mix=None, post_mix=None, scale=None,
                            causal: bool = False, q_segment_ids=None, kv_segment_ids=None):
  """Talking-heads attention: the heads' logits and weights are mixed linearly.

      J[b, n, i, j] = scale * q[b, i, n] . k[b, j, g(n)]
      L[b, m, i, j] = sum_n J[b, n, i, j] P_pre[n, m]          (logits, before softmax)
      W = softmax_j(L | allowed)
      U[b, l, i, j] = sum_m W[b, m, i, j] P_post[m, l]          (weights, after softmax)
      o[b, i, l] = sum_j U[b, l, i, j] v[b, j, g(l)]

  ``P_pre`` / ``P_post`` None means the identity (no mixing).  Plain ``jnp``: it needs the
  logits of every head at once, so memory is ``O(B N T S)`` (use it on short sequences).
  A query with no allowed key returns 0.

  Args:
    q, k, v: ``[B, T, N, H]``, ``[B, S, K, H]``, ``[B, S, K, Hv]``.
    pre_mix: ``[N, M]`` or None; post_mix: ``[M, N]`` or None (``M = N`` when one is None).
    scale: default ``1/sqrt(H)``.
    causal: ``j <= i + S - T``; q_segment_ids ``[B, T]`` / kv_segment_ids ``[B, S]``.

  Returns: ``[B, T, N, Hv]`` in ``q.dtype``.  Paper: "Talking-Heads Attention".
  """
  B, T, N, H, S, _, _ = _check_qkv(q, k, v)
  M = N
  if pre_mix is not None:
    _check_array("pre_mix", pre_mix, 2)
    if pre_mix.shape[0] != N:
      raise ValueError(f"pre_mix must be [N={N}, M], got shape {pre_mix.shape}")
    M = pre_mix.shape[1]
  if post_mix is not None:
    _check_array("post_mix", post_mix, 2)
    if post_mix.shape != (M, N):
      raise ValueError(f"post_mix must be [M, N] = {(M, N)}, got shape {post_mix.shape}")
  scale = H ** -0.5 if scale is None else scale
  kx = _expand_kv(k, N).astype(jnp.float32)
  vx = _expand_kv(v, N).astype(jnp.float32)
  s = scale * jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), kx)
  if pre_mix is not None:
    s = jnp.einsum("bnts,nm->bmts", s, pre_mix.astype(jnp.float32))
  ok = plain_allowed(B, T, S, causal=causal, q_segment_ids=q_segment_ids,
                     kv_segment_ids=kv_segment_ids)
  w = masked_softmax(s, ok)
  if post_mix is not None:
    w = jnp.einsum("bmts,ml->blts", w, post_mix.astype(jnp.float32))
  out = jnp.einsum("bnts,bsnh->btnh", w, vx).astype(q.dtype)
  # attnjax.analysis interception point (a no-op unless observed): the weights after mixing
  return hooks.intercepted("talking_heads", lambda: out, q, k, v, probs=lambda: w)


# ----------------------------------------------------------------------------- relational heads

def relational_attention(q, k, phi, psi, symbols=None, **attention_kwargs):
  """Relational attention heads (Dual Attention Transformer), as one softmax attention call.

      alpha = softmax_j(scale q_i . k_j)                        (per head, with the mask)
      r_l(x_i, x_j) = <phi_l(x_i), psi_l(x_j)>,  l = 1..R
      rel[i, n, l] = sum_j alpha_ij r_l(x_i, x_j) = <phi_l(x_i), sum_j alpha_ij psi_l(x_j)>
      sym[i, n]    = sum_j alpha_ij s_j

  The second form is what runs: ``psi`` (flattened) and the symbols are the values of one
  :func:`attnjax.attention` call, then a per-query contraction with ``phi`` (no ``[T, S]``
  array).  The layer maps ``rel W_r + sym W_s`` per head to the output.

  Args:
    q, k: ``[B, T, N, H]``, ``[B, S, K, H]`` (the attention's query/key projections).
    phi: ``[B, T, R, P]`` and psi: ``[B, S, R, P]``, the ``R`` relation maps (shared by
      the heads, as in the paper).
    symbols: ``[B, S, Hs]`` or ``[S, Hs]`` symbol vectors (positional symbols are one
      learned vector per position), or None.
    **attention_kwargs: passed to :func:`attnjax.attention`.

  Returns: ``(rel [B, T, N, R], sym [B, T, N, Hs] or None)``, float32.  Paper:
  "Disentangling and Integrating Relational and Sensory Information in Transformer
  Architectures".
  """
  _check_array("q", q, 4)
  _check_array("k", k, 4)
  _check_array("phi", phi, 4)
  _check_array("psi", psi, 4)
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  if k.shape[0] != B or k.shape[3] != H or N % K:
    raise ValueError(f"k must be [B={B}, S, K, H={H}] with K dividing N={N}, got {k.shape}")
  if phi.shape[:2] != (B, T):
    raise ValueError(f"phi must be [B, T] = {(B, T)} + [R, P], got shape {phi.shape}")
  if psi.shape != (B, S) + phi.shape[2:]:
    raise ValueError(f"psi must be [B, S, R, P] = {(B, S) + phi.shape[2:]}, got {psi.shape}")
  R, P = phi.shape[2:]
  vals = [psi.reshape(B, S, R * P).astype(jnp.float32)]
  if symbols is not None:
    _check_array("symbols", symbols)
    if symbols.ndim == 2:
      symbols = jnp.broadcast_to(symbols, (B,) + symbols.shape)
    if symbols.ndim != 3 or symbols.shape[:2] != (B, S):
      raise ValueError(f"symbols must be [B, S, Hs] or [S, Hs] with S={S}, got "
                       f"{symbols.shape}")
    vals.append(symbols.astype(jnp.float32))
  v = jnp.concatenate(vals, -1).astype(q.dtype)
  v = jnp.broadcast_to(v[:, :, None, :], (B, S, K, v.shape[-1]))
  o = hooks.attention(q, k, v, **attention_kwargs).astype(jnp.float32)
  a_psi = o[..., :R * P].reshape(B, T, N, R, P)
  rel = jnp.einsum("btrp,btnrp->btnr", phi.astype(jnp.float32), a_psi)
  sym = o[..., R * P:] if symbols is not None else None
  return rel, sym
