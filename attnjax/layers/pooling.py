"""Pooling by multi-head attention (PMA), NNX.

Paper: "Set Transformer: A Framework for Attention-based Permutation-Invariant Neural
Networks" (Lee et al., 2019). `k` learnable seed vectors `S [k, D]` cross-attend to the
set: `PMA_k(Z) = MHA(S, Z)`, output `[B, k, D]`, invariant to the order of the set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.layers._core import ParamSpec, _positive_int
from attnjax.layers.attention import MultiHeadAttention, make_param

__all__ = ["PoolingAttention", "pooling_segment_ids", "SEED_INIT"]

SEED_INIT = jax.nn.initializers.normal(0.02)


def pooling_segment_ids(x, segment_ids, num_seeds):
  """(seed ids, element ids) for `attnjax.attention`: elements with id < 0 are padding."""
  if segment_ids is None:
    return None, None
  B, n = x.shape[:2]
  if segment_ids.shape != (B, n):
    raise ValueError(f"segment_ids must be [B, n] = [{B}, {n}], got shape {segment_ids.shape}")
  kv = jnp.where(segment_ids >= 0, 0, -1).astype(jnp.int32)
  return jnp.zeros((B, num_seeds), jnp.int32), kv


class PoolingAttention(nnx.Module):
  """PMA: learnable seeds attend to a set `x [B, n, D]` -> `[B, num_seeds, D]`.

  Args:
    d_model, num_heads, num_kv_heads, head_dim: as in `MultiHeadAttention`.
    num_seeds: k, the number of pooled outputs.
    **options: further `MultiHeadAttention` options (qk_norm, implementation, ...).

  Call: `layer(x, *, segment_ids=None, deterministic=True)`; `segment_ids [B, n]` marks
  padding elements with negative ids (they are ignored).
  """

  def __init__(self, d_model: int, num_heads: int, *, num_seeds: int = 1, num_kv_heads=None,
               head_dim=None, param_dtype=jnp.float32, rngs: nnx.Rngs, **options):
    _positive_int("num_seeds", num_seeds)
    if options.get("causal") or options.get("rope") is not None:
      raise ValueError("PoolingAttention takes neither causal=True nor rope (sets have no order)")
    options.pop("causal", None)
    self.num_seeds = num_seeds
    self.seeds = make_param(rngs, ParamSpec((num_seeds, d_model), SEED_INIT, (None, "embed")),
                            param_dtype)
    self.attention = MultiHeadAttention(d_model, num_heads, num_kv_heads=num_kv_heads,
                                        head_dim=head_dim, param_dtype=param_dtype, rngs=rngs,
                                        **options)

  def __call__(self, x, *, segment_ids=None, positions=None, cache=None,
               deterministic: bool = True):
    if positions is not None or cache is not None:
      raise ValueError("PoolingAttention takes no positions and no cache")
    if x.ndim != 3:
      raise ValueError(f"x must be [B, n, D], got shape {x.shape}")
    q_seg, kv_seg = pooling_segment_ids(x, segment_ids, self.num_seeds)
    seeds = jnp.broadcast_to(self.seeds[...].astype(x.dtype), (x.shape[0],) + self.seeds.shape)
    return self.attention(seeds, x, segment_ids=q_seg, context_segment_ids=kv_seg,
                          deterministic=deterministic)
