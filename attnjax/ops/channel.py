"""Parameter-free cores of the CNN channel / spatial attention modules, on NHWC maps.

The modules themselves (SE, ECA, coordinate attention, ELA, CBAM, triplet attention,
polarized self-attention, LKA, LKCA, ULSAM, A^2N) are in `attnjax.layers.channel`; this
file holds the math they share that needs no parameters of its own, usable on its own:

- `eca_kernel_size(C)`: ECA's adaptive 1D kernel size `k = |log2(C)/gamma + b/gamma|_odd`.
- `coordinate_pool(x)`: the strip poolings of coordinate attention / ELA.
- `z_pool(x, axis)`: triplet attention's Z-pool (max and mean along one axis).
- `psa_channel_pool`, `psa_spatial_pool`: the two softmax contractions of polarized
  self-attention.
- `conv2d`, `depthwise_conv2d`, `channel_conv1d`, `strip_conv1d`, `max_pool_same`,
  `group_norm`, `layer_norm`: 'same'-padded convolutions and normalizations in NHWC.

Every function takes `x [B, Hh, Ww, C]` (or the shape it states) and computes in the dtype
it is given; the layers call them in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_nhwc", "check_odd", "eca_kernel_size", "coordinate_pool", "z_pool",
           "psa_channel_pool", "psa_spatial_pool", "conv2d", "depthwise_conv2d",
           "channel_conv1d", "strip_conv1d", "max_pool_same", "group_norm", "layer_norm",
           "conv_as_attention"]


def check_nhwc(x, name: str = "x", channels: int | None = None) -> None:
  """ValueError unless `x` is a rank-4 `[B, Hh, Ww, C]` map (with `C == channels`)."""
  shape = getattr(x, "shape", None)
  if shape is None or len(shape) != 4:
    raise ValueError(f"{name} must be a rank-4 [B, Hh, Ww, C] (NHWC) map, got shape {shape}")
  if channels is not None and shape[-1] != channels:
    raise ValueError(f"{name} must have C={channels} channels (last axis), got shape {shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")


def check_odd(name: str, k) -> int:
  """`k` if it is a positive odd int, else ValueError naming `name`."""
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0 or k % 2 == 0:
    raise ValueError(f"{name} must be a positive odd int (a centred 'same' kernel), "
                     f"got {name}={k!r}")
  return int(k)


def eca_kernel_size(channels: int, gamma: float = 2.0, b: float = 1.0) -> int:
  """ECA's adaptive kernel size `k = psi(C) = |log2(C)/gamma + b/gamma|_odd`.

  Paper: "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks"
  (Wang et al., 2020), eq. 12, with `gamma=2, b=1`. `|t|_odd` is taken as the paper's
  reference code does: truncate `t` to an int, then add 1 if that int is even (C=64 -> 3,
  C=128 -> 5, C=256 -> 5, C=512 -> 5).
  """
  if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels <= 0:
    raise ValueError(f"channels must be a positive int, got channels={channels!r}")
  if not gamma > 0:
    raise ValueError(f"gamma must be > 0, got gamma={gamma!r}")
  t = int(abs((math.log2(channels) + b) / gamma))
  return t if t % 2 else t + 1


def coordinate_pool(x):
  """Strip average pooling: `z_h [B, Hh, C] = mean_w x`, `z_w [B, Ww, C] = mean_h x`.

  Paper: "Coordinate Attention for Efficient Mobile Network Design" (Hou et al., 2021),
  eqs. 2-3 (also ELA's strip pooling).
  """
  check_nhwc(x)
  return jnp.mean(x, axis=2), jnp.mean(x, axis=1)


def z_pool(x, axis: int):
  """Triplet attention's Z-pool: `[max_a x, mean_a x]` along `axis` a (1, 2 or 3 of NHWC).

  Returns `[B, P, Q, 2]` where (P, Q) are the two remaining axes of (Hh, Ww, C) in order:
  axis=1 -> (Ww, C), axis=2 -> (Hh, C), axis=3 -> (Hh, Ww). Paper: "Rotate to Attend:
  Convolutional Triplet Attention Module" (Misra et al., 2021).
  """
  check_nhwc(x)
  if axis not in (1, 2, 3):
    raise ValueError(f"axis must be 1 (Hh), 2 (Ww) or 3 (C) of an NHWC map, got axis={axis!r}")
  return jnp.stack([jnp.max(x, axis=axis), jnp.mean(x, axis=axis)], axis=-1)


def psa_channel_pool(v, q):
  """PSA channel-only branch contraction: `z[b, c] = sum_hw v[b,h,w,c] softmax_hw(q)[b,h,w]`.

  `v [B, Hh, Ww, Cv]`, `q [B, Hh, Ww]` (logits of the 1-channel query) -> `[B, Cv]`; the
  softmax over all Hh*Ww positions is computed in float32. Paper: "Polarized
  Self-Attention: Towards High-quality Pixel-wise Regression" (Liu et al., 2021), eq. 1.
  """
  check_nhwc(v, "v")
  if q.shape != v.shape[:3]:
    raise ValueError(f"q must be [B, Hh, Ww]={v.shape[:3]}, got shape {q.shape}")
  B, Hh, Ww, _ = v.shape
  p = jax.nn.softmax(q.reshape(B, Hh * Ww).astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum("bn,bnc->bc", p, v.reshape(B, Hh * Ww, -1))


def psa_spatial_pool(v, q):
  """PSA spatial-only branch contraction: `a[b,h,w] = sum_c softmax_c(q)[b,c] v[b,h,w,c]`.

  `v [B, Hh, Ww, Cv]`, `q [B, Cv]` (globally pooled query) -> `[B, Hh, Ww]`; the softmax
  over the Cv channels is computed in float32. Paper: "Polarized Self-Attention", eq. 3.
  """
  check_nhwc(v, "v")
  if q.shape != (v.shape[0], v.shape[3]):
    raise ValueError(f"q must be [B, Cv]={(v.shape[0], v.shape[3])}, got shape {q.shape}")
  p = jax.nn.softmax(q.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum("bc,bhwc->bhw", p, v)


def _same_pad(k: int, dilation: int) -> tuple[int, int]:
  p = dilation * (k - 1) // 2
  return (p, p)


def conv2d(x, kernel, bias=None, *, dilation: int = 1, groups: int = 1):
  """'Same' 2D convolution, stride 1, zero padding: `x [B,Hh,Ww,Ci]`, `kernel [kh,kw,Ci/groups,Co]`
  (HWIO, odd kh and kw), `bias [Co]` -> `[B, Hh, Ww, Co]`."""
  check_nhwc(x)
  kh, kw = kernel.shape[:2]
  check_odd("kernel height", kh)
  check_odd("kernel width", kw)
  y = jax.lax.conv_general_dilated(
      x, kernel.astype(x.dtype), window_strides=(1, 1),
      padding=(_same_pad(kh, dilation), _same_pad(kw, dilation)), rhs_dilation=(dilation, dilation),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
      precision=jax.lax.Precision.HIGHEST)
  return y if bias is None else y + bias.astype(x.dtype)


def depthwise_conv2d(x, kernel, bias=None, *, dilation: int = 1):
  """'Same' depthwise convolution: `kernel [kh, kw, 1, C]` (one filter per channel)."""
  return conv2d(x, kernel, bias, dilation=dilation, groups=x.shape[-1])


def strip_conv1d(z, kernel, *, groups: int = 1):
  """'Same' 1D convolution along the middle axis: `z [B, L, Ci]`, `kernel [k, Ci/groups, Co]`
  -> `[B, L, Co]` (ELA's shared strip convolution)."""
  k = check_odd("kernel size", kernel.shape[0])
  return jax.lax.conv_general_dilated(
      z, kernel.astype(z.dtype), window_strides=(1,), padding=(_same_pad(k, 1),),
      dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups,
      precision=jax.lax.Precision.HIGHEST)


def channel_conv1d(y, kernel):
  """ECA's 1D convolution across channels: `y [B, C]`, `kernel [k]` (odd) ->
  `out[b, c] = sum_j kernel[j] y[b, c + j - (k-1)/2]`, zero padded."""
  return strip_conv1d(y[:, :, None], kernel.reshape(-1, 1, 1))[:, :, 0]


def max_pool_same(x, k: int):
  """`k x k` max pooling, stride 1, padded with -inf ('same' size): `[B,Hh,Ww,C]` -> same."""
  check_odd("pool size", k)
  p = (k - 1) // 2
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, 1, 1, 1),
                               ((0, 0), (p, p), (p, p), (0, 0)))


def group_norm(x, groups: int, scale, bias, *, eps: float = 1e-5):
  """GroupNorm ("Group Normalization", Wu & He, 2018) of `x [B, ..., C]`: per example and
  per group of C/groups channels, normalize over all positions and the group's channels;
  then `* scale [C] + bias [C]`."""
  C = x.shape[-1]
  if C % groups:
    raise ValueError(f"groups={groups} must divide the {C} channels")
  xg = x.reshape(x.shape[:-1] + (groups, C // groups))
  axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
  mean = jnp.mean(xg, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
  y = ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape)
  return y * scale.astype(x.dtype) + bias.astype(x.dtype)


def layer_norm(x, scale, bias, *, eps: float = 1e-5):
  """LayerNorm over the last axis: `(x - mean) / sqrt(var + eps) * scale + bias`."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale.astype(x.dtype) + bias.astype(x.dtype)


def conv_as_attention(x, kernel):
  """LKCA's attention view of a 'same' depthwise convolution: `y_i = sum_j A_ij x_j` with
  the input-independent, translation-invariant attention matrix
  `A[c, (h,w), (h',w')] = kernel[h'-h+p, w'-w+p, 0, c]` when |h'-h|, |w'-w| <= p = (k-1)/2
  and 0 otherwise (zero padding = keys outside the map are absent).

  `x [B, Hh, Ww, C]`, `kernel [k, k, 1, C]` (odd k) -> `[B, Hh, Ww, C]`, equal to
  `depthwise_conv2d(x, kernel)`. Builds the `[C, Hh*Ww, Hh*Ww]` matrix: for small maps.
  Paper: "LKCA: Large Kernel Convolutional Attention" (Li et al., 2024).
  """
  check_nhwc(x)
  k = check_odd("kernel size", kernel.shape[0])
  if kernel.shape != (k, k, 1, x.shape[-1]):
    raise ValueError(f"kernel must be [k, k, 1, C]={(k, k, 1, x.shape[-1])}, got {kernel.shape}")
  B, Hh, Ww, C = x.shape
  p = (k - 1) // 2
  hh, ww = np.meshgrid(np.arange(Hh), np.arange(Ww), indexing="ij")
  dh = hh.reshape(-1)[None, :] - hh.reshape(-1)[:, None] + p   # [query i, key j]
  dw = ww.reshape(-1)[None, :] - ww.reshape(-1)[:, None] + p
  inside = (dh >= 0) & (dh < k) & (dw >= 0) & (dw < k)
  a_CNN = kernel[np.clip(dh, 0, k - 1), np.clip(dw, 0, k - 1), 0, :]   # [N, N, C]
  a_CNN = jnp.where(inside[..., None], a_CNN.astype(x.dtype), 0).transpose(2, 0, 1)
  y = jnp.einsum("cij,bjc->bic", a_CNN, x.reshape(B, Hh * Ww, C))
  return y.reshape(B, Hh, Ww, C)
