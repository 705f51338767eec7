"""Every registered variant trains: one optimizer step of its experiment config's model.

For each name in `attnjax.variants.names()` (so a new registration is covered without
editing this file) the runlocal config of the experiment that fits its kind is built —
'sequence': the MQAR LM (`configs/mqar.py:variant=NAME,runlocal`; built with `causal=False`
and no RoPE for the variants registered with `supports_causal=False`), 'spatial': the digits
ViT (`configs/digits_vit.py:variant=NAME,runlocal`, a 4x4 token grid), 'pooling': the Set
Transformer of `configs/set_tasks.py:runlocal` with the variant as its pooling layer — with
the options of `config_lib.variant_options`. One jitted Adam step on a real batch of the
task must give a finite loss, finite gradients, a non-zero gradient on the attention layer's
parameters and a loss that changes after the update (a variant whose output ignored its
parameters would fail). The full `train.py` runs per config are the slow tests of
tests/test_configs.py.  The default suite steps the variants of ``DEFAULT`` (one per
family); all of them run with ``-m slow``.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import assert_close

from attnjax import models, variants

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, arg):
  spec = importlib.util.spec_from_file_location(f'cfg_{name}',
                                                os.path.join(ROOT, 'configs', f'{name}.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def _setup(name):
  """(model config, batch, loss_fn(model, batch)) for variant `name`."""
  from attnjax.data import tasks
  kind = variants.info(name).kind
  if kind == 'spatial':
    c = _load('digits_vit', f'variant={name},runlocal')
    d = tasks.load_digits_split('train')
    batch = {'x': jnp.asarray(d['image'][:8], jnp.float32), 'y': jnp.asarray(d['label'][:8])}

    def loss(model, b):
      logits = model(b['x'], deterministic=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, b['y']).mean()
    return c.model, batch, loss
  if kind == 'pooling':
    c = _load('set_tasks', 'task=count,runlocal')
    c.model.pooling = {'name': name}
    d = tasks.generate_set_count(8, 0, **dict(c.data.params))
    batch = {'x': jnp.asarray(d['inputs'], jnp.float32), 'y': jnp.asarray(d['label'])}

    def loss(model, b):
      logits = model(b['x'], deterministic=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, b['y']).mean()
    return c.model, batch, loss
  c = _load('mqar', f'variant={name},runlocal')
  if not variants.info(name).supports_causal:
    c.model.causal = False  # encoder-only: its own mask (or none) decides what a query sees
    c.model.position_embedding = 'none'  # token variants' extra tokens have no positions
  d = tasks.generate_mqar(8, 0, **dict(c.data.params))
  tokens = jnp.asarray(d['inputs'])

  def lm_loss(model, b):
    logits = model(b['x'], deterministic=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], b['x'][:, 1:]).mean()
  return c.model, {'x': tokens}, lm_loss


def _attention_grads(grads):
  """The gradient leaves of the first block's attention layer."""
  flat = nnx.to_flat_state(grads)
  paths = [p for p, _ in flat]
  keys = [p for p in paths if any(str(s) in ('attention', 'attn', 'mixer') for s in p)]
  return [v.value if hasattr(v, 'value') else v for p, v in flat if p in keys]


# The default suite steps one variant per family (dense, routed, linear/gated, token,
# head, spatial windowed/routed/reduced/linear, pooling); every other variant runs under
# `-m slow` (each family's layers are also tested against references in its own file).
DEFAULT = ('mha', 'moba', 'gla', 'lightning', 'agent', 'perceiver', 'moh', 'swin',
           'biformer', 'twins', 'davit', 'care', 'pma', 'slot')


def test_default_subset_is_registered_and_spans_every_kind():
  names = set(variants.names())
  assert set(DEFAULT) <= names, sorted(set(DEFAULT) - names)
  assert {variants.info(n).kind for n in DEFAULT} == {variants.info(n).kind for n in names}


@pytest.mark.parametrize('name', [
    pytest.param(n, marks=() if n in DEFAULT else pytest.mark.slow) for n in variants.names()])
def test_every_variant_takes_a_training_step(name):
  model_cfg, batch, loss_fn = _setup(name)
  model = models.build_model(model_cfg, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, b):
    loss, grads = nnx.value_and_grad(loss_fn)(model, b)
    opt.update(model, grads)
    return loss, grads

  loss0, grads = step(model, opt, batch)
  leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
  assert np.isfinite(float(loss0)), name
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves), name
  attn = _attention_grads(nnx.state(grads, nnx.Param))
  assert attn, f'{name}: no attention parameters found in {model_cfg.kind} model'
  assert sum(float(jnp.sum(jnp.abs(g))) for g in attn) > 0, f'{name}: attention gets no gradient'
  loss1 = nnx.jit(loss_fn)(model, batch)
  assert np.isfinite(float(loss1)) and float(loss1) != float(loss0), name


# bfloat16 layers under jit on CPU: these five failed at run time ("Unsupported element
# type for DotThunk::Execute: BF16 x BF16 = F32") before attnjax.core.precision cast the
# 16-bit operands of float32-accumulating dots to float32 on CPU; every variant under -m slow.
BF16_DEFAULT = ('agent', 'care', 'focused', 'l2vit', 'linear', 'mha')


def _jitted_forward_and_param_grads(layer, x):
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  @jax.jit
  def run(params, x):
    def loss(p):
      y = nnx.merge(graphdef, p, rest)(x)
      return jnp.sum(y.astype(jnp.float32) ** 2), y
    (_, y), g = jax.value_and_grad(loss, has_aux=True)(params)
    return y, g
  return run(params, x)


@pytest.mark.parametrize('name', [
    pytest.param(n, marks=() if n in BF16_DEFAULT else pytest.mark.slow)
    for n in variants.names()])
def test_every_variant_layer_runs_jitted_in_bfloat16(name):
  """The layer with dtype=bfloat16 under jax.jit, forward alone and with the gradient of
  its parameters: runs, bfloat16 out, finite, and close to the float32 layer."""
  from attnjax.train import config_lib
  kind = variants.info(name).kind
  shape = (2, 4, 4, 16) if kind == 'spatial' else (2, 16, 16)
  opts = config_lib.variant_options(name, seq_len=16, grid=(4, 4))
  x = jax.random.normal(jax.random.key(0), shape)
  y32 = None
  for dtype in (jnp.float32, jnp.bfloat16):
    layer = variants.build(name, d_model=16, num_heads=2, rngs=nnx.Rngs(0), dtype=dtype,
                           **opts)
    y = jax.jit(lambda a, m=layer: m(a))(x.astype(dtype))          # inference
    y_t, g = _jitted_forward_and_param_grads(layer, x.astype(dtype))  # a training step
    assert_close(y_t, y, dtype, f'{name} forward alone vs in the training step')
    assert y.dtype == dtype, (name, y.dtype)
    assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32)))), name
    assert all(bool(jnp.all(jnp.isfinite(v.astype(jnp.float32)))) for v in jax.tree.leaves(g))
    if y32 is None:
      y32 = y
  err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - y32)))
  assert err <= 0.1 * (1.0 + float(jnp.max(jnp.abs(y32)))), (name, err)
