"""Activation checkpointing under OPOB: record what the recomputation sees, in two passes.

Non-reentrant ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``
(what ``transformers``' ``gradient_checkpointing_enable()`` uses) frees a
region's activations after its forward and recomputes them in the backward.
OPOB's per-sample rules need each hooked module's input, so holding the first
forward's inputs on the tape would keep every activation checkpointing meant
to free. Instead:

* **Recording** (:mod:`vcpo_optim.opob.tape`): a module called inside a
  checkpoint region (:func:`region` says ``"forward"``) is recorded without
  its input: only the module, its output edge, shapes and its place in the
  region (the region's frame and the call's ordinal among the hooked calls of
  that region). A call that saved nothing for the backward is held as before
  (the recomputation stops early, after the last saved tensor, and may never
  reach it).
* **Pass 1, norms** (:func:`factor_pass`): one ``torch.autograd.grad`` with
  ``retain_graph=True`` that, like the single pass, forms no parameter
  gradient. While it recomputes a region, a forward pre-hook (:func:`region`
  says ``"recompute"``) captures each deferred call's input, matched by
  (frame, ordinal); a post-hook on each recorded output's autograd node
  receives the output gradient as soon as it is formed. The record's factors,
  and, once every use of a parameter has arrived, its per-sample norms are
  computed right there and the factors freed. Only parameters used several
  times (a tied embedding and LM head, a module called twice) keep factors
  until their last use arrives (the cross terms need them), a tied head only
  as its rows at the embedding's token ids.
* **Pass 2, the gradient**: after the baselines, the same pass again (another
  recomputation, the inputs captured again) writes each record's share of
  ``sum_i c_i grad l_i`` (for ``scope="batch"``: of ``sum_i r_i grad l_i`` and
  ``sum_i q_i grad l_i``) from its factors as they arrive, into one
  parameter-sized sum per coefficient vector: the engine's weighted sums, as in
  the single pass, not a backward weighted by ``c`` (which would differ where
  a model rounds inside, e.g. a float32 softmax in a float64 model).

Cost: one more backward and one more recomputation than the single pass;
memory: that of plain checkpointed training plus the factors of the layer in
flight (and those of multiply-used parameters), plus what the retained graph
holds between the two passes outside the regions (the saved tensors of the
loss head, e.g. a ``[B, T, V]`` log-softmax, which plain training frees once
the backward has passed it).

Regions that cannot be recomputed twice identically (:attr:`Region.twice`: a
``context_fn`` such as selective activation checkpointing, whose saved outputs
serve one backward only, or ``preserve_rng_state=False``) are held, and a
forward with such regions is consumed by the single pass (mixing them with
deferred ones is refused).

Detection reads ``torch.utils.checkpoint``'s saved-tensor hooks (the
``_checkpoint_hook`` / ``_recomputation_hook`` pack functions and their
``_CheckpointFrame``), which are private: :func:`supported` checks once per
process, on a tiny checkpointed function, that this torch behaves as expected;
where it does not, OPOB holds the inputs as before (exact, without the memory
saving).
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "REENTRANT",
    "Region",
    "SumWork",
    "factor_pass",
    "find_reentrant",
    "region",
    "supported",
]


@dataclass(frozen=True)
class Region:
    """Where a module call runs: a checkpoint region's first forward, or its recomputation."""

    kind: str  # "forward" | "recompute"
    frame: Any  # torch.utils.checkpoint._CheckpointFrame
    gid: Any = None  # recomputation: the graph task it serves

    @property
    def twice(self) -> bool:
        """Whether the region can be recomputed twice, identically.

        Not with a ``context_fn`` (selective activation checkpointing keeps some
        outputs for one backward only) or ``preserve_rng_state=False`` (random
        ops would draw new numbers in each recomputation).
        """
        known = _TWICE.get(self.frame)
        if known is None:
            env = _closure(self.frame.recompute_fn)
            ctx, rng = env.get("recompute_context"), env.get("preserve_rng_state")
            known = _TWICE[self.frame] = isinstance(ctx, contextlib.nullcontext) and rng is True
        return known


_TWICE: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _codes() -> tuple[Any, Any, type | None]:
    """The code objects of checkpoint's two pack hooks and the frame class (None if absent)."""
    try:
        from torch.utils import checkpoint as ck

        def nested(cls: Any) -> Any:
            consts = cls.__init__.__code__.co_consts
            found = [c for c in consts if inspect.iscode(c) and c.co_name == "pack_hook"]
            return found[0] if len(found) == 1 else None

        return nested(ck._checkpoint_hook), nested(ck._recomputation_hook), ck._CheckpointFrame
    except Exception:  # pragma: no cover - a torch without these internals
        return None, None, None


_FWD_CODE, _REC_CODE, _FRAME = _codes()


def _closure(fn: Any) -> dict[str, Any]:
    """The variables a nested function closes over (empty cells left out)."""
    f = inspect.unwrap(fn)  # the recomputation hook is wrapped by torch._dynamo.disable
    out = {}
    for n, c in zip(f.__code__.co_freevars, f.__closure__ or ()):
        try:
            out[n] = c.cell_contents
        except ValueError:  # an empty cell
            continue
    return out


def _top_hooks() -> Any:
    return torch._C._autograd._top_saved_tensors_default_hooks(True)


def region() -> Region | None:
    """The non-reentrant checkpoint region the caller runs in, or ``None``.

    ``None`` also when the innermost saved-tensor hook is anything else (e.g.
    ``save_on_cpu`` inside a region, or a torch whose internals differ): then
    nothing is deferred.
    """
    try:
        hooks = _top_hooks()
        if hooks is None or _FRAME is None:
            return None
        f = inspect.unwrap(hooks[0])
        code = getattr(f, "__code__", None)
        if code is _FWD_CODE:
            frame = _closure(f).get("frame")
            if isinstance(frame, _FRAME) and isinstance(getattr(frame, "weak_holders", None), list):
                return Region("forward", frame)
        elif code is _REC_CODE:
            env = _closure(f)
            ref = env.get("target_frame_ref")
            frame = ref() if isinstance(ref, weakref.ReferenceType) else None
            if isinstance(frame, _FRAME):
                return Region("recompute", frame, env.get("gid"))
    except Exception:
        return None
    return None


def hooks_active() -> bool:
    """Whether some saved-tensor hook (checkpointing, offloading, ...) is active."""
    try:
        return _top_hooks() is not None
    except Exception:
        return False


def saved_count(frame: Any) -> int:
    """Tensors saved for the backward so far in the region's first forward."""
    return len(frame.weak_holders)


_SUPPORTED: list[bool] = []


def supported() -> bool:
    """Whether this torch's non-reentrant checkpointing is recognised (checked once per process).

    Runs a two-element checkpointed function forward and backward and checks
    that :func:`region` sees the same frame as ``"forward"`` in the forward and
    as ``"recompute"`` in the backward, and that the frame counts saved tensors.
    """
    if not _SUPPORTED:
        _SUPPORTED.append(_probe())
    return _SUPPORTED[0]


def _probe() -> bool:
    if _FWD_CODE is None or _REC_CODE is None or _FRAME is None:
        return False
    try:
        from torch.utils.checkpoint import checkpoint

        seen: list[tuple[Region | None, int]] = []

        def fn(t: Tensor) -> Tensor:
            reg = region()
            seen.append((reg, -1 if reg is None else saved_count(reg.frame)))
            return (t * t).sum()

        with torch.inference_mode(False), torch.enable_grad():
            x = torch.ones(2, dtype=torch.float32, device="cpu", requires_grad=True)
            y = checkpoint(fn, x, use_reentrant=False)
            after = [] if not seen or seen[0][0] is None else [saved_count(seen[0][0].frame)]
            (g,) = torch.autograd.grad(y, x)
        if len(seen) != 2 or not after:
            return False
        (fwd, n0), (rec, _) = seen
        return (
            fwd is not None
            and rec is not None
            and fwd.kind == "forward"
            and rec.kind == "recompute"
            and fwd.frame is rec.frame
            and after[0] > n0
            and fwd.twice
            and bool(torch.equal(g, 2 * x.detach()))
        )
    except Exception:
        return False


#: The refusal of reentrant checkpointing (``torch.utils.checkpoint(..., use_reentrant=True)``).
REENTRANT = (
    "OPOB: reentrant activation checkpointing (torch.utils.checkpoint with use_reentrant=True) "
    "runs the checkpointed forward without recording it and its own backward inside OPOB's, "
    "writing plain gradients OPOB cannot see. Use non-reentrant checkpointing: with "
    "transformers, model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
    '{"use_reentrant": False}) (the default since transformers 5); with torch, '
    "torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False). Nothing was changed."
)


def is_reentrant_node(node: Any) -> bool:
    """The backward node of a reentrant checkpoint region."""
    return type(node).__name__ == "CheckpointFunctionBackward"


def find_reentrant(loss: Tensor) -> bool:
    """Whether the graph of ``loss`` holds a reentrant checkpoint region."""
    stack = [loss.grad_fn] if loss.grad_fn is not None else []
    seen: set[int] = set()
    keep: list[Any] = []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        keep.append(node)
        if is_reentrant_node(node):
            return True
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return False


# ----------------------------------------------------------------------------- pass 1


def _plan(loss: Tensor, nodes: dict[int, Any]) -> tuple[set[int], set[int]]:
    """Which recorded output nodes the loss reaches, and which of those have another below them.

    ``nodes``: id -> autograd node of every recorded output edge. A node with
    another recorded node below it is executed by a backward that captures the
    lowest ones (its post-hook fires); the lowest ones are only captured.
    """
    root = loss.grad_fn
    if root is None:
        return set(), set()
    keep: list[Any] = []  # hold the node wrappers so that their ids stay unique during the walk
    below: dict[int, bool] = {}
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            below[key] = any(
                id(n) in nodes or below.get(id(n), False)
                for n, _ in node.next_functions
                if n is not None
            )
            continue
        if key in below:
            continue
        below[key] = False  # visiting (the graph is acyclic)
        keep.append(node)
        stack.append((node, True))
        for n, _ in node.next_functions:
            if n is not None and id(n) not in below:
                stack.append((n, False))
    reached = {k for k in nodes if k in below}
    return reached, {k for k in reached if below[k]}


@dataclass
class _State:
    """Pass-1 bookkeeping of one record."""

    grads: list[Tensor | None] = field(default_factory=list)
    has_grad: bool = False
    done: bool = False


def factor_pass(
    tape: Any,
    loss: Tensor,
    params: dict[int, Tensor],
    owned: dict[int, set[int]],
    autograd: Callable[[list[Any]], tuple[Tensor | None, ...]],
    consume: Callable[[Any, list[Tensor | None]], None],
) -> None:
    """One backward that hands every record's output gradients to ``consume`` as soon as they and its input exist.

    ``autograd(inputs)`` runs ``torch.autograd.grad(loss.sum(), inputs)`` with
    OPOB's checks (the tape paused; the graph retained but for the last pass).
    Records whose output node another record's node lies below get a node
    post-hook; the lowest ones are captured (their edges are ``inputs``),
    except deferred ones, whose parameters are ``inputs`` instead, so that their
    node runs (and unpacking its saved tensors triggers the recomputation that
    captures their input). Records the loss does not reach are never handed over
    (their gradient is zero). ``consume(use, grads)`` is called once per reached
    record, outside any recomputation; it drops a deferred record's input.
    """
    uses = list(tape)
    for u in uses:
        if u.deferred:  # captured again from this pass's recomputation
            u.args, u.kwargs, u.captured = (), {}, False
    nodes: dict[int, Any] = {}
    for u in uses:
        for e in u.edges:
            if e.node is not None:
                nodes[id(e.node)] = e.node
    reached, inner = _plan(loss, nodes)
    state = {id(u): _State() for u in uses}
    by_node: dict[int, list[tuple[Any, int]]] = {}
    captured: list[Any] = []
    inputs: list[Any] = []
    for u in uses:
        keys = [id(e.node) for e in u.edges if e.node is not None]
        if not any(k in reached for k in keys):
            continue
        single = u.rule and len(u.edges) == 1 and not hasattr(u.edges[0].node, "variable")
        if single and (keys[0] in inner or u.deferred):
            by_node.setdefault(keys[0], []).append((u, u.edges[0].output_nr))
            if keys[0] not in inner:  # the lowest node of a deferred record: make it run
                inputs += [params[p] for p in sorted(owned.get(id(u.module), ())) if p in params]
        else:
            captured.append(u)
    n_forced = len(inputs)
    for u in captured:
        inputs += list(u.edges)

    ready: list[Any] = []

    def give(u: Any) -> None:
        st = state[id(u)]
        if st.done:
            return
        st.done = True
        grads, st.grads = st.grads, []
        consume(u, grads)

    def drain() -> None:
        while ready:
            give(ready.pop())

    def on_capture(u: Any) -> None:  # called by the tape's capture hook, inside the recomputation
        if state.get(id(u)) is not None and state[id(u)].has_grad:
            ready.append(u)  # consumed after the recomputation, never inside it

    def node_hook(entries: list[tuple[Any, int]]) -> Callable[..., None]:
        def hook(grad_inputs: Any, grad_outputs: Any) -> None:
            for u, nr in entries:
                st = state[id(u)]
                st.grads, st.has_grad = [grad_outputs[nr]], True
                if not u.deferred or u.captured or grad_outputs[nr] is None:
                    give(u)
            drain()

        return hook

    handles = [nodes[k].register_hook(node_hook(v)) for k, v in by_node.items()]
    tape.begin_capture(on_capture)
    try:
        grads = autograd(inputs) if inputs else ()
        drain()
        pos = n_forced
        for u in captured:
            st = state[id(u)]
            st.grads = list(grads[pos : pos + len(u.edges)])
            pos += len(u.edges)
            give(u)
        del grads
    finally:
        tape.end_capture()
        for h in handles:
            h.remove()
    missing = [u for u in uses if state[id(u)].has_grad and not state[id(u)].done]
    if missing:
        u = missing[0]
        raise ValueError(
            f"OPOB: the activation-checkpoint recomputation did not re-run module '{u.name}' "
            f"({type(u.module).__name__}) while its output gradient was formed, so its input "
            "(not held, to save memory) is unknown. The checkpointed function must run the same "
            "modules when recomputed; otherwise pass OPOB(..., checkpointing=False) to hold the "
            "inputs of checkpointed modules. Nothing was changed."
        )


# ----------------------------------------------------------------------------- pass 2


class SumWork:
    """A parameter's weighted sums formed by pass 2 (the ``ParamWork`` interface of ``Step._write``).

    ``sums`` maps the identity of each coefficient vector to ``sum_i c_i G_i``.
    """

    strategy = "sums"

    def __init__(self, param: Tensor, sums: dict[int, Tensor]) -> None:
        self.param = param
        self.sums = sums

    def weighted_sum(self, coeff: Tensor) -> Tensor:
        return self.sums[id(coeff)]

    def release(self) -> None:
        self.sums = {}
