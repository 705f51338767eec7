"""Pallas GPU (Triton) chunk kernel for the gated delta rule (Gated DeltaNet; DeltaNet is
the case ``log_alpha = 0``).

"Gated Delta Networks: Improving Mamba2 with Delta Rule" (Yang et al.); "Parallelizing
Linear Transformers with the Delta Rule over Sequence Length" (Yang et al.).

Recurrence per query head (state ``S [V, H]``, ``a_t = exp(log_alpha_t)``):

    S_t = a_t S_{t-1} + beta_t (v_t - a_t S_{t-1} k_t) k_t^T,      o_t = S_t (scale q_t).

Grid ``(B, N)``; each program walks its sequence chunk by chunk (``C`` tokens) keeping the
float32 state ``S^T [H, V]`` in registers; each chunk is the UT form of
:func:`attnjax.kernels.linear_common.delta_chunk` (the unit lower-triangular ``[C, C]``
system inverted by ``log2(C)`` rounds of matrix products). The wrapper pads ``T`` to a
multiple of the chunk and the head dims to powers of two (>= 16), as ``tl.dot`` needs
(zero padding changes nothing: padded key/query features are zero, padded value columns
are sliced off). Inputs may be bfloat16; products accumulate in float32.

Backward (``jax.custom_vjp``): the VJP of the XLA twin
:func:`~attnjax.kernels.linear_common.delta_rule_scan` (recomputed from the saved
inputs), not a Pallas kernel.

Public entry point: :func:`gated_delta_rule`.
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
from attnjax.kernels.gpu.linear import BlockSizes  # the lightning kernel's tiling, shared

__all__ = ["BlockSizes", "gated_delta_rule", "gated_linear_attention"]

_F32 = jnp.float32
_MIN_DIM = 16


def _fwd_kernel(q_ref, k_ref, v_ref, b_ref, g_ref, s0_ref, o_ref, s_ref, *, C, nc, scale):
  def body(c, st):
    sl = pl.ds(pl.multiple_of(c * C, C), C)
    b, g = b_ref[sl], g_ref[sl]
    o, st = lc.delta_chunk(q_ref[sl, :], k_ref[sl, :], v_ref[sl, :], b[:, None], g[:, None],
                           g[None, :], st, scale)
    o_ref[sl, :] = o.astype(o_ref.dtype)
    return st

  s_ref[...] = jax.lax.fori_loop(0, nc, body, s0_ref[...])


def _forward(q, k, v, beta, log_alpha, S0, scale, C, bs, interpret):
  B, T, N, H = q.shape
  K, V = k.shape[2], v.shape[-1]
  G = N // K
  Hp = max(_MIN_DIM, pl.next_power_of_2(H))
  Vp = max(_MIN_DIM, pl.next_power_of_2(V))
  qh, kh, vh, bh, gc, St = lc.delta_chunk_inputs(q, k, v, beta, log_alpha, S0, C)
  Tp = qh.shape[2]

  def padd(x, d):
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, d - x.shape[-1])]) if d != x.shape[-1] else x

  qh, kh, vh = padd(qh, Hp), padd(kh, Hp), padd(vh, Vp)
  St = padd(jnp.pad(St, [(0, 0), (0, 0), (0, Hp - H), (0, 0)]), Vp)
  row = lambda d: pl.BlockSpec((None, None, Tp, d), lambda b, n: (b, n, 0, 0))
  kv = lambda d: pl.BlockSpec((None, None, Tp, d), lambda b, n: (b, jax.lax.div(n, G), 0, 0))
  vec = pl.BlockSpec((None, None, Tp), lambda b, n: (b, n, 0))
  st_spec = pl.BlockSpec((None, None, Hp, Vp), lambda b, n: (b, n, 0, 0))
  o, S = pallas_shard.pallas_call(
      functools.partial(_fwd_kernel, C=C, nc=Tp // C, scale=scale),
      grid=(B, N), in_specs=[row(Hp), kv(Hp), kv(Vp), vec, vec, st_spec],
      out_specs=[row(Vp), st_spec],
      out_shape=[jax.ShapeDtypeStruct((B, N, Tp, Vp), v.dtype),
                 jax.ShapeDtypeStruct((B, N, Hp, Vp), _F32)],
      compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
      interpret=interpret, name='gated_delta_fwd',
  )(qh, kh, vh, bh, gc, St)
  return jnp.swapaxes(o[:, :, :T, :V], 1, 2), jnp.swapaxes(S[:, :, :H, :V], -1, -2)


def gated_delta_rule(q, k, v, beta, log_alpha=None, state=None, *, scale: float | None = None,
                     chunk_size: int | None = None, block_sizes: BlockSizes | None = None,
                     interpret: bool | None = None):
  """Gated delta rule on GPU (Pallas Triton): forward kernel, custom VJP.

  Args:
    q: ``[B, T, N, H]``. k: ``[B, T, K, H]``. v: ``[B, T, K, V]``; ``N % K == 0``.
    beta: ``[B, T, N]`` in ``[0, 1]``. log_alpha: ``[B, T, N]`` ``<= 0`` or None (DeltaNet).
    state: ``S [B, N, V, H]`` float32 or None (zeros).
    scale: multiplies ``q`` (default ``1/sqrt(H)``).
    chunk_size: tokens per chunk (overrides ``block_sizes.chunk``); power of two >= 16.
    interpret: interpret mode; default: when the backend is not GPU.

  Returns:
    ``(o [B, T, N, V] in v.dtype, S [B, N, V, H] float32)``.
  """
  bs = block_sizes or BlockSizes.get_default()
  if chunk_size is not None:
    bs = dataclasses.replace(bs, chunk=int(chunk_size))
  log_alpha, state = lc.validate_delta(q, k, v, beta, log_alpha, state, bs.chunk)
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  if interpret is None:
    interpret = jax.default_backend() != 'gpu'
  return _delta(q, k, v, beta.astype(_F32), log_alpha.astype(_F32), state.astype(_F32),
                scale, (bs.chunk, bs, bool(interpret)))


def _kernel_fwd(q, k, v, beta, log_alpha, S0, scale, static):
  chunk, bs, interpret = static
  return _forward(q, k, v, beta, log_alpha, S0, scale, chunk, bs, interpret)


_delta = lc.delta_rule_custom_vjp(_kernel_fwd)


# --------------------------------------------------------------------------------------
# GLA
# --------------------------------------------------------------------------------------


def _gla_kernel(q_ref, k_ref, v_ref, b_ref, s0_ref, o_ref, s_ref, *, C, nc, scale):
  def body(c, st):
    sl = pl.ds(pl.multiple_of(c * C, C), C)
    o, st = lc.gla_chunk(q_ref[sl, :], k_ref[sl, :], v_ref[sl, :], b_ref[sl, :], st, scale)
    o_ref[sl, :] = o.astype(o_ref.dtype)
    return st

  s_ref[...] = jax.lax.fori_loop(0, nc, body, s0_ref[...])


def _gla_forward(q, k, v, log_alpha, S0, scale, static):
  C, bs, interpret = static
  B, T, N, H = q.shape
  K, V = k.shape[2], v.shape[-1]
  G = N // K
  Hp = max(_MIN_DIM, pl.next_power_of_2(H))
  Vp = max(_MIN_DIM, pl.next_power_of_2(V))
  qh, kh, vh, b = lc.gla_chunk_inputs(q, k, v, log_alpha, C)
  Tp = qh.shape[2]

  def padd(x, d):
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, d - x.shape[-1])]) if d != x.shape[-1] else x

  qh, kh, vh, b = padd(qh, Hp), padd(kh, Hp), padd(vh, Vp), padd(b, Hp)
  S0 = padd(jnp.pad(S0, [(0, 0), (0, 0), (0, Vp - V), (0, 0)]), Hp)
  row = lambda d: pl.BlockSpec((None, None, Tp, d), lambda b_, n: (b_, n, 0, 0))
  kv = lambda d: pl.BlockSpec((None, None, Tp, d), lambda b_, n: (b_, jax.lax.div(n, G), 0, 0))
  st_spec = pl.BlockSpec((None, None, Vp, Hp), lambda b_, n: (b_, n, 0, 0))
  o, S = pallas_shard.pallas_call(
      functools.partial(_gla_kernel, C=C, nc=Tp // C, scale=scale),
      grid=(B, N), in_specs=[row(Hp), kv(Hp), kv(Vp), row(Hp), st_spec],
      out_specs=[row(Vp), st_spec],
      out_shape=[jax.ShapeDtypeStruct((B, N, Tp, Vp), v.dtype),
                 jax.ShapeDtypeStruct((B, N, Vp, Hp), _F32)],
      compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
      interpret=interpret, name='gla_fwd',
  )(qh, kh, vh, b, S0)
  return jnp.swapaxes(o[:, :, :T, :V], 1, 2), S[:, :, :V, :H]


_gla = lc.gla_custom_vjp(_gla_forward)


def gated_linear_attention(q, k, v, log_alpha, state=None, *, scale: float | None = None,
                           chunk_size: int = 16, block_sizes: BlockSizes | None = None,
                           interpret: bool | None = None):
  """GLA on GPU (Pallas Triton): forward kernel (grid ``(B, N)``, a loop over chunks with
  the ``[V, H]`` f32 state in registers, exact ``[C, C, H]`` in-chunk decays of
  :func:`attnjax.kernels.linear_common.gla_chunk`), custom VJP through the XLA twin
  :func:`~attnjax.kernels.linear_common.gla_scan`.

  Args:
    q: ``[B, T, N, H]``. k: ``[B, T, K, H]``. v: ``[B, T, K, V]``.
    log_alpha: ``[B, T, N, H]`` ``<= 0``. state: ``S [B, N, V, H]`` f32 or None.
    scale: default ``1/sqrt(H)``. chunk_size: power of two >= 16 (default 16).
    interpret: interpret mode; default: when the backend is not GPU.

  Returns:
    ``(o [B, T, N, V] in v.dtype, S [B, N, V, H] float32)``.
  """
  bs = dataclasses.replace(block_sizes or BlockSizes.get_default(), chunk=int(chunk_size))
  state = lc.validate_gla(q, k, v, log_alpha, state, bs.chunk)
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  if interpret is None:
    interpret = jax.default_backend() != 'gpu'
  return _gla(q, k, v, log_alpha.astype(_F32), state.astype(_F32), scale,
              (bs.chunk, bs, bool(interpret)))
