"""2D tiling of spatial masks (issue 18): the tiled token order, its exactness through
``xla_chunked`` (loop and gathered paths) and the Pallas kernels (interpreted), tile
counts, opt-out and fallback, and lowering for TPU / CUDA.

References are independent of the fast path: masks built by explicit loops from the
NATTEN / Swin definitions, dense softmax in jnp with rows with no allowed key set to 0.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, export_for, rnd

import attnjax
from attnjax import masks
from attnjax.core import args as args_lib
from attnjax.core import tiling
from attnjax.dispatch import registry
from attnjax.ops.chunked import ChunkedBlockSizes

# ----------------------------------------------------------------- plain references


def _nbhd_1d(L, k, d, causal):
  """allowed[i, j] along one axis, from the NATTEN definition, by loops."""
  out = np.zeros((L, L), bool)
  for i in range(L):
    r, p = i % d, i // d
    group = [j for j in range(L) if j % d == r]         # positions of this residue
    if causal:
      keep = group[max(p - k + 1, 0):p + 1]
    else:
      start = min(max(p - k // 2, 0), max(len(group) - k, 0))
      keep = group[start:start + k]
    out[i, keep] = True
  return out


def _window_1d(L, w, s):
  """allowed[i, j] along one axis for Swin shifted windows, by loops: roll by -s,
  partition into windows of w, split the wrapped window into its regions."""
  out = np.zeros((L, L), bool)
  for i in range(L):
    for j in range(L):
      pi, pj = (i - s) % L, (j - s) % L
      region = lambda p: 0 if p < L - w else (1 if p < L - s else 2)
      out[i, j] = pi // w == pj // w and (s == 0 or region(pi) == region(pj))
  return out


def _grid_mask(per_axis):
  """The row-major product mask of 1D masks: allowed iff allowed on every axis."""
  shape = tuple(m.shape[0] for m in per_axis)
  n = int(np.prod(shape))
  out = np.ones((n, n), bool)
  coords = list(itertools.product(*[range(L) for L in shape]))
  for a, ma in enumerate(per_axis):
    ca = np.array([c[a] for c in coords])
    out &= ma[ca[:, None], ca[None, :]]
  return out


def _ref_attention(q, k, v, allowed, bias=None):
  """Dense float32 softmax attention with a [T, S] boolean mask (GQA by repeat)."""
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  G = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
  s = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  if bias is not None:
    s = s + bias
  s = jnp.where(allowed, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  p = jnp.exp(s - m)
  l = p.sum(-1, keepdims=True)
  p = p / jnp.where(l > 0, l, 1.0)
  return jnp.einsum("bnts,bsnh->btnh", p, v)


CASES = {
    "nbhd": lambda: (masks.neighborhood((16, 16), 5),
                     _grid_mask([_nbhd_1d(16, 5, 1, False)] * 2)),
    "nbhd_dil_causal": lambda: (
        masks.neighborhood((16, 32), 3, dilation=(2, 3), causal=True),
        _grid_mask([_nbhd_1d(16, 3, 2, True), _nbhd_1d(32, 3, 3, True)])),
    "window_shift": lambda: (masks.window((16, 16), 8, shift=4),
                             _grid_mask([_window_1d(16, 8, 4)] * 2)),
    "nbhd_13x17": lambda: (masks.neighborhood((13, 17), 3),
                           _grid_mask([_nbhd_1d(13, 3, 1, False), _nbhd_1d(17, 3, 1, False)])),
    "nbhd_12x20": lambda: (masks.neighborhood((12, 20), 3),
                           _grid_mask([_nbhd_1d(12, 3, 1, False), _nbhd_1d(20, 3, 1, False)])),
}


def _qkv(seed, n, dtype, N=4, K=2, H=16):
  return (rnd(seed, (1, n, N, H), dtype), rnd(seed + 1, (1, n, K, H), dtype),
          rnd(seed + 2, (1, n, K, H), dtype))


def _check(mask, allowed, dtype, implementation, block_sizes=None, seed=0, N=4, K=2, bias=None,
           tiled=True):
  n = allowed.shape[0]
  q, k, v = _qkv(seed, n, dtype, N=N, K=K)
  assert (_plan(mask, n, implementation, block_sizes, N=N, K=K)[0] is not None) == tiled
  ct = rnd(seed + 7, (1, n, N, 16), dtype)

  def f(q, k, v):
    return attnjax.attention(q, k, v, mask=mask, bias=bias, implementation=implementation,
                             block_sizes=block_sizes)

  def r(q, k, v):
    return _ref_attention(q, k, v, allowed, bias)

  out, vjp = jax.vjp(jax.jit(f), q, k, v)
  qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
  ref, vjp_r = jax.vjp(jax.jit(r), qf, kf, vf)
  assert_close(out, ref, dtype, "out")
  for i, (g, gr) in enumerate(zip(vjp(ct), vjp_r(ct.astype(jnp.float32)))):
    assert_close(g, gr, dtype, f"grad {i}")


def _plan(mask, n, impl="xla_chunked", cfg=None, N=4, K=2, bias=None):
  q, k, _ = _qkv(0, n, jnp.float32, N=N, K=K)
  a = args_lib.check_attention_args(q, k, k, mask=mask, bias=bias)
  return registry._spatial_tiling(registry.get(impl), a, cfg)


# ----------------------------------------------------------------- order and permutation


def test_tiled_order_by_loops():
  """tiled_to_flat lists patches row-major, then tokens row-major inside a patch."""
  shape, tile, off = (6, 8), (3, 4), (1, 2)
  want = []
  for py, px in itertools.product(range(2), range(2)):
    for iy, ix in itertools.product(range(3), range(4)):
      y, x = (py * 3 + iy + off[0]) % 6, (px * 4 + ix + off[1]) % 8
      want.append(y * 8 + x)
  got = masks.tiled_to_flat(np.arange(48), shape, tile, off)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(masks.tiled_to_flat(np.arange(48, 60), shape, tile, off),
                                np.arange(48, 60))          # padding maps to itself
  plan = tiling.TilePlan(shape, tile, off, 12, 12)
  x = rnd(1, (2, 48, 3, 5))
  for method in ("gather", "transpose", None):
    xt = tiling.permute_axis(x, 1, plan, method=method)
    np.testing.assert_array_equal(np.asarray(xt), np.asarray(x)[:, want])
    np.testing.assert_array_equal(
        np.asarray(tiling.permute_axis(xt, 1, plan, inverse=True, method=method)), np.asarray(x))
    # vjp: the cotangent moves back with the inverse permutation (either way)
    ct = rnd(2, xt.shape)
    (g,) = jax.vjp(lambda x, m=method: tiling.permute_axis(x, 1, plan, method=m), x)[1](ct)
    np.testing.assert_array_equal(np.asarray(g)[:, want], np.asarray(ct))
  with pytest.raises(ValueError, match="method must be"):
    tiling.permute_axis(x, 1, plan, method="roll")


def test_dilated_order_by_loops():
  """With a dilation d a patch takes every d-th position: patch index o * d + phase per
  axis covers c = o * t * d + i * d + phase; both permutation methods agree, and a MaxViT
  grid group is one patch."""
  shape, tile, off, dil = (8, 12), (2, 3), (1, 0), (2, 2)
  pgrid = (4, 4)
  want = []
  for py, px in itertools.product(range(pgrid[0]), range(pgrid[1])):
    for iy, ix in itertools.product(range(tile[0]), range(tile[1])):
      y = ((py // 2) * 4 + iy * 2 + py % 2 + off[0]) % 8
      x = (px // 2) * 6 + ix * 2 + px % 2
      want.append(y * 12 + x)
  np.testing.assert_array_equal(masks.tiled_to_flat(np.arange(96), shape, tile, off, dil), want)
  plan = tiling.TilePlan(shape, tile, off, 6, 6, None, dil)
  x = rnd(1, (2, 96, 3))
  for method in ("gather", "transpose"):
    xt = tiling.permute_axis(x, 1, plan, method=method)
    np.testing.assert_array_equal(np.asarray(xt), np.asarray(x)[:, want])
    np.testing.assert_array_equal(
        np.asarray(tiling.permute_axis(xt, 1, plan, inverse=True, method=method)), np.asarray(x))
  # MaxViT grid (2, 3) on 8 x 12: steps (4, 4); dilated (2, 3) patches are its groups
  order = masks.tiled_to_flat(np.arange(96), shape, (2, 3), 0, (4, 4))
  y, xx = order // 12, order % 12
  groups = (y % 4) * 4 + xx % 4
  assert all(len(set(groups[i:i + 6])) == 1 for i in range(0, 96, 6))
  with pytest.raises(ValueError, match="tile \\* dilation must divide shape"):
    masks.tiled2d(masks.grid(shape, 2), (2, 3), dilation=(3, 3))


def test_tiled_mask_is_permuted_mask():
  m = masks.window((8, 12), 4, shift=2)
  t = masks.tiled2d(m, (4, 4), offset=(2, 2))
  p = masks.tiled_to_flat(np.arange(96), (8, 12), (4, 4), (2, 2))
  np.testing.assert_array_equal(t.to_array(96, 96)[0, 0], m.to_array(96, 96)[0, 0][np.ix_(p, p)])
  leaves, tree = jax.tree_util.tree_flatten(t)
  again = jax.tree_util.tree_unflatten(tree, leaves)
  assert again.kind == "tiled2d" and again.params == t.params


def test_tiled2d_errors():
  m = masks.neighborhood((8, 12), 3)
  with pytest.raises(ValueError, match="tile must divide shape"):
    masks.tiled2d(m, (3, 4))
  with pytest.raises(ValueError, match="shape must be given"):
    masks.tiled2d(masks.causal(), (2, 2))
  with pytest.raises(TypeError, match="mask must be"):
    masks.tiled2d("x", (2, 2))
  with pytest.raises(ValueError, match="spatial_tile"):
    ChunkedBlockSizes(spatial_tile=(0, 4))
  with pytest.raises(ValueError, match="spatial_tile"):
    ChunkedBlockSizes(spatial_tile="yes")
  q = rnd(0, (1, 96, 2, 8))
  with pytest.raises(ValueError, match="spatial_tile must have one entry per grid axis"):
    attnjax.attention(q, q, q, mask=m, implementation="xla_chunked",
                      block_sizes=ChunkedBlockSizes(spatial_tile=(5, 4)))


# ----------------------------------------------------------------- plans, fallback, opt-out


def test_plan_choices():
  tp, cfg = _plan(masks.neighborhood((16, 16), 5), 256)
  assert tp.tile == (8, 8) and (cfg.block_q, cfg.block_k) == (64, 32)
  tp, _ = _plan(masks.window((16, 16), 8, shift=4), 256)
  assert tp.offset == (4, 4)                          # patches follow the shifted windows
  tp, cfg = _plan(masks.window((16, 16), 8, shift=4), 256, "pallas_tpu")
  assert tp.tile == (16, 8) and (cfg.block_q, cfg.block_k) == (128, 128)  # 8x16 = row-major
  tp, cfg = _plan(masks.window((16, 16), 8, shift=4), 256, "pallas_gpu")
  assert tp.tile == (8, 8) and (cfg.block_q, cfg.block_k) == (64, 64)
  # automatic tiling only when it computes less than the flattened order: a 5x5
  # neighborhood on a 16-wide map with 128-key TPU tiles stays flattened
  assert _plan(masks.neighborhood((16, 16), 5), 256, "pallas_tpu")[0] is None
  from attnjax.kernels.tpu import BlockSizes
  tp, cfg = _plan(masks.neighborhood((16, 16), 5), 256, "pallas_tpu",
                  BlockSizes(spatial_tile=(8, 16)))          # an explicit patch always tiles
  assert tp.tile == (8, 16) and (cfg.block_q, cfg.block_k) == (128, 128)
  # 13x17: no patch divides the map -> flattened order (fallback, no padding)
  assert _plan(masks.neighborhood((13, 17), 3), 221)[0] is None
  # 12x20: no 64-token patch; a smaller one (4x4) is used
  assert _plan(masks.neighborhood((12, 20), 3), 240)[0].tile == (4, 4)
  # opt-out, explicit patch, non-spatial masks
  assert _plan(masks.neighborhood((16, 16), 5), 256,
               cfg=ChunkedBlockSizes(spatial_tile=False))[0] is None
  assert _plan(masks.neighborhood((16, 16), 5), 256,
               cfg=ChunkedBlockSizes(spatial_tile=(4, 16)))[0].tile == (4, 16)
  assert _plan(masks.causal(), 256)[0] is None
  assert _plan(masks.neighborhood((16, 16), 5) & masks.causal(), 256)[0] is None
  assert _plan(masks.neighborhood((16,), 5), 16)[0] is None       # 1D: nothing to gain
  # cpu_flash tiles for its block-sparse mode: 64-token patches, 64-key tiles by default
  from attnjax.cpu.flash import CpuFlashBlockSizes
  tp, cfg = _plan(masks.window((32, 32), 8, shift=4), 1024, "cpu_flash")
  assert tp.tile == (8, 8) and tp.offset == (4, 4) and (cfg.block_q, cfg.block_k) == (64, 64)
  assert _plan(masks.window((32, 32), 8, shift=4), 1024, "cpu_flash",
               CpuFlashBlockSizes(spatial_tile=False))[0] is None
  assert _plan(masks.neighborhood((13, 17), 3), 221, "cpu_flash")[0] is None


def _axial_1d_grid(shape, axis):
  """allowed[i, j] of axial attention along ``axis`` by loops: every other coordinate
  equal."""
  coords = list(itertools.product(*[range(L) for L in shape]))
  n = len(coords)
  out = np.zeros((n, n), bool)
  for i, ci in enumerate(coords):
    for j, cj in enumerate(coords):
      out[i, j] = all(a == b for ax, (a, b) in enumerate(zip(ci, cj)) if ax != axis)
  return out


@pytest.mark.parametrize("impl", ["xla_chunked", "cpu_flash"])
def test_plan_weighs_strips_and_row_aligned_tiles(impl):
  """Automatic tiling weighs a column strip and row-aligned row-major tiles beside the
  most square patch, and keeps the one computing the fewest scores: axial attention
  along the rows of an 8 x 128 map runs in the flattened order with 64-token tiles that
  hold one row's keys (no permutation: ``_spatial_tiling`` returns no plan, only the
  block sizes), along the columns of a 128 x 8 map in 64 x 1 strips; both tables
  compute exactly the allowed scores (every non-empty tile full).  Out and the vjp equal
  the loop-built reference."""
  if impl == "cpu_flash":
    _cpu_flash_or_skip()
  n = 1024
  for shape, axis, tile in (((8, 128), 1, (1, 64)), ((128, 8), 0, (64, 1))):
    mask = masks.axial(shape, axis)
    q, k, _ = _qkv(0, n, jnp.float32)
    a = args_lib.check_attention_args(q, k, k, mask=mask)
    spec = registry._TILING[impl]
    base = registry.get(impl).config_cls[0]()
    flat = base.resolve(n, n, 2) if impl == "xla_chunked" else base.resolve()[:2]
    tp = tiling.plan_tiling(a, True, None, None, spec[0], spec[1], spec[2], flat)
    assert tp is not None and tp.tile == tile, (shape, tp)
    table = tp.tiled_mask.block_table(n, n, tp.block_q, tp.block_k)
    assert np.all((table == 0) | (table == masks.FULL))
    allowed_frac = shape[axis] / n
    assert np.count_nonzero(table) * tp.block_q * tp.block_k == allowed_frac * n * n
    got, cfg = _plan(mask, n, impl)
    assert (got is None) == (tile[0] == 1)                # row-major: block sizes only
    assert (cfg.block_q, cfg.block_k) == (tp.block_q, tp.block_k)
    _check(mask, _axial_1d_grid(shape, axis), jnp.float32, impl, tiled=tile[0] != 1, N=2,
           K=1)


@pytest.mark.parametrize("impl", ["xla_chunked", "cpu_flash"])
def test_dilated_neighborhood_tiles_one_residue_class(impl):
  """A neighborhood with dilation d is tiled by patches of one residue class (dilated by
  d), where it is an undilated neighborhood: fewer tiles than square patches; out and
  the vjp equal the loop-built reference."""
  if impl == "cpu_flash":
    _cpu_flash_or_skip()
  shape = (16, 32)
  mask = masks.neighborhood(shape, 3, dilation=(4, 4))
  n = 512
  tp, cfg = _plan(mask, n, impl)
  assert tp.dilation == (4, 4), tp
  dense_2d = masks.tiled2d(mask, tiling.choose_tile(shape, tp.block_q))
  ours = np.count_nonzero(tp.tiled_mask.block_table(n, n, cfg.block_q, cfg.block_k))
  square = np.count_nonzero(dense_2d.block_table(n, n, cfg.block_q, cfg.block_k))
  assert ours < square, (ours, square)
  allowed = _grid_mask([_nbhd_1d(16, 3, 4, False), _nbhd_1d(32, 3, 4, False)])
  _check(mask, allowed, jnp.float32, impl, N=2, K=1)


@pytest.mark.parametrize("impl", ["xla_chunked", "cpu_flash"])
def test_window_tiles_stay_inside_one_window(impl):
  """A window mask whose window is not a cube is tiled by its window (not the most square
  patch, which straddles two windows along the short axis): exactly the allowed scores,
  every tile full; out and the vjp equal the loop-built reference (3D, shifted)."""
  if impl == "cpu_flash":
    _cpu_flash_or_skip()
  shape, win, shift = (4, 8, 32), (2, 4, 8), (1, 2, 4)
  mask = masks.window(shape, win, shift=shift)
  n = 1024
  tp, cfg = _plan(mask, n, impl)
  assert tp.tile == win and tp.offset == shift, tp
  assert tiling.choose_tile(shape, 64) != win                   # the square one differs
  table = tp.tiled_mask.block_table(n, n, cfg.block_q, cfg.block_k)
  assert np.count_nonzero(table) * cfg.block_q * cfg.block_k <= n * 64
  allowed = _grid_mask([_window_1d(L, w, sh) for L, w, sh in zip(shape, win, shift)])
  _check(mask, allowed, jnp.float32, impl, N=2, K=1)


@pytest.mark.parametrize("impl", ["xla_chunked", "cpu_flash"])
def test_grid_mask_tiles_are_its_groups(impl):
  """A MaxViT grid mask is tiled by its groups (patches of its G grid dilated by the
  steps L / G): the table is block diagonal, every non-empty tile full, exactly the
  allowed scores; out and the vjp equal the loop-built reference."""
  if impl == "cpu_flash":
    _cpu_flash_or_skip()
  shape, G = (16, 32), (4, 4)
  mask = masks.grid(shape, G)
  n = 512
  tp, cfg = _plan(mask, n, impl)
  assert tp.tile == G and tp.dilation == (4, 8) and cfg.block_q == 16
  table = tp.tiled_mask.block_table(n, n, cfg.block_q, cfg.block_k)
  assert np.all((table == 0) | (table == masks.FULL))
  assert np.count_nonzero(table) * cfg.block_q * cfg.block_k == n * 16
  steps = (4, 8)
  allowed = _grid_mask([np.equal.outer(np.arange(L) % st, np.arange(L) % st)
                        for L, st in zip(shape, steps)])
  _check(mask, allowed, jnp.float32, impl, N=2, K=1)


def test_tile_density_2d_below_flat():
  """Neighborhood 7: on 32x32, the tiled call computes fewer score entries than the
  flattened one at 'xla_chunked''s defaults; on 64x64, fewer tiles at the same block
  sizes; the table is exact (a tile is non-empty iff an allowed pair falls in it)."""
  m = masks.neighborhood((32, 32), 7)
  tp, cfg = _plan(m, 1024)
  tiled = tp.tiled_mask.block_table(1024, 1024, cfg.block_q, cfg.block_k)
  fq, fk = ChunkedBlockSizes().resolve(1024, 1024, 2)
  flat = m.block_table(1024, 1024, fq, fk)
  w2 = np.count_nonzero(tiled) * cfg.block_q * cfg.block_k / 1024 ** 2
  w1 = np.count_nonzero(flat) * fq * fk / 1024 ** 2
  print(f"neighborhood 7 on 32x32: 2D {cfg.block_q}x{cfg.block_k} tiles compute {w2:.3f} of "
        f"the scores, flattened {fq}x{fk} tiles {w1:.3f}")
  assert w2 < 0.5 * w1
  arr = np.asarray(tp.tiled_mask.to_array(1024, 1024))[0, 0]
  brute = arr.reshape(16, 64, 32, 32).any(axis=(1, 3))
  np.testing.assert_array_equal(tiled[0, 0] != 0, brute)
  m = masks.neighborhood((64, 64), 7)
  t2 = np.mean(masks.tiled2d(m, (8, 8)).block_table(4096, 4096, 64, 32) != 0)
  t1 = np.mean(m.block_table(4096, 4096, 64, 32) != 0)
  print(f"neighborhood 7 on 64x64, 64x32 tiles: 2D density {t2:.4f}, flattened {t1:.4f}")
  assert t2 < 0.75 * t1


# ----------------------------------------------------------------- exactness, xla_chunked


_SLOW = pytest.mark.slow


@pytest.mark.parametrize("case,dtype", [
    ("nbhd", jnp.float32), ("window_shift", jnp.float32), ("nbhd_dil_causal", jnp.bfloat16),
    ("nbhd_13x17", jnp.float32), ("nbhd_12x20", jnp.float32),
    pytest.param("nbhd", jnp.bfloat16, marks=_SLOW),
    pytest.param("window_shift", jnp.bfloat16, marks=_SLOW),
    pytest.param("nbhd_dil_causal", jnp.float32, marks=_SLOW),
    pytest.param("nbhd_13x17", jnp.bfloat16, marks=_SLOW),
    pytest.param("nbhd_12x20", jnp.bfloat16, marks=_SLOW)])
def test_xla_chunked_exact(case, dtype):
  """13x17 has no dividing patch: flattened order (fallback); 12x20 a 4x4 patch."""
  mask, allowed = CASES[case]()
  _check(mask, allowed, dtype, "xla_chunked", tiled=case != "nbhd_13x17")


def test_xla_chunked_loop_path_with_bias():
  """A bias (permuted with the tokens) keeps the tile loop; still exact."""
  mask, allowed = CASES["window_shift"]()
  bias = rnd(11, (1, 4, 256, 256))
  _check(mask, allowed, jnp.float32, "xla_chunked", bias=bias)


def test_score_mod_and_lse_in_grid_order():
  """score_mod indices are grid indices; lse comes back in row-major order."""
  mask = masks.neighborhood((16, 16), 3)
  q, k, v = _qkv(3, 256, jnp.float32)
  sm = lambda s, b, h, qi, ki: s + 0.01 * ((qi * 7 + ki * 3) % 11).astype(s.dtype)
  kw = dict(mask=mask, score_mod=sm, return_lse=True)
  o, lse = attnjax.attention(q, k, v, implementation="xla_chunked", **kw)
  o_r, lse_r = attnjax.attention(q, k, v, implementation="reference", **kw)
  assert_close(o, o_r, jnp.float32, "out")
  assert_close(lse, lse_r, jnp.float32, "lse")


@pytest.mark.slow
@pytest.mark.parametrize("block_sizes", [
    ChunkedBlockSizes(block_q=32, block_k=16, spatial_tile=(4, 8)),
    ChunkedBlockSizes(block_q=64, block_k=64, spatial_tile=(8, 8))])
def test_xla_chunked_gathered_and_loop_paths(block_sizes):
  """Small key tiles take the gathered path, large ones the loop (longest list over
  half the keys); both exact.  The patches are given (``spatial_tile``): the automatic
  choice keeps the flattened order here, where 2D tiles would not compute fewer scores."""
  mask, allowed = CASES["nbhd"]()
  _check(mask, allowed, jnp.float32, "xla_chunked", block_sizes=block_sizes, N=2, K=2)


# ----------------------------------------------------------------- exactness, cpu_flash


def _cpu_flash_or_skip():
  from attnjax.cpu import build
  if build.unavailable_reason() is not None and not __import__("os").environ.get("CI"):
    pytest.skip(f"cpu_flash unavailable: {build.unavailable_reason()}")
  from attnjax.cpu.flash import CpuFlashBlockSizes
  return CpuFlashBlockSizes


@pytest.mark.parametrize("case,dtype", [
    ("nbhd", jnp.float32), ("window_shift", jnp.float32), ("nbhd_dil_causal", jnp.bfloat16),
    ("nbhd_13x17", jnp.float32), ("nbhd_12x20", jnp.float32),
    pytest.param("nbhd", jnp.bfloat16, marks=_SLOW),
    pytest.param("nbhd_13x17", jnp.bfloat16, marks=_SLOW)])
def test_cpu_flash_block_sparse_exact(case, dtype):
  """cpu_flash's block-sparse mode in the tiled order (4 x 4 patches, 16-key tiles;
  13x17: no dividing patch, flattened order): out and the vjp against the loop-built
  reference, GQA."""
  tile = True if case == "nbhd_13x17" else (4, 4)
  bs = _cpu_flash_or_skip()(block_q=16, block_k=16, spatial_tile=tile)
  mask, allowed = CASES[case]()
  _check(mask, allowed, dtype, "cpu_flash", block_sizes=bs, tiled=case != "nbhd_13x17")


# ----------------------------------------------------------------- Pallas (interpreted)


def _pallas_bs(impl, tile):
  from attnjax.kernels.gpu import BlockSizes as GB
  from attnjax.kernels.tpu import BlockSizes as TB
  return (TB if impl == "pallas_tpu" else GB)(spatial_tile=tile)


def test_pallas_gpu_interpreted_exact():
  mask, allowed = CASES["window_shift"]()                  # automatic: 8x8 patches
  _check(mask, allowed, jnp.float32, "pallas_gpu", N=2, K=1)


def test_pallas_tpu_interpreted_exact():
  mask, allowed = CASES["nbhd_dil_causal"]()               # explicit 8x16 patches
  _check(mask, allowed, jnp.float32, "pallas_tpu", _pallas_bs("pallas_tpu", (8, 16)), N=2, K=1)


@pytest.mark.slow
@pytest.mark.parametrize("impl,tile", [("pallas_tpu", (16, 8)), ("pallas_gpu", (8, 8))])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_interpreted_exact_slow(impl, tile, dtype):
  mask, allowed = CASES["nbhd"]()
  _check(mask, allowed, dtype, impl, _pallas_bs(impl, tile), N=2, K=1)


def _brute_nonempty(mask, T, bq, bk):
  arr = np.asarray(mask.to_array(T, T))[0, 0]
  tiles = arr.reshape(T // bq, bq, T // bk, bk).any(axis=(1, 3))
  return int(tiles.sum()), int((~tiles.any(-1)).sum()), int((~tiles.any(-2)).sum())


def test_grid_steps_equal_nonempty_tiles():
  """The TPU grid has one step per non-empty tile of the tiled mask (plus idle steps
  for empty rows/cols); the GPU lists hold the same tiles; fewer than flattened."""
  from attnjax.kernels.gpu import BlockSizes as GB
  from attnjax.kernels.gpu import grid_steps as gpu_steps
  from attnjax.kernels.tpu import BlockSizes, grid_steps
  m = masks.neighborhood((32, 32), 5)
  T = 1024
  q = jnp.zeros((1, T, 1, 64))
  tp, cfg = _plan(m, T, "pallas_tpu", BlockSizes(spatial_tile=(8, 16)), N=1, K=1)
  tm = tp.tiled_mask
  info = grid_steps(q, q, q, mask=tm, block_sizes=cfg)
  nonempty, er, ec = _brute_nonempty(tm, T, cfg.block_q, cfg.block_k)
  assert info["fwd_active"] == nonempty and info["fwd_steps"] == nonempty + er
  assert info["dkv_active"] == nonempty and info["dkv_steps"] == nonempty + ec
  assert nonempty < (T // cfg.block_q) * (T // cfg.block_k)
  gp, gcfg = _plan(m, T, "pallas_gpu", GB(spatial_tile=(8, 8)), N=1, K=1)
  gm = gp.tiled_mask
  ginfo = gpu_steps(q, q, q, mask=gm, block_sizes=gcfg)
  assert ginfo["fwd_active"] == _brute_nonempty(gm, T, gcfg.block_q, gcfg.block_k)[0]


# ----------------------------------------------------------------- lowering


def test_pallas_gpu_interpreted_grid_groups():
  """The dilated grid-group order through the GPU kernel (interpreted): exact."""
  shape = (16, 16)
  mask = masks.grid(shape, (4, 4))
  tp, _ = _plan(mask, 256, "pallas_gpu", N=2, K=1)
  assert tp is not None and tp.dilation == (4, 4)
  allowed = _grid_mask([np.equal.outer(np.arange(16) % 4, np.arange(16) % 4)] * 2)
  _check(mask, allowed, jnp.float32, "pallas_gpu", N=2, K=1)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_lowering_tiled(platform):
  """Forward and grad of the tiled call (permute, kernel on the tiled2d mask,
  un-permute) lower for TPU (Mosaic) and CUDA (Triton)."""
  from attnjax.kernels.gpu import flash as gpu_flash
  from attnjax.kernels.tpu import flash as tpu_flash
  kmod = tpu_flash if platform == "tpu" else gpu_flash
  impl = "pallas_tpu" if platform == "tpu" else "pallas_gpu"
  m = masks.window((16, 16), 8, shift=4)
  q, k, v = _qkv(0, 256, jnp.bfloat16, N=4, K=2, H=64)

  def fwd(q, k, v):
    a = args_lib.check_attention_args(q, k, v, mask=m)
    tp, cfg = registry._spatial_tiling(registry.get(impl), a, None)
    assert tp is not None
    qt, kt, vt, at = tiling.tile_call(q, k, v, a, tp)
    o = kmod.flash_attention(qt, kt, vt, **at.kwargs(), block_sizes=cfg, interpret=False)
    return tiling.untile_outputs(o, tp, False)

  def loss(q, k, v):
    return jnp.sum(fwd(q, k, v).astype(jnp.float32))

  export_for(platform, fwd, q, k, v)
  text = export_for(platform, jax.grad(loss, argnums=(0, 1, 2)), q, k, v).mlir_module()
  assert ("tpu_custom_call" if platform == "tpu" else "triton") in text
