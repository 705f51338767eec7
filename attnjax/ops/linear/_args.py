"""Argument checking and preparation shared by every linear-attention mechanism.

:func:`prepare` validates ``q [B, T, N, H]``, ``k [B, S, K, H]``, ``v [B, S, K, Hv]`` and the
options a mechanism takes (``form``, ``feature_map``, ``chunk_size``, ``eps``,
``implementation``, ``block_len``, ``state``/``return_state``) once, raising
``ValueError``/``TypeError`` that name the argument, and returns a :class:`LinearArgs`.
The implementation that runs is chosen afterwards by
:func:`attnjax.ops.linear._core.choose` (``None``/``'auto'``: the Pallas chunk kernel on
TPU/GPU when it serves the call, else ``'xla'``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Optional

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
  if (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
      or chunk_size < 1):
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


def _check_eps(eps):
  if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
    raise ValueError(f'eps must be a positive float, got {eps!r}')
  return float(eps)


def _check_implementation(implementation, form):
  """The requested implementation: ``'auto'`` (for None), a name, or a tuple of names
  (tried in order; ``'auto'`` may appear).  An explicit kernel name needs the chunked
  form (ValueError otherwise)."""
  if implementation is None or implementation == 'auto':
    return 'auto'
  names = (implementation,) if isinstance(implementation, str) else implementation
  try:
    names = tuple(names)
  except TypeError:
    raise ValueError(f"implementation must be None, 'auto', one of {IMPLEMENTATIONS} or a "
                     f"sequence of those, got {implementation!r}") from None
  if not names or any(n != 'auto' and n not in IMPLEMENTATIONS for n in names):
    raise ValueError(f"implementation must be None, 'auto', one of {IMPLEMENTATIONS} or a "
                     f"sequence of those, got {implementation!r}")
  if isinstance(implementation, str):
    if implementation != 'xla' and form != 'chunked':
      raise ValueError(f"implementation={implementation!r} serves form='chunked' only, got "
                       f"{form!r}")
    return implementation
  return names


def _check_state_array(x, shape, name):
  if not hasattr(x, 'shape') or tuple(x.shape) != tuple(shape):
    raise ValueError(f'{name} must have shape {tuple(shape)}, got {getattr(x, "shape", type(x))}')
  return x.astype(_F32)



_UNCHECKED = object()


@dataclasses.dataclass(frozen=True)
class LinearArgs:
  """The validated shapes and options of one linear-attention call (``None``: not an
  option of the mechanism)."""
  B: int
  T: int
  N: int
  H: int
  S: int
  K: int
  Hv: int
  form: str
  phi: Optional[Callable[[Array], Array]]
  chunk_size: Optional[int]
  eps: Optional[float]
  implementation: Optional[str | tuple]   # requested: 'auto', a name or a tuple of names
  block_len: Optional[int]

  @property
  def G(self) -> int:
    return self.N // self.K

  def use_blocks(self, causal: bool, implementation: str = 'xla') -> bool:
    """The causal chunked XLA form (``implementation``: the chosen one) runs block by
    block (``T > block_len``)."""
    return causal and self.block_len is not None and _use_blocks(
        self.form, implementation, self.block_len, self.T)


def prepare(q, k, v, *, causal: bool, form, feature_map=_UNCHECKED, chunk_size=_UNCHECKED,
            eps=_UNCHECKED, implementation=_UNCHECKED, block_len=_UNCHECKED, state=None,
            return_state: bool = False) -> LinearArgs:
  """Checks the arguments a mechanism takes (those passed) in one order: feature map,
  ``q, k, v``, form, chunk size, eps, implementation, block length, then the causal-only
  options (``state``/``return_state``, a kernel ``implementation``)."""
  phi = None if feature_map is _UNCHECKED else _resolve_feature_map(feature_map)
  B, T, N, H, S, K, Hv = _check_qkv(q, k, v, causal=causal)
  _check_form(form, causal)
  chunk_size = None if chunk_size is _UNCHECKED else _check_chunk_size(chunk_size)
  eps = None if eps is _UNCHECKED else _check_eps(eps)
  implementation = (None if implementation is _UNCHECKED
                    else _check_implementation(implementation, form))
  block_len = None if block_len is _UNCHECKED else _check_block_len(block_len)
  if not causal and (state is not None or return_state):
    raise ValueError('state and return_state need causal=True')
  if not causal and isinstance(implementation, str) and implementation not in ('xla', 'auto'):
    raise ValueError(f'implementation={implementation!r} serves causal=True only')
  return LinearArgs(B, T, N, H, S, K, Hv, form, phi, chunk_size, eps, implementation,
                    block_len)
