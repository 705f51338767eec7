"""attnjax.layers.reduced (+ Linen twin) and the registry names pvt, twins, hilo, s2a, davit,
crossformer: shapes, finite non-zero gradients, twins bitwise equal, the layer against a
plain loop reference (PVT), dual = composition of the single modes, errors, one train run.
"""

import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_close, rnd

from attnjax import variants
from attnjax.layers import reduced as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("pvt", "twins", "hilo", "s2a", "davit", "crossformer")


def _params(layer):
  return nnx.state(layer, nnx.Param).to_pure_dict()


def _perturbed(layer, seed=11):
  """Non-trivial parameters (LayerNorm scales/biases and biases away from 1/0)."""
  params = _params(layer)
  leaves, tree = jax.tree.flatten(params)
  leaves = [a + 0.1 * rnd(seed + i, a.shape) for i, a in enumerate(leaves)]
  params = jax.tree.unflatten(tree, leaves)
  nnx.update(layer, params)
  return params


def test_registered_as_spatial_with_linen():
  for name in NAMES:
    entry = variants.info(name)
    assert entry.kind == "spatial" and entry.linen is not None and not entry.supports_cache


@pytest.mark.parametrize("name", NAMES)
def test_shapes_gradients_and_linen_twin(name):
  x = rnd(0, (2, 4, 4, 16))
  m = variants.build(name, d_model=16, num_heads=4, rngs=nnx.Rngs(0))
  params = _perturbed(m)
  y = m(x)
  assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))

  def loss(p, inp):  # the layer's math on a parameter dict (what both twins call)
    return jnp.sum(R.forward(m.config, p, inp) * rnd(5, x.shape))

  np.testing.assert_array_equal(R.forward(m.config, params, x), y)
  gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)   # jit: not op by op
  for path, g in jax.tree_util.tree_leaves_with_path(gp):
    assert bool(jnp.all(jnp.isfinite(g))), (name, path)
    assert float(jnp.max(jnp.abs(g))) > 0, (name, path, "zero gradient")
  assert float(jnp.max(jnp.abs(gx))) > 0

  lm = variants.get_linen(name)(d_model=16, num_heads=4)
  lp = jax.eval_shape(lambda: lm.init(jax.random.key(0), x))["params"]   # shapes only
  assert jax.tree.map(jnp.shape, nn.unbox(lp)) == jax.tree.map(jnp.shape, params), name
  ct = rnd(6, x.shape)
  # both jitted (one compilation each, not op by op); the twins stay bit-identical
  y1, vjp1 = jax.vjp(jax.jit(lambda a: m(a)), x)
  y2, vjp2 = jax.vjp(jax.jit(lambda a: lm.apply({"params": params}, a)), x)
  np.testing.assert_array_equal(y1, y2)
  np.testing.assert_array_equal(vjp1(ct)[0], vjp2(ct)[0])


def _pvt_loop_reference(p, xs, r, N, rope=None):
  """PVT SRA written out (NumPy float64, one map `xs [Hh, Ww, D]`): per-cell strided conv,
  LayerNorm, projections, dense softmax; with `rope`, queries rotate at (y, x) and each
  conv-reduced key at the centre (i r + (r-1)/2, j r + (r-1)/2) of its r x r cell."""
  Hh, Ww, D = xs.shape
  red, kpos = [], []
  for i in range(Hh // r):
    for j in range(Ww // r):
      patch = xs[i * r:(i + 1) * r, j * r:(j + 1) * r].reshape(-1)
      c = patch @ p["sra_sr_kernel"] + p["sra_sr_bias"]
      c = (c - c.mean()) / np.sqrt(c.var() + 1e-5) * p["sra_sr_norm_scale"] + p["sra_sr_norm_bias"]
      red.append(c)
      kpos.append((i * r + (r - 1) / 2, j * r + (r - 1) / 2))
  red = np.stack(red)
  qpos = [(y, xx) for y in range(Hh) for xx in range(Ww)]
  tok = xs.reshape(-1, D)
  out = np.zeros((Hh * Ww, D))
  for n in range(N):
    q = tok @ p["sra_q_kernel"][:, n]
    k = red @ p["sra_k_kernel"][:, n]
    if rope is not None:
      freqs = p["sra_rope_freqs"][n] if rope == "mixed" else None
      q, k = _rotate(q, qpos, rope, freqs), _rotate(k, kpos, rope, freqs)
    v = red @ p["sra_v_kernel"][:, n]
    s = q @ k.T / np.sqrt(q.shape[-1])
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    out += (a @ v) @ p["sra_o_kernel"][n]
  return out.reshape(Hh, Ww, D)


def test_pvt_layer_matches_loop_reference():
  D, N, r = 8, 2, 2
  m = variants.build("pvt", d_model=D, num_heads=N, sr_ratio=r, rngs=nnx.Rngs(1))
  p = {k: np.asarray(v, np.float64) for k, v in _perturbed(m).items()}
  x = rnd(2, (1, 4, 6, D))
  assert_close(m(x)[0], _pvt_loop_reference(p, np.asarray(x, np.float64)[0], r, N), jnp.float32)


@pytest.mark.parametrize("name, modes", [("davit", ("window", "channel")),
                                         ("crossformer", ("sda", "lda")),
                                         ("twins", ("lsa", "gsa"))])
def test_dual_is_the_two_single_modes_composed(name, modes):
  x = rnd(3, (1, 4, 4, 16))
  dual = variants.build(name, d_model=16, num_heads=4, rngs=nnx.Rngs(0))
  params = _perturbed(dual)
  units = dual.config.units
  ys = []
  for mode, unit in zip(modes, units):
    single = variants.build(name, d_model=16, num_heads=4, mode=mode, rngs=nnx.Rngs(0))
    nnx.update(single, {k: v for k, v in params.items() if k.startswith(unit + "_")})
    ys.append(single)
  y1 = ys[0](x)
  assert_close(dual(x), y1 + ys[1](x + y1), jnp.float32)


def test_errors_name_the_option():
  rngs = nnx.Rngs(0)
  with pytest.raises(ValueError, match=r"sr_ratio=\(3, 3\) must divide the token map"):
    variants.build("pvt", d_model=16, num_heads=4, sr_ratio=3, rngs=rngs)(rnd(0, (1, 4, 4, 16)))
  with pytest.raises(ValueError, match=r"rope must be one of \(None, 'axial', 'mixed'\)"):
    variants.build("hilo", d_model=16, num_heads=4, rope="1d", rngs=rngs)
  with pytest.raises(ValueError, match="rope must be None for variant 'davit'"):
    variants.build("davit", d_model=16, num_heads=4, rope="axial", rngs=rngs)
  with pytest.raises(ValueError, match=r"rope='axial' needs a head_dim .* divisible by 4"):
    variants.build("s2a", d_model=16, num_heads=4, rope="axial", rngs=rngs)  # H/qk_ratio = 2
  with pytest.raises(ValueError, match="rope_base must be a number > 1"):
    variants.build("pvt", d_model=16, num_heads=4, rope="axial", rope_base=0.5, rngs=rngs)
  with pytest.raises(ValueError, match="num_kv_heads must equal num_heads=4"):
    variants.build("twins", d_model=16, num_heads=4, num_kv_heads=2, rope="mixed", rngs=rngs)
  with pytest.raises(ValueError, match=r"dropout_rate must be a number in \[0, 1\)"):
    variants.build("hilo", d_model=16, num_heads=4, dropout_rate=1.0, rngs=rngs)
  with pytest.raises(TypeError, match="unknown option 'kernel'"):
    variants.build("davit", d_model=16, num_heads=4, kernel=3, rngs=rngs)
  with pytest.raises(ValueError, match="num_kv_heads must equal num_heads=4"):
    variants.build("davit", d_model=16, num_heads=4, num_kv_heads=2, rngs=rngs)
  with pytest.raises(ValueError, match="mode must be one of"):
    variants.build("crossformer", d_model=16, num_heads=4, mode="long", rngs=rngs)
  with pytest.raises(ValueError, match="alpha must be in"):
    variants.build("hilo", d_model=16, num_heads=4, alpha=0.3, num_kv_heads=2, rngs=rngs)
  with pytest.raises(ValueError, match="x must be a token map"):
    variants.build("s2a", d_model=16, num_heads=4, rngs=rngs)(rnd(0, (1, 16, 16)))
  with pytest.raises(ValueError, match=r"group_size=\(3, 3\) must divide the map"):
    variants.build("crossformer", d_model=16, num_heads=4, group_size=3, rngs=rngs)(
        rnd(0, (1, 4, 4, 16)))


# ----------------------------------------------------------------------------- RoPE, dropout

ROPE_LAYERS = [("pvt", {}), ("twins", {}), ("hilo", {}), ("s2a", {}),
               ("davit", {"mode": "window"}), ("crossformer", {})]


# Default suite: each layer once (hilo with mixed RoPE, the rest axial); all under -m slow.
@pytest.mark.parametrize("name, extra, rope", [
    (n, e, r) if r == ("mixed" if n == "hilo" else "axial")
    else pytest.param(n, e, r, marks=pytest.mark.slow)
    for n, e in ROPE_LAYERS for r in ("axial", "mixed")])
def test_rope_layers_gradients_and_linen_twin(name, extra, rope):
  x = rnd(20, (1, 4, 4, 32))
  m = variants.build(name, d_model=32, num_heads=4, rope=rope, rngs=nnx.Rngs(0), **extra)
  params = _perturbed(m)
  assert all(f"{u}_rope_freqs" in params for u in m.config.units) == (rope == "mixed")
  plain = variants.build(name, d_model=32, num_heads=4, rngs=nnx.Rngs(0), **extra)
  nnx.update(plain, {k: v for k, v in params.items() if "rope_freqs" not in k})
  y = m(x)
  assert float(jnp.max(jnp.abs(y - plain(x)))) > 1e-3   # the rotation is applied
  loss = lambda p: jnp.sum(R.forward(m.config, p, x) * rnd(21, x.shape))
  for path, g in jax.tree_util.tree_leaves_with_path(jax.jit(jax.grad(loss))(params)):
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0, (name, path)
  lm = variants.get_linen(name)(d_model=32, num_heads=4, rope=rope, **extra)
  ct = rnd(22, x.shape)
  # both jitted (one compilation each, not op by op); the twins stay bit-identical
  y1, vjp1 = jax.vjp(jax.jit(lambda a: m(a)), x)
  y2, vjp2 = jax.vjp(jax.jit(lambda a: lm.apply({"params": params}, a)), x)
  np.testing.assert_array_equal(y1, y2)
  np.testing.assert_array_equal(vjp1(ct)[0], vjp2(ct)[0])


def _rotate(x_TH, pos_T2, rope, freqs=None, base=10000.0):
  """RoPE written out per token (NumPy float64): pairs (i, i + H/2); 'axial': pair i < H/4
  turns by y * base^(-4i/H), the others by x * base^(-4(i - H/4)/H); 'mixed': by
  freqs[i] . (y, x)."""
  T, H = x_TH.shape
  half = H // 2
  out = np.empty_like(x_TH)
  for t in range(T):
    for i in range(half):
      if rope == "axial":
        d, j = divmod(i, half // 2)
        a = pos_T2[t][d] * base ** (-2.0 * j / half)
      else:
        a = float(np.dot(freqs[i], pos_T2[t]))
      c, s_ = np.cos(a), np.sin(a)
      out[t, i] = x_TH[t, i] * c - x_TH[t, i + half] * s_
      out[t, i + half] = x_TH[t, i + half] * c + x_TH[t, i] * s_
  return out


@pytest.mark.parametrize("rope", ["axial", "mixed"])
def test_pvt_rope_layer_matches_loop_reference(rope):
  """Keys of the conv reduction rotate at their cells' centres (see _pvt_loop_reference)."""
  D, N, r = 16, 2, 2
  m = variants.build("pvt", d_model=D, num_heads=N, sr_ratio=r, rope=rope, rngs=nnx.Rngs(1))
  p = {k: np.asarray(v, np.float64) for k, v in _perturbed(m).items()}
  x = rnd(2, (1, 4, 6, D))
  want = _pvt_loop_reference(p, np.asarray(x, np.float64)[0], r, N, rope)
  assert_close(m(x)[0], want, jnp.float32)


@pytest.mark.parametrize("name", ["twins", "hilo", "s2a"])
def test_dropout_on_the_output_nnx_and_linen(name):
  """deterministic=True and dropout_rate=0 give the plain layer; with dropout every output
  entry is 0 or the plain output / (1 - rate) (mask read from the zeros, as in
  test_layers.test_dropout_only_in_training); the Linen twin alike."""
  rate, x = 0.5, rnd(30, (2, 4, 4, 16))
  m = variants.build(name, d_model=16, num_heads=4, dropout_rate=rate, rngs=nnx.Rngs(0, dropout=1))
  params = _perturbed(m)
  plain = variants.build(name, d_model=16, num_heads=4, rngs=nnx.Rngs(0))
  nnx.update(plain, params)
  zero = variants.build(name, d_model=16, num_heads=4, dropout_rate=0.0,
                        rngs=nnx.Rngs(0, dropout=1))
  nnx.update(zero, params)
  ref = plain(x)
  np.testing.assert_array_equal(m(x), ref)
  np.testing.assert_array_equal(m(x, deterministic=True), ref)
  np.testing.assert_array_equal(zero(x, deterministic=False), ref)
  lm = variants.get_linen(name)(d_model=16, num_heads=4, dropout_rate=rate)
  np.testing.assert_array_equal(lm.apply({"params": params}, x), ref)
  y_lin = lm.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
  for y in (m(x, deterministic=False), y_lin):
    dropped = np.asarray(y == 0)
    assert 0.3 < dropped.mean() < 0.7
    assert_close(y, jnp.where(dropped, 0.0, ref / (1 - rate)), jnp.float32)
  y1, y2 = m(x, deterministic=False), m(x, deterministic=False)
  assert not np.array_equal(y1, y2)   # a fresh mask per call


@pytest.mark.slow
def test_train_smoke_crossformer(tmp_path):
  """One variant end to end: digits ViT (4x4 token grid) with the CrossFormer layer."""
  workdir = tmp_path / "w"
  cmd = [sys.executable, os.path.join(ROOT, "train.py"),
         "--config=" + os.path.join(ROOT, "configs", "digits_vit.py")
         + ":variant=crossformer,runlocal=True",
         f"--config.data.data_dir={tmp_path / 'data'}", "--config.tensorboard=False",
         "--config.progress_bar=False", "--config.checkpoint_every=0", f"--workdir={workdir}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  losses = [r["loss"] for r in rows if r.get("split") == "train"]
  assert len(losses) >= 2 and all(np.isfinite(losses))
  assert losses[-1] < losses[0], losses  # it learns


# ----------------------------------------------------------------------------- positions

def _grid_positions(B, Hh, Ww):
  g = np.array([[y, x] for y in range(Hh) for x in range(Ww)], np.int32)
  return np.ascontiguousarray(np.broadcast_to(g, (B, Hh * Ww, 2)))


# every sub-layer kind that rotates: sra (pvt; twins gsa), win (twins lsa; davit window),
# hilo, s2a, sda/lda (crossformer); both rope kinds
POS_LAYERS = [("pvt", {}, "axial"), ("pvt", {}, "mixed"), ("twins", {}, "axial"),
              ("hilo", {}, "mixed"), ("s2a", {}, "axial"), ("davit", {"mode": "window"}, "mixed"),
              ("crossformer", {}, "axial")]


@pytest.mark.parametrize("name, extra, rope", [
    p if (p[0], p[2]) in {("pvt", "mixed"), ("twins", "axial"), ("hilo", "mixed")}
    else pytest.param(*p, marks=pytest.mark.slow) for p in POS_LAYERS])
def test_positions_grid_is_the_default_and_shifts_change_nothing(name, extra, rope):
  """positions = the grid reproduce the default bit for bit (forward and vjp, NNX and Linen);
  RoPE logits depend on query minus key position and a pooled key sits at its cell's mean
  position, so shifting every row's positions by a constant (per row) leaves the output and
  its vjp unchanged; positions that are not a shifted grid change the output."""
  B, Hh, Ww, D = 2, 4, 4, 32
  x = rnd(40, (B, Hh, Ww, D))
  m = variants.build(name, d_model=D, num_heads=4, rope=rope, rngs=nnx.Rngs(0), **extra)
  params = _perturbed(m)
  grid = _grid_positions(B, Hh, Ww)
  ct = rnd(41, x.shape)

  def run(pos):
    y, vjp = jax.vjp(lambda p, a: R.forward(m.config, p, a, positions=pos), params, x)
    return y, vjp(ct)

  y0, (gp0, gx0) = run(None)
  y1, (gp1, gx1) = run(grid)
  np.testing.assert_array_equal(y1, y0)
  np.testing.assert_array_equal(gx1, gx0)
  for a, b in zip(jax.tree.leaves(gp1), jax.tree.leaves(gp0)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(m(x, positions=grid), m(x))
  lm = variants.get_linen(name)(d_model=D, num_heads=4, rope=rope, **extra)
  np.testing.assert_array_equal(lm.apply({"params": params}, x, positions=grid), y0)

  shifted = grid + np.array([[[3.0, -5.0]], [[-2.5, 7.25]]], np.float32)
  y2, (gp2, gx2) = run(shifted)
  assert_close(y2, y0, jnp.float32, "forward")
  assert_close(gx2, gx0, jnp.float32, "grad x")
  for a, b in zip(jax.tree.leaves(gp2), jax.tree.leaves(gp0)):
    assert_close(a, b, jnp.float32, "grad params")
  scaled = 2.0 * grid.astype(np.float32)
  assert float(jnp.max(jnp.abs(m(x, positions=scaled) - y0))) > 1e-3   # positions are used


def _rot(x_TNH, pos_T2, rope, freqs=None, base=10000.0):
  """RoPE at explicit positions, pairs (i, i + H/2), differentiable in x and `freqs`:
  'axial' angles by loops in float64 (as _rotate), 'mixed' angle[t, n, i] = freqs[n, i]
  . pos[t] (one multiply-add per axis)."""
  T, N, H = x_TNH.shape
  half = H // 2
  if rope == "axial":
    ang = np.zeros((T, N, half))
    for t in range(T):
      for i in range(half):
        d, j = divmod(i, half // 2)
        ang[t, :, i] = pos_T2[t][d] * base ** (-2.0 * j / half)
    ang = jnp.asarray(ang, jnp.float32)
  else:
    pos = jnp.asarray(pos_T2, jnp.float32)
    ang = pos[:, None, None, 0] * freqs[..., 0] + pos[:, None, None, 1] * freqs[..., 1]
  c, s = jnp.cos(ang), jnp.sin(ang)
  x1, x2 = x_TNH[..., :half], x_TNH[..., half:]
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def _ref_layer_at_positions(p, x, unit, r, rope, pos):
  """PVT SRA (`unit='sra'`, conv cells `r x r`) or Twins LSA (`unit='win'`, windows
  `r x r`) in plain jnp, one row at a time, with RoPE at explicit positions: queries at
  `pos[b]`, LSA keys at `pos[b]`, each conv-reduced key at the mean of its cell's
  positions; dense softmax (LSA: only keys of the query's window)."""
  B, Hh, Ww, D = x.shape
  pre = lambda n: p[f"{unit}_{n}"]
  freqs = pre("rope_freqs") if rope == "mixed" else None
  rows = []
  for b in range(B):
    tok = x[b].reshape(-1, D)
    qpos = np.asarray(pos[b], np.float64)
    cells = [(i, j) for i in range(Hh // r) for j in range(Ww // r)]
    if unit == "sra":
      patches = jnp.stack([x[b, i * r:(i + 1) * r, j * r:(j + 1) * r].reshape(-1)
                           for i, j in cells])
      c = patches @ pre("sr_kernel") + pre("sr_bias")
      mu, var = c.mean(-1, keepdims=True), c.var(-1, keepdims=True)
      kv = (c - mu) / jnp.sqrt(var + 1e-5) * pre("sr_norm_scale") + pre("sr_norm_bias")
      q2 = qpos.reshape(Hh, Ww, 2)
      kpos = np.stack([q2[i * r:(i + 1) * r, j * r:(j + 1) * r].reshape(-1, 2).mean(0)
                       for i, j in cells])
      allowed = np.ones((Hh * Ww, len(cells)), bool)
    else:
      kv, kpos = tok, qpos
      win = [(y // r, xx // r) for y in range(Hh) for xx in range(Ww)]
      allowed = np.array([[a == c for c in win] for a in win])
    q = _rot(jnp.einsum("td,dnh->tnh", tok, pre("q_kernel")), qpos, rope, freqs)
    k = _rot(jnp.einsum("sd,dnh->snh", kv, pre("k_kernel")), kpos, rope, freqs)
    v = jnp.einsum("sd,dnh->snh", kv, pre("v_kernel"))
    s = jnp.einsum("tnh,snh->nts", q, k) / np.sqrt(q.shape[-1])
    s = jnp.where(allowed[None], s, -1e30)
    a = jax.nn.softmax(s, -1)
    rows.append(jnp.einsum("tnh,nhd->td", jnp.einsum("nts,snh->tnh", a, v), pre("o_kernel")))
  return jnp.stack(rows).reshape(x.shape)


@pytest.mark.parametrize("name, extra, unit, rope", [
    ("pvt", {"sr_ratio": 2}, "sra", "mixed"),
    ("twins", {"mode": "lsa", "window": 2}, "win", "axial"),
    pytest.param("pvt", {"sr_ratio": 2}, "sra", "axial", marks=pytest.mark.slow),
    pytest.param("twins", {"mode": "lsa", "window": 2}, "win", "mixed", marks=pytest.mark.slow)])
def test_layer_at_random_positions_matches_reference(name, extra, unit, rope):
  """Random float positions per row (scaled, jittered, shifted grid): forward and vjp
  (x and the parameters) against the plain reference."""
  B, Hh, Ww, D = 2, 4, 6, 16
  m = variants.build(name, d_model=D, num_heads=2, rope=rope, rngs=nnx.Rngs(1), **extra)
  params = _perturbed(m)
  x = rnd(50, (B, Hh, Ww, D))
  rng = np.random.default_rng(51)
  g = _grid_positions(1, Hh, Ww)[0].astype(np.float32)
  pos = np.stack([1.7 * g + rng.uniform(-0.4, 0.4, g.shape) + rng.uniform(-5, 5, (1, 2))
                  for _ in range(B)]).astype(np.float32)
  ct = rnd(52, x.shape)
  y, vjp = jax.vjp(lambda p, a: R.forward(m.config, p, a, positions=pos),
                   params, x)
  # The reference under jit: one compilation instead of its op-by-op loop.
  y_ref, vjp_ref = jax.vjp(jax.jit(lambda p, a: _ref_layer_at_positions(p, a, unit, 2, rope,
                                                                        pos)), params, x)
  assert_close(y, y_ref, jnp.float32, "forward")
  (gp, gx), (gp_ref, gx_ref) = vjp(ct), vjp_ref(ct)
  assert_close(gx, gx_ref, jnp.float32, "grad x")
  for k in gp:
    assert_close(gp[k], gp_ref[k], jnp.float32, f"grad {k}")
  np.testing.assert_array_equal(m(x, positions=pos), y)


def test_positions_errors_name_the_argument():
  x = rnd(60, (2, 4, 4, 16))
  grid = _grid_positions(2, 4, 4)
  m = variants.build("twins", d_model=16, num_heads=4, rope="axial", rngs=nnx.Rngs(0))
  lm = variants.get_linen("twins")(d_model=16, num_heads=4, rope="axial")
  lp = lm.init(jax.random.key(0), x)
  shape_msg = r"positions must be \[2, Hh\*Ww, 2\] = \[2, 16, 2\]: .*got shape "
  for bad in (grid[:, :, :1], grid[:1], grid[0], grid.reshape(2, 4, 4, 2)):
    with pytest.raises(ValueError, match=shape_msg + re.escape(str(bad.shape))):
      m(x, positions=bad)
    with pytest.raises(ValueError, match=shape_msg):
      lm.apply(lp, x, positions=bad)
  with pytest.raises(TypeError, match="positions must be integer or floating.*bool"):
    m(x, positions=grid > 0)
  plain = variants.build("pvt", d_model=16, num_heads=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="positions were given but variant 'pvt' has rope=None"):
    plain(x, positions=grid)
  chan = variants.get_linen("davit")(d_model=16, num_heads=4)
  with pytest.raises(ValueError, match="positions were given but variant 'davit' has rope=None"):
    chan.init(jax.random.key(0), x, positions=grid)
  with pytest.raises(ValueError, match="no segment_ids and no cache"):
    m(x, segment_ids=jnp.zeros((2, 16), jnp.int32))


def test_linen_twin_is_a_mechanism_twin():
  from attnjax.layers import linen as ajl
  from attnjax.layers import reduced_linen
  cls = reduced_linen.ReducedSpatialAttention
  assert issubclass(cls, ajl.MechanismTwin) and cls.config_fn is R.reduced_config
  fields = [f for f in cls.__dataclass_fields__ if f not in ("parent", "name")]
  assert fields == ["d_model", "num_heads", "mechanism", "num_kv_heads", "head_dim", "options"]
  lm = cls(d_model=16, num_heads=4, mechanism="hilo", options=(("alpha", 0.5), ("rope", "axial")))
  assert lm._config() == R.reduced_config("hilo", 16, 4, alpha=0.5, rope="axial")
