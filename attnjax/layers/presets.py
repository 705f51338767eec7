"""Named attention variants as keyword presets of `MultiHeadAttention`.

Each preset maps a variant's own options (e.g. `window=7, shift=3` for Swin) to the
keyword arguments of `attnjax.layers.MultiHeadAttention` (and of its Linen twin), so the
NNX layer, the Linen layer and the `attnjax.variants` registry share one definition.
Options a preset does not consume (qk_norm, rope, implementation, dropout_rate, dtype,
...) pass through unchanged.

| name            | mechanism (paper)                                                         |
|-----------------|----------------------------------------------------------------------------|
| mha             | dense softmax attention ("Attention Is All You Need"), `causal=` option   |
| sliding_window  | local band `i - window <= j <= i + right` ("Longformer"; Mistral)          |
| chunked         | block-diagonal chunks, chunk-causal with `causal=True` (Llama 4 style)     |
| prefix_lm       | bidirectional prefix + causal rest ("Exploring the Limits of Transfer      |
|                 | Learning ... (T5)")                                                        |
| dual_triangle   | half the heads past+self, half future+self ("Dual Triangle Attention")    |
| neighborhood    | NATTEN neighborhoods, 1D/2D, dilation ("Neighborhood Attention             |
|                 | Transformer"; "Faster Neighborhood Attention")                             |
| swin            | (shifted) windows + relative position bias ("Swin Transformer")           |
| grid            | MaxViT grid attention ("MaxViT: Multi-Axis Vision Transformer")           |
| axial           | row / column attention ("Axial Attention in Multidimensional Transformers") |
| criss_cross     | same row or column ("CCNet: Criss-Cross Attention for Semantic Segmentation") |
| alibi           | linear distance biases ("Train Short, Test Long ... (ALiBi)")             |
| softcap         | `c tanh(s / c)` logit capping (Gemma 2)                                   |
| sinks           | learnable per-head sink logits ("Efficient Streaming Language Models with  |
|                 | Attention Sinks"; gpt-oss)                                                 |
| relpos          | learned clipped relative-position bias ("Self-Attention with Relative      |
|                 | Position Representations")                                                 |
"""

from __future__ import annotations

from attnjax.layers._core import MaskSpec

__all__ = ["PRESETS", "variant_kwargs", "SPATIAL", "NEVER_CAUSAL"]


def _no_causal(name, causal):
  if causal:
    raise ValueError(f"variant {name!r} does not take causal=True (its mask already defines which "
                     f"keys each query sees); build the model with causal=False")


def _as_tuple(v):
  return tuple(v) if isinstance(v, (tuple, list)) else None


def mha(*, causal=False, **options):
  return dict(causal=causal, **options)


def sliding_window(*, window, right=0, causal=False, **options):
  return dict(mask=MaskSpec("sliding_window", left=window, right=right), causal=causal, **options)


def chunked(*, chunk_size, causal=False, **options):
  return dict(mask=MaskSpec("chunked", size=chunk_size), causal=causal, **options)


def prefix_lm(*, prefix_len, causal=False, **options):
  _no_causal("prefix_lm", causal)
  return dict(mask=MaskSpec("prefix_lm", prefix_len=prefix_len), **options)


def dual_triangle(*, causal=False, **options):
  _no_causal("dual_triangle", causal)
  return dict(mask=MaskSpec("dual_triangle"), **options)


def neighborhood(*, kernel, dilation=1, causal=False, relpos=False, ndim=None, **options):
  """NATTEN neighborhood attention; `relpos=True` adds NAT's `(2k-1)^D` bias table
  (indexed by offsets, clipped to `(k-1)*dilation`); `ndim` (grid rank) is needed for the
  table when `kernel` is an int (default 2)."""
  if relpos:
    k = _as_tuple(kernel)
    d = _as_tuple(dilation)
    nd = ndim or (len(k) if k else (len(d) if d else 2))
    k = k or (kernel,) * nd
    d = d or (dilation,) * nd
    options["relpos_max_distance"] = tuple((ki - 1) * di for ki, di in zip(k, d))
  return dict(mask=MaskSpec("neighborhood", kernel=kernel, dilation=dilation, causal=causal),
              **options)


def swin(*, window, shift=0, relpos=True, ndim=2, causal=False, **options):
  """Swin (shifted) window attention with the `(2M-1)^2` relative position bias table."""
  _no_causal("swin", causal)
  if relpos:
    w = _as_tuple(window) or (window,) * ndim
    options["relpos_max_distance"] = tuple(wi - 1 for wi in w)
  return dict(mask=MaskSpec("window", window=window, shift=shift), **options)


def grid(*, grid, causal=False, **options):  # pylint: disable=redefined-outer-name
  _no_causal("grid", causal)
  return dict(mask=MaskSpec("grid", grid=grid), **options)


def axial(*, axis=None, causal=False, **options):
  """`axis=0|1`: attend along one axis; `axis=None`: first half of the heads along rows'
  axis 0, second half along axis 1 (both axes in one call)."""
  _no_causal("axial", causal)
  return dict(mask=MaskSpec("axial", axis=axis), **options)


def criss_cross(*, causal=False, **options):
  _no_causal("criss_cross", causal)
  return dict(mask=MaskSpec("criss_cross"), **options)


def alibi(*, causal=False, **options):
  return dict(alibi=True, causal=causal, **options)


def softcap(*, cap=50.0, causal=False, **options):
  return dict(softcap=cap, causal=causal, **options)


def sinks(*, window=None, causal=False, **options):
  """Learnable attention sinks; `window=` adds a sliding window (gpt-oss style)."""
  if window is not None:
    options["mask"] = MaskSpec("sliding_window", left=window, right=0)
  return dict(sinks=True, causal=causal, **options)


def relpos(*, max_distance=32, causal=False, **options):
  return dict(relpos_max_distance=max_distance, causal=causal, **options)


PRESETS = {
    "mha": mha,
    "sliding_window": sliding_window,
    "chunked": chunked,
    "prefix_lm": prefix_lm,
    "dual_triangle": dual_triangle,
    "neighborhood": neighborhood,
    "swin": swin,
    "grid": grid,
    "axial": axial,
    "criss_cross": criss_cross,
    "alibi": alibi,
    "softcap": softcap,
    "sinks": sinks,
    "relpos": relpos,
}

# Variants whose mask lives on a 2D token grid (inputs [B, Hh, Ww, D]).
SPATIAL = frozenset({"swin", "grid", "axial", "criss_cross"})
# Presets whose own mask already decides what each query sees (they refuse causal=True).
NEVER_CAUSAL = frozenset({"prefix_lm", "dual_triangle"})


def variant_kwargs(name: str, **options) -> dict:
  """`MultiHeadAttention` keyword arguments for the built-in variant `name`."""
  if name not in PRESETS:
    import difflib  # pylint: disable=import-outside-toplevel
    close = difflib.get_close_matches(str(name), list(PRESETS), n=3, cutoff=0.5)
    raise ValueError(f"unknown attention preset name={name!r}; close matches: {close or 'none'}; "
                     f"known: {sorted(PRESETS)}")
  try:
    return PRESETS[name](**options)
  except TypeError as e:
    raise TypeError(f"bad options for attention variant {name!r}: {e}") from e
