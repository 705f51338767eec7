"""Registry of attention layers by name: configs select mechanisms only through here.

    >>> from attnjax import variants
    >>> layer = variants.get("swin")(d_model=64, num_heads=4, num_kv_heads=None, head_dim=None,
    ...                              rngs=nnx.Rngs(0), window=4, shift=2)
    >>> y = layer(x_BHWD)                     # [B, Hh, Ww, 64]

Factory convention (every entry): `factory(*, d_model, num_heads, num_kv_heads, head_dim,
rngs, **options) -> nnx.Module`; the module is called as `layer(x, *, segment_ids=None,
positions=None, cache=None, deterministic=True)` with `x [B, T, D]` or `[B, Hh, Ww, D]`
and returns the same leading shape with D features (pooling layers: `[B, k, D]`).
Layers that support decoding also have `init_cache(batch, max_len)`; called with
`cache=` they return `(y, new_cache)`. A recurrent-state layer (linear attention) plugs
in by returning its state as the "cache".

Every built-in (the `attnjax.layers.presets` family, `'pma'`, the linear-attention
family of `attnjax.layers.linear` and the vision positional layers `'convit'`/`'botnet'`
of `attnjax.layers.positional`) is registered in one place, `_register_builtins`
below, on the first access to the registry; importing a layer module registers nothing.
Third-party code registers its own variants with `register` (see docs/layers.md):

    >>> @variants.register("my_linear", kind="sequence")
    ... def make(*, d_model, num_heads, num_kv_heads, head_dim, rngs, **options): ...

`kind` is 'sequence' (1D, may also accept grids), 'spatial' (needs `[B, Hh, Ww, D]`) or
'pooling' (`[B, n, D] -> [B, k, D]`); models use it to feed the right shapes. A name is
registered once: a second `register` of it raises ValueError unless `overwrite=True`.
"""

from __future__ import annotations

import dataclasses
import difflib
import threading
from collections.abc import Callable

__all__ = ["register", "unregister", "get", "get_linen", "names", "info", "build", "Entry",
           "KINDS"]

KINDS = ("sequence", "spatial", "pooling")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One registered variant: its NNX factory, kind and optional Linen factory."""

  name: str
  factory: Callable
  kind: str = "sequence"
  linen: Callable | None = None
  supports_cache: bool = False
  supports_causal: bool = True


_REGISTRY: dict[str, Entry] = {}
_BUILTINS_LOADED = False
_LOADING = False  # True while _register_builtins runs (in the thread holding _LOCK)
_LOCK = threading.RLock()


def _registry() -> dict[str, Entry]:
  """The registry, with the built-ins registered on first use.

  An error while registering the built-ins (e.g. a bug in a layer module) propagates
  unchanged and leaves the registry as it was, so the next access raises it again. Other
  threads wait on the lock until the built-ins are complete.
  """
  global _BUILTINS_LOADED, _LOADING
  if _BUILTINS_LOADED:
    return _REGISTRY
  with _LOCK:
    if _BUILTINS_LOADED or _LOADING:  # _LOADING: re-entered from _register_builtins
      return _REGISTRY
    before = dict(_REGISTRY)
    _LOADING = True
    try:
      _register_builtins()
    except BaseException:
      _REGISTRY.clear()
      _REGISTRY.update(before)
      raise
    else:
      _BUILTINS_LOADED = True
    finally:
      _LOADING = False
  return _REGISTRY


def _unknown(name) -> ValueError:
  registry = _registry()
  close = difflib.get_close_matches(str(name), list(registry), n=4, cutoff=0.5)
  return ValueError(f"unknown attention variant name={name!r}; close matches: "
                    f"{close if close else 'none'}; registered: {sorted(registry)}")


def register(name: str, factory: Callable | None = None, *, kind: str = "sequence",
             linen: Callable | None = None, supports_cache: bool = False,
             supports_causal: bool = True, overwrite: bool = False):
  """Registers `factory` under `name` (usable as a decorator when `factory` is omitted).

  Args:
    name: the config name, e.g. 'linear'.
    factory: `factory(*, d_model, num_heads, num_kv_heads, head_dim, rngs, **options)`.
    kind: one of `KINDS`.
    linen: optional Linen factory with the same signature minus `rngs`.
    supports_cache: whether the built layer has `init_cache` and a `cache=` call.
    supports_causal: whether the layer accepts `causal=True` (False for encoder-only
      mechanisms whose extra tokens or normalisation mix every position; the models'
      blocks then refuse `causal=True` with a ValueError naming the variant).
    overwrite: replace an existing entry instead of raising.
  Returns:
    `factory` (so the decorator form leaves the function usable), or the decorator.
  Raises:
    ValueError: `name` is already registered (built-in or not) and `overwrite` is False;
      an empty name; an unknown `kind`.
    TypeError: `factory` or `linen` is not callable.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"name must be a non-empty str, got name={name!r}")
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got kind={kind!r}")

  if linen is not None and not callable(linen):
    raise TypeError(f"linen must be callable or None, got {type(linen).__name__}")

  def deco(fn):
    if not callable(fn):
      raise TypeError(f"factory must be callable, got {type(fn).__name__}")
    with _LOCK:
      registry = _registry()
      if name in registry and not overwrite:
        raise ValueError(f"attention variant {name!r} is already registered; pass "
                         f"overwrite=True to replace it")
      registry[name] = Entry(name, fn, kind, linen, supports_cache, supports_causal)
    return fn

  return deco if factory is None else deco(factory)


def unregister(name: str) -> Entry:
  """Removes `name` from the registry and returns its entry (ValueError if unknown)."""
  with _LOCK:
    registry = _registry()
    if name not in registry:
      raise _unknown(name)
    return registry.pop(name)


def info(name: str) -> Entry:
  """The registry entry of `name` (ValueError with close matches if unknown)."""
  registry = _registry()
  if name not in registry:
    raise _unknown(name)
  return registry[name]


def get(name: str) -> Callable:
  """The NNX layer factory registered under `name`."""
  return info(name).factory


def get_linen(name: str) -> Callable:
  """The Linen layer factory registered under `name` (ValueError if it has none)."""
  entry = info(name)
  if entry.linen is None:
    raise ValueError(f"attention variant {name!r} has no Linen factory registered")
  return entry.linen


def names() -> list[str]:
  """Sorted names of every registered variant."""
  return sorted(_registry())


def build(name: str, *, d_model: int, num_heads: int, rngs, num_kv_heads=None, head_dim=None,
          **options):
  """`get(name)(d_model=, num_heads=, num_kv_heads=, head_dim=, rngs=, **options)`."""
  return get(name)(d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                   head_dim=head_dim, rngs=rngs, **options)


# ----------------------------------------------------------------------------- built-ins

def _register_builtins():
  """Registers every built-in variant; the only place that does (called by `_registry`)."""
  # Local imports: the layers import flax and jax, and `attnjax.variants` stays cheap to
  # import. An ImportError here is a bug and propagates.
  # pylint: disable=import-outside-toplevel
  from attnjax.layers import linear as linear_layers
  from attnjax.layers import linen as linen_layers
  from attnjax.layers import presets
  from attnjax.layers.attention import MultiHeadAttention
  from attnjax.layers.pooling import PoolingAttention

  def make(preset_name):
    def factory(*, d_model, num_heads, num_kv_heads=None, head_dim=None, rngs, **options):
      kw = presets.variant_kwargs(preset_name, **options)
      return MultiHeadAttention(d_model, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                rngs=rngs, **kw)

    def linen_factory(*, d_model, num_heads, num_kv_heads=None, head_dim=None, **options):
      kw = presets.variant_kwargs(preset_name, **options)
      return linen_layers.MultiHeadAttention(d_model=d_model, num_heads=num_heads,
                                             num_kv_heads=num_kv_heads, head_dim=head_dim, **kw)

    factory.__name__ = f"{preset_name}_factory"
    factory.__doc__ = (presets.PRESETS[preset_name].__doc__
                       or f"Built-in attention variant {preset_name!r}.")
    return factory, linen_factory

  for preset_name in presets.PRESETS:
    kind = "spatial" if preset_name in presets.SPATIAL else "sequence"
    nnx_f, linen_f = make(preset_name)
    register(preset_name, nnx_f, kind=kind, linen=linen_f, supports_cache=kind == "sequence",
             supports_causal=preset_name not in presets.NEVER_CAUSAL)

  def pma(*, d_model, num_heads, num_kv_heads=None, head_dim=None, rngs, **options):
    """Pooling by multi-head attention (Set Transformer); option num_seeds."""
    return PoolingAttention(d_model, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                            rngs=rngs, **options)

  def pma_linen(*, d_model, num_heads, num_kv_heads=None, head_dim=None, **options):
    fixed = {k: options.pop(k) for k in ("num_seeds", "param_dtype") if k in options}
    return linen_layers.PoolingAttention(d_model=d_model, num_heads=num_heads,
                                         num_kv_heads=num_kv_heads, head_dim=head_dim,
                                         options=tuple(sorted(options.items())), **fixed)

  register("pma", pma, kind="pooling", linen=pma_linen)

  # Mask-based spatial layers (attnjax.layers.spatial_masked, ops of
  # attnjax.ops.spatial.windowed): HaloNet 'halo', CSWin + LePE 'cswin', recurrent CCNet
  # 'ccnet', MaxViT 'maxvit_block' / 'maxvit_grid' (alternate them per layer). Inputs are
  # the token grid [B, Hh, Ww, D]; no cache. ('swin' and 'neighborhood' stay mask presets.)
  from attnjax.layers import spatial_masked
  for mechanism in spatial_masked.MECHANISMS:
    register(mechanism, spatial_masked.make_factory(mechanism), kind="spatial",
             linen=spatial_masked.make_linen_factory(mechanism))

  # The linear-attention family: one LinearAttention layer per mechanism.
  never_causal = linear_layers._NEVER_CAUSAL  # pylint: disable=protected-access
  for mechanism in linear_layers.MECHANISMS:
    register(mechanism, linear_layers.make_factory(mechanism), kind="sequence",
             linen=linear_layers.make_linen_factory(mechanism),
             supports_cache=mechanism not in never_causal,
             supports_causal=mechanism not in never_causal)

  # Vision positional mechanisms (issue 18, catalog family I; attnjax.layers.positional):
  # ConViT's gated positional self-attention and BoTNet's MHSA with 2D relative logits.
  from attnjax.layers import positional as positional_layers
  from attnjax.layers import positional_linen

  def spatial_factories(nnx_cls, linen_cls):
    def factory(*, d_model, num_heads, num_kv_heads=None, head_dim=None, rngs, **options):
      return nnx_cls(d_model, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, rngs=rngs,
                     **options)

    def linen_factory(*, d_model, num_heads, num_kv_heads=None, head_dim=None, **options):
      return linen_cls(d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                       head_dim=head_dim, **options)

    factory.__doc__ = nnx_cls.__doc__
    return factory, linen_factory

  for vis_name, nnx_cls, linen_cls in (
      ("convit", positional_layers.GPSA, positional_linen.GPSA),
      ("botnet", positional_layers.BoTNetAttention, positional_linen.BoTNetAttention)):
    nnx_f, linen_f = spatial_factories(nnx_cls, linen_cls)
    register(vis_name, nnx_f, kind="spatial", linen=linen_f)

  # Spatial reduction / channel-group / long-short distance attention (catalog family F,
  # attnjax.layers.reduced, ops in attnjax.ops.spatial.reduced): 'pvt' (SRA, sr_ratio),
  # 'twins' (LSA window + GSA; mode='dual'|'lsa'|'gsa'), 'hilo' (LITv2), 's2a' (S2AFormer
  # strips), 'davit' (window + channel groups; mode='dual'|'window'|'channel'),
  # 'crossformer' (SDA + LDA with the dynamic position bias; mode='dual'|'sda'|'lda').
  from attnjax.layers import reduced as reduced_layers
  for mechanism in reduced_layers.MECHANISMS:
    register(mechanism, reduced_layers.make_factory(mechanism), kind="spatial",
             linen=reduced_layers.make_linen_factory(mechanism))

  # Routing attention (catalog family C, attnjax.layers.routing, ops in
  # attnjax.ops.routing): 'moba' (sequence, causal LM), 'biformer' (spatial, with LCE),
  # 'dynamic_mask' (sequence), 'sparsifiner' (spatial; low-rank connectivity predictor).
  from attnjax.layers import routing as routing_layers
  for mechanism in routing_layers.MECHANISMS:
    register(mechanism, routing_layers.make_factory(mechanism),
             kind=routing_layers.KINDS[mechanism],
             linen=routing_layers.make_linen_factory(mechanism))

  # Token, latent-bottleneck and pooling attention (issue 19, catalog G, D04, A16/A17;
  # attnjax.layers.tokens, ops in attnjax.ops.pooling): sequence 'agent', 'perceiver',
  # 'lookupvit', 'registers', 'isab', 'proxy'; spatial 'super_token'; pooling 'slot',
  # 'simpool', 'mil_pool', 'class_attention' (usable as the Set Transformer's `pooling`).
  from attnjax.layers import tokens as token_layers
  for mechanism in token_layers.MECHANISMS:
    register(mechanism, token_layers.make_factory(mechanism), kind=token_layers.KIND[mechanism],
             linen=token_layers.make_linen_factory(mechanism), supports_causal=False)

  # Head-level mechanisms and score-function recipes (issue 19, catalog E01-E06, F06, A08,
  # A14, J; attnjax.layers.heads, ops in attnjax.ops.heads / attnjax.ops.dense): 'moh'
  # (sows its load-balance loss), 'head_gates', 'shvit', 'mw_mha', 'talking_heads',
  # 'cosine', 'sinkhorn', 'additive', 'collapsed_qk', 'log_n_scaling'. Inputs [B, T, D].
  from attnjax.layers import heads as heads_layers
  for mechanism in heads_layers.MECHANISMS:
    register(mechanism, heads_layers.make_factory(mechanism), kind="sequence",
             linen=heads_layers.make_linen_factory(mechanism),
             supports_causal=mechanism not in heads_layers.NEVER_CAUSAL)

  # Gated / delta-rule linear attention and Mamba-2 (issue 22, attnjax.layers.linear_gated,
  # ops in attnjax.ops.linear.{gated,delta,ssd}): 'gla', 'deltanet', 'gated_deltanet',
  # 'mamba2'; causal, decoding through the recurrent state (+ short-conv inputs).
  from attnjax.layers import linear_gated
  for mechanism in linear_gated.MECHANISMS:
    register(mechanism, linear_gated.make_factory(mechanism), kind="sequence",
             linen=linear_gated.make_linen_factory(mechanism), supports_cache=True)

  # Vision linear attention (issue 22, catalog D02/D09/D10/D11; attnjax.layers.linear_vision,
  # ops in attnjax.ops.linear.vision): spatial 'l2vit' (ReLU linear attention + LCM), 'care'
  # (decoupled linear attention / depthwise conv + dual interaction), 'feat' (spatial ->
  # temporal WKV -> channel attention; image or video); sequence 'hiif' (multi-head
  # Galerkin-type linear attention). Encoder-only, no cache.
  from attnjax.layers import linear_vision
  for mechanism in linear_vision.MECHANISMS:
    register(mechanism, linear_vision.make_factory(mechanism), kind=linear_vision.KINDS[mechanism],
             linen=linear_vision.make_linen_factory(mechanism), supports_causal=False)
