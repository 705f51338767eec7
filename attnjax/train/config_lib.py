"""Shared pieces of the experiment configs in ``configs/``: argument parsing, the base
config with a comment on every field, model sizes and per-variant default options."""

from __future__ import annotations

import ml_collections

SIZES = {  # name: (d_model, num_layers, num_heads, mlp_dim)
    'T': (32, 1, 2, 64),
    'S': (64, 2, 4, 128),
    'M': (128, 4, 4, 512),
    'B': (256, 6, 8, 1024),
}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """``'size=S,variant=swin,runlocal'`` -> ConfigDict; bare words become True.

  Values are parsed as int / float / bool when they look like one. Keys must be among
  ``defaults`` (a typo is an error naming the key).
  """
  out = dict(defaults)
  for part in (arg or '').split(','):
    part = part.strip()
    if not part:
      continue
    key, _, value = part.partition('=')
    key = key.strip()
    if key not in defaults:
      raise ValueError(f'unknown config argument {key!r}; expected one of {sorted(defaults)}.')
    if not _:
      out[key] = True
      continue
    out[key] = _parse_value(value.strip())
  return ml_collections.ConfigDict(out)


def _parse_value(value: str):
  low = value.lower()
  if low in ('true', 'false'):
    return low == 'true'
  for cast in (int, float):
    try:
      return cast(value)
    except ValueError:
      pass
  return value


def variant_options(name: str, *, seq_len: int = 64, grid: tuple[int, int] | None = None) -> dict:
  """Reasonable default options for each registered attention variant."""
  table = {
      'sliding_window': dict(window=max(seq_len // 4, 1)),
      'chunked': dict(chunk_size=max(seq_len // 4, 1)),
      'prefix_lm': dict(prefix_len=max(seq_len // 2, 1)),
      'neighborhood': dict(kernel=3),
      'swin': dict(window=2, shift=1),
      'grid': dict(grid=2),
      'sinks': dict(window=max(seq_len // 4, 1)),
      'softcap': dict(cap=50.0),
      'relpos': dict(max_distance=32),
      'moba': dict(block_size=max(seq_len // 4, 1), top_k=2),
      'biformer': dict(num_regions=2, top_k=2),
      'dynamic_mask': dict(keep_window=max(seq_len // 4, 1)),
      'sparsifiner': dict(keep_rate=0.5),
      'agent': dict(num_agents=4, max_len=max(seq_len, 1)),
      'perceiver': dict(num_latents=8, num_latent_layers=1),
      'lookupvit': dict(num_compressed=min(4, max(seq_len, 1))),
      'registers': dict(num_registers=4),
      'isab': dict(num_inducing=8),
      'proxy': dict(window=2 if seq_len % 4 else 4),
      'super_token': dict(stoken_size=2, num_iters=1),
      'moh': dict(top_k=1, load_balance_weight=0.01),
      'head_gates': dict(),
      'shvit': dict(),
      'mw_mha': dict(windows=(max(seq_len // 8, 1), None)),
      'talking_heads': dict(),
      'cosine': dict(),
      'sinkhorn': dict(),
      'additive': dict(activation='tanh'),
      'collapsed_qk': dict(),
      'log_n_scaling': dict(train_len=max(seq_len, 2)),
      'gla': dict(chunk_size=16),
      'deltanet': dict(chunk_size=16, conv_size=4),
      'gated_deltanet': dict(chunk_size=16, conv_size=4),
      'mamba2': dict(chunk_size=16, conv_size=4),
      'l2vit': dict(lcm_size=3),
      'care': dict(global_ratio=0.25, conv_size=3),
      'hiif': dict(),
      'feat': dict(channel_temperature=1.0),
  }
  return dict(table.get(name, {}))


def model_config(kind: str, size: str | None = 'S', *, variant: str = 'mha', seq_len: int = 64,
                 grid: tuple[int, int] | None = None, **overrides) -> ml_collections.ConfigDict:
  """A model config for ``attnjax.models.build_model`` (models_api.md).

  Starts from ``attnjax.models.default_config(kind)`` (every field documented there), sets
  the width/depth/heads of ``SIZES[size]`` (None keeps the defaults), the attention variant
  with its default options, then ``overrides``.
  """
  from attnjax import models  # pylint: disable=import-outside-toplevel
  m = models.default_config(kind)
  if size is not None:
    if size not in SIZES:
      raise ValueError(f'config argument size={size!r} must be one of {sorted(SIZES)}.')
    d, layers, heads, mlp = SIZES[size]
    m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = d, layers, heads, heads
    m.head_dim, m.mlp_dim = d // heads, mlp
  m.max_len = max(int(m.max_len), seq_len)
  m.attention = ml_collections.ConfigDict(dict(name=variant, **variant_options(
      variant, seq_len=seq_len, grid=grid)))
  for k, v in overrides.items():
    m[k] = v
  return m


def base_config() -> ml_collections.ConfigDict:
  """Fields every experiment has; experiment files fill in task, data and model."""
  c = ml_collections.ConfigDict()
  c.seed = 0                       # params / dropout / data-order seed
  c.task = 'lm'                    # 'lm' | 'classification' | 'token_classification' | 'regression'
  c.num_steps = 1000               # optimizer steps
  c.batch_size = 64                # global batch (all processes)
  c.eval_batch_size = 64           # global eval batch
  c.eval_max_examples = 1000       # cap on eval examples (None = whole split)
  c.log_every = 50                 # steps between train-metric lines (0 = only at the end)
  c.eval_every = 0                 # steps between evals (0 = only at the end)
  c.checkpoint_every = 500         # steps between checkpoints (0 = only at the end)
  c.tensorboard = True             # also write TensorBoard events to <workdir>/tb
  c.progress_bar = True            # tqdm bar on a TTY, log lines otherwise
  c.model_factory = 'attnjax.models:build_model'  # 'module:function'(model_cfg, *, rngs)

  c.data = ml_collections.ConfigDict()
  c.data.name = ''                 # built-in task (attnjax.data.BUILTIN_NAMES)
  c.data.tfds_name = ''            # external TFDS dataset (array_record, prepared) instead
  c.data.params = ml_collections.ConfigDict()  # task parameters (vocab_size, seq_len, ...)
  c.data.seed = 0                  # generation seed of built-in tasks
  c.data.num_train = 20000         # built-in train split size
  c.data.num_test = 1000           # built-in test split size
  c.data.data_dir = ''             # '' = $ATTNJAX_DATA_DIR or ~/.cache/attnjax/tfds
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.data.input_key = 'inputs'      # batch key fed to the model
  c.data.keys = ml_collections.ConfigDict()  # renames for external datasets {src: dst}

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, context=1))
  c.sharding = ml_collections.ConfigDict()
  c.sharding.param_rules = ()      # () = attnjax.parallel.DEFAULT_PARAM_RULES
  c.sharding.activation_rules = ()  # () = attnjax.parallel.DEFAULT_ACTIVATION_RULES
  c.parallel = ml_collections.ConfigDict()
  c.parallel.context_impl = 'ring'  # mesh.context > 1: 'ring' (zigzag, custom VJP) | 'allgather'

  c.optimizer = ml_collections.ConfigDict(dict(
      name='adamw', weight_decay=0.01, b1=0.9, b2=0.98, eps=1e-8, grad_clip=1.0))
  c.schedule = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=100, decay='cosine', end_value_ratio=0.1))
  c.checkpoint = ml_collections.ConfigDict(dict(keep=3, async_save=True))
  c.debug = ml_collections.ConfigDict(dict(  # test hooks
      inject_nan_at_step=-1,       # multiply the loss by NaN at this step (-1 = off)
      sleep_per_step=0.0))         # seconds of host sleep after each step (fault tests)
  return c


def apply_runlocal(c: ml_collections.ConfigDict, *, eval_batch_size: int = 32,
                   small_data: bool = True) -> ml_collections.ConfigDict:
  """The ``runlocal`` smoke-test settings shared by the experiment files: 20 steps of
  batch 16, frequent logs and checkpoints, a short warm-up, ``2 * eval_batch_size`` eval
  examples and (``small_data``) 512/128 built-in examples.  Returns ``c`` (edited)."""
  if small_data:
    c.data.num_train, c.data.num_test = 512, 128
  c.num_steps, c.batch_size, c.eval_batch_size = 20, 16, eval_batch_size
  c.log_every, c.checkpoint_every, c.eval_max_examples = 5, 10, 2 * eval_batch_size
  c.schedule.warmup_steps = 2
  return c
