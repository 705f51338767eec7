"""Pallas kernels: ``tpu/`` (Mosaic), ``gpu/`` (Triton) and backend-independent
``common`` (tile tables, schedules, in-kernel evaluation of masks and score mods).

Submodules are imported lazily: ``from attnjax.kernels.tpu import flash_attention``.
"""
