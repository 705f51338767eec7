"""Pallas GPU (Triton) chunk kernel for causal decayed linear attention (Lightning Attention-2).

Computes, for query head ``n`` with log-decay ``l_n = log(lambda_n) <= 0``,

    o_i = sum_{j <= i} exp((i - j) l_n) (q_i . k_j) v_j

with the tiling of "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence
Lengths in Large Language Models": the grid is ``(B, N)``; each program walks the sequence
chunk by chunk (``C`` tokens) keeping a float32 ``[F, V]`` state in registers. For chunk
``b`` (local index ``i, j`` in ``[0, C)``):

    intra:  O_b  = [(Q_b K_b^T) * M] V_b,           M_ij = exp((i - j) l) [i >= j]
    inter:  O_b += (exp((i + 1) l) Q_b) KV
    state:  KV   = exp(C l) KV + (exp((C - 1 - j) l) K_b)^T V_b

Backward (``jax.custom_vjp``, one kernel, two sweeps per program): the forward sweep gives
``dq`` and ``d l`` (carrying ``KV`` and ``dKV/dl``), the reverse sweep gives ``dk, dv``
(carrying ``R = sum_{later} exp(.) Q^T dO``). ``dk, dv`` are written per query head and summed
over the query heads of each kv head outside the kernel, so K and V are never repeated in
memory. The public BTNH layout is used directly (strided loads, no transpose); the wrapper
pads ``T`` to a multiple of the chunk and the feature dims to powers of two (>= 16), as
``tl.dot`` needs.

Public entry point: :func:`lightning_attention`. Reference: :func:`lightning_attention_reference`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_F32 = jnp.float32
_MIN_DIM = 16


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of the chunk kernel: ``chunk`` tokens per step (power of two, >= 16)."""

  chunk: int = 64
  num_warps: int = 4
  num_stages: int = 1

  def __post_init__(self):
    c = self.chunk
    if not isinstance(c, int) or c < _MIN_DIM or c & (c - 1):
      raise ValueError(f'BlockSizes.chunk must be a power of two >= {_MIN_DIM}, got {c!r}')
    if not isinstance(self.num_warps, int) or self.num_warps < 1:
      raise ValueError(f'BlockSizes.num_warps must be a positive int, got {self.num_warps!r}')
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      raise ValueError(f'BlockSizes.num_stages must be a positive int, got {self.num_stages!r}')

  @classmethod
  def get_default(cls) -> 'BlockSizes':
    return cls()


# --------------------------------------------------------------------------------------
# In-kernel helpers
# --------------------------------------------------------------------------------------


def _prec(*xs):
  return (jax.lax.Precision.HIGHEST if all(x.dtype == _F32 for x in xs)
          else jax.lax.Precision.DEFAULT)


def _nn(a, b):  # a @ b
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_prec(a, b),
                             preferred_element_type=_F32)


def _nt(a, b):  # a @ b.T
  return _nn(a, b.T)


def _tn(a, b):  # a.T @ b
  return _nn(a.T, b)


def _decay_tables(ld, C):
  row = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
  causal = row >= col
  dist = jnp.where(causal, row - col, 0).astype(_F32)
  mask = jnp.where(causal, jnp.exp(dist * ld), 0.0)
  pos = jax.lax.broadcasted_iota(jnp.int32, (C, 1), 0).astype(_F32)
  qdec = jnp.exp((pos + 1.0) * ld)
  kdec = jnp.exp((C - 1.0 - pos) * ld)
  cdec = jnp.exp(C * ld)
  return mask, dist, pos, qdec, kdec, cdec


# --------------------------------------------------------------------------------------
# Kernels (refs: q [Tp, F], k [Tp, F], v [Tp, V] of one (batch, head))
# --------------------------------------------------------------------------------------


def _fwd_kernel(ld_ref, q_ref, k_ref, v_ref, o_ref, *, C, nc):
  ld = ld_ref[...]
  mask, _, _, qdec, kdec, cdec = _decay_tables(ld, C)
  F, V = q_ref.shape[-1], v_ref.shape[-1]

  def body(c, kv):
    sl = pl.ds(pl.multiple_of(c * C, C), C)
    q, k, v = q_ref[sl, :], k_ref[sl, :], v_ref[sl, :]
    s = _nt(q, k) * mask
    o = _nn(s.astype(v.dtype), v) + _nn(q.astype(_F32) * qdec, kv)
    o_ref[sl, :] = o.astype(o_ref.dtype)
    return cdec * kv + _tn(k.astype(_F32) * kdec, v.astype(_F32))

  jax.lax.fori_loop(0, nc, body, jnp.zeros((F, V), _F32))


def _bwd_kernel(ld_ref, q_ref, k_ref, v_ref, do_ref, dq_ref, dk_ref, dv_ref, dl_ref, *, C, nc):
  ld = ld_ref[...]
  mask, dist, pos, qdec, kdec, cdec = _decay_tables(ld, C)
  F, V = q_ref.shape[-1], v_ref.shape[-1]

  def fwd_body(c, carry):
    kv, dkv, acc = carry
    sl = pl.ds(pl.multiple_of(c * C, C), C)
    q, k, v = q_ref[sl, :], k_ref[sl, :], v_ref[sl, :]
    do = do_ref[sl, :].astype(_F32)
    q32, k32, v32 = q.astype(_F32), k.astype(_F32), v.astype(_F32)
    dpm = _nt(do, v32) * mask
    dq = _nn(dpm.astype(k.dtype), k) + qdec * _nt(do, kv)
    dq_ref[sl, :] = dq.astype(dq_ref.dtype)
    s = _nt(q, k)
    qq = q32 * qdec
    acc = (acc + jnp.sum(s * dpm * dist) + jnp.sum(do * _nn(qq * (pos + 1.0), kv))
           + jnp.sum(do * _nn(qq, dkv)))
    kk = k32 * kdec
    dkv = (C * cdec) * kv + cdec * dkv + _tn(kk * (C - 1.0 - pos), v32)
    kv = cdec * kv + _tn(kk, v32)
    return kv, dkv, acc

  zeros = jnp.zeros((F, V), _F32)
  _, _, acc = jax.lax.fori_loop(0, nc, fwd_body, (zeros, zeros, jnp.zeros((), _F32)))
  dl_ref[...] = acc

  def rev_body(it, r):
    c = nc - 1 - it
    sl = pl.ds(pl.multiple_of(c * C, C), C)
    q, k, v = q_ref[sl, :], k_ref[sl, :], v_ref[sl, :]
    do = do_ref[sl, :]
    dpm = _nt(do, v) * mask
    s = _nt(q, k) * mask
    dk = _tn(dpm, q.astype(_F32)) + kdec * _nt(v.astype(_F32), r)
    dv = _tn(s, do.astype(_F32)) + kdec * _nn(k.astype(_F32), r)
    dk_ref[sl, :] = dk.astype(dk_ref.dtype)
    dv_ref[sl, :] = dv.astype(dv_ref.dtype)
    return cdec * r + _tn(q.astype(_F32) * qdec, do.astype(_F32))

  jax.lax.fori_loop(0, nc, rev_body, zeros)


# --------------------------------------------------------------------------------------
# pallas_call wrappers (BTNH, Tp a multiple of C, F and V powers of two)
# --------------------------------------------------------------------------------------


def _specs(G, Tp, F, V):
  q_spec = pl.BlockSpec((None, Tp, None, F), lambda b, n: (b, 0, n, 0))
  k_spec = pl.BlockSpec((None, Tp, None, F), lambda b, n: (b, 0, jax.lax.div(n, G), 0))
  v_spec = pl.BlockSpec((None, Tp, None, V), lambda b, n: (b, 0, jax.lax.div(n, G), 0))
  o_spec = pl.BlockSpec((None, Tp, None, V), lambda b, n: (b, 0, n, 0))
  ld_spec = pl.BlockSpec((None,), lambda b, n: (n,))
  return ld_spec, q_spec, k_spec, v_spec, o_spec


def _fwd_call(q, k, v, ld, C, bs, interpret):
  B, Tp, N, F = q.shape
  K, V = k.shape[2], v.shape[-1]
  ld_spec, q_spec, k_spec, v_spec, o_spec = _specs(N // K, Tp, F, V)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, C=C, nc=Tp // C),
      grid=(B, N), in_specs=[ld_spec, q_spec, k_spec, v_spec], out_specs=o_spec,
      out_shape=jax.ShapeDtypeStruct((B, Tp, N, V), v.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
      interpret=interpret, name='lightning_fwd',
  )(ld, q, k, v)


def _bwd_call(q, k, v, ld, do, C, bs, interpret):
  B, Tp, N, F = q.shape
  K, V = k.shape[2], v.shape[-1]
  G = N // K
  ld_spec, q_spec, k_spec, v_spec, o_spec = _specs(G, Tp, F, V)
  dq, dk, dv, dl = pl.pallas_call(
      functools.partial(_bwd_kernel, C=C, nc=Tp // C),
      grid=(B, N), in_specs=[ld_spec, q_spec, k_spec, v_spec, o_spec],
      out_specs=[q_spec, q_spec, o_spec, pl.BlockSpec((None, None), lambda b, n: (b, n))],
      out_shape=[jax.ShapeDtypeStruct((B, Tp, N, F), q.dtype),
                 jax.ShapeDtypeStruct((B, Tp, N, F), _F32),
                 jax.ShapeDtypeStruct((B, Tp, N, V), _F32),
                 jax.ShapeDtypeStruct((B, N), _F32)],
      compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
      interpret=interpret, name='lightning_bwd',
  )(ld, q, k, v, do)
  # Sum the per-query-head key/value gradients over the G query heads of each kv head.
  dk = dk.reshape(B, Tp, K, G, F).sum(axis=3).astype(k.dtype)
  dv = dv.reshape(B, Tp, K, G, V).sum(axis=3).astype(v.dtype)
  return dq, dk, dv, dl.sum(axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _lightning(q, k, v, ld, C, bs, interpret):
  return _fwd_call(q, k, v, ld, C, bs, interpret)


def _lightning_fwd(q, k, v, ld, C, bs, interpret):
  return _fwd_call(q, k, v, ld, C, bs, interpret), (q, k, v, ld)


def _lightning_bwd(C, bs, interpret, res, do):
  q, k, v, ld = res
  return _bwd_call(q, k, v, ld, do, C, bs, interpret)


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------


def lightning_attention(q, k, v, log_decay, *, chunk_size: int | None = None,
                        block_sizes: BlockSizes | None = None, interpret: bool | None = None):
  """Causal decayed linear attention on GPU (Pallas Triton), forward and backward.

  "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large
  Language Models". ``o_i = sum_{j<=i} exp((i - j) log_decay[n]) (q_i . k_j) v_j``.

  Args:
    q: ``[B, T, N, F]``. k: ``[B, T, K, F]``. v: ``[B, T, K, V]``; ``N % K == 0``.
    log_decay: ``[N]`` float32, ``<= 0`` (``log(lambda_n)``); differentiable.
    chunk_size: tokens per chunk (overrides ``block_sizes.chunk``); power of two >= 16.
    block_sizes: :class:`BlockSizes`.
    interpret: run the kernel in interpret mode; default: when the backend is not GPU.

  Returns:
    ``[B, T, N, V]`` in ``v.dtype``.
  """
  q, k, v, log_decay, bs = _validate(q, k, v, log_decay, chunk_size, block_sizes)
  if interpret is None:
    interpret = jax.default_backend() != 'gpu'
  B, T, N, F = q.shape
  V = v.shape[-1]
  C = bs.chunk
  Tp = -(-T // C) * C
  Fp = max(_MIN_DIM, pl.next_power_of_2(F))
  Vp = max(_MIN_DIM, pl.next_power_of_2(V))

  def prep(x, d):
    pads = [(0, 0), (0, Tp - T), (0, 0), (0, d - x.shape[-1])]
    return jnp.pad(x, pads) if any(p for _, p in pads) else x

  o = _lightning(prep(q, Fp), prep(k, Fp), prep(v, Vp), log_decay, C, bs, bool(interpret))
  return o[:, :T, :, :V]


def _validate(q, k, v, log_decay, chunk_size, block_sizes):
  if block_sizes is None:
    block_sizes = BlockSizes.get_default()
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
