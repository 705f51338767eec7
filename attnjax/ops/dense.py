"""Dense softmax attention: argument checking, the float32 reference, the 'xla' path.

Formula (per batch ``b``, query head ``n`` with kv head ``n // (N / K)``):

    s_ij = softcap(score_mod(scale * q_i . k_j + bias_ij))      (float32)
    p_ij = exp(s_ij) / (sum_{j allowed} exp(s_ij) + exp(sink_n))
    o_i  = sum_{j allowed} p_ij v_j ,   lse_i = log(sum_j exp(s_ij) + exp(sink_n))

where ``allowed`` is the mask AND equal segment ids.  A row with no allowed key
(and no sink) returns 0 and ``lse = -inf``; its gradients are 0.

Paper: "Attention Is All You Need" (Vaswani et al., 2017); GQA: "GQA: Training
Generalized Multi-Query Transformer Models from Multi-Head Checkpoints".
"""

from __future__ import annotations

from attnjax.core.args import AttentionArgs, check_attention_args
from attnjax.core.softmax import dense_attention, reference_attention

__all__ = ["reference_attention", "xla_attention", "AttentionArgs", "check_attention_args"]

# The float32 math and the argument checks live in attnjax.core (shared with kernels and
# cpu); they are re-exported here under their historical names.
_dense = dense_attention


def xla_attention(q, k, v, a: AttentionArgs, *, return_lse=False, block_sizes=None):
  """The 'xla' implementation: dense logits in the input dtype with float32
  accumulation, GQA without repeating K/V.  Memory ``O(B N T S)``: for short sequences."""
  if block_sizes is not None:
    raise TypeError(f"block_sizes: 'xla' takes none, got {type(block_sizes).__name__}")
  out, lse = dense_attention(q, k, v, a, upcast=False)
  return (out, lse) if return_lse else out
