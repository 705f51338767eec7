r"""Draws the spatial masks of attnjax as pictures: docs/images/mask_gallery.png.

Each panel is a small token grid; for one query position (the star) the cells it may
attend to are filled, evaluated from the library's own `attnjax.masks` objects (the masks
the layers and ops run), so the picture cannot drift from the code.

  python scripts/mask_gallery.py                      # writes docs/images/mask_gallery.png
  python scripts/mask_gallery.py --out /tmp/g.png --size 8
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from attnjax import masks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gallery(size: int = 12):
  """[(title, registry names, Mask, query (y, x))] on a `size` x `size` grid."""
  shape = (size, size)
  c = (size // 2, size // 2 - 1)
  edge = (1, size - 2)
  w = size // 3 if size % 3 == 0 else 2
  return [
      ("Swin window", "swin", masks.window(shape, w), c),
      ("Swin shifted window", "swin (odd layers)", masks.window(shape, w, shift=w // 2), c),
      ("shifted window, wrapped corner", "swin (odd layers)",
       masks.window(shape, w, shift=w // 2), (0, 0)),
      ("neighborhood k=5", "neighborhood", masks.neighborhood(shape, 5), c),
      ("neighborhood k=5 at a border", "neighborhood", masks.neighborhood(shape, 5), edge),
      ("neighborhood k=3 dilation 2", "neighborhood", masks.neighborhood(shape, 3, dilation=2), c),
      ("causal neighborhood k=5", "neighborhood", masks.neighborhood(shape, 5, causal=True), c),
      ("HaloNet block + halo", "halo", masks.halo(shape, w, 1), c),
      ("CSWin horizontal stripe", "cswin", masks.stripe(shape, 2, 0), c),
      ("CSWin vertical stripe", "cswin", masks.stripe(shape, 2, 1), c),
      ("criss-cross", "ccnet, criss_cross", masks.criss_cross(shape), c),
      ("MaxViT block", "maxvit_block", masks.window(shape, w), c),
      ("MaxViT grid", "maxvit_grid, grid", masks.grid(shape, w), c),
      ("axial (rows)", "axial", masks.axial(shape, 1), c),
      ("axial (columns)", "axial", masks.axial(shape, 0), c),
  ]


def allowed_map(mask, shape, query):
  """Boolean `shape` map of the keys `query` (y, x) may attend to under `mask`."""
  T = int(np.prod(shape))
  qi = int(np.ravel_multi_index(query, shape))
  row = np.asarray(mask.to_array(T, T))[..., qi, :].reshape(-1, T)[0]
  return row.reshape(shape)


def draw(out: str, size: int = 12) -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  panels = gallery(size)
  cols = 5
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows))
  for ax in axes.ravel():
    ax.axis("off")
  for ax, (title, names, mask, query) in zip(axes.ravel(), panels):
    m = allowed_map(mask, (size, size), query)
    ax.imshow(m, cmap="Blues", vmin=0, vmax=1.4)
    ax.plot(query[1], query[0], marker="*", color="crimson", markersize=11)
    ax.set_xticks(np.arange(-0.5, size, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, size, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
    ax.set_title(f"{title}\n'{names}'", fontsize=8)
    ax.axis("on")
  fig.suptitle(f"attnjax spatial masks on a {size}x{size} grid: keys the starred query sees",
               fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=90)
  plt.close(fig)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.path.join(ROOT, "docs", "images", "mask_gallery.png"))
  p.add_argument("--size", type=int, default=12)
  a = p.parse_args()
  print("wrote", draw(a.out, a.size))


if __name__ == "__main__":
  main()
