"""attnjax.ops.heads, the logit recipes of attnjax.ops.dense / attnjax.score_mods and the
layers of attnjax.layers.heads (registry names moh, head_gates, shvit, mw_mha,
talking_heads, cosine, sinkhorn, additive, collapsed_qk, log_n_scaling).

Every op is checked forward and backward (jax.vjp with a random cotangent) against a plain
jnp reference written from the paper's formula (explicit per-head loops, argsort top-k,
explicit masks), in float32 and bfloat16, with GQA where it applies.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_close, rnd

import attnjax
from attnjax import score_mods, variants
from attnjax.layers import heads as LH
from attnjax.ops import dense as D
from attnjax.ops import heads as OH

DTYPES = (jnp.float32, jnp.bfloat16)
SLOW = pytest.mark.slow
# The default run keeps this file near a minute on 2 cores (compile-bound): float32 of each
# op and bfloat16 of MoH and Sinkhorn by default, every other bfloat16/variant case -m slow.
DTYPES_SLOW_BF16 = (jnp.float32, pytest.param(jnp.bfloat16, marks=SLOW))
NAMES = LH.MECHANISMS
_LAYERS_DEFAULT = ("moh", "talking_heads", "mw_mha")


# ----------------------------------------------------------------------------- references

def _f32(*xs):
  return [jnp.asarray(x, jnp.float32) for x in xs]


def _allowed(T, S, causal=False, qseg=None, kvseg=None):
  ok = np.ones((1, 1, T, S), bool)
  if causal:
    ok = ok & (np.arange(S)[None, :] <= np.arange(T)[:, None] + (S - T))[None, None]
  ok = jnp.asarray(ok)
  if qseg is not None:
    ok = ok & (qseg[:, None, :, None] == kvseg[:, None, None, :])
  return ok


def _softmax_rows(s, ok):
  """Softmax over the last axis, explicit: exp(s - max) over allowed keys / their sum."""
  s = jnp.where(ok, s, -1e30)
  m = jax.lax.stop_gradient(jnp.max(s, -1, keepdims=True))  # the shift cancels
  e = jnp.where(ok, jnp.exp(s - m), 0.0)
  den = jnp.sum(e, -1, keepdims=True)
  return e / jnp.where(den > 0, den, 1.0)


def ref_heads(q, k, v, ok, scale=None, logits_fn=None):
  """Per-head loop: head n uses kv head n // (N/K); returns [B, T, N, Hv] float32."""
  q, k, v = _f32(q, k, v)
  N, K = q.shape[2], k.shape[2]
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  outs = []
  for n in range(N):
    g = n // (N // K)
    s = scale * jnp.einsum("bth,bsh->bts", q[:, :, n], k[:, :, g])
    if logits_fn is not None:
      s = logits_fn(n, s)
    p = _softmax_rows(s, ok[:, 0])
    outs.append(jnp.einsum("bts,bsh->bth", p, v[:, :, g]))
  return jnp.stack(outs, 2)


def check(impl, ref, args, dtype, seed=100, what=""):
  """Forward and jax.vjp (random cotangent) of impl vs ref on the same inputs."""
  # jit: one compilation per function instead of one per eager primitive
  y, vjp = jax.vjp(jax.jit(impl), *args)
  y_ref, vjp_ref = jax.vjp(jax.jit(ref), *args)
  assert y.dtype == args[0].dtype or what == "float-out", (y.dtype, args[0].dtype)
  assert_close(y, y_ref, dtype, what + " forward")
  ct = rnd(seed, y.shape, y.dtype)
  for i, (g, gr) in enumerate(zip(vjp(ct), vjp_ref(ct.astype(y_ref.dtype)))):
    assert_close(g, gr, dtype, f"{what} grad {i}")


def qkv(seed, B=2, T=6, S=6, N=4, K=2, H=8, Hv=8, dtype=jnp.float32):
  return (rnd(seed, (B, T, N, H), dtype), rnd(seed + 1, (B, S, K, H), dtype),
          rnd(seed + 2, (B, S, K, Hv), dtype))


# ----------------------------------------------------------------------------- MoH

def ref_moh_weights(shared, routed, mix, top_k):
  shared, routed, mix = _f32(shared, routed, mix)
  ps = jnp.exp(shared - shared.max(-1, keepdims=True))
  ps = ps / ps.sum(-1, keepdims=True)
  pr = jnp.exp(routed - routed.max(-1, keepdims=True))
  pr = pr / pr.sum(-1, keepdims=True)
  order = np.argsort(-np.asarray(jax.lax.stop_gradient(pr)), -1)[..., :top_k]
  sel = np.zeros(pr.shape, bool)
  np.put_along_axis(sel, order, True, -1)
  a = jnp.exp(mix - mix.max(-1, keepdims=True))
  a = a / a.sum(-1, keepdims=True)
  g = jnp.concatenate([a[..., :1] * ps, a[..., 1:] * jnp.where(sel, pr, 0.0)], -1)
  return g, sel, pr


@pytest.mark.parametrize("dtype", DTYPES)
def test_moh_attention_matches_reference(dtype):
  q, k, v = qkv(0, N=4, K=2, dtype=dtype)
  B, T = q.shape[:2]
  shared, routed, mix = rnd(7, (B, T, 1), dtype), rnd(8, (B, T, 3), dtype), rnd(9, (B, T, 2), dtype)
  ok = _allowed(T, T, causal=True)
  from attnjax import masks
  # the top-k choice is fixed (not differentiated): compute it outside the vjp
  _, sel, _ = ref_moh_weights(shared, routed, mix, 2)

  def impl(q, k, v, shared, routed, mix):
    return OH.moh_attention(q, k, v, shared, routed, mix, top_k=2, mask=masks.causal())[0]

  def ref(q, k, v, shared, routed, mix):
    shared, routed, mix = _f32(shared, routed, mix)
    ps = jax.nn.softmax(shared, -1)
    pr = jax.nn.softmax(routed, -1)
    a = jax.nn.softmax(mix, -1)
    g = jnp.concatenate([a[..., :1] * ps, a[..., 1:] * jnp.where(sel, pr, 0.0)], -1)
    return ref_heads(q, k, v, ok) * g[..., None]

  check(impl, ref, (q, k, v, shared, routed, mix), dtype, what="moh")


def test_moh_top_k_all_equals_dense_attention_with_router_weights():
  q, k, v = qkv(1, N=4, K=1)
  B, T = q.shape[:2]
  shared, routed, mix = rnd(2, (B, T, 2)), rnd(3, (B, T, 2)), rnd(4, (B, T, 2))
  out, aux = OH.moh_attention(q, k, v, shared, routed, mix, top_k=2)
  a = jax.nn.softmax(mix, -1)
  g = jnp.concatenate([a[..., :1] * jax.nn.softmax(shared, -1),
                       a[..., 1:] * jax.nn.softmax(routed, -1)], -1)
  dense = attnjax.reference_attention(q, k, v)
  assert_close(out, dense * g[..., None], jnp.float32, "moh all heads")
  assert bool(jnp.all(aux["selected"]))
  # head weights without mix: shared and routed weights each sum to 1
  g2, _ = OH.moh_head_weights(shared, routed, None, top_k=2)
  assert_close(jnp.sum(g2, -1), jnp.full((B, T), 2.0), jnp.float32)


def test_moh_load_balance_loss_and_its_gradient():
  B, T, Nr, top_k = 2, 5, 4, 2
  routed = rnd(5, (B, T, Nr))
  valid = jnp.asarray(np.random.default_rng(0).random((B, T)) < 0.7)
  _, aux = OH.moh_head_weights(jnp.zeros((B, T, 0)), routed, top_k=top_k, valid=valid)
  r = np.asarray(routed, np.float64)
  p = np.exp(r - r.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  f, P, n = np.zeros(Nr), np.zeros(Nr), 0
  for b in range(B):
    for t in range(T):
      if not valid[b, t]:
        continue
      n += 1
      for i in np.argsort(-p[b, t])[:top_k]:
        f[i] += 1
      P += p[b, t]
  want = float(np.sum((f / n) * (P / n)))
  np.testing.assert_allclose(float(aux["load_balance_loss"]), want, rtol=1e-5)
  # d L / d routed goes through P only (f is the non-differentiated top-k count)
  grad = jax.jit(jax.grad(lambda r: OH.moh_head_weights(jnp.zeros((B, T, 0)), r, top_k=top_k,
                                                valid=valid)[1]["load_balance_loss"]))(routed)
  fj = jnp.asarray(f / n, jnp.float32)
  want_g = jax.grad(lambda r: jnp.sum(fj * jnp.sum(
      jax.nn.softmax(r, -1) * valid[..., None], (0, 1)) / n))(routed)
  assert_close(grad, want_g, jnp.float32, "load-balance grad")


def test_moh_unselected_heads_are_zero_and_get_no_gradient():
  q, k, v = qkv(11, N=3, K=3)
  B, T = q.shape[:2]
  routed = rnd(12, (B, T, 3))
  out, aux = OH.moh_attention(q, k, v, jnp.zeros((B, T, 0)), routed, top_k=1)
  sel = np.asarray(aux["selected"])
  assert np.all(np.asarray(out)[~sel] == 0) and np.all(np.abs(np.asarray(out)[sel]) > 0)


# ----------------------------------------------------------------------------- head gates

@pytest.mark.parametrize("dtype", DTYPES_SLOW_BF16)
def test_head_gated_attention_matches_reference(dtype):
  q, k, v = qkv(20, dtype=dtype)
  gates = rnd(23, (4,), dtype)
  mask = jnp.asarray([True, False, True, True])

  def impl(q, k, v, gates):
    return OH.head_gated_attention(q, k, v, gates=gates, head_mask=mask)

  def ref(q, k, v, gates):
    o = ref_heads(q, k, v, _allowed(6, 6))
    return o * (jnp.asarray(gates, jnp.float32) * mask)[:, None]

  check(impl, ref, (q, k, v, gates), dtype, what="head gates")
  # masked head: zero output and zero gradient to its gate and its query
  y, vjp = jax.vjp(jax.jit(impl), q, k, v, gates)
  assert np.all(np.asarray(y[:, :, 1], np.float32) == 0)
  gq, _, _, gg = vjp(rnd(24, y.shape, dtype))
  assert float(gg[1]) == 0 and np.all(np.asarray(gq[:, :, 1], np.float32) == 0)


def test_gate_heads_per_token_gates_broadcast():
  o = rnd(25, (2, 3, 4, 5))
  g = rnd(26, (2, 3, 4))
  np.testing.assert_allclose(OH.gate_heads(o, g), np.asarray(o) * np.asarray(g)[..., None],
                             rtol=1e-6)


# ----------------------------------------------------------------------------- SHViT

@pytest.mark.parametrize("dtype", DTYPES_SLOW_BF16)
def test_single_head_partial_attention_matches_reference(dtype):
  B, T, Dm, Dp, Hq = 2, 7, 12, 4, 3
  x = rnd(30, (B, T, Dm), dtype)
  wq, wk, wv = rnd(31, (Dp, Hq), dtype), rnd(32, (Dp, Hq), dtype), rnd(33, (Dp, Dp), dtype)

  def impl(x, wq, wk, wv):
    return OH.single_head_partial_attention(x, wq, wk, wv)

  def ref(x, wq, wk, wv):
    x, wq, wk, wv = _f32(x, wq, wk, wv)
    xp = x[..., :Dp]
    s = (xp @ wq) @ jnp.swapaxes(xp @ wk, 1, 2) / np.sqrt(Hq)
    p = _softmax_rows(s, jnp.ones(s.shape, bool))
    return jnp.concatenate([p @ (xp @ wv), x[..., Dp:]], -1)

  check(impl, ref, (x, wq, wk, wv), dtype, what="shvit")


# ----------------------------------------------------------------------------- MW-MHA

@pytest.mark.parametrize("dtype", DTYPES_SLOW_BF16)
@pytest.mark.parametrize("causal", [pytest.param(False, marks=SLOW), True])
@pytest.mark.parametrize("K,windows", [(2, (1, None)), pytest.param(1, (2, None, 0, 3), marks=SLOW),
                                       pytest.param(4, (3, 1), marks=SLOW)])
def test_multi_window_attention_matches_per_head_band_reference(dtype, causal, K, windows):
  q, k, v = qkv(40, T=9, S=9, N=4, K=K, dtype=dtype)
  Ng = 4 // len(windows)
  i, j = np.arange(9)[:, None], np.arange(9)[None, :]

  def impl(q, k, v):
    return OH.multi_window_attention(q, k, v, windows=windows, causal=causal)

  def ref(q, k, v):
    outs = []
    for n in range(4):
      w = windows[n // Ng]
      band = np.ones((9, 9), bool) if w is None else np.abs(i - j) <= w
      if causal:
        band = band & (j <= i)
      outs.append(ref_heads(q[:, :, n:n + 1], k[:, :, n // (4 // K)][:, :, None],
                            v[:, :, n // (4 // K)][:, :, None], jnp.asarray(band)[None, None]))
    return jnp.concatenate(outs, 2)

  check(impl, ref, (q, k, v), dtype, what=f"mw_mha {windows}")


# ----------------------------------------------------------------------------- talking heads

@pytest.mark.parametrize("dtype", DTYPES_SLOW_BF16)
@pytest.mark.parametrize("mix", ["both", pytest.param("pre", marks=SLOW),
                                 pytest.param("post", marks=SLOW), "wide"])
def test_talking_heads_matches_loop_reference(dtype, mix):
  N, M = 4, (6 if mix == "wide" else 4)
  q, k, v = qkv(50, T=5, S=7, N=N, K=2, dtype=dtype)
  pre = rnd(53, (N, M), dtype) if mix != "post" else None
  post = rnd(54, (M, N), dtype) if mix != "pre" else None
  ok = _allowed(5, 7, causal=True)[0, 0]

  def impl(q, k, v, pre, post):
    return OH.talking_heads_attention(q, k, v, pre_mix=pre, post_mix=post, causal=True)

  def ref(q, k, v, pre, post):
    q, k, v = _f32(q, k, v)
    J = [jnp.einsum("bth,bsh->bts", q[:, :, n], k[:, :, n // 2]) / np.sqrt(8) for n in range(N)]
    L = J if pre is None else [sum(J[n] * jnp.float32(pre[n, m]) for n in range(N))
                               for m in range(M)]
    W = [_softmax_rows(lm, ok[None]) for lm in L]
    U = W if post is None else [sum(W[m] * jnp.float32(post[m, l]) for m in range(M))
                                for l in range(N)]
    return jnp.stack([jnp.einsum("bts,bsh->bth", U[n], v[:, :, n // 2]) for n in range(N)], 2)

  args = (q, k, v, pre, post)
  check(lambda q, k, v: impl(q, k, v, pre, post), lambda q, k, v: ref(q, k, v, pre, post),
        args[:3], dtype, what=f"talking heads {mix}")
  if pre is not None and post is not None:
    check(lambda a, b: impl(q, k, v, a, b), lambda a, b: ref(q, k, v, a, b), (pre, post), dtype,
          what="talking heads mix grads")


def test_talking_heads_identity_mix_is_softmax_attention():
  q, k, v = qkv(55)
  y = OH.talking_heads_attention(q, k, v, pre_mix=jnp.eye(4), post_mix=jnp.eye(4))
  assert_close(y, attnjax.reference_attention(q, k, v), jnp.float32)


# ----------------------------------------------------------------------------- relational heads

@pytest.mark.parametrize("dtype", DTYPES_SLOW_BF16)
def test_relational_attention_matches_pairwise_reference(dtype):
  q, k, _ = qkv(56, T=5, S=7, N=4, K=2, dtype=dtype)
  phi, psi = rnd(57, (2, 5, 3, 2), dtype), rnd(58, (2, 7, 3, 2), dtype)
  sym = rnd(59, (7, 4), dtype)
  ok = _allowed(5, 7, causal=True)[:, 0]

  def impl(q, k, phi, psi, sym):
    rel, s = OH.relational_attention(q, k, phi, psi, sym, mask=attnjax.masks.causal(2))
    return jnp.concatenate([rel, s], -1).astype(dtype)

  def ref(q, k, phi, psi, sym):
    q, k, phi, psi, sym = _f32(q, k, phi, psi, sym)
    r = jnp.einsum("btlp,bslp->btsl", phi, psi)  # r_l(x_i, x_j), explicit pairs
    outs = []
    for n in range(4):
      a = _softmax_rows(jnp.einsum("bth,bsh->bts", q[:, :, n], k[:, :, n // 2]) / np.sqrt(8), ok)
      rel = jnp.einsum("bts,btsl->btl", a, r)
      outs.append(jnp.concatenate([rel, jnp.einsum("bts,sh->bth", a, sym)], -1))
    return jnp.stack(outs, 2).astype(dtype)

  check(impl, ref, (q, k, phi, psi, sym), dtype, what="relational")


# ----------------------------------------------------------------------------- rows with no key

@pytest.mark.parametrize("fn", [pytest.param("talking_heads", marks=SLOW), "sinkhorn",
                                "additive"])
def test_plain_ops_rows_without_keys_are_zero_with_zero_grads(fn):
  q, k, v = qkv(60, T=6, S=4)  # causal with T > S: queries 0, 1 see no key
  f = {"talking_heads": lambda q, k, v: OH.talking_heads_attention(q, k, v, causal=True),
       "sinkhorn": lambda q, k, v: D.sinkhorn_attention(q, k, v, causal=True),
       "additive": lambda q, k, v: D.additive_attention(q, k, v, rnd(61, (4, 8)),
                                                        causal=True)}[fn]
  y, vjp = jax.vjp(jax.jit(f), q, k, v)
  gq, gk, gv = vjp(rnd(62, y.shape))
  for a in (y, gq, gk, gv):
    assert bool(jnp.all(jnp.isfinite(a)))
  assert np.all(np.asarray(y[:, :2]) == 0) and np.all(np.asarray(gq[:, :2]) == 0)
  assert np.any(np.asarray(y[:, 2:]) != 0)


# ----------------------------------------------------------------------------- cosine

@pytest.mark.parametrize("dtype", DTYPES_SLOW_BF16)
@pytest.mark.parametrize("centered", [pytest.param(False, marks=SLOW), True])
def test_cosine_and_correlation_attention_match_reference(dtype, centered):
  q, k, v = qkv(70, N=4, K=2, dtype=dtype)
  ls = jnp.asarray([0.5, 2.0, 5.0, 3.0], dtype)  # 5.0 is clamped to log(100)

  def impl(q, k, v, ls):
    return D.cosine_attention(q, k, v, logit_scale=ls, centered=centered)

  def ref(q, k, v, ls):
    q, k, ls = _f32(q, k, ls)
    if centered:
      q = q - q.mean(-1, keepdims=True)
      k = k - k.mean(-1, keepdims=True)
    qn = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    kn = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    tau = jnp.exp(jnp.minimum(ls, np.log(100.0)))
    return ref_heads(qn, kn, v, _allowed(6, 6), scale=1.0,
                     logits_fn=lambda n, s: s * tau[n])

  check(impl, ref, (q, k, v, ls), dtype, what=f"cosine centered={centered}")


# ----------------------------------------------------------------------------- Sinkhorn

def ref_sinkhorn(q, k, v, num_iters, ok):
  q, k, v = _f32(q, k, v)
  T, S = q.shape[1], k.shape[1]
  outs = []
  for n in range(q.shape[2]):
    g = n // (q.shape[2] // k.shape[2])
    Kmat = jnp.where(ok, jnp.exp(jnp.einsum("bth,bsh->bts", q[:, :, n], k[:, :, g])
                                 / np.sqrt(q.shape[-1])), 0.0)
    for it in range(num_iters):
      if it % 2 == 0:
        Kmat = Kmat / Kmat.sum(-1, keepdims=True)
      else:
        Kmat = Kmat / Kmat.sum(-2, keepdims=True) * (T / S)
    outs.append(jnp.einsum("bts,bsh->bth", Kmat, v[:, :, g]))
  return jnp.stack(outs, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_iters,causal,S", [
    (3, False, 6), pytest.param(4, False, 9, marks=SLOW), pytest.param(3, True, 6, marks=SLOW)])
def test_sinkhorn_attention_matches_reference(dtype, num_iters, causal, S):
  q, k, v = qkv(80, T=6, S=S, dtype=dtype)
  ok = _allowed(6, S, causal=causal)[:, 0]
  check(lambda q, k, v: D.sinkhorn_attention(q, k, v, num_iters=num_iters, causal=causal),
        lambda q, k, v: ref_sinkhorn(q, k, v, num_iters, ok), (q, k, v), dtype,
        what=f"sinkhorn {num_iters}")


def test_sinkhorn_rows_and_columns_sum_to_one_after_enough_iterations():
  q, k, v = qkv(81, T=6, S=6)
  _, P = D.sinkhorn_attention(q, k, v, num_iters=61, return_weights=True)
  np.testing.assert_allclose(np.asarray(P.sum(-1)), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(P.sum(-2)), 1.0, atol=1e-4)
  _, P1 = D.sinkhorn_attention(q, k, v, num_iters=1, return_weights=True)
  assert np.max(np.abs(np.asarray(P1.sum(-2)) - 1.0)) > 1e-2  # softmax alone is not
  assert_close(D.sinkhorn_attention(q, k, v, num_iters=1), attnjax.reference_attention(q, k, v),
               jnp.float32, "one iteration = softmax")


# ----------------------------------------------------------------------------- additive

@pytest.mark.parametrize("dtype", DTYPES_SLOW_BF16)
@pytest.mark.parametrize("activation", ["tanh", pytest.param("relu", marks=SLOW)])
def test_additive_attention_matches_reference(dtype, activation):
  q, k, v = qkv(90, T=5, S=6, N=4, K=2, H=3, Hv=5, dtype=dtype)
  w, b = rnd(93, (4, 3), dtype), rnd(94, (4, 3), dtype)
  act = {"tanh": jnp.tanh, "relu": jax.nn.relu}[activation]
  seg = jnp.asarray([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
  kvseg = jnp.asarray([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])

  def impl(q, k, v, w, b):
    return D.additive_attention(q, k, v, w, bias=b, activation=activation,
                                q_segment_ids=seg, kv_segment_ids=kvseg)

  def ref(q, k, v, w, b):
    q, k, v, w, b = _f32(q, k, v, w, b)
    ok = _allowed(5, 6, qseg=seg, kvseg=kvseg)[:, 0]
    outs = []
    for n in range(4):
      e = jnp.zeros((2, 5, 6))
      for a in range(3):
        e = e + w[n, a] * act(q[:, :, n, a][:, :, None] + k[:, :, n // 2, a][:, None, :] + b[n, a])
      outs.append(jnp.einsum("bts,bsh->bth", _softmax_rows(e, ok), v[:, :, n // 2]))
    return jnp.stack(outs, 2)

  check(impl, ref, (q, k, v, w, b), dtype, what=f"additive {activation}")


# ----------------------------------------------------------------------------- collapsed QK

@pytest.mark.parametrize("dtype", DTYPES_SLOW_BF16)
@pytest.mark.parametrize("symmetric", [pytest.param(False, marks=SLOW), True])
def test_collapsed_qk_attention_matches_bilinear_reference(dtype, symmetric):
  B, T, Dm, N = 2, 5, 6, 3
  x = rnd(100, (B, T, Dm), dtype)
  w = rnd(101, (Dm, N, 2 if symmetric else Dm), dtype, scale=0.5)

  def impl(x, w):
    return D.collapsed_qk_attention(x, w, symmetric=symmetric, mask=attnjax.masks.causal())

  def ref(x, w):
    x, w = _f32(x, w)
    outs = []
    for n in range(N):
      W = w[:, n] @ w[:, n].T if symmetric else w[:, n]
      s = jnp.einsum("btd,de,bse->bts", x, W, x) / np.sqrt(w.shape[2])
      outs.append(_softmax_rows(s, _allowed(T, T, causal=True)[:, 0]) @ x)
    return jnp.stack(outs, 2)

  check(impl, ref, (x, w), dtype, what=f"collapsed_qk symmetric={symmetric}")


# ----------------------------------------------------------------------------- A07-A12

@pytest.mark.parametrize("dtype", DTYPES_SLOW_BF16)
@pytest.mark.parametrize("causal", [False, True])
def test_context_broadcast(dtype, causal):
  x = rnd(110, (2, 5, 3), dtype)
  xf = np.asarray(x, np.float64)
  mean = (np.cumsum(xf, 1) / np.arange(1, 6)[None, :, None]) if causal else \
      xf.mean(1, keepdims=True)
  assert_close(D.context_broadcast(x, causal=causal), xf + mean, dtype)
  assert_close(D.context_broadcast(x, causal=causal, average=True), (xf + mean) / 2, dtype)


@pytest.mark.parametrize("dtype", DTYPES_SLOW_BF16)
def test_learnable_temperature_score_mod(dtype):
  q, k, v = qkv(120, dtype=dtype)
  lt = rnd(121, (4,), dtype)

  def impl(q, k, v, lt):
    return attnjax.attention(q, k, v, score_mod=score_mods.learnable_temperature(lt))

  def ref(q, k, v, lt):
    tau = jnp.exp(jnp.asarray(lt, jnp.float32))
    return ref_heads(q, k, v, _allowed(6, 6), logits_fn=lambda n, s: s / tau[n])

  check(impl, ref, (q, k, v, lt), dtype, what="learnable temperature")


@pytest.mark.parametrize("causal", [False, True])
def test_entropy_invariant_scale(causal):
  q, k, v = qkv(130, T=7, S=7)
  train_len, power = 4, 0.5
  mod = score_mods.entropy_invariant_scale(train_len, power=power,
                                           num_keys=None if causal else 7)
  mask = attnjax.masks.causal() if causal else None
  y = attnjax.attention(q, k, v, score_mod=mod, mask=mask)

  def fac(i):
    n = i + 1 if causal else 7
    return np.sqrt(np.log(n) / np.log(train_len))
  facs = jnp.asarray([fac(i) for i in range(7)], jnp.float32)[None, :, None]
  want = ref_heads(q, k, v, _allowed(7, 7, causal=causal), logits_fn=lambda n, s: s * facs)
  assert_close(y, want, jnp.float32)
  assert float(D.log_n_scale(train_len, train_len)) == pytest.approx(1.0)


def test_head_key_modulation_scales_selected_weights_and_renormalises():
  q, k, v = qkv(140, N=4, K=2)
  factors = jnp.asarray([2.0, 0.5, 1.0, 3.0])
  selected = jnp.asarray(np.random.default_rng(1).random((2, 6)) < 0.5)
  y = attnjax.attention(q, k, v, score_mod=score_mods.head_key_modulation(factors, selected))
  qf, kf, vf = _f32(q, k, v)
  outs = []
  for n in range(4):
    p = jax.nn.softmax(jnp.einsum("bth,bsh->bts", qf[:, :, n], kf[:, :, n // 2]) / np.sqrt(8), -1)
    p = p * jnp.where(selected[:, None, :], factors[n], 1.0)
    p = p / p.sum(-1, keepdims=True)
    outs.append(p @ vf[:, :, n // 2])
  assert_close(y, jnp.stack(outs, 2), jnp.float32)


# ----------------------------------------------------------------------------- errors

def test_errors_name_the_argument():
  q, k, v = qkv(150)
  B, T = q.shape[:2]
  with pytest.raises(ValueError, match="top_k"):
    OH.moh_attention(q, k, v, jnp.zeros((B, T, 1)), jnp.zeros((B, T, 3)), top_k=4)
  with pytest.raises(ValueError, match="h_s \\+ h_r"):
    OH.moh_attention(q, k, v, jnp.zeros((B, T, 2)), jnp.zeros((B, T, 3)), top_k=1)
  with pytest.raises(ValueError, match="windows"):
    OH.multi_window_attention(q, k, v, windows=(1, 2, 3))
  with pytest.raises(ValueError, match="windows"):
    OH.multi_window_attention(q, k, v, windows=(-1, None))
  with pytest.raises(TypeError, match="mask"):
    OH.multi_window_attention(q, k, v, windows=(1,), mask=attnjax.masks.causal())
  with pytest.raises(ValueError, match="pre_mix"):
    OH.talking_heads_attention(q, k, v, pre_mix=jnp.eye(3))
  with pytest.raises(ValueError, match="post_mix"):
    OH.talking_heads_attention(q, k, v, post_mix=jnp.eye(3))
  with pytest.raises(ValueError, match="gates"):
    OH.head_gated_attention(q, k, v, gates=jnp.ones(3))
  with pytest.raises(ValueError, match="logit_scale"):
    D.cosine_attention(q, k, v, logit_scale=jnp.ones(3))
  with pytest.raises(TypeError, match="scale"):
    D.cosine_attention(q, k, v, logit_scale=jnp.ones(4), scale=1.0)
  with pytest.raises(ValueError, match="num_iters"):
    D.sinkhorn_attention(q, k, v, num_iters=0)
  with pytest.raises(ValueError, match="w must be"):
    D.additive_attention(q, k, v, jnp.ones((4, 3)))
  with pytest.raises(ValueError, match="activation"):
    D.additive_attention(q, k, v, jnp.ones((4, 8)), activation="softplus")
  with pytest.raises(ValueError, match="w must be"):
    D.collapsed_qk_attention(q[:, :, 0], jnp.ones((8, 2, 5)))
  with pytest.raises(ValueError, match="train_len"):
    D.log_n_scale(5, 1)
  with pytest.raises(ValueError, match="k must be"):
    OH.talking_heads_attention(q, k[..., :4], v)
  with pytest.raises(ValueError, match="wv"):
    OH.single_head_partial_attention(q[:, :, 0], jnp.ones((4, 2)), jnp.ones((4, 2)),
                                     jnp.ones((4, 3)))
  with pytest.raises(ValueError, match="factors"):
    attnjax.attention(q, k, v, score_mod=score_mods.head_key_modulation(
        jnp.ones(3), jnp.ones((2, 6), bool)))
  with pytest.raises(ValueError, match="top_k"):
    variants.build("moh", d_model=16, num_heads=4, rngs=nnx.Rngs(0), num_shared=2, top_k=3)
  with pytest.raises(ValueError, match="num_shared"):
    variants.build("moh", d_model=16, num_heads=4, rngs=nnx.Rngs(0), num_shared=4)
  with pytest.raises(ValueError, match="windows"):
    variants.build("mw_mha", d_model=16, num_heads=4, rngs=nnx.Rngs(0), windows=(1, 2, 3))
  with pytest.raises(TypeError, match="unknown option 'window'"):
    variants.build("sinkhorn", d_model=16, num_heads=4, rngs=nnx.Rngs(0), window=3)
  with pytest.raises(ValueError, match="implementation"):
    variants.build("talking_heads", d_model=16, num_heads=4, rngs=nnx.Rngs(0),
                   implementation="xla")
  with pytest.raises(ValueError, match="cache"):
    variants.build("cosine", d_model=16, num_heads=4, rngs=nnx.Rngs(0))(
        rnd(0, (1, 4, 16)), cache=object())


# ----------------------------------------------------------------------------- layers

def _params(layer):
  return nnx.state(layer, nnx.Param).to_pure_dict()


def test_registered_as_sequence_with_linen():
  for name in NAMES:
    entry = variants.info(name)
    assert entry.kind == "sequence" and entry.linen is not None and not entry.supports_cache


@pytest.mark.parametrize("name", [n if n in _LAYERS_DEFAULT else pytest.param(n, marks=SLOW)
                                  for n in NAMES])
def test_layer_shapes_gradients_and_linen_twin(name):
  x = rnd(0, (2, 8, 16))
  seg = jnp.asarray([[0] * 5 + [1] * 3, [0] * 8])
  opts = dict(causal=True, rope="1d", num_kv_heads=2)
  if name == "sinkhorn":
    opts["num_iters"] = 1  # Sinkhorn's column sums are not causal (see the next test)
  m = variants.build(name, d_model=16, num_heads=4, rngs=nnx.Rngs(0), **opts)
  params = jax.tree.map(lambda a: a + 0.1 * rnd(11, a.shape), _params(m))
  nnx.update(m, params)
  fwd = jax.jit(lambda p, inp: LH.forward(m.config, p, inp, segment_ids=seg)[0])
  y = fwd(params, x)
  assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
  ct = rnd(5, x.shape)
  gp, gx = jax.jit(jax.grad(lambda p, inp: jnp.sum(fwd(p, inp) * ct), argnums=(0, 1)))(params, x)
  assert bool(jnp.all(jnp.isfinite(gx))) and float(jnp.max(jnp.abs(gx))) > 0
  for path, g in jax.tree_util.tree_leaves_with_path(gp):
    assert bool(jnp.all(jnp.isfinite(g))), (name, path)
    assert float(jnp.max(jnp.abs(g))) > 0, (name, path)
  # causal: the output at token t does not depend on later tokens
  x2 = x.at[:, 6:].set(rnd(9, (2, 2, 16)))
  np.testing.assert_allclose(fwd(params, x2)[:, :6], y[:, :6], rtol=1e-5, atol=1e-5)
  # the NNX module and the Linen twin (same parameters) give the same output
  np.testing.assert_allclose(nnx.jit(lambda mod, inp: mod(inp, segment_ids=seg))(m, x), y,
                             rtol=1e-6, atol=1e-6)
  lm = variants.get_linen(name)(d_model=16, num_heads=4, **opts)
  lp = jax.eval_shape(lambda: lm.init(jax.random.key(0), x))["params"]
  assert jax.tree.map(jnp.shape, nn.unbox(lp)) == jax.tree.map(jnp.shape, params), name
  np.testing.assert_allclose(
      jax.jit(lambda p, inp: lm.apply({"params": p}, inp, segment_ids=seg))(params, x), y,
      rtol=1e-6, atol=1e-6)


def test_sinkhorn_layer_is_not_causal_so_causal_needs_one_iteration():
  with pytest.raises(ValueError, match="num_iters"):
    variants.build("sinkhorn", d_model=16, num_heads=4, rngs=nnx.Rngs(0), causal=True)
  x = rnd(3, (1, 6, 16))
  m = variants.build("sinkhorn", d_model=16, num_heads=4, rngs=nnx.Rngs(0), num_iters=3)
  y = m(x)
  y2 = m(x.at[:, 5:].set(rnd(4, (1, 1, 16))))
  assert float(jnp.max(jnp.abs(y2[:, :5] - y[:, :5]))) > 1e-4


def test_moh_layer_sows_weighted_load_balance_loss():
  x = rnd(1, (2, 8, 16))
  m = variants.build("moh", d_model=16, num_heads=4, rngs=nnx.Rngs(0), num_shared=1, top_k=2,
                     load_balance_weight=0.5)
  y, inter = nnx.capture(m, nnx.Intermediate)(x)
  (sown,) = inter["aux_loss"].value
  _, aux = LH.forward(m.config, m.params_dict(), x)
  assert float(sown) == pytest.approx(float(aux["aux_loss"])) and float(sown) > 0
  np.testing.assert_array_equal(y, m(x))
  lm = variants.get_linen("moh")(d_model=16, num_heads=4, num_shared=1, top_k=2,
                                 load_balance_weight=0.5)
  _, state = lm.apply({"params": _params(m)}, x, mutable=["intermediates"])
  assert float(state["intermediates"]["aux_loss"][0]) == pytest.approx(float(sown))


def test_head_gates_layer_mask_removes_a_head():
  x = rnd(2, (1, 6, 16))
  m = variants.build("head_gates", d_model=16, num_heads=4, rngs=nnx.Rngs(0),
                     head_mask=(True, False, True, True))
  g = jax.jit(jax.grad(lambda p: jnp.sum(LH.forward(m.config, p, x)[0] ** 2)))(m.params_dict())
  assert float(g["head_gates"][1]) == 0 and float(jnp.abs(g["head_gates"][0])) > 0


def _train_runlocal(name, arg, tmp_path):
  """configs/<name>.py:<arg> trained in process (as tests/test_configs.py does)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel

  from attnjax.train import trainer  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(f"cfg_{name}",
                                                os.path.join(root, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(arg)
  c.data.data_dir = str(tmp_path / "data")
  c.tensorboard = False
  c.progress_bar = False
  res = trainer.train_and_evaluate(c, str(tmp_path / "w"))
  assert res["status"] == "done" and res["step"] == c.num_steps
  assert all(np.isfinite(v) for k, v in res.items() if k not in ("status", "step"))
  return c, res


@pytest.mark.slow  # about 20 s on 2 cores
def test_moh_runlocal_smoke_train(tmp_path):
  c, _ = _train_runlocal("mqar", "variant=moh,runlocal", tmp_path)
  assert c.model.attention.name == "moh" and c.model.attention.top_k == 1
