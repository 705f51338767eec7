"""attnjax.analysis: capture by recomputation (fused/chunked/spatial/linear paths), rollout,
flow, statistics, head gates, ablation, patching, plots -- each on a case with a known
answer or against an independent NumPy formula."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import attnjax
from attnjax import analysis, masks, models
from attnjax.analysis import Recorder
from attnjax.core import hooks
from attnjax.ops import linear as L
from attnjax.ops.spatial import window_attention
from tests.helpers import rnd


def _np_softmax_probs(q, k, allowed, scale, sinks=None):
  """Independent float64 reference: [B, N, T, S] from q [B,T,N,H], k [B,S,K,H] (GQA)."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  G = q.shape[2] // k.shape[2]
  k = np.repeat(k, G, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) * scale
  s = np.where(allowed, s, -np.inf)
  m = s.max(-1, keepdims=True)
  if sinks is not None:
    m = np.maximum(m, np.asarray(sinks, np.float64)[None, :, None, None])
  e = np.exp(s - m)
  den = e.sum(-1, keepdims=True)
  if sinks is not None:
    den = den + np.exp(np.asarray(sinks, np.float64)[None, :, None, None] - m)
  return e / den


def _record(fn):
  rec = Recorder()
  with rec.active():
    out = fn()
  return rec, out


# ----------------------------------------------------------------------------- capture

@pytest.mark.parametrize("impl", ["xla_chunked", "cpu_flash"])
def test_capture_through_fused_paths_equals_reference(impl):
  B, T, N, K, H = 2, 12, 4, 2, 16   # cpu_flash: head dims multiples of 16
  q, k, v = rnd(0, (B, T, N, H)), rnd(1, (B, T, K, H)), rnd(2, (B, T, K, 16))
  mask = masks.sliding_window(4)
  kw = dict(mask=mask, implementation=impl)
  if impl == "xla_chunked":
    kw["block_sizes"] = attnjax.ChunkedBlockSizes(block_q=4, block_k=4)
  rec, out = _record(lambda: attnjax.attention(q, k, v, **kw))
  (name, p), = rec.probs.items()
  assert name == "attention_0" and p.shape == (B, N, T, T)
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  want = _np_softmax_probs(q, k, (j <= i) & (i - j <= 4), 1 / math.sqrt(H))
  np.testing.assert_allclose(p, want, rtol=1e-5, atol=1e-6)
  # the map reproduces the fused call's output: out = P @ V
  vr = np.repeat(np.asarray(v), N // K, axis=2)
  np.testing.assert_allclose(np.einsum("bnts,bsnh->btnh", p, vr), out, rtol=1e-4, atol=1e-5)
  # the interception is gone after the block: a later call is not recorded
  attnjax.attention(q, k, v, **kw)
  assert len(rec.calls) == 1 and hooks._observers() == []


def test_capture_sinks_and_sink_logit_mass():
  B, T, N, H = 1, 6, 2, 4
  q, k, v = rnd(3, (B, T, N, H)), rnd(4, (B, T, N, H)), rnd(5, (B, T, N, H))
  sinks = jnp.asarray([0.5, 2.0])
  rec, _ = _record(lambda: attnjax.attention(q, k, v, sinks=sinks, implementation="xla_chunked"))
  p = rec.probs["attention_0"]
  want = _np_softmax_probs(q, k, np.ones((T, T), bool), 1 / 2, sinks)
  np.testing.assert_allclose(p, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(analysis.sink_logit_mass(p), 1 - want.sum(-1), atol=1e-6)
  assert (analysis.sink_logit_mass(p) > 0.05).all()


def test_capture_spatial_window_in_original_token_order():
  B, Hh, Ww, N, H = 1, 4, 4, 2, 4
  q, k, v = rnd(6, (B, Hh, Ww, N, H)), rnd(7, (B, Hh, Ww, N, H)), rnd(8, (B, Hh, Ww, N, H))
  rec, out = _record(lambda: window_attention(q, k, v, window_size=2, shift=1,
                                              implementation="xla_chunked"))
  p = rec.probs["attention_0"]
  # Swin with shift 1: windows of the map rolled by -1, i.e. token (y, x) is in window
  # ((y - 1) mod 4 // 2, (x - 1) mod 4 // 2) plus Swin's region mask; recompute the allowed
  # set from coordinates in the ORIGINAL row-major order.
  y, x = np.divmod(np.arange(Hh * Ww), Ww)
  ry, rx = (y - 1) % Hh, (x - 1) % Ww
  reg = lambda r, L_: np.where(r < L_ - 2, 0, np.where(r < L_ - 1, 1, 2))
  same = lambda a: a[:, None] == a[None, :]
  allowed = same(ry // 2) & same(rx // 2) & same(reg(ry, Hh)) & same(reg(rx, Ww))
  want = _np_softmax_probs(q.reshape(B, -1, N, H), k.reshape(B, -1, N, H), allowed, 0.5)
  np.testing.assert_allclose(p, want, rtol=1e-5, atol=1e-6)
  vr = np.asarray(v).reshape(B, -1, N, H)
  np.testing.assert_allclose(np.einsum("bnts,bsnh->btnh", p, vr),
                             np.asarray(out).reshape(B, -1, N, H), rtol=1e-4, atol=1e-5)


def test_capture_spatial_reduction_map_is_queries_by_pooled_keys():
  from attnjax.ops.spatial import spatial_reduction_attention
  B, Hh, Ww, N, H = 1, 4, 4, 2, 4
  q, k, v = rnd(13, (B, Hh, Ww, N, H)), rnd(14, (B, Hh, Ww, N, H)), rnd(15, (B, Hh, Ww, N, H))
  rec, out = _record(lambda: spatial_reduction_attention(q, k, v, sr_ratio=2))
  p = rec.probs["attention_0"]
  assert p.shape == (B, N, 16, 4)   # queries on the map, keys on the pooled 2 x 2 grid
  pool = lambda x: np.asarray(x).reshape(B, 2, 2, 2, 2, N, H).mean((2, 4)).reshape(B, 4, N, H)
  want = _np_softmax_probs(np.asarray(q).reshape(B, 16, N, H), pool(k), np.ones((16, 4), bool),
                           0.5)
  np.testing.assert_allclose(p, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.einsum("bnts,bsnh->btnh", p, pool(v)),
                             np.asarray(out).reshape(B, 16, N, H), rtol=1e-4, atol=1e-5)


def test_capture_hilo_two_calls():
  from attnjax.ops.spatial import hilo_attention
  B, Hh, Ww, N, H = 1, 4, 4, 4, 4
  q, k, v = rnd(16, (B, Hh, Ww, N, H)), rnd(17, (B, Hh, Ww, N, H)), rnd(18, (B, Hh, Ww, N, H))
  rec, _ = _record(lambda: hilo_attention(q, k, v, window_size=2, lo_heads=1))
  assert [(c.name, c.N, c.T, c.S) for c in rec.calls] == [("attention_0", 3, 16, 16),
                                                          ("attention_1", 1, 16, 4)]
  y, x = np.divmod(np.arange(16), 4)
  same = (y[:, None] // 2 == y[None, :] // 2) & (x[:, None] // 2 == x[None, :] // 2)
  p = rec.probs["attention_0"]
  assert (p[..., ~same] == 0).all() and (p[..., same] > 0).all()


def test_capture_linear_implied_weights():
  B, T, N, H = 1, 10, 2, 4
  q, k, v = rnd(9, (B, T, N, H)), rnd(10, (B, T, N, H)), rnd(11, (B, T, N, 3))
  phi = lambda x: np.where(x > 0, x + 1, np.exp(x))       # elu + 1
  causal = np.tril(np.ones((T, T)))
  a = np.einsum("btnh,bsnh->bnts", phi(np.asarray(q, np.float64)), phi(np.asarray(k, np.float64)))
  rec, out = _record(lambda: L.linear_attention(q, k, v, causal=True, chunk_size=4))
  p = rec.probs["attention_0"]
  want = a * causal / (a * causal).sum(-1, keepdims=True)
  np.testing.assert_allclose(p, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.einsum("bnts,bsnh->btnh", p, v), out, rtol=1e-4, atol=1e-5)
  rec, _ = _record(lambda: L.linear_attention(q=q, k=k, v=v, causal=True, chunk_size=4))
  np.testing.assert_allclose(rec.probs["attention_0"], want, rtol=1e-5, atol=1e-6)  # keywords
  # scalar decay (RetNet): W_ts = lambda^(t - s) q_t.k_s for s <= t
  decay = jnp.asarray([0.9, 0.5])
  rec, out = _record(lambda: L.decayed_linear_attention(q, k, v, decay=decay, chunk_size=4))
  p = rec.probs["attention_0"]
  qk = np.einsum("btnh,bsnh->bnts", np.asarray(q, np.float64), np.asarray(k, np.float64))
  dist = np.arange(T)[:, None] - np.arange(T)[None, :]
  lam = np.asarray(decay, np.float64)[None, :, None, None] ** np.maximum(dist, 0)
  np.testing.assert_allclose(p, qk * lam * causal, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.einsum("bnts,bsnh->btnh", p, v), out, rtol=1e-4, atol=1e-4)


def _lm(name, num_layers=1, **opts):
  cfg = models.default_config("lm")
  cfg.num_layers = num_layers
  cfg.attention = ml_collections.ConfigDict({"name": name, **opts})
  return models.build_model(cfg, rngs=nnx.Rngs(0))


def _tokens(seed, shape=(2, 8)):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 64, shape), jnp.int32)


def test_capture_lm_sliding_window_and_linear():
  x = _tokens(0)
  maps = analysis.capture(_lm("sliding_window", num_layers=2, window=2), x)
  assert list(maps) == ["blocks/layers/0/attn", "blocks/layers/1/attn"]
  i, j = np.arange(8)[:, None], np.arange(8)[None, :]
  for p in maps.values():
    assert p.shape == (2, 4, 8, 8)
    np.testing.assert_allclose(p.sum(-1), 1, rtol=1e-5)
    assert (p[..., ~((j <= i) & (i - j <= 2))] == 0).all()
    assert (p[..., (j <= i) & (i - j <= 2)] > 0).all()
  maps = analysis.capture(_lm("linear"), x, layers=[0], heads=[1, 3])
  (p,) = maps.values()
  assert p.shape == (2, 2, 8, 8)
  np.testing.assert_allclose(p.sum(-1), 1, rtol=1e-5)   # normalised linear attention
  assert (p[..., j > i] == 0).all() and (p[..., j <= i] > 0).all()


def test_capture_hvit_swin_module_paths_and_windows():
  cfg = models.default_config("hvit")
  cfg.image_size, cfg.stage_depths, cfg.num_layers = 8, (1,), 1
  cfg.stage_heads = (2,)
  cfg.attention = ml_collections.ConfigDict({"name": "swin", "window": 2})
  model = models.build_model(cfg, rngs=nnx.Rngs(0))
  img = rnd(12, (1, 8, 8, 3))
  maps = analysis.capture(model, img)
  assert list(maps) == ["stages/0/layers/0/attn"]
  p = maps["stages/0/layers/0/attn"]
  assert p.shape == (1, 2, 16, 16)   # the 4 x 4 patch grid, row-major
  y, x = np.divmod(np.arange(16), 4)
  same_window = (y[:, None] // 2 == y[None, :] // 2) & (x[:, None] // 2 == x[None, :] // 2)
  assert (p[..., ~same_window] == 0).all() and (p[..., same_window] > 0).all()
  np.testing.assert_allclose(p.sum(-1), 1, rtol=1e-5)


def test_capture_inside_a_transformation_raises():
  q = rnd(0, (1, 4, 1, 4))
  with pytest.raises(ValueError, match="inside a JAX transformation"):
    with Recorder().active():
      jax.jit(lambda q: attnjax.attention(q, q, q))(q)
  cfg = models.default_config("lm")
  cfg.scan_layers = True
  model = models.build_model(cfg, rngs=nnx.Rngs(0))
  for jit in (True, False):
    with pytest.raises(ValueError, match="scan_layers"):
      analysis.capture(model, _tokens(0, (1, 4)), jit=jit)


def test_capture_eager_equals_jit():
  model = _lm("mha", num_layers=2)
  x = _tokens(4, (1, 6))
  a, b = analysis.capture(model, x), analysis.capture(model, x, jit=False)
  assert list(a) == list(b) == ["blocks/layers/0/attn", "blocks/layers/1/attn"]
  for name in a:
    np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_hooks_probs_thunk_observing_and_dims():
  """An op reporting its own map: the thunk runs only while a recorder records, its shape
  is checked, ``observing`` is False inside an observed call, dims-calls refuse gates."""
  q, k, v = rnd(20, (1, 3, 2, 4)), rnd(21, (1, 5, 2, 4)), rnd(22, (1, 5, 2, 4))
  p = jax.nn.softmax(rnd(23, (1, 2, 3, 5)), axis=-1)
  runs, inside = [], []

  def thunk():
    runs.append(1)
    return p

  def op(probs=thunk, dims=None):
    inside.append(hooks.observing())
    out = jnp.einsum("bnts,bsnh->btnh", p, v)
    return hooks.intercepted("softmax", lambda: out, q, k, v, probs=probs, dims=dims)

  assert not hooks.observing()
  np.testing.assert_array_equal(op(), jnp.einsum("bnts,bsnh->btnh", p, v))
  assert runs == [] and inside == [False]                 # no observer: thunk never runs
  rec, out = _record(op)
  assert runs == [1] and inside == [False, True]
  np.testing.assert_array_equal(rec.probs["attention_0"], p)
  rec = Recorder(record=False)
  with rec.active():
    op()
    assert hooks.observing()
  assert runs == [1] and rec.calls[0].S == 5               # record=False: not evaluated
  with pytest.raises(ValueError, match=r"expected \[B, N, T, S\] = \(1, 2, 3, 5\)"):
    _record(lambda: op(probs=lambda: p[..., :4]))
  with pytest.raises(TypeError, match="probs must be None or a thunk"):
    _record(lambda: op(probs=p))
  with pytest.raises(ValueError, match="no per-head output"):
    with Recorder(gates={"attention_0": jnp.ones(1)}).active():
      op(dims=(1, 1, 3, 5), probs=lambda: p[:, :1])
  # nested: an observed call made inside another observed call is not seen
  rec, _ = _record(lambda: hooks.intercepted("softmax", op, q, k, v, probs=lambda: p))
  assert len(rec.calls) == 1 and inside[-1] is False


# ----------------------------------------------------------------------------- attribution

def test_rollout_identity_and_product():
  eye = np.broadcast_to(np.eye(5), (2, 3, 5, 5))
  for residual in (True, False):
    np.testing.assert_allclose(analysis.rollout([eye, eye, eye], residual=residual),
                               np.broadcast_to(np.eye(5), (2, 5, 5)))
  rng = np.random.default_rng(0)
  ps = [rng.dirichlet(np.ones(4), size=(1, 2, 4)) for _ in range(3)]
  want = np.eye(4)
  for p in ps:   # explicit loop: A = 0.5 mean_h P + 0.5 I (rows already sum to 1)
    a = 0.5 * p[0].mean(0) + 0.5 * np.eye(4)
    want = a @ want
  np.testing.assert_allclose(analysis.rollout(ps)[0], want, rtol=1e-12)


def test_attention_flow_two_layers_by_hand():
  a1 = np.array([[1.0, 0.0], [0.5, 0.5]])[None, None]
  a2 = np.array([[0.5, 0.5], [0.0, 1.0]])[None, None]
  # edges s -> t with capacity A[t, s]; by hand: in0->out0 = 0.5 (via mid0) + 0.5 (via
  # mid1) = 1; in1->out0 = 0.5 (via mid1); in0->out1 = 0.5; in1->out1 = 0.5.
  flow = analysis.attention_flow([a1, a2], residual=False)
  np.testing.assert_allclose(flow, [[1.0, 0.5], [0.5, 0.5]])
  # rollout differs: A2 A1
  np.testing.assert_allclose(analysis.rollout([a1, a2], residual=False)[0],
                             [[0.75, 0.25], [0.5, 0.5]])
  # max flow needs the reverse (residual) edges: the classic 4-node example
  cap = np.zeros((4, 4))
  cap[0, 1] = cap[0, 2] = cap[1, 3] = cap[2, 3] = 1.0
  cap[1, 2] = 1.0
  assert analysis.max_flow(cap, 0, 3) == 2.0


# ----------------------------------------------------------------------------- statistics

def test_statistics_known_answers():
  S = 7
  uniform = np.full((2, 3, 5, S), 1 / S)
  np.testing.assert_allclose(analysis.entropy(uniform), np.log(S))
  onehot0 = np.zeros((2, 3, 5, S))
  onehot0[..., 0] = 1
  np.testing.assert_allclose(analysis.sink_score(onehot0), 1.0)
  np.testing.assert_allclose(analysis.entropy(onehot0), 0.0)
  np.testing.assert_allclose(analysis.topk_mass(uniform, 3), 3 / S)
  # mass on the next token: distance 1 in tokens
  shift = np.zeros((1, 1, 6, 6))
  shift[0, 0, np.arange(5), np.arange(1, 6)] = 1
  shift[0, 0, 5, 5] = 1
  np.testing.assert_allclose(analysis.mean_distance(shift)[0, 0], [1, 1, 1, 1, 1, 0])
  # on a 3 x 3 grid: all mass on the diagonal neighbour (y+1, x+1), 4 px patches
  grid = np.zeros((1, 1, 9, 9))
  grid[0, 0, 0, 4] = 1
  grid[0, 0, 1:, 1] = 1
  d = analysis.mean_distance(grid, grid=(3, 3), patch_size=4)[0, 0]
  assert d[0] == pytest.approx(4 * math.sqrt(2))
  assert d[1] == 0 and d[2] == pytest.approx(4) and d[8] == pytest.approx(4 * math.sqrt(5))
  stats = analysis.head_stats({"l0": uniform, "l1": onehot0}, k=2)
  np.testing.assert_allclose(stats["l0"]["entropy"], np.log(S))
  np.testing.assert_allclose(stats["l1"]["sink_score"], 1.0)
  report, text = analysis.sink_report({"l0": uniform, "l1": onehot0})
  assert report["l1"]["sink_heads"] == [0, 1, 2] and report["l0"]["sink_heads"] == []
  assert "l1" in text
  with pytest.raises(ValueError, match="k must be"):
    analysis.topk_mass(uniform, 0)
  with pytest.raises(ValueError, match="grid"):
    analysis.mean_distance(uniform, grid=(2, 3))


# ----------------------------------------------------------------------------- heads

def _loss(logits):
  return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])


def test_head_gates_identity_zero_and_importance():
  model = _lm("mha")
  x = _tokens(1)
  base = model(x)
  name = "blocks/layers/0/attn"
  same = analysis.gated_call(model, x, {name: jnp.ones(4)}, jit=False)
  np.testing.assert_array_equal(same, base)        # gates of 1: exactly the same model
  same = analysis.gated_call(model, x, {name: jnp.ones(4)})   # compiled: f32 rounding only
  np.testing.assert_allclose(same, base, rtol=1e-5, atol=1e-5)
  zeroed = analysis.gated_call(model, x, {name: jnp.asarray([1.0, 0.0, 1.0, 1.0])})
  # independent: the same model with head 1's rows of the output projection zeroed
  attn = model.blocks.layers[0].attn
  w = attn.o_kernel[...]
  attn.o_kernel[...] = w.at[1].set(0.0)
  try:
    want = model(x)
  finally:
    attn.o_kernel[...] = w
  np.testing.assert_allclose(zeroed, want, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(zeroed - base)).max() > 1e-3
  # importance |dL/dg| equals |dL/ds| for s scaling each head's output-projection rows
  imp = analysis.head_importance(model, x, _loss)
  # (chain rule at s = 1: dL/ds_h = sum over head h's rows of dL/dW * W)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  grads = jax.jit(jax.grad(lambda p: _loss(nnx.merge(graphdef, p, rest)(x))))(params)
  gw = np.asarray(grads["blocks"]["layers"][0]["attn"]["o_kernel"][...], np.float64)
  want = np.abs((gw * np.asarray(w, np.float64)).sum((1, 2)))
  np.testing.assert_allclose(imp[name], want, rtol=1e-4, atol=1e-7)
  assert (want > 0).all()


def test_ablation_curve_and_patching():
  model = _lm("mha")
  x, x2 = _tokens(2), _tokens(3)
  name = "blocks/layers/0/attn"
  metric = lambda out: float(_loss(out))
  order = analysis.random_order({name: 4}, seed=0)
  assert sorted(order) == [(name, h) for h in range(4)]
  counts, vals = analysis.ablation_curve(model, x, metric, order)
  assert list(counts) == [0, 1, 2, 3, 4]
  assert vals[0] == pytest.approx(metric(model(x)), rel=1e-6)
  all_off = analysis.gated_call(model, x, {name: jnp.zeros(4)})
  assert vals[-1] == pytest.approx(metric(all_off), rel=1e-6)
  imp = {name: np.array([0.3, 0.1, 0.2, 0.4])}
  assert analysis.importance_order(imp) == [(name, 1), (name, 2), (name, 0), (name, 3)]
  # patching with the clean run of the same input changes nothing
  patched, corrupt, clean = analysis.patch_head(model, x, x, name, 2)
  np.testing.assert_allclose(patched, clean, rtol=1e-6)
  # patching head 2 of a run on x2 with its value on x changes the output
  (o_clean, _) = analysis.head_outputs(model, x, name, [2])
  assert o_clean.shape == (2, 8, 1, 8)
  patched, corrupt, clean = analysis.patch_head(model, x, x2, name, 2)
  assert np.abs(np.asarray(patched - corrupt)).max() > 1e-4
  # patching a head with zeros equals gating it with 0
  gated = analysis.gated_call(model, x2, {name: jnp.asarray([1.0, 1.0, 0.0, 1.0])})
  rec = Recorder(model, record=False, patch={name: {2: jnp.zeros_like(o_clean[:, :, 0])}})
  with rec.active():
    zero_patched = model(x2)
  np.testing.assert_allclose(zero_patched, gated, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- plots

def test_plots_write_files(tmp_path):
  rng = np.random.default_rng(0)
  maps = {f"l{i}": rng.dirichlet(np.ones(16), size=(1, 2, 16)) for i in range(2)}
  paths = [
      analysis.plot_head_grid(maps, str(tmp_path / "grid.png")),
      analysis.plot_token_map(maps["l0"][0, 0], str(tmp_path / "tok.png"),
                              labels=[str(i) for i in range(16)]),
      analysis.plot_overlay(rng.random((8, 8)), maps["l0"][0, 0, 5].reshape(4, 4),
                            str(tmp_path / "ov.png")),
      analysis.plot_stat_curves(analysis.head_stats(maps), "entropy", str(tmp_path / "st.png")),
  ]
  for p in paths:
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
