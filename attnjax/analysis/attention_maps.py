"""Capture of attention maps from any attnjax model, and their plots.

``capture_attention()`` wraps ``attnjax.dispatch.attention`` for the duration of a
``with`` block. Every call records its attention probabilities ``P [B, N, T, S]``,
obtained by running the *same* call (same mask, score_mod, bias, segment ids, softcap,
sinks, scale) on one-hot values ``v[b, s, k, :] = e_s`` with the reference
implementation, so ``out[b, t, n, :] = P[b, n, t, :]`` exactly: the map is the one the
model used, whatever the variant. Run the model eagerly (not under ``jax.jit``) inside
the block; intended for a few examples (it costs an extra ``S``-wide attention call).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@contextlib.contextmanager
def capture_attention():
  """Yields a list that receives one ``np.ndarray [B, N, T, S]`` per attention call."""
  from attnjax import dispatch  # pylint: disable=import-outside-toplevel
  original = dispatch.attention
  records: list[np.ndarray] = []

  def wrapped(q, k, v, **kwargs):
    out = original(q, k, v, **kwargs)
    if q.ndim == 4 and k.ndim == 4 and not isinstance(q, jax.core.Tracer):
      s = k.shape[1]
      onehot = jnp.broadcast_to(jnp.eye(s, dtype=jnp.float32)[None, :, None, :],
                                (k.shape[0], s, k.shape[2], s))
      kw = dict(kwargs)
      kw.pop('block_sizes', None)
      kw['return_lse'] = False
      kw['implementation'] = 'reference'
      probs_BTNS = original(q.astype(jnp.float32), k.astype(jnp.float32), onehot, **kw)
      records.append(np.asarray(jnp.transpose(probs_BTNS, (0, 2, 1, 3))))
    return out

  dispatch.attention = wrapped
  try:
    yield records
  finally:
    dispatch.attention = original


def plot_attention_maps(maps: Sequence[np.ndarray], path: str, *, example: int = 0,
                        max_heads: int = 8, title: str = '') -> str:
  """One row per captured layer, one column per head (up to ``max_heads``); PNG at ``path``."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  if not maps:
    raise ValueError('plot_attention_maps: no attention maps were captured.')
  heads = min(max(m.shape[1] for m in maps), max_heads)
  fig, axes = plt.subplots(len(maps), heads, figsize=(1.9 * heads, 1.9 * len(maps)),
                           squeeze=False)
  for li, m in enumerate(maps):
    for h in range(heads):
      ax = axes[li, h]
      ax.set_xticks([])
      ax.set_yticks([])
      if h < m.shape[1]:
        ax.imshow(m[example, h], cmap='viridis', vmin=0.0, interpolation='nearest')
      if li == 0:
        ax.set_title(f'head {h}', fontsize=8)
      if h == 0:
        ax.set_ylabel(f'layer {li}', fontsize=8)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
