"""VMEM footprint of the TPU flash kernels per block-size choice, and what fits each chip.

Mosaic keeps every pipelined block of a ``pallas_call`` in VMEM twice (double buffering:
the next step's DMA overlaps this step's compute), plus the kernel's scratch buffers and
the values its body materialises. VMEM arrays are laid out in ``(sublane, 128-lane)``
tiles, so a block ``[r, c]`` occupies ``round_up(r, s) * round_up(c, 128)`` elements with
``s = 8`` for 4-byte, 16 for 2-byte and 32 for 1-byte types (a ``[R, 1]`` statistics
column costs as much as ``[R, 128]``). :func:`flash_vmem_bytes` adds these up for the
three kernels of :mod:`attnjax.kernels.tpu.flash`, from the same block shapes its
BlockSpecs use (``R = G * block_q`` query rows of a GQA group, ``block_k`` keys):

* ``fwd``: inputs q ``[R, H]``, k ``[bk, H]``, v ``[bk, Hv]``; outputs o ``[R, Hv]`` and
  lse ``[R, 1]`` (f32); scratch m, l ``[R, 1]`` and acc ``[R, Hv]`` (f32); body: the
  logits and probabilities ``[R, bk]`` (f32).
* ``dq``: inputs q, k, v, do ``[R, Hv]``, lse and delta ``[R, 1]``; output dq ``[R, H]``;
  scratch ``[R, H]`` f32; body: logits, probabilities and ``dp``/``ds`` ``[R, bk]``.
* ``dkv``: the same inputs; outputs dk ``[bk, H]``, dv ``[bk, Hv]``; scratch
  ``[bk, H]`` and ``[bk, Hv]`` f32; body as ``dq``.
* optional inputs: a bias or dense mask block ``[R, bk]``, segment ids ``[R, 1]`` and
  ``[1, bk]`` (int32).

It is an estimate of the dominant terms (Mosaic may keep a few more temporaries, and
scalar-prefetch/SMEM operands are not VMEM), meant to rank block sizes and to catch
choices that cannot fit; docs/kernels.md tabulates it. Capacities per TensorCore come
from JAX's own table (``pltpu.get_tpu_info_for_chip``).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

__all__ = ["flash_vmem_bytes", "delta_vmem_bytes", "vmem_capacity", "largest_fitting",
           "CHIPS"]

_LANES = 128
_F32 = 4
# Chips tabulated in docs/kernels.md: name -> (ChipVersion, TensorCores per logical device).
CHIPS = {"v4": ("TPU_V4", 1), "v5e": ("TPU_V5E", 1), "v5p": ("TPU_V5P", 1),
         "v6e": ("TPU_V6E", 1)}


def _tile(rows: int, cols: int, itemsize: int) -> int:
  """Bytes of a ``[rows, cols]`` VMEM array in (sublane, lane) tiles."""
  sub = {4: 8, 2: 16, 1: 32}.get(itemsize, 8)
  return (-(-rows // sub) * sub) * (-(-cols // _LANES) * _LANES) * itemsize


def flash_vmem_bytes(block_q: int, block_k: int, *, head_dim: int, head_dim_v=None,
                     group: int = 1, dtype=jnp.bfloat16, bias: bool = False,
                     segment_ids: bool = False) -> dict:
  """Estimated VMEM bytes of the flash kernels ``{'fwd', 'dq', 'dkv'}`` at one block size.

  Args:
    block_q, block_k: the tile (``BlockSizes.block_q`` per query head, ``block_k`` keys).
    head_dim, head_dim_v: ``H`` and ``Hv`` (default ``H``).
    group: ``G = N // K`` query heads per kv head (the kernels stack them: ``R = G*block_q``).
    dtype: the q/k/v dtype.
    bias: a bias (or dense-mask) block ``[R, block_k]`` is streamed.
    segment_ids: segment-id blocks are streamed.
  """
  for name, val in (("block_q", block_q), ("block_k", block_k), ("head_dim", head_dim),
                    ("group", group)):
    if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val <= 0:
      raise ValueError(f"{name} must be a positive int, got {val!r}")
  H, Hv = int(head_dim), int(head_dim_v or head_dim)
  R, bk = int(group) * int(block_q), int(block_k)
  it = jnp.dtype(dtype).itemsize
  qkv = _tile(R, H, it) + _tile(bk, H, it) + _tile(bk, Hv, it)
  extra = 0
  if bias:
    extra += _tile(R, bk, it)
  if segment_ids:
    extra += _tile(R, 1, 4) + _tile(1, bk, 4)
  logits = _tile(R, bk, _F32)
  col = _tile(R, 1, _F32)
  fwd = (2 * (qkv + extra + _tile(R, Hv, it) + col)       # pipelined in + out blocks
         + 2 * col + _tile(R, Hv, _F32)                    # m, l, acc scratch
         + 2 * logits)                                     # s, p
  bwd_in = qkv + extra + _tile(R, Hv, it) + 2 * col        # + do, lse, delta
  dq = 2 * (bwd_in + _tile(R, H, it)) + _tile(R, H, _F32) + 3 * logits
  dkv = (2 * (bwd_in + _tile(bk, H, it) + _tile(bk, Hv, it)) + _tile(bk, H, _F32)
         + _tile(bk, Hv, _F32) + 3 * logits)
  return {"fwd": fwd, "dq": dq, "dkv": dkv}


def delta_vmem_bytes(chunk: int, *, head_dim: int, head_dim_v=None,
                     dtype=jnp.bfloat16) -> int:
  """Estimated VMEM bytes of the gated delta-rule forward kernel
  (:mod:`attnjax.kernels.tpu.linear_gated`) at chunk length ``chunk``.

  Pipelined (double-buffered) blocks: q, k ``[C, H]`` and v ``[C, Hv]`` (``dtype``), the
  float32 columns beta and ``gc`` ``[C, 1]``, the row ``gc`` ``[1, C]``, the initial state
  ``[H, Hv]``; outputs o ``[C, Hv]`` and the final state ``[H, Hv]`` (f32). Scratch: the
  state ``[H, Hv]`` f32. Body: six ``[C, C]`` f32 matrices (decays, ``L``, its powers,
  ``M^{-1}``, the scores, the identity) and eight f32 ``[C, max(H, Hv)]`` temporaries
  (q, k, v in f32, ``U``, ``W``, ``Delta``, o, the decayed keys).
  """
  for name, val in (("chunk", chunk), ("head_dim", head_dim)):
    if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val <= 0:
      raise ValueError(f"{name} must be a positive int, got {val!r}")
  C, H, Hv = int(chunk), int(head_dim), int(head_dim_v or head_dim)
  it = jnp.dtype(dtype).itemsize
  state = _tile(H, Hv, _F32)
  ins = (2 * _tile(C, H, it) + _tile(C, Hv, it) + 2 * _tile(C, 1, _F32) + _tile(1, C, _F32)
         + state)
  outs = _tile(C, Hv, it) + state
  body = 6 * _tile(C, C, _F32) + 8 * _tile(C, max(H, Hv), _F32)
  return 2 * (ins + outs) + state + body


def vmem_capacity(chip: str) -> int:
  """VMEM bytes per TensorCore of ``chip`` (one of ``CHIPS``), from JAX's TPU table."""
  if chip not in CHIPS:
    raise ValueError(f"chip must be one of {sorted(CHIPS)}, got {chip!r}")
  version, cores = CHIPS[chip]
  return pltpu.get_tpu_info_for_chip(getattr(pltpu.ChipVersion, version),
                                     cores).vmem_capacity_bytes


def largest_fitting(chip: str, *, head_dim: int, group: int = 1, dtype=jnp.bfloat16,
                    budget_fraction: float = 0.75, candidates=(128, 256, 512, 1024, 2048),
                    **kwargs):
  """The largest square-ish ``(block_q, block_k)`` whose three kernels all fit in
  ``budget_fraction`` of ``chip``'s VMEM (leaving room for Mosaic's own temporaries),
  maximising ``block_q * block_k``; None if even 128x128 does not fit."""
  budget = budget_fraction * vmem_capacity(chip)
  best = None
  for bq in candidates:
    for bk in candidates:
      need = max(flash_vmem_bytes(bq, bk, head_dim=head_dim, group=group, dtype=dtype,
                                  **kwargs).values())
      if need <= budget and (best is None or bq * bk > best[0] * best[1]
                             or (bq * bk == best[0] * best[1] and bk > best[1])):
        best = (bq, bk)
  return best
