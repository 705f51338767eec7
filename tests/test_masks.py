"""Tests for attnjax.masks: every constructor against a brute-force NumPy predicate,
and block tables against the tile classification of the dense mask.

The expectations here are built with plain Python loops over coordinates (or, for
Swin and MaxViT, by literally rolling / reshaping a grid of token ids the way those
papers' code does), never with the library's own predicates.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnjax import masks as M

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
FEW = settings(max_examples=8, deadline=None, derandomize=True)


def dense(m, T, S, num_heads=1, batch=1):
    a = np.asarray(m.to_array(T, S, num_heads, batch))
    assert a.shape == (batch, num_heads, T, S)
    assert a.dtype == np.bool_
    return a


def pairwise(T, S, pred):
    """[T, S] bool array from a Python predicate pred(i, j)."""
    out = np.zeros((T, S), bool)
    for i in range(T):
        for j in range(S):
            out[i, j] = bool(pred(i, j))
    return out


def assert_mask_equal(got, want):
    got = np.asarray(got)
    want = np.broadcast_to(np.asarray(want), got.shape)
    bad = np.argwhere(got != want)
    assert bad.size == 0, f"{len(bad)} mismatches, first at {bad[:5].tolist()}"


def run(use_jax, f):
    """f() eagerly (NumPy masks), or under one jax.jit for masks holding JAX arrays
    (one compilation instead of op-by-op dispatch); checks the array type."""
    out = jax.jit(f)() if use_jax else f()
    for leaf in jax.tree_util.tree_leaves(out):
        assert isinstance(leaf, jax.Array if use_jax else np.ndarray), type(leaf)
    return out


# --------------------------------------------------------------------- 1D masks


def test_constants_are_documented_values():
    assert (M.EMPTY, M.PARTIAL, M.FULL) == (0, 1, 2)


@SETTINGS
@given(T=st.integers(1, 40), S=st.integers(1, 40))
def test_full(T, S):
    assert_mask_equal(dense(M.full(), T, S), np.ones((T, S), bool))


@SETTINGS
@given(T=st.integers(1, 40), S=st.integers(1, 40), offset=st.integers(-45, 45))
def test_causal_with_offset(T, S, offset):
    want = pairwise(T, S, lambda i, j: j <= i + offset)
    assert_mask_equal(dense(M.causal(offset), T, S), want)


def test_causal_decoding_offset_aligns_last_query_with_last_key():
    # 3 new queries against a cache of 7 keys: query t sees keys 0..4+t.
    got = dense(M.causal(7 - 3), 3, 7)[0, 0]
    assert got.sum(axis=1).tolist() == [5, 6, 7]
    assert got[-1].all()


@SETTINGS
@given(T=st.integers(1, 40), S=st.integers(1, 40), left=st.integers(0, 20),
       right=st.integers(0, 20))
def test_sliding_window(T, S, left, right):
    want = pairwise(T, S, lambda i, j: i - left <= j <= i + right)
    assert_mask_equal(dense(M.sliding_window(left, right), T, S), want)


def test_sliding_window_default_right_is_causal():
    want = pairwise(9, 9, lambda i, j: i - 2 <= j <= i)
    assert_mask_equal(dense(M.sliding_window(2), 9, 9), want)


@SETTINGS
@given(T=st.integers(1, 40), S=st.integers(1, 40), size=st.integers(1, 45))
def test_chunked(T, S, size):
    def chunk_id(x):
        # chunk of position x: the c with c*size <= x < (c+1)*size, found by walking
        c = 0
        while (c + 1) * size <= x:
            c += 1
        return c
    want = pairwise(T, S, lambda i, j: chunk_id(i) == chunk_id(j))
    assert_mask_equal(dense(M.chunked(size), T, S), want)


@SETTINGS
@given(T=st.integers(1, 40), S=st.integers(1, 40), prefix=st.integers(0, 45))
def test_prefix_lm(T, S, prefix):
    want = pairwise(T, S, lambda i, j: j < prefix or j <= i)
    assert_mask_equal(dense(M.prefix_lm(prefix), T, S), want)


@SETTINGS
@given(N=st.integers(1, 7), T=st.integers(1, 24), S=st.integers(1, 24))
def test_dual_triangle_even_and_odd_heads(N, T, S):
    got = dense(M.dual_triangle(), T, S, num_heads=N, batch=2)
    for h in range(N):
        past = 2 * h < N
        want = pairwise(T, S, (lambda i, j: j <= i) if past else (lambda i, j: j >= i))
        assert_mask_equal(got[:, h], want)


def test_dual_triangle_head_split_counts():
    for N, n_past in ((1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (8, 4)):
        got = dense(M.dual_triangle(), 4, 4, num_heads=N)[0]
        is_causal = [bool(np.array_equal(got[h], np.tril(np.ones((4, 4), bool))))
                     for h in range(N)]
        assert sum(is_causal) == n_past, (N, is_causal)
        assert is_causal == sorted(is_causal, reverse=True)


def _segments(rng, B, L, num_docs, pad_id=None, pad_len=0):
    """Sorted packed document ids with an optional padding tail of pad_id."""
    out = np.zeros((B, L), np.int32)
    for b in range(B):
        cuts = np.sort(rng.integers(0, L + 1, size=num_docs - 1))
        ids = np.searchsorted(cuts, np.arange(L), side="right")
        out[b] = ids + 1
        if pad_id is not None and pad_len:
            out[b, L - pad_len:] = pad_id
    return out


def _check_document(B, T, S, seed, use_jax):
    rng = np.random.default_rng(seed)
    qs = _segments(rng, B, T, 3, pad_id=0, pad_len=int(rng.integers(0, T + 1)))
    ks = _segments(rng, B, S, 3, pad_id=-1, pad_len=int(rng.integers(0, S + 1)))
    mk = (lambda a: jnp.asarray(a)) if use_jax else (lambda a: a)
    m = M.document(mk(qs), mk(ks))
    assert m.data_dependent == use_jax
    got = np.asarray(run(use_jax, lambda: m.to_array(T, S, 2, B)))
    for b in range(B):
        want = pairwise(T, S, lambda i, j, b=b: qs[b, i] == ks[b, j])
        for h in range(2):
            assert_mask_equal(got[b, h], want)


@SETTINGS
@given(B=st.integers(1, 3), T=st.integers(1, 24), S=st.integers(1, 24),
       seed=st.integers(0, 10_000))
def test_document_with_padding_and_t_neq_s(B, T, S, seed):
    _check_document(B, T, S, seed, use_jax=False)


@pytest.mark.parametrize("B,T,S,seed", [(1, 9, 13, 0), (2, 16, 16, 1), (3, 20, 7, 2)])
def test_document_jax_ids(B, T, S, seed):
    _check_document(B, T, S, seed, use_jax=True)


def test_document_defaults_kv_to_q_ids():
    ids = np.array([[1, 1, 2, 2, 2, 0], [3, 3, 3, 3, 4, 4]], np.int32)
    got = dense(M.document(ids), 6, 6, batch=2)
    for b in range(2):
        assert_mask_equal(got[b, 0], pairwise(6, 6, lambda i, j, b=b: ids[b, i] == ids[b, j]))


# ----------------------------------------------------------------- grid masks


def _coord(flat, shape):
    """Row-major coordinates of a flat token index, by repeated division."""
    out = []
    for L in reversed(shape):
        out.append(flat % L)
        flat //= L
    return tuple(reversed(out))


def _natten_axis_keys(L, k, d, causal, i):
    """Key positions visible from position i on one axis (NATTEN semantics):
    among the positions with i's residue mod d, a window of k clamped to the group."""
    group = [x for x in range(L) if x % d == i % d]
    idx = group.index(i)
    if causal:
        return set(group[max(idx - k + 1, 0): idx + 1])
    start = min(max(idx - k // 2, 0), len(group) - k)
    assert start >= 0
    return set(group[start: start + k])


def ref_neighborhood(shape, kernel, dilation, causal):
    n = math.prod(shape)
    out = np.zeros((n, n), bool)
    for qi in range(n):
        cq = _coord(qi, shape)
        allowed = [_natten_axis_keys(L, k, d, c, x)
                   for L, k, d, c, x in zip(shape, kernel, dilation, causal, cq)]
        for ki in range(n):
            ck = _coord(ki, shape)
            out[qi, ki] = all(y in a for y, a in zip(ck, allowed))
    return out


@st.composite
def neighborhood_params(draw):
    nd = draw(st.integers(1, 3))
    max_len = {1: 40, 2: 7, 3: 4}[nd]
    shape = tuple(draw(st.integers(1, max_len)) for _ in range(nd))
    kernel, dilation = [], []
    for L in shape:
        k = draw(st.integers(1, L))
        kernel.append(k)
        dilation.append(draw(st.integers(1, L // k)))
    causal = tuple(draw(st.booleans()) for _ in range(nd))
    return shape, tuple(kernel), tuple(dilation), causal


@SETTINGS
@given(params=neighborhood_params())
def test_neighborhood_per_axis_tuples(params):
    shape, kernel, dilation, causal = params
    m = M.neighborhood(shape, kernel, dilation, causal)
    n = math.prod(shape)
    got = dense(m, n, n)[0, 0]
    assert_mask_equal(got, ref_neighborhood(shape, kernel, dilation, causal))


@SETTINGS
@given(params=neighborhood_params())
def test_neighborhood_noncausal_sees_exactly_prod_kernel_keys(params):
    shape, kernel, dilation, _ = params
    m = M.neighborhood(shape, kernel, dilation)          # causal=False default
    n = math.prod(shape)
    got = dense(m, n, n)[0, 0]
    assert (got.sum(axis=1) == math.prod(kernel)).all()
    assert got[np.arange(n), np.arange(n)].all()         # every query sees itself


@pytest.mark.parametrize("shape,kernel,dilation", [
    (10, 3, 1), (10, 3, 3), (9, 4, 2), ((5, 6), 3, 1), ((6, 6), (3, 5), (2, 1)),
    ((4, 4, 4), 3, 1), ((4, 3, 4), (1, 3, 2), (3, 1, 2)),
])
@pytest.mark.parametrize("causal", [False, True])
def test_neighborhood_int_and_tuple_arguments(shape, kernel, dilation, causal):
    nd = 1 if isinstance(shape, int) else len(shape)
    tup = lambda x: (x,) * nd if isinstance(x, int) else tuple(x)
    shp, ker, dil = tup(shape), tup(kernel), tup(dilation)
    m = M.neighborhood(shape, kernel, dilation, causal=causal)
    n = math.prod(shp)
    assert_mask_equal(dense(m, n, n)[0, 0], ref_neighborhood(shp, ker, dil, (causal,) * nd))


def test_neighborhood_border_clamping_hand_checked():
    # L=7, k=3: the window is shifted inward at both borders.
    got = dense(M.neighborhood(7, 3), 7, 7)[0, 0]
    assert np.flatnonzero(got[0]).tolist() == [0, 1, 2]
    assert np.flatnonzero(got[3]).tolist() == [2, 3, 4]
    assert np.flatnonzero(got[6]).tolist() == [4, 5, 6]
    # L=10, k=3, d=3: residue 0 has 4 positions {0,3,6,9}, residues 1,2 have 3.
    got = dense(M.neighborhood(10, 3, 3), 10, 10)[0, 0]
    assert np.flatnonzero(got[0]).tolist() == [0, 3, 6]
    assert np.flatnonzero(got[9]).tolist() == [3, 6, 9]
    assert np.flatnonzero(got[8]).tolist() == [2, 5, 8]
    assert np.flatnonzero(got[4]).tolist() == [1, 4, 7]
    # causal: position 1 sees only {0, 1}
    got = dense(M.neighborhood(7, 3, causal=True), 7, 7)[0, 0]
    assert np.flatnonzero(got[1]).tolist() == [0, 1]
    assert np.flatnonzero(got[5]).tolist() == [3, 4, 5]


def ref_swin(shape, win, shift):
    """Swin's shifted-window mask done literally: roll a grid of token ids by -shift,
    label regions with the slices (0,-w), (-w,-s), (-s,None) on the rolled grid,
    partition into windows, and map pairs back to original token order."""
    nd = len(shape)
    n = math.prod(shape)
    tokens = np.arange(n).reshape(shape)
    rolled = np.roll(tokens, shift=tuple(-s for s in shift), axis=tuple(range(nd)))
    labels = np.zeros(shape, np.int64)
    per_axis = [(slice(0, -w), slice(-w, -s), slice(-s, None)) for w, s in zip(win, shift)]
    for cnt, sl in enumerate(itertools.product(*per_axis)):
        labels[sl] = cnt
    out = np.zeros((n, n), bool)
    positions = list(np.ndindex(*shape))
    for p in positions:
        for p2 in positions:
            same_window = all(a // w == b // w for a, b, w in zip(p, p2, win))
            if same_window and labels[p] == labels[p2]:
                out[rolled[p], rolled[p2]] = True
    return out


@st.composite
def window_params(draw):
    nd = draw(st.integers(1, 3))
    max_len = {1: 48, 2: 8, 3: 4}[nd]
    shape, win, shift = [], [], []
    for _ in range(nd):
        w = draw(st.integers(1, max_len))
        L = w * draw(st.integers(1, max_len // w))
        shape.append(L)
        win.append(w)
        shift.append(draw(st.integers(0, w - 1)))
    return tuple(shape), tuple(win), tuple(shift)


@SETTINGS
@given(params=window_params())
def test_window_swin_shift_matches_literal_roll_and_slices(params):
    shape, win, shift = params
    n = math.prod(shape)
    got = dense(M.window(shape, win, shift), n, n)[0, 0]
    assert_mask_equal(got, ref_swin(shape, win, shift))


@pytest.mark.parametrize("shape,win,shift", [
    ((8, 8), 4, 2), ((8, 8), 4, 0), ((6, 8), (3, 4), (1, 2)), (12, 4, 3), ((4, 4, 4), 2, 1)])
def test_window_int_and_tuple_arguments(shape, win, shift):
    nd = 1 if isinstance(shape, int) else len(shape)
    tup = lambda x: (x,) * nd if isinstance(x, int) else tuple(x)
    shp = tup(shape)
    n = math.prod(shp)
    got = dense(M.window(shape, win, shift), n, n)[0, 0]
    assert_mask_equal(got, ref_swin(shp, tup(win), tup(shift)))


def test_window_without_shift_is_block_partition():
    got = dense(M.window((4, 4), 2), 16, 16)[0, 0]
    assert (got.sum(1) == 4).all()
    # token 0 (0,0) sees (0,1), (1,0), (1,1) = flat 1, 4, 5
    assert np.flatnonzero(got[0]).tolist() == [0, 1, 4, 5]


def ref_maxvit_grid(shape, g):
    """MaxViT grid partition done literally: reshape to (G, L/G) per axis, move the
    L/G axes first; each entry of those axes is one group of prod(G) tokens."""
    nd = len(shape)
    tokens = np.arange(math.prod(shape)).reshape(
        tuple(itertools.chain.from_iterable((G, L // G) for L, G in zip(shape, g))))
    order = [2 * a + 1 for a in range(nd)] + [2 * a for a in range(nd)]
    groups = tokens.transpose(order).reshape(-1, math.prod(g))
    n = math.prod(shape)
    out = np.zeros((n, n), bool)
    for grp in groups:
        for a in grp:
            for b in grp:
                out[a, b] = True
    return out


@st.composite
def grid_params(draw):
    nd = draw(st.integers(1, 3))
    max_len = {1: 48, 2: 8, 3: 4}[nd]
    shape, g = [], []
    for _ in range(nd):
        G = draw(st.integers(1, max_len))
        shape.append(G * draw(st.integers(1, max_len // G)))
        g.append(G)
    return tuple(shape), tuple(g)


@SETTINGS
@given(params=grid_params())
def test_grid_matches_maxvit_reshape(params):
    shape, g = params
    n = math.prod(shape)
    got = dense(M.grid(shape, g), n, n)[0, 0]
    assert_mask_equal(got, ref_maxvit_grid(shape, g))
    assert (got.sum(1) == math.prod(g)).all()


def test_grid_int_argument():
    got = dense(M.grid((8, 6), 2), 48, 48)[0, 0]
    assert_mask_equal(got, ref_maxvit_grid((8, 6), (2, 2)))


@st.composite
def grid_shape(draw, min_nd=1, max_nd=3):
    nd = draw(st.integers(min_nd, max_nd))
    max_len = {1: 40, 2: 7, 3: 4}[nd]
    return tuple(draw(st.integers(1, max_len)) for _ in range(nd))


@SETTINGS
@given(shape=grid_shape(), data=st.data())
def test_axial(shape, data):
    nd = len(shape)
    axis = data.draw(st.integers(-nd, nd - 1))
    ax = axis % nd
    n = math.prod(shape)
    want = pairwise(n, n, lambda i, j: all(
        a == b for t, (a, b) in enumerate(zip(_coord(i, shape), _coord(j, shape))) if t != ax))
    assert_mask_equal(dense(M.axial(shape, axis), n, n)[0, 0], want)


@SETTINGS
@given(shape=grid_shape(2, 2))
def test_criss_cross(shape):
    n = math.prod(shape)
    want = pairwise(n, n, lambda i, j: _coord(i, shape)[0] == _coord(j, shape)[0]
                    or _coord(i, shape)[1] == _coord(j, shape)[1])
    got = dense(M.criss_cross(shape), n, n)[0, 0]
    assert_mask_equal(got, want)
    assert (got.sum(1) == shape[0] + shape[1] - 1).all()


# ------------------------------------------------------------- generic masks


@st.composite
def broadcast_array(draw):
    B, N, T, S = (draw(st.integers(1, 3)), draw(st.integers(1, 3)),
                  draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    rank = draw(st.integers(2, 4))
    full_shape = (B, N, T, S)[4 - rank:]
    shape = tuple(d if draw(st.booleans()) else 1 for d in full_shape)
    seed = draw(st.integers(0, 10_000))
    arr = np.random.default_rng(seed).random(shape) < 0.5
    return arr, (B, N, T, S)


def _check_from_array(arr, B, N, T, S, use_jax):
    m = M.from_array(jnp.asarray(arr) if use_jax else arr)
    assert m.data_dependent == use_jax
    got = run(use_jax, lambda: m.to_array(T, S, N, B))
    arr4 = arr.reshape((1,) * (4 - arr.ndim) + arr.shape)
    got = np.asarray(got)
    for b, h, i, j in np.ndindex(B, N, T, S):
        bi = b if arr4.shape[0] > 1 else 0
        hi = h if arr4.shape[1] > 1 else 0
        ii = i if arr4.shape[2] > 1 else 0
        ji = j if arr4.shape[3] > 1 else 0
        assert got[b, h, i, j] == arr4[bi, hi, ii, ji], (b, h, i, j)


@SETTINGS
@given(case=broadcast_array())
def test_from_array_rank_2_3_4_broadcasting(case):
    arr, (B, N, T, S) = case
    _check_from_array(arr, B, N, T, S, use_jax=False)


@pytest.mark.parametrize("shape,BNTS", [
    ((5, 7), (2, 3, 5, 7)), ((3, 1, 7), (2, 3, 1, 7)), ((2, 1, 5, 1), (2, 2, 5, 4)),
    ((2, 3, 4, 6), (2, 3, 4, 6))])
def test_from_array_jax_arrays(shape, BNTS):
    arr = np.random.default_rng(len(shape)).random(shape) < 0.5
    _check_from_array(arr, *BNTS, use_jax=True)


def test_from_fn_head_and_batch_dependent():
    fn = lambda b, h, q, kv: ((q * 3 + kv * 5 + h + 2 * b) % 4) != 0
    m = M.from_fn(fn, name="mod4")
    assert m.name == "mod4"
    got = dense(m, 9, 11, num_heads=3, batch=2)
    for b, h in np.ndindex(2, 3):
        want = pairwise(9, 11, lambda i, j, b=b, h=h: (i * 3 + j * 5 + h + 2 * b) % 4 != 0)
        assert_mask_equal(got[b, h], want)


def test_from_fn_closing_over_jax_array_is_data_dependent():
    thr = jnp.asarray(3)
    m = M.from_fn(lambda b, h, q, kv: kv <= q + thr)
    assert m.data_dependent
    got = m.to_array(6, 8)
    assert isinstance(got, jax.Array)
    assert_mask_equal(got[0, 0], pairwise(6, 8, lambda i, j: j <= i + 3))


def _check_from_block_mask(bq, bk, nq, nk, lead, seed, use_jax):
    rng = np.random.default_rng(seed)
    bm = rng.random(lead + (nq, nk)) < 0.5
    m = M.from_block_mask(jnp.asarray(bm) if use_jax else bm, bq, bk)
    bm4 = bm.reshape((1,) * (4 - bm.ndim) + bm.shape)
    B, N = 2, 3
    T, S = nq * bq, nk * bk
    got, tab = run(use_jax, lambda: (m.to_array(T, S, N, B),
                                     m.block_table(T, S, bq, bk, num_heads=N, batch=B)))
    got = np.asarray(got)
    for b, h, i, j in np.ndindex(B, N, T, S):
        want = bm4[b if bm4.shape[0] > 1 else 0, h if bm4.shape[1] > 1 else 0, i // bq, j // bk]
        assert got[b, h, i, j] == want
    # the table at its own block sizes is exactly the block mask
    assert_mask_equal(np.asarray(tab), np.where(bm4, M.FULL, M.EMPTY))


@SETTINGS
@given(bq=st.integers(1, 5), bk=st.integers(1, 5), nq=st.integers(1, 5), nk=st.integers(1, 5),
       lead=st.sampled_from([(), (3,), (1, 3), (2, 1), (2, 3)]), seed=st.integers(0, 1000))
def test_from_block_mask(bq, bk, nq, nk, lead, seed):
    _check_from_block_mask(bq, bk, nq, nk, lead, seed, use_jax=False)


@pytest.mark.parametrize("args", [(2, 3, 4, 3, (), 0), (3, 2, 2, 5, (2, 3), 1),
                                  (1, 4, 5, 2, (3,), 2)])
def test_from_block_mask_jax(args):
    _check_from_block_mask(*args, use_jax=True)


# ---------------------------------------------------------------- composition

LEAVES_1D = [
    ("causal", lambda: M.causal(), lambda i, j: j <= i),
    ("causal(-3)", lambda: M.causal(-3), lambda i, j: j <= i - 3),
    ("causal(5)", lambda: M.causal(5), lambda i, j: j <= i + 5),
    ("window(4,2)", lambda: M.sliding_window(4, 2), lambda i, j: i - 4 <= j <= i + 2),
    ("chunked(5)", lambda: M.chunked(5), lambda i, j: i // 5 == j // 5),
    ("prefix(6)", lambda: M.prefix_lm(6), lambda i, j: j < 6 or j <= i),
    ("full", lambda: M.full(), lambda i, j: True),
    ("fn", lambda: M.from_fn(lambda b, h, q, kv: (q + kv) % 3 == 0),
     lambda i, j: (i + j) % 3 == 0),
]


@st.composite
def mask_tree(draw, depth=3):
    """A random composite (Mask, python predicate, description)."""
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        name, make, pred = draw(st.sampled_from(LEAVES_1D))
        return make(), pred, name
    op = draw(st.sampled_from(["and", "or", "not"]))
    a = draw(mask_tree(depth=depth - 1))
    if op == "not":
        return ~a[0], (lambda i, j, p=a[1]: not p(i, j)), f"~{a[2]}"
    b = draw(mask_tree(depth=depth - 1))
    if op == "and":
        return a[0] & b[0], (lambda i, j, p=a[1], q=b[1]: p(i, j) and q(i, j)), f"({a[2]}&{b[2]})"
    return a[0] | b[0], (lambda i, j, p=a[1], q=b[1]: p(i, j) or q(i, j)), f"({a[2]}|{b[2]})"


@SETTINGS
@given(tree=mask_tree(), T=st.integers(1, 30), S=st.integers(1, 30))
def test_composition_and_or_not_nested(tree, T, S):
    m, pred, desc = tree
    assert_mask_equal(dense(m, T, S), pairwise(T, S, pred))


def test_composition_with_head_dependent_and_grid_masks():
    m = (M.dual_triangle() & M.sliding_window(2, 2)) | ~M.neighborhood((3, 4), 3)
    n = 12
    got = dense(m, n, n, num_heads=3)
    nb = ref_neighborhood((3, 4), (3, 3), (1, 1), (False, False))
    for h in range(3):
        tri = (lambda i, j: j <= i) if 2 * h < 3 else (lambda i, j: j >= i)
        want = pairwise(n, n, lambda i, j, tri=tri: (tri(i, j) and i - 2 <= j <= i + 2)
                        or not nb[i, j])
        assert_mask_equal(got[0, h], want)


def test_composition_with_boolean_array_operand():
    arr = np.random.default_rng(0).random((7, 7)) < 0.5
    m = M.causal() & arr
    assert_mask_equal(dense(m, 7, 7)[0, 0], arr & np.tril(np.ones((7, 7), bool)))


# -------------------------------------------------------------------- shifted

SHIFTABLE = [
    ("causal(2)", lambda: M.causal(2), 40, 40),
    ("window", lambda: M.sliding_window(3, 1), 40, 40),
    ("prefix", lambda: M.prefix_lm(7), 40, 40),
    ("chunked&causal", lambda: M.chunked(6) & M.causal(), 40, 40),
    ("neighborhood2d", lambda: M.neighborhood((6, 6), 3, 1), 36, 36),
    ("swin", lambda: M.window((4, 8), 4, 2), 32, 32),
    ("dual", lambda: M.dual_triangle(), 30, 30),
]


@SETTINGS
@given(case=st.sampled_from(SHIFTABLE), data=st.data())
def test_shifted_static_offsets(case, data):
    name, make, T, S = case
    qo = data.draw(st.integers(0, T - 1))
    ko = data.draw(st.integers(0, S - 1))
    tq = data.draw(st.integers(1, T - qo))
    tk = data.draw(st.integers(1, S - ko))
    big = dense(make(), T, S, num_heads=2)
    sm = make().shifted(qo, ko)
    sub = dense(sm, tq, tk, num_heads=2)
    assert_mask_equal(sub, big[:, :, qo:qo + tq, ko:ko + tk])
    bq, bk = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))
    check_table(sm.block_table(tq, tk, bq, bk, num_heads=2), sub, bq, bk, exact=True)


@pytest.mark.parametrize("case", SHIFTABLE[:5], ids=[c[0] for c in SHIFTABLE[:5]])
def test_shifted_traced_offsets_under_jit(case):
    name, make, T, S = case
    big = dense(make(), T, S)
    tq, tk = 8, 12

    @jax.jit
    def f(qo, ko):
        sm = make().shifted(qo, ko)
        assert sm.data_dependent
        return sm.to_array(tq, tk), sm.block_table(tq, tk, 4, 4)

    for qo, ko in ((0, 0), (9, 3), (T - tq, S - tk), (5, 20)):
        arr, tab = f(jnp.int32(qo), jnp.int32(ko))
        assert_mask_equal(arr, big[:, :, qo:qo + tq, ko:ko + tk])
        assert_mask_equal(tab, tile_classes(big[:, :, qo:qo + tq, ko:ko + tk], 4, 4))


@pytest.mark.parametrize("make", [
    lambda: M.causal(), lambda: M.neighborhood((4, 5), 3, causal=(True, False)),
    lambda: M.window((4, 5), (2, 5), (1, 2)), lambda: M.grid((4, 5), (2, 5)),
    lambda: M.criss_cross((4, 5)),
    lambda: M.dual_triangle() | M.chunked(3),
    lambda: M.from_array(np.random.default_rng(1).random((2, 1, 20, 20)) < 0.5),
    lambda: M.document(np.random.default_rng(2).integers(0, 3, (2, 20)).astype(np.int32)),
    lambda: M.from_block_mask(np.random.default_rng(3).random((5, 4)) < 0.5, 4, 5),
], ids=["causal", "neighborhood", "window", "grid", "criss_cross", "dual|chunked",
        "from_array_np", "document_np", "from_block_mask_np"])
def test_predicate_works_on_traced_indices(make):
    """The mask_fn must accept traced index arrays (as inside jit / the chunked path),
    including masks that close over NumPy arrays."""
    m = make()
    want = dense(m, 20, 20, num_heads=4, batch=2)
    b = np.arange(2).reshape(-1, 1, 1, 1)
    h = np.arange(4).reshape(1, -1, 1, 1)

    @jax.jit
    def f(q, kv):
        return m(b, h, q.reshape(1, 1, -1, 1), kv.reshape(1, 1, 1, -1), num_heads=4, batch=2)

    got = np.broadcast_to(np.asarray(f(jnp.arange(20), jnp.arange(20))), want.shape)
    assert_mask_equal(got, want)


# ---------------------------------------------------------------- block tables


def tile_classes(arr, bq, bk):
    """EMPTY/PARTIAL/FULL per tile of a dense [B, N, T, S] mask; padding is ignored
    (it counts as allowed for FULL and as disallowed for non-EMPTY)."""
    arr = np.asarray(arr)
    B, N, T, S = arr.shape
    nq, nk = -(-T // bq), -(-S // bk)
    pad = ((0, 0), (0, 0), (0, nq * bq - T), (0, nk * bk - S))
    any_ = np.pad(arr, pad, constant_values=False).reshape(B, N, nq, bq, nk, bk).any((3, 5))
    all_ = np.pad(arr, pad, constant_values=True).reshape(B, N, nq, bq, nk, bk).all((3, 5))
    return np.where(all_, M.FULL, np.where(any_, M.PARTIAL, M.EMPTY)).astype(np.int8)


def check_table(tab, arr, bq, bk, *, exact):
    B, N, T, S = arr.shape
    nq, nk = -(-T // bq), -(-S // bk)
    assert tab.ndim == 4 and tab.shape[2:] == (nq, nk), tab.shape
    assert tab.shape[0] in (1, B) and tab.shape[1] in (1, N), tab.shape
    tab = np.broadcast_to(np.asarray(tab), (B, N, nq, nk))
    want = tile_classes(arr, bq, bk)
    # soundness: never EMPTY with an allowed element, never FULL with a disallowed one
    assert not ((tab == M.EMPTY) & (want != M.EMPTY)).any(), "EMPTY tile has allowed keys"
    assert not ((tab == M.FULL) & (want != M.FULL)).any(), "FULL tile has masked keys"
    assert set(np.unique(tab).tolist()) <= {M.EMPTY, M.PARTIAL, M.FULL}
    if exact:
        assert_mask_equal(tab, want)
    return want


def test_tile_classes_helper_by_hand():
    arr = np.tril(np.ones((5, 5), bool))[None, None]
    # tiles of 2x2 (ragged last row/col): row 0 = [P, E, E], row 1 = [F, P, E], row 2 = [F, F, F]
    want = np.array([[1, 0, 0], [2, 1, 0], [2, 2, 2]])
    assert_mask_equal(tile_classes(arr, 2, 2)[0, 0], want)


STATIC_1D = [
    ("full", lambda: M.full()),
    ("causal", lambda: M.causal()),
    ("causal(-7)", lambda: M.causal(-7)),
    ("causal(13)", lambda: M.causal(13)),
    ("window(9,0)", lambda: M.sliding_window(9)),
    ("window(5,17)", lambda: M.sliding_window(5, 17)),
    ("chunked(11)", lambda: M.chunked(11)),
    ("prefix(20)", lambda: M.prefix_lm(20)),
    ("dual", lambda: M.dual_triangle()),
    ("fn", lambda: M.from_fn(lambda b, h, q, kv: ((q // 7 + kv // 5 + h) % 3) == 0)),
    ("chunked&causal", lambda: M.chunked(16) & M.causal()),
    ("window|prefix", lambda: M.sliding_window(3, 3) | M.prefix_lm(9)),
    ("~causal", lambda: ~M.causal()),
    ("nested", lambda: (M.causal() & ~M.sliding_window(4)) | (M.chunked(24) & M.dual_triangle())),
]


@SETTINGS
@given(case=st.sampled_from(STATIC_1D), T=st.integers(1, 200), S=st.integers(1, 200),
       bq=st.integers(1, 48), bk=st.integers(1, 48))
def test_block_table_exact_static_1d(case, T, S, bq, bk):
    name, make = case
    m = make()
    arr = dense(m, T, S, num_heads=3, batch=1)
    tab = m.block_table(T, S, bq, bk, num_heads=3)
    assert isinstance(tab, np.ndarray) and tab.dtype == np.int8
    check_table(tab, arr, bq, bk, exact=True)


STATIC_GRID = [
    ("neighborhood1d", lambda: M.neighborhood(150, 7, 3)),
    ("neighborhood2d", lambda: M.neighborhood((12, 16), (3, 5), (2, 1))),
    ("neighborhood3d causal", lambda: M.neighborhood((4, 6, 8), 3, 1, causal=(True, False, False))),
    ("swin", lambda: M.window((12, 16), 4, 2)),
    ("swin noshift", lambda: M.window((12, 16), (6, 4))),
    ("grid", lambda: M.grid((12, 16), (3, 4))),
    ("axial0", lambda: M.axial((12, 16), 0)),
    ("axial-1", lambda: M.axial((4, 6, 8), -1)),
    ("criss_cross", lambda: M.criss_cross((12, 16))),
    ("nb&causal", lambda: M.neighborhood((12, 16), 5) & M.causal()),
]


@SETTINGS
@given(case=st.sampled_from(STATIC_GRID), bq=st.integers(1, 64), bk=st.integers(1, 64))
def test_block_table_exact_static_grid(case, bq, bk):
    name, make = case
    m = make()
    n = 150 if name == "neighborhood1d" else 192       # tokens of the grid
    arr = dense(m, n, n)
    tab = m.block_table(n, n, bq, bk)
    assert isinstance(tab, np.ndarray)
    check_table(tab, arr, bq, bk, exact=True)


SEPARABLE = [  # (mask, tiled2d (tile, offset) or None): odd sizes, dilation, shifts, 3D, formulas
    (lambda: M.neighborhood((7, 9), 3), None),
    (lambda: M.neighborhood((9, 11), (3, 5), dilation=(2, 2)), None),
    (lambda: M.neighborhood((7, 8), 3, causal=(True, False)), None),
    (lambda: M.neighborhood((3, 6, 7), (3, 3, 3), dilation=(1, 2, 2)), None),
    (lambda: M.window((9, 12), (3, 4), shift=(2, 1)), None),
    (lambda: M.axial((7, 10), 0), None),
    (lambda: M.criss_cross((7, 5)), None),
    (lambda: M.halo((9, 7), 3, 1) | M.stripe((9, 7), 2, 1), None),
    (lambda: M.neighborhood((8, 9), 3) & ~M.window((8, 9), (4, 3), shift=1), None),
    (lambda: M.window((8, 12), (4, 3), shift=(2, 1)), ((4, 3), (2, 1))),
    (lambda: M.neighborhood((9, 12), 3, dilation=2), ((3, 4), (0, 0))),
    (lambda: M.criss_cross((6, 9)), ((3, 3), (1, 2))),
    # column strips: segments run down the first axis (_runs_last)
    (lambda: M.axial((12, 5), 0), ((4, 1), (0, 0))),
    (lambda: M.neighborhood((8, 6), 3) | M.grid((8, 6), (2, 3)), ((8, 1), (0, 0))),
    (lambda: M.window((8, 6), (4, 3), shift=(2, 1)), ((4, 1), (2, 1))),
    (lambda: M.neighborhood((4, 6, 4), 3, causal=(False, True, False)), ((2, 1, 1), (0, 0, 0))),
    # dilated patches (a MaxViT grid's groups): runs relabelled to be consecutive
    (lambda: M.grid((8, 12), (2, 3)), ((2, 3), (0, 0), (4, 4))),
    (lambda: M.neighborhood((8, 12), 3, dilation=2) | M.grid((8, 12), (4, 3)),
     ((2, 3), (0, 0), (2, 2))),
    (lambda: M.window((8, 12), (4, 3), shift=(2, 1)), ((2, 3), (1, 0), (2, 2))),
    (lambda: M.grid((4, 6, 8), (2, 3, 2)), ((2, 1, 2), (0, 0, 0), (2, 2, 4))),
]


def test_separable_segments_follow_the_strip_axis():
    """In a (P, 1) strip order the segments run down the columns: the table is solved with
    the first axis moved last (a few segments per tile instead of one per token)."""
    shape = (64, 32)
    order = M.tiled_to_flat(np.arange(64 * 32), shape, (16, 1))
    mats = [[np.eye(64, dtype=bool), np.eye(32, dtype=bool)]]
    pshape, porder, pmats = M._runs_last(shape, order, mats, 16, 16)
    assert pshape == (32, 64) and pmats[0][0].shape == (32, 32)
    assert len(M._segments(porder, 16, 64)[1]) == 64 * 32 // 16     # one run per tile
    assert M._runs_last(shape, np.arange(64 * 32), mats, 16, 16)[0] == shape   # row-major


@pytest.mark.parametrize("case", range(len(SEPARABLE)))
def test_block_table_separable_fast_path_equals_brute_force(case):
    """The segment/prefix-sum tables of separable grid masks (and their formulas, plain or
    tiled2d) equal the element-wise evaluation, ragged blocks included."""
    make, tiled = SEPARABLE[case]
    m = make()
    if tiled is not None:
        m = M.tiled2d(m, tiled[0], offset=tiled[1], dilation=(tiled + (1,))[2])
    n = math.prod(M.find_spatial_shape(m) or m.params["shape"])
    for bq, bk in [(1, 1), (3, 5), (8, 4), (16, 16), (n, 7), (64, 128)]:
        fast = M._separable_table(m, n, n, bq, bk)
        assert fast is not None
        np.testing.assert_array_equal(fast, M._eval_table(m, M._Ctx(), n, n, bq, bk))
    check_table(m.block_table(n, n, 5, 3), dense(m, n, n), 5, 3, exact=True)


def test_block_table_separable_not_used_for_other_masks():
    assert M._separable_table(M.neighborhood((4, 4), 3) & M.causal(), 16, 16, 4, 4) is None
    assert M._separable_table(M.from_fn(lambda b, h, q, kv: q >= kv), 16, 16, 4, 4) is None


@SETTINGS
@given(case=broadcast_array(), bq=st.integers(1, 6), bk=st.integers(1, 6))
def test_block_table_from_array_numpy_exact(case, bq, bk):
    arr, (B, N, T, S) = case
    m = M.from_array(arr)
    tab = m.block_table(T, S, bq, bk, num_heads=N, batch=B)
    assert isinstance(tab, np.ndarray)
    check_table(tab, dense(m, T, S, N, B), bq, bk, exact=True)


@pytest.mark.parametrize("shape,BNTS,bq,bk", [
    ((9, 13), (1, 1, 9, 13), 4, 5), ((2, 1, 12, 12), (2, 3, 12, 12), 3, 4),
    ((3, 10, 1), (2, 3, 10, 7), 4, 3)])
def test_block_table_from_array_jax_exact_and_jax(shape, BNTS, bq, bk):
    B, N, T, S = BNTS
    arr = np.random.default_rng(B * N).random(shape) < 0.4
    m = M.from_array(jnp.asarray(arr))
    assert m.data_dependent
    tab = run(True, lambda: m.block_table(T, S, bq, bk, num_heads=N, batch=B))
    check_table(np.asarray(tab), np.broadcast_to(arr, (B, N, T, S)), bq, bk, exact=True)


@SETTINGS
@given(bq=st.integers(1, 7), bk=st.integers(1, 7), nq=st.integers(1, 6), nk=st.integers(1, 6),
       T_cut=st.integers(0, 6), S_cut=st.integers(0, 6), bq2=st.integers(1, 9),
       bk2=st.integers(1, 9), seed=st.integers(0, 1000))
def test_block_table_from_block_mask_other_sizes(bq, bk, nq, nk, T_cut, S_cut, bq2, bk2, seed):
    bm = np.random.default_rng(seed).random((2, nq, nk)) < 0.5
    m = M.from_block_mask(bm, bq, bk)
    T = nq * bq - min(T_cut, bq - 1)          # ragged last tile
    S = nk * bk - min(S_cut, bk - 1)
    check_table(m.block_table(T, S, bq, bk, num_heads=2), dense(m, T, S, 2), bq, bk, exact=True)
    arr = dense(m, T, S, num_heads=2)
    check_table(m.block_table(T, S, bq2, bk2, num_heads=2), arr, bq2, bk2, exact=True)


@SETTINGS
@given(B=st.integers(1, 3), T=st.integers(1, 120), bq=st.integers(1, 32), bk=st.integers(1, 32),
       docs=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_block_table_document_sorted_ids_exact(B, T, bq, bk, docs, seed):
    """Packed (sorted) segment ids, kv ids = q ids: the table is exact."""
    qs = _segments(np.random.default_rng(seed), B, T, docs)
    m = M.document(qs)
    tab = m.block_table(T, T, bq, bk, batch=B)
    assert isinstance(tab, np.ndarray)
    check_table(tab, dense(m, T, T, 1, B), bq, bk, exact=True)


def test_block_table_document_numpy_ids_with_padding_exact():
    """A leaf mask with NumPy ids is static: its table must be exact (as for every other
    static leaf), also when a padding id breaks the monotone order of packed ids.
    Here q-tile 1 holds ids {2, 0} and k-tile 0 holds {1}: no equal ids, so EMPTY."""
    ids = np.array([[1, 1, 2, 2, 0, 0]], np.int32)
    m = M.document(ids)
    tab = m.block_table(6, 6, 3, 2)
    want = tile_classes(dense(m, 6, 6), 3, 2)
    assert want[0, 0, 1, 0] == M.EMPTY
    check_table(tab, dense(m, 6, 6), 3, 2, exact=True)


@SETTINGS
@given(B=st.integers(1, 3), T=st.integers(1, 120), bq=st.integers(1, 32), bk=st.integers(1, 32),
       docs=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_block_table_document_numpy_padded_ids_exact(B, T, bq, bk, docs, seed):
    rng = np.random.default_rng(seed)
    qs = _segments(rng, B, T, docs, pad_id=0, pad_len=int(rng.integers(0, T + 1)))
    m = M.document(qs)
    check_table(m.block_table(T, T, bq, bk, batch=B), dense(m, T, T, 1, B), bq, bk, exact=True)


def _check_document_sound(B, T, S, bq, bk, seed, use_jax):
    rng = np.random.default_rng(seed)
    qs = rng.integers(0, 4, (B, T)).astype(np.int32)
    ks = rng.integers(0, 4, (B, S)).astype(np.int32)
    if rng.random() < 0.5:   # long runs make FULL/EMPTY tiles likely
        qs = np.sort(qs, axis=1)
        ks = np.sort(ks, axis=1)
    m = M.document(jnp.asarray(qs) if use_jax else qs, jnp.asarray(ks) if use_jax else ks)
    assert m.data_dependent == use_jax
    tab, arr = run(use_jax, lambda: (m.block_table(T, S, bq, bk, batch=B), m.to_array(T, S, 1, B)))
    check_table(np.asarray(tab), np.asarray(arr), bq, bk, exact=False)


@SETTINGS
@given(B=st.integers(1, 3), T=st.integers(1, 120), S=st.integers(1, 120), bq=st.integers(1, 32),
       bk=st.integers(1, 32), seed=st.integers(0, 10_000))
def test_block_table_document_arbitrary_ids_sound(B, T, S, bq, bk, seed):
    """Unsorted ids (0 doubles as padding), T != S: conservative but never wrong."""
    _check_document_sound(B, T, S, bq, bk, seed, use_jax=False)


@pytest.mark.parametrize("args", [(2, 50, 70, 8, 16, 0), (1, 33, 17, 5, 3, 1),
                                  (3, 64, 64, 16, 16, 3)])
def test_block_table_document_jax_ids_sound(args):
    _check_document_sound(*args, use_jax=True)


def test_block_table_document_jax_under_jit_is_exact_for_packed_ids():
    qs = _segments(np.random.default_rng(5), 2, 50, 4)

    @jax.jit
    def f(ids):
        return M.document(ids).block_table(50, 50, 8, 16, batch=2)

    tab = f(jnp.asarray(qs))
    assert isinstance(tab, jax.Array)
    check_table(np.asarray(tab), dense(M.document(qs), 50, 50, 1, 2), 8, 16, exact=True)


def _child_bound(op, child_tables):
    """What the table algebra on exact child tables guarantees: tiles that must be
    classified EMPTY / FULL when every child table is exact."""
    if op == "not":
        (a,) = child_tables
        return a == M.FULL, a == M.EMPTY
    a, b = child_tables
    if op == "and":
        return (a == M.EMPTY) | (b == M.EMPTY), (a == M.FULL) & (b == M.FULL)
    return (a == M.EMPTY) & (b == M.EMPTY), (a == M.FULL) | (b == M.FULL)


DATA_COMPOSITES = [
    ("doc&causal", "and", lambda ids, arr, off: (M.document(ids), M.causal())),
    ("doc|window", "or", lambda ids, arr, off: (M.document(ids), M.sliding_window(5, 5))),
    ("array&chunk", "and", lambda ids, arr, off: (M.from_array(arr), M.chunked(12))),
    ("tracedcausal|prefix", "or", lambda ids, arr, off: (M.causal(off), M.prefix_lm(10))),
    ("~doc", "not", lambda ids, arr, off: (M.document(ids),)),
]


BLOCKS = [(8, 8), (7, 12)]    # dividing and ragged


@pytest.mark.parametrize("case", DATA_COMPOSITES, ids=[c[0] for c in DATA_COMPOSITES])
def test_block_table_data_dependent_composites(case):
    """Data-dependent composites: JAX tables, sound, and at least as tight as the
    algebra of exact child tables (so 'all PARTIAL' would fail)."""
    name, op, make = case
    T = 60
    rng = np.random.default_rng(7)
    ids = _segments(rng, 2, T, 4)
    arr = rng.random((2, 1, T, T)) < 0.3

    def combine(children):
        if op == "not":
            return ~children[0]
        return children[0] & children[1] if op == "and" else children[0] | children[1]

    @jax.jit
    def f(ids, arr, off):
        m = combine(make(ids, arr, off))
        assert m.data_dependent
        return [m.block_table(T, T, bq, bk, num_heads=2, batch=2) for bq, bk in BLOCKS]

    tabs = f(jnp.asarray(ids), jnp.asarray(arr), jnp.int32(-2))
    # references from the NumPy twins of the same masks
    children = make(ids, arr, -2)
    dense_m = dense(combine(children), T, T, 2, 2)
    dense_c = [dense(c, T, T, 2, 2) for c in children]
    for tab, (bq, bk) in zip(tabs, BLOCKS):
        assert isinstance(tab, jax.Array)
        want = check_table(np.asarray(tab), dense_m, bq, bk, exact=False)
        tab = np.broadcast_to(np.asarray(tab), want.shape)
        must_empty, must_full = _child_bound(op, [tile_classes(d, bq, bk) for d in dense_c])
        assert (tab[must_empty] == M.EMPTY).all()
        assert (tab[must_full] == M.FULL).all()
        assert (tab != M.PARTIAL).any()


def test_block_table_traced_causal_offset_under_jit():
    @jax.jit
    def f(off):
        m = M.causal(off) & M.sliding_window(20, 20)
        return m.block_table(70, 90, 16, 8), (M.causal(off)).block_table(70, 90, 16, 8)

    for off in (-5, 0, 13):
        comp, leaf = f(jnp.int32(off))
        arr = dense(M.causal(off) & M.sliding_window(20, 20), 70, 90)
        check_table(np.asarray(comp), arr, 16, 8, exact=False)
        check_table(np.asarray(leaf), dense(M.causal(off), 70, 90), 16, 8, exact=True)


def test_block_table_is_cached_and_read_only_for_static_masks():
    m = M.causal()
    t1 = m.block_table(64, 64, 16, 16)
    t2 = m.block_table(64, 64, 16, 16)
    assert t1 is t2
    with pytest.raises(ValueError):
        t1[0, 0, 0, 0] = 2


def test_block_table_leading_dims():
    assert M.causal().block_table(32, 32, 8, 8, num_heads=4, batch=3).shape == (1, 1, 4, 4)
    assert M.dual_triangle().block_table(32, 32, 8, 8, num_heads=4, batch=3).shape[1] in (1, 4)
    tab = M.dual_triangle().block_table(32, 32, 8, 8, num_heads=4, batch=3)
    assert tab.shape[0] in (1, 3)
    assert np.asarray(tab).shape[1] == 4      # head-dependent: one table per head


def test_block_table_large_static_composites_use_exact_child_algebra():
    """Past the exact-evaluation size (T * S > 2^28) composites combine child tables;
    with band children whose tiles line up, the result is still exact."""
    T = S = 20000
    args = (T, S, 512, 384)
    band = M.sliding_window(300).block_table(*args)          # exact interval table
    np.testing.assert_array_equal((M.causal() & M.sliding_window(300)).block_table(*args), band)
    causal = M.causal().block_table(*args)
    np.testing.assert_array_equal((~M.causal()).block_table(*args), M.FULL - causal)
    np.testing.assert_array_equal((M.causal() | M.full()).block_table(*args),
                                  np.full_like(causal, M.FULL))
    # the causal band table itself against the closed form for square tiles on the diagonal
    assert causal.shape == (1, 1, -(-T // 512), -(-S // 384))
    i, j = 10, 3                                   # rows 5120..5631 vs keys 1152..1535
    assert causal[0, 0, i, j] == M.FULL and causal[0, 0, j, i + 20] == M.EMPTY


def test_block_table_batch_dependent_from_fn():
    m = M.from_fn(lambda b, h, q, kv: (kv <= q) | (b == 1))
    tab = m.block_table(10, 10, 4, 4, num_heads=2, batch=2)
    check_table(tab, dense(m, 10, 10, 2, 2), 4, 4, exact=True)
    tab = np.broadcast_to(tab, (2, 2, 3, 3))
    assert (tab[1] == M.FULL).all() and (tab[0] != M.FULL).any()


@pytest.mark.parametrize("mask", [
    M.full(), M.causal(), M.causal(-5), M.causal(7), M.sliding_window(4, 2), M.chunked(6),
    M.prefix_lm(9), M.causal() & M.sliding_window(3), M.chunked(8) & M.causal(),
    M.causal(2).shifted(3, 1), ~M.causal(), ~M.causal(-3), M.causal() | M.sliding_window(2),
    M.sliding_window(3) | M.causal(), M.causal() | M.sliding_window(0, 3), ~M.prefix_lm(4),
    M.chunked(5) | M.causal(), (M.causal() & M.sliding_window(4)).shifted(2, 5),
    ~M.causal(1).shifted(2, 0)], ids=lambda m: m.name)
def test_row_band_equals_dense_mask(mask):
  T, S = 23, 29
  lo, hi = mask.row_band(T, S)
  assert lo.shape == hi.shape == (T,) and lo.dtype == hi.dtype == np.int32
  kv = np.arange(S)
  band = (kv[None, :] >= lo[:, None]) & (kv[None, :] <= hi[:, None])
  np.testing.assert_array_equal(band, mask.to_array(T, S)[0, 0])


def test_row_band_traced_offset_and_non_bands():
  lo, hi = jax.jit(lambda off: M.causal(off).row_band(6, 9))(jnp.int32(2))
  np.testing.assert_array_equal(hi, np.arange(6) + 2)
  np.testing.assert_array_equal(lo, np.full(6, -1))
  # ~causal(traced) is a band by structure: [q + off + 1, S - 1].
  lo, hi = jax.jit(lambda off: (~M.causal(off)).row_band(6, 9))(jnp.int32(2))
  np.testing.assert_array_equal(lo, np.arange(6) + 3)
  np.testing.assert_array_equal(hi, np.full(6, 8))
  # A union whose rows are two intervals, ~ of a two-sided band, a traced union.
  got = []
  jax.jit(lambda off: got.append((M.causal(off) | M.sliding_window(1)).row_band(6, 9)))(
      jnp.int32(2))
  assert got == [None]          # a union with traced offsets is not checked row by row
  for m in [M.neighborhood((4, 4), 3), M.sliding_window(1) | M.sliding_window(0, 0, offset=5),
            ~M.sliding_window(2, 1), M.chunked(4) | M.sliding_window(0, 0, offset=6),
            M.dual_triangle(), M.from_array(np.ones((16, 16), bool))]:
    assert m.row_band(16, 16) is None, m.name
  with pytest.raises(ValueError, match="grid"):
    M.neighborhood((4, 4), 3).row_band(15, 15)


# --------------------------------------------------------------------- key intervals


def _intervals(seed, B, N, T, S):
    rng = np.random.default_rng(seed)
    start = rng.integers(-3, T + 2, (B, N, S))
    end = start + rng.integers(-2, T, (B, N, S))
    return start, end


@pytest.mark.parametrize("use_jax", [False, True])
@pytest.mark.parametrize("T,S,bq,bk", [(12, 20, 4, 4), (13, 11, 5, 3), (7, 30, 8, 16),
                                       (25, 25, 4, 8)])
def test_key_interval_predicate_and_exact_table(use_jax, T, S, bq, bk):
    """(q, kv) allowed iff start[b, h, kv] <= q < end[b, h, kv] (loops); the block table
    equals the classification of the dense mask tile by tile, ragged ends included."""
    B, N = 2, 3
    start, end = _intervals(T * 31 + S, B, N, T, S)
    conv = jnp.asarray if use_jax else np.asarray
    m = M.key_interval(conv(start), conv(end))
    assert m.kind == "key_interval" and m.data_dependent == use_jax and m.head_dependent
    want = np.zeros((B, N, T, S), bool)
    for b, h, i, j in itertools.product(range(B), range(N), range(T), range(S)):
        want[b, h, i, j] = start[b, h, j] <= i < end[b, h, j]
    got = run(use_jax, lambda: m.to_array(T, S, num_heads=N, batch=B))
    assert_mask_equal(got, want)
    table = np.asarray(run(use_jax, lambda: m.block_table(T, S, bq, bk, num_heads=N,
                                                          batch=B)))
    nq, nk = -(-T // bq), -(-S // bk)
    for b, h, i, j in itertools.product(range(B), range(N), range(nq), range(nk)):
        tile = want[b, h, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
        cls = M.FULL if tile.all() else (M.PARTIAL if tile.any() else M.EMPTY)
        assert table[b, h, i, j] == cls, (b, h, i, j)


def test_key_interval_broadcasts_pytree_and_errors():
    start = jnp.arange(16)                                   # [S]: causal from the key on
    end = jnp.asarray(np.random.default_rng(1).integers(0, 17, (2, 1, 16)))   # [B, 1, S]
    m = M.key_interval(start, end)
    leaves, tree = jax.tree_util.tree_flatten(m)
    assert len(leaves) == 2 and "key_interval" in M.KINDS
    m2 = jax.tree_util.tree_unflatten(tree, leaves)
    want = (np.arange(16)[None, None, :, None] >= np.arange(16)) & \
        (np.arange(16)[None, None, :, None] < np.asarray(end)[:, :, None, :])
    assert_mask_equal(jax.jit(lambda mm: mm.to_array(16, 16, num_heads=3, batch=2))(m2),
                      want)
    with pytest.raises(ValueError, match="key_interval: start/end have 16 keys; the call "
                                         "has S=12"):
        m.check_shape(16, 12, 3, 2)
    with pytest.raises(ValueError, match="batch dim 2"):
        m.check_shape(16, 16, 3, 4)
    with pytest.raises(TypeError, match="start must be an integer array"):
        M.key_interval(jnp.zeros(4), jnp.ones(4, jnp.int32))
    with pytest.raises(ValueError, match=r"end must have shape \[S\], \[N, S\] or \[B, N, S\]"):
        M.key_interval(jnp.zeros(4, jnp.int32), jnp.ones((1, 1, 1, 4), jnp.int32))
    with pytest.raises(ValueError, match="same key count"):
        M.key_interval(jnp.zeros(4, jnp.int32), jnp.ones(5, jnp.int32))
    with pytest.raises(ValueError, match="incompatible leading dims"):
        M.key_interval(jnp.zeros((2, 4), jnp.int32), jnp.ones((3, 4), jnp.int32))
