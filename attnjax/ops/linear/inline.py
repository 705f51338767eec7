"""InLine attention: "Bridging the Divide: Reconsidering Softmax and Linear Attention"
(injective linear attention), causal or not.
"""

from __future__ import annotations

import jax.numpy as jnp

from attnjax.ops.linear._args import (
  _F32,
  DEFAULT_BLOCK_LEN,
  FeatureMap,
  _check_state_array,
  _feature_dim,
  prepare,
)
from attnjax.ops.linear._core import (
  _causal_kv_core,
  _einsum,
  _feature_maps,
  _in_blocks,
  _pack,
  _ungroup,
  _unpack,
  _with_ones,
  choose,
  dispatched,
)

# --------------------------------------------------------------------------------------
# InLine: injective linear attention
# --------------------------------------------------------------------------------------


def _inline_state(state, B, K, F, Hv):
  if state is None:
    return (jnp.zeros((B, K, F, Hv), _F32), jnp.zeros((B, K, F), _F32),
            jnp.zeros((B, K, Hv), _F32), jnp.zeros((B,), _F32))
  if not isinstance(state, (tuple, list)) or len(state) != 4:
    raise ValueError('state of inline_attention must be (S [B, K, F, Hv], z [B, K, F], '
                     'vsum [B, K, Hv], count [B])')
  return (_check_state_array(state[0], (B, K, F, Hv), 'state[0] (S)'),
          _check_state_array(state[1], (B, K, F), 'state[1] (z)'),
          _check_state_array(state[2], (B, K, Hv), 'state[2] (vsum)'),
          _check_state_array(state[3], (B,), 'state[3] (count)'))


@dispatched
def inline_attention(q, k, v, *, feature_map: FeatureMap = 'identity', causal: bool = False,
                     form: str = 'chunked', chunk_size: int = 64, state=None,
                     return_state: bool = False, implementation=None,
                     block_len: int | None = DEFAULT_BLOCK_LEN):
  """InLine: injective linear attention (subtractive normalisation).

  "Bridging the Divide: Reconsidering Softmax and Linear Attention".

  ``w_ij = phi(q_i).phi(k_j) - (1/n_i) sum_{s} phi(q_i).phi(k_s) + 1/n_i`` over the ``n_i``
  allowed keys (all ``S`` keys, or ``j <= i`` when causal), so ``sum_j w_ij = 1`` without a
  division by the scores; ``o_i = sum_j w_ij v_j = phi(q_i) KV_i + (1 - phi(q_i) z_i) vbar_i``
  with ``KV_i = sum_j phi(k_j) v_j^T``, ``z_i = sum_j phi(k_j)``, ``vbar_i = (1/n_i) sum_j v_j``.
  The paper's local 3x3 residual is a layer-level module, not part of this function.

  Args:
    q, k, v: BTNH. feature_map: as in :func:`linear_attention` (default ``'identity'``).
    causal, form, chunk_size, return_state, implementation, block_len: as in
      :func:`linear_attention`.
    state: causal only; ``(S [B, K, F, Hv], z [B, K, F], vsum [B, K, Hv], count [B])``
      float32 (sums over past tokens; ``count`` = number of past tokens).

  Returns:
    ``[B, T, N, Hv]`` in ``v.dtype`` (or ``(out, state)``).
  """
  a = prepare(q, k, v, causal=causal, form=form, feature_map=feature_map,
              chunk_size=chunk_size, implementation=implementation, block_len=block_len,
              state=state, return_state=return_state)
  B, T, N, H, S, K, Hv = a.B, a.T, a.N, a.H, a.S, a.K, a.Hv
  phi, chunk_size = a.phi, a.chunk_size
  implementation = choose(a, mechanism='inline_attention', causal=causal, dtype=v.dtype)
  if a.use_blocks(causal, implementation):
    step = lambda st, *x: inline_attention(
        *x, feature_map=feature_map, causal=True, chunk_size=chunk_size, state=st,
        return_state=True, implementation='xla', block_len=None)
    st0 = _inline_state(state, B, K, _feature_dim(phi, H), Hv)
    o, st = _in_blocks(step, st0, (q, k, v), block_len=a.block_len)
    return (o, st) if return_state else o
  qf, kf = _feature_maps(phi, q, k)
  F = qf.shape[-1]
  G = N // K
  v32 = v.astype(_F32)
  if not causal:
    qg = qf.reshape(B, T, K, G, F)
    if form == 'quadratic':
      s = _einsum('btkgf,bskf->bkgts', qg, kf)
      w = s - jnp.mean(s, axis=-1, keepdims=True) + 1.0 / S
      o = _einsum('bkgts,bskv->btkgv', w, v32)
    else:
      kv = _einsum('bskf,bskv->bkfv', kf, v32)
      z = jnp.sum(kf.astype(_F32), axis=1)
      vbar = jnp.mean(v32, axis=1)
      qz = _einsum('btkgf,bkf->btkg', qg, z)
      o = _einsum('btkgf,bkfv->btkgv', qg, kv) + (1.0 - qz)[..., None] * vbar[:, None, :, None]
    return _ungroup(o).astype(v.dtype)

  S0, z0, vs0, n0 = _inline_state(state, B, K, F, Hv)
  count = n0[:, None] + jnp.arange(1, T + 1, dtype=_F32)[None]          # [B, T]
  vsum = vs0[:, None] + jnp.cumsum(v32, axis=1)                          # [B, T, K, Hv]
  vbar = jnp.repeat(vsum / count[:, :, None, None], G, axis=2)          # [B, T, N, Hv]
  if form == 'quadratic':
    qg = qf.reshape(B, T, K, G, F)
    causal_m = jnp.tril(jnp.ones((T, T), bool))
    s = jnp.where(causal_m, _einsum('btkgf,bskf->bkgts', qg, kf), 0.0)
    past = _einsum('btkgf,bkf->bkgt', qg, z0)                            # q_i . z0
    inv_n = (1.0 / count)[:, None, None, :]                               # [B,1,1,T]
    tot = jnp.sum(s, axis=-1) + past                                      # sum of all scores
    w = jnp.where(causal_m, s - (tot * inv_n)[..., None] + inv_n[..., None], 0.0)
    o = _einsum('bkgts,bskv->btkgv', w, v32)
    # Past tokens (the state) enter through q.S0 and through the mean-correction terms.
    coef = jnp.moveaxis((1.0 - tot) * inv_n, -1, 1)                       # [B,T,K,G]
    o = o + _einsum('btkgf,bkfv->btkgv', qg, S0) + coef[..., None] * vs0[:, None, :, None]
    o = _ungroup(o)
    new_S = S0 + _einsum('bskf,bskv->bkfv', kf, v32)
    new_z = z0 + jnp.sum(kf.astype(_F32), axis=1)
  else:
    o_aug, new_st = _causal_kv_core(qf, kf, _with_ones(v32, True), _pack(S0, z0), form=form,
                                    chunk_size=chunk_size, implementation=implementation)
    o = o_aug[..., :Hv] + (1.0 - o_aug[..., Hv:]) * vbar
    new_S, new_z = _unpack(new_st, Hv)
  o = o.astype(v.dtype)
  if not return_state:
    return o
  return o, (new_S, new_z, vsum[:, -1], count[:, -1])

