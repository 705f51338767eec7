"""The refusal an implementation raises when it cannot serve a call.

:class:`Unsupported` is raised only by attnjax code (an implementation's own argument
planning: a mask the CPU kernel has no band for, a score_mod the Pallas tile evaluator
cannot run, a kernel that is not built on this machine, ...).  The dispatcher
(:func:`attnjax.attention`, the linear ops' ``implementation='auto'``) falls through to
the next candidate on this exception and on an implementation's ``supports()`` refusal
only; any other exception -- including a bare ``NotImplementedError`` raised inside JAX
-- propagates.  It subclasses ``NotImplementedError`` so code written against the
earlier contract (``except NotImplementedError``) keeps working.
"""

from __future__ import annotations

__all__ = ["Unsupported"]


class Unsupported(NotImplementedError):
  """An attnjax implementation cannot serve this call; the message says why."""
