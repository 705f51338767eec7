"""attnjax.train: config checks, losses, sharded train step equivalence (8 fake devices).

Fault-tolerance tests (kill -9, corrupted checkpoint, NaN) are in test_train_faults.py.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir, *, steps=4, batch=8, seq_len=16, factory=None):
  """A tiny MQAR config (shared by the fault tests)."""
  sys.path.insert(0, ROOT)
  from attnjax.train import config_lib
  c = config_lib.base_config()
  c.task = 'lm'
  c.data.name = 'mqar'
  c.data.params.vocab_size = 16
  c.data.params.num_pairs = 2
  c.data.params.seq_len = seq_len
  c.data.num_train, c.data.num_test = 256, 32
  c.data.data_dir = str(data_dir)
  c.model = config_lib.model_config('lm', 'T', seq_len=seq_len, vocab_size=16)
  c.model.num_heads = c.model.num_kv_heads = 4
  c.model.head_dim = 8
  if factory:
    c.model_factory = factory
  c.num_steps, c.batch_size, c.eval_batch_size = steps, batch, batch
  c.log_every, c.checkpoint_every, c.eval_max_examples = 2, 0, 16
  c.schedule.warmup_steps = 1
  c.tensorboard = False
  c.progress_bar = False
  return c


# --------------------------------------------------------------------------- checks

def test_bad_configs_fail_before_compilation(tmp_path):
  from attnjax.train import trainer
  c = tiny_config(tmp_path)
  trainer.check_config(c, num_devices=1)  # the good one passes

  bad = tiny_config(tmp_path)
  bad.model.attention.name = 'no_such_attention'
  with pytest.raises(ValueError, match=r'config.model.attention.name'):
    trainer.check_config(bad, num_devices=1)

  bad = tiny_config(tmp_path)
  bad.mesh.data = 3
  with pytest.raises(ValueError, match=r'config.mesh'):
    trainer.check_config(bad, num_devices=8)

  bad = tiny_config(tmp_path, batch=12)
  bad.mesh.data = 8
  with pytest.raises(ValueError, match=r'config.batch_size=12'):
    trainer.check_config(bad, num_devices=8)

  bad = tiny_config(tmp_path)
  bad.data.tfds_name = 'surely_not_a_dataset_xyz'
  with pytest.raises(ValueError, match=r'config.data.tfds_name'):
    trainer.check_config(bad, num_devices=1)

  bad = tiny_config(tmp_path)
  bad.data.name = 'nonexistent_task'
  with pytest.raises(ValueError, match=r'config.data.name'):
    trainer.check_config(bad, num_devices=1)

  bad = tiny_config(tmp_path)
  bad.task = 'translation'
  with pytest.raises(ValueError, match=r'config.task'):
    trainer.check_config(bad, num_devices=1)

  bad = tiny_config(tmp_path)
  bad.model_factory = 'attnjax.nowhere:build'
  with pytest.raises(ValueError, match=r'config.model_factory'):
    trainer.check_config(bad, num_devices=1)


def test_trainer_constructor_rejects_before_compiling(tmp_path):
  """The Trainer raises from its first line, before data, model or jit exist."""
  from attnjax.train import trainer
  bad = tiny_config(tmp_path)
  bad.model.attention.name = 'not_registered'
  with pytest.raises(ValueError, match='config.model.attention.name'):
    trainer.Trainer(bad, str(tmp_path / 'w'))
  assert not (tmp_path / 'mqar_task').exists()  # the dataset was not even generated


def test_losses_weighted_and_padding():
  import jax.numpy as jnp

  from attnjax.train import losses
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 7, size=(3, 5)), jnp.int32)
  weights = jnp.asarray(rng.integers(0, 2, size=(3, 5)), jnp.float32)
  valid = jnp.asarray([1.0, 1.0, 0.0])
  loss, sums = losses.compute('lm', logits, {'targets': targets, 'weights': weights,
                                             '_valid': valid})
  lp = np.asarray(logits) - np.log(np.exp(np.asarray(logits)).sum(-1, keepdims=True))
  ce = -np.take_along_axis(lp, np.asarray(targets)[..., None], -1)[..., 0]
  w = np.asarray(weights) * np.asarray(valid)[:, None]
  np.testing.assert_allclose(loss, (ce * w).sum() / w.sum(), rtol=1e-6)
  acc = ((np.asarray(logits).argmax(-1) == np.asarray(targets)) * w).sum() / w.sum()
  np.testing.assert_allclose(losses.finalize(sums)['accuracy'], acc, rtol=1e-6)
  out = jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)
  tgt = jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)
  loss, _ = losses.compute('regression', out, {'target': tgt})
  np.testing.assert_allclose(loss, np.mean((np.asarray(out) - np.asarray(tgt)) ** 2), rtol=1e-6)
  with pytest.raises(ValueError, match='config.task'):
    losses.compute('nope', out, {})


def test_schedule_and_optimizer_validation():
  import ml_collections

  from attnjax.train import optimizer
  s = optimizer.make_schedule(ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=10, decay='cosine', end_value_ratio=0.1)), 100)
  assert float(s(0)) == 0.0 and abs(float(s(10)) - 1e-3) < 1e-9
  assert abs(float(s(100)) - 1e-4) < 1e-9
  with pytest.raises(ValueError, match='config.schedule.decay'):
    optimizer.make_schedule(ml_collections.ConfigDict(dict(learning_rate=1e-3, decay='x')), 10)
  with pytest.raises(ValueError, match='config.optimizer.name'):
    optimizer.make_optimizer(ml_collections.ConfigDict(dict(name='adagrad2')), s)


def test_one_process_train_step_learns(tmp_path):
  """Two steps on one device: loss finite, params change, step counter advances."""
  import jax

  from attnjax.train import trainer
  c = tiny_config(tmp_path)
  t = trainer.Trainer(c, str(tmp_path / 'w'))
  state = t.init()
  p0 = jax.tree.map(np.asarray, state['params'])
  it = iter(t.train_ds)
  for _ in range(2):
    state, m = t.step(state, t.global_batch(next(it)))
  assert int(state['step']) == 2 and int(state['nonfinite_step']) == -1
  assert np.isfinite(float(m['loss']))
  changed = [not np.array_equal(a, np.asarray(b))
             for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(state['params']))]
  assert all(changed)
  ev = t.evaluate(state, max_examples=16)
  assert set(ev) == {'loss', 'accuracy'} and 0.0 <= ev['accuracy'] <= 1.0


# --------------------------------------------------------------------------- 8 devices

def test_sharded_step_matches_single_device(tmp_path):
  env = dict(os.environ, XLA_FLAGS=xla_flags('--xla_force_host_platform_device_count=8'),
             PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''), JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), 'sharded', str(tmp_path)],
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  res = json.loads([l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1][7:])
  assert set(res) == {'8,1,1,1', '2,2,2,1', '2,1,1,4'}
  for mesh, r in res.items():
    assert r['loss_rel'] < 1e-5, (mesh, r)
    assert r['params_rel'] < 1e-5, (mesh, r)
    if mesh == '2,2,2,1':  # fsdp and tensor axes split parameters
      assert r['sharded_leaves'] > 0, (mesh, r)


def _sharded_worker(data_dir):
  import jax

  from attnjax.train import trainer
  assert jax.device_count() == 8
  base = tiny_config(data_dir, batch=8, seq_len=16)
  base.mesh.data = 1
  ref_t = trainer.Trainer(base, None, devices=jax.devices()[:1])
  batches = [next(it) for it in [iter(ref_t.train_ds)] for _ in range(2)]

  def run(t):
    state = t.init()
    losses_ = []
    for b in batches:
      state, m = t.step(state, t.global_batch(b))
      losses_.append(float(m['loss']))
    return np.asarray(losses_), jax.tree.map(np.asarray, state['params']), state

  ref_loss, ref_params, _ = run(ref_t)
  out = {}
  for shape in ((8, 1, 1, 1), (2, 2, 2, 1), (2, 1, 1, 4)):
    c = tiny_config(data_dir, batch=8, seq_len=16)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.context = shape
    t = trainer.Trainer(c, None)
    loss, params, state = run(t)
    rel = lambda a, b: float(np.max(np.abs(a - b) / (np.abs(b) + 1e-6).clip(min=1e-3)))
    prel = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))
               for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
    sharded = sum(1 for x in jax.tree.leaves(state['params'])
                  if not x.sharding.is_fully_replicated)
    out[','.join(map(str, shape))] = dict(loss_rel=rel(loss, ref_loss), params_rel=prel,
                                          sharded_leaves=sharded)
  print('RESULT ' + json.dumps(out), flush=True)


if __name__ == '__main__':
  {'sharded': lambda: _sharded_worker(sys.argv[2])}[sys.argv[1]]()
