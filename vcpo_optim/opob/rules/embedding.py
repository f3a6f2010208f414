"""``nn.Embedding``: ``y[i, t] = W[idx[i, t]]``, and scaled embeddings ``y = W[idx] * s``.

Per sample: ``grad_W_i[v] = sum_t [idx[i, t] == v] g[i, t]`` (a :class:`Rows`
factor), with positions equal to ``padding_idx`` contributing nothing, exactly
as autograd does. ``scale_grad_by_freq`` (counts over the whole batch, so it
mixes samples) and ``sparse`` gradients are refused.

Scaled embeddings (Gemma 1/2/3's ``Gemma*TextScaledWordEmbedding``: an
``nn.Embedding`` subclass whose forward returns ``embedding * embed_scale`` with
``embed_scale = sqrt(d)`` cast to the weight dtype) multiply the output gradient
by the same scale: ``g -> g * s``. They are matched by structure
(:func:`is_scaled_embedding`: an ``nn.Embedding`` subclass with its own
``forward`` and an ``embed_scale`` attribute) and checked on first use, so the
parent's unscaled rule is never applied to them.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

from .base import Factor, Rows, _builtin, _builtin_structural

__all__ = ["embedding_rule", "is_scaled_embedding", "scaled_embedding_rule"]


@_builtin(nn.Embedding, token_local=True)
def embedding_rule(
    module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor
) -> dict[str, Factor]:
    return _rows(module, inputs, grad_output, None)


def _rows(
    module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor, scale: Tensor | None
) -> dict[str, Factor]:
    if module.scale_grad_by_freq:
        raise ValueError(
            "OPOB: nn.Embedding(scale_grad_by_freq=True) scales gradients by token counts over the "
            "whole batch, which mixes samples; per-sample gradients are undefined. Disable it."
        )
    if module.sparse:
        raise ValueError("OPOB: nn.Embedding(sparse=True) is not supported; use sparse=False.")
    if not module.weight.requires_grad:
        return {}
    (idx,) = inputs[:1]
    b = idx.shape[0]
    idx = idx.reshape(b, -1)
    g = grad_output.reshape(b, idx.shape[1], grad_output.shape[-1])
    if scale is not None:
        g = g * scale
    if module.padding_idx is not None:
        g = g * (idx != module.padding_idx).unsqueeze(-1).to(g.dtype)
    return {"weight": Rows(idx.long(), g, module.num_embeddings)}


def _scale(module: nn.Module) -> Tensor | float | None:
    s = getattr(module, "embed_scale", None)
    if isinstance(s, Tensor) and s.numel() == 1:
        return s
    if isinstance(s, numbers.Real) and not isinstance(s, bool):
        return float(s)
    return None


def is_scaled_embedding(module: nn.Module) -> bool:
    """An ``nn.Embedding`` subclass with its own ``forward`` and a scalar ``embed_scale``."""
    return (
        isinstance(module, nn.Embedding)
        and type(module).forward is not nn.Embedding.forward
        and _scale(module) is not None
    )


@_builtin_structural(is_scaled_embedding, "scaled_embedding", token_local=True)
def scaled_embedding_rule(
    module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor
) -> dict[str, Factor]:
    """``y = embedding(idx) * embed_scale.to(weight.dtype)``: the output gradient times the scale."""
    s = _scale(module)
    w = module.weight
    scale = s.to(w.dtype) if isinstance(s, Tensor) else torch.tensor(s, dtype=w.dtype)
    return _rows(module, inputs, grad_output, scale.to(grad_output.device).reshape(()))
