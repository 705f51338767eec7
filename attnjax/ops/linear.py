"""Linear-attention family (catalog family D): kernelized, decayed and flow-normalised attention.

Every function takes the public BTNH layout: ``q [B, T, N, H]``, ``k [B, S, K, H]``,
``v [B, S, K, Hv]`` with ``N`` a multiple of ``K`` (grouped-query attention: query head ``n``
reads kv head ``n // (N // K)``; keys and values are never repeated in memory) and returns
``[B, T, N, Hv]`` in the dtype of ``v``. Causal mechanisms need ``S == T``.

Mechanisms (paper titles):

- :func:`linear_attention` -- generic kernelized linear attention with feature maps
  (``'elu+1'``, ``'relu'``, ``'identity'`` or a callable), causal or not.
  "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention".
- :func:`lightning_attention` -- causal, unnormalised, per-head decay; the tiled
  intra-block / inter-block computation of "Various Lengths, Constant Speed: Efficient
  Language Modeling with Lightning Attention" and "Lightning Attention-2: A Free Lunch for
  Handling Unlimited Sequence Lengths in Large Language Models".
- :func:`decayed_linear_attention` -- the general case: retention-style decayed linear
  attention with a constant (scalar or per-head) decay and/or a data-dependent per-token
  gate ``log_decay [B, T, N]``; optional feature map and normalisation.
  "Retentive Network: A Successor to Transformer for Large Language Models" (retention);
  "Gated Linear Attention Transformers with Hardware-Efficient Training" (gating).
- :func:`efficient_attention` -- "Efficient Attention: Attention with Linear Complexities"
  (Shen et al.), non-causal.
- :func:`focused_linear_attention` -- "FLatten Transformer: Vision Transformer using Focused
  Linear Attention" (focused feature map + depthwise-convolution rank restoration).
- :func:`inline_attention` -- "Bridging the Divide: Reconsidering Softmax and Linear
  Attention" (InLine: injective linear attention), causal or not.
- :func:`flow_attention` -- "Flowformer: Linearizing Transformers with Conservation Flows",
  non-causal or causal (the paper's causal version, prefix-sum flows).

Forms. Every causal mechanism has three forms selected by ``form=``:

- ``'chunked'`` (training): the sequence is cut into chunks of ``chunk_size`` tokens; inside
  a chunk the masked (decayed) ``q k^T`` product is materialised (``chunk_size^2`` per
  chunk), across chunks a ``[F, Hv]`` state carries the past (``lax.scan`` over chunks).
  O(T) memory and time; ``T`` need not be a multiple of ``chunk_size``.
- ``'recurrent'`` (decoding): a ``lax.scan`` over tokens of ``S_t = lambda_t S_{t-1} +
  phi(k_t) v_t^T``, ``o_t = phi(q_t) S_t``; accepts one token or a block.
- ``'quadratic'`` (tests): the ``[T, T]`` weight matrix is materialised.

All three accept ``state=`` (the state after a previous call) and, with
``return_state=True``, return ``(out, new_state)``; they agree to float32 precision,
forward and backward. Without any decay the forms take an undecayed fast path (masked
products and plain state sums, no ``exp``). In the chunked form, sequences longer than
``block_len`` (default 2048) are processed block by block: a ``lax.scan`` over blocks carries
the state and each block is rematerialised in the backward pass, which bounds the working
set (the time then scales linearly on CPU; see ``docs/linear.md``). Non-causal mechanisms accept ``form='chunked'`` (the linear-cost
``phi(Q) (phi(K)^T V)`` path) and ``form='quadratic'``.

Numerics: logits, decays and states are float32 whatever the input dtype; decays are
handled in log space (``exp`` of differences of cumulative log-decays, every exponent
``<= 0``), never by dividing by a decay. Normalised forms divide by ``den + eps`` (``den - eps``
when ``den < 0``), so the denominator is never zero.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
FeatureMap = str | Callable[[Array], Array]

FORMS = ('chunked', 'recurrent', 'quadratic')
IMPLEMENTATIONS = ('xla', 'pallas_tpu', 'pallas_gpu')
DEFAULT_EPS = 1e-6
DEFAULT_BLOCK_LEN = 2048
_F32 = jnp.float32


# --------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------


def _elu_plus_one(x):
  return jax.nn.elu(x) + 1.0


def _identity(x):
  return x


FEATURE_MAPS: dict[str, Callable[[Array], Array]] = {
    'elu+1': _elu_plus_one,
    'relu': jax.nn.relu,
    'identity': _identity,
}


def _resolve_feature_map(feature_map: FeatureMap) -> Callable[[Array], Array]:
  if callable(feature_map):
    return feature_map
  if isinstance(feature_map, str) and feature_map in FEATURE_MAPS:
    return FEATURE_MAPS[feature_map]
  raise ValueError(
      f'feature_map must be one of {sorted(FEATURE_MAPS)} or a callable, got {feature_map!r}')


def _apply_feature_map(phi, x, name):
  """Applies phi in float32 and casts back to the input dtype."""
  y = phi(x.astype(_F32))
  if not isinstance(y, jax.Array) or y.ndim != x.ndim or y.shape[:-1] != x.shape[:-1]:
    raise ValueError(
        f'feature_map must map {name} of shape {x.shape} to an array of shape '
        f'{x.shape[:-1]} + (F,), got {getattr(y, "shape", type(y))}')
  return y.astype(x.dtype)


def _check_qkv(q, k, v, *, causal: bool):
  for name, x in (('q', q), ('k', k), ('v', v)):
    if not hasattr(x, 'ndim') or x.ndim != 4:
      raise ValueError(f'{name} must have rank 4 (BTNH layout), got shape '
                       f'{getattr(x, "shape", type(x))}')
  B, T, N, H = q.shape
  Bk, S, K, Hk = k.shape
  Bv, Sv, Kv, Hv = v.shape
  if Bk != B or Bv != B:
    raise ValueError(f'batch sizes differ: q {B}, k {Bk}, v {Bv}')
  if Hk != H:
    raise ValueError(f'k head dim must equal q head dim H={H}, got {Hk}')
  if Sv != S or Kv != K:
    raise ValueError(f'v must have shape [B, S={S}, K={K}, Hv], got {v.shape}')
  if K == 0 or N % K:
    raise ValueError(f'number of query heads N={N} must be a multiple of kv heads K={K}')
  if causal and S != T:
    raise ValueError(f'causal attention needs key length S equal to query length T={T}, got {S}')
  for name, x in (('q', q), ('k', k), ('v', v)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f'{name} must be a floating array, got dtype {x.dtype}')
  return B, T, N, H, S, K, Hv


def _check_form(form, causal: bool):
  if form not in FORMS:
    raise ValueError(f'form must be one of {FORMS}, got {form!r}')
  if not causal and form == 'recurrent':
    raise ValueError("form='recurrent' needs causal=True (a non-causal output depends on "
                     "every key); use form='chunked' or 'quadratic'")


def _check_chunk_size(chunk_size):
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f'chunk_size must be a positive int, got {chunk_size!r}')
  return int(chunk_size)


def _check_block_len(block_len):
  if block_len is None:
    return None
  if isinstance(block_len, bool) or not isinstance(block_len, (int, np.integer)) or block_len < 1:
    raise ValueError(f'block_len must be None or a positive int, got {block_len!r}')
  return int(block_len)


def _use_blocks(form, implementation, block_len, T):
  return form == 'chunked' and implementation == 'xla' and block_len is not None and T > block_len


def _feature_dim(phi, H):
  return jax.eval_shape(phi, jax.ShapeDtypeStruct((1, H), _F32)).shape[-1]


def _in_blocks(step, state, xs, *, block_len):
  """Runs a causal op over consecutive blocks of ``block_len`` tokens, carrying its state.

  ``step(state, *x_block) -> (out_block, state)``; every ``x`` in ``xs`` is ``[B, T, ...]``
  (or ``None``). Whole blocks go through a ``lax.scan`` whose body is rematerialised
  (``jax.checkpoint``) in the backward pass; a last partial block is a direct call. Working
  memory beyond inputs and outputs is that of one block, so time and memory stay linear in
  ``T`` with a small, cache-resident working set.
  """
  T = next(x for x in xs if x is not None).shape[1]
  nb, rem = divmod(T, block_len)
  outs = []
  if nb:
    def blocks(x):
      if x is None:
        return None
      x = x[:, :nb * block_len].reshape((x.shape[0], nb, block_len) + x.shape[2:])
      return jnp.swapaxes(x, 0, 1)

    def body(st, x):
      out, st = step(st, *x)
      return st, out

    state, o = jax.lax.scan(jax.checkpoint(body), state, tuple(blocks(x) for x in xs))
    o = jnp.swapaxes(o, 0, 1)
    outs.append(o.reshape((o.shape[0], nb * block_len) + o.shape[3:]))
  if rem:
    o, state = step(state, *(None if x is None else x[:, nb * block_len:] for x in xs))
    outs.append(o)
  return (outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)), state


def _check_eps(eps):
  if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
    raise ValueError(f'eps must be a positive float, got {eps!r}')
  return float(eps)


def _check_implementation(implementation, form):
  if implementation is None:
    implementation = 'xla'
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}')
  if implementation != 'xla' and form != 'chunked':
    raise ValueError(f"implementation={implementation!r} serves form='chunked' only, got {form!r}")
  return implementation


def _check_state_array(x, shape, name):
  if not hasattr(x, 'shape') or tuple(x.shape) != tuple(shape):
    raise ValueError(f'{name} must have shape {tuple(shape)}, got {getattr(x, "shape", type(x))}')
  return x.astype(_F32)


def _safe_div(num, den, eps):
  """num / (den + eps * sign(den)) with sign(0) = +1: |denominator| >= eps, never zero."""
  return num / jnp.where(den >= 0, den + eps, den - eps)


# --------------------------------------------------------------------------------------
# The causal core: o_i = sum_{j<=i} exp(A_i - A_j) (q_i . k_j) v_j  (+ state terms)
#
# Shapes inside the core (letters): q [B, T, K, Gs, Gq, F], k [B, T, K, F], v [B, T, K, V],
# a (per-token log-decay) [Ba, T, K, Gs] with Ba in {1, B}, or None for no decay at all,
# state [B, K, Gs, F, V]. Gs is 1 when the state is shared by the G = N // K query heads of
# a kv head, else G (then Gq = 1). A_i is the inclusive cumulative sum of a.
#
# With a = None every form takes the undecayed fast path: masked products and plain sums
# of states, no cumulative log-decays and no exp anywhere (forward or backward).
# --------------------------------------------------------------------------------------


def _einsum(spec, *xs):
  return jnp.einsum(spec, *xs, preferred_element_type=_F32)


def _masked_exp(diff, mask):
  """exp(diff) where mask else 0, with zero (not NaN) gradients on masked entries."""
  return jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)


def _like_v(w, v):
  """Weights cast to the value dtype for the weights @ values product (f32 accumulation)."""
  return w.astype(v.dtype) if v.dtype != _F32 else w


def _full_batch(a, B):
  """The log-decay broadcast to the full batch ``B`` before any use.

  With a batch-1 log-decay the gradient program (a reduce over the broadcast batch axis)
  crashes XLA:CPU in jax 0.10.2 (heap corruption seen as a segfault at the next garbage
  collection); every decayed form therefore broadcasts first.
  """
  return jnp.broadcast_to(a, (B,) + a.shape[1:])


def _core_quadratic(q, k, v, a, state):
  B, T = q.shape[:2]
  causal = jnp.tril(jnp.ones((T, T), bool))
  s = _einsum('btksqf,bjkf->bksqtj', q, k)
  q32 = q.astype(_F32)
  if a is None:
    o = _einsum('bksqtj,bjkv->btksqv', _like_v(jnp.where(causal, s, 0.0), v), v)
    o = o + _einsum('btksqf,bksfv->btksqv', q32, state)
    new_state = state + _einsum('btkf,btkv->bkfv', k.astype(_F32), v.astype(_F32))[:, :, None]
    return o, new_state
  A = jnp.cumsum(_full_batch(a, B), axis=1)                     # [B, T, K, Gs]
  A_kst = jnp.moveaxis(A, 1, -1)                                 # [B, K, Gs, T]
  decay = _masked_exp(A_kst[..., :, None] - A_kst[..., None, :], causal)  # [B,K,Gs,T,T]
  o = _einsum('bksqtj,bjkv->btksqv', _like_v(s * decay[:, :, :, None], v), v)
  o = o + _einsum('btksqf,bksfv->btksqv', q32 * jnp.exp(A)[..., None, None], state)
  A_last = A[:, -1]                                              # [B, K, Gs]
  kdec = jnp.exp(A_last[:, None] - A)                            # [B, T, K, Gs]
  new_state = (jnp.exp(A_last)[..., None, None] * state
               + _einsum('btks,btkf,btkv->bksfv', kdec, k.astype(_F32), v.astype(_F32)))
  return o, new_state


def _core_recurrent(q, k, v, a, state):
  B = q.shape[0]
  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v))
  if a is not None:
    xs = xs + (jnp.moveaxis(_full_batch(a, B), 1, 0),)

  def step(S, x):
    q_t, k_t, v_t = x[:3]                                        # [B,K,Gs,Gq,F],[B,K,F],[B,K,V]
    kv_t = _einsum('bkf,bkv->bkfv', k_t.astype(_F32), v_t.astype(_F32))[:, :, None]
    S = S + kv_t if a is None else jnp.exp(x[3])[..., None, None] * S + kv_t
    return S, _einsum('bksqf,bksfv->bksqv', q_t.astype(_F32), S)

  new_state, o = jax.lax.scan(step, state, xs)
  return jnp.moveaxis(o, 0, 1), new_state


def _core_chunked(q, k, v, a, state, chunk_size):
  B, T = q.shape[:2]
  C = min(chunk_size, T)
  nc = -(-T // C)
  pad = nc * C - T
  if a is not None:
    a = _full_batch(a, B)
  if pad:
    # Padding sits after the last real token: zero keys/values add nothing to the state and
    # a zero log-decay leaves it untouched, so outputs and the final state are exact.
    def _pad(x):
      return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    q, k, v = _pad(q), _pad(k), _pad(v)
    a = None if a is None else _pad(a)
  qc = q.reshape((B, nc, C) + q.shape[2:])                      # [B,n,C,K,Gs,Gq,F]
  kc = k.reshape((B, nc, C) + k.shape[2:])                      # [B,n,C,K,F]
  vc = v.reshape((B, nc, C) + v.shape[2:])                      # [B,n,C,K,V]
  causal = jnp.tril(jnp.ones((C, C), bool))
  s = _einsum('bniksqf,bnjkf->bnksqij', qc, kc)                  # intra-chunk q k^T
  if a is None:
    # intra-chunk: masked product; inter-chunk: state before each chunk = exclusive prefix
    # sum of per-chunk k^T v (a lax.scan over chunk summaries: linear in the chunk count).
    o = _einsum('bnksqij,bnjkv->bniksqv', _like_v(jnp.where(causal, s, 0.0), v), vc)
    kv = _einsum('bnjkf,bnjkv->nbkfv', kc.astype(_F32), vc.astype(_F32))[:, :, :, None]
    new_state, S_prev = jax.lax.scan(lambda S, kv_c: (S + kv_c, S), state, kv)
    q_inter = qc.astype(_F32)
  else:
    A = jnp.cumsum(a.reshape((B, nc, C) + a.shape[2:]), axis=2)  # [B,n,C,K,Gs]
    A_t = jnp.moveaxis(A, 2, -1)                                # [B,n,K,Gs,C]
    decay = _masked_exp(A_t[..., :, None] - A_t[..., None, :], causal)  # [B,n,K,Gs,C,C]
    o = _einsum('bnksqij,bnjkv->bniksqv', _like_v(s * decay[:, :, :, :, None], v), vc)
    # inter-chunk: state at each chunk start from a scan over decayed chunk summaries
    A_last = A[:, :, -1]                                        # [B,n,K,Gs]
    kdec = jnp.exp(A_last[:, :, None] - A)                      # [B,n,C,K,Gs]
    kv = _einsum('bnjks,bnjkf,bnjkv->nbksfv', kdec, kc.astype(_F32), vc.astype(_F32))
    g = jnp.moveaxis(jnp.exp(A_last), 1, 0)                     # [n,B,K,Gs]

    def step(S, x):
      g_c, kv_c = x
      return g_c[..., None, None] * S + kv_c, S

    new_state, S_prev = jax.lax.scan(step, state, (g, kv))     # S_prev [n,B,K,Gs,F,V]
    q_inter = qc.astype(_F32) * jnp.exp(A)[..., None, None]     # [B,n,C,K,Gs,Gq,F]
  o = o + _einsum('bniksqf,nbksfv->bniksqv', q_inter, S_prev)
  o = o.reshape((B, nc * C) + o.shape[3:])[:, :T]
  return o, new_state


def _causal_core(q, k, v, a, state, *, form, chunk_size):
  if form == 'quadratic':
    return _core_quadratic(q, k, v, a, state)
  if form == 'recurrent':
    return _core_recurrent(q, k, v, a, state)
  return _core_chunked(q, k, v, a, state, chunk_size)


def _group_q(q, K, Gs):
  B, T, N, F = q.shape
  G = N // K
  return q.reshape(B, T, K, Gs, G // Gs, F)


def _ungroup(o):
  B, T = o.shape[:2]
  return o.reshape(B, T, -1, o.shape[-1])


def _kernel_core(q, k, v, log_decay_N, state, *, chunk_size, implementation):
  """Pallas chunk kernel for the stateless core; state terms are added here in XLA.

  q [B,T,N,F], k [B,T,K,F], v [B,T,K,V], log_decay_N [N] float32, state [B,N,F,V] float32.
  """
  if implementation == 'pallas_tpu':
    from attnjax.kernels.tpu import linear as kmod
  else:
    from attnjax.kernels.gpu import linear as kmod
  B, T, N, F = q.shape
  K = k.shape[2]
  G = N // K
  o = kmod.lightning_attention(q, k, v, log_decay_N, chunk_size=chunk_size).astype(_F32)
  pos = jnp.arange(1, T + 1, dtype=_F32)
  A = pos[:, None] * log_decay_N[None, :]                        # [T, N] cumulative log-decay
  o = o + _einsum('btnf,bnfv->btnv', q.astype(_F32) * jnp.exp(A)[None, :, :, None], state)
  kdec = jnp.exp(A[-1][None, :] - A).reshape(T, K, G)            # [T, K, G]
  kv = _einsum('tkg,btkf,btkv->bkgfv', kdec, k.astype(_F32), v.astype(_F32))
  new_state = jnp.exp(A[-1])[None, :, None, None] * state + kv.reshape(B, N, F, -1)
  return o, new_state


def _linear_state(state, B, K, F, Hv):
  if state is None:
    return jnp.zeros((B, K, F, Hv), _F32), jnp.zeros((B, K, F), _F32)
  if not isinstance(state, (tuple, list)) or len(state) != 2:
    raise ValueError('state of linear_attention must be a pair (S [B, K, F, Hv], z [B, K, F])')
  return (_check_state_array(state[0], (B, K, F, Hv), 'state[0] (S)'),
          _check_state_array(state[1], (B, K, F), 'state[1] (z)'))


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


def _with_ones(v, normalize):
  """``v`` with a column of ones appended when normalising: the denominator rides along as
  value column ``Hv`` (and ``z`` as column ``Hv`` of the state)."""
  return jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1) if normalize else v


def _pack(S, z):
  return jnp.concatenate([S, z[..., None]], axis=-1)


def _unpack(st, Hv):
  return st[..., :Hv], st[..., Hv]


def _normalized(o, Hv, eps, normalize):
  return _safe_div(o[..., :Hv], o[..., Hv:], eps) if normalize else o


def _feature_maps(phi, q, k):
  qf = _apply_feature_map(phi, q, 'q')
  kf = _apply_feature_map(phi, k, 'k')
  if kf.shape[-1] != qf.shape[-1]:
    raise ValueError(f'feature_map gave F={qf.shape[-1]} for q but {kf.shape[-1]} for k')
  return qf, kf


def _causal_kv_core(qf, kf, v, st, *, form, chunk_size, implementation):
  """Undecayed causal core with one state per kv head.

  qf [B,T,N,F], kf [B,T,K,F], v [B,T,K,V], st [B,K,F,V] -> (o [B,T,N,V] f32, st [B,K,F,V]).
  """
  B, T, N, F = qf.shape
  K, V = kf.shape[2], v.shape[-1]
  G = N // K
  if implementation != 'xla':
    o, new_st = _kernel_core(qf, kf, v, jnp.zeros((N,), _F32), jnp.repeat(st, G, axis=1),
                             chunk_size=chunk_size, implementation=implementation)
    # With no decay the G per-query-head copies of a kv head's state are identical.
    return o, new_st.reshape(B, K, G, F, V)[:, :, 0]
  o, new_st = _causal_core(_group_q(qf, K, 1), kf, v, None, st[:, :, None], form=form,
                           chunk_size=chunk_size)
  return _ungroup(o), new_st[:, :, 0]


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


# --------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------


def linear_attention(q, k, v, *, feature_map: FeatureMap = 'elu+1', causal: bool = False,
                     form: str = 'chunked', chunk_size: int = 64, state=None,
                     return_state: bool = False, normalize: bool = True,
                     eps: float = DEFAULT_EPS, implementation: str | None = 'xla',
                     block_len: int | None = DEFAULT_BLOCK_LEN):
  """Kernelized linear attention.

  "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention".

  ``o_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)`` over allowed ``j``
  (``j <= i`` when ``causal``). No ``1/sqrt(H)`` scale (it cancels in the ratio). With
  ``normalize=False`` the numerator alone is returned. The denominator is guarded:
  ``den + eps`` (``den - eps`` if ``den < 0``), so a row whose weights are all zero (e.g.
  ``'relu'`` with a negative query) returns 0 with zero gradients.

  Args:
    q: ``[B, T, N, H]``. k: ``[B, S, K, H]``. v: ``[B, S, K, Hv]``; ``N % K == 0``.
    feature_map: ``'elu+1'``, ``'relu'``, ``'identity'`` or a callable ``[..., H] -> [..., F]``
      applied (in float32) to queries and keys.
    causal: ``j <= i`` (needs ``S == T``).
    form: ``'chunked'`` | ``'recurrent'`` (causal only) | ``'quadratic'``.
    chunk_size: chunk length of the chunked form (any ``T`` is accepted).
    state: causal only; the pair ``(S [B, K, F, Hv], z [B, K, F])`` float32 -- one state per
      **kv head**: ``S = sum_j phi(k_j) v_j^T``, ``z = sum_j phi(k_j)`` over past tokens.
    return_state: causal only; also return the state after the last token.
    normalize: divide by the denominator (default True).
    eps: denominator guard (default 1e-6).
    implementation: ``'xla'`` or, for the causal chunked form, ``'pallas_tpu'`` /
      ``'pallas_gpu'`` (Pallas chunk kernel; interpret mode on CPU).
    block_len: causal chunked XLA form: sequences longer than ``block_len`` tokens are
      processed block by block (a ``lax.scan`` over blocks carrying the state, each block
      rematerialised in the backward pass), which bounds the working memory; ``None``
      processes the whole sequence at once. Same result either way.

  Returns:
    ``[B, T, N, Hv]`` in ``v.dtype``, or ``(out, (S, z))`` with ``return_state``.
  """
  phi = _resolve_feature_map(feature_map)
  B, T, N, H, S_len, K, Hv = _check_qkv(q, k, v, causal=causal)
  _check_form(form, causal)
  chunk_size = _check_chunk_size(chunk_size)
  eps = _check_eps(eps)
  implementation = _check_implementation(implementation, form)
  block_len = _check_block_len(block_len)
  if not causal and (state is not None or return_state):
    raise ValueError('state and return_state need causal=True')
  if not causal and implementation != 'xla':
    raise ValueError(f'implementation={implementation!r} serves causal=True only')
  if causal and _use_blocks(form, implementation, block_len, T):
    step = lambda st, *x: linear_attention(
        *x, feature_map=feature_map, causal=True, chunk_size=chunk_size, state=st,
        return_state=True, normalize=normalize, eps=eps, block_len=None)
    st0 = _linear_state(state, B, K, _feature_dim(phi, H), Hv)
    o, st = _in_blocks(step, st0, (q, k, v), block_len=block_len)
    return (o, st) if return_state else o
  qf, kf = _feature_maps(phi, q, k)
  F = qf.shape[-1]
  G = N // K
  v_aug = _with_ones(v, normalize)

  if not causal:
    qg = qf.reshape(B, T, K, G, F)
    if form == 'quadratic':
      s = _einsum('btkgf,bskf->bkgts', qg, kf)
      o = _einsum('bkgts,bskv->btkgv', s, v_aug.astype(_F32))
    else:
      kv = _einsum('bskf,bskv->bkfv', kf, v_aug)
      o = _einsum('btkgf,bkfv->btkgv', qg, kv)
    return _normalized(_ungroup(o), Hv, eps, normalize).astype(v.dtype)

  S0, z0 = _linear_state(state, B, K, F, Hv)
  o, new_st = _causal_kv_core(qf, kf, v_aug, _pack(S0, z0) if normalize else S0, form=form,
                              chunk_size=chunk_size, implementation=implementation)
  o = _normalized(o, Hv, eps, normalize).astype(v.dtype)
  if not return_state:
    return o
  if normalize:
    return o, _unpack(new_st, Hv)
  return o, (new_st, z0 + jnp.sum(kf.astype(_F32), axis=1))


def decayed_linear_attention(q, k, v, *, decay=None, log_decay=None,
                             feature_map: FeatureMap = 'identity', normalize: bool = False,
                             form: str = 'chunked', chunk_size: int = 64, state=None,
                             return_state: bool = False, eps: float = DEFAULT_EPS,
                             implementation: str | None = 'xla',
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
    implementation: ``'xla'``; ``'pallas_tpu'`` / ``'pallas_gpu'`` serve the chunked form
      with a constant decay (no ``log_decay``), raising ``NotImplementedError`` otherwise.
    block_len: as in :func:`linear_attention`.

  Returns:
    ``[B, T, N, Hv]`` in ``v.dtype``, or ``(out, state)`` with ``return_state``.
  """
  phi = _resolve_feature_map(feature_map)
  B, T, N, H, _, K, Hv = _check_qkv(q, k, v, causal=True)
  _check_form(form, True)
  chunk_size = _check_chunk_size(chunk_size)
  eps = _check_eps(eps)
  implementation = _check_implementation(implementation, form)
  block_len = _check_block_len(block_len)
  G = N // K
  ld_const = None if decay is None else _check_decay(decay, N)
  ld_tok = None if log_decay is None else _check_log_decay(log_decay, B, T, N)
  if implementation != 'xla' and ld_tok is not None:
    raise NotImplementedError(
        f'implementation={implementation!r} supports a constant per-head decay only, '
        'not a per-token log_decay')
  if _use_blocks(form, implementation, block_len, T):
    step = lambda st, q_, k_, v_, ld_: decayed_linear_attention(
        q_, k_, v_, decay=decay, log_decay=ld_, feature_map=feature_map, normalize=normalize,
        chunk_size=chunk_size, state=st, return_state=True, eps=eps, block_len=None)
    st0 = _decayed_state(state, B, N, _feature_dim(phi, H), Hv, normalize)
    o, st = _in_blocks(step, st0, (q, k, v, ld_tok), block_len=block_len)
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
                        implementation: str | None = 'xla',
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
    implementation: ``'xla'`` | ``'pallas_tpu'`` | ``'pallas_gpu'`` (chunked form only).
    block_len: as in :func:`linear_attention`.

  Returns:
    ``[B, T, N, Hv]`` in ``v.dtype``, or ``(out, state)`` with ``return_state``.
  """
  return decayed_linear_attention(q, k, v, decay=decay, feature_map='identity',
                                  normalize=False, form=form, chunk_size=chunk_size,
                                  state=state, return_state=return_state,
                                  implementation=implementation, block_len=block_len)


# --------------------------------------------------------------------------------------
# Efficient Attention (Shen et al.)
# --------------------------------------------------------------------------------------


def efficient_attention(q, k, v, *, form: str = 'chunked'):
  """Efficient Attention: softmax-normalised factorised attention, non-causal.

  "Efficient Attention: Attention with Linear Complexities" (Shen et al.).

  ``E = rho_q(Q) (rho_k(K)^T V)`` with ``rho_q`` the softmax of each query over its ``H``
  features and ``rho_k`` the softmax of each key feature over the ``S`` positions. Each
  output row is a convex combination of values (weights sum to 1).

  Args:
    q: ``[B, T, N, H]``. k: ``[B, S, K, H]``. v: ``[B, S, K, Hv]``.
    form: ``'chunked'`` (``O((T + S) H Hv)``, the factorised path) or ``'quadratic'``
      (``[T, S]`` weights materialised, for tests).

  Returns:
    ``[B, T, N, Hv]`` in ``v.dtype``.
  """
  B, T, N, H, S, K, Hv = _check_qkv(q, k, v, causal=False)
  _check_form(form, False)
  G = N // K
  rq = jax.nn.softmax(q.astype(_F32), axis=-1).reshape(B, T, K, G, H)
  rk = jax.nn.softmax(k.astype(_F32), axis=1)
  if form == 'quadratic':
    w = _einsum('btkgh,bskh->bkgts', rq, rk)
    o = _einsum('bkgts,bskv->btkgv', w, v.astype(_F32))
  else:
    ctx = _einsum('bskh,bskv->bkhv', rk, v.astype(_F32))
    o = _einsum('btkgh,bkhv->btkgv', rq, ctx)
  return _ungroup(o).astype(v.dtype)


# --------------------------------------------------------------------------------------
# Focused Linear Attention (FLatten)
# --------------------------------------------------------------------------------------


def _safe_norm(x):
  ss = jnp.sum(x * x, axis=-1, keepdims=True)
  pos = ss > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, ss, 1.0)), 0.0)


def focused_feature_map(x, focusing_factor: float = 3.0):
  """FLatten's focused map ``phi_p(x) = f_p(ReLU(x))``, ``f_p(y) = (|y| / |y^p|) y^p``.

  ``y^p`` is elementwise; norms are over the last (feature) axis; a zero vector maps to 0.
  "FLatten Transformer: Vision Transformer using Focused Linear Attention".
  """
  y = jax.nn.relu(x.astype(_F32))
  yp = y ** focusing_factor
  ny, nyp = _safe_norm(y), _safe_norm(yp)
  pos = nyp > 0
  return yp * jnp.where(pos, ny / jnp.where(pos, nyp, 1.0), 0.0)


def depthwise_conv(v, kernel, *, bias=None, spatial_shape=None, causal: bool = False):
  """Depthwise convolution of values over tokens (FLatten's rank-restoring DWC).

  Args:
    v: ``[B, T, K, Hv]``.
    kernel: ``[w, Hv]`` (1-D over the sequence) or ``[kh, kw, Hv]`` (2-D over a
      ``spatial_shape=(Hh, Ww)`` row-major grid, ``Hh * Ww == T``); shared by the heads.
      Odd window sizes ('SAME' padding); with ``causal`` (1-D only) the window looks back
      ``w - 1`` tokens and any ``w`` is accepted.
    bias: ``None`` or ``[Hv]``.

  Returns:
    ``[B, T, K, Hv]`` float32.
  """
  B, T, K, Hv = v.shape
  kernel = jnp.asarray(kernel)
  nd = 1 if spatial_shape is None else len(spatial_shape)
  if kernel.ndim != nd + 1 or kernel.shape[-1] != Hv:
    raise ValueError(f'dwc_kernel must have shape [*window ({nd} dims), Hv={Hv}], got {kernel.shape}')
  if bias is not None and jnp.shape(bias) != (Hv,):
    raise ValueError(f'dwc_bias must have shape ({Hv},), got {jnp.shape(bias)}')
  if spatial_shape is not None:
    if causal:
      raise ValueError('a causal depthwise convolution needs spatial_shape=None (1-D)')
    if len(spatial_shape) != 2 or int(np.prod(spatial_shape)) != T:
      raise ValueError(f'spatial_shape must be (Hh, Ww) with Hh * Ww == T={T}, got {spatial_shape}')
  window = kernel.shape[:-1]
  if not causal and any(w % 2 == 0 for w in window):
    raise ValueError(f'dwc_kernel window must be odd (SAME padding), got {window}')
  grid = (T,) if spatial_shape is None else tuple(spatial_shape)
  x = jnp.moveaxis(v.astype(_F32), 2, 1).reshape((B * K,) + grid + (Hv,))
  if causal:
    padding = [(window[0] - 1, 0)]
  else:
    padding = [(w // 2, w // 2) for w in window]
  spatial = 'HW'[:nd] if nd <= 2 else None
  dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape[:-1] + (1, Hv),
                                      ('N' + spatial + 'C', spatial + 'IO', 'N' + spatial + 'C'))
  y = jax.lax.conv_general_dilated(
      x, kernel.astype(_F32).reshape(window + (1, Hv)), window_strides=(1,) * nd,
      padding=padding, dimension_numbers=dn, feature_group_count=Hv,
      precision=jax.lax.Precision.HIGHEST)
  if bias is not None:
    y = y + jnp.asarray(bias, _F32)
  return jnp.moveaxis(y.reshape(B, K, T, Hv), 1, 2)


def focused_linear_attention(q, k, v, *, focusing_factor: float = 3.0, causal: bool = False,
                             form: str = 'chunked', chunk_size: int = 64, state=None,
                             return_state: bool = False, dwc_kernel=None, dwc_bias=None,
                             spatial_shape=None, eps: float = DEFAULT_EPS,
                             implementation: str | None = 'xla',
                             block_len: int | None = DEFAULT_BLOCK_LEN):
  """Focused Linear Attention (FLatten).

  "FLatten Transformer: Vision Transformer using Focused Linear Attention".

  ``O = phi_p(Q) (phi_p(K)^T V) / (phi_p(Q) sum_j phi_p(K_j)) + DWC(V)`` with the focused
  map of :func:`focused_feature_map` (``p = focusing_factor``) and an optional depthwise
  convolution of the values (see :func:`depthwise_conv`; the conv output of kv head ``k`` is
  added to its ``N // K`` query heads). Causal: prefix sums (three forms, as
  :func:`linear_attention`) and a causal 1-D conv.

  Args:
    q, k, v: BTNH (``S == T`` when causal or when ``dwc_kernel`` is given).
    focusing_factor: ``p >= 1``.
    causal, form, chunk_size, state, return_state, eps, implementation, block_len: as in
      :func:`linear_attention` (state: ``(S [B, K, H, Hv], z [B, K, H])``). The DWC term is
      stateless, so ``dwc_kernel`` cannot be combined with ``state``/``return_state``.
    dwc_kernel: ``None``, ``[w, Hv]`` or ``[kh, kw, Hv]``. dwc_bias: ``None`` or ``[Hv]``.
    spatial_shape: ``None`` (1-D) or ``(Hh, Ww)`` for the 2-D conv.

  Returns:
    ``[B, T, N, Hv]`` in ``v.dtype`` (or ``(out, state)``).
  """
  if isinstance(focusing_factor, bool) or not isinstance(focusing_factor, (int, float)) \
      or not focusing_factor >= 1:
    raise ValueError(f'focusing_factor must be a number >= 1, got {focusing_factor!r}')
  B, T, N, H, S, K, Hv = _check_qkv(q, k, v, causal=causal)
  if dwc_kernel is not None:
    if S != T:
      raise ValueError(f'dwc_kernel needs S == T={T}, got S={S}')
    if state is not None or return_state:
      raise ValueError('dwc_kernel cannot be combined with state/return_state (the DWC term '
                       'is stateless)')
  phi = functools.partial(focused_feature_map, focusing_factor=float(focusing_factor))
  out = linear_attention(q, k, v, feature_map=phi, causal=causal, form=form,
                         chunk_size=chunk_size, state=state, return_state=return_state,
                         normalize=True, eps=eps, implementation=implementation,
                         block_len=block_len)
  if dwc_kernel is None:
    return out
  conv = depthwise_conv(v, dwc_kernel, bias=dwc_bias, spatial_shape=spatial_shape,
                        causal=causal)
  conv = jnp.repeat(conv, N // K, axis=2)
  return (out.astype(_F32) + conv).astype(v.dtype)


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


def inline_attention(q, k, v, *, feature_map: FeatureMap = 'identity', causal: bool = False,
                     form: str = 'chunked', chunk_size: int = 64, state=None,
                     return_state: bool = False, implementation: str | None = 'xla',
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
  phi = _resolve_feature_map(feature_map)
  B, T, N, H, S, K, Hv = _check_qkv(q, k, v, causal=causal)
  _check_form(form, causal)
  chunk_size = _check_chunk_size(chunk_size)
  implementation = _check_implementation(implementation, form)
  block_len = _check_block_len(block_len)
  if not causal and (state is not None or return_state):
    raise ValueError('state and return_state need causal=True')
  if not causal and implementation != 'xla':
    raise ValueError(f'implementation={implementation!r} serves causal=True only')
  if causal and _use_blocks(form, implementation, block_len, T):
    step = lambda st, *x: inline_attention(
        *x, feature_map=feature_map, causal=True, chunk_size=chunk_size, state=st,
        return_state=True, block_len=None)
    st0 = _inline_state(state, B, K, _feature_dim(phi, H), Hv)
    o, st = _in_blocks(step, st0, (q, k, v), block_len=block_len)
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


# --------------------------------------------------------------------------------------
# Flow-Attention (Flowformer)
# --------------------------------------------------------------------------------------


def _prefix_sum(x, chunk_size):
  """Inclusive prefix sums of ``x [B, T, ...]`` over axis 1, float32, in O(T * chunk_size):
  inside a chunk a lower-triangular (masked) sum, across chunks a ``lax.scan`` of totals."""
  B, T = x.shape[:2]
  C = min(chunk_size, T)
  nc = -(-T // C)
  xc = jnp.pad(x.astype(_F32), [(0, 0), (0, nc * C - T)] + [(0, 0)] * (x.ndim - 2))
  xc = xc.reshape(B, nc, C, -1)
  within = jnp.einsum('ij,bnjd->bnid', jnp.tril(jnp.ones((C, C), _F32)), xc,
                      precision=jax.lax.Precision.HIGHEST)
  _, before = jax.lax.scan(lambda tot, t: (tot + t, tot), jnp.zeros((B, xc.shape[-1]), _F32),
                           jnp.moveaxis(jnp.sum(xc, axis=2), 1, 0))
  out = within + jnp.moveaxis(before, 0, 1)[:, :, None]
  return out.reshape((B, nc * C) + x.shape[2:])[:, :T]


def _causal_product(q, k, w, kv0, chunk_size):
  """``o_i = q_i . (kv0 + sum_{j<=i} k_j w_j^T)`` chunked; per-query-head values ``w``.

  q ``[B,T,K,G,F]``, k ``[B,T,K,F]``, w ``[B,T,K,G,V]``, kv0 ``[B,K,G,F,V]`` ->
  (o ``[B,T,K,G,V]`` f32, kv ``[B,K,G,F,V]``).
  """
  B, T = q.shape[:2]
  C = min(chunk_size, T)
  nc = -(-T // C)

  def chunks(x):
    x = jnp.pad(x, [(0, 0), (0, nc * C - T)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape((B, nc, C) + x.shape[2:])
  qc, kc, wc = chunks(q), chunks(k), chunks(w)
  s = jnp.where(jnp.tril(jnp.ones((C, C), bool)), _einsum('bnikgf,bnjkf->bnkgij', qc, kc), 0.0)
  o = _einsum('bnkgij,bnjkgv->bnikgv', s, wc)
  kv = _einsum('bnjkf,bnjkgv->nbkgfv', kc, wc)
  kv_end, kv_before = jax.lax.scan(lambda acc, x: (acc + x, acc), kv0, kv)
  o = o + _einsum('bnikgf,nbkgfv->bnikgv', qc, kv_before)
  return o.reshape((B, nc * C) + o.shape[3:])[:, :T], kv_end


def _flow_state(state, B, N, K, H, Hv):
  names = ('ksum [B, K, H]', 'qsum [B, N, H]', 'kosum [B, N, H]', 'qisum [B, N, H]',
           'esum [B, N]', 'kv [B, N, H, Hv]', 'count [B]')
  shapes = ((B, K, H), (B, N, H), (B, N, H), (B, N, H), (B, N), (B, N, H, Hv), (B,))
  if state is None:
    return tuple(jnp.zeros(sh, _F32) for sh in shapes)
  if not isinstance(state, (tuple, list)) or len(state) != 7:
    raise ValueError(f'state of causal flow_attention must be a 7-tuple ({", ".join(names)})')
  return tuple(_check_state_array(x, sh, f'state[{i}] ({n.split()[0]})')
               for i, (x, sh, n) in enumerate(zip(state, shapes, names)))


def _flow_causal(q, k, v, state, *, form, chunk_size, eps, clamp):
  """Causal Flow-Attention on BTNH inputs; see :func:`flow_attention` for the formula."""
  B, T, N, H = q.shape
  K, Hv = k.shape[2], v.shape[-1]
  G = N // K
  ksum0, qsum0, kosum0, qisum0, esum0, kv0, n0 = state
  Q = jax.nn.sigmoid(q.astype(_F32)).reshape(B, T, K, G, H)
  Kf = jax.nn.sigmoid(k.astype(_F32))                                   # [B, T, K, H]
  v32 = v.astype(_F32)
  pos = n0[:, None] + jnp.arange(1, T + 1, dtype=_F32)[None]            # [B, T] global index
  pos_g = pos[:, :, None, None]
  g = lambda x: x.reshape(x.shape[:1] + (K, G) + x.shape[2:])           # [B, N, ...] -> grouped
  ug = lambda x: x.reshape(x.shape[:1] + (N,) + x.shape[3:])            # grouped -> [B, N, ...]

  if form == 'recurrent':
    def step(carry, x):
      ksum, qsum, kosum, qisum, esum, kv = carry
      q_t, k_t, v_t, p = x                                              # p [B]
      pk = p[:, None, None]
      ksum = ksum + k_t
      qsum = qsum + q_t
      inc = jnp.sum((q_t + eps) * (ksum[:, :, None] + eps), -1)         # [B, K, G]
      out = jnp.sum((k_t[:, :, None] + eps) * (qsum + eps), -1)
      kosum = kosum + k_t[:, :, None] * (pk / out)[..., None]
      qisum = qisum + q_t * (pk / inc)[..., None]
      inc_c = jnp.sum((q_t + eps) * (kosum + eps), -1) / pk
      out_c = jnp.clip(jnp.sum((k_t[:, :, None] + eps) * (qisum + eps), -1) / pk, -clamp, clamp)
      e = jnp.exp(out_c)
      esum = esum + e
      comp = pk * e / esum
      kv = kv + _einsum('bkf,bkgv->bkgfv', k_t, comp[..., None] * v_t[:, :, None])
      o_t = (jax.nn.sigmoid(inc_c) / inc)[..., None] * _einsum('bkgf,bkgfv->bkgv', q_t, kv)
      return (ksum, qsum, kosum, qisum, esum, kv), o_t

    carry0 = (ksum0, g(qsum0), g(kosum0), g(qisum0), g(esum0), g(kv0))
    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (Q, Kf, v32, pos))
    (ksum, qsum, kosum, qisum, esum, kv), o = jax.lax.scan(step, carry0, xs)
    o = jnp.moveaxis(o, 0, 1)
  else:
    if form == 'quadratic':
      tril = jnp.tril(jnp.ones((T, T), _F32))
      prefix = lambda x: jnp.einsum('tj,bj...->bt...', tril, x.astype(_F32),
                                    precision=jax.lax.Precision.HIGHEST)
    else:
      prefix = lambda x: _prefix_sum(x, chunk_size)
    ksum_t = ksum0[:, None] + prefix(Kf)                                # [B, T, K, H]
    qsum_t = g(qsum0)[:, None] + prefix(Q)                              # [B, T, K, G, H]
    inc = jnp.sum((Q + eps) * (ksum_t[:, :, :, None] + eps), -1)        # [B, T, K, G]
    out = jnp.sum((Kf[:, :, :, None] + eps) * (qsum_t + eps), -1)
    kosum_t = g(kosum0)[:, None] + prefix(Kf[:, :, :, None] * (pos_g / out)[..., None])
    qisum_t = g(qisum0)[:, None] + prefix(Q * (pos_g / inc)[..., None])
    inc_c = jnp.sum((Q + eps) * (kosum_t + eps), -1) / pos_g
    out_c = jnp.clip(jnp.sum((Kf[:, :, :, None] + eps) * (qisum_t + eps), -1) / pos_g,
                     -clamp, clamp)
    e = jnp.exp(out_c)
    esum_t = g(esum0)[:, None] + prefix(e)
    w = (pos_g * e / esum_t)[..., None] * v32[:, :, :, None]           # competition: [B,T,K,G,Hv]
    if form == 'quadratic':
      m = jnp.where(tril > 0, _einsum('btkgf,bjkf->bkgtj', Q, Kf), 0.0)  # the causal flow matrix
      o = _einsum('bkgtj,bjkgv->btkgv', m, w) + _einsum('btkgf,bkgfv->btkgv', Q, g(kv0))
      kv = g(kv0) + _einsum('btkf,btkgv->bkgfv', Kf, w)
    else:
      o, kv = _causal_product(Q, Kf, w, g(kv0), chunk_size)
    o = (jax.nn.sigmoid(inc_c) / inc)[..., None] * o
    ksum, qsum, kosum, qisum, esum = (ksum_t[:, -1], qsum_t[:, -1], kosum_t[:, -1],
                                      qisum_t[:, -1], esum_t[:, -1])
  new_state = (ksum, ug(qsum), ug(kosum), ug(qisum), ug(esum), ug(kv), n0 + T)
  return _ungroup(o), new_state


def flow_attention(q, k, v, *, causal: bool = False, form: str = 'chunked',
                   chunk_size: int = 64, state=None, return_state: bool = False,
                   eps: float = DEFAULT_EPS, clamp: float = 1.0,
                   block_len: int | None = DEFAULT_BLOCK_LEN):
  """Flow-Attention: attention normalised by flow conservation, non-causal or causal.

  "Flowformer: Linearizing Transformers with Conservation Flows".

  With ``phi = sigmoid``, ``Q_i = phi(q_i)``, ``K_j = phi(k_j)`` and the flow matrix
  ``M_ij = Q_i . K_j`` (never materialised in the chunked form), per query head:

  Non-causal (``causal=False``): incoming ``I_i = sum_j M_ij + eps``; outgoing
  ``O_j = sum_i M_ij + eps``; conserved incoming ``Ic_i = sum_j M_ij / O_j``; conserved
  outgoing ``Oc_j = sum_i M_ij / I_i``; competition ``Vc = softmax_j(Oc) * S * V``;
  aggregation ``R_i = sum_j M_ij Vc_j / I_i``; allocation ``out_i = R_i * sigmoid(Ic_i * T / S)``.

  Causal (``causal=True``, the paper's causal version; every sum over the past is a prefix
  sum, and the "number of sources/sinks" of a position is its 1-based index ``p``, counted
  from the start of the sequence including tokens carried in ``state``). With
  ``x + eps`` adding ``eps`` to every feature:

  - incoming ``I_i = (Q_i + eps) . (sum_{j<=i} K_j + eps)``,
    outgoing ``O_j = (K_j + eps) . (sum_{i<=j} Q_i + eps)``;
  - conserved incoming ``Ic_i = (Q_i + eps) . (sum_{j<=i} K_j p_j / O_j + eps) / p_i``,
    conserved outgoing ``Oc_j = clip((K_j + eps) . (sum_{i<=j} Q_i p_i / I_i + eps) / p_j,
    -clamp, clamp)``;
  - competition (a causal softmax over the prefix, times the count):
    ``c_j = p_j exp(Oc_j) / sum_{l<=j} exp(Oc_l)``;
  - aggregation and allocation: ``out_i = sigmoid(Ic_i) / I_i * sum_{j<=i} M_ij c_j V_j``.

  Args:
    q: ``[B, T, N, H]``. k: ``[B, S, K, H]``. v: ``[B, S, K, Hv]`` (``S == T`` when causal).
    causal: the causal version above.
    form: ``'chunked'`` (linear cost: chunked prefix sums and a chunked causal product),
      ``'recurrent'`` (causal only: a scan over tokens) or ``'quadratic'`` (``M`` and the
      prefix sums materialised as ``[T, T]`` products, for tests).
    chunk_size: chunk length of the causal chunked form.
    state: causal only; the 7-tuple ``(ksum [B, K, H], qsum [B, N, H], kosum [B, N, H],
      qisum [B, N, H], esum [B, N], kv [B, N, H, Hv], count [B])`` of float32 prefix sums
      over past tokens (``sum K``, ``sum Q``, ``sum K p / O``, ``sum Q p / I``,
      ``sum exp(Oc)``, ``sum K (c V)^T``, number of past tokens).
    return_state: causal only; also return the state after the last token.
    eps: added to the flows (non-causal) or to the feature vectors (causal); default 1e-6.
    clamp: causal only; bound on ``|Oc|`` before the exponential (default 1.0).
    block_len: as in :func:`linear_attention` (causal chunked form).

  Returns:
    ``[B, T, N, Hv]`` in ``v.dtype``, or ``(out, state)`` with ``return_state``.
  """
  B, T, N, H, S, K, Hv = _check_qkv(q, k, v, causal=causal)
  _check_form(form, causal)
  eps = _check_eps(eps)
  chunk_size = _check_chunk_size(chunk_size)
  block_len = _check_block_len(block_len)
  if not causal and (state is not None or return_state):
    raise ValueError('state and return_state need causal=True')
  if isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or not clamp > 0:
    raise ValueError(f'clamp must be a positive float, got {clamp!r}')
  G = N // K
  if causal:
    st0 = _flow_state(state, B, N, K, H, Hv)
    if _use_blocks(form, 'xla', block_len, T):
      step = lambda st, *x: flow_attention(
          *x, causal=True, chunk_size=chunk_size, state=st, return_state=True, eps=eps,
          clamp=clamp, block_len=None)
      o, st = _in_blocks(step, st0, (q, k, v), block_len=block_len)
    else:
      o, st = _flow_causal(q, k, v, st0, form=form, chunk_size=chunk_size, eps=eps,
                           clamp=float(clamp))
    o = o.astype(v.dtype)
    return (o, st) if return_state else o
  qs = jax.nn.sigmoid(q.astype(_F32)).reshape(B, T, K, G, H)
  ks = jax.nn.sigmoid(k.astype(_F32))
  v32 = v.astype(_F32)
  if form == 'quadratic':
    m = _einsum('btkgh,bskh->bkgts', qs, ks)
    inc = jnp.sum(m, axis=-1) + eps                                     # [B,K,G,T]
    out = jnp.sum(m, axis=-2) + eps                                     # [B,K,G,S]
    inc_c = jnp.sum(m / out[..., None, :], axis=-1)
    out_c = jnp.sum(m / inc[..., :, None], axis=-2)
    comp = jax.nn.softmax(out_c, axis=-1) * S                           # [B,K,G,S]
    r = _einsum('bkgts,bskv->bkgtv', m * comp[..., None, :], v32) / inc[..., None]
    o = r * jax.nn.sigmoid(inc_c * (T / S))[..., None]
    o = jnp.moveaxis(o, 3, 1)                                           # [B,T,K,G,Hv]
  else:
    sum_k = jnp.sum(ks, axis=1)                                         # [B,K,H]
    sum_q = jnp.sum(qs, axis=1)                                         # [B,K,G,H]
    inc = _einsum('btkgh,bkh->btkg', qs, sum_k) + eps
    out = _einsum('bskh,bkgh->bskg', ks, sum_q) + eps
    inc_c = _einsum('btkgh,bkgh->btkg', qs, _einsum('bskh,bskg->bkgh', ks, 1.0 / out))
    out_c = _einsum('bskh,bkgh->bskg', ks, _einsum('btkgh,btkg->bkgh', qs, 1.0 / inc))
    comp = jax.nn.softmax(out_c, axis=1) * S                            # [B,S,K,G]
    kv = _einsum('bskh,bskg,bskv->bkghv', ks, comp, v32)
    r = _einsum('btkgh,bkghv->btkgv', qs, kv) / inc[..., None]
    o = r * jax.nn.sigmoid(inc_c * (T / S))[..., None]
  return _ungroup(o).astype(v.dtype)
