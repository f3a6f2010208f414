"""RMSNorm: ``y = x / sqrt(mean(x^2) + eps) * s(w)`` over the trailing dimension(s).

``s(w) = w`` (``nn.RMSNorm``, Llama, Mistral, Phi-3, Qwen2/3, ...) or ``1 + w``
(Gemma 1/2/3): either way ``dy/dw = xhat``, so per sample
``grad_w_i = sum_t g[i, t] * xhat[i, t]`` (materialised, ``[B, *weight.shape]``),
summed over every dimension between the sample and the normalised ones (tokens,
and heads for Qwen3's and Gemma 3's per-head ``q_norm`` / ``k_norm`` on
``[B, T, H, D]``).

``xhat`` is recomputed as the module computes it:

* ``nn.RMSNorm``: ``F.rms_norm`` in the input dtype (float32 or wider);
  ``eps=None`` means ``torch.finfo(x.dtype).eps``.
* the transformers convention (any other module this rule is applied to): in
  float32 whatever the input dtype (``x.to(torch.float32)``, also for a float64
  model), ``eps`` from ``variance_epsilon`` or ``eps``, over the last dimension.
  The product with ``g`` is formed in the wider of float32 and the input dtype
  from ``xhat`` rounded to the input dtype, which is what ``w * xhat.to(dtype)``
  (Llama) differentiates to; Gemma's ``(xhat * (1 + w.float())).type_as(x)``
  forms the same product in float32 (the two differ by one rounding of ``xhat``
  in half precision, and Gemma's float64 weight gradient is float32-accurate).

Modules are matched by structure (:func:`is_rms_norm_like`): a class named
``*RMSNorm*`` whose only trainable parameter is ``weight``, with an ``eps`` or
``variance_epsilon`` attribute and a ``forward`` of one tensor. Gated variants
(``forward(x, gate)``) and grouped ones do not match or fail the first-use check.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Dense, Factor, _builtin, _builtin_structural

__all__ = ["is_rms_norm_like", "rms_norm_rule"]


def _eps(module: nn.Module) -> float | None:
    for a in ("variance_epsilon", "eps"):
        v = getattr(module, a, None)
        if isinstance(v, numbers.Real) and not isinstance(v, bool):
            return float(v)
    return None


@functools.cache
def _one_tensor_forward(forward: Callable[..., Any]) -> bool:
    """``forward(self, x)``: exactly one required argument besides ``self``."""
    try:
        params = list(inspect.signature(forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    pos = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [
        p
        for p in params
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    return len(pos) >= 1 and len(required) == 1 and required[0] is pos[0]


def is_rms_norm_like(module: nn.Module) -> bool:
    """A ``*RMSNorm*`` class: one trainable ``weight``, an ``eps``/``variance_epsilon``, ``forward(x)``."""
    if "rmsnorm" not in type(module).__name__.lower():
        return False
    own = dict(module.named_parameters(recurse=False))
    if set(own) != {"weight"} or own["weight"].dim() != 1 or _eps(module) is None:
        return False
    return _one_tensor_forward(type(module).forward)


@_builtin(nn.RMSNorm, token_local=True)
@_builtin_structural(is_rms_norm_like, "rms_norm", token_local=True)
def rms_norm_rule(
    module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor
) -> dict[str, Factor]:
    w = getattr(module, "weight", None)
    if not isinstance(w, Tensor) or not w.requires_grad:
        return {}
    (x,) = inputs[:1]
    dt = torch.promote_types(x.dtype, torch.float32)
    lead = tuple(range(1, x.dim() - w.dim()))
    if isinstance(module, nn.RMSNorm):
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        xhat = F.rms_norm(x.to(dt), module.normalized_shape, None, eps)
    else:  # the transformers convention: normalise in float32 over the last dimension
        eps = _eps(module)
        if eps is None:
            raise AttributeError(f"{type(module).__name__} has no eps or variance_epsilon")
        if w.dim() != 1:
            raise TypeError(
                f"{type(module).__name__} has a {w.dim()}-D weight; the transformers RMSNorm rule "
                "normalises over the last dimension only"
            )
        h = x.to(torch.float32)
        xhat = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype).to(dt)
    gx = grad_output.to(dt) * xhat
    return {"weight": Dense(gx.sum(dim=lead) if lead else gx)}
