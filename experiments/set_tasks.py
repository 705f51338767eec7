r"""Experiment (issue 20, item 3): Set Transformer tasks, SAB vs ISAB vs PMA vs mean pooling.

"Set Transformer: A Framework for Attention-based Permutation-Invariant Neural Networks"
(Lee et al., 2019).  Three tasks of ``configs/set_tasks.py`` (data from
``attnjax.data.tasks``): max regression (``set_max``, 16 numbers, MSE), unique counting
(``set_count``, 16 elements from 10 prototypes, accuracy over the 11 classes) and
mixture-of-Gaussians means (``set_mog``, 32 points of 2 components in 2D, MSE of the 4
sorted mean coordinates).  Models (the 'set' model, blocks from ``attnjax.variants``):

  SAB+PMA   blocks 'mha' (SAB), pooling 'pma'
  ISAB+PMA  blocks 'isab' (8 inducing points), pooling 'pma'
  SAB+mean  blocks 'mha', pooling 'mean' (the mean over the elements)

so SAB vs ISAB is read with PMA pooling and PMA vs mean pooling with SAB blocks.

  python experiments/set_tasks.py --seeds 0,1,2 --out /tmp/set_tasks
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import _harness as H  # noqa: E402

MODELS = {  # name: (block attention, pooling)
    'SAB+PMA': ('mha', 'pma'),
    'ISAB+PMA': ('isab', 'pma'),
    'SAB+mean': ('mha', 'mean'),
}
TASKS = {  # name: (generator, metric, lower is better)
    'max': ('generate_set_max', 'mse'),
    'count': ('generate_set_count', 'accuracy'),
    'mog': ('generate_set_mog', 'mse'),
}

#: The tiny settings of ``--small`` and of the notebook under ATTNJAX_NB_SMALL=1 (1 seed).
SMALL = dict(steps=20, size='T', num_eval=200, log_every=0, tasks=['max'])


def make_config(task: str, model: str, *, steps: int, size: str):
  block, pooling = MODELS[model]
  c = H.load_config('set_tasks', f'task={task},variant={block},steps={steps},size={size}')
  c.model.pooling = {'name': pooling}
  c.schedule.warmup_steps = min(int(c.schedule.warmup_steps), steps // 5)
  return c


def metric(task: str, outputs, data) -> float:
  import numpy as np  # pylint: disable=import-outside-toplevel
  if TASKS[task][1] == 'accuracy':
    return float((outputs.argmax(-1) == data['label']).mean())
  return float(np.mean(np.square(outputs - data['target'])))


def baseline(task: str, test) -> float:
  """A data-only reference: the best constant prediction (train-free)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  if task == 'count':
    return float(np.max(np.bincount(test['label'])) / len(test['label']))
  return float(np.mean(np.var(test['target'], axis=0)))


def run(seeds, *, steps: int = 400, size: str = 'S', num_eval: int = 1000, tasks=None,
        models=None, log_every: int = 200) -> dict:
  """``{task: {model: {seed: metric}}}`` plus ``{task: {'constant': baseline}}``."""
  from attnjax.data import tasks as data_tasks  # pylint: disable=import-outside-toplevel
  out = {}
  for task in tasks or list(TASKS):
    gen = getattr(data_tasks, TASKS[task][0])
    test = gen(num_eval, 7)
    out[task] = {'constant': baseline(task, test)}
    for model in models or list(MODELS):
      c = make_config(task, model, steps=steps, size=size)
      fitter = H.Fitter(c)
      out[task][model] = {}
      for seed in seeds:
        params, rest, _ = fitter.train(seed, H.fresh_batches(gen, c.batch_size, seed),
                                       log_every=log_every, label=f'{task} {model}')
        m = metric(task, fitter.predict(params, rest, test['inputs']), test)
        out[task][model][str(seed)] = m
        print(f'{task} {model} seed {seed}: {TASKS[task][1]} {m:.4f}', flush=True)
  return out


def summary_table(results: dict) -> str:
  models = [m for m in MODELS if any(m in r for r in results.values())]
  header = ['task (metric)'] + models + ['constant predictor']
  rows = []
  for task, r in results.items():
    rows.append([f'{task} ({TASKS[task][1]})'] +
                [H.fmt(list(r[m].values()), 4) if m in r else '' for m in models] +
                [f'{r["constant"]:.4f}'])
  return H.markdown_table(header, rows)


def plot(results: dict, path: str | None = None):
  import matplotlib  # pylint: disable=import-outside-toplevel
  if path is not None:
    matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3), squeeze=False)
  for ax, (task, r) in zip(axes[0], results.items()):
    models = [m for m in MODELS if m in r]
    vals = [np.asarray(list(r[m].values())) for m in models]
    ax.bar(range(len(models)), [v.mean() for v in vals], yerr=[v.std() for v in vals],
           capsize=3, color=[f'C{i}' for i in range(len(models))])
    ax.axhline(r['constant'], color='k', ls=':', lw=1, label='constant predictor')
    ax.set_xticks(range(len(models)), models, fontsize=7)
    ax.set_title(f'{task} ({TASKS[task][1]})', fontsize=9)
    if TASKS[task][1] == 'mse':
      ax.set_yscale('log')
    ax.legend(fontsize=6)
  return H.save_figure(fig, path)


def main():
  H.seeded_main(__doc__, 'set_tasks', run, plot, summary_table, SMALL, steps=400)

if __name__ == '__main__':
  main()
