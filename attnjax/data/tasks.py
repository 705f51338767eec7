"""Synthetic tasks as pure numpy generators (deterministic given a seed).

Every generator has the form ``generate_<task>(num_examples, seed, **params)`` and
returns a dict of numpy arrays with a leading example axis. The TFDS builders in
``attnjax.data.builders`` write them to array_record files; tests call them directly.

Token tasks (MQAR, selective copy) use the *aligned* LM format: ``inputs [T]``,
``targets [T]``, ``weights [T]`` — position t is trained to output ``targets[t]`` where
``weights[t] > 0``; with a causal model, position t sees ``inputs[:t+1]`` only.
"""

from __future__ import annotations

import numpy as np


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f'{name} must be an int >= {minimum}; got {value!r}.')
  return int(value)


def generate_mqar(num_examples: int, seed: int, *, vocab_size: int = 64, num_pairs: int = 8,
                  seq_len: int = 64) -> dict[str, np.ndarray]:
  """Multi-query associative recall ("Zoology: Measuring and Improving Recall in Efficient
  Language Models", Arora et al., 2023).

  A sequence starts with ``num_pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (keys drawn
  without replacement from the first half of the vocabulary, values from the second half),
  followed by ``(seq_len - 2 * num_pairs) // 2`` queries ``k v`` where each ``k`` is one of
  the keys seen before. At a query key the model must output the value bound to it:
  ``targets[t] = v`` and ``weights[t] = 1`` exactly at query-key positions; accuracy is
  measured there. Chance level is ``1 / (vocab_size // 2)``.
  """
  n = _check_int('num_examples', num_examples, 1)
  vocab_size = _check_int('vocab_size', vocab_size, 4)
  num_pairs = _check_int('num_pairs', num_pairs, 1)
  seq_len = _check_int('seq_len', seq_len, 4)
  half = vocab_size // 2
  if num_pairs > half:
    raise ValueError(f'num_pairs={num_pairs} must be <= vocab_size // 2 = {half} '
                     '(keys are distinct tokens of the first vocabulary half).')
  num_queries = (seq_len - 2 * num_pairs) // 2
  if num_queries < 1:
    raise ValueError(f'seq_len={seq_len} must be >= 2 * num_pairs + 2 = {2 * num_pairs + 2}.')
  rng = np.random.default_rng(seed)
  keys = np.argsort(rng.random((n, half)), axis=1)[:, :num_pairs]           # distinct keys
  values = rng.integers(half, vocab_size, size=(n, num_pairs))
  which = rng.integers(0, num_pairs, size=(n, num_queries))
  q_keys = np.take_along_axis(keys, which, axis=1)
  q_vals = np.take_along_axis(values, which, axis=1)
  ctx = np.stack([keys, values], axis=2).reshape(n, 2 * num_pairs)
  qry = np.stack([q_keys, q_vals], axis=2).reshape(n, 2 * num_queries)
  tokens = np.concatenate([ctx, qry], axis=1)
  pad = seq_len - tokens.shape[1]
  tokens = np.pad(tokens, ((0, 0), (0, pad)))
  targets = np.zeros_like(tokens)
  weights = np.zeros(tokens.shape, np.float32)
  qpos = 2 * num_pairs + 2 * np.arange(num_queries)
  targets[:, qpos] = q_vals
  weights[:, qpos] = 1.0
  return {'inputs': tokens.astype(np.int32), 'targets': targets.astype(np.int32),
          'weights': weights}


def generate_selective_copy(num_examples: int, seed: int, *, vocab_size: int = 16,
                            seq_len: int = 64, num_tokens: int = 8) -> dict[str, np.ndarray]:
  """Selective copying ("Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
  Gu & Dao, 2023).

  Token 0 is blank, 1 is the copy marker, 2.. are data. ``num_tokens`` data tokens sit
  at random (sorted) positions of the first ``seq_len - num_tokens`` positions, the rest
  blank; the last ``num_tokens`` positions hold markers, and marker i must output the
  i-th data token in order (``weights`` = 1 there).
  """
  n = _check_int('num_examples', num_examples, 1)
  vocab_size = _check_int('vocab_size', vocab_size, 3)
  m = _check_int('num_tokens', num_tokens, 1)
  seq_len = _check_int('seq_len', seq_len, 2 * m)
  body = seq_len - m
  rng = np.random.default_rng(seed)
  pos = np.sort(np.argsort(rng.random((n, body)), axis=1)[:, :m], axis=1)
  data = rng.integers(2, vocab_size, size=(n, m))
  tokens = np.zeros((n, seq_len), np.int32)
  np.put_along_axis(tokens, pos, data, axis=1)
  tokens[:, body:] = 1
  targets = np.zeros_like(tokens)
  targets[:, body:] = data
  weights = np.zeros(tokens.shape, np.float32)
  weights[:, body:] = 1.0
  return {'inputs': tokens, 'targets': targets.astype(np.int32), 'weights': weights}


def generate_argmax_probe(num_examples: int, seed: int, *, vocab_size: int = 64,
                          seq_len: int = 16) -> dict[str, np.ndarray]:
  """Position probe for bidirectional encoders: ``seq_len`` distinct tokens; the label is
  the position of the largest one (``num_classes = seq_len``, chance ``1/seq_len``)."""
  n = _check_int('num_examples', num_examples, 1)
  seq_len = _check_int('seq_len', seq_len, 2)
  vocab_size = _check_int('vocab_size', vocab_size, seq_len)
  rng = np.random.default_rng(seed)
  tokens = np.argsort(rng.random((n, vocab_size)), axis=1)[:, :seq_len]
  return {'inputs': tokens.astype(np.int32), 'label': np.argmax(tokens, axis=1).astype(np.int32)}


def generate_set_max(num_examples: int, seed: int, *, set_size: int = 16) -> dict[str, np.ndarray]:
  """Max regression ("Set Transformer", Lee et al., 2019): x ~ U(0, 1)^[n, 1], y = max x."""
  n = _check_int('num_examples', num_examples, 1)
  s = _check_int('set_size', set_size, 1)
  x = np.random.default_rng(seed).random((n, s, 1)).astype(np.float32)
  return {'inputs': x, 'target': x.max(axis=(1, 2))[:, None].astype(np.float32)}


def generate_set_count(num_examples: int, seed: int, *, set_size: int = 16,
                       num_prototypes: int = 10, dim: int = 8) -> dict[str, np.ndarray]:
  """Unique counting ("Set Transformer", Lee et al., 2019): each element is one of
  ``num_prototypes`` fixed random vectors; the label is how many distinct prototypes occur
  (classes 0..num_prototypes; 0 never occurs)."""
  n = _check_int('num_examples', num_examples, 1)
  s = _check_int('set_size', set_size, 1)
  k = _check_int('num_prototypes', num_prototypes, 1)
  d = _check_int('dim', dim, 1)
  protos = np.random.default_rng(1234).normal(size=(k, d)).astype(np.float32)
  rng = np.random.default_rng(seed)
  distinct = rng.integers(1, min(k, s) + 1, size=n)
  ids = np.empty((n, s), np.int64)
  for i in range(n):
    chosen = rng.permutation(k)[:distinct[i]]
    ids[i] = np.concatenate([chosen, rng.choice(chosen, s - distinct[i])])
    rng.shuffle(ids[i])
  return {'inputs': protos[ids], 'label': distinct.astype(np.int32)}


def generate_set_mog(num_examples: int, seed: int, *, set_size: int = 32,
                     num_components: int = 2, dim: int = 2,
                     sigma: float = 0.3) -> dict[str, np.ndarray]:
  """Amortised clustering of a mixture of Gaussians ("Set Transformer", Lee et al., 2019):
  means ~ U(-2, 2)^d sorted by first coordinate; points drawn from the components with
  std ``sigma``; target = the sorted means flattened ``[num_components * dim]``."""
  n = _check_int('num_examples', num_examples, 1)
  s = _check_int('set_size', set_size, 1)
  c = _check_int('num_components', num_components, 1)
  d = _check_int('dim', dim, 1)
  rng = np.random.default_rng(seed)
  means = rng.uniform(-2, 2, size=(n, c, d))
  means = np.take_along_axis(means, np.argsort(means[:, :, :1], axis=1), axis=1)
  comp = rng.integers(0, c, size=(n, s))
  x = np.take_along_axis(means, comp[:, :, None], axis=1) + sigma * rng.normal(size=(n, s, d))
  return {'inputs': x.astype(np.float32), 'target': means.reshape(n, c * d).astype(np.float32)}


def generate_icl_regression(num_examples: int, seed: int, *, num_points: int = 16,
                            dim: int = 4, noise: float = 0.0) -> dict[str, np.ndarray]:
  """In-context linear regression ("What Can Transformers Learn In-Context? A Case Study of
  Simple Function Classes", Garg et al., 2022).

  w ~ N(0, I_d), x_i ~ N(0, I_d), y_i = w.x_i / sqrt(d) + noise. The input set holds rows
  ``[x_i, y_i, 0]`` for the ``num_points - 1`` examples and ``[x_q, 0, 1]`` for the query
  (the flag marks it, so a permutation-invariant set model can find it); target ``y_q``.
  """
  n = _check_int('num_examples', num_examples, 1)
  m = _check_int('num_points', num_points, 2)
  d = _check_int('dim', dim, 1)
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(n, d))
  x = rng.normal(size=(n, m, d))
  y = np.einsum('nmd,nd->nm', x, w) / np.sqrt(d) + noise * rng.normal(size=(n, m))
  flag = np.zeros((n, m, 1))
  flag[:, -1] = 1.0
  y_in = y.copy()
  y_in[:, -1] = 0.0
  inputs = np.concatenate([x, y_in[..., None], flag], axis=-1).astype(np.float32)
  return {'inputs': inputs, 'target': y[:, -1:].astype(np.float32)}


DIGITS_TEST_SIZE = 360  # of 1797 images; stratified by class, random_state=0


def load_digits_split(split: str) -> dict[str, np.ndarray]:
  """scikit-learn's bundled 8x8 digits (UCI "Optical Recognition of Handwritten Digits").

  The split is ours and fixed: ``sklearn.model_selection.train_test_split(test_size=360,
  stratify=labels, random_state=0)`` over the 1797 images -> 1437 train / 360 test, 35-37
  test images per class (class proportions kept). Images are float32 ``[8, 8, 1]`` in
  [0, 1] (pixel / 16).
  """
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  from sklearn.model_selection import train_test_split  # pylint: disable=import-outside-toplevel
  if split not in ('train', 'test'):
    raise ValueError(f"digits split must be 'train' or 'test'; got {split!r}.")
  d = load_digits()
  idx = np.arange(len(d.target))
  tr, te = train_test_split(idx, test_size=DIGITS_TEST_SIZE, stratify=d.target, random_state=0)
  sel = np.sort(tr if split == 'train' else te)
  images = (d.images[sel] / 16.0).astype(np.float32)[..., None]
  return {'image': images, 'label': d.target[sel].astype(np.int32)}
