"""attnjax.analysis.capture on the Pallas kernel paths of the linear ops.

Every linear op with a Pallas implementation (GLA, the delta rule and the gated delta rule
with their chunk kernels of ``attnjax/kernels/*/linear_gated.py``; the kernelized, decayed
and lightning ops with the chunk kernels of ``attnjax/kernels/*/linear.py``) goes through
the same interception point as its XLA forms, so ``capture`` records one call whatever
``implementation`` served it.  On CPU the kernels run in interpret mode: the map recorded
for a kernel call must equal the map recorded for the XLA call (the recomputation runs the
XLA forms), ``P @ V`` (+ the ``'state'`` extra) must reproduce the kernel's own output,
and the output must not change when observed.  The value head dim equals the number of
keys ``S``, so that ``P @ V == out`` for a random ``V`` determines ``P`` completely.

Under ``jax.jit`` with no observer the hook compiles away: the traced program of the
public op is the one of the bare kernel call, and its export for TPU / CUDA holds the
kernel's custom call.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import analysis
from attnjax.ops import linear as L
from attnjax.ops.linear import _core
from tests.helpers import rnd

KERNELS = ["pallas_tpu", "pallas_gpu"]
B, T, N, H = 1, 16, 2, 4        # T: one 16-token chunk of every kernel; Hv = T below


def _inputs(K=N):
  q, k = rnd(0, (B, T, N, H)), rnd(1, (B, T, K, H))
  v = rnd(2, (B, T, K, T))
  kn = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  return dict(
      q=q, k=k, kn=kn, v=v,
      log_alpha=-jnp.abs(rnd(3, (B, T, N, H), scale=0.3)),
      beta=jax.nn.sigmoid(rnd(4, (B, T, N))),
      g=-jnp.abs(rnd(5, (B, T, N), scale=0.3)),
      S0=rnd(6, (B, N, T, H)),                      # [B, N, Hv, H] of the gated family
      KV=rnd(7, (B, N, H, T)),                      # [B, N, F, Hv] of lightning
  )


def _case(name, impl, with_state=False):
  """``(fn(q, k, v), (q, k, v))`` of one op served by ``impl``."""
  x = _inputs(K=1 if name == "gated_delta" else N)    # GQA on one case
  st = {}
  if name == "gla":
    st = dict(state=x["S0"], return_state=True) if with_state else {}
    fn = lambda q, k, v: L.gated_linear_attention(q, k, v, x["log_alpha"], implementation=impl,
                                                  **st)
    return fn, (x["q"], x["k"], x["v"])
  if name == "delta":
    st = dict(state=x["S0"]) if with_state else {}
    fn = lambda q, k, v: L.delta_rule_attention(q, k, v, x["beta"], implementation=impl, **st)
    return fn, (x["q"], x["kn"], x["v"])
  if name == "gated_delta":
    st = dict(state=x["S0"], return_state=True) if with_state else {}
    fn = lambda q, k, v: L.gated_delta_rule_attention(q, k, v, x["beta"], x["g"],
                                                      implementation=impl, **st)
    return fn, (x["q"], x["kn"], x["v"])
  if name == "lightning":
    st = dict(state=x["KV"], return_state=True) if with_state else {}
    fn = lambda q, k, v: L.lightning_attention(q, k, v, decay=jnp.array([0.9, 0.7]),
                                               chunk_size=16, implementation=impl, **st)
    return fn, (x["q"], x["k"], x["v"])
  assert name == "linear" and not with_state
  fn = lambda q, k, v: L.linear_attention(q, k, v, causal=True, chunk_size=16,
                                          implementation=impl)
  return fn, (x["q"], x["k"], x["v"])


def _capture(fn, args):
  """``(P [B, N, T, S], extras, out)`` of the single observed call of ``fn(*args)``."""
  calls = analysis.attention_calls(fn, args)
  assert [c.kind for c in calls] == ["linear"], calls        # one call, kernel path included
  maps, out = analysis.capture(fn, args, return_output=True, extras=True)
  name = calls[0].name
  extras = {key.split(":", 1)[1]: p for key, p in maps.items() if ":" in key}
  return maps[name], extras, out


def _first(out):
  return np.asarray(out[0] if isinstance(out, tuple) else out, np.float64)


def _pv(p, v):
  """``sum_s P[b, n, t, s] v[b, s, kv(n), :]``."""
  v = np.asarray(v, np.float64)
  v = np.repeat(v, p.shape[1] // v.shape[2], axis=2)
  return np.einsum("bnts,bsnh->btnh", np.asarray(p, np.float64), v)


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("name", ["gla", "delta", "gated_delta", "lightning", "linear"])
def test_kernel_path_map_equals_xla_map(name, impl):
  fn_k, args = _case(name, impl)
  fn_x, _ = _case(name, "xla")
  p_k, ex_k, out_k = _capture(fn_k, args)
  p_x, ex_x, _ = _capture(fn_x, args)
  assert ex_k == {} and ex_x == {}
  assert p_k.shape == (B, N, T, T)
  assert np.abs(p_k).max() > 1e-2
  np.testing.assert_allclose(p_k, p_x, rtol=1e-5, atol=1e-5)
  # the observed call ran the kernel unchanged, and the map reproduces its output
  plain = jax.jit(fn_k)(*args)
  for a, b in zip(jax.tree.leaves(out_k), jax.tree.leaves(plain)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(_pv(p_k, args[2]), _first(out_k), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("name", ["gla", "delta", "gated_delta", "lightning"])
def test_kernel_path_state_extra_completes_the_map(name, impl):
  fn_k, args = _case(name, impl, with_state=True)
  fn_x, _ = _case(name, "xla", with_state=True)
  p_k, ex_k, out_k = _capture(fn_k, args)
  p_x, ex_x, out_x = _capture(fn_x, args)
  assert list(ex_k) == ["state"] and list(ex_x) == ["state"]
  assert np.abs(ex_k["state"]).max() > 1e-2
  np.testing.assert_allclose(p_k, p_x, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ex_k["state"], ex_x["state"], rtol=1e-5, atol=1e-5)
  o = _first(out_k)
  np.testing.assert_allclose(o, _first(jax.jit(fn_k)(*args)), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(_pv(p_k, args[2]) + ex_k["state"], o, rtol=1e-5, atol=1e-5)
  if isinstance(out_k, tuple):   # the returned state is the kernel's, untouched
    for a, b in zip(jax.tree.leaves(out_k[1]), jax.tree.leaves(out_x[1])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- no observer

def _bare_kernel(name, impl):
  """The registered kernel called directly, as the public op calls it (no hook)."""
  x = _inputs()
  scale = H ** -0.5
  if name == "gla":
    fn = lambda q, k, v, la: _core.GLA_KERNELS[impl](
        q, k, v, la, jnp.zeros((B, N, T, H), jnp.float32), scale=scale, chunk_size=16)[0]
    op = lambda q, k, v, la: L.gated_linear_attention(q, k, v, la, implementation=impl)
    return fn, op, (x["q"], x["k"], x["v"], x["log_alpha"])
  fn = lambda q, k, v, b, g: _core.DELTA_KERNELS[impl](
      q, k, v, b, g, jnp.zeros((B, N, T, H), jnp.float32), scale=scale, chunk_size=16)[0]
  op = lambda q, k, v, b, g: L.gated_delta_rule_attention(q, k, v, b, g, implementation=impl)
  return fn, op, (x["q"], x["kn"], x["v"], x["beta"], x["g"])


def _pallas_calls(jaxpr):
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == "pallas_call"
    for sub in jax.core.jaxprs_in_params(eqn.params):
      n += _pallas_calls(sub)
  return n


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("name", ["gla", "gated_delta"])
def test_unobserved_kernel_program_is_the_bare_kernel(name, impl):
  bare, op, args = _bare_kernel(name, impl)
  j_op, j_bare = jax.make_jaxpr(op)(*args), jax.make_jaxpr(bare)(*args)
  assert _pallas_calls(j_op.jaxpr) == 1
  assert str(j_op) == str(j_bare)
  # observed, the same kernel still runs (the recomputation adds XLA ops, no kernel)
  rec = analysis.Recorder()
  rec._traced = True  # pylint: disable=protected-access  # maps stay tracers, as in capture

  def observed(*a):
    with rec.active():
      return op(*a)

  assert _pallas_calls(jax.make_jaxpr(observed)(*args).jaxpr) == 1


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_unobserved_kernel_export_holds_the_custom_call(platform, monkeypatch):
  """Exported for the kernel's platform (native, not interpret mode: the kernels pick
  interpret mode from ``jax.default_backend()``), the jitted public op is the kernel's
  custom call."""
  impl = "pallas_tpu" if platform == "tpu" else "pallas_gpu"
  _, op, args = _bare_kernel("gla", impl)
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu" if platform == "tpu" else "gpu")
  checks = [] if platform == "tpu" else [
      jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  text = jax.export.export(jax.jit(op), platforms=[platform],
                           disabled_checks=checks)(*args).mlir_module()
  assert ("tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton") in text
