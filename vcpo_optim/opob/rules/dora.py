"""PEFT's DoRA magnitude (``lora_magnitude_vector``, ``peft.tuners.lora.dora.DoraLinearLayer``).

PEFT's forward (``DoraLinearLayer.forward(x, *, lora_A, lora_B, scaling, base_layer,
base_result=None)``), with ``m`` the magnitude (this module's ``weight``, ``[out]``)::

    lora_weight = lora_B(lora_A(eye(in))).T                  # B A, [out, in]
    wn          = ||W + scaling * lora_weight||_row, detached  # column norm, no gradient
    base        = base_result (= base_layer(x) - bias)  or  x W^T   (with LoRA dropout)
    y           = (m / wn - 1) * base + (m / wn) * lora_B(lora_A(x)) * scaling

so ``dy/dm_j = (base_j + scaling * lora_j) / wn_j`` and per sample
``grad_m_i[j] = sum_t g[i, t, j] (base[i, t, j] + scaling * lora[i, t, j]) / wn[j]``
(materialised, ``[B, out]``). ``lora_A`` and ``lora_B`` are ``nn.Linear`` modules with
their own rules; only ``m`` is this rule's. The rank-r product ``lora_B(lora_A(x))``
is recomputed (and PEFT's ``lora_A(eye(in))`` as ``A^T`` plus its bias, which it is
exactly, without the ``in x in`` product); ``base`` is the ``base_result`` PEFT passed (the base layer's output
it already had) or, when LoRA dropout is active and PEFT recomputed it, recomputed
here the same way.

Matched by structure (:func:`is_dora_magnitude`): a single trainable 1-D ``weight``,
a ``fan_in_fan_out`` attribute, and a ``forward`` taking ``lora_A``, ``lora_B``,
``scaling``, ``base_layer`` and ``base_result``; checked on first use. PEFT itself is
never imported.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Dense, Factor, _builtin_structural

__all__ = ["dora_magnitude_rule", "is_dora_magnitude"]

_KW = frozenset({"lora_A", "lora_B", "scaling", "base_layer", "base_result"})


@functools.cache
def _dora_forward(forward: Callable[..., Any]) -> bool:
    try:
        names = set(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        return False
    return names >= _KW


def is_dora_magnitude(module: nn.Module) -> bool:
    """PEFT's DoRA magnitude layer, recognised by its parameter, attribute and forward signature."""
    own = dict(module.named_parameters(recurse=False))
    return (
        set(own) == {"weight"}
        and own["weight"].dim() == 1
        and isinstance(getattr(module, "fan_in_fan_out", None), bool)
        and _dora_forward(type(module).forward)
    )


@_builtin_structural(is_dora_magnitude, "dora_magnitude", token_local=True)
def dora_magnitude_rule(
    module: nn.Module,
    inputs: tuple[Tensor, ...],
    grad_output: Tensor,
    kwargs: dict[str, Any],
) -> dict[str, Factor]:
    m = module.weight
    if not m.requires_grad:
        return {}
    x = inputs[0]
    lora_a, lora_b = kwargs["lora_A"], kwargs["lora_B"]
    scaling, base_layer = kwargs["scaling"], kwargs["base_layer"]
    base = kwargs.get("base_result")
    weight = base_layer.weight
    if not (isinstance(weight, Tensor) and weight.is_floating_point() and weight.dim() == 2):
        raise TypeError(
            f"the DoRA rule needs a floating-point 2-D base weight, got {type(weight).__name__} "
            f"of shape {tuple(getattr(weight, 'shape', ()))} (quantized or convolutional base layer)"
        )
    with torch.no_grad():
        w = weight.to(x.dtype)
        w = w.T if module.fan_in_fan_out else w  # [out, in]
        a_t = lora_a.weight.T  # lora_A(eye(in)) = A^T (+ bias), exactly: no in x in product
        if getattr(lora_a, "bias", None) is not None:
            a_t = a_t + lora_a.bias
        lora_weight = lora_b(a_t).T.to(x.dtype)
        wn = torch.linalg.vector_norm(torch.add(w, lora_weight, alpha=scaling), dim=1).to(w.dtype)
        lora = lora_b(lora_a(x))
        if base is None:
            base = F.linear(x, w)
    dt = torch.promote_types(torch.promote_types(grad_output.dtype, m.dtype), torch.float32)
    gx = grad_output.to(dt) * torch.add(base.to(dt), lora.to(dt), alpha=scaling)
    lead = tuple(range(1, gx.dim() - 1))
    return {"weight": Dense((gx.sum(dim=lead) if lead else gx) / wn.to(dt))}
