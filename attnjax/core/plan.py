"""Mask plans and block tables: what a blockwise implementation needs about one call.

* :func:`kv_group_table` ANDs block tables and merges the ``G`` query heads of a kv head
  (GQA) into one tile table ``[B', K', nq, nk]`` of EMPTY / PARTIAL / FULL tiles.
* :func:`make_plan` normalises a call into what a kernel consumes: the tile table, the
  mask split into an in-kernel predicate, segment ids and (as a last resort) a dense
  boolean array; :func:`trace_predicate` / :func:`trace_score_mod` trace the predicate
  and score_mod on index tiles for in-kernel evaluation (:mod:`attnjax.core.jaxpr`).
* :func:`step_schedule` / :func:`list_schedule` / :func:`union_table` compact a table
  into the lists of non-empty tiles kernels iterate over (a flat grid of steps on TPU,
  per program index lists on GPU); :func:`split_table` / :func:`split_bounds` /
  :func:`resolve_num_splits` deal a row's tiles into splits over the key axis.

Block sparsity after "Splash attention" and "FlexAttention: A Programming Model for
Generating Optimized Attention Kernels".
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks as masks_lib
from attnjax.core.args import AttentionArgs
from attnjax.core.errors import Unsupported
from attnjax.core.jaxpr import TileEvaluator, _ConstRef, const_storage, eval_jaxpr

__all__ = ["EMPTY", "PARTIAL", "FULL", "MASK_CONST_LIMIT", "SCORE_MOD_CONST_LIMIT",
           "TracedFn", "Plan", "make_plan", "trace_predicate", "trace_score_mod",
           "kv_group_table", "head_table", "group_heads", "step_schedule", "union_table",
           "list_schedule",
           "validate_num_splits", "split_bounds", "split_table", "resolve_num_splits"]

EMPTY, PARTIAL, FULL = masks_lib.EMPTY, masks_lib.PARTIAL, masks_lib.FULL

# A mask predicate whose closed-over arrays hold more elements than this is
# materialised as a dense boolean array instead of being evaluated in-kernel
# (the in-kernel lookup costs one select per table entry per tile).
MASK_CONST_LIMIT = 4096
SCORE_MOD_CONST_LIMIT = 1 << 16
_F32 = jnp.float32


def head_table(tables, a: AttentionArgs, bq: int, bk: int):
  """ANDs block tables per query head: int8 ``[B', N', nq, nk]`` (``N'`` 1 or ``N``); a
  ragged last key block is never FULL (its padded columns need the in-range mask)."""
  T, S, N = a.T, a.S, a.N
  nq, nk = -(-T // bq), -(-S // bk)
  if not tables:
    table = np.full((1, 1, nq, nk), FULL, np.int8)
  else:
    table = tables[0]
    for t in tables[1:]:
      table = masks_lib._table_algebra("and", [table, t])
  xp = _xp_of(table)
  if table.shape[1] not in (1, N):
    raise ValueError(f"mask block table has {table.shape[1]} heads, expected 1 or N={N}")
  if S % bk:
    last = xp.where(table[..., -1:] == FULL, PARTIAL, table[..., -1:]).astype(xp.int8)
    table = xp.concatenate([table[..., :-1], last], axis=-1)
  return table


def group_heads(table, a: AttentionArgs):
  """Merges the ``G`` query heads of each kv head of a :func:`head_table`: a tile is
  EMPTY for a GQA group only if it is empty for every head in it, and FULL only if full
  for all.  Returns int8 ``[B', K', nq, nk]``."""
  Bt, Nt, nq, nk = table.shape
  if not (Nt == a.N and a.N > 1):
    return table
  xp = _xp_of(table)
  t5 = table.reshape(Bt, a.K, a.G, nq, nk)
  nonempty = (t5 != EMPTY).any(axis=2)
  allfull = (t5 == FULL).all(axis=2)
  return xp.where(allfull, FULL, xp.where(nonempty, PARTIAL, EMPTY)).astype(xp.int8)


def kv_group_table(tables, a: AttentionArgs, bq: int, bk: int):
  """ANDs block tables and merges the ``G`` query heads of each kv head
  (:func:`head_table`, :func:`group_heads`).  Returns int8 ``[B', K', nq, nk]``."""
  return group_heads(head_table(tables, a, bq, bk), a)



# =========================================================================== plan


@dataclasses.dataclass
class TracedFn:
  """A predicate or score_mod traced on kernel tiles.

  ``closed`` takes ``(*tile_args, *explicit)``; ``explicit`` are differentiable
  arrays (score_mod only); ``literals`` are the jaxpr's own constants.  Both are
  passed to the kernel as flat 1D inputs (``storage``), explicit ones first.
  """
  closed: Any
  n_explicit: int
  explicit: list
  literals: list
  shapes: list
  dtypes: list

  @property
  def storage(self):
    return [const_storage(c) for c in list(self.explicit) + list(self.literals)]

  def call(self, tile_args, refs, ev: TileEvaluator):
    markers = [_ConstRef(i, s, d) for i, (s, d) in enumerate(zip(self.shapes, self.dtypes))]
    ne = self.n_explicit
    return eval_jaxpr(self.closed, list(tile_args) + markers[:ne], ev,
                      const_markers=markers[ne:])[0]


def _trace(fn, example_args, *, convert: bool) -> TracedFn:
  if convert:
    fn, explicit = jax.closure_convert(fn, *example_args)
    explicit = list(explicit)
  else:
    explicit = []
  closed = jax.make_jaxpr(fn)(*example_args, *explicit)
  literals = list(closed.consts)
  allc = explicit + literals
  return TracedFn(closed, len(explicit), explicit, literals,
                  [tuple(np.shape(c)) for c in allc],
                  [np.dtype(jnp.asarray(c).dtype) if not hasattr(c, "dtype") else np.dtype(c.dtype)
                   for c in allc])


@dataclasses.dataclass
class Plan:
  """Everything a kernel needs about one call, independent of the backend.

  Attributes:
    a: the normalised arguments.
    bq, bk: query rows per head and keys per tile; nq, nk tile counts; Tp, Sp padded.
    table: ``[B', K', nq, nk]`` int8 tile classes (numpy when static, else JAX).
    pred: the mask predicate evaluated in-kernel on partial tiles (or None).
    dense: ``[Bm, N, T, S]`` boolean mask materialised when the predicate cannot run
      in-kernel (or None); with ``dense_cols > 0`` instead a per-row key-block selection
      ``[Bm, Nm, T, nk_sel]`` (:func:`~attnjax.masks.from_row_block_mask`): row ``i`` may
      see tile ``kb`` iff ``dense[..., i, kb // dense_cols]`` (no ``[T, S]`` array).
    seg: ``(q_segment_ids [B, T], kv_segment_ids [B, S])`` int32 (or None).
    head_table: ``[B', N', nq, nk]`` the same per query head (``N'`` 1 or ``N``; ``table``
      merges a GQA group's heads): a GPU program of one head walks its own list.
    key_iv: ``(start, end)`` int32 ``[Bm, N, S]`` of a :func:`~attnjax.masks.key_interval`
      in the mask (row ``i`` sees key ``j`` iff ``start_j <= i < end_j``), read by the
      kernels per key tile (or None).
  """
  a: AttentionArgs
  bq: int
  bk: int
  nq: int
  nk: int
  table: Any
  pred: Optional[masks_lib.Mask]
  dense: Any
  seg: Any
  reasons: list
  head_table: Any = None
  dense_cols: int = 0
  row_mask: Any = None
  key_iv: Any = None

  @property
  def Tp(self):
    return self.nq * self.bq

  @property
  def Sp(self):
    return self.nk * self.bk

  @property
  def static(self) -> bool:
    return isinstance(self.table, np.ndarray)

  @property
  def needs_mask(self) -> bool:
    return (self.pred is not None or self.dense is not None or self.seg is not None
            or self.key_iv is not None or self.a.S % self.bk != 0)


def _split_mask(mask):
  """Splits an AND-tree into (other masks, document masks, table-only block masks),
  by :attr:`~attnjax.masks.Mask.kind` (never by name)."""
  if mask is None:
    return [], [], []
  if mask.kind == "and":
    parts = [_split_mask(c) for c in mask.children]
    return tuple(sum((p[i] for p in parts), []) for i in range(3))
  if mask.kind == "document":
    return [], [mask], []
  if mask.kind == "block_mask":
    return [], [], [mask]
  return [mask], [], []


def _kernel_data_only(mask) -> bool:
  """True when every JAX value the mask reads is a scalar offset or the ``[B]`` vectors
  of a :func:`~attnjax.masks.lengths` mask (ragged batches, KV caches): the predicate
  then runs in-kernel, no dense ``[B, T, S]`` mask is built."""
  if mask.kind == "lengths":
    return True
  if mask.kind == "fn" and mask.data_dependent:
    return False
  if any(np.size(x) != 1 for x in mask.arrays.values()):
    return False
  return all(_kernel_data_only(c) for c in mask.children)


def _row_selection(others, bk):
  """The :func:`~attnjax.masks.from_row_block_mask` among ``others`` whose key blocks are
  whole tiles (``block_k % bk == 0``), when the rest of the mask runs in-kernel: the
  kernel then reads its ``[B, N, T, nk]`` selection per tile instead of a dense mask."""
  rows = [m for m in others if m.kind == "row_block_mask" and m.params["block_k"] % bk == 0]
  if not rows:
    return None
  rest = [m for m in others if m is not rows[0]]
  if any(m.data_dependent and not _kernel_data_only(m) for m in rest):
    return None
  return rows[0]


def make_plan(a: AttentionArgs, bq: int, bk: int) -> Plan:
  """Tile table and mask decomposition for block sizes ``bq x bk``."""
  T, S, N, B = a.T, a.S, a.N, a.B
  nq, nk = -(-T // bq), -(-S // bk)
  others, docs, blocks = _split_mask(a.mask)
  reasons = []

  segs = []
  if a.q_segment_ids is not None:
    segs.append((a.q_segment_ids, a.kv_segment_ids))
  for d in docs:
    qs, ks = d.segment_ids
    segs.append((qs, ks))
  if len(segs) > 1:
    raise Unsupported("the kernel supports one set of segment ids (q_segment_ids or "
                              "one document mask), got several")
  seg = None
  if segs:
    qs, ks = segs[0]
    seg = (jnp.asarray(qs).astype(jnp.int32), jnp.asarray(ks).astype(jnp.int32))

  tables = []
  pred = None
  dense = None
  dense_cols = 0
  for m in blocks:
    if (m.params["block_q"], m.params["block_k"]) == (bq, bk):
      tables.append(m.block_table(T, S, bq, bk, num_heads=N, batch=B))
    else:
      others.append(m)
  key_iv = None
  ivs = [m for m in others if m.kind == "key_interval"]
  if ivs:                           # read per key tile: two [B, N, S] kernel inputs
    others = [m for m in others if m is not ivs[0]]
    tables.append(ivs[0].block_table(T, S, bq, bk, num_heads=N, batch=B))
    lo, hi = masks_lib.key_interval_arrays(ivs[0], T)
    key_iv = tuple(jnp.broadcast_to(jnp.asarray(x), (x.shape[0], N, S)) for x in (lo, hi))
  row_mask = _row_selection(others, bk)
  if row_mask is not None:          # read per tile from its selection, not as a predicate
    others = [m for m in others if m is not row_mask]
    tables.append(row_mask.block_table(T, S, bq, bk, num_heads=N, batch=B))
    sel = row_mask.arrays["row_block_mask"]
    dense = sel.reshape((1,) * (4 - sel.ndim) + tuple(sel.shape))
    dense_cols = row_mask.params["block_k"] // bk
  if others:
    pred = others[0]
    for m in others[1:]:
      pred = pred & m
    tables.append(pred.block_table(T, S, bq, bk, num_heads=N, batch=B))
    if pred.data_dependent and not _kernel_data_only(pred):
      # Arrays (not just scalar offsets) the predicate reads: a dense mask.  Scalar
      # offsets and per-row lengths stay in the predicate and reach the kernel as
      # small operands (``kv < kv_lengths[b]``: a lookup by the program's batch index).
      dense = pred.to_array(T, S, num_heads=N if pred.head_dependent else 1, batch=B)
      reasons.append(f"data-dependent mask {pred.name} materialised as a dense array")
      pred = None
  for d in docs:
    tables.append(d.block_table(T, S, bq, bk))
  if a.q_segment_ids is not None and not docs:
    tables.append(masks_lib.document(a.q_segment_ids, a.kv_segment_ids).block_table(T, S, bq, bk))

  heads = head_table(tables, a, bq, bk)
  return Plan(a, bq, bk, nq, nk, group_heads(heads, a), pred, dense, seg, reasons, heads,
              dense_cols, row_mask, key_iv)


def trace_predicate(plan: Plan, rows: int, cols: int) -> Optional[TracedFn]:
  """Traces the in-kernel mask predicate on ``[rows, cols]`` index tiles; falls back to
  a dense mask when its closed-over arrays are too large for in-kernel lookups."""
  if plan.pred is None:
    return None
  a = plan.a
  ex = [jax.ShapeDtypeStruct((rows, cols), jnp.int32)] * 4
  pred = plan.pred

  def fn(b, h, q, kv):
    return jnp.broadcast_to(pred(b, h, q, kv, num_heads=a.N, batch=a.B), (rows, cols))

  try:
    tf = _trace(fn, ex, convert=False)
    total = sum(int(np.prod(s, dtype=np.int64)) for s in tf.shapes)
    ok = total <= MASK_CONST_LIMIT
  except Exception as e:  # the predicate does not trace on index tiles
    ok, total = False, str(e)
  if ok:
    return tf
  if plan.row_mask is not None:       # one dense mask for both (the row selection too)
    pred = pred & plan.row_mask
    plan.dense_cols, plan.row_mask = 0, None
  plan.dense = pred.to_array(a.T, a.S, num_heads=a.N if pred.head_dependent else 1,
                             batch=a.B)
  plan.reasons.append(f"mask {pred.name} materialised as a dense array ({total})")
  plan.pred = None
  return None


def trace_score_mod(a: AttentionArgs, rows: int, cols: int) -> Optional[TracedFn]:
  if a.score_mod is None:
    return None
  sm = a.score_mod
  ex = [jax.ShapeDtypeStruct((rows, cols), _F32)] + \
       [jax.ShapeDtypeStruct((rows, cols), jnp.int32)] * 4

  def fn(s, b, h, q, kv):
    return jnp.broadcast_to(sm(s, b, h, q, kv).astype(_F32), (rows, cols))

  tf = _trace(fn, ex, convert=True)
  total = sum(int(np.prod(s, dtype=np.int64)) for s in tf.shapes)
  if total > SCORE_MOD_CONST_LIMIT:
    raise Unsupported(
        f"score_mod closes over arrays with {total} elements in all; the kernel supports up "
        f"to {SCORE_MOD_CONST_LIMIT} (pass a bias array instead)")
  return tf


# =========================================================================== schedules


def _xp_of(x):
  return jnp if isinstance(x, (jax.Array, jax.core.Tracer)) else np


def step_schedule(table, *, transpose: bool = False, max_per_row=None):
  """Compacts a tile table into a flat list of grid steps per ``(b', k')``.

  Rows of the table (q blocks; k blocks with ``transpose``) are visited in order;
  each row spends one step per non-empty tile, or a single idle step when it has
  none (so its output block is still written).  Rows with fewer steps than the
  longest ``(b', k')`` list are padded with inactive steps that repeat the last
  block indices (no DMA, no compute).

  ``max_per_row`` bounds the non-empty tiles of a row for a traced table (whose
  worst-case length is otherwise ``nr * nc``), e.g. ``ceil(nc / P)`` for a table
  dealt into ``P`` splits by :func:`split_table`; ignored for a static table.

  Returns:
    ``(row, col, flags, length, n_active, n_steps)``: int32 ``[B' * K' * L]`` arrays
    (flags bit 0 active, 1 partial, 2 first step of the row, 3 last step of the row),
    the static step count ``L`` per ``(b', k')`` (the stride of the arrays), the number
    of active steps, and the longest ``(b', k')`` list ``n_steps <= L``: Python ints
    for a static table (``n_steps == L``); for a traced table ``n_active`` and
    ``n_steps`` are int32 scalars, and ``n_steps`` is the data-dependent grid length
    (TPU: a dynamic grid bound) so the grid walks the selected tiles only.
  """
  xp = _xp_of(table)
  if transpose:
    table = xp.swapaxes(table, -1, -2)
  Bt, Kt, nr, nc = table.shape
  P = Bt * Kt
  t = table.reshape(P, nr, nc)
  nonempty = t != EMPTY
  if xp is np:
    order = np.argsort(~nonempty, axis=-1, kind="stable").astype(np.int32)
  else:
    order = jnp.argsort(~nonempty, axis=-1, stable=True).astype(jnp.int32)
  count = nonempty.sum(-1).astype(xp.int32)                       # [P, nr]
  span = xp.maximum(count, 1)
  ends = xp.cumsum(span, axis=-1)                                  # [P, nr]
  starts = ends - span
  total = ends[:, -1]                                              # [P]
  if xp is np:
    L = int(total.max())
  else:
    L = nr * max(1, min(nc, max_per_row or nc))
  s = xp.arange(L, dtype=xp.int32)[None, :]                        # [1, L]
  s_eff = xp.minimum(s, total[:, None] - 1)                        # [P, L]
  row = (s_eff[:, :, None] >= ends[:, None, :]).sum(-1).astype(xp.int32)   # [P, L]
  j = s_eff - xp.take_along_axis(starts, row, axis=1)
  cnt = xp.take_along_axis(count, row, axis=1)
  col = xp.take_along_axis(order.reshape(P, nr * nc), row * nc + xp.minimum(j, nc - 1), axis=1)
  cls = xp.take_along_axis(t.reshape(P, nr * nc), row * nc + col, axis=1)
  live = s < total[:, None]
  active = live & (j < cnt)
  partial = active & (cls == PARTIAL)
  first = live & (j == 0)
  last = live & (j == xp.maximum(cnt, 1) - 1)
  flags = (active.astype(xp.int32) | (partial.astype(xp.int32) << 1)
           | (first.astype(xp.int32) << 2) | (last.astype(xp.int32) << 3))
  n_active = int(count.sum()) if xp is np else count.sum()
  n_steps = L if xp is np else total.max().astype(jnp.int32)
  return (row.reshape(-1).astype(xp.int32), col.reshape(-1).astype(xp.int32),
          flags.reshape(-1).astype(xp.int32), L, n_active, n_steps)


def union_table(table, axes):
  """Merges a tile table over ``axes`` (kept, size 1): EMPTY where every merged tile is
  empty, FULL where every one is full, PARTIAL otherwise (a kernel visiting a merged
  tile then masks each member, so a member's EMPTY tile contributes nothing)."""
  axes = tuple(axes)
  if not axes:
    return table
  xp = _xp_of(table)
  nonempty = (table != EMPTY).any(axis=axes, keepdims=True)
  full = (table == FULL).all(axis=axes, keepdims=True)
  return xp.where(full, FULL, xp.where(nonempty, PARTIAL, EMPTY)).astype(xp.int8)


def list_schedule(table, *, transpose: bool = False, pad_to=None):
  """Per ``(b', k', row)``: the non-empty columns, partial tiles first.

  Returns ``(cols [B', K', nr, ncp], n_partial [B', K', nr], n_total [B', K', nr])``
  int32 (``ncp`` = ``pad_to(nc)`` when given).
  """
  xp = _xp_of(table)
  if transpose:
    table = xp.swapaxes(table, -1, -2)
  key = xp.where(table == PARTIAL, 0, xp.where(table == FULL, 1, 2)).astype(xp.int32)
  if xp is np:
    cols = np.argsort(key, axis=-1, kind="stable").astype(np.int32)
  else:
    cols = jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)
  n_part = (table == PARTIAL).sum(-1).astype(xp.int32)
  n_tot = (table != EMPTY).sum(-1).astype(xp.int32)
  nc = table.shape[-1]
  if pad_to is not None and pad_to(nc) != nc:
    pad = pad_to(nc) - nc
    cols = xp.concatenate([cols, xp.zeros(cols.shape[:-1] + (pad,), xp.int32)], axis=-1)
  return cols, n_part, n_tot


# =========================================================================== split over S


def validate_num_splits(num_splits, owner: str):
  """``None`` (heuristic) or a positive int; raises ``ValueError`` naming the field."""
  if num_splits is None:
    return
  if isinstance(num_splits, bool) or not isinstance(num_splits, (int, np.integer)) or \
      num_splits < 1:
    raise ValueError(f"{owner}.num_splits must be a positive int (1 disables the split over "
                     f"the key axis) or None (heuristic), got {num_splits!r}")


def split_bounds(count, p, num_splits):
  """Ranks ``[lo, hi)`` of a list of ``count`` tiles that split ``p`` of ``num_splits``
  owns: ``lo = p * count // P``, ``hi = (p + 1) * count // P`` (contiguous, balanced
  to within one tile; splits beyond ``count`` own nothing).  Works on ints and arrays."""
  if any(isinstance(x, (jax.Array, jax.core.Tracer)) for x in (count, p)):
    # in-kernel: truncating division of non-negative ints (``//`` lowers through ``sign``,
    # which Mosaic cannot lower off-TPU)
    div = lambda x: jax.lax.div(x, jnp.asarray(num_splits, x.dtype))
    return div(p * count), div((p + 1) * count)
  return (p * count) // num_splits, ((p + 1) * count) // num_splits


def split_table(table, num_splits: int):
  """Deals each row's non-empty tiles (column order) into ``P = num_splits`` parts.

  ``table [B', K', nr, nc]`` -> ``[B', K' * P, nr, nc]``: entry ``(b, k * P + p)`` keeps
  the tiles of rank ``[lo, hi)`` (:func:`split_bounds`) of every row and marks the
  others EMPTY, so :func:`step_schedule` of the result gives each split its own list.
  """
  xp = _xp_of(table)
  P = int(num_splits)
  Bt, Kt, nr, nc = table.shape
  nonempty = table != EMPTY
  rank = xp.cumsum(nonempty.astype(xp.int32), axis=-1) - 1        # [B', K', nr, nc]
  count = nonempty.sum(-1, keepdims=True).astype(xp.int32)         # [B', K', nr, 1]
  parts = []
  for p in range(P):
    lo, hi = split_bounds(count, p, P)
    keep = nonempty & (rank >= lo) & (rank < hi)
    parts.append(xp.where(keep, table, EMPTY).astype(table.dtype))
  return xp.stack(parts, axis=2).reshape(Bt, Kt * P, nr, nc)


def resolve_num_splits(num_splits, table, programs: int, *, target: int,
                       min_tiles: int = 4) -> int:
  """The number of splits of each q block's key list.

  An explicit ``num_splits`` is returned as is.  ``None``: 1 when the call already has
  ``programs >= target`` parallel programs; otherwise enough splits to reach ``target``
  programs, capped so each split keeps at least ``min_tiles`` tiles of the longest list
  (the longest row of a static table; ``nc`` for a traced one).
  """
  if num_splits is not None:
    return int(num_splits)
  if programs >= target:
    return 1
  if isinstance(table, np.ndarray):
    longest = int((table != EMPTY).sum(-1).max()) if table.size else 0
  else:
    longest = int(table.shape[-1])
  return max(1, min(-(-target // max(programs, 1)), longest // min_tiles))

