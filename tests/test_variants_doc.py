"""docs/variants.md lists every registered variant (and only registered ones)."""

import os
import re

from attnjax import variants
from attnjax.layers import channel

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                   "variants.md")


def _rows():
  text = open(DOC, encoding="utf-8").read()
  return text, dict(re.findall(r"^\| `([a-z0-9_]+)` \| (sequence|spatial|pooling) \|", text, re.M))


def test_every_registered_variant_has_a_row_with_its_kind():
  _, rows = _rows()
  missing = [n for n in variants.names() if n not in rows]
  assert not missing, f"add these to docs/variants.md: {missing}"
  stale = [n for n in rows if n not in variants.names()]
  assert not stale, f"docs/variants.md lists unregistered names: {stale}"
  wrong = {n: (k, variants.info(n).kind) for n, k in rows.items() if variants.info(n).kind != k}
  assert not wrong, f"kind in docs/variants.md differs from the registry: {wrong}"


def test_cnn_modules_listed():
  text, _ = _rows()
  missing = [m for m in channel.MODULES if f"`{m}`" not in text]
  assert not missing, missing
