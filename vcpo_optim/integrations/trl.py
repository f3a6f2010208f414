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

On-policy configurations -- ``gradient_accumulation_steps`` a multiple of
``steps_per_generation * num_iterations`` (TRL's defaults: ``num_iterations=1``,
``steps_per_generation = gradient_accumulation_steps``) and no vLLM -- have
every :math:`\log w_i = 0`, so the ESS ratio is exactly 1 and training is
bitwise plain ``GRPOTrainer``.

Tested with TRL 1.16.0, transformers 5.24.0, accelerate 1.15.0 (CPU, single
process and 2-rank DDP). It relies on one private method of TRL and on the
keys of its micro-batch dict, see :class:`VCPOGRPOTrainer`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

try:
    from transformers import TrainerCallback
    from trl import GRPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "vcpo_optim.integrations.trl needs TRL and transformers: pip install 'vcpo-optim[trl]'"
    ) from exc

from vcpo_optim.optim import VCPOSGD, ess_scaled
from vcpo_optim.wrappers import is_ess_scaled, unwrap_optimizer

__all__ = ["VCPOConfig", "VCPOGRPOTrainer", "VCPOTrainerMixin", "sequence_log_weights"]

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
    mask = inputs["completion_mask"]
    if inputs.get("tool_mask") is not None:
        mask = mask * inputs["tool_mask"]
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
    ``sampling_per_token_logps`` of the micro-batch dict. Public API used:
    ``Trainer.create_optimizer``, ``get_optimizer_cls_and_kwargs``,
    ``optimizer_cls_and_kwargs``, ``compute_loss``, ``log``,
    ``add_callback``, ``TrainerCallback.on_optimizer_step``,
    ``is_deepspeed_enabled`` and accelerate's
    ``Accelerator.optimizer_step_was_skipped``.
    """

    def __init__(
        self, *args: Any, vcpo_config: VCPOConfig | dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        self._vcpo_capture: _Capture | None = None
        super().__init__(*args, vcpo_config=vcpo_config, **kwargs)

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
        """TRL's loss, unchanged; in training, also observes the micro-batch's log weights."""
        if not self.model.training:  # evaluation: no optimizer step follows
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
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
