"""Parallelism: device mesh from config, logical-axis rules (the trainer's, or Flax's on your
own mesh), context-parallel attention (ring with a custom VJP, all-gather K/V)."""

from attnjax.parallel.allgather import allgather_attention
from attnjax.parallel.context import (
                                      CONTEXT_IMPLS,
                                      check_context_impl,
                                      context_attention,
                                      context_impl,
                                      context_size,
                                      current_context_impl,
)
from attnjax.parallel.linear_cp import context_parallel_linear
from attnjax.parallel.mesh import MESH_AXES, axis_size, make_mesh, mesh_shape
from attnjax.parallel.ring import ring_attention
from attnjax.parallel.rules import (
                                    ACTIVATION_NAMES,
                                    DEFAULT_ACTIVATION_RULES,
                                    DEFAULT_PARAM_RULES,
                                    PARAM_NAMES,
                                    activation_sharding,
                                    constrain,
                                    current_mesh,
                                    flax_rules_to_spec,
                                    logical_to_spec,
                                    normalize_rules,
                                    state_shardings,
)

__all__ = [
    'MESH_AXES', 'axis_size', 'make_mesh', 'mesh_shape', 'DEFAULT_ACTIVATION_RULES',
    'DEFAULT_PARAM_RULES', 'ACTIVATION_NAMES', 'PARAM_NAMES', 'activation_sharding',
    'constrain', 'current_mesh', 'flax_rules_to_spec', 'logical_to_spec', 'normalize_rules',
    'state_shardings', 'ring_attention', 'allgather_attention', 'CONTEXT_IMPLS',
    'check_context_impl', 'context_attention', 'context_impl', 'context_size',
    'current_context_impl', 'context_parallel_linear',
]
