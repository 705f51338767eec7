"""Kernelized linear attention with feature maps, and Efficient Attention.

- :func:`linear_attention` -- "Transformers are RNNs: Fast Autoregressive Transformers with
  Linear Attention" (feature maps ``'elu+1'``, ``'relu'``, ``'identity'`` or a callable).
- :func:`efficient_attention` -- "Efficient Attention: Attention with Linear Complexities"
  (Shen et al.), non-causal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.ops.linear._args import (
  _F32,
  DEFAULT_BLOCK_LEN,
  DEFAULT_EPS,
  FeatureMap,
  _check_state_array,
  _feature_dim,
  prepare,
)
from attnjax.ops.linear._core import (
  _causal_kv_core,
  _einsum,
  _feature_maps,
  _in_blocks,
  _normalized,
  _pack,
  _ungroup,
  _unpack,
  _with_ones,
  choose,
  dispatched,
)


def _linear_state(state, B, K, F, Hv):
  if state is None:
    return jnp.zeros((B, K, F, Hv), _F32), jnp.zeros((B, K, F), _F32)
  if not isinstance(state, (tuple, list)) or len(state) != 2:
    raise ValueError('state of linear_attention must be a pair (S [B, K, F, Hv], z [B, K, F])')
  return (_check_state_array(state[0], (B, K, F, Hv), 'state[0] (S)'),
          _check_state_array(state[1], (B, K, F), 'state[1] (z)'))


# --------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------


@dispatched
def linear_attention(q, k, v, *, feature_map: FeatureMap = 'elu+1', causal: bool = False,
                     form: str = 'chunked', chunk_size: int = 64, state=None,
                     return_state: bool = False, normalize: bool = True,
                     eps: float = DEFAULT_EPS, implementation=None,
                     block_len: int | None = DEFAULT_BLOCK_LEN):
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
    implementation: ``None``/``'auto'`` (default: the Pallas chunk kernel of the TPU/GPU
      backend when it serves the call -- causal, chunked form, constant decay -- else
      ``'xla'``; ``'xla'`` on CPU), ``'xla'``, ``'pallas_tpu'`` / ``'pallas_gpu'`` (causal
      chunked form only; interpret mode on CPU) or a sequence tried in order.  The choice
      is made by the implementation registry (:mod:`attnjax.dispatch.registry`).
    block_len: causal chunked XLA form: sequences longer than ``block_len`` tokens are
      processed block by block (a ``lax.scan`` over blocks carrying the state, each block
      rematerialised in the backward pass), which bounds the working memory; ``None``
      processes the whole sequence at once. Same result either way.

  Returns:
    ``[B, T, N, Hv]`` in ``v.dtype``, or ``(out, (S, z))`` with ``return_state``.
  """
  a = prepare(q, k, v, causal=causal, form=form, feature_map=feature_map,
              chunk_size=chunk_size, eps=eps, implementation=implementation,
              block_len=block_len, state=state, return_state=return_state)
  B, T, N, H, K, Hv = a.B, a.T, a.N, a.H, a.K, a.Hv
  phi, chunk_size, eps = a.phi, a.chunk_size, a.eps
  implementation = choose(a, mechanism='linear_attention', causal=causal, dtype=v.dtype)
  if a.use_blocks(causal, implementation):
    step = lambda st, *x: linear_attention(
        *x, feature_map=feature_map, causal=True, chunk_size=chunk_size, state=st,
        return_state=True, normalize=normalize, eps=eps, implementation='xla',
        block_len=None)
    st0 = _linear_state(state, B, K, _feature_dim(phi, H), Hv)
    o, st = _in_blocks(step, st0, (q, k, v), block_len=a.block_len)
    return (o, st) if return_state else o
  qf, kf = _feature_maps(phi, q, k)
  F = qf.shape[-1]
  G = N // K
  v_aug = _with_ones(v, normalize)

  if not causal:
    qg = qf.reshape(B, T, K, G, F)
    if form == 'quadratic':
      s = _einsum('btkgf,bskf->bkgts', qg, kf)
      o = _einsum('bkgts,bskv->btkgv', s, v_aug.astype(_F32))
    else:
      kv = _einsum('bskf,bskv->bkfv', kf, v_aug)
      o = _einsum('btkgf,bkfv->btkgv', qg, kv)
    return _normalized(_ungroup(o), Hv, eps, normalize).astype(v.dtype)

  S0, z0 = _linear_state(state, B, K, F, Hv)
  o, new_st = _causal_kv_core(qf, kf, v_aug, _pack(S0, z0) if normalize else S0, form=form,
                              chunk_size=chunk_size, implementation=implementation)
  o = _normalized(o, Hv, eps, normalize).astype(v.dtype)
  if not return_state:
    return o
  if normalize:
    return o, _unpack(new_st, Hv)
  return o, (new_st, z0 + jnp.sum(kf.astype(_F32), axis=1))


# --------------------------------------------------------------------------------------
# Efficient Attention (Shen et al.)
# --------------------------------------------------------------------------------------


@dispatched  # observable by attnjax.analysis
def efficient_attention(q, k, v, *, form: str = 'chunked'):
  """Efficient Attention: softmax-normalised factorised attention, non-causal.

  "Efficient Attention: Attention with Linear Complexities" (Shen et al.).

  ``E = rho_q(Q) (rho_k(K)^T V)`` with ``rho_q`` the softmax of each query over its ``H``
  features and ``rho_k`` the softmax of each key feature over the ``S`` positions. Each
  output row is a convex combination of values (weights sum to 1).

  Args:
    q: ``[B, T, N, H]``. k: ``[B, S, K, H]``. v: ``[B, S, K, Hv]``.
    form: ``'chunked'`` (``O((T + S) H Hv)``, the factorised path) or ``'quadratic'``
      (``[T, S]`` weights materialised, for tests).

  Returns:
    ``[B, T, N, Hv]`` in ``v.dtype``.
  """
  a = prepare(q, k, v, causal=False, form=form)
  B, T, H, K, G = a.B, a.T, a.H, a.K, a.G
  rq = jax.nn.softmax(q.astype(_F32), axis=-1).reshape(B, T, K, G, H)
  rk = jax.nn.softmax(k.astype(_F32), axis=1)
  if form == 'quadratic':
    w = _einsum('btkgh,bskh->bkgts', rq, rk)
    o = _einsum('bkgts,bskv->btkgv', w, v.astype(_F32))
  else:
    ctx = _einsum('bskh,bskv->bkhv', rk, v.astype(_F32))
    o = _einsum('btkgh,bkhv->btkgv', rq, ctx)
  return _ungroup(o).astype(v.dtype)

