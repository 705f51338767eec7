"""Spatial attention on ``[B, *spatial, N, H]`` maps (NHWC order): windowed, neighborhood,
halo, stripe, criss-cross, grid/block (MaxViT), spatial-reduction, channel-group and
long/short-distance (CrossFormer) attention.  See ``docs/spatial.md``.

Mask-based ops run through :func:`attnjax.attention` (via :mod:`attnjax.core.hooks`) and
take ``implementation=``; the output has the layout of ``q`` with ``Hv`` last.
"""
