"""Ragged batches: `attnjax.attention(..., q_lengths=, kv_lengths=)` and `masks.lengths`.

Every implementation is checked, forward and backward (`jax.vjp`, random cotangent),
against `reference_attention` given an explicit boolean `[B, 1, T, S]` mask built here from
the lengths with NumPy (the independent definition: query `i` of sequence `b` sees key `j`
iff `i < q_lengths[b]` and `j < kv_lengths[b]`). Padded query rows must be exactly 0 with
zero gradients; padded keys must get zero dk/dv. The block table must make padded tiles
EMPTY (so blockwise implementations skip them) and fully real tiles FULL.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, make_qkv, rnd

import attnjax
from attnjax import masks
from attnjax.kernels.gpu import BlockSizes as GpuBlockSizes
from attnjax.kernels.tpu import BlockSizes as TpuBlockSizes

QL = np.array([37, 5, 64], np.int32)
KL = np.array([64, 20, 1], np.int32)


def _explicit(ql, kl, T, S):
  i = np.arange(T)[None, :, None]
  j = np.arange(S)[None, None, :]
  m = (i < np.asarray(ql)[:, None, None]) & (j < np.asarray(kl)[:, None, None])
  return m[:, None]                                  # [B, 1, T, S]


def _run(fn, q, k, v, ct):
  """fn(q, k, v) and its vjp of ct, jitted once (eagerly every primitive compiles alone)."""
  def run(q, k, v, ct):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(ct)
  return jax.jit(run)(q, k, v, ct)


# Interpreted Pallas kernels run in f32 here (their bf16 numerics: test_kernels_flash.py).
CASES = [(impl, None, dt) for impl in ("xla", "xla_chunked", "reference", "cpu_flash")
         for dt in (jnp.float32, jnp.bfloat16)] + [
    ("pallas_tpu", TpuBlockSizes(block_q=16, block_k=128), jnp.float32),
    ("pallas_gpu", GpuBlockSizes(block_q=16, block_k=16), jnp.float32)]


@pytest.mark.parametrize("impl,bs,dtype", CASES,
                         ids=[f"{c[0]}-{jnp.dtype(c[2]).name}" for c in CASES])
def test_ragged_lengths_match_explicit_mask(impl, bs, dtype):
  B, T, S, N, K, H = 3, 64, 64, 4, 2, 16
  q, k, v = make_qkv(1, B, T, S, N, K, H, H, dtype)
  ct = rnd(9, (B, T, N, H), dtype)
  impls = [impl, "xla_chunked"] if impl == "cpu_flash" else impl  # cpu_flash hands off
  kw = dict(implementation=impls) if bs is None else dict(implementation=impl, block_sizes=bs)
  got_o, got_g = _run(lambda q, k, v: attnjax.attention(
      q, k, v, mask=masks.causal(), q_lengths=jnp.asarray(QL), kv_lengths=jnp.asarray(KL),
      **kw), q, k, v, ct)
  m = _explicit(QL, KL, T, S) & np.tril(np.ones((T, S), bool))
  want_o, want_g = _run(lambda q, k, v: attnjax.reference_attention(q, k, v,
                                                                     mask=jnp.asarray(m)),
                        q, k, v, ct)
  assert_close(got_o, want_o, dtype, "out")
  for name, g, w in zip("qkv", got_g, want_g):
    assert_close(g, w, dtype, f"d{name}")
  o = np.asarray(got_o, np.float32)
  for b in range(B):
    assert not o[b, QL[b]:].any(), "padded query rows must be 0"
    assert not np.asarray(got_g[0], np.float32)[b, QL[b]:].any(), "padded rows: zero dq"
    assert not np.asarray(got_g[1], np.float32)[b, KL[b]:].any(), "padded keys: zero dk"
  # sequence 2 has a single key: every real row sees exactly key 0 -> out = v[0]
  np.testing.assert_allclose(o[2, :, :, :], np.repeat(np.asarray(v, np.float32)[2, :1], 2, 1)
                             .repeat(T, 0), atol=2e-2 if dtype == jnp.bfloat16 else 1e-5)


def test_only_one_side_and_traced_lengths_under_jit():
  B, T, S, N, H = 3, 24, 40, 2, 8
  q, k, v = make_qkv(3, B, T, S, N, N, H, H, jnp.float32)
  kl = jnp.asarray([40, 17, 3], jnp.int32)
  f = jax.jit(lambda q, k, v, kl: attnjax.attention(q, k, v, kv_lengths=kl,
                                                    implementation="xla_chunked"))
  want = attnjax.reference_attention(q, k, v, mask=jnp.asarray(_explicit([T] * B, kl, T, S)))
  assert_close(f(q, k, v, kl), want, jnp.float32)
  ql = jnp.asarray([1, 24, 0], jnp.int32)
  got = attnjax.attention(q, k, v, q_lengths=ql, implementation="xla")
  want = attnjax.reference_attention(q, k, v, mask=jnp.asarray(_explicit(ql, [S] * B, T, S)))
  assert_close(got, want, jnp.float32)
  assert not np.asarray(got)[2].any()


def test_block_table_skips_padded_tiles():
  m = masks.lengths(jnp.asarray([10, 33]), jnp.asarray([64, 16]))
  t = np.asarray(m.block_table(64, 64, 16, 16))[:, 0]  # [B, nq, nk]
  # Each tile against the brute-force classification of the explicit mask.
  dense = _explicit([10, 33], [64, 16], 64, 64)[:, 0]
  for b in range(2):
    for i in range(4):
      for j in range(4):
        tile = dense[b, i * 16:(i + 1) * 16, j * 16:(j + 1) * 16]
        want = masks.EMPTY if not tile.any() else masks.FULL if tile.all() else masks.PARTIAL
        assert t[b, i, j] == want, (b, i, j, t[b, i, j], want)


def test_bad_lengths():
  q = jnp.ones((2, 8, 1, 4))
  with pytest.raises(ValueError, match=r"q_lengths must be an int array of shape \[B\] = \[2\]"):
    attnjax.attention(q, q, q, q_lengths=jnp.asarray([3]))
  with pytest.raises(TypeError, match="kv_lengths must have an integer dtype"):
    attnjax.attention(q, q, q, kv_lengths=jnp.asarray([3.0, 2.0]))
  with pytest.raises(ValueError, match="needs q_lengths or kv_lengths"):
    masks.lengths()
  m = masks.lengths(jnp.asarray([1, 2]), jnp.asarray([3, 4]))
  leaves, tree = jax.tree.flatten(m)
  assert jax.tree.unflatten(tree, leaves).kind == "lengths" and len(leaves) == 2


def test_pallas_grid_runs_only_real_tiles():
  """The TPU kernel's grid steps computing a tile = the non-empty tiles of the lengths."""
  from attnjax.kernels.tpu import grid_steps
  B, T, S = 3, 64, 512
  ql, kl = np.array([64, 8, 40], np.int32), np.array([512, 100, 300], np.int32)
  q = jnp.ones((B, T, 1, 8))
  k = jnp.ones((B, S, 1, 8))
  info = grid_steps(q, k, k, mask=masks.lengths(ql, kl),
                    block_sizes=TpuBlockSizes(block_q=16, block_k=128, num_splits=1))
  dense = _explicit(ql, kl, T, S)[:, 0]
  nonempty = sum(dense[b, i * 16:(i + 1) * 16, j * 128:(j + 1) * 128].any()
                 for b in range(B) for i in range(4) for j in range(4))
  assert info["fwd_active"] == nonempty < B * 4 * 4
