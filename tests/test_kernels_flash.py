"""Block-sparse flash-attention kernels (TPU Mosaic, GPU Triton), verified on CPU.

Two ways, for both backends: (1) interpret mode against ``reference_attention``,
forward and backward (``jax.vjp`` with random cotangents, including the ``lse``
output); (2) lowering with ``jax.export`` for ``tpu`` and ``cuda`` of forward + grad.

Default suite: a few feature-packed interpret cases per backend and lowering of the
main mask families; ``-m slow`` adds the bf16 sweep, more hypothesis examples and
lowering of every mask family.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import BACKENDS, SUM_TOL, TOL  # noqa: F401  (shared with the decode tests)
from helpers import assert_kernel_close as _assert_close
from helpers import export_for as _export
from helpers import kernel_module as _mod
from helpers import kernel_rand as _rand
from helpers import run_kernel_pair as _run_pair
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnjax
from attnjax import masks, score_mods
from attnjax.core import plan as plan_lib
from attnjax.ops import chunked as chunked_lib
from attnjax.ops.dense import reference_attention

# =============================================================================== numerics


@pytest.mark.parametrize("backend", BACKENDS)
def test_gqa_causal_sinks_softcap_ragged(backend):
  """GQA (N=4, K=2), T != S both ragged, causal with offset, sinks (grad), softcap."""
  sinks = np.random.default_rng(1).standard_normal(4).astype(np.float32)
  got, want = _run_pair(
      backend, jnp.float32, (1, 40, 200, 4, 2, 64, 64), diff=(sinks,),
      make_kwargs=lambda s: dict(mask=masks.causal(offset=160) & masks.sliding_window(100),
                                 sinks=s, softcap=5.0))
  _assert_close(got, want, jnp.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_segments_bias_grad_empty_rows(backend):
  """Segment ids with padding (-1 ids never match the kv pad), full bias with grads,
  MQA (K=1) and rows with no allowed key (causal offset < 0): 0 output, -inf lse."""
  rng = np.random.default_rng(2)
  ids = np.repeat(np.arange(4), 16)[None].repeat(2, 0)
  ids[1, -10:] = 7
  kv_ids = ids.copy()
  kv_ids[1, -10:] = 8            # the last 10 queries of batch 1 see no key
  bias = rng.standard_normal((1, 2, 64, 64)).astype(np.float32)
  got, want = _run_pair(
      backend, jnp.float32, (2, 64, 64, 2, 1, 64, 64), diff=(bias,),
      make_kwargs=lambda b: dict(q_segment_ids=jnp.asarray(ids),
                                 kv_segment_ids=jnp.asarray(kv_ids), bias=b,
                                 mask=masks.causal(offset=-3)))
  _assert_close(got, want, jnp.float32)
  (out, lse), _ = got
  assert np.all(np.asarray(out)[1, -10:] == 0)
  assert np.all(np.isneginf(np.asarray(lse)[1, :, -10:]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_neighborhood2d_relpos2d_table_alibi_grads(backend):
  """2D neighborhood mask (in-kernel predicate with // and %), a learnable 2D
  relative-position table (in-kernel lookup + table gradient) composed with ALiBi."""
  rng = np.random.default_rng(3)
  table = rng.standard_normal((4, 15 * 15)).astype(np.float32)
  slopes = score_mods.alibi_slopes(4)
  got, want = _run_pair(
      backend, jnp.float32, (1, 64, 64, 4, 2, 64, 64), diff=(table,),
      make_kwargs=lambda t: dict(
          mask=masks.neighborhood((8, 8), 3),
          score_mod=score_mods.compose(score_mods.relative_position_bias(t, shape=(8, 8)),
                                       score_mods.alibi(slopes))))
  _assert_close(got, want, jnp.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_fallback_dual_triangle_broadcast_bias(backend):
  """A data-dependent array mask (materialised) & dual_triangle (head-dependent
  predicate), bias broadcast over heads and queries ([B, 1, 1, S]) with grads."""
  rng = np.random.default_rng(4)
  arr = jnp.asarray(rng.random((48, 64)) > 0.3)
  bias = rng.standard_normal((2, 1, 1, 64)).astype(np.float32)
  got, want = _run_pair(
      backend, jnp.float32, (2, 48, 64, 4, 4, 64, 64), diff=(bias,),
      make_kwargs=lambda b: dict(mask=masks.dual_triangle() & masks.from_array(arr), bias=b))
  _assert_close(got, want, jnp.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_routing_block_mask_bf16(backend):
  """Per-call block lists (masks.from_block_mask with JAX arrays, matching tiles) in bf16."""
  bq, bk = (16, 128) if backend == "tpu" else (16, 64)
  S = 2 * bk
  rng = np.random.default_rng(5)
  bm = jnp.asarray(rng.random((2, 1, 2, 2)) > 0.4)
  Mod = _mod(backend)
  got, want = _run_pair(
      backend, jnp.bfloat16, (2, 32, S, 2, 1, 64, 64),
      make_kwargs=lambda: dict(mask=masks.from_block_mask(bm, bq, bk)),
      block_sizes=Mod.BlockSizes(block_q=bq, block_k=bk))
  _assert_close(got, want, jnp.bfloat16)


def _key_intervals(rng, B, N, T, S):
  start = rng.integers(-4, T, (B, N, S))
  return jnp.asarray(start), jnp.asarray(start + rng.integers(-3, T, (B, N, S)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_interval_and_key_bias(backend):
  """masks.key_interval (row i sees key j iff start_j <= i < end_j, per batch and query
  head, some intervals empty or clipped) & causal, and a per-key bias ``[B, N, 1, S]``
  with grads; GQA, T and S ragged: the kernels read both per key tile."""
  rng = np.random.default_rng(11)
  B, T, S, N = 2, 40, 200, 4
  start, end = _key_intervals(rng, B, N, T, S)
  kb = rng.standard_normal((B, N, 1, S)).astype(np.float32)
  got, want = _run_pair(
      backend, jnp.float32, (B, T, S, N, 2, 64, 64), diff=(kb,),
      make_kwargs=lambda b: dict(mask=masks.key_interval(start, end) & masks.causal(160),
                                 bias=b))
  _assert_close(got, want, jnp.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_interval_program_has_no_ts_array(backend):
  """Forward + vjp with a key interval mask and a per-key bias (shared by the batch, so
  its gradient is summed): no array in the program has ``T * S`` elements (the mask and
  the bias would, broadcast), and the result matches the reference."""
  rng = np.random.default_rng(12)
  B, T, S, N, H = 2, 64, 256, 2, 16
  start, end = _key_intervals(rng, B, N, T, S)
  kb = rng.standard_normal((1, N, 1, S)).astype(np.float32)
  bs = _mod(backend).BlockSizes(block_q=32, block_k=128 if backend == "tpu" else 64)
  got, want = _run_pair(backend, jnp.float32, (B, T, S, N, 1, H, H), diff=(kb,),
                        make_kwargs=lambda b: dict(mask=masks.key_interval(start, end),
                                                   bias=b), block_sizes=bs)
  _assert_close(got, want, jnp.float32)
  q = jnp.ones((B, T, N, H))
  k = jnp.ones((B, S, 1, H))

  def f(q, k, kb):
    out, vjp = jax.vjp(lambda q, k, kb: _mod(backend).flash_attention(
        q, k, k, mask=masks.key_interval(start, end), bias=kb, block_sizes=bs,
        interpret=True), q, k, jnp.asarray(kb))
    return vjp(out)
  text = jax.jit(f).lower(q, k, kb).as_text()
  sizes = [int(np.prod([int(d) for d in m.split("x")[:-1]]))
           for m in re.findall(r"tensor<((?:\d+x)+)[a-z]", text)]
  assert max(sizes) < T * S, max(sizes)


_FAMILIES = {
    "causal": lambda: masks.causal(),
    "sliding": lambda: masks.sliding_window(20, 5),
    "chunked_causal": lambda: masks.chunked(32) & masks.causal(),
    "prefix": lambda: masks.prefix_lm(20),
    "dual": lambda: masks.dual_triangle(),
    "nbhd": lambda: masks.neighborhood((8, 8), 3, dilation=2),
    "window_shift": lambda: masks.window((8, 8), 4, shift=2),
    "grid": lambda: masks.grid((8, 8), 2),
    "criss": lambda: masks.criss_cross((8, 8)),
    "not_causal": lambda: ~masks.causal(),
}


@settings(max_examples=2, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_hypothesis_shapes_and_masks(data):
  _hypothesis_case(data)


@pytest.mark.slow
@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_hypothesis_shapes_and_masks_slow(data):
  _hypothesis_case(data)


def _hypothesis_case(data):
  backend = data.draw(st.sampled_from(BACKENDS))
  fam = data.draw(st.sampled_from(sorted(_FAMILIES)))
  dtype = data.draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
  K = data.draw(st.sampled_from([1, 2]))
  G = data.draw(st.sampled_from([1, 2]))
  use_sinks = data.draw(st.booleans())
  softcap = data.draw(st.sampled_from([None, 4.0]))
  seed = data.draw(st.integers(0, 1000))
  B = data.draw(st.sampled_from([1, 2]))
  T = S = 64
  if fam in ("causal", "sliding", "prefix", "dual", "not_causal", "chunked_causal"):
    T = data.draw(st.sampled_from([24, 64, 72]))
    S = T if fam in ("prefix", "dual") else data.draw(st.sampled_from([T, 130]))
  N = K * G
  sinks = np.random.default_rng(seed).standard_normal(N).astype(np.float32)
  mask = _FAMILIES[fam]()

  def mk(*ex):
    kw = dict(mask=mask, softcap=softcap)
    if use_sinks:
      kw["sinks"] = ex[0]
    return kw

  got, want = _run_pair(backend, dtype, (B, T, S, N, K, 64, 64), seed=seed,
                        diff=(sinks,) if use_sinks else (), make_kwargs=mk)
  _assert_close(got, want, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H", [128, 96])
def test_head_dims_bf16_slow(backend, H):
  got, want = _run_pair(backend, jnp.bfloat16, (1, 64, 128, 4, 1, H, H),
                        make_kwargs=lambda: dict(mask=masks.causal(offset=64)))
  _assert_close(got, want, jnp.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dispatcher_runs_kernel_and_falls_back(backend):
  rng = np.random.default_rng(6)
  q, k, v = (_rand(rng, (1, 32, 2, 64)) for _ in range(3))
  impl = f"pallas_{backend}"
  out = jax.jit(lambda q, k, v: attnjax.attention(q, k, v, mask=masks.causal(),
                                                  implementation=impl))(q, k, v)
  np.testing.assert_allclose(out, reference_attention(q, k, v, mask=masks.causal()),
                             **TOL[jnp.float32])
  # block_sizes of another implementation: the kernel declines, xla_chunked serves.
  with pytest.raises(NotImplementedError, match="BlockSizes"):
    _mod(backend).flash_attention(q, k, v, block_sizes=chunked_lib.ChunkedBlockSizes(16, 16))
  out2 = attnjax.attention(q, k, v, implementation=(impl, "xla_chunked"),
                           block_sizes=chunked_lib.ChunkedBlockSizes(16, 16))
  np.testing.assert_allclose(out2, reference_attention(q, k, v), **TOL[jnp.float32])


# =============================================================================== validation


def test_block_sizes_validation():
  from attnjax.kernels.gpu import BlockSizes as GB
  from attnjax.kernels.tpu import BlockSizes as TB
  with pytest.raises(ValueError, match="block_q must be a positive multiple of 8"):
    TB(block_q=12)
  with pytest.raises(ValueError, match="block_k must be a positive multiple of 128"):
    TB(block_k=100)
  with pytest.raises(ValueError, match="block_q must be a power of two >= 16"):
    GB(block_q=48)
  with pytest.raises(ValueError, match="block_k must be a power of two >= 16"):
    GB(block_k=8)
  with pytest.raises(ValueError, match="num_warps"):
    GB(num_warps=3)
  assert TB.get_default().resolve(40, 200) == (40, 128)
  assert GB.get_default().resolve(40, 200) == (64, 64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
  f = _mod(backend).flash_attention
  q = jnp.ones((1, 16, 4, 64))
  k = jnp.ones((1, 16, 3, 64))
  with pytest.raises(ValueError, match="multiple of the number of kv heads"):
    f(q, k, k)
  with pytest.raises(ValueError, match="rank 4"):
    f(q[0], q, q)
  with pytest.raises(ValueError, match="sinks must have shape"):
    f(q, q, q, sinks=jnp.ones(3))
  with pytest.raises(TypeError, match="return_lse"):
    f(q, q, q, return_lse=1)


# =============================================================================== grid steps


def _brute_nonempty(mask, T, S, bq, bk, N=1, B=1, G=1, K=1):
  arr = np.asarray(mask.to_array(T, S, num_heads=N, batch=B))       # [B, N, T, S]
  nq, nk = -(-T // bq), -(-S // bk)
  pad = np.zeros((B, N, nq * bq, nk * bk), bool)
  pad[:, :, :T, :S] = arr
  tiles = pad.reshape(B, K, G, nq, bq, nk, bk).any(axis=(2, 4, 6))  # [B, K, nq, nk]
  empty_rows = int((~tiles.any(axis=-1)).sum())
  empty_cols = int((~tiles.any(axis=-2)).sum())
  return int(tiles.sum()), empty_rows, empty_cols


@pytest.mark.parametrize("name,mask,T", [
    ("causal", masks.causal(), 512),
    ("sliding", masks.sliding_window(100), 512),
    ("nbhd2d", masks.neighborhood((16, 16), 5), 256),
    ("document", masks.document(np.repeat(np.arange(5), 52)[None, :256]), 256),
])
def test_grid_steps_equal_nonempty_tiles(name, mask, T):
  """TPU: the compacted grid has one step per non-empty tile (plus one idle step per
  q block / k block that has none); GPU: the per-program lists hold the same tiles."""
  from attnjax.kernels.gpu import grid_steps as gpu_steps
  from attnjax.kernels.tpu import BlockSizes, grid_steps
  q = jnp.zeros((1, T, 2, 64))
  k = jnp.zeros((1, T, 1, 64))
  nonempty, empty_rows, empty_cols = _brute_nonempty(mask, T, T, 32, 128, N=2, G=2)
  info = grid_steps(q, k, k, mask=mask, block_sizes=BlockSizes(block_q=32, block_k=128))
  assert info["fwd_active"] == nonempty
  assert info["fwd_steps"] == nonempty + empty_rows
  assert info["dkv_active"] == nonempty
  assert info["dkv_steps"] == nonempty + empty_cols
  total = -(-T // 32) * -(-T // 128)
  if name != "document":
    assert nonempty < total          # the mask really is sparse at this tiling
  from attnjax.kernels.gpu import BlockSizes as GB
  ginfo = gpu_steps(q, k, k, mask=mask, block_sizes=GB(block_q=32, block_k=64))
  g_nonempty, _, _ = _brute_nonempty(mask, T, T, 32, 64, N=2, G=1, K=2)
  assert ginfo["fwd_active"] == g_nonempty


def test_step_schedule_data_dependent_matches_static():
  rng = np.random.default_rng(7)
  table = rng.integers(0, 3, size=(2, 1, 5, 4)).astype(np.int8)
  table[0, 0, 2] = 0                     # a q block with no tile
  r_np = plan_lib.step_schedule(table)
  r_j = jax.jit(lambda t: plan_lib.step_schedule(t)[:3])(jnp.asarray(table))
  L = r_np[3]
  for a_np, a_j in zip(r_np[:3], r_j):
    a_j = np.asarray(a_j).reshape(2, -1)[:, :L]
    np.testing.assert_array_equal(a_np.reshape(2, L), a_j)
  flags = r_np[2]
  assert int((flags & 1).sum()) == int((table != 0).sum()) == r_np[4]


# =============================================================================== lowering


def _lower_case(platform, dtype=jnp.bfloat16, T=64, S=64, N=4, K=2, H=64, with_table=False,
                **kw):
  backend = "tpu" if platform == "tpu" else "gpu"
  f = _mod(backend).flash_attention
  rng = np.random.default_rng(0)
  q = _rand(rng, (2, T, N, H), dtype)
  k = _rand(rng, (2, S, K, H), dtype)
  v = _rand(rng, (2, S, K, H), dtype)
  table = _rand(rng, (N, 2 * 15 + 1))

  def fwd(q, k, v, table):
    extra = dict(score_mod=score_mods.relative_position_bias(table)) if with_table else {}
    return f(q, k, v, interpret=False, **kw, **extra)

  def loss(q, k, v, table):
    return jnp.sum(fwd(q, k, v, table).astype(jnp.float32))

  exp_f = _export(platform, fwd, q, k, v, table)
  exp_g = _export(platform, jax.grad(loss, argnums=(0, 1, 2, 3)), q, k, v, table)
  text = exp_g.mlir_module()
  if platform == "tpu":
    assert "tpu_custom_call" in text
  else:
    assert "triton" in text
  return exp_f, exp_g


PLATFORMS = ("tpu", "cuda")


@pytest.mark.parametrize("platform", PLATFORMS)
def test_lowering_kitchen_sink(platform):
  """GQA, segment ids, softcap, sinks, bias, a learnable score_mod table, and a
  composed static mask, forward and grad, bf16."""
  ids = jnp.asarray(np.repeat(np.arange(2), 32)[None].repeat(2, 0))
  _lower_case(platform, with_table=True, mask=masks.causal() & masks.sliding_window(40),
              q_segment_ids=ids, softcap=20.0, sinks=jnp.ones(4), bias=jnp.ones((1, 4, 64, 64)))


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("fam", ["nbhd", "document", "dense", "block_mask"])
def test_lowering_mask_families(platform, fam):
  _lower_case(platform, **_lowering_mask_kwargs(platform, fam))


@pytest.mark.parametrize("platform", PLATFORMS)
def test_lowering_key_interval_key_bias(platform):
  """A key interval mask and a per-key bias, forward and grad (q, k, v and the bias)."""
  backend = "tpu" if platform == "tpu" else "gpu"
  f = _mod(backend).flash_attention
  rng = np.random.default_rng(13)
  q = _rand(rng, (2, 64, 4, 64), jnp.bfloat16)
  k = _rand(rng, (2, 256, 2, 64), jnp.bfloat16)
  kb = _rand(rng, (2, 4, 1, 256))
  start, end = _key_intervals(rng, 2, 4, 64, 256)

  def loss(q, k, kb):
    out = f(q, k, k, mask=masks.key_interval(start, end), bias=kb, interpret=False)
    return jnp.sum(out.astype(jnp.float32))
  _export(platform, lambda q, k, kb: f(q, k, k, mask=masks.key_interval(start, end), bias=kb,
                                       interpret=False), q, k, kb)
  text = _export(platform, jax.grad(loss, argnums=(0, 1, 2)), q, k, kb).mlir_module()
  assert ("tpu_custom_call" if platform == "tpu" else "triton") in text


@pytest.mark.parametrize("platform", PLATFORMS)
def test_lowering_decode(platform):
  """Decode shapes: one query per sequence against a long cache (GQA, causal offset)."""
  _lower_case(platform, T=1, S=1024, N=8, K=2, mask=masks.causal(offset=1023))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_matches_reference_slow(backend):
  got, want = _run_pair(backend, jnp.float32, (2, 1, 300, 8, 2, 64, 64),
                        make_kwargs=lambda: dict(mask=masks.causal(offset=250)))
  _assert_close(got, want, jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", BACKENDS)
def test_benchmark_smoke_slow(kernel):
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "attention_gpu_tpu.py"
  spec = importlib.util.spec_from_file_location("attention_gpu_tpu", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  rows = bench.main(["--smoke", "--kernel", kernel])
  checks = [r for r in rows if r["impl"] == "check"]
  assert len(checks) == 3 and all(r["max_abs_err"] < 2e-5 for r in checks)


@pytest.mark.slow
@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("fam", sorted(_FAMILIES) + ["full", "axial", "from_fn", "f32"])
def test_lowering_all_mask_families_slow(platform, fam):
  kw = _lowering_mask_kwargs(platform, fam)
  _lower_case(platform, **kw)


def _lowering_mask_kwargs(platform, fam):
  if fam in _FAMILIES:
    return dict(mask=_FAMILIES[fam]())
  if fam == "full":
    return dict(mask=masks.full())
  if fam == "axial":
    return dict(mask=masks.axial((8, 8), 1))
  if fam == "from_fn":
    return dict(mask=masks.from_fn(lambda b, h, q, kv: (q + kv + h) % 3 != 0))
  if fam == "f32":
    return dict(mask=masks.causal(), dtype=jnp.float32, K=1, sinks=jnp.ones(4))
  if fam == "document":
    return dict(mask=masks.document(jnp.asarray(np.repeat(np.arange(4), 16)[None].repeat(2, 0))))
  if fam == "dense":
    return dict(mask=masks.from_array(jnp.asarray(np.tri(64, dtype=bool))))
  if fam == "block_mask":
    bq, bk = (16, 128) if platform == "tpu" else (16, 64)
    blocks = jnp.asarray(np.random.default_rng(0).random((2, 4, 4, 2)) > 0.5)
    mod = _mod("tpu" if platform == "tpu" else "gpu")
    return dict(mask=masks.from_block_mask(blocks, bq, bk), S=2 * bk,
                block_sizes=mod.BlockSizes(block_q=bq, block_k=bk))
  raise KeyError(fam)
