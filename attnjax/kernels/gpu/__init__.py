"""Pallas GPU (Pallas Triton) kernels, imported lazily.

* ``flash_attention``, ``BlockSizes``, ``grid_steps``: block-sparse flash attention
  (:mod:`attnjax.kernels.gpu.flash`).
* ``lightning_attention``: chunked decayed linear attention (:mod:`attnjax.kernels.gpu.linear`).

Each name is resolved on first use, so a failure in one module does not break the other.
"""

import importlib

_EXPORTS = {
    "flash_attention": "flash",
    "flash_attention_reference": "flash",
    "BlockSizes": "flash",
    "grid_steps": "flash",
    "lightning_attention": "linear",
    "lightning_attention_reference": "linear",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
  mod = _EXPORTS.get(name)
  if mod is None:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(list(globals()) + __all__)
