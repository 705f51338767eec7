"""Tests for attnjax.ops.linear: three-form agreement, float64 references, edge cases, errors."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops import linear as L

TOL = {jnp.float32: dict(rtol=2e-5, atol=2e-5)}


# --------------------------------------------------------------------------------------
# helpers and float64 numpy references (written straight from the formulas)
# --------------------------------------------------------------------------------------


def _inputs(seed, B, T, N, K, H, Hv, S=None, dtype=jnp.float32):
  S = T if S is None else S
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(kq, (B, T, N, H), jnp.float32) * H ** -0.5
  k = jax.random.normal(kk, (B, S, K, H), jnp.float32) * H ** -0.5
  v = jax.random.normal(kv, (B, S, K, Hv), jnp.float32)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _rep(x, N):
  x = np.asarray(x, np.float64)
  return np.repeat(x, N // x.shape[2], axis=2)


def _np_phi(name):
  return {'elu+1': lambda x: np.where(x > 0, x + 1, np.exp(np.minimum(x, 0))),
          'relu': lambda x: np.maximum(x, 0), 'identity': lambda x: x}[name]


def ref_decayed(q, k, v, a, phi=lambda x: x, normalize=False, eps=L.DEFAULT_EPS):
  """Token-by-token float64 recurrence: S_t = exp(a_t) S_{t-1} + phi(k_t) v_t^T."""
  q, k, v = np.asarray(q, np.float64), _rep(k, q.shape[2]), _rep(v, q.shape[2])
  a = np.asarray(a, np.float64)
  qf, kf = phi(q), phi(k)
  B, T, N, F = qf.shape
  S = np.zeros((B, N, F, v.shape[-1]))
  z = np.zeros((B, N, F))
  out = np.zeros((B, T, N, v.shape[-1]))
  for t in range(T):
    dec = np.exp(a[:, t])[..., None, None]
    S = dec * S + kf[:, t, :, :, None] * v[:, t, :, None, :]
    z = dec[..., 0] * z + kf[:, t]
    num = np.einsum('bnf,bnfv->bnv', qf[:, t], S)
    if normalize:
      den = np.einsum('bnf,bnf->bn', qf[:, t], z)
      num = num / np.where(den >= 0, den + eps, den - eps)[..., None]
    out[:, t] = num
  return out


def ref_linear(q, k, v, phi, causal, normalize=True, eps=L.DEFAULT_EPS):
  q, k, v = np.asarray(q, np.float64), _rep(k, q.shape[2]), _rep(v, q.shape[2])
  s = np.einsum('btnf,bsnf->bnts', phi(q), phi(k))
  if causal:
    s = s * np.tril(np.ones(s.shape[-2:]))
  o = np.einsum('bnts,bsnv->btnv', s, v)
  if normalize:
    den = s.sum(-1).transpose(0, 2, 1)[..., None]
    o = o / np.where(den >= 0, den + eps, den - eps)
  return o


def assert_close(a, b, rtol=2e-5, atol=2e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                             rtol=rtol, atol=atol)


def _cotangent(fn, args, seed):
  out = jax.eval_shape(fn, *args)
  return jax.random.normal(jax.random.PRNGKey(seed), out.shape, out.dtype)


def vjp_all(fn, args, seed=7):
  """(out, grads) of fn at args for a random cotangent, in one jitted program."""
  def run(ct, *args):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(ct)
  return jax.jit(run)(_cotangent(fn, args, seed), *args)


def assert_forms_agree(make_fn, args, rtol=2e-5, atol=2e-5):
  """Chunked and recurrent forms equal the quadratic one, forward and backward."""
  ct = _cotangent(make_fn('quadratic'), args, 7)

  def run(ct, *args):
    res = {}
    for form in L.FORMS:
      out, vjp = jax.vjp(make_fn(form), *args)
      res[form] = (out, vjp(ct))
    return res
  res = jax.jit(run)(ct, *args)
  ref_out, ref_grads = res['quadratic']
  for form in ('chunked', 'recurrent'):
    out, grads = res[form]
    assert_close(out, ref_out, rtol, atol)
    for g, rg in zip(grads, ref_grads):
      assert_close(g, rg, rtol, atol)
  return ref_out


def jit_forms(fn, forms, *args, **kw):
  """{form: fn(*args, form=form, **kw)} computed in one jitted program."""
  return jax.jit(lambda *a: {f: fn(*a, form=f, **kw) for f in forms})(*args)


DECAY4 = np.array([0.9, 0.5, 1.0, 0.99], np.float32)


# --------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize('feature_map', ['elu+1', 'relu', 'identity'])
@pytest.mark.parametrize('causal', [False, True])
def test_linear_attention_matches_float64_reference(feature_map, causal):
  q, k, v = _inputs(0, 2, 19, 4, 2, 8, 6, S=19 if causal else 23)
  if feature_map == 'identity':  # keep the identity denominator away from zero
    q, k = jnp.abs(q) + 0.1, jnp.abs(k) + 0.1
  forms = ('chunked', 'recurrent', 'quadratic') if causal else ('chunked', 'quadratic')
  ref = ref_linear(q, k, v, _np_phi(feature_map), causal)
  outs = jit_forms(L.linear_attention, forms, q, k, v, feature_map=feature_map, causal=causal,
                   chunk_size=8)
  for out in outs.values():
    assert out.shape == (2, 19, 4, 6) and out.dtype == jnp.float32
    assert_close(out, ref)


def test_linear_attention_callable_feature_map_changes_dim():
  q, k, v = _inputs(1, 1, 13, 2, 1, 4, 3)
  phi = lambda x: jnp.concatenate([jax.nn.relu(x), jax.nn.relu(-x)], -1) + 0.01
  np_phi = lambda x: np.concatenate([np.maximum(x, 0), np.maximum(-x, 0)], -1) + 0.01
  out, (S, z) = jax.jit(lambda q, k, v: L.linear_attention(
      q, k, v, feature_map=phi, causal=True, return_state=True, chunk_size=4))(q, k, v)
  assert S.shape == (1, 1, 8, 3) and z.shape == (1, 1, 8)
  assert_close(out, ref_linear(q, k, v, np_phi, True))


def test_lightning_matches_float64_recurrence():
  q, k, v = _inputs(2, 2, 37, 4, 2, 8, 5)
  a = np.broadcast_to(np.log(DECAY4.astype(np.float64)), (2, 37, 4))
  ref = ref_decayed(q, k, v, a)
  for out in jit_forms(L.lightning_attention, L.FORMS, q, k, v, decay=DECAY4,
                       chunk_size=8).values():
    assert_close(out, ref)


def test_decayed_gated_normalized_matches_float64_recurrence():
  q, k, v = _inputs(3, 2, 29, 4, 2, 8, 5)
  gate = -jax.nn.softplus(jax.random.normal(jax.random.PRNGKey(9), (2, 29, 4)))
  a = np.log(DECAY4.astype(np.float64)) + np.asarray(gate, np.float64)
  ref = ref_decayed(q, k, v, a, phi=_np_phi('elu+1'), normalize=True)
  outs = jit_forms(lambda q, k, v, g, form: L.decayed_linear_attention(
      q, k, v, decay=DECAY4, log_decay=g, normalize=True, feature_map='elu+1', form=form,
      chunk_size=7), L.FORMS, q, k, v, gate)
  for out in outs.values():
    assert_close(out, ref)


# --------------------------------------------------------------------------------------
# three-form agreement, forward and backward, hypothesis-drawn shapes
# --------------------------------------------------------------------------------------

shapes = st.fixed_dictionaries(dict(
    B=st.integers(1, 2), T=st.integers(1, 40), K=st.sampled_from([1, 2]),
    G=st.sampled_from([1, 2, 3]), H=st.sampled_from([1, 4, 8]), Hv=st.sampled_from([1, 3, 8]),
    chunk=st.sampled_from([1, 3, 8, 16, 64]), seed=st.integers(0, 2 ** 16)))
_settings = hypothesis.settings(
    max_examples=3, deadline=None, derandomize=True, database=None,
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],  # shrinking recompiles
    suppress_health_check=list(hypothesis.HealthCheck))


@_settings
@hypothesis.given(shapes, st.sampled_from(['elu+1', 'relu']))
def test_linear_attention_three_forms_agree(s, feature_map):
  N = s['K'] * s['G']
  args = _inputs(s['seed'], s['B'], s['T'], N, s['K'], s['H'], s['Hv'])
  make = lambda form: functools.partial(L.linear_attention, feature_map=feature_map,
                                        causal=True, form=form, chunk_size=s['chunk'])
  assert_forms_agree(make, args)


@_settings
@hypothesis.given(shapes)
def test_lightning_three_forms_agree(s):
  N = s['K'] * s['G']
  args = _inputs(s['seed'], s['B'], s['T'], N, s['K'], s['H'], s['Hv'])
  decay = jnp.linspace(0.6, 1.0, N)
  make = lambda form: (lambda q, k, v, d: L.lightning_attention(
      q, k, v, decay=d, form=form, chunk_size=s['chunk']))
  assert_forms_agree(make, args + (decay,))


@_settings
@hypothesis.given(shapes)
def test_decayed_gated_three_forms_agree(s):
  N = s['K'] * s['G']
  args = _inputs(s['seed'], s['B'], s['T'], N, s['K'], s['H'], s['Hv'])
  gate = -jax.nn.softplus(jax.random.normal(jax.random.PRNGKey(s['seed'] + 1),
                                            (s['B'], s['T'], N)))
  make = lambda form: (lambda q, k, v, g: L.decayed_linear_attention(
      q, k, v, decay=0.95, log_decay=g, feature_map='elu+1', normalize=True, form=form,
      chunk_size=s['chunk']))
  assert_forms_agree(make, args + (gate,))


@_settings
@hypothesis.given(shapes)
def test_inline_and_focused_three_forms_agree(s):
  N = s['K'] * s['G']
  args = _inputs(s['seed'], s['B'], s['T'], N, s['K'], s['H'], s['Hv'])
  make = lambda form: functools.partial(L.inline_attention, causal=True, form=form,
                                        chunk_size=s['chunk'])
  assert_forms_agree(make, args)
  make = lambda form: functools.partial(L.focused_linear_attention, causal=True, form=form,
                                        chunk_size=s['chunk'])
  assert_forms_agree(make, args)


def test_final_states_agree_across_forms():
  q, k, v = _inputs(4, 2, 21, 4, 2, 8, 3)
  for fn, kw in [(L.linear_attention, dict(causal=True)),
                 (L.lightning_attention, dict(decay=DECAY4)),
                 (L.inline_attention, dict(causal=True)),
                 (L.flow_attention, dict(causal=True))]:
    res = jit_forms(fn, L.FORMS, q, k, v, chunk_size=8, return_state=True, **kw)
    for form in ('chunked', 'recurrent'):
      jax.tree.map(assert_close, res[form][1], res['quadratic'][1])


@pytest.mark.parametrize('fn,kw', [
    (L.linear_attention, dict(causal=True)),
    (L.lightning_attention, dict(decay=DECAY4)),
    (L.decayed_linear_attention, dict(decay=0.9, normalize=True, feature_map='elu+1')),
    (L.inline_attention, dict(causal=True)),
    (L.focused_linear_attention, dict(causal=True)),
    (L.flow_attention, dict(causal=True)),
])
def test_state_carries_across_calls(fn, kw):
  """Prefill with one form, continue with another (a block, then single tokens)."""
  q, k, v = _inputs(5, 2, 30, 4, 2, 8, 3)

  def run(q, k, v):
    full = fn(q, k, v, form='quadratic', **kw)
    o1, st1 = fn(q[:, :17], k[:, :17], v[:, :17], form='chunked', chunk_size=8,
                 return_state=True, **kw)
    o2, stt = fn(q[:, 17:25], k[:, 17:25], v[:, 17:25], form='recurrent', state=st1,
                 return_state=True, **kw)
    outs = [o1, o2]
    for t in range(25, 30):
      o_t, stt = fn(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], form='quadratic', state=stt,
                    return_state=True, **kw)
      outs.append(o_t)
    return jnp.concatenate(outs, axis=1), full

  split, full = jax.jit(run)(q, k, v)
  assert_close(split, full)


def test_gqa_equals_repeated_kv():
  q, k, v = _inputs(6, 2, 20, 6, 2, 4, 5)
  kr, vr = jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2)
  decay = jnp.linspace(0.7, 1.0, 6)
  for fn, kw in [(L.linear_attention, dict(causal=True)), (L.linear_attention, {}),
                 (L.lightning_attention, dict(decay=decay)), (L.inline_attention, {}),
                 (L.efficient_attention, {}), (L.flow_attention, {}),
                 (L.flow_attention, dict(causal=True, chunk_size=6))]:
    a, b = jax.jit(lambda q, k, v, kr, vr, fn=fn, kw=kw: (fn(q, k, v, **kw), fn(q, kr, vr, **kw)))(
        q, k, v, kr, vr)
    assert_close(a, b)


def _primitive_names(jaxpr):
  """Every primitive name in a jaxpr, sub-jaxprs (scan, remat, custom rules) included."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          names |= _primitive_names(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          names |= _primitive_names(sub)
  return names


@pytest.mark.parametrize('block_len', [None, 8])
@pytest.mark.parametrize('fn', [
    functools.partial(L.linear_attention, feature_map='relu', causal=True),
    functools.partial(L.decayed_linear_attention, feature_map='identity'),  # no decay given
    functools.partial(L.inline_attention, causal=True),
])
def test_undecayed_path_has_no_exp(fn, block_len):
  """The undecayed causal forms run no decay machinery: no exp in the forward or backward."""
  q, k, v = _inputs(30, 1, 21, 4, 2, 4, 3)
  for form in L.FORMS:
    f = functools.partial(fn, form=form, chunk_size=4, block_len=block_len)
    fwd_bwd = jax.make_jaxpr(lambda q, k, v, f=f: jax.vjp(f, q, k, v)[1](v.repeat(2, 2)))(q, k, v)
    names = _primitive_names(fwd_bwd.jaxpr)
    assert 'dot_general' in names and 'exp' not in names, (form, sorted(names))
  # the decayed path does use exp (so the check above can fail)
  f = functools.partial(L.lightning_attention, decay=0.9, chunk_size=4)
  assert 'exp' in _primitive_names(jax.make_jaxpr(f)(q, k, v).jaxpr)


@pytest.mark.parametrize('name', ['linear', pytest.param('flow', marks=pytest.mark.slow),
                                  pytest.param('linear_unnormalized', marks=pytest.mark.slow),
                                  pytest.param('gated', marks=pytest.mark.slow),
                                  pytest.param('undecayed', marks=pytest.mark.slow),
                                  pytest.param('inline', marks=pytest.mark.slow)])
def test_blocks_equal_single_pass(name):
  """block_len (lax.scan over rematerialised blocks) changes nothing: out, state, grads."""
  q, k, v = _inputs(31, 2, 37, 4, 2, 8, 5)
  gate = -jax.nn.softplus(jax.random.normal(jax.random.PRNGKey(32), (2, 37, 4)))
  fn = {'linear': functools.partial(L.linear_attention, causal=True),
        'linear_unnormalized': functools.partial(L.linear_attention, causal=True, normalize=False),
        'gated': lambda q, k, v, **kw: L.decayed_linear_attention(
            q, k, v, decay=0.95, log_decay=gate, normalize=True, feature_map='elu+1', **kw),
        'undecayed': L.decayed_linear_attention,
        'inline': functools.partial(L.inline_attention, causal=True),
        'flow': functools.partial(L.flow_attention, causal=True)}[name]
  # a non-trivial incoming state (any positive values: the forms are algebraically equal)
  shapes = jax.eval_shape(lambda q, k, v: fn(q, k, v, return_state=True)[1], q, k, v)
  st0 = jax.tree.map(lambda x: jax.random.uniform(jax.random.PRNGKey(34), x.shape, x.dtype,
                                                  0.5, 1.5), shapes)

  def make(block_len, form='chunked'):
    return lambda q, k, v: fn(q, k, v, form=form, chunk_size=5, block_len=block_len,
                              state=st0, return_state=True)

  ct = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(33), x.shape, x.dtype),
                    jax.eval_shape(make(None), q, k, v))

  def run(ct, q, k, v):
    res = []
    for f in (make(None), make(12)):  # 37 = 3 whole blocks of 12 (not a chunk multiple) + 1
      out, vjp = jax.vjp(f, q, k, v)
      res.append((out, vjp(ct)))
    return res
  ref, blocked = jax.jit(run)(ct, q, k, v)
  jax.tree.map(assert_close, blocked, ref)


# --------------------------------------------------------------------------------------
# non-causal mechanisms vs float64 references
# --------------------------------------------------------------------------------------


def _np_softmax(x, axis):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def ref_efficient(q, k, v):
  q, k, v = np.asarray(q, np.float64), _rep(k, q.shape[2]), _rep(v, q.shape[2])
  return np.einsum('btnh,bnhv->btnv', _np_softmax(q, -1),
                   np.einsum('bsnh,bsnv->bnhv', _np_softmax(k, 1), v))


def ref_flow(q, k, v, eps=L.DEFAULT_EPS):
  q, k, v = np.asarray(q, np.float64), _rep(k, q.shape[2]), _rep(v, q.shape[2])
  T, S = q.shape[1], k.shape[1]
  sq, sk = 1 / (1 + np.exp(-q)), 1 / (1 + np.exp(-k))
  out = np.zeros(q.shape[:3] + (v.shape[-1],))
  for b in range(q.shape[0]):
    for n in range(q.shape[2]):
      m = sq[b, :, n] @ sk[b, :, n].T                    # [T, S]
      inc, outg = m.sum(1) + eps, m.sum(0) + eps
      inc_c = (m / outg[None]).sum(1)
      out_c = (m / inc[:, None]).sum(0)
      vc = _np_softmax(out_c, 0)[:, None] * S * v[b, :, n]
      r = (m @ vc) / inc[:, None]
      out[b, :, n] = r / (1 + np.exp(-inc_c * T / S))[:, None]
  return out


def ref_flow_causal(q, k, v, eps=L.DEFAULT_EPS, clamp=1.0):
  """Causal Flow-Attention, float64, one head at a time, sums written out per position."""
  q, k, v = np.asarray(q, np.float64), _rep(k, q.shape[2]), _rep(v, q.shape[2])
  Q, K = 1 / (1 + np.exp(-q)), 1 / (1 + np.exp(-k))
  T = q.shape[1]
  p = np.arange(1, T + 1)
  out = np.zeros(q.shape[:3] + (v.shape[-1],))
  for b in range(q.shape[0]):
    for n in range(q.shape[2]):
      Qn, Kn, Vn = Q[b, :, n], K[b, :, n], v[b, :, n]
      inc = np.array([(Qn[i] + eps) @ (Kn[:i + 1].sum(0) + eps) for i in range(T)])
      outg = np.array([(Kn[j] + eps) @ (Qn[:j + 1].sum(0) + eps) for j in range(T)])
      inc_c = np.array([(Qn[i] + eps) @ ((Kn[:i + 1] * (p[:i + 1] / outg[:i + 1])[:, None]).sum(0)
                                         + eps) / p[i] for i in range(T)])
      out_c = np.array([(Kn[j] + eps) @ ((Qn[:j + 1] * (p[:j + 1] / inc[:j + 1])[:, None]).sum(0)
                                         + eps) / p[j] for j in range(T)])
      e = np.exp(np.clip(out_c, -clamp, clamp))
      comp = p * e / np.cumsum(e)
      flow = np.tril(Qn @ Kn.T)
      out[b, :, n] = (1 / (1 + np.exp(-inc_c)) / inc)[:, None] * (flow @ (comp[:, None] * Vn))
  return out


def test_causal_flow_matches_float64_reference_and_forms_agree():
  q, k, v = _inputs(35, 2, 19, 4, 2, 8, 5)
  q, k = q * 4, k * 4  # spread the sigmoids so that the clamp of Oc is active somewhere
  ref = ref_flow_causal(q, k, v, clamp=0.05)
  make = lambda form: functools.partial(L.flow_attention, causal=True, form=form, chunk_size=4,
                                        clamp=0.05)
  out = assert_forms_agree(make, (q, k, v))  # chunked, recurrent == quadratic, fwd and bwd
  assert_close(out, ref)


def ref_inline(q, k, v, causal):
  q, k, v = np.asarray(q, np.float64), _rep(k, q.shape[2]), _rep(v, q.shape[2])
  s = np.einsum('btnh,bsnh->bnts', q, k)
  T, S = s.shape[-2:]
  allowed = np.tril(np.ones((T, S))) if causal else np.ones((T, S))
  n = allowed.sum(-1, keepdims=True)
  s = s * allowed
  w = (s - s.sum(-1, keepdims=True) / n + 1 / n) * allowed
  return np.einsum('bnts,bsnv->btnv', w, v)


@pytest.mark.parametrize('name', ['efficient', 'flow', 'inline', 'focused'])
def test_noncausal_mechanisms(name):
  q, k, v = _inputs(8, 2, 15, 4, 2, 8, 5, S=22)
  fn = {'efficient': L.efficient_attention, 'flow': L.flow_attention,
        'inline': L.inline_attention,
        'focused': L.focused_linear_attention}[name]
  ref = {'efficient': lambda: ref_efficient(q, k, v), 'flow': lambda: ref_flow(q, k, v),
         'inline': lambda: ref_inline(q, k, v, False),
         'focused': lambda: ref_linear(q, k, v, _np_focus, False)}[name]()
  outs = {}
  for form in ('chunked', 'quadratic'):
    outs[form] = vjp_all(functools.partial(fn, form=form), (q, k, v))
    assert_close(outs[form][0], ref)
  for g, rg in zip(outs['chunked'][1], outs['quadratic'][1]):
    # gradients are compared at the scale of the largest entry (f32 summation order differs)
    assert_close(g, rg, atol=2e-5 * max(1.0, float(jnp.max(jnp.abs(rg)))))


def test_causal_inline_matches_reference():
  q, k, v = _inputs(9, 2, 17, 4, 2, 8, 5)
  ref = ref_inline(q, k, v, True)
  for out in jit_forms(L.inline_attention, L.FORMS, q, k, v, causal=True,
                       chunk_size=5).values():
    assert_close(out, ref)


def test_efficient_attention_rows_are_convex_combinations():
  q, k, _ = _inputs(10, 1, 9, 2, 2, 4, 1, S=12)
  ones = jnp.ones((1, 12, 2, 1))
  assert_close(jax.jit(L.efficient_attention)(q, k, ones), jnp.ones((1, 9, 2, 1)))


def _np_focus(x, p=3.0):
  y = np.maximum(x, 0)
  yp = y ** p
  ny = np.linalg.norm(y, axis=-1, keepdims=True)
  nyp = np.linalg.norm(yp, axis=-1, keepdims=True)
  return yp * np.where(nyp > 0, ny / np.where(nyp > 0, nyp, 1), 0)


def _np_dwc(v, kernel, causal=False, spatial=None):
  v = np.asarray(v, np.float64)
  kernel = np.asarray(kernel, np.float64)
  B, T, K, Hv = v.shape
  out = np.zeros_like(v)
  if spatial is None:
    w = kernel.shape[0]
    for t in range(T):
      for o in range(w):
        src = t - (w - 1) + o if causal else t - w // 2 + o
        if 0 <= src < T:
          out[:, t] += kernel[o] * v[:, src]
    return out
  Hh, Ww = spatial
  kh, kw = kernel.shape[:2]
  vg = v.reshape(B, Hh, Ww, K, Hv)
  og = out.reshape(B, Hh, Ww, K, Hv)
  for y in range(Hh):
    for x in range(Ww):
      for dy in range(kh):
        for dx in range(kw):
          sy, sx = y - kh // 2 + dy, x - kw // 2 + dx
          if 0 <= sy < Hh and 0 <= sx < Ww:
            og[:, y, x] += kernel[dy, dx] * vg[:, sy, sx]
  return og.reshape(B, T, K, Hv)


@pytest.mark.parametrize('causal,spatial', [(False, None), (True, None), (False, (3, 4))])
def test_focused_linear_attention_with_dwc(causal, spatial):
  q, k, v = _inputs(11, 2, 12, 4, 2, 8, 5)
  shape = (3, 5) if spatial is None else (3, 3, 5)
  kern = jax.random.normal(jax.random.PRNGKey(3), shape)
  bias = jax.random.normal(jax.random.PRNGKey(4), (5,))
  ref = ref_linear(q, k, v, _np_focus, causal) + _rep(
      _np_dwc(v, kern, causal, spatial) + np.asarray(bias, np.float64), 4)
  out = jax.jit(lambda q, k, v, w, b: L.focused_linear_attention(
      q, k, v, causal=causal, dwc_kernel=w, dwc_bias=b, spatial_shape=spatial,
      chunk_size=5))(q, k, v, kern, bias)
  assert_close(out, ref)
  # gradients flow to the conv kernel and match the quadratic form
  f = lambda form: (lambda q, k, v, w: L.focused_linear_attention(
      q, k, v, causal=causal, dwc_kernel=w, spatial_shape=spatial, form=form, chunk_size=5))
  _, g1 = vjp_all(f('chunked'), (q, k, v, kern))
  _, g2 = vjp_all(f('quadratic'), (q, k, v, kern))
  for a, b in zip(g1, g2):
    assert_close(a, b)


# --------------------------------------------------------------------------------------
# decay edge cases, stability, causality
# --------------------------------------------------------------------------------------


def test_decay_one_equals_undecayed():
  q, k, v = _inputs(12, 2, 33, 4, 2, 8, 4)
  undecayed = jax.jit(lambda q, k, v: L.linear_attention(
      q, k, v, feature_map='identity', causal=True, normalize=False))(q, k, v)
  for out in jit_forms(L.lightning_attention, L.FORMS, q, k, v, decay=1.0,
                       chunk_size=8).values():
    assert_close(out, undecayed)


@pytest.mark.parametrize('decay', [1e-30, 1e-4])
def test_strong_decay_is_finite_and_local(decay):
  q, k, v = _inputs(13, 1, 40, 2, 1, 8, 4)
  d = jnp.full((2,), decay)
  for form in L.FORMS:
    out, grads = vjp_all(lambda q, k, v, d, form=form: L.lightning_attention(
        q, k, v, decay=d, form=form, chunk_size=16), (q, k, v, d))
    for x in (out,) + tuple(grads):
      assert np.all(np.isfinite(np.asarray(x)))
    if decay == 1e-30:  # only j == i survives: o_i = (q_i . k_i) v_i
      diag = jnp.einsum('btnh,btnh->btn', q, jnp.repeat(k, 2, 2))[..., None] * jnp.repeat(v, 2, 2)
      assert_close(out, diag)


def test_denominator_never_zero():
  q, k, v = _inputs(14, 2, 24, 4, 2, 8, 3)
  q_neg = -jnp.abs(q) - 1.0  # relu(q) == 0: every weight is 0
  for causal in (False, True):
    for form in (('chunked', 'recurrent', 'quadratic') if causal else ('chunked', 'quadratic')):
      f = functools.partial(L.linear_attention, feature_map='relu', causal=causal, form=form,
                            chunk_size=8)
      out, grads = vjp_all(f, (q_neg, k, v))
      np.testing.assert_array_equal(np.asarray(out), 0.0)
      for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
      np.testing.assert_array_equal(np.asarray(grads[2]), 0.0)
  # elu+1 with very negative inputs: phi underflows towards 0, the output stays finite
  out, grads = vjp_all(functools.partial(L.linear_attention, causal=True),
                       (q * 0 - 200.0 + q, k, v))
  for x in (out,) + tuple(grads):
    assert np.all(np.isfinite(np.asarray(x)))


@pytest.mark.parametrize('name', ['linear', 'lightning', 'decayed', 'inline', 'focused', 'flow'])
@pytest.mark.parametrize('form', L.FORMS)
def test_causality_exact(name, form):
  """d out[:, :t] / d (q, k, v)[:, t:] is exactly zero."""
  T, t0 = 23, 11
  q, k, v = _inputs(15, 1, T, 4, 2, 4, 3)
  fn = {'linear': functools.partial(L.linear_attention, causal=True),
        'lightning': functools.partial(L.lightning_attention, decay=DECAY4),
        'decayed': functools.partial(L.decayed_linear_attention, decay=0.8, normalize=True,
                                     feature_map='elu+1'),
        'inline': functools.partial(L.inline_attention, causal=True),
        'focused': functools.partial(L.focused_linear_attention, causal=True),
        'flow': functools.partial(L.flow_attention, causal=True)}[name]
  grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(
      fn(q, k, v, form=form, chunk_size=4)[:, :t0] ** 2), argnums=(0, 1, 2)))(q, k, v)
  for g in grads:
    assert np.all(np.asarray(g[:, t0:]) == 0.0)
    assert np.any(np.asarray(g[:, :t0]) != 0.0)


@pytest.mark.slow
def test_bf16_long_sequence_is_stable():
  T = 16384
  q, k, v = _inputs(16, 1, T, 2, 1, 32, 32)
  ref = L.lightning_attention(q, k, v, decay=jnp.array([0.99, 0.999]), chunk_size=128)
  refn = L.linear_attention(q, k, v, causal=True, chunk_size=128)
  qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
  out = L.lightning_attention(qb, kb, vb, decay=jnp.array([0.99, 0.999]), chunk_size=128)
  outn = L.linear_attention(qb, kb, vb, causal=True, chunk_size=128)
  for o, r in ((out, ref), (outn, refn)):
    assert o.dtype == jnp.bfloat16
    o = np.asarray(o.astype(jnp.float32))
    assert np.all(np.isfinite(o))
    err = np.max(np.abs(o - np.asarray(r))) / np.max(np.abs(np.asarray(r)))
    assert err < 2e-2, err
  grads = jax.grad(lambda q, k, v: jnp.sum(L.linear_attention(
      q, k, v, causal=True, chunk_size=128).astype(jnp.float32)), argnums=(0, 1, 2))(qb, kb, vb)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g.astype(jnp.float32))))


# --------------------------------------------------------------------------------------
# bad arguments
# --------------------------------------------------------------------------------------


def test_bad_arguments_rejected():
  q, k, v = _inputs(17, 1, 8, 4, 2, 4, 3)
  cases = [
      (lambda: L.linear_attention(q[0], k, v), 'q must have rank 4'),
      (lambda: L.linear_attention(q, k[:, :, :, :3], v), 'head dim'),
      (lambda: L.linear_attention(q[:, :, :3], k, v), 'multiple of kv heads'),
      (lambda: L.linear_attention(q, k, v[:, :, :1]), 'v must have shape'),
      (lambda: L.linear_attention(q, k[:, :5], v[:, :5], causal=True), 'S equal'),
      (lambda: L.linear_attention(q, k, v, feature_map='softplus'), 'feature_map'),
      (lambda: L.linear_attention(q, k, v, form='fast'), 'form must be one of'),
      (lambda: L.linear_attention(q, k, v, form='recurrent'), 'needs causal=True'),
      (lambda: L.linear_attention(q, k, v, causal=True, chunk_size=0), 'chunk_size'),
      (lambda: L.linear_attention(q, k, v, causal=True, block_len=0), 'block_len'),
      (lambda: L.lightning_attention(q, k, v, decay=0.9, block_len=2.5), 'block_len'),
      (lambda: L.linear_attention(q, k, v, causal=True, eps=0.0), 'eps'),
      (lambda: L.linear_attention(q, k, v, return_state=True), 'causal=True'),
      (lambda: L.linear_attention(q, k, v, causal=True, state=jnp.zeros(3)), 'pair'),
      (lambda: L.linear_attention(q, k, v, causal=True,
                                  state=(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 4)))),
       r'state\[0\]'),
      (lambda: L.linear_attention(q, k, v, causal=True, implementation='cuda'),
       'implementation'),
      (lambda: L.linear_attention(q, k, v, causal=True, form='recurrent',
                                  implementation='pallas_tpu'), "form='chunked'"),
      (lambda: L.lightning_attention(q, k, v, decay=jnp.ones(3)), r'decay must be a scalar'),
      (lambda: L.lightning_attention(q, k, v, decay=1.5), r'decay must lie in \(0, 1\]'),
      (lambda: L.lightning_attention(q, k, v, decay=0.0), r'decay must lie'),
      (lambda: L.lightning_attention(q, k, v, decay=0.9, state=jnp.zeros((1, 2, 4, 3))),
       'state must have shape'),
      (lambda: L.decayed_linear_attention(q, k, v, log_decay=jnp.ones((1, 8, 4))), '<= 0'),
      (lambda: L.decayed_linear_attention(q, k, v, log_decay=jnp.zeros((1, 8))),
       'log_decay must have shape'),
      (lambda: L.focused_linear_attention(q, k, v, focusing_factor=0.5), 'focusing_factor'),
      (lambda: L.focused_linear_attention(q, k, v, dwc_kernel=jnp.ones((4, 3))), 'odd'),
      (lambda: L.focused_linear_attention(q, k, v, dwc_kernel=jnp.ones((3, 2))), 'dwc_kernel'),
      (lambda: L.focused_linear_attention(q, k, v, dwc_kernel=jnp.ones((3, 3, 3)),
                                          spatial_shape=(3, 3)), 'spatial_shape'),
      (lambda: L.inline_attention(q, k, v, causal=True, state=(1, 2)), 'state of inline'),
      (lambda: L.efficient_attention(q, k, v, form='recurrent'), 'needs causal=True'),
      (lambda: L.flow_attention(q, k, v, eps=-1.0), 'eps'),
      (lambda: L.flow_attention(q, k, v, causal=True, clamp=0.0), 'clamp'),
      (lambda: L.flow_attention(q, k, v, return_state=True), 'causal=True'),
      (lambda: L.flow_attention(q, k, v, causal=True, state=(1, 2)), '7-tuple'),
      (lambda: L.flow_attention(q, k, v[:, :5], causal=True), 'v must have shape'),
  ]
  for fn, msg in cases:
    with pytest.raises(ValueError, match=msg):
      fn()
  with pytest.raises(TypeError, match='floating'):
    L.linear_attention(q, k, v.astype(jnp.int32))
  with pytest.raises(NotImplementedError, match='per-token'):
    L.decayed_linear_attention(q, k, v, log_decay=jnp.zeros((1, 8, 4)),
                               implementation='pallas_tpu')
