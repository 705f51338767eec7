"""Evaluation logic of experiments/position_probe.py, set_tasks.py, icl_regression.py (numpy
only; the training paths run in the notebook test)."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import _harness as H  # noqa: E402
from experiments import icl_regression, position_probe, set_tasks  # noqa: E402


def test_probe_eval_sets_label_the_argmax_at_every_length():
  sets = position_probe.eval_sets(300)
  assert sorted(sets) == list(position_probe.EVAL_LENS)
  for L, t in sets.items():
    assert t['inputs'].shape == (300, L)
    np.testing.assert_array_equal(t['label'], np.argmax(t['inputs'], axis=1))
    assert t['label'].max() < position_probe.NUM_CLASSES
    if L > position_probe.TRAIN_LEN:  # positions never seen in training do occur
      assert (t['label'] >= position_probe.TRAIN_LEN).any()


def test_probe_accuracies_split_seen_positions():
  label = np.array([0, 3, 17, 20, 15, 30])
  pred = np.array([0, 2, 17, 1, 15, 30])
  acc = position_probe.accuracies(pred, label)
  assert acc['all'] == pytest.approx(4 / 6)
  assert acc['seen'] == pytest.approx(2 / 3)  # labels 0, 3, 15: two right


def test_icl_least_squares_reference():
  from attnjax.data import tasks
  big = tasks.generate_icl_regression(200, 3, num_points=16, dim=icl_regression.DIM)
  assert icl_regression.least_squares_mse(big) < 1e-10  # 15 noiseless examples, 4 unknowns
  small = tasks.generate_icl_regression(2000, 4, num_points=3, dim=icl_regression.DIM)
  # 2 examples of a 4-dim w: the min-norm fit explains 2/4 of the variance-1 target
  assert icl_regression.least_squares_mse(small) == pytest.approx(0.5, abs=0.08)


def test_set_tasks_metric_and_constant_baseline():
  from attnjax.data import tasks
  t = tasks.generate_set_max(500, 1)
  assert set_tasks.metric('max', t['target'], t) == 0.0
  assert set_tasks.baseline('max', t) == pytest.approx(np.var(t['target']))
  c = tasks.generate_set_count(300, 2)
  onehot = np.eye(11)[c['label']]
  assert set_tasks.metric('count', onehot, c) == 1.0
  assert set_tasks.metric('count', np.roll(onehot, 1, axis=1), c) == 0.0


def test_harness_helpers():
  assert H.parse_seeds('0,1, 2') == [0, 1, 2]
  with pytest.raises(ValueError, match='--seeds'):
    H.parse_seeds('a,b')
  assert H.fmt([1.0, 3.0], 2) == '2.00 ± 1.00'
  b = H.fresh_batches(lambda n, s: {'seed': s}, 8, 2)
  assert b(0)['seed'] != b(1)['seed'] and b(0)['seed'] >= 10**6
