"""Block-sparse flash attention for TPU (Pallas Mosaic), forward and backward.

Computes, per batch ``b`` and query head ``n`` (kv head ``n // G``),

    s_ij = softcap(score_mod(scale * q_i . k_j + bias_ij))        (float32)
    o_i  = sum_{j allowed} exp(s_ij - lse_i) v_j
    lse_i = log(sum_{j allowed} exp(s_ij) + exp(sink_n))

with FlashAttention's online softmax ("FlashAttention: Fast and Memory-Efficient
Exact Attention with IO-Awareness", Dao et al. 2022; "FlashAttention-2").

Tiling.  The ``G`` query heads sharing a kv head are processed together as
``R = G * block_q`` rows against one ``[block_k, H]`` K/V tile, so K and V are
never repeated (GQA/MQA).  The mask's block table (``attnjax.masks``) is compacted
into a flat list of grid steps per ``(batch, kv head)``: one step per non-empty
tile (plus one idle step for a q block with no allowed key, which writes zeros), the
step's q/k block ids and flags arrive by scalar prefetch, and the mask predicate
runs only on partial tiles.  Backward: a dq kernel over the same steps and a dk/dv
kernel over the transposed list (per k block, its non-empty q blocks), both
recomputing probabilities from the saved ``lse``; gradients for ``bias``, ``sinks``
and the arrays a ``score_mod`` closes over are produced too.  A bias broadcast over
the batch and/or heads gets its gradient from a third kernel whose innermost grid
axes are the broadcast ones, so it is summed in place into the bias's own extent.

Decode (``T = 1`` or small ``T`` against a long cache): with ``BlockSizes.num_splits
= P > 1`` (or the heuristic when ``B * K * nq`` is small) each q block's list of
non-empty tiles is dealt into ``P`` contiguous parts; grid axis 1 runs over
``(kv head, split)``, so every split is its own parallel program, writing a partial
output (normalised by its own sum) and its ``lse``.  The partials are merged in XLA,
``o = sum_p exp(lse_p - lse) o_p``, ``lse = logsumexp_p lse_p`` with the sink joining
once here ("Flash-Decoding for long-context inference", Dao et al., 2023).  The
backward kernels are the same, fed the merged ``out`` and ``lse``.

Public entry point: :func:`flash_attention`; reference: :func:`flash_attention_reference`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

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
_LANES = 128
_SUBLANES = 8
# Parallel (batch, kv head, q block) programs below which the heuristic splits the key
# list: a TPU chip has 1-2 TensorCores and runs a core's grid steps in sequence, so
# splitting past a few programs only adds merge work.
_SPLIT_TARGET = 4


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the TPU kernel (forward and backward share them).

  Attributes:
    block_q: query rows per tile *per query head*, a multiple of 8 (the sublane
      count); a GQA group of ``G`` heads forms ``G * block_q`` rows.  ``None``: 128,
      capped at ``T`` rounded up to 8.
    block_k: keys per tile, a multiple of 128 (the lane count).  ``None``: 128 (capped
      at ``S`` rounded up to 128); larger tiles (256, 512) amortise per-step overhead
      on dense masks, smaller ones skip more work on sparse masks.
    num_splits: split-S decode (flash-decoding): each q block's list of non-empty k
      tiles is dealt into this many contiguous parts, each a separate parallel grid
      program writing a partial result and its log-sum-exp, merged in XLA.  ``1``
      disables it; ``None``: a heuristic (:func:`attnjax.core.plan.resolve_num_splits`)
      that splits only when ``B * K * nq`` programs are fewer than 4 and the longest
      list has at least 8 tiles.  The backward pass is not split.
    spatial_tile: 2D tiling of spatial masks by ``attnjax.attention`` (the dispatcher,
      :mod:`attnjax.core.tiling`): ``True`` (default) permutes the tokens of a
      neighborhood/window/grid/... mask's grid so each tile is a spatial patch;
      ``False`` keeps the row-major order; a tuple fixes the patch per grid axis.
  """
  block_q: Optional[int] = None
  block_k: Optional[int] = None
  num_splits: Optional[int] = None
  spatial_tile: Union[bool, tuple] = True

  def __post_init__(self):
    for name, mult, what in (("block_q", _SUBLANES, "sublanes"), ("block_k", _LANES, "lanes")):
      val = getattr(self, name)
      if val is None:
        continue
      if isinstance(val, bool) or not isinstance(val, int) or val <= 0 or val % mult:
        raise ValueError(f"BlockSizes.{name} must be a positive multiple of {mult} (TPU "
                         f"{what}), got {val!r}; use e.g. {mult * max(1, (val or 0) // mult or 1)}")
    plan_lib.validate_num_splits(self.num_splits, "BlockSizes")
    tiling_lib.check_spatial_tile(self.spatial_tile, "BlockSizes")

  @classmethod
  def get_default(cls) -> "BlockSizes":
    return cls()

  def resolve(self, T: int, S: int):
    bq = self.block_q or min(128, tm.round_up(T, _SUBLANES))
    bk = self.block_k or min(128, tm.round_up(S, _LANES))
    return bq, bk

  def resolve_splits(self, table, programs: int) -> int:
    """Splits of each q block's key list for a call with ``programs = B * K * nq``."""
    return plan_lib.resolve_num_splits(self.num_splits, table, programs, target=_SPLIT_TARGET)


# ====================================================================== layouts


class _Layout:
  """Row layout ``[B, K, nq * R, D]`` with rows ``(g, t)`` inside each q block."""

  def __init__(self, a, bq, nq):
    self.B, self.T, self.N, self.K, self.G = a.B, a.T, a.N, a.K, a.G
    self.bq, self.nq = bq, nq
    self.R = self.G * bq
    self.Tp = nq * bq

  def q_rows(self, x):            # [B, T, N, D] -> [B, K, nq * R, D]
    B, K, G, nq, bq = self.B, self.K, self.G, self.nq, self.bq
    D = x.shape[-1]
    x = jnp.pad(x, ((0, 0), (0, self.Tp - self.T), (0, 0), (0, 0)))
    x = x.reshape(B, nq, bq, K, G, D).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(B, K, nq * self.R, D)

  def from_rows(self, x):         # [B, K, nq * R, D] -> [B, T, N, D]
    B, K, G, nq, bq = self.B, self.K, self.G, self.nq, self.bq
    D = x.shape[-1]
    x = x.reshape(B, K, nq, G, bq, D).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(B, self.Tp, self.N, D)[:, :self.T]

  def bnt_to_rows(self, x):       # [B, N, T] -> [B, K, nq * R, 1]
    B, K, G, nq, bq = self.B, self.K, self.G, self.nq, self.bq
    x = jnp.pad(x, ((0, 0), (0, 0), (0, self.Tp - self.T)))
    x = x.reshape(B, K, G, nq, bq).transpose(0, 1, 3, 2, 4)
    return x.reshape(B, K, nq * self.R, 1)

  def rows_to_bnt(self, x):       # [B, K, nq * R, 1] -> [B, N, T]
    B, K, G, nq, bq = self.B, self.K, self.G, self.nq, self.bq
    x = x.reshape(B, K, nq, G, bq).transpose(0, 1, 3, 2, 4)
    return x.reshape(B, self.N, self.Tp)[:, :, :self.T]

  def bnts_to_rows(self, x, Sp):  # [X, N, T, S] -> [X, K, nq * R, Sp]
    X = x.shape[0]
    x = jnp.pad(x, ((0, 0), (0, 0), (0, self.Tp - x.shape[2]), (0, Sp - x.shape[3])))
    x = x.reshape(X, self.K, self.G, self.nq, self.bq, Sp).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(X, self.K, self.nq * self.R, Sp)

  def rows_to_bnts(self, x, T, S):  # inverse of bnts_to_rows
    X, Sp = x.shape[0], x.shape[-1]
    x = x.reshape(X, self.K, self.nq, self.G, self.bq, Sp).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(X, self.N, self.Tp, Sp)[:, :, :T, :S]


# ====================================================================== kernels


@dataclasses.dataclass(frozen=True)
class _Cfg:
  """Static configuration of one call's kernels."""
  math: tm.TileMath
  B: int
  K: int
  G: int
  bq: int
  bk: int
  R: int
  Bt: int            # leading dims of the schedule (1 or B)
  Kt: int            # (1 or K)
  L: int             # steps per (b', k') in this schedule
  has_bias: bool
  bias_b: bool       # bias varies with batch
  has_dense: bool
  dense_b: bool
  has_seg: bool
  has_sinks: bool
  n_pred: int        # number of 1D predicate const inputs
  n_sm: int          # number of 1D score_mod const inputs
  n_sm_grad: int     # of which differentiable (the first ones)
  sm_widths: tuple   # padded widths of the differentiable ones
  P: int = 1         # splits of each row's tile list; grid axis 1 runs over kh * P + p
  dq_dbias: bool = True   # the dq kernel writes the (unreduced) bias gradient
  paged: bool = False     # a 4th scalar-prefetch array: the page table (forward only)
  count: bool = False     # a last output counts executed / active steps (fw.count_steps)
  dense_cols: int = 0     # > 0: ``dense`` is a row selection, tile kb reads column kb // it
  sel_width: int = 0      # lanes of the row selection input
  key_bias: bool = False  # the bias is per key ([X, K, G, Sp]); dk/dv kernel gives its grad
  has_kiv: bool = False   # key intervals: row i sees key j iff start_j <= i < end_j
  kiv_b: bool = False     # ... varying with the batch


def _kv_head(cfg, kp):
  """The kv head of grid index ``kp = kh * P + p``."""
  return kp if cfg.P == 1 else jax.lax.div(kp, jnp.int32(cfg.P))   # kp >= 0: no floor needed


def _step_index(cfg, b, kp, s):
  bb = b if cfg.Bt > 1 else 0
  kh = _kv_head(cfg, kp)
  kk = kh if cfg.Kt > 1 else 0
  if cfg.P == 1:
    return (bb * cfg.Kt + kk) * cfg.L + s
  return ((bb * cfg.Kt + kk) * cfg.P + jax.lax.rem(kp, jnp.int32(cfg.P))) * cfg.L + s


def _grid_step(cfg, r, b, kp, s):
  """Step ``s`` of grid program ``(b, kp)``: ``(kv head, row block, col block, (active,
  partial, first, last))`` from the scalar-prefetched schedule (flag bits 0-3)."""
  i = _step_index(cfg, b, kp, s)
  flags = r.flags[i]
  bits = tuple((flags & (1 << j)) != 0 for j in range(4))
  return _kv_head(cfg, kp), r.rows[i], r.cols[i], bits


def _tile_index(cfg, b, kh, qb, kb):
  """Full [R, bk] int32 index tiles (b, h, q_idx, kv_idx) of tile (qb, kb)."""
  R, bq, bk, G = cfg.R, cfg.bq, cfg.bk, cfg.G
  row = jax.lax.broadcasted_iota(jnp.int32, (R, bk), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (R, bk), 1)
  g = jnp.zeros((R, bk), jnp.int32)
  for gg in range(1, G):
    g = g + (row >= gg * bq).astype(jnp.int32)
  t = row - g * bq
  bt = jnp.full((R, bk), b, jnp.int32)
  return bt, kh * G + g, qb * bq + t, kb * bk + col


def _refs(cfg, refs, n_out, n_scratch, kind):
  """The kernel's refs (:class:`tm.KernelRefs`) after the ``rows, cols, flags``
  scalar-prefetch schedule (and the page table of a paged forward); ``r.count`` is the step
  counter output (or None)."""
  aliased = kind == "dbias" or (kind == "dq" and cfg.has_bias and cfg.dq_dbias)
  r = tm.KernelRefs(cfg, refs, n_lead=4 if cfg.paged else 3, kind=kind,
                    n_out=n_out + cfg.count, n_scratch=n_scratch, aliased=aliased)
  r.rows, r.cols, r.flags = r.lead[:3]
  r.count = r.outs[-1] if cfg.count else None
  r.outs = r.outs[:n_out]
  return r


def _count_step(r, s, active):
  """Step counter (:func:`fw.count_steps`): lane 0 counts the grid steps this program
  executes, lane 1 those that compute a tile."""
  if r.count is None:
    return

  @pl.when(s == 0)
  def _():
    r.count[...] = jnp.zeros_like(r.count)
  lane = jax.lax.broadcasted_iota(jnp.int32, r.count.shape, 1)
  r.count[...] += jnp.where(lane == 0, 1, jnp.where(lane == 1, active.astype(jnp.int32), 0))


def _head_rows(cfg, x):
  """A per-key ``[G, bk]`` block (one row per head of the group) as the ``[R, bk]`` tile
  (row block ``g`` of the tile is head ``g``)."""
  if x.shape[0] == 1:
    return jnp.broadcast_to(x, (cfg.R, cfg.bk))
  return jnp.concatenate([jnp.broadcast_to(x[g:g + 1], (cfg.bq, cfg.bk))
                          for g in range(cfg.G)], axis=0)


def _head_colsum(cfg, x):
  """``[R, bk]`` -> ``[G, bk]``: the column sums of each head's row block."""
  return jnp.concatenate([jnp.sum(x[g * cfg.bq:(g + 1) * cfg.bq], axis=0, keepdims=True)
                          for g in range(cfg.G)], axis=0)


def _tile_inputs(cfg, r, b, kh, qb, kb, masked=True):
  bias = r.bias[...] if r.bias is not None else None
  if bias is not None and cfg.key_bias:
    bias = _head_rows(cfg, bias)
  dense = r.dense[...] if r.dense is not None else None
  if dense is not None and cfg.dense_cols:      # the rows' choice of this key block
    col = kb if cfg.dense_cols == 1 else jax.lax.div(kb, jnp.int32(cfg.dense_cols))
    lane = jax.lax.broadcasted_iota(jnp.int32, dense.shape, 1)
    dense = jnp.broadcast_to(tm.select_column(dense, col, lane), (cfg.R, cfg.bk))
  seg_eq = None
  if r.qseg is not None:
    seg_eq = r.qseg[...] == r.kseg[...]            # [R, 1] == [1, bk]
  idx = functools.lru_cache(maxsize=None)(lambda: _tile_index(cfg, b, kh, qb, kb))
  if r.klo is not None and masked:                 # the keys' row intervals
    qi = idx()[2]
    iv = (_head_rows(cfg, r.klo[...]) <= qi) & (qi < _head_rows(cfg, r.khi[...]))
    dense = iv if dense is None else (dense != 0) & iv
  return bias, dense, seg_eq, idx


def _fwd_kernel(*refs, cfg: _Cfg):
  r = _refs(cfg, refs, n_out=2, n_scratch=3, kind="fwd")
  o_ref, lse_ref = r.outs
  m_ref, l_ref, acc_ref = r.scratch
  b, kp, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  kh, qb, kb, (active, partial, first, last) = _grid_step(cfg, r, b, kp, s)
  M = cfg.math
  _count_step(r, s, active)

  @pl.when(first)
  def _():
    if cfg.has_sinks:
      m_ref[...] = r.sinks[...].astype(_F32)
      l_ref[...] = jnp.ones_like(l_ref)
    else:
      m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
      l_ref[...] = jnp.zeros_like(l_ref)
    acc_ref[...] = jnp.zeros_like(acc_ref)

  def step(masked):
    bias, dense, seg_eq, idx = _tile_inputs(cfg, r, b, kh, qb, kb, masked)
    q, k, v = r.q[...], r.k[...], r.v[...]
    _, _, sc, _ = M.masked_logits(q, k, bias, idx, r.sm, masked, r.pred, seg_eq, dense)
    m, l, acc = M.online_softmax(m_ref[...], l_ref[...], acc_ref[...], sc, v)
    l_ref[...] = l
    acc_ref[...] = acc
    m_ref[...] = m

  _branches(cfg, active, partial, step)

  @pl.when(last)
  def _():
    o, lse = tm.finish_softmax(m_ref[...], l_ref[...], acc_ref[...])
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def _branches(cfg, active, partial, step):
  if (cfg.math.ragged_k or cfg.has_dense or cfg.has_seg or cfg.has_kiv
      or cfg.math.pred is not None):
    @pl.when(active & partial)
    def _():
      step(True)

    @pl.when(active & jnp.logical_not(partial))
    def _():
      step(False)
  else:
    @pl.when(active)
    def _():
      step(False)


def _recompute(cfg, r, b, kh, qb, kb, masked):
  """Probabilities and ``d s0`` of one tile in the backward kernels."""
  M = cfg.math
  bias, dense, seg_eq, idx = _tile_inputs(cfg, r, b, kh, qb, kb, masked)
  q, k, v, do = r.q[...], r.k[...], r.v[...], r.do[...]
  s0, s1, sc, ev = M.masked_logits(q, k, bias, idx, r.sm, masked, r.pred, seg_eq, dense)
  p, ds = M.probs_and_ds(sc, r.lse[...], do, v, r.delta[...])   # lse +inf: rows to ignore
  return q, k, do, p, ds, s0, s1, idx, ev


def _dq_kernel(*refs, cfg: _Cfg):
  n_out = 2 if cfg.has_bias and cfg.dq_dbias else 1
  r = _refs(cfg, refs, n_out=n_out, n_scratch=1, kind="dq")
  dq_ref = r.outs[0]
  db_ref = r.outs[1] if n_out == 2 else None
  (acc_ref,) = r.scratch
  b, kp, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  kh, qb, kb, (active, partial, first, last) = _grid_step(cfg, r, b, kp, s)
  M = cfg.math
  _count_step(r, s, active)

  @pl.when(first)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  def step(masked):
    q, k, do, p, ds, s0, s1, idx, ev = _recompute(cfg, r, b, kh, qb, kb, masked)
    ds, _ = M.dlogits(ds, s0, s1, idx, r.sm, ev, {}, {})
    if db_ref is not None:
      db_ref[...] = ds
    acc_ref[...] += M.dot_nn(ds.astype(k.dtype), k) * M.scale

  _branches(cfg, active, partial, step)

  if db_ref is not None:
    @pl.when(jnp.logical_not(active) & (first | last))
    def _():
      db_ref[...] = jnp.zeros_like(db_ref)

  @pl.when(last)
  def _():
    dq_ref[...] = acc_ref[...].astype(dq_ref.dtype)


def _dbias_kernel(*refs, cfg: _Cfg, coords, sum_heads: bool):
  """Gradient of a bias broadcast over the batch and/or heads, in the bias's own extent.

  Grid ``(x, step, y)``: ``x`` the kept (batch or kv head) axis, ``y`` the reduced ones,
  innermost, so every ``(b, kh)`` summed into one output tile is visited consecutively
  and the tile accumulates in place; the step list is that of the union tile table.
  ``sum_heads``: the ``G`` heads of a row block are summed too (bias shared by heads).
  """
  r = _refs(cfg, refs, n_out=1, n_scratch=0, kind="dbias")
  (db_ref,) = r.outs
  x, s, y = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  b, kh = coords(x, y)
  _, qb, kb, (active, partial, first, last) = _grid_step(cfg, r, b, kh, s)
  edge = first | last                  # first or last step of a row
  M = cfg.math

  def step(masked):
    _, _, _, _, ds, s0, s1, idx, ev = _recompute(cfg, r, b, kh, qb, kb, masked)
    ds, _ = M.dlogits(ds, s0, s1, idx, r.sm, ev, {}, {})
    if sum_heads:
      ds = sum(ds[g * cfg.bq:(g + 1) * cfg.bq] for g in range(cfg.G))

    @pl.when(y == 0)
    def _():
      db_ref[...] = ds

    @pl.when(y > 0)
    def _():
      db_ref[...] += ds

  _branches(cfg, active, partial, step)

  @pl.when(jnp.logical_not(active) & edge)     # a row with no tile: its block is zero
  def _():
    db_ref[...] = jnp.zeros_like(db_ref)


def _dkv_kernel(*refs, cfg: _Cfg):
  n_out = 2 + cfg.n_sm_grad + cfg.key_bias
  r = _refs(cfg, refs, n_out=n_out, n_scratch=2, kind="dkv")
  dk_ref, dv_ref = r.outs[:2]
  dc_refs = r.outs[2:2 + cfg.n_sm_grad]
  dkb_ref = r.outs[-1] if cfg.key_bias else None   # [G, bk]: the per-key bias grad
  dk_acc, dv_acc = r.scratch
  b, kp, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  kh, kb, qb, (active, partial, first, last) = _grid_step(cfg, r, b, kp, s)   # transposed
  M = cfg.math
  _count_step(r, s, active)

  @pl.when(first)
  def _():
    dk_acc[...] = jnp.zeros_like(dk_acc)
    dv_acc[...] = jnp.zeros_like(dv_acc)
    if dkb_ref is not None:
      dkb_ref[...] = jnp.zeros_like(dkb_ref)

  if dc_refs:
    @pl.when(s == 0)
    def _():
      for ref in dc_refs:
        ref[...] = jnp.zeros_like(ref)

  def step(masked):
    q, k, do, p, ds, s0, s1, idx, ev = _recompute(cfg, r, b, kh, qb, kb, masked)
    acc = {j: dc_refs[j][...] for j in range(len(dc_refs))}
    widths = {j: cfg.sm_widths[j] for j in range(len(dc_refs))}
    ds, acc = M.dlogits(ds, s0, s1, idx, r.sm, ev, acc, widths)
    for j, ref in enumerate(dc_refs):
      ref[...] = acc[j]
    if dkb_ref is not None:
      dkb_ref[...] += _head_colsum(cfg, ds)
    dv_acc[...] += M.dot_tn(p.astype(do.dtype), do)
    dk_acc[...] += M.dot_tn(ds.astype(q.dtype), q) * M.scale

  _branches(cfg, active, partial, step)

  @pl.when(last)
  def _():
    dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


# ====================================================================== pallas_call wrappers


def _in_specs(cfg, kind, H, Hv, bias_shape, dense_shape, pred_sizes, sm_sizes, pages=None):
  """BlockSpecs of the inputs after the scalar-prefetch arrays (the 3 of the schedule,
  then, with ``pages`` = pages per row, the flat page table: K/V are page pools
  ``[num_pages, K, page_size = block_k, D]`` and k block ``kb`` of row ``b`` is page
  ``page_table[b * pages + kb]``)."""
  R, bk = cfg.R, cfg.bk
  tr = kind == "dkv"

  def blocks(b, kp, s, rows, cols, flags, *_):
    i = _step_index(cfg, b, kp, s)
    if tr:
      return cols[i], rows[i]
    return rows[i], cols[i]

  def qmap(b, kp, s, *sched):
    qb, _ = blocks(b, kp, s, *sched)
    return (b, _kv_head(cfg, kp), qb, 0)

  def kmap(b, kp, s, *sched):
    _, kb = blocks(b, kp, s, *sched)
    return (b, _kv_head(cfg, kp), kb, 0)

  def page_map(b, kp, s, *sched):
    _, kb = blocks(b, kp, s, *sched)
    return (sched[3][b * pages + kb], _kv_head(cfg, kp), 0, 0)

  if pages is None:
    kv_specs = [pl.BlockSpec((None, None, bk, D), kmap) for D in (H, Hv)]
  else:
    kv_specs = [pl.BlockSpec((None, None, bk, D), page_map) for D in (H, Hv)]
  specs = [pl.BlockSpec((None, None, R, H), qmap), *kv_specs]
  if kind != "fwd":
    specs += [pl.BlockSpec((None, None, R, Hv), qmap),
              pl.BlockSpec((None, None, R, 1), qmap),
              pl.BlockSpec((None, None, R, 1), qmap)]
  if kind == "fwd" and cfg.has_sinks:
    specs.append(pl.BlockSpec((None, R, 1),
                              lambda b, kp, s, *sched: (_kv_head(cfg, kp), 0, 0)))
  def keymap(batched):            # per-key [X, K, G, Sp] inputs: key block kb
    def f(b, kp, s, *sched):
      _, kb = blocks(b, kp, s, *sched)
      return (b if batched else 0, _kv_head(cfg, kp), 0, kb)
    return f
  if cfg.has_bias and cfg.key_bias:
    specs.append(pl.BlockSpec((None, None, cfg.G, bk), keymap(cfg.bias_b)))
  elif cfg.has_bias:
    def bmap(b, kp, s, *sched):
      qb, kb = blocks(b, kp, s, *sched)
      return (b if cfg.bias_b else 0, _kv_head(cfg, kp), qb, kb)
    specs.append(pl.BlockSpec((None, None, R, bk), bmap))
  if cfg.has_dense:
    def dmap(b, kp, s, *sched):
      qb, kb = blocks(b, kp, s, *sched)
      return (b if cfg.dense_b else 0, _kv_head(cfg, kp), qb, 0 if cfg.dense_cols else kb)
    specs.append(pl.BlockSpec((None, None, R, cfg.sel_width if cfg.dense_cols else bk), dmap))
  if cfg.has_seg:
    def qsmap(b, kp, s, *sched):
      qb, _ = blocks(b, kp, s, *sched)
      return (b, qb, 0)

    def ksmap(b, kp, s, *sched):
      _, kb = blocks(b, kp, s, *sched)
      return (b, 0, kb)
    specs += [pl.BlockSpec((None, R, 1), qsmap), pl.BlockSpec((None, 1, bk), ksmap)]
  if cfg.has_kiv:
    specs += [pl.BlockSpec((None, None, cfg.G, bk), keymap(cfg.kiv_b))] * 2
  smem = pl.BlockSpec(memory_space=pltpu.SMEM)
  specs += [smem] * (len(pred_sizes) + len(sm_sizes))
  return specs, qmap, kmap, blocks


def _params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


# ====================================================================== the call


def _build(a: AttentionArgs, bs: BlockSizes, interpret: bool, page_table=None):
  """Traces/plans a call; returns the differentiable function of the array inputs.

  With ``page_table [B, pages_per_seq]`` (int32), ``k``/``v`` are page pools ``[num_pages, K,
  block_k, D]`` (``a.S = pages_per_seq * block_k``): the forward kernel reads row
  ``b``'s k block ``kb`` from page ``page_table[b, kb]`` (scalar-prefetched); the backward
  gathers the rows' pages and scatters dk/dv back into the pools."""
  B, T, S, N, K, G, H, Hv = a.B, a.T, a.S, a.N, a.K, a.G, a.H, a.Hv
  bq, bk = bs.resolve(T, S)
  plan = plan_lib.make_plan(a, bq, bk)
  R = G * bq
  lay = _Layout(a, bq, plan.nq)
  pred_tf = plan_lib.trace_predicate(plan, R, bk)
  sm_tf = plan_lib.trace_score_mod(a, R, bk)
  Sp, Tp = plan.Sp, plan.Tp

  fwd_sched = plan_lib.step_schedule(plan.table)
  bwd_sched = plan_lib.step_schedule(plan.table, transpose=True)
  Bt, Kt = plan.table.shape[:2]
  P = bs.resolve_splits(plan.table, B * K * plan.nq)
  # A bias broadcast over the batch and/or heads gets its gradient from its own kernel,
  # summed in place over those axes (no dense [B, N, T, S] buffer).
  kbias = fw.key_bias(a)             # per-key bias: its gradient comes from the dk/dv kernel
  red_b = a.bias is not None and not kbias and a.bias.shape[0] == 1 and B > 1
  red_n = a.bias is not None and not kbias and a.bias.shape[1] == 1 and N > 1
  split_sched = None
  if P > 1:
    split_sched = plan_lib.step_schedule(plan_lib.split_table(plan.table, P),
                                       max_per_row=-(-plan.nk // P))

  count = fw.counting_steps()
  sel_w = tm.round_up(plan.dense.shape[3], _LANES) if plan.dense_cols else 0

  def make_cfg(L, q_dtype, splits=1):
    lanes = lambda sz: tm.round_up(sz, _LANES)
    return _Cfg(math=fw.tile_math(a, plan, pred_tf, sm_tf, q_dtype), B=B, K=K, G=G,
                bq=bq, bk=bk, R=R, Bt=Bt, Kt=Kt, L=L, P=splits, count=count, sel_width=sel_w,
                **fw.cfg_flags(a, plan, pred_tf, sm_tf, splits, lanes))

  # ------------------------------------------------------------ input preparation
  # Schedules, the tile table and a dense mask built from traced inputs enter the
  # custom_vjp as arguments (:func:`fw.hoist_tracers`).
  aux, restore = fw.hoist_tracers(dict(fwd=fwd_sched, bwd=bwd_sched, split=split_sched,
                                           table=plan.table, dense=plan.dense,
                                           kiv=plan.key_iv, pages=page_table))
  pps = None if page_table is None else page_table.shape[1]

  def prep_side(st, bias, seg):
    def q_seg(qs):                    # [B, Tp] -> rows [B, nq * R, 1] (same ids per head)
      qs = jnp.broadcast_to(qs.reshape(B, plan.nq, 1, bq), (B, plan.nq, G, bq))
      return qs.reshape(B, plan.nq * R, 1)
    return fw.side_inputs(plan, bias, seg, st["dense"], lambda x: lay.bnts_to_rows(x, Sp),
                              q_seg,
                              lambda ks: ks.reshape(B, 1, Sp),
                              place_sel=lambda x: lay.bnts_to_rows(x, sel_w),
                              place_key=lambda x: x.reshape(x.shape[0], K, G, Sp),
                              key_iv=st["kiv"])

  def sched_arrays(sched):
    """``(rows, cols, flags)``, the static stride ``L`` of each program's list and the
    grid length: ``L`` for a static table, else the longest list (a traced scalar, a
    dynamic grid bound: the grid walks the selected tiles, not the worst case)."""
    rows, cols, flags, L, _, n = sched
    return [jnp.asarray(rows), jnp.asarray(cols), jnp.asarray(flags)], L, n

  def counter(cfg, out_specs, out_shape, kp):
    """The step counter output of a counting build (:func:`fw.count_steps`)."""
    if cfg.count:
      out_specs.append(pl.BlockSpec((None, None, _SUBLANES, _LANES),
                                    lambda b, k, s, *sched: (b, k, 0, 0)))
      out_shape.append(jax.ShapeDtypeStruct((B, kp, _SUBLANES, _LANES), jnp.int32))

  def record(cfg, name, outs):
    if cfg.count:
      fw.record_steps(name, outs[-1][..., 0, 0], outs[-1][..., 0, 1])
      return outs[:-1]
    return outs

  def run_fwd(st, qr, kr, vr, sinks, side, pred_c, sm_c):
    """Forward kernel; with ``P > 1`` splits, per-split partials merged in XLA."""
    sa, L, n = sched_arrays(st["fwd"] if P == 1 else st["split"])
    if pps is not None:
      sa.append(st["pages"].reshape(-1).astype(jnp.int32))
    cfg = dataclasses.replace(make_cfg(L, qr.dtype, splits=P), paged=pps is not None)
    specs, _, _, blocks = _in_specs(cfg, "fwd", H, Hv, None, None, pred_c, sm_c, pages=pps)
    extra = []
    if cfg.has_sinks:
      sk = sinks.astype(_F32).reshape(K, G, 1, 1)
      extra.append(jnp.broadcast_to(sk, (K, G, bq, 1)).reshape(K, R, 1))

    def omap(b, kp, s, *sched):       # one output row block per (b, kh * P + p, q block)
      qb, _ = blocks(b, kp, s, *sched)
      return (b, kp, qb, 0)

    rows = plan.nq * R
    out_specs = [pl.BlockSpec((None, None, R, Hv), omap), pl.BlockSpec((None, None, R, 1), omap)]
    out_shape = [jax.ShapeDtypeStruct((B, K * P, rows, Hv), qr.dtype if P == 1 else _F32),
                 jax.ShapeDtypeStruct((B, K * P, rows, 1), _F32)]
    counter(cfg, out_specs, out_shape, K * P)
    name = (("attnjax_flash_fwd" if P == 1 else "attnjax_flash_fwd_split")
            + ("" if pps is None else "_paged"))
    outs = pallas_shard.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(sa), grid=(B, K * P, n), in_specs=specs,
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((R, 1), _F32), pltpu.VMEM((R, 1), _F32),
                            pltpu.VMEM((R, Hv), _F32)]),
        out_shape=out_shape, compiler_params=_params(), interpret=interpret, name=name,
    )(*sa, qr, kr, vr, *extra, *side, *pred_c, *sm_c)
    o, lse = record(cfg, name, outs)
    if P == 1:
      return o, lse
    sink_rows = None
    if sinks is not None:            # row (q block, g, t) of kv head kh: sink[kh * G + g]
      sk = sinks.astype(_F32).reshape(K, 1, G, 1)
      sink_rows = jnp.broadcast_to(sk, (K, plan.nq, G, bq)).reshape(1, K, rows)
    o, lse = tm.merge_splits(o.reshape(B, K, P, rows, Hv), lse.reshape(B, K, P, rows),
                                 axis=2, sink=sink_rows)
    return o.astype(qr.dtype), lse[..., None]

  def run_dbias(st, qr, kr, vr, dor, lse_r, delta_r, side, pred_c, sm_c):
    """Gradient of a bias broadcast over B and/or N: ``[Bb, Kb, nq * Rb, Sp]`` f32 with
    ``Bb = 1`` when summed over the batch, ``Kb = 1, Rb = block_q`` over the heads."""
    axes = [ax for ax, red in ((0, red_b), (1, red_n)) if red and st["table"].shape[ax] > 1]
    table = plan_lib.union_table(st["table"], axes)
    sa, L, n = sched_arrays(plan_lib.step_schedule(table))
    cfg = dataclasses.replace(make_cfg(L, qr.dtype), Bt=table.shape[0], Kt=table.shape[1],
                              count=False)
    if red_b and red_n:
      X, Y = 1, B * K
      coords = lambda x, y: (jax.lax.div(y, jnp.int32(K)), jax.lax.rem(y, jnp.int32(K)))
    elif red_b:
      X, Y = K, B
      coords = lambda x, y: (y, x)
    else:
      X, Y = B, K
      coords = lambda x, y: (x, y)
    specs, _, _, blocks = _in_specs(cfg, "dq", H, Hv, None, None, pred_c, sm_c)

    def regrid(spec):                # (b, kh, s) index maps -> the (x, s, y) grid
      if spec.index_map is None:
        return spec
      f = spec.index_map
      return dataclasses.replace(spec, index_map=lambda x, s, y, *sc: f(*coords(x, y), s, *sc))

    specs = [regrid(sp) for sp in specs] + [pl.BlockSpec(memory_space=pl.ANY)]
    Rb = bq if red_n else R
    shape = (1 if red_b else B, 1 if red_n else K, plan.nq * Rb, Sp)

    def omap(x, s, y, *sc):
      b, kh = coords(x, y)
      qb, kb = blocks(b, kh, s, *sc)
      return (0 if red_b else b, 0 if red_n else kh, qb, kb)

    n_in = 3 + 6 + len(side) + len(pred_c) + len(sm_c)
    return pallas_shard.pallas_call(
        functools.partial(_dbias_kernel, cfg=cfg, coords=coords, sum_heads=red_n),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(X, n, Y), in_specs=specs,
            out_specs=[pl.BlockSpec((None, None, Rb, bk), omap)]),
        out_shape=[jax.ShapeDtypeStruct(shape, _F32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret, input_output_aliases={n_in: 0}, name="attnjax_flash_bwd_dbias",
    )(*sa, qr, kr, vr, dor, lse_r, delta_r, *side, *pred_c, *sm_c, jnp.zeros(shape, _F32))[0]

  def run_bwd(st, qr, kr, vr, dor, lse_r, delta_r, side, pred_c, sm_c, bias):
    # ---- dq (+ dbias when the bias is not broadcast over B or N)
    sa, L, n = sched_arrays(st["fwd"])
    cfg = dataclasses.replace(make_cfg(L, qr.dtype), dq_dbias=not (red_b or red_n or kbias))
    specs, qmap, _, blocks = _in_specs(cfg, "dq", H, Hv, None, None, pred_c, sm_c)
    out_specs = [pl.BlockSpec((None, None, R, H), qmap)]
    out_shape = [jax.ShapeDtypeStruct((B, K, plan.nq * R, H), qr.dtype)]
    extra, aliases = [], {}
    if bias is not None and cfg.dq_dbias:
      def dbmap(b, kh, s, *sched):
        qb, kb = blocks(b, kh, s, *sched)
        return (b, kh, qb, kb)
      extra.append(jnp.zeros((B, K, plan.nq * R, Sp), _F32))
      specs = specs + [pl.BlockSpec(memory_space=pl.ANY)]
      out_specs.append(pl.BlockSpec((None, None, R, bk), dbmap))
      out_shape.append(jax.ShapeDtypeStruct((B, K, plan.nq * R, Sp), _F32))
      n_in = 3 + 6 + len(side) + len(pred_c) + len(sm_c)
      aliases = {n_in: 1}
    counter(cfg, out_specs, out_shape, K)
    outs = pallas_shard.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(B, K, n), in_specs=specs, out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((R, H), _F32)]),
        out_shape=out_shape, compiler_params=_params(), interpret=interpret,
        input_output_aliases=aliases, name="attnjax_flash_bwd_dq",
    )(*sa, qr, kr, vr, dor, lse_r, delta_r, *side, *pred_c, *sm_c, *extra)
    outs = record(cfg, "attnjax_flash_bwd_dq", outs)
    dq = outs[0]
    dbias_rows = outs[1] if bias is not None and cfg.dq_dbias else None
    if bias is not None and not cfg.dq_dbias and not kbias:
      dbias_rows = run_dbias(st, qr, kr, vr, dor, lse_r, delta_r, side, pred_c, sm_c)

    # ---- dk, dv (+ score_mod array grads)
    sa, L, n = sched_arrays(st["bwd"])
    cfg = make_cfg(L, qr.dtype)
    specs, _, kmap, _ = _in_specs(cfg, "dkv", H, Hv, None, None, pred_c, sm_c)
    out_specs = [pl.BlockSpec((None, None, bk, H), kmap),
                 pl.BlockSpec((None, None, bk, Hv), kmap)]
    out_shape = [jax.ShapeDtypeStruct((B, K, Sp, H), kr.dtype),
                 jax.ShapeDtypeStruct((B, K, Sp, Hv), vr.dtype)]
    for w in cfg.sm_widths:
      out_specs.append(pl.BlockSpec((None, None, 1, w), lambda b, kh, s, *sched: (b, kh, 0, 0)))
      out_shape.append(jax.ShapeDtypeStruct((B, K, 1, w), _F32))
    if kbias:                        # per-key bias gradient: [B, K, G, Sp]
      out_specs.append(pl.BlockSpec((None, None, G, bk), lambda b, kh, s, *sched: (
          b, kh, 0, kmap(b, kh, s, *sched)[2])))
      out_shape.append(jax.ShapeDtypeStruct((B, K, G, Sp), _F32))
    counter(cfg, out_specs, out_shape, K)
    outs = pallas_shard.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(B, K, n), in_specs=specs, out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((bk, H), _F32), pltpu.VMEM((bk, Hv), _F32)]),
        out_shape=out_shape, compiler_params=_params(), interpret=interpret,
        name="attnjax_flash_bwd_dkv",
    )(*sa, qr, kr, vr, dor, lse_r, delta_r, *side, *pred_c, *sm_c)
    outs = record(cfg, "attnjax_flash_bwd_dkv", outs)
    dk, dv = outs[:2]
    dcs = [x.sum(axis=(0, 1))[0] for x in outs[2:2 + cfg.n_sm_grad]]
    if kbias:
      dbias_rows = outs[-1]
    return dq, dk, dv, dbias_rows, dcs

  # ------------------------------------------------------------ custom_vjp
  def to_k(x):                    # [B, S, K, D] -> [B, K, Sp, D]
    return jnp.pad(x, ((0, 0), (0, Sp - S), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

  def forward(q, k, v, bias, sinks, seg, pred_c, sm_c, aux):
    st = restore(aux)
    side = prep_side(st, bias, seg)
    pred_s = [jaxpr_lib.const_storage(c) for c in pred_c]
    sm_s = [jaxpr_lib.const_storage(c) for c in sm_c]
    kr, vr = (to_k(k), to_k(v)) if pps is None else (k, v)
    out_r, lse_r = run_fwd(st, lay.q_rows(q), kr, vr, sinks, side, pred_s, sm_s)
    return out_r, lse_r

  def backward(args, aux, out_r, lse_r, dout_r, dlse_r):
    st = restore(aux)
    q, k, v, bias, sinks, seg, pred_c, sm_c = args
    rows = jnp.arange(plan.nq * R)
    valid = ((rows % bq + (rows // R) * bq) < T)[None, None, :, None]
    delta, lse_b, dor, delta_b = fw.backward_rows(out_r, lse_r, dout_r, dlse_r, valid,
                                                      q.dtype)
    side = prep_side(st, bias, seg)
    pred_s = [jaxpr_lib.const_storage(c) for c in pred_c]
    sm_s = [jaxpr_lib.const_storage(c) for c in sm_c]
    kl, vl = (k, v) if pps is None else (fw.gather_pages(k, st["pages"]),
                                          fw.gather_pages(v, st["pages"]))
    dq_r, dk_r, dv_r, db_r, dcs = run_bwd(st, lay.q_rows(q), to_k(kl), to_k(vl), dor, lse_b,
                                          delta_b, side, pred_s, sm_s, bias)
    db = None
    if kbias:                                            # [B, N, 1, S]
      db = db_r.reshape(B, N, 1, Sp)[..., :S]
    elif bias is not None and red_n:                     # [Bb, 1, T, S]
      db = db_r.reshape(db_r.shape[0], 1, Tp, Sp)[:, :, :T, :S]
    elif bias is not None:                               # [Bb, N, T, S]
      db = lay.rows_to_bnts(db_r, T, S)
    dk, dv = dk_r.transpose(0, 2, 1, 3)[:, :S], dv_r.transpose(0, 2, 1, 3)[:, :S]
    if pps is not None:
      dk, dv = fw.scatter_pages(k, st["pages"], dk), fw.scatter_pages(v, st["pages"], dv)
    return (lay.from_rows(dq_r), dk, dv, db, lay.rows_to_bnt(lse_r), lay.rows_to_bnt(delta),
            dcs)

  core = fw.flash_core(forward, backward)

  def apply(q, k, v):
    out_r, lse_r = core(q, k, v, a.bias, a.sinks, plan.seg, fw.traced_consts(pred_tf),
                        fw.traced_consts(sm_tf), aux)
    return lay.from_rows(out_r), lay.rows_to_bnt(lse_r)

  return apply, lay, plan, (split_sched if P > 1 else fwd_sched), bwd_sched


_FLASH_DOC = """Block-sparse flash attention on TPU (Pallas Mosaic), forward and backward.

  ``o_i = sum_j softmax_j(s_ij) v_j`` with ``s_ij = softcap(score_mod(scale q_i.k_j +
  bias_ij))``, masked, the sink joining the denominator only.  Paper: "FlashAttention:
  Fast and Memory-Efficient Exact Attention with IO-Awareness" (Dao et al., 2022).

  Args:
    q: ``[B, T, N, H]``; k: ``[B, S, K, H]``; v: ``[B, S, K, Hv]``; ``N % K == 0``.
    mask, score_mod, bias, q_segment_ids, kv_segment_ids, scale, softcap, sinks,
      return_lse: as in :func:`attnjax.attention`.
    block_sizes: :class:`BlockSizes` (``None``: defaults).  Another type raises
      :class:`attnjax.core.Unsupported`.
    interpret: run in Pallas interpret mode (default: when the backend is not TPU); a
      ``pltpu.InterpretParams`` runs the TPU-semantics interpreter with those settings
      (e.g. ``detect_races=True, uninitialized_memory='nan'``).

  Returns:
    ``[B, T, N, Hv]`` in ``q.dtype`` (and ``lse [B, N, T]`` float32 with ``return_lse``).
  """

flash_attention = fw.make_flash_attention(
    lambda a, bs, interpret: _build(a, bs, interpret)[0], BlockSizes, "TPU", ("tpu",),
    doc=_FLASH_DOC, module=__name__, interpret_params=pltpu.InterpretParams)


_PAGED_DOC = """Flash attention on K/V page pools read through a page table (paged decode).

  Equals ``flash_attention(q, gather(k_pages), gather(v_pages), ...)`` with ``gather`` =
  :func:`attnjax.kernels.flash_wrapper.gather_pages` (row ``b``'s pages in table order, as
  ``[B, pages_per_seq * page_size, K, D]``), without the gather: the
  page table is scalar-prefetched and the K/V ``BlockSpec`` index map picks page
  ``page_table[b, kb]`` for row ``b``'s key block ``kb`` (one page per key block, so
  ``page_size`` must be a multiple of 128; the key-block tile table, split-S decode and
  ``masks.lengths`` work as in :func:`flash_attention`).  The backward pass gathers the
  pages and scatters dk/dv back into the pools (pages shared by rows sum their gradients).

  Args:
    q: ``[B, T, N, H]``; k_pages: ``[num_pages, K, page_size, H]``; v_pages: ``[num_pages,
      K, page_size, Hv]`` (each page head-major: a ``[page_size, D]`` tile per kv head);
      page_table: int ``[B, pages_per_seq]`` (entries in
      ``[0, num_pages)``).
    mask, ..., interpret: as in :func:`flash_attention` (key positions are
      ``0 .. pages_per_seq * page_size - 1`` of each row); ``block_sizes.block_k`` must be
      None or ``page_size``.

  Returns:
    ``[B, T, N, Hv]`` in ``q.dtype`` (and ``lse [B, N, T]`` float32 with ``return_lse``).
  """

paged_flash_attention = fw.make_paged_flash_attention(
    lambda a, bs, interpret, table: _build(a, bs, interpret, page_table=table)[0], BlockSizes,
    "TPU", ("tpu",), doc=_PAGED_DOC, module=__name__, interpret_params=pltpu.InterpretParams)


def grid_steps(q, k, v, *, block_sizes=None, **kwargs):
  """Grid steps of the forward and dk/dv kernels for a call (static masks only).

  Returns a dict with ``num_splits`` (``P``), ``fwd_steps`` (= ``B * K * P * L``, ``L``
  the longest per-program step list), ``fwd_active`` (tiles computed), ``dkv_steps``,
  ``dkv_active`` and the ``table`` (for tests and tuning).
  """
  bs = fw.as_block_sizes(block_sizes, BlockSizes, "TPU")
  a, plan, P = fw.plan_call(q, k, v, bs, kwargs, lambda a, plan: a.B * a.K * plan.nq)
  f = plan_lib.step_schedule(plan.table if P == 1 else plan_lib.split_table(plan.table, P))
  d = plan_lib.step_schedule(plan.table, transpose=True)
  Bt, Kt = plan.table.shape[:2]
  rep = (a.B // Bt) * (a.K // Kt)
  return dict(num_splits=P, fwd_steps=a.B * a.K * P * f[3], fwd_active=f[4] * rep,
              dkv_steps=a.B * a.K * d[3], dkv_active=d[4] * rep, table=plan.table,
              block_q=plan.bq, block_k=plan.bk)

