"""``nn.Conv1d`` / ``nn.Conv2d`` by im2col: the convolution is a Linear map on
unfolded patches, so ``grad_W_i = sum_l g[i, l]^T patch[i, l]`` per group of
channels (an :class:`Outer` factor with one block per conv group) and
``grad_b_i = sum_l g[i, l]``. Any ``padding`` (ints, ``"same"``, ``"valid"``),
``padding_mode``, ``stride``, ``dilation`` and ``groups`` are supported.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Dense, Factor, Outer, _builtin


def _pad_amounts(module: nn.Module) -> list[int]:
    """F.pad amounts (last dim first) reproducing the module's padding (ints or "same"/"valid")."""
    return [int(p) for p in module._reversed_padding_repeated_twice]


def _unfold(module: nn.Module, x: Tensor) -> tuple[Tensor, int]:
    """Patches ``[B, C_in * prod(k), L]`` (as a 2-D conv) and the number of spatial dims."""
    nsp = x.dim() - 2
    pads = _pad_amounts(module)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    if any(pads):
        x = F.pad(x, pads, mode=mode)
    if nsp == 1:
        x = x.unsqueeze(2)
        k, dil, st = (1, module.kernel_size[0]), (1, module.dilation[0]), (1, module.stride[0])
    else:
        k, dil, st = module.kernel_size, module.dilation, module.stride
    return F.unfold(x, kernel_size=k, dilation=dil, stride=st), nsp


@_builtin(nn.Conv1d, nn.Conv2d)
def conv_rule(
    module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor
) -> dict[str, Factor]:
    (x,) = inputs[:1]
    if x.dim() != len(module.kernel_size) + 2:
        raise ValueError(
            f"OPOB: {type(module).__name__} needs a batched input [B, C, ...], got shape "
            f"{tuple(x.shape)}"
        )
    b, cout, grp = x.shape[0], module.out_channels, module.groups
    g = grad_output.reshape(b, cout, -1)  # [B, C_out, L]
    out: dict[str, Factor] = {}
    if module.weight.requires_grad:
        patches, _ = _unfold(module, x)  # [B, C_in*k, L]
        a = patches.reshape(b, grp, -1, patches.shape[-1]).permute(0, 3, 1, 2)  # [B, L, G, k']
        gg = g.reshape(b, grp, cout // grp, -1).permute(0, 3, 1, 2)  # [B, L, G, m']
        out["weight"] = Outer(a, gg)
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = Dense(g.sum(dim=-1))
    return out
