r"""Experiment (issue 20, item 5): head ablation on a trained digits ViT.

"Are Sixteen Heads Really Better than One?" (Michel, Levy & Neubig, 2019): heads are
removed (head gate 0, through attnjax.analysis) in increasing order of importance
``|d loss / d g_h|`` and, as the control, in random orders; the test accuracy is recorded
after each removal.  The digits test split (360 images) is cut in two: importance is
measured on the first 120 images, accuracy on the other 240.

  python experiments/head_ablation_vit.py --seeds 0,1,2 --out /tmp/head_ablation

Per seed it trains ``configs/digits_vit.py`` (size S: 2 layers x 4 heads, 600 steps) with
``train.py`` unless ``<out>/seed<k>`` already holds a checkpoint, then restores the
checkpoint and writes ``<out>/results.json`` and ``<out>/head_ablation.png``.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def restore(workdir):
  """(model, images, labels) of a digits_vit run (as eval.py restores it)."""
  import jax
  import ml_collections
  import numpy as np
  from flax import nnx

  from attnjax.train import trainer as trainer_lib
  from attnjax.train.checkpoint import Checkpointer
  with open(os.path.join(workdir, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  t = trainer_lib.Trainer(config, workdir)
  t.init()
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False)
  _, state, _ = ckpt.restore_latest(t.abstract_state)
  ckpt.close()
  model = nnx.merge(t.graphdef, jax.device_get(state['params']), jax.device_get(t.rest))
  recs = [t.eval_source[i] for i in range(len(t.eval_source))]
  images = np.stack([np.asarray(r['image']) for r in recs]).astype(np.float32)
  labels = np.asarray([int(r['label']) for r in recs])
  return model, images, labels


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--steps', type=int, default=600)
  p.add_argument('--random_orders', type=int, default=3)
  p.add_argument('--out', default='/tmp/head_ablation')
  args = p.parse_args()
  import jax
  import jax.numpy as jnp
  import numpy as np

  from attnjax import analysis

  results = {}
  for seed in [int(s) for s in args.seeds.split(',')]:
    wd = os.path.join(args.out, f'seed{seed}')
    if not os.path.isdir(os.path.join(wd, 'checkpoints')):
      subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'),
                      f'--config={os.path.join(ROOT, "configs", "digits_vit.py")}',
                      f'--workdir={wd}', f'--config.seed={seed}',
                      f'--config.num_steps={args.steps}',
                      '--config.progress_bar=False', '--config.tensorboard=False'],
                     check=True, cwd=ROOT)
    model, x, y = restore(wd)
    xi, yi, xa, ya = jnp.asarray(x[:120]), jnp.asarray(y[:120]), jnp.asarray(x[120:]), y[120:]

    def loss_fn(logits, labels=yi):
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], -1))

    acc = lambda logits, ya=ya: float(np.mean(np.argmax(np.asarray(logits), -1) == ya))
    imp = analysis.head_importance(model, xi, loss_fn, normalize=True)
    _, by_imp = analysis.ablation_curve(model, xa, acc, analysis.importance_order(imp))
    rand = [analysis.ablation_curve(model, xa, acc,
                                    analysis.random_order(imp, seed=100 * seed + r))[1]
            for r in range(args.random_orders)]
    results[seed] = {'importance': {k: v.tolist() for k, v in imp.items()},
                     'by_importance': by_imp.tolist(),
                     'random': [r.tolist() for r in rand]}
    print(f'seed {seed}: by importance {np.round(by_imp, 3).tolist()}')
    print(f'seed {seed}: random (mean) {np.round(np.mean(rand, 0), 3).tolist()}', flush=True)

  imp_c = np.asarray([r['by_importance'] for r in results.values()])
  rnd_c = np.asarray([np.mean(r['random'], 0) for r in results.values()])
  summary = {'removed': list(range(imp_c.shape[1])),
             'by_importance_mean': imp_c.mean(0).tolist(),
             'by_importance_std': imp_c.std(0).tolist(),
             'random_mean': rnd_c.mean(0).tolist(), 'random_std': rnd_c.std(0).tolist()}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump({'seeds': results, 'summary': summary}, f, indent=1)
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(4.5, 3))
  n = np.arange(imp_c.shape[1])
  for c, lab, col in ((imp_c, 'by importance (least first)', 'C0'),
                      (rnd_c, 'random order', 'C1')):
    ax.errorbar(n, c.mean(0), yerr=c.std(0), label=lab, color=col, marker='o', ms=3, capsize=2)
  ax.set_xlabel('heads removed (of %d)' % (n[-1]))
  ax.set_ylabel('test accuracy (240 images)')
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, 'head_ablation.png'), dpi=100)
  print(json.dumps(summary, indent=1))


if __name__ == '__main__':
  main()
