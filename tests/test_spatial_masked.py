"""attnjax.ops.spatial mask-based ops (window, neighborhood, halo, criss-cross, stripe,
MaxViT block/grid) and masks.halo / masks.stripe, against independent plain references.

The references follow the papers' definitions, not the masks: Swin rolls the map,
partitions it into windows, attends per window with the region mask and unrolls; MaxViT
block/grid reshape the map into windows/grid groups; NATTEN, HaloNet, CCNet and CSWin
build each query's key set with explicit NumPy loops. Forward and vjp (random
cotangents, rpb gradients included), f32 and bf16, odd maps, every implementation.
"""

import itertools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import xla_flags
from flax import nnx
from helpers import assert_close, rnd

from attnjax import masks, variants
from attnjax.ops import spatial as S

# ----------------------------------------------------------------------------- references


def _attend(q, k, v, allowed, bias=None, scale=None):
  """Dense float32 softmax attention on tokens.  q [..., T, N, H], k/v [..., S, K, *];
  allowed bool broadcastable to [..., N, T, S]; bias float broadcastable to it."""
  f = lambda x: x.astype(jnp.float32)
  q, k, v = f(q), f(k), f(v)
  g = q.shape[-2] // k.shape[-2]
  k, v = jnp.repeat(k, g, axis=-2), jnp.repeat(v, g, axis=-2)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  s = jnp.einsum("...tnh,...snh->...nts", q, k) * scale
  if bias is not None:
    s = s + bias
  s = jnp.where(allowed, s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  return jnp.einsum("...nts,...snh->...tnh", p, v)


def ref_swin(q, k, v, window, shift, rpb=None):
  """Swin: roll by -shift, partition into windows, attend per window with the region
  mask (and rpb indexed by query minus key inside the window), unpartition, roll back."""
  B, Hh, Ww, N, _ = q.shape
  (wh, ww), (sh, sw) = window, shift
  roll = lambda x, s: jnp.roll(x, (-s[0], -s[1]), axis=(1, 2))

  def part(x):  # [B, Hh, Ww, n, d] -> [B, nwin, wh*ww, n, d]
    x = x.reshape(B, Hh // wh, wh, Ww // ww, ww, *x.shape[3:])
    return x.transpose(0, 1, 3, 2, 4, 5, 6).reshape(B, -1, wh * ww, *x.shape[5:])

  def region(L, w, s):
    p = np.arange(L)
    return (p >= L - w).astype(int) + (p >= L - s).astype(int) if s else np.zeros(L, int)

  ids = region(Hh, wh, sh)[:, None] * 3 + region(Ww, ww, sw)[None, :]
  ids = ids.reshape(Hh // wh, wh, Ww // ww, ww).transpose(0, 2, 1, 3).reshape(-1, wh * ww)
  allowed = (ids[:, :, None] == ids[:, None, :])[None, :, None]  # [1, nwin, 1, t, s]
  bias = None
  if rpb is not None:
    y, x = np.divmod(np.arange(wh * ww), ww)
    bias = rpb[:, (y[:, None] - y[None, :]) + wh - 1, (x[:, None] - x[None, :]) + ww - 1]
    bias = bias[None, None].astype(jnp.float32)
  o = _attend(part(roll(q, (sh, sw))), part(roll(k, (sh, sw))), part(roll(v, (sh, sw))),
              allowed, bias)
  o = o.reshape(B, Hh // wh, Ww // ww, wh, ww, N, -1).transpose(0, 1, 3, 2, 4, 5, 6)
  o = o.reshape(B, Hh, Ww, N, -1)
  return jnp.roll(o, (sh, sw), axis=(1, 2)).astype(q.dtype)


def ref_grid(q, k, v, grid, rpb=None):
  """MaxViT grid: [B, Gh*sh, Gw*sw] -> [B, sh, sw, Gh*Gw] groups, attend, undo."""
  B, Hh, Ww, N, _ = q.shape
  Gh, Gw = grid
  sh, sw = Hh // Gh, Ww // Gw

  def part(x):
    x = x.reshape(B, Gh, sh, Gw, sw, *x.shape[3:])
    return x.transpose(0, 2, 4, 1, 3, 5, 6).reshape(B, sh * sw, Gh * Gw, *x.shape[5:])

  bias = None
  if rpb is not None:
    y, x = np.divmod(np.arange(Gh * Gw), Gw)
    bias = rpb[:, (y[:, None] - y[None, :]) + Gh - 1, (x[:, None] - x[None, :]) + Gw - 1]
    bias = bias[None, None].astype(jnp.float32)
  o = _attend(part(q), part(k), part(v), True, bias)
  o = o.reshape(B, sh, sw, Gh, Gw, N, -1).transpose(0, 3, 1, 4, 2, 5, 6)
  return o.reshape(B, Hh, Ww, N, -1).astype(q.dtype)


def _flat(x):
  return x.reshape(x.shape[0], -1, *x.shape[-2:])


def ref_keysets(q, k, v, allowed, bias=None):
  """Attention on the flattened map with an explicit [N or 1, T, S] key-set array."""
  o = _attend(_flat(q), _flat(k), _flat(v), jnp.asarray(allowed)[None], bias)
  return o.reshape(q.shape[:-1] + (v.shape[-1],)).astype(q.dtype)


def natten_keys(L, k, d, causal):
  """Per position i of one axis: the key positions of NATTEN's window (DESIGN section 9)."""
  out = []
  for i in range(L):
    r, g = i % d, i // d
    Lr = len(range(r, L, d))
    if causal:
      js = range(max(g - k + 1, 0), g + 1)
    else:
      start = min(max(g - k // 2, 0), Lr - k)
      js = range(start, start + k)
    out.append([r + d * j for j in js])
  return out


def natten_allowed_and_rel(shape, kernel, dilation, causal):
  """allowed [T, S] and the per-axis rpb index (key minus query in group indices,
  + k - 1; -1 where not allowed) [nd, T, S], from per-axis key lists."""
  per_axis = [natten_keys(L, kk, dd, c) for L, kk, dd, c in zip(shape, kernel, dilation, causal)]
  coords = list(itertools.product(*[range(L) for L in shape]))
  T = len(coords)
  index = {c: i for i, c in enumerate(coords)}
  allowed = np.zeros((T, T), bool)
  rel = np.full((len(shape), T, T), -1)
  for qi, qc in enumerate(coords):
    for kc in itertools.product(*[per_axis[a][qc[a]] for a in range(len(shape))]):
      ki = index[kc]
      allowed[qi, ki] = True
      for a in range(len(shape)):
        rel[a, qi, ki] = kc[a] // dilation[a] - qc[a] // dilation[a] + kernel[a] - 1
  return allowed, rel


def halo_allowed(shape, block, halo):
  Hh, Ww = shape
  allowed = np.zeros((Hh * Ww, Hh * Ww), bool)
  for y, x in itertools.product(range(Hh), range(Ww)):
    y0, x0 = (y // block[0]) * block[0], (x // block[1]) * block[1]
    for ky in range(max(y0 - halo[0], 0), min(y0 + block[0] + halo[0], Hh)):
      for kx in range(max(x0 - halo[1], 0), min(x0 + block[1] + halo[1], Ww)):
        allowed[y * Ww + x, ky * Ww + kx] = True
  return allowed


def criss_cross_allowed(shape):
  Hh, Ww = shape
  allowed = np.zeros((Hh * Ww, Hh * Ww), bool)
  for y, x in itertools.product(range(Hh), range(Ww)):
    for kx in range(Ww):
      allowed[y * Ww + x, y * Ww + kx] = True
    for ky in range(Hh):
      allowed[y * Ww + x, ky * Ww + x] = True
  return allowed


def stripe_allowed(shape, width, num_heads):
  """[N, T, S]: heads < ceil(N/2) horizontal stripes of width[0] rows, the others
  vertical stripes of width[1] columns (CSWin's head split)."""
  Hh, Ww = shape
  rows = [list(range(s, min(s + width[0], Hh))) for s in range(0, Hh, width[0])]
  cols = [list(range(s, min(s + width[1], Ww))) for s in range(0, Ww, width[1])]
  hor = np.zeros((Hh * Ww, Hh * Ww), bool)
  ver = np.zeros_like(hor)
  for stripe_rows in rows:
    toks = [y * Ww + x for y in stripe_rows for x in range(Ww)]
    hor[np.ix_(toks, toks)] = True
  for stripe_cols in cols:
    toks = [y * Ww + x for y in range(Hh) for x in stripe_cols]
    ver[np.ix_(toks, toks)] = True
  n1 = (num_heads + 1) // 2
  return np.stack([hor] * n1 + [ver] * (num_heads - n1))


# ----------------------------------------------------------------------------- harness


def _qkv(seed, shape, N, K, H, Hv, dtype):
  B = 2
  return (rnd(seed, (B, *shape, N, H), dtype), rnd(seed + 1, (B, *shape, K, H), dtype),
          rnd(seed + 2, (B, *shape, K, Hv), dtype))


def check_fwd_vjp(fn, ref, q, k, v, extra=(), seed=0, what=""):
  """fn(q, k, v, *extra) vs ref(q, k, v, *extra): forward and vjp w.r.t. all inputs (each
  side jitted once: eager vjps compile every primitive separately)."""
  dtype = q.dtype
  args = (q, k, v, *extra)
  ct = rnd(seed + 99, q.shape[:-1] + (v.shape[-1],), dtype)

  def fwd_bwd(f):
    def run(args, ct):
      out, vjp = jax.vjp(f, *args)
      return out, vjp(ct)
    return jax.jit(run)(args, ct)

  out, grads = fwd_bwd(fn)
  want, grads_ref = fwd_bwd(ref)
  assert out.shape == want.shape == q.shape[:-1] + (v.shape[-1],)
  assert out.dtype == dtype
  assert_close(out, want, dtype, f"{what} out")
  names = ["dq", "dk", "dv"] + [f"d{i}" for i in range(len(extra))]
  for name, g, gr in zip(names, grads, grads_ref):
    assert float(jnp.max(jnp.abs(gr.astype(jnp.float32)))) > 0, f"{what} {name}: zero reference"
    assert_close(g, gr, dtype, f"{what} {name}")


# ----------------------------------------------------------------------------- the ops


@pytest.mark.parametrize("window,shift,rpb,dtype", [
    ((4, 6), (2, 3), True, jnp.float32), ((3, 6), (1, 2), False, jnp.bfloat16),
    pytest.param((3, 3), (0, 0), True, jnp.bfloat16, marks=pytest.mark.slow),
    pytest.param((4, 6), (2, 3), True, jnp.bfloat16, marks=pytest.mark.slow)])
def test_window_attention_matches_swin_reference(window, shift, rpb, dtype):
  q, k, v = _qkv(0, (12, 18), 4, 2, 8, 6, dtype)
  extra = (rnd(5, (4, 2 * window[0] - 1, 2 * window[1] - 1)),) if rpb else ()
  fn = lambda q, k, v, *t: S.window_attention(q, k, v, window_size=window, shift=shift,
                                              rpb=t[0] if t else None)
  ref = lambda q, k, v, *t: ref_swin(q, k, v, window, shift, t[0] if t else None)
  check_fwd_vjp(fn, ref, q, k, v, extra, what=f"swin {window} {shift}")


def test_window_attention_int_args_and_scale():
  q, k, v = _qkv(1, (6, 9), 2, 2, 4, 4, jnp.float32)
  got = S.window_attention(q, k, v, window_size=3, shift=1, scale=0.3)
  want = ref_swin(q * (0.3 * 2.0), k, v, (3, 3), (1, 1))  # H=4: default scale 1/2
  assert_close(got, want, jnp.float32, "window scale")


_NAT_CASES = [
    ((17,), (5,), (1,), (False,), True, jnp.float32),
    pytest.param((29,), (3,), (4,), (False,), True, jnp.bfloat16, marks=pytest.mark.slow),
    ((13, 17), (3, 5), (2, 3), (False, False), True, jnp.float32),
    ((13, 17), (3, 3), (1, 1), (False, False), True, jnp.bfloat16),
    ((13, 17), (5, 3), (2, 1), (True, False), False, jnp.float32),
    pytest.param((11,), (3,), (2,), (True,), False, jnp.bfloat16, marks=pytest.mark.slow),
    ((5, 6, 7), (3, 3, 5), (1, 2, 1), (False, False, False), True, jnp.float32),
    pytest.param((5, 6, 7), (3, 3, 3), (1, 1, 2), (False, True, True), False, jnp.float32,
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("shape,kernel,dilation,causal,rpb,dtype", _NAT_CASES)
def test_neighborhood_attention_matches_natten_reference(shape, kernel, dilation, causal, rpb,
                                                         dtype):
  q, k, v = _qkv(2, shape, 4, 2, 8, 6, dtype)
  allowed, rel = natten_allowed_and_rel(shape, kernel, dilation, causal)
  assert (allowed.sum(1) == (np.prod(kernel) if not any(causal) else allowed.sum(1))).all()
  extra = (rnd(6, (4, *[2 * x - 1 for x in kernel])),) if rpb else ()
  idx = tuple(np.clip(r, 0, None) for r in rel)

  def fn(q, k, v, *t):
    return S.neighborhood_attention(q, k, v, kernel_size=kernel, dilation=dilation,
                                    causal=causal if len(set(causal)) > 1 else causal[0],
                                    rpb=t[0] if t else None)

  def ref(q, k, v, *t):
    bias = t[0][(slice(None),) + idx][None].astype(jnp.float32) if t else None
    return ref_keysets(q, k, v, allowed, bias)
  check_fwd_vjp(fn, ref, q, k, v, extra, what=f"natten {shape} {kernel} {dilation} {causal}")


@pytest.mark.parametrize("shape,block,halo,dtype", [
    ((13, 17), (4, 4), (1, 1), jnp.float32), ((12, 10), (3, 5), (2, 0), jnp.bfloat16),
    pytest.param((13, 17), (4, 4), (1, 1), jnp.bfloat16, marks=pytest.mark.slow),
    pytest.param((12, 10), (3, 5), (2, 0), jnp.float32, marks=pytest.mark.slow)])
def test_halo_attention_matches_reference(shape, block, halo, dtype):
  q, k, v = _qkv(3, shape, 2, 1, 8, 4, dtype)
  allowed = halo_allowed(shape, block, halo)
  fn = lambda q, k, v: S.halo_attention(q, k, v, block_size=block, halo_size=halo)
  check_fwd_vjp(fn, lambda q, k, v: ref_keysets(q, k, v, allowed), q, k, v,
                what=f"halo {shape} {block} {halo}")


@pytest.mark.parametrize("dtype", [jnp.float32,
                                   pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
def test_criss_cross_attention_matches_reference(dtype):
  shape = (13, 17)
  q, k, v = _qkv(4, shape, 2, 2, 8, 8, dtype)
  allowed = criss_cross_allowed(shape)
  assert (allowed.sum(1) == 13 + 17 - 1).all()  # itself counted once
  check_fwd_vjp(S.criss_cross_attention, lambda q, k, v: ref_keysets(q, k, v, allowed),
                q, k, v, what="criss_cross")


@pytest.mark.parametrize("shape", [(6, 5), (1, 7)])
def test_criss_cross_split_calls_and_masked_path(shape, monkeypatch):
  """By default criss-cross runs as two dense calls (rows; columns less the diagonal)
  merged by their log-sum-exps; with block_sizes (for the masked call) it is one call
  with the criss_cross mask.  Both equal the loop reference, forward and vjp, GQA; a
  one-row map (no other key in any column) stays finite."""
  from attnjax.core import hooks
  from attnjax.ops.chunked import ChunkedBlockSizes
  from attnjax.ops.spatial import windowed
  calls = []
  inner = hooks.attention

  def counting(*a, **kw):
    calls.append(kw.get("mask"))
    return inner(*a, **kw)
  monkeypatch.setattr(windowed.hooks, "attention", counting)
  q, k, v = _qkv(5, shape, 4, 2, 8, 8, jnp.float32)
  allowed = criss_cross_allowed(shape)
  ref = lambda q, k, v: ref_keysets(q, k, v, allowed)
  check_fwd_vjp(S.criss_cross_attention, ref, q, k, v, what="criss_cross split")
  assert len(calls) == 2 and calls[0] is None and calls[1].kind == "not", calls
  calls.clear()
  masked = lambda q, k, v: S.criss_cross_attention(
      q, k, v, implementation="xla_chunked", block_sizes=ChunkedBlockSizes(block_q=16))
  check_fwd_vjp(masked, ref, q, k, v, what="criss_cross masked")
  assert len(calls) == 1 and calls[0].kind == "criss_cross", calls


@pytest.mark.parametrize("N,K,width,dtype", [
    (4, 2, 3, jnp.float32), (3, 1, (4, 5), jnp.float32),
    pytest.param(5, 5, 2, jnp.bfloat16, marks=pytest.mark.slow),
    pytest.param(1, 1, 4, jnp.float32, marks=pytest.mark.slow)])
def test_stripe_attention_matches_cswin_reference(N, K, width, dtype):
  shape = (13, 17)
  q, k, v = _qkv(5, shape, N, K, 8, 4, dtype)
  w = (width, width) if isinstance(width, int) else width
  allowed = stripe_allowed(shape, w, N)
  fn = lambda q, k, v: S.stripe_attention(q, k, v, stripe_width=width)
  check_fwd_vjp(fn, lambda q, k, v: ref_keysets(q, k, v, allowed), q, k, v,
                what=f"stripe N={N} K={K} {width}")
  assert S.stripe_heads(N) == (N + 1) // 2


@pytest.mark.parametrize("grid,rpb,dtype", [
    ((3, 6), True, jnp.float32), ((4, 2), False, jnp.bfloat16),
    pytest.param((3, 6), True, jnp.bfloat16, marks=pytest.mark.slow),
    pytest.param((4, 2), False, jnp.float32, marks=pytest.mark.slow)])
def test_grid_attention_matches_maxvit_reference(grid, rpb, dtype):
  q, k, v = _qkv(6, (12, 18), 4, 2, 8, 6, dtype)
  extra = (rnd(7, (4, 2 * grid[0] - 1, 2 * grid[1] - 1)),) if rpb else ()
  fn = lambda q, k, v, *t: S.grid_attention(q, k, v, grid_size=grid, rpb=t[0] if t else None)
  ref = lambda q, k, v, *t: ref_grid(q, k, v, grid, t[0] if t else None)
  check_fwd_vjp(fn, ref, q, k, v, extra, what=f"grid {grid}")


@pytest.mark.parametrize("dtype", [jnp.float32,
                                   pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
def test_block_attention_matches_maxvit_reference(dtype):
  q, k, v = _qkv(7, (12, 18), 4, 4, 8, 6, dtype)
  rpb = rnd(8, (4, 7, 5))
  fn = lambda q, k, v, t: S.block_attention(q, k, v, block_size=(4, 3), rpb=t)
  ref = lambda q, k, v, t: ref_swin(q, k, v, (4, 3), (0, 0), t)
  check_fwd_vjp(fn, ref, q, k, v, (rpb,), what="block")


# ----------------------------------------------------------------------------- implementations

# One small case per op; every implementation must agree with the plain reference,
# forward and backward.  'cpu_flash' serves band masks and (block-sparse mode) static
# head-independent masks: it is asked first and may hand the call to 'xla_chunked' (the
# dispatcher's fallback), which must still be right.
_SMALL = (4, 6)
_IMPL_CASES = {
    "window": (lambda q, k, v, t: S.window_attention(q, k, v, window_size=(2, 3), shift=(1, 1),
                                                      rpb=t, implementation=IMPL[0]),
               lambda q, k, v, t: ref_swin(q, k, v, (2, 3), (1, 1), t), (2, 3, 5)),
    "neighborhood": (lambda q, k, v, t: S.neighborhood_attention(
        q, k, v, kernel_size=3, dilation=(1, 2), rpb=t, implementation=IMPL[0]), None, (2, 5, 5)),
    "halo": (lambda q, k, v: S.halo_attention(q, k, v, block_size=2, halo_size=1,
                                              implementation=IMPL[0]),
             lambda q, k, v: ref_keysets(q, k, v, halo_allowed(_SMALL, (2, 2), (1, 1))), None),
    "criss_cross": (lambda q, k, v: S.criss_cross_attention(q, k, v, implementation=IMPL[0]),
                    lambda q, k, v: ref_keysets(q, k, v, criss_cross_allowed(_SMALL)), None),
    "stripe": (lambda q, k, v: S.stripe_attention(q, k, v, stripe_width=(3, 4),
                                                  implementation=IMPL[0]),
               lambda q, k, v: ref_keysets(q, k, v, stripe_allowed(_SMALL, (3, 4), 2)), None),
    "grid": (lambda q, k, v, t: S.grid_attention(q, k, v, grid_size=2, rpb=t,
                                                  implementation=IMPL[0]),
             lambda q, k, v, t: ref_grid(q, k, v, (2, 2), t), (2, 3, 3)),
    "block": (lambda q, k, v: S.block_attention(q, k, v, block_size=2, implementation=IMPL[0]),
              lambda q, k, v: ref_swin(q, k, v, (2, 2), (0, 0)), None),
}
IMPL = [None]
_IMPLS = ["xla", "xla_chunked", ("cpu_flash", "xla_chunked"), "pallas_tpu", "pallas_gpu"]
# Compile time on 2 cores: 'xla' runs every op by default, 'xla_chunked' four; the cpu_flash
# fallback and the interpreted Pallas kernels run a score-mod op and the head-split op by
# default, the other combinations under -m slow.
_DEFAULT = {"xla": tuple(_IMPL_CASES),
            "xla_chunked": ("window", "neighborhood", "halo", "stripe"),
            ("cpu_flash", "xla_chunked"): ("window", "halo"),
            "pallas_tpu": ("window", "stripe"), "pallas_gpu": ("neighborhood",)}


def _nat_ref(q, k, v, t):
  allowed, rel = natten_allowed_and_rel(_SMALL, (3, 3), (1, 2), (False, False))
  bias = t[(slice(None),) + tuple(np.clip(r, 0, None) for r in rel)][None].astype(jnp.float32)
  return ref_keysets(q, k, v, allowed, bias)


@pytest.mark.parametrize("impl,op", [
    pytest.param(i, o, marks=() if o in _DEFAULT[i] else pytest.mark.slow, id=f"{i}-{o}")
    for i in _IMPLS for o in _IMPL_CASES])
def test_every_implementation_matches_reference(impl, op):
  fn, ref, table = _IMPL_CASES[op]
  ref = ref or _nat_ref
  q, k, v = _qkv(11, _SMALL, 2, 1, 4, 4, jnp.float32)
  extra = (rnd(12, table),) if table else ()
  IMPL[0] = impl
  try:
    check_fwd_vjp(fn, ref, q, k, v, extra, what=f"{op} {impl}")
  finally:
    IMPL[0] = None


# ----------------------------------------------------------------------------- masks


def test_new_masks_are_typed_and_round_trip():
  h = masks.halo((5, 7), (2, 3), (1, 0))
  s = masks.stripe((5, 7), 2, 1)
  assert h.kind == "halo" and h.params == {"shape": (5, 7), "block": (2, 3), "halo": (1, 0)}
  assert s.kind == "stripe" and s.params == {"shape": (5, 7), "width": 2, "axis": 1}
  assert "halo" in masks.KINDS and "stripe" in masks.KINDS
  np.testing.assert_array_equal(h.to_array(35, 35)[0, 0], halo_allowed((5, 7), (2, 3), (1, 0)))
  np.testing.assert_array_equal(s.to_array(35, 35)[0, 0], stripe_allowed((5, 7), (1, 2), 2)[1])
  for m in (h, s):
    leaves, tree = jax.tree_util.tree_flatten(m)
    m2 = jax.tree_util.tree_unflatten(tree, leaves)
    assert (m2.kind, m2.params) == (m.kind, m.params)
    np.testing.assert_array_equal(m2.to_array(35, 35), m.to_array(35, 35))
    table = m.block_table(35, 35, 8, 8)
    dense = m.to_array(35, 35)[0, 0]
    for i, j in np.ndindex(table.shape[2:]):
      tile = dense[i * 8:(i + 1) * 8, j * 8:(j + 1) * 8]
      assert table[0, 0, i, j] == (2 if tile.all() else 1 if tile.any() else 0)


# ----------------------------------------------------------------------------- errors


def _x(shape, heads=2, dim=4):
  return rnd(0, (1, *shape, heads, dim))


@pytest.mark.parametrize("call,match", [
    (lambda x: S.window_attention(x, x, x, window_size=(4, 4)), r"window_size must divide"),
    (lambda x: S.window_attention(x, x, x, window_size=3, shift=3), r"shift must be < window_size"),
    (lambda x: S.window_attention(x, x, x, window_size=3, rpb=jnp.zeros((2, 3, 3))),
     r"rpb must have shape \[N, 2\*wh-1, 2\*ww-1\] = \(2, 5, 5\)"),
    (lambda x: S.neighborhood_attention(x, x, x, kernel_size=7), r"kernel_size \* dilation"),
    (lambda x: S.neighborhood_attention(x, x, x, kernel_size=3, dilation=3),
     r"kernel_size \* dilation must be <= the map size"),
    (lambda x: S.neighborhood_attention(x, x, x, kernel_size=2), r"kernel_size must be odd"),
    (lambda x: S.neighborhood_attention(x, x, x, kernel_size=3, rpb=jnp.zeros((2, 3, 3))),
     r"rpb must have shape .* \(2, 5, 5\)"),
    (lambda x: S.neighborhood_attention(x, x, x, kernel_size=3, causal=True,
                                        rpb=jnp.zeros((2, 5, 5))), r"rpb .* causal=False"),
    (lambda x: S.neighborhood_attention(x, x, x, kernel_size=3, causal=(True,)),
     r"causal must be a bool or a tuple of 2"),
    (lambda x: S.halo_attention(x, x, x, block_size=7, halo_size=1), r"block_size must be <="),
    (lambda x: S.halo_attention(x, x, x, block_size=2, halo_size=-1), r"halo_size must be >= 0"),
    (lambda x: S.stripe_attention(x, x, x, stripe_width=7), r"stripe_width must be <="),
    (lambda x: S.grid_attention(x, x, x, grid_size=4), r"grid_size must divide"),
    (lambda x: S.grid_attention(x, x, x, grid_size=3, rpb=jnp.zeros((2, 3, 3))),
     r"rpb must have shape \[N, 2\*Gh-1, 2\*Gw-1\] = \(2, 5, 5\)"),
    (lambda x: S.block_attention(x, x, x, block_size=(2, 4)), r"block_size must divide"),
])
def test_bad_arguments_raise_value_error(call, match):
  with pytest.raises(ValueError, match=match):
    call(_x((6, 6)))


@pytest.mark.parametrize("op", [
    lambda x: S.window_attention(x, x, x, window_size=2),
    lambda x: S.halo_attention(x, x, x, block_size=2, halo_size=1),
    lambda x: S.criss_cross_attention(x, x, x),
    lambda x: S.stripe_attention(x, x, x, stripe_width=2),
    lambda x: S.grid_attention(x, x, x, grid_size=2),
    lambda x: S.block_attention(x, x, x, block_size=2),
])
def test_2d_ops_reject_other_ranks(op):
  with pytest.raises(ValueError, match=r"\[B, Hh, Ww, N, H\] \(rank 5"):
    op(_x((6,)))
  with pytest.raises(ValueError, match=r"rank 5"):
    op(_x((4, 4, 4)))


def test_neighborhood_rank_and_map_mismatch():
  with pytest.raises(ValueError, match=r"rank 4 or 5 or 6"):
    S.neighborhood_attention(_x((2, 2, 2, 2)), _x((2, 2, 2, 2)), _x((2, 2, 2, 2)), kernel_size=1)
  with pytest.raises(ValueError, match=r"k must be \[B, \*spatial, K, dim\] on the map of q"):
    S.neighborhood_attention(_x((6, 6)), _x((6, 5)), _x((6, 6)), kernel_size=3)
  with pytest.raises(TypeError, match="q must be an array"):
    S.criss_cross_attention([1], _x((3, 3)), _x((3, 3)))


def test_new_mask_constructor_errors():
  with pytest.raises(ValueError, match="block must be <="):
    masks.halo((4, 4), 5, 1)
  with pytest.raises(ValueError, match="stripe needs a 2D shape"):
    masks.stripe((4,), 2, 0)
  with pytest.raises(ValueError, match="axis must be 0"):
    masks.stripe((4, 4), 2, 2)
  with pytest.raises(ValueError, match="width must be <="):
    masks.stripe((4, 4), 5, 0)


# ----------------------------------------------------------------------------- layers

_LAYERS = ("halo", "cswin", "ccnet", "maxvit_block", "maxvit_grid")


def _layer_ref(name, p, x, opts):
  """The layer from its parameters: projections, the plain reference op, LePE (explicit
  loops), CCNet's recurrence, output projection."""
  B, Hh, Ww, _ = x.shape

  def attend(x):
    q = jnp.einsum("bhwd,dnk->bhwnk", x, p["q_kernel"])
    k = jnp.einsum("bhwd,dnk->bhwnk", x, p["k_kernel"])
    v = jnp.einsum("bhwd,dnk->bhwnk", x, p["v_kernel"])
    if name == "halo":
      o = ref_keysets(q, k, v, halo_allowed((Hh, Ww), opts["block"], opts["halo"]))
    elif name == "cswin":
      o = ref_keysets(q, k, v, stripe_allowed((Hh, Ww), opts["width"], q.shape[-2]))
      K, Hv = v.shape[-2:]
      lepe = jax.lax.conv_general_dilated(  # depthwise: one group per channel
          v.reshape(B, Hh, Ww, K * Hv), p["lepe_kernel"].reshape(3, 3, 1, K * Hv), (1, 1),
          "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=K * Hv,
          precision="highest")
      lepe = lepe.reshape(v.shape) + p["lepe_bias"]
      o = o + jnp.repeat(lepe, q.shape[-2] // k.shape[-2], axis=-2)
    elif name == "ccnet":
      o = ref_keysets(q, k, v, criss_cross_allowed((Hh, Ww)))
    elif name == "maxvit_block":
      o = ref_swin(q, k, v, opts["block"], (0, 0), p["rpb"])
    else:
      o = ref_grid(q, k, v, opts["grid"], p["rpb"])
    return jnp.einsum("bhwnk,nkd->bhwd", o, p["o_kernel"])

  if name == "ccnet":
    return attend(x + attend(x))
  return attend(x)


@pytest.mark.parametrize("name,options,ref_opts", [
    ("halo", dict(block_size=(2, 3), halo_size=1), dict(block=(2, 3), halo=(1, 1))),
    ("cswin", dict(stripe_width=2, num_kv_heads=1), dict(width=(2, 2))),
    ("ccnet", {}, {}),
    ("maxvit_block", dict(block_size=(2, 3)), dict(block=(2, 3))),
    ("maxvit_grid", dict(grid_size=(3, 2)), dict(grid=(3, 2))),
])
def test_layer_matches_reference_and_linen_twin(name, options, ref_opts):
  assert variants.info(name).kind == "spatial"
  x = rnd(20, (2, 6, 6, 12))
  m = variants.build(name, d_model=12, num_heads=3, rngs=nnx.Rngs(0), **options)
  params = {k: a + 0.1 * rnd(21 + i, a.shape) for i, (k, a) in enumerate(m.params_dict().items())}
  for k, a in params.items():
    getattr(m, k)[...] = a
  lm = variants.get_linen(name)(d_model=12, num_heads=3, **options)
  lp = nn.unbox(jax.eval_shape(lambda: lm.init(jax.random.key(0), x))["params"])
  assert jax.tree.map(jnp.shape, lp) == jax.tree.map(jnp.shape, params)
  graphdef, state = nnx.split(m)
  ct = rnd(30, x.shape)

  def fwd_bwd(f):  # jitted: eager layers compile every primitive separately
    def run(a, ct):
      y, vjp = jax.vjp(f, a)
      return y, vjp(ct)[0]
    return jax.jit(run)(x, ct)

  y1, g1 = fwd_bwd(lambda a: nnx.merge(graphdef, state)(a))
  y2, g2 = fwd_bwd(lambda a: lm.apply({"params": params}, a))
  want = jax.jit(lambda a: _layer_ref(name, params, a, ref_opts))(x)
  assert y1.shape == x.shape
  assert_close(y1, want, jnp.float32, name)
  np.testing.assert_array_equal(y1, y2)
  np.testing.assert_array_equal(g1, g2)


def test_layers_default_options_on_the_digits_grid_and_errors():
  x = rnd(40, (1, 4, 4, 16))
  for name in _LAYERS:
    m = variants.build(name, d_model=16, num_heads=4, num_kv_heads=2, rngs=nnx.Rngs(0),
                       rope="axial", qk_norm=True)
    graphdef, state = nnx.split(m)
    y = jax.jit(lambda st, a, g=graphdef: nnx.merge(g, st)(a))(state, x)
    assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y))), name
    with pytest.raises(ValueError, match=r"x must be \[B, Hh, Ww, d_model=16\]"):
      m(x.reshape(1, 16, 16))
    with pytest.raises(ValueError, match="cache"):
      m(x, cache={})
  with pytest.raises(ValueError, match="stripe_width is not an option of spatial variant 'halo'"):
    variants.build("halo", d_model=16, num_heads=4, rngs=nnx.Rngs(0), stripe_width=2)
  with pytest.raises(TypeError, match="unknown option 'windw'"):
    variants.build("cswin", d_model=16, num_heads=4, rngs=nnx.Rngs(0), windw=2)
  with pytest.raises(ValueError, match="recurrence must be a positive int"):
    variants.build("ccnet", d_model=16, num_heads=4, rngs=nnx.Rngs(0), recurrence=0)
  m = variants.build("maxvit_grid", d_model=16, num_heads=4, rngs=nnx.Rngs(0), grid_size=3)
  with pytest.raises(ValueError, match="grid_size must divide"):
    m(x)


@pytest.mark.slow  # ~45 s of compilation on 2 cores; the per-variant smoke lives elsewhere
def test_train_smoke_one_step(tmp_path):
  """One training step of the digits ViT with the 'cswin' variant (runlocal)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
  config = os.path.join(root, "configs", "digits_vit.py") + ":variant=cswin,runlocal=True"
  cmd = [sys.executable, os.path.join(root, "train.py"), f"--config={config}",
         "--config.num_steps=1", "--config.schedule.warmup_steps=0", "--config.tensorboard=False",
         "--config.progress_bar=False",
         "--config.checkpoint_every=0", f"--workdir={tmp_path}"]
  proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    rows = [line for line in f if line.strip()]
  assert rows and "nan" not in "".join(rows).lower()
