"""Device mesh from a config: axes ``data``, ``fsdp``, ``tensor``, ``context``.

The mesh always has the four axes in this order, so every sharding rule can name any of
them; an axis of size 1 costs nothing. ``config.mesh`` holds one integer per axis; one of
them may be ``-1``, meaning "all devices the others leave".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

MESH_AXES = ('data', 'fsdp', 'tensor', 'context')


def _get(cfg: Any, key: str, default: Any) -> Any:
  if cfg is None:
    return default
  if isinstance(cfg, Mapping):
    return cfg.get(key, default)
  return getattr(cfg, key, default) if hasattr(cfg, key) else default


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, ...]:
  """Resolves ``config.mesh`` into a 4-tuple ``(data, fsdp, tensor, context)``.

  Args:
    mesh_cfg: mapping/ConfigDict with optional int fields ``data``, ``fsdp``,
      ``tensor``, ``context`` (default: data=-1, the others 1). At most one is -1.
    num_devices: total number of devices the mesh must cover exactly.

  Raises:
    ValueError naming ``config.mesh.<axis>`` when a value is not a positive int (or -1),
    when more than one axis is -1, or when the product does not equal ``num_devices``.
  """
  if mesh_cfg is not None and not isinstance(mesh_cfg, Mapping):
    keys = set(mesh_cfg.keys()) if hasattr(mesh_cfg, 'keys') else set()
  elif mesh_cfg is not None:
    keys = set(mesh_cfg.keys())
  else:
    keys = set()
  unknown = keys - set(MESH_AXES)
  if unknown:
    raise ValueError(
        f'config.mesh has unknown axes {sorted(unknown)}; expected a subset of {MESH_AXES}.')
  sizes = []
  for axis in MESH_AXES:
    value = _get(mesh_cfg, axis, -1 if axis == 'data' else 1)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise ValueError(f'config.mesh.{axis} must be an int (>= 1, or -1 to fill); got {value!r}.')
    if value == 0 or value < -1:
      raise ValueError(f'config.mesh.{axis} must be >= 1 or -1 (fill); got {value}.')
    sizes.append(int(value))
  fills = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  if len(fills) > 1:
    raise ValueError(
        f'config.mesh: at most one axis may be -1 (fill); got -1 for {fills}.')
  fixed = math.prod(s for s in sizes if s != -1)
  if fills:
    if num_devices % fixed:
      raise ValueError(
          f'config.mesh: the fixed axes {dict(zip(MESH_AXES, sizes))} multiply to {fixed}, '
          f'which does not divide the {num_devices} available devices '
          f'(config.mesh.{fills[0]}=-1 cannot be filled).')
    sizes[MESH_AXES.index(fills[0])] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(
        f'config.mesh {dict(zip(MESH_AXES, sizes))} has {fixed} devices but '
        f'{num_devices} are available; the product of config.mesh.data/fsdp/tensor/context '
        f'must equal the device count (use -1 on one axis to fill).')
  return tuple(sizes)


def make_mesh(mesh_cfg: Any = None,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds a ``jax.sharding.Mesh`` with axes ``('data', 'fsdp', 'tensor', 'context')``.

  Axis types are ``Auto`` (GSPMD propagation + explicit constraints), which is what the
  jitted train step and ``constrain`` use.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def axis_size(mesh: jax.sharding.Mesh | None, names: str | Sequence[str] | None) -> int:
  """Product of the sizes of the named mesh axes (1 for None / missing axes)."""
  if mesh is None or names is None:
    return 1
  if isinstance(names, str):
    names = (names,)
  shape = dict(mesh.shape)
  return math.prod(shape.get(n, 1) for n in names)
