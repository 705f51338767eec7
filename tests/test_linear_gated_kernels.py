"""Tests for the Pallas (gated) delta-rule chunk kernels (TPU Mosaic, GPU Triton).

On CPU: (1) interpret mode against the quadratic form of
``gated_delta_rule_attention`` (and its float64 recurrence via the op's other forms),
forward and VJP with random cotangents, with and without an initial state, float32 and
bfloat16; (2) the TPU-semantics interpreter on a small shape; (3) lowering with jax.export
for 'tpu' and 'cuda', forward and jax.grad; (4) the ops' ``implementation=`` dispatch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import attnjax  # noqa: F401  (registers the kernels with the ops)
from attnjax.core.errors import Unsupported
from attnjax.kernels import linear_common as lc
from attnjax.kernels.gpu import linear_gated as gpu_gated
from attnjax.kernels.tpu import linear_gated as tpu_gated
from attnjax.ops import linear as L
from attnjax.ops.linear import _core

_TRITON = [jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')]


def _inputs(seed, B, T, N, K, H, V, dtype=jnp.float32, gated=True):
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  q = jax.random.normal(ks[0], (B, T, N, H))
  k = jax.random.normal(ks[1], (B, T, K, H))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(ks[2], (B, T, K, V))
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, N)))
  la = -jax.nn.softplus(jax.random.normal(ks[4], (B, T, N))) * 0.5 if gated else None
  S0 = jax.random.normal(ks[5], (B, N, V, H)) * 0.5
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), beta, la, S0


def _close(a, b, rtol, atol):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                             rtol=rtol, atol=atol)


def _quadratic(q, k, v, beta, la, S0):
  return L.gated_delta_rule_attention(
      q, k, v, beta, jnp.zeros(beta.shape) if la is None else la, form='quadratic', state=S0,
      return_state=True)


class _KernelTest:
  MOD = None
  CHUNK = 16
  PLATFORM = None
  DISABLED = ()
  IMPL = None

  def _run(self, q, k, v, beta, la, S0, **kw):
    return self.MOD.gated_delta_rule(q, k, v, beta, la, S0, chunk_size=self.CHUNK,
                                     interpret=kw.pop('interpret', True), **kw)

  @pytest.mark.parametrize('B,T,N,K,H,V,gated', [
      (1, 37, 4, 2, 16, 8, True),
      pytest.param(2, 40, 2, 2, 32, 16, False, marks=pytest.mark.slow),
      pytest.param(1, 1, 3, 1, 8, 4, True, marks=pytest.mark.slow)])
  def test_interpret_matches_quadratic_fwd_vjp(self, B, T, N, K, H, V, gated):
    q, k, v, beta, la, S0 = _inputs(0, B, T, N, K, H, V, gated=gated)
    args = (q, k, v, beta, la, S0) if gated else (q, k, v, beta, S0)

    def kern(*a):
      return self._run(*a) if gated else self._run(a[0], a[1], a[2], a[3], None, a[4])

    def ref(*a):
      return _quadratic(*a) if gated else _quadratic(a[0], a[1], a[2], a[3], None, a[4])

    (o, S), vjp = jax.vjp(kern, *args)
    (ro, rS), rvjp = jax.vjp(ref, *args)
    assert o.shape == (B, T, N, V) and o.dtype == v.dtype and S.shape == (B, N, V, H)
    _close(o, ro, 2e-5, 2e-5)
    _close(S, rS, 2e-5, 2e-5)
    ct = (jax.random.normal(jax.random.PRNGKey(1), o.shape),
          jax.random.normal(jax.random.PRNGKey(2), S.shape))
    for g, rg in zip(vjp(ct), rvjp(ct)):
      _close(g, rg, 1e-4, 1e-4 * max(1.0, float(jnp.max(jnp.abs(rg)))))

  def test_interpret_bf16_close_to_f32(self):
    q, k, v, beta, la, S0 = _inputs(3, 1, 48, 2, 1, 16, 16, jnp.bfloat16)
    o, S = self._run(q, k, v, beta, la, S0)
    assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    ro, rS = _quadratic(*(x.astype(jnp.float32) for x in (q, k, v)), beta, la, S0)
    _close(o.astype(jnp.float32), ro, 0, 2e-2 * max(1.0, float(jnp.max(jnp.abs(ro)))))
    _close(S, rS, 0, 2e-2 * max(1.0, float(jnp.max(jnp.abs(rS)))))

  @pytest.mark.parametrize('dtype', [pytest.param(jnp.float32, marks=pytest.mark.slow),
                                     jnp.bfloat16])
  def test_lowers_fwd_and_grad(self, dtype):
    B, T, N, K, H, V = 2, 200, 4, 2, 64, 64
    sd = jax.ShapeDtypeStruct
    args = (sd((B, T, N, H), dtype), sd((B, T, K, H), dtype), sd((B, T, K, V), dtype),
            sd((B, T, N), jnp.float32), sd((B, T, N), jnp.float32),
            sd((B, N, V, H), jnp.float32))
    f = lambda *a: self.MOD.gated_delta_rule(*a, chunk_size=64, interpret=False)[0]
    g = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3, 4, 5))
    for fn in (f, g):
      exp = jax.export.export(jax.jit(fn), platforms=[self.PLATFORM],
                              disabled_checks=list(self.DISABLED))(*args)
      assert exp.platforms == (self.PLATFORM,)

  def test_ops_dispatch(self):
    """gated_delta_rule_attention(implementation=...) equals the XLA chunked form."""
    q, k, v, beta, la, S0 = _inputs(4, 1, 21, 2, 1, 8, 8)

    def run(impl):
      return lambda q, k, v, b, la, s: L.gated_delta_rule_attention(
          q, k, v, b, la, state=s, return_state=True, chunk_size=self.CHUNK,
          implementation=impl)

    (o, S), vjp = jax.vjp(run(self.IMPL), q, k, v, beta, la, S0)
    (ro, rS), rvjp = jax.vjp(run('xla'), q, k, v, beta, la, S0)
    _close(o, ro, 2e-5, 2e-5)
    _close(S, rS, 2e-5, 2e-5)
    ct = (jax.random.normal(jax.random.PRNGKey(6), o.shape),
          jax.random.normal(jax.random.PRNGKey(7), S.shape))
    for g, rg in zip(vjp(ct), rvjp(ct)):
      _close(g, rg, 1e-4, 1e-4)
    # DeltaNet (no gate) through the same kernel
    d = L.delta_rule_attention(q, k, v, beta, chunk_size=self.CHUNK, implementation=self.IMPL)
    _close(d, L.delta_rule_attention(q, k, v, beta, chunk_size=self.CHUNK), 2e-5, 2e-5)

  def test_bad_arguments(self):
    q, k, v, beta, la, S0 = _inputs(5, 1, 8, 4, 2, 8, 8)
    with pytest.raises(ValueError, match='chunk'):
      self.MOD.gated_delta_rule(q, k, v, beta, la, S0, chunk_size=12)
    with pytest.raises(ValueError, match='beta must have shape'):
      self.MOD.gated_delta_rule(q, k, v, beta[:, :4], la, S0)
    with pytest.raises(ValueError, match='log_alpha must have shape'):
      self.MOD.gated_delta_rule(q, k, v, beta, la[..., :3], S0)
    with pytest.raises(ValueError, match='state must have shape'):
      self.MOD.gated_delta_rule(q, k, v, beta, la, S0[:, :2])
    with pytest.raises(ValueError, match='multiple of kv heads'):
      self.MOD.gated_delta_rule(q[:, :, :3], k, v, beta[..., :3], la[..., :3], S0[:, :3])


class TestTpuKernel(_KernelTest):
  MOD = tpu_gated
  CHUNK = 8
  PLATFORM = 'tpu'
  IMPL = 'pallas_tpu'

  def test_tpu_semantics_interpreter(self):
    """Mosaic semantics (race detection, NaN-filled uninitialised memory) on a small shape."""
    q, k, v, beta, la, S0 = _inputs(8, 1, 16, 2, 1, 8, 8)
    params = pltpu.InterpretParams(detect_races=True, uninitialized_memory='nan')
    o, S = self._run(q, k, v, beta, la, S0, interpret=params)
    ro, rS = _quadratic(q, k, v, beta, la, S0)
    _close(o, ro, 2e-5, 2e-5)
    _close(S, rS, 2e-5, 2e-5)


class TestGpuKernel(_KernelTest):
  MOD = gpu_gated
  CHUNK = 16
  PLATFORM = 'cuda'
  DISABLED = _TRITON
  IMPL = 'pallas_gpu'

  # These repeat the TPU class's checks through the Triton interpreter; `-m slow`.
  @pytest.mark.slow
  def test_ops_dispatch(self):
    super().test_ops_dispatch()

  @pytest.mark.slow
  def test_interpret_bf16_close_to_f32(self):
    super().test_interpret_bf16_close_to_f32()


def test_xla_twin_matches_quadratic_and_block_sizes():
  q, k, v, beta, la, S0 = _inputs(9, 2, 29, 4, 2, 8, 4)
  o, S = lc.delta_rule_scan(q, k, v, beta, la, S0, scale=8 ** -0.5, chunk=8)
  ro, rS = _quadratic(q, k, v, beta, la, S0)
  _close(o, ro, 2e-5, 2e-5)
  _close(S, rS, 2e-5, 2e-5)
  with pytest.raises(ValueError, match='multiple of 8'):
    tpu_gated.BlockSizes(chunk=12)
  with pytest.raises(ValueError, match='power of two'):
    gpu_gated.BlockSizes(chunk=48)
  assert tpu_gated.BlockSizes.get_default().chunk == 64


def test_ops_implementation_errors():
  q, k, v, beta, la, S0 = _inputs(10, 1, 8, 2, 2, 8, 8)
  with pytest.raises(ValueError, match="form='chunked' only"):
    L.gated_delta_rule_attention(q, k, v, beta, la, form='recurrent', implementation='pallas_tpu')
  with pytest.raises(ValueError, match='implementation must be'):
    L.delta_rule_attention(q, k, v, beta, implementation='cuda')
  saved = dict(_core.DELTA_KERNELS)
  try:
    _core.DELTA_KERNELS.clear()
    with pytest.raises(Unsupported, match='no delta-rule kernel'):
      L.delta_rule_attention(q, k, v, beta, implementation='pallas_gpu')
  finally:
    _core.DELTA_KERNELS.update(saved)
  # None / 'auto' keep the XLA chunked form
  _close(L.delta_rule_attention(q, k, v, beta, implementation='auto'),
         L.delta_rule_attention(q, k, v, beta), 0, 0)


def test_default_chunk_fits_vmem():
  """The default chunk (64) fits 3/4 of every tabulated chip's VMEM for head dims up to 256
  in bf16 and f32; the count grows with the chunk and the head dim."""
  from attnjax.kernels.tpu import vmem
  C = tpu_gated.BlockSizes.get_default().chunk
  for chip in vmem.CHIPS:
    cap = vmem.vmem_capacity(chip)
    for H in (64, 128, 256):
      for dtype in (jnp.bfloat16, jnp.float32):
        assert vmem.delta_vmem_bytes(C, head_dim=H, dtype=dtype) <= 0.75 * cap
  small = vmem.delta_vmem_bytes(64, head_dim=64)
  assert vmem.delta_vmem_bytes(128, head_dim=64) > small
  assert vmem.delta_vmem_bytes(64, head_dim=128) > small
  # by hand, C = 64, H = Hv = 64, bf16: blocks (q, k, v; beta, gc columns; gc row; state)
  # in and (o; state) out, double-buffered, plus state scratch and the body's temporaries
  t = lambda r, c, b: (-(-r // (8 if b == 4 else 16)) * (8 if b == 4 else 16)) * (
      -(-c // 128) * 128) * b
  st = t(64, 64, 4)
  ins = 3 * t(64, 64, 2) + 2 * t(64, 1, 4) + t(1, 64, 4) + st
  outs = t(64, 64, 2) + st
  assert small == 2 * (ins + outs) + st + 6 * t(64, 64, 4) + 8 * t(64, 64, 4)
  with pytest.raises(ValueError, match='chunk'):
    vmem.delta_vmem_bytes(0, head_dim=64)


# --------------------------------------------------------------------------------------
# GLA kernels
# --------------------------------------------------------------------------------------


def _gla_inputs(seed, B, T, N, K, H, V, dtype=jnp.float32):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  q = jax.random.normal(ks[0], (B, T, N, H))
  k = jax.random.normal(ks[1], (B, T, K, H))
  v = jax.random.normal(ks[2], (B, T, K, V))
  la = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, N, H))) * 0.5
  S0 = jax.random.normal(ks[4], (B, N, V, H)) * 0.5
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), la, S0


def _gla_quadratic(q, k, v, la, S0):
  return L.gated_linear_attention(q, k, v, la, form='quadratic', state=S0, return_state=True)


class _GlaTest:
  MOD = None
  CHUNK = 16
  PLATFORM = None
  DISABLED = ()
  IMPL = None

  def _run(self, *a, **kw):
    return self.MOD.gated_linear_attention(*a, chunk_size=self.CHUNK,
                                           interpret=kw.pop('interpret', True), **kw)

  @pytest.mark.parametrize('B,T,N,K,H,V', [
      (1, 37, 4, 2, 16, 8), pytest.param(2, 20, 2, 2, 32, 16, marks=pytest.mark.slow)])
  def test_interpret_matches_quadratic_fwd_vjp(self, B, T, N, K, H, V):
    args = _gla_inputs(0, B, T, N, K, H, V)
    (o, S), vjp = jax.vjp(self._run, *args)
    (ro, rS), rvjp = jax.vjp(_gla_quadratic, *args)
    assert o.shape == (B, T, N, V) and S.shape == (B, N, V, H)
    _close(o, ro, 2e-5, 2e-5 * max(1.0, float(jnp.max(jnp.abs(ro)))))
    _close(S, rS, 2e-5, 2e-5 * max(1.0, float(jnp.max(jnp.abs(rS)))))
    ct = (jax.random.normal(jax.random.PRNGKey(1), o.shape),
          jax.random.normal(jax.random.PRNGKey(2), S.shape))
    for g, rg in zip(vjp(ct), rvjp(ct)):
      _close(g, rg, 1e-4, 1e-4 * max(1.0, float(jnp.max(jnp.abs(rg)))))

  def test_interpret_bf16_close_to_f32(self):
    q, k, v, la, S0 = _gla_inputs(3, 1, 40, 2, 1, 16, 16, jnp.bfloat16)
    o, S = self._run(q, k, v, la, S0)
    assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    ro, rS = _gla_quadratic(*(x.astype(jnp.float32) for x in (q, k, v)), la, S0)
    _close(o.astype(jnp.float32), ro, 0, 2e-2 * max(1.0, float(jnp.max(jnp.abs(ro)))))
    _close(S, rS, 0, 2e-2 * max(1.0, float(jnp.max(jnp.abs(rS)))))

  @pytest.mark.parametrize('dtype', [pytest.param(jnp.float32, marks=pytest.mark.slow),
                                     jnp.bfloat16])
  def test_lowers_fwd_and_grad(self, dtype):
    B, T, N, K, H, V = 2, 200, 4, 2, 64, 64
    sd = jax.ShapeDtypeStruct
    args = (sd((B, T, N, H), dtype), sd((B, T, K, H), dtype), sd((B, T, K, V), dtype),
            sd((B, T, N, H), jnp.float32), sd((B, N, V, H), jnp.float32))
    f = lambda *a: self.MOD.gated_linear_attention(*a, chunk_size=16, interpret=False)[0]
    g = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3, 4))
    for fn in (f, g):
      exp = jax.export.export(jax.jit(fn), platforms=[self.PLATFORM],
                              disabled_checks=list(self.DISABLED))(*args)
      assert exp.platforms == (self.PLATFORM,)

  def test_ops_dispatch(self):
    q, k, v, la, S0 = _gla_inputs(4, 1, 21, 2, 1, 8, 8)

    def run(impl):
      return lambda *a: L.gated_linear_attention(*a[:4], state=a[4], return_state=True,
                                                 implementation=impl)

    (o, S), vjp = jax.vjp(run(self.IMPL), q, k, v, la, S0)
    (ro, rS), rvjp = jax.vjp(run('xla'), q, k, v, la, S0)
    _close(o, ro, 2e-5, 2e-5)
    _close(S, rS, 2e-5, 2e-5)
    ct = (jax.random.normal(jax.random.PRNGKey(6), o.shape),
          jax.random.normal(jax.random.PRNGKey(7), S.shape))
    for g, rg in zip(vjp(ct), rvjp(ct)):
      _close(g, rg, 1e-4, 1e-4)

  def test_bad_arguments(self):
    q, k, v, la, S0 = _gla_inputs(5, 1, 8, 4, 2, 8, 8)
    with pytest.raises(ValueError, match='chunk'):
      self.MOD.gated_linear_attention(q, k, v, la, S0, chunk_size=12)
    with pytest.raises(ValueError, match='log_alpha must have shape'):
      self.MOD.gated_linear_attention(q, k, v, la[..., 0], S0)
    with pytest.raises(ValueError, match='state must have shape'):
      self.MOD.gated_linear_attention(q, k, v, la, S0[:, :2])


class TestTpuGla(_GlaTest):
  MOD = tpu_gated
  CHUNK = 8
  PLATFORM = 'tpu'
  IMPL = 'pallas_tpu'

  def test_tpu_semantics_interpreter(self):
    q, k, v, la, S0 = _gla_inputs(8, 1, 16, 2, 1, 8, 8)
    params = pltpu.InterpretParams(detect_races=True, uninitialized_memory='nan')
    o, S = self._run(q, k, v, la, S0, interpret=params)
    ro, rS = _gla_quadratic(q, k, v, la, S0)
    _close(o, ro, 2e-5, 2e-5)
    _close(S, rS, 2e-5, 2e-5)


class TestGpuGla(_GlaTest):
  MOD = gpu_gated
  CHUNK = 16
  PLATFORM = 'cuda'
  DISABLED = _TRITON
  IMPL = 'pallas_gpu'

  @pytest.mark.slow
  def test_ops_dispatch(self):
    super().test_ops_dispatch()

  @pytest.mark.slow
  def test_interpret_bf16_close_to_f32(self):
    super().test_interpret_bf16_close_to_f32()
