"""Mamba-2's state-space dual (SSD) as causal linear attention, and the attention matrix
implied by any recurrence of this package.

- :func:`ssd_attention` -- "Transformers are SSMs: Generalized Models and Efficient
  Algorithms Through Structured State Space Duality" (Dao & Gu).
- :func:`implied_attention` -- "The Hidden Attention of Mamba Models" (Ali et al.): the
  ``[B, N, T, T]`` matrix a recurrence applies to its values.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from attnjax.core import hooks
from attnjax.ops.linear._args import _F32, DEFAULT_BLOCK_LEN, FORMS
from attnjax.ops.linear.decayed import decayed_linear_attention
from attnjax.ops.linear.delta import delta_implied_attention
from attnjax.ops.linear.gated import (
  _einsum,
  _is_concrete,
  _masked_exp,
  check_pow2_chunk,
  gla_implied_attention,
)


def _check_ssd(x, dt, A, B_, C_, D):
  for name, arr, rank in (('x', x, 4), ('dt', dt, 3), ('A', A, 1), ('B', B_, 4), ('C', C_, 4)):
    if not hasattr(arr, 'ndim') or arr.ndim != rank:
      raise ValueError(f'{name} must have rank {rank}, got shape '
                       f'{getattr(arr, "shape", type(arr))}')
    if not jnp.issubdtype(arr.dtype, jnp.floating):
      raise TypeError(f'{name} must be a floating array, got dtype {arr.dtype}')
  Bt, T, N, P = x.shape
  if tuple(dt.shape) != (Bt, T, N):
    raise ValueError(f'dt must have shape (B, T, N)={(Bt, T, N)}, got {tuple(dt.shape)}')
  if tuple(A.shape) != (N,):
    raise ValueError(f'A must have shape (N,)=({N},), got {tuple(A.shape)}')
  if B_.shape[:2] != (Bt, T) or C_.shape != B_.shape:
    raise ValueError(f'B and C must both have shape (B, T, G, S) with (B, T)={(Bt, T)}, got '
                     f'B {tuple(B_.shape)}, C {tuple(C_.shape)}')
  G = B_.shape[2]
  if G == 0 or N % G:
    raise ValueError(f'the number of heads N={N} of x must be a multiple of the groups G={G} '
                     'of B and C')
  if D is not None and (not hasattr(D, 'shape') or tuple(D.shape) != (N,)):
    raise ValueError(f'D must be None or have shape (N,)=({N},), got '
                     f'{getattr(D, "shape", type(D))}')
  if _is_concrete(dt) and not np.all(np.asarray(dt, np.float64) >= 0):
    raise ValueError('dt must be >= 0 everywhere (the step size, after softplus)')
  if _is_concrete(A) and not np.all(np.asarray(A, np.float64) <= 0):
    raise ValueError('A must be <= 0 everywhere (decay exp(dt * A) in (0, 1])')
  return Bt, T, N, P, G, B_.shape[3]


def _heads(x, N):
  G = x.shape[2]
  return x if G == N else jnp.repeat(x, N // G, axis=2)


def ssd_attention(x, dt, A, B, C, *, D=None, form: str = 'chunked', chunk_size: int = 64,
                  state=None, return_state: bool = False,
                  block_len: int | None = DEFAULT_BLOCK_LEN):
  """Mamba-2's SSD layer core as causal linear attention with a scalar per-head decay.

  "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured
  State Space Duality".

  Recurrence per head ``n`` (state ``h [P, S]``), with ``a_t = exp(dt_t A_n)``:
  ``h_t = a_t h_{t-1} + dt_t x_t B_t^T``, ``y_t = h_t C_t + D_n x_t``. As attention
  (the SSD "dual"): ``y_i = sum_{j<=i} (C_i . B_j) exp(sum_{l=j+1..i} dt_l A) dt_j x_j
  + D x_i``: ``C`` plays the queries, ``B`` the keys, ``dt x`` the values (no scale). The
  forms are those of :func:`decayed_linear_attention` (the decay handled in log space,
  relative to each chunk start).

  Args:
    x: ``[B, T, N, P]`` (N heads of dimension P).
    dt: ``[B, T, N]``, ``>= 0``: the step (after Mamba-2's ``softplus(dt + dt_bias)``).
    A: ``[N]``, ``<= 0`` (Mamba-2 uses ``-exp(A_log)``).
    B: ``[B, T, G, S]`` input projections (keys) with ``G`` groups, ``N % G == 0``.
    C: ``[B, T, G, S]`` output projections (queries).
    D: ``None`` or ``[N]``: the skip connection ``D_n x_t``.
    form: ``'chunked'`` | ``'recurrent'`` | ``'quadratic'``.
    chunk_size: a positive power of two.
    state: ``h [B, N, P, S]`` float32 (``[B, N, Hv, H]`` as the other ops of this package).
    return_state: also return the state after the last token.
    block_len: chunked form: process blocks of this many tokens (None: one block).

  Returns:
    ``y [B, T, N, P]`` in ``x.dtype``, or ``(y, state)``.
  """
  Bt, T, N, P, G, S = _check_ssd(x, dt, A, B, C, D)
  if hooks.observing():  # attnjax.analysis: one observed call (C queries, B keys, x values)
    return hooks.intercepted('linear', lambda: ssd_attention(
        x, dt, A, B, C, D=D, form=form, chunk_size=chunk_size, state=state,
        return_state=return_state, block_len=block_len), _heads(C, N), _heads(B, N), x,
        probs=lambda: ssd_implied_attention(dt, A, B, C, D),
        extras=None if state is None else lambda: {'state': ssd_attention(   # zero inputs x
            jnp.zeros(x.shape, _F32), dt, A, B, C, form=form, chunk_size=chunk_size,
            state=state, block_len=block_len)})
  if form not in FORMS:
    raise ValueError(f'form must be one of {FORMS}, got form={form!r}')
  check_pow2_chunk(chunk_size)
  if state is not None:
    if not hasattr(state, 'shape') or tuple(state.shape) != (Bt, N, P, S):
      raise ValueError(f'state must have shape (B, N, P, S)={(Bt, N, P, S)}, got '
                       f'{getattr(state, "shape", type(state))}')
    state = jnp.swapaxes(state.astype(_F32), -1, -2)         # decayed op: [B, N, F, Hv]
  dt32 = dt.astype(_F32)
  u = dt32[..., None] * x.astype(_F32)
  log_decay = dt32 * A.astype(_F32)[None, None, :]
  y, st = decayed_linear_attention(
      _heads(C, N).astype(_F32), _heads(B, N).astype(_F32), u, log_decay=log_decay,
      feature_map='identity', form=form, chunk_size=chunk_size, state=state, return_state=True,
      implementation='xla', block_len=block_len)
  if D is not None:
    y = y + D.astype(_F32)[None, None, :, None] * x.astype(_F32)
  y = y.astype(x.dtype)
  return (y, jnp.swapaxes(st, -1, -2)) if return_state else y


def ssd_implied_attention(dt, A, B, C, D=None):
  """``W [B, N, T, T]`` with ``ssd_attention(x, dt, A, B, C, D=D) ==
  einsum('bnts,bsnp->btnp', W, x)``: ``W_ij = (C_i . B_j) exp(sum_{l=j+1..i} dt_l A) dt_j``
  for ``j <= i``, plus ``D`` on the diagonal."""
  Bt, T, N = dt.shape
  x = jnp.zeros((Bt, T, N, 1), _F32)  # shape carrier for the checks only
  _check_ssd(x, dt, A, B, C, D)
  cum = jnp.cumsum(dt.astype(_F32) * A.astype(_F32)[None, None, :], axis=1)   # [B,T,N]
  cum = jnp.moveaxis(cum, 2, 1)
  tri = jnp.tril(jnp.ones((T, T), bool))
  dec = _masked_exp(cum[..., :, None] - cum[..., None, :], tri)
  s = _einsum('binf,bjnf->bnij', _heads(C, N).astype(_F32), _heads(B, N).astype(_F32))
  W = s * dec * jnp.moveaxis(dt.astype(_F32), 2, 1)[:, :, None, :]
  if D is not None:
    W = W + D.astype(_F32)[None, :, None, None] * jnp.eye(T, dtype=_F32)
  return W


IMPLIED = {
    'gla': gla_implied_attention,
    'delta_rule': delta_implied_attention,
    'gated_delta_rule': delta_implied_attention,
    'ssd': ssd_implied_attention,
}


def implied_attention(mechanism: str, *args, **kwargs):
  """The ``[B, N, T, T]`` attention matrix a recurrence applies to its values.

  "The Hidden Attention of Mamba Models": a causal linear recurrence from a zero state
  is linear in its values, ``out = W v`` per head, and ``W`` (lower triangular) can be
  inspected and plotted like a softmax attention map.

  ``mechanism`` and the arguments (those of the op, without the values):

  - ``'gla'``: ``(q, k, log_alpha, *, scale=None)`` -- ``W_ij = sum_h scale q_ih k_jh
    exp(b_ih - b_jh)`` (``b`` the cumulative log-decay);
  - ``'delta_rule'``: ``(q, k, beta, *, scale=None)``;
    ``'gated_delta_rule'``: ``(q, k, beta, log_alpha, *, scale=None)`` -- computed from the
    UT form over one chunk: ``W = tril(D * scale Q K^T) M^{-1} diag(beta)`` with
    ``M = I + tril(diag(beta) (D * K K^T), -1)``;
  - ``'ssd'``: ``(dt, A, B, C, D=None)`` -- ``W_ij = (C_i . B_j) exp(sum_{l=j+1..i} dt_l A)
    dt_j`` plus ``D`` on the diagonal.

  Then ``einsum('bnts,bsnv->btnv', W, v)`` equals the op's output (``v`` with ``N`` heads;
  repeat kv heads under GQA; ``x`` for ``'ssd'``). Returns float32 ``[B, N, T, T]``.
  """
  if mechanism not in IMPLIED:
    raise ValueError(f'mechanism must be one of {sorted(IMPLIED)}, got mechanism={mechanism!r}')
  if mechanism == 'delta_rule' and (len(args) > 3 or 'log_alpha' in kwargs):
    raise ValueError("mechanism='delta_rule' takes (q, k, beta); use 'gated_delta_rule' for a "
                     'log_alpha')
  return IMPLIED[mechanism](*args, **kwargs)
