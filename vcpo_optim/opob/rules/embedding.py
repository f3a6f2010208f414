"""``nn.Embedding``: ``y[i, t] = W[idx[i, t]]``.

Per sample: ``grad_W_i[v] = sum_t [idx[i, t] == v] g[i, t]`` (a :class:`Rows`
factor), with positions equal to ``padding_idx`` contributing nothing, exactly
as autograd does. ``scale_grad_by_freq`` (counts over the whole batch, so it
mixes samples) and ``sparse`` gradients are refused.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import Factor, Rows, register_rule


@register_rule(nn.Embedding)
def embedding_rule(
    module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor
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
    if module.padding_idx is not None:
        g = g * (idx != module.padding_idx).unsqueeze(-1).to(g.dtype)
    return {"weight": Rows(idx.long(), g, module.num_embeddings)}
