"""OPOB under data parallelism (DDP, FSDP2) and tensor parallelism.

:class:`OPOB` writes ``sum_i c_i grad l_i`` into ``.grad`` itself, from one
autograd pass that never forms parameter gradients. That bypasses the
gradient hooks of the parallel wrappers: DDP's reducer never sees OPOB's
gradients, and neither does FSDP2's reduce-scatter. :class:`DistributedOPOB`
supplies the missing reductions:

* **Data parallel** (``process_group``, default the world): the baselines are
  global. With ``agg="mean"`` the ranks exchange per-scope sufficient
  statistics only (a fixed-size row per rank for ``scope="batch"``, one row
  per local prompt group for ``"group"``; the error flags ride in the same
  collectives); ``"median"`` / ``"winsorized_mean"`` gather the per-sample
  rewards, norms and group ids. Collectives per :meth:`backward` call with
  ``agg="mean"``: the validation all-gather (error flag, and for
  ``scope="group"`` the number of local groups), one all-gather of the
  statistics rows (error flag for non-finite norms included; with
  ``norm_by_std`` and ``scope="group"`` one more before the norms, which
  need ``1/std``), and the gradient reduction below: 3 (4). The rows are
  merged in rank order on the CPU, so every rank gets bit-identical baselines.
  The gradient each rank computed from its own samples is summed over the
  group in one bucketed collective per :meth:`backward` call, so ``.grad`` on
  every rank is ``sum_i c_i grad l_i`` over the *global* batch: exactly what a
  single process computes on the concatenated batch, however the samples are
  split over ranks (``grad_reduction="sum"``, the default). With
  ``grad_reduction="mean"`` it is divided by the group size instead, which is
  DDP's own convention (right when each rank's ``l_i`` carries ``1/B_local``,
  as the seq-mean losses of :mod:`vcpo_optim.losses` do, with equal local
  batch sizes).

  - plain / DDP parameters: one all-reduce of all gradients (per dtype);
  - FSDP2 (``fully_shard``) parameters (``DTensor``, ``Shard(0)`` on a 1-D
    mesh): one reduce-scatter straight into each rank's shard, written as
    ``DTensor`` gradients like FSDP2's own.

* **Tensor parallel** (``tensor_parallel_group``): for parameters that are
  ``DTensor`` s sharded by ``ColwiseParallel`` / ``RowwiseParallel`` (or any
  ``Shard`` placement on the TP mesh) each rank computes the per-sample
  squared norm of its shard; these partial norms are summed over the TP
  group, and the norms of replicated parameters (``Replicate`` placement, e.g.
  the bias of a row-wise linear, and plain tensors) are counted once. The
  gradient written to a TP parameter is its local shard.

Faults: invalid input on one rank (NaN rewards or losses, a malformed batch,
non-finite norms) makes every rank of the data-parallel group raise the same
``ValueError`` naming the ranks, before any gradient changes; nobody hangs.

Every rank must call :meth:`backward` the same number of times per optimizer
step (as with DDP). A rank with no samples in a call still calls it, with an
empty ``per_sample_loss`` (shape ``[0]``) and empty ``rewards``.

``vcpo_optim.OPOB(...)`` constructs a :class:`DistributedOPOB`; without a
process group (single process, or a group of one rank) it is exactly
:class:`~vcpo_optim.opob.hook.OPOB` (no buffering, no collective).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import distributed as _dist
from .baseline import scope_baselines, scope_inv_std
from .engine import acc_dtype
from .hook import OPOB, OPOBResult, _agreed_error, _gather_varlen
from .rules import RULES, get_rule, register_rule

__all__ = ["DistributedOPOB"]


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        return False
    return isinstance(t, DTensor)


def _check_fsdp_layout(params: Any) -> None:
    """Refuse FSDP2 on top of tensor parallelism (parameters sharded on two mesh dims).

    There the activations OPOB sees are tensor-parallel shards while FSDP2
    shards the full parameter: not supported. FSDP2 (``Shard(0)``) and HSDP
    (``Replicate(), Shard(0)``) are.
    """
    from torch.distributed.tensor import Replicate

    for p in params:
        if _is_dtensor(p) and sum(pl != Replicate() for pl in p.placements) > 1:
            raise ValueError(
                "OPOB: FSDP2 combined with tensor parallelism (parameters sharded on "
                f"{p.placements}) is not supported; use tensor parallelism with OPOB's own "
                "data-parallel reduction (DistributedOPOB(model, process_group=dp_group, "
                "tensor_parallel_group=tp_group), no fully_shard), or FSDP2/HSDP without TP"
            )


def _as_empty(x: Any, device: torch.device, what: str) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(x if x is not None else [])
    if tuple(t.shape) != (0,):
        raise ValueError(
            f"OPOB: per_sample_loss is empty but {what} has shape {tuple(t.shape)} (expected [0])"
        )
    return t.to(device)


def _local(t: Any) -> Any:
    return t.to_local() if _is_dtensor(t) else t


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - old torch
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _alias_fsdp_rules(model: nn.Module) -> None:
    """``fully_shard`` swaps a module's class for a dynamic ``FSDP<Cls>(FSDPModule, Cls)``.

    Rules are looked up by exact type, so register the original class's rule
    for the dynamic class too.
    """
    for m in _fsdp_modules(model):
        cls = type(m)
        if get_rule(m) is not None:
            continue
        for base in cls.__mro__[1:]:
            rule = RULES.get(base)
            if rule is not None:
                register_rule(cls)(rule)
                break


class DistributedOPOB(OPOB):
    r""":class:`~vcpo_optim.opob.OPOB` that reduces its gradients and norms across ranks.

    ``vcpo_optim.OPOB(...)`` returns one of these. Attach it to the model
    *inside* the parallel wrapper (``ddp.module``; the ``fully_shard`` model
    itself; the parallelized TP model)::

        model = DDP(policy)                        # optional: OPOB does the all-reduce
        opob = OPOB(policy, scope="group")
        with model.no_sync():                      # DDP's own reducer has nothing to do
            l = per_sample_loss(model(batch))      # [B_local]
            opob.backward(l, rewards, groups)      # .grad = global sum_i c_i grad l_i
        optimizer.step()

    Args:
        model: the module whose trainable parameters OPOB covers.
        process_group: data-parallel group. Default ``None``: the world group
            when ``torch.distributed`` is initialised. With tensor
            parallelism it is required: the data-parallel group (e.g.
            ``mesh["dp"].get_group()``, of size 1 without data parallelism).
        tensor_parallel_group: the TP group over which parameters are sharded
            (e.g. ``mesh["tp"].get_group()``). Default ``None``: taken from the
            mesh of the first TP-sharded ``DTensor`` parameter, if any.
        grad_reduction: ``"sum"`` (default; ``.grad`` is the sum over the
            global batch, equal to single-process OPOB on the concatenated
            batch) or ``"mean"`` (divided by the data-parallel group size:
            DDP's convention).
        **kwargs: ``scope``, ``agg``, ``norm_by_std``, ``strict``,
            ``winsor_q``: as :class:`~vcpo_optim.opob.OPOB`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        process_group: Any = None,
        tensor_parallel_group: Any = None,
        grad_reduction: str = "sum",
        **kwargs: Any,
    ) -> None:
        if grad_reduction not in ("sum", "mean"):
            raise ValueError(
                f"OPOB: grad_reduction must be 'sum' or 'mean', got {grad_reduction!r}"
            )
        _alias_fsdp_rules(model)
        super().__init__(model, process_group=process_group, **kwargs)
        self.grad_reduction = grad_reduction
        self._fsdp = _fsdp_modules(model)
        if self._fsdp:
            _check_fsdp_layout(self._params.values())
        # Order of the gradient bucket: named_parameters order, identical on every rank.
        self._order = list(self._params.values())
        self._buffer: dict[int, Tensor] | None = None
        self._tp_params: dict[int, Tensor] = {}  # local stand-in id -> TP DTensor parameter
        self._tp_group = tensor_parallel_group
        if not self._fsdp:
            for p in self._order:
                if _is_dtensor(p) and self._tp_group is None:
                    self._tp_group = p.device_mesh.get_group()
        self._sharded_ids: set[int] = set()
        self._stand_ins: dict[int, Tensor] = {}  # id(TP DTensor parameter) -> local stand-in
        if (
            process_group is None
            and self._tp_group is not None
            and _dist.get_world_size(_dist.resolve_group(self._tp_group, default_world=False)) > 1
        ):
            raise ValueError(
                "OPOB: the model is tensor parallel; pass process_group=<the data-parallel group> "
                "(e.g. mesh['dp'].get_group(), of size 1 without data parallelism): the default, "
                "the world group, would also sum the gradients of different TP shards"
            )

    # ------------------------------------------------------------------ groups

    def _dp_group(self) -> Any | None:
        return _dist.resolve_group(self._group_arg, default_world=True)

    def _agree(
        self,
        error: BaseException | None,
        group: Any | None,
        what: str,
        payload: list[float] | None = None,
    ) -> list[list[float]]:
        """Every rank learns whether any rank failed; all raise the same error, or none does.

        ``payload`` (same length on every rank) rides along in the same all-gather;
        returns every rank's payload.
        """
        if group is None:
            if error is not None:
                raise error
            return [payload or []]
        row = torch.tensor([0.0 if error is None else 1.0, *(payload or [])], dtype=torch.float64)
        rows = _dist.all_gather_rows(row, group).tolist()
        err = _agreed_error([x[0] for x in rows], error, _dist.get_rank(group), what)
        if err is not None:
            raise err from error
        return [x[1:] for x in rows]

    def _sizes_ride_along(self, group: Any | None) -> bool:
        """Group scope on the statistics path: the number of local groups rides on validation."""
        return self._uses_stats(group) and self.scope == "group"

    # ------------------------------------------------------------------ backward

    def backward(self, per_sample_loss: Tensor, rewards: Any, groups: Any = None) -> OPOBResult:
        """As :meth:`OPOB.backward`, with the reductions described in the module docstring.

        A rank with no samples in this call passes an empty ``per_sample_loss``
        (shape ``[0]``; a forward pass on the empty batch is optional) and
        empty ``rewards``: it takes part in every collective and receives the
        global gradient.
        """
        if not self._fsdp and self._tp_group is None:
            self._check_still_plain()
            if self._dp_group() is None:
                return super().backward(per_sample_loss, rewards, groups)  # nothing to reduce
        self._buffer = {}
        swapped = []
        if self._tp_group is not None:
            swapped = self._swap_tp_params()
            for u in self._tape:  # inputs a TP style turned into DTensors: their local shards
                u.args = tuple(_local(a) for a in u.args)
                u.kwargs = {k: _local(v) for k, v in u.kwargs.items()}
        try:
            if (
                isinstance(per_sample_loss, Tensor)
                and per_sample_loss.dim() == 1
                and per_sample_loss.shape[0] == 0
                and self._dp_group() is not None
            ):
                self._tape.clear()
                result = self._backward_empty(per_sample_loss, rewards, groups)
            else:
                result = super().backward(per_sample_loss, rewards, groups)
            if swapped:
                # the step-boundary check looks at the real parameters' .grad
                self._written = [self._tp_params.get(id(p), p) for p in self._written]
        finally:
            self._restore_tp_params(swapped)
            buffer, self._buffer = self._buffer, None
        self._flush(buffer)
        if not self._written:
            self._written = [p for p in self._order if p.grad is not None]
        return result

    def _check_still_plain(self) -> None:
        """Refuse a model that was sharded or parallelized after OPOB was attached."""
        late = bool(_fsdp_modules(self.model)) or any(
            _is_dtensor(p) for p in self.model.parameters()
        )
        if late:
            self._tape.clear()
            raise ValueError(
                "OPOB: the model was sharded (fully_shard) or parallelized (parallelize_module) "
                "after OPOB was attached; its parameters are no longer the ones OPOB tracks. "
                "Attach OPOB after fully_shard / parallelize_module."
            )

    def _backward_empty(self, loss: Tensor, rewards: Any, groups: Any) -> OPOBResult:
        """This rank's part of a backward call in which it has no samples.

        Mirrors the collectives of :meth:`OPOB._backward` and its per-step
        state, with ``B = 0``: validation (with the number of local groups),
        then per-scope statistics (``agg="mean"``) or the per-sample rewards,
        group ids and norms (median, winsorized mean).
        """
        group = self._dp_group()
        error = None
        try:
            r = _as_empty(rewards, loss.device, "rewards")
            g = None
            if groups is not None and self.scope == "group":
                g = _as_empty(groups, loss.device, "groups").to(torch.int64)
        except ValueError as exc:
            error = exc
        payload = [0.0] if self._sizes_ride_along(group) else None
        rows = self._agree(error, group, "invalid input", payload)
        if payload is not None:
            self._pending_sizes = [int(x[0]) for x in rows]
        if any(p.grad is None for p in self._written):
            self._reset_step()
        dev = loss.device
        dt = (
            torch.float64
            if any(p.dtype == torch.float64 for p in self._params.values())
            else torch.float32
        )
        r = r.to(dt)
        if self._uses_stats(group):
            return self._backward_empty_stats(r, g, group)
        r_scope, sid_all, n_scopes, r_call, _, new_ids = self._scopes(0, r, g, group)
        if r_call.numel() == 0:
            raise ValueError("OPOB: empty batch: no rank has a sample in this backward call")
        inv = scope_inv_std(r_scope, sid_all, n_scopes) if self.norm_by_std else None
        sq = self._reduce_sq_norms([], torch.zeros(0, dtype=dt, device=dev))
        n_all, _ = _gather_varlen(sq, group)
        batch_scope = self.scope == "batch"
        if batch_scope and self._hist_n is not None:
            n_scope = torch.cat([self._hist_n, n_all])
        else:
            n_scope = n_all
        bs = scope_baselines(n_scope, r_scope, sid_all, n_scopes, self.agg, self.winsor_q)
        ks = inv if inv is not None else torch.ones(n_scopes, dtype=dt, device=dev)
        with torch.no_grad():
            if batch_scope:
                bb, kk = bs[0], ks[0]
                pb, pk = self._prev_b, self._prev_k
                for pid, (s1, s0) in self._sums.items():  # earlier calls: their baseline moved
                    self._write_grad(self._params[pid], (kk - pk) * s1 - (kk * bb - pk * pb) * s0)
                self._prev_b, self._prev_k = bb, kk
                self._hist_n, self._hist_r = n_scope, r_scope
            elif new_ids is not None:
                seen = self._seen_groups
                self._seen_groups = new_ids if seen is None else torch.cat([seen, new_ids])
        self._written = [self._params[i] for i in self._sums]
        empty = torch.zeros(0, dtype=dt, device=dev)
        return OPOBResult(sq_norms=empty, baselines=empty.clone(), coefficients=empty.clone())

    def _backward_empty_stats(self, r: Tensor, g: Tensor | None, group: Any) -> OPOBResult:
        """:meth:`_backward_empty` on the sufficient-statistics path (``agg="mean"``)."""
        plan = self._stats_scopes(0, r, g, group)
        sq = self._reduce_sq_norms([], torch.zeros(0, dtype=r.dtype, device=r.device))
        bs, ks, new_ids, step_stats = self._stats_finish(sq, r, plan, g, group)
        with torch.no_grad():
            if self.scope == "batch":
                bb, kk = bs[0], ks[0]
                pb, pk = self._prev_b, self._prev_k
                for pid, (s1, s0) in self._sums.items():  # earlier calls: their baseline moved
                    self._write_grad(self._params[pid], (kk - pk) * s1 - (kk * bb - pk * pb) * s0)
                self._prev_b, self._prev_k = bb, kk
                self._hist_stats = step_stats
            elif new_ids is not None:
                seen = self._seen_groups
                self._seen_groups = new_ids if seen is None else torch.cat([seen, new_ids])
        self._written = [self._params[i] for i in self._sums]
        empty = r.new_zeros(0)
        return OPOBResult(sq_norms=empty, baselines=empty.clone(), coefficients=empty.clone())

    def _validate(self, loss: Any, rewards: Any, groups: Any) -> tuple[int, Tensor, Tensor | None]:
        group = self._dp_group()
        error: ValueError | None = None
        out: Any = None
        try:
            out = super()._validate(loss, rewards, groups)
        except ValueError as exc:
            if group is None:
                raise
            error = exc
        payload = None
        if self._sizes_ride_along(group):
            n = 0 if out is None else self._local_scope_count(out[0], out[2])
            payload = [float(n)]
        rows = self._agree(error, group, "invalid input", payload)
        if payload is not None:
            self._pending_sizes = [int(x[0]) for x in rows]
        return out

    def _reduce_sq_norms(self, parts: list[tuple[Tensor, Tensor]], sq: Tensor) -> Tensor:
        """Complete the per-sample norms over the TP group; agree on non-finite norms over DP.

        ``parts`` holds ``(param, n_i(param))`` for every parameter of the call.
        """
        if self._tp_group is not None and _dist.get_world_size(self._tp_group) > 1:
            sharded = torch.zeros_like(sq)
            replicated = torch.zeros_like(sq)
            for p, n in parts:
                if id(p) in self._sharded_ids:
                    sharded += n
                else:
                    replicated += n
            device = _dist.collective_device(self._tp_group, sharded.device)
            total = sharded.to(device)
            dist.all_reduce(total, group=self._tp_group)
            sq = total.to(sq.device) + replicated
        group = self._dp_group()
        if group is None or self._uses_stats(group):
            return sq  # OPOB's own check (statistics path: its flag column) covers non-finite norms
        finite = bool(torch.isfinite(sq).all())
        self._agree(
            None if finite else ValueError("per-sample gradient norms are not finite"),
            group,
            "non-finite per-sample gradient norms",
        )
        return sq

    # ------------------------------------------------------------------ gradients

    def _write_grad(self, p: Tensor, contrib: Tensor) -> None:
        if self._buffer is None:  # not inside backward(): plain write
            super()._write_grad(p, contrib)
            return
        real = self._tp_params.get(id(p), p)
        prev = self._buffer.get(id(real))
        c = contrib.detach()
        self._buffer[id(real)] = c.clone() if prev is None else prev + c

    def _flush(self, buffer: dict[int, Tensor] | None) -> None:
        if buffer is None:
            return
        group = self._dp_group()
        scale = (
            1.0 / _dist.get_world_size(group)
            if self.grad_reduction == "mean" and group is not None
            else None
        )
        plain: list[Tensor] = []
        fsdp: list[Tensor] = []
        for p in self._order:
            if _is_dtensor(p) and self._fsdp:
                fsdp.append(p)
            else:
                plain.append(p)
        if plain:
            self._reduce_plain(plain, buffer, group, scale)
        if fsdp:
            self._reduce_fsdp(fsdp, buffer, scale)

    def _local_shape(self, p: Tensor) -> torch.Size:
        return p.to_local().shape if _is_dtensor(p) and not self._fsdp else p.shape

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

    def _write_local(self, p: Tensor, g: Tensor) -> None:
        if _is_dtensor(p):
            from torch.distributed.tensor import DTensor

            g = DTensor.from_local(
                g.to(p.dtype).contiguous(),
                p.device_mesh,
                p.placements,
                run_check=False,
                shape=p.shape,
                stride=p.stride(),
            )
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
            return
        OPOB._write_grad(self, p, g)

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
                self._accumulate(p, full.redistribute(p.device_mesh, p.placements))
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
                local = seg.view(chunk, rest)[:local_rows].reshape(p.to_local().shape)
                if scale is not None:
                    local = local * scale
                g = DTensor.from_local(
                    local.to(device=device, dtype=p.dtype).contiguous(),
                    p.device_mesh,
                    p.placements,
                    run_check=False,
                    shape=p.shape,
                    stride=p.stride(),
                )
                self._accumulate(p, g)

    @staticmethod
    def _accumulate(p: Tensor, g: Tensor) -> None:
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g)

    # ------------------------------------------------------------------ tensor parallel

    def _swap_tp_params(self) -> list[tuple[nn.Module, str, Tensor]]:
        """Expose each TP ``DTensor`` parameter to the norm engine as its local shard.

        The activations of a tensor-parallel module are those of its local
        shard, so the rules and the engine work on the local tensor; the
        result is written back to the ``DTensor`` parameter.
        """
        from torch.distributed.tensor import Replicate

        swapped = []
        for mod in self.model.modules():
            for name, p in list(mod._parameters.items()):
                if p is None or not p.requires_grad or not _is_dtensor(p):
                    continue
                shard = p.to_local()
                local = self._stand_ins.get(id(p))
                if local is None or local.data_ptr() != shard.data_ptr():
                    # one stand-in per parameter, kept across calls (accumulators key on it)
                    local = nn.Parameter(shard, requires_grad=True)
                    self._stand_ins[id(p)] = local
                    self._tp_params[id(local)] = p
                    self._params[id(local)] = local
                    self._names[id(local)] = self._names.get(id(p), name)
                    if any(pl != Replicate() for pl in p.placements):
                        self._sharded_ids.add(id(local))
                mod._parameters[name] = local
                swapped.append((mod, name, p))
        return swapped

    @staticmethod
    def _restore_tp_params(swapped: list[tuple[nn.Module, str, Tensor]]) -> None:
        for mod, name, p in swapped:
            mod._parameters[name] = p
