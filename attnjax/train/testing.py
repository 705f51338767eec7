"""A deliberately small transformer used to exercise the trainer in tests.

The model zoo (``attnjax.models.build_model``) is what configs use; this module gives the
trainer tests a model whose behaviour they fully control (no dropout surprises, tiny
compile time), built from the same pieces: the attention layer comes from
``attnjax.variants`` by name, parameters carry logical axis names, activations go through
``attnjax.parallel.constrain``. Select it with ``config.model_factory =
'attnjax.train.testing:build_tiny_model'``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.parallel import constrain


def _param(rngs, shape, names, scale=None):
  init = nnx.initializers.normal(scale if scale is not None else shape[0] ** -0.5)
  return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=names)


class _Block(nnx.Module):

  def __init__(self, cfg, *, rngs):
    d, n = cfg.d_model, cfg.num_heads
    h = d // n
    self.wq = _param(rngs, (d, n, h), ('embed', 'heads', 'head_dim'))
    self.wk = _param(rngs, (d, n, h), ('embed', 'heads', 'head_dim'))
    self.wv = _param(rngs, (d, n, h), ('embed', 'heads', 'head_dim'))
    self.wo = _param(rngs, (n, h, d), ('heads', 'head_dim', 'embed'), scale=(n * h) ** -0.5)
    self.w1 = _param(rngs, (d, cfg.mlp_dim), ('embed', 'mlp'))
    self.w2 = _param(rngs, (cfg.mlp_dim, d), ('mlp', 'embed'))
    self.drop = nnx.Dropout(cfg.get('dropout_rate', 0.0), rngs=rngs)
    self.causal = bool(cfg.get('causal', True))

  def __call__(self, x_BTD, deterministic):
    import attnjax  # pylint: disable=import-outside-toplevel
    y = _rms(x_BTD)
    q = jnp.einsum('BTD,DNH->BTNH', y, self.wq[...])
    k = jnp.einsum('BTD,DNH->BTNH', y, self.wk[...])
    v = jnp.einsum('BTD,DNH->BTNH', y, self.wv[...])
    q, k, v = (constrain(t, ('batch', 'length', 'heads', None)) for t in (q, k, v))
    mask = attnjax.masks.causal() if self.causal else None
    o = attnjax.attention(q, k, v, mask=mask)
    x_BTD = x_BTD + self.drop(jnp.einsum('BTNH,NHD->BTD', o, self.wo[...]),
                              deterministic=deterministic)
    y = _rms(x_BTD)
    hid = constrain(jax.nn.gelu(y @ self.w1[...]), ('batch', 'length', 'mlp'))
    return constrain(x_BTD + hid @ self.w2[...], ('batch', 'length', 'embed'))


def _rms(x):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


class TinyLM(nnx.Module):
  """tokens [B, T] int32 -> logits [B, T, vocab] (causal) or [B, num_classes] (pooled)."""

  def __init__(self, cfg, *, rngs):
    self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'), scale=1.0)
    self.pos = _param(rngs, (cfg.max_len, cfg.d_model), ('length', 'embed'), scale=0.1)
    self.blocks = nnx.List([_Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    out = cfg.get('num_classes', 0) or cfg.vocab_size
    self.head = _param(rngs, (cfg.d_model, out), ('embed', 'vocab'))
    self.pooled = bool(cfg.get('num_classes', 0))

  def __call__(self, tokens_BT, *, deterministic=True):
    t = tokens_BT.shape[1]
    x = self.embed[...][tokens_BT] + self.pos[...][:t]
    x = constrain(x, ('batch', 'length', 'embed'))
    for blk in self.blocks:
      x = blk(x, deterministic)
    x = _rms(x)
    if self.pooled:
      x = x.mean(axis=1)
    return (x @ self.head[...]).astype(jnp.float32)


def build_tiny_model(model_cfg, *, rngs: nnx.Rngs) -> nnx.Module:
  """Factory with the ``attnjax.models.build_model`` signature."""
  return TinyLM(model_cfg, rngs=rngs)
