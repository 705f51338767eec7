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

Vision positional mechanisms (catalog family I; token maps are `[B, Hh, Ww, C]`, their
row-major flattening is the `T = Hh*Ww` axis of BTNH):
- Conditional Positional Encodings for Vision Transformers (Chu et al.): PEG,
  `x + DWConv(x)` (`depthwise_conv2d`, `conditional_position_encoding`).
- CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows (Dong
  et al.): LePE, `DWConv(V)` added to the attention output (`lepe`).
- ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases (d'Ascoli
  et al.): gated positional self-attention (`gated_positional_attention`,
  `relative_features_2d`, `convit_positional_logits`, `init_convit_v_pos`).
- On the Relationship between Self-Attention and Convolutional Layers (Cordonnier et al.):
  the quadratic encoding `-alpha |delta - Delta_h|^2` that `init_convit_v_pos` builds.
- Bottleneck Transformers for Visual Recognition (Srinivas et al.): 2D relative position
  logits `q . (r_h[dy] + r_w[dx])` (`relative_logits_2d`, `relative_logits_2d_score_mod`,
  `botnet_attention`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import score_mods as _score_mods
from attnjax.core import hooks

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
  "depthwise_conv2d",
  "conditional_position_encoding",
  "lepe",
  "relative_features_2d",
  "convit_positional_logits",
  "init_convit_v_pos",
  "convit_head_offsets",
  "gated_positional_attention",
  "relative_logits_2d",
  "relative_logits_2d_score_mod",
  "botnet_attention",
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


# ----------------------------------------------------------------------------- vision (family I)

def _check_array(name: str, a, ndim: int, what: str) -> None:
  if not hasattr(a, "ndim") or not hasattr(a, "dtype"):
    raise TypeError(f"{name} must be an array {what}, got {type(a).__name__}")
  if a.ndim != ndim:
    raise ValueError(f"{name} must be {what} (rank {ndim}), got shape {a.shape}")
  if not jnp.issubdtype(a.dtype, jnp.floating):
    raise TypeError(f"{name} must be floating point, got dtype {a.dtype}")


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
  """Depthwise 2D convolution with zero 'same' padding (one filter per channel).

  `y[b, i, j, c] = bias[c] + sum_{u, v} x[b, i + u - kh//2, j + v - kw//2, c] kernel[u, v, c]`
  (cross-correlation, as `jax.lax.conv`; out-of-map pixels are 0, which is what lets a
  zero-padded convolution encode absolute position near the borders).

  Args:
    x: `[B, Hh, Ww, C]` token map.
    kernel: `[kh, kw, C]`, kh and kw odd.
    bias: `[C]` or None.
  Returns:
    `[B, Hh, Ww, C]` in `x.dtype` (accumulated in float32).
  """
  _check_array("x", x, 4, "[B, Hh, Ww, C]")
  C = x.shape[-1]
  _check_array("kernel", kernel, 3, f"[kh, kw, C={C}]")
  kh, kw, kc = kernel.shape
  if kc != C:
    raise ValueError(f"kernel must be [kh, kw, C={C}], got shape {kernel.shape}")
  if kh % 2 == 0 or kw % 2 == 0:
    raise ValueError(f"kernel spatial size must be odd (centred 'same' padding), got "
                     f"kernel.shape[:2]={(kh, kw)}")
  if bias is not None:
    _check_array("bias", bias, 1, f"[C={C}]")
    if bias.shape[0] != C:
      raise ValueError(f"bias must be [C={C}], got shape {bias.shape}")
  y = jax.lax.conv_general_dilated(
    x.astype(jnp.float32), kernel.astype(jnp.float32)[:, :, None, :], window_strides=(1, 1),
    padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=C,
    precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype)


def conditional_position_encoding(x: jax.Array, kernel: jax.Array,
                                  bias: jax.Array | None = None) -> jax.Array:
  """PEG of CPVT: `x + DWConv(x)` on the token map.

  Paper: "Conditional Positional Encodings for Vision Transformers" (Chu et al.). The
  encoding is generated from each token's neighbourhood, so it follows the input size;
  the zero padding supplies absolute position.

  Args:
    x: `[B, Hh, Ww, C]`; kernel `[k, k, C]` (odd, 3x3 in the paper); bias `[C]` or None.
  Returns:
    `[B, Hh, Ww, C]` in `x.dtype`.
  """
  return (x.astype(jnp.float32) + depthwise_conv2d(x, kernel, bias).astype(jnp.float32)
          ).astype(x.dtype)


def lepe(v_map: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
  """Locally-enhanced positional encoding of CSWin: `LePE(V) = DWConv(V)` per head channel.

  The attention output becomes `softmax(Q K^T / sqrt(d)) V + LePE(V)`; add the result of
  this function to the attention output (same layout). For windowed/striped attention
  apply it per window: fold the windows into the batch axis of `v_map` (zero padding at
  window borders, as in the paper).

  Paper: "CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped
  Windows" (Dong et al.).

  Args:
    v_map: `[B, Hh, Ww, N, Hv]` values on the token map (N heads of width Hv).
    kernel: `[k_h, k_w, N, Hv]` depthwise filters (odd sizes; 3x3 in the paper).
    bias: `[N, Hv]` or None.
  Returns:
    `[B, Hh, Ww, N, Hv]` in `v_map.dtype`.
  """
  _check_array("v_map", v_map, 5, "[B, Hh, Ww, N, Hv]")
  B, Hh, Ww, N, Hv = v_map.shape
  _check_array("kernel", kernel, 4, f"[k_h, k_w, N={N}, Hv={Hv}]")
  if kernel.shape[2:] != (N, Hv):
    raise ValueError(f"kernel must be [k_h, k_w, N={N}, Hv={Hv}], got shape {kernel.shape}")
  if bias is not None:
    _check_array("bias", bias, 2, f"[N={N}, Hv={Hv}]")
    if bias.shape != (N, Hv):
      raise ValueError(f"bias must be [N={N}, Hv={Hv}], got shape {bias.shape}")
    bias = bias.reshape(N * Hv)
  y = depthwise_conv2d(v_map.reshape(B, Hh, Ww, N * Hv),
                       kernel.reshape(kernel.shape[0], kernel.shape[1], N * Hv), bias)
  return y.reshape(B, Hh, Ww, N, Hv)


def _map_shape(shape) -> tuple[int, int]:
  try:
    shape = tuple(int(s) for s in shape)
  except TypeError as e:
    raise ValueError(f"shape must be a pair (Hh, Ww) of positive ints, got shape={shape!r}") from e
  if len(shape) != 2 or any(s <= 0 for s in shape):
    raise ValueError(f"shape must be a pair (Hh, Ww) of positive ints, got shape={shape!r}")
  return shape


def relative_features_2d(shape) -> np.ndarray:
  """ConViT's relative-position features `r_ij = (dx, dy, dx^2 + dy^2)` of a token map.

  `dx = x_j - x_i` (column offset of key j from query i), `dy = y_j - y_i` (row offset),
  tokens row-major over `shape = (Hh, Ww)`. Returns float32 numpy `[T, T, 3]`, T = Hh*Ww.
  """
  shape = _map_shape(shape)
  yx = grid_coordinates(shape).astype(np.float32)  # [T, 2] (row, col)
  d = yx[None, :, :] - yx[:, None, :]  # [T(query), T(key), 2]
  dy, dx = d[..., 0], d[..., 1]
  return np.stack([dx, dy, dx * dx + dy * dy], axis=-1)


def convit_positional_logits(shape, v_pos: jax.Array) -> jax.Array:
  """Positional logits of GPSA: `p[n, i, j] = v_pos[n] . r_ij` (float32 `[N, T, T]`).

  Args:
    shape: the token map `(Hh, Ww)`.
    v_pos: `[N, 3]` learnable per-head vectors over `(dx, dy, dx^2 + dy^2)`.
  """
  _check_array("v_pos", v_pos, 2, "[N, 3]")
  if v_pos.shape[1] != 3:
    raise ValueError(f"v_pos must be [N, 3], got shape {v_pos.shape}")
  r = jnp.asarray(relative_features_2d(shape))
  return jnp.einsum("tsc,nc->nts", r, v_pos.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def convit_head_offsets(num_heads: int, *, locality_distance: int = 1) -> np.ndarray:
  """Attention centres `Delta_h = (dx, dy)` of the local initialisation, int `[N, 2]`.

  The first `k^2` heads (`k = floor(sqrt(N))`) take the offsets of a `k x k` grid centred on
  the query, `Delta_{h} = ((h % k) - c, (h // k) - c) * locality_distance` with
  `c = (k - 1) / 2` (half-integers for even k); the remaining heads are centred on 0.
  """
  if isinstance(num_heads, bool) or not isinstance(num_heads, (int, np.integer)) or num_heads <= 0:
    raise ValueError(f"num_heads must be a positive int, got num_heads={num_heads!r}")
  k = int(math.isqrt(int(num_heads)))
  c = (k - 1) / 2
  out = np.zeros((num_heads, 2), np.float32)
  for h in range(k * k):
    out[h] = ((h % k) - c, (h // k) - c)
  return out * locality_distance


def init_convit_v_pos(num_heads: int, *, locality_strength: float = 1.0,
                      locality_distance: int = 1) -> jax.Array:
  """Local initialisation of `v_pos` (ConViT; Cordonnier et al.'s quadratic encoding).

  `v_pos[h] = alpha (2 Delta_x, 2 Delta_y, -1)` so that
  `v_pos[h] . r_ij = -alpha |delta_ij - Delta_h|^2 + alpha |Delta_h|^2`: head h attends
  around the offset `Delta_h` (`convit_head_offsets`) with sharpness
  `alpha = locality_strength`. Returns float32 `[N, 3]`.
  """
  if not locality_strength > 0:
    raise ValueError(f"locality_strength must be > 0, got locality_strength={locality_strength!r}")
  delta = convit_head_offsets(num_heads, locality_distance=locality_distance)
  v = np.concatenate([2 * delta, -np.ones((num_heads, 1), np.float32)], axis=-1)
  return jnp.asarray(locality_strength * v, jnp.float32)


def gated_positional_attention(q: jax.Array, k: jax.Array, v: jax.Array, pos_logits: jax.Array,
                               gate_logit: jax.Array, *, scale=None,
                               implementation=None) -> jax.Array:
  """Gated positional self-attention (GPSA) of ConViT.

  `A_h = (1 - sigmoid(l_h)) softmax_j(s q_i . k_j) + sigmoid(l_h) softmax_j(p_h[i, j])`,
  `o_i = sum_j A_h[i, j] v_j` (each row of A sums to 1, so no renormalisation is needed).
  The content part runs through `attnjax.attention` (no [T, S] array on a fused path); the
  positional part is content-independent (one `[N, T, S]` softmax shared by the batch).

  Paper: "ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases"
  (d'Ascoli et al.).

  Args:
    q: `[B, T, N, H]`; k: `[B, S, K, H]`; v: `[B, S, K, Hv]` (GQA: N % K == 0).
    pos_logits: `[N, T, S]` positional scores (e.g. `convit_positional_logits`).
    gate_logit: `[N]` gating parameters `l_h`.
    scale: content logit scale (default `1/sqrt(H)`).
    implementation: forwarded to `attnjax.attention`.
  Returns:
    `[B, T, N, Hv]` in `q.dtype`.
  """
  for name, a, what in (("q", q, "[B, T, N, H]"), ("k", k, "[B, S, K, H]"),
                        ("v", v, "[B, S, K, Hv]")):
    _check_array(name, a, 4, what)
  B, T, N, _ = q.shape
  S, K = k.shape[1], k.shape[2]
  _check_array("pos_logits", pos_logits, 3, f"[N={N}, T={T}, S={S}]")
  if pos_logits.shape != (N, T, S):
    raise ValueError(f"pos_logits must be [N={N}, T={T}, S={S}], got shape {pos_logits.shape}")
  _check_array("gate_logit", gate_logit, 1, f"[N={N}]")
  if gate_logit.shape != (N,):
    raise ValueError(f"gate_logit must be [N={N}], got shape {gate_logit.shape}")
  if v.shape[:3] != (B, S, K) or k.shape[0] != B:
    raise ValueError(f"k and v must be [B={B}, S, K, .] with equal S and K, got k {k.shape}, "
                     f"v {v.shape}")
  content_BTNH = hooks.attention(q, k, v, scale=scale, implementation=implementation)
  G = N // K
  p_NTS = jax.nn.softmax(pos_logits.astype(jnp.float32), axis=-1)
  p_KGTS = p_NTS.reshape(K, G, T, S)
  pos_BTKGH = jnp.einsum("kgts,bskh->btkgh", p_KGTS, v.astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
  pos_BTNH = pos_BTKGH.reshape(B, T, N, v.shape[-1])
  g = jax.nn.sigmoid(gate_logit.astype(jnp.float32))[:, None]
  out = (1.0 - g) * content_BTNH.astype(jnp.float32) + g * pos_BTNH
  return out.astype(q.dtype)


def _rel_table(name, table, N, H):
  if not hasattr(table, "ndim"):
    raise TypeError(f"{name} must be an array [2R+1, H] or [N, 2R+1, H], got "
                    f"{type(table).__name__}")
  if table.ndim == 2:
    table = table[None]
  if table.ndim != 3 or table.shape[0] not in (1, N) or table.shape[2] != H:
    raise ValueError(f"{name} must be [2R+1, H={H}] or [N={N}, 2R+1, H={H}], got shape "
                     f"{table.shape}")
  if table.shape[1] % 2 == 0:
    raise ValueError(f"{name} must have an odd number 2R+1 of relative positions, got "
                     f"{table.shape[1]} (shape {table.shape})")
  return table


def _relative_qr(q, rel_h, rel_w, shape, scale):
  """`qr_h [B, N, T, 2Rh+1] = s q . rel_h`, `qr_w` likewise (float32) and the radii."""
  _check_array("q", q, 4, "[B, T, N, H]")
  B, T, N, H = q.shape
  Hh, Ww = _map_shape(shape)
  if Hh * Ww != T:
    raise ValueError(f"shape={(Hh, Ww)} has {Hh * Ww} tokens but q has T={T}")
  rel_h = _rel_table("rel_h", rel_h, N, H)
  rel_w = _rel_table("rel_w", rel_w, N, H)
  s = (1.0 / math.sqrt(H)) if scale is None else scale
  qf = q.astype(jnp.float32) * jnp.asarray(s, jnp.float32)
  def qr(table):
    table = jnp.broadcast_to(table, (N,) + table.shape[1:]).astype(jnp.float32)
    return jnp.einsum("btnh,nrh->bntr", qf, table, precision=jax.lax.Precision.HIGHEST)

  qr_h, qr_w = qr(rel_h), qr(rel_w)
  return qr_h, qr_w, (rel_h.shape[1] - 1) // 2, (rel_w.shape[1] - 1) // 2, (Hh, Ww)


def relative_logits_2d(q: jax.Array, rel_h: jax.Array, rel_w: jax.Array, shape, *,
                       scale=None) -> jax.Array:
  """BoTNet's 2D relative position logits as an explicit bias `[B, N, T, T]` (float32).

  `b[b, n, i, j] = s q_i . (rel_h[clip(y_j - y_i) + Rh] + rel_w[clip(x_j - x_i) + Rw])`,
  tokens row-major over `shape = (Hh, Ww)`, offsets clipped to `[-R, R]` (no clipping when
  `R >= L - 1`, the paper's `2L - 1` tables), `s = scale` (default `1/sqrt(H)`, the scale of
  the content logits, as BoTNet scales q once). Materialises `[T, T]` per head: use
  `relative_logits_2d_score_mod` on the fast path.

  Paper: "Bottleneck Transformers for Visual Recognition" (Srinivas et al.).

  Args:
    q: `[B, T, N, H]`; rel_h: `[2Rh+1, H]` (shared by heads) or `[N, 2Rh+1, H]`;
    rel_w: `[2Rw+1, H]` or `[N, 2Rw+1, H]`; shape: `(Hh, Ww)` with `Hh*Ww = T`.
  """
  qr_h, qr_w, Rh, Rw, (Hh, Ww) = _relative_qr(q, rel_h, rel_w, shape, scale)
  yx = grid_coordinates((Hh, Ww))
  dy = np.clip(yx[None, :, 0] - yx[:, None, 0], -Rh, Rh) + Rh  # [T, T]
  dx = np.clip(yx[None, :, 1] - yx[:, None, 1], -Rw, Rw) + Rw
  T = Hh * Ww
  rows = np.arange(T)[:, None]
  return qr_h[:, :, rows, dy] + qr_w[:, :, rows, dx]


def relative_logits_2d_score_mod(q: jax.Array, rel_h: jax.Array, rel_w: jax.Array, shape, *,
                                 scale=None) -> _score_mods.ScoreMod:
  """BoTNet's 2D relative logits as a score_mod (no `[T, T]` array is stored).

  Precomputes `qr_h = s q . rel_h [B, N, T, 2Rh+1]` and `qr_w [B, N, T, 2Rw+1]`
  (O(B N T (Hh + Ww)) memory) and adds `qr_h[b, n, i, dy_ij] + qr_w[b, n, i, dx_ij]` to
  each logit; the same term as `relative_logits_2d`. Differentiable in q, rel_h, rel_w.
  """
  qr_h, qr_w, Rh, Rw, (Hh, Ww) = _relative_qr(q, rel_h, rel_w, shape, scale)
  T = Hh * Ww

  def fn(score, b, h, q_idx, kv_idx):
    dy = jnp.clip(kv_idx // Ww - q_idx // Ww, -Rh, Rh) + Rh
    dx = jnp.clip(kv_idx % Ww - q_idx % Ww, -Rw, Rw) + Rw
    return score + qr_h[b, h, q_idx, dy] + qr_w[b, h, q_idx, dx]

  def check(Tq, S, N):
    if Tq != T or S != T or N != qr_h.shape[1]:
      raise ValueError(f"relative_logits_2d score_mod was built for T=S={T}, N={qr_h.shape[1]}; "
                       f"got T={Tq}, S={S}, N={N}")

  return _score_mods.ScoreMod(fn, f"relative_logits_2d{(Hh, Ww)}", check)


def botnet_attention(q: jax.Array, k: jax.Array, v: jax.Array, rel_h: jax.Array,
                     rel_w: jax.Array, shape, *, scale=None, implementation=None) -> jax.Array:
  """BoTNet's MHSA: `softmax_j(s q_i . (k_j + rel_h[dy_ij] + rel_w[dx_ij])) v_j`.

  Content and position logits `q k^T + q r^T` with `r = R_h + R_w` relative embeddings per
  axis, through `attnjax.attention` with `relative_logits_2d_score_mod`.

  Paper: "Bottleneck Transformers for Visual Recognition" (Srinivas et al.).

  Args:
    q: `[B, T, N, H]`; k: `[B, T, K, H]`; v: `[B, T, K, Hv]`; rel_h/rel_w as in
    `relative_logits_2d`; shape `(Hh, Ww)`, `Hh*Ww = T`.
  Returns:
    `[B, T, N, Hv]` in `q.dtype`.
  """
  mod = relative_logits_2d_score_mod(q, rel_h, rel_w, shape, scale=scale)
  return hooks.attention(q, k, v, score_mod=mod, scale=scale, implementation=implementation)
