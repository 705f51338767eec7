"""Metric sinks (process 0 only): metrics.jsonl, TensorBoard, progress bar, final plot."""

from __future__ import annotations

import json
import os
import sys
import time

import jax


class MetricWriter:
  """Appends ``{"step": s, "split": "train"|"eval", ...}`` lines to ``metrics.jsonl`` and
  writes the same scalars to TensorBoard (``<workdir>/tb``). No-op on processes != 0."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.tb = None
    if self.active and tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self.tb = SummaryWriter(os.path.join(workdir, 'tb'))
      except ImportError:
        self.tb = None

  def write(self, step: int, split: str, metrics: dict) -> None:
    if not self.active:
      return
    row = {'step': int(step), 'split': split, **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')
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


class Progress:
  """tqdm bar (stderr) with loss, tokens/s and ETA; plain log lines when not a TTY."""

  def __init__(self, total: int, initial: int, *, tokens_per_step: int, enabled: bool):
    self.enabled = enabled and jax.process_index() == 0
    self.tokens_per_step = tokens_per_step
    self.bar = None
    self.t_last, self.s_last = time.time(), initial
    if self.enabled and sys.stderr.isatty():
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit='step')

  def update(self, step: int, metrics: dict) -> dict:
    now = time.time()
    rate = (step - self.s_last) / max(now - self.t_last, 1e-9)
    self.t_last, self.s_last = now, step
    extra = {'steps_per_s': rate, 'tokens_per_s': rate * self.tokens_per_step}
    if self.enabled:
      text = {k: f'{v:.4g}' for k, v in metrics.items() if k in ('loss', 'accuracy', 'mse')}
      text['tok/s'] = f'{extra["tokens_per_s"]:.3g}'
      if self.bar is not None:
        self.bar.n = step
        self.bar.set_postfix(text, refresh=True)
      else:
        total = self.bar.total if self.bar else None
        del total
    return extra

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


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
