"""Spatial-reduction, channel-group and long/short-distance attention (catalog family F).

Inputs are 2D maps ``[B, Hh, Ww, N, H]`` (NHWC order; ``channel_group_attention`` takes
any ``[B, *spatial, N, H]``). Every op computes its softmax through the dispatcher
(:func:`attnjax.core.hooks.attention`, i.e. :func:`attnjax.attention`), so
``implementation=`` selects the backend; logits are float32, the output has the dtype and
layout of ``q`` with ``Hv`` last.

- :func:`spatial_reduction_attention`: PVT spatial-reduction attention / Twins GSA (F01).
- :func:`hilo_attention`: LITv2 HiLo, Hi-Fi window heads + Lo-Fi pooled heads (F02).
- :func:`channel_group_attention`: DaViT channel-group attention (F05).
- :func:`long_short_distance_attention`: CrossFormer SDA / LDA with a relative bias (F04).
- :func:`dynamic_position_bias`: CrossFormer's DPB MLP producing that bias table (I03).
- :func:`avg_pool_map`: the ``r x r`` average pooling the reduction ops use.

See ``docs/spatial-reduced.md``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks as _masks
from attnjax.core import hooks
from attnjax.ops import positional as _pos

__all__ = ["avg_pool_map", "spatial_reduction_attention", "hilo_attention",
           "channel_group_attention", "long_short_distance_attention",
           "dynamic_position_bias", "dpb_relative_coordinates", "LSDA_MODES", "ROPE_KINDS",
           "pooled_positions", "rope_map", "check_positions"]

LSDA_MODES = ("short", "long")
ROPE_KINDS = (None, "axial", "mixed")
_LN_EPS = 1e-5


# ----------------------------------------------------------------------------- checks

def _check_map(name, x):
  if not hasattr(x, "ndim") or x.ndim != 5:
    raise ValueError(f"{name} must be a 2D map [B, Hh, Ww, heads, head_dim] (rank 5), got shape "
                     f"{getattr(x, 'shape', None)}")


def _pair(name, value):
  vals = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
  if len(vals) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0
                           for v in vals):
    raise ValueError(f"{name} must be a positive int or a pair of them, got {name}={value!r}")
  return int(vals[0]), int(vals[1])


def _check_qkv_maps(q, k, v, *, same_q_map=True):
  _check_map("q", q)
  _check_map("k", k)
  _check_map("v", v)
  if k.shape[:4] != v.shape[:4]:
    raise ValueError(f"v must be [B, Hh, Ww, K, Hv] with [B, Hh, Ww, K] = {k.shape[:4]} of k, got "
                     f"shape {v.shape}")
  if same_q_map and q.shape[:3] != k.shape[:3]:
    raise ValueError(f"k must be on the map of q: [B, Hh, Ww] = {q.shape[:3]}, got shape {k.shape}")
  if q.shape[0] != k.shape[0]:
    raise ValueError(f"k must have the batch B={q.shape[0]} of q, got shape {k.shape}")
  if q.shape[-1] != k.shape[-1]:
    raise ValueError(f"k must have the head_dim H={q.shape[-1]} of q, got shape {k.shape}")
  if q.shape[3] % k.shape[3]:
    raise ValueError(f"the heads N={q.shape[3]} of q must be a multiple of the kv heads "
                     f"K={k.shape[3]} of k")


def _check_rope_heads(rope, rope_base, rope_freqs, q, k):
  _check_rope(rope, rope_base, rope_freqs, q.shape[3], q.shape[4])
  if rope == "mixed" and k.shape[3] != q.shape[3]:
    raise ValueError(f"rope='mixed' needs as many kv heads as query heads (per-head "
                     f"frequencies), got N={q.shape[3]}, K={k.shape[3]}")


def _flat(x):
  return x.reshape(x.shape[0], x.shape[1] * x.shape[2], x.shape[3], x.shape[4])


# ----------------------------------------------------------------------------- pooling

def avg_pool_map(x, sr_ratio, *, pad=False):
  """Average pooling of a map over non-overlapping ``r x r`` cells.

  ``x [B, Hh, Ww, ...] -> [B, ceil(Hh/rh), ceil(Ww/rw), ...]``:
  ``out[b, i, j] = mean_{(y, x) in cell(i, j)} x[b, y, x]``, with
  ``cell(i, j) = [i rh, (i+1) rh) x [j rw, (j+1) rw)`` clipped to the map. Without ``pad``
  ``sr_ratio`` must divide the map (every cell is full); with ``pad=True`` the border
  cells of a map that ``sr_ratio`` does not divide average only their positions inside the
  map (``count_include_pad=False``). Sums in float32, result in ``x.dtype``.

  Args:
    x: ``[B, Hh, Ww, *rest]``.
    sr_ratio: ``r`` (int or ``(rh, rw)``).
    pad: allow maps that ``r`` does not divide.
  """
  if not hasattr(x, "ndim") or x.ndim < 3:
    raise ValueError(f"x must be [B, Hh, Ww, ...] (rank >= 3), got shape "
                     f"{getattr(x, 'shape', None)}")
  rh, rw = _pair("sr_ratio", sr_ratio)
  B, Hh, Ww = x.shape[:3]
  rest = x.shape[3:]
  if not pad and (Hh % rh or Ww % rw):
    raise ValueError(f"sr_ratio={(rh, rw)} must divide the key/value map (Hh, Ww)={(Hh, Ww)}; "
                     f"pass pad=True to average partial border cells")
  if rh > Hh or rw > Ww:
    raise ValueError(f"sr_ratio={(rh, rw)} must be at most the map (Hh, Ww)={(Hh, Ww)}")
  Ho, Wo = -(-Hh // rh), -(-Ww // rw)
  xf = x.astype(jnp.float32)
  if (Ho * rh, Wo * rw) != (Hh, Ww):
    widths = [(0, 0), (0, Ho * rh - Hh), (0, Wo * rw - Ww)] + [(0, 0)] * len(rest)
    xf = jnp.pad(xf, widths)
  sums = xf.reshape((B, Ho, rh, Wo, rw) + rest).sum(axis=(2, 4))
  rows = np.minimum(rh, Hh - rh * np.arange(Ho))
  cols = np.minimum(rw, Ww - rw * np.arange(Wo))
  count = (rows[:, None] * cols[None, :]).astype(np.float32)
  count = count.reshape((1, Ho, Wo) + (1,) * len(rest))
  return (sums / count).astype(x.dtype)


# ----------------------------------------------------------------------------- RoPE

def pooled_positions(shape, sr_ratio, *, pad=False, positions=None):
  """RoPE positions of the pooled keys: the centres of the ``r x r`` cells.

  Cell ``(i, j)`` of :func:`avg_pool_map` covers rows ``[i rh, i rh + n_i)`` and columns
  ``[j rw, j rw + m_j)`` of the map (``n_i = min(rh, Hh - i rh)``, ``m_j`` likewise, so
  a partial border cell with ``pad=True`` counts only its positions inside the map); its
  position is the centre ``(i rh + (n_i - 1) / 2, j rw + (m_j - 1) / 2)``, in the
  coordinates of the unpooled map (row, column).

  With explicit token ``positions`` (``[B, Hh*Ww, 2]`` or ``[Hh*Ww, 2]``, row-major over
  the map, see :func:`check_positions`) the position of a cell is the mean of its
  tokens' positions, ``(1 / (n_i m_j)) sum_{(y, x) in cell(i, j)} positions[y Ww + x]``
  (:func:`avg_pool_map` of the positions), which for the grid is the centre above.

  Returns:
    float32 NumPy ``[ceil(Hh/rh) * ceil(Ww/rw), 2]``, row-major over the cells; with
    ``positions``, a float32 array ``[B, cells, 2]`` (``[cells, 2]`` for ``[Hh*Ww, 2]``).
  """
  Hh, Ww = _pair("shape", shape)
  rh, rw = _pair("sr_ratio", sr_ratio)
  if not pad and (Hh % rh or Ww % rw):
    raise ValueError(f"sr_ratio={(rh, rw)} must divide the map (Hh, Ww)={(Hh, Ww)}; pass "
                     f"pad=True for partial border cells")
  if positions is not None:
    pos = check_positions(positions, (Hh, Ww))
    lead = pos.shape[:-2]
    pos = pos.reshape((-1, Hh, Ww, 2))
    pooled = avg_pool_map(pos, (rh, rw), pad=pad)
    return pooled.reshape(lead + (-1, 2))
  axes = []
  for L, r in ((Hh, rh), (Ww, rw)):
    start = r * np.arange(-(-L // r))
    axes.append(start + (np.minimum(r, L - start) - 1) / 2)
  yy, xx = np.meshgrid(*axes, indexing="ij")
  return np.stack([yy.reshape(-1), xx.reshape(-1)], -1).astype(np.float32)


def check_positions(positions, shape, batch=None, *, allow_shared=True):
  """Validates explicit RoPE ``positions`` of the tokens of a ``shape = (Hh, Ww)`` map.

  ``positions``: the (row, column) coordinates of the ``T = Hh * Ww`` tokens, row-major
  over the map (token ``y Ww + x`` is map cell ``(y, x)``), integer or floating,
  ``[B, T, 2]`` (``B = batch`` when given) or, with ``allow_shared``, ``[T, 2]`` shared by
  the batch. Raises ValueError naming ``positions`` and the expected shape (TypeError for
  a non-real dtype).

  Returns:
    ``positions`` as float32 (same shape).
  """
  Hh, Ww = _pair("shape", shape)
  T = Hh * Ww
  b = "B" if batch is None else str(batch)
  want = f"[{b}, Hh*Ww, 2] = [{b}, {T}, 2]" + (f" or [{T}, 2]" if allow_shared else "")
  shp = getattr(positions, "shape", None)
  if shp is None:
    positions = np.asarray(positions)
    shp = positions.shape
  shp = tuple(shp)
  ok = (len(shp) == 3 and shp[1:] == (T, 2) and (batch is None or shp[0] == batch)) or (
      allow_shared and shp == (T, 2))
  if not ok:
    raise ValueError(f"positions must be {want}: the (row, column) coordinates of the map's "
                     f"tokens, row-major over (Hh, Ww)={(Hh, Ww)}; got shape {shp}")
  dt = jnp.dtype(positions.dtype)
  if dt == jnp.bool_ or not (jnp.issubdtype(dt, jnp.integer) or jnp.issubdtype(dt, jnp.floating)):
    raise TypeError(f"positions must be integer or floating (map coordinates), got dtype {dt}")
  return jnp.asarray(positions, jnp.float32)


def _check_rope(rope, rope_base, rope_freqs, num_heads, head_dim):
  if rope not in ROPE_KINDS:
    raise ValueError(f"rope must be one of {ROPE_KINDS} (positions are map coordinates), got "
                     f"rope={rope!r}")
  if rope is None:
    if rope_freqs is not None:
      raise ValueError("rope_freqs must be None unless rope='mixed'")
    return
  if isinstance(rope_base, bool) or not isinstance(rope_base, (int, float)) or not rope_base > 1:
    raise ValueError(f"rope_base must be a number > 1, got rope_base={rope_base!r}")
  if rope == "axial" and head_dim % 4:
    raise ValueError(f"rope='axial' needs a head_dim divisible by 4 (two axes of rotation "
                     f"pairs), got head_dim={head_dim}")
  if rope == "mixed" and (head_dim % 2 or getattr(rope_freqs, "shape", None)
                          != (num_heads, head_dim // 2, 2)):
    raise ValueError(f"rope='mixed' needs an even head_dim and rope_freqs [N, H/2, 2] = "
                     f"[{num_heads}, {head_dim // 2}, 2], got head_dim={head_dim}, rope_freqs "
                     f"shape {getattr(rope_freqs, 'shape', None)}")


def rope_map(x, positions, rope, *, rope_base=10000.0, rope_freqs=None):
  """Rotary embedding of a map's tokens at given 2D positions.

  ``x [B, Hh, Ww, N, H]`` (or flat ``[B, T, N, H]``), ``positions [T, 2]`` or
  ``[B, T, 2]`` (row, column per token, row-major; float allowed: pooled cell centres).
  ``rope='axial'``: RoPE-Axial with ``rope_base``
  (:func:`attnjax.ops.positional.apply_rope_axial`); ``'mixed'``: RoPE-Mixed with the
  per-head frequencies ``rope_freqs [N, H/2, 2]``
  (:func:`attnjax.ops.positional.rope_angles_mixed`); None: ``x`` unchanged.
  """
  if rope is None:
    return x
  flat = x.reshape((x.shape[0], -1) + x.shape[-2:])
  pos = jnp.asarray(positions, jnp.float32)
  if pos.ndim != 3:
    pos = pos[None]
  if rope == "axial":
    out = _pos.apply_rope_axial(flat, pos, base=rope_base)
  else:
    # rope_angles_mixed's angles, a[b, t, n, i] = sum_d freqs[n, i, d] p[b, t, d], written
    # elementwise: a dot's accumulation can change with the batch size, and shared [T, 2]
    # positions must give bit for bit the output of the same positions repeated per row.
    f = jnp.asarray(rope_freqs, jnp.float32)
    p = pos[:, :, None, None, :]
    out = _pos.apply_rotary(flat, p[..., 0] * f[..., 0] + p[..., 1] * f[..., 1])
  return out.reshape(x.shape)


def _grid_positions(x):
  return _pos.grid_coordinates(x.shape[1:3]).astype(np.float32)


def _check_positions_arg(positions, rope, q, k):
  """The ops' ``positions=`` argument: needs rope and one map shared by q and k."""
  if positions is None:
    return
  if rope is None:
    raise ValueError("positions are RoPE coordinates: they were given but rope=None; pass "
                     "rope='axial' or 'mixed', or positions=None")
  if q.shape[1:3] != k.shape[1:3]:
    raise ValueError(f"positions need q and k on one map, got q map {q.shape[1:3]} and k map "
                     f"{k.shape[1:3]}; expected positions=None")
  check_positions(positions, q.shape[1:3], q.shape[0])


# ----------------------------------------------------------------------------- SRA

def spatial_reduction_attention(q, k, v, *, sr_ratio, pad=False, scale=None, rope=None,
                                rope_base=10000.0, rope_freqs=None, positions=None,
                                implementation=None, block_sizes=None):
  """Spatial-reduction attention (PVT SRA; Twins-SVT GSA; LITv2 Lo-Fi).

  Every query attends to all keys/values of the reduced map:
  ``out[b, p] = softmax_s(scale q[b, p] . k~[b, s]) v~[b, s]`` with ``k~ = avg_pool(k, r)``
  and ``v~ = avg_pool(v, r)`` (:func:`avg_pool_map`, ``r x r`` cells), ``p`` every
  position of the query map, ``s`` every cell of the reduced map. PVT and Twins reduce
  ``x`` with a strided ``r x r`` convolution and LayerNorm before projecting K/V: that
  is the layer's job (``attnjax.layers.reduced``, variant ``'pvt'``); the op's reduction
  is the parameter-free average (equal to pooling ``x`` first, since the projection is
  linear: LITv2's Lo-Fi branch).

  Papers: "Pyramid Vision Transformer: A Versatile Backbone for Dense Prediction without
  Convolutions"; "Twins: Revisiting the Design of Spatial Attention in Vision
  Transformers"; "Fast Vision Transformers with HiLo Attention".

  Args:
    q: ``[B, Hq, Wq, N, H]``.
    k: ``[B, Hh, Ww, K, H]``, ``N % K == 0`` (GQA).
    v: ``[B, Hh, Ww, K, Hv]``.
    sr_ratio: ``r`` (int or ``(rh, rw)``); must divide ``(Hh, Ww)`` unless ``pad``.
    pad: average partial border cells when ``r`` does not divide the map.
    scale: logit scale (default ``1/sqrt(H)``).
    rope: None, ``'axial'`` or ``'mixed'``: rotary embedding of ``q`` at its map
      coordinates ``(y, x)`` and of each pooled key at the centre of its cell
      (:func:`pooled_positions`, in ``k``'s map coordinates), applied after pooling;
      see :func:`rope_map`.
    rope_base: base of ``'axial'``. rope_freqs: ``[N, H/2, 2]`` for ``'mixed'`` (then
      ``K == N``: a shared key cannot rotate with several query heads' frequencies).
    positions: optional explicit RoPE coordinates of the map's tokens, ``[B, Hh*Ww, 2]``
      or ``[Hh*Ww, 2]`` (row, column; row-major; :func:`check_positions`), for maps where
      ``q`` and ``k`` share ``(Hh, Ww)``; default the grid ``(y, x)``. Queries rotate at
      their positions, each pooled key at the mean of its cell's positions
      (:func:`pooled_positions` with ``positions``). Needs ``rope``.
    implementation, block_sizes: passed to :func:`attnjax.attention`.
  Returns:
    ``[B, Hq, Wq, N, Hv]`` in ``q.dtype``.
  """
  _check_qkv_maps(q, k, v, same_q_map=False)
  _check_rope_heads(rope, rope_base, rope_freqs, q, k)
  _check_positions_arg(positions, rope, q, k)
  k_red = avg_pool_map(k, sr_ratio, pad=pad)
  v_red = avg_pool_map(v, sr_ratio, pad=pad)
  if rope is not None:
    q_pos = _grid_positions(q) if positions is None else positions
    k_pos = pooled_positions(k.shape[1:3], sr_ratio, pad=pad, positions=positions)
    q = rope_map(q, q_pos, rope, rope_base=rope_base, rope_freqs=rope_freqs)
    k_red = rope_map(k_red, k_pos, rope, rope_base=rope_base, rope_freqs=rope_freqs)
  out_BTNH = hooks.attention(_flat(q), _flat(k_red), _flat(v_red), scale=scale,
                             implementation=implementation, block_sizes=block_sizes)
  return out_BTNH.reshape(q.shape[:4] + (v.shape[-1],))


# ----------------------------------------------------------------------------- HiLo

def hilo_attention(q, k, v, *, window_size, lo_heads, scale=None, rope=None,
                   rope_base=10000.0, rope_freqs=None, positions=None, implementation=None,
                   block_sizes=None):
  """HiLo attention (LITv2): Hi-Fi heads attend inside ``s x s`` windows, Lo-Fi heads
  attend from every query to the ``s x s`` average-pooled keys/values.

  Heads ``n < N - lo_heads`` (Hi-Fi): ``softmax`` over the keys of the query's window
  (``attnjax.masks.window(map, s)``, windows of ``s x s`` adjacent positions); heads
  ``n >= N - lo_heads`` (Lo-Fi): :func:`spatial_reduction_attention` with ``sr_ratio=s``.
  The kv heads split in the same proportion (``lo_heads * K / N`` Lo-Fi kv heads), so
  ``lo_heads * K`` must be a multiple of ``N``. Outputs are concatenated on the head axis.

  Paper: "Fast Vision Transformers with HiLo Attention" (Pan et al., 2022).

  Args:
    q: ``[B, Hh, Ww, N, H]``; k ``[B, Hh, Ww, K, H]``; v ``[B, Hh, Ww, K, Hv]``.
    window_size: ``s`` (int or pair), dividing ``(Hh, Ww)``.
    lo_heads: number of Lo-Fi query heads, ``0 <= lo_heads <= N`` (LITv2's ``alpha N``).
    rope, rope_base, rope_freqs: as in :func:`spatial_reduction_attention`: Hi-Fi heads
      rotate queries and keys at their map coordinates, Lo-Fi heads rotate the pooled
      keys at the cell centres (``rope_freqs`` rows split with the heads).
    positions: optional explicit token coordinates ``[B, Hh*Ww, 2]`` or ``[Hh*Ww, 2]``:
      Hi-Fi queries and keys rotate at them, Lo-Fi pooled keys at their cells' means (as
      in :func:`spatial_reduction_attention`). Needs ``rope``.
    scale, implementation, block_sizes: as in :func:`spatial_reduction_attention`.
  Returns:
    ``[B, Hh, Ww, N, Hv]``.
  """
  _check_qkv_maps(q, k, v)
  _check_rope_heads(rope, rope_base, rope_freqs, q, k)
  _check_positions_arg(positions, rope, q, k)
  s = _pair("window_size", window_size)
  Hh, Ww, N, K = q.shape[1], q.shape[2], q.shape[3], k.shape[3]
  if Hh % s[0] or Ww % s[1]:
    raise ValueError(f"window_size={s} must divide the map (Hh, Ww)={(Hh, Ww)}")
  if isinstance(lo_heads, bool) or not isinstance(lo_heads, (int, np.integer)) \
      or not 0 <= lo_heads <= N:
    raise ValueError(f"lo_heads must be an int in [0, N={N}], got lo_heads={lo_heads!r}")
  if (lo_heads * K) % N:
    raise ValueError(f"lo_heads * K must be a multiple of N so the kv heads split with the query "
                     f"heads: lo_heads={lo_heads}, K={K}, N={N}")
  lo_kv = lo_heads * K // N
  hi, hi_kv = N - lo_heads, K - lo_kv
  outs = []
  freqs = (None, None) if rope_freqs is None else (rope_freqs[:hi], rope_freqs[hi:])
  if hi:
    mask = _masks.window((Hh, Ww), s)
    pos = _grid_positions(q) if positions is None else positions
    qh, kh = (rope_map(x, pos, rope, rope_base=rope_base, rope_freqs=freqs[0])
              for x in (q[..., :hi, :], k[..., :hi_kv, :]))
    o = hooks.attention(_flat(qh), _flat(kh), _flat(v[..., :hi_kv, :]),
                        mask=mask, scale=scale, implementation=implementation,
                        block_sizes=block_sizes)
    outs.append(o.reshape(q.shape[:3] + (hi, v.shape[-1])))
  if lo_heads:
    outs.append(spatial_reduction_attention(
        q[..., hi:, :], k[..., hi_kv:, :], v[..., hi_kv:, :], sr_ratio=s, scale=scale,
        rope=rope, rope_base=rope_base, rope_freqs=freqs[1], positions=positions,
        implementation=implementation, block_sizes=block_sizes))
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)


# ----------------------------------------------------------------------------- channels

def channel_group_attention(q, k, v, *, num_groups, scale=None, implementation=None,
                            block_sizes=None):
  """Channel-group attention (DaViT): channels are the tokens, positions the features.

  The ``C = N * H`` channels (heads and head dims flattened, row-major) are split into
  ``G = num_groups`` groups of ``C_g = C / G`` consecutive channels. With ``Q_g, K_g, V_g``
  the ``[P, C_g]`` matrices of group ``g`` over all ``P = prod(spatial)`` positions:
  ``A_g = softmax(scale * Q_g^T K_g)`` (``[C_g, C_g]``, softmax over the key channels),
  ``out_g = V_g A_g^T`` (``[P, C_g]``); ``scale`` defaults to ``1/sqrt(C_g)`` as in DaViT.
  Computed as :func:`attnjax.attention` with ``C_g`` tokens, ``G`` heads and head dim ``P``.

  Paper: "DaViT: Dual Attention Vision Transformers" (Ding et al., 2022).

  Args:
    q, k, v: ``[B, *spatial, N, H]`` (at least one spatial axis), all the same shape.
    num_groups: ``G``, dividing ``N * H``.
    scale: logit scale (default ``1/sqrt(C_g)``).
    implementation, block_sizes: passed to :func:`attnjax.attention`.
  Returns:
    ``[B, *spatial, N, H]``.
  """
  if not hasattr(q, "ndim") or q.ndim < 4:
    raise ValueError(f"q must be [B, *spatial, N, H] with at least one spatial axis (rank >= 4), "
                     f"got shape {getattr(q, 'shape', None)}")
  for name, x in (("k", k), ("v", v)):
    if getattr(x, "shape", None) != q.shape:
      raise ValueError(f"{name} must have the shape of q {q.shape} (channel attention pairs "
                       f"channels one to one), got shape {getattr(x, 'shape', None)}")
  B, N, H = q.shape[0], q.shape[-2], q.shape[-1]
  P, C = math.prod(q.shape[1:-2]), N * H
  if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) \
      or num_groups <= 0 or C % num_groups:
    raise ValueError(f"num_groups must be a positive divisor of the channels N*H={C}, got "
                     f"num_groups={num_groups!r}")
  Cg = C // num_groups
  scale = 1.0 / math.sqrt(Cg) if scale is None else scale

  def to_tokens(x):  # [B, *sp, N, H] -> [B, C_g, G, P]: channels as tokens, positions as H
    return x.reshape(B, P, num_groups, Cg).transpose(0, 3, 2, 1)

  o_BCGP = hooks.attention(to_tokens(q), to_tokens(k), to_tokens(v), scale=scale,
                           implementation=implementation, block_sizes=block_sizes)
  return o_BCGP.transpose(0, 3, 2, 1).reshape(q.shape)


# ----------------------------------------------------------------------------- CrossFormer

def dpb_relative_coordinates(group_size):
  """``[(2Gh-1) * (2Gw-1), 2]`` float32 offsets ``(dy, dx)``, row-major from
  ``(-(Gh-1), -(Gw-1))``: the DPB MLP's inputs, in the order of the bias table."""
  gh, gw = _pair("group_size", group_size)
  dy, dx = np.meshgrid(np.arange(1 - gh, gh), np.arange(1 - gw, gw), indexing="ij")
  return np.stack([dy.reshape(-1), dx.reshape(-1)], -1).astype(np.float32)


def _layer_norm(x, scale, bias):
  mu = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + _LN_EPS) * scale + bias


def dynamic_position_bias(params, group_size):
  """CrossFormer's dynamic position bias: the bias table from an MLP of the offsets.

  ``B[:, dy, dx] = MLP(dy, dx)`` with ``MLP = Linear(2, P) -> [LayerNorm -> ReLU ->
  Linear(P, P)] -> [LayerNorm -> ReLU -> Linear(P, N)]``, evaluated on every offset
  ``dy in [-(Gh-1), Gh-1]``, ``dx in [-(Gw-1), Gw-1]`` (float32). Because the table is a
  function of the offsets it exists for any group size.

  Paper: "CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention".

  Args:
    params: ``{'w0' [2, P], 'b0' [P], 'ln1_scale' [P], 'ln1_bias' [P], 'w1' [P, P],
      'b1' [P], 'ln2_scale' [P], 'ln2_bias' [P], 'w2' [P, N], 'b2' [N]}``.
    group_size: ``G`` (int or ``(Gh, Gw)``).
  Returns:
    float32 ``[N, 2Gh-1, 2Gw-1]``, the ``dpb`` of :func:`long_short_distance_attention`.
  """
  gh, gw = _pair("group_size", group_size)
  need = ("w0", "b0", "ln1_scale", "ln1_bias", "w1", "b1", "ln2_scale", "ln2_bias", "w2", "b2")
  missing = [n for n in need if n not in params]
  if missing:
    raise ValueError(f"params must hold {list(need)}; missing {missing}")
  p = {n: jnp.asarray(params[n], jnp.float32) for n in need}
  h = jnp.asarray(dpb_relative_coordinates((gh, gw))) @ p["w0"] + p["b0"]
  h = jax.nn.relu(_layer_norm(h, p["ln1_scale"], p["ln1_bias"])) @ p["w1"] + p["b1"]
  h = jax.nn.relu(_layer_norm(h, p["ln2_scale"], p["ln2_bias"])) @ p["w2"] + p["b2"]
  return h.T.reshape(h.shape[-1], 2 * gh - 1, 2 * gw - 1)


def _group_bias(dpb, gh, gw):
  """``[1, N, G, G]`` bias of a group from the table ``dpb [N, 2gh-1, 2gw-1]``:
  ``bias[n, i, j] = dpb[n, yi - yj + gh - 1, xi - xj + gw - 1]`` (local coordinates)."""
  ly, lx = np.divmod(np.arange(gh * gw), gw)
  iy = ly[:, None] - ly[None, :] + gh - 1
  ix = lx[:, None] - lx[None, :] + gw - 1
  return dpb.astype(jnp.float32)[:, iy, ix][None]


def long_short_distance_attention(q, k, v, *, group_size, mode="short", dpb=None, scale=None,
                                  implementation=None, block_sizes=None):
  """CrossFormer long/short distance attention (LSDA), optional relative bias table.

  The ``Hh x Ww`` map is partitioned into groups of ``Gh x Gw`` tokens and every token
  attends to the tokens of its group:
  - ``mode='short'`` (SDA): groups of adjacent tokens; position ``(y, x)`` is in group
    ``(y // Gh, x // Gw)`` at local coordinates ``(y % Gh, x % Gw)``;
  - ``mode='long'`` (LDA): tokens sampled with interval ``I = (Hh/Gh, Ww/Gw)``; position
    ``(y, x)`` is in group ``(y % Ih, x % Iw)`` at local coordinates ``(y // Ih, x // Iw)``.
  ``logit_ij = scale q_i . k_j + dpb[n, yi - yj + Gh - 1, xi - xj + Gw - 1]`` with
  ``(y, x)`` the local coordinates (so LDA offsets count intervals); the table comes from
  :func:`dynamic_position_bias` in CrossFormer. Computed on the regrouped tensors
  (``[B * groups, Gh * Gw, N, H]``), dense within each group.

  Paper: "CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention"
  (Wang et al., 2021).

  Args:
    q: ``[B, Hh, Ww, N, H]``; k ``[B, Hh, Ww, K, H]``; v ``[B, Hh, Ww, K, Hv]``.
    group_size: ``G`` (int or ``(Gh, Gw)``), dividing ``(Hh, Ww)``.
    mode: ``'short'`` or ``'long'``.
    dpb: optional bias table ``[N, 2Gh-1, 2Gw-1]`` (differentiable).
    scale, implementation, block_sizes: as in :func:`spatial_reduction_attention`.
  Returns:
    ``[B, Hh, Ww, N, Hv]``.
  """
  _check_qkv_maps(q, k, v)
  gh, gw = _pair("group_size", group_size)
  if mode not in LSDA_MODES:
    raise ValueError(f"mode must be one of {LSDA_MODES}, got mode={mode!r}")
  B, Hh, Ww, N = q.shape[:4]
  if Hh % gh or Ww % gw:
    raise ValueError(f"group_size={(gh, gw)} must divide the map (Hh, Ww)={(Hh, Ww)}")
  if dpb is not None and getattr(dpb, "shape", None) != (N, 2 * gh - 1, 2 * gw - 1):
    raise ValueError(f"dpb must be [N, 2Gh-1, 2Gw-1] = [{N}, {2 * gh - 1}, {2 * gw - 1}], got "
                     f"shape {getattr(dpb, 'shape', None)}")
  nh, nw = Hh // gh, Ww // gw

  def group(x):
    rest = x.shape[3:]
    if mode == "short":  # y = gy * Gh + ly
      x = x.reshape((B, nh, gh, nw, gw) + rest).transpose((0, 1, 3, 2, 4, 5, 6))
    else:  # y = ly * Ih + gy
      x = x.reshape((B, gh, nh, gw, nw) + rest).transpose((0, 2, 4, 1, 3, 5, 6))
    return x.reshape((B * nh * nw, gh * gw) + rest)

  bias = None if dpb is None else _group_bias(dpb, gh, gw)
  o = hooks.attention(group(q), group(k), group(v), bias=bias, scale=scale,
                      implementation=implementation, block_sizes=block_sizes)
  Hv = v.shape[-1]
  o = o.reshape(B, nh, nw, gh, gw, N, Hv)
  if mode == "short":
    o = o.transpose(0, 1, 3, 2, 4, 5, 6)
  else:
    o = o.transpose(0, 3, 1, 4, 2, 5, 6)
  return o.reshape(B, Hh, Ww, N, Hv)
