"""Malformed calls raise ValueError/TypeError whose message names the argument.

Every attention call runs under ``jax.eval_shape``: argument checking happens at
trace time, so a correct rejection costs no compilation, and a call that is wrongly
accepted fails the test without computing anything.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import masks as M
from attnjax import score_mods as SM

B, T, S, N, K, H, HV = 2, 16, 16, 4, 2, 8, 8
_rng = np.random.default_rng(0)
Q = _rng.standard_normal((B, T, N, H)).astype(np.float32)
KK = _rng.standard_normal((B, S, K, H)).astype(np.float32)
V = _rng.standard_normal((B, S, K, HV)).astype(np.float32)
IDS = np.repeat(np.arange(4, dtype=np.int32), 4)[None].repeat(B, 0)   # [B, 16]


def attn(q=Q, k=KK, v=V, **kw):
    """attnjax.attention traced abstractly (no compilation, no FLOPs)."""
    return jax.eval_shape(lambda: attnjax.attention(q, k, v, **kw))


def test_valid_base_call_passes():
    # every case below differs from this call in one argument only
    out = attn(mask=M.causal(), bias=np.zeros((1, N, T, S), np.float32), q_segment_ids=IDS,
               scale=0.3, softcap=20.0, sinks=np.zeros(N, np.float32),
               score_mod=SM.alibi(SM.alibi_slopes(N)), implementation="xla")
    assert out.shape == (B, T, N, HV)
    out, lse = attn(q=Q[:, :5], q_segment_ids=IDS[:, :5], kv_segment_ids=IDS,
                    return_lse=True, implementation=["reference"])
    assert out.shape == (B, 5, N, HV) and lse.shape == (B, N, 5)


f32 = np.float32
ATTENTION_CASES = [
    # shapes and dtypes of q, k, v
    ("q_rank3", dict(q=Q[0]), ValueError, r"\bq must have rank 4"),
    ("k_rank5", dict(k=KK[None]), ValueError, r"\bk must have rank 4"),
    ("v_rank3", dict(v=V[0]), ValueError, r"\bv must have rank 4"),
    ("q_not_array", dict(q=Q.tolist()), TypeError, r"\bq must be an array"),
    ("k_batch", dict(k=KK[:1], v=V[:1]), ValueError, r"batch sizes differ.*k has 1"),
    ("v_batch", dict(v=np.concatenate([V, V])), ValueError, r"batch sizes differ.*v has 4"),
    ("S_k_vs_v", dict(v=V[:, :9]), ValueError, r"\bk and v must have the same length S"),
    ("K_k_vs_v", dict(v=V[:, :, :1]), ValueError, r"\bk and v .* kv heads"),
    ("head_dim", dict(k=KK[..., :4]), ValueError, r"\bq and k must have the same head_dim"),
    ("N_not_multiple_of_K", dict(q=Q[:, :, :3]), ValueError,
     r"query heads N=3 must be a multiple of .*kv heads K=2"),
    ("zero_length", dict(q=Q[:, :0]), ValueError, r"dimensions must be positive"),
    ("int_q", dict(q=Q.astype(np.int32)), TypeError, r"\bq must be floating point"),
    ("int_v", dict(v=V.astype(np.int8)), TypeError, r"\bv must be floating point"),
    ("mixed_dtypes", dict(k=KK.astype(jnp.bfloat16), v=V.astype(jnp.bfloat16)), TypeError,
     r"q, k, v must share a dtype"),
    # bias
    ("bias_bad_S", dict(bias=np.zeros((B, N, T, 7), f32)), ValueError,
     r"bias shape .*dim S must be 1 or 16"),
    ("bias_bad_B", dict(bias=np.zeros((3, 1, T, S), f32)), ValueError,
     r"bias shape .*dim B must be 1 or 2"),
    ("bias_rank5", dict(bias=np.zeros((1, B, N, T, S), f32)), ValueError, r"\bbias must have rank"),
    ("bias_int", dict(bias=np.zeros((T, S), np.int32)), TypeError, r"\bbias must be floating"),
    ("bias_not_array", dict(bias=1.5), TypeError, r"\bbias must be an array"),
    # segment ids
    ("q_seg_shape", dict(q_segment_ids=IDS[:, :7]), ValueError,
     r"\bq_segment_ids must have shape \[B, T\] = \[2, 16\]"),
    ("q_seg_float", dict(q_segment_ids=IDS.astype(f32)), TypeError,
     r"\bq_segment_ids must have an integer dtype"),
    ("kv_seg_shape", dict(q_segment_ids=IDS, kv_segment_ids=IDS[:1]), ValueError,
     r"\bkv_segment_ids must have shape \[B, S\]"),
    ("kv_seg_without_q", dict(kv_segment_ids=IDS), ValueError,
     r"\bkv_segment_ids was given without q_segment_ids"),
    ("T_ne_S_without_kv_ids", dict(q=Q[:, :5], q_segment_ids=IDS[:, :5]), ValueError,
     r"\bkv_segment_ids is required when T != S"),
    ("q_seg_list", dict(q_segment_ids=IDS.tolist()), TypeError, r"\bq_segment_ids must be"),
    # scale / softcap
    ("scale_negative", dict(scale=-0.5), ValueError, r"\bscale must be a positive"),
    ("scale_zero", dict(scale=0.0), ValueError, r"\bscale must be a positive"),
    ("scale_nan", dict(scale=float("nan")), ValueError, r"\bscale must be a positive finite"),
    ("scale_string", dict(scale="0.1"), TypeError, r"\bscale must be"),
    ("scale_bool", dict(scale=True), TypeError, r"\bscale must be"),
    ("softcap_negative", dict(softcap=-3.0), ValueError, r"\bsoftcap must be a positive"),
    ("softcap_zero", dict(softcap=0), ValueError, r"\bsoftcap must be a positive"),
    ("softcap_string", dict(softcap="30"), TypeError, r"\bsoftcap must be"),
    # sinks
    ("sinks_shape_K", dict(sinks=np.zeros(K, f32)), ValueError, r"\bsinks must have shape \[N\] = "
                                                                r"\[4\]"),
    ("sinks_shape_2d", dict(sinks=np.zeros((1, N), f32)), ValueError, r"\bsinks must have shape"),
    ("sinks_int", dict(sinks=np.zeros(N, np.int32)), TypeError, r"\bsinks must be floating"),
    ("sinks_list", dict(sinks=[0.0] * N), TypeError, r"\bsinks must be a float array"),
    # score_mod / mask
    ("score_mod_not_callable", dict(score_mod=SM.alibi_slopes(N)), TypeError,
     r"\bscore_mod must be callable"),
    ("mask_int_dtype", dict(mask=np.ones((T, S), np.int32)), TypeError,
     r"\bmask must be a boolean array"),
    ("mask_not_broadcastable", dict(mask=np.ones((T, 7), bool)), ValueError,
     r"\bmask array of shape \(16, 7\) does not broadcast"),
    ("mask_rank5", dict(mask=np.ones((1, 1, 1, T, S), bool)), ValueError, r"\bmask must have rank"),
    ("mask_rank1", dict(mask=np.ones(S, bool)), ValueError, r"\bmask must have rank"),
    ("mask_wrong_type", dict(mask="causal"), TypeError, r"\bmask must be None, a boolean array"),
    ("mask_grid_T_mismatch", dict(mask=M.neighborhood((3, 4), 3)), ValueError,
     r"grid of 12 tokens.*T == S == 12, got T=16, S=16"),
    ("mask_composite_grid_mismatch", dict(mask=M.causal() & M.window((4, 2), 2)), ValueError,
     r"T == S == 8"),
    # implementation / return_lse
    ("impl_unknown_close", dict(implementation="xla_chunk"), ValueError,
     r"\bimplementation must be one of .*did you mean 'xla_chunked'"),
    ("impl_unknown_typo", dict(implementation="palas"), ValueError, r"did you mean 'pallas'"),
    ("impl_in_sequence", dict(implementation=["xla", "refrence"]), ValueError,
     r"got 'refrence' \(did you mean 'reference'"),
    ("impl_empty", dict(implementation=()), ValueError, r"\bimplementation must not be an empty"),
    ("impl_not_str", dict(implementation=7), TypeError, r"\bimplementation must be None"),
    ("impl_seq_not_str", dict(implementation=["xla", None]), TypeError,
     r"\bimplementation names must be strings"),
    ("return_lse_str", dict(return_lse="yes"), TypeError, r"\breturn_lse must be a bool"),
    ("return_lse_int", dict(return_lse=1), TypeError, r"\breturn_lse must be a bool"),
]


@pytest.mark.parametrize("kw,exc,pattern", [c[1:] for c in ATTENTION_CASES],
                         ids=[c[0] for c in ATTENTION_CASES])
def test_attention_rejects(kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        attn(**kw)


@pytest.mark.parametrize("kw,exc,pattern", [c[1:] for c in ATTENTION_CASES[:40]],
                         ids=[c[0] for c in ATTENTION_CASES[:40]])
def test_reference_attention_rejects_the_same(kw, exc, pattern):
    q, k, v = kw.pop("q", Q), kw.pop("k", KK), kw.pop("v", V)
    with pytest.raises(exc, match=pattern):
        jax.eval_shape(lambda: attnjax.reference_attention(q, k, v, **kw))


# Inputs the library used to accept silently (clipped / clamped indices) although they do
# not match the call: every one must be an error naming the argument.
SILENT_CASES = [
    ("mask_array_batch_3_for_B_2", dict(mask=np.ones((3, 1, T, S), bool)), r"\bmask\b"),
    ("mask_array_heads_3_for_N_4", dict(mask=np.ones((1, 3, T, S), bool)), r"\bmask\b"),
    ("mask_from_array_heads_2_for_N_4", dict(mask=M.from_array(np.ones((1, 2, T, S), bool))),
     r"\bmask\b"),
    ("document_ids_T_12_for_T_16", dict(mask=M.document(IDS[:, :12])), r"T=12"),
    ("document_ids_batch_1_for_B_2", dict(mask=M.document(IDS[:1])), r"batch|\bB\b"),
    ("block_mask_3x3_tiles_for_4x4", dict(mask=M.from_block_mask(np.ones((3, 3), bool), 4, 4)),
     r"block_mask"),
    ("alibi_2_slopes_for_N_4", dict(score_mod=SM.alibi(np.ones(2, f32))), r"\bslopes\b"),
    ("relpos_table_2_rows_for_N_4",
     dict(score_mod=SM.relative_position_bias(np.ones((2, 5), f32))), r"\btable\b"),
    ("relpos_grid_9_tokens_for_T_16",
     dict(score_mod=SM.relative_position_bias(np.ones((N, 25), f32), shape=(3, 3))),
     r"\bshape\b|T == S == 9"),
]


@pytest.mark.parametrize("kw,pattern", [c[1:] for c in SILENT_CASES],
                         ids=[c[0] for c in SILENT_CASES])
def test_attention_rejects_operands_that_do_not_match_the_call(kw, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        attn(**kw)


# ------------------------------------------------------------ ChunkedBlockSizes


@pytest.mark.parametrize("kw,field", [
    (dict(block_q=0), "block_q"), (dict(block_q=-8), "block_q"), (dict(block_k=0), "block_k"),
    (dict(block_k=-1), "block_k"), (dict(block_q=2.5), "block_q"), (dict(block_k=True), "block_k"),
])
def test_chunked_block_sizes_rejects(kw, field):
    with pytest.raises(ValueError, match=rf"ChunkedBlockSizes\.{field} must be a positive int"):
        attnjax.ChunkedBlockSizes(**kw)


# ------------------------------------------------------------ mask constructors

MASK_CASES = [
    ("causal_float_offset", lambda: M.causal(1.5), TypeError, r"\boffset must be an int"),
    ("window_negative_left", lambda: M.sliding_window(-1), ValueError, r"\bleft must be >= 0"),
    ("window_negative_right", lambda: M.sliding_window(2, -3), ValueError, r"\bright must be >= 0"),
    ("window_float_left", lambda: M.sliding_window(2.5), TypeError, r"\bleft must be an int"),
    ("chunked_zero", lambda: M.chunked(0), ValueError, r"\bsize must be >= 1"),
    ("chunked_negative", lambda: M.chunked(-4), ValueError, r"\bsize must be >= 1"),
    ("prefix_negative", lambda: M.prefix_lm(-2), ValueError, r"\bprefix_len must be >= 0"),
    ("nb_kernel_times_dilation", lambda: M.neighborhood(8, 5, 2), ValueError,
     r"\bkernel \* dilation must be <= the grid size"),
    ("nb_kernel_too_big_2d", lambda: M.neighborhood((8, 4), (3, 5)), ValueError,
     r"\bkernel \* dilation"),
    ("nb_kernel_wrong_len", lambda: M.neighborhood((8, 8), (3, 3, 3)), ValueError,
     r"\bkernel must be an int or a tuple of 2 ints"),
    ("nb_kernel_zero", lambda: M.neighborhood((8, 8), 0), ValueError, r"\bkernel must be >= 1"),
    ("nb_dilation_zero", lambda: M.neighborhood((8, 8), 3, 0), ValueError,
     r"\bdilation must be >= 1"),
    ("nb_shape_rank4", lambda: M.neighborhood((2, 2, 2, 2), 1), ValueError,
     r"\bshape must have 1, 2 or 3 axes"),
    ("nb_shape_zero", lambda: M.neighborhood((8, 0), 1), ValueError, r"\bshape must be >= 1"),
    ("nb_causal_len", lambda: M.neighborhood((8, 8), 3, causal=(True,)), ValueError,
     r"\bcausal must be a bool or 2 bools"),
    ("swin_window_not_dividing", lambda: M.window((8, 8), 3), ValueError,
     r"\bwindow must divide shape"),
    ("swin_window_zero", lambda: M.window((8, 8), 0), ValueError, r"\bwindow must be >= 1"),
    ("swin_shift_eq_window", lambda: M.window((8, 8), 4, shift=4), ValueError,
     r"\bshift must be < window"),
    ("swin_shift_gt_window_axis", lambda: M.window((8, 8), (4, 2), shift=(1, 3)), ValueError,
     r"\bshift must be < window"),
    ("swin_shift_negative", lambda: M.window((8, 8), 4, shift=-1), ValueError,
     r"\bshift must be >= 0"),
    ("swin_shape_rank4", lambda: M.window((2, 2, 2, 2), 1), ValueError, r"\bshape must have"),
    ("grid_not_dividing", lambda: M.grid((8, 8), 3), ValueError, r"\bgrid must divide shape"),
    ("grid_zero", lambda: M.grid((8, 8), 0), ValueError, r"\bgrid must be >= 1"),
    ("grid_wrong_len", lambda: M.grid((8, 8), (2, 2, 2)), ValueError, r"\bgrid must be an int"),
    ("axial_axis_high", lambda: M.axial((4, 4), 2), ValueError, r"\baxis must be in \[-2, 2\)"),
    ("axial_axis_low", lambda: M.axial((4, 4), -3), ValueError, r"\baxis must be >= -2"),
    ("axial_axis_float", lambda: M.axial((4, 4), 1.0), TypeError, r"\baxis must be an int"),
    ("criss_cross_3d", lambda: M.criss_cross((4, 4, 4)), ValueError, r"2D shape"),
    ("criss_cross_1d", lambda: M.criss_cross(16), ValueError, r"2D shape"),
    ("from_array_int", lambda: M.from_array(np.ones((4, 4), np.int32)), TypeError,
     r"\bmask must have dtype bool"),
    ("from_array_rank1", lambda: M.from_array(np.ones(4, bool)), ValueError,
     r"\bmask must have rank 2\.\.4"),
    ("from_array_list", lambda: M.from_array([[True]]), TypeError,
     r"\bmask must be a boolean array"),
    ("from_fn_not_callable", lambda: M.from_fn(3), TypeError, r"\bfn must be callable"),
    ("block_mask_int", lambda: M.from_block_mask(np.ones((2, 2), np.int32), 4, 4), TypeError,
     r"\bblock_mask must be a boolean array"),
    ("block_mask_rank1", lambda: M.from_block_mask(np.ones(2, bool), 4, 4), ValueError,
     r"\bblock_mask must have rank"),
    ("block_mask_block_q_zero", lambda: M.from_block_mask(np.ones((2, 2), bool), 0, 4), ValueError,
     r"\bblock_q must be >= 1"),
    ("block_mask_tiles_mismatch",
     lambda: M.from_block_mask(np.ones((2, 2), bool), 4, 4).block_table(12, 8, 4, 4), ValueError,
     r"\bblock_mask has 2x2 tiles, T=12, S=8 need 3x2"),
    ("document_rank1", lambda: M.document(IDS[0]), ValueError,
     r"\bq_segment_ids must be a \[B, length\] integer array"),
    ("document_float", lambda: M.document(IDS.astype(f32)), TypeError,
     r"\bq_segment_ids must have an integer dtype"),
    ("document_kv_float", lambda: M.document(IDS, IDS.astype(f32)), TypeError,
     r"\bkv_segment_ids must have an integer dtype"),
    ("document_batch", lambda: M.document(IDS, IDS[:1]), ValueError,
     r"\bq_segment_ids batch 2 != kv_segment_ids batch 1"),
    ("document_table_T", lambda: M.document(IDS).block_table(12, 16, 4, 4), ValueError,
     r"document mask built for T=16, S=16; called with T=12"),
    ("grid_to_array_T", lambda: M.neighborhood((4, 4), 3).to_array(15, 16), ValueError,
     r"T == S == 16, got T=15, S=16"),
    ("grid_block_table_S", lambda: M.window((4, 4), 2).block_table(16, 12, 4, 4), ValueError,
     r"T == S == 16, got T=16, S=12"),
    ("grid_composite", lambda: (M.causal() | M.grid((4, 4), 2)).to_array(8, 8), ValueError,
     r"T == S == 16"),
    ("grid_combine_different_sizes", lambda: M.axial((4, 4), 0) & M.axial((3, 3), 1),
     ValueError, r"grids of 16 and 9 tokens"),
    ("compose_with_int", lambda: M.causal() & 3, TypeError,
     r"\bother must be None, a boolean array"),
]


@pytest.mark.parametrize("make,exc,pattern", [c[1:] for c in MASK_CASES],
                         ids=[c[0] for c in MASK_CASES])
def test_mask_constructors_reject(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()


@pytest.mark.parametrize("args,name", [
    ((16, 16, 0, 4), "block_q"), ((16, 16, 4, -1), "block_k"), ((0, 16, 4, 4), "T"),
    ((16, 0, 4, 4), "S"), ((16, 16, 4.0, 4), "block_q"), ((16, 16, True, 4), "block_q"),
])
def test_block_table_rejects_non_positive_sizes(args, name):
    with pytest.raises(ValueError, match=rf"\b{name} must be a positive int"):
        M.causal().block_table(*args)


@pytest.mark.parametrize("kw,name", [(dict(num_heads=0), "num_heads"), (dict(batch=-1), "batch")])
def test_block_table_rejects_bad_heads_batch(kw, name):
    with pytest.raises(ValueError, match=rf"\b{name} must be a positive int"):
        M.dual_triangle().block_table(16, 16, 4, 4, **kw)


# ------------------------------------------------------------------ score mods

SCORE_MOD_CASES = [
    ("slopes_zero_heads", lambda: SM.alibi_slopes(0), ValueError,
     r"\bnum_heads must be a positive"),
    ("slopes_negative", lambda: SM.alibi_slopes(-2), ValueError, r"\bnum_heads"),
    ("slopes_float", lambda: SM.alibi_slopes(4.0), ValueError, r"\bnum_heads"),
    ("slopes_bool", lambda: SM.alibi_slopes(True), (ValueError, TypeError), r"\bnum_heads"),
    ("alibi_rank2", lambda: SM.alibi(np.ones((2, 2), f32)), ValueError, r"\bslopes must have rank "
                                                                        r"1"),
    ("alibi_int", lambda: SM.alibi(np.ones(4, np.int32)), TypeError,
     r"\bslopes must be floating point"),
    ("alibi_list", lambda: SM.alibi([0.5, 0.25]), TypeError, r"\bslopes must be an array"),
    ("relpos_rank1", lambda: SM.relative_position_bias(np.ones(5, f32)), ValueError,
     r"\btable must have rank 2"),
    ("relpos_int", lambda: SM.relative_position_bias(np.ones((2, 5), np.int32)), TypeError,
     r"\btable must be floating point"),
    ("relpos_even_columns", lambda: SM.relative_position_bias(np.ones((2, 6), f32)), ValueError,
     r"\btable must have 2\*max_distance\+1 = 5 columns"),
    ("relpos_max_distance", lambda: SM.relative_position_bias(np.ones((2, 5), f32), max_distance=3),
     ValueError, r"\btable must have 2\*max_distance\+1 = 7 columns, got 5"),
    ("relpos_grid_columns", lambda: SM.relative_position_bias(np.ones((2, 48), f32), shape=(4, 4)),
     ValueError, r"\btable must have prod\(2\*R\+1\) = 49 columns"),
    ("relpos_shape_rank4", lambda: SM.relative_position_bias(np.ones((2, 81), f32),
                                                             shape=(2, 2, 2, 2)),
     ValueError, r"\bshape must have 1 to 3 axes"),
    ("relpos_max_distance_len",
     lambda: SM.relative_position_bias(np.ones((2, 7), f32), shape=(4, 4), max_distance=(3,)),
     ValueError, r"\bmax_distance\b"),
    ("temperature_zero", lambda: SM.temperature(0), ValueError, r"\btau must be a positive"),
    ("temperature_negative", lambda: SM.temperature(-2.0), ValueError, r"\btau must be a positive"),
    ("temperature_string", lambda: SM.temperature("2"), ValueError, r"\btau must be a positive"),
    ("temperature_bool", lambda: SM.temperature(True), (ValueError, TypeError), r"\btau\b"),
    ("softcap_zero", lambda: SM.softcap(0.0), ValueError, r"\bcap must be a positive"),
    ("softcap_negative", lambda: SM.softcap(-30), ValueError, r"\bcap must be a positive"),
    ("softcap_bool", lambda: SM.softcap(True), (ValueError, TypeError), r"\bcap\b"),
    ("compose_int", lambda: SM.compose(SM.temperature(2.0), 1), TypeError,
     r"\bmods\[1\] must be callable"),
    ("compose_none", lambda: SM.compose(None), TypeError, r"\bmods\[0\] must be callable"),
]


@pytest.mark.parametrize("make,exc,pattern", [c[1:] for c in SCORE_MOD_CASES],
                         ids=[c[0] for c in SCORE_MOD_CASES])
def test_score_mods_reject(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()

