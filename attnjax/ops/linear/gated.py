"""Gated linear attention (GLA): a data-dependent decay per key dimension.

"Gated Linear Attention Transformers with Hardware-Efficient Training" (Yang et al.).

Recurrence (state ``S [Hv, H]`` per query head, ``alpha_t = exp(log_alpha_t) in (0, 1]^H``):

    S_t = S_{t-1} * alpha_t[None, :] + v_t k_t^T,      o_t = S_t (scale * q_t).

The shared argument handling of the gated / delta-rule family (:func:`prepare_gated`) also
lives here: ``q [B, T, N, H]``, ``k [B, T, K, H]``, ``v [B, T, K, Hv]`` (``N % K == 0``; a kv
head serves ``N // K`` query heads, and since decays and betas are per query head the state
is per query head: ``S [B, N, Hv, H]`` float32).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import hooks
from attnjax.core.errors import Unsupported
from attnjax.core.precision import einsum_f32
from attnjax.ops.linear._args import (
  _F32,
  DEFAULT_BLOCK_LEN,
  IMPLEMENTATIONS,
  _check_block_len,
  prepare,
)
from attnjax.ops.linear._core import GLA_KERNELS, _in_blocks

SUBCHUNK = 16  # secondary chunk length of the GLA chunked form


# --------------------------------------------------------------------------------------
# Argument handling shared by gated.py / delta.py / ssd.py
# --------------------------------------------------------------------------------------


def _is_concrete(x):
  try:
    np.asarray(x)
    return True
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return False


def check_pow2_chunk(chunk_size):
  """``chunk_size`` must be a positive power of two (the GLA secondary chunks divide it)."""
  if (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
      or chunk_size < 1 or (int(chunk_size) & (int(chunk_size) - 1))):
    raise ValueError(f'chunk_size must be a positive power of two, got chunk_size={chunk_size!r}')
  return int(chunk_size)


def check_log_alpha(log_alpha, shape, name='log_alpha'):
  """A log-decay of exactly ``shape``, ``<= 0`` (checked when concrete), as float32."""
  if not hasattr(log_alpha, 'shape'):
    log_alpha = jnp.asarray(log_alpha)
  if tuple(log_alpha.shape) != tuple(shape):
    raise ValueError(f'{name} must have shape {tuple(shape)}, got {tuple(log_alpha.shape)}')
  if not jnp.issubdtype(log_alpha.dtype, jnp.floating):
    raise TypeError(f'{name} must be a floating array, got dtype {log_alpha.dtype}')
  if _is_concrete(log_alpha):
    x = np.asarray(log_alpha, np.float64)
    if not np.all(x <= 0):
      raise ValueError(f'{name} must be <= 0 everywhere (a decay exp({name}) in (0, 1]); got '
                       f'max {np.nanmax(x)!r}' + (' and NaN' if np.isnan(x).any() else ''))
  return jnp.asarray(log_alpha).astype(_F32)


def check_beta(beta, shape):
  """``beta`` of exactly ``shape`` with values in ``[0, 1]`` (checked when concrete)."""
  if not hasattr(beta, 'shape'):
    beta = jnp.asarray(beta)
  if tuple(beta.shape) != tuple(shape):
    raise ValueError(f'beta must have shape (B, T, N)={tuple(shape)}, got {tuple(beta.shape)}')
  if not jnp.issubdtype(beta.dtype, jnp.floating):
    raise TypeError(f'beta must be a floating array, got dtype {beta.dtype}')
  if _is_concrete(beta):
    x = np.asarray(beta, np.float64)
    if not np.all((x >= 0) & (x <= 1)):
      raise ValueError('beta must lie in [0, 1] everywhere, got values in '
                       f'[{np.nanmin(x)!r}, {np.nanmax(x)!r}]')
  return jnp.asarray(beta).astype(_F32)


def check_implementation(implementation, form):
  """``None``/``'auto'``/``'xla'``: the XLA forms; ``'pallas_tpu'``/``'pallas_gpu'``: the
  Pallas chunk kernel (chunked form only)."""
  if implementation is None or implementation == 'auto':
    return 'xla'
  if not isinstance(implementation, str) or implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be None, 'auto' or one of {IMPLEMENTATIONS}, got "
                     f"{implementation!r}")
  if implementation != 'xla' and form != 'chunked':
    raise ValueError(f"implementation={implementation!r} serves form='chunked' only, got "
                     f"form={form!r}")
  return implementation


@dataclasses.dataclass(frozen=True)
class GatedArgs:
  B: int
  T: int
  N: int
  K: int
  H: int
  Hv: int
  form: str
  chunk_size: int
  scale: float
  block_len: int | None
  S0: jax.Array          # [B, N, Hv, H] float32


def prepare_gated(q, k, v, *, form, chunk_size, scale, state, block_len) -> GatedArgs:
  """Validates ``q, k, v`` (as every linear op), ``form``, ``chunk_size`` (a power of two),
  ``scale`` and ``state [B, N, Hv, H]`` (zeros when None)."""
  a = prepare(q, k, v, causal=True, form=form)
  chunk_size = check_pow2_chunk(chunk_size)
  block_len = _check_block_len(block_len)
  if scale is None:
    scale = a.H ** -0.5
  if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)) or not scale > 0:
    raise ValueError(f'scale must be None or a positive float, got scale={scale!r}')
  shape = (a.B, a.N, a.Hv, a.H)
  if state is None:
    S0 = jnp.zeros(shape, _F32)
  else:
    if not hasattr(state, 'shape') or tuple(state.shape) != shape:
      raise ValueError(f'state must have shape (B, N, Hv, H)={shape}, got '
                       f'{getattr(state, "shape", type(state))}')
    S0 = state.astype(_F32)
  return GatedArgs(a.B, a.T, a.N, a.K, a.H, a.Hv, form, chunk_size, float(scale), block_len, S0)


def to_heads(x, N):
  """``[B, T, K, D]`` -> ``[B, N, T, D]`` float32 (kv heads repeated to the query heads)."""
  x = jnp.moveaxis(x.astype(_F32), 2, 1)
  K = x.shape[1]
  return x if K == N else jnp.repeat(x, N // K, axis=1)


def run_blocks(step, S0, xs, T, block_len):
  """``step(S, *xs_block) -> (o, S)`` over blocks of ``block_len`` tokens (``[B, T, ...]``
  inputs), each block rematerialised in the backward pass; one call when short."""
  if block_len is None or T <= block_len:
    return step(S0, *xs)
  return _in_blocks(step, S0, xs, block_len=block_len)


def _pad_t(x, pad, axis=2):
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _chunk_len(T, chunk_size):
  """The chunk length used for ``T`` tokens: ``chunk_size``, or the next power of two >= T
  when that is smaller (so a short call does not pad to a whole chunk)."""
  return min(chunk_size, 1 << max(T - 1, 0).bit_length())


def _einsum(spec, *xs):
  return einsum_f32(spec, *xs, precision=jax.lax.Precision.HIGHEST)


def _masked_exp(x, mask):
  """exp(x) where mask else 0; the exponent is zeroed first so gradients stay finite."""
  return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


# --------------------------------------------------------------------------------------
# GLA: three forms on [B, N, T, *] float32 arrays (q already scaled)
# --------------------------------------------------------------------------------------


def _gla_recurrent(q, k, v, g, S0):
  def step(S, x):
    q_t, k_t, v_t, g_t = x
    S = S * jnp.exp(g_t)[..., None, :] + v_t[..., :, None] * k_t[..., None, :]
    return S, _einsum('bnvh,bnh->bnv', S, q_t)

  xs = tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v, g))
  S, o = jax.lax.scan(step, S0, xs)
  return jnp.moveaxis(o, 0, 2), S


def _gla_quadratic(q, k, v, g, S0):
  T = q.shape[2]
  b = jnp.cumsum(g, axis=2)                                       # [B,N,T,H]
  tri = jnp.tril(jnp.ones((T, T), bool))[..., None]
  dec = _masked_exp(b[:, :, :, None] - b[:, :, None], tri)        # [B,N,T,T,H]
  A = _einsum('bnih,bnjh,bnijh->bnij', q, k, dec)
  o = _einsum('bnij,bnjv->bniv', A, v) + _einsum('bnih,bnvh->bniv', q * jnp.exp(b), S0)
  b_last = b[:, :, -1]
  S = S0 * jnp.exp(b_last)[:, :, None] + _einsum(
      'bnjv,bnjh->bnvh', v, k * jnp.exp(b_last[:, :, None] - b))
  return o, S


def _gla_chunked(q, k, v, g, S0, chunk_size):
  """Chunks of ``C`` tokens; inside a chunk the decays are relative to the chunk start
  (``b`` = inclusive cumulative log-decay within the chunk) and the ``[C, C]`` score matrix
  is built from secondary chunks of ``c`` tokens: between sub-chunks ``u > w`` as
  ``(q_i e^{b_i - r_u}) . (k_j e^{r_u - b_j})`` with ``r_u`` the log-decay just before
  sub-chunk ``u`` (both exponents <= 0), on the diagonal sub-chunks with the exact
  ``[c, c, H]`` relative decays. No exponent is ever positive and nothing is divided."""
  B, N, T, H = q.shape
  V = v.shape[-1]
  C = _chunk_len(T, chunk_size)
  c = min(SUBCHUNK, C)
  m = C // c
  nc = -(-T // C)
  pad = nc * C - T
  # Padding after the last token: zero k/v and zero log-decay leave the state unchanged.
  q, k, v, g = (_pad_t(x, pad).reshape(B, N, nc, C, x.shape[-1]) for x in (q, k, v, g))
  b = jnp.cumsum(g, axis=3)                                        # [B,N,n,C,H]
  # --- intra-chunk scores A [B,N,n,C,C]
  bs = b.reshape(B, N, nc, m, c, H)
  qs = q.reshape(B, N, nc, m, c, H)
  ks = k.reshape(B, N, nc, m, c, H)
  r = jnp.concatenate([jnp.zeros_like(bs[:, :, :, :1, -1]), bs[:, :, :, :-1, -1]], axis=3)
  qd = qs * jnp.exp(bs - r[:, :, :, :, None])                      # [B,N,n,m,c,H]
  before = (jnp.arange(C)[None, :] < (jnp.arange(m) * c)[:, None])[..., None]   # [m,C,1]
  kd = k[:, :, :, None] * _masked_exp(r[:, :, :, :, None] - b[:, :, :, None], before)
  A_off = _einsum('bnzuih,bnzujh->bnzuij', qd, kd)                  # [B,N,n,m,c,C]
  tri = jnp.tril(jnp.ones((c, c), bool))[..., None]
  e = _masked_exp(bs[..., :, None, :] - bs[..., None, :, :], tri)   # [B,N,n,m,c,c,H]
  A_d = _einsum('bnzuih,bnzujh,bnzuijh->bnzuij', qs, ks, e)         # [B,N,n,m,c,c]
  # Diagonal blocks placed with an einsum against the identity (a dot, also in the
  # backward pass; a broadcast-multiply there crashed XLA:CPU in jax 0.10.2 at B=1).
  A = A_off.reshape(B, N, nc, m, c, m, c) + _einsum('bnzuij,uw->bnzuiwj', A_d,
                                                    jnp.eye(m, dtype=_F32))
  A = A.reshape(B, N, nc, C, C)
  o = _einsum('bnzij,bnzjv->bnziv', A, v)
  # --- inter-chunk: state at each chunk start
  b_last = b[:, :, :, -1]                                          # [B,N,n,H]
  kv = _einsum('bnzjv,bnzjh->zbnvh', v, k * jnp.exp(b_last[:, :, :, None] - b))
  g_last = jnp.moveaxis(jnp.exp(b_last), 2, 0)                     # [n,B,N,H]

  def step(S, x):
    gl, kv_c = x
    return S * gl[:, :, None, :] + kv_c, S

  S, S_prev = jax.lax.scan(step, S0, (g_last, kv))                 # S_prev [n,B,N,V,H]
  o = o + _einsum('bnzih,zbnvh->bnziv', q * jnp.exp(b), S_prev)
  return o.reshape(B, N, nc * C, V)[:, :, :T], S


def _gla_forms(q, k, v, g, S0, *, form, chunk_size):
  if form == 'recurrent':
    return _gla_recurrent(q, k, v, g, S0)
  if form == 'quadratic':
    return _gla_quadratic(q, k, v, g, S0)
  return _gla_chunked(q, k, v, g, S0, chunk_size)


GLA_KERNEL_CHUNK = 16  # chunk of the GLA kernels (their body holds [C, C, H] f32 decays)


def gated_linear_attention(q, k, v, log_alpha, *, form: str = 'chunked', chunk_size: int = 64,
                           scale=None, state=None, return_state: bool = False,
                           block_len: int | None = DEFAULT_BLOCK_LEN, implementation=None):
  """Gated linear attention (GLA), causal, with a per-key-dimension data-dependent decay.

  "Gated Linear Attention Transformers with Hardware-Efficient Training".

  ``S_t = S_{t-1} * exp(log_alpha_t)[None, :] + v_t k_t^T``, ``o_t = S_t (scale q_t)``, i.e.
  ``o_i = sum_{j<=i} (sum_h scale q_ih k_jh exp(b_ih - b_jh)) v_j`` with ``b`` the cumulative
  sum of ``log_alpha`` (plus ``S_0 (exp(b_i) * scale q_i)`` for a given state).

  Forms: ``'recurrent'`` (``lax.scan`` over tokens), ``'quadratic'`` (the ``[T, T, H]``
  relative decays), ``'chunked'`` (chunks of ``chunk_size``, secondary chunks of 16 inside
  a chunk so that every ``exp`` has a non-positive exponent; a ``lax.scan`` over chunks
  carries the state; sequences longer than ``block_len`` run block by block with
  rematerialisation). All agree to float32 precision forward and backward.

  Args:
    q: ``[B, T, N, H]``. k: ``[B, T, K, H]``. v: ``[B, T, K, Hv]``; ``N % K == 0``.
    log_alpha: ``[B, T, N, H]`` float, ``<= 0`` (decay ``exp(log_alpha)`` in (0, 1];
      checked when concrete, unchecked under ``jit`` tracing).
    form: ``'chunked'`` | ``'recurrent'`` | ``'quadratic'``.
    chunk_size: a positive power of two (default 64).
    scale: multiplies ``q`` (default ``1/sqrt(H)``).
    state: ``S [B, N, Hv, H]`` float32 from a previous call (zeros when None).
    return_state: also return the state after the last token.
    block_len: chunked form only: run blocks of this many tokens (None: one block).
    implementation: ``None``/``'auto'``/``'xla'`` (the XLA forms) or ``'pallas_tpu'`` /
      ``'pallas_gpu'``: the Pallas GLA kernel of :mod:`attnjax.kernels.tpu.linear_gated` /
      :mod:`attnjax.kernels.gpu.linear_gated` (chunked form; chunks of 16 whatever
      ``chunk_size``; forward and reverse-chunk-order backward kernels).

  Returns:
    ``[B, T, N, Hv]`` in ``v.dtype``, or ``(out, state [B, N, Hv, H] float32)``.
  """
  a = prepare_gated(q, k, v, form=form, chunk_size=chunk_size, scale=scale, state=state,
                    block_len=block_len)
  implementation = check_implementation(implementation, form)
  log_alpha = check_log_alpha(log_alpha, (a.B, a.T, a.N, a.H))
  if implementation != 'xla':
    kernel = GLA_KERNELS.get(implementation)
    if kernel is None:
      raise Unsupported(f'no GLA kernel is registered for implementation={implementation!r} '
                        f'(registered: {sorted(GLA_KERNELS)}); attnjax.dispatch registers the '
                        'Pallas kernels when attnjax is imported')
    o, S = kernel(q, k, v, log_alpha, a.S0, scale=a.scale, chunk_size=GLA_KERNEL_CHUNK)
  else:
    def step(S, q_, k_, v_, g_):
      qh = to_heads(q_, a.N) * a.scale
      o, S = _gla_forms(qh, to_heads(k_, a.N), to_heads(v_, a.N), to_heads(g_, a.N), S,
                        form=a.form, chunk_size=a.chunk_size)
      return jnp.moveaxis(o, 1, 2), S

    blen = a.block_len if a.form == 'chunked' else None
    o, S = run_blocks(step, a.S0, (q, k, v, log_alpha), a.T, blen)
    o = o.astype(v.dtype)
  out = (o, S) if return_state else o
  # attnjax.analysis interception point of every implementation, the Pallas kernels included
  # (a no-op unless observed): the implied weights, and a given state's contribution (the op
  # on zero values), both recomputed by the XLA forms
  return hooks.intercepted('linear', lambda: out, q, k, v, probs=lambda: gla_implied_attention(
      q, k, log_alpha, scale=scale), extras=None if state is None else lambda: {
          'state': gated_linear_attention(q, k, jnp.zeros(v.shape, _F32), log_alpha, form=form,
                                          chunk_size=chunk_size, scale=scale, state=state,
                                          block_len=block_len)})


def gla_implied_attention(q, k, log_alpha, *, scale=None):
  """The ``[B, N, T, T]`` matrix ``W`` with ``gated_linear_attention(q, k, v, log_alpha) ==
  einsum('bnts,bsnv->btnv', W, v)`` (zero state): ``W_ij = sum_h scale q_ih k_jh
  exp(b_ih - b_jh)`` for ``j <= i``."""
  B, T, N, H = q.shape
  a = prepare_gated(q, k, k, form='quadratic', chunk_size=1, scale=scale, state=None,
                    block_len=None)
  g = to_heads(check_log_alpha(log_alpha, (B, T, N, H)), N)
  qh, kh = to_heads(q, N) * a.scale, to_heads(k, N)
  b = jnp.cumsum(g, axis=2)
  tri = jnp.tril(jnp.ones((T, T), bool))[..., None]
  return _einsum('bnih,bnjh,bnijh->bnij', qh, kh,
                 _masked_exp(b[:, :, :, None] - b[:, :, None], tri))
