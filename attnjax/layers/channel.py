"""CNN channel / spatial attention modules on NHWC maps `[B, Hh, Ww, C]`, Flax NNX.

    >>> from attnjax.layers import channel
    >>> se = channel.get_module("se")(16, reduction=4, rngs=nnx.Rngs(0))
    >>> y = se(x_BHWC)                                  # [B, Hh, Ww, 16], same dtype as x

| name | module | paper |
|---|---|---|
| 'se' | `SqueezeExcitation` | Squeeze-and-Excitation Networks |
| 'eca' | `EfficientChannelAttention` | ECA-Net: Efficient Channel Attention for Deep CNNs |
| 'coord' | `CoordinateAttention` | Coordinate Attention for Efficient Mobile Network Design |
| 'ela' | `EfficientLocalAttention` | ELA: Efficient Local Attention for Deep CNNs |
| 'cbam' | `CBAM` | CBAM: Convolutional Block Attention Module |
| 'triplet' | `TripletAttention` | Rotate to Attend: Convolutional Triplet Attention Module |
| 'psa_parallel', 'psa_sequential' | `PolarizedSelfAttention` | Polarized Self-Attention |
| 'lka' | `LargeKernelAttention` | Visual Attention Network |
| 'lkca' | `LargeKernelConvAttention` | LKCA: Large Kernel Convolutional Attention |
| 'ulsam' | `ULSAM` | ULSAM: Ultra-Lightweight Subspace Attention Module |
| 'a2n' | `AttentionInAttention` | Attention in Attention Network for Image Super-Resolution |
| 'sdlska' | `SparseLargeSeparableKernelAttention` | BEVANet (SDLSKA + CKS) |
| 'gcg' | `GuidedContextGating` | Guided Context Gating |

Every module is `Module(channels, *, rngs, param_dtype=float32, **options)` and is called
as `module(x [B, Hh, Ww, C], *, deterministic=True) -> [B, Hh, Ww, C]`. Each one is a
frozen config dataclass (`*Config`: options, validation, `specs()` -> parameter specs,
`apply(params, x)` -> the math) wrapped by the NNX module here and by its Linen twin in
`attnjax.layers.channel_linen` (same parameter names, shapes and initialisers), so the two
agree exactly. The math runs in float32 and the output has x's dtype. The parameter-free
cores are in `attnjax.ops.channel`.

Batch normalization, where a paper uses it (coordinate attention, triplet attention), is
replaced by GroupNorm (a batch-independent normalization with the same learned per-channel
affine), because the attnjax trainer keeps no mutable batch statistics.

Registry: `MODULES` (name -> factory), `get_module(name)` (ValueError with close matches),
`names()`, `build(name, channels, *, rngs, **options)`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax.layers._core import ParamSpec
from attnjax.layers.attention import make_param
from attnjax.ops import channel as ops

__all__ = ["SqueezeExcitation", "EfficientChannelAttention", "CoordinateAttention",
           "EfficientLocalAttention", "CBAM", "TripletAttention", "PolarizedSelfAttention",
           "LargeKernelAttention", "LargeKernelConvAttention", "ULSAM", "AttentionInAttention",
           "SparseLargeSeparableKernelAttention", "GuidedContextGating", "MODULES", "CONFIGS",
           "get_module", "names", "build", "forward"]


# ----------------------------------------------------------------------------- helpers

def _fan_in_init(fan_in: int):
  """Truncated normal with variance 1/fan_in (the `Dense` default, for any shape)."""
  std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # stddev of a unit normal cut at +-2

  def init(key, shape, dtype=jnp.float32):
    return jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype) * std
  return init


def _zeros(key, shape, dtype=jnp.float32):
  del key
  return jnp.zeros(shape, dtype)


def _ones(key, shape, dtype=jnp.float32):
  del key
  return jnp.ones(shape, dtype)


def _spec(shape, init) -> ParamSpec:
  return ParamSpec(tuple(shape), init, (None,) * len(shape))


def _weight(*shape, fan_in=None):
  """A weight spec; fan_in defaults to the product of all but the last dimension."""
  return _spec(shape, _fan_in_init(fan_in or int(np.prod(shape[:-1]))))


def _check_channels(channels) -> None:
  if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels <= 0:
    raise ValueError(f"channels must be a positive int, got channels={channels!r}")


def _positive(name, value) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{name} must be a positive int, got {name}={value!r}")


def _divides(name, value, channels, what="channels") -> None:
  _positive(name, value)
  if channels % value:
    raise ValueError(f"{name}={value} must divide the {channels} {what} (C % {name} == 0)")


def _mean_hw(x):
  return jnp.mean(x, axis=(1, 2))


def _dense(x, w, b=None):
  y = jnp.einsum("...i,io->...o", x, w, precision=jax.lax.Precision.HIGHEST)
  return y if b is None else y + b


# ----------------------------------------------------------------------------- configs

@dataclasses.dataclass(frozen=True)
class SEConfig:
  """Squeeze-and-excitation options: `reduction` r (C % r == 0; hidden width C/r)."""

  channels: int
  reduction: int = 16

  def __post_init__(self):
    _check_channels(self.channels)
    _divides("reduction", self.reduction, self.channels)

  def specs(self):
    C, h = self.channels, self.channels // self.reduction
    return {"w1": _weight(C, h), "b1": _spec((h,), _zeros),
            "w2": _weight(h, C), "b2": _spec((C,), _zeros)}

  def apply(self, p, x):
    s_BC = _mean_hw(x)
    g_BC = jax.nn.sigmoid(_dense(jax.nn.relu(_dense(s_BC, p["w1"], p["b1"])), p["w2"], p["b2"]))
    return x * g_BC[:, None, None, :]


@dataclasses.dataclass(frozen=True)
class ECAConfig:
  """ECA options: `kernel_size` (odd; None = adaptive `ops.eca_kernel_size(C, gamma, b)`)."""

  channels: int
  kernel_size: int | None = None
  gamma: float = 2.0
  b: float = 1.0

  def __post_init__(self):
    _check_channels(self.channels)
    if self.kernel_size is not None:
      ops.check_odd("kernel_size", self.kernel_size)
    else:
      ops.eca_kernel_size(self.channels, self.gamma, self.b)

  @property
  def k(self) -> int:
    if self.kernel_size is not None:
      return self.kernel_size
    return ops.eca_kernel_size(self.channels, self.gamma, self.b)

  def specs(self):
    return {"kernel": _spec((self.k,), _fan_in_init(self.k))}

  def apply(self, p, x):
    g_BC = jax.nn.sigmoid(ops.channel_conv1d(_mean_hw(x), p["kernel"]))
    return x * g_BC[:, None, None, :]


@dataclasses.dataclass(frozen=True)
class CoordConfig:
  """Coordinate attention options: `reduction` r and `min_channels`; the hidden width is
  `mip = max(min_channels, C // r)` (the paper's code: r=32, 8)."""

  channels: int
  reduction: int = 32
  min_channels: int = 8

  def __post_init__(self):
    _check_channels(self.channels)
    _positive("reduction", self.reduction)
    _positive("min_channels", self.min_channels)

  @property
  def mip(self) -> int:
    return max(self.min_channels, self.channels // self.reduction)

  def specs(self):
    C, m = self.channels, self.mip
    return {"w1": _weight(C, m), "b1": _spec((m,), _zeros),
            "norm_scale": _spec((m,), _ones), "norm_bias": _spec((m,), _zeros),
            "wh": _weight(m, C), "bh": _spec((C,), _zeros),
            "ww": _weight(m, C), "bw": _spec((C,), _zeros)}

  def apply(self, p, x):
    Hh = x.shape[1]
    zh_BHC, zw_BWC = ops.coordinate_pool(x)
    f = _dense(jnp.concatenate([zh_BHC, zw_BWC], axis=1), p["w1"], p["b1"])  # [B, Hh+Ww, mip]
    f = jax.nn.hard_swish(ops.group_norm(f, 1, p["norm_scale"], p["norm_bias"]))
    gh_BHC = jax.nn.sigmoid(_dense(f[:, :Hh], p["wh"], p["bh"]))
    gw_BWC = jax.nn.sigmoid(_dense(f[:, Hh:], p["ww"], p["bw"]))
    return x * gh_BHC[:, :, None, :] * gw_BWC[:, None, :, :]


_ELA_VARIANTS = {  # name: (kernel_size, conv groups as a function of C, GroupNorm groups)
    "T": (5, lambda c: c, 32), "B": (7, lambda c: c, 16),
    "S": (5, lambda c: c // 8, 16), "L": (7, lambda c: c // 8, 16),
}


@dataclasses.dataclass(frozen=True)
class ELAConfig:
  """ELA options: `variant` 'T' | 'B' | 'S' | 'L' (kernel 5/7; depthwise or C/8-grouped
  strip convolution; 32/16 GroupNorm groups), each overridable by `kernel_size`,
  `conv_groups`, `norm_groups` (all must divide C; the kernel must be odd)."""

  channels: int
  variant: str = "T"
  kernel_size: int | None = None
  conv_groups: int | None = None
  norm_groups: int | None = None

  def __post_init__(self):
    _check_channels(self.channels)
    if self.variant not in _ELA_VARIANTS:
      raise ValueError(f"variant must be one of {sorted(_ELA_VARIANTS)}, "
                       f"got variant={self.variant!r}")
    k, g, n = self.resolved
    ops.check_odd("kernel_size", k)
    _divides("conv_groups", g, self.channels)
    _divides("norm_groups", n, self.channels)

  @property
  def resolved(self) -> tuple:
    k, g, n = _ELA_VARIANTS[self.variant]
    return (self.kernel_size if self.kernel_size is not None else k,
            self.conv_groups if self.conv_groups is not None else g(self.channels),
            self.norm_groups if self.norm_groups is not None else n)

  def specs(self):
    k, g, _ = self.resolved
    C = self.channels
    return {"kernel": _weight(k, C // g, C), "norm_scale": _spec((C,), _ones),
            "norm_bias": _spec((C,), _zeros)}

  def apply(self, p, x):
    _, g, n = self.resolved
    zh_BHC, zw_BWC = ops.coordinate_pool(x)
    gate = lambda z: jax.nn.sigmoid(ops.group_norm(ops.strip_conv1d(z, p["kernel"], groups=g), n,
                                                   p["norm_scale"], p["norm_bias"]))
    return x * gate(zh_BHC)[:, :, None, :] * gate(zw_BWC)[:, None, :, :]


@dataclasses.dataclass(frozen=True)
class CBAMConfig:
  """CBAM options: `reduction` r of the shared channel MLP (C % r == 0) and the odd
  `spatial_kernel` (7 in the paper)."""

  channels: int
  reduction: int = 16
  spatial_kernel: int = 7

  def __post_init__(self):
    _check_channels(self.channels)
    _divides("reduction", self.reduction, self.channels)
    ops.check_odd("spatial_kernel", self.spatial_kernel)

  def specs(self):
    C, h, k = self.channels, self.channels // self.reduction, self.spatial_kernel
    return {"w1": _weight(C, h), "b1": _spec((h,), _zeros), "w2": _weight(h, C),
            "b2": _spec((C,), _zeros), "conv": _weight(k, k, 2, 1)}

  def apply(self, p, x):
    mlp = lambda s: _dense(jax.nn.relu(_dense(s, p["w1"], p["b1"])), p["w2"], p["b2"])
    mc_BC = jax.nn.sigmoid(mlp(_mean_hw(x)) + mlp(jnp.max(x, axis=(1, 2))))
    x1 = x * mc_BC[:, None, None, :]
    s_BHW2 = jnp.stack([jnp.mean(x1, axis=-1), jnp.max(x1, axis=-1)], axis=-1)
    return x1 * jax.nn.sigmoid(ops.conv2d(s_BHW2, p["conv"]))


_TRIPLET_BRANCHES = (("h", 1), ("w", 2), ("c", 3))  # (name, NHWC axis pooled by Z-pool)


@dataclasses.dataclass(frozen=True)
class TripletConfig:
  """Triplet attention options: the odd `kernel_size` of each branch's conv (7)."""

  channels: int
  kernel_size: int = 7

  def __post_init__(self):
    _check_channels(self.channels)
    ops.check_odd("kernel_size", self.kernel_size)

  def specs(self):
    k, out = self.kernel_size, {}
    for b, _ in _TRIPLET_BRANCHES:
      out[f"conv_{b}"] = _weight(k, k, 2, 1)
      out[f"norm_scale_{b}"] = _spec((1,), _ones)
      out[f"norm_bias_{b}"] = _spec((1,), _zeros)
    return out

  def apply(self, p, x):
    y = jnp.zeros_like(x)
    for b, axis in _TRIPLET_BRANCHES:
      m_BPQ1 = ops.conv2d(ops.z_pool(x, axis), p[f"conv_{b}"])
      g = jax.nn.sigmoid(ops.group_norm(m_BPQ1, 1, p[f"norm_scale_{b}"], p[f"norm_bias_{b}"]))
      y = y + x * jnp.expand_dims(g[..., 0], axis)
    return y / 3.0


@dataclasses.dataclass(frozen=True)
class PSAConfig:
  """Polarized self-attention options: `mode` 'parallel' | 'sequential'; C must be even."""

  channels: int
  mode: str = "parallel"

  def __post_init__(self):
    _check_channels(self.channels)
    if self.channels % 2:
      raise ValueError(f"channels must be even (PSA's inner width is C/2), "
                       f"got channels={self.channels}")
    if self.mode not in ("parallel", "sequential"):
      raise ValueError(f"mode must be 'parallel' or 'sequential', got mode={self.mode!r}")

  def specs(self):
    C, h = self.channels, self.channels // 2
    return {"ch_wq": _weight(C, 1), "ch_wv": _weight(C, h), "ch_wz": _weight(h, C),
            "ch_norm_scale": _spec((C,), _ones), "ch_norm_bias": _spec((C,), _zeros),
            "sp_wq": _weight(C, h), "sp_wv": _weight(C, h)}

  @staticmethod
  def channel_weights(p, x):
    """`A^ch [B, C] = sigmoid(LN(W_z (W_v x) softmax_hw(W_q x)))`."""
    z_Bh = ops.psa_channel_pool(_dense(x, p["ch_wv"]), _dense(x, p["ch_wq"])[..., 0])
    return jax.nn.sigmoid(ops.layer_norm(_dense(z_Bh, p["ch_wz"]), p["ch_norm_scale"],
                                         p["ch_norm_bias"]))

  @staticmethod
  def spatial_weights(p, x):
    """`A^sp [B, Hh, Ww] = sigmoid(softmax_c(GAP(W_q x)) . W_v x)`."""
    q_Bh = _dense(_mean_hw(x), p["sp_wq"])
    return jax.nn.sigmoid(ops.psa_spatial_pool(_dense(x, p["sp_wv"]), q_Bh))

  def apply(self, p, x):
    z_ch = x * self.channel_weights(p, x)[:, None, None, :]
    if self.mode == "sequential":
      return z_ch * self.spatial_weights(p, z_ch)[..., None]
    return z_ch + x * self.spatial_weights(p, x)[..., None]


@dataclasses.dataclass(frozen=True)
class LKAConfig:
  """LKA options: the depthwise `kernel_size` (5), the depthwise dilated
  `dilated_kernel_size` (7) and its `dilation` (3); kernels odd."""

  channels: int
  kernel_size: int = 5
  dilated_kernel_size: int = 7
  dilation: int = 3

  def __post_init__(self):
    _check_channels(self.channels)
    ops.check_odd("kernel_size", self.kernel_size)
    ops.check_odd("dilated_kernel_size", self.dilated_kernel_size)
    _positive("dilation", self.dilation)

  def specs(self):
    C, k, kd = self.channels, self.kernel_size, self.dilated_kernel_size
    return {"conv0": _weight(k, k, 1, C, fan_in=k * k), "conv0_bias": _spec((C,), _zeros),
            "conv_spatial": _weight(kd, kd, 1, C, fan_in=kd * kd),
            "conv_spatial_bias": _spec((C,), _zeros),
            "conv1": _weight(C, C), "conv1_bias": _spec((C,), _zeros)}

  def apply(self, p, x):
    a = ops.depthwise_conv2d(x, p["conv0"], p["conv0_bias"])
    a = ops.depthwise_conv2d(a, p["conv_spatial"], p["conv_spatial_bias"], dilation=self.dilation)
    return x * _dense(a, p["conv1"], p["conv1_bias"])


@dataclasses.dataclass(frozen=True)
class LKCAConfig:
  """LKCA options: the odd `kernel_size` of the single depthwise convolution (7)."""

  channels: int
  kernel_size: int = 7

  def __post_init__(self):
    _check_channels(self.channels)
    ops.check_odd("kernel_size", self.kernel_size)

  def specs(self):
    C, k = self.channels, self.kernel_size
    return {"kernel": _weight(k, k, 1, C, fan_in=k * k), "bias": _spec((C,), _zeros)}

  def apply(self, p, x):
    return ops.depthwise_conv2d(x, p["kernel"], p["bias"])


@dataclasses.dataclass(frozen=True)
class ULSAMConfig:
  """ULSAM options: the number of `subspaces` g (C % g == 0)."""

  channels: int
  subspaces: int = 4

  def __post_init__(self):
    _check_channels(self.channels)
    _divides("subspaces", self.subspaces, self.channels)

  def specs(self):
    C, g = self.channels, self.subspaces
    return {"dw_scale": _spec((C,), _fan_in_init(1)), "dw_bias": _spec((C,), _zeros),
            "pw": _weight(g, C // g, fan_in=C // g)}

  def apply(self, p, x):
    B, Hh, Ww, C = x.shape
    g = self.subspaces
    m = ops.max_pool_same(x * p["dw_scale"] + p["dw_bias"], 3).reshape(B, Hh, Ww, g, C // g)
    logits_BNG = jnp.einsum("bhwgj,gj->bhwg", m, p["pw"],
                            precision=jax.lax.Precision.HIGHEST).reshape(B, Hh * Ww, g)
    a_BHWG = jax.nn.softmax(logits_BNG, axis=1).reshape(B, Hh, Ww, g, 1)
    xg = x.reshape(B, Hh, Ww, g, C // g)
    return (xg * a_BHWG + xg).reshape(B, Hh, Ww, C)


@dataclasses.dataclass(frozen=True)
class A2NConfig:
  """A^2N attention-in-attention block options: `reduction` r of the dynamic-attention
  MLP (C % r == 0), softmax `temperature` (> 0), LeakyReLU `negative_slope`."""

  channels: int
  reduction: int = 4
  temperature: float = 1.0
  negative_slope: float = 0.2

  def __post_init__(self):
    _check_channels(self.channels)
    _divides("reduction", self.reduction, self.channels)
    if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
      raise ValueError(f"temperature must be > 0, got temperature={self.temperature!r}")

  def specs(self):
    C, h = self.channels, self.channels // self.reduction
    return {"first": _weight(C, C), "adm_w1": _weight(C, h), "adm_w2": _weight(h, 2),
            "att_k1": _weight(3, 3, C, C), "att_k2": _weight(C, C),
            "att_k2_bias": _spec((C,), _zeros), "att_k3": _weight(3, 3, C, C),
            "att_k4": _weight(3, 3, C, C), "non_att": _weight(3, 3, C, C), "last": _weight(C, C)}

  def branch_weights(self, p, h):
    """`pi [B, 2] = softmax(W2 relu(W1 GAP(h)) / T)` (attention, non-attention)."""
    return jax.nn.softmax(_dense(jax.nn.relu(_dense(_mean_hw(h), p["adm_w1"])), p["adm_w2"])
                          / self.temperature, axis=-1)

  def apply(self, p, x):
    lrelu = functools.partial(jax.nn.leaky_relu, negative_slope=self.negative_slope)
    h = lrelu(_dense(x, p["first"]))
    pi_B2 = self.branch_weights(p, h)
    gate = jax.nn.sigmoid(_dense(lrelu(ops.conv2d(h, p["att_k1"])), p["att_k2"], p["att_k2_bias"]))
    att = ops.conv2d(ops.conv2d(h, p["att_k3"]) * gate, p["att_k4"])
    non = ops.conv2d(h, p["non_att"])
    mixed = pi_B2[:, 0, None, None, None] * att + pi_B2[:, 1, None, None, None] * non
    return _dense(lrelu(mixed), p["last"]) + x


@dataclasses.dataclass(frozen=True)
class SDLSKAConfig:
  """SDLSKA + CKS options: the separable depthwise `kernel_size` (5), the separable
  dilated `dilated_kernel_size` (7), one receptive-field branch per entry of `dilations`
  ((2, 3); at least 2 for a selection), the selection MLP's `reduction` (4, divides C)."""

  channels: int
  kernel_size: int = 5
  dilated_kernel_size: int = 7
  dilations: tuple = (2, 3)
  reduction: int = 4

  def __post_init__(self):
    _check_channels(self.channels)
    ops.check_odd("kernel_size", self.kernel_size)
    ops.check_odd("dilated_kernel_size", self.dilated_kernel_size)
    d = self.dilations
    if (not isinstance(d, (tuple, list)) or len(d) < 2
        or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in d)):
      raise ValueError(f"dilations must be a tuple of at least 2 positive ints (one branch "
                       f"each), got dilations={d!r}")
    object.__setattr__(self, "dilations", tuple(d))
    _divides("reduction", self.reduction, self.channels)

  def specs(self):
    C, k, kd = self.channels, self.kernel_size, self.dilated_kernel_size
    out = {"conv0_h": _weight(1, k, 1, C, fan_in=k), "conv0_v": _weight(k, 1, 1, C, fan_in=k),
           "conv0_bias": _spec((C,), _zeros)}
    for i in range(len(self.dilations)):
      out[f"branch{i}_h"] = _weight(1, kd, 1, C, fan_in=kd)
      out[f"branch{i}_v"] = _weight(kd, 1, 1, C, fan_in=kd)
      out[f"branch{i}_bias"] = _spec((C,), _zeros)
    h = C // self.reduction
    out.update(select_w1=_weight(C, h), select_b1=_spec((h,), _zeros),
               select_w2=_weight(h, len(self.dilations) * C),
               conv1=_weight(C, C), conv1_bias=_spec((C,), _zeros))
    return out

  def branches(self, p, x):
    """The separable large-kernel branches `[n, B, Hh, Ww, C]` (one per dilation)."""
    a = ops.depthwise_conv2d(ops.depthwise_conv2d(x, p["conv0_h"]), p["conv0_v"], p["conv0_bias"])
    return jnp.stack([
        ops.depthwise_conv2d(ops.depthwise_conv2d(a, p[f"branch{i}_h"], dilation=d),
                             p[f"branch{i}_v"], p[f"branch{i}_bias"], dilation=d)
        for i, d in enumerate(self.dilations)])

  def selection(self, p, b_nBHWC):
    """CKS weights `[n, B, C]`: a softmax over the branches, per example and channel, of
    `W2 relu(W1 GAP(sum_i b_i) + b1)`."""
    n, B, C = len(self.dilations), b_nBHWC.shape[1], self.channels
    s = _mean_hw(jnp.sum(b_nBHWC, axis=0))
    z = _dense(jax.nn.relu(_dense(s, p["select_w1"], p["select_b1"])), p["select_w2"])
    return jax.nn.softmax(z.reshape(B, n, C), axis=1).transpose(1, 0, 2)

  def apply(self, p, x):
    b = self.branches(p, x)
    w = self.selection(p, b)
    mixed = jnp.sum(w[:, :, None, None, :] * b, axis=0)
    return x * _dense(mixed, p["conv1"], p["conv1_bias"])


@dataclasses.dataclass(frozen=True)
class GCGConfig:
  """Guided context gating options: the channel-correlation bottleneck `reduction` (4,
  divides C) and the odd `kernel_size` (3) of the local depthwise context."""

  channels: int
  reduction: int = 4
  kernel_size: int = 3

  def __post_init__(self):
    _check_channels(self.channels)
    _divides("reduction", self.reduction, self.channels)
    ops.check_odd("kernel_size", self.kernel_size)

  def specs(self):
    C, h, k = self.channels, self.channels // self.reduction, self.kernel_size
    return {"context_w": _weight(C, 1), "corr_w1": _weight(C, h), "corr_b1": _spec((h,), _zeros),
            "corr_norm_scale": _spec((h,), _ones), "corr_norm_bias": _spec((h,), _zeros),
            "corr_w2": _weight(h, C), "corr_b2": _spec((C,), _zeros),
            "local": _weight(k, k, 1, C, fan_in=k * k), "local_bias": _spec((C,), _zeros)}

  def context(self, p, x):
    """Global context `c [B, C] = sum_p softmax_p(w_k . x_p) x_p` (attention pooling)."""
    B, Hh, Ww, C = x.shape
    a_BP = jax.nn.softmax(_dense(x, p["context_w"]).reshape(B, Hh * Ww), axis=-1)
    return jnp.einsum("bp,bpc->bc", a_BP, x.reshape(B, Hh * Ww, C),
                      precision=jax.lax.Precision.HIGHEST)

  def apply(self, p, x):
    t = _dense(self.context(p, x), p["corr_w1"], p["corr_b1"])
    t = _dense(jax.nn.relu(ops.layer_norm(t, p["corr_norm_scale"], p["corr_norm_bias"])),
               p["corr_w2"], p["corr_b2"])
    local = ops.depthwise_conv2d(x, p["local"], p["local_bias"])
    return x * jax.nn.sigmoid(local + t[:, None, None, :])


# ----------------------------------------------------------------------------- modules

def forward(config, params: dict, x):
  """The shared forward of both twins: checks `x [B, Hh, Ww, C]`, runs `config.apply` in
  float32 and returns x's dtype."""
  ops.check_nhwc(x, "x", config.channels)
  p32 = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
  return config.apply(p32, x.astype(jnp.float32)).astype(x.dtype)


def make_config(config_cls, channels, options: dict):
  """`config_cls(channels, **options)`, with a TypeError naming unknown options."""
  fields = [f.name for f in dataclasses.fields(config_cls) if f.name != "channels"]
  unknown = sorted(set(options) - set(fields))
  if unknown:
    raise TypeError(f"unknown option(s) {unknown} for {config_cls.__name__}; expected some of "
                    f"{fields}")
  return config_cls(channels, **options)


class _ChannelModule(nnx.Module):
  CONFIG: ClassVar[type]

  def __init__(self, channels: int, *, rngs: nnx.Rngs, param_dtype: Any = jnp.float32, **options):
    if not isinstance(rngs, nnx.Rngs):
      raise TypeError(f"rngs must be an nnx.Rngs, got {type(rngs).__name__}")
    self.config = make_config(self.CONFIG, channels, options)
    specs = self.config.specs()
    self._param_names = tuple(specs)
    for name, spec in specs.items():
      setattr(self, name, make_param(rngs, spec, param_dtype))

  @property
  def params(self) -> dict:
    return {n: getattr(self, n)[...] for n in self._param_names}

  def __call__(self, x, *, deterministic: bool = True):
    del deterministic  # no dropout: the same output in training and evaluation
    return forward(self.config, self.params, x)


class SqueezeExcitation(_ChannelModule):
  """Squeeze-and-excitation. Paper: "Squeeze-and-Excitation Networks" (Hu et al., 2018).

  `s = GAP(x) [B, C]`; `g = sigmoid(W2 relu(W1 s + b1) + b2)`, `W1 [C, C/r]`, `W2 [C/r, C]`;
  `y = x * g` (broadcast over Hh, Ww). Options: reduction=16 (must divide C).
  """

  CONFIG = SEConfig


class EfficientChannelAttention(_ChannelModule):
  """ECA. Paper: "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural
  Networks" (Wang et al., 2020).

  `y = x * sigmoid(Conv1D_k(GAP(x)))`: a k-tap convolution across the channel axis (zero
  padded, no bias, no dimensionality reduction); `k = |log2(C)/gamma + b/gamma|_odd`
  (`attnjax.ops.channel.eca_kernel_size`, gamma=2, b=1) unless `kernel_size` (odd) is given.
  Parameter `kernel [k]`.
  """

  CONFIG = ECAConfig


class CoordinateAttention(_ChannelModule):
  """Coordinate attention. Paper: "Coordinate Attention for Efficient Mobile Network Design"
  (Hou et al., 2021).

  `z^h = mean_w x [B, Hh, C]`, `z^w = mean_h x [B, Ww, C]`;
  `f = hswish(Norm(W1 [z^h; z^w] + b1))` `[B, Hh+Ww, mip]`, `mip = max(8, C // r)`;
  `g^h = sigmoid(W_h f^h + b_h)`, `g^w = sigmoid(W_w f^w + b_w)`; `y = x * g^h * g^w`.
  Norm: GroupNorm with one group over the concatenated strip (the paper's BN, see the
  module docstring). Options: reduction=32, min_channels=8.
  """

  CONFIG = CoordConfig


class EfficientLocalAttention(_ChannelModule):
  """ELA. Paper: "ELA: Efficient Local Attention for Deep Convolutional Neural Networks"
  (Xu & Wan, 2024).

  `y^h = sigmoid(GN(Conv1D_k(z^h)))`, `y^w = sigmoid(GN(Conv1D_k(z^w)))` with the strip
  poolings `z^h = mean_w x [B, Hh, C]`, `z^w = mean_h x [B, Ww, C]`, one shared (grouped)
  1D convolution along the strip and one shared GroupNorm; `y = x * y^h * y^w`. No channel
  reduction. Options: variant 'T' | 'B' | 'S' | 'L', or kernel_size / conv_groups /
  norm_groups.
  """

  CONFIG = ELAConfig


class CBAM(_ChannelModule):
  """CBAM. Paper: "CBAM: Convolutional Block Attention Module" (Woo et al., 2018).

  Channel: `M_c = sigmoid(MLP(AvgPool_hw x) + MLP(MaxPool_hw x))` (shared MLP C -> C/r -> C,
  ReLU); `x' = M_c * x`. Spatial: `M_s = sigmoid(Conv_{7x7}([mean_c x'; max_c x']))`
  (2 -> 1 channels, no bias); `y = M_s * x'`. Options: reduction=16, spatial_kernel=7.
  """

  CONFIG = CBAMConfig


class TripletAttention(_ChannelModule):
  """Triplet attention. Paper: "Rotate to Attend: Convolutional Triplet Attention Module"
  (Misra et al., 2021).

  For each axis a of (Hh, Ww, C): `Z-pool_a(x) = [max_a x; mean_a x]` (a 2-channel map over
  the other two axes), `g_a = sigmoid(Norm(Conv_{kxk}(Z-pool_a x)))` (2 -> 1 channels);
  `y = (x * g_h + x * g_w + x * g_c) / 3`, each gate broadcast along its pooled axis. The
  (Ww, C) and (Hh, C) branches are the paper's rotated (C, W) and (H, C) interactions.
  Norm: GroupNorm on the 1-channel map (the paper's BN). Options: kernel_size=7.
  """

  CONFIG = TripletConfig


class PolarizedSelfAttention(_ChannelModule):
  """Polarized self-attention. Paper: "Polarized Self-Attention: Towards High-quality
  Pixel-wise Regression" (Liu et al., 2021).

  Channel-only: `A^ch = sigmoid(LN(W_z (W_v x)^T softmax_hw(W_q x)))` `[B, C]` with
  `W_q [C, 1]`, `W_v [C, C/2]`, `W_z [C/2, C]`. Spatial-only:
  `A^sp = sigmoid(softmax_c(GAP(W_q' x)) . (W_v' x))` `[B, Hh, Ww]` with `W_q', W_v' [C, C/2]`.
  `mode='parallel'`: `y = A^ch * x + A^sp * x`; `'sequential'`: `y = A^sp(z) * z`,
  `z = A^ch(x) * x`. C must be even; 1x1 convolutions without bias.
  """

  CONFIG = PSAConfig


class LargeKernelAttention(_ChannelModule):
  """Large kernel attention (LKA). Paper: "Visual Attention Network" (Guo et al., 2022).

  `attn = Conv_{1x1}(DWDConv_{7x7, dilation 3}(DWConv_{5x5}(x)))` (depthwise, depthwise
  dilated, pointwise; all with bias, 'same' zero padding); `y = attn * x`. Options:
  kernel_size=5, dilated_kernel_size=7, dilation=3.
  """

  CONFIG = LKAConfig


class LargeKernelConvAttention(_ChannelModule):
  """Large kernel convolutional attention (LKCA). Paper: "LKCA: Large Kernel Convolutional
  Attention" (Li et al., 2024).

  Self-attention replaced by one large depthwise convolution: `y = DWConv_{kxk}(x) + b`,
  equivalently `y_i = sum_j A_ij x_j` with the translation-invariant attention matrix of
  `attnjax.ops.channel.conv_as_attention`. Options: kernel_size=7 (odd).
  """

  CONFIG = LKCAConfig


class ULSAM(_ChannelModule):
  """ULSAM. Paper: "ULSAM: Ultra-Lightweight Subspace Attention Module for Compact
  Convolutional Neural Networks" (Saini et al., 2020).

  Channels split into g subspaces `F_n [B, Hh, Ww, C/g]`;
  `A_n = softmax_hw(PW_n(MaxPool_{3x3}(DW_{1x1}(F_n))))` (one map per subspace, softmax over
  all Hh*Ww positions), `y_n = A_n * F_n + F_n`, `y = concat_n y_n`. `DW_{1x1}` is a
  per-channel scale and bias; `PW_n [C/g] -> 1` has no bias (a constant under the softmax).
  Options: subspaces=4 (must divide C).
  """

  CONFIG = ULSAMConfig


class AttentionInAttention(_ChannelModule):
  """Attention-in-attention block with dynamic branch weighting (A^2N). Paper: "Attention
  in Attention Network for Image Super-Resolution" (Chen et al., 2021).

  `h = lrelu(W_first x)`; dynamic attention `pi = softmax(W2 relu(W1 GAP(h)) / T)` `[B, 2]`;
  attention branch `a = K4(K3(h) * sigmoid(K2(lrelu(K1(h)))))` (K1, K3, K4 3x3 convs,
  K2 1x1 with bias); non-attention branch `n = Conv_{3x3}(h)`;
  `y = W_last lrelu(pi_0 a + pi_1 n) + x`. Options: reduction=4, temperature=1.0 (the paper
  anneals it from 30), negative_slope=0.2.
  """

  CONFIG = A2NConfig


class SparseLargeSeparableKernelAttention(_ChannelModule):
  """Sparse decomposed large separable kernel attention with kernel selection (SDLSKA +
  CKS). Paper: "BEVANet: Bilateral Efficient Visual Attention Network for Real-Time
  Semantic Segmentation" (catalog H07).

  LKA with each depthwise kernel decomposed into a `1 x k` and a `k x 1` depthwise
  convolution, and the dilated ("sparse") stage run once per receptive field:
  `a = DW_{k x 1}(DW_{1 x k}(x))`, `b_i = DWD_{kd x 1, d_i}(DWD_{1 x kd, d_i}(a))`;
  CKS selects among the fields per channel, `w = softmax_i(W2 relu(W1 GAP(sum_i b_i)))`
  `[n, B, C]`; `y = x * Conv_{1x1}(sum_i w_i b_i)`. Options: kernel_size=5,
  dilated_kernel_size=7, dilations=(2, 3), reduction=4. The paper's text available to us
  names the parts but gives no equations; this is the composition of the named parts
  (LKA decomposed as in separable large-kernel attention, selective-kernel selection),
  see docs/channel.md.
  """

  CONFIG = SDLSKAConfig


class GuidedContextGating(_ChannelModule):
  """Guided context gating (GCG). Paper: "Guided Context Gating: Learning to leverage
  salient lesions in retinal fundus images" (catalog H10).

  Global context by attention pooling `c = sum_p softmax_p(w . x_p) x_p` `[B, C]`; channel
  correlation `t = W2 relu(LN(W1 c + b1)) + b2`; the gate is guided by both the local
  context (a `k x k` depthwise convolution) and the global one:
  `y = x * sigmoid(DWConv_k(x) + t)`. Options: reduction=4, kernel_size=3. The paper's
  abstract names the three parts without equations; this composition is ours, see
  docs/channel.md.
  """

  CONFIG = GCGConfig


def _psa(mode):
  def factory(channels, *, rngs, **options):
    if "mode" in options:
      raise TypeError(f"'psa_{mode}' fixes mode={mode!r}; use PolarizedSelfAttention for others")
    return PolarizedSelfAttention(channels, rngs=rngs, mode=mode, **options)
  factory.__name__ = f"psa_{mode}"
  factory.__doc__ = f"PolarizedSelfAttention(channels, mode={mode!r}, ...)."
  return factory


MODULES = {
    "se": SqueezeExcitation,
    "eca": EfficientChannelAttention,
    "coord": CoordinateAttention,
    "ela": EfficientLocalAttention,
    "cbam": CBAM,
    "triplet": TripletAttention,
    "psa_parallel": _psa("parallel"),
    "psa_sequential": _psa("sequential"),
    "lka": LargeKernelAttention,
    "lkca": LargeKernelConvAttention,
    "ulsam": ULSAM,
    "a2n": AttentionInAttention,
    "sdlska": SparseLargeSeparableKernelAttention,
    "gcg": GuidedContextGating,
}

CONFIGS = {"se": SEConfig, "eca": ECAConfig, "coord": CoordConfig, "ela": ELAConfig,
           "cbam": CBAMConfig, "triplet": TripletConfig, "psa_parallel": PSAConfig,
           "psa_sequential": PSAConfig, "lka": LKAConfig, "lkca": LKCAConfig,
           "ulsam": ULSAMConfig, "a2n": A2NConfig, "sdlska": SDLSKAConfig, "gcg": GCGConfig}


def names() -> list[str]:
  """Sorted registry names."""
  return sorted(MODULES)


def get_module(name: str):
  """The NNX factory `(channels, *, rngs, **options) -> module` registered under `name`."""
  if name not in MODULES:
    close = difflib.get_close_matches(str(name), list(MODULES), n=3, cutoff=0.5)
    raise ValueError(f"unknown channel attention module name={name!r}; close matches: "
                     f"{close if close else 'none'}; known: {names()}")
  return MODULES[name]


def build(name: str, channels: int, *, rngs: nnx.Rngs, **options):
  """`get_module(name)(channels, rngs=rngs, **options)`."""
  return get_module(name)(channels, rngs=rngs, **options)
