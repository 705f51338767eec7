"""The implementation registry (softmax and linear families), its refusals, block sizes
per implementation, named scopes and logging, callable masks and traced scales."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOLERANCES

import attnjax
from attnjax import masks
from attnjax.core import Unsupported
from attnjax.cpu import flash as cpu_flash
from attnjax.dispatch import registry
from attnjax.ops import linear as L
from attnjax.ops.linear import _args as linear_args
from attnjax.ops.linear import _core as linear_core

F32 = jnp.float32
PALLAS_INTERPRET = "pallas_tpu"   # the Pallas implementation run (interpret mode) on CPU


def rnd(seed, shape, dtype=F32):
  x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
  return jnp.asarray(x, dtype)


def qkv(seed, T=32, S=32, N=2, K=1, H=32, dtype=F32):
  return rnd(seed, (1, T, N, H), dtype), rnd(seed + 1, (1, S, K, H), dtype), \
      rnd(seed + 2, (1, S, K, H), dtype)


def close(x, y, dtype=F32, what=""):
  x = np.asarray(jnp.asarray(x, F32))
  y = np.asarray(jnp.asarray(y, F32))
  assert x.shape == y.shape and np.all(np.isfinite(x)), what
  t = TOLERANCES[np.dtype(dtype)]
  scale = max(1.0, float(np.max(np.abs(y))))
  np.testing.assert_allclose(x, y, atol=t["atol"] * scale, rtol=t["rtol"], err_msg=what)


def cpu_kernel_builds():
  return jax.default_backend() == "cpu" and cpu_flash.available()


@pytest.fixture
def spy(monkeypatch):
  """Wraps the softmax implementations: records ``(name, config)`` of each run."""
  calls = []
  for (family, name), impl in list(registry.REGISTRY.items()):
    if family != "softmax":
      continue

    def run(q, k, v, a, *, return_lse, block_sizes, _impl=impl):
      calls.append((_impl.name, block_sizes))
      return _impl.run(q, k, v, a, return_lse=return_lse, block_sizes=block_sizes)
    monkeypatch.setitem(registry.REGISTRY, (family, name), dataclasses.replace(impl, run=run))
  return calls


@pytest.fixture(autouse=True)
def fresh_log_state():
  registry.reset_log_state()
  yield
  registry.reset_log_state()


# ================================================================================ registry


def test_registry_lists_both_families():
  soft = attnjax.dispatch.implementations("softmax")
  lin = attnjax.dispatch.implementations("linear")
  assert tuple(i.name for i in soft) == attnjax.IMPLEMENTATIONS == attnjax.dispatch.IMPLEMENTATIONS
  assert {"reference", "xla", "xla_chunked", "cpu_flash", "pallas_tpu", "pallas_gpu"} <= \
      set(attnjax.IMPLEMENTATIONS)
  assert tuple(i.name for i in lin) == ("xla", "pallas_tpu", "pallas_gpu")
  assert all(i.family == "softmax" for i in soft) and all(i.family == "linear" for i in lin)
  assert registry.get("xla_chunked").config_cls == (attnjax.ChunkedBlockSizes,)
  assert registry.get("cpu_flash").config_cls == (attnjax.CpuFlashBlockSizes,)
  assert registry.get("xla").config_cls == ()
  assert registry.get("cpu_flash").platforms == ("cpu",)
  with pytest.raises(ValueError, match="family"):
    attnjax.dispatch.implementations("quadratic")
  with pytest.raises(ValueError, match="xla_chunked"):
    registry.get("xla_chunk")


def test_auto_candidates_per_family_and_backend():
  a = attnjax.ops.dense.check_attention_args(*qkv(1, T=64, S=64))
  assert registry.auto_candidates(a, "tpu")[0] == "pallas_tpu"
  assert registry.auto_candidates(a, "gpu")[0] == "pallas_gpu"
  assert registry.auto_candidates(a, "cpu") == ("cpu_flash", "xla_chunked", "xla")
  small = attnjax.ops.dense.check_attention_args(*qkv(1, T=8, S=8))
  assert registry.auto_candidates(small, "cpu")[0] == "xla"
  assert registry.auto_candidates(None, "tpu", "linear") == ("pallas_tpu", "xla")
  assert registry.auto_candidates(None, "cuda", "linear") == ("pallas_gpu", "xla")
  assert registry.auto_candidates(None, "cpu", "linear") == ("xla",)


def test_supports_is_checked_before_running(spy):
  q, k, v = qkv(2, T=64, S=64)
  bias = rnd(5, (1, 1, 64, 64))
  reason = registry.get("cpu_flash").supports(
      attnjax.ops.dense.check_attention_args(q, k, v, bias=bias))
  assert reason is not None and "bias" in reason
  out = attnjax.attention(q, k, v, bias=bias, implementation=("cpu_flash", "xla_chunked"))
  close(out, attnjax.reference_attention(q, k, v, bias=bias))
  assert [n for n, _ in spy] == ["xla_chunked"]     # cpu_flash never ran


def test_falls_through_only_on_refusals(monkeypatch):
  q, k, v = qkv(3)
  want = attnjax.reference_attention(q, k, v)
  impl = registry.REGISTRY[("softmax", "xla_chunked")]

  def refuse(*args, **kwargs):
    raise Unsupported("planned refusal (test)")

  def jax_error(*args, **kwargs):
    raise NotImplementedError("raised inside JAX (test)")

  monkeypatch.setitem(registry.REGISTRY, ("softmax", "xla_chunked"),
                      dataclasses.replace(impl, run=refuse))
  close(attnjax.attention(q, k, v, implementation=("xla_chunked", "xla")), want)
  with pytest.raises(Unsupported, match="xla_chunked: planned refusal"):
    attnjax.attention(q, k, v, implementation="xla_chunked")
  monkeypatch.setitem(registry.REGISTRY, ("softmax", "xla_chunked"),
                      dataclasses.replace(impl, run=jax_error))
  with pytest.raises(NotImplementedError, match="raised inside JAX") as info:
    attnjax.attention(q, k, v, implementation=("xla_chunked", "xla"))
  assert not isinstance(info.value, Unsupported)
  assert issubclass(Unsupported, NotImplementedError)


def test_error_lists_every_candidate():
  q, k, v = qkv(4, H=24)
  with pytest.raises(Unsupported) as info:
    attnjax.attention(q, k, v, score_mod=lambda s, b, h, i, j: s,
                      implementation=("cpu_flash", "pallas"))
  msg = str(info.value)
  assert "cpu_flash:" in msg and "pallas:" in msg and "score_mod" in msg


# ============================================================================ block sizes


def test_typed_block_sizes_routed_to_their_implementation(spy):
  q, k, v = qkv(5, T=64, S=64)
  cbs = attnjax.ChunkedBlockSizes(block_q=8, block_k=16)
  want = attnjax.reference_attention(q, k, v)
  bias = rnd(6, (1, 1, 1, 64))      # cpu_flash refuses a bias: xla_chunked serves
  close(attnjax.attention(q, k, v, bias=bias, implementation=("cpu_flash", "xla_chunked"),
                          block_sizes=cbs),
        attnjax.reference_attention(q, k, v, bias=bias))
  assert spy == [("xla_chunked", cbs)]
  if cpu_kernel_builds():
    close(attnjax.attention(q, k, v, implementation=("cpu_flash", "xla_chunked"),
                            block_sizes=cbs), want)
    assert spy[-1] == ("cpu_flash", None)       # another implementation's type: defaults
  fbs = attnjax.CpuFlashBlockSizes(block_q=16, block_k=32)
  close(attnjax.attention(q, k, v, implementation=("xla_chunked",), block_sizes=fbs), want)
  assert spy[-1] == ("xla_chunked", None)


def test_dict_block_sizes(spy):
  q, k, v = qkv(7, T=64, S=64)
  cbs = attnjax.ChunkedBlockSizes(block_q=16, block_k=32)
  fbs = attnjax.CpuFlashBlockSizes(block_q=16, block_k=32)
  want = attnjax.reference_attention(q, k, v, mask=masks.causal())
  out = attnjax.attention(q, k, v, mask=masks.causal(), implementation=("cpu_flash", "xla_chunked"),
                          block_sizes={"cpu_flash": fbs, "xla_chunked": cbs})
  close(out, want)
  assert spy[-1] == (("cpu_flash", fbs) if cpu_kernel_builds() else ("xla_chunked", cbs))
  close(attnjax.attention(q, k, v, mask=masks.causal(), implementation="xla_chunked",
                          block_sizes={"xla_chunked": cbs}), want)
  assert spy[-1] == ("xla_chunked", cbs)


def test_block_sizes_errors():
  q, k, v = qkv(8)
  cbs = attnjax.ChunkedBlockSizes(8, 16)
  with pytest.raises(TypeError, match="'cpu_flash' must be CpuFlashBlockSizes"):
    attnjax.attention(q, k, v, implementation="cpu_flash", block_sizes=cbs)
  with pytest.raises(TypeError, match="'xla' must be no block_sizes"):
    attnjax.attention(q, k, v, implementation="xla", block_sizes=cbs)
  with pytest.raises(TypeError, match=r"block_sizes\['xla_chunked'\] must be ChunkedBlockSizes"):
    attnjax.attention(q, k, v, block_sizes={"xla_chunked": attnjax.CpuFlashBlockSizes()})
  with pytest.raises(ValueError, match="did you mean 'xla_chunked'"):
    attnjax.attention(q, k, v, block_sizes={"xla_chunk": cbs})
  with pytest.raises(TypeError, match="config classes"):
    attnjax.attention(q, k, v, block_sizes=(8, 16))
  with pytest.raises(TypeError, match="ChunkedBlockSizes"):
    attnjax.ops.chunked.chunked_attention(q, k, v, attnjax.ops.dense.check_attention_args(q, k, v),
                                          block_sizes=attnjax.CpuFlashBlockSizes())


# ===================================================================== named scope, logging


@pytest.mark.parametrize("impl", ["xla", "xla_chunked", "cpu_flash"])
def test_named_scope_in_lowered_text(impl):
  if impl == "cpu_flash" and not cpu_kernel_builds():
    pytest.skip("the CPU kernel is not built on this machine")
  q, k, v = qkv(9)
  text = jax.jit(lambda q, k, v: attnjax.attention(q, k, v, implementation=impl)).lower(
      q, k, v).as_text(debug_info=True)
  assert f"attnjax/{impl}" in text
  other = {"xla": "attnjax/xla_chunked", "xla_chunked": "attnjax/cpu_flash",
           "cpu_flash": "attnjax/xla_chunked"}[impl]
  assert other not in text


def test_named_scope_linear():
  q, k, v = qkv(10, N=2, K=2, H=16)
  text = jax.jit(lambda q, k, v: L.linear_attention(q, k, v, causal=True)).lower(
      q, k, v).as_text(debug_info=True)
  assert "attnjax/xla" in text and "attnjax/pallas" not in text


def test_logs_choice_once_per_signature(caplog):
  caplog.set_level(logging.DEBUG, logger="attnjax")
  q, k, v = qkv(11, T=64, S=64)
  bias = rnd(12, (1, 1, 64, 64))
  attnjax.attention(q, k, v, bias=bias, implementation=("cpu_flash", "xla_chunked"))
  recs = [r for r in caplog.records if r.name == "attnjax"]
  assert len(recs) == 1 and recs[0].levelno == logging.DEBUG
  assert "ran 'xla_chunked'" in recs[0].getMessage()
  assert "cpu_flash: 'cpu_flash' does not support bias" in recs[0].getMessage()
  attnjax.attention(q, k, v, bias=bias * 2, implementation=("cpu_flash", "xla_chunked"))
  assert len([r for r in caplog.records if r.name == "attnjax"]) == 1
  attnjax.attention(q[:, :32], k, v, bias=bias[:, :, :32],
                    implementation=("cpu_flash", "xla_chunked"))
  assert len([r for r in caplog.records if r.name == "attnjax"]) == 2


def test_unbuildable_cpu_kernel_is_a_logged_fallback(caplog, monkeypatch):
  """The dispatcher records the build failure as cpu_flash's fallback reason (DEBUG, once
  per call signature) and adds no WARNING of its own: the once-per-process WARNING is the
  build's (tests/test_cpu_flash.py::test_missing_compiler_warns_once_and_auto_falls_back)."""
  if jax.default_backend() != "cpu":
    pytest.skip("CPU backend only")
  from attnjax.cpu import build
  monkeypatch.setattr(build, "unavailable_reason", lambda: "no C++ compiler (test)")
  registry.reset_log_state()
  caplog.set_level(logging.DEBUG, logger="attnjax")
  q, k, v = qkv(13, T=64, S=64)
  for _ in range(2):
    close(attnjax.attention(q, k, v, mask=masks.causal()),
          attnjax.reference_attention(q, k, v, mask=masks.causal()))
  mine = [r for r in caplog.records if r.name == "attnjax"]
  assert len(mine) == 1 and mine[0].levelno == logging.DEBUG, [r.getMessage() for r in mine]
  assert "no C++ compiler (test)" in mine[0].getMessage()
  assert "ran 'xla_chunked'" in mine[0].getMessage()
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_linear_selection_logged(caplog):
  caplog.set_level(logging.DEBUG, logger="attnjax")
  q, k, v = qkv(14, N=2, K=2, H=16)
  L.decayed_linear_attention(q, k, v, log_decay=-jnp.abs(rnd(15, (1, 32, 2))),
                             implementation=("pallas_tpu", "xla"))
  msgs = [r.getMessage() for r in caplog.records if r.name == "attnjax"]
  assert len(msgs) == 1 and "ran 'xla'" in msgs[0] and "per-token" in msgs[0]


# ========================================================================= callable masks


def _pred(b, h, q_idx, kv_idx):
  return (kv_idx <= q_idx) & ((q_idx - kv_idx) % 3 != 1)


@pytest.mark.parametrize("impl", ["xla", "xla_chunked", ("cpu_flash", "xla_chunked"),
                                  PALLAS_INTERPRET])
def test_callable_mask(impl):
  H = 64 if impl == PALLAS_INTERPRET else 32
  q, k, v = qkv(16, H=H)
  want = attnjax.reference_attention(q, k, v, mask=masks.from_fn(_pred))
  got = attnjax.attention(q, k, v, mask=_pred, implementation=impl)
  close(got, want, what=str(impl))
  # The predicate really masks: the unmasked result differs.
  assert not np.allclose(np.asarray(got), np.asarray(attnjax.reference_attention(q, k, v)),
                         atol=1e-3)


def test_reference_accepts_callable_mask():
  q, k, v = qkv(17)
  causal = lambda b, h, i, j: j <= i
  close(attnjax.reference_attention(q, k, v, mask=causal),
        attnjax.reference_attention(q, k, v, mask=masks.causal()))


@pytest.mark.parametrize("bad", ["causal", 3, [[True]]])
def test_bad_mask_type(bad):
  q, k, v = qkv(18)
  with pytest.raises(TypeError, match="mask"):
    attnjax.attention(q, k, v, mask=bad)


# ============================================================================ traced scale


@pytest.mark.parametrize("impl", ["xla", "xla_chunked", "cpu_flash", PALLAS_INTERPRET])
def test_traced_scale_vjp(impl):
  if impl == "cpu_flash" and not cpu_kernel_builds():
    pytest.skip("the CPU kernel is not built on this machine")
  H = 64 if impl == PALLAS_INTERPRET else 32
  q, k, v = qkv(19, H=H)
  s = jnp.float32(0.37)
  ct = rnd(23, (1, 32, 2, H))
  mask = masks.causal()

  def f(q, k, v, s):
    return attnjax.attention(q, k, v, mask=mask, scale=s, implementation=impl)

  def g(q, k, v, s):
    return attnjax.reference_attention(q, k, v, mask=mask, scale=s)

  out, vjp_f = jax.vjp(jax.jit(f), q, k, v, s)
  want, vjp_g = jax.vjp(g, q, k, v, s)
  close(out, want, what="out")
  for name, x, y in zip(("dq", "dk", "dv", "dscale"), vjp_f(ct), vjp_g(ct)):
    close(x, y, what=name)
  # The traced scale is really used: another value changes the result.
  assert not np.allclose(np.asarray(f(q, k, v, jnp.float32(1.5))), np.asarray(out), atol=1e-3)


def test_reference_traced_scale_matches_float_and_finite_difference():
  q, k, v = qkv(20)
  ct = rnd(21, (1, 32, 2, 32))
  s0 = 0.3
  f = jax.jit(lambda s: jnp.vdot(ct, attnjax.reference_attention(q, k, v, scale=s)))
  close(attnjax.reference_attention(q, k, v, scale=jnp.float32(s0)),
        attnjax.reference_attention(q, k, v, scale=s0))
  def central(h):
    return (float(f(jnp.float32(s0 + h))) - float(f(jnp.float32(s0 - h)))) / (2 * h)
  fd = (4 * central(5e-3) - central(1e-2)) / 3     # Richardson: O(h^4) truncation error
  np.testing.assert_allclose(float(jax.grad(f)(jnp.float32(s0))), fd, rtol=5e-4)


def test_traced_scale_bf16():
  q, k, v = qkv(22, dtype=jnp.bfloat16)
  s = jnp.float32(0.2)
  close(jax.jit(lambda q, k, v, s: attnjax.attention(q, k, v, scale=s,
                                                     implementation="xla_chunked"))(q, k, v, s),
        attnjax.reference_attention(q, k, v, scale=s), jnp.bfloat16)


@pytest.mark.parametrize("bad, err, msg", [
    (jnp.ones((2,)), ValueError, "scale must be a scalar"),
    (jnp.int32(2), TypeError, "scale must have a floating dtype"),
    ("0.5", TypeError, "scale must be a float"),
    (jnp.float32(-1.0), ValueError, "scale must be positive"),
    (True, TypeError, "scale"),
])
def test_bad_scale(bad, err, msg):
  q, k, v = qkv(24)
  with pytest.raises(err, match=msg):
    attnjax.attention(q, k, v, scale=bad)


# ========================================================================= linear family


def _linear_call(causal=True, form="chunked", chunk_size=64, token_decay=False):
  q, k, v = qkv(25, N=2, K=2, H=16)
  a = linear_args.prepare(q, k, v, causal=causal, form=form, chunk_size=chunk_size,
                          implementation=None)
  return linear_core.LinearCall("test", a, causal, token_decay)


@pytest.mark.parametrize("backend, target", [("tpu", "pallas_tpu"), ("gpu", "pallas_gpu")])
def test_linear_auto_selection(monkeypatch, backend, target):
  monkeypatch.setattr(registry.jax, "default_backend", lambda: backend)
  assert registry.select_linear(_linear_call(), "auto") == target
  assert registry.select_linear(_linear_call(), None) == target
  assert registry.select_linear(_linear_call(token_decay=True), "auto") == "xla"
  assert registry.select_linear(_linear_call(form="recurrent"), "auto") == "xla"
  assert registry.select_linear(_linear_call(causal=False), "auto") == "xla"
  assert registry.select_linear(_linear_call(chunk_size=12), "auto") == "xla"
  with pytest.raises(Unsupported, match="per-token"):
    registry.select_linear(_linear_call(token_decay=True), target)


def test_linear_auto_on_cpu_is_xla():
  assert registry.select_linear(_linear_call(), "auto") == "xla"


def test_linear_fallback_matches_xla():
  q, k, v = qkv(26, N=2, K=2, H=16)
  ld = -jnp.abs(rnd(27, (1, 32, 2)))
  want = L.decayed_linear_attention(q, k, v, log_decay=ld, implementation="xla")
  close(L.decayed_linear_attention(q, k, v, log_decay=ld), want)
  close(L.decayed_linear_attention(q, k, v, log_decay=ld, implementation=("pallas_tpu", "xla")),
        want)
  with pytest.raises(NotImplementedError, match="per-token"):
    L.decayed_linear_attention(q, k, v, log_decay=ld, implementation="pallas_tpu")
  with pytest.raises(ValueError, match="implementation"):
    L.linear_attention(q, k, v, causal=True, implementation=("xla", "cuda"))
