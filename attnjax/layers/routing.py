"""Flax NNX layers for the routing family (catalog C01-C04): MoBA, BiFormer, dynamic mask
attention and Sparsifiner.

One layer class, `RoutingAttention(mechanism=...)`, owns the projections (the names,
initialisers and logical axes of `MultiHeadAttention`: `q_kernel [D,N,H]`, `k_kernel
[D,K,H]`, `v_kernel [D,K,H]`, `o_kernel [N,H,D]`, + biases) and the mechanism's own
parameters, and calls the ops of `attnjax.ops.routing`.

Registry names (kind; options; paper):
- 'moba' (sequence, causal LM): `block_size`, `top_k`, `causal`, `rope` (None | '1d'),
  `rope_base`
  ("MoBA: Mixture of Block Attention for Long-Context LLMs"). `top_k` is capped at the
  number of key blocks of the input (short sequences attend to every block).
- 'biformer' (spatial `[B, Hh, Ww, D]`): `num_regions`, `top_k`, `lce_kernel` (the local
  context enhancement, a `lce_kernel x lce_kernel` depthwise conv of V added to the
  attention output before `o_kernel`; 0 disables it) ("BiFormer: Vision Transformer with
  Bi-Level Routing Attention").
- 'dynamic_mask' (sequence): `keep_window`, `causal`, `rope`, `rope_base`; the per-key bias
  `delta_j,g = exp(A_g * softplus(v_j . W_dt)_g)` per kv head from the values (`dt_kernel
  [K*H, K]`, `dt_bias [K]`, `dt_A [K]`) ("Trainable Dynamic Mask Sparse Attention").
- 'sparsifiner' (spatial, any `[B, *grid, D]` input): `keep_rate` (fraction of keys kept
  per query), `rank` (the predictor's reduced channel dim); the low-rank connectivity
  predictor `C = (x Wq') (x Wk')^T / sqrt(rank)` per head (`pq_kernel`, `pk_kernel
  [D,N,rank]`), trained by `distillation_loss(x)` against the layer's dense attention
  ("Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision
  Transformers"). The top-k choice passes no gradient to the predictor: without the
  distillation loss it stays at its initialisation.

The configuration (`routing_config`), the parameter specs (`param_specs`) and the forward
pass on a parameter dict (`forward`) are plain functions shared with the Linen twin
`attnjax.layers.routing_linen.RoutingAttention`. No decoding cache, no segment ids.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.layers import _core
from attnjax.layers import _options as _opt
from attnjax.layers._core import ParamSpec, _positive_int
from attnjax.layers.attention import make_param
from attnjax.ops import positional as _pos
from attnjax.ops import routing as R

__all__ = ["RoutingAttention", "RoutingConfig", "MECHANISMS", "KINDS", "routing_config",
           "param_specs", "forward", "distillation_loss", "make_factory", "make_linen_factory"]

MECHANISMS = ("moba", "biformer", "dynamic_mask", "sparsifiner")
KINDS = {"moba": "sequence", "biformer": "spatial", "dynamic_mask": "sequence",
         "sparsifiner": "spatial"}
_OPTIONS = {  # mechanism -> its own options with defaults (sized for runlocal)
    "moba": dict(block_size=16, top_k=2, causal=True, rope=None, rope_base=10000.0),
    "biformer": dict(num_regions=2, top_k=2, lce_kernel=5),
    "dynamic_mask": dict(keep_window=16, causal=True, rope=None, rope_base=10000.0),
    "sparsifiner": dict(keep_rate=0.25, rank=None),
}
_COMMON = dict(implementation=None, dtype=None, param_dtype=jnp.float32, use_bias=False,
               dropout_rate=0.0)


@dataclasses.dataclass(frozen=True)
class RoutingConfig:
  """Validated configuration of a `RoutingAttention` layer."""

  mechanism: str
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  options: tuple  # the mechanism's options, (name, value) sorted
  implementation: Any
  dtype: Any
  param_dtype: Any
  use_bias: bool

  @property
  def opts(self) -> dict:
    return dict(self.options)


def routing_config(mechanism, d_model, num_heads, *, num_kv_heads=None, head_dim=None,
                   **options) -> RoutingConfig:
  """Validates `options` for `mechanism` (ValueError/TypeError naming a bad option)."""
  own, common = _opt.split_options(mechanism, options, _OPTIONS.get(mechanism, {}), _COMMON,
                                   mechanisms=MECHANISMS)
  _opt.reject_common(mechanism, common)
  num_kv_heads, head_dim = _opt.head_layout(d_model, num_heads, num_kv_heads, head_dim)
  for name in ("block_size", "top_k", "num_regions", "keep_window"):
    if name in own:
      _positive_int(name, own[name])
  for name in ("causal",):
    if name in own and not isinstance(own[name], bool):
      raise TypeError(f"{name} must be a bool, got {name}={own[name]!r}")
  if "rope" in own and own["rope"] not in (None, "1d"):
    raise ValueError(f"rope must be None or '1d' for variant {mechanism!r}, got "
                     f"rope={own['rope']!r}")
  if mechanism == "biformer":
    lce = own["lce_kernel"]
    if isinstance(lce, bool) or not isinstance(lce, int) or lce < 0 or (lce and lce % 2 == 0):
      raise ValueError(f"lce_kernel must be 0 (no LCE) or a positive odd int, got "
                       f"lce_kernel={lce!r}")
  if mechanism == "sparsifiner":
    kr = own["keep_rate"]
    if isinstance(kr, bool) or not isinstance(kr, (int, float)) or not 0.0 < float(kr) <= 1.0:
      raise ValueError(f"keep_rate must be in (0, 1], got keep_rate={kr!r}")
    own["keep_rate"] = float(kr)
    if own["rank"] is None:
      own["rank"] = max(1, head_dim // 4)
    _positive_int("rank", own["rank"])
  impl = common["implementation"]
  if isinstance(impl, list):
    impl = tuple(impl)
  return RoutingConfig(mechanism=mechanism, d_model=d_model, num_heads=num_heads,
                       num_kv_heads=num_kv_heads, head_dim=head_dim,
                       options=tuple(sorted(own.items())), implementation=impl,
                       dtype=_core._canonical_dtype("dtype", common["dtype"]),
                       param_dtype=_core._canonical_dtype("param_dtype", common["param_dtype"]),
                       use_bias=bool(common["use_bias"]))


# ----------------------------------------------------------------------------- params

def _zeros(key, shape, dtype=jnp.float32):
  del key
  return jnp.zeros(shape, dtype)


def _ones(key, shape, dtype=jnp.float32):
  del key
  return jnp.ones(shape, dtype)


def param_specs(cfg: RoutingConfig) -> dict[str, ParamSpec]:
  """`q_kernel [D,N,H]`, `k_kernel [D,K,H]`, `v_kernel [D,K,H]`, `o_kernel [N,H,D]`
  (+ `*_bias`); biformer: `lce_kernel [k,k,K,H]`, `lce_bias [K,H]`; dynamic_mask:
  `dt_kernel [K*H,K]`, `dt_bias [K]`, `dt_A [K]`; sparsifiner: `pq_kernel`, `pk_kernel
  [D,N,rank]`."""
  D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  o = cfg.opts
  dense = _core._dense_init  # pylint: disable=protected-access
  specs = {
      "q_kernel": ParamSpec((D, N, H), dense(0, (1, 2)), ("embed", "heads", "head_dim")),
      "k_kernel": ParamSpec((D, K, H), dense(0, (1, 2)), ("embed", "kv_heads", "head_dim")),
      "v_kernel": ParamSpec((D, K, H), dense(0, (1, 2)), ("embed", "kv_heads", "head_dim")),
      "o_kernel": ParamSpec((N, H, D), dense((0, 1), 2), ("heads", "head_dim", "embed")),
  }
  if cfg.use_bias:
    specs["q_bias"] = ParamSpec((N, H), _zeros, ("heads", "head_dim"))
    specs["k_bias"] = ParamSpec((K, H), _zeros, ("kv_heads", "head_dim"))
    specs["v_bias"] = ParamSpec((K, H), _zeros, ("kv_heads", "head_dim"))
    specs["o_bias"] = ParamSpec((D,), _zeros, ("embed",))
  if cfg.mechanism == "biformer" and o["lce_kernel"]:
    kk = o["lce_kernel"]
    specs["lce_kernel"] = ParamSpec((kk, kk, K, H), jax.nn.initializers.normal(0.02),
                                    (None, None, "kv_heads", "head_dim"))
    specs["lce_bias"] = ParamSpec((K, H), _zeros, ("kv_heads", "head_dim"))
  if cfg.mechanism == "dynamic_mask":
    specs["dt_kernel"] = ParamSpec((K * H, K), dense(0, 1), (None, "kv_heads"))
    specs["dt_bias"] = ParamSpec((K,), _zeros, ("kv_heads",))
    specs["dt_A"] = ParamSpec((K,), _ones, ("kv_heads",))
  if cfg.mechanism == "sparsifiner":
    r = o["rank"]
    specs["pq_kernel"] = ParamSpec((D, N, r), dense(0, (1, 2)), ("embed", "heads", None))
    specs["pk_kernel"] = ParamSpec((D, N, r), dense(0, (1, 2)), ("embed", "heads", None))
  return specs


# ----------------------------------------------------------------------------- forward

def _check_call(cfg, segment_ids, cache):
  if segment_ids is not None or cache is not None:
    raise ValueError(f"variant {cfg.mechanism!r} takes no segment_ids or cache (no packing, no "
                     f"decoding), got segment_ids={segment_ids is not None}, "
                     f"cache={cache is not None}")


def _proj(cfg, p, x, name, eq, dtype):
  out = jnp.einsum(eq, x.astype(dtype), p[f"{name}_kernel"].astype(dtype))
  if cfg.use_bias:
    out = out + p[f"{name}_bias"].astype(dtype)
  return out


def _out(cfg, p, o, dtype, lead):
  y = jnp.einsum("...nh,nhd->...d", o.astype(dtype), p["o_kernel"].astype(dtype))
  if cfg.use_bias:
    y = y + p["o_bias"].astype(dtype)
  return y.reshape(lead + (cfg.d_model,))


def _rope(cfg, q, k, positions):
  o = cfg.opts
  if o.get("rope") is None:
    if positions is not None:
      raise ValueError(f"positions were given but variant {cfg.mechanism!r} has rope=None")
    return q, k
  B, T = q.shape[:2]
  pos = positions if positions is not None else jnp.broadcast_to(
      jnp.arange(T, dtype=jnp.int32), (B, T))
  pos = jnp.asarray(pos)
  if pos.shape != (B, T):
    raise ValueError(f"positions for rope='1d' must be [B, T] = {(B, T)}, got shape {pos.shape}")
  base = float(o["rope_base"])
  return _pos.apply_rope(q, pos, base=base), _pos.apply_rope(k, pos, base=base)


def _depthwise(v_BHWKH, kernel, bias):
  """`k x k` depthwise convolution (zero padding) of a `[B, Hh, Ww, K, H]` map."""
  B, Hh, Ww, K, H = v_BHWKH.shape
  kk = kernel.shape[0]
  x = v_BHWKH.reshape(B, Hh, Ww, K * H)
  w = kernel.astype(x.dtype).reshape(kk, kk, 1, K * H)
  y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   feature_group_count=K * H)
  return y.reshape(v_BHWKH.shape) + bias.astype(x.dtype)


def _sequence_input(cfg, x):
  if x.ndim < 3 or x.shape[-1] != cfg.d_model:
    raise ValueError(f"x must be [B, T, d_model={cfg.d_model}] (or [B, *grid, d_model]), got "
                     f"shape {tuple(x.shape)}")


def connectivity(cfg: RoutingConfig, params: dict, x_BTD):
  """Sparsifiner's low-rank predictor scores `[B, N, T, T]` (float32)."""
  r = cfg.opts["rank"]
  pq = jnp.einsum("btd,dnr->btnr", x_BTD.astype(jnp.float32),
                  params["pq_kernel"].astype(jnp.float32))
  pk = jnp.einsum("btd,dnr->btnr", x_BTD.astype(jnp.float32),
                  params["pk_kernel"].astype(jnp.float32))
  return jnp.einsum("btnr,bsnr->bnts", pq, pk) / math.sqrt(r)


def forward(cfg: RoutingConfig, params: dict, x, *, segment_ids=None, positions=None,
            cache=None):
  """The layer's forward pass on a parameter dict (see `RoutingAttention`)."""
  _check_call(cfg, segment_ids, cache)
  _sequence_input(cfg, x)
  p, o, mech = params, cfg.opts, cfg.mechanism
  dtype = cfg.dtype or x.dtype
  impl = cfg.implementation
  if mech == "biformer":
    if x.ndim != 4:
      raise ValueError(f"variant 'biformer' needs a 2D map x [B, Hh, Ww, D], got shape "
                       f"{tuple(x.shape)}")
    q = _proj(cfg, p, x, "q", "bhwd,dnk->bhwnk", dtype)
    k = _proj(cfg, p, x, "k", "bhwd,dnk->bhwnk", dtype)
    v = _proj(cfg, p, x, "v", "bhwd,dnk->bhwnk", dtype)
    out = R.bi_level_routing_attention(q, k, v, num_regions=o["num_regions"], top_k=o["top_k"],
                                       implementation=impl)
    if o["lce_kernel"]:
      lce = _depthwise(v, p["lce_kernel"], p["lce_bias"])
      out = out + jnp.repeat(lce, cfg.num_heads // cfg.num_kv_heads, axis=3).astype(out.dtype)
    return _out(cfg, p, out, dtype, x.shape[:-1])
  lead = tuple(x.shape[:-1])
  B, T = x.shape[0], math.prod(x.shape[1:-1])
  x_BTD = x.reshape(B, T, cfg.d_model)
  q = _proj(cfg, p, x_BTD, "q", "btd,dnh->btnh", dtype)
  k = _proj(cfg, p, x_BTD, "k", "btd,dnh->btnh", dtype)
  v = _proj(cfg, p, x_BTD, "v", "btd,dnh->btnh", dtype)
  if mech in ("moba", "dynamic_mask"):   # a grid input is its row-major sequence
    q, k = _rope(cfg, q, k, positions)
  elif positions is not None:
    raise ValueError(f"variant {mech!r} takes no positions")
  if mech == "moba":
    nk = -(-T // o["block_size"])
    out = R.moba_attention(q, k, v, block_size=o["block_size"], top_k=min(o["top_k"], nk),
                           causal=o["causal"], implementation=impl)
  elif mech == "dynamic_mask":
    K, H = cfg.num_kv_heads, cfg.head_dim
    dt = jnp.einsum("btc,ck->btk", v.reshape(B, T, K * H).astype(jnp.float32),
                    p["dt_kernel"].astype(jnp.float32)) + p["dt_bias"].astype(jnp.float32)
    key_bias = jnp.exp(p["dt_A"].astype(jnp.float32) * jax.nn.softplus(dt))      # [B, T, K]
    out = R.dynamic_mask_attention(q, k, v, key_bias, keep_window=o["keep_window"],
                                   causal=o["causal"], implementation=impl)
  else:  # sparsifiner
    keep = max(1, min(T, round(o["keep_rate"] * T)))
    out = R.sparsifiner_attention(q, k, v, connectivity(cfg, p, x_BTD), keep=keep)
  return _out(cfg, p, out, dtype, lead)


def distillation_loss(cfg: RoutingConfig, params: dict, x):
  """Sparsifiner: KL of the predictor's row distributions from the layer's dense attention
  (`attnjax.ops.routing.sparsifiner_distillation_loss`); gradients reach the predictor."""
  if cfg.mechanism != "sparsifiner":
    raise ValueError(f"distillation_loss is for variant 'sparsifiner', got {cfg.mechanism!r}")
  _sequence_input(cfg, x)
  B, T = x.shape[0], math.prod(x.shape[1:-1])
  x_BTD = x.reshape(B, T, cfg.d_model)
  dtype = cfg.dtype or x.dtype
  q = _proj(cfg, params, x_BTD, "q", "btd,dnh->btnh", dtype)
  k = _proj(cfg, params, x_BTD, "k", "btd,dnh->btnh", dtype)
  return R.sparsifiner_distillation_loss(connectivity(cfg, params, x_BTD), q, k)


class RoutingAttention(nnx.Module):
  """Routing attention layer (see the module docstring).

  Args:
    d_model, num_heads, num_kv_heads, head_dim: as in `MultiHeadAttention`.
    mechanism: one of `MECHANISMS`.
    **options: the mechanism's options and `implementation`, `dtype`, `param_dtype`,
      `use_bias`.
    rngs: `nnx.Rngs`.

  Call: `layer(x, *, positions=None, deterministic=True) -> x.shape`.
  """

  def __init__(self, d_model: int, num_heads: int, *, mechanism: str, num_kv_heads=None,
               head_dim=None, rngs: nnx.Rngs, **options):
    self.config = routing_config(mechanism, d_model, num_heads, num_kv_heads=num_kv_heads,
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
    return forward(self.config, self.params_dict(), x, segment_ids=segment_ids,
                   positions=positions, cache=cache)

  def distillation_loss(self, x):
    """Sparsifiner only: see `distillation_loss`."""
    return distillation_loss(self.config, self.params_dict(), x)


# The registry factories: make_factory(mechanism) (NNX), make_linen_factory(mechanism).
make_factory, make_linen_factory = _core.mechanism_factories(
    RoutingAttention, "attnjax.layers.routing_linen", "RoutingAttention")
