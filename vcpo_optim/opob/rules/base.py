"""Factored per-sample gradients and the rule registry.

A *rule* is a pure function ``rule(module, inputs, grad_output) -> {name: factor}``.
``inputs`` are the (detached) tensor arguments the module was called with:
the positional ones in order, then the keyword ones in the order given
(non-tensor arguments are left out; a rule that needs them reads them from the
module, or takes a fourth argument: the call's keyword arguments as passed,
tensors detached). ``grad_output`` is the gradient of ``sum_i l_i`` with respect to the
module's output. Dimension 0 of ``inputs[0]`` and of ``grad_output`` is the
sample index ``i``; OPOB checks it for ``inputs[0]``, the rule for the others. The rule
returns, for each of the module's own trainable parameters (keyed by local
name, e.g. ``"weight"``), the per-sample gradient of that parameter in one of
these factored forms:

* :class:`Outer` -- ``G_i = sum_t g[i, t]^T a[i, t]`` (Linear, convolution
  after im2col), optionally block-diagonal over ``nb`` blocks (grouped conv);
* :class:`Rows` -- ``G_i[v] = sum_t [idx[i, t] == v] g[i, t]`` (Embedding);
* :class:`Dense` -- the materialised ``[B, *param.shape]`` tensor (norms,
  biases, the vmap fallback);
* :class:`Softmax` -- ``G_i = sum_t u[i, t]^T h[i, t]`` for the weight of the
  memory-lean LM head (:class:`vcpo_optim.lm_head.TokenLogProbs`), with ``u``
  recomputed in vocabulary blocks, never stored.

The norm engine (:mod:`vcpo_optim.opob.engine`) turns these into per-sample
squared norms -- summing the factors of a parameter used several times before
the norm, so tied weights are exact -- and into the reweighted gradient.

How a module finds its rule (:func:`resolve_rule`), first match wins:

1. a rule registered for ``type(module)`` with :func:`register_rule`;
2. a *structural* rule (:func:`register_structural_rule`) whose ``match(module)``
   accepts the module (the Hugging Face RMSNorm variants, scaled embeddings,
   GPT-2's ``Conv1D``, PEFT's DoRA magnitude): no class names are listed, the
   match looks at the module's parameters and attributes;
3. the rule of the nearest registered base class in the MRO. A subclass that
   keeps the base class's ``forward`` (e.g. the ``FSDPLinear`` classes of
   ``fully_shard``) shares the rule as is; one that overrides ``forward`` gets it
   only after the first-use check below. So does a module whose ``forward`` is
   replaced on the instance (accelerate's ``add_hook_to_module``, a monkeypatch).

Rules found by structure or inherited by a subclass with its own ``forward``,
and rules registered with ``verify=True`` (the default for
:func:`register_rule`), are *checked on first use* (:mod:`.verify`): the module's
own forward is replayed on the recorded input and autograd's gradient of its
parameters is compared with what the rule's factors give, ``sum_i c_i G_i`` for
random ``c``. A disagreement makes OPOB refuse (``strict=True``) or use the exact
vmap fallback for that module (``strict=False``); it is never silently wrong.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor, nn

__all__ = [
    "RULES",
    "STRUCTURAL_RULES",
    "Dense",
    "Factor",
    "Outer",
    "Rows",
    "Rule",
    "RuleSpec",
    "Softmax",
    "get_rule",
    "is_token_local",
    "register_rule",
    "register_structural_rule",
    "replaying",
    "resolve_rule",
    "structural_rules_disabled",
    "uncovered_message",
]


@dataclass
class Outer:
    """``G_i = sum_t g[i, t, j]^T a[i, t, j]`` for each block ``j``.

    ``a``: ``[B, T, nb, k]``, ``g``: ``[B, T, nb, m]``; the parameter viewed as
    ``[nb, m, k]`` receives ``G_i``.
    """

    a: Tensor
    g: Tensor

    @property
    def batch(self) -> int:
        return self.g.shape[0]


@dataclass
class Rows:
    """``G_i[v, :] = sum_t [idx[i, t] == v] g[i, t, :]`` for a ``[V, d]`` parameter.

    ``idx``: ``[B, T]`` (int64), ``g``: ``[B, T, d]``. Positions that must not
    contribute (``padding_idx``) have ``g`` set to zero by the rule.
    """

    idx: Tensor
    g: Tensor
    num_rows: int

    @property
    def batch(self) -> int:
        return self.g.shape[0]


@dataclass
class Dense:
    """The materialised per-sample gradient, ``G``: ``[B, *param.shape]``."""

    G: Tensor

    @property
    def batch(self) -> int:
        return self.G.shape[0]


@dataclass
class Softmax:
    """``G_i = sum_t u[i, t]^T h[i, t]`` for the ``[V, d]`` weight of a log-softmax LM head.

    ``u[i, t] = dL/dz[i, t]`` is the gradient of the head's linear logits, a
    dense ``V``-vector that is never stored: it is recomputed in vocabulary
    blocks from the hidden states ``h`` (``[B, T, d]``), the token ids ``y``,
    the per-token log-sum-exp ``lse`` (and entropy ``ent``), the gradients of
    the log-prob ``g`` and of the entropy ``k`` (all ``[B, T]``; positions
    with ``g = k = 0`` contribute nothing), the detached ``weight`` / ``bias``
    and the call's :class:`vcpo_optim.lm_head.HeadSpec` (``spec``). Produced by
    :class:`vcpo_optim.lm_head.TokenLogProbs`; the norm math is in
    :mod:`vcpo_optim.opob.rules.lm_head`.
    """

    h: Tensor
    y: Tensor
    lse: Tensor
    ent: Tensor | None
    g: Tensor
    k: Tensor | None
    weight: Tensor
    bias: Tensor | None
    spec: Any

    @property
    def batch(self) -> int:
        return self.g.shape[0]


Factor = Outer | Rows | Dense | Softmax
#: ``rule(module, inputs, grad_output) -> {param name: factor}``; a rule may take a fourth
#: argument, the call's keyword arguments (detached tensors, other values as passed).
Rule = Callable[..., dict[str, Factor]]


@dataclass(frozen=True)
class RuleSpec:
    """A rule as resolved for one module: the function and how far it is trusted.

    ``verify``: check the rule against the module's forward on first use.
    ``kwargs``: the rule takes the call's keyword arguments as a fourth argument.
    ``source``: where it came from, for messages. ``token_local``: how a packed
    record reaches the rule (``"tokens"`` or ``"padded"``), ``None`` if the
    module is not token-local (see :func:`register_rule`).
    """

    fn: Rule
    verify: bool
    kwargs: bool
    source: str
    token_local: str | None = None


def _token_local_mode(token_local: bool | str) -> str | None:
    """The :attr:`RuleSpec.token_local` of a registration's ``token_local`` argument."""
    if token_local is False:
        return None
    if token_local is True:
        return "tokens"
    if token_local == "padded":
        return "padded"
    raise ValueError(f"OPOB: token_local must be False, True or 'padded', got {token_local!r}")


@dataclass(frozen=True)
class _Structural:
    match: Callable[[nn.Module], bool]
    spec: RuleSpec


#: Rules registered by exact module type (:func:`register_rule`).
RULES: dict[type[nn.Module], Rule] = {}
_SPECS: dict[type[nn.Module], RuleSpec] = {}
#: Structural rules, tried in order (:func:`register_structural_rule`); user rules go first.
STRUCTURAL_RULES: list[_Structural] = []
_version = [0]  # bumped by every registration: invalidates the per-module resolution cache
_resolved: weakref.WeakKeyDictionary[
    nn.Module, tuple[int, RuleSpec | None, type[nn.Module] | None, Any]
] = weakref.WeakKeyDictionary()


def instance_forward(module: nn.Module) -> Any:
    """A ``forward`` set on the module instance itself, or ``None``.

    ``accelerate``'s ``add_hook_to_module`` (``device_map``, offloading, custom
    ``ModelHook`` s) and hand-written monkeypatches replace ``module.forward`` on the
    instance; the forward that runs is then no longer the class's, so a rule written
    for the class is only used after the first-use check.
    """
    return vars(module).get("forward")


def _takes_kwargs(fn: Callable[..., object], what: str) -> bool:
    """Validate a rule's signature: 3 positional parameters, or 4 (the call's kwargs)."""
    if not callable(fn):
        raise TypeError(f"OPOB: {what} must be callable, got {type(fn).__name__}")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: assume the 3-argument form
        return False
    pos = [
        p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    star = any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values())
    required = sum(p.default is p.empty for p in pos)
    if required <= 4 and (len(pos) >= 3 or star):
        return len(pos) >= 4
    raise TypeError(
        f"OPOB: {what} must take (module, inputs, grad_output) or (module, inputs, grad_output, "
        f"kwargs), got the signature {getattr(fn, '__name__', 'rule')}{sig}"
    )


def _check_types(module_types: tuple[object, ...]) -> None:
    if not module_types:
        raise TypeError("OPOB: register_rule needs at least one module class")
    for t in module_types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(
                f"OPOB: register_rule takes nn.Module subclasses, got {t!r}; to match modules by "
                "their structure use register_structural_rule(match, rule)"
            )


def register_rule(
    *module_types: type[nn.Module], verify: bool = True, token_local: bool | str = False
) -> Callable[[Rule], Rule]:
    """Register ``rule`` as the per-sample gradient rule for ``module_types`` (exact types).

    Like Opacus's ``register_grad_sampler``::

        @register_rule(MyLinear)
        def my_linear(module, inputs, grad_output):
            x = inputs[0]                        # [B, ..., k]; dim 0 is the sample
            return {"weight": Outer(x.reshape(x.shape[0], -1, 1, x.shape[-1]),
                                    grad_output.reshape(x.shape[0], -1, 1, grad_output.shape[-1]))}

    ``inputs`` are the call's tensor arguments (positional, then keyword), detached;
    ``grad_output`` is the gradient of ``sum_i l_i`` with respect to the module's
    (single tensor) output. A rule may take a fourth argument: the call's keyword
    arguments. Subclasses of ``module_types`` that keep their ``forward`` use the
    rule too; subclasses with their own ``forward`` get it only after the first-use
    check.

    Args:
        module_types: ``nn.Module`` subclasses.
        verify: default ``True``: on the first call of each module the rule is
            checked against the module's own forward (autograd's gradient of its
            parameters after replaying the module on copies of the recorded
            inputs: the forward runs once more, so it must be deterministic and
            free of side effects); a mismatch raises (``strict=True``) or uses
            the fallback. ``False`` trusts the rule (for modules that cannot be
            replayed, e.g. with sharded ``DTensor`` parameters, or whose forward
            is random).
        token_local: default ``False``. ``True`` declares the module
            position-wise: each token of ``[B, T, ...]`` is mapped on its own and
            the rule's per-sample gradients are sums over tokens (``nn.Linear``,
            ``nn.Embedding``, norms over the feature dimensions). Only such
            modules are accepted in packed batches (``OPOB.backward(...,
            cu_seqlens=...)``), where the rule is called with every token as a
            sample (``[N, 1, ...]``) and its factors are summed per segment
            (:mod:`vcpo_optim.opob.packing`). ``"padded"``: token-local too, but
            the rule is called on the segments zero-padded to ``[B, L_max, ...]``
            (zero output gradient at the padding) and its factors are used as
            they are: for rules whose factors are not :class:`Outer`,
            :class:`Rows` or :class:`Dense`; costs a padded copy of the record's
            inputs. A verified rule's module is also checked to be position-wise
            on its first packed call.

    Raises:
        TypeError: a type that is not an ``nn.Module`` subclass, or a rule whose
            signature is not ``(module, inputs, grad_output[, kwargs])``.
        ValueError: ``token_local`` not ``False``, ``True`` or ``"padded"``.
    """
    _check_types(module_types)
    mode = _token_local_mode(token_local)

    def decorator(fn: Rule) -> Rule:
        kw = _takes_kwargs(fn, f"the rule registered for {module_types[0].__name__}")
        name = getattr(fn, "__name__", repr(fn))
        for t in module_types:
            RULES[t] = fn
            _SPECS[t] = RuleSpec(
                fn, bool(verify), kw, f"rule {name!r} registered for {t.__name__}", mode
            )
        _version[0] += 1
        return fn

    return decorator


def register_structural_rule(
    match: Callable[[nn.Module], bool],
    rule: Rule,
    *,
    name: str | None = None,
    token_local: bool | str = False,
) -> Rule:
    """Use ``rule`` for every module for which ``match(module)`` is true, checked on first use.

    For layers that many libraries re-implement under their own class names
    (RMSNorm, scaled embeddings, transposed linear layers). ``match`` should look
    at structure (parameter names and shapes, attributes), not at class names
    only. The first call of every matched module replays its forward and compares
    autograd's parameter gradient with the rule (see :func:`register_rule`), so a
    look-alike with a different forward is refused or sent to the fallback, never
    silently wrong. Rules registered later are tried first; exact-type
    registrations (:func:`register_rule`) win over structural ones.
    ``token_local``: as in :func:`register_rule`.

    Raises:
        TypeError: ``match`` not callable, or a rule with a bad signature.
        ValueError: ``token_local`` not ``False``, ``True`` or ``"padded"``.
    """
    if not callable(match):
        raise TypeError(f"OPOB: match must be callable, got {type(match).__name__}")
    label = name or getattr(rule, "__name__", repr(rule))
    kw = _takes_kwargs(rule, f"structural rule {label!r}")
    mode = _token_local_mode(token_local)
    STRUCTURAL_RULES.insert(
        0, _Structural(match, RuleSpec(rule, True, kw, f"structural rule {label!r}", mode))
    )
    _version[0] += 1
    return rule


def _builtin(
    *module_types: type[nn.Module], token_local: bool | str = False
) -> Callable[[Rule], Rule]:
    """Register a built-in rule written for ``module_types``' own forward (trusted)."""
    return register_rule(*module_types, verify=False, token_local=token_local)


def _builtin_structural(
    match: Callable[[nn.Module], bool], name: str, token_local: bool | str = False
) -> Callable[[Rule], Rule]:
    mode = _token_local_mode(token_local)

    def decorator(fn: Rule) -> Rule:
        kw = _takes_kwargs(fn, name)
        STRUCTURAL_RULES.append(
            _Structural(match, RuleSpec(fn, True, kw, f"structural rule {name!r}", mode))
        )
        _version[0] += 1
        return fn

    return decorator


def _typed(cls: type[nn.Module]) -> RuleSpec | None:
    """The spec of a rule in :data:`RULES` for exactly ``cls``.

    :data:`RULES` is the source of truth: a function put there directly (not via
    :func:`register_rule`) is used too, trusted as before this registry had specs.
    """
    fn = RULES.get(cls)
    if fn is None:
        return None
    spec = _SPECS.get(cls)
    if spec is not None and spec.fn is fn:
        return spec
    try:
        kw = _takes_kwargs(fn, f"the rule in RULES for {cls.__name__}")
    except TypeError:
        kw = False
    name = getattr(fn, "__name__", repr(fn))
    return RuleSpec(fn, False, kw, f"rule {name!r} set in RULES for {cls.__name__}")


def _resolve(module: nn.Module) -> tuple[RuleSpec | None, type[nn.Module] | None]:
    """The spec and the class in :data:`RULES` it came from (``None`` for a structural rule)."""
    cls = type(module)
    replaced = instance_forward(module) is not None
    spec = _typed(cls)
    if spec is not None:
        if replaced and not spec.verify:
            spec = replace(
                spec,
                verify=True,
                source=f"{spec.source}, on a module whose forward is replaced on the instance",
            )
        return spec, cls
    for s in STRUCTURAL_RULES:
        try:
            ok = bool(s.match(module))
        except Exception:  # a matcher must never break attaching OPOB: no match
            ok = False
        if ok:
            return s.spec, None
    for base in cls.__mro__[1:]:
        spec = _typed(base)
        if spec is None:
            continue
        same_forward = not replaced and getattr(cls, "forward", None) is getattr(
            base, "forward", None
        )
        return replace(
            spec,
            verify=spec.verify or not same_forward,
            source=f"{spec.source} (inherited by {cls.__name__}"
            + ("" if same_forward else ", which overrides forward")
            + ")",
        ), base
    return None, None


def _still_valid(module: nn.Module, spec: RuleSpec | None, origin: type[nn.Module] | None) -> bool:
    """A cached resolution holds unless :data:`RULES` was changed directly since."""
    cls = type(module)
    if origin is not None:
        return (
            spec is not None
            and RULES.get(origin) is spec.fn
            and (origin is cls or cls not in RULES)
        )
    if cls in RULES:
        return False
    return spec is not None or not any(b in RULES for b in cls.__mro__[1:])


def resolve_rule(module: nn.Module) -> RuleSpec | None:
    """The :class:`RuleSpec` OPOB uses for ``module`` (see the module docstring), or ``None``."""
    hit = _resolved.get(module)
    fwd = instance_forward(module)
    if (
        hit is not None
        and hit[0] == _version[0]
        and hit[3] is fwd
        and _still_valid(module, hit[1], hit[2])
    ):
        return hit[1]
    spec, origin = _resolve(module)
    _resolved[module] = (_version[0], spec, origin, fwd)
    return spec


@contextmanager
def structural_rules_disabled() -> Iterator[None]:
    """Within the block, OPOB objects created see no structural rules (benchmarks, debugging).

    Modules then covered only by a structural rule are uncovered: refused with
    ``strict=True``, handled by the exact vmap fallback with ``strict=False``.
    """
    saved = list(STRUCTURAL_RULES)
    STRUCTURAL_RULES.clear()
    _version[0] += 1
    try:
        yield
    finally:
        STRUCTURAL_RULES[:] = saved
        _version[0] += 1


def is_token_local(module: nn.Module) -> str | None:
    """How a packed record of ``module`` reaches its rule: ``"tokens"``, ``"padded"``, or
    ``None`` (no rule, or not token-local: refused in packed batches)."""
    spec = resolve_rule(module)
    return None if spec is None else spec.token_local


def get_rule(module: nn.Module) -> Rule | None:
    """The rule function OPOB uses for ``module`` (see :func:`resolve_rule`), or ``None``."""
    spec = resolve_rule(module)
    return None if spec is None else spec.fn


# ---------------------------------------------------------------------------------- replays

_local = threading.local()


def replaying() -> bool:
    """True while a rule check or the fallback replays a module: OPOB records nothing then."""
    return getattr(_local, "depth", 0) > 0


@contextmanager
def replay_guard() -> Iterator[None]:
    """Mark a replay of a module's forward (nothing is recorded by any OPOB meanwhile)."""
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


# ---------------------------------------------------------------------------------- messages


def uncovered_message(uncovered: list[tuple[str, nn.Module, list[str]]], limit: int = 6) -> str:
    """The strict-mode refusal: uncovered module classes with counts, then a few parameter names.

    ``uncovered``: ``(module name, module, [its uncovered parameter names])``.
    """
    counts = Counter(type(m) for _, m, _ in uncovered)
    classes = ", ".join(f"{c.__name__} x{n} ({c.__module__})" for c, n in counts.most_common())
    names = [f"{mn}.{p}" if mn else p for mn, _, ps in uncovered for p in ps]
    shown = ", ".join(names[:limit]) + (
        f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    )
    return (
        f"OPOB: no per-sample gradient rule covers {len(names)} trainable parameter(s) in "
        f"{len(uncovered)} module(s) of these classes: {classes}. Parameters: {shown}. Register a "
        "rule for these classes (vcpo_optim.opob.register_rule, or register_structural_rule to "
        "match by structure), freeze them, or pass strict=False to use the exact (slower) "
        "torch.func fallback for their modules."
    )
