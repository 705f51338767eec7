"""Flax NNX layers for gated / delta-rule linear attention and Mamba-2, registered in
`attnjax.variants` as 'gla', 'deltanet', 'gated_deltanet' and 'mamba2'.

One layer class, `GatedLinearAttention(mechanism=...)`, holds the projections and the usual
companions of each mechanism and calls the op of `attnjax.ops.linear`:

- 'gla' (`gated_linear_attention`): low-rank gate
  `log_alpha = log_sigmoid(x Wa Wb + b) / 16` per head and key dimension.
- 'deltanet' (`delta_rule_attention`): short causal conv + SiLU on q/k/v, L2-normalised
  q/k, `beta = sigmoid(x Wbeta)`.
- 'gated_deltanet' (`gated_delta_rule_attention`): as 'deltanet', plus
  `log_alpha = -exp(A_log) softplus(x Wdt + dt_bias)` per head.
- 'mamba2' (`ssd_attention`): short conv + SiLU on x/B/C, `dt = softplus(x Wdt + dt_bias)`,
  `A = -exp(A_log)`, the `D` skip.

Every mechanism ends with the output gate and norm: per head
`o = RMSNorm(o) * out_norm * silu(x Wg)`, then `y = concat_n o_n @ Wo`.

Parameters: `q_kernel`, `k_kernel`, `v_kernel`, `o_kernel` as in `MultiHeadAttention`
(`q [D, N, H]`, `k [D, K, H]`, `v [D, K, Hv]`), except for 'mamba2' where `q` (C) and `k`
(B) have `K` groups (`[D, K, H]`, `H` the state size) and `v` (x) has `N` heads
(`[D, N, Hv]`, `Hv` the head dim P). The short convs `{q,k,v}_conv [W, heads, dim]` are
depthwise and causal.

Decoding: `init_cache(batch, max_len)` returns `{'state': S [B, N, Hv, H] float32, 'conv':
(the last W - 1 conv inputs of q, k, v, float32, or ()), 'index': int32, 'lengths': int32
[B]}`; constant size. `layer(x, cache=c) -> (y, new_c)` runs the recurrent form for one
token and the chunked form for a prefill. Ragged prompts: with a cache, `segment_ids < 0`
mark right padding; padded steps are identity transitions (zero key / beta / dt, decay 1),
so each row's state is the state at its own length, its conv inputs are taken at that
length, its RoPE positions continue from `lengths[b]`, and padding outputs are 0.
Context parallelism: under the trainer's mesh with a `context` axis > 1 (and no cache)
the op runs with the sequence split over it, the state passed between the shards
(`attnjax.parallel.linear_cp`); the short convs run on the whole sequence, so the result
is the same as on one device. The option validation (`gated_config`), `init_state` and
`forward` are plain functions shared with the Linen twin
`attnjax.layers.linear_gated_linen.GatedLinearAttention`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax.layers import _core
from attnjax.layers._core import AttentionConfig, ParamSpec, _dense_init, constrain
from attnjax.layers.attention import make_param
from attnjax.ops import linear as L
from attnjax.ops import positional as _pos
from attnjax.ops.linear.gated import check_pow2_chunk

__all__ = ["GatedLinearAttention", "GatedConfig", "MECHANISMS", "gated_config", "init_state",
           "forward", "make_factory", "make_linen_factory"]

MECHANISMS = ("gla", "deltanet", "gated_deltanet", "mamba2")
_CONV = ("deltanet", "gated_deltanet", "mamba2")
_GATE_TEMPERATURE = 16.0  # GLA's normaliser of the log-sigmoid gate


def _zeros(key, shape, dtype=jnp.float32):
  del key
  return jnp.zeros(shape, dtype)


def _ones(key, shape, dtype=jnp.float32):
  del key
  return jnp.ones(shape, dtype)


def _const(value):
  value = np.asarray(value, np.float32)

  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.broadcast_to(jnp.asarray(value, dtype), shape)
  return init


def _a_log(N):
  """Mamba-2's `A_log` init: `A = -exp(A_log)` spread over [1, 16] across heads."""
  return np.log(np.linspace(1.0, 16.0, N))


def _dt_bias(N):
  """`softplus^-1(dt)` with `dt` log-spaced over [1e-3, 1e-1] across heads."""
  dt = np.exp(np.linspace(np.log(1e-3), np.log(1e-1), N))
  return dt + np.log(-np.expm1(-dt))


@dataclasses.dataclass(frozen=True)
class GatedConfig:
  """Validated options (shared by the NNX and Linen classes)."""

  cfg: AttentionConfig
  mechanism: str
  conv_size: int
  gate_rank: int
  chunk_size: int


def gated_config(d_model: int, num_heads: int, *, mechanism: str,
                 num_kv_heads: int | None = None, head_dim: int | None = None,
                 v_head_dim: int | None = None, causal: bool = True, conv_size: int = 4,
                 gate_rank: int = 16, chunk_size: int = 64, rope: str | None = None,
                 rope_base: float = 10000.0, use_bias: bool = False,
                 dropout_rate: float = 0.0, dtype: Any = None,
                 param_dtype: Any = jnp.float32) -> tuple[GatedConfig, dict]:
  """Validates the options of `GatedLinearAttention`; returns `(GatedConfig, param specs)`."""
  if mechanism not in MECHANISMS:
    raise ValueError(f"mechanism must be one of {MECHANISMS}, got mechanism={mechanism!r}")
  m = mechanism
  if causal is not True:
    raise ValueError(f"variant {m!r} is causal only; got causal={causal!r} (expected True)")
  if isinstance(conv_size, bool) or not isinstance(conv_size, int) or conv_size < 1:
    raise ValueError(f"conv_size must be a positive int (1: no context), got "
                     f"conv_size={conv_size!r}")
  if m not in _CONV and conv_size != 4:
    raise ValueError(f"conv_size is an option of {_CONV} only, got conv_size={conv_size!r} "
                     f"for {m!r}")
  if isinstance(gate_rank, bool) or not isinstance(gate_rank, int) or gate_rank < 1:
    raise ValueError(f"gate_rank must be a positive int, got gate_rank={gate_rank!r}")
  check_pow2_chunk(chunk_size)
  if rope not in (None, "1d"):
    raise ValueError(f"rope must be None or '1d' for {m!r}, got rope={rope!r}")
  cfg = AttentionConfig(d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                        head_dim=head_dim, v_head_dim=v_head_dim, use_bias=use_bias,
                        rope=rope, rope_base=rope_base,
                        dropout_rate=dropout_rate, dtype=dtype, param_dtype=param_dtype)
  D, N, K, H, Hv = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.v_head_dim
  dense = _dense_init(0, (1, 2))
  if m == "mamba2":   # C (q) and B (k) per group, x (v) per head
    shapes = {"q": (K, H, "kv_heads"), "k": (K, H, "kv_heads"), "v": (N, Hv, "heads")}
  else:
    shapes = {"q": (N, H, "heads"), "k": (K, H, "kv_heads"), "v": (K, Hv, "kv_heads")}
  specs = {}
  for name, (heads, dim, axis) in shapes.items():
    specs[f"{name}_kernel"] = ParamSpec((D, heads, dim), dense, ("embed", axis, "head_dim"))
    if use_bias:
      specs[f"{name}_bias"] = ParamSpec((heads, dim), _zeros, (axis, "head_dim"))
  specs["o_kernel"] = ParamSpec((N, Hv, D), _dense_init((0, 1), 2), ("heads", "head_dim", "embed"))
  if use_bias:
    specs["o_bias"] = ParamSpec((D,), _zeros, ("embed",))
  if m in _CONV:
    for name, (heads, dim, axis) in shapes.items():
      specs[f"{name}_conv"] = ParamSpec((conv_size, heads, dim),
                                        jax.nn.initializers.normal(conv_size ** -0.5),
                                        (None, axis, "head_dim"))
  vec = lambda init: ParamSpec((N,), init, ("heads",))
  if m == "gla":
    specs["gate_a_kernel"] = ParamSpec((D, gate_rank), _dense_init(0, 1), ("embed", None))
    specs["gate_b_kernel"] = ParamSpec((gate_rank, N, H), _dense_init(0, (1, 2)),
                                       (None, "heads", "head_dim"))
    specs["gate_bias"] = ParamSpec((N, H), _zeros, ("heads", "head_dim"))
  if m in ("deltanet", "gated_deltanet"):
    specs["beta_kernel"] = ParamSpec((D, N), _dense_init(0, 1), ("embed", "heads"))
  if m in ("gated_deltanet", "mamba2"):
    specs["dt_kernel"] = ParamSpec((D, N), _dense_init(0, 1), ("embed", "heads"))
    specs["dt_bias"] = vec(_const(_dt_bias(N)))
    specs["A_log"] = vec(_const(_a_log(N)))
  if m == "mamba2":
    specs["D_skip"] = vec(_ones)
  specs["g_kernel"] = ParamSpec((D, N, Hv), dense, ("embed", "heads", "head_dim"))
  specs["out_norm"] = ParamSpec((Hv,), _ones, ("head_dim",))
  return GatedConfig(cfg=cfg, mechanism=m, conv_size=conv_size, gate_rank=gate_rank,
                     chunk_size=int(chunk_size)), specs


def init_state(gc: GatedConfig, batch: int, max_len: int) -> dict:
  """The decoding cache `{'state', 'conv', 'index', 'lengths'}` (constant size; `max_len`
  is checked only)."""
  for name, val in (("batch", batch), ("max_len", max_len)):
    if isinstance(val, bool) or not isinstance(val, int) or val < 1:
      raise ValueError(f"{name} must be a positive int, got {name}={val!r}")
  cfg = gc.cfg
  B, N, K, H, Hv = batch, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.v_head_dim
  conv = ()
  if gc.mechanism in _CONV:
    W = gc.conv_size - 1
    if gc.mechanism == "mamba2":
      dims = ((K, H), (K, H), (N, Hv))
    else:
      dims = ((N, H), (K, H), (K, Hv))
    conv = tuple(jnp.zeros((B, W, a, b), jnp.float32) for a, b in dims)
  return {"state": jnp.zeros((B, N, Hv, H), jnp.float32), "conv": conv,
          "index": jnp.zeros((), jnp.int32), "lengths": jnp.zeros((B,), jnp.int32)}


def _short_conv(u, w, prev, n_B=None):
  """Depthwise causal conv: `out_t = sum_i w[i] u_{t - W + 1 + i}` over `[prev, u]`.

  u [B, T, A, C], w [W, A, C], prev [B, W-1, A, C] (the inputs before `u`; zeros at the
  sequence start). Returns (out [B, T, A, C] float32, the last W-1 inputs: those before
  row `b`'s position `n_B[b]` when `n_B` [B] is given, i.e. ignoring right padding)."""
  W = w.shape[0]
  T = u.shape[1]
  ext = jnp.concatenate([prev.astype(jnp.float32), u.astype(jnp.float32)], axis=1)
  w32 = w.astype(jnp.float32)
  out = sum(w32[i] * ext[:, i:i + T] for i in range(W))
  if n_B is None:
    return out, ext[:, ext.shape[1] - (W - 1):]
  idx = n_B[:, None] + jnp.arange(W - 1, dtype=jnp.int32)[None, :]
  return out, jnp.take_along_axis(ext, idx[:, :, None, None], axis=1)


def _rms(x, eps=1e-6):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def _l2(x, eps=1e-6):
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def forward(gc: GatedConfig, params: dict, x, *, segment_ids=None, positions=None, cache=None,
            dropout=None):
  """The layer's forward pass on a parameter dict (see `GatedLinearAttention`)."""
  cfg, p, m = gc.cfg, params, gc.mechanism
  if segment_ids is not None and cache is None:
    raise ValueError(f"segment_ids are not supported by the recurrent layer {m!r} (its state "
                     "mixes all earlier tokens); expected segment_ids=None (with a cache, "
                     "segment_ids < 0 mark right padding)")
  if positions is not None and cfg.rope is None:
    raise ValueError("positions were given but the layer has rope=None")
  if not hasattr(x, "ndim") or x.ndim < 3 or x.shape[-1] != cfg.d_model:
    raise ValueError(f"x must be [B, T, d_model={cfg.d_model}] or [B, *grid, d_model], got "
                     f"shape {getattr(x, 'shape', None)}")
  if x.ndim > 3:              # a grid: its tokens in raster order, as the linear layers do
    if cache is not None:
      raise ValueError(f"decoding with a cache needs [B, T, D] inputs, got shape {x.shape}")
    y = forward(gc, params, x.reshape(x.shape[0], -1, x.shape[-1]), segment_ids=segment_ids,
                positions=positions, dropout=dropout)
    return y.reshape(x.shape[:-1] + y.shape[-1:])
  if cache is not None and (not isinstance(cache, dict)
                            or set(cache) != {"state", "conv", "index", "lengths"}):
    raise TypeError("cache must be the dict from init_cache ({'state', 'conv', 'index', "
                    f"'lengths'}}), got {type(cache).__name__}")
  B, T, _ = x.shape
  n_new = live = None      # ragged (right-padded) cached call: real tokens per row
  if cache is not None and segment_ids is not None:
    n_new = _core._new_token_counts(  # pylint: disable=protected-access
        _core._check_ids("segment_ids", segment_ids, B, T), B, T)  # pylint: disable=protected-access
    live = jnp.arange(T, dtype=jnp.int32)[None, :] < n_new[:, None]

  def unpadded(a):
    """`a [B, T, ...]` with padded steps set to 0 (identity transitions, zero outputs)."""
    if live is None:
      return a
    return jnp.where(live.reshape((B, T) + (1,) * (a.ndim - 2)), a, jnp.zeros((), a.dtype))
  dtype = cfg.dtype or x.dtype
  xd = x.astype(dtype)
  x32 = x.astype(jnp.float32)

  def proj(name):
    out = jnp.einsum("btd,dnh->btnh", xd, p[f"{name}_kernel"].astype(dtype))
    if f"{name}_bias" in p:
      out = out + p[f"{name}_bias"].astype(dtype)
    return out

  def lin32(name):
    return jnp.einsum("btd,d...->bt...", x32, p[name].astype(jnp.float32))

  q, k, v = proj("q"), proj("k"), proj("v")
  new_conv = ()
  if m in _CONV:
    prevs = cache["conv"] if cache is not None else tuple(
        jnp.zeros((B, gc.conv_size - 1) + u.shape[2:], jnp.float32) for u in (q, k, v))
    outs = [_short_conv(u, p[f"{n}_conv"], pv, n_new)
            for u, n, pv in zip((q, k, v), "qkv", prevs)]
    q, k, v = (jax.nn.silu(o).astype(dtype) for o, _ in outs)
    new_conv = tuple(c for _, c in outs)
  if m in ("deltanet", "gated_deltanet"):
    q = _l2(q.astype(jnp.float32)).astype(dtype)
    k = _l2(k.astype(jnp.float32)).astype(dtype)
  if cfg.rope is not None:   # rotations keep the L2-normalised keys of the delta rule unit
    offset = 0 if cache is None else cache["lengths"][:, None]   # each row's own positions
    pos = jnp.asarray(positions if positions is not None else jnp.broadcast_to(
        jnp.arange(T, dtype=jnp.int32) + offset, (B, T)))
    if pos.shape != (B, T):
      raise ValueError(f"positions for rope='1d' must be [B, T] = {(B, T)}, got shape "
                       f"{pos.shape}")
    q = _pos.apply_rope(q, pos, base=cfg.rope_base)
    k = _pos.apply_rope(k, pos, base=cfg.rope_base)
  if m != "mamba2":
    q = constrain(q, ("batch", "length", "heads", None))
  k = unpadded(k)
  form = "recurrent" if cache is not None and T == 1 else "chunked"
  kw = dict(form=form, chunk_size=gc.chunk_size, return_state=True,
            state=None if cache is None else cache["state"])
  cp_mesh = None
  if cache is None:  # training / scoring: context-parallel when the trainer's mesh says so
    from attnjax.parallel import linear_cp  # pylint: disable=import-outside-toplevel
    cp_mesh = linear_cp.context_mesh()
    if cp_mesh is not None and T % dict(cp_mesh.shape)["context"]:
      cp_mesh = None

  def run(fn, *xs, transition="diagonal"):
    """`fn(*xs, **kw) -> (o, state)`; with a context mesh the sequence is split over it
    and the state passes between the shards (`attnjax.parallel.linear_cp`): same result.
    The short convs above ran on the whole sequence, so each shard sees its halo."""
    if cp_mesh is None:
      return fn(*xs, **kw)
    o = linear_cp.context_parallel_linear(fn, *xs, mesh=cp_mesh, transition=transition,
                                          form=form, chunk_size=gc.chunk_size)
    return o, None

  if m == "gla":
    g = jnp.einsum("btr,rnh->btnh", lin32("gate_a_kernel"),
                   p["gate_b_kernel"].astype(jnp.float32)) + p["gate_bias"].astype(jnp.float32)
    log_alpha = unpadded(jax.nn.log_sigmoid(g) / _GATE_TEMPERATURE)
    o, st = run(L.gated_linear_attention, q, k, v, log_alpha)
  elif m in ("deltanet", "gated_deltanet"):
    beta = unpadded(jax.nn.sigmoid(lin32("beta_kernel")))
    if m == "deltanet":
      o, st = run(L.delta_rule_attention, q, k, v, beta, transition="matrix")
    else:
      dt = jax.nn.softplus(lin32("dt_kernel") + p["dt_bias"].astype(jnp.float32))
      log_alpha = unpadded(-jnp.exp(p["A_log"].astype(jnp.float32)) * dt)
      o, st = run(L.gated_delta_rule_attention, q, k, v, beta, log_alpha, transition="matrix")
  else:  # mamba2
    dt = unpadded(jax.nn.softplus(lin32("dt_kernel") + p["dt_bias"].astype(jnp.float32)))
    A = -jnp.exp(p["A_log"].astype(jnp.float32))
    D_skip = p["D_skip"].astype(jnp.float32)
    o, st = run(lambda x_, dt_, B_, C_, **kw_: L.ssd_attention(x_, dt_, A, B_, C_, D=D_skip,
                                                               **kw_), v, dt, k, q)
  o = unpadded(o)
  gate = jnp.einsum("btd,dnv->btnv", x32, p["g_kernel"].astype(jnp.float32))
  o = _rms(o.astype(jnp.float32)) * p["out_norm"].astype(jnp.float32) * jax.nn.silu(gate)
  y = jnp.einsum("btnv,nvd->btd", o.astype(dtype), p["o_kernel"].astype(dtype))
  if "o_bias" in p:
    y = y + p["o_bias"].astype(dtype)
  if dropout is not None:
    y = dropout(y)
  if cache is None:
    return y
  n_new = jnp.full((B,), T, jnp.int32) if n_new is None else n_new
  return y, {"state": st, "conv": new_conv, "index": cache["index"] + T,
             "lengths": cache["lengths"] + n_new}


class GatedLinearAttention(nnx.Module):
  """GLA / DeltaNet / Gated DeltaNet / Mamba-2 token mixer, Flax NNX (Linen twin:
  `attnjax.layers.linear_gated_linen.GatedLinearAttention`). See the module docstring for
  the computation of each mechanism.

  Papers: "Gated Linear Attention Transformers with Hardware-Efficient Training" (gla);
  "Parallelizing Linear Transformers with the Delta Rule over Sequence Length" (deltanet);
  "Gated Delta Networks: Improving Mamba2 with Delta Rule" (gated_deltanet); "Transformers
  are SSMs: Generalized Models and Efficient Algorithms Through Structured State Space
  Duality" (mamba2).

  Args:
    d_model: D. num_heads: N. num_kv_heads: K (N % K == 0, default N; the groups of B/C
      for mamba2). head_dim: H (default D // N; the state size for mamba2).
    v_head_dim: Hv (default H; Mamba-2's head dim P).
    mechanism: one of `MECHANISMS`.
    causal: must be True (the default).
    conv_size: width W of the short causal depthwise conv (deltanet, gated_deltanet,
      mamba2; default 4; 1 = pointwise).
    gate_rank: rank of GLA's low-rank gate (default 16).
    chunk_size: the op's chunk length (a power of two, default 64).
    rope: None or '1d': RoPE on q/k (C/B for mamba2) after the conv and the L2 norm
      (positions default to `arange(T)` + cache index; the LM passes '1d' unless its
      `position_embedding` is 'none'). rope_base: its base.
    use_bias: biases on the q/k/v/out projections. dropout_rate: dropout on the output.
    dtype: compute dtype (default: the input's). param_dtype: float32.
    rngs: `nnx.Rngs`.

  Call: `layer(x [B, T, D], *, segment_ids=None, positions=None, cache=None,
  deterministic=True)` -> `[B, T, D]`, and `(y, new_cache)` with `cache`.
  """

  def __init__(self, d_model: int, num_heads: int, *, mechanism: str, rngs: nnx.Rngs,
               **options):
    if not isinstance(rngs, nnx.Rngs):
      raise TypeError(f"rngs must be an nnx.Rngs, got {type(rngs).__name__}")
    gc, specs = gated_config(d_model, num_heads, mechanism=mechanism, **options)
    self.gc, self.cfg, self.mechanism = gc, gc.cfg, gc.mechanism
    self.causal = True
    self._param_names = tuple(specs)
    for name, spec in specs.items():
      setattr(self, name, make_param(rngs, spec, self.cfg.param_dtype))
    self.dropout = nnx.Dropout(self.cfg.dropout_rate, rngs=rngs)

  def params_dict(self) -> dict:
    """The parameter arrays by name."""
    return {name: getattr(self, name)[...] for name in self._param_names}

  def init_cache(self, batch: int, max_len: int) -> dict:
    """The recurrent state and conv inputs of `batch` sequences (constant size)."""
    return init_state(self.gc, batch, max_len)

  def __call__(self, x, *, segment_ids=None, positions=None, cache=None,
               deterministic: bool = True):
    dropout = None
    if self.cfg.dropout_rate > 0 and not deterministic:
      dropout = lambda y: self.dropout(y, deterministic=False)
    return forward(self.gc, self.params_dict(), x, segment_ids=segment_ids,
                   positions=positions, cache=cache, dropout=dropout)


def make_factory(mechanism: str):
  """The NNX factory building `GatedLinearAttention(mechanism=mechanism)`."""

  def factory(*, d_model, num_heads, num_kv_heads=None, head_dim=None, rngs, **options):
    return GatedLinearAttention(d_model, num_heads, mechanism=mechanism,
                                num_kv_heads=num_kv_heads, head_dim=head_dim, rngs=rngs,
                                **options)
  factory.__name__ = f"{mechanism}_factory"
  factory.__doc__ = (f"`GatedLinearAttention(mechanism={mechanism!r})` (see "
                     "attnjax.layers.linear_gated).")
  return factory


def make_linen_factory(mechanism: str):
  """The Linen factory building `linear_gated_linen.GatedLinearAttention`."""

  def linen_factory(*, d_model, num_heads, num_kv_heads=None, head_dim=None, **options):
    from attnjax.layers import linear_gated_linen  # pylint: disable=import-outside-toplevel
    return linear_gated_linen.GatedLinearAttention(d_model=d_model, num_heads=num_heads,
                                                   mechanism=mechanism,
                                                   num_kv_heads=num_kv_heads,
                                                   head_dim=head_dim, **options)
  linen_factory.__name__ = f"{mechanism}_linen_factory"
  linen_factory.__doc__ = (f"`linear_gated_linen.GatedLinearAttention(mechanism={mechanism!r})`"
                           " (see attnjax.layers.linear_gated_linen).")
  return linen_factory
