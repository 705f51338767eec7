"""Model zoo: decoder LM, bidirectional encoder, ViT / hierarchical ViT, Set Transformer,
a small CNN with channel / spatial attention modules ('cnn', `attnjax.models.cnn`).

    >>> cfg = attnjax.models.default_config("lm")
    >>> cfg.attention = ml_collections.ConfigDict({"name": "sliding_window", "window": 16})
    >>> model = attnjax.models.build_model(cfg, rngs=nnx.Rngs(0))
    >>> logits = model(tokens)                             # [B, T, vocab] float32
    >>> out = attnjax.models.generate(model, prompt, 8)    # greedy, KV cache

Every model selects its attention layers by name through `attnjax.variants`; all
parameters carry logical axis names ('embed', 'heads', 'kv_heads', 'head_dim', 'mlp',
'vocab', 'patch', 'classes') as `out_sharding` metadata.
"""

from __future__ import annotations

from flax import nnx

from attnjax.models import cnn as _cnn
from attnjax.models.blocks import REMAT_POLICIES, BlockStack, TransformerBlock, attention_specs
from attnjax.models.encoder import Encoder
from attnjax.models.lm import DecoderLM, generate, sample_logits
from attnjax.models.set_transformer import SetTransformer
from attnjax.models.vit import HierarchicalViT, ViT, patchify

__all__ = ["build_model", "default_config", "KINDS", "DecoderLM", "Encoder", "ViT",
           "HierarchicalViT", "SetTransformer", "generate", "sample_logits", "TransformerBlock",
           "BlockStack", "attention_specs", "REMAT_POLICIES", "patchify", "CNN"]

KINDS = {"lm": DecoderLM, "encoder": Encoder, "vit": ViT, "hvit": HierarchicalViT,
         "set": SetTransformer, "cnn": _cnn.CNN}
CNN = _cnn.CNN


def build_model(model_cfg, *, rngs: nnx.Rngs) -> nnx.Module:
  """Builds the model `model_cfg.kind` ('lm' | 'encoder' | 'vit' | 'hvit' | 'set' | 'cnn')."""
  if not isinstance(rngs, nnx.Rngs):
    raise TypeError(f"rngs must be an nnx.Rngs, got {type(rngs).__name__}")
  kind = (model_cfg.get("kind", None) if isinstance(model_cfg, dict)
          else getattr(model_cfg, "kind", None))
  if kind not in KINDS:
    raise ValueError(f"model_cfg.kind must be one of {sorted(KINDS)}, got kind={kind!r}")
  return KINDS[kind](model_cfg, rngs=rngs)


def default_config(kind: str):
  """A small `ml_collections.ConfigDict` of model `kind` (CPU-test sized); every field is
  documented inline. Needs the `[train]` extra (ml-collections); `build_model` itself also
  takes a plain dict."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {sorted(KINDS)}, got kind={kind!r}")
  if kind == "cnn":  # no attention variant: its own fields (attnjax.models.cnn)
    return _cnn.default_config()
  c = ml_collections.ConfigDict()
  c.kind = kind
  c.d_model = 32            # model width D
  c.num_layers = 2          # transformer blocks
  c.num_heads = 4           # query heads N
  c.num_kv_heads = 4        # key/value heads K (GQA when < num_heads)
  c.head_dim = 8            # per-head width H (None = d_model // num_heads)
  c.mlp_dim = 64            # MLP hidden width
  c.dropout_rate = 0.0      # residual / MLP dropout
  c.dtype = "float32"       # compute dtype ('float32' | 'bfloat16'); params stay float32
  c.attention = ml_collections.ConfigDict({"name": "mha"})  # attnjax.variants name + options
  c.layers_attention = None  # optional list of per-layer specs (interleaving), None = same
  c.remat_policy = "none"   # 'none' | 'full' | 'dots' | 'dots_no_batch' | 'everything'
  c.scan_layers = False     # stack layers and apply them with jax.lax.scan
  if kind in ("lm", "encoder"):
    c.vocab_size = 64
    c.max_len = 64
    c.position_embedding = "rope"  # lm: 'rope' | 'none'; encoder also 'learned' | 'sinusoidal'
  if kind == "lm":
    c.causal = True
    c.num_classes = 0
    c.tie_embeddings = False
  if kind == "encoder":
    c.causal = False
    c.num_classes = 0        # 0 = masked-LM logits over the vocabulary
    c.head = "sequence"      # 'sequence' (pooled [B, C]) | 'token' ([B, T, C])
    c.pool = "cls"           # 'cls' | 'mean'
  if kind in ("vit", "hvit"):
    c.image_size = 16
    c.patch_size = 4 if kind == "vit" else 2
    c.channels = 3
    c.num_classes = 10
    c.pool = "mean"
    c.position_embedding = "learned" if kind == "vit" else "rope"
    c.max_len = (c.image_size // c.patch_size) ** 2
  if kind == "hvit":
    c.stage_depths = (2, 2)
    c.stage_heads = (2, 4)
    c.num_layers = 4
    c.head_dim = None
    c.num_kv_heads = None
    c.attention = ml_collections.ConfigDict({"name": "swin", "window": 4})
  if kind == "set":
    c.input_dim = 3
    c.num_classes = 1        # number of outputs
    c.num_seeds = 1          # PMA seeds
    c.pooling = ml_collections.ConfigDict({"name": "pma"})
    c.max_len = 64
  return c
