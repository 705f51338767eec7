"""Backend-independent foundations shared by ``ops``, ``kernels`` and ``cpu``.

* :mod:`attnjax.core.args` -- :class:`AttentionArgs` and :func:`check_attention_args`
  (validation, done once per call for every implementation).
* :mod:`attnjax.core.vma` -- ``shard_map`` helpers: :func:`varying_axes`,
  :func:`sum_to_vma`, :func:`vary_like`.
* :mod:`attnjax.core.jaxpr` -- the one jaxpr evaluator (a shared equation walker with
  two equation rules: in-kernel tile evaluation and ``shard_map``-aware re-binding).
* :mod:`attnjax.core.plan` -- block tables and mask plans: :class:`Plan`,
  :func:`make_plan`, traced predicates / score mods, tile schedules and splits.
* :mod:`attnjax.core.softmax` -- the float32 reference softmax math.
* :mod:`attnjax.core.errors` -- :class:`Unsupported`, the refusal an implementation
  raises when it cannot serve a call (the dispatcher falls through on it only).
* :mod:`attnjax.core.hooks` -- :func:`~attnjax.core.hooks.attention`: the dispatcher
  (:func:`attnjax.attention`, registered by :mod:`attnjax.dispatch`) for ops that compose
  on top of it.

Layering: ``core`` imports only jax / numpy / the standard library and
:mod:`attnjax.masks` / :mod:`attnjax.score_mods` (see ``docs/architecture.md``).
"""

from attnjax.core.errors import Unsupported

__all__ = ["Unsupported"]
