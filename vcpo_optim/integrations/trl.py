r"""VCPO in Hugging Face TRL: :class:`VCPOGRPOTrainer`, a drop-in ``trl.GRPOTrainer``.

Changing the class name is the whole change::

    from vcpo_optim.integrations.trl import VCPOGRPOTrainer   # was: from trl import GRPOTrainer

    trainer = VCPOGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)
    trainer.train()          # logs vcpo/ess, vcpo/ess_ratio, vcpo/lr_scale, vcpo/lr, vcpo/n

What the subclass does, and nothing else:

1. **Optimizer.** It builds the optimizer exactly as ``transformers.Trainer``
   does (the class and keywords that ``args.optim`` selects, the same
   weight-decay and no-decay param groups, ``fused``/``foreach`` as the
   arguments say) but from the ESS-scaled subclass of that class:
   ``adamw_torch``/``adamw_torch_fused`` give :class:`~vcpo_optim.VCPOAdamW`,
   ``sgd`` gives :class:`~vcpo_optim.VCPOSGD` (linear rule), any other
   ``torch.optim.Optimizer`` class gets :func:`~vcpo_optim.ess_scaled` with
   the sqrt rule. With all importance weights equal its step is bit-for-bit
   the plain optimizer's.
2. **Importance weights.** For every training micro-batch it observes the
   true sequence log weights

   .. math::

       \log w_i = \sum_t m_{i,t}\,\big(\log\pi_\theta(y_{i,t}) - \log\mu(y_{i,t})\big),

   with :math:`m` TRL's completion mask (times the tool mask, if any),
   :math:`\log\pi_\theta` the log-probs TRL's loss computed in that
   micro-batch, and the behaviour policy :math:`\mu` the sampler's log-probs
   (``sampling_per_token_logps``, from vLLM) if present, else TRL's
   ``old_per_token_logps`` (the policy that generated the batch, when
   ``num_iterations > 1`` or ``steps_per_generation >
   gradient_accumulation_steps``), else the current policy (on-policy:
   :math:`\log w_i = 0` exactly). This is the sum over tokens, not GSPO's
   per-token mean (``importance_sampling_level="sequence"`` still trains with
   TRL's own loss; only the ESS uses the sum). Completions with no masked-in
   token are left out; tokens vLLM could not score (NaN sampling log-prob)
   count as ratio 1, as TRL's own correction treats them. Each optimizer step
   uses the weights of all its micro-batches on all data-parallel ranks.
3. **Logs.** After every optimizer step it records ``vcpo/ess``,
   ``vcpo/ess_ratio``, ``vcpo/lr_scale``, ``vcpo/lr`` (the effective lr of the
   first param group) and ``vcpo/n`` (the number of weights in the step), and
   adds their mean over the logging interval to the Trainer's logs.

4. **OPOB (opt-in).** ``VCPOGRPOTrainer(..., use_opob=True, opob_config={...})``
   trains each micro-batch with VCPO's importance-weighted score surrogate
   and :class:`~vcpo_optim.OPOB`'s variance-optimal baseline instead of TRL's
   clipped loss (the math, and how it differs from TRL's loss, in
   :class:`OPOBConfig`): the rewards (TRL's weighted sum, before its
   normalisation) and the prompt-group ids ride in the micro-batch dict,
   each generation batch is reordered so that micro-batches hold whole
   groups, and ``opob.backward`` replaces the backward (DDP's own reducer
   is kept off; OPOB all-reduces). ESS scaling is unchanged. Settings the
   surrogate would silently ignore are refused at construction.

On-policy configurations -- ``gradient_accumulation_steps`` a multiple of
``steps_per_generation * num_iterations`` (TRL's defaults: ``num_iterations=1``,
``steps_per_generation = gradient_accumulation_steps``) and no vLLM -- have
every :math:`\log w_i = 0`, so the ESS ratio is exactly 1 and training is
bitwise plain ``GRPOTrainer``.

Tested with TRL 1.16.0, transformers 5.24.0, accelerate 1.15.0 (CPU, single
process and 2-rank DDP). It relies on private methods of TRL and on the
keys of its micro-batch dict, see :class:`VCPOGRPOTrainer`.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

try:
    from transformers import TrainerCallback
    from trl import GRPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "vcpo_optim.integrations.trl needs TRL and transformers: pip install 'vcpo-optim[trl]'"
    ) from exc

from vcpo_optim.losses import IS_MODES, importance_weights, per_sample_pg_loss
from vcpo_optim.opob import OPOB
from vcpo_optim.opob.baseline import AGGS
from vcpo_optim.optim import VCPOSGD, ess_scaled
from vcpo_optim.wrappers import is_ess_scaled, unwrap_optimizer

__all__ = [
    "OPOBConfig",
    "VCPOConfig",
    "VCPOGRPOTrainer",
    "VCPOTrainerMixin",
    "sequence_log_weights",
]

#: ``args.optim`` values whose optimizer does not step in ``optimizer.step()``
#: (layer-wise optimizers step inside backward hooks, LOMO fuses the update
#: into backward): an lr scale applied in ``step()`` would never reach them.
_UNSUPPORTED_OPTIM_MARKERS = ("layerwise", "lomo")


@dataclass(frozen=True)
class VCPOConfig:
    """The ESS step-scaling settings of :class:`VCPOGRPOTrainer` (see :class:`~vcpo_optim.VCPOAdamW`).

    Attributes:
        base_ess_ratio: :math:`\\rho_\\mathrm{base}` in ``(0, 1]``; steps with
            ESS/B at or above it run at the full lr. Default ``1.0``.
        min_lr_scale: floor of the lr multiplier, in ``[0, 1]``. Default ``0.0``.
        scale_weight_decay: decoupled weight decay shrinks with the lr
            (default ``True``, as the reference); ``False`` keeps ``lr * wd``.
        ess_power: the power :math:`p`; ``None`` (default) for the rule of the
            optimizer class (1/2 for AdamW and other adaptive optimizers, 1 for SGD).
        process_group: data-parallel group the ESS is reduced over. Default
            ``None``: the world group (what accelerate's DDP and FSDP use).
    """

    base_ess_ratio: float = 1.0
    min_lr_scale: float = 0.0
    scale_weight_decay: bool = True
    ess_power: float | str | None = None
    process_group: Any = None

    def __post_init__(self) -> None:
        # Validate now, through the optimizers' own checks, rather than when
        # training starts.
        VCPOSGD([torch.zeros(1, requires_grad=True)], **self.optimizer_kwargs())

    def optimizer_kwargs(self) -> dict[str, Any]:
        """The keywords passed to the ESS-scaled optimizer."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


#: TRL ``loss_type`` -> the token aggregation of the surrogate (see :class:`OPOBConfig`).
_OPOB_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclass(frozen=True)
class OPOBConfig:
    r"""The OPOB settings of :class:`VCPOGRPOTrainer` with ``use_opob=True``.

    With ``use_opob=True`` each training micro-batch is trained with VCPO's
    importance-weighted score surrogate and :class:`~vcpo_optim.OPOB`'s
    baseline instead of TRL's clipped loss: the trainer computes, for every
    completion :math:`i` of the micro-batch,

    .. math::

        \tilde l_i = -\,\frac{\omega_i}{D} \sum_t m_{i,t}\, \kappa_i \log\pi_\theta(y_{i,t}),
        \qquad \omega_i = \mathrm{IS}(\log w_i)\ \text{(detached)},

    and calls ``opob.backward(l, rewards, groups)``, which writes
    :math:`\sum_i c_i \nabla\tilde l_i` into ``.grad`` with
    :math:`c_i = (R_i - b^*_{s(i)})\,k_{s(i)}`,
    :math:`b^*_s = \sum_{i\in s} n_i R_i / \sum_{i\in s} n_i`,
    :math:`n_i = \lVert\nabla\tilde l_i\rVert^2`. Here :math:`m` is TRL's
    completion mask (times the tool mask), :math:`\log w_i` the sequence log
    weight the ESS uses (module docstring), :math:`\mathrm{IS}` the
    ``is_mode`` of :func:`~vcpo_optim.losses.importance_weights` (default
    :math:`\min(w_i, 8)`), :math:`R_i` TRL's weighted sum of the reward
    functions (before any normalisation; float64), and :math:`\kappa_i`,
    :math:`D` TRL's own aggregation of ``loss_type``, so that
    :math:`\sum_i \tilde l_i` is TRL's micro-batch loss with the clipped
    ratio term replaced by :math:`\omega_i \log\pi` and the advantage by 1:

    ==========  ==============================  ==================================================
    loss_type   :math:`\kappa_i`                :math:`D` (per micro-batch)
    ==========  ==============================  ==================================================
    ``grpo``    :math:`1/\max(L_i, 1)`          :math:`B \cdot \mathrm{GA}`
    ``bnpo``    1                               :math:`\max(\sum_{j,t} m_{j,t}, 1)\cdot\mathrm{GA}`
    ``dr_grpo`` 1                               :math:`B \cdot` ``max_completion_length`` :math:`\cdot\,\mathrm{GA}`
    ``dapo``    1                               ``num_items_in_batch`` / world :math:`\cdot\,\mathrm{GA}` / ``steps_per_generation``
    ==========  ==============================  ==================================================

    (:math:`B` the local micro-batch size, :math:`L_i` the completion's masked
    length, GA the Trainer's ``current_gradient_accumulation_steps``). OPOB
    runs with ``grad_reduction="mean"``, DDP's averaging convention, so the
    step's ``.grad`` has the scale TRL's loss would give. ``norm_by_std``
    follows ``GRPOConfig.scale_rewards``: ``"none"`` -> ``False``; ``"group"``
    (TRL's default) -> ``True`` with ``scope="group"``; ``"batch"`` ->
    ``True`` with ``scope="batch"`` (OPOB's :math:`k_s = 1/\mathrm{std}_s(R)`
    is the population std of the scope's rewards, no epsilon; a scope with
    equal rewards gets :math:`c_i = 0`).

    **Against TRL's loss.** TRL's per-token term is
    :math:`-\min(r_{i,t} A_i, \mathrm{clip}(r_{i,t}, 1-\epsilon, 1+\epsilon_h) A_i)`
    with the token ratio :math:`r_{i,t} = \pi_\theta/\pi_\mathrm{old}` and
    the normalised advantage :math:`A_i`. Its gradient is
    :math:`-A_i r_{i,t}\nabla\log\pi_\theta(y_{i,t})` where the clip is
    inactive and 0 where it is. The surrogate's gradient is
    :math:`-c_i\,\omega_i\nabla\log\pi_\theta(y_{i,t})`: one detached
    *sequence* weight instead of per-token ratios, truncated (``is_cap``)
    instead of clipped (no token is ever dropped), and OPOB's
    :math:`c_i` instead of :math:`A_i` (TRL's :math:`A_i` uses the plain
    group mean and the unbiased std + 1e-4). On-policy
    (:math:`\omega_i = 1`, no clip active) with ``scale_rewards="none"`` the
    two differ only by the baseline (:math:`b^*` weights by :math:`n_i`).
    ``epsilon``, ``epsilon_high``, ``delta`` are not used (non-default values
    are refused).

    **Groups.** With ``scope="group"`` every prompt group must be complete
    in one ``opob.backward`` call (over all ranks). TRL shuffles each
    generation batch and splits it into ``steps_per_generation``
    micro-batches, which splits groups; the trainer reorders it by group
    (whole groups, in the order TRL's shuffle met them) before the split.
    That is exact when ``per_device_train_batch_size`` is a multiple of
    ``num_generations``, or when ``steps_per_generation == 1`` (one
    micro-batch per generation; a group may then span ranks, which OPOB
    allows). Other layouts, and ``num_iterations > 1`` with
    ``gradient_accumulation_steps > steps_per_generation`` (the same groups
    twice in one step), are refused at construction; ``scope="batch"``
    takes any layout.

    **Refused** (``ValueError`` at construction, before TRL loads anything
    when ``args`` is given): ``loss_type`` other than the four above;
    ``importance_sampling_level="sequence"``; non-default ``epsilon`` /
    ``epsilon_high``, ``delta``; ``beta != 0``; ``top_entropy_quantile < 1``;
    ``entropy_coef`` / ``use_adaptive_entropy``; ``off_policy_mask_threshold``;
    ``use_vllm``; ``use_liger_kernel``; ``cast_lm_head_to_fp32``;
    ``multi_objective_aggregation="normalize_then_sum"``; ``scale_rewards``
    that is neither ``"none"`` nor the scope; ``fp16``; DataParallel;
    FSDP; a MoE router auxiliary loss; multimodal inputs (at the first
    micro-batch); and, during training, a completion that no reward function
    scored (TRL gives it advantage 0, which a baseline cannot express).

    Attributes:
        scope: ``"group"`` (default; one baseline per prompt group, the
            ``num_generations`` completions of one prompt) or ``"batch"``
            (one baseline over the optimizer step, all micro-batches and ranks).
        agg: the baseline's aggregation, ``"mean"`` (default), ``"median"`` or
            ``"winsorized_mean"`` (see :class:`~vcpo_optim.OPOB`).
        winsor_q: quantile of ``"winsorized_mean"``. Default ``0.1``.
        is_mode: the importance weight :math:`w_i` of the surrogate,
            :func:`~vcpo_optim.losses.importance_weights` mode: ``"tis"``
            (default, :math:`\min(w, c)`), ``"is"``, ``"mis"`` or ``"none"``.
        is_cap: its threshold :math:`c` (``"tis"`` and ``"mis"`` only; given
            with ``"is"`` or ``"none"`` it is refused). Default ``None``: 8.
        max_sample_grad_norm: per-trajectory clipping (``None``, default: off):
            bounds :math:`\lVert f_i c_i \nabla\tilde l_i\rVert \le C` for the
            scaled :math:`\tilde l_i` above (this rank's contribution, before
            the ``1/world`` of ``grad_reduction="mean"``). With ``scope="batch"``
            it needs one micro-batch per optimizer step (refused with
            ``gradient_accumulation_steps > 1``).
        strict: default ``True``: a model layer without a per-sample rule is
            an error (``False``: the exact but slow vmap fallback).
        checkpointing: OPOB's activation-checkpointing mode, ``"auto"``
            (default), ``True`` or ``False``.
    """

    scope: str = "group"
    agg: str = "mean"
    winsor_q: float = 0.1
    is_mode: str = "tis"
    is_cap: float | None = None
    max_sample_grad_norm: float | None = None
    strict: bool = True
    checkpointing: bool | str = "auto"

    def __post_init__(self) -> None:
        if self.scope not in ("group", "batch"):
            raise ValueError(f"opob_config: scope must be 'group' or 'batch', got {self.scope!r}")
        if self.agg not in AGGS:
            raise ValueError(f"opob_config: agg must be one of {AGGS}, got {self.agg!r}")
        if not 0.0 <= self.winsor_q < 0.5:
            raise ValueError(f"opob_config: winsor_q must be in [0, 0.5), got {self.winsor_q}")
        if self.is_mode not in IS_MODES:
            raise ValueError(
                f"opob_config: is_mode must be one of {IS_MODES}, got {self.is_mode!r}"
            )
        if self.is_cap is not None and not (
            not isinstance(self.is_cap, bool)
            and isinstance(self.is_cap, (int, float))
            and math.isfinite(self.is_cap)
            and self.is_cap > 0
        ):
            raise ValueError(
                f"opob_config: is_cap must be a finite number > 0, got {self.is_cap!r}"
            )
        if self.is_cap is not None and self.is_mode not in ("tis", "mis"):
            raise ValueError(
                f"opob_config: is_cap={self.is_cap!r} is not used by is_mode={self.is_mode!r} "
                "(only 'tis' and 'mis' have a cap); it would be silently ignored"
            )
        c = self.max_sample_grad_norm
        if c is not None and (
            isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0
        ):
            raise ValueError(
                f"opob_config: max_sample_grad_norm must be a finite number > 0 or None, got {c!r}"
            )
        if not (isinstance(self.checkpointing, bool) or self.checkpointing == "auto"):
            raise ValueError(
                f"opob_config: checkpointing must be 'auto', True or False, got {self.checkpointing!r}"
            )


def _loss_mask(inputs: dict[str, Any]) -> Tensor:
    """The tokens TRL's loss counts: ``completion_mask``, times ``tool_mask`` if present."""
    mask = inputs["completion_mask"]
    if inputs.get("tool_mask") is not None:
        mask = mask * inputs["tool_mask"]
    return mask


def sequence_log_weights(per_token_logps: Tensor, inputs: dict[str, Any]) -> tuple[Tensor, Tensor]:
    r"""Sequence log importance weights of one TRL ``GRPOTrainer`` micro-batch.

    :math:`\log w_i = \sum_t m_{i,t} (\log\pi_\theta - \log\mu)_{i,t}` in
    float64, with the mask and behaviour log-probs chosen as described in the
    module docstring.

    Args:
        per_token_logps: ``[B, T]`` log-probs of the completion tokens under
            the current policy (what TRL's ``_compute_loss`` computed).
        inputs: the micro-batch dict TRL passes to ``compute_loss``
            (``completion_mask``, optional ``tool_mask``,
            ``sampling_per_token_logps``, ``old_per_token_logps``).

    Returns:
        ``(log_weights, live)``: ``[B]`` float64 log weights and a ``[B]``
        bool mask of the completions with at least one masked-in token.

    Raises:
        ValueError: the behaviour log-probs or the mask do not have the shape
            of ``per_token_logps``.
    """
    logps = per_token_logps.detach()
    mask = _loss_mask(inputs)
    behaviour = inputs.get("sampling_per_token_logps")
    source = "sampling_per_token_logps"
    if behaviour is None:
        behaviour, source = inputs.get("old_per_token_logps"), "old_per_token_logps"
    if behaviour is None:
        behaviour, source = logps, "the current log-probs (on-policy)"
    for name, t in (("completion mask", mask), (source, behaviour)):
        if t.shape != logps.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but the policy log-probs have shape "
                f"{tuple(logps.shape)}"
            )
    keep = mask.to(device=logps.device) != 0
    live = keep.any(-1)
    behaviour = behaviour.detach().to(device=logps.device, dtype=torch.float64)
    diff = logps.to(torch.float64) - behaviour
    # A token vLLM could not score carries a NaN sampling log-prob: TRL's own IS
    # correction gives it ratio 1, so it adds 0 here. A NaN in the policy's own
    # (or TRL's old) log-probs is not hidden: it reaches observe(), which raises.
    if source == "sampling_per_token_logps":
        keep = keep & ~torch.isnan(behaviour)
    diff = torch.where(keep, diff, torch.zeros_like(diff))
    return diff.sum(-1), live


class _Capture:
    """The policy log-probs seen during one ``compute_loss`` call."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.logps: list[Tensor] = []


class _StepCallback(TrainerCallback):
    """Reads the optimizer's statistics right after each optimizer step."""

    def __init__(self, trainer: VCPOTrainerMixin) -> None:
        self._trainer = trainer

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._trainer._vcpo_after_optimizer_step()


class VCPOTrainerMixin:
    """The framework-independent half of :class:`VCPOGRPOTrainer`, for any ``transformers.Trainer``.

    Put it first in the bases (``class T(VCPOTrainerMixin, SomeTrainer)``).
    It takes the ``vcpo_config`` keyword, builds the ESS-scaled optimizer in
    ``create_optimizer``, refuses configurations where ESS scaling cannot
    work, and logs ``vcpo/*`` after every optimizer step. It does not observe
    any weights: the subclass's ``compute_loss`` must call
    ``self.vcpo_optimizer().observe(log_weights=..., mask=...)`` once per
    training micro-batch (see :class:`VCPOGRPOTrainer`).
    """

    # Provided by transformers.Trainer.
    args: Any
    model: Any
    optimizer: Any
    optimizer_cls_and_kwargs: Any
    accelerator: Any
    is_deepspeed_enabled: bool

    def __init__(
        self, *args: Any, vcpo_config: VCPOConfig | dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        config_given = vcpo_config is not None
        if vcpo_config is None:
            vcpo_config = VCPOConfig()
        elif isinstance(vcpo_config, dict):
            vcpo_config = VCPOConfig(**vcpo_config)
        elif not isinstance(vcpo_config, VCPOConfig):
            raise TypeError(
                f"vcpo_config must be a VCPOConfig or a dict, got {type(vcpo_config).__name__}"
            )
        self._vcpo_config = vcpo_config
        self._vcpo_config_given = config_given
        self._vcpo_last_stats: Any = None
        self._vcpo_window: dict[str, list[float]] = defaultdict(list)
        super().__init__(*args, **kwargs)
        name = type(self).__name__
        if self.is_deepspeed_enabled:
            raise ValueError(
                f"{name} does not run under DeepSpeed: ZeRO calls optimizer.step() once per "
                "param group, so the ESS scale would reach only the first group (the others "
                "would silently take full steps). Use DDP or FSDP."
            )
        if self.optimizer is not None:
            inner = unwrap_optimizer(self.optimizer)
            if not is_ess_scaled(inner):
                raise TypeError(
                    f"{name} got optimizers=({type(inner).__name__}, ...), which does no ESS "
                    "step scaling, so VCPO would do nothing. Pass optimizers=(None, ...) to "
                    "build VCPOAdamW from the training arguments, or an optimizer from "
                    "vcpo_optim (VCPOAdamW(...), ess_scaled(cls)(...))."
                )
            if config_given:
                raise ValueError(
                    "vcpo_config would be ignored: the optimizer passed in optimizers=(...) "
                    "carries its own ESS settings. Set them on that optimizer instead."
                )
        self.add_callback(_StepCallback(self))  # type: ignore[attr-defined]

    # -------------------------------------------------------------- optimizer
    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """``Trainer.create_optimizer`` with the ESS-scaled subclass of the optimizer class."""
        if self.optimizer is not None:
            return super().create_optimizer(model)  # type: ignore[misc]
        name = type(self).__name__
        optim_name = str(getattr(self.args.optim, "value", self.args.optim))
        if self.optimizer_cls_and_kwargs is not None:
            cls, kwargs = self.optimizer_cls_and_kwargs
            source = "optimizer_cls_and_kwargs"
        else:
            if any(marker in optim_name for marker in _UNSUPPORTED_OPTIM_MARKERS):
                raise ValueError(
                    f"{name} cannot scale optim={optim_name!r}: it updates the parameters inside "
                    "backward, not in optimizer.step(). Use adamw_torch_fused (the default) or "
                    "another optimizer that steps in step()."
                )
            cls, kwargs = self.get_optimizer_cls_and_kwargs(  # type: ignore[attr-defined]
                self.args, self.model if model is None else model
            )
            source = f"optim={optim_name!r}"
        scaled = _ess_class(cls, source, name)
        kwargs = dict(kwargs)
        for key in ("optimizer_dict", "model"):
            if key in kwargs:
                raise ValueError(
                    f"{name} cannot scale {source}: the Trainer builds it from {key!r} (a "
                    "layer-wise or fused-backward optimizer that does not update in "
                    "optimizer.step())."
                )
        ess_kwargs = self._vcpo_config.optimizer_kwargs()
        clash = sorted(k for k in ess_kwargs if k in kwargs and kwargs[k] != ess_kwargs[k])
        if clash and self._vcpo_config_given:
            raise ValueError(
                f"{source} sets {clash} and vcpo_config sets them differently; set them in one place"
            )
        kwargs = {**ess_kwargs, **kwargs}  # without vcpo_config, the class's own keywords win
        saved = self.optimizer_cls_and_kwargs
        self.optimizer_cls_and_kwargs = (scaled, kwargs)
        try:
            return super().create_optimizer(model)  # type: ignore[misc]
        finally:
            self.optimizer_cls_and_kwargs = saved

    def vcpo_optimizer(self) -> Any:
        """The ESS-scaled optimizer under the Trainer's wrappers (``observe`` it); ``TypeError`` if none."""
        inner = unwrap_optimizer(self.optimizer)
        if not is_ess_scaled(inner):
            raise TypeError(
                f"the optimizer in use is {type(inner).__name__}, which does no ESS step "
                "scaling; VCPO would do nothing"
            )
        return inner

    # --------------------------------------------------------------- logging
    def _vcpo_after_optimizer_step(self) -> None:
        optimizer = unwrap_optimizer(self.optimizer)
        if not is_ess_scaled(optimizer):
            return
        stats = optimizer.last_stats
        skipped = bool(self.accelerator.optimizer_step_was_skipped)
        if stats is None or stats is self._vcpo_last_stats or skipped:
            # The step did not run (GradScaler found inf/NaN gradients): drop
            # its weights so they do not count in the next step. The Trainer
            # zeroes the gradients right after this anyway.
            optimizer.zero_grad(set_to_none=True)
            return
        self._vcpo_last_stats = stats
        values = torch.stack(
            [
                t.detach().to(device="cpu", dtype=torch.float64)
                for t in (stats.ess, stats.ess_ratio, stats.lr_scale, stats.lrs[0], stats.n)
            ]
        ).tolist()
        for key, value in zip(("ess", "ess_ratio", "lr_scale", "lr", "n"), values):
            self._vcpo_window[f"vcpo/{key}"].append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's ``log``, plus the mean of each ``vcpo/*`` value since the last log."""
        if self.model.training and self._vcpo_window:
            for key, values in self._vcpo_window.items():
                valid = [v for v in values if not math.isnan(v)]
                logs[key] = sum(valid) / len(valid) if valid else None  # type: ignore[assignment]
            self._vcpo_window.clear()
        super().log(logs, start_time)  # type: ignore[misc]


class VCPOGRPOTrainer(VCPOTrainerMixin, GRPOTrainer):
    r"""``trl.GRPOTrainer`` with VCPO's ESS step scaling (see the module docstring).

    Takes every argument of ``trl.GRPOTrainer``, plus:

    Args:
        vcpo_config: :class:`VCPOConfig`, or a dict of its fields
            (``base_ess_ratio``, ``min_lr_scale``, ``scale_weight_decay``,
            ``ess_power``, ``process_group``). Default ``None``: the
            defaults (``base_ess_ratio=1.0``: any ESS below B shrinks the
            step; sqrt rule for AdamW).
        use_opob: default ``False``. ``True``: train with VCPO's surrogate and
            OPOB (see :class:`OPOBConfig` for the math, the group
            requirement and what is refused). OPOB is attached to
            ``self.model`` at the first training micro-batch
            (:attr:`opob`).
        opob_config: :class:`OPOBConfig` or a dict of its fields (``scope``,
            ``agg``, ``winsor_q``, ``is_mode``, ``is_cap``,
            ``max_sample_grad_norm``, ``strict``, ``checkpointing``); only
            with ``use_opob=True``. ``norm_by_std`` is not a field: it
            follows ``GRPOConfig.scale_rewards``.

    The optimizer:

    - ``optimizers=(None, scheduler)`` (the default): built from
      ``args.optim`` / ``optim_args`` / ``weight_decay`` / ``learning_rate`` /
      ``adam_*`` as ``Trainer.create_optimizer`` builds it, as the
      ESS-scaled subclass of the same class. A trainer attribute
      ``optimizer_cls_and_kwargs`` is honoured the same way (an ESS-scaled
      class in it keeps its own ESS keywords).
    - ``optimizers=(opt, scheduler)``: ``opt`` must be ESS-scaled
      (``VCPOAdamW(...)``, ``ess_scaled(cls)(...)``), else ``TypeError``: a
      plain optimizer would silently make VCPO a no-op. Its own ESS settings
      apply; passing ``vcpo_config`` as well is a ``ValueError``.
    - Refused with ``ValueError``: layer-wise optimizers (``*_layerwise``)
      and LOMO (they update inside backward, not in ``step()``), optimizer
      factories (Muon, Dion), bitsandbytes optimizers (the Trainer's 8-bit
      embedding override would be lost; pass
      ``optimizers=(ess_scaled(bnb_cls)(...), None)`` instead), and DeepSpeed
      (ZeRO steps the optimizer once per param group).

    Raises ``RuntimeError`` on the first training micro-batch if TRL's loss
    does not compute the policy log-probs through
    ``GRPOTrainer._get_per_token_logps_and_entropies`` exactly once (a TRL
    version or a subclass this class does not know): VCPO is never silently
    off.

    Private TRL API used (TRL 1.16): the method
    ``GRPOTrainer._get_per_token_logps_and_entropies`` (wrapped, to capture
    the log-probs ``_compute_loss`` computes; its first argument is the
    model, its first output the ``[B, T]`` log-probs), and the keys
    ``completion_mask``, ``tool_mask``, ``old_per_token_logps`` and
    ``sampling_per_token_logps`` of the micro-batch dict. With ``use_opob``
    also: ``_generate_and_score_completions`` (extended: two more keys),
    ``_calculate_rewards`` (wrapped, to read the gathered ``[N, F]`` rewards
    per function), ``_prepare_inputs`` with the attributes
    ``_buffered_inputs`` and ``_step`` (the buffered micro-batches are
    reordered by group), the keys ``prompt_ids``, ``prompt_mask``,
    ``completion_ids``, ``num_items_in_batch``, and the attributes
    ``reward_weights``, ``num_generations``, ``temperature``,
    ``loss_type``, ``scale_rewards``, ``aux_loss_enabled``; the policy's
    log-probs come from the model's own forward (``logits_to_keep``), not
    from TRL's fused LM head, which reads ``lm_head.weight`` outside the
    module. Public API used:
    ``Trainer.create_optimizer``, ``get_optimizer_cls_and_kwargs``,
    ``optimizer_cls_and_kwargs``, ``compute_loss``, ``log``,
    ``add_callback``, ``TrainerCallback.on_optimizer_step``,
    ``is_deepspeed_enabled`` and accelerate's
    ``Accelerator.optimizer_step_was_skipped``.
    """

    def __init__(
        self,
        *args: Any,
        vcpo_config: VCPOConfig | dict[str, Any] | None = None,
        use_opob: bool = False,
        opob_config: OPOBConfig | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._vcpo_capture: _Capture | None = None
        if not isinstance(use_opob, bool):
            raise TypeError(f"use_opob must be True or False, got {use_opob!r}")
        if opob_config is not None and not use_opob:
            raise ValueError("opob_config is given but use_opob=False: it would be ignored")
        if isinstance(opob_config, dict):
            if "norm_by_std" in opob_config:
                raise ValueError(
                    "opob_config: norm_by_std follows GRPOConfig.scale_rewards ('none': off, "
                    "'group' or 'batch': on, over that scope); set scale_rewards instead"
                )
            opob_config = OPOBConfig(**opob_config)
        elif opob_config is None:
            opob_config = OPOBConfig()
        elif not isinstance(opob_config, OPOBConfig):
            raise TypeError(
                f"opob_config must be an OPOBConfig or a dict, got {type(opob_config).__name__}"
            )
        self._vcpo_opob_config: OPOBConfig | None = opob_config if use_opob else None
        self._vcpo_opob: OPOB | None = None
        self._vcpo_rewards_capture: list[Tensor] | None = None
        self._vcpo_generation = 0
        if use_opob:  # fail fast, before TRL loads a reference model or a tokenizer
            grpo_args = kwargs.get("args", args[2] if len(args) > 2 else None)
            if grpo_args is not None and hasattr(grpo_args, "loss_type"):
                _raise_refusals(_opob_refusals(grpo_args, opob_config))
                if opob_config.scope == "group":
                    _check_groups_whole(grpo_args)
        super().__init__(*args, vcpo_config=vcpo_config, **kwargs)
        if use_opob:
            self._vcpo_check_opob_trainer()

    @property
    def opob(self) -> OPOB | None:
        """The :class:`~vcpo_optim.OPOB` attached to the policy (``None`` before the first training micro-batch or without ``use_opob``)."""
        return self._vcpo_opob

    def _get_per_token_logps_and_entropies(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        out = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        capture = self._vcpo_capture
        if capture is not None and model is capture.model:
            capture.logps.append(out[0].detach())
        return out

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """TRL's loss, unchanged; in training, also observes the micro-batch's log weights.

        With ``use_opob=True``, in training: the VCPO surrogate and
        ``opob.backward`` (see :class:`OPOBConfig`) instead of TRL's loss.
        """
        if not self.model.training:  # evaluation: no optimizer step follows
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._vcpo_opob_config is not None:
            if return_outputs:
                raise ValueError("The GRPOTrainer does not support returning outputs")
            return self._vcpo_opob_step(model, inputs)
        optimizer = self.vcpo_optimizer()
        self._vcpo_capture = capture = _Capture(model)
        try:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._vcpo_capture = None
        if len(capture.logps) != 1:
            raise RuntimeError(
                "VCPOGRPOTrainer could not find the policy log-probs of this micro-batch: TRL's "
                "loss called _get_per_token_logps_and_entropies on the policy "
                f"{len(capture.logps)} times (expected once, as TRL 1.16 does). This TRL version "
                "is not supported; VCPO would be silently off."
            )
        self._vcpo_observe(optimizer, capture.logps[0], inputs)
        return loss

    def _vcpo_observe(
        self, optimizer: Any, per_token_logps: Tensor, inputs: dict[str, Any]
    ) -> None:
        log_weights, live = sequence_log_weights(per_token_logps, inputs)
        if bool(live.any()):
            optimizer.observe(log_weights=log_weights, mask=live)

    # ------------------------------------------------------------------ OPOB
    def _vcpo_check_opob_trainer(self) -> None:
        """The refusals that need the built trainer (the model's MoE config, FSDP)."""
        cfg = self._vcpo_opob_config
        assert cfg is not None
        bad = _opob_refusals(self.args, cfg)
        if self.aux_loss_enabled:
            bad.append("router_aux_loss_coef != 0 on a MoE model (the router's auxiliary loss)")
        if self.is_fsdp_enabled:
            bad.append("FSDP (not supported with use_opob yet; use DDP)")
        _raise_refusals(bad)
        if cfg.scope == "group":
            _check_groups_whole(self.args)

    def _calculate_rewards(self, *args: Any, **kwargs: Any) -> Any:
        out = super()._calculate_rewards(*args, **kwargs)
        if self._vcpo_rewards_capture is not None:
            self._vcpo_rewards_capture.append(out)
        return out

    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        """TRL's generation and scoring; with ``use_opob``, in training, also the rewards and group ids.

        Adds ``vcpo_rewards`` (``[B]``, TRL's weighted sum of the reward
        functions over the functions that scored the completion, before any
        normalisation) and ``vcpo_groups`` (``[B]`` int64: the prompt group,
        ``num_generations`` consecutive rows of TRL's gathered batch, as TRL
        groups them for its advantages; unique over the run). Being ``[B]``
        tensors, both follow TRL's shuffle and split of the generation batch.
        """
        if self._vcpo_opob_config is None or not self.model.training:
            return super()._generate_and_score_completions(inputs)
        self._vcpo_rewards_capture = captured = []
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._vcpo_rewards_capture = None
        if len(captured) != 1:
            raise RuntimeError(
                "VCPOGRPOTrainer(use_opob=True) could not find the rewards of this generation batch: "
                f"TRL called _calculate_rewards {len(captured)} times (expected once, as TRL 1.16 "
                "does). This TRL version is not supported."
            )
        per_func = captured[0]  # [N_global, F], gathered over the processes
        n_local = output["completion_ids"].shape[0]
        n_global = per_func.shape[0]
        g = self.num_generations
        if n_global % g or n_global != n_local * self.accelerator.num_processes:
            raise RuntimeError(
                f"VCPOGRPOTrainer(use_opob=True): TRL's gathered rewards have {n_global} rows for "
                f"{self.accelerator.num_processes} processes x {n_local} completions and groups of {g}"
            )
        unscorable = torch.isnan(per_func).all(dim=1)
        if bool(unscorable.any()):
            raise ValueError(
                f"use_opob: {int(unscorable.sum())} completion(s) got None from every reward "
                "function; OPOB needs a reward for every completion (TRL gives them advantage 0, "
                "which OPOB's baseline cannot express). Make a reward function score them."
            )
        # float64: OPOB computes the baselines and coefficients in the rewards' dtype.
        weights = self.reward_weights.to(per_func.device, torch.float64)
        rewards = (per_func.to(torch.float64) * weights.unsqueeze(0)).nansum(dim=1)
        start = self.accelerator.process_index * n_local
        rows = torch.arange(start, start + n_local, device=rewards.device)
        groups = self._vcpo_generation * (n_global // g) + rows // g
        self._vcpo_generation += 1
        device = output["completion_ids"].device
        output["vcpo_rewards"] = rewards[start : start + n_local].to(device)
        output["vcpo_groups"] = groups.to(device=device, dtype=torch.int64)
        return output

    def _prepare_inputs(self, generation_batch: Any) -> Any:
        """TRL's buffering; with ``use_opob`` and ``scope="group"``, each new generation batch is reordered by group.

        TRL shuffles the completions of a generation batch and splits them
        into ``steps_per_generation`` micro-batches, which splits prompt
        groups. The split batch is put back together and ordered by group (the
        groups in the order TRL's shuffle first met them), then split again
        the way TRL splits it: with ``per_device_train_batch_size`` a multiple
        of ``num_generations`` every micro-batch holds whole groups (checked).
        """
        cfg = self._vcpo_opob_config
        if (
            cfg is None
            or cfg.scope != "group"
            or not self.model.training
            or self.args.steps_per_generation == 1
        ):
            return super()._prepare_inputs(generation_batch)
        before = self._buffered_inputs
        inputs = super()._prepare_inputs(generation_batch)
        if self._buffered_inputs is not before:  # TRL generated and split a new batch
            self._buffered_inputs = _regroup(self._buffered_inputs, self.num_generations)
            inputs = self._buffered_inputs[self._step % self.args.steps_per_generation]
        return inputs

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Tensor:
        """The Trainer's step; with ``use_opob``, under DDP's ``no_sync`` (OPOB reduces ``.grad`` itself)."""
        if self._vcpo_opob_config is None:
            return super().training_step(model, inputs, num_items_in_batch)
        ctx = (
            model.no_sync()
            if isinstance(model, DistributedDataParallel)
            else contextlib.nullcontext()
        )
        with ctx:
            return super().training_step(model, inputs, num_items_in_batch)

    def _vcpo_get_opob(self) -> OPOB:
        if self._vcpo_opob is None:
            cfg = self._vcpo_opob_config
            assert cfg is not None
            self._vcpo_opob = OPOB(
                self.model,  # the inner model (accelerate keeps the DDP wrapper in model_wrapped)
                scope=cfg.scope,
                agg=cfg.agg,
                winsor_q=cfg.winsor_q,
                norm_by_std=self.scale_rewards != "none",
                strict=cfg.strict,
                process_group=self._vcpo_config.process_group,
                grad_reduction="mean",
                max_sample_grad_norm=cfg.max_sample_grad_norm,
                checkpointing=cfg.checkpointing,
            )
        return self._vcpo_opob

    def _vcpo_opob_step(self, model: Any, inputs: dict[str, Any]) -> Tensor:
        """One training micro-batch with ``use_opob``: forward, surrogate, ESS observe, ``opob.backward``.

        Returns the detached value :math:`\\sum_i c_i \\tilde l_i` (the
        surrogate whose gradient was written) as a fresh leaf, so the
        Trainer's own ``accelerator.backward`` on it changes no parameter.
        """
        cfg = self._vcpo_opob_config
        assert cfg is not None
        extra = sorted(k for k in _MODEL_INPUT_KEYS if inputs.get(k) is not None)
        if extra:
            raise ValueError(
                f"use_opob: multimodal inputs {extra} are not supported (text-only causal LMs)"
            )
        for key in ("vcpo_rewards", "vcpo_groups"):
            if key not in inputs:
                raise RuntimeError(
                    f"use_opob: the micro-batch has no {key!r}: it did not come from this trainer's "
                    "_generate_and_score_completions (a TRL version or subclass this class does not know)"
                )
        optimizer = self.vcpo_optimizer()
        opob = self._vcpo_get_opob()
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        t = completion_ids.shape[1]
        # The model's own forward (not TRL's fused head, which reads lm_head.weight outside
        # the module): logits of the t + 1 last positions, the last one dropped.
        try:
            with self.accelerator.autocast():
                out = model(
                    input_ids=ids, attention_mask=attention, logits_to_keep=t + 1, use_cache=False
                )
            logits = out.logits[:, :-1]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / self.temperature
            logp = (
                torch.log_softmax(logits, dim=-1)
                .gather(-1, completion_ids.unsqueeze(-1))
                .squeeze(-1)
            )
            mask = _loss_mask(inputs)
            log_weights, live = sequence_log_weights(logp, inputs)
            w = importance_weights(log_weights, cfg.is_mode, cfg.is_cap)
            loss = per_sample_pg_loss(logp, mask, weights=w, agg=_AGG[self.loss_type])
            loss = loss * self._vcpo_loss_factor(inputs, mask)
        except BaseException:
            opob.clear()  # drop the recorded forward: nothing reaches .grad
            raise
        res = opob.backward(
            loss,
            inputs["vcpo_rewards"],
            inputs["vcpo_groups"] if cfg.scope == "group" else None,
        )
        # Observed once OPOB accepted the micro-batch: a refused one leaves the optimizer as it was.
        if bool(live.any()):
            optimizer.observe(log_weights=log_weights, mask=live)
        value = (res.coefficients.detach().to(loss.dtype) * loss.detach()).sum()
        return value.detach().requires_grad_()

    def _vcpo_loss_factor(self, inputs: dict[str, Any], mask: Tensor) -> float:
        """``per_sample_pg_loss``'s normaliser -> TRL's :math:`D` (see :class:`OPOBConfig`), times 1/GA."""
        ga = self.current_gradient_accumulation_steps * self.accelerator.gradient_accumulation_steps
        b = mask.shape[0]
        if self.loss_type in ("grpo", "bnpo"):  # 1/(B L_i) and 1/sum(mask) are in the agg
            return 1.0 / ga
        if self.loss_type == "dr_grpo":  # agg gives 1/B
            return 1.0 / (self.max_completion_length * ga)
        # dapo: agg gives 1/B; TRL divides the token sum by
        # num_items_in_batch / world * GA / steps_per_generation
        items = float(inputs["num_items_in_batch"].clamp(min=1.0))
        return b * self.args.steps_per_generation / (items / self.accelerator.num_processes * ga)


#: TRL loss_type -> the token aggregation of vcpo_optim.losses.per_sample_pg_loss.
_AGG = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum",
    "dapo": "seq-mean-token-sum",
}

#: Micro-batch keys of multimodal models (use_opob is text-only).
_MODEL_INPUT_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
    "num_images",
)


def _opob_refusals(args: Any, cfg: OPOBConfig) -> list[str]:
    """The ``GRPOConfig`` settings ``use_opob=True`` cannot honour exactly, in words."""
    bad: list[str] = []
    if args.loss_type not in _OPOB_LOSS_TYPES:
        bad.append(
            f"loss_type={args.loss_type!r} (its per-token weighting is not the VCPO surrogate; "
            f"use one of {_OPOB_LOSS_TYPES}, whose aggregation the surrogate keeps)"
        )
    if args.importance_sampling_level != "token":
        bad.append(
            f"importance_sampling_level={args.importance_sampling_level!r} (GSPO's "
            "length-normalised ratio; the surrogate's weight is the full sequence weight, set by "
            "opob_config is_mode/is_cap)"
        )
    default_eps = next(f.default for f in fields(type(args)) if f.name == "epsilon")
    if args.epsilon != default_eps or args.epsilon_high not in (None, args.epsilon):
        bad.append(
            f"epsilon={args.epsilon}/epsilon_high={args.epsilon_high} (the surrogate has no PPO "
            "clip; leave them at their defaults)"
        )
    if args.delta is not None:
        bad.append(f"delta={args.delta} (two-sided clipping; the surrogate has no clip)")
    if args.beta != 0.0:
        bad.append(
            f"beta={args.beta} (the KL term would be multiplied by OPOB's per-sample "
            "coefficients; use beta=0)"
        )
    if args.top_entropy_quantile < 1.0:
        bad.append(f"top_entropy_quantile={args.top_entropy_quantile} (entropy masking)")
    if args.entropy_coef != 0.0 or args.use_adaptive_entropy:
        bad.append("entropy_coef / use_adaptive_entropy (entropy bonus)")
    if args.off_policy_mask_threshold is not None:
        bad.append(f"off_policy_mask_threshold={args.off_policy_mask_threshold}")
    if args.use_vllm:
        bad.append(
            "use_vllm=True (vLLM generation and TRL's vLLM importance-sampling correction are "
            "not supported with use_opob yet)"
        )
    if args.use_liger_kernel:
        bad.append("use_liger_kernel=True")
    if args.cast_lm_head_to_fp32:
        bad.append(
            "cast_lm_head_to_fp32=True (it replaces lm_head.forward by F.linear on the weight, "
            "outside any module OPOB records)"
        )
    if args.multi_objective_aggregation != "sum_then_normalize":
        bad.append(
            f"multi_objective_aggregation={args.multi_objective_aggregation!r} (OPOB baselines "
            "the weighted sum of the raw rewards)"
        )
    if args.scale_rewards not in ("none", cfg.scope):
        bad.append(
            f"scale_rewards={args.scale_rewards!r} with opob_config scope={cfg.scope!r} (OPOB "
            "divides by the std of its own scope: set scale_rewards to 'none' or to the scope)"
        )
    if (
        cfg.scope == "batch"
        and cfg.max_sample_grad_norm is not None
        and args.gradient_accumulation_steps > 1
    ):
        bad.append(
            "opob_config max_sample_grad_norm with scope='batch' and gradient_accumulation_steps="
            f"{args.gradient_accumulation_steps} (an earlier micro-batch's clip factors would "
            "depend on the step's final baseline; use scope='group' or no accumulation)"
        )
    if args.fp16:
        bad.append("fp16=True (GradScaler is not supported here; use bf16)")
    if args.n_gpu > 1:
        bad.append("torch.nn.DataParallel (n_gpu > 1; use DDP via accelerate/torchrun)")
    return bad


def _raise_refusals(bad: list[str]) -> None:
    if bad:
        raise ValueError(
            "VCPOGRPOTrainer(use_opob=True) trains with VCPO's surrogate and OPOB's baseline; "
            "these settings would be silently ignored or cannot be made exact:\n- "
            + "\n- ".join(bad)
        )


def _check_groups_whole(args: Any) -> None:
    """With ``scope="group"`` every prompt group must be complete within one micro-batch (all ranks).

    TRL's sampler puts the ``num_generations`` completions of a prompt in
    consecutive rows of the global generation batch, each rank gets
    ``per_device_train_batch_size * steps_per_generation`` consecutive rows,
    and TRL shuffles them and splits them into ``steps_per_generation``
    micro-batches. With ``per_device_train_batch_size`` a multiple of
    ``num_generations`` every rank holds whole groups and the trainer
    reorders them whole into micro-batches (:func:`_regroup`); with
    ``steps_per_generation == 1`` a rank trains each generation batch in one
    micro-batch, so a group split across ranks is complete in the same call on
    all of them (OPOB's cross-rank groups). Anything else would split groups.
    """
    g = args.num_generations
    b = args.per_device_train_batch_size
    spg = args.steps_per_generation
    ga = args.gradient_accumulation_steps
    if args.num_iterations > 1 and ga > spg:
        raise ValueError(
            f"use_opob with scope='group': gradient_accumulation_steps={ga} > "
            f"steps_per_generation={spg} with num_iterations={args.num_iterations} trains the "
            "same completions (the same prompt groups) twice in one optimizer step, which OPOB's "
            "group baseline cannot take. Set steps_per_generation >= "
            "gradient_accumulation_steps, or opob_config={'scope': 'batch'}."
        )
    if b % g == 0 or spg == 1:
        return
    raise ValueError(
        f"use_opob with scope='group' needs every prompt group (num_generations={g} "
        "completions) inside one micro-batch, but per_device_train_batch_size="
        f"{b} is not a multiple of num_generations and steps_per_generation={spg} > 1 splits "
        "each generation batch into several micro-batches, so groups would be split. Set "
        "per_device_train_batch_size to a multiple of num_generations, or "
        "steps_per_generation=1, or use opob_config={'scope': 'batch'} (one baseline over the "
        "whole optimizer step)."
    )


def _regroup(chunks: list[dict[str, Any]], group_size: int) -> list[dict[str, Any]]:
    """Put TRL's split generation batch back together, order it by ``vcpo_groups``, split it again.

    The groups keep the order in which TRL's shuffle first met them. Raises
    ``RuntimeError`` if a group is incomplete on this rank or ends up split.
    """
    n_chunks = len(chunks)
    keys = list(chunks[0])
    whole: dict[str, Any] = {}
    for key in keys:
        values = [c[key] for c in chunks]
        first = values[0]
        if isinstance(first, Tensor) and first.ndim > 0:
            whole[key] = torch.cat(values, dim=0)
        elif isinstance(first, list):
            whole[key] = [x for v in values for x in v]
        else:  # None, a 0-d tensor (num_items_in_batch): the same in every chunk
            whole[key] = first
    groups = whole["vcpo_groups"]
    uniq, first_seen, counts = _first_occurrence(groups)
    if bool((counts != group_size).any()):
        raise RuntimeError(
            "use_opob: a prompt group is not complete in this rank's generation batch (group sizes "
            f"{counts.tolist()}, expected {group_size}); the groups cannot be kept whole"
        )
    rank_of_group = torch.empty_like(uniq)
    rank_of_group[torch.argsort(first_seen)] = torch.arange(uniq.numel(), device=uniq.device)
    pos = torch.searchsorted(uniq, groups)
    order = torch.argsort(
        rank_of_group[pos] * groups.numel() + torch.arange(groups.numel(), device=groups.device)
    )
    out: dict[str, Any] = {}
    for key, value in whole.items():
        if isinstance(value, Tensor) and value.ndim > 0:
            out[key] = value[order]
        elif isinstance(value, list):
            out[key] = [value[i] for i in order.tolist()]
        else:
            out[key] = value
    size = groups.numel() // n_chunks
    result = []
    for k in range(n_chunks):
        sl = slice(k * size, (k + 1) * size)
        chunk = {
            key: (v[sl] if (isinstance(v, Tensor) and v.ndim > 0) or isinstance(v, list) else v)
            for key, v in out.items()
        }
        result.append(chunk)
    owner = [set(c["vcpo_groups"].tolist()) for c in result]
    for i in range(n_chunks):
        for j in range(i + 1, n_chunks):
            if owner[i] & owner[j]:
                raise RuntimeError("use_opob: a prompt group ended up split across micro-batches")
    return result


def _first_occurrence(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sorted unique values of a 1-D tensor, the index of each one's first occurrence, and its count."""
    uniq, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    idx = torch.arange(x.numel(), device=x.device)
    first = torch.full_like(uniq, x.numel()).scatter_reduce(0, inverse, idx, reduce="amin")
    return uniq, first, counts


def _ess_class(cls: Any, source: str, trainer: str) -> type[torch.optim.Optimizer]:
    """The ESS-scaled subclass of the optimizer class the Trainer would build."""
    if is_ess_scaled(cls):
        return cls
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(
            f"{trainer} cannot scale {source}: the Trainer builds it with {cls!r}, not a "
            "torch.optim.Optimizer subclass (an optimizer factory such as Muon or Dion)"
        )
    if cls.__module__.split(".")[0] == "bitsandbytes":
        raise ValueError(
            f"{trainer} does not build bitsandbytes optimizers ({source}): the Trainer's 8-bit "
            "embedding override would be lost. Build one yourself, e.g. "
            "optimizers=(vcpo_optim.ess_scaled(bnb.optim.AdamW8bit)(params, ...), None)."
        )
    rule = "linear" if issubclass(cls, torch.optim.SGD) else "sqrt"
    try:
        return ess_scaled(cls, rule)
    except TypeError as exc:
        raise ValueError(f"{trainer} cannot scale {source}: {exc}") from exc
