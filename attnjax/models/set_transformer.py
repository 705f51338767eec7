"""Set Transformer shell: permutation-equivariant encoder + attention pooling.

"Set Transformer: A Framework for Attention-based Permutation-Invariant Neural Networks"
(Lee et al., 2019): `x [B, n, d_in] -> Linear -> SAB x L -> PMA_k -> RMSNorm -> flatten ->
Linear -> [B, num_outputs]`. SAB blocks are the pre-norm blocks of `attnjax.models.blocks`
without positions (no RoPE, no mask unless the spec sets one); PMA is any 'pooling'
variant of `attnjax.variants` (`cfg.pooling`, default 'pma'), with a residual MLP;
`pooling={'name': 'mean'}` averages the elements instead (the paper's "SAB + pooling"
baseline, Deep Sets' sum/mean; `num_seeds` must be 1).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from attnjax import variants
from attnjax.layers import MLP, Dense, RMSNorm, constrain
from attnjax.models import common as C

__all__ = ["SetTransformer"]


class SetTransformer(nnx.Module):
  """`model(x [B, n, d_in] float, *, segment_ids=None, deterministic=True) -> [B, num_classes]`.

  Config fields: input_dim, num_classes, d_model, num_layers, num_heads, num_kv_heads,
  head_dim, mlp_dim, dropout_rate, dtype, attention / layers_attention (SAB mechanism),
  pooling (a 'pooling' variant spec, default {'name': 'pma'}, or {'name': 'mean'} for the
  mean over the elements), num_seeds (default 1),
  remat_policy, scan_layers. `segment_ids [B, n]`: negative ids mark padding elements.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.input_dim = C.positive(cfg, "input_dim")
    d_model, num_heads, num_kv_heads, head_dim = C.heads_of(cfg)
    num_classes = C.positive(cfg, "num_classes")
    self.num_seeds = C.positive(cfg, "num_seeds", 1)
    self.dtype = C.dtype_of(cfg)
    pooling = C.get(cfg, "pooling", None) or {"name": "pma"}
    pooling = pooling.to_dict() if hasattr(pooling, "to_dict") else dict(pooling)
    pname = pooling.pop("name", "pma")
    if pname == "mean" and (pooling or self.num_seeds != 1):
      raise ValueError(f"pooling 'mean' takes no options and needs num_seeds=1, got options "
                       f"{sorted(pooling)} and num_seeds={self.num_seeds}")
    entry = None if pname == "mean" else variants.info(pname)
    if entry is not None and entry.kind != "pooling":
      raise ValueError(f"pooling must name a 'pooling' variant, got {pname!r} of kind "
                       f"{entry.kind!r}")
    self.embed = Dense(self.input_dim, d_model, names=(None, "embed"), rngs=rngs)
    self.blocks = C.build_stack(cfg, num_layers=C.positive(cfg, "num_layers"), d_model=d_model,
                                num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                mlp_dim=C.positive(cfg, "mlp_dim"), defaults={}, rngs=rngs)
    self.pool_norm = RMSNorm(d_model, rngs=rngs)
    if entry is None:
      self.pool = None
    else:
      pooling.setdefault("num_seeds", self.num_seeds)
      self.pool = entry.factory(d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                head_dim=head_dim, rngs=rngs, **pooling)
    self.mlp_norm = RMSNorm(d_model, rngs=rngs)
    self.mlp = MLP(d_model, C.positive(cfg, "mlp_dim"), dtype=self.dtype, rngs=rngs)
    self.final_norm = RMSNorm(d_model, rngs=rngs)
    self.head = Dense(self.num_seeds * d_model, num_classes, names=(None, "classes"), rngs=rngs)

  def __call__(self, x, *, segment_ids=None, deterministic: bool = True):
    if x.ndim != 3 or x.shape[-1] != self.input_dim:
      raise ValueError(f"x must be [B, n, input_dim={self.input_dim}], got shape {x.shape}")
    h = self.embed(x.astype(self.dtype))
    h = constrain(h, ("batch", "length", "embed"))
    # padding elements (negative ids) see only each other in SABs; PMA ignores them.
    h = self.blocks(h, segment_ids=segment_ids, deterministic=deterministic)
    if self.pool is None:  # mean over the real (id >= 0) elements
      z = self.pool_norm(h)
      w = (jnp.ones(z.shape[:2], jnp.float32) if segment_ids is None
           else (segment_ids >= 0).astype(jnp.float32))[..., None]
      s = (jnp.sum(z.astype(jnp.float32) * w, axis=1, keepdims=True)
           / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0)).astype(z.dtype)
    else:
      kw = {} if segment_ids is None else {"segment_ids": segment_ids}
      s = self.pool(self.pool_norm(h), deterministic=deterministic, **kw)
    if s.shape[1] != self.num_seeds:
      raise ValueError(f"pooling layer returned {s.shape[1]} outputs, expected "
                       f"num_seeds={self.num_seeds}")
    s = s + self.mlp(self.mlp_norm(s), deterministic=deterministic)
    s = self.final_norm(s)
    return self.head(s.reshape(s.shape[0], -1)).astype(jnp.float32)
