"""CPU benchmark of the routing ops (issue 19), as ratios to dense attention.

MoBA (causal, ``block_size``, ``top_k``) is timed in its two evaluations -- the mask path
(``implementation='xla_chunked'``, block-size tiles; ``mask_*``) and the key-block-major
``implementation='gather'`` path (``gather_*``, the CPU default) -- against causal dense
``attnjax.attention`` (default implementation) in the same process, interleaved round by
round (best of ``--rounds``), forward and forward+backward; ``*_ratio`` is the time over
dense causal's and ``target_ratio`` is 2 x the selected fraction.  Also timed in the
same rounds: the ``O(T)`` pass ``q + k + v`` (``floor_ratio``) and the gate's GEMM with
the block means (``gate_ratio``); ``bound_at_dense_rate`` is their sum plus MoBA's share
of dense causal's scores, computed at the dense kernel's per-score rate (the dense time
less the floor), a forward no implementation beats without scoring faster than the dense
kernel, and ``speedup_per_score_needed`` how much faster per score it would have to be
to reach ``target_ratio``; ``dense_useful_gflops`` is the dense kernel's rate on the causal
scores' QK and PV flops, ``gemm_gflops`` XLA's float32 GEMM rate (2048^3).  Printed
with it: the *selected* fraction (the mean over queries of the chosen keys / all keys,
causal) and the *visited* tile fraction (non-empty tiles of the union table the kernel
iterates over / all tiles).  MoBA chooses blocks per query token, so on i.i.d. random
inputs the queries of one q block disagree and the union approaches causal-dense;
``--coherent`` gives the queries of a block a shared component (as trained models have),
which is where block routing pays off.

BiFormer (``--grids`` maps, default 64x64 and 128x128; ``--regions`` per axis,
``--region-topk``) is timed, forward and fwd+bwd, with the default implementation (on CPU
the C++ kernel's block-sparse mode) and with ``'xla_chunked'``, against dense attention on
the flattened map in the same process.  ``--paths gather`` skips the (slow) MoBA mask path.

Dynamic mask attention (``--keep-window``, causal, random key biases) is timed, forward
and fwd+bwd, against causal dense attention, with the per-key keep intervals
(``dynamic_mask_keep_end``) timed alone.

``--rss`` runs MoBA fwd+bwd at ``--rss-len`` tokens in a subprocess and reports its peak
resident set size (``resource.getrusage``), showing no ``[T, S]`` array is formed.

    python benchmarks/routing_cpu.py                      # S=16384, 64/128 maps, RSS at 65536
    python benchmarks/routing_cpu.py --quick              # small: a smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import attnjax
from attnjax import masks
from attnjax.ops import routing


def _time(fn, *args):
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def _best(fns, args, rounds):
  """Best time of each function, interleaved round by round (after one warm-up call)."""
  for f in fns:
    jax.block_until_ready(f(*args))
  best = [float("inf")] * len(fns)
  for _ in range(rounds):
    for i, f in enumerate(fns):
      best[i] = min(best[i], _time(f, *args))
  return best


def _qkv(S, N, H, *, coherent=False, block=1, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal((1, S, N, H), np.float32) for _ in range(3))
  if coherent:   # queries of a block share a direction: per-block routing agrees
    base = rng.standard_normal((1, -(-S // block), N, H), np.float32) * 2.0
    q = np.repeat(base, block, axis=1)[:, :S] + 0.5 * q
  return tuple(jnp.asarray(x) for x in (q, k, v))


def _fwd_bwd(f, q):
  """jit(grad) of ``<f(q, k, v), ct>`` with a fixed random cotangent ``ct`` (the output
  has ``q``'s shape; as in training: with a plain sum the cotangent is a constant that
  XLA folds into the backward's row sums, hiding their cost)."""
  ct = jax.random.normal(jax.random.PRNGKey(7), q.shape, q.dtype)
  return jax.jit(jax.grad(lambda q, k, v: jnp.vdot(f(q, k, v), ct), argnums=(0, 1, 2)))


def _selected_fraction(q, k, bs, top_k):
  """Mean over (head, query) of the chosen keys (causal: ``j <= i`` in the own block) / S."""
  idx = np.asarray(routing._moba_choice(q, k, block_size=bs, top_k=top_k, causal=True))
  S = k.shape[1]
  i = np.arange(S)[None, None, :, None]
  lo = idx * bs
  hi = np.where(idx == i // bs, i + 1, np.minimum((idx + 1) * bs, S))
  keys = np.where(idx * bs < S, hi - lo, 0).sum(-1)
  return float(keys.mean() / S)


def moba_case(S, N, H, bs, top_k, rounds, coherent, paths):
  q, k, v = _qkv(S, N, H, coherent=coherent, block=bs)
  fns = {"mask": lambda q, k, v: routing.moba_attention(q, k, v, block_size=bs, top_k=top_k,
                                                        implementation="xla_chunked"),
         "gather": lambda q, k, v: routing.moba_attention(q, k, v, block_size=bs,
                                                          top_k=top_k, implementation="gather")}
  dense = lambda q, k, v: attnjax.attention(q, k, v, mask=masks.causal())
  sel = routing.moba_selection(q, k, block_size=bs, top_k=top_k)
  table = np.asarray((masks.from_row_block_mask(sel, bs) & masks.causal())
                     .block_table(S, S, bs, bs, num_heads=N))
  nk = table.shape[-1]
  selected = _selected_fraction(q, k, bs, top_k)
  row = dict(case=f"moba S={S} block={bs} top_k={top_k} coherent={coherent}",
             selected_fraction=selected, target_ratio=2 * selected,
             visited_tile_fraction=float(np.mean(table != masks.EMPTY)),
             causal_tile_fraction=nk * (nk + 1) / 2 / (nk * nk))
  # Parts of a lower bound on any causal MoBA forward, timed in the same rounds: the
  # O(T) pass (q + k + v: read the inputs, write an output-sized array) and MoBA's own
  # gate (q against the block means, with the means); the top-k is left out.
  floor = lambda q, k, v: q + k + v
  gate = lambda q, k, v: routing._block_gates(q, k, bs)
  fs = [fns[p] for p in paths] + [floor, gate, dense]
  fwd = _best([jax.jit(f) for f in fs], (q, k, v), rounds)
  fs = [fns[p] for p in paths] + [dense]
  both = _best([_fwd_bwd(f, q) for f in fs], (q, k, v), rounds)
  F, G = fwd[-3] / fwd[-1], fwd[-2] / fwd[-1]
  # the dense kernel's rate on its useful flops (QK and PV over the causal scores)
  # against XLA's float32 GEMM on this machine
  m = jnp.asarray(np.random.default_rng(1).standard_normal((2048, 2048), np.float32))
  (t_gemm,) = _best([jax.jit(lambda a: a @ a)], (m,), rounds)
  row.update(dense_useful_gflops=4 * N * H * S * (S + 1) / 2 / fwd[-1] / 1e9,
             gemm_gflops=2 * 2048 ** 3 / t_gemm / 1e9)
  # MoBA's scores as a fraction of dense causal's (S (S + 1) / 2 of them), each at the
  # dense kernel's per-score rate (its time less the O(T) pass)
  share = selected * S * S / (S * (S + 1) / 2)
  row.update(floor_ratio=F, gate_ratio=G, bound_at_dense_rate=F + G + share * (1 - F),
             speedup_per_score_needed=share * (1 - F) / max(2 * selected - F - G, 1e-9))
  row.update(dense_fwd_s=fwd[-1], dense_fwd_bwd_s=both[-1])
  for n, p in enumerate(paths):
    row.update({f"{p}_fwd_s": fwd[n], f"{p}_fwd_ratio": fwd[n] / fwd[-1],
                f"{p}_fwd_bwd_s": both[n], f"{p}_fwd_bwd_ratio": both[n] / both[-1]})
  return row


def biformer_case(g, N, H, regions, top_k, rounds):
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal((1, g, g, N, H), np.float32)) for _ in range(3))

  def bra(impl):
    return lambda q, k, v: routing.bi_level_routing_attention(
        q, k, v, num_regions=regions, top_k=top_k, implementation=impl)
  flat = lambda x: x.reshape(1, g * g, N, H)
  dense = lambda q, k, v: attnjax.attention(flat(q), flat(k), flat(v))
  fs = [bra(None), bra("xla_chunked"), dense]
  fwd = _best([jax.jit(f) for f in fs], (q, k, v), rounds)
  both = _best([_fwd_bwd(f, q) for f in fs], (q, k, v), rounds)
  return dict(case=f"biformer {g}x{g} regions={regions}x{regions} top_k={top_k}",
              tile_fraction=top_k / regions ** 2, fwd_s=fwd[0], xla_chunked_fwd_s=fwd[1],
              dense_fwd_s=fwd[2], fwd_ratio=fwd[0] / fwd[2],
              xla_chunked_fwd_ratio=fwd[1] / fwd[2], fwd_bwd_s=both[0],
              dense_fwd_bwd_s=both[2], fwd_bwd_ratio=both[0] / both[2],
              xla_chunked_fwd_bwd_ratio=both[1] / both[2])


def dma_case(S, N, H, w, rounds):
  """Dynamic mask attention (causal, ``keep_window=w``, per-kv-head key biases) against
  causal dense attention, forward and fwd+bwd, plus the per-key keep intervals alone."""
  q, k, v = _qkv(S, N, H)
  kb = jnp.asarray(np.random.default_rng(3).standard_normal((1, S, N), np.float32))
  dma = lambda q, k, v: routing.dynamic_mask_attention(q, k, v, kb, keep_window=w)
  dense = lambda q, k, v: attnjax.attention(q, k, v, mask=masks.causal())
  ends = jax.jit(lambda b: routing.dynamic_mask_keep_end(b, keep_window=w))
  fwd = _best([jax.jit(dma), jax.jit(dense)], (q, k, v), rounds)
  both = _best([_fwd_bwd(dma, q), _fwd_bwd(dense, q)], (q, k, v), rounds)
  kept = np.minimum(np.arange(1, S + 1), w).sum() / (S * (S + 1) / 2)
  return dict(case=f"dynamic_mask S={S} keep_window={w}", kept_fraction_of_causal=kept,
              keep_end_s=_best([ends], (kb,), rounds)[0], fwd_s=fwd[0], dense_fwd_s=fwd[1],
              fwd_ratio=fwd[0] / fwd[1], fwd_bwd_s=both[0], dense_fwd_bwd_s=both[1],
              fwd_bwd_ratio=both[0] / both[1])


def rss_child(S, N, H, bs, top_k, impl):
  q, k, v = _qkv(S, N, H)
  moba = lambda q, k, v: routing.moba_attention(q, k, v, block_size=bs, top_k=top_k,
                                                implementation=impl)
  jax.block_until_ready(_fwd_bwd(moba, q)(q, k, v))
  peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  print(json.dumps(dict(case=f"moba {impl} fwd+bwd S={S} N={N} H={H} block={bs} top_k={top_k}",
                        peak_rss_mb=peak_kb / 1024, dense_scores_mb=S * S * N * 4 / 2**20)))


def _emit(rows, row):
  rows.append(row)
  print(json.dumps(row), flush=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
  p.add_argument("--seq", type=int, default=16384)
  p.add_argument("--block", type=int, default=512)
  p.add_argument("--top-k", type=int, default=3)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--grids", default="64,128", help="BiFormer map sizes (comma-separated)")
  p.add_argument("--paths", default="gather,mask",
                 help="MoBA evaluations to time: gather and/or mask (xla_chunked)")
  p.add_argument("--regions", type=int, default=8)
  p.add_argument("--region-topk", type=int, default=4)
  p.add_argument("--rss-len", type=int, default=65536)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--keep-window", type=int, default=1024, help="dynamic mask attention's w")
  p.add_argument("--only", default="moba,coherent,biformer,dma,rss")
  p.add_argument("--rss-impl", default="gather", help="MoBA implementation of the RSS run")
  p.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.quick:
    a.seq, a.block, a.grids, a.regions, a.rss_len, a.rounds = 2048, 128, "32", 4, 8192, 2
    a.keep_window = 128
  N, H = a.heads, a.head_dim
  if a.rss_child:
    rss_child(a.rss_len, N, H, a.block, a.top_k, a.rss_impl)
    return
  only = set(a.only.split(","))
  paths = [x for x in a.paths.split(",") if x]
  rows = []
  if "moba" in only:
    _emit(rows, moba_case(a.seq, N, H, a.block, a.top_k, a.rounds, False, paths))
  if "coherent" in only:
    _emit(rows, moba_case(a.seq, N, H, a.block, a.top_k, a.rounds, True, paths))
  if "biformer" in only:
    for g in (int(x) for x in a.grids.split(",")):
      _emit(rows, biformer_case(g, N, H, a.regions, a.region_topk, a.rounds))
  if "dma" in only:
    _emit(rows, dma_case(a.seq, N, H, a.keep_window, a.rounds))
  if "rss" in only:
    cmd = [sys.executable, __file__, "--rss-child", "--rss-len", str(a.rss_len), "--block",
           str(a.block), "--top-k", str(a.top_k), "--heads", str(N), "--head-dim", str(H),
           "--rss-impl", a.rss_impl]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
  main()
