r"""Evaluate a training workdir: restore its newest checkpoint, report eval-split metrics,
write them to <workdir>/eval_metrics.json and the attention figures of
attnjax.analysis.write_report (head grids, per-layer statistics, sink report, rollout
overlays for images) to <workdir>/attention_maps/.

  python eval.py                                       # ./workdir/mqar, as python train.py
  python eval.py --workdir workdir/mqar                # uses <workdir>/config.json
  python eval.py --workdir /tmp/vit --config configs/digits_vit.py:variant=swin
  python eval.py --max_eval_examples=0                 # the whole eval split

By default it evaluates the same examples as train.py's eval (the first
config.eval_max_examples of the eval split), so the two print the same numbers for the
same checkpoint; both say which split and how many examples they read. Ctrl-C exits at
once (status 130); config mistakes print one ``ERROR:`` line (status 2).
"""

import json
import os
import signal
import sys


def _interrupted_while_importing(signum, _frame):
  os.write(2, b'\nInterrupted: exiting.\n')
  os._exit(128 + signum)  # pylint: disable=protected-access


for _sig in (signal.SIGINT, signal.SIGTERM):
  signal.signal(_sig, _interrupted_while_importing)

# Deliberately after the handler above: a Ctrl-C during these slow imports must be handled.
from absl import app, flags, logging  # noqa: E402

from attnjax.train import cli  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_CONFIG = os.path.join(_HERE, cli.DEFAULT_CONFIG)
cli.define_config_flag(_DEFAULT_CONFIG, 'Experiment config (default: the workdir\'s '
                       'config.json).')
flags.DEFINE_string('workdir', None, 'Training workdir to evaluate (default ./workdir/<config '
                    'file name>, the same default as train.py).')
flags.DEFINE_integer('num_examples', 2, 'Examples to draw attention maps for.')
flags.DEFINE_integer('max_eval_examples', None, 'Cap on eval examples (default: the config\'s '
                     'eval_max_examples, as during training; 0 = the whole split).')
FLAGS = flags.FLAGS


def load_config(workdir):
  """``--config`` if given, else the run's ``config.json`` with the ``--config.<key>``
  overrides of the command line applied to it."""
  saved = os.path.join(workdir, 'config.json')
  if FLAGS['config'].present or not os.path.exists(saved):
    return FLAGS.config
  import ml_collections  # pylint: disable=import-outside-toplevel
  with open(saved) as f:
    config = ml_collections.ConfigDict(json.load(f))
  try:
    return cli.apply_overrides(config, FLAGS.config, sys.argv)
  except ValueError as e:
    print(f'ERROR: {e} (in {saved})', file=sys.stderr)
    sys.exit(2)


def main(argv):
  del argv
  interrupts = cli.Interrupts(hard_exit=True).install()  # any Ctrl-C: exit at once (130)
  if not FLAGS['verbosity'].present:  # library INFO/WARNING chatter off unless asked for
    logging.set_verbosity(logging.ERROR)
  workdir = FLAGS.workdir or cli.default_workdir(FLAGS['config'].config_filename)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(ckpt_dir) or not any(d.isdigit() for d in os.listdir(ckpt_dir)):
    print(f'ERROR: no checkpoint in {os.path.abspath(ckpt_dir)}; train first (python train.py '
          'with the same --config/--workdir) or pass --workdir.', file=sys.stderr)
    sys.exit(2)
  if FLAGS.max_eval_examples is not None and FLAGS.max_eval_examples < 0:
    print(f'ERROR: --max_eval_examples must be >= 0 (0 = the whole split); got '
          f'{FLAGS.max_eval_examples}.', file=sys.stderr)
    sys.exit(2)
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from attnjax.analysis import write_report  # pylint: disable=import-outside-toplevel
  from attnjax.train import trainer as trainer_lib  # pylint: disable=import-outside-toplevel
  from attnjax.train.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel

  config = load_config(workdir)
  try:
    t = trainer_lib.Trainer(config, workdir)
  except ValueError as e:
    print(f'ERROR: {e}', file=sys.stderr)
    sys.exit(2)
  ckpt = Checkpointer(ckpt_dir, async_save=False)
  t.init()  # builds the non-trainable model state
  restored = ckpt.restore_latest(t.abstract_state)
  if restored is None:
    print(f'ERROR: no readable checkpoint in {ckpt.directory}', file=sys.stderr)
    sys.exit(2)
  step, state, _ = restored
  cap = FLAGS.max_eval_examples
  if cap is None:
    cap = config.get('eval_max_examples', None)
  split = config.data.get('eval_split', 'test')
  metrics = t.evaluate(state, cap)
  n = t.eval_size(cap)
  print(trainer_lib.eval_line(int(step), split, n, len(t.eval_source), metrics), flush=True)
  result = {'step': int(step), 'split': split, 'num_examples': n, **metrics}
  print(json.dumps(result, indent=2))
  if jax.process_index() != 0:
    ckpt.close()
    return
  with open(os.path.join(workdir, 'eval_metrics.json'), 'w') as f:
    json.dump(result, f, indent=2)

  # attention figures of the first examples (attnjax.analysis: eager forward, maps recomputed)
  n = max(1, FLAGS.num_examples)
  records = [t.eval_source[i] for i in range(min(n, len(t.eval_source)))]
  key = t.input_key
  inv = {v: k for k, v in t.keymap.items()}
  x = np.stack([np.asarray(r[inv.get(key, key)]) for r in records])
  model = nnx.merge(t.graphdef, jax.device_get(state['params']), jax.device_get(t.rest))
  out_dir = os.path.join(workdir, 'attention_maps')
  paths = write_report(model, jax.numpy.asarray(x), out_dir, max_examples=len(records),
                       title=f'{config.model.attention.name} step {step}', deterministic=True)
  if not paths:
    print('no attention maps captured (the model makes no attention call); no figures written.')
  for path in paths:
    print(f'wrote {path}')
  ckpt.close()
  interrupts.uninstall()


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(_DEFAULT_CONFIG))
