"""Token / pooling / latent attention (attnjax.ops.pooling, attnjax.layers.tokens).

Each op is checked against a plain jnp reference written from the paper's formula
(explicit per-head / per-class / per-token loops), forward and `jax.vjp` backward with a
random cotangent, in float32 and bfloat16; the layers for permutation invariance /
equivariance, padding via segment_ids, NNX/Linen agreement and errors; and two runlocal
training smokes through `attnjax.train.trainer`.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from helpers import assert_close, rnd

from attnjax import variants
from attnjax.layers import tokens as T
from attnjax.ops import pooling as P

F32 = jnp.float32
DTYPES = [jnp.float32, jnp.bfloat16]


def _sm(x, axis=-1):
  x = x - jnp.max(x, axis=axis, keepdims=True)
  e = jnp.exp(x)
  return e / jnp.sum(e, axis=axis, keepdims=True)


def _fwd_bwd(f, args, ct):
  out, vjp = jax.vjp(f, *args)
  return out, vjp(ct.astype(out.dtype))


def _check(op, ref, args, dtype, seed=99, jit=True):
  """op(*args) vs ref(*f32 args): forward and the vjp of a random cotangent (both jitted:
  eager dispatch of the explicit loops would dominate the run time)."""
  shape = jax.eval_shape(op, *args)
  ct = rnd(seed, shape.shape, dtype)
  wrap = jax.jit if jit else (lambda f: f)
  out, grads = wrap(lambda ct, *a: _fwd_bwd(op, a, ct))(ct, *args)
  rout, rgrads = wrap(lambda ct, *a: _fwd_bwd(ref, a, ct))(ct.astype(F32),
                                                           *[a.astype(F32) for a in args])
  assert out.dtype == args[0].dtype
  assert_close(out, rout, dtype, "forward")
  for i, (g, rg) in enumerate(zip(grads, rgrads)):
    assert_close(g, rg, dtype, f"grad of arg {i}")


def _kvh(h, N, K):
  return h // (N // K)


# ----------------------------------------------------------------------------- agent

def _ref_agent(q, k, v, a, b2, b1, valid):
  B, Tq, N, H = q.shape
  K = k.shape[2]
  s = 1.0 / math.sqrt(H)
  outs = []
  for b in range(B):
    heads = []
    for h in range(N):
      kh, vh = k[b, :, _kvh(h, N, K)], v[b, :, _kvh(h, N, K)]
      l2 = s * a[b, :, h] @ kh.T + b2[h]  # [n, S]
      l2 = jnp.where(valid[b][None], l2, -1e30)
      va = _sm(l2) @ vh
      l1 = s * q[b, :, h] @ a[b, :, h].T + b1[h]  # [T, n]
      heads.append(_sm(l1) @ va)
    outs.append(jnp.stack(heads, 1))
  return jnp.stack(outs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [4, 2])
def test_agent_attention_matches_reference(dtype, K):
  B, Tq, S, N, H, Hv, n = 2, 6, 7, 4, 8, 5, 3
  q, k, v = rnd(0, (B, Tq, N, H), dtype), rnd(1, (B, S, K, H), dtype), rnd(2, (B, S, K, Hv), dtype)
  a = rnd(3, (B, n, N, H), dtype)
  b2, b1 = rnd(4, (N, n, S), F32, 0.5), rnd(5, (N, Tq, n), F32, 0.5)
  seg = np.zeros((B, S), np.int32)
  seg[1, -2:] = -1
  valid = jnp.asarray(seg >= 0)
  op = lambda q, k, v, a: P.agent_attention(q, k, v, a, agent_bias=b2[None], query_bias=b1[None],
                                            segment_ids=seg)
  ref = lambda q, k, v, a: _ref_agent(q, k, v, a, b2, b1, valid)
  _check(op, ref, (q, k, v, a), dtype)


@pytest.mark.parametrize("impl", ["xla_chunked",
                                  pytest.param("pallas_gpu", marks=pytest.mark.slow)])
def test_agent_attention_runs_on_the_kernels(impl):
  B, S, N, K, H, n = 1, 16, 2, 1, 8, 4
  q, k, v = rnd(0, (B, S, N, H)), rnd(1, (B, S, K, H)), rnd(2, (B, S, K, H))
  a = rnd(3, (B, n, N, H))
  valid = jnp.ones((B, S), bool)
  zero2, zero1 = jnp.zeros((N, n, S)), jnp.zeros((N, S, n))
  assert_close(P.agent_attention(q, k, v, a, implementation=impl),
               _ref_agent(q, k, v, a, zero2, zero1, valid), F32)


def test_agent_attention_padded_keys_do_not_matter():
  B, S, N, H = 1, 6, 2, 4
  q, k, v = rnd(0, (B, 5, N, H)), rnd(1, (B, S, N, H)), rnd(2, (B, S, N, H))
  a = rnd(3, (B, 2, N, H))
  seg = np.array([[0, 0, 0, 0, -1, -1]])
  y1 = P.agent_attention(q, k, v, a, segment_ids=seg)
  y2 = P.agent_attention(q, k.at[:, 4:].set(7.0), v.at[:, 4:].set(-3.0), a, segment_ids=seg)
  y3 = P.agent_attention(q, k[:, :4], v[:, :4], a)
  assert_close(y1, y2, F32)
  assert_close(y1, y3, F32)


def test_agent_attention_errors():
  q, k, v = rnd(0, (1, 4, 4, 8)), rnd(1, (1, 5, 2, 8)), rnd(2, (1, 5, 2, 8))
  with pytest.raises(ValueError, match="agents"):
    P.agent_attention(q, k, v, rnd(3, (1, 2, 2, 8)))  # agents with the kv heads, not N
  with pytest.raises(ValueError, match="agents"):
    P.agent_attention(q, k, v, rnd(3, (1, 2, 4)))
  with pytest.raises(ValueError, match="q must be"):
    P.agent_attention(q[0], k, v, rnd(3, (1, 2, 4, 8)))
  with pytest.raises(ValueError, match="num_agents"):
    T.token_config("agent", 16, 2, num_agents=0)


# ----------------------------------------------------------------------------- slot

def _ref_slot(q, k, v, valid, eps):
  B, M, N, H = q.shape
  K = k.shape[2]
  outs = []
  for b in range(B):
    heads = []
    for h in range(N):
      kh, vh = k[b, :, _kvh(h, N, K)], v[b, :, _kvh(h, N, K)]
      logits = (kh @ q[b, :, h].T) / math.sqrt(H)  # [S, M]
      attn = _sm(logits, axis=1) + eps  # softmax over slots
      attn = attn * valid[b][:, None]
      w = attn / jnp.sum(attn, axis=0, keepdims=True)  # weighted mean over inputs
      heads.append(w.T @ vh)
    outs.append(jnp.stack(heads, 1))
  return jnp.stack(outs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_slot_attention_step_matches_reference(dtype):
  B, M, S, N, K, H = 2, 3, 7, 2, 1, 8
  q, k, v = rnd(0, (B, M, N, H), dtype), rnd(1, (B, S, K, H), dtype), rnd(2, (B, S, K, 6), dtype)
  seg = np.zeros((B, S), np.int32)
  seg[0, -3:] = -1
  valid = jnp.asarray((seg >= 0).astype(np.float32))
  op = lambda q, k, v: P.slot_attention_step(q, k, v, eps=1e-3, segment_ids=seg)
  _check(op, lambda q, k, v: _ref_slot(q, k, v, valid, 1e-3), (q, k, v), dtype)


def test_slot_attention_softmax_is_over_slots():
  q, k, v = rnd(0, (1, 4, 1, 8)), rnd(1, (1, 5, 1, 8)), rnd(2, (1, 5, 1, 8))
  _, attn = P.slot_attention_step(q, k, v, return_weights=True)
  np.testing.assert_allclose(np.asarray(attn.sum(-1)), 1.0, rtol=1e-6)


def test_slot_errors_name_num_slots():
  with pytest.raises(ValueError, match="num_slots"):
    P.slot_attention_step(rnd(0, (1, 0, 1, 8)), rnd(1, (1, 5, 1, 8)), rnd(2, (1, 5, 1, 8)))
  with pytest.raises(ValueError, match="num_slots"):
    T.token_config("slot", 16, 2, num_slots=0)


# ----------------------------------------------------------------------------- MIL

def _ref_mil(h, V, U, w, valid):
  B = h.shape[0]
  outs = []
  for b in range(B):
    branches = []
    for m in range(w.shape[1]):
      e = jnp.stack([w[:, m] @ (jnp.tanh(V.T @ h[b, i]) * jax.nn.sigmoid(U.T @ h[b, i]))
                     for i in range(h.shape[1])])
      e = jnp.where(valid[b] if valid.ndim == 2 else valid[b, m], e, -1e30)
      a = _sm(e)
      branches.append(a @ h[b])
    outs.append(jnp.stack(branches))
  return jnp.stack(outs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_mil_pooling_matches_reference(dtype):
  B, n, D, L, M = 2, 6, 8, 5, 2
  h, V, U, w = rnd(0, (B, n, D), dtype), rnd(1, (D, L), dtype), rnd(2, (D, L), dtype), \
      rnd(3, (L, M), dtype)
  seg = np.zeros((B, n), np.int32)
  seg[1, :2] = -1
  valid = jnp.asarray(seg >= 0)
  op = lambda h, V, U, w: P.gated_mil_pooling(h, V, U, w, segment_ids=seg)
  _check(op, lambda h, V, U, w: _ref_mil(h, V, U, w, valid), (h, V, U, w), dtype)


def test_gated_mil_instance_mask_matches_reference():
  h, V, U, w = rnd(0, (2, 6, 8)), rnd(1, (8, 5)), rnd(2, (8, 5)), rnd(3, (5, 2))
  drop = np.zeros((2, 2, 6), bool)
  drop[0, 1, [0, 3]] = True
  drop[1, 0, 5] = True
  seg = np.zeros((2, 6), np.int32)
  seg[1, 0] = -1
  valid = jnp.asarray(~drop & (seg >= 0)[:, None, :])
  op = lambda h, V, U, w: P.gated_mil_pooling(h, V, U, w, segment_ids=seg, instance_mask=drop)
  _check(op, lambda h, V, U, w: _ref_mil(h, V, U, w, valid), (h, V, U, w), F32)


def test_mil_layer_stkim_masks_the_top_instances_in_training():
  layer = variants.build("mil_pool", d_model=8, num_heads=2, rngs=nnx.Rngs(0), num_seeds=2,
                         stkim_top_k=1, stkim_prob=1.0)
  x = rnd(0, (2, 6, 8))
  p = layer.params_dict()
  _, a = P.gated_mil_pooling(x, p["V"], p["U"], p["w"], return_weights=True)
  drop = np.asarray(a) == np.asarray(a).max(-1, keepdims=True)  # prob 1: the top-1 is removed
  want = P.gated_mil_pooling(x, p["V"], p["U"], p["w"], instance_mask=jnp.asarray(drop))
  assert_close(layer(x, deterministic=False), want, F32)
  assert_close(layer(x), P.gated_mil_pooling(x, p["V"], p["U"], p["w"]), F32)


@pytest.mark.parametrize("name, opts", [("slot", dict(num_slots=2, slot_init="gaussian")),
                                        ("proxy", dict(window=4))])
def test_training_randomness_only_when_not_deterministic(name, opts):
  layer = variants.build(name, d_model=16, num_heads=2, rngs=nnx.Rngs(0), **opts)
  x = rnd(0, (2, 8, 16))
  y = layer(x)
  assert_close(layer(x), y, F32)
  y1, y2 = layer(x, deterministic=False), layer(x, deterministic=False)
  assert not np.allclose(np.asarray(y1), np.asarray(y2))
  assert bool(jnp.all(jnp.isfinite(y1)))


def test_gated_mil_single_branch_and_errors():
  h, V, U, w = rnd(0, (2, 5, 8)), rnd(1, (8, 4)), rnd(2, (8, 4)), rnd(3, (4,))
  z = P.gated_mil_pooling(h, V, U, w)
  assert z.shape == (2, 8)
  assert_close(z, P.gated_mil_pooling(h, V, U, w[:, None])[:, 0], F32)
  with pytest.raises(ValueError, match="h must be"):
    P.gated_mil_pooling(h[0], V, U, w)
  with pytest.raises(ValueError, match="w must be"):
    P.gated_mil_pooling(h, V, U, rnd(3, (3, 2)))


# ----------------------------------------------------------------------------- SimPool

def _ref_simpool(q, k, v, gamma, eps):
  B, Pq, N, H = q.shape
  K = k.shape[2]
  outs = []
  for b in range(B):
    heads = []
    for h in range(N):
      kh, vh = k[b, :, _kvh(h, N, K)], v[b, :, _kvh(h, N, K)]
      a = _sm((q[b, :, h] @ kh.T) / math.sqrt(H))
      if gamma is None:
        heads.append(a @ vh)
      else:
        m = jnp.min(vh) - eps
        heads.append(m + (a @ (vh - m) ** gamma) ** (1.0 / gamma))
    outs.append(jnp.stack(heads, 1))
  return jnp.stack(outs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [None, 2.0, 1.5])
def test_simpool_matches_reference(dtype, gamma):
  q, k, v = rnd(0, (2, 1, 4, 8), dtype), rnd(1, (2, 6, 2, 8), dtype), rnd(2, (2, 6, 2, 5), dtype)
  op = lambda q, k, v: P.simpool(q, k, v, gamma=gamma)
  _check(op, lambda q, k, v: _ref_simpool(q, k, v, gamma, 1e-6), (q, k, v), dtype)


def test_simpool_gamma_one_is_attention_pooling():
  q, k, v = rnd(0, (1, 1, 2, 8)), rnd(1, (1, 6, 2, 8)), rnd(2, (1, 6, 2, 8))
  assert_close(P.simpool(q, k, v, gamma=1.0), P.simpool(q, k, v), F32)
  with pytest.raises(ValueError, match="gamma"):
    P.simpool(q, k, v, gamma=-1.0)


# ----------------------------------------------------------------------------- class attention

def _ref_class(qc, kc, vc, k, v, valid):
  B, C, N, H = qc.shape
  K = k.shape[2]
  outs = []
  for b in range(B):
    per_c = []
    for c in range(C):
      heads = []
      for h in range(N):
        g = _kvh(h, N, K)
        keys = jnp.concatenate([kc[b, c:c + 1, g], k[b, :, g]])
        vals = jnp.concatenate([vc[b, c:c + 1, g], v[b, :, g]])
        ok = jnp.concatenate([jnp.ones((1,), bool), valid[b]])
        lg = jnp.where(ok, keys @ qc[b, c, h] / math.sqrt(H), -1e30)
        heads.append(_sm(lg) @ vals)
      per_c.append(jnp.stack(heads))
    outs.append(jnp.stack(per_c))
  return jnp.stack(outs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_class_attention_matches_reference(dtype):
  B, C, S, N, K, H, Hv = 2, 3, 5, 4, 2, 8, 6
  args = (rnd(0, (B, C, N, H), dtype), rnd(1, (B, C, K, H), dtype), rnd(2, (B, C, K, Hv), dtype),
          rnd(3, (B, S, K, H), dtype), rnd(4, (B, S, K, Hv), dtype))
  seg = np.zeros((B, S), np.int32)
  seg[0, -1] = -1
  valid = jnp.asarray(seg >= 0)
  op = lambda *a: P.class_attention(*a, segment_ids=seg)
  _check(op, lambda *a: _ref_class(*a, valid), args, dtype)


# ----------------------------------------------------------------------------- LookupViT

def _ref_bidir(qc, kl, vl, fn):
  B, M, N, H = qc.shape
  c_all, l_all = [], []
  for b in range(B):
    ch = []
    for h in range(N):
      A = qc[b, :, h] @ kl[b, :, h].T / math.sqrt(H)  # [M, S], one logit matrix
      ch.append(_sm(A, axis=1) @ vl[b, :, h])
    c_all.append(jnp.stack(ch, 1))
  c_out = jnp.stack(c_all)
  vc = fn(c_out)
  for b in range(B):
    lh = []
    for h in range(N):
      A = qc[b, :, h] @ kl[b, :, h].T / math.sqrt(H)
      lh.append(_sm(A, axis=0).T @ vc[b, :, h])  # softmax over the compressed tokens
    l_all.append(jnp.stack(lh, 1))
  return c_out, jnp.stack(l_all)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bidirectional_cross_attention_matches_reference(dtype):
  B, M, S, N, H = 2, 3, 7, 2, 8
  args = (rnd(0, (B, M, N, H), dtype), rnd(1, (B, S, N, H), dtype), rnd(2, (B, S, N, 5), dtype))
  fn = lambda c: jnp.tanh(c) * 2.0
  op = lambda *a: jnp.concatenate([x.reshape(-1) for x in P.bidirectional_cross_attention(
      *a, fn)])
  ref = lambda *a: jnp.concatenate([x.reshape(-1) for x in _ref_bidir(*a, fn)])
  _check(op, ref, args, dtype)


# ----------------------------------------------------------------------------- super tokens

def _ref_super_token(x, s, iters):
  B, Hh, Ww, C = x.shape
  h, w = Hh // s, Ww // s
  st = x.reshape(B, h, s, w, s, C).mean(axis=(2, 4))
  for _ in range(iters):
    Qs = {}
    num = [[jnp.zeros((B, C)) for _ in range(w)] for _ in range(h)]
    den = [[jnp.zeros((B, 1)) for _ in range(w)] for _ in range(h)]
    for yy in range(Hh):
      for xx in range(Ww):
        cy, cx = yy // s, xx // s
        nbs = [(cy + dy, cx + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
               if 0 <= cy + dy < h and 0 <= cx + dx < w]
        lg = jnp.stack([jnp.sum(x[:, yy, xx] * st[:, a, c], -1) for a, c in nbs], -1) / math.sqrt(C)
        q = _sm(lg)
        Qs[(yy, xx)] = (nbs, q)
        for j, (a, c) in enumerate(nbs):
          num[a][c] = num[a][c] + q[:, j:j + 1] * x[:, yy, xx]
          den[a][c] = den[a][c] + q[:, j:j + 1]
    st = jnp.stack([jnp.stack([num[a][c] / den[a][c] for c in range(w)], 1) for a in range(h)], 1)
  return st, Qs


def _ref_upsample(st, Qs, Hh, Ww):
  rows = []
  for yy in range(Hh):
    row = []
    for xx in range(Ww):
      nbs, q = Qs[(yy, xx)]
      row.append(sum(q[:, j:j + 1] * st[:, a, c] for j, (a, c) in enumerate(nbs)))
    rows.append(jnp.stack(row, 1))
  return jnp.stack(rows, 1)


@pytest.mark.slow  # the unrolled per-token reference runs eagerly (~20 s per dtype)
@pytest.mark.parametrize("dtype", DTYPES)
def test_super_token_association_and_upsample_match_reference(dtype):
  x = rnd(0, (1, 6, 4, 3), dtype)

  def op(x):
    st, Q = P.super_token_association(x, stoken_size=2, num_iters=2)
    return P.super_token_upsample(st * 1.5, Q.astype(st.dtype), stoken_size=2)

  def ref(x):
    st, Qs = _ref_super_token(x, 2, 2)
    return _ref_upsample(st * 1.5, Qs, 6, 4)

  _check(op, ref, (x,), dtype, jit=False)  # the unrolled reference compiles too slowly
  with pytest.raises(ValueError, match="stoken_size"):
    P.super_token_association(x, stoken_size=4)


# ----------------------------------------------------------------------------- proxy tokens

def _ref_proxy(q, k, v, wt, idx):
  B, S, N, H = q.shape
  outs = []
  for b in range(B):
    pos = [wi * wt + int(idx[b, wi]) for wi in range(S // wt)]
    heads = []
    for h in range(N):
      qp, kp, vp = q[b, pos, h], k[b, pos, h], v[b, pos, h]
      pp = _sm(qp @ kp.T / math.sqrt(H)) @ vp
      heads.append(_sm(q[b, :, h] @ kp.T / math.sqrt(H)) @ pp)
    outs.append(jnp.stack(heads, 1))
  return jnp.stack(outs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_proxy_token_attention_matches_reference(dtype):
  B, S, N, H = 2, 8, 2, 8
  args = (rnd(0, (B, S, N, H), dtype), rnd(1, (B, S, N, H), dtype), rnd(2, (B, S, N, H), dtype))
  idx = np.array([[0, 3], [2, 1]])
  op = lambda *a: P.proxy_token_attention(*a, window_tokens=4, index=jnp.asarray(idx))
  _check(op, lambda *a: _ref_proxy(*a, 4, idx), args, dtype)


# ----------------------------------------------------------------------------- sinks (VAR)

def _ref_var(q, k, v, sink, target, p, heads):
  B, Tq, N, H = q.shape
  K = k.shape[2]
  outs = []
  for b in range(B):
    hs = []
    for h in range(N):
      g = _kvh(h, N, K)
      a = _sm(q[b, :, h] @ k[b, :, g].T / math.sqrt(H))
      if heads[h]:
        rows = []
        for t in range(Tq):
          budget = p * sum(a[t, j] for j in range(a.shape[1]) if sink[b, j])
          recv = [j for j in range(a.shape[1]) if target[b, j] and not sink[b, j]]
          tot = sum(a[t, j] for j in recv)
          rows.append(jnp.stack([(1 - p) * a[t, j] if sink[b, j] else
                                 (a[t, j] + budget * a[t, j] / tot if j in recv else a[t, j])
                                 for j in range(a.shape[1])]))
        a = jnp.stack(rows)
      hs.append(a @ v[b, :, g])
    outs.append(jnp.stack(hs, 1))
  return jnp.stack(outs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sink_redistribution_matches_reference(dtype):
  B, Tq, S, N, K, H = 2, 3, 6, 2, 1, 8
  args = (rnd(0, (B, Tq, N, H), dtype), rnd(1, (B, S, K, H), dtype), rnd(2, (B, S, K, 4), dtype))
  sink = np.zeros((B, S), bool)
  sink[:, 1] = True
  sink[1, 4] = True
  target = np.zeros((B, S), bool)
  target[:, 1:5] = True
  heads = np.array([True, False])
  op = lambda *a: P.sink_redistributed_attention(*a, sink_mask=sink, target_mask=target, p=0.6,
                                                 heads=heads)
  _check(op, lambda *a: _ref_var(*a, sink, target, 0.6, heads), args, dtype)


def test_visual_sink_mask_and_image_centric_heads():
  hidden = rnd(0, (2, 6, 8))
  hidden = hidden.at[0, 2, 5].set(-30.0).at[1, 4, 1].set(25.0).at[1, 0, 3].set(40.0)
  sink = P.visual_sink_mask(hidden, [1, 5], tau=20.0)
  expect = np.zeros((2, 6), bool)
  expect[0, 2] = expect[1, 4] = True  # dim 3 is not a sink dimension
  np.testing.assert_array_equal(np.asarray(sink), expect)
  with pytest.raises(ValueError, match="sink_dims"):
    P.visual_sink_mask(hidden, [8])
  q, k = rnd(1, (2, 3, 2, 8)), rnd(2, (2, 6, 1, 8))
  target = np.zeros((2, 6), bool)
  target[:, 1:5] = True
  sel = P.image_centric_heads(q, k, sink_mask=expect, target_mask=target, rho=0.5)
  a = np.asarray(_sm(jnp.einsum("btnh,bsh->bnts", q, k[:, :, 0]) / math.sqrt(8)))
  tot = (a * target[:, None, None]).sum(-1)
  r = (a * (target & ~expect)[:, None, None]).sum(-1) / tot
  np.testing.assert_array_equal(np.asarray(sel), r >= 0.5)
  v = rnd(3, (2, 6, 1, 4))
  out = P.sink_redistributed_attention(q, k, v, sink_mask=expect, target_mask=target, heads=sel)
  ref = _ref_var(q, k, v, expect, target, 0.6, [True, True])
  plain = _ref_var(q, k, v, expect, target, 0.6, [False, False])
  want = jnp.where(jnp.asarray(sel).transpose(0, 2, 1)[..., None], ref, plain)
  assert_close(out, want, F32)


# ----------------------------------------------------------------------------- layers

POOLING = ["slot", "simpool", "mil_pool", "class_attention", "pma"]
SEQUENCE = ["agent", "perceiver", "lookupvit", "registers", "isab", "proxy"]


class _Jitted:
  """A registry layer called through `jax.jit` of its functional forward."""

  def __init__(self, layer):
    self.layer = layer
    self._f = jax.jit(lambda p, x, seg: T.forward(layer.config, p, x, segment_ids=seg))

  def params_dict(self):
    return self.layer.params_dict()

  def __call__(self, x, segment_ids=None):
    return self._f(self.layer.params_dict(), x, segment_ids)


def _build(name, D=16, N=2, K=None, **opts):
  layer = variants.build(name, d_model=D, num_heads=N, num_kv_heads=K, rngs=nnx.Rngs(0), **opts)
  if isinstance(layer, T.TokenAttention):
    return _Jitted(layer)
  return lambda x, segment_ids=None: layer(x, segment_ids=segment_ids)  # 'pma' (eager)


@pytest.mark.parametrize("name", POOLING)
def test_pooling_layers_are_permutation_invariant_and_ignore_padding(name):
  opts = {} if name == "simpool" else {"num_seeds": 2}
  layer = _build(name, **opts)
  x = rnd(0, (2, 7, 16))
  perm = np.random.default_rng(1).permutation(7)
  y = layer(x)
  assert y.shape == (2, 1 if name == "simpool" else 2, 16)
  assert_close(layer(x[:, perm]), y, F32, "permutation")
  xp = jnp.concatenate([x, rnd(2, (2, 3, 16), scale=5.0)], axis=1)
  seg = jnp.concatenate([jnp.zeros((2, 7), jnp.int32), -jnp.ones((2, 3), jnp.int32)], axis=1)
  assert_close(layer(xp, segment_ids=seg), y, F32, "padding")


@pytest.mark.parametrize("name", POOLING + ["isab", "agent", "perceiver", "lookupvit"])
def test_fully_padded_inputs_give_finite_values_and_gradients(name):
  opts = {"simpool": dict(gamma=2.0), "mil_pool": dict(num_seeds=2)}.get(name, {})
  layer = _build(name, **opts)
  x = rnd(0, (2, 4, 16))
  seg = jnp.asarray(np.array([[0, 0, 0, 0], [-1, -1, -1, -1]]))
  y, vjp = jax.vjp(jax.jit(lambda a: layer(a, segment_ids=seg)), x)   # jit: not op by op
  (g,) = vjp(rnd(1, y.shape))
  assert bool(jnp.all(jnp.isfinite(y))) and bool(jnp.all(jnp.isfinite(g))), name


def test_isab_is_permutation_equivariant_and_ignores_padding():
  layer = _build("isab", num_inducing=3)
  x = rnd(0, (2, 7, 16))
  perm = np.random.default_rng(1).permutation(7)
  y = layer(x)
  assert_close(layer(x[:, perm]), y[:, perm], F32, "equivariance")
  xp = jnp.concatenate([x, rnd(2, (2, 2, 16))], axis=1)
  seg = jnp.concatenate([jnp.zeros((2, 7), jnp.int32), -jnp.ones((2, 2), jnp.int32)], axis=1)
  assert_close(layer(xp, segment_ids=seg)[:, :7], y, F32, "padding")


@pytest.mark.parametrize("name", ["agent", "perceiver", "lookupvit", "registers"])
def test_sequence_layers_padded_tokens_do_not_reach_valid_ones(name):
  layer = _build(name, K=None if name == "lookupvit" else 1)
  x = rnd(0, (2, 8, 16))
  seg = jnp.asarray(np.array([[0] * 8, [0] * 6 + [-1] * 2]))
  y1 = layer(x, segment_ids=seg)
  y2 = layer(x.at[1, 6:].set(rnd(3, (2, 16), scale=4.0)), segment_ids=seg)
  assert_close(y2[:, :6], y1[:, :6], F32)
  assert_close(y2[0], y1[0], F32)


def _ref_agent_layer(p, x, n, N, K, grid=None):
  """The Agent Attention layer from its parameters (explicit loops); on a grid, `n` is a
  square and agents are the means of an a x a partition, the DWC is 3x3."""
  B, Tn, D = x.shape
  H = p["attn_q_kernel"].shape[-1]
  q = jnp.einsum("btd,dnh->btnh", x, p["attn_q_kernel"])
  k = jnp.einsum("btd,dnh->btnh", x, p["attn_k_kernel"])
  v = jnp.einsum("btd,dnh->btnh", x, p["attn_v_kernel"])
  if grid is None:
    bins = [(i * Tn // n, -(-(i + 1) * Tn // n)) for i in range(n)]
    agents = jnp.stack([q[:, lo:hi].mean(axis=1) for lo, hi in bins], axis=1)
  else:
    a = math.isqrt(n)
    gh, gw = grid[0] // a, grid[1] // a
    qm = q.reshape(B, grid[0], grid[1], N, H)
    agents = jnp.stack([qm[:, i * gh:(i + 1) * gh, j * gw:(j + 1) * gw].mean(axis=(1, 2))
                        for i in range(a) for j in range(a)], axis=1)
  out = _ref_agent(q, k, v, agents, p["agent_bias"][:, :, :Tn], p["query_bias"][:, :Tn],
                   jnp.ones((B, Tn), bool))
  vv = jnp.repeat(v, N // K, axis=2)
  r = p["dwc_kernel"].shape[0] // 2
  conv = []
  if grid is None:
    kern = p["dwc_kernel"][r]  # centre row: 1D kernel [k, N, H]
    for t in range(Tn):
      acc = p["dwc_bias"]
      for j in range(kern.shape[0]):
        if 0 <= t + j - r < Tn:
          acc = acc + kern[j] * vv[:, t + j - r]
      conv.append(acc)
  else:
    vm = vv.reshape(B, grid[0], grid[1], N, H)
    for y in range(grid[0]):
      for xx in range(grid[1]):
        acc = p["dwc_bias"]
        for dy in range(2 * r + 1):
          for dx in range(2 * r + 1):
            yy, x2 = y + dy - r, xx + dx - r
            if 0 <= yy < grid[0] and 0 <= x2 < grid[1]:
              acc = acc + p["dwc_kernel"][dy, dx] * vm[:, yy, x2]
        conv.append(acc)
  out = out + jnp.stack(conv, 1)
  return jnp.einsum("btnh,nhd->btd", out, p["attn_o_kernel"])


def test_agent_layer_matches_reference_from_its_parameters():
  layer = _build("agent", N=4, K=2, num_agents=3, max_len=16)
  p = layer.params_dict()
  x = rnd(0, (2, 7, 16))
  assert_close(layer(x), _ref_agent_layer(p, x, 3, 4, 2), F32)


@pytest.mark.slow  # the 3x3 DWC reference loops run eagerly
def test_agent_layer_on_a_grid_matches_reference_from_its_parameters():
  grid_layer = _build("agent", N=4, K=2, num_agents=4, max_len=16)
  xg = rnd(1, (2, 4, 4, 16))
  ref = _ref_agent_layer(grid_layer.params_dict(), xg.reshape(2, 16, 16), 4, 4, 2, grid=(4, 4))
  assert_close(grid_layer(xg), ref.reshape(2, 4, 4, 16), F32)


_FAST_TWINS = ("agent", "isab", "slot", "mil_pool")


@pytest.mark.parametrize("name", [
    n if n in _FAST_TWINS else pytest.param(n, marks=pytest.mark.slow)
    for n in SEQUENCE + ["super_token", "slot", "simpool", "mil_pool", "class_attention"]])
def test_nnx_and_linen_twins_agree(name):
  spatial = variants.info(name).kind == "spatial"
  x = rnd(0, (2, 4, 4, 16) if spatial else (2, 8, 16))
  layer = _build(name, N=4, K=None if name in ("lookupvit", "proxy") else 2)
  lin = variants.get_linen(name)(d_model=16, num_heads=4,
                                 num_kv_heads=None if name in ("lookupvit", "proxy") else 2)
  boxed = jax.eval_shape(lambda: lin.init(jax.random.key(0), x))["params"]   # shapes only
  shapes = jax.tree.map(jnp.shape, nn.unbox(boxed))
  p = layer.params_dict()
  assert shapes == jax.tree.map(jnp.shape, p)
  assert_close(lin.apply({"params": p}, x), layer(x), F32)


def _ref_registers(p, x, extra_zero):
  B, Tn, D = x.shape
  toks = [x, jnp.broadcast_to(p["registers"], (B,) + p["registers"].shape)]
  if extra_zero:
    toks.append(jnp.zeros((B, extra_zero, D)))
  xr = jnp.concatenate(toks, axis=1)
  q = jnp.einsum("btd,dnh->btnh", xr, p["attn_q_kernel"])
  k = jnp.einsum("btd,dnh->btnh", xr, p["attn_k_kernel"])
  v = jnp.einsum("btd,dnh->btnh", xr, p["attn_v_kernel"])
  H = q.shape[-1]
  heads = [_sm(jnp.einsum("bth,bsh->bts", q[:, :, h], k[:, :, h]) / math.sqrt(H))
           @ v[:, :, h] for h in range(q.shape[2])]
  y = jnp.einsum("btnh,nhd->btd", jnp.stack(heads, 2), p["attn_o_kernel"])
  return y[:, :Tn]


@pytest.mark.parametrize("extra", [0, 2])
def test_registers_and_test_time_registers_match_reference(extra):
  layer = _build("registers", num_registers=3, test_time_registers=extra)
  x = rnd(0, (2, 5, 16))
  y = layer(x)
  assert y.shape == x.shape
  assert_close(y, _ref_registers(layer.params_dict(), x, extra), F32)


def test_layer_errors_name_the_argument():
  with pytest.raises(ValueError, match="x must be"):
    _build("slot")(rnd(0, (2, 4, 4, 16)))
  with pytest.raises(ValueError, match="causal"):
    _build("agent", causal=True)
  with pytest.raises(TypeError, match="num_agentz"):
    _build("agent", num_agentz=3)
  with pytest.raises(ValueError, match="num_seeds"):
    _build("simpool", num_seeds=2)
  with pytest.raises(ValueError, match="max_len"):
    _build("agent", max_len=4)(rnd(0, (1, 8, 16)))
  with pytest.raises(ValueError, match="segment_ids"):
    _build("mil_pool")(rnd(0, (2, 5, 16)), segment_ids=jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(ValueError, match="num_kv_heads"):
    _build("lookupvit", N=2, K=1)


def test_set_transformer_accepts_the_pooling_variants():
  from attnjax import models
  cfg = models.default_config("set")
  cfg.input_dim, cfg.num_classes, cfg.d_model, cfg.num_layers = 3, 2, 16, 1
  cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim = 2, 2, 8, 16
  x = rnd(0, (2, 6, 3))
  for name in ("slot",):
    cfg.pooling = {"name": name}
    cfg.num_seeds = 2
    m = models.build_model(cfg, rngs=nnx.Rngs(0))
    assert jax.jit(lambda a, m=m: m(a))(x).shape == (2, 2)   # jitted: not op by op
  cfg.attention = {"name": "isab", "num_inducing": 3}
  cfg.pooling = {"name": "pma"}
  m = models.build_model(cfg, rngs=nnx.Rngs(0))
  perm = np.random.default_rng(0).permutation(6)
  run = jax.jit(lambda a: m(a))
  assert_close(run(x[:, perm]), run(x), F32)


# ----------------------------------------------------------------------------- training smokes

def _train(name, arg, tmp_path, edit=None):
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(arg)
  if edit is not None:
    edit(c)
  c.data.data_dir = str(tmp_path / "data")
  c.tensorboard = False
  c.progress_bar = False
  from attnjax.train import trainer
  res = trainer.train_and_evaluate(c, str(tmp_path / "w"))
  assert res["status"] == "done" and res["step"] == c.num_steps
  assert all(np.isfinite(v) for k, v in res.items() if k not in ("status", "step"))
  return res


@pytest.mark.slow
def test_set_tasks_runlocal_with_slot_pooling(tmp_path):
  def edit(c):
    c.model.pooling = {"name": "slot", "num_iters": 2}
  _train("set_tasks", "task=count,runlocal", tmp_path, edit)


@pytest.mark.slow
def test_digits_vit_runlocal_with_agent_attention(tmp_path):
  _train("digits_vit", "variant=agent,runlocal", tmp_path)
