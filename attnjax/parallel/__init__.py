"""Parallelism: device mesh from config, logical-axis rules, ring attention (context parallelism)."""

from attnjax.parallel.mesh import MESH_AXES, axis_size, make_mesh, mesh_shape
from attnjax.parallel.rules import (DEFAULT_ACTIVATION_RULES, DEFAULT_PARAM_RULES,
                                    activation_sharding, constrain, current_mesh,
                                    logical_to_spec, normalize_rules, state_shardings)
from attnjax.parallel.ring import ring_attention

__all__ = [
    'MESH_AXES', 'axis_size', 'make_mesh', 'mesh_shape', 'DEFAULT_ACTIVATION_RULES',
    'DEFAULT_PARAM_RULES', 'activation_sharding', 'constrain', 'current_mesh',
    'logical_to_spec', 'normalize_rules', 'state_shardings', 'ring_attention',
]
