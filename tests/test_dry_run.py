"""The dry run (attnjax.train.dry_run, ``train.py --dry_run``): the train step of a pod-sized
mesh compiled on fake CPU devices without allocating, and its per-device report.

Multi-device cases run this file as a script in a subprocess (a fresh JAX that gets its
fake CPU devices before it initialises; ``train.py --dry_run`` is also run as a user runs
it, where it re-executes itself with ``XLA_FLAGS`` when it has too few devices).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1024 ** 3


def _config(arg, **overrides):
  """A config file's ``get_config(arg)`` with dotted ``overrides`` applied."""
  from attnjax.train import cli
  name, _, a = arg.partition(':')
  c = cli.load_config_file(os.path.join(ROOT, 'configs', name) + (f':{a}' if a else ''))
  for key, value in overrides.items():
    node, parts = c, key.split('.')
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
  return c


def _run_script(case, *args, devices=None, timeout=600, env_extra=None):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''),
             JAX_PLATFORMS='cpu', **(env_extra or {}))
  if devices:
    env['XLA_FLAGS'] = xla_flags(f'--xla_force_host_platform_device_count={devices}')
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), case, *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- pure helpers

HLO = """
ENTRY %main {
  %p = f32[8,16]{1,0} parameter(0)
  %all-gather.1 = f32[32,16]{1,0} all-gather(%p), dimensions={0}, metadata={op_name="jit(f)/dot"}
  %all-reduce.2 = (f32[], bf16[4,4]{1,0}) all-reduce(%a, %b), channel_id=2, to_apply=%sum
  %all-gather-start.3 = (f32[8]{0}, f32[64]{0}) all-gather-start(%q), channel_id=3
  %all-gather-done.3 = f32[64]{0} all-gather-done(%all-gather-start.3)
  %cp-start = (f32[2,2]{1,0}, f32[2,2]{1,0}, u32[], u32[]) collective-permute-start(%r)
  %cp-done = f32[2,2]{1,0} collective-permute-done(%cp-start)
  %fusion.all-reduce.like = f32[4]{0} fusion(%all-reduce.2), kind=kLoop, calls=%f
  ROOT %reduce-scatter.9 = s32[4]{0} reduce-scatter(%x), dimensions={0}
}
"""


def test_count_collectives_parses_sync_async_and_tuples():
  from attnjax.train.dry_run import collective_ops, count_collectives
  got = count_collectives(HLO)
  assert got['all-gather'] == {'count': 2, 'bytes': 32 * 16 * 4 + 64 * 4}
  assert got['all-reduce'] == {'count': 1, 'bytes': 4 + 16 * 2}
  assert got['collective-permute'] == {'count': 1, 'bytes': 16}
  assert got['reduce-scatter'] == {'count': 1, 'bytes': 16}
  assert got['all-to-all'] == {'count': 0, 'bytes': 0}
  ops = collective_ops(HLO)
  assert ops[0]['source'] == 'jit(f)/dot' and ops[0]['result'] == 'f32[32,16]{1,0}'


def test_leaf_bytes_uses_the_shard_shape():
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from attnjax.train.dry_run import leaf_bytes
  mesh = jax.make_mesh((1,), ('fsdp',), devices=jax.devices()[:1])
  assert leaf_bytes((6, 10), np.float32) == 240
  assert leaf_bytes((6, 10), jax.numpy.bfloat16, NamedSharding(mesh, P('fsdp'))) == 120
  key = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), 3))
  assert leaf_bytes(key.shape, key.dtype) == 3 * 8  # threefry keys: 2 x uint32 each


def test_bad_num_devices_is_a_value_error():
  import jax

  from attnjax.train import dry_run
  jax.devices()  # this process's backend is initialised: its device count is fixed
  c = _config('mqar.py:runlocal')
  with pytest.raises(ValueError, match='num_devices'):
    dry_run.dry_run(c, num_devices=0)
  with pytest.raises(ValueError, match=r'num_devices=100000.*XLA_FLAGS'):
    dry_run.dry_run(c, num_devices=100_000)


# --------------------------------------------------------------------------- 8 fake devices

def _case_small():
  """mqar:runlocal on data 2 x fsdp 4: the report against the state Trainer.init()
  really allocates, and against a pure data-parallel mesh."""
  import jax

  from attnjax.train import dry_run, trainer
  # attention through XLA ops, which GSPMD partitions (a kernel's custom call is not: it
  # gathers the batch, see docs/training.md)
  xla = {'model.attention.implementation': 'xla'}
  c = _config('mqar.py:runlocal', **{'mesh.data': 2, 'mesh.fsdp': 4}, **xla)
  res = dry_run.dry_run(c, 8)
  live_after_dry_run = sum(x.nbytes for x in jax.live_arrays())
  dp = dry_run.dry_run(_config('mqar.py:runlocal', **{'mesh.data': 8}, **xla), 8,
                       activations=False)
  # ground truth: allocate the state for real and measure one device's shards
  t = trainer.Trainer(c, devices=jax.devices()[:8], data=False)
  state = t.init()

  def on_device0(tree):
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
               if s.device == jax.devices()[0])
  print(json.dumps(dict(
      res={k: v for k, v in res.items() if k != 'largest_collectives'},
      report=dry_run.format_report(res), dp_collectives=dp['collectives'],
      dp_params=dp['bytes_per_device']['params'],
      live_after_dry_run=live_after_dry_run,
      real_params=on_device0(state['params']), real_opt=on_device0(state['opt_state']),
      global_params=sum(x.nbytes for x in jax.tree.leaves(state['params'])))))


def test_dry_run_small_mesh_matches_the_real_state():
  out = _run_script('small', devices=8)
  res, b = out['res'], out['res']['bytes_per_device']
  assert res['mesh'] == {'data': 2, 'fsdp': 4, 'tensor': 1, 'context': 1}
  assert res['num_devices'] == 8 and res['platform'] == 'cpu'
  # nothing was allocated by the dry run
  assert out['live_after_dry_run'] < 1024, out['live_after_dry_run']
  # per-device state bytes are exactly those of the really allocated, sharded state
  assert b['params'] == out['real_params'], (b['params'], out['real_params'])
  assert b['optimizer'] == out['real_opt'], (b['optimizer'], out['real_opt'])
  assert res['global_param_bytes'] == out['global_params'] == 4 * res['num_params']
  assert b['params'] < out['global_params'] / 2  # fsdp=4 really splits them
  assert out['dp_params'] == out['global_params']  # data-parallel: replicated
  # XLA's view agrees: the state and the batch are the arguments, the state is donated
  state_bytes = b['params'] + b['optimizer']
  assert state_bytes + b['batch'] <= b['arguments'] <= state_bytes + b['batch'] + b['other_state']
  assert state_bytes <= b['aliased'] <= b['outputs']
  assert b['temporaries'] > 0 and 0 < b['saved_activations']
  assert b['peak'] == b['arguments'] + b['outputs'] - b['aliased'] + b['temporaries']
  # fsdp gathers parameters; pure data parallelism only all-reduces gradients
  assert res['collectives']['all-gather']['count'] > 0
  assert res['collectives']['all-reduce']['count'] > 0
  assert out['dp_collectives']['all-gather']['count'] == 0
  assert out['dp_collectives']['all-reduce']['count'] > 0
  for needle in ('parameters (exact', 'optimizer state', 'XLA temporaries', 'all-gather',
                 'mesh data 2 x fsdp 4'):
    assert needle in out['report'], out['report']


def test_train_py_dry_run_reexecs_with_fake_devices(tmp_path):
  """`python train.py --dry_run` in a process with 1 device: it re-runs itself with
  XLA_FLAGS for the 4 devices of the mesh, prints the table, creates no workdir."""
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''),
             JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags())
  env.pop('ATTNJAX_DRY_RUN_DEVICES', None)
  workdir = tmp_path / 'w'
  cmd = [sys.executable, 'train.py', '--config=configs/mqar.py:runlocal',
         '--config.model_factory=attnjax.train.testing:build_tiny_model',
         '--config.mesh.fsdp=4', '--dry_run', f'--workdir={workdir}']
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert 're-running with JAX_PLATFORMS=cpu --xla_force_host_platform_device_count=4' in proc.stderr
  assert 'dry run: 4 cpu devices, mesh fsdp 4' in proc.stdout, proc.stdout
  assert 'XLA temporaries' in proc.stdout and 'all-gather' in proc.stdout
  assert not workdir.exists()
  # a config mistake is one ERROR line (status 2), as in training
  bad = subprocess.run(cmd[:-2] + ['--dry_run', '--dry_run_devices=3'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2, bad.stderr[-3000:]
  assert 'ERROR: config.mesh' in bad.stderr


# --------------------------------------------------------------------------- the trainer path

def test_scanned_rematted_dropout_model_trains(tmp_path):
  """The step the dry run compiles also runs: scan_layers + remat + dropout (each layer's
  RNG key stays per layer; the model's variables are merged at the grad trace's level)."""
  import jax

  from attnjax.train import trainer
  c = _config('mqar.py:runlocal', **{
      'model.scan_layers': True, 'model.remat_policy': 'full', 'model.dropout_rate': 0.1,
      'model.num_layers': 2, 'data.data_dir': str(tmp_path / 'd'), 'mesh.data': 1})
  t = trainer.Trainer(c, devices=jax.devices()[:1])
  state = t.init()
  before = jax.tree.map(np.asarray, state['params'])
  it = iter(t.train_ds)
  losses = []
  for _ in range(2):
    state, m = t.step(state, t.global_batch(next(it)))
    losses.append(float(m['loss']))
  assert int(state['step']) == 2 and int(state['nonfinite_step']) == -1
  assert all(np.isfinite(losses))
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), state['params'], before)
  assert all(jax.tree.leaves(changed))


# --------------------------------------------------------------------------- the pod config

def _case_pod():
  from attnjax.train import dry_run
  res = dry_run.dry_run(_config('lm_pod.py:dry'))
  print(dry_run.format_report(res), file=sys.stderr)
  print(json.dumps(res))


@pytest.mark.slow
def test_lm_pod_dry_run_on_64_fake_devices():
  full = _config('lm_pod.py')
  assert full.mesh.data * full.mesh.fsdp * full.mesh.context * full.mesh.tensor == 256
  out = _run_script('pod')  # no XLA_FLAGS count: dry_run gives the fresh process 64 devices
  b = out['bytes_per_device']
  assert out['num_devices'] == 64
  assert out['mesh'] == {'data': 4, 'fsdp': 16, 'tensor': 1, 'context': 1}
  # every parameter has an 'embed' dimension: exactly 1/16 of them per device
  assert b['params'] * 16 == out['global_param_bytes'] == 4 * out['num_params']
  assert 2 * b['params'] <= b['optimizer'] <= 2 * b['params'] + 1024  # AdamW mu, nu (+count)
  # fits one 16 GiB chip, and no collective moves a whole batch of activations
  assert b['peak'] < 16 * GiB, b
  largest = max(e['bytes'] for e in out['largest_collectives'])
  assert largest <= 512 * 1024 ** 2, out['largest_collectives']
  assert out['collectives']['all-gather']['count'] > 0


def test_lm_pod_is_about_1b_parameters():
  import jax
  from flax import nnx

  from attnjax import models
  c = _config('lm_pod.py')
  m = nnx.eval_shape(lambda: models.build_model(c.model, rngs=nnx.Rngs(0)))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert 0.9e9 < n < 1.2e9, n
  assert c.model.num_kv_heads < c.model.num_heads  # GQA
  assert _config('lm_pod.py:dry').model.num_layers == 2


if __name__ == '__main__':
  {'small': _case_small, 'pod': _case_pod}[sys.argv[1]]()
