"""Per-head attention statistics on captured maps ``P [B, N, T, S]`` (any leading shape
``[..., T, S]`` works for the per-query functions).

- :func:`entropy`: ``-sum_s p_ts log p_ts`` (``0 log 0 = 0``); ``log S`` for uniform rows.
- :func:`mean_distance`: ``sum_s p_ts d(t, s)`` with ``d = |t - s|`` in tokens, or, for a
  spatial map on a row-major ``(h, w)`` grid, the Euclidean distance between the two
  patches in pixels (``patch_size`` pixels per grid step): the "mean attention distance"
  of "An Image is Worth 16x16 Words" (Dosovitskiy et al.).
- :func:`topk_mass`: the mass of the ``k`` largest weights of each row.
- :func:`sink_score`: the mass on a sink token (token 0 by default), averaged over queries
  ("Efficient Streaming Language Models with Attention Sinks", Xiao et al.);
  :func:`sink_logit_mass`: ``1 - sum_s p_ts``, the mass a learnable sink logit took.
- :func:`head_stats`, :func:`sink_report`: every statistic per layer and head.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

__all__ = ["entropy", "mean_distance", "topk_mass", "sink_score", "sink_logit_mass",
           "head_stats", "sink_report"]


def _probs(p, name="probs", min_ndim=2):
  p = np.asarray(p, dtype=np.float64)
  if p.ndim < min_ndim:
    raise ValueError(f"{name} must be [..., T, S] (rank >= {min_ndim}), got shape {p.shape}")
  return p


def entropy(probs) -> np.ndarray:
  """Row entropy in nats, ``[..., T]``."""
  p = _probs(probs)
  logp = np.log(np.where(p > 0, p, 1.0))
  return -(p * logp).sum(-1)


def _grid(grid, T, S):
  if grid is None:
    return None
  if len(grid) != 2 or any(int(g) <= 0 for g in grid):
    raise ValueError(f"grid must be (h, w) positive ints, got {grid!r}")
  h, w = int(grid[0]), int(grid[1])
  if T != h * w or S != h * w:
    raise ValueError(f"grid {grid!r} needs T == S == h * w = {h * w}, got T={T}, S={S}")
  y, x = np.divmod(np.arange(h * w), w)
  return y, x


def mean_distance(probs, *, grid: Optional[Sequence[int]] = None,
                  patch_size: float = 1.0) -> np.ndarray:
  """Mean attention distance per query, ``[..., T]``.

  Tokens: ``sum_s p_ts |t - s|``.  With ``grid=(h, w)`` (a spatial map, ``T == S == h w``
  row-major): ``sum_s p_ts * patch_size * ||(y_t, x_t) - (y_s, x_s)||_2`` in pixels.
  """
  p = _probs(probs)
  T, S = p.shape[-2:]
  yx = _grid(grid, T, S)
  if yx is None:
    d = np.abs(np.arange(T)[:, None] - np.arange(S)[None, :]).astype(np.float64)
  else:
    y, x = yx
    d = np.hypot(y[:, None] - y[None, :], x[:, None] - x[None, :]) * float(patch_size)
  return (p * d).sum(-1)


def topk_mass(probs, k: int) -> np.ndarray:
  """Mass of the ``k`` largest weights of each row, ``[..., T]``."""
  p = _probs(probs)
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= p.shape[-1]:
    raise ValueError(f"k must be an int in [1, S={p.shape[-1]}], got {k!r}")
  return -np.sort(-p, axis=-1)[..., :k].sum(-1)


def sink_score(probs, token: int = 0) -> np.ndarray:
  """Mass on key ``token`` averaged over the queries: ``[...]`` (e.g. ``[B, N]``)."""
  p = _probs(probs)
  if not -p.shape[-1] <= token < p.shape[-1]:
    raise ValueError(f"token must be in [0, S={p.shape[-1]}), got {token}")
  return p[..., token].mean(-1)


def sink_logit_mass(probs) -> np.ndarray:
  """``1 - sum_s p_ts`` per query, ``[..., T]``: the mass taken by a sink logit
  (``sinks=`` of :func:`attnjax.attention`).  Only meaningful with sinks: a fully masked
  row (all zeros) also gives 1."""
  return 1.0 - _probs(probs).sum(-1)


def head_stats(maps: dict, *, k: int = 1, token: int = 0,
               grid: Optional[Sequence[int]] = None, patch_size: float = 1.0) -> dict:
  """``{layer: {stat: [N]}}`` over ``maps = {layer: P [B, N, T, S]}`` (averaged over the
  batch and the queries): ``entropy``, ``distance`` (tokens, or pixels with ``grid``
  where the layer's ``T == S == h w``; token distance otherwise), ``topk_mass``,
  ``sink_score`` (mass on ``token``) and ``sink_logit_mass``."""
  out = {}
  for name, p in maps.items():
    p = _probs(p, f"maps[{name!r}]", 4)
    T, S = p.shape[-2:]
    g = grid if grid is not None and T == S == int(np.prod(grid)) else None
    out[name] = {
        "entropy": entropy(p).mean((0, 2)),
        "distance": mean_distance(p, grid=g, patch_size=patch_size).mean((0, 2)),
        "topk_mass": topk_mass(p, min(k, S)).mean((0, 2)),
        "sink_score": sink_score(p, token).mean(0),
        "sink_logit_mass": sink_logit_mass(p).mean((0, 2)),
    }
  return out


def sink_report(maps: dict, *, token: int = 0, threshold: float = 0.5) -> tuple[dict, str]:
  """Sink scores per layer and head, and a text table.

  Returns ``({layer: {"sink_score": [N], "sink_logit_mass": [N], "sink_heads": [...]}},
  text)``; ``sink_heads`` lists the heads whose mass on ``token`` (plus sink-logit mass)
  averages above ``threshold``.
  """
  report, lines = {}, [f"sink report (token {token}, threshold {threshold:g})",
                       f"{'layer':<32} {'head':>4} {'sink':>7} {'logit':>7}"]
  for name, p in maps.items():
    p = _probs(p, f"maps[{name!r}]", 4)
    s = sink_score(p, token).mean(0)
    m = sink_logit_mass(p).mean((0, 2))
    heads = [int(h) for h in np.nonzero(s + m > threshold)[0]]
    report[name] = {"sink_score": s, "sink_logit_mass": m, "sink_heads": heads}
    for h in range(p.shape[1]):
      flag = "  *" if h in heads else ""
      lines.append(f"{name:<32} {h:>4} {s[h]:7.3f} {m[h]:7.3f}{flag}")
  return report, "\n".join(lines)
