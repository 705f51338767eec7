"""The TPU kernels under the TPU-semantics interpreter (`pltpu.InterpretParams`).

Plain interpret mode runs a kernel's body as ordinary JAX; the TPU-semantics interpreter
also simulates what Mosaic guarantees and what it does not: buffers start filled with NaN
(`uninitialized_memory='nan'`: a kernel reading scratch or an output block before
writing it gives NaN, which the comparisons below catch), every DMA and memory access is
checked for races between the simulated cores (`detect_races=True`,
`num_cores_or_threads=2`), and out-of-bounds reads raise. Each kernel (flash forward and
its backward kernels, split-S decode, paged decode, the lightning chunk kernels) runs on
small shapes against the reference, forward and backward with random cotangents, and no race may be
reported. The plain interpret tests (test_kernels_*.py) stay: they cover far more cases.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, assert_kernel_close, run_kernel_pair
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as _ipc
from jax.experimental.pallas import tpu as pltpu

from attnjax import masks
from attnjax.kernels import linear_common
from attnjax.kernels.tpu import flash as tpu_flash
from attnjax.kernels.tpu import linear as tpu_linear

PARAMS = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan",
                               num_cores_or_threads=2)


@pytest.fixture
def race_states(monkeypatch):
  """Every race-detection state the interpreter creates during the test (one per kernel)."""
  states = []
  base = _ipc.RaceDetectionState

  class Recorded(base):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      states.append(self)

  monkeypatch.setattr(_ipc, "RaceDetectionState", Recorded)
  yield states
  pltpu.reset_tpu_interpret_mode_state()


def _no_races(states, kernels_at_least):
  assert len(states) >= kernels_at_least, (kernels_at_least, len(states))
  raced = [i for i, s in enumerate(states) if s.races_found]
  assert not raced, f"races reported in kernels {raced}"


@pytest.mark.parametrize("dtype", [jnp.float32,
                                   pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
def test_flash_forward_backward_causal_gqa(race_states, dtype):
  """Causal, GQA (N=4, K=2), ragged S (not a multiple of the 128-key tile): forward and
  the dq / dk,dv kernels, one of them skipping empty tiles."""
  shapes = (1, 136, 136, 4, 2, 64, 64)
  bs = tpu_flash.BlockSizes(block_q=64, block_k=128, num_splits=1)
  got, want = run_kernel_pair("tpu", dtype, shapes, seed=3, block_sizes=bs, interpret=PARAMS,
                              make_kwargs=lambda: dict(mask=masks.causal()))
  assert_kernel_close(got, want, dtype)
  _no_races(race_states, 3)


def test_flash_sliding_window_segments_sinks(race_states):
  """A band mask with segment ids and sinks (a gradient for the sinks too)."""
  shapes = (2, 64, 256, 2, 2, 64, 32)
  rng = np.random.default_rng(5)
  seg_q = np.repeat(np.arange(2), 32)[None].repeat(2, 0).astype(np.int32)
  seg_k = np.repeat(np.arange(2), 128)[None].repeat(2, 0).astype(np.int32)
  sinks = rng.standard_normal(2).astype(np.float32)
  bs = tpu_flash.BlockSizes(block_q=32, block_k=128, num_splits=1)
  got, want = run_kernel_pair(
      "tpu", jnp.float32, shapes, seed=4, diff=(sinks,), block_sizes=bs, interpret=PARAMS,
      make_kwargs=lambda s: dict(mask=masks.sliding_window(160, 0, offset=192), sinks=s,
                                 q_segment_ids=jnp.asarray(seg_q),
                                 kv_segment_ids=jnp.asarray(seg_k)))
  assert_kernel_close(got, want, jnp.float32)
  _no_races(race_states, 3)


def test_key_interval_and_key_bias(race_states):
  """Per-key row intervals (masks.key_interval, per head, GQA) and a per-key bias with
  its gradient: the [G, block_k] key inputs and the dk/dv kernel's bias-gradient output
  (zeroed on each key block's first step, accumulated in place)."""
  shapes = (1, 64, 256, 4, 2, 32, 32)
  rng = np.random.default_rng(7)
  start = rng.integers(-4, 64, (1, 4, 256))
  end = start + rng.integers(-3, 64, (1, 4, 256))
  kb = rng.standard_normal((1, 4, 1, 256)).astype(np.float32)
  bs = tpu_flash.BlockSizes(block_q=32, block_k=128, num_splits=1)
  got, want = run_kernel_pair(
      "tpu", jnp.float32, shapes, seed=8, diff=(kb,), block_sizes=bs, interpret=PARAMS,
      make_kwargs=lambda b: dict(mask=masks.key_interval(jnp.asarray(start),
                                                         jnp.asarray(end)), bias=b))
  assert_kernel_close(got, want, jnp.float32)
  _no_races(race_states, 3)


def test_split_s_decode(race_states):
  """T=1 against a 640-key cache dealt into 3 splits (flash-decoding), causal offset."""
  S = 640
  shapes = (2, 1, S, 4, 1, 64, 64)
  bs = tpu_flash.BlockSizes(block_k=128, num_splits=3)
  got, want = run_kernel_pair("tpu", jnp.float32, shapes, seed=6, block_sizes=bs,
                              interpret=PARAMS,
                              make_kwargs=lambda: dict(mask=masks.causal(offset=S - 1)))
  assert_kernel_close(got, want, jnp.float32)
  _no_races(race_states, 3)


def test_paged_decode(race_states):
  """The paged forward kernel (K/V pages through the scalar-prefetched page table, 2
  splits) and the backward kernels on the gathered pages (test_kernels_paged.py)."""
  from test_kernels_paged import _assert_close, _pair
  got, want = _pair("tpu", jnp.float32, 1, num_splits=2, seed=9, interpret=PARAMS)
  _assert_close(got, want, jnp.float32)
  _no_races(race_states, 3)


def test_lightning_chunk_kernels(race_states):
  """The decayed linear-attention chunk kernels (forward, dq, dk/dv), GQA, ragged T."""
  rng = np.random.default_rng(7)
  B, T, N, K, F, V = 1, 40, 2, 1, 16, 16
  q = jnp.asarray(rng.standard_normal((B, T, N, F)), jnp.float32) * 0.5
  k = jnp.asarray(rng.standard_normal((B, T, K, F)), jnp.float32) * 0.5
  v = jnp.asarray(rng.standard_normal((B, T, K, V)), jnp.float32)
  ld = jnp.asarray(-rng.uniform(0.05, 0.5, N), jnp.float32)
  ct = jnp.asarray(rng.standard_normal((B, T, N, V)), jnp.float32)

  def run(f):
    out, vjp = jax.vjp(f, q, k, v, ld)
    return out, vjp(ct)

  got = run(lambda *a: tpu_linear.lightning_attention(*a, chunk_size=16, interpret=PARAMS))
  want = run(linear_common.lightning_attention_reference)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5)
  _no_races(race_states, 2)


def test_interpret_argument_is_checked():
  q = jnp.ones((1, 8, 1, 8))
  with pytest.raises(TypeError, match="interpret must be None, a bool or an instance of Interp"):
    tpu_flash.flash_attention(q, q, q, interpret="yes")


@pytest.mark.slow
def test_moba_data_dependent_block_lists(race_states, monkeypatch):
  """MoBA (tests/test_routing.py): a routed, traced tile table, so every kernel's grid has
  a dynamic step bound and the selection is read per tile; forward and jax.vjp against the
  explicit-loop MoBA reference, no race, no uninitialised read."""
  from test_routing import (
    _check_grads,
    _moba_inputs,
    moba_allowed_ref,
    softmax_ref_jnp,
    softmax_ref_np,
  )

  from attnjax.core import hooks
  from attnjax.ops import routing
  q, k, v = _moba_inputs(100, jnp.float32, B=1, T=256, N=2, K=1, H=16, Hv=16)
  bsz = tpu_flash.BlockSizes(block_q=64, block_k=128, num_splits=1)

  def att(q, k, v, *, implementation=None, block_sizes=None, **kw):
    del implementation, block_sizes
    return tpu_flash.flash_attention(q, k, v, block_sizes=bsz, interpret=PARAMS, **kw)
  monkeypatch.setattr(hooks, "_ATTENTION", [att])
  f = lambda q, k, v: routing.moba_attention(q, k, v, block_size=128, top_k=2,
                                             block_sizes=bsz)
  allowed = moba_allowed_ref(q, k, 128, 2, causal=True)
  assert_close(f(q, k, v), softmax_ref_np(q, k, v, allowed), jnp.float32, "moba fwd")
  _check_grads(f, lambda q, k, v: softmax_ref_jnp(q, k, v, allowed), (q, k, v), jnp.float32,
               101, "moba")
  _no_races(race_states, 3)
