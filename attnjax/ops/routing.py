"""Routing attention: data-dependent (content-routed) sparsity fed to the blockwise kernels.

Each op computes, from the inputs, which keys every query may attend to, expresses that
selection as an :mod:`attnjax.masks` mask with a cheap block table, and runs softmax
attention through :func:`attnjax.attention` (reached via :mod:`attnjax.core.hooks`), so
``'xla_chunked'`` and the Pallas kernels visit only the selected tiles; no ``[T, S]``
array is formed by these ops (the ``'xla'``/``'reference'`` implementations are dense by
definition).

- :func:`moba_attention` -- Mixture of Block Attention (catalog C04): per-query top-k key
  blocks by ``q_i . mean(k_block)``; the selection is a
  :func:`attnjax.masks.from_row_block_mask` (its table is the union over each q block).
- :func:`bi_level_routing_attention` -- BiFormer (C01): region-to-region top-k routing on a
  2D map; tokens are permuted to region-major order so a region is a contiguous block and
  the routing is a :func:`attnjax.masks.from_block_mask`.
- :func:`dynamic_mask_attention` -- Dynamic Mask Attention (C03): a per-key bias from the
  values, top-``keep_window`` keys per query by that bias (AND causal).
- :func:`sparsifiner_attention` -- Sparsifiner (C02): top-``keep`` keys per query from a
  (low-rank) connectivity score, attention over the gathered keys;
  :func:`sparsifiner_distillation_loss` trains the predictor against dense attention.

Gradients.  The selection (top-k over gates, affinities, biases, connectivities) is a
discrete choice and is **not differentiated** (the gate inputs pass through
``jax.lax.stop_gradient`` for the choice); gradients flow through the selected logits to
``q``, ``k``, ``v`` (and to ``key_bias`` in dynamic mask attention, which is also an
additive logit bias).

Common conventions: BTNH layout, ``k``/``v`` with ``K`` heads, ``N % K == 0`` (GQA; routing
is per query head where the paper routes per head); ``scale`` defaults to ``1/sqrt(H)``;
float32 gates and logits; the output has the layout of ``q`` with ``Hv`` last, in
``q.dtype``.  See ``docs/routing.md``.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks as _masks
from attnjax.core import hooks
from attnjax.core.precision import einsum_f32
from attnjax.core.select import top_k as _top_k
from attnjax.core.softmax import merge_partials, row_dot
from attnjax.ops.chunked import ChunkedBlockSizes

__all__ = ["moba_attention", "moba_selection", "vmoba_attention", "threshold_selection",
           "to_block_major", "from_block_major", "bi_level_routing_attention",
           "region_routing", "to_region_major", "from_region_major", "dynamic_mask_attention",
           "dynamic_mask_keep_end", "sparsifiner_attention", "sparsifiner_distillation_loss"]

_F32 = jnp.float32


# ----------------------------------------------------------------------------- helpers

def _pos_int(op, name, value):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{op}: {name} must be a positive int, got {value!r}")
  if value < 1:
    raise ValueError(f"{op}: {name} must be a positive int (>= 1), got {name}={value!r}")
  return int(value)


def _arrays(op, **xs):
  for name, x in xs.items():
    if not hasattr(x, "ndim") or not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"{op}: {name} must be an array, got {type(x).__name__}")


def _check_btnh(op, q, k, v, *, same_len=False):
  """Checks ``q [B,T,N,H]``, ``k [B,S,K,H]``, ``v [B,S,K,Hv]``; returns the dims."""
  _arrays(op, q=q, k=k, v=v)
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{op}: {name} must have rank 4 ([B, T, N, H] layout), got shape "
                       f"{tuple(x.shape)}")
  B, T, N, H = q.shape
  if k.shape[0] != B or v.shape[0] != B:
    raise ValueError(f"{op}: q, k, v must share the batch size B={B}, got k {tuple(k.shape)}, "
                     f"v {tuple(v.shape)}")
  S, K = k.shape[1], k.shape[2]
  if tuple(v.shape[:3]) != (B, S, K):
    raise ValueError(f"{op}: v must be [B, S, K, Hv] = [{B}, {S}, {K}, Hv] like k, got shape "
                     f"{tuple(v.shape)}")
  if k.shape[3] != H:
    raise ValueError(f"{op}: k must have the head dim H={H} of q, got shape {tuple(k.shape)}")
  if N % K:
    raise ValueError(f"{op}: the query heads N={N} must be a multiple of the kv heads K={K} "
                     f"(GQA), got q {tuple(q.shape)}, k {tuple(k.shape)}")
  if same_len and S != T:
    raise ValueError(f"{op}: k must have the length T={T} of q (self-attention), got S={S}")
  return B, T, S, N, K, H, v.shape[3]


def _default_block_sizes(block_sizes, bq, bk):
  """``xla_chunked`` tiles aligned with the selection's blocks unless the caller chose."""
  if block_sizes is not None:
    return block_sizes
  return {"xla_chunked": ChunkedBlockSizes(block_q=bq, block_k=bk)}


def _onehot_any(idx, n):
  """``[..., k]`` indices -> ``[..., n]`` bool: is column ``c`` among the indices."""
  return jnp.any(idx[..., None] == jnp.arange(n, dtype=idx.dtype), axis=-2)


# ----------------------------------------------------------------------------- MoBA

def _block_gates(q_BTNH, k_BSKH, bs):
  """MoBA's gates (no gradient), float32 ``[B, N, T, nk]``: ``q_ih . mean_{j in c}
  k_j,h//G`` for key blocks ``c`` of ``bs`` keys (the last averaged over its own keys)."""
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  nk = -(-S // bs)
  kf = jnp.pad(jax.lax.stop_gradient(k_BSKH).astype(_F32),
               ((0, 0), (0, nk * bs - S), (0, 0), (0, 0)))
  counts = np.minimum(bs, S - np.arange(nk) * bs).astype(np.float32)       # [nk]
  kmean_BCKH = kf.reshape(B, nk, bs, K, H).sum(2) / counts[None, :, None, None]
  q_BTKGH = jax.lax.stop_gradient(q_BTNH).astype(_F32).reshape(B, T, K, N // K, H)
  # batch-major operands: XLA:CPU runs this form as one batched GEMM (about 2.5x faster
  # than letting the dot transpose [B, T, K, G, H] itself)
  gate_BKGTC = jnp.einsum("bkgth,bkch->bkgtc", q_BTKGH.transpose(0, 2, 3, 1, 4),
                          kmean_BCKH.transpose(0, 2, 1, 3),
                          precision=jax.lax.Precision.HIGHEST)
  return gate_BKGTC.reshape(B, N, T, nk)


def _moba_choice(q, k, *, block_size: int, top_k: int, causal: bool):
  """MoBA's chosen blocks as indices (no gradient): int32 ``[B, N, T, top_k]``.

  Causal: slot 0 is the own block ``i // block_size``, slots ``1..top_k-1`` the earlier
  blocks with the highest gates (``nk``, i.e. none, where fewer earlier blocks exist).
  Non-causal: the ``top_k`` highest gates.  The entries of a row are distinct.
  """
  op = "moba_selection"
  B, T, N = q.shape[:3]
  S = k.shape[1]
  bs = block_size
  nk = -(-S // bs)
  gate_BNTC = _block_gates(q, k, bs)
  cb = jnp.arange(nk, dtype=jnp.int32)
  if causal:
    if T != S:
      raise ValueError(f"{op}: causal MoBA needs T == S, got T={T}, S={S}")
    qb_T1 = (jnp.arange(T, dtype=jnp.int32) // bs)[:, None]                  # [T, 1]
    idx = jnp.broadcast_to(qb_T1, (B, N, T, 1))
    if top_k > 1:
      earlier = cb[None, :] < qb_T1
      gm = jnp.where(earlier, gate_BNTC, -jnp.inf)
      vals, top = _top_k(gm, top_k - 1)                                      # [B,N,T,k-1]
      top = jnp.where(jnp.isfinite(vals), top, nk)      # an ineligible pick selects nothing
      idx = jnp.concatenate([idx, top.astype(jnp.int32)], axis=-1)
  else:
    _, idx = _top_k(gate_BNTC, top_k)
  return idx.astype(jnp.int32)


def moba_selection(q, k, *, block_size: int, top_k: int, causal: bool = True):
  """MoBA's per-query key-block choice (no gradient): bool ``[B, N, T, nk]``.

  ``gate[b, h, i, c] = q_ih . mean_{j in block c} k_j,h//G`` (float32; the last block may
  be shorter and is averaged over its own keys).  Causal: the query's own block
  ``i // block_size`` plus the ``top_k - 1`` earlier blocks with the highest gates (all of
  them when fewer); later blocks never.  Non-causal: the ``top_k`` highest gates.
  """
  nk = -(-k.shape[1] // block_size)
  idx = _moba_choice(q, k, block_size=block_size, top_k=top_k, causal=causal)
  return _onehot_any(idx, nk)


def _moba_probs(q, k, bs, top_k, causal, scale):
  """MoBA's weights ``[B, N, T, S]`` float32, for :mod:`attnjax.analysis` only: the softmax
  of ``scale q.k`` over the chosen blocks (and ``j <= i`` when causal)."""
  T, N, H, S = q.shape[1], q.shape[2], q.shape[3], k.shape[1]
  sel = moba_selection(q, k, block_size=bs, top_k=top_k, causal=causal)     # [B, N, T, nk]
  ok = sel[..., np.arange(S) // bs] & (np.tril(np.ones((T, S), bool)) if causal else True)
  kx = jnp.repeat(k, N // k.shape[2], axis=2)
  s = jnp.einsum("btnh,bsnh->bnts", q.astype(_F32), kx.astype(_F32),
                 precision=jax.lax.Precision.HIGHEST)
  s = jnp.where(ok, s * ((1.0 / math.sqrt(H)) if scale is None else scale), -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  e = jnp.where(ok, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  return e / jnp.maximum(e.sum(-1, keepdims=True), 1e-30)


def _moba_gather_chunk(block_size: int) -> int:
  """Queries per gathered chunk ``P``: a power of two in ``[8, 128]``, at most the block
  (padding costs at most ``P - 1`` slots per key block and head)."""
  return int(min(128, max(8, 1 << (int(block_size) - 1).bit_length())))


_RANK_MAX_BLOCKS = 512   # above this many key blocks the layout sorts (see below)


def _prefix_counts(sel_RTC, piece: int = 128):
  """Exclusive prefix counts along ``T`` of a 0/1 array ``sel [R, T, C]`` (the number of
  earlier rows with a 1 in the same column) and the column totals ``[R, C]`` (int32).

  ``T`` is cut into pieces of ``piece`` rows: inside a piece a strictly lower-triangular
  ``[piece, piece]`` matrix product, across pieces an exclusive cumulative sum of the
  piece totals.  Exact (integers far below ``2**24`` in float32); on CPU several times
  faster than a stable sort of the pairs or a cumulative sum along ``T``.
  """
  R, T, C = sel_RTC.shape
  Tp = -(-T // piece) * piece
  x = jnp.pad(sel_RTC.astype(_F32), ((0, 0), (0, Tp - T), (0, 0))).reshape(
      R, Tp // piece, piece, C)
  tri = jnp.asarray(np.tril(np.ones((piece, piece), np.float32), -1))
  within = jnp.einsum("ij,rmjc->rmic", tri, x, precision=jax.lax.Precision.HIGHEST)
  tot = x.sum(2)                                                       # [R, m, C]
  before = jnp.cumsum(tot, axis=1) - tot
  prefix = (within + before[:, :, None, :]).reshape(R, Tp, C)[:, :T]
  return prefix.astype(jnp.int32), tot.sum(1).astype(jnp.int32)


def _moba_gather_layout(idx_BNTk, *, T: int, nk: int, chunk: int, group: int = 1):
  """Key-block-major slots of the (query, chosen block) pairs (integer bookkeeping).

  Per row ``r = (b, h)`` the pairs are grouped by block (query order inside a group), each
  group padded to a multiple of ``P = chunk`` slots, so that a chunk of ``P`` slots belongs
  to one key block; the chunk count is rounded up to a multiple of ``group``.  Returns
  ``slot_q [R, n_chunks * P]`` (the query of each slot; ``T`` for a padding slot),
  ``chunk_blk [R, n_chunks]`` (the key block of each chunk) and ``dest [R, T, top_k]``
  (the slot of each pair; ``n_chunks * P`` where the pair selects nothing).

  A query's entries are distinct, so a pair's rank in its block's group is the number
  of earlier queries choosing that block: exclusive prefix counts of the one-hot choice
  ``[R, T, nk]`` (:func:`_prefix_counts`) up to ``_RANK_MAX_BLOCKS`` blocks, above that
  a stable sort of the pairs by block (``O(T top_k)`` memory per row).
  """
  P = chunk
  kk = idx_BNTk.shape[-1]
  R = idx_BNTk.shape[0] * idx_BNTk.shape[1]
  n_chunks = -(-(T * kk + nk * (P - 1)) // P)
  n_chunks = -(-n_chunks // group) * group
  total = n_chunks * P
  X = T * kk
  c_RX = jnp.minimum(jax.lax.stop_gradient(idx_BNTk).reshape(R, X), nk)   # nk: selects none
  rows_R1 = jnp.arange(R, dtype=jnp.int32)[:, None]
  cs = jnp.minimum(c_RX, nk - 1)
  if nk <= _RANK_MAX_BLOCKS:
    c_RTk = c_RX.reshape(R, T, kk)
    sel_RTC = _onehot_any(c_RTk, nk)
    prefix_RTC, count_RC = _prefix_counts(sel_RTC)
    rank_RX = jnp.take_along_axis(prefix_RTC, jnp.minimum(c_RTk, nk - 1), axis=2).reshape(R, X)
  else:
    count_RC = jnp.zeros((R, nk + 1), jnp.int32).at[rows_R1, c_RX].add(1)[:, :nk]
    start_RC = jnp.cumsum(count_RC, axis=-1) - count_RC     # group starts, unpadded
    x_RX = jnp.broadcast_to(jnp.arange(X, dtype=jnp.int32), (R, X))
    c_sorted, x_sorted = jax.lax.sort((c_RX, x_RX), dimension=1, is_stable=True, num_keys=1)
    rank_sorted = (jnp.arange(X, dtype=jnp.int32)[None, :]
                   - jnp.take_along_axis(start_RC, jnp.minimum(c_sorted, nk - 1), axis=1))
    rank_RX = jnp.zeros((R, X), jnp.int32).at[rows_R1, x_sorted].set(rank_sorted)
  padded_RC = -(-count_RC // P) * P
  end_RC = jnp.cumsum(padded_RC, axis=-1)               # group ends, padded to P
  off_RC = end_RC - padded_RC                           # group starts
  dest_RX = jnp.where(c_RX < nk, jnp.take_along_axis(off_RC, cs, axis=1) + rank_RX,
                      total)                                                 # total: none
  slot_q = jnp.full((R, total), T, jnp.int32).at[rows_R1, dest_RX].set(
      jnp.broadcast_to(jnp.arange(X, dtype=jnp.int32) // kk, (R, X)), mode="drop")
  starts = jnp.arange(n_chunks, dtype=jnp.int32) * P
  chunk_blk = jnp.minimum((end_RC[:, None, :] <= starts[None, :, None]).sum(-1), nk - 1)
  return slot_q, chunk_blk.astype(jnp.int32), dest_RX.reshape(R, T, kk)


def _moba_gather_group(chunk: int) -> int:
  """Chunks per scan step: about 512 slots per step (fewer, larger steps; the chunks of a
  step are batched like extra rows)."""
  return max(1, 512 // chunk)


def _moba_gather_setup(q, k, v, idx_BNTk, block_size, chunk):
  """Shared by the forward and backward of :func:`_moba_gather_partial`: the scan inputs
  ``(row [U], slot queries [steps, U, P], key block [steps, U], flat kv block [steps, U])``
  with ``U = group * R`` (``group`` chunks of every row per step), the layout's ``dest``,
  the blocked keys/values ``[B * K * nk, bs, dim]`` and the query rows ``[R, T, H]``."""
  B, T, N, H = q.shape
  S, K, Hv = k.shape[1], k.shape[2], v.shape[3]
  G, bs, P = N // K, block_size, chunk
  nk = -(-S // bs)
  R = B * N
  g = _moba_gather_group(P)
  slot_q, chunk_blk, dest_RTk = _moba_gather_layout(idx_BNTk, T=T, nk=nk, chunk=P, group=g)
  steps = chunk_blk.shape[1] // g
  r_R = jnp.arange(R, dtype=jnp.int32)
  kvrow_R = (r_R // N) * K + (r_R % N) // G
  chunk_flat = kvrow_R[:, None] * nk + chunk_blk                            # [R, n_chunks]

  def per_step(x_RC, tail=()):          # [R, steps * g, *tail] -> [steps, g * R, *tail]
    x = x_RC.reshape((R, steps, g) + tail)
    return jnp.moveaxis(x, 0, 2).reshape((steps, g * R) + tail)
  xs = (per_step(slot_q, (P,)), per_step(chunk_blk), per_step(chunk_flat))
  row_U = jnp.tile(r_R, g)
  pad = ((0, 0), (0, nk * bs - S), (0, 0), (0, 0))
  k_F = jnp.pad(k, pad).reshape(B, nk, bs, K, H).transpose(0, 3, 1, 2, 4).reshape(
      B * K * nk, bs, H)
  v_F = jnp.pad(v, pad).reshape(B, nk, bs, K, Hv).transpose(0, 3, 1, 2, 4).reshape(
      B * K * nk, bs, Hv)
  q_RTH = q.transpose(0, 2, 1, 3).reshape(R, T, H)
  return row_U, xs, dest_RTk, k_F, v_F, q_RTH


def _moba_chunk_logits(q_UPH, k_USH, i_UP, c_U, *, T, S, bs, scale):
  """float32 logits ``[U, P, bs]`` of chunks' slots against their key blocks, with the
  mask (padding slots, keys past ``S``) applied as ``-inf``."""
  s = einsum_f32("uph,ush->ups", q_UPH, k_USH) * scale
  j_US = c_U[:, None] * bs + jnp.arange(bs, dtype=jnp.int32)[None, :]
  allowed = (i_UP < T)[:, :, None] & (j_US < S)[:, None, :]
  return jnp.where(allowed, s, -jnp.inf), allowed


def _moba_gather_partial_fwd_impl(q, k, v, idx_BNTk, block_size, scale, chunk):
  B, T, N, H = q.shape
  S, Hv = k.shape[1], v.shape[3]
  R = B * N
  row_U, xs, dest_RTk, k_F, v_F, q_RTH = _moba_gather_setup(q, k, v, idx_BNTk, block_size,
                                                             chunk)
  row_U1 = row_U[:, None]

  def step(_, x):                       # each slot's partial softmax over its block
    i_UP, c_U, f_U = x
    s, _ = _moba_chunk_logits(q_RTH[row_U1, jnp.minimum(i_UP, T - 1)], k_F[f_U], i_UP, c_U,
                              T=T, S=S, bs=block_size, scale=scale)
    m = jnp.max(s, axis=-1)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m[..., None])
    l = p.sum(-1)
    pos = l > 0
    l1 = jnp.where(pos, l, 1.0)
    o = einsum_f32("ups,usd->upd", p.astype(v_F.dtype), v_F[f_U]) / l1[..., None]
    return None, (o, jnp.where(pos, m + jnp.log(l1), -jnp.inf))

  _, (o_ZUPD, lse_ZUP) = jax.lax.scan(step, None, xs)
  steps, U, P = lse_ZUP.shape
  g = U // R
  # [steps, g * R, P] -> [R, steps * g * P] (chunk order of the layout)
  o_RXD = jnp.moveaxis(o_ZUPD.reshape(steps, g, R, P, Hv), 2, 0).reshape(R, -1, Hv)
  lse_RX = jnp.moveaxis(lse_ZUP.reshape(steps, g, R, P), 2, 0).reshape(R, -1)
  return _moba_merge_slots(o_RXD, lse_RX, dest_RTk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _moba_gather_partial(q, k, v, idx_BNTk, block_size, scale, chunk):
  """Unmasked softmax attention of each query over the keys of its gathered blocks
  (entries ``>= nk`` of ``idx_BNTk`` select nothing; causal MoBA passes only blocks
  before the query's own, where ``j <= i`` holds throughout): float32
  ``(o [R, T, Hv], lse [R, T])`` with ``R = B * N`` (``lse = -inf``, ``o = 0`` where a
  query has no allowed key).  ``lax.scan`` over steps of :func:`_moba_gather_group` chunks
  of ``P`` slots, each chunk of one key block (:func:`_moba_gather_layout`); each slot's
  partial ``(o, lse)`` over its block is gathered back to ``[T, top_k]`` and merged by
  log-sum-exp.  The backward is flash-style: it recomputes each chunk's probabilities from
  the saved per-query ``lse`` (no autodiff through the gathers), scatter-adds ``dq`` back
  to the slots' queries and accumulates ``dk``/``dv`` per key block."""
  return _moba_gather_partial_fwd_impl(q, k, v, idx_BNTk, block_size, scale, chunk)


def _moba_gather_partial_fwd(q, k, v, idx_BNTk, block_size, scale, chunk):
  o_RTD, lse_RT = _moba_gather_partial_fwd_impl(q, k, v, idx_BNTk, block_size, scale, chunk)
  return (o_RTD, lse_RT), (q, k, v, idx_BNTk, o_RTD, lse_RT)


def _moba_gather_partial_bwd(block_size, scale, chunk, res, cts):
  q, k, v, idx_BNTk, o_RTD, lse_RT = res
  do_RTD, dlse_RT = cts
  B, T, N, H = q.shape
  S, K, Hv = k.shape[1], k.shape[2], v.shape[3]
  bs = block_size
  nk = -(-S // bs)
  R = B * N
  row_U, xs, _, k_F, v_F, q_RTH = _moba_gather_setup(q, k, v, idx_BNTk, block_size, chunk)
  row_U1 = row_U[:, None]
  do_RTD = do_RTD.astype(_F32)
  # d lse_i / d s_ij = p_ij: a cotangent on lse enters as -dlse in D_i = do_i . o_i - dlse_i
  D_RT = row_dot(do_RTD, o_RTD) - dlse_RT.astype(_F32)
  lse0_RT = jnp.where(jnp.isfinite(lse_RT), lse_RT, 0.0)

  def step(carry, x):
    dq_RTH, dk_F, dv_F = carry
    i_UP, c_U, f_U = x
    ic = jnp.minimum(i_UP, T - 1)
    q_UPH, k_USH, v_USD = q_RTH[row_U1, ic], k_F[f_U], v_F[f_U]
    do_UPD = do_RTD[row_U1, ic]
    # key-major [U, bs, P] logits: dk and dv are then plain (non-transposed) products
    sT = einsum_f32("ush,uph->usp", k_USH, q_UPH) * scale
    j_US = c_U[:, None] * bs + jnp.arange(bs, dtype=jnp.int32)[None, :]
    allowed = (i_UP < T)[:, None, :] & (j_US < S)[:, :, None]
    pT = jnp.where(allowed, jnp.exp(sT - lse0_RT[row_U1, ic][:, None, :]), 0.0)
    dpT = jnp.einsum("usd,upd->usp", v_USD.astype(_F32), do_UPD)
    dsT = pT * (dpT - D_RT[row_U1, ic][:, None, :]) * scale
    dq_UPH = jnp.einsum("usp,ush->uph", dsT, k_USH.astype(_F32))
    dk_USH = jnp.einsum("usp,uph->ush", dsT, q_UPH.astype(_F32))
    dv_USD = jnp.einsum("usp,upd->usd", pT, do_UPD)
    dq_RTH = dq_RTH.at[row_U1, i_UP].add(dq_UPH, mode="drop")
    return (dq_RTH, dk_F.at[f_U].add(dk_USH), dv_F.at[f_U].add(dv_USD)), None

  init = (jnp.zeros((R, T, H), _F32), jnp.zeros(k_F.shape, _F32), jnp.zeros(v_F.shape, _F32))
  (dq_RTH, dk_F, dv_F), _ = jax.lax.scan(step, init, xs)
  dq = dq_RTH.reshape(B, N, T, H).transpose(0, 2, 1, 3).astype(q.dtype)
  dk = dk_F.reshape(B, K, nk * bs, H).transpose(0, 2, 1, 3)[:, :S].astype(k.dtype)
  dv = dv_F.reshape(B, K, nk * bs, Hv).transpose(0, 2, 1, 3)[:, :S].astype(v.dtype)
  return dq, dk, dv, None


_moba_gather_partial.defvjp(_moba_gather_partial_fwd, _moba_gather_partial_bwd)


def _block_sparse_serves(*sizes: int) -> bool:
  """Whether the C++ kernel's block-sparse mode (:func:`attnjax.core.hooks.block_sparse`)
  can run here for these tile / head sizes: CPU backend, kernel built, every size a
  multiple of 16."""
  return (jax.default_backend() == "cpu" and not any(x % 16 for x in sizes)
          and hooks.block_sparse_available())


def _default_scale(scale, H: int) -> float:
  """``scale`` as a Python float, ``1 / sqrt(H)`` when None."""
  return (1.0 / math.sqrt(H)) if scale is None else float(scale)


def _is_static_scale(scale) -> bool:
  """Whether ``scale`` is None or a Python / NumPy real scalar: the gather paths need it
  as a static float (:func:`_default_scale`), not a traced value."""
  return scale is None or (not isinstance(scale, bool) and isinstance(
      scale, (int, float, np.floating, np.integer)))


def _rows_to_btnh(o_RTD, B: int, dtype):
  """The gather paths' per-row output ``[R, T, Hv]`` (``R = B * N``, row ``b * N + h``)
  as ``[B, T, N, Hv]`` in ``dtype``."""
  R, T, Hv = o_RTD.shape
  return o_RTD.reshape(B, R // B, T, Hv).transpose(0, 2, 1, 3).astype(dtype)


def _moba_kernel_blocks(block_size: int, H: int, Hv: int):
  """``(P, block_k)`` when the gathered blocks can run on the C++ kernel's block-sparse
  mode (:func:`_block_sparse_serves` for the head dims and a key tile of 16..64 keys
  dividing ``block_size``), else None.  Chunks of at most 64 slots and 64-key tiles:
  half the padding per block group and finer diagonal tiles than 128 (causal S=16384,
  block 512, top_k 3: fwd+bwd about 7% faster, the forward within noise; routing.md)."""
  bk = next((b for b in (64, 32, 16) if block_size % b == 0), None)
  if bk is None or not _block_sparse_serves(H, Hv):
    return None
  return min(64, _moba_gather_chunk(block_size)), bk


def _moba_own_lists(*, T: int, bs: int, P: int, bk: int):
  """The static part of causal MoBA's kernel call: the own blocks as chunks of ``P``
  query slots (block ``c``'s queries in order, padded to ``jn = ceil(bs / P)`` chunks)
  against their block's key tiles under the causal mask (integer bookkeeping, NumPy).

  Returns ``own_q [nk * jn * P]`` (the query of each own slot, ``T`` for padding),
  ``own_slot [T]`` (each query's own slot), ``qlist, qcode [nk * jn, nsub]`` (the tiles of
  each own chunk: ``-1`` ends a list / a full tile), ``klist, kcode [nk * nsub, jn]`` (the
  own chunks of each key tile) and ``pats [n, P, bk]`` (the causal patterns, numbered
  from 1: pattern 0 is the caller's); tiles wholly above the diagonal or past ``T`` are
  not listed."""
  nk, jn, nsub = -(-T // bs), -(-bs // P), bs // bk
  r_P, c_B = np.arange(P), np.arange(bk)
  own_q = np.full((nk, jn, P), T, np.int64)
  qlist = np.full((nk * jn, nsub), -1, np.int32)
  qcode = np.full((nk * jn, nsub), -1, np.int32)
  klist = np.full((nk * nsub, jn), -1, np.int32)
  kcode = np.full((nk * nsub, jn), -1, np.int32)
  kfill = np.zeros(nk * nsub, np.int64)
  pats, pat_of = [], {}
  for c in range(nk):
    n_rows = min(bs, T - c * bs)                       # the block's real queries
    for j in range(jn):
      lo, hi = j * P, min(j * P + P, n_rows) - 1       # the chunk's real rows (in block)
      if hi < lo:
        continue
      own_q[c, j, :hi - lo + 1] = c * bs + lo + np.arange(hi - lo + 1)
      ch, n = c * jn + j, 0
      for t in range(nsub):
        if t * bk > hi or c * bs + t * bk >= T:       # above the diagonal / past T
          break
        if t * bk + bk - 1 <= lo:
          code = -1                                    # every row sees the whole tile
        else:
          d = lo - t * bk                              # row r sees column <= d + r
          if d not in pat_of:
            pat_of[d] = len(pats) + 1
            pats.append((c_B[None, :] <= d + r_P[:, None]).astype(np.uint8))
          code = pat_of[d]
        qlist[ch, n], qcode[ch, n] = c * nsub + t, code
        tile = c * nsub + t
        klist[tile, kfill[tile]], kcode[tile, kfill[tile]] = ch, code
        kfill[tile] += 1
        n += 1
  own_slot = (np.arange(T) // bs) * (jn * P) + np.arange(T) % bs
  pats = np.stack(pats) if pats else np.zeros((0, P, bk), np.uint8)
  return own_q.reshape(-1), own_slot, qlist, qcode, klist, kcode, pats


def _moba_gathered_on_kernel(q, k, v, idx_BNTk, *, block_size: int, scale: float,
                             chunk: int, block_k: int, own: bool = False):
  """The partial softmax of each query over its chosen blocks on the C++ kernel: float32
  ``(o [R, T, Hv], lse [R, T])``, ``R = B * N``.  ``idx_BNTk [B, N, T, k]`` (entries
  ``>= nk`` select nothing) are gathered with no mask; with ``own`` (causal MoBA, needs
  ``T == S``) the query's own block is computed too, under the causal mask, and ``idx``
  holds only the earlier blocks.

  One kernel call per row ``(b, h)`` (``jax.lax.map``):
  the row's slots of :func:`_moba_gather_layout` (its (query, block) pairs grouped by
  block, each group padded to a multiple of ``P = chunk``) are gathered rows of ``q``
  forming a query sequence ``[1, slots, 1, H]`` (padding slots are zero rows) against
  the row's kv head ``[1, Sp, 1, H]`` (``Sp = nk * block_size``).  Query block ``i`` (a
  chunk) visits the ``block_size / block_k`` key tiles of its chunk's key block, all full
  except the one straddling ``S`` (pattern 0; a tile starting past ``S`` is dropped);
  key tile ``j``'s transposed list is the contiguous run of chunks of its block (found by
  ``searchsorted``; lists built in-graph).  With ``own``, the slots start with the own
  blocks (:func:`_moba_own_lists`: static, each block's queries in order, the diagonal
  tiles as causal patterns, the tiles above it not visited), so the whole of causal
  MoBA is one call per row.  So the kernel computes exactly the chosen blocks at its
  GEMM rate.  Each slot's ``(o, lse)`` is gathered back to ``[T, k]`` and merged by
  log-sum-exp (:func:`_moba_merge_slots`).  The map has a custom VJP: the forward keeps
  each slot's ``lse`` and the kernel's statistics, the backward rebuilds the gathered
  rows and lists, maps the merged cotangents to the slots (:func:`_moba_merge_slots_vjp`),
  runs the kernel's backward (:func:`attnjax.core.hooks.block_sparse_parts`) and sums
  each query's slot gradients by gathers; no forward is recomputed."""
  B, T, N, H = q.shape
  S, K, Hv = k.shape[1], k.shape[2], v.shape[3]
  G, bs, P, bk = N // K, block_size, chunk, block_k
  nk = -(-S // bs)
  Sp = nk * bs
  R = B * N
  nsub = bs // bk
  # The layout of each row (integers, no gradient), one row at a time: its [T, nk]
  # prefix counts exist for one head at a time; built once here and passed to the
  # custom VJP below, so the backward does not rebuild it.
  layout = jax.lax.map(
      lambda idx_r: tuple(x[0] for x in _moba_gather_layout(idx_r[None, None], T=T, nk=nk,
                                                             chunk=P)),
      idx_BNTk.reshape(R, T, idx_BNTk.shape[-1]))
  n_ch = layout[1].shape[1]                                   # the layout's chunk count
  # The static parts of the lists (the same for every row).
  if own:
    own_q, own_slot, oq_list, oq_code, ok_list, ok_code, own_pats = _moba_own_lists(
        T=T, bs=bs, P=P, bk=bk)
  else:
    own_q, own_slot = np.zeros(0, np.int64), None
    oq_list = oq_code = np.zeros((0, nsub), np.int32)
    ok_list = ok_code = np.zeros((nk * nsub, 0), np.int32)
    own_pats = np.zeros((0, P, bk), np.uint8)
  n_own, own_total = oq_list.shape[0], own_q.shape[0]
  total = own_total + n_ch * P
  sub = np.arange(nsub, dtype=np.int32)     # NumPy: the custom VJP below closes over it
  ragged = S % bk != 0
  last_tile = (S - 1) // bk                                   # the tile straddling S
  blk_all = np.arange(nk, dtype=np.int32)
  tile0_B = np.arange(nk)[:, None] * bs + np.arange(nsub)[None, :] * bk   # [nk, nsub]
  live_BS = tile0_B < S
  part_BS = (tile0_B // bk == last_tile) if ragged else np.zeros((nk, nsub), bool)
  kcode_g = np.where(part_BS.reshape(-1, 1), 0, -1).astype(np.int32)     # [nk * nsub, 1]
  straddle = np.zeros((1, P, bk), np.uint8)
  straddle[0, :, :S - last_tile * bk] = 1
  pats = np.concatenate([straddle, own_pats])
  # key tile lists: the tile's own chunks (static count n_o), then its gathered chunks
  n_o = (ok_list >= 0).sum(1)                                             # [nk * nsub]
  Lk = ok_list.shape[1] + n_ch
  at_L = np.arange(Lk)[None, :] - n_o[:, None]               # gathered entry of position
  own_part = np.pad(ok_list, ((0, 0), (0, Lk - ok_list.shape[1])), constant_values=-1)
  own_kcode = np.pad(ok_code, ((0, 0), (0, Lk - ok_code.shape[1])), constant_values=-1)

  def prep(q, k, v, r, slot_q, blk_r):
    """One (batch row, query head): its slots as a query sequence ``q_long [1, slots, 1,
    H]`` (float32; padding slots are zero rows) against its kv head's keys ``[1, Sp, 1,
    H]``, the kernel's lists, and the query of each slot (``T``: padding)."""
    b, n = r // N, r % N
    zero = jnp.zeros((), jnp.int32)
    q_r = jax.lax.dynamic_slice(q, (b, zero, n, zero), (1, T, 1, H)).reshape(T, H)
    kv = lambda x: jax.lax.dynamic_slice(x, (b, zero, n // G, zero),
                                         (1, S, 1, x.shape[3])).reshape(1, S, 1, x.shape[3])
    k_r, v_r = kv(k).astype(_F32), kv(v).astype(_F32)
    if Sp > S:
      pad = ((0, 0), (0, Sp - S), (0, 0), (0, 0))
      k_r, v_r = jnp.pad(k_r, pad), jnp.pad(v_r, pad)
    slot_all = jnp.concatenate([jnp.asarray(own_q, jnp.int32), slot_q])
    real = slot_all < T                                      # padding slots: zero rows
    q_long = jnp.where(real[:, None], q_r[jnp.minimum(slot_all, T - 1)].astype(_F32), 0)
    q_long = q_long.reshape(1, total, 1, H)
    # The layout's chunk count is a static bound; the chunks past the row's last group
    # hold only padding slots (a live chunk starts with a real slot: groups are padded
    # to whole chunks) and visit no tile.  They trail the live ones.
    live = slot_q[::P] < T                                                   # [n_ch]
    # gathered chunk c visits key tiles blk * nsub + s (a tile starting at or past S is
    # dropped: -1 ends the list; the one straddling S has pattern 0)
    tile0 = blk_r[:, None] * bs + sub[None, :] * bk                         # [n_ch, nsub]
    qlist = jnp.where((tile0 < S) & live[:, None], blk_r[:, None] * nsub + sub[None, :], -1)
    part = (tile0 // bk == last_tile) if ragged else jnp.zeros(tile0.shape, bool)
    qcode = jnp.where(part, 0, -1)
    qlist = jnp.concatenate([jnp.asarray(oq_list), qlist.astype(jnp.int32)])
    qcode = jnp.concatenate([jnp.asarray(oq_code), qcode.astype(jnp.int32)])
    # key tile (blk, s) <- its own chunks, then the contiguous run of gathered chunks
    # [start, end) of block blk (numbered after the own chunks)
    start = jnp.searchsorted(blk_r, blk_all, side="left")
    end = jnp.minimum(jnp.searchsorted(blk_r, blk_all, side="right"), live.sum())
    ch = jnp.repeat(start, nsub)[:, None] + at_L                           # [nk*nsub, Lk]
    gathered = (at_L >= 0) & (ch < jnp.repeat(end, nsub)[:, None]) & live_BS.reshape(-1, 1)
    klist = jnp.where(gathered, ch + n_own, own_part)
    kcode = jnp.where(gathered, kcode_g, own_kcode)
    lists = (qlist, qcode, klist.astype(jnp.int32), kcode.astype(jnp.int32), pats)
    return q_long, k_r, v_r, lists, slot_all

  def dest_of(dest_g):
    """Each query's slots ``[T, k]`` (``total``: none)."""
    dest = dest_g + own_total                     # own_total + n_ch * P = total: none
    if own:
      dest = jnp.concatenate([jnp.broadcast_to(jnp.asarray(own_slot, jnp.int32)[:, None],
                                               (T, 1)), dest], axis=1)
    return dest

  kern_fwd, kern_bwd = hooks.block_sparse_parts()
  kw = dict(block_q=P, block_k=bk, scale=scale)

  def forward(q, k, v, layout):
    """``(o [R, T, Hv], lse [R, T])`` and the kernel's per-row results."""
    def row(x):
      r, slot_q, blk_r, dest_g = x
      q_long, k_r, v_r, lists, _ = prep(q, k, v, r, slot_q, blk_r)
      out, lse, stats = kern_fwd(q_long, k_r, v_r, *lists, **kw)
      o_r, lse_r = _moba_merge_slots(out.reshape(1, total, Hv), lse.reshape(1, total),
                                     dest_of(dest_g)[None])
      return (o_r[0], lse_r[0]), (lse.reshape(total), stats)
    return jax.lax.map(row, (jnp.arange(R, dtype=jnp.int32), *layout))

  # One kernel call per row (lax.map).  The backward keeps each row's kernel statistics
  # and slot lse (a few floats per slot; the slots' outputs are not needed, see
  # _moba_merge_slots_vjp) and rebuilds only the cheap gathers and lists: no forward is
  # rematerialised.  q, k and v are sliced per row (no transposed or stacked copies).
  @jax.custom_vjp
  def rows(q, k, v, layout):
    return forward(q, k, v, layout)[0]

  def rows_fwd(q, k, v, layout):
    (o_R, lse_R), kept = forward(q, k, v, layout)
    return (o_R, lse_R), (q, k, v, layout, o_R, lse_R, kept)

  def rows_bwd(res, cts):
    q, k, v, layout, o_R, lse_R, (lses_R, stats_R) = res
    do_R, dlse_R = cts

    def row(x):
      r, slot_q, blk_r, dest_g, o_r, lse_r, lse_s, stats, do_r, dlse_r = x
      q_long, k_r, v_r, lists, slot_all = prep(q, k, v, r, slot_q, blk_r)
      do_s, delta_s = _moba_merge_slots_vjp(lse_s, slot_all, o_r, lse_r, do_r, dlse_r)
      dq_l, dk_r, dv_r = kern_bwd(q_long, k_r, v_r, do_s.reshape(1, total, 1, Hv), stats,
                                  delta_s.reshape(1, 1, total), *lists, **kw)
      # each query's slots gathered back (a scatter-add over the slots is slower on CPU)
      dest = dest_of(dest_g)
      dq_l = jnp.concatenate([dq_l.reshape(total, H), jnp.zeros((1, H), _F32)])
      dq_r = sum(dq_l[dest[:, j]] for j in range(dest.shape[1]))    # `total`: the zero row
      return dq_r, dk_r.reshape(Sp, H)[:S], dv_r.reshape(Sp, Hv)[:S]

    dq_R, dk_R, dv_R = jax.lax.map(row, (jnp.arange(R, dtype=jnp.int32), *layout, o_R, lse_R,
                                         lses_R, stats_R, do_R.astype(_F32),
                                         dlse_R.astype(_F32)))
    kv_grad = lambda g: g.reshape(B, K, G, S, g.shape[-1]).sum(2).transpose(0, 2, 1, 3)
    dq = dq_R.reshape(B, N, T, H).transpose(0, 2, 1, 3).astype(q.dtype)
    return dq, kv_grad(dk_R).astype(k.dtype), kv_grad(dv_R).astype(v.dtype), None

  rows.defvjp(rows_fwd, rows_bwd)
  return rows(q, k, v, tuple(layout))


def _moba_merge_slots(o_RXD, lse_RX, dest_RTk):
  """Each query's slots ``dest_RTk [R, T, k]`` (``>= slots``: none) of the per-slot
  partials ``(o [R, slots, Hv], lse [R, slots])`` merged by log-sum-exp: float32
  ``(o [R, T, Hv], lse [R, T])`` (0 / -inf for a query with no slot)."""
  R, total, Hv = o_RXD.shape
  T, kk = dest_RTk.shape[1], dest_RTk.shape[2]
  ok_RTk = dest_RTk < total
  src_RTk = jnp.minimum(dest_RTk, total - 1)
  lse_RTk = jnp.where(ok_RTk, jnp.take_along_axis(lse_RX, src_RTk.reshape(R, T * kk), axis=1)
                      .reshape(R, T, kk), -jnp.inf)
  mx = jnp.max(lse_RTk, axis=-1, keepdims=True)
  mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
  w = jnp.exp(lse_RTk - mx)                                                  # [R, T, kk]
  den = w.sum(-1)
  pos = den > 0
  den1 = jnp.where(pos, den, 1.0)
  o_RTD = jnp.zeros((R, T, Hv), _F32)
  for j in range(kk):                   # one [R, T, Hv] partial at a time
    o_RTD = o_RTD + w[:, :, j, None] * jnp.take_along_axis(o_RXD, src_RTk[:, :, j, None],
                                                           axis=1)
  o_RTD = o_RTD / den1[..., None]
  lse_RT = jnp.where(pos, mx[..., 0] + jnp.log(den1), -jnp.inf)
  return o_RTD, lse_RT


def _moba_merge_slots_vjp(lse_X, slot_q, o_TD, lse_T, do_TD, dlse_T):
  """The VJP of :func:`_moba_merge_slots` for one row, as the kernel's backward takes it:
  ``(do [slots, Hv], delta [slots])`` for the slots' ``(o, lse)`` from the cotangents of
  the merged ``(o [T, Hv], lse [T])``; ``slot_q [slots]`` is the query of each slot
  (``T``: padding).  Slot ``s`` of query ``t`` weighs ``w_s = exp(lse_s - lse_t)`` in
  ``o_t``, so ``do_s = w_s do_t`` and ``dlse_s = w_s (do_t . (o_s - o_t) + dlse_t)``,
  hence ``delta_s = do_s . o_s - dlse_s = w_s (do_t . o_t - dlse_t)``: the slots'
  outputs are not needed.  Gathers by ``slot_q`` (no scatter); padding slots get 0."""
  T = o_TD.shape[0]
  real = slot_q < T
  t = jnp.minimum(slot_q, T - 1)
  lse_t = lse_T[t]
  live = real & jnp.isfinite(lse_t)
  w = jnp.where(live, jnp.exp(lse_X - jnp.where(live, lse_t, 0.0)), 0.0)      # [slots]
  return w[:, None] * do_TD[t], w * (row_dot(do_TD, o_TD) - dlse_T)[t]


def _moba_gathered(q, k, v, idx_BNTk, *, block_size: int, scale: float):
  """The unmasked partial softmax of each query over its chosen blocks ``idx_BNTk``
  (entries ``>= nk`` select nothing): float32 ``(o [R, T, Hv], lse [R, T])``, on the C++
  kernel where it serves (:func:`_moba_kernel_blocks`), else the XLA scan."""
  idx = jax.lax.stop_gradient(idx_BNTk).astype(jnp.int32)
  kernel = _moba_kernel_blocks(block_size, q.shape[3], v.shape[3])
  if kernel is not None:
    return _moba_gathered_on_kernel(q, k, v, idx, block_size=int(block_size), scale=scale,
                                    chunk=kernel[0], block_k=kernel[1])
  return _moba_gather_partial(q, k, v, idx, int(block_size), scale,
                              _moba_gather_chunk(block_size))


def _moba_own_plus_gathered(q, k, v, idx_BNTk, *, block_size: int, scale):
  """Causal MoBA on the gather path: the own block (slot 0 of ``idx_BNTk``) under the
  causal mask plus the earlier chosen blocks (slots ``1..``) with no mask.  Where the C++
  kernel serves (:func:`_moba_kernel_blocks`) and blocks are chosen beyond the own one,
  both are one kernel call per row (:func:`_moba_gathered_on_kernel` with ``own``).
  Otherwise the own block is the band ``block_start(i) <= j <= i``, run by
  :func:`attnjax.attention` with ``chunked(block_size) & causal()`` (on CPU the C++
  kernel's band mode), the earlier blocks on the key-block-major gather path, and the two
  partial softmaxes are merged by log-sum-exp (the band's ``lse`` is differentiable).
  Returns ``[B, T, N, Hv]`` in ``q.dtype``."""
  B, T, N, H = q.shape
  Hv = v.shape[3]
  kernel = _moba_kernel_blocks(block_size, H, Hv)
  if kernel is not None and idx_BNTk.shape[-1] > 1:
    idx = jax.lax.stop_gradient(idx_BNTk[..., 1:]).astype(jnp.int32)
    o_RTD, _ = _moba_gathered_on_kernel(q, k, v, idx, block_size=int(block_size),
                                        scale=_default_scale(scale, H), chunk=kernel[0],
                                        block_k=kernel[1], own=True)
    return _rows_to_btnh(o_RTD, B, q.dtype)
  own, lse_own = hooks.attention(q, k, v, mask=_masks.chunked(block_size) & _masks.causal(),
                                 scale=scale, return_lse=True)
  if idx_BNTk.shape[-1] == 1:
    return own.astype(q.dtype)
  o_RTD, lse_RT = _moba_gathered(q, k, v, idx_BNTk[..., 1:], block_size=block_size,
                                 scale=_default_scale(scale, H))
  o_g = _rows_to_btnh(o_RTD, B, _F32)
  lse_g = lse_RT.reshape(B, N, T)                # -inf where nothing earlier was chosen
  out, _ = merge_partials(own, jnp.swapaxes(lse_own, 1, 2), o_g, jnp.swapaxes(lse_g, 1, 2))
  return out.astype(q.dtype)


def moba_attention(q, k, v, *, block_size: int, top_k: int, causal: bool = True,
                   scale: Optional[float] = None, implementation=None, block_sizes=None):
  """MoBA: Mixture of Block Attention (per-query top-k key blocks).

  Keys are split into blocks of ``block_size`` (the last may be shorter).  The gate of
  query ``i``, head ``h`` and block ``c`` is ``q_ih . mean_{j in c} k_j`` (the kv head of
  ``h`` under GQA).  Causal: the query's own block is always chosen and masked causally
  (``j <= i``), plus the ``top_k - 1`` earlier blocks with the highest gates (all of them
  when fewer); later blocks are never chosen.  Non-causal: the ``top_k`` highest-gate
  blocks.  Output: ``o_i = sum_{j chosen} softmax_j(scale q_i . k_j) v_j``.

  Two evaluations.  ``implementation='gather'`` (the default on the CPU backend without
  ``block_sizes``) is
  key-block-major: per head, the (query, chosen block) pairs are grouped by block and
  processed in chunks of queries gathered against their block's keys, with the partial
  softmaxes merged by log-sum-exp.  With the C++ kernel (CPU) every head is one
  block-sparse call whose query sequence is the gathered slots (causal: the own blocks
  first, their diagonal tiles under causal patterns); otherwise an XLA scan with a
  flash-style custom VJP, and causal, the own block is the band
  ``block_start(i) <= j <= i``, one :func:`attnjax.attention` call with
  ``chunked(block_size) & causal()``, merged by log-sum-exp.  Its cost is
  ``O(T * top_k * block_size)`` whatever the routing.  Any other ``implementation``
  (and ``None`` off CPU) passes the choice (:func:`moba_selection`, a per-token
  ``[B, N, T, nk]`` array) as :func:`attnjax.masks.from_row_block_mask` (``& causal()``) to
  :func:`attnjax.attention`: blockwise implementations visit a ``(q block, k block)``
  tile when some query of the q block chose the key block (by default ``'xla_chunked'``
  tiles are ``block_size x block_size``) and evaluate the per-row choice there.  The
  top-k choice is not differentiated; gradients flow through the chosen logits.

  Paper: "MoBA: Mixture of Block Attention for Long-Context LLMs" (Lu et al., 2025); the
  video variant "VMoBA: Mixture-of-Block Attention for Video Diffusion Models".

  Args:
    q: ``[B, T, N, H]``; k: ``[B, T, K, H]``; v: ``[B, T, K, Hv]`` (``T == S``).
    block_size: keys per block (positive int).
    top_k: blocks per query, ``1 <= top_k <= ceil(T / block_size)``.
    causal: causal LM form (default) or bidirectional top-k.
    scale: logit scale, default ``1/sqrt(H)``.
    implementation: ``'gather'``, or passed to :func:`attnjax.attention` with
      ``block_sizes``; ``None``: ``'gather'`` on the CPU backend when ``block_sizes`` is
      None, else the dispatcher's choice.  ``block_sizes=None`` gives ``'xla_chunked'``
      ``block_size`` tiles (Pallas kernels: pass their ``BlockSizes`` with
      ``block_k = block_size`` so the table is tile-aligned).

  Returns:
    ``[B, T, N, Hv]`` in ``q.dtype``.
  """
  op = "moba_attention"
  B, T, S, N, K, H, Hv = _check_btnh(op, q, k, v, same_len=True)
  bs = _pos_int(op, "block_size", block_size)
  top_k = _pos_int(op, "top_k", top_k)
  if not isinstance(causal, bool):
    raise TypeError(f"{op}: causal must be a bool, got {causal!r}")
  nk = -(-S // bs)
  if top_k > nk:
    raise ValueError(f"{op}: top_k must be <= the number of key blocks ceil(T / block_size) = "
                     f"{nk} (T={T}, block_size={bs}), got top_k={top_k}")
  gather = (isinstance(implementation, str) and implementation == "gather") or (
      implementation is None and block_sizes is None and jax.default_backend() == "cpu")
  if gather and hooks.observing():
    # attnjax.analysis (only while a capture observes; never in training): the gather path
    # as one observed call, its map that of the equivalent mask (selection AND causal)
    return hooks.intercepted("softmax", lambda: moba_attention(
        q, k, v, block_size=bs, top_k=top_k, causal=causal, scale=scale,
        implementation=implementation, block_sizes=block_sizes), q, k, v,
        probs=lambda: _moba_probs(q, k, bs, top_k, causal, scale))
  if gather:
    if block_sizes is not None:
      raise ValueError(f"{op}: block_sizes is for the kernels of attnjax.attention; "
                       f"implementation='gather' takes none, got {block_sizes!r}")
    if not _is_static_scale(scale):
      raise TypeError(f"{op}: implementation='gather' needs scale to be a Python float or "
                      f"None, got {type(scale).__name__}")
    idx = _moba_choice(q, k, block_size=bs, top_k=top_k, causal=causal)
    if not causal:
      o_RTD, _ = _moba_gathered(q, k, v, idx, block_size=bs, scale=_default_scale(scale, H))
      return _rows_to_btnh(o_RTD, B, q.dtype)
    return _moba_own_plus_gathered(q, k, v, idx, block_size=bs, scale=scale)
  sel_BNTC = moba_selection(q, k, block_size=bs, top_k=top_k, causal=causal)
  mask = _masks.from_row_block_mask(sel_BNTC, bs)
  if causal:
    mask = mask & _masks.causal()
  return hooks.attention(q, k, v, mask=mask, scale=scale, implementation=implementation,
                         block_sizes=_default_block_sizes(block_sizes, bs, bs))


# ----------------------------------------------------------------------------- VMoBA

def to_block_major(x, block):
  """``[B, *grid, C, D]`` -> ``[B, T, C, D]`` with the tokens of each ``block`` (a tuple
  dividing ``grid`` per axis) contiguous: blocks in row-major order over the block grid,
  tokens row-major inside a block (1D: the identity; 2D/3D: VMoBA's partitions)."""
  B, grid, C, D = x.shape[0], tuple(x.shape[1:-2]), x.shape[-2], x.shape[-1]
  nd = len(grid)
  split = []
  for g, b in zip(grid, block):
    split += [g // b, b]
  x = x.reshape((B, *split, C, D))
  order = [0] + [1 + 2 * i for i in range(nd)] + [2 + 2 * i for i in range(nd)] + \
      [1 + 2 * nd, 2 + 2 * nd]
  return x.transpose(order).reshape(B, math.prod(grid), C, D)


def from_block_major(x, block, grid):
  """Inverse of :func:`to_block_major`: ``[B, T, C, D]`` -> ``[B, *grid, C, D]``."""
  B, C, D = x.shape[0], x.shape[-2], x.shape[-1]
  nd = len(grid)
  x = x.reshape((B, *[g // b for g, b in zip(grid, block)], *block, C, D))
  order = [0]
  for i in range(nd):
    order += [1 + i, 1 + nd + i]
  order += [1 + 2 * nd, 2 + 2 * nd]
  return x.transpose(order).reshape((B, *grid, C, D))


def threshold_selection(gate_BNTC, threshold: float):
  """VMoBA's threshold selection (no gradient): per query, the blocks in decreasing gate
  order until the cumulative share ``softmax(gate)`` reaches ``threshold`` (at least one
  block): block of rank ``r`` is kept iff the shares of the ``r`` higher blocks sum to
  less than ``threshold``.  Returns bool of the shape of ``gate_BNTC``."""
  g = jax.lax.stop_gradient(gate_BNTC).astype(_F32)
  share = jax.nn.softmax(g, axis=-1)
  order = jnp.argsort(-share, axis=-1)
  sorted_share = jnp.take_along_axis(share, order, axis=-1)
  before = jnp.cumsum(sorted_share, axis=-1) - sorted_share
  keep_sorted = before < threshold
  rank = jnp.argsort(order, axis=-1)
  return jnp.take_along_axis(keep_sorted, rank, axis=-1)




def vmoba_attention(q, k, v, *, block_shape, top_k: Optional[int] = None,
                    threshold: Optional[float] = None, scale: Optional[float] = None,
                    implementation=None, block_sizes=None):
  """VMoBA: bidirectional MoBA on a 1D/2D/3D token grid with block partitions.

  The grid ``[B, *grid, N, H]`` (1-3 axes, e.g. video ``(T, H, W)``) is partitioned into
  blocks of ``block_shape`` (dividing the grid per axis; VMoBA alternates 1D, 2D and 3D
  partitions across layers, e.g. ``(1, 1, W)``, ``(1, h, w)``, ``(t, h, w)``).  Gate of
  query ``i``, head ``h``, block ``c``: ``q_ih . mean_{j in c} k_j``.  Each query keeps the
  ``top_k`` highest-gate blocks, or with ``threshold`` the blocks in decreasing gate order
  until the cumulative ``softmax(gate)`` share reaches ``threshold``
  (:func:`threshold_selection`); softmax attention over the kept blocks' keys.  Tokens are
  permuted to block-major order (:func:`to_block_major`).  With ``top_k``, on the CPU
  backend (``implementation=None``, no ``block_sizes``) or with ``implementation='gather'``
  the choice runs on :func:`moba_attention`'s key-block-major gather path (non-causal; on
  the C++ kernel's block-sparse mode where it serves): cost ``O(T * top_k * block)``
  whatever the routing.  Otherwise (and with ``threshold``) the choice is a
  :func:`attnjax.masks.from_row_block_mask` over contiguous blocks passed to
  :func:`attnjax.attention`.  Not differentiated through the choice.  (VMoBA's selection
  of blocks globally across a head's queries is not implemented; the choice is per query
  as in MoBA.)

  Paper: "VMoBA: Mixture-of-Block Attention for Video Diffusion Models".

  Args:
    q: ``[B, *grid, N, H]``; k: ``[B, *grid, K, H]``; v: ``[B, *grid, K, Hv]``.
    block_shape: int or tuple per grid axis, dividing the grid.
    top_k: blocks per query (``1 <= top_k <= number of blocks``); or
    threshold: a share in ``(0, 1]`` (exactly one of ``top_k`` and ``threshold``).
    scale, implementation, block_sizes: as in :func:`moba_attention`.

  Returns:
    ``[B, *grid, N, Hv]`` in ``q.dtype``.
  """
  op = "vmoba_attention"
  _arrays(op, q=q, k=k, v=v)
  nd = q.ndim - 3
  if nd not in (1, 2, 3):
    raise ValueError(f"{op}: q must be [B, *grid, N, H] with 1 to 3 grid axes (rank 4 to 6), "
                     f"got shape {tuple(q.shape)}")
  grid = tuple(int(g) for g in q.shape[1:-2])
  if k.ndim != q.ndim or v.ndim != q.ndim or tuple(k.shape[:-2]) != tuple(q.shape[:-2]) or \
      tuple(v.shape[:-1]) != tuple(k.shape[:-1]):
    raise ValueError(f"{op}: k, v must be [B, *grid, K, dim] on the grid of q "
                     f"{tuple(q.shape[:-2])}, got k {tuple(k.shape)}, v {tuple(v.shape)}")
  if isinstance(block_shape, (int, np.integer)) and not isinstance(block_shape, bool):
    block_shape = (int(block_shape),) * nd
  if not isinstance(block_shape, (tuple, list)) or len(block_shape) != nd:
    raise ValueError(f"{op}: block_shape must be an int or a tuple of {nd} ints, got "
                     f"block_shape={block_shape!r}")
  block = tuple(_pos_int(op, "block_shape", b) for b in block_shape)
  if any(g % b for g, b in zip(grid, block)):
    raise ValueError(f"{op}: block_shape must divide the grid {grid} per axis, got "
                     f"block_shape={block}")
  if (top_k is None) == (threshold is None):
    raise ValueError(f"{op}: give exactly one of top_k and threshold, got top_k={top_k!r}, "
                     f"threshold={threshold!r}")
  explicit = isinstance(implementation, str) and implementation == "gather"
  if explicit and (threshold is not None or block_sizes is not None):
    raise ValueError(f"{op}: implementation='gather' needs top_k (not threshold) and no "
                     f"block_sizes, got threshold={threshold!r}, block_sizes={block_sizes!r}")
  if explicit and not _is_static_scale(scale):
    raise TypeError(f"{op}: implementation='gather' needs scale to be a Python float or "
                    f"None, got {type(scale).__name__}")
  # the key-block-major gather path of moba_attention (non-causal): explicit, or the CPU
  # default for top_k when nothing else is asked for; under an analysis capture the mask
  # path instead, an observable attnjax.attention call with the same numbers
  gather = not hooks.observing() and (explicit or (
      implementation is None and block_sizes is None and threshold is None
      and jax.default_backend() == "cpu" and _is_static_scale(scale)))
  if explicit and not gather:           # observed: the mask path (same numbers), any impl
    implementation = None
  qf, kf, vf = (to_block_major(x, block) for x in (q, k, v))
  _check_btnh(op, qf, kf, vf, same_len=True)
  P = math.prod(block)
  nk = math.prod(grid) // P
  gate = _block_gates(qf, kf, P)
  if top_k is not None:
    top_k = _pos_int(op, "top_k", top_k)
    if top_k > nk:
      raise ValueError(f"{op}: top_k must be <= the number of blocks {nk}, got top_k={top_k}")
    _, idx = _top_k(gate, top_k)
    if not gather:
      sel = _onehot_any(idx, nk)
  else:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or \
        not 0.0 < float(threshold) <= 1.0:
      raise ValueError(f"{op}: threshold must be in (0, 1], got threshold={threshold!r}")
    sel = threshold_selection(gate, float(threshold))
  if gather:
    o_RTD, _ = _moba_gathered(qf, kf, vf, idx, block_size=P,
                              scale=_default_scale(scale, qf.shape[3]))
    return from_block_major(_rows_to_btnh(o_RTD, qf.shape[0], q.dtype), block, grid)
  mask = _masks.from_row_block_mask(sel, P)
  out = hooks.attention(qf, kf, vf, mask=mask, scale=scale, implementation=implementation,
                        block_sizes=_default_block_sizes(block_sizes, P, P))
  return from_block_major(out, block, grid)


# ----------------------------------------------------------------------------- BiFormer

def to_region_major(x, num_regions: int):
  """``[B, Hh, Ww, C, D]`` -> ``[B, R * P, C, D]``: regions (``num_regions`` x
  ``num_regions``, row-major) one after another, each region's tokens row-major inside it
  (``R = num_regions**2``, ``P = (Hh / num_regions) * (Ww / num_regions)``)."""
  B, Hh, Ww, C, D = x.shape
  r = num_regions
  rh, rw = Hh // r, Ww // r
  x = x.reshape(B, r, rh, r, rw, C, D).transpose(0, 1, 3, 2, 4, 5, 6)
  return x.reshape(B, r * r * rh * rw, C, D)


def from_region_major(x, num_regions: int, spatial):
  """Inverse of :func:`to_region_major`: ``[B, R * P, C, D]`` -> ``[B, Hh, Ww, C, D]``."""
  B, _, C, D = x.shape
  Hh, Ww = spatial
  r = num_regions
  rh, rw = Hh // r, Ww // r
  x = x.reshape(B, r, r, rh, rw, C, D).transpose(0, 1, 3, 2, 4, 5, 6)
  return x.reshape(B, Hh, Ww, C, D)


def _check_map(op, q, k, v):
  _arrays(op, q=q, k=k, v=v)
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 5:
      raise ValueError(f"{op}: {name} must have rank 5 ([B, Hh, Ww, N, H] layout), got shape "
                       f"{tuple(x.shape)}")
  if tuple(k.shape[:3]) != tuple(q.shape[:3]) or tuple(v.shape[:4]) != tuple(k.shape[:4]):
    raise ValueError(f"{op}: k, v must be [B, Hh, Ww, K, dim] on the map of q "
                     f"{tuple(q.shape[:3])}, got k {tuple(k.shape)}, v {tuple(v.shape)}")
  if k.shape[4] != q.shape[4]:
    raise ValueError(f"{op}: k must have the head dim H={q.shape[4]} of q, got shape "
                     f"{tuple(k.shape)}")
  N, K = q.shape[3], k.shape[3]
  if N % K:
    raise ValueError(f"{op}: the query heads N={N} must be a multiple of the kv heads K={K} "
                     f"(GQA), got q {tuple(q.shape)}, k {tuple(k.shape)}")


def region_routing(q, k, *, num_regions: int, top_k: int):
  """BiFormer's routing (no gradient): bool ``[B, R, R]``, region ``r`` keeps region ``r'``.

  ``A[r, r'] = sum_h mean_{i in r} q_ih . mean_{j in r'} k_j,h//G`` (float32, all heads
  together); each region keeps its ``top_k`` regions by ``A``.  ``q [B, Hh, Ww, N, H]``,
  ``k [B, Hh, Ww, K, H]``; regions as in :func:`to_region_major`.
  """
  B, Hh, Ww, N, H = q.shape
  K = k.shape[3]
  G = N // K
  r = num_regions
  R = r * r

  def region_mean(x):                  # [B, Hh, Ww, C, H] -> [B, R, C, H], no transpose
    x = jax.lax.stop_gradient(x).astype(_F32)
    return x.reshape(B, r, Hh // r, r, Ww // r, *x.shape[3:]).mean((2, 4)).reshape(
        B, R, *x.shape[3:])
  qr_BRNH, kr_BRKH = region_mean(q), region_mean(k)
  aff_BRR = jnp.einsum("brkgh,bskh->brs", qr_BRNH.reshape(B, R, K, G, H), kr_BRKH,
                       precision=jax.lax.Precision.HIGHEST)
  _, idx = _top_k(aff_BRR, top_k)
  return _onehot_any(idx, R)


def _region_rows(num_regions: int, spatial) -> np.ndarray:
  """The row map of :func:`to_region_major` (static): region-major token ``t`` is
  row-major token ``rows[t]`` of the map."""
  Hh, Ww = spatial
  idx = np.arange(Hh * Ww, dtype=np.int64).reshape(1, Hh, Ww, 1, 1)
  return np.asarray(to_region_major(idx, num_regions)).reshape(-1)


def _bra_on_kernel(q, k, v, route_BRR, *, P: int, top_k: int, scale, rows):
  """Row-major ``q [B, T, N, H]``, ``k``, ``v`` of the map attended through the region
  routing ``route_BRR [B, R, R]`` on the C++ kernel: one block-sparse call per batch row
  (``jax.lax.map``; all heads share the routing, as the kernel's lists), in region-major
  order through the row map ``rows`` (:func:`_region_rows`: the kernel reads q, k, v
  through it and writes the output back, so no permuted copies are made), with region
  tiles ``P x P``, query region ``i`` visiting its ``top_k`` chosen regions (full tiles)
  and key region ``j`` the regions that chose it (the transposed lists, built
  in-graph).  Returns ``[B, T, N, Hv]`` float32 in row-major order."""
  R = route_BRR.shape[1]
  pats = np.zeros((1, P, P), np.uint8)
  full = lambda shape: jnp.full(shape, -1, jnp.int32)
  arange = jnp.arange(R, dtype=jnp.int32)

  def one(x):
    q_b, k_b, v_b, route = x
    miss = (~jax.lax.stop_gradient(route)).astype(jnp.int32)
    qlist = jnp.sort(jnp.argsort(miss, axis=1, stable=True)[:, :top_k], axis=1)
    kl = jnp.argsort(miss.T, axis=1, stable=True)
    klist = jnp.where(arange[None, :] < (1 - miss.T).sum(1)[:, None], kl, -1)
    o, _ = hooks.block_sparse(q_b[None], k_b[None], v_b[None], qlist.astype(jnp.int32),
                              full((R, top_k)), klist.astype(jnp.int32), full((R, R)), pats,
                              block_q=P, block_k=P, scale=scale, q_rows=rows, k_rows=rows)
    return o[0]

  return jax.lax.map(one, (q, k, v, route_BRR))


def bi_level_routing_attention(q, k, v, *, num_regions: int, top_k: int,
                               scale: Optional[float] = None, implementation=None,
                               block_sizes=None):
  """Bi-Level Routing Attention (BiFormer) on a 2D map.

  The map is split into ``num_regions x num_regions`` equal regions.  Region affinity
  ``A[r, r'] = sum_h mean_{i in r} q_ih . mean_{j in r'} k_jh`` (all heads together);
  each region keeps its ``top_k`` regions by ``A`` (shared by all heads); each token
  attends, per head, to all tokens of its region's chosen regions:
  ``o_i = sum_{j in routed(r(i))} softmax_j(scale q_i . k_j) v_j``.

  Tokens are permuted to region-major order (:func:`to_region_major`) so each region is
  a contiguous block of ``P`` tokens and the routing is a tile-level
  :func:`attnjax.masks.from_block_mask` with ``P x P`` tiles; the output is permuted
  back.  The local context enhancement (LCE, a depthwise conv on V) belongs to the layer.
  The top-k routing is not differentiated; gradients flow through the routed logits.

  Paper: "BiFormer: Vision Transformer with Bi-Level Routing Attention" (Zhu et al., 2023).

  Args:
    q: ``[B, Hh, Ww, N, H]``; k: ``[B, Hh, Ww, K, H]``; v: ``[B, Hh, Ww, K, Hv]``.
    num_regions: regions per axis; must divide ``Hh`` and ``Ww``.
    top_k: routed regions per region, ``1 <= top_k <= num_regions**2``.
    scale: logit scale, default ``1/sqrt(H)``.
    implementation, block_sizes: passed to :func:`attnjax.attention`; ``block_sizes=None``
      gives ``'xla_chunked'`` tiles of one region (Pallas kernels need ``P`` to fit their
      tile rules, else the block mask is evaluated per element).  Both None on the CPU
      backend (C++ kernel built, ``P`` and the head dims multiples of 16): the routed
      regions run on the kernel's block-sparse mode, one call per batch row with the
      routing as its tile lists (``P x P`` tiles, exactly the chosen ones) and the
      region-major order as row maps (no permuted copies).

  Returns:
    ``[B, Hh, Ww, N, Hv]`` in ``q.dtype``.
  """
  op = "bi_level_routing_attention"
  _check_map(op, q, k, v)
  B, Hh, Ww, N, H = q.shape
  r = _pos_int(op, "num_regions", num_regions)
  top_k = _pos_int(op, "top_k", top_k)
  if Hh % r or Ww % r:
    raise ValueError(f"{op}: num_regions must divide the map (Hh, Ww)={(Hh, Ww)} per axis, got "
                     f"num_regions={r}")
  R = r * r
  if top_k > R:
    raise ValueError(f"{op}: top_k must be <= the number of regions num_regions**2 = {R}, got "
                     f"top_k={top_k}")
  P = (Hh // r) * (Ww // r)
  route_BRR = region_routing(q, k, num_regions=r, top_k=top_k)
  Hv = v.shape[-1]
  if (implementation is None and block_sizes is None and not hooks.observing()
      and _block_sparse_serves(P, H, Hv)):
    flat = lambda x: x.reshape(B, Hh * Ww, *x.shape[3:])
    out = _bra_on_kernel(flat(q), flat(k), flat(v), route_BRR, P=P, top_k=top_k,
                         scale=_default_scale(scale, H), rows=_region_rows(r, (Hh, Ww)))
    return out.astype(q.dtype).reshape(B, Hh, Ww, N, Hv)
  mask = _masks.from_block_mask(route_BRR[:, None], P, P)
  out = hooks.attention(to_region_major(q, r), to_region_major(k, r), to_region_major(v, r),
                        mask=mask, scale=scale, implementation=implementation,
                        block_sizes=_default_block_sizes(block_sizes, P, P))
  return from_region_major(out, r, (Hh, Ww))


# ----------------------------------------------------------------------------- DMA

def _permute_last(dest, vals):
  """``out[..., dest[..., i]] = vals[..., i]`` (``dest`` a permutation of the last axis)."""
  d2, v2 = dest.reshape(-1, dest.shape[-1]), vals.reshape(-1, vals.shape[-1])
  out = jnp.zeros_like(v2).at[jnp.arange(d2.shape[0])[:, None], d2].set(v2)
  return out.reshape(vals.shape)


def _kth_smallest_of_prefix(a, hi, k):
  """For each query, the ``k``-th smallest (1-based) of ``a[..., :hi]``: int32.

  ``a [..., S]`` holds integers in ``[0, 2^L)``; ``hi``, ``k`` are ``[..., Q]`` with
  ``1 <= k <= hi`` (other queries give garbage; mask them).  A wavelet matrix: level
  ``l`` stably moves the entries whose bit ``L-1-l`` is 0 to the front and keeps the
  prefix counts of those zeros; a query walks the ``L`` levels, narrowing its range to
  the zeros (the answer's bit is 0) when ``k`` of them are in it, else to the ones.
  ``O((S + Q) L)`` work, ``L = ceil(log2 S)``, no ``[Q, S]`` array.
  """
  S = a.shape[-1]
  L = max(1, (S - 1).bit_length())
  pos = jnp.arange(S, dtype=jnp.int32)
  lo = jnp.zeros_like(hi)
  res = jnp.zeros_like(hi)
  for level in range(L):
    bit = (a >> (L - 1 - level)) & 1
    z = jnp.concatenate([jnp.zeros(a.shape[:-1] + (1,), jnp.int32),
                         jnp.cumsum(1 - bit, axis=-1, dtype=jnp.int32)], axis=-1)
    nz = z[..., -1:]                                  # zeros at this level
    z_lo, z_hi = jnp.take_along_axis(z, lo, -1), jnp.take_along_axis(z, hi, -1)
    left = k <= z_hi - z_lo
    k = jnp.where(left, k, k - (z_hi - z_lo))
    lo, hi = jnp.where(left, z_lo, nz + lo - z_lo), jnp.where(left, z_hi, nz + hi - z_hi)
    res = res | jnp.where(left, 0, 1 << (L - 1 - level))
    if level + 1 < L:
      a = _permute_last(jnp.where(bit == 0, z[..., :-1], nz + pos - z[..., :-1]), a)
  return res


def dynamic_mask_keep_end(key_bias, *, keep_window: int, causal: bool = True, T: int = None):
  """Per key, the end of the query rows that keep it (no gradient): int32 ``[B, Nb, S]``.

  ``key_bias [B, S, Nb]``.  Query ``i`` keeps key ``j`` iff ``j`` is allowed (``j <= i``
  when causal) and fewer than ``keep_window`` allowed keys ``j'`` of row ``i`` have
  ``key_bias_j' > key_bias_j``.  The count grows with ``i``, so a kept key is kept on the
  rows ``[j, end_j)`` (causal; ``end_j = j`` when no row keeps it) or on every row
  (non-causal: ``end_j`` is ``T`` or 0).

  Causal: with ``G_j`` the positions of the keys whose bias is larger than key ``j``'s,
  ``end_j`` is the ``keep_window``-th smallest of ``G_j`` (``T`` when there are fewer).
  The keys sorted by decreasing bias put ``G_j`` first, so this is an order statistic of
  a prefix of that order (:func:`_kth_smallest_of_prefix`): ``O(S log S)`` per row and
  head, where counting per (query, key) pair would be ``O(T S)``.
  """
  B, S, Nb = key_bias.shape
  T = S if T is None else T
  b_BNS = jnp.transpose(jax.lax.stop_gradient(key_bias).astype(_F32), (0, 2, 1))
  w = int(keep_window)
  ascending = jnp.sort(b_BNS, axis=-1)
  n_greater = S - jax.vmap(jax.vmap(
      lambda srt, x: jnp.searchsorted(srt, x, side="right")))(ascending, b_BNS)
  n_greater = n_greater.astype(jnp.int32)
  if not causal:
    return jnp.where(n_greater < w, T, 0).astype(jnp.int32)
  by_bias = jnp.argsort(-b_BNS, axis=-1, stable=True).astype(jnp.int32)   # positions
  few = n_greater < w
  end = _kth_smallest_of_prefix(by_bias, jnp.where(few, 0, n_greater),
                                jnp.full_like(n_greater, w))
  return jnp.where(few, T, jnp.maximum(end, jnp.arange(S, dtype=jnp.int32))).astype(jnp.int32)


def _dma_kernel_sizes(T: int, w: int, causal: bool):
  """``(block_q, block_k, M)`` of :func:`_dma_on_kernel`: ``M`` key slots per q tile
  (a multiple of ``block_k``) hold every key a row of the tile keeps when the biases are
  distinct: the keys row ``q0`` keeps (at most ``w``) and, causal, those after ``q0``."""
  bq = min(128, max(32, -(-T // 32) * 32))
  need = w + (bq - 1 if causal else 0)
  bk = 64 if need <= 256 else 128
  return bq, bk, -(-need // bk) * bk


def _dma_tile_counts(start_S, end_RS, T: int, bq: int):
  """Keys each q tile's rows keep (the union over the tile): int32 ``[R, nq]``, by +1/-1
  at each key's first / one-past-last q tile and a cumsum (``O(R (S + nq))``)."""
  nq = -(-T // bq)
  live = start_S[None] < end_RS
  first = jnp.where(live, start_S[None] // bq, nq)
  past = jnp.where(live, (end_RS - 1) // bq + 1, nq)
  R = end_RS.shape[0]
  rows = jnp.broadcast_to(jnp.arange(R)[:, None], end_RS.shape)
  return _masks._interval_cover_counts((rows,), (R,), first, past, nq, jnp)


def _compact(ids, M: int, S: int):
  """The entries ``< S`` of ``ids [L]`` moved to the front of ``M`` slots (``S`` after
  them; entries beyond ``M`` dropped), in order: ``(slots [M], count)``."""
  ok = ids < S
  pos = jnp.cumsum(ok, dtype=jnp.int32) - 1
  out = jnp.full((M + 1,), S, jnp.int32).at[jnp.where(ok & (pos < M), pos, M)].set(ids)
  return out[:M], jnp.minimum(ok.sum(dtype=jnp.int32), M)


def _dma_tile_slots(end_S, *, T: int, bq: int, M: int, causal: bool):
  """The keys each q tile's rows keep, compacted: ``(idx [nq, M], count [nq])`` (``S`` in
  the unused slots).

  Non-causal, every row keeps the same keys (``end_j = T``).  Causal (key ``j`` kept by
  the rows ``[j, end_j)``): tile ``t``'s keys are the earlier keys still kept at its first
  row (``end_j > q0``) and its own live keys; a scan over the tiles carries the first set
  (at most ``M``), dropping the keys whose rows end and adding the previous tile's own:
  ``O(nq (M + bq))`` per row, no ``[nq, S]`` array."""
  S = end_S.shape[0]
  nq = -(-T // bq)
  if not causal:
    slots, cnt = _compact(jnp.where(end_S > 0, jnp.arange(S, dtype=jnp.int32), S), M, S)
    return jnp.broadcast_to(slots, (nq, M)), jnp.full((nq,), cnt)
  pad = nq * bq - S
  own = jnp.arange(nq * bq, dtype=jnp.int32)
  end_p = jnp.concatenate([end_S, jnp.zeros((pad,), jnp.int32)]) if pad else end_S
  own = jnp.where(end_p > own, own, S).reshape(nq, bq)              # live own keys
  end_x = jnp.concatenate([end_S, jnp.zeros((1,), jnp.int32)])        # S -> end 0

  def step(older, t):
    slots, cnt = _compact(jnp.concatenate([older, own[t]]), M, S)
    nxt = jnp.where(end_x[slots] > (t + 1) * bq, slots, S)
    return _compact(nxt, M, S)[0], (slots, cnt)
  _, (idx, cnt) = jax.lax.scan(step, jnp.full((M,), S, jnp.int32),
                               jnp.arange(nq, dtype=jnp.int32))
  return idx, cnt


def _dma_on_kernel(q, k, v, key_bias, start_S, end_RS, *, scale: float, sizes, causal: bool):
  """Dynamic mask attention on the C++ kernel's block-sparse mode, one call per (batch
  row, query head): float32 ``[R, T, Hv]``.

  Per q tile of ``block_q`` rows, the keys some row of it keeps (``start_j < q1``,
  ``end_j > q0``) are compacted into ``M`` slots (gathered rows of ``k``, ``v``: a key
  sequence of ``nq * M`` rows); the tile visits its own ``M / block_k`` key tiles, each
  with its own pattern (the interval test ``start_j <= i < end_j`` per element), so the
  kernel computes about ``T (w + block_q)`` scores instead of the causal ``T^2 / 2``.
  The per-key bias rides in 16 extra head dims: ``q' = [q, 1/scale, 0..]``, ``k' = [k,
  key_bias, 0..]`` give ``scale q'.k' = scale q.k + key_bias``, and its gradient comes
  back through the gather like ``k``'s.  Needs every tile's count ``<= M``
  (:func:`_dma_kernel_sizes`; the caller checks)."""
  B, T, N, H = q.shape
  S, K, Hv = k.shape[1], k.shape[2], v.shape[3]
  G, Nb = N // K, key_bias.shape[2]
  bq, bk, M = sizes
  nq, nt = -(-T // bq), M // bk
  Hx = H + 16
  q0 = jnp.arange(nq, dtype=jnp.int32) * bq
  qi = q0[:, None] + jnp.arange(bq, dtype=jnp.int32)[None]                   # [nq, bq]
  tiles = jnp.arange(nq * nt, dtype=jnp.int32).reshape(nq, nt)

  def one_row(x):
    r, end_S = x
    b, n = r // N, r % N
    zero = jnp.zeros((), jnp.int32)
    q_r = jax.lax.dynamic_slice(q, (b, zero, n, zero), (1, T, 1, H)).reshape(T, H)
    kv = lambda a: jax.lax.dynamic_slice(a, (b, zero, n // G, zero),
                                         (1, S, 1, a.shape[3])).reshape(S, a.shape[3])
    kb_S = jax.lax.dynamic_slice(key_bias, (b, zero, n // (N // Nb)), (1, S, 1)).reshape(S)
    idx, cnt = _dma_tile_slots(end_S, T=T, bq=bq, M=M, causal=causal)
    flat = idx.reshape(-1)
    k_x = jnp.concatenate([kv(k).astype(_F32), kb_S.astype(_F32)[:, None],
                           jnp.zeros((S, 15), _F32)], axis=1)
    k_x = jnp.concatenate([k_x, jnp.zeros((1, Hx), _F32)])[flat]            # [nq*M, Hx]
    v_x = jnp.concatenate([kv(v).astype(_F32), jnp.zeros((1, Hv), _F32)])[flat]
    q_x = jnp.concatenate([q_r.astype(_F32), jnp.full((T, 1), 1.0 / scale, _F32),
                           jnp.zeros((T, 15), _F32)], axis=1)
    lo = jnp.concatenate([start_S, jnp.ones((1,), jnp.int32)])[idx]         # pad: empty
    hi = jnp.concatenate([end_S, jnp.zeros((1,), jnp.int32)])[idx]
    ok = ((lo[:, None, :] <= qi[:, :, None]) & (qi[:, :, None] < hi[:, None, :])
          & (qi < T)[:, :, None])                                            # [nq, bq, M]
    pats = ok.reshape(nq, bq, nt, bk).transpose(0, 2, 1, 3).reshape(nq * nt, bq, bk)
    used = jnp.arange(nt)[None] < -(-cnt // bk)[:, None]                     # [nq, nt]
    qlist = jnp.where(used, tiles, -1)
    klist = jnp.where(used.reshape(-1), jnp.arange(nq * nt) // nt, -1)[:, None]
    o, _ = hooks.block_sparse(q_x[None, :, None], k_x[None, :, None], v_x[None, :, None],
                              qlist, tiles, klist.astype(jnp.int32),
                              tiles.reshape(-1, 1), pats.astype(jnp.uint8), block_q=bq,
                              block_k=bk, scale=scale)
    return o.reshape(T, Hv)

  R = B * N
  return jax.lax.map(jax.checkpoint(one_row), (jnp.arange(R, dtype=jnp.int32), end_RS))


def _dma_compacted(q, k, v, key_bias, start_S, end_RS, *, scale, sizes, causal: bool,
                   implementation=None, block_sizes=None):
  """Dynamic mask attention with each q tile's kept keys compacted (as
  :func:`_dma_on_kernel`), run by :func:`attnjax.attention` on any backend: the tiles are
  the batch, ``[R * nq, block_q, 1, H]`` queries against their ``[R * nq, M, 1, H]``
  gathered keys, with the keys' row intervals as :func:`attnjax.masks.key_interval`
  (shifted to the tile) and the bias per key (``[R * nq, 1, 1, M]``).  ``T (w + block_q)``
  scores instead of ``T^2 / 2``, whatever the backend's kernel; ``M / S`` times the K/V
  memory per query head.  Returns ``[B, T, N, Hv]`` in ``q.dtype``."""
  B, T, N, H = q.shape
  S, K, Hv = k.shape[1], k.shape[2], v.shape[3]
  G, Nb = N // K, key_bias.shape[2]
  bq, _, M = sizes
  nq = -(-T // bq)
  R = B * N
  idx, _ = jax.vmap(lambda e: _dma_tile_slots(e, T=T, bq=bq, M=M, causal=causal))(end_RS)
  b_R, n_R = jnp.arange(R) // N, jnp.arange(R) % N
  pad = idx >= S                                                         # [R, nq, M]

  def rows(x, heads, head_R):        # x [B, S, heads, D] -> the slots' rows [R*nq, M, 1, D]
    flat = jnp.concatenate([x.reshape(B * S * heads, -1), jnp.zeros((1, x.shape[-1]),
                                                                    x.dtype)])
    at = (b_R[:, None, None] * S + idx) * heads + head_R[:, None, None]
    return flat[jnp.where(pad, B * S * heads, at)].reshape(R * nq, M, 1, x.shape[-1])
  k_t, v_t = rows(k, K, n_R // G), rows(v, K, n_R // G)
  bias_t = rows(key_bias[..., None], Nb, n_R // (N // Nb)).reshape(R * nq, 1, 1, M)
  q0 = (jnp.arange(nq, dtype=jnp.int32) * bq)[None, :, None]
  lo = jnp.where(pad, bq, start_S[jnp.minimum(idx, S - 1)] - q0).reshape(R * nq, 1, M)
  hi = jnp.where(pad, 0, jnp.take_along_axis(end_RS[:, None, :], jnp.minimum(idx, S - 1),
                                             axis=2) - q0).reshape(R * nq, 1, M)
  q_t = jnp.pad(q, ((0, 0), (0, nq * bq - T), (0, 0), (0, 0))).reshape(B, nq, bq, N, H)
  q_t = q_t.transpose(0, 3, 1, 2, 4).reshape(R * nq, bq, 1, H)
  o = hooks.attention(q_t, k_t, v_t, mask=_masks.key_interval(lo, hi), bias=bias_t,
                      scale=scale, implementation=implementation, block_sizes=block_sizes)
  o = o.reshape(B, N, nq * bq, Hv)[:, :, :T]
  return o.transpose(0, 2, 1, 3).astype(q.dtype)


def dynamic_mask_attention(q, k, v, key_bias, *, keep_window: int, causal: bool = True,
                           scale: Optional[float] = None, implementation=None,
                           block_sizes=None):
  """Dynamic Mask Attention (DMA): content-aware per-key bias and top-w key mask.

  ``s_ij = scale q_i . k_j + key_bias_j,h`` (float32); query ``i`` keeps, among its
  allowed keys (``j <= i`` when causal), the ``keep_window`` keys with the largest
  ``key_bias`` (all of them when fewer); the others are masked out.  In the paper the
  bias is computed from the values, ``key_bias_j,h = A_h * softplus(W_dt v_j)_h`` (the
  log of ``delta_j = exp(A_h softplus(W_dt v_j))``, ``A_h`` learnable) -- that
  projection belongs to the layer (:mod:`attnjax.layers.routing`).

  The keep mask is a per-key row interval (:func:`dynamic_mask_keep_end`), passed as
  :func:`attnjax.masks.key_interval` (the kernels read it per key tile); the bias is
  passed as ``bias [B, N, 1, S]`` (read per key tile, its gradient summed over the rows
  in the dk/dv kernels) and is differentiable; the top-w choice is not.  No ``[T, S]``
  array is formed by the blockwise implementations.  By default (``'gather'``) the keys
  each tile of ``block_q`` rows keeps are compacted into ``w + block_q`` slots and only
  those are computed: on the C++ CPU kernel (:func:`_dma_on_kernel`) or, on other
  backends, as a batch of tiles for :func:`attnjax.attention` (:func:`_dma_compacted`):
  about ``T (w + block_q)`` scores instead of causal dense's ``T^2 / 2``; tied biases
  that overflow the slots take the mask path.

  Paper: "Trainable Dynamic Mask Sparse Attention" (Shi et al., 2025).

  Args:
    q: ``[B, T, N, H]``; k: ``[B, T, K, H]``; v: ``[B, T, K, Hv]`` (``T == S``).
    key_bias: ``[B, T, N]`` (per query head) or ``[B, T, K]`` (per kv head), float.
    keep_window: keys kept per query (positive int).
    causal: AND the causal mask (default).
    scale, block_sizes: as in :func:`attnjax.attention`.
    implementation: ``'gather'``: each q tile's kept keys compacted -- on the C++ CPU
      kernel where it serves (CPU backend, head dims multiples of 16, static ``scale``),
      else the tiles as the batch of one :func:`attnjax.attention` call (the backend's
      default kernel); the default when ``block_sizes`` is None.  Another name (with
      ``block_sizes``) runs the whole sequence under the keep mask through
      :func:`attnjax.attention` with that implementation.

  Returns:
    ``[B, T, N, Hv]`` in ``q.dtype``.
  """
  op = "dynamic_mask_attention"
  B, T, S, N, K, H, Hv = _check_btnh(op, q, k, v, same_len=True)
  _arrays(op, key_bias=key_bias)
  if key_bias.ndim != 3 or tuple(key_bias.shape[:2]) != (B, S) or key_bias.shape[2] not in (N, K):
    raise ValueError(f"{op}: key_bias must be [B, S, N] = {(B, S, N)} or [B, S, K] = "
                     f"{(B, S, K)}, got shape {tuple(key_bias.shape)}")
  if not jnp.issubdtype(key_bias.dtype, jnp.floating):
    raise TypeError(f"{op}: key_bias must be floating point, got dtype {key_bias.dtype}")
  w = _pos_int(op, "keep_window", keep_window)
  if not isinstance(causal, bool):
    raise TypeError(f"{op}: causal must be a bool, got {causal!r}")
  Nb = key_bias.shape[2]
  G = N // Nb
  explicit = isinstance(implementation, str) and implementation == "gather"
  if explicit and block_sizes is not None:
    raise ValueError(f"{op}: block_sizes is for the kernels of attnjax.attention; "
                     f"implementation='gather' takes none, got {block_sizes!r}")
  # Under an analysis capture the mask path runs instead (one observable call, the same
  # result).  The C++ kernel's compaction on CPU, else the tiles as a batch.
  gather = (explicit or (implementation is None and block_sizes is None)) and \
      not hooks.observing()
  on_cpu_kernel = gather and _block_sparse_serves(H, Hv) and _is_static_scale(scale)
  end_BNS = dynamic_mask_keep_end(key_bias, keep_window=w, causal=causal, T=T)
  if G > 1:
    end_BNS = jnp.repeat(end_BNS, G, axis=1)
  start_S = jnp.arange(S, dtype=jnp.int32) if causal else jnp.zeros((S,), jnp.int32)
  mask = _masks.key_interval(start_S, end_BNS)     # row i keeps key j iff start_j <= i < end_j

  def masked(q, k, v, key_bias):
    b = jnp.transpose(key_bias, (0, 2, 1))[:, :, None, :]
    b = jnp.repeat(b, G, axis=1) if G > 1 else b
    return hooks.attention(q, k, v, mask=mask, bias=b, scale=scale,
                           implementation=None if explicit else implementation,
                           block_sizes=block_sizes).astype(q.dtype)
  if not gather:
    return masked(q, k, v, key_bias)
  # Compacted keys on the C++ kernel when every q tile's kept keys fit its slots (always
  # with distinct biases); ties beyond that take the mask path (attnjax.attention).
  sizes = _dma_kernel_sizes(T, w, causal)
  end_RS = jax.lax.stop_gradient(end_BNS).reshape(B * N, S)
  fits = jnp.max(_dma_tile_counts(start_S, end_RS, T, sizes[0])) <= sizes[2]

  def compact(q, k, v, key_bias):
    if not on_cpu_kernel:
      return _dma_compacted(q, k, v, key_bias, start_S, end_RS, scale=scale, sizes=sizes,
                            causal=causal)
    o = _dma_on_kernel(q, k, v, key_bias, start_S, end_RS, scale=_default_scale(scale, H),
                       sizes=sizes, causal=causal)
    return _rows_to_btnh(o, B, q.dtype)
  return jax.lax.cond(fits, compact, masked, q, k, v, key_bias)


# ----------------------------------------------------------------------------- Sparsifiner

def sparsifiner_attention(q, k, v, connectivity, *, keep: int, scale: Optional[float] = None):
  """Sparsifiner: attention restricted to the top-``keep`` keys of a connectivity score.

  ``M_i = top-keep_j connectivity_ij`` (per query and head; not differentiated);
  ``o_i = sum_{j in M_i} softmax_j(scale q_i . k_j) v_j``.  Computed by gathering the
  ``keep`` selected keys and values of each query (the mask is unstructured, so block
  sparsity would not help): ``O(T * keep * H)`` per head, no ``[T, S]`` logits.  The
  connectivity comes from the layer's low-rank predictor and is trained with
  :func:`sparsifiner_distillation_loss`.

  Paper: "Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision
  Transformers" (Wei et al., CVPR 2023).

  Args:
    q: ``[B, T, N, H]``; k: ``[B, S, K, H]``; v: ``[B, S, K, Hv]``.
    connectivity: ``[B, N, T, S]`` float scores (higher = keep).
    keep: keys per query, ``1 <= keep <= S``.
    scale: logit scale, default ``1/sqrt(H)``.

  Returns:
    ``[B, T, N, Hv]`` in ``q.dtype``.
  """
  op = "sparsifiner_attention"
  B, T, S, N, K, H, Hv = _check_btnh(op, q, k, v)
  _arrays(op, connectivity=connectivity)
  if tuple(connectivity.shape) != (B, N, T, S):
    raise ValueError(f"{op}: connectivity must be [B, N, T, S] = {(B, N, T, S)}, got shape "
                     f"{tuple(connectivity.shape)}")
  keep = _pos_int(op, "keep", keep)
  if keep > S:
    raise ValueError(f"{op}: keep must be <= the number of keys S={S}, got keep={keep}")
  G = N // K
  scale = 1.0 / math.sqrt(H) if scale is None else scale
  _, idx_BNTk = jax.lax.top_k(jax.lax.stop_gradient(connectivity).astype(_F32), keep)
  kh = jnp.arange(N) // G

  def gather(x_BSKD):   # -> [B, N, T, keep, D]
    x_BKSD = jnp.transpose(x_BSKD, (0, 2, 1, 3))[:, kh]               # [B, N, S, D]
    return jax.vmap(jax.vmap(lambda xs, ix: xs[ix]))(x_BKSD, idx_BNTk)
  k_g, v_g = gather(k), gather(v)
  q_BNTH = jnp.transpose(q, (0, 2, 1, 3))
  s = jnp.einsum("bnth,bntkh->bntk", q_BNTH.astype(_F32), k_g.astype(_F32)) * scale
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("bntk,bntkd->bntd", p, v_g.astype(_F32))
  o = jnp.transpose(o, (0, 2, 1, 3)).astype(q.dtype)
  # attnjax.analysis interception point (a no-op unless observed): p scattered to [B, N, T, S]
  return hooks.intercepted("softmax", lambda: o, q, k, v, probs=lambda: jnp.einsum(
      "bntk,bntks->bnts", p, jax.nn.one_hot(idx_BNTk, S, dtype=_F32)))


def sparsifiner_distillation_loss(connectivity, q, k, *, scale: Optional[float] = None):
  """Distillation of the connectivity predictor from dense attention (a training helper).

  ``L = mean_{b,h,i} KL(P_i || C_i)`` with ``P_i = softmax_j(scale q_i . k_j)`` the dense
  attention (a fixed target: ``stop_gradient``) and ``C_i = softmax_j(connectivity_ij)``
  the predictor's distribution; gradients reach ``connectivity`` only.  (The paper
  distils the predicted sparse connectivity from the dense attention of a trained model;
  we use the KL divergence of the row distributions.)

  Args:
    connectivity: ``[B, N, T, S]`` predictor scores.
    q: ``[B, T, N, H]``; k: ``[B, S, K, H]`` (GQA allowed).
    scale: default ``1/sqrt(H)``.  The loss is formed densely (``[B, N, T, S]``), like
      the predictor's connectivity itself.

  Returns:
    float32 scalar.
  """
  op = "sparsifiner_distillation_loss"
  _arrays(op, connectivity=connectivity, q=q, k=k)
  if q.ndim != 4 or k.ndim != 4:
    raise ValueError(f"{op}: q and k must have rank 4 ([B, T, N, H]), got {tuple(q.shape)}, "
                     f"{tuple(k.shape)}")
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  if N % K:
    raise ValueError(f"{op}: the query heads N={N} must be a multiple of the kv heads K={K}")
  if tuple(connectivity.shape) != (B, N, T, S):
    raise ValueError(f"{op}: connectivity must be [B, N, T, S] = {(B, N, T, S)}, got shape "
                     f"{tuple(connectivity.shape)}")
  scale = 1.0 / math.sqrt(H) if scale is None else scale
  kk = jnp.repeat(k, N // K, axis=2)
  s = jnp.einsum("btnh,bsnh->bnts", q.astype(_F32), kk.astype(_F32)) * scale
  logp = jax.lax.stop_gradient(jax.nn.log_softmax(s, axis=-1))
  logc = jax.nn.log_softmax(connectivity.astype(_F32), axis=-1)
  return jnp.mean(jnp.sum(jnp.exp(logp) * (logp - logc), axis=-1))
