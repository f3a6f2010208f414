"""Reach a VCPO optimizer through the wrappers training frameworks put around it.

Frameworks hand the training loop a wrapper, not the optimizer that was built:
accelerate's ``AcceleratedOptimizer`` (what ``Trainer.optimizer`` is after
``accelerator.prepare``), DeepSpeed's ZeRO / fp16 / bf16 optimizers and
accelerate's ``DeepSpeedOptimizerWrapper`` around them, torch's
``ZeroRedundancyOptimizer``. They forward ``step()`` (without keywords),
``zero_grad()``, ``param_groups`` and ``state_dict()``, but none of the ESS
API: ``observe(...)``, ``step(log_weights=...)`` and ``last_stats`` raise
``AttributeError``/``TypeError`` on the wrapper. :func:`unwrap_optimizer`
returns the optimizer underneath, on which they work.

This module imports no framework: wrappers are recognised by the attribute
that holds the wrapped optimizer.

Reaching the optimizer is not enough everywhere: DeepSpeed's ZeRO optimizers
call the wrapped optimizer's ``step()`` once per param group (ZeRO-3: per
sub-group), so the first call consumes the observed weights and the other
groups step unscaled. Use ESS scaling under ZeRO only with a single param
group.
"""

from __future__ import annotations

from typing import Any

from vcpo_optim.optim import _ESSScaling

__all__ = ["is_ess_scaled", "unwrap_optimizer"]

#: Attributes under which known wrappers keep the optimizer they wrap:
#: ``optimizer`` (accelerate's AcceleratedOptimizer and DeepSpeedOptimizerWrapper,
#: DeepSpeed's ZeRO stage 1/2/3, FP16_Optimizer and BF16_Optimizer, the
#: DeepSpeedEngine) and ``optim``
#: (``torch.distributed.optim.ZeroRedundancyOptimizer``).
_WRAPPED_ATTRS = ("optimizer", "optim")

_MAX_DEPTH = 16


def is_ess_scaled(optimizer: Any) -> bool:
    """Whether ``optimizer`` itself (not a wrapper), or an optimizer class, does ESS step scaling.

    True for instances and subclasses of :class:`~vcpo_optim.VCPOAdamW`,
    :class:`~vcpo_optim.VCPOAdam`, :class:`~vcpo_optim.VCPOSGD` and of any
    class made by :func:`~vcpo_optim.ess_scaled`.
    """
    if isinstance(optimizer, type):
        return issubclass(optimizer, _ESSScaling)
    return isinstance(optimizer, _ESSScaling)


def unwrap_optimizer(optimizer: Any) -> Any:
    """Return the ESS-scaled optimizer inside framework wrappers, or the innermost optimizer.

    Follows the chain of wrapped optimizers (the ``optimizer`` attribute of
    accelerate's ``AcceleratedOptimizer``/``DeepSpeedOptimizerWrapper`` and of
    DeepSpeed's ZeRO, fp16 and bf16 optimizers; the ``optim`` attribute of
    torch's ``ZeroRedundancyOptimizer``) and returns the first
    :func:`ESS-scaled <is_ess_scaled>` optimizer on it. ``optimizer`` itself is
    returned unchanged if it is ESS-scaled or wraps nothing.

    If no ESS-scaled optimizer is on the chain, the innermost object is
    returned, so that callers can tell what the framework built::

        opt = unwrap_optimizer(trainer.optimizer)
        if not is_ess_scaled(opt):
            raise TypeError(f"{type(opt).__name__} does no ESS step scaling")
        opt.observe(log_weights=lw)
        ...
        log(opt.last_stats.as_dict())

    Args:
        optimizer: an optimizer or a wrapper around one.

    Raises:
        ValueError: the chain of wrappers loops back on itself or is deeper
            than 16 levels.
    """
    current = optimizer
    seen = {id(current)}
    for _ in range(_MAX_DEPTH):
        if is_ess_scaled(current):
            return current
        inner = _wrapped(current)
        if inner is None:
            return current
        if id(inner) in seen:
            raise ValueError(
                f"the optimizer wrappers around {type(optimizer).__name__} form a cycle"
            )
        seen.add(id(inner))
        current = inner
    raise ValueError(
        f"more than {_MAX_DEPTH} levels of optimizer wrappers around {type(optimizer).__name__}"
    )


def _wrapped(obj: Any) -> Any | None:
    """The optimizer ``obj`` wraps, if it is a wrapper (duck-typed)."""
    for attr in _WRAPPED_ATTRS:
        inner = getattr(obj, attr, None)
        if inner is not None and inner is not obj and callable(getattr(inner, "step", None)):
            return inner
    return None
