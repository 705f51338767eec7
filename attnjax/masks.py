"""Composable attention masks with block tables (FlexAttention-style, JAX-native).

A :class:`Mask` wraps a vectorised predicate ``mask_fn(b, h, q_idx, kv_idx) -> bool``
(**True = attend**) that broadcasts over integer index arrays and works on both
NumPy and ``jax.numpy`` inputs.  Masks compose with ``&``, ``|`` and ``~``.

What the implementations need besides the predicate is the *block table*: for a
tiling of the ``[T, S]`` score matrix into ``block_q x block_k`` tiles, which tiles
are **empty** (skipped), **partial** (mask evaluated) or **full** (no mask work):

    >>> m = causal() & sliding_window(256)
    >>> m.block_table(1024, 1024, 128, 128)            # numpy int8 [1, 1, 8, 8]

Static masks (functions of indices only) build their tables with NumPy at trace
time; band-shaped masks (causal, sliding windows, chunks, prefix-LM) use an exact
``O(T * S / block_k)`` interval computation, other static masks an exact blocked
evaluation, and data-dependent masks (documents, arrays that are JAX values,
offsets that are traced) build their tables in-graph.  Tables are conservative
under composition: a tile is never classified empty or full unless it is.

Index conventions: ``q_idx`` in ``[0, T)``, ``kv_idx`` in ``[0, S)``; spatial
masks use row-major token order over a grid ``shape`` (``T == S == prod(shape)``).

Typed structure.  Every mask says what it is: ``kind`` (one of :data:`KINDS`),
``params`` (static constructor parameters), ``children`` (operands of ``&``, ``|``,
``~`` and ``shifted``) and ``arrays`` (segment ids, the block mask, the array of
:func:`from_array`, offsets given as JAX values).  Implementations read these, never
``name``, which is for display: ``from_fn(fn, name='causal(0)')`` is computed as ``fn``.

Pytrees.  A mask is a pytree whose leaves are its arrays (children's first), so
data-dependent masks cross ``jax.jit`` boundaries::

    >>> f = jax.jit(lambda m, q, k, v: attnjax.attention(q, k, v, mask=m))
    >>> f(causal(offset=jnp.int32(7)), q, k, v)       # a new offset value: no retrace

A :func:`from_fn` mask carries the user's function as static data: arrays its closure
captures are not leaves.  Pass data that must cross ``jit`` through :func:`from_array`,
:func:`document`, :func:`from_block_mask` or offsets.

Traced offsets.  ``causal(offset=o)``, ``sliding_window(..., offset=o)`` and
``mask.shifted(o_q, o_kv)`` accept integer JAX scalars (e.g. a traced KV-cache index).
Such masks (:attr:`Mask.scalar_data_only`) are never materialised: the Pallas kernels
read the offsets as scalar operands and evaluate the band in-kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "EMPTY", "PARTIAL", "FULL", "KINDS", "Mask", "full", "causal", "sliding_window", "chunked",
    "prefix_lm", "document", "dual_triangle", "neighborhood", "window", "grid", "axial",
    "criss_cross", "from_array", "from_fn", "from_block_mask", "as_mask", "halo", "stripe",
    "lengths", "tiled2d", "tiled_to_flat", "find_spatial_shape", "from_row_block_mask",
    "key_interval", "key_interval_arrays",
]

EMPTY, PARTIAL, FULL = 0, 1, 2

# A static table evaluated element-wise is done in row blocks of at most this many
# booleans; composites larger than _EXACT_LIMIT use table algebra instead.
_EVAL_CHUNK = 1 << 24
_EXACT_LIMIT = 1 << 28


def _is_jax(*xs) -> bool:
  return any(isinstance(x, (jax.Array, jax.core.Tracer)) for x in xs)


def _xp(*xs):
  return jnp if _is_jax(*xs) else np


@dataclasses.dataclass(frozen=True)
class _Ctx:
  num_heads: int = 1
  batch: int = 1


# --------------------------------------------------------------------------- Mask


KINDS = ("full", "causal", "sliding_window", "chunked", "prefix_lm", "dual_triangle",
         "document", "neighborhood", "window", "grid", "axial", "criss_cross", "array",
         "fn", "block_mask", "shifted", "and", "or", "not", "halo", "stripe", "lengths",
         "tiled2d", "row_block_mask", "key_interval")
"""The closed set of :attr:`Mask.kind` values (see the module docstring)."""

_COMPOSITE = ("and", "or", "not")
_BIG = 1 << 30


class Mask:
  """A boolean attention mask over ``(b, h, q_idx, kv_idx)``; True = attend.

  Do not construct directly: use the constructors of this module
  (:func:`causal`, :func:`neighborhood`, :func:`from_fn`, ...) and ``&``, ``|``, ``~``.

  A mask is a JAX pytree whose leaves are its arrays (those of its children first).

  Attributes:
    kind: what the mask is, one of :data:`KINDS` (``'causal'``, ``'block_mask'``,
      ``'and'``, ...).  Implementations decide how to treat a mask from ``kind``,
      ``params``, ``children`` and ``arrays``, never from ``name``.
    params: the static parameters of the constructor (a dict of ints, bools, tuples;
      for ``'fn'`` the user's function and name), e.g. ``{'block_q': 16, 'block_k': 16}``.
      A parameter passed as a JAX value (a traced offset) is in ``arrays`` instead.
    children: the operand masks of ``'and'``, ``'or'``, ``'not'`` and ``'shifted'``.
    arrays: a dict of the mask's own arrays (segment ids, the block mask, the array of
      :func:`from_array`, offsets given as JAX values), in constructor order.
    name: a readable description for display only, e.g.
      ``"(causal(0) & sliding_window(128, 0))"``.
  """

  def __init__(self, fn, name, *, kind, params=None, arrays=None, children=(), band=None,
               table=None, data_dependent=False, grid_size=None, head_dependent=False,
               check=None, parts=None, bounds=(False, False), axes=None):
    if kind not in KINDS:
      raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    self._fn = fn                  # (ctx, b, h, q, kv) -> bool (np or jnp)
    self._check = check            # (T, S, num_heads, batch) -> None (raises), or None
    self.name = name
    self.kind = kind
    self._params = tuple((params or {}).items())
    self._arrays = tuple((arrays or {}).items())
    self.children = tuple(children)
    self._band = band              # (ctx, q, xp) -> (lo, hi) inclusive, or None
    self._bounds = bounds          # (lo is unbounded below, hi unbounded above): static
    self._table = table            # custom in-graph table fn, or None
    self._data_dependent = bool(data_dependent)
    self._grid_size = grid_size    # T == S == grid_size required, or None
    self._head_dependent = head_dependent
    # Operands evaluated by table algebra ('and'/'or'/'not' and criss_cross).
    self._parts = tuple(children) if parts is None else tuple(parts)
    self._op = kind if kind in _COMPOSITE else ("or" if kind == "criss_cross" else None)
    # Separable grid masks: (ax, q_coord, kv_coord, xp) -> bool, the predicate is the AND
    # of it over the grid axes (static; gives the fast block tables of _separable_table).
    self._axes = axes
    self._cache = {}

  @property
  def params(self) -> dict:
    """The static constructor parameters (a fresh dict)."""
    return dict(self._params)

  @property
  def arrays(self) -> dict:
    """The mask's own arrays by name (a fresh dict; children's arrays not included)."""
    return dict(self._arrays)

  # ------------------------------------------------------------------ evaluation
  def __call__(self, b, h, q_idx, kv_idx, *, num_heads=1, batch=1):
    """Evaluates the predicate on broadcasting index arrays (np or jnp)."""
    return self._fn(_Ctx(int(num_heads), int(batch)), b, h, q_idx, kv_idx)

  def mask_fn(self, b, h, q_idx, kv_idx, *, num_heads=1, batch=1):
    """Alias of ``__call__``: the vectorised predicate ``(b, h, q, kv) -> bool``."""
    return self(b, h, q_idx, kv_idx, num_heads=num_heads, batch=batch)

  @property
  def data_dependent(self) -> bool:
    """True when the mask reads JAX arrays (segment ids, traced offsets, ...)."""
    if self._data_dependent:
      return True
    return any(c.data_dependent for c in self._parts)

  @property
  def head_dependent(self) -> bool:
    return self._head_dependent or any(c.head_dependent for c in self._parts)

  @property
  def scalar_data_only(self) -> bool:
    """True when every JAX value the mask reads is a scalar leaf (traced band
    offsets): its predicate runs in a kernel with the scalars as operands, and no
    ``[T, S]`` array is needed.  False for ``'fn'`` masks closing over JAX arrays."""
    if self.kind == "fn" and self._data_dependent:
      return False
    if any(np.size(x) != 1 for _, x in self._arrays):
      return False
    return all(c.scalar_data_only for c in self.children)

  @property
  def segment_ids(self):
    """``(q_segment_ids, kv_segment_ids)`` for a :func:`document` mask, else None."""
    if self.kind != "document":
      return None
    arrs = self.arrays
    return arrs["q_segment_ids"], arrs["kv_segment_ids"]

  def __repr__(self):
    return f"Mask({self.name})"

  # ------------------------------------------------------------------ composition
  def __and__(self, other):
    other = as_mask(other, "other")
    def fn(ctx, b, h, q, kv):
      return self._fn(ctx, b, h, q, kv) & other._fn(ctx, b, h, q, kv)
    return Mask(fn, f"({self.name} & {other.name})", kind="and", children=(self, other),
                grid_size=_merge_grid(self, other))

  def __or__(self, other):
    other = as_mask(other, "other")
    def fn(ctx, b, h, q, kv):
      return self._fn(ctx, b, h, q, kv) | other._fn(ctx, b, h, q, kv)
    return Mask(fn, f"({self.name} | {other.name})", kind="or", children=(self, other),
                grid_size=_merge_grid(self, other))

  def __invert__(self):
    def fn(ctx, b, h, q, kv):
      return ~self._fn(ctx, b, h, q, kv)
    return Mask(fn, f"~{self.name}", kind="not", children=(self,), grid_size=self._grid_size)

  def __rand__(self, other):
    return as_mask(other, "other") & self

  def __ror__(self, other):
    return as_mask(other, "other") | self

  def shifted(self, q_offset, kv_offset) -> "Mask":
    """The mask seen by a sub-block: evaluates at ``(q_idx + q_offset, kv_idx + kv_offset)``.

    Offsets may be Python ints or integer JAX scalars (traced in ring attention and
    decoding); JAX offsets are leaves of the mask (``arrays``) and make it
    data-dependent, and the Pallas kernels read them as scalar operands.  Grid-size
    checks are dropped, since the sub-block is smaller than the grid.
    """
    params, arrays = {}, {}
    for nm, off in (("q_offset", q_offset), ("kv_offset", kv_offset)):
      if _is_jax(off):
        _check_scalar(nm, off)
        arrays[nm] = off
      else:
        params[nm] = _check_int(nm, off, minimum=-(1 << 40))
    dyn = bool(arrays)
    def fn(ctx, b, h, q, kv):
      return self._fn(ctx, b, h, q + q_offset, kv + kv_offset)
    return Mask(fn, f"{self.name}.shifted", kind="shifted", params=params, arrays=arrays,
                children=(self,), data_dependent=dyn, head_dependent=self.head_dependent,
                parts=())

  # ------------------------------------------------------------------ validation
  def check_shape(self, T: int, S: int, num_heads: Optional[int] = None,
                  batch: Optional[int] = None) -> None:
    """Raises ``ValueError`` if this mask cannot be applied to a ``[batch, num_heads,
    T, S]`` score array (grid sizes, array operands; ``None`` skips that check)."""
    g = self._grid_size
    if g is not None and (T != g or S != g):
      raise ValueError(
          f"mask {self.name} is defined on a grid of {g} tokens; it needs "
          f"T == S == {g}, got T={T}, S={S}")
    if self._check is not None:
      self._check(T, S, num_heads, batch)
    for c in self._parts:
      c.check_shape(T, S, num_heads, batch)

  # ------------------------------------------------------------------ materialise
  def to_array(self, T: int, S: int, num_heads: int = 1, batch: int = 1):
    """The boolean mask ``[batch, num_heads, T, S]`` (NumPy if static, else JAX)."""
    self.check_shape(T, S, None if num_heads == 1 else num_heads, None if batch == 1 else batch)
    b, h, q, kv = _index_grids(batch, num_heads, np.arange(T), np.arange(S))
    out = self(b, h, q, kv, num_heads=num_heads, batch=batch)
    xp = _xp(out)
    return xp.broadcast_to(out, (batch, num_heads, T, S))

  def block_table(self, T: int, S: int, block_q: int, block_k: int, *,
                  num_heads: int = 1, batch: int = 1):
    """Classifies each ``block_q x block_k`` tile as EMPTY (0), PARTIAL (1) or FULL (2).

    Only in-range positions (``q < T``, ``kv < S``) count; the last row/column of
    tiles may be ragged.

    Returns:
      int8 array ``[B', N', ceil(T/block_q), ceil(S/block_k)]`` where ``B'`` is 1 or
      ``batch`` and ``N'`` is 1 or ``num_heads`` (1 when the mask does not depend on
      them).  NumPy for static masks, a JAX array for data-dependent ones.
    """
    for name, val in (("T", T), ("S", S), ("block_q", block_q), ("block_k", block_k),
                      ("num_heads", num_heads), ("batch", batch)):
      if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val <= 0:
        raise ValueError(f"{name} must be a positive int, got {val!r}")
    self.check_shape(T, S, None if num_heads == 1 else num_heads, None if batch == 1 else batch)
    ctx = _Ctx(int(num_heads), int(batch))
    key = (T, S, block_q, block_k, num_heads, batch)
    if not self.data_dependent and key in self._cache:
      return self._cache[key]
    table = self._block_table(ctx, T, S, block_q, block_k)
    if not self.data_dependent:
      table = np.asarray(table, np.int8)
      table.setflags(write=False)
      self._cache[key] = table
    return table

  def row_band(self, T: int, S: int):
    """Per-query key ranges when this mask is a band, else ``None``.

    A band mask allows exactly ``lo[t] <= kv_idx <= hi[t]`` for every query ``t``.
    Bands are recognised by structure: ``full``, ``causal``, ``sliding_window``,
    ``chunked``, ``prefix_lm``; ``shifted`` views of bands; ``&`` of bands; ``~`` of a
    band that is one-sided on every row (``~causal(o)`` is ``[q + o + 1, S - 1]``);
    ``|`` of two bands whose union is an interval on every row (checked row by row
    for static masks; a ``|`` with traced offsets is not classified as a band).
    Returns int32 ``(lo, hi)`` of shape ``[T]``, clipped to ``[-1, S]`` (``lo > hi``
    means the row attends to nothing); NumPy for static masks, JAX arrays when
    offsets are traced.
    """
    self.check_shape(T, S)
    if self.head_dependent:
      return None
    xp = jnp if self.data_dependent else np
    got = self._band_at(_Ctx(1, 1), xp.arange(T), 0, S - 1, xp)
    if got is None:
      return None
    lo, hi = got[0], got[1]
    xp = _xp(lo, hi)
    lo, hi = (xp.clip(xp.broadcast_to(x, (T,)), -1, S).astype(np.int32) for x in (lo, hi))
    return lo, hi

  def _band_at(self, ctx, q, k0, k1, xp):
    """``(lo, hi, lo_open, hi_open)`` on rows ``q`` for keys ``[k0, k1]``: the allowed
    keys ``lo <= kv <= hi``, clipped to ``[k0 - 1, k1 + 1]`` (``lo > hi``: none); the
    flags say (statically) that ``lo <= k0`` / ``hi >= k1`` on every row.  None when
    the mask is not a band."""
    if self.head_dependent:
      return None
    if self._band is not None:
      lo, hi = self._band(ctx, q, xp)
      xq = _xp(lo, hi, q, k0, k1)
      lo = xq.clip(xq.broadcast_to(lo, xq.shape(q)), k0 - 1, k1 + 1)
      hi = xq.clip(xq.broadcast_to(hi, xq.shape(q)), k0 - 1, k1 + 1)
      return lo, hi, self._bounds[0], self._bounds[1]
    if self.kind == "shifted":
      (c,) = self.children
      qo = self.arrays.get("q_offset", self.params.get("q_offset"))
      ko = self.arrays.get("kv_offset", self.params.get("kv_offset"))
      got = c._band_at(ctx, q + qo, k0 + ko, k1 + ko, xp)
      if got is None:
        return None
      lo, hi, lo_open, hi_open = got
      return lo - ko, hi - ko, lo_open, hi_open
    bands = [c._band_at(ctx, q, k0, k1, xp) for c in self.children]
    if not bands or any(b is None for b in bands):
      return None
    if self.kind == "and":
      (lo1, hi1, a1, b1), (lo2, hi2, a2, b2) = bands
      xq = _xp(lo1, hi1, lo2, hi2)
      return xq.maximum(lo1, lo2), xq.minimum(hi1, hi2), a1 and a2, b1 and b2
    if self.kind == "not":
      ((lo, hi, lo_open, hi_open),) = bands
      xq = _xp(lo, hi)
      static = xq is np
      left_ok = lo_open or (static and bool(np.all((lo <= k0) | (lo > hi))))
      right_ok = hi_open or (static and bool(np.all((hi >= k1) | (lo > hi))))
      empty = lo > hi
      if left_ok:      # allowed [k0, hi] -> complement [hi + 1, k1]
        nlo = xq.where(empty, k0, hi + 1)
        return nlo, xq.full_like(hi, k1), False, True
      if right_ok:     # allowed [lo, k1] -> complement [k0, lo - 1]
        nhi = xq.where(empty, k1, lo - 1)
        return xq.full_like(lo, k0), nhi, True, False
      return None
    if self.kind == "or":
      (lo1, hi1, a1, b1), (lo2, hi2, a2, b2) = bands
      xq = _xp(lo1, hi1, lo2, hi2)
      if xq is not np:
        return None
      e1, e2 = lo1 > hi1, lo2 > hi2
      touching = np.maximum(lo1, lo2) <= np.minimum(hi1, hi2) + 1
      if not np.all(e1 | e2 | touching):
        return None
      lo = np.where(e1, lo2, np.where(e2, lo1, np.minimum(lo1, lo2)))
      hi = np.where(e1, hi2, np.where(e2, hi1, np.maximum(hi1, hi2)))
      return lo, hi, bool(np.all(lo <= k0)), bool(np.all(hi >= k1))
    return None

  def _block_table(self, ctx, T, S, bq, bk):
    if self._table is not None:
      return self._table(ctx, T, S, bq, bk)
    if self._band is not None and not self.head_dependent:
      xp = jnp if self.data_dependent else np
      return _band_table(self._band, ctx, T, S, bq, bk, xp)
    if self.kind == "shifted" and not self.head_dependent:
      got = self._band_fn()
      if got is not None:
        return _band_table(got, ctx, T, S, bq, bk, jnp if self.data_dependent else np)
    if not self.data_dependent and not self.head_dependent:
      fast = _separable_table(self, T, S, bq, bk)
      if fast is not None:
        return fast
    if self._op is not None and (self.data_dependent or
                                 T * S * ctx.num_heads * ctx.batch > _EXACT_LIMIT):
      tabs = [c._block_table(ctx, T, S, bq, bk) for c in self._parts]
      return _table_algebra(self._op, tabs)
    return _eval_table(self, ctx, T, S, bq, bk)

  def _band_fn(self):
    """``band(ctx, q, xp) -> (lo, hi)`` for band leaves and shifted / ``&`` of them."""
    if self.head_dependent:
      return None
    if self._band is not None:
      return self._band
    if self.kind == "shifted":
      inner = self.children[0]._band_fn()
      if inner is None:
        return None
      qo = self.arrays.get("q_offset", self.params.get("q_offset"))
      ko = self.arrays.get("kv_offset", self.params.get("kv_offset"))
      def band(ctx, q, xp):
        lo, hi = inner(ctx, q + qo, xp)
        return lo - ko, hi - ko
      return band
    if self.kind == "and":
      fa, fb = (c._band_fn() for c in self.children)
      if fa is None or fb is None:
        return None
      def band(ctx, q, xp):
        (l1, h1), (l2, h2) = fa(ctx, q, xp), fb(ctx, q, xp)
        xq = _xp(l1, h1, l2, h2)
        return xq.maximum(l1, l2), xq.minimum(h1, h2)
      return band
    return None


# ------------------------------------------------------------------ pytree


def _flatten(m: Mask):
  arr_names = tuple(k for k, _ in m._arrays)
  leaves = list(m.children) + [v for _, v in m._arrays]
  aux = (m.kind, m._params, len(m.children), arr_names, m.name)
  return leaves, aux


def _unflatten(aux, leaves):
  kind, params_t, n_children, arr_names, name = aux
  params = dict(params_t)
  children = list(leaves[:n_children])
  arrays = dict(zip(arr_names, leaves[n_children:]))
  try:
    m = _rebuild(kind, params, children, arrays)
  except (TypeError, ValueError, AttributeError, IndexError):
    # Leaves that are not arrays (e.g. tree_util sentinels, shapes): keep the structure
    # only; such a mask cannot be evaluated.
    m = Mask(_unevaluable, name, kind=kind, params=params, arrays=arrays,
             children=[c for c in children if isinstance(c, Mask)])
  m.name = name
  return m


def _unevaluable(ctx, b, h, q, kv):
  raise TypeError("this Mask was rebuilt from pytree leaves that are not arrays")


def _rebuild(kind, p, ch, arr):
  both = {**p, **arr}
  if kind == "full":
    return full()
  if kind == "causal":
    return causal(both["offset"])
  if kind == "sliding_window":
    return sliding_window(p["left"], p["right"], offset=both["offset"])
  if kind == "chunked":
    return chunked(p["size"])
  if kind == "prefix_lm":
    return prefix_lm(p["prefix_len"])
  if kind == "dual_triangle":
    return dual_triangle()
  if kind == "document":
    return document(arr["q_segment_ids"], arr["kv_segment_ids"])
  if kind == "lengths":
    return lengths(arr.get("q_lengths"), arr.get("kv_lengths"))
  if kind == "row_block_mask":
    return from_row_block_mask(arr["row_block_mask"], p["block_k"])
  if kind == "key_interval":
    return key_interval(arr["start"], arr["end"])
  if kind == "tiled2d":
    if not isinstance(ch[0], Mask):
      raise TypeError("not a mask")
    return tiled2d(ch[0], p["tile"], shape=p["shape"], offset=p["offset"],
                   dilation=p.get("dilation", 1))
  if kind == "neighborhood":
    return neighborhood(p["shape"], p["kernel"], p["dilation"], p["causal"])
  if kind == "window":
    return window(p["shape"], p["window"], p["shift"])
  if kind == "grid":
    return grid(p["shape"], p["grid"])
  if kind == "axial":
    return axial(p["shape"], p["axis"])
  if kind == "criss_cross":
    return criss_cross(p["shape"])
  if kind == "halo":
    return halo(p["shape"], p["block"], p["halo"])
  if kind == "stripe":
    return stripe(p["shape"], p["width"], p["axis"])
  if kind == "array":
    return from_array(arr["array"])
  if kind == "fn":
    return from_fn(p["fn"], p["name"])
  if kind == "block_mask":
    return from_block_mask(arr["block_mask"], p["block_q"], p["block_k"])
  if kind == "shifted":
    if not isinstance(ch[0], Mask):
      raise TypeError("not a mask")
    return ch[0].shifted(both["q_offset"], both["kv_offset"])
  if kind == "and":
    return ch[0] & ch[1]
  if kind == "or":
    return ch[0] | ch[1]
  if kind == "not":
    if not isinstance(ch[0], Mask):
      raise TypeError("not a mask")
    return ~ch[0]
  raise ValueError(f"unknown mask kind {kind!r}")


jax.tree_util.register_pytree_node(Mask, _flatten, _unflatten)


def _check_scalar(name, x):
  if np.ndim(x) != 0 or not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must be an int or an integer JAX scalar, got "
                    f"{getattr(x, 'dtype', type(x).__name__)}{list(np.shape(x))}")


def _check_lead(what, shape, Bm, Nm, num_heads, batch):
  if batch is not None and Bm not in (1, batch):
    raise ValueError(f"{what} of shape {shape} has batch dim {Bm}; the call needs 1 or B={batch}")
  if num_heads is not None and Nm not in (1, num_heads):
    raise ValueError(f"{what} of shape {shape} has head dim {Nm}; the call needs 1 or "
                     f"N={num_heads}")


def _merge_grid(a: Mask, b: Mask):
  ga, gb = a._grid_size, b._grid_size
  if ga is not None and gb is not None and ga != gb:
    raise ValueError(f"cannot combine masks on grids of {ga} and {gb} tokens")
  return ga if ga is not None else gb


def _index_grids(batch, num_heads, q, kv):
  b = np.arange(batch).reshape(-1, 1, 1, 1)
  h = np.arange(num_heads).reshape(1, -1, 1, 1)
  xp = _xp(q, kv)
  return b, h, xp.reshape(q, (1, 1, -1, 1)), xp.reshape(kv, (1, 1, 1, -1))


def _table_algebra(op, tabs):
  xp = _xp(*tabs)
  if op == "not":
    (a,) = tabs
    return (FULL - a).astype(xp.int8)
  a, b = tabs
  shape = np.broadcast_shapes(a.shape, b.shape)
  a, b = xp.broadcast_to(a, shape), xp.broadcast_to(b, shape)
  if op == "and":
    out = xp.where((a == EMPTY) | (b == EMPTY), EMPTY,
                   xp.where((a == FULL) & (b == FULL), FULL, PARTIAL))
  else:
    out = xp.where((a == FULL) | (b == FULL), FULL,
                   xp.where((a == EMPTY) & (b == EMPTY), EMPTY, PARTIAL))
  return out.astype(xp.int8)


def _classify(any_, all_, xp):
  return xp.where(all_, FULL, xp.where(any_, PARTIAL, EMPTY)).astype(xp.int8)


def _band_table(band, ctx, T, S, bq, bk, xp):
  """Exact table for masks ``lo(q) <= kv <= hi(q)`` (any lo/hi, per row)."""
  nq, nk = -(-T // bq), -(-S // bk)
  q = np.arange(nq * bq)
  lo, hi = band(ctx, xp.asarray(q), xp)
  lo = xp.broadcast_to(lo, q.shape)
  hi = xp.broadcast_to(hi, q.shape)
  valid = q < T
  k0 = np.arange(nk) * bk
  k1 = np.minimum(k0 + bk, S) - 1
  lo_, hi_ = lo[:, None], hi[:, None]
  inter = (lo_ <= k1[None]) & (hi_ >= k0[None]) & (lo_ <= hi_)
  cover = (lo_ <= k0[None]) & (hi_ >= k1[None])
  inter = inter & valid[:, None]
  cover = cover | ~valid[:, None]
  any_ = inter.reshape(nq, bq, nk).any(axis=1)
  all_ = cover.reshape(nq, bq, nk).all(axis=1)
  return _classify(any_, all_, xp)[None, None]


def _separable_form(mask: Mask):
  """``(shape, order, leaves, expr)`` when ``mask`` is an ``&``/``|``/``~`` formula
  (``expr``: nested tuples over leaf numbers) of separable grid masks on one ``shape``,
  seen in the token order ``order`` (grid index of each position; None = row-major,
  else a :func:`tiled2d` order); None otherwise."""
  if mask.data_dependent or mask.head_dependent:
    return None
  if mask._axes is not None:
    return mask.params["shape"], None, [mask], ("leaf", 0)
  if mask.kind == "tiled2d":
    inner = _separable_form(mask.children[0])
    p = mask.params
    if inner is None or tuple(inner[0]) != tuple(p["shape"]):
      return None
    n = int(np.prod(p["shape"]))
    order = np.asarray(tiled_to_flat(np.arange(n), p["shape"], p["tile"], p["offset"],
                                     p["dilation"]))
    if inner[1] is not None:
      order = inner[1][order]
    return inner[0], order, inner[2], inner[3]
  if mask._op is None:
    return None
  forms = [_separable_form(c) for c in mask._parts]
  if any(f is None or f[1] is not None for f in forms) or len({f[0] for f in forms}) != 1:
    return None
  leaves, exprs = [], []
  for f in forms:
    exprs.append(_renumber(f[3], len(leaves)))
    leaves += f[2]
  return forms[0][0], None, leaves, (mask._op, *exprs)


def _renumber(expr, offset):
  if expr[0] == "leaf":
    return ("leaf", expr[1] + offset)
  return (expr[0],) + tuple(_renumber(e, offset) for e in expr[1:])


def _eval_expr(expr, vals):
  op = expr[0]
  if op == "leaf":
    return vals[expr[1]]
  args = [_eval_expr(e, vals) for e in expr[1:]]
  if op == "not":
    return ~args[0]
  return (args[0] & args[1]) if op == "and" else (args[0] | args[1])


def _segments(order, block, W):
  """Maximal runs of positions in one tile whose grid indices are consecutive on one
  grid row: ``(first segment of each tile, row index of the leading coordinates, x0, x1)``."""
  n = order.shape[0]
  pos = np.arange(n)
  brk = np.ones(n, bool)
  brk[1:] = (pos[1:] % block == 0) | (order[1:] != order[:-1] + 1) | (order[1:] % W == 0)
  starts = np.flatnonzero(brk)
  ends = np.append(starts[1:], n)
  g = order[starts]
  first = np.flatnonzero(np.diff(starts // block, prepend=-1))
  return first, g // W, g % W, g % W + (ends - starts)


def _relabel_dilated(shape, order, mats, dilation):
  """``(order, mats)`` with each axis's coordinates relabelled ``c -> (c mod d) * (L / d)
  + c // d`` (``d`` that axis's dilation): positions ``d`` apart become adjacent."""
  coords = list(np.unravel_index(order, shape))
  new_mats = [list(per) for per in mats]
  for ax, (L, d) in enumerate(zip(shape, dilation)):
    if d == 1:
      continue
    c = np.arange(L)
    lab = (c % d) * (L // d) + c // d              # old coordinate -> new label
    inv = np.argsort(lab)                           # new label -> old coordinate
    coords[ax] = lab[coords[ax]]
    for per in new_mats:
      per[ax] = per[ax][inv][:, inv]
  return np.ravel_multi_index(coords, shape), new_mats


def _runs_last(shape, order, mats, bq, bk):
  """``(shape, order, mats)`` with the grid axes permuted so that the last axis is the
  one along which ``order`` has the fewest segments (:func:`_segments`) for tiles of
  ``bq`` and ``bk``; the input unchanged when that is already the last axis."""
  coords = np.unravel_index(order, shape)
  best = None
  for r in range(len(shape)):
    perm = [a for a in range(len(shape)) if a != r] + [r]
    pshape = tuple(shape[a] for a in perm)
    porder = np.ravel_multi_index([coords[a] for a in perm], pshape)
    count = sum(len(_segments(porder, b, pshape[-1])[1]) for b in (bq, bk))
    if best is None or count < best[0] or (count == best[0] and r == len(shape) - 1):
      best = (count, perm, pshape, porder)
  _, perm, pshape, porder = best
  if perm[-1] == len(shape) - 1:
    return shape, order, mats
  return pshape, porder, [[per[a] for a in perm] for per in mats]


def _struct_key(mask: Mask):
  return (mask.kind, mask._params, tuple(_struct_key(c) for c in mask.children))


_PAIR_CHUNK = 1 << 22
_TABLE_CACHE: dict = {}   # (structure, T, S, bq, bk) -> table; separable masks only


def _separable_table(mask: Mask, T, S, bq, bk):
  """Exact block table of a formula of separable grid masks (see :func:`_separable_form`),
  without evaluating the ``T x S`` predicate.

  Every tile is cut into segments (runs of one grid row, consecutive in both orders).
  On a pair of segments the leading grid coordinates are fixed, so each leaf is either
  off on the whole pair or equal to its last-axis matrix ``A[x_q, x_kv]``: the pair's
  class (empty / partial / full) depends only on the leaves' on/off pattern (looked up
  for each pair of leading-coordinate rows) and the two ``x`` ranges, and is read from a
  table built with 2D prefix sums of the formula's last-axis matrix per pattern.  A tile
  pair is FULL when all its segment pairs are, EMPTY when all are, else PARTIAL.  Cost
  ``O(segments_q * segments_kv)`` small-int lookups instead of ``O(T * S)`` predicate
  evaluations; results are cached by the mask's structure.  None when not applicable.
  """
  form = _separable_form(mask)
  if form is None:
    return None
  shape, order, leaves, expr = form
  n = int(np.prod(shape))
  if T != n or S != n or len(leaves) > 6:
    return None
  key = (_struct_key(mask), T, S, bq, bk)
  if key in _TABLE_CACHE:
    return _TABLE_CACHE[key]
  order = np.arange(n) if order is None else order
  mats = []
  for leaf in leaves:
    per = []
    for ax, L in enumerate(shape):
      i = np.arange(L)
      a = leaf._axes(ax, i[:, None], i[None, :], np)
      per.append(np.ones((L, L), bool) if a is None else np.asarray(a, bool))
    mats.append(per)
  # A dilated tiled2d order steps by d along an axis: relabel that axis's coordinates
  # c -> (c mod d) * (L / d) + c // d (and its matrices alike; the table is unchanged), so
  # its runs are consecutive.
  dil = mask.params.get("dilation") if mask.kind == "tiled2d" else None
  if dil is not None and any(d > 1 for d in dil):
    order, mats = _relabel_dilated(tuple(shape), order, mats, dil)
  # Segments run along one grid axis: the last, or the axis whose runs are longest in
  # this order (a (P, 1) strip order runs down columns); the problem is solved with that
  # axis moved last.
  shape, order, mats = _runs_last(tuple(shape), order, mats, bq, bk)
  W, lead = shape[-1], shape[:-1]
  nl = len(leaves)
  zero = np.zeros((W, W), bool)
  last = np.stack([_eval_expr(expr, [mats[j][-1] if (c >> j) & 1 else zero for j in range(nl)])
                   for c in range(1 << nl)])
  pre = np.zeros((1 << nl, W + 1, W + 1), np.int64)
  pre[:, 1:, 1:] = last.cumsum(1).cumsum(2)
  qf, qrow, qx0, qx1 = _segments(order, bq, W)
  kf, krow, kx0, kx1 = _segments(order, bk, W)
  # leaves' on/off pattern for each pair of (unique) leading-coordinate rows
  uq, qinv = np.unique(qrow, return_inverse=True)
  uk, kinv = np.unique(krow, return_inverse=True)
  qc = np.unravel_index(uq, lead) if lead else ()
  kc = np.unravel_index(uk, lead) if lead else ()
  code = np.zeros((len(uq), len(uk)), np.int8)
  for j in range(nl):
    on = np.ones(code.shape, bool)
    for ax in range(len(lead)):
      on &= mats[j][ax][qc[ax][:, None], kc[ax][None, :]]
    code |= on.astype(np.int8) << j
  # class of each (pattern, q x-range, kv x-range)
  qr, qrinv = np.unique(np.stack([qx0, qx1], 1), axis=0, return_inverse=True)
  kr, krinv = np.unique(np.stack([kx0, kx1], 1), axis=0, return_inverse=True)
  qrinv, krinv = qrinv.reshape(-1), krinv.reshape(-1)
  x0, x1 = qr[:, 0][None, :, None], qr[:, 1][None, :, None]
  y0, y1 = kr[:, 0][None, None, :], kr[:, 1][None, None, :]
  c = np.arange(1 << nl)[:, None, None]
  cnt = pre[c, x1, y1] - pre[c, x0, y1] - pre[c, x1, y0] + pre[c, x0, y0]
  state = _classify(cnt > 0, cnt == (x1 - x0) * (y1 - y0), np)
  rows_per = max(1, _PAIR_CHUNK // len(krow))
  lo_rows, hi_rows = [], []
  for a in range(0, len(qrow), rows_per):
    sl = slice(a, a + rows_per)
    st = state[code[qinv[sl]][:, kinv], qrinv[sl, None], krinv[None, :]]
    lo_rows.append(np.minimum.reduceat(st, kf, axis=1))
    hi_rows.append(np.maximum.reduceat(st, kf, axis=1))
  lo = np.minimum.reduceat(np.concatenate(lo_rows), qf, axis=0)
  hi = np.maximum.reduceat(np.concatenate(hi_rows), qf, axis=0)
  table = _classify(hi > EMPTY, lo == FULL, np)[None, None]
  if len(_TABLE_CACHE) >= 64:
    _TABLE_CACHE.pop(next(iter(_TABLE_CACHE)))
  _TABLE_CACHE[key] = table
  return table


def _eval_table(mask: Mask, ctx, T, S, bq, bk):
  """Exact table by evaluating the predicate in row blocks (NumPy or in-graph)."""
  nq, nk = -(-T // bq), -(-S // bk)
  Sp = nk * bk
  kv = np.arange(Sp)
  rows_per = max(1, _EVAL_CHUNK // max(1, Sp * ctx.num_heads * ctx.batch * bq))
  b = np.arange(ctx.batch).reshape(-1, 1, 1, 1)
  h = np.arange(ctx.num_heads).reshape(1, -1, 1, 1)
  kvv = (kv < S).reshape(1, 1, 1, Sp)

  def tile_rows(i0, n):
    q = np.arange(i0 * bq, (i0 + n) * bq)
    m = mask._fn(ctx, b, h, q.reshape(1, 1, -1, 1), kv.reshape(1, 1, 1, Sp))
    xp = _xp(m)
    m = xp.asarray(m, bool)
    qv = (q < T).reshape(1, 1, -1, 1)
    valid = qv & kvv
    any_m = m & valid
    all_m = m | ~valid
    B_, N_ = any_m.shape[0], any_m.shape[1]
    shape = (B_, N_, n, bq, nk, bk)
    any_ = xp.broadcast_to(any_m, (B_, N_, n * bq, Sp)).reshape(shape).any(axis=(3, 5))
    all_ = xp.broadcast_to(all_m, (B_, N_, n * bq, Sp)).reshape(shape).all(axis=(3, 5))
    return _classify(any_, all_, xp)

  parts = [tile_rows(i, min(rows_per, nq - i)) for i in range(0, nq, rows_per)]
  xp = _xp(*parts)
  shapes = [p.shape[:2] for p in parts]
  lead = (max(s[0] for s in shapes), max(s[1] for s in shapes))
  parts = [xp.broadcast_to(p, lead + p.shape[2:]) for p in parts]
  return xp.concatenate(parts, axis=2)


# ------------------------------------------------------------------ basic masks


def _check_int(name, value, *, minimum=0):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return int(value)


def full() -> Mask:
  """Every query attends to every key."""
  def fn(ctx, b, h, q, kv):
    xp = _xp(q, kv)
    return xp.ones(np.broadcast_shapes(xp.shape(q), xp.shape(kv)), bool)
  def band(ctx, q, xp):
    return xp.full_like(q, -(1 << 30)), xp.full_like(q, 1 << 30)
  return Mask(fn, "full", kind="full", band=band, bounds=(True, True))


def _offset_param(name, offset):
  """``(params, arrays)`` for an offset: a Python int is a static parameter, an
  integer JAX scalar (possibly traced) an array leaf."""
  if _is_jax(offset):
    _check_scalar(name, offset)
    return {}, {name: offset}
  return {name: _check_int(name, offset, minimum=-(1 << 40))}, {}


def causal(offset: int = 0) -> Mask:
  """Causal mask ``kv_idx <= q_idx + offset``.

  ``offset = S - T`` aligns the last query with the last key (decoding with a cache).
  ``offset`` may be an integer JAX scalar (e.g. a traced cache index): it is then a
  leaf of the mask, and the Pallas kernels read it as a scalar operand.
  """
  params, arrays = _offset_param("offset", offset)
  offset = params.get("offset", arrays.get("offset"))
  def fn(ctx, b, h, q, kv):
    return kv <= q + offset
  def band(ctx, q, xp):
    return xp.full_like(q, -_BIG), q + offset
  shown = offset if params else "traced"
  return Mask(fn, f"causal({shown})", kind="causal", params=params, arrays=arrays,
              band=band, data_dependent=bool(arrays), bounds=(True, False))


def sliding_window(left: int, right: int = 0, *, offset: int = 0) -> Mask:
  """Local band ``c - left <= kv_idx <= c + right`` around ``c = q_idx + offset``.

  One-sided by default: ``sliding_window(w)`` is the causal window ``i - w <= j <= i``
  (``w + 1`` keys, the query's own included), so it needs no ``& causal()``. This differs
  from ``local_window_size=w`` in ``jax.nn.dot_product_attention`` and tokamax, which is
  symmetric, ``(w, w)``: ``i - w <= j <= i + w``. That is ``sliding_window(w, w)``, and
  ``local_window_size=(l, r)`` is ``sliding_window(l, r)``. FlexAttention's usual
  ``(q_idx >= kv_idx) & (q_idx - kv_idx <= w)`` is ``sliding_window(w)``.
  See docs/porting.md.

  Args:
    left: keys to the left of the query that are visible (>= 0).
    right: keys to the right that are visible (>= 0; default 0, a causal window).
    offset: shift of the window centre (an int, or an integer JAX scalar such as a
      traced cache index, read by the Pallas kernels as a scalar operand).
  """
  left = _check_int("left", left)
  right = _check_int("right", right)
  params, arrays = _offset_param("offset", offset)
  offset = params.get("offset", arrays.get("offset"))
  params = {"left": left, "right": right, **params}
  def fn(ctx, b, h, q, kv):
    c = q + offset
    return (kv >= c - left) & (kv <= c + right)
  def band(ctx, q, xp):
    return q + offset - left, q + offset + right
  if arrays:
    name = f"sliding_window({left}, {right}, offset=traced)"
  elif offset:
    name = f"sliding_window({left}, {right}, offset={offset})"
  else:
    name = f"sliding_window({left}, {right})"
  return Mask(fn, name, kind="sliding_window", params=params, arrays=arrays, band=band,
              data_dependent=bool(arrays))


def chunked(size: int) -> Mask:
  """Block-diagonal mask: ``q_idx // size == kv_idx // size``.

  ``chunked(c) & causal()`` is chunked-causal attention (Llama-4 style local chunks).
  """
  size = _check_int("size", size, minimum=1)
  def fn(ctx, b, h, q, kv):
    return (q // size) == (kv // size)
  def band(ctx, q, xp):
    lo = (q // size) * size
    return lo, lo + size - 1
  return Mask(fn, f"chunked({size})", kind="chunked", params={"size": size}, band=band)


def prefix_lm(prefix_len: int) -> Mask:
  """Prefix-LM: ``kv_idx < prefix_len or kv_idx <= q_idx`` (bidirectional prefix)."""
  prefix_len = _check_int("prefix_len", prefix_len)
  def fn(ctx, b, h, q, kv):
    return (kv < prefix_len) | (kv <= q)
  def band(ctx, q, xp):
    return xp.zeros_like(q), xp.maximum(q, prefix_len - 1)
  return Mask(fn, f"prefix_lm({prefix_len})", kind="prefix_lm",
              params={"prefix_len": prefix_len}, band=band)


def dual_triangle() -> Mask:
  """Dual Triangle Attention head split: heads ``h < N/2`` see ``kv <= q`` (past and
  self), heads ``h >= N/2`` see ``kv >= q`` (future and self); ``N`` is taken from the
  call.  Paper: "Dual Triangle Attention: Effective Bidirectional Attention Without
  Positional Embeddings".
  """
  def fn(ctx, b, h, q, kv):
    first = 2 * h < ctx.num_heads
    return (first & (kv <= q)) | (~first & (kv >= q))
  return Mask(fn, "dual_triangle", kind="dual_triangle", head_dependent=True)


def document(q_segment_ids, kv_segment_ids=None) -> Mask:
  """Packed documents: tokens attend only within equal segment ids.

  Args:
    q_segment_ids: int ``[B, T]``.
    kv_segment_ids: int ``[B, S]``; defaults to ``q_segment_ids``.
  """
  if kv_segment_ids is None:
    kv_segment_ids = q_segment_ids
  qs, ks = q_segment_ids, kv_segment_ids
  for name, a in (("q_segment_ids", qs), ("kv_segment_ids", ks)):
    if not hasattr(a, "ndim") or a.ndim != 2:
      raise ValueError(f"{name} must be a [B, length] integer array, got "
                       f"{getattr(a, 'shape', type(a).__name__)}")
    if not jnp.issubdtype(a.dtype, jnp.integer):
      raise TypeError(f"{name} must have an integer dtype, got {a.dtype}")
  if qs.shape[0] != ks.shape[0]:
    raise ValueError(f"q_segment_ids batch {qs.shape[0]} != kv_segment_ids batch {ks.shape[0]}")
  T, S = qs.shape[1], ks.shape[1]
  dyn = _is_jax(qs, ks)

  def fn(ctx, b, h, q, kv):
    xp = _xp(qs, ks, q, kv)
    return xp.asarray(qs)[b, xp.clip(q, 0, T - 1)] == xp.asarray(ks)[b, xp.clip(kv, 0, S - 1)]

  def check(T_, S_, num_heads, batch):
    if T_ != T or S_ != S:
      raise ValueError(f"document mask built for T={T}, S={S}; called with T={T_}, S={S_}")
    if batch is not None and batch != qs.shape[0]:
      raise ValueError(f"document mask: segment ids have batch {qs.shape[0]}; the call has "
                       f"B={batch}")

  def table(ctx, T_, S_, bq, bk):
    check(T_, S_, None, None)
    xp = jnp if dyn else np
    nq, nk = -(-T // bq), -(-S // bk)
    def minmax(a, n, blk):
      big = np.iinfo(np.int32).max
      a = xp.asarray(a).astype(xp.int32)
      pad = n * blk - a.shape[1]
      lo = xp.pad(a, ((0, 0), (0, pad)), constant_values=big).reshape(a.shape[0], n, blk)
      hi = xp.pad(a, ((0, 0), (0, pad)), constant_values=-big).reshape(a.shape[0], n, blk)
      return lo.min(-1), hi.max(-1)
    qlo, qhi = minmax(qs, nq, bq)
    klo, khi = minmax(ks, nk, bk)
    qlo, qhi = qlo[:, :, None], qhi[:, :, None]
    klo, khi = klo[:, None, :], khi[:, None, :]
    fullt = (qlo == qhi) & (klo == khi) & (qlo == klo)
    if dyn:
      # In-graph: id ranges that do not overlap share no id (sound, exact for
      # sorted ids).
      empty = (qhi < klo) | (khi < qlo)
    else:
      # NumPy ids: exact, via per-tile id occupancy.
      ids, inv = np.unique(np.concatenate([np.asarray(qs), np.asarray(ks)], 1),
                           return_inverse=True)
      inv = inv.reshape(qs.shape[0], T + S)
      def occ(codes, n, blk):
        o = np.zeros((codes.shape[0], n, len(ids)), bool)
        bi, pos = np.nonzero(np.ones_like(codes, bool))
        o[bi, pos // blk, codes[bi, pos]] = True
        return o
      qo, ko = occ(inv[:, :T], nq, bq), occ(inv[:, T:], nk, bk)
      empty = np.einsum("bqu,bku->bqk", qo.astype(np.int32), ko.astype(np.int32)) == 0
    return xp.where(fullt, FULL, xp.where(empty, EMPTY, PARTIAL)).astype(xp.int8)[:, None]

  return Mask(fn, "document", kind="document",
              arrays={"q_segment_ids": qs, "kv_segment_ids": ks}, table=table,
              data_dependent=dyn, check=check)


def lengths(q_lengths=None, kv_lengths=None) -> Mask:
  """Ragged batches: in sequence ``b`` only the first ``q_lengths[b]`` queries and the
  first ``kv_lengths[b]`` keys are real; ``(q, kv)`` is allowed iff ``q < q_lengths[b]``
  and ``kv < kv_lengths[b]`` (a padded query row has no allowed key: output 0, zero
  gradients).  The same semantics as ``jax.nn.dot_product_attention``'s
  ``query_seq_lengths`` / ``key_value_seq_lengths``; ``attnjax.attention(...,
  q_lengths=, kv_lengths=)`` ANDs this mask with the call's.  Its block table is
  computed in-graph from the lengths, so every blockwise implementation skips the
  padded tiles and no ``[T, S]`` array is formed.

  Args:
    q_lengths: int ``[B]`` (None: every query is real).
    kv_lengths: int ``[B]`` (None: every key is real).
  """
  if q_lengths is None and kv_lengths is None:
    raise ValueError("lengths() needs q_lengths or kv_lengths (an int [B] array)")
  given = {}
  for name, a in (("q_lengths", q_lengths), ("kv_lengths", kv_lengths)):
    if a is None:
      continue
    if not hasattr(a, "ndim") or a.ndim != 1:
      raise ValueError(f"{name} must be an int [B] array, got "
                       f"{getattr(a, 'shape', type(a).__name__)}")
    if not jnp.issubdtype(a.dtype, jnp.integer):
      raise TypeError(f"{name} must have an integer dtype, got {a.dtype}")
    given[name] = a
  batches = {a.shape[0] for a in given.values()}
  if len(batches) != 1:
    raise ValueError(f"q_lengths and kv_lengths must have the same batch size, got "
                     f"{q_lengths.shape[0]} and {kv_lengths.shape[0]}")
  Bl = batches.pop()
  dyn = _is_jax(*given.values())

  def fn(ctx, b, h, q, kv):
    xp = _xp(*given.values(), q, kv)
    # Each side's term broadcasts over b and its own index; an absent side is "always".
    qok = q < xp.asarray(given["q_lengths"])[b] if "q_lengths" in given else q >= 0
    kok = kv < xp.asarray(given["kv_lengths"])[b] if "kv_lengths" in given else kv >= 0
    return qok & kok

  def check(T, S, num_heads, batch):
    if batch is not None and batch != Bl:
      raise ValueError(f"lengths mask: q_lengths/kv_lengths have batch {Bl}; the call has "
                       f"B={batch}")

  def table(ctx, T, S, bq, bk):
    xp = jnp if dyn else np
    nq, nk = -(-T // bq), -(-S // bk)
    q_lo = xp.arange(nq) * bq                           # first row of each q tile
    q_hi = xp.minimum(q_lo + bq, T)                     # one past its last row
    k_lo = xp.arange(nk) * bk
    k_hi = xp.minimum(k_lo + bk, S)
    empty = xp.zeros((Bl, nq, nk), bool)
    full = xp.ones((Bl, nq, nk), bool)
    if "q_lengths" in given:
      ql = xp.asarray(given["q_lengths"]).astype(xp.int32)[:, None, None]
      empty = empty | (q_lo[None, :, None] >= ql)
      full = full & (q_hi[None, :, None] <= ql)
    if "kv_lengths" in given:
      kl = xp.asarray(given["kv_lengths"]).astype(xp.int32)[:, None, None]
      empty = empty | (k_lo[None, None, :] >= kl)
      full = full & (k_hi[None, None, :] <= kl)
    return xp.where(empty, EMPTY, xp.where(full, FULL, PARTIAL)).astype(xp.int8)[:, None]

  return Mask(fn, "lengths", kind="lengths", arrays=given, table=table, data_dependent=dyn,
              check=check)


# ------------------------------------------------------------------ spatial masks


def _per_axis(name, value, ndim, *, minimum=0):
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    value = (int(value),) * ndim
  value = tuple(value)
  if len(value) != ndim:
    raise ValueError(f"{name} must be an int or a tuple of {ndim} ints, got {value!r}")
  for v in value:
    _check_int(name, v, minimum=minimum)
  return tuple(int(v) for v in value)


def _check_shape(shape):
  if isinstance(shape, (int, np.integer)):
    shape = (int(shape),)
  shape = tuple(shape)
  if not 1 <= len(shape) <= 3:
    raise ValueError(f"shape must have 1, 2 or 3 axes, got {shape!r}")
  for s in shape:
    _check_int("shape", s, minimum=1)
  return tuple(int(s) for s in shape)


def _coords(idx, shape, xp):
  """Row-major coordinates of flat token indices."""
  out = []
  for ax in range(len(shape)):
    stride = int(np.prod(shape[ax + 1:]))
    out.append((idx // stride) % shape[ax])
  return out


def _separable_mask(per_axis, shape, name, *, kind, params) -> Mask:
  """A grid mask whose predicate is the AND over the axes ``ax`` of
  ``per_axis(ax, q_coord, kv_coord, xp)`` (None: that axis does not constrain)."""
  def fn(ctx, b, h, q, kv):
    xp = _xp(q, kv)
    ok = None
    for ax, (qi, ki) in enumerate(zip(_coords(q, shape, xp), _coords(kv, shape, xp))):
      a = per_axis(ax, qi, ki, xp)
      if a is not None:
        ok = a if ok is None else ok & a
    if ok is None:
      return xp.ones(np.broadcast_shapes(xp.shape(q), xp.shape(kv)), bool)
    return ok
  return Mask(fn, name, kind=kind, params=params, grid_size=int(np.prod(shape)), axes=per_axis)


def neighborhood(shape, kernel, dilation=1, causal: Union[bool, Sequence[bool]] = False) -> Mask:
  """Neighborhood attention (NATTEN semantics) on a 1D/2D/3D token grid.

  Per axis of length ``L`` with kernel ``k`` and dilation ``d``, tokens are split by
  residue ``i mod d``; within a residue group (positions ``p = i // d``, group
  length ``L_r``), the window is ``[s, s + k)`` with
  ``s = clip(p - k // 2, 0, L_r - k)``: clamped inside the grid, so every query sees
  exactly ``prod(kernel)`` keys.  Causal axes use ``[max(p - k + 1, 0), p]``.

  Paper: "Faster Neighborhood Attention: Reducing the O(n^2) Cost of Self Attention
  at the Threadblock Level" (and "Neighborhood Attention Transformer").

  Args:
    shape: grid shape, e.g. ``(Hh, Ww)``; tokens in row-major order.
    kernel: window size per axis (int or tuple).
    dilation: dilation per axis; requires ``kernel * dilation <= L`` per axis.
    causal: bool or a bool per axis.
  """
  shape = _check_shape(shape)
  nd = len(shape)
  kernel = _per_axis("kernel", kernel, nd, minimum=1)
  dilation = _per_axis("dilation", dilation, nd, minimum=1)
  if isinstance(causal, (bool, np.bool_)):
    causal_t = (bool(causal),) * nd
  else:
    causal_t = tuple(bool(c) for c in causal)
    if len(causal_t) != nd:
      raise ValueError(f"causal must be a bool or {nd} bools, got {causal!r}")
  for L, k, d in zip(shape, kernel, dilation):
    if k * d > L:
      raise ValueError(f"kernel * dilation must be <= the grid size per axis; got "
                       f"kernel={kernel}, dilation={dilation} for shape={shape}")

  def per_axis(ax, qi, ki, xp):
    L, k, d = shape[ax], kernel[ax], dilation[ax]
    r = qi % d
    same = r == (ki % d)
    p, pk = qi // d, ki // d
    if causal_t[ax]:
      inw = (pk <= p) & (pk >= p - k + 1)
    else:
      Lr = (L - r + d - 1) // d
      s = xp.clip(p - k // 2, 0, xp.maximum(Lr - k, 0))
      inw = (pk >= s) & (pk < s + k)
    return same & inw
  return _separable_mask(per_axis, shape, f"neighborhood({shape}, {kernel}, {dilation}, "
                         f"{causal_t})", kind="neighborhood",
                         params={"shape": shape, "kernel": kernel, "dilation": dilation,
                                 "causal": causal_t})


def window(shape, window, shift=0) -> Mask:
  """Swin (shifted) window attention as a mask over the row-major token grid.

  Tokens attend within the same ``window`` partition.  With ``shift > 0``, the
  grid is first cyclically rolled by ``-shift`` (token at coordinate ``c`` moves to
  ``(c - shift) mod L``), partitioned, and the Swin region mask stops tokens that
  wrapped around from attending to non-neighbours: per axis, positions
  ``[0, L - w)``, ``[L - w, L - s)``, ``[L - s, L)`` are distinct regions.

  Paper: "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows".
  """
  shape = _check_shape(shape)
  nd = len(shape)
  win = _per_axis("window", window, nd, minimum=1)
  sh = _per_axis("shift", shift, nd)
  for L, w, s in zip(shape, win, sh):
    if L % w:
      raise ValueError(f"window must divide shape per axis; got window={win}, shape={shape}")
    if s >= w:
      raise ValueError(f"shift must be < window per axis; got shift={sh}, window={win}")

  def per_axis(ax, qi, ki, xp):
    L, w, s = shape[ax], win[ax], sh[ax]
    pq, pk = (qi - s) % L, (ki - s) % L
    a = (pq // w) == (pk // w)
    if s:
      def region(p):
        return (p >= L - w).astype(np.int32) + (p >= L - s).astype(np.int32)
      a = a & (region(pq) == region(pk))
    return a
  return _separable_mask(per_axis, shape, f"window({shape}, {win}, shift={sh})", kind="window",
                         params={"shape": shape, "window": win, "shift": sh})


def grid(shape, grid) -> Mask:
  """MaxViT grid attention: a ``G x G`` grid; tokens whose coordinates are equal
  modulo ``L / G`` (per axis) attend to each other (groups of ``prod(G)`` tokens).

  Paper: "MaxViT: Multi-Axis Vision Transformer".
  """
  shape = _check_shape(shape)
  nd = len(shape)
  g = _per_axis("grid", grid, nd, minimum=1)
  for L, G in zip(shape, g):
    if L % G:
      raise ValueError(f"grid must divide shape per axis; got grid={g}, shape={shape}")
  steps = tuple(L // G for L, G in zip(shape, g))

  def per_axis(ax, qi, ki, xp):
    return (qi % steps[ax]) == (ki % steps[ax])
  return _separable_mask(per_axis, shape, f"grid({shape}, {g})", kind="grid",
                         params={"shape": shape, "grid": g})


def axial(shape, axis: int) -> Mask:
  """Axial attention: tokens attend along one grid axis (all other coordinates equal).

  Paper: "Axial Attention in Multidimensional Transformers".
  """
  shape = _check_shape(shape)
  axis = _check_int("axis", axis, minimum=-len(shape))
  if axis >= len(shape):
    raise ValueError(f"axis must be in [-{len(shape)}, {len(shape)}), got {axis}")
  axis %= len(shape)

  def per_axis(ax, qi, ki, xp):
    return None if ax == axis else qi == ki
  return _separable_mask(per_axis, shape, f"axial({shape}, {axis})", kind="axial",
                         params={"shape": shape, "axis": axis})


def criss_cross(shape) -> Mask:
  """Criss-cross attention on a 2D grid: same row or same column.

  Paper: "CCNet: Criss-Cross Attention for Semantic Segmentation".
  """
  shape = _check_shape(shape)
  if len(shape) != 2:
    raise ValueError(f"criss_cross needs a 2D shape (Hh, Ww), got {shape!r}")
  rows, cols = axial(shape, 0), axial(shape, 1)
  def fn(ctx, b, h, q, kv):
    return rows._fn(ctx, b, h, q, kv) | cols._fn(ctx, b, h, q, kv)
  return Mask(fn, f"criss_cross({shape})", kind="criss_cross", params={"shape": shape},
              parts=(rows, cols), grid_size=int(np.prod(shape)))


def halo(shape, block, halo) -> Mask:  # pylint: disable=redefined-outer-name
  """HaloNet blocked local attention with a halo, on a 1D/2D/3D row-major token grid.

  Per axis, queries are grouped in blocks of ``block`` positions (the last block is
  shorter when ``block`` does not divide the axis); a query in block ``i`` attends to the
  keys at positions ``[i * block - halo, (i + 1) * block + halo)`` of that axis, clipped
  to the grid (positions outside the map are never attended).  ``params``:
  ``{'shape', 'block', 'halo'}`` (per-axis tuples).

  Paper: "Scaling Local Self-Attention for Parameter Efficient Visual Backbones".
  """
  shape = _check_shape(shape)
  nd = len(shape)
  blk = _per_axis("block", block, nd, minimum=1)
  hl = _per_axis("halo", halo, nd)
  for L, b in zip(shape, blk):
    if b > L:
      raise ValueError(f"block must be <= the grid size per axis; got block={blk} for "
                       f"shape={shape}")

  def per_axis(ax, qi, ki, xp):
    start = (qi // blk[ax]) * blk[ax]
    return (ki >= start - hl[ax]) & (ki < start + blk[ax] + hl[ax])
  return _separable_mask(per_axis, shape, f"halo({shape}, {blk}, {hl})", kind="halo",
                         params={"shape": shape, "block": blk, "halo": hl})


def stripe(shape, width, axis: int) -> Mask:
  """CSWin stripes on a 2D row-major token grid ``(Hh, Ww)``.

  ``axis=0``: horizontal stripes, ``width`` consecutive rows each (tokens attend iff
  ``y_q // width == y_kv // width``); ``axis=1``: vertical stripes of ``width``
  columns (``x_q // width == x_kv // width``).  The last stripe is shorter when
  ``width`` does not divide the axis.  ``params``: ``{'shape', 'width', 'axis'}``.

  Paper: "CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped
  Windows".
  """
  shape = _check_shape(shape)
  if len(shape) != 2:
    raise ValueError(f"stripe needs a 2D shape (Hh, Ww), got {shape!r}")
  axis = _check_int("axis", axis, minimum=0)
  if axis > 1:
    raise ValueError(f"axis must be 0 (horizontal stripes) or 1 (vertical), got {axis}")
  width = _check_int("width", width, minimum=1)
  if width > shape[axis]:
    raise ValueError(f"width must be <= shape[{axis}]={shape[axis]}, got width={width}")

  def per_axis(ax, qi, ki, xp):
    return (qi // width) == (ki // width) if ax == axis else None
  return _separable_mask(per_axis, shape, f"stripe({shape}, {width}, axis={axis})",
                         kind="stripe", params={"shape": shape, "width": width, "axis": axis})


# ------------------------------------------------------------------ generic masks


def from_array(mask) -> Mask:
  """A mask from a boolean array broadcastable to ``[B, N, T, S]`` (rank 2 to 4).

  NumPy arrays give a static mask; JAX arrays a data-dependent one.
  """
  if not hasattr(mask, "ndim") or not hasattr(mask, "dtype"):
    raise TypeError(f"mask must be a boolean array, got {type(mask).__name__}")
  if mask.dtype != bool:
    raise TypeError(f"mask must have dtype bool, got {mask.dtype}")
  if not 2 <= mask.ndim <= 4:
    raise ValueError(f"mask must have rank 2..4 ([T, S] .. [B, N, T, S]), got shape {mask.shape}")
  arr = mask if _is_jax(mask) else np.asarray(mask)
  arr4 = arr.reshape((1,) * (4 - arr.ndim) + tuple(arr.shape))
  Bm, Nm, Tm, Sm = arr4.shape

  def fn(ctx, b, h, q, kv):
    xp = _xp(arr4, q, kv)
    bi = xp.clip(b, 0, Bm - 1) if Bm > 1 else 0
    hi = xp.clip(h, 0, Nm - 1) if Nm > 1 else 0
    return xp.asarray(arr4)[bi, hi, xp.clip(q, 0, Tm - 1), xp.clip(kv, 0, Sm - 1)]

  def check(T, S, num_heads, batch):
    if (Tm != 1 and Tm != T) or (Sm != 1 and Sm != S):
      raise ValueError(f"mask array of shape {tuple(arr.shape)} does not broadcast to "
                       f"[T={T}, S={S}]")
    _check_lead("mask array", tuple(arr.shape), Bm, Nm, num_heads, batch)

  return Mask(fn, f"from_array{tuple(arr.shape)}", kind="array", arrays={"array": arr},
              data_dependent=_is_jax(arr), head_dependent=Nm > 1, check=check)


def from_fn(fn: Callable, name: Optional[str] = None) -> Mask:
  """A mask from a vectorised predicate ``fn(b, h, q_idx, kv_idx) -> bool``.

  ``fn`` must broadcast over index arrays and use only operators (or ``jnp``) so
  it works on both NumPy and traced inputs.  If it closes over JAX arrays the mask
  is treated as data-dependent (block table built in-graph).
  """
  if not callable(fn):
    raise TypeError(f"fn must be callable, got {type(fn).__name__}")
  probe = fn(np.zeros((1, 1, 1, 1), np.int32), np.zeros((1, 1, 1, 1), np.int32),
             np.zeros((1, 1, 1, 1), np.int32), np.zeros((1, 1, 1, 1), np.int32))
  dyn = _is_jax(probe)
  def wrapped(ctx, b, h, q, kv):
    return fn(b, h, q, kv)
  if name is not None and not isinstance(name, str):
    raise TypeError(f"name must be a str or None, got {type(name).__name__}")
  return Mask(wrapped, name or getattr(fn, "__name__", "from_fn"), kind="fn",
              params={"fn": fn, "name": name}, data_dependent=dyn, head_dependent=True)


def from_block_mask(block_mask, block_q: int, block_k: int) -> Mask:
  """A tile-level mask: ``(q, kv)`` is allowed iff ``block_mask[b, h, q // block_q,
  kv // block_k]`` (rank 2..4, broadcastable).  Used by routing mechanisms (BiFormer,
  MoBA, ...) whose per-query-block key-block selection is computed from data.
  """
  block_q = _check_int("block_q", block_q, minimum=1)
  block_k = _check_int("block_k", block_k, minimum=1)
  if not hasattr(block_mask, "ndim") or block_mask.dtype != bool:
    raise TypeError("block_mask must be a boolean array")
  if not 2 <= block_mask.ndim <= 4:
    raise ValueError(f"block_mask must have rank 2..4, got shape {block_mask.shape}")
  arr4 = block_mask.reshape((1,) * (4 - block_mask.ndim) + tuple(block_mask.shape))
  dyn = _is_jax(arr4)
  Bm, Nm, nqm, nkm = arr4.shape

  def fn(ctx, b, h, q, kv):
    xp = _xp(arr4, q, kv)
    bi = xp.clip(b, 0, Bm - 1) if Bm > 1 else 0
    hi = xp.clip(h, 0, Nm - 1) if Nm > 1 else 0
    return xp.asarray(arr4)[bi, hi, xp.clip(q // block_q, 0, nqm - 1),
                            xp.clip(kv // block_k, 0, nkm - 1)]

  def table(ctx, T, S, bq, bk):
    if bq == block_q and bk == block_k:
      xp = jnp if dyn else np
      nq, nk = -(-T // bq), -(-S // bk)
      if (nqm, nkm) != (nq, nk):
        raise ValueError(f"block_mask has {nqm}x{nkm} tiles, T={T}, S={S} need {nq}x{nk}")
      return xp.where(arr4, FULL, EMPTY).astype(xp.int8)
    return _eval_table(m, ctx, T, S, bq, bk)

  def check(T, S, num_heads, batch):
    nq, nk = -(-T // block_q), -(-S // block_k)
    if (nqm, nkm) != (nq, nk):
      raise ValueError(f"block_mask has {nqm}x{nkm} tiles, T={T}, S={S} need {nq}x{nk} "
                       f"(block_q={block_q}, block_k={block_k})")
    _check_lead("block_mask", tuple(block_mask.shape), Bm, Nm, num_heads, batch)

  m = Mask(fn, f"from_block_mask({block_q}, {block_k})", kind="block_mask",
           params={"block_q": block_q, "block_k": block_k}, arrays={"block_mask": block_mask},
           table=table, data_dependent=dyn, head_dependent=Nm > 1, check=check)
  return m


def as_mask(mask: Any, name: str = "mask") -> Optional[Mask]:
  """Coerces ``None``, a :class:`Mask`, or a boolean array into a Mask (or None)."""
  if mask is None or isinstance(mask, Mask):
    return mask
  if hasattr(mask, "dtype") and hasattr(mask, "ndim"):
    if mask.dtype != bool:
      raise TypeError(f"{name} must be a boolean array or an attnjax.masks.Mask, got "
                      f"dtype {mask.dtype}")
    return from_array(mask)
  raise TypeError(f"{name} must be None, a boolean array or an attnjax.masks.Mask, got "
                  f"{type(mask).__name__}")


# ------------------------------------------------------------------ 2D-tiled token order

def _check_tile(tile, shape, offset, dilation=1):
  nd = len(shape)
  tile = _per_axis("tile", tile, nd, minimum=1)
  offset = _per_axis("offset", offset, nd)
  dilation = _per_axis("dilation", dilation, nd, minimum=1)
  for L, t, o, d in zip(shape, tile, offset, dilation):
    if L % (t * d) and all(x == 1 for x in dilation):
      raise ValueError(f"tile must divide shape per axis; got tile={tile}, shape={shape}")
    if L % (t * d):
      raise ValueError(f"tile * dilation must divide shape per axis; got tile={tile}, "
                       f"dilation={dilation}, shape={shape}")
    if o >= L:
      raise ValueError(f"offset must be < shape per axis; got offset={offset}, shape={shape}")
  return tile, offset, dilation


def tiled_to_flat(p, shape, tile, offset=0, dilation=1):
  """Row-major grid index of the token at position ``p`` of the 2D-tiled order.

  The tiled order lists the grid patch by patch: patch ``t = p // prod(tile)`` (patches
  in row-major order over the patch grid ``shape / tile``), then position
  ``r = p % prod(tile)`` inside the patch (row-major).  Per axis the coordinate is
  ``c = (patch_a * tile_a + inner_a + offset_a) mod L_a``: ``offset`` moves the patch
  origin (a Swin shift aligns patches with the shifted windows).  With a ``dilation``
  ``d_a`` a patch takes every ``d_a``-th position: patch index ``patch_a = o * d_a +
  phase`` gives ``c = o * tile_a * d_a + inner_a * d_a + phase + offset_a`` (mod
  ``L_a``), so the ``d_a`` patches of one ``tile_a * d_a`` span interleave (a MaxViT grid
  group, the positions equal modulo ``L_a / G_a``, is one patch).  Indices
  ``p >= prod(shape)`` (kernel padding) map to themselves.  Pure index arithmetic on
  NumPy or JAX ints.
  """
  shape = _check_shape(shape)
  tile, offset, dilation = _check_tile(tile, shape, offset, dilation)
  xp = _xp(p)
  n = int(np.prod(shape))
  P = int(np.prod(tile))
  pc = xp.clip(p, 0, n - 1)
  t, r = pc // P, pc % P
  pgrid = tuple(L // tl for L, tl in zip(shape, tile))
  flat = 0
  for ax in range(len(shape)):
    ps = int(np.prod(pgrid[ax + 1:]))
    ts = int(np.prod(tile[ax + 1:]))
    pa, inner, d = (t // ps) % pgrid[ax], (r // ts) % tile[ax], dilation[ax]
    if d == 1:
      c = pa * tile[ax] + inner + offset[ax]
    else:
      c = (pa // d) * (tile[ax] * d) + inner * d + pa % d + offset[ax]
    if offset[ax]:
      c = c % shape[ax]
    flat = flat * shape[ax] + c
  return xp.where((p >= 0) & (p < n), flat, p)


def find_spatial_shape(mask: Optional[Mask]):
  """The grid ``shape`` of a spatial mask tree, or None.

  A spatial tree is a kind with a ``shape`` parameter (:func:`neighborhood`,
  :func:`window`, :func:`grid`, :func:`axial`, :func:`criss_cross`, ...) or ``&``, ``|``,
  ``~`` of such masks on one shape; any other kind in the tree gives None.
  """
  if mask is None:
    return None
  if mask.kind in _COMPOSITE:
    shapes = [find_spatial_shape(c) for c in mask.children]
    if any(s is None for s in shapes) or len(set(shapes)) != 1:
      return None
    return shapes[0]
  shape = mask.params.get("shape")
  if shape is None or mask.data_dependent:
    return None
  return tuple(shape)


def tiled2d(mask: Mask, tile, *, shape=None, offset=0, dilation=1) -> Mask:
  """``mask`` seen in the 2D-tiled token order of its grid (see :func:`tiled_to_flat`).

  Position ``p`` of the tiled order is the grid token ``tiled_to_flat(p, shape, tile,
  offset)``, so ``tiled2d(m, tile)(b, h, p, p') == m(b, h, flat(p), flat(p'))``.  With
  ``block_q = block_k = prod(tile)`` a tile of the ``[T, S]`` score matrix is a pair of
  spatial patches, and the block table follows the mask's 2D density (a neighborhood
  mask visits ~9 key tiles per query tile instead of ~3 rows of the map).  Used by the
  dispatcher, which permutes ``q, k, v`` into this order and the output back
  (:mod:`attnjax.core.tiling`).

  After NATTEN's fused neighborhood attention ("Faster Neighborhood Attention: Reducing
  the O(n^2) Cost of Self Attention at the Threadblock Level").

  Args:
    mask: any static mask on the grid (kinds with a ``shape`` parameter and their
      ``&``/``|``/``~``); other masks need ``shape``.
    tile: patch size per axis (int or tuple), dividing ``shape`` per axis.
    shape: the grid shape; default the mask's own (:func:`find_spatial_shape`).
    offset: patch origin per axis (int or tuple), ``0 <= offset < shape``.
    dilation: per axis (int or tuple), a patch takes every ``dilation``-th position
      (``tile * dilation`` divides ``shape``; see :func:`tiled_to_flat`).
  """
  if not isinstance(mask, Mask):
    raise TypeError(f"mask must be an attnjax.masks.Mask, got {type(mask).__name__}")
  if shape is None:
    shape = find_spatial_shape(mask)
    if shape is None:
      raise ValueError(f"shape must be given for mask {mask.name}: it has no grid shape")
  shape = _check_shape(shape)
  tile, offset, dilation = _check_tile(tile, shape, offset, dilation)
  n = int(np.prod(shape))
  if mask._grid_size is not None and mask._grid_size != n:
    raise ValueError(f"shape {shape} has {n} tokens; mask {mask.name} is on a grid of "
                     f"{mask._grid_size}")

  def fn(ctx, b, h, q, kv):
    return mask._fn(ctx, b, h, tiled_to_flat(q, shape, tile, offset, dilation),
                    tiled_to_flat(kv, shape, tile, offset, dilation))

  dil = f", dilation={dilation}" if any(d > 1 for d in dilation) else ""
  return Mask(fn, f"tiled2d({mask.name}, {tile}, offset={offset}{dil})", kind="tiled2d",
              params={"shape": shape, "tile": tile, "offset": offset, "dilation": dilation},
              children=(mask,), grid_size=n, parts=(mask,))



# ------------------------------------------------------------------ per-row key-block selection


def from_row_block_mask(row_block_mask, block_k: int) -> Mask:
  """A per-query key-block selection: ``(q, kv)`` is allowed iff
  ``row_block_mask[b, h, q, kv // block_k]`` (``[T, nk]`` .. ``[B, N, T, nk]``, bool).

  Unlike :func:`from_block_mask`, each query row picks its own key blocks (MoBA's
  per-token gate).  The block table never evaluates the ``[T, S]`` predicate: for tiles
  of ``block_k`` keys (or of a divisor of ``block_k``) a tile is EMPTY when no row of its
  q block selects the key block, FULL when every row does, else PARTIAL (the union over
  the q block), so blockwise implementations visit only the selected tiles and evaluate
  the predicate there.  Other tile widths evaluate the predicate per element.
  """
  block_k = _check_int("block_k", block_k, minimum=1)
  if not hasattr(row_block_mask, "ndim") or row_block_mask.dtype != bool:
    raise TypeError("row_block_mask must be a boolean array")
  if not 2 <= row_block_mask.ndim <= 4:
    raise ValueError(f"row_block_mask must have rank 2..4, got shape {row_block_mask.shape}")
  arr4 = row_block_mask.reshape((1,) * (4 - row_block_mask.ndim) + tuple(row_block_mask.shape))
  dyn = _is_jax(arr4)
  Bm, Nm, Tm, nkm = arr4.shape

  def fn(ctx, b, h, q, kv):
    xp = _xp(arr4, q, kv)
    bi = xp.clip(b, 0, Bm - 1) if Bm > 1 else 0
    hi = xp.clip(h, 0, Nm - 1) if Nm > 1 else 0
    return xp.asarray(arr4)[bi, hi, xp.clip(q, 0, Tm - 1), xp.clip(kv // block_k, 0, nkm - 1)]

  def table(ctx, T, S, bq, bk):
    if block_k % bk:
      return _eval_table(m, ctx, T, S, bq, bk)
    xp = jnp if dyn else np
    nq = -(-T // bq)
    a = xp.asarray(arr4)
    pad = nq * bq - T
    if pad:
      a_any = xp.concatenate([a, xp.zeros((Bm, Nm, pad, nkm), bool)], axis=2)
      a_all = xp.concatenate([a, xp.ones((Bm, Nm, pad, nkm), bool)], axis=2)
    else:
      a_any = a_all = a
    any_ = a_any.reshape(Bm, Nm, nq, bq, nkm).any(axis=3)
    all_ = a_all.reshape(Bm, Nm, nq, bq, nkm).all(axis=3)
    tab = _classify(any_, all_, xp)
    if bk != block_k:   # each key block spans block_k // bk tiles
      tab = xp.repeat(tab, block_k // bk, axis=-1)[..., :-(-S // bk)]
    return tab

  def check(T, S, num_heads, batch):
    nk = -(-S // block_k)
    if Tm != T or nkm != nk:
      raise ValueError(f"row_block_mask has shape [..., {Tm}, {nkm}]; T={T}, S={S} need "
                       f"[..., {T}, {nk}] (block_k={block_k})")
    _check_lead("row_block_mask", tuple(row_block_mask.shape), Bm, Nm, num_heads, batch)

  m = Mask(fn, f"from_row_block_mask({block_k})", kind="row_block_mask",
           params={"block_k": block_k}, arrays={"row_block_mask": row_block_mask},
           table=table, data_dependent=dyn, head_dependent=Nm > 1, check=check)
  return m



# ------------------------------------------------------------------ per-key row interval


def _interval_cover_counts(index, lead_shape, first, past, n: int, xp=np):
  """How many intervals cover each bin: interval ``e`` spans bins ``[first_e, past_e)``
  of ``n`` (``first = past = n``: none) and is counted in row ``index_e`` (a tuple of
  index arrays shaped like ``first``) of a ``lead_shape + (n,)`` int32 result.  A +1 at
  each first bin and a -1 at each one-past-last bin, then a cumsum: ``O(E + rows * n)``.
  NumPy or JAX (``xp``)."""
  if xp is np:
    cnt = np.zeros(tuple(lead_shape) + (n + 1,), np.int32)
    np.add.at(cnt, tuple(index) + (first,), 1)
    np.add.at(cnt, tuple(index) + (past,), -1)
  else:
    cnt = jnp.zeros(tuple(lead_shape) + (n + 1,), jnp.int32)
    cnt = cnt.at[tuple(index) + (first,)].add(1).at[tuple(index) + (past,)].add(-1)
  return xp.cumsum(cnt, axis=-1)[..., :n]


def key_interval(start, end) -> Mask:
  """Each key is seen by an interval of query rows: ``(q, kv)`` is allowed iff
  ``start[b, h, kv] <= q < end[b, h, kv]`` (``[S]``, ``[N, S]`` or ``[B, N, S]``, int;
  a leading dim of 1 broadcasts).

  Masks whose rows keep a key from some row on (Dynamic Mask Attention's top-w keys,
  causal key selections, per-key expiry) are of this form.  The block kernels read the
  two per-key arrays per key tile and evaluate the predicate in-kernel, so no ``[T, S]``
  array is ever formed; the block table is exact and computed in ``O(S + nq * nk)``
  (a tile is non-empty iff some key of it has an interval meeting the tile's rows).
  """
  for name, x in (("start", start), ("end", end)):
    if not hasattr(x, "ndim") or not jnp.issubdtype(x.dtype, jnp.integer):
      raise TypeError(f"key_interval: {name} must be an integer array, got "
                      f"{getattr(x, 'dtype', type(x).__name__)}")
    if not 1 <= x.ndim <= 3:
      raise ValueError(f"key_interval: {name} must have shape [S], [N, S] or [B, N, S], got "
                       f"{tuple(x.shape)}")
  s3 = start.reshape((1,) * (3 - start.ndim) + tuple(start.shape))
  e3 = end.reshape((1,) * (3 - end.ndim) + tuple(end.shape))
  try:
    lead = np.broadcast_shapes(s3.shape[:2], e3.shape[:2])
  except ValueError:
    raise ValueError(f"key_interval: start {tuple(start.shape)} and end {tuple(end.shape)} "
                     f"have incompatible leading dims") from None
  if s3.shape[2] != e3.shape[2]:
    raise ValueError(f"key_interval: start and end must have the same key count, got "
                     f"{s3.shape[2]} and {e3.shape[2]}")
  Bm, Nm = lead
  Sm = s3.shape[2]
  dyn = _is_jax(s3, e3)

  def fn(ctx, b, h, q, kv):
    xp = _xp(s3, e3, q, kv)
    kvc = xp.clip(kv, 0, Sm - 1)
    lo = xp.asarray(s3)[xp.clip(b, 0, s3.shape[0] - 1) if s3.shape[0] > 1 else 0,
                        xp.clip(h, 0, s3.shape[1] - 1) if s3.shape[1] > 1 else 0, kvc]
    hi = xp.asarray(e3)[xp.clip(b, 0, e3.shape[0] - 1) if e3.shape[0] > 1 else 0,
                        xp.clip(h, 0, e3.shape[1] - 1) if e3.shape[1] > 1 else 0, kvc]
    return (lo <= q) & (q < hi)

  def table(ctx, T, S, bq, bk):
    xp = jnp if dyn else np
    lo, hi = key_interval_arrays(m, T)
    nq, nk = -(-T // bq), -(-S // bk)
    pad = nk * bk - S
    live = lo < hi                                              # [Bm, Nm, S]
    # non-empty: the union over a key tile of the q blocks its keys' intervals meet,
    # as +1 / -1 at each interval's first / one-past-last q block and a cumsum.
    first = xp.where(live, lo // bq, nq)
    past = xp.where(live, (hi - 1) // bq + 1, nq)
    kt = xp.broadcast_to(xp.arange(S) // bk, lo.shape)
    bi = xp.broadcast_to(xp.arange(Bm)[:, None, None], lo.shape)
    hi_ = xp.broadcast_to(xp.arange(Nm)[None, :, None], lo.shape)
    cnt = _interval_cover_counts((bi, hi_, kt), (Bm, Nm, nk), first, past, nq, xp)
    any_ = cnt > 0                                              # [Bm, Nm, nk, nq]
    # full: every key of the tile sees all the tile's rows (padded keys do not count).
    lo_p = xp.pad(lo, ((0, 0), (0, 0), (0, pad)), constant_values=-_BIG)
    hi_p = xp.pad(hi, ((0, 0), (0, 0), (0, pad)), constant_values=_BIG)
    max_lo = lo_p.reshape(Bm, Nm, nk, bk).max(-1)
    min_hi = hi_p.reshape(Bm, Nm, nk, bk).min(-1)
    q0 = xp.arange(nq) * bq
    q1 = xp.minimum(q0 + bq, T)
    all_ = (max_lo[..., None] <= q0) & (min_hi[..., None] >= q1)
    return _classify(any_, all_, xp).transpose(0, 1, 3, 2)

  def check(T, S, num_heads, batch):
    if Sm != S:
      raise ValueError(f"key_interval: start/end have {Sm} keys; the call has S={S}")
    _check_lead("key_interval start/end", (Bm, Nm, Sm), Bm, Nm, num_heads, batch)

  m = Mask(fn, "key_interval", kind="key_interval", arrays={"start": start, "end": end},
           table=table, data_dependent=dyn, head_dependent=Nm > 1, check=check)
  return m


def key_interval_arrays(mask: Mask, T: int):
  """``(start, end)`` of a :func:`key_interval` mask as int32 ``[Bm, Nm, S]`` (broadcast
  to common leading dims), clipped to ``[0, T]``."""
  arrs = mask.arrays
  s, e = arrs["start"], arrs["end"]
  xp = _xp(s, e)
  s3 = xp.asarray(s).reshape((1,) * (3 - s.ndim) + tuple(s.shape)).astype(xp.int32)
  e3 = xp.asarray(e).reshape((1,) * (3 - e.ndim) + tuple(e.shape)).astype(xp.int32)
  shape = np.broadcast_shapes(s3.shape, e3.shape)
  s3, e3 = xp.broadcast_to(s3, shape), xp.broadcast_to(e3, shape)
  return xp.clip(s3, 0, T), xp.clip(e3, 0, T)
