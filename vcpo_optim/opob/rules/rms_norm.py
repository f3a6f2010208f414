"""``nn.RMSNorm``: ``y = x / sqrt(mean(x^2) + eps) * w``.

Per sample: ``grad_w_i = sum_t g[i, t] * xhat[i, t]`` (materialised). ``eps=None``
means ``torch.finfo(x.dtype).eps``, as in PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Dense, Factor, register_rule


@register_rule(nn.RMSNorm)
def rms_norm_rule(
    module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor
) -> dict[str, Factor]:
    if module.weight is None or not module.weight.requires_grad:
        return {}
    (x,) = inputs[:1]
    nd = len(module.normalized_shape)
    lead = tuple(range(1, x.dim() - nd))
    eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
    dt = torch.promote_types(x.dtype, torch.float32)
    xhat = F.rms_norm(x.to(dt), module.normalized_shape, None, eps)
    gx = grad_output.to(dt) * xhat
    return {"weight": Dense(gx.sum(dim=lead) if lead else gx)}
