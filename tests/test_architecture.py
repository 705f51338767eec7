"""The package's import graph runs one way (``docs/architecture.md``).

Every ``.py`` file under ``attnjax/`` is parsed with ``ast``; every import in it (module
level or inside a function, ``import attnjax.x``, ``from attnjax.x import y``,
``from attnjax import x``, relative imports) is mapped to the layer of the module it
names.  A module may import its own layer or lower ones, except across the sibling
packages ``ops``, ``kernels`` and ``cpu`` (they meet only in ``core`` below and
``dispatch`` above).  String-based ``importlib`` imports are not seen (they are used for
lazy re-exports of a package's own submodules).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "attnjax"

# Lowest first.  ``attnjax`` (the facade ``attnjax/__init__.py``) imports dispatch and the
# modules below it eagerly and everything above it lazily, so it sits with dispatch.
LAYERS = [
    ("masks", "score_mods", "data"),
    ("core",),
    ("ops", "kernels", "cpu"),
    ("dispatch", "attnjax"),
    ("parallel", "analysis"),
    ("layers", "variants"),
    ("models",),
    ("train",),
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}
# Same-level packages that must not import each other.
SIBLINGS = frozenset({"ops", "kernels", "cpu"})


def _unit(dotted: str) -> str:
  """``attnjax.ops.linear._core`` -> ``ops``; ``attnjax`` -> ``attnjax``."""
  parts = dotted.split(".")
  assert parts[0] == "attnjax", dotted
  return parts[1] if len(parts) > 1 else "attnjax"


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
  rel = path.relative_to(root.parent).with_suffix("")
  parts = list(rel.parts)
  is_pkg = parts[-1] == "__init__"
  if is_pkg:
    parts = parts[:-1]
  return ".".join(parts), is_pkg


def _imports(path: Path, root: Path):
  """``(lineno, imported attnjax module)`` for every import in ``path``."""
  name, is_pkg = _module_name(path, root)
  package = name if is_pkg else name.rpartition(".")[0]
  tree = ast.parse(path.read_text(), filename=str(path))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name == "attnjax" or alias.name.startswith("attnjax."):
          yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")
        base = base[:len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
      else:
        mod = node.module or ""
      if mod != "attnjax" and not mod.startswith("attnjax."):
        continue
      if mod == "attnjax":   # from attnjax import masks, dispatch, ...
        for alias in node.names:
          sub = f"attnjax.{alias.name}"
          yield node.lineno, sub if _unit(sub) in LEVEL else "attnjax"
      else:
        yield node.lineno, mod


def violations(root: Path = ROOT):
  """Every forbidden import under ``root``, as readable strings."""
  out = []
  for path in sorted(root.rglob("*.py")):
    name, _ = _module_name(path, root)
    src = _unit(name)
    if src not in LEVEL:
      out.append(f"{path.relative_to(root.parent)}: module {name} has no layer in LAYERS")
      continue
    for lineno, target in _imports(path, root):
      dst = _unit(target)
      if dst not in LEVEL:
        out.append(f"{path.relative_to(root.parent)}:{lineno}: imports {target}, which has "
                   f"no layer in LAYERS")
      elif LEVEL[dst] > LEVEL[src]:
        out.append(f"{path.relative_to(root.parent)}:{lineno}: upward import of {target} "
                   f"(layer {LEVEL[dst]} {dst}) from {name} (layer {LEVEL[src]} {src})")
      elif dst != src and src in SIBLINGS and dst in SIBLINGS:
        out.append(f"{path.relative_to(root.parent)}:{lineno}: {name} imports {target}; "
                   f"{src} and {dst} must not import each other (share code through core)")
  return out


def test_every_top_level_module_has_a_layer():
  units = {p.stem if p.suffix == ".py" else p.name for p in ROOT.iterdir()
           if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
  assert units <= set(LEVEL), f"add to LAYERS: {sorted(units - set(LEVEL))}"


def test_imports_run_one_way():
  bad = violations()
  assert not bad, "imports against the layering of docs/architecture.md:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("src, line, expect", [
    ("kernels/bad.py", "from attnjax.ops import dense\n", "must not import each other"),
    ("ops/bad.py", "def f():\n  from attnjax.kernels.tpu import flash\n",
     "must not import each other"),
    ("core/bad.py", "from attnjax import dispatch\n", "upward import of attnjax.dispatch"),
    ("layers/bad.py", "import attnjax.models.lm\n", "upward import of attnjax.models.lm"),
    ("cpu/bad.py", "from ..ops.chunked import ChunkedBlockSizes\n",
     "must not import each other"),
    ("masks.py", "from .core import args\n", "upward import of attnjax.core"),
    ("ops/linear/bad.py", "from ... import layers\n", "upward import of attnjax.layers"),
])
def test_checker_catches_bad_imports(tmp_path, src, line, expect):
  """The checker itself: each planted import is reported (module-level, function-local,
  absolute, relative, ``from attnjax import x``)."""
  root = tmp_path / "attnjax"
  for pkg in ("core", "ops", "ops/linear", "kernels", "cpu", "layers"):
    (root / pkg).mkdir(parents=True, exist_ok=True)
    (root / pkg / "__init__.py").write_text("")
  (root / "__init__.py").write_text("")
  (root / src).write_text(line)
  bad = violations(root)
  assert len(bad) == 1 and expect in bad[0], bad
  (root / src).write_text("from attnjax.core import args\nimport jax\n"
                          if not src.startswith(("core", "masks")) else "import jax\n")
  assert violations(root) == []
