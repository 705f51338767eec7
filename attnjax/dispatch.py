"""``attnjax.attention``: one call, several implementations, tried in order.

Implementations (``implementation=``):

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

An implementation that cannot serve a call raises ``NotImplementedError`` at trace
time and the next candidate is tried; if none can, the error lists why each failed.
"""

from __future__ import annotations

import difflib
from typing import Callable, Sequence, Union

import jax

from attnjax.core import args as args_lib
from attnjax.core import softmax as softmax_lib
from attnjax.ops import chunked as chunked_lib
from attnjax.ops import dense as dense_lib
from attnjax.ops import linear as linear_ops

__all__ = ["attention", "IMPLEMENTATIONS", "auto_candidates"]

IMPLEMENTATIONS = ("reference", "xla", "xla_chunked", "cpu_flash", "pallas", "pallas_tpu",
                   "pallas_gpu")

# On CPU, dense logits beat the cpu_flash kernel only for tiny calls, where its fixed
# costs (threads, packing) dominate; measured in docs/core.md ("'auto' on CPU").
_CPU_DENSE_MAX_TS = 16 * 32


def _reference(q, k, v, a, *, return_lse, block_sizes):
  out, lse = softmax_lib.dense_attention(q, k, v, a, upcast=True)
  return (out, lse) if return_lse else out


def _cpu_flash(q, k, v, a, *, return_lse, block_sizes):
  if jax.default_backend() != "cpu":
    raise NotImplementedError(f"'cpu_flash' runs on the CPU backend, not "
                              f"{jax.default_backend()!r}")
  from attnjax.cpu import flash
  return flash.cpu_flash_attention(q, k, v, a, return_lse=return_lse,
                                   block_sizes=block_sizes)


def _pallas(backend: str) -> Callable:
  def run(q, k, v, a, *, return_lse, block_sizes):
    if backend == "native":
      platform = jax.default_backend()
      if platform == "tpu":
        target = "tpu"
      elif platform in ("gpu", "cuda", "rocm"):
        target = "gpu"
      else:
        raise NotImplementedError(
            f"'pallas' has no kernel for the {platform!r} backend; ask for 'pallas_tpu' or "
            f"'pallas_gpu' explicitly to run a kernel in interpret mode")
    else:
      target = backend
    try:
      if target == "tpu":
        from attnjax.kernels.tpu import flash_attention
      else:
        from attnjax.kernels.gpu import flash_attention
    except ImportError as e:  # kernels not available in this build
      raise NotImplementedError(f"Pallas {target} kernel unavailable: {e}") from e
    native = {"tpu": ("tpu",), "gpu": ("gpu", "cuda", "rocm")}[target]
    interpret = jax.default_backend() not in native
    return flash_attention(q, k, v, **a.kwargs(), return_lse=return_lse,
                           block_sizes=block_sizes, interpret=interpret)
  return run


_IMPLS = {
    "reference": _reference,
    "xla": dense_lib.xla_attention,
    "xla_chunked": chunked_lib.chunked_attention,
    "cpu_flash": _cpu_flash,
    "pallas": _pallas("native"),
    "pallas_tpu": _pallas("tpu"),
    "pallas_gpu": _pallas("gpu"),
}


def _chunk_kernel(backend: str) -> Callable:
  """The Pallas linear-attention chunk kernel of ``backend`` (``'tpu'``/``'gpu'``),
  imported on first call: ``(q, k, v, log_decay_N, *, chunk_size) -> o``."""
  def run(q, k, v, log_decay, *, chunk_size):
    if backend == "tpu":
      from attnjax.kernels.tpu import linear as kmod
    else:
      from attnjax.kernels.gpu import linear as kmod
    return kmod.lightning_attention(q, k, v, log_decay, chunk_size=chunk_size)
  return run


# The linear-attention ops reach their chunk kernels through this table (ops never imports
# kernels): ``attnjax.ops.linear.linear_attention(..., implementation='pallas_tpu')``.
for _impl, _backend in (("pallas_tpu", "tpu"), ("pallas_gpu", "gpu")):
  linear_ops.register_chunk_kernel(_impl, _chunk_kernel(_backend))


def auto_candidates(a: args_lib.AttentionArgs, backend: str | None = None):
  """The implementations ``'auto'`` tries, in order, for this call on ``backend``."""
  backend = backend or jax.default_backend()
  if backend == "tpu":
    return ("pallas_tpu", "xla_chunked", "xla")
  if backend in ("gpu", "cuda", "rocm"):
    return ("pallas_gpu", "xla_chunked", "xla")
  if a.T * a.S <= _CPU_DENSE_MAX_TS:
    return ("xla", "cpu_flash", "xla_chunked")
  return ("cpu_flash", "xla_chunked", "xla")


def _candidates(implementation, a):
  if implementation is None or implementation == "auto":
    return auto_candidates(a)
  names = (implementation,) if isinstance(implementation, str) else implementation
  try:
    names = tuple(names)
  except TypeError:
    raise TypeError(f"implementation must be None, a name or a sequence of names from "
                    f"{IMPLEMENTATIONS}, got {implementation!r}") from None
  if not names:
    raise ValueError("implementation must not be an empty sequence")
  out = []
  for n in names:
    if not isinstance(n, str):
      raise TypeError(f"implementation names must be strings, got {n!r}")
    if n == "auto":
      out.extend(auto_candidates(a))
      continue
    if n not in _IMPLS:
      close = difflib.get_close_matches(n, IMPLEMENTATIONS, n=3, cutoff=0.4)
      hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
      raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or 'auto', got "
                       f"{n!r}{hint}")
    out.append(n)
  return tuple(out)


def attention(q, k, v, *, mask=None, score_mod=None, bias=None, q_segment_ids=None,
              kv_segment_ids=None, scale=None, softcap=None, sinks=None, return_lse=False,
              implementation: Union[None, str, Sequence[str]] = None, block_sizes=None):
  """Softmax attention with masks, score mods, GQA, packing, softcap and sinks.

  ``o_i = sum_j p_ij v_j``, ``p_ij = exp(s_ij) / (sum_{j allowed} exp(s_ij) + exp(sink_h))``,
  ``s_ij = softcap(score_mod(scale * q_i . k_j + bias_ij))`` in float32; ``allowed``
  is ``mask & (q_segment_ids_i == kv_segment_ids_j)``.  Paper: "Attention Is All You
  Need"; kernels after "FlashAttention" (Dao et al.).

  Args:
    q: ``[B, T, N, H]`` queries.
    k: ``[B, S, K, H]`` keys; ``N`` must be a multiple of ``K`` (GQA/MQA).
    v: ``[B, S, K, Hv]`` values.
    mask: ``None``, a boolean array broadcastable to ``[B, N, T, S]`` (True = attend)
      or an :class:`attnjax.masks.Mask`.
    score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` on float32 logits
      (see :mod:`attnjax.score_mods`); arrays it closes over get gradients.
    bias: additive float bias broadcastable to ``[B, N, T, S]`` (each dim 1 or full);
      differentiable.
    q_segment_ids: int ``[B, T]``; kv_segment_ids: int ``[B, S]`` (defaults to
      ``q_segment_ids`` when ``T == S``).  Tokens attend only within equal ids.
    scale: logit scale, default ``1 / sqrt(H)``.
    softcap: if set, logits become ``softcap * tanh(s / softcap)``.
    sinks: float ``[N]``, one learnable logit per query head that joins the softmax
      denominator only (attention sinks / "off-by-one" softmax).
    return_lse: also return ``lse [B, N, T]`` float32, the log of the softmax
      denominator (including the sink); ``-inf`` for rows with no allowed key.
    implementation: a name from :data:`IMPLEMENTATIONS`, ``'auto'``/``None``, or a
      sequence tried in order.
    block_sizes: tile sizes for the chosen implementation
      (:class:`attnjax.ops.chunked.ChunkedBlockSizes` or a kernel's ``BlockSizes``).

  Returns:
    ``[B, T, N, Hv]`` in ``q.dtype`` (and ``lse`` if ``return_lse``).  Rows with no
    allowed key are 0, with zero gradients.
  """
  a = args_lib.check_attention_args(
      q, k, v, mask=mask, score_mod=score_mod, bias=bias, q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids, scale=scale, softcap=softcap, sinks=sinks)
  if not isinstance(return_lse, bool):
    raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
  reasons = []
  for name in _candidates(implementation, a):
    try:
      return _IMPLS[name](q, k, v, a, return_lse=return_lse, block_sizes=block_sizes)
    except NotImplementedError as e:
      reasons.append(f"{name}: {e}")
  raise NotImplementedError("no attention implementation could serve this call:\n  " +
                            "\n  ".join(reasons))
