"""Tests for the Pallas linear-attention chunk kernels (TPU Mosaic, GPU Triton).

On CPU: (1) interpret mode against the materialised reference, forward and backward
(including the gradient of the log-decay); (2) lowering with jax.export for 'tpu' and
'cuda', forward and jax.grad.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.kernels.gpu import linear as gpu_linear
from attnjax.kernels.tpu import linear as tpu_linear
from attnjax.ops import linear as L

_TRITON = [jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')]


def _inputs(seed, B, T, N, K, F, V, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(kq, (B, T, N, F)) * F ** -0.5
  k = jax.random.normal(kk, (B, T, K, F)) * F ** -0.5
  v = jax.random.normal(kv, (B, T, K, V))
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _close(a, b, rtol, atol):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                             rtol=rtol, atol=atol)


class _KernelTest:
  MOD = None
  CHUNK = 16
  PLATFORM = None
  DISABLED = ()

  def _run(self, *args, **kw):
    return self.MOD.lightning_attention(*args, chunk_size=self.CHUNK, interpret=True, **kw)

  @pytest.mark.parametrize('B,T,N,K,F,V', [pytest.param(2, 40, 4, 2, 16, 8, marks=pytest.mark.slow),
                                           (1, 16, 2, 2, 8, 5),
                                           (1, 1, 3, 1, 4, 4), (2, 35, 6, 3, 32, 16)])
  def test_interpret_matches_reference_fwd_bwd(self, B, T, N, K, F, V):
    q, k, v = _inputs(0, B, T, N, K, F, V)
    ld = jnp.log(jnp.linspace(0.5, 1.0, N))
    # both jitted: eagerly every primitive (interpreted kernel included) compiles alone
    out, vjp = jax.vjp(jax.jit(self._run), q, k, v, ld)
    ref, vjp_ref = jax.vjp(jax.jit(self.MOD.lightning_attention_reference), q, k, v, ld)
    assert out.shape == (B, T, N, V) and out.dtype == v.dtype
    _close(out, ref, 2e-5, 2e-5)
    ct = jax.random.normal(jax.random.PRNGKey(1), out.shape)
    for g, rg in zip(vjp(ct), vjp_ref(ct)):
      _close(g, rg, 2e-5, 2e-5 * max(1.0, float(jnp.max(jnp.abs(rg)))))

  def test_interpret_bf16(self):
    q, k, v = _inputs(2, 1, 48, 2, 1, 16, 16, jnp.bfloat16)
    ld = jnp.log(jnp.array([0.9, 0.99]))
    out = self._run(q, k, v, ld)
    assert out.dtype == jnp.bfloat16
    ref = self.MOD.lightning_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), ld)
    scale = float(jnp.max(jnp.abs(ref)))
    _close(out.astype(jnp.float32), ref, 0, 2e-2 * scale)

  def test_ops_dispatch_with_state(self):
    """lightning_attention(implementation=...) equals the XLA chunked form, state included."""
    q, k, v = _inputs(3, 2, 37, 4, 2, 8, 8)
    decay = jnp.array([0.9, 0.5, 1.0, 0.99])
    impl = 'pallas_' + self.PLATFORM.replace('cuda', 'gpu')
    s0 = jax.random.normal(jax.random.PRNGKey(5), (2, 4, 8, 8))

    def run(implementation):
      def f(q, k, v, s):
        o, st = L.lightning_attention(q, k, v, decay=decay, state=s, return_state=True,
                                      chunk_size=self.CHUNK, implementation=implementation)
        return o, st
      return f

    (o, st), vjp = jax.vjp(jax.jit(run(impl)), q, k, v, s0)   # jitted: not op by op
    (ro, rst), rvjp = jax.vjp(jax.jit(run('xla')), q, k, v, s0)
    _close(o, ro, 2e-5, 2e-5)
    _close(st, rst, 2e-5, 2e-5)
    ct = (jax.random.normal(jax.random.PRNGKey(6), o.shape),
          jax.random.normal(jax.random.PRNGKey(7), st.shape))
    for g, rg in zip(vjp(ct), rvjp(ct)):
      _close(g, rg, 2e-5, 2e-5)
    # the normalised linear attention routed through the kernel (v augmented by ones)
    lo = L.linear_attention(q, k, v, causal=True, chunk_size=self.CHUNK, implementation=impl)
    _close(lo, L.linear_attention(q, k, v, causal=True, chunk_size=self.CHUNK), 2e-5, 2e-5)

  def test_decay_gradient_through_ops(self):
    q, k, v = _inputs(4, 1, 30, 2, 1, 8, 4)
    impl = 'pallas_' + self.PLATFORM.replace('cuda', 'gpu')
    f = lambda d, impl: jnp.sum(jnp.sin(L.lightning_attention(
        q, k, v, decay=d, chunk_size=self.CHUNK, implementation=impl)))
    d = jnp.array([0.8, 0.97])
    g = jax.jit(jax.grad(f), static_argnums=1)   # jitted: not op by op
    _close(g(d, impl), g(d, 'xla'), 2e-5, 2e-5)

  @pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
  def test_lowers_fwd_and_grad(self, dtype):
    B, T, N, K, F, V = 2, 200, 4, 2, 64, 64
    args = (jax.ShapeDtypeStruct((B, T, N, F), dtype), jax.ShapeDtypeStruct((B, T, K, F), dtype),
            jax.ShapeDtypeStruct((B, T, K, V), dtype), jax.ShapeDtypeStruct((N,), jnp.float32))
    f = lambda q, k, v, ld: self.MOD.lightning_attention(q, k, v, ld, chunk_size=64,
                                                         interpret=False)
    g = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3))
    for fn in (f, g):
      exp = jax.export.export(jax.jit(fn), platforms=[self.PLATFORM],
                              disabled_checks=list(self.DISABLED))(*args)
      assert exp.platforms == (self.PLATFORM,)

  def test_bad_arguments(self):
    q, k, v = _inputs(5, 1, 8, 4, 2, 8, 8)
    ld = jnp.zeros((4,))
    with pytest.raises(ValueError, match='chunk'):
      self.MOD.lightning_attention(q, k, v, ld, chunk_size=12)
    with pytest.raises(ValueError, match='log_decay must have shape'):
      self.MOD.lightning_attention(q, k, v, jnp.zeros((3,)))
    with pytest.raises(ValueError, match='multiple of kv heads'):
      self.MOD.lightning_attention(q[:, :, :3], k, v, jnp.zeros((3,)))
    with pytest.raises(ValueError, match='rank 4'):
      self.MOD.lightning_attention(q[0], k, v, ld)
    with pytest.raises(ValueError, match='v must have shape'):
      self.MOD.lightning_attention(q, k, v[:, :4], ld)


class TestTpuKernel(_KernelTest):
  MOD = tpu_linear
  CHUNK = 8
  PLATFORM = 'tpu'


class TestGpuKernel(_KernelTest):
  MOD = gpu_linear
  CHUNK = 16
  PLATFORM = 'cuda'
  DISABLED = _TRITON

  # These two repeat the TPU class's checks through the Triton kernel (45 s together on
  # the 2-core CI machine); they run under `-m slow`.
  @pytest.mark.slow
  def test_ops_dispatch_with_state(self):
    super().test_ops_dispatch_with_state()

  @pytest.mark.slow
  def test_decay_gradient_through_ops(self):
    super().test_decay_gradient_through_ops()


def test_block_sizes_validated():
  with pytest.raises(ValueError, match='multiple of 8'):
    tpu_linear.BlockSizes(chunk=12)
  with pytest.raises(ValueError, match='power of two'):
    gpu_linear.BlockSizes(chunk=48)
  with pytest.raises(ValueError, match='num_warps'):
    gpu_linear.BlockSizes(num_warps=0)
  assert tpu_linear.BlockSizes.get_default().chunk == 64
  assert gpu_linear.BlockSizes.get_default().chunk == 64
