"""Per-layer per-sample gradient rules, registered by module type or matched by structure.

Importing this package registers the built-in rules: by type for ``nn.Linear``,
``nn.Embedding``, ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``, ``nn.Conv1d`` and
``nn.Conv2d``; by structure (checked against the module's forward on first use) for
the RMSNorm variants of transformers (Llama, Mistral, Phi-3, Qwen2/3, Gemma's
``1 + w``), scaled embeddings (Gemma), transposed linear layers (GPT-2's ``Conv1D``)
and PEFT's DoRA magnitude. ``nn.MultiheadAttention`` is handled as a unit by the exact
vmap fallback. Add your own with :func:`register_rule` or :func:`register_structural_rule`.
Neither transformers nor PEFT is imported.
"""

from . import conv, dora, embedding, group_norm, layer_norm, linear, rms_norm, transposed_linear
from .base import (
    RULES,
    STRUCTURAL_RULES,
    Dense,
    Factor,
    Outer,
    Rows,
    Rule,
    RuleSpec,
    get_rule,
    is_token_local,
    register_rule,
    register_structural_rule,
    replaying,
    resolve_rule,
    structural_rules_disabled,
    uncovered_message,
)
from .fallback import (
    FALLBACK_UNITS,
    autocast_state,
    fallback_factors,
    register_fallback_unit,
    replay_autocast,
)
from .verify import TOLERANCE, apply_rule, rule_status

__all__ = [
    "FALLBACK_UNITS",
    "RULES",
    "STRUCTURAL_RULES",
    "TOLERANCE",
    "Dense",
    "Factor",
    "Outer",
    "Rows",
    "Rule",
    "RuleSpec",
    "apply_rule",
    "autocast_state",
    "conv",
    "dora",
    "embedding",
    "fallback_factors",
    "get_rule",
    "group_norm",
    "is_token_local",
    "layer_norm",
    "linear",
    "register_fallback_unit",
    "register_rule",
    "register_structural_rule",
    "replay_autocast",
    "replaying",
    "resolve_rule",
    "rms_norm",
    "rule_status",
    "structural_rules_disabled",
    "transposed_linear",
    "uncovered_message",
]
