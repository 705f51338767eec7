r"""Train any attnjax model from an ml_collections config.

  python train.py                                   # configs/mqar.py -> ./workdir/mqar
  python train.py --config configs/digits_vit.py:variant=swin --workdir /tmp/vit
  python train.py --config configs/mqar.py --config.model.attention.name=sliding_window

Run the same command again to resume from the workdir's newest checkpoint. Ctrl-C (SIGINT)
during start-up exits at once (status 130); during training it saves a checkpoint after
the current step and exits with 130 (a second Ctrl-C exits at once without saving).
SIGTERM saves the same way and exits with 0. Config mistakes: one ``ERROR:`` line, status 2.

Dry run (compile the configured mesh's train step on fake CPU devices, allocate nothing,
print per-device memory and the collectives; see docs/training.md):

  python train.py --config configs/lm_pod.py:dry --dry_run     # 64 fake devices
  python train.py --config configs/mqar.py --dry_run --dry_run_devices=8

Multi-host: launch one process per host (TPU pod slice: the same command on every worker
via `gcloud compute tpus tpu-vm ssh --worker=all`; GPU nodes: srun / torchrun-style
launchers) and pass --coordinator_address/--num_processes/--process_id, or let
jax.distributed.initialize() discover them (TPU, SLURM). See docs/training.md.
"""

import os
import signal
import sys


def _interrupted_while_importing(signum, _frame):
  # until main() installs attnjax.train.cli.Interrupts: nothing exists yet, exit at once
  os.write(2, b'\nInterrupted during start-up: exiting; nothing was saved.\n')
  os._exit(128 + signum)  # pylint: disable=protected-access


for _sig in (signal.SIGINT, signal.SIGTERM):
  signal.signal(_sig, _interrupted_while_importing)

# Deliberately after the handler above: a Ctrl-C during these slow imports must be handled.
from absl import app, flags, logging  # noqa: E402

from attnjax.train import cli  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_CONFIG = os.path.join(_HERE, cli.DEFAULT_CONFIG)
cli.define_config_flag(_DEFAULT_CONFIG, 'Experiment config file (path[:args]).')
flags.DEFINE_string('workdir', None, 'Output dir (default ./workdir/<config file name>, the '
                    'same default as eval.py).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process).')
flags.DEFINE_integer('process_id', None, 'This process (multi-process).')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() with auto-detection.')
flags.DEFINE_bool('dry_run', False, 'Compile the train step for the configured mesh without '
                  'allocating anything, print per-device memory and collectives, and exit '
                  '(no workdir is created). Uses fake CPU devices when this machine has fewer.')
flags.DEFINE_integer('dry_run_devices', None, 'Mesh size of --dry_run (default: the product '
                     'of config.mesh; with a -1 axis, the devices here). If this process has '
                     'fewer, train.py re-runs itself with XLA_FLAGS='
                     '--xla_force_host_platform_device_count=N.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  interrupts = cli.Interrupts(hard_exit=True).install()
  if not FLAGS['verbosity'].present:  # library INFO/WARNING chatter off unless asked for
    logging.set_verbosity(logging.ERROR)
  if FLAGS.dry_run:
    _dry_run()
    return
  import jax  # pylint: disable=import-outside-toplevel
  if FLAGS.coordinator_address or FLAGS.num_processes:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  elif FLAGS.distributed:
    jax.distributed.initialize()
  from attnjax.train import trainer  # pylint: disable=import-outside-toplevel
  workdir = FLAGS.workdir or cli.default_workdir(FLAGS['config'].config_filename)
  try:
    result = trainer.train_and_evaluate(FLAGS.config, workdir, interrupts=interrupts)
  except (trainer.NonFiniteError, ValueError) as e:
    print(f'ERROR: {e}', file=sys.stderr, flush=True)
    sys.exit(2)
  finally:
    interrupts.uninstall()
  if result['status'] == 'interrupted':
    sys.exit(128 + signal.SIGINT)


def _dry_run():
  import jax  # pylint: disable=import-outside-toplevel

  from attnjax.train import dry_run  # pylint: disable=import-outside-toplevel
  if FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.distributed:
    print('dry run: runs in this one process; ignoring --coordinator_address/--num_processes/'
          '--distributed.', file=sys.stderr, flush=True)
  try:
    n = dry_run.required_devices(FLAGS.config, FLAGS.dry_run_devices)
    devices = dry_run.select_devices(n)
    # too few devices once the backends were initialised, or CPU devices beside an
    # accelerator: re-run with JAX_PLATFORMS=cpu XLA_FLAGS=...device_count=n
    if devices is None or devices[0].platform != jax.default_backend():
      dry_run.reexec_with_cpu_devices(n)
    result = dry_run.dry_run(FLAGS.config, devices=devices)
  except ValueError as e:
    print(f'ERROR: {e}', file=sys.stderr, flush=True)
    sys.exit(2)
  print(dry_run.format_report(result), flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(_DEFAULT_CONFIG))
