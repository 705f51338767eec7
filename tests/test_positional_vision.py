"""Vision positional mechanisms (catalog family I): PEG, LePE, ConViT GPSA, BoTNet 2D
relative logits, and Cordonnier et al.'s attention-as-convolution construction.

Every op is checked forward and backward (jax.vjp, random cotangents) against a plain
reference written from the paper's definition with explicit loops / index arrays (not
the op's own helpers), in float32 and bfloat16, on odd maps (13x17).
"""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOLERANCES
from flax import nnx
from helpers import assert_close, rnd

import attnjax
from attnjax import variants
from attnjax.layers import positional as PL
from attnjax.layers import positional_linen as PLL
from attnjax.ops import positional as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [jnp.float32, jnp.bfloat16]


# ----------------------------------------------------------------------------- references

def ref_dwconv(x, kernel, bias):
  """Depthwise conv by explicit shifted sums over the kernel taps (jnp, float32)."""
  x = jnp.asarray(x, jnp.float32)
  kh, kw = kernel.shape[:2]
  B, Hh, Ww, C = x.shape
  xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  y = jnp.zeros((B, Hh, Ww, C), jnp.float32)
  for u in range(kh):
    for v in range(kw):
      y = y + xp[:, u:u + Hh, v:v + Ww, :] * jnp.asarray(kernel, jnp.float32)[u, v]
  if bias is not None:
    y = y + jnp.asarray(bias, jnp.float32)
  return y


def ref_dwconv_numpy_pixel(x, kernel, b, i, j, c):
  """One output pixel by a direct double loop with bounds checks (numpy float64)."""
  x = np.asarray(x, np.float64)
  kh, kw = kernel.shape[:2]
  total = 0.0
  for u in range(kh):
    for v in range(kw):
      ii, jj = i + u - kh // 2, j + v - kw // 2
      if 0 <= ii < x.shape[1] and 0 <= jj < x.shape[2]:
        total += x[b, ii, jj, c] * float(kernel[u, v, c])
  return total


def coords_loop(Hh, Ww):
  return [(y, x) for y in range(Hh) for x in range(Ww)]


def ref_convit_pos_logits(Hh, Ww, v_pos):
  """`p[n, i, j] = v_pos[n] . (dx, dy, dx^2 + dy^2)` from explicit coordinate loops."""
  cs = coords_loop(Hh, Ww)
  r = np.zeros((len(cs), len(cs), 3), np.float32)
  for i, (yi, xi) in enumerate(cs):
    for j, (yj, xj) in enumerate(cs):
      dx, dy = xj - xi, yj - yi
      r[i, j] = (dx, dy, dx * dx + dy * dy)
  return jnp.einsum("tsc,nc->nts", jnp.asarray(r), jnp.asarray(v_pos, jnp.float32),
                    precision="highest")


def ref_softmax_attention(q, k, v, logits_extra=None, scale=None):
  """Dense float32 attention with kv heads repeated (GQA); extra logits [B?, N, T, S]."""
  q, k, v = (jnp.asarray(a, jnp.float32) for a in (q, k, v))
  G = q.shape[2] // k.shape[2]
  k = jnp.repeat(k, G, axis=2)
  v = jnp.repeat(v, G, axis=2)
  s = (1.0 / np.sqrt(q.shape[-1])) if scale is None else scale
  logits = s * jnp.einsum("btnh,bsnh->bnts", q, k, precision="highest")
  if logits_extra is not None:
    logits = logits + logits_extra
  p = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bnts,bsnh->btnh", p, v, precision="highest")


def ref_gpsa(q, k, v, v_pos, gate, shape, scale=None):
  Hh, Ww = shape
  content = ref_softmax_attention(q, k, v, scale=scale)
  G = q.shape[2] // k.shape[2]
  vv = jnp.repeat(jnp.asarray(v, jnp.float32), G, axis=2)
  pos = jax.nn.softmax(ref_convit_pos_logits(Hh, Ww, v_pos), axis=-1)
  positional = jnp.einsum("nts,bsnh->btnh", pos, vv, precision="highest")
  g = jax.nn.sigmoid(jnp.asarray(gate, jnp.float32))[:, None]
  return (1 - g) * content + g * positional


def ref_botnet_bias(q, rel_h, rel_w, shape, scale=None):
  """`s q_i . (rel_h[clip(dy)+R] + rel_w[clip(dx)+R])` by index arrays from loops."""
  Hh, Ww = shape
  cs = coords_loop(Hh, Ww)
  T = len(cs)
  N = q.shape[2]
  rel_h = jnp.broadcast_to(jnp.asarray(rel_h, jnp.float32).reshape((-1,) + rel_h.shape[-2:]),
                           (N,) + rel_h.shape[-2:])
  rel_w = jnp.broadcast_to(jnp.asarray(rel_w, jnp.float32).reshape((-1,) + rel_w.shape[-2:]),
                           (N,) + rel_w.shape[-2:])
  Rh, Rw = (rel_h.shape[1] - 1) // 2, (rel_w.shape[1] - 1) // 2
  ih = np.zeros((T, T), np.int32)
  iw = np.zeros((T, T), np.int32)
  for i, (yi, xi) in enumerate(cs):
    for j, (yj, xj) in enumerate(cs):
      ih[i, j] = min(max(yj - yi, -Rh), Rh) + Rh
      iw[i, j] = min(max(xj - xi, -Rw), Rw) + Rw
  r = rel_h[:, ih] + rel_w[:, iw]  # [N, T, T, H]
  s = (1.0 / np.sqrt(q.shape[-1])) if scale is None else scale
  return s * jnp.einsum("btnh,ntsh->bnts", jnp.asarray(q, jnp.float32), r, precision="highest")


def check_fwd_vjp(op, ref, args, dtype, seed, what):
  """op(*args) vs ref(*args) forward and through jax.vjp with a random cotangent (both
  jitted: one compile each instead of one per eager op)."""
  y, vjp = jax.vjp(jax.jit(op), *args)
  y_ref, vjp_ref = jax.vjp(jax.jit(ref), *[jnp.asarray(a, jnp.float32) for a in args])
  assert y.dtype == args[0].dtype, (what, y.dtype)
  assert_close(y, y_ref, dtype, f"{what} fwd")
  ct = rnd(seed, y.shape, jnp.float32)
  grads = vjp(ct.astype(y.dtype))
  grads_ref = vjp_ref(ct)
  for n, (g, gr) in enumerate(zip(grads, grads_ref)):
    assert_close(g, gr, dtype, f"{what} grad {n}")


def _cast(dtype, *arrays):
  return [jnp.asarray(a, dtype) for a in arrays]


# ------------------------------------------------------------------- depthwise / PEG / LePE

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ks", [(3, 3), (5, 3)])
def test_depthwise_conv2d_and_peg_match_reference(dtype, ks):
  x, kernel, bias = _cast(dtype, rnd(0, (2, 13, 17, 3)), rnd(1, ks + (3,)), rnd(2, (3,)))
  check_fwd_vjp(P.depthwise_conv2d, ref_dwconv, (x, kernel, bias), dtype, 3, "dwconv")
  check_fwd_vjp(P.conditional_position_encoding,
                lambda a, w, b: a + ref_dwconv(a, w, b), (x, kernel, bias), dtype, 4, "peg")
  y = P.depthwise_conv2d(x, kernel, None)
  for (b, i, j, c) in [(0, 0, 0, 0), (1, 12, 16, 2), (0, 6, 0, 1), (1, 0, 9, 2), (0, 7, 8, 0)]:
    want = ref_dwconv_numpy_pixel(jnp.asarray(x, jnp.float32), np.asarray(kernel, np.float32),
                                  b, i, j, c)
    t = TOLERANCES[np.dtype(dtype)]
    np.testing.assert_allclose(float(y[b, i, j, c]), want, atol=t["atol"] * 10, rtol=t["rtol"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_lepe_matches_reference(dtype):
  B, Hh, Ww, N, Hv = 2, 13, 17, 2, 3
  v, kernel, bias = _cast(dtype, rnd(5, (B, Hh, Ww, N, Hv)), rnd(6, (3, 3, N, Hv)),
                          rnd(7, (N, Hv)))

  def ref(v_, w_, b_):
    # Per head and channel, an independent 2D convolution.
    out = ref_dwconv(v_.reshape(B, Hh, Ww, N * Hv), w_.reshape(3, 3, N * Hv), b_.reshape(-1))
    return out.reshape(B, Hh, Ww, N, Hv)

  check_fwd_vjp(P.lepe, ref, (v, kernel, bias), dtype, 8, "lepe")
  # channel (n, h) uses only kernel[..., n, h]: perturbing another channel's filter
  # leaves it unchanged.
  y0 = P.lepe(v, kernel, bias)
  y1 = P.lepe(v, kernel.at[:, :, 1, 2].add(1.0), bias)
  np.testing.assert_array_equal(y0[..., 0, :], y1[..., 0, :])
  assert not np.allclose(np.asarray(y0[..., 1, 2], np.float32),
                         np.asarray(y1[..., 1, 2], np.float32))


def test_depthwise_and_lepe_errors():
  x = rnd(0, (1, 5, 5, 4))
  with pytest.raises(ValueError, match=r"x must be \[B, Hh, Ww, C\]"):
    P.depthwise_conv2d(x[0], rnd(1, (3, 3, 4)))
  with pytest.raises(ValueError, match="odd"):
    P.depthwise_conv2d(x, rnd(1, (2, 3, 4)))
  with pytest.raises(ValueError, match=r"kernel must be \[kh, kw, C=4\]"):
    P.depthwise_conv2d(x, rnd(1, (3, 3, 5)))
  with pytest.raises(ValueError, match="kernel must be"):
    P.depthwise_conv2d(x, rnd(1, (3, 3)))
  with pytest.raises(ValueError, match=r"bias must be \[C=4\]"):
    P.depthwise_conv2d(x, rnd(1, (3, 3, 4)), rnd(2, (3,)))
  with pytest.raises(TypeError, match="floating"):
    P.depthwise_conv2d(x, jnp.ones((3, 3, 4), jnp.int32))
  v = rnd(3, (1, 5, 5, 2, 3))
  with pytest.raises(ValueError, match=r"v_map must be \[B, Hh, Ww, N, Hv\]"):
    P.lepe(v[0], rnd(1, (3, 3, 2, 3)))
  with pytest.raises(ValueError, match=r"kernel must be \[k_h, k_w, N=2, Hv=3\]"):
    P.lepe(v, rnd(1, (3, 3, 3, 2)))
  with pytest.raises(ValueError, match="odd"):
    P.lepe(v, rnd(1, (4, 4, 2, 3)))
  with pytest.raises(ValueError, match=r"bias must be \[N=2, Hv=3\]"):
    P.lepe(v, rnd(1, (3, 3, 2, 3)), rnd(2, (6,)))


# ----------------------------------------------------------------------------- ConViT GPSA

def test_convit_features_and_local_init():
  v_pos = rnd(0, (3, 3))
  np.testing.assert_allclose(P.convit_positional_logits((3, 4), v_pos),
                             ref_convit_pos_logits(3, 4, v_pos), rtol=1e-6, atol=1e-6)
  # Local init: head h's positional softmax peaks at key = query + Delta_h.
  v_pos = P.init_convit_v_pos(9, locality_strength=4.0)
  logits = P.convit_positional_logits((5, 5), v_pos)  # [9, 25, 25]
  centre = 2 * 5 + 2
  for h, (dx, dy) in enumerate(P.convit_head_offsets(9)):
    assert int(jnp.argmax(logits[h, centre])) == (2 + int(dy)) * 5 + (2 + int(dx)), h
  assert len({tuple(d) for d in P.convit_head_offsets(9).tolist()}) == 9
  # Heads beyond the k*k grid are centred on the query.
  np.testing.assert_array_equal(P.convit_head_offsets(5)[4:], 0.0)


@pytest.mark.parametrize("dtype, N, K", [
    (jnp.float32, 4, 4), (jnp.bfloat16, 4, 4), (jnp.float32, 4, 2),
    pytest.param(jnp.bfloat16, 4, 2, marks=pytest.mark.slow)])
def test_gated_positional_attention_matches_reference(dtype, N, K):
  Hh, Ww, B, H = 13, 17, 1, 4
  T = Hh * Ww
  q, k, v = _cast(dtype, rnd(10, (B, T, N, H)), rnd(11, (B, T, K, H)), rnd(12, (B, T, K, H)))
  v_pos = rnd(13, (N, 3), scale=0.3).at[:, 2].set(-jnp.abs(rnd(14, (N,))))
  gate = rnd(15, (N,))

  def op(q_, k_, v_, vp, g):
    return P.gated_positional_attention(q_, k_, v_, P.convit_positional_logits((Hh, Ww), vp), g)

  def ref(q_, k_, v_, vp, g):
    return ref_gpsa(q_, k_, v_, vp, g, (Hh, Ww))

  check_fwd_vjp(op, ref, (q, k, v, v_pos.astype(dtype), gate.astype(dtype)), dtype, 16, "gpsa")


def test_gate_limits_are_pure_content_and_pure_position():
  Hh, Ww, N, H = 3, 5, 2, 4
  T = Hh * Ww
  q, k, v = rnd(0, (2, T, N, H)), rnd(1, (2, T, N, H)), rnd(2, (2, T, N, H))
  pos = rnd(3, (N, T, T))
  content = attnjax.reference_attention(q, k, v)
  gpsa = jax.jit(P.gated_positional_attention)
  y = gpsa(q, k, v, pos, jnp.full((N,), -40.0))
  assert_close(y, content, jnp.float32, "gate -> content")
  y = gpsa(q, k, v, pos, jnp.full((N,), 40.0))
  want = jnp.einsum("nts,bsnh->btnh", jax.nn.softmax(pos, -1), v, precision="highest")
  assert_close(y, want, jnp.float32, "gate -> position")
  assert not np.allclose(want, content, atol=1e-2)


def test_gpsa_errors():
  q = rnd(0, (1, 6, 2, 4))
  pos, gate = rnd(1, (2, 6, 6)), rnd(2, (2,))
  with pytest.raises(ValueError, match=r"q must be \[B, T, N, H\]"):
    P.gated_positional_attention(q[0], q, q, pos, gate)
  with pytest.raises(ValueError, match=r"pos_logits must be \[N=2, T=6, S=6\]"):
    P.gated_positional_attention(q, q, q, pos[:, :5], gate)
  with pytest.raises(ValueError, match=r"gate_logit must be \[N=2\]"):
    P.gated_positional_attention(q, q, q, pos, rnd(2, (3,)))
  with pytest.raises(ValueError, match=r"v_pos must be \[N, 3\]"):
    P.convit_positional_logits((2, 3), rnd(0, (2, 2)))
  with pytest.raises(ValueError, match="shape must be a pair"):
    P.relative_features_2d((2, 3, 4))
  with pytest.raises(ValueError, match="locality_strength"):
    P.init_convit_v_pos(4, locality_strength=0.0)


# ----------------------------------------------------------------------------- BoTNet

@pytest.mark.parametrize("dtype, per_head, R", [
    (jnp.float32, False, None), (jnp.bfloat16, False, None), (jnp.float32, True, (4, 6)),
    pytest.param(jnp.bfloat16, True, (4, 6), marks=pytest.mark.slow)])
def test_botnet_relative_logits_and_attention_match_reference(dtype, per_head, R):
  Hh, Ww, B, N, K, H = 13, 17, 1, 2, 1, 4
  T = Hh * Ww
  Rh, Rw = (Hh - 1, Ww - 1) if R is None else R  # None: the paper's exact 2L-1 tables
  lead = (N,) if per_head else ()
  q, k, v = _cast(dtype, rnd(20, (B, T, N, H)), rnd(21, (B, T, K, H)), rnd(22, (B, T, K, H)))
  rel_h, rel_w = _cast(dtype, rnd(23, lead + (2 * Rh + 1, H)), rnd(24, lead + (2 * Rw + 1, H)))

  check_fwd_vjp(lambda q_, rh, rw: P.relative_logits_2d(q_, rh, rw, (Hh, Ww)).astype(q_.dtype),
                lambda q_, rh, rw: ref_botnet_bias(q_, rh, rw, (Hh, Ww)),
                (q, rel_h, rel_w), dtype, 25, "relative_logits_2d")

  def op(q_, k_, v_, rh, rw):
    return P.botnet_attention(q_, k_, v_, rh, rw, (Hh, Ww))

  def ref(q_, k_, v_, rh, rw):
    return ref_softmax_attention(q_, k_, v_, ref_botnet_bias(q_, rh, rw, (Hh, Ww)))

  check_fwd_vjp(op, ref, (q, k, v, rel_h, rel_w), dtype, 26, "botnet_attention")


@pytest.mark.parametrize("implementation", [
    "xla", "xla_chunked", "reference",
    pytest.param("pallas_tpu", marks=pytest.mark.slow),
    pytest.param("pallas_gpu", marks=pytest.mark.slow)])
def test_botnet_score_mod_equals_bias_across_implementations(implementation):
  """The score_mod (per-batch q.rel tables gathered by b, h, q_idx) on every path that
  takes score mods, Pallas interpreted on CPU; forward and d(rel_h), d(q)."""
  Hh, Ww, N, H = 3, 5, 2, 8
  T = Hh * Ww
  q, k, v = rnd(30, (2, T, N, H)), rnd(31, (2, T, N, H)), rnd(32, (2, T, N, H))
  rel_h, rel_w = rnd(33, (3, H)), rnd(34, (5, H))  # R = (1, 2): clipped offsets
  ct = rnd(35, (2, T, N, H))

  def want_fn(q_, rh):
    return attnjax.reference_attention(q_, k, v, bias=ref_botnet_bias(q_, rh, rel_w, (Hh, Ww)))

  def got_fn(q_, rh):
    return P.botnet_attention(q_, k, v, rh, rel_w, (Hh, Ww), implementation=implementation)

  want, vjp_want = jax.vjp(jax.jit(want_fn), q, rel_h)   # jitted: not op by op
  got, vjp_got = jax.vjp(jax.jit(got_fn), q, rel_h)
  assert_close(got, want, jnp.float32, implementation)
  for g, gw, name in zip(vjp_got(ct), vjp_want(ct), ("dq", "drel_h")):
    assert_close(g, gw, jnp.float32, f"{implementation} {name}")
  bias = P.relative_logits_2d(q, rel_h, rel_w, (Hh, Ww))
  assert_close(ref_botnet_bias(q, rel_h, rel_w, (Hh, Ww)), bias, jnp.float32, "clipped bias")


def test_botnet_errors():
  q = rnd(0, (1, 6, 2, 4))
  with pytest.raises(ValueError, match=r"q must be \[B, T, N, H\]"):
    P.relative_logits_2d(q[0], rnd(1, (3, 4)), rnd(1, (5, 4)), (2, 3))
  with pytest.raises(ValueError, match="has 9 tokens but q has T=6"):
    P.relative_logits_2d(q, rnd(1, (3, 4)), rnd(1, (5, 4)), (3, 3))
  with pytest.raises(ValueError, match="odd number"):
    P.relative_logits_2d(q, rnd(1, (4, 4)), rnd(1, (5, 4)), (2, 3))
  with pytest.raises(ValueError, match=r"rel_w must be \[2R\+1, H=4\]"):
    P.relative_logits_2d(q, rnd(1, (3, 4)), rnd(1, (5, 3)), (2, 3))
  with pytest.raises(ValueError, match=r"rel_h must be \[2R\+1, H=4\] or \[N=2"):
    P.relative_logits_2d(q, rnd(1, (3, 3, 4)), rnd(1, (5, 4)), (2, 3))
  mod = P.relative_logits_2d_score_mod(q, rnd(1, (3, 4)), rnd(1, (5, 4)), (2, 3))
  with pytest.raises(ValueError, match="built for T=S=6"):
    mod.check(7, 7, 2)


# ------------------------------------------------------------------- I12: attention = conv

def _conv_reference_loops(x, w):
  """'same' zero-padded KxK cross-correlation by explicit loops (numpy float64)."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  B, Hh, Ww, _ = x.shape
  Kk = w.shape[0]
  c = Kk // 2
  y = np.zeros((B, Hh, Ww, w.shape[3]))
  for i in range(Hh):
    for j in range(Ww):
      for u in range(Kk):
        for v in range(Kk):
          ii, jj = i + u - c, j + v - c
          if 0 <= ii < Hh and 0 <= jj < Ww:
            y[:, i, j] += x[:, ii, jj] @ w[u, v]
  return y


@pytest.mark.parametrize("Kk", [3, pytest.param(5, marks=pytest.mark.slow)])
def test_multi_head_attention_with_quadratic_encoding_is_a_convolution(Kk):
  """Cordonnier et al.: N = K^2 heads with centres on a KxK grid and large alpha give a
  KxK convolution (Wv = I, Wo_h = W[Delta_h]); zero tokens around the map give the
  convolution's zero padding."""
  c_in, c_out, Hh, Ww = 3, 4, 5, 6
  w = rnd(40, (Kk, Kk, c_in, c_out))
  x = rnd(41, (2, Hh, Ww, c_in))
  want = _conv_reference_loops(x, w)
  N = Kk * Kk
  layer = PL.GPSA(c_in, N, head_dim=1, v_head_dim=c_in, out_features=c_out, rngs=nnx.Rngs(0))
  nnx.update(layer, PL.conv_as_attention_params(w, alpha=50.0))
  p = Kk // 2
  xpad = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  assert set(PL.conv_as_attention_params(w)) == set(layer.params_dict())

  @jax.jit
  def apply(params):  # the layer's own forward (GPSA.__call__) as a function of its params
    return PL.gpsa_forward(layer.config, params, xpad)[:, p:p + Hh, p:p + Ww]

  params = PL.conv_as_attention_params(w, alpha=50.0)
  assert_close(apply(params), want, jnp.float32, f"conv {Kk}x{Kk}")
  nnx.update(layer, params)
  assert_close(layer(xpad)[:, p:p + Hh, p:p + Ww], want, jnp.float32, "conv via the module")
  # The check can fail: a soft encoding (small alpha) blurs the taps, and swapping two
  # heads' output kernels breaks the correspondence.
  assert not np.allclose(apply(PL.conv_as_attention_params(w, alpha=0.5)), want, atol=1e-3)
  params["o_kernel"] = params["o_kernel"][::-1]
  assert not np.allclose(apply(params), want, atol=1e-3)


# ----------------------------------------------------------------------------- layers

def _params(layer):
  return nnx.state(layer, nnx.Param).to_pure_dict()


def _perturb(params, seed=7):
  leaves, tree = jax.tree.flatten(params)
  return jax.tree.unflatten(tree, [a + 0.1 * rnd(seed + i, a.shape) for i, a in enumerate(leaves)])


@pytest.mark.parametrize("make_nnx, make_linen, shape", [
    (lambda r: PL.PEG(6, rngs=r), lambda: PLL.PEG(6), (2, 5, 7, 6)),
    (lambda r: PL.LePE(2, 3, kernel=(3, 5), rngs=r), lambda: PLL.LePE(2, 3, kernel=(3, 5)),
     (2, 5, 7, 2, 3)),
    (lambda r: PL.GPSA(16, 4, num_kv_heads=2, rope="axial", rngs=r),
     lambda: PLL.GPSA(16, 4, num_kv_heads=2, rope="axial"), (2, 3, 5, 16)),
    (lambda r: PL.BoTNetAttention(16, 2, max_distance=(1, 3), rngs=r),
     lambda: PLL.BoTNetAttention(16, 2, max_distance=(1, 3)), (2, 3, 5, 16)),
])
def test_layers_shape_and_linen_twins(make_nnx, make_linen, shape):
  m = make_nnx(nnx.Rngs(0))
  params = _perturb(_params(m))
  nnx.update(m, params)
  lm = make_linen()
  x = rnd(50, shape)
  linen_params = nn.unbox(jax.eval_shape(lambda: lm.init(jax.random.key(0), x))["params"])
  assert jax.tree.structure(linen_params) == jax.tree.structure(params)
  assert jax.tree.map(jnp.shape, linen_params) == jax.tree.map(jnp.shape, params)
  graphdef, state = nnx.split(m)
  y, vjp = jax.vjp(jax.jit(lambda a: nnx.merge(graphdef, state)(a)), x)
  y2, vjp2 = jax.vjp(jax.jit(lambda a: lm.apply({"params": params}, a)), x)
  assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
  np.testing.assert_array_equal(y, y2)
  ct = rnd(51, y.shape)
  np.testing.assert_array_equal(vjp(ct)[0], vjp2(ct)[0])


def test_gpsa_and_botnet_layers_match_reference():
  x = rnd(60, (2, 3, 5, 16))
  xf = x.reshape(2, 15, 16)
  for layer in (PL.GPSA(16, 4, rngs=nnx.Rngs(1)), PL.BoTNetAttention(16, 4, rngs=nnx.Rngs(2))):
    p = _perturb(_params(layer), 3)
    nnx.update(layer, p)
    q = jnp.einsum("btd,dnh->btnh", xf, p["q_kernel"])
    k = jnp.einsum("btd,dkh->btkh", xf, p["k_kernel"])
    v = jnp.einsum("btd,dkh->btkh", xf, p["v_kernel"])
    if isinstance(layer, PL.GPSA):
      o = ref_gpsa(q, k, v, p["v_pos"], p["gate_logit"], (3, 5))
    else:
      o = ref_softmax_attention(q, k, v, ref_botnet_bias(q, p["rel_h"], p["rel_w"], (3, 5)))
    want = jnp.einsum("btnh,nhd->btd", o, p["o_kernel"]).reshape(x.shape)
    assert_close(layer(x), want, jnp.float32, type(layer).__name__)


def test_registry_entries_and_layer_errors():
  for name in ("convit", "botnet"):
    entry = variants.info(name)
    assert entry.kind == "spatial" and entry.linen is not None and not entry.supports_cache
    layer = variants.build(name, d_model=8, num_heads=2, rngs=nnx.Rngs(0))
    x = rnd(0, (1, 3, 3, 8))
    assert layer(x).shape == x.shape
    with pytest.raises(ValueError, match=r"x must be a token map \[B, Hh, Ww, D\]"):
      layer(x.reshape(1, 9, 8))
    with pytest.raises(ValueError, match="takes no positions"):
      layer(x, positions=jnp.zeros((1, 9), jnp.int32))
  with pytest.raises(ValueError, match="rope must be None or 'axial'"):
    PL.GPSA(8, 2, rope="1d", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="max_distance must be"):
    PL.BoTNetAttention(8, 2, max_distance=(1, 2, 3), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="max_distance must be"):
    PLL.BoTNetAttention(8, 2, max_distance=-1)
  with pytest.raises(ValueError, match="kernel must be an odd"):
    PL.PEG(4, kernel=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="locality_strength"):
    PL.GPSA(8, 2, locality_strength=-1.0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="conv_kernel must be"):
    PL.conv_as_attention_params(rnd(0, (2, 2, 3, 3)))


def test_convit_trains_on_digits(tmp_path):
  cmd = [sys.executable, os.path.join(ROOT, "train.py"),
         "--config=" + os.path.join(ROOT, "configs", "digits_vit.py")
         + ":variant=convit,runlocal=True",
         f"--workdir={tmp_path}", "--config.tensorboard=False", "--config.progress_bar=False",
         "--config.checkpoint_every=0", "--config.num_steps=6"]
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
                        check=False)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  assert os.path.exists(os.path.join(tmp_path, "metrics.jsonl")), out[-3000:]
