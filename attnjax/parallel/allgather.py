"""Context parallelism by all-gathering K/V (the variant of document-masked long-context
training, e.g. Llama 3).

The sequence is split contiguously over the P devices of the ``context`` axis. Every
device all-gathers the keys, values and their segment ids (``jax.lax.all_gather`` over
``context``) and attends its own T/P queries, at their global positions, to all T keys:

    out_i = sum_{j allowed} exp(s_ij) v_j / (sum_{j allowed} exp(s_ij) + exp(sink_n)),
    s_ij  = softcap(score_mod(scale * q_i . k_j)),  i in this device's chunk, j in [0, T)

The mask, the segment ids and the score mod are evaluated at global positions, so it is
exact for any mask. The backward is JAX's transpose: the all-gather becomes a
reduce-scatter of dK/dV. Compared with the ring it moves K/V once instead of P-1 times
(one collective, no per-step latency), at the cost of holding all of K/V and a
[T/P, T] block of logits per device: memory grows with P at a fixed per-device length.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from attnjax.parallel import ring as _ring


def allgather_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh=None,
                        axis_name: str = 'context', mask: Any = None,
                        score_mod: Callable | None = None,
                        q_segment_ids: jax.Array | None = None,
                        kv_segment_ids: jax.Array | None = None,
                        scale: float | jax.Array | None = None,
                        softcap: float | None = None, sinks: jax.Array | None = None,
                        batch_axes: Sequence[str] = ('data', 'fsdp'),
                        head_axes: Sequence[str] = ('tensor',)) -> jax.Array:
  """Exact softmax attention with the queries split over a mesh axis and K/V all-gathered.

  Args:
    q: [B, T, N, H]; k: [B, T, K, H]; v: [B, T, K, Hv] (self-attention), N a multiple of K.
    mesh: the device mesh (default: the one set by ``attnjax.parallel.activation_sharding``).
      Without a mesh, or with ``mesh.shape[axis_name] == 1``, this is plain attention.
    axis_name: mesh axis the sequence is split over (T must divide by its size).
    mask, score_mod, q_segment_ids, kv_segment_ids, scale, softcap, sinks: as in
      ``attnjax.parallel.ring_attention`` (global positions; array masks are rejected).
    batch_axes, head_axes: mesh axes splitting batch and heads (where they divide).

  Returns:
    [B, T, N, Hv] in q's dtype; rows with no allowed key (and no sink) are 0.
  """
  mask, scale = _ring.check_cp_args(
      'allgather_attention', q, k, v, mask=mask, score_mod=score_mod,
      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, scale=scale,
      softcap=softcap, sinks=sinks)
  b, t, n, _ = q.shape
  kh = k.shape[2]
  q, scale, mesh, p = _ring.context_setup('allgather_attention', q, scale, mesh, axis_name)
  if t % p:
    raise ValueError(f'allgather_attention: sequence length T={t} must be a multiple of the '
                     f'{axis_name} axis size {p}.')
  if p == 1:
    from attnjax.core.softmax import reference_attention  # pylint: disable=import-outside-toplevel
    return reference_attention(q, k, v, mask=mask, score_mod=score_mod,
                               q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                               scale=scale, softcap=softcap, sinks=sinks)
  has_seg, q_segment_ids, kv_segment_ids, has_sinks, sinks = _ring.default_segments_and_sinks(
      q_segment_ids, kv_segment_ids, sinks, b, t, n)
  b_axes = _ring.fit_axes(b, batch_axes, mesh)
  h_axes = _ring.fit_axes(math.gcd(n, kh), head_axes, mesh)
  t_local = t // p
  bl = b // math.prod(mesh.shape[a] for a in b_axes)
  nl = n // math.prod(mesh.shape[a] for a in h_axes)
  mod_fn, consts = _ring.convert_score_mod(score_mod, bl, nl, t_local, t, mesh)
  mask_leaves, mask_treedef = jax.tree.flatten(mask)
  lg = _ring._Logits(mask=mask, score_mod_fn=mod_fn, softcap=softcap, scale=scale,  # pylint: disable=protected-access
                     num_heads=n, batch=b, has_seg=has_seg, mask_treedef=mask_treedef)

  def local(q, k, v, qseg, kvseg, sinks, mleaves, consts):
    me = jax.lax.axis_index(axis_name)
    b_off = jax.lax.axis_index(b_axes) * bl if b_axes else 0
    h_off = jax.lax.axis_index(h_axes) * nl if h_axes else 0
    bidx, hidx = b_off + jnp.arange(bl), h_off + jnp.arange(nl)
    qpos = me * t_local + jnp.arange(t_local)
    kvpos = jnp.arange(t)
    k_all, v_all, kvseg_all = (jax.lax.all_gather(x, axis_name, axis=1, tiled=True)
                               for x in (k, v, kvseg))
    allowed = lg.allowed(mleaves, bidx, hidx, qpos, kvpos, qseg, kvseg_all)
    s = lg.logits(consts, q, k_all, bidx, hidx, qpos, kvpos)
    o, lse = _ring.block_forward(s, allowed, v_all)
    if has_sinks:
      o, _ = _ring.add_sinks(o, lse, sinks)
    return o.astype(q.dtype)

  bspec, hspec = _ring.spec_entry(b_axes), _ring.spec_entry(h_axes)
  qkv_spec = P(bspec, axis_name, hspec, None)
  seg_spec = P(bspec, axis_name)
  return jax.shard_map(
      local, mesh=mesh,
      in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec, seg_spec, P(hspec), P(), P()),
      out_specs=qkv_spec, check_vma=False)(q, k, v, q_segment_ids, kv_segment_ids, sinks,
                                           tuple(mask_leaves), consts)
