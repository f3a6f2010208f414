"""``OPOB``: per-sample gradient norms in one batched backward, the off-policy
optimal baseline, and the reweighted gradient.

See :class:`OPOB` for the math and the contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.nn.utils.parametrize import ParametrizationList
from torch.optim.optimizer import register_optimizer_step_post_hook

from .. import distributed as _dist
from .baseline import (
    AGGS,
    N_STATS,
    merge_stats,
    scope_baselines,
    scope_inv_std,
    scope_stats,
    stats_baselines,
    stats_inv_std,
)
from .engine import ParamWork
from .rules import FALLBACK_UNITS, fallback_factors, get_rule
from .rules.base import Factor

__all__ = ["OPOB", "OPOBResult"]

_BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)


@dataclass
class OPOBResult:
    """What :meth:`OPOB.backward` computed for the samples of that call (all ``[B]``).

    ``sq_norms[i]`` = ``||grad_theta l_i||^2`` over the trainable parameters,
    ``baselines[i]`` = ``b_s`` of sample ``i``'s scope, ``coefficients[i]`` =
    ``c_i = (R_i - b_s) * k_s`` with ``k_s = 1`` or ``1 / std_s(R)``. Float32
    (float64 for a float64 model). With ``scope="batch"`` and several calls per
    optimizer step, each result reflects the baseline over the calls of the
    step so far; the last call's is the final one.
    """

    sq_norms: Tensor
    baselines: Tensor
    coefficients: Tensor


@dataclass
class _Use:
    """One recorded call of a hooked module (a forward hook fired)."""

    name: str
    module: nn.Module
    rule: bool
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    edges: list[Any]
    out_shapes: list[torch.Size]
    out_index: list[int]
    stop_nodes: list[Any]
    batch: int
    watched: list[tuple[Tensor, int]] = field(default_factory=list)
    recurse: bool = False  # a fallback unit: all parameters of the subtree


def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, Tensor) else x


def _edge(out: Tensor) -> tuple[Any, list[tuple[Tensor, int]]]:
    """Gradient edge of a module output that stays correct if the output is later modified in place.

    A full-size contiguous view (e.g. ``nn.Linear`` on a 3-D input returns a view of the
    2-D matmul result) is taken at its base: an in-place op on the view would otherwise
    detach the view's node from the graph. Other views are watched for in-place changes.
    """
    base = out._base if out._is_view() else None
    if (
        base is not None
        and base.requires_grad  # e.g. DTensor.to_local(): the base is outside the graph
        and base.numel() == out.numel()
        and base.is_contiguous()
        and out.is_contiguous()
    ):
        return get_gradient_edge(base), []
    watched = [(out, out._version)] if out._is_view() else []
    return get_gradient_edge(out), watched


def _to_1d(
    x: Any, batch: int, device: torch.device, what: str, dtype: torch.dtype | None
) -> Tensor:
    if isinstance(x, Tensor):
        if x.device != device and not (what == "groups" and x.device.type == "cpu"):
            raise ValueError(
                f"OPOB: {what} is on {x.device} but per_sample_loss is on {device} (device mismatch)"
            )
        t = x
    else:
        try:
            t = torch.as_tensor(x)
        except Exception as e:
            raise ValueError(f"OPOB: {what} must be a tensor or a sequence of numbers") from e
    if tuple(t.shape) != (batch,):
        raise ValueError(
            f"OPOB: {what} must have shape [B] = [{batch}] like per_sample_loss, got {tuple(t.shape)}"
        )
    t = t.to(device)
    return t if dtype is None else t.to(dtype)


def _gather_varlen(x: Tensor, group: Any | None) -> tuple[Tensor, int]:
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


def _agreed_error(
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


def _encode_ids(ids: Tensor) -> Tensor:
    """int64 ids as two exactly representable float64 columns (high and low 32 bits)."""
    return torch.stack([(ids >> 32).to(torch.float64), (ids & 0xFFFFFFFF).to(torch.float64)], 1)


def _decode_ids(cols: Tensor) -> Tensor:
    return (cols[:, 0].to(torch.int64) << 32) | cols[:, 1].to(torch.int64)


#: Columns of a per-group row exchanged with ``scope="group"``: the id (2 columns), then the stats.
_ROW = 2 + N_STATS


@dataclass
class _StatPlan:
    """Local scopes of a call on the sufficient-statistics path (``agg="mean"`` over a process group)."""

    sid: Tensor  # local scope index of each local sample
    n_local: int
    loc_ids: Tensor | None  # group ids of the local scopes (None: batch scope)
    sizes: list[int]  # number of local scopes of every rank
    inv: Tensor | None  # 1/std of the local scopes (group scope with norm_by_std)


class OPOB:
    r"""Off-policy optimal baseline with per-sample gradient norms from one batched backward.

    Attach to a model, run the forward pass in training mode, then call
    :meth:`backward` with the per-sample loss instead of ``loss.backward()``::

        opob = OPOB(model, scope="group")
        per_sample_loss = grpo_surrogate(model(ids), ...)      # [B], entry i depends on sample i only
        res = opob.backward(per_sample_loss, rewards, groups)  # writes .grad
        optimizer.step(); optimizer.zero_grad()

    For the per-sample loss ``l`` (shape ``[B]``) and trainable parameters
    ``theta`` it computes ``n_i = ||grad_theta l_i||^2``, per scope ``s``

        ``b_s = sum_{i in s} n_i R_i / sum_{i in s} n_i``   (``agg="mean"``; plain mean if all n_i = 0)

    and accumulates ``sum_i c_i grad_theta l_i`` into ``.grad`` (added to any
    gradient already there, like autograd), with ``c_i = (R_i - b_s(i)) * k_i``,
    ``k_i = 1`` or, with ``norm_by_std``, ``1 / std_s(R)`` (population std; a
    scope whose rewards are all equal gets ``c_i = 0``). The result equals a
    loop with one backward per sample to floating-point tolerance. Cost: one
    backward that skips autograd's weight-gradient matmuls, plus per-layer norm
    work (ghost Gram matrices or direct per-sample gradients, chosen per
    parameter by operation count), plus writing the weighted gradient.

    Args:
        model: any ``nn.Module``. Modules that own trainable parameters are
            hooked (registered rules: ``nn.Linear``, ``nn.Embedding``,
            ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``, ``nn.Conv1d``,
            ``nn.Conv2d``; add more with :func:`vcpo_optim.opob.register_rule`;
            ``nn.MultiheadAttention`` (``batch_first=True``) is covered as a
            unit by the exact vmap fallback, which is slower).
            Dimension 0 of every hooked module's input must be the sample.
        scope: ``"group"`` (default): one baseline per prompt group given by
            ``groups``; a group must be complete within one :meth:`backward`
            call (seen again later in the same optimizer step -> ``ValueError``).
            ``groups=None`` makes the whole call one group. ``"batch"``: one
            baseline over every sample of the optimizer step, across all
            :meth:`backward` calls (gradient accumulation) and ranks.
        agg: ``"mean"`` (default), ``"median"`` (lower weighted median) or
            ``"winsorized_mean"``; all weighted by ``n_i``.
        norm_by_std: default ``False``. Divide by the scope's reward std (GRPO).
        strict: default ``True``: a ``ValueError`` at construction lists the
            trainable parameters no rule covers. ``False``: those modules use an
            exact ``torch.func.vmap`` fallback (materialises per-sample
            gradients; for small modules).
        process_group: default ``None``: the world group if
            ``torch.distributed`` is initialised, else no communication. Every
            rank uses the global baseline: with ``agg="mean"`` the ranks
            exchange per-scope sufficient statistics (count, moments, min and
            max of ``R``, ``sum n``, ``sum n R``: a fixed-size row for
            ``scope="batch"``, one row per prompt group for ``"group"``),
            never per-sample values. ``"median"`` and ``"winsorized_mean"``
            need the per-sample values, so there the rewards, norms and group
            ids (three numbers per sample) are gathered over the group.
        winsor_q: default ``0.1``; the quantile for ``agg="winsorized_mean"``.

    Recording happens only for modules in training mode with grad enabled.
    Every recorded forward must be consumed by :meth:`backward` (or dropped
    with :meth:`clear`); after :meth:`backward` no activation is held.
    The optimizer step boundary (for ``scope="batch"`` accumulation and the
    split-group check) is detected with a global optimizer step hook for any
    ``torch.optim.Optimizer`` holding these parameters, or by the parameters'
    ``.grad`` having been set to ``None``; call :meth:`finalize` to end a step
    by hand (e.g. when a ``GradScaler`` skips ``optimizer.step()`` and you
    zero gradients in place). ``.grad`` is complete after every call, so
    gradient clipping, ``GradScaler.unscale_`` and DDP-free loops need nothing
    else.

    Refused with a ``ValueError``: BatchNorm in training mode (mixes samples),
    hooked modules whose input dim 0 is not ``B`` (broadcast inputs such as
    position ids of shape ``[1, T]``: expand them to ``[B, T]``), a tracked
    parameter used outside the forward of a module that owns it (for example
    ``F.linear(h, emb.weight)``: use an ``nn.Linear`` sharing the Parameter),
    ``nn.Embedding(scale_grad_by_freq=True)``, hooked modules with
    ``batch_first=False``, parametrized weights (``weight_norm``,
    ``torch.nn.utils.parametrize``), and trainable parameters that reach the loss but
    were not trainable parameters of ``model`` when OPOB was attached (they
    would get no gradient).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> OPOB:
        # Data / tensor parallelism (reductions of gradients and norms that DDP's and
        # FSDP2's hooks never see) live in vcpo_optim.opob.distributed; without a
        # process group it behaves exactly like this class.
        if cls is OPOB:
            from .distributed import DistributedOPOB

            cls = DistributedOPOB
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        *,
        scope: str = "group",
        agg: str = "mean",
        norm_by_std: bool = False,
        strict: bool = True,
        process_group: Any = None,
        winsor_q: float = 0.1,
    ) -> None:
        if scope not in ("group", "batch"):
            raise ValueError(f"OPOB: scope must be 'group' or 'batch', got {scope!r}")
        if agg not in AGGS:
            raise ValueError(f"OPOB: agg must be one of {AGGS}, got {agg!r}")
        if not 0.0 <= winsor_q < 0.5:
            raise ValueError(f"OPOB: winsor_q must be in [0, 0.5), got {winsor_q}")
        self.model = model
        self.scope = scope
        self.agg = agg
        self.norm_by_std = bool(norm_by_std)
        self.strict = bool(strict)
        self.winsor_q = float(winsor_q)
        self._group_arg = process_group
        self._pending_sizes: list[int] | None = None

        bn = [n for n, m in model.named_modules() if isinstance(m, _BATCHNORM_TYPES) and m.training]
        if bn:
            raise ValueError(
                f"OPOB: BatchNorm modules in training mode mix samples (batch statistics), so per-sample "
                f"gradients are undefined: {bn}. Replace them with GroupNorm/LayerNorm, or put them in "
                "eval mode with frozen parameters."
            )

        self._names: dict[int, str] = {}
        self._params: dict[int, Tensor] = {}
        for n, p in model.named_parameters():
            if p.requires_grad:
                self._names[id(p)] = n
                self._params[id(p)] = p
        self._owned: dict[int, set[int]] = {}
        rule_mods: list[tuple[str, nn.Module]] = []
        fb_mods: list[tuple[str, nn.Module]] = []
        unit_mods: list[tuple[str, nn.Module]] = []
        inside_unit: set[int] = set()
        uncovered: list[str] = []
        for mname, mod in model.named_modules():
            if id(mod) in inside_unit:
                continue
            if type(mod) in FALLBACK_UNITS:  # the whole subtree by the exact vmap fallback
                inside_unit.update(id(m) for m in mod.modules())
                sub = [p for p in mod.parameters() if p.requires_grad]
                if sub:
                    self._owned[id(mod)] = {id(p) for p in sub}
                    unit_mods.append((mname, mod))
                continue
            own = [(n, p) for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            self._owned[id(mod)] = {id(p) for _, p in own}
            if get_rule(mod) is not None:
                rule_mods.append((mname, mod))
            else:
                uncovered += [f"{mname}.{n}" if mname else n for n, _ in own]
                fb_mods.append((mname, mod))
        if uncovered and self.strict:
            raise ValueError(
                "OPOB: no per-sample gradient rule covers these trainable parameters: "
                f"{uncovered}. Register a rule (vcpo_optim.opob.register_rule), freeze them, or pass "
                "strict=False to use the exact (slower) torch.func fallback for their modules."
            )

        computed = [
            mname or type(mod).__name__
            for mname, mod in rule_mods + fb_mods
            if isinstance(mod, ParametrizationList)
            or any(
                isinstance(getattr(mod, a, None), Tensor)
                and not isinstance(getattr(mod, a), nn.Parameter)
                for a in ("weight", "bias")
            )
        ]
        if computed:
            raise ValueError(
                f"OPOB: modules {computed} compute their weight from other parameters "
                "(torch.nn.utils.parametrize, weight_norm, spectral_norm): per-sample gradients of "
                "the underlying parameters are not supported (the parametrization runs outside the "
                "sample dimension). Remove the parametrization or freeze its parameters."
            )
        seq_first = [
            mname or type(mod).__name__
            for mname, mod in rule_mods + fb_mods + unit_mods
            if getattr(mod, "batch_first", None) is False
        ]
        if seq_first:
            raise ValueError(
                f"OPOB: modules {seq_first} have batch_first=False: dimension 0 of their input is the "
                "sequence, not the sample, so their per-sample gradients cannot be recovered (and "
                "would be silently wrong when the sequence length equals B). Construct them with "
                "batch_first=True."
            )

        self._tape: list[_Use] = []
        self._paused = False
        self._handles: list[Any] = []
        for mname, mod in rule_mods:
            self._handles.append(
                mod.register_forward_hook(self._make_hook(mname, True), with_kwargs=True)
            )
        for mname, mod in fb_mods:
            self._handles.append(
                mod.register_forward_hook(self._make_hook(mname, False), with_kwargs=True)
            )
        for mname, mod in unit_mods:
            self._handles.append(
                mod.register_forward_hook(
                    self._make_hook(mname, False, recurse=True), with_kwargs=True
                )
            )
        for mname, mod in model.named_modules():
            if isinstance(mod, _BATCHNORM_TYPES):
                self._handles.append(mod.register_forward_pre_hook(self._make_bn_check(mname)))
        self._handles.append(register_optimizer_step_post_hook(self._on_optimizer_step))
        self._attached = True
        self._reset_step()

    # ------------------------------------------------------------------ recording

    def _recording(self, module: nn.Module) -> bool:
        return self._attached and not self._paused and module.training and torch.is_grad_enabled()

    def _make_bn_check(self, name: str) -> Any:
        def check(module: nn.Module, args: Any) -> None:
            if self._recording(module):
                raise ValueError(
                    f"OPOB: BatchNorm module '{name}' is in training mode; it mixes samples through batch "
                    "statistics, so per-sample gradients are undefined. Use GroupNorm/LayerNorm or "
                    "module.eval() with frozen parameters."
                )

        return check

    def _make_hook(self, name: str, is_rule: bool, recurse: bool = False) -> Any:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> None:
            if not self._recording(module):
                return
            outs = (
                [output]
                if isinstance(output, Tensor)
                else list(output)
                if isinstance(output, tuple | list)
                else []
            )
            edges, shapes, index, watched = [], [], [], []
            for j, o in enumerate(outs):
                if isinstance(o, Tensor) and o.requires_grad:
                    e, w = _edge(o)
                    edges.append(e)
                    shapes.append(o.shape)
                    index.append(j)
                    watched += w
            if not edges:
                return
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
            stops = [get_gradient_edge(t).node for t in tensors if t.requires_grad]
            if is_rule:
                if not tensors:
                    raise ValueError(f"OPOB: module '{name}' was called without a tensor input")
                saved_args: tuple[Any, ...] = (tensors[0].detach(),)
                saved_kwargs: dict[str, Any] = {}
                batch = tensors[0].shape[0] if tensors[0].dim() > 0 else -1
            else:
                saved_args = tuple(_detach(a) for a in args)
                saved_kwargs = {k: _detach(v) for k, v in kwargs.items()}
                first = outs[index[0]]
                batch = first.shape[0] if first.dim() > 0 else -1
            self._tape.append(
                _Use(
                    name,
                    module,
                    is_rule,
                    saved_args,
                    saved_kwargs,
                    edges,
                    shapes,
                    index,
                    stops,
                    batch,
                    watched,
                    recurse,
                )
            )

        return hook

    # ------------------------------------------------------------------ lifecycle

    def detach(self) -> None:
        """Remove every hook and drop all recorded and per-step state (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._tape.clear()
        self._reset_step()
        self._attached = False

    def __enter__(self) -> OPOB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def clear(self) -> None:
        """Drop activations recorded since the last :meth:`backward` (a forward you will not backprop)."""
        self._tape.clear()

    def _check_no_split_groups(self, new_ids: Tensor) -> None:
        """Raise if a group id of this call already appeared earlier in the optimizer step."""
        if self._seen_groups is None:
            return
        dup = new_ids[torch.isin(new_ids, self._seen_groups)]
        if dup.numel():
            raise ValueError(
                f"OPOB: scope='group' needs each group complete within one backward call, but "
                f"group ids {dup.tolist()[:10]} already appeared in an earlier call of this "
                "optimizer step (split group). Put whole groups in each micro-batch, use "
                "scope='batch', or call opob.finalize() if a new step started."
            )

    def finalize(self) -> None:
        """End the current optimizer step.

        ``.grad`` is already complete after every :meth:`backward`; this only
        resets the per-step state (the ``scope="batch"`` accumulators and the
        groups seen by the split-group check). Called automatically after
        ``optimizer.step()`` of any ``torch.optim.Optimizer`` holding these
        parameters, and when those parameters' ``.grad`` were set to ``None``.
        """
        self._reset_step()

    def _reset_step(self) -> None:
        self._seen_groups: Tensor | None = None
        self._hist_n: Tensor | None = None
        self._hist_r: Tensor | None = None
        self._r_off: Tensor | None = None  # reward offset of the step (scope="batch")
        self._hist_stats: Tensor | None = None
        self._prev_b: float | Tensor = 0.0
        self._prev_k: float | Tensor = 0.0
        self._sums: dict[int, tuple[Tensor, Tensor]] = {}
        self._written: list[Tensor] = []

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._attached:
            return
        for g in optimizer.param_groups:
            for p in g["params"]:
                if id(p) in self._params:
                    self._reset_step()
                    return

    @property
    def num_recorded(self) -> int:
        """Number of module calls recorded since the last :meth:`backward` (0 after it)."""
        return len(self._tape)

    # ------------------------------------------------------------------ backward

    def backward(self, per_sample_loss: Tensor, rewards: Any, groups: Any = None) -> OPOBResult:
        """One batched backward: per-sample norms, baselines, and ``sum_i c_i grad l_i`` into ``.grad``.

        Args:
            per_sample_loss: ``[B]`` floating tensor with a graph; entry ``i``
                depends only on sample ``i``. Its gradient is never formed
                with unit weights: only ``sum_i c_i grad l_i`` is written.
            rewards: ``[B]`` rewards ``R_i`` (tensor on the loss's device, or
                a sequence of numbers).
            groups: ``[B]`` integer prompt-group ids for ``scope="group"``
                (ignored for ``"batch"``); default ``None``: the whole call
                is one group.

        Returns:
            :class:`OPOBResult` with ``sq_norms``, ``baselines``,
            ``coefficients`` (each ``[B]``, float32 or float64).

        Raises:
            ValueError: non-finite losses or rewards, ``B = 0``, shape or
                device mismatch, bad ``groups``, a group already seen in this
                optimizer step, a recorded module input whose dim 0 is not
                ``B``, parameters used outside their module, or non-finite
                per-sample norms. Raised before any ``.grad`` or OPOB state
                changes; the recorded activations are dropped.
        """
        try:
            return self._backward(per_sample_loss, rewards, groups)
        finally:
            self._tape.clear()
            self._pending_sizes = None

    def _validate(self, loss: Any, rewards: Any, groups: Any) -> tuple[int, Tensor, Tensor | None]:
        if not self._attached:
            raise ValueError("OPOB: this OPOB was detached")
        if not isinstance(loss, Tensor):
            raise ValueError("OPOB: per_sample_loss must be a torch.Tensor")
        if loss.dim() != 1:
            raise ValueError(f"OPOB: per_sample_loss must have shape [B], got {tuple(loss.shape)}")
        b = loss.shape[0]
        if b == 0:
            raise ValueError("OPOB: empty batch (B = 0)")
        if not loss.is_floating_point():
            raise ValueError("OPOB: per_sample_loss must be floating point")
        if not loss.requires_grad:
            raise ValueError(
                "OPOB: per_sample_loss does not require grad (no graph to backpropagate)"
            )
        if not bool(torch.isfinite(loss.detach()).all()):
            raise ValueError("OPOB: per_sample_loss contains NaN or Inf")
        r = _to_1d(rewards, b, loss.device, "rewards", None)
        if r.is_complex():
            raise ValueError(f"OPOB: rewards must be real numbers, got dtype {r.dtype}")
        if not r.is_floating_point():
            r = r.to(torch.float32)
        if not bool(torch.isfinite(r).all()):
            raise ValueError("OPOB: rewards contain NaN or Inf")
        g: Tensor | None = None
        if groups is not None and self.scope == "group":
            g = _to_1d(groups, b, loss.device, "groups", None)
            if g.is_floating_point() or g.is_complex() or g.dtype == torch.bool:
                raise ValueError(f"OPOB: groups must be integer ids, got dtype {g.dtype}")
            g = g.to(torch.int64)
        if not self._tape:
            raise ValueError(
                "OPOB: no forward pass was recorded since the last backward (is the model in training "
                "mode with grad enabled, and was the forward run after attaching OPOB?)"
            )
        for u in self._tape:
            if u.batch != b:
                raise ValueError(
                    f"OPOB: module '{u.name}' ({type(u.module).__name__}) was called with an input/output "
                    f"whose dimension 0 is {u.batch}, but per_sample_loss has B={b}. Dimension 0 of every "
                    "hooked module's input must be the sample: an input broadcast over the batch (e.g. "
                    "position ids of shape [1, T]) makes per-sample gradients unrecoverable; expand it to "
                    "[B, ...] (e.g. pos_ids.expand(B, -1)). If this forward belongs to another batch, "
                    "call opob.clear() before the forward you backpropagate."
                )
            for t, v in u.watched:
                if t._version != v:
                    raise ValueError(
                        f"OPOB: the output of module '{u.name}' (a view) was modified in place after the "
                        "forward; use an out-of-place op after this module."
                    )
        return b, r, g

    def _audit(self, loss: Tensor) -> None:
        """Every tracked parameter reached by the graph must be reached through a recorded use of a module owning it."""
        allowed: dict[int, set[int]] = {}
        keep: list[Any] = []
        for u in self._tape:
            owned = self._owned.get(id(u.module), set())
            stops = {id(s) for s in u.stop_nodes if s is not None}
            stack = [e.node for e in u.edges if e.node is not None]
            seen: set[int] = set()
            while stack:
                node = stack.pop()
                if id(node) in seen or id(node) in stops:
                    continue
                seen.add(id(node))
                keep.append(node)
                allowed.setdefault(id(node), set()).update(owned)
                for nxt, _ in node.next_functions:
                    if nxt is not None and not hasattr(nxt, "variable"):
                        stack.append(nxt)
        root = loss.grad_fn
        stack = [root] if root is not None else []
        seen = set()
        bad: set[str] = set()
        untracked: dict[int, tuple[int, ...]] = {}
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            keep.append(node)
            for nxt, _ in node.next_functions:
                if nxt is None:
                    continue
                var = getattr(nxt, "variable", None)
                if var is not None:
                    if id(var) in self._params and id(var) not in allowed.get(id(node), ()):
                        bad.add(self._names[id(var)])
                    elif id(var) not in self._params and isinstance(var, nn.Parameter):
                        untracked[id(var)] = tuple(var.shape)
                else:
                    stack.append(nxt)
        # FSDP2 / tensor parallelism run the forward on unsharded copies of DTensor parameters.
        if any(type(p).__name__ == "DTensor" for p in self._params.values()):
            untracked = {}
        if untracked:
            raise ValueError(
                f"OPOB: {len(untracked)} trainable parameter(s) (shapes {list(untracked.values())[:5]}) reach the loss "
                "but were not trainable parameters of the model when OPOB was attached (a parameter "
                "outside the model, a module replaced or unfrozen after attaching): they would get no "
                "gradient. Attach OPOB after the model is final, and include every trainable "
                "parameter of the loss in the model."
            )
        if bad:
            ids = {id(p) for p in self._params.values() if self._names[id(p)] in bad}
            idle = [
                n or type(m).__name__
                for n, m in self.model.named_modules()
                if not m.training and any(id(p) in ids for p in m.parameters(recurse=False))
            ]
            hint = (
                f" Modules in eval mode are not recorded: {idle}; keep them in training mode "
                "(model.train()) while OPOB is attached, or freeze their parameters."
                if idle
                else ""
            )
            raise ValueError(
                f"OPOB: trainable parameters {sorted(bad)} reach the loss outside the forward of a hooked "
                "module that owns them (e.g. F.linear(h, emb.weight) for a tied head, or a module that "
                "reads a child's weight directly such as nn.MultiheadAttention). Their per-sample "
                "gradients would be missed: route the use through a module (e.g. an nn.Linear whose "
                "weight is the same Parameter), register a rule, or freeze them." + hint
            )

    def _scopes(
        self, b: int, r: Tensor, groups: Tensor | None, group: Any | None
    ) -> tuple[Tensor, Tensor, int, Tensor, int, Tensor | None]:
        """Global rewards, scope index of every global sample, #scopes, this call's global group ids, offset."""
        r_all, offset = _gather_varlen(r, group)
        if self.scope == "batch":
            prev = self._hist_r
            r_step = r_all if prev is None else torch.cat([prev.to(r_all.dtype), r_all])
            sid = torch.zeros(r_step.numel(), dtype=torch.long, device=r.device)
            return r_step, sid, 1, r_all, offset + (0 if prev is None else prev.numel()), None
        if groups is None:
            ids_all, _ = _gather_varlen(torch.zeros(b, dtype=torch.int64, device=r.device), group)
            new_ids = None
        else:
            ids_all, _ = _gather_varlen(groups, group)  # gathered as int64: exact
            new_ids = torch.unique(ids_all)
            self._check_no_split_groups(new_ids)
        uniq, sid = torch.unique(ids_all, return_inverse=True)
        return r_all, sid, uniq.numel(), r_all, offset, new_ids

    # ------------------------------------------------ sufficient statistics (agg="mean", DP)

    def _uses_stats(self, group: Any | None) -> bool:
        """Whether this call reduces per-scope sums instead of gathering per-sample values."""
        return group is not None and self.agg == "mean"

    def _local_scope_count(self, b: int, groups: Tensor | None) -> int:
        if groups is None:
            return 1 if b else 0
        return int(torch.unique(groups).numel())

    def _take_sizes(self, n_local: int, group: Any) -> list[int]:
        """Number of local scopes on every rank (folded into the validation collective if it ran)."""
        sizes, self._pending_sizes = self._pending_sizes, None
        if sizes is None:
            row = torch.tensor([float(n_local)], dtype=torch.float64)
            sizes = [int(v) for v in _dist.all_gather_rows(row, group)[:, 0].tolist()]
        return sizes

    def _exchange_rows(
        self, ids: Tensor, stats: Tensor, sizes: list[int], group: Any, flag: bool, what: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One padded all-gather of per-group rows plus an error flag; merge by id.

        Returns the sorted global ids, their merged stats (CPU float64, identical on
        every rank) and the global index of each local scope. A flag on any rank makes
        every rank raise the same ``ValueError`` (``what``).
        """
        m = max(sizes)
        buf = torch.zeros(1 + m * _ROW, dtype=torch.float64)
        buf[0] = float(flag)
        if ids.numel():
            local = torch.cat([_encode_ids(ids.cpu()), stats.cpu()], 1)
            buf[1 : 1 + local.numel()] = local.reshape(-1)
        got = _dist.all_gather_rows(buf.to(stats.device), group).cpu()
        err = _agreed_error(got[:, 0].tolist(), None, _dist.get_rank(group), what)
        if err is not None:
            raise err
        rows = torch.cat([got[r, 1:].view(m, _ROW)[:n] for r, n in enumerate(sizes)])
        uniq, idx = torch.unique(_decode_ids(rows[:, :2]), return_inverse=True)
        merged = merge_stats(rows[:, 2:], idx, uniq.numel())
        loc2glob = torch.searchsorted(uniq, ids.cpu())
        return uniq, merged, loc2glob

    def _stats_scopes(self, b: int, r: Tensor, groups: Tensor | None, group: Any) -> _StatPlan:
        """Before the norms: local scopes; with ``norm_by_std`` and ``scope="group"`` the global 1/std."""
        dev = r.device
        if self.scope == "batch":
            return _StatPlan(torch.zeros(b, dtype=torch.long, device=dev), 1, None, [], None)
        if groups is None:
            loc_ids = torch.zeros(1 if b else 0, dtype=torch.int64, device=dev)
            sid = torch.zeros(b, dtype=torch.long, device=dev)
        else:
            loc_ids, sid = torch.unique(groups, return_inverse=True)
        sizes = self._take_sizes(loc_ids.numel(), group)
        if sum(sizes) == 0:
            raise ValueError("OPOB: empty batch: no rank has a sample in this backward call")
        n_local = int(loc_ids.numel())
        inv = None
        if self.norm_by_std:
            st = scope_stats(None, r, sid, n_local)
            _, merged, loc2glob = self._exchange_rows(loc_ids, st, sizes, group, False, "error")
            inv = stats_inv_std(merged)[loc2glob].to(device=dev, dtype=r.dtype)
        return _StatPlan(sid, n_local, loc_ids, sizes, inv)

    def _stats_finish(
        self, sq: Tensor, r: Tensor, plan: _StatPlan, groups: Tensor | None, group: Any
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """After the norms: one collective of per-scope sums (with the non-finite-norm flag).

        Returns the baselines and scales of the local scopes (``[n_local]``; ``[1]`` for
        the batch scope), the global ids of the call (split-group check) and, for the
        batch scope, the step's merged stats. Raises the same error on every rank.
        """
        dev, dt = r.device, r.dtype
        bad = not bool(torch.isfinite(sq).all())
        what = "non-finite per-sample gradient norms"
        st = scope_stats(sq, r, plan.sid, plan.n_local)
        if self.scope == "batch":
            buf = torch.cat([torch.tensor([float(bad)], dtype=torch.float64), st[0].cpu()])
            got = _dist.all_gather_rows(buf.to(dev), group).cpu()
            err = _agreed_error(got[:, 0].tolist(), None, _dist.get_rank(group), what)
            if err is not None:
                raise err
            call = merge_stats(got[:, 1:], torch.zeros(got.shape[0], dtype=torch.long), 1)
            if call[0, 0] == 0:
                raise ValueError("OPOB: empty batch: no rank has a sample in this backward call")
            hist = self._hist_stats
            step = (
                call
                if hist is None
                else merge_stats(torch.cat([hist, call]), torch.zeros(2, dtype=torch.long), 1)
            )
            bs = stats_baselines(step)
            ks = stats_inv_std(step) if self.norm_by_std else torch.ones_like(bs)
            return bs.to(device=dev, dtype=dt), ks.to(device=dev, dtype=dt), None, step
        assert plan.loc_ids is not None
        uniq, merged, loc2glob = self._exchange_rows(plan.loc_ids, st, plan.sizes, group, bad, what)
        new_ids = None
        if groups is not None:
            new_ids = uniq.to(dev)
            self._check_no_split_groups(new_ids)
        bs = stats_baselines(merged)[loc2glob].to(device=dev, dtype=dt)
        ks = plan.inv if plan.inv is not None else torch.ones_like(bs)
        return bs, ks, new_ids, None

    def _backward(self, loss: Tensor, rewards: Any, groups: Any) -> OPOBResult:
        b, r, g_ids = self._validate(loss, rewards, groups)
        if any(p.grad is None for p in self._written):
            self._reset_step()  # gradients were dropped (zero_grad(set_to_none=True)): a new step
        group = _dist.resolve_group(self._group_arg, default_world=True)
        dev = loss.device
        dt = (
            torch.float64
            if any(p.dtype == torch.float64 for p in self._params.values())
            else torch.float32
        )
        r_off = None
        if group is None and dt != torch.float64:
            # Baselines are shift-equivariant and the std shift-invariant: center the rewards (in
            # float64, per scope; one offset per optimizer step for scope="batch") so that a large
            # common offset does not cancel catastrophically in float32 (baselines, gradient sums).
            r64 = r.to(torch.float64)
            if self.scope == "batch":
                if self._r_off is None:
                    self._r_off = r64.mean()
                r_off = self._r_off.expand(b)
            elif g_ids is None:
                r_off = r64.mean().expand(b)
            else:
                _, idx, cnt = torch.unique(g_ids, return_inverse=True, return_counts=True)
                sums = torch.zeros(cnt.numel(), dtype=torch.float64, device=r.device)
                r_off = (sums.index_add_(0, idx, r64) / cnt)[idx]
            r = r64 - r_off
        r = r.to(dt)
        plan = None
        if self._uses_stats(group):  # per-scope sums over the group, no per-sample gather
            plan = self._stats_scopes(b, r, g_ids, group)
            sid, n_scopes, inv, new_ids = plan.sid, plan.n_local, plan.inv, None
        else:
            r_scope, sid_all, n_scopes, _, off, new_ids = self._scopes(b, r, g_ids, group)
            sid = sid_all[off : off + b]
            inv = scope_inv_std(r_scope, sid_all, n_scopes) if self.norm_by_std else None
        self._audit(loss)

        params = list(self._params.values())
        before = [None if p.grad is None else (id(p.grad), p.grad._version) for p in params]
        self._paused = True
        try:
            edges = [e for u in self._tape for e in u.edges]
            grads = torch.autograd.grad(loss.sum(), edges, allow_unused=True)
        except RuntimeError as e:
            if "heckpoint" in str(e):
                raise ValueError(
                    "OPOB: reentrant activation checkpointing cannot be combined with OPOB's single "
                    "backward pass; use torch.utils.checkpoint.checkpoint(..., use_reentrant=False)."
                ) from e
            raise
        finally:
            self._paused = False
        touched = [
            self._names[id(p)]
            for p, v in zip(params, before)
            if (None if p.grad is None else (id(p.grad), p.grad._version)) != v
        ]
        if touched:
            raise ValueError(
                f"OPOB: parameters {touched[:10]} received plain gradients during OPOB's backward pass "
                "(reentrant activation checkpointing or a custom autograd Function that calls "
                "backward itself): their per-sample gradients are invisible to OPOB. Use "
                "torch.utils.checkpoint.checkpoint(..., use_reentrant=False)."
            )

        with torch.no_grad(), torch.autocast(dev.type, enabled=False):
            works: dict[int, ParamWork] = {}
            pos = 0
            for u in self._tape:
                gs = list(grads[pos : pos + len(u.edges)])
                pos += len(u.edges)
                gs = [None if gr is None else gr.reshape(s) for gr, s in zip(gs, u.out_shapes)]
                if all(gr is None for gr in gs):
                    continue
                facs: dict[str, Factor] | None
                if u.rule:
                    (go,) = gs
                    assert go is not None
                    rule = get_rule(u.module)
                    assert rule is not None
                    facs = rule(u.module, u.args, go)
                else:
                    self._paused = True
                    try:
                        facs = fallback_factors(
                            u.module, u.args, u.kwargs, gs, u.out_index, b, recurse=u.recurse
                        )
                    except RuntimeError as e:
                        raise ValueError(
                            f"OPOB: the exact torch.func (vmap) fallback failed for module '{u.name}' "
                            f"({type(u.module).__name__}): {e}. Register a per-sample rule for this "
                            "module type (vcpo_optim.opob.register_rule) or freeze its parameters; "
                            "nothing was changed."
                        ) from e
                    finally:
                        self._paused = False
                for pname, fac in facs.items():
                    p = u.module.get_parameter(pname)
                    w = works.get(id(p))
                    if w is None:
                        w = works[id(p)] = ParamWork(p, self._names.get(id(p), pname))
                    w.factors.append(fac)
            grads = gs = facs = go = u = None  # type: ignore[assignment]
            self._tape.clear()  # the factors hold what is still needed; free the rest now

            batch_scope = self.scope == "batch"
            if batch_scope:
                q_acc = torch.ones(b, dtype=dt, device=dev)
                r_acc = r
                sid_acc = torch.zeros(b, dtype=torch.long, device=dev)
                ns_acc = 1
            else:
                k = inv[sid] if inv is not None else torch.ones(b, dtype=dt, device=dev)
                q_acc, r_acc, sid_acc, ns_acc = k, k * r, sid, n_scopes
            sq = torch.zeros(b, dtype=dt, device=dev)
            parts: list[tuple[Tensor, Tensor]] = []
            for w in works.values():
                w.choose(b, ns_acc, 2 if batch_scope else 1)
                parts.append((w.param, w.sq_norms(b, r_acc, q_acc, sid_acc, ns_acc).to(dt)))
                sq += parts[-1][1]
            # Tensor parallelism completes n_i here (vcpo_optim.opob.distributed).
            sq = self._reduce_sq_norms(parts, sq)
            step_stats = None
            if plan is not None:
                bs, ks, new_ids, step_stats = self._stats_finish(sq, r, plan, g_ids, group)
            else:
                if not bool(torch.isfinite(sq).all()):
                    raise ValueError(
                        "OPOB: per-sample gradient norms are not finite (overflow in the backward pass?)"
                    )
                n_all, _ = _gather_varlen(sq, group)
                if batch_scope:
                    n_scope = n_all if self._hist_n is None else torch.cat([self._hist_n, n_all])
                else:
                    n_scope = n_all
                bs = scope_baselines(n_scope, r_scope, sid_all, n_scopes, self.agg, self.winsor_q)
                ks = inv if inv is not None else torch.ones(n_scopes, dtype=dt, device=dev)
            base = bs[sid]
            coef = (r - base) * ks[sid]
            if r_off is not None:
                base = (base.to(torch.float64) + r_off).to(dt)

            # ---- write the reweighted gradient (only place .grad is touched) ----
            if batch_scope:
                bb, kk = bs[0], ks[0]
                pb, pk = self._prev_b, self._prev_k
                for w in works.values():
                    if w.strategy == "acc":
                        assert w.acc_r is not None and w.acc_s is not None
                        d1, d0 = w.acc_r, w.acc_s[0]
                    else:
                        d1, d0 = w.weighted_sum(r), w.weighted_sum(q_acc)
                    s1, s0 = self._sums.get(id(w.param), (None, None))
                    delta = kk * (d1 - bb * d0)
                    if s1 is not None and s0 is not None:
                        delta += (kk - pk) * s1 - (kk * bb - pk * pb) * s0
                        s1 += d1
                        s0 += d0
                    else:
                        self._sums[id(w.param)] = (d1.clone(), d0.clone())
                    self._write_grad(w.param, delta)
                    w.release()
                for pid, (s1, s0) in self._sums.items():
                    if pid not in works:  # used in an earlier call only: its baseline moved
                        self._write_grad(
                            self._params[pid], (kk - pk) * s1 - (kk * bb - pk * pb) * s0
                        )
                self._prev_b, self._prev_k = bb, kk
                if plan is not None:
                    self._hist_stats = step_stats
                else:
                    self._hist_n, self._hist_r = n_scope, r_scope
            else:
                for w in works.values():
                    if w.strategy == "acc":
                        assert w.acc_r is not None and w.acc_s is not None
                        contrib = w.acc_r - torch.tensordot(bs.to(w.acc_s.dtype), w.acc_s, dims=1)
                    else:
                        contrib = w.weighted_sum(coef)
                    self._write_grad(w.param, contrib)
                    w.release()
                if new_ids is not None:
                    seen = self._seen_groups
                    self._seen_groups = new_ids if seen is None else torch.cat([seen, new_ids])
            self._written = [w.param for w in works.values()] + [
                self._params[i] for i in self._sums if i not in works
            ]
        return OPOBResult(sq_norms=sq, baselines=base, coefficients=coef)

    def _reduce_sq_norms(self, parts: list[tuple[Tensor, Tensor]], sq: Tensor) -> Tensor:
        """Per-sample squared norms of the call from ``(param, n_i(param))`` parts (their sum ``sq``).

        Identity here; :class:`~vcpo_optim.opob.distributed.DistributedOPOB`
        sums tensor-parallel shards' parts over the TP group.
        """
        return sq

    def _write_grad(self, p: Tensor, contrib: Tensor) -> None:
        """Accumulate ``contrib`` (= this call's share of ``sum_i c_i grad l_i``) into ``p.grad``.

        The single place where OPOB writes gradients. Data parallelism hooks in
        here: DDP would all-reduce (average) ``contrib`` over the data-parallel
        group, FSDP2 would reduce-scatter it to the local shard, since these
        writes bypass autograd's ``AccumulateGrad`` and therefore the wrappers'
        own gradient hooks.
        """
        contrib = contrib.to(p.dtype).reshape(p.shape)
        if p.grad is None:
            p.grad = contrib if contrib.is_contiguous() else contrib.contiguous()
        else:
            p.grad.add_(contrib)
