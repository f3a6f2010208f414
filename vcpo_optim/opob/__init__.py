"""OPOB: per-sample gradient norms in one batched backward and the off-policy optimal baseline.

- :class:`OPOB`: attach to a model; ``opob.backward(per_sample_loss, rewards, groups)``.
  Under ``torch.distributed`` it reduces its own gradients (data parallel,
  FSDP2, tensor parallel); :data:`DistributedOPOB` is the same class (an alias
  kept for code written against the former subclass).
- :func:`register_rule`: add a per-sample gradient rule for a module type.
- :mod:`vcpo_optim.opob.baseline`: ``b*`` per scope (mean / weighted median / winsorized mean).
- :func:`reference_norm_weights`: the ``norm_weights`` that reproduce the
  research code's baseline weights.

Inside: :mod:`~vcpo_optim.opob.tape` (what the forward saw),
:mod:`~vcpo_optim.opob.step` (one backward call), :mod:`~vcpo_optim.opob.distributed`
(the reductions), :mod:`~vcpo_optim.opob.engine` (norms and weighted sums),
:mod:`~vcpo_optim.opob.rules` (one file per layer family).
"""

from .baseline import reference_norm_weights, scope_baselines, scope_inv_std
from .hook import OPOB, OPOBResult
from .rules import Dense, Outer, Rows, register_rule

#: The former data/tensor-parallel subclass; :class:`OPOB` itself now takes
#: ``tensor_parallel_group`` and ``grad_reduction``.
DistributedOPOB = OPOB

__all__ = [
    "OPOB",
    "Dense",
    "DistributedOPOB",
    "OPOBResult",
    "Outer",
    "Rows",
    "reference_norm_weights",
    "register_rule",
    "scope_baselines",
    "scope_inv_std",
]
