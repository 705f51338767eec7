"""attnjax.core.select.top_k (the routing ops' choice) and
attnjax.core.softmax.merge_partials (joining partial softmaxes of separate calls)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core.select import top_k
from attnjax.core.softmax import merge_partials


@pytest.mark.parametrize("shape,k", [((3, 5, 32), 2), ((2, 7, 16), 4), ((4, 9), 8),
                                     ((2, 3, 40), 3), ((5, 1), 1), ((6, 12), 0)])
def test_top_k_equals_lax_top_k(shape, k):
  """Random rows, rows with ties (small integers) and rows with -inf entries (MoBA masks
  the later blocks this way): the same values and indices as jax.lax.top_k, on the pass
  path (rows <= 32) and the sort path (40)."""
  rng = np.random.default_rng(sum(shape) + k)
  cases = [rng.standard_normal(shape).astype(np.float32),
           rng.integers(0, 3, shape).astype(np.float32),
           np.where(rng.random(shape) < 0.6, -np.inf, rng.standard_normal(shape)).astype(
               np.float32)]
  for x in cases:
    want_v, want_i = jax.lax.top_k(jnp.asarray(x), k)
    got_v, got_i = jax.jit(top_k, static_argnums=1)(jnp.asarray(x), k)
    np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
    np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
    assert got_i.dtype == jnp.int32


def test_top_k_integer_rows_and_bad_k():
  x = jnp.asarray(np.random.default_rng(0).integers(-5, 5, (4, 10)), jnp.int32)
  np.testing.assert_array_equal(np.asarray(top_k(x, 3)[1]), np.asarray(jax.lax.top_k(x, 3)[1]))
  with pytest.raises(ValueError, match=r"k must be in \[0, 10\]"):
    top_k(x, 11)


def _dense_lse_softmax(s, v):
  """Softmax over the allowed (finite) scores s [R, S] of v [R, S, D]: (o, lse); an
  empty row gives 0 / -inf with zero gradients."""
  ok = jnp.isfinite(s)
  m = jnp.max(jnp.where(ok, s, -jnp.inf), axis=-1)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.where(ok, jnp.exp(jnp.where(ok, s, 0.0) - m[:, None]), 0.0)
  l = e.sum(-1)
  l1 = jnp.where(l > 0, l, 1.0)
  return (jnp.einsum("rs,rsd->rd", e, v) / l1[:, None],
          jnp.where(l > 0, m + jnp.log(l1), -jnp.inf))


def test_merge_partials_equals_the_softmax_over_the_union_fwd_and_vjp():
  """Keys split in two sets; each side's (o, lse) merged equals the softmax over all keys,
  forward and vjp (random cotangents); rows empty on one side, and a row empty on both
  sides gives 0 with zero gradients (no NaN)."""
  rng = np.random.default_rng(1)
  R, Sa, Sb, D = 6, 5, 7, 4
  s = rng.standard_normal((R, Sa + Sb)).astype(np.float32)
  s[1, :Sa] = -np.inf          # empty on side a
  s[2, Sa:] = -np.inf          # empty on side b
  s[3, :] = -np.inf            # empty on both
  s, v = jnp.asarray(s), jnp.asarray(rng.standard_normal((R, Sa + Sb, D)), jnp.float32)

  def merged(s, v):
    oa, la = _dense_lse_softmax(s[:, :Sa], v[:, :Sa])
    ob, lb = _dense_lse_softmax(s[:, Sa:], v[:, Sa:])
    return merge_partials(oa, la, ob, lb)

  (o, lse), vjp = jax.vjp(merged, s, v)
  (o_ref, lse_ref), vjp_ref = jax.vjp(_dense_lse_softmax, s, v)
  np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_ref), rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(o[3]) == 0) and np.asarray(lse[3]) == -np.inf
  ct = (jnp.asarray(rng.standard_normal(o.shape), jnp.float32),
        jnp.asarray(rng.standard_normal(lse.shape) * np.isfinite(np.asarray(lse)), jnp.float32))
  got, want = vjp(ct), vjp_ref(ct)
  for g, w in zip(got, want):
    g, w = np.asarray(g), np.asarray(w)
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(np.where(np.isfinite(g), g, 0), np.where(np.isfinite(w), w, 0),
                               rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(got[1])[3] == 0)


def test_merge_partials_refuses_misaligned_shapes():
  o, lse = jnp.ones((2, 3, 4)), jnp.zeros((2, 3))
  with pytest.raises(ValueError, match=r"lse_b must have shape \(2, 3\).*got \(3, 2\)"):
    merge_partials(o, lse, o, jnp.zeros((3, 2)))
  with pytest.raises(ValueError, match=r"lse_a must have shape \(2, 3\).*got \(2,\)"):
    merge_partials(o, jnp.zeros((2,)), o, lse)
  with pytest.raises(ValueError, match=r"o_b must have shape \(2, 3, 4\).*got \(2, 3, 5\)"):
    merge_partials(o, lse, jnp.ones((2, 3, 5)), lse)
