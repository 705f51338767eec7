"""attnjax.variants: registry contents, round-trips, registration, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import variants
from attnjax.layers import MultiHeadAttention

REQUIRED = ["mha", "sliding_window", "chunked", "prefix_lm", "dual_triangle", "neighborhood", "swin",
            "grid", "axial", "criss_cross", "alibi", "softcap", "sinks", "relpos", "pma"]

OPTIONS = dict(sliding_window=dict(window=3), chunked=dict(chunk_size=4), prefix_lm=dict(prefix_len=3),
               neighborhood=dict(kernel=3), swin=dict(window=2), grid=dict(grid=2), pma=dict(num_seeds=2))


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
    variants._REGISTRY.pop(name, None)  # pylint: disable=protected-access
  assert name not in variants.names()


def test_register_validates_arguments():
  with pytest.raises(ValueError, match="kind must be one of"):
    variants.register("x_bad_kind", lambda **k: None, kind="image")
  with pytest.raises(ValueError, match="name must be a non-empty str"):
    variants.register("", lambda **k: None)
  with pytest.raises(TypeError, match="factory must be callable"):
    variants.register("x_not_callable", 3)
  assert "x_bad_kind" not in variants.names()
