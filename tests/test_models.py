"""attnjax.models: shapes, causality, KV-cache decoding, generate, remat/scan equality, configs."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from attnjax import models

TOL = dict(rtol=2e-5, atol=2e-5)
ALLOWED_AXES = {"embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "patch", "classes", None}


def _tokens(shape, seed=0, vocab=64):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def _inputs(kind, cfg):
  if kind in ("lm", "encoder"):
    return _tokens((2, 12))
  if kind == "set":
    return jax.random.normal(jax.random.key(0), (2, 9, cfg.input_dim))
  return jax.random.normal(jax.random.key(0), (2, cfg.image_size, cfg.image_size, cfg.channels))


def _forward(model, x, **kw):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, a: nnx.merge(graphdef, s)(a, **kw))(state, x)


@pytest.mark.parametrize("kind, expect", [("lm", (2, 12, 64)), ("encoder", (2, 12, 64)),
                                          ("vit", (2, 10)), ("hvit", (2, 10)), ("set", (2, 1))])
def test_default_models_shapes_and_sharding_names(kind, expect):
  cfg = models.default_config(kind)
  model = models.build_model(cfg, rngs=nnx.Rngs(0))
  y = _forward(model, _inputs(kind, cfg))
  assert y.shape == expect and y.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(y)))
  for path, var in nnx.state(model, nnx.Param).flat_state():
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var[...].ndim and set(names) <= ALLOWED_AXES, path


@pytest.mark.parametrize("kind, attention", [
    ("vit", {"name": "neighborhood", "kernel": 3}),
    ("vit", {"name": "grid", "grid": 2}),
    ("vit", {"name": "criss_cross"}),
    ("vit", {"name": "axial"}),
    pytest.param("hvit", {"name": "neighborhood", "kernel": 3}, marks=pytest.mark.slow),
    ("encoder", {"name": "dual_triangle"}),
    ("set", {"name": "mha"}),
])
def test_variants_inside_models(kind, attention):
  cfg = models.default_config(kind)
  cfg.attention = ml_collections.ConfigDict(attention)
  model = models.build_model(cfg, rngs=nnx.Rngs(0))
  y = _forward(model, _inputs(kind, cfg))
  assert bool(jnp.all(jnp.isfinite(y)))


def test_encoder_heads():
  cfg = models.default_config("encoder")
  x = _tokens((2, 12))
  cfg.num_classes, cfg.pool = 3, "mean"
  assert _forward(models.build_model(cfg, rngs=nnx.Rngs(0)), x).shape == (2, 3)
  cfg.pool = "cls"
  m = models.build_model(cfg, rngs=nnx.Rngs(0))
  assert _forward(m, x).shape == (2, 3)
  cfg.head = "token"
  assert _forward(models.build_model(cfg, rngs=nnx.Rngs(0)), x).shape == (2, 12, 3)
  # encoder is bidirectional: the first output depends on the last token
  cfg = models.default_config("encoder")
  m = models.build_model(cfg, rngs=nnx.Rngs(0))
  y1 = _forward(m, x)
  y2 = _forward(m, x.at[:, -1].set((x[:, -1] + 1) % 64))
  assert float(jnp.abs(y1[:, 0] - y2[:, 0]).max()) > 1e-6


def test_set_transformer_mean_pooling():
  cfg = models.default_config("set")
  cfg.pooling = ml_collections.ConfigDict({"name": "mean"})
  m = models.build_model(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 9, cfg.input_dim))
  y = _forward(m, x)
  # the pooled vector is the mean of the normed SAB outputs over the elements
  h = m.pool_norm(m.blocks(m.embed(x)))
  s = jnp.mean(h, axis=1, keepdims=True)
  s = m.final_norm(s + m.mlp(m.mlp_norm(s)))
  np.testing.assert_allclose(y, m.head(s.reshape(2, -1)), **TOL)
  perm = np.random.default_rng(0).permutation(9)
  np.testing.assert_allclose(_forward(m, x[:, perm]), y, **TOL)
  # padding elements (negative segment ids) leave the mean unchanged
  pad = jax.random.normal(jax.random.key(2), (2, 4, cfg.input_dim))
  ids = jnp.concatenate([jnp.zeros((2, 9), jnp.int32), -jnp.ones((2, 4), jnp.int32)], axis=1)
  y_pad = _forward(m, jnp.concatenate([x, pad], axis=1), segment_ids=ids)
  np.testing.assert_allclose(y_pad, y, **TOL)
  assert float(jnp.abs(_forward(m, jnp.concatenate([x, pad], axis=1)) - y).max()) > 1e-4
  cfg.num_seeds = 2
  with pytest.raises(ValueError, match="num_seeds=1"):
    models.build_model(cfg, rngs=nnx.Rngs(0))


def test_hvit_swin_alternates_shift():
  cfg = models.default_config("hvit")
  model = models.build_model(cfg, rngs=nnx.Rngs(0))
  shifts = [dict(layer.attn.config.mask.args)["shift"]
            for stage in model.stages for layer in stage.layers]
  assert shifts == [0, 2, 0, 2]
  assert model.stages[1].layers[0].attn.config.num_heads == 4


def test_scanned_params_name_the_layer_axis_and_map_to_shardings():
  from attnjax import parallel
  cfg = models.default_config("lm")
  cfg.scan_layers = True
  model = models.build_model(cfg, rngs=nnx.Rngs(0))
  q = model.blocks.layers.attn.q_kernel
  assert q[...].shape == (2, 32, 4, 8)
  assert q.get_metadata()["out_sharding"] == (None, "embed", "heads", "head_dim")
  mesh = jax.make_mesh((1,), ("data",))
  shardings = parallel.state_shardings(nnx.state(model), mesh)
  assert len(jax.tree.leaves(shardings)) > 0


def test_lm_causality_property():
  cfg = models.default_config("lm")
  cfg.num_kv_heads = 2
  model = models.build_model(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  # gradient of an early output w.r.t. the embeddings of later tokens is exactly zero
  @jax.jit
  def grad_wrt_inputs(state, tokens, t):
    m = nnx.merge(graphdef, state)
    emb = m.embed(tokens)

    def f(e):
      x = m.blocks(e)
      x = m.final_norm(x)
      return m.unembed(x)[:, t].sum()

    return jax.grad(f)(emb)

  tokens = _tokens((2, 12))
  for t in (0, 4, 11):
    g = jnp.abs(grad_wrt_inputs(state, tokens, t)).sum(-1)  # [B, T]
    assert float(g[:, t + 1:].max(initial=0.0)) == 0.0
    assert float(g[:, : t + 1].min()) > 0.0
  # perturbing later tokens leaves earlier logits unchanged
  base = _forward(model, tokens)
  other = _forward(model, tokens.at[:, 7:].set((tokens[:, 7:] + 3) % 64))
  np.testing.assert_array_equal(base[:, :7], other[:, :7])
  assert float(jnp.abs(base[:, 7:] - other[:, 7:]).max()) > 1e-6


def _decode_matches_full(cfg, prompt_len=5, total=12):
  model = models.build_model(cfg, rngs=nnx.Rngs(0))
  tokens = _tokens((2, total))
  full = _forward(model, tokens)
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, toks, cache):
    return nnx.merge(graphdef, state)(toks, cache=cache)

  cache = model.init_cache(2, 16)
  logits, cache = run(state, tokens[:, :prompt_len], cache)
  outs = [logits]
  for t in range(prompt_len, total):
    logits, cache = run(state, tokens[:, t:t + 1], cache)
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, **TOL)


@pytest.mark.parametrize("variant", [
    dict(),
    dict(num_kv_heads=2, scan_layers=True),
    dict(layers_attention=[{"name": "sliding_window", "window": 3}, {"name": "mha"}]),
    pytest.param(dict(attention=ml_collections.ConfigDict({"name": "sinks", "window": 4}),
                      num_kv_heads=1), marks=pytest.mark.slow),
])
def test_kv_cache_decode_equals_full_forward(variant):
  cfg = models.default_config("lm")
  for k, v in variant.items():
    setattr(cfg, k, v)
  _decode_matches_full(cfg)


def test_generate_greedy_equals_recomputation_and_sampling():
  cfg = models.default_config("lm")
  model = models.build_model(cfg, rngs=nnx.Rngs(0))
  prompt = _tokens((2, 4))
  out = models.generate(model, prompt, 6)
  assert out.shape == (2, 10)
  np.testing.assert_array_equal(out[:, :4], prompt)
  seq = prompt
  for _ in range(6):
    nxt = jnp.argmax(_forward(model, seq)[:, -1], -1)
    seq = jnp.concatenate([seq, nxt[:, None].astype(seq.dtype)], 1)
  np.testing.assert_array_equal(out, seq)
  s1 = models.generate(model, prompt, 6, temperature=1.0, top_k=1, rng=jax.random.key(3))
  np.testing.assert_array_equal(s1, out)  # top_k=1 sampling is greedy
  s2 = models.generate(model, prompt, 6, temperature=1.5, rng=jax.random.key(3))
  s3 = models.generate(model, prompt, 6, temperature=1.5, rng=jax.random.key(3))
  np.testing.assert_array_equal(s2, s3)
  assert bool(jnp.all((s2 >= 0) & (s2 < 64)))


def test_generate_bad_arguments():
  model = models.build_model(models.default_config("lm"), rngs=nnx.Rngs(0))
  prompt = _tokens((1, 3))
  with pytest.raises(ValueError, match="max_new_tokens"):
    models.generate(model, prompt, 0)
  with pytest.raises(ValueError, match="rng"):
    models.generate(model, prompt, 2, temperature=1.0)
  with pytest.raises(ValueError, match="top_k"):
    models.generate(model, prompt, 2, top_k=0)
  with pytest.raises(ValueError, match="max_len"):
    models.generate(model, prompt, 4, max_len=5)
  with pytest.raises(ValueError, match="prompt"):
    models.generate(model, jnp.zeros((3,), jnp.int32), 2)


def _stack_plain_into_scan(plain, scanned):
  pd = nnx.state(plain, nnx.Param).to_pure_dict()
  layers = pd["blocks"]["layers"]
  pd["blocks"]["layers"] = jax.tree.map(lambda *a: jnp.stack(a),
                                        *[layers[i] for i in sorted(layers)])
  st = nnx.state(scanned, nnx.Param)
  nnx.replace_by_pure_dict(st, pd)
  nnx.update(scanned, st)


def _loss_and_grads(model, tokens):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def f(params):
    def loss(p):
      return jnp.mean(nnx.merge(graphdef, p, rest)(tokens) ** 2)
    return jax.value_and_grad(loss)(params)

  return f(params)


@pytest.mark.parametrize("remat", [pytest.param("none", marks=pytest.mark.slow), "full",
                                   pytest.param("dots", marks=pytest.mark.slow)])
def test_scan_and_remat_equal_plain_stack(remat):
  cfg = models.default_config("lm")
  cfg.num_layers = 3
  tokens = _tokens((2, 10))
  plain = models.build_model(cfg, rngs=nnx.Rngs(0))
  cfg.remat_policy, cfg.scan_layers = remat, True
  scanned = models.build_model(cfg, rngs=nnx.Rngs(1))
  _stack_plain_into_scan(plain, scanned)
  cfg.scan_layers = False
  rematted = models.build_model(cfg, rngs=nnx.Rngs(0))
  l0, g0 = _loss_and_grads(plain, tokens)
  for other in (scanned, rematted):
    l1, g1 = _loss_and_grads(other, tokens)
    np.testing.assert_allclose(l1, l0, **TOL)
    g0d, g1d = g0.to_pure_dict(), g1.to_pure_dict()
    if other is scanned:
      layers = g0d["blocks"]["layers"]
      stacked = jax.tree.map(lambda *a: jnp.stack(a), *[layers[i] for i in sorted(layers)])
      g0d = dict(g0d, blocks={"layers": stacked})
    for a, b in zip(jax.tree.leaves(g1d), jax.tree.leaves(g0d)):
      np.testing.assert_allclose(a, b, **TOL)


def test_dropout_changes_training_output_only():
  cfg = models.default_config("lm")
  cfg.dropout_rate = 0.5
  model = models.build_model(cfg, rngs=nnx.Rngs(0))
  tokens = _tokens((2, 8))
  a = model(tokens)
  b = model(tokens, deterministic=False)
  c = model(tokens, deterministic=False)
  np.testing.assert_array_equal(a, model(tokens))
  assert float(jnp.abs(a - b).max()) > 1e-3 and float(jnp.abs(b - c).max()) > 1e-3


def test_bf16_compute():
  cfg = models.default_config("lm")
  cfg.dtype = "bfloat16"
  model = models.build_model(cfg, rngs=nnx.Rngs(0))
  y = _forward(model, _tokens((2, 8)))
  assert y.dtype == jnp.float32
  cfg.dtype = "float32"
  y32 = _forward(models.build_model(cfg, rngs=nnx.Rngs(0)), _tokens((2, 8)))
  np.testing.assert_allclose(y, y32, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("kind, field, value, match", [
    ("lm", "kind", "gpt", "kind must be one of"),
    ("lm", "num_layers", 0, "num_layers"),
    ("lm", "attention", ml_collections.ConfigDict({"name": "slidingwindow"}), "close matches"),
    ("lm", "layers_attention", [{"name": "mha"}], "layers_attention"),
    ("lm", "remat_policy", "some", "remat_policy"),
    ("lm", "dtype", "int8", "dtype"),
    ("lm", "attention", ml_collections.ConfigDict({"name": "dual_triangle"}), "causal"),
    ("vit", "patch_size", 5, "divisible by patch_size"),
    ("vit", "pool", "cls", "pool"),
    ("encoder", "position_embedding", "alibi", "position_embedding"),
    ("set", "pooling", ml_collections.ConfigDict({"name": "mha"}), "pooling"),
])
def test_bad_configs(kind, field, value, match):
  cfg = models.default_config(kind)
  setattr(cfg, field, value)
  if field == "layers_attention":
    cfg.scan_layers = False
  with pytest.raises(ValueError, match=match):
    models.build_model(cfg, rngs=nnx.Rngs(0))


def test_scan_needs_uniform_layers_and_bad_inputs():
  cfg = models.default_config("lm")
  cfg.scan_layers = True
  cfg.layers_attention = [{"name": "sliding_window", "window": 3}, {"name": "mha"}]
  with pytest.raises(ValueError, match="scan_layers"):
    models.build_model(cfg, rngs=nnx.Rngs(0))
  vit = models.build_model(models.default_config("vit"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="images must be"):
    vit(jnp.ones((1, 8, 8, 3)))
  lm = models.build_model(models.default_config("lm"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="tokens must be"):
    lm(jnp.ones((4,), jnp.int32))
  with pytest.raises(ValueError, match="default_config|kind must be"):
    models.default_config("rnn")  # ("cnn" is a kind since issue 18)


class _RunningMean(nnx.Module):
  """Toy recurrent 'attention': y_t = mean_{j<=t}(x_j) W, with state (sum, count) as cache."""

  def __init__(self, d_model, *, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (d_model, d_model)) / d_model ** 0.5)

  def init_cache(self, batch, max_len):
    del max_len
    return (jnp.zeros((batch, self.w.shape[0])), jnp.zeros((), jnp.float32))

  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    total, count = (cache if cache is not None
                    else (jnp.zeros((x.shape[0], x.shape[-1])), jnp.zeros(())))
    csum = total[:, None] + jnp.cumsum(x, axis=1)
    n = count + jnp.arange(1, x.shape[1] + 1, dtype=jnp.float32)
    y = (csum / n[None, :, None]) @ self.w[...]
    if cache is None:
      return y
    return y, (csum[:, -1], count + x.shape[1])


def test_recurrent_state_layer_plugs_into_lm_decoding():
  from attnjax import variants
  name = "test_only_running_mean"
  variants.register(name, lambda *, d_model, num_heads, num_kv_heads, head_dim, rngs, **o:
                    _RunningMean(d_model, rngs=rngs), supports_cache=True, overwrite=True)
  try:
    cfg = models.default_config("lm")
    cfg.layers_attention = [{"name": name}, {"name": "mha"}]
    _decode_matches_full(cfg)
  finally:
    variants._REGISTRY.pop(name, None)  # pylint: disable=protected-access
