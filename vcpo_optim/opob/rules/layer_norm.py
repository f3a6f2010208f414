"""``nn.LayerNorm``: ``y = xhat * w + b`` over the trailing ``normalized_shape``.

Per sample: ``grad_w_i = sum_t g[i, t] * xhat[i, t]``, ``grad_b_i = sum_t g[i, t]``
(materialised, ``[B, *normalized_shape]``). ``xhat`` is recomputed from the
saved input in float32 or wider.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Dense, Factor, _builtin


def _acc(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


@_builtin(nn.LayerNorm, token_local=True)
def layer_norm_rule(
    module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor
) -> dict[str, Factor]:
    (x,) = inputs[:1]
    nd = len(module.normalized_shape)
    lead = tuple(range(1, x.dim() - nd))
    dt = _acc(x)
    g = grad_output.to(dt)
    out: dict[str, Factor] = {}
    if module.weight is not None and module.weight.requires_grad:
        xhat = F.layer_norm(x.to(dt), module.normalized_shape, None, None, module.eps)
        out["weight"] = Dense((g * xhat).sum(dim=lead) if lead else g * xhat)
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = Dense(g.sum(dim=lead) if lead else g)
    return out
