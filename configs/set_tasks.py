r"""Set Transformer tasks: max regression, unique counting, mixture-of-Gaussians means,
in-context linear regression.

  python train.py --config configs/set_tasks.py                  # task=max
  python train.py --config configs/set_tasks.py:task=count
  python train.py --config configs/set_tasks.py:task=icl,variant=softcap
"""

from attnjax.train import config_lib

SET_TASKS = {  # arg: (dataset, loss task, input dim, outputs)
    'max': ('set_max', 'regression', 1, 1),
    'count': ('set_count', 'classification', 8, 11),
    'mog': ('set_mog', 'regression', 2, 4),
    'icl': ('icl_regression', 'regression', 6, 1),
}


def get_config(arg=None):
  a = config_lib.parse_arg(arg, size='S', variant='mha', task='max', steps=600, runlocal=False)
  if a.task not in SET_TASKS:
    raise ValueError(f'config argument task={a.task!r} must be one of {sorted(SET_TASKS)}.')
  name, loss, dim, outputs = SET_TASKS[a.task]
  c = config_lib.base_config()
  c.task = loss
  c.data.name = name
  c.data.num_train, c.data.num_test = 10000, 1000
  size = 'T' if a.runlocal else a.size
  c.model = config_lib.model_config('set', size, variant=a.variant, seq_len=64,
                                    input_dim=dim, num_classes=outputs)
  c.num_steps, c.batch_size, c.eval_batch_size = a.steps, 64, 100
  c.log_every, c.checkpoint_every = 50, 200
  c.schedule.learning_rate = 1e-3
  if a.runlocal:
    config_lib.apply_runlocal(c)
  return c
