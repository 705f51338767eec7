"""Backend-independent pieces of the block-sparse flash-attention kernels.

* :func:`make_plan` normalises a call (raw user arguments or an ``AttentionArgs``)
  into what a kernel consumes: the tile table (empty / partial / full per
  ``(batch, kv head, q block, k block)``), the mask split into an in-kernel
  predicate, segment ids and (as a last resort) a dense boolean array, and the
  score_mod traced to a jaxpr.
* :func:`step_schedule` / :func:`list_schedule` compact the table into the lists
  of non-empty tiles the kernels iterate over (a flat grid of steps on TPU, per
  program index lists on GPU).
* :class:`TileEvaluator` / :func:`eval_jaxpr` evaluate user predicates and score
  mods *inside* a kernel.  Pallas cannot lower a gather from an array, so a gather
  from a small closed-over array (ALiBi slopes, relative-position tables) is
  rewritten into a loop of selects reading scalars from a 1D kernel input, and
  its gradient becomes per-entry reductions (``d table[e] = sum(ds * [idx == e])``);
  integer ``sign`` (used by ``//``) is rewritten into selects.

Paper: "FlashAttention: Fast and Memory-Efficient Exact Attention with
IO-Awareness" (Dao et al., 2022); block sparsity after "Splash attention" and
"FlexAttention: A Programming Model for Generating Optimized Attention Kernels".
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Optional

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from jax.experimental import pallas as pl

from attnjax import masks as masks_lib
from attnjax.ops.chunked import kv_group_table, sum_to_vma, vary_like
from attnjax.ops import dense as dense_lib

__all__ = ["EMPTY", "PARTIAL", "FULL", "Plan", "make_plan", "normalize_args",
           "step_schedule", "list_schedule", "union_table", "split_bounds", "split_table",
           "resolve_num_splits", "validate_num_splits", "merge_splits", "TileEvaluator",
           "eval_jaxpr", "MASK_CONST_LIMIT", "SCORE_MOD_CONST_LIMIT", "TileMath",
           "finish_softmax", "KernelRefs", "as_block_sizes", "default_interpret", "plan_call",
           "make_flash_attention", "tile_math", "cfg_flags", "side_inputs", "backward_rows",
           "finish_grads", "flash_core", "traced_consts", "flash_attention_reference",
           "pallas_call"]

EMPTY, PARTIAL, FULL = masks_lib.EMPTY, masks_lib.PARTIAL, masks_lib.FULL

# A mask predicate whose closed-over arrays hold more elements than this is
# materialised as a dense boolean array instead of being evaluated in-kernel
# (the in-kernel lookup costs one select per table entry per tile).
MASK_CONST_LIMIT = 4096
SCORE_MOD_CONST_LIMIT = 1 << 16

_F32 = jnp.float32
_prims = jex.core.primitives


# =========================================================================== arguments


def normalize_args(q, k, v, a=None, **kwargs) -> dense_lib.AttentionArgs:
  """``AttentionArgs`` from either a ready one (``a``) or raw user keyword arguments."""
  if a is not None:
    if kwargs:
      raise TypeError("pass either an AttentionArgs or keyword arguments, not both")
    return a
  return dense_lib.check_attention_args(q, k, v, **kwargs)


# =========================================================================== in-kernel evaluation


class _ConstRef:
  """A closed-over array that lives in a 1D kernel input (``slot``), read by lookup."""

  def __init__(self, slot, shape, dtype):
    self.slot, self.shape, self.dtype = slot, tuple(shape), np.dtype(dtype)

  @property
  def size(self):
    return int(np.prod(self.shape, dtype=np.int64))


class _IndexStack:
  """Index components stacked on a trailing axis (kept unmaterialised for gathers)."""

  def __init__(self, comps):
    self.comps = list(comps)


def _is_marker(x):
  return isinstance(x, (_ConstRef, _IndexStack))


class TileEvaluator:
  """Evaluation context: the 1D refs holding closed-over arrays, and the *leaves*
  (values looked up from them) so a backward pass can differentiate through them.

  With ``leaf_values`` given, lookups return those values instead (in order), which
  makes the traced function differentiable with respect to the leaves.
  """

  def __init__(self, refs, leaf_values=None):
    self.refs = list(refs)
    self.leaf_values = None if leaf_values is None else list(leaf_values)
    self.leaves = []      # (slot, flat index tile or None, size)
    self.values = []      # the looked-up values, in order

  def lookup(self, marker: _ConstRef, flat):
    i = len(self.leaves)
    self.leaves.append((marker.slot, flat, marker.size))
    if self.leaf_values is not None:
      return self.leaf_values[i]
    val = self._read(marker, flat)
    self.values.append(val)
    return val

  def _read(self, marker, flat):
    ref = self.refs[marker.slot]
    store_dtype = ref.dtype
    if flat is None:
      val = ref[0]
      return _cast(val, marker.dtype)
    E = marker.size
    if E == 1:
      val = jnp.broadcast_to(ref[0], flat.shape)
      return _cast(val, marker.dtype)

    def body(e, acc):
      return jnp.where(flat == e, ref[e], acc)

    init = jnp.zeros(flat.shape, store_dtype)
    val = jax.lax.fori_loop(0, E, body, init)
    return _cast(val, marker.dtype)

  def accumulate_grads(self, leaf_cts, acc_by_slot: dict, width_by_slot: dict):
    """Adds ``d table[e] = sum(ct * [flat == e])`` into per-slot ``[1, width]`` vectors."""
    for (slot, flat, size), ct in zip(self.leaves, leaf_cts):
      if slot not in acc_by_slot:
        continue
      width = width_by_slot[slot]
      lane = jax.lax.broadcasted_iota(jnp.int32, (1, width), 1)
      ct = ct.astype(_F32)
      if flat is None or size == 1:
        tot = _sum11(ct)
        acc_by_slot[slot] = acc_by_slot[slot] + jnp.where(lane == 0, tot, 0.0)
        continue

      def body(e, acc, flat=flat, ct=ct, lane=lane):
        tot = _sum11(jnp.where(flat == e, ct, 0.0))
        return acc + jnp.where(lane == e, tot, 0.0)

      acc_by_slot[slot] = jax.lax.fori_loop(0, size, body, acc_by_slot[slot])
    return acc_by_slot


def _sum11(x):
  """Sum of a 0-2D array as a [1, 1] array (reductions that lower on Mosaic/Triton)."""
  if x.ndim == 0:
    return jnp.reshape(x, (1, 1))
  if x.ndim == 1:
    x = x[None, :]
  return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


def _cast(x, dtype):
  if dtype == np.bool_:
    return x != 0
  return x.astype(dtype)


def _int_sign(x):
  pos = jnp.full(x.shape, 1, x.dtype)
  neg = jnp.full(x.shape, -1, x.dtype)
  zero = jnp.full(x.shape, 0, x.dtype)
  return jnp.where(x > 0, pos, jnp.where(x < 0, neg, zero))


def _sub_jaxpr(eqn):
  p = eqn.primitive
  if p is _prims.jit_p:
    return eqn.params["jaxpr"]
  if p in (_prims.closed_call_p, _prims.call_p):
    return eqn.params["call_jaxpr"]
  if p is _prims.custom_jvp_call_p:
    return eqn.params["call_jaxpr"]
  if p is _prims.custom_vjp_call_p:
    return eqn.params.get("call_jaxpr") or eqn.params.get("fun_jaxpr")
  return None


def _materialise(x):
  if isinstance(x, _IndexStack):
    if len(x.comps) == 1:
      return x.comps[0][..., None]
    return jnp.stack(x.comps, axis=-1)
  if isinstance(x, _ConstRef):
    raise NotImplementedError(
        f"a closed-over array of shape {x.shape} is used in a way the kernel cannot "
        "evaluate (only point lookups like table[h, idx] and scalars are supported)")
  return x


def eval_jaxpr(closed, args, ev: TileEvaluator, const_markers=None):
  """Evaluates a ClosedJaxpr inside a kernel.  ``args`` may contain ``_ConstRef``
  markers; ``const_markers`` replace ``closed.consts`` (None: use the values)."""
  jaxpr = closed.jaxpr if hasattr(closed, "jaxpr") else closed
  consts = closed.consts if const_markers is None else const_markers
  return _eval(jaxpr, consts, args, ev)


def _eval(jaxpr, consts, args, ev):
  env = {}

  def read(v):
    if isinstance(v, jex.core.Literal):
      return v.val
    return env[v]

  for var, val in zip(jaxpr.constvars, consts):
    env[var] = val
  for var, val in zip(jaxpr.invars, args):
    env[var] = val
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    outs = _eval_eqn(eqn, ins, ev)
    for var, val in zip(eqn.outvars, outs):
      env[var] = val
  return [read(v) for v in jaxpr.outvars]


# Mesh-axis type casts a jaxpr traced inside ``shard_map`` holds; a kernel body has no
# mesh axes, so they are identities there.
_VMA_CASTS = ("pvary", "pcast")


def _eval_eqn(eqn, ins, ev):
  p = eqn.primitive
  params = eqn.params
  if p.name in _VMA_CASTS:
    return list(ins)
  out_avals = [v.aval for v in eqn.outvars]
  sub = _sub_jaxpr(eqn)
  if sub is not None:
    sub_consts = sub.consts if hasattr(sub, "consts") else ()
    return _eval(sub.jaxpr if hasattr(sub, "jaxpr") else sub, sub_consts, ins, ev)

  if any(_is_marker(x) for x in ins):
    x0 = ins[0]
    if p is jax.lax.convert_element_type_p and isinstance(x0, _ConstRef):
      return [_ConstRef(x0.slot, x0.shape, params["new_dtype"])]
    if p is jax.lax.gather_p and isinstance(x0, _ConstRef):
      return [_point_gather(x0, ins[1], params, out_avals[0], ev)]
    if p is jax.lax.concatenate_p and all(isinstance(x, _IndexStack) for x in ins) and \
        params["dimension"] == out_avals[0].ndim - 1:
      return [_IndexStack([c for x in ins for c in x.comps])]
    # A scalar closed-over value used elementwise (e.g. a learnable temperature).
    new = []
    for x in ins:
      if isinstance(x, _ConstRef) and x.size == 1 and x.shape == ():
        x = ev.lookup(x, None)
      new.append(_materialise(x))
    ins = new

  if p is jax.lax.broadcast_in_dim_p:
    shape = params["shape"]
    dims = params["broadcast_dimensions"]
    x = ins[0]
    if len(shape) >= 1 and shape[-1] == 1 and (len(dims) == 0 or dims[-1] != len(shape) - 1) \
        and not isinstance(x, _ConstRef):
      comp = jax.lax.broadcast_in_dim(x, shape[:-1], dims) if tuple(x.shape) != shape[:-1] else x
      return [_IndexStack([comp])]
  if p is jax.lax.reshape_p and not isinstance(ins[0], _ConstRef):
    shape = params["new_sizes"]
    x = ins[0]
    if len(shape) >= 1 and shape[-1] == 1 and tuple(x.shape) == tuple(shape[:-1]):
      return [_IndexStack([x])]
  if p is jax.lax.sign_p and jnp.issubdtype(ins[0].dtype, jnp.integer):
    return [_int_sign(ins[0])]
  out = p.bind(*ins, **params)
  return list(out) if p.multiple_results else [out]


def _point_gather(marker: _ConstRef, idx, params, out_aval, ev):
  dn = params["dimension_numbers"]
  nd = len(marker.shape)
  if (tuple(dn.offset_dims) != () or sorted(dn.collapsed_slice_dims) != list(range(nd))
      or tuple(dn.operand_batching_dims) != () or any(s != 1 for s in params["slice_sizes"])):
    raise NotImplementedError("only point lookups (table[i, j]) of closed-over arrays are "
                              "supported inside the kernel")
  if not isinstance(idx, _IndexStack):
    raise NotImplementedError("unsupported gather index layout inside the kernel")
  comps = idx.comps
  if len(comps) != len(dn.start_index_map):
    raise NotImplementedError("unsupported gather index layout inside the kernel")
  strides = [int(np.prod(marker.shape[d + 1:], dtype=np.int64)) for d in range(nd)]
  flat = None
  valid = None
  for c, d in zip(comps, dn.start_index_map):
    c = c.astype(jnp.int32)
    L = marker.shape[d]
    ok = (c >= 0) & (c < L)
    valid = ok if valid is None else valid & ok
    c = jnp.clip(c, 0, L - 1)
    term = c * strides[d] if strides[d] != 1 else c
    flat = term if flat is None else flat + term
  flat = jnp.broadcast_to(flat, out_aval.shape)
  val = ev.lookup(marker, flat)
  mode = params.get("mode")
  if mode is not None and "FILL" in str(mode):
    fill = params.get("fill_value")
    if fill is None:
      fill = np.nan if jnp.issubdtype(marker.dtype, jnp.inexact) else 0
    val = jnp.where(jnp.broadcast_to(valid, out_aval.shape), val,
                    jnp.asarray(fill, val.dtype))
  return val


def _const_storage(x):
  """Flattens a closed-over array into the 1D f32/i32 kernel input that holds it."""
  x = jnp.asarray(x)
  dt = _F32 if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.int32
  return x.reshape(-1).astype(dt)


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
    return [_const_storage(c) for c in list(self.explicit) + list(self.literals)]

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
      in-kernel (or None).
    seg: ``(q_segment_ids [B, T], kv_segment_ids [B, S])`` int32 (or None).
    has_table_only_mask: the mask is fully described by FULL/EMPTY tiles.
  """
  a: dense_lib.AttentionArgs
  bq: int
  bk: int
  nq: int
  nk: int
  table: Any
  pred: Optional[masks_lib.Mask]
  dense: Any
  seg: Any
  reasons: list

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
            or self.a.S % self.bk != 0)


_BLOCK_MASK_RE = re.compile(r"^from_block_mask\((\d+), (\d+)\)$")


def _split_mask(mask):
  """Splits an AND-tree into (other masks, document masks, table-only block masks)."""
  if mask is None:
    return [], [], []
  if getattr(mask, "_op", None) == "and":
    parts = [_split_mask(c) for c in mask._children]
    return tuple(sum((p[i] for p in parts), []) for i in range(3))
  if mask.segment_ids is not None:
    return [], [mask], []
  if _BLOCK_MASK_RE.match(mask.name or ""):
    return [], [], [mask]
  return [mask], [], []


def make_plan(a: dense_lib.AttentionArgs, bq: int, bk: int) -> Plan:
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
    raise NotImplementedError("the kernel supports one set of segment ids (q_segment_ids or "
                              "one document mask), got several")
  seg = None
  if segs:
    qs, ks = segs[0]
    seg = (jnp.asarray(qs).astype(jnp.int32), jnp.asarray(ks).astype(jnp.int32))

  tables = []
  pred = None
  dense = None
  for m in blocks:
    mbq, mbk = (int(x) for x in _BLOCK_MASK_RE.match(m.name).groups())
    if (mbq, mbk) == (bq, bk):
      tables.append(m.block_table(T, S, bq, bk, num_heads=N, batch=B))
    else:
      others.append(m)
  if others:
    pred = others[0]
    for m in others[1:]:
      pred = pred & m
    tables.append(pred.block_table(T, S, bq, bk, num_heads=N, batch=B))
    if pred.data_dependent:
      dense = pred.to_array(T, S, num_heads=N if pred.head_dependent else 1, batch=B)
      reasons.append(f"data-dependent mask {pred.name} materialised as a dense array")
      pred = None
  for d in docs:
    tables.append(d.block_table(T, S, bq, bk))
  if a.q_segment_ids is not None and not docs:
    tables.append(masks_lib.document(a.q_segment_ids, a.kv_segment_ids).block_table(T, S, bq, bk))

  table = kv_group_table(tables, a, bq, bk)
  return Plan(a, bq, bk, nq, nk, table, pred, dense, seg, reasons)


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
  plan.dense = pred.to_array(a.T, a.S, num_heads=a.N if pred.head_dependent else 1,
                             batch=a.B)
  plan.reasons.append(f"mask {pred.name} materialised as a dense array ({total})")
  plan.pred = None
  return None


def trace_score_mod(a: dense_lib.AttentionArgs, rows: int, cols: int) -> Optional[TracedFn]:
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
    raise NotImplementedError(
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
    ``(row, col, flags, length, n_active)``: int32 ``[B' * K' * L]`` arrays (flags
    bit 0 active, 1 partial, 2 first step of the row, 3 last step of the row), the
    static step count ``L`` per ``(b', k')``, and the number of active steps
    (a Python int for static tables).
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
  return (row.reshape(-1).astype(xp.int32), col.reshape(-1).astype(xp.int32),
          flags.reshape(-1).astype(xp.int32), L, n_active)


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


def merge_splits(o_p, lse_p, axis: int, sink=None):
  """Log-sum-exp combine of per-split partial results.

  ``o_p``: normalised partial outputs, the split axis at ``axis``, features last;
  ``lse_p``: their log-sum-exps, ``o_p.shape[:-1]``.  ``sink``: logits broadcastable to
  ``lse`` joining the denominator once (or None).  Returns
  ``o = sum_p exp(lse_p - lse) o_p`` and ``lse = logsumexp_p(lse_p [, sink])``; splits
  with ``lse_p = -inf`` (no tile, or no allowed key) weigh 0, rows with no allowed key
  give ``o = 0`` and ``lse = -inf`` (``lse = sink`` with a sink), never NaN.
  """
  lse_p = lse_p.astype(_F32)
  m = jnp.max(lse_p, axis=axis)
  if sink is not None:
    sink = jnp.broadcast_to(sink.astype(_F32), m.shape)
    m = jnp.maximum(m, sink)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.exp(lse_p - jnp.expand_dims(m, axis))                    # 0 for empty splits
  denom = jnp.sum(w, axis=axis)
  if sink is not None:
    denom = denom + jnp.exp(sink - m)
  pos = denom > 0
  safe = jnp.where(pos, denom, 1.0)
  o = jnp.sum(jnp.expand_dims(w, -1) * o_p.astype(_F32), axis=axis) / safe[..., None]
  lse = jnp.where(pos, m + jnp.log(safe), -jnp.inf)
  return o, lse


# =========================================================================== small math


def sink_grads(sinks, lse_bnt, delta_bnt):
  """``d sink_n = -sum_{b,t} exp(sink_n - lse) * delta`` (delta = rowsum(dO * O) - dlse)."""
  sk = sinks.astype(_F32)[None, :, None]
  p = jnp.exp(sk - jnp.where(jnp.isfinite(lse_bnt), lse_bnt, jnp.inf))
  return (-jnp.sum(p * delta_bnt, axis=(0, 2))).astype(sinks.dtype)


def float0_like(x):
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, dtype=jax.dtypes.float0)


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def next_pow2(x: int) -> int:
  return 1 << max(0, int(math.ceil(math.log2(max(1, x)))))


# =========================================================================== tile math


@dataclasses.dataclass(frozen=True)
class TileMath:
  """The per-tile computation shared by every kernel (forward and backward).

  ``s0 = scale * q k^T + bias``; ``s1 = score_mod(s0)``; ``s = softcap(s1)``; masked
  entries of partial tiles become ``-inf``.
  """
  scale: float
  softcap: Optional[float]
  sm: Optional[TracedFn]
  pred: Optional[TracedFn]
  S: int
  ragged_k: bool
  precision: Any = None

  def dot_nt(self, a, b):
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=self.precision,
                               preferred_element_type=_F32)

  def dot_nn(self, a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=self.precision,
                               preferred_element_type=_F32)

  def dot_tn(self, a, b):
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=self.precision,
                               preferred_element_type=_F32)

  def logits(self, q, k, bias, idx, sm_refs):
    """Returns ``(s0, s1, s, ev)`` (``ev``: the score_mod evaluator, or None)."""
    s0 = self.dot_nt(q, k) * self.scale
    if bias is not None:
      s0 = s0 + bias.astype(_F32)
    s1, ev = s0, None
    if self.sm is not None:
      ev = TileEvaluator(sm_refs)
      s1 = self.sm.call([s0, *idx()], sm_refs, ev).astype(_F32)
    s = s1
    if self.softcap is not None:
      s = self.softcap * jnp.tanh(s1 / self.softcap)
    return s0, s1, s, ev

  def allowed(self, idx, pred_refs, seg_eq, dense):
    ok = None
    if self.ragged_k:
      ok = idx()[3] < self.S
    if self.pred is not None:
      m = self.pred.call(list(idx()), pred_refs, TileEvaluator(pred_refs))
      ok = m if ok is None else ok & m
    if seg_eq is not None:
      ok = seg_eq if ok is None else ok & seg_eq
    if dense is not None:
      d = dense != 0
      ok = d if ok is None else ok & d
    return ok

  def dlogits(self, ds, s0, s1, idx, sm_refs, ev, dconst_acc, dconst_width):
    """Backpropagates ``d s`` to ``d s0`` through softcap and score_mod; accumulates
    score_mod array gradients into ``dconst_acc`` (dict slot -> [1, width])."""
    if self.softcap is not None:
      th = jnp.tanh(s1 / self.softcap)
      ds = ds * (1.0 - th * th)
    if self.sm is not None:
      leaf_vals = ev.values
      def f(s0_, *g):
        ev2 = TileEvaluator(sm_refs, leaf_values=g)
        return self.sm.call([s0_, *idx()], sm_refs, ev2).astype(_F32)
      _, vjp = jax.vjp(f, s0, *leaf_vals)
      grads = vjp(ds)
      ds = grads[0]
      if dconst_acc:
        dconst_acc = ev.accumulate_grads(grads[1:], dconst_acc, dconst_width)
    return ds, dconst_acc

  def masked_logits(self, q, k, bias, idx, sm_refs, masked, pred_refs, seg_eq, dense):
    """:meth:`logits` with, on a partial tile (``masked``), disallowed entries of ``s``
    set to ``-inf``.  Returns ``(s0, s1, s, ev)``."""
    s0, s1, s, ev = self.logits(q, k, bias, idx, sm_refs)
    if masked:
      ok = self.allowed(idx, pred_refs, seg_eq, dense)
      if ok is not None:
        s = jnp.where(ok, s, -jnp.inf)
    return s0, s1, s, ev

  def probs_and_ds(self, s, lse, do, v, delta):
    """``p = exp(s - lse)`` and ``d s = p (dO v^T - delta)`` of one tile (``lse``,
    ``delta``: ``[rows, 1]``; ``lse = +inf`` on rows to ignore)."""
    p = jnp.exp(s - lse)
    ds = p * (self.dot_nt(do, v) - delta)
    return p, ds

  def online_softmax(self, m, l, acc, s, v):
    """One step of the online softmax: folds the logits ``s [rows, bk]`` of a tile and
    its values ``v`` into the running max ``m``, sum ``l`` (``[rows]`` or ``[rows, 1]``)
    and unnormalised output ``acc [rows, Hv]``; fully masked rows stay at 0."""
    col = (lambda x: x[:, None]) if m.ndim == 1 else (lambda x: x)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=m.ndim == 2))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - col(m_safe))
    alpha = jnp.exp(m - m_safe)
    l = alpha * l + jnp.sum(p, axis=1, keepdims=m.ndim == 2)
    acc = col(alpha) * acc + self.dot_nn(p.astype(v.dtype), v)
    return m_new, l, acc


def finish_softmax(m, l, acc):
  """``(o, lse)`` from the online-softmax state: ``o = acc / l``, ``lse = m + log l``;
  rows with ``l = 0`` (no allowed key) give ``o = 0``, ``lse = -inf``."""
  col = (lambda x: x[:, None]) if m.ndim == 1 else (lambda x: x)
  pos = l > 0
  safe = jnp.where(pos, l, 1.0)
  mf = jnp.where(jnp.isfinite(m), m, 0.0)
  return acc / col(safe), jnp.where(pos, mf + jnp.log(safe), -jnp.inf)


# =========================================================================== shared wrappers


class KernelRefs:
  """Unpacks a flash kernel's positional refs: ``lead`` schedule refs, ``q, k, v``,
  (backward) ``do, lse, delta``, (forward) ``sinks``, then ``bias``, ``dense``,
  ``qseg, kseg``, the predicate and score_mod constants, an aliased input (skipped),
  the outputs and the scratch buffers, each present as ``cfg`` says."""

  def __init__(self, cfg, refs, *, n_lead, kind, n_out, n_scratch=0, aliased=False):
    refs = list(refs)
    self.lead = refs[:n_lead]
    i = n_lead
    self.q, self.k, self.v = refs[i:i + 3]
    i += 3
    if kind != "fwd":
      self.do, self.lse, self.delta = refs[i:i + 3]
      i += 3
    self.sinks = None
    if kind == "fwd" and cfg.has_sinks:
      self.sinks = refs[i]
      i += 1
    self.bias = self.dense = self.qseg = self.kseg = None
    if cfg.has_bias:
      self.bias = refs[i]
      i += 1
    if cfg.has_dense:
      self.dense = refs[i]
      i += 1
    if cfg.has_seg:
      self.qseg, self.kseg = refs[i:i + 2]
      i += 2
    self.pred = refs[i:i + cfg.n_pred]
    i += cfg.n_pred
    self.sm = refs[i:i + cfg.n_sm]
    i += cfg.n_sm
    if aliased:
      i += 1
    self.outs = refs[i:i + n_out]
    i += n_out
    self.scratch = refs[i:i + n_scratch]


def as_block_sizes(block_sizes, cls, backend: str):
  """``block_sizes`` as a ``cls`` (``None``: defaults); another type raises
  ``NotImplementedError`` so the dispatcher tries the next implementation."""
  if block_sizes is None:
    return cls()
  if isinstance(block_sizes, cls):
    return block_sizes
  raise NotImplementedError(f"the {backend} flash kernel takes attnjax.kernels."
                            f"{backend.lower()}.BlockSizes, got {type(block_sizes).__name__}")


def default_interpret(interpret, backends) -> bool:
  """Interpret mode unless the default JAX backend is one of ``backends``."""
  if interpret is None:
    return jax.default_backend() not in backends
  return bool(interpret)


def plan_call(q, k, v, bs, kwargs, programs):
  """``(a, plan, P)`` of a call for ``grid_steps``: the normalised arguments, the plan
  at ``bs``'s block sizes and the resolved split count (``programs(a, plan)`` parallel
  programs without a split)."""
  a = dense_lib.check_attention_args(q, k, v, **kwargs)
  bq, bk = bs.resolve(a.T, a.S)
  plan = make_plan(a, bq, bk)
  return a, plan, bs.resolve_splits(plan.table, programs(a, plan))


def make_flash_attention(build, block_sizes_cls, backend: str, native, doc: str, module: str):
  """The public ``flash_attention`` of a backend: validates the arguments, then runs
  ``build(a, block_sizes, interpret)(q, k, v) -> (out [B, T, N, Hv], lse [B, N, T])``
  (interpret mode by default unless the JAX backend is one of ``native``)."""

  def flash_attention(q, k, v, *, mask=None, score_mod=None, bias=None, q_segment_ids=None,
                      kv_segment_ids=None, scale=None, softcap=None, sinks=None,
                      return_lse=False, block_sizes=None, interpret=None):
    bs = as_block_sizes(block_sizes, block_sizes_cls, backend)
    a = dense_lib.check_attention_args(
        q, k, v, mask=mask, score_mod=score_mod, bias=bias, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, scale=scale, softcap=softcap, sinks=sinks)
    if not isinstance(return_lse, bool):
      raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    out, lse = build(a, bs, default_interpret(interpret, native))(q, k, v)
    return (out, lse) if return_lse else out

  flash_attention.__doc__ = doc
  flash_attention.__module__ = module
  return flash_attention


def tile_math(a: dense_lib.AttentionArgs, plan: Plan, pred_tf, sm_tf, dtype) -> TileMath:
  """The per-tile math of a call (HIGHEST matmul precision for float32 inputs)."""
  prec = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
  return TileMath(a.scale, a.softcap, sm_tf, pred_tf, a.S, a.S % plan.bk != 0, prec)


def cfg_flags(a: dense_lib.AttentionArgs, plan: Plan, pred_tf, sm_tf, splits: int, width):
  """Kernel configuration fields shared by the backends: which side inputs exist, how
  many constant inputs, and the padded widths (``width(size)``) of the score_mod
  arrays that get gradients.  Split programs leave the sink to the merge."""
  sm_sizes = [] if sm_tf is None else [int(np.prod(s, dtype=np.int64)) for s in sm_tf.shapes]
  n_grad = 0 if sm_tf is None else sm_tf.n_explicit
  return dict(has_bias=a.bias is not None,
              bias_b=a.bias is not None and a.bias.shape[0] > 1,
              has_dense=plan.dense is not None,
              dense_b=plan.dense is not None and plan.dense.shape[0] > 1,
              has_seg=plan.seg is not None, has_sinks=a.sinks is not None and splits == 1,
              n_pred=0 if pred_tf is None else len(pred_tf.shapes),
              n_sm=len(sm_sizes), n_sm_grad=n_grad,
              sm_widths=tuple(width(max(sz, 1)) for sz in sm_sizes[:n_grad]))


def side_inputs(plan: Plan, bias, seg, dense, place_bnts, place_qseg, place_kseg):
  """The bias (float32), dense mask (int32) and segment ids as kernel inputs.

  ``bias``/``dense`` are broadcast over the query heads to ``[X, N, T, S]`` and laid out
  by ``place_bnts``; the segment ids are padded to ``Tp``/``Sp`` with ``-1``/``-2`` (padded
  rows and keys never match) and laid out by ``place_qseg``/``place_kseg``.
  """
  a = plan.a
  N, T, S = a.N, a.T, a.S
  side = []
  if bias is not None:
    side.append(place_bnts(jnp.broadcast_to(bias.astype(_F32), (bias.shape[0], N, T, S))))
  if dense is not None:
    d = jnp.asarray(dense)
    side.append(place_bnts(jnp.broadcast_to(d, (d.shape[0], N, T, S)).astype(jnp.int32)))
  if seg is not None:
    qs, ks = seg
    side.append(place_qseg(jnp.pad(qs, ((0, 0), (0, plan.Tp - T)), constant_values=-1)))
    side.append(place_kseg(jnp.pad(ks, ((0, 0), (0, plan.Sp - S)), constant_values=-2)))
  return side


def backward_rows(out, lse, dout, dlse, valid, dtype):
  """Row statistics of the backward kernels: ``delta = rowsum(dO * O) - dlse`` and the
  inputs with padded rows (``valid`` false) neutralised: ``lse = +inf`` there and on rows
  with no allowed key (so ``p = 0``), ``dO = 0``, ``delta = 0``.  ``lse``, ``dlse`` and
  ``valid`` have ``out``'s shape without its last axis, or with it of size 1.
  Returns ``(delta, lse_b, dout_b, delta_b)``."""
  kd = lse.ndim == out.ndim
  delta = jnp.sum(dout.astype(_F32) * out.astype(_F32), axis=-1, keepdims=kd) - dlse
  lse_b = jnp.where(valid & jnp.isfinite(lse), lse, jnp.inf)
  dout_b = jnp.where(valid if kd else valid[..., None], dout, 0).astype(dtype)
  return delta, lse_b, dout_b, jnp.where(valid, delta, 0.0)


def finish_grads(args, dq, dk, dv, db, lse_bnt, delta_bnt, dcs):
  """The cotangents of ``core(q, k, v, bias, sinks, seg, pred_c, sm_c)`` from the
  kernels' outputs: ``db`` (``[Bb, N or 1, T, S]`` f32) summed over the bias's other
  broadcast axes, the sink gradient from ``lse``/``delta`` (``[B, N, T]``), score_mod
  array gradients ``dcs`` (flat, padded) reshaped, zeros (float0) for integer inputs."""
  q, k, v, bias, sinks, seg, pred_c, sm_c = args
  dbias = None
  if bias is not None:
    axes = tuple(ax for ax, dim in enumerate(bias.shape) if dim == 1)
    if axes:
      db = db.sum(axis=axes, keepdims=True)
    dbias = db.astype(bias.dtype)
  dsinks = None if sinks is None else sink_grads(sinks, lse_bnt, delta_bnt)
  dseg = None if seg is None else tuple(float0_like(x) for x in seg)
  dpred = [float0_like(jnp.asarray(c)) for c in pred_c]
  dsm = []
  for j, c in enumerate(sm_c):
    c = jnp.asarray(c)
    if j < len(dcs) and jnp.issubdtype(c.dtype, jnp.inexact):
      dsm.append(dcs[j][:c.size].reshape(c.shape).astype(c.dtype))
    else:
      dsm.append(float0_like(c))
  # Inside shard_map: an input that does not vary over a mesh axis the kernel outputs vary
  # over (a replicated table, bias or k/v) gets the sum of every device's gradient, once.
  grads = [dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias, dsinks]
  grads = [sum_to_vma(g, x) for g, x in zip(grads, (q, k, v, bias, sinks))]
  dsm = [sum_to_vma(g, c) for g, c in zip(dsm, sm_c)]
  return (*grads, dseg, dpred, dsm)


def hoist_tracers(tree):
  """Splits the traced leaves off ``tree`` (schedules or masks built from traced inputs),
  so they can enter a ``custom_vjp`` as arguments instead of being closed over (a
  closed-over tracer escapes its trace when the rule runs elsewhere, e.g. under
  ``shard_map``).  Returns ``(traced, restore)`` with ``restore(traced) == tree``."""
  leaves, treedef = jax.tree.flatten(tree)
  idx = [i for i, x in enumerate(leaves) if isinstance(x, jax.core.Tracer)]

  def restore(traced):
    new = list(leaves)
    for i, x in zip(idx, traced):
      new[i] = x
    return treedef.unflatten(new)
  return [leaves[i] for i in idx], restore


def flash_core(forward, backward):
  """The differentiable core ``core(q, k, v, bias, sinks, seg, pred_c, sm_c, aux) ->
  (out, lse)`` (kernel layouts) of a backend; ``aux``: the traced schedule arrays
  (:func:`hoist_tracers`), not differentiated.

  ``forward(*args, aux) -> (out, lse)``; ``backward(args, aux, out, lse, dout, dlse) ->
  (dq, dk, dv, db, lse_bnt, delta_bnt, dcs)`` in the public layouts (see
  :func:`finish_grads`).
  """

  @jax.custom_vjp
  def core(*args):
    return forward(*args)

  def core_fwd(*args):
    out, lse = forward(*args)
    return (out, lse), (args, out, lse)

  def core_bwd(res, cts):
    args, out, lse = res
    *args, aux = args
    grads = finish_grads(args, *backward(args, aux, out, lse, *cts))
    return (*grads, [float0_like(x) for x in aux])

  core.defvjp(core_fwd, core_bwd)
  return core


def traced_consts(tf: Optional[TracedFn]) -> list:
  """The arrays a traced predicate/score_mod reads (explicit first, then literals)."""
  return [] if tf is None else list(tf.explicit) + list(tf.literals)


def flash_attention_reference(q, k, v, **kwargs):
  """The float32 dense oracle (:func:`attnjax.reference_attention`)."""
  return dense_lib.reference_attention(q, k, v, **kwargs)


# =========================================================================== shard_map


def _varying_axes(x):
  mat = getattr(jax.typeof(x), "mat", None)
  return frozenset(getattr(mat, "varying", ()))


def pallas_call(kernel, *, out_shape, **kwargs):
  """``pl.pallas_call`` that also runs inside ``jax.shard_map`` (``check_vma=True``).

  There every array has a type saying over which manual mesh axes it varies, and a
  ``pallas_call``'s ``out_shape`` must say it for the outputs.  The kernel reads all
  its inputs, so the outputs vary over the union of the inputs' axes, and the inputs
  are marked varying over that union too (an aliased zeros buffer then matches its
  output).  Outside ``shard_map`` this is ``pl.pallas_call``.
  """
  def call(*args):
    axes = frozenset().union(*(_varying_axes(x) for x in jax.tree.leaves(args)))
    if axes:
      args = vary_like(args, *args)
    mat = jax.sharding.ManualAxisType(varying=axes)
    shapes = jax.tree.map(
        lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype, manual_axis_type=mat), out_shape)
    return pl.pallas_call(kernel, out_shape=shapes, **kwargs)(*args)
  return call
