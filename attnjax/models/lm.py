"""Decoder-only language model with per-layer attention variants, KV-cache decoding.

`logits = Unembed(RMS(Block_L(... Block_1(Embed(tokens)))))`, pre-norm blocks with RMSNorm,
gated (SwiGLU) MLPs and RoPE ("LLaMA: Open and Efficient Foundation Language Models"
architecture family). Each layer's attention comes from `attnjax.variants` by name, so
layers may interleave mechanisms (e.g. sliding-window and global).

Decoding: `model.init_cache(batch, max_len)` gives one cache per layer (static max
length, one length per sequence); `model(tokens, cache=cache)` consumes `tokens [B, t]` at
row `b`'s positions `lengths[b] ..` and returns `(logits, cache)`; `lengths=` [B] marks
right padding (ragged prompts: row `b` has `lengths[b]` real tokens). Prefill then
one-token steps equal the full forward pass, and a ragged batch equals per-sequence
decoding (tested). `generate` drives it under `jax.jit`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.core.precision import einsum_f32
from attnjax.layers import Dense, Embed, RMSNorm, constrain
from attnjax.models import common as C

__all__ = ["DecoderLM", "generate", "sample_logits"]


class DecoderLM(nnx.Module):
  """Decoder-only LM. `model(tokens [B,T] int32, *, segment_ids=None, positions=None,
  cache=None, deterministic=True) -> logits [B, T, vocab] float32` (and the new cache when
  `cache` is given).

  Config fields: vocab_size, d_model, num_layers, num_heads, num_kv_heads, head_dim,
  mlp_dim, dropout_rate, dtype, attention / layers_attention, causal (default True),
  position_embedding ('rope' | 'none'), rope_base, tie_embeddings, remat_policy, scan_layers.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    vocab = C.positive(cfg, "vocab_size")
    d_model, num_heads, num_kv_heads, head_dim = C.heads_of(cfg)
    num_layers = C.positive(cfg, "num_layers")
    mlp_dim = C.positive(cfg, "mlp_dim")
    self.dtype = C.dtype_of(cfg)
    self.vocab_size = vocab
    self.causal = bool(C.get(cfg, "causal", True))
    _, rope = C.rope_option(cfg, "1d", ("rope", "none"))
    defaults = {"causal": self.causal} if self.causal else {}
    if rope is not None:
      defaults.update(rope=rope, rope_base=float(C.get(cfg, "rope_base", 10000.0)))
    self.embed = Embed(vocab, d_model, rngs=rngs)
    self.blocks = C.build_stack(cfg, num_layers=num_layers, d_model=d_model, num_heads=num_heads,
                                num_kv_heads=num_kv_heads, head_dim=head_dim, mlp_dim=mlp_dim,
                                defaults=defaults, rngs=rngs)
    self.final_norm = RMSNorm(d_model, rngs=rngs)
    self.tie_embeddings = bool(C.get(cfg, "tie_embeddings", False))
    self.unembed = None if self.tie_embeddings else Dense(
        d_model, vocab, names=("embed", "vocab"), use_bias=False, rngs=rngs)

  def init_cache(self, batch: int, max_len: int, *, page_size: int | None = None):
    """Per-layer decoding caches for `batch` sequences of up to `max_len` tokens; with
    `page_size`, the softmax layers' KV caches are paged (`attnjax.layers.KVCache`)."""
    caches = self.blocks.init_cache(batch, max_len, self.dtype)
    if page_size is None:
      return caches
    from attnjax.layers import _core  # pylint: disable=import-outside-toplevel
    page = lambda c: _core.paged_like(c, page_size) if isinstance(c, _core.KVCache) else c
    if isinstance(caches, list):
      return [page(c) for c in caches]
    return page(caches)

  def __call__(self, tokens, *, segment_ids=None, positions=None, cache=None, lengths=None,
               deterministic: bool = True):
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    if lengths is not None:
      segment_ids = _padding_segment_ids(tokens, lengths, segment_ids, cache)
    x = self.embed(tokens).astype(self.dtype)
    x = constrain(x, ("batch", "length", "embed"))
    out = self.blocks(x, segment_ids=segment_ids, positions=positions, cache=cache,
                      deterministic=deterministic)
    x, new_cache = out if cache is not None else (out, None)
    x = self.final_norm(x)
    if self.tie_embeddings:
      logits = einsum_f32("btd,vd->btv", x, self.embed.embedding[...].astype(x.dtype))
    else:
      logits = self.unembed(x)
    logits = constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))
    return logits if cache is None else (logits, new_cache)


def _padding_segment_ids(tokens, lengths, segment_ids, cache):
  """Segment ids `0` for the first `lengths[b]` tokens of row `b`, `-1` (padding) after."""
  if cache is None:
    raise ValueError("lengths= marks padding of a cached (decoding) call; pass cache=")
  if segment_ids is not None:
    raise ValueError("pass lengths= or segment_ids=, not both")
  lengths = jnp.asarray(lengths)
  B, T = tokens.shape
  if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths must be int [B={B}], got shape {lengths.shape}, dtype "
                     f"{lengths.dtype}")
  return jnp.where(jnp.arange(T, dtype=jnp.int32)[None, :] < lengths[:, None], 0, -1
                   ).astype(jnp.int32)


def sample_logits(logits, rng, *, temperature: float, top_k: int | None):
  """Next token from `logits [B, V]`: argmax if temperature == 0, else sample from
  `softmax(logits / temperature)` restricted to the `top_k` largest (all if None)."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "max_len", "temperature",
                                             "top_k", "ragged", "page_size"))
def _generate(graphdef, state, prompt, prompt_lengths, rng, *, max_new_tokens, max_len,
              temperature, top_k, ragged, page_size):
  model = nnx.merge(graphdef, state)
  B, P = prompt.shape
  cache = model.init_cache(B, max_len, page_size=page_size)
  rows = jnp.arange(B)
  if ragged:
    logits, cache = model(prompt, cache=cache, lengths=prompt_lengths)
  else:
    logits, cache = model(prompt, cache=cache)
  rng, sub = jax.random.split(rng)
  first = sample_logits(logits[rows, prompt_lengths - 1], sub, temperature=temperature,
                        top_k=top_k)
  out = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(first)

  def step(i, carry):
    out, cache, rng, st = carry
    tok = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)
    # the model state rides in the loop carry and is merged inside the body: nnx
    # transforms (scan over layers) need graph nodes of the current trace level.
    logits, cache = nnx.merge(graphdef, st)(tok, cache=cache)
    rng, sub = jax.random.split(rng)
    nxt = sample_logits(logits[:, -1], sub, temperature=temperature, top_k=top_k)
    out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], i, axis=1)
    return out, cache, rng, st

  out, _, _, _ = jax.lax.fori_loop(1, max_new_tokens, step, (out, cache, rng, state))
  # row b: its prompt, its new tokens, then padding (0)
  full = jnp.zeros((B, P + max_new_tokens), jnp.int32)
  full = full.at[:, :P].set(jnp.where(jnp.arange(P)[None] < prompt_lengths[:, None],
                                      prompt.astype(jnp.int32), 0))
  pos = prompt_lengths[:, None] + jnp.arange(max_new_tokens)[None, :]
  return full.at[rows[:, None], pos].set(out)


def generate(model: DecoderLM, prompt, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, *, rng=None, max_len: int | None = None,
             prompt_lengths=None, page_size: int | None = None):
  """Autoregressive decoding with a static-length KV cache.

  Args:
    model: a `DecoderLM` (any layers whose attention supports `init_cache`).
    prompt: `[B, P]` int tokens; with `prompt_lengths`, row `b`'s prompt is
      `prompt[b, :prompt_lengths[b]]` (right padding, any token).
    max_new_tokens: number of tokens to append (>= 1).
    temperature: 0 -> greedy argmax; > 0 -> sampling from `softmax(logits / temperature)`.
    top_k: restrict sampling to the k most likely tokens (None = all).
    rng: a PRNG key (required when temperature > 0).
    max_len: cache length (default `P + max_new_tokens`).
    prompt_lengths: `[B]` ints in `[1, P]` (None: every row has `P` tokens). Ragged
      prompts decode together, each row at its own positions (per-row cache lengths);
      greedy decoding equals decoding each sequence alone.
    page_size: None (contiguous KV caches) or the page size of paged KV caches (same
      tokens; see `attnjax.layers.KVCache`).
  Returns:
    `[B, P + max_new_tokens]` int32: row `b` holds its prompt, its `max_new_tokens` new
    tokens, then `P - prompt_lengths[b]` zeros.
  """
  if not isinstance(model, DecoderLM):
    raise TypeError(f"model must be an attnjax DecoderLM, got {type(model).__name__}")
  prompt = jnp.asarray(prompt)
  if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer) or prompt.shape[1] < 1:
    raise ValueError(f"prompt must be a non-empty int array [B, P], got shape {prompt.shape}, "
                     f"dtype {prompt.dtype}")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
  temperature = float(temperature)
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got temperature={temperature}")
  if top_k is not None and (not isinstance(top_k, int) or not 1 <= top_k <= model.vocab_size):
    raise ValueError(f"top_k must be None or an int in [1, vocab_size={model.vocab_size}], got "
                     f"top_k={top_k!r}")
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs rng=jax.random.key(...)")
  B, P = prompt.shape
  ragged = prompt_lengths is not None
  if ragged:
    prompt_lengths = jnp.asarray(prompt_lengths)
    if prompt_lengths.shape != (B,) or not jnp.issubdtype(prompt_lengths.dtype, jnp.integer):
      raise ValueError(f"prompt_lengths must be int [B={B}], got shape {prompt_lengths.shape}, "
                       f"dtype {prompt_lengths.dtype}")
    if not isinstance(prompt_lengths, jax.core.Tracer):
      lo, hi = int(jnp.min(prompt_lengths)), int(jnp.max(prompt_lengths))
      if lo < 1 or hi > P:
        raise ValueError(f"prompt_lengths must be in [1, P={P}], got min {lo}, max {hi}")
    prompt_lengths = prompt_lengths.astype(jnp.int32)
  else:
    prompt_lengths = jnp.full((B,), P, jnp.int32)
  if page_size is not None and (isinstance(page_size, bool) or not isinstance(page_size, int)
                                or page_size < 1):
    raise ValueError(f"page_size must be None or a positive int, got page_size={page_size!r}")
  total = P + max_new_tokens
  max_len = total if max_len is None else max_len
  if max_len < total:
    raise ValueError(f"max_len={max_len} is shorter than prompt + max_new_tokens = {total}")
  graphdef, state = nnx.split(model)
  rng = jax.random.key(0) if rng is None else rng
  return _generate(graphdef, state, prompt, prompt_lengths, rng, max_new_tokens=max_new_tokens,
                   max_len=max_len, temperature=temperature, top_k=top_k, ragged=ragged,
                   page_size=page_size)
