"""Fault tolerance of train.py, in subprocesses with a tiny config:

* kill -9 mid-run, restart -> final params bitwise equal to an uninterrupted run;
* SIGTERM saves a checkpoint and exits 0, the restart finishes the run;
* the newest checkpoint corrupted -> the next start warns and resumes from the previous one;
* an injected NaN stops the run with a clear message and leaves the last good checkpoint.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = 'configs/mqar.py:runlocal'


def _cmd(workdir, data_dir, *extra):
  return [sys.executable, os.path.join(ROOT, 'train.py'), f'--config={os.path.join(ROOT, TINY)}',
          f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
          '--config.model_factory=attnjax.train.testing:build_tiny_model',
          '--config.tensorboard=False', '--config.progress_bar=False',
          '--config.checkpoint_every=5', '--config.log_every=5', *extra]


def _env():
  return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''),
              JAX_PLATFORMS='cpu')


def _run(cmd, timeout=600):
  proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
  return proc.returncode, proc.stdout + proc.stderr


def _steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(d):
    return []
  return sorted(int(x) for x in os.listdir(d) if x.isdigit())


def _restore_params(workdir, step):
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                             item_names=('state', 'data')) as mngr:
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                          data=ocp.args.JsonRestore()))
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(restored['state']['params'])], restored['data']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory, data_dir):
  """An uninterrupted 20-step run."""
  workdir = str(tmp_path_factory.mktemp('ref'))
  rc, out = _run(_cmd(workdir, data_dir))
  assert rc == 0, out[-3000:]
  assert _steps(workdir)[-1] == 20
  return workdir


def test_reference_run_outputs(reference_run):
  for name in ('metrics.jsonl', 'metrics.png', 'final_metrics.json', 'config.json'):
    assert os.path.exists(os.path.join(reference_run, name)), name
  # keep=3: only the newest three checkpoints remain
  assert _steps(reference_run) == [10, 15, 20]


@pytest.mark.slow
def test_kill9_and_restart_is_bitwise_equal(tmp_path, data_dir, reference_run):
  workdir = str(tmp_path / 'killed')
  # slow each step down so that the kill lands mid-run, after a checkpoint exists
  proc = subprocess.Popen(_cmd(workdir, data_dir, '--config.debug.sleep_per_step=0.3'),
                          env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.time() + 300
  while time.time() < deadline and not any(s >= 5 for s in _steps(workdir)):
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    time.sleep(0.2)
  time.sleep(1.0)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  proc.stdout.close()
  killed_at = _steps(workdir)
  assert killed_at and killed_at[-1] < 20, killed_at
  rc, out = _run(_cmd(workdir, data_dir))
  assert rc == 0, out[-3000:]
  assert 'Resumed from checkpoint at step' in out
  got, data_got = _restore_params(workdir, 20)
  want, data_want = _restore_params(reference_run, 20)
  assert data_got == data_want
  assert len(got) == len(want)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sigterm_saves_and_resume_finishes(tmp_path, data_dir, reference_run):
  workdir = str(tmp_path / 'term')
  proc = subprocess.Popen(_cmd(workdir, data_dir, '--config.debug.sleep_per_step=0.3',
                               '--config.checkpoint_every=0'),
                          env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.time() + 300
  # wait for the first log line (step 5), then ask it to stop
  buf = b''
  while time.time() < deadline and b'step      5/20' not in buf:
    buf += proc.stdout.read1(4096)
    assert proc.poll() is None or b'step      5/20' in buf, buf.decode()[-3000:]
  proc.send_signal(signal.SIGTERM)
  rest = proc.communicate(timeout=120)[0]
  out = (buf + rest).decode()
  assert proc.returncode == 0, out[-3000:]
  assert 'Received signal' in out
  saved = _steps(workdir)
  assert len(saved) == 1 and 5 <= saved[0] < 20, saved
  rc, out = _run(_cmd(workdir, data_dir, '--config.checkpoint_every=0'))
  assert rc == 0, out[-3000:]
  assert f'Resumed from checkpoint at step {saved[0]}' in out
  got, _ = _restore_params(workdir, 20)
  want, _ = _restore_params(reference_run, 20)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)


def test_corrupt_newest_checkpoint_falls_back(tmp_path, data_dir, reference_run):
  import shutil
  workdir = str(tmp_path / 'corrupt')
  shutil.copytree(reference_run, workdir)
  newest = os.path.join(workdir, 'checkpoints', '20', 'state')
  n = 0
  for root, _, files in os.walk(newest):
    for f in files:
      with open(os.path.join(root, f), 'r+b') as fh:
        size = os.path.getsize(os.path.join(root, f))
        fh.write(os.urandom(max(size, 16)))
      n += 1
  assert n > 0
  rc, out = _run(_cmd(workdir, data_dir, '--config.num_steps=25'))
  assert rc == 0, out[-3000:]
  assert 'WARNING: checkpoint at step 20' in out and 'falling back' in out
  assert 'Resumed from checkpoint at step 15' in out
  assert _steps(workdir)[-1] == 25


def test_injected_nan_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir):
  workdir = str(tmp_path / 'nan')
  rc, out = _run(_cmd(workdir, data_dir, '--config.debug.inject_nan_at_step=12'))
  assert rc == 2, out[-3000:]
  assert 'non-finite loss or gradients at step 12' in out
  assert 'last good checkpoint is step 10' in out
  assert _steps(workdir) == [5, 10]
  params, data = _restore_params(workdir, 10)
  assert all(np.isfinite(p).all() for p in params)
  assert data['step'] == 10
