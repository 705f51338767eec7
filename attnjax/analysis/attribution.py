"""Attention rollout and attention flow.

Paper: "Quantifying Attention Flow in Transformers" (Abnar & Zuidema, 2020).  Both take
the per-layer maps of a stack of self-attention layers (``[B, N, T, T]`` each, in layer
order, e.g. the values of :func:`attnjax.analysis.capture`), fuse the heads (mean by
default) and add the residual connection: ``A_l = 0.5 * mean_n P_l + 0.5 * I``, rows
renormalised to sum to 1 (a row of zeros keeps only the identity).

- Rollout: ``R = A_L A_{L-1} ... A_1``, ``R[t, s]`` the attention of output token ``t``
  to input token ``s``.
- Flow: the layers form a graph with nodes ``(l, t)`` (``l = 0 .. L``) and an edge
  ``(l - 1, s) -> (l, t)`` of capacity ``A_l[t, s]``; ``F[t, s]`` is the maximum flow from
  input node ``(0, s)`` to output node ``(L, t)``, computed with breadth-first augmenting
  paths (Edmonds-Karp) in NumPy: ``O(T^2)`` max-flow problems on ``(L + 1) T`` nodes, so
  for short sequences only.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import numpy as np

__all__ = ["residual_attention", "rollout", "attention_flow", "max_flow"]

_FUSIONS = ("mean", "max", "min")


def residual_attention(probs, *, head_fusion: str = "mean", residual: bool = True) -> np.ndarray:
  """``[B, T, T]``: heads fused, ``0.5 P + 0.5 I`` with ``residual``, rows renormalised."""
  p = np.asarray(probs, dtype=np.float64)
  if p.ndim == 3:
    p = p[:, None]
  if p.ndim != 4 or p.shape[-1] != p.shape[-2]:
    raise ValueError(f"probs must be self-attention maps [B, N, T, T] (or [B, T, T]), got "
                     f"shape {p.shape}")
  if head_fusion not in _FUSIONS:
    raise ValueError(f"head_fusion must be one of {_FUSIONS}, got {head_fusion!r}")
  a = getattr(p, head_fusion)(axis=1)
  if residual:
    a = 0.5 * a + 0.5 * np.eye(a.shape[-1])
  s = a.sum(-1, keepdims=True)
  return a / np.where(s > 0, s, 1.0)


def _layers(maps) -> list:
  if isinstance(maps, dict):
    maps = list(maps.values())
  maps = list(maps)
  if not maps:
    raise ValueError("maps must hold at least one layer's attention")
  return maps


def rollout(maps, *, head_fusion: str = "mean", residual: bool = True) -> np.ndarray:
  """Attention rollout ``[B, T, T]`` of ``maps`` (a dict or sequence of ``[B, N, T, T]``
  in layer order)."""
  out = None
  for p in _layers(maps):
    a = residual_attention(p, head_fusion=head_fusion, residual=residual)
    if out is not None and out.shape != a.shape:
      raise ValueError(f"every layer must have the same [B, T, T], got {out.shape} and "
                       f"{a.shape}")
    out = a if out is None else a @ out
  return out


def max_flow(capacity, source: int, sink: int) -> float:
  """Maximum flow value from ``source`` to ``sink`` on a dense capacity matrix
  ``[V, V]`` (``capacity[u, v]`` of the edge ``u -> v``), by BFS augmenting paths."""
  c = np.array(capacity, dtype=np.float64)
  if c.ndim != 2 or c.shape[0] != c.shape[1]:
    raise ValueError(f"capacity must be square [V, V], got shape {c.shape}")
  if (c < 0).any():
    raise ValueError("capacity must be non-negative")
  n = c.shape[0]
  total = 0.0
  while True:
    parent = np.full(n, -1)
    parent[source] = source
    queue = deque([source])
    while queue and parent[sink] < 0:
      u = queue.popleft()
      for v in np.nonzero((c[u] > 1e-12) & (parent < 0))[0]:
        parent[v] = u
        queue.append(v)
    if parent[sink] < 0:
      return total
    path, v = [], sink
    while v != source:
      path.append((parent[v], v))
      v = parent[v]
    f = min(c[u, v] for u, v in path)
    for u, v in path:
      c[u, v] -= f
      c[v, u] += f
    total += f


def attention_flow(maps, *, head_fusion: str = "mean", residual: bool = True,
                   example: int = 0, outputs: Sequence[int] | None = None) -> np.ndarray:
  """Attention flow ``F [T_out, T]`` of batch element ``example`` (``outputs``: the output
  tokens to compute, default all): ``F[i, s]`` = max flow from input token ``s`` to
  output token ``outputs[i]`` through the layer graph (module docstring)."""
  layers = [residual_attention(p, head_fusion=head_fusion, residual=residual)[example]
            for p in _layers(maps)]
  L, T = len(layers), layers[0].shape[-1]
  if any(a.shape != (T, T) for a in layers):
    raise ValueError("every layer must have the same number of tokens T")
  cap = np.zeros(((L + 1) * T, (L + 1) * T))
  for l, a in enumerate(layers, start=1):
    # edge (l-1, s) -> (l, t) with capacity a[t, s]
    cap[(l - 1) * T:l * T, l * T:(l + 1) * T] = a.T
  outs = list(range(T)) if outputs is None else [int(o) for o in outputs]
  flow = np.zeros((len(outs), T))
  for i, t in enumerate(outs):
    for s in range(T):
      flow[i, s] = max_flow(cap, s, L * T + t)
  return flow
