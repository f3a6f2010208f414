"""Process-group helpers shared by :mod:`vcpo_optim.ess` and :mod:`vcpo_optim.opob`.

The library never ships a parallelism scheme of its own: it only reduces small
tensors of sufficient statistics over a ``torch.distributed`` process group
that the caller owns (by default the world group). Everything here is a thin,
explicit wrapper so that the rest of the code can say *which* group it reduces
over and *where* the reduction tensor lives.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist

__all__ = [
    "WORLD",
    "GroupArg",
    "all_gather_rows",
    "collective_device",
    "get_rank",
    "get_world_size",
    "resolve_group",
]

#: Sentinel accepted wherever a ``process_group`` is taken: reduce over the
#: default (world) group if ``torch.distributed`` is initialised.
WORLD: Literal["world"] = "world"

GroupArg = Any  # a ``ProcessGroup``, the string ``"world"``, or ``None``


def resolve_group(process_group: GroupArg, *, default_world: bool) -> Any | None:
    """Return the process group to reduce over, or ``None`` for no reduction.

    Args:
        process_group: a ``torch.distributed.ProcessGroup``; the string
            ``"world"`` for the default group; or ``None``.
        default_world: what ``None`` means. ``True``: the default group when
            ``torch.distributed`` is initialised (the optimizers' convention);
            ``False``: no reduction (the free functions' convention).

    A group with a single member is returned as ``None``: there is nothing to
    reduce and no collective is issued.
    """
    if process_group is None:
        if not default_world:
            return None
        process_group = WORLD
    if isinstance(process_group, str):
        if process_group != WORLD:
            raise ValueError(
                f"process_group must be a ProcessGroup, 'world' or None, got {process_group!r}"
            )
        if not (dist.is_available() and dist.is_initialized()):
            return None
        process_group = dist.group.WORLD
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("a process_group was given but torch.distributed is not initialised")
    if dist.get_world_size(process_group) <= 1:
        return None
    return process_group


def get_world_size(group: Any | None) -> int:
    """World size of ``group`` (1 for ``None``)."""
    return 1 if group is None else dist.get_world_size(group)


def get_rank(group: Any | None) -> int:
    """This process's rank within ``group`` (0 for ``None``)."""
    return 0 if group is None else dist.get_rank(group)


def collective_device(group: Any | None, preferred: torch.device) -> torch.device:
    """Device on which a reduction over ``group`` must be issued.

    gloo reduces CPU tensors; NCCL (and other accelerator backends) reduce
    tensors on the current accelerator. ``preferred`` is used when the backend
    can take it, so that a single-device job never copies.
    """
    if group is None:
        return preferred
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend and "nccl" not in backend:
        return torch.device("cpu")
    if preferred.type == "cpu" and torch.cuda.is_available() and "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return preferred


def all_gather_rows(row: torch.Tensor, group: Any | None) -> torch.Tensor:
    """All-gather one 1-D tensor per rank into a ``[world_size, len(row)]`` tensor.

    This is the library's single collective per optimizer step: each rank
    contributes a short row of sufficient statistics, and every rank combines
    the rows in rank order, so that all ranks compute bit-identical results.
    The returned tensor is on ``row``'s device.
    """
    if group is None:
        return row.unsqueeze(0)
    device = collective_device(group, row.device)
    local = row.to(device).contiguous()
    out = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, local, group=group)
    return torch.stack(out).to(row.device)
