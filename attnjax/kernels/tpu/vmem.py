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

:func:`delta_vmem_bytes` and :func:`gla_vmem_bytes` do the same for the forward and
backward kernels of :mod:`attnjax.kernels.tpu.linear_gated`.

It is an estimate of the dominant terms (Mosaic may keep a few more temporaries, and
scalar-prefetch/SMEM operands are not VMEM), meant to rank block sizes and to catch
choices that cannot fit; docs/kernels.md tabulates it. Capacities per TensorCore come
from JAX's own table (``pltpu.get_tpu_info_for_chip``).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

__all__ = ["flash_vmem_bytes", "delta_vmem_bytes", "gla_vmem_bytes", "vmem_capacity",
           "largest_fitting", "CHIPS"]

_LANES = 128
_F32 = 4
# Chips tabulated in docs/kernels.md: name -> (ChipVersion, TensorCores per logical device).
CHIPS = {"v4": ("TPU_V4", 1), "v5e": ("TPU_V5E", 1), "v5p": ("TPU_V5P", 1),
         "v6e": ("TPU_V6E", 1)}


def _tile(rows: int, cols: int, itemsize: int) -> int:
  """Bytes of a ``[rows, cols]`` VMEM array in (sublane, lane) tiles."""
  sub = {4: 8, 2: 16, 1: 32}.get(itemsize, 8)
  return (-(-rows // sub) * sub) * (-(-cols // _LANES) * _LANES) * itemsize


def _check_positive(**vals):
  for name, val in vals.items():
    if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val <= 0:
      raise ValueError(f"{name} must be a positive int, got {val!r}")


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
  _check_positive(block_q=block_q, block_k=block_k, head_dim=head_dim, group=group)
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
                     dtype=jnp.bfloat16) -> dict:
  """Estimated VMEM bytes of the gated delta-rule kernels ``{'fwd', 'bwd'}``
  (:mod:`attnjax.kernels.tpu.linear_gated`) at chunk length ``C = chunk``.

  * ``fwd`` (as run for the gradient, which also writes the state before each chunk):
    pipelined (double-buffered) blocks q, k ``[C, H]`` and v ``[C, Hv]`` (``dtype``), the
    float32 columns beta and ``gc`` ``[C, 1]``, the row ``gc`` ``[1, C]``, the initial
    state ``[H, Hv]``; outputs o ``[C, Hv]``, the final state and the chunk's state
    ``[H, Hv]`` (f32). Scratch: the state ``[H, Hv]`` f32. Body: six ``[C, C]`` f32
    matrices (decays, ``L``, its powers, ``M^{-1}``, the scores, the identity) and eight
    f32 ``[C, max(H, Hv)]`` temporaries (q, k, v in f32, ``U``, ``W``, ``Delta``, o, the
    decayed keys).
  * ``bwd``: the forward's inputs plus the chunk's state and the cotangents do
    ``[C, Hv]`` and ``dS`` ``[H, Hv]``; outputs dq, dk ``[C, H]``, dv ``[C, Hv]``, the
    beta and decay-column gradients ``[C, 1]``, the decay-row gradient ``[1, C]`` and
    ``dS0`` ``[H, Hv]`` (all f32); scratch ``dS`` ``[H, Hv]`` f32. Body: the recomputed
    forward's values kept for the transpose (the six ``[C, C]`` matrices plus the
    ``2 log2(C)`` powers and partial inverses of the doubling) and as many ``[C, C]``
    cotangents, sixteen ``[C, max(H, Hv)]`` f32 values and cotangents, two ``[H, Hv]``.
  """
  _check_positive(chunk=chunk, head_dim=head_dim)
  C, H, Hv = int(chunk), int(head_dim), int(head_dim_v or head_dim)
  it = jnp.dtype(dtype).itemsize
  state = _tile(H, Hv, _F32)
  cols = 2 * _tile(C, 1, _F32) + _tile(1, C, _F32)
  ins = 2 * _tile(C, H, it) + _tile(C, Hv, it) + cols + state
  wide = _tile(C, max(H, Hv), _F32)
  cc = _tile(C, C, _F32)
  fwd = 2 * (ins + _tile(C, Hv, it) + 2 * state) + state + 6 * cc + 8 * wide
  rounds = max(0, int(np.ceil(np.log2(C))) - 1)      # doubling rounds: span 2 -> C
  bwd_ins = ins + state + _tile(C, Hv, it) + state
  bwd_outs = 2 * _tile(C, H, _F32) + _tile(C, Hv, _F32) + cols + state
  bwd = (2 * (bwd_ins + bwd_outs) + state + 2 * (6 + 2 * rounds) * cc + 16 * wide
         + 2 * state)
  return {"fwd": fwd, "bwd": bwd}


def gla_vmem_bytes(chunk: int = 16, *, head_dim: int, head_dim_v=None,
                   dtype=jnp.bfloat16) -> dict:
  """Estimated VMEM bytes of the GLA kernels ``{'fwd', 'bwd'}``
  (:mod:`attnjax.kernels.tpu.linear_gated`) at chunk length ``C = chunk`` (default 16).

  * ``fwd`` (as run for the gradient): pipelined blocks q, k ``[C, H]``, v ``[C, Hv]``
    (``dtype``), the cumulative log-decay ``b [C, H]`` f32, the initial state ``[Hv, H]``
    f32; outputs o ``[C, Hv]``, the final state and the chunk's state (f32). Scratch: the
    state. Body: two ``[C, C, H]`` f32 arrays (decays and the decayed products, each
    ``C`` tiles of ``[C, H]``), a ``[C, C]`` score matrix and six ``[C, max(H, Hv)]``.
  * ``bwd``: the forward's inputs plus the chunk's state, do ``[C, Hv]`` and ``dS``;
    outputs dq, dk, db ``[C, H]``, dv ``[C, Hv]`` and ``dS0`` (f32); scratch ``dS``.
    Body: four ``[C, C, H]`` (the two above and their cotangents), two ``[C, C]`` and
    twelve ``[C, max(H, Hv)]`` f32 values.
  """
  _check_positive(chunk=chunk, head_dim=head_dim)
  C, H, Hv = int(chunk), int(head_dim), int(head_dim_v or head_dim)
  it = jnp.dtype(dtype).itemsize
  state = _tile(Hv, H, _F32)
  ins = 2 * _tile(C, H, it) + _tile(C, Hv, it) + _tile(C, H, _F32) + state
  cube = C * _tile(C, H, _F32)
  wide = _tile(C, max(H, Hv), _F32)
  cc = _tile(C, C, _F32)
  fwd = 2 * (ins + _tile(C, Hv, it) + 2 * state) + state + 2 * cube + cc + 6 * wide
  bwd_outs = 3 * _tile(C, H, _F32) + _tile(C, Hv, _F32) + state
  bwd = (2 * (ins + 2 * state + _tile(C, Hv, it) + bwd_outs) + state + 4 * cube + 2 * cc
         + 12 * wide)
  return {"fwd": fwd, "bwd": bwd}


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
