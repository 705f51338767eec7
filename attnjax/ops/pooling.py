"""Token, pooling and latent-bottleneck attention ops (catalog families G, D04, A11).

Layouts follow ``attnjax.attention``: ``q [B, T, N, H]``, ``k [B, S, K, H]``,
``v [B, S, K, Hv]`` with ``N % K == 0`` (GQA). Softmaxes over keys run through the
dispatcher (:func:`attnjax.core.hooks.attention`, i.e. :func:`attnjax.attention`), so
``implementation=`` selects the backend; logits are float32 and outputs have the dtype
of ``q`` with ``Hv`` last. Padding uses the dispatcher's convention: tokens attend only
within equal segment ids; here ``segment_ids [B, S]`` with negative ids mark padded keys
(elements of a set), which are never attended.

- :func:`agent_attention`: Agent Attention (D04), two softmaxes through ``n`` agents.
- :func:`slot_attention_step`: one Slot Attention update (G12), softmax over the slots.
- :func:`gated_mil_pooling`: gated attention MIL pooling (G10), several branches.
- :func:`simpool`: SimPool's single-query attention pooling with a generalized mean (G03).
- :func:`class_attention`: class-query cross-attention (CaiT class attention, G09).
- :func:`bidirectional_cross_attention`: LookupViT's shared-logit two-way attention (G06).
- :func:`super_token_association` / :func:`super_token_upsample`: Super Token Attention's
  sparse association and map-back (G04).
- :func:`proxy_token_attention`: PT-DiT proxy tokens (G05), global path.
- :func:`sink_redistributed_attention`: VAR sink-aware redistribution (A11), with
  :func:`visual_sink_mask` and :func:`image_centric_heads` (the paper's selections).

See ``docs/pooling.md``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import hooks

__all__ = ["agent_attention", "slot_attention_step", "gated_mil_pooling", "simpool",
           "class_attention", "bidirectional_cross_attention", "super_token_association",
           "super_token_weights",
           "super_token_upsample", "proxy_token_attention", "proxy_indices",
           "sink_redistributed_attention", "visual_sink_mask", "image_centric_heads",
           "kv_padding_ids"]


# ----------------------------------------------------------------------------- checks

def _rank(name, x, rank, what):
  if not hasattr(x, "ndim") or x.ndim != rank:
    raise ValueError(f"{name} must be {what} (rank {rank}), got shape {getattr(x, 'shape', None)}")


def _check_qkv(q, k, v, *, qname="q"):
  _rank(qname, q, 4, "[B, T, N, H]")
  _rank("k", k, 4, "[B, S, K, H]")
  _rank("v", v, 4, "[B, S, K, Hv]")
  if k.shape[:3] != v.shape[:3]:
    raise ValueError(f"v must be [B, S, K, Hv] with [B, S, K] = {k.shape[:3]} of k, got shape "
                     f"{v.shape}")
  if q.shape[0] != k.shape[0]:
    raise ValueError(f"k must have the batch B={q.shape[0]} of {qname}, got shape {k.shape}")
  if q.shape[-1] != k.shape[-1]:
    raise ValueError(f"k must have the head_dim H={q.shape[-1]} of {qname}, got shape {k.shape}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"the heads N={q.shape[2]} of {qname} must be a multiple of the kv heads "
                     f"K={k.shape[2]} of k")


def _scale(scale, H):
  return 1.0 / math.sqrt(H) if scale is None else scale


def kv_padding_ids(segment_ids, batch, length, num_queries):
  """(query ids, key ids) for the dispatcher from element ids ``[B, S]`` where negative ids
  mark padding: every query gets id 0, valid keys 0, padded keys -1 (never attended).
  ``None`` gives ``(None, None)``."""
  if segment_ids is None:
    return None, None
  segment_ids = jnp.asarray(segment_ids)
  if segment_ids.shape != (batch, length):
    raise ValueError(f"segment_ids must be [B, S] = [{batch}, {length}], got shape "
                     f"{segment_ids.shape}")
  kv = jnp.where(segment_ids >= 0, 0, -1).astype(jnp.int32)
  return jnp.zeros((batch, num_queries), jnp.int32), kv


def _repeat_kv(x, N):
  return jnp.repeat(x, N // x.shape[2], axis=2) if x.shape[2] != N else x


# ----------------------------------------------------------------------------- agent

def agent_attention(q, k, v, agents, *, scale=None, agent_bias=None, query_bias=None,
                    segment_ids=None, implementation=None):
  """Agent Attention: `n` agent tokens aggregate from the keys, then broadcast to queries.

  Paper: "Agent Attention: On the Integration of Softmax and Linear Attention" (Han et al.,
  2024)::

    V_A = softmax(scale * agents . k^T + agent_bias) v          [B, n, N, Hv]
    out = softmax(scale * q . agents^T + query_bias) V_A        [B, T, N, Hv]

  i.e. generalized linear attention with ``phi_q = softmax(q A^T)``,
  ``phi_k = softmax(A k^T)``; cost ``O((T + S) n H)``. The agent bias and the depthwise
  convolution on ``v`` of the paper belong to the layer (``attnjax.layers.tokens``).

  Args:
    q: ``[B, T, N, H]``.
    k: ``[B, S, K, H]``, ``v``: ``[B, S, K, Hv]`` (GQA: ``N % K == 0``).
    agents: ``[B, n, N, H]`` (one agent set per query head; e.g. pooled from ``q``).
    scale: logit scale, default ``1/sqrt(H)``.
    agent_bias: additive bias broadcastable to ``[B, N, n, S]`` (B_2 of the paper).
    query_bias: additive bias broadcastable to ``[B, N, T, n]`` (B_1 of the paper).
    segment_ids: optional int ``[B, S]``; negative ids mark padded keys (never attended).
    implementation: backend of both softmaxes (``attnjax.attention``).

  Returns: ``[B, T, N, Hv]`` in the dtype of ``q``.
  """
  _check_qkv(q, k, v)
  _rank("agents", agents, 4, "[B, n, N, H]")
  B, T, N, H = q.shape
  if agents.shape[0] != B or agents.shape[2:] != (N, H):
    raise ValueError(f"agents must be [B, n, N, H] with B={B}, N={N} (the heads of q), H={H}, got "
                     f"shape {agents.shape}")
  if agents.shape[1] < 1:
    raise ValueError(f"agents must hold at least one agent (n >= 1), got shape {agents.shape}")
  s = _scale(scale, H)
  n = agents.shape[1]
  qa, kv_ids = kv_padding_ids(segment_ids, B, k.shape[1], n)
  v_agents = hooks.attention(agents, k, v, scale=s, bias=agent_bias, q_segment_ids=qa,
                             kv_segment_ids=kv_ids, implementation=implementation)
  out = hooks.attention(q, agents, v_agents.astype(q.dtype), scale=s, bias=query_bias,
                        implementation=implementation)
  return out.astype(q.dtype)


# ----------------------------------------------------------------------------- slots

def slot_attention_step(q, k, v, *, scale=None, eps=1e-8, segment_ids=None, return_weights=False):
  """One Slot Attention aggregation: softmax over the slots, weighted mean over inputs.

  Paper: "Object-Centric Learning with Slot Attention" (Locatello et al., 2020)::

    attn[i, s] = softmax_s(scale * k_i . q_s)          (competition between slots)
    w[i, s]    = (attn[i, s] + eps) / sum_j (attn[j, s] + eps)
    updates_s  = sum_i w[i, s] v_i

  The slot GRU and residual MLP of the paper belong to the layer.

  Args:
    q: slot queries ``[B, M, N, H]`` (M slots, N heads; the paper uses one head).
    k: ``[B, S, K, H]``, ``v``: ``[B, S, K, Hv]`` inputs (GQA allowed).
    scale: default ``1/sqrt(H)``.
    eps: the paper's epsilon added to the attention before the weighted mean.
    segment_ids: optional int ``[B, S]``; negative ids mark padded inputs (weight 0).
    return_weights: also return ``attn [B, N, S, M]`` (the softmax over slots).

  Returns: ``updates [B, M, N, Hv]`` (float32 math, dtype of ``q``), and ``attn``.
  """
  _check_qkv(q, k, v)
  if q.shape[1] < 1:
    raise ValueError(f"q must hold at least one slot (num_slots >= 1), got shape {q.shape}")
  B, M, N, H = q.shape
  S = k.shape[1]
  kf = _repeat_kv(k, N).astype(jnp.float32)
  vf = _repeat_kv(v, N).astype(jnp.float32)
  logits = jnp.einsum("bsnh,bmnh->bnsm", kf, q.astype(jnp.float32)) * _scale(scale, H)
  attn = jax.nn.softmax(logits, axis=-1)
  w = attn + eps
  if segment_ids is not None:
    _, kv_ids = kv_padding_ids(segment_ids, B, S, 1)
    w = jnp.where((kv_ids >= 0)[:, None, :, None], w, 0.0)
    attn = jnp.where((kv_ids >= 0)[:, None, :, None], attn, 0.0)
  w = w / jnp.maximum(jnp.sum(w, axis=2, keepdims=True), 1e-30)  # no valid input: 0
  updates = jnp.einsum("bnsm,bsnh->bmnh", w, vf).astype(q.dtype)
  # attnjax.analysis interception point (a no-op unless observed): slots x inputs, w^T
  updates = hooks.intercepted("softmax", lambda: updates, q, k, v,
                              probs=lambda: jnp.swapaxes(w, -1, -2))
  return (updates, attn) if return_weights else updates


# ----------------------------------------------------------------------------- MIL

def gated_mil_pooling(h, V, U, w, *, gated=True, segment_ids=None, instance_mask=None,
                      return_weights=False):
  """Gated attention MIL pooling with one or more attention branches.

  Paper: "Attention-based Deep Multiple Instance Learning" (Ilse et al., 2018); several
  branches as ACMIL's multi-branch attention ("Attention-Challenging Multiple Instance
  Learning for Whole Slide Image Classification")::

    e_i = w^T (tanh(V^T h_i) * sigmoid(U^T h_i))     (gated; tanh only when gated=False)
    a   = softmax_i(e)                              (over the instances of the bag)
    z   = sum_i a_i h_i

  Args:
    h: instances ``[B, n, D]``.
    V, U: ``[D, L]`` (``U`` ignored, may be None, when ``gated=False``).
    w: ``[L, M]`` for ``M`` branches (or ``[L]`` for one).
    segment_ids: optional int ``[B, n]``; negative ids mark padded instances (a_i = 0).
    instance_mask: optional bool ``[B, M, n]``: True removes the instance from branch ``m``
      (ACMIL's stochastic top-K instance masking; the softmax renormalises over the rest).
    return_weights: also return ``a [B, M, n]``.

  Returns: ``z [B, M, D]`` (``[B, D]`` when ``w`` is ``[L]``) in the dtype of ``h``.
  """
  _rank("h", h, 3, "[B, n, D]")
  B, n, D = h.shape
  _rank("V", V, 2, "[D, L]")
  if V.shape[0] != D:
    raise ValueError(f"V must be [D, L] with D={D}, got shape {V.shape}")
  one = hasattr(w, "ndim") and w.ndim == 1
  w2 = w[:, None] if one else w
  _rank("w", w2, 2, "[L, M] or [L]")
  if w2.shape[0] != V.shape[1]:
    raise ValueError(f"w must be [L, M] with L={V.shape[1]} (columns of V), got shape {w.shape}")
  hf = h.astype(jnp.float32)
  g = jnp.tanh(hf @ V.astype(jnp.float32))
  if gated:
    _rank("U", U, 2, "[D, L]")
    if U.shape != V.shape:
      raise ValueError(f"U must have the shape {V.shape} of V, got shape {U.shape}")
    g = g * jax.nn.sigmoid(hf @ U.astype(jnp.float32))
  e = jnp.einsum("bnl,lm->bmn", g, w2.astype(jnp.float32))
  valid = None
  if segment_ids is not None:
    _, kv_ids = kv_padding_ids(segment_ids, B, n, 1)
    valid = (kv_ids >= 0)[:, None, :]
  if instance_mask is not None:
    M = w2.shape[1]
    if getattr(instance_mask, "shape", None) != (B, M, n):
      raise ValueError(f"instance_mask must be bool [B, M, n] = {(B, M, n)}, got shape "
                       f"{getattr(instance_mask, 'shape', None)}")
    keep = ~jnp.asarray(instance_mask, bool)
    valid = keep if valid is None else valid & keep
  if valid is not None:
    e = jnp.where(valid, e, -jnp.inf)
    mx = jnp.max(e, axis=-1, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    p = jnp.where(valid, jnp.exp(e - jax.lax.stop_gradient(mx)), 0.0)
    a = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
  else:
    a = jax.nn.softmax(e, axis=-1)
  z = jnp.einsum("bmn,bnd->bmd", a, hf).astype(h.dtype)
  # attnjax.analysis interception point (a no-op unless observed): a as [B, 1, M, n]
  z = hooks.intercepted("pooling", lambda: z, None, h, h, probs=lambda: a[:, None],
                        dims=(B, 1, a.shape[1], n))
  if one:
    z, a = z[:, 0], a[:, 0]
  return (z, a) if return_weights else z


# ----------------------------------------------------------------------------- SimPool

def simpool(q, k, v, *, gamma=None, scale=None, eps=1e-6, segment_ids=None, implementation=None):
  """SimPool: one query (from the global average) attends to the tokens; generalized mean.

  Paper: "Keep It SimPool: Who Said Supervised Transformers Suffer from Attention
  Deficit?" (Psomas et al., 2023). With ``a = softmax(scale * q . k^T)`` over the ``S``
  tokens (``q = W_q GAP(LN(X))``, ``k = W_k LN(X)``, values ``v`` the unprojected features,
  all made by the layer)::

    gamma None:  out = sum_i a_i v_i
    gamma > 0:   m = min(v) - eps   (per example and kv head)
                 out = m + (sum_i a_i (v_i - m)^gamma)^(1/gamma)

  The shift by ``m`` makes the values positive for the generalized mean (SimPool's public
  code shifts by the minimum too); adding it back makes ``gamma = 1`` equal plain
  attention pooling (our convention).

  Args:
    q: ``[B, P, N, H]`` (SimPool uses ``P = 1``); ``k [B, S, K, H]``; ``v [B, S, K, Hv]``.
    gamma: generalized-mean exponent (None: arithmetic mean).
    segment_ids: optional int ``[B, S]``; negative ids mark padded tokens.

  Returns: ``[B, P, N, Hv]`` in the dtype of ``q``.
  """
  _check_qkv(q, k, v)
  B, P, N, H = q.shape
  qs, kv_ids = kv_padding_ids(segment_ids, B, k.shape[1], P)
  s = _scale(scale, H)
  if gamma is None:
    return hooks.attention(q, k, v, scale=s, q_segment_ids=qs, kv_segment_ids=kv_ids,
                           implementation=implementation).astype(q.dtype)
  if not float(gamma) > 0:
    raise ValueError(f"gamma must be a positive float or None, got gamma={gamma!r}")
  vf = v.astype(jnp.float32)
  if kv_ids is not None:
    vmin_src = jnp.where((kv_ids >= 0)[:, :, None, None], vf, jnp.inf)
  else:
    vmin_src = vf
  m = jnp.min(vmin_src, axis=(1, 3), keepdims=True)  # [B, 1, K, 1]
  m = jnp.where(jnp.isfinite(m), m, 0.0) - eps
  u = jnp.power(vf - m, gamma)
  pooled = hooks.attention(q.astype(jnp.float32), k.astype(jnp.float32), u, scale=s,
                           q_segment_ids=qs, kv_segment_ids=kv_ids,
                           implementation=implementation).astype(jnp.float32)
  mq = jnp.repeat(m, N // k.shape[2], axis=2)
  out = mq + jnp.power(jnp.maximum(pooled, 1e-30), 1.0 / gamma)
  if kv_ids is not None:  # a bag with no valid token pools to 0
    anyv = jnp.any(kv_ids >= 0, axis=1)[:, None, None, None]
    out = jnp.where(anyv, out, 0.0)
  return out.astype(q.dtype)


# ----------------------------------------------------------------------------- class attention

def class_attention(q_cls, k_cls, v_cls, k, v, *, scale=None, segment_ids=None,
                    implementation=None):
  """Class-query cross-attention: each class query reads the tokens and its own class token.

  Paper: "Going deeper with Image Transformers" (CaiT class attention) and the
  class-specific queries of "A Simple Interpretable Transformer for Fine-Grained Image
  Classification and Analysis" (INTR): with ``z_c = [x_class_c, x_1..x_S]``::

    out_c = softmax([scale * q_c . k_cls_c, scale * q_c . k_j]_j) [v_cls_c; v_j]_j

  (CaiT: one class token, ``Q = W_q x_class``, ``K = W_k z``, ``V = W_v z``); class
  queries never see each other.

  Args:
    q_cls: ``[B, C, N, H]`` (C class queries); ``k_cls [B, C, K, H]``, ``v_cls [B, C, K, Hv]``
      their own key/value (pass the same class tokens' projections); ``k [B, S, K, H]``,
      ``v [B, S, K, Hv]`` the tokens.
    segment_ids: optional int ``[B, S]``; negative ids mark padded tokens.

  Returns: ``[B, C, N, Hv]`` in the dtype of ``q_cls``.
  """
  _check_qkv(q_cls, k, v, qname="q_cls")
  B, C, N, H = q_cls.shape
  for name, a, last in (("k_cls", k_cls, k.shape[-1]), ("v_cls", v_cls, v.shape[-1])):
    _rank(name, a, 4, "[B, C, K, H]")
    if a.shape != (B, C, k.shape[2], last):
      raise ValueError(f"{name} must be [B, C, K, H] = {(B, C, k.shape[2], last)}, got shape "
                       f"{a.shape}")
  S = k.shape[1]
  kk = jnp.concatenate([k_cls.astype(k.dtype), k], axis=1)
  vv = jnp.concatenate([v_cls.astype(v.dtype), v], axis=1)
  allowed = np.concatenate([np.eye(C, dtype=bool), np.ones((C, S), bool)], axis=1)
  mask = jnp.asarray(allowed)
  if segment_ids is not None:
    _, kv_ids = kv_padding_ids(segment_ids, B, S, C)
    valid = jnp.concatenate([jnp.ones((B, C), bool), kv_ids >= 0], axis=1)
    mask = mask[None, None] & valid[:, None, None, :]
  return hooks.attention(q_cls, kk, vv, mask=mask, scale=_scale(scale, H),
                         implementation=implementation).astype(q_cls.dtype)


# ----------------------------------------------------------------------------- LookupViT

def bidirectional_cross_attention(q_c, k_l, v_l, v_c_fn=None, *, v_c=None, scale=None,
                                  segment_ids=None, implementation=None):
  """LookupViT's multi-head bidirectional cross-attention with shared logits.

  Paper: "LookupViT: Compressing visual information to a limited number of tokens"
  (Koner et al., 2024). One logit matrix ``A = scale * q_c . k_l^T`` ``[M, S]`` between
  ``M`` compressed and ``S`` lookup tokens serves both directions::

    gather:    c_out = softmax_rows(A) v_l         (compressed <- lookup)   [B, M, N, Hv]
    propagate: l_out = softmax_rows(A^T) v_c'      (lookup <- compressed)   [B, S, N, Hv]

  where ``v_c' = v_c_fn(c_out)`` (the paper runs the heavy block on the compressed tokens
  in between) or the given ``v_c``. ``A^T`` is computed by the dispatcher with the roles
  swapped (``k_l`` as queries, ``q_c`` as keys), which gives the same logits.

  Args:
    q_c: ``[B, M, N, H]``; ``k_l``: ``[B, S, N, H]``; ``v_l``: ``[B, S, N, Hv]`` (one head set:
      the shared logits need the same heads on both sides).
    v_c_fn: ``c_out [B, M, N, Hv] -> v_c [B, M, N, Hv2]`` or None with ``v_c`` given.
    segment_ids: optional int ``[B, S]``; negative ids mark padded lookup tokens (never
      gathered; their ``l_out`` rows are computed but are padding).

  Returns: ``(c_out, l_out)``.
  """
  _check_qkv(q_c, k_l, v_l, qname="q_c")
  if k_l.shape[2] != q_c.shape[2]:
    raise ValueError(f"k_l must have the heads N={q_c.shape[2]} of q_c (shared logits), got "
                     f"shape {k_l.shape}")
  B, M, N, H = q_c.shape
  S = k_l.shape[1]
  s = _scale(scale, H)
  qs, kv_ids = kv_padding_ids(segment_ids, B, S, M)
  c_out = hooks.attention(q_c, k_l, v_l, scale=s, q_segment_ids=qs, kv_segment_ids=kv_ids,
                          implementation=implementation)
  if v_c is None:
    if v_c_fn is None:
      raise ValueError("v_c_fn or v_c must be given (the compressed tokens' values)")
    v_c = v_c_fn(c_out)
  _rank("v_c", v_c, 4, "[B, M, N, Hv]")
  if v_c.shape[:3] != (B, M, N):
    raise ValueError(f"v_c must be [B, M, N, Hv] with [B, M, N] = {(B, M, N)}, got shape "
                     f"{v_c.shape}")
  l_out = hooks.attention(k_l, q_c, v_c, scale=s, implementation=implementation)
  return c_out.astype(q_c.dtype), l_out.astype(q_c.dtype)


# ----------------------------------------------------------------------------- super tokens

def _grid_pool(x, s):
  B, Hh, Ww, C = x.shape
  return x.reshape(B, Hh // s[0], s[0], Ww // s[1], s[1], C).mean(axis=(2, 4))


def _neighbours(st):
  """``[B, h, w, C] -> [B, h, w, 9, C]``: the 3x3 super-token neighbourhood (zero padded)."""
  B, h, w, C = st.shape
  p = jnp.pad(st, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return jnp.stack([p[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=3)


def _neighbour_valid(h, w):
  ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  out = np.stack([(ys + dy >= 0) & (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
                  for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=-1)
  return out  # [h, w, 9]


def _to_cells(x, s):
  B, Hh, Ww, C = x.shape
  return x.reshape(B, Hh // s[0], s[0], Ww // s[1], s[1], C).transpose(0, 1, 3, 2, 4, 5).reshape(
      B, Hh // s[0], Ww // s[1], s[0] * s[1], C)


def _from_cells(x, s, Hh, Ww):
  B, h, w, _, C = x.shape
  return x.reshape(B, h, w, s[0], s[1], C).transpose(0, 1, 3, 2, 4, 5).reshape(B, Hh, Ww, C)


def super_token_weights(Q, stoken_size):
  """The association ``Q [B, h, w, s*s, 9]`` as a dense ``[B, Hh*Ww, h*w]`` float32 matrix:
  entry ``(i, j)`` is ``Q[i, j]`` for the super tokens ``j`` around pixel ``i``'s cell and 0
  elsewhere (pixels and super tokens row-major), so that :func:`super_token_upsample` is
  ``x' = A @ S``; its column-normalised transpose gives the super tokens ``S = A^T x /
  colsum(A)`` of :func:`super_token_association`."""
  s = _stoken_pair(stoken_size)
  B, h, w = Q.shape[:3]
  ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  idx = np.stack([(ys + dy) * w + (xs + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)], -1)
  sel = np.eye(h * w, dtype=np.float32)[np.clip(idx, 0, h * w - 1)]
  sel = sel * _neighbour_valid(h, w)[..., None]                        # [h, w, 9, M]
  a = jnp.einsum("bhwpj,hwjm->bhwpm", Q.astype(jnp.float32), jnp.asarray(sel),
                 precision=jax.lax.Precision.HIGHEST)
  return _from_cells(a, s, h * s[0], w * s[1]).reshape(B, h * w * s[0] * s[1], h * w)


def _stoken_pair(stoken_size):
  vals = tuple(stoken_size) if isinstance(stoken_size, (tuple, list)) else (stoken_size,) * 2
  if len(vals) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0
                           for v in vals):
    raise ValueError(f"stoken_size must be a positive int or a pair, got {stoken_size!r}")
  return int(vals[0]), int(vals[1])


def super_token_association(x, *, stoken_size, num_iters=1, scale=None):
  """Super Token Attention's sparse association (SViT, "Vision Transformer with Super
  Token Sampling", Huang et al., 2023).

  Super tokens start as the ``s x s`` grid means of ``x``. Each token ``i`` (in cell ``c``)
  is associated with the 9 super tokens around ``c`` (map border: fewer); ``num_iters``
  times::

    Q[i, j] = softmax_{j in N(c)}(scale * x_i . S_j)      (association, 9 neighbours)
    S_j     = sum_i Q[i, j] x_i / sum_i Q[i, j]           (column-normalised update)

  Args:
    x: ``[B, Hh, Ww, C]`` with ``stoken_size`` dividing ``(Hh, Ww)``.
    stoken_size: int or pair, the cell size ``s``.
    num_iters: association iterations (>= 1).
    scale: default ``1/sqrt(C)``.

  Returns: ``(S [B, h, w, C], Q [B, h, w, s*s, 9])`` with ``h = Hh/s``, ``w = Ww/s``; ``Q``
  is zero on neighbours outside the map.
  """
  _rank("x", x, 4, "a token map [B, Hh, Ww, C]")
  s = _stoken_pair(stoken_size)
  B, Hh, Ww, C = x.shape
  if Hh % s[0] or Ww % s[1]:
    raise ValueError(f"stoken_size={s} must divide the map (Hh, Ww)={(Hh, Ww)}")
  if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
    raise ValueError(f"num_iters must be a positive int, got num_iters={num_iters!r}")
  sc = _scale(scale, C)
  xf = x.astype(jnp.float32)
  h, w = Hh // s[0], Ww // s[1]
  cells = _to_cells(xf, s)  # [B, h, w, s*s, C]
  valid = jnp.asarray(_neighbour_valid(h, w))[None, :, :, None, :]
  st = _grid_pool(xf, s)
  Q = None
  for _ in range(num_iters):
    nb = _neighbours(st)  # [B, h, w, 9, C]
    logits = jnp.einsum("bhwpc,bhwjc->bhwpj", cells, nb) * sc
    logits = jnp.where(valid, logits, -jnp.inf)
    Q = jax.nn.softmax(logits, axis=-1)
    Q = jnp.where(valid, Q, 0.0)
    num = _scatter_neighbours(jnp.einsum("bhwpj,bhwpc->bhwjc", Q, cells))
    den = _scatter_neighbours(jnp.sum(Q, axis=3)[..., None])
    st = num / jnp.maximum(den, 1e-12)

  def pool_map():  # attnjax.analysis: super tokens as queries, pixels as keys, S = P x
    a = jnp.swapaxes(super_token_weights(Q, s), 1, 2)
    return (a / jnp.maximum(jnp.sum(a, axis=-1, keepdims=True), 1e-12))[:, None]
  out = (st.astype(x.dtype), Q)
  return hooks.intercepted("pooling", lambda: out, None, None, None, probs=pool_map,
                           dims=(B, 1, h * w, Hh * Ww))


def _scatter_neighbours(contrib):
  """Adjoint of `_neighbours`: ``[B, h, w, 9, C]`` contributions -> ``[B, h, w, C]``."""
  B, h, w, _, C = contrib.shape
  out = jnp.zeros((B, h + 2, w + 2, C), contrib.dtype)
  j = 0
  for dy in range(3):
    for dx in range(3):
      out = out.at[:, dy:dy + h, dx:dx + w].add(contrib[:, :, :, j])
      j += 1
  return out[:, 1:h + 1, 1:w + 1]


def super_token_upsample(st, Q, *, stoken_size):
  """SViT's map back: ``x'_i = sum_{j in N(c)} Q[i, j] S_j``.

  Args: ``st [B, h, w, C]`` (super tokens after attention), ``Q [B, h, w, s*s, 9]`` from
  :func:`super_token_association`. Returns ``[B, h*s, w*s, C]`` in the dtype of ``st``.
  """
  _rank("st", st, 4, "[B, h, w, C]")
  s = _stoken_pair(stoken_size)
  B, h, w, C = st.shape
  if Q.shape != (B, h, w, s[0] * s[1], 9):
    raise ValueError(f"Q must be [B, h, w, s*s, 9] = {(B, h, w, s[0] * s[1], 9)}, got shape "
                     f"{Q.shape}")
  nb = _neighbours(st.astype(jnp.float32))
  cells = jnp.einsum("bhwpj,bhwjc->bhwpc", Q.astype(jnp.float32), nb)
  out = _from_cells(cells, s, h * s[0], w * s[1]).astype(st.dtype)
  # attnjax.analysis: pixels as queries, super tokens as keys, x' = A S
  return hooks.intercepted("pooling", lambda: out, None, None, None,
                           probs=lambda: super_token_weights(Q, s)[:, None],
                           dims=(B, 1, h * w * s[0] * s[1], h * w))


# ----------------------------------------------------------------------------- proxy tokens

def proxy_indices(key, batch, num_windows, window_tokens):
  """One random token index per window (PT-DiT's proxy sampling): int ``[B, num_windows]``
  in ``[0, window_tokens)``; a fixed choice (the window centre) when ``key`` is None."""
  if key is None:
    return jnp.full((batch, num_windows), window_tokens // 2, jnp.int32)
  return jax.random.randint(key, (batch, num_windows), 0, window_tokens)


def proxy_token_attention(q, k, v, *, window_tokens, index, proxy_fn=None, scale=None,
                          implementation=None):
  """Proxy-token global attention (PT-DiT / Qihoo-T2X: "Qihoo-T2X: An Efficiency-Focused
  Diffusion Transformer via Proxy Tokens for Text-to-Any-Task").

  The ``S`` tokens (already ordered window by window, ``window_tokens`` per window) give
  one proxy per window (``index [B, S / window_tokens]``, the token picked in each window).
  The proxies' ``q, k, v`` self-attend; ``proxy_fn`` (or the identity) maps that output to
  the proxies' new keys and values ``(k_p, v_p)``; every token then cross-attends to them::

    P   = softmax(scale * q_P . k_P^T) v_P              (self-attention among proxies)
    out = softmax(scale * q . k_P'^T) v_P'              (tokens <- proxies)

  With ``proxy_fn=None``, ``k_P' = k_P`` and ``v_P' = P``. The window / shifted-window
  attention of the paper for local detail is the existing 'swin' variant.

  Args: ``q [B, S, N, H]``, ``k [B, S, K, H]``, ``v [B, S, K, Hv]``.
  Returns: ``[B, S, N, Hv]`` in the dtype of ``q``.
  """
  _check_qkv(q, k, v)
  B, S, N, H = q.shape
  if isinstance(window_tokens, bool) or not isinstance(window_tokens, int) or window_tokens < 1 \
      or S % window_tokens:
    raise ValueError(f"window_tokens must be a positive divisor of S={S}, got "
                     f"window_tokens={window_tokens!r}")
  W = S // window_tokens
  if index.shape != (B, W):
    raise ValueError(f"index must be [B, S / window_tokens] = {(B, W)}, got shape {index.shape}")
  pos = (jnp.arange(W)[None, :] * window_tokens + index).astype(jnp.int32)  # [B, W]
  take = lambda a: jnp.take_along_axis(a, pos[:, :, None, None], axis=1)
  qp, kp, vp = take(q), take(k), take(v)
  s = _scale(scale, H)
  P = hooks.attention(qp, kp, vp, scale=s, implementation=implementation)
  if proxy_fn is None:
    if k.shape[2] != N:
      raise ValueError("proxy_token_attention without proxy_fn needs k with N heads (the "
                       "proxies' attention output is their new value)")
    k2, v2 = kp, P.astype(v.dtype)
  else:
    k2, v2 = proxy_fn(P)
  return hooks.attention(q, k2, v2, scale=s, implementation=implementation).astype(q.dtype)


# ----------------------------------------------------------------------------- sinks (VAR)

def sink_redistributed_attention(q, k, v, *, sink_mask, target_mask, p=0.6, heads=None,
                                 scale=None, causal=False):
  """Visual-sink-aware attention redistribution (VAR).

  Paper: "See What You Are Told: Visual Attention Sink in Large Multimodal Models" (Kang
  et al., 2025). After the softmax ``a [B, N, T, S]``, in the selected heads (``heads``,
  bool ``[N]``, or all), a fraction ``p`` of the mass on the sink tokens is taken away and
  redistributed over the non-sink target (image) tokens in proportion to their weights::

    budget_t = p * sum_{j in sink} a_tj
    a'_tj    = (1 - p) a_tj                                  j in sink
    a'_tj    = a_tj + budget_t * a_tj / sum_{j' in T\\sink} a_tj'   j in target \\ sink
    out_t    = sum_j a'_tj v_j

  Rows with no non-sink target weight are left unchanged. The edit needs the
  probabilities, so this op forms ``[B, N, T, S]`` (training-free, inference use).

  Args:
    q ``[B, T, N, H]``, k ``[B, S, K, H]``, v ``[B, S, K, Hv]``.
    sink_mask, target_mask: bool ``[B, S]`` (sink tokens; image tokens receiving mass).
    p: fraction in ``[0, 1]``.
    causal: causal mask (``T == S``).

  Returns: ``[B, T, N, Hv]`` in the dtype of ``q``.
  """
  _check_qkv(q, k, v)
  B, T, N, H = q.shape
  S = k.shape[1]
  if not 0.0 <= float(p) <= 1.0:
    raise ValueError(f"p must be in [0, 1], got p={p!r}")
  for name, m in (("sink_mask", sink_mask), ("target_mask", target_mask)):
    if getattr(m, "shape", None) != (B, S):
      raise ValueError(f"{name} must be bool [B, S] = {(B, S)}, got shape "
                       f"{getattr(m, 'shape', None)}")
  kf = _repeat_kv(k, N).astype(jnp.float32)
  vf = _repeat_kv(v, N).astype(jnp.float32)
  logits = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), kf) * _scale(scale, H)
  if causal:
    if T != S:
      raise ValueError(f"causal=True needs T == S, got T={T}, S={S}")
    logits = jnp.where(jnp.tril(jnp.ones((T, S), bool)), logits, -jnp.inf)
  a = jax.nn.softmax(logits, axis=-1)
  sink = jnp.asarray(sink_mask, bool)[:, None, None, :]
  recv = (jnp.asarray(target_mask, bool) & ~jnp.asarray(sink_mask, bool))[:, None, None, :]
  budget = p * jnp.sum(jnp.where(sink, a, 0.0), axis=-1, keepdims=True)
  rmass = jnp.sum(jnp.where(recv, a, 0.0), axis=-1, keepdims=True)
  ok = rmass > 0
  share = jnp.where(recv, a / jnp.where(ok, rmass, 1.0), 0.0)
  new = jnp.where(sink, (1.0 - p) * a, a) + budget * share
  new = jnp.where(ok, new, a)
  if heads is not None:
    heads = jnp.asarray(heads, bool)
    if heads.shape == (N,):
      heads = heads[None, :, None]
    elif heads.shape != (B, N, T):
      raise ValueError(f"heads must be bool [N] = [{N}] or [B, N, T] = {(B, N, T)}, got shape "
                       f"{heads.shape}")
    new = jnp.where(heads[..., None], new, a)
  return jnp.einsum("bnts,bsnh->btnh", new, vf).astype(q.dtype)


def visual_sink_mask(hidden, sink_dims, *, tau=20.0):
  """VAR's visual sink tokens: ``max_{d in sink_dims} |hidden[b, j, d]| >= tau``.

  ``hidden [B, S, D]`` are the (RMS-normalised) hidden states entering a layer,
  ``sink_dims`` the few fixed "sink dimensions" of the base language model, ``tau`` the
  paper's threshold (20). Returns bool ``[B, S]``."""
  _rank("hidden", hidden, 3, "[B, S, D]")
  dims = np.asarray(sink_dims, np.int64).reshape(-1)
  if dims.size == 0 or dims.min() < 0 or dims.max() >= hidden.shape[-1]:
    raise ValueError(f"sink_dims must be indices in [0, D={hidden.shape[-1]}), got {sink_dims!r}")
  return jnp.max(jnp.abs(hidden[..., dims].astype(jnp.float32)), axis=-1) >= tau


def image_centric_heads(q, k, *, sink_mask, target_mask, rho=0.6, scale=None, causal=False):
  """VAR's head selection: the visual non-sink ratio
  ``r[b, h, t] = sum_{j in target, not sink} a_tj / sum_{j in target} a_tj`` and the
  selection ``r >= rho`` (bool ``[B, N, T]``, usable as ``heads`` of
  :func:`sink_redistributed_attention`). Rows with no target weight are not selected."""
  _rank("q", q, 4, "[B, T, N, H]")
  _rank("k", k, 4, "[B, S, K, H]")
  B, T, N, H = q.shape
  kf = _repeat_kv(k, N).astype(jnp.float32)
  logits = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), kf) * _scale(scale, H)
  if causal:
    logits = jnp.where(jnp.tril(jnp.ones((T, k.shape[1]), bool)), logits, -jnp.inf)
  a = jax.nn.softmax(logits, axis=-1)
  tgt = jnp.asarray(target_mask, bool)[:, None, None, :]
  recv = tgt & ~jnp.asarray(sink_mask, bool)[:, None, None, :]
  tot = jnp.sum(jnp.where(tgt, a, 0.0), -1)
  r = jnp.sum(jnp.where(recv, a, 0.0), -1) / jnp.where(tot > 0, tot, 1.0)
  return (r >= rho) & (tot > 0)
