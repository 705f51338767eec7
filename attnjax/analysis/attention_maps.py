"""Compatibility names (``eval.py`` before the analysis package grew):
:func:`capture_attention` and :func:`plot_attention_maps`."""

from attnjax.analysis.capture import capture_attention
from attnjax.analysis.plots import plot_attention_maps

__all__ = ["capture_attention", "plot_attention_maps"]
