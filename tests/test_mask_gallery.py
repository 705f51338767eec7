"""scripts/mask_gallery.py draws from the library's masks and keeps running."""

import importlib.util
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gallery():
  spec = importlib.util.spec_from_file_location("mask_gallery",
                                                os.path.join(ROOT, "scripts", "mask_gallery.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_panels_match_their_definitions_and_the_figure_is_written(tmp_path):
  g = _gallery()
  size = 12
  panels = {title: g.allowed_map(mask, (size, size), q) for title, _, mask, q in g.gallery(size)}
  for title, (_, _, _, q) in zip(panels, g.gallery(size)):
    assert panels[title][q], f"{title}: the query must see itself"
  y, x = size // 2, size // 2 - 1
  cc = panels["criss-cross"]
  assert cc.sum() == 2 * size - 1 and cc[y].all() and cc[:, x].all()
  nb = panels["neighborhood k=5"]
  assert nb.sum() == 25 and nb[y - 2:y + 3, x - 2:x + 3].all()
  border = panels["neighborhood k=5 at a border"]  # clamped: still 5x5, inside the map
  assert border.sum() == 25 and border[0:5, size - 5:].all()
  dil = panels["neighborhood k=3 dilation 2"]
  assert dil.sum() == 9 and dil[y - 2:y + 3:2, x - 2:x + 3:2].all()
  corner = panels["shifted window, wrapped corner"]  # Swin region mask in original coords
  assert corner.sum() == 4 and corner[:2, :2].all()
  out = g.draw(str(tmp_path / "g.png"), size=8)
  assert os.path.getsize(out) > 1000
  assert np.array_equal(panels["MaxViT block"], panels["Swin window"])
