"""Spatial attention on ``[B, *spatial, N, H]`` maps (NHWC order): windowed, neighborhood,
halo, stripe, criss-cross, grid/block (MaxViT), spatial-reduction, channel-group and
long/short-distance (CrossFormer) attention.  See ``docs/spatial.md``.

Mask-based ops run through :func:`attnjax.attention` (via :mod:`attnjax.core.hooks`) and
take ``implementation=``; the output has the layout of ``q`` with ``Hv`` last.
"""

# The ops of both modules (mask-based: windowed; reductions and channel groups: reduced).
from attnjax.ops.spatial.reduced import (
    avg_pool_map,
    channel_group_attention,
    check_positions,
    dpb_relative_coordinates,
    dynamic_position_bias,
    hilo_attention,
    long_short_distance_attention,
    pooled_positions,
    rope_map,
    spatial_reduction_attention,
)
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
    # mask-based (attnjax.ops.spatial.windowed)
    "window_attention", "neighborhood_attention", "halo_attention", "criss_cross_attention",
    "stripe_attention", "stripe_heads", "grid_attention", "block_attention",
    # spatial reduction, channel-group, long/short distance (attnjax.ops.spatial.reduced)
    "avg_pool_map", "channel_group_attention", "check_positions", "dpb_relative_coordinates",
    "dynamic_position_bias", "hilo_attention", "long_short_distance_attention",
    "pooled_positions", "rope_map", "spatial_reduction_attention",
]
