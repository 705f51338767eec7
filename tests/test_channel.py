"""CNN channel / spatial attention modules (`attnjax.layers.channel`, `attnjax.ops.channel`),
their Linen twins, the small CNN (`attnjax.models.cnn`) and `configs/digits_cnn.py`.

Every module is checked, forward and `jax.vjp` (random cotangent, w.r.t. the input and
every parameter), against a plain reference written here from the paper's formula with
explicit jnp ops (convolutions as sums of shifted slices, pooling / softmax / norms
spelled out), in float32 and bfloat16, on an odd 13x17 map with random parameters.
"""

import dataclasses
import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import assert_close, rnd

from attnjax import models
from attnjax.layers import channel, channel_linen
from attnjax.models import cnn
from attnjax.ops import channel as ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C = 16
OPTIONS = {"se": dict(reduction=4), "cbam": dict(reduction=4), "ela": dict(norm_groups=4),
           "coord": dict(reduction=4, min_channels=2), "ulsam": dict(subspaces=4),
           "a2n": dict(reduction=4), "lkca": dict(kernel_size=9)}
NAMES = sorted(channel.MODULES)


# ----------------------------------------------------------------------------- references

def r_sigmoid(z):
  return 1.0 / (1.0 + jnp.exp(-z))


def r_softmax(z, axis):
  e = jnp.exp(z - jnp.max(z, axis=axis, keepdims=True))
  return e / jnp.sum(e, axis=axis, keepdims=True)


def r_conv2d(x, w, b=None, dilation=1, groups=1):
  """'Same' conv spelled out: the k*k shifted slices of the zero-padded input (im2col),
  contracted with the kernel taps: `y[p] = sum_{i,j} x[p + d*(i-kh//2, j-kw//2)] w[i, j]`."""
  B, H, W, Ci = x.shape
  kh, kw, cig, co = w.shape
  ph, pw = dilation * (kh // 2), dilation * (kw // 2)
  xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  ti, tj = np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij")     # taps t = (i, j)
  rows = np.arange(H)[:, None, None] + dilation * ti.reshape(1, 1, -1)    # [H, 1, kh*kw]
  cols = np.arange(W)[None, :, None] + dilation * tj.reshape(1, 1, -1)    # [1, W, kh*kw]
  taps = xp[:, rows, cols, :]                                             # [B, H, W, kh*kw, Ci]
  taps = taps.reshape(B, H, W, kh * kw, groups, cig)
  wg = w.reshape(kh * kw, cig, groups, co // groups)
  out = jnp.einsum("bhwtgi,tigo->bhwgo", taps, wg).reshape(B, H, W, co)
  return out if b is None else out + b


def r_conv1d(z, w, groups=1):
  """'Same' 1D conv along axis 1 of z [B, L, Ci], w [k, Ci/groups, Co]."""
  return r_conv2d(z[:, :, None, :], w[:, None], groups=groups)[:, :, 0, :]


def r_group_norm(x, groups, scale, bias, eps=1e-5):
  shp = x.shape
  xg = x.reshape(shp[0], -1, groups, shp[-1] // groups)        # [B, positions, G, C/G]
  mean = xg.mean(axis=(1, 3), keepdims=True)
  var = ((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True)
  return ((xg - mean) / jnp.sqrt(var + eps)).reshape(shp) * scale + bias


def r_max_pool3(x):
  H, W = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  out = xp[:, 0:H, 0:W]
  for i in range(3):
    for j in range(3):
      out = jnp.maximum(out, xp[:, i:i + H, j:j + W])
  return out


def r_dw(x, w, b=None, dilation=1):
  return r_conv2d(x, w, b, dilation, groups=x.shape[-1])


def ref_se(cfg, p, x):
  s = x.mean(axis=(1, 2))
  g = r_sigmoid(jnp.maximum(s @ p["w1"] + p["b1"], 0) @ p["w2"] + p["b2"])
  return x * g[:, None, None, :]


def ref_eca(cfg, p, x):
  s = x.mean(axis=(1, 2))                                        # [B, C]
  k = p["kernel"].shape[0]
  sp = jnp.pad(s, ((0, 0), (k // 2, k // 2)))
  z = sum(p["kernel"][j] * sp[:, j:j + s.shape[1]] for j in range(k))
  return x * r_sigmoid(z)[:, None, None, :]


def ref_coord(cfg, p, x):
  H = x.shape[1]
  zh, zw = x.mean(axis=2), x.mean(axis=1)
  f = jnp.concatenate([zh, zw], axis=1) @ p["w1"] + p["b1"]
  f = r_group_norm(f, 1, p["norm_scale"], p["norm_bias"])
  f = f * jnp.clip(f + 3, 0, 6) / 6                              # h-swish
  gh = r_sigmoid(f[:, :H] @ p["wh"] + p["bh"])
  gw = r_sigmoid(f[:, H:] @ p["ww"] + p["bw"])
  return x * gh[:, :, None, :] * gw[:, None, :, :]


def ref_ela(cfg, p, x):
  _, g, n = cfg.resolved
  gate = lambda z: r_sigmoid(r_group_norm(r_conv1d(z, p["kernel"], g), n, p["norm_scale"],
                                          p["norm_bias"]))
  return x * gate(x.mean(axis=2))[:, :, None, :] * gate(x.mean(axis=1))[:, None, :, :]


def ref_cbam(cfg, p, x):
  mlp = lambda s: jnp.maximum(s @ p["w1"] + p["b1"], 0) @ p["w2"] + p["b2"]
  x1 = x * r_sigmoid(mlp(x.mean(axis=(1, 2))) + mlp(x.max(axis=(1, 2))))[:, None, None, :]
  s = jnp.stack([x1.mean(axis=-1), x1.max(axis=-1)], axis=-1)
  return x1 * r_sigmoid(r_conv2d(s, p["conv"]))


def ref_triplet(cfg, p, x):
  def gate(m, b):   # m [B, P, Q, 2] -> [B, P, Q]
    z = r_conv2d(m, p[f"conv_{b}"])
    return r_sigmoid(r_group_norm(z, 1, p[f"norm_scale_{b}"], p[f"norm_bias_{b}"]))[..., 0]
  # (C, W) interaction: pool over H; (H, C): pool over W; (H, W): pool over C.
  g_h = gate(jnp.stack([x.max(axis=1), x.mean(axis=1)], -1), "h")[:, None, :, :]
  g_w = gate(jnp.stack([x.max(axis=2), x.mean(axis=2)], -1), "w")[:, :, None, :]
  g_c = gate(jnp.stack([x.max(axis=3), x.mean(axis=3)], -1), "c")[:, :, :, None]
  return (x * g_h + x * g_w + x * g_c) / 3


def _ref_psa_ch(p, x):
  B, H, W, _ = x.shape
  q = (x @ p["ch_wq"]).reshape(B, H * W)
  v = (x @ p["ch_wv"]).reshape(B, H * W, -1)
  z = jnp.sum(v * r_softmax(q, 1)[:, :, None], axis=1) @ p["ch_wz"]
  mean, var = z.mean(-1, keepdims=True), z.var(-1, keepdims=True)
  return r_sigmoid((z - mean) / jnp.sqrt(var + 1e-5) * p["ch_norm_scale"] + p["ch_norm_bias"])


def _ref_psa_sp(p, x):
  q = r_softmax(x.mean(axis=(1, 2)) @ p["sp_wq"], 1)             # [B, C/2]
  return r_sigmoid(jnp.sum((x @ p["sp_wv"]) * q[:, None, None, :], axis=-1))


def ref_psa(cfg, p, x):
  z = x * _ref_psa_ch(p, x)[:, None, None, :]
  if cfg.mode == "sequential":
    return z * _ref_psa_sp(p, z)[..., None]
  return z + x * _ref_psa_sp(p, x)[..., None]


def ref_lka(cfg, p, x):
  a = r_dw(x, p["conv0"], p["conv0_bias"])
  a = r_dw(a, p["conv_spatial"], p["conv_spatial_bias"], dilation=3)
  return x * (a @ p["conv1"] + p["conv1_bias"])


def ref_lkca(cfg, p, x):
  return r_dw(x, p["kernel"], p["bias"])


def ref_ulsam(cfg, p, x):
  B, H, W, Cc = x.shape
  g = cfg.subspaces
  cg = Cc // g
  outs = []
  for n in range(g):
    sl = slice(n * cg, (n + 1) * cg)
    f = x[..., sl]
    m = r_max_pool3(f * p["dw_scale"][sl] + p["dw_bias"][sl])
    a = r_softmax((m @ p["pw"][n]).reshape(B, H * W), 1).reshape(B, H, W, 1)
    outs.append(f * a + f)
  return jnp.concatenate(outs, axis=-1)


def ref_a2n(cfg, p, x):
  lrelu = lambda z: jnp.where(z >= 0, z, 0.2 * z)
  h = lrelu(x @ p["first"])
  pi = r_softmax(jnp.maximum(h.mean(axis=(1, 2)) @ p["adm_w1"], 0) @ p["adm_w2"], 1)
  gate = r_sigmoid(lrelu(r_conv2d(h, p["att_k1"])) @ p["att_k2"] + p["att_k2_bias"])
  att = r_conv2d(r_conv2d(h, p["att_k3"]) * gate, p["att_k4"])
  non = r_conv2d(h, p["non_att"])
  return lrelu(pi[:, 0, None, None, None] * att + pi[:, 1, None, None, None] * non) @ p["last"] + x


def ref_sdlska(cfg, p, x):
  # separable depthwise stage, then one separable dilated branch per receptive field
  a = r_dw(r_dw(x, p["conv0_h"]), p["conv0_v"], p["conv0_bias"])
  bs = [r_dw(r_dw(a, p[f"branch{i}_h"], dilation=d), p[f"branch{i}_v"], p[f"branch{i}_bias"],
             dilation=d) for i, d in enumerate(cfg.dilations)]
  s = sum(bs).mean(axis=(1, 2))                                   # [B, C]
  z = jnp.maximum(s @ p["select_w1"] + p["select_b1"], 0) @ p["select_w2"]
  n = len(bs)
  w = r_softmax(z.reshape(z.shape[0], n, -1), 1)                  # [B, n, C]
  mixed = sum(w[:, i, None, None, :] * bs[i] for i in range(n))
  return x * (mixed @ p["conv1"] + p["conv1_bias"])


def ref_gcg(cfg, p, x):
  B, H, W, Cc = x.shape
  flat = x.reshape(B, H * W, Cc)
  a = r_softmax((flat @ p["context_w"])[..., 0], 1)               # [B, HW]
  c = jnp.sum(a[:, :, None] * flat, axis=1)                       # [B, C]
  t = c @ p["corr_w1"] + p["corr_b1"]
  mean, var = t.mean(-1, keepdims=True), t.var(-1, keepdims=True)
  t = (t - mean) / jnp.sqrt(var + 1e-5) * p["corr_norm_scale"] + p["corr_norm_bias"]
  t = jnp.maximum(t, 0) @ p["corr_w2"] + p["corr_b2"]
  return x * r_sigmoid(r_dw(x, p["local"], p["local_bias"]) + t[:, None, None, :])


REFS = {"se": ref_se, "eca": ref_eca, "coord": ref_coord, "ela": ref_ela, "cbam": ref_cbam,
        "triplet": ref_triplet, "psa_parallel": ref_psa, "psa_sequential": ref_psa,
        "lka": ref_lka, "lkca": ref_lkca, "ulsam": ref_ulsam, "a2n": ref_a2n,
        "sdlska": ref_sdlska, "gcg": ref_gcg}


def random_params(module, seed):
  """Random (never zero-initialised) parameters of the module's shapes."""
  out = {}
  for i, (name, v) in enumerate(sorted(module.params.items())):
    if v.ndim >= 2:
      out[name] = rnd(seed + i, v.shape, scale=1.0 / np.sqrt(np.prod(v.shape[:-1])))
    else:
      out[name] = rnd(seed + i, v.shape, scale=0.5) + (1.0 if "scale" in name else 0.0)
  return out


def build(name, seed=0, **extra):
  return channel.build(name, C, rngs=nnx.Rngs(seed), **{**OPTIONS.get(name, {}), **extra})


# ----------------------------------------------------------------------------- vs references

@functools.partial(jax.jit, static_argnums=0)
def _value_and_vjp(fn, p, a, ct):   # jit: one compilation instead of op-by-op dispatch
  y, vjp = jax.vjp(fn, p, a)
  return y, vjp(ct)


@functools.cache
def _reference_and_vjp(name):
  cfg = build(name).config
  return jax.jit(lambda p, a, ct: _value_and_vjp.__wrapped__(
      lambda p, a: REFS[name](cfg, p, a), p, a, ct))

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_module_matches_reference_forward_and_vjp(name, dtype):
  m = build(name)
  assert set(REFS) == set(NAMES)
  cfg = m.config
  params = random_params(m, 100)
  x = rnd(1, (2, 13, 17, C), dtype)
  ct = rnd(2, x.shape, dtype)

  y, (g_p, g_x) = _value_and_vjp(lambda p, a: channel.forward(cfg, p, a), params, x, ct)
  # the reference always runs in float32: compiled once per module, reused for bf16
  y_ref, (r_p, r_x) = _reference_and_vjp(name)(params, x.astype(jnp.float32),
                                                ct.astype(jnp.float32))
  assert y.dtype == dtype and y.shape == x.shape
  assert_close(y, y_ref, dtype, f"{name} forward")
  # the module changes its input (not an identity / zero map)
  assert float(jnp.max(jnp.abs(y_ref - x.astype(jnp.float32)))) > 1e-3
  assert g_x.dtype == dtype
  assert_close(g_x, r_x, dtype, f"{name} d/dx")
  for k in params:
    assert float(jnp.max(jnp.abs(r_p[k]))) > 0 or name == "ulsam", (name, k)
    assert_close(g_p[k], r_p[k], dtype, f"{name} d/d{k}")


def test_nnx_module_call_uses_its_params():
  """`module(x)` is `forward(config, module.params, x)`; deterministic changes nothing."""
  m = build("se")
  x = rnd(3, (2, 5, 7, C))
  want = np.asarray(channel.forward(m.config, m.params, x))
  np.testing.assert_array_equal(np.asarray(m(x)), want)
  np.testing.assert_array_equal(np.asarray(m(x, deterministic=False)), np.asarray(m(x)))


@pytest.mark.parametrize("name", NAMES)
def test_linen_twin_agrees(name):
  m = build(name)
  params = random_params(m, 7)
  x = rnd(4, (2, 5, 7, C))
  twin = channel_linen.get_module(name)(channels=C, **OPTIONS.get(name, {}))
  variables = nn.meta.unbox(jax.eval_shape(twin.init, jax.random.key(0), x))
  assert jax.tree.map(jnp.shape, variables["params"]) == jax.tree.map(jnp.shape, m.params)
  y_linen = jax.jit(twin.apply)({"params": params}, x)
  y_nnx = jax.jit(lambda p, a: channel.forward(m.config, p, a))(params, x)
  np.testing.assert_array_equal(np.asarray(y_linen), np.asarray(y_nnx))


def test_linen_twin_fields_and_errors():
  for nnx_name in channel.__all__[:13]:
    twin = getattr(channel_linen, nnx_name)
    fields = set(twin.__dataclass_fields__) - {"parent", "name", "param_dtype"}
    assert fields == {f.name for f in dataclasses.fields(getattr(channel, nnx_name).CONFIG)}
  with pytest.raises(ValueError, match="reduction=5 must divide the 16"):
    channel_linen.SqueezeExcitation(channels=16, reduction=5)
  with pytest.raises(ValueError, match="close matches: \\[.cbam."):
    channel_linen.get_module("cbma")
  with pytest.raises(TypeError, match="fixes mode"):
    channel_linen.get_module("psa_parallel")(channels=16, mode="sequential")


# ----------------------------------------------------------------------------- ops

def test_eca_kernel_size():
  # k = |log2(C)/2 + 1/2|_odd (truncated to an int, plus 1 when even)
  sizes = [ops.eca_kernel_size(c) for c in (16, 32, 64, 128, 256, 512, 1024)]
  assert sizes == [3, 3, 3, 5, 5, 5, 5]
  assert ops.eca_kernel_size(64, gamma=1, b=1) == 7
  assert channel.build("eca", 128, rngs=nnx.Rngs(0)).params["kernel"].shape == (5,)
  assert channel.build("eca", 16, rngs=nnx.Rngs(0), kernel_size=7).params["kernel"].shape == (7,)
  with pytest.raises(ValueError, match="channels must be a positive int"):
    ops.eca_kernel_size(0)
  with pytest.raises(ValueError, match="gamma must be > 0"):
    ops.eca_kernel_size(16, gamma=0)


def test_pooling_cores_match_numpy():
  x = rnd(5, (2, 13, 17, 6))
  xn = np.asarray(x)
  zh, zw = ops.coordinate_pool(x)
  np.testing.assert_allclose(zh, xn.mean(2), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(zw, xn.mean(1), rtol=1e-6, atol=1e-6)
  for axis, shape in ((1, (2, 17, 6, 2)), (2, (2, 13, 6, 2)), (3, (2, 13, 17, 2))):
    z = np.asarray(ops.z_pool(x, axis))
    assert z.shape == shape
    np.testing.assert_allclose(z[..., 0], xn.max(axis), rtol=1e-6)
    np.testing.assert_allclose(z[..., 1], xn.mean(axis), rtol=1e-6, atol=1e-6)
  q = np.asarray(rnd(6, (2, 13, 17)))
  w = np.exp(q.reshape(2, -1)) / np.exp(q.reshape(2, -1)).sum(1, keepdims=True)
  want = np.einsum("bn,bnc->bc", w, xn.reshape(2, -1, 6))
  np.testing.assert_allclose(ops.psa_channel_pool(x, jnp.asarray(q)), want, rtol=1e-5, atol=1e-6)
  qc = np.asarray(rnd(7, (2, 6)))
  wc = np.exp(qc) / np.exp(qc).sum(1, keepdims=True)
  np.testing.assert_allclose(ops.psa_spatial_pool(x, jnp.asarray(qc)),
                             np.einsum("bc,bhwc->bhw", wc, xn), rtol=1e-5, atol=1e-6)


def test_lkca_conv_view_equals_attention_view():
  x = rnd(8, (2, 13, 17, 4))
  k = rnd(9, (9, 9, 1, 4), scale=0.2)
  conv = ops.depthwise_conv2d(x, k)
  assert_close(ops.conv_as_attention(x, k), conv, jnp.float32, "attention view")
  assert_close(conv, r_dw(x, k), jnp.float32, "conv view")
  # the attention matrix is local: an impulse spreads to at most the k x k window
  imp = jnp.zeros((1, 13, 17, 4)).at[0, 6, 8, :].set(1.0)
  nz = np.argwhere(np.abs(np.asarray(ops.conv_as_attention(imp, k)))[0, ..., 0] > 0)
  assert nz[:, 0].min() >= 2 and nz[:, 0].max() <= 10 and nz[:, 1].min() >= 4


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("name, options, match", [
    ("se", dict(reduction=3), "reduction=3 must divide the 16 channels"),
    ("cbam", dict(reduction=32), "reduction=32 must divide"),
    ("cbam", dict(spatial_kernel=6), "spatial_kernel must be a positive odd int"),
    ("eca", dict(kernel_size=4), "kernel_size must be a positive odd int"),
    ("ela", dict(variant="X"), "variant must be one of"),
    ("ela", dict(norm_groups=3), "norm_groups=3 must divide"),
    ("ela", dict(kernel_size=6), "kernel_size must be a positive odd int"),
    ("triplet", dict(kernel_size=0), "kernel_size must be a positive odd int"),
    ("lka", dict(dilated_kernel_size=8), "dilated_kernel_size must be a positive odd int"),
    ("lka", dict(dilation=0), "dilation must be a positive int"),
    ("lkca", dict(kernel_size=10), "kernel_size must be a positive odd int"),
    ("sdlska", dict(dilations=(2,)), "dilations must be a tuple of at least 2 positive ints"),
    ("sdlska", dict(dilations=(2, 0)), "dilations must be a tuple of at least 2 positive ints"),
    ("sdlska", dict(reduction=3), "reduction=3 must divide the 16"),
    ("gcg", dict(kernel_size=4), "kernel_size must be a positive odd int"),
    ("gcg", dict(reduction=5), "reduction=5 must divide the 16"),
    ("ulsam", dict(subspaces=5), "subspaces=5 must divide"),
    ("a2n", dict(temperature=0.0), "temperature must be > 0"),
    ("coord", dict(reduction=0), "reduction must be a positive int"),
])
def test_bad_options(name, options, match):
  with pytest.raises(ValueError, match=match):
    channel.build(name, C, rngs=nnx.Rngs(0), **options)


def test_bad_inputs_and_names():
  m = build("se")
  with pytest.raises(ValueError, match="rank-4"):
    m(rnd(0, (2, 13, C)))
  with pytest.raises(ValueError, match="C=16 channels"):
    m(rnd(0, (2, 5, 5, 8)))
  with pytest.raises(TypeError, match="floating"):
    m(jnp.ones((1, 3, 3, C), jnp.int32))
  with pytest.raises(ValueError, match="channels must be even"):
    channel.build("psa_parallel", 15, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="mode must be"):
    channel.PolarizedSelfAttention(16, mode="both", rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="fixes mode"):
    channel.build("psa_sequential", 16, rngs=nnx.Rngs(0), mode="parallel")
  with pytest.raises(ValueError, match="channels must be a positive int"):
    channel.build("se", 0, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="unknown option\\(s\\) \\['reductoin'\\]"):
    channel.build("se", 16, rngs=nnx.Rngs(0), reductoin=4)
  with pytest.raises(ValueError, match="close matches: \\['psa_parallel'"):
    channel.get_module("psa_paralel")
  with pytest.raises(ValueError, match="axis must be 1"):
    ops.z_pool(rnd(0, (1, 3, 3, 2)), 0)
  with pytest.raises(ValueError, match="q must be"):
    ops.psa_spatial_pool(rnd(0, (1, 3, 3, 2)), rnd(0, (1, 3)))


# ----------------------------------------------------------------------------- CNN model

def _cnn_config(name, **options):
  cfg = models.default_config("cnn")
  cfg.module = cnn.module_config(name)
  for k, v in options.items():
    cfg.module[k] = v
  return cfg


@pytest.mark.parametrize("name", NAMES)
def test_cnn_shapes_every_module(name):
  cfg = _cnn_config(name)
  model = nnx.eval_shape(lambda: models.build_model(cfg, rngs=nnx.Rngs(0)))
  out = jax.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((3, 8, 8, 1), jnp.float32))
  assert out.shape == (3, 10) and out.dtype == jnp.float32
  # a plain dict config: bf16 compute, a non-square map with an odd stage, three stages
  d = dict(cfg.to_dict(), dtype="bfloat16", image_size=(12, 10), widths=(8, 16, 8),
           depths=(1, 2, 1))
  model_bf16 = nnx.eval_shape(lambda: models.build_model(d, rngs=nnx.Rngs(0)))
  out = jax.eval_shape(lambda m, x: m(x), model_bf16,
                       jax.ShapeDtypeStruct((3, 12, 10, 1), jnp.float32))
  assert out.shape == (3, 10) and out.dtype == jnp.float32
  for path, var in nnx.state(model, nnx.Param).flat_state():
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == len(var.shape), path


def test_cnn_bad_config_and_inputs():
  make = lambda cfg: nnx.eval_shape(lambda: models.build_model(cfg, rngs=nnx.Rngs(0)))
  cfg = _cnn_config("se")
  cfg.module = {"name": "sse"}
  with pytest.raises(ValueError, match="close matches: \\['se'"):
    make(cfg)
  cfg = _cnn_config("se")
  cfg.widths = (8,)
  with pytest.raises(ValueError, match="equal length"):
    make(cfg)
  cfg = _cnn_config("se", reduction=3)
  with pytest.raises(ValueError, match="reduction=3 must divide the 8"):
    make(cfg)
  model = make(_cnn_config("se"))
  with pytest.raises(ValueError, match="images must be \\[B, 8, 8, 1\\]"):
    model(jnp.ones((2, 8, 8, 3)))


def _digits_batch(n=64):
  from attnjax.data import tasks
  d = tasks.load_digits_split("test")
  return jnp.asarray(d["image"][:n]), jnp.asarray(d["label"][:n])


# The modules' own forward and vjp are checked against their references above for every
# module; this end-to-end training check runs the cheaper modules by default and the ones
# with the largest graphs to compile under -m slow.
_TRAIN_SLOW = ("a2n", "sdlska", "psa_parallel", "cbam", "lka", "gcg")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _TRAIN_SLOW
                                  else n for n in NAMES])
def test_cnn_trains_in_process_every_module(name):
  """A few Adam steps of the CNN with each module on one digits batch: finite non-zero
  gradients for every parameter, and the loss goes down."""
  images, labels = _digits_batch(32)
  cfg = _cnn_config(name)
  cfg.widths, cfg.depths = (8,), (1,)   # one stage: a smaller graph to compile
  model = models.build_model(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(1e-2)

  def loss_fn(p):
    logits = nnx.merge(graphdef, p, rest)(images, deterministic=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss, g

  state = tx.init(params)
  losses = []
  for i in range(6):
    params, state, loss, grads = step(params, state)
    losses.append(float(loss))
    if i == 0:
      leaves = jax.tree.leaves(grads)
      assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves), name
      assert float(optax.global_norm(grads)) > 0
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], (name, losses)


# ----------------------------------------------------------------------------- train.py

def _load_config(arg):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg_digits_cnn",
                                                os.path.join(ROOT, "configs", "digits_cnn.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def test_digits_cnn_config():
  from attnjax.train import trainer
  c = _load_config("module=lka")
  trainer.check_config(c, num_devices=1)
  assert c.model.module.name == "lka" and c.model.widths == (32, 64) and c.num_steps == 600
  small = _load_config("module=se,runlocal=True")
  assert small.num_steps == 20 and small.model.widths == (8, 16)
  assert small.model.module.reduction == 4
  with pytest.raises(ValueError, match="close matches"):
    _load_config("module=cbma")


def _train_py(name, tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "train.py"),
       f"--config={os.path.join(ROOT, 'configs', 'digits_cnn.py')}:module={name},runlocal=True",
       f"--workdir={tmp_path / name}", "--config.progress_bar=False",
       "--config.tensorboard=False"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout + proc.stderr
  assert "final eval @ 20" in out and "accuracy=" in out, out[-2000:]
  assert "nan" not in out.split("final eval")[1].lower()


def test_train_py_one_module_end_to_end(tmp_path):
  _train_py("eca", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_train_py_every_module_end_to_end(name, tmp_path):
  _train_py(name, tmp_path)

