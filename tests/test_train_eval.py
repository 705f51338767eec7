"""eval.py and attention-map capture."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_capture_attention_recovers_probabilities():
  import jax

  import attnjax
  from attnjax.analysis import capture_attention
  ks = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(ks[0], (2, 6, 4, 8))
  k = jax.random.normal(ks[1], (2, 6, 2, 8))
  v = jax.random.normal(ks[2], (2, 6, 2, 5))
  mask = attnjax.masks.sliding_window(2)
  with capture_attention() as maps:
    out = attnjax.dispatch.attention(q, k, v, mask=mask)
  assert len(maps) == 1 and maps[0].shape == (2, 4, 6, 6)
  p = maps[0]
  np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
  allowed = np.asarray(mask.to_array(6, 6))[0, 0]
  assert (p[:, :, ~allowed] == 0).all()
  # P @ V reproduces the call's output (GQA: head n uses kv head n // 2)
  v_rep = np.repeat(np.asarray(v), 2, axis=2)
  np.testing.assert_allclose(np.einsum('bnts,bsnh->btnh', p, v_rep), out, rtol=1e-5, atol=1e-5)
  # the wrapper is removed afterwards
  with capture_attention() as maps2:
    pass
  attnjax.dispatch.attention(q, k, v)
  assert maps2 == []


@pytest.mark.slow
def test_eval_py_restores_and_writes(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  workdir = tmp_path / 'w'
  cfg = f'--config={os.path.join(ROOT, "configs", "digits_vit.py")}:runlocal'
  common = [f'--workdir={workdir}', '--config.progress_bar=False', '--config.tensorboard=False',
            f'--config.data.data_dir={tmp_path / "d"}', '--config.num_steps=6']
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), cfg, *common], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  final = json.loads((workdir / 'final_metrics.json').read_text())
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'eval.py'), f'--workdir={workdir}',
                         '--num_examples=2'], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads((workdir / 'eval_metrics.json').read_text())
  assert got['step'] == 6
  # eval.py evaluates what training evaluated (runlocal: the first 80 of the 360 test
  # images), so the two agree for the same checkpoint
  assert got['num_examples'] == final['num_examples'] == 80 and got['split'] == 'test'
  for k in ('accuracy', 'loss'):
    np.testing.assert_allclose(got[k], final[k], rtol=1e-6)
  assert 0.0 <= got['accuracy'] <= 1.0 and np.isfinite(got['loss'])
  assert final['step'] == 6
  for i in range(2):
    assert (workdir / 'attention_maps' / f'example_{i}.png').stat().st_size > 1000
