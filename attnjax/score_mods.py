"""Score modifiers: elementwise edits of the float32 attention logits.

A score_mod is a callable ``score_mod(score, b, h, q_idx, kv_idx) -> score`` that
broadcasts over its index arguments (FlexAttention's convention).  Arrays it
closes over (ALiBi slopes, relative-position tables) are differentiable in every
implementation of :func:`attnjax.attention`.

Order inside ``attention``: ``s = scale * q.k + bias``; ``s = score_mod(s, ...)``;
``s = softcap * tanh(s / softcap)``; then the mask.

    >>> mod = score_mods.compose(score_mods.alibi(score_mods.alibi_slopes(8)),
    ...                          score_mods.softcap(30.0))
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax.numpy as jnp
import numpy as np

__all__ = ["ScoreMod", "alibi", "alibi_slopes", "relative_position_bias",
           "grid_relative_position_bias", "temperature", "softcap", "compose"]


class ScoreMod:
  """A named, composable score modifier (callable like a plain function)."""

  def __init__(self, fn: Callable, name: str, check: Optional[Callable] = None):
    self._fn = fn
    self.name = name
    self._check = check

  def check(self, T: int, S: int, N: int) -> None:
    """Raises ``ValueError`` if this score_mod's arrays do not fit a call with query
    length ``T``, key length ``S`` and ``N`` query heads."""
    if self._check is not None:
      self._check(T, S, N)

  def __call__(self, score, b, h, q_idx, kv_idx):
    return self._fn(score, b, h, q_idx, kv_idx)

  def __repr__(self):
    return f"ScoreMod({self.name})"


def _check_array(name, a, ndim):
  if not hasattr(a, "ndim") or not hasattr(a, "dtype"):
    raise TypeError(f"{name} must be an array, got {type(a).__name__}")
  if a.ndim != ndim:
    raise ValueError(f"{name} must have rank {ndim}, got shape {a.shape}")
  if not jnp.issubdtype(a.dtype, jnp.floating):
    raise TypeError(f"{name} must be floating point, got {a.dtype}")


def alibi_slopes(num_heads: int) -> np.ndarray:
  """The ALiBi head slopes ``2^(-8 (h + 1) / n)`` (geometric; for non-power-of-two
  ``num_heads`` the interleaved extension of the paper).  float32 ``[num_heads]``."""
  if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
    raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
  def pow2(n):
    return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
  p = 2 ** int(np.floor(np.log2(num_heads)))
  slopes = pow2(p)
  if p < num_heads:
    slopes += pow2(2 * p)[0::2][: num_heads - p]
  return np.asarray(slopes, np.float32)


def alibi(slopes, *, symmetric: bool = False) -> ScoreMod:
  """ALiBi: ``s + m_h * (kv_idx - q_idx)`` (``-m_h * |q_idx - kv_idx|`` if symmetric).

  Paper: "Train Short, Test Long: Attention with Linear Biases Enables Input Length
  Extrapolation".

  Args:
    slopes: float ``[N]`` per-query-head slopes (learnable if you like); see
      :func:`alibi_slopes`.
  """
  _check_array("slopes", slopes, 1)
  def fn(score, b, h, q, kv):
    d = (kv - q).astype(jnp.float32)
    d = -jnp.abs(d) if symmetric else d
    return score + jnp.asarray(slopes, jnp.float32)[h] * d
  def check(T, S, N):
    if slopes.shape[0] != N:
      raise ValueError(f"alibi slopes have {slopes.shape[0]} entries; the call has N={N} heads")
  return ScoreMod(fn, "alibi", check)


def _check_rows(table, grid_tokens, T, S, N):
  if table.shape[0] != N:
    raise ValueError(f"relative_position_bias table has {table.shape[0]} rows; the call has "
                     f"N={N} heads")
  if grid_tokens is not None and (T != grid_tokens or S != grid_tokens):
    raise ValueError(f"relative_position_bias shape has {grid_tokens} tokens; the call needs "
                     f"T == S == {grid_tokens}, got T={T}, S={S}")


def relative_position_bias(table, *, shape: Optional[Sequence[int]] = None,
                           max_distance=None) -> ScoreMod:
  """Learned relative-position bias ``s + table[h, idx(q, kv)]`` on 1D or 2D/3D grids.

  1D (``shape=None``): ``table [N, 2 R + 1]``, ``idx = clip(kv - q, -R, R) + R``
  (T5/Shaw-style clipped distances; ``R = max_distance`` or ``(table.shape[1]-1)//2``).
  Grid (``shape=(Hh, Ww[, Dd])``, tokens row-major): per-axis distances clipped to
  ``R_a`` (default ``L_a - 1``), ``table [N, prod(2 R_a + 1)]`` indexed in row-major
  order of the per-axis offsets — the Swin/NAT ``(2M-1)^2`` table when ``R_a = M - 1``.

  Paper: "Self-Attention with Relative Position Representations"; Swin Transformer.
  """
  _check_array("table", table, 2)
  if shape is None:
    R = (table.shape[1] - 1) // 2 if max_distance is None else int(max_distance)
    if table.shape[1] != 2 * R + 1:
      raise ValueError(f"table must have 2*max_distance+1 = {2 * R + 1} columns, got "
                       f"{table.shape[1]}")
    def fn(score, b, h, q, kv):
      idx = jnp.clip(kv - q, -R, R) + R
      return score + jnp.asarray(table)[h, idx].astype(jnp.float32)
    return ScoreMod(fn, "relative_position_bias_1d", functools.partial(_check_rows, table, None))
  shape = tuple(int(s) for s in shape)
  if not 1 <= len(shape) <= 3:
    raise ValueError(f"shape must have 1 to 3 axes, got {shape}")
  if max_distance is None:
    Rs = tuple(L - 1 for L in shape)
  elif isinstance(max_distance, int):
    Rs = (max_distance,) * len(shape)
  else:
    Rs = tuple(int(r) for r in max_distance)
    if len(Rs) != len(shape):
      raise ValueError(f"max_distance must be an int or {len(shape)} ints, got {max_distance!r}")
  widths = [2 * r + 1 for r in Rs]
  if table.shape[1] != int(np.prod(widths)):
    raise ValueError(f"table must have prod(2*R+1) = {int(np.prod(widths))} columns for "
                     f"shape={shape}, max_distance={Rs}; got {table.shape[1]}")
  strides = [int(np.prod(shape[a + 1:])) for a in range(len(shape))]
  wstrides = [int(np.prod(widths[a + 1:])) for a in range(len(shape))]

  def fn(score, b, h, q, kv):
    idx = 0
    for L, st, R, ws in zip(shape, strides, Rs, wstrides):
      d = (kv // st) % L - (q // st) % L
      idx = idx + (jnp.clip(d, -R, R) + R) * ws
    return score + jnp.asarray(table)[h, idx].astype(jnp.float32)
  return ScoreMod(fn, f"relative_position_bias{shape}",
                  functools.partial(_check_rows, table, int(np.prod(shape))))


def grid_relative_position_bias(table, *, shape: Sequence[int], dilation=1,
                                query_minus_key: bool = False) -> ScoreMod:
  """Relative-position bias on a 1D-3D grid indexed per axis, ``s + table[h, i_1, ..]``.

  ``table [N, 2 R_1 + 1, ..., 2 R_D + 1]`` (one axis per grid axis, not flattened).  With
  tokens in row-major order over ``shape`` and coordinates ``c_a``, the per-axis offset is
  ``o_a = kv_a // d_a - q_a // d_a`` (key minus query in units of the dilation ``d_a``;
  ``q_a // d_a - kv_a // d_a`` when ``query_minus_key``), clipped to ``[-R_a, R_a]``,
  and ``i_a = o_a + R_a``.  Offsets beyond ``R_a`` only occur on pairs a spatial mask
  removes (the clip keeps the gather in range; such pairs get no gradient).

  Used by :func:`attnjax.ops.spatial.neighborhood_attention` (NAT's ``[N, *(2k-1)]``
  table, ``d`` = the dilation, key minus query in group indices),
  :func:`~attnjax.ops.spatial.window_attention` (Swin's ``[N, 2w-1, 2w-1]`` table,
  query minus key) and MaxViT's block/grid attention.

  Papers: "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows";
  "Neighborhood Attention Transformer".
  """
  if not hasattr(table, "ndim") or not hasattr(table, "dtype"):
    raise TypeError(f"table must be an array, got {type(table).__name__}")
  if not jnp.issubdtype(table.dtype, jnp.floating):
    raise TypeError(f"table must be floating point, got {table.dtype}")
  shape = tuple(int(s) for s in shape)
  nd = len(shape)
  if not 1 <= nd <= 3:
    raise ValueError(f"shape must have 1 to 3 axes, got {shape}")
  if table.ndim != nd + 1:
    raise ValueError(f"table must be [N, *(2R+1)] with one axis per grid axis (rank {nd + 1}), "
                     f"got shape {table.shape}")
  if any(w % 2 == 0 for w in table.shape[1:]):
    raise ValueError(f"table axes after N must be odd (2R+1), got shape {table.shape}")
  if isinstance(dilation, (int, np.integer)):
    dilation = (int(dilation),) * nd
  dilation = tuple(int(d) for d in dilation)
  if len(dilation) != nd or any(d < 1 for d in dilation):
    raise ValueError(f"dilation must be a positive int or {nd} of them, got {dilation!r}")
  Rs = tuple((w - 1) // 2 for w in table.shape[1:])
  strides = [int(np.prod(shape[a + 1:])) for a in range(nd)]
  sign = -1 if query_minus_key else 1

  def fn(score, b, h, q, kv):
    idx = [h]
    for L, st, R, d in zip(shape, strides, Rs, dilation):
      o = ((kv // st) % L) // d - ((q // st) % L) // d
      idx.append(jnp.clip(sign * o, -R, R) + R)
    return score + jnp.asarray(table)[tuple(idx)].astype(jnp.float32)

  def check(T, S, N):
    if table.shape[0] != N:
      raise ValueError(f"grid_relative_position_bias table has {table.shape[0]} rows; the call "
                       f"has N={N} heads")
    n = int(np.prod(shape))
    if T != n or S != n:
      raise ValueError(f"grid_relative_position_bias shape {shape} has {n} tokens; the call "
                       f"needs T == S == {n}, got T={T}, S={S}")
  return ScoreMod(fn, f"grid_relative_position_bias{shape}", check)


def temperature(tau) -> ScoreMod:
  """Temperature scaling ``s / tau`` (tau > 1 flattens attention).

  Paper: "Are Vision Transformers Robust to Patch Perturbations?"
  """
  if isinstance(tau, bool) or (not hasattr(tau, "shape") and
                               (not isinstance(tau, (int, float)) or tau <= 0)):
    raise ValueError(f"tau must be a positive number, got {tau!r}")
  return ScoreMod(lambda s, b, h, q, kv: s / tau, f"temperature({tau})")


def softcap(cap) -> ScoreMod:
  """Logit soft-capping ``c * tanh(s / c)`` (Gemma 2)."""
  if isinstance(cap, bool) or (not hasattr(cap, "shape") and
                               (not isinstance(cap, (int, float)) or cap <= 0)):
    raise ValueError(f"cap must be a positive number, got {cap!r}")
  return ScoreMod(lambda s, b, h, q, kv: cap * jnp.tanh(s / cap), f"softcap({cap})")


def compose(*mods: Callable) -> ScoreMod:
  """Applies score mods left to right: ``compose(f, g)(s) = g(f(s))``."""
  for i, m in enumerate(mods):
    if not callable(m):
      raise TypeError(f"mods[{i}] must be callable, got {type(m).__name__}")
  def fn(score, b, h, q, kv):
    for m in mods:
      score = m(score, b, h, q, kv)
    return score
  def check(T, S, N):
    for m in mods:
      if getattr(m, "check", None) is not None:
        m.check(T, S, N)
  return ScoreMod(fn, " -> ".join(getattr(m, "name", getattr(m, "__name__", "fn"))
                                   for m in mods), check)


# ----------------------------------------------------------------------------- logit recipes
# (issue 19: catalog rows A07, A08, A12)

__all__ += ["learnable_temperature", "entropy_invariant_scale", "head_key_modulation",
            "log_n_scale"]


def log_n_scale(num_keys, train_len: int, *, power: float = 0.5):
  """Entropy-invariant logit factor ``(log n / log n_train) ** power``.

  ``power=0.5`` is ``sqrt(log_{n_train} n)`` ("Training-free Diffusion Model Adaptation
  for Variable-Sized Text-to-Image Synthesis"); ``power=1`` is the ``log_{n_train} n``
  scaling of "Overcoming a Theoretical Limitation of Self-Attention".  ``n`` (the keys a
  query attends to) is floored at 1, so one key gives factor 0 (its softmax is 1 anyway).
  Multiply the usual ``1/sqrt(H)`` scale by it; equal to 1 at ``n = n_train``.
  """
  if isinstance(train_len, bool) or not isinstance(train_len, int) or train_len < 2:
    raise ValueError(f"train_len must be an int >= 2, got train_len={train_len!r}")
  if isinstance(power, bool) or not isinstance(power, (int, float)) or power <= 0:
    raise ValueError(f"power must be a positive number, got power={power!r}")
  n = jnp.maximum(jnp.asarray(num_keys, jnp.float32), 1.0)
  return (jnp.log(n) / float(np.log(train_len))) ** power



def learnable_temperature(log_tau) -> ScoreMod:
  """Per-head learnable temperature ``s * exp(-log_tau[h])`` (``tau_h = exp(log_tau_h)``,
  always positive; ``tau > 1`` flattens attention).

  Paper: "Are Vision Transformers Robust to Patch Perturbations?" (catalog A07; the paper
  fixes ``tau``, here it may be learned per head).

  Args:
    log_tau: float ``[N]``.
  """
  _check_array("log_tau", log_tau, 1)
  def fn(score, b, h, q, kv):
    return score * jnp.exp(-jnp.asarray(log_tau, jnp.float32))[h]
  def check(T, S, N):
    if log_tau.shape[0] != N:
      raise ValueError(f"learnable_temperature log_tau has {log_tau.shape[0]} entries; the call "
                       f"has N={N} heads")
  return ScoreMod(fn, "learnable_temperature", check)


def entropy_invariant_scale(train_len: int, *, num_keys=None, power: float = 0.5,
                            offset: int = 0) -> ScoreMod:
  """Entropy-invariant logit scaling ``s * (log n / log n_train) ** power``.

  ``n`` is ``num_keys`` (a fixed key count, e.g. ``S`` for bidirectional attention) or,
  when None, the keys a causal query sees, ``q_idx + offset + 1``.  ``power=0.5`` is the
  ``sqrt(log_{n_train} n)`` factor of "Training-free Diffusion Model Adaptation for
  Variable-Sized Text-to-Image Synthesis" (catalog A08); ``power=1`` the ``log n``
  scaling of "Overcoming a Theoretical Limitation of Self-Attention".
  See :func:`log_n_scale`.
  """
  log_n_scale(1, train_len, power=power)  # validates train_len and power
  if num_keys is not None and (isinstance(num_keys, bool) or not isinstance(num_keys, int)
                               or num_keys < 1):
    raise ValueError(f"num_keys must be a positive int or None, got num_keys={num_keys!r}")
  def fn(score, b, h, q, kv):
    n = num_keys if num_keys is not None else q + offset + 1
    return score * log_n_scale(n, train_len, power=power)
  return ScoreMod(fn, f"entropy_invariant_scale({train_len}, {power})")


def head_key_modulation(factors, selected) -> ScoreMod:
  """Per-head, per-key attention amplification: ``s + log(f_h) * selected[b, kv]``.

  After the softmax this multiplies the weight of every selected key by ``f_h`` (head
  ``h``'s factor) and renormalises the row, the head- and token-specific modulation of
  "Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large
  Vision-Language Model" (catalog A12).

  Args:
    factors: float ``[N]``, positive (``> 1`` amplifies, ``< 1`` suppresses).
    selected: ``[B, S]`` bool (or 0/1) marking the keys to modulate.
  """
  _check_array("factors", factors, 1)
  if not hasattr(selected, "ndim") or selected.ndim != 2:
    raise ValueError(f"selected must be [B, S], got {getattr(selected, 'shape', selected)!r}")
  def fn(score, b, h, q, kv):
    lf = jnp.log(jnp.asarray(factors, jnp.float32))[h]
    return score + lf * jnp.asarray(selected, jnp.float32)[b, kv]
  def check(T, S, N):
    if factors.shape[0] != N:
      raise ValueError(f"head_key_modulation factors have {factors.shape[0]} entries; the call "
                       f"has N={N} heads")
    if selected.shape[1] != S:
      raise ValueError(f"head_key_modulation selected has {selected.shape[1]} keys; the call "
                       f"has S={S}")
  return ScoreMod(fn, "head_key_modulation", check)
