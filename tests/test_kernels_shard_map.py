"""The Pallas kernels inside ``jax.shard_map`` (heads split over a mesh axis).

Model-parallel code calls the kernels inside ``shard_map``; with ``check_vma=True`` (the
default) every array's type says over which mesh axes it varies, a ``pallas_call``'s
outputs must say it too, and the gradient of an input that is replicated over an axis
the data is split over must be summed over that axis (``psum``), once per call.

Checked on CPU on a one-device mesh ``make_mesh((1,), ('h',))`` with heads split
(``P(None, None, 'h')``):

1. lowering for ``tpu`` and ``cuda`` with ``check_vma=True``, forward and ``jax.grad``
   (flash: GQA, sinks, a head-split bias, a replicated learnable relative-position
   table, segment ids, softcap; linear: a replicated log-decay): the kernels are the
   ones lowered and the replicated input's gradient holds exactly one all-reduce;
2. interpret mode against the plain call, forward and ``jax.vjp``, under
   ``check_vma=False``: JAX's Pallas interpreter itself cannot evaluate a kernel on
   mesh-varying blocks (it binds ``dynamic_slice`` on varying blocks with invariant
   grid indices and fails), so numerics under ``shard_map`` are checked there without
   the type check, and the typed path is checked by lowering (1).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from attnjax import masks, score_mods
from attnjax.kernels import gpu, tpu
from attnjax.kernels.gpu import linear as gpu_linear
from attnjax.kernels.tpu import linear as tpu_linear

_TRITON = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
B, T, S, N, K, H = 2, 16, 40, 4, 2, 8
HEADS = P(None, None, "h")
# q, k, v, bias, sinks, table, q_segment_ids, kv_segment_ids
FLASH_SPECS = (HEADS, HEADS, HEADS, P(None, "h"), P("h"), P(), P(), P())
FLASH = {"tpu": tpu.flash_attention, "gpu": gpu.flash_attention}
LINEAR = {"tpu": tpu_linear.lightning_attention, "gpu": gpu_linear.lightning_attention}
PLATFORM = {"tpu": "tpu", "gpu": "cuda"}


def _mesh():
  return jax.make_mesh((1,), ("h",))


def _flash_inputs(seed):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  seg_q = jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), axis=1), jnp.int32)
  seg_k = jnp.asarray(np.sort(rng.integers(0, 3, (B, S)), axis=1), jnp.int32)
  return (f(B, T, N, H), f(B, S, K, H), f(B, S, K, H), f(B, N, T, S), f(N), f(N, 2 * S - 1),
          seg_q, seg_k)


def _flash_fn(backend, interpret):
  kern = FLASH[backend]

  def call(q, k, v, bias, sinks, table, seg_q, seg_k):
    return kern(q, k, v, mask=masks.causal(offset=S - T), bias=bias, sinks=sinks,
                softcap=20.0, score_mod=score_mods.relative_position_bias(table),
                q_segment_ids=seg_q, kv_segment_ids=seg_k, interpret=interpret)
  return call


def _lowered_text(fn, args, specs, platform):
  mesh = _mesh()
  typed = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, s))
           for a, s in zip(args, specs)]
  f = jax.jit(fn)
  try:
    exp = jax.export.export(f, platforms=[platform], disabled_checks=_TRITON)(*typed)
    return exp.mlir_module()
  except ValueError as e:
    # jax.export of a shard_map'd grad can fail in its own bookkeeping of hoisted
    # constants ("Too many leaves for PyTreeDef"); the lowering itself is what we check.
    if "Too many leaves" not in str(e):
      raise
    return f.trace(*typed).lower(lowering_platforms=(platform,)).as_text()


def _check_matches_plain_call(call, args, specs, n_diff, ct):
  """Forward and ``jax.vjp`` (first ``n_diff`` args) of ``call`` under ``shard_map``
  (``check_vma=False``, see the module docstring) equal the plain call's."""
  mesh = _mesh()
  sharded = jax.shard_map(call, mesh=mesh, in_specs=specs, out_specs=HEADS, check_vma=False)
  placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]

  def fwd_vjp(fn, *a):
    out, vjp = jax.vjp(lambda *d: fn(*d, *a[n_diff:]), *a[:n_diff])
    return out, vjp(ct)

  out_s, g_s = jax.jit(lambda *a: fwd_vjp(sharded, *a))(*placed)
  out_p, g_p = jax.jit(lambda *a: fwd_vjp(call, *a))(*args)
  np.testing.assert_allclose(out_s, out_p, rtol=1e-5, atol=1e-5)
  for i, (x, y) in enumerate(zip(g_s, g_p)):
    assert float(jnp.abs(y).max()) > 0, i
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5, err_msg=f"gradient {i}")


def _kernel_calls(text, platform):
  if platform == "tpu":
    return len(re.findall(r"tpu_custom_call", text))
  return len(re.findall(r"__gpu\$xla\.gpu\.triton", text))


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_flash_lowers_inside_shard_map_with_vma_check(backend):
  args = _flash_inputs(0)
  call = _flash_fn(backend, interpret=False)
  sharded = jax.shard_map(call, mesh=_mesh(), in_specs=FLASH_SPECS, out_specs=HEADS)
  platform = PLATFORM[backend]

  text = _lowered_text(sharded, args, FLASH_SPECS, platform)
  assert _kernel_calls(text, platform) >= 1
  assert "all_reduce" not in text                     # the forward needs no collective

  def loss(*a):
    return jnp.sum(sharded(*a) ** 2)
  grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))
  text = _lowered_text(grad, args, FLASH_SPECS, platform)
  assert _kernel_calls(text, platform) >= 3           # forward, dq, dk/dv
  # Only the replicated table's gradient is summed over 'h', once (not per tile).
  assert len(re.findall(r"stablehlo\.all_reduce", text)) == 1, text.count("all_reduce")


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_flash_interpret_inside_shard_map_matches_plain_call(backend):
  ct = jnp.asarray(np.random.default_rng(2).standard_normal((B, T, N, H)), jnp.float32)
  _check_matches_plain_call(_flash_fn(backend, interpret=True), _flash_inputs(1),
                            FLASH_SPECS, 6, ct)


def _linear_inputs(seed, Tl=24, F=16, V=16):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32) * 0.5
  return f(B, Tl, N, F), f(B, Tl, K, F), f(B, Tl, K, V), jnp.log(jnp.linspace(0.6, 0.95, N))


LINEAR_SPECS = (HEADS, HEADS, HEADS, P())         # a log-decay shared by every device


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_linear_lowers_inside_shard_map_with_vma_check(backend):
  args = _linear_inputs(3)
  kern = LINEAR[backend]
  call = lambda q, k, v, ld: kern(q, k, v, ld, chunk_size=16, interpret=False)
  sharded = jax.shard_map(call, mesh=_mesh(), in_specs=LINEAR_SPECS, out_specs=HEADS)
  platform = PLATFORM[backend]
  text = _lowered_text(sharded, args, LINEAR_SPECS, platform)
  assert _kernel_calls(text, platform) >= 1
  grad = jax.grad(lambda *a: jnp.sum(sharded(*a) ** 2), argnums=(0, 1, 2, 3))
  text = _lowered_text(grad, args, LINEAR_SPECS, platform)
  assert _kernel_calls(text, platform) >= 2
  assert len(re.findall(r"stablehlo\.all_reduce", text)) == 1   # d log_decay, once


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_linear_interpret_inside_shard_map_matches_plain_call(backend):
  kern = LINEAR[backend]
  call = lambda q, k, v, ld: kern(q, k, v, ld, chunk_size=16, interpret=True)
  ct = jnp.asarray(np.random.default_rng(5).standard_normal((B, 24, N, 16)), jnp.float32)
  _check_matches_plain_call(call, _linear_inputs(4), LINEAR_SPECS, 4, ct)
