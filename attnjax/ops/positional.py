"""Positional encodings: rotary (1D, axial N-D, mixed), sinusoidal, ALiBi, relative tables.

Pure functions of arrays; the layers in `attnjax.layers` call them. Layout is BTNH like
`attnjax.attention`: `x [B, T, N, H]`.

Rotary convention ("half split", as in GPT-NeoX): the head dimension is split into two
halves `x = [x1, x2]` (each `H/2` wide) and channel pair `(x1_i, x2_i)` is rotated by the
angle `a_i`:

  rot(x)_i       = x1_i cos a_i - x2_i sin a_i
  rot(x)_{i+H/2} = x2_i cos a_i + x1_i sin a_i

Because rotations compose, `<rot_p(q), rot_r(k)>` depends only on the offset `p - r`
(the relative-position property the tests check). All angle math is float32; the result
is cast back to the input dtype.

Papers:
- RoFormer: Enhanced Transformer with Rotary Position Embedding (Su et al., 2021).
- Rotary Position Embedding for Vision Transformer (Heo et al., 2024): RoPE-Axial and
  RoPE-Mixed (learnable per-head frequencies over 2D coordinates).
- Attention Is All You Need (Vaswani et al., 2017): sinusoidal embeddings.
- Train Short, Test Long: Attention with Linear Biases Enables Input Length
  Extrapolation (Press et al., 2022): ALiBi slopes.
- Swin Transformer: Hierarchical Vision Transformer using Shifted Windows (Liu et al.,
  2021): relative position bias tables indexed by clipped per-axis offsets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "rope_frequencies",
  "rope_angles",
  "rope_angles_axial",
  "rope_angles_mixed",
  "init_rope_mixed_frequencies",
  "apply_rotary",
  "apply_rope",
  "apply_rope_axial",
  "grid_coordinates",
  "sinusoidal_embedding",
  "sinusoidal_embedding_nd",
  "alibi_slopes",
  "relative_position_index",
  "num_relative_positions",
]


def _check_even(name: str, value: int) -> None:
  if value <= 0 or value % 2:
    raise ValueError(f"{name} must be a positive even integer, got {name}={value}")


def rope_frequencies(rotary_dim: int, *, base: float = 10000.0) -> jax.Array:
  """Inverse frequencies `theta_i = base^(-2i / rotary_dim)`, `i = 0 .. rotary_dim/2 - 1`.

  Returns float32 `[rotary_dim // 2]`. (RoFormer, Su et al., 2021.)
  """
  _check_even("rotary_dim", rotary_dim)
  if base <= 1.0:
    raise ValueError(f"base must be > 1, got base={base}")
  exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
  return base ** (-exponents)


def rope_angles(positions: jax.Array, head_dim: int, *, base: float = 10000.0) -> jax.Array:
  """1D rotary angles `a[..., i] = p * theta_i`.

  Args:
    positions: `[...]` integer or float positions (e.g. `[B, T]`).
    head_dim: H (even).
  Returns:
    float32 `[..., H/2]`.
  """
  inv = rope_frequencies(head_dim, base=base)
  return positions.astype(jnp.float32)[..., None] * inv


def rope_angles_axial(positions: jax.Array, head_dim: int, *, base: float = 10000.0) -> jax.Array:
  """Axial N-D rotary angles (RoPE-Axial, Heo et al., 2024).

  The `H/2` rotation pairs are split into `D` equal groups; group `d` rotates with the
  coordinate `p[..., d]` using its own 1D frequency ladder of width `H/D`:
  `a[..., d*H/(2D) + i] = p_d * base^(-2i / (H/D))`.

  Args:
    positions: `[..., D]` coordinates (e.g. `[B, T, 2]` for (row, col)).
    head_dim: H; `H` must be divisible by `2*D`.
  Returns:
    float32 `[..., H/2]`.
  """
  if positions.ndim < 1:
    raise ValueError("positions must have a trailing coordinate axis [..., D], got shape "
                     f"{positions.shape}")
  ndim = positions.shape[-1]
  if ndim < 1 or head_dim % (2 * ndim):
    raise ValueError(
      f"head_dim must be a multiple of 2*D={2 * ndim} for axial RoPE over D={ndim} axes, got "
      f"head_dim={head_dim}"
    )
  per_axis = head_dim // ndim
  inv = rope_frequencies(per_axis, base=base)  # [H/(2D)]
  angles = positions.astype(jnp.float32)[..., :, None] * inv  # [..., D, H/(2D)]
  return angles.reshape(*positions.shape[:-1], head_dim // 2)


def init_rope_mixed_frequencies(
  key: jax.Array, num_heads: int, head_dim: int, ndim: int = 2, *, base: float = 100.0
) -> jax.Array:
  """Initial learnable frequencies for RoPE-Mixed (Heo et al., 2024).

  Pair `i` of head `h` gets the frequency vector `theta_i * u_h`, where `u_h` is a unit
  direction drawn per head: `(cos phi_h, sin phi_h)` with uniform `phi_h` for D=2 (the
  paper's initialisation), a normalised Gaussian vector for other D.

  Returns float32 `[N, H/2, D]`.
  """
  _check_even("head_dim", head_dim)
  theta = rope_frequencies(head_dim, base=base)  # [H/2]
  if ndim == 2:
    phi = jax.random.uniform(key, (num_heads,), minval=0.0, maxval=2 * math.pi)
    direction = jnp.stack([jnp.cos(phi), jnp.sin(phi)], axis=-1)  # [N, 2]
  else:
    direction = jax.random.normal(key, (num_heads, ndim))
    direction = direction / jnp.linalg.norm(direction, axis=-1, keepdims=True)
  return theta[None, :, None] * direction[:, None, :]


def rope_angles_mixed(positions: jax.Array, freqs: jax.Array) -> jax.Array:
  """RoPE-Mixed angles `a[b, t, n, i] = sum_d freqs[n, i, d] * p[b, t, d]` (Heo et al., 2024).

  Args:
    positions: `[B, T, D]` coordinates.
    freqs: `[N, H/2, D]` (learnable) frequencies.
  Returns:
    float32 `[B, T, N, H/2]`.
  """
  if positions.ndim != 3:
    raise ValueError(f"positions must be [B, T, D], got shape {positions.shape}")
  if freqs.ndim != 3 or freqs.shape[-1] != positions.shape[-1]:
    raise ValueError(
      f"freqs must be [N, H/2, D={positions.shape[-1]}], got shape {freqs.shape}"
    )
  return jnp.einsum(
    "btd,nid->btni", positions.astype(jnp.float32), freqs.astype(jnp.float32),
    preferred_element_type=jnp.float32,
  )


def apply_rotary(x: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotate channel pairs of `x [B, T, N, H]` by `angles`.

  Args:
    x: `[B, T, N, H]`, H even.
    angles: `[B, T, H/2]` (shared by all heads) or `[B, T, N, H/2]` (per head); leading
    axes broadcast against `x` only where they are 1 (no silent rank broadcasting).
  Returns:
    `[B, T, N, H]` in `x.dtype`; see the module docstring for the formula.
  """
  if x.ndim != 4:
    raise ValueError(f"x must be [B, T, N, H], got shape {x.shape}")
  head_dim = x.shape[-1]
  _check_even("head_dim (x.shape[-1])", head_dim)
  if angles.ndim == 3:
    angles = angles[:, :, None, :]
  if angles.ndim != 4 or angles.shape[-1] != head_dim // 2:
    raise ValueError(
      f"angles must be [B, T, H/2={head_dim // 2}] or [B, T, N, H/2], got shape {angles.shape}"
    )
  for axis, (a, b) in enumerate(zip(angles.shape[:3], x.shape[:3])):
    if a not in (1, b):
      raise ValueError(f"angles axis {axis} has size {a}, expected 1 or {b} (x shape {x.shape})")
  cos = jnp.cos(angles)
  sin = jnp.sin(angles)
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : head_dim // 2], xf[..., head_dim // 2 :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float = 10000.0) -> jax.Array:
  """1D rotary position embedding (RoFormer). `x [B,T,N,H]`, `positions [B,T]` or `[T]`."""
  if x.ndim != 4:
    raise ValueError(f"x must be [B, T, N, H], got shape {x.shape}")
  if positions.ndim == 1:
    positions = positions[None, :]
  if positions.ndim != 2 or positions.shape[-1] != x.shape[1]:
    raise ValueError(f"positions must be [B, T={x.shape[1]}] or [T], got shape {positions.shape}")
  return apply_rotary(x, rope_angles(positions, x.shape[-1], base=base))


def apply_rope_axial(x: jax.Array, positions: jax.Array, *, base: float = 10000.0) -> jax.Array:
  """Axial N-D rotary embedding (RoPE-Axial). `x [B,T,N,H]`, `positions [B,T,D]` or `[T,D]`."""
  if x.ndim != 4:
    raise ValueError(f"x must be [B, T, N, H], got shape {x.shape}")
  if positions.ndim == 2:
    positions = positions[None]
  if positions.ndim != 3 or positions.shape[1] != x.shape[1]:
    raise ValueError(f"positions must be [B, T={x.shape[1]}, D] or [T, D], got shape "
                     f"{positions.shape}")
  return apply_rotary(x, rope_angles_axial(positions, x.shape[-1], base=base))


def grid_coordinates(shape: Sequence[int]) -> np.ndarray:
  """Row-major integer coordinates of a grid: `[prod(shape), len(shape)]` int32 (numpy)."""
  shape = tuple(int(s) for s in shape)
  if not shape or any(s <= 0 for s in shape):
    raise ValueError(f"shape must be a non-empty tuple of positive ints, got shape={shape}")
  mesh = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
  return np.stack([m.reshape(-1) for m in mesh], axis=-1).astype(np.int32)


def sinusoidal_embedding(positions: jax.Array, dim: int, *, base: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding (Vaswani et al., 2017): `[sin(p w_i), cos(p w_i)]`,
  `w_i = base^(-2i/dim)`.

  Args:
    positions: `[...]` positions.
    dim: even embedding width.
  Returns:
    float32 `[..., dim]` (sines in the first half, cosines in the second).
  """
  _check_even("dim", dim)
  angles = rope_angles(jnp.asarray(positions), dim, base=base)
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def sinusoidal_embedding_nd(shape: Sequence[int], dim: int, *, base: float = 10000.0) -> jax.Array:
  """N-D sinusoidal embedding of a row-major grid: axis d fills `dim/D` channels.

  Returns float32 `[prod(shape), dim]`; `dim` must be a multiple of `2*len(shape)`.
  """
  coords = grid_coordinates(shape)
  ndim = coords.shape[-1]
  if dim % (2 * ndim):
    raise ValueError(f"dim must be a multiple of 2*len(shape)={2 * ndim}, got dim={dim}")
  parts = [sinusoidal_embedding(jnp.asarray(coords[:, d]), dim // ndim, base=base)
           for d in range(ndim)]
  return jnp.concatenate(parts, axis=-1)


def alibi_slopes(num_heads: int) -> jax.Array:
  """ALiBi head slopes (Press et al., 2022), float32 `[num_heads]`.

  For `n` a power of two: `m_h = 2^(-8 h / n)`, `h = 1..n`. Otherwise the slopes of the
  closest lower power of two `p`, followed by every other slope of `2p` (the paper's rule).
  The bias added to logit `(i, j)` is `-m_h * |i - j|` (or `m_h * (j - i)` causally).
  """
  if not isinstance(num_heads, (int, np.integer)) or num_heads <= 0:
    raise ValueError(f"num_heads must be a positive int, got num_heads={num_heads!r}")

  def power_of_two(n: int) -> list[float]:
    return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

  p = 2 ** int(math.floor(math.log2(num_heads)))
  slopes = power_of_two(p)
  if p != num_heads:
    slopes += power_of_two(2 * p)[0::2][: num_heads - p]
  return jnp.asarray(slopes, dtype=jnp.float32)


def _as_tuple(value, ndim: int, name: str) -> tuple[int, ...]:
  if isinstance(value, (int, np.integer)):
    return (int(value),) * ndim
  value = tuple(int(v) for v in value)
  if len(value) != ndim:
    raise ValueError(f"{name} must be an int or a tuple of {ndim} ints, got {name}={value}")
  return value


def num_relative_positions(max_distance, ndim: int = 1) -> int:
  """Size of a relative-position table: `prod_d (2 * max_distance_d + 1)`."""
  md = _as_tuple(max_distance, ndim, "max_distance")
  if any(m < 0 for m in md):
    raise ValueError(f"max_distance must be >= 0, got max_distance={md}")
  return int(np.prod([2 * m + 1 for m in md]))


def relative_position_index(q_coords, k_coords, max_distance, *, step=1) -> jax.Array:
  """Index into a relative-position table for every (query, key) pair.

  Per axis `d`, the offset `o_d = (k_d - q_d) // step_d` is clipped to
  `[-max_distance_d, max_distance_d]`; the index is the row-major position of
  `(o_1 + m_1, ..., o_D + m_D)` in a table of `prod(2 m_d + 1)` entries. With
  `max_distance = window - 1` this is Swin's `(2M-1)^2` table; with `kernel - 1` NAT's.

  Args:
    q_coords: `[..., D]` integer coordinates (e.g. `[T, D]`, or broadcasting index arrays).
    k_coords: `[..., D]` integer coordinates, broadcasting against `q_coords`.
    max_distance: int or per-axis tuple.
    step: int or per-axis tuple (dilation): offsets are measured in units of `step`.
  Returns:
    int32 array of the broadcast leading shape.
  """
  q_coords = jnp.asarray(q_coords)
  k_coords = jnp.asarray(k_coords)
  ndim = q_coords.shape[-1]
  if k_coords.shape[-1] != ndim:
    raise ValueError(f"q_coords and k_coords must have the same D, got {q_coords.shape} and "
                     f"{k_coords.shape}")
  md = _as_tuple(max_distance, ndim, "max_distance")
  st = _as_tuple(step, ndim, "step")
  if any(s <= 0 for s in st):
    raise ValueError(f"step must be positive, got step={st}")
  index = jnp.zeros(jnp.broadcast_shapes(q_coords.shape[:-1], k_coords.shape[:-1]), jnp.int32)
  for d in range(ndim):
    offset = jnp.floor_divide(k_coords[..., d] - q_coords[..., d], st[d])
    offset = jnp.clip(offset, -md[d], md[d]) + md[d]
    index = index * (2 * md[d] + 1) + offset.astype(jnp.int32)
  return index
