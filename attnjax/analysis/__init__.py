"""Analysis: attention-map capture and plots."""

from attnjax.analysis.attention_maps import capture_attention, plot_attention_maps

__all__ = ['capture_attention', 'plot_attention_maps']
