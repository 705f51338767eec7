"""Data: TFDS builders for the built-in tasks (array_record, no TensorFlow) + grain pipelines."""

from attnjax.data import tasks
from attnjax.data.builders import BUILTIN_NAMES, builder, default_data_dir, load, prepare
from attnjax.data.pipeline import local_batch_size, make_eval_batches, make_train_dataset

__all__ = ['tasks', 'BUILTIN_NAMES', 'builder', 'default_data_dir', 'load', 'prepare',
           'local_batch_size', 'make_eval_batches', 'make_train_dataset']
