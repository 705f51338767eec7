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

Backward (``jax.custom_vjp``, ``backward='pallas'``): for the gradient the forward kernel
also writes the float32 state before every chunk; the backward kernel walks the chunks in
reverse order (grid ``(B, N, T // C)``, index maps ``nc - 1 - c``) carrying the state's
cotangent ``dS^T [H, V]`` in VMEM scratch, and per chunk recomputes the chunk from its
inputs and saved state and applies its transpose
(:func:`~attnjax.kernels.linear_common.chunk_vjp`): ``dq``, per-query-head ``dk``/``dv``,
``dbeta``, the decay gradient (column and row parts), and the cotangent of the state
before the chunk. The wrapper sums ``dk``/``dv`` over each GQA group and transposes the
input preparation (head-major layout, padding, the in-chunk cumulative sum of
``log_alpha``) in XLA. ``backward='xla'`` selects the VJP of the XLA twin
:func:`~attnjax.kernels.linear_common.delta_rule_scan` instead (same chunk math, the
reference of the kernel backward).

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
                *rest, scale):
  *cs_ref, st_ref = rest            # cs_ref: [the state before this chunk] (for backward)
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    st_ref[...] = s0_ref[...]

  if cs_ref:
    cs_ref[0][...] = st_ref[...]
  o, st = lc.delta_chunk(q_ref[...], k_ref[...], v_ref[...], b_ref[...], gcol_ref[...],
                         grow_ref[...], st_ref[...], scale)
  o_ref[...] = o.astype(o_ref.dtype)
  st_ref[...] = st

  @pl.when(c == pl.num_programs(2) - 1)
  def _():
    s_ref[...] = st


def _specs(C, G, nc, reverse=False):
  """BlockSpec makers over the grid ``(B, N, nc)``: ``row(d)`` a ``[C, d]`` block of a
  query-head array, ``kv(d)`` of the kv head ``n // G``, ``whole(*s)`` a per-(b, n) block,
  ``chunk(*s)`` a per-chunk block of a ``[B, N, nc, *s]`` array; chunk ``nc - 1 - c`` at
  step ``c`` when ``reverse``."""
  ci = (lambda c: nc - 1 - c) if reverse else (lambda c: c)
  row = lambda d: pl.BlockSpec((None, None, C, d), lambda b, n, c: (b, n, ci(c), 0))
  kv = lambda d: pl.BlockSpec((None, None, C, d),
                              lambda b, n, c: (b, jax.lax.div(n, G), ci(c), 0))
  whole = lambda *s: pl.BlockSpec((None, None) + s, lambda b, n, c: (b, n) + (0,) * len(s))
  chunk = lambda *s: pl.BlockSpec((None, None, None) + s,
                                  lambda b, n, c: (b, n, ci(c)) + (0,) * len(s))
  return row, kv, whole, chunk


def _call(kernel, name, grid, in_specs, out_specs, out_shape, scratch, interpret):
  return pallas_shard.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM(x, _F32) for x in scratch],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'arbitrary')),
      interpret=interpret, name=name)


def _delta_forward(args, scale, static, with_states):
  C, _, interpret = static
  q, k, v = args[:3]
  B, T, N, H = q.shape
  K, V = k.shape[2], v.shape[-1]
  qh, kh, vh, bh, gc, St = lc.delta_chunk_inputs(*args, C)
  Tp = qh.shape[2]
  nc = Tp // C
  row, kv, whole, chunk = _specs(C, N // K, nc)
  out_specs = [row(V), whole(H, V)] + [chunk(H, V)] * with_states
  out_shape = [jax.ShapeDtypeStruct((B, N, Tp, V), v.dtype),
               jax.ShapeDtypeStruct((B, N, H, V), _F32)]
  out_shape += [jax.ShapeDtypeStruct((B, N, nc, H, V), _F32)] * with_states
  o, S, *states = _call(
      functools.partial(_fwd_kernel, scale=scale), 'gated_delta_fwd', (B, N, nc),
      [row(H), kv(H), kv(V), row(1), row(1), chunk(1, C), whole(H, V)], out_specs,
      out_shape, [(H, V)], interpret,
  )(qh, kh, vh, bh[..., None], gc[..., None], gc.reshape(B, N, nc, 1, C), St)
  return (jnp.swapaxes(o[:, :, :T], 1, 2), jnp.swapaxes(S, -1, -2), *states)


def _bwd_kernel(*refs, chunk_fn, n, scale):
  """Backward step (chunk ``nc - 1 - c``) of either family: refs are the chunk's ``n``
  inputs, its saved state, ``do``, the final state's cotangent; the ``n`` input gradients,
  the initial state's cotangent; the scratch ``dS`` carried towards the first chunk."""
  ins, (cs_ref, do_ref, ds_ref) = refs[:n], refs[n:n + 3]
  outs, ds0_ref, acc_ref = refs[n + 3:2 * n + 3], refs[2 * n + 3], refs[2 * n + 4]
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    acc_ref[...] = ds_ref[...]

  grads = lc.chunk_vjp(chunk_fn, tuple(r[...] for r in ins) + (cs_ref[...],),
                       (do_ref[...], acc_ref[...]), scale)
  for ref, g in zip(outs + (acc_ref,), grads):
    ref[...] = g

  @pl.when(c == pl.num_programs(2) - 1)
  def _():
    ds0_ref[...] = acc_ref[...]


def _delta_backward(args, states, ct, scale, static):
  C, _, interpret = static
  q, k = args[:2]
  B, T, N, H = q.shape
  G, V = N // k.shape[2], args[2].shape[-1]
  (qh, kh, vh, bh, gc, St), prep_vjp = jax.vjp(
      lambda *a: lc.delta_chunk_inputs(*a, C), *args)
  Tp = qh.shape[2]
  nc = Tp // C
  row, kv, whole, chunk = _specs(C, G, nc, reverse=True)
  shape = lambda *s: jax.ShapeDtypeStruct((B, N) + s, _F32)
  dq, dk, dv, db, dgcol, dgrow, dSt = _call(
      functools.partial(_bwd_kernel, chunk_fn=lc.delta_chunk, n=6, scale=scale),
      'gated_delta_bwd', (B, N, nc),
      [row(H), kv(H), kv(V), row(1), row(1), chunk(1, C), chunk(H, V), row(V), whole(H, V)],
      [row(H), row(H), row(V), row(1), row(1), chunk(1, C), whole(H, V)],
      [shape(Tp, H), shape(Tp, H), shape(Tp, V), shape(Tp, 1), shape(Tp, 1),
       shape(nc, 1, C), shape(H, V)], [(H, V)], interpret,
  )(qh, kh, vh, bh[..., None], gc[..., None], gc.reshape(B, N, nc, 1, C), states,
    lc.head_major(ct[0], Tp), jnp.swapaxes(ct[1], -1, -2))
  return prep_vjp((dq.astype(qh.dtype), lc.kv_group_sum(dk, G).astype(kh.dtype),
                   lc.kv_group_sum(dv, G).astype(vh.dtype), db[..., 0],
                   dgcol[..., 0] + dgrow.reshape(B, N, Tp), dSt))


def gated_delta_rule(q, k, v, beta, log_alpha=None, state=None, *, scale: float | None = None,
                     chunk_size: int | None = None, block_sizes: BlockSizes | None = None,
                     interpret=None, backward: str = 'pallas'):
  """Gated delta rule on TPU (Pallas Mosaic): forward and backward kernels (custom VJP).

  Args:
    q: ``[B, T, N, H]``. k: ``[B, T, K, H]``. v: ``[B, T, K, V]``; ``N % K == 0``.
    beta: ``[B, T, N]`` in ``[0, 1]``. log_alpha: ``[B, T, N]`` ``<= 0`` or None (DeltaNet).
    state: ``S [B, N, V, H]`` float32 or None (zeros).
    scale: multiplies ``q`` (default ``1/sqrt(H)``).
    chunk_size: tokens per chunk (overrides ``block_sizes.chunk``); multiple of 8.
    interpret: interpret mode (default: when the backend is not TPU); a
      ``pltpu.InterpretParams`` selects the TPU-semantics interpreter.
    backward: ``'pallas'`` (the reverse-chunk-order backward kernel) or ``'xla'`` (the VJP
      of the XLA twin :func:`~attnjax.kernels.linear_common.delta_rule_scan`).

  Returns:
    ``(o [B, T, N, V] in v.dtype, S [B, N, V, H] float32)``.
  """
  lc.validate_backward(backward)
  bs = block_sizes or BlockSizes.get_default()
  if chunk_size is not None:
    bs = dataclasses.replace(bs, chunk=int(chunk_size))
  log_alpha, state = lc.validate_delta(q, k, v, beta, log_alpha, state, bs.chunk)
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  interpret = fw.default_interpret(interpret, ('tpu',), pltpu.InterpretParams)
  return _delta((q, k, v, beta.astype(_F32), log_alpha.astype(_F32), state.astype(_F32)),
                scale, (bs.chunk, backward, interpret))


_delta = lc.kernel_custom_vjp(_delta_forward, _delta_backward, lc.delta_rule_scan)


# --------------------------------------------------------------------------------------
# GLA
# --------------------------------------------------------------------------------------


def _gla_kernel(q_ref, k_ref, v_ref, b_ref, s0_ref, o_ref, s_ref, *rest, scale):
  *cs_ref, st_ref = rest            # cs_ref: [the state before this chunk] (for backward)
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    st_ref[...] = s0_ref[...]

  if cs_ref:
    cs_ref[0][...] = st_ref[...]
  o, st = lc.gla_chunk(q_ref[...], k_ref[...], v_ref[...], b_ref[...], st_ref[...], scale)
  o_ref[...] = o.astype(o_ref.dtype)
  st_ref[...] = st

  @pl.when(c == pl.num_programs(2) - 1)
  def _():
    s_ref[...] = st


def _gla_forward(args, scale, static, with_states):
  C, _, interpret = static
  q, k, v, log_alpha, S0 = args
  B, T, N, H = q.shape
  K, V = k.shape[2], v.shape[-1]
  qh, kh, vh, b = lc.gla_chunk_inputs(q, k, v, log_alpha, C)
  Tp = qh.shape[2]
  nc = Tp // C
  row, kv, whole, chunk = _specs(C, N // K, nc)
  out_shape = [jax.ShapeDtypeStruct((B, N, Tp, V), v.dtype),
               jax.ShapeDtypeStruct((B, N, V, H), _F32)]
  out_shape += [jax.ShapeDtypeStruct((B, N, nc, V, H), _F32)] * with_states
  o, S, *states = _call(
      functools.partial(_gla_kernel, scale=scale), 'gla_fwd', (B, N, nc),
      [row(H), kv(H), kv(V), row(H), whole(V, H)],
      [row(V), whole(V, H)] + [chunk(V, H)] * with_states, out_shape, [(V, H)], interpret,
  )(qh, kh, vh, b, S0)
  return (jnp.swapaxes(o[:, :, :T], 1, 2), S, *states)


def _gla_backward(args, states, ct, scale, static):
  C, _, interpret = static
  q, k = args[:2]
  B, T, N, H = q.shape
  G, V = N // k.shape[2], args[2].shape[-1]
  (qh, kh, vh, b), prep_vjp = jax.vjp(lambda *a: lc.gla_chunk_inputs(*a, C), *args[:4])
  Tp = qh.shape[2]
  nc = Tp // C
  row, kv, whole, chunk = _specs(C, G, nc, reverse=True)
  shape = lambda *s: jax.ShapeDtypeStruct((B, N) + s, _F32)
  dq, dk, dv, db, dS = _call(
      functools.partial(_bwd_kernel, chunk_fn=lc.gla_chunk, n=4, scale=scale), 'gla_bwd',
      (B, N, nc),
      [row(H), kv(H), kv(V), row(H), chunk(V, H), row(V), whole(V, H)],
      [row(H), row(H), row(V), row(H), whole(V, H)],
      [shape(Tp, H), shape(Tp, H), shape(Tp, V), shape(Tp, H), shape(V, H)], [(V, H)],
      interpret,
  )(qh, kh, vh, b, states, lc.head_major(ct[0], Tp), ct[1])
  grads = prep_vjp((dq.astype(qh.dtype), lc.kv_group_sum(dk, G).astype(kh.dtype),
                    lc.kv_group_sum(dv, G).astype(vh.dtype), db))
  return (*grads, dS)


_gla = lc.kernel_custom_vjp(_gla_forward, _gla_backward, lc.gla_scan)


def gated_linear_attention(q, k, v, log_alpha, state=None, *, scale: float | None = None,
                           chunk_size: int = 16, interpret=None, backward: str = 'pallas'):
  """GLA on TPU (Pallas Mosaic): forward kernel (grid ``(B, N, T // C)``, state ``[V, H]``
  f32 in VMEM scratch, exact ``[C, C, H]`` in-chunk decays of
  :func:`attnjax.kernels.linear_common.gla_chunk`) and a reverse-chunk-order backward
  kernel (as :func:`gated_delta_rule`'s), or with ``backward='xla'`` the VJP of the XLA
  twin :func:`~attnjax.kernels.linear_common.gla_scan`.

  Args:
    q: ``[B, T, N, H]``. k: ``[B, T, K, H]``. v: ``[B, T, K, V]``.
    log_alpha: ``[B, T, N, H]`` ``<= 0``. state: ``S [B, N, V, H]`` f32 or None.
    scale: default ``1/sqrt(H)``. chunk_size: multiple of 8 (default 16: the body holds
      ``[C, C, H]`` f32 decays).
    interpret, backward: as in :func:`gated_delta_rule`.

  Returns:
    ``(o [B, T, N, V] in v.dtype, S [B, N, V, H] float32)``.
  """
  lc.validate_backward(backward)
  BlockSizes(chunk=int(chunk_size))
  state = lc.validate_gla(q, k, v, log_alpha, state, int(chunk_size))
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  interpret = fw.default_interpret(interpret, ('tpu',), pltpu.InterpretParams)
  return _gla((q, k, v, log_alpha.astype(_F32), state.astype(_F32)), scale,
              (int(chunk_size), backward, interpret))
