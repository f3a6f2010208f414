r"""Packed (padding-free) batches: the samples are segments of one token dimension.

``opob.backward(per_sample_loss, rewards, groups, cu_seqlens=cu)`` takes the
flash-attention varlen / verl convention: the model ran on ``N`` packed tokens
(its hooked modules saw ``[1, N, ...]`` or ``[N, ...]`` inputs) and sample ``i``
is the segment of tokens ``cu[i] <= t < cu[i + 1]``; ``cu`` is ``[B + 1]``,
``cu[0] = 0``, non-decreasing (a zero-length segment is a sample without tokens:
``n_i = 0``), ``cu[B] <= N``. Tokens ``t >= cu[B]`` (padding to a fixed length,
verl's ``pad_size``) belong to no sample; their output gradient must be zero at
every hooked module (it is checked), so they contribute nothing.

One mechanism serves every rule that is *token-local* (position-wise: the
module maps each token on its own, e.g. ``nn.Linear``, ``nn.Embedding``, the
norms over the feature dimension): the rule is called on the **token view** of
the record, ``[N, 1, ...]``, in which every token is a "sample", and its
per-token factors ``F_t`` are summed per segment,

    ``G_i = sum_{cu[i] <= t < cu[i+1]} F_t``,

exactly (:func:`segment`): a :class:`~vcpo_optim.opob.rules.base.Dense` factor
``[N, *shape]`` by ``index_add`` over the segment ids; an
:class:`~vcpo_optim.opob.rules.base.Outer` or
:class:`~vcpo_optim.opob.rules.base.Rows` factor (a sum over tokens already) by
regrouping its tokens, :class:`Segmented`. The norm engine sees a ``Segmented``
factor as the same factor in a zero-padded ``[B, L_max, ...]`` layout (padded
tokens have zero gradient and contribute nothing), but that layout is only ever
built for the samples of one chunk of the engine's work (and not at all for a
chunk of one segment, or of segments of equal length, which are views); the
weighted sum ``sum_i c_i G_i = sum_t c_{seg(t)} F_t`` is written from the
token layout directly. So packing holds no copy of the activations: extra
memory is one chunk's padded buffers, bounded like the engine's other
transient buffers.

Rules registered ``token_local="padded"`` (the lean LM head, whose factor is
not a sum the engine can regroup) get the segments zero-padded to
``[B, L_max, ...]`` instead (one padded copy of that record's inputs).

Modules that mix positions (convolutions over time, ``GroupNorm``, attention
handled by the vmap fallback, any module without a token-local rule) are
refused under ``cu_seqlens``: their per-segment gradients are not recoverable
from per-token factors. A rule that is checked on first use (matched by
structure, inherited by a subclass that overrides ``forward``, or registered
with ``verify=True``) is also checked to be position-wise on its first packed
call (:func:`check_position_wise`).

This module handles the records (layouts, token views, refusals; imported by
:mod:`vcpo_optim.opob.step`); the factors' side is
:mod:`vcpo_optim.opob.segments` (imported by the norm engine).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .rules.base import replay_guard, resolve_rule
from .rules.fallback import replay_autocast
from .rules.verify import TOLERANCE, replay_params
from .segments import Segmented, Segments, pad_tokens, segment, segments

__all__ = [
    "Packed",
    "Segmented",
    "Segments",
    "check_position_wise",
    "plan",
    "segment",
    "segments",
    "token_inputs",
    "token_view",
]


def token_view(t: Any, axis: int, n: int, prefix: tuple[int, ...]) -> Any:
    """A tensor of the packed layout (token axis ``axis`` of size ``n`` after the dimensions
    ``prefix``, e.g. ``[1, N, ...]``, ``[N, ...]`` or a per-head ``[1, H, N, D]``) as
    ``[N, 1, ...]`` (every token a sample); anything else unchanged."""
    if not isinstance(t, Tensor) or t.dim() <= axis or t.shape[axis] != n:
        return t
    if tuple(t.shape[:axis]) != prefix:
        return t
    return t.movedim(axis, 0) if axis else t.unsqueeze(1)


# ----------------------------------------------------------------------------- records


@dataclass
class Packed:
    """A packed call: its segments, the packed token count ``n`` (``>= cu[B]``) and, for every
    kept record, its token axis and the sizes before it (``axes[id(use)]``: ``(1, (1,))`` for
    ``[1, N, ...]``, ``(0, ())`` for ``[N, ...]``, ``(2, (1, H))`` for ``[1, H, N, D]``)."""

    seg: Segments
    n: int
    axes: dict[int, tuple[int, tuple[int, ...]]]


def _in_shape(use: Any) -> tuple[int, ...] | None:
    """Shape of the record's first tensor input (kept by the tape: a record whose input is
    captured later, in a checkpoint recomputation, has none yet)."""
    return use.in_shape


#: what :func:`_axis` says of a record whose token axis is ambiguous
AMBIGUOUS = -1


def _axis(use: Any, n: int) -> int | None:
    """The token axis of a record for ``n`` packed tokens, ``None`` if none fits, or
    :data:`AMBIGUOUS`.

    An axis ``k`` fits when the input and every output have size ``n`` there and the same
    sizes before it, and either ``k = 0`` or dimension 0 is the packed row's 1: ``[N, ...]``,
    ``[1, N, ...]``, ``[1, H, N, D]`` (per-head norms after the heads moved forward). The first
    fitting axis is the token axis; two fitting axes before the last dimension (the packed
    length equal to a head count) are ambiguous. A norm must not normalise over it.
    """
    x = _in_shape(use)
    if not x:
        return None
    shapes = [x, *(tuple(s) for s in use.out_shapes)]
    fits = [
        k
        for k in range(len(x))
        if (k == 0 or x[0] == 1)
        and all(len(s) > k and s[k] == n and s[:k] == x[:k] for s in shapes)
    ]
    if not fits:
        return None
    if n > 1 and sum(k < len(x) - 1 for k in fits) > 1:
        return AMBIGUOUS
    k = fits[0]
    nd = len(getattr(use.module, "normalized_shape", ()) or ())
    if nd and len(x) - nd <= k:
        return None  # a norm over the token dimension mixes tokens
    return k


def _candidates(use: Any) -> set[int]:
    """Token counts a record could hold in the plain layouts (``[N, ...]``, ``[1, N, ...]``)."""
    x = _in_shape(use)
    if not x:
        return set()
    return {x[0], *([x[1]] if len(x) >= 2 and x[0] == 1 else [])}


def _choose(uses: list[Any], n_tokens: int) -> int | None:
    """The largest token count every record fits (``None``: none does)."""
    cands = sorted(set().union(*(_candidates(u) for u in uses)), reverse=True) if uses else []
    for n in cands:
        if n >= n_tokens and all(_axis(u, n) is not None for u in uses):
            return n
    return None


def _describe(use: Any) -> str:
    x = _in_shape(use)
    shape = "no tensor" if x is None else list(x)
    outs = ", ".join(str(list(s)) for s in use.out_shapes)
    return f"'{use.name}' ({type(use.module).__name__}: input {shape} -> output {outs})"


def plan(
    uses: list[Any],
    seg: Segments,
    token_local: Any,
    reachable: Any,
) -> tuple[Packed, list[Any]]:
    """Check the records of a packed call; return the plan and the records to keep.

    ``token_local(use)``: whether the record's module has a token-local rule;
    ``reachable()``: ids of the autograd nodes the loss reaches (called only when
    some record does not fit: a record whose outputs never reach the loss, such
    as PEFT DoRA's ``lora_A(eye)``, is dropped instead of refused).
    """

    def misfits(us: list[Any]) -> tuple[int | None, list[Any], list[Any]]:
        local = [u for u in us if token_local(u)]
        n = _choose(local, seg.n_tokens)
        mixing = [u for u in us if not token_local(u)]
        shaped = [u for u in local if n is None or _axis(u, n) is None]
        return n, mixing, shaped

    n, mixing, shaped = misfits(uses)
    if mixing or shaped:
        reach = reachable()
        bad = {id(u) for u in (*mixing, *shaped)}
        uses = [
            u
            for u in uses
            if id(u) not in bad or any(e.node is not None and id(e.node) in reach for e in u.edges)
        ]
        n, mixing, shaped = misfits(uses)
    if mixing:
        names = ", ".join(_describe(u) for u in mixing[:5])
        raise ValueError(
            f"OPOB: with cu_seqlens (a packed batch) every hooked module must be token-local "
            f"(position-wise, with a rule registered token_local=True), but {names} "
            f"{'is' if len(mixing) == 1 else 'are'} not: a module that mixes positions (a "
            "convolution over time, GroupNorm, attention through the vmap fallback, a module "
            "without a rule) has per-segment gradients that per-token factors cannot recover. "
            "Freeze its parameters, register a token-local rule for it, or run the batch unpacked "
            "([B, T, ...] with padding)."
        )
    if shaped:
        names = "; ".join(_describe(u) for u in shaped[:6])
        counts = sorted(set().union(*(_candidates(u) for u in uses)))
        raise ValueError(
            f"OPOB: with cu_seqlens every hooked module must see the packed tokens, [1, N, ...] or "
            f"[N, ...] (or per head, [1, H, N, ...]) with one N >= cu_seqlens[-1] = "
            f"{seg.n_tokens} for all of them (input and output; a norm must not normalise over the "
            f"token dimension). Token counts seen: {counts[:8]}; modules that do not fit: {names}. "
            "A module that sees one row per sample ([B, ...], e.g. after pooling) cannot be mixed "
            "with packed tokens in one call, and one that sees a subset of the tokens (an LM head "
            "after h[:, :-1] or with logits_to_keep > 0) cannot be mapped to the segments: apply "
            "it to all N tokens (targets torch.roll(ids, -1, -1), each segment's last token "
            "masked in the loss) and select after it."
        )
    axes: dict[int, tuple[int, tuple[int, ...]]] = {}
    if n is not None:
        ambiguous = [u for u in uses if _axis(u, n) == AMBIGUOUS]
        if ambiguous:
            names = "; ".join(_describe(u) for u in ambiguous[:4])
            raise ValueError(
                f"OPOB: the packed token count N = {n} is also the size of another dimension of "
                f"the input of {names}, so its token axis is ambiguous (e.g. N equal to the number "
                "of attention heads). Pad the packed row by a few tokens after cu_seqlens[-1] "
                "(position ids restarting, left out of the loss). Nothing was changed."
            )
        for u in uses:
            k = _axis(u, n)
            assert k is not None and k >= 0
            x = _in_shape(u)
            assert x is not None
            axes[id(u)] = (k, tuple(x[:k]))
    return Packed(seg, -1 if n is None else n, axes), uses


def token_inputs(
    use: Any, grads: list[Tensor | None], packed: Packed, mode: str = "tokens"
) -> tuple[tuple[Any, ...], dict[str, Any], list[Tensor | None]]:
    """A record's inputs and output gradients for its rule.

    ``mode="tokens"``: the token view ``[n_tokens, 1, ...]`` of the segments'
    tokens (the rule's factors are then summed per segment by :func:`segment`);
    ``"padded"``: the segments zero-padded to ``[B, L_max, ...]`` (its factors are
    per-sample already). Raises ``ValueError`` when a token after
    ``cu_seqlens[-1]`` (padding) has a non-zero output gradient: it would belong
    to no sample.
    """
    (axis, prefix), n, seg = packed.axes[id(use)], packed.n, packed.seg
    nt = seg.n_tokens

    def view(t: Any) -> Any:
        v = token_view(t, axis, n, prefix)
        if v is t:
            return t
        if mode == "padded":  # [B, L, 1, ...] -> [B, L, ...]
            return pad_tokens(v[:nt], seg, 0, seg.batch).flatten(1, 2)
        return v[:nt]

    gs: list[Tensor | None] = []
    for g in grads:
        v = None if g is None else token_view(g, axis, n, prefix)
        if v is not None and nt < n and bool(v[nt:].any()):
            raise ValueError(
                f"OPOB: tokens after cu_seqlens[-1] = {nt} (padding, {n - nt} of the N = {n} packed "
                f"tokens) reach the loss through module '{use.name}' ({type(use.module).__name__}): "
                "they belong to no sample. Leave them out of per_sample_loss and keep them out of "
                "the segments' attention (e.g. position ids restarting at the padding), or extend "
                "the last segment over them."
            )
        gs.append(None if g is None else view(g))
    return (
        tuple(view(a) for a in use.args),
        {k: view(v) for k, v in use.kwargs.items()},
        gs,
    )


# ----------------------------------------------------------------------------- first use

#: module -> (rule function, None when position-wise | the refusal message)
_POSITION_WISE: weakref.WeakKeyDictionary[nn.Module, tuple[Any, str | None]] = (
    weakref.WeakKeyDictionary()
)


def check_position_wise(use: Any, packed: Packed, amp: Any) -> None:
    """Refuse a module whose rule is checked on first use but whose forward mixes tokens.

    Trusted (built-in, exact-type) rules are written for their module's forward.
    A rule matched by structure, inherited by a subclass that overrides
    ``forward``, or registered with ``verify=True`` is checked once per module
    on its first packed call: the module's forward replayed on the packed row
    must equal its forward replayed on the token view, ``[N, 1, ...]`` (every
    token alone), to the first-use check's tolerance. The rule's own first-use
    check then runs on the token view as usual.
    """
    module = use.module
    spec = resolve_rule(module)
    if spec is None or not spec.verify:
        return
    state = _POSITION_WISE.get(module)
    if state is not None and state[0] is spec.fn:
        if state[1] is not None:
            raise ValueError(state[1])
        return
    (axis, prefix), n = packed.axes[id(use)], packed.n

    def copy(t: Any) -> Any:
        return t.clone() if isinstance(t, Tensor) else t

    why = None
    try:
        with replay_guard(), torch.no_grad(), replay_autocast(amp), replay_params(module):
            row = module.forward(
                *map(copy, use.args), **{k: copy(v) for k, v in use.kwargs.items()}
            )
            tok = module.forward(
                *(copy(token_view(a, axis, n, prefix)) for a in use.args),
                **{k: copy(token_view(v, axis, n, prefix)) for k, v in use.kwargs.items()},
            )
    except Exception as e:  # the forward cannot run token by token
        why = f"its forward on the tokens one at a time raised {type(e).__name__}: {e}"
    else:
        back = tok if not isinstance(tok, Tensor) else tok.movedim(0, axis) if axis else tok[:, 0]
        if not (isinstance(row, Tensor) and isinstance(back, Tensor)) or row.shape != back.shape:
            why = "its forward on the tokens one at a time returns another shape"
        else:
            a, b = row.detach().double(), back.detach().double()
            tol = TOLERANCE.get(row.dtype, 1e-3)
            diff, ref = float((a - b).norm()), float(a.norm())
            if not diff <= tol * max(ref, 1e-30):
                why = (
                    f"its output on the packed row differs from its output on the tokens one at "
                    f"a time by {diff / max(ref, 1e-30):.2g} (relative): it mixes positions"
                )
    msg = None
    if why is not None:
        msg = (
            f"OPOB: module '{use.name}' ({type(module).__name__}; {spec.source}) is not "
            f"position-wise, so its per-segment gradients cannot be formed from per-token "
            f"factors in a packed batch (cu_seqlens): {why}. Register a rule for it without "
            "token_local, freeze it, or run the batch unpacked."
        )
    _POSITION_WISE[module] = (spec.fn, msg)
    if msg is not None:
        raise ValueError(msg)
