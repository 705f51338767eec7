"""MoBA in the Pallas flash kernels: grid steps and mask-input bytes, before and after the
data-dependent block lists (computed from the kernels' own plans and schedules; nothing is
timed, so it runs anywhere).

For one causal MoBA call (``--seq`` tokens, ``--block`` keys per block = the kernel tile,
``--top-k``, ``--heads`` query heads over ``--kv-heads``) it prints, per backend:

* TPU: grid steps per ``(batch, kv head)`` program -- before, the worst-case stride of a
  traced table's schedule (``nq * nk``); after, the dynamic grid bound (the longest list),
  for the forward/dq and the transposed dk/dv lists; and the idle padding steps of the
  programs whose lists are shorter than the longest;
* GPU: list iterations of all programs -- before, every head walked its GQA group's union;
  after, its own head's tiles;
* the mask input: a dense ``[B, N, T, S]`` int32 mask before, the ``[B, N, T, nk]`` row
  selection (padded as each kernel lays it out) after.

``--coherent`` gives the queries of a block a shared direction (trained models' queries
agree within a block far more than i.i.d. random ones).

    PYTHONPATH=. python benchmarks/moba_block_lists.py                  # S=8192, block 128
    PYTHONPATH=. python benchmarks/moba_block_lists.py --coherent
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks
from attnjax.core import plan as plan_lib
from attnjax.core.args import check_attention_args
from attnjax.kernels import tile_math as tm
from attnjax.ops import routing


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seq", type=int, default=8192)
  p.add_argument("--block", type=int, default=128)
  p.add_argument("--top-k", type=int, default=3)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv-heads", type=int, default=2)
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--coherent", action="store_true")
  args = p.parse_args(argv)
  S, bs, N, K = args.seq, args.block, args.heads, args.kv_heads
  kq, kk = jax.random.split(jax.random.key(0))
  q = jax.random.normal(kq, (1, S, N, args.head_dim))
  if args.coherent:
    q = jnp.repeat(q[:, ::bs], bs, axis=1) + 0.1 * q
  k = jax.random.normal(kk, (1, S, K, args.head_dim))
  sel = routing.moba_selection(q, k, block_size=bs, top_k=args.top_k)
  a = check_attention_args(q, k, k, mask=masks.from_row_block_mask(sel, bs) & masks.causal())
  plan = plan_lib.make_plan(a, bs, bs)
  nq, G = plan.nq, N // K
  table, heads = np.asarray(plan.table), np.asarray(plan.head_table)
  fwd = plan_lib.step_schedule(jnp.asarray(table))
  dkv = plan_lib.step_schedule(jnp.asarray(table), transpose=True)
  print(f"MoBA S={S} block={bs} top_k={args.top_k} N={N} K={K} coherent={args.coherent}: "
        f"selected tiles per kv head {(table != 0).sum((-1, -2)).ravel().tolist()} "
        f"of {nq * (nq + 1) // 2} causal")
  print(f"TPU grid steps per program, fwd/dq: before {fwd[3]}, after {int(fwd[5])}; "
        f"dk/dv: before {dkv[3]}, after {int(dkv[5])}")
  for name, sch in (("fwd/dq", fwd), ("dk/dv", dkv)):
    grid = int(sch[5]) * table.shape[0] * table.shape[1]     # every program runs n_max steps
    print(f"TPU {name}: {grid} grid steps for {int(sch[4])} selected tiles: "
          f"{grid - int(sch[4])} idle padding steps ({(grid - int(sch[4])) / grid:.1%}; "
          f"no DMA, no compute)")
  print(f"GPU list iterations, all programs: before {int((table != 0).sum()) * G}, "
        f"after {int((heads != 0).sum())}")
  dense = N * S * S * 4
  sel_tpu = K * nq * G * bs * tm.round_up(plan.dense.shape[3], 128) * 4
  sel_gpu = N * S * tm.next_pow2(plan.dense.shape[3]) * 4
  mib = lambda x: f"{x / 2**20:.1f} MiB"
  print(f"mask input: before {mib(dense)} dense; after {mib(sel_tpu)} (TPU), "
        f"{mib(sel_gpu)} (GPU) row selection")


if __name__ == "__main__":
  main()
