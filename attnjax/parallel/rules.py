"""Logical-axis rules: names on parameters and activations -> mesh axes.

Models name the dimensions of their parameters (``'embed'``, ``'heads'``, ``'mlp'`` ...,
as ``nnx`` variable metadata) and of their activations (``constrain(x, ('batch',
'length', 'embed'))``). A rule table in the config maps each logical name to zero, one or
several mesh axes. Two tables, because the same word means different things: the
``embed`` dimension of a *parameter* is split over ``fsdp`` (ZeRO-3 style), while the
``embed`` dimension of an *activation* stays whole (its batch dimension already uses
``fsdp``).

Resolution is forgiving in exactly two ways, both needed to run one config on any mesh:
a mesh axis already used by an earlier dimension of the same array is dropped, and a mesh
axis whose size does not divide the dimension is dropped (that dimension is replicated on
it). Unknown logical names are an error.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# Logical names a model may use (models_api.md).
PARAM_NAMES = ('embed', 'heads', 'kv_heads', 'head_dim', 'mlp', 'vocab', 'patch', 'classes',
               'length', 'layers')
ACTIVATION_NAMES = ('batch', 'length', 'embed', 'heads', 'kv_heads', 'head_dim', 'mlp', 'vocab',
                    'classes', 'patch')

DEFAULT_PARAM_RULES = (
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),
    ('head_dim', None),
    ('patch', None),
    ('classes', None),
    ('length', None),
    ('layers', None),
)

DEFAULT_ACTIVATION_RULES = (
    ('batch', ('data', 'fsdp')),
    ('length', 'context'),
    ('embed', None),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),
    ('classes', None),
    ('patch', None),
)

Rules = Sequence[tuple[str, Any]]


def normalize_rules(rules: Rules | Mapping[str, Any] | None, *, what: str = 'rules') -> dict:
  """Returns ``{logical_name: tuple_of_mesh_axes}`` from a rule list or mapping."""
  if rules is None:
    return {}
  items = rules.items() if isinstance(rules, Mapping) else rules
  out = {}
  for item in items:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
      raise ValueError(f'{what}: each rule must be (logical_name, mesh_axes); got {item!r}.')
    name, axes = item
    if axes is None:
      axes = ()
    elif isinstance(axes, str):
      axes = (axes,)
    else:
      axes = tuple(axes)
    out[str(name)] = axes
  return out


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None,
                    rules: Rules | Mapping[str, Any], mesh: jax.sharding.Mesh | None = None,
                    *, what: str = 'array') -> P:
  """Maps logical dimension names to a ``PartitionSpec`` under ``rules``.

  Args:
    names: one logical name (or None = replicated) per dimension.
    shape: the array shape, used to drop mesh axes that do not divide a dimension
      (None: no check).
    rules: rule list/mapping, e.g. ``DEFAULT_ACTIVATION_RULES``.
    mesh: mesh whose axis sizes are used for the divisibility check; axes missing from
      the mesh are dropped.
  Raises:
    ValueError for a logical name with no rule, or ``len(names) != len(shape)``.
  """
  table = normalize_rules(rules)
  if shape is not None and len(names) != len(shape):
    raise ValueError(f'{what}: {len(names)} logical names {tuple(names)} for an array of '
                     f'rank {len(shape)} (shape {tuple(shape)}); expected one name per dimension.')
  mesh_shape = dict(mesh.shape) if mesh is not None else None
  used: set[str] = set()
  spec = []
  for i, name in enumerate(names):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise ValueError(f'{what}: logical axis name {name!r} has no sharding rule; known names: '
                       f'{sorted(table)} (add it to config.sharding rules).')
    chosen = []
    size = 1
    for axis in table[name]:
      if axis in used:
        continue
      if mesh_shape is not None:
        if axis not in mesh_shape:
          continue
        n = mesh_shape[axis]
        if n == 1:
          continue
        if shape is not None and shape[i] % (size * n):
          continue
        size *= n
      chosen.append(axis)
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return P(*spec)


# --- activation constraints -------------------------------------------------------------

_CONTEXT: contextvars.ContextVar = contextvars.ContextVar('attnjax_sharding', default=None)


@contextlib.contextmanager
def activation_sharding(mesh: jax.sharding.Mesh, rules: Rules | Mapping[str, Any] | None = None):
  """Context in which ``constrain`` applies ``rules`` on ``mesh`` (the trainer sets it).

  Use it around tracing (``jax.jit(...).lower`` / first call) of model code. Outside it,
  ``constrain`` follows Flax's logical-axis rules on the user's own mesh instead.
  """
  token = _CONTEXT.set((mesh, normalize_rules(DEFAULT_ACTIVATION_RULES if rules is None
                                              else rules)))
  try:
    yield
  finally:
    _CONTEXT.reset(token)


def current_mesh() -> jax.sharding.Mesh | None:
  """The mesh set by ``activation_sharding``, or None."""
  ctx = _CONTEXT.get()
  return None if ctx is None else ctx[0]


def _flax_rules() -> tuple:
  """The rules of an enclosing ``flax.linen.logical_axis_rules(...)`` (or
  ``nnx.logical_axis_rules``) context, or ``()``. Flax is imported only if loaded."""
  spmd = sys.modules.get('flax.core.spmd')
  if spmd is None:
    return ()
  return tuple(spmd.get_logical_axis_rules() or ())


def _user_mesh():
  """The mesh of an enclosing ``jax.set_mesh`` / ``jax.sharding.use_mesh`` (abstract under
  ``jit``), or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def flax_rules_to_spec(names: Sequence[str | None], shape: Sequence[int], rules: Rules,
                       mesh: Any) -> P:
  """Maps logical names to a ``PartitionSpec`` under Flax-style logical-axis rules.

  Flax's semantics: ``rules`` is a sequence of ``(logical_name, mesh_axes)`` pairs and a
  name may appear in several; each dimension takes the first of its rules whose mesh axes
  are all still unused in this array (a rule to None replicates). A dimension named None
  is replicated. A name with no rule at all is ``P.UNCONSTRAINED``: left as the compiler
  (or the input) shards it, where Flax would replicate it, so a rule table that does not
  mention, say, ``'batch'`` never gathers a batch the user sharded. On top of that, as
  ``logical_to_spec`` does: mesh axes missing from ``mesh``, of size 1, or in ``Manual``
  mode (inside ``shard_map``) are dropped, and so is an axis whose size does not divide the
  dimension.
  """
  mesh_shape = dict(mesh.shape)
  manual = set()
  axis_types = getattr(mesh, 'axis_types', None)
  if axis_types is not None:
    manual = {a for a, t in zip(mesh.axis_names, axis_types)
              if t == jax.sharding.AxisType.Manual}
  used: set[str] = set()
  spec = []
  known = {rule_name for rule_name, _ in rules}
  for i, name in enumerate(names):
    if name is not None and name not in known:
      spec.append(P.UNCONSTRAINED)
      continue
    chosen = []
    if name is not None:
      for rule_name, axes in rules:
        if rule_name != name:
          continue
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        if any(a in used for a in axes):
          continue
        size = 1
        for axis in axes:
          n = mesh_shape.get(axis, 1)
          if axis in manual or n == 1 or shape[i] % (size * n):
            continue
          size *= n
          chosen.append(axis)
        break
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return P(*spec)


def _explicit_spec(x: jax.Array, spec: P) -> P:
  """``spec`` with each ``UNCONSTRAINED`` entry replaced by ``x``'s current sharding of that
  dimension (less mesh axes ``spec`` uses elsewhere): ``reshard`` needs a full spec."""
  entries = tuple(spec)
  used = set()
  for e in entries:
    if e is not None and e is not P.UNCONSTRAINED:
      used.update((e,) if isinstance(e, str) else e)
  current = tuple(jax.typeof(x).sharding.spec)
  current += (None,) * (x.ndim - len(current))
  out = []
  for e, cur in zip(entries, current):
    if e is not P.UNCONSTRAINED:
      out.append(e)
      continue
    axes = () if cur is None else (cur,) if isinstance(cur, str) else tuple(cur)
    axes = tuple(a for a in axes if a not in used)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names; a no-op outside a mesh.

  ``x`` of rank R takes R names from ``ACTIVATION_NAMES`` (``'batch'``, ``'length'``,
  ``'embed'``, ``'heads'``, ``'kv_heads'``, ``'head_dim'``, ``'mlp'``, ``'vocab'``, ...) or
  None. Which rules apply, first match wins:

  1. inside ``activation_sharding(mesh, rules)`` (the trainer): ``rules`` on ``mesh``, as
     ``jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(...)))``;
  2. inside the user's own mesh (``jax.set_mesh(mesh)`` / ``jax.sharding.use_mesh``) AND
     Flax's logical-axis rules (``flax.linen.logical_axis_rules(rules)`` or
     ``nnx.logical_axis_rules``): those rules, resolved by ``flax_rules_to_spec`` (names
     without a rule stay unconstrained), as ``jax.sharding.reshard`` on a mesh whose axes
     are all ``Explicit`` and ``with_sharding_constraint`` otherwise;
  3. otherwise (plain single-device use, or a mesh without rules) ``x`` unchanged.

  A rank mismatch is an error either way.
  """
  names = tuple(names)
  if len(names) != x.ndim:
    raise ValueError(f'constrain: got {len(names)} names {names} for an array of rank {x.ndim} '
                     f'(shape {x.shape}); expected one name per dimension.')
  ctx = _CONTEXT.get()
  if ctx is not None:
    mesh, table = ctx
    if math.prod(mesh.shape.values()) == 1:
      return x
    spec = logical_to_spec(names, x.shape, table, mesh, what='constrain')
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  rules = _flax_rules()
  if not rules:
    return x
  mesh = _user_mesh()
  if mesh is None or math.prod(dict(mesh.shape).values()) == 1:
    return x
  spec = flax_rules_to_spec(names, x.shape, rules, mesh)
  if all(e is P.UNCONSTRAINED for e in spec):
    return x
  explicit = jax.sharding.AxisType.Explicit
  if all(t == explicit for t in mesh.axis_types):
    return jax.sharding.reshard(x, _explicit_spec(x, spec))
  return jax.lax.with_sharding_constraint(x, spec)


# --- parameters -------------------------------------------------------------------------

def variable_logical_names(var: Any) -> tuple | None:
  """Logical axis names stored on an nnx Variable (``out_sharding`` / ``sharding``)."""
  meta = var.get_metadata() if hasattr(var, 'get_metadata') else {}
  for key in ('out_sharding', 'sharding', 'sharding_names'):
    names = meta.get(key)
    if names is not None:
      return tuple(names)
  return None


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh,
                    rules: Rules | Mapping[str, Any] | None = None) -> Any:
  """NamedSharding for every leaf of an nnx State (or any pytree of Variables/arrays).

  Leaves that are nnx Variables carrying logical names get ``logical_to_spec`` under
  ``rules`` (default ``DEFAULT_PARAM_RULES``); everything else is replicated.
  """
  from flax import nnx  # local: parallel/ must not import flax at module import time
  table = normalize_rules(DEFAULT_PARAM_RULES if rules is None else rules)

  def one(leaf):
    if isinstance(leaf, nnx.Variable):
      names = variable_logical_names(leaf)
      value = leaf.get_value() if hasattr(leaf, 'get_value') else leaf.value
      shape = getattr(value, 'shape', ())
      if names is None:
        spec = P()
      else:
        spec = logical_to_spec(names, shape, table, mesh, what=f'parameter of shape {shape}')
      return leaf.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
