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
attention (up to float32 summation order).

Backward (a ``jax.custom_vjp``): the forward saves only its inputs, the output and the
row log-sum-exp; the backward runs a second ring pass that recomputes each step's block
of probabilities ``p = exp(s - lse)`` and its gradient

    ds_ij = p_ij (dO_i . v_j - dO_i . O_i)

accumulating dQ locally while dK/dV travel around the ring with their K/V block and come
home after P steps. Peak memory per device is therefore independent of the number of
ring steps (JAX's own transpose of the forward scan would keep every step's residuals).

Masks are evaluated at *global* token positions, so any position predicate works:
causal, sliding window, prefix-LM, dual triangle, spatial masks of a flattened grid, ...
and document masks via segment ids (which rotate with K/V). Score mods are called with
global positions too; softcap and per-head sinks are applied as in
``attnjax.reference_attention``. Sub-blocks in which the mask allows nothing are skipped
with ``lax.cond``. With ``layout='zigzag'`` (default) the sequence is cut into 2P chunks
and device i holds chunks i and 2P-1-i: under a causal mask every device then does the
same amount of work at every step, instead of the last device doing P times the work of
the first. The re-ordering from the contiguous sharding (device i holds chunks 2i, 2i+1)
is two ``ppermute``\\ s inside the mesh, never a gather of the whole sequence.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from attnjax.core import args as _args
from attnjax.core.precision import einsum_f32
from attnjax.core.softmax import merge_partials
from attnjax.parallel import rules as _rules

NEG = -1e30  # finite "minus infinity" for logits and log-sum-exp of empty rows
LAYOUTS = ('zigzag', 'contiguous')


# --- checks shared with the all-gather variant --------------------------------------------

def check_cp_args(fn_name, q, k, v, *, mask, score_mod, q_segment_ids, kv_segment_ids, scale,
                  softcap, sinks):
  """Validates the arguments of a context-parallel attention; returns (mask, scale).

  ``mask`` becomes an ``attnjax.masks.Mask`` (or None); a boolean array is a TypeError
  (a materialised [T, S] mask cannot be split over devices)."""
  if mask is not None and hasattr(mask, 'shape') and hasattr(mask, 'dtype'):
    raise TypeError(
        f'{fn_name}: mask must be an attnjax.masks.Mask or a predicate '
        'fn(b, h, q_idx, kv_idx) -> bool evaluated at global positions; a materialised '
        f'boolean array (shape {mask.shape}) cannot be split over the context axis. '
        'Use masks.from_fn, or segment ids for document masks.')
  if mask is not None and not callable(mask):
    raise TypeError(f'{fn_name}: mask must be a Mask or a callable predicate; got {type(mask)}.')
  for name, x in (('q', q), ('k', k), ('v', v)):
    if getattr(x, 'ndim', None) != 4:
      raise ValueError(f'{fn_name}: q, k, v must be rank 4 [B,T,N,H]; got {name} '
                       f'{getattr(x, "shape", None)}.')
  b, t, n, h = q.shape
  if k.shape[:2] != (b, t) or v.shape[:3] != k.shape[:3] or k.shape[3] != h:
    raise ValueError(f'{fn_name}: k must be [B={b}, T={t}, K, H={h}] and v [B, T, K, Hv] '
                     f'(self-attention); got k {k.shape}, v {v.shape}.')
  if n % k.shape[2]:
    raise ValueError(f'{fn_name}: num query heads N={n} must be a multiple of kv heads '
                     f'K={k.shape[2]}.')
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError(f'{fn_name}: pass both q_segment_ids and kv_segment_ids or neither.')
  for name, seg in (('q_segment_ids', q_segment_ids), ('kv_segment_ids', kv_segment_ids)):
    if seg is not None and tuple(seg.shape) != (b, t):
      raise ValueError(f'{fn_name}: {name} must be [B={b}, T={t}]; got {tuple(seg.shape)}.')
  if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
    raise ValueError(f'{fn_name}: softcap must be a positive float or None; got {softcap!r}.')
  scale = _args.check_scale(scale, h)
  a = _args.check_attention_args(
      q, k, v, mask=mask, score_mod=score_mod, q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids, scale=scale, softcap=softcap, sinks=sinks)
  return a.mask, scale


def context_setup(op: str, q, scale, mesh, axis_name: str):
  """The start shared by the context-parallel calls: a traced (learnable) scale folded into
  q in float32 (every block then sees 1.0), the mesh (default: the trainer's) and the size
  of its ``axis_name`` axis (1 without a mesh). Returns ``(q, scale, mesh, p)``."""
  if not _args.is_static_scale(scale):
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    scale = 1.0
  mesh = mesh if mesh is not None else _rules.current_mesh()
  if mesh is not None and axis_name not in mesh.shape:
    raise ValueError(f'{op}: axis_name={axis_name!r} is not a mesh axis '
                     f'{tuple(mesh.shape)}.')
  p = dict(mesh.shape).get(axis_name, 1) if mesh is not None else 1
  return q, scale, mesh, p


def default_segments_and_sinks(q_segment_ids, kv_segment_ids, sinks, b: int, t: int, n: int):
  """Zero segment ids ``[B, T]`` and zero sink logits ``[N]`` where none are given (the
  shard_map bodies take arrays). Returns ``(has_seg, q_seg, kv_seg, has_sinks, sinks)``."""
  has_seg = q_segment_ids is not None
  if not has_seg:
    q_segment_ids = kv_segment_ids = jnp.zeros((b, t), jnp.int32)
  has_sinks = sinks is not None
  sinks = (sinks if has_sinks else jnp.zeros((n,), jnp.float32)).astype(jnp.float32)
  return has_seg, q_segment_ids, kv_segment_ids, has_sinks, sinks


def fit_axes(dim: int, axes: Sequence[str], mesh) -> tuple[str, ...]:
  """The mesh axes among ``axes`` (size > 1) whose running product divides ``dim``."""
  chosen, size = [], 1
  shape = dict(mesh.shape)
  for a in axes:
    n = shape.get(a, 1)
    if n > 1 and dim % (size * n) == 0:
      chosen.append(a)
      size *= n
  return tuple(chosen)


def spec_entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


def convert_score_mod(score_mod, b: int, n: int, tq: int, tk: int, mesh=None):
  """``(fn(score, b, h, q, kv, *consts), consts)``: the score mod with the arrays it closes
  over (e.g. a learnable bias table) hoisted into explicit arguments, so they can cross a
  ``shard_map`` / ``custom_vjp`` boundary and get gradients. ``fn`` is traced for the
  per-device block shapes: scores [b, n, tq, tk], indices [b,1,1,1], [1,n,1,1], [1,1,tq,1],
  [1,1,1,tk]."""
  if score_mod is None:
    return None, ()
  sds = jax.ShapeDtypeStruct
  ex = (sds((b, n, tq, tk), jnp.float32), sds((b, 1, 1, 1), jnp.int32),
        sds((1, n, 1, 1), jnp.int32), sds((1, 1, tq, 1), jnp.int32),
        sds((1, 1, 1, tk), jnp.int32))
  with contextlib.ExitStack() as stack:
    if mesh is not None:
      # trace as inside the shard_map (Manual axes), where the converted fn is evaluated
      abstract = mesh.abstract_mesh
      manual = abstract.update_axis_types(
          {a: jax.sharding.AxisType.Manual for a in abstract.axis_names})
      stack.enter_context(jax.sharding.use_abstract_mesh(manual))
    fn, consts = jax.closure_convert(score_mod, *ex)
  return fn, tuple(consts)


class _Logits:
  """Static pieces of the logit computation of one attention call (mask, mods, scale).

  ``mask_leaves`` / ``mod_consts`` (arrays) are passed separately and re-attached inside
  the mesh."""

  def __init__(self, *, mask, score_mod_fn, softcap, scale, num_heads, batch, has_seg,
               mask_treedef):
    self.score_mod_fn = score_mod_fn
    self.softcap = softcap
    self.scale = scale
    self.num_heads = num_heads
    self.batch = batch
    self.has_seg = has_seg
    self.has_mask = mask is not None
    self.mask_treedef = mask_treedef

  def allowed(self, mask_leaves, bidx, hidx, qpos, kvpos, qseg, kvseg):
    """bool [B, N, Tq, Tk] at global indices (b, h, positions)."""
    shape = (bidx.shape[0], hidx.shape[0], qpos.shape[0], kvpos.shape[0])
    ok = jnp.ones((1, 1, 1, 1), bool)
    if self.has_mask:
      mask = jax.tree.unflatten(self.mask_treedef, mask_leaves)
      ok = ok & mask(bidx[:, None, None, None], hidx[None, :, None, None],
                     qpos[None, None, :, None], kvpos[None, None, None, :],
                     num_heads=self.num_heads, batch=self.batch)
    if self.has_seg:
      ok = ok & (qseg[:, None, :, None] == kvseg[:, None, None, :])
    return jnp.broadcast_to(ok, shape)

  def logits(self, consts, q, k, bidx, hidx, qpos, kvpos):
    """float32 [B, N, Tq, Tk]: softcap(score_mod(scale * q . k)) at global indices."""
    b, tq, n, h = q.shape
    kh = k.shape[2]
    s = einsum_f32('btkgh,bskh->bkgts', q.reshape(b, tq, kh, n // kh, h), k)
    s = s.reshape(b, n, tq, k.shape[1]) * self.scale
    if self.score_mod_fn is not None:
      s = self.score_mod_fn(s, bidx[:, None, None, None], hidx[None, :, None, None],
                            qpos[None, None, :, None], kvpos[None, None, None, :],
                            *consts).astype(jnp.float32)
    if self.softcap is not None:
      s = self.softcap * jnp.tanh(s / self.softcap)
    return s


def block_forward(s, allowed, v):
  """Normalised attention of one block and its log-sum-exp.

  s f32 [B,N,Tq,Tk], allowed bool [B,N,Tq,Tk], v [B,Tk,K,Hv].
  Returns o [B,Tq,N,Hv] float32 and lse [B,N,Tq] float32 (NEG for rows with no key).
  """
  b, n, tq, tk = s.shape
  kh = v.shape[2]
  s = jnp.where(allowed, s, NEG)
  row_any = jnp.any(allowed, axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(row_any, jnp.max(s, axis=-1, keepdims=True), 0.0))
  p = jnp.where(allowed, jnp.exp(s - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  l_safe = jnp.where(l > 0, l, 1.0)
  lse = jnp.where(l > 0, m + jnp.log(l_safe), NEG)[..., 0]
  pn = (p / l_safe).reshape(b, kh, n // kh, tq, tk)
  o = einsum_f32('bkgts,bskh->btkgh', pn.astype(v.dtype), v)
  return o.reshape(b, tq, n, v.shape[-1]), lse


def merge(o, lse, o_b, lse_b):
  """Online-softmax merge of two normalised partial results (``o [B,T,N,Hv]``,
  ``lse [B,N,T]``; :func:`attnjax.core.softmax.merge_partials` in this layout)."""
  o_new, lse_new = merge_partials(o, jnp.swapaxes(lse, 1, 2), o_b, jnp.swapaxes(lse_b, 1, 2))
  return o_new, jnp.swapaxes(lse_new, 1, 2)


def add_sinks(o, lse, sinks_n):
  """Adds one sink logit per head to the softmax denominator (o [B,T,N,Hv], lse [B,N,T])."""
  lse_new = jnp.logaddexp(lse, sinks_n.astype(jnp.float32)[None, :, None])
  return o * jnp.swapaxes(jnp.exp(lse - lse_new), 1, 2)[..., None], lse_new


# --- layouts ------------------------------------------------------------------------------

def _owner(j: int, p: int) -> int:
  return j if j < p else 2 * p - 1 - j


def _zigzag_local(x, axis_name, p, inverse):
  """Re-orders the sequence chunks held on the ``axis_name`` devices (inside shard_map).

  Contiguous: device d holds chunks (2d, 2d+1) of 2P; zigzag: device e holds (e, 2P-1-e).
  Chunks of each parity form a permutation of the devices, so two ppermutes suffice."""
  c = x.shape[1] // 2
  first, second = x[:, :c], x[:, c:]
  me = jax.lax.axis_index(axis_name)
  even_dev = (me % 2) == 0
  if not inverse:
    a = jax.lax.ppermute(first, axis_name, [(d, _owner(2 * d, p)) for d in range(p)])
    b = jax.lax.ppermute(second, axis_name, [(d, _owner(2 * d + 1, p)) for d in range(p)])
    return jnp.where(even_dev, jnp.concatenate([a, b], 1), jnp.concatenate([b, a], 1))
  even = jnp.where(even_dev, first, second)
  odd = jnp.where(even_dev, second, first)
  even_home = [(e, (e if e % 2 == 0 else 2 * p - 1 - e) // 2) for e in range(p)]
  odd_home = [(e, (2 * p - 1 - e if e % 2 == 0 else e) // 2) for e in range(p)]
  a = jax.lax.ppermute(even, axis_name, even_home)
  b = jax.lax.ppermute(odd, axis_name, odd_home)
  return jnp.concatenate([a, b], 1)


def _relayout(xs, mesh, axis_name, p, b_axes, inverse):
  """Contiguous <-> zigzag order of arrays [B, T, ...] sharded (batch, axis_name)."""
  def one(x):
    spec = P(spec_entry(b_axes), axis_name, *([None] * (x.ndim - 2)))
    return jax.shard_map(lambda y: _zigzag_local(y, axis_name, p, inverse), mesh=mesh,
                         in_specs=(spec,), out_specs=spec, check_vma=False)(x)
  return tuple(one(x) for x in xs)


def chunk_positions(dev, t_local: int, p: int, layout: str):
  """Global positions of the sub-chunks held by device ``dev`` (a traced int)."""
  if layout == 'contiguous' or p == 1:
    return [dev * t_local + jnp.arange(t_local)]
  c = t_local // 2
  return [dev * c + jnp.arange(c), (2 * p - 1 - dev) * c + jnp.arange(c)]


# --- public -------------------------------------------------------------------------------

def ring_attention_autodiff(q, k, v, **kwargs) -> jax.Array:
  """``ring_attention`` differentiated by JAX's own transpose of the forward ring (no
  custom VJP): keeps every ring step's residuals. For comparisons (memory tests) only."""
  return ring_attention(q, k, v, _custom_vjp=False, **kwargs)


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh=None,
                   axis_name: str = 'context', mask: Any = None,
                   score_mod: Callable | None = None,
                   q_segment_ids: jax.Array | None = None,
                   kv_segment_ids: jax.Array | None = None,
                   scale: float | jax.Array | None = None,
                   softcap: float | None = None, sinks: jax.Array | None = None,
                   layout: str = 'zigzag', batch_axes: Sequence[str] = ('data', 'fsdp'),
                   head_axes: Sequence[str] = ('tensor',),
                   skip_empty: bool = True, _custom_vjp: bool = True) -> jax.Array:
  """Exact softmax attention with the sequence split over a mesh axis (ring attention).

  s_ij = softcap(score_mod(scale * q_i . k_j))  at global positions i, j
  out_i = sum_{j allowed} exp(s_ij) v_j / (sum_{j allowed} exp(s_ij) + exp(sink_n))

  Args:
    q: [B, T, N, H]; k: [B, T, K, H]; v: [B, T, K, Hv] (self-attention: S == T),
      N a multiple of K.
    mesh: the device mesh (default: the one set by ``attnjax.parallel.activation_sharding``).
      Without a mesh, or with ``mesh.shape[axis_name] == 1``, this is plain attention.
    axis_name: mesh axis the sequence is split over.
    mask: None, an ``attnjax.masks.Mask``, or a predicate ``fn(b, h, q_idx, kv_idx)``
      over global indices. Boolean arrays are rejected (they cannot be split).
    score_mod: ``fn(score, b, h, q_idx, kv_idx) -> score`` called with global positions;
      arrays it closes over (bias tables) get their gradients.
    q_segment_ids, kv_segment_ids: [B, T] int, document packing (attend within equal ids).
    scale: logit scale, default 1/sqrt(H): a float, or a float JAX scalar (traced,
      learnable: it is folded into q in float32 and gets its gradient through that product).
    softcap: ``s -> softcap * tanh(s / softcap)`` after the score mod, or None.
    sinks: [N] float, one extra logit per query head in the softmax denominator, or None.
    layout: 'zigzag' (causal load balancing; T must divide by 2P) or 'contiguous'
      (T must divide by P).
    batch_axes, head_axes: mesh axes over which batch and heads are split inside the
      ring (used where they divide B / both N and K).
    skip_empty: skip sub-blocks where the mask allows nothing (``lax.cond``).

  Returns:
    [B, T, N, Hv] in q's dtype. Rows with no allowed key (and no sink) are 0, with zero
    gradients. The backward pass is a second ring pass (custom VJP, see the module
    docstring): per-device memory does not grow with the number of ring steps.
  """
  if layout not in LAYOUTS:
    raise ValueError(f'ring_attention: layout must be one of {LAYOUTS}; got {layout!r}.')
  mask, scale = check_cp_args('ring_attention', q, k, v, mask=mask, score_mod=score_mod,
                              q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                              scale=scale, softcap=softcap, sinks=sinks)
  b, t, n, _ = q.shape
  kh = k.shape[2]
  q, scale, mesh, p = context_setup('ring_attention', q, scale, mesh, axis_name)
  n_sub = 2 if (layout == 'zigzag' and p > 1) else 1
  if t % (p * n_sub):
    raise ValueError(f'ring_attention: sequence length T={t} must be a multiple of '
                     f'{p * n_sub} ({axis_name} axis size {p}'
                     f'{" x 2 for the zigzag layout" if n_sub == 2 else ""}).')
  if p == 1:
    from attnjax.core.softmax import reference_attention  # pylint: disable=import-outside-toplevel
    return reference_attention(q, k, v, mask=mask, score_mod=score_mod,
                               q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                               scale=scale, softcap=softcap, sinks=sinks)

  has_seg, q_segment_ids, kv_segment_ids, has_sinks, sinks = default_segments_and_sinks(
      q_segment_ids, kv_segment_ids, sinks, b, t, n)
  b_axes = fit_axes(b, batch_axes, mesh)
  h_axes = fit_axes(math.gcd(n, kh), head_axes, mesh)
  c = t // (p * n_sub)
  mod_fn, consts = convert_score_mod(score_mod, b // math.prod(mesh.shape[a] for a in b_axes),
                                     n // math.prod(mesh.shape[a] for a in h_axes), c, c, mesh)
  mask_leaves, mask_treedef = jax.tree.flatten(mask)
  lg = _Logits(mask=mask, score_mod_fn=mod_fn, softcap=softcap, scale=scale, num_heads=n,
               batch=b, has_seg=has_seg, mask_treedef=mask_treedef)
  if n_sub == 2:
    q, k, v, q_segment_ids, kv_segment_ids = _relayout(
        (q, k, v, q_segment_ids, kv_segment_ids), mesh, axis_name, p, b_axes, inverse=False)

  core = _make_ring(lg, mesh=mesh, axis_name=axis_name, p=p, t=t, layout=layout,
                    n_sub=n_sub, b_axes=b_axes, h_axes=h_axes, has_sinks=has_sinks,
                    skip_empty=skip_empty, custom=_custom_vjp)
  out = core(q, k, v, q_segment_ids, kv_segment_ids, sinks, tuple(mask_leaves), consts)
  if n_sub == 2:
    (out,) = _relayout((out,), mesh, axis_name, p, b_axes, inverse=True)
  return out


def _make_ring(lg: _Logits, *, mesh, axis_name, p, t, layout, n_sub, b_axes, h_axes,
               has_sinks, skip_empty, custom=True):
  """The custom-VJP ring over arrays already in the device layout."""
  t_local = t // p
  c = t_local // n_sub
  ring_perm = [(i, (i + 1) % p) for i in range(p)]
  bspec, hspec = spec_entry(b_axes), spec_entry(h_axes)
  qkv_spec = P(bspec, axis_name, hspec, None)
  seg_spec = P(bspec, axis_name)
  lse_spec = P(bspec, hspec, axis_name)
  in_specs = (qkv_spec, qkv_spec, qkv_spec, seg_spec, seg_spec, P(hspec), P(), P())
  all_axes = tuple(b_axes) + (axis_name,) + tuple(h_axes)

  def indices(bl, nl):
    b_off = jax.lax.axis_index(b_axes) * bl if b_axes else 0
    h_off = jax.lax.axis_index(h_axes) * nl if h_axes else 0
    return b_off + jnp.arange(bl), h_off + jnp.arange(nl)

  def sub(x, a, axis=1):
    return jax.lax.slice_in_dim(x, a * c, (a + 1) * c, axis=axis)

  # ---- forward ---------------------------------------------------------------------------
  def local_fwd(q, k, v, qseg, kvseg, sinks, mleaves, consts):
    bl, _, nl, _ = q.shape
    me = jax.lax.axis_index(axis_name)
    bidx, hidx = indices(bl, nl)
    qpos = chunk_positions(me, t_local, p, layout)
    hv = v.shape[-1]
    o = [jnp.zeros((bl, c, nl, hv), jnp.float32) for _ in range(n_sub)]
    lse = [jnp.full((bl, nl, c), NEG, jnp.float32) for _ in range(n_sub)]

    def attend(step, o, lse, k, v, kvseg):
      kvpos = chunk_positions((me - step) % p, t_local, p, layout)
      o, lse = list(o), list(lse)
      for a in range(n_sub):
        for bb in range(n_sub):
          ks, vs = sub(k, bb), sub(v, bb)
          allowed = lg.allowed(mleaves, bidx, hidx, qpos[a], kvpos[bb], sub(qseg, a),
                               sub(kvseg, bb))

          def compute(o_a, lse_a, ks=ks, vs=vs, allowed=allowed, a=a, bb=bb):
            s = lg.logits(consts, sub(q, a), ks, bidx, hidx, qpos[a], kvpos[bb])
            o_b, lse_b = block_forward(s, allowed, vs)
            return merge(o_a, lse_a, o_b, lse_b)

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
    o, lse = jnp.concatenate(o, axis=1), jnp.concatenate(lse, axis=2)
    if has_sinks:
      o, lse = add_sinks(o, lse, sinks)
    return o.astype(q.dtype), lse

  fwd_map = jax.shard_map(local_fwd, mesh=mesh, in_specs=in_specs,
                          out_specs=(qkv_spec, lse_spec), check_vma=False)

  # ---- backward --------------------------------------------------------------------------
  def local_bwd(q, k, v, qseg, kvseg, sinks, mleaves, consts, out, lse, dout):
    bl, _, nl, _ = q.shape
    me = jax.lax.axis_index(axis_name)
    bidx, hidx = indices(bl, nl)
    qpos = chunk_positions(me, t_local, p, layout)
    out32, dout32 = out.astype(jnp.float32), dout.astype(jnp.float32)
    dq = [jnp.zeros(sub(q, a).shape, jnp.float32) for a in range(n_sub)]
    dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    dconsts = tuple(jnp.zeros(x.shape, jnp.float32) for x in consts)

    def block_grads(a, bb, ks, vs, allowed, kvpos):
      """(dq_a, dk_bb, dv_bb, dconsts) of block (a, bb)."""
      lse_a = jax.lax.slice_in_dim(lse, a * c, (a + 1) * c, axis=2)
      out_a = sub(out32, a)

      def h(qs, ks, vs, cs):
        s = lg.logits(cs, qs, ks, bidx, hidx, qpos[a], kvpos[bb])
        pr = jnp.where(allowed, jnp.exp(jnp.where(allowed, s, NEG) - lse_a[..., None]), 0.0)
        b_, n_, tq, tk = pr.shape
        kh = vs.shape[2]
        pv = jnp.einsum('bkgts,bskh->btkgh', pr.reshape(b_, kh, n_ // kh, tq, tk),
                        vs.astype(jnp.float32)).reshape(b_, tq, n_, vs.shape[-1])
        # sum_j p_ij (v_j - O_i): its value sums to 0 over all blocks, its gradient is the
        # block's share of the exact softmax gradient (O_i is a constant here).
        return pv - out_a * jnp.swapaxes(jnp.sum(pr, axis=-1), 1, 2)[..., None]

      fidx = [i for i, x in enumerate(consts) if jnp.issubdtype(x.dtype, jnp.floating)]

      def h_f(qs, ks, vs, cf):
        cs = list(consts)
        for i, x in zip(fidx, cf):
          cs[i] = x
        return h(qs, ks, vs, tuple(cs))

      _, vjp = jax.vjp(h_f, sub(q, a), ks, vs, tuple(consts[i] for i in fidx))
      dqs, dks, dvs, dcf = vjp(sub(dout32, a))
      cast = lambda x: x.astype(jnp.float32)
      dcs = [jnp.zeros(x.shape, jnp.float32) for x in consts]
      for i, x in zip(fidx, dcf):
        dcs[i] = cast(x)
      return cast(dqs), cast(dks), cast(dvs), tuple(dcs)

    def attend(step, dq, dk, dv, dconsts, k, v, kvseg):
      kvpos = chunk_positions((me - step) % p, t_local, p, layout)
      dq = list(dq)
      dk_parts = [sub(dk, bb) for bb in range(n_sub)]
      dv_parts = [sub(dv, bb) for bb in range(n_sub)]
      for a in range(n_sub):
        for bb in range(n_sub):
          ks, vs = sub(k, bb), sub(v, bb)
          allowed = lg.allowed(mleaves, bidx, hidx, qpos[a], kvpos[bb], sub(qseg, a),
                               sub(kvseg, bb))

          def compute(acc, ks=ks, vs=vs, allowed=allowed, a=a, bb=bb, kvpos=kvpos):
            g = block_grads(a, bb, ks, vs, allowed, kvpos)
            return jax.tree.map(jnp.add, acc, g)

          acc = (dq[a], dk_parts[bb], dv_parts[bb], dconsts)
          if skip_empty:
            acc = jax.lax.cond(jnp.any(allowed), compute, lambda x: x, acc)
          else:
            acc = compute(acc)
          dq[a], dk_parts[bb], dv_parts[bb], dconsts = acc
      return (dq, jnp.concatenate(dk_parts, 1), jnp.concatenate(dv_parts, 1), dconsts)

    def body(carry, step):
      dq, dk, dv, dconsts, k, v, kvseg = carry
      dq, dk, dv, dconsts = attend(step, dq, dk, dv, dconsts, k, v, kvseg)
      k, v, kvseg, dk, dv = jax.lax.ppermute((k, v, kvseg, dk, dv), axis_name, ring_perm)
      return (dq, dk, dv, dconsts, k, v, kvseg), None

    (dq, dk, dv, dconsts, k, v, kvseg), _ = jax.lax.scan(
        body, (dq, dk, dv, dconsts, k, v, kvseg), jnp.arange(p - 1))
    dq, dk, dv, dconsts = attend(p - 1, dq, dk, dv, dconsts, k, v, kvseg)
    dk, dv = jax.lax.ppermute((dk, dv), axis_name, ring_perm)  # home after P moves
    if has_sinks:
      # d lse / d sink_n = exp(sink_n - lse); dL/d sink_n = -sum_i exp(sink_n - lse_i) D_i
      d_row = jnp.sum(dout32 * out32, axis=-1)  # [B, T, N]
      p_sink = jnp.exp(sinks[None, :, None] - lse)  # [B, N, T]
      dsinks = -jnp.sum(p_sink * jnp.swapaxes(d_row, 1, 2), axis=(0, 2))
      dsinks = jax.lax.psum(dsinks, tuple(b_axes) + (axis_name,))
    else:
      dsinks = jnp.zeros_like(sinks)
    dconsts = tuple(jax.lax.psum(x, all_axes) for x in dconsts)
    return (jnp.concatenate(dq, 1).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            dsinks, dconsts)

  bwd_map = jax.shard_map(
      local_bwd, mesh=mesh, in_specs=in_specs + (qkv_spec, lse_spec, qkv_spec),
      out_specs=(qkv_spec, qkv_spec, qkv_spec, P(hspec), P()), check_vma=False)

  @jax.custom_vjp
  def core(q, k, v, qseg, kvseg, sinks, mleaves, consts):
    return fwd_map(q, k, v, qseg, kvseg, sinks, mleaves, consts)[0]

  def core_fwd(q, k, v, qseg, kvseg, sinks, mleaves, consts):
    out, lse = fwd_map(q, k, v, qseg, kvseg, sinks, mleaves, consts)
    return out, (q, k, v, qseg, kvseg, sinks, mleaves, consts, out, lse)

  def core_bwd(res, dout):
    q, k, v, qseg, kvseg, sinks, mleaves, consts, out, lse = res
    dq, dk, dv, dsinks, dconsts = bwd_map(q, k, v, qseg, kvseg, sinks, mleaves, consts, out,
                                          lse, dout)
    zero_int = lambda x: _zero_cotangent(x)
    dconsts = tuple(d.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                    else zero_int(x) for d, x in zip(dconsts, consts))
    return (dq, dk, dv, zero_int(qseg), zero_int(kvseg), dsinks,
            tuple(zero_int(x) for x in mleaves), dconsts)

  core.defvjp(core_fwd, core_bwd)
  if not custom:
    return lambda *args: fwd_map(*args)[0]
  return core


def _zero_cotangent(x):
  """The zero cotangent of a primal (float0 for integer/bool arrays)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  if jnp.issubdtype(x.dtype, jnp.floating):
    return jnp.zeros(x.shape, x.dtype)
  return np.zeros(x.shape, jax.dtypes.float0)
