"""Option validation shared by the mechanism layers (tokens, heads, routing, reduced, ...).

Every mechanism layer takes `(mechanism, d_model, num_heads, *, num_kv_heads, head_dim,
**options)`. Each mechanism has its own options with defaults, and all of a family share
common ones (`rope`, `causal`, `dropout_rate`, `implementation`, ...). The two helpers
here do the part that is the same everywhere: split the given options into the two
groups (a `TypeError` naming an unknown option and the accepted ones) and resolve the
head layout (`num_kv_heads` dividing `num_heads`, `head_dim` defaulting to
`d_model // num_heads`), each bad value a `ValueError` naming the argument.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from attnjax.layers._core import _positive_int

__all__ = ["split_options", "head_layout", "reject_common", "check_rope", "check_dropout_rate"]


def split_options(mechanism: str, options: Mapping[str, Any], own: Mapping[str, Any],
                  common: Mapping[str, Any], *, mechanisms: Sequence[str],
                  convert: Callable[[Any], Any] | None = None) -> tuple[dict, dict]:
  """`(own, common)`: copies of the default dicts updated with `options`.

  Raises `ValueError` if `mechanism` is not in `mechanisms` and `TypeError` for an option
  that is in neither group. `convert` (e.g. freezing lists into tuples) is applied to
  every given value.
  """
  if mechanism not in mechanisms:
    raise ValueError(f"mechanism must be one of {tuple(mechanisms)}, got "
                     f"mechanism={mechanism!r}")
  own, common = dict(own), dict(common)
  for k, v in options.items():
    if convert is not None:
      v = convert(v)
    if k in own:
      own[k] = v
    elif k in common:
      common[k] = v
    else:
      raise TypeError(f"variant {mechanism!r} got an unknown option {k!r}; expected one of "
                      f"{sorted(own) + sorted(common)}")
  return own, common


def head_layout(d_model: int, num_heads: int, num_kv_heads: int | None,
                head_dim: int | None) -> tuple[int, int]:
  """`(num_kv_heads, head_dim)` after checking `d_model`, `num_heads` and both.

  `num_kv_heads` defaults to `num_heads` and must divide it; `head_dim` defaults to
  `d_model // num_heads` (then `num_heads` must divide `d_model`).
  """
  _positive_int("d_model", d_model)
  _positive_int("num_heads", num_heads)
  num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
  _positive_int("num_kv_heads", num_kv_heads)
  if num_heads % num_kv_heads:
    raise ValueError(f"num_heads must be a multiple of num_kv_heads, got num_heads={num_heads}, "
                     f"num_kv_heads={num_kv_heads}")
  if head_dim is None:
    if d_model % num_heads:
      raise ValueError(f"d_model must be divisible by num_heads when head_dim is not given, got "
                       f"d_model={d_model}, num_heads={num_heads}")
    head_dim = d_model // num_heads
  _positive_int("head_dim", head_dim)
  return num_kv_heads, head_dim


def reject_common(mechanism: str, common: Mapping[str, Any], *, rope: str | None = None,
                  causal: str | None = None, dropout: bool = True) -> None:
  """The common options a family does not support, each a `ValueError` with the reason.

  `rope` / `causal`: when given (the reason), that option must be None / False.
  `dropout`: `dropout_rate` must be 0 (the model's residual dropout applies).
  """
  if rope is not None and common.get("rope") is not None:
    raise ValueError(f"rope must be None for variant {mechanism!r} ({rope}), got "
                     f"rope={common['rope']!r}")
  if causal is not None and common.get("causal"):
    raise ValueError(f"causal must be False for variant {mechanism!r} ({causal}), got "
                     f"causal={common['causal']!r}")
  if dropout and common.get("dropout_rate"):
    raise ValueError(f"dropout_rate must be 0.0 for variant {mechanism!r} (the model's residual "
                     f"dropout applies), got dropout_rate={common['dropout_rate']!r}")


def check_rope(mechanism: str, rope: Any, rope_base: Any, *, kinds: Sequence[Any],
               head_dim: int) -> None:
  """`rope` one of `kinds` (None = no RoPE), `rope_base > 1`, and a `head_dim` the kind
  can rotate: even for `'1d'` / `'mixed'`, a multiple of 4 for `'axial'` (two grid axes);
  each a `ValueError` naming the option."""
  if rope not in kinds:
    raise ValueError(f"rope must be one of {tuple(kinds)} for variant {mechanism!r}, got "
                     f"rope={rope!r}")
  if rope is None:
    return
  if isinstance(rope_base, bool) or not isinstance(rope_base, (int, float)) or not rope_base > 1:
    raise ValueError(f"rope_base must be a number > 1, got rope_base={rope_base!r}")
  need = 4 if rope == "axial" else 2
  if head_dim % need:
    raise ValueError(f"rope={rope!r} needs a head_dim (of q and k) divisible by {need}, got "
                     f"head_dim={head_dim}")


def check_dropout_rate(rate: Any) -> float:
  """`dropout_rate` in `[0, 1)` (dropout on the layer output), as a float."""
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout_rate must be a number in [0, 1), got dropout_rate={rate!r}")
  return float(rate)
