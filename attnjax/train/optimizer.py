"""Optimizer and learning-rate schedule from ``config.optimizer`` / ``config.schedule``."""

from __future__ import annotations

import optax

SCHEDULES = ('constant', 'cosine', 'linear', 'rsqrt')
OPTIMIZERS = ('adamw', 'adam', 'sgd', 'lion')


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup for ``warmup_steps`` then ``decay`` to ``end_value_ratio * lr``."""
  lr = float(cfg.learning_rate)
  warmup = int(cfg.get('warmup_steps', 0))
  kind = cfg.get('decay', 'cosine')
  if kind not in SCHEDULES:
    raise ValueError(f'config.schedule.decay must be one of {SCHEDULES}; got {kind!r}.')
  if lr <= 0:
    raise ValueError(f'config.schedule.learning_rate must be > 0; got {lr}.')
  if warmup < 0 or warmup > total_steps:
    raise ValueError(f'config.schedule.warmup_steps must be in [0, config.num_steps='
                     f'{total_steps}]; got {warmup}.')
  end = lr * float(cfg.get('end_value_ratio', 0.0))
  rest = max(total_steps - warmup, 1)
  if kind == 'constant':
    after = optax.constant_schedule(lr)
  elif kind == 'cosine':
    after = optax.cosine_decay_schedule(lr, rest, alpha=end / lr)
  elif kind == 'linear':
    after = optax.linear_schedule(lr, end, rest)
  else:
    after = lambda step: lr * (max(warmup, 1) ** 0.5) / (step + max(warmup, 1)) ** 0.5
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
  """``config.optimizer``: name, weight_decay, b1, b2, eps, grad_clip (global norm, 0=off)."""
  name = cfg.get('name', 'adamw')
  if name not in OPTIMIZERS:
    raise ValueError(f'config.optimizer.name must be one of {OPTIMIZERS}; got {name!r}.')
  wd = float(cfg.get('weight_decay', 0.0))
  if name == 'adamw':
    opt = optax.adamw(schedule, b1=cfg.get('b1', 0.9), b2=cfg.get('b2', 0.98),
                      eps=cfg.get('eps', 1e-8), weight_decay=wd)
  elif name == 'adam':
    opt = optax.adam(schedule, b1=cfg.get('b1', 0.9), b2=cfg.get('b2', 0.98),
                     eps=cfg.get('eps', 1e-8))
  elif name == 'lion':
    opt = optax.lion(schedule, weight_decay=wd)
  else:
    opt = optax.sgd(schedule, momentum=cfg.get('momentum', 0.9))
  clip = float(cfg.get('grad_clip', 0.0))
  if clip < 0:
    raise ValueError(f'config.optimizer.grad_clip must be >= 0; got {clip}.')
  return optax.chain(optax.clip_by_global_norm(clip), opt) if clip > 0 else opt
