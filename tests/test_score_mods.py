"""Tests for attnjax.score_mods against explicit loops, and score mods inside
reference_attention (forward and the gradient w.r.t. learnable tables) against an
explicit NumPy softmax and its hand-derived gradient."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import masks
from attnjax import score_mods as SM


def grids(B, N, T, S):
    return (jnp.arange(B).reshape(B, 1, 1, 1), jnp.arange(N).reshape(1, N, 1, 1),
            jnp.arange(T).reshape(1, 1, T, 1), jnp.arange(S).reshape(1, 1, 1, S))


def apply(mod, score):
    """mod on a [B, N, T, S] score with broadcasting index grids, in one jit."""
    B, N, T, S = score.shape
    out = jax.jit(lambda x: mod(x, *grids(B, N, T, S)))(jnp.asarray(score))
    return np.asarray(jnp.broadcast_to(out, score.shape))


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# ----------------------------------------------------------------------- ALiBi


def test_alibi_slopes_power_of_two():
    np.testing.assert_array_equal(SM.alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)])
    np.testing.assert_array_equal(SM.alibi_slopes(1), [2.0 ** -8])
    np.testing.assert_array_equal(SM.alibi_slopes(2), [2.0 ** -4, 2.0 ** -8])
    np.testing.assert_allclose(SM.alibi_slopes(16), [2.0 ** -(0.5 * (i + 1)) for i in range(16)],
                               rtol=1e-7)
    s = SM.alibi_slopes(8)
    assert s.dtype == np.float32 and s.shape == (8,)


def _paper_slopes(n):
    """The ALiBi paper's recipe: geometric 2^(-8/n) ratio for powers of two; otherwise
    the closest power of two p, then every other slope of the 2p sequence."""
    if math.log2(n).is_integer():
        r = 2.0 ** (-8.0 / n)
        return [r ** (i + 1) for i in range(n)]
    p = 2 ** math.floor(math.log2(n))
    return _paper_slopes(p) + _paper_slopes(2 * p)[0::2][: n - p]


@pytest.mark.parametrize("n", [3, 5, 6, 7, 12, 20])
def test_alibi_slopes_non_power_of_two(n):
    np.testing.assert_allclose(SM.alibi_slopes(n), _paper_slopes(n), rtol=1e-6)


def test_alibi_slopes_twelve_heads_by_hand():
    want = [2.0 ** -k for k in range(1, 9)] + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5]
    np.testing.assert_allclose(SM.alibi_slopes(12), want, rtol=1e-6)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("N,T,S", [(3, 6, 9), (1, 5, 1), (4, 7, 4)])
def test_alibi_matches_loops(N, T, S, symmetric):
    f = jax.jit(lambda s, sl: SM.alibi(sl, symmetric=symmetric)(s, *grids(2, N, T, S)))
    for seed in range(3):
        rng = np.random.default_rng(seed)
        slopes = rng.uniform(0.01, 1.0, N).astype(np.float32)
        score = rand(rng, 2, N, T, S)
        got = np.broadcast_to(f(score, slopes), score.shape)
        want = score.astype(np.float64).copy()
        for b, h, i, j in np.ndindex(2, N, T, S):
            d = -abs(i - j) if symmetric else (j - i)
            want[b, h, i, j] += slopes[h] * d
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------ relative position bias


@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("N,T,S,R", [(3, 7, 10, 2), (2, 9, 5, 0), (1, 6, 6, 12)])
def test_relative_position_bias_1d_matches_loops(N, T, S, R, explicit):
    f = jax.jit(lambda s, t: SM.relative_position_bias(t, max_distance=R if explicit else None)(
        s, *grids(2, N, T, S)))
    for seed in range(3):
        rng = np.random.default_rng(seed)
        table = rand(rng, N, 2 * R + 1)
        score = rand(rng, 2, N, T, S)
        want = score.astype(np.float64).copy()
        for b, h, i, j in np.ndindex(2, N, T, S):
            rel = min(max(j - i, -R), R)
            want[b, h, i, j] += table[h, rel + R]
        np.testing.assert_allclose(np.broadcast_to(f(score, table), score.shape), want,
                                   rtol=1e-6, atol=1e-6)


def _coords(t, shape):
    out = []
    for L in reversed(shape):
        out.append(t % L)
        t //= L
    return tuple(reversed(out))


@pytest.mark.parametrize("shape,max_distance", [
    ((3, 4), None), ((3, 4), 1), ((4, 3), (2, 1)), ((2, 3, 2), None), ((5,), 2), ((2, 2, 3), 1)])
def test_relative_position_bias_grid_matches_loops(shape, max_distance):
    nd = len(shape)
    if max_distance is None:
        R = tuple(L - 1 for L in shape)
    elif isinstance(max_distance, int):
        R = (max_distance,) * nd
    else:
        R = max_distance
    widths = [2 * r + 1 for r in R]
    N, n = 3, math.prod(shape)
    rng = np.random.default_rng(nd)
    table = rand(rng, N, math.prod(widths))
    mod = SM.relative_position_bias(jnp.asarray(table), shape=shape, max_distance=max_distance)
    score = rand(rng, 1, N, n, n)
    want = score.astype(np.float64).copy()
    for h, i, j in np.ndindex(N, n, n):
        ci, cj = _coords(i, shape), _coords(j, shape)
        col = 0
        for a in range(nd):   # row-major over the per-axis clipped offsets
            off = min(max(cj[a] - ci[a], -R[a]), R[a]) + R[a]
            col = col * widths[a] + off
        want[0, h, i, j] += table[h, col]
    np.testing.assert_allclose(apply(mod, score), want, rtol=1e-6, atol=1e-6)


def test_relative_position_bias_swin_table_size():
    # Swin/NAT: an M x M window uses a (2M-1)^2 table with the default max_distance
    M = 4
    table = jnp.zeros((2, (2 * M - 1) ** 2))
    SM.relative_position_bias(table, shape=(M, M))   # accepted
    with pytest.raises(ValueError, match="table"):
        SM.relative_position_bias(jnp.zeros((2, (2 * M) ** 2)), shape=(M, M))


def test_relative_position_bias_numpy_table_under_jit():
    """A NumPy table (a constant) must work inside jit, as a JAX table does."""
    rng = np.random.default_rng(3)
    for table, shape in ((rand(rng, 2, 7), None), (rand(rng, 2, 15), (2, 3))):
        score = rand(rng, 1, 2, 6, 6)
        want = apply(SM.relative_position_bias(jnp.asarray(table), shape=shape), score)
        got = apply(SM.relative_position_bias(table, shape=shape), score)
        np.testing.assert_allclose(got, want, rtol=1e-6)


# -------------------------------------------------- temperature, softcap, compose


@pytest.mark.parametrize("tau", [0.5, 2.0, 3])
def test_temperature(tau):
    score = rand(np.random.default_rng(0), 2, 3, 4, 5)
    np.testing.assert_allclose(apply(SM.temperature(tau), score), score / tau, rtol=1e-6)


@pytest.mark.parametrize("cap", [0.5, 5.0, 30])
def test_softcap(cap):
    score = 10 * rand(np.random.default_rng(1), 2, 3, 4, 5)
    want = cap * np.tanh(score.astype(np.float64) / cap)
    got = apply(SM.softcap(cap), score)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.abs(got).max() <= cap


def test_compose_applies_left_to_right():
    rng = np.random.default_rng(2)
    score = 4 * rand(rng, 1, 2, 5, 5)
    slopes = np.array([0.7, 1.3], np.float32)
    al, cap = SM.alibi(slopes), SM.softcap(1.5)
    i = np.arange(5)
    dist = (i[None, :] - i[:, None]).astype(np.float64)
    alibi_np = lambda s: s + slopes[None, :, None, None] * dist
    cap_np = lambda s: 1.5 * np.tanh(s / 1.5)
    np.testing.assert_allclose(apply(SM.compose(al, cap), score), cap_np(alibi_np(score)),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(apply(SM.compose(cap, al), score), alibi_np(cap_np(score)),
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(apply(SM.compose(al, cap), score), apply(SM.compose(cap, al), score))
    # plain functions compose too, and three in a row
    double = lambda s, b, h, q, kv: 2 * s
    np.testing.assert_allclose(apply(SM.compose(double, SM.temperature(4.0), al), score),
                               alibi_np(score / 2), rtol=1e-5, atol=1e-5)


# ------------------------------------------ inside reference_attention (fwd/bwd)


def np_attention(q, k, v, logits_fn, allowed=None):
    """float64 softmax attention with explicit loops over heads.
    logits_fn(raw [B,N,T,S]) -> modified logits; allowed: bool [T, S] or None.
    Returns (out [B,T,N,Hv], probabilities [B,N,T,S])."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    raw = np.zeros((B, N, T, k.shape[1]))
    for h in range(N):
        raw[:, h] = np.einsum("bth,bsh->bts", q[:, :, h], k[:, :, h // G]) / math.sqrt(H)
    s = logits_fn(raw)
    if allowed is not None:
        s = np.where(allowed, s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - m)
    p /= p.sum(-1, keepdims=True)
    out = np.zeros((B, T, N, v.shape[-1]))
    for h in range(N):
        out[:, :, h] = np.einsum("bts,bsh->bth", p[:, h], v[:, :, h // G])
    return out, p


def _qkv(seed, B=2, T=5, S=7, N=4, K=2, H=8, Hv=6):
    rng = np.random.default_rng(seed)
    return rand(rng, B, T, N, H), rand(rng, B, S, K, H), rand(rng, B, S, K, Hv)


def test_reference_attention_with_score_mod_matches_numpy():
    q, k, v = _qkv(0)
    B, T, N, _ = q.shape
    S = k.shape[1]
    rng = np.random.default_rng(10)
    R = 3
    table = rand(rng, N, 2 * R + 1)
    slopes = SM.alibi_slopes(N)
    mod = SM.compose(SM.relative_position_bias(jnp.asarray(table)), SM.alibi(slopes),
                     SM.temperature(1.5))
    i, j = np.arange(T)[:, None], np.arange(S)[None, :]
    rel = np.clip(j - i, -R, R) + R

    def logits(raw):
        s = raw + table[:, rel][None]                 # [N, T, S] gather of the table
        s = s + slopes[None, :, None, None] * (j - i)
        return s / 1.5

    allowed = j <= i + 2
    want, _ = np_attention(q, k, v, logits, allowed)
    got = jax.jit(lambda q, k, v: attnjax.reference_attention(
        q, k, v, score_mod=mod, mask=masks.causal(2)))(q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _np_table_grad(q, k, v, table, dout, R):
    """Explicit gradient of sum(out * dout) w.r.t. a 1D relative-position table:
    dL/ds_ij = p_ij (dout_i . v_j - sum_l p_il dout_i . v_l); dL/dtable[h, r] is the
    sum of dL/ds over the (b, i, j) with clip(j - i) + R == r."""
    B, T, N, _ = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    i, j = np.arange(T)[:, None], np.arange(S)[None, :]
    rel = np.clip(j - i, -R, R) + R
    _, p = np_attention(q, k, v, lambda raw: raw + table[:, rel][None].astype(np.float64))
    grad = np.zeros(table.shape)
    for b in range(B):
        for h in range(N):
            dp = np.asarray(dout[b, :, h], np.float64) @ np.asarray(v[b, :, h // G], np.float64).T
            ds = p[b, h] * (dp - (p[b, h] * dp).sum(-1, keepdims=True))
            for ii in range(T):
                for jj in range(S):
                    grad[h, rel[ii, jj]] += ds[ii, jj]
    return grad


@pytest.mark.parametrize("seed", [0, 1])
def test_relative_position_table_gradient_matches_numpy(seed):
    q, k, v = _qkv(seed, T=6, S=9)
    rng = np.random.default_rng(100 + seed)
    R = 4
    table = rand(rng, q.shape[2], 2 * R + 1)
    dout = rand(rng, q.shape[0], q.shape[1], q.shape[2], v.shape[-1])

    def loss(t):
        out = attnjax.reference_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                          score_mod=SM.relative_position_bias(t))
        return jnp.sum(out * dout)

    got = jax.jit(jax.grad(loss))(jnp.asarray(table))
    want = _np_table_grad(q, k, v, table, dout, R)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    assert np.abs(want).max() > 1e-2          # a real signal, not zeros


def test_relative_position_table_gradient_finite_differences():
    q, k, v = _qkv(3, B=1, T=4, S=5, N=2, K=1)
    rng = np.random.default_rng(7)
    table = rand(rng, 2, 5)
    dout = rand(rng, 1, 4, 2, v.shape[-1])

    def loss(t):
        out = attnjax.reference_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                          score_mod=SM.relative_position_bias(t))
        return jnp.sum(out * dout)

    g = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(table)))
    loss = jax.jit(loss)
    eps = 1e-2
    for idx in np.ndindex(*table.shape):
        tp, tm = table.copy(), table.copy()
        tp[idx] += eps
        tm[idx] -= eps
        fd = (float(loss(jnp.asarray(tp))) - float(loss(jnp.asarray(tm)))) / (2 * eps)
        np.testing.assert_allclose(g[idx], fd, rtol=2e-3, atol=2e-3)


def test_alibi_slopes_gradient_matches_numpy():
    """d/dslope_h of sum(out * dout) = sum_ij dL/ds_ij (j - i) for head h."""
    q, k, v = _qkv(4, T=5, S=5)
    N = q.shape[2]
    G = N // k.shape[2]
    rng = np.random.default_rng(11)
    slopes = rng.uniform(0.1, 0.9, N).astype(np.float32)
    dout = rand(rng, *q.shape[:3], v.shape[-1])

    def loss(sl):
        out = attnjax.reference_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                          score_mod=SM.alibi(sl))
        return jnp.sum(out * dout)

    got = jax.jit(jax.grad(loss))(jnp.asarray(slopes))
    i, j = np.arange(5)[:, None], np.arange(5)[None, :]
    _, p = np_attention(q, k, v, lambda raw: raw + slopes[None, :, None, None] * (j - i))
    want = np.zeros(N)
    for b in range(q.shape[0]):
        for h in range(N):
            dp = dout[b, :, h].astype(np.float64) @ v[b, :, h // G].astype(np.float64).T
            ds = p[b, h] * (dp - (p[b, h] * dp).sum(-1, keepdims=True))
            want[h] += (ds * (j - i)).sum()
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.slow   # ~10 s of compilation; test_attention.py covers every implementation
def test_table_gradient_same_in_xla_chunked():
    """xla_chunked has its own custom_vjp: the closed-over table still gets its gradient."""
    implementation = "xla_chunked"
    q, k, v = _qkv(5, T=12, S=12)
    rng = np.random.default_rng(12)
    table = jnp.asarray(rand(rng, q.shape[2], 9))
    dout = rand(rng, *q.shape[:3], v.shape[-1])

    def loss(t, impl):
        out = attnjax.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                score_mod=SM.relative_position_bias(t), mask=masks.causal(),
                                implementation=impl,
                                block_sizes=(attnjax.ChunkedBlockSizes(4, 4)
                                             if impl == "xla_chunked" else None))
        return jnp.sum(out * dout)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    want = grad(table, "reference")
    got = grad(table, implementation)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
