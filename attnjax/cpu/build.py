"""Compiles the C++ CPU kernels on first use and registers them with XLA.

The shared library is built with the system C++ compiler (``$CXX``, else ``c++`` /
``g++``) for the running machine (``-march=native``) against the XLA FFI headers
that ship with jaxlib, and cached under ``$ATTNJAX_CACHE_DIR`` (default
``$XDG_CACHE_HOME/attnjax`` or ``~/.cache/attnjax``) keyed by a hash of the source,
flags, compiler and jaxlib version.  Concurrent builds write to temporary names and
rename atomically, so parallel test workers are safe.

Set ``ATTNJAX_CPU_KERNELS=0`` to disable the kernels (``'auto'`` then uses the XLA
paths).  :func:`unavailable_reason` says why the kernels cannot be used here.

``ATTNJAX_CPU_EMULATE_AVX512=1`` (for tests) builds the kernels' AVX-512 and AMX code
paths with every AVX-512 and AMX intrinsic emulated (``avx512_emulation.h``), so that
the 16-lane build and the bf16 tile paths run, about 10x slower, on a CPU with only
AVX2.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

__all__ = ["load", "unavailable_reason", "cache_dir", "has_amx", "simd_width",
           "emulating_avx512"]

_SOURCE = Path(__file__).with_name("flash_cpu.cc")
_EMULATION_HEADER = Path(__file__).with_name("avx512_emulation.h")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno",
          "-w")
# FFI handler symbols in the library -> XLA custom-call target names.
TARGETS = {"AttnjaxFlashFwd": "attnjax_flash_fwd", "AttnjaxFlashBwd": "attnjax_flash_bwd"}


def cache_dir() -> Path:
  root = os.environ.get("ATTNJAX_CACHE_DIR")
  if root:
    return Path(root)
  xdg = os.environ.get("XDG_CACHE_HOME")
  return (Path(xdg) if xdg else Path.home() / ".cache") / "attnjax"


def _compiler():
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


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


def emulating_avx512() -> bool:
  """True when ATTNJAX_CPU_EMULATE_AVX512 asks for the emulated AVX-512 build (tests)."""
  value = os.environ.get("ATTNJAX_CPU_EMULATE_AVX512", "0").strip().lower()
  return value not in ("", "0", "false", "no", "off")


@functools.lru_cache(maxsize=None)
def _build() -> tuple[str | None, str | None]:
  """(path of the compiled library, None) or (None, why not)."""
  if os.environ.get("ATTNJAX_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
    return None, "disabled by ATTNJAX_CPU_KERNELS"
  if _cpu_simd_width() is None:
    return None, "needs an x86-64 CPU with AVX2 and FMA, or AVX-512F/DQ (Linux /proc/cpuinfo)"
  cxx = _compiler()
  if cxx is None:
    return None, "no C++ compiler found (set $CXX)"
  include = jax.ffi.include_dir()
  flags = _FLAGS + (("-DATTNJAX_EMULATE_AVX512",) if emulating_avx512() else ())
  try:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                             timeout=60).stdout.splitlines()[:1]
  except (OSError, subprocess.SubprocessError) as e:
    return None, f"cannot run {cxx}: {e}"
  key = hashlib.sha256()
  # -march=native: the machine (host name) is part of the key.
  for part in (_SOURCE.read_bytes(), _EMULATION_HEADER.read_bytes(), " ".join(flags).encode(),
               str(version).encode(), jax.__version__.encode(), platform.node().encode()):
    key.update(part)
  out_dir = cache_dir()
  target = out_dir / f"flash_cpu-{key.hexdigest()[:16]}.so"
  if target.exists():
    return str(target), None
  try:
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    proc = subprocess.run([cxx, *flags, f"-I{include}", str(_SOURCE), "-o", tmp, "-lpthread"],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
      os.unlink(tmp)
      return None, f"compiling {_SOURCE.name} failed:\n{proc.stderr[-2000:]}"
    os.replace(tmp, target)
  except (OSError, subprocess.SubprocessError) as e:
    return None, f"building the CPU kernels failed: {e}"
  return str(target), None


@functools.lru_cache(maxsize=None)
def load() -> str | None:
  """Builds (once) and registers the kernels; returns None on success or the reason
  they are unavailable."""
  path, reason = _build()
  if path is None:
    return reason
  try:
    lib = ctypes.cdll.LoadLibrary(path)
    for symbol, name in TARGETS.items():
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)),
                                  platform="cpu")
    _LIB.append(lib)
  except (OSError, AttributeError) as e:
    return f"loading {path} failed: {e}"
  return None


_LIB: list = []  # the loaded library, once load() succeeded


@functools.lru_cache(maxsize=None)
def has_amx() -> bool:
  """True when the loaded kernels can use AMX tiles (CPU support and the Linux
  permission for the tile state)."""
  return load() is None and bool(_LIB[0].AttnjaxCpuHasAmx())


@functools.lru_cache(maxsize=None)
def simd_width() -> int | None:
  """Float32 lanes of the loaded kernels' vectors: 16 (AVX-512) or 8 (AVX2), as the
  compiler targeted this machine; None when the kernels are unavailable."""
  return int(_LIB[0].AttnjaxCpuLanes()) if load() is None else None


def unavailable_reason() -> str | None:
  """None if the CPU kernels are usable in this process, else why not."""
  return load()
