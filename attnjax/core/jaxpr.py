"""The jaxpr evaluator: one equation walker, two equation rules.

:func:`walk_jaxpr` binds a jaxpr's constants and arguments, feeds each equation's input
values to a rule ``rule(eqn, invals) -> outvals`` and returns the outputs.  Two rules use it:

* **In-kernel tile evaluation** (:func:`eval_jaxpr` with a :class:`TileEvaluator`), used
  by the Pallas kernels to evaluate user mask predicates and score mods on a tile.
  Pallas cannot lower a gather from an array, so a gather from a small closed-over array
  (ALiBi slopes, relative-position tables) is rewritten into a loop of selects reading
  scalars from a 1D kernel input, and its gradient becomes per-entry reductions
  (``d table[e] = sum(ds * [idx == e])``); integer ``sign`` (used by ``//``) is rewritten
  into selects; mesh-axis casts are identities (a kernel body has no mesh axes); every
  nested call (``jit``, ``custom_jvp``/``custom_vjp``) is inlined.
* **``shard_map``-aware re-binding** (:func:`eval_jaxpr_vma`, :func:`hoist_consts`), used by
  the ``'xla_chunked'`` path: operands are marked varying over the union of the mesh
  axes their co-operands vary over before each primitive, and a nested call is inlined
  only when it receives a varying operand (otherwise it is bound as
  ``jax.core.eval_jaxpr`` binds it, custom derivative rules included).

The two rules differ on purpose in which nested calls they inline and how they treat
mesh-axis casts; they share the walk.
"""

from __future__ import annotations

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from attnjax.core.errors import Unsupported
from attnjax.core.vma import vary_like, varying_axes

__all__ = ["walk_jaxpr", "TileEvaluator", "eval_jaxpr", "eval_jaxpr_vma", "hoist_consts",
           "const_storage"]

_F32 = jnp.float32
_prims = jex.core.primitives


def walk_jaxpr(jaxpr, consts, args, rule):
  """Evaluates an (open) ``jaxpr`` on ``consts`` and ``args``: each equation's outputs are
  ``rule(eqn, invals)`` (a list).  Returns the list of output values."""
  env = {}

  def read(v):
    if isinstance(v, jex.core.Literal):
      return v.val
    return env[v]

  for var, val in zip(jaxpr.constvars, consts):
    env[var] = val
  for var, val in zip(jaxpr.invars, args):
    env[var] = val
  for eqn in jaxpr.eqns:
    outs = rule(eqn, [read(v) for v in eqn.invars])
    for var, val in zip(eqn.outvars, outs):
      env[var] = val
  return [read(v) for v in jaxpr.outvars]


# =========================================================================== in-kernel tiles


class _ConstRef:
  """A closed-over array that lives in a 1D kernel input (``slot``), read by lookup."""

  def __init__(self, slot, shape, dtype):
    self.slot, self.shape, self.dtype = slot, tuple(shape), np.dtype(dtype)

  @property
  def size(self):
    return int(np.prod(self.shape, dtype=np.int64))


class _IndexStack:
  """Index components stacked on a trailing axis (kept unmaterialised for gathers)."""

  def __init__(self, comps):
    self.comps = list(comps)


def _is_marker(x):
  return isinstance(x, (_ConstRef, _IndexStack))


class TileEvaluator:
  """Evaluation context: the 1D refs holding closed-over arrays, and the *leaves*
  (values looked up from them) so a backward pass can differentiate through them.

  With ``leaf_values`` given, lookups return those values instead (in order), which
  makes the traced function differentiable with respect to the leaves.
  """

  def __init__(self, refs, leaf_values=None):
    self.refs = list(refs)
    self.leaf_values = None if leaf_values is None else list(leaf_values)
    self.leaves = []      # (slot, flat index tile or None, size)
    self.values = []      # the looked-up values, in order

  def lookup(self, marker: _ConstRef, flat):
    i = len(self.leaves)
    self.leaves.append((marker.slot, flat, marker.size))
    if self.leaf_values is not None:
      return self.leaf_values[i]
    val = self._read(marker, flat)
    self.values.append(val)
    return val

  def _read(self, marker, flat):
    ref = self.refs[marker.slot]
    store_dtype = ref.dtype
    if flat is None:
      val = ref[0]
      return _cast(val, marker.dtype)
    E = marker.size
    if E == 1:
      val = jnp.broadcast_to(ref[0], flat.shape)
      return _cast(val, marker.dtype)

    def body(e, acc):
      return jnp.where(flat == e, ref[e], acc)

    init = jnp.zeros(flat.shape, store_dtype)
    val = jax.lax.fori_loop(0, E, body, init)
    return _cast(val, marker.dtype)

  def accumulate_grads(self, leaf_cts, acc_by_slot: dict, width_by_slot: dict):
    """Adds ``d table[e] = sum(ct * [flat == e])`` into per-slot ``[1, width]`` vectors."""
    for (slot, flat, size), ct in zip(self.leaves, leaf_cts):
      if slot not in acc_by_slot:
        continue
      width = width_by_slot[slot]
      lane = jax.lax.broadcasted_iota(jnp.int32, (1, width), 1)
      ct = ct.astype(_F32)
      if flat is None or size == 1:
        tot = _sum11(ct)
        acc_by_slot[slot] = acc_by_slot[slot] + jnp.where(lane == 0, tot, 0.0)
        continue

      def body(e, acc, flat=flat, ct=ct, lane=lane):
        tot = _sum11(jnp.where(flat == e, ct, 0.0))
        return acc + jnp.where(lane == e, tot, 0.0)

      acc_by_slot[slot] = jax.lax.fori_loop(0, size, body, acc_by_slot[slot])
    return acc_by_slot


def _sum11(x):
  """Sum of a 0-2D array as a [1, 1] array (reductions that lower on Mosaic/Triton)."""
  if x.ndim == 0:
    return jnp.reshape(x, (1, 1))
  if x.ndim == 1:
    x = x[None, :]
  return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


def _cast(x, dtype):
  if dtype == np.bool_:
    return x != 0
  return x.astype(dtype)


def _int_sign(x):
  pos = jnp.full(x.shape, 1, x.dtype)
  neg = jnp.full(x.shape, -1, x.dtype)
  zero = jnp.full(x.shape, 0, x.dtype)
  return jnp.where(x > 0, pos, jnp.where(x < 0, neg, zero))


def _sub_jaxpr(eqn):
  p = eqn.primitive
  if p is _prims.jit_p:
    return eqn.params["jaxpr"]
  if p in (_prims.closed_call_p, _prims.call_p):
    return eqn.params["call_jaxpr"]
  if p is _prims.custom_jvp_call_p:
    return eqn.params["call_jaxpr"]
  if p is _prims.custom_vjp_call_p:
    return eqn.params.get("call_jaxpr") or eqn.params.get("fun_jaxpr")
  return None


def _materialise(x):
  if isinstance(x, _IndexStack):
    if len(x.comps) == 1:
      return x.comps[0][..., None]
    return jnp.stack(x.comps, axis=-1)
  if isinstance(x, _ConstRef):
    raise Unsupported(
        f"a closed-over array of shape {x.shape} is used in a way the kernel cannot "
        "evaluate (only point lookups like table[h, idx] and scalars are supported)")
  return x


def eval_jaxpr(closed, args, ev: TileEvaluator, const_markers=None):
  """Evaluates a ClosedJaxpr inside a kernel.  ``args`` may contain ``_ConstRef``
  markers; ``const_markers`` replace ``closed.consts`` (None: use the values)."""
  jaxpr = closed.jaxpr if hasattr(closed, "jaxpr") else closed
  consts = closed.consts if const_markers is None else const_markers
  return _eval(jaxpr, consts, args, ev)


def _eval(jaxpr, consts, args, ev):
  return walk_jaxpr(jaxpr, consts, args, lambda eqn, ins: _eval_eqn(eqn, ins, ev))


# Mesh-axis type casts a jaxpr traced inside ``shard_map`` holds; a kernel body has no
# mesh axes, so they are identities there.
_VMA_CASTS = ("pvary", "pcast")


def _eval_eqn(eqn, ins, ev):
  p = eqn.primitive
  params = eqn.params
  if p.name in _VMA_CASTS:
    return list(ins)
  out_avals = [v.aval for v in eqn.outvars]
  sub = _sub_jaxpr(eqn)
  if sub is not None:
    sub_consts = sub.consts if hasattr(sub, "consts") else ()
    return _eval(sub.jaxpr if hasattr(sub, "jaxpr") else sub, sub_consts, ins, ev)

  if any(_is_marker(x) for x in ins):
    x0 = ins[0]
    if p is jax.lax.convert_element_type_p and isinstance(x0, _ConstRef):
      return [_ConstRef(x0.slot, x0.shape, params["new_dtype"])]
    if p is jax.lax.gather_p and isinstance(x0, _ConstRef):
      return [_point_gather(x0, ins[1], params, out_avals[0], ev)]
    if p is jax.lax.concatenate_p and all(isinstance(x, _IndexStack) for x in ins) and \
        params["dimension"] == out_avals[0].ndim - 1:
      return [_IndexStack([c for x in ins for c in x.comps])]
    # A scalar closed-over value used elementwise (e.g. a learnable temperature).
    new = []
    for x in ins:
      if isinstance(x, _ConstRef) and x.size == 1 and x.shape == ():
        x = ev.lookup(x, None)
      new.append(_materialise(x))
    ins = new

  if p is jax.lax.broadcast_in_dim_p:
    shape = params["shape"]
    dims = params["broadcast_dimensions"]
    x = ins[0]
    if len(shape) >= 1 and shape[-1] == 1 and (len(dims) == 0 or dims[-1] != len(shape) - 1) \
        and not isinstance(x, _ConstRef):
      comp = jax.lax.broadcast_in_dim(x, shape[:-1], dims) if tuple(x.shape) != shape[:-1] else x
      return [_IndexStack([comp])]
  if p is jax.lax.reshape_p and not isinstance(ins[0], _ConstRef):
    shape = params["new_sizes"]
    x = ins[0]
    if len(shape) >= 1 and shape[-1] == 1 and tuple(x.shape) == tuple(shape[:-1]):
      return [_IndexStack([x])]
  if p is jax.lax.sign_p and jnp.issubdtype(ins[0].dtype, jnp.integer):
    return [_int_sign(ins[0])]
  out = p.bind(*ins, **params)
  return list(out) if p.multiple_results else [out]


def _point_gather(marker: _ConstRef, idx, params, out_aval, ev):
  dn = params["dimension_numbers"]
  nd = len(marker.shape)
  if (tuple(dn.offset_dims) != () or sorted(dn.collapsed_slice_dims) != list(range(nd))
      or tuple(dn.operand_batching_dims) != () or any(s != 1 for s in params["slice_sizes"])):
    raise Unsupported("only point lookups (table[i, j]) of closed-over arrays are "
                              "supported inside the kernel")
  if not isinstance(idx, _IndexStack):
    raise Unsupported("unsupported gather index layout inside the kernel")
  comps = idx.comps
  if len(comps) != len(dn.start_index_map):
    raise Unsupported("unsupported gather index layout inside the kernel")
  strides = [int(np.prod(marker.shape[d + 1:], dtype=np.int64)) for d in range(nd)]
  flat = None
  valid = None
  for c, d in zip(comps, dn.start_index_map):
    c = c.astype(jnp.int32)
    L = marker.shape[d]
    ok = (c >= 0) & (c < L)
    valid = ok if valid is None else valid & ok
    c = jnp.clip(c, 0, L - 1)
    term = c * strides[d] if strides[d] != 1 else c
    flat = term if flat is None else flat + term
  flat = jnp.broadcast_to(flat, out_aval.shape)
  val = ev.lookup(marker, flat)
  mode = params.get("mode")
  if mode is not None and "FILL" in str(mode):
    fill = params.get("fill_value")
    if fill is None:
      fill = np.nan if jnp.issubdtype(marker.dtype, jnp.inexact) else 0
    val = jnp.where(jnp.broadcast_to(valid, out_aval.shape), val,
                    jnp.asarray(fill, val.dtype))
  return val


def const_storage(x):
  """Flattens a closed-over array into the 1D f32/i32 kernel input that holds it."""
  x = jnp.asarray(x)
  dt = _F32 if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.int32
  return x.reshape(-1).astype(dt)


# =========================================================================== shard_map-aware


def hoist_consts(fn, *example_args):
  """Like ``jax.closure_convert`` but hoists *every* closed-over array (integer
  tracers included), so nothing traced leaks into a ``custom_vjp`` rule.

  Returns ``(fn_c, consts)`` with ``fn_c(*args, *consts) == fn(*args)``.  ``fn_c`` may be
  called with arguments or constants that vary over ``shard_map`` mesh axes the examples
  did not (see `eval_jaxpr_vma`).
  """
  closed = jax.make_jaxpr(fn)(*example_args)
  consts = list(closed.consts)
  n_args = len(example_args)

  def fn_c(*args):
    return eval_jaxpr_vma(closed.jaxpr, list(args[n_args:]), *args[:n_args])[0]
  return fn_c, consts


_CALL_JAXPR_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def eval_jaxpr_vma(jaxpr, consts, *args):
  """``jax.core.eval_jaxpr`` that, like the ``jax.numpy`` front end, marks operands
  varying over the union of the ``shard_map`` axes its operands vary over before each
  primitive (the jaxpr was traced without those axes).  A nested call (``jit``,
  ``custom_jvp``/``custom_vjp`` body) that gets a varying operand is evaluated inline the
  same way; otherwise (always, outside ``shard_map``) every equation is bound as
  ``jax.core.eval_jaxpr`` binds it, custom derivative rules included."""
  return walk_jaxpr(jaxpr, consts, args, _vma_eqn)


def _vma_eqn(eqn, invals):
  """The equation rule of :func:`eval_jaxpr_vma`."""
  sub = next((eqn.params[k] for k in _CALL_JAXPR_PARAMS if k in eqn.params), None)
  varying = any(varying_axes(x) for x in invals)
  if (varying and sub is not None and eqn.primitive.name != "while"
      and eqn.primitive.name != "scan"):
    sub_jaxpr = getattr(sub, "jaxpr", sub)
    sub_consts = getattr(sub, "consts", ())
    n_extra = len(invals) - len(sub_jaxpr.invars)   # custom_vjp may pass extra leading args
    outs = eval_jaxpr_vma(sub_jaxpr, list(sub_consts), *invals[max(n_extra, 0):])
  elif eqn.primitive.name == "pvary":   # recorded at trace time; may already hold
    axes = set(eqn.params["axes"])
    outs = [x if axes <= varying_axes(x) else
            jax.lax.pcast(x, tuple(sorted(axes - varying_axes(x))), to="varying")
            for x in invals]
  else:
    if varying:
      invals = vary_like(invals, invals)
    outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    if not eqn.primitive.multiple_results:
      outs = [outs]
  return outs

