"""One registry of attention implementations for the softmax and linear families.

Each implementation is an :class:`Implementation` object: a ``name``, its ``family``
(``'softmax'`` for :func:`attnjax.attention`, ``'linear'`` for the causal chunked form of
:mod:`attnjax.ops.linear`), its typed block-size/config class (``config_cls``, or None when
it takes none), the ``platforms`` where it runs natively, a ``supports(args, config)``
check (None: it can serve the call; else the reason, evaluated at trace time before
running) and ``run``.

``'auto'`` per family and backend (:func:`auto_candidates`):

==========  ====================================================  =====================
backend     softmax                                               linear
==========  ====================================================  =====================
TPU         ``pallas_tpu``, ``xla_chunked``, ``xla``              ``pallas_tpu``, ``xla``
GPU         ``pallas_gpu``, ``xla_chunked``, ``xla``              ``pallas_gpu``, ``xla``
CPU         ``cpu_flash``, ``xla_chunked``, ``xla`` (``xla``      ``xla``
            first when ``T * S <= 512``)
==========  ====================================================  =====================

The dispatcher tries the candidates in order and falls through only on a ``supports``
refusal or :class:`attnjax.core.Unsupported` raised by the implementation's own
planning; any other exception propagates.  The chosen implementation runs under
``jax.named_scope(f"attnjax/{name}")`` and is logged (with the fallback reasons) at DEBUG
on the ``'attnjax'`` logger once per distinct call signature; a CPU kernel that cannot
be built is logged at WARNING once.

Layering: this module sits at the dispatch level (it may import ``ops``, ``kernels`` and
``cpu``; kernels are imported lazily, on first use).  The linear ops reach it through the
hooks of :mod:`attnjax.ops.linear._core` (``register_chunk_kernel``,
``register_selector``), filled by :mod:`attnjax.dispatch` when ``attnjax`` is imported.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
from typing import Any, Callable, Optional

import jax

from attnjax.core import args as args_lib
from attnjax.core import tiling as tiling_lib
from attnjax.core.errors import Unsupported

__all__ = ["Implementation", "IMPLEMENTATIONS", "FAMILIES", "implementations", "get",
           "auto_candidates", "candidates", "config_for", "log_choice", "logger"]

FAMILIES = ("softmax", "linear")
logger = logging.getLogger("attnjax")

_GPU = ("gpu", "cuda", "rocm")
# On CPU, dense logits beat the cpu_flash kernel only for tiny calls, where its fixed
# costs (threads, packing) dominate; measured in docs/core.md ("'auto' on CPU").
_CPU_DENSE_MAX_TS = 16 * 32


def _no_refusal(args, config):
  del args, config
  return None


@dataclasses.dataclass(frozen=True, eq=False)
class Implementation:
  """One implementation of a family.

  Attributes:
    name: the name passed as ``implementation=``.
    family: ``'softmax'`` or ``'linear'``.
    platforms: JAX backends where it runs natively (elsewhere: interpret mode, or a
      ``supports`` refusal).
    run: softmax: ``run(q, k, v, a, *, return_lse, block_sizes)``; linear: the chunk
      kernel ``run(q, k, v, log_decay_N, *, chunk_size) -> o`` (None for ``'xla'``, the
      op's own XLA path).
    check: ``check(args, config) -> Optional[str]``, the refusal reason (None: serves).
    config_loader: returns the typed config class(es) (imported lazily), or None.
    traced_scale: takes a JAX-scalar ``scale`` as is (else ``q`` is pre-scaled).
  """
  name: str
  family: str
  platforms: tuple[str, ...]
  run: Optional[Callable]
  check: Callable[[Any, Any], Optional[str]] = _no_refusal
  config_loader: Optional[Callable[[], tuple]] = None
  traced_scale: bool = False

  @functools.cached_property
  def config_cls(self) -> tuple:
    """The config classes this implementation takes (empty: none); a kernel that cannot
    be imported takes none."""
    if self.config_loader is None:
      return ()
    try:
      return tuple(self.config_loader())
    except ImportError:
      return ()

  def supports(self, args, config=None) -> Optional[str]:
    """None if this implementation can serve the call ``args`` with ``config``, else the
    reason.  Evaluated at trace time, before running."""
    return self.check(args, config)

  def accepts(self, config) -> bool:
    return config is None or (bool(self.config_cls) and isinstance(config, self.config_cls))

  def config_names(self) -> str:
    return " or ".join(c.__name__ for c in self.config_cls) or "no block_sizes (None)"


# ------------------------------------------------------------------------ softmax family


def _reference(q, k, v, a, *, return_lse, block_sizes):
  del block_sizes
  from attnjax.core import softmax as softmax_lib
  out, lse = softmax_lib.dense_attention(q, k, v, a, upcast=True)
  return (out, lse) if return_lse else out


def _xla(q, k, v, a, *, return_lse, block_sizes):
  from attnjax.ops import dense as dense_lib
  return dense_lib.xla_attention(q, k, v, a, return_lse=return_lse, block_sizes=block_sizes)


def _xla_chunked(q, k, v, a, *, return_lse, block_sizes):
  from attnjax.ops import chunked as chunked_lib
  return chunked_lib.chunked_attention(q, k, v, a, return_lse=return_lse,
                                       block_sizes=block_sizes)


def _chunked_config():
  from attnjax.ops.chunked import ChunkedBlockSizes
  return (ChunkedBlockSizes,)


def _cpu_flash_check(a, config):
  if jax.default_backend() != "cpu":
    return f"'cpu_flash' runs on the CPU backend, not {jax.default_backend()!r}"
  from attnjax.cpu import flash
  return flash.unsupported_reason(a, config)


def _cpu_flash(q, k, v, a, *, return_lse, block_sizes, row_map=None):
  from attnjax.cpu import flash
  return flash.cpu_flash_attention(q, k, v, a, return_lse=return_lse,
                                   block_sizes=block_sizes, row_map=row_map)


def _cpu_flash_config():
  from attnjax.cpu.flash import CpuFlashBlockSizes
  return (CpuFlashBlockSizes,)


def _native_target() -> Optional[str]:
  platform = jax.default_backend()
  if platform == "tpu":
    return "tpu"
  if platform in _GPU:
    return "gpu"
  return None


def _flash_module(target: str):
  if target == "tpu":
    from attnjax.kernels.tpu import flash as kmod
  else:
    from attnjax.kernels.gpu import flash as kmod
  return kmod


def _pallas_check(target: Optional[str]):
  def check(a, config):
    del a, config
    t = target or _native_target()
    if t is None:
      return (f"'pallas' has no kernel for the {jax.default_backend()!r} backend; ask for "
              f"'pallas_tpu' or 'pallas_gpu' explicitly to run a kernel in interpret mode")
    try:
      _flash_module(t)
    except ImportError as e:  # kernels not available in this build
      return f"Pallas {t} kernel unavailable: {e}"
    return None
  return check


def _pallas_run(target: Optional[str]):
  def run(q, k, v, a, *, return_lse, block_sizes):
    t = target or _native_target()
    kmod = _flash_module(t)
    native = {"tpu": ("tpu",), "gpu": _GPU}[t]
    interpret = jax.default_backend() not in native
    return kmod.flash_attention(q, k, v, **a.kwargs(), return_lse=return_lse,
                                block_sizes=block_sizes, interpret=interpret)
  return run


def _pallas_config(target: Optional[str]):
  def load():
    targets = (target,) if target else ("tpu", "gpu")
    return tuple(_flash_module(t).BlockSizes for t in targets)
  return load


# ------------------------------------------------------------------------- linear family


def _linear_kernel_module(target: str):
  if target == "tpu":
    from attnjax.kernels.tpu import linear as kmod
  else:
    from attnjax.kernels.gpu import linear as kmod
  return kmod


def _linear_run(target: str):
  def run(q, k, v, log_decay, *, chunk_size):
    return _linear_kernel_module(target).lightning_attention(q, k, v, log_decay,
                                                             chunk_size=chunk_size)
  return run


def _linear_check(target: str):
  name = f"pallas_{target}"

  def check(call, config):
    del config
    if not call.causal:
      return f"{name!r} serves causal=True only"
    if call.args.form != "chunked":
      return f"{name!r} serves form='chunked' only, got {call.args.form!r}"
    if call.token_decay:
      return (f"{name!r} supports a constant per-head decay only, not a per-token "
              f"log_decay")
    try:
      kmod = _linear_kernel_module(target)
    except ImportError as e:
      return f"Pallas {target} linear kernel unavailable: {e}"
    try:
      kmod.BlockSizes(chunk=call.args.chunk_size)
    except ValueError as e:
      return f"{name!r} cannot tile chunk_size={call.args.chunk_size}: {e}"
    return None
  return check


def _linear_config(target: str):
  return lambda: (_linear_kernel_module(target).BlockSizes,)


# ------------------------------------------------------------------------------ registry

_ALL = (
    Implementation("reference", "softmax", ("cpu", "tpu") + _GPU, _reference,
                   traced_scale=True),
    Implementation("xla", "softmax", ("cpu", "tpu") + _GPU, _xla, traced_scale=True),
    Implementation("xla_chunked", "softmax", ("cpu", "tpu") + _GPU, _xla_chunked,
                   config_loader=_chunked_config),
    Implementation("cpu_flash", "softmax", ("cpu",), _cpu_flash, check=_cpu_flash_check,
                   config_loader=_cpu_flash_config),
    Implementation("pallas", "softmax", ("tpu",) + _GPU, _pallas_run(None),
                   check=_pallas_check(None), config_loader=_pallas_config(None)),
    Implementation("pallas_tpu", "softmax", ("tpu",), _pallas_run("tpu"),
                   check=_pallas_check("tpu"), config_loader=_pallas_config("tpu")),
    Implementation("pallas_gpu", "softmax", _GPU, _pallas_run("gpu"),
                   check=_pallas_check("gpu"), config_loader=_pallas_config("gpu")),
    Implementation("xla", "linear", ("cpu", "tpu") + _GPU, None),
    Implementation("pallas_tpu", "linear", ("tpu",), _linear_run("tpu"),
                   check=_linear_check("tpu"), config_loader=_linear_config("tpu")),
    Implementation("pallas_gpu", "linear", _GPU, _linear_run("gpu"),
                   check=_linear_check("gpu"), config_loader=_linear_config("gpu")),
)

#: Every implementation, keyed by ``(family, name)``.
REGISTRY: dict[tuple[str, str], Implementation] = {(i.family, i.name): i for i in _ALL}

#: The softmax implementation names (``attnjax.IMPLEMENTATIONS``, kept for compatibility).
IMPLEMENTATIONS = tuple(i.name for i in _ALL if i.family == "softmax")


def _check_family(family: str):
  if family not in FAMILIES:
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def implementations(family: str = "softmax") -> tuple[Implementation, ...]:
  """The registered implementations of ``family`` (``'softmax'`` or ``'linear'``)."""
  _check_family(family)
  return tuple(i for i in _ALL if i.family == family)


def names(family: str = "softmax") -> tuple[str, ...]:
  return tuple(i.name for i in implementations(family))


def get(name: str, family: str = "softmax") -> Implementation:
  """The implementation ``name`` of ``family``; ValueError with close matches if none."""
  _check_family(family)
  impl = REGISTRY.get((family, name))
  if impl is None:
    valid = names(family)
    close = difflib.get_close_matches(str(name), valid, n=3, cutoff=0.4)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise ValueError(f"implementation must be one of {valid} or 'auto', got {name!r}{hint}")
  return impl


def auto_candidates(a=None, backend: Optional[str] = None, family: str = "softmax"):
  """The implementations ``'auto'`` tries, in order, for the call ``a`` (softmax:
  :class:`~attnjax.core.args.AttentionArgs`) on ``backend`` (default: JAX's)."""
  _check_family(family)
  backend = backend or jax.default_backend()
  if family == "linear":
    if backend == "tpu":
      return ("pallas_tpu", "xla")
    if backend in _GPU:
      return ("pallas_gpu", "xla")
    return ("xla",)
  if backend == "tpu":
    return ("pallas_tpu", "xla_chunked", "xla")
  if backend in _GPU:
    return ("pallas_gpu", "xla_chunked", "xla")
  if a is not None and a.T * a.S <= _CPU_DENSE_MAX_TS:
    return ("xla", "cpu_flash", "xla_chunked")
  return ("cpu_flash", "xla_chunked", "xla")


def candidates(implementation, a=None, family: str = "softmax") -> tuple[str, ...]:
  """``implementation`` (None/'auto', a name, or a sequence of names and 'auto') as the
  ordered candidate names; TypeError/ValueError for a malformed request."""
  if implementation is None or implementation == "auto":
    return auto_candidates(a, family=family)
  names_ = (implementation,) if isinstance(implementation, str) else implementation
  try:
    names_ = tuple(names_)
  except TypeError:
    raise TypeError(f"implementation must be None, 'auto', a name or a sequence of names "
                    f"from {names(family)}, got {implementation!r}") from None
  if not names_:
    raise ValueError("implementation must not be an empty sequence")
  out = []
  for n in names_:
    if not isinstance(n, str):
      raise TypeError(f"implementation names must be strings, got {n!r}")
    if n == "auto":
      out.extend(c for c in auto_candidates(a, family=family) if c not in out)
    elif n not in out:
      out.append(get(n, family).name)
  return tuple(out)


def _is_explicit_single(implementation) -> bool:
  return isinstance(implementation, str) and implementation != "auto"


def check_block_sizes(block_sizes, cands: tuple[str, ...], implementation,
                      family: str = "softmax"):
  """Validates ``block_sizes`` against the candidates (see :func:`config_for`)."""
  if block_sizes is None:
    return
  if isinstance(block_sizes, dict):
    valid = names(family)
    for key, cfg in block_sizes.items():
      if not isinstance(key, str) or key not in valid:
        close = difflib.get_close_matches(str(key), valid, n=3, cutoff=0.4)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise ValueError(f"block_sizes keys must be implementation names from {valid}, got "
                         f"{key!r}{hint}")
      impl = get(key, family)
      if not impl.accepts(cfg):
        raise TypeError(f"block_sizes[{key!r}] must be {impl.config_names()}, got "
                        f"{type(cfg).__name__}")
    return
  if _is_explicit_single(implementation):
    impl = get(cands[0], family)
    if not impl.accepts(block_sizes):
      raise TypeError(f"block_sizes for {impl.name!r} must be {impl.config_names()} (or a "
                      f"dict keyed by implementation name), got {type(block_sizes).__name__}")
    return
  family_impls = implementations(family)
  if not any(i.accepts(block_sizes) for i in family_impls):
    known = sorted({c.__name__ for i in family_impls for c in i.config_cls})
    raise TypeError(f"block_sizes must be None, a dict {{implementation name: config}} or "
                    f"one of the config classes {known}, got {type(block_sizes).__name__}")


def config_for(impl: Implementation, block_sizes):
  """The config ``impl`` runs with: a dict's entry for ``impl.name``, or the typed
  instance when its class is ``impl``'s (another implementation's config: defaults)."""
  if block_sizes is None:
    return None
  if isinstance(block_sizes, dict):
    return block_sizes.get(impl.name)
  return block_sizes if impl.accepts(block_sizes) else None


# ------------------------------------------------------------------------------- logging

_LOGGED: dict = {}
_LOG_LIMIT = 4096


def log_choice(key, family: str, chosen: Optional[str], reasons: list[tuple[str, str]]):
  """Logs the chosen implementation and the fallback reasons once per ``key`` (DEBUG).

  A CPU kernel that cannot be built is logged at WARNING once per process by
  :mod:`attnjax.cpu.build` itself (on the ``attnjax.cpu`` logger), not here."""
  if key in _LOGGED:
    return
  if len(_LOGGED) >= _LOG_LIMIT:
    _LOGGED.clear()
  _LOGGED[key] = chosen
  if logger.isEnabledFor(logging.DEBUG):
    why = "; ".join(f"{n}: {r}" for n, r in reasons)
    ran = f"ran {chosen!r}" if chosen else "no implementation could serve the call"
    logger.debug("attnjax %s attention: %s%s [%s]", family, ran,
                 f" (fell back: {why})" if why else "", key[-1])


def reset_log_state():
  """Forgets which calls were logged (tests)."""
  _LOGGED.clear()


def softmax_signature(q, k, v, a, implementation, return_lse) -> tuple:
  """A hashable description of a softmax call for once-per-signature logging."""
  def desc(x):
    return None if x is None else (tuple(x.shape), str(x.dtype))
  mask = None if a.mask is None else a.mask.name
  text = (f"q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} {q.dtype} mask={mask} "
          f"implementation={implementation!r}")
  return ("softmax", desc(q), desc(k), desc(v), mask, a.score_mod is not None,
          desc(a.bias), a.q_segment_ids is not None, a.softcap, a.sinks is not None,
          args_lib.is_static_scale(a.scale), bool(return_lse), repr(implementation),
          jax.default_backend(), text)


# 2D tiling of spatial masks (attnjax.core.tiling) per implementation: the default
# (query, key) tile in tokens and the block sizes the implementation accepts.
_TILING = {
    "xla_chunked": (64, 32, lambda bq, bk: True),
    # cpu_flash runs tiled spatial masks in its block-sparse mode (SIMD engine).
    "cpu_flash": (64, 64, lambda bq, bk: bk % 16 == 0),
    "pallas_tpu": (128, 128, lambda bq, bk: bq % 8 == 0 and bk % 128 == 0),
    "pallas_gpu": (64, 64, lambda bq, bk: min(bq, bk) >= 16 and not (bq & (bq - 1))
                   and not (bk & (bk - 1))),
}


# Implementations run with the tiled order as a row map (run(..., row_map=)) instead
# of tile_call's permutation gathers; they must serve no bias, segment ids or score_mod
# (the tiled mask is all of the call that changes).  cpu_flash's block-sparse kernel
# reads q, k, v through the map while it packs them and writes the outputs and grads
# back to their rows: no gather in the graph, forward or backward (docs/kernels.md).
_FOLDS_TILING: frozenset = frozenset({"cpu_flash"})


def _spatial_tiling(impl: Implementation, a, cfg):
  """``(TilePlan or None, config)``: whether ``impl`` runs call ``a`` in the 2D-tiled
  token order (a static spatial mask on a 2D/3D grid; ``spatial_tile`` of the config
  not False), and the config with the block sizes of the tiling filled in."""
  name = impl.name
  if name == "pallas":
    target = _native_target()
    name = f"pallas_{target}" if target else name
  spec = _TILING.get(name)
  if spec is None or a.mask is None:
    return None, cfg
  cls = impl.config_cls[0] if name == impl.name else \
      _flash_module(name.split("_")[1]).BlockSizes
  base = cfg if cfg is not None else cls()
  if not hasattr(base, "spatial_tile"):
    return None, cfg
  default_q, default_k, valid = spec
  if name == "xla_chunked":
    flat = base.resolve(a.T, a.S, a.G)
  elif name == "cpu_flash":
    flat = base.resolve()[:2]
  else:
    flat = base.resolve(a.T, a.S)
  tplan = tiling_lib.plan_tiling(a, base.spatial_tile, base.block_q, base.block_k,
                                 default_q, default_k, valid, flat)
  if tplan is None:
    return None, cfg
  cfg = dataclasses.replace(base, block_q=tplan.block_q, block_k=tplan.block_k)
  if tiling_lib.is_row_major(tplan):       # the flattened order, row-aligned tiles
    return None, cfg
  return tplan, cfg


def run_softmax(q, k, v, a, *, implementation, return_lse, block_sizes):
  """Runs the first candidate that serves the call (see the module docstring)."""
  cands = candidates(implementation, a, "softmax")
  check_block_sizes(block_sizes, cands, implementation, "softmax")
  key = softmax_signature(q, k, v, a, implementation, return_lse)
  reasons: list[tuple[str, str]] = []
  for name in cands:
    impl = get(name, "softmax")
    cfg = config_for(impl, block_sizes)
    reason = impl.supports(a, cfg)
    if reason is None:
      qi, ai = (q, a) if impl.traced_scale else args_lib.static_scale(q, a)
      ki, vi = k, v
      tplan, cfg = _spatial_tiling(impl, ai, cfg)
      run, untile = impl.run, tplan is not None
      if tplan is not None and name in _FOLDS_TILING:
        # The kernel reads q, k, v through the tiled order's row map and writes its
        # outputs back to their rows: no permutation gathers (and none in the vjp).
        ai = dataclasses.replace(ai, mask=tiling_lib.tiled_mask(ai, tplan))
        run = functools.partial(run, row_map=tiling_lib.tiled_index(tplan))
        untile = False
      elif tplan is not None:
        qi, ki, vi, ai = tiling_lib.tile_call(qi, k, v, ai, tplan)
      try:
        with jax.named_scope(f"attnjax/{name}"):
          out = run(qi, ki, vi, ai, return_lse=return_lse, block_sizes=cfg)
          if untile:
            out = tiling_lib.untile_outputs(out, tplan, return_lse)
      except Unsupported as e:
        reason = str(e)
      else:
        log_choice(key, "softmax", name, reasons)
        return out
    reasons.append((name, reason))
  log_choice(key, "softmax", None, reasons)
  raise Unsupported("no attention implementation could serve this call:\n  " +
                    "\n  ".join(f"{n}: {r}" for n, r in reasons))


def select_linear(call, implementation):
  """The linear implementation serving ``call`` (the ops' selector hook): the first
  candidate whose ``supports`` accepts; :class:`Unsupported` listing reasons if none."""
  cands = candidates(implementation, None, "linear")
  reasons: list[tuple[str, str]] = []
  for name in cands:
    reason = get(name, "linear").supports(call, None)
    if reason is None:
      log_choice(call.signature(implementation), "linear", name, reasons)
      return name
    reasons.append((name, reason))
  log_choice(call.signature(implementation), "linear", None, reasons)
  raise Unsupported("no linear-attention implementation could serve this call:\n  " +
                    "\n  ".join(f"{n}: {r}" for n, r in reasons))
