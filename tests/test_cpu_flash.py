"""'cpu_flash' (the C++ XLA FFI kernel) against reference_attention, fwd + bwd.

Runs the shared `AttentionTestBase` for every feature the kernel serves; for the
features it does not serve, checks that an explicit request raises
NotImplementedError naming the feature and that a fallback list moves on.
"""

import dataclasses
import os
import re
import subprocess
import sys
import textwrap

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import MASK_FAMILIES, AttentionTestBase, assert_close, make_qkv, rnd

import attnjax
from attnjax import masks
from attnjax.cpu import build, flash
from attnjax.cpu.flash import CpuFlashBlockSizes

# Machines without AVX2/FMA (or AVX-512) or a C++ compiler skip (the kernel cannot
# exist there);
# CI (this project's machine) must build it, so there the tests run and fail instead.
pytestmark = pytest.mark.skipif(
    build.unavailable_reason() is not None and not os.environ.get("CI"),
    reason=f"cpu_flash unavailable on this machine: {build.unavailable_reason()}")

# Band masks run the band kernel; the others ('dual', 'or_not', 'array') the
# block-sparse mode.
FAMILIES = tuple(sorted(MASK_FAMILIES))
EXAMPLES = 8


def _custom_calls(fn, *args):
  text = jax.jit(fn).lower(*args).as_text()
  return [name for name in build.TARGETS.values() if name in text]


class TestCpuFlash(AttentionTestBase):
  IMPL = "cpu_flash"
  MATMUL = "auto"
  # Small tiles so the short test sequences cross several tiles (empty, partial, full).
  BLOCK_SIZES = CpuFlashBlockSizes(block_q=8, block_k=16)

  @hypothesis.settings(max_examples=EXAMPLES)
  @hypothesis.given(
      B=st.integers(1, 2), T=st.integers(1, 70), S=st.integers(1, 70),
      heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 4), (6, 2)]),
      H=st.sampled_from([32, 64, 128]), Hv=st.sampled_from([None, 16, 48]),
      family=st.sampled_from(FAMILIES), dtype=st.sampled_from(["float32", "bfloat16"]))
  def test_matches_reference(self, B, T, S, heads, H, Hv, family, dtype):
    N, K = heads
    dtype = jnp.dtype(dtype)
    if family in ("prefix", "dual", "or_not", "causal0", "chunked_causal", "window"):
      S = T
    q, k, v = make_qkv(T * 7 + S, B, T, S, N, K, H, Hv or H, dtype)
    self.check(q, k, v, dtype, mask=MASK_FAMILIES[family](T, S))

  @pytest.mark.parametrize("mask", [
      masks.causal(), masks.sliding_window(70, 9), masks.chunked(48) & masks.causal(),
      masks.prefix_lm(100), masks.causal(-40) & masks.sliding_window(30, 0)],
      ids=lambda m: m.name)
  def test_many_tiles_default_blocks(self, mask):
    """Default tile sizes over 3 x 3 tiles with ragged edges; the last mask leaves
    the first 40 rows empty."""
    self.BLOCK_SIZES = CpuFlashBlockSizes(matmul=self.MATMUL)
    q, k, v = make_qkv(50, 1, 181, 181, 6, 2, 64, 64, jnp.float32)
    self.check(q, k, v, jnp.float32, mask=mask)

  @pytest.mark.parametrize("sparse", [False, True], ids=["band", "block_sparse"])
  def test_recycled_scratch_holds_no_stale_data(self, sparse):
    """The kernel's large scratch blocks (packed K/V, dq accumulators: over 1 MiB here)
    are recycled between calls (ScratchCache).  A first call on inputs full of NaN and
    huge values leaves them poisoned; later calls on clean inputs of the same and of a
    slightly smaller ragged shape (so they reuse the blocks) must match the reference,
    forward and vjp: every element a call reads it has written."""
    mask = masks.neighborhood((24, 24), 5) if sparse else masks.causal()
    bs = CpuFlashBlockSizes(matmul=self.MATMUL)
    T = 576
    q, k, v = make_qkv(61, 1, T, T, 8, 8, 64, 64, jnp.float32)
    poison = lambda x: jnp.where(jnp.arange(x.shape[1])[None, :, None, None] % 3 == 0,
                                 jnp.nan, x * 1e30)
    step = jax.jit(lambda q, k, v: jax.vjp(
        lambda q, k, v: attnjax.attention(q, k, v, mask=mask, implementation="cpu_flash",
                                          block_sizes=bs), q, k, v)[1](q))
    self.BLOCK_SIZES = bs
    cases = [(q, k, v)]
    if not sparse:            # a ragged, shorter sequence reuses the same blocks
      cases.append(tuple(x[:, :T - 37] for x in make_qkv(62, 1, T, T, 8, 8, 64, 64,
                                                         jnp.float32)))
    for qc, kc, vc in cases:
      jax.block_until_ready(step(poison(q), poison(k), poison(v)))
      self.check(qc, kc, vc, jnp.float32, mask=mask)

  def test_thread_counts_agree(self):
    q, k, v = make_qkv(51, 2, 90, 77, 4, 2, 32, 32, jnp.float32)
    outs = []
    for n in (1, 3):
      bs = dataclasses.replace(self.BLOCK_SIZES, num_threads=n)
      f = lambda q, k, v, bs=bs: attnjax.attention(
          q, k, v, mask=masks.causal(-13), block_sizes=bs, implementation="cpu_flash")
      out, vjp = jax.vjp(f, q, k, v)
      outs.append((out, *vjp(rnd(3, out.shape))))
    # The forward does the same arithmetic per row whatever the split; dq sums the
    # per-thread partials in a different order.
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    for a, b, name in zip(outs[0][1:], outs[1][1:], ("dq", "dk", "dv")):
      assert_close(a, b, jnp.float32, name)

  @pytest.mark.parametrize("T,S", [(37, 37), (5, 70), (70, 20)])
  def test_blocks_longer_than_the_sequence(self, T, S):
    """Default blocks (96 x 128) and a 48-key block over shorter sequences: the
    kernel shrinks them to the sequence (multiples of 16 or 32 kept)."""
    q, k, v = make_qkv(T + S, 2, T, S, 4, 2, 32, 48, jnp.float32)
    for bs in (CpuFlashBlockSizes(matmul=self.MATMUL),
               dataclasses.replace(self.BLOCK_SIZES, block_q=96, block_k=64)):
      self.BLOCK_SIZES = bs
      self.check(q, k, v, jnp.float32, mask=masks.causal(S - T) if S >= T else None)

  def test_underflowing_probabilities(self):
    """Logits spread over hundreds of units: an eighth of the allowed probabilities
    fall below the normal float32 range (the kernel flushes denormals); the result and
    the gradients still match the reference, with no NaN."""
    q, k, v = make_qkv(60, 1, 90, 90, 2, 2, 64, 64, jnp.float32)
    self.check(q * 5.0, k * 5.0, v, jnp.float32, mask=masks.causal())

  @pytest.mark.parametrize("mask", [None, masks.causal()], ids=["full", "causal"])
  def test_logits_beyond_the_shifted_exp_range(self, mask):
    """scale = 4e7 puts the logits near 1e9 in log2 units, far past the 2^21 bound
    of the forward's shifted exp2 (exact up to 2^22, wrong beyond about 2^24: this
    test fails if those rows take it), so most rows take the general exp2 (on full and
    on masked tiles); every row is one-hot.  Forward and lse only: the lse-based
    backward recomputes P with an error of order ulp(1e9) in its exponent (any flash
    backward does), so its gradients are not float32-accurate at such logits."""
    q, k, v = make_qkv(61, 1, 40, 40, 2, 2, 32, 32, jnp.float32)
    s = jnp.einsum("btnh,bsnh->bnts", q, k) * 4e7
    if mask is not None:
      s = jnp.where(mask.to_array(40, 40)[None, None], s, -jnp.inf)
    beyond = np.abs(np.asarray(jnp.max(s, axis=-1))) * np.log2(np.e) > 2.0**21
    assert beyond.mean() > 0.8, beyond.mean()  # the rest take the shifted path
    run = lambda fn: fn(q, k, v, mask=mask, scale=4e7, return_lse=True)
    (o, lse), (o_r, lse_r) = run(self.attn), run(attnjax.reference_attention)
    assert_close(o, o_r, jnp.float32, "out")
    assert_close(lse, lse_r, jnp.float32, "lse")

  def test_concurrent_callers(self):
    """Several Python threads call the kernel at once: the thread pool serves one
    call at a time and the others start threads of their own; every result equals
    the one computed alone (the forward is bit-identical whatever the split)."""
    import concurrent.futures
    bs = dataclasses.replace(self.BLOCK_SIZES, num_threads=2)
    f = jax.jit(lambda q, k, v: attnjax.attention(q, k, v, mask=masks.causal(),
                                                   block_sizes=bs, implementation="cpu_flash"))
    g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * v[..., :1, :1, :]),
                         argnums=(0, 1, 2)))
    inputs = [make_qkv(80 + i, 1, 64 + 8 * i, 64 + 8 * i, 4, 2, 32, 32, jnp.float32)
              for i in range(4)]
    alone = [(np.asarray(f(*x)), [np.asarray(d) for d in g(*x)]) for x in inputs]

    def run(i):
      return [(np.asarray(f(*inputs[i])), [np.asarray(d) for d in g(*inputs[i])])
              for _ in range(5)]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      results = list(pool.map(run, range(4)))
    for (out, grads), runs in zip(alone, results):
      for out2, grads2 in runs:
        np.testing.assert_array_equal(out2, out)
        for a, b, name in zip(grads2, grads, ("dq", "dk", "dv")):
          assert_close(a, b, jnp.float32, name)

  # -------------------------------------------------- features served by fallback
  def _unsupported(self, match, q, k, v, **kw):
    """An explicit request names the feature; in a fallback list the next implementation
    serves the call (its numerics are tested in test_attention.py), and no kernel call
    is left in the program."""
    with pytest.raises(NotImplementedError, match=match):
      attnjax.attention(q, k, v, implementation="cpu_flash", **kw)
    fallback = lambda q, k, v: attnjax.attention(q, k, v, implementation=("cpu_flash", "xla"),
                                                 **kw)
    assert _custom_calls(fallback, q, k, v) == []

  # The base's numerics tests of features the kernel does not serve do not apply; the
  # tests below check instead that those features are refused and fall back.
  test_bias_grads = None
  test_segment_ids_with_padding = None
  test_segment_ids_cross = None
  test_document_mask_under_jit = None
  test_score_mod_table_grads = None

  def test_bias_is_refused_and_falls_back(self):
    q, k, v = make_qkv(11, 2, 19, 23, 4, 2, 32, 32, jnp.float32)
    self._unsupported("bias", q, k, v, bias=rnd(5, (2, 4, 19, 23)))

  def test_softcap_and_scale(self):
    """softcap is refused (and falls back); scale alone is served."""
    q, k, v = make_qkv(13, 1, 17, 29, 2, 2, 64, 64, jnp.float32)
    self._unsupported("softcap", q, k, v, softcap=5.0, scale=0.3)
    # scale alone is served:
    self.check(q * 4.0, k, v, jnp.float32, scale=0.3)

  def test_segment_ids_are_refused_and_fall_back(self):
    q, k, v = make_qkv(14, 2, 37, 37, 4, 2, 32, 32, jnp.float32)
    seg = jnp.asarray(np.repeat(np.arange(2), [20, 17])[None].repeat(2, 0), jnp.int32)
    self._unsupported("segment ids", q, k, v, q_segment_ids=seg)

  def test_cross_segment_ids_are_refused_and_fall_back(self):
    q, k, v = make_qkv(15, 2, 9, 14, 2, 1, 32, 32, jnp.float32)
    qs = jnp.asarray(np.repeat(np.arange(3), 3)[None].repeat(2, 0), jnp.int32)
    ks = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 4, (2, 14))), jnp.int32)
    self._unsupported("segment ids", q, k, v, q_segment_ids=qs, kv_segment_ids=ks)

  def test_document_mask_is_refused_and_falls_back(self):
    q, k, v = make_qkv(16, 2, 33, 33, 2, 2, 32, 32, jnp.float32)
    seg = jnp.asarray(np.sort(np.random.default_rng(1).integers(0, 5, (2, 33))), jnp.int32)
    self._unsupported("band masks", q, k, v, mask=masks.document(seg) & masks.causal())

  def test_score_mod_is_refused_and_falls_back(self):
    q, k, v = make_qkv(17, 1, 25, 25, 4, 2, 32, 32, jnp.float32)
    mod = attnjax.score_mods.alibi(attnjax.score_mods.alibi_slopes(4))
    self._unsupported("score_mod", q, k, v, score_mod=mod)

  def test_head_dependent_mask_is_refused_and_falls_back(self):
    q, k, v = make_qkv(18, 1, 24, 24, 2, 1, 32, 32, jnp.float32)
    per_head = np.random.default_rng(3).random((2, 24, 24)) < 0.5
    self._unsupported("band masks", q, k, v, mask=masks.from_array(per_head))

  def test_band_empty_rows(self):
    """Band masks: rows with no key (causal(-7)) give 0 with zero gradients."""
    T, S = 12, 20
    q, k, v = make_qkv(19, 2, T, S, 2, 1, 32, 32, jnp.float32)
    f = lambda q, k, v: self.attn(q, k, v, mask=masks.causal(-7))
    out, vjp = jax.vjp(f, q, k, v)
    dq, dk, dv = vjp(rnd(4, out.shape))
    for x in (out, dq, dk, dv):
      assert np.all(np.isfinite(np.asarray(x)))
    np.testing.assert_array_equal(np.asarray(out)[:, :7], 0.0)
    np.testing.assert_array_equal(np.asarray(dq)[:, :7], 0.0)
    o, lse = self.attn(q, k, v, mask=masks.causal(-100), return_lse=True)
    np.testing.assert_array_equal(np.asarray(o), 0.0)
    assert np.all(np.asarray(lse) == -np.inf)

  def test_odd_head_dim_falls_back(self):
    q, k, v = make_qkv(19, 1, 20, 20, 2, 1, 24, 24, jnp.float32)
    self._unsupported("multiples of 16", q, k, v, mask=masks.causal())

  # -------------------------------------------------- dispatch, errors, build
  def test_auto_uses_kernel_for_long_sequences(self):
    q, k, v = make_qkv(60, 1, 1024, 1024, 2, 1, 32, 32, jnp.float32)
    f = lambda q, k, v: attnjax.attention(q, k, v, mask=masks.causal())
    assert _custom_calls(f, q, k, v) == ["attnjax_flash_fwd"]
    g = jax.grad(lambda q, k, v: f(q, k, v).sum())
    assert set(_custom_calls(g, q, k, v)) == {"attnjax_flash_fwd", "attnjax_flash_bwd"}
    # A spatial mask: the block-sparse mode (2D-tiled by the dispatcher).
    m = masks.neighborhood((32, 32), 5)
    assert _custom_calls(lambda q, k, v: attnjax.attention(q, k, v, mask=m),
                         q, k, v) == ["attnjax_sparse_fwd"]
    g = jax.grad(lambda q, k, v: attnjax.attention(q, k, v, mask=m).sum())
    assert set(_custom_calls(g, q, k, v)) == {"attnjax_sparse_fwd", "attnjax_sparse_bwd"}
    # A mask the kernel does not serve (data-dependent): 'auto' takes the XLA path.
    seg = jnp.asarray(np.repeat(np.arange(2), 512)[None], jnp.int32)
    md = masks.document(seg)
    assert _custom_calls(lambda q, k, v: attnjax.attention(q, k, v, mask=md), q, k, v) == []

  def test_traced_band_offset(self):
    """A causal offset that is a traced value (decoding) is served in-graph."""
    q, k, v = make_qkv(61, 1, 8, 50, 2, 1, 32, 32, jnp.float32)

    @jax.jit
    def f(q, k, v, off):
      return attnjax.attention(q, k, v, mask=masks.causal(off), implementation="cpu_flash",
                               block_sizes=self.BLOCK_SIZES)
    for off in (3, 42):
      want = attnjax.reference_attention(q, k, v, mask=masks.causal(off))
      assert_close(f(q, k, v, jnp.int32(off)), want, jnp.float32, f"offset {off}")

  def test_block_size_errors(self):
    with pytest.raises(ValueError, match="block_k must be a multiple of 16"):
      CpuFlashBlockSizes(block_k=40)
    with pytest.raises(ValueError, match="block_q must be a positive int"):
      CpuFlashBlockSizes(block_q=0)
    with pytest.raises(ValueError, match="num_threads"):
      CpuFlashBlockSizes(num_threads=-2)
    with pytest.raises(ValueError, match=r"matmul must be one of \['amx', 'auto', 'avx512', "
                                         r"'simd'\]"):
      CpuFlashBlockSizes(matmul="tf32")
    with pytest.raises(ValueError, match="multiple of 32 with matmul='amx'"):
      CpuFlashBlockSizes(block_k=48, matmul="amx")
    q, k, v = make_qkv(62, 1, 16, 16, 2, 1, 32, 32, jnp.float32)
    # Another implementation's config is not reinterpreted (no duck typing).
    with pytest.raises(TypeError, match="'cpu_flash' must be CpuFlashBlockSizes"):
      attnjax.attention(q, k, v, implementation="cpu_flash",
                        block_sizes=attnjax.ChunkedBlockSizes(8, 40))


def _random_schedule(seed, T, S, bq, bk, *, empty_q_block):
  """A block-sparse schedule of random tile classes (one query block left empty) and a
  random element pattern in the partial tiles: ``(rng, schedule)``."""
  rng = np.random.default_rng(seed)
  table = rng.choice([masks.EMPTY, masks.PARTIAL, masks.FULL], size=(-(-T // bq), -(-S // bk)))
  table[empty_q_block] = masks.EMPTY
  elem = rng.random((T, S)) < 0.5
  return rng, flash.schedule_from_table(table, lambda qi, ki: elem[qi, ki], T, S, bq, bk)


class TestCpuFlashBlockSparse:
  """The block-sparse mode (SIMD engine only, so not rerun by the AMX class; the shared
  AttentionTestBase tests already run in TestCpuFlash, only its helpers are used here)."""
  IMPL = "cpu_flash"
  MATMUL = "auto"
  BLOCK_SIZES = TestCpuFlash.BLOCK_SIZES
  attn = AttentionTestBase.attn
  check = AttentionTestBase.check

  @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
  @pytest.mark.parametrize("case", ["nbhd_13x17", "nbhd_dilated", "window_shift", "criss_cross",
                                    "grid", "axial", "stripe", "halo"])
  def test_spatial_masks_block_sparse(self, case, dtype):
    """Spatial masks on the block-sparse mode, in the flattened order (the odd 13 x 17
    map: no patch divides it) or 2D-tiled by the dispatcher: out, lse and the vjp
    (random cotangents) against reference_attention; the kernel is in the program."""
    shape = (13, 17) if case == "nbhd_13x17" else (12, 16)
    mask = {"nbhd_13x17": lambda: masks.neighborhood(shape, 3),
            "nbhd_dilated": lambda: masks.neighborhood(shape, (3, 5), dilation=(2, 1)),
            "window_shift": lambda: masks.window(shape, (4, 8), shift=(2, 4)),
            "criss_cross": lambda: masks.criss_cross(shape),
            "grid": lambda: masks.grid(shape, 4),
            "axial": lambda: masks.axial(shape, 1),
            "stripe": lambda: masks.stripe(shape, 3, 0),
            "halo": lambda: masks.halo(shape, 4, 1)}[case]()
    T = int(np.prod(shape))
    dtype = jnp.dtype(dtype)
    q, k, v = make_qkv(90 + T, 2, T, T, 4, 2, 32, 32, dtype)
    self.check(q, k, v, dtype, mask=mask)
    f = lambda q, k, v: attnjax.attention(q, k, v, mask=mask, implementation="cpu_flash",
                                          block_sizes=self.BLOCK_SIZES)
    g = jax.grad(lambda q, k, v: f(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    assert set(_custom_calls(g, q, k, v)) == {"attnjax_sparse_fwd", "attnjax_sparse_bwd"}

  def test_block_sparse_default_blocks_tiled(self):
    """The dispatcher's 2D tiling with cpu_flash's default tiles (an explicit 8 x 8
    patch: 64-query, 64-key tiles) of a shifted Swin window on a 24 x 24 map, GQA,
    f32: exact, and the tiled table is sparser than the flattened one at the same
    block sizes."""
    from attnjax.core import args as args_lib
    from attnjax.dispatch import registry
    shape, T = (24, 24), 576
    mask = masks.window(shape, 8, shift=4)
    q, k, v = make_qkv(93, 1, T, T, 4, 2, 32, 32, jnp.float32)
    self.BLOCK_SIZES = CpuFlashBlockSizes(matmul=self.MATMUL, spatial_tile=(8, 8))
    a = args_lib.check_attention_args(q, k, v, mask=mask)
    plan, cfg = registry._spatial_tiling(registry.get("cpu_flash"), a, self.BLOCK_SIZES)
    assert plan is not None and plan.tile == (8, 8) and (cfg.block_q, cfg.block_k) == (64, 64)
    tiled = flash.block_sparse_schedule(plan.tiled_mask, T, T, 64, 64)
    flat = flash.block_sparse_schedule(mask, T, T, 64, 64)
    assert tiled.density < flat.density
    self.check(q, k, v, jnp.float32, mask=mask)
    with pytest.raises(ValueError, match="CpuFlashBlockSizes.spatial_tile"):
      CpuFlashBlockSizes(spatial_tile=(0, 8))

  @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
  def test_tiling_folded_into_kernel(self, dtype):
    """cpu_flash is among the dispatcher's folding implementations (registry._FOLDS_TILING):
    the dispatcher passes the 2D-tiled order to cpu_flash as a row map (the kernel
    packs q, k, v through it and writes out, lse, dq, dk, dv back to their rows):
    out, lse and the vjp (random cotangents) equal the gather path (tile_call, the
    kernel in the tiled order, untile_outputs) bit for bit, and the lowered fwd + bwd
    program has no gather (the gather path's has them)."""
    from attnjax.core import args as args_lib
    from attnjax.core import tiling
    from attnjax.dispatch import registry
    assert "cpu_flash" in registry._FOLDS_TILING
    shape, T = (24, 24), 576
    mask = masks.window(shape, 8, shift=4)
    dtype = jnp.dtype(dtype)
    q, k, v = make_qkv(96, 2, T, T, 4, 2, 32, 32, dtype)
    bs = CpuFlashBlockSizes(matmul=self.MATMUL, spatial_tile=(8, 8))
    a = args_lib.check_attention_args(q, k, v, mask=mask)
    plan, cfg = registry._spatial_tiling(registry.get("cpu_flash"), a, bs)
    assert plan is not None

    def folded(q, k, v):
      return attnjax.attention(q, k, v, mask=mask, implementation="cpu_flash",
                               block_sizes=bs, return_lse=True)

    def gathered(q, k, v):
      qt, kt, vt, at = tiling.tile_call(q, k, v, a, plan)
      out = flash.cpu_flash_attention(qt, kt, vt, at, return_lse=True, block_sizes=cfg)
      return tiling.untile_outputs(out, plan, True)

    cts = (rnd(97, (2, T, 4, 32)).astype(dtype), rnd(98, (2, 4, T)))
    (out, lse), vjp = jax.vjp(folded, q, k, v)
    (out_g, lse_g), vjp_g = jax.vjp(gathered, q, k, v)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(out_g, np.float32))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(lse_g))
    for name, g, gg in zip(("dq", "dk", "dv"), vjp(cts), vjp_g(cts)):
      np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(gg, np.float32),
                                    err_msg=name)

    def program(fn):
      loss = lambda q, k, v: sum(x.astype(jnp.float32).sum() for x in fn(q, k, v))
      return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).as_text()
    assert "gather" in program(gathered)
    text = program(folded)
    assert "gather" not in text and "attnjax_sparse_fwd" in text

  def test_block_sparse_row_maps(self):
    """cpu_flash_block_sparse with row maps (different query and key permutations,
    T != S, an empty query block) equals gathering q, k, v into the mapped order,
    running the schedule and gathering out, lse and the grads back (to 1e-6); identity
    maps run as no maps; maps that are not permutations are refused."""
    T, S, bq, bk = 48, 64, 16, 16
    rng, sch = _random_schedule(8, T, S, bq, bk, empty_q_block=1)
    qmap, kmap = rng.permutation(T), rng.permutation(S)
    q, k, v = make_qkv(99, 2, T, S, 4, 2, 32, 32, jnp.float32)
    sc = 32 ** -0.5

    def mapped(q, k, v):
      return flash.cpu_flash_block_sparse(q, k, v, sch, scale=sc, q_rows=qmap, k_rows=kmap)

    def gathered(q, k, v):
      o, lse = flash.cpu_flash_block_sparse(q[:, qmap], k[:, kmap], v[:, kmap], sch, scale=sc)
      back = np.argsort(qmap)
      return o[:, back], lse[:, :, back]

    cts = (rnd(100, (2, T, 4, 32)), rnd(101, (2, 4, T)))
    res, vjp = jax.vjp(mapped, q, k, v)
    res_g, vjp_g = jax.vjp(gathered, q, k, v)
    for name, x, y in zip(("out", "lse", "dq", "dk", "dv"), (*res, *vjp(cts)),
                          (*res_g, *vjp_g(cts))):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6,
                                 err_msg=name)
    empty = qmap[16:32]  # original rows of the empty query block
    np.testing.assert_array_equal(np.asarray(res[0])[:, empty], 0.0)
    np.testing.assert_array_equal(np.asarray(vjp(cts)[0])[:, empty], 0.0)
    ident = flash.cpu_flash_block_sparse(q, k, v, sch, scale=sc, q_rows=np.arange(T),
                                         k_rows=np.arange(S))
    np.testing.assert_array_equal(np.asarray(ident[0]),
                                  np.asarray(flash.cpu_flash_block_sparse(q, k, v, sch,
                                                                          scale=sc)[0]))
    bad = qmap.copy()
    bad[0] = bad[1]
    with pytest.raises(ValueError, match="q_rows must be a permutation"):
      flash.cpu_flash_block_sparse(q, k, v, sch, scale=sc, q_rows=bad)
    with pytest.raises(ValueError, match="k_rows must be a permutation"):
      flash.cpu_flash_block_sparse(q, k, v, sch, scale=sc, k_rows=kmap[:-1])

  def test_block_sparse_parts_equal_the_call_and_its_vjp(self):
    """block_sparse_parts (the kernel's forward and backward as plain functions, the
    backward taking delta = rowsum(do * out) - dlse) equal cpu_flash_block_sparse and its
    VJP with random cotangents, an empty query block included; the hook hands them out."""
    from attnjax.core import hooks
    T, S, bq, bk = 48, 64, 16, 16
    _, sch = _random_schedule(11, T, S, bq, bk, empty_q_block=2)
    q, k, v = make_qkv(111, 2, T, S, 4, 2, 32, 16, jnp.float32)
    sc = 32 ** -0.5
    lists = tuple(jnp.asarray(x) for x in (sch.qlist, sch.qcode, sch.klist, sch.kcode,
                                           sch.pats))
    fwd, bwd = hooks.block_sparse_parts()
    out, lse, stats = fwd(q, k, v, *lists, block_q=bq, block_k=bk, scale=sc)
    (out_r, lse_r), vjp = jax.vjp(
        lambda q, k, v: flash.cpu_flash_block_sparse(q, k, v, sch, scale=sc), q, k, v)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out_r))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(lse_r))
    do, dlse = rnd(112, out.shape), rnd(113, lse.shape)
    delta = jnp.einsum("btnd,btnd->bnt", do, out) - dlse
    got = bwd(q, k, v, do, stats, delta, *lists, block_q=bq, block_k=bk, scale=sc)
    for name, x, y in zip(("dq", "dk", "dv"), got, vjp((do, dlse))):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6,
                                 err_msg=name)
    assert float(jnp.abs(got[0]).max()) > 0
    np.testing.assert_array_equal(np.asarray(got[0])[:, 32:], 0.0)   # the empty q block

  def test_block_sparse_schedule_structure(self):
    """Lists ascending and transposed of each other; codes -1 (full) only on tiles the
    mask fully allows with keys in range; partial patterns equal the mask on the tile;
    patterns deduplicated; tiles whose pattern allows nothing are dropped."""
    T, S, bq, bk = 40, 50, 8, 16
    arr = np.random.default_rng(5).random((T, S)) < 0.3
    arr[:, 20:] = False          # a column band with nothing allowed (empty tiles)
    arr[8:16, :16] = True        # one full tile
    arr[16:24, :16] = arr[8:16, :16]
    m = masks.from_array(arr)
    sch = flash.block_sparse_schedule(m, T, S, bq, bk)
    nq, nk = 5, 4
    assert sch.qlist.shape[0] == nq and sch.klist.shape[0] == nk
    seen = set()
    for qb in range(nq):
      for i, kb in enumerate(sch.qlist[qb]):
        if kb < 0:
          assert (sch.qlist[qb, i:] == -1).all()
          break
        assert i == 0 or kb > sch.qlist[qb, i - 1]
        code = sch.qcode[qb, i]
        seen.add((qb, int(kb), int(code)))
        tile = np.zeros((bq, bk), bool)
        blk = arr[qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk]
        tile[:blk.shape[0], :blk.shape[1]] = blk
        if code == -1:
          assert blk.all() and blk.shape == (bq, bk)
        else:
          np.testing.assert_array_equal(sch.pats[code] != 0, tile)
    assert (0, 2, -1) not in seen and all(kb < 2 for _, kb, _ in seen)
    assert (1, 0, -1) in seen and (2, 0, -1) in seen
    back = {(int(qb), kb, int(c)) for kb in range(nk) for qb, c in
            zip(sch.klist[kb], sch.kcode[kb]) if qb >= 0}
    assert back == seen
    assert len({p.tobytes() for p in sch.pats}) == len(sch.pats)

  def test_block_sparse_direct_entry_and_errors(self):
    """cpu_flash_block_sparse with a hand-made tile table (as a routing would give):
    equal to reference_attention with the same element mask; grads by vjp; empty query
    blocks give 0 with zero grads; a schedule at other block sizes is refused."""
    T, S, bq, bk = 48, 64, 16, 16
    rng = np.random.default_rng(7)
    table = rng.choice([masks.EMPTY, masks.PARTIAL, masks.FULL], size=(3, 4))
    table[1] = masks.EMPTY                               # query block 1 sees nothing
    elem = rng.random((T, S)) < 0.5
    allowed = np.repeat(np.repeat(table, bq, 0), bk, 1)
    allowed = (allowed == masks.FULL) | ((allowed == masks.PARTIAL) & elem)
    sch = flash.schedule_from_table(table, lambda qi, ki: elem[qi, ki], T, S, bq, bk)
    q, k, v = make_qkv(94, 2, T, S, 4, 2, 32, 32, jnp.float32)
    ct = rnd(95, (2, T, 4, 32))
    f = lambda q, k, v: flash.cpu_flash_block_sparse(q, k, v, sch, scale=32 ** -0.5)[0]
    r = lambda q, k, v: attnjax.reference_attention(q, k, v, mask=allowed)
    out, vjp = jax.vjp(f, q, k, v)
    ref, vjp_r = jax.vjp(r, q, k, v)
    assert_close(out, ref, jnp.float32, "out")
    grads = vjp(ct)
    for name, g, gr in zip(("dq", "dk", "dv"), grads, vjp_r(ct)):
      assert_close(g, gr, jnp.float32, name)
    np.testing.assert_array_equal(np.asarray(out)[:, 16:32], 0.0)
    np.testing.assert_array_equal(np.asarray(grads[0])[:, 16:32], 0.0)
    with pytest.raises(ValueError, match="query-block"):
      flash.cpu_flash_block_sparse(q[:, :20], k, v, sch, scale=1.0)
    with pytest.raises(ValueError, match="kernel_blocks"):
      flash.cpu_flash_block_sparse(q[:, :8], k, v, sch, scale=1.0)
    with pytest.raises(ValueError, match="table must be"):
      flash.schedule_from_table(table[:2], lambda qi, ki: elem[qi, ki], T, S, bq, bk)


@pytest.mark.skipif(not flash.has_amx(), reason="the CPU has no AMX-BF16 tiles")
class TestCpuFlashAmx(TestCpuFlash):
  """The forward on AMX tiles: float32 data split into three bf16 pieces each
  ("bf16x6"), bf16 data as is; the whole suite again, f32 tolerances for f32 data.
  bf16 arrays also take the AMX backward (64-row query blocks, 32-key tiles; lengths
  that are not multiples of 64 leave padded 32-row strips)."""
  MATMUL = "amx"
  BLOCK_SIZES = CpuFlashBlockSizes(block_q=64, block_k=32, matmul="amx")

  def _forward(self, q, k, v, matmul):
    bs = CpuFlashBlockSizes(block_q=64, block_k=32, matmul=matmul)
    return np.asarray(attnjax.attention(q, k, v, mask=masks.causal(), block_sizes=bs,
                                        implementation="cpu_flash"))

  def test_auto_takes_amx_for_bf16_data_only(self):
    """'auto' runs AMX exactly when q, k, v hold bf16 values (bit-identical to
    matmul='amx'), else AVX-512 (bit-identical to 'avx512'); the two engines differ
    in the last bits, so the identities tell which one ran."""
    q, k, v = make_qkv(70, 1, 75, 75, 4, 2, 64, 64, jnp.float32)
    as_bf16 = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
    for data, engine in (((q, k, v), "avx512"), (tuple(map(as_bf16, (q, k, v))), "amx")):
      other = "amx" if engine == "avx512" else "avx512"
      auto = self._forward(*data, "auto")
      np.testing.assert_array_equal(auto, self._forward(*data, engine))
      assert not np.array_equal(auto, self._forward(*data, other))

  def test_bf16_data_keeps_float32_accuracy(self):
    """bf16 values in float32 arrays: the scores are exact tile products and P is
    split in three pieces, so the result meets the float32 tolerance."""
    q, k, v = make_qkv(71, 2, 67, 90, 4, 1, 64, 32, jnp.bfloat16)
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    self.BLOCK_SIZES = CpuFlashBlockSizes(block_q=64, block_k=32, matmul="auto")
    self.check(q, k, v, jnp.float32, mask=masks.sliding_window(20, 5))

  def test_backward_engine_rule(self):
    """The backward kernel runs on AMX exactly for bf16 data with a bf16 result: its
    float32 gradients then differ from the AVX-512 ones (at bf16 level), and in every
    other case they are bit-identical to them (one thread, same forward)."""
    q, k, v = make_qkv(72, 1, 100, 100, 4, 2, 64, 64, jnp.float32)
    as_bf16 = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
    lo, hi = (jnp.asarray(x) for x in masks.causal().row_band(100, 100))
    kw = dict(scale=0.125, block_q=64, block_k=32, num_threads=1)

    def grads(data, matmul, bf16_out):
      out, _, stats = flash._ffi_fwd(*data, lo, hi, matmul="avx512", bf16_out=False, **kw)
      do = as_bf16(rnd(73, out.shape))
      delta = jnp.einsum("btnh,btnh->bnt", do, out)
      return [np.asarray(g) for g in flash._ffi_bwd(*data, do, stats, delta, lo, hi,
                                                    matmul=matmul, bf16_out=bf16_out, **kw)]

    bf = tuple(map(as_bf16, (q, k, v)))
    for data, bf16_out in (((q, k, v), True), ((q, k, v), False), (bf, False)):
      for a, b in zip(grads(data, "auto", bf16_out), grads(data, "avx512", bf16_out)):
        np.testing.assert_array_equal(a, b)
    amx, avx = grads(bf, "auto", True), grads(bf, "avx512", True)
    for a, b, name in zip(amx, avx, ("dq", "dk", "dv")):
      assert not np.array_equal(a, b), name
      # P and dS rounded to bf16: bf16-level agreement.
      np.testing.assert_allclose(a, b, atol=2e-2 * np.abs(b).max(), err_msg=name)


def test_simd_engine_names_and_width():
  """'simd' and its older name 'avx512' are one engine (bit-identical results, equal to
  the reference), and the library reports the vector width this CPU offers."""
  flags = build._cpu_flags()
  avx512 = ({"avx512f", "avx512dq"} <= flags and not build.forcing_avx2()
            or build.emulating_avx512())
  assert build.simd_width() == (16 if avx512 else 8)
  q, k, v = make_qkv(74, 2, 75, 75, 4, 2, 48, 48, jnp.float32)
  outs = [np.asarray(attnjax.attention(
      q, k, v, mask=masks.causal(), implementation="cpu_flash",
      block_sizes=CpuFlashBlockSizes(block_q=32, block_k=48, matmul=m)))
          for m in ("simd", "avx512")]
  np.testing.assert_array_equal(outs[0], outs[1])
  assert_close(outs[0], attnjax.reference_attention(q, k, v, mask=masks.causal()),
               jnp.float32, "simd")


# The other-build rerun of the default suite: the kernel's code paths (band forward/backward,
# AMX, block-sparse) each once, without the hypothesis sweep and the per-mask repeats.
_EMULATED_SUBSET = ("not test_other_simd_build and not test_matches_reference and "
                    "not test_spatial_masks_block_sparse or "
                    "test_spatial_masks_block_sparse and (criss_cross or nbhd_13x17)")


_BUILD_VARS = ("ATTNJAX_CPU_EMULATE_AVX512", "ATTNJAX_CPU_AVX2")


def _rerun_on_build(select: str, min_passed: int, build_var: str = "ATTNJAX_CPU_EMULATE_AVX512"):
  """This file's tests matching `select` in a fresh process whose kernels are the build
  that `build_var` (one of _BUILD_VARS) asks for, and only that one."""
  env = {k: v for k, v in os.environ.items() if k not in _BUILD_VARS}
  env.update(JAX_PLATFORMS="cpu", **{build_var: "1"})
  for key in [k for k in env if k.startswith(("PYTEST_", "HYPOTHESIS"))]:
    env.pop(key)  # a plain pytest run, not an xdist worker's
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
       "-k", select, __file__],
      env=env, capture_output=True, text=True, timeout=1200,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout
  tail = proc.stdout[-4000:] + proc.stderr[-2000:]
  assert proc.returncode == 0, tail
  summary = proc.stdout.strip().splitlines()[-1]
  passed = re.search(r"(\d+) passed", summary)
  # Nothing skipped: the AMX tests run on the emulated tiles (the AVX2 rerun deselects them).
  assert passed and int(passed.group(1)) >= min_passed and "skipped" not in summary, tail


def _native_avx512_amx() -> bool:
  """This process's kernels are the native AVX-512 build with usable AMX tiles."""
  return (not build.emulating_avx512() and not build.forcing_avx2()
          and build.simd_width() == 16 and flash.has_amx())


@pytest.mark.skipif(build.emulating_avx512() or build.forcing_avx2(),
                    reason="runs another build itself")
def test_other_simd_build():
  """The code paths this CPU's native build does not take, in a fresh process on this
  file's tests (less the hypothesis sweep and most per-mask repeats; all of them under
  -m slow):
  - on a CPU without AVX-512 or AMX, the AVX-512 build (16 lanes, 6 x 4 register tiles,
    16 x 16 transposes, vscalefps 2^n) and its AMX paths with ATTNJAX_CPU_EMULATE_AVX512=1,
    where every AVX-512 and AMX intrinsic is emulated (avx512_emulation.h), so
    TestCpuFlashAmx runs there too: the only run of that code before it meets such a CPU;
  - on a CPU with both (whose native run covers them), the AVX2 + FMA build (8 lanes)
    with ATTNJAX_CPU_AVX2=1, AMX tests deselected."""
  if _native_avx512_amx():
    _rerun_on_build(f"({_EMULATED_SUBSET}) and not Amx", 40, "ATTNJAX_CPU_AVX2")
  else:
    _rerun_on_build(_EMULATED_SUBSET, 40)


@pytest.mark.slow
@pytest.mark.skipif(build.emulating_avx512(), reason="runs the emulated build itself")
def test_avx512_paths_emulated_all():
  """As above, every test of this file (the default selection) on the emulated build."""
  _rerun_on_build("not test_other_simd_build and not test_avx512_paths_emulated_all", 60)


def test_disabled_by_environment():
  """ATTNJAX_CPU_KERNELS=0: explicit requests say why; 'auto' still answers."""
  code = textwrap.dedent("""
      import jax.numpy as jnp, attnjax
      q = jnp.ones((1, 600, 2, 32)) * jnp.arange(32) / 32
      try:
        attnjax.attention(q, q, q, implementation="cpu_flash")
      except NotImplementedError as e:
        assert "ATTNJAX_CPU_KERNELS" in str(e), e
      else:
        raise AssertionError("cpu_flash ran although disabled")
      out = attnjax.attention(q, q, q)
      ref = attnjax.reference_attention(q, q, q)
      assert float(jnp.abs(out - ref).max()) < 1e-5
      print("ok")
  """)
  env = dict(os.environ, ATTNJAX_CPU_KERNELS="0", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


# ------------------------------------------------------------------ build, cache, logging

def _run_python(code, env_extra, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **env_extra)
  for key in ("ATTNJAX_CPU_KERNELS", "ATTNJAX_CPU_EMULATE_AVX512"):
    env.pop(key, None)
  return subprocess.run([sys.executable, *code], env=env, capture_output=True, text=True,
                        timeout=timeout, cwd=os.path.dirname(os.path.dirname(__file__)),
                        check=False)


def test_cache_key_changes_with_source_compiler_flags_and_cpu_features():
  """The key is a function of source, compiler identity, flags, CPU features and jax
  version, not of the host name: each part changes it, equal parts give equal keys."""
  base = dict(sources=b"int f();", compiler_id="g++ (GCC) 12.2.0", flags=("-O3", "-w"),
              cpu_features={"avx2", "fma"}, jax_version="0.1")
  key = build.cache_key(**base)
  assert key == build.cache_key(**dict(base, cpu_features=["fma", "avx2"]))
  for change in [dict(sources=b"int g();"), dict(compiler_id="clang version 17.0.1"),
                 dict(flags=("-O3", "-Werror")), dict(flags=("-O3 -w",)),
                 dict(cpu_features={"avx2", "fma", "avx512f"}), dict(jax_version="0.2")]:
    assert build.cache_key(**dict(base, **change)) != key, change


def test_werror_flags_follow_ci_and_override(monkeypatch):
  monkeypatch.delenv("CI", raising=False)
  monkeypatch.delenv("ATTNJAX_CPU_WERROR", raising=False)
  assert "-Werror" not in build.compile_flags()
  assert {"-Wall", "-Wextra"} <= set(build.compile_flags())
  assert "-w" not in build.compile_flags()
  monkeypatch.setenv("CI", "true")
  assert "-Werror" in build.compile_flags()
  monkeypatch.setenv("CI", "0")
  assert "-Werror" not in build.compile_flags()
  monkeypatch.setenv("ATTNJAX_CPU_WERROR", "1")
  assert "-Werror" in build.compile_flags()


_TWO_CALLS = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="LOG %(levelname)s %(message)s")
    import jax.numpy as jnp, numpy as np, attnjax
    from attnjax.cpu import build
    rng = np.random.default_rng(0)
    for T in (40, 72):  # two shapes: two traces
      q = jnp.asarray(rng.standard_normal((1, T, 2, 32)), jnp.float32)
      out = attnjax.attention(q, q, q, implementation="cpu_flash")
      ref = attnjax.reference_attention(q, q, q)
      assert float(jnp.abs(out - ref).max()) < 1e-5
    assert build.load() is None and build.unavailable_reason() is None
    print("KEY", build._build()[1])
""")


def test_build_logs_once_and_aot_command_reuses_it(tmp_path):
  """A process that builds the kernel logs 'building cpu_flash kernel ... (N s)' once
  however many calls trace it; `python -m attnjax.cpu.build` on the same cache then
  prints the cached library's path and key without building again."""
  env = dict(ATTNJAX_CACHE_DIR=str(tmp_path))
  proc = _run_python(["-c", _TWO_CALLS], env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  logs = [line for line in proc.stdout.splitlines() if line.startswith("LOG")]
  building = [line for line in logs if "building cpu_flash kernel" in line]
  assert len(building) == 1 and building[0].startswith("LOG INFO"), logs
  assert re.search(r"\(\d+\.\d s\)", building[0]), building
  assert not any("WARNING" in line for line in logs), logs
  key = re.search(r"^KEY (\w+)$", proc.stdout, re.MULTILINE).group(1)
  aot = _run_python(["-m", "attnjax.cpu.build"], env)
  assert aot.returncode == 0, aot.stderr[-3000:]
  assert f"key: {key}" in aot.stdout, aot.stdout
  path = re.search(r"^path: (.+)$", aot.stdout, re.MULTILINE).group(1)
  assert os.path.exists(path) and key in os.path.basename(path)
  assert "building cpu_flash kernel" not in aot.stderr  # cached: nothing rebuilt


def test_missing_compiler_warns_once_and_auto_falls_back(tmp_path):
  """CXX naming no compiler: one warning with the reason on the attnjax.cpu logger, an
  explicit 'cpu_flash' request raises NotImplementedError carrying it, 'auto' still
  answers (XLA paths), and the AOT command exits non-zero with the reason."""
  env = dict(ATTNJAX_CACHE_DIR=str(tmp_path), CXX="/nonexistent/c++")
  code = textwrap.dedent("""
      import logging, sys
      logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                          format="LOG %(levelname)s %(message)s")
      import jax.numpy as jnp, numpy as np, attnjax
      q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 600, 2, 32)), jnp.float32)
      for _ in range(2):
        try:
          attnjax.attention(q, q, q, implementation="cpu_flash")
        except NotImplementedError as e:
          assert "/nonexistent/c++" in str(e), e
        else:
          raise AssertionError("cpu_flash ran without a compiler")
      out = attnjax.attention(q, q, q, mask=attnjax.masks.causal())
      ref = attnjax.reference_attention(q, q, q, mask=attnjax.masks.causal())
      assert float(jnp.abs(out - ref).max()) < 1e-5
      print("ok")
  """)
  proc = _run_python(["-c", code], env)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
  warnings = [line for line in proc.stdout.splitlines() if line.startswith("LOG WARNING")]
  assert len(warnings) == 1 and "/nonexistent/c++" in warnings[0], proc.stdout[-2000:]
  assert not list(tmp_path.iterdir())  # nothing built
  aot = _run_python(["-m", "attnjax.cpu.build"], env)
  assert aot.returncode == 1 and "/nonexistent/c++" in aot.stderr, aot.stderr[-2000:]
