"""attnjax.layers.linear: layers == hand-composed ops, registry, LM decoding, bad options."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from attnjax import models, variants
from attnjax.layers import linear as LL
from attnjax.layers import linear_linen as LLinen
from attnjax.ops import linear as L

TOL = dict(rtol=2e-5, atol=2e-5)
D, N, K = 32, 4, 2


def _x(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _proj(layer, x):
  p = layer.params_dict()
  q = jnp.einsum("btd,dnh->btnh", x, p["q_kernel"])
  k = jnp.einsum("btd,dkh->btkh", x, p["k_kernel"])
  v = jnp.einsum("btd,dkh->btkh", x, p["v_kernel"])
  return p, q, k, v


def _rms(o, scale):
  return o * jax.lax.rsqrt(jnp.mean(o * o, axis=-1, keepdims=True) + 1e-6) * scale


def _reference(name, opts, layer, x):
  """The op called by hand with the layer's projection weights."""
  p, q, k, v = _proj(layer, x)
  H = q.shape[-1]
  causal = opts.get("causal", False)
  if name == "linear":
    o = L.linear_attention(q, k, v, feature_map=opts.get("feature_map", "elu+1"), causal=causal)
  elif name == "lightning":
    decay = jnp.asarray(opts["decay"]) if "decay" in opts else jnp.asarray(LL.default_decay(N))
    o = _rms(L.lightning_attention(q * H ** -0.5, k, v, decay=decay), p["out_norm"])
  elif name == "retention":
    decay = jnp.exp(-jax.nn.softplus(p["decay_param"])) if opts.get("learnable_decay") \
        else jnp.asarray(LL.retention_decay(N))
    ld = None
    if opts.get("gate"):
      ld = jax.nn.log_sigmoid(jnp.einsum("btd,dn->btn", x, p["gate_kernel"])
                              + p["gate_bias"]) / 16.0
    o = _rms(L.decayed_linear_attention(q * H ** -0.5, k, v, decay=decay, log_decay=ld),
             p["out_norm"])
  elif name == "efficient":
    o = L.efficient_attention(q, k, v)
  elif name == "flow":
    o = L.flow_attention(q, k, v, causal=causal)
  elif name == "inline":
    o = L.inline_attention(q, k, v, causal=causal)
  else:
    dwc = {}
    if opts.get("dwc_size"):
      dwc = dict(dwc_kernel=p["dwc_kernel"], dwc_bias=p["dwc_bias"])
    o = L.focused_linear_attention(q, k, v, focusing_factor=opts.get("focusing_factor", 3.0),
                                   causal=causal, **dwc)
  return jnp.einsum("btnv,nvd->btd", o, p["o_kernel"])


CASES = [
    ("linear", {}), ("linear", {"causal": True, "feature_map": "relu"}),
    ("lightning", {}), ("lightning", {"decay": [0.9, 0.8, 0.7, 1.0]}),
    ("retention", {"gate": True, "learnable_decay": True}),
    ("efficient", {}), ("flow", {}), ("flow", {"causal": True}), ("inline", {}),
    ("inline", {"causal": True}),
    ("focused", {"dwc_size": 3}), ("focused", {"causal": True, "focusing_factor": 2.0}),
]


@pytest.mark.parametrize("name, opts", CASES)
def test_layer_equals_hand_composed_op(name, opts):
  layer = variants.build(name, d_model=D, num_heads=N, num_kv_heads=K, rngs=nnx.Rngs(1), **opts)
  assert isinstance(layer, LL.LinearAttention) and variants.info(name).kind == "sequence"
  x = _x((2, 11, D))
  ct = _x((2, 11, D), seed=1)

  graphdef, state = nnx.split(layer)

  @jax.jit
  def both(state, x, ct):  # one compile for layer and reference, forward and vjp
    lay = nnx.merge(graphdef, state)
    y, vjp = jax.vjp(lay, x)
    y_ref, vjp_ref = jax.vjp(lambda a: _reference(name, opts, lay, a), x)
    return y, y_ref, vjp(ct)[0], vjp_ref(ct)[0]

  y, y_ref, g, g_ref = both(state, x, ct)
  np.testing.assert_allclose(y, y_ref, **TOL)
  np.testing.assert_allclose(g, g_ref, **TOL)
  assert y.shape == (2, 11, D) and bool(jnp.all(jnp.isfinite(y)))
  # parameters carry logical sharding names of the MultiHeadAttention conventions
  for _, var in nnx.state(layer, nnx.Param).flat_state():
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var[...].ndim


@pytest.mark.parametrize("name, opts", [("lightning", {"learnable_decay": True}),
                                        ("retention", {"gate": True}),
                                        ("linear", {"causal": True}),
                                        ("inline", {"causal": True}),
                                        ("focused", {"causal": True}),
                                        ("flow", {"causal": True})])
def test_layer_prefill_then_recurrent_decode_equals_full(name, opts):
  layer = variants.build(name, d_model=D, num_heads=N, num_kv_heads=K, rngs=nnx.Rngs(2),
                         rope="1d", **opts)
  cache = _assert_decode_equals_full(layer, _x((2, 9, D), seed=3), prompt_len=4)
  assert int(cache["index"]) == 9


def _assert_decode_equals_full(module, x, prompt_len):
  """A prefill of `prompt_len` tokens (chunked form), then one token at a time (recurrent
  form), equals the full forward of `module` (a layer, or a model on token ids); returns the
  final cache. One helper for layers and models (the LM-level loop of tests/test_models.py
  is not imported: test modules do not import each other)."""
  graphdef, state = nnx.split(module)
  full = jax.jit(lambda s, a: nnx.merge(graphdef, s)(a))(state, x)
  run = jax.jit(lambda s, a, c: nnx.merge(graphdef, s)(a, cache=c))
  cache = module.init_cache(x.shape[0], 16)
  outs = []
  for lo, hi in [(0, prompt_len)] + [(t, t + 1) for t in range(prompt_len, x.shape[1])]:
    y, cache = run(state, x[:, lo:hi], cache)
    outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, **TOL)
  return cache


def _decode_matches_full_lm(cfg):
  model = models.build_model(cfg, rngs=nnx.Rngs(0))
  _assert_decode_equals_full(model, jax.random.randint(jax.random.key(0), (2, 12), 0, 64),
                             prompt_len=5)


@pytest.mark.parametrize("attention, extra", [
    ({"name": "lightning"}, {}),
    ({"name": "retention", "gate": True}, {"num_kv_heads": 2, "scan_layers": True}),
    pytest.param({"name": "linear"}, {}, marks=pytest.mark.slow),
    pytest.param({"name": "inline"}, {}, marks=pytest.mark.slow),
])
def test_lm_decode_with_linear_layers_equals_full_forward(attention, extra):
  cfg = models.default_config("lm")
  cfg.attention = ml_collections.ConfigDict(attention)
  for k, v in extra.items():
    setattr(cfg, k, v)
  _decode_matches_full_lm(cfg)


def test_lm_interleaved_linear_and_softmax_layers_decode():
  cfg = models.default_config("lm")
  cfg.layers_attention = [{"name": "lightning"}, {"name": "mha"}]
  _decode_matches_full_lm(cfg)


def test_registry_entries():
  for name in LL.MECHANISMS:
    entry = variants.info(name)
    assert entry.kind == "sequence"
    assert entry.supports_cache == (name != "efficient")
    assert isinstance(variants.get_linen(name)(d_model=D, num_heads=N), LLinen.LinearAttention)
  layer = variants.get("flow")(d_model=D, num_heads=N, num_kv_heads=None, head_dim=8,
                               rngs=nnx.Rngs(0))
  assert layer(_x((1, 3, 4, D))).shape == (1, 3, 4, D)  # grid input, flattened


@pytest.mark.parametrize("name, opts, match", [
    ("efficient", {"causal": True}, "causal"),
    ("lightning", {"causal": False}, "causal"),
    ("linear", {"feature_map": "softmax"}, "feature_map"),
    ("efficient", {"feature_map": "relu"}, "feature_map"),
    ("lightning", {"decay": 1.5}, "decay"),
    ("retention", {"decay": [0.9, 0.9]}, "decay"),
    ("linear", {"decay": 0.9}, "decay"),
    ("lightning", {"gate": True}, "gate"),
    ("focused", {"dwc_size": 4}, "dwc_size"),
    ("linear", {"dwc_size": 3}, "dwc_size"),
    ("focused", {"focusing_factor": 0.5}, "focusing_factor"),
    ("linear", {"chunk_size": 0}, "chunk_size"),
    ("linear", {"rope": "axial"}, "rope"),
    ("linear", {"num_kv_heads": 3}, "num_kv_heads"),
])
def test_bad_options_raise(name, opts, match):
  with pytest.raises(ValueError, match=match):
    variants.build(name, d_model=D, num_heads=N, rngs=nnx.Rngs(0), **opts)


def test_bad_calls_raise():
  with pytest.raises(TypeError, match="bogus"):
    variants.build("linear", d_model=D, num_heads=N, rngs=nnx.Rngs(0), bogus=1)
  enc = variants.build("efficient", d_model=D, num_heads=N, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="causal"):
    enc.init_cache(1, 8)
  lin = variants.build("linear", d_model=D, num_heads=N, rngs=nnx.Rngs(0), causal=True)
  with pytest.raises(ValueError, match="segment_ids"):
    lin(_x((1, 4, D)), segment_ids=jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match="d_model"):
    lin(_x((1, 4, D + 1)))
  with pytest.raises(ValueError, match="batch"):
    lin.init_cache(0, 8)
  foc = variants.build("focused", d_model=D, num_heads=N, rngs=nnx.Rngs(0), causal=True, dwc_size=2)
  with pytest.raises(ValueError, match="dwc_size"):
    foc.init_cache(1, 8)
  cfg = models.default_config("lm")
  cfg.attention = ml_collections.ConfigDict({"name": "efficient"})
  with pytest.raises(ValueError, match="non-causal"):
    models.build_model(cfg, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------ Linen twins


def _linen_twin(name, opts, seed=1):
  """(NNX layer, Linen layer, Linen variables holding the NNX layer's parameters)."""
  layer = variants.build(name, d_model=D, num_heads=N, num_kv_heads=K, rngs=nnx.Rngs(seed), **opts)
  twin = variants.get_linen(name)(d_model=D, num_heads=N, num_kv_heads=K, head_dim=None, **opts)
  boxed = jax.eval_shape(lambda: twin.init(jax.random.key(seed + 1), _x((1, 3, D))))["params"]
  nnx_params = {path[0]: var for path, var in nnx.state(layer, nnx.Param).flat_state()}
  assert sorted(boxed) == sorted(nnx_params)  # same parameter names ...
  for pname, box in boxed.items():
    var = nnx_params[pname]
    assert box.value.shape == var[...].shape and box.value.dtype == var[...].dtype  # ... shapes
    assert tuple(box.names) == tuple(var.get_metadata()["out_sharding"])  # ... logical names
  variables = {"params": {pname: var[...] for pname, var in nnx_params.items()}}
  return layer, twin, variables


@pytest.mark.parametrize("name, opts", CASES + [("retention", {"feature_map": "elu+1"}),
                                                ("lightning", {"use_bias": True})])
def test_linen_twin_equals_nnx_layer(name, opts):
  layer, twin, variables = _linen_twin(name, opts)
  x = _x((2, 11, D), seed=4)
  graphdef, state = nnx.split(layer)
  y_nnx, y_linen = jax.jit(lambda s, v, a: (nnx.merge(graphdef, s)(a), twin.apply(v, a)))(
      state, variables, x)
  np.testing.assert_array_equal(y_linen, y_nnx)  # same function on the same parameters


@pytest.mark.parametrize("name, opts", [("lightning", {"learnable_decay": True}),
                                        ("flow", {"causal": True})])
def test_linen_twin_decodes_like_nnx(name, opts):
  layer, twin, variables = _linen_twin(name, opts)
  x = _x((2, 6, D), seed=5)
  run = jax.jit(lambda v, a, c: twin.apply(v, a, cache=c))
  cache = twin.init_cache(2, 8)
  outs = []
  for lo, hi in [(0, 3), (3, 4), (4, 5), (5, 6)]:
    y, cache = run(variables, x[:, lo:hi], cache)
    outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), layer(x), **TOL)
  assert int(cache["index"]) == 6


def test_linen_twin_rejects_bad_options_at_construction():
  with pytest.raises(ValueError, match="decay"):
    variants.get_linen("lightning")(d_model=D, num_heads=N, decay=1.5)
  with pytest.raises(TypeError, match="bogus"):
    variants.get_linen("linear")(d_model=D, num_heads=N, bogus=1)
