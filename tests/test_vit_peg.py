"""PEG (CPVT's conditional positional encoding) as a ViT / hierarchical ViT option
(issue 18): placement after the first block (of each stage), gradients, Swin shifts kept,
config plumbing and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import models
from attnjax.layers.positional import peg_forward
from attnjax.models.vit import patchify


def _images(cfg, seed=0):
  return jax.random.normal(jax.random.key(seed),
                           (2, cfg.image_size, cfg.image_size, cfg.channels))


def _random_peg(peg, seed):
  """Nonzero PEG params (the depthwise kernel and bias), so the PEG changes its input."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  peg.kernel[...] = jax.random.normal(k1, peg.kernel[...].shape) * 0.3
  peg.bias[...] = jax.random.normal(k2, peg.bias[...].shape) * 0.3


def test_vit_peg_after_first_block():
  """ViT(peg=True): logits equal the manual composition patch embed + position table ->
  first block -> x + DWConv3x3(x) -> other blocks -> norm -> mean pool -> head, and
  differ from the same model with the PEG skipped; gradients reach the PEG."""
  cfg = models.default_config("vit")
  cfg.num_layers = 3
  cfg.peg = True
  model = models.build_model(cfg, rngs=nnx.Rngs(0))
  _random_peg(model.blocks.peg, 1)
  x = _images(cfg)
  y = model(x)
  h = model.patch_embed(patchify(x.astype(model.dtype), model.patch))
  h = h + model.pos_embed[...].astype(h.dtype)
  h1 = model.blocks.first_block(h)
  p = {"kernel": model.blocks.peg.kernel[...], "bias": model.blocks.peg.bias[...]}

  def tail(h1):
    z = model.final_norm(model.blocks.blocks(h1))
    return model.head(jnp.mean(z.astype(jnp.float32), axis=(1, 2))).astype(jnp.float32)

  np.testing.assert_allclose(y, tail(peg_forward(p, h1)), rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(y - tail(h1)))) > 1e-3      # the PEG does something
  assert len(model.blocks.blocks.layers) == 2

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  ct = jax.random.normal(jax.random.key(3), y.shape)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x) * ct)))(params)
  gk = grads["blocks"]["peg"]["kernel"][...]
  assert gk.shape == (3, 3, cfg.d_model) and float(jnp.max(jnp.abs(gk))) > 0
  assert np.all(np.isfinite(np.asarray(gk)))


def test_vit_peg_one_layer_and_default_off():
  cfg = models.default_config("vit")
  cfg.num_layers = 1
  cfg.peg = True
  model = models.build_model(cfg, rngs=nnx.Rngs(0))
  assert model.blocks.blocks is None
  assert model(_images(cfg)).shape == (2, 10)
  cfg.peg = False
  plain = models.build_model(cfg, rngs=nnx.Rngs(0))
  assert not hasattr(plain.blocks, "peg")


def test_hvit_peg_per_stage_keeps_swin_shifts():
  """A PEG after the first block of each stage; the Swin shift still alternates by the
  layer's index in its stage (0, shifted, 0, shifted, ...)."""
  cfg = models.default_config("hvit")
  cfg.stage_depths = (3, 2)
  cfg.num_layers = 5
  cfg.peg = True
  model = models.build_model(cfg, rngs=nnx.Rngs(0))
  shifts = []
  for stage in model.stages:
    layers = list(stage.first_block.layers) + list(stage.blocks.layers)
    shifts.append([dict(layer.attn.config.mask.args)["shift"] for layer in layers])
  assert shifts == [[0, 2, 0], [0, 2]]
  assert model.stages[1].peg.kernel[...].shape == (3, 3, 2 * cfg.d_model)
  _random_peg(model.stages[0].peg, 5)
  y = jax.jit(lambda a: model(a))(_images(cfg))   # jitted: not op by op
  assert y.shape == (2, 10) and bool(jnp.all(jnp.isfinite(y)))


def test_peg_option_errors_and_digits_config():
  cfg = models.default_config("vit")
  cfg.peg = "yes"
  with pytest.raises(ValueError, match="peg must be a bool"):
    models.build_model(cfg, rngs=nnx.Rngs(0))
  cfg = models.default_config("vit")
  cfg.peg = True
  cfg.layers_attention = [{"name": "mha"}] * (cfg.num_layers + 1)
  with pytest.raises(ValueError, match="layers_attention must have"):
    models.build_model(cfg, rngs=nnx.Rngs(0))
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "digits_vit.py"
  spec = importlib.util.spec_from_file_location("digits_vit", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  assert mod.get_config("peg").model.peg is True
  assert mod.get_config(None).model.peg is False
  with pytest.raises(ValueError, match="peg must be true or false"):
    mod.get_config("peg=3")
