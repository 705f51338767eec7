"""Ragged decoding: per-sequence cache lengths, right-padded prompts in one batch.

A batch of prompts of different lengths (left-aligned, padded on the right) decodes
together, each row at its own positions: greedy `generate(..., prompt_lengths=)` equals
generating each sequence alone, token for token, and the logits of a ragged prefill plus
one-token steps equal each sequence's full forward pass. Dense, GQA (scanned layers),
sliding window, sinks and linear layers; the layer-level cache (`lengths`, per-row
writes, padding overwritten) and argument errors.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from attnjax import layers, masks, models

TOL = dict(rtol=2e-5, atol=2e-5)
LENS = (5, 2, 4)          # the first row is the longest: P = 5
NEW = 4


def _model(variant):
  cfg = models.default_config("lm")
  for k, v in variant.items():
    setattr(cfg, k, ml_collections.ConfigDict(v) if isinstance(v, dict) else v)
  return models.build_model(cfg, rngs=nnx.Rngs(0))


def _ragged_prompt(seed=0, lens=LENS, vocab=64):
  P = max(lens)
  rng = np.random.default_rng(seed)
  prompt = rng.integers(1, vocab, size=(len(lens), P)).astype(np.int32)
  # padding holds arbitrary (nonzero) tokens: it must not matter
  return jnp.asarray(prompt), jnp.asarray(lens, jnp.int32)


VARIANTS = [
    # one model covering them all (GQA softmax layers)
    pytest.param(dict(num_kv_heads=2, num_layers=4, layers_attention=[
        {"name": "sliding_window", "window": 3}, {"name": "sinks", "window": 4},
        {"name": "retention", "gate": True}, {"name": "mha"}]), id="mixed_gqa",
                 marks=pytest.mark.slow),
    pytest.param(dict(), id="dense", marks=pytest.mark.slow),
    pytest.param(dict(num_kv_heads=2, scan_layers=True), id="gqa_scan", marks=pytest.mark.slow),
    pytest.param(dict(layers_attention=[{"name": "sliding_window", "window": 3},
                                        {"name": "mha"}]), id="sliding_window",
                 marks=pytest.mark.slow),
    pytest.param(dict(attention={"name": "sinks", "window": 4}, num_kv_heads=1), id="sinks",
                 marks=pytest.mark.slow),
    pytest.param(dict(layers_attention=[{"name": "retention", "gate": True},
                                        {"name": "mha"}]), id="linear_retention",
                 marks=pytest.mark.slow),
]


def _assert_logits_match(model, prompt, lens, out, new):
  """Ragged prefill + one-token steps (the tokens `out` generated) give each row the
  logits of its own sequence's full forward pass."""
  B = len(lens)
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda s, t, c, ln=None: nnx.merge(graphdef, s)(t, cache=c, lengths=ln))
  cache = model.init_cache(B, max(lens) + new)
  logits, cache = run(state, prompt, cache, jnp.asarray(lens, jnp.int32))
  rows = [[np.asarray(logits[b, :n])] for b, n in enumerate(lens)]
  for i in range(new - 1):
    tok = jnp.asarray([[out[b, n + i]] for b, n in enumerate(lens)], jnp.int32)
    logits, cache = run(state, tok, cache)
    for b in range(B):
      rows[b].append(np.asarray(logits[b]))
  last = cache[-1] if isinstance(cache, list) else cache       # scanned layers: stacked
  got = last["lengths"] if isinstance(last, dict) else last.lengths
  np.testing.assert_array_equal(np.asarray(got).reshape(-1, B)[-1], np.asarray(lens) + new - 1)
  full = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
  for b, n in enumerate(lens):
    seq = jnp.asarray(out[b:b + 1, :n + new - 1])
    np.testing.assert_allclose(np.concatenate(rows[b]), np.asarray(full(state, seq))[0], **TOL,
                               err_msg=f"row {b}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_ragged_equals_per_sequence(variant):
  model = _model(variant)
  prompt, lens = _ragged_prompt()
  out = np.asarray(models.generate(model, prompt, NEW, prompt_lengths=lens))
  assert out.shape == (3, max(LENS) + NEW)
  for b, n in enumerate(LENS):
    alone = np.asarray(models.generate(model, prompt[b:b + 1, :n], NEW))[0]
    np.testing.assert_array_equal(out[b, :n + NEW], alone, err_msg=f"row {b}")
    assert np.all(out[b, n + NEW:] == 0)

  _assert_logits_match(model, prompt, LENS, out, NEW)


def test_generate_ragged_small():
  """The default-suite end-to-end case (the full matrix above is slow): one GQA layer with
  a sliding window and sinks, then a retention layer; greedy tokens equal per-sequence
  generation and the logits each sequence's full forward pass."""
  model = _model(dict(num_kv_heads=2, layers_attention=[{"name": "sinks", "window": 2},
                                                        {"name": "retention"}]))
  prompt, lens = _ragged_prompt(seed=2, lens=(4, 1))
  out = np.asarray(models.generate(model, prompt, 3, prompt_lengths=lens))
  for b, n in enumerate((4, 1)):
    alone = np.asarray(models.generate(model, prompt[b:b + 1, :n], 3))[0]
    np.testing.assert_array_equal(out[b, :n + 3], alone, err_msg=f"row {b}")
  _assert_logits_match(model, prompt, (4, 1), out, 3)


def test_layer_cache_per_row_lengths_and_padding():
  """MHA layer with RoPE, causal & sliding window, ALiBi: a ragged prefill writes each
  row at its own slots, padding queries return 0, the next call overwrites padding and
  every real output equals the row's own full forward."""
  D, B = 16, 3
  layer = layers.MultiHeadAttention(D, 4, num_kv_heads=2, causal=True, rope="1d", alibi=True,
                                    mask=layers.MaskSpec("sliding_window", left=3),
                                    rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(2), (B, 7, D))
  lens = jnp.asarray([4, 1, 3], jnp.int32)
  seg = jnp.where(jnp.arange(4)[None] < lens[:, None], 0, -1)
  run = jax.jit(lambda a, c, s=None: layer(a, segment_ids=s, cache=c))
  cache = layer.init_cache(B, 8)
  assert cache.lengths.shape == (B,) and cache.uniform
  y0, cache = run(x[:, :4], cache, seg)
  np.testing.assert_array_equal(cache.lengths, lens)
  assert not cache.uniform
  assert np.all(np.asarray(y0)[1, 1:] == 0) and np.all(np.asarray(y0)[2, 3:] == 0)
  # rows continue from their own lengths with tokens x[b, len_b:len_b + 2]
  step = jnp.stack([x[b, int(n):int(n) + 2] for b, n in enumerate(lens)])
  y1, cache = run(step, cache)
  np.testing.assert_array_equal(cache.lengths, lens + 2)
  for b, n in enumerate(np.asarray(lens)):
    full, alone = run(x[b:b + 1, :n + 2], layer.init_cache(1, 8))
    np.testing.assert_allclose(y0[b, :n], full[0, :n], **TOL)
    np.testing.assert_allclose(y1[b], full[0, n:], **TOL)
    # keys of row b sit at slots 0 .. n + 1 (padding slots were overwritten)
    kfull = alone.k
    np.testing.assert_allclose(cache.k[b, :n + 2], kfull[0, :n + 2], **TOL)


def test_linear_layer_ragged_state_is_each_rows_own():
  """A ragged prefill leaves each row's recurrent state at its own length."""
  from attnjax import variants
  layer = variants.build("lightning", d_model=16, num_heads=4, rngs=nnx.Rngs(0), rope="1d")
  run = jax.jit(lambda a, c, s=None: layer(a, segment_ids=s, cache=c))   # not op by op
  x = jax.random.normal(jax.random.key(5), (2, 6, 16))
  lens = jnp.asarray([6, 3], jnp.int32)
  seg = jnp.where(jnp.arange(6)[None] < lens[:, None], 0, -1)
  y, cache = run(x, layer.init_cache(2, 8), seg)
  np.testing.assert_array_equal(cache["lengths"], lens)
  for b, n in enumerate(np.asarray(lens)):
    yb, cb = run(x[b:b + 1, :n], layer.init_cache(1, 8))
    np.testing.assert_allclose(y[b, :n], yb[0], **TOL)
    np.testing.assert_allclose(cache["state"][b], cb["state"][0], **TOL)
  assert np.all(np.asarray(y)[1, 3:] == 0)


def test_ragged_errors():
  model = _model({})
  prompt, lens = _ragged_prompt()
  with pytest.raises(ValueError, match="prompt_lengths must be in"):
    models.generate(model, prompt, 2, prompt_lengths=jnp.asarray([5, 0, 3]))
  with pytest.raises(ValueError, match="prompt_lengths must be int"):
    models.generate(model, prompt, 2, prompt_lengths=jnp.asarray([5, 2]))
  with pytest.raises(ValueError, match="lengths= marks padding"):
    model(prompt, lengths=lens)
  with pytest.raises(ValueError, match="not both"):
    model(prompt, lengths=lens, segment_ids=jnp.zeros_like(prompt), cache=model.init_cache(3, 8))


def test_row_shifted_mask_equals_per_row_shift():
  """The per-row mask of a ragged cache equals `mask.shifted(offset_b, 0)` row by row."""
  from attnjax.layers import _core
  m = masks.causal() & masks.sliding_window(2)
  offs = jnp.asarray([3, 0, 5], jnp.int32)
  arr = _core._row_shifted_mask(m, offs, 2, 9, 4, 3).to_array(2, 9, batch=3)
  for b in range(3):
    want = m.shifted(int(offs[b]), 0).to_array(2, 9)
    np.testing.assert_array_equal(np.asarray(arr)[b, 0], np.asarray(want)[0, 0])


def test_paged_cache_equals_contiguous():
  """A paged cache (pool of pages, a shuffled page table with spare pages) gives the same
  outputs as the contiguous cache over a ragged prefill and steps, and its gathered rows
  equal the contiguous cache's."""
  D, B, ps = 16, 2, 3
  layer = layers.MultiHeadAttention(D, 4, num_kv_heads=2, causal=True, rope="1d", sinks=True,
                                    mask=layers.MaskSpec("sliding_window", left=4),
                                    rngs=nnx.Rngs(3))
  x = jax.random.normal(jax.random.key(4), (B, 9, D))
  lens = jnp.asarray([5, 2], jnp.int32)
  seg = jnp.where(jnp.arange(5)[None] < lens[:, None], 0, -1)
  table = jnp.asarray([[7, 2, 5], [0, 6, 3]], jnp.int32)          # 3 pages per row, 8 in pool
  paged = layers.init_kv_cache(layer.config, B, 9, page_size=ps, num_pages=8, page_table=table)
  flat = layer.init_cache(B, 9)
  assert paged.paged and paged.max_len == 9 and paged.k.shape == (8, 2, ps, 4)
  run = jax.jit(lambda a, c, s=None: layer(a, segment_ids=s, cache=c))
  ya, paged = run(x[:, :5], paged, seg)
  yb, flat = run(x[:, :5], flat, seg)
  np.testing.assert_allclose(ya, yb, **TOL)
  for t in range(3):
    step = jnp.stack([x[b, int(n) + t:int(n) + t + 1] for b, n in enumerate(lens)])
    ya, paged = run(step, paged)
    yb, flat = run(step, flat)
    np.testing.assert_allclose(ya, yb, **TOL)
  np.testing.assert_array_equal(paged.lengths, lens + 3)
  from attnjax.layers import _core
  for b, n in enumerate(np.asarray(lens + 3)):
    np.testing.assert_allclose(_core._row_view(paged, paged.k)[b, :n], flat.k[b, :n], **TOL)
  assert np.all(np.asarray(paged.k)[[1, 4]] == 0)                  # spare pages untouched
  with pytest.raises(ValueError, match="page_table must be int"):
    layers.init_kv_cache(layer.config, B, 9, page_size=ps, page_table=table[:, :2])
  with pytest.raises(ValueError, match="num_pages=3 is fewer"):
    layers.init_kv_cache(layer.config, B, 9, page_size=ps, num_pages=3)


def test_generate_paged_equals_contiguous():
  model = _model(dict(num_kv_heads=2, scan_layers=True))
  prompt, lens = _ragged_prompt(seed=1)
  want = models.generate(model, prompt, NEW, prompt_lengths=lens)
  got = models.generate(model, prompt, NEW, prompt_lengths=lens, page_size=2)
  np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match="page_size must be"):
    models.generate(model, prompt, NEW, page_size=0)


GATED = ("gla", "deltanet", "gated_deltanet", "mamba2")


# Default suite: gla (per-dimension gate) and gated_deltanet (delta rule + scalar gate);
# deltanet and mamba2 under -m slow.
@pytest.mark.parametrize("mechanism", [
    m if m in ("gla", "gated_deltanet") else pytest.param(m, marks=pytest.mark.slow)
    for m in GATED])
def test_gated_layer_ragged_state_and_conv_are_each_rows_own(mechanism):
  """A ragged prefill of a gated / delta-rule / Mamba-2 layer (chunked form, padding inside
  and across chunks) leaves each row's recurrent state and short-conv inputs at its own
  length; real outputs equal the row's own, padding outputs are 0, and the next step
  (RoPE at each row's own position) equals the row's own step."""
  from attnjax import variants
  layer = variants.build(mechanism, d_model=16, num_heads=4, num_kv_heads=2, chunk_size=2,
                         rope="1d", rngs=nnx.Rngs(7))
  # Every call jitted: eagerly each primitive of the layer compiles separately.
  run = jax.jit(lambda a, c, s=None: layer(a, segment_ids=s, cache=c))
  x = jax.random.normal(jax.random.key(8), (3, 8, 16))
  lens = jnp.asarray([7, 1, 4], jnp.int32)
  seg = jnp.where(jnp.arange(7)[None] < lens[:, None], 0, -1)
  y, cache = run(x[:, :7], layer.init_cache(3, 9), seg)
  np.testing.assert_array_equal(cache["lengths"], lens)
  step = jnp.stack([x[b, int(n):int(n) + 1] for b, n in enumerate(lens)])
  y1, cache1 = run(step, cache)
  np.testing.assert_array_equal(cache1["lengths"], lens + 1)
  for b, n in enumerate(np.asarray(lens)):
    yb, cb = run(x[b:b + 1, :n], layer.init_cache(1, 9))
    np.testing.assert_allclose(y[b, :n], yb[0], **TOL, err_msg=f"row {b}")
    assert np.all(np.asarray(y)[b, n:] == 0)
    np.testing.assert_allclose(cache["state"][b], cb["state"][0], **TOL)
    assert len(cache["conv"]) == (0 if mechanism == "gla" else 3)
    for got, want in zip(cache["conv"], cb["conv"]):
      np.testing.assert_allclose(got[b], want[0], **TOL)
    yb1, _ = run(x[b:b + 1, n:n + 1], cb)
    np.testing.assert_allclose(y1[b], yb1[0], **TOL, err_msg=f"row {b} step")


@pytest.mark.parametrize("mechanism", [
    "gla", *(pytest.param(m, marks=pytest.mark.slow) for m in GATED[1:])])
def test_generate_ragged_gated_equals_per_sequence(mechanism):
  """generate(prompt_lengths=) with a gated / delta-rule / Mamba-2 layer (plus an MHA
  layer) equals per-sequence generation, tokens and logits."""
  model = _model(dict(num_kv_heads=2, layers_attention=[{"name": mechanism, "chunk_size": 2},
                                                        {"name": "mha"}]))
  prompt, lens = _ragged_prompt(seed=3)
  out = np.asarray(models.generate(model, prompt, NEW, prompt_lengths=lens))
  for b, n in enumerate(LENS):
    alone = np.asarray(models.generate(model, prompt[b:b + 1, :n], NEW))[0]
    np.testing.assert_array_equal(out[b, :n + NEW], alone, err_msg=f"row {b}")
    assert np.all(out[b, n + NEW:] == 0)
  _assert_logits_match(model, prompt, LENS, out, NEW)
