"""attnjax: attention mechanisms for JAX/Flax.

Public API:
  attention, reference_attention   the core call and its float32 oracle
  masks, score_mods                composable masks (block tables) and logit modifiers
  ops                              pure functions per family (dense, linear, ...)
  layers, variants, models         Flax layers, the variant registry, model zoo (lazy)
  flax_attention_fn                drop-in ``attention_fn`` for Flax MHA classes (lazy)

Layering (imports run one way, ``docs/architecture.md``, ``tests/test_architecture.py``):
masks, score_mods, data -> core -> ops | kernels | cpu -> dispatch -> parallel, analysis
-> layers, variants -> models -> train.
"""

import importlib as _importlib

from attnjax import masks, score_mods
from attnjax.dispatch import IMPLEMENTATIONS, attention
from attnjax.cpu.flash import CpuFlashBlockSizes
from attnjax.ops.chunked import ChunkedBlockSizes
from attnjax.ops.dense import reference_attention

__version__ = "0.1.0"

_LAZY_MODULES = ("ops", "kernels", "cpu", "layers", "variants", "models", "parallel", "data",
                 "train", "analysis")

__all__ = ["attention", "reference_attention", "masks", "score_mods", "IMPLEMENTATIONS",
           "ChunkedBlockSizes", "CpuFlashBlockSizes", "flax_attention_fn", *_LAZY_MODULES]


def __getattr__(name):
  if name in _LAZY_MODULES:
    return _importlib.import_module(f"attnjax.{name}")
  if name == "flax_attention_fn":
    return _importlib.import_module("attnjax.layers.flax_compat").flax_attention_fn
  raise AttributeError(f"module 'attnjax' has no attribute {name!r}")
