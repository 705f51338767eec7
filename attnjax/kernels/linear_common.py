"""Backend-independent pieces of the Lightning Attention-2 chunk kernels
(:mod:`attnjax.kernels.tpu.linear`, :mod:`attnjax.kernels.gpu.linear`).

* in-kernel helpers: float32-accumulating matmuls and the per-chunk decay tables;
* :func:`validate`: argument checks of ``lightning_attention``;
* :func:`chunk_attention`: the ``custom_vjp`` around a backend's forward and backward
  ``pallas_call`` wrappers, summing (``psum``) the gradients of inputs that a
  ``shard_map`` does not split like the data;
* :func:`lightning_attention_reference`: the materialised float32 oracle.

Paper: "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in
Large Language Models" (Qin et al., 2024).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from attnjax.core.vma import sum_to_vma

_F32 = jnp.float32


# --------------------------------------------------------------------------------------
# In-kernel helpers
# --------------------------------------------------------------------------------------


def prec(*xs):
  """HIGHEST for all-float32 operands (exact f32 products), DEFAULT otherwise."""
  return (jax.lax.Precision.HIGHEST if all(x.dtype == _F32 for x in xs)
          else jax.lax.Precision.DEFAULT)


def dot_nn(a, b):  # a @ b
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=prec(a, b),
                             preferred_element_type=_F32)


def dot_nt(a, b):  # a @ b.T
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=prec(a, b),
                             preferred_element_type=_F32)


def dot_tn(a, b):  # a.T @ b
  return dot_nn(a.T, b)


def decay_tables(ld, C, cdec_shape=()):
  """Decay tables of one chunk of ``C`` tokens for log-decay ``ld`` (a scalar).

  Returns ``(mask [C, C], dist [C, C], pos [C, 1], qdec [C, 1], kdec [C, 1], cdec)``:
  ``mask_ij = exp((i - j) ld) [i >= j]``, ``dist_ij = (i - j) [i >= j]``, ``pos_i = i``,
  ``qdec_i = exp((i + 1) ld)``, ``kdec_j = exp((C - 1 - j) ld)`` and the chunk decay
  ``cdec = exp(C ld)`` of shape ``cdec_shape`` (``(1, 1)`` where scalars must be vectors).
  """
  row = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
  causal = row >= col
  dist = jnp.where(causal, row - col, 0).astype(_F32)
  mask = jnp.where(causal, jnp.exp(dist * ld), 0.0)
  pos = jax.lax.broadcasted_iota(jnp.int32, (C, 1), 0).astype(_F32)
  qdec = jnp.exp((pos + 1.0) * ld)
  kdec = jnp.exp((C - 1.0 - pos) * ld)
  cdec = jnp.exp(jnp.full(cdec_shape, C, _F32) * ld)
  return mask, dist, pos, qdec, kdec, cdec


# --------------------------------------------------------------------------------------
# Wrapper plumbing
# --------------------------------------------------------------------------------------


def validate(q, k, v, log_decay, chunk_size, block_sizes, block_sizes_cls):
  """Checks the arguments of ``lightning_attention``; returns ``(q, k, v, log_decay f32,
  block_sizes)`` with ``chunk_size`` (when given) replacing ``block_sizes.chunk``."""
  if block_sizes is None:
    block_sizes = block_sizes_cls.get_default()
  if chunk_size is not None:
    block_sizes = dataclasses.replace(block_sizes, chunk=int(chunk_size))
  for name, x in (('q', q), ('k', k), ('v', v)):
    if x.ndim != 4:
      raise ValueError(f'{name} must have rank 4 [B, T, heads, dim], got shape {x.shape}')
  B, T, N, F = q.shape
  if k.shape[:2] != (B, T) or k.shape[3] != F:
    raise ValueError(f'k must have shape [B={B}, T={T}, K, F={F}], got {k.shape}')
  K = k.shape[2]
  if v.shape[:3] != (B, T, K):
    raise ValueError(f'v must have shape [B={B}, T={T}, K={K}, V], got {v.shape}')
  if N % K:
    raise ValueError(f'number of query heads N={N} must be a multiple of kv heads K={K}')
  log_decay = jnp.asarray(log_decay, _F32)
  if log_decay.shape != (N,):
    raise ValueError(f'log_decay must have shape (N,)=({N},), got {log_decay.shape}')
  return q, k, v, log_decay, block_sizes


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def chunk_attention(q, k, v, ld, calls, static):
  """``calls[0](q, k, v, ld, *static)`` with the gradient ``calls[1](q, k, v, ld, do,
  *static) -> (dq, dk, dv, dld)``; ``calls`` and ``static`` are hashable tuples."""
  return calls[0](q, k, v, ld, *static)


def _chunk_fwd(q, k, v, ld, calls, static):
  return calls[0](q, k, v, ld, *static), (q, k, v, ld)


def _chunk_bwd(calls, static, res, do):
  q, k, v, ld = res
  grads = calls[1](q, k, v, ld, do, *static)
  # Inside shard_map: inputs replicated over mesh axes the data is split over (a shared
  # log-decay, replicated k/v) get the sum of every device's gradient, once.
  return tuple(sum_to_vma(g, x) for g, x in zip(grads, res))


chunk_attention.defvjp(_chunk_fwd, _chunk_bwd)


def lightning_attention_reference(q, k, v, log_decay):
  """Materialised float32 reference: ``o_i = sum_{j<=i} exp((i-j) l_n) (q_i.k_j) v_j``."""
  B, T, N, F = q.shape
  G = N // k.shape[2]
  kr = jnp.repeat(k.astype(_F32), G, axis=2)
  vr = jnp.repeat(v.astype(_F32), G, axis=2)
  i = jnp.arange(T)
  causal = i[:, None] >= i[None, :]
  dist = jnp.where(causal, (i[:, None] - i[None, :]).astype(_F32), 0.0)
  mask = jnp.where(causal, jnp.exp(dist[None] * log_decay[:, None, None]), 0.0)
  s = jnp.einsum('btnf,bsnf->bnts', q.astype(_F32), kr,
                 precision=jax.lax.Precision.HIGHEST) * mask
  return jnp.einsum('bnts,bsnv->btnv', s, vr,
                    precision=jax.lax.Precision.HIGHEST).astype(v.dtype)
