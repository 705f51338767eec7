"""``pallas_call`` under ``jax.shard_map``: the one Pallas entry point of every kernel."""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl

from attnjax.core.vma import vary_like, varying_axes

__all__ = ["pallas_call"]


def pallas_call(kernel, *, out_shape, **kwargs):
  """``pl.pallas_call`` that also runs inside ``jax.shard_map`` (``check_vma=True``).

  There every array has a type saying over which manual mesh axes it varies, and a
  ``pallas_call``'s ``out_shape`` must say it for the outputs.  The kernel reads all
  its inputs, so the outputs vary over the union of the inputs' axes, and the inputs
  are marked varying over that union too (an aliased zeros buffer then matches its
  output).  Outside ``shard_map`` this is ``pl.pallas_call``.
  """
  def call(*args):
    axes = frozenset().union(*(varying_axes(x) for x in jax.tree.leaves(args)))
    if axes:
      args = vary_like(args, *args)
    mat = jax.sharding.ManualAxisType(varying=axes)
    shapes = jax.tree.map(
        lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype, manual_axis_type=mat), out_shape)
    return pl.pallas_call(kernel, out_shape=shapes, **kwargs)(*args)
  return call
