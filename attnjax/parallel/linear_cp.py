"""Context parallelism for causal linear attention and linear recurrences: the state passes
between sequence shards.

The sequence is split contiguously over the P devices of the ``context`` mesh axis (device
``i`` holds tokens ``[i T/P, (i+1) T/P)``). A causal linear recurrence carries everything
the past contributes in a constant-size state, and for every mechanism served here the
state after a shard is an **affine** function of the state before it:

    S_out = S_in * D + b                 (``'diagonal'``: linear, Lightning, retention, GLA,
                                          Mamba-2 SSD, InLine, focused; D per head (and key
                                          dimension for GLA), 1 without decay)
    S_out = S_in @ M + b                 (``'matrix'``: DeltaNet, Gated DeltaNet; S [Hv, H],
                                          M [H, H] per head: the product of the chunks'
                                          ``alpha (I - beta k k^T)`` transitions)

so each device can summarise its shard without knowing the past:

1. **local summary**: ``b`` = the shard's final state from a zero initial state, and the
   linear part (``D`` or ``M``) = the derivative of that final state with respect to the
   initial state (``jax.linearize`` of the op itself: one forward-mode pass over the
   state recurrence; the op's outputs are not needed here and are dead code under ``jit``);
2. **prefix over devices**: ``all_gather`` of ``(D, b)`` (or ``(M, b)``) over the context
   axis, then every device runs the P-step recurrence ``S_in[i+1] = S_in[i] * D_i + b_i``
   from the global initial state and keeps its own ``S_in``;
3. **local output**: the op runs again on the shard with ``state=S_in``.

The result equals the single-device op up to float32 summation order, forward and
backward (the backward is JAX's transpose of the same program: ``all_gather`` transposes
to a reduce-scatter). Mechanisms whose state is *not* affine in the incoming state (the
causal Flowformer's competition sums) cannot be split this way and are rejected by the
layers (they run without context parallelism).

Cost per device, for a shard of ``T/P`` tokens: the op once (step 3), the state recurrence
and its tangent once (step 1, roughly the inter-chunk part of the op; for the delta rule
``ceil(H/Hv)`` tangents, each as costly as the state recurrence), and an ``all_gather`` of
two states (``P x`` state size; ``M`` is ``[B, N, H, H]``), i.e. about 1.5-2x the work of a
``T/P``-token call and one small collective, against ``T``-token work on one device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from attnjax.parallel import ring as _ring
from attnjax.parallel import rules as _rules

TRANSITIONS = ('diagonal', 'matrix')

__all__ = ['TRANSITIONS', 'context_parallel_linear', 'context_mesh', 'default_transition']


def default_transition(fn: Callable) -> str:
  """``'matrix'`` for the delta-rule ops of :mod:`attnjax.ops.linear`, else ``'diagonal'``."""
  from attnjax.ops import linear as L  # pylint: disable=import-outside-toplevel
  target = getattr(fn, 'func', fn)  # functools.partial
  return 'matrix' if target in (L.delta_rule_attention, L.gated_delta_rule_attention) \
      else 'diagonal'


def context_mesh(axis_name: str = 'context') -> jax.sharding.Mesh | None:
  """The mesh of :func:`attnjax.parallel.activation_sharding` (the trainer's) when its
  ``axis_name`` axis has more than one device, else None: what the layers consult to run
  their causal linear op context-parallel."""
  mesh = _rules.current_mesh()
  if mesh is None or dict(mesh.shape).get(axis_name, 1) <= 1:
    return None
  return mesh


def _matrix_part(lin, state):
  """``M [..., H, H]`` of a linear map ``lin(S) = S @ M`` on states ``S [..., Hv, H]``.

  ``lin`` is applied to ``ceil(H / Hv)`` directions whose stacked rows are the identity
  ``I_H``; the stacked images are the rows of ``M``."""
  Hv, H = state.shape[-2:]
  nj = -(-H // Hv)
  eye = jnp.pad(jnp.eye(H, dtype=state.dtype), ((0, nj * Hv - H), (0, 0)))
  dirs = jnp.broadcast_to(eye.reshape((nj,) + (1,) * (state.ndim - 2) + (Hv, H)),
                          (nj,) + state.shape)
  rows = jax.vmap(lin)(dirs)                                     # [nj, ..., Hv, H]
  rows = jnp.moveaxis(rows, 0, -3)                               # [..., nj, Hv, H]
  return rows.reshape(state.shape[:-2] + (nj * Hv, H))[..., :H, :]


def context_parallel_linear(fn: Callable, *xs: jax.Array, mesh=None, axis_name: str = 'context',
                            batch_axes: Sequence[str] = ('data', 'fsdp'),
                            transition: str | None = None, state: Any = None,
                            return_state: bool = False, **kwargs):
  """Runs a causal linear-attention op (or any causal recurrence whose state is affine in
  its initial state) with the sequence split over a mesh axis, passing the state between
  the shards.

  ``out, S = fn(*xs, state=S0, return_state=True, **kwargs)`` with ``xs = (q, k, v, *extra)``
  on one device; here device ``i`` of ``axis_name`` runs ``fn`` on tokens
  ``[i T/P, (i+1) T/P)`` of every ``x`` with the state the earlier shards leave (see the
  module docstring for how that state is found). Exact: equal to the single-device call up
  to float32 summation order, forward and backward.

  Args:
    fn: e.g. ``attnjax.ops.linear.linear_attention`` (pass ``causal=True``),
      ``lightning_attention``, ``decayed_linear_attention``, ``gated_linear_attention``,
      ``delta_rule_attention``, ``gated_delta_rule_attention``, or a wrapper such as
      ``lambda x, dt, B, C, **kw: ssd_attention(x, dt, A, B, C, **kw)``. It must accept
      ``state=`` (None: zeros) and ``return_state=True``. Arrays it closes over, or passed
      in ``kwargs`` (a learnable decay, ``A``), are replicated and get their gradients.
    *xs: the per-token inputs, each ``[B, T, ...]`` with the same ``B`` and ``T``
      (``q, k, v`` and e.g. ``beta [B, T, N]``, ``log_alpha [B, T, N, H]``).
    mesh: default: the mesh of :func:`attnjax.parallel.activation_sharding`. Without a
      mesh, or with ``mesh.shape[axis_name] == 1``, this is ``fn`` itself.
    axis_name: the mesh axis the sequence is split over; ``T`` must be a multiple of its
      size.
    batch_axes: mesh axes over which the batch is split inside the shard map (those that
      divide ``B``); the other dimensions are whole on every device.
    transition: ``'diagonal'`` (the state after a shard is ``S_in * D + b``, elementwise)
      or ``'matrix'`` (``S_in @ M + b`` with the state ``[..., Hv, H]``: the delta rule);
      default: :func:`default_transition`.
    state: the initial state (``fn``'s format, leading dimension ``B``), or None (zeros).
    return_state: also return the state after the last token.
    **kwargs: passed to ``fn`` (``form``, ``chunk_size``, ``decay``, ...).

  Returns:
    ``fn``'s output ``[B, T, ...]``, or ``(out, final_state)`` with ``return_state``.
  """
  if not callable(fn):
    raise TypeError(f'context_parallel_linear: fn must be callable, got {type(fn).__name__}')
  if not xs:
    raise ValueError('context_parallel_linear: pass the per-token inputs (q, k, v, ...) '
                     'positionally')
  for i, x in enumerate(xs):
    if not hasattr(x, 'ndim') or x.ndim < 2:
      raise ValueError(f'context_parallel_linear: xs[{i}] must be [B, T, ...], got shape '
                       f'{getattr(x, "shape", type(x))}')
  B, T = xs[0].shape[:2]
  for i, x in enumerate(xs):
    if x.shape[:2] != (B, T):
      raise ValueError(f'context_parallel_linear: xs[{i}] must start with [B={B}, T={T}], '
                       f'got shape {x.shape}')
  transition = default_transition(fn) if transition is None else transition
  if transition not in TRANSITIONS:
    raise ValueError(f'context_parallel_linear: transition must be one of {TRANSITIONS}, got '
                     f'{transition!r}')
  mesh = mesh if mesh is not None else _rules.current_mesh()
  if mesh is not None and axis_name not in mesh.shape:
    raise ValueError(f'context_parallel_linear: axis_name={axis_name!r} is not a mesh axis '
                     f'{tuple(mesh.shape)}')
  p = 1 if mesh is None else dict(mesh.shape)[axis_name]
  if p == 1:
    out = fn(*xs, state=state, return_state=True, **kwargs)
    return out if return_state else out[0]
  if T % p:
    raise ValueError(f'context_parallel_linear: sequence length T={T} must be a multiple of '
                     f'the {axis_name!r} axis size {p}')

  b_axes = _ring.fit_axes(B, batch_axes, mesh)
  bspec = None if not b_axes else b_axes[0] if len(b_axes) == 1 else b_axes
  local_shapes = [jax.ShapeDtypeStruct((B // math.prod(dict(mesh.shape)[a] for a in b_axes),
                                        T // p) + x.shape[2:], x.dtype) for x in xs]
  abstract = jax.eval_shape(
      lambda *ys: fn(*ys, state=None, return_state=True, **kwargs)[1], *local_shapes)
  if state is None:
    state_global = jax.tree.map(lambda a: jnp.zeros((B,) + a.shape[1:], a.dtype), abstract)
  else:
    # the op's own structure and dtypes (a list where it returns a tuple, bf16, ...)
    given = jax.tree.leaves(state)
    if len(given) != len(jax.tree.leaves(abstract)):
      raise ValueError(f'context_parallel_linear: state must have the structure of the op\'s '
                       f'state {jax.tree.structure(abstract)}, got {jax.tree.structure(state)}')
    state_global = jax.tree.unflatten(jax.tree.structure(abstract), [
        jnp.asarray(x).astype(a.dtype) for x, a in zip(given, jax.tree.leaves(abstract))])
  leaves = jax.tree.leaves(state_global)
  if not leaves or any(getattr(l, 'ndim', 0) < 1 or l.shape[0] != B for l in leaves):
    raise ValueError(f'context_parallel_linear: every leaf of state must be [B={B}, ...], got '
                     f'{jax.tree.map(lambda l: getattr(l, "shape", type(l)), state_global)}')
  if transition == 'matrix' and len(leaves) != 1:
    raise ValueError("context_parallel_linear: transition='matrix' needs a single state array "
                     "[B, ..., Hv, H]")

  def local(state0, *ys):
    def final_state(s):
      return fn(*ys, state=s, return_state=True, **kwargs)[1]

    zero = jax.tree.map(jnp.zeros_like, state0)
    b, lin = jax.linearize(final_state, zero)                    # b: the shard's own state
    if transition == 'diagonal':
      lin_part = lin(jax.tree.map(jnp.ones_like, state0))       # D, broadcast to the state
      step = lambda s, d, c: jax.tree.map(lambda s_, d_, c_: s_ * d_ + c_, s, d, c)
    else:
      lin_part = _matrix_part(lin, zero)                        # M [..., H, H]
      step = lambda s, m, c: jnp.einsum('...vh,...hk->...vk', s, m,
                                        preferred_element_type=s.dtype) + c
    gathered = jax.lax.all_gather((lin_part, b), axis_name)     # leaves [P, ...]

    def prefix(s, x):
      part, c = x
      return step(s, part, c), s

    final, s_in_all = jax.lax.scan(prefix, state0, gathered)
    me = jax.lax.axis_index(axis_name)
    s_in = jax.tree.map(lambda a: a[me], s_in_all)
    out, _ = fn(*ys, state=s_in, return_state=True, **kwargs)
    return out, final

  seq_spec = P(bspec, axis_name)
  state_spec = jax.tree.map(lambda _: P(bspec), state_global)
  out, final = jax.shard_map(local, mesh=mesh, in_specs=(state_spec,) + (seq_spec,) * len(xs),
                             out_specs=(seq_spec, state_spec), check_vma=False)(state_global, *xs)
  return (out, final) if return_state else out
