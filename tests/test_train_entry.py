"""train.py / eval.py as a new user meets them (subprocesses, tiny configs):

* Ctrl-C while importing / compiling exits 130 at once (no ``Fatal Python error``, no
  traceback, no workdir left behind); during training it saves a checkpoint and exits 130;
  a second Ctrl-C exits at once without saving;
* a config-key typo is one ``ERROR:`` line naming the key and its close matches (exit 2);
* a failed start (unknown variant) leaves no workdir;
* ``python eval.py`` with no flags finds ``python train.py``'s workdir and reports the same
  numbers on the same examples; train -> eval -> train leaves one row per (step, split);
* the progress bar: lines above it on a terminal, nothing redrawn after it closes, plain
  lines when the terminal reports 0 columns.
"""

import fcntl
import io
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNLOCAL = os.path.join(ROOT, 'configs', 'mqar.py') + ':runlocal'
TINY_MODEL = '--config.model_factory=attnjax.train.testing:build_tiny_model'


def _env(**extra):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''),
             JAX_PLATFORMS='cpu', **extra)
  env.pop('COLUMNS', None)
  return env


def _train_cmd(workdir, data_dir, *extra, tiny=True):
  cmd = [sys.executable, os.path.join(ROOT, 'train.py'), f'--config={RUNLOCAL}',
         f'--config.data.data_dir={data_dir}', '--config.tensorboard=False',
         '--config.progress_bar=False', '--config.checkpoint_every=0', *extra]
  if tiny:
    cmd.append(TINY_MODEL)
  if workdir is not None:
    cmd.append(f'--workdir={workdir}')
  return cmd


def _run(cmd, cwd=ROOT, timeout=600):
  proc = subprocess.run(cmd, env=_env(), cwd=cwd, capture_output=True, text=True,
                        timeout=timeout, check=False)
  return proc.returncode, proc.stdout, proc.stderr


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def _steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def _assert_clean(rc, out):
  assert rc not in (139, -11, -signal.SIGSEGV), out[-3000:]
  assert 'Fatal Python error' not in out, out[-3000:]
  assert 'Traceback' not in out and 'KeyboardInterrupt' not in out, out[-3000:]


class _Proc:
  """A train.py subprocess whose merged output is read incrementally."""

  def __init__(self, cmd):
    self.p = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    self.buf = b''

  def wait_for(self, text: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while text.encode() not in self.buf:
      assert time.time() < deadline, f'timed out waiting for {text!r}:\n' + self.text()[-3000:]
      r, _, _ = select.select([self.p.stdout], [], [], 0.5)
      if r:
        chunk = self.p.stdout.read1(4096)
        assert chunk or text.encode() in self.buf, (f'exited before {text!r}:\n' +
                                                    self.text()[-3000:])
        self.buf += chunk

  def finish(self, timeout: float = 300) -> tuple[int, str]:
    self.buf += self.p.communicate(timeout=timeout)[0]
    return self.p.returncode, self.text()

  def text(self) -> str:
    return self.buf.decode(errors='replace')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data'))


# --------------------------------------------------------------------------- Ctrl-C

def _catches_sigterm(pid: int) -> bool:
  """True once the process has a handler for SIGTERM (Python alone installs none: train.py's
  first lines do)."""
  with open(f'/proc/{pid}/status') as f:
    caught = next(l for l in f if l.startswith('SigCgt:')).split()[1]
  return bool(int(caught, 16) & (1 << (signal.SIGTERM - 1)))


@pytest.mark.skipif(not os.path.exists('/proc/self/status'), reason='reads /proc/<pid>/status')
def test_ctrl_c_while_importing_exits_130(tmp_path, data_dir):
  workdir = tmp_path / 'w'
  proc = _Proc(_train_cmd(workdir, data_dir))
  deadline = time.time() + 60
  while not _catches_sigterm(proc.p.pid):
    assert time.time() < deadline and proc.p.poll() is None, proc.finish()[1][-3000:]
    time.sleep(0.005)
  proc.p.send_signal(signal.SIGINT)
  rc, out = proc.finish()
  _assert_clean(rc, out)
  assert rc == 130, out[-3000:]
  assert 'during start-up' in out and 'nothing was saved' in out, out[-3000:]
  assert not workdir.exists()


def test_ctrl_c_while_compiling_exits_130_at_once(tmp_path, data_dir):
  """SIGINT right after the header line, while init and then the first train step compile
  (the model zoo's LM: seconds of XLA compilation). Before the fix: KeyboardInterrupt
  inside backend.compile_and_load of init, then 'Fatal Python error: Segmentation fault'
  (exit 139)."""
  workdir = tmp_path / 'w'
  proc = _Proc(_train_cmd(workdir, data_dir, tiny=False))
  proc.wait_for('attnjax train:')
  t0 = time.time()
  proc.p.send_signal(signal.SIGINT)
  rc, out = proc.finish()
  took = time.time() - t0
  _assert_clean(rc, out)
  assert rc == 130, out[-3000:]
  assert 'Received SIGINT (Ctrl-C) during start-up' in out, out[-3000:]
  assert f'removed the new workdir {workdir}' in out, out[-3000:]
  assert not workdir.exists()  # this run created it and saved nothing
  assert took < 60, took  # did not wait for the step (20 steps would follow)


def test_ctrl_c_during_training_saves_then_resume_finishes(tmp_path, data_dir):
  workdir = str(tmp_path / 'w')
  proc = _Proc(_train_cmd(workdir, data_dir, '--config.debug.sleep_per_step=0.3'))
  proc.wait_for('step      5/20')
  proc.p.send_signal(signal.SIGINT)
  rc, out = proc.finish()
  _assert_clean(rc, out)
  assert rc == 130, out[-3000:]
  m = re.search(r'saved checkpoint at step (\d+)', out)
  assert m, out[-3000:]
  saved = int(m.group(1))
  assert 5 <= saved < 20 and _steps(workdir) == [saved], (saved, _steps(workdir))
  assert 'final eval' not in out
  rows = _rows(workdir)
  assert [r['step'] for r in rows] == [5] and rows[0]['split'] == 'train'
  # the same command resumes and finishes; no (step, split) twice
  rc, out, err = _run(_train_cmd(workdir, data_dir))
  assert rc == 0, err[-3000:]
  assert f'Resumed from checkpoint at step {saved}' in out
  keys = [(r['step'], r['split']) for r in _rows(workdir)]
  assert keys == [(5, 'train'), (10, 'train'), (15, 'train'), (20, 'train'), (20, 'eval')]


def test_second_ctrl_c_exits_at_once_without_saving(tmp_path, data_dir):
  workdir = str(tmp_path / 'w')
  # 5 s of sleep after each step: the second Ctrl-C lands before the loop checks the flag
  proc = _Proc(_train_cmd(workdir, data_dir, '--config.debug.sleep_per_step=5',
                          '--config.log_every=1'))
  proc.wait_for('step      1/20')
  proc.p.send_signal(signal.SIGINT)
  proc.wait_for('stopping after the current step')
  proc.p.send_signal(signal.SIGINT)
  rc, out = proc.finish()
  _assert_clean(rc, out)
  assert rc == 130, out[-3000:]
  assert 'Second Ctrl-C: exiting now without saving' in out, out[-3000:]
  assert 'saved checkpoint' not in out and _steps(workdir) == []


# --------------------------------------------------------------------------- config errors

@pytest.mark.parametrize('with_config', [False, True])
def test_config_key_typo_is_one_line(tmp_path, with_config):
  """Without --config ml_collections reads the overrides while the flag is defined, with it
  while the flags are parsed: both paths give the one line."""
  cmd = [sys.executable, os.path.join(ROOT, 'train.py'), f'--workdir={tmp_path / "w"}']
  if with_config:
    cmd.append(f'--config={RUNLOCAL}')
  rc, _, err = _run(cmd + ['--config.model.num_headz=4'])
  assert rc == 2, err[-3000:]
  assert 'Traceback' not in err and 'AttributeError' not in err, err[-3000:]
  lines = [l for l in err.splitlines() if l.strip()]
  want = ("ERROR: config key 'model.num_headz' does not exist; did you mean "
          "'model.num_heads' or 'model.num_kv_heads'?")
  assert lines == [want], err[-3000:]
  assert not (tmp_path / 'w').exists()


def test_config_errors_in_eval_py_and_unknown_config_arg(tmp_path):
  rc, _, err = _run([sys.executable, os.path.join(ROOT, 'eval.py'), '--config.modle.seed=1'])
  assert rc == 2 and err.strip() == ("ERROR: config key 'modle' does not exist; did you mean "
                                     "'model'?"), err[-3000:]
  rc, _, err = _run([sys.executable, os.path.join(ROOT, 'train.py'),
                     f'--config={RUNLOCAL},variantt=swin', f'--workdir={tmp_path / "w"}'])
  assert rc == 2 and 'Traceback' not in err, err[-3000:]
  assert "unknown config argument 'variantt'" in err and len(err.strip().splitlines()) == 1
  assert not (tmp_path / 'w').exists()


def test_missing_key_message():
  import ml_collections

  from attnjax.train import cli
  c = ml_collections.ConfigDict({
      'model': {'num_heads': 4, 'num_kv_heads': 4, 'attention': {'name': 'mha'}},
      'layers': [{'window': 3}], 'seed': 0})
  assert cli.missing_key_message(c, 'model.num_heads') is None
  assert cli.missing_key_message(c, 'layers[0].window') is None
  assert cli.missing_key_message(c, 'model.attention.name') is None
  assert cli.missing_key_message(c, 'modle.num_heads') == (
      "config key 'modle' does not exist; did you mean 'model'?")
  assert cli.missing_key_message(c, 'model.attention.windw') == (
      "config key 'model.attention.windw' does not exist; 'model.attention' has: name.")
  assert cli.missing_key_message(c, 'seed.value') == (
      "config key 'seed.value' does not exist: 'seed' is a int, not a group of keys.")
  assert cli.missing_key_message(c, 'layers[0].windw') == (
      "config key 'layers[0].windw' does not exist; did you mean 'layers[0].window'?")


def test_unknown_variant_leaves_no_workdir(tmp_path, data_dir):
  workdir = tmp_path / 'w'
  rc, _, err = _run(_train_cmd(workdir, data_dir, '--config.model.attention.name=no_such',
                               tiny=False))
  assert rc == 2, err[-3000:]
  assert "ERROR: config.model.attention.name='no_such' is not a registered" in err
  assert not workdir.exists()


# --------------------------------------------------------------------------- train/eval

def _pty_run(cmd, cwd, cols):
  """Runs ``cmd`` with stdout and stderr on a pseudo-terminal of ``cols`` columns (0: a
  terminal that reports no size); returns (rc, raw output)."""
  master, slave = os.openpty()
  fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 24, cols, 0, 0))
  p = subprocess.Popen(cmd, env=_env(), cwd=cwd, stdin=slave, stdout=slave, stderr=slave,
                       close_fds=True)
  os.close(slave)
  buf = b''
  deadline = time.time() + 600
  while time.time() < deadline:
    r, _, _ = select.select([master], [], [], 0.5)
    if r:
      try:
        chunk = os.read(master, 65536)
      except OSError:  # EIO: every writer closed the terminal
        break
      if not chunk:
        break
      buf += chunk
    elif p.poll() is not None:
      break
  p.wait(timeout=60)
  os.close(master)
  return p.returncode, buf.decode(errors='replace')


def test_train_eval_train_same_numbers_and_no_duplicate_rows(tmp_path, data_dir):
  """``python train.py`` then ``python eval.py`` (no flags) in the same directory: eval.py
  finds ./workdir/mqar, evaluates the examples training evaluated and prints the same line;
  training again re-evaluates without writing a second row. The first run is on an 80-column
  terminal with its bar."""
  cwd = tmp_path
  train = [sys.executable, os.path.join(ROOT, 'train.py'), f'--config={RUNLOCAL}',
           f'--config.data.data_dir={data_dir}', '--config.tensorboard=False', TINY_MODEL,
           '--config.eval_every=10']
  rc, tty = _pty_run(train, cwd, cols=80)
  assert rc == 0, tty[-3000:]
  workdir = cwd / 'workdir' / 'mqar'
  # the bar was drawn; the mid-run eval line starts on a line of its own (the bar is
  # cleared with '\r' first) and is followed by the bar again; after the bar closes
  # nothing redraws it
  assert '20/20' in tty and '|' in tty
  i = tty.index('eval @ 10 (')
  assert tty[i - 1] in '\r\n', repr(tty[i - 200:i + 100])
  assert '/20 [' in tty[i:tty.index('final eval @ 20')]
  tail = tty[tty.index('final eval @ 20'):]
  assert tail.startswith('final eval @ 20 (test split, 64 of 128 examples): ')
  assert tty[tty.index('final eval @ 20') - 1] == '\n'
  assert '/20 [' not in tail and '%|' not in tail, repr(tail)
  final = json.loads((workdir / 'final_metrics.json').read_text())
  assert final['num_examples'] == 64 and final['split'] == 'test'
  train_line = re.search(r'final (eval @ 20 \(test split, 64 of 128 examples\): .*)',
                         tty).group(1).strip()

  rc, out, err = _run([sys.executable, os.path.join(ROOT, 'eval.py'), '--num_examples=1'],
                      cwd=cwd)
  assert rc == 0, err[-3000:]
  assert out.splitlines()[0] == train_line, (out, train_line)
  got = json.loads((workdir / 'eval_metrics.json').read_text())
  assert got['step'] == 20 and got['num_examples'] == 64
  for k in ('loss', 'accuracy'):
    np.testing.assert_allclose(got[k], final[k], rtol=1e-6)
  # eval.py writes the analysis report (attnjax.analysis.write_report): the tiny model's
  # attention calls are captured through the interception hook, whatever the implementation.
  assert 'attention_maps/stats.json' in out, out
  assert (workdir / 'attention_maps' / 'stats.json').is_file()

  rc, out, err = _run([sys.executable, os.path.join(ROOT, 'eval.py'), '--num_examples=1',
                       '--max_eval_examples=0'], cwd=cwd)
  assert rc == 0, err[-3000:]
  assert out.startswith('eval @ 20 (test split, 128 of 128 examples): '), out

  rows_before = _rows(workdir)
  rc, out, err = _run(train, cwd=cwd)
  assert rc == 0, err[-3000:]
  assert 'Resumed from checkpoint at step 20' in out and train_line in out
  rows = _rows(workdir)
  keys = [(r['step'], r['split']) for r in rows]
  assert len(keys) == len(set(keys)), keys
  assert keys == [(r['step'], r['split']) for r in rows_before]
  assert keys == [(5, 'train'), (10, 'train'), (10, 'eval'), (15, 'train'), (20, 'train'),
                  (20, 'eval')]


def test_eval_py_without_a_run_says_so(tmp_path):
  rc, _, err = _run([sys.executable, os.path.join(ROOT, 'eval.py')], cwd=tmp_path)
  assert rc == 2
  assert f'ERROR: no checkpoint in {tmp_path / "workdir" / "mqar" / "checkpoints"}' in err
  assert 'Traceback' not in err and not (tmp_path / 'workdir').exists()


def test_default_workdir_is_shared():
  from attnjax.train import cli
  assert cli.default_workdir(None) == os.path.join('workdir', 'mqar')
  assert cli.default_workdir('/x/configs/digits_vit.py:variant=swin,runlocal') == \
      os.path.join('workdir', 'digits_vit')


# --------------------------------------------------------------------------- pieces

def test_metric_writer_one_row_per_step_and_split(tmp_path):
  from attnjax.train import metrics
  rng = np.random.default_rng(0)
  vals = rng.uniform(size=8)
  w = metrics.MetricWriter(str(tmp_path), tensorboard=False)
  for i, s in enumerate((5, 10, 15)):
    w.write(s, 'train', {'loss': vals[i]})
  w.write(10, 'eval', {'loss': vals[3]})
  w.close()
  # resumed from the checkpoint at step 10: the row at 15 is stale, the rest stay
  w = metrics.MetricWriter(str(tmp_path), tensorboard=False, start_step=10)
  assert [(r['step'], r['split']) for r in metrics.read_jsonl(w.path)] == [
      (5, 'train'), (10, 'train'), (10, 'eval')]
  w.write(10, 'eval', {'loss': vals[4]})   # re-evaluated: replaces
  w.write(15, 'train', {'loss': vals[5]})
  w.write(15, 'train', {'loss': vals[6]})  # replaces again
  rows = metrics.read_jsonl(w.path)
  assert [(r['step'], r['split']) for r in rows] == [
      (5, 'train'), (10, 'train'), (10, 'eval'), (15, 'train')]
  np.testing.assert_allclose([r['loss'] for r in rows], vals[[0, 1, 4, 6]], rtol=1e-12)
  # a fresh start (no checkpoint): nothing of the old run stays
  metrics.MetricWriter(str(tmp_path), tensorboard=False, start_step=0)
  assert metrics.read_jsonl(w.path) == []


def _pty_stream(cols):
  master, slave = os.openpty()
  fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 24, cols, 0, 0))
  return master, os.fdopen(slave, 'w', buffering=1)


def _drain(master):
  buf = b''
  while select.select([master], [], [], 0.2)[0]:
    buf += os.read(master, 65536)
  return buf.decode(errors='replace')


def test_progress_zero_columns_falls_back_to_lines(monkeypatch):
  from attnjax.train import metrics
  monkeypatch.delenv('COLUMNS', raising=False)  # a 0-column terminal and no $COLUMNS
  master, stream = _pty_stream(0)
  try:
    p = metrics.Progress(100, 0, tokens_per_step=10, enabled=True, stream=stream, out=stream)
    assert p.bar is None  # the loop prints its plain step lines
    p.write('step     50/100 | loss 1.0')
    p.close()
    assert _drain(master) == 'step     50/100 | loss 1.0\r\n'
  finally:
    stream.close()
    os.close(master)
  master, stream = _pty_stream(100)
  try:
    p = metrics.Progress(100, 0, tokens_per_step=10, enabled=True, stream=stream, out=stream)
    assert p.bar is not None
    p.close()
  finally:
    stream.close()
    os.close(master)


def test_progress_lines_above_the_bar_and_no_redraw_after_close():
  from tqdm import tqdm

  from attnjax.train import metrics
  other = tqdm(total=3, file=io.StringIO())  # another live bar in the process
  master, stream = _pty_stream(80)
  try:
    p = metrics.Progress(100, 0, tokens_per_step=10, enabled=True, stream=stream, out=stream)
    rng = np.random.default_rng(1)
    for s in range(1, 51):
      p.advance(s)
    p.update(50, {'loss': float(rng.uniform()), 'accuracy': float(rng.uniform())})
    p.write('eval @ 50: loss=0.5')
    p.advance(60)
    p.close()
    p.write('final eval @ 100: loss=0.25')
    out = _drain(master)
  finally:
    stream.close()
    os.close(master)
  i = out.index('eval @ 50')
  assert out[i - 1] in '\r\n' and out[i:].startswith('eval @ 50: loss=0.5\r\n'), repr(out)
  assert '50/100' in out[i:]  # the bar again, below the line
  j = out.index('final eval @ 100')
  assert out[j - 1] == '\n' and out[j:] == 'final eval @ 100: loss=0.25\r\n', repr(out[j - 80:])
  assert p.bar is None
  other.close()


def test_apply_overrides_to_a_saved_config():
  """eval.py without --config reads the run's config.json; --config.<key> still applies."""
  import ml_collections

  from attnjax.train import cli
  rng = np.random.default_rng(2)
  lr = float(rng.uniform())
  saved = ml_collections.ConfigDict({'eval_max_examples': 64, 'schedule': {'learning_rate': 1.0},
                                     'seed': 3})
  flag = ml_collections.ConfigDict({'eval_max_examples': 0, 'schedule': {'learning_rate': lr},
                                    'seed': 7})
  argv = ['eval.py', '--config.eval_max_examples=0', f'--config.schedule.learning_rate={lr}']
  out = cli.apply_overrides(saved, flag, argv)
  assert out.eval_max_examples == 0 and out.schedule.learning_rate == lr
  assert out.seed == 3  # not on the command line: the saved value stays
  with pytest.raises(ValueError, match="config key 'schedul' does not exist; did you mean "
                                       "'schedule'"):
    cli.apply_overrides(saved, ml_collections.ConfigDict({'schedul': {'x': 1}}),
                        ['eval.py', '--config.schedul.x=1'])
