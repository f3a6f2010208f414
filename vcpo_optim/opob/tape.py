"""The tape: what each hooked module saw in the forward pass.

A forward hook on every module that owns trainable parameters appends one
:class:`Use` per call: the (detached) inputs the rule or the fallback needs,
the gradient edges of the module's outputs (where the single autograd pass of
:mod:`vcpo_optim.opob.step` stops to collect the output gradients), and what
is needed to validate the record before it is used. The tape knows nothing
about norms or baselines; :mod:`vcpo_optim.opob.step` consumes it.

Checks that belong to the record itself live here:

* :meth:`Tape.validate`: dimension 0 of every record is the sample (``B``),
  no saved input was modified in place after the forward (tensor version
  counters, as autograd's "modified by an inplace operation" check), and no
  watched output view was;
* :meth:`Tape.audit`: every tracked parameter that reaches the loss does so
  through a recorded use of a module that owns it (no ``F.linear(h,
  emb.weight)`` behind OPOB's back), and no trainable parameter unknown to OPOB
  reaches the loss.

Hooks and ownership: a module is recorded by at most one OPOB (the registry
:data:`_OWNERS`; a second OPOB on it replaces the first). The hooks check that
the module calling them is one their tape attached to, so a ``copy.deepcopy``
of the model (which copies the hook dicts) records nothing. OPOB's forward hook
must see the module's own output, before any other hook may replace it: it is
registered with ``prepend=True`` and a forward pre-hook keeps it first; global
forward hooks (``register_module_forward_hook``) run before all module hooks,
so while one exists OPOB records from a global hook of its own kept first among
them. Forward pre-hooks that change the inputs need nothing: forward hooks
receive the inputs the forward actually ran on.

Activation checkpointing (:mod:`vcpo_optim.opob.recompute`): a call inside a
non-reentrant checkpoint region is recorded without its input (``deferred``),
keyed by the region's frame and the call's ordinal among the hooked calls of
the region (counted by the first forward pre-hook); while OPOB's norm pass
recomputes the region, a forward pre-hook kept last among the module's
pre-hooks (so that it sees the arguments the forward runs on) captures the
input of the matching record (:meth:`Tape.begin_capture`).

Packed batches (``cu_seqlens``): a record then holds ``[1, N, ...]`` or
``[N, ...]`` tokens; :meth:`Tape.validate` skips its dimension-0 check and
:func:`vcpo_optim.opob.packing.plan` checks the packed layout instead, from
:attr:`Use.in_shape` (a deferred record has no input yet).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.nn.modules import module as _module

from . import recompute
from .distributed import local
from .rules import autocast_state, replaying

__all__ = ["BATCHNORM_TYPES", "Tape", "Use"]

BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)


@dataclass
class Use:
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
    versions: list[int] = field(default_factory=list)  # of the saved tensors, at record time
    # inside a checkpoint region: the input is captured from the recomputation, not held
    deferred: bool = False
    captured: bool = False  # a deferred input arrived (norm pass)
    frame: Any = None  # weakref to the region's torch.utils.checkpoint frame
    ordinal: int = -1  # this call's place among the hooked calls of the region
    amp: Any = None  # autocast state of the call, for replays (rules.autocast_state)
    in_shape: tuple[int, ...] | None = None  # of the first tensor input (packed layout check)


def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, Tensor) else x


def _reachable(loss: Tensor) -> set[int]:
    """ids of the autograd nodes reachable from ``loss`` (the nodes its backward can run)."""
    seen: set[int] = set()
    keep: list[Any] = []  # hold the node wrappers so that their ids stay unique during the walk
    stack = [loss.grad_fn] if loss.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        keep.append(node)
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return seen


def _save_inputs(
    is_rule: bool, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """What a record keeps of a call's arguments: all of them, as called (tensors detached).

    A rule gets the tensor ones (positional first, then keyword in call order) and may
    take the keyword ones (PEFT's DoRA magnitude gets its ``lora_A``, ``lora_B``,
    ``base_layer``); a rule that does not fit its module falls back to the vmap
    replay, which needs the call as made.
    """
    del is_rule
    return tuple(_detach(a) for a in args), {k: _detach(v) for k, v in kwargs.items()}


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


@dataclass(frozen=True)
class _Spec:
    """How a module attached to a tape is recorded."""

    name: str
    is_rule: bool  # a per-sample rule covers it (else the vmap fallback)
    recurse: bool  # a fallback unit: all parameters of its subtree


#: Module -> the tape recording it (at most one; weak keys: models are never kept alive).
_OWNERS: weakref.WeakKeyDictionary[nn.Module, Tape] = weakref.WeakKeyDictionary()
#: Tapes currently attached (the global hook is kept while one of them is).
_ATTACHED: weakref.WeakSet[Tape] = weakref.WeakSet()
_GLOBAL: dict[str, Any] = {"handle": None}


def owner(module: nn.Module) -> Tape | None:
    """The attached tape recording ``module``, if any."""
    tape = _OWNERS.get(module)
    return tape if tape is not None and tape.attached else None


def _global_hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
    tape = _OWNERS.get(module)
    if tape is not None:
        tape._post(module, args, kwargs, output, via_global=True)


def _global_first() -> None:
    """Install OPOB's global forward hook (once) and keep it first among the global hooks."""
    hooks = _module._global_forward_hooks
    h = _GLOBAL["handle"]
    if h is None or h.id not in hooks:
        h = _GLOBAL["handle"] = _module.register_module_forward_hook(_global_hook, with_kwargs=True)
    if next(iter(hooks)) != h.id:
        hooks.move_to_end(h.id, last=False)


def _foreign_global_hooks() -> bool:
    h = _GLOBAL["handle"]
    mine = None if h is None else h.id
    return any(k != mine for k in _module._global_forward_hooks)


class Tape:
    """The records of the hooked modules since the last backward call, and the hooks making them.

    :attr:`paused` stops recording (OPOB's own autograd pass and fallback
    replays run module forwards that must not be recorded); :attr:`attached`
    is ``False`` once the owner detached. :attr:`defer` (set by the owner):
    record calls inside checkpoint regions without their input;
    :attr:`hold_reason`: why not, warned once when a region is seen anyway.
    """

    def __init__(self, description: str = "an OPOB") -> None:
        self.description = description
        self.replaced = False  # detached because another OPOB attached to the same modules
        self.uses: list[Use] = []
        self.paused = False
        self.attached = True
        self.handles: list[Any] = []
        self._specs: weakref.WeakKeyDictionary[nn.Module, _Spec] = weakref.WeakKeyDictionary()
        self._bn: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._first: dict[int, int] = {}  # id(module) -> id of OPOB's forward hook on it
        self._via_global: dict[int, bool] = {}  # id(module) -> the global hook records this call
        self.defer = False
        self.hold_reason = ""
        self._warned = False
        self.once = ""  # why this forward's records must be consumed by a single pass
        self._warned_once = False
        self._last: dict[int, int] = {}  # id(module) -> id of the capture pre-hook (kept last)
        # first forward: id(module) -> stack of (region, ordinal, saved count) from the pre-hook
        self._regions: dict[int, list[tuple[recompute.Region | None, int, int]]] = {}
        self._ordinals: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._deferred: dict[tuple[int, int], Use] = {}  # (id(frame), ordinal) -> record
        self._on_capture: Callable[[Use], None] | None = None
        self._recomputed: dict[tuple[int, Any], int] = {}  # (id(frame), gid) -> calls seen
        _ATTACHED.add(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> Tape:
        # copy.deepcopy(model) copies the hook dicts, and with them the bound methods of
        # this tape: they must stay bound to this tape (which ignores modules it did not
        # attach to), not to a copy that would record the copy's forwards and never free them.
        return self

    def __copy__(self) -> Tape:
        return self

    def __len__(self) -> int:
        return len(self.uses)

    def __iter__(self) -> Any:
        return iter(self.uses)

    def __bool__(self) -> bool:
        return bool(self.uses)

    def clear(self) -> None:
        """Drop every record (and with it every activation the tape holds)."""
        self.uses.clear()
        self._deferred.clear()
        self._regions.clear()
        self.once = ""

    @property
    def deferred(self) -> bool:
        """Whether some record's input is to be captured from a checkpoint recomputation."""
        return bool(self._deferred)

    def begin_capture(self, on_capture: Callable[[Use], None]) -> None:
        """Capture deferred inputs from the recomputations of the backward that follows."""
        self._on_capture = on_capture
        self._recomputed.clear()

    def end_capture(self) -> None:
        self._on_capture = None
        self._recomputed.clear()

    def recording(self, module: nn.Module) -> bool:
        return (
            self.attached
            and not self.paused
            and module.training
            and torch.is_grad_enabled()
            and not replaying()  # a rule check or the fallback replays a module
        )

    # ------------------------------------------------------------------ hooks

    def attach(self, name: str, module: nn.Module, is_rule: bool, recurse: bool = False) -> None:
        """Record every call of ``module`` (a rule module, a fallback module or a fallback unit)."""
        self._specs[module] = _Spec(name, is_rule, recurse)
        _OWNERS[module] = self
        self.handles.append(module.register_forward_pre_hook(self._pre, prepend=True))
        h = module.register_forward_hook(self._post_module, with_kwargs=True, prepend=True)
        self._first[id(module)] = h.id
        self.handles.append(h)

    def attach_bn_check(self, name: str, module: nn.Module) -> None:
        """Refuse the module (a BatchNorm) if it is called in training mode while recording."""
        self._bn.add(module)

        def check(mod: nn.Module, args: Any) -> None:
            if mod in self._bn and self.recording(mod):
                raise ValueError(
                    f"OPOB: BatchNorm module '{name}' is in training mode; it mixes samples through batch "
                    "statistics, so per-sample gradients are undefined. Use GroupNorm/LayerNorm or "
                    "module.eval() with frozen parameters."
                )

        self.handles.append(module.register_forward_pre_hook(check))

    def describe(self) -> str:
        return self.description

    def detach(self, replaced: bool = False) -> None:
        """Remove every hook and record (idempotent)."""
        self.replaced = self.replaced or replaced
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.uses.clear()
        self.attached = False
        for m, t in list(_OWNERS.items()):
            if t is self:
                del _OWNERS[m]
        _ATTACHED.discard(self)
        h = _GLOBAL["handle"]
        if h is not None and not _ATTACHED:
            h.remove()
            _GLOBAL["handle"] = None

    def _pre(self, module: nn.Module, args: Any) -> None:
        """Before the forward: make sure OPOB's forward hook will see the module's own output."""
        if module not in self._specs or not self.recording(module):
            return  # e.g. a deepcopy of an attached module: its copied hooks are not ours
        hooks = module._forward_hooks
        hid = self._first[id(module)]
        if hid in hooks and next(iter(hooks)) != hid:
            hooks.move_to_end(hid, last=False)  # a hook prepended after OPOB's runs after it
        via_global = _foreign_global_hooks()
        if via_global:
            _global_first()
        self._via_global[id(module)] = via_global
        pre = module._forward_pre_hooks
        cid = self._last.get(id(module))
        if cid in pre and next(reversed(pre)) != cid:
            pre.move_to_end(cid)  # the capture hook must see the arguments the forward runs on
        if self.defer:
            reg = recompute.region()
            if reg is not None and reg.kind == "forward" and not reg.twice:
                # recomputed once only (selective checkpointing) or not reproducibly: held,
                # and the call must then be a single pass
                if not self.once:
                    self.once = (
                        f"module '{self._specs[module].name}' runs in a checkpoint region with a "
                        "context_fn (selective activation checkpointing) or preserve_rng_state="
                        "False, which OPOB cannot recompute twice"
                    )
                    if not self._warned_once:
                        self._warned_once = True
                        warnings.warn(
                            f"OPOB: {self.once}: the inputs of the modules of such regions are "
                            "held until the backward (exact, but their activation memory is not "
                            "saved under OPOB).",
                            UserWarning,
                            stacklevel=3,
                        )
            elif reg is not None and reg.kind == "forward":
                k = self._ordinals.get(reg.frame, 0)
                self._ordinals[reg.frame] = k + 1
                stack = self._regions.setdefault(id(module), [])
                stack.append((reg, k, recompute.saved_count(reg.frame)))
                if cid is None:  # every call counted here is counted in the recomputation
                    c = module.register_forward_pre_hook(self._capture, with_kwargs=True)
                    self._last[id(module)] = c.id
                    self.handles.append(c)
        elif self.hold_reason and not self._warned and recompute.hooks_active():
            self._warned = True
            warnings.warn(self.hold_reason, UserWarning, stacklevel=3)

    def _capture(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        """Forward pre-hook: the input of a deferred record, from the norm pass's recomputation."""
        on_capture = self._on_capture
        if (
            on_capture is None
            or replaying()  # a rule check replays a module: not the recomputation
            or module not in self._specs
            or not module.training
            or not torch.is_grad_enabled()
        ):
            return
        reg = recompute.region()
        if reg is None or reg.kind != "recompute":
            return
        key = (id(reg.frame), reg.gid)
        k = self._recomputed.get(key, 0)
        self._recomputed[key] = k + 1
        u = self._deferred.get((id(reg.frame), k))
        if u is None or u.frame() is not reg.frame or u.captured:
            return
        if u.module is not module:
            raise ValueError(
                f"OPOB: the activation-checkpoint recomputation called module "
                f"'{self._specs[module].name}' where the forward called '{u.name}': the "
                "checkpointed function ran different modules the second time (it must be "
                "deterministic). Nothing was changed."
            )
        u.args, u.kwargs = _save_inputs(u.rule, args, kwargs)
        u.captured = True
        on_capture(u)

    def _post_module(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        self._post(module, args, kwargs, output, via_global=False)

    def _post(
        self, module: nn.Module, args: Any, kwargs: Any, output: Any, via_global: bool
    ) -> None:
        """Record one call (from the first forward hook to run: OPOB's global or module hook)."""
        spec = self._specs.get(module)
        if spec is None or not self.recording(module):
            return
        if self._via_global.get(id(module), False) != via_global:
            return  # the other of OPOB's two hooks records this call
        self._record(spec, module, args, kwargs, output)

    def _record(
        self,
        spec: _Spec,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
    ) -> None:
        name = spec.name
        stack = self._regions.get(id(module))
        entry = stack.pop() if stack else None
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
                shapes.append(local(o).shape)  # a TP module's own output is a DTensor
                index.append(j)
                watched += w
        if not edges:
            return
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        stops = [get_gradient_edge(t).node for t in tensors if t.requires_grad]
        custom = getattr(module, "opob_inputs", None) if spec.is_rule else None
        if custom is not None:  # the module says what its rule needs (TokenLogProbs)
            saved_args: tuple[Any, ...] = tuple(_detach(a) for a in custom(args, kwargs, output))
            saved_kwargs: dict[str, Any] = {}
            first_in = saved_args[0]
            batch = first_in.shape[0] if first_in.dim() > 0 else -1
        else:
            saved_args, saved_kwargs = _save_inputs(spec.is_rule, args, kwargs)
            if spec.is_rule:
                if not tensors:
                    raise ValueError(f"OPOB: module '{name}' was called without a tensor input")
                batch = tensors[0].shape[0] if tensors[0].dim() > 0 else -1
            else:
                first = outs[index[0]]
                batch = first.shape[0] if first.dim() > 0 else -1
        # Inside a checkpoint region: a rule module that saved tensors for the backward is
        # re-run by the recomputation (which stops after the last saved tensor), so its input
        # is captured there instead of held.
        defer = (
            entry is not None
            and custom is None  # what the module says it needs is not its forward's input
            and spec.is_rule
            and len(edges) == 1
            and not hasattr(edges[0].node, "variable")
            and recompute.saved_count(entry[0].frame) > entry[2]
        )
        first_t = next(
            (a for a in (*saved_args, *saved_kwargs.values()) if isinstance(a, Tensor)), None
        )
        in_shape = tuple(first_t.shape) if first_t is not None else None
        if defer:
            saved_args, saved_kwargs = (), {}
        versions = [
            t._version for t in (*saved_args, *saved_kwargs.values()) if isinstance(t, Tensor)
        ]
        u = Use(
            name,
            module,
            spec.is_rule,
            saved_args,
            saved_kwargs,
            edges,
            shapes,
            index,
            stops,
            batch,
            watched,
            spec.recurse,
            versions,
        )
        u.amp = autocast_state(tensors[0] if tensors else outs[index[0]])
        u.in_shape = in_shape
        if defer:
            assert entry is not None
            u.deferred, u.frame, u.ordinal = True, weakref.ref(entry[0].frame), entry[1]
            self._deferred[(id(entry[0].frame), entry[1])] = u
        self.uses.append(u)

    # ------------------------------------------------------------------ checks

    def validate(
        self,
        b: int,
        require_records: bool = True,
        loss: Tensor | None = None,
        packed: bool = False,
    ) -> None:
        """Every record belongs to this batch of ``b`` samples and is unchanged since the forward.

        ``require_records``: an empty tape is an error (a rank without samples
        under a process group may have run no forward). ``loss``: a record of
        another batch size whose outputs never reach it is dropped, not refused
        (its output gradient is ``None``): PEFT's DoRA calls ``lora_A`` on
        ``eye(in_features)`` and detaches the result. ``packed``: the call is a
        packed batch, whose records hold tokens, not samples (their layout is
        checked, and records that miss the loss dropped, by
        :func:`vcpo_optim.opob.packing.plan`).
        """
        if not self.uses and require_records:
            raise ValueError(
                "OPOB: no forward pass was recorded since the last backward (is the model in training "
                "mode with grad enabled, and was the forward run after attaching OPOB?)"
            )
        reach: set[int] | None = None
        unused: set[int] = set()
        for u in self.uses:
            if u.batch != b and not packed:
                if loss is not None and b > 0:
                    if reach is None:
                        reach = _reachable(loss)
                    if not any(id(e.node) in reach for e in u.edges):
                        unused.add(id(u))
                        continue
                raise ValueError(
                    f"OPOB: module '{u.name}' ({type(u.module).__name__}) was called with an input/output "
                    f"whose dimension 0 is {u.batch}, but per_sample_loss has B={b}. Dimension 0 of every "
                    "hooked module's input must be the sample: an input broadcast over the batch (e.g. "
                    "position ids of shape [1, T]) makes per-sample gradients unrecoverable; expand it to "
                    "[B, ...] (e.g. pos_ids.expand(B, -1)). If this forward belongs to another batch, "
                    "call opob.clear() before the forward you backpropagate."
                )
            saved = [t for t in (*u.args, *u.kwargs.values()) if isinstance(t, Tensor)]
            n_pos = sum(isinstance(a, Tensor) for a in u.args)
            for k, (t, v) in enumerate(zip(saved, u.versions)):
                if t._version != v:
                    where = f"input {k}" if k < n_pos else "a keyword input"
                    raise ValueError(
                        f"OPOB: {where} of module '{u.name}' ({type(u.module).__name__}) was modified "
                        "by an inplace operation after the forward (tensor version "
                        f"{t._version}, {v} when recorded); its per-sample gradient needs the values "
                        "the forward saw. Use an out-of-place op (x = x + f(x) instead of "
                        "x += f(x)), or do not reuse the input buffer before the backward."
                    )
            for t, v in u.watched:
                if t._version != v:
                    raise ValueError(
                        f"OPOB: the output of module '{u.name}' (a view) was modified in place after the "
                        "forward; use an out-of-place op after this module."
                    )
        if unused:
            self.keep([u for u in self.uses if id(u) not in unused])
            if not self.uses and require_records:
                raise ValueError("OPOB: no recorded module call reaches per_sample_loss")

    def keep(self, uses: list[Use]) -> None:
        """Keep only the records ``uses`` (the others never reach the loss)."""
        ids = {id(u) for u in uses}
        self.uses[:] = [u for u in self.uses if id(u) in ids]
        for key, u in list(self._deferred.items()):
            if id(u) not in ids:
                del self._deferred[key]

    def audit(
        self,
        loss: Tensor,
        params: dict[int, Tensor],
        names: dict[int, str],
        owned: dict[int, set[int]],
        model: nn.Module,
    ) -> None:
        """Every tracked parameter reached by the graph must be reached through a recorded use of a module owning it.

        ``params`` / ``names``: the tracked trainable parameters by id; ``owned``: the
        parameter ids each hooked module (by id) covers.
        """
        allowed: dict[int, set[int]] = {}
        keep: list[Any] = []
        for u in self.uses:
            own = owned.get(id(u.module), set())
            stops = {id(s) for s in u.stop_nodes if s is not None}
            stack = [e.node for e in u.edges if e.node is not None]
            seen: set[int] = set()
            while stack:
                node = stack.pop()
                if id(node) in seen or id(node) in stops:
                    continue
                seen.add(id(node))
                keep.append(node)
                allowed.setdefault(id(node), set()).update(own)
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
            if recompute.is_reentrant_node(node):
                raise ValueError(recompute.REENTRANT)
            for nxt, _ in node.next_functions:
                if nxt is None:
                    continue
                var = getattr(nxt, "variable", None)
                if var is not None:
                    if id(var) in params and id(var) not in allowed.get(id(node), ()):
                        bad.add(names[id(var)])
                    elif id(var) not in params and isinstance(var, nn.Parameter):
                        untracked[id(var)] = tuple(var.shape)
                else:
                    stack.append(nxt)
        # FSDP2 / tensor parallelism run the forward on unsharded copies of DTensor parameters.
        if any(type(p).__name__ == "DTensor" for p in params.values()):
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
            ids = {id(p) for p in params.values() if names[id(p)] in bad}
            idle = [
                n or type(m).__name__
                for n, m in model.named_modules()
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

    def localize(self, fn: Callable[[Any], Any]) -> None:
        """Apply ``fn`` to every saved argument (e.g. a ``DTensor`` input -> its local shard)."""
        for u in self.uses:
            u.args = tuple(fn(a) for a in u.args)
            u.kwargs = {k: fn(v) for k, v in u.kwargs.items()}
