"""Framework-free math of the attention layers.

The NNX modules (`attnjax.layers`) and their Linen twins (`attnjax.layers.linen`) hold
parameters in their own way but call the same functions here, with the same parameter
names and shapes, so they are numerically identical given identical parameters.

Pieces:
- `MaskSpec`: a mask described by name and arguments, built once the token grid is known
  (spatial masks need the `[Hh, Ww]` grid of the input).
- `AttentionConfig`: validated, hashable configuration of one attention layer.
- `param_specs(cfg)`: the parameters (name -> shape, initializer, logical axis names).
- `attention_forward(cfg, params, x, ...)`: projections, qk-norm, RoPE, masks, score mods,
  KV cache, `attnjax.attention`, output projection.
- `KVCache` / `init_kv_cache`: static-length decoding cache, one length per sequence.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks as _masks
from attnjax import score_mods as _score_mods
from attnjax.ops import positional as _pos
from attnjax.parallel import context as _context
from attnjax.parallel.rules import constrain

# `constrain` (public as `attnjax.layers.constrain` / `attnjax.parallel.constrain`): the
# logical sharding constraint on an activation; the trainer's rules inside
# `attnjax.parallel.activation_sharding`, Flax's logical-axis rules on the user's own mesh,
# a no-op otherwise.


def _attention_fn():
  """`attnjax.attention`, imported lazily (the package root lazily imports the layers)."""
  from attnjax.dispatch import attention  # pylint: disable=import-outside-toplevel
  return attention


def _paged_attention_fn():
  """`attention(q, k_pages, v_pages, *, page_table, ...)` on a paged cache's pools
  (`attnjax.dispatch.paged_attention`)."""
  from attnjax.dispatch import paged_attention  # pylint: disable=import-outside-toplevel
  return lambda q, k, v, *, page_table, **kw: paged_attention(q, k, v, page_table, **kw)


# ----------------------------------------------------------------------------- masks

_MASK_KINDS = {
    # kind: (required args, optional args with defaults)
    "causal": ((), {"offset": 0}),
    "sliding_window": (("left",), {"right": 0}),
    "chunked": (("size",), {}),
    "prefix_lm": (("prefix_len",), {}),
    "dual_triangle": ((), {}),
    "neighborhood": (("kernel",), {"dilation": 1, "causal": False}),
    "window": (("window",), {"shift": 0}),
    "grid": (("grid",), {}),
    "axial": ((), {"axis": None}),
    "criss_cross": ((), {}),
}


def _freeze(value):
  if isinstance(value, list):
    return tuple(_freeze(v) for v in value)
  if isinstance(value, tuple):
    return tuple(_freeze(v) for v in value)
  return value


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """A mask by name, built for the input's token grid at call time.

  `MaskSpec('neighborhood', kernel=7)` builds `attnjax.masks.neighborhood(grid, 7)` for
  whatever grid (`[T]` or `[Hh, Ww]`) the layer sees. Kinds and arguments:
  causal(offset=0), sliding_window(left, right=0), chunked(size), prefix_lm(prefix_len),
  dual_triangle(), neighborhood(kernel, dilation=1, causal=False), window(window, shift=0),
  grid(grid), axial(axis=None: first half of the heads along axis 0, second half along
  axis 1), criss_cross().
  """

  kind: str
  args: tuple = ()

  def __init__(self, kind: str, **kwargs):
    if kind not in _MASK_KINDS:
      import difflib  # pylint: disable=import-outside-toplevel
      close = difflib.get_close_matches(str(kind), list(_MASK_KINDS), n=3)
      raise ValueError(f"unknown mask kind={kind!r}; expected one of {sorted(_MASK_KINDS)}"
                       + (f" (close: {close})" if close else ""))
    required, optional = _MASK_KINDS[kind]
    missing = [r for r in required if r not in kwargs]
    unknown = [k for k in kwargs if k not in required and k not in optional]
    if missing:
      raise TypeError(f"MaskSpec({kind!r}) needs argument(s) {missing}")
    if unknown:
      raise TypeError(f"MaskSpec({kind!r}) got unknown argument(s) {unknown}; "
                      f"expected {list(required) + list(optional)}")
    full = dict(optional)
    full.update(kwargs)
    object.__setattr__(self, "kind", kind)
    object.__setattr__(self, "args", tuple(sorted((k, _freeze(v)) for k, v in full.items())))

  @property
  def kwargs(self) -> dict:
    return dict(self.args)

  @property
  def spatial(self) -> bool:
    """True for masks defined on a token grid (they cannot be used with a KV cache)."""
    return self.kind in ("neighborhood", "window", "grid", "axial", "criss_cross")

  def build(self, grid_shape: Sequence[int], num_heads: int) -> _masks.Mask:
    kw = self.kwargs
    grid_shape = tuple(int(g) for g in grid_shape)
    if self.kind == "causal":
      return _masks.causal(kw["offset"])
    if self.kind == "sliding_window":
      return _masks.sliding_window(kw["left"], kw["right"])
    if self.kind == "chunked":
      return _masks.chunked(kw["size"])
    if self.kind == "prefix_lm":
      return _masks.prefix_lm(kw["prefix_len"])
    if self.kind == "dual_triangle":
      return _masks.dual_triangle()
    if self.kind == "neighborhood":
      return _masks.neighborhood(grid_shape, kw["kernel"], kw["dilation"], kw["causal"])
    if self.kind == "window":
      return _masks.window(grid_shape, kw["window"], kw["shift"])
    if self.kind == "grid":
      return _masks.grid(grid_shape, kw["grid"])
    if self.kind == "axial":
      axis = kw["axis"]
      if axis is not None:
        return _masks.axial(grid_shape, axis)
      if len(grid_shape) != 2:
        raise ValueError(f"axial attention with axis=None splits heads between rows and "
                         f"columns and needs a 2D grid, got grid shape {grid_shape}")
      if num_heads % 2:
        raise ValueError(f"axial attention with axis=None needs an even num_heads, got {num_heads}")
      half = num_heads // 2
      first = _masks.from_fn(lambda b, h, q, kv: h < half, name=f"heads<{half}")
      return (first & _masks.axial(grid_shape, 0)) | (~first & _masks.axial(grid_shape, 1))
    if self.kind == "criss_cross":
      return _masks.criss_cross(grid_shape)
    raise AssertionError(self.kind)

  def __repr__(self):
    inner = ", ".join(f"{k}={v!r}" for k, v in self.args)
    return f"MaskSpec({self.kind!r}{', ' if inner else ''}{inner})"


def build_mask(mask, grid_shape, num_heads):
  """Resolves a layer's `mask` option (Mask, MaskSpec, callable or None) for a grid."""
  if mask is None or isinstance(mask, _masks.Mask):
    return mask
  if isinstance(mask, MaskSpec):
    return mask.build(grid_shape, num_heads)
  if callable(mask):
    out = mask(tuple(grid_shape), num_heads)
    if not isinstance(out, _masks.Mask):
      raise TypeError(f"a mask builder must return an attnjax.masks.Mask, got {type(out).__name__}")
    return out
  raise TypeError(f"mask must be None, an attnjax.masks.Mask, a MaskSpec or a callable "
                  f"(grid_shape, num_heads) -> Mask; got {type(mask).__name__}")


# ----------------------------------------------------------------------------- config

_ROPE_KINDS = (None, "1d", "axial", "mixed")
_NORM_EPS = 1e-6


def _positive_int(name, value, *, allow_none=False):
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{name} must be a positive int, got {name}={value!r}")


def _canonical_dtype(name, value):
  if value is None:
    return None
  try:
    return jnp.dtype(value)
  except TypeError as e:
    raise ValueError(f"{name} must be a dtype name such as 'float32' or 'bfloat16', got "
                     f"{value!r}") from e


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Validated configuration of a multi-head attention layer (see `MultiHeadAttention`)."""

  d_model: int
  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  v_head_dim: int | None = None
  kv_features: int | None = None
  out_features: int | None = None
  use_bias: bool = False
  causal: bool = False
  mask: Any = None
  score_mod: Any = None
  scale: float | None = None
  softcap: float | None = None
  sinks: bool = False
  qk_norm: bool = False
  rope: str | None = None
  rope_base: float = 10000.0
  rope_ndim: int = 2
  alibi: bool = False
  relpos_max_distance: Any = None
  implementation: Any = None
  block_sizes: Any = None
  dropout_rate: float = 0.0
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    _positive_int("d_model", self.d_model)
    _positive_int("num_heads", self.num_heads)
    set_ = lambda k, v: object.__setattr__(self, k, v)
    if self.num_kv_heads is None:
      set_("num_kv_heads", self.num_heads)
    _positive_int("num_kv_heads", self.num_kv_heads)
    if self.num_heads % self.num_kv_heads:
      raise ValueError("num_heads must be a multiple of num_kv_heads, got "
                       f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}")
    if self.head_dim is None:
      if self.d_model % self.num_heads:
        raise ValueError(f"d_model must be divisible by num_heads when head_dim is not given, got "
                         f"d_model={self.d_model}, num_heads={self.num_heads}")
      set_("head_dim", self.d_model // self.num_heads)
    _positive_int("head_dim", self.head_dim)
    if self.v_head_dim is None:
      set_("v_head_dim", self.head_dim)
    _positive_int("v_head_dim", self.v_head_dim)
    if self.kv_features is None:
      set_("kv_features", self.d_model)
    _positive_int("kv_features", self.kv_features)
    if self.out_features is None:
      set_("out_features", self.d_model)
    _positive_int("out_features", self.out_features)
    if self.rope not in _ROPE_KINDS:
      raise ValueError(f"rope must be one of {_ROPE_KINDS}, got rope={self.rope!r}")
    if self.rope is not None and self.head_dim % 2:
      raise ValueError(f"rope needs an even head_dim, got head_dim={self.head_dim}")
    _positive_int("rope_ndim", self.rope_ndim)
    if self.rope == "mixed" and self.head_dim % 2:
      raise ValueError(f"rope='mixed' needs an even head_dim, got {self.head_dim}")
    if self.rope_base <= 1:
      raise ValueError(f"rope_base must be > 1, got rope_base={self.rope_base}")
    if self.softcap is not None and not self.softcap > 0:
      raise ValueError(f"softcap must be a positive number or None, got softcap={self.softcap!r}")
    if self.scale is not None and not self.scale > 0:
      raise ValueError(f"scale must be a positive number or None, got scale={self.scale!r}")
    if not 0.0 <= float(self.dropout_rate) < 1.0:
      raise ValueError(f"dropout_rate must be in [0, 1), got dropout_rate={self.dropout_rate!r}")
    if self.relpos_max_distance is not None:
      md = _freeze(self.relpos_max_distance)
      vals = md if isinstance(md, tuple) else (md,)
      if not vals or any(isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 0
                         for m in vals):
        raise ValueError("relpos_max_distance must be an int >= 0 or a tuple of them (one per "
                         f"grid axis), got relpos_max_distance={self.relpos_max_distance!r}")
      set_("relpos_max_distance", md)
    if self.mask is not None and not (isinstance(self.mask, (_masks.Mask, MaskSpec))
                                      or callable(self.mask)):
      raise TypeError(f"mask must be None, an attnjax.masks.Mask, a MaskSpec or a callable, got "
                      f"{type(self.mask).__name__}")
    if self.score_mod is not None and not callable(self.score_mod):
      raise TypeError(f"score_mod must be callable, got {type(self.score_mod).__name__}")
    impl = self.implementation
    if isinstance(impl, list):
      set_("implementation", tuple(impl))
    elif impl is not None and not isinstance(impl, (str, tuple)):
      raise TypeError(f"implementation must be None, a name or a sequence of names, got {impl!r}")
    if isinstance(self.block_sizes, dict):
      raise TypeError("block_sizes must be a BlockSizes object (hashable), not a dict")
    set_("dtype", _canonical_dtype("dtype", self.dtype))
    set_("param_dtype", _canonical_dtype("param_dtype", self.param_dtype))

  @property
  def relpos_ndim(self) -> int:
    md = self.relpos_max_distance
    return 0 if md is None else (len(md) if isinstance(md, tuple) else 1)

  @property
  def spatial_mask(self) -> bool:
    return isinstance(self.mask, MaskSpec) and self.mask.spatial


# ----------------------------------------------------------------------------- params

@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """One parameter: `shape`, `init(key, shape, dtype)` and one logical axis name per
  dimension (`names`, e.g. `('embed', 'heads', 'head_dim')`); `attnjax.layers.make_param`
  turns it into an `nnx.Param` carrying the names."""

  shape: tuple
  init: Callable
  names: tuple


def _dense_init(in_axis, out_axis):
  return jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                              in_axis=in_axis, out_axis=out_axis)


def _zeros(key, shape, dtype=jnp.float32):
  del key
  return jnp.zeros(shape, dtype)


def _ones(key, shape, dtype=jnp.float32):
  del key
  return jnp.ones(shape, dtype)


def param_specs(cfg: AttentionConfig) -> dict[str, ParamSpec]:
  """Parameters of an attention layer: name -> (shape, initializer, logical axis names).

  q_kernel [D, N, H], k_kernel [Dkv, K, H], v_kernel [Dkv, K, Hv], o_kernel [N, Hv, Dout],
  biases when use_bias, q_norm/k_norm scales [H] for qk_norm, sinks [N], relpos_table
  [N, prod(2R+1)], rope_freqs [N, H/2, D] for rope='mixed'.
  """
  N, K, H, Hv = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.v_head_dim
  specs = {
      "q_kernel": ParamSpec((cfg.d_model, N, H), _dense_init(0, (1, 2)),
                            ("embed", "heads", "head_dim")),
      "k_kernel": ParamSpec((cfg.kv_features, K, H), _dense_init(0, (1, 2)),
                            ("embed", "kv_heads", "head_dim")),
      "v_kernel": ParamSpec((cfg.kv_features, K, Hv), _dense_init(0, (1, 2)),
                            ("embed", "kv_heads", "head_dim")),
      "o_kernel": ParamSpec((N, Hv, cfg.out_features), _dense_init((0, 1), 2),
                            ("heads", "head_dim", "embed")),
  }
  if cfg.use_bias:
    specs["q_bias"] = ParamSpec((N, H), _zeros, ("heads", "head_dim"))
    specs["k_bias"] = ParamSpec((K, H), _zeros, ("kv_heads", "head_dim"))
    specs["v_bias"] = ParamSpec((K, Hv), _zeros, ("kv_heads", "head_dim"))
    specs["o_bias"] = ParamSpec((cfg.out_features,), _zeros, ("embed",))
  if cfg.qk_norm:
    specs["q_norm"] = ParamSpec((H,), _ones, ("head_dim",))
    specs["k_norm"] = ParamSpec((H,), _ones, ("head_dim",))
  if cfg.sinks:
    specs["sinks"] = ParamSpec((N,), _zeros, ("heads",))
  if cfg.relpos_max_distance is not None:
    size = _pos.num_relative_positions(cfg.relpos_max_distance, cfg.relpos_ndim)
    init = jax.nn.initializers.truncated_normal(0.02)
    specs["relpos_table"] = ParamSpec((N, size), init, ("heads", None))
  if cfg.rope == "mixed":
    def mixed_init(key, shape, dtype=jnp.float32):
      return _pos.init_rope_mixed_frequencies(key, shape[0], 2 * shape[1], shape[2]).astype(dtype)
    specs["rope_freqs"] = ParamSpec((N, H // 2, cfg.rope_ndim), mixed_init, ("heads", None, None))
  return specs


# ----------------------------------------------------------------------------- cache

@flax.struct.dataclass
class KVCache:
  """Static-length key/value cache of one attention layer, one length per sequence.

  k [B, S, K, H], v [B, S, K, Hv] (after RoPE / qk-norm), segment_ids [B, S] int32
  (-1 = slot not written yet), lengths [B] int32: the tokens written to row `b`, at slots
  `0 .. lengths[b] - 1` (left-aligned; rows may differ: ragged prompts). `uniform` (static)
  says every row has the same length (true until a call with padding tokens); uniform
  caches shift masks by one scalar offset, ragged ones evaluate them per row.

  Paged layout (`init_kv_cache(..., page_size=)`, as in "Efficient Memory Management for
  Large Language Model Serving with PagedAttention", Kwon et al. 2023): k / v are a pool
  of pages `[num_pages, K, page_size, H]` (each page head-major: one `[page_size, H]` tile
  per kv head, the Pallas kernels' block), segment_ids `[num_pages, page_size]`, and
  `page_table [B, pages_per_seq]` int32 maps row `b`'s slot `s` to page
  `page_table[b, s // page_size]`, offset `s % page_size`. Attention runs through
  `attnjax.dispatch.paged_attention`: a Pallas kernel reads the pages through the table
  (`implementation='pallas_tpu'` / `'pallas_gpu'` or the TPU / GPU default, a page being
  one of its key blocks); other implementations get each row's pages gathered into a contiguous
  `[B, pages_per_seq * page_size, K, H]` view in XLA.
  """

  k: jax.Array
  v: jax.Array
  segment_ids: jax.Array
  lengths: jax.Array
  page_table: Any = None
  uniform: bool = flax.struct.field(pytree_node=False, default=True)

  @property
  def paged(self) -> bool:
    return self.page_table is not None

  @property
  def max_len(self) -> int:
    if self.paged:
      return self.page_table.shape[-1] * self.k.shape[-2]
    return self.k.shape[-3]

  @property
  def index(self) -> jax.Array:
    """The longest row's length (int32 scalar): the common position of a uniform cache."""
    return jnp.max(self.lengths)


def init_kv_cache(cfg: AttentionConfig, batch: int, max_len: int, dtype=None, *,
                  page_size: int | None = None, num_pages: int | None = None,
                  page_table=None) -> KVCache:
  """An empty cache for `batch` sequences of at most `max_len` tokens.

  With `page_size`, a paged cache: a pool of `num_pages` pages (default
  `batch * ceil(max_len / page_size)`) and `page_table [batch, ceil(max_len / page_size)]`
  int (default: row `b` owns pages `b * pages_per_seq ..`); rows must not share pages.
  """
  _positive_int("batch", batch)
  _positive_int("max_len", max_len)
  dtype = jnp.dtype(dtype or cfg.dtype or jnp.float32)
  if page_size is not None or num_pages is not None or page_table is not None:
    _positive_int("page_size", page_size)
    pps = -(-max_len // page_size)
    num_pages = batch * pps if num_pages is None else num_pages
    _positive_int("num_pages", num_pages)
    if page_table is None:
      if num_pages < batch * pps:
        raise ValueError(f"num_pages={num_pages} is fewer than batch * pages_per_seq = "
                         f"{batch * pps}; pass page_table= to share the pool differently")
      page_table = jnp.arange(batch * pps, dtype=jnp.int32).reshape(batch, pps)
    page_table = jnp.asarray(page_table)
    if page_table.shape != (batch, pps) or not jnp.issubdtype(page_table.dtype, jnp.integer):
      raise ValueError(f"page_table must be int [batch={batch}, pages_per_seq={pps}], got shape "
                       f"{page_table.shape}, dtype {page_table.dtype}")
    return KVCache(
        k=jnp.zeros((num_pages, cfg.num_kv_heads, page_size, cfg.head_dim), dtype),
        v=jnp.zeros((num_pages, cfg.num_kv_heads, page_size, cfg.v_head_dim), dtype),
        segment_ids=jnp.full((num_pages, page_size), -1, jnp.int32),
        lengths=jnp.zeros((batch,), jnp.int32), page_table=page_table.astype(jnp.int32))
  return KVCache(
      k=jnp.zeros((batch, max_len, cfg.num_kv_heads, cfg.head_dim), dtype),
      v=jnp.zeros((batch, max_len, cfg.num_kv_heads, cfg.v_head_dim), dtype),
      segment_ids=jnp.full((batch, max_len), -1, jnp.int32),
      lengths=jnp.zeros((batch,), jnp.int32),
  )


def paged_like(cache: KVCache, page_size: int) -> KVCache:
  """An empty paged cache with the shape, dtype and capacity of the empty contiguous
  `cache` (leading axes, e.g. stacked layers, kept): `ceil(max_len / page_size)` pages
  per row, row `b` owning pages `b * pages_per_seq ..` of its pool."""
  _positive_int("page_size", page_size)
  if cache.paged:
    raise ValueError("cache is already paged")
  lead = cache.k.shape[:-4]
  B, S = cache.k.shape[-4:-2]
  pps = -(-S // page_size)
  pool = lambda a: jnp.zeros(lead + (B * pps, a.shape[-2], page_size, a.shape[-1]), a.dtype)
  table = jnp.arange(B * pps, dtype=jnp.int32).reshape(B, pps)
  return KVCache(k=pool(cache.k), v=pool(cache.v),
                 segment_ids=jnp.full(lead + (B * pps, page_size), -1, jnp.int32),
                 lengths=jnp.zeros(lead + (B,), jnp.int32),
                 page_table=jnp.broadcast_to(table, lead + (B, pps)))


def _new_token_counts(segment_ids_BT, B, T):
  """Real (non-padding) tokens per row of a cached call: segment id < 0 marks padding,
  which must trail the row's real tokens (right padding)."""
  if segment_ids_BT is None:
    return jnp.full((B,), T, jnp.int32)
  return jnp.sum(segment_ids_BT >= 0, axis=1).astype(jnp.int32)


def _cache_slots(cache: KVCache, B: int, T: int):
  """Where row b's new tokens `t` go: slot `lengths[b] + t` of the row, as `(row, slot)`
  indices of a contiguous cache or `(page, offset)` of a paged one (slots past the end
  are out of range, so writes there are dropped)."""
  pos = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
  if not cache.paged:
    return jnp.arange(B, dtype=jnp.int32)[:, None], pos
  ps, pps = cache.k.shape[2], cache.page_table.shape[1]
  page = jnp.take_along_axis(cache.page_table, jnp.clip(pos // ps, 0, pps - 1), axis=1)
  return jnp.where(pos < pps * ps, page, cache.k.shape[0]), pos % ps


def _write_rows(cache: KVCache, buf, new, slots):
  """`buf[slots] = new` (`slots` from `_cache_slots`; out-of-range ones dropped); a paged
  K/V pool `[pages, K, page_size, D]` is written at `[page, :, offset]`."""
  if cache.paged and buf.ndim == 4:
    return buf.at[slots[0], :, slots[1]].set(new.astype(buf.dtype), mode="drop")
  return buf.at[slots].set(new.astype(buf.dtype), mode="drop")


def _row_view(cache: KVCache, buf):
  """A cache buffer as `[B, max_len, ...]`: itself, or each row's pages gathered in order."""
  if not cache.paged:
    return buf
  if buf.ndim == 4:
    from attnjax.kernels import flash_wrapper  # pylint: disable=import-outside-toplevel
    return flash_wrapper.gather_pages(buf, cache.page_table)
  pages = buf[cache.page_table]                    # [B, pages_per_seq, page_size]
  return pages.reshape((pages.shape[0], -1) + buf.shape[2:])


def _row_shifted_mask(mask, offsets_B, T, S, num_heads, batch):
  """`mask` evaluated at `(q + offsets_B[b], kv)` per row, as an array mask
  `[B, 1 | N, T, S]` (decoding a ragged batch: each row's queries sit at its own length)."""
  Nm = num_heads if mask.head_dependent else 1
  b = jnp.arange(batch, dtype=jnp.int32)[:, None, None, None]
  h = jnp.arange(Nm, dtype=jnp.int32)[None, :, None, None]
  q = offsets_B[:, None, None, None] + jnp.arange(T, dtype=jnp.int32)[None, None, :, None]
  kv = jnp.arange(S, dtype=jnp.int32)[None, None, None, :]
  arr = mask(b, h, q, kv, num_heads=num_heads, batch=batch)
  return _masks.from_array(jnp.broadcast_to(jnp.asarray(arr, bool), (batch, Nm, T, S)))


def _row_shift_score_mod(mod, offsets_B):
  def shifted(score, b, h, q_idx, kv_idx):
    return mod(score, b, h, q_idx + offsets_B[b], kv_idx)
  return shifted


# ----------------------------------------------------------------------------- forward

def _rms_norm(x, scale, eps=_NORM_EPS):
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


def _flatten_tokens(name, x, features, feature_name):
  if not hasattr(x, "ndim") or x.ndim < 3:
    raise ValueError(f"{name} must be [B, T, D] or [B, *grid, D] (rank >= 3), got shape "
                     f"{getattr(x, 'shape', None)}")
  if x.shape[-1] != features:
    raise ValueError(f"{name} last dimension must be {feature_name}={features}, got shape "
                     f"{x.shape}")
  grid = tuple(x.shape[1:-1])
  return x.reshape(x.shape[0], math.prod(grid), features), grid


def _check_ids(name, ids, batch, length):
  if ids is None:
    return None
  if ids.ndim != 2 or ids.shape != (batch, length):
    raise ValueError(f"{name} must be [B, T] = [{batch}, {length}], got shape {ids.shape}")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f"{name} must be integer, got dtype {ids.dtype}")
  return ids.astype(jnp.int32)


def _default_positions(cfg, grid, batch, offset):
  T = math.prod(grid)
  if cfg.rope == "1d":
    pos = jnp.arange(T, dtype=jnp.int32) + offset
    return jnp.broadcast_to(pos, (batch, T))
  coords = jnp.asarray(_pos.grid_coordinates(grid)) + offset
  if cfg.rope == "mixed" and coords.shape[-1] != cfg.rope_ndim:
    raise ValueError(f"rope='mixed' was built for rope_ndim={cfg.rope_ndim} axes but the input "
                     f"grid {grid} has {len(grid)}; pass positions [B, T, {cfg.rope_ndim}] "
                     "explicitly")
  return jnp.broadcast_to(coords, (batch, T, coords.shape[-1]))


def _apply_rope(cfg, params, x_BTNH, pos):
  if cfg.rope == "1d":
    if pos.ndim != 2 or pos.shape != x_BTNH.shape[:2]:
      raise ValueError(f"positions for rope='1d' must be [B, T] = {x_BTNH.shape[:2]}, got shape "
                       f"{pos.shape}")
    return _pos.apply_rope(x_BTNH, pos, base=cfg.rope_base)
  if pos.ndim != 3 or pos.shape[:2] != x_BTNH.shape[:2]:
    raise ValueError(f"positions for rope={cfg.rope!r} must be [B, T, D] with [B, T] = "
                     f"{x_BTNH.shape[:2]}, got shape {pos.shape}")
  if cfg.rope == "axial":
    return _pos.apply_rope_axial(x_BTNH, pos, base=cfg.rope_base)
  return _pos.apply_rotary(x_BTNH, _pos.rope_angles_mixed(pos, params["rope_freqs"]))


def _shift_score_mod(mod, q_offset):
  def shifted(score, b, h, q_idx, kv_idx):
    return mod(score, b, h, q_idx + q_offset, kv_idx)
  return shifted


def attention_forward(cfg: AttentionConfig, params: dict, x, context=None, *, segment_ids=None,
                      context_segment_ids=None, positions=None, context_positions=None, cache=None,
                      dropout: Callable | None = None):
  """Multi-head attention: `y = softmax(mask(mods(s * (x Wq)(c Wk)^T))) (c Wv) Wo`.

  Args:
    cfg: the layer configuration.
    params: name -> array, as in `param_specs(cfg)`.
    x: queries' input `[B, T, D]` or `[B, *grid, D]`.
    context: keys'/values' input `[B, S, Dkv]` or `[B, *grid_kv, Dkv]` (cross-attention);
      None for self-attention.
    segment_ids: `[B, T]` int packing ids of `x` (also of the keys for self-attention).
    context_segment_ids: `[B, S]` int ids of `context`.
    positions: RoPE positions of `x`: `[B, T]` (rope='1d') or `[B, T, D]` (axial/mixed);
      default token index (plus the cache index when decoding) or grid coordinates.
    context_positions: same for `context`.
    cache: a `KVCache` (self-attention on 1D inputs only): row b's new keys/values are
      written at slots `cache.lengths[b] ..`, its queries sit at those positions and attend
      to the row's first `lengths[b] + n_b` keys (`kv_lengths`). With a cache,
      `segment_ids < 0` mark right padding: `n_b` counts the tokens with id >= 0, padding
      queries return 0 and the next call overwrites padding slots (ragged prefill).
    dropout: applied to the output (after the output projection).
  Returns:
    `[B, T, out_features]` (same leading shape as `x`), and the updated cache if one was given.
  """
  attention = _attention_fn()
  x_BTD, grid = _flatten_tokens("x", x, cfg.d_model, "d_model")
  B, T = x_BTD.shape[:2]
  dtype = cfg.dtype or x.dtype
  p = {k: v for k, v in params.items()}

  def proj(inp, kernel, bias, eq):
    out = jnp.einsum(eq, inp.astype(dtype), kernel.astype(dtype))
    if bias is not None:
      out = out + bias.astype(dtype)
    return out

  if context is None:
    c_BSD, kv_grid = x_BTD, grid
    if context_segment_ids is not None or context_positions is not None:
      raise ValueError("context_segment_ids/context_positions need a context (cross-attention)")
  else:
    if cache is not None:
      raise ValueError("cache is only supported for self-attention (context=None)")
    c_BSD, kv_grid = _flatten_tokens("context", context, cfg.kv_features, "kv_features")
    if c_BSD.shape[0] != B:
      raise ValueError(f"context batch must equal x batch {B}, got shape {context.shape}")
  S = c_BSD.shape[1]

  q_BTNH = proj(x_BTD, p["q_kernel"], p.get("q_bias"), "btd,dnh->btnh")
  k_BSKH = proj(c_BSD, p["k_kernel"], p.get("k_bias"), "bsd,dkh->bskh")
  v_BSKH = proj(c_BSD, p["v_kernel"], p.get("v_bias"), "bsd,dkh->bskh")
  q_BTNH = constrain(q_BTNH, ("batch", "length", "heads", None))
  if cfg.qk_norm:
    q_BTNH = _rms_norm(q_BTNH, p["q_norm"])
    k_BSKH = _rms_norm(k_BSKH, p["k_norm"])

  q_offset = 0
  if cache is not None:
    if not isinstance(cache, KVCache):
      raise TypeError(f"cache must be a KVCache (from init_cache), got {type(cache).__name__}")
    if len(grid) != 1:
      raise ValueError(f"decoding with a cache needs 1D inputs [B, T, D], got grid {grid}")
    if cfg.spatial_mask:
      raise ValueError(f"decoding with a cache is not supported with the spatial mask {cfg.mask}")
    kh = (cache.k.shape[1], cache.k.shape[3]) if cache.paged else cache.k.shape[2:]
    if cache.lengths.shape != (B,) or kh != k_BSKH.shape[2:] or (
        not cache.paged and cache.k.shape[0] != B):
      raise ValueError(f"cache k has shape {cache.k.shape}, lengths {cache.lengths.shape}; "
                       f"expected [B={B}, S, K={cfg.num_kv_heads}, H={cfg.head_dim}] (paged: "
                       f"[pages, K, page_size, H]) and lengths [B={B}]")
    if T > cache.max_len:
      raise ValueError(f"x has T={T} tokens, more than the cache max_len={cache.max_len}")
    # a uniform cache: one scalar offset (every row has the same length); else per row
    q_offset = cache.lengths[0] if cache.uniform else cache.lengths
    pos_offset = cache.lengths[:, None] if cfg.rope == "1d" else cache.lengths[:, None, None]

  segment_ids = _check_ids("segment_ids", segment_ids, B, T)
  if context is not None:
    context_segment_ids = _check_ids("context_segment_ids", context_segment_ids, B, S)
    if (segment_ids is None) != (context_segment_ids is None):
      raise ValueError("cross-attention needs both segment_ids and context_segment_ids, or neither")
    q_seg, kv_seg = segment_ids, context_segment_ids
  else:
    q_seg = kv_seg = segment_ids

  if cfg.rope is not None:
    q_pos = positions if positions is not None else _default_positions(
        cfg, grid, B, q_offset if cache is None else pos_offset)
    if context is None:
      k_pos = q_pos
    else:
      k_pos = (context_positions if context_positions is not None
               else _default_positions(cfg, kv_grid, B, 0))
    q_BTNH = _apply_rope(cfg, p, q_BTNH, jnp.asarray(q_pos))
    k_BSKH = _apply_rope(cfg, p, k_BSKH, jnp.asarray(k_pos))
  elif positions is not None or context_positions is not None:
    raise ValueError("positions/context_positions were given but the layer has rope=None")

  new_cache = None
  if cache is not None:
    # row b's new tokens go to slots lengths[b] ..; padding (segment id < 0) is written
    # but not counted, so the next call overwrites it
    lengths = cache.lengths
    seg_new = segment_ids if segment_ids is not None else jnp.zeros((B, T), jnp.int32)
    n_new = _new_token_counts(segment_ids, B, T)
    slots = _cache_slots(cache, B, T)
    new_cache = KVCache(k=_write_rows(cache, cache.k, k_BSKH, slots),
                        v=_write_rows(cache, cache.v, v_BSKH, slots),
                        segment_ids=_write_rows(cache, cache.segment_ids, seg_new, slots),
                        lengths=lengths + n_new, page_table=cache.page_table,
                        uniform=cache.uniform and segment_ids is None)
    k_BSKH, v_BSKH = new_cache.k.astype(dtype), new_cache.v.astype(dtype)
    if cache.paged:   # the pools and the table (a Pallas kernel reads pages itself)
      attention = functools.partial(_paged_attention_fn(), page_table=new_cache.page_table)
    seg_all = _row_view(new_cache, new_cache.segment_ids)
    q_seg, kv_seg = (None, None) if segment_ids is None else (seg_new, seg_all)
    S = cache.max_len
    # keys past each row's length (unwritten or padding) and padding queries take no part
    attention = functools.partial(
        attention, kv_lengths=lengths + n_new,
        q_lengths=None if segment_ids is None else n_new)

  mask = build_mask(cfg.mask, grid, cfg.num_heads)
  if cfg.causal:
    mask = _masks.causal() if mask is None else (mask & _masks.causal())
  if mask is not None and cache is not None:
    if cache.uniform:
      mask = mask.shifted(q_offset, 0)
    elif not (T == 1 and cfg.mask is None):
      # per-row positions; one causal query per row needs no mask beyond kv_lengths
      mask = _row_shifted_mask(mask, q_offset, T, S, cfg.num_heads, B)
    else:
      mask = None

  mods = []
  if cfg.alibi:
    mods.append(_score_mods.alibi(_score_mods.alibi_slopes(cfg.num_heads), symmetric=True))
  if cfg.relpos_max_distance is not None:
    table = p["relpos_table"].astype(jnp.float32)
    if cfg.relpos_ndim == 1 and not isinstance(cfg.relpos_max_distance, tuple):
      mods.append(_score_mods.relative_position_bias(table, max_distance=cfg.relpos_max_distance))
    else:
      if len(grid) != cfg.relpos_ndim or kv_grid != grid:
        raise ValueError(f"relpos_max_distance={cfg.relpos_max_distance} is a "
                         f"{cfg.relpos_ndim}-axis table; the input grid is {grid} (keys {kv_grid})")
      mods.append(_score_mods.relative_position_bias(table, shape=grid,
                                                     max_distance=cfg.relpos_max_distance))
  if cfg.score_mod is not None:
    mods.append(cfg.score_mod)
  score_mod = None
  if mods:
    score_mod = mods[0] if len(mods) == 1 else _score_mods.compose(*mods)
    if cache is not None:
      score_mod = (_shift_score_mod(score_mod, q_offset) if cache.uniform
                   else _row_shift_score_mod(score_mod, q_offset))

  sinks = p["sinks"].astype(jnp.float32) if cfg.sinks else None
  if cache is None and context is None and _context.context_size() > 1:
    # The trainer's mesh splits the sequence over 'context': ring / all-gather attention
    # (config.parallel.context_impl), masks and score mods at global positions.
    out_BTNH = _context.context_attention(
        q_BTNH, k_BSKH, v_BSKH, mask=mask, score_mod=score_mod, q_segment_ids=q_seg,
        kv_segment_ids=kv_seg, scale=cfg.scale, softcap=cfg.softcap, sinks=sinks)
  else:
    out_BTNH = attention(
        q_BTNH, k_BSKH, v_BSKH, mask=mask, score_mod=score_mod,
        q_segment_ids=q_seg, kv_segment_ids=kv_seg, scale=cfg.scale, softcap=cfg.softcap,
        sinks=sinks, implementation=cfg.implementation, block_sizes=cfg.block_sizes)
  y_BTD = jnp.einsum("btnh,nhd->btd", out_BTNH.astype(dtype), p["o_kernel"].astype(dtype))
  if cfg.use_bias:
    y_BTD = y_BTD + p["o_bias"].astype(dtype)
  if dropout is not None:
    y_BTD = dropout(y_BTD)
  y_BTD = constrain(y_BTD, ("batch", "length", "embed"))
  y = y_BTD.reshape((B,) + grid + (cfg.out_features,))
  if cache is not None:
    return y, new_cache
  return y


def mechanism_factories(nnx_cls, linen_module: str, linen_name: str):
  """`(make_factory, make_linen_factory)` for a layer class taking `mechanism=`.

  `make_factory(mechanism)` is the registry's NNX factory
  `(*, d_model, num_heads, num_kv_heads=None, head_dim=None, rngs, **options)` building
  `nnx_cls(d_model, num_heads, mechanism=mechanism, ...)`; `make_linen_factory(mechanism)`
  builds the Linen twin `linen_module.linen_name` (imported on first call), whose options
  are a sorted tuple of `(name, value)` pairs with lists frozen into tuples (hashable).
  """

  def make_factory(mechanism: str):
    def factory(*, d_model, num_heads, num_kv_heads=None, head_dim=None, rngs, **options):
      return nnx_cls(d_model, num_heads, mechanism=mechanism, num_kv_heads=num_kv_heads,
                     head_dim=head_dim, rngs=rngs, **options)
    factory.__name__ = f"{mechanism}_factory"
    factory.__doc__ = (f"`{nnx_cls.__name__}(mechanism={mechanism!r})` "
                       f"({nnx_cls.__module__}).")
    return factory

  def make_linen_factory(mechanism: str):
    def linen_factory(*, d_model, num_heads, num_kv_heads=None, head_dim=None, **options):
      import importlib  # pylint: disable=import-outside-toplevel
      cls = getattr(importlib.import_module(linen_module), linen_name)
      frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                            for k, v in options.items()))
      return cls(d_model=d_model, num_heads=num_heads, mechanism=mechanism,
                 num_kv_heads=num_kv_heads, head_dim=head_dim, options=frozen)
    linen_factory.__name__ = f"{mechanism}_linen_factory"
    return linen_factory

  return make_factory, make_linen_factory
