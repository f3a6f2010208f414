"""Applying a rule to one recorded call, with the first-use check against the module's forward.

A rule found by structure (or inherited by a subclass that overrides ``forward``,
or registered with ``verify=True``) is trusted for a module only after it agreed
with the module's own forward once. The check replays ``module.forward`` on the
recorded inputs (under the recorded autocast state, with recording paused) and
compares, for each of the module's trainable parameters ``p``,

    ``autograd.grad(<module(x), c * g>, p)``  with  ``sum_i c_i G_i(p)`` from the rule's factors,

for random (standard normal) per-sample weights ``c``: both equal ``sum_i c_i grad_p <y_i, g_i>``
exactly when the rule's per-sample gradients are the module's, so a look-alike
with a different forward is caught whatever its parameter values make of the
output (for example ``w ** 2`` at ``w = 1``). The tolerance is that of the least
precise dtype involved (:data:`TOLERANCE`). A call whose gradient is zero for
every parameter proves nothing; the check then waits for the next call.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .base import (
    Dense,
    Factor,
    Outer,
    Rows,
    RuleSpec,
    Softmax,
    instance_forward,
    replay_guard,
    resolve_rule,
)
from .fallback import replay_autocast

__all__ = ["TOLERANCE", "apply_rule", "replay_params", "rule_status"]

#: Relative tolerance of the first-use check, by the least precise floating dtype among the
#: module's parameters, inputs and output gradient. Wide enough for the rounding of a reordered
#: sum (and for modules such as Gemma's norms that compute in float32 inside a float64 model),
#: orders of magnitude below any difference in the formula.
TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-5,
    torch.float32: 1e-3,
    torch.float16: 2e-2,
    torch.bfloat16: 5e-2,
}

# module -> (rule function, None when verified | the refusal message when it disagreed,
#            the instance's own forward then (see base.instance_forward))
_STATE: weakref.WeakKeyDictionary[nn.Module, tuple[Any, str | None, Any]] = (
    weakref.WeakKeyDictionary()
)


def _known(module: nn.Module, spec: RuleSpec) -> tuple[Any, str | None, Any] | None:
    """The first-use check's outcome for ``module`` under ``spec``, if it still applies."""
    st = _STATE.get(module)
    if st is None or st[0] is not spec.fn or st[2] is not instance_forward(module):
        return None
    return st


@contextmanager
def replay_params(module: nn.Module) -> Iterator[None]:
    """Plain stand-ins for the module's own sharded (FSDP2 ``DTensor``) parameters during a replay.

    After FSDP2's forward the parameters of a ``fully_shard`` model are resharded
    ``DTensor`` shards again, so ``module.forward`` cannot be replayed on the
    recorded (plain) inputs. The first-use checks compare a rule with the
    module's forward *for any parameter values* (see the module docstring), so
    each sharded parameter of the module itself is replaced, for the replay only,
    by a plain tensor of its global shape, dtype and device holding seeded
    standard-normal values (no collective: every rank runs the same check on
    its own). Nothing else changes; the real parameters are put back on exit.
    A rule that reads a sharded parameter in the real pass fails there loudly.
    """
    from ..distributed import is_dtensor  # lazy: the distributed module imports the rules

    swapped: list[tuple[str, Tensor]] = []
    try:
        for i, (name, p) in enumerate(list(module._parameters.items())):
            if p is None or not is_dtensor(p):
                continue
            local = p.to_local()
            gen = torch.Generator().manual_seed(0x5EED + i)
            values = torch.randn(tuple(p.shape), generator=gen, dtype=torch.float64)
            stand_in = nn.Parameter(
                values.to(device=local.device, dtype=local.dtype), requires_grad=p.requires_grad
            )
            module._parameters[name] = stand_in
            swapped.append((name, p))
        yield
    finally:
        for name, p in swapped:
            module._parameters[name] = p  # type: ignore[assignment]


def rule_status(module: nn.Module) -> str:
    """``"trusted"``, ``"verified"``, ``"unverified"`` (not checked yet), ``"rejected"`` or ``"none"``."""
    spec = resolve_rule(module)
    if spec is None:
        return "none"
    if not spec.verify:
        return "trusted"
    st = _known(module, spec)
    if st is not None:
        return "verified" if st[1] is None else "rejected"
    return "unverified"


def _tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, ...]:
    return tuple(t for t in (*args, *kwargs.values()) if isinstance(t, Tensor))


def _call(
    spec: RuleSpec, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], go: Tensor
) -> dict[str, Factor]:
    # a module with ``opob_inputs`` (the lean LM head) recorded exactly what its rule takes
    custom = getattr(module, "opob_inputs", None) is not None
    inputs = args if custom else _tensors(args, kwargs)
    if spec.kwargs:
        return spec.fn(module, inputs, go, kwargs)
    return spec.fn(module, inputs, go)


def _validate_factors(
    facs: Any, module: nn.Module, batch: int, spec: RuleSpec, where: str
) -> str | None:
    """Why the rule's result cannot be right for this module (``None`` if its shapes fit)."""
    if not isinstance(facs, dict):
        return f"returned {type(facs).__name__}, not a dict {{parameter name: factor}}"
    own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    for name, f in facs.items():
        p = own.get(name)
        if p is None:
            return (
                f"returned a factor for {name!r}, which is not a trainable parameter of the module "
                f"itself (its own trainable parameters: {sorted(own)})"
            )
        if not isinstance(f, Outer | Rows | Dense | Softmax):
            return f"returned {type(f).__name__} for {name!r}; expected Outer, Rows or Dense"
        if f.batch != batch:
            return f"returned a factor for {name!r} with {f.batch} samples, but B={batch}"
        if isinstance(f, Dense):
            ok = tuple(f.G.shape[1:]) == tuple(p.shape)
        elif isinstance(f, Softmax):
            ok = tuple(f.weight.shape) == tuple(p.shape)
        elif isinstance(f, Outer):
            ok = (
                f.a.dim() == 4
                and f.g.dim() == 4
                and f.a.shape[:3] == f.g.shape[:3]
                and f.g.shape[2] * f.g.shape[3] * f.a.shape[3] == p.numel()
            )
        else:
            ok = f.idx.dim() == 2 and f.g.dim() == 3 and f.num_rows * f.g.shape[2] == p.numel()
        if not ok:
            return f"returned a {type(f).__name__} factor for {name!r} that does not fit its shape {tuple(p.shape)}"
    return None


def _least_precise(ts: list[Tensor]) -> torch.dtype:
    order = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    dts = {t.dtype for t in ts if t.is_floating_point()}
    for d in order:
        if d in dts:
            return d
    return torch.float64


def _check(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    go: Tensor,
    facs: dict[str, Factor],
    amp: Any,
) -> tuple[bool | None, str]:
    """``(True, "")`` agreed, ``(None, "")`` inconclusive (zero gradient), ``(False, why)``."""
    from ..engine import _write  # lazy: the engine imports this package

    own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    if not own:
        return True, ""
    if not bool(go.any()):  # a zero output gradient proves nothing (e.g. a probe)
        return None, ""
    b = go.shape[0]
    # standard normal weights: E||sum_i c_i G_i||^2 = sum_i ||G_i||^2, no systematic cancellation
    gen = torch.Generator().manual_seed(0x5EED)
    c = torch.randn(b, generator=gen, dtype=torch.float64).to(go.device, go.dtype)
    # copies: a forward that modifies its input in place must not touch the recorded tensors
    rargs = tuple(a.clone() if isinstance(a, Tensor) else a for a in args)
    rkwargs = {k: v.clone() if isinstance(v, Tensor) else v for k, v in kwargs.items()}
    try:
        with replay_guard(), torch.enable_grad(), replay_autocast(amp):
            out = module.forward(*rargs, **rkwargs)
            if not isinstance(out, Tensor) or out.shape != go.shape:
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                return (
                    False,
                    f"its replayed output is {shape}, not a tensor of shape {tuple(go.shape)}",
                )
            if not out.requires_grad:
                return None, ""
            refs = torch.autograd.grad(
                out,
                [p for _, p in own],
                go * c.view(-1, *([1] * (go.dim() - 1))),
                allow_unused=True,
            )
    except Exception as e:  # the module cannot be replayed on its recorded inputs
        return False, f"replaying its forward on the recorded inputs raised {type(e).__name__}: {e}"
    tol = TOLERANCE[_least_precise([go, *[p for _, p in own], *_tensors(args, kwargs)])]
    scale = max((float(r.double().norm()) for r in refs if r is not None), default=0.0)
    conclusive = False
    with torch.no_grad():
        for (name, p), ref in zip(own, refs):
            dt = torch.float64 if p.dtype == torch.float64 else torch.float32
            mine = torch.zeros(p.shape, dtype=dt, device=p.device)
            f = facs.get(name)
            if f is not None:
                mine += _write(f, c.to(dt), p.shape, dt)
            r = torch.zeros_like(mine) if ref is None else ref.to(dt)
            rn, dn = float(r.double().norm()), float((mine - r).double().norm())
            if not math.isfinite(dn):
                return None, ""
            if rn == 0.0:
                if dn > tol * scale:
                    return (
                        False,
                        f"the rule gives a gradient for {name!r} where the module's is zero",
                    )
                continue
            conclusive = True
            if dn > tol * rn:
                return False, (
                    f"the gradient of {name!r} differs from autograd's through the module's forward "
                    f"by {dn / rn:.2g} (relative; tolerance {tol:g} for {_least_precise([go, p])})"
                )
    return (True, "") if conclusive else (None, "")


def apply_rule(
    module: nn.Module,
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    grad_outputs: list[Tensor | None],
    amp: Any,
    strict: bool,
) -> dict[str, Factor] | None:
    """The rule's factors for one recorded call, or ``None``: use the exact fallback instead.

    ``grad_outputs``: the gradients of the call's tensor outputs (rules take one).

    ``None`` only with ``strict=False``, for a rule that is not trusted and disagreed
    with the module's forward (or could not be applied to it); with ``strict=True``
    that is a ``ValueError`` naming the module, its class, the rule and the
    difference. A ``ValueError`` raised by a rule itself (a deliberate refusal) is
    passed on; any other exception of a rule becomes a ``ValueError`` too.
    """
    spec = resolve_rule(module)
    if spec is None:
        return None
    cls = type(module).__name__
    st = _known(module, spec)
    known = st is not None
    if st is not None and st[1] is not None:
        if strict:
            raise ValueError(st[1])
        return None

    def refuse(why: str, msg: str | None = None) -> None:
        msg = msg or (
            f"OPOB: the per-sample rule for module '{name}' ({cls}; {spec.source}) does not "
            f"fit it: {why}. Register a rule written for {cls} (vcpo_optim.opob.register_rule), "
            "freeze its parameters, or pass strict=False to use the exact (slower) torch.func "
            "fallback for it; nothing was changed."
        )
        _STATE[module] = (spec.fn, msg, instance_forward(module))
        if strict:
            raise ValueError(msg)

    if len(grad_outputs) != 1 or grad_outputs[0] is None:
        refuse(
            f"it returned {len(grad_outputs)} tensors that reach the loss; rules take one output"
        )
        return None
    grad_output = grad_outputs[0]
    try:
        facs = _call(spec, module, args, kwargs, grad_output)
    except ValueError:
        raise  # a rule's own refusal names its cause
    except Exception as e:
        msg = (
            f"OPOB: the per-sample rule for module '{name}' ({cls}) failed: {type(e).__name__}: "
            f"{e} ({spec.source}). If the rule does not fit this module, register one written "
            f"for {cls} (vcpo_optim.opob.register_rule) or freeze its parameters"
            + ("" if not spec.verify else ", or pass strict=False to use the exact fallback")
            + "; nothing was changed."
        )
        if not spec.verify:  # a trusted rule that breaks is a bug to report, never bypassed
            raise ValueError(msg) from e
        refuse("", msg)
        return None
    if known:
        return facs
    bad = _validate_factors(facs, module, grad_output.shape[0], spec, name)
    if bad is not None:
        refuse(f"the rule {bad}")
        return None
    if not spec.verify:
        _STATE[module] = (spec.fn, None, instance_forward(module))
        return facs
    with replay_params(module):
        ok, why = _check(module, args, kwargs, grad_output, facs, amp)
    if ok is False:
        refuse(why)
        return None
    if ok:
        _STATE[module] = (spec.fn, None, instance_forward(module))
    return facs
