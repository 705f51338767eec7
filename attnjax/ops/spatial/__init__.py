"""Spatial attention on ``[B, *spatial, N, H]`` maps (NHWC order): windowed, neighborhood,
halo, stripe, criss-cross, grid/block (MaxViT), spatial-reduction, channel-group and
long/short-distance (CrossFormer) attention.  See ``docs/spatial.md``.

Mask-based ops run through :func:`attnjax.attention` (via :mod:`attnjax.core.hooks`) and
take ``implementation=``; the output has the layout of ``q`` with ``Hv`` last.
"""

# Mask-based ops (windows, neighborhoods, halos, stripes, criss-cross, MaxViT block/grid).
from attnjax.ops.spatial.windowed import (
  block_attention,
  criss_cross_attention,
  grid_attention,
  halo_attention,
  neighborhood_attention,
  stripe_attention,
  stripe_heads,
  window_attention,
)

__all__ = [
    "window_attention", "neighborhood_attention", "halo_attention", "criss_cross_attention",
    "stripe_attention", "stripe_heads", "grid_attention", "block_attention",
]
