"""attnjax.parallel: mesh from config, logical-axis rules, ring attention (8 fake devices).

Multi-device cases run this file as a script in a subprocess with
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


# --------------------------------------------------------------------------- mesh / rules

def test_mesh_shape_fill_and_errors():
  from attnjax.parallel import mesh_shape
  assert mesh_shape(dict(data=-1, fsdp=2, tensor=1, context=2), 8) == (2, 2, 1, 2)
  assert mesh_shape(None, 4) == (4, 1, 1, 1)
  assert mesh_shape(dict(data=2, fsdp=2, tensor=2, context=1), 8) == (2, 2, 2, 1)
  with pytest.raises(ValueError, match='config.mesh'):
    mesh_shape(dict(data=3, fsdp=1, tensor=1, context=1), 8)
  with pytest.raises(ValueError, match=r'config.mesh.*does not divide'):
    mesh_shape(dict(data=-1, fsdp=3), 8)
  with pytest.raises(ValueError, match='at most one axis'):
    mesh_shape(dict(data=-1, fsdp=-1), 8)
  with pytest.raises(ValueError, match=r'config.mesh.tensor'):
    mesh_shape(dict(data=1, tensor=0), 1)
  with pytest.raises(ValueError, match='unknown axes'):
    mesh_shape(dict(data=1, model=1), 1)


def test_logical_to_spec_rules():
  import jax
  from jax.sharding import PartitionSpec as P

  from attnjax.parallel import DEFAULT_ACTIVATION_RULES, DEFAULT_PARAM_RULES, logical_to_spec

  class FakeMesh:  # only .shape is read
    shape = {'data': 2, 'fsdp': 2, 'tensor': 2, 'context': 1}

  m = FakeMesh()
  assert logical_to_spec(('batch', 'length', 'embed'), (8, 16, 32), DEFAULT_ACTIVATION_RULES,
                         m) == P(('data', 'fsdp'), None, None)
  assert logical_to_spec(('embed', 'mlp'), (32, 64), DEFAULT_PARAM_RULES, m) == P('fsdp', 'tensor')
  # non-dividing dims are replicated on that axis; a mesh axis is used once per array
  assert logical_to_spec(('batch',), (6,), DEFAULT_ACTIVATION_RULES, m) == P('data')
  assert logical_to_spec(('heads', 'mlp'), (4, 8), DEFAULT_ACTIVATION_RULES, m) == P('tensor', None)
  with pytest.raises(ValueError, match="'nope'"):
    logical_to_spec(('nope',), (4,), DEFAULT_PARAM_RULES, m)
  with pytest.raises(ValueError, match='rank'):
    logical_to_spec(('embed',), (4, 4), DEFAULT_PARAM_RULES, m)
  del jax


def test_flax_rules_to_spec_semantics():
  from jax.sharding import PartitionSpec as P

  from attnjax.parallel import flax_rules_to_spec

  class FakeMesh:  # .shape / .axis_names / .axis_types are read
    shape = {'data': 4, 'model': 2}
    axis_names = ('data', 'model')
    axis_types = None

  m = FakeMesh()
  rules = (('batch', 'data'), ('heads', 'model'), ('mlp', 'model'), ('mlp', 'data'),
           ('embed', None), ('length', ('data', 'model')))
  # several rules per name: the first whose axes are free in this array wins
  assert flax_rules_to_spec(('heads', 'mlp'), (4, 8), rules, m) == P('model', 'data')
  assert flax_rules_to_spec(('mlp',), (8,), rules, m) == P('model')
  # a rule to None replicates, a None name replicates, a name without a rule is unconstrained
  assert flax_rules_to_spec(('embed', None, 'vocab'), (8, 8, 8), rules, m) == P(
      None, None, P.UNCONSTRAINED)
  # a non-dividing mesh axis is dropped; a multi-axis rule keeps the axes that divide
  assert flax_rules_to_spec(('batch',), (6,), rules, m) == P(None)
  assert flax_rules_to_spec(('length',), (8,), rules, m) == P(('data', 'model'))
  assert flax_rules_to_spec(('length',), (4,), rules, m) == P('data')
  # axes missing from the mesh are dropped
  assert flax_rules_to_spec(('batch',), (8,), (('batch', 'pod'),), m) == P(None)


def test_constrain_noop_without_mesh_and_rank_check():
  import jax.numpy as jnp

  from attnjax.parallel import constrain
  x = jnp.arange(12.0).reshape(3, 4)
  assert constrain(x, ('batch', 'embed')) is x
  with pytest.raises(ValueError, match='rank 2'):
    constrain(x, ('batch',))


def test_ring_single_device_matches_reference_and_validates():
  import jax
  import jax.numpy as jnp

  import attnjax
  from attnjax.parallel import ring_attention
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (2, 16, 4, 8))
  k = jax.random.normal(ks[1], (2, 16, 2, 8))
  v = jax.random.normal(ks[2], (2, 16, 2, 8))
  out = ring_attention(q, k, v, mask=attnjax.masks.causal())
  ref = attnjax.reference_attention(q, k, v, mask=attnjax.masks.causal())
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='multiple of kv heads'):
    ring_attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2))
  with pytest.raises(ValueError, match='rank 4'):
    ring_attention(q[0], k, v)
  with pytest.raises(TypeError, match='cannot be split'):
    ring_attention(q, k, v, mask=jnp.ones((16, 16), bool))
  with pytest.raises(ValueError, match='layout'):
    ring_attention(q, k, v, layout='spiral')
  with pytest.raises(ValueError, match='scale must be a scalar'):
    ring_attention(q, k, v, scale=jnp.ones((2,)))
  # a traced (learnable) scale: output and d(scale) agree with the reference's
  ct = jax.random.normal(jax.random.key(1), out.shape)
  def loss(fn, s):
    return jnp.vdot(fn(q, k, v, mask=attnjax.masks.causal(), scale=s), ct)
  s0 = jnp.float32(0.3)
  got = jax.jit(jax.value_and_grad(lambda s: loss(ring_attention, s)))(s0)
  want = jax.value_and_grad(lambda s: loss(attnjax.reference_attention, s))(s0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- 8 devices

def _run_worker(name, *args):
  env = dict(os.environ, XLA_FLAGS=xla_flags('--xla_force_host_platform_device_count=8'),
             PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''),
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), name, *args], env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1]
  return json.loads(line[len('RESULT '):])


FAST_CASES = ('causal/zigzag/ctx4', 'sliding_window/zigzag/ctx4', 'document+causal/zigzag/ctx4',
              'causal+traced_scale/zigzag/ctx4', 'window+mods/zigzag/ctx4',
              'document+causal+mods/allgather/ctx4')
SLOW_CASES = ('causal/contiguous/ctx8', 'causal/zigzag/ctx2+tensor2', 'document/contiguous/ctx4',
              'full/zigzag/ctx8', 'causal+mods/zigzag/ctx2+tensor2', 'causal+mods/allgather/ctx8',
              'sliding_window/allgather/ctx2+tensor2')


@pytest.mark.parametrize('cases', [
    pytest.param(FAST_CASES, id='causal-window-document'),
    pytest.param(SLOW_CASES, id='more-layouts', marks=pytest.mark.slow)])
def test_ring_attention_8_devices_fwd_bwd(cases):
  res = _run_worker('ring', ','.join(cases))
  assert sorted(res) == sorted(cases)
  for case, errs in res.items():
    # forward and the three input gradients, float32
    for what, err in errs.items():
      assert err < 2e-5, (case, what, err)


def test_constrain_follows_flax_logical_rules_on_user_mesh_8_devices():
  res = _run_worker('flax_rules')
  for types in ('explicit', 'auto'):
    r = res[types]
    # q [B, T, N, H] split by heads over 'model', the output's batch over 'data'
    assert r['layer_constraints'] == [['data', None, 'model', None], ['data', None, None]], r
    assert r['layer_err'] < 1e-5, r
    assert r['out_spec'] == ['data', None, None], r
    # no rules, or no mesh: nothing is constrained
    assert r['mesh_only_constraints'] == 0 and r['rules_only_constraints'] == 0, r
    # the trainer's activation_sharding takes precedence over Flax's rules
    assert r['trainer_constraints'] == [['data', None, 'tensor', None], ['data', None, None]], r
  # explicit mesh: a name without a rule keeps the input's sharding (batch over 'data')
  assert res['explicit']['unruled_batch_spec'] == ['data', None, 'model'], res
  assert res['explicit']['nondividing_spec'] == [None, None, 'model'], res


def _ring_worker(selected):
  import jax
  import jax.numpy as jnp

  import attnjax
  from attnjax import masks
  from attnjax.parallel import allgather_attention, make_mesh, ring_attention
  assert jax.device_count() == 8
  B, T, N, K, H = 2, 32, 4, 2, 8
  ks = jax.random.split(jax.random.key(42), 6)
  q = jax.random.normal(ks[0], (B, T, N, H))
  k = jax.random.normal(ks[1], (B, T, K, H))
  v = jax.random.normal(ks[2], (B, T, K, H))
  ct = jax.random.normal(ks[3], (B, T, N, H))
  seg = jnp.asarray(np.repeat(np.array([[0, 0, 1, 1, 1, 2, 3, 3], [0, 1, 1, 1, 2, 2, 2, 2]]),
                              4, axis=1), jnp.int32)
  sinks = jax.random.normal(ks[4], (N,))
  table = jax.random.normal(ks[5], (N, 2 * T - 1))  # a learnable relative-position bias
  cases = {
      'causal/zigzag/ctx4': (dict(data=2, context=4), masks.causal(), None, 'zigzag'),
      'causal/contiguous/ctx8': (dict(data=1, context=8), masks.causal(), None, 'contiguous'),
      'causal/zigzag/ctx2+tensor2': (dict(data=2, tensor=2, context=2), masks.causal(), None,
                                     'zigzag'),
      'sliding_window/zigzag/ctx4': (dict(data=2, context=4), masks.sliding_window(5), None,
                                     'zigzag'),
      'document+causal/zigzag/ctx4': (dict(data=2, context=4), masks.causal(), seg, 'zigzag'),
      'document/contiguous/ctx4': (dict(data=2, context=4), None, seg, 'contiguous'),
      'full/zigzag/ctx8': (dict(data=1, context=8), None, None, 'zigzag'),
      'causal+traced_scale/zigzag/ctx4': (dict(data=2, context=4), masks.causal(), None,
                                          'zigzag'),
      'window+mods/zigzag/ctx4': (dict(data=2, context=4), masks.sliding_window(6), None,
                                  'zigzag'),
      'document+causal+mods/allgather/ctx4': (dict(data=2, context=4), masks.causal(), seg,
                                              'allgather'),
      'causal+mods/zigzag/ctx2+tensor2': (dict(data=2, tensor=2, context=2), masks.causal(),
                                          None, 'zigzag'),
      'causal+mods/allgather/ctx8': (dict(data=1, context=8), masks.causal(), None,
                                     'allgather'),
      'sliding_window/allgather/ctx2+tensor2': (dict(data=2, tensor=2, context=2),
                                                masks.sliding_window(5), None, 'allgather'),
  }
  out = {}
  for name, (mcfg, mask, segs, layout) in cases.items():  # layout 'allgather': that variant
    if name not in selected.split(','):
      continue
    mesh = make_mesh(dict(dict(data=1, fsdp=1, tensor=1, context=1), **mcfg))
    kw = {} if segs is None else dict(q_segment_ids=segs, kv_segment_ids=segs)

    # '+traced_scale': the scale is an input (learnable), differentiated as well;
    # '+mods': sinks, softcap and a score mod closing over a bias table (all differentiated)
    traced = 'traced_scale' in name
    mods = '+mods' in name
    scale = jnp.float32(0.27)
    fn = allgather_attention if layout == 'allgather' else functools.partial(
        ring_attention, layout=layout)

    def extra(s, sk, tb, traced=traced, mods=mods):
      kw = dict(scale=s if traced else None)
      if mods:
        kw.update(sinks=sk, softcap=4.0,
                  score_mod=lambda sc, b, h, qi, ki: sc + tb[h, qi - ki + T - 1])
      return kw

    def ring(q, k, v, s, sk, tb, mesh=mesh, mask=mask, kw=kw, fn=fn, extra=extra):
      return fn(q, k, v, mesh=mesh, mask=mask, **kw, **extra(s, sk, tb))

    def ref(q, k, v, s, sk, tb, mask=mask, kw=kw, extra=extra):
      return attnjax.reference_attention(q, k, v, mask=mask, **kw, **extra(s, sk, tb))

    @jax.jit
    def both(q, k, v, s, sk, tb, ct, ring=ring, ref=ref):
      o1, f1 = jax.vjp(ring, q, k, v, s, sk, tb)
      o2, f2 = jax.vjp(ref, q, k, v, s, sk, tb)
      return (o1, *f1(ct)), (o2, *f2(ct))

    a, b = both(q, k, v, scale, sinks, table, ct)
    errs = {}
    whats = ('out', 'dq', 'dk', 'dv', 'dscale', 'dsinks', 'dtable')
    for what, x, y in zip(whats, a, b):
      if (what == 'dscale' and not traced) or (what in ('dsinks', 'dtable') and not mods):
        continue
      x, y = np.asarray(x), np.asarray(y)
      assert np.isfinite(x).all()
      errs[what] = float(np.max(np.abs(x - y) / (1e-5 + np.abs(y)).clip(min=1.0)))
    out[name] = errs
  print('RESULT ' + json.dumps(out), flush=True)


def _flax_rules_worker():
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  from attnjax.layers import MultiHeadAttention
  from attnjax.parallel import activation_sharding, constrain, make_mesh
  assert jax.device_count() == 8
  rules = (('batch', 'data'), ('length', None), ('embed', None), ('heads', 'model'),
           ('kv_heads', 'model'), ('head_dim', None), ('mlp', 'model'))
  x = jax.random.normal(jax.random.key(7), (8, 6, 16))
  ref_layer = MultiHeadAttention(16, 4, rngs=nnx.Rngs(0))
  y_ref = np.asarray(ref_layer(x))

  def specs(fn, *args):
    out = []
    for e in jax.make_jaxpr(fn)(*args).eqns:
      if e.primitive.name in ('sharding_constraint', 'reshard'):
        sh = e.params.get('sharding', e.params.get('dst_sharding'))
        spec = tuple(sh.spec) + (None,) * (len(e.outvars[0].aval.shape) - len(sh.spec))
        out.append(list(spec))
    return out

  def full(spec, ndim):
    return list(tuple(spec) + (None,) * (ndim - len(spec)))

  res = {}
  for label, t in (('explicit', AxisType.Explicit), ('auto', AxisType.Auto)):
    mesh = jax.make_mesh((4, 2), ('data', 'model'), axis_types=(t, t))
    r = {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      layer = MultiHeadAttention(16, 4, rngs=nnx.Rngs(0))
      r['layer_constraints'] = specs(layer.__call__, x)
      y = nnx.jit(lambda m, x: m(x))(layer, x)
      r['layer_err'] = float(np.max(np.abs(np.asarray(y) - y_ref)))
      r['out_spec'] = full(y.sharding.spec, 3)
    with jax.set_mesh(mesh):
      r['mesh_only_constraints'] = len(specs(lambda x: ref_layer(x), x))
    with nn.logical_axis_rules(rules):
      r['rules_only_constraints'] = len(specs(lambda x: ref_layer(x), x))
      tmesh = make_mesh(dict(data=2, fsdp=1, tensor=4, context=1))
      with activation_sharding(tmesh):
        r['trainer_constraints'] = specs(lambda x: ref_layer(x), x)
    if label == 'explicit':
      no_batch_rule = (('length', None), ('mlp', 'model'))
      with jax.set_mesh(mesh), nn.logical_axis_rules(no_batch_rule):
        xs = jax.device_put(x, NamedSharding(mesh, P('data')))
        z = jax.jit(lambda x: constrain(x * 2, ('batch', 'length', 'mlp')))(xs)
        r['unruled_batch_spec'] = full(z.sharding.spec, 3)
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        z = jax.jit(lambda x: constrain(x * 2, ('batch', 'length', 'mlp')))(x[:6])
        r['nondividing_spec'] = full(z.sharding.spec, 3)
    res[label] = r
  del jnp
  print('RESULT ' + json.dumps(res), flush=True)


if __name__ == '__main__':
  {'ring': _ring_worker, 'flax_rules': _flax_rules_worker}[sys.argv[1]](*sys.argv[2:])
