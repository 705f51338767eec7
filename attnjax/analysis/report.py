"""All figures of one model on a few examples, written to a folder (used by ``eval.py``).

:func:`write_report` captures the maps (:func:`attnjax.analysis.capture`) and writes:
``example_<i>.png`` (head grid per example: a row per layer, a column per head),
``stat_<name>.png`` (entropy, mean distance, top-1 mass and sink score per layer),
``sink_report.txt``, ``stats.json``,
and for image inputs (``[B, Hh, Ww, C]``) whose layers keep one square token grid,
``rollout_example_<i>.png``: the attention each patch receives under rollout (column
mean), overlaid on the image.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from attnjax.analysis.attribution import rollout
from attnjax.analysis.capture import capture
from attnjax.analysis.plots import plot_head_grid, plot_overlay, plot_stat_curves
from attnjax.analysis.stats import head_stats, sink_report

__all__ = ["write_report"]


def _image_grid(x, T):
  """(h, w) of a token grid of T tokens on an image ``[B, Hh, Ww, C]``, or None."""
  if np.ndim(x) != 4:
    return None
  Hh, Ww = x.shape[1:3]
  h = round(math.sqrt(T * Hh / Ww))
  if h <= 0 or T % h or Hh % h or Ww % (T // h):
    return None
  return h, T // h


def write_report(model, x, out_dir: str, *, title: str = "", max_examples: int = 2,
                 **call_kwargs) -> list[str]:
  """Writes the figures and tables above for ``model(x, **call_kwargs)``; returns the
  paths written (none when the model makes no attention call)."""
  maps = capture(model, x, **call_kwargs)
  if not maps:
    return []
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  n = min(max_examples, next(iter(maps.values())).shape[0])
  for i in range(n):
    paths.append(plot_head_grid(maps, os.path.join(out_dir, f"example_{i}.png"),
                                example=i, title=f"{title} example {i}".strip()))
  shapes = {m.shape[-2:] for m in maps.values()}
  T = next(iter(shapes))[0]
  grid = _image_grid(x, T) if len(shapes) == 1 and T == next(iter(shapes))[1] else None
  stats = head_stats(maps, grid=grid)
  for stat in ("entropy", "distance", "topk_mass", "sink_score"):
    paths.append(plot_stat_curves(stats, stat, os.path.join(out_dir, f"stat_{stat}.png"),
                                  title=title))
  _, text = sink_report(maps)
  path = os.path.join(out_dir, "sink_report.txt")
  with open(path, "w") as f:
    f.write(text + "\n")
  paths.append(path)
  path = os.path.join(out_dir, "stats.json")
  with open(path, "w") as f:
    json.dump({name: {k: np.asarray(v).tolist() for k, v in s.items()}
               for name, s in stats.items()}, f, indent=1)
  paths.append(path)
  if grid is not None:
    r = rollout(maps)
    for i in range(n):
      received = r[i].mean(0).reshape(grid)
      paths.append(plot_overlay(np.asarray(x[i]), received,
                                os.path.join(out_dir, f"rollout_example_{i}.png"),
                                title=f"{title} rollout {i}".strip()))
  return paths
