"""Flax NNX layers for head-level mechanisms and score-function recipes (issue 19).

One layer class, `HeadsAttention(mechanism=...)`, owns the projections and calls the ops
of `attnjax.ops.heads` / `attnjax.ops.dense` / `attnjax.score_mods`. Inputs are token
sequences `x [B, T, D]` (registry kind 'sequence'); the output has the same shape.

Registry names (own options; paper):
- 'moh': Mixture-of-Head attention, `num_shared` (default N // 2), `top_k` (routed heads
  per token, default half the routed heads), `load_balance_weight` (0.01)
  ("MoH: Multi-Head Attention as Mixture-of-Head Attention");
- 'head_gates': learnable per-head gates `head_gates [N]` (init 1) and a fixed
  `head_mask` ("Are Sixteen Heads Really Better than One?");
- 'shvit': one head on the first `partial_dim` channels (default `round(D / 4.67)`),
  `qk_dim` (default 16 or `partial_dim`), the rest passed through ("SHViT");
- 'mw_mha': one sliding window per head group, `windows` (ints or None = global)
  ("Masked Autoencoders with Multi-Window Local-Global Attention Are Better Audio
  Learners");
- 'talking_heads': logits and weights mixed across heads, `pre` / `post` (both True)
  ("Talking-Heads Attention");
- 'cosine': scaled cosine attention with learnable per-head `logit_scale` (Swin V2),
  `centered=True` for correlation attention;
- 'sinkhorn': doubly-stochastic attention, `num_iters` (3) ("Sinkformers"); not causal
  (the column sums see every query): `causal=True` requires `num_iters=1` (= softmax);
- 'additive': `e = w^T act(W q + U k)`, `attn_dim`, `activation` ('tanh' is Bahdanau,
  others the MLP-scored "Neural Attention");
- 'collapsed_qk': `s = x W x^T` per head, `symmetric`, `value_proj` ("Reducing the
  Transformer Architecture to a Minimum");
- 'log_n_scaling': logits times `(log n / log train_len) ** power` ("Training-free
  Diffusion Model Adaptation for Variable-Sized Text-to-Image Synthesis").

Common options: `causal`, `rope` (None or '1d'), `rope_base`, `implementation`, `dtype`,
`param_dtype`, `dropout_rate` (must be 0). Config (`heads_config`), parameter specs
(`param_specs`) and the forward pass (`forward`, returning `(y, aux)`) are plain
functions shared with the Linen twin in `attnjax.layers.heads_linen`.

MoH's load-balance loss. `forward` returns it (times `load_balance_weight`) in
`aux['aux_loss']`; the NNX layer sows it as `nnx.Intermediate` 'aux_loss' when called
under `nnx.capture(model, nnx.Intermediate)` (the trainer does this and adds every sown
'aux_loss' to the training loss), the Linen twin sows it in the 'intermediates'
collection.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax import masks as _masks
from attnjax import score_mods as _sm
from attnjax.layers import _core
from attnjax.layers import _options as _opt
from attnjax.layers._core import ParamSpec, _positive_int
from attnjax.layers.attention import make_param
from attnjax.ops import dense as _dense
from attnjax.ops import heads as _heads
from attnjax.ops import positional as _pos

__all__ = ["HeadsAttention", "HeadsConfig", "MECHANISMS", "heads_config", "param_specs",
           "forward", "make_factory", "make_linen_factory"]

MECHANISMS = ("moh", "head_gates", "shvit", "mw_mha", "talking_heads", "cosine", "sinkhorn",
              "additive", "collapsed_qk", "log_n_scaling")
_OPTIONS = {
    "moh": dict(num_shared=None, top_k=None, load_balance_weight=0.01),
    "head_gates": dict(head_mask=None),
    "shvit": dict(partial_dim=None, qk_dim=None),
    "mw_mha": dict(windows=None),
    "talking_heads": dict(pre=True, post=True),
    "cosine": dict(centered=False),
    "sinkhorn": dict(num_iters=3),
    "additive": dict(attn_dim=None, activation="tanh"),
    "collapsed_qk": dict(symmetric=False, value_proj=True),
    "log_n_scaling": dict(train_len=64, power=0.5),
}
_COMMON = dict(causal=False, rope=None, rope_base=10000.0, implementation=None, dtype=None,
               param_dtype=jnp.float32, dropout_rate=0.0)
# Refuse causal=True with their default options (sinkhorn: only num_iters=1 is causal).
NEVER_CAUSAL = ("sinkhorn",)
_PLAIN = ("talking_heads", "sinkhorn", "additive")  # plain-jnp ops: no implementation choice


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
  """Validated configuration of a `HeadsAttention` layer."""

  mechanism: str
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  options: tuple  # the mechanism's options, (name, value) sorted
  causal: bool
  rope: Any
  rope_base: float
  implementation: Any
  dtype: Any
  param_dtype: Any

  @property
  def opts(self) -> dict:
    return dict(self.options)


def _freeze(v):
  return tuple(v) if isinstance(v, list) else v


def heads_config(mechanism, d_model, num_heads, *, num_kv_heads=None, head_dim=None, **options):
  """Validates `options` for `mechanism` and returns a `HeadsConfig` (ValueError/TypeError
  naming a bad option and what it expects)."""
  own, common = _opt.split_options(mechanism, options, _OPTIONS.get(mechanism, {}), _COMMON,
                                   mechanisms=MECHANISMS, convert=_freeze)
  if common["rope"] not in (None, "1d"):
    raise ValueError(f"rope must be None or '1d' for variant {mechanism!r}, got "
                     f"rope={common['rope']!r}")
  _opt.reject_common(mechanism, common)
  if mechanism in _PLAIN and common["implementation"] is not None:
    raise ValueError(f"implementation must be None for variant {mechanism!r} (plain jnp: it "
                     f"needs the whole logit matrix), got {common['implementation']!r}")
  N = num_heads
  K, head_dim = _opt.head_layout(d_model, num_heads, num_kv_heads, head_dim)
  if mechanism == "moh":
    ns = N // 2 if own["num_shared"] is None else own["num_shared"]
    if isinstance(ns, bool) or not isinstance(ns, int) or not 0 <= ns < N:
      raise ValueError(f"num_shared must be an int in [0, num_heads={N}), got num_shared={ns!r}")
    nr = N - ns
    tk = max(1, nr // 2) if own["top_k"] is None else own["top_k"]
    if isinstance(tk, bool) or not isinstance(tk, int) or not 1 <= tk <= nr:
      raise ValueError(f"top_k must be an int in [1, routed heads={nr}], got top_k={tk!r}")
    own.update(num_shared=ns, top_k=tk)
  elif mechanism == "head_gates" and own["head_mask"] is not None:
    hm = own["head_mask"]
    if not isinstance(hm, tuple) or len(hm) != N:
      raise ValueError(f"head_mask must be a sequence of num_heads={N} bools, got "
                       f"head_mask={hm!r}")
    own["head_mask"] = tuple(bool(h) for h in hm)
  elif mechanism == "shvit":
    dp = own["partial_dim"] or max(1, round(d_model / 4.67))
    if isinstance(dp, bool) or not isinstance(dp, int) or not 1 <= dp <= d_model:
      raise ValueError(f"partial_dim must be an int in [1, d_model={d_model}], got {dp!r}")
    qk = own["qk_dim"] or min(16, dp)
    if own["qk_dim"] is None and common["rope"] is not None:
      qk += qk % 2  # RoPE rotates pairs
    _positive_int("qk_dim", qk)
    if common["rope"] is not None and qk % 2:
      raise ValueError(f"qk_dim must be even with rope='1d', got qk_dim={qk}")
    own.update(partial_dim=dp, qk_dim=qk)
  elif mechanism == "mw_mha":
    w = own["windows"]
    if w is None:
      w = (8, None) if N % 2 == 0 else (None,)
    own["windows"] = tuple(w) if isinstance(w, (tuple, list)) else w
    _heads.check_windows(own["windows"], N, K)
  elif mechanism == "sinkhorn":
    ni = own["num_iters"]
    if isinstance(ni, bool) or not isinstance(ni, int) or ni < 1:
      raise ValueError(f"num_iters must be an int >= 1, got num_iters={ni!r}")
    if common["causal"] and ni > 1:
      raise ValueError(f"causal=True needs num_iters=1 for variant 'sinkhorn': its column "
                       f"normalisation sums over every query, so later tokens would reach "
                       f"earlier outputs; got num_iters={ni}")
  elif mechanism == "additive":
    own["attn_dim"] = own["attn_dim"] or head_dim
    _positive_int("attn_dim", own["attn_dim"])
    if own["activation"] not in _dense._ACTIVATIONS:  # pylint: disable=protected-access
      raise ValueError(f"activation must be one of {sorted(_dense._ACTIVATIONS)}, got "  # pylint: disable=protected-access
                       f"activation={own['activation']!r}")
  elif mechanism == "collapsed_qk":
    if common["rope"] is not None and d_model % 2:
      raise ValueError(f"d_model must be even for collapsed_qk with rope='1d', got {d_model}")
  elif mechanism == "log_n_scaling":
    _dense.log_n_scale(1, own["train_len"], power=own["power"])
  return HeadsConfig(mechanism=mechanism, d_model=d_model, num_heads=N, num_kv_heads=K,
                     head_dim=head_dim, options=tuple(sorted(own.items())),
                     causal=bool(common["causal"]), rope=common["rope"],
                     rope_base=float(common["rope_base"]),
                     implementation=common["implementation"],
                     dtype=_core._canonical_dtype("dtype", common["dtype"]),  # pylint: disable=protected-access
                     param_dtype=_core._canonical_dtype("param_dtype", common["param_dtype"]))  # pylint: disable=protected-access


# ----------------------------------------------------------------------------- params

def _const(value):
  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.full(shape, value, dtype)
  return init


def _eye(key, shape, dtype=jnp.float32):
  del key
  return jnp.eye(shape[0], shape[1], dtype=dtype)


def param_specs(cfg: HeadsConfig) -> dict[str, ParamSpec]:
  """Parameters: `q_kernel [D,N,H]`, `k_kernel [D,K,H]`, `v_kernel [D,K,H]`, `o_kernel
  [N,H,D]` and per mechanism: 'moh' `router_shared [D,Ns]`, `router_routed [D,Nr]`,
  `router_mix [D,2]`; 'head_gates' `head_gates [N]`; 'talking_heads' `pre_mix`,
  `post_mix [N,N]`; 'cosine' `logit_scale [N]`; 'additive' `q_kernel/k_kernel` of width
  `attn_dim` and `score_w [N,A]`; 'shvit' `sh_q/sh_k [Dp,Hqk]`, `sh_v [Dp,Dp]`,
  `o_kernel [D,D]`; 'collapsed_qk' `qk_kernel [D,N,D]` (`[D,N,D//2]` symmetric)."""
  D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  o, m = cfg.opts, cfg.mechanism
  dense = _core._dense_init  # pylint: disable=protected-access
  if m == "shvit":
    dp, qk = o["partial_dim"], o["qk_dim"]
    return {"sh_q": ParamSpec((dp, qk), dense(0, 1), ("embed", None)),
            "sh_k": ParamSpec((dp, qk), dense(0, 1), ("embed", None)),
            "sh_v": ParamSpec((dp, dp), dense(0, 1), ("embed", None)),
            "o_kernel": ParamSpec((D, D), dense(0, 1), (None, "embed"))}
  A = o["attn_dim"] if m == "additive" else H
  specs = {}
  if m == "collapsed_qk":
    R = max(1, D // 2) if o["symmetric"] else D
    specs["qk_kernel"] = ParamSpec((D, N, R), dense(0, (1, 2)), ("embed", "heads", None))
    if not o["value_proj"]:
      return specs
  else:
    specs["q_kernel"] = ParamSpec((D, N, A), dense(0, (1, 2)), ("embed", "heads", "head_dim"))
    specs["k_kernel"] = ParamSpec((D, K, A), dense(0, (1, 2)), ("embed", "kv_heads", "head_dim"))
  specs["v_kernel"] = ParamSpec((D, K, H), dense(0, (1, 2)), ("embed", "kv_heads", "head_dim"))
  specs["o_kernel"] = ParamSpec((N, H, D), dense((0, 1), 2), ("heads", "head_dim", "embed"))
  init = jax.nn.initializers.normal(0.02)
  if m == "moh":
    ns = o["num_shared"]
    if ns:
      specs["router_shared"] = ParamSpec((D, ns), init, ("embed", None))
    specs["router_routed"] = ParamSpec((D, N - ns), init, ("embed", None))
    specs["router_mix"] = ParamSpec((D, 2), init, ("embed", None))
  elif m == "head_gates":
    specs["head_gates"] = ParamSpec((N,), _const(1.0), ("heads",))
  elif m == "talking_heads":
    if o["pre"]:
      specs["pre_mix"] = ParamSpec((N, N), _eye, ("heads", None))
    if o["post"]:
      specs["post_mix"] = ParamSpec((N, N), _eye, (None, "heads"))
  elif m == "cosine":
    specs["logit_scale"] = ParamSpec((N,), _const(math.log(10.0)), ("heads",))
  elif m == "additive":
    specs["score_w"] = ParamSpec((N, A), dense(1, 0), ("heads", None))
  return specs


# ----------------------------------------------------------------------------- forward

def _rope(cfg, x_BTNH, positions):
  if cfg.rope is None:
    return x_BTNH
  B, T = x_BTNH.shape[:2]
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)) if positions is None \
      else positions
  return _pos.apply_rope(x_BTNH, pos, base=cfg.rope_base)


def forward(cfg: HeadsConfig, params: dict, x, *, segment_ids=None, positions=None):
  """The layer on a parameter dict: `x [B, T, D] -> (y [B, T, D], aux)`; `aux` holds
  `'aux_loss'` (MoH's weighted load-balance loss; 0 for the other mechanisms).  A token
  grid `[B, *grid, D]` is flattened row-major to `[B, T, D]` and reshaped back."""
  if not hasattr(x, "ndim") or x.ndim < 3 or x.shape[-1] != cfg.d_model:
    raise ValueError(f"x must be [B, T, D={cfg.d_model}] (or [B, *grid, D]) for variant "
                     f"{cfg.mechanism!r}, got shape {getattr(x, 'shape', None)}")
  if x.ndim > 3:
    y, aux = forward(cfg, params, x.reshape(x.shape[0], -1, x.shape[-1]),
                     segment_ids=segment_ids, positions=positions)
    return y.reshape(x.shape[:-1] + (y.shape[-1],)), aux
  B, T, _ = x.shape
  if segment_ids is not None and segment_ids.shape != (B, T):
    raise ValueError(f"segment_ids must be [B, T] = {(B, T)}, got {segment_ids.shape}")
  dtype = cfg.dtype or x.dtype
  x = x.astype(dtype)
  p = {n: a.astype(dtype) if n not in ("logit_scale",) else a for n, a in params.items()}
  o, m = cfg.opts, cfg.mechanism
  seg = dict(q_segment_ids=segment_ids, kv_segment_ids=segment_ids) \
      if segment_ids is not None else {}
  akw = dict(seg, implementation=cfg.implementation)
  if cfg.causal:
    akw["mask"] = _masks.causal()
  aux = {"aux_loss": jnp.zeros((), jnp.float32)}

  if m == "shvit":
    dp = o["partial_dim"]
    if cfg.rope is not None:
      xp = x[..., :dp]
      q = _rope(cfg, jnp.einsum("btd,de->bte", xp, p["sh_q"])[:, :, None], positions)
      k = _rope(cfg, jnp.einsum("btd,de->bte", xp, p["sh_k"])[:, :, None], positions)
      v = jnp.einsum("btd,de->bte", xp, p["sh_v"])[:, :, None]
      att = _core._attention_fn()(q, k, v, **akw)[:, :, 0]  # pylint: disable=protected-access
      h = jnp.concatenate([att.astype(dtype), x[..., dp:]], -1)
    else:
      h = _heads.single_head_partial_attention(x, p["sh_q"], p["sh_k"], p["sh_v"], **akw)
    y = jnp.einsum("btd,de->bte", jax.nn.relu(h), p["o_kernel"])
    return _core.constrain(y, ("batch", "length", "embed")), aux

  if m == "collapsed_qk":
    w = p["qk_kernel"]
    if cfg.rope is not None:
      q = _rope(cfg, jnp.einsum("btd,dne->btne", x, w), positions)
      if o["symmetric"]:
        k = q
      else:
        k = _rope(cfg, x[:, :, None, :], positions)
    v = jnp.einsum("btd,dkh->btkh", x, p["v_kernel"]) if o["value_proj"] else None
    if cfg.rope is None:
      out = _dense.collapsed_qk_attention(x, w, symmetric=o["symmetric"], v=v, **akw)
    else:
      if v is None:
        v = x[:, :, None, :]
      N = cfg.num_heads
      if o["symmetric"]:
        v = jnp.repeat(v, N // v.shape[2], 2)
      else:
        k = jnp.broadcast_to(k, (B, T, v.shape[2], k.shape[-1]))
      out = _core._attention_fn()(q, k, v, **akw)  # pylint: disable=protected-access
    if not o["value_proj"]:
      y = jnp.mean(out.astype(jnp.float32), 2).astype(dtype)
    else:
      y = jnp.einsum("btnh,nhd->btd", out.astype(dtype), p["o_kernel"])
    return _core.constrain(y, ("batch", "length", "embed")), aux

  q = _rope(cfg, jnp.einsum("btd,dnh->btnh", x, p["q_kernel"]), positions)
  k = _rope(cfg, jnp.einsum("btd,dkh->btkh", x, p["k_kernel"]), positions)
  v = jnp.einsum("btd,dkh->btkh", x, p["v_kernel"])
  plain = dict(causal=cfg.causal, **seg)
  if m == "moh":
    shared = (jnp.einsum("btd,de->bte", x, p["router_shared"]) if o["num_shared"]
              else jnp.zeros((B, T, 0), dtype))
    routed = jnp.einsum("btd,de->bte", x, p["router_routed"])
    mix = jnp.einsum("btd,de->bte", x, p["router_mix"])
    out, moh_aux = _heads.moh_attention(q, k, v, shared, routed, mix, top_k=o["top_k"], **akw)
    aux["aux_loss"] = o["load_balance_weight"] * moh_aux["load_balance_loss"]
    aux["head_weights"] = moh_aux["head_weights"]
  elif m == "head_gates":
    hm = None if o["head_mask"] is None else jnp.asarray(o["head_mask"])
    out = _heads.head_gated_attention(q, k, v, gates=p["head_gates"], head_mask=hm, **akw)
  elif m == "mw_mha":
    akw.pop("mask", None)
    out = _heads.multi_window_attention(q, k, v, windows=o["windows"], causal=cfg.causal, **akw)
  elif m == "talking_heads":
    out = _heads.talking_heads_attention(q, k, v, pre_mix=p.get("pre_mix"),
                                         post_mix=p.get("post_mix"), **plain)
  elif m == "cosine":
    out = _dense.cosine_attention(q, k, v, logit_scale=p["logit_scale"], centered=o["centered"],
                                  **akw)
  elif m == "sinkhorn":
    out = _dense.sinkhorn_attention(q, k, v, num_iters=o["num_iters"], **plain)
  elif m == "additive":
    out = _dense.additive_attention(q, k, v, p["score_w"], activation=o["activation"], **plain)
  else:  # log_n_scaling
    mod = _sm.entropy_invariant_scale(o["train_len"], power=o["power"],
                                      num_keys=None if cfg.causal else T)
    out = _core._attention_fn()(q, k, v, score_mod=mod, **akw)  # pylint: disable=protected-access
  y = jnp.einsum("btnh,nhd->btd", out.astype(dtype), p["o_kernel"])
  return _core.constrain(y, ("batch", "length", "embed")), aux


def _check_call(cache):
  if cache is not None:
    raise ValueError("the head / score-function variants take no decoding cache (cache=None)")


class HeadsAttention(nnx.Module):
  """Head-level / score-function attention layer (see the module docstring).

  Args:
    d_model, num_heads, num_kv_heads, head_dim: as in `MultiHeadAttention`.
    mechanism: one of `MECHANISMS`.
    **options: the mechanism's options and `causal`, `rope`, `rope_base`,
      `implementation`, `dtype`, `param_dtype`.
    rngs: `nnx.Rngs`.

  Call: `layer(x [B, T, D], *, segment_ids=None, positions=None) -> [B, T, D]`; MoH sows
  its weighted load-balance loss as `nnx.Intermediate` 'aux_loss' under `nnx.capture`.
  """

  def __init__(self, d_model: int, num_heads: int, *, mechanism: str, num_kv_heads=None,
               head_dim=None, rngs: nnx.Rngs, **options):
    self.config = heads_config(mechanism, d_model, num_heads, num_kv_heads=num_kv_heads,
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
    _check_call(cache)
    y, aux = forward(self.config, self.params_dict(), x, segment_ids=segment_ids,
                     positions=positions)
    if self.config.mechanism == "moh" and hasattr(self, "__captures__"):
      self.sow(nnx.Intermediate, "aux_loss", aux["aux_loss"])
    return y


# The registry factories: make_factory(mechanism) (NNX), make_linen_factory(mechanism).
make_factory, make_linen_factory = _core.mechanism_factories(
    HeadsAttention, "attnjax.layers.heads_linen", "HeadsAttention")
