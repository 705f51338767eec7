"""The dispatcher, reachable from below: ``ops`` that compose on top of
:func:`attnjax.attention` (the mask-based spatial, routing and pooling ops) call
:func:`attention` here instead of importing :mod:`attnjax.dispatch`, which sits above them
(``docs/architecture.md``).

:mod:`attnjax.dispatch` registers :func:`attnjax.attention` with :func:`register_attention`
when it is imported, and importing any ``attnjax.*`` module runs ``attnjax/__init__.py``,
which imports it: the hook is always filled before an op can run.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["attention", "register_attention"]

_ATTENTION: list[Callable] = []


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
