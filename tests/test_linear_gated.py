"""Tests for GLA, DeltaNet, Gated DeltaNet, Mamba-2 SSD and implied attention
(attnjax.ops.linear.{gated,delta,ssd}): float64 step-by-step references, three-form
agreement forward and backward, state carrying, stability, bf16, errors."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import examples

from attnjax.ops import linear as L

F32 = dict(rtol=2e-5, atol=2e-5)
MECHS = ('gla', 'delta', 'gated_delta', 'ssd')


def assert_close(a, b, rtol=2e-5, atol=2e-5, what=''):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(b, np.float64)
  assert a.shape == b.shape, (what, a.shape, b.shape)
  assert np.all(np.isfinite(a)), f'{what}: non-finite values'
  scale = max(1.0, float(np.max(np.abs(b))) if b.size else 1.0)
  np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale, err_msg=what)


# --------------------------------------------------------------------------------------
# float64 NumPy references: one token at a time, straight from the recurrences
# --------------------------------------------------------------------------------------


def _rep(x, N):
  x = np.asarray(x, np.float64)
  return np.repeat(x, N // x.shape[2], axis=2)


def ref_gla(q, k, v, log_alpha, scale=None, S0=None):
  """S_t = S_{t-1} * alpha_t[None, :] + v_t k_t^T; o_t = S_t (scale q_t)."""
  q = np.asarray(q, np.float64)
  B, T, N, H = q.shape
  k, v = _rep(k, N), _rep(v, N)
  alpha = np.exp(np.asarray(log_alpha, np.float64))
  scale = H ** -0.5 if scale is None else scale
  S = np.zeros((B, N, v.shape[-1], H)) if S0 is None else np.array(S0, np.float64)
  out = np.zeros((B, T, N, v.shape[-1]))
  for t in range(T):
    for b in range(B):
      for n in range(N):
        S[b, n] = S[b, n] * alpha[b, t, n][None, :] + np.outer(v[b, t, n], k[b, t, n])
        out[b, t, n] = S[b, n] @ (scale * q[b, t, n])
  return out, S


def ref_delta(q, k, v, beta, log_alpha=None, scale=None, S0=None):
  """S_t = a_t S_{t-1} + beta_t (v_t - a_t S_{t-1} k_t) k_t^T; o_t = S_t (scale q_t)."""
  q = np.asarray(q, np.float64)
  B, T, N, H = q.shape
  k, v = _rep(k, N), _rep(v, N)
  beta = np.asarray(beta, np.float64)
  a = np.ones((B, T, N)) if log_alpha is None else np.exp(np.asarray(log_alpha, np.float64))
  scale = H ** -0.5 if scale is None else scale
  S = np.zeros((B, N, v.shape[-1], H)) if S0 is None else np.array(S0, np.float64)
  out = np.zeros((B, T, N, v.shape[-1]))
  for t in range(T):
    for b in range(B):
      for n in range(N):
        prev = a[b, t, n] * S[b, n]
        S[b, n] = prev + beta[b, t, n] * np.outer(v[b, t, n] - prev @ k[b, t, n], k[b, t, n])
        out[b, t, n] = S[b, n] @ (scale * q[b, t, n])
  return out, S


def ref_ssd(x, dt, A, Bm, Cm, D=None, S0=None):
  """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T; y_t = h_t C_t + D x_t."""
  x = np.asarray(x, np.float64)
  Bt, T, N, P = x.shape
  Bm, Cm = _rep(Bm, N), _rep(Cm, N)
  dt, A = np.asarray(dt, np.float64), np.asarray(A, np.float64)
  h = np.zeros((Bt, N, P, Bm.shape[-1])) if S0 is None else np.array(S0, np.float64)
  out = np.zeros_like(x)
  for t in range(T):
    for b in range(Bt):
      for n in range(N):
        h[b, n] = np.exp(dt[b, t, n] * A[n]) * h[b, n] + dt[b, t, n] * np.outer(x[b, t, n],
                                                                                Bm[b, t, n])
        out[b, t, n] = h[b, n] @ Cm[b, t, n]
        if D is not None:
          out[b, t, n] += D[n] * x[b, t, n]
  return out, h


# --------------------------------------------------------------------------------------
# inputs and a uniform calling convention: call(mech, args, form, ...) with
# args = the arrays the op differentiates in
# --------------------------------------------------------------------------------------


def make_args(mech, seed, B=2, T=13, N=4, K=2, H=8, Hv=6, la_lo=-1.0, beta_lo=0.0, beta_hi=1.0,
              dtype=np.float32):
  r = np.random.default_rng(seed)
  if mech == 'ssd':
    args = (r.standard_normal((B, T, N, Hv)), r.uniform(0.05, 1.0, (B, T, N)),
            -r.uniform(0.2, 2.0, (N,)), r.standard_normal((B, T, K, H)) * H ** -0.5,
            r.standard_normal((B, T, K, H)) * H ** -0.5, r.standard_normal((N,)))
    return tuple(jnp.asarray(a, dtype) for a in args)
  q = r.standard_normal((B, T, N, H))
  k = r.standard_normal((B, T, K, H))
  if mech != 'gla':   # the delta rule is used with L2-normalised keys
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
  v = r.standard_normal((B, T, K, Hv))
  args = [q, k, v]
  if mech == 'gla':
    args.append(r.uniform(la_lo, 0.0, (B, T, N, H)))
  else:
    args.append(r.uniform(beta_lo, beta_hi, (B, T, N)))
  if mech == 'gated_delta':
    args.append(r.uniform(la_lo, 0.0, (B, T, N)))
  return tuple(jnp.asarray(a, dtype) for a in args)


def call(mech, args, form, chunk_size=4, state=None, return_state=False, **kw):
  kw = dict(form=form, chunk_size=chunk_size, state=state, return_state=return_state, **kw)
  if mech == 'gla':
    return L.gated_linear_attention(*args, **kw)
  if mech == 'delta':
    return L.delta_rule_attention(*args, **kw)
  if mech == 'gated_delta':
    return L.gated_delta_rule_attention(*args, **kw)
  x, dt, A, Bm, Cm, D = args
  return L.ssd_attention(x, dt, A, Bm, Cm, D=D, **kw)


def reference(mech, args, S0=None):
  if mech == 'gla':
    return ref_gla(*args, S0=S0)
  if mech == 'delta':
    return ref_delta(*args, S0=S0)
  if mech == 'gated_delta':
    return ref_delta(*args[:4], log_alpha=args[4], S0=S0)
  return ref_ssd(*args, S0=S0)


def state_shape(mech, args):
  if mech == 'ssd':
    x, _, _, Bm = args[:4]
    return x.shape[:1] + (x.shape[2], x.shape[3], Bm.shape[3])
  q, _, v = args[:3]
  return (q.shape[0], q.shape[2], v.shape[3], q.shape[3])


def _split(mech, args, t):
  """args restricted to tokens [:t] and [t:] (A and D are not per token)."""
  def part(sl):
    return tuple(a if (mech == 'ssd' and i in (2, 5)) else a[:, sl] for i, a in enumerate(args))
  return part(slice(None, t)), part(slice(t, None))


# --------------------------------------------------------------------------------------
# forward against the float64 recurrence; state in and out
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize('mech', MECHS)
def test_three_forms_match_float64_recurrence_with_state(mech):
  args = make_args(mech, 1)
  S0 = jnp.asarray(np.random.default_rng(2).standard_normal(state_shape(mech, args)) * 0.5,
                   jnp.float32)
  ref_o, ref_S = reference(mech, args, S0=np.asarray(S0))
  outs = jax.jit(lambda a, s: {f: call(mech, a, f, state=s, return_state=True)
                               for f in L.FORMS})(args, S0)
  for form, (o, S) in outs.items():
    assert o.dtype == jnp.float32 and S.dtype == jnp.float32
    assert_close(o, ref_o, what=f'{mech} {form} out')
    assert_close(S, ref_S, what=f'{mech} {form} state')


@pytest.mark.parametrize('mech', MECHS)
def test_three_forms_agree_backward(mech):
  """jax.vjp with a random cotangent on the output and the final state, w.r.t. every
  input and the initial state."""
  args = make_args(mech, 3, T=11)
  S0 = jnp.asarray(np.random.default_rng(4).standard_normal(state_shape(mech, args)) * 0.5,
                   jnp.float32)
  r = np.random.default_rng(5)
  out_shape = jax.eval_shape(lambda a, s: call(mech, a, 'quadratic', state=s,
                                               return_state=True), args, S0)
  ct = tuple(jnp.asarray(r.standard_normal(o.shape), jnp.float32) for o in out_shape)

  def run(args, S0, ct):
    res = {}
    for form in L.FORMS:
      out, vjp = jax.vjp(lambda a, s, form=form: call(mech, a, form, state=s, return_state=True),
                         args, S0)
      res[form] = vjp(ct)
    return res
  res = jax.jit(run)(args, S0, ct)
  ref_ga, ref_gs = res['quadratic']
  assert any(float(jnp.max(jnp.abs(g))) > 0 for g in ref_ga)
  for form in ('chunked', 'recurrent'):
    ga, gs = res[form]
    for i, (g, rg) in enumerate(zip(ga, ref_ga)):
      assert_close(g, rg, what=f'{mech} {form} grad arg {i}')
    assert_close(gs, ref_gs, what=f'{mech} {form} grad state')


@pytest.mark.parametrize('mech', MECHS)
def test_state_carried_across_two_calls_equals_one_call(mech):
  args = make_args(mech, 6, T=19)
  first, second = _split(mech, args, 7)

  def run(args, first, second):
    o, S = call(mech, args, 'chunked', return_state=True)
    o1, S1 = call(mech, first, 'chunked', return_state=True)
    o2, S2 = call(mech, second, 'recurrent', state=S1, return_state=True)
    return o, S, jnp.concatenate([o1, o2], axis=1), S2
  o, S, o12, S12 = jax.jit(run)(args, first, second)
  assert_close(o12, o)
  assert_close(S12, S)


@pytest.mark.parametrize('mech', MECHS)
def test_implied_attention_times_v_equals_output(mech):
  args = make_args(mech, 8, T=10)
  out = jax.jit(lambda a: call(mech, a, 'chunked'))(args)
  if mech == 'ssd':
    W = jax.jit(lambda a: L.implied_attention('ssd', *a[1:]))(args)
    vals = args[0]
  else:
    name = {'gla': 'gla', 'delta': 'delta_rule', 'gated_delta': 'gated_delta_rule'}[mech]
    W = jax.jit(lambda a: L.implied_attention(name, *(a[:2] + a[3:])))(args)
    vals = _rep(args[2], args[0].shape[2])
  B, T, N = out.shape[:3]
  assert W.shape == (B, N, T, T)
  np.testing.assert_array_equal(np.triu(np.asarray(W), 1), 0.0)
  assert_close(jnp.einsum('bnts,bsnv->btnv', W, jnp.asarray(vals, jnp.float32)), out)


def test_implied_delta_rule_by_probing_the_recurrence():
  """W's column s is the output for a one-hot value at token s (linearity in v)."""
  q, k, v, beta = make_args('delta', 9, B=1, T=6, N=1, K=1, H=4, Hv=1)
  W = np.asarray(L.implied_attention('delta_rule', q, k, beta))[0, 0]
  for s in range(6):
    onehot = np.zeros((1, 6, 1, 1), np.float32)
    onehot[0, s] = 1.0
    ref, _ = ref_delta(q, k, onehot, beta)
    np.testing.assert_allclose(W[:, s], ref[0, :, 0, 0], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# hypothesis: ragged T, chunk sizes, T = 1, state split
# --------------------------------------------------------------------------------------


_settings = hypothesis.settings(
    max_examples=examples(2), deadline=None, derandomize=True, database=None,
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    suppress_health_check=list(hypothesis.HealthCheck))


@_settings
@hypothesis.given(mech=st.sampled_from(MECHS), T=st.integers(1, 23),
                  chunk=st.sampled_from([1, 2, 4, 8, 16, 64]), split=st.integers(0, 23),
                  K=st.sampled_from([1, 2]), seed=st.integers(0, 2 ** 16))
def test_chunked_matches_reference_ragged(mech, T, chunk, split, K, seed):
  args = make_args(mech, seed, B=1, T=T, N=2, K=K, H=4, Hv=3)
  ref_o, ref_S = reference(mech, args)
  t = min(split, T)
  first, second = _split(mech, args, t)

  def run(args, first, second):
    o, S = call(mech, args, 'chunked', chunk_size=chunk, return_state=True)
    S1 = None
    parts = []
    if t:
      o1, S1 = call(mech, first, 'chunked', chunk_size=chunk, return_state=True)
      parts.append(o1)
    if T - t:
      o2, S1 = call(mech, second, 'chunked', chunk_size=chunk, state=S1, return_state=True)
      parts.append(o2)
    return o, S, jnp.concatenate(parts, axis=1), S1
  o, S, o12, S12 = jax.jit(run)(args, first, second)
  assert_close(o, ref_o)
  assert_close(S, ref_S)
  assert_close(o12, ref_o)
  assert_close(S12, ref_S)


@pytest.mark.parametrize('mech', MECHS)
def test_single_token(mech):
  args = make_args(mech, 10, T=1)
  ref_o, _ = reference(mech, args)
  outs = jax.jit(lambda a: {f: call(mech, a, f) for f in L.FORMS})(args)
  for form, o in outs.items():
    assert_close(o, ref_o, what=form)


def test_block_driver_matches_one_block():
  """Sequences longer than block_len run block by block (rematerialised) with the same
  result, forward and backward."""
  args = make_args('gla', 11, B=1, T=21, N=2, K=1, H=4, Hv=3)

  def run(a):
    f = lambda a, bl: jnp.sum(call('gla', a, 'chunked', block_len=bl) ** 2)
    return jax.value_and_grad(lambda a: f(a, 8))(a), jax.value_and_grad(lambda a: f(a, None))(a)
  (v1, g1), (v2, g2) = jax.jit(run)(args)
  assert_close(v1, v2)
  for x, y in zip(g1, g2):
    assert_close(x, y)


# --------------------------------------------------------------------------------------
# stability and dtypes
# --------------------------------------------------------------------------------------


def _extreme_run(mech):
  def run(args, ref_o):
    loss = lambda a: jnp.sum(call(mech, a, 'chunked', chunk_size=16) * ref_o)
    return call(mech, args, 'chunked', chunk_size=16), jax.grad(loss)(args)
  return jax.jit(run)


_EXTREME = {m: _extreme_run(m) for m in ('gla', 'gated_delta', 'delta')}


@pytest.mark.parametrize('la', [-20.0, -1e-6])
@pytest.mark.parametrize('beta', [0.0, 1.0])
def test_extreme_decays_and_betas_are_finite_and_exact(la, beta):
  """Decays near 0 and 1, beta at 0 and 1: chunked equals the recurrence, gradients finite."""
  for mech, run in _EXTREME.items():
    args = list(make_args(mech, 12, B=1, T=40, N=2, K=2, H=4, Hv=3))
    if mech != 'gla':
      args[3] = jnp.full_like(args[3], beta)
    if mech != 'delta':
      args[-1] = jnp.full_like(args[-1], la)
    args = tuple(args)
    ref_o, _ = reference(mech, args)
    o, grads = run(args, jnp.asarray(ref_o, jnp.float32))
    assert_close(o, ref_o, what=f'{mech} la={la} beta={beta}')
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


@pytest.mark.slow
@pytest.mark.parametrize('mech', MECHS)
def test_long_sequence_finite(mech):
  T = 2048
  args = make_args(mech, 13, B=1, T=T, N=2, K=1, H=16, Hv=16, la_lo=-20.0)
  if mech == 'ssd':
    args = (args[0], args[1] * 10.0) + args[2:]

  def loss(a):
    return jnp.mean(call(mech, a, 'chunked', chunk_size=64) ** 2)
  o = jax.jit(lambda a: call(mech, a, 'chunked', chunk_size=64))(args)
  r = jax.jit(lambda a: call(mech, a, 'recurrent'))(args)
  assert_close(o, r, rtol=1e-4, atol=1e-4)
  grads = jax.jit(jax.grad(loss))(args)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


@pytest.mark.parametrize('mech', MECHS)
def test_bf16_inputs_close_to_f32(mech):
  args32 = make_args(mech, 14, T=24)
  args16 = tuple(a.astype(jnp.bfloat16) for a in args32)
  run = jax.jit(lambda a: call(mech, a, 'chunked', chunk_size=8, return_state=True))
  o16, S16 = run(args16)
  o32, _ = run(tuple(a.astype(jnp.float32) for a in args16))
  assert o16.dtype == jnp.bfloat16 and S16.dtype == jnp.float32
  assert_close(o16, o32, rtol=2e-2, atol=2e-2)


def test_jit_with_traced_decay_and_beta():
  """Traced values are not range-checked (only shapes); the result is right."""
  args = make_args('gated_delta', 15, T=9)
  traced = jax.jit(L.gated_delta_rule_attention)(*args)
  assert_close(traced, reference('gated_delta', args)[0])


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------


def test_errors_name_the_argument():
  q, k, v, la = make_args('gla', 16, T=5)
  _, _, _, beta, ls = make_args('gated_delta', 16, T=5)
  with pytest.raises(ValueError, match='log_alpha'):
    L.gated_linear_attention(q, k, v, la.at[0, 0, 0, 0].set(0.1))
  with pytest.raises(ValueError, match='log_alpha'):
    L.gated_linear_attention(q, k, v, la[..., 0])
  with pytest.raises(ValueError, match='log_alpha'):
    L.gated_delta_rule_attention(q, k, v, beta, ls.at[0, 1, 0].set(1e-3))
  with pytest.raises(ValueError, match='beta'):
    L.delta_rule_attention(q, k, v, beta.at[0, 0, 0].set(1.5))
  with pytest.raises(ValueError, match='beta'):
    L.delta_rule_attention(q, k, v, -beta)
  with pytest.raises(ValueError, match='beta'):
    L.delta_rule_attention(q, k, v, beta[..., None])
  for bad in (0, -4, 12, 2.0, True):
    with pytest.raises(ValueError, match='chunk_size'):
      L.gated_linear_attention(q, k, v, la, chunk_size=bad)
    with pytest.raises(ValueError, match='chunk_size'):
      L.delta_rule_attention(q, k, v, beta, chunk_size=bad)
  with pytest.raises(ValueError, match='rank 4'):
    L.delta_rule_attention(q[0], k, v, beta)
  with pytest.raises(ValueError, match='form'):
    L.delta_rule_attention(q, k, v, beta, form='parallel')
  with pytest.raises(ValueError, match='state'):
    L.gated_linear_attention(q, k, v, la, state=jnp.zeros((2, 4, 8, 6)))
  with pytest.raises(ValueError, match='scale'):
    L.delta_rule_attention(q, k, v, beta, scale=-1.0)
  x, dt, A, Bm, Cm, D = make_args('ssd', 17, T=5)
  with pytest.raises(ValueError, match='dt'):
    L.ssd_attention(x, -dt, A, Bm, Cm)
  with pytest.raises(ValueError, match='A'):
    L.ssd_attention(x, dt, -A, Bm, Cm)
  with pytest.raises(ValueError, match='D'):
    L.ssd_attention(x, dt, A, Bm, Cm, D=D[:2])
  with pytest.raises(ValueError, match='chunk_size'):
    L.ssd_attention(x, dt, A, Bm, Cm, chunk_size=6)
  with pytest.raises(ValueError, match='groups'):
    L.ssd_attention(x[:, :, :3], dt[:, :, :3], A[:3], Bm, Cm)
  with pytest.raises(ValueError, match='mechanism'):
    L.implied_attention('mamba', q, k, la)


# --------------------------------------------------------------------------------------
# layers: 'gla', 'deltanet', 'gated_deltanet', 'mamba2' (attnjax.layers.linear_gated)
# --------------------------------------------------------------------------------------

LAYERS = ('gla', 'deltanet', 'gated_deltanet', 'mamba2')
D_MODEL, HEADS, KV = 32, 4, 2


def _np_silu(x):
  return x / (1.0 + np.exp(-x))


def _np_softplus(x):
  return np.logaddexp(0.0, x)


def _np_conv(u, w):
  """Causal depthwise conv over time, zeros before the start: out_t = sum_i w[i] u_{t-W+1+i}."""
  W, T = w.shape[0], u.shape[1]
  out = np.zeros_like(u)
  for t in range(T):
    for i in range(W):
      s = t - W + 1 + i
      if s >= 0:
        out[:, t] += w[i] * u[:, s]
  return out


def _np_layer(name, p, x):
  """The layer written out in float64 NumPy from its documented formula."""
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  x = np.asarray(x, np.float64)
  q, k, v = (np.einsum('btd,dnh->btnh', x, p[f'{n}_kernel']) for n in 'qkv')
  if name != 'gla':
    q, k, v = (_np_silu(_np_conv(u, p[f'{n}_conv'])) for u, n in zip((q, k, v), 'qkv'))
  if name in ('deltanet', 'gated_deltanet'):
    q = q / np.sqrt(np.sum(q * q, -1, keepdims=True) + 1e-6)
    k = k / np.sqrt(np.sum(k * k, -1, keepdims=True) + 1e-6)
    beta = 1.0 / (1.0 + np.exp(-(x @ p['beta_kernel'])))
  if name in ('gated_deltanet', 'mamba2'):
    dt = _np_softplus(x @ p['dt_kernel'] + p['dt_bias'])
    A = -np.exp(p['A_log'])
  if name == 'gla':
    g = np.einsum('btr,rnh->btnh', x @ p['gate_a_kernel'], p['gate_b_kernel']) + p['gate_bias']
    o, _ = ref_gla(q, k, v, -_np_softplus(-g) / 16.0)
  elif name == 'deltanet':
    o, _ = ref_delta(q, k, v, beta)
  elif name == 'gated_deltanet':
    o, _ = ref_delta(q, k, v, beta, log_alpha=A * dt)
  else:
    o, _ = ref_ssd(v, dt, A, k, q, D=p['D_skip'])
  o = o / np.sqrt(np.mean(o * o, -1, keepdims=True) + 1e-6) * p['out_norm']
  o = o * _np_silu(np.einsum('btd,dnv->btnv', x, p['g_kernel']))
  return np.einsum('btnv,nvd->btd', o, p['o_kernel'])


def _build(name, seed=0, **opts):
  from flax import nnx

  from attnjax import variants
  return variants.build(name, d_model=D_MODEL, num_heads=HEADS, num_kv_heads=KV,
                        rngs=nnx.Rngs(seed), chunk_size=4, **opts)


def _x(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize('name', LAYERS)
def test_layer_matches_float64_formula_and_decodes(name):
  """Full forward == the float64 formula; prefill (chunked) then one token at a time
  (recurrent, cached conv inputs) == the full forward."""
  from flax import nnx
  layer = _build(name, seed=1)
  x = _x((2, 10, D_MODEL), seed=2)
  graphdef, state = nnx.split(layer)
  full = jax.jit(lambda s, a: nnx.merge(graphdef, s)(a))(state, x)
  assert_close(full, _np_layer(name, layer.params_dict(), x), what=name)
  run = jax.jit(lambda s, a, c: nnx.merge(graphdef, s)(a, cache=c))
  cache = layer.init_cache(2, 16)
  outs = []
  for lo, hi in [(0, 5)] + [(t, t + 1) for t in range(5, 10)]:
    y, cache = run(state, x[:, lo:hi], cache)
    outs.append(y)
  assert_close(jnp.concatenate(outs, 1), full)
  assert int(cache['index']) == 10


@pytest.mark.parametrize('name', LAYERS)
def test_linen_twin_equals_nnx(name):
  from flax import nnx

  from attnjax import variants
  from attnjax.layers import linear_gated_linen
  layer = _build(name, seed=3)
  twin = variants.get_linen(name)(d_model=D_MODEL, num_heads=HEADS, num_kv_heads=KV,
                                  head_dim=None, chunk_size=4)
  assert isinstance(twin, linear_gated_linen.GatedLinearAttention)
  boxed = jax.eval_shape(lambda: twin.init(jax.random.key(0), _x((1, 3, D_MODEL))))['params']
  nnx_params = {path[0]: var for path, var in nnx.state(layer, nnx.Param).flat_state()}
  assert sorted(boxed) == sorted(nnx_params)
  for pname, box in boxed.items():
    var = nnx_params[pname]
    assert box.value.shape == var[...].shape
    assert tuple(box.names) == tuple(var.get_metadata()['out_sharding'])
  variables = {'params': {pname: var[...] for pname, var in nnx_params.items()}}
  x = _x((2, 7, D_MODEL), seed=4)
  graphdef, state = nnx.split(layer)

  @jax.jit
  def run(s, v, a):
    y0, cache = twin.apply(v, a[:, :6], cache=twin.init_cache(2, 8))
    y1, _ = twin.apply(v, a[:, 6:], cache=cache)
    return nnx.merge(graphdef, s)(a), twin.apply(v, a), jnp.concatenate([y0, y1], 1)
  y_nnx, y_linen, y_dec = run(state, variables, x)
  np.testing.assert_array_equal(y_linen, y_nnx)  # same function on the same parameters
  assert_close(y_dec, y_linen)


def test_lm_decode_with_gated_deltanet_and_rope_equals_full_forward():
  import ml_collections
  from flax import nnx

  from attnjax import models
  cfg = models.default_config('lm')     # rope '1d' by default: passed to the layer
  cfg.attention = ml_collections.ConfigDict({'name': 'gated_deltanet', 'chunk_size': 4})
  cfg.num_kv_heads = 2
  model = models.build_model(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 64)
  graphdef, state = nnx.split(model)
  full = jax.jit(lambda s, a: nnx.merge(graphdef, s)(a))(state, tokens)
  run = jax.jit(lambda s, a, c: nnx.merge(graphdef, s)(a, cache=c))
  cache = model.init_cache(2, 16)
  outs = []
  for lo, hi in [(0, 4)] + [(t, t + 1) for t in range(4, 9)]:
    y, cache = run(state, tokens[:, lo:hi], cache)
    outs.append(y)
  assert_close(jnp.concatenate(outs, 1), full)


def test_layer_registry_and_bad_options():
  from flax import nnx

  from attnjax import variants
  for name in LAYERS:
    info = variants.info(name)
    assert info.kind == 'sequence' and info.supports_cache
  for name, opts, match in [('gla', {'causal': False}, 'causal'),
                            ('deltanet', {'conv_size': 0}, 'conv_size'),
                            ('gla', {'conv_size': 2}, 'conv_size'),
                            ('mamba2', {'chunk_size': 12}, 'chunk_size'),
                            ('gated_deltanet', {'rope': 'axial'}, 'rope'),
                            ('gla', {'gate_rank': 0}, 'gate_rank'),
                            ('deltanet', {'mechanism': 'x'}, 'mechanism')]:
    with pytest.raises((ValueError, TypeError), match=match):
      variants.build(name, d_model=D_MODEL, num_heads=HEADS, rngs=nnx.Rngs(0), **opts)
  layer = _build('deltanet')
  with pytest.raises(ValueError, match='segment_ids'):
    layer(_x((1, 4, D_MODEL)), segment_ids=jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match='positions'):
    layer(_x((1, 4, D_MODEL)), positions=jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(TypeError, match='cache'):
    layer(_x((1, 4, D_MODEL)), cache={'state': 0})
  # a grid runs its tokens in raster order: the same as the flattened sequence
  g = _x((2, 3, 4, D_MODEL), 5)
  np.testing.assert_allclose(np.asarray(layer(g)).reshape(2, 12, D_MODEL),
                             np.asarray(layer(g.reshape(2, 12, D_MODEL))), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=r'x must be \[B, T, d_model=32\] or \[B, \*grid'):
    layer(_x((4, D_MODEL)))


def _train_mqar(name, tmp_path):
  import importlib.util
  import os

  from attnjax.train import trainer
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs', 'mqar.py')
  spec = importlib.util.spec_from_file_location('cfg_mqar_gated', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(f'variant={name},runlocal')
  c.data.data_dir = str(tmp_path / 'data')
  c.tensorboard = False
  c.progress_bar = False
  res = trainer.train_and_evaluate(c, str(tmp_path / 'w'))
  assert res['status'] == 'done' and res['step'] == c.num_steps
  assert all(np.isfinite(v) for k, v in res.items() if k not in ('status', 'step'))


@pytest.mark.parametrize('name', [
    'gated_deltanet',
    pytest.param('gla', marks=pytest.mark.slow),
    pytest.param('deltanet', marks=pytest.mark.slow),
    pytest.param('mamba2', marks=pytest.mark.slow)])
def test_mqar_runlocal_trains(name, tmp_path):
  _train_mqar(name, tmp_path)
