"""Matplotlib figures of captured attention, written to files (the Agg backend).

- :func:`plot_head_grid` (also :func:`plot_attention_maps`): one row per layer, one
  column per head, each a ``[T, S]`` map.
- :func:`plot_token_map`: one ``[T, S]`` token-to-token map with optional token labels.
- :func:`plot_overlay`: a ``[h, w]`` map (e.g. one query's row of a spatial map, or a
  rollout row) upsampled onto an image.
- :func:`plot_stat_curves`: a per-layer statistic (one line per head and the mean), from
  :func:`attnjax.analysis.head_stats`.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

__all__ = ["plot_head_grid", "plot_attention_maps", "plot_token_map", "plot_overlay",
           "plot_stat_curves"]


def _plt():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _save(fig, path):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  _plt().close(fig)
  return path


def plot_head_grid(maps, path: str, *, example: int = 0, max_heads: int = 8,
                   title: str = "") -> str:
  """Layers x heads grid of ``[T, S]`` maps; ``maps`` a dict ``{layer: P [B, N, T, S]}`` or
  a sequence of arrays.  Returns ``path`` (PNG)."""
  plt = _plt()
  names = list(maps.keys()) if isinstance(maps, dict) else [f"layer {i}" for i in range(len(maps))]
  arrays = [np.asarray(m) for m in (maps.values() if isinstance(maps, dict) else maps)]
  if not arrays:
    raise ValueError("plot_head_grid: no attention maps were captured.")
  heads = min(max(m.shape[1] for m in arrays), max_heads)
  fig, axes = plt.subplots(len(arrays), heads, figsize=(1.9 * heads, 1.9 * len(arrays)),
                           squeeze=False)
  for li, m in enumerate(arrays):
    for h in range(heads):
      ax = axes[li, h]
      ax.set_xticks([])
      ax.set_yticks([])
      if h < m.shape[1]:
        ax.imshow(m[example, h], cmap="viridis", vmin=0.0, interpolation="nearest")
      if li == 0:
        ax.set_title(f"head {h}", fontsize=8)
      if h == 0:
        ax.set_ylabel(names[li][-24:], fontsize=7)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


plot_attention_maps = plot_head_grid


def plot_token_map(probs, path: str, *, labels: Optional[Sequence[str]] = None,
                   key_labels: Optional[Sequence[str]] = None, title: str = "") -> str:
  """One ``[T, S]`` map with query rows and key columns (optional tick labels)."""
  plt = _plt()
  p = np.asarray(probs)
  if p.ndim != 2:
    raise ValueError(f"probs must be one [T, S] map, got shape {p.shape}")
  fig, ax = plt.subplots(figsize=(0.3 * p.shape[1] + 2, 0.3 * p.shape[0] + 1.5))
  im = ax.imshow(p, cmap="viridis", vmin=0.0, interpolation="nearest")
  for setter, lab, n in ((ax.set_yticks, labels, p.shape[0]),
                         (ax.set_xticks, key_labels if key_labels is not None else labels,
                          p.shape[1])):
    if lab is not None and len(lab) == n:
      setter(range(n), list(lab), fontsize=6)
  ax.tick_params(axis="x", labelrotation=90)
  ax.set_xlabel("key")
  ax.set_ylabel("query")
  fig.colorbar(im, ax=ax, fraction=0.046)
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


def plot_overlay(image, attn_map, path: str, *, alpha: float = 0.5, title: str = "") -> str:
  """``attn_map [h, w]`` upsampled (nearest) onto ``image [Hh, Ww]`` or ``[Hh, Ww, C]``."""
  plt = _plt()
  img = np.asarray(image, dtype=np.float64)
  a = np.asarray(attn_map, dtype=np.float64)
  if a.ndim != 2:
    raise ValueError(f"attn_map must be [h, w], got shape {a.shape}")
  if img.ndim == 3 and img.shape[-1] == 1:
    img = img[..., 0]
  Hh, Ww = img.shape[:2]
  if Hh % a.shape[0] or Ww % a.shape[1]:
    raise ValueError(f"attn_map {a.shape} must divide the image size {(Hh, Ww)}")
  up = np.kron(a, np.ones((Hh // a.shape[0], Ww // a.shape[1])))
  fig, ax = plt.subplots(figsize=(3, 3))
  lo, hi = img.min(), img.max()
  ax.imshow((img - lo) / (hi - lo + 1e-12), cmap="gray" if img.ndim == 2 else None)
  ax.imshow(up, cmap="jet", alpha=alpha, interpolation="nearest")
  ax.set_xticks([])
  ax.set_yticks([])
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


def plot_stat_curves(stats: dict, stat: str, path: str, *, title: str = "") -> str:
  """``stats = head_stats(maps)``: ``stat`` per layer, one faint line per head and the mean."""
  plt = _plt()
  names = list(stats)
  if not names or stat not in stats[names[0]]:
    raise ValueError(f"stat must be one of {sorted(stats[names[0]]) if names else []}, got "
                     f"{stat!r}")
  vals = [np.asarray(stats[n][stat]) for n in names]
  fig, ax = plt.subplots(figsize=(max(3.0, 0.6 * len(names) + 2), 3))
  x = np.arange(len(names))
  for h in range(max(len(v) for v in vals)):
    ax.plot(x, [v[h] if h < len(v) else np.nan for v in vals], color="gray", alpha=0.4, lw=0.8)
  ax.plot(x, [v.mean() for v in vals], color="C0", lw=2, marker="o", label="mean over heads")
  ax.set_xticks(x, [n[-16:] for n in names], rotation=45, ha="right", fontsize=6)
  ax.set_ylabel(stat)
  ax.legend(fontsize=7)
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  return _save(fig, path)
