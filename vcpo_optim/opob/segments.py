"""Segments of a packed batch and the per-segment factor (the engine's view of packing).

:class:`Segments` is ``cu_seqlens`` validated; :class:`Segmented` is a rule's
per-token :class:`~vcpo_optim.opob.rules.base.Outer` or
:class:`~vcpo_optim.opob.rules.base.Rows` factor read per segment, and
:func:`segment` turns any per-token factor into a per-segment one. The records
side (layouts, token views, refusals) is :mod:`vcpo_optim.opob.packing`; this
module is imported by the norm engine and imports nothing of OPOB but the
factor types.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .rules.base import Dense, Factor, Outer, Rows

__all__ = ["Segmented", "Segments", "segment", "segments"]


@dataclass
class Segments:
    """The segments of a packed batch, from ``cu_seqlens``.

    ``bounds``: ``cu`` as Python ints; ``seg_ids[t]``: the segment of token ``t <
    n_tokens``; ``offsets[t]``: its position in the segment (both int64 on the
    loss's device).
    """

    bounds: list[int]
    seg_ids: Tensor
    offsets: Tensor

    @property
    def batch(self) -> int:
        return len(self.bounds) - 1

    @property
    def n_tokens(self) -> int:
        return self.bounds[-1]

    @property
    def lengths(self) -> list[int]:
        return [b - a for a, b in itertools.pairwise(self.bounds)]

    @property
    def lmax(self) -> int:
        return max(self.lengths, default=0)


def segments(cu_seqlens: Any, batch: int, device: torch.device) -> Segments:
    """Validate ``cu_seqlens`` for a call of ``batch`` samples (``ValueError`` naming the problem)."""
    if isinstance(cu_seqlens, Tensor):
        cu = cu_seqlens.detach()
    else:
        try:
            cu = torch.as_tensor(cu_seqlens)
        except Exception as e:
            raise ValueError(
                "OPOB: cu_seqlens must be an integer tensor or a sequence of integers"
            ) from e
    if cu.dtype == torch.bool or cu.is_floating_point() or cu.is_complex():
        raise ValueError(
            f"OPOB: cu_seqlens must hold integers (cumulative sequence lengths), got dtype {cu.dtype}"
        )
    if tuple(cu.shape) != (batch + 1,):
        raise ValueError(
            f"OPOB: cu_seqlens must have shape [B + 1] = [{batch + 1}] for per_sample_loss of B={batch} "
            f"samples, got {tuple(cu.shape)} (one entry per sample boundary; drop the entries of "
            "padding segments)"
        )
    bounds = [int(v) for v in cu.tolist()]
    if bounds[0] != 0:
        raise ValueError(f"OPOB: cu_seqlens[0] must be 0, got {bounds[0]}")
    dec = [i for i in range(batch) if bounds[i + 1] < bounds[i]]
    if dec:
        i = dec[0]
        raise ValueError(
            f"OPOB: cu_seqlens must be non-decreasing, but cu_seqlens[{i + 1}] = {bounds[i + 1]} < "
            f"cu_seqlens[{i}] = {bounds[i]}"
        )
    lengths = torch.tensor([b - a for a, b in itertools.pairwise(bounds)], dtype=torch.long)
    seg_ids = torch.repeat_interleave(torch.arange(batch), lengths)
    starts = torch.tensor(bounds[:-1], dtype=torch.long)
    offsets = torch.arange(bounds[-1]) - starts[seg_ids]
    return Segments(bounds, seg_ids.to(device), offsets.to(device))


def pad_tokens(x: Tensor, seg: Segments, lo: int, hi: int) -> Tensor:
    """Tokens of segments ``lo:hi`` (``x``: ``[n_tokens, *rest]``) as ``[hi - lo, L, *rest]``,
    zero-padded to the chunk's longest segment ``L`` (a view when no padding is needed)."""
    b0, b1 = seg.bounds[lo], seg.bounds[hi]
    lens = seg.lengths[lo:hi]
    lc = max(lens, default=0)
    rest = x.shape[1:]
    if all(n == lc for n in lens):
        return x[b0:b1].reshape(hi - lo, lc, *rest)
    out = x.new_zeros(hi - lo, lc, *rest)
    dest = (seg.seg_ids[b0:b1] - lo) * lc + seg.offsets[b0:b1]
    out.view((hi - lo) * lc, *rest).index_copy_(0, dest, x[b0:b1])
    return out


@dataclass
class Segmented:
    """``G_i = sum_{t in segment i} F_t`` for a per-token :class:`Outer` or :class:`Rows` factor.

    ``inner`` is the rule's factor in the token view, restricted to the tokens of
    the segments: its dimension 0 is the token ``t < cu[B]`` and its dimension 1
    (``T'``, usually 1) stays within the token. The engine reads it through
    :meth:`padded` (samples ``lo:hi`` in the ``[b, L * T', ...]`` layout of an
    ordinary factor), :attr:`meta` (that layout for the whole batch, shapes only:
    the cost model) and :meth:`token_coefficients` (the weighted sum, written in
    the token layout).
    """

    inner: Outer | Rows
    seg: Segments
    _meta: Outer | Rows | None = field(default=None, repr=False)

    @property
    def batch(self) -> int:
        return self.seg.batch

    def padded(self, lo: int, hi: int) -> Outer | Rows:
        """The factor of samples ``lo:hi`` as an ordinary factor (padded tokens contribute 0)."""
        f, s = self.inner, self.seg
        if isinstance(f, Outer):
            return Outer(
                pad_tokens(f.a, s, lo, hi).flatten(1, 2), pad_tokens(f.g, s, lo, hi).flatten(1, 2)
            )
        idx = pad_tokens(f.idx, s, lo, hi).flatten(1, 2)
        return Rows(idx, pad_tokens(f.g, s, lo, hi).flatten(1, 2), f.num_rows)

    @property
    def meta(self) -> Outer | Rows:
        """The padded layout of the whole batch on the ``meta`` device (shapes for the cost model)."""
        if self._meta is None:
            f, b, lt = self.inner, self.seg.batch, self.seg.lmax

            def m(x: Tensor) -> Tensor:
                return torch.empty(b, lt * x.shape[1], *x.shape[2:], dtype=x.dtype, device="meta")

            self._meta = (
                Outer(m(f.a), m(f.g))
                if isinstance(f, Outer)
                else Rows(m(f.idx), m(f.g), f.num_rows)
            )
        return self._meta

    def padded_elems(self) -> int:
        """Elements of one sample's padded factor (what a chunk copies per sample)."""
        f = self.meta
        return (f.a[0].numel() if isinstance(f, Outer) else f.idx[0].numel()) + f.g[0].numel()

    def token_coefficients(self, coeff: Tensor) -> Tensor:
        """Per-sample coefficients as per-token ones: ``c_{seg(t)}``."""
        return coeff[self.seg.seg_ids.to(coeff.device)]


def segment(fac: Factor, seg: Segments) -> Factor:
    """Per-segment factor from a per-token one (dimension 0: the ``cu[B]`` tokens of the segments)."""
    if isinstance(fac, Dense):  # summed in float32 or wider (index_add_ rounds at every add)
        g = fac.G
        g = g.to(torch.promote_types(g.dtype, torch.float32))
        out = g.new_zeros(seg.batch, *g.shape[1:])
        return Dense(out.index_add_(0, seg.seg_ids.to(g.device), g))
    if isinstance(fac, Outer | Rows):
        return Segmented(fac, seg)
    raise ValueError(
        f"OPOB: a {type(fac).__name__} factor cannot be summed per segment (packed batches): "
        "per-token factors must be Outer, Rows or Dense; register the rule with "
        "token_local='padded' to receive the segments padded instead"
    )
