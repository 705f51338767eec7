"""Flax NNX layers for the spatial-reduction / channel / long-short family (catalog F).

One layer class, `ReducedSpatialAttention(mechanism=...)`, owns the projections (the
names, initialisers and logical axes of `MultiHeadAttention`, prefixed by the sub-layer)
and calls the ops of `attnjax.ops.spatial.reduced`. Inputs are token maps
`x [B, Hh, Ww, D]` (registry kind 'spatial'); the output has the same shape.

Registry names (sub-layers, options; paper):
- 'pvt': `sra`, K/V from `LN(conv_{r x r, stride r}(x))`, `sr_ratio` ("Pyramid Vision
  Transformer");
- 'twins': `lsa` (windows of `window`) and/or `gsa` (`sra` with `sr_ratio=window`);
  `mode='dual'` (default) | `'lsa'` | `'gsa'` ("Twins");
- 'hilo': Hi-Fi window heads + Lo-Fi pooled heads, `window`, `alpha` (LITv2, "Fast
  Vision Transformers with HiLo Attention");
- 's2a': pooled K/V (`sr_ratio`), Q/K compressed to `head_dim // qk_ratio`, 3x3
  depthwise local perception on V (`local_perception`) ("S2AFormer");
- 'davit': `window` (windows of `window`) and/or `channel` (`num_groups`);
  `mode='dual'` (default) | `'window'` | `'channel'` ("DaViT");
- 'crossformer': `sda` and/or `lda` (`group_size`) with the DPB MLP (`dpb_dim`);
  `mode='dual'` (default) | `'sda'` | `'lda'` ("CrossFormer").

Alternation. A registry layer is one block's attention, so the papers' alternation of two
sub-layers is offered two ways: `mode='dual'` runs both in one layer,
`y = f1(x) + f2(x + f1(x))` (so the block's residual `x + y` equals two residual
sub-layers without the MLP between them), and the single modes let a model alternate them
per layer with `layers_attention` (e.g. `[{'name': 'davit', 'mode': 'window'},
{'name': 'davit', 'mode': 'channel'}]`).

The configuration (`reduced_config`), the parameter specs (`param_specs`) and the forward
pass on a parameter dict (`forward`) are plain functions shared with the Linen twin
`attnjax.layers.reduced_linen.ReducedSpatialAttention`.

Common options: `rope` (None | 'axial' | 'mixed', `rope_base`): queries and keys rotate at
their map coordinates `(y, x)`; a pooled or conv-reduced key (PVT/Twins GSA, HiLo Lo-Fi,
S2AFormer) at the centre of its `r x r` cell (`attnjax.ops.spatial.pooled_positions`);
'mixed' adds learnable `<unit>_rope_freqs [N, H/2, 2]` and needs `num_kv_heads ==
num_heads`; DaViT's channel attention has no positions (rope must be None with a channel
sub-layer). `positions=` (call argument, with `rope` only): explicit RoPE coordinates
`[B, Hh*Ww, 2]` of the tokens, row-major (default the grid); queries and unreduced keys
rotate at them, a pooled / conv-reduced key at the mean of its cell's positions (the cell
centre for the grid). `dropout_rate`: dropout on the layer output when
`deterministic=False`, as in every attnjax layer (no attention-probability dropout, see
docs/layers.md). No decoding cache.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax import masks as _masks
from attnjax.layers import _core
from attnjax.layers import _options as _opt
from attnjax.layers._core import ParamSpec, _positive_int
from attnjax.layers.attention import make_param
from attnjax.ops import positional as _pos
from attnjax.ops.spatial import reduced as R

__all__ = ["ReducedSpatialAttention", "ReducedConfig", "MECHANISMS", "reduced_config",
           "param_specs", "forward", "make_factory", "make_linen_factory"]

MECHANISMS = ("pvt", "twins", "hilo", "s2a", "davit", "crossformer")
_MODES = {"twins": ("dual", "lsa", "gsa"), "davit": ("dual", "window", "channel"),
          "crossformer": ("dual", "sda", "lda")}
_UNITS = {  # mechanism -> mode -> sub-layer kinds, in order
    "pvt": {None: ("sra",)},
    "twins": {"dual": ("win", "sra"), "lsa": ("win",), "gsa": ("sra",)},
    "hilo": {None: ("hilo",)},
    "s2a": {None: ("s2a",)},
    "davit": {"dual": ("win", "chan"), "window": ("win",), "channel": ("chan",)},
    "crossformer": {"dual": ("sda", "lda"), "sda": ("sda",), "lda": ("lda",)},
}
_OPTIONS = {  # mechanism -> its own options with defaults (sized for a 4x4 map)
    "pvt": dict(sr_ratio=2),
    "twins": dict(mode="dual", window=2),
    "hilo": dict(window=2, alpha=0.5),
    "s2a": dict(sr_ratio=2, qk_ratio=2, local_perception=True),
    "davit": dict(mode="dual", window=2, num_groups=None),
    "crossformer": dict(mode="dual", group_size=2, dpb_dim=None),
}
_COMMON = dict(implementation=None, dtype=None, param_dtype=jnp.float32, rope=None,
               rope_base=10000.0, dropout_rate=0.0, use_bias=False)


@dataclasses.dataclass(frozen=True)
class ReducedConfig:
  """Validated configuration of a `ReducedSpatialAttention` layer."""

  mechanism: str
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  units: tuple
  options: tuple  # the mechanism's options, (name, value) sorted
  implementation: Any
  dtype: Any
  param_dtype: Any
  use_bias: bool
  rope: Any = None
  rope_base: float = 10000.0
  dropout_rate: float = 0.0

  @property
  def opts(self) -> dict:
    return dict(self.options)


def reduced_config(mechanism, d_model, num_heads, *, num_kv_heads=None, head_dim=None, **options):
  """Validates `options` for `mechanism` and returns a `ReducedConfig` (ValueError/TypeError
  naming a bad option and what it expects)."""
  own, common = _opt.split_options(mechanism, options, _OPTIONS.get(mechanism, {}), _COMMON,
                                   mechanisms=MECHANISMS)
  num_kv_heads, head_dim = _opt.head_layout(d_model, num_heads, num_kv_heads, head_dim)
  mode = own.get("mode")
  if mechanism in _MODES and mode not in _MODES[mechanism]:
    raise ValueError(f"mode must be one of {_MODES[mechanism]} for variant {mechanism!r}, got "
                     f"mode={mode!r}")
  units = _UNITS[mechanism][mode]
  rope = common["rope"]
  if "chan" in units:
    _opt.reject_common(mechanism, common, dropout=False,
                       rope="channel attention's tokens are channels, with no map position")
  if mechanism == "s2a":
    _positive_int("qk_ratio", own["qk_ratio"])
  qk_dim = head_dim // own["qk_ratio"] if mechanism == "s2a" else head_dim
  _opt.check_rope(mechanism, rope, common["rope_base"], kinds=R.ROPE_KINDS, head_dim=qk_dim)
  if rope == "mixed" and num_kv_heads != num_heads:
    raise ValueError(f"rope='mixed' rotates keys with per-head frequencies: num_kv_heads must "
                     f"equal num_heads={num_heads}, got num_kv_heads={num_kv_heads}")
  dropout_rate = _opt.check_dropout_rate(common["dropout_rate"])
  for name in ("sr_ratio", "window", "group_size"):
    if name in own:
      R._pair(name, own[name])  # pylint: disable=protected-access
      own[name] = tuple(own[name]) if isinstance(own[name], list) else own[name]
  if mechanism == "hilo":
    alpha = own["alpha"]
    lo = round(float(alpha) * num_heads)
    if not 0.0 <= float(alpha) <= 1.0 or (lo * num_kv_heads) % num_heads:
      raise ValueError(f"alpha must be in [0, 1] with round(alpha * num_heads) * num_kv_heads a "
                       f"multiple of num_heads, got alpha={alpha!r}, num_heads={num_heads}, "
                       f"num_kv_heads={num_kv_heads}")
  if mechanism == "s2a":
    if head_dim % own["qk_ratio"]:
      raise ValueError(f"qk_ratio must divide head_dim={head_dim}, got qk_ratio={own['qk_ratio']}")
  if "chan" in units:
    if num_kv_heads != num_heads:
      raise ValueError(f"channel attention pairs channels one to one: num_kv_heads must equal "
                       f"num_heads={num_heads}, got num_kv_heads={num_kv_heads}")
    g = own["num_groups"]
    if g is None:
      own["num_groups"] = num_heads
    elif isinstance(g, bool) or not isinstance(g, int) or g <= 0 or (num_heads * head_dim) % g:
      raise ValueError(f"num_groups must be a positive divisor of num_heads * head_dim="
                       f"{num_heads * head_dim}, got num_groups={g!r}")
  if mechanism == "crossformer":
    if own["dpb_dim"] is None:
      own["dpb_dim"] = max(d_model // 4, 8)
    _positive_int("dpb_dim", own["dpb_dim"])
  impl = common["implementation"]
  if isinstance(impl, list):
    impl = tuple(impl)
  return ReducedConfig(mechanism=mechanism, d_model=d_model, num_heads=num_heads,
                       num_kv_heads=num_kv_heads, head_dim=head_dim, units=units,
                       options=tuple(sorted(own.items())), implementation=impl,
                       dtype=_core._canonical_dtype("dtype", common["dtype"]),
                       param_dtype=_core._canonical_dtype("param_dtype", common["param_dtype"]),
                       use_bias=bool(common["use_bias"]), rope=rope,
                       rope_base=float(common["rope_base"]), dropout_rate=dropout_rate)


# ----------------------------------------------------------------------------- params

def _ones(key, shape, dtype=jnp.float32):
  del key
  return jnp.ones(shape, dtype)


def _zeros(key, shape, dtype=jnp.float32):
  del key
  return jnp.zeros(shape, dtype)


def _mixed_init(key, shape, dtype=jnp.float32):
  return _pos.init_rope_mixed_frequencies(key, shape[0], 2 * shape[1], shape[2]).astype(dtype)


def _unit_specs(cfg: ReducedConfig, unit: str) -> dict[str, ParamSpec]:
  D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  o = cfg.opts
  Hqk = H // o["qk_ratio"] if unit == "s2a" else H
  dense = _core._dense_init  # pylint: disable=protected-access
  specs = {
      "q_kernel": ParamSpec((D, N, Hqk), dense(0, (1, 2)), ("embed", "heads", "head_dim")),
      "k_kernel": ParamSpec((D, K, Hqk), dense(0, (1, 2)), ("embed", "kv_heads", "head_dim")),
      "v_kernel": ParamSpec((D, K, H), dense(0, (1, 2)), ("embed", "kv_heads", "head_dim")),
      "o_kernel": ParamSpec((N, H, D), dense((0, 1), 2), ("heads", "head_dim", "embed")),
  }
  if cfg.use_bias:
    specs["q_bias"] = ParamSpec((N, Hqk), _zeros, ("heads", "head_dim"))
    specs["k_bias"] = ParamSpec((K, Hqk), _zeros, ("kv_heads", "head_dim"))
    specs["v_bias"] = ParamSpec((K, H), _zeros, ("kv_heads", "head_dim"))
    specs["o_bias"] = ParamSpec((D,), _zeros, ("embed",))
  if unit == "sra":
    rh, rw = R._pair("sr_ratio", o.get("sr_ratio", o.get("window")))  # pylint: disable=protected-access
    if (rh, rw) != (1, 1):
      specs["sr_kernel"] = ParamSpec((rh * rw * D, D), dense(0, 1), (None, "embed"))
      specs["sr_bias"] = ParamSpec((D,), _zeros, ("embed",))
      specs["sr_norm_scale"] = ParamSpec((D,), _ones, ("embed",))
      specs["sr_norm_bias"] = ParamSpec((D,), _zeros, ("embed",))
  if cfg.rope == "mixed":
    specs["rope_freqs"] = ParamSpec((N, Hqk // 2, 2), _mixed_init, ("heads", None, None))
  if unit == "s2a" and o["local_perception"]:
    specs["lp_kernel"] = ParamSpec((3, 3, K, H), jax.nn.initializers.normal(0.02),
                                   (None, None, "kv_heads", "head_dim"))
  if unit in ("sda", "lda"):
    P = o["dpb_dim"]
    init = jax.nn.initializers.normal(0.02)
    specs.update({
        "dpb_w0": ParamSpec((2, P), jax.nn.initializers.normal(1.0), (None, None)),
        "dpb_b0": ParamSpec((P,), _zeros, (None,)),
        "dpb_ln1_scale": ParamSpec((P,), _ones, (None,)),
        "dpb_ln1_bias": ParamSpec((P,), _zeros, (None,)),
        "dpb_w1": ParamSpec((P, P), dense(0, 1), (None, None)),
        "dpb_b1": ParamSpec((P,), _zeros, (None,)),
        "dpb_ln2_scale": ParamSpec((P,), _ones, (None,)),
        "dpb_ln2_bias": ParamSpec((P,), _zeros, (None,)),
        "dpb_w2": ParamSpec((P, N), init, (None, "heads")),
        "dpb_b2": ParamSpec((N,), _zeros, ("heads",)),
    })
  return specs


def param_specs(cfg: ReducedConfig) -> dict[str, ParamSpec]:
  """Parameters `'<unit>_<name>'` of every sub-layer: `q_kernel [D,N,H]`, `k_kernel
  [D,K,H]`, `v_kernel [D,K,H]`, `o_kernel [N,H,D]` (+ biases); 'sra': `sr_kernel
  [r*r*D, D]`, `sr_bias`, `sr_norm_scale/bias [D]`; 's2a': `lp_kernel [3,3,K,H]`;
  'sda'/'lda': the DPB MLP `dpb_*`; `rope='mixed'`: `rope_freqs [N, H/2, 2]`."""
  out = {}
  for unit in cfg.units:
    for name, spec in _unit_specs(cfg, unit).items():
      out[f"{unit}_{name}"] = spec
  return out


# ----------------------------------------------------------------------------- forward

def _layer_norm(x, scale, bias, eps=1e-5):
  xf = x.astype(jnp.float32)
  mu = jnp.mean(xf, -1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mu), -1, keepdims=True)
  y = (xf - mu) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(x.dtype)


def _sr_reduce(x, p, r, dtype):
  """PVT's reduction: `LN(conv_{r x r, stride r}(x))` as patchify + matmul."""
  B, Hh, Ww, D = x.shape
  rh, rw = r
  if Hh % rh or Ww % rw:
    raise ValueError(f"sr_ratio={r} must divide the token map (Hh, Ww)={(Hh, Ww)}")
  patches = x.reshape(B, Hh // rh, rh, Ww // rw, rw, D).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(B, Hh // rh, Ww // rw, rh * rw * D)
  y = jnp.einsum("bhwc,cd->bhwd", patches, p["sr_kernel"].astype(dtype))
  y = y + p["sr_bias"].astype(dtype)
  return _layer_norm(y, p["sr_norm_scale"], p["sr_norm_bias"])


def _depthwise3x3(v_BHWKH, kernel):
  """3x3 depthwise convolution (zero padding) of a `[B, Hh, Ww, K, H]` map."""
  B, Hh, Ww, K, H = v_BHWKH.shape
  x = v_BHWKH.reshape(B, Hh, Ww, K * H)
  w = kernel.astype(x.dtype).reshape(3, 3, 1, K * H)
  y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   feature_group_count=K * H)
  return y.reshape(v_BHWKH.shape)


def _unit_forward(cfg: ReducedConfig, unit: str, p: dict, x, dtype, positions):
  o = cfg.opts
  impl = cfg.implementation
  Hh, Ww = x.shape[1:3]

  def proj(inp, name, eq="bhwd,dnk->bhwnk"):
    out = jnp.einsum(eq, inp, p[f"{name}_kernel"].astype(dtype))
    if cfg.use_bias:
      out = out + p[f"{name}_bias"].astype(dtype)
    return out

  q = proj(x, "q")
  kv_in = x
  if unit == "sra":
    r = R._pair("sr_ratio", o.get("sr_ratio", o.get("window")))  # pylint: disable=protected-access
    if r != (1, 1):
      kv_in = _sr_reduce(x, p, r, dtype)
  k, v = proj(kv_in, "k"), proj(kv_in, "v")
  rope = dict(rope=cfg.rope, rope_base=cfg.rope_base, rope_freqs=p.get("rope_freqs"))
  if cfg.rope is not None and unit not in ("hilo", "s2a"):  # the ops rotate HiLo / S2A
    k_pos = positions if kv_in is x else R.pooled_positions((Hh, Ww), r, positions=positions)
    q = R.rope_map(q, positions, **rope)
    k = R.rope_map(k, k_pos, **rope)
  if unit == "win":
    w = R._pair("window", o["window"])  # pylint: disable=protected-access
    if Hh % w[0] or Ww % w[1]:
      raise ValueError(f"window={w} must divide the token map (Hh, Ww)={(Hh, Ww)}")
    attn = _core._attention_fn()  # pylint: disable=protected-access
    B, N = x.shape[0], cfg.num_heads
    out = attn(q.reshape(B, Hh * Ww, N, -1), k.reshape(B, Hh * Ww, cfg.num_kv_heads, -1),
               v.reshape(B, Hh * Ww, cfg.num_kv_heads, -1), mask=_masks.window((Hh, Ww), w),
               implementation=impl).reshape(q.shape[:4] + (v.shape[-1],))
  elif unit == "sra":
    out = R.spatial_reduction_attention(q, k, v, sr_ratio=1, implementation=impl)
  elif unit == "hilo":
    lo = round(float(o["alpha"]) * cfg.num_heads)
    out = R.hilo_attention(q, k, v, window_size=o["window"], lo_heads=lo, positions=positions,
                           implementation=impl, **rope)
  elif unit == "s2a":
    out = R.spatial_reduction_attention(q, k, v, sr_ratio=o["sr_ratio"], positions=positions,
                                        implementation=impl, **rope)
    if o["local_perception"]:
      out = out + jnp.repeat(_depthwise3x3(v, p["lp_kernel"]), cfg.num_heads // cfg.num_kv_heads, 3)
  elif unit == "chan":
    out = R.channel_group_attention(q, k, v, num_groups=o["num_groups"], implementation=impl)
  else:  # sda / lda
    dpb = R.dynamic_position_bias({n[4:]: a for n, a in p.items() if n.startswith("dpb_")},
                                  o["group_size"])
    out = R.long_short_distance_attention(q, k, v, group_size=o["group_size"],
                                          mode="short" if unit == "sda" else "long", dpb=dpb,
                                          implementation=impl)
  y = jnp.einsum("bhwnk,nkd->bhwd", out.astype(dtype), p["o_kernel"].astype(dtype))
  if cfg.use_bias:
    y = y + p["o_bias"].astype(dtype)
  return y


def check_positions(cfg: ReducedConfig, x, positions):
  """Validates the layers' `positions=` against `x [B, Hh, Ww, D]`: None, or the RoPE
  coordinates `[B, Hh*Ww, 2]` (row, column) of `x`'s tokens, row-major, integer or float
  (ValueError naming `positions` and that shape; TypeError for another dtype); only with
  `rope` set. Returns None or the positions as float32."""
  if positions is None:
    return None
  if cfg.rope is None:
    raise ValueError(f"positions were given but variant {cfg.mechanism!r} has rope=None "
                     f"(positions are RoPE coordinates): build it with rope='axial' or "
                     f"'mixed', or pass positions=None")
  return R.check_positions(positions, x.shape[1:3], x.shape[0], allow_shared=False)


def forward(cfg: ReducedConfig, params: dict, x, *, positions=None, dropout=None):
  """The layer on a parameter dict: `x [B, Hh, Ww, D] -> [B, Hh, Ww, D]`; one sub-layer
  `f1(x)`, or two: `f1(x) + f2(x + f1(x))`; `dropout` (a callable or None) is applied to
  the result. `positions`: None (RoPE at the grid coordinates) or the RoPE coordinates
  `[B, Hh*Ww, 2]` of `x`'s tokens (row-major; see `check_positions`), shared by both
  sub-layers; reduced keys rotate at the mean position of their cell."""
  if not hasattr(x, "ndim") or x.ndim != 4 or x.shape[-1] != cfg.d_model:
    raise ValueError(f"x must be a token map [B, Hh, Ww, D={cfg.d_model}] for variant "
                     f"{cfg.mechanism!r}, got shape {getattr(x, 'shape', None)}")
  positions = check_positions(cfg, x, positions)
  if cfg.rope is not None and positions is None:  # the grid, as explicit per-row positions
    grid = jnp.asarray(_pos.grid_coordinates(x.shape[1:3]), jnp.float32)
    positions = jnp.broadcast_to(grid, (x.shape[0],) + grid.shape)
  dtype = cfg.dtype or x.dtype
  x = x.astype(dtype)
  y = None
  for unit in cfg.units:
    p = {n[len(unit) + 1:]: a for n, a in params.items() if n.startswith(unit + "_")}
    inp = x if y is None else x + y
    out = _unit_forward(cfg, unit, p, inp, dtype, positions)
    y = out if y is None else y + out
  if dropout is not None:
    y = dropout(y)
  return _core.constrain(y, ("batch", None, None, "embed"))


def _check_call(segment_ids, cache):
  if segment_ids is not None or cache is not None:
    raise ValueError("spatial-reduction variants take no segment_ids and no cache; expected "
                     "segment_ids=None, cache=None")


class ReducedSpatialAttention(nnx.Module):
  """Spatial-reduction / channel / long-short attention layer (see the module docstring).

  Args:
    d_model, num_heads, num_kv_heads, head_dim: as in `MultiHeadAttention`.
    mechanism: one of `MECHANISMS`.
    **options: the mechanism's options (`sr_ratio`, `mode`, `window`, `alpha`,
      `qk_ratio`, `local_perception`, `num_groups`, `group_size`, `dpb_dim`) and
      `implementation`, `dtype`, `param_dtype`, `use_bias`, `rope`, `rope_base`,
      `dropout_rate` (see the module docstring).
    rngs: `nnx.Rngs` ('params'; 'dropout' when `dropout_rate > 0`).

  Call: `layer(x [B, Hh, Ww, D], *, positions=None, deterministic=True) -> [B, Hh, Ww,
  D]`; `positions [B, Hh*Ww, 2]`: RoPE coordinates (row, column) of the tokens, row-major
  (default the grid `(y, x)`; needs `rope`); no `segment_ids`, no `cache`.
  """

  def __init__(self, d_model: int, num_heads: int, *, mechanism: str, num_kv_heads=None,
               head_dim=None, rngs: nnx.Rngs, **options):
    self.config = reduced_config(mechanism, d_model, num_heads, num_kv_heads=num_kv_heads,
                                 head_dim=head_dim, **options)
    specs = param_specs(self.config)
    self._param_names = tuple(specs)
    for name, spec in specs.items():
      setattr(self, name, make_param(rngs, spec, self.config.param_dtype))
    self.dropout = nnx.Dropout(self.config.dropout_rate, rngs=rngs)

  def params_dict(self) -> dict:
    return {name: getattr(self, name)[...] for name in self._param_names}

  def __call__(self, x, *, segment_ids=None, positions=None, cache=None,
               deterministic: bool = True):
    _check_call(segment_ids, cache)
    dropout = None
    if self.config.dropout_rate > 0 and not deterministic:
      dropout = lambda y: self.dropout(y, deterministic=False)
    return forward(self.config, self.params_dict(), x, positions=positions, dropout=dropout)


# The registry factories: make_factory(mechanism) (NNX), make_linen_factory(mechanism).
make_factory, make_linen_factory = _core.mechanism_factories(
    ReducedSpatialAttention, "attnjax.layers.reduced_linen", "ReducedSpatialAttention")
