r"""ESS-guided step scaling as ``torch.optim.Optimizer`` subclasses.

Each optimizer step takes the importance weights of its batch (all
micro-batches, all data-parallel ranks), computes
:math:`\rho = \mathrm{ESS}/B` (see :mod:`vcpo_optim.ess`) and runs the wrapped
optimizer's own update with, for that step only,

.. math::

    \mathrm{lr}_\mathrm{eff} = \mathrm{lr} \cdot
    \max\!\Big(\texttt{min\_lr\_scale},\;
    \min\big(1, \rho / \texttt{base\_ess\_ratio}\big)^{p}\Big),

with :math:`p = 1/2` for Adam-family optimizers (the sqrt rule) and
:math:`p = 1` for SGD (the linear rule). ``group["lr"]`` is what the user and
the LR scheduler see before and after ``step()``, always; with all weights
equal (:math:`\rho = 1` exactly) the update is bit-for-bit the base class's.

The classes subclass the torch optimizers rather than wrapping instances, so
LR schedulers, ``GradScaler``, ``torch.distributed.checkpoint``, ``deepcopy``
and every ``isinstance(opt, torch.optim.Optimizer)`` check keep working. The
configuration (``base_ess_ratio``, ``min_lr_scale``, ``scale_weight_decay``,
``ess_power``) lives in ``defaults`` and the param groups, so it round-trips
through ``state_dict()``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from vcpo_optim import ess as _ess
from vcpo_optim.distributed import (
    GroupArg,
    all_gather_rows,
    collective_device,
    get_rank,
    resolve_group,
)

__all__ = ["VCPOSGD", "ESSStepStats", "VCPOAdam", "VCPOAdamW", "ess_scaled"]

_RULES: dict[str, float] = {"sqrt": 0.5, "linear": 1.0}
_CONFIG_KEYS = ("base_ess_ratio", "min_lr_scale", "scale_weight_decay", "ess_power")


def _optim_classes(*names: str) -> list[type[Optimizer]]:
    """The named ``torch.optim`` classes this torch version has (Muon and Adafactor are recent)."""
    return [
        getattr(torch.optim, n) for n in names if isinstance(getattr(torch.optim, n, None), type)
    ]


# torch.optim classes whose update is verified to be proportional to lr (tests/test_optim.py
# checks each: from the same state, a step at lr * s moves the parameters exactly s times as
# far as a step at lr and leaves the same optimizer state), with the kind of their weight decay:
#   "coupled":   an L2 term wd * p added to the gradient (it enters the optimizer state);
#   "decoupled": p *= 1 - lr * wd, outside the gradient;
#   "flag":      decoupled iff the group's "decoupled_weight_decay" is True;
#   "none":      no weight decay.
_LR_LINEAR: dict[type[Optimizer], str] = {
    torch.optim.SGD: "coupled",
    torch.optim.Adam: "flag",
    torch.optim.AdamW: "decoupled",
    torch.optim.RAdam: "flag",
    torch.optim.NAdam: "flag",
    torch.optim.Adamax: "coupled",
    torch.optim.Adagrad: "coupled",
    torch.optim.Adadelta: "coupled",
    torch.optim.RMSprop: "coupled",
    torch.optim.SparseAdam: "none",
    **{cls: "decoupled" for cls in _optim_classes("Muon")},
}

# torch.optim classes whose update does not scale with lr: ess_scaled() refuses them.
_NOT_LR_LINEAR: dict[str, str] = {
    "LBFGS": "LBFGS re-evaluates its closure many times inside one step; a per-step lr scale "
    "from importance weights is not defined for it",
    "Rprop": "Rprop reads lr only to initialise its per-parameter step sizes on the first step; "
    "later steps ignore lr, so a scaled lr would be reported but not applied (and a low-ESS "
    "first step would shrink every later step)",
    "ASGD": "ASGD computes its step size eta from lr at the end of a step and uses it on the "
    "next one, so a scale would act on the wrong step and stay in the optimizer state",
    "Adafactor": "Adafactor's relative step size is min(lr, 1/sqrt(step)), which does not scale "
    "with lr once lr > 1/sqrt(step)",
}


@dataclass
class ESSStepStats:
    """Statistics of the last optimizer step (``optimizer.last_stats``).

    All numbers are tensors, so logging them costs no device sync until the
    caller asks for a Python number (:meth:`as_dict`).

    Attributes:
        observed: whether any importance weights were observed for the step
            (on any rank). If not, every scale is 1 and ``ess``/``ess_ratio``
            are NaN.
        ess: effective sample size of the step's global batch (float64).
        ess_ratio: ``ess / n`` in ``[1/n, 1]`` (float64).
        n: global number of weights (int64).
        lr_scale: the lr multiplier of the first param group (float64).
        lr_scales: the lr multiplier of every param group.
        lrs: the effective (scaled) lr of every param group, as used by the step.
    """

    observed: bool
    ess: Tensor
    ess_ratio: Tensor
    n: Tensor
    lr_scale: Tensor
    lr_scales: tuple[Tensor, ...]
    lrs: tuple[Tensor, ...]

    def as_dict(self, prefix: str = "vcpo/") -> dict[str, float]:
        """Plain floats for a metrics logger (this syncs with the device)."""
        out = {
            f"{prefix}ess": float(self.ess),
            f"{prefix}ess_ratio": float(self.ess_ratio),
            f"{prefix}n": float(self.n),
            f"{prefix}lr_scale": float(self.lr_scale),
        }
        for i, lr in enumerate(self.lrs):
            out[f"{prefix}lr_group{i}"] = float(lr)
        return out


@dataclass
class _Pending:
    """One observed set of weights: its statistics row and, when known, host facts."""

    row: Tensor
    summary: _ess.StatisticsSummary | None = None  # read on the host by observe()
    error: ValueError | None = None  # deferred malformed-input error (distributed)


def _resolve_power(rule: str | float) -> float:
    if isinstance(rule, str):
        if rule not in _RULES:
            raise ValueError(f"rule must be 'sqrt', 'linear' or a positive number, got {rule!r}")
        return _RULES[rule]
    power = float(rule)
    if not power > 0:
        raise ValueError(f"the ESS power must be positive, got {rule!r}")
    return power


def _check_config(config: dict[str, Any]) -> None:
    base = config["base_ess_ratio"]
    if not (isinstance(base, (int, float)) and 0.0 < float(base) <= 1.0):
        raise ValueError(f"base_ess_ratio must be in (0, 1], got {base!r}")
    floor = config["min_lr_scale"]
    if not (isinstance(floor, (int, float)) and 0.0 <= float(floor) <= 1.0):
        raise ValueError(f"min_lr_scale must be in [0, 1], got {floor!r}")
    if not isinstance(config["scale_weight_decay"], bool):
        raise ValueError(f"scale_weight_decay must be a bool, got {config['scale_weight_decay']!r}")
    _resolve_power(config["ess_power"])


def _check_decay(group: dict[str, Any], cls: type[Optimizer], decay_kind: str) -> None:
    """Refuse ``scale_weight_decay=False`` where the decay is not known to be decoupled.

    ``scale_weight_decay=False`` runs the step with ``weight_decay / scale`` so that
    ``lr * weight_decay`` is unchanged. That is exact for decoupled decay
    (``p *= 1 - lr * wd``), which touches no optimizer state. Coupled (L2) decay adds
    ``wd * p`` to the gradient, so ``wd / scale`` would enter the momentum buffer or the
    second moments and act on later, full-lr steps: there is no correct meaning for it.
    A tensor ``weight_decay`` counts as nonzero (reading it would sync).
    """
    if group.get("scale_weight_decay", True) is not False:
        return
    wd = group.get("weight_decay")
    if wd is None or (not isinstance(wd, Tensor) and wd == 0):
        return
    if decay_kind == "decoupled" or (
        decay_kind == "flag" and group.get("decoupled_weight_decay", False) is True
    ):
        return
    name = cls.__name__
    if decay_kind in ("coupled", "flag"):
        fix = " or decoupled_weight_decay=True" if decay_kind == "flag" else ""
        raise ValueError(
            f"scale_weight_decay=False with weight_decay={wd!r} is refused for {name}: its "
            "weight decay is coupled (an L2 term wd * p added to the gradient), so keeping "
            "lr * wd fixed would put wd / scale into the gradient and from there into the "
            "optimizer state (momentum, second moments), where it acts on later steps. Use "
            f"scale_weight_decay=True (the decay then scales with the lr like the gradient){fix}, "
            "or a decoupled-decay optimizer such as AdamW"
        )
    raise ValueError(
        f"scale_weight_decay=False with weight_decay={wd!r} is refused for {name}: it is "
        "only defined for decoupled weight decay (p *= 1 - lr * wd), and whether "
        f"{name}'s decay is decoupled is not known. Use scale_weight_decay=True"
    )


def _unhooked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Strip torch's step-hook wrapper, so the base step's hooks don't fire twice."""
    while getattr(fn, "hooked", False):
        fn = fn.__wrapped__  # type: ignore[attr-defined]
    return fn


class _ESSScaling:
    """Mixin that adds ESS step scaling to a ``torch.optim.Optimizer`` subclass.

    It must precede the optimizer class in the bases. See :func:`ess_scaled`.
    """

    _ess_base: type[Optimizer]
    _ess_default_power: float = 0.5
    _ess_decay: str = "unknown"  # the base's weight decay kind, see _LR_LINEAR
    param_groups: list[dict[str, Any]]
    defaults: dict[str, Any]

    def __init__(
        self,
        params: Any,
        *args: Any,
        base_ess_ratio: float = 1.0,
        min_lr_scale: float = 0.0,
        scale_weight_decay: bool = True,
        ess_power: float | str | None = None,
        process_group: GroupArg = None,
        **kwargs: Any,
    ) -> None:
        config = {
            "base_ess_ratio": base_ess_ratio,
            "min_lr_scale": min_lr_scale,
            "scale_weight_decay": scale_weight_decay,
            "ess_power": _resolve_power(
                self._ess_default_power if ess_power is None else ess_power
            ),
        }
        _check_config(config)
        super().__init__(params, *args, **kwargs)  # type: ignore[call-arg]
        if any("lr" not in group for group in self.param_groups):
            raise TypeError(
                f"{type(self).__name__}: the param groups of {self._ess_base.__name__} have no 'lr'; "
                "ESS step scaling needs a learning rate to scale"
            )
        self.defaults.update(config)
        for group in self.param_groups:
            for key, value in config.items():
                group.setdefault(key, value)
        self._check_groups()
        self.process_group = process_group
        self._vcpo_pending: list[_Pending] = []
        self._vcpo_in_step = False
        self.last_stats: ESSStepStats | None = None

    # ------------------------------------------------------------------ state
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # type: ignore[misc]
        state["last_stats"] = self.last_stats
        state["_vcpo_pending"] = list(self._vcpo_pending)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        self.__dict__.setdefault("process_group", None)
        self.__dict__.setdefault("_vcpo_pending", [])
        self.__dict__["_vcpo_in_step"] = False
        self.__dict__.setdefault("last_stats", None)
        fallback = {
            "base_ess_ratio": 1.0,
            "min_lr_scale": 0.0,
            "scale_weight_decay": True,
            "ess_power": type(self)._ess_default_power,
        }
        for key in _CONFIG_KEYS:
            self.defaults.setdefault(key, fallback[key])
        for group in self.param_groups:
            for key in _CONFIG_KEYS:
                group.setdefault(key, self.defaults[key])

    def __reduce_ex__(self, protocol: Any) -> Any:
        cls = type(self)
        if getattr(sys.modules.get(cls.__module__), cls.__qualname__, None) is cls:
            return super().__reduce_ex__(protocol)
        # A class made by ess_scaled(): rebuild it from its base and rule.
        return (_rebuild, (cls._ess_base, cls._ess_default_power), self.__getstate__())

    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` if a (complete) param group's configuration is invalid."""
        _check_config(group)
        _check_decay(group, self._ess_base, self._ess_decay)

    def _check_groups(self) -> None:
        """Validate every param group (cheap, host-only); normalise rule names to powers."""
        for group in self.param_groups:
            self._check_group(group)
            group["ess_power"] = _resolve_power(group["ess_power"])  # "sqrt" -> 0.5

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``Optimizer.add_param_group``; also validates the group's ESS configuration.

        The group is validated with the optimizer's defaults filled in, before it is added.
        """
        if isinstance(param_group, dict) and all(key in self.defaults for key in _CONFIG_KEYS):
            self._check_group({**self.defaults, **param_group})
        super().add_param_group(param_group)  # type: ignore[misc]
        group = self.param_groups[-1]
        if "ess_power" in group:
            group["ess_power"] = _resolve_power(group["ess_power"])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``Optimizer.load_state_dict``; validates the saved groups' ESS configuration first.

        Groups saved without the ESS keys (a plain torch optimizer's state dict) take
        this optimizer's defaults. Nothing changes if a saved group is invalid.
        """
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if isinstance(groups, list):
            for saved in groups:
                if isinstance(saved, dict):
                    self._check_group({**self.defaults, **saved})
        super().load_state_dict(state_dict)  # type: ignore[misc]
        for group in self.param_groups:
            group["ess_power"] = _resolve_power(group["ess_power"])

    # ---------------------------------------------------------------- observe
    def observe(
        self,
        importance_weights: Any = None,
        *,
        log_weights: Any = None,
        mask: Any = None,
    ) -> None:
        r"""Add one micro-batch's importance weights to the current step.

        The step's ESS uses everything observed since the last ``step()`` or
        ``zero_grad()``: like the gradient, the window accumulates over
        micro-batches. ``zero_grad()`` called *outside* ``step()`` starts a new
        window and drops what was observed, so the weights of a step that
        ``GradScaler`` skipped (it does not call ``optimizer.step()``) do not
        leak into the next one. ``zero_grad()`` called from a closure *inside*
        ``step()`` does not: see :meth:`step`. ``model.zero_grad()`` does not
        know about the window: after a skipped step it leaves the skipped
        batch's weights in it. With ``GradScaler`` either start each step with
        ``optimizer.zero_grad()``, or pass the weights through
        ``scaler.step(optimizer, log_weights=lw)``, which a skipped step never
        sees.

        Args:
            importance_weights: :math:`w_i \ge 0`, any shape. Default ``None``.
            log_weights: :math:`\log w_i` instead (finite). Default ``None``.
                Exactly one of the two must be given.
            mask: boolean tensor of the same shape; ``False`` entries are
                excluded. Default ``None`` (all entries count).

        Raises:
            ValueError: NaN, infinite or negative weights, a mask of the wrong
                shape or device. Without a process group this is raised here
                and nothing is recorded (one device sync to read the counts).
                Under a process group the error is deferred to ``step()``,
                where every rank raises it together instead of hanging.
        """
        distributed = resolve_group(self.process_group, default_world=True) is not None
        try:
            row = _ess.local_statistics(importance_weights, log_weights=log_weights, mask=mask)
        except ValueError as exc:
            if not distributed:
                raise
            x = importance_weights if importance_weights is not None else log_weights
            device = x.device if isinstance(x, Tensor) else torch.device("cpu")
            self._vcpo_pending.append(_Pending(_ess.malformed_row(device), error=exc))
            return
        summary = None
        if not distributed:
            name = "log_weights" if importance_weights is None else "importance weights"
            summary = _ess.check_statistics(row, name)
        self._vcpo_pending.append(_Pending(row, summary))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``Optimizer.zero_grad``; outside ``step()`` it also drops the observed weights.

        Called by a closure while ``step()`` runs it, it only zeroes the gradients:
        the weights observed for the step in progress count for that step.
        """
        if not getattr(self, "_vcpo_in_step", False):
            self._vcpo_pending = []
        super().zero_grad(set_to_none)  # type: ignore[misc]

    # ------------------------------------------------------------------- step
    def _step_statistics(self) -> ESSStepStats:
        """Reduce what was observed into the step's statistics; raise on bad input."""
        group = resolve_group(self.process_group, default_world=True)
        pending = self._vcpo_pending
        device = pending[0].row.device if pending else torch.device("cpu")
        if pending:
            local = _ess.combine_statistics(torch.stack([p.row.to(device) for p in pending]))
        else:
            local = _ess.empty_row(device)
        if group is None:
            # observe() already validated each row on the host: no sync here.
            summaries = [p.summary for p in pending if p.summary is not None]
            summary = _ess.StatisticsSummary(
                n=sum(s.n for s in summaries),
                observed=bool(pending),
                any_positive=any(s.any_positive for s in summaries),
            )
            total = local
        else:
            # Combine on the collective's device, the same on every rank (a rank
            # that observed nothing, or CPU weights, must not round differently).
            rows = all_gather_rows(local, group).to(collective_device(group, device))
            try:
                summary = _ess.check_statistics(rows)
            except ValueError as exc:
                local_errors = [p.error for p in pending if p.error is not None]
                if local_errors:
                    raise ValueError(
                        f"{exc}. On rank {get_rank(group)}: {local_errors[0]}"
                    ) from local_errors[0]
                raise
            total = _ess.combine_statistics(rows)
        observed = summary.observed
        if observed:
            _ess.check_nonempty(summary, "importance weights")
        return self._make_stats(total, observed)

    def _make_stats(self, total: Tensor, observed: bool) -> ESSStepStats:
        result = _ess.ess_from_statistics(total)
        scales = []
        for group in self.param_groups:
            if observed:
                ratio = result.ratio / float(group["base_ess_ratio"])
                scale = ratio.clamp(max=1.0).pow(_resolve_power(group["ess_power"]))
                scale = scale.clamp(min=float(group["min_lr_scale"]))
            else:
                scale = torch.ones((), dtype=torch.float64, device=total.device)
            scales.append(scale)
        nan = torch.full((), float("nan"), dtype=torch.float64, device=total.device)
        return ESSStepStats(
            observed=observed,
            ess=result.ess if observed else nan,
            ess_ratio=result.ratio if observed else nan.clone(),
            n=result.n,
            lr_scale=scales[0] if scales else torch.ones((), dtype=torch.float64),
            lr_scales=tuple(scales),
            lrs=(),
        )

    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Any] | None = None,
        *,
        importance_weights: Any = None,
        log_weights: Any = None,
        mask: Any = None,
    ) -> Any:
        """Observe optional weights, then run the base optimizer's step at the scaled lr.

        Args:
            closure: re-evaluates the model and returns the loss; called once,
                under ``torch.enable_grad()``, before the ESS is computed (so
                weights it observes count for this step). Default ``None``.
            importance_weights: weights to :meth:`observe` first. Default ``None``.
            log_weights: log weights to :meth:`observe` first. Default ``None``.
            mask: mask for those weights (see :meth:`observe`). Default ``None``.

        The step's ESS uses everything observed since the last step, reduced
        once over the process group. If nothing was observed (on any rank) the
        step is the base optimizer's step. ``group["lr"]`` (float or tensor) and
        ``group["weight_decay"]`` are restored before this returns or raises.

        Closures: the weights passed here, the weights observed before this
        call and the weights the closure observes all count for this step. A
        closure's ``optimizer.zero_grad()`` (the torch.optim convention) zeroes
        the gradients only; it does not drop the step's weights. Each set of
        weights counts as often as it is observed, so pass a micro-batch's
        weights once (here, or with :meth:`observe`, or in the closure).

        If this raises (bad weights, an empty window, a failing closure or base
        step), the observation window is left as it was before the call: the
        weights passed to this call are not kept for the next step.
        """
        self._check_groups()  # a group edited in place since the last step
        window = list(self._vcpo_pending)
        try:
            if importance_weights is not None or log_weights is not None:
                self.observe(importance_weights, log_weights=log_weights, mask=mask)
            elif mask is not None:
                raise ValueError("step() got a mask but no importance_weights or log_weights")
            loss = None
            if closure is not None:
                self._vcpo_in_step = True
                try:
                    with torch.enable_grad():
                        loss = closure()
                finally:
                    self._vcpo_in_step = False
            stats = self._step_statistics()  # validates; nothing has changed yet
        except BaseException:
            self._vcpo_pending = window
            raise
        saved = [(group, group["lr"], group.get("weight_decay")) for group in self.param_groups]
        try:
            lrs = self._apply_scales(stats)
            type(self)._ess_base_step(self)
        except BaseException:
            self._vcpo_pending = window
            raise
        finally:
            for group, lr, weight_decay in saved:
                group["lr"] = lr
                if weight_decay is not None:
                    group["weight_decay"] = weight_decay
        self._vcpo_pending = []
        stats.lrs = tuple(lrs)
        self.last_stats = stats
        return loss

    def _apply_scales(self, stats: ESSStepStats) -> list[Tensor]:
        """Write each group's scaled lr (and, if asked, compensated weight decay).

        A tensor lr is replaced by ``lr * scale`` computed on its device (no
        host sync). A float lr needs the scale as a Python float: the scales of
        all groups are read in one ``tolist()``.
        """
        host: list[float] | None = None
        lrs: list[Tensor] = []
        for group, scale in zip(self.param_groups, stats.lr_scales):
            lr = group["lr"]
            weight_decay = group.get("weight_decay")
            keep_decay = (
                stats.observed
                and not group["scale_weight_decay"]
                and bool(
                    weight_decay is not None
                    and (isinstance(weight_decay, Tensor) or weight_decay != 0)
                )
            )
            needs_host = not isinstance(lr, Tensor) or (
                keep_decay and not isinstance(weight_decay, Tensor)
            )
            if stats.observed and needs_host and host is None:
                host = torch.stack([s.to(torch.float64) for s in stats.lr_scales]).tolist()
            s_host = None if host is None else host[len(lrs)]
            if isinstance(lr, Tensor):
                new_lr = lr * scale.to(device=lr.device, dtype=lr.dtype) if stats.observed else lr
                lrs.append(new_lr.detach().clone())
            else:
                new_lr = lr * s_host if s_host is not None else lr
                lrs.append(torch.tensor(new_lr, dtype=torch.float64))
            group["lr"] = new_lr
            if keep_decay:
                # Keep lr * weight_decay at its unscaled value for this step.
                if isinstance(weight_decay, Tensor):
                    group["weight_decay"] = weight_decay / scale.to(
                        weight_decay.device, weight_decay.dtype
                    )
                else:
                    assert s_host is not None
                    group["weight_decay"] = weight_decay / s_host
        return lrs


def _rebuild(base: type[Optimizer], power: float) -> Any:
    cls = _scaled_class(base, power)  # checked when the pickled instance was made
    return cls.__new__(cls)


_CACHE: dict[tuple[type[Optimizer], float], type[Optimizer]] = {}


def _scaled_class(optimizer_cls: type[Optimizer], power: float) -> type[Optimizer]:
    key = (optimizer_cls, power)
    if key not in _CACHE:
        name = f"ESSScaled{optimizer_cls.__name__}"
        _CACHE[key] = type(
            name,
            (_ESSScaling, optimizer_cls),
            {
                "_ess_base": optimizer_cls,
                "_ess_default_power": power,
                "_ess_decay": _LR_LINEAR.get(optimizer_cls, "unknown"),
                "_ess_base_step": staticmethod(_unhooked(optimizer_cls.step)),
                "__module__": __name__,
                "__qualname__": name,
                "__doc__": f"{optimizer_cls.__name__} with ESS step scaling (power {power:g}); see ess_scaled().",
            },
        )
    return _CACHE[key]


def _supported_names() -> str:
    return ", ".join(cls.__name__ for cls in _LR_LINEAR)


def ess_scaled(
    optimizer_cls: type[Optimizer],
    rule: str | float = "sqrt",
    *,
    assume_lr_linear: bool = False,
) -> type[Optimizer]:
    r"""Build an ESS-scaled subclass of a ``torch.optim.Optimizer`` class.

    The returned class takes every argument of ``optimizer_cls`` plus the
    keywords ``base_ess_ratio=1.0``, ``min_lr_scale=0.0``,
    ``scale_weight_decay=True``, ``ess_power=None`` (the rule's power) and
    ``process_group=None``, and adds :meth:`observe`, ``step(...,
    importance_weights=None, log_weights=None)`` and ``last_stats``; see
    :class:`VCPOAdamW` for their meaning. Classes are cached: the same
    ``(optimizer_cls, rule)`` gives the same class.

    ESS scaling multiplies the step's ``lr`` by the scale, so it is only
    meaningful for an optimizer whose update is proportional to ``lr``: from
    the same state, a step at ``lr * s`` must move the parameters exactly
    ``s`` times as far as a step at ``lr`` and leave the same optimizer state.

    - **Supported** (verified, each tested): ``SGD``, ``Adam``, ``AdamW``,
      ``RAdam``, ``NAdam``, ``Adamax``, ``Adagrad``, ``Adadelta``,
      ``RMSprop``, ``SparseAdam`` and, where torch has it, ``Muon`` (the exact
      classes; a subclass counts as unknown).
    - **Refused** (``TypeError``): ``Rprop`` (reads ``lr`` only to initialise
      its step sizes), ``ASGD`` (its step size from ``lr`` acts on the next
      step), ``Adafactor`` (step size ``min(lr, 1/sqrt(t))``) and ``LBFGS``
      (many closure evaluations per step), and their subclasses.
    - **Anything else** (``apex.optimizers.FusedAdam``, your own optimizer, a
      subclass of a supported class) raises ``TypeError`` unless you pass
      ``assume_lr_linear=True``, stating that its update is ``lr`` times a
      function of the gradients and of an ``lr``-independent state. Its weight
      decay then counts as of unknown kind, so ``scale_weight_decay=False``
      is refused for it (see below).

    ``scale_weight_decay=False`` (keep ``lr * weight_decay`` unchanged) is only
    defined for decoupled decay: ``AdamW``, ``Muon``, and ``Adam`` / ``RAdam`` /
    ``NAdam`` with ``decoupled_weight_decay=True``. With coupled (L2) decay,
    which adds ``wd * p`` to the gradient and so to the optimizer state, it
    raises ``ValueError`` at construction, in ``add_param_group``,
    ``load_state_dict`` and ``step``.

    Args:
        optimizer_cls: a ``torch.optim.Optimizer`` subclass whose param groups
            carry ``"lr"``.
        rule: ``"sqrt"`` (default; :math:`p = 1/2`, for Adam-family
            optimizers), ``"linear"`` (:math:`p = 1`, for SGD) or a positive
            power :math:`p`.
        assume_lr_linear: accept a class that is not in the supported list,
            on your word that its update is proportional to ``lr``. Default
            ``False``.

    Raises:
        TypeError: not an optimizer class, already ESS-scaled, refused, or
            unknown without ``assume_lr_linear=True``.
    """
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, Optimizer)):
        raise TypeError(
            f"optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}"
        )
    if issubclass(optimizer_cls, _ESSScaling):
        raise TypeError(f"{optimizer_cls.__name__} is already ESS-scaled")
    for refused in _optim_classes(*_NOT_LR_LINEAR):
        if issubclass(optimizer_cls, refused):
            raise TypeError(
                f"ess_scaled({optimizer_cls.__name__}) is refused: "
                f"{_NOT_LR_LINEAR[refused.__name__]}. Optimizers whose update scales with lr: "
                f"{_supported_names()}"
            )
    if optimizer_cls not in _LR_LINEAR and assume_lr_linear is not True:
        raise TypeError(
            f"ess_scaled({optimizer_cls.__qualname__}): vcpo_optim has not verified that its "
            "update is proportional to lr (a step at lr * s must move the parameters exactly "
            "s times as far as a step at lr and leave the same optimizer state). Verified: "
            f"{_supported_names()}. If {optimizer_cls.__name__}'s update is lr times a "
            "function of the gradients and of an lr-independent state, pass "
            "assume_lr_linear=True"
        )
    return _scaled_class(optimizer_cls, _resolve_power(rule))


_COMMON_ARGS_DOC = r"""
        base_ess_ratio: :math:`\rho_\mathrm{base}` in ``(0, 1]``; steps with
            :math:`\rho \ge \rho_\mathrm{base}` run at the full lr. Default ``1.0``.
        min_lr_scale: floor of the lr multiplier, in ``[0, 1]``. Default ``0.0``.
        scale_weight_decay: if ``True`` (default, as the reference does) the
            weight decay shrinks with the lr (``lr_eff * wd``); if ``False``
            the step uses ``wd / scale`` so ``lr * wd`` is unchanged (with a
            float ``weight_decay`` this reads the scale on the host: one sync
            per step). ``False`` is only defined for decoupled decay (AdamW,
            ``decoupled_weight_decay=True``): with coupled (L2) decay, which
            enters the optimizer state through the gradient, a nonzero
            ``weight_decay`` raises ``ValueError``.
        ess_power: override the rule's power :math:`p`. Default ``None``.
        process_group: data-parallel group to reduce the ESS statistics over.
            Default ``None``: the world group when ``torch.distributed`` is
            initialised, else no reduction. With tensor parallelism pass the
            data-parallel group. Not saved in ``state_dict`` nor pickled (a
            copy falls back to ``None``)."""


class VCPOAdamW(_ESSScaling, torch.optim.AdamW):
    __doc__ = (
        r"""AdamW whose step size is scaled by :math:`\sqrt{\mathrm{ESS}/B}` (sqrt rule).

    Per step: :math:`\mathrm{lr}_\mathrm{eff} = \mathrm{lr} \cdot \max(m,
    \min(1, \rho/\rho_\mathrm{base})^{1/2})` with :math:`\rho = \mathrm{ESS}/B`
    of the step's importance weights, then exactly ``torch.optim.AdamW``'s
    update (for-loop, foreach or fused, amsgrad, maximize, capturable) with
    ``lr_eff``. With all weights equal it is bit-for-bit ``AdamW``.

    Usage::

        opt = VCPOAdamW(model.parameters(), lr=1e-6, weight_decay=0.01)
        for micro in batch:                       # gradient accumulation
            loss(micro).backward()
            opt.observe(log_weights=micro.log_w)   # or importance_weights=w
        opt.step()                                 # or opt.step(log_weights=lw)
        opt.zero_grad()
        log(opt.last_stats.as_dict())

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize, foreach,
        capturable, differentiable, fused: as ``torch.optim.AdamW`` (defaults
            ``lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
            amsgrad=False, maximize=False, foreach=None, capturable=False,
            differentiable=False, fused=None``)."""
        + _COMMON_ARGS_DOC
        + r"""

    With ``fused=True`` or ``capturable=True`` and a tensor ``lr``, ``step()``
    makes no host sync (weights are validated in :meth:`observe`).
    """
    )

    _ess_base = torch.optim.AdamW
    _ess_default_power = 0.5
    _ess_decay = "decoupled"
    _ess_base_step = staticmethod(_unhooked(torch.optim.AdamW.step))

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        base_ess_ratio: float = 1.0,
        min_lr_scale: float = 0.0,
        scale_weight_decay: bool = True,
        ess_power: float | str | None = None,
        process_group: GroupArg = None,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            base_ess_ratio=base_ess_ratio,
            min_lr_scale=min_lr_scale,
            scale_weight_decay=scale_weight_decay,
            ess_power=ess_power,
            process_group=process_group,
        )


class VCPOAdam(_ESSScaling, torch.optim.Adam):
    __doc__ = (
        r"""Adam with ESS step scaling (sqrt rule); see :class:`VCPOAdamW`.

    Takes every argument of ``torch.optim.Adam`` (same defaults, e.g.
    ``lr=1e-3, weight_decay=0, decoupled_weight_decay=False``) plus the
    keywords below. Adam's weight decay is an L2 term in the gradient unless
    ``decoupled_weight_decay=True``, so it is scaled through the lr, and
    ``scale_weight_decay=False`` needs ``decoupled_weight_decay=True``.

    Args:"""
        + _COMMON_ARGS_DOC
        + "\n    "
    )

    _ess_base = torch.optim.Adam
    _ess_default_power = 0.5
    _ess_decay = "flag"
    _ess_base_step = staticmethod(_unhooked(torch.optim.Adam.step))


class VCPOSGD(_ESSScaling, torch.optim.SGD):
    __doc__ = (
        r"""SGD whose step size is scaled linearly by :math:`\mathrm{ESS}/B` (linear rule).

    :math:`\mathrm{lr}_\mathrm{eff} = \mathrm{lr} \cdot \max(m, \min(1,
    \rho/\rho_\mathrm{base}))`, then exactly ``torch.optim.SGD``'s update.

    Args:
        params, lr, momentum, dampening, weight_decay, nesterov, maximize,
        foreach, differentiable, fused: as ``torch.optim.SGD`` (defaults
            ``lr=1e-3, momentum=0, dampening=0, weight_decay=0,
            nesterov=False, maximize=False, foreach=None,
            differentiable=False, fused=None``)."""
        + _COMMON_ARGS_DOC
        + "\n    "
    )

    _ess_base = torch.optim.SGD
    _ess_default_power = 1.0
    _ess_decay = "coupled"
    _ess_base_step = staticmethod(_unhooked(torch.optim.SGD.step))

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float | Tensor = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        base_ess_ratio: float = 1.0,
        min_lr_scale: float = 0.0,
        scale_weight_decay: bool = True,
        ess_power: float | str | None = None,
        process_group: GroupArg = None,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
            base_ess_ratio=base_ess_ratio,
            min_lr_scale=min_lr_scale,
            scale_weight_decay=scale_weight_decay,
            ess_power=ess_power,
            process_group=process_group,
        )


for _cls in (VCPOAdamW, VCPOAdam, VCPOSGD):
    _CACHE[(_cls._ess_base, _cls._ess_default_power)] = _cls
