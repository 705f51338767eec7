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

from attnjax.kernels import flash_wrapper as fw
from attnjax.kernels import linear_common as lc
from attnjax.kernels import pallas_shard
from attnjax.kernels.linear_common import lightning_attention_reference

__all__ = ['BlockSizes', 'lightning_attention', 'lightning_attention_reference']

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
  mask, _, _, qdec, kdec, cdec = lc.decay_tables(ld, C, (1, 1))
  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  s = lc.dot_nt(q, k) * mask
  kv = kv_ref[...]
  o = lc.dot_nn(s.astype(v.dtype), v) + lc.dot_nn(q.astype(_F32) * qdec, kv)
  o_ref[...] = o.astype(o_ref.dtype)
  kv_ref[...] = cdec * kv + lc.dot_tn(k.astype(_F32) * kdec, v.astype(_F32))


def _bwd_dq_kernel(ld_ref, q_ref, k_ref, v_ref, do_ref, dq_ref, dl_ref, kv_ref, dkv_ref,
                   acc_ref, *, C):
  n, c = pl.program_id(1), pl.program_id(2)

  @pl.when(c == 0)
  def _():
    kv_ref[...] = jnp.zeros_like(kv_ref)
    dkv_ref[...] = jnp.zeros_like(dkv_ref)
    acc_ref[...] = jnp.zeros_like(acc_ref)

  ld = ld_ref[n]
  mask, dist, pos, qdec, kdec, cdec = lc.decay_tables(ld, C, (1, 1))
  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  do = do_ref[...].astype(_F32)
  q32, k32, v32 = q.astype(_F32), k.astype(_F32), v.astype(_F32)
  kv, dkv = kv_ref[...], dkv_ref[...]
  dp = lc.dot_nt(do, v32)                                       # [C, C]: do_i . v_j
  dpm = dp * mask
  dq = lc.dot_nn(dpm.astype(k.dtype), k) + qdec * lc.dot_nt(do, kv)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  # d/dl: intra pairs weigh (i - j); inter terms differentiate qdec and the carried state.
  s = lc.dot_nt(q, k)
  qq = q32 * qdec
  dl = (_sum2(s * dpm * dist) + _sum2(do * lc.dot_nn(qq * (pos + 1.0), kv))
        + _sum2(do * lc.dot_nn(qq, dkv)))
  acc_ref[...] += dl
  kk = k32 * kdec
  dkv_ref[...] = (C * cdec) * kv + cdec * dkv + lc.dot_tn(kk * (C - 1.0 - pos), v32)
  kv_ref[...] = cdec * kv + lc.dot_tn(kk, v32)

  @pl.when(c == pl.num_programs(2) - 1)
  def _():
    dl_ref[...] = jnp.broadcast_to(acc_ref[...], dl_ref.shape)


def _bwd_dkv_kernel(ld_ref, q_ref, k_ref, v_ref, do_ref, dk_ref, dv_ref, r_ref, *, C):
  n, c = pl.program_id(1), pl.program_id(2)

  @pl.when(c == 0)
  def _():
    r_ref[...] = jnp.zeros_like(r_ref)

  ld = ld_ref[n]
  mask, _, _, qdec, kdec, cdec = lc.decay_tables(ld, C, (1, 1))
  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  do = do_ref[...]
  r = r_ref[...]
  dpm = lc.dot_nt(do, v) * mask
  s = lc.dot_nt(q, k) * mask
  dk = lc.dot_tn(dpm, q.astype(_F32)) + kdec * lc.dot_nt(v.astype(_F32), r)
  dv = lc.dot_tn(s, do.astype(_F32)) + kdec * lc.dot_nn(k.astype(_F32), r)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  r_ref[...] = cdec * r + lc.dot_tn(q.astype(_F32) * qdec, do.astype(_F32))


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
  return pallas_shard.pallas_call(
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
  dq, dl = pallas_shard.pallas_call(
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
  dk, dv = pallas_shard.pallas_call(
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
    interpret: run the kernel in interpret mode (default: when the backend is not TPU); a
      ``pltpu.InterpretParams`` selects the TPU-semantics interpreter with those settings.

  Returns:
    ``[B, T, N, V]`` in ``v.dtype``.
  """
  q, k, v, log_decay, bs = lc.validate(q, k, v, log_decay, chunk_size, block_sizes, BlockSizes)
  C = bs.chunk
  interpret = fw.default_interpret(interpret, ('tpu',), pltpu.InterpretParams)
  B, T, N, F = q.shape
  Tp = -(-T // C) * C

  def prep(x):
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, [(0, 0), (0, 0), (0, Tp - T), (0, 0)]) if Tp != T else x

  o = lc.chunk_attention(prep(q), prep(k), prep(v), log_decay, (_fwd_call, _bwd_call),
                         (C, interpret))
  return jnp.swapaxes(o[:, :, :T], 1, 2)
