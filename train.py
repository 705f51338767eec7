r"""Train any attnjax model from an ml_collections config.

  python train.py                                   # configs/mqar.py -> ./workdir/mqar
  python train.py --config configs/digits_vit.py:variant=swin --workdir /tmp/vit
  python train.py --config configs/mqar.py --config.model.attention.name=sliding_window

Multi-host: launch one process per host (TPU pod slice: the same command on every worker
via `gcloud compute tpus tpu-vm ssh --worker=all`; GPU nodes: srun / torchrun-style
launchers) and pass --coordinator_address/--num_processes/--process_id, or let
jax.distributed.initialize() discover them (TPU, SLURM). See docs/training.md.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file('config', os.path.join(_HERE, 'configs', 'mqar.py'),
                                'Experiment config file (path[:args]).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Output dir (default ./workdir/<config name>).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process).')
flags.DEFINE_integer('process_id', None, 'This process (multi-process).')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() with auto-detection.')
FLAGS = flags.FLAGS


def default_workdir(config_arg: str) -> str:
  path = (config_arg or os.path.join('configs', 'mqar.py')).split(':', 1)[0]
  return os.path.join('workdir', os.path.splitext(os.path.basename(path))[0])


def main(argv):
  del argv
  if not FLAGS['verbosity'].present:  # library INFO/WARNING chatter off unless asked for
    logging.set_verbosity(logging.ERROR)
  import jax  # pylint: disable=import-outside-toplevel
  if FLAGS.coordinator_address or FLAGS.num_processes:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  elif FLAGS.distributed:
    jax.distributed.initialize()
  from attnjax.train import trainer  # pylint: disable=import-outside-toplevel
  workdir = FLAGS.workdir or default_workdir(FLAGS['config'].config_filename)
  try:
    result = trainer.train_and_evaluate(FLAGS.config, workdir)
  except (trainer.NonFiniteError, ValueError) as e:
    print(f'ERROR: {e}', file=sys.stderr, flush=True)
    sys.exit(2)
  if result['status'] == 'preempted':
    sys.exit(0)


if __name__ == '__main__':
  app.run(main)
