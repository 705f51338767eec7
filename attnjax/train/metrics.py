"""Metric sinks (process 0 only): metrics.jsonl, TensorBoard, progress bar, final plot."""

from __future__ import annotations

import json
import os
import sys
import time

import jax


class MetricWriter:
  """``{"step": s, "split": "train"|"eval", ...}`` rows in ``metrics.jsonl`` and the same
  scalars in TensorBoard (``<workdir>/tb``). No-op on processes != 0.

  One row per (step, split), also across restarts: a run starting at ``start_step`` (0, or
  the step of the checkpoint it resumed from) first drops the rows after ``start_step`` (a
  previous run wrote them, then stopped before its next checkpoint; this run recomputes
  them), and a row for a (step, split) already in the file replaces it (a finished run
  launched again re-evaluates its last step).
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True, start_step: int = 0):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.tb = None
    self._keys: set[tuple[int, str]] = set()
    if not self.active:
      return
    rows = read_jsonl(self.path)
    kept = [r for r in rows if int(r['step']) <= start_step]
    kept = list({(int(r['step']), r['split']): r for r in kept}.values())  # last row wins
    if len(kept) != len(rows):
      self._rewrite(kept)
    self._keys = {(int(r['step']), r['split']) for r in kept}
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self.tb = SummaryWriter(os.path.join(workdir, 'tb'))
      except ImportError:
        self.tb = None

  def _rewrite(self, rows: list[dict]) -> None:
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)
    os.replace(tmp, self.path)

  def write(self, step: int, split: str, metrics: dict) -> None:
    if not self.active:
      return
    row = {'step': int(step), 'split': split, **{k: float(v) for k, v in metrics.items()}}
    key = (int(step), split)
    if key in self._keys:
      self._rewrite([row if (int(r['step']), r['split']) == key else r
                     for r in read_jsonl(self.path)])
    else:
      with open(self.path, 'a') as f:
        f.write(json.dumps(row) + '\n')
      self._keys.add(key)
    if self.tb is not None:
      for k, v in metrics.items():
        self.tb.add_scalar(f'{split}/{k}', float(v), int(step))

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def terminal_columns(stream) -> int:
  """Width of the terminal behind ``stream``: its own size, else ``$COLUMNS``, else 0
  (unknown: some terminals, and a pseudo-terminal nobody sized, report 0 columns)."""
  try:
    cols = os.get_terminal_size(stream.fileno()).columns
  except (AttributeError, OSError, ValueError):
    cols = 0
  if cols <= 0:
    try:
      cols = int(os.environ.get('COLUMNS', '0'))
    except ValueError:
      cols = 0
  return max(cols, 0)


class Progress:
  """tqdm bar (stderr) with loss, tokens/s and ETA on a terminal; ``bar`` is None (the
  loop prints plain log lines instead) when disabled, not a terminal, or a terminal of
  unknown width (< ``MIN_COLUMNS``, e.g. 0), where tqdm would print nothing at all.

  Lines printed while the bar is shown go through ``write`` (cleared bar, the line, the
  bar again below it); ``close`` ends the bar on its own line for good.
  """

  MIN_COLUMNS = 20

  def __init__(self, total: int, initial: int, *, tokens_per_step: int, enabled: bool,
               stream=None, out=None):
    self.enabled = enabled and jax.process_index() == 0
    self.out = out  # where ``write`` prints (None: sys.stdout at the time of the call)
    self.tokens_per_step = tokens_per_step
    self.bar = None
    self.t_last, self.s_last = time.time(), initial
    stream = sys.stderr if stream is None else stream
    if self.enabled and stream.isatty():
      cols = terminal_columns(stream)
      if cols >= self.MIN_COLUMNS:
        from tqdm import tqdm  # pylint: disable=import-outside-toplevel
        own_size = _own_size(stream)
        # position=0: the bar owns its line even if another tqdm bar is alive in the
        # process (tqdm would otherwise nest it one line down with cursor moves).
        self.bar = tqdm(total=total, initial=initial, unit='step', file=stream,
                        dynamic_ncols=own_size, ncols=None if own_size else cols, position=0)

  def advance(self, step: int) -> None:
    """The bar's count (redrawn at most every 0.1 s by tqdm)."""
    if self.bar is not None:
      self.bar.update(step - self.bar.n)

  def update(self, step: int, metrics: dict) -> dict:
    """Throughput since the last call; the bar shows ``metrics``' loss/accuracy/mse."""
    now = time.time()
    rate = (step - self.s_last) / max(now - self.t_last, 1e-9)
    self.t_last, self.s_last = now, step
    extra = {'steps_per_s': rate, 'tokens_per_s': rate * self.tokens_per_step}
    if self.bar is not None:
      text = {k: f'{v:.4g}' for k, v in metrics.items() if k in ('loss', 'accuracy', 'mse')}
      text['tok/s'] = f'{extra["tokens_per_s"]:.3g}'
      self.bar.n = step
      self.bar.set_postfix(text, refresh=True)
    return extra

  def write(self, msg: str) -> None:
    """Prints ``msg`` on stdout on a line of its own, above the bar."""
    out = sys.stdout if self.out is None else self.out
    if self.bar is not None:
      self.bar.write(msg, file=out)
      out.flush()
    else:
      print(msg, file=out, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None


def _own_size(stream) -> bool:
  try:
    return os.get_terminal_size(stream.fileno()).columns > 0
  except (AttributeError, OSError, ValueError):
    return False


def plot(workdir: str, out_name: str = 'metrics.png') -> str | None:
  """Loss and accuracy/MSE curves (train and eval) from metrics.jsonl into a PNG."""
  rows = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  if not rows or jax.process_index() != 0:
    return None
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  second = 'accuracy' if any('accuracy' in r for r in rows) else 'mse'
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for split, style in (('train', '-'), ('eval', 'o-')):
    sel = [r for r in rows if r['split'] == split]
    for ax, key in zip(axes, ('loss', second)):
      pts = [(r['step'], r[key]) for r in sel if key in r]
      if pts:
        ax.plot(*zip(*pts), style, label=split, ms=3)
  for ax, key in zip(axes, ('loss', second)):
    ax.set_xlabel('step')
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  path = os.path.join(workdir, out_name)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
