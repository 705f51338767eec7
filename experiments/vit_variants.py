r"""Experiment (issue 20, item 6): the digits ViT across the spatial attention variants.

``configs/digits_vit.py`` (ViT size S: 2 layers x 4 heads, d_model 64, 2x2 patches of
scikit-learn's 8x8 digits -> a 4x4 token grid, batch 64, AdamW lr 2e-3, warm-up + cosine)
with the attention replaced by dense ``mha``, Swin, NAT (``neighborhood``), HaloNet,
MaxViT (block attention in layer 1, grid attention in layer 2), CSWin, Twins, DaViT and
BiFormer, each with its registered default options (all windows / blocks / stripes /
regions are 2, which divides the 4x4 grid). Reports the test accuracy (all 360 test
images; mean ± std over seeds), the parameter count and the forward + backward time of
one training batch (median of timed calls after warm-up, one model, same process and
batch for every variant).

  python experiments/vit_variants.py --seeds 0,1,2 --out /tmp/vit_variants

The seeds of one variant are trained together by one compiled function
(``experiments/mqar_sweep.py:train_group``: parameters stacked, the step vmapped over the
models and scanned over the steps); each seed fixes the initialisation and the order of
the training images.
"""

from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from experiments import _harness as H  # noqa: E402
from experiments.mqar_sweep import train_group  # noqa: E402

VARIANTS = ('mha', 'swin', 'neighborhood', 'halo', 'maxvit', 'cswin', 'twins', 'davit',
            'biformer')
LABELS = {'mha': 'dense (mha)', 'swin': 'Swin', 'neighborhood': 'NAT (neighborhood)',
          'halo': 'HaloNet', 'maxvit': 'MaxViT (block, grid)', 'cswin': 'CSWin',
          'twins': 'Twins', 'davit': 'DaViT', 'biformer': 'BiFormer'}
FULL = dict(variants=VARIANTS, size='S', steps=200, batch_size=64, lr=2e-3, warmup=20,
            timed_steps=20)
SMALL = dict(variants=('swin',), size='T', steps=10, batch_size=16, lr=2e-3, warmup=2,
             timed_steps=3)


def model_config(variant: str, size: str = 'S'):
  """``configs/digits_vit.py:variant=NAME`` model; 'maxvit' = layers alternating
  ``maxvit_block`` / ``maxvit_grid``."""
  import ml_collections

  from attnjax.train import config_lib
  name = 'maxvit_block' if variant == 'maxvit' else variant
  m = config_lib.model_config('vit', size, variant=name, seq_len=16, grid=(4, 4),
                              image_size=8, patch_size=2, channels=1, num_classes=10)
  if variant == 'maxvit':
    m.layers_attention = [ml_collections.ConfigDict(dict(
        name='maxvit_block' if i % 2 == 0 else 'maxvit_grid')) for i in range(m.num_layers)]
  return m


def digits():
  """(train, test) dicts of numpy arrays: image [N, 8, 8, 1] float32, label [N] int32."""
  import numpy as np

  from attnjax import data
  out = []
  for split in ('train', 'test'):
    src = data.load('digits', split)
    recs = [src[i] for i in range(len(src))]
    out.append({'image': np.stack([np.asarray(r['image'], np.float32) for r in recs]),
                'label': np.asarray([int(r['label']) for r in recs], np.int32)})
  return out[0], out[1]


def step_time(model_cfg, batch, repeats):
  """(num_params, median seconds of one jitted forward + backward of the classification
  loss on ``batch``) for a freshly initialised model."""
  import jax
  import numpy as np
  from flax import nnx

  from attnjax import models
  from attnjax.train import losses
  model = models.build_model(model_cfg, rngs=nnx.Rngs(params=0, dropout=1))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

  @jax.jit
  def fwd_bwd(p, b):
    def loss_fn(p):
      return losses.compute('classification', nnx.merge(graphdef, p, rest)(
          b['image'], deterministic=True), b)[0]
    return jax.value_and_grad(loss_fn)(p)

  b = {k: jax.numpy.asarray(v) for k, v in batch.items()}
  for _ in range(3):
    jax.block_until_ready(fwd_bwd(params, b))
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fwd_bwd(params, b))
    ts.append(time.perf_counter() - t)
  return n, float(np.median(ts))


def run(seeds=(0, 1, 2), small=False, out=None, log=print, **overrides):
  """Trains every variant; returns the results dict (also ``out/results.json``)."""
  import numpy as np
  s = dict(SMALL if small else FULL)
  s.update(overrides)
  seeds = [int(x) for x in seeds]
  train, test = digits()
  batch = {k: v[:s['batch_size']] for k, v in train.items()}
  rows, t_all = [], time.time()
  for v in s['variants']:
    t0 = time.time()
    mc = model_config(v, s['size'])
    acc, loss = train_group(mc, [(train, test)], [s['lr']], seeds, steps=s['steps'],
                            batch_size=s['batch_size'], warmup=s['warmup'],
                            task='classification', input_key='image')
    n, dt = step_time(mc, batch, s['timed_steps'])
    a = acc[0, 0]
    rows.append(dict(variant=v, accuracy=a.tolist(), mean=float(a.mean()), std=float(a.std()),
                     train_loss=loss[0, 0].tolist(), num_params=n, step_ms=1000 * dt))
    log(f'{v:>13s}: acc {a.mean():.3f} ± {a.std():.3f} {np.round(a, 3).tolist()}  params {n:,}'
        f'  fwd+bwd {1000 * dt:.1f} ms  [{time.time() - t0:.0f}s]')
    if out:
      os.makedirs(out, exist_ok=True)
      with open(os.path.join(out, 'partial.json'), 'w') as f:
        json.dump(rows, f, indent=1)
  res = {'settings': {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
         'seeds': seeds, 'rows': rows, 'wall_s': time.time() - t_all}
  if out:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'results.json'), 'w') as f:
      json.dump(res, f, indent=1)
    plot(res, os.path.join(out, 'vit_variants.png'))
  return res


def table(res) -> str:
  lines = ['| variant | test accuracy | parameters | fwd+bwd per step (ms) |',
           '|---|---|---|---|']
  for r in res['rows']:
    lines.append(f'| {LABELS.get(r["variant"], r["variant"])} | {r["mean"]:.3f} ± '
                 f'{r["std"]:.3f} | {r["num_params"]:,} | {r["step_ms"]:.1f} |')
  return '\n'.join(lines)


def plot(res, path=None):
  """Accuracy (mean ± std) against fwd+bwd time, one point per variant."""
  import matplotlib
  if path is not None:
    matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.4))
  for i, r in enumerate(res['rows']):
    ax.errorbar(r['step_ms'], r['mean'], yerr=r['std'], marker='o', ms=4, capsize=2,
                color=f'C{i % 10}', label=LABELS.get(r['variant'], r['variant']))
  ax.set_xlabel('fwd+bwd time per batch (ms, CPU)')
  ax.set_ylabel('digits test accuracy')
  ax.legend(fontsize=6, ncol=2)
  return H.save_figure(fig, path)


def main():
  H.sweep_main(__doc__, 'vit_variants', run, table, what='all nine')

if __name__ == '__main__':
  main()
