"""Config reading and pieces shared by the models."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from attnjax.layers import ParamSpec, make_param
from attnjax.models.blocks import BlockStack, TransformerBlock, attention_specs

_MISSING = object()


def get(cfg, name, default=_MISSING):
  """`cfg.name` for a ConfigDict / dataclass / mapping, with a default."""
  if isinstance(cfg, dict):
    value = cfg.get(name, default)
  else:
    value = getattr(cfg, name, default)
  if value is _MISSING:
    raise ValueError(f"model config is missing the field {name!r}")
  return value


def positive(cfg, name, default=_MISSING):
  value = get(cfg, name, default)
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"model config field {name} must be a positive int, got {name}={value!r}")
  return value


def choice(cfg, name, options, default=_MISSING):
  value = get(cfg, name, default)
  if value not in options:
    raise ValueError(f"model config field {name} must be one of {options}, got {name}={value!r}")
  return value


def dtype_of(cfg):
  name = get(cfg, "dtype", "float32")
  if name not in ("float32", "bfloat16", "float16"):
    raise ValueError("model config field dtype must be 'float32', 'bfloat16' or 'float16', got "
                     f"dtype={name!r}")
  return jnp.dtype(name)


def heads_of(cfg):
  d_model = positive(cfg, "d_model")
  num_heads = positive(cfg, "num_heads")
  num_kv_heads = get(cfg, "num_kv_heads", None) or num_heads
  head_dim = get(cfg, "head_dim", None)
  if head_dim is None:
    if d_model % num_heads:
      raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads} (or set "
                       "head_dim)")
    head_dim = d_model // num_heads
  return d_model, num_heads, num_kv_heads, head_dim


def rate(cfg, name="dropout_rate"):
  value = float(get(cfg, name, 0.0))
  if not 0.0 <= value < 1.0:
    raise ValueError(f"model config field {name} must be in [0, 1), got {value}")
  return value


def build_stack(cfg, *, num_layers, d_model, num_heads, num_kv_heads, head_dim, mlp_dim, defaults,
                attention=None, layers_attention=None, per_layer=None, mlp_activation="silu",
                gated_mlp=True, rngs):
  """A `BlockStack` from the config's attention spec(s).

  `defaults` are attention options the model injects (causal, rope) unless a spec sets
  them; `per_layer(i, spec) -> spec` can edit the spec of layer i (e.g. Swin shifts).
  """
  attention = get(cfg, "attention", None) if attention is None else attention
  if layers_attention is None:
    layers_attention = get(cfg, "layers_attention", None)
  specs = attention_specs(attention, layers_attention, num_layers)
  for i, spec in enumerate(specs):
    for k, v in defaults.items():
      spec.setdefault(k, v)
    if per_layer is not None:
      specs[i] = per_layer(i, spec)
  same = all(s == specs[0] for s in specs)
  dtype = dtype_of(cfg)
  drop = rate(cfg)
  remat = get(cfg, "remat_policy", "none") or "none"
  scan = bool(get(cfg, "scan_layers", False))

  def make_block(r, i):
    return TransformerBlock(d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                            head_dim=head_dim, mlp_dim=mlp_dim, attention=specs[i],
                            dropout_rate=drop, dtype=dtype, mlp_activation=mlp_activation,
                            gated_mlp=gated_mlp, rngs=r)

  return BlockStack(make_block, num_layers, scan_layers=scan, remat_policy=remat,
                    same_structure=same, rngs=rngs)


def learned_table(rngs, shape, names, init):
  return make_param(rngs, ParamSpec(tuple(shape), init, tuple(names)), jnp.float32)


def rope_option(cfg, default, allowed):
  """The attention `rope` option from `cfg.position_embedding` ('rope' -> `default`)."""
  pe = get(cfg, "position_embedding", "rope")
  if pe not in allowed:
    raise ValueError(f"model config field position_embedding must be one of {allowed}, got {pe!r}")
  return pe, (default if pe == "rope" else None)


__all__ = ["get", "positive", "choice", "dtype_of", "heads_of", "rate", "build_stack",
           "learned_table", "rope_option", "nnx"]
