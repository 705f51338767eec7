"""train.py as 2 CPU processes (jax.distributed.initialize on localhost, gloo collectives).

Each process has 2 CPU devices (a 4-device data mesh), reads only its half of the data,
and only process 0 prints and writes logs/plots; checkpoints are written collectively.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_training(tmp_path):
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''),
             JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags('--xla_force_host_platform_device_count=2'))
  workdir = tmp_path / 'w'

  def launch(extra=()):
    nonlocal port
    procs = []
    for pid in range(2):
      cmd = [sys.executable, os.path.join(ROOT, 'train.py'),
             f'--config={os.path.join(ROOT, "configs", "mqar.py")}:runlocal',
             f'--workdir={workdir}', f'--config.data.data_dir={tmp_path / "d"}',
             '--config.model_factory=attnjax.train.testing:build_tiny_model',
             '--config.progress_bar=False', '--config.tensorboard=False',
             f'--coordinator_address=localhost:{port}', '--num_processes=2',
             f'--process_id={pid}', *extra]
      procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, outs):
      assert p.returncode == 0, o[-2000:] + e[-3000:]
    return [o for o, _ in outs]

  out0, out1 = launch()
  assert "devices=4 mesh={'data': 4" in out0
  assert 'final eval @ 20' in out0
  assert 'step' not in out1 and 'final eval' not in out1   # only process 0 logs
  final = json.loads((workdir / 'final_metrics.json').read_text())
  assert final['step'] == 20
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if r['split'] == 'train'] == [5, 10, 15, 20]  # written once
  assert (workdir / 'metrics.png').exists()
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['10', '20']
  # a second launch resumes collectively from the checkpoint and extends the run
  port = _free_port()
  out0, _ = launch(['--config.num_steps=25'])
  assert 'Resumed from checkpoint at step 20' in out0 and 'final eval @ 25' in out0
