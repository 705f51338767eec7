"""attnjax.parallel: mesh from config, logical-axis rules, ring attention (8 fake devices).

Multi-device cases run this file as a script in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 set before JAX is imported.
"""

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


FAST_CASES = ('causal/zigzag/ctx4', 'sliding_window/zigzag/ctx4', 'document+causal/zigzag/ctx4')
SLOW_CASES = ('causal/contiguous/ctx8', 'causal/zigzag/ctx2+tensor2', 'document/contiguous/ctx4',
              'full/zigzag/ctx8')


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


def _ring_worker(selected):
  import jax
  import jax.numpy as jnp
  import attnjax
  from attnjax import masks
  from attnjax.parallel import make_mesh, ring_attention
  assert jax.device_count() == 8
  B, T, N, K, H = 2, 32, 4, 2, 8
  ks = jax.random.split(jax.random.key(42), 6)
  q = jax.random.normal(ks[0], (B, T, N, H))
  k = jax.random.normal(ks[1], (B, T, K, H))
  v = jax.random.normal(ks[2], (B, T, K, H))
  ct = jax.random.normal(ks[3], (B, T, N, H))
  seg = jnp.asarray(np.repeat(np.array([[0, 0, 1, 1, 1, 2, 3, 3], [0, 1, 1, 1, 2, 2, 2, 2]]),
                              4, axis=1), jnp.int32)
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
  }
  out = {}
  for name, (mcfg, mask, segs, layout) in cases.items():
    if name not in selected.split(','):
      continue
    mesh = make_mesh(dict(dict(data=1, fsdp=1, tensor=1, context=1), **mcfg))
    kw = {} if segs is None else dict(q_segment_ids=segs, kv_segment_ids=segs)

    def ring(q, k, v):
      return ring_attention(q, k, v, mesh=mesh, mask=mask, layout=layout, **kw)

    def ref(q, k, v):
      return attnjax.reference_attention(q, k, v, mask=mask, **kw)

    @jax.jit
    def both(q, k, v, ct):
      o1, f1 = jax.vjp(ring, q, k, v)
      o2, f2 = jax.vjp(ref, q, k, v)
      return (o1, *f1(ct)), (o2, *f2(ct))

    a, b = both(q, k, v, ct)
    errs = {}
    for what, x, y in zip(('out', 'dq', 'dk', 'dv'), a, b):
      x, y = np.asarray(x), np.asarray(y)
      assert np.isfinite(x).all()
      errs[what] = float(np.max(np.abs(x - y) / (1e-5 + np.abs(y)).clip(min=1.0)))
    out[name] = errs
  print('RESULT ' + json.dumps(out), flush=True)


if __name__ == '__main__':
  {'ring': _ring_worker}[sys.argv[1]](*sys.argv[2:])
