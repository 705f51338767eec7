r"""Evaluate a training workdir: restore its newest checkpoint, report eval-split metrics,
write them to <workdir>/eval_metrics.json and attention-map figures to
<workdir>/attention_maps/.

  python eval.py --workdir workdir/mqar                # uses <workdir>/config.json
  python eval.py --workdir /tmp/vit --config configs/digits_vit.py:variant=swin
"""

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file('config', os.path.join(_HERE, 'configs', 'mqar.py'),
                                'Experiment config (default: the workdir\'s config.json).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Training workdir to evaluate.', required=True)
flags.DEFINE_integer('num_examples', 2, 'Examples to draw attention maps for.')
flags.DEFINE_integer('max_eval_examples', 0, 'Cap on eval examples (0 = whole split).')
FLAGS = flags.FLAGS


def load_config():
  saved = os.path.join(FLAGS.workdir, 'config.json')
  if FLAGS['config'].present or not os.path.exists(saved):
    return FLAGS.config
  import ml_collections  # pylint: disable=import-outside-toplevel
  with open(saved) as f:
    return ml_collections.ConfigDict(json.load(f))


def main(argv):
  del argv
  if not FLAGS['verbosity'].present:  # library INFO/WARNING chatter off unless asked for
    logging.set_verbosity(logging.ERROR)
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from attnjax.analysis import capture_attention, plot_attention_maps  # pylint: disable=import-outside-toplevel
  from attnjax.train import trainer as trainer_lib  # pylint: disable=import-outside-toplevel
  from attnjax.train.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel

  config = load_config()
  try:
    t = trainer_lib.Trainer(config, FLAGS.workdir)
  except ValueError as e:
    print(f'ERROR: {e}', file=sys.stderr)
    sys.exit(2)
  ckpt = Checkpointer(os.path.join(FLAGS.workdir, 'checkpoints'), async_save=False)
  t.init()  # builds the non-trainable model state
  restored = ckpt.restore_latest(t.abstract_state)
  if restored is None:
    print(f'ERROR: no checkpoint in {ckpt.directory}', file=sys.stderr)
    sys.exit(2)
  step, state, _ = restored
  metrics = t.evaluate(state, FLAGS.max_eval_examples or None)
  result = {'step': int(step), 'split': config.data.get('eval_split', 'test'), **metrics}
  print(json.dumps(result, indent=2))
  if jax.process_index() != 0:
    return
  with open(os.path.join(FLAGS.workdir, 'eval_metrics.json'), 'w') as f:
    json.dump(result, f, indent=2)

  # attention maps of the first examples, eager (unjitted) forward on host copies
  n = max(1, FLAGS.num_examples)
  records = [t.eval_source[i] for i in range(min(n, len(t.eval_source)))]
  key = t.input_key
  inv = {v: k for k, v in t.keymap.items()}
  x = np.stack([np.asarray(r[inv.get(key, key)]) for r in records])
  params = jax.device_get(state['params'])
  rest = jax.device_get(t.rest)
  model = nnx.merge(t.graphdef, params, rest)
  with capture_attention() as maps:
    model(jax.numpy.asarray(x), deterministic=True)
  out_dir = os.path.join(FLAGS.workdir, 'attention_maps')
  for i in range(len(records)):
    path = plot_attention_maps(maps, os.path.join(out_dir, f'example_{i}.png'), example=i,
                               title=f'{config.model.attention.name}: example {i}, step {step}')
    print(f'wrote {path}')
  ckpt.close()


if __name__ == '__main__':
  app.run(main)
