r"""VCPO's ESS step scaling in verl's FSDP engine, switched on by configuration.

Two config keys make verl build and feed a VCPO optimizer::

    actor_rollout_ref.actor.optim.optimizer_impl=vcpo_optim.integrations.verl
    actor_rollout_ref.actor.optim.optimizer=VCPOAdamW
    # optional ESS settings: new keys, hence hydra's "+" prefix
    +actor_rollout_ref.actor.optim.override_optimizer_config.base_ess_ratio=0.5

How it works (tested with verl 0.9.1, its FSDP/FSDP2 engine):

1. **The optimizer.** verl's ``build_optimizer`` (``verl.workers.config.optimizer``)
   imports ``optimizer_impl`` with ``importlib``, takes the class named
   ``optimizer`` from it and calls ``cls(params, lr=..., weight_decay=...,
   betas=..., **override_optimizer_config)``. :class:`VCPOAdamW`,
   :class:`VCPOAdam` and :class:`VCPOSGD` here are the core classes of
   :mod:`vcpo_optim.optim` plus one guard (below), so every keyword of the
   core class (``base_ess_ratio``, ``min_lr_scale``, ``scale_weight_decay``,
   ``ess_power``, ``eps``, ``foreach``, ...) can be given through
   ``override_optimizer_config``.

2. **The importance weights.** Importing this module (which ``build_optimizer``
   does inside every actor worker process, before the first training step)
   calls :func:`install`, which replaces two attributes of verl's
   ``FSDPEngine`` class (``verl.workers.engine.fsdp.transformer_impl``):

   - ``forward_backward_batch(self, data, loss_function, forward_only=False)``:
     when training (``forward_only=False``) with an optimizer from this module,
     the ``loss_function`` handed to verl's own micro-batch loop is wrapped.
     verl calls it once per micro-batch with the micro-batch's
     ``model_output`` (the log-probs of this very forward, with grad) and
     ``data``; the wrapper first calls ``optimizer.observe(log_weights=lw,
     mask=has_tokens)`` with, for every sequence :math:`i` of the micro-batch,

     .. math::

         \mathrm{lw}_i = \sum_t m_{it}\,\big(\log\pi_\theta(y_{it}) - \log\mu(y_{it})\big),

     where :math:`m` is verl's ``response_mask`` and :math:`\mu` the behaviour
     policy (:func:`behaviour_key`: ``rollout_log_probs`` when the batch has
     them, else ``old_log_probs``), then runs verl's loss unchanged. A sequence
     with no token in ``response_mask`` (for example one dropped by verl's
     rejection sampling) contributes no gradient and is left out of the ESS.
   - ``train_batch(self, data, loss_function)`` (inherited from ``BaseEngine``):
     after verl's own ``optimizer_step()``, the step's statistics are added to
     the metrics dict it returns, as ``vcpo/ess``, ``vcpo/ess_ratio``,
     ``vcpo/lr_scale``, ``vcpo/lr`` (the effective lr of the first param group)
     and ``vcpo/n`` (the global number of sequences of the step). verl logs
     them with the actor's prefix: ``actor/vcpo/ess_ratio`` and so on.

   Engines whose optimizer is not from this module (the reference policy, the
   critic, a ``torch.optim`` actor) and forward-only passes are passed through
   untouched. :func:`install` is idempotent (a second call, or a second import,
   changes nothing) and checks, before patching anything, the signatures of the
   verl functions it relies on; if verl changed one of them it raises
   :class:`VerlIntegrationError` naming the installed verl version and the
   function, rather than risk observing nothing.

3. **Never a silent no-op.** An optimizer from this module refuses (raises
   ``RuntimeError`` before changing anything) a ``step()`` that observed no
   importance weights since the last ``zero_grad()``: that happens only if
   the step did not go through the wrapped FSDP micro-batch loop (an engine
   that overrides it, a verl that no longer calls the loss the way 0.9.1 does),
   and it would otherwise be plain AdamW without a word. The one accepted
   exception is a batch that carries neither ``rollout_log_probs`` nor
   ``old_log_probs`` (not a policy-gradient update, e.g. SFT): those steps run
   unscaled after a one-time ``UserWarning``.

The data-parallel reduction of the ESS uses the engine's data-parallel group
(``engine.get_data_parallel_group()``, set on the optimizer on its first
training batch), so with Ulysses sequence parallelism each sequence counts
once. verl's ``Metric`` objects carry the numbers, so verl's own DP and
mini-batch aggregation applies (the same value on every rank; the mean over
the mini-batches of a training step).

Private verl APIs this module depends on (verl 0.9.1): ``FSDPEngine.
forward_backward_batch`` and ``BaseEngine.train_batch`` (wrapped);
``FSDPEngineWithLMHead.forward_step`` calling
``loss_function(model_output=..., data=..., dp_group=...)`` once per
micro-batch with ``model_output["log_probs"]`` as a nested (jagged) tensor;
``FSDPEngine.optimizer``, ``get_data_parallel_group()``,
``is_mp_src_rank_with_outputs()``; the micro-batch keys ``response_mask``,
``old_log_probs``, ``rollout_log_probs``, ``prompts``, ``responses``
(``attention_mask``); ``verl.workers.utils.padding.no_padding_2_padding``;
``verl.utils.metric.Metric``; and the call convention of
``verl.workers.config.optimizer.build_optimizer``.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from vcpo_optim import optim as _optim

try:
    import verl as _verl
    from verl.utils.metric import Metric as _Metric
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngine as _FSDPEngine
    from verl.workers.engine.fsdp.transformer_impl import (
        FSDPEngineWithLMHead as _FSDPEngineWithLMHead,
    )
    from verl.workers.utils.padding import no_padding_2_padding as _no_padding_2_padding
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError(
        "vcpo_optim.integrations.verl needs verl (tested with verl==0.9.1); "
        f"importing it failed: {exc}"
    ) from exc

__all__ = [
    "TESTED_VERL_VERSIONS",
    "VCPOSGD",
    "VCPOAdam",
    "VCPOAdamW",
    "VerlIntegrationError",
    "behaviour_key",
    "install",
    "sequence_log_weights",
    "step_metrics",
]

#: verl versions this integration was tested with.
TESTED_VERL_VERSIONS = ("0.9.1",)

_MARK = "_vcpo_verl_wrapped"
_BEHAVIOUR_KEYS = ("rollout_log_probs", "old_log_probs")


class VerlIntegrationError(RuntimeError):
    """The installed verl does not match what this integration wraps."""


# --------------------------------------------------------------------- checks
_EMPTY = inspect.Parameter.empty

#: (owner, attribute, expected parameters as (name, default)) checked by install().
_EXPECTED: tuple[tuple[type, str, tuple[tuple[str, Any], ...]], ...] = (
    (
        _FSDPEngine,
        "forward_backward_batch",
        (("self", _EMPTY), ("data", _EMPTY), ("loss_function", _EMPTY), ("forward_only", False)),
    ),
    (_FSDPEngine, "train_batch", (("self", _EMPTY), ("data", _EMPTY), ("loss_function", _EMPTY))),
    (
        _FSDPEngineWithLMHead,
        "forward_step",
        (
            ("self", _EMPTY),
            ("micro_batch", _EMPTY),
            ("loss_function", _EMPTY),
            ("forward_only", _EMPTY),
        ),
    ),
    (_FSDPEngine, "get_data_parallel_group", (("self", _EMPTY),)),
    (_FSDPEngine, "is_mp_src_rank_with_outputs", (("self", _EMPTY),)),
)


def _describe(params: tuple[tuple[str, Any], ...]) -> str:
    return "(" + ", ".join(n if d is _EMPTY else f"{n}={d!r}" for n, d in params) + ")"


def _original(fn: Any) -> Any:
    """The verl function under our wrapper, if it is wrapped."""
    while getattr(fn, _MARK, False):
        fn = fn.__wrapped__
    return fn


def _check_signature(owner: type, name: str, expected: tuple[tuple[str, Any], ...]) -> None:
    where = f"{owner.__module__}.{owner.__qualname__}.{name}"
    version = getattr(_verl, "__version__", "unknown")
    fn = getattr(owner, name, None)
    if fn is None:
        raise VerlIntegrationError(
            f"vcpo_optim.integrations.verl (tested with verl {', '.join(TESTED_VERL_VERSIONS)}) "
            f"needs {where}{_describe(expected)}, which verl {version} does not have. Without it "
            "the optimizer would observe no importance weights; pin verl to a tested version or "
            "update vcpo_optim."
        )
    try:
        sig = inspect.signature(_original(fn), follow_wrapped=False)
    except (TypeError, ValueError) as exc:
        raise VerlIntegrationError(f"cannot read the signature of {where}: {exc}") from exc
    found = tuple(
        (p.name, p.default)
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    )
    extra = [p.name for p in sig.parameters.values() if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if found != expected or extra:
        raise VerlIntegrationError(
            f"vcpo_optim.integrations.verl was tested with verl {', '.join(TESTED_VERL_VERSIONS)}; "
            f"in the installed verl {version}, {where} has the signature {sig} instead of "
            f"{_describe(expected)}. This integration wraps or relies on that method to feed the "
            "importance weights to the optimizer, and will not guess what the new one does (it "
            "could silently observe nothing). Pin verl to a tested version or update vcpo_optim."
        )


# ------------------------------------------------------------ log weights
def behaviour_key(data: Any) -> str | None:
    """The micro-batch key holding the behaviour policy's log-probs :math:`\\log\\mu`.

    ``"rollout_log_probs"`` (the log-probs the rollout engine, e.g. vLLM,
    recorded while sampling: verl's default ``rollout.calculate_log_probs=True``)
    when present, else ``"old_log_probs"``, else ``None``. The rollout's own
    log-probs come first because they belong to the policy that actually
    sampled the data: ``old_log_probs`` are recomputed by the learner when the
    batch reaches it (verl's "decoupled" mode), which hides exactly the
    staleness an asynchronous pipeline introduces, and they also hide the
    sampler/learner numerical mismatch. In verl's bypass mode the two are the
    same tensor.
    """
    keys = data.keys()
    for key in _BEHAVIOUR_KEYS:
        if key in keys:
            return key
    return None


def sequence_log_weights(
    log_probs: Tensor, data: Any, key: str | None = None
) -> tuple[Tensor, Tensor]:
    r"""Per-sequence log importance weights of one verl micro-batch.

    Args:
        log_probs: ``model_output["log_probs"]`` of verl's FSDP engine: the
            log-probs of every token of every (prompt + response) sequence, as
            a nested (jagged) tensor, the layout verl's ``ppo_loss`` reads.
        data: the micro-batch ``TensorDict`` (``response_mask``, the behaviour
            log-probs, ``prompts``/``responses``).
        key: the behaviour log-probs' key. Default ``None``: :func:`behaviour_key`.

    Returns:
        ``(lw, has_tokens)``: float64 tensors of shape ``[batch]``,
        :math:`\mathrm{lw}_i = \sum_t m_{it}(\log\pi_\theta(y_{it}) -
        \log\mu(y_{it}))` (detached) and whether sequence :math:`i` has any
        token in ``response_mask``. Token positions outside the mask are
        ignored whatever they hold.
    """
    if key is None:
        key = behaviour_key(data)
        if key is None:
            raise ValueError(
                "the micro-batch has neither 'rollout_log_probs' nor 'old_log_probs': there is no "
                "behaviour policy to weight against"
            )
    logp = _no_padding_2_padding(log_probs, data).detach()
    fields = data.select("response_mask", key).to_padded_tensor()
    mask = fields["response_mask"].to(torch.bool)
    behaviour = fields[key]
    if logp.shape != mask.shape or behaviour.shape != mask.shape:
        raise ValueError(
            f"verl's response log-probs have shape {tuple(logp.shape)}, 'response_mask' "
            f"{tuple(mask.shape)} and {key!r} {tuple(behaviour.shape)}; they must match"
        )
    diff = logp.to(torch.float64) - behaviour.to(device=logp.device, dtype=torch.float64)
    mask = mask.to(logp.device)
    lw = torch.where(mask, diff, torch.zeros_like(diff)).sum(dim=-1)
    return lw, mask.any(dim=-1)


class _ObservingLoss:
    """verl's loss function, preceded by ``optimizer.observe`` on each micro-batch."""

    def __init__(self, loss_function: Callable[..., Any], optimizer: _VerlGuard) -> None:
        self.loss_function = loss_function
        self.optimizer = optimizer

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # verl 0.9.1 calls the loss as loss_function(model_output=, data=, dp_group=); it
        # also hands the same callable to top-k distillation as a logits processor
        # (student_logits=, data=): anything that is not the loss call passes through.
        if "model_output" in kwargs and "data" in kwargs:
            self._observe(kwargs["model_output"], kwargs["data"])
        return self.loss_function(*args, **kwargs)

    def _observe(self, model_output: Any, data: Any) -> None:
        opt = self.optimizer
        key = behaviour_key(data)
        if key is None:
            opt._vcpo_verl_unweighted = True
            warnings.warn(
                f"{type(opt).__name__} (vcpo_optim.integrations.verl): this training batch has "
                "neither 'rollout_log_probs' nor 'old_log_probs', so there are no importance "
                "weights: such steps run at the full learning rate (plain "
                f"{opt._ess_base.__name__}). Expected only outside policy-gradient training.",
                UserWarning,
                stacklevel=2,
            )
            return
        log_probs = model_output.get("log_probs") if hasattr(model_output, "get") else None
        if log_probs is None:
            raise ValueError(
                f"{type(opt).__name__} (vcpo_optim.integrations.verl) needs the policy's "
                "log-probs of each micro-batch, but verl's model output has no 'log_probs' (a "
                "value model, or distillation_only). ESS step scaling is for the actor: use "
                "optimizer_impl=torch.optim for this model."
            )
        lw, has_tokens = sequence_log_weights(log_probs, data, key)
        opt.observe(log_weights=lw, mask=has_tokens)


# -------------------------------------------------------------- the wrappers
def _ours(engine: Any) -> _VerlGuard | None:
    opt = getattr(engine, "optimizer", None)
    return opt if isinstance(opt, _VerlGuard) else None


def _wrap_forward_backward_batch(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def forward_backward_batch(
        self: Any, data: Any, loss_function: Callable[..., Any], forward_only: bool = False
    ) -> Any:
        opt = _ours(self)
        if forward_only or opt is None or loss_function is None:
            return original(self, data, loss_function, forward_only)
        if opt.process_group is None and torch.distributed.is_initialized():
            opt.process_group = self.get_data_parallel_group()
        return original(self, data, _ObservingLoss(loss_function, opt), forward_only)

    setattr(forward_backward_batch, _MARK, True)
    return forward_backward_batch


def _wrap_train_batch(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def train_batch(self: Any, data: Any, loss_function: Callable[..., Any]) -> Any:
        opt = _ours(self)
        if opt is None:
            return original(self, data, loss_function)
        before = opt.last_stats
        outputs = original(self, data, loss_function)
        stats = opt.last_stats
        stepped = stats is not None and stats is not before  # verl skips non-finite steps
        if (
            stepped
            and stats.observed
            and isinstance(outputs, dict)
            and isinstance(outputs.get("metrics"), dict)
            and self.is_mp_src_rank_with_outputs()
        ):
            outputs["metrics"].update(step_metrics(stats))
        return outputs

    setattr(train_batch, _MARK, True)
    return train_batch


def step_metrics(stats: _optim.ESSStepStats) -> dict[str, Any]:
    """``vcpo/*`` entries for verl's metrics dict (verl ``Metric`` objects, mean-aggregated)."""
    values = {
        "vcpo/ess": float(stats.ess),
        "vcpo/ess_ratio": float(stats.ess_ratio),
        "vcpo/lr_scale": float(stats.lr_scale),
        "vcpo/n": float(stats.n),
    }
    if stats.lrs:
        values["vcpo/lr"] = float(stats.lrs[0])
    return {k: _Metric(aggregation="mean", value=v) for k, v in values.items()}


def install() -> None:
    """Wrap verl's ``FSDPEngine.forward_backward_batch`` and ``train_batch`` (idempotent).

    Called when this module is imported. Checks every verl signature it relies
    on first and raises :class:`VerlIntegrationError` (patching nothing) if one
    changed. See the module docstring for what the wrappers do.
    """
    for owner, name, expected in _EXPECTED:
        _check_signature(owner, name, expected)
    for name, wrap in (
        ("forward_backward_batch", _wrap_forward_backward_batch),
        ("train_batch", _wrap_train_batch),
    ):
        current = getattr(_FSDPEngine, name)
        if not getattr(current, _MARK, False):
            setattr(_FSDPEngine, name, wrap(current))


def _installed() -> bool:
    return all(
        getattr(getattr(_FSDPEngine, name), _MARK, False)
        for name in ("forward_backward_batch", "train_batch")
    )


# ---------------------------------------------------------------- optimizers
def _refuse_unobserved_step(opt: Any, args: Any, kwargs: dict[str, Any]) -> None:
    if kwargs.get("importance_weights") is not None or kwargs.get("log_weights") is not None:
        return
    if len(args) > 1 or kwargs.get("closure") is not None:
        return  # a closure may observe inside step(); verl never passes one
    if opt._vcpo_verl_observed or opt._vcpo_verl_unweighted:
        return
    raise RuntimeError(
        f"{type(opt).__name__}.step() (vcpo_optim.integrations.verl): no importance weights were "
        "observed since the last zero_grad(), so this step would silently be plain "
        f"{opt._ess_base.__name__}. In verl the weights are fed by the FSDP engine's micro-batch "
        "loop (FSDPEngine.forward_backward_batch, wrapped when verl imports this module through "
        "optim.optimizer_impl=vcpo_optim.integrations.verl), and this step did not go through it: "
        "use the FSDP engine (strategy fsdp or fsdp2) for the actor, or call "
        "optimizer.observe(log_weights=...) before step() yourself."
    )


def _reset_after_step(opt: Any, args: Any, kwargs: dict[str, Any]) -> None:
    opt._vcpo_verl_observed = False
    opt._vcpo_verl_unweighted = False


class _VerlGuard:
    """Refuses a step without observed weights; see the module docstring."""

    _ess_base: type[torch.optim.Optimizer]
    _vcpo_verl_observed: bool
    _vcpo_verl_unweighted: bool

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._vcpo_verl_arm()

    def _vcpo_verl_arm(self) -> None:
        self._vcpo_verl_observed = False
        self._vcpo_verl_unweighted = False
        hooks = self._optimizer_step_pre_hooks  # type: ignore[attr-defined]
        if _refuse_unobserved_step not in hooks.values():
            self.register_step_pre_hook(_refuse_unobserved_step)  # type: ignore[attr-defined]
            self.register_step_post_hook(_reset_after_step)  # type: ignore[attr-defined]

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        self._vcpo_verl_arm()

    def observe(self, *args: Any, **kwargs: Any) -> None:
        """``observe`` of the core class (see :meth:`vcpo_optim.VCPOAdamW.observe`)."""
        super().observe(*args, **kwargs)  # type: ignore[misc]
        self._vcpo_verl_observed = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``zero_grad`` of the core class; also starts a new observation window."""
        self._vcpo_verl_observed = False
        self._vcpo_verl_unweighted = False
        super().zero_grad(set_to_none)  # type: ignore[misc]


class VCPOAdamW(_VerlGuard, _optim.VCPOAdamW):
    """:class:`vcpo_optim.VCPOAdamW` for verl (``optimizer=VCPOAdamW``).

    Same arguments, defaults and update; verl passes ``lr``, ``weight_decay``
    and ``betas`` from its optim config and ``override_optimizer_config`` as
    keywords. In addition a ``step()`` with no observed weights raises (see
    the module docstring).
    """


class VCPOAdam(_VerlGuard, _optim.VCPOAdam):
    """:class:`vcpo_optim.VCPOAdam` for verl (``optimizer=VCPOAdam``); see :class:`VCPOAdamW`."""


class VCPOSGD(_VerlGuard, _optim.VCPOSGD):
    """:class:`vcpo_optim.VCPOSGD` for verl (``optimizer=VCPOSGD``); see :class:`VCPOAdamW`.

    verl passes no ``betas`` to it (its name has no "adam").
    """


install()
