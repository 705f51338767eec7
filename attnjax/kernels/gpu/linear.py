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

from attnjax.kernels import linear_common as lc
from attnjax.kernels import pallas_shard
from attnjax.kernels.linear_common import lightning_attention_reference

__all__ = ['BlockSizes', 'lightning_attention', 'lightning_attention_reference']

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
# Kernels (refs: q [Tp, F], k [Tp, F], v [Tp, V] of one (batch, head))
# --------------------------------------------------------------------------------------


def _fwd_kernel(ld_ref, q_ref, k_ref, v_ref, o_ref, *, C, nc):
  ld = ld_ref[...]
  mask, _, _, qdec, kdec, cdec = lc.decay_tables(ld, C)
  F, V = q_ref.shape[-1], v_ref.shape[-1]

  def body(c, kv):
    sl = pl.ds(pl.multiple_of(c * C, C), C)
    q, k, v = q_ref[sl, :], k_ref[sl, :], v_ref[sl, :]
    s = lc.dot_nt(q, k) * mask
    o = lc.dot_nn(s.astype(v.dtype), v) + lc.dot_nn(q.astype(_F32) * qdec, kv)
    o_ref[sl, :] = o.astype(o_ref.dtype)
    return cdec * kv + lc.dot_tn(k.astype(_F32) * kdec, v.astype(_F32))

  jax.lax.fori_loop(0, nc, body, jnp.zeros((F, V), _F32))


def _bwd_kernel(ld_ref, q_ref, k_ref, v_ref, do_ref, dq_ref, dk_ref, dv_ref, dl_ref, *, C, nc):
  ld = ld_ref[...]
  mask, dist, pos, qdec, kdec, cdec = lc.decay_tables(ld, C)
  F, V = q_ref.shape[-1], v_ref.shape[-1]

  def fwd_body(c, carry):
    kv, dkv, acc = carry
    sl = pl.ds(pl.multiple_of(c * C, C), C)
    q, k, v = q_ref[sl, :], k_ref[sl, :], v_ref[sl, :]
    do = do_ref[sl, :].astype(_F32)
    q32, k32, v32 = q.astype(_F32), k.astype(_F32), v.astype(_F32)
    dpm = lc.dot_nt(do, v32) * mask
    dq = lc.dot_nn(dpm.astype(k.dtype), k) + qdec * lc.dot_nt(do, kv)
    dq_ref[sl, :] = dq.astype(dq_ref.dtype)
    s = lc.dot_nt(q, k)
    qq = q32 * qdec
    acc = (acc + jnp.sum(s * dpm * dist) + jnp.sum(do * lc.dot_nn(qq * (pos + 1.0), kv))
           + jnp.sum(do * lc.dot_nn(qq, dkv)))
    kk = k32 * kdec
    dkv = (C * cdec) * kv + cdec * dkv + lc.dot_tn(kk * (C - 1.0 - pos), v32)
    kv = cdec * kv + lc.dot_tn(kk, v32)
    return kv, dkv, acc

  zeros = jnp.zeros((F, V), _F32)
  _, _, acc = jax.lax.fori_loop(0, nc, fwd_body, (zeros, zeros, jnp.zeros((), _F32)))
  dl_ref[...] = acc

  def rev_body(it, r):
    c = nc - 1 - it
    sl = pl.ds(pl.multiple_of(c * C, C), C)
    q, k, v = q_ref[sl, :], k_ref[sl, :], v_ref[sl, :]
    do = do_ref[sl, :]
    dpm = lc.dot_nt(do, v) * mask
    s = lc.dot_nt(q, k) * mask
    dk = lc.dot_tn(dpm, q.astype(_F32)) + kdec * lc.dot_nt(v.astype(_F32), r)
    dv = lc.dot_tn(s, do.astype(_F32)) + kdec * lc.dot_nn(k.astype(_F32), r)
    dk_ref[sl, :] = dk.astype(dk_ref.dtype)
    dv_ref[sl, :] = dv.astype(dv_ref.dtype)
    return cdec * r + lc.dot_tn(q.astype(_F32) * qdec, do.astype(_F32))

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
  return pallas_shard.pallas_call(
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
  dq, dk, dv, dl = pallas_shard.pallas_call(
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
  q, k, v, log_decay, bs = lc.validate(q, k, v, log_decay, chunk_size, block_sizes, BlockSizes)
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

  o = lc.chunk_attention(prep(q, Fp), prep(k, Fp), prep(v, Vp), log_decay,
                         (_fwd_call, _bwd_call), (C, bs, bool(interpret)))
  return o[:, :T, :, :V]
