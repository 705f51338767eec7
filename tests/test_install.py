"""Packaging and the public surface.

- The core install (`pip install attnjax`, no extras) into a fresh virtual environment is
  enough for `attnjax.attention`, `attnjax.layers` and `attnjax.variants`, and installs
  none of the training stack.
- Every name docs/api.md lists resolves, and every name in the `__all__` of a public module
  is listed there.
"""

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Installed only by the [train] extra (flax itself brings optax and orbax-checkpoint, and
# orbax brings absl-py, so those three are present with the core install).
TRAIN_ONLY = ("tensorflow_datasets", "grain", "array_record", "ml_collections", "chex",
              "matplotlib", "sklearn", "tensorboardX")
# Installed with the core (through flax) but never imported by the core modules.
NOT_IMPORTED = TRAIN_ONLY + ("orbax",)

_CORE_SCRIPT = textwrap.dedent("""
    import importlib.util, json, os, sys
    import attnjax
    assert not attnjax.__file__.startswith({root!r}), attnjax.__file__  # the installed copy
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from attnjax import layers, masks, variants

    ks = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(ks[0], (2, 24, 4, 8))
    k = jax.random.normal(ks[1], (2, 24, 2, 8))
    v = jax.random.normal(ks[2], (2, 24, 2, 8))
    out = attnjax.attention(q, k, v, mask=masks.sliding_window(5) & masks.causal())
    ref = attnjax.reference_attention(q, k, v, mask=masks.sliding_window(5) & masks.causal())
    attn_err = float(jnp.max(jnp.abs(out - ref)))

    x = jax.random.normal(ks[3], (2, 10, 32))
    mha = layers.MultiHeadAttention(32, 4, num_kv_heads=2, causal=True, rngs=nnx.Rngs(0))
    y = mha(x)
    x2 = x.at[:, -1].add(1.0)  # causal: earlier outputs do not see the last token
    causal_err = float(jnp.max(jnp.abs(mha(x2)[:, :-1] - y[:, :-1])))
    last_changed = float(jnp.max(jnp.abs(mha(x2)[:, -1] - y[:, -1])))

    lin = layers.LinearAttention(32, 4, mechanism="lightning", rngs=nnx.Rngs(1))
    by_name = variants.build("sliding_window", d_model=32, num_heads=4, rngs=nnx.Rngs(2),
                             window=3)
    lightning = variants.build("lightning", d_model=32, num_heads=4, rngs=nnx.Rngs(1))
    lin_err = float(jnp.max(jnp.abs(lin(x) - lightning(x))))
    shapes = [list(lin(x).shape), list(by_name(x).shape)]
    finite = bool(jnp.all(jnp.isfinite(y)) & jnp.all(jnp.isfinite(by_name(x))))

    import attnjax.models, attnjax.parallel  # import without the training stack
    installed = [m for m in {train_only!r} if importlib.util.find_spec(m) is not None]
    imported = sorted(m for m in sys.modules if m.split(".")[0] in {not_imported!r})
    print("RESULT " + json.dumps(dict(
        jax=jax.__version__, attn_err=attn_err, causal_err=causal_err,
        last_changed=last_changed, lin_err=lin_err, y_shape=list(y.shape), shapes=shapes,
        finite=finite, names=len(variants.names()), installed=installed, imported=imported)))
""")


def _run(cmd, **kw):
  proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
  assert proc.returncode == 0, (cmd, proc.stdout[-3000:], proc.stderr[-3000:])
  return proc.stdout


def test_core_install_in_fresh_venv_runs_layers_without_training_stack(tmp_path):
  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", str(venv)], timeout=300)
  py = str(venv / "bin" / "python")
  # The core install only (no extras), at the versions CI pins, from a copy of the tree so
  # the build leaves nothing in the checkout.
  src = tmp_path / "src"
  shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
      ".git", ".venv*", ".ci-cache", "build", "dist", "*.egg-info", "__pycache__", "runs",
      "workdir*", "bench_results", ".hypothesis", ".pytest_cache"))
  _run([py, "-m", "pip", "install", "-q", str(src), "-c", os.path.join(ROOT, "constraints.txt")],
       timeout=900, cwd=str(tmp_path))
  script = _CORE_SCRIPT.format(root=ROOT, train_only=TRAIN_ONLY, not_imported=NOT_IMPORTED)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["JAX_PLATFORMS"] = "cpu"
  out = _run([py, "-c", script], timeout=600, cwd=str(tmp_path), env=env)
  res = json.loads([l for l in out.splitlines() if l.startswith("RESULT ")][-1][7:])
  assert res["jax"] == "0.10.2", res
  assert res["attn_err"] < 1e-5, res
  assert res["causal_err"] < 1e-6 and res["last_changed"] > 1e-3, res
  assert res["lin_err"] == 0.0, res  # same rngs: the registry builds the same layer
  assert res["y_shape"] == [2, 10, 32] and res["shapes"] == [[2, 10, 32], [2, 10, 32]], res
  assert res["finite"], res
  assert res["names"] >= 22, res
  assert res["installed"] == [], res
  assert res["imported"] == [], res


# ------------------------------------------------------------------------- the public API

_API_LINE = re.compile(r"^- `(attnjax(?:\.\w+)*)`", re.M)


def _documented():
  with open(os.path.join(ROOT, "docs", "api.md"), encoding="utf-8") as f:
    return _API_LINE.findall(f.read())


def _resolve(dotted):
  parts = dotted.split(".")
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except ModuleNotFoundError as e:
      if e.name is not None and not dotted.startswith(e.name):
        raise  # a real missing dependency, not "this is an attribute"
      continue
    for attr in parts[i:]:
      obj = getattr(obj, attr)
    return obj
  raise ImportError(dotted)


def test_every_documented_name_resolves():
  names = _documented()
  assert len(names) > 150 and len(set(names)) == len(names), len(names)
  missing = []
  for name in names:
    try:
      _resolve(name)
    except (ImportError, AttributeError) as e:
      missing.append(f"{name}: {e!r}")
  assert not missing, missing


@pytest.mark.parametrize("module", [
    "attnjax", "attnjax.masks", "attnjax.score_mods", "attnjax.ops", "attnjax.ops.dense",
    "attnjax.ops.chunked", "attnjax.ops.positional", "attnjax.layers", "attnjax.layers.linen",
    "attnjax.layers.linear_linen", "attnjax.variants", "attnjax.kernels.tpu",
    "attnjax.kernels.gpu", "attnjax.parallel", "attnjax.models", "attnjax.data",
    "attnjax.analysis", "attnjax.ops.linear", "attnjax.ops.routing", "attnjax.ops.pooling",
    "attnjax.ops.heads", "attnjax.core.hooks"])
def test_public_all_is_documented(module):
  documented = set(_documented())
  mod = importlib.import_module(module)
  undocumented = [n for n in mod.__all__ if f"{module}.{n}" not in documented]
  assert not undocumented, undocumented


def test_lazy_surface():
  code = textwrap.dedent("""
      import sys
      import attnjax
      assert not any(m.startswith("attnjax.kernels") for m in sys.modules)
      assert attnjax.ops.linear.lightning_attention is not None  # attribute access imports
      assert attnjax.TpuBlockSizes is attnjax.kernels.tpu.BlockSizes
      assert attnjax.GpuBlockSizes is attnjax.kernels.gpu.BlockSizes
      assert attnjax.layers.LinearAttention is attnjax.layers.linear.LinearAttention
      assert attnjax.layers.linen.MultiHeadAttention is not None
      for sub in attnjax.layers._LAZY_SUBMODULES:  # every listed submodule is reachable
        assert getattr(attnjax.layers, sub).__name__ == f"attnjax.layers.{sub}", sub
      for bad in ("nope", "TPUBlockSizes"):
        try:
          getattr(attnjax, bad)
        except AttributeError as e:
          assert repr(bad) in str(e), e
        else:
          raise AssertionError(bad)
      try:
        attnjax.ops.nope
      except AttributeError as e:
        assert "'nope'" in str(e)
      else:
        raise AssertionError("attnjax.ops.nope")
      print("OK")
  """)
  out = _run([sys.executable, "-c", code], cwd=ROOT, timeout=300)
  assert out.strip().endswith("OK")
