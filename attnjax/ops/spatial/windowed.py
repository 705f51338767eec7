"""Mask-based spatial attention: windows, neighborhoods, halos, stripes, criss-cross and
MaxViT's block/grid attention on ``[B, *spatial, N, H]`` maps.

Every op here is softmax attention over the row-major flattening of the map with a
static :mod:`attnjax.masks` predicate (never a materialised ``[T, S]`` array), so each
implementation of :func:`attnjax.attention` (reached through
:func:`attnjax.core.hooks.attention`) serves it, and the block-sparse kernels skip the
empty tiles.  Relative-position tables are score mods
(:func:`attnjax.score_mods.grid_relative_position_bias`), differentiable everywhere.

Common conventions: ``q [B, *spatial, N, H]``, ``k [B, *spatial, K, H]``,
``v [B, *spatial, K, Hv]`` on the same map (``N % K == 0``, GQA); keyword-only options;
``scale`` defaults to ``1/sqrt(H)``; logits and softmax in float32; the output is
``[B, *spatial, N, Hv]`` in ``q.dtype``; ``implementation`` (and ``block_sizes``) go to
the dispatcher unchanged.  See ``docs/spatial.md``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import jax.numpy as jnp
import numpy as np

from attnjax import masks as _masks
from attnjax import score_mods as _score_mods
from attnjax.core import hooks
from attnjax.core.softmax import merge_partials

__all__ = ["window_attention", "neighborhood_attention", "halo_attention",
           "criss_cross_attention", "stripe_attention", "stripe_heads", "grid_attention",
           "block_attention"]

IntOrSeq = Union[int, Sequence[int]]


# ----------------------------------------------------------------------------- helpers

def _maps(op, q, k, v, ndims):
  """Checks ``q, k, v`` are ``[B, *spatial, heads, dim]`` on one map; returns the map."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "ndim") or not hasattr(x, "shape"):
      raise TypeError(f"{op}: {name} must be an array, got {type(x).__name__}")
  nd = q.ndim - 3
  if nd not in ndims:
    want = " or ".join(str(n + 3) for n in ndims)
    layout = "[B, Hh, Ww, N, H]" if ndims == (2,) else "[B, *spatial, N, H]"
    raise ValueError(f"{op}: q must be {layout} (rank {want}: {ndims} spatial axes), got shape "
                     f"{tuple(q.shape)}")
  spatial = tuple(int(s) for s in q.shape[1:-2])
  for name, x in (("k", k), ("v", v)):
    if x.ndim != q.ndim or tuple(x.shape[:-2]) != tuple(q.shape[:-2]):
      raise ValueError(f"{op}: {name} must be [B, *spatial, K, dim] on the map of q, i.e. "
                       f"{tuple(q.shape[:-2])} + (K, dim); got shape {tuple(x.shape)}")
  return spatial


def _per_axis(op, name, value, nd, *, minimum):
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    value = (int(value),) * nd
  if not isinstance(value, (tuple, list)) or len(value) != nd:
    raise ValueError(f"{op}: {name} must be an int or a tuple of {nd} ints, got {value!r}")
  out = []
  for x in value:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
      raise TypeError(f"{op}: {name} must hold ints, got {value!r}")
    if x < minimum:
      raise ValueError(f"{op}: {name} must be >= {minimum} per axis, got {name}={value!r}")
    out.append(int(x))
  return tuple(out)


def _check_rpb(op, rpb, num_heads, widths, what):
  want = (num_heads,) + tuple(widths)
  if not hasattr(rpb, "shape") or not hasattr(rpb, "dtype"):
    raise TypeError(f"{op}: rpb must be an array of shape {want}, got {type(rpb).__name__}")
  if tuple(rpb.shape) != want:
    raise ValueError(f"{op}: rpb must have shape [N, {what}] = {want}, got shape "
                     f"{tuple(rpb.shape)}")
  if not jnp.issubdtype(rpb.dtype, jnp.floating):
    raise TypeError(f"{op}: rpb must be floating point, got dtype {rpb.dtype}")


def _run(q, k, v, spatial, mask, score_mod, scale, implementation, block_sizes):
  """Flattens the map, calls the dispatcher, restores ``[B, *spatial, N, Hv]``."""
  B, N, H = q.shape[0], q.shape[-2], q.shape[-1]
  K, Hv = k.shape[-2], v.shape[-1]
  T = math.prod(spatial)
  out = hooks.attention(q.reshape(B, T, N, H), k.reshape(B, T, K, H), v.reshape(B, T, K, Hv),
                        mask=mask, score_mod=score_mod, scale=scale,
                        implementation=implementation, block_sizes=block_sizes)
  return out.reshape((B,) + spatial + (N, Hv))


def _divides(op, name, size, spatial):
  for L, s in zip(spatial, size):
    if L % s:
      raise ValueError(f"{op}: {name} must divide the map per axis; got {name}={size} for the "
                       f"map {spatial}")


# ----------------------------------------------------------------------------- Swin

def window_attention(q, k, v, *, window_size: IntOrSeq, shift: IntOrSeq = 0, rpb=None,
                     scale: Optional[float] = None, implementation=None, block_sizes=None):
  """Swin (shifted) window attention, W-MSA / SW-MSA, on a 2D map.

  The map is split into ``wh x ww`` windows; each token attends to the tokens of its
  window.  With ``shift = (sh, sw) > 0`` the map is first rolled by ``-shift``, windows
  are taken on the rolled map with Swin's region mask (per axis the rolled positions
  ``[0, L - w)``, ``[L - w, L - s)``, ``[L - s, L)`` are regions; tokens of different
  regions never attend), and the output is rolled back by ``+shift`` -- computed here
  in place as the mask :func:`attnjax.masks.window` (nothing is rolled).

  ``logit_ij = scale q_i.k_j + rpb[h, yi - yj + wh - 1, xi - xj + ww - 1]`` with
  ``(y, x)`` the positions inside the window (query minus key).

  Paper: "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows".

  Args:
    q: ``[B, Hh, Ww, N, H]``; k: ``[B, Hh, Ww, K, H]``; v: ``[B, Hh, Ww, K, Hv]``.
    window_size: int or ``(wh, ww)``, dividing ``(Hh, Ww)``.
    shift: int or ``(sh, sw)``, ``0 <= shift < window_size``.
    rpb: optional float ``[N, 2 wh - 1, 2 ww - 1]`` relative position bias (learnable).
    scale: logit scale (default ``1/sqrt(H)``).
    implementation, block_sizes: passed to :func:`attnjax.attention`.
  Returns:
    ``[B, Hh, Ww, N, Hv]``.
  """
  op = "window_attention"
  spatial = _maps(op, q, k, v, (2,))
  win = _per_axis(op, "window_size", window_size, 2, minimum=1)
  sh = _per_axis(op, "shift", shift, 2, minimum=0)
  _divides(op, "window_size", win, spatial)
  if any(s >= w for s, w in zip(sh, win)):
    raise ValueError(f"{op}: shift must be < window_size per axis; got shift={sh}, "
                     f"window_size={win}")
  mask = _masks.window(spatial, win, sh)
  mod = None
  if rpb is not None:
    _check_rpb(op, rpb, q.shape[-2], [2 * w - 1 for w in win], "2*wh-1, 2*ww-1")
    mod = _score_mods.grid_relative_position_bias(rpb, shape=spatial, query_minus_key=True)
  return _run(q, k, v, spatial, mask, mod, scale, implementation, block_sizes)


# ----------------------------------------------------------------------------- NATTEN

def neighborhood_attention(q, k, v, *, kernel_size: IntOrSeq, dilation: IntOrSeq = 1,
                           causal: Union[bool, Sequence[bool]] = False, rpb=None,
                           scale: Optional[float] = None, implementation=None,
                           block_sizes=None):
  """Neighborhood attention (NATTEN semantics) on 1D, 2D or 3D maps.

  Per axis of length ``L`` with kernel ``k`` (odd) and dilation ``d``: positions split
  into ``d`` groups by ``i mod d``; in a group of length ``L_r``, query group index ``g``
  attends to the ``k`` consecutive group indices starting at ``clamp(g - k//2, 0,
  L_r - k)`` (windows clamped at the borders: every query sees ``prod(k)`` keys), or to
  ``[max(g - k + 1, 0), g]`` on a causal axis.  A key is attended iff it is in the
  window on every axis (:func:`attnjax.masks.neighborhood`).

  ``logit_ij = scale q_i.k_j + rpb[h, ..., (jg - ig) + k - 1, ...]`` (key minus query in
  group indices, per axis; non-causal only).

  Papers: "Neighborhood Attention Transformer"; "Dilated Neighborhood Attention
  Transformer"; "Faster Neighborhood Attention".

  Args:
    q: ``[B, *spatial, N, H]`` with 1 to 3 spatial axes; k, v on the same map.
    kernel_size: odd int or one per axis, ``kernel_size * dilation <= L`` per axis.
    dilation: int or one per axis (>= 1).
    causal: bool or one per axis.
    rpb: optional float ``[N, *(2 k - 1)]`` (not with ``causal``).
    scale, implementation, block_sizes: as in :func:`window_attention`.
  Returns:
    ``[B, *spatial, N, Hv]``.
  """
  op = "neighborhood_attention"
  spatial = _maps(op, q, k, v, (1, 2, 3))
  nd = len(spatial)
  ks = _per_axis(op, "kernel_size", kernel_size, nd, minimum=1)
  ds = _per_axis(op, "dilation", dilation, nd, minimum=1)
  if any(x % 2 == 0 for x in ks):
    raise ValueError(f"{op}: kernel_size must be odd per axis, got kernel_size={ks}")
  for L, kk, dd in zip(spatial, ks, ds):
    if kk * dd > L:
      raise ValueError(f"{op}: kernel_size * dilation must be <= the map size per axis; got "
                       f"kernel_size={ks}, dilation={ds} for the map {spatial}")
  if isinstance(causal, (bool, np.bool_)):
    cs = (bool(causal),) * nd
  else:
    cs = tuple(causal) if isinstance(causal, (tuple, list)) else None
    if cs is None or len(cs) != nd or not all(isinstance(c, (bool, np.bool_)) for c in cs):
      raise ValueError(f"{op}: causal must be a bool or a tuple of {nd} bools, got {causal!r}")
    cs = tuple(bool(c) for c in cs)
  mask = _masks.neighborhood(spatial, ks, ds, cs)
  mod = None
  if rpb is not None:
    if any(cs):
      raise ValueError(f"{op}: rpb is only supported with causal=False (NATTEN has no causal "
                       f"relative position bias); got causal={causal!r}")
    _check_rpb(op, rpb, q.shape[-2], [2 * x - 1 for x in ks], "*(2*kernel_size-1)")
    mod = _score_mods.grid_relative_position_bias(rpb, shape=spatial, dilation=ds)
  return _run(q, k, v, spatial, mask, mod, scale, implementation, block_sizes)


# ----------------------------------------------------------------------------- HaloNet

def halo_attention(q, k, v, *, block_size: IntOrSeq, halo_size: IntOrSeq,
                   scale: Optional[float] = None, implementation=None, block_sizes=None):
  """HaloNet blocked local self-attention with halos, on a 2D map.

  Queries are grouped in ``block_size`` x ``block_size`` blocks (the last block of an
  axis is shorter when ``block_size`` does not divide it, as if the map were padded);
  the queries of a block attend to the keys of the block grown by ``halo_size`` on each
  side, clipped to the map (positions outside the map, HaloNet's padding, are never
  attended): per axis, block ``i`` sees ``[i b - h, (i + 1) b + h)``
  (:func:`attnjax.masks.halo`).

  Paper: "Scaling Local Self-Attention for Parameter Efficient Visual Backbones".

  Args:
    q: ``[B, Hh, Ww, N, H]``; k, v on the same map.
    block_size: int or ``(bh, bw)``, ``1 <= block_size <= (Hh, Ww)``.
    halo_size: int or ``(hh, hw)``, ``>= 0``.
    scale, implementation, block_sizes: as in :func:`window_attention`.
  Returns:
    ``[B, Hh, Ww, N, Hv]``.
  """
  op = "halo_attention"
  spatial = _maps(op, q, k, v, (2,))
  blk = _per_axis(op, "block_size", block_size, 2, minimum=1)
  hl = _per_axis(op, "halo_size", halo_size, 2, minimum=0)
  if any(b > L for b, L in zip(blk, spatial)):
    raise ValueError(f"{op}: block_size must be <= the map size per axis; got "
                     f"block_size={blk} for the map {spatial}")
  return _run(q, k, v, spatial, _masks.halo(spatial, blk, hl), None, scale, implementation,
              block_sizes)


# ----------------------------------------------------------------------------- CCNet

def criss_cross_attention(q, k, v, *, scale: Optional[float] = None, implementation=None,
                          block_sizes=None):
  """Criss-cross attention on a 2D map: position ``(y, x)`` attends to its whole row and
  whole column in one softmax, itself counted once (:func:`attnjax.masks.criss_cross`).

  Paper: "CCNet: Criss-Cross Attention for Semantic Segmentation" (the recurrent R=2
  application is the layer's, ``attnjax.layers`` variant ``'ccnet'``).

  Args:
    q: ``[B, Hh, Ww, N, H]``; k, v on the same map.
    scale, implementation, block_sizes: as in :func:`window_attention`.
  Returns:
    ``[B, Hh, Ww, N, Hv]``.
  """
  op = "criss_cross_attention"
  spatial = _maps(op, q, k, v, (2,))
  if block_sizes is not None or hooks.observing():
    # given block sizes are for the masked call; an analysis capture sees one call
    return _run(q, k, v, spatial, _masks.criss_cross(spatial), None, scale, implementation,
                block_sizes)
  return _criss_cross_split(q, k, v, scale, implementation)


def _criss_cross_split(q, k, v, scale, implementation):
  """Criss-cross attention as two dense calls merged by their log-sum-exps: each row of
  the map as a batch entry (the row, self included), and each column, transposed, with
  the diagonal masked out (the column less self).  Exactly the ``Hh + Ww - 1`` allowed
  keys per query are scored (``(Hh + Ww) / (Hh * Ww)`` of dense; the masked call's 2D
  tiles compute about 8x that on a 128 x 128 map)."""
  B, Hh, Ww, N, _ = q.shape
  Hv = v.shape[-1]
  rows = lambda x: x.reshape(B * Hh, Ww, x.shape[-2], x.shape[-1])
  cols = lambda x: jnp.swapaxes(x, 1, 2).reshape(B * Ww, Hh, x.shape[-2], x.shape[-1])
  o_r, lse_r = hooks.attention(rows(q), rows(k), rows(v), scale=scale,
                               implementation=implementation, return_lse=True)
  o_c, lse_c = hooks.attention(cols(q), cols(k), cols(v), mask=~_masks.sliding_window(0, 0),
                               scale=scale, implementation=implementation, return_lse=True)
  # back to [B, Hh, Ww, ...]: rows are [B*Hh, Ww], columns [B*Ww, Hh]
  o_c = jnp.swapaxes(o_c.reshape(B, Ww, Hh, N, Hv), 1, 2)
  lse_c = jnp.transpose(lse_c.reshape(B, Ww, N, Hh), (0, 3, 1, 2))  # [B, Hh, Ww, N]
  o_r = o_r.reshape(B, Hh, Ww, N, Hv)
  lse_r = jnp.transpose(lse_r.reshape(B, Hh, N, Ww), (0, 1, 3, 2))  # [B, Hh, Ww, N]
  out, _ = merge_partials(o_r, lse_r, o_c, lse_c)
  return out.astype(q.dtype)


# ----------------------------------------------------------------------------- CSWin

def stripe_heads(num_heads: int) -> int:
  """The number of heads of :func:`stripe_attention` that use horizontal stripes:
  ``ceil(N / 2)`` (the rest, ``floor(N / 2)``, use vertical stripes; ``N = 1`` is
  horizontal only)."""
  return (int(num_heads) + 1) // 2


def stripe_attention(q, k, v, *, stripe_width: IntOrSeq, scale: Optional[float] = None,
                     implementation=None, block_sizes=None):
  """CSWin cross-shaped window attention on a 2D map.

  The heads are split in two groups: heads ``[0, ceil(N/2))`` attend within horizontal
  stripes of ``sw_h`` consecutive rows (``y_i // sw_h == y_j // sw_h``), heads
  ``[ceil(N/2), N)`` within vertical stripes of ``sw_v`` columns
  (``x_i // sw_v == x_j // sw_v``); for odd ``N`` the horizontal group has the extra head.
  The last stripe is shorter when the width does not divide the map
  (:func:`attnjax.masks.stripe`).  Under GQA the kv head of query head ``n`` is
  ``n // (N/K)`` as in every op.  LePE (CSWin's positional term) belongs to the layer
  (variant ``'cswin'``).

  Paper: "CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped
  Windows".

  Args:
    q: ``[B, Hh, Ww, N, H]``; k, v on the same map.
    stripe_width: int or ``(sw_h, sw_v)``: rows per horizontal stripe (``<= Hh``), columns
      per vertical stripe (``<= Ww``).
    scale, implementation, block_sizes: as in :func:`window_attention`.
  Returns:
    ``[B, Hh, Ww, N, Hv]``.
  """
  op = "stripe_attention"
  spatial = _maps(op, q, k, v, (2,))
  sw = _per_axis(op, "stripe_width", stripe_width, 2, minimum=1)
  if any(w > L for w, L in zip(sw, spatial)):
    raise ValueError(f"{op}: stripe_width must be <= the map size per axis (rows for the "
                     f"horizontal stripes, columns for the vertical ones); got "
                     f"stripe_width={sw} for the map {spatial}")
  N, K = q.shape[-2], k.shape[-2]
  if N % K:
    raise ValueError(f"{op}: the number of query heads N={N} must be a multiple of the kv "
                     f"heads K={K}")
  n1 = stripe_heads(N)
  g = N // K
  if n1 % g == 0:
    c = n1 // g
    k1, k2, v1, v2 = k[..., :c, :], k[..., c:, :], v[..., :c, :], v[..., c:, :]
  else:  # the split falls inside a kv group: give each query head its own kv head
    kr, vr = jnp.repeat(k, g, axis=-2), jnp.repeat(v, g, axis=-2)
    k1, k2, v1, v2 = kr[..., :n1, :], kr[..., n1:, :], vr[..., :n1, :], vr[..., n1:, :]
  outs = [_run(q[..., :n1, :], k1, v1, spatial, _masks.stripe(spatial, sw[0], 0), None, scale,
               implementation, block_sizes)]
  if n1 < N:
    outs.append(_run(q[..., n1:, :], k2, v2, spatial, _masks.stripe(spatial, sw[1], 1), None,
                     scale, implementation, block_sizes))
  return jnp.concatenate(outs, axis=-2)


# ----------------------------------------------------------------------------- MaxViT

def block_attention(q, k, v, *, block_size: IntOrSeq, rpb=None, scale: Optional[float] = None,
                    implementation=None, block_sizes=None):
  """MaxViT block attention: non-overlapping ``P x P`` windows (local), i.e.
  :func:`window_attention` without shift.

  ``rpb [N, 2 Ph - 1, 2 Pw - 1]``: ``logit += rpb[h, yi - yj + Ph - 1, xi - xj + Pw - 1]``
  (query minus key, positions inside the block).

  Paper: "MaxViT: Multi-Axis Vision Transformer".

  Args:
    q: ``[B, Hh, Ww, N, H]``; k, v on the same map.
    block_size: int or ``(Ph, Pw)``, dividing ``(Hh, Ww)``.
    rpb, scale, implementation, block_sizes: as in :func:`window_attention`.
  Returns:
    ``[B, Hh, Ww, N, Hv]``.
  """
  op = "block_attention"
  spatial = _maps(op, q, k, v, (2,))
  blk = _per_axis(op, "block_size", block_size, 2, minimum=1)
  _divides(op, "block_size", blk, spatial)
  mod = None
  if rpb is not None:
    _check_rpb(op, rpb, q.shape[-2], [2 * b - 1 for b in blk], "2*Ph-1, 2*Pw-1")
    mod = _score_mods.grid_relative_position_bias(rpb, shape=spatial, query_minus_key=True)
  return _run(q, k, v, spatial, _masks.window(spatial, blk), mod, scale, implementation,
              block_sizes)


def grid_attention(q, k, v, *, grid_size: IntOrSeq, rpb=None, scale: Optional[float] = None,
                   implementation=None, block_sizes=None):
  """MaxViT grid attention (dilated, global): a ``G x G`` grid over the map.

  With strides ``(sh, sw) = (Hh / Gh, Ww / Gw)``, token ``(y, x)`` attends to the
  ``Gh * Gw`` tokens ``(y', x')`` with ``y' = y mod sh`` and ``x' = x mod sw`` equal
  (MaxViT's reshape ``[Gh, sh, Gw, sw] -> [sh, sw, Gh * Gw]``;
  :func:`attnjax.masks.grid`).

  ``rpb [N, 2 Gh - 1, 2 Gw - 1]``: ``logit += rpb[h, gy_i - gy_j + Gh - 1, gx_i - gx_j +
  Gw - 1]`` with ``(gy, gx) = (y // sh, x // sw)`` the positions inside the grid group
  (query minus key).

  Paper: "MaxViT: Multi-Axis Vision Transformer".

  Args:
    q: ``[B, Hh, Ww, N, H]``; k, v on the same map.
    grid_size: int or ``(Gh, Gw)``, dividing ``(Hh, Ww)``.
    rpb, scale, implementation, block_sizes: as in :func:`window_attention`.
  Returns:
    ``[B, Hh, Ww, N, Hv]``.
  """
  op = "grid_attention"
  spatial = _maps(op, q, k, v, (2,))
  gs = _per_axis(op, "grid_size", grid_size, 2, minimum=1)
  _divides(op, "grid_size", gs, spatial)
  mod = None
  if rpb is not None:
    _check_rpb(op, rpb, q.shape[-2], [2 * g - 1 for g in gs], "2*Gh-1, 2*Gw-1")
    steps = tuple(L // g for L, g in zip(spatial, gs))
    mod = _score_mods.grid_relative_position_bias(rpb, shape=spatial, dilation=steps,
                                                  query_minus_key=True)
  return _run(q, k, v, spatial, _masks.grid(spatial, gs), mod, scale, implementation,
              block_sizes)
