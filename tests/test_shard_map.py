"""attnjax.attention inside `jax.shard_map` (the way model-parallel code calls it).

`shard_map` type-checks loop carries against the mesh axes their values vary over, so a
loop whose initial carry is a constant fails there unless the library marks it varying.
These tests run each implementation under `shard_map` on a one-device mesh (the check is
the same on any mesh size) with heads split over the mesh axis, and compare forward and
vjp with the plain call.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import attnjax
from attnjax import masks, score_mods
from attnjax.cpu import build

IMPLS = ["reference", "xla", "xla_chunked"]


def _inputs(rng, B=2, T=40, S=48, N=4, K=2, H=16):
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  seg_q = np.sort(rng.integers(0, 3, (B, T)), axis=1).astype(np.int32)
  seg_k = np.sort(rng.integers(0, 3, (B, S)), axis=1).astype(np.int32)
  return dict(q=f(B, T, N, H), k=f(B, S, K, H), v=f(B, S, K, H), bias=f(B, N, T, S),
              sinks=f(N), seg_q=jnp.asarray(seg_q), seg_k=jnp.asarray(seg_k))


CASES = {
    "plain": dict(),
    "causal_bias_sinks": dict(mask=masks.causal(), use_bias=True, use_sinks=True),
    "segments_alibi": dict(use_seg=True, score_mod=score_mods.alibi(score_mods.alibi_slopes(4))),
    "window_softcap": dict(mask=masks.sliding_window(8, 4), softcap=20.0),
    "causal_sinks": dict(mask=masks.causal(), use_sinks=True),
}
# 'cpu_flash' (C++ custom call) serves band masks and sinks only.
CPU_FLASH_CASES = ("plain", "causal_sinks")
PARAMS = ([(i, c) for i in IMPLS for c in sorted(CASES)]
          + [("cpu_flash", c) for c in CPU_FLASH_CASES])


@pytest.mark.parametrize("impl,case", PARAMS)
def test_attention_under_shard_map_matches_plain_call(impl, case):
  cfg = CASES[case]
  rng = np.random.default_rng(abs(hash((impl, case))) % 2**31)
  x = _inputs(rng)
  mesh = jax.make_mesh((1,), ("h",))
  heads = P(None, None, "h")

  def call(q, k, v, bias, sinks, seg_q, seg_k):
    return attnjax.attention(
        q, k, v, mask=cfg.get("mask"), score_mod=cfg.get("score_mod"),
        bias=bias if cfg.get("use_bias") else None,
        sinks=sinks if cfg.get("use_sinks") else None,
        q_segment_ids=seg_q if cfg.get("use_seg") else None,
        kv_segment_ids=seg_k if cfg.get("use_seg") else None,
        softcap=cfg.get("softcap"), implementation=impl,
        block_sizes=attnjax.ChunkedBlockSizes(8, 16) if impl == "xla_chunked" else None)

  in_specs = (heads, heads, heads, P(None, "h"), P("h"), P(), P())
  sharded = jax.shard_map(call, mesh=mesh, in_specs=in_specs, out_specs=heads)
  args = (x["q"], x["k"], x["v"], x["bias"], x["sinks"], x["seg_q"], x["seg_k"])
  placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, in_specs)]
  diff = (0, 1, 2, 3, 4)
  ct = jnp.asarray(rng.standard_normal(x["q"].shape), jnp.float32)

  def fwd_vjp(fn, *a):
    out, vjp = jax.vjp(lambda *d: fn(*d, a[5], a[6]), *a[:5])
    return out, vjp(ct)

  out_s, grads_s = jax.jit(lambda *a: fwd_vjp(sharded, *a))(*placed)
  out_p, grads_p = jax.jit(lambda *a: fwd_vjp(call, *a))(*args)
  np.testing.assert_allclose(out_s, out_p, rtol=1e-5, atol=1e-5)
  for i in diff:
    np.testing.assert_allclose(grads_s[i], grads_p[i], rtol=1e-5, atol=1e-5,
                               err_msg=f"gradient {i}")
  # The plain call itself is right (guards against both sides being wrong alike).
  ref = attnjax.reference_attention(
      x["q"], x["k"], x["v"], mask=cfg.get("mask"), score_mod=cfg.get("score_mod"),
      bias=x["bias"] if cfg.get("use_bias") else None,
      sinks=x["sinks"] if cfg.get("use_sinks") else None,
      q_segment_ids=x["seg_q"] if cfg.get("use_seg") else None,
      kv_segment_ids=x["seg_k"] if cfg.get("use_seg") else None, softcap=cfg.get("softcap"))
  np.testing.assert_allclose(out_p, ref, rtol=1e-5, atol=1e-5)


_TWO_DEVICE_SCRIPT = r"""
import os
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2")
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import attnjax
from attnjax import masks, score_mods

rng = np.random.default_rng(7)
B, T, N, K, H = 2, 40, 4, 2, 16
f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
q, k, v, table = f(B, T, N, H), f(B, T, K, H), f(B, T, K, H), f(N, 9)
tau = jnp.asarray(1.3, jnp.float32)
ct = f(B, T, N, H)

def call(q, k, v, table, tau):
  mod = score_mods.compose(score_mods.relative_position_bias(table), score_mods.temperature(tau))
  return attnjax.attention(q, k, v, mask=masks.causal(), score_mod=mod,
                           implementation="xla_chunked",
                           block_sizes=attnjax.ChunkedBlockSizes(8, 16))

mesh = jax.make_mesh((2,), ("h",))
heads = P(None, None, "h")
specs = (heads, heads, heads, P("h", None), P())
sharded = jax.shard_map(call, mesh=mesh, in_specs=specs, out_specs=heads)
args = (q, k, v, table, tau)
placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]

def fwd_vjp(fn, *a):
  out, vjp = jax.vjp(fn, *a)
  return out, vjp(ct)

out_s, g_s = jax.jit(lambda *a: fwd_vjp(sharded, *a))(*placed)
out_p, g_p = jax.jit(lambda *a: fwd_vjp(call, *a))(*args)
np.testing.assert_allclose(out_s, out_p, rtol=1e-5, atol=1e-5)
for i, (a, b) in enumerate(zip(g_s, g_p)):
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"gradient {i}")
assert float(jnp.abs(g_p[3]).max()) > 0 and float(jnp.abs(g_p[4])) > 0
print("OK")
"""


def test_two_devices_heads_split_with_replicated_parameter_gradient():
  """Heads split over 2 host devices: a head-sharded relative-position table and a
  replicated temperature, whose gradient is the sum of both devices' contributions."""
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-c", _TWO_DEVICE_SCRIPT], capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith("OK")


_SHARDED_JIT_SCRIPT = r"""
import os
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2")
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import attnjax
from attnjax import masks

rng = np.random.default_rng(11)
B, T, N, K, H = 4, 72, 4, 2, 32
f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
q, k, v, ct = f(B, T, N, H), f(B, T, K, H), f(B, T, K, H), f(B, T, N, H)
mesh = jax.make_mesh((2,), ("data",))
batch = NamedSharding(mesh, P("data"))

def fwd_vjp(impl, q, k, v):
  fn = lambda q, k, v: attnjax.attention(q, k, v, mask=masks.causal(), implementation=impl)
  out, vjp = jax.vjp(fn, q, k, v)
  return out, vjp(ct)

placed = [jax.device_put(a, batch) for a in (q, k, v)]
lowered = jax.jit(lambda *a: fwd_vjp("auto", *a)).lower(*placed).as_text()
assert "attnjax_flash_fwd" in lowered and "attnjax_flash_bwd" in lowered
out_s, g_s = jax.jit(lambda *a: fwd_vjp("auto", *a))(*placed)
out_r, g_r = jax.jit(lambda *a: fwd_vjp("reference", *a))(q, k, v)
np.testing.assert_allclose(out_s, out_r, rtol=1e-5, atol=1e-5)
for i, (a, b) in enumerate(zip(g_s, g_r)):
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"gradient {i}")
print("OK")
"""


@pytest.mark.skipif(build.unavailable_reason() is not None and not os.environ.get("CI"),
                    reason="cpu_flash unavailable on this machine (CI must build it)")
def test_cpu_flash_under_batch_sharded_jit():
  """'auto' picks the cpu_flash custom call for a batch-sharded jit on 2 host devices
  (XLA gathers its operands); forward and vjp match the reference."""
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-c", _SHARDED_JIT_SCRIPT], capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith("OK")
