"""Context parallelism of the linear family (attnjax.parallel.linear_cp) on 8 fake devices.

The sequence is split over the 'context' mesh axis and the recurrent state passes between
the shards; the result must equal the single-device op (forward and vjp with random
cotangents), and a train step of a small LM on a data 2 x context 4 mesh must equal the
one-device step. Multi-device cases run this file as a script in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 set before JAX is imported.
"""

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_worker(name, *args):
  env = dict(os.environ, XLA_FLAGS=xla_flags('--xla_force_host_platform_device_count=8'),
             PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''),
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), name, *args], env=env,
                        capture_output=True, text=True, timeout=1200, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1]
  return json.loads(line[len('RESULT '):])


# --------------------------------------------------------------------------- one device

def test_single_device_is_the_op_and_bad_input_raises():
  import jax
  import jax.numpy as jnp

  from attnjax.ops import linear as L
  from attnjax.parallel import context_parallel_linear, make_mesh
  ks = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(kk, (2, 12, 2, 4)) for kk in ks)
  want, st = L.linear_attention(q, k, v, causal=True, return_state=True)
  got, got_st = context_parallel_linear(L.linear_attention, q, k, v, causal=True,
                                        return_state=True)  # no mesh: the op itself
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got_st[0], st[0], rtol=1e-6, atol=1e-6)
  mesh = make_mesh(dict(data=1), devices=jax.devices()[:1])
  np.testing.assert_allclose(context_parallel_linear(L.linear_attention, q, k, v, causal=True,
                                                     mesh=mesh), want, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match='axis_name'):
    context_parallel_linear(L.linear_attention, q, k, v, mesh=mesh, axis_name='seq')
  with pytest.raises(ValueError, match='transition'):
    context_parallel_linear(L.linear_attention, q, k, v, transition='dense')
  with pytest.raises(ValueError, match=r'xs\[1\]'):
    context_parallel_linear(L.linear_attention, q, k[:, :6], v)
  with pytest.raises(TypeError, match='fn'):
    context_parallel_linear(None, q, k, v)
  del jnp


# --------------------------------------------------------------------------- 8 devices

FAST_OPS = ('gla/ctx4', 'gated_delta/ctx4')   # a per-key-dimension decay; the delta rule
SLOW_OPS = ('linear/ctx4', 'lightning/ctx4', 'linear/ctx2', 'lightning/ctx2', 'gla/ctx2',
            'gated_delta/ctx2', 'delta/ctx4', 'ssd/ctx4', 'retention_gate/ctx2', 'inline/ctx4',
            'linear_state/ctx4')


@pytest.mark.parametrize('cases', [
    pytest.param(FAST_OPS, id='gla-gated_delta'),
    pytest.param(SLOW_OPS, id='more', marks=pytest.mark.slow)])
def test_ops_match_single_device_fwd_vjp_8_devices(cases):
  res = _run_worker('ops', ','.join(cases))
  assert sorted(res) == sorted(cases)
  for case, errs in res.items():
    for what, err in errs.items():   # output and every input gradient, float32
      assert err < 2e-5, (case, what, err)


def _ops_worker(selected):
  import jax
  import jax.numpy as jnp

  from attnjax.ops import linear as L
  from attnjax.parallel import context_parallel_linear, make_mesh
  assert jax.device_count() == 8
  B, T, N, K, H = 2, 32, 4, 2, 8
  ks = iter(jax.random.split(jax.random.key(42), 16))
  rnd = lambda *shape: jax.random.normal(next(ks), shape)
  q, k = rnd(B, T, N, H), rnd(B, T, K, H)
  v, v4 = rnd(B, T, K, H), rnd(B, T, K, 4)
  qn, kn = (x / jnp.linalg.norm(x, axis=-1, keepdims=True) for x in (q, rnd(B, T, K, H)))
  beta = jax.nn.sigmoid(rnd(B, T, N))
  log_alpha_n = -jax.nn.softplus(rnd(B, T, N)) / 4
  log_alpha_nh = jax.nn.log_sigmoid(rnd(B, T, N, H) + 2.0) / 4
  decay = jnp.array([0.8, 0.9, 0.95, 0.99], jnp.float32)
  A = -jnp.array([0.5, 1.0, 2.0, 4.0], jnp.float32)
  Dskip = rnd(N)
  dt = jax.nn.softplus(rnd(B, T, N)) / 4
  st_S, st_z = rnd(B, K, H, H), jnp.abs(rnd(B, K, H))
  cs = dict(chunk_size=8)
  # name -> (fn(*xs, *params, state=..., return_state=...), xs, params)
  cases = {
      'linear': (lambda q, k, v, **kw: L.linear_attention(q, k, v, causal=True, **cs, **kw),
                 (q, k, v), ()),
      'linear_state': (lambda q, k, v, **kw: L.linear_attention(
          q, k, v, causal=True, **cs, **kw), (q, k, v), (st_S, st_z)),
      'lightning': (lambda q, k, v, d, **kw: L.lightning_attention(q, k, v, decay=d, **cs, **kw),
                    (q, k, v), (decay,)),
      'retention_gate': (lambda q, k, v, g, d, **kw: L.decayed_linear_attention(
          q, k, v, decay=d, log_decay=g, **cs, **kw), (q, k, v, log_alpha_n), (decay,)),
      'gla': (lambda *a, **kw: L.gated_linear_attention(*a, **cs, **kw),
              (q, k, v, log_alpha_nh), ()),
      'delta': (lambda *a, **kw: L.delta_rule_attention(*a, **cs, **kw), (qn, kn, v4, beta), ()),
      'gated_delta': (lambda *a, **kw: L.gated_delta_rule_attention(*a, **cs, **kw),
                      (qn, kn, v, beta, log_alpha_n), ()),
      'ssd': (lambda x, dt_, b_, c_, a_, d_, **kw: L.ssd_attention(x, dt_, a_, b_, c_, D=d_, **cs,
                                                                 **kw),
              (v4.repeat(2, axis=2), dt, k, q[:, :, :2]), (A, Dskip)),
      'inline': (lambda q, k, v, **kw: L.inline_attention(q, k, v, causal=True, **cs, **kw),
                 (q, k, v), ()),
  }
  out = {}
  for name in selected.split(','):
    op, ctx = name.split('/')
    fn, xs, params = cases[op]
    mesh = make_mesh(dict(data=8 // int(ctx[3:]), context=int(ctx[3:])))
    n = len(xs)
    transition = 'matrix' if 'delta' in op else 'diagonal'
    with_state = op == 'linear_state'

    def split(*args, fn=fn, n=n, transition=transition, with_state=with_state, mesh=mesh):
      xs_, ps = args[:n], args[n:]
      if with_state:
        return context_parallel_linear(fn, *xs_, mesh=mesh, transition=transition,
                                       state=list(ps), return_state=True)  # a list: as a tuple
      return context_parallel_linear(lambda *ys, **kw: fn(*ys, *ps, **kw), *xs_, mesh=mesh,
                                     transition=transition)

    def one(*args, fn=fn, n=n, with_state=with_state):
      xs_, ps = args[:n], args[n:]
      if with_state:
        return fn(*xs_, state=ps, return_state=True)
      return fn(*xs_, *ps, return_state=False)

    args = xs + params

    @jax.jit
    def both(args, split=split, one=one):
      o1, f1 = jax.vjp(split, *args)
      o2, f2 = jax.vjp(one, *args)
      cts = jax.tree.map(lambda o: jax.random.normal(jax.random.key(7), o.shape, o.dtype), o2)
      return (o1, f1(cts)), (o2, f2(cts))

    (o1, g1), (o2, g2) = both(args)
    errs = {}
    leaves = [('out', a, b) for a, b in zip(jax.tree.leaves(o1), jax.tree.leaves(o2))]
    leaves += [(f'd{i}', a, b) for i, (a, b) in enumerate(zip(g1, g2))]
    for i, (what, x, y) in enumerate(leaves):
      x, y = np.asarray(x), np.asarray(y)
      assert np.isfinite(x).all() and np.abs(y).max() > 0, (name, what)
      errs[f'{what}.{i}'] = float(np.max(np.abs(x - y) / np.maximum(1.0, np.abs(y))))
    out[name] = errs
    print(name, errs, flush=True)
  print('RESULT ' + json.dumps(out), flush=True)


# --------------------------------------------------------------------------- layers

LAYER_CASES = ('focused_dwc', 'retention_gate', 'inline', 'deltanet', 'mamba2', 'lightning_linen',
               'flow')


@pytest.mark.slow
def test_layers_under_context_mesh_match_8_devices():
  res = _run_worker('layers', ','.join(LAYER_CASES))
  assert sorted(res) == sorted(LAYER_CASES)
  for case, r in res.items():
    # 'flow' is not affine in its state: it must not take the split path
    assert (r['cp_calls'] > 0) == (case != 'flow'), (case, r)
    for what in ('y', 'dx', 'dparams'):
      assert r[what] < 2e-5, (case, what, r)


def _layers_worker(selected):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from attnjax import variants
  from attnjax.parallel import activation_sharding, linear_cp, make_mesh
  assert jax.device_count() == 8
  calls = [0]
  original = linear_cp.context_parallel_linear

  def counted(*args, **kwargs):
    calls[0] += 1
    return original(*args, **kwargs)

  linear_cp.context_parallel_linear = counted
  mesh = make_mesh(dict(data=2, context=4))
  cases = {
      'focused_dwc': ('focused', dict(causal=True, dwc_size=3, chunk_size=4)),
      'retention_gate': ('retention', dict(gate=True, chunk_size=4)),
      'inline': ('inline', dict(causal=True, chunk_size=4)),
      'deltanet': ('deltanet', dict(chunk_size=2, conv_size=4)),
      'mamba2': ('mamba2', dict(chunk_size=2, conv_size=3)),
      'lightning_linen': ('lightning', dict(learnable_decay=True, chunk_size=4)),
      'flow': ('flow', dict(causal=True, chunk_size=4)),
  }
  x = jax.random.normal(jax.random.key(3), (2, 16, 16))
  ct = jax.random.normal(jax.random.key(4), (2, 16, 16))
  out = {}
  for name in selected.split(','):
    mech, opts = cases[name]
    if name.endswith('_linen'):
      layer = variants.get_linen(mech)(d_model=16, num_heads=2, **opts)
      params = layer.init(jax.random.key(0), x)
      apply = lambda p, x, layer=layer: layer.apply(p, x)
    else:
      model = variants.build(mech, d_model=16, num_heads=2, rngs=nnx.Rngs(0), **opts)
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)
      apply = lambda p, x, graphdef=graphdef, rest=rest: nnx.merge(graphdef, p, rest)(x)

    def vjp(p, x, apply=apply):
      y, f = jax.vjp(apply, p, x)
      dp, dx = f(ct)
      return y, dx, dp

    calls[0] = 0
    want = jax.jit(vjp)(params, x)
    assert calls[0] == 0
    with jax.set_mesh(mesh), activation_sharding(mesh):
      got = jax.jit(vjp)(params, x)
    r = {'cp_calls': calls[0]}
    for what, a, b in zip(('y', 'dx', 'dparams'), got, want):
      r[what] = max(float(np.max(np.abs(np.asarray(u) - np.asarray(w)))
                          / max(1.0, float(np.max(np.abs(np.asarray(w))))))
                    for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    out[name] = r
    print(name, r, flush=True)
  del nn, jnp
  print('RESULT ' + json.dumps(out), flush=True)


# --------------------------------------------------------------------------- train step

FAST_VARIANTS = ('gla',)
SLOW_VARIANTS = ('linear', 'gated_deltanet', 'lightning', 'mamba2')


@pytest.mark.parametrize('variants', [
    pytest.param(FAST_VARIANTS, id='gla', marks=pytest.mark.slow),   # ~100 s
    pytest.param(SLOW_VARIANTS, id='more', marks=pytest.mark.slow)])
def test_lm_train_step_data2_context4_matches_one_device(tmp_path, variants):
  res = _run_worker('train', str(tmp_path), ','.join(variants))
  assert sorted(res) == sorted(variants)
  for variant, r in res.items():
    cp, dp = r['cp'], r['dp']
    assert cp['cp_calls'] > 0 and r['ref_cp_calls'] == dp['cp_calls'] == 0, (variant, r)
    assert cp['loss_rel'] < 1e-6, (variant, r)
    # the gradient over all parameters, max-norm relative
    assert cp['grad_rel'] < 1e-6, (variant, r)
    # per parameter, gradient and parameters after the (AdamW) step: no worse than plain
    # data parallelism (8 devices, no context split), whose batch reductions already
    # change the summation order (AdamW's first step, ~ lr * sign(gradient), magnifies it)
    for what in ('grad_leaf_rel', 'params_leaf_rel'):
      assert cp[what] <= max(1e-6, 2 * dp[what]), (variant, what, r)


def _config(data_dir, variant, mesh):
  from attnjax.train import config_lib
  c = config_lib.base_config()
  c.task = 'lm'
  c.data.name = 'mqar'
  c.data.params.vocab_size = 16
  c.data.params.num_pairs = 2
  c.data.params.seq_len = 16
  c.data.num_train, c.data.num_test = 64, 16
  c.data.data_dir = str(data_dir)
  c.model = config_lib.model_config('lm', 'T', variant=variant, seq_len=16, vocab_size=16)
  c.model.num_heads = c.model.num_kv_heads = 2
  c.model.head_dim = 8
  if 'chunk_size' in c.model.attention:
    c.model.attention.chunk_size = 2   # several chunks per shard of 4 tokens
  c.num_steps, c.batch_size, c.eval_batch_size = 2, 8, 8
  c.log_every, c.checkpoint_every = 1, 0
  c.schedule.warmup_steps = 0       # the first step updates the parameters
  c.tensorboard = False
  c.progress_bar = False
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.context = mesh
  return c


def _loss(t, params, batch):
  """The trainer's training loss (deterministic) on ``batch``."""
  from flax import nnx

  from attnjax.train import losses
  model = nnx.merge(t.graphdef, params, t.rest)
  out = model(batch[t.input_key], deterministic=True)
  return losses.compute(t.config.task, out, batch)[0]


def _train_worker(data_dir, selected):
  import jax

  from attnjax.parallel import linear_cp
  from attnjax.train import trainer
  assert jax.device_count() == 8
  calls = [0]
  original = linear_cp.context_parallel_linear

  def counted(*args, **kwargs):
    calls[0] += 1
    return original(*args, **kwargs)

  linear_cp.context_parallel_linear = counted
  out = {}
  for variant in selected.split(','):
    runs = {}
    for label, mesh, devices in (('ref', (1, 1, 1, 1), jax.devices()[:1]),
                                 ('dp', (8, 1, 1, 1), None), ('cp', (2, 1, 1, 4), None)):
      calls[0] = 0
      t = trainer.Trainer(_config(data_dir, variant, mesh), None, devices=devices)
      batch = t.global_batch(next(iter(t.train_ds)))
      state = t.init()
      with t._ctx():  # pylint: disable=protected-access  (the trainer's mesh and rules)
        grads = jax.jit(jax.grad(functools.partial(_loss, t)))(state['params'], batch)
      grads = jax.tree.map(np.asarray, grads)
      state, metrics = t.step(state, batch)
      runs[label] = dict(loss=float(metrics['loss']), grads=grads, calls=calls[0],
                         params=jax.tree.map(np.asarray, state['params']))
    ref = runs['ref']
    out[variant] = {'ref_cp_calls': ref['calls']}
    for label in ('dp', 'cp'):
      r = runs[label]
      g = list(zip(jax.tree.leaves(r['grads']), jax.tree.leaves(ref['grads'])))
      pp = list(zip(jax.tree.leaves(r['params']), jax.tree.leaves(ref['params'])))
      leaf_rel = lambda pairs: max(float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-30))
                                   for x, y in pairs)
      out[variant][label] = dict(
          loss_rel=abs(r['loss'] - ref['loss']) / abs(ref['loss']),
          grad_rel=(max(float(np.max(np.abs(x - y))) for x, y in g)
                    / max(float(np.max(np.abs(y))) for _, y in g)),
          grad_leaf_rel=leaf_rel(g), params_leaf_rel=leaf_rel(pp), cp_calls=r['calls'])
    print(variant, out[variant], flush=True)
  print('RESULT ' + json.dumps(out), flush=True)


if __name__ == '__main__':
  {'ops': _ops_worker, 'train': _train_worker, 'layers': _layers_worker}[sys.argv[1]](*sys.argv[2:])
