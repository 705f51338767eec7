"""Flax NNX layers for the mask-based spatial ops, registered in `attnjax.variants`.

One layer class, `SpatialAttention(mechanism=...)`, owns the q/k/v/out projections (the
parameter names, initialisers and logical axis names of `MultiHeadAttention`) plus the
mechanism's own parameters, and calls the op of `attnjax.ops.spatial` named by
`mechanism` on the `[B, Hh, Ww, N, H]` map of the input `x [B, Hh, Ww, D]` (the token
grid the models feed to 'spatial' variants):

- 'halo' (`halo_attention`): options `block_size=2`, `halo_size=1`.
- 'cswin' (`stripe_attention`): `stripe_width=2`; LePE `lepe=True`: a depthwise 3x3 conv
  of V (per kv head and channel, zero padding, params `lepe_kernel [3, 3, K, Hv]`,
  `lepe_bias [K, Hv]`) added to each head's output.
- 'ccnet' (`criss_cross_attention`): `recurrence=2` passes with shared weights:
  `h_0 = x`, `h_r = h_{r-1} + cca(h_{r-1})` (CCNet's module residual), output
  `cca(h_{R-1})`; the transformer block adds its own residual.
- 'maxvit_block' (`block_attention`): `block_size=2`, `rpb=True` (`rpb [N, 2P-1, 2P-1]`).
- 'maxvit_grid' (`grid_attention`): `grid_size=2`, `rpb=True` (`rpb [N, 2G-1, 2G-1]`).

MaxViT is registered as two variants (block: local windows; grid: dilated global) that a
model alternates per layer (`layers_attention`), as MaxViT's block stacks block- then
grid-attention. The defaults fit the 4x4 grid of `configs/digits_vit.py`; the papers use
larger values (HaloNet b=8, h=3; CSWin sw=1, 2, 7 per stage; MaxViT P=G=7).

Swin and NAT stay mask presets of `MultiHeadAttention` ('swin', 'neighborhood').

The validation (`spatial_config`) and the forward pass on a parameter dict (`forward`)
are plain functions shared with the Linen twin
`attnjax.layers.spatial_masked_linen.SpatialAttention`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.layers import _core
from attnjax.layers._core import AttentionConfig, ParamSpec, constrain
from attnjax.layers.attention import make_param
from attnjax.ops import spatial as _ops

__all__ = ["SpatialAttention", "SpatialConfig", "MECHANISMS", "spatial_config", "forward",
           "make_factory", "make_linen_factory", "depthwise_conv3x3"]

MECHANISMS = ("halo", "cswin", "ccnet", "maxvit_block", "maxvit_grid")

# mechanism -> its own options with defaults.
_OPTIONS = {
    "halo": {"block_size": 2, "halo_size": 1},
    "cswin": {"stripe_width": 2, "lepe": True},
    "ccnet": {"recurrence": 2},
    "maxvit_block": {"block_size": 2, "rpb": True},
    "maxvit_grid": {"grid_size": 2, "rpb": True},
}
_ALL_OPTIONS = ("block_size", "halo_size", "stripe_width", "lepe", "recurrence", "grid_size",
                "rpb")


@dataclasses.dataclass(frozen=True)
class SpatialConfig:
  """Validated options of a `SpatialAttention` layer (shared by the NNX and Linen classes)."""

  cfg: AttentionConfig
  mechanism: str
  options: tuple  # the mechanism's own options as sorted (name, value) pairs

  @property
  def opts(self) -> dict:
    return dict(self.options)


def _size(name, value):
  if isinstance(value, (list, tuple)):
    value = tuple(value)
    ok = len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
  else:
    ok = isinstance(value, int) and not isinstance(value, bool)
  if not ok:
    raise ValueError(f"{name} must be an int or a pair of ints, got {name}={value!r}")
  return value


def _pair(value):
  return tuple(value) if isinstance(value, tuple) else (value, value)


def spatial_config(d_model: int, num_heads: int, *, mechanism: str, num_kv_heads=None,
                   head_dim=None, v_head_dim=None, use_bias: bool = False, qk_norm: bool = False,
                   rope: str | None = None, rope_base: float = 10000.0, scale=None,
                   implementation: Any = None, block_sizes: Any = None, dropout_rate: float = 0.0,
                   dtype: Any = None, param_dtype: Any = jnp.float32,
                   **options) -> tuple[SpatialConfig, dict]:
  """Validates the options of `SpatialAttention`; returns `(SpatialConfig, param specs)`."""
  if mechanism not in MECHANISMS:
    raise ValueError(f"mechanism must be one of {MECHANISMS}, got mechanism={mechanism!r}")
  own = dict(_OPTIONS[mechanism])
  for k, v in options.items():
    if k not in own:
      if k in _ALL_OPTIONS:
        raise ValueError(f"{k} is not an option of spatial variant {mechanism!r}; its options "
                         f"are {sorted(own)}")
      raise TypeError(f"spatial variant {mechanism!r} got an unknown option {k!r}; its options "
                      f"are {sorted(own)} and the projection options of MultiHeadAttention")
    if v is not None:
      own[k] = v
  for k in ("block_size", "halo_size", "stripe_width", "grid_size"):
    if k in own:
      own[k] = _size(k, own[k])
  if "recurrence" in own and (isinstance(own["recurrence"], bool)
                              or not isinstance(own["recurrence"], int) or own["recurrence"] < 1):
    raise ValueError(f"recurrence must be a positive int, got recurrence={own['recurrence']!r}")
  for k in ("lepe", "rpb"):
    if k in own and not isinstance(own[k], bool):
      raise TypeError(f"{k} must be a bool, got {k}={own[k]!r}")
  if rope not in (None, "axial", "mixed"):
    raise ValueError(f"rope must be None, 'axial' or 'mixed' for spatial variants (positions are "
                     f"grid coordinates), got rope={rope!r}")
  cfg = AttentionConfig(d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                        head_dim=head_dim, v_head_dim=v_head_dim, use_bias=use_bias,
                        qk_norm=qk_norm, rope=rope, rope_base=rope_base, scale=scale,
                        implementation=implementation, block_sizes=block_sizes,
                        dropout_rate=dropout_rate, dtype=dtype, param_dtype=param_dtype)
  specs = _core.param_specs(cfg)
  N, K, Hv = cfg.num_heads, cfg.num_kv_heads, cfg.v_head_dim
  table_init = jax.nn.initializers.truncated_normal(0.02)
  if own.get("rpb"):
    size = _pair(own["block_size"] if mechanism == "maxvit_block" else own["grid_size"])
    specs["rpb"] = ParamSpec((N, 2 * size[0] - 1, 2 * size[1] - 1), table_init,
                             ("heads", None, None))
  if own.get("lepe"):
    specs["lepe_kernel"] = ParamSpec((3, 3, K, Hv), jax.nn.initializers.normal(1.0 / 3.0),
                                     (None, None, "kv_heads", "head_dim"))
    specs["lepe_bias"] = ParamSpec((K, Hv), _core._zeros, ("kv_heads", "head_dim"))  # pylint: disable=protected-access
  return SpatialConfig(cfg, mechanism, tuple(sorted(own.items()))), specs


def depthwise_conv3x3(x, kernel, bias):
  """Depthwise 3x3 convolution with zero padding ("SAME"), float32 accumulation.

  `x [B, Hh, Ww, K, C]`, `kernel [3, 3, K, C]`, `bias [K, C]` -> `[B, Hh, Ww, K, C]`:
  `y[y, x] = bias + sum_{a, b in {0,1,2}} kernel[a, b] * x[y + a - 1, x + b - 1]`.
  """
  Hh, Ww = x.shape[1], x.shape[2]
  xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0)))
  y = bias.astype(jnp.float32)
  for a in range(3):
    for b in range(3):
      y = y + xp[:, a:a + Hh, b:b + Ww] * kernel[a, b].astype(jnp.float32)
  return y


def _attend(sc: SpatialConfig, p: dict, x, positions):
  """One attention pass on `x [B, Hh, Ww, D]` -> `[B, Hh, Ww, D]`."""
  cfg, o = sc.cfg, sc.opts
  B, Hh, Ww, D = x.shape
  grid = (Hh, Ww)
  T = Hh * Ww
  dtype = cfg.dtype or x.dtype
  x_BTD = x.reshape(B, T, D).astype(dtype)

  def proj(name, eq):
    out = jnp.einsum(eq, x_BTD, p[f"{name}_kernel"].astype(dtype))
    if f"{name}_bias" in p:
      out = out + p[f"{name}_bias"].astype(dtype)
    return out

  q = proj("q", "btd,dnh->btnh")
  k = proj("k", "btd,dkh->btkh")
  v = proj("v", "btd,dkh->btkh")
  q = constrain(q, ("batch", "length", "heads", None))
  if cfg.qk_norm:
    q = _core._rms_norm(q, p["q_norm"])  # pylint: disable=protected-access
    k = _core._rms_norm(k, p["k_norm"])  # pylint: disable=protected-access
  if cfg.rope is not None:
    pos = positions if positions is not None else _core._default_positions(cfg, grid, B, 0)  # pylint: disable=protected-access
    pos = jnp.asarray(pos)
    q = _core._apply_rope(cfg, p, q, pos)  # pylint: disable=protected-access
    k = _core._apply_rope(cfg, p, k, pos)  # pylint: disable=protected-access
  to_map = lambda a: a.reshape((B, Hh, Ww) + a.shape[2:])
  q, k, v = to_map(q), to_map(k), to_map(v)
  kw = dict(scale=cfg.scale, implementation=cfg.implementation, block_sizes=cfg.block_sizes)
  m = sc.mechanism
  if m == "halo":
    out = _ops.halo_attention(q, k, v, block_size=o["block_size"], halo_size=o["halo_size"], **kw)
  elif m == "cswin":
    out = _ops.stripe_attention(q, k, v, stripe_width=o["stripe_width"], **kw)
    if o["lepe"]:
      lepe = depthwise_conv3x3(v, p["lepe_kernel"], p["lepe_bias"])
      lepe = jnp.repeat(lepe, cfg.num_heads // cfg.num_kv_heads, axis=-2)
      out = (out.astype(jnp.float32) + lepe).astype(out.dtype)
  elif m == "ccnet":
    out = _ops.criss_cross_attention(q, k, v, **kw)
  elif m == "maxvit_block":
    out = _ops.block_attention(q, k, v, block_size=o["block_size"], rpb=p.get("rpb"), **kw)
  else:
    out = _ops.grid_attention(q, k, v, grid_size=o["grid_size"], rpb=p.get("rpb"), **kw)
  y = jnp.einsum("bhwnv,nvd->bhwd", out.astype(dtype), p["o_kernel"].astype(dtype))
  if "o_bias" in p:
    y = y + p["o_bias"].astype(dtype)
  return y


def forward(sc: SpatialConfig, params: dict, x, *, segment_ids=None, positions=None, cache=None,
            dropout=None):
  """The layer's forward pass on a parameter dict (see `SpatialAttention`)."""
  cfg = sc.cfg
  if not hasattr(x, "ndim") or x.ndim != 4 or x.shape[-1] != cfg.d_model:
    raise ValueError(f"x must be [B, Hh, Ww, d_model={cfg.d_model}] (spatial variant "
                     f"{sc.mechanism!r} needs the token grid), got shape "
                     f"{getattr(x, 'shape', None)}")
  if segment_ids is not None:
    raise ValueError(f"segment_ids are not supported by the spatial variant {sc.mechanism!r}; "
                     f"expected segment_ids=None")
  if cache is not None:
    raise ValueError(f"spatial variant {sc.mechanism!r} cannot decode with a cache; expected "
                     f"cache=None")
  if positions is not None and cfg.rope is None:
    raise ValueError("positions were given but the layer has rope=None")
  if sc.mechanism == "ccnet":
    h = x
    for _ in range(sc.opts["recurrence"] - 1):
      h = h + _attend(sc, params, h, positions).astype(h.dtype)
    y = _attend(sc, params, h, positions)
  else:
    y = _attend(sc, params, x, positions)
  if dropout is not None:
    y = dropout(y)
  return constrain(y, ("batch", None, None, "embed"))


class SpatialAttention(nnx.Module):
  """Mask-based spatial self-attention (HaloNet, CSWin + LePE, CCNet, MaxViT block/grid),
  Flax NNX (Linen twin: `attnjax.layers.spatial_masked_linen.SpatialAttention`).

  `y = concat_n op(q, k, v)_n @ Wo` with `q = x Wq [B,Hh,Ww,N,H]`, `k = x Wk`, `v = x Wv`
  (`K` kv heads, GQA) and `op` the function of `attnjax.ops.spatial` named by `mechanism`
  (see the module table: CSWin adds LePE to each head's output, CCNet applies the layer
  `recurrence` times with shared weights, MaxViT adds a relative position bias table).

  Papers: "Scaling Local Self-Attention for Parameter Efficient Visual Backbones" (halo);
  "CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows"
  (cswin); "CCNet: Criss-Cross Attention for Semantic Segmentation" (ccnet); "MaxViT:
  Multi-Axis Vision Transformer" (maxvit_block, maxvit_grid).

  Args:
    d_model: D. num_heads: N. num_kv_heads: K (N % K == 0, default N).
    head_dim: H (default D // N). v_head_dim: Hv (default H).
    mechanism: one of `MECHANISMS`.
    block_size, halo_size, stripe_width, lepe, recurrence, grid_size, rpb: the mechanism's
      options (module table); an option of another mechanism raises ValueError.
    use_bias, qk_norm, rope (None | 'axial' | 'mixed'), rope_base, scale, implementation,
      block_sizes, dropout_rate (on the output), dtype, param_dtype: as in
      `MultiHeadAttention`.
    rngs: `nnx.Rngs`.

  Call: `layer(x [B, Hh, Ww, D], *, segment_ids=None, positions=None, cache=None,
  deterministic=True) -> [B, Hh, Ww, D]` (no segment ids, no cache).
  """

  def __init__(self, d_model: int, num_heads: int, *, mechanism: str, rngs: nnx.Rngs, **options):
    if not isinstance(rngs, nnx.Rngs):
      raise TypeError(f"rngs must be an nnx.Rngs, got {type(rngs).__name__}")
    sc, specs = spatial_config(d_model, num_heads, mechanism=mechanism, **options)
    self.sc, self.cfg, self.mechanism = sc, sc.cfg, mechanism
    self._param_names = tuple(specs)
    for name, spec in specs.items():
      setattr(self, name, make_param(rngs, spec, self.cfg.param_dtype))
    self.dropout = nnx.Dropout(self.cfg.dropout_rate, rngs=rngs)

  def params_dict(self) -> dict:
    """The parameter arrays by name (the names the Linen twin uses)."""
    return {name: getattr(self, name)[...] for name in self._param_names}

  def __call__(self, x, *, segment_ids=None, positions=None, cache=None,
               deterministic: bool = True):
    dropout = None
    if self.cfg.dropout_rate > 0 and not deterministic:
      dropout = lambda y: self.dropout(y, deterministic=False)
    return forward(self.sc, self.params_dict(), x, segment_ids=segment_ids, positions=positions,
                   cache=cache, dropout=dropout)


# ------------------------------------------------------------------------------ registry
# Factories in the `attnjax.variants` convention; `variants._register_builtins` registers
# one per mechanism (nothing is registered at import).


def make_factory(mechanism: str):
  """The NNX factory building `SpatialAttention(mechanism=mechanism)`."""

  def factory(*, d_model, num_heads, num_kv_heads=None, head_dim=None, rngs, **options):
    return SpatialAttention(d_model, num_heads, mechanism=mechanism, num_kv_heads=num_kv_heads,
                            head_dim=head_dim, rngs=rngs, **options)
  factory.__name__ = f"{mechanism}_factory"
  factory.__doc__ = (f"`SpatialAttention(mechanism={mechanism!r})` (see "
                     f"attnjax.layers.spatial_masked); options {_OPTIONS[mechanism]}.")
  return factory


def make_linen_factory(mechanism: str):
  """The Linen factory (the NNX signature minus `rngs`) building
  `spatial_masked_linen.SpatialAttention(mechanism=mechanism)`."""

  def linen_factory(*, d_model, num_heads, num_kv_heads=None, head_dim=None, **options):
    from attnjax.layers import spatial_masked_linen  # pylint: disable=import-outside-toplevel
    for k, v in list(options.items()):
      if isinstance(v, list):  # Linen fields must be hashable
        options[k] = tuple(v)
    return spatial_masked_linen.SpatialAttention(
        d_model=d_model, num_heads=num_heads, mechanism=mechanism, num_kv_heads=num_kv_heads,
        head_dim=head_dim, **options)
  linen_factory.__name__ = f"{mechanism}_linen_factory"
  return linen_factory

