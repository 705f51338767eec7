"""attnjax.layers.reduced (+ Linen twin) and the registry names pvt, twins, hilo, s2a, davit,
crossformer: shapes, finite non-zero gradients, twins bitwise equal, the layer against a
plain loop reference (PVT), dual = composition of the single modes, errors, one train run.
"""

import json
import os
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
  gp, gx = jax.grad(loss, argnums=(0, 1))(params, x)
  for path, g in jax.tree_util.tree_leaves_with_path(gp):
    assert bool(jnp.all(jnp.isfinite(g))), (name, path)
    assert float(jnp.max(jnp.abs(g))) > 0, (name, path, "zero gradient")
  assert float(jnp.max(jnp.abs(gx))) > 0

  lm = variants.get_linen(name)(d_model=16, num_heads=4)
  lp = lm.init(jax.random.key(0), x)["params"]
  assert jax.tree.map(jnp.shape, nn.unbox(lp)) == jax.tree.map(jnp.shape, params), name
  ct = rnd(6, x.shape)
  y1, vjp1 = jax.vjp(lambda a: m(a), x)
  y2, vjp2 = jax.vjp(lambda a: lm.apply({"params": params}, a), x)
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


@pytest.mark.parametrize("name, extra, rope", [
    (n, e, r) if r == "axial" or n in ("pvt", "hilo", "s2a")
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
  for path, g in jax.tree_util.tree_leaves_with_path(jax.grad(loss)(params)):
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0, (name, path)
  lm = variants.get_linen(name)(d_model=32, num_heads=4, rope=rope, **extra)
  ct = rnd(22, x.shape)
  y1, vjp1 = jax.vjp(lambda a: m(a), x)
  y2, vjp2 = jax.vjp(lambda a: lm.apply({"params": params}, a), x)
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
