"""Dense softmax attention: argument checking, the float32 reference, the 'xla' path.

Formula (per batch ``b``, query head ``n`` with kv head ``n // (N / K)``):

    s_ij = softcap(score_mod(scale * q_i . k_j + bias_ij))      (float32)
    p_ij = exp(s_ij) / (sum_{j allowed} exp(s_ij) + exp(sink_n))
    o_i  = sum_{j allowed} p_ij v_j ,   lse_i = log(sum_j exp(s_ij) + exp(sink_n))

where ``allowed`` is the mask AND equal segment ids.  A row with no allowed key
(and no sink) returns 0 and ``lse = -inf``; its gradients are 0.

Paper: "Attention Is All You Need" (Vaswani et al., 2017); GQA: "GQA: Training
Generalized Multi-Query Transformer Models from Multi-Head Checkpoints".
"""

from __future__ import annotations

import math as _math

import jax as _jax
import jax.numpy as _jnp

from attnjax import score_mods as _score_mods
from attnjax.core import hooks as _hooks
from attnjax.core.args import AttentionArgs, check_attention_args
from attnjax.core.softmax import dense_attention, reference_attention

__all__ = ["reference_attention", "xla_attention", "AttentionArgs", "check_attention_args"]

# The float32 math and the argument checks live in attnjax.core (shared with kernels and
# cpu); they are re-exported here under their historical names.
_dense = dense_attention


def xla_attention(q, k, v, a: AttentionArgs, *, return_lse=False, block_sizes=None):
  """The 'xla' implementation: dense logits in the input dtype with float32
  accumulation, GQA without repeating K/V.  Memory ``O(B N T S)``: for short sequences."""
  if block_sizes is not None:
    raise TypeError(f"block_sizes: 'xla' takes none, got {type(block_sizes).__name__}")
  out, lse = dense_attention(q, k, v, a, upcast=False)
  return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- logit recipes
# Score functions other than the scaled dot product, and cheap edits around softmax
# attention (catalog rows A08, A09, A14 and the J-family score functions). Those that are
# softmax attention on transformed q/k call the dispatcher through ``hooks.attention`` (so
# every implementation serves them); Sinkhorn and additive attention need the whole logit
# matrix and are plain ``jnp`` with ``O(B N T S)`` memory.

__all__ += ["cosine_attention", "sinkhorn_attention", "additive_attention",
            "collapsed_qk_attention", "context_broadcast", "log_n_scale"]


def _arr(name, x, ndim):
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be an array, got {type(x).__name__}")
  if x.ndim != ndim:
    raise ValueError(f"{name} must have rank {ndim}, got shape {x.shape}")


def _qkv_dims(q, k, v):
  # pylint: disable=import-outside-toplevel
  from attnjax.ops.heads import _check_qkv
  return _check_qkv(q, k, v)


def _l2_normalize(x, eps):
  x = x.astype(_jnp.float32)
  return x * _jax.lax.rsqrt(_jnp.maximum(_jnp.sum(x * x, -1, keepdims=True), eps * eps))


def cosine_attention(q, k, v, *, logit_scale, max_logit_scale: float = _math.log(100.0),
                     centered: bool = False, eps: float = 1e-6, **attention_kwargs):
  """Scaled cosine attention (Swin V2) and correlation attention (``centered=True``).

      s_ij = tau_n * cos(q_i, k_j),   tau_n = exp(min(logit_scale_n, max_logit_scale))

  With ``centered`` q and k are centred over H first, so ``cos`` becomes the Pearson
  correlation of the two vectors.  Softmax attention on ``q_hat * tau`` and ``k_hat`` with
  ``scale=1`` through :func:`attnjax.attention` (any implementation, masks, GQA).

  Args:
    q, k, v: ``[B, T, N, H]``, ``[B, S, K, H]``, ``[B, S, K, Hv]``.
    logit_scale: ``[N]`` learnable log-scales (Swin V2 initialises ``log(10)``).
    max_logit_scale: the clamp, ``log(100)`` in Swin V2.
    eps: norms are floored at ``eps``.
    **attention_kwargs: passed to :func:`attnjax.attention` (not ``scale``).

  Papers: "Swin Transformer V2: Scaling Up Capacity and Resolution"; correlation
  attention as in "Focus the Discrepancy: Intra- and Inter-Correlation Learning for Image
  Anomaly Detection" (catalog J06).
  """
  _, _, N, _, _, _, _ = _qkv_dims(q, k, v)
  if "scale" in attention_kwargs:
    raise TypeError("scale: cosine_attention's scale is exp(logit_scale); pass none")
  _arr("logit_scale", logit_scale, 1)
  if logit_scale.shape != (N,):
    raise ValueError(f"logit_scale must be [N] = [{N}], got shape {logit_scale.shape}")
  qf, kf = q.astype(_jnp.float32), k.astype(_jnp.float32)
  if centered:
    qf = qf - _jnp.mean(qf, -1, keepdims=True)
    kf = kf - _jnp.mean(kf, -1, keepdims=True)
  tau = _jnp.exp(_jnp.minimum(logit_scale.astype(_jnp.float32), max_logit_scale))
  qn = _l2_normalize(qf, eps) * tau[:, None]
  kn = _l2_normalize(kf, eps)
  return _hooks.attention(qn.astype(q.dtype), kn.astype(k.dtype), v, scale=1.0,
                          **attention_kwargs)


def _masked_lse(L, ok, axis):
  # the shift m cancels mathematically: no gradient through it
  m = _jax.lax.stop_gradient(_jnp.max(_jnp.where(ok, L, -_jnp.inf), axis=axis, keepdims=True))
  m = _jnp.where(_jnp.isfinite(m), m, 0.0)
  ssum = _jnp.sum(_jnp.where(ok, _jnp.exp(_jnp.where(ok, L - m, 0.0)), 0.0), axis=axis,
                  keepdims=True)
  return m + _jnp.log(_jnp.where(ssum > 0, ssum, 1.0))


def sinkhorn_attention(q, k, v, *, num_iters: int = 3, scale=None, causal: bool = False,
                       q_segment_ids=None, kv_segment_ids=None, return_weights: bool = False):
  """Sinkformer attention: the exponentiated logits made (nearly) doubly stochastic.

      K^0 = exp(s),  s_ij = scale * q_i . k_j    (allowed pairs only)
      iteration l = 1, 2, ...: odd l normalises the rows (sum_j = 1), even l the columns
      (sum_i = T / S, i.e. 1 for square self-attention); o_i = sum_j K^L_ij v_j

  One iteration is exactly softmax attention; the rows sum to 1 after every odd
  iteration and the columns converge to ``T/S`` (Sinkhorn's theorem, positive entries).
  Computed in the log domain, float32, plain ``jnp`` (``O(B N T S)`` memory).  With a mask
  (causal or segments) the iteration runs on the allowed pairs; rows/columns with none
  stay 0.

  Args:
    q, k, v: ``[B, T, N, H]``, ``[B, S, K, H]``, ``[B, S, K, Hv]``.
    num_iters: Sinkhorn iterations (>= 1; the paper uses 3 for ViT).
    scale: default ``1/sqrt(H)``.
    causal, q_segment_ids, kv_segment_ids: the allowed pairs.
    return_weights: also return the weights ``[B, N, T, S]``.

  Returns: ``[B, T, N, Hv]`` in ``q.dtype`` (and the weights).  Paper: "Sinkformers:
  Transformers with Doubly Stochastic Attention".
  """
  # pylint: disable=import-outside-toplevel
  from attnjax.ops.heads import _expand_kv, plain_allowed
  B, T, N, H, S, _, _ = _qkv_dims(q, k, v)
  if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
    raise ValueError(f"num_iters must be an int >= 1, got num_iters={num_iters!r}")
  scale = H ** -0.5 if scale is None else scale
  L = scale * _jnp.einsum("btnh,bsnh->bnts", q.astype(_jnp.float32),
                          _expand_kv(k, N).astype(_jnp.float32))
  ok = plain_allowed(B, T, S, causal=causal, q_segment_ids=q_segment_ids,
                     kv_segment_ids=kv_segment_ids)
  col = _math.log(T / S)
  for it in range(num_iters):
    if it % 2 == 0:
      L = _jnp.where(ok, L - _masked_lse(L, ok, -1), 0.0)
    else:
      L = _jnp.where(ok, L - _masked_lse(L, ok, -2) + col, 0.0)
  P = _jnp.where(ok, _jnp.exp(_jnp.where(ok, L, 0.0)), 0.0)
  out = _jnp.einsum("bnts,bsnh->btnh", P, _expand_kv(v, N).astype(_jnp.float32)).astype(q.dtype)
  # attnjax.analysis interception point (a no-op unless observed): the map is P
  out = _hooks.intercepted("sinkhorn", lambda: out, q, k, v, probs=lambda: P)
  return (out, P) if return_weights else out


_ACTIVATIONS = {"tanh": _jnp.tanh, "relu": _jax.nn.relu, "gelu": _jax.nn.gelu,
                "silu": _jax.nn.silu}


def additive_attention(q, k, v, w, *, bias=None, activation="tanh", causal: bool = False,
                       q_segment_ids=None, kv_segment_ids=None):
  """Additive (Bahdanau) attention and MLP-scored ("neural") attention.

      e_ij = sum_a w[n, a] * act(q[i, n, a] + k[j, g(n), a] + bias[n, a])
      o_i  = sum_j softmax_j(e_ij | allowed) v_j

  ``q = W x`` and ``k = U c`` are the projected query and key (the layer's projections),
  so ``e = w^T tanh(W q + U k)`` is Bahdanau's score; any other ``activation`` gives the
  one-hidden-layer MLP score of "Neural Attention" (an MLP on ``[q; k]`` splits into the
  two projections).  No ``1/sqrt(H)`` scale.  Plain ``jnp``: memory ``O(B N T S A)``.

  Args:
    q: ``[B, T, N, A]``; k: ``[B, S, K, A]``; v: ``[B, S, K, Hv]``.
    w: ``[N, A]`` score vectors; bias: ``[N, A]`` or None.
    activation: 'tanh' (Bahdanau), 'relu', 'gelu', 'silu' or a callable.
    causal, q_segment_ids, kv_segment_ids: the allowed pairs.

  Returns: ``[B, T, N, Hv]`` in ``q.dtype``.  Papers: "Neural Machine Translation by
  Jointly Learning to Align and Translate"; "Neural Attention: A Novel Mechanism for
  Enhanced Expressive Power in Transformer Models".
  """
  # pylint: disable=import-outside-toplevel
  from attnjax.ops.heads import _expand_kv, masked_softmax, plain_allowed
  B, T, N, A, S, _, _ = _qkv_dims(q, k, v)
  _arr("w", w, 2)
  if w.shape != (N, A):
    raise ValueError(f"w must be [N, A] = {(N, A)}, got shape {w.shape}")
  if bias is not None:
    _arr("bias", bias, 2)
    if bias.shape != (N, A):
      raise ValueError(f"bias must be [N, A] = {(N, A)}, got shape {bias.shape}")
  if isinstance(activation, str):
    if activation not in _ACTIVATIONS:
      raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)} or a callable, got "
                       f"activation={activation!r}")
    act = _ACTIVATIONS[activation]
  elif callable(activation):
    act = activation
  else:
    raise TypeError(f"activation must be a string or a callable, got {type(activation).__name__}")
  qf = q.astype(_jnp.float32).transpose(0, 2, 1, 3)  # [B, N, T, A]
  kf = _expand_kv(k, N).astype(_jnp.float32).transpose(0, 2, 1, 3)  # [B, N, S, A]
  h = qf[:, :, :, None, :] + kf[:, :, None, :, :]
  if bias is not None:
    h = h + bias.astype(_jnp.float32)[None, :, None, None, :]
  e = _jnp.einsum("bntsa,na->bnts", act(h), w.astype(_jnp.float32))
  ok = plain_allowed(B, T, S, causal=causal, q_segment_ids=q_segment_ids,
                     kv_segment_ids=kv_segment_ids)
  p = masked_softmax(e, ok)
  out = _jnp.einsum("bnts,bsnh->btnh", p, _expand_kv(v, N).astype(_jnp.float32)).astype(q.dtype)
  # attnjax.analysis interception point (a no-op unless observed): the map is p
  return _hooks.intercepted("softmax", lambda: out, q, k, v, probs=lambda: p)


def collapsed_qk_attention(x, w, *, symmetric: bool = False, v=None, **attention_kwargs):
  """Collapsed-QK attention: one bilinear form per head in place of ``W_Q W_K^T``.

      s_ij = scale * x_i W_n x_j^T      (W_n [D, D]; q_i = x_i W_n, k_j = x_j)
      symmetric: W_n = W'_n W'_n^T      (W'_n [D, R]; q = k = x W'_n)

  Values default to the input itself (the paper removes the value and output
  projections); pass ``v`` for projected values.  Softmax attention through
  :func:`attnjax.attention` (default scale ``1/sqrt(D)``, or ``1/sqrt(R)`` symmetric).

  Args:
    x: ``[B, T, D]``.
    w: ``[D, N, D]`` (or ``[D, N, R]`` with ``symmetric``).
    v: ``[B, T, Kv, Hv]`` or None (then ``x`` as one value head, ``N`` heads if
      symmetric).
    **attention_kwargs: passed to :func:`attnjax.attention`.

  Returns: ``[B, T, N, Hv]``.  Paper: "Reducing the Transformer Architecture to a Minimum".
  """
  _arr("x", x, 3)
  _arr("w", w, 3)
  B, T, D = x.shape
  if w.shape[0] != D or (not symmetric and w.shape[2] != D):
    want = "[D, N, R]" if symmetric else "[D, N, D]"
    raise ValueError(f"w must be {want} with D={D}, got shape {w.shape}")
  N = w.shape[1]
  q = _jnp.einsum("btd,dne->btne", x, w.astype(x.dtype))
  if v is not None:
    _arr("v", v, 4)
    if v.shape[:2] != (B, T):
      raise ValueError(f"v must be [B, T] = {(B, T)} + [Kv, Hv], got shape {v.shape}")
  if symmetric:
    k = q
    if v is None:
      v = _jnp.broadcast_to(x[:, :, None, :], (B, T, N, D))
    elif v.shape[2] != N:
      if N % v.shape[2]:
        raise ValueError(f"v heads Kv={v.shape[2]} must divide N={N} (symmetric: k has N heads)")
      v = _jnp.repeat(v, N // v.shape[2], axis=2)
  else:
    Kv = 1 if v is None else v.shape[2]
    k = _jnp.broadcast_to(x[:, :, None, :], (B, T, Kv, D))
    if v is None:
      v = x[:, :, None, :]
  return _hooks.attention(q, k, v, **attention_kwargs)


def context_broadcast(x, *, causal: bool = False, average: bool = False):
  """Context broadcasting: add the uniform-attention output ``mean_j x_j`` to every token.

      y_i = x_i + (1/n_i) sum_{j in ctx(i)} x_j        ((x_i + mean) / 2 with ``average``)

  ``ctx(i)`` is every token, or ``j <= i`` with ``causal`` (a running mean).  It is
  attention with the uniform map ``A = 1 1^T / n``, so no logits are formed (``O(T D)``).

  Args:
    x: ``[B, T, D]`` (any rank >= 2: tokens on axis 1).

  Paper: "Scratching Visual Transformer's Back with Uniform Attention" (the public code
  uses the ``average`` form).
  """
  if not hasattr(x, "ndim") or x.ndim < 2:
    raise ValueError(f"x must be [B, T, ...], got {getattr(x, 'shape', type(x).__name__)}")
  xf = x.astype(_jnp.float32)
  if causal:
    n = _jnp.arange(1, x.shape[1] + 1, dtype=_jnp.float32).reshape((1, -1) + (1,) * (x.ndim - 2))
    mean = _jnp.cumsum(xf, axis=1) / n
  else:
    mean = _jnp.mean(xf, axis=1, keepdims=True)
  y = xf + mean
  return (0.5 * y if average else y).astype(x.dtype)


# (defined in attnjax.score_mods, below ops in the layering; re-exported here)
log_n_scale = _score_mods.log_n_scale
