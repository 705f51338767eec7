"""'cpu_flash': a multi-threaded C++ flash-attention kernel for the XLA CPU backend.

XLA:CPU executes a blockwise attention loop on effectively one core (see
``docs/benchmarks.md``, "CPU attention").  This implementation is an XLA FFI custom
call (``jax.ffi.ffi_call``) into ``flash_cpu.cc`` (and the units it includes): the
online-softmax forward of "FlashAttention" (Dao et al., 2022) and the one-pass
backward of "FlashAttention-2" (Dao, 2023), float32 with register-tiled SIMD matmuls
(AVX-512, or AVX2 with FMA on CPUs without it; AMX bf16 tile products for bf16 data
where the CPU has them; see ``CpuFlashBlockSizes.matmul``), split over all cores by
``(batch, head, query block)`` in the forward and ``(batch, kv head, key block)`` in
the backward.  The library is compiled for the machine on first use
(:mod:`attnjax.cpu.build`), or ahead of time with ``python -m attnjax.cpu.build``.

It serves calls whose mask is a band (below), and every other static mask through a
block-sparse mode (:func:`block_sparse_schedule`, :func:`cpu_flash_block_sparse`): per
query block a list of key blocks, each run unmasked (full) or with a per-element byte
pattern (partial), and the transposed lists for the backward's key-block work items.
The dispatcher runs spatial masks (neighborhood, windows, criss-cross, grid, axial,
stripes, ...) in the 2D-tiled token order (:mod:`attnjax.core.tiling`) on it.

Band masks: each query attends to a contiguous key range
``lo(t) <= s <= hi(t)`` (``None``, ``causal``, ``sliding_window``, ``chunked``,
``prefix_lm``, ``shifted`` views, ``&`` of those, ``~`` of one-sided bands and ``|`` of
bands that stay intervals, classified by structure in
:meth:`attnjax.masks.Mask.row_band`) — with
GQA/MQA (K/V never repeated), ``T != S``, ``sinks``, ``return_lse`` and head dims
that are multiples of 16.  ``bias``, ``score_mod``, ``softcap``, segment ids,
data-dependent and head-dependent non-band masks are refused (:func:`unsupported_reason`, raised as
:class:`attnjax.core.Unsupported`) so the dispatcher falls back to ``'xla_chunked'``.
bf16/f16 inputs are computed in float32 and cast back.

Tiles outside every row's band are skipped; tiles inside all rows' bands run
without masking, so causal and windowed attention cost time proportional to their
density.  Rows with no allowed key give 0, ``lse = -inf`` and zero gradients.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks as masks_lib
from attnjax.core import tiling as tiling_lib
from attnjax.core.args import AttentionArgs, static_scale
from attnjax.core.errors import Unsupported
from attnjax.core.softmax import row_dot
from attnjax.core.vma import sum_to_vma, vary_like
from attnjax.cpu import build

__all__ = ["CpuFlashBlockSizes", "cpu_flash_attention", "unsupported_reason", "available",
           "has_amx", "BlockSparseSchedule", "block_sparse_schedule", "schedule_from_table",
           "cpu_flash_block_sparse"]

# CpuFlashBlockSizes.matmul -> the kernel's "matmul" attribute.  'avx512' is the
# older name of 'simd' (kept: the SIMD engine is AVX-512 where the CPU has it).
MATMULS = {"auto": 0, "simd": 1, "avx512": 1, "amx": 2}


@dataclasses.dataclass(frozen=True)
class CpuFlashBlockSizes:
  """Tile sizes of the 'cpu_flash' kernel.

  Attributes:
    block_q: query rows per work item (per query head); ``None``: 96.
    block_k: keys per tile, a multiple of 16; ``None``: 128.
    num_threads: worker threads; ``None``/0: ``$ATTNJAX_CPU_THREADS`` or every CPU
      this process may run on.
    matmul: the matmul engine.  ``'auto'``: the forward runs on AMX tiles when the CPU
      has AMX-BF16 (Sapphire Rapids and later) and q, k, v are all bf16 values (e.g.
      bf16 arrays; for a bf16 result, P is rounded to bf16 for ``P @ V``, as GPU flash
      kernels do), else on the SIMD engine in float32: AVX-512 (16 lanes, 6x4-register
      tiles) where the CPU has AVX-512F/DQ, else AVX2 with FMA (8 lanes, 6x2-register
      tiles), as compiled for the machine.  ``'simd'`` (alias ``'avx512'``): always
      the SIMD engine.  ``'amx'``: the forward on AMX tiles also for float32 data,
      each float split exactly into three bf16 pieces ("bf16x6", float32 accuracy;
      slower than AVX-512 on the machines measured, see docs/core.md); needs AMX and a
      block_k that is a multiple of 32.  Unless ``'simd'``, the backward runs on AMX
      for bf16 data with a bf16 result when block_q and block_k are multiples of 32 (P
      and dS rounded to bf16 for their products); otherwise on the SIMD engine.
      Block-sparse (non-band) masks always run on the SIMD engine.
    spatial_tile: 2D tiling of spatial masks by the dispatcher
      (:mod:`attnjax.core.tiling`): ``True`` automatic (64-token patches, 64-key tiles
      unless block_q / block_k are given), ``False`` the flattened order, a tuple a
      fixed patch.
  """
  block_q: Optional[int] = None
  block_k: Optional[int] = None
  num_threads: Optional[int] = None
  matmul: str = "auto"
  spatial_tile: object = True

  def __post_init__(self):
    tiling_lib.check_spatial_tile(self.spatial_tile, "CpuFlashBlockSizes")
    for name in ("block_q", "block_k", "num_threads"):
      val = getattr(self, name)
      if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val <= 0):
        raise ValueError(f"CpuFlashBlockSizes.{name} must be a positive int or None, got "
                         f"{val!r}")
    if self.block_k is not None and self.block_k % 16:
      raise ValueError(f"CpuFlashBlockSizes.block_k must be a multiple of 16, got "
                       f"{self.block_k}")
    if self.matmul not in MATMULS:
      raise ValueError(f"CpuFlashBlockSizes.matmul must be one of {sorted(MATMULS)}, got "
                       f"{self.matmul!r}")
    if self.matmul == "amx" and self.block_k is not None and self.block_k % 32:
      raise ValueError(f"CpuFlashBlockSizes.block_k must be a multiple of 32 with "
                       f"matmul='amx', got {self.block_k}")

  def resolve(self):
    """``(block_q, block_k, num_threads)`` with defaults filled in (measured with
    ``benchmarks/attention_cpu.py``, B=1, N=8, H=64); forward and backward share them."""
    return self.block_q or 96, self.block_k or 128, self.num_threads or 0


def available() -> bool:
  """True when the compiled kernel can run in this process."""
  return build.unavailable_reason() is None


def has_amx() -> bool:
  """True when the kernel is available and can use AMX tiles on this machine."""
  return build.has_amx()


def _attrs(scale, block_q, block_k, num_threads, matmul, bf16_out):
  """The kernels' FFI attributes (forward and backward take the same)."""
  return dict(scale=np.float32(scale), block_q=np.int64(block_q), block_k=np.int64(block_k),
              num_threads=np.int64(num_threads), matmul=np.int64(MATMULS[matmul]),
              bf16_out=bool(bf16_out))


def _ffi_fwd(q, k, v, lo, hi, **cfg):
  """(out [B, T, N, Hv], lse [B, N, T], stats [2, B, N, T]): stats holds each row's
  integral running max (log2 units) and 1 / l exactly as the forward used them; the
  backward recomputes P from them (not from lse, whose float32 rounding in natural
  units is a whole-row error that grows with the logits)."""
  B, T, N, _ = q.shape
  Hv = v.shape[-1]
  return jax.ffi.ffi_call(
      build.TARGETS["AttnjaxFlashFwd"],
      (jax.ShapeDtypeStruct((B, T, N, Hv), jnp.float32),
       jax.ShapeDtypeStruct((B, N, T), jnp.float32),
       jax.ShapeDtypeStruct((2, B, N, T), jnp.float32)),
      vmap_method="sequential",
  )(q, k, v, lo, hi, **_attrs(**cfg))


def _ffi_bwd(q, k, v, do, stats, delta, lo, hi, **cfg):
  return jax.ffi.ffi_call(
      build.TARGETS["AttnjaxFlashBwd"],
      tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)),
      vmap_method="sequential",
  )(q, k, v, do, stats, delta, lo, hi, **_attrs(**cfg))


def _forward(q, k, v, lo, hi, cfg):
  """(out, lse, stats) of the forward kernel."""
  scale, bq, bk, nt, mm, bf16_out = cfg
  # Under shard_map the custom call's outputs vary like its inputs.
  return vary_like(_ffi_fwd(q, k, v, lo, hi, scale=scale, block_q=bq, block_k=bk,
                            num_threads=nt, matmul=mm, bf16_out=bf16_out), q, k, v, lo, hi)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, lo, hi, cfg):
  out, lse, _ = _forward(q, k, v, lo, hi, cfg)
  return out, lse


def _residual_cfg(cfg):
  """The forward's cfg when its residuals feed the backward.  The backward recomputes
  P from the forward's statistics and must see the forward's logits: with
  ``matmul='amx'`` the forward's float32 logits come from bf16x6 tile products
  (accurate to ~2^-20, not bit-equal to the SIMD GEMM), so when the backward will run
  on the SIMD engine (any result but bf16 with ``block_q % 32 == 0``, the AMX
  backward's rule) the differentiated forward runs on the SIMD engine too."""
  scale, bq, bk, nt, mm, bf16_out = cfg
  if mm == "amx" and not (bf16_out and bq % 32 == 0):
    return (scale, bq, bk, nt, "simd", bf16_out)
  return cfg


def _flash_fwd(q, k, v, lo, hi, cfg):
  out, lse, stats = _forward(q, k, v, lo, hi, _residual_cfg(cfg))
  return (out, lse), (q, k, v, lo, hi, out, stats)


def _flash_bwd(cfg, res, cts):
  scale, bq, bk, nt, mm, bf16_out = cfg
  q, k, v, lo, hi, out, stats = res
  do, dlse = cts
  do = do.astype(jnp.float32)
  # d lse_i / d s_ij = p_ij, so an lse cotangent shifts delta: dS = P * (dP - delta).
  delta = row_dot(do, out).transpose(0, 2, 1) - dlse.astype(jnp.float32)
  grads = _ffi_bwd(q, k, v, do, stats, delta, lo, hi, scale=scale, block_q=bq, block_k=bk,
                   num_threads=nt, matmul=mm, bf16_out=bf16_out)
  grads = vary_like(grads, q, k, v, do, stats, delta, lo, hi)
  return (*sum_to_vma(grads, (q, k, v)), None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _block_sizes(block_sizes) -> CpuFlashBlockSizes:
  if block_sizes is None:
    return CpuFlashBlockSizes()
  if isinstance(block_sizes, CpuFlashBlockSizes):
    return block_sizes
  raise TypeError(f"block_sizes for 'cpu_flash' must be a CpuFlashBlockSizes, got "
                  f"{type(block_sizes).__name__}")


# ------------------------------------------------------------------ block-sparse mode

# Partial-tile entries a mask may have for the block-sparse mode: their patterns are
# evaluated with NumPy at trace time (bytes; deduplicated, so the kernel's constant is
# usually far smaller).  Beyond it the call is refused ('auto' falls back).
_PATTERN_LIMIT = 1 << 25
_EMPTY_CODE, _FULL_CODE = -2, -1


def kernel_blocks(T: int, S: int, block_q: int, block_k: int) -> tuple[int, int]:
  """The block sizes the kernel runs with: ``block_q``/``block_k`` shrunk to a short
  sequence (rounded up to 32 when a multiple of 32, else to 1 / 16), as
  ``MakeGeometry`` in ``flash_cpu.cc`` does."""
  mq = 32 if block_q % 32 == 0 else 1
  mk = 32 if block_k % 32 == 0 else 16
  rup = lambda x, m: -(-x // m) * m
  return min(block_q, max(rup(T, mq), mq)), min(block_k, max(rup(S, mk), mk))


@dataclasses.dataclass(frozen=True, eq=False)
class BlockSparseSchedule:
  """The block table of a block-sparse call, as the kernel reads it (NumPy arrays; the
  four lists may also be jax arrays computed in the graph, as MoBA's and BiFormer's
  routing builds them: the kernel checks every entry's range when it runs).

  Attributes:
    qlist: ``int32 [nq, Lq]``: query block ``i`` visits key blocks ``qlist[i, :c]``
      (ascending; ``-1`` after the last).
    qcode: ``int32 [nq, Lq]``: ``-1`` a full tile (no mask), ``c >= 0`` a partial tile
      with pattern ``pats[c]``.
    klist, kcode: the transposed lists ``[nk, Lk]`` (query blocks per key block), for
      the backward.
    pats: ``uint8 [U, block_q, block_k]``: the distinct partial-tile patterns (nonzero:
      allowed; zero for keys ``>= S``).
    block_q, block_k: the kernel's block sizes (:func:`kernel_blocks`).
    density: non-empty tiles / all tiles.
  """
  qlist: np.ndarray
  qcode: np.ndarray
  klist: np.ndarray
  kcode: np.ndarray
  pats: np.ndarray
  block_q: int
  block_k: int
  density: float


def _lists(codes):
  """(ids [n, L], codes [n, L]) of the non-empty entries of each row of codes [n, m]."""
  live = codes != _EMPTY_CODE
  L = max(1, int(live.sum(axis=1).max(initial=0)))
  order = np.argsort(~live, axis=1, kind="stable")[:, :L].astype(np.int32)
  keep = np.take_along_axis(live, order, axis=1)
  ids = np.where(keep, order, -1).astype(np.int32)
  code = np.where(keep, np.take_along_axis(codes, order, axis=1), _EMPTY_CODE)
  return ids, code.astype(np.int32)


def schedule_from_table(table, pattern_fn, T: int, S: int, block_q: int,
                        block_k: int) -> BlockSparseSchedule:
  """A :class:`BlockSparseSchedule` from a tile classification.

  Args:
    table: ``[nq, nk]`` EMPTY (0) / PARTIAL (1) / FULL (2) (:data:`attnjax.masks.EMPTY`
      ...) at the kernel's block sizes ``block_q, block_k`` (:func:`kernel_blocks`).
    pattern_fn: ``(q_idx [n, bq, 1], kv_idx [n, 1, bk]) -> bool [n, bq, bk]`` the
      allowed entries (NumPy), called on in-range indices of the partial tiles in
      chunks.  Patterns are checked: an all-False one drops its tile, an all-True one
      (all keys in range) makes it full.
  Raises :class:`attnjax.core.Unsupported` when the partial tiles hold more than
  ``2**25`` entries.
  """
  table = np.asarray(table)
  nq, nk = -(-T // block_q), -(-S // block_k)
  if table.shape != (nq, nk):
    raise ValueError(f"table must be [{nq}, {nk}] for T={T}, S={S}, blocks "
                     f"{block_q}x{block_k}, got {table.shape}")
  codes = np.where(table == masks_lib.EMPTY, _EMPTY_CODE, _FULL_CODE).astype(np.int32)
  part = table == masks_lib.PARTIAL
  if S % block_k:                     # keys past S in the last column must be masked
    part[:, -1] |= table[:, -1] == masks_lib.FULL
  qb, kb = np.nonzero(part)
  if qb.size * block_q * block_k > _PATTERN_LIMIT:
    raise Unsupported(f"'cpu_flash' block-sparse mode: {qb.size} partial {block_q}x{block_k} "
                      f"tiles exceed the {_PATTERN_LIMIT} entries evaluated at trace time")
  ar_q, ar_k = np.arange(block_q), np.arange(block_k)
  seen, pats = {}, []
  chunk = max(1, (1 << 22) // (block_q * block_k))
  for s0 in range(0, qb.size, chunk):
    qi = qb[s0:s0 + chunk, None] * block_q + ar_q[None, :]          # [n, bq]
    ki = kb[s0:s0 + chunk, None] * block_k + ar_k[None, :]          # [n, bk]
    inq, ink = qi < T, ki < S
    allowed = np.asarray(pattern_fn(np.minimum(qi, T - 1)[:, :, None],
                                    np.minimum(ki, S - 1)[:, None, :]), bool)
    allowed = np.broadcast_to(allowed, (qi.shape[0], block_q, block_k))
    allowed = allowed & inq[:, :, None] & ink[:, None, :]
    for i in range(allowed.shape[0]):
      t, j = qb[s0 + i], kb[s0 + i]
      pat = allowed[i]
      if not pat.any():
        codes[t, j] = _EMPTY_CODE
        continue
      if ink[i].all() and pat[inq[i]].all():
        codes[t, j] = _FULL_CODE
        continue
      key = np.packbits(pat).tobytes()
      c = seen.get(key)
      if c is None:
        c = seen[key] = len(pats)
        pats.append(pat.astype(np.uint8))
      codes[t, j] = c
  qlist, qcode = _lists(codes)
  klist, kcode = _lists(codes.T)
  pats_arr = np.stack(pats) if pats else np.zeros((1, block_q, block_k), np.uint8)
  density = float(np.mean(codes != _EMPTY_CODE))
  return BlockSparseSchedule(qlist, qcode, klist, kcode, pats_arr, block_q, block_k, density)


_SCHEDULES: dict = {}
_SCHEDULES_MAX = 64


def block_sparse_schedule(mask, T: int, S: int, block_q: int, block_k: int, *,
                          num_heads: int = 1, batch: int = 1) -> BlockSparseSchedule:
  """The :class:`BlockSparseSchedule` of a static mask at the kernel's block sizes for
  ``block_q, block_k`` (from :meth:`attnjax.masks.Mask.block_table`, partial tiles
  evaluated with the mask's predicate).  Cached per mask object and shape.

  Raises :class:`attnjax.core.Unsupported` for data-dependent masks and masks that
  differ between heads or batch rows.
  """
  if mask.data_dependent or mask.head_dependent:
    raise Unsupported(f"'cpu_flash' block-sparse mode needs a static mask shared by the "
                      f"heads, not {mask.name}")
  bq, bk = kernel_blocks(T, S, block_q, block_k)
  key = (id(mask), T, S, bq, bk, num_heads, batch)
  hit = _SCHEDULES.get(key)
  if hit is not None and hit[0] is mask:
    return hit[1]
  table = mask.block_table(T, S, bq, bk, num_heads=num_heads, batch=batch)
  if table.shape[:2] != (1, 1):
    raise Unsupported(f"'cpu_flash' block-sparse mode needs a mask shared by the batch "
                      f"rows and heads, not {mask.name}")
  fn = lambda qi, ki: mask(0, 0, qi, ki, num_heads=num_heads, batch=batch)
  sched = schedule_from_table(table[0, 0], fn, T, S, bq, bk)
  if len(_SCHEDULES) >= _SCHEDULES_MAX:
    _SCHEDULES.clear()
  _SCHEDULES[key] = (mask, sched)
  return sched


def _ffi_sparse_fwd(q, k, v, qlist, qcode, klist, kcode, pats, qmap, kmap, *, scale, block_q,
                    block_k, num_threads):
  B, T, N, _ = q.shape
  Hv = v.shape[-1]
  return jax.ffi.ffi_call(
      build.TARGETS["AttnjaxSparseFwd"],
      (jax.ShapeDtypeStruct((B, T, N, Hv), jnp.float32),
       jax.ShapeDtypeStruct((B, N, T), jnp.float32),
       jax.ShapeDtypeStruct((2, B, N, T), jnp.float32)),
      vmap_method="sequential",
  )(q, k, v, qlist, qcode, klist, kcode, pats, qmap, kmap, scale=np.float32(scale),
    block_q=np.int64(block_q), block_k=np.int64(block_k), num_threads=np.int64(num_threads))


def _ffi_sparse_bwd(q, k, v, do, stats, delta, qlist, qcode, klist, kcode, pats, qmap, kmap, *,
                    scale, block_q, block_k, num_threads):
  return jax.ffi.ffi_call(
      build.TARGETS["AttnjaxSparseBwd"],
      tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)),
      vmap_method="sequential",
  )(q, k, v, do, stats, delta, qlist, qcode, klist, kcode, pats, qmap, kmap,
    scale=np.float32(scale),
    block_q=np.int64(block_q), block_k=np.int64(block_k), num_threads=np.int64(num_threads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(10,))
def _sparse(q, k, v, qlist, qcode, klist, kcode, pats, qmap, kmap, cfg):
  out, lse, _ = _sparse_forward(q, k, v, qlist, qcode, klist, kcode, pats, qmap, kmap, cfg)
  return out, lse


def _sparse_forward(q, k, v, qlist, qcode, klist, kcode, pats, qmap, kmap, cfg):
  scale, bq, bk, nt = cfg
  tables = (qlist, qcode, klist, kcode, pats, qmap, kmap)
  return vary_like(_ffi_sparse_fwd(q, k, v, *tables, scale=scale, block_q=bq, block_k=bk,
                                   num_threads=nt), q, k, v, *tables)


def _sparse_fwd(q, k, v, qlist, qcode, klist, kcode, pats, qmap, kmap, cfg):
  out, lse, stats = _sparse_forward(q, k, v, qlist, qcode, klist, kcode, pats, qmap, kmap, cfg)
  return (out, lse), (q, k, v, qlist, qcode, klist, kcode, pats, qmap, kmap, out, stats)


def _sparse_grads(q, k, v, do, stats, delta, tables, cfg):
  """The kernel's backward: ``(dq, dk, dv)`` float32 from the forward's ``stats``, the
  output cotangent ``do [B, T, N, Hv]`` and ``delta [B, N, T] = rowsum(do * out) - dlse``."""
  scale, bq, bk, nt = cfg
  grads = _ffi_sparse_bwd(q, k, v, do, stats, delta, *tables, scale=scale, block_q=bq,
                          block_k=bk, num_threads=nt)
  return vary_like(grads, q, k, v, do, stats, delta, *tables)


def _sparse_bwd(cfg, res, cts):
  q, k, v, qlist, qcode, klist, kcode, pats, qmap, kmap, out, stats = res
  do, dlse = cts
  do = do.astype(jnp.float32)
  delta = row_dot(do, out).transpose(0, 2, 1) - dlse.astype(jnp.float32)
  grads = _sparse_grads(q, k, v, do, stats, delta, (qlist, qcode, klist, kcode, pats, qmap,
                                                   kmap), cfg)
  return (*sum_to_vma(grads, (q, k, v)), None, None, None, None, None, None, None)


_sparse.defvjp(_sparse_fwd, _sparse_bwd)


def cpu_flash_block_sparse(q, k, v, schedule: BlockSparseSchedule, *, scale: float,
                           num_threads: int = 0, q_rows=None, k_rows=None):
  """Block-sparse flash attention on the CPU kernel (differentiable in q, k, v).

  Args:
    q: ``[B, T, N, H]``; k: ``[B, S, K, H]``; v: ``[B, S, K, Hv]`` (``N % K == 0``;
      H, Hv multiples of 16); any float dtype, computed in float32.
    schedule: the block table (:func:`block_sparse_schedule` for a mask,
      :func:`schedule_from_table` for any tile classification, e.g. a routing's), at
      block sizes equal to ``kernel_blocks(T, S, ...)``; the same for every batch row
      and head.
    scale: the logit scale (a Python float).
    num_threads: worker threads (0: all).
    q_rows, k_rows: optional static row maps (int ``[T]`` / ``[S]`` permutations, NumPy):
      the schedule is in a permuted token order whose query ``t`` is row ``q_rows[t]``
      of q (key ``s`` row ``k_rows[s]`` of k, v), e.g. the 2D-tiled order of
      :mod:`attnjax.core.tiling`.  The kernel reads q, k, v through the maps while it
      packs them and writes out, lse and the gradients back to the original rows, so
      the result equals gathering q, k, v into that order, running the schedule and
      gathering the outputs back, without the gathers.  None: the identity.
  Returns:
    ``(out [B, T, N, Hv] float32, lse [B, N, T] float32)`` in the original row order;
    rows with no allowed key give 0, ``lse = -inf`` and zero gradients.
  """
  bq, bk = schedule.block_q, schedule.block_k
  T, S = q.shape[1], k.shape[1]
  if kernel_blocks(T, S, bq, bk) != (bq, bk):
    raise ValueError(f"schedule block sizes must be kernel_blocks(T={T}, S={S}, ...), got "
                     f"{bq}x{bk}")
  if schedule.qlist.shape[0] != -(-T // bq) or schedule.klist.shape[0] != -(-S // bk):
    raise ValueError(f"schedule must have {-(-T // bq)} query-block and {-(-S // bk)} "
                     f"key-block lists, got {schedule.qlist.shape[0]} and "
                     f"{schedule.klist.shape[0]}")
  maps = tuple(_row_map(m, n, name) for m, n, name in ((q_rows, T, "q_rows"),
                                                        (k_rows, S, "k_rows")))
  cfg = (float(scale), int(bq), int(bk), int(num_threads))
  f32 = lambda x: jnp.asarray(x).astype(jnp.float32)
  return _sparse(f32(q), f32(k), f32(v), jnp.asarray(schedule.qlist),
                 jnp.asarray(schedule.qcode), jnp.asarray(schedule.klist),
                 jnp.asarray(schedule.kcode), jnp.asarray(schedule.pats), *maps, cfg)


def block_sparse_parts():
  """The block-sparse kernel's forward and backward as two plain functions, for a caller
  that keeps the forward's results itself instead of rematerialising them (causal MoBA's
  gathered rows, :mod:`attnjax.ops.routing`); identity row maps, float32 operands:

  - ``fwd(q, k, v, qlist, qcode, klist, kcode, pats, *, block_q, block_k, scale) ->
    (out [B, T, N, Hv], lse [B, N, T], stats)``;
  - ``bwd(q, k, v, do, stats, delta, qlist, qcode, klist, kcode, pats, *, block_q,
    block_k, scale) -> (dq, dk, dv)`` (float32, the shapes of ``q``, ``k``, ``v``) for
    the cotangents ``do [B, T, N, Hv]`` and ``dlse [B, N, T]`` of ``(out, lse)``, given
    as ``delta = rowsum(do * out) - dlse [B, N, T]`` (so ``out`` need not be kept).

  Together they equal :func:`cpu_flash_block_sparse` and its VJP (the same two kernel
  calls)."""
  ident = lambda: jnp.zeros((0,), jnp.int32)     # made where used: no closed-over tracer

  def fwd(q, k, v, qlist, qcode, klist, kcode, pats, *, block_q, block_k, scale):
    cfg = (float(scale), int(block_q), int(block_k), 0)
    return _sparse_forward(q, k, v, qlist, qcode, klist, kcode, pats, ident(), ident(), cfg)

  def bwd(q, k, v, do, stats, delta, qlist, qcode, klist, kcode, pats, *, block_q, block_k,
          scale):
    cfg = (float(scale), int(block_q), int(block_k), 0)
    return _sparse_grads(q, k, v, do, stats, delta,
                         (qlist, qcode, klist, kcode, pats, ident(), ident()), cfg)
  return fwd, bwd


def _row_map(rows, n: int, name: str):
  """A row map as the kernel takes it: int32 ``[n]``, or ``[0]`` for the identity."""
  if rows is None:
    return jnp.zeros((0,), jnp.int32)
  try:
    arr = np.asarray(rows)
  except TypeError as e:  # a tracer
    raise TypeError(f"{name} must be a static (NumPy) row map, got {type(rows).__name__}") \
        from e
  if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer) or \
      not np.array_equal(np.sort(arr), np.arange(n)):
    raise ValueError(f"{name} must be a permutation of 0 .. {n - 1} (int [{n}]), got shape "
                     f"{arr.shape} dtype {arr.dtype}")
  if np.array_equal(arr, np.arange(n)):
    return jnp.zeros((0,), jnp.int32)
  return jnp.asarray(arr.astype(np.int32))


def unsupported_reason(a: AttentionArgs, block_sizes=None) -> Optional[str]:
  """Why ``'cpu_flash'`` cannot serve the call ``a`` (None: it can).  Checked by the
  dispatcher before running (``supports``) and again by :func:`cpu_flash_attention`."""
  unsupported = [name for name, val in (("bias", a.bias), ("score_mod", a.score_mod),
                                        ("softcap", a.softcap),
                                        ("segment ids", a.q_segment_ids)) if val is not None]
  if unsupported:
    return f"'cpu_flash' does not support {', '.join(unsupported)}"
  if a.H % 16 or a.Hv % 16:
    return f"'cpu_flash' needs head dims that are multiples of 16, got H={a.H}, Hv={a.Hv}"
  if a.mask is not None and a.mask.row_band(a.T, a.S) is None and (
      a.mask.data_dependent or a.mask.head_dependent):
    return (f"'cpu_flash' serves band masks (lo(q) <= kv <= hi(q)) and static masks shared "
            f"by the heads (block-sparse), not {a.mask.name}")
  reason = build.unavailable_reason()
  if reason is not None:
    return f"'cpu_flash' kernel unavailable: {reason}"
  bs = _block_sizes(block_sizes)
  if bs.matmul == "amx" and not build.has_amx():
    return ("'cpu_flash' with matmul='amx' needs a CPU with AMX-BF16 (and Linux granting "
            "the tile state)")
  if bs.matmul == "amx" and bs.resolve()[1] % 32:
    return (f"'cpu_flash' with matmul='amx' needs block_k to be a multiple of 32, got "
            f"{bs.resolve()[1]}")
  return None


def cpu_flash_attention(q, k, v, a: AttentionArgs, *, return_lse=False, block_sizes=None,
                        row_map=None):
  """The 'cpu_flash' implementation; same contract as :func:`attnjax.attention`.

  ``row_map`` (the dispatcher's 2D tiling, :func:`attnjax.core.tiling.tiled_index`):
  ``a.mask`` is in a permuted token order whose token ``t`` is row ``row_map[t]`` of q,
  k and v (self-attention, ``T == S``); the result is in the original order.  The
  block-sparse kernel folds the permutation into its packing (no gathers); a band mask
  gathers.

  Raises :class:`attnjax.core.Unsupported` (so ``'auto'`` falls back) when the kernel
  is not built for this machine or the call uses a feature it does not serve
  (:func:`unsupported_reason`).  A traced ``scale`` is applied to ``q`` first.
  """
  reason = unsupported_reason(a, block_sizes)
  if reason is not None:
    raise Unsupported(reason)
  q, a = static_scale(q, a)
  bs = _block_sizes(block_sizes)
  bq, bk, nt = bs.resolve()
  band = None if a.mask is None else a.mask.row_band(a.T, a.S)
  if a.mask is None:
    lo = np.zeros((a.T,), np.int32)
    hi = np.full((a.T,), a.S - 1, np.int32)
  elif band is None:
    sched = block_sparse_schedule(a.mask, a.T, a.S, bq, bk, num_heads=a.N, batch=a.B)
    out, lse = cpu_flash_block_sparse(q, k, v, sched, scale=float(a.scale), num_threads=nt,
                                      q_rows=row_map, k_rows=row_map)
    return _finish(out, lse, q.dtype, a, return_lse)
  else:
    lo, hi = band
  if row_map is not None:  # a band in the permuted order: gather in and out
    idx = np.asarray(row_map)
    back = np.argsort(idx)
    res = cpu_flash_attention(jnp.take(q, idx, axis=1), jnp.take(k, idx, axis=1),
                              jnp.take(v, idx, axis=1), a, return_lse=True,
                              block_sizes=block_sizes)
    out, lse = jnp.take(res[0], back, axis=1), jnp.take(res[1], back, axis=2)
    return (out, lse) if return_lse else out
  # A bf16 result lets the AMX forward round P to bf16 for P @ V (as GPU flash kernels
  # do): its 2^-9 relative error is that of the bf16 output.
  bf16_out = jnp.dtype(q.dtype) == jnp.bfloat16
  cfg = (float(a.scale), int(bq), int(bk), int(nt), bs.matmul, bool(bf16_out))
  f32 = lambda x: x.astype(jnp.float32)
  out, lse = _flash(f32(q), f32(k), f32(v), jnp.asarray(lo), jnp.asarray(hi), cfg)
  return _finish(out, lse, q.dtype, a, return_lse)


def _finish(out, lse, dtype, a: AttentionArgs, return_lse):
  """Sinks, the result dtype and the lse option of a kernel result (float32)."""
  f32 = lambda x: x.astype(jnp.float32)
  if a.sinks is not None:
    # The sink joins the denominator only: rescale the sink-free result.
    lse_s = jnp.logaddexp(lse, f32(a.sinks)[None, :, None])
    out = out * jnp.exp(lse - lse_s).transpose(0, 2, 1)[..., None]
    lse = lse_s
  out = out.astype(dtype)
  return (out, lse) if return_lse else out
