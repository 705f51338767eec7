"""Pallas TPU (Mosaic) chunk kernel for causal decayed linear attention (Lightning Attention-2).

Computes, for query head ``n`` with log-decay ``l_n = log(lambda_n) <= 0``,

    o_i = sum_{j <= i} exp((i - j) l_n) (q_i . k_j) v_j

with the tiling of "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence
Lengths in Large Language Models": the grid is ``(B, N, T // C)`` with the chunk axis
innermost and sequential; a float32 ``[F, V]`` state lives in VMEM scratch. For chunk
``b`` (local index ``i, j`` in ``[0, C)``):

    intra:  O_b  = [(Q_b K_b^T) * M] V_b,           M_ij = exp((i - j) l) [i >= j]
    inter:  O_b += (exp((i + 1) l) Q_b) KV
    state:  KV   = exp(C l) KV + (exp((C - 1 - j) l) K_b)^T V_b

Backward (``jax.custom_vjp``): one forward sweep gives ``dq`` and ``d l`` (the latter with a
second state ``dKV/dl`` carried beside ``KV``), one reverse sweep gives ``dk, dv`` (state
``R = sum_{later} exp(.) Q^T dO``). ``dk, dv`` are produced per query head and summed over
the query heads of each kv head outside the kernel (grouped-query attention without
repeating K and V in memory). Inputs use the public BTNH layout; the kernel transposes to
``[B, heads, T, H]`` internally. ``T`` is padded to a multiple of the chunk.

Public entry point: :func:`lightning_attention`. Reference: :func:`lightning_attention_reference`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_F32 = jnp.float32
_LANES = 128
_SUBLANES = 8


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of the chunk kernel: ``chunk`` tokens per grid step (multiple of 8)."""

  chunk: int = 64

  def __post_init__(self):
    if not isinstance(self.chunk, int) or self.chunk < _SUBLANES or self.chunk % _SUBLANES:
      raise ValueError(f'BlockSizes.chunk must be a positive multiple of {_SUBLANES}, '
                       f'got {self.chunk!r}')

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
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_prec(a, b),
                             preferred_element_type=_F32)


def _tn(a, b):  # a.T @ b
  return _nn(a.T, b)


def _decay_tables(ld, C):
  """Decay mask [C, C], query decays [C, 1], key decays [C, 1], chunk decay [1, 1]."""
  row = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
  causal = row >= col
  dist = (row - col).astype(_F32)
  mask = jnp.where(causal, jnp.exp(jnp.where(causal, dist, 0.0) * ld), 0.0)
  pos = jax.lax.broadcasted_iota(jnp.int32, (C, 1), 0).astype(_F32)
  qdec = jnp.exp((pos + 1.0) * ld)
  kdec = jnp.exp((C - 1.0 - pos) * ld)
  cdec = jnp.exp(jnp.full((1, 1), C, _F32) * ld)
  return mask, dist, pos, qdec, kdec, cdec


def _sum2(x):
  return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


def _fwd_kernel(ld_ref, q_ref, k_ref, v_ref, o_ref, kv_ref, *, C):
  n, c = pl.program_id(1), pl.program_id(2)

  @pl.when(c == 0)
  def _():
    kv_ref[...] = jnp.zeros_like(kv_ref)

  ld = ld_ref[n]
  mask, _, _, qdec, kdec, cdec = _decay_tables(ld, C)
  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  s = _nt(q, k) * mask
  kv = kv_ref[...]
  o = _nn(s.astype(v.dtype), v) + _nn(q.astype(_F32) * qdec, kv)
  o_ref[...] = o.astype(o_ref.dtype)
  kv_ref[...] = cdec * kv + _tn(k.astype(_F32) * kdec, v.astype(_F32))


def _bwd_dq_kernel(ld_ref, q_ref, k_ref, v_ref, do_ref, dq_ref, dl_ref, kv_ref, dkv_ref,
                   acc_ref, *, C):
  n, c = pl.program_id(1), pl.program_id(2)

  @pl.when(c == 0)
  def _():
    kv_ref[...] = jnp.zeros_like(kv_ref)
    dkv_ref[...] = jnp.zeros_like(dkv_ref)
    acc_ref[...] = jnp.zeros_like(acc_ref)

  ld = ld_ref[n]
  mask, dist, pos, qdec, kdec, cdec = _decay_tables(ld, C)
  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  do = do_ref[...].astype(_F32)
  q32, k32, v32 = q.astype(_F32), k.astype(_F32), v.astype(_F32)
  kv, dkv = kv_ref[...], dkv_ref[...]
  dp = _nt(do, v32)                                             # [C, C]: do_i . v_j
  dpm = dp * mask
  dq = _nn(dpm.astype(k.dtype), k) + qdec * _nt(do, kv)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  # d/dl: intra pairs weigh (i - j); inter terms differentiate qdec and the carried state.
  s = _nt(q, k)
  qq = q32 * qdec
  dl = (_sum2(s * dpm * dist) + _sum2(do * _nn(qq * (pos + 1.0), kv))
        + _sum2(do * _nn(qq, dkv)))
  acc_ref[...] += dl
  kk = k32 * kdec
  dkv_ref[...] = (C * cdec) * kv + cdec * dkv + _tn(kk * (C - 1.0 - pos), v32)
  kv_ref[...] = cdec * kv + _tn(kk, v32)

  @pl.when(c == pl.num_programs(2) - 1)
  def _():
    dl_ref[...] = jnp.broadcast_to(acc_ref[...], dl_ref.shape)


def _bwd_dkv_kernel(ld_ref, q_ref, k_ref, v_ref, do_ref, dk_ref, dv_ref, r_ref, *, C):
  n, c = pl.program_id(1), pl.program_id(2)

  @pl.when(c == 0)
  def _():
    r_ref[...] = jnp.zeros_like(r_ref)

  ld = ld_ref[n]
  mask, _, _, qdec, kdec, cdec = _decay_tables(ld, C)
  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  do = do_ref[...]
  r = r_ref[...]
  dpm = _nt(do, v) * mask
  s = _nt(q, k) * mask
  dk = _tn(dpm, q.astype(_F32)) + kdec * _nt(v.astype(_F32), r)
  dv = _tn(s, do.astype(_F32)) + kdec * _nn(k.astype(_F32), r)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  r_ref[...] = cdec * r + _tn(q.astype(_F32) * qdec, do.astype(_F32))


# --------------------------------------------------------------------------------------
# pallas_call wrappers ([B, heads, Tp, *] layout, Tp a multiple of C)
# --------------------------------------------------------------------------------------


def _specs(G, C, F, V, reverse=False, nc=None):
  def t(c):
    return nc - 1 - c if reverse else c

  q_spec = pl.BlockSpec((None, None, C, F), lambda b, n, c, ld: (b, n, t(c), 0))
  k_spec = pl.BlockSpec((None, None, C, F), lambda b, n, c, ld: (b, jax.lax.div(n, G), t(c), 0))
  v_spec = pl.BlockSpec((None, None, C, V), lambda b, n, c, ld: (b, jax.lax.div(n, G), t(c), 0))
  o_spec = pl.BlockSpec((None, None, C, V), lambda b, n, c, ld: (b, n, t(c), 0))
  dq_spec = q_spec
  return q_spec, k_spec, v_spec, o_spec, dq_spec


def _params():
  return pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel', 'arbitrary'))


def _fwd_call(q, k, v, ld, C, interpret):
  B, N, Tp, F = q.shape
  K, V = k.shape[1], v.shape[-1]
  G, nc = N // K, Tp // C
  q_spec, k_spec, v_spec, o_spec, _ = _specs(G, C, F, V)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, C=C),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(B, N, nc), in_specs=[q_spec, k_spec, v_spec],
          out_specs=o_spec, scratch_shapes=[pltpu.VMEM((F, V), _F32)]),
      out_shape=jax.ShapeDtypeStruct((B, N, Tp, V), v.dtype),
      compiler_params=_params(), interpret=interpret, name='lightning_fwd',
  )(ld, q, k, v)


def _bwd_call(q, k, v, ld, do, C, interpret):
  B, N, Tp, F = q.shape
  K, V = k.shape[1], v.shape[-1]
  G, nc = N // K, Tp // C
  q_spec, k_spec, v_spec, o_spec, dq_spec = _specs(G, C, F, V)
  dl_spec = pl.BlockSpec((None, None, _SUBLANES, _LANES), lambda b, n, c, ld: (b, n, 0, 0))
  dq, dl = pl.pallas_call(
      functools.partial(_bwd_dq_kernel, C=C),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(B, N, nc),
          in_specs=[q_spec, k_spec, v_spec, o_spec], out_specs=[dq_spec, dl_spec],
          scratch_shapes=[pltpu.VMEM((F, V), _F32), pltpu.VMEM((F, V), _F32),
                          pltpu.VMEM((1, 1), _F32)]),
      out_shape=[jax.ShapeDtypeStruct((B, N, Tp, F), q.dtype),
                 jax.ShapeDtypeStruct((B, N, _SUBLANES, _LANES), _F32)],
      compiler_params=_params(), interpret=interpret, name='lightning_bwd_dq',
  )(ld, q, k, v, do)
  rq, rk, rv, ro, _ = _specs(G, C, F, V, reverse=True, nc=nc)
  dk, dv = pl.pallas_call(
      functools.partial(_bwd_dkv_kernel, C=C),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(B, N, nc),
          in_specs=[rq, rk, rv, ro],
          out_specs=[pl.BlockSpec((None, None, C, F), rq.index_map), ro],
          scratch_shapes=[pltpu.VMEM((F, V), _F32)]),
      out_shape=[jax.ShapeDtypeStruct((B, N, Tp, F), _F32),
                 jax.ShapeDtypeStruct((B, N, Tp, V), _F32)],
      compiler_params=_params(), interpret=interpret, name='lightning_bwd_dkv',
  )(ld, q, k, v, do)
  # Sum the per-query-head key/value gradients over the G query heads of each kv head.
  dk = dk.reshape(B, K, G, Tp, F).sum(axis=2).astype(k.dtype)
  dv = dv.reshape(B, K, G, Tp, V).sum(axis=2).astype(v.dtype)
  return dq, dk, dv, dl[:, :, 0, 0].sum(axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _lightning(q, k, v, ld, C, interpret):
  return _fwd_call(q, k, v, ld, C, interpret)


def _lightning_fwd(q, k, v, ld, C, interpret):
  return _fwd_call(q, k, v, ld, C, interpret), (q, k, v, ld)


def _lightning_bwd(C, interpret, res, do):
  q, k, v, ld = res
  return _bwd_call(q, k, v, ld, do, C, interpret)


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------


def lightning_attention(q, k, v, log_decay, *, chunk_size: int | None = None,
                        block_sizes: BlockSizes | None = None, interpret: bool | None = None):
  """Causal decayed linear attention on TPU (Pallas Mosaic), forward and backward.

  "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large
  Language Models". ``o_i = sum_{j<=i} exp((i - j) log_decay[n]) (q_i . k_j) v_j``.

  Args:
    q: ``[B, T, N, F]``. k: ``[B, T, K, F]``. v: ``[B, T, K, V]``; ``N % K == 0``.
    log_decay: ``[N]`` float32, ``<= 0`` (``log(lambda_n)``); differentiable.
    chunk_size: tokens per chunk (overrides ``block_sizes.chunk``); multiple of 8.
    block_sizes: :class:`BlockSizes`.
    interpret: run the kernel in interpret mode; default: when the backend is not TPU.

  Returns:
    ``[B, T, N, V]`` in ``v.dtype``.
  """
  q, k, v, log_decay, C = _validate(q, k, v, log_decay, chunk_size, block_sizes)
  if interpret is None:
    interpret = jax.default_backend() != 'tpu'
  B, T, N, F = q.shape
  Tp = -(-T // C) * C

  def prep(x):
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, [(0, 0), (0, 0), (0, Tp - T), (0, 0)]) if Tp != T else x

  o = _lightning(prep(q), prep(k), prep(v), log_decay, C, bool(interpret))
  return jnp.swapaxes(o[:, :, :T], 1, 2)


def _validate(q, k, v, log_decay, chunk_size, block_sizes):
  if block_sizes is None:
    block_sizes = BlockSizes.get_default()
  if chunk_size is not None:
    block_sizes = BlockSizes(chunk=int(chunk_size))
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
  return q, k, v, log_decay, block_sizes.chunk


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
