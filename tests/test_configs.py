"""configs/: every experiment builds, validates, and its model accepts its data's shapes."""

import importlib.util
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [('mqar', None), ('mqar', 'variant=sliding_window,size=M'), ('argmax_probe', None),
         ('digits_vit', None), ('digits_vit', 'variant=neighborhood'), ('lm_synthetic', None),
         ('lm_synthetic', 'task=mqar'), ('set_tasks', 'task=max'), ('set_tasks', 'task=count'),
         ('set_tasks', 'task=mog'), ('set_tasks', 'task=icl')]


def load(name, arg=None):
  spec = importlib.util.spec_from_file_location(f'cfg_{name}', os.path.join(ROOT, 'configs',
                                                                             f'{name}.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def _example_input(c):
  from attnjax.data import tasks
  gen = {'mqar': tasks.generate_mqar, 'selective_copy': tasks.generate_selective_copy,
         'argmax_probe': tasks.generate_argmax_probe, 'set_max': tasks.generate_set_max,
         'set_count': tasks.generate_set_count, 'set_mog': tasks.generate_set_mog,
         'icl_regression': tasks.generate_icl_regression}
  if c.data.name == 'digits':
    d = tasks.load_digits_split('test')
    return {k: v[:2] for k, v in d.items()}
  return gen[c.data.name](2, 0, **dict(c.data.params))


@pytest.mark.parametrize('name,arg', CASES)
def test_config_validates_and_model_fits_data(name, arg):
  import jax
  from flax import nnx

  from attnjax import models
  from attnjax.train import losses, trainer
  c = load(name, arg)
  trainer.check_config(c, num_devices=1)
  model = nnx.eval_shape(lambda: models.build_model(c.model, rngs=nnx.Rngs(0)))
  batch = _example_input(c)
  x = batch[c.data.input_key]
  out = jax.eval_shape(lambda m, x: m(x, deterministic=True), model, x)
  # the loss accepts the model's output and the batch (shapes and dtypes)
  jax.eval_shape(lambda o, b: losses.compute(c.task, o, b)[0], out,
                 {k: np.asarray(v) for k, v in batch.items()})


def test_args_and_overrides():
  c = load('mqar', 'size=M,variant=sliding_window,pairs=4,steps=7,runlocal=false')
  assert c.model.d_model == 128 and c.model.attention.name == 'sliding_window'
  assert c.model.attention.window >= 1 and c.data.params.num_pairs == 4 and c.num_steps == 7
  small = load('mqar', 'runlocal')
  assert small.num_steps < 100 and small.model.d_model < c.model.d_model
  with pytest.raises(ValueError, match="unknown config argument 'sizee'"):
    load('mqar', 'sizee=M')
  with pytest.raises(ValueError, match='size'):
    load('mqar', 'size=XXL')
  with pytest.raises(ValueError, match='task'):
    load('set_tasks', 'task=sort')


def test_dotted_override_through_train_py(tmp_path):
  """`--config.a.b=v` reaches the config through train.py (absl + config_flags), and a bad
  value stops the run before any compilation with the key in the message (exit code 2)."""
  import subprocess
  import sys
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  base = [sys.executable, os.path.join(ROOT, 'train.py'),
          f'--config={os.path.join(ROOT, "configs", "mqar.py")}:runlocal',
          f'--workdir={tmp_path / "w"}', f'--config.data.data_dir={tmp_path / "d"}']
  proc = subprocess.run(base + ['--config.model.attention.name=bogus_attention'], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "config.model.attention.name='bogus_attention'" in proc.stderr
  assert not (tmp_path / 'd').exists()  # stopped before generating data
  proc = subprocess.run(base + ['--config.mesh.data=3'], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 2 and 'config.mesh' in proc.stderr, proc.stderr[-2000:]


def _train_runlocal(name, arg, tmp_path):
  from attnjax.train import trainer
  c = load(name, arg)
  c.data.data_dir = str(tmp_path / 'data')
  c.tensorboard = False
  c.progress_bar = False
  res = trainer.train_and_evaluate(c, str(tmp_path / 'w'))
  assert res['status'] == 'done' and res['step'] == c.num_steps
  assert all(np.isfinite(v) for k, v in res.items() if k not in ('status', 'step'))
  assert (tmp_path / 'w' / 'metrics.png').exists()
  return res


@pytest.mark.slow
def test_digits_vit_runlocal_end_to_end(tmp_path):
  _train_runlocal('digits_vit', 'runlocal', tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize('name,arg', [('mqar', 'runlocal'), ('argmax_probe', 'runlocal'),
                                      ('lm_synthetic', 'runlocal'),
                                      ('set_tasks', 'task=count,runlocal'),
                                      ('set_tasks', 'task=icl,runlocal')])
def test_runlocal_end_to_end(name, arg, tmp_path):
  _train_runlocal(name, arg, tmp_path)
