"""The training loop: one jitted, sharded train step for every model, task and mesh.

Reads top to bottom: config checks -> mesh -> input -> model -> shardings + init ->
update step -> checkpoint -> evaluation -> loop. ``train.py`` is a thin wrapper around
``train_and_evaluate``; tests drive ``Trainer`` directly.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import queue
import shutil
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from attnjax import data as data_lib
from attnjax import parallel
from attnjax.train import cli, losses
from attnjax.train import metrics as metrics_lib
from attnjax.train import optimizer as optim_lib
from attnjax.train.checkpoint import Checkpointer

log = logging.getLogger('attnjax.train')
DEFAULT_MODEL_FACTORY = 'attnjax.models:build_model'


class NonFiniteError(RuntimeError):
  """Raised when the loss or the gradients stop being finite."""


# ======================================================================================
# Config checks (before any compilation)
# ======================================================================================

def _resolve(path: str):
  if ':' not in path:
    raise ValueError(f"config.model_factory must look like 'package.module:function'; "
                     f'got {path!r}.')
  mod, fn = path.split(':', 1)
  try:
    return getattr(importlib.import_module(mod), fn)
  except (ImportError, AttributeError) as e:
    raise ValueError(f'config.model_factory={path!r} cannot be imported: {e}') from e


def data_kwargs(dcfg) -> dict:
  """Keyword arguments of ``attnjax.data.load`` for a built-in task config."""
  kw = dict(seed=int(dcfg.get('seed', 0)), **dict(dcfg.get('params', None) or {}))
  if dcfg.get('num_train', None) is not None:
    kw['num_train'] = int(dcfg.num_train)
  if dcfg.get('num_test', None) is not None:
    kw['num_test'] = int(dcfg.num_test)
  return kw


def load_split(dcfg, split: str):
  """Data source of ``split``; errors name ``config.data.name`` / ``config.data.tfds_name``."""
  tfds_name = dcfg.get('tfds_name', None)
  data_dir = dcfg.get('data_dir', None) or None
  if tfds_name:
    try:
      return data_lib.load(tfds_name, split, data_dir=data_dir)
    except ValueError as e:
      raise ValueError(f'config.data.tfds_name={tfds_name!r}: {e}') from e
  name = dcfg.get('name', None)
  if name not in data_lib.BUILTIN_NAMES:
    raise ValueError(f'config.data.name={name!r} is not a built-in task {data_lib.BUILTIN_NAMES}; '
                     'set config.data.tfds_name for an external TFDS dataset.')
  kw = data_kwargs(dcfg) if name != 'digits' else {}
  try:
    return data_lib.load(name, split, data_dir=data_dir, **kw)
  except (ValueError, TypeError) as e:
    raise ValueError(f'config.data ({name}): {e}') from e


def context_impl(config) -> str:
  """``config.parallel.context_impl`` ('ring' when absent), checked."""
  par = config.get('parallel', None)
  impl = par.get('context_impl', 'ring') if par is not None else 'ring'
  return parallel.check_context_impl(impl)


def check_config(config, num_devices: int | None = None) -> tuple[int, ...]:
  """Validates everything that can be checked without compiling; returns the mesh shape.

  Raises ValueError naming the offending config key.
  """
  if config.get('task', None) not in losses.TASKS:
    raise ValueError(f'config.task must be one of {losses.TASKS}; got {config.get("task")!r}.')
  for key in ('num_steps', 'batch_size'):
    v = config.get(key, None)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ValueError(f'config.{key} must be a positive int; got {v!r}.')
  for key in ('log_every', 'eval_every', 'checkpoint_every'):
    v = config.get(key, 0)
    if not isinstance(v, int) or v < 0:
      raise ValueError(f'config.{key} must be an int >= 0 (0 = off); got {v!r}.')
  v = config.get('eval_max_examples', None)
  if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
    raise ValueError(f'config.eval_max_examples must be None or an int >= 0 (None or 0 = the '
                     f'whole eval split); got {v!r}.')
  factory = config.get('model_factory', DEFAULT_MODEL_FACTORY)
  if factory == DEFAULT_MODEL_FACTORY:
    from attnjax import variants  # pylint: disable=import-outside-toplevel
    att = config.model.get('attention', None)
    names = [att.get('name', None)] if att is not None else []
    layers = config.model.get('layers_attention', None) or []
    names += [a.get('name', None) for a in layers]
    for i, n in enumerate(names):
      if n not in variants.names():
        key = ('config.model.attention.name' if i == 0
               else f'config.model.layers_attention[{i-1}].name')
        raise ValueError(f'{key}={n!r} is not a registered attention variant; known: '
                         f'{variants.names()}.')
  _resolve(factory)
  context_impl(config)
  num_devices = jax.device_count() if num_devices is None else num_devices
  shape = parallel.mesh_shape(config.get('mesh', None), num_devices)
  data_par = shape[0] * shape[1]
  if config.batch_size % data_par:
    raise ValueError(f'config.batch_size={config.batch_size} must be divisible by the '
                     f'data-parallel size config.mesh.data * config.mesh.fsdp = {shape[0]} * '
                     f'{shape[1]} = {data_par}.')
  if config.batch_size % jax.process_count():
    raise ValueError(f'config.batch_size={config.batch_size} must be divisible by the number of '
                     f'processes ({jax.process_count()}).')
  eb = config.get('eval_batch_size', config.batch_size)
  if eb % data_par or eb % jax.process_count():
    raise ValueError(f'config.eval_batch_size={eb} must be divisible by config.mesh.data * '
                     f'config.mesh.fsdp = {data_par} and by the process count.')
  dcfg = config.data
  if not dcfg.get('tfds_name', None) and dcfg.get('name', None) not in data_lib.BUILTIN_NAMES:
    raise ValueError(f'config.data.name={dcfg.get("name")!r} is not a built-in task '
                     f'{data_lib.BUILTIN_NAMES}; set config.data.tfds_name for an external '
                     'TFDS dataset.')
  if dcfg.get('tfds_name', None):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    try:
      b = tfds.builder(dcfg.tfds_name, data_dir=dcfg.get('data_dir', None) or None,
                       file_format='array_record')
      prepared = b.is_prepared()
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'config.data.tfds_name={dcfg.tfds_name!r} is not a known TFDS dataset '
                       f'({type(e).__name__}).') from e
    if not prepared:
      raise ValueError(f'config.data.tfds_name={dcfg.tfds_name!r} is not prepared under '
                       f'{b.data_dir}; run `tfds build {dcfg.tfds_name} '
                       '--file_format=array_record` first.')
  return shape


# ======================================================================================
# Trainer
# ======================================================================================

def _key_data(seed: int) -> jax.Array:
  return jax.random.key_data(jax.random.key(seed))


def _sum_aux_losses(intermediates) -> jax.Array:
  """Sum of every value sown as ``nnx.Intermediate`` under the name 'aux_loss' (0 if none)."""
  total = jnp.zeros((), jnp.float32)
  for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
    if any(getattr(k, "key", getattr(k, "name", None)) == "aux_loss" for k in path):
      total = total + jnp.sum(jnp.asarray(leaf, jnp.float32))
  return total


def _reseed(rest, rng):
  """Fresh RNG streams for one step: every RngKey <- fold_in(rng, i), counts <- 0.

  Dropout masks then depend only on (seed, step), which makes a resumed run bitwise equal
  to an uninterrupted one without checkpointing the streams."""
  is_var = lambda x: isinstance(x, nnx.Variable)
  leaves, treedef = jax.tree.flatten(rest, is_leaf=is_var)
  out = []
  for i, var in enumerate(leaves):
    if isinstance(var, nnx.RngKey):
      key, shape = jax.random.fold_in(rng, i), jnp.shape(var.get_value())
      if shape:  # a stacked key (scan_layers: one per layer) stays stacked
        key = jax.random.split(key, int(np.prod(shape))).reshape(shape)
      out.append(var.replace(key))
    elif isinstance(var, nnx.RngCount):
      out.append(var.replace(jnp.zeros_like(var.get_value())))
    else:
      out.append(var)
  return jax.tree.unflatten(treedef, out)


class _Prefetch:
  """Background thread reading batches ahead, each paired with the iterator state *after*
  it, so a checkpoint stores exactly the position of the last consumed batch."""

  def __init__(self, iterator, depth: int = 2):
    self.it = iterator
    self.q: queue.Queue = queue.Queue(maxsize=depth)
    self.stop = threading.Event()
    self.thread = threading.Thread(target=self._run, name='attnjax-prefetch', daemon=True)
    self.thread.start()

  def _run(self):
    try:
      while not self.stop.is_set():
        batch = next(self.it)
        self._put((batch, self.it.get_state()))
    except Exception as e:  # pylint: disable=broad-except
      self._put(e)

  def _put(self, item):
    while not self.stop.is_set():
      try:
        self.q.put(item, timeout=0.1)
        return
      except queue.Full:
        continue

  def next(self):
    item = self.q.get()
    if isinstance(item, Exception):
      raise item
    return item

  def close(self, timeout: float = 10.0):
    """Stops the thread and joins it (it may be inside one ``next``: a batch at most)."""
    self.stop.set()
    while True:  # unblock a put() waiting on a full queue
      try:
        self.q.get_nowait()
      except queue.Empty:
        break
    self.thread.join(timeout)


class Trainer:
  """Holds the mesh, data, model graph, shardings and jitted functions of one run."""

  def __init__(self, config, workdir: str | None = None, *, devices=None, data: bool = True):
    """``data=False`` builds the mesh, model graph, shardings and jitted functions without
    loading any data (``attnjax.train.dry_run``); ``evaluate``/the loop then need data."""
    self.config = config
    self.workdir = workdir
    devices = list(jax.devices() if devices is None else devices)
    check_config(config, len(devices))

    # --- mesh ---------------------------------------------------------------------------
    self.mesh = parallel.make_mesh(config.get('mesh', None), devices=devices)
    sh = config.get('sharding', None)
    self.param_rules = (sh.get('param_rules', None) if sh is not None else None) or \
        parallel.DEFAULT_PARAM_RULES
    self.act_rules = (sh.get('activation_rules', None) if sh is not None else None) or \
        parallel.DEFAULT_ACTIVATION_RULES
    self.batch_sharding = NamedSharding(
        self.mesh, parallel.logical_to_spec(('batch',), (config.batch_size,),
                                            self.act_rules, self.mesh))

    # --- input ------------------------------------------------------------------------
    dcfg = config.data
    self.train_source = self.eval_source = self.train_ds = None
    if data and jax.process_count() > 1:  # one process generates, the others wait and read
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      if jax.process_index() == 0:
        load_split(dcfg, dcfg.get('train_split', 'train'))
      multihost_utils.sync_global_devices('attnjax_data_prepared')
    self.input_key = dcfg.get('input_key', 'inputs')
    self.keymap = dict(dcfg.get('keys', None) or {})
    if data:
      self.train_source = load_split(dcfg, dcfg.get('train_split', 'train'))
      self.eval_source = load_split(dcfg, dcfg.get('eval_split', 'test'))
      self.train_ds = data_lib.make_train_dataset(
          self.train_source, global_batch_size=config.batch_size,
          seed=int(config.get('seed', 0)) + 17)

    # --- model ------------------------------------------------------------------------
    self.factory = _resolve(config.get('model_factory', DEFAULT_MODEL_FACTORY))
    self.schedule = optim_lib.make_schedule(config.schedule, config.num_steps)
    self.tx = optim_lib.make_optimizer(config.optimizer, self.schedule)
    seed = int(config.get('seed', 0))

    def make_model():
      with nnx.use_eager_sharding(False):
        kp, kd = jax.random.split(jax.random.key(seed))
        return self.factory(config.model, rngs=nnx.Rngs(params=kp, dropout=kd))

    def init_fn():
      model = make_model()
      _, params, rest = nnx.split(model, nnx.Param, ...)
      state = {'params': params, 'opt_state': self.tx.init(params),
               'step': jnp.zeros((), jnp.int32), 'rng': _key_data(seed + 1),
               'nonfinite_step': jnp.full((), -1, jnp.int32)}
      return state, rest

    # --- shardings + init (eval_shape -> shardings -> jit(init, out_shardings)) --------
    # (outside jax.set_mesh: nnx.eval_shape would turn the logical names into mesh axes)
    abstract_model = nnx.eval_shape(make_model)
    self.graphdef = nnx.split(abstract_model, nnx.Param, ...)[0]
    abs_state, abs_rest = jax.eval_shape(init_fn)
    self.state_shardings = parallel.state_shardings(abs_state, self.mesh, self.param_rules)
    self.rest_shardings = jax.tree.map(lambda _: NamedSharding(self.mesh, P()), abs_rest)
    self.abstract_rest = abs_rest
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state,
        self.state_shardings)
    self._init = jax.jit(init_fn, out_shardings=(self.state_shardings, self.rest_shardings))
    self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abs_state['params']))

    # --- update step --------------------------------------------------------------------
    task = config.task
    inject = int(config.get('debug', {}).get('inject_nan_at_step', -1)) \
        if config.get('debug', None) is not None else -1
    graphdef, tx, input_key, schedule = self.graphdef, self.tx, self.input_key, self.schedule

    def forward(params, rest, batch, *, deterministic):
      model = nnx.merge(graphdef, params, rest)
      return model(batch[input_key], deterministic=deterministic)

    def forward_with_aux(params, rest, batch, *, deterministic):
      # Layers sow auxiliary losses (e.g. MoH's load balance) as nnx.Intermediate
      # 'aux_loss'; their sum joins the training loss. copy=True: variables of this trace
      # level, so a layer may update its state here (remat / scanned blocks with dropout
      # write back their RNG counts; merging `rest`'s own variables, created outside the
      # grad trace, made that a TraceContextError).
      model = nnx.merge(graphdef, params, rest, copy=True)
      out, inter = nnx.capture(model, nnx.Intermediate)(batch[input_key],
                                                        deterministic=deterministic)
      return out, _sum_aux_losses(inter)

    def train_step(state, rest, batch):
      step = state['step']
      rng = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), step)

      step_rest = _reseed(rest, rng)

      def loss_fn(params):
        out, aux_loss = forward_with_aux(params, step_rest, batch, deterministic=False)
        loss, sums = losses.compute(task, out, batch)
        loss = loss + aux_loss
        if inject >= 0:
          loss = loss * jnp.where(step == inject, jnp.nan, 1.0)
        return loss, sums

      (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
      grad_norm = optax.global_norm(grads)
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
      params = optax.apply_updates(state['params'], updates)
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
      new_state = {
          'params': keep(params, state['params']),
          'opt_state': keep(opt_state, state['opt_state']),
          'step': step + 1, 'rng': state['rng'],
          'nonfinite_step': jnp.where((state['nonfinite_step'] < 0) & ~finite, step,
                                      state['nonfinite_step']),
      }
      metrics = {'loss': loss, 'grad_norm': grad_norm, 'learning_rate': schedule(step),
                 **{f'sum_{k}': jnp.stack(v) for k, v in sums.items()}}
      return new_state, metrics

    def eval_step(state, rest, batch):
      out = forward(state['params'], rest, batch, deterministic=True)
      _, sums = losses.compute(task, out, batch)
      return {k: jnp.stack(v) for k, v in sums.items()}

    repl = NamedSharding(self.mesh, P())
    self._train_step = jax.jit(
        train_step, in_shardings=(self.state_shardings, self.rest_shardings, self.batch_sharding),
        out_shardings=(self.state_shardings, repl), donate_argnums=(0,))
    self._eval_step = jax.jit(
        eval_step, in_shardings=(self.state_shardings, self.rest_shardings, self.batch_sharding),
        out_shardings=repl)
    self.rest = None

  # --- pieces used by tests and the loop -------------------------------------------------

  def _ctx(self):
    import contextlib  # pylint: disable=import-outside-toplevel
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(parallel.activation_sharding(self.mesh, self.act_rules))
    stack.enter_context(parallel.context_impl(context_impl(self.config)))
    return stack

  def init(self):
    """Fresh sharded train state (and the non-trainable model state ``rest``)."""
    with self._ctx():
      state, self.rest = self._init()
    return state

  def global_batch(self, local_batch: dict) -> dict:
    """Host-local numpy batch -> global jax arrays sharded over the batch axes."""
    out = {}
    for k, v in local_batch.items():
      k = self.keymap.get(k, k)
      v = np.asarray(v)
      if v.dtype == np.float64:
        v = v.astype(np.float32)
      elif v.dtype == np.uint8:  # images of external TFDS datasets -> [0, 1] float32
        v = v.astype(np.float32) / 255.0
      elif v.dtype == np.int64:
        v = v.astype(np.int32)
      gshape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
      spec = P(*self.batch_sharding.spec, *([None] * (v.ndim - 1)))
      out[k] = jax.make_array_from_process_local_data(NamedSharding(self.mesh, spec), v, gshape)
    return out

  def step(self, state, batch: dict):
    """One update: returns (new_state, device metrics). ``state`` is donated."""
    if self.rest is None:
      raise RuntimeError('call Trainer.init() (or restore) before step().')
    with self._ctx():
      return self._train_step(state, self.rest, batch)

  def eval_size(self, max_examples: int | None = None) -> int:
    """How many eval-split examples ``evaluate(state, max_examples)`` reads: the first
    ``max_examples`` (None or 0: all of them)."""
    n = len(self.eval_source)
    return n if not max_examples else min(n, int(max_examples))

  def evaluate(self, state, max_examples: int | None = None) -> dict[str, float]:
    """Metrics over the first ``eval_size(max_examples)`` examples of the eval split
    (padding excluded)."""
    acc = None
    eb = self.config.get('eval_batch_size', self.config.batch_size)
    with self._ctx():
      for batch in data_lib.make_eval_batches(self.eval_source, global_batch_size=eb,
                                              max_examples=self.eval_size(max_examples)):
        sums = jax.device_get(self._eval_step(state, self.rest, self.global_batch(batch)))
        acc = losses.accumulate(acc, {k: (v[0], v[1]) for k, v in sums.items()})
    return losses.finalize(acc)

  def restore_or_init(self, ckpt: Checkpointer | None):
    """(state, data_state or None, restored_step or None)."""
    state = self.init()
    if ckpt is None:
      return state, None, None
    restored = ckpt.restore_latest(self.abstract_state)
    if restored is None:
      return state, None, None
    step, state, data_state = restored
    return state, data_state, step


# ======================================================================================
# Loop
# ======================================================================================

def _tokens_per_example(source, input_key, keymap) -> int:
  ex = source[0]
  inv = {v: k for k, v in keymap.items()}
  x = np.asarray(ex.get(inv.get(input_key, input_key), ex.get(input_key)))
  if x.ndim >= 1 and np.issubdtype(x.dtype, np.integer):
    return int(x.shape[0])
  return 1


def eval_line(step: int, split: str, num_examples: int, split_size: int,
              metrics: dict[str, float]) -> str:
  """``eval @ 600 (test split, 1000 of 1000 examples): accuracy=0.9940, loss=0.0236``; the
  same words in train.py's eval lines and eval.py's, so the two compare at a glance."""
  return (f'eval @ {step} ({split} split, {num_examples} of {split_size} examples): ' +
          ', '.join(f'{k}={v:.4f}' for k, v in metrics.items()))


def train_and_evaluate(config, workdir: str, *, interrupts: cli.Interrupts | None = None) -> dict:
  """Trains ``config`` in ``workdir`` (resuming from its newest checkpoint); returns the final
  eval metrics plus ``'status'`` and ``'step'``.

  status: 'done'; 'preempted' (SIGTERM: checkpoint saved after the current step);
  'interrupted' (SIGINT: the same; or a signal before the first step, nothing saved).
  ``interrupts``: the scripts pass theirs (installed before jax is imported); without it
  SIGINT/SIGTERM are taken over for the call and only set the stop flag.

  The workdir is created after every config check passed (a failed start leaves none) and
  removed again if this call created it and fails or is interrupted before the first
  training step finished.
  """
  workdir = os.path.abspath(workdir)
  own = interrupts is None
  if own:
    interrupts = cli.Interrupts(hard_exit=False).install()
  try:
    return _train_and_evaluate(config, workdir, interrupts)
  finally:
    if own:
      interrupts.uninstall()


def _train_and_evaluate(config, workdir: str, interrupts: cli.Interrupts) -> dict:
  is_main = jax.process_index() == 0
  trainer = Trainer(config, workdir)  # every config check, the data and the model graph
  created = is_main and not os.path.exists(workdir)
  if is_main:
    os.makedirs(workdir, exist_ok=True)

  def remove_created():
    if created:
      shutil.rmtree(workdir, ignore_errors=True)
  interrupts.add_cleanup(remove_created)
  interrupts.startup_note = 'nothing was saved' + (f'; removed the new workdir {workdir}'
                                                   if created else '')
  try:
    return _loop(config, workdir, trainer, interrupts, is_main)
  finally:
    interrupts.clear_cleanups()
    if interrupts.phase == interrupts.STARTUP:  # failed or stopped before the first step
      remove_created()


def _loop(config, workdir, trainer, interrupts, is_main) -> dict:
  progress = None

  def say(msg):
    if not is_main:
      return
    if progress is not None:
      progress.write(msg)
    else:
      print(msg, flush=True)

  cc = config.get('checkpoint', None)
  keep = int(cc.get('keep', 3)) if cc is not None else 3
  async_save = bool(cc.get('async_save', True)) if cc is not None else True
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), keep=keep, async_save=async_save)
  writer = prefetch = None
  status, ev = 'done', {}
  try:
    say(f'attnjax train: task={config.task} '
        f'data={config.data.get("tfds_name") or config.data.name} '
        f'params={trainer.num_params:,} devices={jax.device_count()} '
        f'mesh={dict(trainer.mesh.shape)} steps={config.num_steps} batch={config.batch_size}')
    state, data_state, restored_step = trainer.restore_or_init(ckpt)  # compiles init
    it = iter(trainer.train_ds)
    start = 0
    if restored_step is not None:
      start = int(jax.device_get(state['step']))
      it.set_state(data_state['iterator'])
    # rows after the checkpoint came from a run that stopped before saving again: dropped,
    # and a row for an existing (step, split) replaces it (no duplicates on resume)
    writer = metrics_lib.MetricWriter(workdir, tensorboard=bool(config.get('tensorboard', True)),
                                      start_step=start)
    if is_main:
      with open(os.path.join(workdir, 'config.json'), 'w') as f:
        f.write(config.to_json_best_effort(indent=2))
    if restored_step is not None:
      say(f'Resumed from checkpoint at step {start} ({ckpt.directory}).')

    total = config.num_steps
    dbg = config.get('debug', None)
    sleep_per_step = float(dbg.get('sleep_per_step', 0.0)) if dbg is not None else 0.0
    log_every = config.get('log_every', 50) or total
    eval_every = config.get('eval_every', 0)
    ckpt_every = config.get('checkpoint_every', 0)
    eval_max = config.get('eval_max_examples', None)
    split = config.data.get('eval_split', 'test')
    tokens_per_step = config.batch_size * _tokens_per_example(
        trainer.train_source, trainer.input_key, trainer.keymap)
    progress = metrics_lib.Progress(total, start, tokens_per_step=tokens_per_step,
                                    enabled=bool(config.get('progress_bar', True)) and is_main)
    prefetch = _Prefetch(it)
    last_data_state = it.get_state() if restored_step is None else data_state['iterator']
    pending: list = []
    t0 = time.time()
    step = start

    def check_finite():
      bad = int(jax.device_get(state['nonfinite_step']))
      if bad >= 0:
        last = ckpt.latest_step()
        raise NonFiniteError(
            f'non-finite loss or gradients at step {bad} (config.task={config.task}); stopping. '
            f'The update was not applied and no checkpoint was written after it; the last good '
            f'checkpoint is step {last} in {ckpt.directory}. Lower '
            'config.schedule.learning_rate or enable config.optimizer.grad_clip.')

    def save(s, *, wait=False):
      check_finite()
      ckpt.save(s, state, {'iterator': last_data_state, 'step': s}, wait=wait)

    def stop_status():
      return 'preempted' if interrupts.signum == signal.SIGTERM else 'interrupted'

    def evaluate(s):
      metrics = trainer.evaluate(state, eval_max)
      writer.write(s, 'eval', metrics)
      return metrics, eval_line(s, split, trainer.eval_size(eval_max), len(trainer.eval_source),
                                metrics)

    if interrupts.requested:  # library mode: a signal during start-up; nothing new to save
      status = 'interrupted'
      say(f'Received {interrupts.name(interrupts.signum)} during start-up: exiting; nothing '
          'was saved.')
    while status == 'done' and step < total:
      batch_np, st = prefetch.next()
      state, m = trainer.step(state, trainer.global_batch(batch_np))  # compiles at the first
      interrupts.set_phase(interrupts.RUNNING)  # from here a signal saves a checkpoint
      last_data_state = st
      step += 1
      if sleep_per_step:
        time.sleep(sleep_per_step)
      pending.append(m)
      progress.advance(step)
      if step % log_every == 0 or step == total:
        check_finite()
        host = jax.device_get(pending)
        pending = []
        acc = None
        for h in host:
          acc = losses.accumulate(acc, {k[4:]: (v[0], v[1]) for k, v in h.items()
                                        if k.startswith('sum_')})
        row = losses.finalize(acc)
        row['grad_norm'] = float(np.mean([h['grad_norm'] for h in host]))
        row['learning_rate'] = float(host[-1]['learning_rate'])
        row.update(progress.update(step, row))
        writer.write(step, 'train', row)
        elapsed = time.time() - t0
        eta = elapsed / max(step - start, 1) * (total - step)
        if progress.bar is None:
          say(f'step {step:>6d}/{total} | ' + ' | '.join(
              f'{k} {row[k]:.4f}' for k in ('loss', 'accuracy', 'mse') if k in row) +
              f' | {row["tokens_per_s"]:,.0f} tok/s | ETA {eta:5.0f}s')
      if eval_every and step % eval_every == 0 and step != total:
        say(evaluate(step)[1])
      if ckpt_every and step % ckpt_every == 0 and step != total:
        save(step)
      if interrupts.requested:
        save(step, wait=True)
        status = stop_status()
        progress.close()
        say(f'Received signal {interrupts.name(interrupts.signum)}: saved checkpoint at step '
            f'{step} in {ckpt.directory}; exiting. Run the same command to resume.')
    if status == 'done':
      progress.close()  # the bar ends on its own line; nothing redraws it afterwards
      check_finite()
      if ckpt.latest_step() != step:
        save(step, wait=True)
      if interrupts.phase == interrupts.RUNNING:  # a signal now: exit, the work is saved
        interrupts.set_phase(interrupts.FINISHING)
      ev, line = evaluate(step)
      say('final ' + line)
      say(f'train time {time.time() - t0:.1f}s')
  finally:
    if prefetch is not None:
      prefetch.close()
    if progress is not None:
      progress.close()
    ckpt.close()  # waits for an async save, then stops orbax's threads
    if writer is not None:
      writer.close()
  if is_main and status == 'done':
    png = metrics_lib.plot(workdir)
    if png:
      say(f'wrote {png}')
    with open(os.path.join(workdir, 'final_metrics.json'), 'w') as f:
      json.dump({'step': step, 'split': split, 'num_examples': trainer.eval_size(eval_max),
                 **ev}, f, indent=2)
  return {'status': status, 'step': step, **ev}
