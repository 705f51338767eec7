"""Flax NNX layers for token, latent-bottleneck and pooling attention (catalog G, D04, A16).

One layer class, `TokenAttention(mechanism=...)`, owns the parameters and calls the ops of
`attnjax.ops.pooling` (and `attnjax.attention` for the plain multi-head sub-layers). The
configuration (`token_config`), the parameter specs (`param_specs`) and the forward pass
on a parameter dict (`forward`) are plain functions shared with the Linen twin
`attnjax.layers.tokens_linen.TokenAttention`.

Registry names (kind; options; paper):
- 'agent' (sequence, also token grids): Agent Attention with `num_agents` agents
  average-pooled from the queries (a square number on grids), the agent biases over
  `max_len` positions (`agent_bias`) and the depthwise conv on V (`dwc`, kernel
  `dwc_kernel`; 1D inputs use the centre row) ("Agent Attention: On the Integration of
  Softmax and Linear Attention").
- 'perceiver' (sequence): `num_latents` learned latents cross-attend to x, then
  `num_latent_layers` latent self-attention sub-layers, then x reads the latents back
  ("Perceiver: General Perception with Iterative Attention").
- 'lookupvit' (sequence): `num_compressed` tokens average-pooled from x gather from x,
  a self-attention sub-layer on them, x reads them back with the same logits ("LookupViT:
  Compressing visual information to a limited number of tokens").
- 'registers' (sequence): `num_registers` learned tokens appended inside the layer and
  dropped after attention ("Vision Transformers Need Registers"); `test_time_registers`
  untrained zero tokens appended the same way ("Vision Transformers Don't Need Trained
  Registers"; the paper's register-neuron shift lives in the MLP and is not part of this
  layer).
- 'isab' (sequence, permutation-equivariant): `num_inducing` inducing points,
  `ISAB(X) = MHA(X, H)`, `H = MAB(I, X)` ("Set Transformer").
- 'proxy' (sequence): one proxy per window of `window` tokens (random in training with
  `random_proxies=True`, the centre token otherwise), proxies self-attend, tokens read them
  ("Qihoo-T2X: An Efficiency-Focused Diffusion Transformer via Proxy Tokens").
- 'super_token' (spatial): Super Token Attention, `stoken_size`, `num_iters` ("Vision
  Transformer with Super Token Sampling").
- 'slot' (pooling): Slot Attention, `num_slots` (default `num_seeds`) learned slot
  initialisations (`slot_init='gaussian'` adds learned-sigma noise in training), `num_iters`,
  GRU + residual MLP ("Object-Centric Learning with Slot Attention").
- 'simpool' (pooling, one output): SimPool, `gamma` ("Keep It SimPool").
- 'mil_pool' (pooling): gated attention MIL with `num_seeds` branches, `hidden`, `gated`
  ("Attention-based Deep Multiple Instance Learning"; branches as in ACMIL) and ACMIL's
  stochastic top-K instance masking in training (`stkim_top_k`, `stkim_prob`).
- 'class_attention' (pooling): `num_seeds` learned class tokens, CaiT class attention
  ("Going deeper with Image Transformers"; class queries as in INTR).

Sub-layers are pre-norm where the papers have a residual inside the layer; the residual,
norm and MLP around the whole layer come from the model's block. No RoPE, not causal, no
decoding cache. `segment_ids [B, T]` with negative ids marks padding tokens (never
attended, never pooled); positions are ignored. Randomness (`needs_rng`) is drawn only
with `deterministic=False`: NNX from the `rngs` 'dropout' stream, Linen from
`make_rng('dropout')`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax.core.select import top_k
from attnjax.layers import _core
from attnjax.layers import _options as _opt
from attnjax.layers._core import ParamSpec, _positive_int
from attnjax.layers.attention import make_param
from attnjax.ops import pooling as P

__all__ = ["TokenAttention", "TokenConfig", "MECHANISMS", "KIND", "token_config",
           "param_specs", "forward", "needs_rng", "make_factory", "make_linen_factory",
           "pooling_matrix"]

KIND = {
    "agent": "sequence", "perceiver": "sequence", "lookupvit": "sequence",
    "registers": "sequence", "isab": "sequence", "proxy": "sequence",
    "super_token": "spatial",
    "slot": "pooling", "simpool": "pooling", "mil_pool": "pooling", "class_attention": "pooling",
}
MECHANISMS = tuple(KIND)
_OPTIONS = {
    "agent": dict(num_agents=4, max_len=256, agent_bias=True, dwc=True, dwc_kernel=3),
    "perceiver": dict(num_latents=8, num_latent_layers=1),
    "lookupvit": dict(num_compressed=4),
    "registers": dict(num_registers=4, test_time_registers=0),
    "isab": dict(num_inducing=8),
    "proxy": dict(window=4, random_proxies=True),
    "super_token": dict(stoken_size=2, num_iters=1),
    "slot": dict(num_seeds=1, num_slots=None, num_iters=3, eps=1e-8, slot_init="learned"),
    "simpool": dict(num_seeds=1, gamma=None),
    "mil_pool": dict(num_seeds=1, hidden=None, gated=True, stkim_top_k=0, stkim_prob=0.5),
    "class_attention": dict(num_seeds=1),
}
_COMMON = dict(implementation=None, dtype=None, param_dtype=jnp.float32, rope=None, causal=False,
               dropout_rate=0.0)
_LN_EPS = 1e-5
_SMALL = jax.nn.initializers.normal(0.02)


@dataclasses.dataclass(frozen=True)
class TokenConfig:
  """Validated configuration of a `TokenAttention` layer."""

  mechanism: str
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  options: tuple  # the mechanism's options, (name, value) sorted
  implementation: Any
  dtype: Any
  param_dtype: Any

  @property
  def opts(self) -> dict:
    return dict(self.options)

  @property
  def kind(self) -> str:
    return KIND[self.mechanism]


def token_config(mechanism, d_model, num_heads, *, num_kv_heads=None, head_dim=None, **options):
  """Validates `options` for `mechanism`; returns a `TokenConfig` (ValueError/TypeError
  naming a bad option and what it expects)."""
  own, common = _opt.split_options(mechanism, options, _OPTIONS.get(mechanism, {}), _COMMON,
                                   mechanisms=MECHANISMS)
  _opt.reject_common(mechanism, common, rope="its extra tokens have no positions",
                     causal="its tokens summarise the whole input")
  num_kv_heads, head_dim = _opt.head_layout(d_model, num_heads, num_kv_heads, head_dim)
  for name in ("num_agents", "max_len", "dwc_kernel", "num_latents", "num_compressed",
               "num_registers", "num_inducing", "window", "num_iters", "num_seeds"):
    if name in own:
      _positive_int(name, own[name])
  if mechanism == "slot" and own["slot_init"] not in ("learned", "gaussian"):
    raise ValueError(f"slot_init must be 'learned' or 'gaussian', got {own['slot_init']!r}")
  if mechanism == "mil_pool" and not 0.0 <= float(own["stkim_prob"]) <= 1.0:
    raise ValueError(f"stkim_prob must be in [0, 1], got stkim_prob={own['stkim_prob']!r}")
  for name in ("num_latent_layers", "test_time_registers", "stkim_top_k"):
    if name in own and (isinstance(own[name], bool) or not isinstance(own[name], int)
                        or own[name] < 0):
      raise ValueError(f"{name} must be a non-negative int, got {name}={own[name]!r}")
  if mechanism == "agent" and own["dwc_kernel"] % 2 == 0:
    raise ValueError(f"dwc_kernel must be odd, got dwc_kernel={own['dwc_kernel']}")
  if mechanism == "slot":
    if own["num_slots"] is None:
      own["num_slots"] = own["num_seeds"]
    _positive_int("num_slots", own["num_slots"])
    if own["num_slots"] != own["num_seeds"] and "num_seeds" in options:
      raise ValueError(f"num_slots={own['num_slots']} and num_seeds={own['num_seeds']} disagree "
                       f"(give one of them)")
    own["num_seeds"] = own["num_slots"]
  if mechanism == "simpool":
    if own["num_seeds"] != 1:
      raise ValueError(f"num_seeds must be 1 for 'simpool' (one pooled output), got "
                       f"num_seeds={own['num_seeds']}")
    if d_model % num_heads:
      raise ValueError(f"d_model must be divisible by num_heads for 'simpool' (the unprojected "
                       f"features are split into heads), got d_model={d_model}, "
                       f"num_heads={num_heads}")
    if own["gamma"] is not None and not float(own["gamma"]) > 0:
      raise ValueError(f"gamma must be a positive float or None, got gamma={own['gamma']!r}")
  if mechanism == "mil_pool":
    if own["hidden"] is None:
      own["hidden"] = d_model
    _positive_int("hidden", own["hidden"])
  if mechanism == "super_token":
    own["stoken_size"] = P._stoken_pair(own["stoken_size"])  # pylint: disable=protected-access
  if mechanism in ("lookupvit", "proxy") and num_kv_heads != num_heads:
    raise ValueError(f"variant {mechanism!r} shares logits/values between both sides: "
                     f"num_kv_heads must equal num_heads={num_heads}, got {num_kv_heads}")
  impl = common["implementation"]
  if isinstance(impl, list):
    impl = tuple(impl)
  return TokenConfig(mechanism=mechanism, d_model=d_model, num_heads=num_heads,
                     num_kv_heads=num_kv_heads, head_dim=head_dim,
                     options=tuple(sorted(own.items())), implementation=impl,
                     dtype=_core._canonical_dtype("dtype", common["dtype"]),  # pylint: disable=protected-access
                     param_dtype=_core._canonical_dtype("param_dtype", common["param_dtype"]))  # pylint: disable=protected-access


# ----------------------------------------------------------------------------- params

def _zeros(key, shape, dtype=jnp.float32):
  del key
  return jnp.zeros(shape, dtype)


def _ones(key, shape, dtype=jnp.float32):
  del key
  return jnp.ones(shape, dtype)


def _attn_specs(prefix, cfg, *, kv_heads=None):
  D, N, H = cfg.d_model, cfg.num_heads, cfg.head_dim
  K = cfg.num_kv_heads if kv_heads is None else kv_heads
  dense = _core._dense_init  # pylint: disable=protected-access
  return {
      f"{prefix}_q_kernel": ParamSpec((D, N, H), dense(0, (1, 2)), ("embed", "heads", "head_dim")),
      f"{prefix}_k_kernel": ParamSpec((D, K, H), dense(0, (1, 2)),
                                      ("embed", "kv_heads", "head_dim")),
      f"{prefix}_v_kernel": ParamSpec((D, K, H), dense(0, (1, 2)),
                                      ("embed", "kv_heads", "head_dim")),
      f"{prefix}_o_kernel": ParamSpec((N, H, D), dense((0, 1), 2), ("heads", "head_dim", "embed")),
  }


def _ln_specs(prefix, D):
  return {f"{prefix}_scale": ParamSpec((D,), _ones, ("embed",)),
          f"{prefix}_bias": ParamSpec((D,), _zeros, ("embed",))}


def _mlp_specs(prefix, D, hidden):
  dense = _core._dense_init  # pylint: disable=protected-access
  return {f"{prefix}_w1": ParamSpec((D, hidden), dense(0, 1), ("embed", "mlp")),
          f"{prefix}_b1": ParamSpec((hidden,), _zeros, ("mlp",)),
          f"{prefix}_w2": ParamSpec((hidden, D), dense(0, 1), ("mlp", "embed")),
          f"{prefix}_b2": ParamSpec((D,), _zeros, ("embed",))}


def _tokens_spec(name, n, D):
  return {name: ParamSpec((n, D), _SMALL, (None, "embed"))}


def param_specs(cfg: TokenConfig) -> dict[str, ParamSpec]:
  """The parameters of `cfg.mechanism` (attention sub-layers `<prefix>_{q,k,v,o}_kernel`,
  layer norms `<prefix>_{scale,bias}`, MLPs `<prefix>_{w1,b1,w2,b2}` and the learned
  tokens / biases / kernels of each mechanism)."""
  m, o, D, N, H = cfg.mechanism, cfg.opts, cfg.d_model, cfg.num_heads, cfg.head_dim
  s = {}
  if m == "agent":
    s.update(_attn_specs("attn", cfg))
    n, L = o["num_agents"], o["max_len"]
    if o["agent_bias"]:
      s["agent_bias"] = ParamSpec((N, n, L), _SMALL, ("heads", None, None))
      s["query_bias"] = ParamSpec((N, L, n), _SMALL, ("heads", None, None))
    if o["dwc"]:
      k = o["dwc_kernel"]
      s["dwc_kernel"] = ParamSpec((k, k, N, H), _SMALL, (None, None, "heads", "head_dim"))
      s["dwc_bias"] = ParamSpec((N, H), _zeros, ("heads", "head_dim"))
  elif m == "perceiver":
    s.update(_tokens_spec("latents", o["num_latents"], D))
    s.update(_ln_specs("cross_norm", D))
    s.update(_attn_specs("cross", cfg))
    for i in range(o["num_latent_layers"]):
      s.update(_ln_specs(f"self{i}_norm", D))
      s.update(_attn_specs(f"self{i}", cfg))
    s.update(_ln_specs("read_norm", D))
    s.update(_attn_specs("read", cfg))
  elif m == "lookupvit":
    s.update(_ln_specs("c_norm", D))
    s.update(_ln_specs("l_norm", D))
    s.update(_attn_specs("bx", cfg))
    dense = _core._dense_init  # pylint: disable=protected-access
    s["bx_vc_kernel"] = ParamSpec((D, N, H), dense(0, (1, 2)), ("embed", "heads", "head_dim"))
    s["bx_ol_kernel"] = ParamSpec((N, H, D), dense((0, 1), 2), ("heads", "head_dim", "embed"))
    s.update(_ln_specs("heavy_norm", D))
    s.update(_attn_specs("heavy", cfg))
    s.update(_ln_specs("p_norm", D))
  elif m == "registers":
    s.update(_tokens_spec("registers", o["num_registers"], D))
    s.update(_attn_specs("attn", cfg))
  elif m == "isab":
    s.update(_tokens_spec("inducing", o["num_inducing"], D))
    s.update(_attn_specs("ind", cfg))
    s.update(_ln_specs("ind_mlp_norm", D))
    s.update(_mlp_specs("ind_mlp", D, 2 * D))
    s.update(_ln_specs("out_norm", D))
    s.update(_attn_specs("out", cfg))
  elif m in ("proxy", "super_token"):
    s.update(_attn_specs("attn", cfg))
  elif m == "slot":
    s.update(_tokens_spec("slots", o["num_slots"], D))
    if o["slot_init"] == "gaussian":
      s["slots_log_sigma"] = ParamSpec((D,), _zeros, ("embed",))
    s.update(_ln_specs("in_norm", D))
    s.update(_ln_specs("slot_norm", D))
    s.update(_attn_specs("attn", cfg))
    dense = _core._dense_init  # pylint: disable=protected-access
    for g in ("wi", "wh"):
      s[f"gru_{g}"] = ParamSpec((D, 3 * D), dense(0, 1), ("embed", None))
      s[f"gru_b{g[1]}"] = ParamSpec((3 * D,), _zeros, (None,))
    s.update(_ln_specs("mlp_norm", D))
    s.update(_mlp_specs("mlp", D, D))
  elif m == "simpool":
    s.update(_ln_specs("norm", D))
    dense = _core._dense_init  # pylint: disable=protected-access
    s["q_kernel"] = ParamSpec((D, N, H), dense(0, (1, 2)), ("embed", "heads", "head_dim"))
    s["k_kernel"] = ParamSpec((D, N, H), dense(0, (1, 2)), ("embed", "heads", "head_dim"))
  elif m == "mil_pool":
    L = o["hidden"]
    dense = _core._dense_init  # pylint: disable=protected-access
    s["V"] = ParamSpec((D, L), dense(0, 1), ("embed", "mlp"))
    if o["gated"]:
      s["U"] = ParamSpec((D, L), dense(0, 1), ("embed", "mlp"))
    s["w"] = ParamSpec((L, o["num_seeds"]), dense(0, 1), ("mlp", None))
  elif m == "class_attention":
    s.update(_tokens_spec("cls", o["num_seeds"], D))
    s.update(_attn_specs("attn", cfg))
  return s


# ----------------------------------------------------------------------------- helpers

def _layer_norm(x, p, prefix, eps=_LN_EPS):
  xf = x.astype(jnp.float32)
  mu = jnp.mean(xf, -1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mu), -1, keepdims=True)
  y = (xf - mu) * jax.lax.rsqrt(var + eps) * p[f"{prefix}_scale"].astype(jnp.float32)
  return (y + p[f"{prefix}_bias"].astype(jnp.float32)).astype(x.dtype)


def _proj(p, name, x):
  return jnp.einsum("btd,dnh->btnh", x, p[name].astype(x.dtype))


def _out(p, name, y, dtype):
  return jnp.einsum("btnh,nhd->btd", y.astype(dtype), p[name].astype(dtype))


def _mha(cfg, p, prefix, xq, xkv, *, q_seg=None, kv_seg=None):
  """Multi-head attention sub-layer `prefix`: `xq [B, T, D]` reads `xkv [B, S, D]`."""
  attn = _core._attention_fn()  # pylint: disable=protected-access
  q = _proj(p, f"{prefix}_q_kernel", xq)
  k = _proj(p, f"{prefix}_k_kernel", xkv)
  v = _proj(p, f"{prefix}_v_kernel", xkv)
  y = attn(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, implementation=cfg.implementation)
  return _out(p, f"{prefix}_o_kernel", y, xq.dtype)


def _mlp(p, prefix, x):
  h = jax.nn.gelu(x @ p[f"{prefix}_w1"].astype(x.dtype) + p[f"{prefix}_b1"].astype(x.dtype))
  return h @ p[f"{prefix}_w2"].astype(x.dtype) + p[f"{prefix}_b2"].astype(x.dtype)


def _tokens(p, name, B, dtype):
  t = p[name].astype(dtype)
  return jnp.broadcast_to(t, (B,) + t.shape)


def pooling_matrix(length, num):
  """Adaptive average pooling of `length` positions into `num` contiguous bins: `[num,
  length]` (bin `i` covers `[floor(i L / n), ceil((i + 1) L / n))`, rows sum to 1)."""
  if num > length:
    raise ValueError(f"cannot pool {length} tokens into {num} bins (needs num <= length)")
  m = np.zeros((num, length), np.float32)
  for i in range(num):
    lo, hi = (i * length) // num, -((-(i + 1) * length) // num)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


def _pool_tokens(x, num, valid=None, grid=None):
  """`x [B, T, ...]` -> `[B, num, ...]` by adaptive average pooling (on the grid when given;
  `num` must then be a square); padded tokens (valid False) are left out of the means."""
  T = x.shape[1]
  if grid is None:
    m = pooling_matrix(T, num)
  else:
    a = math.isqrt(num)
    if a * a != num:
      raise ValueError(f"on a token grid the number of pooled tokens must be a square, got {num}")
    m = np.kron(pooling_matrix(grid[0], a), pooling_matrix(grid[1], a))
  m = jnp.asarray(m)
  if valid is None:
    return jnp.einsum("nt,bt...->bn...", m.astype(x.dtype), x)
  w = m[None] * valid[:, None, :].astype(jnp.float32)  # [B, n, T]
  w = w / jnp.maximum(jnp.sum(w, -1, keepdims=True), 1e-30)
  return jnp.einsum("bnt,bt...->bn...", w.astype(x.dtype), x)


def _depthwise(v, kernel, bias, grid):
  """Depthwise conv (zero padding) of `v [B, T, N, H]` on the grid (or 1D: the centre row)."""
  B, T, N, H = v.shape
  k = kernel.shape[0]
  if grid is None:
    w = kernel[k // 2][None]  # [1, k, N, H]
    x = v.reshape(B, 1, T, N * H)
  else:
    w = kernel
    x = v.reshape(B, grid[0], grid[1], N * H)
  w = w.astype(v.dtype).reshape(w.shape[0], w.shape[1], 1, N * H)
  y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   feature_group_count=N * H)
  return y.reshape(B, T, N, H) + bias.astype(v.dtype)


def _gru(p, x, h):
  gi = x @ p["gru_wi"].astype(x.dtype) + p["gru_bi"].astype(x.dtype)
  gh = h @ p["gru_wh"].astype(x.dtype) + p["gru_bh"].astype(x.dtype)
  ir, iz, inn = jnp.split(gi, 3, axis=-1)
  hr, hz, hn = jnp.split(gh, 3, axis=-1)
  r, z = jax.nn.sigmoid(ir + hr), jax.nn.sigmoid(iz + hz)
  n = jnp.tanh(inn + r * hn)
  return (1.0 - z) * n + z * h


# ----------------------------------------------------------------------------- forward

def _check_input(cfg, x):
  D = cfg.d_model
  if cfg.kind == "spatial":
    ok, what = hasattr(x, "ndim") and x.ndim == 4, "a token map [B, Hh, Ww, D]"
  elif cfg.kind == "pooling":
    ok, what = hasattr(x, "ndim") and x.ndim == 3, "a set [B, n, D]"
  else:
    ok, what = hasattr(x, "ndim") and x.ndim in (3, 4), "[B, T, D] or a token map [B, Hh, Ww, D]"
  if not ok or x.shape[-1] != D:
    raise ValueError(f"x must be {what} with D={D} for variant {cfg.mechanism!r}, got shape "
                     f"{getattr(x, 'shape', None)}")


def needs_rng(cfg: TokenConfig) -> bool:
  """Whether the layer draws random numbers in training (`deterministic=False`): random
  proxies, Gaussian slot noise, ACMIL's stochastic top-K instance masking."""
  o = cfg.opts
  return ((cfg.mechanism == "proxy" and o["random_proxies"])
          or (cfg.mechanism == "slot" and o["slot_init"] == "gaussian")
          or (cfg.mechanism == "mil_pool" and o["stkim_top_k"] > 0 and o["stkim_prob"] > 0))


def forward(cfg: TokenConfig, params: dict, x, *, segment_ids=None, key=None):
  """The layer on a parameter dict. Sequence kinds: `x [B, T, D]` (or `[B, Hh, Ww, D]`,
  flattened row-major) -> same shape; spatial: `[B, Hh, Ww, D]` -> same; pooling:
  `[B, n, D] -> [B, k, D]`. `segment_ids [B, T]`: negative ids mark padding. `key`: the
  PRNG key of the training-time randomness (`needs_rng`); None = deterministic."""
  _check_input(cfg, x)
  dtype = cfg.dtype or x.dtype
  x = x.astype(dtype)
  m, o, p = cfg.mechanism, cfg.opts, params
  if m == "super_token":
    if segment_ids is not None:
      raise ValueError("variant 'super_token' takes no segment_ids (a token map has no padding)")
    st, Q = P.super_token_association(x, stoken_size=o["stoken_size"], num_iters=o["num_iters"])
    B, h, w, D = st.shape
    flat = st.reshape(B, h * w, D)
    y = _mha(cfg, p, "attn", flat, flat).reshape(B, h, w, D)
    out = P.super_token_upsample(y, Q.astype(y.dtype), stoken_size=o["stoken_size"])
    return _core.constrain(out, ("batch", None, None, "embed"))
  grid = None
  shape = x.shape
  if x.ndim == 4:
    grid = x.shape[1:3]
    x = x.reshape(x.shape[0], grid[0] * grid[1], x.shape[-1])
  B, T, D = x.shape
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.shape != (B, T):
      raise ValueError(f"segment_ids must be [B, T] = [{B}, {T}], got shape {segment_ids.shape}")
    valid = segment_ids >= 0
    kv_ids = jnp.where(valid, 0, -1).astype(jnp.int32)
  else:
    valid = kv_ids = None

  def qids(n):
    return None if kv_ids is None else jnp.zeros((B, n), jnp.int32)

  if m == "agent":
    n = o["num_agents"]
    q = _proj(p, "attn_q_kernel", x)
    k = _proj(p, "attn_k_kernel", x)
    v = _proj(p, "attn_v_kernel", x)
    agents = _pool_tokens(q, n, valid, grid)
    ab = qb = None
    if o["agent_bias"]:
      if T > o["max_len"]:
        raise ValueError(f"variant 'agent' has agent biases for max_len={o['max_len']} positions, "
                         f"got T={T} tokens (raise max_len)")
      ab = p["agent_bias"][:, :, :T].astype(jnp.float32)[None]
      qb = p["query_bias"][:, :T, :].astype(jnp.float32)[None]
    y = P.agent_attention(q, k, v, agents, agent_bias=ab, query_bias=qb, segment_ids=segment_ids,
                          implementation=cfg.implementation)
    if o["dwc"]:
      vv = jnp.repeat(v, cfg.num_heads // cfg.num_kv_heads, axis=2)
      if valid is not None:
        vv = jnp.where(valid[:, :, None, None], vv, 0)
      y = y + _depthwise(vv, p["dwc_kernel"], p["dwc_bias"], grid)
    out = _out(p, "attn_o_kernel", y, dtype)
  elif m == "perceiver":
    z = _tokens(p, "latents", B, dtype)
    M = z.shape[1]
    xn = _layer_norm(x, p, "cross_norm")
    z = z + _mha(cfg, p, "cross", _layer_norm(z, p, "cross_norm"), xn, q_seg=qids(M),
                 kv_seg=kv_ids)
    for i in range(o["num_latent_layers"]):
      zn = _layer_norm(z, p, f"self{i}_norm")
      z = z + _mha(cfg, p, f"self{i}", zn, zn)
    out = _mha(cfg, p, "read", x, _layer_norm(z, p, "read_norm"))
  elif m == "lookupvit":
    M = o["num_compressed"]
    c = _pool_tokens(x, M, valid, grid)
    cn, xn = _layer_norm(c, p, "c_norm"), _layer_norm(x, p, "l_norm")
    q_c = _proj(p, "bx_q_kernel", cn)
    k_l = _proj(p, "bx_k_kernel", xn)
    v_l = _proj(p, "bx_v_kernel", xn)

    def heavy(c_out):
      c2 = c + _out(p, "bx_o_kernel", c_out, dtype)
      hn = _layer_norm(c2, p, "heavy_norm")
      c2 = c2 + _mha(cfg, p, "heavy", hn, hn)
      return _proj(p, "bx_vc_kernel", _layer_norm(c2, p, "p_norm"))

    _, l_out = P.bidirectional_cross_attention(q_c, k_l, v_l, heavy, segment_ids=segment_ids,
                                               implementation=cfg.implementation)
    out = _out(p, "bx_ol_kernel", l_out, dtype)
  elif m == "registers":
    extra = [_tokens(p, "registers", B, dtype)]
    if o["test_time_registers"]:
      extra.append(jnp.zeros((B, o["test_time_registers"], D), dtype))
    xr = jnp.concatenate([x] + extra, axis=1)
    R = xr.shape[1] - T
    kv = None if kv_ids is None else jnp.concatenate([kv_ids, jnp.zeros((B, R), jnp.int32)], 1)
    out = _mha(cfg, p, "attn", xr, xr, q_seg=qids(T + R), kv_seg=kv)[:, :T]
  elif m == "isab":
    ind = _tokens(p, "inducing", B, dtype)
    h = ind + _mha(cfg, p, "ind", ind, x, q_seg=qids(ind.shape[1]), kv_seg=kv_ids)
    h = h + _mlp(p, "ind_mlp", _layer_norm(h, p, "ind_mlp_norm"))
    out = _mha(cfg, p, "out", x, _layer_norm(h, p, "out_norm"))
  elif m == "proxy":
    if segment_ids is not None:
      raise ValueError("variant 'proxy' takes no segment_ids (a padded token could be a proxy)")
    wt = o["window"]
    if T % wt:
      raise ValueError(f"window={wt} must divide the number of tokens T={T} for variant 'proxy'")
    q, k, v = (_proj(p, f"attn_{c}_kernel", x) for c in "qkv")
    idx = P.proxy_indices(key if o["random_proxies"] else None, B, T // wt, wt)
    y = P.proxy_token_attention(q, k, v, window_tokens=wt, index=idx,
                                implementation=cfg.implementation)
    out = _out(p, "attn_o_kernel", y, dtype)
  elif m == "slot":
    xn = _layer_norm(x, p, "in_norm")
    k = _proj(p, "attn_k_kernel", xn)
    v = _proj(p, "attn_v_kernel", xn)
    slots = _tokens(p, "slots", B, dtype)
    if o["slot_init"] == "gaussian" and key is not None:
      noise = jax.random.normal(key, slots.shape, jnp.float32)
      slots = slots + (jnp.exp(p["slots_log_sigma"].astype(jnp.float32)) * noise).astype(dtype)
    for _ in range(o["num_iters"]):
      prev = slots
      q = _proj(p, "attn_q_kernel", _layer_norm(slots, p, "slot_norm"))
      upd = P.slot_attention_step(q, k, v, eps=o["eps"], segment_ids=segment_ids)
      slots = _gru(p, _out(p, "attn_o_kernel", upd, dtype), prev)
      slots = slots + _mlp(p, "mlp", _layer_norm(slots, p, "mlp_norm"))
    out = slots
  elif m == "simpool":
    xn = _layer_norm(x, p, "norm")
    if valid is None:
      gap = jnp.mean(xn, axis=1, keepdims=True)
    else:
      wts = valid.astype(xn.dtype)[:, :, None]
      gap = jnp.sum(xn * wts, 1, keepdims=True) / jnp.maximum(jnp.sum(wts, 1, keepdims=True), 1)
    q = _proj(p, "q_kernel", gap)
    k = _proj(p, "k_kernel", xn)
    N = cfg.num_heads
    v = xn.reshape(B, T, N, D // N)
    out = P.simpool(q, k, v, gamma=o["gamma"], segment_ids=segment_ids,
                    implementation=cfg.implementation).reshape(B, 1, D)
  elif m == "mil_pool":
    drop = None
    if key is not None and o["stkim_top_k"] > 0:
      _, a = P.gated_mil_pooling(x, p["V"], p.get("U"), p["w"], gated=o["gated"],
                                 segment_ids=segment_ids, return_weights=True)
      kk = min(o["stkim_top_k"], T)
      _, top = top_k(jax.lax.stop_gradient(a), kk)          # [B, M, kk]
      hit = jax.random.bernoulli(key, o["stkim_prob"], top.shape)
      drop = jnp.zeros(a.shape, bool)
      bi, mi = jnp.meshgrid(jnp.arange(a.shape[0]), jnp.arange(a.shape[1]), indexing="ij")
      drop = drop.at[bi[..., None], mi[..., None], top].set(hit)
    out = P.gated_mil_pooling(x, p["V"], p.get("U"), p["w"], gated=o["gated"],
                              segment_ids=segment_ids, instance_mask=drop)
  else:  # class_attention
    cls = _tokens(p, "cls", B, dtype)
    proj = lambda name, a: _proj(p, f"attn_{name}_kernel", a)
    y = P.class_attention(proj("q", cls), proj("k", cls), proj("v", cls), proj("k", x),
                          proj("v", x), segment_ids=segment_ids,
                          implementation=cfg.implementation)
    out = _out(p, "attn_o_kernel", y, dtype)
  if cfg.kind == "pooling":
    return _core.constrain(out, ("batch", None, "embed"))
  out = _core.constrain(out, ("batch", "length", "embed"))
  return out.reshape(shape) if grid is not None else out


def _check_call(cache):
  if cache is not None:
    raise ValueError("token/pooling variants take no cache (no decoding)")


class TokenAttention(nnx.Module):
  """Token / latent / pooling attention layer (see the module docstring).

  Args:
    d_model, num_heads, num_kv_heads, head_dim: as in `MultiHeadAttention`.
    mechanism: one of `MECHANISMS`.
    **options: the mechanism's options and `implementation`, `dtype`, `param_dtype`.
    rngs: `nnx.Rngs`.

  Call: `layer(x, *, segment_ids=None, deterministic=True)`; positions are ignored.
  """

  def __init__(self, d_model: int, num_heads: int, *, mechanism: str, num_kv_heads=None,
               head_dim=None, rngs: nnx.Rngs, **options):
    self.config = token_config(mechanism, d_model, num_heads, num_kv_heads=num_kv_heads,
                               head_dim=head_dim, **options)
    specs = param_specs(self.config)
    self._param_names = tuple(specs)
    for name, spec in specs.items():
      setattr(self, name, make_param(rngs, spec, self.config.param_dtype))
    self.rngs = rngs["dropout"].fork() if needs_rng(self.config) else nnx.data(None)

  def params_dict(self) -> dict:
    return {name: getattr(self, name)[...] for name in self._param_names}

  def __call__(self, x, *, segment_ids=None, positions=None, cache=None,
               deterministic: bool = True):
    del positions
    _check_call(cache)
    key = None if deterministic or self.rngs is None else self.rngs()
    return forward(self.config, self.params_dict(), x, segment_ids=segment_ids, key=key)


# The registry factories: make_factory(mechanism) (NNX), make_linen_factory(mechanism).
make_factory, make_linen_factory = _core.mechanism_factories(
    TokenAttention, "attnjax.layers.tokens_linen", "TokenAttention")
