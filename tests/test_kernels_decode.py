"""Split-S decode (flash-decoding) path of the Pallas flash kernels, verified on CPU.

``BlockSizes(num_splits=P)`` deals each q block's list of non-empty k tiles into ``P``
contiguous parts, one grid program each, and merges the partial results in XLA with
a log-sum-exp combine (the sink joins once, in the merge).  Checked three ways, for
both backends: interpret mode vs ``reference_attention`` (forward, and backward via
``jax.vjp`` with random cotangents on the output and ``lse``); lowering with
``jax.export`` for ``tpu`` and ``cuda``; and grid-program counts against a
brute-force count of non-empty tiles.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Shared with the flash-kernel tests: backends, tolerances and the kernel-vs-reference runner.
from helpers import BACKENDS, run_kernel_pair
from helpers import assert_kernel_close as _assert_close
from helpers import export_for as _export
from helpers import kernel_module as _mod
from helpers import kernel_rand as _rand

from attnjax import masks, score_mods
from attnjax.core import plan as plan_lib
from attnjax.kernels import tile_math

# Keys per tile: small, so a cache of ~1000 keys has 8 (TPU) / 16 (GPU) tiles.
BLOCK_K = {"tpu": 128, "gpu": 64}


def _run_pair(backend, dtype, shapes, *, num_splits, seed=0, diff=(), make_kwargs=None):
  """Kernel (interpret, split) vs reference: ``((out, lse), grads)`` of both."""
  bs = _mod(backend).BlockSizes(block_k=BLOCK_K[backend], num_splits=num_splits)
  return run_kernel_pair(backend, dtype, shapes, seed=seed, diff=diff,
                               make_kwargs=make_kwargs, block_sizes=bs)


# =============================================================================== numerics


CASES = [pytest.param(1, jnp.float32, id="T1-f32"), pytest.param(4, jnp.bfloat16, id="T4-bf16"),
         pytest.param(1, jnp.bfloat16, id="T1-bf16", marks=pytest.mark.slow),
         pytest.param(4, jnp.float32, id="T4-f32", marks=pytest.mark.slow)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,dtype", CASES)
def test_decode_causal_gqa_sinks_ragged(backend, T, dtype):
  """GQA (N=4, K=2), causal with offset S-T against a ragged cache (S=1000, not a
  multiple of the tile), sinks with gradient (counted once, in the merge), 3 splits."""
  S = 1000
  shapes = (2, T, S, 4, 2, 64, 64)
  sinks = np.random.default_rng(1).standard_normal(4).astype(np.float32)
  got, want = _run_pair(backend, dtype, shapes, num_splits=3, diff=(sinks,),
                        make_kwargs=lambda s: dict(mask=masks.causal(offset=S - T), sinks=s))
  _assert_close(got, want, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_per_sequence_lengths_empty_splits(backend):
  """Per-sequence cache lengths from segment ids (a traced tile table), a sliding window
  and softcap, with more splits than some rows have tiles: batch 0 sees the whole
  window, batch 1 a short cache (empty splits), batch 2 no key at all (every split
  empty: 0 output, -inf lse, zero gradients)."""
  B, T, S = 3, 2, 1100
  kv_ids = np.zeros((B, S), np.int32)
  kv_ids[1, 150:] = -1           # batch 1: a 150-key cache
  q_ids = np.zeros((B, T), np.int32)
  q_ids[2] = 5                   # batch 2: matches no key
  shapes = (B, T, S, 4, 1, 64, 32)
  got, want = _run_pair(
      backend, jnp.float32, shapes, num_splits=6, seed=3,
      make_kwargs=lambda: dict(mask=masks.causal(offset=S - T) & masks.sliding_window(700),
                               q_segment_ids=jnp.asarray(q_ids),
                               kv_segment_ids=jnp.asarray(kv_ids), softcap=8.0))
  _assert_close(got, want, jnp.float32)
  (out, lse), grads = got
  assert np.all(np.asarray(out)[2] == 0)
  assert np.all(np.isneginf(np.asarray(lse)[2]))
  assert np.all(np.asarray(grads[0])[2] == 0)          # dq of the masked batch


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias_heads", [4, 1])
def test_decode_bias_relpos_alibi_grads(backend, bias_heads):
  """Bias broadcast over the batch ([1, N, T, S]) or batch and heads ([1, 1, T, S]),
  whose gradient is accumulated in the bias's own shape, and a learnable
  relative-position table composed with ALiBi: dbias and dtable through the split
  forward; a data-dependent array mask (the dense fallback input); 4 splits, T=4, GQA."""
  T, S, N = 4, 1024, 4
  rng = np.random.default_rng(4)
  bias = rng.standard_normal((1, bias_heads, T, S)).astype(np.float32)
  table = rng.standard_normal((N, 2 * 12 + 1)).astype(np.float32)
  keep = jnp.asarray(rng.random((T, S)) > 0.3)
  slopes = score_mods.alibi_slopes(N)
  got, want = _run_pair(
      backend, jnp.float32, (2, T, S, N, 2, 64, 64), num_splits=4, diff=(bias, table),
      make_kwargs=lambda b, t: dict(
          mask=masks.causal(offset=S - T) & masks.from_array(keep), bias=b,
          score_mod=score_mods.compose(score_mods.relative_position_bias(t),
                                       score_mods.alibi(slopes))))
  _assert_close(got, want, jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_splits", [2, 5, 32])
def test_decode_split_counts_slow(backend, num_splits):
  """Long cache (S=2048), MQA, sinks, several split counts (32: most splits empty)."""
  S = 2048
  sinks = np.random.default_rng(2).standard_normal(8).astype(np.float32)
  got, want = _run_pair(backend, jnp.bfloat16, (1, 1, S, 8, 1, 64, 64),
                        num_splits=num_splits, diff=(sinks,),
                        make_kwargs=lambda s: dict(mask=masks.causal(offset=S - 1), sinks=s))
  _assert_close(got, want, jnp.bfloat16)


def test_merge_splits_empty_and_sink():
  """The combine on its own: empty splits weigh 0, all-empty rows give 0 / -inf (or the
  sink), and the result equals a softmax over the concatenated keys."""
  rng = np.random.default_rng(0)
  s = rng.standard_normal((3, 5, 12)).astype(np.float32)      # [rows, splits, keys]
  s[1, 2:] = -np.inf                                          # row 1: splits 2..4 empty
  s[2] = -np.inf                                              # row 2: no key
  vals = rng.standard_normal((12, 7)).astype(np.float32)
  m = np.max(s, -1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0)
  e = np.exp(s - m)
  tot = e.sum(-1)
  lse_p = np.where(tot > 0, m[..., 0] + np.log(np.maximum(tot, 1e-30)), -np.inf)
  o_p = np.einsum("rpk,kd->rpd", e, vals) / np.maximum(e.sum(-1), 1e-30)[..., None]
  o, lse = tile_math.merge_splits(jnp.asarray(o_p), jnp.asarray(lse_p), axis=1)
  flat = s.reshape(3, -1)
  vflat = np.tile(vals, (5, 1))
  for r in range(2):
    p = np.exp(flat[r] - flat[r].max())
    np.testing.assert_allclose(o[r], p @ vflat / p.sum(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse[r], flat[r].max() + np.log(p.sum()), rtol=1e-6)
  assert np.all(np.asarray(o[2]) == 0) and np.isneginf(lse[2])
  sink = jnp.asarray([0.5, -1.0, 2.0])
  o2, lse2 = tile_math.merge_splits(jnp.asarray(o_p), jnp.asarray(lse_p), axis=1, sink=sink)
  assert np.all(np.asarray(o2[2]) == 0) and float(lse2[2]) == 2.0
  np.testing.assert_allclose(lse2[0], np.logaddexp(lse[0], 0.5), rtol=1e-6)
  np.testing.assert_allclose(o2[0], o[0] * np.exp(lse[0] - lse2[0]), rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(np.asarray(o2))) and np.all(np.isfinite(np.asarray(o)))


# =============================================================================== grid programs


def _tile_counts(mask, T, S, bq, bk, N, K, B=1):
  """Brute force: non-empty tiles per (b, kv head | head, q block) from ``mask.to_array``."""
  arr = np.asarray(mask.to_array(T, S, num_heads=N, batch=B))
  arr = np.broadcast_to(arr, (B, N, T, S))
  nq, nk = -(-T // bq), -(-S // bk)
  pad = np.zeros((B, N, nq * bq, nk * bk), bool)
  pad[:, :, :T, :S] = arr
  tiles = pad.reshape(B, K, N // K, nq, bq, nk, bk).any(axis=(2, 4, 6))   # [B, K, nq, nk]
  return tiles.sum(-1)                                                   # [B, K, nq]


def _parts(c, P):
  """Tiles of each of P splits of a list of c, as the kernels deal them (floor bounds)."""
  return [(p + 1) * c // P - p * c // P for p in range(P)]


@pytest.mark.parametrize("name,mask,T", [
    ("causal", masks.causal(offset=2048 - 1), 1),
    ("sliding", masks.causal(offset=2048 - 4) & masks.sliding_window(600), 4),
    ("causal_multi_q", masks.causal(offset=2048 - 64), 64),
])
@pytest.mark.parametrize("P", [1, 3, 4, 7, 24])
def test_tpu_grid_steps_split(name, mask, T, P):
  """TPU: split p of a (batch, kv head) has one step per tile of its part of each q
  block's list (one idle step for an empty part), so active steps = non-empty tiles
  and grid steps = B * K * P * max_p sum_rows max(|part|, 1)."""
  from attnjax.kernels.tpu import BlockSizes, grid_steps
  S, N, K, B, bq = 2048, 4, 2, 2, 16
  q, k = jnp.zeros((B, T, N, 64)), jnp.zeros((B, S, K, 64))
  info = grid_steps(q, k, k, mask=mask, block_sizes=BlockSizes(block_q=bq, block_k=128,
                                                               num_splits=P))
  counts = _tile_counts(mask, T, S, bq, 128, N, K, B)
  assert info["num_splits"] == P
  assert info["fwd_active"] == counts.sum()
  per_split = np.zeros(P, int)                    # every (b, k) has the same rows here
  for c in counts[0, 0]:
    per_split += [max(x, 1) for x in _parts(int(c), P)]
  assert info["fwd_steps"] == B * K * P * per_split.max()
  if P == 1:
    assert info["fwd_steps"] == counts.sum() + int((counts == 0).sum())


@pytest.mark.parametrize("P", [1, 3, 5, 40])
def test_gpu_programs_split(P):
  """GPU: B * N * nq * P programs; program (q block, p) visits its contiguous share of
  the q block's list; the shares sum to the non-empty tiles and differ by at most 1."""
  from attnjax.kernels.gpu import BlockSizes, grid_steps
  S, T, N, K, B = 2048, 4, 4, 2, 2
  mask = masks.causal(offset=S - T) & masks.sliding_window(900)
  q, k = jnp.zeros((B, T, N, 64)), jnp.zeros((B, S, K, 64))
  info = grid_steps(q, k, k, mask=mask, block_sizes=BlockSizes(block_k=64, num_splits=P))
  bq = info["block_q"]
  counts = _tile_counts(mask, T, S, bq, 64, N, K, B)        # [B, K, nq]
  assert info["fwd_programs"] == B * N * counts.shape[-1] * P
  tiles = np.broadcast_to(info["fwd_tiles"], counts.shape + (P,))
  np.testing.assert_array_equal(tiles.sum(-1), counts)
  assert (tiles.max(-1) - tiles.min(-1)).max() <= 1
  assert info["fwd_active"] == counts.sum() * (N // K)
  if P > counts.max():
    assert (tiles == 0).any()                # some splits own no tile


def test_num_splits_heuristic_and_validation():
  from attnjax.kernels import gpu, tpu
  # decode against a long cache: split; long T (many q blocks): no split
  dec = (jnp.zeros((1, 1, 8, 64)), jnp.zeros((1, 8192, 2, 64)))
  pre = (jnp.zeros((1, 4096, 8, 64)), jnp.zeros((1, 4096, 2, 64)))
  for mod in (tpu, gpu):
    q, k = dec
    p_dec = mod.grid_steps(q, k, k, mask=masks.causal(offset=8191))["num_splits"]
    assert p_dec > 1
    q, k = pre
    assert mod.grid_steps(q, k, k, mask=masks.causal())["num_splits"] == 1
    # a short cache: too few tiles per split
    q, k = dec[0], dec[1][:, :256]
    assert mod.grid_steps(q, k, k)["num_splits"] == 1
    # explicit values win
    q, k = pre
    assert mod.grid_steps(q, k, k, block_sizes=mod.BlockSizes(num_splits=3))["num_splits"] == 3
    for bad in (0, -2, 2.5, True, "4"):
      with pytest.raises(ValueError, match="BlockSizes.num_splits must be a positive int"):
        mod.BlockSizes(num_splits=bad)
  assert gpu.grid_steps(*dec, dec[1], mask=masks.causal(offset=8191))["num_splits"] == 32
  assert tpu.grid_steps(*dec, dec[1], mask=masks.causal(offset=8191))["num_splits"] == 2


def test_split_table_traced_matches_static():
  """The dealing of a traced (data-dependent) table equals the static one."""
  rng = np.random.default_rng(7)
  table = rng.integers(0, 3, size=(2, 2, 3, 9)).astype(np.int8)
  table[0, 1, 2] = 0
  for P in (1, 2, 4, 11):
    st = plan_lib.split_table(table, P)
    tr = np.asarray(jax.jit(lambda t, P=P: plan_lib.split_table(t, P))(jnp.asarray(table)))
    np.testing.assert_array_equal(st, tr)
    # every non-empty tile lands in exactly one split, with its class
    back = st.reshape(2, 2, P, 3, 9)
    assert np.all((back != 0).sum(2) == (table != 0))
    np.testing.assert_array_equal(back.max(2), table)
    # the traced schedule's bounded length still covers every split's list
    rows = plan_lib.step_schedule(st)
    r_j = jax.jit(lambda t, P=P: plan_lib.step_schedule(t, max_per_row=-(-9 // P))[:3])(
        jnp.asarray(st))
    L = rows[3]
    for a_np, a_j in zip(rows[:3], r_j):
      a_j = np.asarray(a_j).reshape(2 * 2 * P, -1)
      assert a_j.shape[1] >= L
      np.testing.assert_array_equal(a_np.reshape(-1, L), a_j[:, :L])


# =============================================================================== lowering


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("T", [1, 4])
def test_lowering_decode_split(platform, T):
  """Forward and grad (q, k, v, sinks, bias) of the split decode path lower for the
  hardware backend: GQA, causal with offset & sliding window, sinks, bias, bf16."""
  backend = "tpu" if platform == "tpu" else "gpu"
  mod = _mod(backend)
  B, S, N, K, H = 2, 2048, 8, 2, 64
  rng = np.random.default_rng(0)
  q = _rand(rng, (B, T, N, H), jnp.bfloat16)
  k = _rand(rng, (B, S, K, H), jnp.bfloat16)
  v = _rand(rng, (B, S, K, H), jnp.bfloat16)
  sinks = _rand(rng, (N,))
  bias = _rand(rng, (1, N, T, S))
  mask = masks.causal(offset=S - T) & masks.sliding_window(1500)
  bs = mod.BlockSizes(block_k=BLOCK_K[backend], num_splits=4)

  def fwd(q, k, v, sinks, bias):
    return mod.flash_attention(q, k, v, mask=mask, sinks=sinks, bias=bias, block_sizes=bs,
                               interpret=False)

  def loss(*args):
    return jnp.sum(fwd(*args).astype(jnp.float32))

  args = (q, k, v, sinks, bias)
  exp_f = _export(platform, fwd, *args)
  exp_g = _export(platform, jax.grad(loss, argnums=(0, 1, 2, 3, 4)), *args)
  for e in (exp_f, exp_g):
    text = e.mlir_module()
    assert ("tpu_custom_call" if platform == "tpu" else "triton") in text
    assert "attnjax_flash_fwd_split" in text, "the split kernel was not used"
  assert exp_f.out_avals[0].shape == (B, T, N, H)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_broadcast_bias_grad_buffer_has_bias_shape(platform):
  """The lowered gradient of a bias broadcast over batch and heads holds no dense
  ``[B, N|K, rows, S]`` float32 buffer (present for an unbroadcast bias)."""
  backend = "tpu" if platform == "tpu" else "gpu"
  mod = _mod(backend)
  B, T, S, N, K, H = 2, 4, 1024, 4, 2, 64
  rng = np.random.default_rng(0)
  q = _rand(rng, (B, T, N, H))
  k = _rand(rng, (B, S, K, H))
  bs = mod.BlockSizes(block_k=BLOCK_K[backend], num_splits=2)
  # the dq kernel's dense dbias buffer: TPU [B, K, G * block_q, S]; GPU [B, N, block_q, S]
  dense = (f"tensor<{B}x{K}x{(N // K) * 8}x{S}xf32>" if platform == "tpu"
           else f"tensor<{B}x{N}x16x{S}xf32>")

  def text(bias_shape):
    def loss(bias):
      out = mod.flash_attention(q, k, k, bias=bias, mask=masks.causal(offset=S - T),
                                block_sizes=bs, interpret=False)
      return jnp.sum(out)
    return _export(platform, jax.grad(loss), _rand(rng, bias_shape)).mlir_module()

  assert dense in text((B, N, T, S))
  for shape in ((1, 1, T, S), (1, N, T, S)):
    assert dense not in text(shape), shape
  # [B, 1, T, S]: the bias input is still broadcast over heads (so a dense-shaped f32
  # array exists); the gradient buffer is [B, 1, block_q, S]
  reduced = f"tensor<{B}x1x{8 if platform == 'tpu' else 16}x{S}xf32>"
  assert reduced in text((B, 1, T, S))


# =============================================================================== kv_lengths


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 4])
def test_decode_kv_lengths_per_row(backend, T):
  """A ragged KV cache: ``masks.lengths`` (``attention(kv_lengths=)``) per batch row is
  evaluated in-kernel (a lookup by the program's batch index; no dense mask), tiles past
  each row's length are skipped, and the split path matches the reference forward and
  backward: a full row, a row ending mid-tile, a row with no key (0 output, lse = sink),
  padded queries (``q_lengths``) with zero gradients; GQA, sinks, softcap."""
  B, S = 3, 1000
  kl = jnp.asarray([1000, 130, 0], jnp.int32)
  ql = jnp.asarray([T, max(T - 2, 1), T], jnp.int32)
  sinks = np.random.default_rng(5).standard_normal(4).astype(np.float32)
  mk = lambda s: dict(mask=masks.lengths(ql, kl), sinks=s, softcap=6.0)
  got, want = _run_pair(backend, jnp.float32, (B, T, S, 4, 2, 64, 64), num_splits=3, seed=6,
                        diff=(sinks,), make_kwargs=mk)
  _assert_close(got, want, jnp.float32)
  (out, _), grads = got
  assert np.all(np.asarray(out)[2] == 0)
  if T > 1:
    assert np.all(np.asarray(out)[1, T - 2:] == 0) and np.all(np.asarray(grads[0])[1, T - 2:] == 0)
  # the plan keeps the lengths in-kernel, and counts only tiles below each row's length
  mod = _mod(backend)
  q, k = jnp.zeros((B, T, 4, 64)), jnp.zeros((B, S, 2, 64))
  bk = BLOCK_K[backend]
  info = mod.grid_steps(q, k, k, mask=masks.lengths(kv_lengths=kl),
                        block_sizes=mod.BlockSizes(block_k=bk, num_splits=1))
  tiles = sum(-(-int(n) // bk) for n in kl)
  heads = 2 if backend == "tpu" else 4      # TPU steps per kv head, GPU programs per head
  assert int(info["fwd_active"]) == tiles * heads
  assert plan_lib._kernel_data_only(masks.lengths(ql, kl) & masks.causal(offset=S - T))  # pylint: disable=protected-access
  assert not plan_lib._kernel_data_only(masks.from_array(jnp.ones((T, S), bool)))  # pylint: disable=protected-access


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_lowering_decode_kv_lengths(platform):
  """Forward and grad of the split decode path with per-row ``kv_lengths`` lower for the
  hardware backend with no dense ``[B, 1, T, S]`` mask operand (the lengths are read
  in-kernel)."""
  backend = "tpu" if platform == "tpu" else "gpu"
  mod = _mod(backend)
  B, T, S, N, K, H = 2, 1, 2048, 8, 2, 64
  rng = np.random.default_rng(0)
  q = _rand(rng, (B, T, N, H), jnp.bfloat16)
  k = _rand(rng, (B, S, K, H), jnp.bfloat16)
  kl = jnp.asarray([2048, 300], jnp.int32)
  bs = mod.BlockSizes(block_k=BLOCK_K[backend], num_splits=4)

  def fwd(q, k, v, kl):
    return mod.flash_attention(q, k, v, mask=masks.lengths(kv_lengths=kl), block_sizes=bs,
                               interpret=False)

  def loss(q, k, v, kl):
    return jnp.sum(fwd(q, k, v, kl).astype(jnp.float32))

  for e in (_export(platform, fwd, q, k, k, kl),
            _export(platform, jax.grad(loss, argnums=(0, 1, 2)), q, k, k, kl)):
    text = e.mlir_module()
    assert ("tpu_custom_call" if platform == "tpu" else "triton") in text
    assert "attnjax_flash_fwd_split" in text
    assert f"tensor<{B}x1x{T}x{S}xi1>" not in text, "a dense mask was built"
