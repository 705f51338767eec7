"""Shared pytest configuration: deterministic hypothesis profiles, tolerances."""

import os

import hypothesis

# The suite is compile-bound (tiny shapes, a few thousand jit compilations), so it asks
# XLA's CPU backend for its cheaper compiler settings:
# - LLVM optimisation level 0 (about twice as fast to compile as XLA's default 3);
# - the classic fusion code generator instead of the MLIR fusion emitters
#   (`--xla_cpu_use_fusion_emitters=false`, measured 2026-12-07: a 4-file subset of the
#   suite 214 s -> 121 s on two workers; a tiny jit 47 -> 32 ms at level 0).
# The programs mean the same (no fast-math in either setting); float results may differ
# in the last bits (e.g. where level 3 contracts a multiply and an add into an FMA, or a
# code generator orders a reduction differently), well inside the tolerances below.
# ATTNJAX_TEST_XLA_OPT=3 and ATTNJAX_TEST_XLA_FUSION_EMITTERS=true give XLA's defaults,
# the settings users run (the suite passes with them too; docs/testing-masks.md).
# Subprocesses inherit the flags through os.environ: append to XLA_FLAGS there, do not
# replace it.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""),
     f"--xla_backend_optimization_level={os.environ.get('ATTNJAX_TEST_XLA_OPT', '0')}",
     "--xla_cpu_use_fusion_emitters="
     f"{os.environ.get('ATTNJAX_TEST_XLA_FUSION_EMITTERS', 'false')}"]).strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def xla_flags(*extra: str) -> str:
  """XLA_FLAGS for a subprocess: this process's flags plus `extra`."""
  return " ".join([os.environ["XLA_FLAGS"], *extra])


# Shared test bases run one @given method from several subclasses (one per
# implementation): that is intended, hence differing_executors.
_SUPPRESS = [hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.data_too_large,
             hypothesis.HealthCheck.differing_executors]

# Reproducible property tests: the same examples on every run (no per-run seeds).
hypothesis.settings.register_profile(
    "default", derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=_SUPPRESS)
hypothesis.settings.register_profile(
    "slow", derandomize=True, deadline=None, max_examples=200,
    suppress_health_check=_SUPPRESS)
hypothesis.settings.load_profile(os.environ.get("ATTNJAX_HYPOTHESIS_PROFILE", "default"))

# Per-dtype tolerances (atol, rtol) used across the suite.
TOLERANCES = {
    np.dtype("float32"): dict(atol=1e-5, rtol=1e-5),
    np.dtype(jax.numpy.bfloat16): dict(atol=2e-2, rtol=2e-2),
}


@pytest.fixture
def tol():
  return lambda dtype: TOLERANCES[np.dtype(dtype)]


def examples(default: int) -> int:
  """Hypothesis example count: `default` normally, 25x more under the slow profile."""
  if os.environ.get("ATTNJAX_HYPOTHESIS_PROFILE") == "slow":
    return default * 25
  return default
