"""Flow-Attention: "Flowformer: Linearizing Transformers with Conservation Flows",
non-causal or causal (the paper's causal version, prefix-sum flows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.ops.linear._args import (
  _F32,
  DEFAULT_BLOCK_LEN,
  DEFAULT_EPS,
  _check_state_array,
  prepare,
)
from attnjax.ops.linear._core import _einsum, _in_blocks, _ungroup, dispatched

# --------------------------------------------------------------------------------------
# Flow-Attention (Flowformer)
# --------------------------------------------------------------------------------------


def _prefix_sum(x, chunk_size):
  """Inclusive prefix sums of ``x [B, T, ...]`` over axis 1, float32, in O(T * chunk_size):
  inside a chunk a lower-triangular (masked) sum, across chunks a ``lax.scan`` of totals."""
  B, T = x.shape[:2]
  C = min(chunk_size, T)
  nc = -(-T // C)
  xc = jnp.pad(x.astype(_F32), [(0, 0), (0, nc * C - T)] + [(0, 0)] * (x.ndim - 2))
  xc = xc.reshape(B, nc, C, -1)
  within = jnp.einsum('ij,bnjd->bnid', jnp.tril(jnp.ones((C, C), _F32)), xc,
                      precision=jax.lax.Precision.HIGHEST)
  _, before = jax.lax.scan(lambda tot, t: (tot + t, tot), jnp.zeros((B, xc.shape[-1]), _F32),
                           jnp.moveaxis(jnp.sum(xc, axis=2), 1, 0))
  out = within + jnp.moveaxis(before, 0, 1)[:, :, None]
  return out.reshape((B, nc * C) + x.shape[2:])[:, :T]


def _causal_product(q, k, w, kv0, chunk_size):
  """``o_i = q_i . (kv0 + sum_{j<=i} k_j w_j^T)`` chunked; per-query-head values ``w``.

  q ``[B,T,K,G,F]``, k ``[B,T,K,F]``, w ``[B,T,K,G,V]``, kv0 ``[B,K,G,F,V]`` ->
  (o ``[B,T,K,G,V]`` f32, kv ``[B,K,G,F,V]``).
  """
  B, T = q.shape[:2]
  C = min(chunk_size, T)
  nc = -(-T // C)

  def chunks(x):
    x = jnp.pad(x, [(0, 0), (0, nc * C - T)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape((B, nc, C) + x.shape[2:])
  qc, kc, wc = chunks(q), chunks(k), chunks(w)
  s = jnp.where(jnp.tril(jnp.ones((C, C), bool)), _einsum('bnikgf,bnjkf->bnkgij', qc, kc), 0.0)
  o = _einsum('bnkgij,bnjkgv->bnikgv', s, wc)
  kv = _einsum('bnjkf,bnjkgv->nbkgfv', kc, wc)
  kv_end, kv_before = jax.lax.scan(lambda acc, x: (acc + x, acc), kv0, kv)
  o = o + _einsum('bnikgf,nbkgfv->bnikgv', qc, kv_before)
  return o.reshape((B, nc * C) + o.shape[3:])[:, :T], kv_end


def _flow_state(state, B, N, K, H, Hv):
  names = ('ksum [B, K, H]', 'qsum [B, N, H]', 'kosum [B, N, H]', 'qisum [B, N, H]',
           'esum [B, N]', 'kv [B, N, H, Hv]', 'count [B]')
  shapes = ((B, K, H), (B, N, H), (B, N, H), (B, N, H), (B, N), (B, N, H, Hv), (B,))
  if state is None:
    return tuple(jnp.zeros(sh, _F32) for sh in shapes)
  if not isinstance(state, (tuple, list)) or len(state) != 7:
    raise ValueError(f'state of causal flow_attention must be a 7-tuple ({", ".join(names)})')
  return tuple(_check_state_array(x, sh, f'state[{i}] ({n.split()[0]})')
               for i, (x, sh, n) in enumerate(zip(state, shapes, names)))


def _flow_causal(q, k, v, state, *, form, chunk_size, eps, clamp):
  """Causal Flow-Attention on BTNH inputs; see :func:`flow_attention` for the formula."""
  B, T, N, H = q.shape
  K = k.shape[2]
  G = N // K
  ksum0, qsum0, kosum0, qisum0, esum0, kv0, n0 = state
  Q = jax.nn.sigmoid(q.astype(_F32)).reshape(B, T, K, G, H)
  Kf = jax.nn.sigmoid(k.astype(_F32))                                   # [B, T, K, H]
  v32 = v.astype(_F32)
  pos = n0[:, None] + jnp.arange(1, T + 1, dtype=_F32)[None]            # [B, T] global index
  pos_g = pos[:, :, None, None]
  g = lambda x: x.reshape(x.shape[:1] + (K, G) + x.shape[2:])           # [B, N, ...] -> grouped
  ug = lambda x: x.reshape(x.shape[:1] + (N,) + x.shape[3:])            # grouped -> [B, N, ...]

  if form == 'recurrent':
    def step(carry, x):
      ksum, qsum, kosum, qisum, esum, kv = carry
      q_t, k_t, v_t, p = x                                              # p [B]
      pk = p[:, None, None]
      ksum = ksum + k_t
      qsum = qsum + q_t
      inc = jnp.sum((q_t + eps) * (ksum[:, :, None] + eps), -1)         # [B, K, G]
      out = jnp.sum((k_t[:, :, None] + eps) * (qsum + eps), -1)
      kosum = kosum + k_t[:, :, None] * (pk / out)[..., None]
      qisum = qisum + q_t * (pk / inc)[..., None]
      inc_c = jnp.sum((q_t + eps) * (kosum + eps), -1) / pk
      out_c = jnp.clip(jnp.sum((k_t[:, :, None] + eps) * (qisum + eps), -1) / pk, -clamp, clamp)
      e = jnp.exp(out_c)
      esum = esum + e
      comp = pk * e / esum
      kv = kv + _einsum('bkf,bkgv->bkgfv', k_t, comp[..., None] * v_t[:, :, None])
      o_t = (jax.nn.sigmoid(inc_c) / inc)[..., None] * _einsum('bkgf,bkgfv->bkgv', q_t, kv)
      return (ksum, qsum, kosum, qisum, esum, kv), o_t

    carry0 = (ksum0, g(qsum0), g(kosum0), g(qisum0), g(esum0), g(kv0))
    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (Q, Kf, v32, pos))
    (ksum, qsum, kosum, qisum, esum, kv), o = jax.lax.scan(step, carry0, xs)
    o = jnp.moveaxis(o, 0, 1)
  else:
    if form == 'quadratic':
      tril = jnp.tril(jnp.ones((T, T), _F32))
      prefix = lambda x: jnp.einsum('tj,bj...->bt...', tril, x.astype(_F32),
                                    precision=jax.lax.Precision.HIGHEST)
    else:
      prefix = lambda x: _prefix_sum(x, chunk_size)
    ksum_t = ksum0[:, None] + prefix(Kf)                                # [B, T, K, H]
    qsum_t = g(qsum0)[:, None] + prefix(Q)                              # [B, T, K, G, H]
    inc = jnp.sum((Q + eps) * (ksum_t[:, :, :, None] + eps), -1)        # [B, T, K, G]
    out = jnp.sum((Kf[:, :, :, None] + eps) * (qsum_t + eps), -1)
    kosum_t = g(kosum0)[:, None] + prefix(Kf[:, :, :, None] * (pos_g / out)[..., None])
    qisum_t = g(qisum0)[:, None] + prefix(Q * (pos_g / inc)[..., None])
    inc_c = jnp.sum((Q + eps) * (kosum_t + eps), -1) / pos_g
    out_c = jnp.clip(jnp.sum((Kf[:, :, :, None] + eps) * (qisum_t + eps), -1) / pos_g,
                     -clamp, clamp)
    e = jnp.exp(out_c)
    esum_t = g(esum0)[:, None] + prefix(e)
    w = (pos_g * e / esum_t)[..., None] * v32[:, :, :, None]           # competition: [B,T,K,G,Hv]
    if form == 'quadratic':
      m = jnp.where(tril > 0, _einsum('btkgf,bjkf->bkgtj', Q, Kf), 0.0)  # the causal flow matrix
      o = _einsum('bkgtj,bjkgv->btkgv', m, w) + _einsum('btkgf,bkgfv->btkgv', Q, g(kv0))
      kv = g(kv0) + _einsum('btkf,btkgv->bkgfv', Kf, w)
    else:
      o, kv = _causal_product(Q, Kf, w, g(kv0), chunk_size)
    o = (jax.nn.sigmoid(inc_c) / inc)[..., None] * o
    ksum, qsum, kosum, qisum, esum = (ksum_t[:, -1], qsum_t[:, -1], kosum_t[:, -1],
                                      qisum_t[:, -1], esum_t[:, -1])
  new_state = (ksum, ug(qsum), ug(kosum), ug(qisum), ug(esum), ug(kv), n0 + T)
  return _ungroup(o), new_state


@dispatched  # observable by attnjax.analysis
def flow_attention(q, k, v, *, causal: bool = False, form: str = 'chunked',
                   chunk_size: int = 64, state=None, return_state: bool = False,
                   eps: float = DEFAULT_EPS, clamp: float = 1.0,
                   block_len: int | None = DEFAULT_BLOCK_LEN):
  """Flow-Attention: attention normalised by flow conservation, non-causal or causal.

  "Flowformer: Linearizing Transformers with Conservation Flows".

  With ``phi = sigmoid``, ``Q_i = phi(q_i)``, ``K_j = phi(k_j)`` and the flow matrix
  ``M_ij = Q_i . K_j`` (never materialised in the chunked form), per query head:

  Non-causal (``causal=False``): incoming ``I_i = sum_j M_ij + eps``; outgoing
  ``O_j = sum_i M_ij + eps``; conserved incoming ``Ic_i = sum_j M_ij / O_j``; conserved
  outgoing ``Oc_j = sum_i M_ij / I_i``; competition ``Vc = softmax_j(Oc) * S * V``;
  aggregation ``R_i = sum_j M_ij Vc_j / I_i``; allocation ``out_i = R_i * sigmoid(Ic_i * T / S)``.

  Causal (``causal=True``, the paper's causal version; every sum over the past is a prefix
  sum, and the "number of sources/sinks" of a position is its 1-based index ``p``, counted
  from the start of the sequence including tokens carried in ``state``). With
  ``x + eps`` adding ``eps`` to every feature:

  - incoming ``I_i = (Q_i + eps) . (sum_{j<=i} K_j + eps)``,
    outgoing ``O_j = (K_j + eps) . (sum_{i<=j} Q_i + eps)``;
  - conserved incoming ``Ic_i = (Q_i + eps) . (sum_{j<=i} K_j p_j / O_j + eps) / p_i``,
    conserved outgoing ``Oc_j = clip((K_j + eps) . (sum_{i<=j} Q_i p_i / I_i + eps) / p_j,
    -clamp, clamp)``;
  - competition (a causal softmax over the prefix, times the count):
    ``c_j = p_j exp(Oc_j) / sum_{l<=j} exp(Oc_l)``;
  - aggregation and allocation: ``out_i = sigmoid(Ic_i) / I_i * sum_{j<=i} M_ij c_j V_j``.

  Args:
    q: ``[B, T, N, H]``. k: ``[B, S, K, H]``. v: ``[B, S, K, Hv]`` (``S == T`` when causal).
    causal: the causal version above.
    form: ``'chunked'`` (linear cost: chunked prefix sums and a chunked causal product),
      ``'recurrent'`` (causal only: a scan over tokens) or ``'quadratic'`` (``M`` and the
      prefix sums materialised as ``[T, T]`` products, for tests).
    chunk_size: chunk length of the causal chunked form.
    state: causal only; the 7-tuple ``(ksum [B, K, H], qsum [B, N, H], kosum [B, N, H],
      qisum [B, N, H], esum [B, N], kv [B, N, H, Hv], count [B])`` of float32 prefix sums
      over past tokens (``sum K``, ``sum Q``, ``sum K p / O``, ``sum Q p / I``,
      ``sum exp(Oc)``, ``sum K (c V)^T``, number of past tokens).
    return_state: causal only; also return the state after the last token.
    eps: added to the flows (non-causal) or to the feature vectors (causal); default 1e-6.
    clamp: causal only; bound on ``|Oc|`` before the exponential (default 1.0).
    block_len: as in :func:`linear_attention` (causal chunked form).

  Returns:
    ``[B, T, N, Hv]`` in ``v.dtype``, or ``(out, state)`` with ``return_state``.
  """
  a = prepare(q, k, v, causal=causal, form=form, chunk_size=chunk_size, eps=eps,
              block_len=block_len, state=state, return_state=return_state)
  B, T, N, H, S, K, Hv = a.B, a.T, a.N, a.H, a.S, a.K, a.Hv
  chunk_size, eps = a.chunk_size, a.eps
  if isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or not clamp > 0:
    raise ValueError(f'clamp must be a positive float, got {clamp!r}')
  G = N // K
  if causal:
    st0 = _flow_state(state, B, N, K, H, Hv)
    if a.use_blocks(True):
      step = lambda st, *x: flow_attention(
          *x, causal=True, chunk_size=chunk_size, state=st, return_state=True, eps=eps,
          clamp=clamp, block_len=None)
      o, st = _in_blocks(step, st0, (q, k, v), block_len=a.block_len)
    else:
      o, st = _flow_causal(q, k, v, st0, form=form, chunk_size=chunk_size, eps=eps,
                           clamp=float(clamp))
    o = o.astype(v.dtype)
    return (o, st) if return_state else o
  qs = jax.nn.sigmoid(q.astype(_F32)).reshape(B, T, K, G, H)
  ks = jax.nn.sigmoid(k.astype(_F32))
  v32 = v.astype(_F32)
  if form == 'quadratic':
    m = _einsum('btkgh,bskh->bkgts', qs, ks)
    inc = jnp.sum(m, axis=-1) + eps                                     # [B,K,G,T]
    out = jnp.sum(m, axis=-2) + eps                                     # [B,K,G,S]
    inc_c = jnp.sum(m / out[..., None, :], axis=-1)
    out_c = jnp.sum(m / inc[..., :, None], axis=-2)
    comp = jax.nn.softmax(out_c, axis=-1) * S                           # [B,K,G,S]
    r = _einsum('bkgts,bskv->bkgtv', m * comp[..., None, :], v32) / inc[..., None]
    o = r * jax.nn.sigmoid(inc_c * (T / S))[..., None]
    o = jnp.moveaxis(o, 3, 1)                                           # [B,T,K,G,Hv]
  else:
    sum_k = jnp.sum(ks, axis=1)                                         # [B,K,H]
    sum_q = jnp.sum(qs, axis=1)                                         # [B,K,G,H]
    inc = _einsum('btkgh,bkh->btkg', qs, sum_k) + eps
    out = _einsum('bskh,bkgh->bskg', ks, sum_q) + eps
    inc_c = _einsum('btkgh,bkgh->btkg', qs, _einsum('bskh,bskg->bkgh', ks, 1.0 / out))
    out_c = _einsum('bskh,bkgh->bskg', ks, _einsum('btkgh,btkg->bkgh', qs, 1.0 / inc))
    comp = jax.nn.softmax(out_c, axis=1) * S                            # [B,S,K,G]
    kv = _einsum('bskh,bskg,bskv->bkghv', ks, comp, v32)
    r = _einsum('btkgh,bkghv->btkgv', qs, kv) / inc[..., None]
    o = r * jax.nn.sigmoid(inc_c * (T / S))[..., None]
  return _ungroup(o).astype(v.dtype)
