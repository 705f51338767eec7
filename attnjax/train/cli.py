"""What ``train.py`` and ``eval.py`` share: the default workdir, one-line config errors, and
Ctrl-C / SIGTERM handling that never raises ``KeyboardInterrupt`` inside XLA.

Signals (``Interrupts``):

* start-up (imports, data generation, compilation, the first step): nothing new exists
  to save, so with ``hard_exit=True`` (the scripts) the first SIGINT/SIGTERM ends the
  process at once -- message, cleanup callbacks (``train.py`` removes a workdir it just
  created), ``os._exit(128 + signum)``. No Python exception unwinds through a running XLA
  compilation and no interpreter teardown runs with XLA or orbax threads alive (that
  teardown is what ended in ``Fatal Python error: Segmentation fault``).
* running: the first signal only sets ``signum``; the loop polls it between steps, saves
  a checkpoint, joins its threads and returns. A second SIGINT exits at once (130)
  without saving.
* finishing (the final checkpoint is on disk, the final eval runs): exit at once.

A watcher thread reads the signal numbers from ``signal.set_wakeup_fd``, so the message
appears (and a start-up interrupt takes effect) while the main thread is still inside a
C++ call such as an XLA compilation; Python-level handlers would only run after it.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence

DEFAULT_CONFIG = os.path.join('configs', 'mqar.py')
_NAMES = {signal.SIGINT: 'SIGINT (Ctrl-C)', signal.SIGTERM: 'SIGTERM'}


def default_workdir(config_arg: str | None) -> str:
  """``./workdir/<config file stem>``: ``configs/mqar.py:runlocal`` -> ``workdir/mqar``.

  ``train.py`` and ``eval.py`` both use it, so ``python eval.py`` right after
  ``python train.py`` (same ``--config`` or none) finds the run.
  """
  path = (config_arg or DEFAULT_CONFIG).split(':', 1)[0]
  return os.path.join('workdir', os.path.splitext(os.path.basename(path))[0])


# ======================================================================================
# Config errors in one line
# ======================================================================================

def _config_spec(argv: Sequence[str], default: str) -> str:
  """The value of ``--config`` in ``argv`` (``path[:args]``), else ``default``."""
  for i, arg in enumerate(argv):
    m = re.match(r'^--?config(=(.*))?$', arg)
    if m:
      if m.group(1) is not None:
        return m.group(2)
      if i + 1 < len(argv):
        return argv[i + 1]
  return default


def _override_paths(argv: Sequence[str]) -> list[str]:
  """``['model.num_heads', ...]`` from ``--config.model.num_heads=4`` / ``--noconfig.x``."""
  out = []
  for arg in argv:
    m = re.match(r'^--?(?:no)?config\.([^=]+)', arg)
    if m:
      out.append(m.group(1))
  return out


def load_config_file(spec: str):
  """``get_config`` of ``path[:arg]``, without command-line overrides (as ml_collections
  calls it: with ``arg`` when the spec has a colon)."""
  path, colon, arg = spec.partition(':')
  mod_spec = importlib.util.spec_from_file_location('_attnjax_config_probe', path)
  if mod_spec is None or mod_spec.loader is None:
    raise ValueError(f'--config: cannot load {path!r}.')
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module.get_config(arg) if colon else module.get_config()


def missing_key_message(config, path: str) -> str | None:
  """None if ``config`` has ``path`` (dotted, ``a.b[0].c``), else a one-line message
  naming the first missing key and the close matches at its level."""
  node, done = config, []
  for part in path.split('.'):
    m = re.match(r'^([^\[]+)((?:\[\d+\])*)$', part)
    if m is None:
      return None
    name, indices = m.group(1), re.findall(r'\[(\d+)\]', m.group(2))
    keys = list(node.keys()) if hasattr(node, 'keys') else None
    here = '.'.join(done)
    if keys is None:
      return (f"config key {path!r} does not exist: {here!r} is a "
              f'{type(node).__name__}, not a group of keys.')
    if name not in keys:
      full = lambda k, here=here: f'{here}.{k}' if here else k
      close = difflib.get_close_matches(name, [str(k) for k in keys], n=3, cutoff=0.6)
      if close:
        hint = 'did you mean ' + ' or '.join(repr(full(c)) for c in close) + '?'
      else:
        hint = (f'{here!r} has: ' if here else 'top-level keys: ') + ', '.join(
            sorted(str(k) for k in keys)) + '.'
      return f'config key {full(name)!r} does not exist; {hint}'
    node = node[name]
    for i in indices:
      try:
        node = node[int(i)]
      except (IndexError, TypeError, KeyError):
        return None
    done.append(part)
  return None


def apply_overrides(config, overridden, argv: Sequence[str]):
  """Copies the ``--config.<path>`` values of ``argv`` from ``overridden`` (the parsed flag)
  into ``config`` (e.g. a run's saved ``config.json``); returns ``config``.

  Raises ValueError naming a path that ``config`` does not have.
  """
  for path in _override_paths(argv):
    parts = path.split('.')
    src, dst = overridden, config
    try:
      for part in parts[:-1]:
        src, dst = src[part], dst[part]
      dst[parts[-1]] = src[parts[-1]]
    except (KeyError, AttributeError, TypeError) as e:
      msg = missing_key_message(config, path)
      raise ValueError(msg or f'--config.{path}: cannot apply to this config ({e}).') from e
  return config


def explain_config_error(exc: BaseException, argv: Sequence[str], default: str) -> str | None:
  """A one-line message for an exception raised while the config flag was parsed, or None
  when it is not a config mistake (then the caller re-raises: a bug wants its traceback).

  Override typos (``--config.model.num_headz=4``) name the key and its close matches;
  ``ValueError``s (unknown ``:args``, bad values) give their own message.
  """
  if isinstance(exc, (KeyError, AttributeError)):
    try:
      config = load_config_file(_config_spec(argv, default))
    except Exception:  # pylint: disable=broad-except
      return None
    for path in _override_paths(argv):
      msg = missing_key_message(config, path)
      if msg:
        return msg
    return None
  if isinstance(exc, ValueError):
    return f'--config {_config_spec(argv, default)}: ' + str(exc).strip().splitlines()[0]
  return None


def define_config_flag(default: str, help_string: str):
  """``config_flags.DEFINE_config_file('config', default, lock_config=True)``; a config
  mistake in ``sys.argv`` (ml_collections reads the overrides while defining the flag when
  ``--config`` is not given) prints one ``ERROR:`` line and exits with status 2."""
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  try:
    return config_flags.DEFINE_config_file('config', default, help_string, lock_config=True)
  except (KeyError, AttributeError, ValueError) as e:
    _fail_or_raise(e, sys.argv, default)


def flags_parser(default: str) -> Callable[[list[str]], list[str]]:
  """``app.run(main, flags_parser=...)``: absl's parser, with config mistakes (an explicit
  ``--config`` is parsed here) reported in one line (exit 2) instead of a traceback."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      # a config file that raised (e.g. an unknown ``:arg``) arrives as a flags error that
      # embeds the traceback; its last line is the message
      text = str(e)
      if 'Traceback (most recent call last)' in text:
        last = [l.strip() for l in text.splitlines() if l.strip()][-1]
        print(f'ERROR: --config {_config_spec(argv, default)}: {last}', file=sys.stderr,
              flush=True)
        sys.exit(2)
      print(f'FATAL Flags parsing error: {text}\nPass --helpshort or --helpfull to see help '
            'on flags.', file=sys.stderr, flush=True)
      sys.exit(1)
    except (KeyError, AttributeError, ValueError) as e:
      _fail_or_raise(e, argv, default)
  return parse


def _fail_or_raise(exc, argv, default):
  msg = explain_config_error(exc, argv, default)
  if msg is None:
    raise exc
  print(f'ERROR: {msg}', file=sys.stderr, flush=True)
  sys.exit(2)


# ======================================================================================
# Signals
# ======================================================================================

class Interrupts:
  """SIGINT/SIGTERM as a flag the train loop polls (see the module docstring).

  ``hard_exit``: the scripts' mode (exit at once during start-up and on a second Ctrl-C).
  Without it (library callers, tests) every signal only sets ``signum``.
  """

  STARTUP, RUNNING, FINISHING = 'startup', 'running', 'finishing'

  def __init__(self, *, hard_exit: bool = True):
    self.hard_exit = hard_exit
    self.signum: int | None = None
    self.phase = self.STARTUP
    self.startup_note = 'nothing was saved'
    self._lock = threading.Lock()
    self._cleanups: list[Callable[[], None]] = []
    self._old_handlers: dict = {}
    self._old_wakeup = None
    self._fds: tuple[int, int] | None = None
    self._thread: threading.Thread | None = None

  # --- installation ---------------------------------------------------------------------

  def install(self) -> Interrupts:
    """Takes over SIGINT and SIGTERM (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread() or self._old_handlers:
      return self
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._old_handlers[sig] = signal.signal(sig, self._python_handler)
    if self.hard_exit:
      try:
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._fds = (r, w)
        self._thread = threading.Thread(target=self._watch, name='attnjax-signals',
                                        daemon=True)
        self._thread.start()
      except (ValueError, OSError):  # no wakeup fd here: the Python handler does the work
        self._fds = self._thread = None
    return self

  def uninstall(self) -> None:
    """Restores the previous handlers and joins the watcher thread."""
    if not self._old_handlers:
      return
    if self._fds is not None:
      signal.set_wakeup_fd(self._old_wakeup if self._old_wakeup is not None else -1)
      os.close(self._fds[1])  # EOF ends the watcher
      if self._thread is not None:
        self._thread.join(timeout=5)
      os.close(self._fds[0])
      self._fds = self._thread = None
    for sig, h in self._old_handlers.items():
      signal.signal(sig, h)
    self._old_handlers = {}

  def __enter__(self):
    return self.install()

  def __exit__(self, *exc):
    self.uninstall()

  # --- state the loop uses ----------------------------------------------------------------

  def set_phase(self, phase: str) -> None:
    with self._lock:
      self.phase = phase

  def add_cleanup(self, fn: Callable[[], None]) -> None:
    """Runs ``fn`` before a start-up exit (e.g. remove a workdir created by this run)."""
    self._cleanups.append(fn)

  def clear_cleanups(self) -> None:
    self._cleanups = []

  @property
  def requested(self) -> bool:
    return self.signum is not None

  @staticmethod
  def name(signum: int | None) -> str:
    return _NAMES.get(signum, f'signal {signum}')

  # --- handling -----------------------------------------------------------------------------

  def _python_handler(self, signum, _frame):
    if self._thread is None:  # no watcher: act here (after the current C++ call returns)
      self._on_signal(signum)

  def _watch(self):
    r = self._fds[0]
    while True:
      try:
        data = os.read(r, 64)
      except OSError:
        return
      if not data:
        return
      for signum in data:
        if signum in (signal.SIGINT, signal.SIGTERM):
          self._on_signal(signum)

  def _on_signal(self, signum: int) -> None:
    with self._lock:
      first = self.signum is None
      if first:
        self.signum = signum
      phase = self.phase
    if not self.hard_exit:
      return
    if phase == self.STARTUP:
      self._say(f'Received {self.name(signum)} during start-up (before the first training '
                f'step finished): exiting; {self.startup_note}.')
      self._exit(128 + signum)
    elif phase == self.FINISHING:
      self._say(f'Received {self.name(signum)} after the final checkpoint was saved: exiting '
                'without the final eval (running the same command again does it).')
      self._exit(128 + signum)
    elif first:
      self._say(f'Received {self.name(signum)}: stopping after the current step and saving a '
                'checkpoint' + (' (press Ctrl-C again to exit at once without saving)'
                                if signum == signal.SIGINT else '') + '.')
    elif signum == signal.SIGINT:
      self._say('Second Ctrl-C: exiting now without saving (the run resumes from its last '
                'checkpoint).')
      self._exit(128 + signum)

  @staticmethod
  def _say(msg: str) -> None:
    try:
      os.write(2, ('\n' + msg + '\n').encode())
    except OSError:
      pass

  def _exit(self, code: int) -> None:
    for fn in self._cleanups:
      try:
        fn()
      except Exception:  # pylint: disable=broad-except
        pass
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except Exception:  # pylint: disable=broad-except
        pass
    os._exit(code)  # pylint: disable=protected-access
