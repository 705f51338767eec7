"""A small CNN whose blocks each end in a channel / spatial attention module chosen by name.

    >>> cfg = attnjax.models.default_config("cnn")
    >>> cfg.module = ml_collections.ConfigDict({"name": "cbam", "reduction": 4})
    >>> model = attnjax.models.build_model(cfg, rngs=nnx.Rngs(0))
    >>> logits = model(images)                    # images [B, Hh, Ww, C] -> [B, classes]

Layout (NHWC throughout):
  stem: 3x3 conv `channels -> widths[0]`, GELU;
  stage s: (s > 0: 2x2 average pooling when the map is even-sized, 1x1 conv to widths[s])
    then `depths[s]` residual blocks `x = x + M(GELU(RMSNorm(Conv3x3(x))))`, `M` the module
    `attnjax.layers.channel.get_module(cfg.module.name)(width, **options)`;
  head: RMSNorm, global average pooling, dense -> num_classes (float32 logits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.layers import Dense, ParamSpec, RMSNorm, channel, make_param
from attnjax.models import common as C
from attnjax.ops import channel as channel_ops

__all__ = ["CNN", "default_config", "module_config", "SMALL_WIDTH_OPTIONS"]

# Module options that fit the narrow widths of the small CNN (8-64 channels): reductions
# and group counts that divide them. Everything else keeps the paper's defaults.
SMALL_WIDTH_OPTIONS = {
    "se": {"reduction": 4},
    "cbam": {"reduction": 4},
    "ela": {"norm_groups": 4},
    "a2n": {"reduction": 4},
    "ulsam": {"subspaces": 4},
}


def module_config(name: str):
  """`ConfigDict(name=name, **SMALL_WIDTH_OPTIONS[name])` for the `module` field."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  channel.get_module(name)  # ValueError with close matches for an unknown name
  return ml_collections.ConfigDict(dict(name=name, **SMALL_WIDTH_OPTIONS.get(name, {})))


def default_config():
  """A small CNN config (CPU-test sized); every field documented inline."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  c = ml_collections.ConfigDict()
  c.kind = "cnn"
  c.image_size = 8          # input Hh = Ww (or a pair)
  c.channels = 1            # input channels
  c.num_classes = 10
  c.widths = (8, 16)        # channels of each stage
  c.depths = (1, 1)         # residual blocks per stage
  c.dtype = "float32"       # compute dtype ('float32' | 'bfloat16'); params stay float32
  c.module = module_config("se")  # attnjax.layers.channel name + options
  c.attention = None        # (no attention variant: the trainer's variant check skips it)
  return c


def _conv_param(rngs, k, cin, cout):
  init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
  return make_param(rngs, ParamSpec((k, k, cin, cout), init, (None, None, None, None)),
                    jnp.float32)


def _zeros_param(rngs, n):
  return make_param(rngs, ParamSpec((n,), jax.nn.initializers.zeros, (None,)), jnp.float32)


class ConvBlock(nnx.Module):
  """`x + M(GELU(RMSNorm(Conv3x3(x) + b)))`, `x [B, Hh, Ww, C]` -> same shape."""

  def __init__(self, width: int, module_spec: dict, *, rngs: nnx.Rngs):
    self.kernel = _conv_param(rngs, 3, width, width)
    self.bias = _zeros_param(rngs, width)
    self.norm = RMSNorm(width, rngs=rngs)
    spec = dict(module_spec)
    self.module = channel.build(spec.pop("name"), width, rngs=rngs, **spec)

  def __call__(self, x, *, deterministic: bool = True):
    h = channel_ops.conv2d(x, self.kernel[...], self.bias[...])
    h = jax.nn.gelu(self.norm(h))
    return x + self.module(h, deterministic=deterministic)


class CNN(nnx.Module):
  """`model(images [B, Hh, Ww, channels], *, deterministic=True) -> logits [B, classes]`.

  Config fields: image_size, channels, num_classes, widths, depths, dtype, module
  ({'name': ..., **options}, see `attnjax.layers.channel`).
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    size = C.get(cfg, "image_size")
    self.image_size = (size, size) if isinstance(size, int) else tuple(size)
    if len(self.image_size) != 2 or any(not isinstance(s, int) or s <= 0 for s in self.image_size):
      raise ValueError(f"model config field image_size must be an int or (Hh, Ww), got {size!r}")
    self.channels = C.positive(cfg, "channels")
    num_classes = C.positive(cfg, "num_classes")
    widths, depths = tuple(C.get(cfg, "widths")), tuple(C.get(cfg, "depths"))
    if not widths or len(widths) != len(depths):
      raise ValueError(f"model config fields widths and depths must be non-empty and of equal "
                       f"length, got widths={widths}, depths={depths}")
    for name, values in (("widths", widths), ("depths", depths)):
      if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
        raise ValueError(f"model config field {name} must hold positive ints, got {values}")
    self.dtype = C.dtype_of(cfg)
    spec = C.get(cfg, "module")
    spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
    if "name" not in spec:
      raise ValueError(f"model config field module must have a 'name', got module={spec!r}")
    channel.get_module(spec["name"])
    self.stem_kernel = _conv_param(rngs, 3, self.channels, widths[0])
    self.stem_bias = _zeros_param(rngs, widths[0])
    proj, stages = [], []
    for s, (w, d) in enumerate(zip(widths, depths)):
      if s > 0:
        proj.append(Dense(widths[s - 1], w, names=(None, None), rngs=rngs))
      stages.append(nnx.List([ConvBlock(w, spec, rngs=rngs) for _ in range(d)]))
    self.proj = nnx.List(proj)
    self.stages = nnx.List(stages)
    self.final_norm = RMSNorm(widths[-1], rngs=rngs)
    self.head = Dense(widths[-1], num_classes, names=("embed", "classes"), rngs=rngs)

  def __call__(self, images, *, deterministic: bool = True):
    if (images.ndim != 4 or tuple(images.shape[1:3]) != self.image_size
        or images.shape[3] != self.channels):
      raise ValueError(f"images must be [B, {self.image_size[0]}, {self.image_size[1]}, "
                       f"{self.channels}], got shape {images.shape}")
    x = channel_ops.conv2d(images.astype(self.dtype), self.stem_kernel[...], self.stem_bias[...])
    x = jax.nn.gelu(x)
    for s, blocks in enumerate(self.stages):
      if s > 0:
        B, Hh, Ww, Cc = x.shape
        if Hh % 2 == 0 and Ww % 2 == 0:
          x = x.reshape(B, Hh // 2, 2, Ww // 2, 2, Cc).mean(axis=(2, 4))
        x = self.proj[s - 1](x)
      for block in blocks:
        x = block(x, deterministic=deterministic)
    x = self.final_norm(x)
    return self.head(jnp.mean(x.astype(jnp.float32), axis=(1, 2))).astype(jnp.float32)
