"""attnjax.ops.spatial.reduced (family F): SRA, HiLo, channel-group, CrossFormer LSDA + DPB.

Each op is checked, forward and jax.vjp with a random cotangent, against a plain reference
written from the paper's definition: per-position Python loops build the pooling cells,
windows, groups and local coordinates, and a dense masked float32 softmax does the rest
(no reshapes shared with the op). float32 and bfloat16, implementations 'xla' and
'xla_chunked', odd map sizes.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, rnd

from attnjax.ops import spatial as S

IMPLS = ("xla", "xla_chunked")
DTYPES = (jnp.float32, jnp.bfloat16)


# ----------------------------------------------------------------------------- references

def _dense(q_BTNH, k_BSKH, v_BSKV, allowed_NTS=None, bias_NTS=None, scale=None):
  """Plain float32 softmax attention; GQA by repeating kv heads; rows with no key -> 0."""
  q, k, v = (jnp.asarray(a, jnp.float32) for a in (q_BTNH, k_BSKH, v_BSKV))
  N, K = q.shape[2], k.shape[2]
  k = jnp.repeat(k, N // K, axis=2)
  v = jnp.repeat(v, N // K, axis=2)
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  s = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
  if bias_NTS is not None:
    s = s + bias_NTS[None]
  if allowed_NTS is not None:
    s = jnp.where(allowed_NTS[None], s, -1e30)
  p = jnp.exp(s - jnp.max(s, -1, keepdims=True))
  if allowed_NTS is not None:
    p = jnp.where(allowed_NTS[None], p, 0.0)
  p = p / jnp.maximum(jnp.sum(p, -1, keepdims=True), 1e-30)
  return jnp.einsum("bnts,bsnh->btnh", p, v)


def _ref_pool(x, rh, rw):
  """Cell means: an averaging matrix [cells, positions] built by explicit loops over the
  cells (clipped to the map), applied to the flattened map."""
  B, Hh, Ww = x.shape[:3]
  Ho, Wo = -(-Hh // rh), -(-Ww // rw)
  M = np.zeros((Ho * Wo, Hh * Ww), np.float32)
  for i in range(Ho):
    for j in range(Wo):
      idx = [y * Ww + xx for y in range(i * rh, min((i + 1) * rh, Hh))
             for xx in range(j * rw, min((j + 1) * rw, Ww))]
      M[i * Wo + j, idx] = 1.0 / len(idx)
  xf = jnp.asarray(x, jnp.float32).reshape((B, Hh * Ww) + x.shape[3:])
  return jnp.einsum("cp,bp...->bc...", M, xf).reshape((B, Ho, Wo) + x.shape[3:])


def _flat(x):
  return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def ref_sra(q, k, v, r):
  rh, rw = r
  kr, vr = _ref_pool(k, rh, rw), _ref_pool(v, rh, rw)
  o = _dense(_flat(q), _flat(kr), _flat(vr))
  return o.reshape(q.shape[:4] + (v.shape[-1],))


def ref_hilo(q, k, v, s, lo_heads):
  B, Hh, Ww, N, _ = q.shape
  K = k.shape[3]
  T = Hh * Ww
  coords = [(y, x) for y in range(Hh) for x in range(Ww)]
  same = np.array([[a[0] // s == b[0] // s and a[1] // s == b[1] // s for b in coords]
                   for a in coords])
  hi, hi_kv = N - lo_heads, K - lo_heads * K // N
  outs = []
  if hi:
    allowed = np.broadcast_to(same, (hi, T, T))
    outs.append(_dense(_flat(q[..., :hi, :]), _flat(k[..., :hi_kv, :]), _flat(v[..., :hi_kv, :]),
                       allowed).reshape(B, Hh, Ww, hi, -1))
  if lo_heads:
    outs.append(ref_sra(q[..., hi:, :], k[..., hi_kv:, :], v[..., hi_kv:, :], (s, s)))
  return jnp.concatenate(outs, 3)


def ref_channel(q, k, v, G, scale=None):
  B, N, H = q.shape[0], q.shape[-2], q.shape[-1]
  P, C = int(np.prod(q.shape[1:-2])), N * H
  Cg = C // G
  scale = 1.0 / math.sqrt(Cg) if scale is None else scale
  q2, k2, v2 = (jnp.asarray(a, jnp.float32).reshape(B, P, C) for a in (q, k, v))
  outs = []
  for g in range(G):
    sl = slice(g * Cg, (g + 1) * Cg)
    A = jax.nn.softmax(scale * jnp.einsum("bpc,bpd->bcd", q2[..., sl], k2[..., sl]), axis=-1)
    outs.append(jnp.einsum("bpd,bcd->bpc", v2[..., sl], A))  # V_g A^T
  return jnp.concatenate(outs, -1).reshape(q.shape)


def ref_lsda(q, k, v, G, mode, dpb=None):
  B, Hh, Ww, N, _ = q.shape
  gh, gw = G
  Ih, Iw = Hh // gh, Ww // gw
  gid, loc = [], []
  for y in range(Hh):
    for x in range(Ww):
      if mode == "short":
        gid.append((y // gh, x // gw))
        loc.append((y % gh, x % gw))
      else:
        gid.append((y % Ih, x % Iw))
        loc.append((y // Ih, x // Iw))
  T = Hh * Ww
  allowed = np.array([[gid[i] == gid[j] for j in range(T)] for i in range(T)])
  assert allowed.sum(1).tolist() == [gh * gw] * T
  bias = None
  if dpb is not None:
    iy = np.array([[loc[i][0] - loc[j][0] + gh - 1 for j in range(T)] for i in range(T)])
    ix = np.array([[loc[i][1] - loc[j][1] + gw - 1 for j in range(T)] for i in range(T)])
    bias = jnp.asarray(dpb, jnp.float32)[:, iy, ix]
  o = _dense(_flat(q), _flat(k), _flat(v), np.broadcast_to(allowed, (N, T, T)), bias)
  return o.reshape(B, Hh, Ww, N, -1)


def ref_dpb(params, G):
  """The DPB MLP evaluated offset by offset (NumPy, float64)."""
  gh, gw = G
  p = {n: np.asarray(a, np.float64) for n, a in params.items()}

  def ln(h, s, b):
    return (h - h.mean()) / np.sqrt(h.var() + 1e-5) * s + b

  N = p["w2"].shape[1]
  out = np.zeros((N, 2 * gh - 1, 2 * gw - 1))
  for dy in range(1 - gh, gh):
    for dx in range(1 - gw, gw):
      h = np.array([dy, dx], np.float64) @ p["w0"] + p["b0"]
      h = np.maximum(ln(h, p["ln1_scale"], p["ln1_bias"]), 0) @ p["w1"] + p["b1"]
      h = np.maximum(ln(h, p["ln2_scale"], p["ln2_bias"]), 0) @ p["w2"] + p["b2"]
      out[:, dy + gh - 1, dx + gw - 1] = h
  return out


# ----------------------------------------------------------------------------- harness

def _check_fwd_vjp(op, ref, args, dtype, seed=0, jit_ref=True):
  args = tuple(jnp.asarray(a, dtype) if a.dtype != jnp.float32 or i < 3 else a
               for i, a in enumerate(args))
  out, vjp = jax.vjp(jax.jit(op), *args)   # jit: one compilation, not op-by-op dispatch
  assert out.dtype == args[0].dtype
  ct = rnd(seed + 99, out.shape, dtype)
  ref_fn = jax.jit(ref) if jit_ref else ref
  ref_out, ref_vjp = jax.vjp(ref_fn, *(jnp.asarray(a, jnp.float32) for a in args))
  assert_close(out, ref_out, dtype, "forward")
  for i, (g, rg) in enumerate(zip(vjp(ct), ref_vjp(jnp.asarray(ct, jnp.float32)))):
    assert g.shape == args[i].shape
    assert_close(g, rg, dtype, f"grad of argument {i}")


def _qkv(seed, B, Hh, Ww, N, K, H, Hv, dtype=jnp.float32):
  return (rnd(seed, (B, Hh, Ww, N, H), dtype), rnd(seed + 1, (B, Hh, Ww, K, H), dtype),
          rnd(seed + 2, (B, Hh, Ww, K, Hv), dtype))


# bfloat16 through 'xla_chunked' runs under -m slow (bf16 is covered by 'xla' and the
# chunked path by float32 in the default run).
CASES = [pytest.param(i, d, marks=pytest.mark.slow) if (i, d) == ("xla_chunked", jnp.bfloat16)
         else (i, d) for i, d in itertools.product(IMPLS, DTYPES)]


# ----------------------------------------------------------------------------- SRA

@pytest.mark.parametrize("impl, dtype", CASES)
@pytest.mark.parametrize("shape, r, pad", [((9, 15), (3, 3), False),    # odd, divisible
                                           ((13, 17), (3, 4), True)])   # odd, partial cells
def test_sra_matches_reference(impl, dtype, shape, r, pad):
  q, k, v = _qkv(1, 2, *shape, 4, 2, 8, 6)
  op = lambda q, k, v: S.spatial_reduction_attention(q, k, v, sr_ratio=r, pad=pad,
                                                     implementation=impl)
  _check_fwd_vjp(op, lambda q, k, v: ref_sra(q, k, v, r), (q, k, v), dtype)


def test_sra_ratio_one_is_dense_and_pool_means():
  q, k, v = _qkv(2, 1, 5, 7, 2, 2, 4, 4)
  np.testing.assert_allclose(S.spatial_reduction_attention(q, k, v, sr_ratio=1),
                             ref_sra(q, k, v, (1, 1)), atol=1e-5, rtol=1e-5)
  x = rnd(3, (2, 13, 17, 3))
  np.testing.assert_allclose(S.avg_pool_map(x, (3, 4), pad=True), _ref_pool(x, 3, 4),
                             atol=1e-6, rtol=1e-6)
  assert S.avg_pool_map(x, (3, 4), pad=True).shape == (2, 5, 5, 3)


def test_sra_errors():
  q, k, v = _qkv(4, 1, 13, 17, 2, 2, 4, 4)
  with pytest.raises(ValueError, match=r"sr_ratio=\(2, 2\) must divide .*\(13, 17\)"):
    S.spatial_reduction_attention(q, k, v, sr_ratio=2)
  with pytest.raises(ValueError, match="sr_ratio must be a positive int"):
    S.spatial_reduction_attention(q, k, v, sr_ratio=0, pad=True)
  with pytest.raises(ValueError, match="sr_ratio=.* at most the map"):
    S.spatial_reduction_attention(q, k, v, sr_ratio=(14, 1), pad=True)
  with pytest.raises(ValueError, match=r"q must be a 2D map .*rank 5"):
    S.spatial_reduction_attention(q[:, 0], k, v, sr_ratio=1)
  with pytest.raises(ValueError, match="heads N=2 of q must be a multiple"):
    S.spatial_reduction_attention(q, rnd(0, (1, 13, 17, 3, 4)), rnd(0, (1, 13, 17, 3, 4)),
                                  sr_ratio=1)


# ----------------------------------------------------------------------------- HiLo

@pytest.mark.parametrize("impl, dtype", CASES)
def test_hilo_matches_reference(impl, dtype):
  q, k, v = _qkv(5, 2, 6, 9, 4, 2, 8, 8)
  op = lambda q, k, v: S.hilo_attention(q, k, v, window_size=3, lo_heads=2, implementation=impl)
  _check_fwd_vjp(op, lambda q, k, v: ref_hilo(q, k, v, 3, 2), (q, k, v), dtype)


@pytest.mark.parametrize("lo_heads", [0, 4])
def test_hilo_all_hi_or_all_lo(lo_heads):
  q, k, v = _qkv(6, 1, 6, 4, 4, 4, 4, 4)
  out = S.hilo_attention(q, k, v, window_size=2, lo_heads=lo_heads, implementation="xla")
  assert_close(out, ref_hilo(q, k, v, 2, lo_heads), jnp.float32)


def test_hilo_errors():
  q, k, v = _qkv(7, 1, 6, 4, 4, 2, 4, 4)
  with pytest.raises(ValueError, match=r"window_size=\(4, 4\) must divide .*\(6, 4\)"):
    S.hilo_attention(q, k, v, window_size=4, lo_heads=2)
  with pytest.raises(ValueError, match=r"lo_heads must be an int in \[0, N=4\]"):
    S.hilo_attention(q, k, v, window_size=2, lo_heads=5)
  with pytest.raises(ValueError, match="lo_heads \\* K must be a multiple of N"):
    S.hilo_attention(q, k, v, window_size=2, lo_heads=1)
  with pytest.raises(ValueError, match="k must be on the map of q"):
    S.hilo_attention(q, k[:, :4], v[:, :4], window_size=2, lo_heads=2)


# ----------------------------------------------------------------------------- channels

@pytest.mark.parametrize("impl, dtype", CASES)
@pytest.mark.parametrize("spatial, N, H, G", [((13, 17), 2, 6, 3), ((11,), 4, 4, 4)])
def test_channel_group_matches_reference(impl, dtype, spatial, N, H, G):
  q, k, v = (rnd(10 + i, (2,) + spatial + (N, H), scale=0.3) for i in range(3))
  op = lambda q, k, v: S.channel_group_attention(q, k, v, num_groups=G, implementation=impl)
  _check_fwd_vjp(op, lambda q, k, v: ref_channel(q, k, v, G), (q, k, v), dtype)


def test_channel_group_errors():
  q = rnd(0, (1, 3, 5, 2, 6))
  with pytest.raises(ValueError, match=r"num_groups must be a positive divisor .* N\*H=12"):
    S.channel_group_attention(q, q, q, num_groups=5)
  with pytest.raises(ValueError, match="v must have the shape of q"):
    S.channel_group_attention(q, q, q[..., :4], num_groups=2)
  with pytest.raises(ValueError, match=r"rank >= 4"):
    S.channel_group_attention(q[:, 0, 0], q[:, 0, 0], q[:, 0, 0], num_groups=2)


# ----------------------------------------------------------------------------- CrossFormer

@pytest.mark.parametrize("impl, dtype", CASES)
@pytest.mark.parametrize("mode", ["short", "long"])
def test_lsda_matches_reference(impl, dtype, mode):
  G = (3, 3)
  q, k, v = _qkv(20, 2, 6, 9, 4, 2, 8, 6)
  dpb = rnd(23, (4, 5, 5))
  op = lambda q, k, v, b: S.long_short_distance_attention(q, k, v, group_size=G, mode=mode, dpb=b,
                                                          implementation=impl)
  _check_fwd_vjp(op, lambda q, k, v, b: ref_lsda(q, k, v, G, mode, b), (q, k, v, dpb), dtype,
                 jit_ref=False)


@pytest.mark.parametrize("mode", ["short", "long"])
def test_lsda_rectangular_groups_without_bias(mode):
  q, k, v = _qkv(30, 1, 6, 8, 2, 2, 4, 4)
  out = S.long_short_distance_attention(q, k, v, group_size=(3, 2), mode=mode)
  assert_close(out, ref_lsda(q, k, v, (3, 2), mode), jnp.float32)


def test_lsda_errors():
  q, k, v = _qkv(31, 1, 9, 15, 4, 2, 8, 8)
  with pytest.raises(ValueError, match=r"group_size=\(2, 2\) must divide .*\(9, 15\)"):
    S.long_short_distance_attention(q, k, v, group_size=2)
  with pytest.raises(ValueError, match="mode must be one of"):
    S.long_short_distance_attention(q, k, v, group_size=3, mode="mid")
  with pytest.raises(ValueError, match=r"dpb must be \[N, 2Gh-1, 2Gw-1\] = \[4, 5, 5\]"):
    S.long_short_distance_attention(q, k, v, group_size=3, dpb=jnp.zeros((4, 3, 3)))
  with pytest.raises(ValueError, match="group_size must be a positive int"):
    S.long_short_distance_attention(q, k, v, group_size=(3, 0))


def test_dynamic_position_bias_matches_offset_loop_and_has_gradients():
  P, N, G = 6, 3, (2, 3)
  shapes = dict(w0=(2, P), b0=(P,), ln1_scale=(P,), ln1_bias=(P,), w1=(P, P), b1=(P,),
                ln2_scale=(P,), ln2_bias=(P,), w2=(P, N), b2=(N,))
  params = {n: rnd(40 + i, s) for i, (n, s) in enumerate(shapes.items())}
  table = S.dynamic_position_bias(params, G)
  assert table.shape == (N, 3, 5) and table.dtype == jnp.float32
  np.testing.assert_allclose(table, ref_dpb(params, G), atol=1e-5, rtol=1e-5)
  q, k, v = _qkv(50, 1, 4, 6, N, N, 4, 4)
  loss = lambda p: jnp.sum(S.long_short_distance_attention(
      q, k, v, group_size=G, dpb=S.dynamic_position_bias(p, G)) ** 2)
  grads = jax.jit(jax.grad(loss))(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0
             for g in grads.values())
  with pytest.raises(ValueError, match="missing"):
    S.dynamic_position_bias({k: v for k, v in params.items() if k != "w1"}, G)


# ----------------------------------------------------------------------------- RoPE

def _ref_rotate(x_BTNH, pos_T2, rope, freqs=None, base=10000.0):
  """Rotary embedding written out: angle of pair i from the (y, x) position, pairs
  (i, i + H/2) rotated; 'axial': the first H/4 pairs use y, the rest x, each with the
  ladder base^(-2i / (H/2)); 'mixed': angle = freqs[n, i] . (y, x) per head."""
  T, N, H = x_BTNH.shape[1:]
  half = H // 2
  ang = np.zeros((T, N, half))
  for t in range(T):
    for i in range(half):
      if rope == "axial":
        d, j = divmod(i, half // 2)
        ang[t, :, i] = pos_T2[t][d] * base ** (-2.0 * j / half)
      else:
        ang[t, :, i] = [float(np.dot(np.asarray(freqs)[n, i], pos_T2[t])) for n in range(N)]
  c, s = jnp.asarray(np.cos(ang), jnp.float32), jnp.asarray(np.sin(ang), jnp.float32)
  xf = jnp.asarray(x_BTNH, jnp.float32)
  x1, x2 = xf[..., :half], xf[..., half:]
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def _grid_pos(Hh, Ww):
  return np.array([[y, x] for y in range(Hh) for x in range(Ww)], np.float64)


def _cell_centres(Hh, Ww, rh, rw):
  """Mean (y, x) of the positions of each cell (clipped to the map), by loops."""
  out = []
  for i in range(-(-Hh // rh)):
    for j in range(-(-Ww // rw)):
      cell = [(y, x) for y in range(i * rh, min((i + 1) * rh, Hh))
              for x in range(j * rw, min((j + 1) * rw, Ww))]
      out.append(np.mean(np.asarray(cell, np.float64), 0))
  return np.asarray(out)


def ref_sra_rope(q, k, v, r, pad, rope, freqs=None):
  """SRA with q rotated at its (y, x) and each pooled key at the mean of its cell's
  coordinates (the cell centre), pooled by the explicit-loop averaging of _ref_pool."""
  del pad
  rh, rw = r
  kr, vr = _ref_pool(k, rh, rw), _ref_pool(v, rh, rw)
  kpos = _cell_centres(*k.shape[1:3], rh, rw)
  qpos = _grid_pos(*q.shape[1:3])
  o = _dense(_ref_rotate(_flat(q), qpos, rope, freqs), _ref_rotate(_flat(kr), kpos, rope, freqs),
             _flat(vr))
  return o.reshape(q.shape[:4] + (v.shape[-1],))


ROPE_CASES = [("axial", 4, 2), ("mixed", 4, 4)]   # (rope, N, K): mixed needs K == N
ROPE_DTYPES = [("xla", jnp.float32), ("xla", jnp.bfloat16),
               pytest.param("xla_chunked", jnp.float32, marks=pytest.mark.slow)]


@pytest.mark.parametrize("impl, dtype", ROPE_DTYPES)
@pytest.mark.parametrize("rope, N, K, shape, r, pad", [
    ("axial", 4, 2, (9, 15), (3, 3), False),    # GQA, odd map, full cells
    ("axial", 2, 1, (13, 17), (3, 4), True),    # partial border cells (centres move)
    ("mixed", 2, 2, (7, 11), (2, 3), True)])
def test_sra_rope_at_pooled_cell_centres_matches_reference(impl, dtype, rope, N, K, shape, r, pad):
  q, k, v = _qkv(60, 1, *shape, N, K, 8, 6)
  freqs = np.asarray(rnd(64, (N, 4, 2), scale=0.5)) if rope == "mixed" else None
  op = lambda q, k, v: S.spatial_reduction_attention(q, k, v, sr_ratio=r, pad=pad, rope=rope,
                                                     rope_freqs=freqs, implementation=impl)
  ref = lambda q, k, v: ref_sra_rope(q, k, v, r, pad, rope, freqs)
  _check_fwd_vjp(op, ref, (q, k, v), dtype)


@pytest.mark.parametrize("impl, dtype", ROPE_DTYPES[:2])
@pytest.mark.parametrize("rope, N, K", ROPE_CASES)
def test_hilo_rope_matches_reference(impl, dtype, rope, N, K):
  s, lo = 3, 2
  q, k, v = _qkv(70, 1, 6, 9, N, K, 8, 8)
  freqs = np.asarray(rnd(74, (N, 4, 2), scale=0.5)) if rope == "mixed" else None
  hi, hi_kv = N - lo, K - lo * K // N
  pos = _grid_pos(6, 9)

  def ref(q, k, v):  # Hi-Fi heads rotated at the map coordinates, then the plain HiLo
    fq = None if freqs is None else freqs[:hi]
    qh = _ref_rotate(_flat(q[..., :hi, :]), pos, rope, fq).reshape(q[..., :hi, :].shape)
    kh = _ref_rotate(_flat(k[..., :hi_kv, :]), pos, rope, fq).reshape(k[..., :hi_kv, :].shape)
    o_hi = ref_hilo(qh, kh, v[..., :hi_kv, :], s, 0)
    o_lo = ref_sra_rope(q[..., hi:, :], k[..., hi_kv:, :], v[..., hi_kv:, :], (s, s), False,
                        rope, None if freqs is None else freqs[hi:])
    return jnp.concatenate([o_hi, o_lo], 3)

  op = lambda q, k, v: S.hilo_attention(q, k, v, window_size=s, lo_heads=lo, rope=rope,
                                        rope_freqs=freqs, implementation=impl)
  _check_fwd_vjp(op, ref, (q, k, v), dtype)


def test_pooled_positions_are_cell_centres():
  got = S.pooled_positions((5, 4), 2, pad=True)
  want = [[y, x] for y in (0.5, 2.5, 4.0) for x in (0.5, 2.5)]
  np.testing.assert_array_equal(got, np.asarray(want, np.float32))
  np.testing.assert_array_equal(S.pooled_positions((4, 6), (1, 3)),
                                [[y, x] for y in range(4) for x in (1.0, 4.0)])


def test_rope_errors():
  q, k, v = _qkv(80, 1, 6, 4, 4, 2, 8, 8)
  with pytest.raises(ValueError, match=r"rope must be one of \(None, 'axial', 'mixed'\)"):
    S.spatial_reduction_attention(q, k, v, sr_ratio=2, rope="1d")
  with pytest.raises(ValueError, match="rope_base must be a number > 1"):
    S.spatial_reduction_attention(q, k, v, sr_ratio=2, rope="axial", rope_base=1.0)
  with pytest.raises(ValueError, match="head_dim divisible by 4"):
    S.hilo_attention(q[..., :6], k[..., :6], v, window_size=2, lo_heads=2, rope="axial")
  with pytest.raises(ValueError, match=r"rope_freqs \[N, H/2, 2\] = \[4, 4, 2\]"):
    S.spatial_reduction_attention(q, k, v, sr_ratio=2, rope="mixed", rope_freqs=jnp.ones((4, 4)))
  with pytest.raises(ValueError, match="as many kv heads as query heads"):
    S.spatial_reduction_attention(q, k, v, sr_ratio=2, rope="mixed",
                                  rope_freqs=jnp.ones((4, 4, 2)))
  with pytest.raises(ValueError, match="rope_freqs must be None unless rope='mixed'"):
    S.spatial_reduction_attention(q, k, v, sr_ratio=2, rope_freqs=jnp.ones((4, 4, 2)))


# ----------------------------------------------------------------------------- explicit positions

def _cell_means(pos_T2, Hh, Ww, rh, rw):
  """Mean of the given positions over each cell (clipped to the map), by loops."""
  pos = np.asarray(pos_T2, np.float64).reshape(Hh, Ww, 2)
  out = []
  for i in range(-(-Hh // rh)):
    for j in range(-(-Ww // rw)):
      out.append(pos[i * rh:(i + 1) * rh, j * rw:(j + 1) * rw].reshape(-1, 2).mean(0))
  return np.asarray(out)


def _rand_positions(seed, B, Hh, Ww):
  """Per-row random float positions: the grid scaled, jittered and shifted (not a grid)."""
  rng = np.random.default_rng(seed)
  g = _grid_pos(Hh, Ww)
  return np.stack([1.7 * g + rng.uniform(-0.4, 0.4, g.shape) + rng.uniform(-5, 5, (1, 2))
                   for _ in range(B)]).astype(np.float32)


def ref_sra_rope_pos(q, k, v, r, rope, freqs, pos_BT2):
  """SRA with RoPE at explicit per-row positions: q at pos[b], each pooled key at the mean
  of its cell's positions (_cell_means), one row at a time."""
  rh, rw = r
  Hh, Ww = k.shape[1:3]
  kr, vr = _ref_pool(k, rh, rw), _ref_pool(v, rh, rw)
  rows = []
  for b in range(q.shape[0]):
    kpos = _cell_means(pos_BT2[b], Hh, Ww, rh, rw)
    rows.append(_dense(_ref_rotate(_flat(q[b:b + 1]), pos_BT2[b], rope, freqs),
                       _ref_rotate(_flat(kr[b:b + 1]), kpos, rope, freqs), _flat(vr[b:b + 1])))
  return jnp.concatenate(rows).reshape(q.shape[:4] + (v.shape[-1],))


_EXPLICIT = [("axial", 4, 2, (6, 9), (2, 3), False),
             ("mixed", 2, 2, (7, 5), (3, 2), True)]    # partial border cells: means of fewer tokens


# Default suite: axial in float32 and mixed in bfloat16; the other two under -m slow.
@pytest.mark.parametrize("dtype, rope, N, K, shape, r, pad", [
    (d, *c) if (c[0] == "axial") == (np.dtype(d) == np.float32)
    else pytest.param(d, *c, marks=pytest.mark.slow) for d in DTYPES for c in _EXPLICIT])
def test_sra_rope_at_explicit_positions_matches_reference(dtype, rope, N, K, shape, r, pad):
  q, k, v = _qkv(90, 2, *shape, N, K, 8, 6)
  freqs = np.asarray(rnd(94, (N, 4, 2), scale=0.5)) if rope == "mixed" else None
  pos = _rand_positions(95, 2, *shape)
  op = lambda q, k, v: S.spatial_reduction_attention(q, k, v, sr_ratio=r, pad=pad, rope=rope,
                                                     rope_freqs=freqs, positions=pos)
  _check_fwd_vjp(op, lambda q, k, v: ref_sra_rope_pos(q, k, v, r, rope, freqs, pos), (q, k, v),
                 dtype)


@pytest.mark.parametrize("rope, N, K", [pytest.param(*ROPE_CASES[0], marks=pytest.mark.slow),
                                         ROPE_CASES[1]])
def test_hilo_rope_at_explicit_positions_matches_reference(rope, N, K):
  s, lo, B, Hh, Ww = 2, 2, 2, 4, 6
  q, k, v = _qkv(100, B, Hh, Ww, N, K, 8, 8)
  freqs = np.asarray(rnd(104, (N, 4, 2), scale=0.5)) if rope == "mixed" else None
  hi, hi_kv = N - lo, K - lo * K // N
  pos = _rand_positions(105, B, Hh, Ww)

  def ref(q, k, v):  # Hi-Fi heads rotated at pos[b] (queries and keys), Lo-Fi as above
    fq = None if freqs is None else freqs[:hi]
    rot = lambda a, b: _ref_rotate(_flat(a[b:b + 1]), pos[b], rope, fq).reshape(
        (1,) + a.shape[1:])
    qh = jnp.concatenate([rot(q[..., :hi, :], b) for b in range(B)])
    kh = jnp.concatenate([rot(k[..., :hi_kv, :], b) for b in range(B)])
    o_hi = ref_hilo(qh, kh, v[..., :hi_kv, :], s, 0)
    o_lo = ref_sra_rope_pos(q[..., hi:, :], k[..., hi_kv:, :], v[..., hi_kv:, :], (s, s), rope,
                            None if freqs is None else freqs[hi:], pos)
    return jnp.concatenate([o_hi, o_lo], 3)

  op = lambda q, k, v: S.hilo_attention(q, k, v, window_size=s, lo_heads=lo, rope=rope,
                                        rope_freqs=freqs, positions=pos)
  _check_fwd_vjp(op, ref, (q, k, v), jnp.float32)


def test_grid_positions_reproduce_the_default_and_shared_positions_broadcast():
  q, k, v = _qkv(110, 2, 5, 7, 2, 2, 8, 8)
  grid = _grid_pos(5, 7).astype(np.int32)
  freqs = rnd(111, (2, 4, 2), scale=0.5)
  for op, kw in ((S.spatial_reduction_attention, dict(sr_ratio=(2, 3), pad=True)),
                 (S.hilo_attention, dict(window_size=1, lo_heads=1))):
    for rope, fr in (("axial", None), ("mixed", freqs)):
      want = op(q, k, v, rope=rope, rope_freqs=fr, **kw)
      np.testing.assert_array_equal(op(q, k, v, rope=rope, rope_freqs=fr, positions=grid, **kw),
                                    want)
      np.testing.assert_array_equal(
          op(q, k, v, rope=rope, rope_freqs=fr, positions=np.stack([grid, grid]), **kw), want)
  # pooled positions of the grid are the cell centres, bit for bit; of any positions the means
  np.testing.assert_array_equal(S.pooled_positions((5, 7), (2, 3), pad=True, positions=grid),
                                S.pooled_positions((5, 7), (2, 3), pad=True))
  pos = _rand_positions(112, 2, 5, 7)
  got = S.pooled_positions((5, 7), (2, 3), pad=True, positions=pos)
  assert got.shape == (2, 9, 2)
  for b in range(2):
    np.testing.assert_allclose(got[b], _cell_means(pos[b], 5, 7, 2, 3), rtol=1e-6, atol=1e-6)


def test_positions_errors():
  q, k, v = _qkv(120, 2, 4, 6, 2, 2, 8, 8)
  grid = _grid_pos(4, 6)
  with pytest.raises(ValueError, match=r"positions must be \[2, Hh\*Ww, 2\] = \[2, 24, 2\] or "
                                       r"\[24, 2\].*got shape \(24, 3\)"):
    S.spatial_reduction_attention(q, k, v, sr_ratio=2, rope="axial", positions=np.ones((24, 3)))
  with pytest.raises(ValueError, match=r"positions must be \[2, Hh\*Ww, 2\].*got shape "
                                       r"\(3, 24, 2\)"):
    S.hilo_attention(q, k, v, window_size=2, lo_heads=1, rope="axial",
                     positions=np.stack([grid] * 3))
  with pytest.raises(ValueError, match="positions are RoPE coordinates.*rope=None"):
    S.spatial_reduction_attention(q, k, v, sr_ratio=2, positions=grid)
  with pytest.raises(TypeError, match="positions must be integer or floating.*bool"):
    S.spatial_reduction_attention(q, k, v, sr_ratio=2, rope="axial",
                                  positions=np.zeros((24, 2), bool))
  with pytest.raises(ValueError, match="positions need q and k on one map"):
    S.spatial_reduction_attention(q[:, :2], k, v, sr_ratio=2, rope="axial", positions=grid)
