"""``nn.GroupNorm``: per sample and group, normalise over ``C / G`` channels and
all spatial positions, then ``y = xhat * w[c] + b[c]``.

Per sample: ``grad_w_i[c] = sum_spatial g * xhat``, ``grad_b_i[c] = sum_spatial g``
(materialised, ``[B, C]``). GroupNorm never mixes samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Dense, Factor, _builtin


@_builtin(nn.GroupNorm)
def group_norm_rule(
    module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor
) -> dict[str, Factor]:
    (x,) = inputs[:1]
    b, c = x.shape[0], x.shape[1]
    dt = torch.promote_types(x.dtype, torch.float32)
    g = grad_output.to(dt).reshape(b, c, -1)
    out: dict[str, Factor] = {}
    if module.weight is not None and module.weight.requires_grad:
        xhat = F.group_norm(x.to(dt), module.num_groups, None, None, module.eps).reshape(b, c, -1)
        out["weight"] = Dense((g * xhat).sum(dim=-1))
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = Dense(g.sum(dim=-1))
    return out
