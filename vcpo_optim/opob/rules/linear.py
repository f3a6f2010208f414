"""``nn.Linear``: ``y = x W^T + b`` with ``x`` of any rank >= 2.

Per sample ``i`` (tokens ``t`` = all middle dimensions of ``x``):
``grad_W_i = sum_t g[i, t]^T x[i, t]`` (an :class:`Outer` factor, norm by ghost
Gram or direct materialisation, chosen by the engine) and
``grad_b_i = sum_t g[i, t]`` (materialised, it is small).
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import Dense, Factor, Outer, _builtin


@_builtin(nn.Linear, token_local=True)
def linear_rule(
    module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor
) -> dict[str, Factor]:
    (x,) = inputs[:1]
    if x.dim() < 2:
        raise ValueError(
            "OPOB: nn.Linear input must have a sample dimension (rank >= 2), got shape "
            f"{tuple(x.shape)}"
        )
    b = x.shape[0]
    a = x.reshape(b, -1, 1, x.shape[-1])
    g = grad_output.reshape(b, -1, 1, grad_output.shape[-1])
    out: dict[str, Factor] = {}
    if module.weight.requires_grad:
        out["weight"] = Outer(a, g)
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = Dense(g.sum(dim=(1, 2)))
    return out
