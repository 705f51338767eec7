"""Backend-independent pieces of the Lightning Attention-2 chunk kernels
(:mod:`attnjax.kernels.tpu.linear`, :mod:`attnjax.kernels.gpu.linear`) and of the gated
chunk kernels (:mod:`attnjax.kernels.tpu.linear_gated`, :mod:`attnjax.kernels.gpu.linear_gated`:
per-chunk math and its in-kernel VJP, input preparation, XLA twins, ``custom_vjp``).

* in-kernel helpers: float32-accumulating matmuls and the per-chunk decay tables;
* :func:`validate`: argument checks of ``lightning_attention``;
* :func:`chunk_attention`: the ``custom_vjp`` around a backend's forward and backward
  ``pallas_call`` wrappers, summing (``psum``) the gradients of inputs that a
  ``shard_map`` does not split like the data;
* :func:`lightning_attention_reference`: the materialised float32 oracle.

Paper: "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in
Large Language Models" (Qin et al., 2024).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from attnjax.core.vma import sum_to_vma

_F32 = jnp.float32


# --------------------------------------------------------------------------------------
# In-kernel helpers
# --------------------------------------------------------------------------------------


def prec(*xs):
  """HIGHEST for all-float32 operands (exact f32 products), DEFAULT otherwise."""
  return (jax.lax.Precision.HIGHEST if all(x.dtype == _F32 for x in xs)
          else jax.lax.Precision.DEFAULT)


def dot_nn(a, b):  # a @ b
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=prec(a, b),
                             preferred_element_type=_F32)


def dot_nt(a, b):  # a @ b.T
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=prec(a, b),
                             preferred_element_type=_F32)


def dot_tn(a, b):  # a.T @ b
  return dot_nn(a.T, b)


def decay_tables(ld, C, cdec_shape=()):
  """Decay tables of one chunk of ``C`` tokens for log-decay ``ld`` (a scalar).

  Returns ``(mask [C, C], dist [C, C], pos [C, 1], qdec [C, 1], kdec [C, 1], cdec)``:
  ``mask_ij = exp((i - j) ld) [i >= j]``, ``dist_ij = (i - j) [i >= j]``, ``pos_i = i``,
  ``qdec_i = exp((i + 1) ld)``, ``kdec_j = exp((C - 1 - j) ld)`` and the chunk decay
  ``cdec = exp(C ld)`` of shape ``cdec_shape`` (``(1, 1)`` where scalars must be vectors).
  """
  row = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
  causal = row >= col
  dist = jnp.where(causal, row - col, 0).astype(_F32)
  mask = jnp.where(causal, jnp.exp(dist * ld), 0.0)
  pos = jax.lax.broadcasted_iota(jnp.int32, (C, 1), 0).astype(_F32)
  qdec = jnp.exp((pos + 1.0) * ld)
  kdec = jnp.exp((C - 1.0 - pos) * ld)
  cdec = jnp.exp(jnp.full(cdec_shape, C, _F32) * ld)
  return mask, dist, pos, qdec, kdec, cdec


# --------------------------------------------------------------------------------------
# Wrapper plumbing
# --------------------------------------------------------------------------------------


def validate(q, k, v, log_decay, chunk_size, block_sizes, block_sizes_cls):
  """Checks the arguments of ``lightning_attention``; returns ``(q, k, v, log_decay f32,
  block_sizes)`` with ``chunk_size`` (when given) replacing ``block_sizes.chunk``."""
  if block_sizes is None:
    block_sizes = block_sizes_cls.get_default()
  if chunk_size is not None:
    block_sizes = dataclasses.replace(block_sizes, chunk=int(chunk_size))
  for name, x in (('q', q), ('k', k), ('v', v)):
    if x.ndim != 4:
      raise ValueError(f'{name} must have rank 4 [B, T, heads, dim], got shape {x.shape}')
  B, T, N, F = q.shape
  if k.shape[:2] != (B, T) or k.shape[3] != F:
    raise ValueError(f'k must have shape [B={B}, T={T}, K, F={F}], got {k.shape}')
  K = k.shape[2]
  if v.shape[:3] != (B, T, K):
    raise ValueError(f'v must have shape [B={B}, T={T}, K={K}, V], got {v.shape}')
  if N % K:
    raise ValueError(f'number of query heads N={N} must be a multiple of kv heads K={K}')
  log_decay = jnp.asarray(log_decay, _F32)
  if log_decay.shape != (N,):
    raise ValueError(f'log_decay must have shape (N,)=({N},), got {log_decay.shape}')
  return q, k, v, log_decay, block_sizes


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def chunk_attention(q, k, v, ld, calls, static):
  """``calls[0](q, k, v, ld, *static)`` with the gradient ``calls[1](q, k, v, ld, do,
  *static) -> (dq, dk, dv, dld)``; ``calls`` and ``static`` are hashable tuples."""
  return calls[0](q, k, v, ld, *static)


def _chunk_fwd(q, k, v, ld, calls, static):
  return calls[0](q, k, v, ld, *static), (q, k, v, ld)


def _chunk_bwd(calls, static, res, do):
  q, k, v, ld = res
  grads = calls[1](q, k, v, ld, do, *static)
  # Inside shard_map: inputs replicated over mesh axes the data is split over (a shared
  # log-decay, replicated k/v) get the sum of every device's gradient, once.
  return tuple(sum_to_vma(g, x) for g, x in zip(grads, res))


chunk_attention.defvjp(_chunk_fwd, _chunk_bwd)


def lightning_attention_reference(q, k, v, log_decay):
  """Materialised float32 reference: ``o_i = sum_{j<=i} exp((i-j) l_n) (q_i.k_j) v_j``."""
  B, T, N, F = q.shape
  G = N // k.shape[2]
  kr = jnp.repeat(k.astype(_F32), G, axis=2)
  vr = jnp.repeat(v.astype(_F32), G, axis=2)
  i = jnp.arange(T)
  causal = i[:, None] >= i[None, :]
  dist = jnp.where(causal, (i[:, None] - i[None, :]).astype(_F32), 0.0)
  mask = jnp.where(causal, jnp.exp(dist[None] * log_decay[:, None, None]), 0.0)
  s = jnp.einsum('btnf,bsnf->bnts', q.astype(_F32), kr,
                 precision=jax.lax.Precision.HIGHEST) * mask
  return jnp.einsum('bnts,bsnv->btnv', s, vr,
                    precision=jax.lax.Precision.HIGHEST).astype(v.dtype)


# --------------------------------------------------------------------------------------
# Gated delta rule (Gated DeltaNet; DeltaNet with a zero log-decay): one chunk
# --------------------------------------------------------------------------------------


def _iota2(C):
  return (jax.lax.broadcasted_iota(jnp.int32, (C, C), 0),
          jax.lax.broadcasted_iota(jnp.int32, (C, C), 1))


def masked_decay(keep, logdiff):
  """``exp(logdiff)`` where ``keep`` (the causal ``j <= i`` entries), 0 elsewhere; the
  exponent is zeroed off the mask first, so neither the value nor its gradient can see an
  overflowing ``exp`` (no ``inf * 0``)."""
  return jnp.where(keep, jnp.exp(jnp.where(keep, logdiff, 0.0)), 0.0)


def last_entry(x, axis):
  """The last entry of ``x`` along ``axis`` (kept as a size-1 axis), as a masked sum (no
  dynamic slice, so it lowers alike in Mosaic and Triton)."""
  shape = [1] * x.ndim
  shape[axis] = x.shape[axis]
  last = jax.lax.broadcasted_iota(jnp.int32, tuple(shape), axis) == x.shape[axis] - 1
  return jnp.sum(jnp.where(last, x, 0.0), axis=axis, keepdims=True)


def chunk_vjp(chunk_fn, primals, cts, scale):
  """In-kernel backward of one chunk: the gradients, float32, of ``(o, state) =
  chunk_fn(*primals, scale)`` (:func:`delta_chunk` or :func:`gla_chunk`, the primals cast
  to float32) w.r.t. every primal, for the cotangents ``cts = (do, dstate)``. The chunk is
  recomputed from its inputs and the state before it; the transposed program is traced
  into the backward kernel's body."""
  _, vjp = jax.vjp(lambda *a: chunk_fn(*a, scale), *(x.astype(_F32) for x in primals))
  return vjp(tuple(c.astype(_F32) for c in cts))


def delta_chunk(q, k, v, beta_col, gc_col, gc_row, St, scale):
  """One chunk of the gated delta rule in the UT (WY) form, float32 throughout.

  "Gated Delta Networks: Improving Mamba2 with Delta Rule"; "Parallelizing Linear
  Transformers with the Delta Rule over Sequence Length".

  Args (one batch row and head, ``C`` tokens): ``q [C, H]`` (unscaled), ``k [C, H]``,
  ``v [C, V]``, ``beta_col [C, 1]``, the chunk-local inclusive cumulative log-decay ``gc``
  as a column ``[C, 1]`` and a row ``[1, C]``, the state ``St = S^T [H, V]`` before the
  chunk, ``scale`` (a Python float).

  With ``D_ij = exp(gc_i - gc_j) [i >= j]``, ``M = I + tril(diag(beta) (D * K K^T), -1)``
  (inverted by the nilpotent doubling ``M^{-1} = prod_i (I + L^(2^i))``, ``L = I - M``),
  ``U = M^{-1} diag(beta) V``, ``W = M^{-1} diag(beta e^gc) K``,
  ``Delta = U - W St``:

      O      = tril(D * scale Q K^T) Delta + (e^gc * scale Q) St
      St_new = e^(gc_C) St + (e^(gc_C - gc) * K)^T Delta

  Returns ``(o [C, V], St_new [H, V])``.
  """
  C = q.shape[0]
  row, col = _iota2(C)
  incl, strict = row >= col, row > col
  f32 = lambda x: x.astype(_F32)
  q, k, v = f32(q) * scale, f32(k), f32(v)
  D = masked_decay(incl, gc_col - gc_row)
  L = -jnp.where(strict, beta_col * D * dot_nt(k, k), 0.0)
  eye = jnp.where(row == col, 1.0, 0.0).astype(_F32)
  Minv, P = eye + L, L
  span = 2
  while span < C:
    P = dot_nn(P, P)
    Minv = Minv + dot_nn(Minv, P)
    span *= 2
  gam = jnp.exp(gc_col)
  U = dot_nn(Minv, beta_col * v)
  W = dot_nn(Minv, (beta_col * gam) * k)
  A = jnp.where(incl, D * dot_nt(q, k), 0.0)
  delta = U - dot_nn(W, St)
  o = dot_nn(A, delta) + dot_nn(gam * q, St)
  g_last = last_entry(gc_row, 1)                                                  # [1, 1]
  kdec = jnp.exp(g_last - gc_col) * k
  return o, jnp.exp(g_last) * St + dot_tn(kdec, delta)


def head_major(x, Tp):
  """``[B, T, N, ...] -> [B, N, Tp, ...]``, zero-padded along time to ``Tp``."""
  x = jnp.swapaxes(x, 1, 2)
  pad = [(0, 0)] * x.ndim
  pad[2] = (0, Tp - x.shape[2])
  return jnp.pad(x, pad) if Tp != x.shape[2] else x


def kv_group_sum(x, G):
  """Per-query-head gradients ``[B, N, ...]`` summed over each GQA group -> ``[B, N // G,
  ...]`` (query head ``n`` reads kv head ``n // G``)."""
  return x.reshape((x.shape[0], x.shape[1] // G, G) + x.shape[2:]).sum(2) if G > 1 else x


def delta_chunk_inputs(q, k, v, beta, log_alpha, S0, C):
  """Head-major, chunk-padded inputs of the delta-rule kernels.

  ``q [B, T, N, H]``, ``k [B, T, K, H]``, ``v [B, T, K, V]``, ``beta, log_alpha [B, T, N]``,
  ``S0 [B, N, V, H]`` -> ``q [B, N, Tp, H]``, ``k [B, K, Tp, H]``, ``v [B, K, Tp, V]``,
  ``beta, gc [B, N, Tp]`` float32 (``gc``: inclusive cumulative log-decay within each chunk),
  ``St0 [B, N, H, V]`` float32. Padding (``beta = 0``, ``log_alpha = 0``) leaves the state
  unchanged.
  """
  Tp = -(-q.shape[1] // C) * C
  heads = functools.partial(head_major, Tp=Tp)
  beta, log_alpha = heads(beta.astype(_F32)), heads(log_alpha.astype(_F32))
  B, N = beta.shape[:2]
  gc = jnp.cumsum(log_alpha.reshape(B, N, Tp // C, C), axis=-1).reshape(B, N, Tp)
  return (heads(q), heads(k), heads(v), beta, gc,
          jnp.swapaxes(S0.astype(_F32), -1, -2))


def delta_rule_scan(q, k, v, beta, log_alpha, S0, *, scale, chunk):
  """The XLA twin of the delta-rule chunk kernels (same inputs and outputs as their
  public entry points; :func:`delta_chunk` vmapped over batch and heads, ``lax.scan``
  over chunks). Its VJP is their ``backward='xla'`` gradient and the reference of their
Pallas backward kernels.

  Returns ``(o [B, T, N, V] in v.dtype, S [B, N, V, H] float32)``.
  """
  qh, kh, vh, bh, gc, St = delta_chunk_inputs(q, k, v, beta, log_alpha, S0, chunk)

  def one(qc, kc, vc, bc, gcc, St):
    return delta_chunk(qc, kc, vc, bc[:, None], gcc[:, None], gcc[None, :], St, scale)

  o, St = scan_chunks(one, (qh, kh, vh, bh, gc), St, chunk, q.shape[1], v.dtype)
  return o, jnp.swapaxes(St, -1, -2)


def scan_chunks(one, xs, S, C, T, dtype):
  """``one(*chunk_inputs, S) -> (o, S)`` (one batch row and head) vmapped over batch and
  heads and scanned over the chunks of the head-major ``xs = (q, k, v, ...) [B, *, Tp,
  ...]`` (k and v have the kv heads; repeated here to the query heads). Returns
  ``(o [B, T, N, V] in dtype, S)``."""
  B, N, Tp = xs[0].shape[:3]
  G, nc = N // xs[1].shape[1], Tp // C
  xs = (xs[0], jnp.repeat(xs[1], G, axis=1), jnp.repeat(xs[2], G, axis=1)) + tuple(xs[3:])

  def chunks(x):   # [B, N, Tp, *] -> [nc, B, N, C, *]
    return jnp.moveaxis(x.reshape(x.shape[:2] + (nc, C) + x.shape[3:]), 2, 0)

  def step(S, xc):
    o, S = jax.vmap(jax.vmap(one))(*xc, S)
    return S, o

  S, o = jax.lax.scan(step, S, tuple(chunks(x) for x in xs))
  o = jnp.moveaxis(o, 0, 2).reshape(B, N, Tp, -1)[:, :, :T]
  return jnp.swapaxes(o, 1, 2).astype(dtype), S


def validate_delta(q, k, v, beta, log_alpha, S0, chunk):
  """Checks of the delta-rule kernels' entry points; returns ``(log_alpha, S0)`` (zeros
  when None)."""
  for name, x in (('q', q), ('k', k), ('v', v)):
    if x.ndim != 4:
      raise ValueError(f'{name} must have rank 4 [B, T, heads, dim], got shape {x.shape}')
  B, T, N, H = q.shape
  if k.shape[:2] != (B, T) or k.shape[3] != H:
    raise ValueError(f'k must have shape [B={B}, T={T}, K, H={H}], got {k.shape}')
  K = k.shape[2]
  if v.shape[:3] != (B, T, K):
    raise ValueError(f'v must have shape [B={B}, T={T}, K={K}, V], got {v.shape}')
  if N % K:
    raise ValueError(f'number of query heads N={N} must be a multiple of kv heads K={K}')
  if beta.shape != (B, T, N):
    raise ValueError(f'beta must have shape (B, T, N)={(B, T, N)}, got {beta.shape}')
  if log_alpha is None:
    log_alpha = jnp.zeros((B, T, N), _F32)
  if log_alpha.shape != (B, T, N):
    raise ValueError(f'log_alpha must have shape (B, T, N)={(B, T, N)}, got {log_alpha.shape}')
  V = v.shape[-1]
  if S0 is None:
    S0 = jnp.zeros((B, N, V, H), _F32)
  if S0.shape != (B, N, V, H):
    raise ValueError(f'state must have shape (B, N, V, H)={(B, N, V, H)}, got {S0.shape}')
  if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f'chunk_size must be a positive int, got {chunk!r}')
  return log_alpha, S0


# --------------------------------------------------------------------------------------
# Gated linear attention (GLA): one chunk
# --------------------------------------------------------------------------------------


def gla_chunk(q, k, v, b, S, scale):
  """One chunk of GLA, float32 throughout ("Gated Linear Attention Transformers with
  Hardware-Efficient Training").

  Args: ``q, k [C, H]``, ``v [C, V]``, ``b [C, H]`` the chunk-local inclusive cumulative
  log-decay (f32), ``S [V, H]`` the state before the chunk, ``scale``.

      A_ij   = sum_h scale q_ih k_jh exp(b_ih - b_jh)   (j <= i; exact [C, C, H] decays,
               every exponent <= 0)
      O      = A V + (scale Q * e^b) S^T
      S_new  = S * e^(b_C) + V^T (K * e^(b_C - b))

  Returns ``(o [C, V], S_new [V, H])``.
  """
  C = q.shape[0]
  f32 = lambda x: x.astype(_F32)
  q, k, v = f32(q) * scale, f32(k), f32(v)
  row, col = _iota2(C)
  dec = masked_decay((row >= col)[:, :, None], b[:, None, :] - b[None, :, :])
  A = jnp.sum(q[:, None, :] * k[None, :, :] * dec, axis=-1)
  o = dot_nn(A, v) + dot_nt(q * jnp.exp(b), S)
  b_last = last_entry(b, 0)                                                       # [1, H]
  return o, S * jnp.exp(b_last) + dot_tn(v, jnp.exp(b_last - b) * k)


def gla_chunk_inputs(q, k, v, log_alpha, C):
  """``q [B,T,N,H]``, ``k [B,T,K,H]``, ``v [B,T,K,V]``, ``log_alpha [B,T,N,H]`` -> head-major
  ``q [B,N,Tp,H]``, ``k [B,K,Tp,H]``, ``v [B,K,Tp,V]``, ``b [B,N,Tp,H]`` f32 (the cumulative
  log-decay within each chunk; padding has ``log_alpha = 0`` and zero keys/values)."""
  Tp = -(-q.shape[1] // C) * C
  heads = functools.partial(head_major, Tp=Tp)
  la = heads(log_alpha.astype(_F32))
  B, N, _, H = la.shape
  b = jnp.cumsum(la.reshape(B, N, Tp // C, C, H), axis=3).reshape(B, N, Tp, H)
  return heads(q), heads(k), heads(v), b


def gla_scan(q, k, v, log_alpha, S0, *, scale, chunk):
  """The XLA twin of the GLA chunk kernels (:func:`gla_chunk` vmapped over batch and heads,
  ``lax.scan`` over chunks); its VJP is their ``backward='xla'`` gradient. ``S0 [B, N, V,
  H]`` f32.
  Returns ``(o [B, T, N, V] in v.dtype, S [B, N, V, H] f32)``."""
  return scan_chunks(functools.partial(gla_chunk, scale=scale),
                     gla_chunk_inputs(q, k, v, log_alpha, chunk), S0.astype(_F32), chunk,
                     q.shape[1], v.dtype)


def validate_gla(q, k, v, log_alpha, S0, chunk):
  """Checks of the GLA kernels' entry points; returns ``S0`` (zeros when None)."""
  for name, x in (('q', q), ('k', k), ('v', v)):
    if x.ndim != 4:
      raise ValueError(f'{name} must have rank 4 [B, T, heads, dim], got shape {x.shape}')
  B, T, N, H = q.shape
  if k.shape[:2] != (B, T) or k.shape[3] != H:
    raise ValueError(f'k must have shape [B={B}, T={T}, K, H={H}], got {k.shape}')
  K = k.shape[2]
  if v.shape[:3] != (B, T, K):
    raise ValueError(f'v must have shape [B={B}, T={T}, K={K}, V], got {v.shape}')
  if N % K:
    raise ValueError(f'number of query heads N={N} must be a multiple of kv heads K={K}')
  if log_alpha.shape != (B, T, N, H):
    raise ValueError(f'log_alpha must have shape (B, T, N, H)={(B, T, N, H)}, got '
                     f'{log_alpha.shape}')
  V = v.shape[-1]
  if S0 is None:
    S0 = jnp.zeros((B, N, V, H), _F32)
  if S0.shape != (B, N, V, H):
    raise ValueError(f'state must have shape (B, N, V, H)={(B, N, V, H)}, got {S0.shape}')
  if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f'chunk_size must be a positive int, got {chunk!r}')
  return S0


# --------------------------------------------------------------------------------------
# Gated chunk kernels: backward selection and custom VJP
# --------------------------------------------------------------------------------------


BACKWARDS = ('pallas', 'xla')


def validate_backward(backward):
  """Checks the ``backward=`` argument of the gated kernels' entry points."""
  if backward not in BACKWARDS:
    raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
  return backward


def kernel_custom_vjp(forward, backward, reference):
  """The ``custom_vjp`` of a gated chunk kernel: ``f(args, scale, static) -> (o, S)``.

  ``forward(args, scale, static, with_states)`` runs the forward kernel (returning also the
  float32 state before every chunk when ``with_states``); ``static`` is a hashable tuple
  ``(chunk, backward, ...)``. With ``backward == 'pallas'`` the forward saves the per-chunk
  states and the gradient is ``backward(args, states, (do, dS), scale, static)`` (the
  reverse-chunk-order Pallas kernel); with ``'xla'`` it is the VJP of the XLA twin
  ``reference(*args, scale=, chunk=)`` (:func:`delta_rule_scan`, :func:`gla_scan`),
  recomputed from the saved inputs.
  """
  @functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
  def f(args, scale, static):
    return forward(args, scale, static, False)

  def fwd(args, scale, static):
    if static[1] == 'xla':
      return forward(args, scale, static, False), (args, None)
    o, S, states = forward(args, scale, static, True)
    return (o, S), (args, states)

  def bwd(scale, static, res, ct):
    args, states = res
    if states is None:
      _, vjp = jax.vjp(functools.partial(reference, scale=scale, chunk=static[0]), *args)
      grads = vjp(ct)
    else:
      grads = backward(args, states, ct, scale, static)
    # Inside shard_map: inputs replicated over axes the data is split over get the sum.
    return (tuple(sum_to_vma(g, x) for g, x in zip(grads, args)),)

  f.defvjp(fwd, bwd)
  return f
