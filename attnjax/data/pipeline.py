"""grain input pipelines: per-process shard -> shuffle (new order every epoch) -> batch.

Each process reads only the records ``process_index::process_count`` of a source and
yields batches of ``global_batch_size // process_count`` examples; the trainer assembles
the global batch with ``jax.make_array_from_process_local_data``. Iterators are grain
``DatasetIterator``s whose ``get_state()`` is a small JSON-able dict, saved in every
checkpoint and restored with ``set_state`` on resume, so a resumed run sees exactly the
batches an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np


def local_batch_size(global_batch_size: int, process_count: int | None = None) -> int:
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f'config.batch_size={global_batch_size} must be divisible by the number of '
                     f'processes ({process_count}).')
  return global_batch_size // process_count


def make_train_dataset(source, *, global_batch_size: int, seed: int,
                       process_index: int | None = None,
                       process_count: int | None = None) -> grain.MapDataset:
  """Infinite, shuffled (reshuffled per epoch), batched MapDataset of this process's shard.

  Batches are dicts of numpy arrays with leading dim ``global_batch_size // process_count``.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  local = local_batch_size(global_batch_size, process_count)
  ds = grain.MapDataset.source(source)
  if process_count > 1:
    ds = ds[process_index::process_count]
  if len(ds) < local:
    raise ValueError(f'the training split has {len(ds)} examples per process, fewer than the '
                     f'per-process batch size {local} (config.batch_size={global_batch_size}).')
  return ds.shuffle(seed=seed).repeat(None).batch(local, drop_remainder=True).map(_to_numpy)


def make_eval_batches(source, *, global_batch_size: int, process_index: int | None = None,
                      process_count: int | None = None,
                      max_examples: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass over this process's shard in order, in fixed-size batches.

  The last batch is padded by repeating its first example; the key ``'_valid'`` (float32,
  1 for real examples, 0 for padding) tells metrics what to count. Every process yields the
  same number of batches (processes with fewer records get all-padding batches), as
  collective evaluation requires.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  local = local_batch_size(global_batch_size, process_count)
  total = len(source) if max_examples is None else min(len(source), int(max_examples))
  per_process = -(-total // process_count)
  num_batches = -(-per_process // local)
  mine = list(range(process_index, total, process_count))
  for bi in range(num_batches):
    idx = mine[bi * local:(bi + 1) * local]
    valid = np.zeros((local,), np.float32)
    valid[:len(idx)] = 1.0
    fill = idx[0] if idx else 0
    records = [source[i] for i in idx] + [source[fill]] * (local - len(idx))
    batch = _to_numpy(_stack(records))
    batch['_valid'] = valid
    yield batch


def _stack(records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  return {k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]}


def _to_numpy(batch: Any) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in batch.items()}
