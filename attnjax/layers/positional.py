"""Flax NNX layers of the vision positional mechanisms (catalog family I).

The math is in `attnjax.ops.positional` (pure functions) and in the `*_forward` /
`*_specs` functions below, shared with the Linen twins in
`attnjax.layers.positional_linen` (same parameter names, shapes and logical axis names).

- `PEG`: conditional positional encoding, `x + DWConv3x3(x)` ("Conditional Positional
  Encodings for Vision Transformers").
- `LePE`: CSWin's locally-enhanced positional encoding, `DWConv(V)` on `[B, Hh, Ww, N, Hv]`
  ("CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows").
- `GPSA`: ConViT's gated positional self-attention (registry name 'convit') ("ConViT:
  Improving Vision Transformers with Soft Convolutional Inductive Biases").
- `BoTNetAttention`: MHSA with 2D relative position logits (registry name 'botnet')
  ("Bottleneck Transformers for Visual Recognition").
- `conv_as_attention_params`: the GPSA parameters that make it a KxK convolution ("On the
  Relationship between Self-Attention and Convolutional Layers", Cordonnier et al.).

Token maps are `[B, Hh, Ww, D]`; the attention layers flatten them row-major.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax.layers import _core
from attnjax.layers._core import AttentionConfig, ParamSpec, _positive_int, constrain
from attnjax.layers.attention import make_param
from attnjax.ops import positional as P

__all__ = ["PEG", "LePE", "GPSA", "BoTNetAttention", "GPSAConfig", "BoTNetConfig",
           "peg_specs", "lepe_specs", "gpsa_specs", "botnet_specs", "peg_forward",
           "gpsa_forward", "botnet_forward", "conv_as_attention_params"]


def _zeros(key, shape, dtype=jnp.float32):
  del key
  return jnp.zeros(shape, dtype)


def _depthwise_init(in_axes):
  # fan_in of a depthwise filter is its spatial size.
  return jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                              in_axis=in_axes, out_axis=-1)


def _odd_kernel(name, kernel) -> tuple[int, int]:
  ks = (kernel, kernel) if isinstance(kernel, (int, np.integer)) else tuple(kernel)
  if (len(ks) != 2 or any(isinstance(k, bool) or not isinstance(k, (int, np.integer))
                          or k <= 0 or k % 2 == 0 for k in ks)):
    raise ValueError(f"{name} must be an odd positive int or a pair of them, got {name}={kernel!r}")
  return int(ks[0]), int(ks[1])


def _check_map(x, features):
  if not hasattr(x, "ndim") or x.ndim != 4:
    raise ValueError(f"x must be a token map [B, Hh, Ww, D], got shape {getattr(x, 'shape', None)}")
  if x.shape[-1] != features:
    raise ValueError(f"x last dimension must be d_model={features}, got shape {x.shape}")


# ----------------------------------------------------------------------------- PEG

def peg_specs(dim: int, kernel=3) -> dict[str, ParamSpec]:
  """`kernel [k, k, dim]`, `bias [dim]`."""
  _positive_int("dim", dim)
  kh, kw = _odd_kernel("kernel", kernel)
  return {"kernel": ParamSpec((kh, kw, dim), _depthwise_init((0, 1)), (None, None, "embed")),
          "bias": ParamSpec((dim,), _zeros, ("embed",))}


def peg_forward(params: dict, x):
  """`x + DWConv(x)` on `x [B, Hh, Ww, D]` (`ops.positional.conditional_position_encoding`)."""
  _check_map(x, params["kernel"].shape[-1])
  return P.conditional_position_encoding(x, params["kernel"], params["bias"])


class PEG(nnx.Module):
  """Positional encoding generator of CPVT: `y = x + DWConv_kxk(x)` (zero padding).

  Paper: "Conditional Positional Encodings for Vision Transformers" (Chu et al.); the
  paper inserts it after the first encoder block. `x [B, Hh, Ww, dim]` -> same shape.
  Params: `kernel [k, k, dim]`, `bias [dim]`.
  """

  def __init__(self, dim: int, *, kernel=3, param_dtype=jnp.float32, rngs: nnx.Rngs):
    for name, spec in peg_specs(dim, kernel).items():
      setattr(self, name, make_param(rngs, spec, param_dtype))

  def __call__(self, x):
    return peg_forward({"kernel": self.kernel[...], "bias": self.bias[...]}, x)


# ----------------------------------------------------------------------------- LePE

def lepe_specs(num_heads: int, head_dim: int, kernel=3) -> dict[str, ParamSpec]:
  """`kernel [k, k, N, Hv]`, `bias [N, Hv]`."""
  _positive_int("num_heads", num_heads)
  _positive_int("head_dim", head_dim)
  kh, kw = _odd_kernel("kernel", kernel)
  return {"kernel": ParamSpec((kh, kw, num_heads, head_dim), _depthwise_init((0, 1)),
                              (None, None, "heads", "head_dim")),
          "bias": ParamSpec((num_heads, head_dim), _zeros, ("heads", "head_dim"))}


class LePE(nnx.Module):
  """CSWin's locally-enhanced positional encoding: `LePE(V) = DWConv_kxk(V)` per head.

  Call `lepe(v_map [B, Hh, Ww, N, Hv]) -> [B, Hh, Ww, N, Hv]`; add it to the attention
  output `softmax(Q K^T / sqrt(d)) V` of the same tokens. Params: `kernel [k, k, N, Hv]`,
  `bias [N, Hv]`. Paper: "CSWin Transformer: A General Vision Transformer Backbone with
  Cross-Shaped Windows" (Dong et al.).
  """

  def __init__(self, num_heads: int, head_dim: int, *, kernel=3, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    for name, spec in lepe_specs(num_heads, head_dim, kernel).items():
      setattr(self, name, make_param(rngs, spec, param_dtype))

  def __call__(self, v_map):
    return P.lepe(v_map, self.kernel[...], self.bias[...])


# ----------------------------------------------------------------------------- shared attention

def _base_config(d_model, num_heads, num_kv_heads, head_dim, v_head_dim, out_features, rope,
                 rope_base, scale, implementation, dtype, param_dtype) -> AttentionConfig:
  if rope not in (None, "axial"):
    raise ValueError(f"rope must be None or 'axial' for this layer (grid coordinates), got "
                     f"rope={rope!r}")
  return AttentionConfig(d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, v_head_dim=v_head_dim, out_features=out_features,
                         rope=rope, rope_base=rope_base,
                         scale=scale, implementation=implementation, dtype=dtype,
                         param_dtype=param_dtype)


def _projection_specs(cfg: AttentionConfig) -> dict[str, ParamSpec]:
  specs = _core.param_specs(cfg)
  return {k: specs[k] for k in ("q_kernel", "k_kernel", "v_kernel", "o_kernel")}


def _project(cfg: AttentionConfig, params, x):
  """`x [B, Hh, Ww, D]` -> q `[B,T,N,H]`, k `[B,T,K,H]`, v `[B,T,K,Hv]`, grid, dtype."""
  _check_map(x, cfg.d_model)
  B, Hh, Ww, D = x.shape
  dtype = cfg.dtype or x.dtype
  x_BTD = x.reshape(B, Hh * Ww, D).astype(dtype)
  q_BTNH = jnp.einsum("btd,dnh->btnh", x_BTD, params["q_kernel"].astype(dtype))
  k_BTKH = jnp.einsum("btd,dkh->btkh", x_BTD, params["k_kernel"].astype(dtype))
  v_BTKH = jnp.einsum("btd,dkh->btkh", x_BTD, params["v_kernel"].astype(dtype))
  q_BTNH = constrain(q_BTNH, ("batch", "length", "heads", None))
  if cfg.rope == "axial":
    coords = jnp.asarray(P.grid_coordinates((Hh, Ww)))
    q_BTNH = P.apply_rope_axial(q_BTNH, coords, base=cfg.rope_base)
    k_BTKH = P.apply_rope_axial(k_BTKH, coords, base=cfg.rope_base)
  return q_BTNH, k_BTKH, v_BTKH, (Hh, Ww), dtype


def _output(cfg: AttentionConfig, params, out_BTNH, grid, dtype):
  y_BTD = jnp.einsum("btnh,nhd->btd", out_BTNH.astype(dtype), params["o_kernel"].astype(dtype))
  y_BTD = constrain(y_BTD, ("batch", "length", "embed"))
  return y_BTD.reshape((y_BTD.shape[0],) + grid + (y_BTD.shape[-1],))


def _check_call(positions, segment_ids, cache):
  if positions is not None or segment_ids is not None or cache is not None:
    raise ValueError("this spatial layer takes no positions, segment_ids or cache (it uses the "
                     "token map's coordinates)")


# ----------------------------------------------------------------------------- GPSA (ConViT)

@dataclasses.dataclass(frozen=True)
class GPSAConfig:
  """`GPSA` options: the shared attention fields plus ConViT's locality initialisation."""

  base: AttentionConfig
  locality_strength: float = 1.0
  locality_distance: int = 1
  gate_init: float = 1.0

  def __post_init__(self):
    if not self.locality_strength > 0:
      raise ValueError(f"locality_strength must be > 0, got {self.locality_strength!r}")
    _positive_int("locality_distance", self.locality_distance)


def gpsa_specs(cfg: GPSAConfig) -> dict[str, ParamSpec]:
  """q/k/v/o kernels as `MultiHeadAttention`, `v_pos [N, 3]`, `gate_logit [N]`."""
  b = cfg.base
  specs = _projection_specs(b)

  def v_pos_init(key, shape, dtype=jnp.float32):
    del key
    return P.init_convit_v_pos(shape[0], locality_strength=cfg.locality_strength,
                               locality_distance=cfg.locality_distance).astype(dtype)

  def gate_init(key, shape, dtype=jnp.float32):
    del key
    return jnp.full(shape, cfg.gate_init, dtype)

  specs["v_pos"] = ParamSpec((b.num_heads, 3), v_pos_init, ("heads", None))
  specs["gate_logit"] = ParamSpec((b.num_heads,), gate_init, ("heads",))
  return specs


def gpsa_forward(cfg: GPSAConfig, params: dict, x):
  """GPSA on `x [B, Hh, Ww, D]` -> `[B, Hh, Ww, D]`; see `GPSA`."""
  q, k, v, grid, dtype = _project(cfg.base, params, x)
  pos_NTS = P.convit_positional_logits(grid, params["v_pos"])
  out = P.gated_positional_attention(q, k, v, pos_NTS, params["gate_logit"], scale=cfg.base.scale,
                                     implementation=cfg.base.implementation)
  return _output(cfg.base, params, out, grid, dtype)


class GPSA(nnx.Module):
  """Gated positional self-attention of ConViT (registry name 'convit', kind 'spatial').

  Per head h: `A_h = (1 - sigmoid(l_h)) softmax(s Q_h K_h^T) + sigmoid(l_h) softmax(P_h)`,
  `P_h[i, j] = v_pos[h] . r_ij`, `r_ij = (dx, dy, dx^2 + dy^2)` (offset of key j from query
  i on the token map), `y = concat_h(A_h V_h) Wo`. `v_pos` starts local (head h centred on
  the offset `Delta_h` of a sqrt(N) x sqrt(N) grid, sharpness `locality_strength`), the
  gates at `sigmoid(gate_init)`.

  Paper: "ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases"
  (d'Ascoli et al.); the positional encoding is Cordonnier et al.'s quadratic one.

  Args:
    d_model, num_heads, num_kv_heads, head_dim, v_head_dim, out_features: as
      `MultiHeadAttention`.
    locality_strength: alpha of the local init; locality_distance: spacing of the centres.
    gate_init: initial gate logit `l_h`.
    rope: None or 'axial' (axial RoPE on the content q/k only).
    scale, implementation: for the content attention (`attnjax.attention`).
    dtype, param_dtype, rngs: as `MultiHeadAttention`.

  Call: `layer(x [B, Hh, Ww, D], *, deterministic=True) -> [B, Hh, Ww, D]`.
  """

  def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: int | None = None,
               head_dim: int | None = None, v_head_dim: int | None = None,
               out_features: int | None = None, locality_strength: float = 1.0,
               locality_distance: int = 1,
               gate_init: float = 1.0, rope: str | None = None, rope_base: float = 10000.0,
               scale: float | None = None, implementation: Any = None, dtype: Any = None,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if not isinstance(rngs, nnx.Rngs):
      raise TypeError(f"rngs must be an nnx.Rngs, got {type(rngs).__name__}")
    base = _base_config(d_model, num_heads, num_kv_heads, head_dim, v_head_dim, out_features,
                        rope, rope_base, scale, implementation, dtype, param_dtype)
    self.config = GPSAConfig(base, locality_strength=locality_strength,
                             locality_distance=locality_distance, gate_init=gate_init)
    specs = gpsa_specs(self.config)
    self._param_names = tuple(specs)
    for name, spec in specs.items():
      setattr(self, name, make_param(rngs, spec, base.param_dtype))

  def params_dict(self) -> dict:
    return {name: getattr(self, name)[...] for name in self._param_names}

  def __call__(self, x, *, segment_ids=None, positions=None, cache=None,
               deterministic: bool = True):
    del deterministic
    _check_call(positions, segment_ids, cache)
    return gpsa_forward(self.config, self.params_dict(), x)


def conv_as_attention_params(conv_kernel, *, alpha: float = 50.0, gate_logit: float = 40.0,
                             head_dim: int = 1) -> dict:
  """GPSA parameters that compute a KxK convolution (Cordonnier et al.'s construction).

  With `N = K^2` heads, head h centred on the offset `Delta_h` (`convit_head_offsets`,
  locality_distance 1), `v_pos[h] = alpha (2 Delta_x, 2 Delta_y, -1)` and a gate
  saturated on the positional part, head h attends (as alpha -> infinity) only to the
  token at `query + Delta_h`; with `Wv_h = I` and `Wo_h = W[Delta_h + c]` the layer
  returns `sum_h x(i + Delta_h) W[Delta_h + c] = conv(x, W)` (cross-correlation, 'same'
  output, wherever the whole window lies on the map; pad the map with zero tokens to get
  the convolution's zero padding at the borders).

  Paper: "On the Relationship between Self-Attention and Convolutional Layers".

  Args:
    conv_kernel: `[K, K, C_in, C_out]` (HWIO), K odd.
    alpha: sharpness; the weight leaking to the next-nearest key is ~`exp(-alpha)`.
    gate_logit: sigmoid(gate_logit) is the weight of the positional part (40 -> 1 in f32).
    head_dim: width of the (zero) query/key projections.
  Returns:
    dict for `GPSA(d_model=C_in, num_heads=K^2, head_dim=head_dim, v_head_dim=C_in,
    out_features=C_out)` parameters: q_kernel, k_kernel, v_kernel, o_kernel, v_pos,
    gate_logit (the names of `gpsa_specs`).
  """
  w = jnp.asarray(conv_kernel, jnp.float32)
  if w.ndim != 4 or w.shape[0] != w.shape[1] or w.shape[0] % 2 == 0:
    raise ValueError(f"conv_kernel must be [K, K, C_in, C_out] with K odd, got shape {w.shape}")
  K, _, c_in, _ = w.shape
  N = K * K
  delta = P.convit_head_offsets(N)  # [N, 2] (dx, dy), centred on (K-1)/2
  c = (K - 1) // 2
  cols = delta[:, 0].astype(int) + c
  rows = delta[:, 1].astype(int) + c
  o_kernel = w[rows, cols]  # [N, C_in, C_out]
  return {
      "q_kernel": jnp.zeros((c_in, N, head_dim), jnp.float32),
      "k_kernel": jnp.zeros((c_in, N, head_dim), jnp.float32),
      "v_kernel": jnp.broadcast_to(jnp.eye(c_in, dtype=jnp.float32)[:, None, :], (c_in, N, c_in)),
      "o_kernel": o_kernel,
      "v_pos": P.init_convit_v_pos(N, locality_strength=alpha),
      "gate_logit": jnp.full((N,), gate_logit, jnp.float32),
  }


# ----------------------------------------------------------------------------- BoTNet

@dataclasses.dataclass(frozen=True)
class BoTNetConfig:
  """`BoTNetAttention` options: the shared attention fields plus the table radii."""

  base: AttentionConfig
  max_distance: tuple = (7, 7)

  def __post_init__(self):
    md = self.max_distance
    md = (md, md) if isinstance(md, (int, np.integer)) and not isinstance(md, bool) else md
    try:
      md = tuple(md)
    except TypeError:
      md = None
    bad = lambda m: isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 0
    if md is None or len(md) != 2 or any(bad(m) for m in md):
      raise ValueError(f"max_distance must be an int >= 0 or a pair (rows, cols) of them, got "
                       f"max_distance={self.max_distance!r}")
    object.__setattr__(self, "max_distance", tuple(int(m) for m in md))


def botnet_specs(cfg: BoTNetConfig) -> dict[str, ParamSpec]:
  """q/k/v/o kernels, `rel_h [2Rh+1, H]`, `rel_w [2Rw+1, H]` (shared by the heads)."""
  b = cfg.base
  specs = _projection_specs(b)
  init = jax.nn.initializers.normal(b.head_dim ** -0.5)
  Rh, Rw = cfg.max_distance
  specs["rel_h"] = ParamSpec((2 * Rh + 1, b.head_dim), init, (None, "head_dim"))
  specs["rel_w"] = ParamSpec((2 * Rw + 1, b.head_dim), init, (None, "head_dim"))
  return specs


def botnet_forward(cfg: BoTNetConfig, params: dict, x):
  """BoTNet MHSA on `x [B, Hh, Ww, D]` -> `[B, Hh, Ww, D]`; see `BoTNetAttention`."""
  q, k, v, grid, dtype = _project(cfg.base, params, x)
  out = P.botnet_attention(q, k, v, params["rel_h"], params["rel_w"], grid, scale=cfg.base.scale,
                           implementation=cfg.base.implementation)
  return _output(cfg.base, params, out, grid, dtype)


class BoTNetAttention(nnx.Module):
  """MHSA with 2D relative position logits (BoTNet; registry name 'botnet', kind 'spatial').

  `s_ij = scale * q_i . (k_j + rel_h[clip(y_j - y_i)] + rel_w[clip(x_j - x_i)])`,
  `y = concat_n softmax_j(s_ij) v_j Wo`, tokens row-major on the `[Hh, Ww]` map, offsets
  clipped to `+-max_distance` (the paper's exact `2L - 1` tables when
  `max_distance >= L - 1`). The relative logits are a score_mod over `q . rel` tables
  `[B, N, T, 2R+1]`: no `[T, T]` array is stored by fused implementations.

  Paper: "Bottleneck Transformers for Visual Recognition" (Srinivas et al.).

  Args:
    d_model, num_heads, num_kv_heads, head_dim, v_head_dim, out_features: as
      `MultiHeadAttention`.
    max_distance: int or (rows, cols) table radius; default 7 (exact for maps up to 8x8).
    rope: None or 'axial' (rotates q and k before both logit terms).
    scale, implementation, dtype, param_dtype, rngs: as `MultiHeadAttention`.

  Call: `layer(x [B, Hh, Ww, D], *, deterministic=True) -> [B, Hh, Ww, D]`.
  """

  def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: int | None = None,
               head_dim: int | None = None, v_head_dim: int | None = None,
               out_features: int | None = None, max_distance=7,
               rope: str | None = None, rope_base: float = 10000.0, scale: float | None = None,
               implementation: Any = None, dtype: Any = None, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    if not isinstance(rngs, nnx.Rngs):
      raise TypeError(f"rngs must be an nnx.Rngs, got {type(rngs).__name__}")
    base = _base_config(d_model, num_heads, num_kv_heads, head_dim, v_head_dim, out_features,
                        rope, rope_base, scale, implementation, dtype, param_dtype)
    self.config = BoTNetConfig(base, max_distance=max_distance)
    specs = botnet_specs(self.config)
    self._param_names = tuple(specs)
    for name, spec in specs.items():
      setattr(self, name, make_param(rngs, spec, base.param_dtype))

  def params_dict(self) -> dict:
    return {name: getattr(self, name)[...] for name in self._param_names}

  def __call__(self, x, *, segment_ids=None, positions=None, cache=None,
               deterministic: bool = True):
    del deterministic
    _check_call(positions, segment_ids, cache)
    return botnet_forward(self.config, self.params_dict(), x)

