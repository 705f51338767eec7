r"""Experiment (issue 20, item 4): in-context linear regression, softmax vs linear vs
lightning attention, error vs prompt length.

"What Can Transformers Learn In-Context? A Case Study of Simple Function Classes" (Garg
et al., 2022) for the task; the mechanisms: softmax ('mha'), linear attention ("Transformers
are RNNs", 'linear', elu+1 features) and Lightning attention ('lightning', per-head decay).
Data: ``attnjax.data.tasks.generate_icl_regression`` (dim 4, no noise): rows
``[x_i, y_i, 0]`` for ``m - 1`` examples and ``[x_q, 0, 1]`` for the query, target
``y_q = w.x_q / 2`` (variance 1, so predicting 0 has MSE about 1).  Model:
``configs/set_tasks.py:task=icl`` (the 'set' model: input projection, blocks, PMA readout)
with the blocks' attention set to the mechanism, all CAUSAL ('lightning' is always causal;
the query is the last row, so it sees every example in all three).

Training cycles through prompts of 8, 16 and 32 points (``TRAIN_LENGTHS``; one length per
step); the trained model is then evaluated at 4, 8, 16 and 32 points.  With 32-point
prompts only, softmax sat at the error of predicting 0 for about 1000 steps (so 600 steps
never left it); with the length mix it leaves it after about 400 (docs/experiments.md §4).
Reference: the least-squares (minimum-norm) answer from the examples, the Bayes-optimal
predictor here (for fewer than 4 examples its error is the unexplained share
``(4 - k) / 4``).

  python experiments/icl_regression.py --seeds 0,1,2 --steps 2000 --out /tmp/icl_regression
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import _harness as H  # noqa: E402

MECHANISMS = ('mha', 'linear', 'lightning')
LENGTHS = (4, 8, 16, 32)
TRAIN_LENGTHS = (8, 16, 32)
DIM = 4

#: The tiny settings of ``--small`` and of the notebook under ATTNJAX_NB_SMALL=1 (1 seed;
#: one training length: one compiled step per model).
SMALL = dict(steps=20, size='T', num_eval=100, log_every=0, train_lengths=(32,))


def make_config(mechanism: str, *, steps: int, size: str):
  c = H.load_config('set_tasks', f'task=icl,variant={mechanism},steps={steps},size={size}')
  c.model.attention.causal = True
  c.data.params.num_points = max(LENGTHS)
  c.schedule.warmup_steps = min(int(c.schedule.warmup_steps), steps // 5)
  return c


def least_squares_mse(data) -> float:
  """MSE of the minimum-norm least-squares fit of the examples, applied to the query."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  x = data['inputs'][:, :-1, :DIM].astype(np.float64)
  y = data['inputs'][:, :-1, DIM].astype(np.float64)
  xq = data['inputs'][:, -1, :DIM].astype(np.float64)
  pred = np.asarray([xq[i] @ np.linalg.pinv(x[i]) @ y[i] for i in range(len(x))])
  return float(np.mean(np.square(pred - data['target'][:, 0])))


def run(seeds, *, steps: int = 2000, size: str = 'S', num_eval: int = 1000, mechanisms=None,
        log_every: int = 200, train_lengths=TRAIN_LENGTHS) -> dict:
  """``{mechanism: {seed: {m: mse}}}`` plus ``'least_squares'`` and ``'zero'`` references.
  Training step ``s`` uses prompts of ``train_lengths[s % len(train_lengths)]`` points."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  from attnjax.data import tasks  # pylint: disable=import-outside-toplevel
  tests = {m: tasks.generate_icl_regression(num_eval, 900 + m, num_points=m, dim=DIM)
           for m in LENGTHS}
  out = {'least_squares': {str(m): least_squares_mse(t) for m, t in tests.items()},
         'zero': {str(m): float(np.mean(np.square(t['target']))) for m, t in tests.items()}}
  for mech in mechanisms or MECHANISMS:
    c = make_config(mech, steps=steps, size=size)
    fitter = H.Fitter(c)
    out[mech] = {}
    for seed in seeds:
      per_length = [H.fresh_batches(tasks.generate_icl_regression, c.batch_size, seed,
                                    num_points=m, dim=DIM) for m in train_lengths]
      batches = lambda s, per_length=per_length: per_length[s % len(per_length)](s)
      params, rest, _ = fitter.train(seed, batches, log_every=log_every, label=mech)
      res = {str(m): float(np.mean(np.square(fitter.predict(params, rest, t['inputs'])
                                             - t['target'])))
             for m, t in tests.items()}
      out[mech][str(seed)] = res
      print(f'{mech} seed {seed}: ' + ', '.join(f'm={m} {res[str(m)]:.3f}' for m in LENGTHS),
            flush=True)
  return out


def summary_table(results: dict) -> str:
  header = ['attention'] + [f'MSE @ {m} points' for m in LENGTHS]
  rows = []
  for mech in MECHANISMS:
    if mech in results:
      rows.append([mech] + [H.fmt([r[str(m)] for r in results[mech].values()])
                            for m in LENGTHS])
  rows.append(['least squares'] + [f'{results["least_squares"][str(m)]:.3f}' for m in LENGTHS])
  rows.append(['predict 0'] + [f'{results["zero"][str(m)]:.3f}' for m in LENGTHS])
  return H.markdown_table(header, rows)


def plot(results: dict, path: str | None = None):
  import matplotlib  # pylint: disable=import-outside-toplevel
  if path is not None:
    matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(4.5, 3.2))
  for i, mech in enumerate(m for m in MECHANISMS if m in results):
    a = np.asarray([[r[str(m)] for m in LENGTHS] for r in results[mech].values()])
    ax.errorbar(LENGTHS, a.mean(0), yerr=a.std(0), marker='o', ms=3, capsize=2,
                label=mech, color=f'C{i}')
  ax.plot(LENGTHS, [results['least_squares'][str(m)] for m in LENGTHS], 'k--', lw=1,
          label='least squares')
  ax.plot(LENGTHS, [results['zero'][str(m)] for m in LENGTHS], 'k:', lw=1, label='predict 0')
  ax.set_xscale('log', base=2)
  ax.set_xticks(LENGTHS, [str(m) for m in LENGTHS])
  ax.set_ylim(bottom=0)
  ax.set_xlabel('prompt length (points incl. the query)')
  ax.set_ylabel('query MSE')
  ax.legend(fontsize=7)
  return H.save_figure(fig, path)


def main():
  H.seeded_main(__doc__, 'icl_regression', run, plot, summary_table, SMALL, steps=2000)

if __name__ == '__main__':
  main()
