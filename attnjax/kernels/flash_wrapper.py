"""The flash-attention wrapper shared by the TPU and GPU backends.

:func:`make_flash_attention` builds a backend's public ``flash_attention`` (validation,
block sizes, interpret mode); :func:`plan_call` gives ``grid_steps`` its plan;
:func:`flash_core` is the ``custom_vjp`` core around a backend's forward and backward
kernels, with :func:`side_inputs` (bias, dense mask, segment ids as kernel inputs),
:func:`backward_rows` (row statistics) and :func:`finish_grads` (cotangents, summed
over ``shard_map`` axes with :func:`attnjax.core.vma.sum_to_vma`).  :func:`count_steps`
is a test hook: kernels built inside it also count the grid steps they execute.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core.args import AttentionArgs, check_attention_args, static_scale
from attnjax.core.errors import Unsupported
from attnjax.core.plan import Plan, TracedFn, make_plan
from attnjax.core.softmax import reference_attention
from attnjax.core.vma import sum_to_vma
from attnjax.kernels.tile_math import TileMath, float0_like, sink_grads

__all__ = ["as_block_sizes", "default_interpret", "plan_call", "make_flash_attention",
           "tile_math", "cfg_flags", "side_inputs", "backward_rows", "finish_grads",
           "hoist_tracers", "flash_core", "traced_consts", "flash_attention_reference",
           "check_pages", "gather_pages", "scatter_pages", "make_paged_flash_attention",
           "count_steps", "counting_steps", "record_steps"]

_F32 = jnp.float32
_STEP_LOGS = []          # the open :func:`count_steps` records


@contextlib.contextmanager
def count_steps():
  """Test hook: flash kernels *built* (traced) inside this context carry a step counter
  and record, each time one runs, ``(kernel name, executed, active)``: the grid steps
  (TPU) or list iterations (GPU) executed in all programs, and of those the ones that
  computed a tile.  Yields the list the records are appended to (by
  ``jax.debug.callback``; call ``jax.effects_barrier()`` before reading it)."""
  log = []
  _STEP_LOGS.append(log)
  try:
    yield log
  finally:
    _STEP_LOGS.remove(log)


def counting_steps() -> bool:
  """Whether kernels built now should count their steps (:func:`count_steps`)."""
  return bool(_STEP_LOGS)


def record_steps(name: str, executed, active):
  """Appends ``(name, sum(executed), sum(active))`` to the open :func:`count_steps`
  records when the computation runs."""
  logs = list(_STEP_LOGS)

  def cb(e, a):
    for log in logs:
      log.append((name, int(np.sum(e)), int(np.sum(a))))
  jax.debug.callback(cb, executed, active)


def as_block_sizes(block_sizes, cls, backend: str):
  """``block_sizes`` as a ``cls`` (``None``: defaults); another type raises
  :class:`~attnjax.core.errors.Unsupported` (the dispatcher routes each implementation
  its own type, so it never passes another one)."""
  if block_sizes is None:
    return cls()
  if isinstance(block_sizes, cls):
    return block_sizes
  raise Unsupported(f"the {backend} flash kernel takes attnjax.kernels."
                            f"{backend.lower()}.BlockSizes, got {type(block_sizes).__name__}")


def default_interpret(interpret, backends, params_type=None):
  """Interpret mode unless the default JAX backend is one of ``backends``.

  ``interpret`` is None (that default), a bool, or (when the backend has one, e.g. TPU's
  ``pltpu.InterpretParams``) an instance of ``params_type``, passed to ``pallas_call``
  unchanged: TPU-semantics interpretation (race detection, NaN-filled uninitialised
  memory, several simulated cores).
  """
  if interpret is None:
    return jax.default_backend() not in backends
  if isinstance(interpret, (bool, np.bool_)):
    return bool(interpret)
  if params_type is not None and isinstance(interpret, params_type):
    return interpret
  expected = "None, a bool" + (f" or an instance of {params_type.__name__}"
                               if params_type else "")
  raise TypeError(f"interpret must be {expected}, got {type(interpret).__name__}")


def plan_call(q, k, v, bs, kwargs, programs):
  """``(a, plan, P)`` of a call for ``grid_steps``: the normalised arguments, the plan
  at ``bs``'s block sizes and the resolved split count (``programs(a, plan)`` parallel
  programs without a split)."""
  a = check_attention_args(q, k, v, **kwargs)
  bq, bk = bs.resolve(a.T, a.S)
  plan = make_plan(a, bq, bk)
  return a, plan, bs.resolve_splits(plan.table, programs(a, plan))


def make_flash_attention(build, block_sizes_cls, backend: str, native, doc: str, module: str,
                         interpret_params=None):
  """The public ``flash_attention`` of a backend: validates the arguments, then runs
  ``build(a, block_sizes, interpret)(q, k, v) -> (out [B, T, N, Hv], lse [B, N, T])``
  (interpret mode by default unless the JAX backend is one of ``native``)."""

  def flash_attention(q, k, v, *, mask=None, score_mod=None, bias=None, q_segment_ids=None,
                      kv_segment_ids=None, scale=None, softcap=None, sinks=None,
                      return_lse=False, block_sizes=None, interpret=None):
    bs = as_block_sizes(block_sizes, block_sizes_cls, backend)
    a = check_attention_args(
        q, k, v, mask=mask, score_mod=score_mod, bias=bias, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, scale=scale, softcap=softcap, sinks=sinks)
    if not isinstance(return_lse, bool):
      raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    q, a = static_scale(q, a)   # a traced scale is folded into q
    out, lse = build(a, bs, default_interpret(interpret, native, interpret_params))(q, k, v)
    return (out, lse) if return_lse else out

  flash_attention.__doc__ = doc
  flash_attention.__module__ = module
  return flash_attention


def check_pages(q, k_pages, v_pages, page_table):
  """Validates a paged call; returns the row views' shapes ``(k_rows, v_rows)`` as
  ``jax.ShapeDtypeStruct`` ``[B, pages_per_seq * page_size, K, D]``."""
  for name, x in (("k_pages", k_pages), ("v_pages", v_pages)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must be a page pool [num_pages, K, page_size, D], got shape "
                       f"{getattr(x, 'shape', type(x).__name__)}")
  if k_pages.shape[:3] != v_pages.shape[:3]:
    raise ValueError(f"k_pages and v_pages must share [num_pages, K, page_size], got "
                     f"{k_pages.shape} and {v_pages.shape}")
  B = getattr(q, "shape", (None,))[0]
  if (getattr(page_table, "ndim", None) != 2 or page_table.shape[0] != B
      or not jnp.issubdtype(page_table.dtype, jnp.integer)):
    raise ValueError(f"page_table must be int [B={B}, pages_per_seq], got "
                     f"{getattr(page_table, 'shape', type(page_table).__name__)}")
  S = page_table.shape[1] * k_pages.shape[2]
  return tuple(jax.ShapeDtypeStruct((B, S, x.shape[1], x.shape[3]), x.dtype)
               for x in (k_pages, v_pages))


def gather_pages(pool, page_table):
  """Each row's pages in table order: ``pool [num_pages, K, page_size, D]``,
  ``page_table [B, pages_per_seq]`` -> ``[B, pages_per_seq * page_size, K, D]`` (the XLA
  gather the paged kernels avoid)."""
  pages = pool[page_table].transpose(0, 1, 3, 2, 4)   # [B, pages, page_size, K, D]
  B, n, ps, K, D = pages.shape
  return pages.reshape(B, n * ps, K, D)


def scatter_pages(pool, page_table, d):
  """The adjoint of :func:`gather_pages`: ``d [B, pages_per_seq * page_size, K, D]`` summed
  into a zero pool shaped like ``pool`` (pages shared by rows add up)."""
  B, n = page_table.shape
  d = d.reshape((B, n, pool.shape[2]) + d.shape[2:]).transpose(0, 1, 3, 2, 4)
  return jnp.zeros(pool.shape, d.dtype).at[page_table].add(d)


def make_paged_flash_attention(build, block_sizes_cls, backend: str, native, doc: str,
                               module: str, interpret_params=None, block_k="block_k"):
  """The public ``paged_flash_attention`` of a backend: ``flash_attention`` on K/V page
  pools read through a page table. ``build(a, block_sizes, interpret, page_table)(q,
  k_pages, v_pages)`` runs the kernel with key blocks of one page (``block_sizes`` gets
  ``block_k = page_size``; a page size the kernel cannot tile raises ValueError)."""

  def paged_flash_attention(q, k_pages, v_pages, page_table, *, mask=None, score_mod=None,
                            bias=None, q_segment_ids=None, kv_segment_ids=None, scale=None,
                            softcap=None, sinks=None, return_lse=False, block_sizes=None,
                            interpret=None):
    bs = as_block_sizes(block_sizes, block_sizes_cls, backend)
    k_rows, v_rows = check_pages(q, k_pages, v_pages, page_table)
    ps = k_pages.shape[2]
    if getattr(bs, block_k) not in (None, ps):
      raise ValueError(f"the paged kernel's key block is one page: BlockSizes.{block_k} must "
                       f"be None or page_size={ps}, got {getattr(bs, block_k)}")
    try:
      bs = dataclasses.replace(bs, **{block_k: ps})
    except ValueError as e:
      raise ValueError(f"page_size={ps} is not a key block of the {backend} kernel: {e}") from e
    a = check_attention_args(
        q, k_rows, v_rows, mask=mask, score_mod=score_mod, bias=bias,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, scale=scale,
        softcap=softcap, sinks=sinks)
    if not isinstance(return_lse, bool):
      raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    q, a = static_scale(q, a)
    run = build(a, bs, default_interpret(interpret, native, interpret_params),
                jnp.asarray(page_table).astype(jnp.int32))
    out, lse = run(q, k_pages, v_pages)
    return (out, lse) if return_lse else out

  paged_flash_attention.__doc__ = doc
  paged_flash_attention.__module__ = module
  return paged_flash_attention


def tile_math(a: AttentionArgs, plan: Plan, pred_tf, sm_tf, dtype) -> TileMath:
  """The per-tile math of a call (HIGHEST matmul precision for float32 inputs)."""
  prec = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
  return TileMath(a.scale, a.softcap, sm_tf, pred_tf, a.S, a.S % plan.bk != 0, prec)


def cfg_flags(a: AttentionArgs, plan: Plan, pred_tf, sm_tf, splits: int, width):
  """Kernel configuration fields shared by the backends: which side inputs exist, how
  many constant inputs, and the padded widths (``width(size)``) of the score_mod
  arrays that get gradients.  Split programs leave the sink to the merge."""
  sm_sizes = [] if sm_tf is None else [int(np.prod(s, dtype=np.int64)) for s in sm_tf.shapes]
  n_grad = 0 if sm_tf is None else sm_tf.n_explicit
  return dict(has_bias=a.bias is not None,
              bias_b=a.bias is not None and a.bias.shape[0] > 1,
              key_bias=key_bias(a),
              has_kiv=plan.key_iv is not None,
              kiv_b=plan.key_iv is not None and plan.key_iv[0].shape[0] > 1,
              has_dense=plan.dense is not None,
              dense_b=plan.dense is not None and plan.dense.shape[0] > 1,
              dense_cols=plan.dense_cols,
              has_seg=plan.seg is not None, has_sinks=a.sinks is not None and splits == 1,
              n_pred=0 if pred_tf is None else len(pred_tf.shapes),
              n_sm=len(sm_sizes), n_sm_grad=n_grad,
              sm_widths=tuple(width(max(sz, 1)) for sz in sm_sizes[:n_grad]))


def key_bias(a: AttentionArgs) -> bool:
  """True when the bias is the same for every query row (``[X, N|1, 1, S]``): the
  kernels then read it per key tile, as ``[X, N, S]``, and its gradient (the column sums
  of ``d s``) comes from the dk/dv kernel, so no ``[T, S]`` array is formed."""
  return a.bias is not None and a.bias.shape[2] == 1


def key_side(x, plan: Plan, place_key):
  """A per-key array ``[X, N|1, S]`` broadcast over the heads to ``[X, N, S]``, padded to
  ``Sp`` and laid out by ``place_key``."""
  x = jnp.broadcast_to(x, (x.shape[0], plan.a.N, x.shape[-1]))
  return place_key(jnp.pad(x, ((0, 0), (0, 0), (0, plan.Sp - x.shape[-1]))))


def side_inputs(plan: Plan, bias, seg, dense, place_bnts, place_qseg, place_kseg,
                place_sel=None, place_key=None, key_iv=None):
  """The bias (float32), dense mask (int32), segment ids and key intervals as kernel
  inputs.

  ``bias``/``dense`` are broadcast over the query heads to ``[X, N, T, S]`` and laid out
  by ``place_bnts``; the segment ids are padded to ``Tp``/``Sp`` with ``-1``/``-2`` (padded
  rows and keys never match) and laid out by ``place_qseg``/``place_kseg``.  A row
  selection (``plan.dense_cols > 0``) is ``[X, N, T, nk_sel]`` float32 0/1, laid out by
  ``place_sel``.  A per-key bias (:func:`key_bias`) and the key intervals ``key_iv =
  (start, end)`` (``plan.key_iv``, int32, padded keys get the empty interval) are
  ``[X, N, Sp]``, laid out by ``place_key``.
  """
  a = plan.a
  N, T, S = a.N, a.T, a.S
  side = []
  if bias is not None and key_bias(a):
    side.append(key_side(bias.astype(_F32)[:, :, 0, :], plan, place_key))
  elif bias is not None:
    side.append(place_bnts(jnp.broadcast_to(bias.astype(_F32), (bias.shape[0], N, T, S))))
  if dense is not None and plan.dense_cols:
    d = jnp.asarray(dense)
    side.append(place_sel(jnp.broadcast_to(d, (d.shape[0], N, T, d.shape[3])).astype(_F32)))
  elif dense is not None:
    d = jnp.asarray(dense)
    side.append(place_bnts(jnp.broadcast_to(d, (d.shape[0], N, T, S)).astype(jnp.int32)))
  if seg is not None:
    qs, ks = seg
    side.append(place_qseg(jnp.pad(qs, ((0, 0), (0, plan.Tp - T)), constant_values=-1)))
    side.append(place_kseg(jnp.pad(ks, ((0, 0), (0, plan.Sp - S)), constant_values=-2)))
  if key_iv is not None:            # padded keys: start = end = 0, seen by no row
    side += [key_side(x, plan, place_key) for x in key_iv]
  return side


def backward_rows(out, lse, dout, dlse, valid, dtype):
  """Row statistics of the backward kernels: ``delta = rowsum(dO * O) - dlse`` and the
  inputs with padded rows (``valid`` false) neutralised: ``lse = +inf`` there and on rows
  with no allowed key (so ``p = 0``), ``dO = 0``, ``delta = 0``.  ``lse``, ``dlse`` and
  ``valid`` have ``out``'s shape without its last axis, or with it of size 1.
  Returns ``(delta, lse_b, dout_b, delta_b)``."""
  kd = lse.ndim == out.ndim
  delta = jnp.sum(dout.astype(_F32) * out.astype(_F32), axis=-1, keepdims=kd) - dlse
  lse_b = jnp.where(valid & jnp.isfinite(lse), lse, jnp.inf)
  dout_b = jnp.where(valid if kd else valid[..., None], dout, 0).astype(dtype)
  return delta, lse_b, dout_b, jnp.where(valid, delta, 0.0)


def finish_grads(args, dq, dk, dv, db, lse_bnt, delta_bnt, dcs):
  """The cotangents of ``core(q, k, v, bias, sinks, seg, pred_c, sm_c)`` from the
  kernels' outputs: ``db`` (``[Bb, N or 1, T, S]`` f32) summed over the bias's other
  broadcast axes, the sink gradient from ``lse``/``delta`` (``[B, N, T]``), score_mod
  array gradients ``dcs`` (flat, padded) reshaped, zeros (float0) for integer inputs."""
  q, k, v, bias, sinks, seg, pred_c, sm_c = args
  dbias = None
  if bias is not None:
    axes = tuple(ax for ax, dim in enumerate(bias.shape) if dim == 1)
    if axes:
      db = db.sum(axis=axes, keepdims=True)
    dbias = db.astype(bias.dtype)
  dsinks = None if sinks is None else sink_grads(sinks, lse_bnt, delta_bnt)
  dseg = None if seg is None else tuple(float0_like(x) for x in seg)
  dpred = [float0_like(jnp.asarray(c)) for c in pred_c]
  dsm = []
  for j, c in enumerate(sm_c):
    c = jnp.asarray(c)
    if j < len(dcs) and jnp.issubdtype(c.dtype, jnp.inexact):
      dsm.append(dcs[j][:c.size].reshape(c.shape).astype(c.dtype))
    else:
      dsm.append(float0_like(c))
  # Inside shard_map: an input that does not vary over a mesh axis the kernel outputs vary
  # over (a replicated table, bias or k/v) gets the sum of every device's gradient, once.
  grads = [dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias, dsinks]
  grads = [sum_to_vma(g, x) for g, x in zip(grads, (q, k, v, bias, sinks))]
  dsm = [sum_to_vma(g, c) for g, c in zip(dsm, sm_c)]
  return (*grads, dseg, dpred, dsm)


def hoist_tracers(tree):
  """Splits the traced leaves off ``tree`` (schedules or masks built from traced inputs),
  so they can enter a ``custom_vjp`` as arguments instead of being closed over (a
  closed-over tracer escapes its trace when the rule runs elsewhere, e.g. under
  ``shard_map``).  Returns ``(traced, restore)`` with ``restore(traced) == tree``."""
  leaves, treedef = jax.tree.flatten(tree)
  idx = [i for i, x in enumerate(leaves) if isinstance(x, jax.core.Tracer)]

  def restore(traced):
    new = list(leaves)
    for i, x in zip(idx, traced):
      new[i] = x
    return treedef.unflatten(new)
  return [leaves[i] for i in idx], restore


def flash_core(forward, backward):
  """The differentiable core ``core(q, k, v, bias, sinks, seg, pred_c, sm_c, aux) ->
  (out, lse)`` (kernel layouts) of a backend; ``aux``: the traced schedule arrays
  (:func:`hoist_tracers`), not differentiated.

  ``forward(*args, aux) -> (out, lse)``; ``backward(args, aux, out, lse, dout, dlse) ->
  (dq, dk, dv, db, lse_bnt, delta_bnt, dcs)`` in the public layouts (see
  :func:`finish_grads`).
  """

  @jax.custom_vjp
  def core(*args):
    return forward(*args)

  def core_fwd(*args):
    out, lse = forward(*args)
    return (out, lse), (args, out, lse)

  def core_bwd(res, cts):
    args, out, lse = res
    *args, aux = args
    grads = finish_grads(args, *backward(args, aux, out, lse, *cts))
    return (*grads, [float0_like(x) for x in aux])

  core.defvjp(core_fwd, core_bwd)
  return core


def traced_consts(tf: Optional[TracedFn]) -> list:
  """The arrays a traced predicate/score_mod reads (explicit first, then literals)."""
  return [] if tf is None else list(tf.explicit) + list(tf.literals)


def flash_attention_reference(q, k, v, **kwargs):
  """The float32 dense oracle (:func:`attnjax.reference_attention`)."""
  return reference_attention(q, k, v, **kwargs)

