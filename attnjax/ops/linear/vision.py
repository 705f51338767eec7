"""Vision linear attention (catalog D02, D09, D10, D11): L^2ViT, CARE, HIIF and FEAT.

Every op here costs time and memory linear in the number of tokens. Grid ops take the
token grid in head layout, ``q [B, Hh, Ww, N, H]``, ``k [B, Hh, Ww, K, H]``,
``v [B, Hh, Ww, K, Hv]`` (``N`` a multiple of ``K``; FEAT also takes video,
``[B, T, Hh, Ww, N, H]``); :func:`hiif_attention` is a sequence op (BTNH). Logits, sums and
convolutions run in float32; outputs are cast to the value dtype.

- :func:`l2vit_attention` -- "The Linear Attention Resurrection in Vision Transformer"
  (L^2ViT): enhanced linear global attention (``phi = ReLU``, normalised) whose output is
  re-concentrated by the Local Concentration Module (two depthwise 2-D convolutions on the
  output map, GELU between, residual).
- :func:`care_attention` -- "CARE Transformer: Mobile-Friendly Linear Visual Transformer via
  Decoupled Dual Interaction": linear attention on one channel part, a depthwise convolution
  on the other, then a dual interaction (each branch gated by the other).
- :func:`hiif_attention` -- the multi-head linear attention of "HIIF: Hierarchical Encoding
  based Implicit Image Function for Continuous Super-resolution", in the softmax-free
  Galerkin form ``o_i = q_i (LN(K)^T LN(V)) / S``.
- :func:`feat_attention` -- "FEAT: Full-Dimensional Efficient Attention Transformer for
  Medical Video Generation": spatial weighted key-value attention, then temporal weighted
  key-value attention (video only), a receptance gate, then global ``C x C`` channel
  attention.
- :func:`bidirectional_wkv` -- the bidirectional weighted key-value aggregation FEAT uses on
  one axis (channelwise, distance-decayed, linear cost through two prefix scans).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.core import hooks
from attnjax.ops.linear._args import _F32, DEFAULT_EPS, FeatureMap, _check_eps
from attnjax.ops.linear.kernelized import linear_attention

_HI = jax.lax.Precision.HIGHEST


def _shape(x):
  return getattr(x, 'shape', type(x))


def _check_float(name, x):
  if not hasattr(x, 'dtype') or not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f'{name} must be a floating array, got dtype {getattr(x, "dtype", type(x))}')


def _check_grid_qkv(q, k, v):
  """Validates ``q [B, Hh, Ww, N, H]``, ``k [B, Hh, Ww, K, H]``, ``v [B, Hh, Ww, K, Hv]``."""
  for name, x in (('q', q), ('k', k), ('v', v)):
    if not hasattr(x, 'ndim') or x.ndim != 5:
      raise ValueError(f'{name} must have rank 5 ([B, Hh, Ww, heads, dim]), got shape '
                       f'{_shape(x)}')
    _check_float(name, x)
  B, Hh, Ww, N, H = q.shape
  if k.shape[:3] != (B, Hh, Ww) or k.shape[4] != H:
    raise ValueError(f'k must have shape [B={B}, Hh={Hh}, Ww={Ww}, K, H={H}], got {k.shape}')
  K = k.shape[3]
  if v.shape[:4] != (B, Hh, Ww, K):
    raise ValueError(f'v must have shape [B={B}, Hh={Hh}, Ww={Ww}, K={K}, Hv], got {v.shape}')
  if K == 0 or N % K:
    raise ValueError(f'number of query heads N={N} must be a multiple of kv heads K={K}')
  return B, Hh, Ww, N, H, K, v.shape[4]


def _as_tokens(x):
  B, Hh, Ww = x.shape[:3]
  return x.reshape((B, Hh * Ww) + x.shape[3:])


def _depthwise2d(x_BHWC, kernel, bias, name):
  """'SAME' depthwise 2-D convolution of ``[B, Hh, Ww, C]`` with ``kernel [kh, kw, C]``
  (odd window) and ``bias [C]`` or None; float32."""
  C = x_BHWC.shape[-1]
  if not hasattr(kernel, 'ndim') or kernel.ndim != 3 or kernel.shape[-1] != C:
    raise ValueError(f'{name} must have shape [kh, kw, {C}], got {_shape(kernel)}')
  if any(w % 2 == 0 for w in kernel.shape[:2]):
    raise ValueError(f'{name} window must be odd (SAME padding), got {kernel.shape[:2]}')
  y = jax.lax.conv_general_dilated(
      x_BHWC.astype(_F32), kernel.astype(_F32)[:, :, None, :], (1, 1), 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=C, precision=_HI)
  if bias is not None:
    if jnp.shape(bias) != (C,):
      raise ValueError(f'{name.replace("kernel", "bias")} must have shape ({C},), got '
                       f'{jnp.shape(bias)}')
    y = y + jnp.asarray(bias, _F32)
  return y


def _global_map(q, k, feature_map, eps):
  """The normalised global linear attention's weights ``[B, N, T, S]`` float32 (tokens
  row-major): the op on one-hot values (it is linear in ``v``)."""
  qt, kt = _as_tokens(q), _as_tokens(k)
  B, S, K = kt.shape[:3]
  onehot = jnp.broadcast_to(jnp.eye(S, dtype=_F32)[None, :, None, :], (B, S, K, S))
  w = linear_attention(qt.astype(_F32), kt.astype(_F32), onehot, feature_map=feature_map,
                       normalize=True, eps=eps, implementation='xla')
  return jnp.transpose(w, (0, 2, 1, 3))


def _per_channel(w, Hv):
  """``[B, N, T, S] -> [B, N * Hv, T, S]``: each head's map repeated for its channels."""
  return jnp.repeat(w, Hv, axis=1)


def _conv_map(kernel, Hh, Ww):
  """The 'SAME' depthwise convolution ``kernel [kh, kw, C]`` as per-channel token matrices
  ``[C, T, T]`` (``conv(x)[t, c] = sum_s m[c, t, s] x[s, c]``, row-major tokens)."""
  T, C = Hh * Ww, kernel.shape[-1]
  eye = jnp.broadcast_to(jnp.eye(T, dtype=_F32).reshape(T, Hh, Ww, 1), (T, Hh, Ww, C))
  cols = _depthwise2d(eye, kernel, None, 'kernel')                    # [s, Hh, Ww, C]
  return jnp.transpose(cols.reshape(T, T, C), (2, 1, 0))


def _std_normal_cdf(x):
  return 0.5 * (1.0 + jax.lax.erf(x * (2.0 ** -0.5)))


# --------------------------------------------------------------------------------------
# L^2ViT: enhanced linear global attention + Local Concentration Module
# --------------------------------------------------------------------------------------


def _lcm_extras(q, k, v, flat, eps):
  """L^2ViT's whole mechanism as per-channel token maps (see :func:`l2vit_attention`)."""
  B, Hh, Ww, N, _ = q.shape
  Hv = v.shape[-1]
  T, C = Hh * Ww, N * Hv
  w = _global_map(q, k, 'relu', eps)                                   # [B, N, T, S]
  (k1, b1), (k2, b2) = flat
  x = jnp.einsum('bnts,bsnv->btnv', w, jnp.repeat(_as_tokens(v).astype(_F32), N // v.shape[3],
                                                   axis=2), precision=_HI)
  phi = _std_normal_cdf(_depthwise2d(x.reshape(B, Hh, Ww, C), k1, b1, 'lcm_kernels[0]'))
  m1, m2 = _conv_map(k1, Hh, Ww), _conv_map(k2, Hh, Ww)                # [C, T, T]
  gated = m1[None] * phi.reshape(B, T, C).transpose(0, 2, 1)[..., None]
  lcm = jnp.eye(T, dtype=_F32) + jnp.einsum('cts,bcsu->bctu', m2, gated, precision=_HI)
  full = jnp.einsum('bctu,bcus->bcts', lcm, _per_channel(w, Hv), precision=_HI)
  zero = jnp.zeros((C,), _F32)
  off = _depthwise2d(phi * (zero if b1 is None else b1), k2, b2, 'lcm_kernels[1]')
  return {'lcm': full, 'lcm_offset': off.reshape(B, T, N, Hv)}


def l2vit_attention(q, k, v, *, lcm_kernels=None, lcm_biases=None, eps: float = DEFAULT_EPS):
  """L^2ViT's enhanced linear global attention with the Local Concentration Module.

  "The Linear Attention Resurrection in Vision Transformer" (Zheng).

  ``O = ReLU(Q) (ReLU(K)^T V) / (ReLU(Q) sum_j ReLU(K_j) + eps)`` over all ``Hh * Ww``
  tokens (non-negative weights, each row sums to 1; a row with no positive weight gives 0),
  then, with ``lcm_kernels=(W1, W2)``, the LCM re-concentrates the output map locally:
  ``O' = O + DW_2(GELU(DW_1(O)))`` with ``DW`` a 'SAME' depthwise 2-D convolution over the
  ``N * Hv`` output channels (exact erf GELU).

  Observed by :mod:`attnjax.analysis` with the LCM, the op is one call whose map is the
  global attention ``[B, N, T, S]`` (head gates act on the op's output), and whose extras
  write the whole mechanism per output channel ``c`` with ``GELU(h) = h Phi(h)`` at the
  actual pre-activations ``h``: ``'lcm'`` ``[B, N * Hv, T, S] = (I + K2_c diag(Phi(h_c))
  K1_c) W_n`` (``K_c`` a convolution's token matrix) and ``'lcm_offset'`` ``[B, T, N, Hv]
  = K2_c (Phi(h_c) b1_c) + b2_c``, so that ``out[:, t, c] = sum_s lcm[c, t, s] v[s, c] +
  offset[t, c]``.

  Args:
    q: ``[B, Hh, Ww, N, H]``. k: ``[B, Hh, Ww, K, H]``. v: ``[B, Hh, Ww, K, Hv]``.
    lcm_kernels: None (no LCM) or a pair of ``[kh, kw, N, Hv]`` depthwise kernels (odd
      windows).
    lcm_biases: None or a pair of ``[N, Hv]`` biases (needs ``lcm_kernels``).
    eps: denominator guard.

  Returns:
    ``[B, Hh, Ww, N, Hv]`` in ``v.dtype``.
  """
  B, Hh, Ww, N, H, K, Hv = _check_grid_qkv(q, k, v)
  eps = _check_eps(eps)

  def global_attention():
    o = linear_attention(_as_tokens(q), _as_tokens(k), _as_tokens(v), feature_map='relu',
                         normalize=True, eps=eps, implementation='xla')
    return o.astype(_F32).reshape(B, Hh, Ww, N, Hv)
  if lcm_kernels is None:
    if lcm_biases is not None:
      raise ValueError('lcm_biases needs lcm_kernels (got lcm_kernels=None)')
    return global_attention().astype(v.dtype)
  if not isinstance(lcm_kernels, (tuple, list)) or len(lcm_kernels) != 2:
    raise ValueError(f'lcm_kernels must be None or a pair of [kh, kw, N={N}, Hv={Hv}] arrays, '
                     f'got {type(lcm_kernels).__name__}')
  biases = (None, None) if lcm_biases is None else lcm_biases
  if not isinstance(biases, (tuple, list)) or len(biases) != 2:
    raise ValueError(f'lcm_biases must be None or a pair of [N={N}, Hv={Hv}] arrays')
  flat = []
  for i, (w, b) in enumerate(zip(lcm_kernels, biases)):
    if not hasattr(w, 'ndim') or w.ndim != 4 or w.shape[2:] != (N, Hv):
      raise ValueError(f'lcm_kernels[{i}] must have shape [kh, kw, N={N}, Hv={Hv}], got '
                       f'{_shape(w)}')
    if b is not None and jnp.shape(b) != (N, Hv):
      raise ValueError(f'lcm_biases[{i}] must have shape ({N}, {Hv}), got {jnp.shape(b)}')
    flat.append((w.reshape(w.shape[:2] + (N * Hv,)),
                 None if b is None else jnp.reshape(b, (N * Hv,))))
  if hooks.observing():  # attnjax.analysis: one observed call (the inner one is nested)
    T = Hh * Ww
    return hooks.intercepted('linear', lambda: l2vit_attention(
        q, k, v, lcm_kernels=lcm_kernels, lcm_biases=lcm_biases, eps=eps).reshape(
            B, T, N, Hv), _as_tokens(q), _as_tokens(k), _as_tokens(v),
        probs=lambda: _global_map(q, k, 'relu', eps),
        extras=lambda: _lcm_extras(q, k, v, flat, eps)).reshape(B, Hh, Ww, N, Hv)
  x = global_attention().reshape(B, Hh, Ww, N * Hv)
  h = jax.nn.gelu(_depthwise2d(x, *flat[0], 'lcm_kernels[0]'), approximate=False)
  h = _depthwise2d(h, *flat[1], 'lcm_kernels[1]')
  return (x + h).reshape(B, Hh, Ww, N, Hv).astype(v.dtype)


# --------------------------------------------------------------------------------------
# CARE: asymmetric decoupling + dual interaction
# --------------------------------------------------------------------------------------


def care_attention(q, k, v, x_local, *, conv_kernel, local_to_global, global_to_local,
                   conv_bias=None, feature_map: FeatureMap = 'elu+1',
                   eps: float = DEFAULT_EPS):
  """CARE's decoupled linear attention / local convolution with a dual interaction.

  "CARE Transformer: Mobile-Friendly Linear Visual Transformer via Decoupled Dual
  Interaction" (Zhou et al.).

  The channels are split asymmetrically before this op: one part gives ``q, k, v`` (global
  branch), the other, ``x_local``, is the local branch.

  - global: ``G = phi(Q) (phi(K)^T V) / (phi(Q) sum_j phi(K_j) + eps)`` over all tokens;
  - local: ``L = DW(x_local)``, a 'SAME' depthwise 2-D convolution (+ ``conv_bias``);
  - dual interaction: ``G' = G * sigmoid(L W_lg)``, ``L' = L * sigmoid(G W_gl)`` (each
    branch is gated by the other; ``W_lg = local_to_global``, ``W_gl = global_to_local``).

  The paper's dynamic memory unit (a feature carried from layer to layer into the second
  interaction) is not part of this op (see docs/linear.md).

  Observed by :mod:`attnjax.analysis`, the op is one call whose map is the global attention
  ``W [B, N, T, S]`` (head gates act on ``G'``); its extras are ``'global'`` ``[B, N * Hv,
  T, S] = sigmoid(L W_lg)_tc W_n,ts`` (``G' = global @ v`` per channel), ``'local'``
  ``[B, Cl, T, T] = sigmoid(G W_gl)_tc K_c,ts`` (``K_c`` the convolution's token matrix)
  and ``'local_offset'`` ``[B, T, Cl] = sigmoid(G W_gl)_tc conv_bias_c``, so that
  ``L'[t, c] = sum_s local[c, t, s] x_local[s, c] + local_offset[t, c]``.

  Args:
    q: ``[B, Hh, Ww, N, H]``. k: ``[B, Hh, Ww, K, H]``. v: ``[B, Hh, Ww, K, Hv]``.
    x_local: ``[B, Hh, Ww, Cl]``.
    conv_kernel: ``[kh, kw, Cl]`` (odd window). conv_bias: None or ``[Cl]``.
    local_to_global: ``[Cl, N, Hv]``. global_to_local: ``[N, Hv, Cl]``.
    feature_map: as in :func:`~attnjax.ops.linear.linear_attention` (default ``'elu+1'``).
    eps: denominator guard.

  Returns:
    ``(G' [B, Hh, Ww, N, Hv] in v.dtype, L' [B, Hh, Ww, Cl] in x_local.dtype)``.
  """
  B, Hh, Ww, N, H, K, Hv = _check_grid_qkv(q, k, v)
  eps = _check_eps(eps)
  if not hasattr(x_local, 'ndim') or x_local.ndim != 4 or x_local.shape[:3] != (B, Hh, Ww):
    raise ValueError(f'x_local must have shape [B={B}, Hh={Hh}, Ww={Ww}, Cl], got '
                     f'{_shape(x_local)}')
  _check_float('x_local', x_local)
  Cl = x_local.shape[-1]
  if jnp.shape(local_to_global) != (Cl, N, Hv):
    raise ValueError(f'local_to_global must have shape ({Cl}, {N}, {Hv}) [Cl, N, Hv], got '
                     f'{jnp.shape(local_to_global)}')
  if jnp.shape(global_to_local) != (N, Hv, Cl):
    raise ValueError(f'global_to_local must have shape ({N}, {Hv}, {Cl}) [N, Hv, Cl], got '
                     f'{jnp.shape(global_to_local)}')

  def parts():  # the two branches and their sigmoid gates, float32
    g = linear_attention(_as_tokens(q), _as_tokens(k), _as_tokens(v), feature_map=feature_map,
                         normalize=True, eps=eps, implementation='xla')
    g = g.astype(_F32).reshape(B, Hh, Ww, N, Hv)
    loc = _depthwise2d(x_local, conv_kernel, conv_bias, 'conv_kernel')
    gate_g = jnp.einsum('bhwc,cnv->bhwnv', loc, jnp.asarray(local_to_global, _F32),
                        precision=_HI)
    gate_l = jnp.einsum('bhwnv,nvc->bhwc', g, jnp.asarray(global_to_local, _F32),
                        precision=_HI)
    return g, loc, jax.nn.sigmoid(gate_g), jax.nn.sigmoid(gate_l)

  if hooks.observing():  # attnjax.analysis: one observed call (the inner one is nested)
    T = Hh * Ww

    def run():
      gp, lp = care_attention(q, k, v, x_local, conv_kernel=conv_kernel,
                              local_to_global=local_to_global, global_to_local=global_to_local,
                              conv_bias=conv_bias, feature_map=feature_map, eps=eps)
      return gp.reshape(B, T, N, Hv), lp

    def extras():
      _, _, sg, sl = parts()
      sl = sl.reshape(B, T, Cl)
      bias = jnp.zeros((Cl,), _F32) if conv_bias is None else jnp.asarray(conv_bias, _F32)
      return {'global': _per_channel(_global_map(q, k, feature_map, eps), Hv)
                        * jnp.swapaxes(sg.reshape(B, T, N * Hv), 1, 2)[..., None],
              'local': _conv_map(conv_kernel, Hh, Ww)[None] * jnp.swapaxes(sl, 1, 2)[..., None],
              'local_offset': sl * bias}
    gp, lp = hooks.intercepted('linear', run, _as_tokens(q), _as_tokens(k), _as_tokens(v),
                               probs=lambda: _global_map(q, k, feature_map, eps), extras=extras)
    return gp.reshape(B, Hh, Ww, N, Hv), lp
  g, loc, sg, sl = parts()
  return (g * sg).astype(v.dtype), (loc * sl).astype(x_local.dtype)


# --------------------------------------------------------------------------------------
# HIIF: multi-head (Galerkin-type) linear attention
# --------------------------------------------------------------------------------------


def _instance_norm(x, eps):
  mu = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + eps)


def hiif_attention(q, k, v, *, eps: float = 1e-5):
  """HIIF's multi-head linear attention (softmax-free, Galerkin-type normalisation).

  "HIIF: Hierarchical Encoding based Implicit Image Function for Continuous
  Super-resolution" (Jiang et al.); the Galerkin form is that of "Choose a Transformer:
  Fourier or Galerkin" (Cao).

  Per head: ``o_i = q_i (LN(K)^T LN(V)) / S`` with ``LN`` a layer norm without affine
  parameters over the head dimension (``(x - mean) / sqrt(var + eps)``), so the ``[H, Hv]``
  context is an average over the ``S`` keys: linear in tokens, non-causal.

  Args:
    q: ``[B, T, N, H]``. k: ``[B, S, K, H]``. v: ``[B, S, K, Hv]``; ``N % K == 0``.
    eps: the layer-norm epsilon.

  Returns:
    ``[B, T, N, Hv]`` in ``v.dtype``.
  """
  for name, x in (('q', q), ('k', k), ('v', v)):
    if not hasattr(x, 'ndim') or x.ndim != 4:
      raise ValueError(f'{name} must have rank 4 (BTNH layout), got shape {_shape(x)}')
    _check_float(name, x)
  B, T, N, H = q.shape
  if k.shape[0] != B or k.shape[3] != H:
    raise ValueError(f'k must have shape [B={B}, S, K, H={H}], got {k.shape}')
  S, K = k.shape[1:3]
  if v.shape[:3] != (B, S, K):
    raise ValueError(f'v must have shape [B={B}, S={S}, K={K}, Hv], got {v.shape}')
  if K == 0 or N % K:
    raise ValueError(f'number of query heads N={N} must be a multiple of kv heads K={K}')
  if S == 0:
    raise ValueError('k must have at least one token (S >= 1)')
  eps = _check_eps(eps)
  kn = _instance_norm(k.astype(_F32), eps)
  vn = _instance_norm(v.astype(_F32), eps)
  ctx = jnp.einsum('bskh,bskv->bkhv', kn, vn, precision=_HI) / S
  qg = q.astype(_F32).reshape(B, T, K, N // K, H)
  o = jnp.einsum('btkgh,bkhv->btkgv', qg, ctx, precision=_HI)
  o = o.reshape(B, T, N, v.shape[-1]).astype(v.dtype)
  # attnjax.analysis interception point (a no-op unless observed): the implied weights
  # q_t . LN(k_s) / S, applied to the normalised values LN(v)
  return hooks.intercepted('linear', lambda: o, q, k, v, probs=lambda: jnp.einsum(
      'btkgh,bskh->bkgts', qg, kn, precision=_HI).reshape(B, N, T, S) / S)


# --------------------------------------------------------------------------------------
# FEAT: weighted key-value (spatial, temporal) + global channel attention
# --------------------------------------------------------------------------------------


def _linear_scan(a, b):
  """``c_t = a c_{t-1} + b_t`` along axis 1 from ``c_0 = b_0``; ``a`` broadcasts."""
  a = jnp.broadcast_to(a, b.shape)

  def combine(x, y):
    return x[0] * y[0], y[0] * x[1] + y[1]
  return jax.lax.associative_scan(combine, (a, b), axis=1)[1]


def bidirectional_wkv(k, v, *, decay, bonus, axis: int = 1):
  """Bidirectional weighted key-value aggregation along one axis (channelwise).

  For positions ``t, i`` on an axis of length ``L`` and each channel:
  ``w_ti = exp(-(|t - i| - 1) decay / L + k_i)`` for ``i != t``, ``w_tt = exp(bonus + k_t)``;
  ``wkv_t = sum_i w_ti v_i / sum_i w_ti``. Computed in O(L) from a forward and a backward
  prefix scan (``k`` is shifted by its maximum along the axis, which cancels in the ratio).
  This is the weighted key-value attention of FEAT (the bidirectional form of Vision-RWKV's
  WKV).

  Args:
    k, v: ``[..., L, ..., N, H]`` with the same shape (``L`` at ``axis``).
    decay, bonus: ``[N, H]`` (per channel; ``decay >= 0`` decays with distance).
    axis: the token axis (not one of the last two).

  Returns:
    ``v``'s shape, float32.
  """
  if k.shape != v.shape:
    raise ValueError(f'k and v must have the same shape, got k {k.shape}, v {v.shape}')
  nh = k.shape[-2:]
  for name, x in (('decay', decay), ('bonus', bonus)):
    if jnp.shape(x) != nh:
      raise ValueError(f'{name} must have shape {nh} [N, H], got {jnp.shape(x)}')
  axis = axis % k.ndim
  if axis >= k.ndim - 2:
    raise ValueError(f'axis must index a token axis (not the last two), got axis={axis}')
  L = k.shape[axis]
  k32 = jnp.moveaxis(k.astype(_F32), axis, 1)
  v32 = jnp.moveaxis(v.astype(_F32), axis, 1)
  k32 = k32 - jax.lax.stop_gradient(jnp.max(k32, axis=1, keepdims=True))
  ek = jnp.exp(k32)
  kv = jnp.stack([ek * v32, ek], axis=-1)                         # [.., L, .., N, H, 2]
  a = jnp.exp(-jnp.asarray(decay, _F32) / L)[..., None]          # per-step decay
  fwd = _linear_scan(a, kv)                                       # sum_{i<=t}
  bwd = jnp.flip(_linear_scan(a, jnp.flip(kv, 1)), 1)             # sum_{i>=t}
  # exclusive sums: sum_{i<t} a^(t-1-i) x_i = fwd_{t-1}; same backwards.
  pad = jnp.zeros_like(kv[:, :1])
  past = jnp.concatenate([pad, fwd[:, :-1]], axis=1)
  future = jnp.concatenate([bwd[:, 1:], pad], axis=1)
  self_w = jnp.exp(jnp.asarray(bonus, _F32))[..., None] * kv
  tot = past + future + self_w
  num, den = tot[..., 0], tot[..., 1]
  pos = den > 0
  out = jnp.where(pos, num / jnp.where(pos, den, 1.0), 0.0)
  return jnp.moveaxis(out, 1, axis)


def wkv_weights(k, *, decay, bonus):
  """The weights of :func:`bidirectional_wkv` along axis 1: ``k [X, L, N, H]`` ->
  ``[X, N, H, L, L]`` float32, ``W[.., t, i] = w_ti / sum_i w_ti`` (rows sum to 1), so that
  ``bidirectional_wkv(k, v)[:, t] == sum_i W[.., t, i] v[:, i]`` per channel."""
  L = k.shape[1]
  pos = jnp.arange(L)
  dist = jnp.abs(pos[:, None] - pos[None, :]).astype(_F32)              # [t, i]
  kk = jnp.moveaxis(k.astype(_F32), 1, -1)[..., None, :]                # [X, N, H, 1, i]
  d = jnp.asarray(decay, _F32)[..., None, None]
  logits = jnp.where(dist == 0, jnp.asarray(bonus, _F32)[..., None, None] + kk,
                     -(dist - 1.0) * d / L + kk)
  return jax.nn.softmax(logits, axis=-1)


def _feat_wkv_map(k, video, temporal_decay, temporal_bonus, spatial_decay, spatial_bonus):
  """FEAT's spatial (x temporal) WKV as one per-channel token map ``[B, C, L, L]`` over the
  ``L`` tokens of a sample (frame-major, row-major inside a frame): the WKV output of
  channel ``c`` is ``M[c] @ v[:, c]``."""
  shape = k.shape
  B, N, H = shape[0], shape[-2], shape[-1]
  P = shape[-4] * shape[-3]
  if not video:
    ws = wkv_weights(k.reshape(B, P, N, H), decay=spatial_decay, bonus=spatial_bonus)
    return ws.reshape(B, N * H, P, P)
  T = shape[1]
  ks = k.reshape(B, T, P, N, H)
  ws = wkv_weights(ks.reshape(B * T, P, N, H), decay=spatial_decay, bonus=spatial_bonus)
  ws = ws.reshape(B, T, N * H, P, P)                                     # [B, f', c, t, i]
  wt = wkv_weights(jnp.swapaxes(ks, 1, 2).reshape(B * P, T, N, H), decay=temporal_decay,
                   bonus=temporal_bonus).reshape(B, P, N * H, T, T)      # [B, t, c, f, f']
  m = jnp.einsum('btcfg,bgcti->bcftgi', wt, ws, precision=_HI)
  return m.reshape(B, N * H, T * P, T * P)


def _safe_l2(x, axis):
  ss = jnp.sum(x * x, axis=axis, keepdims=True)
  pos = ss > 0
  return jnp.where(pos, x * jax.lax.rsqrt(jnp.where(pos, ss, 1.0)), 0.0)


def feat_attention(r, k, v, *, spatial_decay, spatial_bonus, temporal_decay=None,
                   temporal_bonus=None, channel_temperature=1.0):
  """FEAT's full-dimensional efficient attention: spatial -> temporal -> channel.

  "FEAT: Full-Dimensional Efficient Attention Transformer for Medical Video Generation"
  (Wang et al.).

  With :func:`bidirectional_wkv` (``WKV``) and ``C = N * H`` channels:

  1. spatial: ``S = WKV_{Hh*Ww}(K, V)`` over the row-major ``Hh * Ww`` tokens of each frame
     (``spatial_decay``, ``spatial_bonus``);
  2. temporal (video only): ``T = WKV_T(K, S)`` over the frames at each position
     (``temporal_decay``, ``temporal_bonus``); images skip it (``T = S``);
  3. receptance gate: ``Y = sigmoid(R) * T``;
  4. global channel attention: ``A = softmax_rows(tau Yn^T Yn)`` (``[C, C]``, ``Yn`` = ``Y``
     L2-normalised over all tokens of the sample, ``tau = channel_temperature``) and
     ``O = Y A^T``: each output channel is a convex combination of the ``C`` channels.

  Each step is linear in the number of tokens (``C^2`` per token for step 4). The same keys
  weight both token axes, so steps 1-2 apply the product of a spatial and a temporal
  distance-decayed weight (a factorised space-time weighting).

  Args:
    r, k, v: ``[B, T, Hh, Ww, N, H]`` (video) or ``[B, Hh, Ww, N, H]`` (image), one shape.
    spatial_decay, spatial_bonus: ``[N, H]``.
    temporal_decay, temporal_bonus: ``[N, H]``, required for video, must be None for images.
    channel_temperature: a positive scalar (float or array; may be learned).

  Returns:
    the input shape, in ``v.dtype``.
  """
  for name, x in (('r', r), ('k', k), ('v', v)):
    if not hasattr(x, 'ndim') or x.ndim not in (5, 6):
      raise ValueError(f'{name} must have rank 6 [B, T, Hh, Ww, N, H] (video) or rank 5 '
                       f'[B, Hh, Ww, N, H] (image), got shape {_shape(x)}')
    _check_float(name, x)
  if k.shape != r.shape or v.shape != r.shape:
    raise ValueError(f'r, k and v must have one shape, got r {r.shape}, k {k.shape}, '
                     f'v {v.shape}')
  video = r.ndim == 6
  if video and (temporal_decay is None or temporal_bonus is None):
    raise ValueError('video input [B, T, Hh, Ww, N, H] needs temporal_decay and '
                     'temporal_bonus ([N, H])')
  if not video and (temporal_decay is not None or temporal_bonus is not None):
    raise ValueError('image input [B, Hh, Ww, N, H] has no time axis: temporal_decay and '
                     'temporal_bonus must be None')
  tau = jnp.asarray(channel_temperature, _F32)
  if tau.ndim != 0:
    raise ValueError(f'channel_temperature must be a scalar, got shape {tau.shape}')
  if isinstance(channel_temperature, (int, float)) and not channel_temperature > 0:
    raise ValueError(f'channel_temperature must be positive, got {channel_temperature!r}')
  shape = r.shape
  B, N, H = shape[0], shape[-2], shape[-1]
  Hh, Ww = shape[-4], shape[-3]
  lead = shape[:-4]                                               # (B,) or (B, T)
  ks = k.reshape(lead + (Hh * Ww, N, H))
  vs = v.reshape(lead + (Hh * Ww, N, H))
  s = bidirectional_wkv(ks, vs, decay=spatial_decay, bonus=spatial_bonus, axis=len(lead))
  if video:
    s = bidirectional_wkv(ks, s, decay=temporal_decay, bonus=temporal_bonus, axis=1)
  y = jax.nn.sigmoid(r.astype(_F32)).reshape(s.shape) * s
  yc = y.reshape(B, -1, N * H)                                    # [B, tokens, C]
  yn = _safe_l2(yc, axis=1)
  a = jax.nn.softmax(tau * jnp.einsum('bsc,bsd->bcd', yn, yn, precision=_HI), axis=-1)
  o = jnp.einsum('bsd,bcd->bsc', yc, a, precision=_HI)
  o = o.reshape(shape).astype(v.dtype)
  # attnjax.analysis interception point (a no-op unless observed): the channel map [C, C],
  # and as an extra the per-channel WKV token map [B, C, L, L]
  return hooks.intercepted('softmax', lambda: o, None, yc, yc, probs=lambda: a[:, None],
                           dims=(B, 1, N * H, N * H), extras=lambda: {'wkv': _feat_wkv_map(
                               k, video, temporal_decay, temporal_bonus, spatial_decay,
                               spatial_bonus)})


__all__ = ['l2vit_attention', 'care_attention', 'hiif_attention', 'feat_attention',
           'bidirectional_wkv', 'wkv_weights']
