r"""Small CNN with a channel / spatial attention module on scikit-learn's 8x8 digits.

Real images (1437 train / 360 test, fixed split). The CNN (`attnjax.models.cnn`): 3x3 conv
stem, residual conv blocks each ending in the chosen module, 2x2 pooling between stages,
global average pooling, linear classifier. Modules: `attnjax.layers.channel.names()`.

  python train.py --config configs/digits_cnn.py                     # module=se
  python train.py --config configs/digits_cnn.py:module=cbam
  python train.py --config configs/digits_cnn.py:module=lka,runlocal=True
"""

from attnjax.train import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, module='se', steps=600, runlocal=False)
  from attnjax.models import cnn  # pylint: disable=import-outside-toplevel
  c = config_lib.base_config()
  c.task = 'classification'
  c.data.name = 'digits'
  c.data.input_key = 'image'
  c.model = cnn.default_config()
  c.model.image_size, c.model.channels, c.model.num_classes = 8, 1, 10
  c.model.widths, c.model.depths = (32, 64), (1, 1)
  c.model.module = cnn.module_config(a.module)
  c.num_steps, c.batch_size, c.eval_batch_size = a.steps, 64, 120
  c.eval_max_examples = None
  c.log_every, c.checkpoint_every = 50, 200
  c.schedule.learning_rate = 2e-3
  if a.runlocal:
    c.model.widths = (8, 16)
    config_lib.apply_runlocal(c, eval_batch_size=40, small_data=False)
  return c
