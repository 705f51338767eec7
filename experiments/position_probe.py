r"""Experiment (issue 20, item 1): Dual Triangle argmax position probe (catalog A02).

"Dual Triangle Attention: Effective Bidirectional Attention Without Positional
Embeddings" (Hallee & Gleghorn, 2026): an encoder WITHOUT positional encoding and with
mean pooling must name the position of the largest of ``seq_len`` distinct tokens
(``attnjax.data.tasks.generate_argmax_probe``).  Bidirectional attention is permutation
equivariant, so with mean pooling it cannot know positions (chance ``1/seq_len``);
causal attention and Dual Triangle attention (half the heads see the past, half the
future) can.  Variants: 'bidirectional' (mha, causal=False), 'causal' (mha, causal=True),
'dual_triangle'.

Length extrapolation: the classifier head has ``num_classes = 32`` (the longest evaluated
length) from the start; the model is trained on length 16 only (labels 0..15) and then
evaluated at lengths 16, 24 and 32.  Positions 16..31 never occur as labels in training,
so at longer lengths two accuracies are reported: over all examples (chance 1/L) and over
the examples whose largest token lies in the first 16 positions ("seen positions").

  python experiments/position_probe.py --seeds 0,1,2 --out /tmp/position_probe
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import _harness as H  # noqa: E402

VARIANTS = {  # name: (attention variant, causal)
    'bidirectional': ('mha', False),
    'causal': ('mha', True),
    'dual_triangle': ('dual_triangle', False),
}
TRAIN_LEN = 16
EVAL_LENS = (16, 24, 32)
NUM_CLASSES = 32
VOCAB = 64

#: The tiny settings of ``--small`` and of the notebook under ATTNJAX_NB_SMALL=1 (1 seed).
SMALL = dict(steps=30, size='T', num_eval=200, log_every=0)


def make_config(variant: str, *, steps: int, size: str):
  """``configs/argmax_probe.py`` with no positional encoding, mean pooling, 32 classes."""
  name, causal = VARIANTS[variant]
  c = H.load_config('argmax_probe', f'variant={name},steps={steps},size={size},'
                    f'seq_len={TRAIN_LEN},vocab={VOCAB}')
  c.model.position_embedding = 'none'
  c.model.pool = 'mean'
  c.model.causal = causal
  c.model.num_classes = NUM_CLASSES
  c.model.max_len = max(EVAL_LENS)
  c.schedule.warmup_steps = min(int(c.schedule.warmup_steps), steps // 5)
  return c


def eval_sets(num_examples: int):
  """{L: test set of length L}; test seeds differ from every training seed."""
  from attnjax.data import tasks  # pylint: disable=import-outside-toplevel
  return {L: tasks.generate_argmax_probe(num_examples, 500 + L, vocab_size=VOCAB, seq_len=L)
          for L in EVAL_LENS}


def accuracies(pred, label) -> dict:
  """Accuracy over all examples and over those with ``label < TRAIN_LEN``."""
  seen = label < TRAIN_LEN
  return {'all': float((pred == label).mean()), 'seen': float((pred[seen] == label[seen]).mean())}


def run(seeds, *, steps: int = 800, size: str = 'S', num_eval: int = 1000, variants=None,
        log_every: int = 200) -> dict:
  """Trains every variant for every seed; returns ``{variant: {seed: {L: {all, seen}}}}``
  plus the final train losses under ``'loss'``."""
  from attnjax.data import tasks  # pylint: disable=import-outside-toplevel
  tests = eval_sets(num_eval)
  out = {}
  for variant in variants or list(VARIANTS):
    c = make_config(variant, steps=steps, size=size)
    fitter = H.Fitter(c)
    out[variant] = {}
    for seed in seeds:
      batches = H.fresh_batches(tasks.generate_argmax_probe, c.batch_size, seed,
                                vocab_size=VOCAB, seq_len=TRAIN_LEN)
      params, rest, loss = fitter.train(seed, batches, log_every=log_every, label=variant)
      res = {}
      for L, t in tests.items():
        pred = fitter.predict(params, rest, t['inputs']).argmax(-1)
        res[str(L)] = accuracies(pred, t['label'])
      res['final_train_loss'] = float(loss[-20:].mean())
      out[variant][str(seed)] = res
      print(f'{variant} seed {seed}: ' + ', '.join(
          f'L={L} {res[str(L)]["all"]:.3f}' for L in EVAL_LENS), flush=True)
  return out


def summary_table(results: dict) -> str:
  header = ['variant'] + [f'acc @ {L}' for L in EVAL_LENS] + [
      f'acc @ {L}, argmax in first {TRAIN_LEN}' for L in EVAL_LENS[1:]]
  rows = []
  for v, per_seed in results.items():
    row = [v] + [H.fmt([r[str(L)]['all'] for r in per_seed.values()]) for L in EVAL_LENS]
    row += [H.fmt([r[str(L)]['seen'] for r in per_seed.values()]) for L in EVAL_LENS[1:]]
    rows.append(row)
  rows.append(['chance'] + [f'{1 / L:.3f}' for L in EVAL_LENS] + [f'{1 / L:.3f}'
                                                                   for L in EVAL_LENS[1:]])
  return H.markdown_table(header, rows)


def plot(results: dict, path: str | None = None):
  import matplotlib  # pylint: disable=import-outside-toplevel
  if path is not None:
    matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(5, 3.2))
  n = len(results)
  width = 0.8 / n
  xs = np.arange(len(EVAL_LENS))
  for i, (v, per_seed) in enumerate(results.items()):
    a = np.asarray([[r[str(L)]['all'] for L in EVAL_LENS] for r in per_seed.values()])
    ax.bar(xs + (i - (n - 1) / 2) * width, a.mean(0), width, yerr=a.std(0), capsize=2, label=v)
  for j, L in enumerate(EVAL_LENS):
    ax.hlines(1 / L, j - 0.45, j + 0.45, colors='k', linestyles='dotted',
              label='chance 1/L' if j == 0 else None)
  ax.set_xticks(xs, [f'L={L}' + (' (train)' if L == TRAIN_LEN else '') for L in EVAL_LENS])
  ax.set_ylabel('argmax-position accuracy')
  ax.set_ylim(0, 1)
  ax.legend(fontsize=7)
  return H.save_figure(fig, path)


def main():
  H.seeded_main(__doc__, 'position_probe', run, plot, summary_table, SMALL, steps=800)

if __name__ == '__main__':
  main()
