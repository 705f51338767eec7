"""Dry run of a pod-sized train step on this machine: compile, don't allocate, report memory.

``dry_run(config, num_devices)`` builds the real train step of ``attnjax.train.trainer``
(``Trainer(config, data=False)``: same model, shardings and ``jax.jit(train_step,
in_shardings, out_shardings, donate_argnums=0)``) on a mesh of ``num_devices`` devices --
on a laptop, fake CPU devices (``jax_num_cpu_devices`` /
``XLA_FLAGS=--xla_force_host_platform_device_count=N``) -- lowers it with abstract
arguments (``jax.ShapeDtypeStruct`` carrying their ``NamedSharding``; the state comes from
``jax.eval_shape``, nothing is allocated), compiles it and reports, per device:

* parameters, optimizer state, other state and the batch: exact, from each leaf's shape and
  sharding (``sharding.shard_shape(shape)``);
* XLA's ``compiled.memory_analysis()`` of the step: arguments, outputs, donated (aliased)
  bytes, temporary buffers (activations saved for the backward pass plus every other
  intermediate; XLA does not split them) and generated code, and the peak estimate
  ``arguments + outputs - aliased + temporaries``;
* saved activations: the residuals the forward pass keeps for the backward pass (respecting
  ``config.model.remat_policy``), from the memory analysis of a second compiled program
  that returns them (``activations=False`` skips it);
* collectives: count and per-device result bytes of every ``all-reduce``, ``all-gather``,
  ``reduce-scatter``, ``collective-permute`` and ``all-to-all`` in the compiled HLO
  (static count: an op inside a loop body -- ``scan_layers`` -- counts once).

The numbers are those of the backend that compiles (CPU for fake devices): XLA:TPU and
XLA:GPU fuse, lay out and schedule differently, so temporaries and collectives are a guide,
while the state sizes are exact for any backend.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all')
_REEXEC_ENV = 'ATTNJAX_DRY_RUN_DEVICES'
_DEVICE_FLAG = '--xla_force_host_platform_device_count'


# ======================================================================================
# Devices
# ======================================================================================

def required_devices(config, num_devices: int | None = None) -> int:
  """Devices the dry run needs: ``num_devices`` if given, else the product of
  ``config.mesh`` when no axis is -1, else the fixed axes' product scaled up to the devices
  of this process (a fill axis of size >= 1).

  Raises ValueError naming ``num_devices`` when it is not a positive int.
  """
  if num_devices is not None:
    if isinstance(num_devices, bool) or not isinstance(num_devices, (int, np.integer)) or \
        num_devices < 1:
      raise ValueError(f'num_devices (--dry_run_devices) must be a positive int; got '
                       f'{num_devices!r}.')
    return int(num_devices)
  from attnjax.parallel.mesh import MESH_AXES  # pylint: disable=import-outside-toplevel
  mesh_cfg = config.get('mesh', None)
  sizes = [(mesh_cfg.get(a, -1 if a == 'data' else 1) if mesh_cfg is not None else
            (-1 if a == 'data' else 1)) for a in MESH_AXES]
  fixed = math.prod(int(s) for s in sizes if s != -1)
  if -1 not in sizes:
    return fixed
  have = jax.device_count()  # initialises the backend
  return fixed * max(1, have // fixed) if fixed > 0 else have


def _forced_cpu_count() -> int | None:
  m = re.search(_DEVICE_FLAG + r'=(\d+)', os.environ.get('XLA_FLAGS', ''))
  return int(m.group(1)) if m else None


def select_devices(num_devices: int) -> list | None:
  """``num_devices`` devices for the dry run, or None when this process cannot have them.

  The default backend's first ``num_devices`` devices if it has that many, else as many
  CPU devices. Before JAX's backends are initialised, the CPU backend is asked for
  ``num_devices`` devices (``jax_num_cpu_devices``), so the first call in a fresh process
  always succeeds; after initialisation the CPU device count is fixed and a process with
  fewer returns None (``train.py --dry_run`` then re-executes itself with ``XLA_FLAGS``).
  CPU devices in a process whose default backend is an accelerator cannot be used by
  ``dry_run`` (attnjax picks kernels by the default backend): ``train.py`` re-executes
  with ``JAX_PLATFORMS=cpu`` then too.
  """
  forced = _forced_cpu_count()
  want = max(num_devices, forced or 0)
  try:
    jax.config.update('jax_num_cpu_devices', want)
  except RuntimeError:  # backends already initialised with another count: take what exists
    pass
  devices = jax.devices()
  if len(devices) >= num_devices:
    return list(devices[:num_devices])
  try:
    cpu = jax.devices('cpu')
  except RuntimeError:
    return None
  return list(cpu[:num_devices]) if len(cpu) >= num_devices else None


def reexec_with_cpu_devices(num_devices: int, argv: Sequence[str] | None = None) -> None:
  """Replaces this process (``os.execve``) by ``python argv...`` with ``JAX_PLATFORMS=cpu``
  and ``XLA_FLAGS=--xla_force_host_platform_device_count=num_devices`` (an existing count
  flag is replaced). Never returns. Raises RuntimeError if this process already is such
  a re-execution (the flag did not give the devices: a guard against a loop)."""
  if os.environ.get(_REEXEC_ENV) == str(num_devices):
    raise RuntimeError(f'dry run: {_DEVICE_FLAG}={num_devices} in XLA_FLAGS did not give '
                       f'{num_devices} CPU devices (got {len(jax.devices("cpu"))}).')
  argv = list(sys.argv if argv is None else argv)
  flags = re.sub(_DEVICE_FLAG + r'=\d+', '', os.environ.get('XLA_FLAGS', '')).split()
  env = dict(os.environ, XLA_FLAGS=' '.join(flags + [f'{_DEVICE_FLAG}={num_devices}']),
             JAX_PLATFORMS='cpu', **{_REEXEC_ENV: str(num_devices)})
  print(f'dry run: this process has {jax.device_count()} {jax.default_backend()} device(s); '
        f're-running with JAX_PLATFORMS=cpu {_DEVICE_FLAG}={num_devices} (fake CPU devices).',
        file=sys.stderr, flush=True)
  sys.stdout.flush()
  os.execve(sys.executable, [sys.executable] + argv, env)


# ======================================================================================
# Sizes
# ======================================================================================

def _itemsize(dtype) -> int:
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):  # typed keys: their uint32 data
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct((), dtype))
    return int(np.prod(data.shape, dtype=np.int64)) * data.dtype.itemsize
  return np.dtype(dtype).itemsize


def leaf_bytes(shape: Sequence[int], dtype, sharding: jax.sharding.Sharding | None = None) -> int:
  """Bytes of one device's shard of an array (the whole array when ``sharding`` is None)."""
  shard = tuple(shape) if sharding is None else sharding.shard_shape(tuple(shape))
  return int(np.prod(shard, dtype=np.int64)) * _itemsize(dtype)


def tree_bytes(tree: Any, shardings: Any = None) -> int:
  """Per-device bytes of a pytree of arrays / ShapeDtypeStructs (their own ``.sharding``
  unless ``shardings``, a matching pytree, is given)."""
  leaves = jax.tree.leaves(tree)
  shs = jax.tree.leaves(shardings) if shardings is not None else \
      [getattr(x, 'sharding', None) for x in leaves]
  if len(shs) != len(leaves):
    raise ValueError(f'shardings: {len(shs)} leaves for a tree of {len(leaves)}.')
  return sum(leaf_bytes(x.shape, x.dtype, s) for x, s in zip(leaves, shs))


def _with_shardings(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
                      shardings)


_DTYPE_RE = re.compile(r'\b(pred|[suf]\d+|bf16|c64|c128|f8\w*)\[([\d,]*)\]')
_HLO_BYTES = {'pred': 1, 'bf16': 2, 'c64': 8, 'c128': 16}


def _hlo_type_bytes(text: str) -> int:
  total = 0
  for dt, dims in _DTYPE_RE.findall(text):
    size = _HLO_BYTES.get(dt)
    if size is None:
      bits = re.search(r'\d+', dt)
      size = max(int(bits.group()) // 8, 1) if bits else 1
    n = math.prod(int(d) for d in dims.split(',') if d) if dims else 1
    total += n * size
  return total


_COLLECTIVE_RE = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s(' +
                            '|'.join(COLLECTIVES) + r')(-start|-done)?\(')


def collective_ops(hlo_text: str) -> list[dict[str, Any]]:
  """One dict per collective of compiled HLO text: ``op``, ``bytes`` (its results on one
  device; for an async ``op-start`` / ``op-done`` pair, one entry with the ``-done``
  result), ``result`` (the HLO type) and ``source`` (the JAX ``op_name`` metadata)."""
  out, pending = [], {}
  for line in hlo_text.splitlines():
    m = _COLLECTIVE_RE.match(line)
    if m is None:
      continue
    result, op, suffix = m.groups()
    src = re.search(r'op_name="([^"]*)"', line)
    entry = {'op': op, 'bytes': _hlo_type_bytes(result), 'result': result,
             'source': src.group(1) if src else ''}
    if suffix == '-start':
      pending[op] = pending.get(op, 0) + 1
      continue
    if suffix == '-done' and pending.get(op):
      pending[op] -= 1
    out.append(entry)
  for op, n in pending.items():  # a start without its done (not expected): count it
    out += [{'op': op, 'bytes': 0, 'result': '', 'source': ''}] * n
  return out


def count_collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """``{op: {'count': n, 'bytes': b}}`` for each of ``COLLECTIVES`` in compiled HLO text.

  Synchronous ops and async pairs (``op-start`` / ``op-done``, counted once) both count;
  ``bytes`` is the size of the results on one device (of ``op-done`` for async pairs).
  """
  out = {op: {'count': 0, 'bytes': 0} for op in COLLECTIVES}
  for entry in collective_ops(hlo_text):
    out[entry['op']]['count'] += 1
    out[entry['op']]['bytes'] += entry['bytes']
  return out


# ======================================================================================
# The batch
# ======================================================================================

def _element_spec(dcfg) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """``{key: (shape, dtype)}`` of one example of the training data, from the TFDS
  builder's features (built-in tasks generate one example; nothing is prepared)."""
  from attnjax import data as data_lib  # pylint: disable=import-outside-toplevel
  from attnjax.train import trainer as trainer_lib  # pylint: disable=import-outside-toplevel
  data_dir = dcfg.get('data_dir', None) or None
  if dcfg.get('tfds_name', None):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    b = tfds.builder(dcfg.tfds_name, data_dir=data_dir, file_format='array_record')
  else:
    name = dcfg.get('name', None)
    kw = trainer_lib.data_kwargs(dcfg) if name != 'digits' else {}
    try:
      b = data_lib.builder(name, data_dir=data_dir, **kw)
    except (ValueError, TypeError) as e:
      raise ValueError(f'config.data ({name}): {e}') from e
  spec = {}
  for key, feature in b.info.features.items():
    if not hasattr(feature, 'np_dtype'):
      raise ValueError(f'config.data: feature {key!r} of the dataset is nested '
                       f'({type(feature).__name__}); the trainer feeds flat features only.')
    spec[key] = (tuple(feature.shape), np.dtype(feature.np_dtype))
  return spec


def abstract_batch(trainer, config) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch ``Trainer.global_batch`` would build, as ShapeDtypeStructs with its
  sharding: keys renamed by ``config.data.keys``, float64 and uint8 -> float32, int64 ->
  int32, leading dimension ``config.batch_size`` sharded as the trainer's batch."""
  out = {}
  for key, (shape, dtype) in _element_spec(config.data).items():
    key = trainer.keymap.get(key, key)
    if dtype in (np.float64, np.uint8):
      dtype = np.dtype(np.float32)
    elif dtype == np.int64:
      dtype = np.dtype(np.int32)
    spec = P(*trainer.batch_sharding.spec, *([None] * len(shape)))
    out[key] = jax.ShapeDtypeStruct((config.batch_size,) + shape, dtype,
                                    sharding=NamedSharding(trainer.mesh, spec))
  if trainer.input_key not in out:
    raise ValueError(f'config.data.input_key={trainer.input_key!r} is not a field of the '
                     f'training data; fields: {sorted(out)}.')
  return out


# ======================================================================================
# The dry run
# ======================================================================================

def _memory(compiled) -> dict[str, int]:
  ma = compiled.memory_analysis()
  if ma is None:
    return {}
  keys = ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
          'temp_size_in_bytes', 'generated_code_size_in_bytes')
  return {k.replace('_size_in_bytes', ''): int(getattr(ma, k, 0) or 0) for k in keys}


def _residual_program(trainer, task):
  """``(params, rest, batch) -> residuals``: what the forward pass keeps for the backward
  pass of the training loss (the inputs themselves excluded)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from attnjax.train import losses  # pylint: disable=import-outside-toplevel
  graphdef, input_key = trainer.graphdef, trainer.input_key

  def residuals(params, rest, batch):
    def loss_fn(p):
      model = nnx.merge(graphdef, p, rest, copy=True)  # as the trainer's forward
      out = model(batch[input_key], deterministic=False)
      return losses.compute(task, out, batch)[0]
    _, pullback = jax.vjp(loss_fn, params)
    inputs = {id(x) for x in jax.tree.leaves((params, rest, batch))}
    return [r for r in jax.tree.leaves(pullback)
            if isinstance(r, jax.Array) and id(r) not in inputs]
  return residuals


def dry_run(config, num_devices: int | None = None, *, activations: bool = True,
            devices: Sequence[jax.Device] | None = None) -> dict:
  """Compiles ``config``'s train step for its mesh on ``num_devices`` devices without
  allocating the state, and measures it (see the module docstring).

  Args:
    config: an experiment config (``configs/*.py``).
    num_devices: mesh size (default ``required_devices(config)``). In a fresh process the
      CPU backend is given that many devices; once JAX's backends are initialised with
      fewer, a ValueError says how to get them.
    activations: also compile the forward pass alone to measure the saved activations.
    devices: use these devices instead (their count is the mesh size).

  Returns:
    a dict: ``mesh`` (axis -> size), ``num_devices``, ``platform``, ``num_params``,
    ``bytes_per_device`` (``params``, ``optimizer``, ``other_state``, ``batch``,
    ``saved_activations`` (None when not measured), and XLA's ``arguments``, ``outputs``,
    ``aliased``, ``temporaries``, ``generated_code``, ``peak``), ``collectives`` (op ->
    ``{count, bytes}``), ``largest_collectives`` (the 5 largest: ``op``, ``bytes``,
    ``result``, ``source``), ``batch_shapes``, ``global_param_bytes``, ``compile_seconds``.
  Raises:
    ValueError for a config mistake (naming the key) or too few devices.
  """
  from attnjax.train import trainer as trainer_lib  # pylint: disable=import-outside-toplevel
  if devices is None:
    n = required_devices(config, num_devices)
    devices = select_devices(n)
    if devices is None:
      raise ValueError(
          f'num_devices={n}: this process has {jax.device_count()} device(s) and its JAX '
          f'backends are already initialised; start Python with XLA_FLAGS={_DEVICE_FLAG}={n} '
          f"(or call jax.config.update('jax_num_cpu_devices', {n}) before any JAX "
          'operation), or run `python train.py --config ... --dry_run`, which does it.')
  devices = list(devices)
  if devices[0].platform != jax.default_backend():
    raise ValueError(
        f'devices: {len(devices)} {devices[0].platform} devices, but JAX\'s default backend is '
        f'{jax.default_backend()!r}, for which attnjax would pick its attention kernels; run '
        'the dry run in a process with JAX_PLATFORMS=cpu (train.py --dry_run re-runs itself '
        'so).')
  t0 = time.perf_counter()
  trainer = trainer_lib.Trainer(config, devices=devices, data=False)
  state = trainer.abstract_state
  rest = _with_shardings(trainer.abstract_rest, trainer.rest_shardings)
  batch = abstract_batch(trainer, config)
  with trainer._ctx():  # pylint: disable=protected-access  (mesh + activation rules)
    compiled = trainer._train_step.lower(state, rest, batch).compile()  # pylint: disable=protected-access
  mem = _memory(compiled)
  residual_bytes = None
  if activations:
    res_fn = jax.jit(_residual_program(trainer, config.task),
                     in_shardings=(trainer.state_shardings['params'], trainer.rest_shardings,
                                   trainer.batch_sharding))
    with trainer._ctx():  # pylint: disable=protected-access
      res_compiled = res_fn.lower(state['params'], rest, batch).compile()
    residual_bytes = _memory(res_compiled).get('output')
  seconds = time.perf_counter() - t0
  other = {k: v for k, v in state.items() if k not in ('params', 'opt_state')}
  hlo = compiled.as_text()
  per_device = {
      'params': tree_bytes(state['params']),
      'optimizer': tree_bytes(state['opt_state']),
      'other_state': tree_bytes(other) + tree_bytes(rest),
      'batch': tree_bytes(batch),
      'saved_activations': residual_bytes,
      'arguments': mem.get('argument'),
      'outputs': mem.get('output'),
      'aliased': mem.get('alias'),
      'temporaries': mem.get('temp'),
      'generated_code': mem.get('generated_code'),
  }
  per_device['peak'] = (None if not mem else
                        mem['argument'] + mem['output'] - mem['alias'] + mem['temp'])
  return {
      'mesh': dict(trainer.mesh.shape),
      'num_devices': len(devices),
      'platform': devices[0].platform,
      'num_params': trainer.num_params,
      'global_param_bytes': sum(leaf_bytes(x.shape, x.dtype)
                                for x in jax.tree.leaves(state['params'])),
      'batch_shapes': {k: (tuple(v.shape), str(v.dtype)) for k, v in batch.items()},
      'bytes_per_device': per_device,
      'collectives': count_collectives(hlo),
      'largest_collectives': sorted(collective_ops(hlo), key=lambda e: -e['bytes'])[:5],
      'compile_seconds': seconds,
  }


# ======================================================================================
# Report
# ======================================================================================

def human_bytes(n: int | None) -> str:
  if n is None:
    return '-'
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if abs(n) < 1024 or unit == 'TiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.2f} {unit}'
    n /= 1024
  return str(n)


def format_report(result: dict) -> str:
  """The dry run's table (``train.py --dry_run`` prints it)."""
  b = result['bytes_per_device']
  mesh = ' x '.join(f'{a} {s}' for a, s in result['mesh'].items() if s > 1) or 'single device'
  lines = [
      f'dry run: {result["num_devices"]} {result["platform"]} devices, mesh {mesh} '
      f'({result["mesh"]})',
      f'params {result["num_params"]:,} ({human_bytes(result["global_param_bytes"])} in all); '
      'batch ' + ', '.join(f'{k} {list(s)} {d}' for k, (s, d) in result['batch_shapes'].items()),
      f'compiled in {result["compile_seconds"]:.1f} s, nothing allocated',
      '',
      f'{"per device":<44}{"bytes":>16}  {"":>12}',
  ]
  rows = [
      ('parameters (exact, from the shardings)', b['params']),
      ('optimizer state (exact)', b['optimizer']),
      ('other state: step, rng, model rest (exact)', b['other_state']),
      ('batch (exact)', b['batch']),
      ('saved activations (forward residuals)', b['saved_activations']),
      ('XLA arguments', b['arguments']),
      ('XLA outputs', b['outputs']),
      ('XLA aliased (donated state)', b['aliased']),
      ('XLA temporaries (activations + scratch)', b['temporaries']),
      ('XLA generated code', b['generated_code']),
      ('peak = arguments + outputs - aliased + temp', b['peak']),
  ]
  for name, v in rows:
    lines.append(f'{name:<44}{"-" if v is None else f"{v:,}":>16}  {human_bytes(v):>12}')
  lines += ['', 'collectives in the compiled step (static count, per-device result bytes):']
  for op, c in result['collectives'].items():
    lines.append(f'  {op:<20}{c["count"]:>6}  {human_bytes(c["bytes"]):>12}')
  big = [e for e in result.get('largest_collectives', []) if e['bytes']]
  if big:
    lines.append('largest (per-device result bytes, JAX source op):')
    for e in big:
      result = e['result'].split('{')[0] if not e['result'].startswith('(') else \
          f'tuple of {len(_DTYPE_RE.findall(e["result"]))} arrays'
      source = e['source'].split(':')[0]
      source = source if len(source) <= 60 else '...' + source[-57:]
      lines.append(f'  {e["op"]:<20}{human_bytes(e["bytes"]):>12}  {result:<24} {source}')
  return '\n'.join(lines)
