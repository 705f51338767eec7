"""attnjax.ops.routing (MoBA, BiFormer, dynamic mask attention, Sparsifiner) against plain
references written from the papers' definitions: explicit gates, explicit top-k (argsort)
and explicit per-query key sets in NumPy float64; gradients against a dense jnp softmax
restricted to the reference's key sets (jax.vjp, random cotangents)."""

import functools
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_close, export_for, rnd

from attnjax import masks, variants
from attnjax.core import hooks
from attnjax.layers import routing as RL
from attnjax.ops import routing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

F32, BF16 = jnp.float32, jnp.bfloat16


# ----------------------------------------------------------------------------- references

def _np(x):
  return np.asarray(jnp.asarray(x, F32), np.float64)


def moba_allowed_ref(q, k, block_size, top_k, causal):
  """Explicit loops: bool [B, N, T, S], the keys each (b, h, i) attends to."""
  q, k = _np(q), _np(k)
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  nk = -(-S // block_size)
  allowed = np.zeros((B, N, T, S), bool)
  for b in range(B):
    for h in range(N):
      means = [k[b, c * block_size:(c + 1) * block_size, h // G].mean(0) for c in range(nk)]
      for i in range(T):
        gates = np.array([q[b, i, h] @ m for m in means])
        if causal:
          own = i // block_size
          earlier = list(np.argsort(-gates[:own], kind="stable")[:top_k - 1])
          chosen = [own] + [int(c) for c in earlier]
        else:
          chosen = [int(c) for c in np.argsort(-gates, kind="stable")[:top_k]]
        for c in chosen:
          for j in range(c * block_size, min((c + 1) * block_size, S)):
            if not causal or j <= i:
              allowed[b, h, i, j] = True
  return allowed


def biformer_allowed_ref(q, k, num_regions, top_k):
  """Explicit regions of the row-major map: bool [B, Hh*Ww, Hh*Ww] (shared by heads)."""
  q, k = _np(q), _np(k)
  B, Hh, Ww, N, H = q.shape
  K = k.shape[3]
  G = N // K
  rh, rw = Hh // num_regions, Ww // num_regions
  region = np.array([(y // rh) * num_regions + (x // rw) for y in range(Hh) for x in range(Ww)])
  R = num_regions * num_regions
  qf, kf = q.reshape(B, Hh * Ww, N, H), k.reshape(B, Hh * Ww, K, H)
  allowed = np.zeros((B, Hh * Ww, Hh * Ww), bool)
  for b in range(B):
    qr = np.stack([qf[b, region == r].mean(0) for r in range(R)])      # [R, N, H]
    kr = np.stack([kf[b, region == r].mean(0) for r in range(R)])      # [R, K, H]
    aff = np.zeros((R, R))
    for r in range(R):
      for s in range(R):
        aff[r, s] = sum(qr[r, h] @ kr[s, h // G] for h in range(N))
    for r in range(R):
      keep = np.argsort(-aff[r], kind="stable")[:top_k]
      for s in keep:
        allowed[b][np.ix_(region == r, region == s)] = True
  return allowed


def dma_allowed_ref(key_bias, N, keep_window, causal):
  """Explicit per-row top-w over the allowed keys: bool [B, N, T, T]."""
  kb = _np(key_bias)
  B, S, Nb = kb.shape
  G = N // Nb
  allowed = np.zeros((B, N, S, S), bool)
  for b in range(B):
    for h in range(N):
      for i in range(S):
        cand = np.arange(i + 1) if causal else np.arange(S)
        order = cand[np.argsort(-kb[b, cand, h // G], kind="stable")]
        allowed[b, h, i, order[:keep_window]] = True
  return allowed


def softmax_ref_np(q, k, v, allowed, bias=None, scale=None):
  """float64 masked softmax attention; allowed [B, N|1, T, S]."""
  q, k, v = _np(q), _np(k), _np(v)
  B, T, N, H = q.shape
  G = N // k.shape[2]
  kk, vv = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  scale = 1 / np.sqrt(H) if scale is None else scale
  s = np.einsum("btnh,bsnh->bnts", q, kk) * scale
  if bias is not None:
    s = s + bias
  s = np.where(allowed, s, -np.inf)
  m = s.max(-1, keepdims=True)
  p = np.exp(s - np.where(np.isfinite(m), m, 0))
  den = p.sum(-1, keepdims=True)
  p = np.where(den > 0, p / np.where(den > 0, den, 1), 0)
  return np.einsum("bnts,bsnd->btnd", p, vv)


def softmax_ref_jnp(q, k, v, allowed, bias=None):
  """Dense float32 jnp softmax restricted to ``allowed`` (for reference gradients)."""
  B, T, N, H = q.shape
  G = N // k.shape[2]
  kk = jnp.repeat(k.astype(F32), G, axis=2)
  vv = jnp.repeat(v.astype(F32), G, axis=2)
  s = jnp.einsum("btnh,bsnh->bnts", q.astype(F32), kk) / np.sqrt(H)
  if bias is not None:
    s = s + bias
  s = jnp.where(allowed, s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  return jnp.einsum("bnts,bsnd->btnd", p, vv)


def _check_grads(fn, ref_fn, args, dtype, seed, what):
  # compiled (op-by-op dispatch of the vjps dominated this file's time)
  fn, ref_fn = jax.jit(fn), jax.jit(ref_fn)
  out, vjp = jax.vjp(fn, *args)
  ct = rnd(seed, out.shape, dtype)
  got = vjp(ct)
  f32_args = [jnp.asarray(a, F32) for a in args]
  _, vjp_ref = jax.vjp(ref_fn, *f32_args)
  want = vjp_ref(jnp.asarray(ct, F32))
  for name, g, w in zip("qkvbcdef", got, want):
    assert_close(g, w, dtype, f"{what}: d{name}")


# ----------------------------------------------------------------------------- MoBA

MOBA_CASE = dict(B=2, T=20, N=4, K=2, H=8, block_size=6, top_k=3)   # ragged last block (2)


def _moba_inputs(seed, dtype, B=2, T=20, N=4, K=2, H=8, Hv=8):
  return rnd(seed, (B, T, N, H), dtype), rnd(seed + 1, (B, T, K, H), dtype), \
      rnd(seed + 2, (B, T, K, Hv), dtype)


SLOW = pytest.mark.slow
IMPL_DTYPES = [("xla_chunked", F32), ("xla_chunked", BF16), pytest.param("xla", F32, marks=SLOW),
               pytest.param("xla", BF16, marks=SLOW)]
MOBA_IMPL_DTYPES = IMPL_DTYPES + [("gather", F32), ("gather", BF16)]
IMPL_DTYPES_LIGHT = [("xla_chunked", F32), pytest.param("xla_chunked", BF16, marks=SLOW),
                     pytest.param("xla", F32, marks=SLOW), pytest.param("xla", BF16, marks=SLOW)]


@pytest.mark.parametrize("impl,dtype", MOBA_IMPL_DTYPES)
def test_moba_matches_reference(impl, dtype):
  """Causal, GQA (routing per query head), ragged last block; forward and vjp."""
  q, k, v = _moba_inputs(10, dtype)
  bs, top_k = 6, 3
  allowed = moba_allowed_ref(q, k, bs, top_k, causal=True)
  f = lambda q, k, v: routing.moba_attention(q, k, v, block_size=bs, top_k=top_k,
                                             implementation=impl)
  out = f(q, k, v)
  assert out.dtype == dtype
  assert_close(out, softmax_ref_np(q, k, v, allowed), dtype, "moba forward")
  _check_grads(f, lambda q, k, v: softmax_ref_jnp(q, k, v, allowed), (q, k, v), dtype, 11,
               "moba")


@pytest.mark.parametrize("impl", ["xla_chunked", "gather"])
def test_moba_noncausal_matches_reference(impl):
  q, k, v = _moba_inputs(20, F32, T=18, N=2, K=1)
  allowed = moba_allowed_ref(q, k, 4, 2, causal=False)
  f = lambda q, k, v: routing.moba_attention(q, k, v, block_size=4, top_k=2, causal=False,
                                             implementation=impl)
  assert_close(f(q, k, v), softmax_ref_np(q, k, v, allowed), F32, "moba non-causal")
  _check_grads(f, lambda q, k, v: softmax_ref_jnp(q, k, v, allowed), (q, k, v), F32, 21,
               "moba non-causal")


def test_moba_selection_is_per_token_and_skips_tiles():
  """The selection equals the reference's block choice per token; its tile table (the
  union over each q block) has empty tiles, and some q block mixes choices (PARTIAL)."""
  q, k, _ = _moba_inputs(30, F32, B=1, T=64, N=2, K=2)
  sel = np.asarray(routing.moba_selection(q, k, block_size=8, top_k=2, causal=True))
  allowed = moba_allowed_ref(q, k, 8, 2, causal=True)
  blocks = allowed.reshape(1, 2, 64, 8, 8).any(-1)
  np.testing.assert_array_equal(sel, blocks)
  table = np.asarray((masks.from_row_block_mask(jnp.asarray(sel), 8) & masks.causal())
                     .block_table(64, 64, 8, 8, num_heads=2))
  assert (table == masks.EMPTY).sum() > (table.size // 2)
  assert (table == masks.PARTIAL).any()
  # the tile table is exactly the union of the per-row choices (AND causal)
  union = sel.reshape(1, 2, 8, 8, 8).any(3) & np.tril(np.ones((8, 8), bool))
  np.testing.assert_array_equal(table != masks.EMPTY, union)


def test_row_block_mask_is_a_pytree_and_crosses_jit():
  sel = jnp.asarray(np.random.default_rng(0).random((2, 12, 3)) < 0.5)
  m = masks.from_row_block_mask(sel, 4)
  leaves, tree = jax.tree_util.tree_flatten(m)
  assert m.kind == "row_block_mask" and "row_block_mask" in masks.KINDS
  assert m.params == {"block_k": 4} and len(leaves) == 1
  m2 = jax.tree_util.tree_unflatten(tree, leaves)
  want = np.repeat(np.asarray(sel), 4, axis=-1)[None]               # [1, 2, 12, 12]
  np.testing.assert_array_equal(np.asarray(m2.to_array(12, 12, num_heads=2)), want)
  got = jax.jit(lambda mm: mm.to_array(12, 12, num_heads=2))(m)
  np.testing.assert_array_equal(np.asarray(got), want)
  with pytest.raises(ValueError, match="row_block_mask"):
    m.check_shape(12, 16, 2)


@pytest.mark.parametrize("T,S,bq,bk", [(12, 12, 4, 4), (12, 12, 3, 2), (13, 11, 5, 2),
                                       (12, 12, 4, 1), (12, 12, 4, 3)])
def test_row_block_mask_table_is_exact(T, S, bq, bk):
  """The cheap table (tiles of block_k keys or a divisor) equals the table of the same
  mask given element-wise (from_array), including ragged ends; other widths fall back."""
  nk = -(-S // 4)
  sel = np.random.default_rng(T * S + bq * 7 + bk).random((2, T, nk)) < 0.4
  sel[0, :5] = True                                      # some FULL tiles
  m = masks.from_row_block_mask(jnp.asarray(sel), 4)
  dense = np.repeat(sel, 4, axis=-1)[..., :S]
  want = masks.from_array(dense[None]).block_table(T, S, bq, bk, num_heads=2)
  got = m.block_table(T, S, bq, bk, num_heads=2)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("impl", ["xla_chunked", "gather"])
def test_moba_top_k_one_is_block_causal(impl):
  """top_k=1 keeps only the own block: equal to chunked(block) & causal attention."""
  q, k, v = _moba_inputs(40, F32, T=16, N=2, K=2)
  out = routing.moba_attention(q, k, v, block_size=4, top_k=1, implementation=impl)
  allowed = (masks.chunked(4) & masks.causal()).to_array(16, 16)
  assert_close(out, softmax_ref_np(q, k, v, allowed), F32, "top_k=1")


@pytest.mark.parametrize("causal,T,bs,top_k,dtype", [
    (True, 29, 4, 8, F32),      # top_k = number of blocks (dense causal), ragged T
    pytest.param(False, 29, 4, 8, F32, marks=SLOW),   # top_k = number of blocks (dense)
    pytest.param(True, 45, 4, 3, BF16, marks=SLOW),   # several chunks per key block
    (False, 45, 4, 3, BF16),
])
def test_moba_gather_matches_reference_jit(causal, T, bs, top_k, dtype):
  """The key-block-major 'gather' path under jit against the plain reference (forward and
  vjp) and its gradients against the mask path's (both with the choice held fixed)."""
  q, k, v = _moba_inputs(80 + T, dtype, B=1, T=T, N=4, K=2)
  allowed = moba_allowed_ref(q, k, bs, top_k, causal=causal)
  if top_k == -(-T // bs):
    want = np.tril(np.ones((T, T), bool)) if causal else np.ones((T, T), bool)
    np.testing.assert_array_equal(allowed, np.broadcast_to(want, allowed.shape))

  def f(impl):
    return jax.jit(lambda q, k, v: routing.moba_attention(
        q, k, v, block_size=bs, top_k=top_k, causal=causal, implementation=impl))
  g = f("gather")
  assert_close(g(q, k, v), softmax_ref_np(q, k, v, allowed), dtype, "gather forward")
  _check_grads(g, lambda q, k, v: softmax_ref_jnp(q, k, v, allowed), (q, k, v), dtype,
               81 + T, "gather")
  out, vjp_g = jax.vjp(g, q, k, v)
  _, vjp_m = jax.vjp(f("xla_chunked"), q, k, v)
  ct = rnd(82 + T, out.shape, dtype)
  for name, a, b in zip("qkv", vjp_g(ct), vjp_m(ct)):
    assert_close(a, b, dtype, f"gather vs mask path: d{name}")


@pytest.mark.parametrize("causal,T,bs,top_k,dtype", [
    (True, 83, 16, 3, F32),
    (False, 83, 16, 3, F32),    # S % 16 = 3: the straddling key tile is masked by a pattern
    (False, 300, 256, 2, BF16),  # four 64-key tiles per block: the last block's third
                                 # and fourth tiles start past S (dropped), its first
                                 # straddles S
    pytest.param(True, 300, 256, 2, BF16, marks=SLOW),
    pytest.param(True, 160, 32, 4, F32, marks=SLOW),
    (True, 100, 48, 2, F32),    # chunk 64 > block 48 > tile 16: three causal patterns,
                                # padded own chunks, a ragged last block of 4 queries
])
def test_moba_gathered_blocks_on_cpu_kernel(causal, T, bs, top_k, dtype):
  """With the C++ kernel built, the gather path runs on its block-sparse mode, one call
  per row (slots of the key-block-major layout as one long query sequence, lists built
  in-graph; causal: the own blocks first, their diagonal tiles as causal patterns):
  forward and vjp against the plain reference under jit (GQA, ragged last block), and
  the program holds the kernel's block-sparse forward and backward and no other
  attention call (causal: no band call for the own block)."""
  from attnjax.cpu import flash
  if not flash.available():
    pytest.skip("the C++ kernel is not built on this machine")
  q, k, v = _moba_inputs(300 + T, dtype, B=2, T=T, N=4, K=2, H=16, Hv=32)
  allowed = moba_allowed_ref(q, k, bs, top_k, causal=causal)
  if not causal:           # the ragged last block is chosen by some query
    assert allowed[..., -1].any()
  g = jax.jit(lambda q, k, v: routing.moba_attention(q, k, v, block_size=bs, top_k=top_k,
                                                     causal=causal, implementation="gather"))
  assert routing._moba_kernel_blocks(bs, 16, 32) is not None
  assert_close(g(q, k, v), softmax_ref_np(q, k, v, allowed), dtype, "kernel forward")
  _check_grads(g, lambda q, k, v: softmax_ref_jnp(q, k, v, allowed), (q, k, v), dtype,
               301 + T, "kernel")
  text = jax.jit(jax.grad(lambda q, k, v: g(q, k, v).astype(F32).sum(), argnums=(0, 1, 2))
                 ).lower(q, k, v).as_text()
  assert "attnjax_sparse_fwd" in text and "attnjax_sparse_bwd" in text
  assert "attnjax_flash_fwd" not in text and "attnjax_flash_bwd" not in text


@pytest.mark.parametrize("causal", [True, False])
def test_moba_kernel_lists_visit_only_chosen_tiles(monkeypatch, causal):
  """The gathered path's kernel lists hold exactly the tiles of the chosen blocks: per
  row, ``ceil(n_c / P)`` chunks of each block ``c`` chosen by ``n_c`` queries times the
  block's key tiles (causal: plus the own blocks' tiles on and below the diagonal), in
  the query-block lists and in the transposed key-tile lists alike.  The layout's chunk
  count is a static bound; the chunks past a row's last group hold only padding and
  visit nothing."""
  from attnjax.cpu import flash
  if not flash.available():
    pytest.skip("the C++ kernel is not built on this machine")
  T, bs, top_k, N = 200, 32, 3, 2
  q, k, v = _moba_inputs(17, F32, B=1, T=T, N=N, K=1, H=16, Hv=16)
  P, bk = routing._moba_kernel_blocks(bs, 16, 16)
  nk, nsub = -(-T // bs), bs // bk
  tiles_of = [sum(c * bs + s * bk < T for s in range(nsub)) for c in range(nk)]
  allowed_BNTS = moba_allowed_ref(q, k, bs, top_k, causal=causal)
  allowed = allowed_BNTS[0]                                               # [N, T, S]
  want = []
  for h in range(N):
    n = 0
    for c in range(nk):
      chooser = [i for i in range(T) if allowed[h, i, c * bs]
                 and not (causal and i // bs == c)]
      n += -(-len(chooser) // P) * tiles_of[c]
    if causal:            # own block c: chunk j of P rows sees tiles t with t * bk <= its last row
      for c in range(nk):
        rows = min(bs, T - c * bs)
        n += sum(min(nsub, (min(j * P + P, rows) - 1) // bk + 1) for j in range(-(-rows // P)))
    want.append(n)
  seen = []
  fwd, bwd = hooks.block_sparse_parts()

  def counting_fwd(q_long, k_r, v_r, qlist, qcode, klist, kcode, pats, **kw):
    jax.debug.callback(lambda a, b: seen.append((int(a), int(b))),
                       (qlist >= 0).sum(), (klist >= 0).sum())
    return fwd(q_long, k_r, v_r, qlist, qcode, klist, kcode, pats, **kw)

  monkeypatch.setattr(hooks, "block_sparse_parts", lambda: (counting_fwd, bwd))
  out = routing.moba_attention(q, k, v, block_size=bs, top_k=top_k, causal=causal,
                               implementation="gather")
  jax.block_until_ready(out)
  assert [a for a, _ in seen] == want, "query-block lists"
  assert [b for _, b in seen] == want, "key-tile lists"
  assert_close(out, softmax_ref_np(q, k, v, allowed_BNTS), F32, "forward")


@pytest.mark.parametrize("T,nk,kk,P", [(37, 5, 3, 8), (300, 12, 2, 128)])
def test_moba_layout_ranks_without_a_sort(monkeypatch, T, nk, kk, P):
  """The gather layout's two ways of ranking the (query, block) pairs -- prefix counts
  of the one-hot choice (few blocks) and a stable sort (many) -- give the same slots,
  and the slots group each block's queries in query order, padded to chunks of P."""
  rng = np.random.default_rng(T)
  idx = np.stack([np.stack([rng.permutation(nk + 1)[:kk] for _ in range(T)])
                  for _ in range(6)]).reshape(2, 3, T, kk)       # nk: selects nothing
  idx = jnp.asarray(idx, jnp.int32)
  got = routing._moba_gather_layout(idx, T=T, nk=nk, chunk=P)
  monkeypatch.setattr(routing, "_RANK_MAX_BLOCKS", 0)
  want = routing._moba_gather_layout(idx, T=T, nk=nk, chunk=P)
  for name, a, b in zip(("slot_q", "chunk_blk", "dest"), got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
  slot_q, chunk_blk, dest = map(np.asarray, got)
  total = slot_q.shape[1]
  idx = np.asarray(idx).reshape(6, T, kk)
  for r in range(6):
    for c in range(nk):
      qs = [i for i in range(T) if c in idx[r, i]]
      slots = [dest[r, i, list(idx[r, i]).index(c)] for i in qs]
      assert slots == list(range(slots[0], slots[0] + len(qs))) if qs else True
      if qs:
        assert slots[0] % P == 0 and (chunk_blk[r, slots[0] // P] == c)
        np.testing.assert_array_equal(slot_q[r, slots], qs)
    assert np.all(dest[r][idx[r] == nk] == total)


def _gathered_partial_ref(q, k, v, idx_BNTk, bs):
  """Dense float32 jnp (o [B*N, T, Hv], lse [B*N, T]) over the keys of each query's
  gathered blocks (``idx`` entries ``>= nk`` select nothing); 0 / -inf with no key."""
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  nk = -(-S // bs)
  blk = np.arange(S) // bs
  idx = np.asarray(idx_BNTk)
  allowed = (idx[..., None] == blk).any(-2)                                  # [B, N, T, S]
  assert np.all(idx <= nk)
  kk = jnp.repeat(k.astype(F32), G, axis=2)
  vv = jnp.repeat(v.astype(F32), G, axis=2)
  s = jnp.einsum("btnh,bsnh->bnts", q.astype(F32), kk) / np.sqrt(H)
  s = jnp.where(allowed, s, -jnp.inf)
  m = jnp.max(s, -1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  e = jnp.exp(s - m)
  l = e.sum(-1)
  pos = l > 0
  l1 = jnp.where(pos, l, 1.0)
  o = jnp.einsum("bnts,bsnd->bntd", e / l1[..., None], vv)
  lse = jnp.where(pos, m[..., 0] + jnp.log(l1), -jnp.inf)
  return o.reshape(B * N, T, -1), lse.reshape(B * N, T)


@pytest.mark.parametrize("earlier,B,T,N,K,bs,kk,dtype", [
    (True, 2, 37, 4, 2, 8, 2, F32),          # GQA, ragged last block, batch 2
    (False, 1, 30, 2, 1, 7, 3, BF16),        # GQA 2:1, ragged, bf16
    pytest.param(True, 1, 64, 2, 2, 4, 3, F32, marks=SLOW),   # many chunks per step
])
def test_moba_gather_partial_custom_vjp(earlier, B, T, N, K, bs, kk, dtype):
  """The gather path's custom VJP (flash-style backward from the saved lse) against a
  dense reference: forward (o, lse) and jax.vjp with random cotangents on both o and lse,
  including queries whose gathered blocks are all empty (o = 0, lse = -inf, zero
  gradients, no NaN).  ``earlier``: blocks before the query's own only (as causal MoBA
  passes them), else any block."""
  q, k, v = _moba_inputs(300 + T, dtype, B=B, T=T, N=N, K=K)
  nk = -(-T // bs)
  rng = np.random.default_rng(T)
  idx = np.zeros((B, N, T, kk), np.int32)
  for b in range(B):
    for h in range(N):
      for i in range(T):
        hi = i // bs if earlier else nk    # earlier blocks only (as MoBA's extra picks)
        cand = rng.permutation(hi)[:kk]
        idx[b, h, i] = np.concatenate([cand, np.full(kk - len(cand), nk)])
  idx = jnp.asarray(idx)
  got_fn = lambda q, k, v: routing._moba_gather_partial(
      q, k, v, idx, bs, 1.0 / np.sqrt(q.shape[-1]), routing._moba_gather_chunk(bs))
  ref_fn = lambda q, k, v: _gathered_partial_ref(q, k, v, idx, bs)
  (o, lse), vjp = jax.vjp(jax.jit(got_fn), q, k, v)
  f32_args = [jnp.asarray(a, F32) for a in (q, k, v)]
  (o_r, lse_r), vjp_r = jax.vjp(ref_fn, *f32_args)
  none = ~np.isfinite(np.asarray(lse_r))
  if earlier:
    assert none.any()                      # the first block's queries gather nothing
  np.testing.assert_array_equal(~np.isfinite(np.asarray(lse)), none)
  assert_close(o, o_r, dtype, "gather partial o")
  assert_close(jnp.where(none, 0.0, lse), jnp.where(none, 0.0, lse_r), dtype,
               "gather partial lse")
  ct_o = rnd(301 + T, o.shape, F32)
  ct_l = jnp.where(none, 0.0, rnd(302 + T, lse.shape, F32))
  got = vjp((ct_o, ct_l))
  want = vjp_r((ct_o, ct_l))
  for name, g, w in zip("qkv", got, want):
    assert g.dtype == dtype
    assert_close(g, w, dtype, f"gather partial custom vjp: d{name}")
  if earlier:  # queries with nothing gathered get zero dq
    dq = np.asarray(jnp.asarray(got[0], F32)).transpose(0, 2, 1, 3).reshape(B * N, T, -1)
    assert np.all(dq[none] == 0)


def test_moba_gather_is_the_cpu_default():
  """implementation=None on CPU (no block_sizes) runs the 'gather' path (no attnjax.attention
  call with a row-block mask); 'gather' refuses block_sizes."""
  q, k, v = _moba_inputs(90, F32, B=1, T=16, N=2, K=1)
  seen = []
  with hooks.observe(lambda call: seen.append(call.args)):
    routing.moba_attention(q, k, v, block_size=4, top_k=2, causal=False)
    routing.moba_attention(q, k, v, block_size=4, top_k=2, causal=True)   # own block: a band call
  # one observed call each, the gather path's own (no dispatcher args, no masked call)
  assert seen == [None, None]
  with pytest.raises(ValueError, match="block_sizes"):
    routing.moba_attention(q, k, v, block_size=4, top_k=2, implementation="gather",
                           block_sizes={})
  with pytest.raises(TypeError, match="scale"):
    routing.moba_attention(q, k, v, block_size=4, top_k=2, implementation="gather",
                           scale=jnp.float32(0.5))


def test_moba_no_gradient_through_selection():
  """The gate is not differentiated: d out / d k equals the gradient with the selection
  held fixed (already covered numerically above); here the selection itself has no
  tangent."""
  q, k, _ = _moba_inputs(50, F32)
  jac = jax.jacfwd(lambda q: routing.moba_selection(q, k, block_size=6, top_k=3)
                   .astype(F32))(q)
  assert not np.any(np.asarray(jac))


@pytest.mark.parametrize("backend", [pytest.param("pallas_tpu", marks=SLOW), "pallas_gpu"])
def test_moba_pallas_interpreted(backend):
  """Interpreted Pallas kernels on a tiny shape (tile-aligned on GPU: block 16)."""
  from attnjax.kernels.gpu import flash as gpu_flash
  q, k, v = _moba_inputs(60, F32, B=1, T=48, N=2, K=1, H=16, Hv=16)
  bsz = gpu_flash.BlockSizes(block_q=16, block_k=16) if backend == "pallas_gpu" else None
  f = lambda q, k, v: routing.moba_attention(q, k, v, block_size=16, top_k=2,
                                             implementation=backend, block_sizes=bsz)
  allowed = moba_allowed_ref(q, k, 16, 2, causal=True)
  assert_close(f(q, k, v), softmax_ref_np(q, k, v, allowed), F32, f"moba {backend}")
  _check_grads(f, lambda q, k, v: softmax_ref_jnp(q, k, v, allowed), (q, k, v), F32, 61,
               f"moba {backend}")


def _direct_kernel(platform):
  """A dispatcher stand-in calling the Pallas kernel with ``interpret=False`` (lowering)."""
  if platform == "tpu":
    from attnjax.kernels.tpu import flash as kmod
    name = "pallas_tpu"
  else:
    from attnjax.kernels.gpu import flash as kmod
    name = "pallas_gpu"

  def att(q, k, v, *, implementation=None, block_sizes=None, **kw):
    del implementation
    if isinstance(block_sizes, dict):
      block_sizes = block_sizes.get(name)
    return kmod.flash_attention(q, k, v, block_sizes=block_sizes, interpret=False, **kw)
  return att, kmod


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_moba_lowering(platform, monkeypatch):
  """MoBA through the Pallas kernel lowers for tpu / cuda, forward and grad."""
  att, kmod = _direct_kernel(platform)
  monkeypatch.setattr(hooks, "_ATTENTION", [att])
  bs = 128 if platform == "tpu" else 64
  T = 2 * bs
  q, k, v = _moba_inputs(70, BF16, B=1, T=T, N=4, K=2, H=64, Hv=64)
  bsz = kmod.BlockSizes(block_q=bs, block_k=bs)

  def fwd(q, k, v):
    return routing.moba_attention(q, k, v, block_size=bs, top_k=2, block_sizes=bsz)

  def loss(q, k, v):
    return jnp.sum(fwd(q, k, v).astype(F32))

  export_for(platform, fwd, q, k, v)
  text = export_for(platform, jax.grad(loss, argnums=(0, 1, 2)), q, k, v).mlir_module()
  assert ("tpu_custom_call" if platform == "tpu" else "triton") in text


# ------------------------------------------------- MoBA: data-dependent block lists in the kernels

def _kmod(backend):
  from attnjax.kernels.gpu import flash as gpu_flash
  from attnjax.kernels.tpu import flash as tpu_flash
  return tpu_flash if backend == "pallas_tpu" else gpu_flash


# TPU tiles are 128 keys wide (block_size 128); GPU 16.  GQA: N=4 query heads, K=2 kv heads.
_LIST_CASES = {"pallas_tpu": dict(B=2, T=384, bs=128, bq=64, top_k=2),
               "pallas_gpu": dict(B=2, T=80, bs=16, bq=16, top_k=2)}


def _moba_kernel_case(backend, dtype, seed, B=None, N=4, K=2):
  c = _LIST_CASES[backend]
  B = c["B"] if B is None else B
  q, k, v = _moba_inputs(seed, dtype, B=B, T=c["T"], N=N, K=K, H=16, Hv=16)
  bsz = _kmod(backend).BlockSizes(block_q=c["bq"], block_k=c["bs"], num_splits=1)
  f = lambda q, k, v: routing.moba_attention(q, k, v, block_size=c["bs"], top_k=c["top_k"],
                                             implementation=backend, block_sizes=bsz)
  allowed = moba_allowed_ref(q, k, c["bs"], c["top_k"], causal=True)
  return f, (q, k, v), allowed, c


def _ref_tiles(allowed, bq, bk, G):
  """Tiles holding an allowed key, from the reference's key sets: per query head
  ``[B, N, nq, nk]`` and per GQA group (the TPU kernel's rows) ``[B, K, nq, nk]``."""
  B, N, T, S = allowed.shape
  nq, nk = -(-T // bq), -(-S // bk)
  a = np.zeros((B, N, nq * bq, nk * bk), bool)
  a[:, :, :T, :S] = allowed
  head = a.reshape(B, N, nq, bq, nk, bk).any(axis=(3, 5))
  return head, head.reshape(B, N // G, G, nq, nk).any(axis=2)


def _program_lengths(tiles):
  """Steps of each TPU program: one per selected tile of each row, one idle step for a
  row with none (its output block is still written)."""
  return np.maximum(tiles.sum(-1), 1).sum(-1)              # [B, K]


@pytest.mark.parametrize("backend,dtype", [
    ("pallas_gpu", F32), pytest.param("pallas_gpu", BF16, marks=SLOW),
    pytest.param("pallas_tpu", F32, marks=SLOW), pytest.param("pallas_tpu", BF16, marks=SLOW)])
def test_moba_block_lists_match_reference(backend, dtype):
  """MoBA through the kernels' data-dependent block lists (GQA, B=2): forward and jax.vjp
  against the explicit-loop MoBA reference."""
  f, args, allowed, _ = _moba_kernel_case(backend, dtype, 80)
  assert_close(f(*args), softmax_ref_np(*args, allowed), dtype, f"moba {backend} fwd")
  _check_grads(f, lambda q, k, v: softmax_ref_jnp(q, k, v, allowed), args, dtype, 81,
               f"moba {backend}")


@pytest.mark.parametrize("backend", ["pallas_tpu", "pallas_gpu"])
def test_moba_kernels_walk_only_selected_tiles(backend):
  """The kernels count the grid steps (TPU) / list iterations (GPU) they execute
  (``fw.count_steps``): forward, dq and dk/dv walk exactly the tiles the reference's key
  sets select (TPU: per GQA group, each program padded to the longest program's list by
  skipped steps; GPU: per query head), far fewer than the ``nq * nk`` worst case."""
  from attnjax.kernels import flash_wrapper as fw
  f, args, allowed, c = _moba_kernel_case(backend, F32, 90)
  B, T, N = args[0].shape[:3]
  K = args[1].shape[2]
  head, group = _ref_tiles(allowed, c["bq"], c["bs"], N // K)
  nq, nk = head.shape[-2:]
  with fw.count_steps() as log:
    out, vjp = jax.vjp(f, *args)
    vjp(rnd(91, out.shape, F32))
    jax.effects_barrier()
  got = {name: (executed, active) for name, executed, active in log}
  if backend == "pallas_tpu":
    fwd_len = _program_lengths(group)                       # [B, K]
    dkv_len = _program_lengths(np.swapaxes(group, -1, -2))
    want = {"attnjax_flash_fwd": (B * K * fwd_len.max(), group.sum()),
            "attnjax_flash_bwd_dq": (B * K * fwd_len.max(), group.sum()),
            "attnjax_flash_bwd_dkv": (B * K * dkv_len.max(), group.sum())}
    worst = B * K * nq * nk
  else:                           # one program per (b, head, q block) / (b, kv head, k block)
    want = {n: (head.sum(), head.sum()) for n in (
        "attnjax_flash_fwd_gpu", "attnjax_flash_bwd_dq_gpu", "attnjax_flash_bwd_dkv_gpu")}
    worst = B * N * nq * nk
  assert got == want
  # causal MoBA selects the own block of every q block: no idle steps, and the grid is
  # well below the worst case of a union table ([B, K, nq, nk] all visited)
  assert all(executed < worst for executed, _ in got.values()), (got, worst)


@SLOW
def test_moba_block_lists_single_program_exact():
  """One TPU program per (batch, kv head) with B = K = 1: its grid has exactly one step per
  selected tile, forward and backward (no padding)."""
  from attnjax.kernels import flash_wrapper as fw
  f, args, allowed, c = _moba_kernel_case("pallas_tpu", F32, 95, B=1, N=2, K=1)
  _, group = _ref_tiles(allowed, c["bq"], c["bs"], 2)
  with fw.count_steps() as log:
    out, vjp = jax.vjp(f, *args)
    vjp(rnd(96, out.shape, F32))
    jax.effects_barrier()
  assert sorted(log) == sorted((n, int(group.sum()), int(group.sum())) for n in (
      "attnjax_flash_fwd", "attnjax_flash_bwd_dq", "attnjax_flash_bwd_dkv"))
  assert group.sum() < group.size                   # some tiles are skipped


def test_row_selection_replaces_the_dense_mask():
  """A ``from_row_block_mask`` whose key blocks are whole kernel tiles reaches the kernels
  as its ``[B, N, T, nk]`` selection (``plan.dense_cols`` tiles per block), not as a dense
  ``[B, N, T, S]`` mask; the causal part stays an in-kernel predicate.  Beside another
  data-dependent mask the selection joins that mask's dense array as before."""
  from attnjax.core import plan as plan_lib
  from attnjax.core.args import check_attention_args
  q, k, v = _moba_inputs(120, F32, B=2, T=72, N=4, K=2)
  sel = routing.moba_selection(q, k, block_size=32, top_k=2)              # [2, 4, 72, 3]
  a = check_attention_args(q, k, v, mask=masks.from_row_block_mask(sel, 32) & masks.causal())
  plan = plan_lib.make_plan(a, 16, 16)
  assert plan.dense.shape == (2, 4, 72, 3) and plan.dense_cols == 2
  assert plan.pred is not None and plan.pred.kind == "causal"
  arr = jnp.asarray(np.random.default_rng(0).random((72, 72)) < 0.7)
  a2 = check_attention_args(q, k, v, mask=masks.from_row_block_mask(sel, 32) &
                            masks.from_array(arr))
  plan2 = plan_lib.make_plan(a2, 16, 16)
  assert plan2.dense_cols == 0 and plan2.dense.shape[-1] == 72


@pytest.mark.parametrize("backend", ["pallas_gpu", pytest.param("pallas_tpu", marks=SLOW)])
def test_moba_row_selection_blocks_of_several_tiles(backend):
  """MoBA blocks two kernel tiles wide (the tile reads column ``kb // 2`` of the
  selection), ragged T (the last block short): forward and jax.vjp against the
  explicit-loop reference."""
  T, bs, bq, bk = (72, 32, 16, 16) if backend == "pallas_gpu" else (320, 256, 64, 128)
  q, k, v = _moba_inputs(130, F32, B=1, T=T, N=2, K=1, H=16, Hv=16)
  bsz = _kmod(backend).BlockSizes(block_q=bq, block_k=bk, num_splits=1)
  f = lambda q, k, v: routing.moba_attention(q, k, v, block_size=bs, top_k=2,
                                             implementation=backend, block_sizes=bsz)
  allowed = moba_allowed_ref(q, k, bs, 2, causal=True)
  assert_close(f(q, k, v), softmax_ref_np(q, k, v, allowed), F32, f"moba {backend} fwd")
  _check_grads(f, lambda q, k, v: softmax_ref_jnp(q, k, v, allowed), (q, k, v), F32, 131,
               f"moba {backend} wide blocks")


def test_moba_tpu_grid_is_dynamic():
  """The TPU kernels' grids over a traced (routed) table have a data-dependent bound,
  forward and backward (what the lowering passes to Mosaic)."""
  from jax._src.pallas import core as pallas_core
  f, args, _, _ = _moba_kernel_case("pallas_tpu", F32, 110, B=1)
  loss = lambda q, k, v: jnp.sum(f(q, k, v))
  grids = {}

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        grids[eqn.params["name"]] = eqn.params["grid_mapping"].grid
      for v in eqn.params.values():
        for x in (v if isinstance(v, (tuple, list)) else [v]):
          x = getattr(x, "jaxpr", x)                    # ClosedJaxpr -> Jaxpr
          if hasattr(x, "eqns"):
            walk(x)
  walk(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(*args).jaxpr)
  assert {"attnjax_flash_fwd", "attnjax_flash_bwd_dq", "attnjax_flash_bwd_dkv"} <= set(grids)
  for name, grid in grids.items():
    assert isinstance(grid[-1], pallas_core.DynamicGridDim), (name, grid)


# ----------------------------------------------------------------------------- VMoBA

def vmoba_allowed_ref(q, k, block, top_k=None, threshold=None):
  """Explicit grid coordinates and blocks: bool [B, N, T, T] on the row-major grid."""
  q, k = _np(q), _np(k)
  B, grid, N, H = q.shape[0], q.shape[1:-2], q.shape[-2], q.shape[-1]
  K = k.shape[-2]
  G = N // K
  coords = list(np.ndindex(*grid))
  bgrid = [g // b for g, b in zip(grid, block)]
  blk = np.array([np.ravel_multi_index([c // b for c, b in zip(cd, block)], bgrid)
                  for cd in coords])
  nb = int(np.prod(bgrid))
  qf, kf = q.reshape(B, -1, N, H), k.reshape(B, -1, K, H)
  allowed = np.zeros((B, N, len(coords), len(coords)), bool)
  for b in range(B):
    for h in range(N):
      means = [kf[b, blk == c, h // G].mean(0) for c in range(nb)]
      for i in range(len(coords)):
        gates = np.array([qf[b, i, h] @ m for m in means])
        order = np.argsort(-gates, kind="stable")
        if top_k is not None:
          chosen = order[:top_k]
        else:
          share = np.exp(gates - gates.max())
          share /= share.sum()
          chosen, acc = [], 0.0
          for c in order:
            if acc < threshold:
              chosen.append(c)
            acc += share[c]
        for c in chosen:
          allowed[b, h, i, blk == c] = True
  return allowed


@pytest.mark.parametrize("grid,block,top_k,threshold,impl,H", [
    ((4, 6), (2, 3), 2, None, "xla_chunked", 8), ((4, 6), (2, 2), None, 0.6, "xla_chunked", 8),
    ((4, 6), (2, 3), 2, None, "gather", 8),     # the XLA scan (block of 6: no kernel)
    ((8, 8), (4, 4), 2, None, None, 16),        # CPU default: the C++ kernel's gather path
    pytest.param((2, 4, 4), (1, 2, 2), 3, None, "xla_chunked", 8, marks=SLOW)])
def test_vmoba_matches_reference(grid, block, top_k, threshold, impl, H):
  """VMoBA against the explicit-grid reference, forward and vjp: the mask path, and with
  top_k the key-block-major gather path (XLA scan; on CPU by default the C++ kernel)."""
  q = rnd(150, (1, *grid, 4, H))
  k = rnd(151, (1, *grid, 2, H))
  v = rnd(152, (1, *grid, 2, H))
  allowed = vmoba_allowed_ref(q, k, block, top_k, threshold)
  f = lambda q, k, v: routing.vmoba_attention(q, k, v, block_shape=block, top_k=top_k,
                                              threshold=threshold, implementation=impl)
  if impl is None:
    from attnjax.cpu import flash
    if not flash.available():
      pytest.skip("the C++ kernel is not built on this machine")
    text = jax.jit(jax.grad(lambda q, k, v: f(q, k, v).sum(), argnums=(0, 1, 2))).lower(
        q, k, v).as_text()
    assert "attnjax_sparse_fwd" in text and "attnjax_sparse_bwd" in text
  if impl != "xla_chunked":             # an analysis capture observes one masked call
    seen = []
    with hooks.observe(lambda call: seen.append(call)):
      observed = f(q, k, v)
    assert len(seen) == 1 and seen[0].args is not None
    assert_close(observed, f(q, k, v), F32, "vmoba observed")
  flat = lambda x: x.reshape(1, -1, *x.shape[-2:])
  assert_close(f(q, k, v), softmax_ref_np(flat(q), flat(k), flat(v), allowed).reshape(q.shape),
               F32, "vmoba forward")
  ref = lambda q, k, v: softmax_ref_jnp(flat(q), flat(k), flat(v), allowed).reshape(q.shape)
  _check_grads(f, ref, (q, k, v), F32, 153, "vmoba")


def test_block_major_roundtrip():
  x = rnd(160, (2, 2, 4, 6, 3, 5))
  for block in [(1, 2, 3), (2, 4, 6), (1, 1, 1)]:
    y = routing.to_block_major(x, block)
    np.testing.assert_array_equal(np.asarray(routing.from_block_major(y, block, (2, 4, 6))),
                                  np.asarray(x))
  y = routing.to_block_major(x, (1, 2, 3))
  np.testing.assert_array_equal(np.asarray(y[:, 6:12]),
                                np.asarray(x[:, 0, 0:2, 3:6].reshape(2, 6, 3, 5)))


# ----------------------------------------------------------------------------- BiFormer

def _map_inputs(seed, dtype, B=2, Hh=8, Ww=8, N=4, K=2, H=8, Hv=8):
  return rnd(seed, (B, Hh, Ww, N, H), dtype), rnd(seed + 1, (B, Hh, Ww, K, H), dtype), \
      rnd(seed + 2, (B, Hh, Ww, K, Hv), dtype)


def _flat(x):
  return x.reshape(x.shape[0], -1, *x.shape[-2:])


@pytest.mark.parametrize("impl,dtype", IMPL_DTYPES_LIGHT)
def test_biformer_matches_reference(impl, dtype):
  q, k, v = _map_inputs(100, dtype, Hh=8, Ww=4)
  nr, top_k = 2, 2
  allowed = biformer_allowed_ref(q, k, nr, top_k)[:, None]
  f = lambda q, k, v: routing.bi_level_routing_attention(q, k, v, num_regions=nr, top_k=top_k,
                                                         implementation=impl)
  out = f(q, k, v)
  assert out.shape == q.shape and out.dtype == dtype
  want = softmax_ref_np(_flat(q), _flat(k), _flat(v), allowed).reshape(out.shape)
  assert_close(out, want, dtype, "biformer forward")

  def ref(q, k, v):
    return softmax_ref_jnp(_flat(q), _flat(k), _flat(v), allowed).reshape(q.shape[:4] + (8,))
  _check_grads(f, ref, (q, k, v), dtype, 101, "biformer")


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_biformer_on_cpu_kernel(dtype):
  """implementation=None on CPU with the C++ kernel built: the routed regions run on its
  block-sparse mode (one call per batch row, the routing as tile lists, GQA): forward
  and vjp against the reference, the kernel in the program; under an analysis observer
  the call stays the observable attnjax.attention mask path (same output)."""
  from attnjax.cpu import flash
  if not flash.available():
    pytest.skip("the C++ kernel is not built on this machine")
  q, k, v = _map_inputs(130, dtype, B=2, Hh=8, Ww=16, N=4, K=2, H=16, Hv=32)
  nr, top_k = 2, 2                     # regions of 4 x 8 = 32 tokens
  allowed = biformer_allowed_ref(q, k, nr, top_k)[:, None]
  f = jax.jit(lambda q, k, v: routing.bi_level_routing_attention(q, k, v, num_regions=nr,
                                                                 top_k=top_k))
  out = f(q, k, v)
  assert out.shape == q.shape[:4] + (32,) and out.dtype == dtype
  want = softmax_ref_np(_flat(q), _flat(k), _flat(v), allowed).reshape(out.shape)
  assert_close(out, want, dtype, "biformer kernel forward")

  def ref(q, k, v):
    return softmax_ref_jnp(_flat(q), _flat(k), _flat(v), allowed).reshape(q.shape[:4] + (32,))
  _check_grads(f, ref, (q, k, v), dtype, 131, "biformer kernel")
  text = jax.jit(jax.grad(lambda q, k, v: f(q, k, v).astype(F32).sum(), argnums=(0, 1, 2))
                 ).lower(q, k, v).as_text()
  assert "attnjax_sparse_fwd" in text and "attnjax_sparse_bwd" in text
  seen = []
  with hooks.observe(lambda call: seen.append(call)):
    observed = routing.bi_level_routing_attention(q, k, v, num_regions=nr, top_k=top_k)
  assert len(seen) == 1 and seen[0].args is not None
  assert_close(observed, want, dtype, "biformer observed")


@pytest.mark.parametrize("backend", ["pallas_tpu", pytest.param("pallas_gpu", marks=SLOW)])
def test_biformer_pallas_interpreted(backend):
  from attnjax.kernels.gpu import flash as gpu_flash
  q, k, v = _map_inputs(110, F32, B=1, Hh=8, Ww=8, N=2, K=2, H=16, Hv=16)
  bsz = gpu_flash.BlockSizes(block_q=16, block_k=16) if backend == "pallas_gpu" else None
  f = lambda q, k, v: routing.bi_level_routing_attention(q, k, v, num_regions=2, top_k=2,
                                                         implementation=backend,
                                                         block_sizes=bsz)
  allowed = biformer_allowed_ref(q, k, 2, 2)[:, None]
  want = softmax_ref_np(_flat(q), _flat(k), _flat(v), allowed).reshape(q.shape)
  assert_close(f(q, k, v), want, F32, f"biformer {backend}")


def test_region_major_roundtrip_and_routing_table():
  x = rnd(120, (2, 6, 4, 3, 5), F32)
  y = routing.to_region_major(x, 2)
  np.testing.assert_array_equal(np.asarray(routing.from_region_major(y, 2, (6, 4))),
                                np.asarray(x))
  # region 1 (top-right) is the second contiguous block: rows 0..2, cols 2..3
  np.testing.assert_array_equal(np.asarray(y[:, 6:12]),
                                np.asarray(x[:, 0:3, 2:4].reshape(2, 6, 3, 5)))


# ----------------------------------------------------------------------------- DMA

def _distinct(seed, shape, dtype):
  """Random key biases without ties in bf16 (a permutation of multiples of 1/8)."""
  n = int(np.prod(shape))
  x = np.random.default_rng(seed).permutation(n).reshape(shape) / 8.0 - n / 16.0
  return jnp.asarray(x.astype(np.float32), dtype)


@pytest.mark.parametrize("impl,dtype", IMPL_DTYPES_LIGHT)
def test_dynamic_mask_matches_reference(impl, dtype):
  q, k, v = _moba_inputs(200, dtype, T=24, N=4, K=2)
  kb = _distinct(203, (2, 24, 2), dtype)              # per kv head
  allowed = dma_allowed_ref(kb, 4, 5, causal=True)
  bias = jnp.repeat(jnp.transpose(jnp.asarray(kb, F32), (0, 2, 1)), 2, axis=1)[:, :, None, :]
  f = lambda q, k, v, kb: routing.dynamic_mask_attention(q, k, v, kb, keep_window=5,
                                                         implementation=impl)
  out = f(q, k, v, kb)
  assert_close(out, softmax_ref_np(q, k, v, allowed, bias=_np(bias)), dtype, "dma forward")

  def ref(q, k, v, kb):
    b = jnp.repeat(jnp.transpose(kb, (0, 2, 1)), 2, axis=1)[:, :, None, :]
    return softmax_ref_jnp(q, k, v, allowed, bias=b)
  _check_grads(f, ref, (q, k, v, kb), dtype, 204, "dma")


@SLOW
@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
def test_dynamic_mask_block_lists(backend):
  """Dynamic mask attention through the kernels' data-dependent block lists (GQA):
  forward and jax.vjp (key_bias too) against the explicit top-w reference, and the
  kernels compute exactly the tiles holding a kept key (per query head on GPU, per GQA
  group on TPU)."""
  from attnjax.kernels import flash_wrapper as fw
  T, bq, bk = (64, 16, 16) if backend == "pallas_gpu" else (256, 32, 128)
  q, k, v = _moba_inputs(210, F32, B=1, T=T, N=4, K=2)
  kb = _distinct(213, (1, T, 2), F32)
  allowed = dma_allowed_ref(kb, 4, 5, causal=True)
  bsz = _kmod(backend).BlockSizes(block_q=bq, block_k=bk, num_splits=1)
  f = lambda q, k, v, kb: routing.dynamic_mask_attention(
      q, k, v, kb, keep_window=5, implementation=backend, block_sizes=bsz)
  bias = jnp.repeat(jnp.transpose(jnp.asarray(kb, F32), (0, 2, 1)), 2, axis=1)[:, :, None, :]
  with fw.count_steps() as log:
    out = f(q, k, v, kb)
    jax.effects_barrier()
  assert_close(out, softmax_ref_np(q, k, v, allowed, bias=_np(bias)), F32, "dma kernel fwd")
  head, group = _ref_tiles(allowed, bq, bk, 2)
  assert [active for _, _, active in log] == [int((head if backend == "pallas_gpu"
                                                   else group).sum())]

  def ref(q, k, v, kb):
    b = jnp.repeat(jnp.transpose(kb, (0, 2, 1)), 2, axis=1)[:, :, None, :]
    return softmax_ref_jnp(q, k, v, allowed, bias=b)
  _check_grads(f, ref, (q, k, v, kb), F32, 214, "dma kernel")


@pytest.mark.parametrize("T,w,causal,N,K,dtype", [
    (100, 7, True, 2, 1, F32), (64, 6, False, 2, 2, F32),
    pytest.param(300, 40, True, 4, 2, BF16, marks=SLOW),
    pytest.param(200, 130, True, 2, 1, F32, marks=SLOW)])
def test_dynamic_mask_gather_on_cpu_kernel(T, w, causal, N, K, dtype):
  """The CPU default: each q tile's kept keys compacted into slots on the C++ kernel,
  the bias in extra head dims (its gradient too); ragged T, several q tiles, GQA with
  per-kv-head biases; forward and jax.vjp against the explicit top-w reference; the
  program holds the kernel's forward and backward calls."""
  q, k, v = _moba_inputs(220, dtype, T=T, N=N, K=K, H=16, Hv=16)
  kb = _distinct(223, (2, T, K), dtype)
  allowed = dma_allowed_ref(kb, N, w, causal=causal)

  def ref(q, k, v, kb):
    return softmax_ref_jnp(q, k, v, allowed, bias=jnp.repeat(
        jnp.transpose(kb, (0, 2, 1)), N // K, axis=1)[:, :, None, :])
  f = lambda q, k, v, kb: routing.dynamic_mask_attention(q, k, v, kb, keep_window=w,
                                                         causal=causal)
  assert_close(f(q, k, v, kb), ref(*(jnp.asarray(x, F32) for x in (q, k, v, kb))), dtype,
               "dma gather forward")
  _check_grads(f, ref, (q, k, v, kb), dtype, 224, "dma gather")
  text = jax.jit(jax.grad(lambda *a: f(*a).astype(F32).sum(), argnums=(0, 1, 2, 3))
                 ).lower(q, k, v, kb).as_text()
  assert "attnjax_sparse_fwd" in text and "attnjax_sparse_bwd" in text


@pytest.mark.parametrize("backend", ["xla_chunked", pytest.param("pallas_tpu", marks=SLOW),
                                     pytest.param("pallas_gpu", marks=SLOW)])
def test_dynamic_mask_compacted_on_pallas(backend):
  """Off CPU the compacted keys run as a batch of q tiles through attnjax.attention:
  ``xla_chunked`` and the Pallas kernels (interpreted), fwd + jax.vjp (key_bias too)
  against the explicit top-w reference; a Pallas kernel walks fewer tiles than the tiles
  under the causal diagonal of the whole sequence (which the mask path visits: every key
  tile holds a long-kept key)."""
  from attnjax.kernels import flash_wrapper as fw
  T, w, N, K = (512, 8, 2, 1) if backend != "xla_chunked" else (160, 8, 2, 1)
  q, k, v = _moba_inputs(240, F32, B=1, T=T, N=N, K=K, H=16, Hv=16)
  kb = _distinct(243, (1, T, K), F32)
  allowed = dma_allowed_ref(kb, N, w, causal=True)
  sizes = routing._dma_kernel_sizes(T, w, True)

  def f(q, k, v, kb):
    end = jnp.repeat(routing.dynamic_mask_keep_end(kb, keep_window=w), N // K, axis=1)
    return routing._dma_compacted(q, k, v, kb, jnp.arange(T, dtype=jnp.int32),
                                  end.reshape(N, T), scale=None, sizes=sizes, causal=True,
                                  implementation=backend)

  def ref(q, k, v, kb):
    return softmax_ref_jnp(q, k, v, allowed, bias=jnp.repeat(
        jnp.transpose(kb, (0, 2, 1)), N // K, axis=1)[:, :, None, :])
  with fw.count_steps() as log:
    out = f(q, k, v, kb)
    jax.effects_barrier()
  assert_close(out, ref(q, k, v, kb), F32, f"dma compacted {backend}")
  _check_grads(f, ref, (q, k, v, kb), F32, 244, f"dma compacted {backend}")
  if backend == "xla_chunked":
    return
  (_, bq, bk), active = _kernel_tiles(backend, sizes), log[0][2]
  programs = K if backend == "pallas_tpu" else N      # TPU rows hold a GQA group's heads
  causal_tiles = programs * sum(min(-(-T // bk), (i * bq + bq - 1) // bk + 1)
                                for i in range(T // bq))
  assert 0 < active < causal_tiles, (active, causal_tiles)


def _kernel_tiles(backend, sizes):
  """The Pallas kernels' default tile of the compacted call ``[*, block_q, M]``."""
  bq, _, M = sizes
  mod = _kmod(backend)
  return (None, *mod.BlockSizes().resolve(bq, M))


def test_dynamic_mask_gather_is_observable():
  """Under an analysis capture the compacted call runs the mask path instead: one observed
  attnjax.attention call, the same output."""
  q, k, v = _moba_inputs(250, F32, T=40, N=2, K=2, H=16, Hv=16)
  kb = _distinct(253, (2, 40, 2), F32)
  f = lambda: routing.dynamic_mask_attention(q, k, v, kb, keep_window=5,
                                             implementation="gather")
  want = f()
  seen = []
  with hooks.observe(lambda call: seen.append(call)):
    got = f()
  assert len(seen) == 1 and seen[0].args is not None
  assert_close(got, want, F32, "dma observed")


def test_dynamic_mask_gather_ties_take_the_mask_path():
  """Equal biases keep every allowed key (ties are kept), more than a tile's slots: the
  call takes the mask path and still equals causal attention with the bias."""
  q, k, v = _moba_inputs(230, F32, T=72, N=2, K=2, H=16, Hv=16)
  kb = jnp.full((2, 72, 2), 0.5, F32)
  allowed = np.tril(np.ones((72, 72), bool))[None, None]
  f = lambda q, k, v, kb: routing.dynamic_mask_attention(q, k, v, kb, keep_window=3,
                                                         implementation="gather")
  ref = lambda q, k, v, kb: softmax_ref_jnp(q, k, v, allowed, bias=jnp.transpose(
      kb, (0, 2, 1))[:, :, None, :])
  assert_close(f(q, k, v, kb), ref(q, k, v, kb), F32, "dma ties")
  _check_grads(f, ref, (q, k, v, kb), F32, 231, "dma ties")


@pytest.mark.parametrize("causal", [True, False])
def test_dynamic_mask_keep_end_matches_counting(causal):
  """The per-key end of the keeping rows (order statistics, O(S log S)) against the
  definition counted per (row, key) in loops: row i keeps key j iff j is allowed and
  fewer than w allowed keys have a larger bias.  Ties (integer biases), w > S, S = 1."""
  rng = np.random.default_rng(7 + causal)
  for S, w, tied in [(37, 5, True), (37, 5, False), (20, 30, False), (1, 1, False),
                     (64, 1, True), (50, 17, True)]:
    kb = (rng.integers(0, 5, (2, S, 2)) if tied else rng.standard_normal((2, S, 2)))
    kb = kb.astype(np.float32)
    got = np.asarray(jax.jit(functools.partial(routing.dynamic_mask_keep_end, keep_window=w,
                                               causal=causal))(jnp.asarray(kb)))
    i = np.arange(S)
    for b, h in np.ndindex(2, 2):
      larger = kb[b, :, h][:, None] > kb[b, :, h][None, :]          # [j', j]
      if causal:    # keys j' <= i with a larger bias, for every row i and key j: [i, j]
        n_larger = np.cumsum(larger, axis=0)
        keeps = (i[None, :] <= i[:, None]) & (n_larger < w)
      else:
        keeps = np.broadcast_to(larger.sum(0)[None, :] < w, (S, S))
      for j in range(S):
        rows = np.flatnonzero(keeps[:, j])
        if causal:
          want = rows[-1] + 1 if rows.size else j
          np.testing.assert_array_equal(rows, np.arange(j, want))   # an interval from j
        else:
          want = S if rows.size else 0
        assert got[b, h, j] == want, (S, w, tied, b, h, j, got[b, h, j], want)


def test_dynamic_mask_noncausal_per_query_head():
  q, k, v = _moba_inputs(210, F32, T=16, N=2, K=2)
  kb = _distinct(213, (2, 16, 2), F32)
  allowed = dma_allowed_ref(kb, 2, 6, causal=False)
  bias = _np(jnp.transpose(kb, (0, 2, 1))[:, :, None, :])
  out = routing.dynamic_mask_attention(q, k, v, kb, keep_window=6, causal=False,
                                       implementation="xla_chunked")
  assert_close(out, softmax_ref_np(q, k, v, allowed, bias=bias), F32, "dma non-causal")


# ----------------------------------------------------------------------------- Sparsifiner

@pytest.mark.parametrize("dtype", [F32, BF16])
def test_sparsifiner_matches_reference(dtype):
  q, k, v = _moba_inputs(300, dtype, T=12, N=4, K=2)
  conn = rnd(303, (2, 4, 12, 12), F32)
  keep = 4
  cn = _np(conn)
  allowed = np.zeros(cn.shape, bool)
  for idx in np.ndindex(cn.shape[:3]):
    allowed[idx][np.argsort(-cn[idx], kind="stable")[:keep]] = True
  f = lambda q, k, v: routing.sparsifiner_attention(q, k, v, conn, keep=keep)
  out = f(q, k, v)
  assert out.dtype == dtype
  assert_close(out, softmax_ref_np(q, k, v, allowed), dtype, "sparsifiner forward")
  _check_grads(f, lambda q, k, v: softmax_ref_jnp(q, k, v, allowed), (q, k, v), dtype, 304,
               "sparsifiner")


def test_sparsifiner_distillation_loss():
  q, k, _ = _moba_inputs(310, F32, T=10, N=2, K=1)
  conn = rnd(313, (2, 2, 10, 10), F32)
  qq, kk, cn = _np(q), np.repeat(_np(k), 2, axis=2), _np(conn)
  s = np.einsum("btnh,bsnh->bnts", qq, kk) / np.sqrt(8)
  lp = s - np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
      s.max(-1, keepdims=True)
  lc = cn - np.log(np.exp(cn).sum(-1, keepdims=True))
  want = np.mean(np.sum(np.exp(lp) * (lp - lc), -1))
  loss_fn = lambda c, q, k: routing.sparsifiner_distillation_loss(c, q, k)
  np.testing.assert_allclose(float(loss_fn(conn, q, k)), want, rtol=1e-5)
  gc, gq, gk = jax.grad(loss_fn, argnums=(0, 1, 2))(conn, q, k)
  want_gc = (np.exp(lc) - np.exp(lp)) / (2 * 2 * 10)
  assert_close(gc, want_gc, F32, "d connectivity")
  assert not np.any(np.asarray(gq)) and not np.any(np.asarray(gk))


# ----------------------------------------------------------------------------- errors

def test_errors_name_the_argument():
  q, k, v = _moba_inputs(400, F32, T=16, N=4, K=2)
  with pytest.raises(ValueError, match="top_k"):
    routing.moba_attention(q, k, v, block_size=4, top_k=5)
  with pytest.raises(ValueError, match="block_size"):
    routing.moba_attention(q, k, v, block_size=0, top_k=1)
  with pytest.raises(ValueError, match="rank 4"):
    routing.moba_attention(q[0], k, v, block_size=4, top_k=1)
  with pytest.raises(ValueError, match="multiple of the kv heads"):
    routing.moba_attention(q[:, :, :3], k, v, block_size=4, top_k=1)
  with pytest.raises(ValueError, match="length T"):
    routing.moba_attention(q[:, :8], k, v, block_size=4, top_k=1)
  qm, km, vm = _map_inputs(410, F32, Hh=6, Ww=4)
  with pytest.raises(ValueError, match="num_regions"):
    routing.bi_level_routing_attention(qm, km, vm, num_regions=4, top_k=1)
  with pytest.raises(ValueError, match="top_k"):
    routing.bi_level_routing_attention(qm, km, vm, num_regions=2, top_k=5)
  with pytest.raises(ValueError, match="rank 5"):
    routing.bi_level_routing_attention(_flat(qm), km, vm, num_regions=2, top_k=1)
  with pytest.raises(ValueError, match="key_bias"):
    routing.dynamic_mask_attention(q, k, v, jnp.ones((2, 16, 3)), keep_window=2)
  with pytest.raises(ValueError, match="keep_window"):
    routing.dynamic_mask_attention(q, k, v, jnp.ones((2, 16, 2)), keep_window=0)
  with pytest.raises(ValueError, match="block_sizes is for the kernels"):
    routing.dynamic_mask_attention(q, k, v, jnp.ones((2, 16, 2)), keep_window=2,
                                   implementation="gather", block_sizes=(8, 8))
  with pytest.raises(ValueError, match="keep"):
    routing.sparsifiner_attention(q, k, v, jnp.ones((2, 4, 16, 16)), keep=17)
  with pytest.raises(ValueError, match="threshold"):
    routing.vmoba_attention(qm, km, vm, block_shape=2, threshold=1.5)
  with pytest.raises(ValueError, match="exactly one"):
    routing.vmoba_attention(qm, km, vm, block_shape=2, top_k=1, threshold=0.5)
  with pytest.raises(ValueError, match="gather"):
    routing.vmoba_attention(qm, km, vm, block_shape=2, threshold=0.5, implementation="gather")
  with pytest.raises(ValueError, match="block_shape"):
    routing.vmoba_attention(qm, km, vm, block_shape=(4, 4), top_k=1)
  with pytest.raises(ValueError, match="connectivity"):
    routing.sparsifiner_attention(q, k, v, jnp.ones((2, 4, 16, 15)), keep=2)


# ----------------------------------------------------------------------------- layers

LAYER_CASES = {  # name -> (input shape, options)
    "moba": ((2, 24, 16), dict(block_size=8, top_k=2, rope="1d")),
    "biformer": ((2, 4, 4, 16), dict(num_regions=2, top_k=2, lce_kernel=3)),
    "dynamic_mask": ((2, 24, 16), dict(keep_window=6)),
    "sparsifiner": ((2, 4, 4, 16), dict(keep_rate=0.5)),
}


@pytest.mark.parametrize("name", ["moba", "biformer", pytest.param("dynamic_mask", marks=SLOW),
                                  pytest.param("sparsifiner", marks=SLOW)])
def test_layer_shapes_gradients_and_linen_twin(name):
  shape, opts = LAYER_CASES[name]
  entry = variants.info(name)
  assert entry.kind == RL.KINDS[name] and entry.linen is not None
  x = rnd(500, shape)
  m = variants.build(name, d_model=16, num_heads=4, num_kv_heads=2, rngs=nnx.Rngs(0), **opts)
  params = nnx.state(m, nnx.Param).to_pure_dict()
  y = jax.jit(lambda a: m(a))(x)         # jitted: eager dispatch costs 4-7x here
  assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
  ct = rnd(501, x.shape)
  gp, gx = jax.jit(jax.grad(lambda p, a: jnp.sum(RL.forward(m.config, p, a) * ct),
                            argnums=(0, 1)))(params, x)
  no_grad = ("pq_kernel", "pk_kernel")   # Sparsifiner's predictor learns by distillation
  for path, g in jax.tree_util.tree_leaves_with_path(gp):
    assert bool(jnp.all(jnp.isfinite(g))), (name, path)
    if not any(n in jax.tree_util.keystr(path) for n in no_grad):
      assert float(jnp.max(jnp.abs(g))) > 0, (name, path, "zero gradient")
  assert float(jnp.max(jnp.abs(gx))) > 0
  lm = variants.get_linen(name)(d_model=16, num_heads=4, num_kv_heads=2, **opts)
  lp = jax.eval_shape(lambda: lm.init(jax.random.key(0), x))["params"]   # shapes only
  assert jax.tree.map(jnp.shape, nn.unbox(lp)) == jax.tree.map(jnp.shape, params), name
  y1, vjp1 = jax.vjp(jax.jit(lambda a: m(a)), x)
  y2, vjp2 = jax.vjp(jax.jit(lambda a: lm.apply({"params": params}, a)), x)
  np.testing.assert_array_equal(y1, y2)
  np.testing.assert_array_equal(vjp1(ct)[0], vjp2(ct)[0])


def test_sparsifiner_layer_distillation_trains_the_predictor():
  m = variants.build("sparsifiner", d_model=16, num_heads=4, rngs=nnx.Rngs(1))
  x = rnd(510, (2, 4, 4, 16))
  params = nnx.state(m, nnx.Param).to_pure_dict()
  g = jax.grad(lambda p: RL.distillation_loss(m.config, p, x))(params)
  assert float(jnp.max(jnp.abs(g["pq_kernel"]))) > 0
  assert float(jnp.max(jnp.abs(g["q_kernel"]))) == 0     # the dense target is fixed
  assert np.isfinite(float(m.distillation_loss(x)))


def test_layer_errors_name_the_option():
  rngs = nnx.Rngs(0)
  with pytest.raises(ValueError, match="lce_kernel"):
    variants.build("biformer", d_model=16, num_heads=4, lce_kernel=4, rngs=rngs)
  with pytest.raises(ValueError, match="keep_rate"):
    variants.build("sparsifiner", d_model=16, num_heads=4, keep_rate=1.5, rngs=rngs)
  with pytest.raises(TypeError, match="unknown option"):
    variants.build("moba", d_model=16, num_heads=4, window=3, rngs=rngs)
  with pytest.raises(ValueError, match="num_regions"):
    variants.build("biformer", d_model=16, num_heads=4, num_regions=3, rngs=rngs)(
        rnd(0, (1, 4, 4, 16)))
  with pytest.raises(ValueError, match="segment_ids"):
    variants.build("moba", d_model=16, num_heads=4, rngs=rngs)(
        rnd(0, (1, 8, 16)), segment_ids=jnp.zeros((1, 8), jnp.int32))


def _train_runlocal(config, arg, tmp_path):
  from attnjax.train import trainer
  spec = importlib.util.spec_from_file_location(f"cfg_{config}",
                                                os.path.join(ROOT, "configs", f"{config}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(arg)
  c.data.data_dir = str(tmp_path / "data")
  c.tensorboard = False
  c.progress_bar = False
  c.checkpoint_every = 0
  res = trainer.train_and_evaluate(c, str(tmp_path / "w"))
  assert res["status"] == "done" and res["step"] == c.num_steps
  assert all(np.isfinite(v) for k, v in res.items() if k not in ("status", "step"))
  return res


@pytest.mark.slow
def test_train_runlocal_moba_mqar(tmp_path):
  _train_runlocal("mqar", "variant=moba,runlocal", tmp_path)


@pytest.mark.slow
def test_train_runlocal_biformer_digits(tmp_path):
  _train_runlocal("digits_vit", "variant=biformer,runlocal", tmp_path)


def test_block_sparse_hook_is_registered_and_checks_its_arguments():
  """The ops reach the C++ block-sparse kernel through core.hooks (attnjax.dispatch
  registers it); registering something that is not callable raises TypeError."""
  from attnjax.cpu import flash
  assert hooks.block_sparse_available() == flash.available()
  with pytest.raises(TypeError, match="callable"):
    hooks.register_block_sparse(None, lambda: True)
  with pytest.raises(TypeError, match="callable"):
    hooks.register_block_sparse(lambda *a, **k: None, True)
  with pytest.raises(TypeError, match="callable"):
    hooks.register_block_sparse(lambda *a, **k: None, lambda: True, parts=3)
  assert hooks.block_sparse_available() == flash.available()   # the registration stands
  fwd, bwd = hooks.block_sparse_parts()
  assert callable(fwd) and callable(bwd)
