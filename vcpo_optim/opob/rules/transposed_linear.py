"""Transposed linear layers: ``y = x W + b`` with ``W`` of shape ``[in, out]``.

GPT-2's (and GPT-1's, GPT-J's ...) ``transformers.pytorch_utils.Conv1D``:
``torch.addmm(bias, x.view(-1, nx), weight)`` with ``weight`` ``[nx, nf]``.
Per sample ``grad_W_i = sum_t x[i, t]^T g[i, t]`` (an :class:`Outer` factor with
the roles of input and output gradient swapped relative to ``nn.Linear``) and
``grad_b_i = sum_t g[i, t]``.

Matched by structure (:func:`is_transposed_linear`): trainable ``weight`` of shape
``[nx, nf]`` and ``bias`` of shape ``[nf]`` with integer attributes ``nx`` and
``nf``; checked against the module's forward on first use.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import Dense, Factor, Outer, _builtin_structural

__all__ = ["is_transposed_linear", "transposed_linear_rule"]


def is_transposed_linear(module: nn.Module) -> bool:
    """``weight [nx, nf]``, ``bias [nf]`` (or none) and integer ``nx``, ``nf`` attributes."""
    nx, nf = getattr(module, "nx", None), getattr(module, "nf", None)
    if not (isinstance(nx, int) and isinstance(nf, int)) or isinstance(module, nn.Linear):
        return False
    own = dict(module.named_parameters(recurse=False))
    w, b = own.get("weight"), own.get("bias")
    if w is None or set(own) - {"weight", "bias"} or tuple(w.shape) != (nx, nf):
        return False
    return b is None or tuple(b.shape) == (nf,)


@_builtin_structural(is_transposed_linear, "transposed_linear", token_local=True)
def transposed_linear_rule(
    module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor
) -> dict[str, Factor]:
    (x,) = inputs[:1]
    if x.dim() < 2:
        raise ValueError(
            f"OPOB: {type(module).__name__} input must have a sample dimension (rank >= 2), got "
            f"shape {tuple(x.shape)}"
        )
    b = x.shape[0]
    a = x.reshape(b, -1, 1, x.shape[-1])
    g = grad_output.reshape(b, -1, 1, grad_output.shape[-1])
    out: dict[str, Factor] = {}
    if module.weight.requires_grad:
        out["weight"] = Outer(a=g, g=a)  # G_i = sum_t x_t^T g_t: [nx, nf]
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor) and bias.requires_grad:
        out["bias"] = Dense(g.sum(dim=(1, 2)))
    return out
