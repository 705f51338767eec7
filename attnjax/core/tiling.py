"""2D tiling of spatial masks: token permutations that make tiles spatial patches.

A neighborhood or window mask over a row-major flattened ``Hh x Ww`` map, tiled along
the flattened axis, puts a one-row-high strip of the map in each query tile: the strip
needs keys from every row the kernel spans, and most of each visited key tile is masked.
Reordering tokens so that each tile of ``block_q`` (``block_k``) tokens is a spatial
patch ``th x tw`` makes the block table follow the mask's 2D density: a query patch
needs the key patches its kernel window reaches (about 3 x 3 of them for a
neighborhood kernel smaller than the patch).

The order is pure index arithmetic (:func:`attnjax.masks.tiled_to_flat`): position
``p`` of the tiled order is patch ``p // (th * tw)`` of the patch grid (row-major), and
position ``p % (th * tw)`` inside it (row-major); with a Swin shift the patch origin
moves by the shift, so patches coincide with the shifted windows.  Arrays move between
the orders with one reshape/transpose (plus a roll for an offset), not a gather;
gradients flow through them.  The mask is wrapped with :func:`attnjax.masks.tiled2d`,
whose predicate maps tiled positions back to grid coordinates, so block tables and
in-kernel predicates come out right with no new kernel code.

:func:`plan_tiling` decides whether and how a call is tiled; :func:`tile_call` permutes
``q, k, v``, bias, segment ids and the score_mod's indices; :func:`untile_outputs`
restores the output (and ``lse``) order.  The dispatcher applies them to
``'xla_chunked'``, ``'pallas_tpu'`` and ``'pallas_gpu'`` (``spatial_tile`` field of
their block-size configs: ``True`` automatic, ``False`` off, a tuple a fixed patch).

After "Faster Neighborhood Attention: Reducing the O(n^2) Cost of Self Attention at the
Threadblock Level" (NATTEN's fused neighborhood attention).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from attnjax import masks as masks_lib
from attnjax import score_mods as score_mods_lib
from attnjax.core.args import AttentionArgs

__all__ = ["TilePlan", "plan_tiling", "choose_tile", "is_row_major", "check_spatial_tile",
           "permute_axis", "tile_call", "untile_outputs"]


@dataclasses.dataclass(frozen=True)
class TilePlan:
  """How one call is tiled: the grid ``shape``, the patch ``tile``, its ``offset`` and
  ``dilation`` (per axis; see :func:`attnjax.masks.tiled_to_flat`), and the block sizes
  the implementation runs with."""
  shape: tuple
  tile: tuple
  offset: tuple
  block_q: int
  block_k: int
  tiled_mask: Optional[masks_lib.Mask] = dataclasses.field(default=None, compare=False)
  dilation: Optional[tuple] = None

  def __post_init__(self):
    if self.dilation is None:
      object.__setattr__(self, "dilation", (1,) * len(self.shape))


def check_spatial_tile(value, owner: str):
  """``spatial_tile`` of a block-size config: a bool, or a tuple of 1-3 positive ints."""
  if isinstance(value, bool):
    return
  if isinstance(value, tuple) and 1 <= len(value) <= 3 and all(
      isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in value):
    return
  raise ValueError(f"{owner}.spatial_tile must be True (automatic 2D tiling of spatial "
                   f"masks), False (flattened order) or a tuple of positive ints (the "
                   f"patch per grid axis), got {value!r}")


def _divisors(n):
  return [d for d in range(1, n + 1) if n % d == 0]


def _is_identity(shape, tile):
  return tuple(tile[1:]) == tuple(shape[1:])


def _square_patch(shape, tokens: int, skip_row_major: bool) -> Optional[tuple]:
  """The most square patch (smallest perimeter; ties: wider) with ``tokens`` (or
  ``tokens / 2``, ``/ 4``, ``/ 8``, at least 4) tokens whose sides divide ``shape``;
  with ``skip_row_major`` not one whose order is row-major.  None if there is none."""
  shape = tuple(shape)
  size = tokens
  while size >= 4 and size * 8 >= tokens:
    best = None
    for t0 in _divisors(shape[0]):
      rest = size // t0
      if size % t0:
        continue
      cands = []
      if len(shape) == 2:
        if shape[1] % rest == 0:
          cands.append((t0, rest))
      else:
        for t1 in _divisors(shape[1]):
          if rest % t1 == 0 and shape[2] % (rest // t1) == 0:
            cands.append((t0, t1, rest // t1))
      for c in cands:
        if skip_row_major and _is_identity(shape, c):
          continue
        key = (sum(c), -c[-1])
        if best is None or key < best[0]:
          best = (key, c)
    if best is not None:
      return best[1]
    size //= 2
  return None


def choose_tile(shape, tokens: int) -> Optional[tuple]:
  """The patch for a grid ``shape`` with ``tokens`` (or ``tokens / 2``, ``/ 4``, ``/ 8``,
  at least 4) tokens: each side divides the map, the order differs from row-major, and
  among those the most square (smallest perimeter; ties: wider).  None if no such
  patch exists (the call keeps the flattened order)."""
  return _square_patch(shape, tokens, skip_row_major=True)


def _leaves(mask):
  if mask.kind in ("and", "or", "not"):
    for c in mask.children:
      yield from _leaves(c)
  else:
    yield mask


def _offset(mask, shape):
  """Patch origin: the shift of the mask's shifted windows (all equal), else 0."""
  shifts = {tuple(m.params["shift"]) for m in _leaves(mask) if m.kind == "window"}
  if len(shifts) == 1:
    return shifts.pop()
  return (0,) * len(shape)


def _patch_within(box, tokens):
  """``box`` itself when it holds at most ``tokens`` tokens, else its most square patch of
  ``tokens`` (or fewer, see :func:`_square_patch`)."""
  if int(np.prod(box)) <= tokens:
    return tuple(box)
  return _square_patch(box, tokens, skip_row_major=False)


def _structured(mask, shape, tokens):
  """``(tile, dilation)`` candidates from the structure of ``mask``'s leaves.

  A window or HaloNet block size (all alike) gives its most square patch of ``tokens``
  (tiles that do not straddle two windows); a MaxViT grid (all grid leaves alike) its
  ``G`` grid (or its most square patch of ``tokens``) dilated by its steps ``L / G`` (a
  tile holds whole grid groups); a dilated neighborhood (all alike) the most square
  patch of its residue sub-grid ``L / d`` dilated by ``d`` (a tile holds one residue
  class, whose neighborhood is undilated)."""
  leaves = list(_leaves(mask))
  out = []
  ones = (1,) * len(shape)
  for kind, key in (("window", "window"), ("halo", "block")):
    # tiles inside one (shifted) window or halo block: the most square patch of it
    sizes = {tuple(m.params[key]) for m in leaves if m.kind == kind}
    if len(sizes) == 1:
      w = sizes.pop()
      if all(L % x == 0 for L, x in zip(shape, w)):
        tile = _patch_within(w, tokens)
        if tile is not None and int(np.prod(tile)) >= 4:
          out.append((tuple(tile), ones))
  grids = {tuple(m.params["grid"]) for m in leaves if m.kind == "grid"}
  if len(grids) == 1:
    g = grids.pop()
    steps = tuple(L // G for L, G in zip(shape, g))
    tile = _patch_within(g, tokens)
    if tile is not None and any(st > 1 for st in steps):
      out.append((tuple(tile), steps))
  dils = {tuple(m.params["dilation"]) for m in leaves if m.kind == "neighborhood"}
  if len(dils) == 1:
    d = dils.pop()
    sub = tuple(L // x for L, x in zip(shape, d))
    if any(x > 1 for x in d) and all(L % x == 0 for L, x in zip(shape, d)):
      tile = _square_patch(sub, tokens, skip_row_major=False)
      if tile is not None:
        out.append((tuple(tile), d))
  return out


def _candidate_tiles(mask, shape, tokens: int) -> list:
  """``(tile, dilation)`` pairs automatic tiling weighs for ``mask`` on a grid ``shape``
  and ``tokens`` per tile: the most square patch (:func:`choose_tile`), the strip
  ``(P, 1[, 1])`` along the first axis (a column: tiles follow axial or stripe masks
  along it), the row-major order with tiles of ``P`` whole-row-aligned tokens
  ``(1[, 1], P)`` (tiles that do not straddle two rows of the map), and dilated patches
  for MaxViT grids and dilated neighborhoods (:func:`_structured`).  Duplicates dropped;
  the most square first."""
  shape = tuple(shape)
  ones = (1,) * len(shape)
  cands = []
  sq = choose_tile(shape, tokens)
  if sq is not None:
    P = int(np.prod(sq))
    cands.append((sq, ones))
    if shape[0] % P == 0:
      cands.append(((P,) + ones[1:], ones))
    if shape[-1] % P == 0 and P < shape[-1]:
      cands.append((ones[:-1] + (P,), ones))
  cands += _structured(mask, shape, tokens)
  return list(dict.fromkeys(cands))


def is_row_major(plan: "TilePlan") -> bool:
  """True when ``plan``'s order is the row-major order itself (patches ``(1, ..., t)``
  with no offset): only its block sizes differ from the flattened call."""
  return (not any(plan.offset) and all(t == 1 for t in plan.tile[:-1])
          and all(d == 1 for d in plan.dilation))


def plan_tiling(a: AttentionArgs, spatial_tile, block_q: Optional[int],
                block_k: Optional[int], default_q: int, default_k: int,
                valid_block=None, flat_blocks=None) -> Optional[TilePlan]:
  """The tiling of call ``a`` for an implementation, or None to keep the flattened order.

  Tiled when ``spatial_tile`` is not False, the mask is a static spatial mask tree on a
  2D/3D grid (:func:`attnjax.masks.find_spatial_shape`) with ``T == S == prod(shape)``,
  and a patch dividing the map exists.  The patch has ``block_q`` tokens (the
  implementation's default ``default_q`` when None; fewer when no patch of that size
  divides the map); key tiles have ``block_k`` tokens (default ``default_k``).
  ``valid_block(bq, bk) -> bool`` says which block sizes the implementation accepts.

  Automatic tiling (``spatial_tile=True``) weighs the patches of
  :func:`_candidate_tiles` (most square, a strip along the first axis, row-aligned
  row-major tiles) and keeps the one computing the fewest score entries
  (``nonempty tiles * bq * bk``, then the fewest partial tiles; ties go to the most
  square), and only when it computes fewer than the flattened order at the
  implementation's flattened block sizes ``flat_blocks = (bq, bk)`` (all tables exact,
  at trace time).  Narrow maps, whose flattened tiles already span whole rows, or key
  tiles large next to the mask's reach (128-key TPU tiles and a 7x7 neighborhood on a
  128-wide map) keep the flattened order.  A plan whose order is row-major
  (:func:`is_row_major`) changes only the block sizes.  A tuple ``spatial_tile`` always
  tiles.
  """
  if spatial_tile is False or a.mask is None or a.T != a.S:
    return None
  shape = masks_lib.find_spatial_shape(a.mask)
  if shape is None or len(shape) < 2 or int(np.prod(shape)) != a.T:
    return None
  if isinstance(spatial_tile, tuple):
    if len(spatial_tile) != len(shape) or any(L % t for L, t in zip(shape, spatial_tile)):
      raise ValueError(f"spatial_tile must have one entry per grid axis, each dividing the "
                       f"grid {shape}, got {spatial_tile}")
    tiles = [(tuple(spatial_tile), (1,) * len(shape))]
  else:
    tiles = _candidate_tiles(a.mask, shape, min(block_q or default_q, a.T))
    if not tiles:
      return None
  mask_offset = _offset(a.mask, shape)
  best = None
  for tile, dilation in tiles:
    P = int(np.prod(tile))
    bq = block_q or P
    bk = block_k if block_k is not None else min(default_k, P)
    if valid_block is not None and not valid_block(bq, bk):
      continue
    dilated = any(d > 1 for d in dilation)
    offset = mask_offset if any(t > 1 for t in tile[:-1]) and not dilated \
        else (0,) * len(shape)
    tiled = masks_lib.tiled2d(a.mask, tile, shape=shape, offset=offset, dilation=dilation)
    plan = TilePlan(shape, tile, offset, bq, bk, tiled, dilation)  # tables cached on `tiled`
    if spatial_tile is not True or flat_blocks is None:
      return plan
    table = tiled.block_table(a.T, a.S, bq, bk)
    cost = (int(np.count_nonzero(table)) * bq * bk,
            int(np.count_nonzero(table == masks_lib.PARTIAL)))
    if best is None or cost < best[0]:
      best = (cost, plan)
  if best is None:
    return None
  fq, fk = flat_blocks
  if best[0][0] >= int(np.count_nonzero(a.mask.block_table(a.T, a.S, fq, fk))) * fq * fk:
    return None
  return best[1]


def _tiled_index(plan: TilePlan, inverse: bool):
  """Static int32 indices: ``x_tiled = x[idx]`` (forward) or ``x = x_tiled[inv]``."""
  n = int(np.prod(plan.shape))
  idx = np.asarray(masks_lib.tiled_to_flat(np.arange(n), plan.shape, plan.tile, plan.offset,
                                           plan.dilation), np.int32)
  if not inverse:
    return idx
  inv = np.empty_like(idx)
  inv[idx] = np.arange(n, dtype=np.int32)
  return inv


def tiled_index(plan: TilePlan):
  """The row map of the tiled order, static int32 ``[prod(shape)]``: tiled token ``t``
  is row-major token ``tiled_index(plan)[t]``.  Kernels that read their inputs through
  a row map (``'cpu_flash'``) take it instead of :func:`tile_call`'s gathers."""
  return _tiled_index(plan, False)


def _gather_permute(x, axis: int, plan: TilePlan, inverse: bool):
  """The permutation as a gather with static indices, whose vjp is the inverse gather
  (not a scatter).  On XLA:CPU this is about 4x faster than the reshape/transpose/roll
  (128 x 128 map, ``[1, 16384, 8, 64]`` float32)."""
  import jax
  import jax.numpy as jnp
  idx, back = _tiled_index(plan, inverse), _tiled_index(plan, not inverse)

  @jax.custom_vjp
  def perm(x):
    return jnp.take(x, idx, axis=axis)

  perm.defvjp(lambda x: (perm(x), None),
              lambda _, g: (jnp.take(g, back, axis=axis),))
  return perm(x)


def permute_axis(x, axis: int, plan: TilePlan, *, inverse: bool = False,
                 method: Optional[str] = None):
  """Moves ``x``'s token axis ``axis`` (length ``prod(shape)``) between row-major and the
  tiled order (``inverse``: back).  ``method``: ``'gather'`` (static indices; its vjp
  the inverse gather), ``'transpose'`` (reshape/transpose and a roll for an offset), or
  None: gather on the CPU backend, transpose elsewhere."""
  import jax
  import jax.numpy as jnp
  axis = axis % x.ndim
  if method not in (None, "gather", "transpose"):
    raise ValueError(f"method must be None, 'gather' or 'transpose', got {method!r}")
  if method is None:
    method = "gather" if jax.default_backend() == "cpu" else "transpose"
  if method == "gather":
    return _gather_permute(x, axis, plan, inverse)
  shape, tile, off, dil = plan.shape, plan.tile, plan.offset, plan.dilation
  nd = len(shape)
  lead, trail = x.shape[:axis], x.shape[axis + 1:]
  la, lt = len(lead), len(trail)
  outer = tuple(L // (t * d) for L, t, d in zip(shape, tile, dil))
  # each grid axis splits as (outer, inner, phase): c = (o * t + i) * d + p; the patch
  # is (o, p) per axis, the position inside it i
  split = tuple(v for a in range(nd) for v in (outer[a], tile[a], dil[a]))
  tiled = tuple(v for a in range(nd) for v in (outer[a], dil[a])) + tile
  to_tiled = tuple(3 * a + j for a in range(nd) for j in (0, 2)) + \
      tuple(3 * a + 1 for a in range(nd))
  from_tiled = tuple(int(np.argsort(to_tiled)[i]) for i in range(3 * nd))
  rest = tuple(range(la + 3 * nd, la + 3 * nd + lt))
  grid_axes = tuple(range(la, la + nd))
  if not inverse:
    g = x.reshape(lead + shape + trail)
    if any(off):
      g = jnp.roll(g, tuple(-o for o in off), grid_axes)
    g = g.reshape(lead + split + trail)
    perm = tuple(range(la)) + tuple(la + i for i in to_tiled) + rest
    return g.transpose(perm).reshape(x.shape)
  g = x.reshape(lead + tiled + trail)
  perm = tuple(range(la)) + tuple(la + i for i in from_tiled) + rest
  g = g.transpose(perm).reshape(lead + shape + trail)
  if any(off):
    g = jnp.roll(g, off, grid_axes)
  return g.reshape(x.shape)


def _tiled_score_mod(sm, plan: TilePlan):
  def fn(s, b, h, q, kv):
    return sm(s, b, h,
              masks_lib.tiled_to_flat(q, plan.shape, plan.tile, plan.offset, plan.dilation),
              masks_lib.tiled_to_flat(kv, plan.shape, plan.tile, plan.offset, plan.dilation))
  return score_mods_lib.ScoreMod(fn, f"tiled2d({getattr(sm, 'name', 'score_mod')})")


def tiled_mask(a: AttentionArgs, plan: TilePlan):
  """``a.mask`` in the tiled order (:func:`attnjax.masks.tiled2d`)."""
  if plan.tiled_mask is not None:
    return plan.tiled_mask
  return masks_lib.tiled2d(a.mask, plan.tile, shape=plan.shape, offset=plan.offset,
                           dilation=plan.dilation)


def tile_call(q, k, v, a: AttentionArgs, plan: TilePlan):
  """``(q, k, v, a)`` in the tiled order: tokens permuted, the mask wrapped with
  :func:`attnjax.masks.tiled2d`, a bias's full ``T``/``S`` axes and segment ids
  permuted, the score_mod evaluated at the grid indices."""
  qt, kt, vt = (permute_axis(x, 1, plan) for x in (q, k, v))
  mask = tiled_mask(a, plan)
  bias = a.bias
  if bias is not None:
    for ax in (2, 3):
      if bias.shape[ax] > 1:
        bias = permute_axis(bias, ax, plan)
  qs, ks = a.q_segment_ids, a.kv_segment_ids
  if qs is not None:
    qs, ks = permute_axis(qs, 1, plan), permute_axis(ks, 1, plan)
  sm = None if a.score_mod is None else _tiled_score_mod(a.score_mod, plan)
  at = dataclasses.replace(a, mask=mask, bias=bias, q_segment_ids=qs, kv_segment_ids=ks,
                           score_mod=sm)
  return qt, kt, vt, at


def untile_outputs(out, plan: TilePlan, return_lse: bool):
  """The implementation's output (``o [B, T, N, Hv]``, and ``lse [B, N, T]`` with
  ``return_lse``) back in row-major token order."""
  if return_lse:
    o, lse = out
    return permute_axis(o, 1, plan, inverse=True), permute_axis(lse, 2, plan, inverse=True)
  return permute_axis(out, 1, plan, inverse=True)
