"""Pallas TPU (Mosaic) chunk kernel for the gated delta rule (Gated DeltaNet; DeltaNet is
the case ``log_alpha = 0``).

"Gated Delta Networks: Improving Mamba2 with Delta Rule" (Yang et al.); "Parallelizing
Linear Transformers with the Delta Rule over Sequence Length" (Yang et al.).

Recurrence per query head (state ``S [V, H]``, ``a_t = exp(log_alpha_t)``):

    S_t = a_t S_{t-1} + beta_t (v_t - a_t S_{t-1} k_t) k_t^T,      o_t = S_t (scale q_t).

Grid ``(B, N, T // C)`` with the chunk axis innermost and sequential; the float32 state
``S^T [H, V]`` lives in VMEM scratch. Each chunk is the UT form of
:func:`attnjax.kernels.linear_common.delta_chunk`: the unit lower-triangular ``[C, C]``
system is inverted in-kernel by ``log2(C)`` rounds of matrix products (no per-row loop),
then ``U``, ``W``, the output and the next state are matrix products. Inputs may be
bfloat16; every product accumulates (and the state stays) in float32.

Backward (``jax.custom_vjp``): the VJP of the XLA twin
:func:`~attnjax.kernels.linear_common.delta_rule_scan` (same chunk math, recomputed from
the saved inputs), not a Pallas kernel.

Public entry point: :func:`gated_delta_rule`.
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
from attnjax.kernels.tpu.linear import BlockSizes  # the lightning kernel's tiling, shared

__all__ = ["BlockSizes", "gated_delta_rule", "gated_linear_attention"]

_F32 = jnp.float32


def _fwd_kernel(q_ref, k_ref, v_ref, b_ref, gcol_ref, grow_ref, s0_ref, o_ref, s_ref,
                st_ref, *, scale):
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    st_ref[...] = s0_ref[...]

  o, st = lc.delta_chunk(q_ref[...], k_ref[...], v_ref[...], b_ref[...], gcol_ref[...],
                         grow_ref[...], st_ref[...], scale)
  o_ref[...] = o.astype(o_ref.dtype)
  st_ref[...] = st

  @pl.when(c == pl.num_programs(2) - 1)
  def _():
    s_ref[...] = st


def _forward(q, k, v, beta, log_alpha, S0, scale, chunk, interpret):
  B, T, N, H = q.shape
  K, V = k.shape[2], v.shape[-1]
  G, C = N // K, chunk
  qh, kh, vh, bh, gc, St = lc.delta_chunk_inputs(q, k, v, beta, log_alpha, S0, C)
  Tp = qh.shape[2]
  nc = Tp // C
  row = lambda d: pl.BlockSpec((None, None, C, d), lambda b, n, c: (b, n, c, 0))
  kv = lambda d: pl.BlockSpec((None, None, C, d), lambda b, n, c: (b, jax.lax.div(n, G), c, 0))
  st_spec = pl.BlockSpec((None, None, H, V), lambda b, n, c: (b, n, 0, 0))
  grow_spec = pl.BlockSpec((None, None, None, 1, C), lambda b, n, c: (b, n, c, 0, 0))
  o, S = pallas_shard.pallas_call(
      functools.partial(_fwd_kernel, scale=scale),
      grid=(B, N, nc),
      in_specs=[row(H), kv(H), kv(V), row(1), row(1), grow_spec, st_spec],
      out_specs=[row(V), st_spec],
      out_shape=[jax.ShapeDtypeStruct((B, N, Tp, V), v.dtype),
                 jax.ShapeDtypeStruct((B, N, H, V), _F32)],
      scratch_shapes=[pltpu.VMEM((H, V), _F32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'arbitrary')),
      interpret=interpret, name='gated_delta_fwd',
  )(qh, kh, vh, bh[..., None], gc[..., None], gc.reshape(B, N, nc, 1, C), St)
  return jnp.swapaxes(o[:, :, :T], 1, 2), jnp.swapaxes(S, -1, -2)


def gated_delta_rule(q, k, v, beta, log_alpha=None, state=None, *, scale: float | None = None,
                     chunk_size: int | None = None, block_sizes: BlockSizes | None = None,
                     interpret=None):
  """Gated delta rule on TPU (Pallas Mosaic): forward kernel, custom VJP.

  Args:
    q: ``[B, T, N, H]``. k: ``[B, T, K, H]``. v: ``[B, T, K, V]``; ``N % K == 0``.
    beta: ``[B, T, N]`` in ``[0, 1]``. log_alpha: ``[B, T, N]`` ``<= 0`` or None (DeltaNet).
    state: ``S [B, N, V, H]`` float32 or None (zeros).
    scale: multiplies ``q`` (default ``1/sqrt(H)``).
    chunk_size: tokens per chunk (overrides ``block_sizes.chunk``); multiple of 8.
    interpret: interpret mode (default: when the backend is not TPU); a
      ``pltpu.InterpretParams`` selects the TPU-semantics interpreter.

  Returns:
    ``(o [B, T, N, V] in v.dtype, S [B, N, V, H] float32)``.
  """
  bs = block_sizes or BlockSizes.get_default()
  if chunk_size is not None:
    bs = dataclasses.replace(bs, chunk=int(chunk_size))
  log_alpha, state = lc.validate_delta(q, k, v, beta, log_alpha, state, bs.chunk)
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  interpret = fw.default_interpret(interpret, ('tpu',), pltpu.InterpretParams)
  return _delta(q, k, v, beta.astype(_F32), log_alpha.astype(_F32), state.astype(_F32),
                scale, (bs.chunk, interpret))


def _kernel_fwd(q, k, v, beta, log_alpha, S0, scale, static):
  chunk, interpret = static
  return _forward(q, k, v, beta, log_alpha, S0, scale, chunk, interpret)


_delta = lc.delta_rule_custom_vjp(_kernel_fwd)


# --------------------------------------------------------------------------------------
# GLA
# --------------------------------------------------------------------------------------


def _gla_kernel(q_ref, k_ref, v_ref, b_ref, s0_ref, o_ref, s_ref, st_ref, *, scale):
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    st_ref[...] = s0_ref[...]

  o, st = lc.gla_chunk(q_ref[...], k_ref[...], v_ref[...], b_ref[...], st_ref[...], scale)
  o_ref[...] = o.astype(o_ref.dtype)
  st_ref[...] = st

  @pl.when(c == pl.num_programs(2) - 1)
  def _():
    s_ref[...] = st


def _gla_forward(q, k, v, log_alpha, S0, scale, static):
  C, interpret = static
  B, T, N, H = q.shape
  K, V = k.shape[2], v.shape[-1]
  G = N // K
  qh, kh, vh, b = lc.gla_chunk_inputs(q, k, v, log_alpha, C)
  Tp = qh.shape[2]
  row = lambda d: pl.BlockSpec((None, None, C, d), lambda b_, n, c: (b_, n, c, 0))
  kv = lambda d: pl.BlockSpec((None, None, C, d), lambda b_, n, c: (b_, jax.lax.div(n, G), c, 0))
  st_spec = pl.BlockSpec((None, None, V, H), lambda b_, n, c: (b_, n, 0, 0))
  o, S = pallas_shard.pallas_call(
      functools.partial(_gla_kernel, scale=scale),
      grid=(B, N, Tp // C),
      in_specs=[row(H), kv(H), kv(V), row(H), st_spec],
      out_specs=[row(V), st_spec],
      out_shape=[jax.ShapeDtypeStruct((B, N, Tp, V), v.dtype),
                 jax.ShapeDtypeStruct((B, N, V, H), _F32)],
      scratch_shapes=[pltpu.VMEM((V, H), _F32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'arbitrary')),
      interpret=interpret, name='gla_fwd',
  )(qh, kh, vh, b, S0)
  return jnp.swapaxes(o[:, :, :T], 1, 2), S


_gla = lc.gla_custom_vjp(_gla_forward)


def gated_linear_attention(q, k, v, log_alpha, state=None, *, scale: float | None = None,
                           chunk_size: int = 16, interpret=None):
  """GLA on TPU (Pallas Mosaic): forward kernel (grid ``(B, N, T // C)``, state ``[V, H]``
  f32 in VMEM scratch, exact ``[C, C, H]`` in-chunk decays of
  :func:`attnjax.kernels.linear_common.gla_chunk`), custom VJP through the XLA twin
  :func:`~attnjax.kernels.linear_common.gla_scan`.

  Args:
    q: ``[B, T, N, H]``. k: ``[B, T, K, H]``. v: ``[B, T, K, V]``.
    log_alpha: ``[B, T, N, H]`` ``<= 0``. state: ``S [B, N, V, H]`` f32 or None.
    scale: default ``1/sqrt(H)``. chunk_size: multiple of 8 (default 16: the body holds
      ``[C, C, H]`` f32 decays).
    interpret: as in :func:`gated_delta_rule`.

  Returns:
    ``(o [B, T, N, V] in v.dtype, S [B, N, V, H] float32)``.
  """
  BlockSizes(chunk=int(chunk_size))
  state = lc.validate_gla(q, k, v, log_alpha, state, int(chunk_size))
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  interpret = fw.default_interpret(interpret, ('tpu',), pltpu.InterpretParams)
  return _gla(q, k, v, log_alpha.astype(_F32), state.astype(_F32), scale,
              (int(chunk_size), interpret))
