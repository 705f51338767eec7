"""Every XLA implementation of attnjax.attention against reference_attention, fwd + bwd.

One shared test base (`AttentionTestBase`) is subclassed per implementation; the
Pallas kernels subclass it in their own test modules.
"""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import masks, score_mods
from conftest import TOLERANCES, examples

EXAMPLES = examples(8)


def rnd(seed, shape, dtype=jnp.float32, scale=1.0):
  # NumPy RNG: jax.random would compile a sampler for every new shape.
  x = scale * np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
  return jnp.asarray(x, dtype)


def assert_close(x, y, dtype, what=""):
  """allclose with the dtype's tolerance, atol relative to the reference's scale."""
  x = np.asarray(jnp.asarray(x, jnp.float32))
  y = np.asarray(jnp.asarray(y, jnp.float32))
  assert x.shape == y.shape, (what, x.shape, y.shape)
  assert np.all(np.isfinite(x)), f"{what}: non-finite values"
  t = TOLERANCES[np.dtype(dtype)]
  scale = max(1.0, float(np.max(np.abs(y))) if y.size else 1.0)
  np.testing.assert_allclose(x, y, atol=t["atol"] * scale, rtol=t["rtol"], err_msg=what)


def make_qkv(seed, B, T, S, N, K, H, Hv, dtype):
  return (rnd(seed, (B, T, N, H), dtype), rnd(seed + 1, (B, S, K, H), dtype),
          rnd(seed + 2, (B, S, K, Hv), dtype))


MASK_FAMILIES = {
    "none": lambda T, S: None,
    "causal": lambda T, S: masks.causal(S - T),
    "causal0": lambda T, S: masks.causal(),
    "window": lambda T, S: masks.sliding_window(5, 2),
    "chunked_causal": lambda T, S: masks.chunked(8) & masks.causal(),
    "prefix": lambda T, S: masks.prefix_lm(6),
    "dual": lambda T, S: masks.dual_triangle(),
    "or_not": lambda T, S: masks.causal() | ~masks.sliding_window(3, 3),
    "array": lambda T, S: np.random.default_rng(T * 131 + S).random((T, S)) < 0.6,
}


class AttentionTestBase:
  """Subclasses set IMPL (and optionally BLOCK_SIZES / SUPPORTS_* flags)."""
  IMPL = None
  BLOCK_SIZES = None
  SUPPORTS_BF16 = True

  def attn(self, q, k, v, **kw):
    return attnjax.attention(q, k, v, implementation=self.IMPL, block_sizes=self.BLOCK_SIZES, **kw)

  def check(self, q, k, v, dtype, *, diff_kw=None, seed=0, **kw):
    """Forward (out, lse) and vjp w.r.t. q, k, v and every array in diff_kw."""
    diff_kw = diff_kw or {}
    names = list(diff_kw)

    def run(fn, q, k, v, *extra):
      return fn(q, k, v, return_lse=True, **kw, **dict(zip(names, extra)))

    B, T, N, _ = q.shape
    Hv = v.shape[-1]
    ct = (rnd(seed + 7, (B, T, N, Hv), q.dtype), rnd(seed + 8, (B, N, T), jnp.float32))
    args = (q, k, v, *diff_kw.values())

    def fwd_bwd(fn):
      # One compilation per function: forward and vjp under a single jit.
      def go(args, ct):
        (o, lse), vjp = jax.vjp(functools.partial(run, fn), *args)
        return o, lse, vjp(ct)
      return jax.jit(go)(args, ct)

    o, lse, g = fwd_bwd(self.attn)
    o_r, lse_r, g_r = fwd_bwd(attnjax.reference_attention)
    assert o.dtype == q.dtype and lse.dtype == jnp.float32
    assert_close(o, o_r, dtype, "out")
    fin = np.isfinite(np.asarray(lse_r))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), fin)
    assert_close(np.where(fin, lse, 0), np.where(fin, lse_r, 0), dtype, "lse")
    for name, a, b in zip(["dq", "dk", "dv", *names], g, g_r):
      assert a.dtype == b.dtype, name
      assert_close(a, b, dtype, name)
    return o, g

  # ------------------------------------------------------------------ shapes & masks
  @hypothesis.settings(max_examples=EXAMPLES)
  @hypothesis.given(
      B=st.integers(1, 2), T=st.integers(1, 40), S=st.integers(1, 40),
      heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 4), (6, 2)]),
      H=st.sampled_from([32, 64, 128]), Hv=st.sampled_from([None, 16]),
      family=st.sampled_from(sorted(MASK_FAMILIES)), dtype=st.sampled_from(["float32", "bfloat16"]))
  def test_matches_reference(self, B, T, S, heads, H, Hv, family, dtype):
    if dtype == "bfloat16" and not self.SUPPORTS_BF16:
      return
    N, K = heads
    dtype = jnp.dtype(dtype)
    if family in ("prefix", "dual", "or_not", "causal0", "chunked_causal", "window"):
      S = T  # self-attention masks
    q, k, v = make_qkv(T * 7 + S, B, T, S, N, K, H, Hv or H, dtype)
    self.check(q, k, v, dtype, mask=MASK_FAMILIES[family](T, S))

  @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
  def test_long_cross_attention_gqa(self, dtype):
    dtype = jnp.dtype(dtype)
    q, k, v = make_qkv(3, 1, 67, 131, 6, 2, 64, 32, dtype)
    self.check(q, k, v, dtype, mask=masks.causal(131 - 67))

  # ------------------------------------------------------------------ features
  @pytest.mark.parametrize("bias_shape", [(2, 4, 19, 23), (1, 4, 1, 23), (2, 1, 19, 1), (19, 23)])
  def test_bias_grads(self, bias_shape):
    q, k, v = make_qkv(11, 2, 19, 23, 4, 2, 32, 32, jnp.float32)
    bias = rnd(5, bias_shape)
    self.check(q, k, v, jnp.float32, diff_kw=dict(bias=bias), mask=masks.causal(4))

  def test_sinks_grads(self):
    q, k, v = make_qkv(12, 2, 21, 21, 4, 1, 32, 32, jnp.float32)
    sinks = rnd(6, (4,))
    self.check(q, k, v, jnp.float32, diff_kw=dict(sinks=sinks), mask=masks.sliding_window(4))

  def test_softcap_and_scale(self):
    q, k, v = make_qkv(13, 1, 17, 29, 2, 2, 64, 64, jnp.float32)
    q = q * 4.0
    self.check(q, k, v, jnp.float32, softcap=5.0, scale=0.3)

  def test_segment_ids_with_padding(self):
    B, T = 2, 37
    q, k, v = make_qkv(14, B, T, T, 4, 2, 32, 32, jnp.float32)
    seg = np.zeros((B, T), np.int32)
    seg[0, :10], seg[0, 10:30], seg[0, 30:] = 1, 2, 0     # 0 = padding
    seg[1, :25], seg[1, 25:] = 3, 4
    self.check(q, k, v, jnp.float32, q_segment_ids=jnp.asarray(seg), mask=masks.causal())

  def test_segment_ids_cross(self):
    q, k, v = make_qkv(15, 2, 9, 14, 2, 1, 32, 32, jnp.float32)
    qs = jnp.asarray(np.repeat(np.arange(3), 3)[None].repeat(2, 0), jnp.int32)
    ks = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 4, (2, 14))), jnp.int32)
    self.check(q, k, v, jnp.float32, q_segment_ids=qs, kv_segment_ids=ks)

  def test_document_mask_under_jit(self):
    B, T = 2, 33
    q, k, v = make_qkv(16, B, T, T, 2, 2, 32, 32, jnp.float32)
    seg = jnp.asarray(np.sort(np.random.default_rng(1).integers(0, 5, (B, T))), jnp.int32)

    @jax.jit
    def f(q, k, v, seg):
      return self.attn(q, k, v, mask=masks.document(seg) & masks.causal())

    want = attnjax.reference_attention(q, k, v, mask=masks.document(seg) & masks.causal())
    assert_close(f(q, k, v, seg), want, jnp.float32, "document")
    g = jax.grad(lambda q: f(q, k, v, seg).sum())(q)
    g_r = jax.grad(lambda q: attnjax.reference_attention(
        q, k, v, mask=masks.document(seg) & masks.causal()).sum())(q)
    assert_close(g, g_r, jnp.float32, "document dq")

  def test_score_mod_table_grads(self):
    Hh = Ww = 5
    T = Hh * Ww
    q, k, v = make_qkv(17, 1, T, T, 4, 2, 32, 32, jnp.float32)
    table = rnd(9, (4, (2 * Hh - 1) * (2 * Ww - 1)), scale=0.5)
    slopes = jnp.asarray(score_mods.alibi_slopes(4))

    def run(fn, q, k, v, table, slopes):
      mod = score_mods.compose(score_mods.relative_position_bias(table, shape=(Hh, Ww)),
                               score_mods.alibi(slopes, symmetric=True))
      return fn(q, k, v, score_mod=mod, mask=masks.neighborhood((Hh, Ww), 3))

    args = (q, k, v, table, slopes)
    o, vjp = jax.vjp(functools.partial(run, self.attn), *args)
    o_r, vjp_r = jax.vjp(functools.partial(run, attnjax.reference_attention), *args)
    assert_close(o, o_r, jnp.float32, "out")
    ct = rnd(3, o.shape)
    for name, a, b in zip(["dq", "dk", "dv", "dtable", "dslopes"], vjp(ct), vjp_r(ct)):
      assert_close(a, b, jnp.float32, name)

  def test_spatial_masks(self):
    shape = (6, 8)
    T = 48
    q, k, v = make_qkv(18, 1, T, T, 2, 1, 32, 32, jnp.float32)
    for m in [masks.neighborhood(shape, (3, 5), dilation=(2, 1)), masks.window(shape, (3, 4), 1),
              masks.grid(shape, 2), masks.criss_cross(shape), masks.axial(shape, 1)]:
      self.check(q, k, v, jnp.float32, mask=m)

  # ------------------------------------------------------------------ safety
  def empty_rows_case(self, T, S):
    """(a mask with some rows empty, those rows, a mask with every row empty)."""
    m = np.random.default_rng(2).random((T, S)) < 0.5
    m[3] = False
    m[7] = False
    return m, [3, 7], np.zeros((T, S), bool)

  def test_fully_masked_rows_are_zero_with_zero_grads(self):
    T, S = 12, 20
    q, k, v = make_qkv(19, 2, T, S, 2, 1, 32, 32, jnp.float32)
    m, rows, none = self.empty_rows_case(T, S)
    f = lambda q, k, v: self.attn(q, k, v, mask=m)
    out, vjp = jax.vjp(f, q, k, v)
    dq, dk, dv = vjp(rnd(4, out.shape))
    for x in (out, dq, dk, dv):
      assert np.all(np.isfinite(np.asarray(x)))
    np.testing.assert_array_equal(np.asarray(out)[:, rows], 0.0)
    np.testing.assert_array_equal(np.asarray(dq)[:, rows], 0.0)
    self.check(q, k, v, jnp.float32, mask=m)
    # Everything masked: all zeros, lse = -inf, finite zero gradients.
    o, lse = self.attn(q, k, v, mask=none, return_lse=True)
    np.testing.assert_array_equal(np.asarray(o), 0.0)
    assert np.all(np.asarray(lse) == -np.inf)
    g = jax.grad(lambda q, k, v: self.attn(q, k, v, mask=none).sum(), argnums=(0, 1, 2))(q, k, v)
    for x in g:
      np.testing.assert_array_equal(np.asarray(x), 0.0)

  def test_causality_property(self):
    """d out[:, i] / d k[:, j] == 0 exactly for j > i (and for v)."""
    T = 37
    q, k, v = make_qkv(20, 1, T, T, 2, 1, 32, 32, jnp.float32)
    i = 13
    g = jax.grad(lambda k, v: self.attn(q, k, v, mask=masks.causal())[:, : i + 1].sum(),
                 argnums=(0, 1))(k, v)
    for x in g:
      x = np.asarray(x)
      assert np.all(x[:, i + 1:] == 0.0)
      assert np.any(x[:, : i + 1] != 0.0)

  def test_jit_and_vmap(self):
    q, k, v = make_qkv(21, 2, 16, 16, 2, 2, 32, 32, jnp.float32)
    f = jax.jit(lambda q, k, v: self.attn(q, k, v, mask=masks.causal()))
    want = attnjax.reference_attention(q, k, v, mask=masks.causal())
    assert_close(f(q, k, v), want, jnp.float32, "jit")
    vm = jax.vmap(lambda q, k, v: self.attn(q[None], k[None], v[None], mask=masks.causal())[0])
    assert_close(vm(q, k, v), want, jnp.float32, "vmap")


class TestReference:
  def test_matches_jax_nn(self):
    q, k, v = make_qkv(0, 2, 24, 24, 4, 2, 32, 32, jnp.float32)
    out = attnjax.reference_attention(q, k, v, mask=masks.causal())
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    assert_close(out, want, jnp.float32)

  def test_matches_numpy_loop(self):
    q, k, v = [np.asarray(x, np.float64) for x in make_qkv(1, 1, 5, 7, 2, 1, 8, 8, jnp.float32)]
    bias = np.asarray(rnd(3, (1, 2, 5, 7)), np.float64)
    sinks = np.asarray([0.3, -0.4])
    out = attnjax.reference_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)),
                                      bias=jnp.asarray(bias, jnp.float32),
                                      sinks=jnp.asarray(sinks, jnp.float32), softcap=2.0)
    want = np.zeros((1, 5, 2, 8))
    for h in range(2):
      for i in range(5):
        s = np.array([q[0, i, h] @ k[0, j, 0] / np.sqrt(8) + bias[0, h, i, j] for j in range(7)])
        s = 2.0 * np.tanh(s / 2.0)
        e = np.exp(s)
        want[0, i, h] = (e[:, None] * v[0, :, 0]).sum(0) / (e.sum() + np.exp(sinks[h]))
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-5, rtol=1e-5)


class TestXla(AttentionTestBase):
  IMPL = "xla"


class TestXlaChunked(AttentionTestBase):
  IMPL = "xla_chunked"
  BLOCK_SIZES = attnjax.ChunkedBlockSizes(block_q=8, block_k=16)

  def test_default_block_sizes(self):
    q, k, v = make_qkv(30, 1, 300, 700, 4, 2, 64, 64, jnp.float32)
    self.BLOCK_SIZES = None
    self.check(q, k, v, jnp.float32, mask=masks.sliding_window(200, 10) | masks.causal(-400))

  def _table_mask(self, table_value):
    """A mask whose block table lies (says every tile is `table_value`): reveals
    whether the implementation obeys the table."""
    inner = masks.causal()

    def table(ctx, T, S, bq, bk):
      return np.full((1, 1, -(-T // bq), -(-S // bk)), table_value, np.int8)
    return masks.Mask(inner._fn, "lying", table=table)

  def test_full_tiles_are_not_masked(self):
    q, k, v = make_qkv(31, 1, 32, 32, 2, 2, 32, 32, jnp.float32)
    out = self.attn(q, k, v, mask=self._table_mask(masks.FULL))
    assert_close(out, attnjax.reference_attention(q, k, v), jnp.float32, "full tiles")

  def test_empty_tiles_are_skipped(self):
    q, k, v = make_qkv(32, 1, 32, 32, 2, 2, 32, 32, jnp.float32)
    out = self.attn(q, k, v, mask=self._table_mask(masks.EMPTY))
    np.testing.assert_array_equal(np.asarray(out), 0.0)

  def test_schedule_counts_nonempty_tiles(self):
    from attnjax.ops import chunked, dense
    T = 256
    q, k, v = make_qkv(33, 1, T, T, 2, 2, 32, 32, jnp.float32)
    for m in [masks.causal(), masks.sliding_window(40), masks.neighborhood((16, 16), 5)]:
      a = dense.check_attention_args(q, k, v, mask=m)
      klist, count, partial = chunked._schedule(a, 32, 32)
      table = m.block_table(T, T, 32, 32)
      np.testing.assert_array_equal(count[0, 0], (table[0, 0] != masks.EMPTY).sum(-1))
      n_part = sum(partial[0, 0, i, : count[0, 0, i]].sum() for i in range(count.shape[2]))
      assert n_part == (table == masks.PARTIAL).sum()


class TestDispatch:
  def test_auto_matches_reference(self):
    q, k, v = make_qkv(40, 1, 16, 16, 2, 2, 32, 32, jnp.float32)
    assert_close(attnjax.attention(q, k, v), attnjax.reference_attention(q, k, v), jnp.float32)

  def test_fallback_and_error_lists_reasons(self):
    q, k, v = make_qkv(41, 1, 8, 8, 2, 2, 32, 32, jnp.float32)
    out = attnjax.attention(q, k, v, implementation=("pallas", "xla"))
    assert_close(out, attnjax.reference_attention(q, k, v), jnp.float32)
    with pytest.raises(NotImplementedError, match="pallas"):
      attnjax.attention(q, k, v, implementation="pallas")

  def test_unknown_implementation_suggests(self):
    q, k, v = make_qkv(42, 1, 8, 8, 2, 2, 32, 32, jnp.float32)
    with pytest.raises(ValueError, match="xla_chunked"):
      attnjax.attention(q, k, v, implementation="xla_chunk")

  def test_auto_candidates(self):
    from attnjax.dispatch import auto_candidates
    from attnjax.ops import dense
    q, k, v = make_qkv(43, 1, 8, 8, 2, 2, 32, 32, jnp.float32)
    a = dense.check_attention_args(q, k, v)
    assert auto_candidates(a, "tpu")[0] == "pallas_tpu"
    assert auto_candidates(a, "gpu")[0] == "pallas_gpu"
    assert all(not c.startswith("pallas") for c in auto_candidates(a, "cpu"))
