"""Pallas TPU (Pallas Mosaic) kernels, imported lazily.

* ``flash_attention``, ``BlockSizes``, ``grid_steps``: block-sparse flash attention
  (:mod:`attnjax.kernels.tpu.flash`).
* ``lightning_attention``: chunked decayed linear attention (:mod:`attnjax.kernels.tpu.linear`).

Each name is resolved on first use, so a failure in one module does not break the other.
"""

from attnjax.kernels import BACKEND_EXPORTS, lazy_exports

__all__ = list(BACKEND_EXPORTS)
__getattr__, __dir__ = lazy_exports(globals())
