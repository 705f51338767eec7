"""Shared pieces of the experiment scripts (issue 20, experiments 1, 3 and 4).

``Fitter`` trains one model config (a ``configs/*.py`` config: ``model``, ``task``,
``optimizer``, ``schedule``, ``num_steps``, ``batch_size``) for several seeds with ONE
compiled train step: the model is built by ``attnjax.models.build_model``, the optimizer
and schedule by ``attnjax.train.optimizer``, the loss and metrics by
``attnjax.train.losses`` -- the trainer's own pieces -- but the step is jitted once per
config and reused for every seed (``attnjax.train.trainer.Trainer`` bakes the seed into
its compiled init, so each seed would compile init and step again: on the shared 2-core
machine that is about half of a run's time).  Batches come from the numpy generators of
``attnjax.data.tasks``, fresh every step (``batch_fn(step) -> dict``), so a run never
repeats an example.  Dropout must be 0 (the step runs the model deterministically).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def load_config(name: str, arg: str | None = None):
  """``configs/<name>.py``'s ``get_config(arg)``."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  path = os.path.join(ROOT, 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'attnjax_config_{name}', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def small_mode() -> bool:
  """True when the notebook test asks for tiny settings (``ATTNJAX_NB_SMALL=1``)."""
  return os.environ.get('ATTNJAX_NB_SMALL', '') not in ('', '0')


class Fitter:
  """One compiled train step / forward for ``config``; ``train(seed, batch_fn)`` per seed."""

  def __init__(self, config):
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import optax  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from attnjax import models  # pylint: disable=import-outside-toplevel
    from attnjax.train import losses  # pylint: disable=import-outside-toplevel
    from attnjax.train import optimizer as optim  # pylint: disable=import-outside-toplevel
    if float(config.model.get('dropout_rate', 0.0) or 0.0) != 0.0:
      raise ValueError('config.model.dropout_rate must be 0 for experiments._harness.Fitter '
                       f'(it trains deterministically); got {config.model.dropout_rate}.')
    self.config = config
    self.task = task = config.task
    self.schedule = optim.make_schedule(config.schedule, config.num_steps)
    self.tx = tx = optim.make_optimizer(config.optimizer, self.schedule)
    model_cfg = config.model

    def init(key):
      model = models.build_model(model_cfg, rngs=nnx.Rngs(params=key, dropout=key))
      _, params, rest = nnx.split(model, nnx.Param, ...)
      return params, rest, tx.init(params)

    abstract = nnx.eval_shape(lambda: models.build_model(model_cfg, rngs=nnx.Rngs(0)))
    self._graphdef = graphdef = nnx.split(abstract, nnx.Param, ...)[0]

    def forward(params, rest, x):
      return nnx.merge(graphdef, params, rest)(x, deterministic=True)

    def step(params, opt_state, rest, batch):
      def loss_fn(p):
        return losses.compute(task, forward(p, rest, batch['inputs']), batch)
      (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    self._init = jax.jit(init)
    self._step = jax.jit(step, donate_argnums=(0, 1))
    self._forward = jax.jit(forward)
    self._jnp = jnp

  def train(self, seed: int, batch_fn, *, log_every: int = 0, label: str = ''):
    """Trains ``num_steps`` steps from the init of ``seed``; returns ``(params, rest,
    losses)`` with the train loss of every step (float32 numpy)."""
    import jax  # pylint: disable=import-outside-toplevel
    params, rest, opt_state = self._init(jax.random.key(seed))
    out = []
    t0 = time.time()
    for s in range(self.config.num_steps):
      batch = {k: self._jnp.asarray(v) for k, v in batch_fn(s).items()}
      params, opt_state, loss = self._step(params, opt_state, rest, batch)
      out.append(loss)
      if log_every and ((s + 1) % log_every == 0 or s + 1 == self.config.num_steps):
        print(f'  {label} seed {seed} step {s + 1}/{self.config.num_steps} loss '
              f'{float(loss):.4f} ({time.time() - t0:.0f}s)', flush=True)
    return params, rest, np.asarray(jax.device_get(out), np.float32)

  def predict(self, params, rest, x, *, batch_size: int = 250) -> np.ndarray:
    """Model outputs for ``x`` (numpy, leading example axis), in batches."""
    outs = [np.asarray(self._forward(params, rest, self._jnp.asarray(x[i:i + batch_size])))
            for i in range(0, len(x), batch_size)]
    return np.concatenate(outs, axis=0)


def fresh_batches(generate, batch_size: int, seed: int, **params):
  """``batch_fn(step)``: ``generate(batch_size, seed', **params)`` with a distinct seed per
  (run seed, step), never equal to the test seeds (which are < 10**6)."""
  def batch_fn(step):
    return generate(batch_size, 10**6 + 10**5 * seed + step, **params)
  return batch_fn


def mean_std(values) -> tuple[float, float]:
  a = np.asarray(values, np.float64)
  return float(a.mean()), float(a.std())


def fmt(values, digits: int = 3) -> str:
  m, s = mean_std(values)
  return f'{m:.{digits}f} ± {s:.{digits}f}'


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
  return '\n'.join(lines)


def write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(obj, f, indent=1)


def parse_seeds(text: str) -> list[int]:
  try:
    seeds = [int(s) for s in str(text).split(',') if s.strip()]
  except ValueError as e:
    raise ValueError(f'--seeds must be comma-separated ints like 0,1,2; got {text!r}.') from e
  if not seeds:
    raise ValueError(f'--seeds must name at least one seed; got {text!r}.')
  return seeds


def save_figure(fig, path: str | None):
  """``fig.tight_layout()``, then ``fig.savefig(path, dpi=100)`` unless path is None."""
  fig.tight_layout()
  if path is not None:
    fig.savefig(path, dpi=100)
  return fig


def arg_parser(doc: str, out: str) -> argparse.ArgumentParser:
  """The options every experiment script takes: ``--seeds``, ``--out``, ``--small``."""
  p = argparse.ArgumentParser(description=doc.split('\n\n')[0])
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--out', default=out)
  p.add_argument('--small', action='store_true', help='tiny settings (notebook test)')
  return p


def seeded_main(doc: str, name: str, run, plot, summary_table, small: dict, *, steps: int,
                size: str = 'S') -> None:
  """The command line of the seed-looping experiments (1, 3, 4): ``--seeds``, ``--steps``,
  ``--size``, ``--out``, ``--small``; writes ``results.json`` and ``<name>.png`` into
  ``--out`` and prints the summary table."""
  p = arg_parser(doc, f'/tmp/{name}')
  p.add_argument('--steps', type=int, default=steps)
  p.add_argument('--size', default=size)
  args = p.parse_args()
  seeds = parse_seeds(args.seeds)
  kw = dict(steps=args.steps, size=args.size)
  if args.small:
    seeds, kw = seeds[:1], dict(small)
  results = run(seeds, **kw)
  os.makedirs(args.out, exist_ok=True)
  write_json(os.path.join(args.out, 'results.json'),
             {'settings': {'seeds': seeds, **kw}, 'results': results})
  plot(results, os.path.join(args.out, f'{name}.png'))
  print(summary_table(results))


def sweep_main(doc: str, name: str, run, table, *, what: str) -> None:
  """The command line of the variant sweeps (2, 6): ``--seeds``, ``--out``, ``--small``,
  ``--variants`` (comma list; default ``what``), ``--steps``; prints the table and the
  wall time."""
  p = arg_parser(doc, f'/tmp/{name}')
  p.add_argument('--variants', default=None, help=f'comma list (default: {what})')
  p.add_argument('--steps', type=int, default=None)
  args = p.parse_args()
  over = {}
  if args.variants:
    over['variants'] = tuple(args.variants.split(','))
  if args.steps:
    over['steps'] = args.steps
  res = run(args.seeds.split(','), small=args.small, out=args.out, **over)
  print(table(res))
  print(f'wall time {res["wall_s"]:.0f}s')
