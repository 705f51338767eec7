"""Every XLA implementation of attnjax.attention against reference_attention, fwd + bwd.

One shared test base (`AttentionTestBase`, in helpers.py) is subclassed per
implementation; the CPU kernel subclasses it in test_cpu_flash.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import AttentionTestBase, assert_close, make_qkv, rnd

import attnjax
from attnjax import masks


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
    return masks.Mask(inner._fn, "lying", kind="fn", table=table)

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


def test_row_dot_is_the_last_axis_sum_of_the_product():
  """core.softmax.row_dot (the backward's delta = rowsum(dO * O), written as a batched
  dot for XLA:CPU's sake) equals the plain reduction, in float32, for 2-D to 5-D inputs
  (bf16 inputs accumulate in float32)."""
  from attnjax.core.softmax import row_dot
  for n, shape in enumerate([(3, 16), (2, 5, 8), (1, 7, 3, 16), (2, 3, 4, 5, 8)]):
    a = jax.random.normal(jax.random.PRNGKey(2 * n), shape)
    b = jax.random.normal(jax.random.PRNGKey(2 * n + 1), shape)
    got = row_dot(a, b)
    assert got.shape == shape[:-1] and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray((a * b).sum(-1)), rtol=1e-5,
                               atol=1e-5)
    got16 = row_dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16))
    want16 = (a.astype(jnp.bfloat16).astype(jnp.float32)
              * b.astype(jnp.bfloat16).astype(jnp.float32)).sum(-1)
    assert got16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got16), np.asarray(want16), rtol=1e-5, atol=1e-5)
