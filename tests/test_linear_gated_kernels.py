"""Tests for the Pallas (gated) delta-rule chunk kernels (TPU Mosaic, GPU Triton).

On CPU, for both families (delta rule, GLA) and both backends, through one shared check
(:func:`_check_fwd_vjp`): (1) interpret mode against the quadratic form of the op, forward
and VJP (the Pallas backward kernel) with random cotangents on the output and the final
state, w.r.t. every input and the initial state, float32 and bfloat16 inputs; (2) the
TPU-semantics interpreter (race detection, NaN-filled uninitialised memory) on a small
shape, forward and backward; (3) lowering with jax.export for 'tpu' and 'cuda', forward
and jax.grad (which runs the backward kernel); (4) ``backward='xla'`` (the XLA twin's
VJP) against ``'pallas'``; (5) the ops' ``implementation=`` dispatch.
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


def _check_fwd_vjp(run, ref, args, dtype, seed=1):
  """``run(*args)`` with q, k, v (the first three) cast to ``dtype`` against ``ref(*args)``
  in float32: ``(o, S)``, then the VJP with random cotangents on both, w.r.t. every
  argument. Tolerances per dtype, scaled by the reference's largest magnitude."""
  low = tuple(x.astype(dtype) if i < 3 else x for i, x in enumerate(args))
  (o, S), vjp = jax.vjp(jax.jit(run), *low)     # both jitted: eagerly every primitive
  (ro, rS), rvjp = jax.vjp(jax.jit(ref), *args)  # compiles on its own
  assert o.shape == ro.shape and o.dtype == dtype and S.shape == rS.shape
  assert S.dtype == jnp.float32
  scaled = lambda r, tol: tol * max(1.0, float(jnp.max(jnp.abs(r))))
  f32 = dtype == jnp.float32
  for a, r in ((o, ro), (S, rS)):
    _close(a, r, 2e-5 if f32 else 0, scaled(r, 2e-5 if f32 else 2e-2))
  ks = jax.random.split(jax.random.PRNGKey(seed))
  ct = (jax.random.normal(ks[0], o.shape).astype(o.dtype), jax.random.normal(ks[1], S.shape))
  grads, rgrads = vjp(ct), rvjp((ct[0].astype(ro.dtype), ct[1]))
  for x, g, rg in zip(low, grads, rgrads):
    if x is None:
      continue
    assert g.shape == x.shape and g.dtype == x.dtype
    assert np.all(np.isfinite(np.asarray(g, np.float32)))
    _close(g, rg, 1e-4 if f32 else 0, scaled(rg, 1e-4 if f32 else 2e-2))


def _quadratic(q, k, v, beta, la, S0):
  return L.gated_delta_rule_attention(
      q, k, v, beta, jnp.zeros(beta.shape) if la is None else la, form='quadratic', state=S0,
      return_state=True)


class _Kernels:
  """Checks shared by the four kernel classes (delta rule / GLA x TPU / GPU); a subclass
  names its module, entry point, inputs and reference."""
  MOD = None
  FN = None
  CHUNK = 16
  LOWER_CHUNK = 64
  PLATFORM = None
  DISABLED = ()
  IMPL = None

  def _run(self, *a, **kw):
    return getattr(self.MOD, self.FN)(*a, chunk_size=self.CHUNK,
                                      interpret=kw.pop('interpret', True), **kw)

  @pytest.mark.parametrize('B,T,N,K,H,V,gated,dtype', [
      (1, 37, 4, 2, 16, 8, True, jnp.float32),
      (1, 24, 2, 1, 16, 16, True, jnp.bfloat16),
      pytest.param(2, 40, 2, 2, 32, 16, False, jnp.float32, marks=pytest.mark.slow),
      pytest.param(1, 1, 3, 1, 8, 4, True, jnp.float32, marks=pytest.mark.slow)])
  def test_interpret_matches_quadratic_fwd_vjp(self, B, T, N, K, H, V, gated, dtype):
    args = self.inputs(0, B, T, N, K, H, V, gated)
    _check_fwd_vjp(self._run, self.ref, args, dtype)

  def test_backward_choice(self):
    """backward='pallas' (the kernel) and 'xla' (the XLA twin's VJP) agree; others raise."""
    args = self.inputs(11, 1, 21, 2, 1, 8, 8)
    _check_fwd_vjp(self._run, lambda *a: self._run(*a, backward='xla'), args, jnp.float32)
    with pytest.raises(ValueError, match='backward must be one of'):
      self._run(*args, backward='triton')

  @pytest.mark.parametrize('dtype', [pytest.param(jnp.float32, marks=pytest.mark.slow),
                                     jnp.bfloat16])
  def test_lowers_fwd_and_grad(self, dtype):
    """Forward and jax.grad lower for the platform; the gradient runs the backward kernel."""
    B, T, N, K, H, V = 2, 200, 4, 2, 64, 64
    args = tuple(None if x is None else jax.ShapeDtypeStruct(x.shape, dtype if i < 3 else x.dtype)
                 for i, x in enumerate(self.inputs(0, B, T, N, K, H, V)))
    f = lambda *a: getattr(self.MOD, self.FN)(*a, chunk_size=self.LOWER_CHUNK,
                                              interpret=False)[0]
    g = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)),
                 argnums=tuple(range(len(args))))
    for fn, kernel in ((f, self.KERNEL + '_fwd'), (g, self.KERNEL + '_bwd')):
      exp = jax.export.export(jax.jit(fn), platforms=[self.PLATFORM],
                              disabled_checks=list(self.DISABLED))(*args)
      assert exp.platforms == (self.PLATFORM,)
      assert kernel in exp.mlir_module()


class _Tpu:
  CHUNK = 8
  PLATFORM = 'tpu'
  IMPL = 'pallas_tpu'

  def test_tpu_semantics_interpreter(self):
    """Mosaic semantics (race detection, NaN-filled uninitialised memory) on a small shape,
    forward and backward kernels."""
    params = pltpu.InterpretParams(detect_races=True, uninitialized_memory='nan')
    _check_fwd_vjp(lambda *a: self._run(*a, interpret=params), self.ref,
                   self.inputs(8, 1, 16, 2, 1, 8, 8), jnp.float32)


class _Gpu:
  CHUNK = 16
  PLATFORM = 'cuda'
  DISABLED = _TRITON
  IMPL = 'pallas_gpu'

  # These repeat the TPU class's checks through the Triton interpreter; `-m slow`.
  @pytest.mark.slow
  def test_ops_dispatch(self):
    super().test_ops_dispatch()

  @pytest.mark.slow
  def test_backward_choice(self):
    super().test_backward_choice()


class _Delta(_Kernels):
  FN = 'gated_delta_rule'
  KERNEL = 'gated_delta'

  def inputs(self, seed, B, T, N, K, H, V, gated=True):
    return _inputs(seed, B, T, N, K, H, V, gated=gated)

  def ref(self, *a):
    return _quadratic(*a)

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




class TestTpuKernel(_Tpu, _Delta):
  MOD = tpu_gated


class TestGpuKernel(_Gpu, _Delta):
  MOD = gpu_gated


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
  """The default chunks (delta rule 64, GLA 16) fit 3/4 of every tabulated chip's VMEM for
  head dims up to 256 in bf16 and f32, forward and backward kernels; the counts grow with
  the chunk and the head dim."""
  from attnjax.kernels.tpu import vmem
  C = tpu_gated.BlockSizes.get_default().chunk
  for chip in vmem.CHIPS:
    cap = vmem.vmem_capacity(chip)
    for H in (64, 128, 256):
      for dtype in (jnp.bfloat16, jnp.float32):
        for need in (vmem.delta_vmem_bytes(C, head_dim=H, dtype=dtype),
                     vmem.gla_vmem_bytes(head_dim=H, dtype=dtype)):
          assert set(need) == {'fwd', 'bwd'} and max(need.values()) <= 0.75 * cap
  for count, c in ((vmem.delta_vmem_bytes, 64), (vmem.gla_vmem_bytes, 16)):
    small = count(c, head_dim=64)
    for bigger in (count(2 * c, head_dim=64), count(c, head_dim=128)):
      assert all(bigger[key] > small[key] for key in small)
    assert small['bwd'] > small['fwd']
  # by hand, delta rule, C = 64, H = Hv = 64, bf16: blocks (q, k, v; beta, gc columns; gc
  # row; state) in and (o; final state; chunk state) out, double-buffered, plus state
  # scratch and the body's temporaries
  t = lambda r, c, b: (-(-r // (8 if b == 4 else 16)) * (8 if b == 4 else 16)) * (
      -(-c // 128) * 128) * b
  st = t(64, 64, 4)
  ins = 3 * t(64, 64, 2) + 2 * t(64, 1, 4) + t(1, 64, 4) + st
  outs = t(64, 64, 2) + 2 * st
  assert vmem.delta_vmem_bytes(64, head_dim=64)['fwd'] == (
      2 * (ins + outs) + st + 6 * t(64, 64, 4) + 8 * t(64, 64, 4))
  with pytest.raises(ValueError, match='chunk'):
    vmem.delta_vmem_bytes(0, head_dim=64)
  with pytest.raises(ValueError, match='head_dim'):
    vmem.gla_vmem_bytes(16, head_dim=0)


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


class _Gla(_Kernels):
  FN = 'gated_linear_attention'
  KERNEL = 'gla'
  LOWER_CHUNK = 16

  def inputs(self, seed, B, T, N, K, H, V, gated=True):
    return _gla_inputs(seed, B, T, N, K, H, V)

  def ref(self, *a):
    return _gla_quadratic(*a)

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




class TestTpuGla(_Tpu, _Gla):
  MOD = tpu_gated


class TestGpuGla(_Gpu, _Gla):
  MOD = gpu_gated
