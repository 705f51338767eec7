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

Backward (``jax.custom_vjp``, ``backward='pallas'``): for the gradient the forward kernel
also writes the float32 state before every chunk; the backward kernel (grid ``(B, N)``)
walks the chunks in reverse order carrying the state's cotangent ``dS^T`` in registers,
and per chunk recomputes the chunk from its inputs and saved state and applies its
transpose (:func:`~attnjax.kernels.linear_common.chunk_vjp`): ``dq``, per-query-head
``dk``/``dv``, ``dbeta``, the decay gradient and the cotangent of the state before the
chunk. The wrapper sums ``dk``/``dv`` over each GQA group and transposes the input
preparation (layout, padding, the in-chunk cumulative sum of ``log_alpha``) in XLA.
``backward='xla'`` selects the VJP of the XLA twin
:func:`~attnjax.kernels.linear_common.delta_rule_scan` instead (the reference).

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


def _pad_last(x, d):
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, d - x.shape[-1])]) if d != x.shape[-1] else x


def _padded_dims(H, V):
  return max(_MIN_DIM, pl.next_power_of_2(H)), max(_MIN_DIM, pl.next_power_of_2(V))


def _specs(Tp, G):
  """BlockSpec makers over the grid ``(B, N)``: ``row(d)`` the ``[Tp, d]`` sequence of a
  query head, ``kv(d)`` of its kv head ``n // G``, ``whole(*s)`` a per-(b, n) block."""
  row = lambda d: pl.BlockSpec((None, None, Tp, d), lambda b, n: (b, n, 0, 0))
  kv = lambda d: pl.BlockSpec((None, None, Tp, d), lambda b, n: (b, jax.lax.div(n, G), 0, 0))
  whole = lambda *s: pl.BlockSpec((None, None) + s, lambda b, n: (b, n) + (0,) * len(s))
  return row, kv, whole


def _call(kernel, name, grid, in_specs, out_specs, out_shape, bs, interpret):
  return pallas_shard.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
      interpret=interpret, name=name)


def _delta_chunk_vectors(b, g, q, k, v, st, scale):
  """:func:`~attnjax.kernels.linear_common.delta_chunk` taking beta and the cumulative
  log-decay as vectors (so each gets one gradient, row and column parts summed)."""
  return lc.delta_chunk(q, k, v, b[:, None], g[:, None], g[None, :], st, scale)


def _fwd_kernel(q_ref, k_ref, v_ref, b_ref, g_ref, s0_ref, o_ref, s_ref, *cs_ref, C, nc,
                scale):
  d = s0_ref.shape[0]

  def body(c, st):
    sl = pl.ds(pl.multiple_of(c * C, C), C)
    if cs_ref:                      # the state before this chunk (for backward)
      cs_ref[0][pl.ds(pl.multiple_of(c * d, d), d), :] = st
    o, st = _delta_chunk_vectors(b_ref[sl], g_ref[sl], q_ref[sl, :], k_ref[sl, :],
                                 v_ref[sl, :], st, scale)
    o_ref[sl, :] = o.astype(o_ref.dtype)
    return st

  s_ref[...] = jax.lax.fori_loop(0, nc, body, s0_ref[...])


def _delta_prep(q, k, v, beta, log_alpha, S0, C):
  """:func:`~attnjax.kernels.linear_common.delta_chunk_inputs` with the head dims padded."""
  Hp, Vp = _padded_dims(q.shape[-1], v.shape[-1])
  qh, kh, vh, bh, gc, St = lc.delta_chunk_inputs(q, k, v, beta, log_alpha, S0, C)
  St = _pad_last(jnp.pad(St, [(0, 0), (0, 0), (0, Hp - St.shape[2]), (0, 0)]), Vp)
  return _pad_last(qh, Hp), _pad_last(kh, Hp), _pad_last(vh, Vp), bh, gc, St


def _delta_forward(args, scale, static, with_states):
  C, _, bs, interpret = static
  q, k, v = args[:3]
  B, T, N, H = q.shape
  V = v.shape[-1]
  qh, kh, vh, bh, gc, St = _delta_prep(*args, C)
  Tp, (Hp, Vp) = qh.shape[2], St.shape[2:]
  row, kv, whole = _specs(Tp, N // k.shape[2])
  o, S, *states = _call(
      functools.partial(_fwd_kernel, C=C, nc=Tp // C, scale=scale), 'gated_delta_fwd',
      (B, N), [row(Hp), kv(Hp), kv(Vp), whole(Tp), whole(Tp), whole(Hp, Vp)],
      [row(Vp), whole(Hp, Vp)] + [whole(Tp // C * Hp, Vp)] * with_states,
      [jax.ShapeDtypeStruct((B, N, Tp, Vp), v.dtype),
       jax.ShapeDtypeStruct((B, N, Hp, Vp), _F32)]
      + [jax.ShapeDtypeStruct((B, N, Tp // C * Hp, Vp), _F32)] * with_states,
      bs, interpret,
  )(qh, kh, vh, bh, gc, St)
  return (jnp.swapaxes(o[:, :, :T, :V], 1, 2), jnp.swapaxes(S[:, :, :H, :V], -1, -2),
          *states)


def _bwd_kernel(*refs, chunk_fn, n, C, nc, scale):
  """Backward of either family, chunks in reverse order: refs are the ``n`` inputs
  (sequences, sliced per chunk along their first axis), the saved chunk states, ``do``, the
  final state's cotangent; the ``n`` input gradients, the initial state's cotangent."""
  ins, (cs_ref, do_ref, ds_ref) = refs[:n], refs[n:n + 3]
  outs, ds0_ref = refs[n + 3:2 * n + 3], refs[2 * n + 3]
  d = ds_ref.shape[0]

  def body(i, dst):
    c = nc - 1 - i
    sl = pl.ds(pl.multiple_of(c * C, C), C)
    st = cs_ref[pl.ds(pl.multiple_of(c * d, d), d), :]
    *grads, dst = lc.chunk_vjp(chunk_fn, tuple(r[sl] for r in ins) + (st,),
                               (do_ref[sl, :], dst), scale)
    for ref, g in zip(outs, grads):
      ref[sl] = g
    return dst

  ds0_ref[...] = jax.lax.fori_loop(0, nc, body, ds_ref[...])


def _delta_backward(args, states, ct, scale, static):
  C, _, bs, interpret = static
  q, k = args[:2]
  B, T, N, _ = q.shape
  G = N // k.shape[2]
  (qh, kh, vh, bh, gc, St), prep_vjp = jax.vjp(lambda *a: _delta_prep(*a, C), *args)
  Tp, (Hp, Vp) = qh.shape[2], St.shape[2:]
  row, kv, whole = _specs(Tp, G)
  shape = lambda *s: jax.ShapeDtypeStruct((B, N) + s, _F32)
  do = _pad_last(lc.head_major(ct[0], Tp), Vp)
  dS = jnp.swapaxes(ct[1], -1, -2)
  dS = _pad_last(jnp.pad(dS, [(0, 0), (0, 0), (0, Hp - dS.shape[2]), (0, 0)]), Vp)
  db, dg, dq, dk, dv, dSt = _call(
      functools.partial(_bwd_kernel, chunk_fn=_delta_chunk_vectors, n=5, C=C, nc=Tp // C,
                        scale=scale), 'gated_delta_bwd',
      (B, N), [whole(Tp), whole(Tp), row(Hp), kv(Hp), kv(Vp), whole(Tp // C * Hp, Vp),
               row(Vp), whole(Hp, Vp)],
      [whole(Tp), whole(Tp), row(Hp), row(Hp), row(Vp), whole(Hp, Vp)],
      [shape(Tp), shape(Tp), shape(Tp, Hp), shape(Tp, Hp), shape(Tp, Vp), shape(Hp, Vp)],
      bs, interpret,
  )(bh, gc, qh, kh, vh, states, do, dS)
  return prep_vjp((dq.astype(qh.dtype), lc.kv_group_sum(dk, G).astype(kh.dtype),
                   lc.kv_group_sum(dv, G).astype(vh.dtype), db, dg, dSt))


def gated_delta_rule(q, k, v, beta, log_alpha=None, state=None, *, scale: float | None = None,
                     chunk_size: int | None = None, block_sizes: BlockSizes | None = None,
                     interpret: bool | None = None, backward: str = 'pallas'):
  """Gated delta rule on GPU (Pallas Triton): forward and backward kernels (custom VJP).

  Args:
    q: ``[B, T, N, H]``. k: ``[B, T, K, H]``. v: ``[B, T, K, V]``; ``N % K == 0``.
    beta: ``[B, T, N]`` in ``[0, 1]``. log_alpha: ``[B, T, N]`` ``<= 0`` or None (DeltaNet).
    state: ``S [B, N, V, H]`` float32 or None (zeros).
    scale: multiplies ``q`` (default ``1/sqrt(H)``).
    chunk_size: tokens per chunk (overrides ``block_sizes.chunk``); power of two >= 16.
    interpret: interpret mode; default: when the backend is not GPU.
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
  if interpret is None:
    interpret = jax.default_backend() != 'gpu'
  return _delta((q, k, v, beta.astype(_F32), log_alpha.astype(_F32), state.astype(_F32)),
                scale, (bs.chunk, backward, bs, bool(interpret)))


_delta = lc.kernel_custom_vjp(_delta_forward, _delta_backward, lc.delta_rule_scan)


# --------------------------------------------------------------------------------------
# GLA
# --------------------------------------------------------------------------------------


def _gla_kernel(q_ref, k_ref, v_ref, b_ref, s0_ref, o_ref, s_ref, *cs_ref, C, nc, scale):
  d = s0_ref.shape[0]

  def body(c, st):
    sl = pl.ds(pl.multiple_of(c * C, C), C)
    if cs_ref:                      # the state before this chunk (for backward)
      cs_ref[0][pl.ds(pl.multiple_of(c * d, d), d), :] = st
    o, st = lc.gla_chunk(q_ref[sl, :], k_ref[sl, :], v_ref[sl, :], b_ref[sl, :], st, scale)
    o_ref[sl, :] = o.astype(o_ref.dtype)
    return st

  s_ref[...] = jax.lax.fori_loop(0, nc, body, s0_ref[...])


def _gla_prep(q, k, v, log_alpha, C):
  """:func:`~attnjax.kernels.linear_common.gla_chunk_inputs` with the head dims padded."""
  Hp, Vp = _padded_dims(q.shape[-1], v.shape[-1])
  qh, kh, vh, b = lc.gla_chunk_inputs(q, k, v, log_alpha, C)
  return _pad_last(qh, Hp), _pad_last(kh, Hp), _pad_last(vh, Vp), _pad_last(b, Hp)


def _pad_state(S, Vp, Hp):   # [B, N, V, H] -> [B, N, Vp, Hp]
  return _pad_last(jnp.pad(S, [(0, 0), (0, 0), (0, Vp - S.shape[2]), (0, 0)]), Hp)


def _gla_forward(args, scale, static, with_states):
  C, _, bs, interpret = static
  q, k, v, log_alpha, S0 = args
  B, T, N, H = q.shape
  V = v.shape[-1]
  qh, kh, vh, b = _gla_prep(q, k, v, log_alpha, C)
  Tp, Hp, Vp = qh.shape[2], qh.shape[3], vh.shape[3]
  row, kv, whole = _specs(Tp, N // k.shape[2])
  o, S, *states = _call(
      functools.partial(_gla_kernel, C=C, nc=Tp // C, scale=scale), 'gla_fwd', (B, N),
      [row(Hp), kv(Hp), kv(Vp), row(Hp), whole(Vp, Hp)],
      [row(Vp), whole(Vp, Hp)] + [whole(Tp // C * Vp, Hp)] * with_states,
      [jax.ShapeDtypeStruct((B, N, Tp, Vp), v.dtype),
       jax.ShapeDtypeStruct((B, N, Vp, Hp), _F32)]
      + [jax.ShapeDtypeStruct((B, N, Tp // C * Vp, Hp), _F32)] * with_states,
      bs, interpret,
  )(qh, kh, vh, b, _pad_state(S0, Vp, Hp))
  return (jnp.swapaxes(o[:, :, :T, :V], 1, 2), S[:, :, :V, :H], *states)


def _gla_backward(args, states, ct, scale, static):
  C, _, bs, interpret = static
  q, k = args[:2]
  B, T, N, H = q.shape
  G, V = N // k.shape[2], args[2].shape[-1]
  (qh, kh, vh, b), prep_vjp = jax.vjp(lambda *a: _gla_prep(*a, C), *args[:4])
  Tp, Hp, Vp = qh.shape[2], qh.shape[3], vh.shape[3]
  row, kv, whole = _specs(Tp, G)
  shape = lambda *s: jax.ShapeDtypeStruct((B, N) + s, _F32)
  dq, dk, dv, db, dS = _call(
      functools.partial(_bwd_kernel, chunk_fn=lc.gla_chunk, n=4, C=C, nc=Tp // C,
                        scale=scale), 'gla_bwd', (B, N),
      [row(Hp), kv(Hp), kv(Vp), row(Hp), whole(Tp // C * Vp, Hp), row(Vp), whole(Vp, Hp)],
      [row(Hp), row(Hp), row(Vp), row(Hp), whole(Vp, Hp)],
      [shape(Tp, Hp), shape(Tp, Hp), shape(Tp, Vp), shape(Tp, Hp), shape(Vp, Hp)],
      bs, interpret,
  )(qh, kh, vh, b, states, _pad_last(lc.head_major(ct[0], Tp), Vp),
    _pad_state(ct[1], Vp, Hp))
  grads = prep_vjp((dq.astype(qh.dtype), lc.kv_group_sum(dk, G).astype(kh.dtype),
                    lc.kv_group_sum(dv, G).astype(vh.dtype), db))
  return (*grads, dS[:, :, :V, :H])


_gla = lc.kernel_custom_vjp(_gla_forward, _gla_backward, lc.gla_scan)


def gated_linear_attention(q, k, v, log_alpha, state=None, *, scale: float | None = None,
                           chunk_size: int = 16, block_sizes: BlockSizes | None = None,
                           interpret: bool | None = None, backward: str = 'pallas'):
  """GLA on GPU (Pallas Triton): forward kernel (grid ``(B, N)``, a loop over chunks with
  the ``[V, H]`` f32 state in registers, exact ``[C, C, H]`` in-chunk decays of
  :func:`attnjax.kernels.linear_common.gla_chunk`) and a reverse-chunk-order backward
  kernel (as :func:`gated_delta_rule`'s), or with ``backward='xla'`` the VJP of the XLA
  twin :func:`~attnjax.kernels.linear_common.gla_scan`.

  Args:
    q: ``[B, T, N, H]``. k: ``[B, T, K, H]``. v: ``[B, T, K, V]``.
    log_alpha: ``[B, T, N, H]`` ``<= 0``. state: ``S [B, N, V, H]`` f32 or None.
    scale: default ``1/sqrt(H)``. chunk_size: power of two >= 16 (default 16).
    interpret: interpret mode; default: when the backend is not GPU.
    backward: as in :func:`gated_delta_rule`.

  Returns:
    ``(o [B, T, N, V] in v.dtype, S [B, N, V, H] float32)``.
  """
  lc.validate_backward(backward)
  bs = dataclasses.replace(block_sizes or BlockSizes.get_default(), chunk=int(chunk_size))
  state = lc.validate_gla(q, k, v, log_alpha, state, bs.chunk)
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  if interpret is None:
    interpret = jax.default_backend() != 'gpu'
  return _gla((q, k, v, log_alpha.astype(_F32), state.astype(_F32)), scale,
              (bs.chunk, backward, bs, bool(interpret)))
