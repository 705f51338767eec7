"""'xla_chunked': blockwise online-softmax attention in plain JAX, O(T + S) memory.

The forward visits, for each (batch, kv head, q-block), only the key blocks whose
tile is non-empty in the mask's block table, evaluates the mask only on partial
tiles, and keeps a running max / denominator / accumulator (FlashAttention's
online softmax).  Query heads that share a kv head (GQA) are processed together
as ``G * block_q`` rows against one K/V tile, so K/V are never repeated.

The backward (``jax.custom_vjp``) recomputes each tile's probabilities from the
saved ``lse`` and accumulates ``dq`` per q-block and ``dk, dv`` per (batch, kv head)
in one pass (five tile matmuls, no ``[T, S]`` array).  Gradients flow to ``q, k, v``,
``bias``, ``sinks`` and any arrays the ``score_mod`` closes over.

Paper: "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness"
(Dao et al., 2022); "Self-attention Does Not Need O(n^2) Memory" (Rabe & Staats).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks as masks_lib
from attnjax.core import tiling as tiling_lib
from attnjax.core.args import AttentionArgs, static_scale
from attnjax.core.jaxpr import hoist_consts
from attnjax.core.plan import kv_group_table
from attnjax.core.precision import einsum_f32, f32_on_cpu
from attnjax.core.softmax import row_dot
from attnjax.core.vma import sum_to_vma, vary_like

__all__ = ["ChunkedBlockSizes", "chunked_attention"]


def _dot_f32(a, b, dims):
  """``dot_general`` with float32 accumulation (operands of :func:`f32_on_cpu`)."""
  return jax.lax.dot_general(*f32_on_cpu(a, b), dims, preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class ChunkedBlockSizes:
  """Tile sizes of the 'xla_chunked' path.

  Attributes:
    block_q: query rows per tile *per query head*; a GQA group of ``G`` heads is
      processed as ``G * block_q`` rows.  ``None``: chosen from the shape.
    block_k: keys per tile.  ``None``: chosen from the shape.
    spatial_tile: 2D tiling of spatial masks by ``attnjax.attention`` (the dispatcher,
      :mod:`attnjax.core.tiling`): ``True`` (default) permutes the tokens of a
      neighborhood/window/grid/... mask's grid so each tile is a spatial patch;
      ``False`` keeps the row-major order; a tuple fixes the patch per grid axis.
  """
  block_q: Optional[int] = None
  block_k: Optional[int] = None
  spatial_tile: Union[bool, tuple] = True

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      val = getattr(self, name)
      if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val <= 0):
        raise ValueError(f"ChunkedBlockSizes.{name} must be a positive int or None, got {val!r}")
    tiling_lib.check_spatial_tile(self.spatial_tile, "ChunkedBlockSizes")

  def resolve(self, T: int, S: int, G: int):
    bq = self.block_q or max(16, 256 // G)
    bk = self.block_k or 512
    return min(bq, T), min(bk, S)


_EMPTY, _PARTIAL, _FULL = masks_lib.EMPTY, masks_lib.PARTIAL, masks_lib.FULL


def _float0_zeros(x):
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, dtype=jax.dtypes.float0)


def _schedule(a: AttentionArgs, bq: int, bk: int):
  """Per (batch, kv head, q block): the ordered list of non-empty k blocks, its
  length, and whether each listed tile needs masking.

  Returns (klist, count, partial) with leading dims [B', K'] (1 when independent
  of batch / head), NumPy when every input is static, else JAX arrays.
  """
  T, S, N, B = a.T, a.S, a.N, a.B
  tables = []
  if a.mask is not None:
    tables.append(a.mask.block_table(T, S, bq, bk, num_heads=N, batch=B))
  if a.q_segment_ids is not None:
    tables.append(masks_lib.document(a.q_segment_ids, a.kv_segment_ids).block_table(T, S, bq, bk))
  table = kv_group_table(tables, a, bq, bk)
  xp = jnp if isinstance(table, (jax.Array, jax.core.Tracer)) else np
  # Order non-empty blocks first (stable), keep their ids.
  order_key = (table == _EMPTY).astype(xp.int32)
  if xp is np:
    klist = np.argsort(order_key, axis=-1, kind="stable").astype(np.int32)
  else:
    klist = jnp.argsort(order_key, axis=-1, stable=True).astype(jnp.int32)
  count = (table != _EMPTY).sum(axis=-1).astype(xp.int32)
  partial = xp.take_along_axis(table, klist, axis=-1) == _PARTIAL
  return klist, count, partial


def _pick(arr, b, kh):
  """arr[b or 0, kh or 0] for schedule arrays with broadcast leading dims."""
  return arr[b if arr.shape[0] > 1 else 0, kh if arr.shape[1] > 1 else 0]


# The gathered path holds one (batch, kv head)'s logits for at most this many keys per row.
_GATHER_MAX_KEYS = 4096


def _gather_ok(a: AttentionArgs, klist, count, bk: int) -> bool:
  """The gathered path serves a 2D-tiled spatial mask (``tiled2d``, static, the same
  table for every batch and head) with no bias, score_mod, segment ids or sinks, when
  its longest key list is short (at most half the keys and ``_GATHER_MAX_KEYS``)."""
  m = a.mask
  if m is None or m.kind != "tiled2d" or m.data_dependent or m.head_dependent:
    return False
  if not isinstance(klist, np.ndarray) or klist.shape[:2] != (1, 1):
    return False
  if a.bias is not None or a.score_mod is not None or a.q_segment_ids is not None or \
      a.sinks is not None:
    return False
  L = max(1, int(count.max()))
  return L * bk <= min(_GATHER_MAX_KEYS, a.S // 2)


def _gathered_attention(q, k, v, a: AttentionArgs, bq, bk, klist, count, return_lse):
  """Static block-sparse attention by gathering: each q block's non-empty key blocks
  (a static list, padded to the longest, ``L``) are gathered into ``[nq, L * bk]``
  keys, and all q blocks of a (batch, kv head) run as one batched matmul / softmax /
  matmul (no per-tile loop, whose fixed cost dominates small tiles on CPU).  The mask
  is evaluated once, with NumPy at trace time, on ``[nq, bq, L * bk]`` indices (a
  boolean constant shared by the heads); padded list entries are masked.  Gradients by
  autodiff, each (batch, kv head) rematerialised (``jax.checkpoint``), so memory stays
  ``O(T * L * bk)`` per step.  Exact: the same softmax over the same allowed keys as the tile loop.
  """
  q, a = static_scale(q, a)
  B, T, S, N, K, G, H, Hv = a.B, a.T, a.S, a.N, a.K, a.G, a.H, a.Hv
  nq, nk = -(-T // bq), -(-S // bk)
  Tp, Sp, R = nq * bq, nk * bk, G * bq
  L = max(1, int(count.max()))
  kidx = np.asarray(klist[0, 0, :, :L], np.int32)                        # [nq, L]
  live = np.arange(L)[None, :] < count[0, 0][:, None]                    # [nq, L]
  kv_idx = (kidx[:, :, None] * bk + np.arange(bk)[None, None, :]).reshape(nq, 1, L * bk)
  kv_live = np.repeat(live, bk, axis=1).reshape(nq, 1, L * bk) & (kv_idx < S)
  q_idx = (np.arange(nq)[:, None] * bq + np.arange(bq)[None, :]).reshape(nq, bq, 1)
  mask, scale, softcap, dtype = a.mask, a.scale, a.softcap, q.dtype
  # A static mask: evaluated once here with NumPy (a constant of the computation).
  allowed = np.asarray(mask(0, 0, q_idx, kv_idx, num_heads=N, batch=B), bool)
  allowed = np.broadcast_to(allowed & kv_live, (nq, bq, L * bk))
  allowed = np.broadcast_to(allowed[:, None], (nq, G, bq, L * bk)).reshape(nq, R, L * bk)

  def one(args):
    q_b, k_b, v_b = args                    # [nq, R, H], [nk, bk, H], [nk, bk, Hv]
    kg = k_b[kidx].reshape(nq, L * bk, H)
    vg = v_b[kidx].reshape(nq, L * bk, Hv)
    s = einsum_f32("qrh,qkh->qrk", q_b, kg)
    if softcap is not None:
      s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(allowed, s, -jnp.inf)
    m = jax.lax.stop_gradient(s.max(axis=-1))
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    l = p.sum(axis=-1)
    pos = l > 0
    safe = jnp.where(pos, l, 1.0)
    o = einsum_f32("qrk,qkd->qrd", p.astype(vg.dtype), vg)
    o = (o / safe[..., None]).astype(dtype)
    lse = jnp.where(pos, m_safe + jnp.log(safe), -jnp.inf)
    return o, lse

  qs = (q.astype(jnp.float32) * scale).astype(dtype)
  qs = jnp.pad(qs, ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
  qs = qs.reshape(B, nq, bq, K, G, H).transpose(0, 3, 1, 4, 2, 5).reshape(B * K, nq, R, H)
  def kblocks(x):
    D = x.shape[-1]
    x = jnp.pad(x, ((0, 0), (0, Sp - S), (0, 0), (0, 0)))
    return x.transpose(0, 2, 1, 3).reshape(B * K, nk, bk, D)
  o, lse = jax.lax.map(jax.checkpoint(one), (qs, kblocks(k), kblocks(v)))
  o = o.reshape(B, K, nq, G, bq, Hv).transpose(0, 2, 4, 1, 3, 5).reshape(B, Tp, N, Hv)[:, :T]
  if not return_lse:
    return o
  lse = lse.reshape(B, K, nq, G, bq).transpose(0, 1, 3, 2, 4).reshape(B, N, Tp)[:, :, :T]
  return o, lse


def chunked_attention(q, k, v, a: AttentionArgs, *, return_lse=False, block_sizes=None):
  """Blockwise attention; see the module docstring.  Same contract as
  :func:`attnjax.attention` (BTNH in, BTNH out, ``lse [B, N, T]``)."""
  if block_sizes is None:
    block_sizes = ChunkedBlockSizes()
  elif not isinstance(block_sizes, ChunkedBlockSizes):
    raise TypeError(f"block_sizes for 'xla_chunked' must be a ChunkedBlockSizes, got "
                    f"{type(block_sizes).__name__}")
  q, a = static_scale(q, a)   # a traced scale is folded into q (gradients reach it)
  B, T, S, N, K, G, H, Hv = a.B, a.T, a.S, a.N, a.K, a.G, a.H, a.Hv
  bq, bk = block_sizes.resolve(T, S, G)
  nq, nk = -(-T // bq), -(-S // bk)
  Tp, Sp = nq * bq, nk * bk
  R = G * bq
  dtype = q.dtype

  klist, count, partial = _schedule(a, bq, bk)
  if _gather_ok(a, klist, count, bk):
    return _gathered_attention(q, k, v, a, bq, bk, klist, count, return_lse)

  # Static config closed over by the custom_vjp.
  scale, softcap = a.scale, a.softcap
  has_bias, has_sinks = a.bias is not None, a.sinks is not None
  has_seg = a.q_segment_ids is not None
  mask, score_mod = a.mask, a.score_mod
  need_mask_eval = mask is not None or has_seg or S % bk != 0

  # Closure-convert the mask and score_mod so arrays they close over become
  # explicit arguments of the custom_vjp (differentiable for score_mod).
  ex_s = jax.ShapeDtypeStruct((R, bk), jnp.float32)
  ex_i = (jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((R, 1), jnp.int32),
          jax.ShapeDtypeStruct((R, 1), jnp.int32), jax.ShapeDtypeStruct((1, bk), jnp.int32))
  if score_mod is not None:
    sm_fn, sm_consts = hoist_consts(
        lambda s, b, h, qi, ki: score_mod(s, b, h, qi, ki).astype(jnp.float32), ex_s, *ex_i)
  else:
    sm_fn, sm_consts = None, []
  if mask is not None:
    mk_fn, mk_consts = hoist_consts(
        lambda b, h, qi, ki: jnp.broadcast_to(
            mask(b, h, qi, ki, num_heads=N, batch=B), (R, bk)).astype(jnp.float32), *ex_i)
  else:
    mk_fn, mk_consts = None, []

  # ---------------------------------------------------------------- layouts
  def to_qblocks(x):          # [B, T, N, D] -> [B, K, nq, R, D]
    D = x.shape[-1]
    x = jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
    x = x.reshape(B, nq, bq, K, G, D).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(B, K, nq, R, D)

  def from_qblocks(x):        # [B, K, nq, R, D] -> [B, T, N, D]
    D = x.shape[-1]
    x = x.reshape(B, K, nq, G, bq, D).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(B, Tp, N, D)[:, :T]

  def to_kblocks(x):          # [B, S, K, D] -> [B, K, Sp, D]
    x = jnp.pad(x, ((0, 0), (0, Sp - S), (0, 0), (0, 0)))
    return x.transpose(0, 2, 1, 3)

  def rows_to_bnt(x):         # [B, K, nq, R] -> [B, N, T]
    x = x.reshape(B, K, nq, G, bq).transpose(0, 1, 3, 2, 4)
    return x.reshape(B, N, Tp)[:, :, :T]

  def bnt_to_rows(x):         # [B, N, T] -> [B, K, nq, R]
    x = jnp.pad(x, ((0, 0), (0, 0), (0, Tp - T)))
    x = x.reshape(B, K, G, nq, bq).transpose(0, 1, 3, 2, 4)
    return x.reshape(B, K, nq, R)

  row_g = np.repeat(np.arange(G, dtype=np.int32), bq)[:, None]      # [R, 1]
  row_t = np.tile(np.arange(bq, dtype=np.int32), G)[:, None]        # [R, 1]
  col_k = np.arange(bk, dtype=np.int32)[None, :]                    # [1, bk]

  # ---------------------------------------------------------------- tile math
  def tile_indices(b, kh, qb, kb):
    return (b, kh * G + row_g, qb * bq + row_t, kb * bk + col_k)

  def bias_tile(bias, b, kh, qb, kb):
    Bb, Nb, Tb, Sb = bias.shape
    start = (b if Bb > 1 else 0, kh * G if Nb > 1 else 0, qb * bq if Tb > 1 else 0,
             kb * bk if Sb > 1 else 0)
    size = (1, G if Nb > 1 else 1, bq if Tb > 1 else 1, bk if Sb > 1 else 1)
    t = jax.lax.dynamic_slice(bias, start, size)[0]
    return jnp.broadcast_to(t.astype(jnp.float32), (G, bq, bk)).reshape(R, bk)

  def allowed_tile(mkc, seg, b, kh, qb, kb):
    idx = tile_indices(b, kh, qb, kb)
    ok = idx[3] < S
    if mask is not None:
      ok = ok & (mk_fn(*idx, *mkc) > 0.5)
    if has_seg:
      qseg, kseg = seg
      qs = jax.lax.dynamic_slice(qseg, (b, qb * bq), (1, bq))[0]
      ks = jax.lax.dynamic_slice(kseg, (b, kb * bk), (1, bk))[0]
      ok = ok & (jnp.tile(qs, G)[:, None] == ks[None, :])
    return ok

  def logits(q_blk, k_t, bias, smc, b, kh, qb, kb):
    """Pre-softcap logits s1 and final logits s (float32, unmasked)."""
    s = _dot_f32(q_blk, k_t, (((1,), (1,)), ((), ())))
    if has_bias:
      s = s + bias_tile(bias, b, kh, qb, kb)
    s0 = s
    if sm_fn is not None:
      s = sm_fn(s, *tile_indices(b, kh, qb, kb), *smc)
    s1 = s
    if softcap is not None:
      s = softcap * jnp.tanh(s / softcap)
    return s0, s1, s

  def sched_at(sched, b, kh, qb, t):
    kl, cnt, part = sched
    return _pick(kl, b, kh)[qb, t], _pick(part, b, kh)[qb, t]

  def visit_tile(q_blk, k_bh, v_bh, bias, seg, mkc, smc, sched, b, kh, qb, t):
    """The t-th listed tile of a q block: its K/V slices and logits (s0, s1 as in
    `logits`; s masked with -inf on partial tiles only)."""
    kb, is_part = sched_at(sched, b, kh, qb, t)
    k_t = jax.lax.dynamic_slice_in_dim(k_bh, kb * bk, bk)
    v_t = jax.lax.dynamic_slice_in_dim(v_bh, kb * bk, bk)
    s0, s1, s = logits(q_blk, k_t, bias, smc, b, kh, qb, kb)
    if need_mask_eval:
      s = jax.lax.cond(
          is_part,
          lambda s: jnp.where(allowed_tile(mkc, seg, b, kh, qb, kb), s, -jnp.inf),
          lambda s: s, s)
    return kb, k_t, v_t, s0, s1, s

  # ---------------------------------------------------------------- forward
  def fwd_impl(qs, kk, vv, bias, sinks, seg, mkc, smc, sched):
    """qs: scaled q blocks [B, K, nq, R, H]; kk [B, K, Sp, H]; vv [B, K, Sp, Hv]."""
    kl, cnt, part = sched
    idx = np.arange(B * K * nq, dtype=np.int32)

    def one_block(args):
      i, q_blk = args
      b, kh, qb = i // (K * nq), (i // nq) % K, i % nq
      k_bh = kk[b, kh]
      v_bh = vv[b, kh]
      if has_sinks:
        m0 = jax.lax.dynamic_slice(sinks, (kh * G,), (G,)).astype(jnp.float32)
        m0 = jnp.repeat(m0, bq)
        l0 = jnp.ones((R,), jnp.float32)
      else:
        m0 = jnp.full((R,), -jnp.inf, jnp.float32)
        l0 = jnp.zeros((R,), jnp.float32)
      acc0 = jnp.zeros((R, Hv), jnp.float32)
      m0, l0, acc0 = vary_like((m0, l0, acc0), q_blk, k_bh, v_bh, bias, sinks, seg, mkc, smc,
                               sched)

      def body(t, carry):
        m, l, acc = carry
        kb, k_t, v_t, _, _, s = visit_tile(q_blk, k_bh, v_bh, bias, seg, mkc, smc, sched,
                                           b, kh, qb, t)
        m_new = jnp.maximum(m, s.max(axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe[:, None])
        alpha = jnp.exp(m - m_safe)
        l = alpha * l + p.sum(axis=1)
        acc = alpha[:, None] * acc + _dot_f32(p.astype(v_t.dtype), v_t, (((1,), (0,)), ((), ())))
        return m_new, l, acc

      n = _pick(cnt, b, kh)[qb]
      m, l, acc = jax.lax.fori_loop(0, n, body, (m0, l0, acc0))
      pos = l > 0
      safe = jnp.where(pos, l, 1.0)
      out = (acc / safe[:, None]).astype(dtype)
      m_fin = jnp.where(jnp.isfinite(m), m, 0.0)
      lse = jnp.where(pos, m_fin + jnp.log(safe), -jnp.inf)
      return out, lse

    out, lse = jax.lax.map(one_block, (idx, qs.reshape(B * K * nq, R, H)))
    return out.reshape(B, K, nq, R, Hv), lse.reshape(B, K, nq, R)

  # ---------------------------------------------------------------- backward
  def bwd_impl(qs, kk, vv, bias, sinks, seg, mkc, smc, sched, out, lse, dout, dlse):
    kl, cnt, part = sched
    delta = row_dot(dout.astype(jnp.float32), out.astype(jnp.float32))
    if dlse is not None:
      delta = delta - dlse
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    # Only floating consts of the score_mod are differentiated.
    fidx = [i for i, c in enumerate(smc) if jnp.issubdtype(c.dtype, jnp.inexact)]
    smc_zero = [jnp.zeros(smc[i].shape, jnp.float32) for i in fidx]
    # Inside shard_map, differentiate w.r.t. copies of the tables marked varying like the
    # data, so each tile's vjp gives this device's partial sum (no collective per tile);
    # `sum_to_vma` reduces once at the end.
    smc_var = vary_like([smc[i] for i in fidx], qs, kk, vv, dout, lse)
    if has_bias:
      # Per (b, kh) accumulator over the (padded) bias dims that vary inside one (b, kh).
      bias_acc_shape = (G if bias.shape[1] > 1 else 1,) + tuple(bias.shape[2:])

    def one_bh(args):
      i, q_bh, do_bh, lse_bh, dl_bh = args
      b, kh = i // K, i % K
      k_bh, v_bh = kk[b, kh], vv[b, kh]

      def q_step(carry, xs):
        dk, dv, dsm, dbias = carry
        qb, q_blk, do_blk, lse_blk, dl_blk = xs

        def body(t, c):
          dq, dk, dv, dsm, dbias = c
          kb, k_t, v_t, s0, s1, s = visit_tile(q_blk, k_bh, v_bh, bias, seg, mkc, smc, sched,
                                               b, kh, qb, t)
          p = jnp.exp(s - lse_blk[:, None])
          dv_t = _dot_f32(p.astype(do_blk.dtype), do_blk, (((0,), (0,)), ((), ())))
          dp = _dot_f32(do_blk, v_t, (((1,), (1,)), ((), ())))
          ds = p * (dp - dl_blk[:, None])
          if softcap is not None:
            th = jnp.tanh(s1 / softcap)
            ds = ds * (1.0 - th * th)
          if sm_fn is not None:
            def sm_of(s_, *fc):
              c_ = list(smc)
              for i, x in zip(fidx, fc):
                c_[i] = x
              return sm_fn(s_, *tile_indices(b, kh, qb, kb), *c_)
            _, vjp = jax.vjp(sm_of, s0, *smc_var)
            grads = vjp(ds)
            ds = grads[0]
            dsm = [x + g for x, g in zip(dsm, grads[1:])]
          if has_bias:
            dbias = _acc_bias(dbias, ds, qb, kb)
          dsc = ds.astype(q_blk.dtype)
          dq = dq + _dot_f32(dsc, k_t, (((1,), (0,)), ((), ())))
          dk_t = _dot_f32(dsc, q_blk, (((0,), (0,)), ((), ())))
          dk = jax.lax.dynamic_update_slice_in_dim(
              dk, jax.lax.dynamic_slice_in_dim(dk, kb * bk, bk) + dk_t, kb * bk, 0)
          dv = jax.lax.dynamic_update_slice_in_dim(
              dv, jax.lax.dynamic_slice_in_dim(dv, kb * bk, bk) + dv_t, kb * bk, 0)
          return dq, dk, dv, dsm, dbias

        n = _pick(cnt, b, kh)[qb]
        dq0 = vary_like(jnp.zeros((R, H), jnp.float32), q_blk, do_blk, lse_blk, dl_blk, k_bh,
                        v_bh, bias, seg, mkc, smc, sched)
        dq, dk, dv, dsm, dbias = jax.lax.fori_loop(0, n, body, (dq0, dk, dv, dsm, dbias))
        return (dk, dv, dsm, dbias), dq

      init = (jnp.zeros((Sp, H), jnp.float32), jnp.zeros((Sp, Hv), jnp.float32), smc_zero,
              None if not has_bias else jnp.zeros(bias_acc_shape, jnp.float32))
      init = vary_like(init, q_bh, do_bh, lse_bh, dl_bh, k_bh, v_bh, bias, seg, mkc, smc, sched)
      (dk, dv, dsm, dbias), dq = jax.lax.scan(
          q_step, init, (np.arange(nq, dtype=np.int32), q_bh, do_bh, lse_bh, dl_bh))
      return dq, dk, dv, dsm, dbias

    def _acc_bias(dbias, ds, qb, kb):
      Gb, Tb, Sb = dbias.shape
      t = ds.reshape(G, bq, bk)
      if Gb == 1:
        t = t.sum(axis=0, keepdims=True)
      if Tb == 1:
        t = t.sum(axis=1, keepdims=True)
      if Sb == 1:
        t = t.sum(axis=2, keepdims=True)
      start = (0, qb * bq if Tb > 1 else 0, kb * bk if Sb > 1 else 0)
      # Rows/cols beyond T/S were padded into the bias accumulator and are cut later.
      cur = jax.lax.dynamic_slice(dbias, start, t.shape)
      return jax.lax.dynamic_update_slice(dbias, cur + t, start)

    idx = np.arange(B * K, dtype=np.int32)
    dq, dk, dv, dsm, dbias = jax.lax.map(
        one_bh, (idx, qs.reshape(B * K, nq, R, H), dout.reshape(B * K, nq, R, Hv),
                  lse_safe.reshape(B * K, nq, R), delta.reshape(B * K, nq, R)))
    dq = dq.reshape(B, K, nq, R, H)
    dk = dk.reshape(B, K, Sp, H)
    dv = dv.reshape(B, K, Sp, Hv)
    dsm_f = {i: g.sum(axis=0).astype(smc[i].dtype) for i, g in zip(fidx, dsm)}
    dsm = [dsm_f[i] if i in dsm_f else _float0_zeros(c) for i, c in enumerate(smc)]
    dbias_out = None
    if has_bias:
      Bb, Nb, Tb, Sb = bias.shape
      db = dbias.reshape(B, K, *dbias.shape[1:])
      if Nb > 1:
        db = db.reshape(B, N, *db.shape[3:])
      else:
        db = db.sum(axis=1)
      if Bb == 1:
        db = db.sum(axis=0, keepdims=True)
      dbias_out = db[:, :, :(T if Tb > 1 else 1), :(S if Sb > 1 else 1)].astype(bias.dtype)
    dsinks = None
    if has_sinks:
      sk = sinks.astype(jnp.float32).reshape(1, K, 1, G, 1)
      lse5 = lse.reshape(B, K, nq, G, bq)
      p_sink = jnp.exp(sk - jnp.where(jnp.isfinite(lse5), lse5, jnp.inf))
      d5 = delta.reshape(B, K, nq, G, bq)
      valid = (np.arange(nq)[:, None] * bq + np.arange(bq)[None, :] < T)[None, None, :, None, :]
      dsinks = -jnp.sum(jnp.where(valid, p_sink * d5, 0.0), axis=(0, 2, 4)).reshape(N)
      dsinks = dsinks.astype(sinks.dtype)
    return dq, dk, dv, dsm, dbias_out, dsinks

  # ---------------------------------------------------------------- custom_vjp
  @jax.custom_vjp
  def core(q, k, v, bias, sinks, seg, mkc, smc, sched):
    out, lse = _forward(q, k, v, bias, sinks, seg, mkc, smc, sched)
    return out, lse

  def _forward(q, k, v, bias, sinks, seg, mkc, smc, sched):
    qs = to_qblocks((q.astype(jnp.float32) * scale).astype(dtype))
    kk, vv = to_kblocks(k), to_kblocks(v)
    if has_bias:
      bias = _pad_bias(bias)
    out, lse = fwd_impl(qs, kk, vv, bias, sinks, seg, mkc, smc, sched)
    return out, lse

  def _pad_bias(bias):
    Bb, Nb, Tb, Sb = bias.shape
    return jnp.pad(bias, ((0, 0), (0, 0), (0, Tp - T if Tb > 1 else 0),
                          (0, Sp - S if Sb > 1 else 0)))

  def core_fwd(q, k, v, bias, sinks, seg, mkc, smc, sched):
    out, lse = _forward(q, k, v, bias, sinks, seg, mkc, smc, sched)
    return (out, lse), (q, k, v, bias, sinks, seg, mkc, smc, sched, out, lse)

  def core_bwd(res, cts):
    q, k, v, bias, sinks, seg, mkc, smc, sched, out, lse = res
    dout, dlse = cts
    qs = to_qblocks((q.astype(jnp.float32) * scale).astype(dtype))
    kk, vv = to_kblocks(k), to_kblocks(v)
    pbias = _pad_bias(bias) if has_bias else None
    dq, dk, dv, dsm, dbias, dsinks = bwd_impl(
        qs, kk, vv, pbias, sinks, seg, mkc, smc, sched, out, lse, dout.astype(dtype), dlse)
    dq = (from_qblocks(dq) * scale).astype(q.dtype)
    dk = dk.transpose(0, 2, 1, 3)[:, :S].astype(k.dtype)
    dv = dv.transpose(0, 2, 1, 3)[:, :S].astype(v.dtype)
    dseg = None if seg is None else tuple(_float0_zeros(x) for x in seg)
    dmk = [_float0_zeros(x) for x in mkc]
    dsched = tuple(_float0_zeros(x) for x in sched)
    dq, dk, dv, dbias, dsinks, dsm = (
        sum_to_vma(g, p) for g, p in ((dq, q), (dk, k), (dv, v), (dbias, bias),
                                      (dsinks, sinks), (dsm, smc)))
    return dq, dk, dv, dbias, dsinks, dseg, dmk, dsm, dsched

  core.defvjp(core_fwd, core_bwd)

  seg = None
  if has_seg:  # padded so tile slices never clamp at the ragged end
    seg = (jnp.pad(jnp.asarray(a.q_segment_ids, jnp.int32), ((0, 0), (0, Tp - T)),
                   constant_values=-1),
           jnp.pad(jnp.asarray(a.kv_segment_ids, jnp.int32), ((0, 0), (0, Sp - S)),
                   constant_values=-2))
  sched = tuple(jnp.asarray(x) for x in (klist, count, partial))
  out_b, lse_b = core(q, k, v, a.bias, a.sinks, seg, list(mk_consts), list(sm_consts), sched)
  out = from_qblocks(out_b)
  if not return_lse:
    return out
  return out, rows_to_bnt(lse_b)
