"""Spatial attention on ``[B, *spatial, N, H]`` maps (NHWC order): windowed, neighborhood,
halo, stripe, criss-cross, grid/block (MaxViT), spatial-reduction, channel-group and
long/short-distance (CrossFormer) attention.  See ``docs/spatial.md``.

Mask-based ops run through :func:`attnjax.attention` (via :mod:`attnjax.core.hooks`) and
take ``implementation=``; the output has the layout of ``q`` with ``Hv`` last.
"""

__all__ = []

# Spatial reduction, channel-group and long/short-distance attention (family F).
from attnjax.ops.spatial.reduced import (  # noqa: E402
    avg_pool_map,
    channel_group_attention,
    dpb_relative_coordinates,
    dynamic_position_bias,
    hilo_attention,
    long_short_distance_attention,
    spatial_reduction_attention,
)

__all__ += ["avg_pool_map", "channel_group_attention", "dpb_relative_coordinates",
            "dynamic_position_bias", "hilo_attention", "long_short_distance_attention",
            "spatial_reduction_attention"]
