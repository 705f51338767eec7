"""Delta-rule linear attention (DeltaNet) and its gated version (Gated DeltaNet).

- :func:`delta_rule_attention` -- "Parallelizing Linear Transformers with the Delta Rule over
  Sequence Length" (Yang et al.): ``S_t = S_{t-1} + beta_t (v_t - S_{t-1} k_t) k_t^T``.
- :func:`gated_delta_rule_attention` -- "Gated Delta Networks: Improving Mamba2 with Delta
  Rule": ``S_t = a_t S_{t-1} + beta_t (v_t - a_t S_{t-1} k_t) k_t^T``, ``a_t =
  exp(log_alpha_t)``.

Both output ``o_t = S_t (scale q_t)`` with the state ``S [Hv, H]`` per query head.

Chunked form (the WY / UT-transform representation). Inside a chunk of ``C`` tokens with
initial state ``S_0``, let ``g`` be the inclusive cumulative log-gate within the chunk,
``Gam_t = exp(g_t)`` and ``D_tj = exp(g_t - g_j)`` (``j <= t``, exponent ``<= 0``). The
updates ``delta_t = beta_t (v_t - a_t S_{t-1} k_t)`` satisfy the unit lower-triangular
system ``M Delta = diag(beta) V - diag(beta Gam) K S_0^T`` with
``M = I + tril(diag(beta) (D * K K^T), -1)``, so (one triangular solve per chunk)

    U = M^{-1} diag(beta) V,   W = M^{-1} diag(beta Gam) K,   Delta = U - W S_0^T,
    O = P U + (diag(Gam) Q - P W) S_0^T,   P = tril(D * Q K^T)   (diagonal included),
    S_C = S_0 (Gam_C I - W^T diag(D_Cj) K) + U^T diag(D_Cj) K.

Everything not involving ``S_0`` is computed for all chunks at once; a ``lax.scan`` over
chunks carries ``S`` (a ``[Hv, H] x [H, H]`` product per chunk). The quadratic form is the
same algebra with one chunk of ``T`` tokens: it materialises the implied attention matrix
``P M^{-1} diag(beta)`` (:func:`delta_implied_attention`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.core import hooks
from attnjax.core.errors import Unsupported
from attnjax.ops.linear._args import _F32, DEFAULT_BLOCK_LEN
from attnjax.ops.linear._core import DELTA_KERNELS
from attnjax.ops.linear.gated import (
  _chunk_len,
  _einsum,
  _masked_exp,
  _pad_t,
  check_beta,
  check_implementation,
  check_log_alpha,
  prepare_gated,
  run_blocks,
  to_heads,
)


def _delta_recurrent(q, k, v, beta, g, S0):
  def step(S, x):
    q_t, k_t, v_t, b_t, g_t = x
    S = jnp.exp(g_t)[..., None, None] * S
    pred = _einsum('bnvh,bnh->bnv', S, k_t)
    S = S + (b_t[..., None] * (v_t - pred))[..., :, None] * k_t[..., None, :]
    return S, _einsum('bnvh,bnh->bnv', S, q_t)

  xs = tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v, beta, g))
  S, o = jax.lax.scan(step, S0, xs)
  return jnp.moveaxis(o, 0, 2), S


_INV_BLOCK = 16  # diagonal block size of :func:`unit_lower_inverse`


def _mm(a, b):
  return _einsum('...ij,...jk->...ik', a, b)


def _inverse_blocks(M):
  """``M^{-1}`` of unit lower-triangular ``M [..., C, C]``, ``C = b 2^k`` (``b <= 16``).

  The ``b x b`` diagonal blocks are inverted all at once by the nilpotent doubling
  ``(I - L)^{-1} = (I + L)(I + L^2)(I + L^4)...`` (``L = I - M`` strictly lower, ``L^b =
  0``); then pairs of neighbouring inverses are merged level by level,
  ``[[A, 0], [X, D]]^{-1} = [[A^{-1}, 0], [-D^{-1} X A^{-1}, D^{-1}]]``, every pair of a
  level in one batched product. ``O(C^3)`` work in ``log2(C / b) + log2(b)`` rounds of
  matrix products (XLA:CPU's batched triangular solve is a slow scalar loop).
  """
  C = M.shape[-1]
  lead = M.shape[:-2]
  b = min(C, _INV_BLOCK)
  m = C // b
  eye = jnp.eye(b, dtype=_F32)
  Mb = M.reshape(lead + (m, b, m, b))
  D = jnp.moveaxis(jnp.diagonal(Mb, axis1=-4, axis2=-2), -1, -3)         # [..., m, b, b]
  P = eye - D
  X = eye + P
  s = 2
  while s < b:
    P = _mm(P, P)
    X = X + _mm(X, P)
    s *= 2
  s = b
  while m > 1:
    m //= 2
    Ms = M.reshape(lead + (m, 2, s, m, 2, s))
    off = jnp.moveaxis(jnp.diagonal(Ms, axis1=-6, axis2=-3), -1, -5)     # [..,m,2,s,2,s]
    off = off[..., 1, :, 0, :]                                           # [..., m, s, s]
    X = X.reshape(lead + (m, 2, s, s))
    A, Dn = X[..., 0, :, :], X[..., 1, :, :]
    low = -_mm(_mm(Dn, off), A)
    top = jnp.concatenate([A, jnp.zeros_like(A)], axis=-1)
    bot = jnp.concatenate([low, Dn], axis=-1)
    X = jnp.concatenate([top, bot], axis=-2)                             # [..., m, 2s, 2s]
    s *= 2
  return X.reshape(lead + (C, C))


@jax.custom_vjp
def unit_lower_inverse(M):
  """The inverse of a unit lower-triangular ``M [..., C, C]`` (any ``C``; padded with an
  identity block to ``16 * 2^k``), with the gradient ``dM = -tril(Y^T dY Y^T, -1)``
  (``Y = M^{-1}``; only the strictly lower entries of ``M`` are variables)."""
  C = M.shape[-1]
  Cp = C if C <= _INV_BLOCK else _INV_BLOCK << max(0, (-(-C // _INV_BLOCK) - 1).bit_length())
  if Cp == C:
    return _inverse_blocks(M)
  pad = [(0, 0)] * (M.ndim - 2) + [(0, Cp - C), (0, Cp - C)]
  ones_tail = jnp.concatenate([jnp.zeros((C,), _F32), jnp.ones((Cp - C,), _F32)])
  Mp = jnp.pad(M, pad) + jnp.diag(ones_tail)
  return _inverse_blocks(Mp)[..., :C, :C]


def _uli_fwd(M):
  Y = unit_lower_inverse(M)
  return Y, Y


def _uli_bwd(Y, dY):
  C = Y.shape[-1]
  Yt = jnp.swapaxes(Y, -1, -2)
  dM = -_mm(_mm(Yt, dY), Yt)
  return (jnp.where(jnp.tril(jnp.ones((C, C), bool), -1), dM, 0.0),)


unit_lower_inverse.defvjp(_uli_fwd, _uli_bwd)


def _ut_chunks(q, k, v, beta, g):
  """Per-chunk quantities of the UT form; inputs ``[..., C, *]`` (``beta``, ``g``
  ``[..., C]``). Returns ``P [.., C, C]``, ``U [.., C, V]``, ``W [.., C, H]``,
  ``Gam [.., C]`` and ``kdec = diag(D_Cj) K [.., C, H]``."""
  C = q.shape[-2]
  gc = jnp.cumsum(g, axis=-1)
  incl = jnp.tril(jnp.ones((C, C), bool))
  strict = jnp.tril(jnp.ones((C, C), bool), -1)
  diff = gc[..., :, None] - gc[..., None, :]
  D = _masked_exp(diff, incl)
  kk = _einsum('...ih,...jh->...ij', k, k)
  M = jnp.eye(C, dtype=_F32) + jnp.where(strict, beta[..., :, None] * D * kk, 0.0)
  Gam = jnp.exp(gc)
  Minv = unit_lower_inverse(M)
  U = _einsum('...ij,...jv->...iv', Minv, beta[..., None] * v)
  W = _einsum('...ij,...jh->...ih', Minv, (beta * Gam)[..., None] * k)
  P = D * _einsum('...ih,...jh->...ij', q, k)
  kdec = jnp.exp(gc[..., -1:] - gc)[..., None] * k
  return P, U, W, Gam, kdec


def _delta_chunked(q, k, v, beta, g, S0, C):
  """``C``: chunk length (``T`` for the quadratic form). Inputs ``[B, N, T, *]``."""
  B, N, T, H = q.shape
  V = v.shape[-1]
  nc = -(-T // C)
  pad = nc * C - T
  # Padding after the last token: beta = 0 and g = 0 leave the state unchanged.
  q, k, v = (_pad_t(x, pad).reshape(B, N, nc, C, x.shape[-1]) for x in (q, k, v))
  beta, g = (_pad_t(x, pad).reshape(B, N, nc, C) for x in (beta, g))
  P, U, W, Gam, kdec = _ut_chunks(q, k, v, beta, g)
  o_local = _einsum('bnzij,bnzjv->bnziv', P, U)
  q_eff = Gam[..., None] * q - _einsum('bnzij,bnzjh->bnzih', P, W)
  Ukd = jnp.moveaxis(_einsum('bnzjv,bnzjh->bnzvh', U, kdec), 2, 0)        # [n,B,N,V,H]
  trans = (Gam[..., -1, None, None] * jnp.eye(H, dtype=_F32)
           - _einsum('bnzjh,bnzjk->bnzhk', W, kdec))
  trans = jnp.moveaxis(trans, 2, 0)                                       # [n,B,N,H,H]

  def step(S, x):
    tr, ukd = x
    return _einsum('bnvh,bnhk->bnvk', S, tr) + ukd, S

  S, S_prev = jax.lax.scan(step, S0, (trans, Ukd))
  o = o_local + _einsum('bnzih,zbnvh->bnziv', q_eff, S_prev)
  return o.reshape(B, N, nc * C, V)[:, :, :T], S


KERNEL_MIN_CHUNK = 16  # the kernels' chunk: max(16, the chunked form's chunk length)


def _delta_public(q, k, v, beta, log_alpha, *, form, chunk_size, scale, state, return_state,
                  block_len, implementation=None):
  a = prepare_gated(q, k, v, form=form, chunk_size=chunk_size, scale=scale, state=state,
                    block_len=block_len)
  implementation = check_implementation(implementation, form)
  beta = check_beta(beta, (a.B, a.T, a.N))
  if log_alpha is None:
    log_alpha = jnp.zeros((a.B, a.T, a.N), _F32)
  else:
    log_alpha = check_log_alpha(log_alpha, (a.B, a.T, a.N))
  if implementation != 'xla':
    kernel = DELTA_KERNELS.get(implementation)
    if kernel is None:
      raise Unsupported(f'no delta-rule kernel is registered for implementation='
                        f'{implementation!r} (registered: {sorted(DELTA_KERNELS)}); '
                        'attnjax.dispatch registers the Pallas kernels when attnjax is imported')
    o, S = kernel(q, k, v, beta, log_alpha, a.S0, scale=a.scale,
                  chunk_size=max(KERNEL_MIN_CHUNK, _chunk_len(a.T, a.chunk_size)))
  else:
    def step(S, q_, k_, v_, b_, g_):
      qh, kh, vh = to_heads(q_, a.N) * a.scale, to_heads(k_, a.N), to_heads(v_, a.N)
      bh, gh = jnp.moveaxis(b_, 2, 1), jnp.moveaxis(g_, 2, 1)
      if a.form == 'recurrent':
        o, S = _delta_recurrent(qh, kh, vh, bh, gh, S)
      else:
        C = q_.shape[1] if a.form == 'quadratic' else _chunk_len(q_.shape[1], a.chunk_size)
        o, S = _delta_chunked(qh, kh, vh, bh, gh, S, C)
      return jnp.moveaxis(o, 1, 2), S

    blen = a.block_len if a.form == 'chunked' else None
    o, S = run_blocks(step, a.S0, (q, k, v, beta, log_alpha), a.T, blen)
    o = o.astype(v.dtype)
  out = (o, S) if return_state else o
  # attnjax.analysis interception point of every implementation, the Pallas kernels included
  # (a no-op unless observed): the implied weights, and a given state's contribution (the op
  # on zero values), both recomputed by the XLA forms
  return hooks.intercepted('linear', lambda: out, q, k, v, probs=lambda: delta_implied_attention(
      q, k, beta, log_alpha, scale=scale), extras=None if state is None else lambda: {
          'state': _delta_public(q, k, jnp.zeros(v.shape, _F32), beta, log_alpha, form=form,
                                 chunk_size=chunk_size, scale=scale, state=state,
                                 return_state=False, block_len=block_len)})


def delta_rule_attention(q, k, v, beta, *, form: str = 'chunked', chunk_size: int = 64,
                         scale=None, state=None, return_state: bool = False,
                         block_len: int | None = DEFAULT_BLOCK_LEN, implementation=None):
  """DeltaNet: causal linear attention with the delta-rule state update.

  "Parallelizing Linear Transformers with the Delta Rule over Sequence Length".

  ``S_t = S_{t-1} + beta_t (v_t - S_{t-1} k_t) k_t^T`` (``= S_{t-1} (I - beta_t k_t k_t^T)
  + beta_t v_t k_t^T``), ``o_t = S_t (scale q_t)``. No normalisation happens inside the op:
  the DeltaNet layer L2-normalises ``q`` and ``k`` (with unnormalised keys the recurrence
  itself can grow without bound).

  Forms: ``'recurrent'`` (``lax.scan`` over tokens), ``'chunked'`` (WY/UT transform, one
  ``[C, C]`` unit-triangular solve per chunk, ``lax.scan`` over chunks; see the module
  docstring), ``'quadratic'`` (the same algebra over one ``[T, T]`` chunk).

  Args:
    q: ``[B, T, N, H]``. k: ``[B, T, K, H]``. v: ``[B, T, K, Hv]``; ``N % K == 0``.
    beta: ``[B, T, N]`` in ``[0, 1]`` (checked when concrete, unchecked under tracing).
    form, chunk_size (a positive power of two), scale (default ``1/sqrt(H)``), state
      (``[B, N, Hv, H]`` float32), return_state, block_len: as in
      :func:`~attnjax.ops.linear.gated_linear_attention`.
    implementation: ``None``/``'auto'``/``'xla'`` (the XLA forms) or ``'pallas_tpu'`` /
      ``'pallas_gpu'``: the Pallas chunk kernel of :mod:`attnjax.kernels.tpu.linear_gated`
      / :mod:`attnjax.kernels.gpu.linear_gated` (chunked form; forward and reverse-chunk-order
      backward kernels; interpret mode off its backend).

  Returns:
    ``[B, T, N, Hv]`` in ``v.dtype``, or ``(out, state)``.
  """
  return _delta_public(q, k, v, beta, None, form=form, chunk_size=chunk_size, scale=scale,
                       state=state, return_state=return_state, block_len=block_len,
                       implementation=implementation)


def gated_delta_rule_attention(q, k, v, beta, log_alpha, *, form: str = 'chunked',
                               chunk_size: int = 64, scale=None, state=None,
                               return_state: bool = False,
                               block_len: int | None = DEFAULT_BLOCK_LEN, implementation=None):
  """Gated DeltaNet: the delta rule with a scalar per-head, per-token decay.

  "Gated Delta Networks: Improving Mamba2 with Delta Rule".

  ``a_t = exp(log_alpha_t)``; ``S_t = a_t S_{t-1} + beta_t (v_t - a_t S_{t-1} k_t) k_t^T``,
  ``o_t = S_t (scale q_t)``. With ``log_alpha = 0`` this is :func:`delta_rule_attention`.

  Args:
    q, k, v, beta: as in :func:`delta_rule_attention`.
    log_alpha: ``[B, T, N]`` float, ``<= 0`` (checked when concrete).
    form, chunk_size, scale, state, return_state, block_len, implementation: as in
      :func:`delta_rule_attention`.

  Returns:
    ``[B, T, N, Hv]`` in ``v.dtype``, or ``(out, state)``.
  """
  return _delta_public(q, k, v, beta, log_alpha, form=form, chunk_size=chunk_size,
                       scale=scale, state=state, return_state=return_state,
                       block_len=block_len, implementation=implementation)


def delta_implied_attention(q, k, beta, log_alpha=None, *, scale=None):
  """The ``[B, N, T, T]`` matrix ``W = P M^{-1} diag(beta)`` (one UT chunk over the whole
  sequence) with ``(gated_)delta_rule_attention(q, k, v, beta[, log_alpha]) ==
  einsum('bnts,bsnv->btnv', W, v)`` for a zero state: with ``S_0 = 0`` the output is
  ``P U = P M^{-1} diag(beta) V``, linear in ``V``."""
  B, T, N, H = q.shape
  a = prepare_gated(q, k, k, form='quadratic', chunk_size=1, scale=scale, state=None,
                    block_len=None)
  beta = jnp.moveaxis(check_beta(beta, (B, T, N)), 2, 1)
  g = (jnp.zeros((B, N, T), _F32) if log_alpha is None
       else jnp.moveaxis(check_log_alpha(log_alpha, (B, T, N)), 2, 1))
  qh, kh = to_heads(q, N) * a.scale, to_heads(k, N)
  # U = M^{-1} diag(beta) V for V = I: the columns of M^{-1} diag(beta).
  eye = jnp.broadcast_to(jnp.eye(T, dtype=_F32), (B, N, T, T))
  P, U, _, _, _ = _ut_chunks(qh, kh, eye, beta, g)
  return _einsum('bnij,bnjs->bnis', P, U)
