"""Benchmark: attnjax Pallas flash kernels vs jax.nn.dot_product_attention (TFLOP/s, % of peak).

On a TPU or GPU host this times, forward and forward+backward, for a few mask families:

* ``attnjax``: ``attnjax.attention(..., implementation='pallas')`` (the block-sparse kernel);
* ``xla_chunked``: attnjax's blockwise XLA path;
* ``jax.nn``: ``jax.nn.dot_product_attention`` with ``implementation='cudnn'`` on GPU (when
  it accepts the call) or the XLA default (dense; masks given as boolean arrays);
* ``splash`` (TPU only): ``jax.experimental.pallas.ops.tpu.splash_attention`` for causal.

TFLOP/s count only the *allowed* score entries (``4 * B * N * H * nnz`` forward, 2.5x
that for forward+backward), so block sparsity shows up as time saved, not as
inflated FLOPs.  ``--peak`` (TFLOP/s) sets the denominator of "% of peak"
(default: a table by device kind, bf16 dense).

Usage::

    python benchmarks/attention_gpu_tpu.py                   # on TPU/GPU
    python benchmarks/attention_gpu_tpu.py --smoke           # CPU: tiny, interpret mode
    python benchmarks/attention_gpu_tpu.py --seq 8192 --heads 16 --kv-heads 4 --json out.json

The ``--smoke`` run executes the kernel in Pallas interpret mode on a tiny problem and
checks it against the reference; its timings are meaningless.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import attnjax
from attnjax import masks

_PEAKS = {  # bf16 dense TFLOP/s per device
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0,
    "NVIDIA A100": 312.0, "NVIDIA H100": 989.0, "NVIDIA H200": 989.0,
}


def _peak(device, override):
  if override:
    return override
  kind = device.device_kind
  for name, val in _PEAKS.items():
    if kind.startswith(name) or name in kind:
      return val
  return float("nan")


def _mask_families(T, window):
  return {
      "full": masks.full(),
      "causal": masks.causal(),
      f"sliding({window})": masks.sliding_window(window),
  }


def _time(fn, *args, iters):
  out = fn(*args)
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(iters):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / iters


def _nnz(mask, T, S):
  if T * S <= (1 << 26):
    return int(np.asarray(mask.to_array(T, S)).sum())
  table = mask.block_table(T, S, 128, 128)
  return int(((table == 2).sum() + 0.5 * (table == 1).sum()) * 128 * 128)


def run(args):
  backend = jax.default_backend()
  smoke = args.smoke
  if smoke:
    B, T, N, K, H = 1, 128, 2, 1, 64
    impl = "pallas_tpu" if args.kernel == "tpu" else "pallas_gpu"
    iters = 1
  else:
    B, T, N, K, H = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    impl = "pallas"
    iters = args.iters
  dtype = jnp.dtype(args.dtype)
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
  k = jnp.asarray(rng.standard_normal((B, T, K, H)), dtype)
  v = jnp.asarray(rng.standard_normal((B, T, K, H)), dtype)
  dev = jax.devices()[0]
  peak = _peak(dev, args.peak)
  rows = []

  for mname, mask in _mask_families(T, max(16, T // 8)).items():
    nnz = _nnz(mask, T, T)
    flops_f = 4.0 * B * N * H * nnz
    cands = {
        "attnjax": lambda q, k, v, m=mask: attnjax.attention(q, k, v, mask=m, implementation=impl),
        "xla_chunked": lambda q, k, v, m=mask: attnjax.attention(q, k, v, mask=m,
                                                                 implementation="xla_chunked"),
    }
    if not smoke:
      dense = jnp.asarray(np.asarray(mask.to_array(T, T)))[None, None] if mname != "full" else None
      nn_impl = "cudnn" if backend == "gpu" else None

      def nn(q, k, v, dense=dense, nn_impl=nn_impl):
        kr = jnp.repeat(k, N // K, axis=2)
        vr = jnp.repeat(v, N // K, axis=2)
        return jax.nn.dot_product_attention(q, kr, vr, mask=dense, implementation=nn_impl)
      cands["jax.nn"] = nn
      if backend == "tpu" and mname == "causal":
        cands["splash"] = _splash_causal(T, N, K)
    for name, fn in cands.items():
      if fn is None:
        continue
      fwd = jax.jit(fn)
      bwd = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32)),
                             argnums=(0, 1, 2)))
      try:
        tf = _time(fwd, q, k, v, iters=iters)
        tb = _time(bwd, q, k, v, iters=iters)
      except Exception as e:  # an implementation that cannot serve this call
        rows.append(dict(mask=mname, impl=name, error=f"{type(e).__name__}: {e}"[:200]))
        continue
      rows.append(dict(mask=mname, impl=name, fwd_ms=1e3 * tf, fwdbwd_ms=1e3 * (tf + tb),
                       fwd_tflops=flops_f / tf / 1e12,
                       fwdbwd_tflops=3.5 * flops_f / (tf + tb) / 1e12))
    if smoke:
      want = attnjax.reference_attention(q, k, v, mask=mask)
      got = jax.jit(cands["attnjax"])(q, k, v)
      err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
      tol = 2e-5 if dtype == jnp.float32 else 2e-2
      if not err <= tol:
        raise SystemExit(f"smoke check failed for {mname}: max error {err} > {tol}")
      rows.append(dict(mask=mname, impl="check", max_abs_err=err))

  print(f"device: {dev.device_kind} ({backend}), B={B} T={T} N={N} K={K} H={H} {dtype}, "
        f"peak={peak} TFLOP/s"
        + ("  [smoke: interpret mode, timings meaningless]" if smoke else ""))
  print(f"{'mask':<16}{'impl':<14}{'fwd ms':>10}{'fwd TF/s':>10}{'%peak':>7}"
        f"{'f+b ms':>10}{'f+b TF/s':>10}{'%peak':>7}")
  for r in rows:
    if "error" in r:
      print(f"{r['mask']:<16}{r['impl']:<14}  n/a: {r['error']}")
    elif "fwd_ms" in r:
      print(f"{r['mask']:<16}{r['impl']:<14}{r['fwd_ms']:>10.3f}{r['fwd_tflops']:>10.2f}"
            f"{100 * r['fwd_tflops'] / peak:>7.1f}{r['fwdbwd_ms']:>10.3f}"
            f"{r['fwdbwd_tflops']:>10.2f}{100 * r['fwdbwd_tflops'] / peak:>7.1f}")
    else:
      print(f"{r['mask']:<16}{r['impl']:<14}  max |kernel - reference| = {r['max_abs_err']:.2e}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=dev.device_kind, backend=backend, B=B, T=T, N=N, K=K, H=H,
                     dtype=str(dtype), peak=peak, rows=rows), f, indent=1)
  return rows


def _splash_causal(T, N, K):
  try:
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  except ImportError:
    return None
  mask = sm.MultiHeadMask([sm.CausalMask((T, T)) for _ in range(N)])
  kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1)

  def fn(q, k, v):
    scale = 1.0 / np.sqrt(q.shape[-1])
    qt = (q * scale).transpose(0, 2, 1, 3)
    kt = jnp.repeat(k, N // K, axis=2).transpose(0, 2, 1, 3)
    vt = jnp.repeat(v, N // K, axis=2).transpose(0, 2, 1, 3)
    return jax.vmap(kernel)(qt, kt, vt).transpose(0, 2, 1, 3)
  return fn


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--smoke", action="store_true", help="tiny CPU run in interpret mode")
  p.add_argument("--kernel", choices=["tpu", "gpu"], default="tpu",
                 help="which kernel the smoke run interprets")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--kv-heads", type=int, default=16)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--peak", type=float, default=None, help="peak TFLOP/s for %% of peak")
  p.add_argument("--json", default=None, help="write the rows as JSON here")
  args = p.parse_args(argv)
  if args.smoke and args.dtype == "bfloat16":
    args.dtype = "float32"
  return run(args)


if __name__ == "__main__":
  main(sys.argv[1:])
