"""Dot operands for float32 accumulation on the CPU backend.

XLA:CPU's thunk runtime cannot execute some ``bf16 x bf16 -> f32`` dots (``DotThunk``:
"Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32").  Whether a given
``einsum(..., preferred_element_type=float32)`` of 16-bit operands reaches that path
depends on the surrounding program (an operand produced by a layout-changing fusion does;
the same einsum alone does not), so a jitted bfloat16 layer could fail at run time on CPU
while every op passed alone.  :func:`f32_on_cpu` casts 16-bit float operands to float32
when tracing for the CPU backend.  That changes no result: a product of two bfloat16 (or
float16) numbers is exact in float32 (8 + 8 or 11 + 11 significant bits), and the
accumulation was float32 already.  Other backends keep the 16-bit operands (MXU, tensor
cores) with float32 accumulation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["f32_on_cpu", "einsum_f32"]


def _low(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32


def f32_on_cpu(*xs):
  """``xs`` (a tuple), 16-bit floats cast to float32 when tracing for the CPU backend."""
  if jax.default_backend() != "cpu":
    return xs
  return tuple(x.astype(jnp.float32) if _low(x) else x for x in xs)


def einsum_f32(spec: str, *xs, **kwargs):
  """``jnp.einsum(spec, *xs, preferred_element_type=float32, **kwargs)`` with the
  operands of :func:`f32_on_cpu`."""
  return jnp.einsum(spec, *f32_on_cpu(*xs), preferred_element_type=jnp.float32, **kwargs)
