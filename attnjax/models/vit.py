"""Vision transformers on a token grid: plain ViT and a hierarchical (Swin-style) ViT.

- `ViT` ("An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale"):
  non-overlapping `p x p` patches of `images [B, Hh, Ww, C]` -> linear embedding -> blocks
  on the `[B, Hh/p, Ww/p, D]` grid -> RMSNorm -> mean pool -> classes.
- `HierarchicalViT` ("Swin Transformer: Hierarchical Vision Transformer using Shifted
  Windows"): stages of blocks with 2x2 patch merging in between (`[B, h, w, C] ->
  [B, h/2, w/2, 4C] -> RMSNorm -> Linear -> 2C`); for the 'swin' variant the odd blocks
  of each stage use a shift of `window // 2` unless the spec sets `shift`.

Blocks see the token grid `[B, h, w, D]`, so every spatial mask (neighborhood, swin,
grid, axial, criss-cross) applies; 1D variants see the row-major flattening. Only
`pool='mean'` is offered: a CLS token has no place on the grid that spatial masks need.

`peg=True` (both models) inserts a positional encoding generator (`layers.PEG`,
`x + DWConv3x3(x)`, "Conditional Positional Encodings for Vision Transformers", Chu et
al.) after the first block (of each stage): the blocks are then held as `first_block`
(one layer) and `blocks` (the rest), with `peg` between them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.layers import Dense, RMSNorm, constrain
from attnjax.layers.positional import PEG
from attnjax.models import common as C
from attnjax.ops import positional

__all__ = ["ViT", "HierarchicalViT", "patchify"]


def patchify(images, patch_size: int):
  """`[B, Hh, Ww, C]` -> `[B, Hh/p, Ww/p, p*p*C]` (row-major inside each patch)."""
  if images.ndim != 4:
    raise ValueError(f"images must be [B, Hh, Ww, C], got shape {images.shape}")
  B, Hh, Ww, Cc = images.shape
  p = patch_size
  if Hh % p or Ww % p:
    raise ValueError(f"image size ({Hh}, {Ww}) must be divisible by patch_size={p}")
  x = images.reshape(B, Hh // p, p, Ww // p, p, Cc)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(B, Hh // p, Ww // p, p * p * Cc)


def _image_config(cfg):
  image_size = C.get(cfg, "image_size")
  image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  if len(image_size) != 2 or any(not isinstance(s, int) or s <= 0 for s in image_size):
    raise ValueError(f"image_size must be an int or (Hh, Ww), got {image_size!r}")
  patch = C.positive(cfg, "patch_size")
  channels = C.positive(cfg, "channels")
  if image_size[0] % patch or image_size[1] % patch:
    raise ValueError(f"image_size={image_size} must be divisible by patch_size={patch}")
  return image_size, patch, channels


def _peg_option(cfg) -> bool:
  peg = C.get(cfg, "peg", False)
  if not isinstance(peg, bool):
    raise ValueError(f"model config field peg must be a bool, got {peg!r}")
  return peg


class _PegStack(nnx.Module):
  """`first_block` (one layer), then `peg` (PEG), then `blocks` (the other layers, or
  None): a `BlockStack` with a conditional positional encoding after its first layer."""

  def __init__(self, make_stack, num_layers: int, layers_attention, dim: int, *, rngs):
    la = None if layers_attention is None else list(layers_attention)
    if la is not None and len(la) != num_layers:
      raise ValueError(f"layers_attention must have num_layers={num_layers} entries, got "
                       f"{len(la)}")
    self.first_block = make_stack(1, None if la is None else la[:1], 0)
    self.peg = PEG(dim, rngs=rngs)
    self.blocks = (make_stack(num_layers - 1, None if la is None else la[1:], 1)
                   if num_layers > 1 else None)

  def __call__(self, x, *, deterministic: bool = True):
    x = self.peg(self.first_block(x, deterministic=deterministic))
    if self.blocks is not None:
      x = self.blocks(x, deterministic=deterministic)
    return x


def _check_images(images, image_size, channels):
  if images.ndim != 4 or tuple(images.shape[1:3]) != image_size or images.shape[3] != channels:
    raise ValueError(f"images must be [B, {image_size[0]}, {image_size[1]}, {channels}], got shape "
                     f"{images.shape}")


class ViT(nnx.Module):
  """`model(images [B,Hh,Ww,C], *, deterministic=True) -> logits [B, num_classes]` float32.

  Config fields: image_size, patch_size, channels, num_classes, d_model, num_layers,
  num_heads, num_kv_heads, head_dim, mlp_dim, dropout_rate, dtype, attention /
  layers_attention, position_embedding ('learned' | 'sinusoidal' | 'rope' (axial) |
  'none'), pool ('mean'), remat_policy, scan_layers, peg (bool, default False: a PEG
  after the first block).
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.image_size, self.patch, self.channels = _image_config(cfg)
    d_model, num_heads, num_kv_heads, head_dim = C.heads_of(cfg)
    num_classes = C.positive(cfg, "num_classes")
    C.choice(cfg, "pool", ("mean",), "mean")
    self.dtype = C.dtype_of(cfg)
    self.grid = (self.image_size[0] // self.patch, self.image_size[1] // self.patch)
    self.pe, rope = C.rope_option(cfg, "axial", ("learned", "sinusoidal", "rope", "none"))
    defaults = {} if rope is None else {"rope": rope}
    self.patch_embed = Dense(self.patch * self.patch * self.channels, d_model,
                             names=("patch", "embed"), rngs=rngs)
    self.pos_embed = (C.learned_table(rngs, self.grid + (d_model,), (None, None, "embed"),
                                      jax.nn.initializers.normal(0.02))
                      if self.pe == "learned" else None)
    num_layers = C.positive(cfg, "num_layers")

    def make_stack(n, layers_attention, first):
      del first
      kw = {} if layers_attention is None else {"layers_attention": layers_attention}
      return C.build_stack(cfg, num_layers=n, d_model=d_model, num_heads=num_heads,
                           num_kv_heads=num_kv_heads, head_dim=head_dim,
                           mlp_dim=C.positive(cfg, "mlp_dim"), defaults=defaults,
                           mlp_activation="gelu", gated_mlp=False, rngs=rngs, **kw)

    if _peg_option(cfg):
      self.blocks = _PegStack(make_stack, num_layers, C.get(cfg, "layers_attention", None),
                              d_model, rngs=rngs)
    else:
      self.blocks = make_stack(num_layers, None, 0)
    self.final_norm = RMSNorm(d_model, rngs=rngs)
    self.head = Dense(d_model, num_classes, names=("embed", "classes"), rngs=rngs)

  def __call__(self, images, *, deterministic: bool = True):
    _check_images(images, self.image_size, self.channels)
    x = self.patch_embed(patchify(images.astype(self.dtype), self.patch))
    if self.pe == "learned":
      x = x + self.pos_embed[...].astype(x.dtype)
    elif self.pe == "sinusoidal":
      pe = positional.sinusoidal_embedding_nd(self.grid, x.shape[-1])
      x = x + pe.reshape(self.grid + (x.shape[-1],)).astype(x.dtype)
    x = constrain(x, ("batch", None, None, "embed"))
    x = self.blocks(x, deterministic=deterministic)
    x = self.final_norm(x)
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return self.head(pooled).astype(jnp.float32)


class PatchMerging(nnx.Module):
  """2x2 patch merging: `[B, h, w, C] -> [B, h/2, w/2, 2C]` (concat, RMSNorm, linear)."""

  def __init__(self, dim: int, out_dim: int, *, rngs: nnx.Rngs):
    self.norm = RMSNorm(4 * dim, rngs=rngs)
    self.proj = Dense(4 * dim, out_dim, names=(None, "embed"), use_bias=False, rngs=rngs)

  def __call__(self, x):
    B, h, w, c = x.shape
    if h % 2 or w % 2:
      raise ValueError(f"patch merging needs an even grid, got {h}x{w}")
    x = x.reshape(B, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(B, h // 2, w // 2, 4 * c)
    return self.proj(self.norm(x))


class HierarchicalViT(nnx.Module):
  """Swin-style hierarchical ViT. `model(images, *, deterministic=True) -> [B, num_classes]`.

  Extra config fields: stage_depths (tuple, default (num_layers // 2, num_layers -
  num_layers // 2)), stage_heads (default num_heads * 2^stage); width doubles per stage
  from d_model, mlp width is `mlp_dim / d_model` times the stage width; peg (bool,
  default False: a PEG after the first block of each stage).
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.image_size, self.patch, self.channels = _image_config(cfg)
    d_model = C.positive(cfg, "d_model")
    num_heads = C.positive(cfg, "num_heads")
    num_classes = C.positive(cfg, "num_classes")
    C.choice(cfg, "pool", ("mean",), "mean")
    self.dtype = C.dtype_of(cfg)
    num_layers = C.positive(cfg, "num_layers")
    depths = C.get(cfg, "stage_depths", None)
    depths = (tuple(depths) if depths is not None
              else (num_layers // 2, num_layers - num_layers // 2))
    if not depths or any(not isinstance(d, int) or d <= 0 for d in depths):
      raise ValueError(f"stage_depths must be positive ints, got {depths!r}")
    heads = C.get(cfg, "stage_heads", None)
    heads = (tuple(heads) if heads is not None
             else tuple(num_heads * 2 ** i for i in range(len(depths))))
    if len(heads) != len(depths):
      raise ValueError(f"stage_heads must have len(stage_depths)={len(depths)} entries, got "
                       f"{heads}")
    mlp_ratio = C.positive(cfg, "mlp_dim") / d_model
    grid = (self.image_size[0] // self.patch, self.image_size[1] // self.patch)
    if grid[0] % 2 ** (len(depths) - 1) or grid[1] % 2 ** (len(depths) - 1):
      raise ValueError(f"the patch grid {grid} must be divisible by "
                       f"2^(stages-1)={2 ** (len(depths) - 1)}")
    self.pe, rope = C.rope_option(cfg, "axial", ("rope", "none"))
    defaults = {} if rope is None else {"rope": rope}
    layers_attention = C.get(cfg, "layers_attention", None)
    if layers_attention is not None and len(layers_attention) != sum(depths):
      raise ValueError(f"layers_attention must have sum(stage_depths)={sum(depths)} entries")
    self.patch_embed = Dense(self.patch * self.patch * self.channels, d_model,
                             names=("patch", "embed"), rngs=rngs)
    peg = _peg_option(cfg)
    stages, merges = [], []
    dim, start = d_model, 0
    for s, (depth, nh) in enumerate(zip(depths, heads)):
      if dim % nh:
        raise ValueError(f"stage {s} width {dim} must be divisible by its heads {nh}")

      def make_stack(n, la, first, dim=dim, nh=nh):
        def per_layer(i, spec):   # i: the layer's index in its stage
          if spec.get("name") == "swin" and "shift" not in spec and (i + first) % 2 == 1:
            w = spec.get("window")
            spec["shift"] = tuple(x // 2 for x in w) if isinstance(w, tuple) else w // 2
          return spec
        return C.build_stack(cfg, num_layers=n, d_model=dim, num_heads=nh, num_kv_heads=None,
                             head_dim=None, mlp_dim=int(mlp_ratio * dim), defaults=defaults,
                             layers_attention=la, per_layer=per_layer, mlp_activation="gelu",
                             gated_mlp=False, rngs=rngs)

      stage_la = None if layers_attention is None else list(layers_attention)[start:start + depth]
      if peg:
        stages.append(_PegStack(make_stack, depth, stage_la, dim, rngs=rngs))
      else:
        stages.append(make_stack(depth, stage_la, 0))
      start += depth
      if s + 1 < len(depths):
        merges.append(PatchMerging(dim, 2 * dim, rngs=rngs))
        dim *= 2
    self.stages = nnx.List(stages)
    self.merges = nnx.List(merges)
    self.final_norm = RMSNorm(dim, rngs=rngs)
    self.head = Dense(dim, num_classes, names=("embed", "classes"), rngs=rngs)

  def __call__(self, images, *, deterministic: bool = True):
    _check_images(images, self.image_size, self.channels)
    x = self.patch_embed(patchify(images.astype(self.dtype), self.patch))
    for s, stage in enumerate(self.stages):
      x = stage(x, deterministic=deterministic)
      if s < len(self.merges):
        x = self.merges[s](x)
    x = self.final_norm(x)
    return self.head(jnp.mean(x.astype(jnp.float32), axis=(1, 2))).astype(jnp.float32)
