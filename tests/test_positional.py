"""Tests for attnjax.ops.positional against plain numpy formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops import positional as P


def _np_rope(x, pos, base):
  # complex-number formulation of the half-split convention (independent of the library code)
  h = x.shape[-1]
  inv = base ** (-np.arange(0, h, 2) / h)
  ang = pos[..., None, None].astype(np.float64) * inv  # [B,T,1,H/2]
  z = (x[..., : h // 2] + 1j * x[..., h // 2 :]) * np.exp(1j * ang)
  return np.concatenate([z.real, z.imag], axis=-1)


def test_apply_rope_matches_complex_rotation():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 7, 3, 8)).astype(np.float32)
  pos = rng.integers(0, 50, size=(2, 7))
  out = P.apply_rope(jnp.asarray(x), jnp.asarray(pos), base=100.0)
  np.testing.assert_allclose(out, _np_rope(x, pos, 100.0), rtol=1e-5, atol=1e-5)


def test_rope_relative_property():
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)

  def score(pq, pk):
    rq = P.apply_rope(q, jnp.array([[pq]]))
    rk = P.apply_rope(k, jnp.array([[pk]]))
    return float(jnp.sum(rq * rk))

  np.testing.assert_allclose(score(5, 2), score(13, 10), rtol=1e-4)
  np.testing.assert_allclose(score(0, 0), float(jnp.sum(q * k)), rtol=1e-5)
  assert abs(score(5, 2) - score(5, 3)) > 1e-4


def test_rope_preserves_dtype_and_norm_bf16():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 5, 2, 8)), jnp.bfloat16)
  out = P.apply_rope(x, jnp.arange(5))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    jnp.linalg.norm(out.astype(jnp.float32), axis=-1),
    jnp.linalg.norm(x.astype(jnp.float32), axis=-1), rtol=2e-2)


def test_axial_rope_2d_equals_two_1d_ropes():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 6, 2, 16)).astype(np.float32)
  coords = P.grid_coordinates((2, 3))
  out = np.asarray(P.apply_rope_axial(jnp.asarray(x), jnp.asarray(coords)))
  # rotation pairs: first 4 pairs follow rows, next 4 follow columns (each an 8-wide ladder)
  x1, x2 = x[..., :8], x[..., 8:]
  rows = np.concatenate([x1[..., :4], x2[..., :4]], -1)
  cols = np.concatenate([x1[..., 4:], x2[..., 4:]], -1)
  r = _np_rope(rows, np.broadcast_to(coords[:, 0], (2, 6)), 10000.0)
  c = _np_rope(cols, np.broadcast_to(coords[:, 1], (2, 6)), 10000.0)
  expect = np.concatenate([r[..., :4], c[..., :4], r[..., 4:], c[..., 4:]], -1)
  np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5)


def test_rope_mixed_angles_and_shapes():
  freqs = P.init_rope_mixed_frequencies(jax.random.key(0), 3, 8, 2)
  assert freqs.shape == (3, 4, 2)
  pos = jnp.asarray(P.grid_coordinates((2, 2)))[None]
  ang = P.rope_angles_mixed(pos, freqs)
  assert ang.shape == (1, 4, 3, 4)
  np.testing.assert_allclose(ang[0, 3], freqs[..., 0] + freqs[..., 1], rtol=1e-6)
  x = jax.random.normal(jax.random.key(1), (1, 4, 3, 8))
  y = P.apply_rotary(x, ang)
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_sinusoidal():
  pos = jnp.arange(5)
  e = P.sinusoidal_embedding(pos, 8)
  inv = 10000.0 ** (-np.arange(0, 8, 2) / 8)
  expect = np.concatenate([np.sin(np.arange(5)[:, None] * inv),
                           np.cos(np.arange(5)[:, None] * inv)], -1)
  np.testing.assert_allclose(e, expect, rtol=1e-5, atol=1e-6)
  e2 = P.sinusoidal_embedding_nd((2, 3), 8)
  assert e2.shape == (6, 8)
  np.testing.assert_allclose(e2[4, :4], P.sinusoidal_embedding(jnp.array(1), 4), rtol=1e-6)
  np.testing.assert_allclose(e2[4, 4:], P.sinusoidal_embedding(jnp.array(1), 4), rtol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 8, 6, 12])
def test_alibi_slopes(n):
  s = np.asarray(P.alibi_slopes(n))
  if n == 8:
    np.testing.assert_allclose(s, [2 ** -(i + 1) for i in range(8)], rtol=1e-6)
  if n == 6:
    p4 = [2 ** (-8 * h / 4) for h in range(1, 5)]
    p8 = [2 ** (-8 * h / 8) for h in range(1, 9)]
    np.testing.assert_allclose(s, p4 + p8[0::2][:2], rtol=1e-6)
  assert s.shape == (n,) and np.all(s > 0) and np.all(s <= 1)


def test_relative_position_index_2d_swin_table():
  coords = P.grid_coordinates((3, 3))
  idx = np.asarray(P.relative_position_index(coords[:, None], coords[None, :], 2))
  assert idx.shape == (9, 9) and idx.min() >= 0 and idx.max() < P.num_relative_positions(2, 2)
  # brute force
  for i in range(9):
    for j in range(9):
      dy, dx = coords[j] - coords[i]
      assert idx[i, j] == (dy + 2) * 5 + (dx + 2)
  # clipping
  idx1 = np.asarray(P.relative_position_index(np.arange(6)[:, None, None],
                                              np.arange(6)[None, :, None], 2))
  assert idx1[0, 5] == 4 and idx1[5, 0] == 0 and idx1[3, 3] == 2
  # dilation step
  idx2 = np.asarray(P.relative_position_index(np.array([[0]]), np.array([[4]]), 3, step=2))
  assert idx2 == 3 + 2


@pytest.mark.parametrize(
  "call, match",
  [
    (lambda: P.apply_rope(jnp.ones((2, 3, 1, 7)), jnp.arange(3)), "even"),
    (lambda: P.apply_rope(jnp.ones((2, 3, 8)), jnp.arange(3)), "x must be"),
    (lambda: P.apply_rope(jnp.ones((2, 3, 1, 8)), jnp.arange(4)), "positions"),
    (lambda: P.apply_rope_axial(jnp.ones((1, 4, 1, 6)), jnp.zeros((4, 2))), "multiple of 2\\*D"),
    (lambda: P.rope_frequencies(8, base=1.0), "base"),
    (lambda: P.alibi_slopes(0), "num_heads"),
    (lambda: P.sinusoidal_embedding_nd((2, 2), 6), "multiple"),
    (lambda: P.grid_coordinates((0, 2)), "shape"),
    (lambda: P.relative_position_index(np.zeros((2, 2)), np.zeros((2, 3)), 1), "same D"),
    (lambda: P.apply_rotary(jnp.ones((2, 3, 1, 8)), jnp.ones((3, 3, 4))), "axis 0"),
  ],
)
def test_bad_arguments(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_rope_grad_is_rotation_transpose():
  x = jax.random.normal(jax.random.key(0), (1, 4, 2, 8))
  pos = jnp.arange(4)
  ct = jax.random.normal(jax.random.key(1), x.shape)
  _, vjp = jax.vjp(lambda a: P.apply_rope(a, pos), x)
  (g,) = vjp(ct)
  # the inverse rotation is rotation by -angle, and rotations are orthogonal: grad = R^T ct
  expect = P.apply_rotary(ct, -P.rope_angles(pos[None], 8))
  np.testing.assert_allclose(g, expect, rtol=1e-5, atol=1e-5)
  assert math.isfinite(float(jnp.sum(g)))
