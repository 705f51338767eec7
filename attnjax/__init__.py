"""attnjax: attention mechanisms for JAX/Flax.

Public API (the full list is docs/api.md):
  attention, reference_attention   the core call and its float32 oracle
  IMPLEMENTATIONS                  the ``implementation=`` names of ``attention``
  masks, score_mods                composable masks (block tables) and logit modifiers
  ChunkedBlockSizes                block sizes of the pure-JAX chunked path
  CpuFlashBlockSizes               block sizes of the C++ CPU flash kernel
  TpuBlockSizes, GpuBlockSizes     block sizes of the Pallas TPU / GPU flash kernels (lazy:
                                   importing attnjax does not import Pallas)
  ops                              pure functions per family (dense, chunked, linear, ...)
  layers, variants, models         Flax layers, the variant registry, model zoo (lazy)
  kernels, cpu, parallel           Pallas kernels, the CPU kernel, meshes and sharding (lazy)
  train, data, analysis            the training loop, input pipelines, attention maps (lazy;
                                   need the ``[train]`` extra)
  flax_attention_fn                drop-in ``attention_fn`` for Flax MHA classes (lazy)

Layering (imports run one way, ``docs/architecture.md``, ``tests/test_architecture.py``):
masks, score_mods, data -> core -> ops | kernels | cpu -> dispatch -> parallel, analysis
-> layers, variants -> models -> train.
"""

import importlib as _importlib

from attnjax import masks, score_mods
from attnjax.cpu.flash import CpuFlashBlockSizes
from attnjax.dispatch import IMPLEMENTATIONS, attention
from attnjax.ops.chunked import ChunkedBlockSizes
from attnjax.ops.dense import reference_attention

__version__ = "0.1.0"

_LAZY_MODULES = ("ops", "kernels", "cpu", "layers", "variants", "models", "parallel", "data",
                 "train", "analysis")

# Lazy attributes: name -> (module, attribute in it).
_LAZY_ATTRS = {
    "TpuBlockSizes": ("attnjax.kernels.tpu", "BlockSizes"),
    "GpuBlockSizes": ("attnjax.kernels.gpu", "BlockSizes"),
    "flax_attention_fn": ("attnjax.layers.flax_compat", "flax_attention_fn"),
}

__all__ = ["attention", "reference_attention", "masks", "score_mods", "IMPLEMENTATIONS",
           "ChunkedBlockSizes", "CpuFlashBlockSizes", *_LAZY_ATTRS, *_LAZY_MODULES]


def __getattr__(name):
  if name in _LAZY_MODULES:
    return _importlib.import_module(f"attnjax.{name}")
  if name in _LAZY_ATTRS:
    module, attr = _LAZY_ATTRS[name]
    value = getattr(_importlib.import_module(module), attr)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'attnjax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(__all__))
