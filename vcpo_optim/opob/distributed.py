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
* **Clipping and noise-scale statistics**: the per-rank sums (sample count,
  ``sum c_i^2 n_i``, the batch-scope moments, the clipped count, the "not
  only OPOB's gradient" flag) ride in the gradient reduction of
  :meth:`GradReducer.flush` (no extra collective with DDP);
  :meth:`GradReducer.grad_sq_norm` is ``||.grad||^2`` over all ranks (one
  scalar all-reduce per sharded layout: FSDP2 / HSDP / TP; none for DDP).
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
    "sq_sum",
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


class NonFiniteNorms(ValueError):
    """Per-sample gradient norms that overflowed (their own flag: a GradScaler overflow)."""


#: Flag codes carried by the collectives: 0 nothing wrong, 1 an error, 2 non-finite norms.
_CODE_ERROR, _CODE_NONFINITE = 1.0, 2.0

#: The stage named by errors agreed after the first collective of a call.
_WHAT = "error in the backward call"

#: Longest cause text a rank sends to the others (only on the error path).
_MAX_TEXT = 2000


def flag_code(error: BaseException | None) -> float:
    """The flag a rank contributes for its local ``error`` (0.0 when there is none)."""
    if error is None:
        return 0.0
    return _CODE_NONFINITE if isinstance(error, NonFiniteNorms) else _CODE_ERROR


def gather_text(text: str, group: Any) -> list[str]:
    """Every rank's ``text`` (UTF-8, truncated), in rank order. Two collectives; error path only."""
    data = text.encode("utf-8", errors="replace")[:_MAX_TEXT]
    n = _dist.all_gather_rows(torch.tensor([float(len(data))], dtype=torch.float64), group)
    sizes = [int(v) for v in n[:, 0].tolist()]
    buf = torch.zeros(max(max(sizes), 1), dtype=torch.float64)
    if data:
        buf[: len(data)] = torch.tensor(list(data), dtype=torch.float64)
    rows = _dist.all_gather_rows(buf, group)
    return [
        bytes(int(v) for v in rows[r, : sizes[r]].tolist()).decode("utf-8", errors="replace")
        for r in range(len(sizes))
    ]


def agreed_error(
    flags: list[float],
    error: BaseException | None,
    group: Any,
    what: str,
    kind: str = "data-parallel",
) -> ValueError | None:
    """The error every rank of ``group`` raises when some rank flagged a failure (``None`` if none did).

    ``flags`` are every rank's codes (:func:`flag_code`), identical on every rank. When
    one is set, the ranks exchange their causes (one more all-gather, only on this
    path) so that every rank raises the *same* message, naming the ranks and their
    causes. ``what`` names the stage; non-finite norms name themselves.
    """
    bad = [r for r, f in enumerate(flags) if f]
    if not bad:
        return None
    texts = gather_text("" if error is None else str(error), group)
    if all(flags[r] == _CODE_NONFINITE for r in bad):
        what = "non-finite per-sample gradient norms"
    causes = "; ".join(f"rank {r}: {texts[r] or '(no message)'}" for r in bad)
    return ValueError(
        f"OPOB: {what} on rank(s) {bad} of the {kind} group; every rank raises this error and "
        f"nothing was changed. {causes}"
    )


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
    row = torch.tensor([flag_code(error), *(payload or [])], dtype=torch.float64)
    rows = _dist.all_gather_rows(row, group).tolist()
    err = agreed_error([x[0] for x in rows], error, group, what)
    if err is not None:
        raise err from error
    return [x[1:] for x in rows]


def agree_tp(error: BaseException | None, tp_group: Any | None) -> BaseException | None:
    """Share a failure within the tensor-parallel group: afterwards every TP peer holds one or none.

    Run before the data-parallel agreement of the same stage, so that on a
    ``(dp, tp)`` mesh a failure anywhere reaches every rank (rows, then columns).
    """
    if tp_group is None or _dist.get_world_size(tp_group) <= 1:
        return error
    flags = _dist.all_gather_rows(torch.tensor([flag_code(error)], dtype=torch.float64), tp_group)
    return agreed_error(flags[:, 0].tolist(), error, tp_group, _WHAT, "tensor-parallel") or error


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
    ids: Tensor,
    stats: Tensor,
    sizes: list[int],
    group: Any,
    error: BaseException | None,
    what: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """One padded all-gather of per-group rows plus this rank's error flag; merge by id.

    Returns the sorted global ids, their merged stats (CPU float64, identical on
    every rank) and the global index of each local scope. A local ``error`` on any
    rank makes every rank raise the same ``ValueError`` (``what``).
    """
    m = max(max(sizes), 1)
    buf = torch.zeros(1 + m * ROW, dtype=torch.float64)
    buf[0] = flag_code(error)
    if ids.numel():
        rows_local = torch.cat([encode_ids(ids.cpu()), stats.cpu()], 1)
        buf[1 : 1 + rows_local.numel()] = rows_local.reshape(-1)
    got = _dist.all_gather_rows(buf.to(stats.device), group).cpu()
    err = agreed_error(got[:, 0].tolist(), error, group, what)
    if err is not None:
        raise err from error
    rows = torch.cat([got[r, 1:].view(m, ROW)[:n] for r, n in enumerate(sizes)])
    uniq, idx = torch.unique(decode_ids(rows[:, :2]), return_inverse=True)
    merged = merge_stats(rows[:, 2:], idx, uniq.numel())
    loc2glob = torch.searchsorted(uniq, ids.cpu())
    return uniq, merged, loc2glob


def gather_batch_stats(stats: Tensor, group: Any, error: BaseException | None, what: str) -> Tensor:
    """``scope="batch"``: all-gather one stats row per rank with an error flag; merged ``[1, N_STATS]``."""
    buf = torch.cat([torch.tensor([flag_code(error)], dtype=torch.float64), stats.cpu()])
    got = _dist.all_gather_rows(buf.to(stats.device), group).cpu()
    err = agreed_error(got[:, 0].tolist(), error, group, what)
    if err is not None:
        raise err from error
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

    def tp_active(self) -> bool:
        return self.tp_group is not None and _dist.get_world_size(self.tp_group) > 1

    # ------------------------------------------------------------------ norms

    def complete_norms(
        self, parts: list[tuple[Tensor, Tensor]], sq: Tensor, error: BaseException | None
    ) -> tuple[Tensor, BaseException | None]:
        """Complete the per-sample norms over the TP group, sharing any local failure there.

        ``parts`` holds ``(param, n_i(param))`` for every parameter of the call, ``sq``
        their sum. Partial norms of sharded parameters are summed over the TP group,
        replicated ones counted once. The TP peers' error flags ride in the same
        all-reduce; returns the completed norms and the error this rank now holds
        (its own, or the one every TP peer holds when a peer failed).
        """
        if not self.tp_active():
            return sq, error
        sharded = torch.zeros_like(sq)
        replicated = torch.zeros_like(sq)
        for p, n in parts:
            if id(p) in self.sharded_ids:
                sharded += n
            else:
                replicated += n
        world = _dist.get_world_size(self.tp_group)
        flags = torch.zeros(world, dtype=sq.dtype, device=sq.device)
        flags[_dist.get_rank(self.tp_group)] = flag_code(error)
        device = _dist.collective_device(self.tp_group, sharded.device)
        total = torch.cat([sharded, flags]).to(device)
        dist.all_reduce(total, group=self.tp_group)
        total = total.to(sq.device)
        err = agreed_error(total[-world:].tolist(), error, self.tp_group, _WHAT, "tensor-parallel")
        return total[:-world] + replicated, err or error

    # ------------------------------------------------------------------ gradients

    def begin(self) -> None:
        """Buffer this call's gradient writes until :meth:`flush`."""
        self._buffer = {}

    def end(self) -> dict[int, Tensor] | None:
        """Stop buffering; return what was buffered (``None`` if nothing was)."""
        buffer, self._buffer = self._buffer, None
        return buffer

    @property
    def buffering(self) -> bool:
        return self._buffer is not None

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

    def flush(
        self, buffer: dict[int, Tensor], error: BaseException | None, extra: Tensor | None = None
    ) -> tuple[list[Tensor], Tensor | None]:
        """Reduce the buffered contributions over the data-parallel group and write ``.grad``.

        The last agreement of a call: ``error`` (a failure on this rank since the
        previous collective) is flagged to the TP peers first, then to the
        data-parallel group inside the gradient all-reduce itself (one entry per
        rank appended to the first bucket; a separate all-gather when there is no
        plain bucket, e.g. FSDP2). On a flag every rank raises the same
        ``ValueError`` and no ``.grad`` is written: all collectives complete before
        the first write. Returns the parameters whose ``.grad`` was written (the
        same on every rank) and ``extra`` summed over the data-parallel group.

        ``extra``: a short float64 vector of per-rank sums (the statistics of the
        per-sample clipping and of the noise scale) that rides in the same
        collective (the first bucket, in its dtype; in the flag all-gather when
        there is no plain bucket); returned as float64 on its device, without a
        host sync when it rode in a bucket.
        """
        error = agree_tp(error, self.tp_group)
        group = self.dp_group()
        world = _dist.get_world_size(group)
        rank = _dist.get_rank(group)
        scale = 1.0 / world if self.grad_reduction == "mean" and group is not None else None
        plain: list[Tensor] = []
        fsdp: list[Tensor] = []
        for p in self.order:
            if is_dtensor(p) and self.fsdp:
                fsdp.append(p)
            else:
                plain.append(p)
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for p in plain:
            by_dtype.setdefault(acc_dtype(p), []).append(p)
        writes: list[tuple[Tensor, Tensor]] = []
        agreed = group is None
        if group is None and error is not None:
            raise error
        n_extra = 0 if extra is None else extra.numel()
        extra_sum = extra if group is None else None
        for dt, ps in by_dtype.items():
            device = ps[0].device
            chunks, present = [], []
            for p in ps:
                c = buffer.get(id(p))
                present.append(0.0 if c is None else 1.0)
                if c is None:
                    c = torch.zeros(self._local_shape(p), dtype=dt, device=device)
                chunks.append(c.to(dt).reshape(-1))
            tail = [torch.tensor(present, dtype=dt, device=device)]
            carry = not agreed  # the first bucket carries every rank's error flag
            if carry:
                flags = torch.zeros(world, dtype=dt, device=device)
                flags[rank] = flag_code(error)
                tail.append(flags)
                if extra is not None:
                    tail.append(extra.to(device=device, dtype=dt))
            flat = torch.cat([*chunks, *tail])
            if group is not None:
                cdev = _dist.collective_device(group, flat.device)
                red = flat.to(cdev)
                dist.all_reduce(red, group=group)
                flat = red.to(device)
            if carry:
                if extra is not None:
                    extra_sum = flat[flat.numel() - n_extra :].to(extra.device, torch.float64)
                    flat = flat[: flat.numel() - n_extra]
                err = agreed_error(flat[-world:].tolist(), error, group, _WHAT)
                if err is not None:
                    raise err from error
                flat = flat[:-world]
                agreed = True
            n_grad = flat.numel() - len(ps)
            if scale is not None:
                flat[:n_grad] *= scale
            offset = 0
            for k, p in enumerate(ps):
                shape = self._local_shape(p)
                n = shape.numel()
                seg = flat[offset : offset + n]
                offset += n
                if flat[n_grad + k] != 0:  # some rank had a gradient for p
                    writes.append((p, seg.reshape(shape)))
        if not agreed:
            rows = agree(error, group, _WHAT, None if extra is None else extra.tolist())
            if extra is not None:
                extra_sum = torch.tensor(rows, dtype=torch.float64).sum(0).to(extra.device)
        if fsdp:
            writes += self._reduce_fsdp(fsdp, buffer, scale)
        for p, g in writes:
            self._write_local(p, g)
        return [p for p, _ in writes], extra_sum

    def grad_sq_norm(self, device: torch.device) -> Tensor:
        """``||.grad||^2`` over the tracked parameters, global: a 0-d float64 tensor on ``device``.

        Plain gradients (replicated on every data-parallel rank once reduced, or
        replicated over the TP group) count once; a ``DTensor`` gradient's local
        squares are summed over the mesh dimensions on which it is sharded (FSDP2's
        ``Shard(0)``, HSDP's shard dimension, a TP shard), its replicated dimensions
        count once. One all-reduce per sharded layout (none for plain / DDP
        parameters); no host sync.
        """
        plain: list[Tensor] = []
        sharded: dict[tuple[int, tuple[int, ...]], tuple[Any, list[Tensor]]] = {}
        for p in self.order:
            g = p.grad
            if g is None:
                continue
            if is_dtensor(g):
                dims = tuple(i for i, pl in enumerate(g.placements) if not pl.is_replicate())
                if dims:
                    key = (id(g.device_mesh), dims)
                    sharded.setdefault(key, (g.device_mesh, []))[1].append(g.to_local())
                    continue
                g = g.to_local()
            plain.append(g)
        total = sq_sum(plain, device)
        for (_, dims), (mesh, gs) in sharded.items():
            t = sq_sum(gs, device)
            for d in dims:
                grp = mesh.get_group(d)
                cdev = _dist.collective_device(grp, device)
                buf = t.to(cdev)
                dist.all_reduce(buf, group=grp)
                t = buf.to(device)
            total = total + t
        return total

    def _local_shape(self, p: Tensor) -> torch.Size:
        return p.to_local().shape if is_dtensor(p) and not self.fsdp else p.shape

    @staticmethod
    def _write_local(p: Tensor, g: Tensor) -> None:
        if is_dtensor(p) and not is_dtensor(g):
            from torch.distributed.tensor import DTensor

            g = DTensor.from_local(
                g.to(p.dtype).contiguous(),
                p.device_mesh,
                p.placements,
                run_check=False,
                shape=p.shape,
                stride=p.stride(),
            )
        if is_dtensor(p):
            _accumulate(p, g)
            return
        write_plain(p, g)

    def _reduce_fsdp(
        self, params: list[Tensor], buffer: dict[int, Tensor], scale: float | None
    ) -> list[tuple[Tensor, Tensor]]:
        """Reduce-scatter full-size contributions into FSDP2's ``Shard(0)`` DTensor gradients.

        Returns ``(param, DTensor gradient)`` pairs to write.
        """
        from torch.distributed.tensor import DTensor, Replicate, Shard

        out: list[tuple[Tensor, Tensor]] = []
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
                out.append((p, full.redistribute(p.device_mesh, p.placements)))
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
                out.append((p, g))
        return out

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


def sq_sum(grads: list[Tensor], device: torch.device) -> Tensor:
    """``sum_g ||g||^2`` in float64 on ``device`` (each norm accumulated in float32 or float64)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        n = torch.linalg.vector_norm(g.detach(), dtype=acc_dtype(g))
        total = total + n.to(device=device, dtype=torch.float64).square()
    return total


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
