"""orbax checkpoints: train state (params, optimizer, step, RNG) + data-iterator state.

One ``CheckpointManager`` per workdir (``<workdir>/checkpoints``), asynchronous saves,
``keep`` newest kept. Writing is collective (every process calls ``save``; orbax writes
each array shard from the process that owns it and finalises on process 0). A checkpoint
that fails to restore (corrupted, truncated) is reported with a warning, deleted, and the
next older one is tried.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger('attnjax.train')


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` with items ``state`` and ``data``."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    if keep < 1:
      raise ValueError(f'config.checkpoint.keep must be >= 1; got {keep}.')
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'data'))

  def save(self, step: int, state: Any, data_state: dict, *, wait: bool = False) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=ocp.args.JsonSave(data_state)),
                      force=True)
    if wait:
      self.manager.wait_until_finished()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """Restores the newest readable checkpoint onto ``abstract_state``'s shardings.

    Returns ``(step, state, data_state)`` or None when there is no checkpoint.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                          data=ocp.args.JsonRestore()))
        return step, restored['state'], dict(restored['data'])
      except Exception as e:  # pylint: disable=broad-except
        msg = (f'WARNING: checkpoint at step {step} in {self.directory} could not be restored '
               f'({type(e).__name__}: {str(e)[:300]}); deleting it and falling back to the '
               'previous one.')
        log.warning(msg)
        if jax.process_index() == 0:
          print(msg, flush=True)
        try:
          self.manager.delete(step)
        except Exception:  # pylint: disable=broad-except
          pass
        self.manager.reload()
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
