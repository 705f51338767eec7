"""Flax NNX layers for the vision linear attention ops (catalog D02, D09, D10, D11).

One layer class, `VisionLinearAttention(mechanism=...)`, owns the projections (names,
initialisers and logical axes of `MultiHeadAttention`) and calls the op of
`attnjax.ops.linear.vision`. Registry names (kind; options with defaults; paper):

- 'l2vit' (spatial; `lcm=True`, `lcm_size=3`, `eps`): `l2vit_attention`, ReLU linear
  attention + the Local Concentration Module (`lcm1_*`, `lcm2_*` depthwise kernels)
  ("The Linear Attention Resurrection in Vision Transformer");
- 'care' (spatial; `global_ratio=0.25`, `conv_size=3`, `feature_map='elu+1'`, `eps`):
  `care_attention`; the first `round(global_ratio * D)` input channels feed the linear
  attention, the rest the depthwise conv; both interacted branches are projected back to
  `D` (`o_kernel`, `o_local_kernel`) ("CARE Transformer");
- 'hiif' (sequence, encoder-only; `eps=1e-5`): `hiif_attention`, multi-head Galerkin-type
  linear attention over the tokens (`[B, T, D]`, or a grid flattened row-major) ("HIIF");
- 'feat' (spatial; `temporal=True`, `channel_temperature=1.0`): `feat_attention` on
  `x [B, Hh, Ww, D]` (image: the temporal step is skipped) or `[B, T, Hh, Ww, D]` (video);
  receptance/key/value projections, per-head-channel decays and bonuses `spatial_*`,
  `temporal_*` (`[N, H]`, decay = softplus of the parameter) and a learned channel
  temperature (`exp(channel_log_temperature)`) ("FEAT").

Inputs and outputs keep their shape (`x [..., D] -> [..., D]`); no RoPE, no decoding cache,
no causal mode. The configuration (`vision_config`), the parameter specs (`param_specs`) and
the forward pass on a parameter dict (`forward`) are plain functions shared with the Linen
twin `attnjax.layers.linear_vision_linen.VisionLinearAttention`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax.layers import _core
from attnjax.layers import _options as _opt
from attnjax.layers._core import ParamSpec
from attnjax.layers.attention import make_param
from attnjax.ops import linear as L

__all__ = ["VisionLinearAttention", "VisionConfig", "MECHANISMS", "KINDS", "vision_config",
           "param_specs", "forward", "make_factory", "make_linen_factory"]

MECHANISMS = ("l2vit", "care", "hiif", "feat")
KINDS = {"l2vit": "spatial", "care": "spatial", "hiif": "sequence", "feat": "spatial"}
_OPTIONS = {  # mechanism -> its own options with defaults (sized for a 4x4 map)
    "l2vit": dict(lcm=True, lcm_size=3, eps=L.DEFAULT_EPS),
    "care": dict(global_ratio=0.25, conv_size=3, feature_map="elu+1", eps=L.DEFAULT_EPS),
    "hiif": dict(eps=1e-5),
    "feat": dict(temporal=True, channel_temperature=1.0),
}
_COMMON = dict(implementation=None, dtype=None, param_dtype=jnp.float32, rope=None,
               dropout_rate=0.0, use_bias=False, causal=False)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Validated configuration of a `VisionLinearAttention` layer."""

  mechanism: str
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  options: tuple  # the mechanism's options, (name, value) sorted
  dtype: Any
  param_dtype: Any
  use_bias: bool

  @property
  def opts(self) -> dict:
    return dict(self.options)

  @property
  def global_channels(self) -> int:
    """CARE: the input channels of the linear-attention branch."""
    return int(round(float(self.opts["global_ratio"]) * self.d_model))


def _odd_size(name, value):
  if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
    raise ValueError(f"{name} must be a positive odd int, got {name}={value!r}")


def _pos_float(name, value):
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
    raise ValueError(f"{name} must be a positive number, got {name}={value!r}")


def vision_config(mechanism, d_model, num_heads, *, num_kv_heads=None, head_dim=None,
                  **options) -> VisionConfig:
  """Validates `options` for `mechanism` and returns a `VisionConfig` (ValueError/TypeError
  naming a bad option and what it expects)."""
  own, common = _opt.split_options(mechanism, options, _OPTIONS.get(mechanism, {}), _COMMON,
                                   mechanisms=MECHANISMS)
  _opt.reject_common(mechanism, common, rope="linear attention over the grid, no RoPE",
                     causal="it is non-causal: every token sees the whole map")
  if common["implementation"] not in (None, "auto", "xla"):
    raise ValueError(f"implementation must be None, 'auto' or 'xla' for variant {mechanism!r} "
                     f"(XLA ops only), got implementation={common['implementation']!r}")
  num_kv_heads, head_dim = _opt.head_layout(d_model, num_heads, num_kv_heads, head_dim)
  if "eps" in own:
    _pos_float("eps", own["eps"])
  if mechanism == "l2vit":
    _odd_size("lcm_size", own["lcm_size"])
    own["lcm"] = bool(own["lcm"])
  if mechanism == "care":
    _odd_size("conv_size", own["conv_size"])
    r = own["global_ratio"]
    d1 = round(float(r) * d_model) if isinstance(r, (int, float)) and not isinstance(r, bool) else 0
    if not 1 <= d1 < d_model:
      raise ValueError(f"global_ratio must split d_model={d_model} into two non-empty parts "
                       f"(1 <= round(global_ratio * d_model) < d_model), got global_ratio={r!r}")
    if own["feature_map"] not in L.FEATURE_MAPS:
      raise ValueError(f"feature_map must be one of {sorted(L.FEATURE_MAPS)}, got "
                       f"feature_map={own['feature_map']!r}")
  if mechanism == "feat":
    if num_kv_heads != num_heads:
      raise ValueError(f"'feat' weights keys channel by channel: num_kv_heads must equal "
                       f"num_heads={num_heads}, got num_kv_heads={num_kv_heads}")
    _pos_float("channel_temperature", own["channel_temperature"])
    own["temporal"] = bool(own["temporal"])
  return VisionConfig(mechanism=mechanism, d_model=d_model, num_heads=num_heads,
                      num_kv_heads=num_kv_heads, head_dim=head_dim,
                      options=tuple(sorted(own.items())),
                      dtype=_core._canonical_dtype("dtype", common["dtype"]),  # pylint: disable=protected-access
                      param_dtype=_core._canonical_dtype("param_dtype", common["param_dtype"]),  # pylint: disable=protected-access
                      use_bias=bool(common["use_bias"]))


# ----------------------------------------------------------------------------- params

def _zeros(key, shape, dtype=jnp.float32):
  del key
  return jnp.zeros(shape, dtype)


def _const(value):
  value = np.asarray(value, np.float32)

  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.broadcast_to(jnp.asarray(value, dtype), shape)
  return init


def _decay_init(N, H, lo, hi):
  """softplus^-1 of decays spread over [lo, hi] across the N * H channels."""
  d = np.linspace(lo, hi, N * H).reshape(N, H)
  return _const(d + np.log(-np.expm1(-d)))


def param_specs(cfg: VisionConfig) -> dict[str, ParamSpec]:
  """The layer's parameters: `q_kernel [Din, N, H]` ('feat': also `r_kernel`), `k_kernel`,
  `v_kernel [Din, K, H]`, `o_kernel [N, H, D]` (+ biases with `use_bias`; `Din = D`, or the
  global channels for 'care'); 'l2vit': `lcm{1,2}_kernel [s, s, N, H]`, `lcm{1,2}_bias
  [N, H]`; 'care': `conv_kernel [c, c, Dl]`, `conv_bias [Dl]`, `local_to_global [Dl, N, H]`,
  `global_to_local [N, H, Dl]`, `o_local_kernel [Dl, D]`; 'feat': `spatial_decay`,
  `spatial_bonus`, (`temporal_decay`, `temporal_bonus`) `[N, H]`, `channel_log_temperature
  []`."""
  D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  m, o = cfg.mechanism, cfg.opts
  dense = _core._dense_init  # pylint: disable=protected-access
  Din = cfg.global_channels if m == "care" else D
  names = ("r", "k", "v") if m == "feat" else ("q", "k", "v")
  specs = {}
  for name in names:
    heads, axis = (N, "heads") if name in ("q", "r") else (K, "kv_heads")
    specs[f"{name}_kernel"] = ParamSpec((Din, heads, H), dense(0, (1, 2)),
                                        ("embed", axis, "head_dim"))
    if cfg.use_bias:
      specs[f"{name}_bias"] = ParamSpec((heads, H), _zeros, (axis, "head_dim"))
  specs["o_kernel"] = ParamSpec((N, H, D), dense((0, 1), 2), ("heads", "head_dim", "embed"))
  if cfg.use_bias:
    specs["o_bias"] = ParamSpec((D,), _zeros, ("embed",))
  if m == "l2vit" and o["lcm"]:
    s = o["lcm_size"]
    for i in (1, 2):
      specs[f"lcm{i}_kernel"] = ParamSpec((s, s, N, H), jax.nn.initializers.normal(1.0 / s),
                                          (None, None, "heads", "head_dim"))
      specs[f"lcm{i}_bias"] = ParamSpec((N, H), _zeros, ("heads", "head_dim"))
  if m == "care":
    Dl, c = D - Din, o["conv_size"]
    specs["conv_kernel"] = ParamSpec((c, c, Dl), jax.nn.initializers.normal(1.0 / c),
                                     (None, None, "embed"))
    specs["conv_bias"] = ParamSpec((Dl,), _zeros, ("embed",))
    specs["local_to_global"] = ParamSpec((Dl, N, H), dense(0, (1, 2)),
                                         ("embed", "heads", "head_dim"))
    specs["global_to_local"] = ParamSpec((N, H, Dl), dense((0, 1), 2),
                                         ("heads", "head_dim", "embed"))
    specs["o_local_kernel"] = ParamSpec((Dl, D), dense(0, 1), (None, "embed"))
  if m == "feat":
    steps = ("spatial", "temporal") if o["temporal"] else ("spatial",)
    for step in steps:
      specs[f"{step}_decay"] = ParamSpec((N, H), _decay_init(N, H, 0.5, 8.0),
                                         ("heads", "head_dim"))
      specs[f"{step}_bonus"] = ParamSpec((N, H), _zeros, ("heads", "head_dim"))
    specs["channel_log_temperature"] = ParamSpec(
        (), _const(np.log(float(o["channel_temperature"]))), ())
  return specs


# ----------------------------------------------------------------------------- forward

def _check_input(cfg: VisionConfig, x):
  D, m = cfg.d_model, cfg.mechanism
  ranks = {"l2vit": (4,), "care": (4,), "hiif": (3, 4), "feat": (4, 5)}[m]
  if not hasattr(x, "ndim") or x.ndim not in ranks or x.shape[-1] != D:
    want = {"l2vit": f"a token map [B, Hh, Ww, D={D}]", "care": f"a token map [B, Hh, Ww, D={D}]",
            "hiif": f"[B, T, D={D}] or a token map [B, Hh, Ww, D={D}]",
            "feat": f"an image map [B, Hh, Ww, D={D}] or a video [B, T, Hh, Ww, D={D}]"}[m]
    raise ValueError(f"x must be {want} for variant {m!r}, got shape "
                     f"{getattr(x, 'shape', None)}")
  if m == "feat" and x.ndim == 5 and not cfg.opts["temporal"]:
    raise ValueError("a video input [B, T, Hh, Ww, D] needs temporal=True for variant 'feat'")


def forward(cfg: VisionConfig, params: dict, x):
  """The layer on a parameter dict: `x -> same shape` (see the module docstring)."""
  _check_input(cfg, x)
  dtype = cfg.dtype or x.dtype
  x = x.astype(dtype)
  m, o, p = cfg.mechanism, cfg.opts, params

  def proj(inp, name):
    out = jnp.einsum("...d,dnk->...nk", inp, p[f"{name}_kernel"].astype(dtype))
    if cfg.use_bias:
      out = out + p[f"{name}_bias"].astype(dtype)
    return out

  local_y = None
  if m == "l2vit":
    kernels = (p["lcm1_kernel"], p["lcm2_kernel"]) if o["lcm"] else None
    biases = (p["lcm1_bias"], p["lcm2_bias"]) if o["lcm"] else None
    out = L.l2vit_attention(proj(x, "q"), proj(x, "k"), proj(x, "v"), lcm_kernels=kernels,
                            lcm_biases=biases, eps=o["eps"])
  elif m == "care":
    d1 = cfg.global_channels
    xg, xl = x[..., :d1], x[..., d1:]
    out, loc = L.care_attention(proj(xg, "q"), proj(xg, "k"), proj(xg, "v"), xl,
                                conv_kernel=p["conv_kernel"], conv_bias=p["conv_bias"],
                                local_to_global=p["local_to_global"],
                                global_to_local=p["global_to_local"],
                                feature_map=o["feature_map"], eps=o["eps"])
    local_y = jnp.einsum("...c,cd->...d", loc.astype(dtype), p["o_local_kernel"].astype(dtype))
  elif m == "hiif":
    lead = x.shape[:-1]
    xt = x.reshape(x.shape[0], -1, x.shape[-1])
    out = L.hiif_attention(proj(xt, "q"), proj(xt, "k"), proj(xt, "v"), eps=o["eps"])
    out = out.reshape(lead + out.shape[-2:])
  else:  # feat
    video = x.ndim == 5
    decay = lambda name: jax.nn.softplus(p[name].astype(jnp.float32))  # noqa: E731
    out = L.feat_attention(
        proj(x, "r"), proj(x, "k"), proj(x, "v"), spatial_decay=decay("spatial_decay"),
        spatial_bonus=p["spatial_bonus"], temporal_decay=decay("temporal_decay") if video else None,
        temporal_bonus=p["temporal_bonus"] if video else None,
        channel_temperature=jnp.exp(p["channel_log_temperature"].astype(jnp.float32)))
  y = jnp.einsum("...nk,nkd->...d", out.astype(dtype), p["o_kernel"].astype(dtype))
  if local_y is not None:
    y = y + local_y
  if cfg.use_bias:
    y = y + p["o_bias"].astype(dtype)
  names = (("batch", "length", "embed") if y.ndim == 3
           else ("batch",) + (None,) * (y.ndim - 2) + ("embed",))
  return _core.constrain(y, names)


def _check_call(segment_ids, positions, cache):
  if segment_ids is not None or positions is not None or cache is not None:
    raise ValueError("vision linear-attention variants ('l2vit', 'care', 'hiif', 'feat') take no "
                     "segment_ids, positions or cache")


class VisionLinearAttention(nnx.Module):
  """Vision linear attention layer: L^2ViT, CARE, HIIF or FEAT (see the module docstring).

  Args:
    d_model, num_heads, num_kv_heads, head_dim: as in `MultiHeadAttention`.
    mechanism: one of `MECHANISMS`.
    **options: the mechanism's options (`lcm`, `lcm_size`, `global_ratio`, `conv_size`,
      `feature_map`, `eps`, `temporal`, `channel_temperature`) and `dtype`, `param_dtype`,
      `use_bias` (`implementation` None/'xla', `rope` None, `causal` False, `dropout_rate` 0
      are accepted for the model's defaults).
    rngs: `nnx.Rngs`.

  Call: `layer(x, *, deterministic=True) -> same shape` with `x [B, Hh, Ww, D]` ('feat' also
  `[B, T, Hh, Ww, D]`; 'hiif' also `[B, T, D]`).
  """

  def __init__(self, d_model: int, num_heads: int, *, mechanism: str, num_kv_heads=None,
               head_dim=None, rngs: nnx.Rngs, **options):
    self.config = vision_config(mechanism, d_model, num_heads, num_kv_heads=num_kv_heads,
                                head_dim=head_dim, **options)
    specs = param_specs(self.config)
    self._param_names = tuple(specs)
    for name, spec in specs.items():
      setattr(self, name, make_param(rngs, spec, self.config.param_dtype))

  def params_dict(self) -> dict:
    return {name: getattr(self, name)[...] for name in self._param_names}

  def __call__(self, x, *, segment_ids=None, positions=None, cache=None,
               deterministic: bool = True):
    del deterministic
    _check_call(segment_ids, positions, cache)
    return forward(self.config, self.params_dict(), x)


# The registry factories: make_factory(mechanism) (NNX), make_linen_factory(mechanism).
make_factory, make_linen_factory = _core.mechanism_factories(
    VisionLinearAttention, "attnjax.layers.linear_vision_linen", "VisionLinearAttention")
