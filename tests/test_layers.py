"""attnjax.layers: NNX attention layers vs plain references, masks, cache, Linen twins, errors."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnjax
from attnjax import masks, variants
from attnjax.layers import MLP, MaskSpec, MultiHeadAttention, PoolingAttention, RMSNorm
from attnjax.layers import linen as ajl
from attnjax.ops import positional

TOL = dict(rtol=2e-5, atol=2e-5)
ALLOWED_AXES = {"embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "patch", "classes", None}


def _x(shape, seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, dtype)


def _params(layer):
  return nnx.state(layer, nnx.Param).to_pure_dict()


def _functional(layer):
  """`apply(params_pure_dict, *args, **kw)`: the layer as a pure function of its params."""
  graphdef, pstate, rest = nnx.split(layer, nnx.Param, ...)

  def apply(p, *args, **kw):
    st = jax.tree.map(lambda a: a, pstate)
    nnx.replace_by_pure_dict(st, p)
    return nnx.merge(graphdef, st, rest)(*args, **kw)

  return apply


def _ref_self_attention(p, x, *, num_heads, num_kv_heads, mask=None, rope=False, qk_norm=False,
                        sinks=False, segment_ids=None):
  """Independent reference: einsum projections + positional.apply_rope + reference_attention."""
  q = jnp.einsum("btd,dnh->btnh", x, p["q_kernel"])
  k = jnp.einsum("btd,dkh->btkh", x, p["k_kernel"])
  v = jnp.einsum("btd,dkh->btkh", x, p["v_kernel"])
  if qk_norm:
    rms = lambda a, s: a / jnp.sqrt(jnp.mean(a * a, -1, keepdims=True) + 1e-6) * s
    q, k = rms(q, p["q_norm"]), rms(k, p["k_norm"])
  if rope:
    pos = jnp.arange(x.shape[1])
    q, k = positional.apply_rope(q, pos), positional.apply_rope(k, pos)
  o = attnjax.reference_attention(q, k, v, mask=mask, sinks=p["sinks"] if sinks else None,
                                  q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
  return jnp.einsum("btnh,nhd->btd", o, p["o_kernel"])


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("extras", [dict(), dict(rope="1d", qk_norm=True, sinks=True)])
def test_self_attention_matches_reference_fwd_and_vjp(num_kv_heads, extras):
  layer = MultiHeadAttention(32, 4, num_kv_heads=num_kv_heads, causal=True, rngs=nnx.Rngs(1),
                             **extras)
  if extras.get("sinks"):
    layer.sinks[...] = _x((4,), 7)
  if extras.get("qk_norm"):
    layer.q_norm[...] = 1.0 + 0.1 * _x((8,), 8)
  p = _params(layer)
  x = _x((2, 12, 32))
  seg = jnp.array([[0] * 5 + [1] * 7, [0] * 12])
  ref = lambda p, x: _ref_self_attention(p, x, num_heads=4, num_kv_heads=num_kv_heads,
                                         mask=masks.causal(), rope=bool(extras),
                                         qk_norm=bool(extras), sinks=bool(extras),
                                         segment_ids=seg)
  apply = _functional(layer)
  run = lambda p, x: apply(p, x, segment_ids=seg)

  # Both sides jitted: eagerly every primitive of the forward and the vjp compiles separately.
  y, vjp = jax.vjp(jax.jit(run), p, x)
  y_ref, vjp_ref = jax.vjp(jax.jit(ref), p, x)
  np.testing.assert_allclose(y, y_ref, **TOL)
  ct = _x(y.shape, 3)
  (gp, gx), (gp_ref, gx_ref) = vjp(ct), vjp_ref(ct)
  np.testing.assert_allclose(gx, gx_ref, **TOL)
  for name in gp_ref:
    np.testing.assert_allclose(gp[name], gp_ref[name], err_msg=name, **TOL)


def test_cross_attention_matches_reference():
  layer = MultiHeadAttention(32, 4, kv_features=16, out_features=24, use_bias=True,
                             rngs=nnx.Rngs(0))
  layer.q_bias[...] = _x((4, 8), 5)
  x, c = _x((2, 5, 32)), _x((2, 9, 16), 1)
  y = layer(x, c)
  p = _params(layer)
  q = jnp.einsum("btd,dnh->btnh", x, p["q_kernel"]) + p["q_bias"]
  k = jnp.einsum("bsd,dkh->bskh", c, p["k_kernel"]) + p["k_bias"]
  v = jnp.einsum("bsd,dkh->bskh", c, p["v_kernel"]) + p["v_bias"]
  ref = (jnp.einsum("btnh,nhd->btd", attnjax.reference_attention(q, k, v), p["o_kernel"])
         + p["o_bias"])
  assert y.shape == (2, 5, 24)
  np.testing.assert_allclose(y, ref, **TOL)


def test_bf16_close_to_f32():
  layer = MultiHeadAttention(32, 4, causal=True, rope="1d", rngs=nnx.Rngs(0))
  x = _x((2, 16, 32))
  y32 = layer(x)
  y16 = layer(x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(y16.astype(jnp.float32), y32, rtol=5e-2, atol=5e-2)


def _dependency(layer, x):
  """[T, T] bool: does output token i depend on input token j (any feature)?"""
  B = x.shape[0]
  shape = x.shape
  flat = x.reshape(B, -1, shape[-1])
  T = flat.shape[1]

  def f(xf):
    return layer(xf.reshape(shape)).reshape(B, T, -1)[0].sum(-1)

  jac = jax.jit(jax.jacrev(f))(flat)  # [T, B, T, D]; jitted: not op by op
  return np.asarray(jnp.abs(jac[:, 0]).sum(-1) > 0)


SPATIAL_CASES = [
    ("neighborhood", dict(kernel=3), lambda g: masks.neighborhood(g, 3)),
    ("neighborhood", dict(kernel=3, dilation=2, relpos=True),
     lambda g: masks.neighborhood(g, 3, 2)),
    ("swin", dict(window=2), lambda g: masks.window(g, 2)),
    ("swin", dict(window=2, shift=1), lambda g: masks.window(g, 2, 1)),
    ("grid", dict(grid=3), lambda g: masks.grid(g, 3)),
    ("axial", dict(axis=1), lambda g: masks.axial(g, 1)),
    ("axial", dict(), lambda g: masks.axial(g, 0) | masks.axial(g, 1)),
    ("criss_cross", dict(), lambda g: masks.criss_cross(g)),
]


@pytest.mark.parametrize("name, options, mask_fn", SPATIAL_CASES)
def test_spatial_variant_dependency_pattern(name, options, mask_fn):
  grid = (6, 6)
  layer = variants.build(name, d_model=16, num_heads=2, rngs=nnx.Rngs(0), **options)
  x = _x((1,) + grid + (16,))
  assert layer(x).shape == x.shape
  dep = _dependency(layer, x)
  allowed = np.asarray(mask_fn(grid).to_array(36, 36))[0, 0]
  np.testing.assert_array_equal(dep, allowed | np.eye(36, dtype=bool))


SEQ_CASES = [
    ("mha", dict(causal=True), masks.causal()),
    ("sliding_window", dict(window=2), masks.sliding_window(2)),
    ("chunked", dict(chunk_size=4, causal=True), masks.chunked(4) & masks.causal()),
    ("prefix_lm", dict(prefix_len=3), masks.prefix_lm(3)),
    ("neighborhood", dict(kernel=5), masks.neighborhood((12,), 5)),
    ("sinks", dict(window=3, causal=True), masks.sliding_window(3)),
]


@pytest.mark.parametrize("name, options, mask", SEQ_CASES)
def test_sequence_variant_dependency_pattern(name, options, mask):
  layer = variants.build(name, d_model=16, num_heads=2, rngs=nnx.Rngs(0), **options)
  if name == "sinks":
    layer.sinks[...] = _x((2,), 4)
  x = _x((1, 12, 16))
  dep = _dependency(layer, x)
  np.testing.assert_array_equal(dep,
                                np.asarray(mask.to_array(12, 12))[0, 0] | np.eye(12, dtype=bool))


def test_dual_triangle_heads_split():
  # with one head per direction and zero output weights on the other head, token i sees
  # only j <= i (head 0) or only j >= i (head 1).
  for keep, expect in ((0, np.tril), (1, np.triu)):
    layer = variants.build("dual_triangle", d_model=16, num_heads=2, rngs=nnx.Rngs(0))
    layer.o_kernel[...] = layer.o_kernel[...].at[1 - keep].set(0.0)
    dep = _dependency(layer, _x((1, 8, 16)))
    np.testing.assert_array_equal(dep, expect(np.ones((8, 8), bool)))


def test_score_mod_variants_match_reference():
  x = _x((2, 10, 16))
  for name, opts, mod in [
      ("alibi", dict(causal=True),
       lambda p: attnjax.score_mods.alibi(attnjax.score_mods.alibi_slopes(2), symmetric=True)),
      ("relpos", dict(max_distance=3),
       lambda p: attnjax.score_mods.relative_position_bias(p["relpos_table"], max_distance=3)),
      ("softcap", dict(cap=2.0), None),
  ]:
    layer = variants.build(name, d_model=16, num_heads=2, rngs=nnx.Rngs(0), **opts)
    if name == "relpos":
      layer.relpos_table[...] = _x(layer.relpos_table.shape, 9)
    p = _params(layer)
    q = jnp.einsum("btd,dnh->btnh", x, p["q_kernel"])
    k = jnp.einsum("btd,dkh->btkh", x, p["k_kernel"])
    v = jnp.einsum("btd,dkh->btkh", x, p["v_kernel"])
    o = attnjax.reference_attention(q, k, v, mask=masks.causal() if opts.get("causal") else None,
                                    score_mod=mod(p) if mod else None,
                                    softcap=opts.get("cap"))
    np.testing.assert_allclose(layer(x), jnp.einsum("btnh,nhd->btd", o, p["o_kernel"]),
                               err_msg=name, **TOL)


def test_swin_relpos_matches_table_reference():
  layer = variants.build("swin", d_model=16, num_heads=2, rngs=nnx.Rngs(0), window=2, shift=1)
  layer.relpos_table[...] = _x(layer.relpos_table.shape, 2)
  p = _params(layer)
  x = _x((1, 4, 4, 16))
  xf = x.reshape(1, 16, 16)
  coords = positional.grid_coordinates((4, 4))
  idx = positional.relative_position_index(coords[:, None], coords[None], (1, 1))
  bias = p["relpos_table"][:, idx][None]  # [1, N, T, S]
  q = jnp.einsum("btd,dnh->btnh", xf, p["q_kernel"])
  k = jnp.einsum("btd,dkh->btkh", xf, p["k_kernel"])
  v = jnp.einsum("btd,dkh->btkh", xf, p["v_kernel"])
  o = attnjax.reference_attention(q, k, v, mask=masks.window((4, 4), 2, 1), bias=bias)
  np.testing.assert_allclose(layer(x).reshape(1, 16, 16),
                             jnp.einsum("btnh,nhd->btd", o, p["o_kernel"]), **TOL)


def test_axial_rope_on_grid_matches_reference():
  layer = MultiHeadAttention(16, 2, rope="axial", rngs=nnx.Rngs(0))
  p = _params(layer)
  x = _x((2, 3, 4, 16))
  xf = x.reshape(2, 12, 16)
  coords = jnp.asarray(positional.grid_coordinates((3, 4)))
  q = positional.apply_rope_axial(jnp.einsum("btd,dnh->btnh", xf, p["q_kernel"]), coords)
  k = positional.apply_rope_axial(jnp.einsum("btd,dkh->btkh", xf, p["k_kernel"]), coords)
  v = jnp.einsum("btd,dkh->btkh", xf, p["v_kernel"])
  o = attnjax.reference_attention(q, k, v)
  np.testing.assert_allclose(layer(x).reshape(2, 12, 16),
                             jnp.einsum("btnh,nhd->btd", o, p["o_kernel"]), **TOL)
  mixed = MultiHeadAttention(16, 2, rope="mixed", rngs=nnx.Rngs(0))
  assert mixed.rope_freqs.shape == (2, 4, 2)
  assert mixed(x).shape == x.shape


@pytest.mark.parametrize("name, options", [
    ("mha", dict(causal=True, num_kv_heads=2, rope="1d", qk_norm=True)),
    ("sliding_window", dict(window=3, causal=True)),
    ("chunked", dict(chunk_size=4, causal=True)),
    ("prefix_lm", dict(prefix_len=4)),
    pytest.param("alibi", dict(causal=True), marks=pytest.mark.slow),
    pytest.param("relpos", dict(max_distance=3, causal=True), marks=pytest.mark.slow),
    ("sinks", dict(window=4, causal=True)),
    pytest.param("softcap", dict(cap=3.0, causal=True, rope="1d"), marks=pytest.mark.slow),
])
def test_kv_cache_prefill_and_steps_equal_full(name, options):
  layer = variants.build(name, d_model=16, num_heads=4, rngs=nnx.Rngs(0), **options)
  if "sinks" in _params(layer):
    layer.sinks[...] = _x((4,), 3)
  x = _x((2, 11, 16))
  seg = jnp.array([[0] * 6 + [1] * 5, [0] * 11])
  full = layer(x, segment_ids=seg)
  cache = layer.init_cache(2, 16)
  outs = []
  y, cache = layer(x[:, :5], segment_ids=seg[:, :5], cache=cache)
  outs.append(y)
  step = jax.jit(lambda a, s, c: layer(a, segment_ids=s, cache=c))   # compiled once
  for t in range(5, 11):
    y, cache = step(x[:, t:t + 1], seg[:, t:t + 1], cache)
    outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, **TOL)
  assert int(cache.index) == 11


# Variants whose twin test runs by default (one per kind and family); the other twins
# run under `-m slow` (the whole set took 161 s eagerly on the 2-core CI machine).
_TWINS_DEFAULT = ("mha", "sinks", "neighborhood", "swin", "pma", "linear")


@pytest.mark.parametrize("name", [
    n if n in _TWINS_DEFAULT else pytest.param(n, marks=pytest.mark.slow)
    for n in variants.names() if variants.info(n).linen is not None])
def test_nnx_and_linen_twins_are_identical_for_every_variant(name):
  opts = dict(sliding_window=dict(window=3), chunked=dict(chunk_size=4),
              prefix_lm=dict(prefix_len=3), neighborhood=dict(kernel=3, relpos=True),
              swin=dict(window=2, shift=1), grid=dict(grid=2), pma=dict(num_seeds=2),
              sinks=dict(window=5), relpos=dict(max_distance=4),
              mha=dict(qk_norm=True, rope="axial", num_kv_heads=2, use_bias=True))
  x = _x((2, 4, 4, 16))
  o = opts.get(name, {})
  m = variants.build(name, d_model=16, num_heads=4, rngs=nnx.Rngs(0), **o)
  inp = x.reshape(2, 16, 16) if variants.info(name).kind == "pooling" else x
  # non-trivial biases/sinks/tables
  params = jax.tree.map(lambda a: a + 0.1 * _x(a.shape, 11), _params(m))
  nnx.update(m, params)
  lm = variants.get_linen(name)(d_model=16, num_heads=4, **o)
  linen_params = jax.eval_shape(lambda: lm.init(jax.random.key(0), inp))["params"]
  assert jax.tree.structure(nn.unbox(linen_params)) == jax.tree.structure(params), name
  assert jax.tree.map(jnp.shape, nn.unbox(linen_params)) == jax.tree.map(jnp.shape, params), name
  ct = _x(m(inp).shape, 5)
  # both jitted (one compilation each, not op by op); the twins stay bit-identical
  y, vjp = jax.vjp(jax.jit(lambda a: m(a)), inp)
  y2, vjp2 = jax.vjp(jax.jit(lambda a: lm.apply({"params": params}, a)), inp)
  np.testing.assert_array_equal(y, y2, err_msg=name)
  np.testing.assert_array_equal(vjp(ct)[0], vjp2(ct)[0], err_msg=name)


def test_linen_cache_and_small_blocks_twins():
  lm = ajl.MultiHeadAttention(d_model=16, num_heads=2, causal=True, rope="1d")
  x = _x((1, 6, 16))
  v = lm.init(jax.random.key(0), x)
  cache = lm.init_cache(1, 8)
  y1, cache = lm.apply(v, x[:, :4], cache=cache)
  y2, cache = lm.apply(v, x[:, 4:], cache=cache)
  np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), lm.apply(v, x), **TOL)
  for nnx_m, linen_m in [(RMSNorm(16, rngs=nnx.Rngs(0)), ajl.RMSNorm(16)),
                         (MLP(16, 32, rngs=nnx.Rngs(0)), ajl.MLP(16, 32)),
                         (MLP(16, 32, gated=False, activation="gelu", rngs=nnx.Rngs(0)),
                          ajl.MLP(16, 32, gated=False, activation="gelu"))]:
    p = jax.tree.map(lambda a: a + 0.1 * _x(a.shape, 4), _params(nnx_m))
    nnx.update(nnx_m, p)
    np.testing.assert_array_equal(nnx_m(x), linen_m.apply({"params": p}, x))


def test_rms_norm_and_mlp_reference():
  x = _x((2, 3, 16))
  norm = RMSNorm(16, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(norm(x), x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6),
                             **TOL)
  mlp = MLP(16, 32, rngs=nnx.Rngs(0))
  p = _params(mlp)
  ref = (jax.nn.silu(x @ p["wg"]) * (x @ p["wi"])) @ p["wo"]
  np.testing.assert_allclose(mlp(x), ref, **TOL)


def test_pooling_attention_permutation_invariant_and_padding():
  layer = PoolingAttention(16, 2, num_seeds=3, rngs=nnx.Rngs(0))
  x = _x((2, 7, 16))
  y = layer(x)
  assert y.shape == (2, 3, 16)
  perm = jax.random.permutation(jax.random.key(1), 7)
  np.testing.assert_allclose(layer(x[:, perm]), y, **TOL)
  seg = jnp.array([[0] * 5 + [-1] * 2] * 2)
  np.testing.assert_allclose(layer(x, segment_ids=seg), layer(x[:, :5]), **TOL)


def test_dropout_only_in_training():
  layer = MultiHeadAttention(16, 2, dropout_rate=0.5, rngs=nnx.Rngs(0, dropout=1))
  ref = MultiHeadAttention(16, 2, rngs=nnx.Rngs(0))
  x = _x((2, 5, 16))
  np.testing.assert_array_equal(layer(x), ref(x))
  yt = layer(x, deterministic=False)
  zeros = jnp.mean(yt == 0)
  assert 0.3 < float(zeros) < 0.7
  np.testing.assert_allclose(jnp.where(yt == 0, 0, ref(x) * 2), yt, **TOL)


def test_params_carry_logical_axis_names():
  layer = MultiHeadAttention(16, 4, num_kv_heads=2, use_bias=True, qk_norm=True, sinks=True,
                             relpos_max_distance=(2, 2), rope="mixed", rngs=nnx.Rngs(0))
  for path, var in nnx.state(layer, nnx.Param).flat_state():
    names = var.get_metadata()["out_sharding"]
    assert len(names) == var[...].ndim and set(names) <= ALLOWED_AXES, path
  assert layer.k_kernel.get_metadata()["out_sharding"] == ("embed", "kv_heads", "head_dim")


def test_mask_spec_and_explicit_mask_equivalent():
  a = MultiHeadAttention(16, 2, mask=MaskSpec("neighborhood", kernel=3), rngs=nnx.Rngs(0))
  b = MultiHeadAttention(16, 2, mask=masks.neighborhood((4, 4), 3), rngs=nnx.Rngs(0))
  c = MultiHeadAttention(16, 2, mask=lambda g, n: masks.neighborhood(g, 3), rngs=nnx.Rngs(0))
  x = _x((2, 4, 4, 16))
  np.testing.assert_array_equal(a(x), b(x))
  np.testing.assert_array_equal(a(x), c(x))


def test_implementation_option_is_forwarded():
  x = _x((2, 8, 16))
  base = MultiHeadAttention(16, 2, causal=True, rngs=nnx.Rngs(0))
  for impl in ("reference", "xla", "xla_chunked"):
    other = MultiHeadAttention(16, 2, causal=True, implementation=impl, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(other(x), base(x), err_msg=impl, **TOL)
  bad = MultiHeadAttention(16, 2, implementation="no_such_impl", rngs=nnx.Rngs(0))
  with pytest.raises((ValueError, NotImplementedError)):
    bad(x)


@pytest.mark.parametrize("make, match", [
    (lambda: MultiHeadAttention(16, 3, rngs=nnx.Rngs(0)), "d_model must be divisible"),
    (lambda: MultiHeadAttention(16, 4, num_kv_heads=3, rngs=nnx.Rngs(0)), "multiple of "
                                                                          "num_kv_heads"),
    (lambda: MultiHeadAttention(16, 2, rope="2dd", rngs=nnx.Rngs(0)), "rope must be one of"),
    (lambda: MultiHeadAttention(16, 2, head_dim=7, rope="1d", rngs=nnx.Rngs(0)), "even head_dim"),
    (lambda: MultiHeadAttention(16, 2, softcap=-1.0, rngs=nnx.Rngs(0)), "softcap"),
    (lambda: MultiHeadAttention(16, 2, dropout_rate=1.0, rngs=nnx.Rngs(0)), "dropout_rate"),
    (lambda: MultiHeadAttention(16, 2, relpos_max_distance=-1, rngs=nnx.Rngs(0)),
     "relpos_max_distance"),
    (lambda: MultiHeadAttention(0, 2, rngs=nnx.Rngs(0)), "d_model"),
    (lambda: MaskSpec("neighbourhood", kernel=3), "close"),
    (lambda: variants.build("swin", d_model=16, num_heads=2, rngs=nnx.Rngs(0), window=2,
                            causal=True), "causal"),
])
def test_bad_construction(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_bad_calls():
  layer = MultiHeadAttention(16, 2, causal=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="rank >= 3"):
    layer(_x((5, 16)))
  with pytest.raises(ValueError, match="d_model=16"):
    layer(_x((1, 5, 8)))
  with pytest.raises(ValueError, match="segment_ids must be"):
    layer(_x((1, 5, 16)), segment_ids=jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match="rope=None"):
    layer(_x((1, 5, 16)), positions=jnp.zeros((1, 5), jnp.int32))
  with pytest.raises(ValueError, match="1D inputs"):
    layer(_x((1, 2, 2, 16)), cache=layer.init_cache(1, 8))
  with pytest.raises(ValueError, match="only supported for self-attention"):
    layer(_x((1, 2, 16)), _x((1, 3, 16)), cache=layer.init_cache(1, 8))
  with pytest.raises(ValueError, match="both segment_ids and context_segment_ids"):
    layer(_x((1, 2, 16)), _x((1, 3, 16)), segment_ids=jnp.zeros((1, 2), jnp.int32))
  with pytest.raises(ValueError, match="context batch"):
    layer(_x((1, 2, 16)), _x((2, 3, 16)))
  with pytest.raises(ValueError, match="max_len"):
    layer(_x((1, 9, 16)), cache=layer.init_cache(1, 8))
  swin = variants.build("swin", d_model=16, num_heads=2, rngs=nnx.Rngs(0), window=3)
  with pytest.raises(ValueError):
    swin(_x((1, 4, 4, 16)))  # window 3 does not tile a 4x4 grid
  with pytest.raises(TypeError):
    MultiHeadAttention(16, 2, rngs=0)
