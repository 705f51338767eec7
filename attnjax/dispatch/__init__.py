"""``attnjax.attention``: one call, several implementations, tried in order.

Implementations (``implementation=``), served from one registry
(:mod:`attnjax.dispatch.registry`, shared with the linear family of
:mod:`attnjax.ops.linear`):

* ``'reference'`` — :func:`attnjax.reference_attention`, float32, dense.
* ``'xla'`` — dense logits, input dtype with float32 accumulation (short sequences).
* ``'xla_chunked'`` — blockwise online softmax, ``O(T + S)`` memory, skips empty tiles.
* ``'cpu_flash'`` — a multi-threaded C++ flash-attention kernel (XLA FFI custom call,
  compiled for the machine on first use) for band masks on the CPU backend.
* ``'pallas_tpu'`` / ``'pallas_gpu'`` — Pallas kernels (Mosaic / Triton); on a CPU
  backend an explicit request runs the kernel in interpret mode (slow, for tests).
* ``'pallas'`` — the Pallas kernel of the current backend (TPU or GPU).
* ``None`` / ``'auto'`` — the best for ``jax.default_backend()``: on CPU the
  ``'cpu_flash'`` kernel when it can serve the call (dense ``'xla'`` first for short
  sequences), else the faster XLA path for the shape; on TPU/GPU the Pallas kernel,
  falling back to XLA.

Each implementation's ``supports(args, config)`` is checked at trace time before it
runs; a refusal, or :class:`attnjax.core.Unsupported` raised by its own planning, moves
on to the next candidate (any other exception propagates).  If none can serve, the
error lists why each failed.  ``block_sizes`` is routed per implementation (a typed
config goes to the implementation whose ``config_cls`` it is; a dict is keyed by name).
The chosen implementation runs under ``jax.named_scope(f"attnjax/{name}")`` and is
logged on the ``'attnjax'`` logger (DEBUG, once per call signature).
"""

from __future__ import annotations

from typing import Sequence, Union

import jax

from attnjax import masks as masks_lib
from attnjax.core import args as args_lib
from attnjax.core import hooks as _hooks
from attnjax.core.errors import Unsupported
from attnjax.dispatch import registry
from attnjax.dispatch.registry import FAMILIES, Implementation, auto_candidates, implementations
from attnjax.ops import linear as linear_ops
from attnjax.ops.linear import _core as _linear_core

__all__ = ["attention", "paged_attention", "IMPLEMENTATIONS", "LINEAR_IMPLEMENTATIONS",
           "auto_candidates", "implementations", "Implementation", "FAMILIES", "Unsupported",
           "registry"]

#: The softmax implementation names (compatibility; see :func:`implementations`).
IMPLEMENTATIONS = registry.IMPLEMENTATIONS
#: The linear-family implementation names.
LINEAR_IMPLEMENTATIONS = registry.names("linear")

# The linear-attention ops reach the registry through two hooks (ops never imports
# dispatch or kernels): the chunk kernels that serve 'pallas_tpu'/'pallas_gpu', and the
# selector that resolves implementation=None/'auto'/names against the supports checks.
for _impl in implementations("linear"):
  if _impl.run is not None:
    linear_ops.register_chunk_kernel(_impl.name, _impl.run)
linear_ops.register_selector(registry.select_linear)


def _delta_kernel(target):
  def run(q, k, v, beta, log_alpha, state, *, scale, chunk_size):
    if target == "tpu":
      from attnjax.kernels.tpu import linear_gated as kmod
    else:
      from attnjax.kernels.gpu import linear_gated as kmod
    return kmod.gated_delta_rule(q, k, v, beta, log_alpha, state, scale=scale,
                                 chunk_size=chunk_size)
  return run


def _gla_kernel(target):
  def run(q, k, v, log_alpha, state, *, scale, chunk_size):
    if target == "tpu":
      from attnjax.kernels.tpu import linear_gated as kmod
    else:
      from attnjax.kernels.gpu import linear_gated as kmod
    return kmod.gated_linear_attention(q, k, v, log_alpha, state, scale=scale,
                                       chunk_size=chunk_size)
  return run


# The (gated) delta-rule and GLA chunk kernels (imported on first call).
for _t in ("tpu", "gpu"):
  _linear_core.register_delta_kernel(f"pallas_{_t}", _delta_kernel(_t))
  _linear_core.register_gla_kernel(f"pallas_{_t}", _gla_kernel(_t))

def attention(q, k, v, *, mask=None, score_mod=None, bias=None, q_segment_ids=None,
              kv_segment_ids=None, scale=None, softcap=None, sinks=None, return_lse=False,
              implementation: Union[None, str, Sequence[str]] = None, block_sizes=None,
              q_lengths=None, kv_lengths=None):
  """Softmax attention with masks, score mods, GQA, packing, softcap and sinks.

  ``o_i = sum_j p_ij v_j``, ``p_ij = exp(s_ij) / (sum_{j allowed} exp(s_ij) + exp(sink_h))``,
  ``s_ij = softcap(score_mod(scale * q_i . k_j + bias_ij))`` in float32; ``allowed``
  is ``mask & (q_segment_ids_i == kv_segment_ids_j)``.  Paper: "Attention Is All You
  Need"; kernels after "FlashAttention" (Dao et al.).

  Args:
    q: ``[B, T, N, H]`` queries.
    k: ``[B, S, K, H]`` keys; ``N`` must be a multiple of ``K`` (GQA/MQA).
    v: ``[B, S, K, Hv]`` values.
    mask: ``None``, a boolean array broadcastable to ``[B, N, T, S]`` (True = attend),
      an :class:`attnjax.masks.Mask`, or a predicate ``fn(b, h, q_idx, kv_idx) -> bool``
      (wrapped with :func:`attnjax.masks.from_fn`).
    score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` on float32 logits
      (see :mod:`attnjax.score_mods`); arrays it closes over get gradients.
    bias: additive float bias broadcastable to ``[B, N, T, S]`` (each dim 1 or full);
      differentiable.
    q_segment_ids: int ``[B, T]``; kv_segment_ids: int ``[B, S]`` (defaults to
      ``q_segment_ids`` when ``T == S``).  Tokens attend only within equal ids.
    scale: logit scale, default ``1 / sqrt(H)``: a Python float, or a float JAX scalar
      (traced / learnable; gradients flow to it).
    softcap: if set, logits become ``softcap * tanh(s / softcap)``.
    sinks: float ``[N]``, one learnable logit per query head that joins the softmax
      denominator only (attention sinks / "off-by-one" softmax).
    return_lse: also return ``lse [B, N, T]`` float32, the log of the softmax
      denominator (including the sink); ``-inf`` for rows with no allowed key.
    implementation: a name from :data:`IMPLEMENTATIONS`, ``'auto'``/``None``, or a
      sequence tried in order.
    block_sizes: ``None`` (each implementation's defaults); a typed config --
      :class:`attnjax.ChunkedBlockSizes` (``'xla_chunked'``),
      :class:`attnjax.CpuFlashBlockSizes` (``'cpu_flash'``), ``attnjax.kernels.tpu``/``gpu``
      ``BlockSizes`` (the Pallas kernels) -- routed to the implementation it belongs to
      (the other candidates use their defaults; an explicit single implementation of
      another type raises TypeError); or a dict ``{implementation name: config}``.
    q_lengths, kv_lengths: int ``[B]``, ragged batches (as ``jax.nn.dot_product_attention``'s
      ``query_seq_lengths`` / ``key_value_seq_lengths``): only the first ``q_lengths[b]``
      queries and ``kv_lengths[b]`` keys of sequence ``b`` are real; padded rows are 0
      with zero gradients.  Served as :func:`attnjax.masks.lengths` ANDed with ``mask``
      (an in-graph tile table: padded tiles are skipped, no ``[T, S]`` array).

  Returns:
    ``[B, T, N, Hv]`` in ``q.dtype`` (and ``lse`` if ``return_lse``).  Rows with no
    allowed key are 0, with zero gradients.
  """
  if q_lengths is not None or kv_lengths is not None:
    mask = _with_lengths(q, k, mask, q_lengths, kv_lengths)
  a = args_lib.check_attention_args(
      q, k, v, mask=mask, score_mod=score_mod, bias=bias, q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids, scale=scale, softcap=softcap, sinks=sinks)
  if not isinstance(return_lse, bool):
    raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
  return _hooks.intercepted(  # a no-op unless attnjax.analysis observes (core/hooks.py)
      "softmax", lambda: registry.run_softmax(q, k, v, a, implementation=implementation,
                                              return_lse=return_lse, block_sizes=block_sizes),
      q, k, v, args=a)


def _paged_kernel(implementation):
  """``(kernel module, target)`` of the Pallas kernel that reads pages itself for this
  ``implementation`` request (a Pallas name, or 'pallas' / None / 'auto' on a TPU or GPU
  backend; the first name of a sequence), or ``(None, None)``."""
  names = (implementation,) if implementation is None or isinstance(implementation, str) \
      else tuple(implementation)
  first = names[0] if names else None
  target = None
  if first in ("pallas_tpu", "pallas_gpu"):
    target = first.split("_")[1]
  elif first in (None, "auto", "pallas"):
    target = registry._native_target()  # pylint: disable=protected-access
  if target is None:
    return None, None
  kmod = registry._flash_module(target)  # pylint: disable=protected-access
  return (kmod, target) if hasattr(kmod, "paged_flash_attention") else (None, None)


def paged_attention(q, k_pages, v_pages, page_table, *, mask=None, score_mod=None, bias=None,
                    q_segment_ids=None, kv_segment_ids=None, scale=None, softcap=None,
                    sinks=None, implementation=None, block_sizes=None, q_lengths=None,
                    kv_lengths=None):
  """:func:`attention` on K/V page pools (a paged KV cache).

  ``k_pages [num_pages, K, page_size, H]``, ``v_pages [num_pages, K, page_size, Hv]`` and
  ``page_table`` int ``[B, pages_per_seq]``: row ``b``'s key ``s`` is
  ``k_pages[page_table[b, s // page_size], :, s % page_size]``.  When ``implementation``
  asks for a Pallas kernel (``'pallas_tpu'`` / ``'pallas_gpu'``, or 'pallas' / None /
  'auto' on a TPU / GPU backend; the first of a sequence) and the page is one of its key
  blocks (TPU: ``page_size`` a multiple of 128; GPU: a power of two >= 16, and power-of-two
  head dims) the kernel reads K/V through the page table
  (``attnjax.kernels.{tpu,gpu}.paged_flash_attention``); otherwise the
  pages are gathered into a contiguous ``[B, pages_per_seq * page_size, K, D]`` view in XLA
  and :func:`attention` runs on it.  Other arguments as in :func:`attention` (no
  ``return_lse``).  Both paths give the same result (tested)."""
  from attnjax.kernels import flash_wrapper  # pylint: disable=import-outside-toplevel
  k_rows, _ = flash_wrapper.check_pages(q, k_pages, v_pages, page_table)
  kw = dict(mask=mask, score_mod=score_mod, bias=bias, q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids, scale=scale, softcap=softcap, sinks=sinks)
  kmod, target = _paged_kernel(implementation)
  if kmod is not None:
    bs = block_sizes.get(f"pallas_{target}") if isinstance(block_sizes, dict) else block_sizes
    bs = bs if isinstance(bs, kmod.BlockSizes) else None
    try:       # a page must be a key block; the GPU kernel does not pad head dims
      ok = bs is None or bs.block_k in (None, k_pages.shape[2])
      kmod.BlockSizes(block_k=k_pages.shape[2])
    except ValueError:
      ok = False
    if target == "gpu":
      ok = ok and all(d & (d - 1) == 0 for d in (k_pages.shape[3], v_pages.shape[3]))
    if ok:
      if q_lengths is not None or kv_lengths is not None:
        kw["mask"] = _with_lengths(q, k_rows, mask, q_lengths, kv_lengths)
      native = ("tpu",) if target == "tpu" else registry._GPU  # pylint: disable=protected-access
      with jax.named_scope("attnjax/paged"):
        return kmod.paged_flash_attention(q, k_pages, v_pages, page_table, **kw,
                                          block_sizes=bs,
                                          interpret=jax.default_backend() not in native)
  return attention(q, flash_wrapper.gather_pages(k_pages, page_table),
                   flash_wrapper.gather_pages(v_pages, page_table), **kw,
                   implementation=implementation, block_sizes=block_sizes,
                   q_lengths=q_lengths, kv_lengths=kv_lengths)


def _with_lengths(q, k, mask, q_lengths, kv_lengths):
  """``mask & masks.lengths(q_lengths, kv_lengths)`` after checking the lengths' shape."""
  B = getattr(q, "shape", (None,))[0]
  for name, x in (("q_lengths", q_lengths), ("kv_lengths", kv_lengths)):
    if x is None:
      continue
    if not hasattr(x, "shape") or tuple(x.shape) != (B,):
      raise ValueError(f"{name} must be an int array of shape [B] = [{B}], got "
                       f"{getattr(x, 'shape', type(x).__name__)}")
  lm = masks_lib.lengths(q_lengths, kv_lengths)
  if mask is None:
    return lm
  if callable(mask) and not isinstance(mask, masks_lib.Mask):
    mask = masks_lib.from_fn(mask)
  return masks_lib.as_mask(mask) & lm


# Ops that compose on top of attention (spatial, routing, pooling) reach it through this
# hook (``attnjax.core.hooks``), as the linear ops reach their kernels above.
_hooks.register_attention(attention)


def _cpu_block_sparse(q, k, v, qlist, qcode, klist, kcode, pats, *, block_q, block_k, scale,
                      q_rows=None, k_rows=None):
  from attnjax.cpu import flash
  sched = flash.BlockSparseSchedule(qlist, qcode, klist, kcode, pats, block_q, block_k,
                                    float("nan"))
  return flash.cpu_flash_block_sparse(q, k, v, sched, scale=scale, q_rows=q_rows,
                                      k_rows=k_rows)


def _cpu_block_sparse_available() -> bool:
  from attnjax.cpu import flash
  return flash.available()


def _cpu_block_sparse_parts():
  from attnjax.cpu import flash
  return flash.block_sparse_parts()


_hooks.register_block_sparse(_cpu_block_sparse, _cpu_block_sparse_available,
                             _cpu_block_sparse_parts)
