"""Head gates, head importance, head-ablation curves and activation patching of one head.

All of them act through the interception of :mod:`attnjax.analysis.capture` (no model
change): a call's output ``o [B, T, N, Hv]`` (per query head, before the output
projection) becomes ``o[..., n, :] * g[n]`` for gates ``g [N]``, or has one head
replaced.  Layer names are those of :func:`attnjax.analysis.capture`.

Paper: "Are Sixteen Heads Really Better than One?" (Michel, Levy & Neubig, 2019): head
importance ``I_h = |d loss / d g_h|`` at ``g = 1`` (summed over the batch through the
loss); heads are pruned in increasing order of importance.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.analysis.capture import Recorder, _call_model, attention_calls

__all__ = ["gated_call", "head_importance", "importance_order", "random_order",
           "ablation_curve", "head_outputs", "patch_head"]


def _jitted(model, fn: Callable) -> Callable:
  """``fn(model, *args)`` compiled once with ``jax.jit`` (an NNX model is split into graph
  and state and rebuilt inside, so its parameters are arguments, not constants)."""
  try:
    from flax import nnx  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover
    nnx = None
  if nnx is not None and isinstance(model, nnx.Module):
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda st, *a: fn(nnx.merge(graphdef, st), *a))
    return lambda *a: f(state, *a)
  return jax.jit(lambda *a: fn(model, *a))


def _gated(m, inputs, gates, call_kwargs):
  rec = Recorder(m, record=False, gates=gates)
  with rec.active():
    out = _call_model(m, inputs, call_kwargs)
  missing = set(gates) - {c.name for c in rec.calls}
  if missing:
    raise ValueError(f"gates name layers the model did not call: {sorted(missing)}; its "
                     f"attention layers are {[c.name for c in rec.calls]}")
  return out


def gated_call(model, inputs, gates: dict, *, jit: bool = True, **call_kwargs):
  """``model(inputs, **call_kwargs)`` with head gates ``{layer name: g [N]}`` applied
  (differentiable in ``g``; layers not named are ungated); ``jit``: compiled once."""
  if not jit:
    return _gated(model, inputs, gates, call_kwargs)
  return _jitted(model, lambda m, x, g: _gated(m, x, g, call_kwargs))(inputs, gates)


def head_importance(model, inputs, loss_fn: Callable, *, normalize: bool = False,
                    **call_kwargs) -> dict:
  """``{layer name: |d loss / d g| [N]}`` at gates 1, ``loss = loss_fn(model output)``
  (a scalar), computed under ``jax.jit(jax.grad(...))``.  ``normalize``: divide each
  layer's scores by their l2 norm (Michel et al.'s layer-wise normalisation)."""
  calls = attention_calls(model, inputs, **call_kwargs)
  gates = {c.name: jnp.ones((c.N,), jnp.float32) for c in calls}

  def grad(m, x, g):
    return jax.grad(lambda g: loss_fn(_gated(m, x, g, call_kwargs)))(g)

  grads = _jitted(model, grad)(inputs, gates)
  out = {}
  for name, g in grads.items():
    s = np.abs(np.asarray(g, dtype=np.float64))
    if normalize:
      s = s / max(np.linalg.norm(s), 1e-12)
    out[name] = s
  return out


def importance_order(importance: dict) -> list:
  """Every ``(layer, head)``, least important first (the pruning order)."""
  items = [(float(s), name, h) for name, v in importance.items() for h, s in enumerate(v)]
  return [(name, h) for _, name, h in sorted(items, key=lambda x: x[0])]


def random_order(heads: dict, seed: int = 0) -> list:
  """Every ``(layer, head)`` of ``heads = {layer: N}`` (or an importance dict) in a random
  order drawn with ``seed``."""
  pairs = [(name, h) for name, n in heads.items()
           for h in range(n if isinstance(n, (int, np.integer)) else len(n))]
  perm = np.random.default_rng(seed).permutation(len(pairs))
  return [pairs[i] for i in perm]


def ablation_curve(model, inputs, metric_fn: Callable, order: Sequence, *,
                   steps: Optional[Sequence[int]] = None, **call_kwargs) -> tuple:
  """Metric as heads are removed (gate 0) in ``order`` (a list of ``(layer, head)``).

  Returns ``(counts, values)``: ``values[i] = metric_fn(output with the first counts[i]
  heads of order removed)``; ``steps`` (default ``0 .. len(order)``) picks the counts.
  """
  calls = {c.name: c.N for c in attention_calls(model, inputs, **call_kwargs)}
  for name, h in order:
    if name not in calls or not 0 <= h < calls[name]:
      raise ValueError(f"order holds ({name!r}, {h}), not a head of the model's layers {calls}")
  counts = list(range(len(order) + 1)) if steps is None else [int(s) for s in steps]
  run = _jitted(model, lambda m, x, g: _gated(m, x, g, call_kwargs))   # compiled once
  values = []
  for c in counts:
    gates = {name: np.ones(n, np.float32) for name, n in calls.items()}
    for name, h in order[:c]:
      gates[name][h] = 0.0
    values.append(float(metric_fn(run(inputs, gates))))
  return np.asarray(counts), np.asarray(values)


def _kept(m, x, layer, heads, call_kwargs):
  rec = Recorder(m, record=False, keep_outputs={layer: heads})
  with rec.active():
    out = _call_model(m, x, call_kwargs)
  if layer not in rec.outputs:
    raise ValueError(f"layer {layer!r} was not called; the model's attention layers are "
                     f"{[c.name for c in rec.calls]}")
  return rec.outputs[layer], out


def head_outputs(model, inputs, layer: str, heads, **call_kwargs):
  """The per-head outputs ``o [B, T, len(heads), Hv]`` of ``layer`` (before the output
  projection) and the model output, as ``(outputs, model_output)``."""
  heads = [heads] if isinstance(heads, int) else list(heads)
  return _jitted(model, lambda m, x: _kept(m, x, layer, heads, call_kwargs))(inputs)


def _patched(m, x, layer, head, value, call_kwargs):
  rec = Recorder(m, record=False, patch={layer: {head: value}})
  with rec.active():
    return _call_model(m, x, call_kwargs)


def patch_head(model, clean_inputs, corrupt_inputs, layer: str, head: int, **call_kwargs):
  """Activation patching of one head: the model output on ``corrupt_inputs`` with the
  output of ``head`` in ``layer`` replaced by its value on ``clean_inputs`` (same
  shapes).  Returns ``(patched output, corrupt output, clean output)``."""
  head = int(head)
  clean_o, clean_out = head_outputs(model, clean_inputs, layer, [head], **call_kwargs)
  corrupt_out = _jitted(model, lambda m, x: _call_model(m, x, call_kwargs))(corrupt_inputs)
  patched = _jitted(model, lambda m, x, v: _patched(m, x, layer, head, v, call_kwargs))(
      corrupt_inputs, clean_o[:, :, 0, :])
  return patched, corrupt_out, clean_out
