"""Block-sparse flash attention for GPU (Pallas Triton), forward and backward.

Same contract and formula as :mod:`attnjax.kernels.tpu.flash`:

    s_ij = softcap(score_mod(scale * q_i . k_j + bias_ij))        (float32)
    o_i  = sum_{j allowed} exp(s_ij - lse_i) v_j ,   lse_i = log(sum_j exp(s_ij) + exp(sink_n))

("FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness";
"FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning").

Tiling.  One program per ``(batch, query head, q block)`` loops over the compact list
of non-empty key blocks of its row of the mask's block table (an index array read
in-kernel): first the partial tiles, where the mask predicate is evaluated, then the
full ones, unmasked.  GQA reads the kv head ``n // G`` without repeating K/V.
Backward: a dq program per ``(batch, head, q block)`` over the same list, and a
dk/dv program per ``(batch, kv head, k block)`` over the transposed list and the
``G`` query heads of the group; gradients for ``bias``, ``sinks`` and the arrays a
``score_mod`` closes over are produced too (a bias broadcast over the batch
and/or heads is accumulated into its own extent with atomic adds).  Head dims are
zero-padded to a power of two; ``T`` and ``S`` are padded to the block sizes.

Decode (flash-decoding, "Flash-Decoding for long-context inference", Dao et al.
2023): with ``BlockSizes.num_splits = P > 1`` (or the heuristic when ``B * N * nq``
programs are few) the grid is ``(B, N, nq * P)`` and program ``(q block, p)`` walks
only ranks ``[p c // P, (p + 1) c // P)`` of its q block's list of ``c`` tiles,
writing a partial output and its ``lse``; XLA merges them with a log-sum-exp combine,
the sink joining once there.  The backward kernels are fed the merged ``out``/``lse``.

Public entry point: :func:`flash_attention`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attnjax.kernels import common
from attnjax.ops import dense as dense_lib

__all__ = ["BlockSizes", "flash_attention", "flash_attention_reference", "grid_steps"]

_F32 = jnp.float32
# Programs below which the heuristic splits the key list (about two waves of programs
# on a GPU with ~130 SMs).
_SPLIT_TARGET = 256


def _is_pow2(x):
  return x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes and launch parameters of the Triton kernel.

  Attributes:
    block_q: query rows per program, a power of two >= 16.  ``None``: 64 (capped at
      ``T`` rounded up to a power of two, at least 16).
    block_k: keys per tile, a power of two >= 16.  ``None``: 64 (capped likewise).
    num_warps: Triton warps per program (``None``: 4 for head_dim <= 64, else 8).
    num_stages: software pipelining stages.
    num_splits: split-S decode (flash-decoding): each q block's list of non-empty k
      tiles is dealt into this many contiguous parts, each its own program writing a
      partial result and its log-sum-exp, merged in XLA.  ``1`` disables it; ``None``:
      a heuristic (:func:`attnjax.kernels.common.resolve_num_splits`) that splits when
      ``B * N * nq`` programs are fewer than 256 (two waves of a large GPU), keeping at
      least 4 tiles per split.  The backward pass is not split.
  """
  block_q: Optional[int] = None
  block_k: Optional[int] = None
  num_warps: Optional[int] = None
  num_stages: int = 2
  num_splits: Optional[int] = None

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      val = getattr(self, name)
      if val is None:
        continue
      if isinstance(val, bool) or not isinstance(val, int) or val < 16 or not _is_pow2(val):
        raise ValueError(f"BlockSizes.{name} must be a power of two >= 16 (Triton tiles), got "
                         f"{val!r}; use e.g. {max(16, common.next_pow2(val if isinstance(val, int) and val > 0 else 16))}")
    nw = self.num_warps
    if nw is not None and (isinstance(nw, bool) or not isinstance(nw, int) or not _is_pow2(nw)):
      raise ValueError(f"BlockSizes.num_warps must be a power of two or None, got {nw!r}")
    if isinstance(self.num_stages, bool) or not isinstance(self.num_stages, int) or \
        self.num_stages <= 0:
      raise ValueError(f"BlockSizes.num_stages must be a positive int, got {self.num_stages!r}")
    common.validate_num_splits(self.num_splits, "BlockSizes")

  @classmethod
  def get_default(cls) -> "BlockSizes":
    return cls()

  def resolve(self, T: int, S: int):
    bq = self.block_q or min(64, max(16, common.next_pow2(T)))
    bk = self.block_k or min(64, max(16, common.next_pow2(S)))
    return bq, bk

  def resolve_splits(self, table, programs: int) -> int:
    """Splits of each q block's key list for a call with ``programs = B * N * nq``."""
    return common.resolve_num_splits(self.num_splits, table, programs, target=_SPLIT_TARGET)


def _as_block_sizes(block_sizes) -> BlockSizes:
  if block_sizes is None:
    return BlockSizes()
  if isinstance(block_sizes, BlockSizes):
    return block_sizes
  raise NotImplementedError(f"the GPU flash kernel takes attnjax.kernels.gpu.BlockSizes, got "
                            f"{type(block_sizes).__name__}")


@dataclasses.dataclass(frozen=True)
class _Cfg:
  math: common.TileMath
  G: int
  bq: int
  bk: int
  Bt: int
  Kt: int
  has_bias: bool
  bias_b: bool
  has_dense: bool
  dense_b: bool
  has_seg: bool
  has_sinks: bool
  n_pred: int
  n_sm: int
  n_sm_grad: int
  sm_widths: tuple
  P: int = 1          # splits of each q block's tile list; grid axis 2 runs over qb * P + p
  db_atomic: bool = False   # dbias summed over broadcast batch/heads by atomic adds


def _tiles(b, h, q0, k0, bq, bk):
  """[bq, bk] int32 index tiles (b, h, q_idx, kv_idx)."""
  qi = q0 + jnp.arange(bq, dtype=jnp.int32)[:, None]
  ki = k0 + jnp.arange(bk, dtype=jnp.int32)[None, :]
  qi = jnp.broadcast_to(qi, (bq, bk))
  ki = jnp.broadcast_to(ki, (bq, bk))
  z = jnp.zeros((bq, bk), jnp.int32)
  return z + b, z + h, qi, ki


class _Refs:
  def __init__(self, cfg, refs, kind, n_out):
    refs = list(refs)
    self.sched = refs[0]
    self.q, self.k, self.v = refs[1:4]
    i = 4
    if kind != "fwd":
      self.do, self.lse, self.delta = refs[i:i + 3]
      i += 3
    self.sinks = None
    if kind == "fwd" and cfg.has_sinks:
      self.sinks = refs[i]
      i += 1
    self.bias = self.dense = self.qseg = self.kseg = None
    if cfg.has_bias:
      self.bias = refs[i]
      i += 1
    if cfg.has_dense:
      self.dense = refs[i]
      i += 1
    if cfg.has_seg:
      self.qseg, self.kseg = refs[i:i + 2]
      i += 2
    self.pred = refs[i:i + cfg.n_pred]
    i += cfg.n_pred
    self.sm = refs[i:i + cfg.n_sm]
    i += cfg.n_sm
    if kind == "dq" and cfg.has_bias:
      i += 1
    self.outs = refs[i:i + n_out]


def _fwd_kernel(*refs, cfg: _Cfg):
  r = _Refs(cfg, refs, "fwd", 2)
  o_ref, lse_ref = r.outs
  b, n, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  qb = i if cfg.P == 1 else jax.lax.div(i, jnp.int32(cfg.P))
  bq, bk, M = cfg.bq, cfg.bk, cfg.math
  q = r.q[...]
  Hv = r.v.shape[-1]
  n_part, n_tot = r.sched[0], r.sched[1]
  qseg = r.qseg[...] if r.qseg is not None else None

  if cfg.has_sinks:
    m0 = jnp.zeros((bq,), _F32) + r.sinks[n].astype(_F32)
    l0 = jnp.ones((bq,), _F32)
  else:
    m0 = jnp.full((bq,), -jnp.inf, _F32)
    l0 = jnp.zeros((bq,), _F32)
  acc0 = jnp.zeros((bq, Hv), _F32)

  def body(t, carry, masked):
    m, l, acc = carry
    kb = r.sched[2 + t]
    ks = pl.ds(kb * bk, bk)
    k, v = r.k[ks, :], r.v[ks, :]
    bias = r.bias[:, ks] if r.bias is not None else None
    idx = functools.lru_cache(maxsize=None)(
        lambda: _tiles(b, n, qb * bq, kb * bk, bq, bk))
    _, _, s, _ = M.logits(q, k, bias, idx, r.sm)
    if masked:
      seg_eq = None if qseg is None else qseg[:, None] == r.kseg[ks][None, :]
      dense = r.dense[:, ks] if r.dense is not None else None
      ok = M.allowed(idx, r.pred, seg_eq, dense)
      if ok is not None:
        s = jnp.where(ok, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe[:, None])
    alpha = jnp.exp(m - m_safe)
    l = alpha * l + jnp.sum(p, axis=1)
    acc = alpha[:, None] * acc + M.dot_nn(p.astype(v.dtype), v)
    return m_new, l, acc

  if cfg.P == 1:
    bounds = (0, n_part, n_part, n_tot)
  else:                  # this program's contiguous share of the list (partial tiles first)
    lo, hi = common.split_bounds(n_tot, jax.lax.rem(i, jnp.int32(cfg.P)), cfg.P)
    bounds = (lo, jnp.minimum(hi, n_part), jnp.maximum(lo, n_part), hi)
  carry = jax.lax.fori_loop(bounds[0], bounds[1], functools.partial(body, masked=True),
                            (m0, l0, acc0))
  m, l, acc = jax.lax.fori_loop(bounds[2], bounds[3], functools.partial(body, masked=False),
                                carry)
  pos = l > 0
  safe = jnp.where(pos, l, 1.0)
  o_ref[...] = (acc / safe[:, None]).astype(o_ref.dtype)
  mf = jnp.where(jnp.isfinite(m), m, 0.0)
  lse_ref[...] = jnp.where(pos, mf + jnp.log(safe), -jnp.inf)


def _tile_bwd(cfg, r, q, do, lse, delta, k, v, bias, dense, seg_eq, idx, masked):
  M = cfg.math
  s0, s1, s, ev = M.logits(q, k, bias, idx, r.sm)
  if masked:
    ok = M.allowed(idx, r.pred, seg_eq, dense)
    if ok is not None:
      s = jnp.where(ok, s, -jnp.inf)
  p = jnp.exp(s - lse[:, None])
  dp = M.dot_nt(do, v)
  ds = p * (dp - delta[:, None])
  return p, ds, s0, s1, ev


def _dq_kernel(*refs, cfg: _Cfg):
  r = _Refs(cfg, refs, "dq", 2 if cfg.has_bias else 1)
  dq_ref = r.outs[0]
  db_ref = r.outs[1] if cfg.has_bias else None
  b, n, qb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  bq, bk, M = cfg.bq, cfg.bk, cfg.math
  q, do, lse, delta = r.q[...], r.do[...], r.lse[...], r.delta[...]
  qseg = r.qseg[...] if r.qseg is not None else None
  n_part, n_tot = r.sched[0], r.sched[1]

  def body(t, dq, masked):
    kb = r.sched[2 + t]
    ks = pl.ds(kb * bk, bk)
    k, v = r.k[ks, :], r.v[ks, :]
    bias = r.bias[:, ks] if r.bias is not None else None
    dense = r.dense[:, ks] if (masked and r.dense is not None) else None
    seg_eq = None if (qseg is None or not masked) else qseg[:, None] == r.kseg[ks][None, :]
    idx = functools.lru_cache(maxsize=None)(
        lambda: _tiles(b, n, qb * bq, kb * bk, bq, bk))
    p, ds, s0, s1, ev = _tile_bwd(cfg, r, q, do, lse, delta, k, v, bias, dense, seg_eq, idx,
                                  masked)
    ds, _ = M.dlogits(ds, s0, s1, idx, r.sm, ev, {}, {})
    if db_ref is not None:
      if cfg.db_atomic:      # programs of every (b, n) the bias is broadcast over add here
        plgpu.atomic_add(db_ref, (pl.ds(0, bq), ks), ds)
      else:
        db_ref[:, ks] = ds
    return dq + M.dot_nn(ds.astype(k.dtype), k) * M.scale

  dq = jnp.zeros(q.shape, _F32)
  dq = jax.lax.fori_loop(0, n_part, functools.partial(body, masked=True), dq)
  dq = jax.lax.fori_loop(n_part, n_tot, functools.partial(body, masked=False), dq)
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg: _Cfg):
  n_out = 2 + cfg.n_sm_grad
  r = _Refs(cfg, refs, "dkv", n_out)
  dk_ref, dv_ref = r.outs[:2]
  dc_refs = r.outs[2:]
  b, kh, kb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  bq, bk, G, M = cfg.bq, cfg.bk, cfg.G, cfg.math
  k, v = r.k[...], r.v[...]
  ks = pl.ds(kb * bk, bk)
  kseg = r.kseg[...] if r.kseg is not None else None
  n_part, n_tot = r.sched[0], r.sched[1]
  dk = jnp.zeros(k.shape, _F32)
  dv = jnp.zeros(v.shape, _F32)
  dcs = tuple(jnp.zeros((1, w), _F32) for w in cfg.sm_widths)

  for g in range(G):
    n = kh * G + g

    def body(t, carry, masked, g=g, n=n):
      dk, dv, dcs = carry
      qb = r.sched[2 + t]
      qs = pl.ds(qb * bq, bq)
      q, do = r.q[g, qs, :], r.do[g, qs, :]
      lse, delta = r.lse[g, qs], r.delta[g, qs]
      bias = r.bias[g, qs, ks] if r.bias is not None else None
      dense = r.dense[g, qs, ks] if (masked and r.dense is not None) else None
      seg_eq = None if (kseg is None or not masked) else r.qseg[qs][:, None] == kseg[None, :]
      idx = functools.lru_cache(maxsize=None)(
          lambda: _tiles(b, n, qb * bq, kb * bk, bq, bk))
      p, ds, s0, s1, ev = _tile_bwd(cfg, r, q, do, lse, delta, k, v, bias, dense, seg_eq,
                                    idx, masked)
      acc = {j: dcs[j] for j in range(len(dcs))}
      widths = {j: cfg.sm_widths[j] for j in range(len(dcs))}
      ds, acc = M.dlogits(ds, s0, s1, idx, r.sm, ev, acc, widths)
      dv = dv + M.dot_tn(p.astype(do.dtype), do)
      dk = dk + M.dot_tn(ds.astype(q.dtype), q) * M.scale
      return dk, dv, tuple(acc[j] for j in range(len(dcs)))

    carry = jax.lax.fori_loop(0, n_part, functools.partial(body, masked=True), (dk, dv, dcs))
    dk, dv, dcs = jax.lax.fori_loop(n_part, n_tot, functools.partial(body, masked=False), carry)

  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  for ref, d in zip(dc_refs, dcs):
    ref[...] = d[0]


# ====================================================================== the call


def _sched_array(table, transpose):
  cols, n_part, n_tot = common.list_schedule(table, transpose=transpose)
  xp = jnp if isinstance(cols, (jax.Array, jax.core.Tracer)) else np
  arr = xp.concatenate([n_part[..., None], n_tot[..., None], cols], axis=-1).astype(xp.int32)
  W = arr.shape[-1]
  Wp = common.next_pow2(W)
  if Wp != W:
    arr = xp.concatenate([arr, xp.zeros(arr.shape[:-1] + (Wp - W,), xp.int32)], axis=-1)
  return jnp.asarray(arr)


def _pad1(x):
  n = x.shape[0]
  return jnp.pad(x, (0, common.next_pow2(n) - n))


def _build(a: dense_lib.AttentionArgs, bs: BlockSizes, interpret: bool):
  B, T, S, N, K, G, H, Hv = a.B, a.T, a.S, a.N, a.K, a.G, a.H, a.Hv
  bq, bk = bs.resolve(T, S)
  plan = common.make_plan(a, bq, bk)
  nq, nk, Tp, Sp = plan.nq, plan.nk, plan.Tp, plan.Sp
  pred_tf = common.trace_predicate(plan, bq, bk)
  sm_tf = common.trace_score_mod(a, bq, bk)
  Hp, Hvp = common.next_pow2(H), common.next_pow2(Hv)
  Bt, Kt = plan.table.shape[:2]
  fwd_sched = _sched_array(plan.table, False)      # [Bt, Kt, nq, W]
  bwd_sched = _sched_array(plan.table, True)       # [Bt, Kt, nk, W2]
  num_warps = bs.num_warps or (4 if max(Hp, Hvp) <= 64 else 8)
  P = bs.resolve_splits(plan.table, B * N * nq)

  def make_cfg(dtype, splits=1):
    prec = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    math = common.TileMath(a.scale, a.softcap, sm_tf, pred_tf, S, S % bk != 0, prec)
    sm_sizes = [] if sm_tf is None else [int(np.prod(s, dtype=np.int64)) for s in sm_tf.shapes]
    n_grad = 0 if sm_tf is None else sm_tf.n_explicit
    return _Cfg(math=math, G=G, bq=bq, bk=bk, Bt=Bt, Kt=Kt,
                has_bias=a.bias is not None,
                bias_b=a.bias is not None and a.bias.shape[0] > 1,
                has_dense=plan.dense is not None,
                dense_b=plan.dense is not None and plan.dense.shape[0] > 1,
                # split programs leave the sink to the merge (counted once)
                has_seg=plan.seg is not None, has_sinks=a.sinks is not None and splits == 1,
                n_pred=0 if pred_tf is None else len(pred_tf.shapes),
                n_sm=len(sm_sizes), n_sm_grad=n_grad,
                sm_widths=tuple(common.next_pow2(max(sz, 1)) for sz in sm_sizes[:n_grad]),
                P=splits)

  def params():
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=bs.num_stages)

  def prep_side(bias, seg):
    side = []
    if bias is not None:
      x = jnp.broadcast_to(bias.astype(_F32), (bias.shape[0], N, T, S))
      side.append(jnp.pad(x, ((0, 0), (0, 0), (0, Tp - T), (0, Sp - S))))
    if plan.dense is not None:
      d = jnp.asarray(plan.dense)
      d = jnp.broadcast_to(d, (d.shape[0], N, T, S)).astype(jnp.int32)
      side.append(jnp.pad(d, ((0, 0), (0, 0), (0, Tp - T), (0, Sp - S))))
    if seg is not None:
      qs, ks = seg
      side.append(jnp.pad(qs, ((0, 0), (0, Tp - T)), constant_values=-1))
      side.append(jnp.pad(ks, ((0, 0), (0, Sp - S)), constant_values=-2))
    return side

  def sel(cfg, b, kh):
    return (b if cfg.Bt > 1 else 0, kh if cfg.Kt > 1 else 0)

  def q_block(cfg, i):
    """The q block of grid index ``i = qb * P + p``."""
    return i if cfg.P == 1 else jax.lax.div(i, jnp.int32(cfg.P))

  def side_specs_q(cfg):
    """Per (b, n, qb [, split]) program: row blocks of the side inputs."""
    specs = []
    if cfg.has_bias:
      specs.append(pl.BlockSpec((None, None, bq, Sp),
                                lambda b, n, i: (b if cfg.bias_b else 0, n, q_block(cfg, i), 0)))
    if cfg.has_dense:
      specs.append(pl.BlockSpec((None, None, bq, Sp),
                                lambda b, n, i: (b if cfg.dense_b else 0, n, q_block(cfg, i), 0)))
    if cfg.has_seg:
      specs += [pl.BlockSpec((None, bq), lambda b, n, i: (b, q_block(cfg, i))),
                pl.BlockSpec((None, Sp), lambda b, n, i: (b, 0))]
    return specs

  def side_specs_k(cfg):
    """Per (b, kh, kb) program: the G heads' full rows, this k block's columns."""
    specs = []
    if cfg.has_bias:
      specs.append(pl.BlockSpec((None, G, Tp, Sp),
                                lambda b, kh, j: (b if cfg.bias_b else 0, kh, 0, 0)))
    if cfg.has_dense:
      specs.append(pl.BlockSpec((None, G, Tp, Sp),
                                lambda b, kh, j: (b if cfg.dense_b else 0, kh, 0, 0)))
    if cfg.has_seg:
      specs += [pl.BlockSpec((None, Tp), lambda b, kh, j: (b, 0)),
                pl.BlockSpec((None, bk), lambda b, kh, j: (b, j))]
    return specs

  def const_specs(consts):
    return [pl.BlockSpec(c.shape, lambda *_: (0,)) for c in consts]

  def run_fwd(qr, kr, vr, sinks, side, pred_c, sm_c):
    """Forward kernel; with ``P > 1`` splits, per-split partials merged in XLA."""
    cfg = make_cfg(qr.dtype, splits=P)
    W = fwd_sched.shape[-1]
    qbl = functools.partial(q_block, cfg)
    specs = [pl.BlockSpec((None, None, None, W),
                          lambda b, n, i: (*sel(cfg, b, n // G), qbl(i), 0)),
             pl.BlockSpec((None, None, bq, Hp), lambda b, n, i: (b, n, qbl(i), 0)),
             pl.BlockSpec((None, None, Sp, Hp), lambda b, n, i: (b, n // G, 0, 0)),
             pl.BlockSpec((None, None, Sp, Hvp), lambda b, n, i: (b, n // G, 0, 0))]
    extra = []
    if cfg.has_sinks:
      sk = _pad1(sinks.astype(_F32))
      extra.append(sk)
      specs.append(pl.BlockSpec(sk.shape, lambda *_: (0,)))
    specs += side_specs_q(cfg) + const_specs(pred_c) + const_specs(sm_c)
    # Rows (q block, split, t): program i = qb * P + p writes row block i.
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg), grid=(B, N, nq * P), in_specs=specs,
        out_specs=[pl.BlockSpec((None, None, bq, Hvp), lambda b, n, i: (b, n, i, 0)),
                   pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i))],
        out_shape=[jax.ShapeDtypeStruct((B, N, Tp * P, Hvp), qr.dtype if P == 1 else _F32),
                   jax.ShapeDtypeStruct((B, N, Tp * P), _F32)],
        compiler_params=params(), interpret=interpret,
        name="attnjax_flash_fwd_gpu" if P == 1 else "attnjax_flash_fwd_split_gpu",
    )(fwd_sched, qr, kr, vr, *extra, *side, *pred_c, *sm_c)
    if P == 1:
      return o, lse
    sink = None if sinks is None else sinks.reshape(1, N, 1, 1)
    o, lse = common.merge_splits(o.reshape(B, N, nq, P, bq, Hvp), lse.reshape(B, N, nq, P, bq),
                                 axis=3, sink=sink)
    return o.reshape(B, N, Tp, Hvp).astype(qr.dtype), lse.reshape(B, N, Tp)

  def run_bwd(qr, kr, vr, dor, lse, delta, side, pred_c, sm_c, has_bias):
    cfg = make_cfg(qr.dtype)
    W = fwd_sched.shape[-1]
    specs = [pl.BlockSpec((None, None, None, W), lambda b, n, i: (*sel(cfg, b, n // G), i, 0)),
             pl.BlockSpec((None, None, bq, Hp), lambda b, n, i: (b, n, i, 0)),
             pl.BlockSpec((None, None, Sp, Hp), lambda b, n, i: (b, n // G, 0, 0)),
             pl.BlockSpec((None, None, Sp, Hvp), lambda b, n, i: (b, n // G, 0, 0)),
             pl.BlockSpec((None, None, bq, Hvp), lambda b, n, i: (b, n, i, 0)),
             pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i)),
             pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i))]
    specs += side_specs_q(cfg) + const_specs(pred_c) + const_specs(sm_c)
    out_specs = [pl.BlockSpec((None, None, bq, Hp), lambda b, n, i: (b, n, i, 0))]
    out_shape = [jax.ShapeDtypeStruct((B, N, Tp, Hp), qr.dtype)]
    extra, aliases = [], {}
    if has_bias:
      # The gradient buffer has the bias's own batch/head extent ([Bb, Nb, Tp, Sp]);
      # when it is broadcast, programs of different (b, n) accumulate atomically.
      Bb, Nb = a.bias.shape[:2]
      cfg = dataclasses.replace(cfg, db_atomic=(Bb, Nb) != (B, N))

      def dbmap(b, n, i):
        return (b if Bb > 1 else 0, n if Nb > 1 else 0, i, 0)
      extra.append(jnp.zeros((Bb, Nb, Tp, Sp), _F32))
      specs.append(pl.BlockSpec((None, None, bq, Sp), dbmap))
      out_specs.append(pl.BlockSpec((None, None, bq, Sp), dbmap))
      out_shape.append(jax.ShapeDtypeStruct((Bb, Nb, Tp, Sp), _F32))
      aliases = {1 + 6 + len(side) + len(pred_c) + len(sm_c): 1}
    outs = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg), grid=(B, N, nq), in_specs=specs,
        out_specs=out_specs, out_shape=out_shape, input_output_aliases=aliases,
        compiler_params=params(), interpret=interpret, name="attnjax_flash_bwd_dq_gpu",
    )(fwd_sched, qr, kr, vr, dor, lse, delta, *side, *pred_c, *sm_c, *extra)
    dq = outs[0]
    dbias = outs[1] if has_bias else None

    W2 = bwd_sched.shape[-1]
    specs = [pl.BlockSpec((None, None, None, W2), lambda b, kh, j: (*sel(cfg, b, kh), j, 0)),
             pl.BlockSpec((None, G, Tp, Hp), lambda b, kh, j: (b, kh, 0, 0)),
             pl.BlockSpec((None, None, bk, Hp), lambda b, kh, j: (b, kh, j, 0)),
             pl.BlockSpec((None, None, bk, Hvp), lambda b, kh, j: (b, kh, j, 0)),
             pl.BlockSpec((None, G, Tp, Hvp), lambda b, kh, j: (b, kh, 0, 0)),
             pl.BlockSpec((None, G, Tp), lambda b, kh, j: (b, kh, 0)),
             pl.BlockSpec((None, G, Tp), lambda b, kh, j: (b, kh, 0))]
    specs += side_specs_k(cfg) + const_specs(pred_c) + const_specs(sm_c)
    out_specs = [pl.BlockSpec((None, None, bk, Hp), lambda b, kh, j: (b, kh, j, 0)),
                 pl.BlockSpec((None, None, bk, Hvp), lambda b, kh, j: (b, kh, j, 0))]
    out_shape = [jax.ShapeDtypeStruct((B, K, Sp, Hp), kr.dtype),
                 jax.ShapeDtypeStruct((B, K, Sp, Hvp), vr.dtype)]
    for w in cfg.sm_widths:
      out_specs.append(pl.BlockSpec((None, None, None, w), lambda b, kh, j: (b, kh, j, 0)))
      out_shape.append(jax.ShapeDtypeStruct((B, K, nk, w), _F32))
    outs = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg), grid=(B, K, nk), in_specs=specs,
        out_specs=out_specs, out_shape=out_shape,
        compiler_params=params(), interpret=interpret, name="attnjax_flash_bwd_dkv_gpu",
    )(bwd_sched, qr, kr, vr, dor, lse, delta, *side, *pred_c, *sm_c)
    dk, dv = outs[:2]
    dcs = [x.sum(axis=(0, 1, 2)) for x in outs[2:]]
    return dq, dk, dv, dbias, dcs

  def to_bnth(x, L, Lp, Dp):     # [B, L, X, D] -> [B, X, Lp, Dp]
    return jnp.pad(x, ((0, 0), (0, Lp - L), (0, 0), (0, Dp - x.shape[-1]))).transpose(0, 2, 1, 3)

  def storage(cs):
    return [_pad1(common._const_storage(c)) for c in cs]

  def forward(q, k, v, bias, sinks, seg, pred_c, sm_c):
    side = prep_side(bias, seg)
    return run_fwd(to_bnth(q, T, Tp, Hp), to_bnth(k, S, Sp, Hp), to_bnth(v, S, Sp, Hvp),
                   sinks, side, storage(pred_c), storage(sm_c))

  @jax.custom_vjp
  def core(q, k, v, bias, sinks, seg, pred_c, sm_c):
    return forward(q, k, v, bias, sinks, seg, pred_c, sm_c)

  def core_fwd(q, k, v, bias, sinks, seg, pred_c, sm_c):
    out, lse = forward(q, k, v, bias, sinks, seg, pred_c, sm_c)
    return (out, lse), (q, k, v, bias, sinks, seg, pred_c, sm_c, out, lse)

  def core_bwd(res, cts):
    q, k, v, bias, sinks, seg, pred_c, sm_c, out, lse = res
    dout, dlse = cts
    delta = jnp.sum(dout.astype(_F32) * out.astype(_F32), axis=-1) - dlse   # [B, N, Tp]
    valid = (jnp.arange(Tp) < T)[None, None, :]
    lse_b = jnp.where(valid & jnp.isfinite(lse), lse, jnp.inf)
    dor = jnp.where(valid[..., None], dout, 0).astype(q.dtype)
    delta_b = jnp.where(valid, delta, 0.0)
    side = prep_side(bias, seg)
    dq, dk, dv, db, dcs = run_bwd(
        to_bnth(q, T, Tp, Hp), to_bnth(k, S, Sp, Hp), to_bnth(v, S, Sp, Hvp), dor, lse_b,
        delta_b, side, storage(pred_c), storage(sm_c), bias is not None)
    dq = dq.transpose(0, 2, 1, 3)[:, :T, :, :H].astype(q.dtype)
    dk = dk.transpose(0, 2, 1, 3)[:, :S, :, :H].astype(k.dtype)
    dv = dv.transpose(0, 2, 1, 3)[:, :S, :, :Hv].astype(v.dtype)
    dbias = None
    if bias is not None:
      db = db[:, :, :T, :S]
      axes = tuple(ax for ax, dim in enumerate(bias.shape) if dim == 1)
      if axes:
        db = db.sum(axis=axes, keepdims=True)
      dbias = db.astype(bias.dtype)
    dsinks = None
    if sinks is not None:
      dsinks = common.sink_grads(sinks, lse[:, :, :T], delta[:, :, :T])
    dseg = None if seg is None else tuple(common.float0_like(x) for x in seg)
    dpred = [common.float0_like(jnp.asarray(c)) for c in pred_c]
    dsm = []
    for j, c in enumerate(sm_c):
      c = jnp.asarray(c)
      if j < len(dcs) and jnp.issubdtype(c.dtype, jnp.inexact):
        dsm.append(dcs[j][:c.size].reshape(c.shape).astype(c.dtype))
      else:
        dsm.append(common.float0_like(c))
    return dq, dk, dv, dbias, dsinks, dseg, dpred, dsm

  core.defvjp(core_fwd, core_bwd)

  def apply(q, k, v):
    pred_c = [] if pred_tf is None else list(pred_tf.explicit) + list(pred_tf.literals)
    sm_c = [] if sm_tf is None else list(sm_tf.explicit) + list(sm_tf.literals)
    out, lse = core(q, k, v, a.bias, a.sinks, plan.seg, pred_c, sm_c)
    return out.transpose(0, 2, 1, 3)[:, :T, :, :Hv], lse[:, :, :T]

  return apply, plan, P


def flash_attention(q, k, v, *, mask=None, score_mod=None, bias=None, q_segment_ids=None,
                    kv_segment_ids=None, scale=None, softcap=None, sinks=None,
                    return_lse=False, block_sizes=None, interpret=None):
  """Block-sparse flash attention on GPU (Pallas Triton), forward and backward.

  ``o_i = sum_j softmax_j(s_ij) v_j`` with ``s_ij = softcap(score_mod(scale q_i.k_j +
  bias_ij))``, masked, the sink joining the denominator only.  Paper: "FlashAttention-2:
  Faster Attention with Better Parallelism and Work Partitioning" (Dao, 2023).

  Args:
    q: ``[B, T, N, H]``; k: ``[B, S, K, H]``; v: ``[B, S, K, Hv]``; ``N % K == 0``.
    mask, score_mod, bias, q_segment_ids, kv_segment_ids, scale, softcap, sinks,
      return_lse: as in :func:`attnjax.attention`.
    block_sizes: :class:`BlockSizes`; another type raises ``NotImplementedError``.
    interpret: run in Pallas interpret mode; default: when the backend is not GPU.

  Returns:
    ``[B, T, N, Hv]`` in ``q.dtype`` (and ``lse [B, N, T]`` float32 with ``return_lse``).
  """
  bs = _as_block_sizes(block_sizes)
  a = dense_lib.check_attention_args(
      q, k, v, mask=mask, score_mod=score_mod, bias=bias, q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids, scale=scale, softcap=softcap, sinks=sinks)
  if not isinstance(return_lse, bool):
    raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
  if interpret is None:
    interpret = jax.default_backend() not in ("gpu", "cuda", "rocm")
  apply, _, _ = _build(a, bs, bool(interpret))
  out, lse = apply(q, k, v)
  return (out, lse) if return_lse else out


def grid_steps(q, k, v, *, block_sizes=None, **kwargs):
  """Forward programs and tiles for a call with a static mask.

  Returns ``num_splits`` (``P``), ``fwd_programs`` (``B * N * nq * P``), ``fwd_tiles``
  (``[B', K', nq, P]``: tiles each split program of a head visits), ``fwd_active``
  (tiles computed in all), the ``table``, ``block_q`` and ``block_k``.
  """
  bs = _as_block_sizes(block_sizes)
  a = dense_lib.check_attention_args(q, k, v, **kwargs)
  bq, bk = bs.resolve(a.T, a.S)
  plan = common.make_plan(a, bq, bk)
  P = bs.resolve_splits(plan.table, a.B * a.N * plan.nq)
  _, _, n_tot = common.list_schedule(plan.table)
  lo, hi = common.split_bounds(n_tot[..., None], np.arange(P), P)   # as the kernel does
  tiles = hi - lo
  Bt, Kt = plan.table.shape[:2]
  rep = (a.B // Bt) * (a.K // Kt) * a.G
  return dict(num_splits=P, fwd_programs=a.B * a.N * plan.nq * P, fwd_tiles=tiles,
              fwd_active=int(np.sum(tiles)) * rep, table=plan.table, block_q=bq, block_k=bk)


def flash_attention_reference(q, k, v, **kwargs):
  """The float32 dense oracle (:func:`attnjax.reference_attention`)."""
  return dense_lib.reference_attention(q, k, v, **kwargs)
