"""Paged decode in the Pallas flash kernels: K/V read from page pools through the page table.

``paged_flash_attention(q, k_pages, v_pages, page_table, ...)`` scalar-prefetches the page
table and the K/V index map picks page ``page_table[b, kb]`` for row ``b``'s key block
``kb`` (one page per key block), instead of receiving the gathered contiguous view. The
oracle is :func:`attnjax.reference_attention` on the gathered view (the XLA gather path),
differentiated through the gather (so pool gradients sum over rows sharing a page).
Checked three ways: interpret mode forward and backward (random cotangents on the output
and ``lse``), the TPU-semantics interpreter with race detection (in
test_kernels_tpu_semantics.py, with this file's runner), and ``jax.export``
lowering for the hardware platform, forward and backward; plus the layer and ``generate``
wiring (``implementation='pallas_*'`` with a paged cache equals the contiguous cache).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TOL, export_for, kernel_module, kernel_rand

import attnjax
from attnjax import masks
from attnjax.kernels import flash_wrapper as fw

PAGE = {"tpu": 128, "gpu": 64}
# per-row lengths: row 0 ends inside its third page, row 1 inside its second
LENGTHS = {"tpu": (300, 200), "gpu": (150, 100)}
PAGED_BACKENDS = tuple(PAGE)
# row 0: 3 pages (last partly used); row 1: 2 pages, shares page 5 with row 0, one spare
TABLE = np.asarray([[7, 2, 5], [5, 0, 6]], np.int32)
NUM_PAGES = 8


def _inputs(backend, dtype, T, seed, N=4, K=2, H=32, Hv=16):
  rng = np.random.default_rng(seed)
  ps = PAGE[backend]
  q = kernel_rand(rng, (2, T, N, H), dtype)
  kp = kernel_rand(rng, (NUM_PAGES, K, ps, H), dtype)
  vp = kernel_rand(rng, (NUM_PAGES, K, ps, Hv), dtype)
  sinks = jnp.asarray(rng.standard_normal(N), jnp.float32)
  return rng, q, kp, vp, sinks


def _pair(backend, dtype, T, *, num_splits, seed=0, interpret=True):
  """Paged kernel vs the reference on the gathered view: ((out, lse), grads) of both, the
  grads w.r.t. q, k_pages, v_pages and the sinks under random cotangents."""
  rng, q, kp, vp, sinks = _inputs(backend, dtype, T, seed)
  table = jnp.asarray(TABLE)
  kv_lengths = LENGTHS[backend]
  kl = jnp.asarray(kv_lengths, jnp.int32)
  mask = masks.lengths(None, kl) & masks.causal(offset=int(max(kv_lengths)) - T)
  mod = kernel_module(backend)
  bs = mod.BlockSizes(num_splits=num_splits)

  def paged(q, kp, vp, s):
    return mod.paged_flash_attention(q, kp, vp, table, mask=mask, sinks=s, softcap=8.0,
                                     return_lse=True, block_sizes=bs, interpret=interpret)

  def ref(q, kp, vp, s):
    return attnjax.reference_attention(q, fw.gather_pages(kp, table), fw.gather_pages(vp, table),
                                       mask=mask, sinks=s, softcap=8.0, return_lse=True)

  args = (q, kp, vp, sinks)
  outs = []
  cts = None
  for f in (paged, ref):
    (o, lse), vjp = jax.vjp(jax.jit(f), *args)   # jitted: not op by op
    if cts is None:
      cts = (kernel_rand(rng, o.shape, o.dtype),
             jnp.where(jnp.isfinite(lse), kernel_rand(rng, lse.shape), 0.0))
    outs.append(((o, lse), vjp(cts)))
  return outs


def _assert_close(got, want, dtype):
  (go, gl), gg = got
  (wo, wl), wg = want
  tol = TOL[dtype]
  np.testing.assert_allclose(np.asarray(go, np.float32), np.asarray(wo, np.float32), **tol)
  np.testing.assert_allclose(np.asarray(gl), np.asarray(wl), **tol)
  for i, (a, b) in enumerate(zip(gg, wg)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.all(np.isfinite(a)), f"grad {i} not finite"
    scale = max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a / scale, b / scale, **tol, err_msg=f"grad {i}")


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
@pytest.mark.parametrize("T,dtype,splits", [
    pytest.param(1, jnp.float32, 1, id="T1-f32"),
    pytest.param(4, jnp.float32, 2, id="T4-f32-split2", marks=pytest.mark.slow),
    pytest.param(1, jnp.bfloat16, 3, id="T1-bf16-split3", marks=pytest.mark.slow)])
def test_paged_kernel_equals_gathered_reference(backend, T, dtype, splits):
  """GQA (N=4, K=2), per-row lengths (a partly used third / second page), causal, sinks
  and softcap, a shuffled table whose rows share a page and leave spare pages: forward,
  lse and the q / pool / sink gradients equal the reference."""
  got, want = _pair(backend, dtype, T, num_splits=splits, seed=T)
  _assert_close(got, want, dtype)
  spare = [p for p in range(NUM_PAGES) if p not in TABLE]
  for g in got[1][1:3]:                       # pools: spare pages get no gradient
    assert np.all(np.asarray(g)[spare] == 0)


@pytest.mark.parametrize("backend,platform", [("tpu", "tpu"), ("gpu", "cuda")])
def test_paged_lowering(backend, platform):
  """Forward and grad lower for the hardware platform; the forward kernel is the paged
  one and the forward graph gathers no K/V pages."""
  mod = kernel_module(backend)
  _, q, kp, vp, _ = _inputs(backend, jnp.bfloat16, 1, 0, N=8, K=2, H=64, Hv=64)
  table = jnp.asarray(TABLE)
  kl = jnp.asarray(LENGTHS[backend], jnp.int32)

  def fwd(q, kp, vp, kl):
    return mod.paged_flash_attention(q, kp, vp, table, mask=masks.lengths(kv_lengths=kl),
                                     block_sizes=mod.BlockSizes(num_splits=2), interpret=False)

  def loss(q, kp, vp, kl):
    return jnp.sum(fwd(q, kp, vp, kl).astype(jnp.float32))

  text = export_for(platform, fwd, q, kp, vp, kl).mlir_module()
  assert "attnjax_flash_fwd_split_paged" in text
  assert ("tpu_custom_call" if platform == "tpu" else "triton") in text
  pool_gather = f"tensor<2x3x2x{PAGE[backend]}x64xbf16>"     # [B, pages, K, page, H]
  assert pool_gather not in text, "the forward gathered the pages"
  export_for(platform, jax.grad(loss, argnums=(0, 1, 2)), q, kp, vp, kl)


def test_paged_errors():
  mod = kernel_module("tpu")
  _, q, kp, vp, _ = _inputs("tpu", jnp.float32, 1, 0)
  table = jnp.asarray(TABLE)
  with pytest.raises(ValueError, match="page_size=64 is not a key block"):
    mod.paged_flash_attention(q, kp[:, :, :64], vp[:, :, :64], table)
  with pytest.raises(ValueError, match="page_table must be int"):
    mod.paged_flash_attention(q, kp, vp, table[:1])
  with pytest.raises(ValueError, match="k_pages must be a page pool"):
    mod.paged_flash_attention(q, kp[0], vp, table)
  with pytest.raises(ValueError, match="block_k must be None or page_size=128"):
    mod.paged_flash_attention(q, kp, vp, table, block_sizes=mod.BlockSizes(block_k=256))


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
def test_layer_paged_cache_runs_the_paged_kernel(backend):
  """An MHA layer with ``implementation='pallas_*'`` and a paged cache (pages of one key
  block, a shuffled table with a spare page) runs the paged kernel over a ragged prefill
  and a step, and equals the contiguous cache on 'xla'; a page that is not a key block
  takes the gather path."""
  from flax import nnx

  from attnjax import layers
  D, B, ps = 16, 2, PAGE[backend]
  P = int(ps * 1.4)
  opts = dict(num_kv_heads=2, causal=True, rope="1d", sinks=True,
              mask=layers.MaskSpec("sliding_window", left=int(ps * 1.2)))
  paged_layer = layers.MultiHeadAttention(D, 4, implementation=f"pallas_{backend}",
                                          rngs=nnx.Rngs(3), **opts)
  flat_layer = layers.MultiHeadAttention(D, 4, implementation="xla", rngs=nnx.Rngs(3), **opts)
  x = jax.random.normal(jax.random.key(4), (B, P + 1, D))
  lens = jnp.asarray([P, int(ps * 1.1)], jnp.int32)
  seg = jnp.where(jnp.arange(P)[None] < lens[:, None], 0, -1)
  table = jnp.asarray([[4, 1], [0, 3]], jnp.int32)
  paged = layers.init_kv_cache(paged_layer.config, B, 2 * ps, page_size=ps, num_pages=5,
                               page_table=table)
  flat = flat_layer.init_cache(B, 2 * ps)
  run = lambda layer: jax.jit(lambda a, c, s=None: layer(a, segment_ids=s, cache=c))
  rp, rf = run(paged_layer), run(flat_layer)
  jaxpr = str(jax.make_jaxpr(lambda a, c, s: paged_layer(a, segment_ids=s, cache=c))(
      x[:, :P], paged, seg))
  assert "attnjax_flash_fwd_paged" in jaxpr or "attnjax_flash_fwd_split_paged" in jaxpr
  # a page the kernel cannot use as a key block takes the gather path
  small = layers.init_kv_cache(paged_layer.config, B, 2 * ps, page_size=ps // 2 + 1)
  jaxpr_small = str(jax.make_jaxpr(lambda a, c: paged_layer(a, cache=c))(x[:, :3], small))
  assert "attnjax_flash_fwd" in jaxpr_small and "_paged" not in jaxpr_small
  ya, paged = rp(x[:, :P], paged, seg)
  yb, flat = rf(x[:, :P], flat, seg)
  np.testing.assert_allclose(ya, yb, **TOL[jnp.float32])
  step = jnp.stack([x[b, int(n):int(n) + 1] for b, n in enumerate(lens)])
  ya, paged = rp(step, paged)
  yb, flat = rf(step, flat)
  np.testing.assert_allclose(ya, yb, **TOL[jnp.float32])
  assert np.all(np.asarray(paged.k)[2] == 0)                       # the spare page


def test_generate_paged_pallas_equals_contiguous():
  """``generate(page_size=128)`` of an LM whose layers ask for 'pallas_tpu' (the paged
  kernel in interpret mode) equals the contiguous cache, ragged prompts included."""
  import ml_collections
  from flax import nnx

  from attnjax import models
  cfg = models.default_config("lm")
  cfg.num_layers = 1
  cfg.num_kv_heads = 2
  cfg.attention = ml_collections.ConfigDict({"name": "mha", "implementation": "pallas_tpu"})
  model = models.build_model(cfg, rngs=nnx.Rngs(0))
  prompt = jax.random.randint(jax.random.key(1), (2, 5), 1, 64)
  cache = model.init_cache(2, 200, page_size=128)
  jaxpr = str(jax.make_jaxpr(lambda t, c: model(t, cache=c))(prompt, cache))
  assert "attnjax_flash_fwd_paged" in jaxpr
  lens = jnp.asarray([5, 3], jnp.int32)
  want = models.generate(model, prompt, 3, prompt_lengths=lens, max_len=200)
  got = models.generate(model, prompt, 3, prompt_lengths=lens, max_len=200, page_size=128)
  np.testing.assert_array_equal(got, want)
