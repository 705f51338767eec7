"""TFDS builders for the built-in tasks (array_record files, no TensorFlow needed).

``tfds.core.GeneratorBasedBuilder`` with ``file_format='array_record'`` prepares and reads
datasets without importing TensorFlow in tensorflow-datasets 4.9.10 (checked by
``tests/test_data.py``). Each task is one builder class; its parameters (vocabulary,
length, number of pairs, ...), the seed and the split sizes form a ``BuilderConfig`` whose
name encodes them, so different settings never overwrite each other on disk. Generation
is deterministic: the same config gives byte-identical records.

``load(name, split, ...)`` prepares on first use (under ``data_dir``, default
``$ATTNJAX_DATA_DIR`` or ``~/.cache/attnjax/tfds``) and returns a random-access data
source (``len(src)``, ``src[i] -> dict of numpy arrays``) that grain reads directly.
Names that are not built-in are looked up as regular TFDS datasets, which must already be
prepared in array_record format (``tfds build --file_format=array_record NAME``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from attnjax.data import tasks


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  generate: Callable[..., dict[str, np.ndarray]]
  num_train: int
  num_test: int
  description: str


TASKS: dict[str, TaskSpec] = {
    'mqar': TaskSpec(tasks.generate_mqar, 20_000, 1_000, 'multi-query associative recall'),
    'selective_copy': TaskSpec(tasks.generate_selective_copy, 20_000, 1_000, 'selective copying'),
    'argmax_probe': TaskSpec(tasks.generate_argmax_probe, 20_000, 1_000, 'argmax position probe'),
    'set_max': TaskSpec(tasks.generate_set_max, 20_000, 1_000, 'set max regression'),
    'set_count': TaskSpec(tasks.generate_set_count, 20_000, 1_000, 'set unique counting'),
    'set_mog': TaskSpec(tasks.generate_set_mog, 20_000, 1_000, 'mixture-of-Gaussians means'),
    'icl_regression': TaskSpec(tasks.generate_icl_regression, 20_000, 1_000,
                               'in-context linear regression'),
}
BUILTIN_NAMES = tuple(TASKS) + ('digits',)
_TEST_SEED_OFFSET = 1_000_003  # test split seed = seed + offset (disjoint streams)


def default_data_dir() -> str:
  return os.environ.get('ATTNJAX_DATA_DIR',
                        os.path.join(os.path.expanduser('~'), '.cache', 'attnjax', 'tfds'))


def _features_from_example(example: dict[str, np.ndarray]) -> tfds.features.FeaturesDict:
  feats = {}
  for key, value in example.items():
    value = np.asarray(value)
    if value.ndim == 0:
      feats[key] = tfds.features.Scalar(dtype=value.dtype)
    else:
      feats[key] = tfds.features.Tensor(shape=value.shape, dtype=value.dtype)
  return tfds.features.FeaturesDict(feats)


class TaskConfig(tfds.core.BuilderConfig):
  """Task parameters + seed + split sizes; the config name encodes all of them."""

  def __init__(self, *, task: str, params: dict[str, Any], seed: int, num_train: int,
               num_test: int):
    parts = [f'{k}{v}' for k, v in sorted(params.items())]
    parts += [f'seed{seed}', f'n{num_train}-{num_test}']
    name = re.sub(r'[^A-Za-z0-9_.-]', '_', '_'.join(parts))
    super().__init__(name=name, version=tfds.core.Version('1.0.0'),
                     description=json.dumps({'task': task, 'params': params, 'seed': seed,
                                             'num_train': num_train, 'num_test': num_test}))
    self.task = task
    self.params = dict(params)
    self.seed = int(seed)
    self.num_train = int(num_train)
    self.num_test = int(num_test)


class _LocalBuilder(tfds.core.GeneratorBasedBuilder):
  """Builders that generate locally: no download checksums to look up.

  TFDS locates a builder's checksum file next to its source through
  ``importlib_resources`` (not installed, and not needed: nothing is downloaded), so the
  lookup is switched off.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):  # pylint: disable=invalid-name
    return None

  @tfds.core.utils.classproperty
  @classmethod
  def url_infos(cls):  # pylint: disable=invalid-name
    return None


class _SyntheticTask(_LocalBuilder):
  """Shared body of the synthetic task builders (one subclass per task)."""

  VERSION = tfds.core.Version('1.0.0')
  TASK = ''

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    sample = TASKS[cfg.task].generate(1, cfg.seed, **cfg.params)
    return tfds.core.DatasetInfo(
        builder=self, description=TASKS[cfg.task].description,
        features=_features_from_example({k: v[0] for k, v in sample.items()}))

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    return {'train': self._generate_examples(cfg.num_train, cfg.seed),
            'test': self._generate_examples(cfg.num_test, cfg.seed + _TEST_SEED_OFFSET)}

  def _generate_examples(self, num, seed):
    cfg = self.builder_config
    arrays = TASKS[cfg.task].generate(num, seed, **cfg.params)
    for i in range(num):
      yield i, {k: v[i] for k, v in arrays.items()}


def _make_builder_class(task: str) -> type:
  cls_name = ''.join(p.capitalize() for p in task.split('_')) + 'Task'
  return type(cls_name, (_SyntheticTask,),
              {'TASK': task, '__module__': __name__,
               '__doc__': f'TFDS builder: {TASKS[task].description}.'})


BUILDERS = {task: _make_builder_class(task) for task in TASKS}


class DigitsTask(_LocalBuilder):
  """scikit-learn's 8x8 digits with attnjax's fixed stratified split (1437 / 360)."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=tasks.load_digits_split.__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(8, 8, 1), dtype=np.float32),
            'label': tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples('train'), 'test': self._generate_examples('test')}

  def _generate_examples(self, split):
    arrays = tasks.load_digits_split(split)
    for i in range(len(arrays['label'])):
      yield i, {'image': arrays['image'][i], 'label': int(arrays['label'][i])}


def builder(name: str, *, data_dir: str | None = None, seed: int = 0,
            num_train: int | None = None, num_test: int | None = None,
            **params) -> tfds.core.DatasetBuilder:
  """The (unprepared) builder of a built-in task."""
  data_dir = data_dir or default_data_dir()
  if name == 'digits':
    if params:
      raise ValueError(f'digits takes no task parameters; got {sorted(params)}.')
    return DigitsTask(data_dir=data_dir, file_format='array_record')
  if name not in TASKS:
    raise ValueError(f'unknown built-in task {name!r}; expected one of {BUILTIN_NAMES}.')
  spec = TASKS[name]
  try:  # validate parameters now, with the generator's own messages
    spec.generate(1, seed, **params)
  except TypeError as e:
    raise ValueError(f'bad parameters for task {name!r}: {e}') from e
  cfg = TaskConfig(task=name, params=params, seed=seed,
                   num_train=spec.num_train if num_train is None else int(num_train),
                   num_test=spec.num_test if num_test is None else int(num_test))
  return BUILDERS[name](config=cfg, data_dir=data_dir, file_format='array_record')


def prepare(name: str, **kwargs) -> tfds.core.DatasetBuilder:
  """Generates the array_record files of a built-in task if they are not there yet."""
  b = builder(name, **kwargs)
  b.download_and_prepare()
  return b


def load(name: str, split: str, *, data_dir: str | None = None, prepare_if_missing: bool = True,
         **kwargs):
  """Random-access source for ``split`` of a built-in task or a prepared TFDS dataset.

  Args:
    name: a built-in task (``BUILTIN_NAMES``) or any TFDS dataset name (must be prepared in
      array_record format under ``data_dir``).
    split: 'train' / 'test' (built-in), or any TFDS split string.
    data_dir: TFDS data dir (default ``default_data_dir()``; TFDS's own default for
      external datasets when None).
    prepare_if_missing: generate built-in tasks on first use.
    **kwargs: seed, num_train, num_test and task parameters (built-in tasks only).
  Raises:
    ValueError naming the dataset when it is unknown or not prepared.
  """
  if name in BUILTIN_NAMES:
    b = builder(name, data_dir=data_dir, **kwargs)
    if not _is_prepared(b):
      if not prepare_if_missing:
        raise ValueError(f'dataset {name!r} is not prepared under {b.data_dir}.')
      print(f'attnjax.data: generating {name} ({b.builder_config.name if b.builder_config else ""})'
            f' under {b.data_dir} (first use only)', flush=True)
      tfds.disable_progress_bar()
      b.download_and_prepare()
    if split not in b.info.splits:
      raise ValueError(f'dataset {name!r} has splits {list(b.info.splits)}; got split={split!r}.')
    return b.as_data_source(split=split)
  if kwargs:
    raise ValueError(f'task parameters {sorted(kwargs)} apply to built-in tasks only '
                     f'({BUILTIN_NAMES}); {name!r} is an external TFDS dataset.')
  try:
    b = tfds.builder(name, data_dir=data_dir, file_format='array_record')
  except Exception as e:  # DatasetNotFoundError and friends
    raise ValueError(f'unknown dataset {name!r}: not a built-in task {BUILTIN_NAMES} and not a '
                     f'registered TFDS dataset ({type(e).__name__}: {e}).') from e
  if not _is_prepared(b):
    raise ValueError(f'TFDS dataset {name!r} is not prepared under {b.data_dir}; run '
                     f'`tfds build {name} --file_format=array_record` (data_dir={data_dir}).')
  return b.as_data_source(split=split)


def _is_prepared(b: tfds.core.DatasetBuilder) -> bool:
  try:
    return b.is_prepared()
  except Exception:  # pylint: disable=broad-except
    return False
