"""The documentation runs: every ```python block of README.md and docs/*.md.

Each Markdown file's blocks run in order in one namespace, in a fresh Python process per
file (so a file can open with one visible "Setup" block that later fragments use, and so
the process can have 8 host CPU devices for the mesh examples). One test per block, with an
id like ``docs/linear.md:L120``; a block fails with its own traceback, whose line numbers
are those of the Markdown file, and the blocks after a failing one fail as "not run".

A block that cannot run on a CPU machine (it needs a TPU, a pod, or a long training run) is
preceded by an HTML comment ``<!-- doc-test: skip (reason) -->``. Such blocks are reported
as skipped with that reason, and the full list of them is pinned in ``SKIPPED`` below, so a
new one has to be added there by hand.

Also checked: README.md stays short, and no link in README.md or docs/ leaves the repository.

Run as a script (``python tests/test_docs.py FILE.md RESULT.json``) it is the per-file
runner that the tests start.
"""

import dataclasses
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Blocks that do not run in the test, as (file, first line of the block's code).
SKIPPED = {}

_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_SKIP = re.compile(r"<!--\s*doc-test:\s*skip\s*\((.+)\)\s*-->")


@dataclasses.dataclass(frozen=True)
class Block:
  path: str         # relative to ROOT, e.g. 'docs/linear.md'
  line: int         # 1-based line of the block's first code line
  code: str
  skip: str | None  # reason from a preceding skip marker, or None

  @property
  def id(self) -> str:
    return f"{self.path}:L{self.line}"


def python_blocks(path: str, root: str = ROOT) -> list[Block]:
  """The ```python blocks of one Markdown file, with skip markers."""
  with open(os.path.join(root, path), encoding="utf-8") as f:
    lines = f.read().splitlines()
  blocks, i = [], 0
  while i < len(lines):
    m = _FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    fence, lang = m.group(2), m.group(3).lower()
    j = i + 1
    while j < len(lines) and not lines[j].strip().startswith(fence):
      j += 1
    if lang == "python":
      prev = i - 1
      while prev >= 0 and not lines[prev].strip():
        prev -= 1
      marker = _SKIP.search(lines[prev]) if prev >= 0 else None
      blocks.append(Block(path, i + 2, "\n".join(lines[i + 1:j]),
                          marker.group(1).strip() if marker else None))
    i = j + 1
  return blocks


def doc_files(root: str = ROOT) -> list[str]:
  docs = sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "docs", "*.md")))
  return ["README.md", *docs]


def run_file(path: str, out_json: str, root: str = ROOT) -> None:
  """Runs one file's blocks in order in one namespace; writes {line: result} to out_json."""
  results, namespace, failed = {}, {"__name__": "__doc__"}, None
  for block in python_blocks(path, root):
    if block.skip is not None:
      results[block.line] = {"status": "skipped", "reason": block.skip}
      continue
    if failed is not None:
      results[block.line] = {"status": "not run", "reason": f"block at line {failed} failed"}
      continue
    # Pad with newlines so tracebacks carry the Markdown file's line numbers.
    code = compile("\n" * (block.line - 1) + block.code, os.path.join(root, path), "exec")
    start = time.perf_counter()
    try:
      exec(code, namespace)  # noqa: S102  (the documentation is the code under test)
      results[block.line] = {"status": "ok", "seconds": time.perf_counter() - start}
    except BaseException:  # noqa: BLE001  (report everything, SystemExit included)
      failed = block.line
      results[block.line] = {"status": "failed", "reason": traceback.format_exc()}
    with open(out_json, "w") as f:   # after every block: a crash still leaves a record
      json.dump(results, f)
  with open(out_json, "w") as f:
    json.dump(results, f)


def _run_in_subprocess(path: str, root: str = ROOT, timeout: float = 600) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""),
                               "--xla_force_host_platform_device_count=8"]).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  env["MPLBACKEND"] = "Agg"
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "results.json")
    try:
      proc = subprocess.run([sys.executable, os.path.abspath(__file__), path, out, root],
                            check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
      returncode, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
      returncode = f"a timeout after {timeout} s"
      output = "".join(x.decode() if isinstance(x, bytes) else (x or "")
                       for x in (e.stdout, e.stderr))
    results = {}
    if os.path.exists(out):
      with open(out) as f:
        results = {int(k): v for k, v in json.load(f).items()}
  return {"results": results, "returncode": returncode, "output": output[-4000:]}


if __name__ == "__main__":
  run_file(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ROOT)
  sys.exit(0)


# Deliberately late: the subprocess runner above (run as a script) must not import pytest.
import pytest  # noqa: E402

_CACHE = {}


def _file_results(path: str) -> dict:
  if path not in _CACHE:
    _CACHE[path] = _run_in_subprocess(path)
  return _CACHE[path]


ALL_BLOCKS = [b for p in doc_files() for b in python_blocks(p)]


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=[b.id for b in ALL_BLOCKS])
def test_doc_block_runs(block):
  run = _file_results(block.path)
  result = run["results"].get(block.line)
  if result is None:
    pytest.fail(f"{block.id}: no result; the runner exited with {run['returncode']}:\n"
                f"{run['output']}")
  if result["status"] == "skipped":
    pytest.skip(f"{block.id}: doc-test skip marker: {result['reason']}")
  if result["status"] != "ok":
    pytest.fail(f"{block.id} {result['status']}:\n{result['reason']}", pytrace=False)


def test_skip_markers_are_the_listed_ones():
  """Skipped blocks are rare and explicit: each one is listed in SKIPPED with its reason."""
  skipped = {(b.path, b.line): b.skip for b in ALL_BLOCKS if b.skip is not None}
  print(f"{len(skipped)} of {len(ALL_BLOCKS)} documentation blocks are not run:")
  for (path, line), reason in sorted(skipped.items()):
    print(f"  {path}:L{line}: {reason}")
  assert skipped == SKIPPED


def test_runner_reports_a_broken_block(tmp_path):
  """The runner can fail: a raising block fails, the next is 'not run', skips are read."""
  (tmp_path / "doc.md").write_text(
      "# t\n\n```python\nx = 1\n```\n\ntext\n\n<!-- doc-test: skip (needs a TPU) -->\n"
      "```python\nraise RuntimeError('never run')\n```\n\n```python\nassert x == 1\n"
      "y = undefined_name\n```\n\n```bash\nexit 1\n```\n\n```python\nz = 2\n```\n")
  blocks = python_blocks("doc.md", str(tmp_path))
  assert [(b.line, b.skip) for b in blocks] == [(4, None), (11, "needs a TPU"), (15, None),
                                                 (24, None)]
  out = tmp_path / "r.json"
  subprocess.run([sys.executable, os.path.abspath(__file__), "doc.md", str(out),
                  str(tmp_path)], cwd=ROOT, check=True, timeout=60)
  results = {int(k): v for k, v in json.loads(out.read_text()).items()}
  assert results[4]["status"] == "ok"
  assert results[11] == {"status": "skipped", "reason": "needs a TPU"}
  assert results[15]["status"] == "failed"
  assert "NameError" in results[15]["reason"] and "line 16" in results[15]["reason"]
  assert results[24] == {"status": "not run", "reason": "block at line 15 failed"}


def test_readme_is_short():
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    n = len(f.read().splitlines())
  assert n <= 200, f"README.md has {n} lines; move details to docs/ (at most 200)"


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(md_path: str) -> set[str]:
  """GitHub's heading anchors of a Markdown file (outside code blocks)."""
  anchors, in_code = set(), False
  with open(md_path, encoding="utf-8") as f:
    for line in f:
      if _FENCE.match(line):
        in_code = not in_code
      elif not in_code and line.startswith("#"):
        title = line.lstrip("#").strip().lower()
        anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
  return anchors


@pytest.mark.parametrize("path", doc_files())
def test_links_stay_inside_the_repository(path):
  """Relative links resolve to files of this repository; nothing points outside it."""
  with open(os.path.join(ROOT, path), encoding="utf-8") as f:
    text = f.read()
  assert "shared/" not in text, f"{path} refers to a shared/ folder outside the repository"
  base = os.path.dirname(os.path.join(ROOT, path))
  bad, missing = [], []
  for target in _LINK.findall(text):
    if re.match(r"[a-z]+:", target):
      continue
    file, _, anchor = target.partition("#")
    resolved = os.path.normpath(os.path.join(base, file)) if file else os.path.join(ROOT, path)
    if os.path.relpath(resolved, ROOT).startswith(".."):
      bad.append(target)
    elif not os.path.exists(resolved) or (
        anchor and resolved.endswith(".md") and anchor not in _anchors(resolved)):
      missing.append(target)
  assert not bad, f"{path} links outside the repository: {bad}"
  assert not missing, f"{path} links to files or headings that do not exist: {missing}"
