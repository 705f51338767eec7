"""attnjax.flax_attention_fn inside Flax's own attention classes and a small Linen model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import attnjax
from attnjax import masks

TOL = dict(rtol=2e-5, atol=2e-5)


def _x(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def test_public_name():
  assert attnjax.flax_attention_fn is attnjax.layers.flax_attention_fn


@pytest.mark.parametrize("use_mask", [False, True])
def test_linen_mha_equals_default_fwd_and_grad(use_mask):
  x = _x((2, 7, 32))
  mask = nn.make_causal_mask(jnp.ones((2, 7))) if use_mask else None
  ref = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32)
  ours = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32,
                                         attention_fn=attnjax.flax_attention_fn())
  params = ref.init(jax.random.key(0), x, mask=mask)
  f_ref = lambda p, a: ref.apply(p, a, mask=mask)
  f_ours = lambda p, a: ours.apply(p, a, mask=mask)
  y_ref, vjp_ref = jax.vjp(f_ref, params, x)
  y, vjp = jax.vjp(f_ours, params, x)
  np.testing.assert_allclose(y, y_ref, **TOL)
  ct = _x(y.shape, 1)
  g, g_ref = vjp(ct), vjp_ref(ct)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, **TOL)


def test_linen_mha_probability_dropout_matches_default():
  x = _x((2, 6, 16))
  kw = dict(num_heads=2, qkv_features=16, dropout_rate=0.3)
  ref = nn.MultiHeadDotProductAttention(**kw)
  ours = nn.MultiHeadDotProductAttention(**kw, attention_fn=attnjax.flax_attention_fn())
  params = ref.init(jax.random.key(0), x, deterministic=True)
  rngs = {"dropout": jax.random.key(5)}
  y_ref = ref.apply(params, x, rngs=rngs, deterministic=False)
  y = ours.apply(params, x, rngs=rngs, deterministic=False)
  np.testing.assert_allclose(y, y_ref, **TOL)
  assert not np.allclose(y, ours.apply(params, x, rngs=rngs, deterministic=True))


def test_linen_sow_weights():
  x = _x((1, 5, 16))
  ours = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16,
                                         attention_fn=attnjax.flax_attention_fn(causal=True))
  params = ours.init(jax.random.key(0), x)
  y, state = ours.apply(params, x, sow_weights=True, mutable=["intermediates"])
  w = state["intermediates"]["attention_weights"][0]
  assert w.shape == (1, 2, 5, 5)
  np.testing.assert_allclose(w.sum(-1), 1.0, **TOL)
  assert float(jnp.abs(jnp.triu(w[0, 0], 1)).max()) == 0.0
  np.testing.assert_allclose(y, ours.apply(params, x), **TOL)


def test_nnx_mha_equals_default_and_is_causal():
  x = _x((2, 6, 16))
  kw = dict(num_heads=2, in_features=16, qkv_features=16, decode=False)
  ref = nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(0))
  ours = nnx.MultiHeadAttention(**kw, attention_fn=attnjax.flax_attention_fn(), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(ours(x), ref(x), **TOL)
  mask = nnx.make_causal_mask(jnp.ones((2, 6)))
  np.testing.assert_allclose(ours(x, mask=mask), ref(x, mask=mask), **TOL)
  causal = nnx.MultiHeadAttention(**kw, attention_fn=attnjax.flax_attention_fn(causal=True),
                                  rngs=nnx.Rngs(0))
  np.testing.assert_allclose(causal(x), ref(x, mask=mask), **TOL)


def test_attnjax_mask_option_equals_flax_mask_array():
  x = _x((2, 9, 16))
  window = masks.sliding_window(2) & masks.causal()
  arr = jnp.asarray(window.to_array(9, 9))  # [1, 1, T, S]
  ref = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16)
  params = ref.init(jax.random.key(0), x)
  for impl in (None, "xla_chunked"):
    ours = nn.MultiHeadDotProductAttention(
        num_heads=2, qkv_features=16,
        attention_fn=attnjax.flax_attention_fn(mask=window, implementation=impl))
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x, mask=arr), **TOL)


def test_fully_masked_rows_give_zero_not_uniform():
  q = _x((1, 3, 2, 8))
  fn = attnjax.flax_attention_fn()
  mask = jnp.array([True, False, True])[None, None, :, None] & jnp.ones((1, 1, 3, 3), bool)
  out = fn(q, q, q, mask=mask, deterministic=True)
  assert float(jnp.abs(out[0, 1]).max()) == 0.0
  assert bool(jnp.all(jnp.isfinite(out)))


def test_bad_arguments():
  with pytest.raises(ValueError, match="softcap"):
    attnjax.flax_attention_fn(softcap=0.0)
  with pytest.raises(TypeError, match="mask"):
    attnjax.flax_attention_fn(mask="causal")
  fn = attnjax.flax_attention_fn()
  with pytest.raises(ValueError, match="rank >= 4"):
    fn(_x((3, 2, 8)), _x((3, 2, 8)), _x((3, 2, 8)))
  with pytest.raises(ValueError, match="dropout_rng"):
    fn(_x((1, 3, 2, 8)), _x((1, 3, 2, 8)), _x((1, 3, 2, 8)), dropout_rate=0.1, deterministic=False)


class TinyClassifier(nn.Module):
  """A 'third-party' Linen model: embed, one MHA block, mean-pool, classify."""

  attention_fn: object = nn.dot_product_attention

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(16, 32)(tokens)
    mask = nn.make_causal_mask(tokens)
    x = x + nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=self.attention_fn)(
        x, mask=mask)
    x = nn.LayerNorm()(x)
    x = x + nn.Dense(32)(nn.gelu(nn.Dense(64)(x)))
    return nn.Dense(4)(x.mean(1))


def _train_losses(attention_fn, tokens, labels, num_steps=8):
  """Adam-trains a TinyClassifier using ``attention_fn``; returns the per-step losses."""
  model = TinyClassifier(attention_fn=attention_fn)
  params = model.init(jax.random.key(1), tokens)
  opt = optax.adam(1e-2)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    def loss_fn(p):
      logits = model.apply(p, tokens)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, g = jax.value_and_grad(loss_fn)(params)
    upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), state, loss

  out = []
  for _ in range(num_steps):
    params, state, loss = step(params, state)
    out.append(float(loss))
  return out


def test_third_party_linen_model_trains_identically():
  tokens = jax.random.randint(jax.random.key(0), (16, 10), 0, 16)
  labels = tokens[:, 0] % 4
  losses = {}
  for name, fn in (("flax", nn.dot_product_attention), ("attnjax", attnjax.flax_attention_fn())):
    losses[name] = _train_losses(fn, tokens, labels)
  np.testing.assert_allclose(losses["attnjax"], losses["flax"], rtol=1e-4, atol=1e-5)
  assert losses["attnjax"][-1] < losses["attnjax"][0]
