"""Block-sparse flash attention for GPU (Pallas Triton), forward and backward.

Same contract and formula as :mod:`attnjax.kernels.tpu.flash`:

    s_ij = softcap(score_mod(scale * q_i . k_j + bias_ij))        (float32)
    o_i  = sum_{j allowed} exp(s_ij - lse_i) v_j ,   lse_i = log(sum_j exp(s_ij) + exp(sink_n))

("FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness";
"FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning").

Tiling.  One program per ``(batch, query head, q block)`` loops over the compact list
of non-empty key blocks of its row of the mask's block table (an index array read
in-kernel): first the partial tiles, where the mask predicate is evaluated, then the
full ones, unmasked.  GQA reads the kv head ``n // G`` without repeating K/V.
Backward: a dq program per ``(batch, head, q block)`` over the same list, and a
dk/dv program per ``(batch, kv head, k block)`` over the transposed list and the
``G`` query heads of the group; gradients for ``bias``, ``sinks`` and the arrays a
``score_mod`` closes over are produced too (a bias broadcast over the batch
and/or heads is accumulated into its own extent with atomic adds).  Head dims are
zero-padded to a power of two; ``T`` and ``S`` are padded to the block sizes.

Decode (flash-decoding, "Flash-Decoding for long-context inference", Dao et al.
2023): with ``BlockSizes.num_splits = P > 1`` (or the heuristic when ``B * N * nq``
programs are few) the grid is ``(B, N, nq * P)`` and program ``(q block, p)`` walks
only ranks ``[p c // P, (p + 1) c // P)`` of its q block's list of ``c`` tiles,
writing a partial output and its ``lse``; XLA merges them with a log-sum-exp combine,
the sink joining once there.  The backward kernels are fed the merged ``out``/``lse``.

Public entry point: :func:`flash_attention`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attnjax.core import jaxpr as jaxpr_lib
from attnjax.core import plan as plan_lib
from attnjax.core import tiling as tiling_lib
from attnjax.core.args import AttentionArgs
from attnjax.kernels import flash_wrapper as fw
from attnjax.kernels import pallas_shard
from attnjax.kernels import tile_math as tm
from attnjax.kernels.flash_wrapper import flash_attention_reference

__all__ = ["BlockSizes", "flash_attention", "paged_flash_attention", "flash_attention_reference",
           "grid_steps"]

_F32 = jnp.float32
# Programs below which the heuristic splits the key list (about two waves of programs
# on a GPU with ~130 SMs).
_SPLIT_TARGET = 256


def _is_pow2(x):
  return x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes and launch parameters of the Triton kernel.

  Attributes:
    block_q: query rows per program, a power of two >= 16.  ``None``: 64 (capped at
      ``T`` rounded up to a power of two, at least 16).
    block_k: keys per tile, a power of two >= 16.  ``None``: 64 (capped likewise).
    num_warps: Triton warps per program (``None``: 4 for head_dim <= 64, else 8).
    num_stages: software pipelining stages.
    num_splits: split-S decode (flash-decoding): each q block's list of non-empty k
      tiles is dealt into this many contiguous parts, each its own program writing a
      partial result and its log-sum-exp, merged in XLA.  ``1`` disables it; ``None``:
      a heuristic (:func:`attnjax.core.plan.resolve_num_splits`) that splits when
      ``B * N * nq`` programs are fewer than 256 (two waves of a large GPU), keeping at
      least 4 tiles per split.  The backward pass is not split.
    spatial_tile: 2D tiling of spatial masks by ``attnjax.attention`` (the dispatcher,
      :mod:`attnjax.core.tiling`): ``True`` (default) permutes the tokens of a
      neighborhood/window/grid/... mask's grid so each tile is a spatial patch;
      ``False`` keeps the row-major order; a tuple fixes the patch per grid axis.
  """
  block_q: Optional[int] = None
  block_k: Optional[int] = None
  num_warps: Optional[int] = None
  num_stages: int = 2
  num_splits: Optional[int] = None
  spatial_tile: Union[bool, tuple] = True

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      val = getattr(self, name)
      if val is None:
        continue
      if isinstance(val, bool) or not isinstance(val, int) or val < 16 or not _is_pow2(val):
        hint = max(16, tm.next_pow2(val if isinstance(val, int) and val > 0 else 16))
        raise ValueError(f"BlockSizes.{name} must be a power of two >= 16 (Triton tiles), got "
                         f"{val!r}; use e.g. {hint}")
    nw = self.num_warps
    if nw is not None and (isinstance(nw, bool) or not isinstance(nw, int) or not _is_pow2(nw)):
      raise ValueError(f"BlockSizes.num_warps must be a power of two or None, got {nw!r}")
    if isinstance(self.num_stages, bool) or not isinstance(self.num_stages, int) or \
        self.num_stages <= 0:
      raise ValueError(f"BlockSizes.num_stages must be a positive int, got {self.num_stages!r}")
    plan_lib.validate_num_splits(self.num_splits, "BlockSizes")
    tiling_lib.check_spatial_tile(self.spatial_tile, "BlockSizes")

  @classmethod
  def get_default(cls) -> "BlockSizes":
    return cls()

  def resolve(self, T: int, S: int):
    bq = self.block_q or min(64, max(16, tm.next_pow2(T)))
    bk = self.block_k or min(64, max(16, tm.next_pow2(S)))
    return bq, bk

  def resolve_splits(self, table, programs: int) -> int:
    """Splits of each q block's key list for a call with ``programs = B * N * nq``."""
    return plan_lib.resolve_num_splits(self.num_splits, table, programs, target=_SPLIT_TARGET)


@dataclasses.dataclass(frozen=True)
class _Cfg:
  math: tm.TileMath
  G: int
  bq: int
  bk: int
  Bt: int
  Kt: int
  has_bias: bool
  bias_b: bool
  has_dense: bool
  dense_b: bool
  has_seg: bool
  has_sinks: bool
  n_pred: int
  n_sm: int
  n_sm_grad: int
  sm_widths: tuple
  P: int = 1          # splits of each q block's tile list; grid axis 2 runs over qb * P + p
  db_atomic: bool = False   # dbias summed over broadcast batch/heads by atomic adds
  paged: bool = False       # forward on page pools: a page-table row follows the schedule
  head_stride: int = 0      # dk/dv lists: head g of the group reads sched[g * stride:]
  count: bool = False       # a last output counts the list iterations (fw.count_steps)
  dense_cols: int = 0       # > 0: ``dense`` is a row selection, tile kb reads column kb // it
  sel_width: int = 0        # columns of the row selection input
  key_bias: bool = False    # the bias is per key ([X, N, Sp]); dk/dv kernel gives its grad
  has_kiv: bool = False     # key intervals: row i sees key j iff start_j <= i < end_j
  kiv_b: bool = False       # ... varying with the batch


def _tiles(b, h, q0, k0, bq, bk):
  """[bq, bk] int32 index tiles (b, h, q_idx, kv_idx)."""
  qi = q0 + jnp.arange(bq, dtype=jnp.int32)[:, None]
  ki = k0 + jnp.arange(bk, dtype=jnp.int32)[None, :]
  qi = jnp.broadcast_to(qi, (bq, bk))
  ki = jnp.broadcast_to(ki, (bq, bk))
  z = jnp.zeros((bq, bk), jnp.int32)
  return z + b, z + h, qi, ki


def _refs(cfg, refs, kind, n_out):
  """The kernel's refs (:class:`tm.KernelRefs`); ``sched`` is the index array row,
  ``pages`` the page-table row of a paged forward, ``count`` the step counter output (or
  None)."""
  r = tm.KernelRefs(cfg, refs, n_lead=2 if cfg.paged else 1, kind=kind,
                    n_out=n_out + cfg.count,
                    aliased=kind == "dq" and cfg.has_bias and not cfg.key_bias)
  r.sched = r.lead[0]
  r.pages = r.lead[1] if cfg.paged else None
  r.count = r.outs[-1] if cfg.count else None
  r.outs = r.outs[:n_out]
  return r


def _dense_tile(cfg, rows, kb, ks):
  """The dense-mask tile of k block ``kb`` from the mask's ``rows`` ref view (``[bq, W]``):
  columns ``ks``, or (a row selection) column ``kb // dense_cols`` broadcast."""
  if not cfg.dense_cols:
    return rows(ks)
  col = kb if cfg.dense_cols == 1 else jax.lax.div(kb, jnp.int32(cfg.dense_cols))
  lane = jnp.arange(cfg.sel_width, dtype=jnp.int32)[None, :]
  return jnp.broadcast_to(tm.select_column(rows(slice(None)), col, lane), (cfg.bq, cfg.bk))


def _with_intervals(r, read, idx, masked, dense):
  """ANDs the keys' row intervals into the ``dense`` tile of a masked tile; ``read(ref)``
  is the tile's ``[bk]`` slice of a per-key input."""
  if r.klo is None or not masked:
    return dense
  qi = idx()[2]
  iv = (read(r.klo)[None, :] <= qi) & (qi < read(r.khi)[None, :])
  return iv if dense is None else (dense != 0) & iv


def _bias_tile(cfg, r, read, rows):
  """The bias tile: ``rows()`` of the dense bias, or (a per-key bias) ``read(ref)``
  broadcast over the rows."""
  if r.bias is None:
    return None
  return read(r.bias)[None, :] if cfg.key_bias else rows()


def _count_steps(r, n):
  """Writes the iterations this program's loops ran (:func:`fw.count_steps`)."""
  if r.count is not None:
    r.count[...] = jnp.zeros(r.count.shape, jnp.int32) + n


def _fwd_kernel(*refs, cfg: _Cfg):
  r = _refs(cfg, refs, "fwd", 2)
  o_ref, lse_ref = r.outs
  b, n, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  qb = i if cfg.P == 1 else jax.lax.div(i, jnp.int32(cfg.P))
  bq, bk, M = cfg.bq, cfg.bk, cfg.math
  q = r.q[...]
  Hv = r.v.shape[-1]
  n_part, n_tot = r.sched[0], r.sched[1]
  qseg = r.qseg[...] if r.qseg is not None else None

  if cfg.has_sinks:
    m0 = jnp.zeros((bq,), _F32) + r.sinks[n].astype(_F32)
    l0 = jnp.ones((bq,), _F32)
  else:
    m0 = jnp.full((bq,), -jnp.inf, _F32)
    l0 = jnp.zeros((bq,), _F32)
  acc0 = jnp.zeros((bq, Hv), _F32)

  def body(t, carry, masked):
    m, l, acc = carry
    kb = r.sched[2 + t]
    ks = pl.ds(kb * bk, bk)
    if cfg.paged:            # key block kb of this row is page pages[kb] of the pools
      page = r.pages[kb]
      k, v = r.k[page], r.v[page]
    else:
      k, v = r.k[ks, :], r.v[ks, :]
    read = lambda ref: ref[ks]
    bias = _bias_tile(cfg, r, read, lambda: r.bias[:, ks])
    idx = functools.lru_cache(maxsize=None)(
        lambda: _tiles(b, n, qb * bq, kb * bk, bq, bk))
    seg_eq = dense = None
    if masked:
      seg_eq = None if qseg is None else qseg[:, None] == r.kseg[ks][None, :]
      if r.dense is not None:
        dense = _dense_tile(cfg, lambda c: r.dense[:, c], kb, ks)
    dense = _with_intervals(r, read, idx, masked, dense)
    _, _, s, _ = M.masked_logits(q, k, bias, idx, r.sm, masked, r.pred, seg_eq, dense)
    return M.online_softmax(m, l, acc, s, v)

  if cfg.P == 1:
    bounds = (0, n_part, n_part, n_tot)
  else:                  # this program's contiguous share of the list (partial tiles first)
    lo, hi = plan_lib.split_bounds(n_tot, jax.lax.rem(i, jnp.int32(cfg.P)), cfg.P)
    bounds = (lo, jnp.minimum(hi, n_part), jnp.maximum(lo, n_part), hi)
  carry = jax.lax.fori_loop(bounds[0], bounds[1], functools.partial(body, masked=True),
                            (m0, l0, acc0))
  m, l, acc = jax.lax.fori_loop(bounds[2], bounds[3], functools.partial(body, masked=False),
                                carry)
  _count_steps(r, bounds[1] - bounds[0] + bounds[3] - bounds[2])
  o, lse = tm.finish_softmax(m, l, acc)
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = lse


def _tile_bwd(cfg, r, q, do, lse, delta, k, v, bias, dense, seg_eq, idx, masked):
  """Probabilities and ``d s`` of one tile (``lse``, ``delta``: ``[bq]``)."""
  M = cfg.math
  s0, s1, s, ev = M.masked_logits(q, k, bias, idx, r.sm, masked, r.pred, seg_eq, dense)
  p, ds = M.probs_and_ds(s, lse[:, None], do, v, delta[:, None])
  return p, ds, s0, s1, ev


def _dq_kernel(*refs, cfg: _Cfg):
  dq_db = cfg.has_bias and not cfg.key_bias
  r = _refs(cfg, refs, "dq", 2 if dq_db else 1)
  dq_ref = r.outs[0]
  db_ref = r.outs[1] if dq_db else None
  b, n, qb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  bq, bk, M = cfg.bq, cfg.bk, cfg.math
  q, do, lse, delta = r.q[...], r.do[...], r.lse[...], r.delta[...]
  qseg = r.qseg[...] if r.qseg is not None else None
  n_part, n_tot = r.sched[0], r.sched[1]

  def body(t, dq, masked):
    kb = r.sched[2 + t]
    ks = pl.ds(kb * bk, bk)
    k, v = r.k[ks, :], r.v[ks, :]
    read = lambda ref: ref[ks]
    bias = _bias_tile(cfg, r, read, lambda: r.bias[:, ks])
    dense = None
    if masked and r.dense is not None:
      dense = _dense_tile(cfg, lambda c: r.dense[:, c], kb, ks)
    seg_eq = None if (qseg is None or not masked) else qseg[:, None] == r.kseg[ks][None, :]
    idx = functools.lru_cache(maxsize=None)(
        lambda: _tiles(b, n, qb * bq, kb * bk, bq, bk))
    dense = _with_intervals(r, read, idx, masked, dense)
    p, ds, s0, s1, ev = _tile_bwd(cfg, r, q, do, lse, delta, k, v, bias, dense, seg_eq, idx,
                                  masked)
    ds, _ = M.dlogits(ds, s0, s1, idx, r.sm, ev, {}, {})
    if db_ref is not None:
      if cfg.db_atomic:      # programs of every (b, n) the bias is broadcast over add here
        plgpu.atomic_add(db_ref, (pl.ds(0, bq), ks), ds)
      else:
        db_ref[:, ks] = ds
    return dq + M.dot_nn(ds.astype(k.dtype), k) * M.scale

  dq = jnp.zeros(q.shape, _F32)
  dq = jax.lax.fori_loop(0, n_part, functools.partial(body, masked=True), dq)
  dq = jax.lax.fori_loop(n_part, n_tot, functools.partial(body, masked=False), dq)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  _count_steps(r, n_tot)


def _dkv_kernel(*refs, cfg: _Cfg):
  n_out = 2 + cfg.n_sm_grad + cfg.key_bias
  r = _refs(cfg, refs, "dkv", n_out)
  dk_ref, dv_ref = r.outs[:2]
  dc_refs = r.outs[2:2 + cfg.n_sm_grad]
  dkb_ref = r.outs[-1] if cfg.key_bias else None    # [G, bk]: the per-key bias grad
  b, kh, kb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  bq, bk, G, M = cfg.bq, cfg.bk, cfg.G, cfg.math
  k, v = r.k[...], r.v[...]
  ks = pl.ds(kb * bk, bk)
  kseg = r.kseg[...] if r.kseg is not None else None
  executed = jnp.int32(0)
  dk = jnp.zeros(k.shape, _F32)
  dv = jnp.zeros(v.shape, _F32)
  dcs = tuple(jnp.zeros((1, w), _F32) for w in cfg.sm_widths)

  for g in range(G):
    n = kh * G + g
    base = g * cfg.head_stride          # head g's list (the group's shared one: 0)
    n_part, n_tot = r.sched[base], r.sched[base + 1]
    executed = executed + n_tot

    def body(t, carry, masked, g=g, n=n, base=base):
      dk, dv, dcs, dkb = carry
      qb = r.sched[base + 2 + t]
      qs = pl.ds(qb * bq, bq)
      q, do = r.q[g, qs, :], r.do[g, qs, :]
      lse, delta = r.lse[g, qs], r.delta[g, qs]
      read = lambda ref, g=g: ref[g, :]
      bias = _bias_tile(cfg, r, read, lambda g=g, qs=qs: r.bias[g, qs, ks])
      dense = None
      if masked and r.dense is not None:
        dense = _dense_tile(cfg, lambda c, g=g, qs=qs: r.dense[g, qs, c], kb, ks)
      seg_eq = None if (kseg is None or not masked) else r.qseg[qs][:, None] == kseg[None, :]
      idx = functools.lru_cache(maxsize=None)(
          lambda: _tiles(b, n, qb * bq, kb * bk, bq, bk))
      dense = _with_intervals(r, read, idx, masked, dense)
      p, ds, s0, s1, ev = _tile_bwd(cfg, r, q, do, lse, delta, k, v, bias, dense, seg_eq,
                                    idx, masked)
      acc = {j: dcs[j] for j in range(len(dcs))}
      widths = {j: cfg.sm_widths[j] for j in range(len(dcs))}
      ds, acc = M.dlogits(ds, s0, s1, idx, r.sm, ev, acc, widths)
      dv = dv + M.dot_tn(p.astype(do.dtype), do)
      dk = dk + M.dot_tn(ds.astype(q.dtype), q) * M.scale
      if dkb is not None:
        dkb = dkb + jnp.sum(ds, axis=0)
      return dk, dv, tuple(acc[j] for j in range(len(dcs))), dkb

    dkb0 = jnp.zeros((bk,), _F32) if dkb_ref is not None else None
    carry = jax.lax.fori_loop(0, n_part, functools.partial(body, masked=True),
                              (dk, dv, dcs, dkb0))
    dk, dv, dcs, dkb = jax.lax.fori_loop(n_part, n_tot, functools.partial(body, masked=False),
                                         carry)
    if dkb_ref is not None:
      dkb_ref[g, :] = dkb

  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  for ref, d in zip(dc_refs, dcs):
    ref[...] = d[0]
  _count_steps(r, executed)


# ====================================================================== the call


def _sched_array(table, transpose):
  cols, n_part, n_tot = plan_lib.list_schedule(table, transpose=transpose)
  xp = jnp if isinstance(cols, (jax.Array, jax.core.Tracer)) else np
  arr = xp.concatenate([n_part[..., None], n_tot[..., None], cols], axis=-1).astype(xp.int32)
  W = arr.shape[-1]
  Wp = tm.next_pow2(W)
  if Wp != W:
    arr = xp.concatenate([arr, xp.zeros(arr.shape[:-1] + (Wp - W,), xp.int32)], axis=-1)
  return jnp.asarray(arr)


def _group_lists(lists, K, G):
  """Transposed per-head lists ``[B', N', nk, W]`` -> the dk/dv program's row per kv head:
  ``N' = N`` (G > 1): the ``G`` heads' lists side by side (``[B', K, nk, G * W]`` padded to
  a power of two), head ``g`` at offset ``g * W``; else as is (every head of a group
  shares one list, offset 0).  Returns ``(lists, stride)``."""
  Bt, Nt, nk, W = lists.shape
  if Nt == 1 or G == 1:
    return lists, 0
  x = lists.reshape(Bt, K, G, nk, W).transpose(0, 1, 3, 2, 4).reshape(Bt, K, nk, G * W)
  Wp = tm.next_pow2(G * W)
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, Wp - G * W))), W


def _pad1(x):
  n = x.shape[0]
  return jnp.pad(x, (0, tm.next_pow2(n) - n))


def _build(a: AttentionArgs, bs: BlockSizes, interpret: bool, page_table=None):
  """Traces/plans a call; returns ``(apply, plan, P)``. With ``page_table [B,
  pages_per_seq]``, ``k``/``v`` are page pools ``[num_pages, K, block_k, D]`` (``D`` a
  power of two): the forward program loads key block ``kb`` of row ``b`` from page
  ``page_table[b, kb]``; the backward gathers the pages and scatters dk/dv back."""
  B, T, S, N, K, G, H, Hv = a.B, a.T, a.S, a.N, a.K, a.G, a.H, a.Hv
  bq, bk = bs.resolve(T, S)
  plan = plan_lib.make_plan(a, bq, bk)
  nq, nk, Tp, Sp = plan.nq, plan.nk, plan.Tp, plan.Sp
  pred_tf = plan_lib.trace_predicate(plan, bq, bk)
  sm_tf = plan_lib.trace_score_mod(a, bq, bk)
  Hp, Hvp = tm.next_pow2(H), tm.next_pow2(Hv)
  Bt, Kt = plan.table.shape[:2]
  # Lists per query head (a program of head n walks its own head's tiles, not the
  # union over its GQA group); the dk/dv program of kv head kh reads its G heads' lists.
  Nt = plan.head_table.shape[1]
  fwd_sched = _sched_array(plan.head_table, False)      # [Bt, Nt, nq, W]
  bwd_sched, head_stride = _group_lists(_sched_array(plan.head_table, True), K, G)
  count = fw.counting_steps()
  sel_w = tm.next_pow2(plan.dense.shape[3]) if plan.dense_cols else 0
  dense_w = sel_w or Sp             # columns of the dense mask input
  num_warps = bs.num_warps or (4 if max(Hp, Hvp) <= 64 else 8)
  P = bs.resolve_splits(plan.table, B * N * nq)

  def make_cfg(dtype, splits=1):
    return _Cfg(math=fw.tile_math(a, plan, pred_tf, sm_tf, dtype), G=G, bq=bq, bk=bk,
                Bt=Bt, Kt=Kt, P=splits, head_stride=head_stride, count=count, sel_width=sel_w,
                **fw.cfg_flags(a, plan, pred_tf, sm_tf, splits, tm.next_pow2))

  def params():
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=bs.num_stages)

  # Schedules and a dense mask built from traced inputs enter the custom_vjp as arguments.
  aux, restore = fw.hoist_tracers(dict(fwd=fwd_sched, bwd=bwd_sched, dense=plan.dense,
                                       kiv=plan.key_iv, pages=page_table))
  pps = None if page_table is None else page_table.shape[1]
  if pps is not None and (H != Hp or Hv != Hvp):
    raise ValueError(f"the paged GPU kernel needs power-of-two head dims (the pools are not "
                     f"padded), got H={H}, Hv={Hv}")

  def prep_side(st, bias, seg):
    pad_ts = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, Tp - T), (0, Sp - S)))
    pad_sel = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, Tp - T), (0, sel_w - x.shape[3])))
    return fw.side_inputs(plan, bias, seg, st["dense"], pad_ts, lambda x: x, lambda x: x,
                          place_sel=pad_sel, place_key=lambda x: x, key_iv=st["kiv"])

  def sel(b, n):          # the list of head n (fwd / dq)
    return (b if Bt > 1 else 0, n if Nt > 1 else 0)

  def sel_kv(b, kh):      # the lists of kv head kh's group (dk / dv)
    return (b if Bt > 1 else 0, kh if bwd_sched.shape[1] > 1 else 0)

  def counter(cfg, out_specs, out_shape, grid):
    """The step counter output of a counting build (:func:`fw.count_steps`)."""
    if cfg.count:
      out_specs.append(pl.BlockSpec((None, None, None, 16), lambda *i: (*i, 0)))
      out_shape.append(jax.ShapeDtypeStruct((*grid, 16), jnp.int32))

  def record(cfg, name, outs):
    if cfg.count:
      n = outs[-1][..., 0]
      fw.record_steps(name, n, n)
      return outs[:-1]
    return outs

  def q_block(cfg, i):
    """The q block of grid index ``i = qb * P + p``."""
    return i if cfg.P == 1 else jax.lax.div(i, jnp.int32(cfg.P))

  def side_specs_q(cfg):
    """Per (b, n, qb [, split]) program: row blocks of the side inputs."""
    specs = []
    key_row = lambda batched: pl.BlockSpec((None, None, Sp),
                                           lambda b, n, i: (b if batched else 0, n, 0))
    if cfg.has_bias and cfg.key_bias:
      specs.append(key_row(cfg.bias_b))
    elif cfg.has_bias:
      specs.append(pl.BlockSpec((None, None, bq, Sp),
                                lambda b, n, i: (b if cfg.bias_b else 0, n, q_block(cfg, i), 0)))
    if cfg.has_dense:
      specs.append(pl.BlockSpec((None, None, bq, dense_w),
                                lambda b, n, i: (b if cfg.dense_b else 0, n, q_block(cfg, i), 0)))
    if cfg.has_seg:
      specs += [pl.BlockSpec((None, bq), lambda b, n, i: (b, q_block(cfg, i))),
                pl.BlockSpec((None, Sp), lambda b, n, i: (b, 0))]
    if cfg.has_kiv:
      specs += [key_row(cfg.kiv_b)] * 2
    return specs

  def side_specs_k(cfg):
    """Per (b, kh, kb) program: the G heads' full rows, this k block's columns."""
    specs = []
    key_cols = lambda batched: pl.BlockSpec((None, G, bk),
                                            lambda b, kh, j: (b if batched else 0, kh, j))
    if cfg.has_bias and cfg.key_bias:
      specs.append(key_cols(cfg.bias_b))
    elif cfg.has_bias:
      specs.append(pl.BlockSpec((None, G, Tp, Sp),
                                lambda b, kh, j: (b if cfg.bias_b else 0, kh, 0, 0)))
    if cfg.has_dense:
      specs.append(pl.BlockSpec((None, G, Tp, dense_w),
                                lambda b, kh, j: (b if cfg.dense_b else 0, kh, 0, 0)))
    if cfg.has_seg:
      specs += [pl.BlockSpec((None, Tp), lambda b, kh, j: (b, 0)),
                pl.BlockSpec((None, bk), lambda b, kh, j: (b, j))]
    if cfg.has_kiv:
      specs += [key_cols(cfg.kiv_b)] * 2
    return specs

  def const_specs(consts):
    return [pl.BlockSpec(c.shape, lambda *_: (0,)) for c in consts]

  def run_fwd(st, qr, kr, vr, sinks, side, pred_c, sm_c):
    """Forward kernel; with ``P > 1`` splits, per-split partials merged in XLA."""
    cfg = dataclasses.replace(make_cfg(qr.dtype, splits=P), paged=pps is not None)
    W = fwd_sched.shape[-1]
    qbl = functools.partial(q_block, cfg)
    specs = [pl.BlockSpec((None, None, None, W),
                          lambda b, n, i: (*sel(b, n), qbl(i), 0))]
    lead = [st["fwd"]]
    if pps is None:
      kv_specs = [pl.BlockSpec((None, None, Sp, D), lambda b, n, i: (b, n // G, 0, 0))
                  for D in (Hp, Hvp)]
    else:                 # the kv head's slice of every page; the row's page-table row
      table = st["pages"].astype(jnp.int32)
      table = jnp.pad(table, ((0, 0), (0, tm.next_pow2(pps) - pps)))
      lead.append(table)
      specs.append(pl.BlockSpec((None, table.shape[1]), lambda b, n, i: (b, 0)))
      kv_specs = [pl.BlockSpec((kr.shape[0], None, bk, D), lambda b, n, i: (0, n // G, 0, 0))
                  for D in (Hp, Hvp)]
    specs += [pl.BlockSpec((None, None, bq, Hp), lambda b, n, i: (b, n, qbl(i), 0)),
              *kv_specs]
    extra = []
    if cfg.has_sinks:
      sk = _pad1(sinks.astype(_F32))
      extra.append(sk)
      specs.append(pl.BlockSpec(sk.shape, lambda *_: (0,)))
    specs += side_specs_q(cfg) + const_specs(pred_c) + const_specs(sm_c)
    # Rows (q block, split, t): program i = qb * P + p writes row block i.
    out_specs = [pl.BlockSpec((None, None, bq, Hvp), lambda b, n, i: (b, n, i, 0)),
                 pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i))]
    out_shape = [jax.ShapeDtypeStruct((B, N, Tp * P, Hvp), qr.dtype if P == 1 else _F32),
                 jax.ShapeDtypeStruct((B, N, Tp * P), _F32)]
    counter(cfg, out_specs, out_shape, (B, N, nq * P))
    name = (("attnjax_flash_fwd" if P == 1 else "attnjax_flash_fwd_split")
            + ("" if pps is None else "_paged") + "_gpu")
    outs = pallas_shard.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg), grid=(B, N, nq * P), in_specs=specs,
        out_specs=out_specs, out_shape=out_shape,
        compiler_params=params(), interpret=interpret, name=name,
    )(*lead, qr, kr, vr, *extra, *side, *pred_c, *sm_c)
    o, lse = record(cfg, name, outs)
    if P == 1:
      return o, lse
    sink = None if sinks is None else sinks.reshape(1, N, 1, 1)
    o, lse = tm.merge_splits(o.reshape(B, N, nq, P, bq, Hvp), lse.reshape(B, N, nq, P, bq),
                                 axis=3, sink=sink)
    return o.reshape(B, N, Tp, Hvp).astype(qr.dtype), lse.reshape(B, N, Tp)

  def run_bwd(st, qr, kr, vr, dor, lse, delta, side, pred_c, sm_c, has_bias):
    cfg = make_cfg(qr.dtype)
    W = fwd_sched.shape[-1]
    specs = [pl.BlockSpec((None, None, None, W), lambda b, n, i: (*sel(b, n), i, 0)),
             pl.BlockSpec((None, None, bq, Hp), lambda b, n, i: (b, n, i, 0)),
             pl.BlockSpec((None, None, Sp, Hp), lambda b, n, i: (b, n // G, 0, 0)),
             pl.BlockSpec((None, None, Sp, Hvp), lambda b, n, i: (b, n // G, 0, 0)),
             pl.BlockSpec((None, None, bq, Hvp), lambda b, n, i: (b, n, i, 0)),
             pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i)),
             pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i))]
    specs += side_specs_q(cfg) + const_specs(pred_c) + const_specs(sm_c)
    out_specs = [pl.BlockSpec((None, None, bq, Hp), lambda b, n, i: (b, n, i, 0))]
    out_shape = [jax.ShapeDtypeStruct((B, N, Tp, Hp), qr.dtype)]
    extra, aliases = [], {}
    if has_bias and not cfg.key_bias:
      # The gradient buffer has the bias's own batch/head extent ([Bb, Nb, Tp, Sp]);
      # when it is broadcast, programs of different (b, n) accumulate atomically.
      Bb, Nb = a.bias.shape[:2]
      cfg = dataclasses.replace(cfg, db_atomic=(Bb, Nb) != (B, N))

      def dbmap(b, n, i):
        return (b if Bb > 1 else 0, n if Nb > 1 else 0, i, 0)
      extra.append(jnp.zeros((Bb, Nb, Tp, Sp), _F32))
      specs.append(pl.BlockSpec((None, None, bq, Sp), dbmap))
      out_specs.append(pl.BlockSpec((None, None, bq, Sp), dbmap))
      out_shape.append(jax.ShapeDtypeStruct((Bb, Nb, Tp, Sp), _F32))
      aliases = {1 + 6 + len(side) + len(pred_c) + len(sm_c): 1}
    counter(cfg, out_specs, out_shape, (B, N, nq))
    outs = pallas_shard.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg), grid=(B, N, nq), in_specs=specs,
        out_specs=out_specs, out_shape=out_shape, input_output_aliases=aliases,
        compiler_params=params(), interpret=interpret, name="attnjax_flash_bwd_dq_gpu",
    )(st["fwd"], qr, kr, vr, dor, lse, delta, *side, *pred_c, *sm_c, *extra)
    outs = record(cfg, "attnjax_flash_bwd_dq_gpu", outs)
    dq = outs[0]
    dbias = outs[1] if has_bias and not cfg.key_bias else None

    W2 = bwd_sched.shape[-1]
    specs = [pl.BlockSpec((None, None, None, W2), lambda b, kh, j: (*sel_kv(b, kh), j, 0)),
             pl.BlockSpec((None, G, Tp, Hp), lambda b, kh, j: (b, kh, 0, 0)),
             pl.BlockSpec((None, None, bk, Hp), lambda b, kh, j: (b, kh, j, 0)),
             pl.BlockSpec((None, None, bk, Hvp), lambda b, kh, j: (b, kh, j, 0)),
             pl.BlockSpec((None, G, Tp, Hvp), lambda b, kh, j: (b, kh, 0, 0)),
             pl.BlockSpec((None, G, Tp), lambda b, kh, j: (b, kh, 0)),
             pl.BlockSpec((None, G, Tp), lambda b, kh, j: (b, kh, 0))]
    specs += side_specs_k(cfg) + const_specs(pred_c) + const_specs(sm_c)
    out_specs = [pl.BlockSpec((None, None, bk, Hp), lambda b, kh, j: (b, kh, j, 0)),
                 pl.BlockSpec((None, None, bk, Hvp), lambda b, kh, j: (b, kh, j, 0))]
    out_shape = [jax.ShapeDtypeStruct((B, K, Sp, Hp), kr.dtype),
                 jax.ShapeDtypeStruct((B, K, Sp, Hvp), vr.dtype)]
    for w in cfg.sm_widths:
      out_specs.append(pl.BlockSpec((None, None, None, w), lambda b, kh, j: (b, kh, j, 0)))
      out_shape.append(jax.ShapeDtypeStruct((B, K, nk, w), _F32))
    if cfg.key_bias:                 # per-key bias gradient: [B, N, Sp]
      out_specs.append(pl.BlockSpec((None, G, bk), lambda b, kh, j: (b, kh, j)))
      out_shape.append(jax.ShapeDtypeStruct((B, N, Sp), _F32))
    counter(cfg, out_specs, out_shape, (B, K, nk))
    outs = pallas_shard.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg), grid=(B, K, nk), in_specs=specs,
        out_specs=out_specs, out_shape=out_shape,
        compiler_params=params(), interpret=interpret, name="attnjax_flash_bwd_dkv_gpu",
    )(st["bwd"], qr, kr, vr, dor, lse, delta, *side, *pred_c, *sm_c)
    outs = record(cfg, "attnjax_flash_bwd_dkv_gpu", outs)
    dk, dv = outs[:2]
    dcs = [x.sum(axis=(0, 1, 2)) for x in outs[2:2 + cfg.n_sm_grad]]
    if cfg.key_bias:                 # [B, N, 1, Sp]
      dbias = outs[-1][:, :, None, :]
    return dq, dk, dv, dbias, dcs

  def to_bnth(x, L, Lp, Dp):     # [B, L, X, D] -> [B, X, Lp, Dp]
    return jnp.pad(x, ((0, 0), (0, Lp - L), (0, 0), (0, Dp - x.shape[-1]))).transpose(0, 2, 1, 3)

  def storage(cs):
    return [_pad1(jaxpr_lib.const_storage(c)) for c in cs]

  def forward(q, k, v, bias, sinks, seg, pred_c, sm_c, aux):
    st = restore(aux)
    side = prep_side(st, bias, seg)
    if pps is None:
      k, v = to_bnth(k, S, Sp, Hp), to_bnth(v, S, Sp, Hvp)
    return run_fwd(st, to_bnth(q, T, Tp, Hp), k, v, sinks, side, storage(pred_c),
                   storage(sm_c))

  def backward(args, aux, out, lse, dout, dlse):
    q, k, v, bias, sinks, seg, pred_c, sm_c = args
    st = restore(aux)
    valid = (jnp.arange(Tp) < T)[None, None, :]
    delta, lse_b, dor, delta_b = fw.backward_rows(out, lse, dout, dlse, valid, q.dtype)
    kl, vl = (k, v) if pps is None else (fw.gather_pages(k, st["pages"]),
                                         fw.gather_pages(v, st["pages"]))
    dq, dk, dv, db, dcs = run_bwd(
        st, to_bnth(q, T, Tp, Hp), to_bnth(kl, S, Sp, Hp), to_bnth(vl, S, Sp, Hvp), dor, lse_b,
        delta_b, prep_side(st, bias, seg), storage(pred_c), storage(sm_c), bias is not None)
    dk, dv = dk.transpose(0, 2, 1, 3)[:, :S, :, :H], dv.transpose(0, 2, 1, 3)[:, :S, :, :Hv]
    if pps is not None:
      dk, dv = fw.scatter_pages(k, st["pages"], dk), fw.scatter_pages(v, st["pages"], dv)
    return (dq.transpose(0, 2, 1, 3)[:, :T, :, :H], dk, dv,
            None if db is None else db[:, :, :T, :S], lse[:, :, :T], delta[:, :, :T], dcs)

  core = fw.flash_core(forward, backward)

  def apply(q, k, v):
    out, lse = core(q, k, v, a.bias, a.sinks, plan.seg, fw.traced_consts(pred_tf),
                    fw.traced_consts(sm_tf), aux)
    return out.transpose(0, 2, 1, 3)[:, :T, :, :Hv], lse[:, :, :T]

  return apply, plan, P


_FLASH_DOC = """Block-sparse flash attention on GPU (Pallas Triton), forward and backward.

  ``o_i = sum_j softmax_j(s_ij) v_j`` with ``s_ij = softcap(score_mod(scale q_i.k_j +
  bias_ij))``, masked, the sink joining the denominator only.  Paper: "FlashAttention-2:
  Faster Attention with Better Parallelism and Work Partitioning" (Dao, 2023).

  Args:
    q: ``[B, T, N, H]``; k: ``[B, S, K, H]``; v: ``[B, S, K, Hv]``; ``N % K == 0``.
    mask, score_mod, bias, q_segment_ids, kv_segment_ids, scale, softcap, sinks,
      return_lse: as in :func:`attnjax.attention`.
    block_sizes: :class:`BlockSizes`; another type raises
      :class:`attnjax.core.Unsupported`.
    interpret: run in Pallas interpret mode; default: when the backend is not GPU.

  Returns:
    ``[B, T, N, Hv]`` in ``q.dtype`` (and ``lse [B, N, T]`` float32 with ``return_lse``).
  """

flash_attention = fw.make_flash_attention(
    lambda a, bs, interpret: _build(a, bs, interpret)[0], BlockSizes, "GPU",
    ("gpu", "cuda", "rocm"), doc=_FLASH_DOC, module=__name__)


_PAGED_DOC = """Flash attention on K/V page pools read through a page table (paged decode).

  Equals ``flash_attention(q, gather(k_pages), gather(v_pages), ...)`` with ``gather`` =
  :func:`attnjax.kernels.flash_wrapper.gather_pages`, without the gather: each program
  gets its row of the page table and its kv head's slice of the pools, and loads key
  block ``kb`` from page ``page_table[b, kb]`` (one page per key block: ``page_size`` a
  power of two >= 16; head dims powers of two, since the pools are not padded).  The
  backward pass gathers the pages and scatters dk/dv back into the pools.

  Args:
    q: ``[B, T, N, H]``; k_pages: ``[num_pages, K, page_size, H]``; v_pages: ``[num_pages,
      K, page_size, Hv]``; page_table: int ``[B, pages_per_seq]``.
    mask, ..., interpret: as in :func:`flash_attention`; ``block_sizes.block_k`` must be
      None or ``page_size``.

  Returns:
    ``[B, T, N, Hv]`` in ``q.dtype`` (and ``lse [B, N, T]`` float32 with ``return_lse``).
  """

paged_flash_attention = fw.make_paged_flash_attention(
    lambda a, bs, interpret, table: _build(a, bs, interpret, page_table=table)[0], BlockSizes,
    "GPU", ("gpu", "cuda", "rocm"), doc=_PAGED_DOC, module=__name__)


def grid_steps(q, k, v, *, block_sizes=None, **kwargs):
  """Forward programs and tiles for a call with a static mask.

  Returns ``num_splits`` (``P``), ``fwd_programs`` (``B * N * nq * P``), ``fwd_tiles``
  (``[B', N', nq, P]``: tiles each split program of a head visits, from the head's own
  list), ``fwd_active`` (tiles computed in all), the ``table`` (GQA groups merged),
  ``block_q`` and ``block_k``.
  """
  bs = fw.as_block_sizes(block_sizes, BlockSizes, "GPU")
  a, plan, P = fw.plan_call(q, k, v, bs, kwargs, lambda a, plan: a.B * a.N * plan.nq)
  _, _, n_tot = plan_lib.list_schedule(plan.head_table)
  lo, hi = plan_lib.split_bounds(n_tot[..., None], np.arange(P), P)   # as the kernel does
  tiles = hi - lo
  Bt, Nt = plan.head_table.shape[:2]
  rep = (a.B // Bt) * (a.N // Nt)
  return dict(num_splits=P, fwd_programs=a.B * a.N * plan.nq * P, fwd_tiles=tiles,
              fwd_active=int(np.sum(tiles)) * rep, table=plan.table, block_q=plan.bq,
              block_k=plan.bk)

