"""The causal linear-attention core shared by the mechanisms of :mod:`attnjax.ops.linear`.

``o_i = sum_{j<=i} exp(A_i - A_j) (q_i . k_j) v_j`` (+ state terms) in three forms
(``'quadratic'``, ``'recurrent'``, ``'chunked'``), the block-by-block driver
:func:`_in_blocks`, and the hook through which the Pallas chunk kernels are reached.

Registry hooks: ``ops`` never imports ``kernels`` or ``dispatch``
(``docs/architecture.md``).  Two hooks, filled by :mod:`attnjax.dispatch` when ``attnjax``
is imported, connect the linear ops to the implementation registry
(:mod:`attnjax.dispatch.registry`):

* :data:`CHUNK_KERNELS` (:func:`register_chunk_kernel`): the chunk kernels serving
  ``implementation='pallas_tpu'/'pallas_gpu'`` (kernel modules imported on first call);
* the selector (:func:`register_selector`): resolves the requested implementation
  (``None``/``'auto'``, a name or a sequence) for a :class:`LinearCall` against each
  candidate's ``supports`` check, logging the choice.

A public mechanism decorated with :func:`dispatched` calls :func:`choose` once its
arguments are checked; the rest of the call then runs under
``jax.named_scope(f"attnjax/{name}")``.  Without a registered selector (``ops`` used
on its own) ``'auto'`` means ``'xla'``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from attnjax.core import hooks
from attnjax.core.errors import Unsupported
from attnjax.core.precision import einsum_f32
from attnjax.ops.linear._args import _F32, LinearArgs, _apply_feature_map

# implementation name -> kernel(q [B,T,N,F], k [B,T,K,F], v [B,T,K,V], log_decay_N [N], *,
# chunk_size) -> o [B,T,N,V]: the stateless causal chunk kernel (see attnjax.dispatch).
CHUNK_KERNELS: dict[str, Callable] = {}


def register_chunk_kernel(implementation: str, kernel: Callable) -> None:
  """Registers the chunk kernel serving ``implementation`` (called by
  :mod:`attnjax.dispatch`; a later registration replaces an earlier one)."""
  CHUNK_KERNELS[implementation] = kernel


# implementation name -> kernel(q, k, v, beta [B,T,N], log_alpha [B,T,N] | None,
# state [B,N,Hv,H] f32, *, scale, chunk_size) -> (o [B,T,N,Hv], state): the delta-rule chunk
# kernels serving delta_rule_attention / gated_delta_rule_attention(implementation=...).
DELTA_KERNELS: dict[str, Callable] = {}


def register_delta_kernel(implementation: str, kernel: Callable) -> None:
  """Registers the (gated) delta-rule chunk kernel serving ``implementation`` (called by
  :mod:`attnjax.dispatch`; a later registration replaces an earlier one)."""
  DELTA_KERNELS[implementation] = kernel


# implementation name -> kernel(q, k, v, log_alpha [B,T,N,H], state [B,N,Hv,H] f32, *, scale,
# chunk_size) -> (o, state): the GLA chunk kernels serving
# gated_linear_attention(implementation=...).
GLA_KERNELS: dict[str, Callable] = {}


def register_gla_kernel(implementation: str, kernel: Callable) -> None:
  """Registers the GLA chunk kernel serving ``implementation`` (called by
  :mod:`attnjax.dispatch`)."""
  GLA_KERNELS[implementation] = kernel


# (call: LinearCall, implementation) -> name, raising Unsupported when none serves.
_SELECTOR: list[Callable] = []
# The ExitStack of the innermost dispatched call: choose() enters its named scope there.
_SCOPE: contextvars.ContextVar = contextvars.ContextVar('attnjax_linear_scope', default=None)


def register_selector(selector: Callable) -> None:
  """Registers the implementation selector (called by :mod:`attnjax.dispatch`; a later
  registration replaces an earlier one)."""
  _SELECTOR[:] = [selector]


@dataclasses.dataclass(frozen=True)
class LinearCall:
  """What a selector sees of one linear-attention call: the checked arguments, the
  mechanism, whether it is causal and whether it has a per-token (data-dependent)
  decay."""
  mechanism: str
  args: LinearArgs
  causal: bool
  token_decay: bool = False
  dtype: str = ''

  def signature(self, implementation) -> tuple:
    a = self.args
    text = (f"{self.mechanism} B={a.B} T={a.T} N={a.N} K={a.K} H={a.H} Hv={a.Hv} {self.dtype} "
            f"causal={self.causal} form={a.form} chunk_size={a.chunk_size} "
            f"token_decay={self.token_decay} implementation={implementation!r}")
    return ('linear', self.mechanism, a.B, a.T, a.N, a.K, a.H, a.Hv, self.dtype, self.causal,
            a.form, a.chunk_size, self.token_decay, repr(implementation),
            jax.default_backend(), text)


def choose(a: LinearArgs, *, mechanism: str, causal: bool, token_decay: bool = False,
           dtype=None) -> str:
  """The implementation that serves this call (``a.implementation`` is the request);
  inside a :func:`dispatched` call the rest of it runs under
  ``jax.named_scope(f"attnjax/{name}")``."""
  request = a.implementation
  call = LinearCall(mechanism, a, causal, token_decay, '' if dtype is None else str(dtype))
  if _SELECTOR:
    name = _SELECTOR[0](call, request)
  elif request in ('auto', 'xla') or (isinstance(request, tuple) and 'xla' in request):
    name = 'xla'
  else:
    raise Unsupported(f'implementation={request!r} needs attnjax.dispatch (import attnjax)')
  stack = _SCOPE.get()
  if stack is not None:
    stack.enter_context(jax.named_scope(f'attnjax/{name}'))
  return name


_QKV = ('q', 'k', 'v')


def dispatched(fn: Callable) -> Callable:
  """Decorates a public mechanism: :func:`choose` opens its named scope for the rest of
  the call (the scope closes when the mechanism returns); a call ``fn(q, k, v, **kw)`` is
  shown to :mod:`attnjax.analysis`'s observers (:func:`attnjax.core.hooks.intercepted`)."""
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    def run():
      with contextlib.ExitStack() as stack:
        token = _SCOPE.set(stack)
        try:
          return fn(*args, **kwargs)
        finally:
          _SCOPE.reset(token)
    # the interception point of attnjax.analysis (a no-op unless it observes): q, k, v
    # positional or by keyword, the other keyword arguments as passed
    given = args + tuple(kwargs[n] for n in _QKV[len(args):] if n in kwargs)
    if len(given) != 3:
      return run()
    rest = {n: x for n, x in kwargs.items() if n not in _QKV}
    return hooks.intercepted('linear', run, *given, fn=wrapper, kwargs=rest)
  return wrapper


def _safe_div(num, den, eps):
  """num / (den + eps * sign(den)) with sign(0) = +1: |denominator| >= eps, never zero."""
  return num / jnp.where(den >= 0, den + eps, den - eps)



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
  return einsum_f32(spec, *xs)


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
  kernel = CHUNK_KERNELS.get(implementation)
  if kernel is None:
    raise Unsupported(
        f'no chunk kernel is registered for implementation={implementation!r} (registered: '
        f'{sorted(CHUNK_KERNELS)}); attnjax.dispatch registers the Pallas kernels when '
        'attnjax is imported')
  B, T, N, F = q.shape
  K = k.shape[2]
  G = N // K
  o = kernel(q, k, v, log_decay_N, chunk_size=chunk_size).astype(_F32)
  pos = jnp.arange(1, T + 1, dtype=_F32)
  A = pos[:, None] * log_decay_N[None, :]                        # [T, N] cumulative log-decay
  o = o + _einsum('btnf,bnfv->btnv', q.astype(_F32) * jnp.exp(A)[None, :, :, None], state)
  kdec = jnp.exp(A[-1][None, :] - A).reshape(T, K, G)            # [T, K, G]
  kv = _einsum('tkg,btkf,btkv->bkgfv', kdec, k.astype(_F32), v.astype(_F32))
  new_state = jnp.exp(A[-1])[None, :, None, None] * state + kv.reshape(B, N, F, -1)
  return o, new_state



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

