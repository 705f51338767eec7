"""Every notebook in notebooks/ executes, is stored without outputs, and is documented.

Each `notebooks/*.ipynb` (a glob: a notebook added later is covered without editing this
file) is executed top to bottom with `nbclient` on the `python3` kernel, with the working
directory `notebooks/` and `ATTNJAX_NB_SMALL=1` in the kernel's environment: every
notebook reads that variable and then runs at its small, fast size (one seed, a few
steps). A failing cell fails the test with the cell's source and the error. The kernel
is the `python3` kernelspec of the `ipykernel` installed in this environment, which
jupyter_client launches with this interpreter (`sys.executable`); that is checked below,
as is that the kernel imports `attnjax` from this checkout (`PYTHONPATH` is prefixed with
the repository root, and the notebooks put it on `sys.path` themselves).

Cost: notebooks that need more than about a minute at the small size are listed in
`SLOW` (with the reason) and marked `slow` (run them with `pytest -m slow`); the others
run by default.

  python -m pytest -q tests/test_notebooks.py             # outputs/README checks + fast notebooks
  python -m pytest -q -m slow tests/test_notebooks.py     # the slow notebooks

Needs the `[notebooks]` extra (nbformat, nbclient, ipykernel; also in `[test]`).
"""

import glob
import os
import re
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(NB_DIR, "*.ipynb")))

# Notebooks that need more than ~60 s at ATTNJAX_NB_SMALL=1 on a CPU: name -> reason.
# They run with `pytest -m slow`. Measure a notebook with
# `python -m pytest -q -m 'slow or not slow' tests/test_notebooks.py -k NAME --durations=0`
# before adding or removing it here.
# Measured at ATTNJAX_NB_SMALL=1 on an idle 2-core CPU: 01_tour 12 s, 02_variant_gallery
# 16 s, 07_head_ablation 26 s (about 3x that on a loaded machine): none is slow.
SLOW = {
    # each compiles several models for its experiment: 70-150 s at the small size (loaded).
    "03_position_probe.ipynb": "three encoders", "04_mqar_sweep.ipynb": "vmapped MQAR sweep",
    "05_set_tasks.ipynb": "three set models", "06_icl_regression.ipynb": "three models",
    "08_vit_variants.ipynb": "a ViT per variant",
}

# Seconds one cell may run (the whole notebook has no separate limit).
CELL_TIMEOUT = int(os.environ.get("ATTNJAX_NB_CELL_TIMEOUT", "600"))

# Cells with this tag may keep their outputs in the committed file (figures the docs show).
KEEP_OUTPUT_TAG = "keep-output"


def _kernel_env():
  """The environment the kernel inherits: this one plus the small-size switch and the
  repository root first on PYTHONPATH (so this checkout's attnjax is the one imported)."""
  env = {"ATTNJAX_NB_SMALL": "1"}
  env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in os.environ.get(
      "PYTHONPATH", "").split(os.pathsep) if p])
  return env


def _execute(nb, monkeypatch):
  """Runs `nb` in place with nbclient (cwd notebooks/, kernel python3)."""
  for key, value in _kernel_env().items():
    monkeypatch.setenv(key, value)
  client = nbclient.NotebookClient(
      nb, timeout=CELL_TIMEOUT, kernel_name="python3",
      resources={"metadata": {"path": NB_DIR}})
  client.execute()
  return nb


def _cell_failure(nb, err):
  """A message naming the failing cell, with its source and the error (traceback)."""
  failing = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and any(o.get("output_type") == "error" for o in cell.get("outputs", []))]
  where = f"cell {failing[-1]} failed" if failing else "a cell failed"
  # nbclient's message holds the cell's source and the traceback.
  return f"{where}:\n{_strip_ansi(str(err))}"


def _strip_ansi(text):
  return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _params():
  out = []
  for name in NOTEBOOKS:
    marks = [pytest.mark.slow] if name in SLOW else []
    out.append(pytest.param(name, marks=marks, id=name))
  return out


def test_there_are_notebooks():
  assert NOTEBOOKS, f"no notebooks found in {NB_DIR}"


def test_slow_list_names_existing_notebooks():
  """An entry of SLOW that names no notebook is a typo (the notebook would run by default
  under its real name)."""
  unknown = sorted(set(SLOW) - set(NOTEBOOKS))
  assert not unknown, f"SLOW names notebooks that do not exist: {unknown}"


@pytest.mark.parametrize("name", _params())
def test_notebook_executes(name, monkeypatch):
  nb = nbformat.read(os.path.join(NB_DIR, name), as_version=4)
  failure = None
  try:
    _execute(nb, monkeypatch)
  except nbclient.exceptions.CellTimeoutError as e:
    failure = f"a cell ran past {CELL_TIMEOUT} s: {e}"
  except nbclient.exceptions.CellExecutionError as e:
    failure = _cell_failure(nb, e)
  if failure is not None:  # outside the except block: no chained traceback
    pytest.fail(f"{name}: {failure}", pytrace=False)
  ran = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
  assert ran and all(c.execution_count is not None for c in ran), (
      f"{name}: not every code cell ran")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
  """Committed notebooks carry no outputs or execution counts (except cells tagged
  `keep-output`), and are valid nbformat v4 with the python3 kernel."""
  path = os.path.join(NB_DIR, name)
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4, f"{name}: nbformat {nb.nbformat}"
  assert nb.metadata.get("kernelspec", {}).get("name") == "python3", (
      f"{name}: kernelspec must be python3, got {nb.metadata.get('kernelspec')}")
  dirty = []
  for i, cell in enumerate(nb.cells):
    if cell.cell_type != "code":
      continue
    if KEEP_OUTPUT_TAG in cell.get("metadata", {}).get("tags", []):
      continue
    if cell.get("outputs") or cell.get("execution_count") is not None:
      dirty.append(i)
  assert not dirty, (f"{name}: code cells {dirty} have outputs or execution counts; clear "
                     f"them before committing (or tag a cell '{KEEP_OUTPUT_TAG}')")
  assert re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", name), (
      f"{name}: notebooks are named NN_lower_snake.ipynb")


def test_readme_lists_every_notebook():
  with open(os.path.join(NB_DIR, "README.md")) as f:
    readme = f.read()
  missing = [n for n in NOTEBOOKS if n not in readme]
  assert not missing, f"notebooks/README.md does not mention {missing}"


def test_kernel_is_this_python(monkeypatch):
  """The python3 kernel runs this interpreter (this venv) and imports this checkout."""
  nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
      "import os, sys, attnjax\n"
      "print(sys.prefix)\n"
      "print(os.path.dirname(os.path.dirname(os.path.abspath(attnjax.__file__))))\n"
      "print(os.getcwd())\n"
      "print(os.environ.get('ATTNJAX_NB_SMALL'))")])
  _execute(nb, monkeypatch)
  text = "".join(o.get("text", "") for o in nb.cells[0].outputs if o.output_type == "stream")
  prefix, attnjax_root, cwd, small = text.strip().splitlines()
  assert os.path.realpath(prefix) == os.path.realpath(sys.prefix)
  assert os.path.realpath(attnjax_root) == os.path.realpath(ROOT)
  assert os.path.realpath(cwd) == os.path.realpath(NB_DIR)
  assert small == "1"
