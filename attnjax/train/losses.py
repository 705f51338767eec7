"""Losses and metrics per task type, as weighted sums (exact under any batch sharding).

Every function returns ``(loss, sums)`` where ``loss`` is the mean the optimizer sees and
``sums`` maps metric names to ``(numerator, denominator)`` float32 scalars, so metrics
aggregate exactly across steps, eval batches and padding (``batch['_valid']``).

  lm                    logits [B,T,V] vs targets [B,T], weights [B,T] (aligned format)
  classification        logits [B,C]   vs label [B]
  token_classification  logits [B,T,C] vs targets [B,T], weights [B,T]
  regression            outputs [B,D]  vs target [B,D] (mean squared error)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

TASKS = ('lm', 'classification', 'token_classification', 'regression')


def _valid(batch, b):
  v = batch.get('_valid')
  return jnp.ones((b,), jnp.float32) if v is None else v.astype(jnp.float32)


def compute(task: str, outputs: jax.Array, batch: dict) -> tuple[jax.Array, dict]:
  """Loss and metric sums for ``task`` (one of ``TASKS``)."""
  b = outputs.shape[0]
  valid = _valid(batch, b)
  if task in ('lm', 'token_classification'):
    targets = batch['targets']
    w = batch.get('weights')
    w = jnp.ones(targets.shape, jnp.float32) if w is None else w.astype(jnp.float32)
    w = w * valid[:, None]
    ce = optax.softmax_cross_entropy_with_integer_labels(outputs.astype(jnp.float32), targets)
    correct = (jnp.argmax(outputs, -1) == targets).astype(jnp.float32)
    den = jnp.sum(w)
    sums = {'loss': (jnp.sum(ce * w), den), 'accuracy': (jnp.sum(correct * w), den)}
  elif task == 'classification':
    label = batch['label']
    ce = optax.softmax_cross_entropy_with_integer_labels(outputs.astype(jnp.float32), label)
    correct = (jnp.argmax(outputs, -1) == label).astype(jnp.float32)
    den = jnp.sum(valid)
    sums = {'loss': (jnp.sum(ce * valid), den), 'accuracy': (jnp.sum(correct * valid), den)}
  elif task == 'regression':
    target = batch['target'].astype(jnp.float32)
    if target.shape != outputs.shape:
      raise ValueError(f'regression: model outputs {outputs.shape} but target is {target.shape}; '
                       'set config.model.num_classes to the target width.')
    se = jnp.mean(jnp.square(outputs.astype(jnp.float32) - target), axis=-1)
    den = jnp.sum(valid)
    sums = {'loss': (jnp.sum(se * valid), den), 'mse': (jnp.sum(se * valid), den)}
  else:
    raise ValueError(f'config.task must be one of {TASKS}; got {task!r}.')
  num, den = sums['loss']
  return num / jnp.maximum(den, 1.0), sums


def finalize(sums: dict) -> dict[str, float]:
  """``{name: numerator / denominator}`` on host floats."""
  out = {}
  for k, (n, d) in sums.items():
    n, d = float(n), float(d)
    out[k] = n / d if d > 0 else float('nan')
  return out


def accumulate(acc: dict | None, sums: dict) -> dict:
  if acc is None:
    return {k: (float(n), float(d)) for k, (n, d) in sums.items()}
  return {k: (acc[k][0] + float(n), acc[k][1] + float(d)) for k, (n, d) in sums.items()}
