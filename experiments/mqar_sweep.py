r"""Experiment (issue 20, item 2): MQAR capacity sweep, Zoology-style.

"Zoology: Measuring and Improving Recall in Efficient Language Models" (Arora et al.,
2023) trains 2-layer causal LMs on multi-query associative recall (MQAR,
``attnjax.data.tasks.generate_mqar``) and plots recall accuracy against model width: dense
attention solves it at every width, while sub-quadratic mixers need a larger width (a
larger recurrent state) as the number of key-value pairs grows.

  python experiments/mqar_sweep.py --seeds 0,1,2 --out /tmp/mqar_sweep

For every (variant, d_model, num_pairs) it trains ``len(lrs) x len(seeds)`` models and
reports, per setting, the learning rate with the best mean test accuracy and the mean ±
std over the seeds at that learning rate.

To fit 2 shared CPU cores, all models of one (variant, d_model) — every learning rate,
seed and key-value count — are trained by one compiled function: their parameters are
stacked, the train step (the library's model, ``attnjax.train.losses.compute('lm')``, and
``attnjax.train.optimizer``'s AdamW with warm-up + cosine decay at peak 1, its update
scaled by each model's learning rate) is ``jax.vmap``-ed over the models and
``jax.lax.scan``-ned over the steps. This is the same update ``train.py`` makes with
``configs/mqar.py`` (``schedule.learning_rate = lr``), without one compilation per run.
Each seed fixes the initialisation and the order of the training examples.
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

VARIANTS = ('mha', 'sliding_window', 'linear', 'lightning', 'dynamic_mask', 'moba')
LABELS = {'mha': 'dense (mha)', 'sliding_window': 'sliding window', 'linear': 'linear',
          'lightning': 'lightning', 'dynamic_mask': 'dynamic mask', 'moba': 'MoBA'}

FULL = dict(variants=VARIANTS, widths=(32, 64), pairs=(2, 4), lrs=(3e-3, 1e-2),
            seq_len=24, vocab=64, steps=150, batch_size=32, num_train=10000, num_test=500,
            num_layers=2, num_heads=2, warmup=15)
SMALL = dict(variants=('mha', 'linear'), widths=(16,), pairs=(2,), lrs=(3e-3,),
             seq_len=12, vocab=16, steps=20, batch_size=8, num_train=256, num_test=32,
             num_layers=2, num_heads=2, warmup=2)


def model_config(variant: str, d_model: int, *, seq_len: int, vocab: int, num_layers: int,
                 num_heads: int):
  """The ``configs/mqar.py`` LM at width ``d_model``: ``num_layers`` blocks of ``num_heads``
  heads of ``d_model // num_heads``, MLP ``2 * d_model``, RoPE, the variant's default
  options (``config_lib.variant_options`` at ``seq_len``)."""
  from attnjax.train import config_lib
  m = config_lib.model_config('lm', None, variant=variant, seq_len=seq_len, vocab_size=vocab)
  m.d_model, m.num_layers = d_model, num_layers
  m.num_heads = m.num_kv_heads = num_heads
  m.head_dim, m.mlp_dim = d_model // num_heads, 2 * d_model
  return m


FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def call_compiled(fn, *args, fast=False):
  """``jax.jit(fn)(*args)``, compiled with XLA's backend optimisation off when ``fast``
  (the run-once init and eval functions: compile time dominates there)."""
  import jax
  lowered = jax.jit(fn).lower(*args)
  return (lowered.compile(compiler_options=FAST_COMPILE) if fast else lowered.compile())(*args)


def train_group(model_cfg, datasets, lrs, seeds, *, steps, batch_size, warmup, task='lm',
                input_key='inputs'):
  """Trains one model per (dataset, lr, seed) with one compiled function.

  datasets: list of (train dict, test dict) of numpy arrays (same keys and shapes), e.g.
  ``generate_mqar`` outputs; ``task``: an ``attnjax.train.losses`` task; the model reads
  ``batch[input_key]``. Returns (test accuracy, mean train loss of the last 20 steps), each
  [len(datasets), len(lrs), len(seeds)].
  """
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np
  import optax
  from flax import nnx

  from attnjax import models
  from attnjax.train import config_lib, losses
  from attnjax.train import optimizer as optim_lib

  c = config_lib.base_config()
  c.schedule.learning_rate, c.schedule.warmup_steps = 1.0, min(warmup, steps)
  tx = optim_lib.make_optimizer(c.optimizer, optim_lib.make_schedule(c.schedule, steps))
  cfg = ml_collections.ConfigDict(model_cfg)

  def make(seed):
    kp, kd = jax.random.split(jax.random.key(seed))
    return models.build_model(cfg, rngs=nnx.Rngs(params=kp, dropout=kd))

  graphdef = nnx.split(nnx.eval_shape(lambda: make(0)), nnx.Param, ...)[0]
  nd, nl, ns = len(datasets), len(lrs), len(seeds)
  # model m = ((d * nl) + l) * ns + s
  m_seed = np.tile(np.asarray(seeds), nd * nl)
  m_lr = np.repeat(np.tile(np.asarray(lrs, np.float32), nd), ns)
  m_data = np.repeat(np.arange(nd), nl * ns)

  def init(seed_m):
    def one(s):
      _, p, r = nnx.split(make(s), nnx.Param, ...)
      return p, r
    return jax.vmap(one)(seed_m)

  def forward(p, r, tokens):
    model = nnx.merge(graphdef, p, r)
    out, inter = nnx.capture(model, nnx.Intermediate)(tokens, deterministic=True)
    aux = sum((jnp.sum(x) for path, x in jax.tree_util.tree_flatten_with_path(inter)[0]
               if any(getattr(k, 'key', None) == 'aux_loss' for k in path)),
              jnp.zeros((), jnp.float32))
    return out, aux

  # the train sets of all datasets, concatenated: rows d * n_train + i
  train_data = {k: jnp.asarray(np.concatenate([d[0][k] for d in datasets]))
                for k in datasets[0][0]}
  n_train = len(datasets[0][0][input_key])
  # per-model example order: seed s draws the same order for every lr / dataset
  order = {s: np.random.default_rng(1000 + s).integers(0, n_train, (steps, batch_size))
           for s in seeds}
  idx = jnp.asarray(np.stack([order[s] + d * n_train for s, d in zip(m_seed, m_data)], 1),
                    jnp.int32)  # [steps, M, B]

  def train(params, rest, lr_m, idx):
    opt = jax.vmap(tx.init)(params)

    def one(p, o, r, lr, batch):
      def loss_fn(p):
        out, aux = forward(p, r, batch[input_key])
        return losses.compute(task, out, batch)[0] + aux

      loss, g = jax.value_and_grad(loss_fn)(p)
      upd, o = tx.update(g, o, p)
      upd = jax.tree.map(lambda u: lr * u, upd)
      return optax.apply_updates(p, upd), o, loss

    def step(carry, ix):
      p, o = carry
      batch = {k: v[ix] for k, v in train_data.items()}  # [M, B, T]
      p, o, loss = jax.vmap(one)(p, o, rest, lr_m, batch)
      return (p, o), loss

    (params, _), loss = jax.lax.scan(step, (params, opt), idx)
    return params, loss

  def evaluate(params, rest, data_m, test):
    def one(p, r, d):
      batch = {k: v[d] for k, v in test.items()}
      out, _ = forward(p, r, batch[input_key])
      num, den = losses.compute(task, out, batch)[1]['accuracy']
      return num / den
    return jax.vmap(one)(params, rest, data_m)

  params, rest = call_compiled(init, jnp.asarray(m_seed), fast=True)
  params, loss = call_compiled(train, params, rest, jnp.asarray(m_lr), idx)
  test = {k: jnp.asarray(np.stack([d[1][k] for d in datasets])) for k in datasets[0][1]}
  acc = np.asarray(call_compiled(evaluate, params, rest, jnp.asarray(m_data), test, fast=True))
  final_loss = np.asarray(loss[-20:].mean(0))
  return acc.reshape(nd, nl, ns), final_loss.reshape(nd, nl, ns)


def run(seeds=(0, 1, 2), small=False, out=None, log=print, **overrides):
  """Runs the sweep; returns the results dict (also written to ``out/results.json``)."""
  import numpy as np

  from attnjax.data import tasks
  s = dict(SMALL if small else FULL)
  s.update(overrides)
  seeds = [int(x) for x in seeds]
  datasets = [(tasks.generate_mqar(s['num_train'], 0, vocab_size=s['vocab'], num_pairs=p,
                                   seq_len=s['seq_len']),
               tasks.generate_mqar(s['num_test'], 1, vocab_size=s['vocab'], num_pairs=p,
                                   seq_len=s['seq_len'])) for p in s['pairs']]
  rows, t_all = [], time.time()
  for v in s['variants']:
    for d in s['widths']:
      t0 = time.time()
      mc = model_config(v, d, seq_len=s['seq_len'], vocab=s['vocab'],
                        num_layers=s['num_layers'], num_heads=s['num_heads'])
      acc, loss = train_group(mc, datasets, s['lrs'], seeds, steps=s['steps'],
                              batch_size=s['batch_size'], warmup=s['warmup'])
      for i, p in enumerate(s['pairs']):
        means = acc[i].mean(1)
        b = int(np.argmax(means))
        rows.append(dict(variant=v, d_model=d, num_pairs=p, best_lr=s['lrs'][b],
                         mean=float(means[b]), std=float(acc[i, b].std()),
                         per_lr={str(lr): acc[i, j].tolist() for j, lr in enumerate(s['lrs'])},
                         train_loss={str(lr): loss[i, j].tolist()
                                     for j, lr in enumerate(s['lrs'])}))
        log(f'{v:>15s} d={d:<4d} pairs={p:<3d} best lr {s["lrs"][b]:g}: '
            f'{means[b]:.3f} ± {acc[i, b].std():.3f}  (per lr means '
            f'{np.round(means, 3).tolist()})  [{time.time() - t0:.0f}s]')
      if out:  # partial results after every group
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, 'partial.json'), 'w') as f:
          json.dump(rows, f, indent=1)
  res = {'settings': {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
         'seeds': seeds, 'rows': rows, 'wall_s': time.time() - t_all}
  if out:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'results.json'), 'w') as f:
      json.dump(res, f, indent=1)
    plot(res, os.path.join(out, 'mqar_sweep.png'))
  return res


def table(res) -> str:
  """Markdown table: one row per (variant, num_pairs), one column per width."""
  s = res['settings']
  by = {(r['variant'], r['num_pairs'], r['d_model']): r for r in res['rows']}
  head = '| variant | kv pairs | ' + ' | '.join(f'd_model {d}' for d in s['widths']) + ' |'
  lines = [head, '|---|---|' + '---|' * len(s['widths'])]
  for v in s['variants']:
    for p in s['pairs']:
      cells = []
      for d in s['widths']:
        r = by[(v, p, d)]
        cells.append(f'{r["mean"]:.3f} ± {r["std"]:.3f} (lr {r["best_lr"]:g})')
      lines.append(f'| {LABELS.get(v, v)} | {p} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot(res, path=None, ax=None):
  """Accuracy vs width, one panel per key-value count, one line per variant."""
  import matplotlib
  if path is not None and ax is None:
    matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  s = res['settings']
  by = {(r['variant'], r['num_pairs'], r['d_model']): r for r in res['rows']}
  fig, axes = plt.subplots(1, len(s['pairs']), figsize=(3.6 * len(s['pairs']), 3),
                           sharey=True, squeeze=False)
  for ax_, p in zip(axes[0], s['pairs']):
    for i, v in enumerate(s['variants']):
      m = [by[(v, p, d)]['mean'] for d in s['widths']]
      e = [by[(v, p, d)]['std'] for d in s['widths']]
      ax_.errorbar(s['widths'], m, yerr=e, marker='o', ms=3, capsize=2, label=LABELS.get(v, v),
                   color=f'C{i}')
    ax_.axhline(1 / (s['vocab'] // 2), color='gray', ls=':', lw=1)
    ax_.set_xscale('log', base=2)
    ax_.set_xticks(s['widths'], [str(d) for d in s['widths']])
    ax_.set_title(f'{p} key-value pairs (seq len {s["seq_len"]})', fontsize=9)
    ax_.set_xlabel('d_model')
  axes[0, 0].set_ylabel('MQAR test accuracy')
  axes[0, -1].legend(fontsize=7)
  return H.save_figure(fig, path)


def main():
  H.sweep_main(__doc__, 'mqar_sweep', run, table, what='all six')

if __name__ == '__main__':
  main()
