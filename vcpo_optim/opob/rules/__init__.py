"""Per-layer per-sample gradient rules, registered by module type.

Importing this package registers the built-in rules for ``nn.Linear``,
``nn.Embedding``, ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``,
``nn.Conv1d`` and ``nn.Conv2d``; ``nn.MultiheadAttention`` is handled as a unit by the
exact vmap fallback. Add your own with :func:`register_rule`.
"""

from . import conv, embedding, group_norm, layer_norm, linear, rms_norm
from .base import RULES, Dense, Factor, Outer, Rows, Rule, get_rule, register_rule
from .fallback import FALLBACK_UNITS, fallback_factors, register_fallback_unit

__all__ = [
    "FALLBACK_UNITS",
    "RULES",
    "Dense",
    "Factor",
    "Outer",
    "Rows",
    "Rule",
    "conv",
    "embedding",
    "fallback_factors",
    "get_rule",
    "group_norm",
    "layer_norm",
    "linear",
    "register_fallback_unit",
    "register_rule",
    "rms_norm",
]
