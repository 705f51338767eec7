"""CPU attention benchmark: attnjax 'auto' vs jax.nn.dot_product_attention vs torch SDPA.

Runs every contender in this one process, interleaved: each round times every
contender once, and a contender's time is its best over the rounds (``--rounds``).
A shared machine whose speed drifts thus slows or speeds them all alike.  Writes
JSON (``--out``).

    python benchmarks/attention_cpu.py                 # S in {1024, 4096, 8192} + sparse cases
    python benchmarks/attention_cpu.py --quick         # small sizes, a smoke test
    python benchmarks/attention_cpu.py --memory 32768  # peak RSS of one fwd+bwd at S=32768
    python benchmarks/attention_cpu.py --devices 2     # + heads split over 2 host CPU devices

Columns: time (s), GFLOP/s (4 B N T S H for the forward, 3.5x that for fwd+bwd,
dense-equivalent), ratio to torch SDPA (lower is better; ``_vs_torch`` best over
best, ``_vs_torch_med`` the median of the same-round ratios), fraction of this
process's measured GEMM rate, and peak RSS growth of the process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import attnjax
from attnjax import masks


def timeit(fn, *args, reps=3):
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def gemm_rate(n=2048, dtype=jnp.float32):
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
  mm = jax.jit(lambda a, b: a @ b)
  return 2 * n ** 3 / timeit(mm, a, a, reps=5) / 1e9


def make(S, B=1, N=8, H=64, T=None, dtype=jnp.float32):
  T = T or S
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  return (jax.random.normal(ks[0], (B, T, N, H), dtype),
          jax.random.normal(ks[1], (B, S, N, H), dtype),
          jax.random.normal(ks[2], (B, S, N, H), dtype))


def fwd_bwd(fn):
  return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2)))


def torch_fns(B, N, S, H, causal=False, dtype="float32"):
  """Zero-argument torch SDPA calls (forward, forward+backward), or None without torch."""
  try:
    import torch
  except ImportError:
    return None
  torch.manual_seed(0)
  q, k, v = (torch.randn(B, N, S, H).to(getattr(torch, dtype)) for _ in range(3))
  f = torch.nn.functional.scaled_dot_product_attention
  qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

  def fwd():
    with torch.no_grad():
      f(q, k, v, is_causal=causal)

  def fb():
    f(qg, kg, vg, is_causal=causal).sum().backward()
  return fwd, fb


def interleaved_times(fns, rounds, pause=0.05):
  """{name: [seconds per call]} over `rounds` rounds, each of which times every
  contender once in turn (after one untimed warm-up call each).  On a shared machine
  whose speed drifts, every contender then samples the same slow and fast spells;
  timing one contender's repetitions back to back would not.  Each timed call starts
  after `pause` seconds idle: torch's OpenMP workers spin for a few milliseconds after
  a call, and would otherwise slow whichever contender runs next (measured: 1.6x on
  attnjax at S=512)."""
  for f in fns.values():
    f()
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, f in fns.items():
      time.sleep(pause)
      t0 = time.perf_counter()
      f()
      times[name].append(time.perf_counter() - t0)
  return times


def dense_rows(sizes, gemm, devices=0, dtype="float32", rounds=5):
  """Best time of each contender over interleaved rounds; ``*_vs_torch`` is best over
  best, ``*_vs_torch_med`` the median over rounds of the same-round ratio."""
  rows = []
  for S in sizes:
    q, k, v = make(S, dtype=jnp.dtype(dtype))
    B, T, N, H = q.shape
    flops = 4 * B * N * T * S * H
    contenders = {
        "attnjax auto": lambda q, k, v: attnjax.attention(q, k, v),
        "attnjax xla_chunked (pure XLA)":
            lambda q, k, v: attnjax.attention(q, k, v, implementation="xla_chunked"),
        "jax.nn.dot_product_attention": lambda q, k, v: jax.nn.dot_product_attention(q, k, v)}
    call = lambda f, q=q, k=k, v=v: (lambda: jax.block_until_ready(f(q, k, v)))
    fwd = {name: call(jax.jit(fn)) for name, fn in contenders.items()}
    fb = {name: call(fwd_bwd(fn)) for name, fn in contenders.items()}
    tfns = torch_fns(B, N, S, H, dtype=dtype)
    if tfns:
      fwd["torch SDPA"], fb["torch SDPA"] = tfns
    t_fwd, t_fb = interleaved_times(fwd, rounds), interleaved_times(fb, rounds)
    if devices > 1:
      name = f"attnjax auto, heads over {devices} CPU devices"
      sf, sfb = sharded_times(S, devices)
      t_fwd[name], t_fb[name] = [sf], [sfb]
    for name in t_fwd:
      t_f, t_b = min(t_fwd[name]), min(t_fb[name])
      row = dict(case=f"dense S={S}", impl=name, fwd_s=t_f, fwdbwd_s=t_b,
                 fwd_gflops=flops / t_f / 1e9, fwdbwd_gflops=3.5 * flops / t_b / 1e9,
                 fwd_vs_gemm=flops / t_f / 1e9 / gemm,
                 fwdbwd_vs_gemm=3.5 * flops / t_b / 1e9 / gemm)
      if tfns:
        for key, ts in (("fwd", t_fwd), ("fwdbwd", t_fb)):
          ref = ts["torch SDPA"]
          row[f"{key}_vs_torch"] = min(ts[name]) / min(ref)
          if len(ts[name]) == len(ref):
            row[f"{key}_vs_torch_med"] = float(np.median(np.array(ts[name]) / np.array(ref)))
      rows.append(row)
  return rows


def sparse_rows(S_window=16384, grid=128, quick=False):
  rows = []
  cases = [("sliding_window(512)", S_window, masks.sliding_window(512)),
           ("causal", S_window, masks.causal()),
           ("full", S_window, None),
           (f"neighborhood 7x7 on {grid}x{grid}", grid * grid, masks.neighborhood((grid, grid), 7)),
           (f"full {grid}x{grid}", grid * grid, None)]
  for name, S, m in cases:
    q, k, v = make(S)
    B, T, N, H = q.shape
    if m is None:
      density = 1.0
    else:
      tab = m.block_table(T, S, 32, 512)
      # density of allowed pairs, estimated on the tile table (exact for full tiles)
      density = float(np.mean(tab != masks.EMPTY))
    fn = lambda q, k, v, m=m: attnjax.attention(q, k, v, mask=m)
    t_f = timeit(jax.jit(fn), q, k, v, reps=1 if not quick else 2)
    t_fb = timeit(fwd_bwd(fn), q, k, v, reps=1 if not quick else 2)
    rows.append(dict(case=name, impl="attnjax auto", S=S, tile_density=density, fwd_s=t_f,
                     fwdbwd_s=t_fb))
  return rows


SHARDED_CODE = """
import os, sys, time
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count={ndev}")
import jax, jax.numpy as jnp, attnjax
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh(({ndev},), ("h",))
spec = P(None, None, "h")
ks = jax.random.split(jax.random.PRNGKey(0), 3)
q, k, v = (jax.device_put(jax.random.normal(kk, (1, {S}, 8, 64)), NamedSharding(mesh, spec))
           for kk in ks)
att = jax.shard_map(lambda q, k, v: attnjax.attention(q, k, v), mesh=mesh, in_specs=(spec,) * 3,
                    out_specs=spec)
def best(f):
  jax.block_until_ready(f(q, k, v))
  b = float("inf")
  for _ in range(3):
    t0 = time.perf_counter(); jax.block_until_ready(f(q, k, v))
    b = min(b, time.perf_counter() - t0)
  return b
fb = jax.jit(jax.grad(lambda q, k, v: att(q, k, v).sum(), argnums=(0, 1, 2)))
print(best(jax.jit(att)), best(fb))
"""


def sharded_times(S, ndev):
  """(fwd s, fwd+bwd s) of attnjax 'auto' with the heads split over `ndev` host CPU
  devices by `jax.shard_map`, in a fresh process (the device count is fixed at start-up)."""
  out = subprocess.run([sys.executable, "-c", SHARDED_CODE.format(ndev=ndev, S=S)],
                       capture_output=True, text=True, check=True)
  t_f, t_fb = out.stdout.strip().splitlines()[-1].split()
  return float(t_f), float(t_fb)


MEMORY_MASKS = {"full": "None", "causal": "masks.causal()",
                "sliding_window(512)": "masks.sliding_window(512)"}


def memory_probe(S, mask="full"):
  """(peak RSS in GB, compile seconds, run seconds) of a fresh process doing one
  fwd+bwd of attnjax 'auto' at length S (B=1, N=8, H=64, f32) with the named mask."""
  code = f"""
import resource, time, jax, jax.numpy as jnp, attnjax
from attnjax import masks
ks = jax.random.split(jax.random.PRNGKey(0), 3)
q, k, v = (jax.random.normal(kk, (1, {S}, 8, 64)) for kk in ks)
m = {MEMORY_MASKS[mask]}
g = jax.jit(jax.grad(lambda q, k, v: attnjax.attention(q, k, v, mask=m).sum(), argnums=(0, 1, 2)))
t0 = time.perf_counter()
c = g.lower(q, k, v).compile()
t1 = time.perf_counter()
jax.block_until_ready(c(q, k, v))
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a child of a large
# benchmark process would report its parent's peak.
try:
  hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
  peak_gb = int(hwm) * 1024 / 1e9
except OSError:
  peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
print(peak_gb, t1 - t0, time.perf_counter() - t1)
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  gb, compile_s, run_s = out.stdout.strip().splitlines()[-1].split()
  return float(gb), float(compile_s), float(run_s)


def print_table(rows, keys):
  widths = {k: max(len(k), *(len(fmt(r.get(k))) for r in rows)) for k in keys}
  print("  ".join(k.ljust(widths[k]) for k in keys))
  for r in rows:
    print("  ".join(fmt(r.get(k)).ljust(widths[k]) for k in keys))


def fmt(x):
  if x is None:
    return "-"
  if isinstance(x, float):
    return f"{x:.3g}"
  return str(x)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
  p.add_argument("--sizes", type=int, nargs="*", default=None)
  p.add_argument("--no-sparse", action="store_true")
  p.add_argument("--devices", type=int, default=0,
                 help="also time attnjax with the heads split over this many host CPU devices "
                      "(jax.shard_map; XLA runs one device's loop per core)")
  p.add_argument("--memory", type=int, default=0,
                 help="also measure peak RSS and time of one fwd+bwd at this S (full, causal, "
                      "window)")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                 help="dtype of q, k, v for the dense rows (every contender, torch too); the "
                      "GEMM rate is measured in the same dtype")
  p.add_argument("--rounds", type=int, default=5,
                 help="interleaved timing rounds of the dense rows (each contender once per round)")
  p.add_argument("--out", default="bench_results/attention_cpu.json")
  args = p.parse_args()
  if args.devices and args.dtype != "float32":
    p.error("--devices times float32 only")
  sizes = args.sizes or ([256, 512] if args.quick else [1024, 4096, 8192])
  gemm = gemm_rate(512 if args.quick else 2048, jnp.dtype(args.dtype))
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {args.dtype} GEMM {gemm:.0f} "
        f"GFLOP/s")
  rows = dense_rows(sizes, gemm, args.devices, args.dtype, 2 if args.quick else args.rounds)
  print_table(rows, ["case", "impl", "fwd_s", "fwdbwd_s", "fwd_gflops", "fwdbwd_gflops",
                     "fwd_vs_torch", "fwd_vs_torch_med", "fwdbwd_vs_torch",
                     "fwdbwd_vs_torch_med", "fwd_vs_gemm", "fwdbwd_vs_gemm"])
  result = dict(dtype=args.dtype, gemm_gflops=gemm, dense=rows)
  if not args.no_sparse:
    sp = sparse_rows(1024 if args.quick else 16384, 16 if args.quick else 128, args.quick)
    print()
    print_table(sp, ["case", "impl", "S", "tile_density", "fwd_s", "fwdbwd_s"])
    result["sparse"] = sp
  if args.memory:
    mem = []
    for name in MEMORY_MASKS:
      gb, compile_s, run_s = memory_probe(args.memory, name)
      mem.append(dict(S=args.memory, mask=name, peak_rss_gb=gb, compile_s=compile_s,
                      fwdbwd_s=run_s))
    print(f"\none fwd+bwd at S={args.memory} (fresh process each):")
    for r in mem:
      r["time_vs_full"] = r["fwdbwd_s"] / mem[0]["fwdbwd_s"]
    print_table(mem, ["mask", "peak_rss_gb", "compile_s", "fwdbwd_s", "time_vs_full"])
    result["memory"] = mem
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
