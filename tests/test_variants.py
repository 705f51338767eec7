"""attnjax.variants: registry contents, round-trips, registration, errors."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import variants
from attnjax.layers import MultiHeadAttention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REQUIRED = ["mha", "sliding_window", "chunked", "prefix_lm", "dual_triangle", "neighborhood",
            "swin", "grid", "axial", "criss_cross", "alibi", "softcap", "sinks", "relpos", "pma"]

OPTIONS = dict(sliding_window=dict(window=3), chunked=dict(chunk_size=4),
               prefix_lm=dict(prefix_len=3), neighborhood=dict(kernel=3), swin=dict(window=2),
               grid=dict(grid=2), pma=dict(num_seeds=2))


def test_required_names_registered():
  assert set(REQUIRED) <= set(variants.names())
  assert variants.names() == sorted(variants.names())


@pytest.mark.parametrize("name", REQUIRED)
def test_every_builtin_builds_and_keeps_shapes(name):
  entry = variants.info(name)
  layer = variants.get(name)(d_model=16, num_heads=4, num_kv_heads=2, head_dim=8, rngs=nnx.Rngs(0),
                             **OPTIONS.get(name, {}))
  assert isinstance(layer, nnx.Module)
  if entry.kind == "pooling":
    x = jax.random.normal(jax.random.key(0), (2, 9, 16))
    assert layer(x).shape == (2, 2, 16)
    return
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 16))
  y = layer(x, deterministic=True)
  assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
  if entry.kind == "sequence":
    x1 = x.reshape(2, 16, 16)
    assert layer(x1).shape == x1.shape
  assert entry.supports_cache == hasattr(layer, "init_cache") or entry.kind != "sequence"


def test_unknown_name_lists_close_matches():
  with pytest.raises(ValueError, match=r"close matches: \['sliding_window'\]"):
    variants.get("sliding_windw")
  with pytest.raises(ValueError, match="registered"):
    variants.info("zzz")
  with pytest.raises(TypeError, match="bad options for attention variant 'swin'"):
    variants.build("swin", d_model=16, num_heads=2, rngs=nnx.Rngs(0), windw=2)


def test_register_decorator_round_trip_and_overwrite():
  name = "test_only_dense_causal"

  @variants.register(name, kind="sequence", supports_cache=True)
  def make(*, d_model, num_heads, num_kv_heads, head_dim, rngs, **options):
    return MultiHeadAttention(d_model, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                              causal=True, rngs=rngs, **options)

  try:
    assert name in variants.names()
    assert variants.get(name) is make
    assert variants.info(name).kind == "sequence"
    a = variants.build(name, d_model=16, num_heads=2, rngs=nnx.Rngs(0))
    b = variants.build("mha", d_model=16, num_heads=2, rngs=nnx.Rngs(0), causal=True)
    x = jax.random.normal(jax.random.key(1), (1, 6, 16))
    np.testing.assert_array_equal(a(x), b(x))
    with pytest.raises(ValueError, match="already registered"):
      variants.register(name, make)
    variants.register(name, make, overwrite=True)
    with pytest.raises(ValueError, match="has no Linen factory"):
      variants.get_linen(name)
  finally:
    variants.unregister(name)
  assert name not in variants.names()


def test_register_validates_arguments():
  with pytest.raises(ValueError, match="kind must be one of"):
    variants.register("x_bad_kind", lambda **k: None, kind="image")
  with pytest.raises(ValueError, match="name must be a non-empty str"):
    variants.register("", lambda **k: None)
  with pytest.raises(TypeError, match="factory must be callable"):
    variants.register("x_not_callable", 3)
  assert "x_bad_kind" not in variants.names()


# --------------------------------------------------------------------- registration


def test_every_builtin_family_is_registered_including_linear():
  linear = ["linear", "lightning", "retention", "efficient", "focused", "inline", "flow"]
  assert set(linear) <= set(variants.names())
  for name in linear:
    assert variants.info(name).kind == "sequence"
    assert variants.info(name).linen is not None
  assert variants.info("efficient").supports_cache is False
  assert variants.info("lightning").supports_cache is True


def test_importing_layers_registers_nothing_until_first_access():
  # A fresh interpreter: importing every layer module fills no registry; the first
  # access registers all built-ins from one place.
  code = (
      "import attnjax.layers, attnjax.layers.linear, attnjax.layers.linen\n"
      "from attnjax import variants\n"
      "assert variants._REGISTRY == {}, sorted(variants._REGISTRY)\n"
      "try:\n"  # a third party's first registration already sees the built-ins
      "  variants.register('swin', lambda **kw: None)\n"
      "except ValueError as e:\n"
      "  assert \"'swin' is already registered\" in str(e), e\n"
      "else:\n"
      "  raise AssertionError('built-in swin overwritten')\n"
      "variants.register('third_party_first', lambda **kw: None)\n"
      "names = variants.names()\n"
      "assert 'third_party_first' in names\n"
      "assert {'mha', 'swin', 'pma', 'lightning', 'flow'} <= set(names), names\n"
      "print('OK', len(names))\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith("OK ")


def test_builtin_registration_error_is_raised_not_hidden(monkeypatch):
  from attnjax.layers import linear as linear_layers
  saved = dict(variants._REGISTRY)  # pylint: disable=protected-access

  def broken(mechanism):
    raise ImportError(f"simulated bug while building the {mechanism!r} factory")

  monkeypatch.setattr(linear_layers, "make_factory", broken)
  monkeypatch.setattr(variants, "_BUILTINS_LOADED", False)
  variants._REGISTRY.clear()  # pylint: disable=protected-access
  try:
    with pytest.raises(ImportError, match="simulated bug"):
      variants.names()
    assert variants._REGISTRY == {}  # pylint: disable=protected-access
    with pytest.raises(ImportError, match="simulated bug"):  # raised again, not cached
      variants.get("mha")
  finally:
    monkeypatch.undo()
    variants._REGISTRY.clear()  # pylint: disable=protected-access
    variants._REGISTRY.update(saved)  # pylint: disable=protected-access
  assert "lightning" in variants.names()


def test_duplicate_registration_names_the_variant():
  def make(**kw):
    raise AssertionError("never built")

  for name in ("swin", "lightning", "pma"):  # built-ins are protected too
    with pytest.raises(ValueError, match=f"attention variant '{name}' is already registered"):
      variants.register(name, make)
    assert variants.get(name) is not make
  with pytest.raises(TypeError, match="linen must be callable"):
    variants.register("x_bad_linen", make, linen=3)
  with pytest.raises(ValueError, match="unknown attention variant name='x_never'"):
    variants.unregister("x_never")


def test_unknown_name_suggests_close_names_across_families():
  with pytest.raises(ValueError, match=r"close matches: \['lightning'") as info:
    variants.get("lightnin")
  assert "registered: [" in str(info.value)
  with pytest.raises(ValueError, match=r"close matches: none"):
    variants.get("qqqqqqqqqq")


class _ScaledAttention(nnx.Module):
  """A third-party variant: MultiHeadAttention times a learnable scalar (initialised to 1)."""

  def __init__(self, d_model, num_heads, *, num_kv_heads=None, head_dim=None, rngs, **options):
    self.inner = MultiHeadAttention(d_model, num_heads, num_kv_heads=num_kv_heads,
                                    head_dim=head_dim, rngs=rngs, **options)
    self.out_scale = nnx.Param(jnp.ones((), jnp.float32))

  def __call__(self, x, **call_options):
    return self.out_scale[...] * self.inner(x, **call_options)


def _make_scaled(*, d_model, num_heads, num_kv_heads, head_dim, rngs, **options):
  return _ScaledAttention(d_model, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                          rngs=rngs, **options)


def test_third_party_variant_through_get_and_model_config():
  from attnjax import models
  name = "test_only_scaled_mha"
  variants.register(name, _make_scaled, kind="sequence")
  try:
    # through variants.get: the scale multiplies the wrapped layer's output
    layer = variants.get(name)(d_model=16, num_heads=4, num_kv_heads=2, head_dim=None,
                               rngs=nnx.Rngs(3), causal=True)
    x = jax.random.normal(jax.random.key(5), (2, 7, 16))
    layer.out_scale[...] = jnp.float32(1.75)
    np.testing.assert_allclose(layer(x), 1.75 * layer.inner(x), rtol=1e-6, atol=1e-6)

    # through a model config by name: same parameters as 'mha' (the scale uses no rng), so
    # equal logits at scale 1; every block holds the custom layer; changing its scale
    # changes the logits.
    cfg = models.default_config("lm")
    cfg.attention = {"name": name}
    model = models.build_model(cfg, rngs=nnx.Rngs(0))
    ref_cfg = models.default_config("lm")
    ref_cfg.attention = {"name": "mha"}
    ref = models.build_model(ref_cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
    scaled = [node for _, node in nnx.iter_graph(model) if isinstance(node, _ScaledAttention)]
    assert len(scaled) == cfg.num_layers
    np.testing.assert_allclose(model(tokens), ref(tokens), rtol=1e-6, atol=1e-6)
    for node in scaled:
      node.out_scale[...] = jnp.float32(2.0)
    assert float(jnp.max(jnp.abs(model(tokens) - ref(tokens)))) > 1e-3
  finally:
    variants.unregister(name)
  assert name not in variants.names()
  with pytest.raises(ValueError, match="unknown attention variant"):
    variants.get(name)


def _docs_example(marker):
  text = open(os.path.join(ROOT, "docs", "layers.md"), encoding="utf-8").read()
  after = text[text.index(marker):]
  start = after.index("```python\n") + len("```python\n")
  return after[start:after.index("```", start)]


def test_docs_register_example():

  code = _docs_example("<!-- example: register")
  ns = {}
  try:
    exec(compile(code, "docs/layers.md", "exec"), ns)  # pylint: disable=exec-used
    assert ns["y"].shape == (2, 16, 64) and bool(jnp.all(jnp.isfinite(ns["y"])))
    assert ns["logits"].shape == (2, 8, 64)
    layer = ns["layer"]
    x = jax.random.normal(jax.random.key(0), (2, 16, 64))
    np.testing.assert_allclose(ns["y"], layer.inner(x), rtol=1e-6, atol=1e-6)
    assert variants.get("scaled_mha") is ns["make_scaled_mha"]
  finally:
    if "scaled_mha" in variants.names():
      variants.unregister("scaled_mha")
