"""Per-tile math shared by the flash kernels (TPU and GPU, forward and backward).

:class:`TileMath` computes a tile's logits ``s0 = scale * q k^T + bias``,
``s1 = score_mod(s0)``, ``s = softcap(s1)`` (masked entries ``-inf`` on partial tiles),
the online-softmax step and the backward's ``p``/``ds``; :func:`finish_softmax` and
:func:`merge_splits` finish the forward; :class:`KernelRefs` unpacks a kernel's refs.

Paper: "FlashAttention: Fast and Memory-Efficient Exact Attention with
IO-Awareness" (Dao et al., 2022).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core.jaxpr import TileEvaluator
from attnjax.core.plan import TracedFn

__all__ = ["TileMath", "finish_softmax", "merge_splits", "KernelRefs", "sink_grads",
           "float0_like", "round_up", "next_pow2"]

_F32 = jnp.float32


def merge_splits(o_p, lse_p, axis: int, sink=None):
  """Log-sum-exp combine of per-split partial results.

  ``o_p``: normalised partial outputs, the split axis at ``axis``, features last;
  ``lse_p``: their log-sum-exps, ``o_p.shape[:-1]``.  ``sink``: logits broadcastable to
  ``lse`` joining the denominator once (or None).  Returns
  ``o = sum_p exp(lse_p - lse) o_p`` and ``lse = logsumexp_p(lse_p [, sink])``; splits
  with ``lse_p = -inf`` (no tile, or no allowed key) weigh 0, rows with no allowed key
  give ``o = 0`` and ``lse = -inf`` (``lse = sink`` with a sink), never NaN.
  """
  lse_p = lse_p.astype(_F32)
  m = jnp.max(lse_p, axis=axis)
  if sink is not None:
    sink = jnp.broadcast_to(sink.astype(_F32), m.shape)
    m = jnp.maximum(m, sink)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.exp(lse_p - jnp.expand_dims(m, axis))                    # 0 for empty splits
  denom = jnp.sum(w, axis=axis)
  if sink is not None:
    denom = denom + jnp.exp(sink - m)
  pos = denom > 0
  safe = jnp.where(pos, denom, 1.0)
  o = jnp.sum(jnp.expand_dims(w, -1) * o_p.astype(_F32), axis=axis) / safe[..., None]
  lse = jnp.where(pos, m + jnp.log(safe), -jnp.inf)
  return o, lse



# =========================================================================== small math


def sink_grads(sinks, lse_bnt, delta_bnt):
  """``d sink_n = -sum_{b,t} exp(sink_n - lse) * delta`` (delta = rowsum(dO * O) - dlse)."""
  sk = sinks.astype(_F32)[None, :, None]
  p = jnp.exp(sk - jnp.where(jnp.isfinite(lse_bnt), lse_bnt, jnp.inf))
  return (-jnp.sum(p * delta_bnt, axis=(0, 2))).astype(sinks.dtype)


def float0_like(x):
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, dtype=jax.dtypes.float0)


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def next_pow2(x: int) -> int:
  return 1 << max(0, int(math.ceil(math.log2(max(1, x)))))


# =========================================================================== tile math


@dataclasses.dataclass(frozen=True)
class TileMath:
  """The per-tile computation shared by every kernel (forward and backward).

  ``s0 = scale * q k^T + bias``; ``s1 = score_mod(s0)``; ``s = softcap(s1)``; masked
  entries of partial tiles become ``-inf``.
  """
  scale: float
  softcap: Optional[float]
  sm: Optional[TracedFn]
  pred: Optional[TracedFn]
  S: int
  ragged_k: bool
  precision: Any = None

  def dot_nt(self, a, b):
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=self.precision,
                               preferred_element_type=_F32)

  def dot_nn(self, a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=self.precision,
                               preferred_element_type=_F32)

  def dot_tn(self, a, b):
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=self.precision,
                               preferred_element_type=_F32)

  def logits(self, q, k, bias, idx, sm_refs):
    """Returns ``(s0, s1, s, ev)`` (``ev``: the score_mod evaluator, or None)."""
    s0 = self.dot_nt(q, k) * self.scale
    if bias is not None:
      s0 = s0 + bias.astype(_F32)
    s1, ev = s0, None
    if self.sm is not None:
      ev = TileEvaluator(sm_refs)
      s1 = self.sm.call([s0, *idx()], sm_refs, ev).astype(_F32)
    s = s1
    if self.softcap is not None:
      s = self.softcap * jnp.tanh(s1 / self.softcap)
    return s0, s1, s, ev

  def allowed(self, idx, pred_refs, seg_eq, dense):
    ok = None
    if self.ragged_k:
      ok = idx()[3] < self.S
    if self.pred is not None:
      m = self.pred.call(list(idx()), pred_refs, TileEvaluator(pred_refs))
      ok = m if ok is None else ok & m
    if seg_eq is not None:
      ok = seg_eq if ok is None else ok & seg_eq
    if dense is not None:
      d = dense != 0
      ok = d if ok is None else ok & d
    return ok

  def dlogits(self, ds, s0, s1, idx, sm_refs, ev, dconst_acc, dconst_width):
    """Backpropagates ``d s`` to ``d s0`` through softcap and score_mod; accumulates
    score_mod array gradients into ``dconst_acc`` (dict slot -> [1, width])."""
    if self.softcap is not None:
      th = jnp.tanh(s1 / self.softcap)
      ds = ds * (1.0 - th * th)
    if self.sm is not None:
      leaf_vals = ev.values
      def f(s0_, *g):
        ev2 = TileEvaluator(sm_refs, leaf_values=g)
        return self.sm.call([s0_, *idx()], sm_refs, ev2).astype(_F32)
      _, vjp = jax.vjp(f, s0, *leaf_vals)
      grads = vjp(ds)
      ds = grads[0]
      if dconst_acc:
        dconst_acc = ev.accumulate_grads(grads[1:], dconst_acc, dconst_width)
    return ds, dconst_acc

  def masked_logits(self, q, k, bias, idx, sm_refs, masked, pred_refs, seg_eq, dense):
    """:meth:`logits` with, on a partial tile (``masked``), disallowed entries of ``s``
    set to ``-inf``.  Returns ``(s0, s1, s, ev)``."""
    s0, s1, s, ev = self.logits(q, k, bias, idx, sm_refs)
    if masked:
      ok = self.allowed(idx, pred_refs, seg_eq, dense)
      if ok is not None:
        s = jnp.where(ok, s, -jnp.inf)
    return s0, s1, s, ev

  def probs_and_ds(self, s, lse, do, v, delta):
    """``p = exp(s - lse)`` and ``d s = p (dO v^T - delta)`` of one tile (``lse``,
    ``delta``: ``[rows, 1]``; ``lse = +inf`` on rows to ignore)."""
    p = jnp.exp(s - lse)
    ds = p * (self.dot_nt(do, v) - delta)
    return p, ds

  def online_softmax(self, m, l, acc, s, v):
    """One step of the online softmax: folds the logits ``s [rows, bk]`` of a tile and
    its values ``v`` into the running max ``m``, sum ``l`` (``[rows]`` or ``[rows, 1]``)
    and unnormalised output ``acc [rows, Hv]``; fully masked rows stay at 0."""
    col = (lambda x: x[:, None]) if m.ndim == 1 else (lambda x: x)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=m.ndim == 2))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - col(m_safe))
    alpha = jnp.exp(m - m_safe)
    l = alpha * l + jnp.sum(p, axis=1, keepdims=m.ndim == 2)
    acc = col(alpha) * acc + self.dot_nn(p.astype(v.dtype), v)
    return m_new, l, acc


def finish_softmax(m, l, acc):
  """``(o, lse)`` from the online-softmax state: ``o = acc / l``, ``lse = m + log l``;
  rows with ``l = 0`` (no allowed key) give ``o = 0``, ``lse = -inf``."""
  col = (lambda x: x[:, None]) if m.ndim == 1 else (lambda x: x)
  pos = l > 0
  safe = jnp.where(pos, l, 1.0)
  mf = jnp.where(jnp.isfinite(m), m, 0.0)
  return acc / col(safe), jnp.where(pos, mf + jnp.log(safe), -jnp.inf)


# =========================================================================== shared wrappers


def select_column(tile, col, lane):
  """Column ``col`` (a traced int) of a ``[rows, width]`` float tile, as ``[rows, 1]``: a
  masked lane sum (no dynamic lane slicing); ``lane``: the column indices, broadcastable
  to the tile (an iota the backend lowers)."""
  return jnp.sum(jnp.where(lane == col, tile, 0.0), axis=1, keepdims=True)


class KernelRefs:
  """Unpacks a flash kernel's positional refs: ``lead`` schedule refs, ``q, k, v``,
  (backward) ``do, lse, delta``, (forward) ``sinks``, then ``bias``, ``dense``,
  ``qseg, kseg``, the key intervals ``klo, khi``, the predicate and score_mod
  constants, an aliased input (skipped),
  the outputs and the scratch buffers, each present as ``cfg`` says."""

  def __init__(self, cfg, refs, *, n_lead, kind, n_out, n_scratch=0, aliased=False):
    refs = list(refs)
    self.lead = refs[:n_lead]
    i = n_lead
    self.q, self.k, self.v = refs[i:i + 3]
    i += 3
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
    self.klo = self.khi = None
    if cfg.has_kiv:
      self.klo, self.khi = refs[i:i + 2]
      i += 2
    self.pred = refs[i:i + cfg.n_pred]
    i += cfg.n_pred
    self.sm = refs[i:i + cfg.n_sm]
    i += cfg.n_sm
    if aliased:
      i += 1
    self.outs = refs[i:i + n_out]
    i += n_out
    self.scratch = refs[i:i + n_scratch]


