"""``shard_map`` helpers: which manual mesh axes a value varies over, and the casts and
reductions custom rules need so their outputs type-check under ``check_vma=True``.

Outside ``shard_map`` every function here is the identity.
"""

from __future__ import annotations

import jax

__all__ = ["varying_axes", "sum_to_vma", "vary_like"]


def varying_axes(x) -> frozenset:
  """The manual mesh axes (``shard_map``) ``x`` varies over; empty outside ``shard_map``."""
  mat = getattr(jax.typeof(x), "mat", None)
  return frozenset(getattr(mat, "varying", ()))


def sum_to_vma(grads, primals):
  """Inside ``shard_map``: sums each gradient over the mesh axes it varies over but its
  primal does not (the transpose of the implicit broadcast of a replicated input), as
  autodiff does for built-in ops.  Outside ``shard_map`` this is the identity."""
  def one(g, p):
    if g is None or not isinstance(g, (jax.Array, jax.core.Tracer)):
      return g
    extra = tuple(sorted(varying_axes(g) - varying_axes(p)))
    return jax.lax.psum(g, extra) if extra else g
  return jax.tree.map(one, grads, primals, is_leaf=lambda x: x is None)


def vary_like(tree, *refs):
  """Marks every leaf of ``tree`` as varying over the manual mesh axes (``shard_map``) that
  any of ``refs`` varies over, so loop carries built from constants type-check against the
  carries the loop body returns.  Outside ``shard_map`` this is the identity."""
  axes = set()
  for r in jax.tree.leaves(refs):
    axes |= varying_axes(r)
  if not axes:
    return tree

  def one(x):
    missing = tuple(sorted(axes - varying_axes(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x
  return jax.tree.map(one, tree)
