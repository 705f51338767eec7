"""Helpers shared by several test modules: random inputs, tolerance checks, a float64
ground truth for attention, the shared per-implementation test base
(`AttentionTestBase`) and the Pallas flash-kernel runners.

Test modules import from here, never from each other.
"""

import functools
import importlib

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOLERANCES, examples

import attnjax
from attnjax import masks, score_mods
from attnjax.ops.dense import reference_attention

EXAMPLES = examples(8)


def rnd(seed, shape, dtype=jnp.float32, scale=1.0):
  # NumPy RNG: jax.random would compile a sampler for every new shape.
  x = scale * np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
  return jnp.asarray(x, dtype)


def jit_call(fn, *args, **kwargs):
  """``fn(*args, **kwargs)`` compiled once (``fn`` may be an NNX module, whose state is
  closed over): eager layer calls compile every primitive separately, several times
  slower in this compile-bound suite; the result is the same computation."""
  return jax.jit(lambda *a: fn(*a, **kwargs))(*args)


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


def large_logit_case(seed, T, N, H, direction, max_logit, dtype):
  """q, k, v [1, T, N, H] whose largest |logit| (q.k / sqrt(H)) is ``max_logit``: keys
  grow along one unit direction u (k_j = noise + direction * (j / T) * H * u, then all
  of k scaled), so every row's softmax is sharply peaked at one end of its key range;
  and the cotangents (do, dlse) of (out, lse)."""
  rng = np.random.default_rng(seed)
  u = rng.standard_normal(H)
  u /= np.linalg.norm(u)
  q = rng.standard_normal((1, T, N, H))
  k = rng.standard_normal((1, T, N, H)) + direction * (np.arange(T) / T)[None, :, None,
                                                                           None] * H * u
  s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
  k *= max_logit / np.abs(s).max()
  v = rng.standard_normal((1, T, N, H))
  cast = lambda x: jnp.asarray(x.astype(np.float32), dtype)
  ct = (cast(rng.standard_normal((1, T, N, H))),
        jnp.asarray(rng.standard_normal((1, N, T)), jnp.float32))
  return cast(q), cast(k), cast(v), ct


def attention_f64(q, k, v, ct, *, causal=False, scale=None):
  """Float64 NumPy ground truth of attention (BTNH, N == K) at the given (rounded)
  inputs: dict of out, lse, and dq, dk, dv for the cotangents ct = (do, dlse), plus
  max_logit (the largest |scaled logit| among the allowed ones)."""
  f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  q, k, v, do, dlse = (f64(x) for x in (q, k, v, *ct))
  scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
  s = np.einsum("btnh,bsnh->bnts", q, k) * scale
  T, S = s.shape[-2:]
  allowed = np.tril(np.ones((T, S), bool), S - T) if causal else np.ones((T, S), bool)
  max_logit = float(np.abs(s[..., allowed]).max())
  s = np.where(allowed, s, -np.inf)
  m = s.max(-1, keepdims=True)
  e = np.exp(s - m)
  l = e.sum(-1, keepdims=True)
  p = e / l
  out = np.einsum("bnts,bsnh->btnh", p, v)
  dp = np.einsum("btnh,bsnh->bnts", do, v)
  delta = np.einsum("btnh,btnh->bnt", do, out) - dlse
  ds = p * (dp - delta[..., None])
  return dict(out=out, lse=(m + np.log(l))[..., 0], max_logit=max_logit,
              dq=np.einsum("bnts,bsnh->btnh", ds, k) * scale,
              dk=np.einsum("bnts,btnh->bsnh", ds, q) * scale,
              dv=np.einsum("bnts,btnh->bsnh", p, do))


def assert_close_f64(x, want, dtype, max_logit, what=""):
  """x against a float64 truth.  float32: |x - want| <= 2 * 2^-24 * max_logit * scale
  (at least the suite's float32 atol), scale = max(1, max |want|); bf16: the suite's
  bf16 tolerance (atol * scale + rtol * |want|)."""
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  assert x.shape == want.shape, (what, x.shape, want.shape)
  assert np.all(np.isfinite(x)), f"{what}: non-finite values"
  t = TOLERANCES[np.dtype(dtype)]
  scale = max(1.0, float(np.max(np.abs(want))))
  if np.dtype(dtype) == np.float32:
    atol, rtol = max(t["atol"], 2.0 * 2.0**-24 * max_logit) * scale, 0.0
  else:
    atol, rtol = t["atol"] * scale, t["rtol"]
  np.testing.assert_allclose(x, want, atol=atol, rtol=rtol, err_msg=what)


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
    g = jax.jit(jax.grad(lambda q: f(q, k, v, seg).sum()))(q)
    g_r = jax.jit(jax.grad(lambda q: attnjax.reference_attention(
        q, k, v, mask=masks.document(seg) & masks.causal()).sum()))(q)
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
    o, vjp = jax.vjp(jax.jit(functools.partial(run, self.attn)), *args)
    o_r, vjp_r = jax.vjp(jax.jit(functools.partial(run, attnjax.reference_attention)), *args)
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

  # ------------------------------------------------------------------ large logits
  @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
  @pytest.mark.parametrize("causal", [True, False], ids=["causal", "none"])
  @pytest.mark.parametrize("direction", [1, -1], ids=["keys_up", "keys_down"])
  def test_large_logits_match_float64(self, direction, causal, dtype):
    """Logits up to 300 (keys growing along one direction, so each row's softmax is
    sharply peaked at one end of its key range): out, lse and dq/dk/dv against a
    float64 ground truth.  Float32 error is bounded by twice the float32 rounding of
    the largest logit, relative to each output's largest magnitude (the conditioning
    of softmax at logit L is ~L * 2^-24); bf16 by the suite's bf16 tolerance."""
    if dtype == "bfloat16" and not self.SUPPORTS_BF16:
      return
    dtype = jnp.dtype(dtype)
    q, k, v, ct = large_logit_case(seed=60 + direction, T=96, N=2, H=64, direction=direction,
                                   max_logit=300.0, dtype=dtype)
    mask = masks.causal() if causal else None

    def go(q, k, v, ct):
      (o, lse), vjp = jax.vjp(lambda q, k, v: self.attn(q, k, v, mask=mask, return_lse=True),
                              q, k, v)
      return o, lse, vjp(ct)

    o, lse, (dq, dk, dv) = jax.jit(go)(q, k, v, ct)
    want = attention_f64(q, k, v, ct, causal=causal)
    for name, got in zip(("out", "lse", "dq", "dk", "dv"), (o, lse, dq, dk, dv)):
      assert_close_f64(got, want[name], dtype, want["max_logit"], name)

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
    f = jax.jit(lambda q, k, v: self.attn(q, k, v, mask=m))
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
    g = jax.jit(jax.grad(lambda q, k, v: self.attn(q, k, v, mask=none).sum(),
                         argnums=(0, 1, 2)))(q, k, v)
    for x in g:
      np.testing.assert_array_equal(np.asarray(x), 0.0)

  def test_causality_property(self):
    """d out[:, i] / d k[:, j] == 0 exactly for j > i (and for v)."""
    T = 37
    q, k, v = make_qkv(20, 1, T, T, 2, 1, 32, 32, jnp.float32)
    i = 13
    g = jax.jit(jax.grad(lambda k, v: self.attn(q, k, v, mask=masks.causal())[:, : i + 1].sum(),
                         argnums=(0, 1)))(k, v)
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


# --------------------------------------------------------------- Pallas flash kernels

BACKENDS = ("tpu", "gpu")
TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=2e-2, rtol=2e-2)}
# Gradients of tables that sum over every tile (score_mod arrays, sinks, broadcast bias).
SUM_TOL = {jnp.float32: dict(atol=5e-5, rtol=2e-5), jnp.bfloat16: dict(atol=6e-2, rtol=3e-2)}


def kernel_module(backend):
  return importlib.import_module(f"attnjax.kernels.{backend}.flash")


def kernel_rand(rng, shape, dtype=jnp.float32):
  return jnp.asarray(rng.standard_normal(shape), dtype)


def run_kernel_pair(backend, dtype, shapes, seed=0, diff=(), make_kwargs=None, block_sizes=None,
                    interpret=True):
  """Kernel (interpret) vs reference: returns the leaves of (out, lse, grads) of both.

  ``diff`` names extra differentiable arrays (each passed to ``make_kwargs``);
  ``interpret`` may be a ``pltpu.InterpretParams`` (TPU-semantics interpreter).
  """
  B, T, S, N, K, H, Hv = shapes
  rng = np.random.default_rng(seed)
  q = kernel_rand(rng, (B, T, N, H), dtype)
  k = kernel_rand(rng, (B, S, K, H), dtype)
  v = kernel_rand(rng, (B, S, K, Hv), dtype)
  extras = [jnp.asarray(x) for x in diff]
  ct_o = kernel_rand(rng, (B, T, N, Hv), dtype)
  ct_l = kernel_rand(rng, (B, N, T), jnp.float32)
  mod = kernel_module(backend)

  def run(impl):
    def f(q, k, v, *ex):
      kw = make_kwargs(*ex) if make_kwargs else {}
      if impl == "kernel":
        return mod.flash_attention(q, k, v, return_lse=True, interpret=interpret,
                                   block_sizes=block_sizes, **kw)
      return reference_attention(q, k, v, return_lse=True, **kw)

    def g(args, cts):
      out, vjp = jax.vjp(f, *args)
      return out, vjp(cts)
    return jax.jit(g)((q, k, v, *extras), (ct_o, ct_l))

  return run("kernel"), run("reference")


def assert_kernel_close(got, want, dtype, n_core=5):
  (go, gl), ggrads = got
  (wo, wl), wgrads = want
  tol = TOL[dtype]
  np.testing.assert_allclose(np.asarray(go, np.float32), np.asarray(wo, np.float32), **tol)
  # lse: -inf exactly where the reference has -inf, close elsewhere.
  gl, wl = np.asarray(gl), np.asarray(wl)
  np.testing.assert_array_equal(np.isneginf(gl), np.isneginf(wl))
  fin = np.isfinite(wl)
  np.testing.assert_allclose(gl[fin], wl[fin], **tol)
  for i, (a, b) in enumerate(zip(ggrads, wgrads)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.all(np.isfinite(a)), f"grad {i} has non-finite values"
    np.testing.assert_allclose(a, b, **(tol if i < 3 else SUM_TOL[dtype]),
                               err_msg=f"grad {i}")


def export_for(platform, fn, *args):
  if platform == "tpu":
    return jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
  return jax.export.export(
      jax.jit(fn), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
