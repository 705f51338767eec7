"""Flax NNX layers for the linear-attention family, registered in `attnjax.variants`.

One layer class, `LinearAttention(mechanism=...)`, owns the q/k/v/out projections (same
parameter names, initialisers and logical sharding names as `MultiHeadAttention`) and
calls the op of `attnjax.ops.linear` selected by `mechanism`:

| registry name | op | causal | decoding |
|---|---|---|---|
| 'linear'    | `linear_attention` (feature_map)                  | option  | yes (causal) |
| 'lightning' | `lightning_attention` (per-head decay)            | always  | yes |
| 'retention' | `decayed_linear_attention` (decay, optional gate) | always  | yes |
| 'efficient' | `efficient_attention`                             | no      | no |
| 'focused'   | `focused_linear_attention` (optional DWC)         | option  | yes (causal, no DWC) |
| 'inline'    | `inline_attention`                                | option  | yes (causal) |
| 'flow'      | `flow_attention`                                  | option  | yes (causal) |

Decoding: `init_cache(batch, max_len)` returns `{'state': <op state>, 'index': int32}`
(the op's recurrent state: constant size, `max_len` is only checked), and
`layer(x, cache=c) -> (y, new_c)` runs the op with `state=` (recurrent form for one token,
chunked for a prefill).

Context parallelism: under the trainer's mesh (`attnjax.parallel.activation_sharding`) with a
`context` axis > 1 and no cache, the causal 'linear', 'lightning', 'retention', 'focused' and
'inline' layers run their op with the sequence split over that axis, the recurrent state
passed between the shards (`attnjax.parallel.linear_cp`); same result as on one device.

The option validation (`linear_config`), the decoding state (`init_state`) and the forward
pass on a parameter dict (`forward`) are plain functions shared with the Linen twin
`attnjax.layers.linear_linen.LinearAttention` (registered as `variants.get_linen(name)`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax.layers import _core
from attnjax.layers._core import AttentionConfig, ParamSpec, constrain
from attnjax.layers.attention import make_param
from attnjax.ops import linear as L
from attnjax.ops import positional as _pos

__all__ = ["LinearAttention", "LinearConfig", "MECHANISMS", "linear_config", "init_state",
           "forward", "default_decay", "retention_decay", "make_factory", "make_linen_factory"]

MECHANISMS = ("linear", "lightning", "retention", "efficient", "focused", "inline", "flow")
_ALWAYS_CAUSAL = ("lightning", "retention")
_NEVER_CAUSAL = ("efficient",)
_FEATURE_MAPS = ("elu+1", "relu", "identity")
_GATE_TEMPERATURE = 16.0  # GLA's normaliser of the log-sigmoid gate


def default_decay(num_heads: int) -> np.ndarray:
  """ALiBi-like per-head decays `lambda_n = exp(-2^(-8 (n+1) / N))` (Lightning default)."""
  slopes = 2.0 ** (-8.0 * np.arange(1, num_heads + 1) / num_heads)
  return np.exp(-slopes).astype(np.float32)


def retention_decay(num_heads: int) -> np.ndarray:
  """RetNet's per-head decays `gamma_n = 1 - 2^(-5 - n)`."""
  return (1.0 - 2.0 ** (-5.0 - np.arange(num_heads))).astype(np.float32)


def _inv_softplus(y):
  return np.log(np.expm1(y))


def _zeros_init(key, shape, dtype=jnp.float32):
  del key
  return jnp.zeros(shape, dtype)


def _ones_init(key, shape, dtype=jnp.float32):
  del key
  return jnp.ones(shape, dtype)


def _const_init(value):
  value = np.asarray(value, np.float32)

  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.broadcast_to(jnp.asarray(value, dtype), shape)
  return init


@dataclasses.dataclass(frozen=True)
class LinearConfig:
  """Validated options of a linear-attention layer (shared by the NNX and Linen classes)."""

  cfg: AttentionConfig
  mechanism: str
  causal: bool
  feature_map: str
  fixed_decay: tuple | None      # per-head decays, or None (learnable, or not a decay variant)
  learnable_decay: bool
  gate: bool
  out_norm: bool
  focusing_factor: float
  dwc_size: int | None
  chunk_size: int
  implementation: str | None    # None: the registry's 'auto' (Pallas on TPU/GPU, else XLA)
  eps: float


def linear_config(d_model: int, num_heads: int, *, mechanism: str, num_kv_heads: int | None = None,
                  head_dim: int | None = None, v_head_dim: int | None = None,
                  causal: bool | None = None,
                  feature_map: str | None = None, decay: Any = None, learnable_decay: bool = False,
                  gate: bool = False, focusing_factor: float = 3.0, dwc_size: int | None = None,
                  out_norm: bool | None = None, chunk_size: int = 64,
                  implementation: str | None = None,
                  eps: float = L.DEFAULT_EPS, rope: str | None = None, rope_base: float = 10000.0,
                  use_bias: bool = False, dropout_rate: float = 0.0, dtype: Any = None,
                  param_dtype: Any = jnp.float32) -> tuple[LinearConfig, dict]:
  """Validates the options of `LinearAttention` and returns `(LinearConfig, param specs)`."""
  if mechanism not in MECHANISMS:
    raise ValueError(f"mechanism must be one of {MECHANISMS}, got mechanism={mechanism!r}")
  m = mechanism
  if causal is None:
    causal = m in _ALWAYS_CAUSAL
  if not isinstance(causal, bool):
    raise TypeError(f"causal must be a bool, got causal={causal!r}")
  if m in _ALWAYS_CAUSAL and not causal:
    raise ValueError(f"variant {m!r} is causal only; got causal=False (expected causal=True)")
  if m in _NEVER_CAUSAL and causal:
    raise ValueError(f"variant {m!r} is non-causal (no causal form, no decoding); got causal=True, "
                     f"expected causal=False (e.g. attention.causal=False or an encoder model)")
  if feature_map is not None and m not in ("linear", "inline", "retention"):
    raise ValueError(f"feature_map is not an option of variant {m!r} (only 'linear', 'inline', "
                     f"'retention'); got feature_map={feature_map!r}")
  if feature_map is None:
    feature_map = "elu+1" if m == "linear" else "identity"
  if feature_map not in _FEATURE_MAPS:
    raise ValueError(f"feature_map must be one of {_FEATURE_MAPS}, got feature_map={feature_map!r}")
  if m not in _ALWAYS_CAUSAL and (decay is not None or learnable_decay):
    raise ValueError(f"decay/learnable_decay are options of 'lightning' and 'retention' only, "
                     f"got decay={decay!r}, learnable_decay={learnable_decay!r} for {m!r}")
  if gate and m != "retention":
    raise ValueError(f"gate=True is an option of 'retention' only, got it for {m!r}")
  if dwc_size is not None:
    if m != "focused":
      raise ValueError(f"dwc_size is an option of 'focused' only, got dwc_size={dwc_size!r} for "
                       f"{m!r}")
    if isinstance(dwc_size, bool) or not isinstance(dwc_size, int) or dwc_size < 1:
      raise ValueError("dwc_size must be a positive int (odd unless causal), got "
                       f"dwc_size={dwc_size!r}")
    if not causal and dwc_size % 2 == 0:
      raise ValueError("dwc_size must be odd for a non-causal (SAME) conv, got "
                       f"dwc_size={dwc_size}")
  if m == "focused" and (isinstance(focusing_factor, bool)
                         or not isinstance(focusing_factor, (int, float))
                         or not focusing_factor >= 1):
    raise ValueError("focusing_factor must be a number >= 1, got "
                     f"focusing_factor={focusing_factor!r}")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got chunk_size={chunk_size!r}")
  if rope not in (None, "1d"):
    raise ValueError(f"rope must be None or '1d' for linear-attention layers, got rope={rope!r}")
  if out_norm is None:
    out_norm = m in _ALWAYS_CAUSAL
  cfg = AttentionConfig(d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                        head_dim=head_dim, v_head_dim=v_head_dim, use_bias=use_bias, rope=rope,
                        rope_base=rope_base, dropout_rate=dropout_rate, dtype=dtype,
                        param_dtype=param_dtype)
  N = cfg.num_heads
  dec, fixed_decay = None, None
  if m in _ALWAYS_CAUSAL:
    if decay is None:
      dec = default_decay(N) if m == "lightning" else retention_decay(N)
    else:
      dec = np.asarray(decay, np.float64)
      if dec.ndim == 0:
        dec = np.full((N,), float(dec))
      if dec.shape != (N,) or not np.all((dec > 0) & (dec <= 1)):
        raise ValueError(f"decay must be a float or {N} floats in (0, 1], got decay={decay!r}")
      if learnable_decay and np.any(dec >= 1):
        raise ValueError("learnable_decay needs decay < 1 (it is exp(-softplus(p))), got "
                         f"decay={decay!r}")
      dec = dec.astype(np.float32)
    fixed_decay = None if learnable_decay else tuple(float(d) for d in dec)

  specs = {k: v for k, v in _core.param_specs(cfg).items()
           if k.split("_")[0] in ("q", "k", "v", "o") and k.split("_")[1] in ("kernel", "bias")}
  Hv = cfg.v_head_dim
  if m in _ALWAYS_CAUSAL and learnable_decay:
    specs["decay_param"] = ParamSpec(
        (N,), _const_init(_inv_softplus(-np.log(dec.astype(np.float64)))), ("heads",))
  if gate:
    specs["gate_kernel"] = ParamSpec((cfg.d_model, N), _core._dense_init(0, 1), ("embed", "heads"))  # pylint: disable=protected-access
    # bias so that sigmoid(.) starts near 1 (little extra decay).
    specs["gate_bias"] = ParamSpec((N,), _const_init(4.0), ("heads",))
  if out_norm:
    specs["out_norm"] = ParamSpec((Hv,), _ones_init, ("head_dim",))
  if dwc_size is not None:
    specs["dwc_kernel"] = ParamSpec((dwc_size, Hv), jax.nn.initializers.normal(1.0 / dwc_size),
                                    (None, "head_dim"))
    specs["dwc_bias"] = ParamSpec((Hv,), _zeros_init, ("head_dim",))
  lc = LinearConfig(cfg=cfg, mechanism=m, causal=causal, feature_map=feature_map,
                    fixed_decay=fixed_decay, learnable_decay=bool(learnable_decay), gate=bool(gate),
                    out_norm=bool(out_norm), focusing_factor=float(focusing_factor),
                    dwc_size=dwc_size, chunk_size=chunk_size, implementation=implementation,
                    eps=eps)
  return lc, specs


def decays(lc: LinearConfig, params: dict):
  """Per-head decays `[N]` float32 (lightning/retention), else None."""
  if lc.mechanism not in _ALWAYS_CAUSAL:
    return None
  if lc.learnable_decay:
    return jnp.exp(-jax.nn.softplus(params["decay_param"].astype(jnp.float32)))
  return jnp.asarray(lc.fixed_decay, jnp.float32)


def init_state(lc: LinearConfig, batch: int, max_len: int) -> dict:
  """The decoding cache `{'state': <op state>, 'index': int32 [], 'lengths': int32 [B]}`
  (constant size; `lengths`: tokens consumed per row, `index`: per call, the longest)."""
  if not lc.causal:
    raise ValueError(f"variant {lc.mechanism!r} with causal=False has no decoding state; "
                     f"build it with causal=True to decode")
  if lc.dwc_size is not None:
    raise ValueError("decoding is not supported with dwc_size (the depthwise conv is stateless); "
                     "build the 'focused' layer with dwc_size=None to decode")
  for name, val in (("batch", batch), ("max_len", max_len)):
    if isinstance(val, bool) or not isinstance(val, int) or val < 1:
      raise ValueError(f"{name} must be a positive int, got {name}={val!r}")
  cfg = lc.cfg
  B, N, K, H, Hv = batch, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.v_head_dim
  z = lambda *shape: jnp.zeros(shape, jnp.float32)
  if lc.mechanism in ("linear", "focused"):
    state = (z(B, K, H, Hv), z(B, K, H))
  elif lc.mechanism in _ALWAYS_CAUSAL:
    state = z(B, N, H, Hv)
  elif lc.mechanism == "flow":
    state = (z(B, K, H), z(B, N, H), z(B, N, H), z(B, N, H), z(B, N), z(B, N, H, Hv), z(B))
  else:  # inline
    state = (z(B, K, H, Hv), z(B, K, H), z(B, K, Hv), z(B))
  return {"state": state, "index": jnp.zeros((), jnp.int32),
          "lengths": jnp.zeros((batch,), jnp.int32)}


def apply_op(lc: LinearConfig, params: dict, q, k, v, *, x=None, grid=None, state=None,
             return_state=False, form="chunked"):
  """The attention op on projected `q [B,T,N,H]`, `k`, `v` (`x` feeds the retention gate)."""
  m, p = lc.mechanism, params
  st = dict(state=state, return_state=return_state) if lc.causal else {}
  if m == "linear":
    return L.linear_attention(q, k, v, feature_map=lc.feature_map, causal=lc.causal, form=form,
                              chunk_size=lc.chunk_size, eps=lc.eps,
                              implementation=lc.implementation, **st)
  if m == "lightning":
    return L.lightning_attention(q, k, v, decay=decays(lc, p), form=form, chunk_size=lc.chunk_size,
                                 implementation=lc.implementation, **st)
  if m == "retention":
    log_decay = None
    if lc.gate:
      g = jnp.einsum("btd,dn->btn", x.astype(jnp.float32), p["gate_kernel"].astype(jnp.float32))
      log_decay = jax.nn.log_sigmoid(g + p["gate_bias"].astype(jnp.float32)) / _GATE_TEMPERATURE
    return L.decayed_linear_attention(q, k, v, decay=decays(lc, p), log_decay=log_decay,
                                      feature_map=lc.feature_map, form=form,
                                      chunk_size=lc.chunk_size, eps=lc.eps,
                                      implementation=lc.implementation, **st)
  if m == "efficient":
    return L.efficient_attention(q, k, v)
  if m == "flow":
    return L.flow_attention(q, k, v, causal=lc.causal, form=form, chunk_size=lc.chunk_size,
                            eps=lc.eps, **st)
  if m == "inline":
    return L.inline_attention(q, k, v, feature_map=lc.feature_map, causal=lc.causal, form=form,
                              chunk_size=lc.chunk_size, implementation=lc.implementation, **st)
  # focused
  dwc = {}
  if lc.dwc_size is not None:
    if len(grid) == 2:
      raise ValueError("dwc_size with a [B, Hh, Ww, D] grid needs a 2-D kernel; this layer's "
                       "kernel is 1-D: pass [B, T, D] inputs")
    dwc = dict(dwc_kernel=p["dwc_kernel"], dwc_bias=p["dwc_bias"])
  return L.focused_linear_attention(q, k, v, focusing_factor=lc.focusing_factor, causal=lc.causal,
                                    form=form, chunk_size=lc.chunk_size, eps=lc.eps,
                                    implementation=lc.implementation, **dwc, **st)


# Causal mechanisms whose state after a block is affine in the state before it: they run
# context-parallel (attnjax.parallel.linear_cp) when the trainer's mesh splits the sequence.
# 'flow' is not among them (its competition sums are not affine in the incoming state).
_CONTEXT_PARALLEL = ("linear", "lightning", "retention", "focused", "inline")


def _context_parallel_op(lc: LinearConfig, params: dict, q, k, v, *, x, grid):
  """The op with the sequence split over the 'context' mesh axis, passing the state between
  the shards (`attnjax.parallel.linear_cp.context_parallel_linear`), when the mesh of
  `attnjax.parallel.activation_sharding` has a context axis > 1, the layer is causal and its
  state is affine; None otherwise (the caller runs the op as usual). Equal to the op on the
  whole sequence. The focused DWC (a causal conv over the values) runs outside, on the whole
  sequence."""
  from attnjax.parallel import linear_cp  # pylint: disable=import-outside-toplevel
  mesh = linear_cp.context_mesh()
  if (mesh is None or not lc.causal or lc.mechanism not in _CONTEXT_PARALLEL
      or q.shape[1] % dict(mesh.shape)["context"]):
    return None
  lc_op = dataclasses.replace(lc, dwc_size=None)

  def op(q, k, v, x, *, state=None, return_state=False):
    return apply_op(lc_op, params, q, k, v, x=x, grid=grid, state=state,
                    return_state=return_state)

  o = linear_cp.context_parallel_linear(op, q, k, v, x, mesh=mesh, transition="diagonal")
  if lc.dwc_size is None:
    return o
  conv = L.depthwise_conv(v, params["dwc_kernel"], bias=params["dwc_bias"], causal=True)
  conv = jnp.repeat(conv, q.shape[2] // v.shape[2], axis=2)
  return (o.astype(jnp.float32) + conv).astype(v.dtype)


def _ragged_steps(lc: LinearConfig, params: dict, q, k, v, x_BTD, state, n_new_B):
  """A right-padded cached call (ragged prefill): the recurrent form token by token, row
  `b`'s state advancing only on its first `n_new_B[b]` tokens, so the final state is the
  state at each row's own length; padding outputs are 0."""
  T = q.shape[1]

  def step(st, xs):
    t, q_t, k_t, v_t, x_t = xs
    o_t, st_t = apply_op(lc, params, q_t[:, None], k_t[:, None], v_t[:, None], x=x_t[:, None],
                         grid=(1,), state=st, return_state=True, form="recurrent")
    keep = t < n_new_B
    st = jax.tree.map(lambda a, b: jnp.where(keep.reshape((-1,) + (1,) * (a.ndim - 1)), a, b),
                      st_t, st)
    o_t = jnp.where(keep.reshape((-1,) + (1,) * (o_t.ndim - 2)), o_t[:, 0], 0)
    return st, o_t

  swap = lambda a: jnp.swapaxes(a, 0, 1)
  st, o = jax.lax.scan(step, state, (jnp.arange(T, dtype=jnp.int32), swap(q), swap(k),
                                     swap(v), swap(x_BTD)))
  return swap(o), st


def forward(lc: LinearConfig, params: dict, x, *, segment_ids=None, positions=None, cache=None,
            dropout=None):
  """The layer's forward pass on a parameter dict (see `LinearAttention`); `dropout` is
  None or a function applied to the output."""
  if segment_ids is not None and cache is None:
    raise ValueError("segment_ids are not supported by the linear-attention layer "
                     f"{lc.mechanism!r} (its state mixes all earlier tokens); expected "
                     "segment_ids=None")
  cfg, p = lc.cfg, params
  if x.ndim < 3 or x.shape[-1] != cfg.d_model:
    raise ValueError(f"x must be [B, T, d_model={cfg.d_model}] or [B, *grid, d_model], got shape "
                     f"{x.shape}")
  grid = tuple(x.shape[1:-1])
  B, T = x.shape[0], math.prod(grid)
  x_BTD = x.reshape(B, T, cfg.d_model)
  dtype = cfg.dtype or x.dtype

  def proj(name, eq):
    out = jnp.einsum(eq, x_BTD.astype(dtype), p[f"{name}_kernel"].astype(dtype))
    if f"{name}_bias" in p:
      out = out + p[f"{name}_bias"].astype(dtype)
    return out

  q = proj("q", "btd,dnh->btnh")
  k = proj("k", "btd,dkh->btkh")
  v = proj("v", "btd,dkh->btkh")
  q = constrain(q, ("batch", "length", "heads", None))

  offset = 0
  if cache is not None:
    if not lc.causal:
      raise ValueError(f"variant {lc.mechanism!r} (causal=False) cannot decode with a cache")
    if not isinstance(cache, dict) or set(cache) != {"state", "index", "lengths"}:
      raise TypeError("cache must be the dict from init_cache ({'state', 'index', 'lengths'}), "
                      f"got {type(cache).__name__}")
    if len(grid) != 1:
      raise ValueError(f"decoding with a cache needs [B, T, D] inputs, got grid {grid}")
    offset = cache["lengths"][:, None]      # RoPE positions per row
    n_new = _core._new_token_counts(  # pylint: disable=protected-access
        _core._check_ids("segment_ids", segment_ids, B, T), B, T)  # pylint: disable=protected-access
  if cfg.rope is not None:
    pos = positions if positions is not None else jnp.broadcast_to(
        jnp.arange(T, dtype=jnp.int32) + offset, (B, T))
    pos = jnp.asarray(pos)
    if pos.shape != (B, T):
      raise ValueError(f"positions for rope='1d' must be [B, T] = {(B, T)}, got shape {pos.shape}")
    q = _pos.apply_rope(q, pos, base=cfg.rope_base)
    k = _pos.apply_rope(k, pos, base=cfg.rope_base)
  elif positions is not None:
    raise ValueError("positions were given but the layer has rope=None")
  if lc.mechanism in _ALWAYS_CAUSAL:
    q = q * jnp.asarray(cfg.head_dim ** -0.5, q.dtype)

  if cache is None:
    o = _context_parallel_op(lc, p, q, k, v, x=x_BTD, grid=grid)
    if o is None:
      o = apply_op(lc, p, q, k, v, x=x_BTD, grid=grid)
    new_cache = None
  else:
    if segment_ids is None:
      form = "recurrent" if T == 1 else "chunked"
      o, st = apply_op(lc, p, q, k, v, x=x_BTD, grid=grid, state=cache["state"],
                       return_state=True, form=form)
    else:
      o, st = _ragged_steps(lc, p, q, k, v, x_BTD, cache["state"], n_new)
    new_cache = {"state": st, "index": cache["index"] + T, "lengths": cache["lengths"] + n_new}
  if lc.out_norm:
    o32 = o.astype(jnp.float32)
    o32 = o32 * jax.lax.rsqrt(jnp.mean(o32 * o32, axis=-1, keepdims=True) + 1e-6)
    o = (o32 * p["out_norm"].astype(jnp.float32)).astype(o.dtype)
  y = jnp.einsum("btnv,nvd->btd", o.astype(dtype), p["o_kernel"].astype(dtype))
  if "o_bias" in p:
    y = y + p["o_bias"].astype(dtype)
  if dropout is not None:
    y = dropout(y)
  y = y.reshape(x.shape[:-1] + (cfg.d_model,))
  return y if cache is None else (y, new_cache)


class LinearAttention(nnx.Module):
  """Linear-attention self-attention layer (GQA), Flax NNX (Linen twin:
  `attnjax.layers.linear_linen.LinearAttention`).

  `y = concat_n op(q, k, v)_n @ Wo` with `q = x Wq [B,T,N,H]`, `k = x Wk [B,T,K,H]`,
  `v = x Wv [B,T,K,Hv]` and `op` the function of `attnjax.ops.linear` named by
  `mechanism` (see the module table). Lightning / retention scale `q` by `H^-1/2` and, with
  `out_norm=True` (default for them), RMS-normalise each head's output over `Hv` with a
  learnable `[Hv]` scale (the per-head normalisation of RetNet / TransNormerLLM).

  Papers: "Transformers are RNNs" (linear); "Lightning Attention-2" (lightning);
  "Retentive Network" and "Gated Linear Attention Transformers" (retention, gate);
  "Efficient Attention: Attention with Linear Complexities" (efficient); "FLatten
  Transformer" (focused); "Bridging the Divide: Reconsidering Softmax and Linear
  Attention" (inline); "Flowformer" (flow).

  Args:
    d_model: D. num_heads: N. num_kv_heads: K (N % K == 0, default N).
    head_dim: H (default D // N). v_head_dim: Hv (default H).
    mechanism: one of `MECHANISMS`.
    causal: prefix attention (forced True for lightning/retention, must be False for
      efficient; an option for linear, focused, inline and flow).
    feature_map: 'linear' / 'inline' / 'retention' only: 'elu+1' | 'relu' | 'identity'.
    decay: lightning/retention: None (default decays), a float or N floats in (0, 1].
    learnable_decay: lightning/retention: decays `exp(-softplus(p_n))` with a learnable
      `decay_param [N]` initialised at `decay`.
    gate: retention: data-dependent decay `log_sigmoid(x Wg + bg) / 16` per token and head
      (GLA), multiplied with the constant decay.
    focusing_factor, dwc_size: focused: the focusing power p >= 1 and an odd depthwise
      conv window over the values (None = no DWC; 1-D, or 2-D over a `[B, Hh, Ww, D]` grid).
    out_norm: per-head RMS norm of the op output (default: True for lightning/retention).
    chunk_size, implementation, eps: passed to the op where it takes them (implementation
      None: the op's 'auto', the Pallas chunk kernel on TPU/GPU when it serves the call).
    rope: None or '1d' (RoPE on q, k before the feature map; positions default to
      `arange(T)` + cache index). rope_base: its base.
    use_bias: biases on the projections. dropout_rate: dropout on the layer output.
    dtype: compute dtype (default: the input's). param_dtype: float32.
    rngs: `nnx.Rngs`.

  Call: `layer(x [B,T,D] or [B,Hh,Ww,D], *, segment_ids=None, positions=None, cache=None,
  deterministic=True)`; returns the same leading shape with D features, and
  `(y, new_cache)` when `cache` (from `init_cache`) is given.
  """

  def __init__(self, d_model: int, num_heads: int, *, mechanism: str, rngs: nnx.Rngs, **options):
    if not isinstance(rngs, nnx.Rngs):
      raise TypeError(f"rngs must be an nnx.Rngs, got {type(rngs).__name__}")
    lc, specs = linear_config(d_model, num_heads, mechanism=mechanism, **options)
    self.lc, self.cfg = lc, lc.cfg
    self.mechanism, self.causal = lc.mechanism, lc.causal
    self._param_names = tuple(specs)
    for name, spec in specs.items():
      setattr(self, name, make_param(rngs, spec, self.cfg.param_dtype))
    self.dropout = nnx.Dropout(self.cfg.dropout_rate, rngs=rngs)

  def params_dict(self) -> dict:
    """The parameter arrays by name."""
    return {name: getattr(self, name)[...] for name in self._param_names}

  def decay(self):
    """Per-head decays `[N]` float32 (lightning/retention), else None."""
    return decays(self.lc, self.params_dict())

  def init_cache(self, batch: int, max_len: int) -> dict:
    """The recurrent state of `batch` sequences (constant size; `max_len` is not used for
    storage) as `{'state': ..., 'index': int32 []}`."""
    return init_state(self.lc, batch, max_len)

  def op(self, q, k, v, *, x=None, grid=None, state=None, return_state=False, form="chunked"):
    """The attention op on projected `q [B,T,N,H]`, `k`, `v` (`x` feeds the retention gate)."""
    return apply_op(self.lc, self.params_dict(), q, k, v, x=x, grid=grid, state=state,
                    return_state=return_state, form=form)

  def __call__(self, x, *, segment_ids=None, positions=None, cache=None,
               deterministic: bool = True):
    dropout = None
    if self.cfg.dropout_rate > 0 and not deterministic:
      dropout = lambda y: self.dropout(y, deterministic=False)
    return forward(self.lc, self.params_dict(), x, segment_ids=segment_ids, positions=positions,
                   cache=cache, dropout=dropout)


# ------------------------------------------------------------------------------ registry
# Factories in the `attnjax.variants` convention; `variants._register_builtins` registers
# one per mechanism (nothing is registered at import).


def make_factory(mechanism: str):
  """The NNX factory `factory(*, d_model, num_heads, num_kv_heads, head_dim, rngs, **options)`
  building `LinearAttention(mechanism=mechanism)`."""

  def factory(*, d_model, num_heads, num_kv_heads=None, head_dim=None, rngs, **options):
    return LinearAttention(d_model, num_heads, mechanism=mechanism, num_kv_heads=num_kv_heads,
                           head_dim=head_dim, rngs=rngs, **options)
  factory.__name__ = f"{mechanism}_factory"
  factory.__doc__ = f"`LinearAttention(mechanism={mechanism!r})` (see attnjax.layers.linear)."
  return factory


def make_linen_factory(mechanism: str):
  """The Linen factory (the NNX signature minus `rngs`) building
  `linear_linen.LinearAttention(mechanism=mechanism)`."""

  def linen_factory(*, d_model, num_heads, num_kv_heads=None, head_dim=None, **options):
    from attnjax.layers import linear_linen  # pylint: disable=import-outside-toplevel
    if isinstance(options.get("decay"), list):  # Linen fields must be hashable
      options["decay"] = tuple(options["decay"])
    return linear_linen.LinearAttention(d_model=d_model, num_heads=num_heads, mechanism=mechanism,
                                        num_kv_heads=num_kv_heads, head_dim=head_dim, **options)
  linen_factory.__name__ = f"{mechanism}_linen_factory"
  linen_factory.__doc__ = (f"`linear_linen.LinearAttention(mechanism={mechanism!r})` "
                           f"(see attnjax.layers.linear_linen).")
  return linen_factory
