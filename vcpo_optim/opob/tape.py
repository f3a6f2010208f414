"""The tape: what each hooked module saw in the forward pass.

A forward hook on every module that owns trainable parameters appends one
:class:`Use` per call: the (detached) inputs the rule or the fallback needs,
the gradient edges of the module's outputs (where the single autograd pass of
:mod:`vcpo_optim.opob.step` stops to collect the output gradients), and what
is needed to validate the record before it is used. The tape knows nothing
about norms or baselines; :mod:`vcpo_optim.opob.step` consumes it.

Checks that belong to the record itself live here:

* :meth:`Tape.validate`: dimension 0 of every record is the sample (``B``),
  and no watched output view was modified in place after the forward;
* :meth:`Tape.audit`: every tracked parameter that reaches the loss does so
  through a recorded use of a module that owns it (no ``F.linear(h,
  emb.weight)`` behind OPOB's back), and no trainable parameter unknown to OPOB
  reaches the loss.

Extension points (not implemented yet):

* packed batches (``cu_seqlens``): a record then holds ``[1, N, ...]`` tokens;
  the rule's per-token factors are summed per segment (the sample) before the
  engine, so :meth:`Tape.validate` checks the token count against
  ``cu_seqlens[-1]`` instead of dimension 0 against ``B``;
* activation-checkpoint recomputation: instead of holding the first forward's
  inputs, a record of a checkpointed module can be completed while the
  backward recomputes it (the hooks fire again while the tape is
  :attr:`Tape.paused` today); the record then keeps only its edges.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

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


class Tape:
    """The records of the hooked modules since the last backward call.

    :attr:`paused` stops recording (OPOB's own autograd pass and fallback
    replays run module forwards that must not be recorded); :attr:`attached`
    is ``False`` once the owner detached.
    """

    def __init__(self) -> None:
        self.uses: list[Use] = []
        self.paused = False
        self.attached = True

    def __len__(self) -> int:
        return len(self.uses)

    def __iter__(self) -> Any:
        return iter(self.uses)

    def __bool__(self) -> bool:
        return bool(self.uses)

    def clear(self) -> None:
        """Drop every record (and with it every activation the tape holds)."""
        self.uses.clear()

    def recording(self, module: nn.Module) -> bool:
        return self.attached and not self.paused and module.training and torch.is_grad_enabled()

    # ------------------------------------------------------------------ hooks

    def bn_check(self, name: str) -> Callable[..., None]:
        """Forward pre-hook that refuses a BatchNorm module used in training mode."""

        def check(module: nn.Module, args: Any) -> None:
            if self.recording(module):
                raise ValueError(
                    f"OPOB: BatchNorm module '{name}' is in training mode; it mixes samples through batch "
                    "statistics, so per-sample gradients are undefined. Use GroupNorm/LayerNorm or "
                    "module.eval() with frozen parameters."
                )

        return check

    def hook(self, name: str, is_rule: bool, recurse: bool = False) -> Callable[..., None]:
        """Forward hook (``with_kwargs=True``) recording one :class:`Use` per call.

        ``is_rule``: the module has a per-sample rule (only its first positional
        tensor input is saved); otherwise the fallback replays the module and every
        argument is saved. ``recurse``: a fallback unit (all parameters of its subtree).
        """

        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> None:
            if not self.recording(module):
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
            self.uses.append(
                Use(
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

    # ------------------------------------------------------------------ checks

    def validate(self, b: int, require_records: bool = True) -> None:
        """Every record belongs to this batch of ``b`` samples and is unchanged since the forward.

        ``require_records``: an empty tape is an error (a rank without samples
        under a process group may have run no forward).
        """
        if not self.uses and require_records:
            raise ValueError(
                "OPOB: no forward pass was recorded since the last backward (is the model in training "
                "mode with grad enabled, and was the forward run after attaching OPOB?)"
            )
        for u in self.uses:
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
