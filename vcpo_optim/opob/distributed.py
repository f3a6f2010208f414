"""The reductions of OPOB across ranks: data parallel (DDP, FSDP2) and tensor parallel.

This module holds only communication. It is imported by
:mod:`vcpo_optim.opob.step` (one backward call) and :mod:`vcpo_optim.opob.hook`
(the public :class:`~vcpo_optim.opob.OPOB`) and never imports either of them.

:class:`~vcpo_optim.opob.OPOB` writes ``sum_i c_i grad l_i`` into ``.grad``
itself, from one autograd pass that never forms parameter gradients. That
bypasses the gradient hooks of the parallel wrappers: DDP's reducer never sees
OPOB's gradients, and neither does FSDP2's reduce-scatter. The pieces here
supply what is missing:

* **Agreement** (:func:`agree`, :func:`agreed_error`): every collective of a
  backward call carries an error flag, so a failure on one rank makes every
  rank of the data-parallel group raise the same ``ValueError`` (naming the
  ranks) before any gradient changes; nobody hangs.
* **Baselines** (:func:`gather_varlen`, :func:`exchange_rows`): with
  ``agg="mean"`` the ranks exchange per-scope sufficient statistics only (a
  fixed-size row per rank for ``scope="batch"``, one row per local prompt
  group for ``"group"``); ``"median"`` / ``"winsorized_mean"`` gather the
  per-sample rewards, norms and group ids. Rows are merged in rank order on the
  CPU, so every rank gets bit-identical baselines. Collectives per backward
  call with ``agg="mean"``: the validation all-gather (error flag, and for
  ``scope="group"`` the number of local groups), one all-gather of the
  statistics rows (the non-finite-norm flag included; with ``norm_by_std`` and
  ``scope="group"`` one more before the norms, which need ``1/std``), and the
  gradient reduction: 3 (4).
* **Gradients** (:class:`GradReducer`): the gradient each rank computed from
  its own samples is summed over the data-parallel group in one bucketed
  collective per backward call, so ``.grad`` on every rank is
  ``sum_i c_i grad l_i`` over the *global* batch (``grad_reduction="sum"``),
  or that divided by the group size (``"mean"``, DDP's convention). Plain /
  DDP parameters: one all-reduce of all gradients per dtype. FSDP2
  (``fully_shard``) parameters (``DTensor``, ``Shard(0)`` on a 1-D mesh): one
  reduce-scatter straight into each rank's shard, written as ``DTensor``
  gradients like FSDP2's own; other layouts (HSDP) all-reduce then shard.
* **Tensor parallel** (:class:`GradReducer` with a TP group): each rank
  computes the per-sample squared norm of its parameter shards; partial norms
  of sharded parameters are summed over the TP group, replicated ones
  (``Replicate`` placement, e.g. a row-wise bias, and plain tensors) counted
  once. The rules and the engine see each TP ``DTensor`` parameter as a local
  stand-in :class:`~torch.nn.Parameter` (its shard); the gradient written to a
  TP parameter is its local shard.

Without a process group (single process, or a group of one rank) and without
FSDP2 / TP, nothing here issues a collective or buffers: gradients are
written straight into ``.grad``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import distributed as _dist
from .baseline import N_STATS, merge_stats
from .engine import acc_dtype

__all__ = [
    "ROW",
    "GradReducer",
    "agree",
    "agreed_error",
    "check_fsdp_layout",
    "decode_ids",
    "encode_ids",
    "exchange_rows",
    "fsdp_modules",
    "gather_varlen",
    "is_dtensor",
    "local",
]


# ----------------------------------------------------------------------------- layouts


def is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        return False
    return isinstance(t, DTensor)


def local(t: Any) -> Any:
    """The local shard of a ``DTensor``; anything else unchanged."""
    return t.to_local() if is_dtensor(t) else t


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - old torch
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def check_fsdp_layout(params: Any) -> None:
    """Refuse FSDP2 on top of tensor parallelism (parameters sharded on two mesh dims).

    There the activations OPOB sees are tensor-parallel shards while FSDP2
    shards the full parameter: not supported. FSDP2 (``Shard(0)``) and HSDP
    (``Replicate(), Shard(0)``) are.
    """
    from torch.distributed.tensor import Replicate

    for p in params:
        if is_dtensor(p) and sum(pl != Replicate() for pl in p.placements) > 1:
            raise ValueError(
                "OPOB: FSDP2 combined with tensor parallelism (parameters sharded on "
                f"{p.placements}) is not supported; use tensor parallelism with OPOB's own "
                "data-parallel reduction (OPOB(model, process_group=dp_group, "
                "tensor_parallel_group=tp_group), no fully_shard), or FSDP2/HSDP without TP"
            )


# ----------------------------------------------------------------------------- agreement


def agreed_error(
    flags: list[float], error: BaseException | None, rank: int, what: str
) -> ValueError | None:
    """The error every rank raises when some rank flagged ``what`` (``None`` if nobody did)."""
    bad = [r for r, f in enumerate(flags) if f]
    if not bad:
        return None
    msg = f"OPOB: {what} on rank(s) {bad} of the data-parallel group"
    if error is not None:
        return ValueError(f"{msg}. On rank {rank}: {error}")
    return ValueError(f"{msg} (see the error raised there); nothing was changed")


def agree(
    error: BaseException | None,
    group: Any | None,
    what: str,
    payload: list[float] | None = None,
) -> list[list[float]]:
    """Every rank learns whether any rank failed; all raise the same error, or none does.

    ``payload`` (same length on every rank) rides along in the same all-gather;
    returns every rank's payload. Without a group: raises ``error`` itself.
    """
    if group is None:
        if error is not None:
            raise error
        return [payload or []]
    row = torch.tensor([0.0 if error is None else 1.0, *(payload or [])], dtype=torch.float64)
    rows = _dist.all_gather_rows(row, group).tolist()
    err = agreed_error([x[0] for x in rows], error, _dist.get_rank(group), what)
    if err is not None:
        raise err from error
    return [x[1:] for x in rows]


# ----------------------------------------------------------------------------- baselines


def gather_varlen(x: Tensor, group: Any | None) -> tuple[Tensor, int]:
    """Concatenate a 1-D tensor over the ranks of ``group`` in rank order; also return this rank's offset."""
    if group is None:
        return x, 0
    n = _dist.all_gather_rows(
        torch.tensor([float(x.numel())], dtype=torch.float64, device=x.device), group
    )
    sizes = [int(v) for v in n[:, 0].tolist()]
    m = max(sizes)
    wide = torch.float64 if x.is_floating_point() else torch.int64  # ids stay exact
    pad = torch.zeros(m, dtype=wide, device=x.device)
    pad[: x.numel()] = x.to(wide)
    rows = _dist.all_gather_rows(pad, group)
    rank = _dist.get_rank(group)
    out = torch.cat([rows[r, : sizes[r]] for r in range(len(sizes))]).to(x.dtype)
    return out, sum(sizes[:rank])


def encode_ids(ids: Tensor) -> Tensor:
    """int64 ids as two exactly representable float64 columns (high and low 32 bits)."""
    return torch.stack([(ids >> 32).to(torch.float64), (ids & 0xFFFFFFFF).to(torch.float64)], 1)


def decode_ids(cols: Tensor) -> Tensor:
    return (cols[:, 0].to(torch.int64) << 32) | cols[:, 1].to(torch.int64)


#: Columns of a per-group row exchanged with ``scope="group"``: the id (2 columns), then the stats.
ROW = 2 + N_STATS


def exchange_rows(
    ids: Tensor, stats: Tensor, sizes: list[int], group: Any, flag: bool, what: str
) -> tuple[Tensor, Tensor, Tensor]:
    """One padded all-gather of per-group rows plus an error flag; merge by id.

    Returns the sorted global ids, their merged stats (CPU float64, identical on
    every rank) and the global index of each local scope. A flag on any rank makes
    every rank raise the same ``ValueError`` (``what``).
    """
    m = max(sizes)
    buf = torch.zeros(1 + m * ROW, dtype=torch.float64)
    buf[0] = float(flag)
    if ids.numel():
        rows_local = torch.cat([encode_ids(ids.cpu()), stats.cpu()], 1)
        buf[1 : 1 + rows_local.numel()] = rows_local.reshape(-1)
    got = _dist.all_gather_rows(buf.to(stats.device), group).cpu()
    err = agreed_error(got[:, 0].tolist(), None, _dist.get_rank(group), what)
    if err is not None:
        raise err
    rows = torch.cat([got[r, 1:].view(m, ROW)[:n] for r, n in enumerate(sizes)])
    uniq, idx = torch.unique(decode_ids(rows[:, :2]), return_inverse=True)
    merged = merge_stats(rows[:, 2:], idx, uniq.numel())
    loc2glob = torch.searchsorted(uniq, ids.cpu())
    return uniq, merged, loc2glob


def gather_batch_stats(stats: Tensor, group: Any, flag: bool, what: str) -> Tensor:
    """``scope="batch"``: all-gather one stats row per rank with an error flag; merged ``[1, N_STATS]``."""
    buf = torch.cat([torch.tensor([float(flag)], dtype=torch.float64), stats.cpu()])
    got = _dist.all_gather_rows(buf.to(stats.device), group).cpu()
    err = agreed_error(got[:, 0].tolist(), None, _dist.get_rank(group), what)
    if err is not None:
        raise err
    return merge_stats(got[:, 1:], torch.zeros(got.shape[0], dtype=torch.long), 1)


# ----------------------------------------------------------------------------- gradients


class GradReducer:
    """Gradient writes and the per-sample-norm completion of one OPOB instance.

    Args:
        process_group: the data-parallel group argument (``None``: the world
            group when ``torch.distributed`` is initialised; resolved at every
            call, see :func:`vcpo_optim.distributed.resolve_group`).
        tensor_parallel_group: the TP group, or ``None``.
        grad_reduction: ``"sum"`` or ``"mean"`` over the data-parallel group.
        fsdp: whether the model is sharded with ``fully_shard``.
        order: the trainable parameters in ``named_parameters`` order (the
            gradient bucket's order, identical on every rank).

    :meth:`local` tells whether a call needs nothing from this class (no group,
    no FSDP2, no TP): then :meth:`write_grad` writes straight into ``.grad`` and
    no collective is issued.
    """

    def __init__(
        self,
        process_group: Any,
        tensor_parallel_group: Any,
        grad_reduction: str,
        fsdp: bool,
        order: list[Tensor],
    ) -> None:
        self.process_group = process_group
        self.tp_group = tensor_parallel_group
        self.grad_reduction = grad_reduction
        self.fsdp = fsdp
        self.order = order
        self._buffer: dict[int, Tensor] | None = None
        self.tp_params: dict[int, Tensor] = {}  # local stand-in id -> TP DTensor parameter
        self.sharded_ids: set[int] = set()
        self.stand_ins: dict[int, Tensor] = {}  # id(TP DTensor parameter) -> local stand-in

    def dp_group(self) -> Any | None:
        return _dist.resolve_group(self.process_group, default_world=True)

    def local(self) -> bool:
        """No FSDP2, no TP and no data-parallel group: nothing to reduce."""
        return not self.fsdp and self.tp_group is None and self.dp_group() is None

    # ------------------------------------------------------------------ norms

    def complete_norms(
        self, parts: list[tuple[Tensor, Tensor]], sq: Tensor, group: Any | None, uses_stats: bool
    ) -> Tensor:
        """Complete the per-sample norms over the TP group; agree on non-finite norms over DP.

        ``parts`` holds ``(param, n_i(param))`` for every parameter of the call, ``sq``
        their sum. On the statistics path the non-finite flag rides in the
        statistics collective instead.
        """
        if self.tp_group is not None and _dist.get_world_size(self.tp_group) > 1:
            sharded = torch.zeros_like(sq)
            replicated = torch.zeros_like(sq)
            for p, n in parts:
                if id(p) in self.sharded_ids:
                    sharded += n
                else:
                    replicated += n
            device = _dist.collective_device(self.tp_group, sharded.device)
            total = sharded.to(device)
            dist.all_reduce(total, group=self.tp_group)
            sq = total.to(sq.device) + replicated
        if group is None or uses_stats:
            return (
                sq  # the caller's check (statistics path: its flag column) covers non-finite norms
            )
        finite = bool(torch.isfinite(sq).all())
        agree(
            None if finite else ValueError("per-sample gradient norms are not finite"),
            group,
            "non-finite per-sample gradient norms",
        )
        return sq

    # ------------------------------------------------------------------ gradients

    def begin(self) -> None:
        """Buffer this call's gradient writes until :meth:`flush`."""
        self._buffer = {}

    def end(self) -> dict[int, Tensor] | None:
        """Stop buffering; return what was buffered (``None`` if nothing was)."""
        buffer, self._buffer = self._buffer, None
        return buffer

    def write_grad(self, p: Tensor, contrib: Tensor) -> None:
        """Accumulate ``contrib`` (this call's share of ``sum_i c_i grad l_i``) for ``p``.

        Outside :meth:`begin` / :meth:`end`: straight into ``p.grad``, like autograd.
        Inside: into the buffer that :meth:`flush` reduces over the group.
        """
        if self._buffer is None:
            write_plain(p, contrib)
            return
        real = self.tp_params.get(id(p), p)
        prev = self._buffer.get(id(real))
        c = contrib.detach()
        self._buffer[id(real)] = c.clone() if prev is None else prev + c

    def flush(self, buffer: dict[int, Tensor] | None) -> None:
        """Reduce the buffered contributions over the data-parallel group and write ``.grad``."""
        if buffer is None:
            return
        group = self.dp_group()
        scale = (
            1.0 / _dist.get_world_size(group)
            if self.grad_reduction == "mean" and group is not None
            else None
        )
        plain: list[Tensor] = []
        fsdp: list[Tensor] = []
        for p in self.order:
            if is_dtensor(p) and self.fsdp:
                fsdp.append(p)
            else:
                plain.append(p)
        if plain:
            self._reduce_plain(plain, buffer, group, scale)
        if fsdp:
            self._reduce_fsdp(fsdp, buffer, scale)

    def _local_shape(self, p: Tensor) -> torch.Size:
        return p.to_local().shape if is_dtensor(p) and not self.fsdp else p.shape

    def _reduce_plain(
        self,
        params: list[Tensor],
        buffer: dict[int, Tensor],
        group: Any | None,
        scale: float | None,
    ) -> None:
        """One all-reduce (per dtype) of every parameter's contribution, then write ``.grad``."""
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for p in params:
            by_dtype.setdefault(acc_dtype(p), []).append(p)
        for dt, ps in by_dtype.items():
            device = ps[0].device
            chunks, present = [], []
            for p in ps:
                c = buffer.get(id(p))
                shape = self._local_shape(p)
                present.append(0.0 if c is None else 1.0)
                if c is None:
                    c = torch.zeros(shape, dtype=dt, device=device)
                chunks.append(c.to(dt).reshape(-1))
            flat = torch.cat([*chunks, torch.tensor(present, dtype=dt, device=device)])
            if group is not None:
                cdev = _dist.collective_device(group, flat.device)
                red = flat.to(cdev)
                dist.all_reduce(red, group=group)
                flat = red.to(device)
            if scale is not None:
                flat[: flat.numel() - len(ps)] *= scale
            offset = 0
            for k, p in enumerate(ps):
                shape = self._local_shape(p)
                n = shape.numel()
                seg = flat[offset : offset + n]
                offset += n
                if flat[flat.numel() - len(ps) + k] == 0:
                    continue  # no rank had a gradient for p
                self._write_local(p, seg.reshape(shape))

    @staticmethod
    def _write_local(p: Tensor, g: Tensor) -> None:
        if is_dtensor(p):
            from torch.distributed.tensor import DTensor

            g = DTensor.from_local(
                g.to(p.dtype).contiguous(),
                p.device_mesh,
                p.placements,
                run_check=False,
                shape=p.shape,
                stride=p.stride(),
            )
            _accumulate(p, g)
            return
        write_plain(p, g)

    def _reduce_fsdp(
        self, params: list[Tensor], buffer: dict[int, Tensor], scale: float | None
    ) -> None:
        """Reduce-scatter full-size contributions into FSDP2's ``Shard(0)`` DTensor gradients."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        fast: dict[tuple[Any, torch.dtype], list[Tensor]] = {}
        for p in params:
            if len(p.placements) == 1 and p.placements[0] == Shard(0):
                fast.setdefault((p.device_mesh, acc_dtype(p)), []).append(p)
            else:  # other layouts (HSDP, TP+FSDP): all-reduce then shard locally
                c = buffer.get(id(p))
                if c is None:
                    c = torch.zeros(p.shape, dtype=acc_dtype(p), device=p.to_local().device)
                full = DTensor.from_local(
                    c, p.device_mesh, [Replicate()] * p.device_mesh.ndim, run_check=False
                )
                for i in range(p.device_mesh.ndim):
                    dist.all_reduce(full.to_local(), group=p.device_mesh.get_group(i))
                if scale is not None:
                    full.to_local().mul_(scale)
                _accumulate(p, full.redistribute(p.device_mesh, p.placements))
        for (mesh, dt), ps in fast.items():
            group = mesh.get_group()
            world = dist.get_world_size(group)
            rank = dist.get_rank(group)
            device = ps[0].to_local().device
            cdev = _dist.collective_device(group, device)
            blocks, sizes = [], []
            for p in ps:
                c = buffer.get(id(p))
                rows = p.shape[0] if p.dim() else 1
                rest = p.numel() // max(rows, 1)
                chunk = -(-rows // world)  # ceil: torch.chunk / FSDP2 sharding of dim 0
                full = torch.zeros(world * chunk * rest, dtype=dt, device=cdev)
                if c is not None:
                    full[: c.numel()] = c.reshape(-1).to(device=cdev, dtype=dt)
                present = torch.full((world, 1), 0.0 if c is None else 1.0, dtype=dt, device=cdev)
                blocks.append(torch.cat([full.view(world, chunk * rest), present], dim=1))
                sizes.append((chunk, rest, rows))
            send = torch.cat(blocks, dim=1).contiguous()
            recv = torch.empty(send.shape[1], dtype=dt, device=cdev)
            dist.reduce_scatter_tensor(recv, send.view(-1), group=group)
            offset = 0
            for p, (chunk, rest, rows) in zip(ps, sizes):
                seg = recv[offset : offset + chunk * rest]
                flag = recv[offset + chunk * rest]
                offset += chunk * rest + 1
                if flag == 0:
                    continue
                local_rows = max(0, min(chunk, rows - rank * chunk))
                part = seg.view(chunk, rest)[:local_rows].reshape(p.to_local().shape)
                if scale is not None:
                    part = part * scale
                g = DTensor.from_local(
                    part.to(device=device, dtype=p.dtype).contiguous(),
                    p.device_mesh,
                    p.placements,
                    run_check=False,
                    shape=p.shape,
                    stride=p.stride(),
                )
                _accumulate(p, g)

    # ------------------------------------------------------------------ tensor parallel

    def swap_tp_params(
        self, model: nn.Module, params: dict[int, Tensor], names: dict[int, str]
    ) -> list[tuple[nn.Module, str, Tensor]]:
        """Expose each TP ``DTensor`` parameter to the norm engine as its local shard.

        The activations of a tensor-parallel module are those of its local
        shard, so the rules and the engine work on the local tensor; the result
        is written back to the ``DTensor`` parameter. Each stand-in is added to
        ``params`` / ``names`` (the tracked parameters) once and kept across calls.
        """
        from torch.distributed.tensor import Replicate

        swapped = []
        for mod in model.modules():
            for name, p in list(mod._parameters.items()):
                if p is None or not p.requires_grad or not is_dtensor(p):
                    continue
                shard = p.to_local()
                stand_in = self.stand_ins.get(id(p))
                if stand_in is None or stand_in.data_ptr() != shard.data_ptr():
                    # one stand-in per parameter, kept across calls (accumulators key on it)
                    stand_in = nn.Parameter(shard, requires_grad=True)
                    self.stand_ins[id(p)] = stand_in
                    self.tp_params[id(stand_in)] = p
                    params[id(stand_in)] = stand_in
                    names[id(stand_in)] = names.get(id(p), name)
                    if any(pl != Replicate() for pl in p.placements):
                        self.sharded_ids.add(id(stand_in))
                mod._parameters[name] = stand_in
                swapped.append((mod, name, p))
        return swapped

    @staticmethod
    def restore_tp_params(swapped: list[tuple[nn.Module, str, Tensor]]) -> None:
        for mod, name, p in swapped:
            mod._parameters[name] = p

    def real_param(self, p: Tensor) -> Tensor:
        """The TP ``DTensor`` parameter behind a stand-in (``p`` itself otherwise)."""
        return self.tp_params.get(id(p), p)


def write_plain(p: Tensor, contrib: Tensor) -> None:
    """Accumulate ``contrib`` into ``p.grad`` (the single place a plain gradient is written)."""
    contrib = contrib.to(p.dtype).reshape(p.shape)
    if p.grad is None:
        p.grad = contrib if contrib.is_contiguous() else contrib.contiguous()
    else:
        p.grad.add_(contrib)


def _accumulate(p: Tensor, g: Tensor) -> None:
    if p.grad is None:
        p.grad = g
    else:
        p.grad.add_(g)
