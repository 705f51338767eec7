"""Pre-norm transformer block and layer stacks (plain, scanned, rematerialised).

Block: `x = x + drop(attn(rms(x)))`, `x = x + drop(mlp(rms(x)))` ("On Layer Normalization
in the Transformer Architecture" for pre-norm; RMSNorm; gated MLP). The attention layer is
built by name through `attnjax.variants`, so every layer of a stack may use a different
mechanism.

`BlockStack(scan_layers=True)` stores the layers' parameters stacked on a leading axis
(built with `nnx.vmap`) and applies them with `jax.lax.scan`; `remat_policy` wraps each
block in `jax.checkpoint` with a named policy. Both are numerically identical to
the plain Python loop over the same parameters (tested).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax import variants
from attnjax.layers import MLP, RMSNorm, constrain

__all__ = ["REMAT_POLICIES", "attention_specs", "TransformerBlock", "BlockStack"]

REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything": jax.checkpoint_policies.everything_saveable,
}


def _to_dict(spec) -> dict:
  if spec is None:
    return {}
  if hasattr(spec, "to_dict"):
    spec = spec.to_dict()
  if not isinstance(spec, Mapping):
    raise TypeError("an attention spec must be a mapping with 'name' and options, got "
                    f"{type(spec).__name__}")
  out = {}
  for k, v in spec.items():
    out[k] = tuple(v) if isinstance(v, list) else v
  return out


def attention_specs(attention, layers_attention, num_layers: int) -> list[dict]:
  """Per-layer attention specs `{'name': ..., **options}`: `layers_attention` (a list of
  `num_layers` specs, each merged over `attention`) or `attention` for every layer."""
  base = _to_dict(attention)
  if "name" not in base:
    base["name"] = "mha"
  if layers_attention is None:
    return [dict(base) for _ in range(num_layers)]
  layers_attention = list(layers_attention)
  if len(layers_attention) != num_layers:
    raise ValueError(f"layers_attention must have num_layers={num_layers} entries, got "
                     f"{len(layers_attention)}")
  out = []
  for spec in layers_attention:
    same_name = "name" not in _to_dict(spec) or _to_dict(spec)["name"] == base["name"]
    merged = dict(base) if same_name else {}
    merged.update(_to_dict(spec))
    merged.setdefault("name", base["name"])
    out.append(merged)
  return out


def _call_kwargs(segment_ids, positions, cache):
  kw = {}
  if segment_ids is not None:
    kw["segment_ids"] = segment_ids
  if positions is not None:
    kw["positions"] = positions
  if cache is not None:
    kw["cache"] = cache
  return kw


class TransformerBlock(nnx.Module):
  """Pre-norm block: attention (by registry name) + MLP, residual dropout.

  `x [B, T, D]` or `[B, Hh, Ww, D]` -> same shape; with `cache=` returns `(x, cache)`.
  """

  def __init__(self, *, d_model: int, num_heads: int, num_kv_heads: int | None,
               head_dim: int | None, mlp_dim: int, attention: Mapping,
               dropout_rate: float = 0.0, dtype=None, mlp_activation: str = "silu",
               gated_mlp: bool = True, rngs: nnx.Rngs):
    spec = dict(attention)
    name = spec.pop("name")
    entry = variants.info(name)
    if entry.kind == "pooling":
      raise ValueError(f"attention variant {name!r} is a pooling layer; it cannot be a block's "
                       "attention")
    if dtype is not None:
      spec.setdefault("dtype", dtype)
    self.attention_name = name
    self.attn_norm = RMSNorm(d_model, rngs=rngs)
    self.attn = entry.factory(d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                              head_dim=head_dim, rngs=rngs, **spec)
    self.mlp_norm = RMSNorm(d_model, rngs=rngs)
    self.mlp = MLP(d_model, mlp_dim, activation=mlp_activation, gated=gated_mlp, dtype=dtype,
                   rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

  def init_cache(self, batch: int, max_len: int, dtype=None):
    if not hasattr(self.attn, "init_cache"):
      raise ValueError(f"attention variant {self.attention_name!r} does not support decoding (no "
                       "init_cache)")
    try:
      accepts_dtype = "dtype" in inspect.signature(self.attn.init_cache).parameters
    except (TypeError, ValueError):
      accepts_dtype = False
    if accepts_dtype:
      return self.attn.init_cache(batch, max_len, dtype=dtype)
    return self.attn.init_cache(batch, max_len)  # the registry convention: (batch, max_len)

  def __call__(self, x, *, segment_ids=None, positions=None, cache=None,
               deterministic: bool = True):
    h = self.attn(self.attn_norm(x), deterministic=deterministic,
                  **_call_kwargs(segment_ids, positions, cache))
    if cache is not None:
      h, cache = h
    x = x + self.dropout(h, deterministic=deterministic)
    x = x + self.dropout(self.mlp(self.mlp_norm(x), deterministic=deterministic),
                         deterministic=deterministic)
    names = (("batch", "length", "embed") if x.ndim == 3
             else ("batch",) + (None,) * (x.ndim - 2) + ("embed",))
    x = constrain(x, names)
    return x if cache is None else (x, cache)


class BlockStack(nnx.Module):
  """`num_layers` blocks applied in order; optional scan-over-layers and remat.

  Args:
    make_block: `make_block(rngs, layer_index) -> TransformerBlock`.
    num_layers: L.
    scan_layers: stack parameters on a leading L axis and apply with `jax.lax.scan` (all
      layers must have the same structure: `same_structure=True`).
    remat_policy: a key of `REMAT_POLICIES` ('none', 'full', 'dots', ...).
    same_structure: whether every layer is built identically (required for scanning).
  """

  def __init__(self, make_block: Callable, num_layers: int, *, scan_layers: bool = False,
               remat_policy: str = "none", same_structure: bool = True, rngs: nnx.Rngs):
    if not isinstance(num_layers, int) or num_layers <= 0:
      raise ValueError(f"num_layers must be a positive int, got num_layers={num_layers!r}")
    if remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got "
                       f"remat_policy={remat_policy!r}")
    if scan_layers and not same_structure:
      raise ValueError("scan_layers=True needs every layer to use the same attention spec, but the "
                       "layers differ (layers_attention interleaves variants, or hvit alternates "
                       "Swin shifts); set scan_layers=False")
    self.num_layers = num_layers
    self.scan_layers = bool(scan_layers)
    self.remat_policy = remat_policy
    if self.scan_layers:
      @nnx.split_rngs(splits=num_layers)
      # the stacked layer axis gets logical name None (replicated) in the sharding metadata
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
      def create(r):
        return make_block(r, 0)
      self.layers = create(rngs)
    else:
      self.layers = nnx.List([make_block(rngs, i) for i in range(num_layers)])

  def init_cache(self, batch: int, max_len: int, dtype=None):
    """Per-layer caches: a list (plain) or one pytree stacked on a leading L axis (scan)."""
    if self.scan_layers:
      graphdef, state = nnx.split(self.layers)
      first = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
      c0 = first.init_cache(batch, max_len, dtype)
      return jax.tree.map(lambda a: jnp.broadcast_to(a, (self.num_layers,) + a.shape), c0)
    return [layer.init_cache(batch, max_len, dtype) for layer in self.layers]

  def _pure_block(self, graphdef, deterministic, segment_ids, positions, decoding):
    """`f(layer_state, x, cache) -> (x, cache, new_layer_state)`, rematerialised if asked.

    Blocks run as pure functions of their state (plain `jax.checkpoint` / `jax.lax.scan`,
    no nnx transforms), so the stack works under any outer JAX transformation; the new
    state carries advanced dropout RNG counters.
    """
    def f(layer_state, x, cache):
      layer = nnx.merge(graphdef, layer_state)
      out = layer(x, segment_ids=segment_ids, positions=positions, cache=cache,
                  deterministic=deterministic)
      x, cache = out if cache is not None else (out, None)
      return x, cache, nnx.state(layer)
    # remat only matters for training; decoding (cache given) runs the plain blocks.
    if self.remat_policy != "none" and not decoding:
      f = jax.checkpoint(f, policy=REMAT_POLICIES[self.remat_policy])
    return f

  def __call__(self, x, *, segment_ids=None, positions=None, cache=None,
               deterministic: bool = True):
    decoding = cache is not None
    if not self.scan_layers:
      if decoding and len(cache) != self.num_layers:
        raise ValueError(f"cache must hold num_layers={self.num_layers} layer caches, got "
                         f"{len(cache)}")
      caches = cache if decoding else [None] * self.num_layers
      new = []
      for layer, c in zip(self.layers, caches):
        if self.remat_policy == "none" or decoding:
          out = layer(x, segment_ids=segment_ids, positions=positions, cache=c,
                      deterministic=deterministic)
          x, c = out if decoding else (out, None)
        else:
          graphdef, state = nnx.split(layer)
          f = self._pure_block(graphdef, deterministic, segment_ids, positions, decoding)
          x, c, new_state = f(state, x, c)
          if not deterministic:
            nnx.update(layer, new_state)
        new.append(c)
      return (x, new) if decoding else x

    graphdef, state = nnx.split(self.layers)
    f = self._pure_block(graphdef, deterministic, segment_ids, positions, decoding)

    def body(carry, xs):
      layer_state, c = xs
      y, c, new_state = f(layer_state, carry, c)
      return y, (c, new_state)

    x, (new_cache, new_state) = jax.lax.scan(body, x, (state, cache))
    if not deterministic:
      nnx.update(self.layers, new_state)
    return (x, new_cache) if decoding else x
