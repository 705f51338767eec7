"""Typed masks: structure instead of names, pytrees, traced offsets as kernel scalars.

* Every mask carries ``kind`` / ``params`` / ``children`` / ``arrays``; the kernels and
  block-table builders read those, so a user mask *named* like a built-in one is still
  computed as what it is (checked in every implementation against the reference).
* Masks are pytrees (leaves = their arrays, traced offsets included): they cross
  ``jit`` boundaries; flatten/unflatten round trips.
* Band offsets given as JAX scalars reach the Pallas kernels as scalar operands: the
  jaxpr of forward and backward (sub-jaxprs included) and the exported StableHLO hold
  no integer/boolean array of ``T * S`` or more elements; interpret-mode numerics match
  the reference forward and backward.
* Bands by structure: ``cpu_flash`` serves ``~causal()`` and unions of bands that are
  intervals, and refuses a union that is not.
"""

import re

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import masks as M
from attnjax.core import plan as plan_lib
from attnjax.cpu import build as cpu_build
from attnjax.kernels.gpu import flash as gpu_flash
from attnjax.kernels.tpu import flash as tpu_flash
from attnjax.ops.dense import reference_attention

TOL = {jnp.float32: {"atol": 2e-5, "rtol": 2e-5}, jnp.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}
CPU_FLASH_OK = cpu_build.unavailable_reason() is None


def _rand(rng, shape, dtype=jnp.float32):
  return jnp.asarray(rng.standard_normal(shape), dtype)


def _qkv(seed, B, T, S, N, K, H, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q, k, v = _rand(rng, (B, T, N, H), dtype), _rand(rng, (B, S, K, H), dtype), \
      _rand(rng, (B, S, K, H), dtype)
  ct = _rand(rng, (B, T, N, H), dtype)
  return q, k, v, ct


def _fwd_bwd(impl, make_mask, q, k, v, ct, *scalars, block_sizes=None):
  """``(out, (dq, dk, dv))`` of ``impl`` with the mask built from ``scalars`` inside jit."""
  def g(q, k, v, ct, *sc):
    mask = make_mask(*sc)
    def f(q, k, v):
      if impl == "reference":
        return reference_attention(q, k, v, mask=mask)
      return attnjax.attention(q, k, v, mask=mask, implementation=impl,
                               block_sizes=block_sizes)
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(ct)
  return jax.jit(g)(q, k, v, ct, *[jnp.int32(s) for s in scalars])


def _assert_match(got, want, dtype=jnp.float32):
  (go, gg), (wo, wg) = got, want
  tol = TOL[dtype]
  np.testing.assert_allclose(np.asarray(go, np.float32), np.asarray(wo, np.float32), **tol)
  for i, (a, b) in enumerate(zip(gg, wg)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.all(np.isfinite(a)), f"grad {i} not finite"
    np.testing.assert_allclose(a, b, **tol, err_msg=f"grad {i}")


# =============================================================================== structure


def test_kinds_params_children_arrays():
  ids = jnp.asarray(np.repeat(np.arange(2), 4)[None])
  bm = jnp.asarray(np.eye(2, dtype=bool))
  arr = np.tri(8, dtype=bool)
  off = jnp.int32(3)
  fn = lambda b, h, q, kv: kv <= q
  cases = [
      (M.full(), "full", {}, []),
      (M.causal(2), "causal", {"offset": 2}, []),
      (M.causal(off), "causal", {}, ["offset"]),
      (M.sliding_window(4, 1), "sliding_window", {"left": 4, "right": 1, "offset": 0}, []),
      (M.sliding_window(4, offset=off), "sliding_window", {"left": 4, "right": 0}, ["offset"]),
      (M.chunked(4), "chunked", {"size": 4}, []),
      (M.prefix_lm(3), "prefix_lm", {"prefix_len": 3}, []),
      (M.dual_triangle(), "dual_triangle", {}, []),
      (M.document(ids), "document", {}, ["q_segment_ids", "kv_segment_ids"]),
      (M.neighborhood((4, 4), 3), "neighborhood",
       {"shape": (4, 4), "kernel": (3, 3), "dilation": (1, 1), "causal": (False, False)}, []),
      (M.window((4, 4), 2, 1), "window", {"shape": (4, 4), "window": (2, 2), "shift": (1, 1)}, []),
      (M.grid((4, 4), 2), "grid", {"shape": (4, 4), "grid": (2, 2)}, []),
      (M.axial((4, 4), 1), "axial", {"shape": (4, 4), "axis": 1}, []),
      (M.criss_cross((4, 4)), "criss_cross", {"shape": (4, 4)}, []),
      (M.from_array(arr), "array", {}, ["array"]),
      (M.from_fn(fn, name="x"), "fn", {"fn": fn, "name": "x"}, []),
      (M.from_block_mask(bm, 4, 4), "block_mask", {"block_q": 4, "block_k": 4}, ["block_mask"]),
      (M.causal().shifted(off, 2), "shifted", {"kv_offset": 2}, ["q_offset"]),
  ]
  for m, kind, params, arrays in cases:
    assert m.kind == kind and kind in M.KINDS, m.name
    assert m.params == params, (m.name, m.params)
    assert list(m.arrays) == arrays, (m.name, m.arrays)
  a, b = M.causal(), M.chunked(4)
  assert (a & b).kind == "and" and (a & b).children == (a, b)
  assert (a | b).kind == "or" and (a | b).children == (a, b)
  assert (~a).kind == "not" and (~a).children == (a,)
  assert a.shifted(1, 2).children == (a,) and a.shifted(1, 2).params == {"q_offset": 1,
                                                                         "kv_offset": 2}
  # Arrays are the very objects given; segment_ids comes from kind 'document'.
  d = M.document(ids)
  assert d.arrays["q_segment_ids"] is ids and d.segment_ids[1] is ids
  assert M.from_fn(fn, name="document").segment_ids is None


def test_plan_splits_by_kind_not_name():
  fn = lambda b, h, q, kv: kv <= q
  fakes = [M.from_fn(fn, name="from_block_mask(16, 16)"), M.from_fn(fn, name="document"),
           M.from_fn(fn, name="causal(0)")]
  for m in fakes:
    assert plan_lib._split_mask(m) == ([m], [], [])
  ids = jnp.zeros((1, 8), jnp.int32)
  doc, bm = M.document(ids), M.from_block_mask(jnp.ones((2, 2), bool), 4, 4)
  others, docs, blocks = plan_lib._split_mask((M.causal() & doc) & (bm & fakes[0]))
  assert others[0].kind == "causal" and others[1] is fakes[0]
  assert docs == [doc] and blocks == [bm]


# =============================================================================== pytrees


def _some_masks():
  ids = jnp.asarray(np.repeat(np.arange(3), 4)[None].repeat(2, 0))
  bm = jnp.asarray(np.random.default_rng(0).random((2, 1, 3, 3)) > 0.4)
  return [
      M.causal(jnp.int32(2)), M.causal(-1), M.document(ids), M.from_block_mask(bm, 4, 4),
      M.from_array(jnp.asarray(np.random.default_rng(1).random((12, 12)) > 0.5)),
      M.from_array(np.tri(12, dtype=bool)),
      M.sliding_window(3, 1, offset=jnp.int32(-2)) & ~M.causal(jnp.int32(-6)),
      (M.causal() | M.chunked(4)).shifted(jnp.int32(1), 2), M.criss_cross((3, 4)),
      M.neighborhood((3, 4), 3) & M.dual_triangle(), M.from_fn(lambda b, h, q, kv: q != kv),
      M.prefix_lm(5) & M.document(ids),
  ]


def test_tree_leaves_are_exactly_the_arrays():
  off, off2 = jnp.int32(4), jnp.int32(1)
  ids = jnp.asarray(np.arange(12)[None] // 5)
  bm = jnp.ones((3, 3), bool)
  m = (M.causal(off) & M.document(ids)) | M.from_block_mask(bm, 4, 4).shifted(off2, 0)
  leaves = jax.tree_util.tree_leaves(m)
  assert len(leaves) == 5
  for got, want in zip(leaves, [off, ids, ids, bm, off2]):
    assert got is want
  assert jax.tree_util.tree_leaves(M.causal(3) & M.chunked(4)) == []
  assert jax.tree_util.tree_leaves(M.from_fn(lambda b, h, q, kv: q >= kv)) == []


@pytest.mark.parametrize("i", range(12))
def test_flatten_unflatten_round_trip(i):
  m = _some_masks()[i]
  leaves, treedef = jax.tree_util.tree_flatten(m)
  m2 = jax.tree_util.tree_unflatten(treedef, leaves)
  assert (m2.kind, m2.params, m2.name) == (m.kind, m.params, m.name)
  assert list(m2.arrays) == list(m.arrays)
  np.testing.assert_array_equal(np.asarray(m2.to_array(12, 12, 4, 2)),
                                np.asarray(m.to_array(12, 12, 4, 2)))
  # Through jit: the rebuilt mask evaluates the same on traced leaves.
  got = jax.jit(lambda mm: mm.to_array(12, 12, 4, 2))(m)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(m.to_array(12, 12, 4, 2)))
  # tree_map to non-arrays keeps the structure (the result cannot be evaluated).
  shapes = jax.tree_util.tree_map(lambda x: np.shape(x), m)
  assert isinstance(shapes, M.Mask) and shapes.kind == m.kind


@pytest.mark.parametrize("which", ["document", "block_mask", "causal_offset"])
def test_masks_cross_jit(which):
  B, T, N, H = 2, 48, 2, 16
  q, k, v, _ = _qkv(3, B, T, T, N, N, H)
  if which == "document":
    ids = np.sort(np.random.default_rng(0).integers(0, 4, (B, T)), axis=1)
    mask = M.document(jnp.asarray(ids))
  elif which == "block_mask":
    mask = M.from_block_mask(jnp.asarray(np.random.default_rng(0).random((B, 1, 3, 3)) > 0.4),
                             16, 16)
  else:
    mask = M.causal(offset=jnp.int32(-5))
  traces = []

  @jax.jit
  def f(m, q, k, v):
    traces.append(1)
    return attnjax.attention(q, k, v, mask=m, implementation="xla_chunked")

  got = f(mask, q, k, v)
  want = reference_attention(q, k, v, mask=mask.to_array(T, T, 1, B))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL[jnp.float32])
  if which == "causal_offset":
    # A new offset value is a new leaf value: no retrace, a different result.
    got2 = f(M.causal(offset=jnp.int32(7)), q, k, v)
    want2 = reference_attention(q, k, v, mask=M.causal(7))
    np.testing.assert_allclose(np.asarray(got2), np.asarray(want2), **TOL[jnp.float32])
    assert len(traces) == 1
    assert not np.allclose(np.asarray(got), np.asarray(got2))


# =============================================================================== no [T, S]


def _sub_jaxprs(p):
  if isinstance(p, jex.core.ClosedJaxpr):
    return [p.jaxpr]
  if isinstance(p, jex.core.Jaxpr):
    return [p]
  if isinstance(p, (tuple, list)):
    return [j for x in p for j in _sub_jaxprs(x)]
  return []


def _big_mask_like(closed, limit):
  """Integer/boolean values with at least ``limit`` elements, in the jaxpr and every
  sub-jaxpr (jit, custom_vjp, scans, ...) except Pallas kernel bodies: a mask enters a
  kernel as an operand of ``pallas_call``, checked here; a body only holds tiles (at
  decode shapes a ``[16 rows, block_k]`` tile can exceed ``T * S`` without being a mask)."""
  out = []

  def check(v, where):
    aval = v.aval
    shape, dtype = getattr(aval, "shape", None), getattr(aval, "dtype", None)
    if shape is None or dtype is None or jnp.issubdtype(dtype, jnp.inexact):
      return
    if int(np.prod(shape, dtype=np.int64)) >= limit:
      out.append((where, str(aval)))

  def walk(j):
    for v in list(j.invars) + list(j.constvars):
      check(v, "input")
    for e in j.eqns:
      for v in e.outvars:
        check(v, e.primitive.name)
      if e.primitive.name == "pallas_call":
        continue
      for p in e.params.values():
        for s in _sub_jaxprs(p):
          walk(s)
  walk(closed.jaxpr)
  return out


OFFSET_MASKS = {
    "causal": lambda o: M.causal(offset=o),
    "window_and_causal": lambda o: M.sliding_window(300, offset=o) & M.causal(offset=o),
    "shifted": lambda o: (M.causal() & M.sliding_window(1000)).shifted(o, 0),
}


def _no_big(impl, T, S, fam, N=4, K=2, H=64):
  q = jax.ShapeDtypeStruct((1, T, N, H), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, S, K, H), jnp.bfloat16)
  off = jax.ShapeDtypeStruct((), jnp.int32)
  make = OFFSET_MASKS[fam]

  def fwd(q, k, v, off):
    return attnjax.attention(q, k, v, mask=make(off), implementation=impl)

  def bwd(q, k, v, off):
    out, vjp = jax.vjp(lambda q, k, v: fwd(q, k, v, off), q, k, v)
    return vjp(out)

  for fn in (fwd, bwd):
    big = _big_mask_like(jax.make_jaxpr(fn)(q, k, k, off), T * S)
    assert not big, (impl, fn.__name__, big[:4])


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu", "xla_chunked"])
@pytest.mark.parametrize("T", [512, 1, 16])
def test_traced_causal_offset_builds_no_T_by_S_array(impl, T):
  # At T=1 the backward's boolean row-validity mask [B, N, 16 padded rows, Hv] of
  # N=4, Hv=64 has 4096 = T*S elements without being a mask: use MQA with N=2 there.
  N, K = (2, 1) if T == 1 else (4, 2)
  _no_big(impl, T, 4096, "causal", N=N, K=K)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("fam", ["window_and_causal", "shifted"])
def test_traced_band_offsets_build_no_T_by_S_array(impl, fam):
  _no_big(impl, 16, 4096, fam)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("T", [64, 1])
def test_walker_flags_a_dense_mask(impl, T):
  """The check can fail: a dense mask (a from_fn predicate closing over a JAX array of
  offsets) is materialised and caught, at full and decode shapes."""
  S = 512
  q = jax.ShapeDtypeStruct((1, T, 2, 64), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, S, 2, 64), jnp.bfloat16)
  offs = jax.ShapeDtypeStruct((2,), jnp.int32)

  def fn(q, k, v, offs):
    m = M.from_fn(lambda b, h, qi, kv: kv <= qi + offs[0])
    return attnjax.attention(q, k, v, mask=m, implementation=impl)
  assert _big_mask_like(jax.make_jaxpr(fn)(q, k, k, offs), T * S)


_TENSOR = re.compile(r"tensor<([0-9x]+)x(i1|i8|i16|i32|i64|ui\d+)>")


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("T", [512, 8])
def test_export_traced_offset_has_no_T_by_S_tensor(platform, T):
  S, N, K, H = 4096, 4, 2, 64
  mod = tpu_flash if platform == "tpu" else gpu_flash
  q = jax.ShapeDtypeStruct((1, T, N, H), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, S, K, H), jnp.bfloat16)
  off = jax.ShapeDtypeStruct((), jnp.int32)

  def fwd(q, k, v, off):
    return mod.flash_attention(q, k, v, mask=M.causal(offset=off), interpret=False)

  def grad(q, k, v, off):
    return jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v, off).astype(jnp.float32)),
                    argnums=(0, 1, 2))(q, k, v)

  kw = {} if platform == "tpu" else {"disabled_checks": [
      jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]}
  for fn in (fwd, grad):
    text = jax.export.export(jax.jit(fn), platforms=[platform], **kw)(q, k, k, off).mlir_module()
    assert ("tpu_custom_call" if platform == "tpu" else "triton") in text
    sizes = [int(np.prod([int(d) for d in dims.split("x")])) for dims, _ in _TENSOR.findall(text)]
    assert sizes and max(sizes) < T * S, (fn.__name__, max(sizes))


# =============================================================================== numerics


SMALL = {"B": 2, "T": 24, "S": 200, "N": 4, "K": 2, "H": 64}
NUMERIC_MASKS = {
    "causal": (lambda o: M.causal(offset=o), (150,)),
    "window": (lambda o: M.sliding_window(40, 3, offset=o), (120,)),
    "shifted": (lambda o, p: (M.causal() & M.sliding_window(60)).shifted(o, p), (170, -4)),
}


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu", "xla_chunked"])
@pytest.mark.parametrize("fam", sorted(NUMERIC_MASKS))
def test_traced_offsets_match_reference(impl, fam):
  make, offs = NUMERIC_MASKS[fam]
  s = SMALL
  q, k, v, ct = _qkv(7, s["B"], s["T"], s["S"], s["N"], s["K"], s["H"])
  got = _fwd_bwd(impl, make, q, k, v, ct, *offs)
  want = _fwd_bwd("reference", make, q, k, v, ct, *offs)
  _assert_match(got, want)
  # The offsets are live: other values give other results (and still match).  Only the
  # first moves (moving q and kv offsets together leaves a band unchanged).
  offs2 = (offs[0] - 37, *offs[1:])
  got2 = _fwd_bwd(impl, make, q, k, v, ct, *offs2)
  _assert_match(got2, _fwd_bwd("reference", make, q, k, v, ct, *offs2))
  assert not np.allclose(np.asarray(got[0]), np.asarray(got2[0]))


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_traced_offset_decode_matches_reference(impl):
  q, k, v, ct = _qkv(8, 2, 1, 300, 4, 2, 64)
  make = lambda o: M.causal(offset=o)
  _assert_match(_fwd_bwd(impl, make, q, k, v, ct, 250),
                _fwd_bwd("reference", make, q, k, v, ct, 250))


# =============================================================================== bands


BAND_MASKS = {
    "not_causal": lambda: ~M.causal(),
    "not_causal_offset": lambda: ~M.causal(-7),
    "window_or_causal": lambda: M.sliding_window(5) | M.causal(),
    "causal_or_right_window": lambda: M.causal() | M.sliding_window(0, 3),
    "window_or_shifted_window": lambda: M.sliding_window(4) | M.sliding_window(0, 6, offset=1),
    "not_prefix": lambda: ~M.prefix_lm(9),
}


@pytest.mark.skipif(not CPU_FLASH_OK, reason=f"cpu_flash: {cpu_build.unavailable_reason()}")
@pytest.mark.parametrize("fam", sorted(BAND_MASKS))
def test_cpu_flash_serves_structural_bands(fam):
  make = BAND_MASKS[fam]
  T, S = 40, 56
  lo, hi = make().row_band(T, S)
  kv = np.arange(S)
  band = (kv[None] >= lo[:, None]) & (kv[None] <= hi[:, None])
  np.testing.assert_array_equal(band, make().to_array(T, S)[0, 0])
  q, k, v, ct = _qkv(11, 2, T, S, 4, 2, 32)
  # Only 'cpu_flash': a fallback would raise instead of running another implementation.
  _assert_match(_fwd_bwd("cpu_flash", make, q, k, v, ct),
                _fwd_bwd("reference", make, q, k, v, ct))


@pytest.mark.skipif(not CPU_FLASH_OK, reason=f"cpu_flash: {cpu_build.unavailable_reason()}")
def test_cpu_flash_serves_not_causal_traced_offset():
  make = lambda o: ~M.causal(offset=o)
  q, k, v, ct = _qkv(12, 1, 32, 48, 2, 2, 32)
  _assert_match(_fwd_bwd("cpu_flash", make, q, k, v, ct, 5),
                _fwd_bwd("reference", make, q, k, v, ct, 5))


def test_non_interval_union_is_not_a_band():
  m = M.sliding_window(1) | M.sliding_window(0, 0, offset=5)    # {q-1, q} and {q+5}
  assert m.row_band(16, 24) is None
  assert (~M.sliding_window(2, 2)).row_band(16, 16) is None
  if not CPU_FLASH_OK:
    return
  # Not a band: cpu_flash serves it in its block-sparse mode (not as a band), exactly.
  q, k, v, ct = _qkv(13, 1, 16, 24, 2, 2, 32)
  _assert_match(_fwd_bwd("cpu_flash", lambda: m, q, k, v, ct),
                _fwd_bwd("reference", lambda: m, q, k, v, ct))


# =============================================================================== names


FAKE_NAMES = ["from_block_mask(16, 16)", "causal(0)", "document", "from_block_mask(16, 128)",
              "from_block_mask(16, 64)"]
NAME_IMPLS = {
    "xla": None, "xla_chunked": None,
    "pallas_tpu": tpu_flash.BlockSizes(block_q=16, block_k=128),
    "pallas_gpu": gpu_flash.BlockSizes(block_q=16, block_k=64),
}


@pytest.mark.parametrize("impl", sorted(NAME_IMPLS))
@pytest.mark.parametrize("name", FAKE_NAMES)
def test_user_mask_named_like_builtin(impl, name):
  """A from_fn mask named like a built-in is computed as its predicate says."""
  pred = lambda b, h, q, kv: (kv <= q + 40) & ((q + 2 * kv + h) % 5 != 0)
  make = lambda: M.from_fn(pred, name=name)
  assert make().name == name and make().kind == "fn"
  q, k, v, ct = _qkv(17, 1, 32, 256, 2, 1, 32)
  _assert_match(_fwd_bwd(impl, make, q, k, v, ct, block_sizes=NAME_IMPLS[impl]),
                _fwd_bwd("reference", make, q, k, v, ct))


@pytest.mark.skipif(not CPU_FLASH_OK, reason=f"cpu_flash: {cpu_build.unavailable_reason()}")
@pytest.mark.parametrize("name", FAKE_NAMES)
def test_user_mask_named_like_builtin_cpu_flash(name):
  """cpu_flash serves a named band only by structure: a from_fn predicate (head- and
  row-dependent in general) is refused, never computed as the band its name says."""
  q, k, v, _ = _qkv(18, 1, 16, 32, 2, 2, 32)
  m = M.from_fn(lambda b, h, q, kv: kv <= q, name=name)
  with pytest.raises(NotImplementedError, match="band"):
    attnjax.attention(q, k, v, mask=m, implementation="cpu_flash")
