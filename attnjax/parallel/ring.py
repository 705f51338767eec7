"""Context parallelism: ring attention over the ``context`` mesh axis.

Paper: "Ring Attention with Blockwise Transformers for Near-Infinite Context"
(Liu, Zaharia, Abbeel, 2023); load balancing as in "Striped Attention" (Brandon et al.,
2023) / the zigzag layout of context-parallel Llama training.

The sequence is split over the P devices of the ``context`` axis. Each device keeps its
queries; the K/V blocks (and their segment ids) travel around the ring with
``jax.lax.ppermute``. At every one of the P steps a device attends its queries to the
K/V block it currently holds and merges the partial result with the online-softmax rule

    lse = logaddexp(lse_a, lse_b)
    o   = exp(lse_a - lse) * o_a + exp(lse_b - lse) * o_b

where ``o_x`` are normalised partial outputs and ``lse_x`` their log-sum-exp. After P
steps every query has seen every key exactly once, so the result equals single-device
attention (up to float32 summation order), forward and backward (the backward is JAX's
transpose of the same program: ``ppermute`` transposes to the reverse rotation).

Masks are evaluated at *global* token positions, so any position predicate works:
causal, sliding window, prefix-LM, dual triangle, ... and document masks via segment ids
(which rotate with K/V). Sub-blocks in which the mask allows nothing are skipped with
``lax.cond``. With ``layout='zigzag'`` (default) the sequence is cut into 2P chunks and
device i holds chunks i and 2P-1-i: under a causal mask every device then does the same
amount of work at every step (half of its four sub-blocks), instead of the last device
doing P times the work of the first.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from attnjax.core import args as _args
from attnjax.parallel import rules as _rules

NEG = -1e30  # finite "minus infinity" for logits and log-sum-exp of empty rows
LAYOUTS = ('zigzag', 'contiguous')


# --- masks as position predicates ---------------------------------------------------------

def _predicate(mask: Any, num_heads: int) -> Callable | None:
  """Returns ``fn(b, h, q_idx, kv_idx) -> bool`` (broadcasting) or None for no mask."""
  if mask is None:
    return None
  if isinstance(mask, (jax.Array,)) or hasattr(mask, 'shape') and hasattr(mask, 'dtype'):
    raise TypeError(
        'ring_attention: mask must be an attnjax.masks.Mask or a predicate '
        'fn(b, h, q_idx, kv_idx) -> bool evaluated at global positions; a materialised '
        f'boolean array (shape {getattr(mask, "shape", None)}) cannot be split over the ring. '
        'Use masks.from_fn, or segment ids for document masks.')
  for attr in ('bind_heads', 'with_num_heads'):
    if hasattr(mask, attr):
      mask = getattr(mask, attr)(num_heads)
      break
  for attr in ('mask_fn', 'fn', 'predicate'):
    fn = getattr(mask, attr, None)
    if callable(fn):
      return _with_num_heads(fn, num_heads)
  if callable(mask):
    return _with_num_heads(mask, num_heads)
  raise TypeError(f'ring_attention: mask must be a Mask or a callable predicate; got {type(mask)}.')


def _with_num_heads(fn: Callable, num_heads: int) -> Callable:
  """Passes ``num_heads=`` to predicates that accept it (head-dependent masks)."""
  import inspect
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return fn
  if 'num_heads' in params:
    return functools.partial(fn, num_heads=num_heads)
  return fn


# --- one block ----------------------------------------------------------------------------

def _block_attention_xla(q, k, v, allowed, scale):
  """Normalised attention of one block and its log-sum-exp.

  q [B,Tq,N,H], k [B,Tk,K,H], v [B,Tk,K,Hv], allowed bool [B,N,Tq,Tk].
  Returns o [B,Tq,N,Hv] float32 and lse [B,N,Tq] float32 (NEG for rows with no key).
  """
  b, tq, n, h = q.shape
  kh = k.shape[2]
  g = n // kh
  q_BTKGH = q.reshape(b, tq, kh, g, h)
  s_BKGTS = jnp.einsum('btkgh,bskh->bkgts', q_BTKGH, k,
                       preferred_element_type=jnp.float32) * scale
  allowed_BKGTS = allowed.reshape(b, kh, g, tq, -1)
  s_BKGTS = jnp.where(allowed_BKGTS, s_BKGTS, NEG)
  row_any = jnp.any(allowed_BKGTS, axis=-1, keepdims=True)
  m = jnp.where(row_any, jnp.max(s_BKGTS, axis=-1, keepdims=True), 0.0)
  p = jnp.where(allowed_BKGTS, jnp.exp(s_BKGTS - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  l_safe = jnp.where(l > 0, l, 1.0)
  lse = jnp.where(l > 0, m + jnp.log(l_safe), NEG)[..., 0].reshape(b, n, tq)
  o_BTKGH = jnp.einsum('bkgts,bskh->btkgh', (p / l_safe).astype(v.dtype), v,
                       preferred_element_type=jnp.float32)
  return o_BTKGH.reshape(b, tq, n, v.shape[-1]), lse


def _block_attention_core(q, k, v, allowed, scale):
  """The same through ``attnjax.attention`` (kernels on GPU/TPU)."""
  import attnjax  # pylint: disable=import-outside-toplevel
  o, lse = attnjax.attention(q, k, v, mask=allowed, scale=scale, return_lse=True)
  row_any = jnp.any(allowed, axis=-1)
  lse = jnp.where(row_any & jnp.isfinite(lse), lse.astype(jnp.float32), NEG)
  return o.astype(jnp.float32), lse


def _default_block_fn():
  try:
    import attnjax  # pylint: disable=import-outside-toplevel
    if hasattr(attnjax, 'attention'):
      return _block_attention_core
  except ImportError:
    pass
  return _block_attention_xla


def _merge(o, lse, o_b, lse_b):
  lse_new = jnp.logaddexp(lse, lse_b)
  wa = jnp.exp(lse - lse_new)
  wb = jnp.exp(lse_b - lse_new)
  to_btn = lambda w: jnp.swapaxes(w, 1, 2)[..., None]  # [B,N,T] -> [B,T,N,1]
  return o * to_btn(wa) + o_b * to_btn(wb), lse_new


# --- helpers ------------------------------------------------------------------------------

def _fit_axes(dim: int, axes: Sequence[str], mesh) -> tuple[str, ...]:
  chosen, size = [], 1
  shape = dict(mesh.shape)
  for a in axes:
    n = shape.get(a, 1)
    if n > 1 and dim % (size * n) == 0:
      chosen.append(a)
      size *= n
  return tuple(chosen)


def _spec_entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


def _layout_perm(t: int, p: int, layout: str):
  """Permutation putting the sequence in the order the devices hold it."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  if layout == 'contiguous' or p == 1:
    return None
  c = t // (2 * p)
  order = []
  for i in range(p):
    order += list(range(i * c, (i + 1) * c)) + list(range((2 * p - 1 - i) * c, (2 * p - i) * c))
  perm = np.asarray(order)
  return perm, np.argsort(perm)


def _chunk_positions(dev, t_local: int, p: int, layout: str):
  """Global positions of the sub-chunks held by device ``dev`` (a traced int)."""
  if layout == 'contiguous' or p == 1:
    return [dev * t_local + jnp.arange(t_local)]
  c = t_local // 2
  return [dev * c + jnp.arange(c), (2 * p - 1 - dev) * c + jnp.arange(c)]


# --- public -------------------------------------------------------------------------------

def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh=None,
                   axis_name: str = 'context', mask: Any = None,
                   q_segment_ids: jax.Array | None = None,
                   kv_segment_ids: jax.Array | None = None,
                   scale: float | jax.Array | None = None,
                   layout: str = 'zigzag', batch_axes: Sequence[str] = ('data', 'fsdp'),
                   head_axes: Sequence[str] = ('tensor',), block_fn: Callable | None = None,
                   skip_empty: bool = True) -> jax.Array:
  """Exact softmax attention with the sequence split over a mesh axis (ring attention).

  out[b, i, n] = sum_j softmax_j(scale * q[b,i,n] . k[b,j,n//G] | allowed(b,n,i,j)) v[b,j,n//G]

  Args:
    q: [B, T, N, H]; k: [B, T, K, H]; v: [B, T, K, Hv] (self-attention: S == T),
      N a multiple of K.
    mesh: the device mesh (default: the one set by ``attnjax.parallel.activation_sharding``).
      Without a mesh, or with ``mesh.shape[axis_name] == 1``, this is plain attention.
    axis_name: mesh axis the sequence is split over.
    mask: None, an ``attnjax.masks.Mask``, or a predicate ``fn(b, h, q_idx, kv_idx)``
      over global indices. Boolean arrays are rejected (they cannot be split).
    q_segment_ids, kv_segment_ids: [B, T] int, document packing (attend within equal ids).
    scale: logit scale, default 1/sqrt(H): a float, or a float JAX scalar (traced,
      learnable: it is folded into q in float32 and gets its gradient through that product).
    layout: 'zigzag' (causal load balancing; T must divide by 2P) or 'contiguous'
      (T must divide by P).
    batch_axes, head_axes: mesh axes over which batch and heads are split inside the
      ring (used where they divide B / both N and K).
    block_fn: ``fn(q, k, v, allowed[B,N,Tq,Tk], scale) -> (o f32, lse [B,N,Tq] f32)``;
      default ``attnjax.attention(..., return_lse=True)`` when available.
    skip_empty: skip sub-blocks where the mask allows nothing (``lax.cond``).

  Returns:
    [B, T, N, Hv] in q's dtype. Rows with no allowed key are 0.
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f'ring_attention: q, k, v must be rank 4 [B,T,N,H]; got q {q.shape}, '
                     f'k {k.shape}, v {v.shape}.')
  b, t, n, h = q.shape
  if k.shape[:2] != (b, t) or v.shape[:3] != k.shape[:3] or k.shape[3] != h:
    raise ValueError(f'ring_attention: k must be [B={b}, T={t}, K, H={h}] and v [B, T, K, Hv] '
                     f'(self-attention); got k {k.shape}, v {v.shape}.')
  kh = k.shape[2]
  if n % kh:
    raise ValueError(f'ring_attention: num query heads N={n} must be a multiple of kv heads '
                     f'K={kh}.')
  if layout not in LAYOUTS:
    raise ValueError(f'ring_attention: layout must be one of {LAYOUTS}; got {layout!r}.')
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError('ring_attention: pass both q_segment_ids and kv_segment_ids or neither.')
  for name, seg in (('q_segment_ids', q_segment_ids), ('kv_segment_ids', kv_segment_ids)):
    if seg is not None and seg.shape != (b, t):
      raise ValueError(f'ring_attention: {name} must be [B={b}, T={t}]; got {seg.shape}.')
  scale = _args.check_scale(scale, h)
  if not _args.is_static_scale(scale):
    # A traced (learnable) scale: folded into q in float32, so every block sees 1.0.
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    scale = 1.0
  pred = _predicate(mask, n)
  block_fn = block_fn or _default_block_fn()
  mesh = mesh if mesh is not None else _rules.current_mesh()
  p = dict(mesh.shape).get(axis_name, 1) if mesh is not None else 1
  if mesh is not None and axis_name not in mesh.shape:
    raise ValueError(f'ring_attention: axis_name={axis_name!r} is not a mesh axis '
                     f'{tuple(mesh.shape)}.')
  n_sub = 2 if (layout == 'zigzag' and p > 1) else 1
  if t % (p * n_sub):
    raise ValueError(f'ring_attention: sequence length T={t} must be a multiple of '
                     f'{p * n_sub} ({axis_name} axis size {p}'
                     f'{" x 2 for the zigzag layout" if n_sub == 2 else ""}).')
  has_seg = q_segment_ids is not None
  if not has_seg:
    q_segment_ids = kv_segment_ids = jnp.zeros((b, t), jnp.int32)

  def allowed_fn(bidx, hidx, qpos, kvpos, qseg, kvseg):
    ok = jnp.ones((1, 1, qpos.shape[0], kvpos.shape[0]), bool)
    if pred is not None:
      ok = ok & pred(bidx[:, None, None, None], hidx[None, :, None, None],
                     qpos[None, None, :, None], kvpos[None, None, None, :])
    if has_seg:
      ok = ok & (qseg[:, None, :, None] == kvseg[:, None, None, :])
    return jnp.broadcast_to(ok, (bidx.shape[0], hidx.shape[0], qpos.shape[0], kvpos.shape[0]))

  if p == 1:
    allowed = allowed_fn(jnp.arange(b), jnp.arange(n), jnp.arange(t), jnp.arange(t),
                         q_segment_ids, kv_segment_ids)
    o, _ = block_fn(q, k, v, allowed, scale)
    return o.astype(q.dtype)

  b_axes = _fit_axes(b, batch_axes, mesh)
  h_axes = _fit_axes(math.gcd(n, kh), head_axes, mesh)
  perm = _layout_perm(t, p, layout)
  if perm is not None:
    fwd, _ = perm
    q, k, v = (jnp.take(x, fwd, axis=1) for x in (q, k, v))
    q_segment_ids, kv_segment_ids = (jnp.take(x, fwd, axis=1)
                                     for x in (q_segment_ids, kv_segment_ids))

  t_local = t // p
  ring_perm = [(i, (i + 1) % p) for i in range(p)]

  def local(q, k, v, qseg, kvseg):
    bl, _, nl, _ = q.shape
    me = jax.lax.axis_index(axis_name)
    b_off = jax.lax.axis_index(b_axes) * bl if b_axes else 0
    h_off = jax.lax.axis_index(h_axes) * nl if h_axes else 0
    bidx = b_off + jnp.arange(bl)
    hidx = h_off + jnp.arange(nl)
    c = t_local // n_sub
    qpos = _chunk_positions(me, t_local, p, layout)
    q_subs = [q[:, a * c:(a + 1) * c] for a in range(n_sub)]
    qseg_subs = [qseg[:, a * c:(a + 1) * c] for a in range(n_sub)]
    hv = v.shape[-1]
    o = [jnp.zeros((bl, c, nl, hv), jnp.float32) for _ in range(n_sub)]
    lse = [jnp.full((bl, nl, c), NEG, jnp.float32) for _ in range(n_sub)]

    def attend(step, o, lse, k, v, kvseg):
      src = (me - step) % p
      kvpos = _chunk_positions(src, t_local, p, layout)
      o, lse = list(o), list(lse)
      for a in range(n_sub):
        for bb in range(n_sub):
          ks = k[:, bb * c:(bb + 1) * c]
          vs = v[:, bb * c:(bb + 1) * c]
          allowed = allowed_fn(bidx, hidx, qpos[a], kvpos[bb], qseg_subs[a],
                               kvseg[:, bb * c:(bb + 1) * c])

          def compute(o_a, lse_a, ks=ks, vs=vs, allowed=allowed, a=a):
            o_b, lse_b = block_fn(q_subs[a], ks, vs, allowed, scale)
            return _merge(o_a, lse_a, o_b, lse_b)

          if skip_empty:
            o[a], lse[a] = jax.lax.cond(jnp.any(allowed), compute, lambda x, y: (x, y),
                                        o[a], lse[a])
          else:
            o[a], lse[a] = compute(o[a], lse[a])
      return o, lse

    def body(carry, step):
      o, lse, k, v, kvseg = carry
      o, lse = attend(step, o, lse, k, v, kvseg)
      k, v, kvseg = jax.lax.ppermute((k, v, kvseg), axis_name, ring_perm)
      return (o, lse, k, v, kvseg), None

    (o, lse, k, v, kvseg), _ = jax.lax.scan(body, (o, lse, k, v, kvseg), jnp.arange(p - 1))
    o, lse = attend(p - 1, o, lse, k, v, kvseg)
    return jnp.concatenate(o, axis=1).astype(q.dtype)

  bspec, hspec = _spec_entry(b_axes), _spec_entry(h_axes)
  qkv_spec = P(bspec, axis_name, hspec, None)
  seg_spec = P(bspec, axis_name)
  out = jax.shard_map(local, mesh=mesh,
                      in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec, seg_spec),
                      out_specs=qkv_spec, check_vma=False)(q, k, v, q_segment_ids, kv_segment_ids)
  if perm is not None:
    out = jnp.take(out, perm[1], axis=1)
  return out
