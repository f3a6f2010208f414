"""Exact fallback for modules without a rule (``strict=False``).

The per-sample gradient of the module's own parameters is
``G_i = d/dtheta < module(x_i), g_i >`` evaluated with ``torch.func``:
``vmap(grad(f))`` over the saved inputs and output gradients, one sample at a
time as a batch of one. This materialises ``[B, *param.shape]`` and runs the
module's forward again, so it is meant for small modules (a learned scalar, a
custom gate). The module must be deterministic and must not mix samples;
inputs whose dimension 0 is not the batch size are treated as shared by all
samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .base import Dense, Factor, replay_guard

#: What :func:`autocast_state` records: ``(device_type, dtype)``, dtype ``None`` when autocast
#: was off for that device.
AutocastState = tuple[str, torch.dtype | None] | None


def autocast_state(x: Any) -> AutocastState:
    """The autocast state in force for the device of tensor ``x`` (at record time)."""
    dev = x.device.type if isinstance(x, Tensor) else "cpu"
    if not torch.is_autocast_enabled(dev):
        return dev, None
    return dev, torch.get_autocast_dtype(dev)


@contextmanager
def replay_autocast(state: AutocastState) -> Iterator[None]:
    """Re-enter the recorded autocast state (``None``: unknown, leave the current state)."""
    if state is None:
        yield
        return
    dev, dtype = state
    with torch.autocast(dev, dtype=dtype, enabled=dtype is not None):
        yield


#: Module types handled as one unit by the exact fallback, counted as covered even with
#: ``strict=True``: every trainable parameter of their subtree (``nn.MultiheadAttention``
#: reads ``out_proj.weight`` functionally, so its child cannot be hooked on its own).
FALLBACK_UNITS: set[type[nn.Module]] = {nn.MultiheadAttention}


def register_fallback_unit(*module_types: type[nn.Module]) -> None:
    """Handle ``module_types`` (and their whole subtree) with the exact vmap fallback."""
    FALLBACK_UNITS.update(module_types)


def fallback_factors(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    grad_outputs: list[Tensor | None],
    output_index: list[int],
    batch: int,
    recurse: bool = False,
    amp: AutocastState = None,
) -> dict[str, Factor]:
    """Materialised per-sample gradients of ``module``'s trainable parameters.

    Direct parameters only, or (``recurse=True``, fallback units) all of its subtree,
    keyed by dotted name.

    ``grad_outputs[j]`` is the gradient of the ``output_index[j]``-th tensor of
    the module output (a tensor or a tuple/list of tensors); ``None`` entries
    did not reach the loss. ``amp``: the autocast state of the recorded call.
    """
    named = [(n, p) for n, p in module.named_parameters(recurse=recurse) if p.requires_grad]
    if not named:
        return {}
    names = [n for n, _ in named]
    params = {n: p.detach() for n, p in named}
    pairs = [(i, g) for i, g in zip(output_index, grad_outputs) if g is not None]
    if not pairs:
        return {
            n: Dense(torch.zeros(batch, *p.shape, dtype=p.dtype, device=p.device))
            for n, p in params.items()
        }

    flat: list[Any] = list(args) + list(kwargs.values())
    keys = list(kwargs.keys())
    in_dims = tuple(
        0 if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == batch else None for t in flat
    )
    gouts = [g for _, g in pairs]
    idxs = [i for i, _ in pairs]

    def f(p: dict[str, Tensor], flat_in: list[Any], gs: list[Tensor]) -> Tensor:
        ins = [t.unsqueeze(0) if d == 0 else t for t, d in zip(flat_in, in_dims)]
        a, kw = ins[: len(args)], dict(zip(keys, ins[len(args) :]))
        out = functional_call(module, p, tuple(a), kw)
        outs = [out] if isinstance(out, Tensor) else list(out)
        total = torch.zeros((), dtype=gs[0].dtype, device=gs[0].device)
        for i, gi in zip(idxs, gs):
            total = total + (outs[i].squeeze(0) * gi).sum()
        return total

    with replay_guard(), replay_autocast(amp):
        per_sample = vmap(grad(f), in_dims=(None, list(in_dims), [0] * len(gouts)))(
            params, flat, gouts
        )
    return {n: Dense(per_sample[n]) for n in names}
