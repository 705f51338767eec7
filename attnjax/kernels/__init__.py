"""Pallas kernels: ``tpu/`` (Mosaic), ``gpu/`` (Triton) and backend-independent
``tile_math`` (per-tile logits, online softmax, split merge), ``flash_wrapper`` (the
public ``flash_attention`` builder and ``custom_vjp`` plumbing), ``pallas_shard``
(``pallas_call`` under ``shard_map``) and ``linear_common`` (the same for the
linear-attention chunk kernels).  Tile tables, schedules and in-kernel evaluation of
masks and score mods live in :mod:`attnjax.core`.

Submodules are imported lazily: ``from attnjax.kernels.tpu import flash_attention``.
"""

import importlib

# Public names of each backend package (``tpu``, ``gpu``) and the module defining them.
BACKEND_EXPORTS = {
    "flash_attention": "flash",
    "flash_attention_reference": "flash",
    "BlockSizes": "flash",
    "grid_steps": "flash",
    "paged_flash_attention": "flash",
    "lightning_attention": "linear",
    "lightning_attention_reference": "linear",
}


def lazy_exports(namespace: dict, exports: dict = BACKEND_EXPORTS):
  """``(__getattr__, __dir__)`` for a package whose names live in submodules.

  ``namespace`` is the package's ``globals()``; a name is imported from
  ``<package>.<exports[name]>`` on first use and cached there, so a failure in one
  submodule does not break the others.
  """
  package = namespace["__name__"]

  def __getattr__(name):
    mod = exports.get(name)
    if mod is None:
      raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{package}.{mod}"), name)
    namespace[name] = value
    return value

  def __dir__():
    return sorted(set(namespace) | set(exports))

  return __getattr__, __dir__
