"""Pure attention functions, one submodule per family (no parameters, no Flax).

- ``attnjax.ops.dense``: ``reference_attention`` (the float32 oracle) and the dense path.
- ``attnjax.ops.chunked``: ``chunked_attention`` and ``ChunkedBlockSizes`` (online softmax
  over key/value blocks, skipping masked-out blocks).
- ``attnjax.ops.linear``: the linear-attention family (``linear_attention``,
  ``lightning_attention``, ``decayed_linear_attention``, ...).
- ``attnjax.ops.positional``: RoPE (1D, axial, mixed), ALiBi slopes, sinusoidal tables.
- ``attnjax.ops.spatial``: attention on ``[B, *spatial, N, H]`` maps (windows, neighborhoods, ...).
- ``attnjax.ops.heads``: head-level mechanisms (MoH, head gates, SHViT, MW-MHA, talking heads).
- ``attnjax.ops.routing``: data-dependent block sparsity (MoBA, VMoBA, BiFormer, dynamic mask
  attention, Sparsifiner).
- ``attnjax.ops.pooling``: token, latent and pooling attention (agent, slot, SimPool, class
  attention, super tokens, proxies, ...).
- ``attnjax.ops.channel``: the parameter-free cores of the CNN channel/spatial modules.

Submodules load on first access (``attnjax.ops.linear`` works after ``import attnjax``).
"""

import importlib as _importlib

SUBMODULES = ("dense", "chunked", "linear", "positional", "spatial", "routing", "pooling",
              "heads", "channel")

__all__ = list(SUBMODULES)


def __getattr__(name):
  if name in SUBMODULES:
    return _importlib.import_module(f"attnjax.ops.{name}")
  raise AttributeError(f"module 'attnjax.ops' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(SUBMODULES))
