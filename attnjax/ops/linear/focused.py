"""Focused Linear Attention: "FLatten Transformer: Vision Transformer using Focused Linear
Attention" (focused feature map + depthwise-convolution rank restoration).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.ops.linear._args import _F32, DEFAULT_BLOCK_LEN, DEFAULT_EPS, _check_qkv
from attnjax.ops.linear.kernelized import linear_attention

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
    raise ValueError(f'dwc_kernel must have shape [*window ({nd} dims), Hv={Hv}], got '
                     f'{kernel.shape}')
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
                             implementation=None,
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

