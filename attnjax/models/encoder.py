"""Bidirectional transformer encoder for masked-LM, sequence and token classification.

Pre-norm blocks as in `attnjax.models.lm` without the causal mask (BERT-style encoder:
"BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding").
Heads: MLM logits `[B, T, vocab]` (num_classes == 0), pooled classification `[B, C]`
(pool 'cls' prepends a learned token, 'mean' averages tokens), or per-token
classification `[B, T, C]` (head='token', for probes such as the argmax-position task).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.layers import Dense, Embed, RMSNorm, constrain
from attnjax.models import common as C
from attnjax.ops import positional

__all__ = ["Encoder"]


class Encoder(nnx.Module):
  """`model(tokens [B,T], *, segment_ids=None, deterministic=True)` -> logits float32.

  Config fields: vocab_size, max_len, d_model, num_layers, num_heads, num_kv_heads,
  head_dim, mlp_dim, dropout_rate, dtype, attention / layers_attention, num_classes,
  head ('sequence' | 'token'), pool ('cls' | 'mean'), position_embedding ('rope' |
  'learned' | 'sinusoidal' | 'none'), causal (default False), remat_policy, scan_layers.

  With pool='mean' and segment_ids, tokens with id 0 are treated as padding and left out
  of the mean (ids > 0 are real tokens).
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    vocab = C.positive(cfg, "vocab_size")
    d_model, num_heads, num_kv_heads, head_dim = C.heads_of(cfg)
    self.dtype = C.dtype_of(cfg)
    self.num_classes = int(C.get(cfg, "num_classes", 0) or 0)
    if self.num_classes < 0:
      raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
    self.head = C.choice(cfg, "head", ("sequence", "token"), "sequence")
    self.pool = C.choice(cfg, "pool", ("cls", "mean"), "cls")
    self.pe, rope = C.rope_option(cfg, "1d", ("rope", "learned", "sinusoidal", "none"))
    self.max_len = C.positive(cfg, "max_len")
    causal = bool(C.get(cfg, "causal", False))
    defaults = {"causal": causal} if causal else {}
    if rope is not None:
      defaults.update(rope=rope, rope_base=float(C.get(cfg, "rope_base", 10000.0)))
    self.use_cls = self.num_classes > 0 and self.head == "sequence" and self.pool == "cls"
    self.embed = Embed(vocab, d_model, rngs=rngs)
    table_len = self.max_len + int(self.use_cls)
    self.pos_embed = (C.learned_table(rngs, (table_len, d_model), (None, "embed"),
                                      jax.nn.initializers.normal(0.02))
                      if self.pe == "learned" else None)
    self.cls = (C.learned_table(rngs, (1, d_model), (None, "embed"),
                                jax.nn.initializers.normal(0.02))
                if self.use_cls else None)
    self.blocks = C.build_stack(cfg, num_layers=C.positive(cfg, "num_layers"), d_model=d_model,
                                num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                mlp_dim=C.positive(cfg, "mlp_dim"), defaults=defaults, rngs=rngs)
    self.final_norm = RMSNorm(d_model, rngs=rngs)
    if self.num_classes == 0:
      self.out = Dense(d_model, vocab, names=("embed", "vocab"), use_bias=False, rngs=rngs)
    else:
      self.out = Dense(d_model, self.num_classes, names=("embed", "classes"), rngs=rngs)

  def __call__(self, tokens, *, segment_ids=None, deterministic: bool = True):
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    B, T = tokens.shape
    if T > self.max_len:
      raise ValueError(f"tokens has T={T} > max_len={self.max_len}")
    x = self.embed(tokens)
    if self.use_cls:
      x = jnp.concatenate([jnp.broadcast_to(self.cls[...], (B, 1, x.shape[-1])), x], axis=1)
      if segment_ids is not None:
        segment_ids = jnp.concatenate([segment_ids[:, :1], segment_ids], axis=1)
    L = x.shape[1]
    if self.pe == "learned":
      x = x + self.pos_embed[...][:L]
    elif self.pe == "sinusoidal":
      x = x + positional.sinusoidal_embedding(jnp.arange(L), x.shape[-1])
    x = constrain(x.astype(self.dtype), ("batch", "length", "embed"))
    x = self.blocks(x, segment_ids=segment_ids, deterministic=deterministic)
    x = self.final_norm(x)
    if self.num_classes == 0 or self.head == "token":
      logits = self.out(x)
      if self.use_cls:
        logits = logits[:, 1:]
      return logits.astype(jnp.float32)
    if self.pool == "cls":
      pooled = x[:, 0]
    elif segment_ids is None:
      pooled = jnp.mean(x, axis=1)
    else:
      w = (segment_ids > 0).astype(jnp.float32)[..., None]
      pooled = jnp.sum(x.astype(jnp.float32) * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    return self.out(pooled).astype(jnp.float32)
