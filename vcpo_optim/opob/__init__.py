"""OPOB: per-sample gradient norms in one batched backward and the off-policy optimal baseline.

- :class:`OPOB`: attach to a model; ``opob.backward(per_sample_loss, rewards, groups)``.
- :func:`register_rule`: add a per-sample gradient rule for a module type.
- :mod:`vcpo_optim.opob.baseline`: ``b*`` per scope (mean / weighted median / winsorized mean).
"""

from .baseline import scope_baselines, scope_inv_std
from .hook import OPOB, OPOBResult
from .rules import Dense, Outer, Rows, register_rule

__all__ = [
    "OPOB",
    "Dense",
    "OPOBResult",
    "Outer",
    "Rows",
    "register_rule",
    "scope_baselines",
    "scope_inv_std",
]
