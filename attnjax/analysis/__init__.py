"""Analysis of attention in any attnjax model (``docs/analysis.md``).

- capture: :func:`capture` (probabilities recomputed from the intercepted calls),
  :class:`Recorder`, :func:`attention_calls`, :func:`capture_attention`.
- attribution: :func:`rollout`, :func:`attention_flow` ("Quantifying Attention Flow in
  Transformers").
- statistics: :func:`entropy`, :func:`mean_distance`, :func:`topk_mass`,
  :func:`sink_score`, :func:`sink_logit_mass`, :func:`head_stats`, :func:`sink_report`.
- heads ("Are Sixteen Heads Really Better than One?"): :func:`gated_call`,
  :func:`head_importance`, :func:`ablation_curve`, :func:`importance_order`,
  :func:`random_order`, :func:`head_outputs`, :func:`patch_head`.
- plots: :func:`plot_head_grid`, :func:`plot_token_map`, :func:`plot_overlay`,
  :func:`plot_stat_curves`; :func:`write_report` (all of them for one model, eval.py).
"""

from attnjax.analysis.attribution import attention_flow, max_flow, residual_attention, rollout
from attnjax.analysis.capture import (
  CallInfo,
  Recorder,
  attention_calls,
  capture,
  capture_attention,
  linear_state_term,
  linear_weights,
  softmax_probs,
)
from attnjax.analysis.heads import (
  ablation_curve,
  gated_call,
  head_importance,
  head_outputs,
  importance_order,
  patch_head,
  random_order,
)
from attnjax.analysis.plots import (
  plot_attention_maps,
  plot_head_grid,
  plot_overlay,
  plot_stat_curves,
  plot_token_map,
)
from attnjax.analysis.report import write_report
from attnjax.analysis.stats import (
  entropy,
  head_stats,
  mean_distance,
  sink_logit_mass,
  sink_report,
  sink_score,
  topk_mass,
)

__all__ = ["capture", "Recorder", "CallInfo", "attention_calls", "capture_attention",
           "softmax_probs", "linear_weights", "linear_state_term", "rollout", "attention_flow",
           "max_flow",
           "residual_attention", "entropy", "mean_distance", "topk_mass", "sink_score",
           "sink_logit_mass", "head_stats", "sink_report", "gated_call", "head_importance",
           "ablation_curve", "importance_order", "random_order", "head_outputs", "patch_head",
           "plot_head_grid", "plot_attention_maps", "plot_token_map", "plot_overlay",
           "plot_stat_curves", "write_report"]
