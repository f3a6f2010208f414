"""vcpo_optim: variance-controlled off-policy RL for LLM policies in PyTorch.

- :func:`effective_sample_size`: log-space ESS of importance weights.
- :class:`VCPOAdamW`, :class:`VCPOAdam`, :class:`VCPOSGD`, :func:`ess_scaled`:
  torch.optim subclasses that scale each step's lr by (ESS/B)^p.
"""

from vcpo_optim import losses as losses
from vcpo_optim.ess import ESSResult, effective_sample_size
from vcpo_optim.opob import OPOB, OPOBResult
from vcpo_optim.optim import VCPOSGD, ESSStepStats, VCPOAdam, VCPOAdamW, ess_scaled
from vcpo_optim.wrappers import unwrap_optimizer

__version__ = "0.1.0"

__all__ = [
    "OPOB",
    "VCPOSGD",
    "ESSResult",
    "ESSStepStats",
    "OPOBResult",
    "VCPOAdam",
    "VCPOAdamW",
    "effective_sample_size",
    "ess_scaled",
    "unwrap_optimizer",
]
