"""Which context-parallel attention the softmax layers use, and the dispatch to it.

When the mesh of ``attnjax.parallel.activation_sharding`` (the trainer's) has a
``context`` axis of size > 1, every softmax attention layer (``attnjax.layers`` and their
Linen twins, self-attention without a KV cache) calls ``context_attention`` instead of
``attnjax.attention``: no model code changes. The implementation comes from the
``context_impl`` context (the trainer sets it from ``config.parallel.context_impl``):

  'ring'       ``ring_attention``: zigzag ring, custom VJP (memory independent of P).
  'allgather'  ``allgather_attention``: all-gather K/V, local queries at global positions.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

from attnjax.parallel import rules as _rules

CONTEXT_IMPLS = ('ring', 'allgather')
_IMPL: contextvars.ContextVar = contextvars.ContextVar('attnjax_context_impl', default='ring')


def check_context_impl(impl: Any, *, what: str = 'config.parallel.context_impl') -> str:
  """Returns ``impl`` if it is one of ``CONTEXT_IMPLS``; a ValueError naming ``what``."""
  if impl not in CONTEXT_IMPLS:
    raise ValueError(f'{what} must be one of {CONTEXT_IMPLS}; got {impl!r}.')
  return impl


@contextlib.contextmanager
def context_impl(impl: str):
  """Context in which context-parallel softmax layers use ``impl`` ('ring' | 'allgather')."""
  token = _IMPL.set(check_context_impl(impl, what='context_impl'))
  try:
    yield
  finally:
    _IMPL.reset(token)


def current_context_impl() -> str:
  """The implementation set by ``context_impl`` (default 'ring')."""
  return _IMPL.get()


def context_size(mesh=None) -> int:
  """Size of the ``context`` axis of ``mesh`` (default: the trainer's mesh), 1 if none."""
  mesh = mesh if mesh is not None else _rules.current_mesh()
  if mesh is None:
    return 1
  return int(dict(mesh.shape).get('context', 1))


def context_attention(q, k, v, *, mask=None, score_mod=None, q_segment_ids=None,
                      kv_segment_ids=None, scale=None, softcap=None, sinks=None, mesh=None,
                      impl: str | None = None):
  """Self-attention with the sequence split over the mesh's ``context`` axis.

  Shapes as ``attnjax.attention`` (q [B,T,N,H], k [B,T,K,H], v [B,T,K,Hv]); ``impl``
  defaults to ``current_context_impl()``. Masks must be ``Mask`` objects / predicates
  (a boolean array is a TypeError: it cannot be split).
  """
  from attnjax.parallel.allgather import allgather_attention  # pylint: disable=import-outside-toplevel
  from attnjax.parallel.ring import ring_attention  # pylint: disable=import-outside-toplevel
  impl = check_context_impl(impl if impl is not None else current_context_impl(),
                            what='impl')
  kw = dict(mesh=mesh, mask=mask, score_mod=score_mod, q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids, scale=scale, softcap=softcap, sinks=sinks)
  if impl == 'ring':
    return ring_attention(q, k, v, **kw)
  return allgather_attention(q, k, v, **kw)
