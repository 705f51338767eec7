"""Tests for the vision linear attention ops (attnjax.ops.linear.vision: L^2ViT, CARE, HIIF,
FEAT) and their layers (attnjax.layers.linear_vision, registry 'l2vit', 'care', 'hiif',
'feat').

Each op is checked against an independent float64 reference written from the paper's
definition with the [tokens x tokens] weights materialised (explicit convolution loops,
explicit per-channel WKV weight matrices), forward and `jax.vjp` with a random cotangent
(float32 1e-5, bfloat16 2e-2); bad arguments raise errors naming them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import jit_call
from jax.scipy.special import erf

from attnjax import variants
from attnjax.ops import linear as L

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def rnd(seed, shape, dtype=jnp.float32, scale=1.0):
  return (scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)).astype(dtype)


def assert_close(a, b, tol, what=''):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(b, np.float64)
  assert a.shape == b.shape, (what, a.shape, b.shape)
  assert np.all(np.isfinite(a)), f'{what}: non-finite values'
  scale = max(1.0, float(np.max(np.abs(b))) if b.size else 1.0)
  np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale, err_msg=what)


def _fwd_bwd(fn):
  """jit(args, cotangents -> (fn(*args), vjp(cotangents)))."""
  def run(args, cts):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(cts)
  return jax.jit(run)


def check(op, ref, args, dtype, seed=123):
  """op(*args) (in `dtype`) vs ref(*args in float64): forward and jax.vjp of a random
  cotangent with respect to every argument."""
  args = tuple(jnp.asarray(a, dtype) for a in args)
  out_shape = jax.eval_shape(op, *args)
  cts = jax.tree.map(lambda o: rnd(seed, o.shape, o.dtype), out_shape)
  out, grads = _fwd_bwd(op)(args, cts)
  leaves = jax.tree.leaves(out)
  with jax.enable_x64(True):
    f64 = lambda a: jnp.asarray(np.asarray(jnp.asarray(a, jnp.float32)), jnp.float64)  # noqa: E731
    ref_out, ref_grads = _fwd_bwd(ref)(tuple(f64(a) for a in args), jax.tree.map(f64, cts))
    ref_grads = [np.asarray(g) for g in ref_grads]
    ref_leaves = [np.asarray(o) for o in jax.tree.leaves(ref_out)]
  tol = TOL[dtype]
  for i, (o, ro) in enumerate(zip(leaves, ref_leaves)):
    assert o.dtype == dtype
    assert_close(o, ro, tol, f'output {i}')
  for i, (g, rg) in enumerate(zip(grads, ref_grads)):
    assert g.shape == args[i].shape
    assert_close(g, rg, tol, f'grad of argument {i}')


# ----------------------------------------------------------------------------- references
# (called with float64 arrays under jax.enable_x64)


def _rep(x, N):
  return jnp.repeat(x, N // x.shape[-2], axis=-2)


def ref_dwconv(x, w, b=None):
  """'SAME' depthwise conv as an explicit sum over the kernel offsets, zero padding."""
  kh, kw = w.shape[:2]
  _, Hh, Ww, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  out = jnp.zeros_like(x)
  for dy in range(kh):
    for dx in range(kw):
      out = out + w[dy, dx] * xp[:, dy:dy + Hh, dx:dx + Ww]
  return out if b is None else out + b


def gelu(x):
  return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def ref_linear_grid(q, k, v, phi, eps=1e-6):
  """Normalised kernel attention with the [tokens, tokens] weights materialised."""
  B, Hh, Ww, N, _ = q.shape
  qf = phi(q.reshape(B, Hh * Ww, N, -1))
  kf = phi(_rep(k, N).reshape(B, Hh * Ww, N, -1))
  vv = _rep(v, N).reshape(B, Hh * Ww, N, -1)
  w = jnp.einsum('btnh,bsnh->bnts', qf, kf)
  den = jnp.sum(w, -1)
  o = jnp.einsum('bnts,bsnv->btnv', w, vv) / (den + eps).transpose(0, 2, 1)[..., None]
  return o.reshape(B, Hh, Ww, N, -1)


def relu(x):
  return jnp.maximum(x, 0.0)


def elu1(x):
  return jnp.where(x > 0, x + 1.0, jnp.exp(jnp.minimum(x, 0.0)))


def ref_l2vit(q, k, v, w1, w2, b1, b2):
  o = ref_linear_grid(q, k, v, relu)
  B, Hh, Ww, N, Hv = o.shape
  x = o.reshape(B, Hh, Ww, N * Hv)
  h = gelu(ref_dwconv(x, w1.reshape(w1.shape[:2] + (-1,)), b1.reshape(-1)))
  h = ref_dwconv(h, w2.reshape(w2.shape[:2] + (-1,)), b2.reshape(-1))
  return (x + h).reshape(o.shape)


def sigmoid(x):
  return 1.0 / (1.0 + jnp.exp(-x))


def ref_care(q, k, v, xl, wc, bc, wlg, wgl):
  g = ref_linear_grid(q, k, v, elu1)
  loc = ref_dwconv(xl, wc, bc)
  return (g * sigmoid(jnp.einsum('bhwc,cnv->bhwnv', loc, wlg)),
          loc * sigmoid(jnp.einsum('bhwnv,nvc->bhwc', g, wgl)))


def ref_hiif(q, k, v, eps=1e-5):
  def ln(x):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
  N, S = q.shape[2], k.shape[1]
  kn, vn = ln(_rep(k, N)), ln(_rep(v, N))
  w = jnp.einsum('btnh,bsnh->bnts', q, kn) / S
  return jnp.einsum('bnts,bsnv->btnv', w, vn)


def ref_wkv(k, v, w, u):
  """Explicit bidirectional WKV along axis 1 of [X, L, N, H]: per-channel [L, L] weights."""
  Lx = k.shape[1]
  t = jnp.arange(Lx)
  dist = jnp.abs(t[:, None] - t[None, :]).astype(k.dtype)               # [L, L]
  logw = -(dist[..., None, None] - 1.0) * w / Lx + k[:, None]            # [X, t, i, N, H]
  logw = jnp.where((dist == 0)[..., None, None], u + k[:, None], logw)
  wt = jnp.exp(logw)
  return jnp.sum(wt * v[:, None], 2) / jnp.sum(wt, 2)


def ref_feat(r, k, v, ws, us, wt=None, ut=None, tau=1.0):
  shape = r.shape
  N, H = shape[-2:]
  if r.ndim == 5:
    B = shape[0]
    s = ref_wkv(k.reshape(B, -1, N, H), v.reshape(B, -1, N, H), ws, us)
  else:
    B, T = shape[:2]
    kk, vv = k.reshape(B * T, -1, N, H), v.reshape(B * T, -1, N, H)
    s = ref_wkv(kk, vv, ws, us).reshape(B, T, -1, N, H)
    kt = k.reshape(B, T, -1, N, H).transpose(0, 2, 1, 3, 4).reshape(-1, T, N, H)
    st = s.transpose(0, 2, 1, 3, 4).reshape(-1, T, N, H)
    s = ref_wkv(kt, st, wt, ut).reshape(B, -1, T, N, H).transpose(0, 2, 1, 3, 4)
  y = (sigmoid(r).reshape(s.shape) * s).reshape(B, -1, N * H)
  yn = y / jnp.sqrt(jnp.sum(y * y, 1, keepdims=True))
  logits = tau * jnp.einsum('bsc,bsd->bcd', yn, yn)
  a = jnp.exp(logits - logits.max(-1, keepdims=True))
  a = a / a.sum(-1, keepdims=True)
  return jnp.einsum('bsd,bcd->bsc', y, a).reshape(shape)


# ----------------------------------------------------------------------------- L^2ViT

@pytest.mark.parametrize('dtype', [jnp.float32,
                                   pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
def test_l2vit_matches_reference(dtype):
  B, Hh, Ww, N, K, H, Hv = 2, 3, 4, 4, 2, 5, 3
  args = (rnd(0, (B, Hh, Ww, N, H)), rnd(1, (B, Hh, Ww, K, H)), rnd(2, (B, Hh, Ww, K, Hv)),
          rnd(3, (3, 3, N, Hv), scale=0.5), rnd(4, (3, 5, N, Hv), scale=0.5),
          rnd(5, (N, Hv), scale=0.1), rnd(6, (N, Hv), scale=0.1))

  def op(q, k, v, w1, w2, b1, b2):
    return L.l2vit_attention(q, k, v, lcm_kernels=(w1, w2), lcm_biases=(b1, b2))
  check(op, ref_l2vit, args, dtype)


def test_l2vit_without_lcm_and_empty_rows():
  q = -jnp.abs(rnd(0, (1, 2, 2, 2, 4))).at[:, 0].set(jnp.abs(rnd(9, (1, 2, 2, 4))))
  k, v = jnp.abs(rnd(1, (1, 2, 2, 2, 4))), rnd(2, (1, 2, 2, 2, 3))
  with jax.enable_x64(True):
    ref = ref_linear_grid(*(jnp.asarray(np.asarray(a), jnp.float64) for a in (q, k, v)), relu)
  out, vjp = jax.vjp(lambda q: L.l2vit_attention(q, k, v), q)
  assert_close(out, ref, 1e-5)
  assert np.all(np.asarray(out[:, 1]) == 0)      # rows with only negative queries: 0
  (gq,) = vjp(rnd(5, out.shape))
  assert np.all(np.isfinite(gq)) and np.all(np.asarray(gq[:, 1]) == 0)


# ----------------------------------------------------------------------------- CARE

@pytest.mark.parametrize('dtype', [jnp.float32,
                                   pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
def test_care_matches_reference(dtype):
  B, Hh, Ww, N, K, H, Hv, Cl = 2, 4, 3, 2, 1, 4, 3, 5
  args = (rnd(0, (B, Hh, Ww, N, H)), rnd(1, (B, Hh, Ww, K, H)), rnd(2, (B, Hh, Ww, K, Hv)),
          rnd(3, (B, Hh, Ww, Cl)), rnd(4, (3, 3, Cl), scale=0.5), rnd(5, (Cl,), scale=0.1),
          rnd(6, (Cl, N, Hv), scale=0.5), rnd(7, (N, Hv, Cl), scale=0.5))

  def op(q, k, v, xl, wc, bc, wlg, wgl):
    return L.care_attention(q, k, v, xl, conv_kernel=wc, conv_bias=bc, local_to_global=wlg,
                            global_to_local=wgl)
  check(op, ref_care, args, dtype)


# ----------------------------------------------------------------------------- HIIF

@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_hiif_matches_reference(dtype):
  B, T, S, N, K, H, Hv = 2, 7, 5, 4, 2, 6, 3
  args = (rnd(0, (B, T, N, H)), rnd(1, (B, S, K, H)), rnd(2, (B, S, K, Hv)))
  check(lambda q, k, v: L.hiif_attention(q, k, v), ref_hiif, args, dtype)


# ----------------------------------------------------------------------------- FEAT

def _feat_params(seed, N, H):
  return (jnp.abs(rnd(seed, (N, H))) * 3.0, rnd(seed + 1, (N, H), scale=0.5),
          jnp.abs(rnd(seed + 2, (N, H))) * 2.0, rnd(seed + 3, (N, H), scale=0.5))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_feat_image_matches_reference(dtype):
  B, Hh, Ww, N, H = 2, 3, 4, 2, 3
  ws, us, _, _ = _feat_params(10, N, H)
  args = (rnd(0, (B, Hh, Ww, N, H)), rnd(1, (B, Hh, Ww, N, H)), rnd(2, (B, Hh, Ww, N, H)),
          ws, us, jnp.asarray(1.7))

  def op(r, k, v, ws, us, tau):
    return L.feat_attention(r, k, v, spatial_decay=ws, spatial_bonus=us,
                            channel_temperature=tau)
  check(op, lambda r, k, v, ws, us, tau: ref_feat(r, k, v, ws, us, tau=tau), args, dtype)


def test_feat_video_matches_reference():
  B, T, Hh, Ww, N, H = 2, 3, 2, 3, 2, 2
  args = (rnd(0, (B, T, Hh, Ww, N, H)), rnd(1, (B, T, Hh, Ww, N, H)),
          rnd(2, (B, T, Hh, Ww, N, H))) + _feat_params(10, N, H)

  def op(r, k, v, ws, us, wt, ut):
    return L.feat_attention(r, k, v, spatial_decay=ws, spatial_bonus=us, temporal_decay=wt,
                            temporal_bonus=ut, channel_temperature=0.8)
  check(op, lambda *a: ref_feat(*a, tau=0.8), args, jnp.float32)


def test_feat_single_frame_video_equals_image():
  r, k, v = (rnd(i, (1, 1, 3, 3, 2, 4)) for i in range(3))
  ws, us, wt, ut = _feat_params(4, 2, 4)
  vid = jax.jit(L.feat_attention)(r, k, v, spatial_decay=ws, spatial_bonus=us, temporal_decay=wt,
                         temporal_bonus=ut)
  img = jax.jit(L.feat_attention)(r[:, 0], k[:, 0], v[:, 0], spatial_decay=ws, spatial_bonus=us)
  assert_close(vid[:, 0], img, 1e-6)


def test_bidirectional_wkv_large_keys_are_finite():
  k = rnd(0, (2, 9, 2, 3), scale=60.0)     # exp(k) overflows float32 without the shift
  v = rnd(1, (2, 9, 2, 3))
  w, u = jnp.full((2, 3), 4.0), jnp.zeros((2, 3))
  out = jax.jit(L.bidirectional_wkv)(k, v, decay=w, bonus=u)   # jitted: not op by op
  with jax.enable_x64(True):
    ref = jax.jit(ref_wkv)(*(jnp.asarray(np.asarray(a), jnp.float64) for a in (k, v, w, u)))
  assert_close(out, ref, 1e-5)


# ----------------------------------------------------------------------------- errors

def _grid(N=2, K=2, H=4, Hv=4):
  return rnd(0, (1, 2, 2, N, H)), rnd(1, (1, 2, 2, K, H)), rnd(2, (1, 2, 2, K, Hv))


@pytest.mark.parametrize('call, match', [
    (lambda: L.l2vit_attention(*_grid()[:2], rnd(2, (1, 2, 2, 4))), 'v must have rank 5'),
    (lambda: L.l2vit_attention(*_grid(N=3, K=2)), 'multiple of kv heads'),
    (lambda: L.l2vit_attention(*_grid(), lcm_kernels=(jnp.ones((3, 3, 2, 4)),)),
     'lcm_kernels must be None or a pair'),
    (lambda: L.l2vit_attention(*_grid(), lcm_kernels=(jnp.ones((2, 2, 2, 4)),) * 2),
     r'lcm_kernels\[0\] window must be odd'),
    (lambda: L.l2vit_attention(*_grid(), lcm_kernels=(jnp.ones((3, 3, 2, 5)),) * 2),
     r'lcm_kernels\[0\] must have shape'),
    (lambda: L.l2vit_attention(*_grid(), lcm_biases=(jnp.ones((2, 4)),) * 2),
     'lcm_biases needs lcm_kernels'),
    (lambda: L.l2vit_attention(*_grid(), eps=0.0), 'eps must be a positive float'),
    (lambda: L.care_attention(*_grid(), jnp.ones((1, 2, 3, 3)), conv_kernel=jnp.ones((3, 3, 3)),
                              local_to_global=jnp.ones((3, 2, 4)),
                              global_to_local=jnp.ones((2, 4, 3))), 'x_local must have shape'),
    (lambda: L.care_attention(*_grid(), jnp.ones((1, 2, 2, 3)), conv_kernel=jnp.ones((3, 3, 3)),
                              local_to_global=jnp.ones((3, 2, 5)),
                              global_to_local=jnp.ones((2, 4, 3))), 'local_to_global must'),
    (lambda: L.care_attention(*_grid(), jnp.ones((1, 2, 2, 3)), conv_kernel=jnp.ones((3, 3, 3)),
                              local_to_global=jnp.ones((3, 2, 4)),
                              global_to_local=jnp.ones((2, 4, 2))), 'global_to_local must'),
    (lambda: L.care_attention(*_grid(), jnp.ones((1, 2, 2, 3)), conv_kernel=jnp.ones((3, 3, 4)),
                              local_to_global=jnp.ones((3, 2, 4)),
                              global_to_local=jnp.ones((2, 4, 3))), 'conv_kernel must have'),
    (lambda: L.hiif_attention(*(x[:, 0] for x in _grid()[:2]), rnd(2, (1, 3, 2, 4))),
     'v must have shape'),
    (lambda: L.hiif_attention(*_grid()), 'q must have rank 4'),
    (lambda: L.hiif_attention(*(x[:, 0].astype(jnp.int32) for x in _grid())),
     'q must be a floating array'),
    (lambda: L.feat_attention(*_grid(), spatial_decay=jnp.ones((2, 4)),
                              spatial_bonus=jnp.ones((2, 4)), temporal_decay=jnp.ones((2, 4)),
                              temporal_bonus=jnp.ones((2, 4))), 'temporal_decay and'),
    (lambda: L.feat_attention(*(x[:, None] for x in _grid()), spatial_decay=jnp.ones((2, 4)),
                              spatial_bonus=jnp.ones((2, 4))), 'needs temporal_decay'),
    (lambda: L.feat_attention(*_grid(), spatial_decay=jnp.ones((2, 3)),
                              spatial_bonus=jnp.ones((2, 4))), 'decay must have shape'),
    (lambda: L.feat_attention(*_grid(K=1)[:2], _grid()[2], spatial_decay=jnp.ones((2, 4)),
                              spatial_bonus=jnp.ones((2, 4))), 'r, k and v must have one'),
    (lambda: L.feat_attention(*_grid(), spatial_decay=jnp.ones((2, 4)),
                              spatial_bonus=jnp.ones((2, 4)), channel_temperature=-1.0),
     'channel_temperature must be positive'),
    (lambda: L.feat_attention(*(x[0] for x in _grid()), spatial_decay=jnp.ones((2, 4)),
                              spatial_bonus=jnp.ones((2, 4))), 'r must have rank 6'),
])
def test_bad_arguments_are_named(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


# ----------------------------------------------------------------------------- layers

GRID = (2, 4, 4, 16)


@pytest.mark.parametrize('name, options', [
    ('l2vit', {}), ('l2vit', dict(lcm=False)), ('care', dict(global_ratio=0.5, conv_size=5)),
    ('hiif', {}), ('feat', {}), ('feat', dict(temporal=False))])
def test_layer_nnx_and_linen_agree(name, options):
  x = rnd(0, GRID)
  layer = variants.build(name, d_model=16, num_heads=2, rngs=nnx.Rngs(0), **options)
  lin = variants.get_linen(name)(d_model=16, num_heads=2, **options)
  shapes = jax.eval_shape(lin.init, jax.random.key(0), x)['params']
  assert sorted(shapes) == sorted(layer.params_dict())
  params = {n: rnd(i + 1, np.shape(a), scale=0.3) for i, (n, a)
            in enumerate(sorted(layer.params_dict().items()))}
  nnx.update(layer, nnx.State({n: nnx.Param(a) for n, a in params.items()}))
  y, y_lin = jax.jit(lambda p, x: (layer(x), lin.apply({'params': p}, x)))(params, x)
  assert y.shape == x.shape and np.all(np.isfinite(y))
  np.testing.assert_allclose(y, y_lin, rtol=1e-6, atol=1e-6)


def test_layer_feat_video_and_hiif_sequence_inputs():
  feat = variants.build('feat', d_model=16, num_heads=2, rngs=nnx.Rngs(0))
  xv = rnd(0, (2, 3, 2, 4, 16))
  assert jit_call(feat, xv).shape == xv.shape
  hiif = variants.build('hiif', d_model=16, num_heads=4, num_kv_heads=2, rngs=nnx.Rngs(0))
  xs = rnd(1, (2, 7, 16))
  y = jit_call(hiif, xs)
  # the grid input is the row-major token sequence
  np.testing.assert_allclose(jit_call(hiif, xs[:, :6].reshape(2, 2, 3, 16)).reshape(2, 6, 16),
                             jit_call(hiif, xs[:, :6]), rtol=1e-6, atol=1e-6)
  assert y.shape == xs.shape


def test_layer_bf16_is_close_to_f32():
  x = rnd(0, GRID)
  for name in ('care', 'feat'):
    layer = variants.build(name, d_model=16, num_heads=2, rngs=nnx.Rngs(0))
    y32 = jit_call(layer, x)
    y16 = jit_call(variants.build(name, d_model=16, num_heads=2, rngs=nnx.Rngs(0),
                                  dtype=jnp.bfloat16), x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    assert_close(y16, y32, 5e-2, name)


@pytest.mark.parametrize('name, kwargs, match', [
    ('l2vit', dict(lcm_size=2), 'lcm_size must be a positive odd int'),
    ('care', dict(global_ratio=0.0), 'global_ratio must split d_model=16'),
    ('care', dict(feature_map='softmax'), 'feature_map must be one of'),
    ('care', dict(conv_size=4), 'conv_size must be a positive odd int'),
    ('feat', dict(num_kv_heads=1), 'num_kv_heads must equal num_heads'),
    ('feat', dict(channel_temperature=0.0), 'channel_temperature must be a positive'),
    ('hiif', dict(causal=True), 'non-causal'),
    ('hiif', dict(rope='1d'), 'rope must be None'),
    ('hiif', dict(window=3), "unknown option 'window'"),
    ('hiif', dict(implementation='pallas_gpu'), 'implementation must be None'),
])
def test_layer_bad_options_are_named(name, kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    variants.build(name, d_model=16, num_heads=2, rngs=nnx.Rngs(0), **kwargs)


def test_layer_bad_inputs_are_named():
  l2vit = variants.build('l2vit', d_model=16, num_heads=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'x must be a token map \[B, Hh, Ww, D=16\]'):
    l2vit(rnd(0, (2, 5, 16)))
  feat = variants.build('feat', d_model=16, num_heads=2, rngs=nnx.Rngs(0), temporal=False)
  with pytest.raises(ValueError, match='needs temporal=True'):
    feat(rnd(0, (1, 2, 2, 2, 16)))
  with pytest.raises(ValueError, match='take no segment_ids'):
    l2vit(rnd(0, GRID), positions=jnp.zeros((2, 16), jnp.int32))
