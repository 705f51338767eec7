r"""ViT on scikit-learn's 8x8 digits (real images; 1437 train / 360 test, fixed split).

2x2 patches -> a 4x4 token grid. Spatial variants (neighborhood, swin, grid, axial,
criss_cross) act on that grid.

  python train.py --config configs/digits_vit.py
  python train.py --config configs/digits_vit.py:variant=neighborhood
  python train.py --config configs/digits_vit.py:peg      # + a PEG after the first block

`peg` (default False): a conditional positional encoding (CPVT's PEG, `x + DWConv3x3(x)`)
after the first block, on top of the model's learned position table.
"""

from attnjax.train import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, size='S', variant='mha', patch=2, steps=600, runlocal=False,
                            peg=False)
  c = config_lib.base_config()
  c.task = 'classification'
  c.data.name = 'digits'
  c.data.input_key = 'image'
  grid = 8 // a.patch
  c.model = config_lib.model_config('vit', a.size, variant=a.variant, seq_len=grid * grid,
                                    grid=(grid, grid), image_size=8, patch_size=a.patch,
                                    channels=1, num_classes=10)
  c.num_steps, c.batch_size, c.eval_batch_size = a.steps, 64, 120
  c.eval_max_examples = None
  c.log_every, c.checkpoint_every = 50, 200
  c.schedule.learning_rate = 2e-3
  if a.runlocal:
    c.model = config_lib.model_config('vit', 'T', variant=a.variant, seq_len=grid * grid,
                                      grid=(grid, grid), image_size=8, patch_size=a.patch,
                                      channels=1, num_classes=10)
    config_lib.apply_runlocal(c, eval_batch_size=40, small_data=False)
  if not isinstance(a.peg, bool):
    raise ValueError(f'config argument peg must be true or false, got {a.peg!r}.')
  c.model.peg = a.peg
  return c
