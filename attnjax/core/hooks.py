"""The dispatcher, reachable from below, and the one interception point of attention calls.

``ops`` that compose on top of :func:`attnjax.attention` (the mask-based spatial, routing
and pooling ops) call :func:`attention` here instead of importing :mod:`attnjax.dispatch`,
which sits above them (``docs/architecture.md``).  :mod:`attnjax.dispatch` registers
:func:`attnjax.attention` with :func:`register_attention` when it is imported, and
importing any ``attnjax.*`` module runs ``attnjax/__init__.py``, which imports it: the hook
is always filled before an op can run.

Interception (used by :mod:`attnjax.analysis`; off unless an observer is installed):
every softmax call of :func:`attnjax.attention` and every public linear-attention op
(decorated with ``attnjax.ops.linear._core.dispatched``) runs through :func:`intercepted`.
While :func:`observe` has installed an observer on this thread, the observer sees each
outermost call as an :class:`AttentionCall` (its normalised arguments and its output)
and may return a replacement output (head gates, patching).  Calls made while an
observer runs, or nested inside an intercepted call (a linear op calling another, the
block-by-block recursion), are not observed.  With no observer the cost is one
thread-local lookup per call.

Ops whose map the two paths above do not see (plain-``jnp`` recipes such as additive,
Sinkhorn and talking-heads attention, gathered or routed ops, gated recurrences, pooling
weights) call :func:`intercepted` themselves, at their exit, with ``run=lambda: out`` and
``probs=``: a thunk returning the weights ``P [B, N, T, S]`` the op applies to its values
(``out = P @ v`` per head), evaluated only by an observer that records maps (so never
while training: with no observer the thunk is dropped, and under ``jit`` whatever it
closes over is dead code).  An op that itself calls an intercepted op (the MoBA gather
path, Mamba-2's SSD) checks :func:`observing` and re-enters itself through
:func:`intercepted`, so that its inner calls are nested and the observer sees one call.
``dims=(B, N, T, S)`` describes a map whose call has no ``[B, T, N, H]`` queries (MIL
pooling, FEAT's channel attention); head gates and patching do not apply to such calls.
``extras=``: a thunk returning ``{suffix: array}``, the parts of a mechanism that its
``[B, N, T, S]`` map cannot express (FEAT's per-channel WKV weights, L^2ViT's local
concentration, CARE's gates and convolution, the contribution of a recurrent ``state``);
evaluated, like ``probs``, only by a recorder asked for them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Callable, Optional

__all__ = ["attention", "register_attention", "AttentionCall", "observe", "intercepted",
           "observing", "register_block_sparse", "block_sparse", "block_sparse_available"]

_ATTENTION: list[Callable] = []
_BLOCK_SPARSE: list[tuple] = []


def register_attention(fn: Callable) -> None:
  """Registers the dispatcher's ``attention(q, k, v, **kwargs)`` (called by
  :mod:`attnjax.dispatch`; a later registration replaces an earlier one)."""
  if not callable(fn):
    raise TypeError(f"fn must be callable, got {type(fn).__name__}")
  _ATTENTION[:] = [fn]


def attention(q, k, v, **kwargs):
  """:func:`attnjax.attention` (the registered dispatcher) with the same arguments."""
  if not _ATTENTION:  # unreachable through ``import attnjax``; kept as a clear error
    raise RuntimeError("no attention dispatcher is registered: import attnjax first")
  return _ATTENTION[0](q, k, v, **kwargs)


def register_block_sparse(fn: Callable, available: Callable[[], bool],
                          parts: Optional[Callable] = None) -> None:
  """Registers the CPU kernel's block-sparse entry (called by :mod:`attnjax.dispatch`):
  ``fn(q, k, v, qlist, qcode, klist, kcode, pats, *, block_q, block_k, scale) -> (out,
  lse)`` with lists that may be computed in the graph (see
  :class:`attnjax.cpu.flash.BlockSparseSchedule`), ``available()``, whether it can
  run in this process, and ``parts()``, the kernel's forward and backward as two plain
  functions (:func:`attnjax.cpu.flash.block_sparse_parts`).  Ops (which may not import
  the kernels) reach them through :func:`block_sparse` and :func:`block_sparse_parts`."""
  if not callable(fn) or not callable(available) or (parts is not None and
                                                      not callable(parts)):
    raise TypeError("fn, available and parts must be callable")
  _BLOCK_SPARSE[:] = [(fn, available, parts)]


def block_sparse_parts():
  """``(fwd, bwd)`` of the registered block-sparse kernel
  (:func:`attnjax.cpu.flash.block_sparse_parts`)."""
  if not _BLOCK_SPARSE or _BLOCK_SPARSE[0][2] is None:
    raise RuntimeError("no block-sparse kernel parts are registered: import attnjax first")
  return _BLOCK_SPARSE[0][2]()


def block_sparse_available() -> bool:
  """Whether a block-sparse CPU kernel is registered and can run in this process."""
  return bool(_BLOCK_SPARSE) and bool(_BLOCK_SPARSE[0][1]())


def block_sparse(q, k, v, qlist, qcode, klist, kcode, pats, *, block_q: int, block_k: int,
                 scale: float, q_rows=None, k_rows=None):
  """The registered block-sparse CPU kernel (:func:`register_block_sparse`).  ``q_rows``,
  ``k_rows``: optional static NumPy row maps (the lists are in a permuted token order
  whose query ``t`` is row ``q_rows[t]`` of ``q``, key ``s`` row ``k_rows[s]`` of
  ``k``, ``v``; outputs come back in the original row order)."""
  if not _BLOCK_SPARSE:
    raise RuntimeError("no block-sparse kernel is registered: import attnjax first")
  return _BLOCK_SPARSE[0][0](q, k, v, qlist, qcode, klist, kcode, pats, block_q=block_q,
                             block_k=block_k, scale=scale, q_rows=q_rows, k_rows=k_rows)


@dataclasses.dataclass(frozen=True)
class AttentionCall:
  """One observed attention call.

  ``kind``: ``'softmax'`` (``args`` is the normalised :class:`attnjax.core.args.AttentionArgs`,
  or ``probs`` is given), ``'linear'`` (``fn`` is the public linear op, ``kwargs`` its
  keyword arguments as passed, or ``probs`` is given: implied weights) or another name an
  op reports with ``probs`` (``'sinkhorn'``, ``'talking_heads'``, ``'pooling'``).
  ``q [B, T, N, H]``, ``k [B, S, K, H]``, ``v [B, S, K, Hv]`` (or None with ``dims``);
  ``out`` the call's result (a tuple where the call returns one: ``(out, lse)`` or
  ``(out, state)``).  ``probs``: None or a thunk returning the call's weights
  ``[B, N, T, S]`` (recomputed on demand); ``dims``: None or ``(B, N, T, S)`` for a call
  whose output is not ``[B, T, N, Hv]``; ``extras``: None or a thunk returning
  ``{suffix: array}`` (see the module docstring).
  """
  kind: str
  q: Any
  k: Any
  v: Any
  out: Any
  args: Any = None
  fn: Optional[Callable] = None
  kwargs: Optional[dict] = None
  probs: Optional[Callable[[], Any]] = None
  dims: Optional[tuple] = None
  extras: Optional[Callable[[], dict]] = None


_LOCAL = threading.local()


def _observers() -> list:
  obs = getattr(_LOCAL, "observers", None)
  if obs is None:
    obs = _LOCAL.observers = []
    _LOCAL.depth = 0
  return obs


@contextlib.contextmanager
def observe(observer: Callable[[AttentionCall], Any]):
  """Installs ``observer(call) -> None | replacement output`` on this thread for the
  ``with`` block (observers nest; the innermost sees a call last)."""
  if not callable(observer):
    raise TypeError(f"observer must be callable, got {type(observer).__name__}")
  obs = _observers()
  obs.append(observer)
  try:
    yield observer
  finally:
    obs.remove(observer)


def observing() -> bool:
  """Whether a call made now would be shown to an observer (one is installed on this
  thread and no intercepted call is running)."""
  return bool(_observers()) and not _LOCAL.depth


def intercepted(kind: str, run: Callable[[], Any], q, k, v, *, args=None, fn=None,
                kwargs=None, probs=None, dims=None, extras=None):
  """``run()``, shown to the installed observers (see the module docstring)."""
  obs = _observers()
  if not obs or _LOCAL.depth:
    return run()
  if probs is not None and not callable(probs):
    raise TypeError(f"probs must be None or a thunk returning [B, N, T, S], got "
                    f"{type(probs).__name__}")
  if extras is not None and not callable(extras):
    raise TypeError(f"extras must be None or a thunk returning {{suffix: array}}, got "
                    f"{type(extras).__name__}")
  _LOCAL.depth += 1
  try:
    out = run()
    for o in list(obs):
      new = o(AttentionCall(kind, q, k, v, out, args=args, fn=fn, kwargs=kwargs, probs=probs,
                            dims=None if dims is None else tuple(int(d) for d in dims),
                            extras=extras))
      if new is not None:
        out = new
  finally:
    _LOCAL.depth -= 1
  return out
