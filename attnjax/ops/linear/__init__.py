"""Linear-attention family (catalog family D): kernelized, decayed and flow-normalised attention.

Every function takes the public BTNH layout: ``q [B, T, N, H]``, ``k [B, S, K, H]``,
``v [B, S, K, Hv]`` with ``N`` a multiple of ``K`` (grouped-query attention: query head ``n``
reads kv head ``n // (N // K)``; keys and values are never repeated in memory) and returns
``[B, T, N, Hv]`` in the dtype of ``v``. Causal mechanisms need ``S == T``.

Mechanisms (paper titles):

- :func:`linear_attention` -- generic kernelized linear attention with feature maps
  (``'elu+1'``, ``'relu'``, ``'identity'`` or a callable), causal or not.
  "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention".
- :func:`lightning_attention` -- causal, unnormalised, per-head decay; the tiled
  intra-block / inter-block computation of "Various Lengths, Constant Speed: Efficient
  Language Modeling with Lightning Attention" and "Lightning Attention-2: A Free Lunch for
  Handling Unlimited Sequence Lengths in Large Language Models".
- :func:`decayed_linear_attention` -- the general case: retention-style decayed linear
  attention with a constant (scalar or per-head) decay and/or a data-dependent per-token
  gate ``log_decay [B, T, N]``; optional feature map and normalisation.
  "Retentive Network: A Successor to Transformer for Large Language Models" (retention);
  "Gated Linear Attention Transformers with Hardware-Efficient Training" (gating).
- :func:`efficient_attention` -- "Efficient Attention: Attention with Linear Complexities"
  (Shen et al.), non-causal.
- :func:`focused_linear_attention` -- "FLatten Transformer: Vision Transformer using Focused
  Linear Attention" (focused feature map + depthwise-convolution rank restoration).
- :func:`inline_attention` -- "Bridging the Divide: Reconsidering Softmax and Linear
  Attention" (InLine: injective linear attention), causal or not.
- :func:`flow_attention` -- "Flowformer: Linearizing Transformers with Conservation Flows",
  non-causal or causal (the paper's causal version, prefix-sum flows).
- :func:`gated_linear_attention` -- GLA, per-key-dimension data-dependent decay
  ("Gated Linear Attention Transformers with Hardware-Efficient Training").
- :func:`delta_rule_attention` / :func:`gated_delta_rule_attention` -- DeltaNet / Gated
  DeltaNet ("Parallelizing Linear Transformers with the Delta Rule over Sequence Length";
  "Gated Delta Networks: Improving Mamba2 with Delta Rule"), chunked with the UT transform.
- :func:`ssd_attention` -- Mamba-2's state-space dual ("Transformers are SSMs: Generalized
  Models and Efficient Algorithms Through Structured State Space Duality").
- :func:`implied_attention` -- the ``[B, N, T, T]`` matrix such a recurrence applies
  ("The Hidden Attention of Mamba Models").
- vision linear attention (module ``vision``, grid layout ``[B, Hh, Ww, heads, dim]``):
  :func:`l2vit_attention` (L^2ViT, ReLU linear attention + Local Concentration Module),
  :func:`care_attention` (CARE, decoupled linear attention / depthwise conv with a dual
  interaction), :func:`hiif_attention` (HIIF's multi-head Galerkin-type linear attention,
  BTNH), :func:`feat_attention` (FEAT, spatial -> temporal weighted key-value attention ->
  global channel attention, video or image) and :func:`bidirectional_wkv`.

The gated / delta-rule / SSD ops keep the state as ``S [B, N, Hv, H]`` (value dimension
first, one per query head), multiply ``q`` by ``scale`` (default ``1/sqrt(H)``; SSD has no
scale) and need ``chunk_size`` to be a power of two.

Forms. Every causal mechanism has three forms selected by ``form=``:

- ``'chunked'`` (training): the sequence is cut into chunks of ``chunk_size`` tokens; inside
  a chunk the masked (decayed) ``q k^T`` product is materialised (``chunk_size^2`` per
  chunk), across chunks a ``[F, Hv]`` state carries the past (``lax.scan`` over chunks).
  O(T) memory and time; ``T`` need not be a multiple of ``chunk_size``.
- ``'recurrent'`` (decoding): a ``lax.scan`` over tokens of ``S_t = lambda_t S_{t-1} +
  phi(k_t) v_t^T``, ``o_t = phi(q_t) S_t``; accepts one token or a block.
- ``'quadratic'`` (tests): the ``[T, T]`` weight matrix is materialised.

All three accept ``state=`` (the state after a previous call) and, with
``return_state=True``, return ``(out, new_state)``; they agree to float32 precision,
forward and backward. Without any decay the forms take an undecayed fast path (masked
products and plain state sums, no ``exp``). In the chunked form, sequences longer than
``block_len`` (default 2048) are processed block by block: a ``lax.scan`` over blocks carries
the state and each block is rematerialised in the backward pass, which bounds the working
set (the time then scales linearly on CPU; see ``docs/linear.md``). Non-causal mechanisms
accept ``form='chunked'`` (the linear-cost ``phi(Q) (phi(K)^T V)`` path) and
``form='quadratic'``.

Numerics: logits, decays and states are float32 whatever the input dtype; decays are
handled in log space (``exp`` of differences of cumulative log-decays, every exponent
``<= 0``), never by dividing by a decay. Normalised forms divide by ``den + eps`` (``den - eps``
when ``den < 0``), so the denominator is never zero.

Package layout (one module per mechanism family; see ``docs/architecture.md``):

- ``_args`` -- argument checking and preparation shared by every mechanism
  (:func:`~attnjax.ops.linear._args.prepare`), constants and feature maps;
- ``_core`` -- the causal core (three forms), the block driver and the registry hooks
  (:data:`~attnjax.ops.linear._core.CHUNK_KERNELS` and the implementation selector, filled
  by :mod:`attnjax.dispatch`: ``implementation=None``/``'auto'`` runs the Pallas chunk
  kernel on TPU/GPU when it serves the call, else ``'xla'``);
- ``kernelized`` (:func:`linear_attention`, :func:`efficient_attention`), ``decayed``
  (:func:`decayed_linear_attention`, :func:`lightning_attention`), ``focused``, ``inline``,
  ``flow``, ``gated`` (GLA), ``delta`` (DeltaNet, Gated DeltaNet), ``ssd`` (Mamba-2 SSD,
  implied attention), ``vision`` (L^2ViT, CARE, HIIF, FEAT).
"""

from attnjax.ops.linear._args import (
                                      DEFAULT_BLOCK_LEN,
                                      DEFAULT_EPS,
                                      FEATURE_MAPS,
                                      FORMS,
                                      IMPLEMENTATIONS,
                                      FeatureMap,
)
from attnjax.ops.linear._core import register_chunk_kernel, register_selector
from attnjax.ops.linear.decayed import decayed_linear_attention, lightning_attention
from attnjax.ops.linear.delta import delta_rule_attention, gated_delta_rule_attention
from attnjax.ops.linear.flow import flow_attention
from attnjax.ops.linear.focused import depthwise_conv, focused_feature_map, focused_linear_attention
from attnjax.ops.linear.gated import gated_linear_attention
from attnjax.ops.linear.inline import inline_attention
from attnjax.ops.linear.kernelized import efficient_attention, linear_attention
from attnjax.ops.linear.ssd import implied_attention, ssd_attention
from attnjax.ops.linear.vision import (
                                        bidirectional_wkv,
                                        care_attention,
                                        feat_attention,
                                        hiif_attention,
                                        l2vit_attention,
                                        wkv_weights,
)

__all__ = ["FeatureMap", "FORMS", "IMPLEMENTATIONS", "DEFAULT_EPS",
           "DEFAULT_BLOCK_LEN", "FEATURE_MAPS", "linear_attention", "decayed_linear_attention",
           "lightning_attention", "efficient_attention", "focused_feature_map",
           "depthwise_conv", "focused_linear_attention", "inline_attention", "flow_attention",
           "register_chunk_kernel", "register_selector", "gated_linear_attention",
           "delta_rule_attention", "gated_delta_rule_attention", "ssd_attention",
           "implied_attention", "l2vit_attention", "care_attention", "hiif_attention",
           "feat_attention", "bidirectional_wkv", "wkv_weights"]
