"""Linear-attention family (catalog family D): kernelized, decayed and flow-normalised attention.

Every function takes the public BTNH layout: ``q [B, T, N, H]``, ``k [B, S, K, H]``,
``v [B, S, K, Hv]`` with ``N`` a multiple of ``K`` (grouped-query attention: query head ``n``
reads kv head ``n // (N // K)``; keys and values are never repeated in memory) and returns
``[B, T, N, Hv]`` in the dtype of ``v``. Causal mechanisms need ``S == T``.

Mechanisms (paper titles):

- :func:`linear_attention` -- generic kernelized linear attention with feature maps
  (``'elu+1'``, ``'relu'``, ``'identity'`` or a callable), causal or not.
  "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention".
- :func:`lightning_attention` -- causal, unnormalised, per-head decay; the tiled
  intra-block / inter-block computation of "Various Lengths, Constant Speed: Efficient
  Language Modeling with Lightning Attention" and "Lightning Attention-2: A Free Lunch for
  Handling Unlimited Sequence Lengths in Large Language Models".
- :func:`decayed_linear_attention` -- the general case: retention-style decayed linear
  attention with a constant (scalar or per-head) decay and/or a data-dependent per-token
  gate ``log_decay [B, T, N]``; optional feature map and normalisation.
  "Retentive Network: A Successor to Transformer for Large Language Models" (retention);
  "Gated Linear Attention Transformers with Hardware-Efficient Training" (gating).
- :func:`efficient_attention` -- "Efficient Attention: Attention with Linear Complexities"
  (Shen et al.), non-causal.
- :func:`focused_linear_attention` -- "FLatten Transformer: Vision Transformer using Focused
  Linear Attention" (focused feature map + depthwise-convolution rank restoration).
- :func:`inline_attention` -- "Bridging the Divide: Reconsidering Softmax and Linear
  Attention" (InLine: injective linear attention), causal or not.
- :func:`flow_attention` -- "Flowformer: Linearizing Transformers with Conservation Flows",
  non-causal.

Forms. Every causal mechanism has three forms selected by ``form=``:

- ``'chunked'`` (training): the sequence is cut into chunks of ``chunk_size`` tokens; inside
  a chunk the masked (decayed) ``q k^T`` product is materialised (``chunk_size^2`` per
  chunk), across chunks a ``[F, Hv]`` state carries the past (``lax.scan`` over chunks).
  O(T) memory and time; ``T`` need not be a multiple of ``chunk_size``.
- ``'recurrent'`` (decoding): a ``lax.scan`` over tokens of ``S_t = lambda_t S_{t-1} +
  phi(k_t) v_t^T``, ``o_t = phi(q_t) S_t``; accepts one token or a block.
- ``'quadratic'`` (tests): the ``[T, T]`` weight matrix is materialised.

All three accept ``state=`` (the state after a previous call) and, with
``return_state=True``, return ``(out, new_state)``; they agree to float32 precision,
forward and backward. Non-causal mechanisms accept ``form='chunked'`` (the linear-cost
``phi(Q) (phi(K)^T V)`` path) and ``form='quadratic'``.

Numerics: logits, decays and states are float32 whatever the input dtype; decays are
handled in log space (``exp`` of differences of cumulative log-decays, every exponent
``<= 0``), never by dividing by a decay. Normalised forms divide by ``den + eps`` (``den - eps``
when ``den < 0``), so the denominator is never zero.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
FeatureMap = str | Callable[[Array], Array]

FORMS = ('chunked', 'recurrent', 'quadratic')
IMPLEMENTATIONS = ('xla', 'pallas_tpu', 'pallas_gpu')
DEFAULT_EPS = 1e-6
_F32 = jnp.float32


# --------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------


def _elu_plus_one(x):
  return jax.nn.elu(x) + 1.0


def _identity(x):
  return x


FEATURE_MAPS: dict[str, Callable[[Array], Array]] = {
    'elu+1': _elu_plus_one,
    'relu': jax.nn.relu,
    'identity': _identity,
}


def _resolve_feature_map(feature_map: FeatureMap) -> Callable[[Array], Array]:
  if callable(feature_map):
    return feature_map
  if isinstance(feature_map, str) and feature_map in FEATURE_MAPS:
    return FEATURE_MAPS[feature_map]
  raise ValueError(
      f'feature_map must be one of {sorted(FEATURE_MAPS)} or a callable, got {feature_map!r}')


def _apply_feature_map(phi, x, name):
  """Applies phi in float32 and casts back to the input dtype."""
  y = phi(x.astype(_F32))
  if not isinstance(y, jax.Array) or y.ndim != x.ndim or y.shape[:-1] != x.shape[:-1]:
    raise ValueError(
        f'feature_map must map {name} of shape {x.shape} to an array of shape '
        f'{x.shape[:-1]} + (F,), got {getattr(y, "shape", type(y))}')
  return y.astype(x.dtype)


def _check_qkv(q, k, v, *, causal: bool):
  for name, x in (('q', q), ('k', k), ('v', v)):
    if not hasattr(x, 'ndim') or x.ndim != 4:
      raise ValueError(f'{name} must have rank 4 (BTNH layout), got shape '
                       f'{getattr(x, "shape", type(x))}')
  B, T, N, H = q.shape
  Bk, S, K, Hk = k.shape
  Bv, Sv, Kv, Hv = v.shape
  if Bk != B or Bv != B:
    raise ValueError(f'batch sizes differ: q {B}, k {Bk}, v {Bv}')
  if Hk != H:
    raise ValueError(f'k head dim must equal q head dim H={H}, got {Hk}')
  if Sv != S or Kv != K:
    raise ValueError(f'v must have shape [B, S={S}, K={K}, Hv], got {v.shape}')
  if K == 0 or N % K:
    raise ValueError(f'number of query heads N={N} must be a multiple of kv heads K={K}')
  if causal and S != T:
    raise ValueError(f'causal attention needs key length S equal to query length T={T}, got {S}')
  for name, x in (('q', q), ('k', k), ('v', v)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f'{name} must be a floating array, got dtype {x.dtype}')
  return B, T, N, H, S, K, Hv


def _check_form(form, causal: bool):
  if form not in FORMS:
    raise ValueError(f'form must be one of {FORMS}, got {form!r}')
  if not causal and form == 'recurrent':
    raise ValueError("form='recurrent' needs causal=True (a non-causal output depends on "
                     "every key); use form='chunked' or 'quadratic'")


def _check_chunk_size(chunk_size):
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f'chunk_size must be a positive int, got {chunk_size!r}')
  return int(chunk_size)


def _check_eps(eps):
  if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
    raise ValueError(f'eps must be a positive float, got {eps!r}')
  return float(eps)


def _check_implementation(implementation, form):
  if implementation is None:
    implementation = 'xla'
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}')
  if implementation != 'xla' and form != 'chunked':
    raise ValueError(f"implementation={implementation!r} serves form='chunked' only, got {form!r}")
  return implementation


def _check_state_array(x, shape, name):
  if not hasattr(x, 'shape') or tuple(x.shape) != tuple(shape):
    raise ValueError(f'{name} must have shape {tuple(shape)}, got {getattr(x, "shape", type(x))}')
  return x.astype(_F32)


def _safe_div(num, den, eps):
  """num / (den + eps * sign(den)) with sign(0) = +1: |denominator| >= eps, never zero."""
  return num / jnp.where(den >= 0, den + eps, den - eps)


# --------------------------------------------------------------------------------------
# The causal core: o_i = sum_{j<=i} exp(A_i - A_j) (q_i . k_j) v_j  (+ state terms)
#
# Shapes inside the core (letters): q [B, T, K, Gs, Gq, F], k [B, T, K, F], v [B, T, K, V],
# a (per-token log-decay) [Ba, T, K, Gs] with Ba in {1, B}, state [B, K, Gs, F, V].
# Gs is 1 when the state is shared by the G = N // K query heads of a kv head, else G
# (then Gq = 1). A_i is the inclusive cumulative sum of a.
# --------------------------------------------------------------------------------------


def _einsum(spec, *xs):
  return jnp.einsum(spec, *xs, preferred_element_type=_F32)


def _masked_exp(diff, mask):
  """exp(diff) where mask else 0, with zero (not NaN) gradients on masked entries."""
  return jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)


def _core_quadratic(q, k, v, a, state):
  T = q.shape[1]
  A = jnp.cumsum(a, axis=1)                                      # [Ba, T, K, Gs]
  A_kst = jnp.moveaxis(A, 1, -1)                                 # [Ba, K, Gs, T]
  causal = jnp.tril(jnp.ones((T, T), bool))
  decay = _masked_exp(A_kst[..., :, None] - A_kst[..., None, :], causal)  # [Ba,K,Gs,T,T]
  s = _einsum('btksqf,bjkf->bksqtj', q, k)
  w = s * decay[:, :, :, None]
  o = _einsum('bksqtj,bjkv->btksqv', w.astype(v.dtype) if v.dtype != _F32 else w, v)
  o = o + _einsum('btksqf,bksfv->btksqv', q.astype(_F32) * jnp.exp(A)[..., None, None], state)
  A_last = A[:, -1]                                              # [Ba, K, Gs]
  kdec = jnp.exp(A_last[:, None] - A)                            # [Ba, T, K, Gs]
  new_state = (jnp.exp(A_last)[..., None, None] * state
               + _einsum('btks,btkf,btkv->bksfv', kdec, k.astype(_F32), v.astype(_F32)))
  return o, new_state


def _core_recurrent(q, k, v, a, state):
  B = q.shape[0]
  a = jnp.broadcast_to(a, (B,) + a.shape[1:])
  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, a))

  def step(S, x):
    q_t, k_t, v_t, a_t = x                                       # [B,K,Gs,Gq,F],[B,K,F],[B,K,V],[B,K,Gs]
    S = (jnp.exp(a_t)[..., None, None] * S
         + _einsum('bkf,bkv->bkfv', k_t.astype(_F32), v_t.astype(_F32))[:, :, None])
    o_t = _einsum('bksqf,bksfv->bksqv', q_t.astype(_F32), S)
    return S, o_t

  new_state, o = jax.lax.scan(step, state, xs)
  return jnp.moveaxis(o, 0, 1), new_state


def _core_chunked(q, k, v, a, state, chunk_size):
  B, T = q.shape[:2]
  C = min(chunk_size, T)
  nc = -(-T // C)
  pad = nc * C - T
  if pad:
    # Padding sits after the last real token: zero keys/values add nothing to the state and
    # a zero log-decay leaves it untouched, so outputs and the final state are exact.
    def _pad(x):
      return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    q, k, v, a = _pad(q), _pad(k), _pad(v), _pad(a)
  Ba = a.shape[0]
  qc = q.reshape((B, nc, C) + q.shape[2:])                      # [B,n,C,K,Gs,Gq,F]
  kc = k.reshape((B, nc, C) + k.shape[2:])                      # [B,n,C,K,F]
  vc = v.reshape((B, nc, C) + v.shape[2:])                      # [B,n,C,K,V]
  A = jnp.cumsum(a.reshape((Ba, nc, C) + a.shape[2:]), axis=2)  # [Ba,n,C,K,Gs]
  A_t = jnp.moveaxis(A, 2, -1)                                  # [Ba,n,K,Gs,C]
  causal = jnp.tril(jnp.ones((C, C), bool))
  decay = _masked_exp(A_t[..., :, None] - A_t[..., None, :], causal)    # [Ba,n,K,Gs,C,C]
  # intra-chunk: masked, decayed q k^T inside each chunk
  s = _einsum('bniksqf,bnjkf->bnksqij', qc, kc) * decay[:, :, :, :, None]
  o = _einsum('bnksqij,bnjkv->bniksqv', s.astype(v.dtype) if v.dtype != _F32 else s, vc)
  # inter-chunk: state at each chunk start from a scan over chunk summaries
  A_last = A[:, :, -1]                                          # [Ba,n,K,Gs]
  kdec = jnp.exp(A_last[:, :, None] - A)                        # [Ba,n,C,K,Gs]
  kv = _einsum('bnjks,bnjkf,bnjkv->nbksfv', kdec, kc.astype(_F32), vc.astype(_F32))
  g = jnp.moveaxis(jnp.broadcast_to(jnp.exp(A_last), (B,) + A_last.shape[1:]), 1, 0)

  def step(S, x):
    g_c, kv_c = x
    return g_c[..., None, None] * S + kv_c, S

  new_state, S_prev = jax.lax.scan(step, state, (g, kv))       # S_prev [n,B,K,Gs,F,V]
  qdec = jnp.exp(A)[..., None, None]                             # [Ba,n,C,K,Gs,1,1]
  o = o + _einsum('bniksqf,nbksfv->bniksqv', qc.astype(_F32) * qdec, S_prev)
  o = o.reshape((B, nc * C) + o.shape[3:])[:, :T]
  return o, new_state


def _causal_core(q, k, v, a, state, *, form, chunk_size):
  if form == 'quadratic':
    return _core_quadratic(q, k, v, a, state)
  if form == 'recurrent':
    return _core_recurrent(q, k, v, a, state)
  return _core_chunked(q, k, v, a, state, chunk_size)


def _group_q(q, K, Gs):
  B, T, N, F = q.shape
  G = N // K
  return q.reshape(B, T, K, Gs, G // Gs, F)


def _ungroup(o):
  B, T = o.shape[:2]
  return o.reshape(B, T, -1, o.shape[-1])


def _kernel_core(q, k, v, log_decay_N, state, *, chunk_size, implementation):
  """Pallas chunk kernel for the stateless core; state terms are added here in XLA.

  q [B,T,N,F], k [B,T,K,F], v [B,T,K,V], log_decay_N [N] float32, state [B,N,F,V] float32.
  """
  if implementation == 'pallas_tpu':
    from attnjax.kernels.tpu import linear as kmod
  else:
    from attnjax.kernels.gpu import linear as kmod
  B, T, N, F = q.shape
  K = k.shape[2]
  G = N // K
  o = kmod.lightning_attention(q, k, v, log_decay_N, chunk_size=chunk_size).astype(_F32)
  pos = jnp.arange(1, T + 1, dtype=_F32)
  A = pos[:, None] * log_decay_N[None, :]                        # [T, N] cumulative log-decay
  o = o + _einsum('btnf,bnfv->btnv', q.astype(_F32) * jnp.exp(A)[None, :, :, None], state)
  kdec = jnp.exp(A[-1][None, :] - A).reshape(T, K, G)            # [T, K, G]
  kv = _einsum('tkg,btkf,btkv->bkgfv', kdec, k.astype(_F32), v.astype(_F32))
  new_state = jnp.exp(A[-1])[None, :, None, None] * state + kv.reshape(B, N, F, -1)
  return o, new_state


# --------------------------------------------------------------------------------------
# Decay arguments
# --------------------------------------------------------------------------------------


def _is_concrete(x):
  try:
    np.asarray(x)
    return True
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return False


def _check_decay(decay, N):
  """Returns the per-head log-decay [N] float32 of a scalar or [N] decay in (0, 1]."""
  decay = jnp.asarray(decay)
  if not jnp.issubdtype(decay.dtype, jnp.floating):
    decay = decay.astype(_F32)
  if decay.ndim == 0:
    decay = jnp.broadcast_to(decay, (N,))
  if decay.shape != (N,):
    raise ValueError(f'decay must be a scalar or have shape (N,)=({N},), got {decay.shape}')
  if _is_concrete(decay):
    d = np.asarray(decay, np.float64)
    if not np.all((d > 0) & (d <= 1)):
      raise ValueError(f'decay must lie in (0, 1], got {d}')
  return jnp.log(decay.astype(_F32))


def _check_log_decay(log_decay, B, T, N):
  log_decay = jnp.asarray(log_decay)
  if log_decay.shape != (B, T, N):
    raise ValueError(f'log_decay must have shape (B, T, N)=({B}, {T}, {N}), got {log_decay.shape}')
  if _is_concrete(log_decay) and not np.all(np.asarray(log_decay) <= 0):
    raise ValueError('log_decay must be <= 0 everywhere (a decay in (0, 1])')
  return log_decay.astype(_F32)


# --------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------


def linear_attention(q, k, v, *, feature_map: FeatureMap = 'elu+1', causal: bool = False,
                     form: str = 'chunked', chunk_size: int = 64, state=None,
                     return_state: bool = False, normalize: bool = True,
                     eps: float = DEFAULT_EPS, implementation: str | None = 'xla'):
  """Kernelized linear attention.

  "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention".

  ``o_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)`` over allowed ``j``
  (``j <= i`` when ``causal``). No ``1/sqrt(H)`` scale (it cancels in the ratio). With
  ``normalize=False`` the numerator alone is returned. The denominator is guarded:
  ``den + eps`` (``den - eps`` if ``den < 0``), so a row whose weights are all zero (e.g.
  ``'relu'`` with a negative query) returns 0 with zero gradients.

  Args:
    q: ``[B, T, N, H]``. k: ``[B, S, K, H]``. v: ``[B, S, K, Hv]``; ``N % K == 0``.
    feature_map: ``'elu+1'``, ``'relu'``, ``'identity'`` or a callable ``[..., H] -> [..., F]``
      applied (in float32) to queries and keys.
    causal: ``j <= i`` (needs ``S == T``).
    form: ``'chunked'`` | ``'recurrent'`` (causal only) | ``'quadratic'``.
    chunk_size: chunk length of the chunked form (any ``T`` is accepted).
    state: causal only; the pair ``(S [B, K, F, Hv], z [B, K, F])`` float32 -- one state per
      **kv head**: ``S = sum_j phi(k_j) v_j^T``, ``z = sum_j phi(k_j)`` over past tokens.
    return_state: causal only; also return the state after the last token.
    normalize: divide by the denominator (default True).
    eps: denominator guard (default 1e-6).
    implementation: ``'xla'`` or, for the causal chunked form, ``'pallas_tpu'`` /
      ``'pallas_gpu'`` (Pallas chunk kernel; interpret mode on CPU).

  Returns:
    ``[B, T, N, Hv]`` in ``v.dtype``, or ``(out, (S, z))`` with ``return_state``.
  """
  phi = _resolve_feature_map(feature_map)
  B, T, N, H, S_len, K, Hv = _check_qkv(q, k, v, causal=causal)
  _check_form(form, causal)
  chunk_size = _check_chunk_size(chunk_size)
  eps = _check_eps(eps)
  implementation = _check_implementation(implementation, form)
  if not causal and (state is not None or return_state):
    raise ValueError('state and return_state need causal=True')
  if not causal and implementation != 'xla':
    raise ValueError(f'implementation={implementation!r} serves causal=True only')
  qf = _apply_feature_map(phi, q, 'q')
  kf = _apply_feature_map(phi, k, 'k')
  F = qf.shape[-1]
  if kf.shape[-1] != F:
    raise ValueError(f'feature_map gave F={F} for q but {kf.shape[-1]} for k')
  G = N // K
  if normalize:
    v_aug = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
  else:
    v_aug = v
  V = v_aug.shape[-1]

  if not causal:
    qg = qf.reshape(B, T, K, G, F)
    if form == 'quadratic':
      s = _einsum('btkgf,bskf->bkgts', qg, kf)
      o = _einsum('bkgts,bskv->btkgv', s, v_aug.astype(_F32))
    else:
      kv = _einsum('bskf,bskv->bkfv', kf, v_aug)
      o = _einsum('btkgf,bkfv->btkgv', qg, kv)
    o = _ungroup(o)
    if normalize:
      o = _safe_div(o[..., :Hv], o[..., Hv:], eps)
    return o.astype(v.dtype)

  if state is None:
    S0 = jnp.zeros((B, K, F, Hv), _F32)
    z0 = jnp.zeros((B, K, F), _F32)
  else:
    if not isinstance(state, (tuple, list)) or len(state) != 2:
      raise ValueError('state of linear_attention must be a pair (S [B, K, F, Hv], z [B, K, F])')
    S0 = _check_state_array(state[0], (B, K, F, Hv), 'state[0] (S)')
    z0 = _check_state_array(state[1], (B, K, F), 'state[1] (z)')
  st = jnp.concatenate([S0, z0[..., None]], axis=-1) if normalize else S0

  if implementation != 'xla':
    st_N = jnp.repeat(st, G, axis=1)
    o, new_st = _kernel_core(qf, kf, v_aug, jnp.zeros((N,), _F32), st_N,
                             chunk_size=chunk_size, implementation=implementation)
    new_st = new_st.reshape(B, K, G, F, V)[:, :, 0]
    # With no decay the G copies of a kv head's state are identical.
  else:
    a = jnp.zeros((1, T, K, 1), _F32)
    o, new_st = _causal_core(_group_q(qf, K, 1), kf, v_aug, a, st[:, :, None],
                             form=form, chunk_size=chunk_size)
    o = _ungroup(o)
    new_st = new_st[:, :, 0]
  if normalize:
    o = _safe_div(o[..., :Hv], o[..., Hv:], eps)
  o = o.astype(v.dtype)
  if not return_state:
    return o
  if normalize:
    return o, (new_st[..., :Hv], new_st[..., Hv])
  return o, (new_st, z0 + jnp.sum(kf.astype(_F32), axis=1))


def decayed_linear_attention(q, k, v, *, decay=None, log_decay=None,
                             feature_map: FeatureMap = 'identity', normalize: bool = False,
                             form: str = 'chunked', chunk_size: int = 64, state=None,
                             return_state: bool = False, eps: float = DEFAULT_EPS,
                             implementation: str | None = 'xla'):
  """Causal decayed (retention-style) linear attention, optionally gated.

  "Retentive Network: A Successor to Transformer for Large Language Models" (constant
  per-head decay); "Gated Linear Attention Transformers with Hardware-Efficient Training"
  (data-dependent gating of the decay).

  ``o_i = sum_{j<=i} D_ij phi(q_i).phi(k_j) v_j`` with
  ``D_ij = lambda_n^(i-j) * exp(sum_{l=j+1..i} log_decay[l, n])``; with ``normalize`` the
  result is divided by ``sum_{j<=i} D_ij phi(q_i).phi(k_j)`` (guarded by ``eps``).
  Recurrence: ``S_t = lambda_n exp(log_decay[t, n]) S_{t-1} + phi(k_t) v_t^T``,
  ``o_t = phi(q_t) S_t``. No scale is applied (pre-scale ``q`` if wanted).

  Args:
    q: ``[B, T, N, H]``. k: ``[B, T, K, H]``. v: ``[B, T, K, Hv]``.
    decay: ``None``, a scalar or ``[N]``: constant per-head decay ``lambda`` in (0, 1]
      (checked when concrete).
    log_decay: ``None`` or ``[B, T, N]`` float, ``<= 0``: the per-token gate.
    feature_map: as in :func:`linear_attention` (default ``'identity'``).
    normalize: divide by the decayed denominator.
    form, chunk_size, eps: as in :func:`linear_attention`.
    state: ``S [B, N, F, Hv]`` float32 (one state per **query head**, decays differ per
      head), or with ``normalize`` the pair ``(S, z [B, N, F])``.
    return_state: also return the state after the last token.
    implementation: ``'xla'``; ``'pallas_tpu'`` / ``'pallas_gpu'`` serve the chunked form
      with a constant decay (no ``log_decay``), raising ``NotImplementedError`` otherwise.

  Returns:
    ``[B, T, N, Hv]`` in ``v.dtype``, or ``(out, state)`` with ``return_state``.
  """
  phi = _resolve_feature_map(feature_map)
  B, T, N, H, _, K, Hv = _check_qkv(q, k, v, causal=True)
  _check_form(form, True)
  chunk_size = _check_chunk_size(chunk_size)
  eps = _check_eps(eps)
  implementation = _check_implementation(implementation, form)
  G = N // K
  ld_const = jnp.zeros((N,), _F32) if decay is None else _check_decay(decay, N)
  ld_tok = None if log_decay is None else _check_log_decay(log_decay, B, T, N)
  qf = _apply_feature_map(phi, q, 'q')
  kf = _apply_feature_map(phi, k, 'k')
  F = qf.shape[-1]
  if kf.shape[-1] != F:
    raise ValueError(f'feature_map gave F={F} for q but {kf.shape[-1]} for k')
  v_aug = (jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
           if normalize else v)
  V = v_aug.shape[-1]
  if state is None:
    st = jnp.zeros((B, N, F, V), _F32)
  elif normalize:
    if not isinstance(state, (tuple, list)) or len(state) != 2:
      raise ValueError('state with normalize=True must be a pair (S [B, N, F, Hv], z [B, N, F])')
    S0 = _check_state_array(state[0], (B, N, F, Hv), 'state[0] (S)')
    z0 = _check_state_array(state[1], (B, N, F), 'state[1] (z)')
    st = jnp.concatenate([S0, z0[..., None]], axis=-1)
  else:
    st = _check_state_array(state, (B, N, F, Hv), 'state')

  if implementation != 'xla':
    if ld_tok is not None:
      raise NotImplementedError(
          f'implementation={implementation!r} supports a constant per-head decay only, '
          'not a per-token log_decay')
    o, new_st = _kernel_core(qf, kf, v_aug, ld_const, st, chunk_size=chunk_size,
                             implementation=implementation)
  else:
    a = jnp.broadcast_to(ld_const.reshape(1, 1, K, G), (1, T, K, G))
    if ld_tok is not None:
      a = a + ld_tok.reshape(B, T, K, G)
    o, new_st = _causal_core(_group_q(qf, K, G), kf, v_aug, a, st.reshape(B, K, G, F, V),
                             form=form, chunk_size=chunk_size)
    o = _ungroup(o)
    new_st = new_st.reshape(B, N, F, V)
  if normalize:
    o = _safe_div(o[..., :Hv], o[..., Hv:], eps)
  o = o.astype(v.dtype)
  if not return_state:
    return o
  if normalize:
    return o, (new_st[..., :Hv], new_st[..., Hv])
  return o, new_st


def lightning_attention(q, k, v, *, decay, form: str = 'chunked', chunk_size: int = 64,
                        state=None, return_state: bool = False,
                        implementation: str | None = 'xla'):
  """Lightning Attention: causal, unnormalised linear attention with per-head decay.

  "Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention";
  "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large
  Language Models".

  ``o_i = sum_{j<=i} lambda_n^(i-j) (q_i . k_j) v_j`` for query head ``n``. The chunked form is
  the Lightning Attention-2 tiling: inside a chunk ``[(Q_b K_b^T) * M] V_b`` with the decay
  mask ``M_ij = lambda^(i-j) [i >= j]``; across chunks ``O_b += (lambda^(i+1) Q_b) KV`` and
  ``KV <- lambda^C KV + (lambda^(C-1-j) K_b)^T V_b``.

  Args:
    q: ``[B, T, N, H]``. k: ``[B, T, K, H]``. v: ``[B, T, K, Hv]``; ``N % K == 0``.
    decay: scalar or ``[N]``, each in (0, 1] (``1`` = no decay).
    form: ``'chunked'`` | ``'recurrent'`` | ``'quadratic'``.
    chunk_size: chunk (block) length.
    state: ``KV [B, N, H, Hv]`` float32, per query head (the state after earlier tokens).
    return_state: also return the state after the last token.
    implementation: ``'xla'`` | ``'pallas_tpu'`` | ``'pallas_gpu'`` (chunked form only).

  Returns:
    ``[B, T, N, Hv]`` in ``v.dtype``, or ``(out, state)`` with ``return_state``.
  """
  return decayed_linear_attention(q, k, v, decay=decay, feature_map='identity',
                                  normalize=False, form=form, chunk_size=chunk_size,
                                  state=state, return_state=return_state,
                                  implementation=implementation)
