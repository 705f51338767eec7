"""Compiles the C++ CPU kernels and registers them with XLA.

The shared library is built with the system C++ compiler (``$CXX``, else ``c++`` /
``g++`` / ``clang++``) for the running machine (``-march=native``) against the XLA FFI
headers that ship with jaxlib, on first use or ahead of time with
``python -m attnjax.cpu.build`` (prints the library's path and cache key; exits
non-zero with the reason when it cannot build).  It is cached under
``$ATTNJAX_CACHE_DIR`` (default ``$XDG_CACHE_HOME/attnjax`` or ``~/.cache/attnjax``),
keyed by :func:`cache_key`: a hash of the sources, the compiler's identity (its full
``--version`` output), the flags, the CPU's feature flags (what ``-march=native``
targets) and the jax version, so a fresh container on the same kind of machine with
the same toolchain reuses a mounted cache.  Concurrent builds write to temporary names
and rename atomically, so parallel test workers are safe.

The build logs once on the ``attnjax.cpu`` logger: ``building cpu_flash kernel ...
(N s)`` at INFO, and, when the kernel cannot be built or loaded (no compiler, a
compile error), the reason at WARNING; :func:`unavailable_reason` returns it, and the
``NotImplementedError`` with which ``'cpu_flash'`` declines a call carries it.

Warnings: always compiled with ``-Wall -Wextra``; with ``-Werror`` too when ``$CI`` is
set (non-empty, not ``0``/``false``) or ``ATTNJAX_CPU_WERROR=1``.

Set ``ATTNJAX_CPU_KERNELS=0`` to disable the kernels (``'auto'`` then uses the XLA
paths).

``ATTNJAX_CPU_AVX2=1`` (for tests) builds the AVX2 + FMA code paths (8 lanes, no AMX) on a
CPU that has AVX-512, so that the suite checks them on such a machine too.

``ATTNJAX_CPU_EMULATE_AVX512=1`` (for tests) builds the kernels' AVX-512 and AMX code
paths with every AVX-512 and AMX intrinsic emulated (``avx512_emulation.h``), so that
the 16-lane build and the bf16 tile paths run, about 10x slower, on a CPU with only
AVX2.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax

__all__ = [
  "cache_dir",
  "cache_key",
  "compile_flags",
  "emulating_avx512",
  "forcing_avx2",
  "has_amx",
  "library_path",
  "load",
  "simd_width",
  "unavailable_reason",
  "werror",
]

logger = logging.getLogger("attnjax.cpu")

_DIR = Path(__file__).parent
# The one translation unit (a unity build: it includes the other units' headers).
_SOURCE = _DIR / "flash_cpu.cc"
_BASE_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno",
               "-Wall", "-Wextra")
# FFI handler symbols in the library -> XLA custom-call target names.
TARGETS = {"AttnjaxFlashFwd": "attnjax_flash_fwd", "AttnjaxFlashBwd": "attnjax_flash_bwd",
           "AttnjaxSparseFwd": "attnjax_sparse_fwd", "AttnjaxSparseBwd": "attnjax_sparse_bwd"}


def _sources() -> list[Path]:
  """Every C++ source and header of the kernels (all of them enter the cache key)."""
  return sorted([*_DIR.glob("*.cc"), *_DIR.glob("*.h")])


def cache_dir() -> Path:
  root = os.environ.get("ATTNJAX_CACHE_DIR")
  if root:
    return Path(root)
  xdg = os.environ.get("XDG_CACHE_HOME")
  return (Path(xdg) if xdg else Path.home() / ".cache") / "attnjax"


def _truthy(value: str | None) -> bool:
  return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


def werror() -> bool:
  """True when warnings are errors: ``$CI`` set, or ``ATTNJAX_CPU_WERROR=1``."""
  return _truthy(os.environ.get("CI")) or _truthy(os.environ.get("ATTNJAX_CPU_WERROR"))


def compile_flags() -> tuple[str, ...]:
  """The compiler flags of this process's build (they enter the cache key)."""
  if forcing_avx2() and emulating_avx512():
    raise ValueError("ATTNJAX_CPU_AVX2 and ATTNJAX_CPU_EMULATE_AVX512 exclude each other")
  return (_BASE_FLAGS + (("-Werror",) if werror() else ())
          # after -march=native: the AVX2 + FMA subset of this CPU, no AVX-512 nor AMX
          + (("-mno-avx512f", "-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")
             if forcing_avx2() else ())
          # -Wno-psabi: the emulation passes __m512 values between inline functions of
          # one translation unit compiled without AVX-512 (GCC notes the ABI change).
          + (("-DATTNJAX_EMULATE_AVX512", "-Wno-psabi") if emulating_avx512() else ()))


def _compiler() -> tuple[str | None, str | None]:
  """(path of the C++ compiler, None) or (None, why there is none).  An explicit
  ``$CXX`` must exist; otherwise the first of c++, g++, clang++ on the PATH."""
  cxx = os.environ.get("CXX")
  if cxx:
    found = shutil.which(cxx)
    return (found, None) if found else (None, f"$CXX={cxx!r} is not an executable compiler")
  for name in ("c++", "g++", "clang++"):
    if shutil.which(name):
      return shutil.which(name), None
  return None, "no C++ compiler found (install g++ or clang++, or set $CXX)"


def _cpu_flags() -> set[str]:
  """The x86-64 CPU feature flags of /proc/cpuinfo (empty elsewhere)."""
  if platform.machine().lower() not in ("x86_64", "amd64"):
    return set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return set()


def _cpu_simd_width() -> int | None:
  """Float32 lanes this CPU offers the kernels: 16 with AVX-512F/DQ, 8 with AVX2 and
  FMA, None when it has neither."""
  flags = _cpu_flags()
  if {"avx512f", "avx512dq", "fma"} <= flags:
    return 16
  if {"avx2", "fma"} <= flags:
    return 8
  return None


def forcing_avx2() -> bool:
  """True when ATTNJAX_CPU_AVX2 asks for the AVX2 build on any CPU with AVX2 (tests)."""
  return _truthy(os.environ.get("ATTNJAX_CPU_AVX2", "0"))


def emulating_avx512() -> bool:
  """True when ATTNJAX_CPU_EMULATE_AVX512 asks for the emulated AVX-512 build (tests)."""
  return _truthy(os.environ.get("ATTNJAX_CPU_EMULATE_AVX512", "0"))


def cache_key(sources: bytes, compiler_id: str, flags, cpu_features, jax_version: str) -> str:
  """The library's cache key: 16 hex digits of a hash of the source text, the
  compiler's identity (``--version`` output), the flags, the CPU feature flags (what
  ``-march=native`` compiles for) and the jax version (its FFI headers)."""
  h = hashlib.sha256()
  for part in (sources, compiler_id.encode(), "\0".join(flags).encode(),
               " ".join(sorted(cpu_features)).encode(), jax_version.encode()):
    h.update(hashlib.sha256(part).digest())
  return h.hexdigest()[:16]


def _compiler_identity(cxx: str) -> str:
  proc = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60,
                        check=False)
  if proc.returncode != 0:
    raise OSError(f"{cxx} --version exited with {proc.returncode}: {proc.stderr[-500:]}")
  return f"{cxx}\n{proc.stdout}"


@functools.cache
def _build() -> tuple[str | None, str | None, str | None]:
  """(path of the compiled library, its cache key, None) or (None, None, why not)."""
  if not _truthy(os.environ.get("ATTNJAX_CPU_KERNELS", "1")):
    return None, None, "disabled by ATTNJAX_CPU_KERNELS"
  if _cpu_simd_width() is None:
    return None, None, ("needs an x86-64 CPU with AVX2 and FMA, or AVX-512F/DQ "
                        "(Linux /proc/cpuinfo)")
  cxx, why = _compiler()
  if cxx is None:
    return None, None, why
  flags = compile_flags()
  try:
    identity = _compiler_identity(cxx)
  except (OSError, subprocess.SubprocessError) as e:
    return None, None, f"cannot run {cxx}: {e}"
  key = cache_key(b"".join(p.name.encode() + b"\0" + p.read_bytes() for p in _sources()),
                  identity, flags, _cpu_flags(), jax.__version__)
  out_dir = cache_dir()
  target = out_dir / f"flash_cpu-{key}.so"
  if target.exists():
    return str(target), key, None
  logger.debug("building cpu_flash kernel with %s %s into %s", cxx, " ".join(flags), target)
  start = time.perf_counter()
  try:
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    # -isystem: the FFI headers' own warnings are not ours to fix (or fail on).
    proc = subprocess.run([cxx, *flags, "-isystem", jax.ffi.include_dir(), str(_SOURCE),
                           "-o", tmp, "-lpthread"], capture_output=True, text=True,
                          timeout=600, check=False)
    if proc.returncode != 0:
      os.unlink(tmp)
      return None, None, f"compiling {_SOURCE.name} failed:\n{proc.stderr[-2000:]}"
    os.replace(tmp, target)
  except (OSError, subprocess.SubprocessError) as e:
    return None, None, f"building the CPU kernels failed: {e}"
  logger.info("building cpu_flash kernel %s for this CPU (%s) ... done (%.1f s)", target,
              " ".join(flags), time.perf_counter() - start)
  return str(target), key, None


def library_path() -> str | None:
  """Path of the compiled library (building it if needed), None when it cannot be built."""
  return _build()[0]


@functools.cache
def load() -> str | None:
  """Builds (once) and registers the kernels; returns None on success or the reason
  they are unavailable."""
  path, _, reason = _build()
  if path is None:
    _log_unavailable(reason)
    return reason
  try:
    lib = ctypes.cdll.LoadLibrary(path)
    for symbol, name in TARGETS.items():
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)),
                                  platform="cpu")
    _LIB.append(lib)
  except (OSError, AttributeError) as e:
    reason = f"loading {path} failed: {e}"
    _log_unavailable(reason)
    return reason
  return None


def _log_unavailable(reason: str) -> None:
  """Once per process (load() is cached): why 'cpu_flash' falls back.  A warning when
  the kernel could not be built or loaded; info when it is disabled or the CPU lacks
  the instructions."""
  quiet = reason.startswith(("disabled by", "needs an x86-64"))
  logger.log(logging.INFO if quiet else logging.WARNING,
             "cpu_flash kernel unavailable, 'auto' falls back to the XLA paths: %s", reason)


_LIB: list = []  # the loaded library, once load() succeeded


@functools.cache
def has_amx() -> bool:
  """True when the loaded kernels can use AMX tiles (CPU support and the Linux
  permission for the tile state)."""
  return load() is None and bool(_LIB[0].AttnjaxCpuHasAmx())


@functools.cache
def simd_width() -> int | None:
  """Float32 lanes of the loaded kernels' vectors: 16 (AVX-512) or 8 (AVX2), as the
  compiler targeted this machine; None when the kernels are unavailable."""
  return int(_LIB[0].AttnjaxCpuLanes()) if load() is None else None


def unavailable_reason() -> str | None:
  """None if the CPU kernels are usable in this process, else why not."""
  return load()


def main(argv=None) -> int:
  """``python -m attnjax.cpu.build``: build (or find) the library ahead of time; print
  its path and cache key, or the reason and exit 1."""
  del argv
  logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
  reason = load()
  if reason is not None:
    print(f"cpu_flash kernel unavailable: {reason}", file=sys.stderr)
    return 1
  path, key, _ = _build()
  print(f"path: {path}")
  print(f"key: {key}")
  print(f"simd lanes: {simd_width()}, amx: {has_amx()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
