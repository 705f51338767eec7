"""Capture of attention probabilities from any attnjax model, by recomputation.

Fused, chunked and Pallas kernels never store the ``[T, S]`` probabilities.  While a
:class:`Recorder` is active, every attention call of the model is intercepted at the one
point all of them pass (:func:`attnjax.core.hooks.intercepted`: softmax calls of
:func:`attnjax.attention` -- layers and the spatial, routing, pooling ops all go through
it -- and the public linear-attention ops), the call runs unchanged, and the recorder
recomputes the probabilities from the call's normalised arguments with the float32
reference math:

- softmax: ``p = softmax(softcap(score_mod(scale q.k + bias)))`` over the allowed keys
  (mask AND segment ids), the sink logit in the denominator (rows then sum to
  ``1 - sink mass``), fully masked rows 0 -- :func:`attnjax.core.softmax.dense_attention`
  applied to one-hot values ``v[b, s, k, :] = e_s``, so ``out = P @ V`` exactly;
- linear family: the implied weights ``W [B, N, T, S]`` with ``o_t = sum_s W_ts v_s``,
  obtained by running the same op (same feature map, decay, gates, normaliser, causal
  flag) on one-hot values in float32 (every op of the family is linear in ``v``); with a
  ``state`` passed to the call the map keeps the state's normaliser and the state's
  contribution is an extra (``extras=True``: ``'<name>:state'``, ``out = W v + term``);
- ops whose weights neither path sees (additive, Sinkhorn and talking-heads attention,
  Sparsifiner, the MoBA gather path, GLA, the (gated) delta rule, SSD, HIIF, FEAT's
  channel attention, slot attention, MIL pooling) report themselves with a ``probs`` thunk
  (:mod:`attnjax.core.hooks`): the map is the thunk's ``[B, N, T, S]`` weights, evaluated
  only here (``docs/analysis.md`` lists what each variant family gives); what a map
  cannot express (per-channel weights, local convolutions, gates, a state) an op reports
  as ``extras``, returned with ``extras=True``.

Nothing is stored during training: without an active recorder the interception costs
one thread-local lookup.  :func:`capture` traces the forward pass under ``jax.jit`` by
default (``jit=False``: eagerly); a model applying its layers inside ``lax.scan``
(``scan_layers=True``) cannot be captured -- a map computed inside a transformation cannot
leave it -- which is reported as a ValueError.

Layer names: for a Flax NNX model, the path of the innermost NNX module whose
``__call__`` was running when the call happened, ``'/'``-joined (e.g.
``'blocks/layers/0/attn'``), found by wrapping the ``__call__`` of the model's module
classes for the duration of the capture (restored afterwards; the model code is not
changed); a module that makes several calls (e.g. HiLo's two head groups) gives
``path``, ``path#1``, ...  Outside any known module (plain functions, Linen models) the
names are ``attention_0, attention_1, ...`` in call order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import hooks
from attnjax.core import softmax as _softmax

__all__ = ["capture", "Recorder", "CallInfo", "softmax_probs", "linear_weights",
           "linear_state_term", "attention_calls", "capture_attention"]

LayerSel = Union[None, str, int, Sequence[Union[str, int]], Callable[[str], bool]]


# ----------------------------------------------------------------------------- recompute

def _onehot_values(B, S, K):
  """``v [B, S, K, S]`` float32 with ``v[b, s, k, :] = e_s``."""
  return jnp.broadcast_to(jnp.eye(S, dtype=jnp.float32)[None, :, None, :], (B, S, K, S))


def softmax_probs(q, k, args) -> jax.Array:
  """``P [B, N, T, S]`` float32 of one softmax call (``args``: its normalised
  :class:`attnjax.core.args.AttentionArgs`), by the reference math on one-hot values."""
  onehot = _onehot_values(q.shape[0], k.shape[1], k.shape[2])
  out, _ = _softmax.dense_attention(q.astype(jnp.float32), k.astype(jnp.float32), onehot, args,
                                    upcast=True)
  return jnp.transpose(out, (0, 2, 1, 3))


def linear_weights(fn: Callable, q, k, kwargs: Optional[dict] = None, v=None) -> jax.Array:
  """Implied weights ``W [B, N, T, S]`` float32 of a linear-attention op ``fn(q, k, v,
  **kwargs)`` (linear in ``v``): ``fn`` on one-hot values.  With a ``state`` in ``kwargs``
  (then ``v`` is needed for its shape) the state is kept -- a normalised op's denominator
  includes the state's normaliser -- and ``W`` is the derivative of the output in ``v``,
  one backward pass per query and head (``jax.vjp``); the state's own contribution is
  :func:`linear_state_term`."""
  kw = _plain_kwargs(kwargs)
  if kw.get("state") is not None:
    if v is None:
      raise ValueError("linear_weights: a call with a state needs its values v (for the shape)")
    B, T, N = q.shape[:3]
    S, K, Hv = v.shape[1:]
    out, pull = jax.vjp(lambda x: fn(q.astype(jnp.float32), k.astype(jnp.float32), x, **kw),
                        jnp.zeros(v.shape, jnp.float32))
    basis = jnp.eye(T * N, dtype=jnp.float32).reshape(T * N, 1, T, N)
    ct = jnp.zeros((T * N, B, T, N, Hv), jnp.float32).at[..., 0].set(
        jnp.broadcast_to(basis, (T * N, B, T, N)))
    (g,) = jax.vmap(pull)(ct)                                   # [T N, B, S, K, Hv]
    g = g[..., 0].reshape(T, N, B, S, K)
    heads = jax.nn.one_hot(jnp.arange(N) // (N // K), K, dtype=jnp.float32)
    return jnp.einsum("tnbsk,nk->bnts", g, heads, precision=jax.lax.Precision.HIGHEST)
  onehot = _onehot_values(q.shape[0], k.shape[1], k.shape[2])
  out = fn(q.astype(jnp.float32), k.astype(jnp.float32), onehot, **kw)
  return jnp.transpose(out, (0, 2, 1, 3)).astype(jnp.float32)


def linear_state_term(fn: Callable, q, k, v, kwargs: Optional[dict] = None) -> jax.Array:
  """The contribution ``[B, T, N, Hv]`` float32 of the ``state`` passed to a linear op:
  the op on zero values (so ``out = W v + term``, ``W`` from :func:`linear_weights`)."""
  kw = _plain_kwargs(kwargs)
  return jnp.asarray(fn(q.astype(jnp.float32), k.astype(jnp.float32),
                        jnp.zeros(v.shape, jnp.float32), **kw), jnp.float32)


def _plain_kwargs(kwargs):
  """The call's keyword arguments for a recomputation: one output, the XLA path (whatever
  implementation served the call -- a Pallas chunk kernel, or the one ``None``/``'auto'``
  picks on this backend -- the map is the XLA forms' one)."""
  kw = dict(kwargs or {})
  if "return_state" in kw:
    kw["return_state"] = False
  if "implementation" in kw:
    kw["implementation"] = "xla"
  return kw


def _probs_of(call: hooks.AttentionCall):
  if call.probs is not None:   # the op's own recomputation (see attnjax.core.hooks)
    return jnp.asarray(call.probs(), jnp.float32)
  if call.kind == "softmax":
    return softmax_probs(call.q, call.k, call.args)
  return linear_weights(call.fn, call.q, call.k, call.kwargs, call.v)


def _extras_of(call: hooks.AttentionCall) -> dict:
  """``{suffix: array}``: what the op reports beside its map (``extras=``), and for a
  public linear op called with a ``state`` the state's contribution ``'state'``."""
  out = {}
  if call.extras is not None:
    out.update(call.extras())
  if call.fn is not None and (call.kwargs or {}).get("state") is not None:
    out["state"] = linear_state_term(call.fn, call.q, call.k, call.v, call.kwargs)
  return {name: jnp.asarray(x, jnp.float32) for name, x in out.items()}


# ----------------------------------------------------------------------------- naming

class _Namer:
  """Names calls by the NNX module path on the call stack, else by call order."""

  def __init__(self):
    self.stack: list[str] = []
    self.seen: dict[str, int] = {}
    self.count = 0

  def next_name(self) -> str:
    base = self.stack[-1] if self.stack else f"attention_{self.count}"
    self.count += 1
    n = self.seen.get(base, 0)
    self.seen[base] = n + 1
    return base if n == 0 else f"{base}#{n}"


@contextlib.contextmanager
def _module_paths(model, namer: _Namer):
  """Wraps the ``__call__`` of ``model``'s NNX module classes so that ``namer.stack``
  holds the path of each running module; restores the classes on exit."""
  try:
    from flax import nnx  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover
    nnx = None
  if nnx is None or model is None or not isinstance(model, nnx.Module):
    yield
    return
  paths: dict[int, str] = {}
  classes = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module) and id(node) not in paths:
      paths[id(node)] = "/".join(str(p) for p in path) or "<model>"
      cls = type(node)
      if cls not in classes and any("__call__" in c.__dict__ for c in cls.__mro__[:-1]):
        classes.append(cls)

  def wrap(orig):
    @functools.wraps(orig)
    def call(self, *a, **kw):
      p = paths.get(id(self))
      if p is None:
        return orig(self, *a, **kw)
      namer.stack.append(p)
      try:
        return orig(self, *a, **kw)
      finally:
        namer.stack.pop()
    return call

  saved = []
  try:
    for cls in classes:
      saved.append((cls, cls.__dict__.get("__call__")))
      cls.__call__ = wrap(cls.__call__)
    yield
  finally:
    for cls, own in reversed(saved):
      if own is None:
        delattr(cls, "__call__")
      else:
        cls.__call__ = own


# ----------------------------------------------------------------------------- recorder

@dataclasses.dataclass(frozen=True)
class CallInfo:
  """One intercepted call: its layer ``name``, ``kind`` ('softmax' | 'linear' | 'sinkhorn' |
  'talking_heads' | 'pooling', see ``docs/analysis.md``), query heads ``N``, lengths
  ``T``, ``S`` and batch ``B``."""
  name: str
  kind: str
  B: int
  N: int
  T: int
  S: int


def _selector(layers: LayerSel) -> Callable[[str, int], bool]:
  if layers is None:
    return lambda name, i: True
  if callable(layers) and not isinstance(layers, str):
    return lambda name, i: bool(layers(name))
  items = [layers] if isinstance(layers, (str, int)) else list(layers)
  for x in items:
    if isinstance(x, bool) or not isinstance(x, (str, int)):
      raise TypeError(f"layers must be None, a name, a call index, a sequence of those or a "
                      f"predicate name -> bool, got item {x!r}")
  names = {x for x in items if isinstance(x, str)}
  idx = {x for x in items if isinstance(x, int)}
  return lambda name, i: name in names or i in idx


def _map_out(out, f):
  if isinstance(out, tuple):
    return (f(out[0]),) + tuple(out[1:])
  return f(out)


class Recorder:
  """An interception session (see the module docstring).

  Args:
    model: an NNX module whose paths name the calls (or None: call-order names).
    layers: which calls to record probabilities for: None (all), a name, a call index,
      a sequence of those, or a predicate ``name -> bool``.
    heads: None (all) or a sequence of query-head indices kept in the recorded maps.
    record: recompute the probabilities (False: only names and shapes, ``calls``).
    gates: ``{name: g [N]}``; the call's output is ``out[..., n, :] * g[n]`` (head gates,
      differentiable: Michel et al.'s head masks).
    patch: ``{name: {head: value [B, T, Hv]}}``; that head's output is replaced.
    keep_outputs: ``{name: heads}``; the outputs ``out[:, :, heads, :]`` are kept in
      ``outputs[name]`` (``[B, T, len(heads), Hv]``).
    extras: also record what a call reports beside its map (``docs/analysis.md``: FEAT's
      per-channel WKV weights, L^2ViT's local concentration, CARE's gated branches, the
      contribution of a recurrent ``state``) in ``probs`` as ``'<name>:<suffix>'``
      (float32, all heads: ``heads`` selects in the maps only).

  Attributes: ``calls`` (list of :class:`CallInfo`, in call order), ``probs``
  (``{name: P [B, N', T, S]}`` as ``np.ndarray`` float32), ``outputs``.
  """

  def __init__(self, model=None, *, layers: LayerSel = None, heads=None, record=True,
               gates=None, patch=None, keep_outputs=None, extras=False):
    if not isinstance(extras, bool):
      raise TypeError(f"extras must be a bool, got {type(extras).__name__}")
    self.extras = extras
    self.model = model
    self._select = _selector(layers)
    if heads is not None:
      heads = [heads] if isinstance(heads, int) else list(heads)
      if any(isinstance(h, bool) or not isinstance(h, (int, np.integer)) for h in heads):
        raise TypeError(f"heads must be None or a sequence of ints, got {heads!r}")
    self.heads = heads
    self.record = bool(record)
    self.gates = dict(gates or {})
    self.patch = dict(patch or {})
    self.keep_outputs = dict(keep_outputs or {})
    self.calls: list[CallInfo] = []
    self.probs: dict[str, np.ndarray] = {}
    self.outputs: dict[str, Any] = {}
    self._namer = _Namer()
    self._traced = False   # capture(jit=True): maps stay arrays of the enclosing trace

  def __call__(self, call: hooks.AttentionCall):
    name = self._namer.next_name()
    if call.dims is not None:
      B, N, T, S = call.dims
    else:
      B, T, N = call.q.shape[:3]
      S = call.k.shape[1]
    index = len(self.calls)
    self.calls.append(CallInfo(name, call.kind, int(B), int(N), int(T), int(S)))
    if self.record and self._select(name, index):
      p = _probs_of(call)
      if tuple(p.shape) != (B, N, T, S):
        raise ValueError(f"attnjax.analysis: the map of {name!r} ({call.kind}) has shape "
                         f"{tuple(p.shape)}, expected [B, N, T, S] = {(B, N, T, S)}")
      if isinstance(p, jax.core.Tracer) and not self._traced:
        raise ValueError(
            f"attnjax.analysis: the attention call {name!r} runs inside a JAX transformation "
            f"(jax.jit, lax.scan -- e.g. scan_layers=True -- or jax.grad), so its map cannot "
            f"be returned; call the model eagerly with scan_layers=False")
      if self.heads is not None:
        bad = [h for h in self.heads if not 0 <= h < N]
        if bad:
          raise ValueError(f"heads must be in [0, N={N}) for {name!r}, got {bad}")
        p = p[:, np.asarray(self.heads)]
      self.probs[name] = p if self._traced else np.asarray(p)
      if self.extras:
        for suffix, x in _extras_of(call).items():
          self.probs[f"{name}:{suffix}"] = x if self._traced else np.asarray(x)
    out = call.out
    if call.dims is not None and (name in self.keep_outputs or name in self.gates
                                  or name in self.patch):
      raise ValueError(f"attnjax.analysis: {name!r} ({call.kind}) has no per-head output "
                       f"[B, T, N, Hv]: head gates, patching and keep_outputs do not apply")
    if name in self.keep_outputs:
      hs = np.asarray(list(self.keep_outputs[name]))
      first = out[0] if isinstance(out, tuple) else out
      self.outputs[name] = first[:, :, hs, :]
    changed = False
    if name in self.gates:
      g = jnp.asarray(self.gates[name])
      if g.shape != (N,):
        raise ValueError(f"gates[{name!r}] must have shape [N] = ({N},), got {g.shape}")
      out = _map_out(out, lambda o: o * g.astype(o.dtype)[None, None, :, None])
      changed = True
    if name in self.patch:
      for h, value in self.patch[name].items():
        if not 0 <= h < N:
          raise ValueError(f"patch head must be in [0, N={N}) for {name!r}, got {h}")
        out = _map_out(out, lambda o, h=h, value=value: o.at[:, :, h, :].set(
            jnp.asarray(value).astype(o.dtype)))
      changed = True
    return out if changed else None

  @contextlib.contextmanager
  def active(self):
    """Installs the recorder (and the module-path naming) for a ``with`` block."""
    with _module_paths(self.model, self._namer), hooks.observe(self):
      yield self


def _call_model(model, inputs, call_kwargs):
  args = inputs if isinstance(inputs, tuple) else (inputs,)
  return model(*args, **call_kwargs)


def capture(model, inputs, *, layers: LayerSel = None, heads=None, jit: bool = True,
            return_output: bool = False, extras: bool = False, **call_kwargs):
  """Attention probabilities of every attention call of ``model(inputs, **call_kwargs)``.

  Works for any model and any registered variant without changing the model: see the
  module docstring for what is recomputed and how layers are named.

  Args:
    model: a callable (an NNX module for path names).
    inputs: its first positional argument, or a tuple of positional arguments (arrays).
    layers: None (all), a layer name, a call index, a sequence of those or a predicate
      ``name -> bool``; unselected calls are not recomputed.
    heads: None (all) or a sequence of query-head indices.
    jit: trace the forward pass and the recomputation once under ``jax.jit`` (an NNX
      model is split into graph and state first; much faster than eager op-by-op
      execution) -- or run eagerly (``jit=False``).  Either way a model applying its
      layers inside ``lax.scan`` (``scan_layers=True``) cannot be captured (ValueError).
    return_output: also return the model's output of the same (observed) forward pass.
    extras: also return, as ``'<layer name>:<suffix>'`` entries after the layer's map, what
      a call reports beside its ``[B, N, T, S]`` map (see :class:`Recorder`).
    **call_kwargs: passed to the model unchanged (static, e.g. ``deterministic=True``).

  Returns:
    ``{layer name: probs [B, N, T, S]}`` (``np.ndarray`` float32, in call order), softmax
    rows summing to 1 (minus sink mass), linear ops their implied weights, the other
    families as listed in ``docs/analysis.md``; with ``return_output``: ``(maps, output)``.
  """
  if not isinstance(return_output, bool):
    raise TypeError(f"return_output must be a bool, got {type(return_output).__name__}")
  if not jit:
    rec = Recorder(model, layers=layers, heads=heads, extras=extras)
    with rec.active():
      out = _call_model(model, inputs, call_kwargs)
    return (rec.probs, out) if return_output else rec.probs
  try:
    from flax import nnx  # pylint: disable=import-outside-toplevel
    is_nnx = isinstance(model, nnx.Module)
  except ImportError:  # pragma: no cover
    is_nnx = False
  graphdef, state = nnx.split(model) if is_nnx else (None, None)

  def run(state, inputs):
    m = nnx.merge(graphdef, state) if is_nnx else model
    rec = Recorder(m, layers=layers, heads=heads, extras=extras)
    rec._traced = True  # pylint: disable=protected-access
    with rec.active():
      out = _call_model(m, inputs, call_kwargs)
    return rec.probs, (out if return_output else None)

  try:
    probs, out = jax.jit(run)(state, inputs)
  except jax.errors.UnexpectedTracerError as e:
    raise ValueError("attnjax.analysis.capture: an attention call ran inside a transformation "
                     "of the model (lax.scan over layers, scan_layers=True?); its map cannot be "
                     "returned; build the model with scan_layers=False") from e
  probs = {name: np.asarray(p) for name, p in probs.items()}
  return (probs, out) if return_output else probs


def attention_calls(model, inputs, **call_kwargs) -> list[CallInfo]:
  """The attention calls of one forward pass (names, kinds, shapes), nothing recomputed
  (the model is traced abstractly with ``jax.eval_shape``, nothing runs)."""
  rec = Recorder(model, record=False)

  def run(x):
    with rec.active():
      _call_model(model, x, call_kwargs)

  jax.eval_shape(run, inputs)
  return rec.calls


@contextlib.contextmanager
def capture_attention(model=None):
  """Context-manager form: yields a list that receives one ``np.ndarray [B, N, T, S]``
  per attention call made inside the block (eager calls only), in call order."""
  records: list[np.ndarray] = []
  rec = Recorder(model)

  class _Sink(dict):
    def __setitem__(self, key, value):
      super().__setitem__(key, value)
      records.append(value)

  rec.probs = _Sink()
  with rec.active():
    yield records
