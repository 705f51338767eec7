"""Decayed (retention-style, optionally gated) linear attention and Lightning Attention.

- :func:`decayed_linear_attention` -- "Retentive Network: A Successor to Transformer for
  Large Language Models"; "Gated Linear Attention Transformers with Hardware-Efficient
  Training".
- :func:`lightning_attention` -- "Various Lengths, Constant Speed: Efficient Language
  Modeling with Lightning Attention"; "Lightning Attention-2".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.ops.linear._args import (
  _F32,
  DEFAULT_BLOCK_LEN,
  DEFAULT_EPS,
  FeatureMap,
  _check_state_array,
  _feature_dim,
  prepare,
)
from attnjax.ops.linear._core import (
  _causal_core,
  _feature_maps,
  _group_q,
  _in_blocks,
  _kernel_core,
  _normalized,
  _pack,
  _ungroup,
  _unpack,
  _with_ones,
  choose,
  dispatched,
)


def _decayed_state(state, B, N, F, Hv, normalize):
  """The public state of decayed_linear_attention (zeros if None), validated, float32."""
  if state is None:
    S0 = jnp.zeros((B, N, F, Hv), _F32)
    return (S0, jnp.zeros((B, N, F), _F32)) if normalize else S0
  if not normalize:
    return _check_state_array(state, (B, N, F, Hv), 'state')
  if not isinstance(state, (tuple, list)) or len(state) != 2:
    raise ValueError('state with normalize=True must be a pair (S [B, N, F, Hv], z [B, N, F])')
  return (_check_state_array(state[0], (B, N, F, Hv), 'state[0] (S)'),
          _check_state_array(state[1], (B, N, F), 'state[1] (z)'))


# --------------------------------------------------------------------------------------
# Decay arguments
# --------------------------------------------------------------------------------------


def _is_concrete(x):
  try:
    np.asarray(x)
    return True
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return False


def _check_decay(decay, N):
  """Returns the per-head log-decay [N] float32 of a scalar or [N] decay in (0, 1]."""
  decay = jnp.asarray(decay)
  if not jnp.issubdtype(decay.dtype, jnp.floating):
    decay = decay.astype(_F32)
  if decay.ndim == 0:
    decay = jnp.broadcast_to(decay, (N,))
  if decay.shape != (N,):
    raise ValueError(f'decay must be a scalar or have shape (N,)=({N},), got {decay.shape}')
  if _is_concrete(decay):
    d = np.asarray(decay, np.float64)
    if not np.all((d > 0) & (d <= 1)):
      raise ValueError(f'decay must lie in (0, 1], got {d}')
  return jnp.log(decay.astype(_F32))


def _core_log_decay(ld_const, ld_tok, T, K):
  """The core's per-token log-decay ``[Ba, T, K, G]`` from a constant ``[N]`` and/or a
  per-token ``[B, T, N]`` log-decay; ``None`` when both are absent (the undecayed path)."""
  a = None
  if ld_const is not None:
    N = ld_const.shape[0]
    a = jnp.broadcast_to(ld_const.reshape(1, 1, K, N // K), (1, T, K, N // K))
  if ld_tok is not None:
    tok = ld_tok.reshape(ld_tok.shape[:2] + (K, -1))
    a = tok if a is None else a + tok
  return a


def _check_log_decay(log_decay, B, T, N):
  log_decay = jnp.asarray(log_decay)
  if log_decay.shape != (B, T, N):
    raise ValueError(f'log_decay must have shape (B, T, N)=({B}, {T}, {N}), got {log_decay.shape}')
  if _is_concrete(log_decay) and not np.all(np.asarray(log_decay) <= 0):
    raise ValueError('log_decay must be <= 0 everywhere (a decay in (0, 1])')
  return log_decay.astype(_F32)


@dispatched
def decayed_linear_attention(q, k, v, *, decay=None, log_decay=None,
                             feature_map: FeatureMap = 'identity', normalize: bool = False,
                             form: str = 'chunked', chunk_size: int = 64, state=None,
                             return_state: bool = False, eps: float = DEFAULT_EPS,
                             implementation=None,
                             block_len: int | None = DEFAULT_BLOCK_LEN):
  """Causal decayed (retention-style) linear attention, optionally gated.

  "Retentive Network: A Successor to Transformer for Large Language Models" (constant
  per-head decay); "Gated Linear Attention Transformers with Hardware-Efficient Training"
  (data-dependent gating of the decay).

  ``o_i = sum_{j<=i} D_ij phi(q_i).phi(k_j) v_j`` with
  ``D_ij = lambda_n^(i-j) * exp(sum_{l=j+1..i} log_decay[l, n])``; with ``normalize`` the
  result is divided by ``sum_{j<=i} D_ij phi(q_i).phi(k_j)`` (guarded by ``eps``).
  Recurrence: ``S_t = lambda_n exp(log_decay[t, n]) S_{t-1} + phi(k_t) v_t^T``,
  ``o_t = phi(q_t) S_t``. No scale is applied (pre-scale ``q`` if wanted).

  Args:
    q: ``[B, T, N, H]``. k: ``[B, T, K, H]``. v: ``[B, T, K, Hv]``.
    decay: ``None``, a scalar or ``[N]``: constant per-head decay ``lambda`` in (0, 1]
      (checked when concrete).
    log_decay: ``None`` or ``[B, T, N]`` float, ``<= 0``: the per-token gate.
    feature_map: as in :func:`linear_attention` (default ``'identity'``).
    normalize: divide by the decayed denominator.
    form, chunk_size, eps: as in :func:`linear_attention`.
    state: ``S [B, N, F, Hv]`` float32 (one state per **query head**, decays differ per
      head), or with ``normalize`` the pair ``(S, z [B, N, F])``.
    return_state: also return the state after the last token.
    implementation: ``None``/``'auto'`` (default: the Pallas chunk kernel on TPU/GPU when
      it serves the call, else ``'xla'``), ``'xla'``, or ``'pallas_tpu'`` / ``'pallas_gpu'``,
      which serve the causal chunked form with a constant decay (no ``log_decay``; an
      explicit request otherwise raises :class:`attnjax.core.Unsupported`).
    block_len: as in :func:`linear_attention`.

  Returns:
    ``[B, T, N, Hv]`` in ``v.dtype``, or ``(out, state)`` with ``return_state``.
  """
  a = prepare(q, k, v, causal=True, form=form, feature_map=feature_map,
              chunk_size=chunk_size, eps=eps, implementation=implementation,
              block_len=block_len)
  B, T, N, H, K, Hv, G = a.B, a.T, a.N, a.H, a.K, a.Hv, a.G
  phi, chunk_size, eps = a.phi, a.chunk_size, a.eps
  ld_const = None if decay is None else _check_decay(decay, N)
  ld_tok = None if log_decay is None else _check_log_decay(log_decay, B, T, N)
  implementation = choose(a, mechanism='decayed_linear_attention', causal=True,
                          token_decay=ld_tok is not None, dtype=v.dtype)
  if a.use_blocks(True, implementation):
    step = lambda st, q_, k_, v_, ld_: decayed_linear_attention(
        q_, k_, v_, decay=decay, log_decay=ld_, feature_map=feature_map, normalize=normalize,
        chunk_size=chunk_size, state=st, return_state=True, eps=eps, implementation='xla',
        block_len=None)
    st0 = _decayed_state(state, B, N, _feature_dim(phi, H), Hv, normalize)
    o, st = _in_blocks(step, st0, (q, k, v, ld_tok), block_len=a.block_len)
    return (o, st) if return_state else o
  qf, kf = _feature_maps(phi, q, k)
  F = qf.shape[-1]
  v_aug = _with_ones(v, normalize)
  st = _decayed_state(state, B, N, F, Hv, normalize)
  st = _pack(*st) if normalize else st                            # [B, N, F, V]
  if implementation != 'xla':
    o, new_st = _kernel_core(qf, kf, v_aug, jnp.zeros((N,), _F32) if ld_const is None
                             else ld_const, st, chunk_size=chunk_size,
                             implementation=implementation)
  else:
    o, new_st = _causal_core(_group_q(qf, K, G), kf, v_aug, _core_log_decay(ld_const, ld_tok, T, K),
                             st.reshape(B, K, G, F, -1), form=form, chunk_size=chunk_size)
    o, new_st = _ungroup(o), new_st.reshape(st.shape)
  o = _normalized(o, Hv, eps, normalize).astype(v.dtype)
  if not return_state:
    return o
  return o, (_unpack(new_st, Hv) if normalize else new_st)


def lightning_attention(q, k, v, *, decay, form: str = 'chunked', chunk_size: int = 64,
                        state=None, return_state: bool = False,
                        implementation=None,
                        block_len: int | None = DEFAULT_BLOCK_LEN):
  """Lightning Attention: causal, unnormalised linear attention with per-head decay.

  "Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention";
  "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large
  Language Models".

  ``o_i = sum_{j<=i} lambda_n^(i-j) (q_i . k_j) v_j`` for query head ``n``. The chunked form is
  the Lightning Attention-2 tiling: inside a chunk ``[(Q_b K_b^T) * M] V_b`` with the decay
  mask ``M_ij = lambda^(i-j) [i >= j]``; across chunks ``O_b += (lambda^(i+1) Q_b) KV`` and
  ``KV <- lambda^C KV + (lambda^(C-1-j) K_b)^T V_b``.

  Args:
    q: ``[B, T, N, H]``. k: ``[B, T, K, H]``. v: ``[B, T, K, Hv]``; ``N % K == 0``.
    decay: scalar or ``[N]``, each in (0, 1] (``1`` = no decay).
    form: ``'chunked'`` | ``'recurrent'`` | ``'quadratic'``.
    chunk_size: chunk (block) length.
    state: ``KV [B, N, H, Hv]`` float32, per query head (the state after earlier tokens).
    return_state: also return the state after the last token.
    implementation: as in :func:`decayed_linear_attention` (default ``None``/``'auto'``).
    block_len: as in :func:`linear_attention`.

  Returns:
    ``[B, T, N, Hv]`` in ``v.dtype``, or ``(out, state)`` with ``return_state``.
  """
  return decayed_linear_attention(q, k, v, decay=decay, feature_map='identity',
                                  normalize=False, form=form, chunk_size=chunk_size,
                                  state=state, return_state=return_state,
                                  implementation=implementation, block_len=block_len)

