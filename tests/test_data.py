"""attnjax.data: synthetic task generators, TFDS array_record builders, grain pipelines."""

import os
import subprocess
import sys

import numpy as np
import pytest

from attnjax.data import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- generators

def test_generators_are_deterministic_and_seed_dependent():
  for fn in (tasks.generate_mqar, tasks.generate_selective_copy, tasks.generate_argmax_probe,
             tasks.generate_set_max, tasks.generate_set_count, tasks.generate_set_mog,
             tasks.generate_icl_regression):
    a, b, c = fn(8, 3), fn(8, 3), fn(8, 4)
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in a), fn.__name__


def test_mqar_semantics():
  d = tasks.generate_mqar(50, 0, vocab_size=32, num_pairs=4, seq_len=24)
  x, y, w = d['inputs'], d['targets'], d['weights']
  assert x.shape == y.shape == w.shape == (50, 24)
  for i in range(50):
    binding = {int(x[i, 2 * p]): int(x[i, 2 * p + 1]) for p in range(4)}
    assert len(binding) == 4                                   # distinct keys
    assert all(k < 16 <= v < 32 for k, v in binding.items())   # key / value halves
    pos = np.nonzero(w[i])[0]
    assert len(pos) == (24 - 8) // 2
    for t in pos:
      assert x[i, t] in binding and y[i, t] == binding[int(x[i, t])]
      assert x[i, t + 1] == y[i, t]                            # the value follows the query
  with pytest.raises(ValueError, match='num_pairs'):
    tasks.generate_mqar(1, 0, vocab_size=8, num_pairs=5, seq_len=32)
  with pytest.raises(ValueError, match='seq_len'):
    tasks.generate_mqar(1, 0, vocab_size=64, num_pairs=8, seq_len=16)


def test_selective_copy_and_argmax_semantics():
  d = tasks.generate_selective_copy(20, 1, vocab_size=10, seq_len=30, num_tokens=5)
  for i in range(20):
    body = d['inputs'][i, :25]
    data = body[body >= 2]
    assert len(data) == 5
    np.testing.assert_array_equal(d['targets'][i, 25:], data)
    assert (d['inputs'][i, 25:] == 1).all() and d['weights'][i, 25:].all()
    assert not d['weights'][i, :25].any()
  d = tasks.generate_argmax_probe(30, 2, vocab_size=40, seq_len=10)
  for i in range(30):
    assert len(set(d['inputs'][i])) == 10
    assert d['inputs'][i, d['label'][i]] == d['inputs'][i].max()


def test_set_tasks_semantics():
  d = tasks.generate_set_max(10, 0, set_size=7)
  np.testing.assert_allclose(d['target'][:, 0], d['inputs'][:, :, 0].max(1))
  d = tasks.generate_set_count(10, 0, set_size=6, num_prototypes=5, dim=3)
  for i in range(10):
    assert len(np.unique(d['inputs'][i], axis=0)) == d['label'][i]
  d = tasks.generate_set_mog(10, 0, set_size=50, num_components=3, dim=2, sigma=0.01)
  means = d['target'].reshape(10, 3, 2)
  assert (np.diff(means[:, :, 0], axis=1) >= 0).all()
  dist = np.linalg.norm(d['inputs'][:, :, None] - means[:, None], axis=-1).min(-1)
  assert dist.max() < 0.1
  d = tasks.generate_icl_regression(5, 0, num_points=6, dim=3)
  x = d['inputs']
  assert (x[:, -1, -1] == 1).all() and (x[:, :-1, -1] == 0).all() and (x[:, -1, 3] == 0).all()
  for i in range(5):  # the examples determine w, hence the query's y
    w, *_ = np.linalg.lstsq(x[i, :-1, :3], x[i, :-1, 3], rcond=None)
    np.testing.assert_allclose(x[i, -1, :3] @ w, d['target'][i, 0], rtol=1e-3, atol=1e-4)


def test_digits_split():
  tr, te = tasks.load_digits_split('train'), tasks.load_digits_split('test')
  assert tr['image'].shape == (1437, 8, 8, 1) and te['image'].shape == (360, 8, 8, 1)
  counts = np.bincount(te['label'])
  assert counts.sum() == 360 and counts.min() >= 35 and counts.max() <= 37  # stratified
  assert 0.0 <= tr['image'].min() and tr['image'].max() <= 1.0
  # disjoint: no test image appears in train
  trs = {a.tobytes() for a in tr['image']}
  assert sum(a.tobytes() in trs for a in te['image']) < 5  # (the raw set has a few duplicates)
  with pytest.raises(ValueError, match='split'):
    tasks.load_digits_split('validation')


# --------------------------------------------------------------------------- TFDS builders

def test_builder_without_tensorflow_and_deterministic(tmp_path):
  """Prepare twice in separate dirs (in a subprocess that must not import TensorFlow);
  the records must be identical."""
  code = (
      'import sys, numpy as np\n'
      'from attnjax import data\n'
      'src = data.load("mqar", "train", data_dir=sys.argv[1], num_pairs=3, seq_len=16, '
      'vocab_size=16, num_train=64, num_test=8)\n'
      'assert "tensorflow" not in sys.modules, "tensorflow was imported"\n'
      'print("LEN", len(src))\n'
      'np.save(sys.argv[1] + "/rows.npy", np.stack([src[i]["inputs"] for i in range(len(src))]))\n')
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  outs = []
  for sub in ('a', 'b'):
    d = tmp_path / sub
    d.mkdir()
    proc = subprocess.run([sys.executable, '-c', code, str(d)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'LEN 64' in proc.stdout
    outs.append(np.load(d / 'rows.npy'))
    files = [f for _, _, fs in os.walk(d) for f in fs]
    assert any('array_record' in f for f in files), files
  np.testing.assert_array_equal(outs[0], outs[1])


def test_load_all_builtins_and_errors(tmp_path):
  from attnjax import data
  for name in data.BUILTIN_NAMES:
    if name == 'digits':
      src = data.load('digits', 'test', data_dir=str(tmp_path))
      assert len(src) == 360 and src[0]['image'].shape == (8, 8, 1)
      continue
    src = data.load(name, 'test', data_dir=str(tmp_path), num_train=8, num_test=6)
    assert len(src) == 6
    ex = src[0]
    ref = data.builders.TASKS[name].generate(6, 0 + 1_000_003)
    # TFDS shuffles record order deterministically; the records themselves are ours
    assert any(all(np.array_equal(np.asarray(ex[k]), ref[k][i]) for k in ref)
               for i in range(6)), name
  # parameters change the on-disk config (no clobbering)
  a = data.load('mqar', 'test', data_dir=str(tmp_path), num_pairs=2, seq_len=8, vocab_size=8,
                num_train=4, num_test=4)
  assert a[0]['inputs'].shape == (8,)
  with pytest.raises(ValueError, match="unknown dataset 'no_such_ds_abc'"):
    data.load('no_such_ds_abc', 'train', data_dir=str(tmp_path))
  with pytest.raises(ValueError, match='bad parameters'):
    data.load('mqar', 'train', data_dir=str(tmp_path), not_a_param=3)
  with pytest.raises(ValueError, match='num_pairs'):
    data.load('mqar', 'train', data_dir=str(tmp_path), num_pairs=100)


# --------------------------------------------------------------------------- grain pipelines

class _Source:
  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {'x': np.asarray([i], np.int32)}


def test_train_pipeline_process_sharding_and_epochs():
  from attnjax.data import make_train_dataset
  src = _Source(24)
  seen = []
  for p in range(2):
    it = iter(make_train_dataset(src, global_batch_size=4, seed=0, process_index=p,
                                 process_count=2))
    first_epoch = np.concatenate([next(it)['x'][:, 0] for _ in range(6)])   # 12 per process
    assert sorted(first_epoch.tolist()) == list(range(p, 24, 2))            # its shard only
    second_epoch = np.concatenate([next(it)['x'][:, 0] for _ in range(6)])
    assert sorted(second_epoch.tolist()) == sorted(first_epoch.tolist())
    assert second_epoch.tolist() != first_epoch.tolist()                    # reshuffled
    seen += first_epoch.tolist()
  assert sorted(seen) == list(range(24))
  with pytest.raises(ValueError, match='divisible'):
    make_train_dataset(src, global_batch_size=5, seed=0, process_index=0, process_count=2)


def test_iterator_state_roundtrip():
  from attnjax.data import make_train_dataset
  ds = make_train_dataset(_Source(10), global_batch_size=3, seed=5, process_index=0,
                          process_count=1)
  it = iter(ds)
  for _ in range(4):
    next(it)
  state = it.get_state()
  want = [next(it)['x'] for _ in range(5)]
  it2 = iter(ds)
  it2.set_state(state)
  got = [next(it2)['x'] for _ in range(5)]
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)


def test_eval_batches_pad_and_cover():
  from attnjax.data import make_eval_batches
  src = _Source(11)
  all_valid = []
  for p in range(2):
    batches = list(make_eval_batches(src, global_batch_size=4, process_index=p, process_count=2))
    assert len(batches) == 3  # ceil(ceil(11/2) / 2), the same on both processes
    for b in batches:
      assert b['x'].shape == (2, 1) and b['_valid'].shape == (2,)
      all_valid += b['x'][b['_valid'] > 0, 0].tolist()
  assert sorted(all_valid) == list(range(11))
