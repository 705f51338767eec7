"""attnjax.analysis.capture on every registered variant, and on each op that reports its own
map to the interception point (attnjax.core.hooks.intercepted with probs=).

Op tests: the recorded map ``P`` is compared with an independent NumPy formula where the
op has a closed form, and ``P @ V`` with the op's output. The value head dim is chosen
equal to the number of keys ``S``, so that (for a random, invertible ``V``) ``P @ V ==
out`` determines ``P`` completely. Each op's output is also the same with and without an
observer.

Variant sweep: every name of ``attnjax.variants.names()`` is built at tiny size (d_model
16, 2 heads, 8 tokens or a 4 x 4 grid, the options of ``config_lib.variant_options``) and
captured; the maps must have the shapes listed in ``EXPECTED`` (a new registration fails
until it is added there), be finite and have the row sums of its family (``ROWS``).
The default suite runs one or two variants per family; the full sweep is ``slow``.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import analysis, variants
from attnjax.analysis import Recorder
from attnjax.ops import dense, heads, pooling, routing
from attnjax.ops import linear as L
from attnjax.train import config_lib
from tests.helpers import rnd

ATOL, RTOL = 1e-5, 1e-5


def _one(fn, *args, plain=False):
  """(kind, P, out) of the single observed call of ``fn(*args)``, captured under ``jax.jit``;
  ``out`` is the output of the observed pass (``plain``: checked equal to the unobserved
  one, for the ops that re-enter themselves while observed)."""
  calls = analysis.attention_calls(fn, args)
  assert len(calls) == 1, [(c.name, c.kind) for c in calls]   # nested calls are not seen
  maps, out = analysis.capture(fn, args, return_output=True)
  if plain:
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(jax.jit(fn)(*args))):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  (p,) = maps.values()
  assert p.shape == (calls[0].B, calls[0].N, calls[0].T, calls[0].S)
  return calls[0].kind, p, out


def _np_masked_softmax(s, ok):
  s = np.where(ok, s, -np.inf)
  m = np.max(s, -1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  e = np.where(ok, np.exp(s - m), 0.0)
  den = e.sum(-1, keepdims=True)
  return e / np.where(den > 0, den, 1.0)


def _pv(p, v):
  """``sum_s P[b, n, t, s] v[b, s, n, :]`` (v with N heads)."""
  return np.einsum("bnts,bsnh->btnh", np.asarray(p, np.float64), np.asarray(v, np.float64))


# ----------------------------------------------------------------------------- dense recipes

def test_additive_map_and_output():
  B, T, N, A = 2, 6, 2, 4
  q, k, v = rnd(0, (B, T, N, A)), rnd(1, (B, T, N, A)), rnd(2, (B, T, N, T))
  w = rnd(3, (N, A))
  kind, p, out = _one(lambda *a: dense.additive_attention(*a, causal=True), q, k, v, w)
  assert kind == "softmax" and p.shape == (B, N, T, T)
  h = np.tanh(np.asarray(q, np.float64)[:, :, None] + np.asarray(k, np.float64)[:, None])
  e = np.einsum("btsna,na->bnts", h, np.asarray(w, np.float64))
  want = _np_masked_softmax(e, np.tril(np.ones((T, T), bool)))
  np.testing.assert_allclose(p, want, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(_pv(p, v), out, rtol=1e-4, atol=ATOL)


def test_sinkhorn_map_is_the_iterated_matrix():
  B, T, S, N, H = 1, 4, 6, 2, 4
  q, k, v = rnd(4, (B, T, N, H)), rnd(5, (B, S, N, H)), rnd(6, (B, S, N, S))
  for iters in (3, 4):
    kind, p, out = _one(lambda *a, iters=iters: dense.sinkhorn_attention(*a, num_iters=iters),
                        q, k, v)
    assert kind == "sinkhorn" and p.shape == (B, N, T, S)
    # plain-domain Sinkhorn from K = exp(s): rows to 1, columns to T / S, alternately
    K = np.exp(np.einsum("btnh,bsnh->bnts", np.asarray(q, np.float64),
                         np.asarray(k, np.float64)) / 2.0)
    for it in range(iters):
      K = K / K.sum(-1, keepdims=True) if it % 2 == 0 else K / K.sum(-2, keepdims=True) * T / S
    np.testing.assert_allclose(p, K, rtol=1e-4, atol=ATOL)
    if iters % 2:
      np.testing.assert_allclose(p.sum(-1), 1, rtol=1e-5)
    else:
      np.testing.assert_allclose(p.sum(-2), T / S, rtol=1e-5)
    np.testing.assert_allclose(_pv(p, v), out, rtol=1e-4, atol=ATOL)


def test_talking_heads_map_is_after_post_mixing():
  B, T, N, H = 2, 5, 3, 4
  q, k, v = rnd(7, (B, T, N, H)), rnd(8, (B, T, N, H)), rnd(9, (B, T, N, T))
  pre, post = rnd(10, (N, N)), rnd(11, (N, N))
  kind, p, out = _one(lambda q, k, v, pre, post: heads.talking_heads_attention(
      q, k, v, pre_mix=pre, post_mix=post, causal=True), q, k, v, pre, post)
  assert kind == "talking_heads"
  s = np.einsum("btnh,bsnh->bnts", np.asarray(q, np.float64), np.asarray(k, np.float64)) / 2.0
  s = np.einsum("bnts,nm->bmts", s, np.asarray(pre, np.float64))
  w = _np_masked_softmax(s, np.tril(np.ones((T, T), bool)))
  want = np.einsum("bmts,ml->blts", w, np.asarray(post, np.float64))
  np.testing.assert_allclose(p, want, rtol=1e-4, atol=ATOL)
  # rows of the mixed weights sum to the column sums of post_mix, not to 1
  np.testing.assert_allclose(p.sum(-1), np.broadcast_to(
      np.asarray(post).sum(0)[None, :, None], (B, N, T)), rtol=1e-4, atol=ATOL)
  np.testing.assert_allclose(_pv(p, v), out, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- routing

def test_sparsifiner_map_is_scattered_top_keep():
  B, T, N, H, keep = 1, 8, 2, 4, 3
  q, k, v = rnd(12, (B, T, N, H)), rnd(13, (B, T, N, H)), rnd(14, (B, T, N, T))
  conn = rnd(15, (B, N, T, T))
  kind, p, out = _one(lambda *a: routing.sparsifiner_attention(*a, keep=keep), q, k, v, conn)
  assert kind == "softmax"
  kth = np.sort(np.asarray(conn), -1)[..., -keep][..., None]
  ok = np.asarray(conn) >= kth
  assert (ok.sum(-1) == keep).all()
  s = np.einsum("btnh,bsnh->bnts", np.asarray(q, np.float64), np.asarray(k, np.float64)) / 2.0
  np.testing.assert_allclose(p, _np_masked_softmax(s, ok), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(_pv(p, v), out, rtol=1e-4, atol=ATOL)


@pytest.mark.parametrize("causal,top_k", [(True, 2), (True, 1), pytest.param(
    False, 2, marks=pytest.mark.slow)])
def test_moba_gather_path_is_one_call_with_the_selected_blocks(causal, top_k):
  B, T, N, K, H, bs = 1, 16, 4, 2, 4, 4
  q, k, v = rnd(16, (B, T, N, H)), rnd(17, (B, T, K, H)), rnd(18, (B, T, K, T))
  kind, p, out = _one(lambda *a: routing.moba_attention(
      *a, block_size=bs, top_k=top_k, causal=causal, implementation="gather"), q, k, v,
                      plain=True)
  # one call: the own-block call inside the gather path is nested, not seen
  assert kind == "softmax" and p.shape == (B, N, T, T)
  # independent choice: gate = q . mean of each key block; causal: own block + best earlier
  qn, kn = np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), N // K, axis=2)
  gate = np.einsum("btnh,bcnh->bntc", qn, kn.reshape(B, T // bs, bs, N, H).mean(2))
  own = np.arange(T) // bs
  blocks = np.zeros(gate.shape, bool)
  for b, n, t in np.ndindex(B, N, T):
    if causal:
      blocks[b, n, t, own[t]] = True
      earlier = np.argsort(-gate[b, n, t, :own[t]])[:top_k - 1]
      blocks[b, n, t, earlier] = True
    else:
      blocks[b, n, t, np.argsort(-gate[b, n, t])[:top_k]] = True
  ok = blocks[..., own]
  if causal:
    ok &= np.tril(np.ones((T, T), bool))
  s = np.einsum("btnh,bsnh->bnts", qn, kn) / 2.0
  np.testing.assert_allclose(p, _np_masked_softmax(s, ok), rtol=RTOL, atol=ATOL)
  vr = np.repeat(np.asarray(v), N // K, axis=2)
  np.testing.assert_allclose(_pv(p, vr), out, rtol=1e-4, atol=ATOL)


# ----------------------------------------------------------------------------- gated linear

def _causal_upper_zero(p):
  T = p.shape[-1]
  assert (p[..., np.triu(np.ones((T, T), bool), 1)] == 0).all()


def test_gla_and_delta_rule_implied_weights_reproduce_the_output():
  B, T, N, H = 1, 8, 2, 4
  q, k, v = rnd(19, (B, T, N, H)), rnd(20, (B, T, N, H)), rnd(21, (B, T, N, T))
  kn = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  log_alpha = -jnp.abs(rnd(22, (B, T, N, H), scale=0.3))
  beta = jax.nn.sigmoid(rnd(23, (B, T, N)))
  g = -jnp.abs(rnd(24, (B, T, N), scale=0.3))
  cases = {
      "gla": (lambda *a: L.gated_linear_attention(*a, chunk_size=4), (q, k, v, log_alpha)),
      "delta": (lambda *a: L.delta_rule_attention(*a, chunk_size=4), (q, kn, v, beta)),
      "gated_delta": (lambda *a: L.gated_delta_rule_attention(*a, chunk_size=4,
                                                              return_state=True),
                      (q, kn, v, beta, g)),
  }
  ps = {}
  for name, (fn, args) in cases.items():
    kind, p, out = _one(fn, *args, plain=name == "gated_delta")   # (out, state)
    ps[name] = p
    assert kind == "linear" and p.shape == (B, N, T, T), name
    _causal_upper_zero(p)
    o = out[0] if isinstance(out, tuple) else out
    np.testing.assert_allclose(_pv(p, v), o, rtol=1e-4, atol=1e-4, err_msg=name)
  # GLA by its definition: W_ij = sum_h scale q_ih k_jh exp(b_ih - b_jh), j <= i
  b = np.cumsum(np.asarray(log_alpha, np.float64), axis=1)
  want = np.einsum("binh,bjnh,bijnh->bnij", np.asarray(q, np.float64) / 2.0,
                   np.asarray(k, np.float64), np.exp(b[:, :, None] - b[:, None, :]))
  want = want * np.tril(np.ones((T, T)))
  np.testing.assert_allclose(ps["gla"], want, rtol=1e-4, atol=ATOL)


def test_ssd_is_one_call_with_its_implied_weights():
  Bt, T, N, P, G, S = 1, 8, 2, 8, 1, 4
  x = rnd(25, (Bt, T, N, P))
  dt = jax.nn.softplus(rnd(26, (Bt, T, N)))
  A = -jnp.exp(rnd(27, (N,)))
  Bm, Cm, D = rnd(28, (Bt, T, G, S)), rnd(29, (Bt, T, G, S)), rnd(30, (N,))
  kind, p, y = _one(lambda x, dt, A, Bm, Cm, D: L.ssd_attention(x, dt, A, Bm, Cm, D=D,
                                                                 chunk_size=4),
                    x, dt, A, Bm, Cm, D, plain=True)
  # one call, not also the inner decayed_linear_attention
  assert kind == "linear" and p.shape == (Bt, N, T, T)
  _causal_upper_zero(p)
  # W_ij = (C_i . B_j) exp(sum_{l=j+1..i} dt_l A) dt_j  (+ D on the diagonal)
  cum = np.cumsum(np.asarray(dt, np.float64) * np.asarray(A, np.float64), axis=1)  # [B,T,N]
  cb = np.einsum("bif,bjf->bij", np.asarray(Cm, np.float64)[:, :, 0],
                 np.asarray(Bm, np.float64)[:, :, 0])
  dec = np.exp(np.minimum(cum[:, :, None, :] - cum[:, None, :, :], 0.0))      # [B,i,j,N]
  want = (cb[..., None] * dec * np.asarray(dt, np.float64)[:, None]).transpose(0, 3, 1, 2)
  want = want * np.tril(np.ones((T, T))) + np.asarray(D)[None, :, None, None] * np.eye(T)
  np.testing.assert_allclose(p, want, rtol=1e-4, atol=ATOL)
  np.testing.assert_allclose(_pv(p, x), y, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- vision linear

def test_hiif_weights_apply_to_normalised_values():
  B, T, N, H = 1, 6, 2, 4
  q, k, v = rnd(31, (B, T, N, H)), rnd(32, (B, T, N, H)), rnd(33, (B, T, N, T))
  kind, p, out = _one(L.hiif_attention, q, k, v)
  assert kind == "linear"
  ln = lambda x: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
  kn, vn = ln(np.asarray(k, np.float64)), ln(np.asarray(v, np.float64))
  want = np.einsum("btnh,bsnh->bnts", np.asarray(q, np.float64), kn) / T
  np.testing.assert_allclose(p, want, rtol=1e-4, atol=ATOL)
  np.testing.assert_allclose(_pv(p, vn), out, rtol=1e-4, atol=1e-4)


def test_feat_channel_map():
  B, Hh, Ww, N, H = 1, 2, 3, 2, 3
  r, k, v = (rnd(34 + i, (B, Hh, Ww, N, H)) for i in range(3))
  dec, bon = jnp.abs(rnd(37, (N, H))), rnd(38, (N, H))
  run = lambda r, k, v, dec, bon: L.feat_attention(r, k, v, spatial_decay=dec,
                                                   spatial_bonus=bon, channel_temperature=2.0)
  kind, p, out = _one(run, r, k, v, dec, bon)
  C = N * H
  assert kind == "softmax" and p.shape == (B, 1, C, C)
  # spatial WKV over the Lt = 6 row-major tokens, per channel: w_ti = exp(-(|t-i| - 1) d / Lt
  # + k_i) (i != t), w_tt = exp(bonus + k_t); then y = sigmoid(r) * wkv
  Lt = Hh * Ww
  kk, vv = (np.asarray(x, np.float64).reshape(B, Lt, C) for x in (k, v))
  d, bo = np.asarray(dec, np.float64).reshape(C), np.asarray(bon, np.float64).reshape(C)
  dist = np.abs(np.arange(Lt)[:, None] - np.arange(Lt)[None, :])[None, :, :, None]
  w = np.where(dist == 0, np.exp(bo + kk[:, None]), np.exp(-(dist - 1) * d / Lt + kk[:, None]))
  wkv = (w * vv[:, None]).sum(2) / w.sum(2)
  y = wkv / (1 + np.exp(-np.asarray(r, np.float64).reshape(B, Lt, C)))
  yn = y / np.linalg.norm(y, axis=1, keepdims=True)
  want = _np_masked_softmax(2.0 * np.einsum("bsc,bsd->bcd", yn, yn), np.ones((C, C), bool))
  np.testing.assert_allclose(p[:, 0], want, rtol=1e-4, atol=ATOL)
  np.testing.assert_allclose(np.einsum("bcd,bsd->bsc", p[:, 0], y), out.reshape(B, -1, C),
                             rtol=1e-4, atol=1e-4)
  ex, _, _ = _extras(run, r, k, v, dec, bon)
  np.testing.assert_allclose(ex["wkv"], (w / w.sum(2, keepdims=True)).transpose(0, 3, 1, 2),
                             rtol=1e-4, atol=ATOL)
  with pytest.raises(ValueError, match="no per-head output"):
    with Recorder(record=False, gates={"attention_0": jnp.ones(1)}).active():
      jax.eval_shape(lambda *a: run(*a), r, k, v, dec, bon)   # fresh: no trace cache


def _extras(fn, *args):
  """``({suffix: array}, main map, out)`` of the single call of ``fn(*args)`` with extras."""
  maps, out = analysis.capture(fn, args, return_output=True, extras=True)
  (main,) = [m for m in maps if ":" not in m]
  return {m.split(":", 1)[1]: p for m, p in maps.items() if m != main}, maps[main], out


def _np_wkv(k, d, bo):
  """``bidirectional_wkv``'s weights along axis 1 of ``k [X, L, C]``: ``[X, C, L, L]``."""
  L = k.shape[1]
  dist = np.abs(np.arange(L)[:, None] - np.arange(L)[None, :])
  w = np.empty(k.shape[:1] + (k.shape[2], L, L))
  for t, i in np.ndindex(L, L):
    w[:, :, t, i] = np.exp((bo if t == i else -(dist[t, i] - 1) * d / L) + k[:, i])
  return w / w.sum(-1, keepdims=True)


def test_feat_video_wkv_extra_is_the_space_time_token_map():
  B, F, Hh, Ww, N, H = 1, 3, 2, 2, 2, 2
  r, k, v = (rnd(60 + i, (B, F, Hh, Ww, N, H)) for i in range(3))
  sd, sb, td, tb = (jnp.abs(rnd(63, (N, H))), rnd(64, (N, H)), jnp.abs(rnd(65, (N, H))),
                    rnd(66, (N, H)))
  ex, a, out = _extras(lambda r, k, v: L.feat_attention(
      r, k, v, spatial_decay=sd, spatial_bonus=sb, temporal_decay=td, temporal_bonus=tb), r, k, v)
  C, P = N * H, Hh * Ww
  assert list(ex) == ["wkv"] and ex["wkv"].shape == (B, C, F * P, F * P)
  kk = np.asarray(k, np.float64).reshape(B, F, P, C)
  ws = _np_wkv(kk.reshape(B * F, P, C), np.asarray(sd, np.float64).reshape(C),
               np.asarray(sb, np.float64).reshape(C)).reshape(B, F, C, P, P)
  wt = _np_wkv(kk.transpose(0, 2, 1, 3).reshape(B * P, F, C), np.asarray(td, np.float64).reshape(
      C), np.asarray(tb, np.float64).reshape(C)).reshape(B, P, C, F, F)
  want = np.zeros((B, C, F, P, F, P))
  for f, t, g, i in np.ndindex(F, P, F, P):   # frame f pixel t <- frame g pixel i
    want[:, :, f, t, g, i] = wt[:, t, :, f, g] * ws[:, g, :, t, i]
  want = want.reshape(B, C, F * P, F * P)
  np.testing.assert_allclose(ex["wkv"], want, rtol=1e-4, atol=ATOL)
  np.testing.assert_allclose(ex["wkv"].sum(-1), 1, rtol=1e-5)
  y = (np.einsum("bcts,bsc->btc", want, np.asarray(v, np.float64).reshape(B, -1, C))
       / (1 + np.exp(-np.asarray(r, np.float64).reshape(B, -1, C))))
  np.testing.assert_allclose(np.einsum("btd,bcd->btc", y, a[:, 0]), out.reshape(B, -1, C),
                             rtol=1e-4, atol=1e-4)


def _np_conv_matrix(kernel, Hh, Ww):
  """'SAME' depthwise convolution ``[kh, kw, C]`` as ``[C, T, T]`` token matrices."""
  kh, kw, C = kernel.shape
  m = np.zeros((C, Hh * Ww, Hh * Ww))
  for y, x, dy, dx in np.ndindex(Hh, Ww, kh, kw):
    yy, xx = y + dy - kh // 2, x + dx - kw // 2
    if 0 <= yy < Hh and 0 <= xx < Ww:
      m[:, y * Ww + x, yy * Ww + xx] = kernel[dy, dx]
  return m


def _np_linear_map(q, k, phi):
  """Normalised kernelized attention weights ``[B, N, T, S]`` (one kv head per head)."""
  s = np.einsum("btnh,bsnh->bnts", phi(q), phi(k))
  return s / (s.sum(-1, keepdims=True) + 1e-6)


def test_l2vit_lcm_extras_are_the_whole_mechanism_per_channel():
  from math import erf
  B, Hh, Ww, N, H, Hv = 1, 3, 3, 2, 3, 2
  q, k, v = rnd(70, (B, Hh, Ww, N, H)), rnd(71, (B, Hh, Ww, N, H)), rnd(72, (B, Hh, Ww, N, Hv))
  kern = (rnd(73, (3, 3, N, Hv)), rnd(74, (3, 3, N, Hv)))
  bias = (rnd(75, (N, Hv)), rnd(76, (N, Hv)))
  run = lambda q, k, v: L.l2vit_attention(q, k, v, lcm_kernels=kern, lcm_biases=bias)
  ex, p, out = _extras(run, q, k, v)
  np.testing.assert_allclose(out, jax.jit(run)(q, k, v), rtol=1e-6, atol=1e-6)
  T, C = Hh * Ww, N * Hv
  relu = lambda x: np.maximum(x, 0.0)
  f64 = lambda x: np.asarray(x, np.float64).reshape(B, T, *x.shape[3:])
  w = _np_linear_map(f64(q), f64(k), relu)
  np.testing.assert_allclose(p, w, rtol=1e-4, atol=ATOL)
  k1, k2 = (_np_conv_matrix(np.asarray(x, np.float64).reshape(3, 3, C), Hh, Ww) for x in kern)
  b1, b2 = (np.asarray(x, np.float64).reshape(C) for x in bias)
  wc = np.repeat(w, Hv, axis=1)                                          # [B, C, T, S]
  vc = f64(v).reshape(B, T, C)
  o = np.einsum("bcts,bsc->btc", wc, vc)
  h = np.einsum("cts,bsc->btc", k1, o) + b1
  cdf = 0.5 * (1 + np.vectorize(erf)(h / np.sqrt(2)))
  want = np.stack([[(np.eye(T) + k2[c] @ np.diag(cdf[b, :, c]) @ k1[c]) @ wc[b, c]
                    for c in range(C)] for b in range(B)])
  offset = np.einsum("cts,bsc->btc", k2, cdf * b1) + b2
  assert sorted(ex) == ["lcm", "lcm_offset"]
  np.testing.assert_allclose(ex["lcm"], want, rtol=1e-4, atol=ATOL)
  np.testing.assert_allclose(ex["lcm_offset"].reshape(B, T, C), offset, rtol=1e-4, atol=ATOL)
  np.testing.assert_allclose(np.einsum("bcts,bsc->btc", want, vc) + offset,
                             out.reshape(B, T, C), rtol=1e-4, atol=1e-4)


def test_care_extras_are_the_gated_branches():
  B, Hh, Ww, N, H, Hv, Cl = 1, 3, 3, 2, 3, 2, 3
  q, k, v = rnd(80, (B, Hh, Ww, N, H)), rnd(81, (B, Hh, Ww, N, H)), rnd(82, (B, Hh, Ww, N, Hv))
  xl, ck, cb = rnd(83, (B, Hh, Ww, Cl)), rnd(84, (3, 3, Cl)), rnd(85, (Cl,))
  lg, gl = rnd(86, (Cl, N, Hv)), rnd(87, (N, Hv, Cl))
  run = lambda q, k, v, xl: L.care_attention(q, k, v, xl, conv_kernel=ck, local_to_global=lg,
                                             global_to_local=gl, conv_bias=cb)
  ex, p, out = _extras(run, q, k, v, xl)
  for a, b in zip(out, jax.jit(run)(q, k, v, xl)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  T, C = Hh * Ww, N * Hv
  elu1 = lambda x: np.where(x > 0, x + 1.0, np.exp(x))
  f64 = lambda x: np.asarray(x, np.float64).reshape((B, T) + x.shape[3:])
  w = _np_linear_map(f64(q), f64(k), elu1)
  np.testing.assert_allclose(p, w, rtol=1e-4, atol=ATOL)
  sig = lambda x: 1 / (1 + np.exp(-x))
  g = np.einsum("bcts,bsc->btc", np.repeat(w, Hv, axis=1), f64(v).reshape(B, T, C))
  kc = _np_conv_matrix(np.asarray(ck, np.float64), Hh, Ww)
  loc = np.einsum("cts,bsc->btc", kc, f64(xl)) + np.asarray(cb, np.float64)
  sg = sig(loc @ np.asarray(lg, np.float64).reshape(Cl, C))              # [B, T, C]
  sl = sig(g @ np.asarray(gl, np.float64).reshape(C, Cl))                # [B, T, Cl]
  assert sorted(ex) == ["global", "local", "local_offset"]
  np.testing.assert_allclose(ex["global"], np.repeat(w, Hv, 1) * sg.transpose(0, 2, 1)[..., None],
                             rtol=1e-4, atol=ATOL)
  np.testing.assert_allclose(ex["local"], kc[None] * sl.transpose(0, 2, 1)[..., None],
                             rtol=1e-4, atol=ATOL)
  np.testing.assert_allclose(ex["local_offset"], sl * np.asarray(cb), rtol=1e-4, atol=ATOL)
  np.testing.assert_allclose(np.einsum("bcts,bsc->btc", ex["global"], f64(v).reshape(B, T, C)),
                             out[0].reshape(B, T, C), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.einsum("bcts,bsc->btc", ex["local"], f64(xl))
                             + ex["local_offset"], out[1].reshape(B, T, Cl), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- recurrent state

def _state_case(name):
  B, T, N, H, Hv = 1, 6, 2, 4, 3
  q, k, v = rnd(90, (B, T, N, H)), rnd(91, (B, T, N, H)), rnd(92, (B, T, N, Hv))
  kn = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  S0 = rnd(93, (B, N, Hv, H))
  la = -jnp.abs(rnd(94, (B, T, N, H), scale=0.3))
  beta = jax.nn.sigmoid(rnd(95, (B, T, N)))
  if name == "linear":   # normalised: the state's normaliser z enters the map
    st = (rnd(96, (B, N, H, Hv)), jnp.abs(rnd(97, (B, N, H))) + 1.0)
    return (lambda q, k, v: L.linear_attention(q, k, v, causal=True, chunk_size=4, state=st),
            (q, k, v), st)
  if name == "decayed":
    st = rnd(96, (B, N, H, Hv))
    return (lambda q, k, v: L.decayed_linear_attention(q, k, v, decay=0.8, chunk_size=4,
                                                       state=st), (q, k, v), st)
  if name == "gla":
    return (lambda q, k, v: L.gated_linear_attention(q, k, v, la, chunk_size=4, state=S0,
                                                     return_state=True), (q, k, v), S0)
  if name == "delta":
    return (lambda q, k, v: L.delta_rule_attention(q, k, v, beta, chunk_size=4, state=S0),
            (q, kn, v), S0)
  dt, A = jax.nn.softplus(rnd(98, (B, T, N))), -jnp.exp(rnd(99, (N,)))
  Bm, Cm = rnd(100, (B, T, 1, H)), rnd(101, (B, T, 1, H))
  return (lambda x: L.ssd_attention(x, dt, A, Bm, Cm, chunk_size=4, state=S0), (v,), S0)


@pytest.mark.parametrize("name", ["linear", "decayed", "gla", "delta", "ssd"])
def test_state_contribution_completes_the_map(name):
  fn, args, st = _state_case(name)
  ex, p, out = _extras(fn, *args)
  o = out[0] if isinstance(out, tuple) else out
  np.testing.assert_allclose(o, (jax.jit(fn)(*args)[0] if isinstance(out, tuple)
                                 else jax.jit(fn)(*args)), rtol=1e-6, atol=1e-6)
  v = args[-1] if name != "ssd" else args[0]
  assert list(ex) == ["state"] and ex["state"].shape == o.shape
  assert np.abs(ex["state"]).max() > 1e-2
  np.testing.assert_allclose(_pv(p, v) + ex["state"], o, rtol=1e-4, atol=1e-4)
  q, k = (np.asarray(x, np.float64) for x in args[:2]) if name != "ssd" else (None, None)
  T = o.shape[1]
  if name == "linear":
    # W_ts = phi_t.phi_s / (phi_t.(z0 + sum_{s'<=t} phi_s')), term phi_t S0 / den
    phi = lambda x: np.where(x > 0, x + 1.0, np.exp(x))
    s = np.einsum("btnh,bsnh->bnts", phi(q), phi(k)) * np.tril(np.ones((T, T)))
    den = s.sum(-1) + np.einsum("btnh,bnh->bnt", phi(q), np.asarray(st[1], np.float64))
    np.testing.assert_allclose(p, s / den[..., None], rtol=1e-4, atol=ATOL)
    term = np.einsum("btnh,bnhv->btnv", phi(q), np.asarray(st[0], np.float64))
    np.testing.assert_allclose(ex["state"], term / den.transpose(0, 2, 1)[..., None],
                               rtol=1e-4, atol=ATOL)
  if name == "gla":      # term: S0 (exp(b_t) scale q_t)
    b = np.cumsum(np.asarray(-jnp.abs(rnd(94, q.shape, scale=0.3)), np.float64), axis=1)
    term = np.einsum("bnvh,btnh->btnv", np.asarray(st, np.float64), np.exp(b) * q / 2.0)
    np.testing.assert_allclose(ex["state"], term, rtol=1e-4, atol=ATOL)


# ----------------------------------------------------------------------------- pooling

def test_slot_attention_map_is_the_weighted_mean():
  B, M, S, N, H = 2, 3, 7, 1, 4
  q, k, v = rnd(39, (B, M, N, H)), rnd(40, (B, S, N, H)), rnd(41, (B, S, N, S))
  seg = jnp.asarray([[0] * 7, [0] * 5 + [-1] * 2], jnp.int32)   # two padded inputs
  kind, p, out = _one(lambda *a: pooling.slot_attention_step(*a[:3], eps=1e-8,
                                                             segment_ids=a[3]), q, k, v, seg)
  assert kind == "softmax"
  assert p.shape == (B, N, M, S)
  logits = np.einsum("bsnh,bmnh->bnsm", np.asarray(k, np.float64), np.asarray(q, np.float64)) / 2
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  attn = attn / attn.sum(-1, keepdims=True) + 1e-8
  attn = attn * (np.asarray(seg) >= 0)[:, None, :, None]
  want = (attn / attn.sum(2, keepdims=True)).transpose(0, 1, 3, 2)
  np.testing.assert_allclose(p, want, rtol=RTOL, atol=ATOL)
  assert (p[1, ..., 5:] == 0).all()
  np.testing.assert_allclose(p.sum(-1), 1, rtol=1e-5)
  np.testing.assert_allclose(_pv(p, v), out, rtol=1e-4, atol=ATOL)


def test_super_token_association_and_upsample_maps():
  B, Hh, Ww, C, st_size = 2, 4, 6, 3, 2
  x, y = rnd(50, (B, Hh, Ww, C)), rnd(51, (B, Hh // 2, Ww // 2, C))
  kind, p, st = _one(lambda x: pooling.super_token_association(x, stoken_size=st_size)[0], x)
  h, w = Hh // st_size, Ww // st_size
  M, T = h * w, Hh * Ww
  assert kind == "pooling" and p.shape == (B, 1, M, T)
  # independent: grid means, then a softmax of x_i . S_j / sqrt(C) over the (up to) 9 super
  # tokens around pixel i's cell; the super tokens are the column-normalised means
  xn = np.asarray(x, np.float64)
  s0 = xn.reshape(B, h, st_size, w, st_size, C).mean((2, 4)).reshape(B, M, C)
  A = np.zeros((B, T, M))
  for i in range(T):
    cy, cx = (i // Ww) // st_size, (i % Ww) // st_size
    nb = [(cy + dy) * w + cx + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1)
          if 0 <= cy + dy < h and 0 <= cx + dx < w]
    logits = np.einsum("bc,bjc->bj", xn.reshape(B, T, C)[:, i], s0[:, nb]) / np.sqrt(C)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    A[:, i, nb] = e / e.sum(-1, keepdims=True)
  P = A.transpose(0, 2, 1) / A.sum(1)[..., None]
  np.testing.assert_allclose(p[:, 0], P, rtol=1e-4, atol=ATOL)
  np.testing.assert_allclose(p.sum(-1), 1, rtol=1e-5)
  np.testing.assert_allclose(np.einsum("bmt,btc->bmc", p[:, 0], xn.reshape(B, T, C)),
                             st.reshape(B, M, C), rtol=1e-4, atol=ATOL)
  Q = pooling.super_token_association(x, stoken_size=st_size)[1]
  kind, a, up = _one(lambda y, Q: pooling.super_token_upsample(y, Q, stoken_size=st_size), y, Q)
  assert kind == "pooling" and a.shape == (B, 1, T, M)
  np.testing.assert_allclose(a[:, 0], A, rtol=1e-4, atol=ATOL)
  np.testing.assert_allclose(np.einsum("btm,bmc->btc", a[:, 0], np.asarray(y, np.float64).reshape(
      B, M, C)), up.reshape(B, T, C), rtol=1e-4, atol=ATOL)


def test_mil_pooling_map_one_head_branches_as_queries():
  B, n, D, Lh, M = 2, 6, 5, 4, 3
  h, V, U, w = rnd(42, (B, n, D)), rnd(43, (D, Lh)), rnd(44, (D, Lh)), rnd(45, (Lh, M))
  kind, p, z = _one(pooling.gated_mil_pooling, h, V, U, w)
  assert kind == "pooling" and p.shape == (B, 1, M, n)
  hn = np.asarray(h, np.float64)
  g = np.tanh(hn @ np.asarray(V, np.float64)) / (1 + np.exp(-(hn @ np.asarray(U, np.float64))))
  e = np.einsum("bnl,lm->bmn", g, np.asarray(w, np.float64))
  want = _np_masked_softmax(e, np.ones(e.shape, bool))
  np.testing.assert_allclose(p[:, 0], want, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(np.einsum("bmn,bnd->bmd", p[:, 0], hn), z, rtol=1e-4, atol=ATOL)
  # one branch (w [L]): a [B, 1, 1, n]
  _, p1, _ = _one(pooling.gated_mil_pooling, h, V, U, w[:, 0])
  np.testing.assert_allclose(p1[:, 0, 0], want[:, 0], rtol=RTOL, atol=ATOL)
  with pytest.raises(ValueError, match="no per-head output"):
    with Recorder(record=False, patch={"attention_0": {0: z[:, 0]}}).active():
      jax.eval_shape(lambda *a: pooling.gated_mil_pooling(*a), h, V, U, w)


# ----------------------------------------------------------------------------- every variant

B_, T_, GRID, D_, N_ = 2, 8, (4, 4), 16, 2

# layer maps: list of shapes [B, N, T, S] in call order ('<model>', '<model>#1', ...); the
# pooling and cross-attention layers give [B, N, queries, keys]
_SEQ, _GRID = (B_, N_, T_, T_), (B_, N_, 16, 16)
EXPECTED = {
    **{name: [_SEQ] for name in (
        "additive", "alibi", "chunked", "collapsed_qk", "cosine", "dual_triangle",
        "dynamic_mask", "head_gates", "log_n_scaling", "mha", "moba", "moh", "neighborhood",
        "prefix_lm", "relpos", "sinkhorn", "sinks", "sliding_window", "softcap",
        "talking_heads", "efficient", "flow", "focused", "inline", "lightning", "linear",
        "retention", "gla", "deltanet", "gated_deltanet", "mamba2", "hiif")},
    **{name: [_GRID] for name in (
        "axial", "biformer", "botnet", "care", "convit", "criss_cross", "grid", "halo",
        "l2vit", "maxvit_block", "maxvit_grid", "sparsifiner", "swin")},
    "agent": [(2, 2, 4, 8), (2, 2, 8, 4)],                      # agents <- tokens <- agents
    "ccnet": [_GRID, _GRID],                                    # two criss-cross passes
    "crossformer": [(8, 2, 4, 4), (8, 2, 4, 4)],                # groups of 4 on the batch axis
    "cswin": [(2, 1, 16, 16), (2, 1, 16, 16)],                  # stripes: half the heads each
    "davit": [_GRID, (2, 2, 8, 8)],                             # window, channel groups C_g = 8
    "feat": [(2, 1, 16, 16)],                                   # channels x channels, C = 16
    "hilo": [(2, 1, 16, 16), (2, 1, 16, 4)],                    # Hi-Fi window, Lo-Fi pooled
    "isab": [_SEQ, _SEQ],                                       # 8 inducing points
    "lookupvit": [(2, 2, 4, 8), (2, 2, 4, 4), (2, 2, 8, 4)],
    "mw_mha": [(2, 1, 8, 8), (2, 1, 8, 8)],                     # one head group per window
    "perceiver": [_SEQ, _SEQ, _SEQ],                            # 8 latents
    "proxy": [(2, 2, 2, 2), (2, 2, 8, 2)],                      # 2 windows of 4: 2 proxies
    "pvt": [(2, 2, 16, 4)],
    "registers": [(2, 2, 12, 12)],                              # 4 registers + 8 tokens
    "s2a": [(2, 2, 16, 4)],
    "shvit": [(2, 1, 8, 8)],                                    # single head on a channel part
    # association (super tokens <- pixels), attention among the 2 x 2 super tokens, upsample
    "super_token": [(2, 1, 4, 16), (2, 2, 4, 4), (2, 1, 16, 4)],
    "twins": [_GRID, (2, 2, 16, 4)],                            # LSA window, GSA pooled keys
    "class_attention": [(2, 2, 1, 9)],                          # CLS <- CLS + 8 tokens
    "mil_pool": [(2, 1, 1, 8)],                                 # one head, branches x instances
    "pma": [(2, 2, 1, 8)],
    "simpool": [(2, 2, 1, 8)],
    "slot": [(2, 2, 1, 8)] * 3,                                 # one map per slot iteration
}

# rows: 'one' (non-negative, sum to 1; also the normalised linear kernels), 'signed_one'
# (sum to 1, entries of any sign: InLine's subtractive normalisation), 'sink' (in (0, 1]:
# the sink logit takes the rest), 'free' (implied weights of decayed, gated and delta-rule
# recurrences, flow attention, HIIF, mixed talking-heads weights: rows need not sum to 1)
FREE = {"flow", "lightning", "retention", "gla", "deltanet", "gated_deltanet", "mamba2",
        "hiif", "talking_heads"}
ROWS = {name: "free" if name in FREE else "sink" if name == "sinks" else
        "signed_one" if name == "inline" else "one" for name in EXPECTED}
# ReLU feature maps: a query with no positive feature has an all-zero row
EMPTY_ROWS_OK = {"focused", "l2vit"}
CAUSAL_LINEAR = {"lightning", "retention", "gla", "deltanet", "gated_deltanet", "mamba2"}

# one or two per family in the default suite; everything in the slow sweep
DEFAULT = ["mha", "sinks", "moba", "talking_heads", "sinkhorn", "linear", "gla", "mamba2",
           "swin", "hilo", "proxy", "mil_pool", "slot", "feat", "convit"]

# CNN channel/spatial modules (attnjax.layers.channel): not attention variants (not in the
# variant registry) and not captured: elementwise sigmoid gates from pooled features (se,
# eca, coord, ela, cbam, triplet, ulsam, a2n), convolutions (lka, lkca: LKCA's
# conv_as_attention is an input-independent kernel, not a query-key map), and PSA's
# softmax over positions / channels of a one-channel query (a pooling weight per image).
CHANNEL_NOT_CAPTURED = {
    "se": "gate", "eca": "gate", "coord": "gate", "ela": "gate", "cbam": "gate",
    "triplet": "gate", "ulsam": "gate", "a2n": "gate", "lka": "convolution",
    "lkca": "convolution", "psa_parallel": "pooling softmax of one query",
    "psa_sequential": "pooling softmax of one query",
    "sdlska": "convolution", "gcg": "gate (its global-context pooling softmax has one query)",
}


def test_every_variant_has_an_expected_entry():
  assert sorted(EXPECTED) == variants.names()
  assert set(DEFAULT) <= set(EXPECTED) and CAUSAL_LINEAR <= FREE
  from attnjax.layers import channel
  assert sorted(CHANNEL_NOT_CAPTURED) == channel.names()
  assert not set(channel.names()) & set(variants.names())


def _capture_variant(name):
  kind = variants.info(name).kind
  opts = config_lib.variant_options(name, seq_len=T_, grid=GRID)
  layer = variants.build(name, d_model=D_, num_heads=N_, rngs=nnx.Rngs(0), **opts)
  shape = (B_,) + GRID + (D_,) if kind == "spatial" else (B_, T_, D_)
  x = rnd(sum(map(ord, name)), shape)
  return analysis.capture(layer, x)


def _check_variant(name):
  maps = _capture_variant(name)
  want = EXPECTED[name]
  names = ["<model>" if i == 0 else f"<model>#{i}" for i in range(len(want))]
  if name == "pma":
    names = ["attention"]   # the PMA module's inner attention layer
  assert list(maps) == names, (name, list(maps))
  for (layer, p), shape in zip(maps.items(), want):
    assert p.shape == shape and p.dtype == np.float32, (name, layer, p.shape)
    assert np.isfinite(p).all(), (name, layer)
    rows = p.sum(-1)
    if ROWS[name] == "one":
      assert (p >= 0).all(), (name, layer)
      if name in EMPTY_ROWS_OK:
        empty = (p == 0).all(-1)
        assert empty.mean() < 0.5, name
        rows = np.where(empty, 1.0, rows)
      np.testing.assert_allclose(rows, 1, rtol=1e-5, err_msg=f"{name} {layer}")
    elif ROWS[name] == "signed_one":
      np.testing.assert_allclose(rows, 1, rtol=1e-5, err_msg=f"{name} {layer}")
    elif ROWS[name] == "sink":
      assert (p >= 0).all() and (rows > 0).all() and (rows <= 1 + 1e-6).all(), name
      assert (rows < 1 - 1e-3).any(), name   # the sink takes mass
    if name in CAUSAL_LINEAR:
      _causal_upper_zero(p)
      assert np.abs(np.diagonal(p, axis1=-2, axis2=-1)).min() > 0, name
    assert np.abs(p).max() > 0, (name, layer)


@pytest.mark.parametrize("name", DEFAULT)
def test_capture_variant(name):
  _check_variant(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in variants.names() if n not in DEFAULT])
def test_capture_variant_full_sweep(name):
  if name not in EXPECTED:
    pytest.fail(f"variant {name!r} has no EXPECTED entry in tests/test_capture_all.py")
  _check_variant(name)
