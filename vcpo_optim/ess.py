r"""Effective sample size of importance weights, computed in log space.

For importance weights :math:`w_1, \dots, w_n \ge 0` the (Kish) effective
sample size is

.. math::

    \mathrm{ESS} = \frac{\left(\sum_i w_i\right)^2}{\sum_i w_i^2},
    \qquad 1 \le \mathrm{ESS} \le n, \qquad \rho = \mathrm{ESS} / n \in [1/n, 1].

It is invariant to a common scale of the weights, so it is computed from log
weights :math:`\ell_i = \log w_i` shifted by their maximum :math:`m`:

.. math::

    S_1 = \sum_i e^{\ell_i - m}, \quad S_2 = \sum_i e^{2(\ell_i - m)}, \quad
    \mathrm{ESS} = S_1^2 / S_2 .

:math:`(m, S_1, S_2, n)` are *sufficient statistics*: two sets of them combine
exactly (re-shift to the larger maximum), which is how micro-batches and
data-parallel ranks are merged. Every term is in ``[0, 1]``, so nothing
overflows for any finite log weight (``1e4`` or ``-1e4`` included), and with
all weights equal every term is exactly ``1`` and the ratio is exactly ``1.0``.
The arithmetic is done in float64 on the weights' device.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from vcpo_optim.distributed import GroupArg, all_gather_rows, get_rank, resolve_group

__all__ = [
    "ESSResult",
    "StatisticsSummary",
    "check_nonempty",
    "check_statistics",
    "combine_statistics",
    "effective_sample_size",
    "ess_from_statistics",
    "local_statistics",
]

# Layout of one row of sufficient statistics (float64):
MAX_LOG, SUM1, SUM2, COUNT, N_NAN, N_INF, N_NEG, MALFORMED, OBSERVED = range(9)
ROW_SIZE = 9


class ESSResult(NamedTuple):
    """Result of :func:`effective_sample_size`.

    Attributes:
        ess: effective sample size, float64 scalar tensor in ``[1, n]``.
        ratio: ``ess / n``, float64 scalar tensor in ``[1/n, 1]``.
        n: number of (unmasked) weights, int64 scalar tensor.
    """

    ess: Tensor
    ratio: Tensor
    n: Tensor


def _as_tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    try:
        return torch.as_tensor(x)
    except Exception as exc:  # pragma: no cover - message only
        raise TypeError(
            f"{name} must be a tensor or a sequence of numbers, got {type(x).__name__}"
        ) from exc


def _select_input(weights: Any, log_weights: Any) -> tuple[Tensor, bool]:
    if (weights is None) == (log_weights is None):
        raise ValueError("pass exactly one of importance weights or log_weights")
    if weights is not None:
        return _as_tensor(weights, "importance weights"), False
    return _as_tensor(log_weights, "log_weights"), True


def local_statistics(
    weights: Any = None,
    *,
    log_weights: Any = None,
    mask: Any = None,
) -> Tensor:
    """Sufficient statistics of one set of weights, as a float64 row tensor.

    The row holds ``(m, S1, S2, n)`` (see the module docstring) followed by the
    number of NaN, infinite and negative entries, a malformed-input flag and an
    observed flag (1 for any row made from weights, even empty ones), so
    that invalid input can be reported after a cross-rank reduction instead of
    hanging the other ranks. Masked-out entries are ignored entirely (their
    value may be anything). Shape and device problems raise ``ValueError``
    immediately; value problems are only counted here, see
    :func:`check_statistics`.
    """
    x, is_log = _select_input(weights, log_weights)
    name = "log_weights" if is_log else "importance weights"
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must be real numbers, got dtype {x.dtype}")
    if mask is not None:
        mask = _as_tensor(mask, "mask")
        if mask.shape != x.shape:
            raise ValueError(
                f"mask has shape {tuple(mask.shape)} but {name} have shape {tuple(x.shape)}"
            )
        if mask.device != x.device:
            raise ValueError(f"mask is on {mask.device} but {name} are on {x.device}")
        mask = mask if mask.dtype == torch.bool else mask != 0
    x = x.detach().reshape(-1).to(torch.float64)
    keep = None if mask is None else mask.reshape(-1)

    nan = torch.isnan(x)
    if is_log:
        inf = torch.isinf(x)  # w = 0 or w = inf: pass a mask instead
        neg = torch.zeros_like(nan)
    else:
        inf = torch.isinf(x)
        neg = x < 0
    bad = nan | inf | neg
    if keep is not None:
        nan, inf, neg, bad = nan & keep, inf & keep, neg & keep, bad & keep
        valid = keep & ~bad
    else:
        valid = ~bad
    lw = x if is_log else torch.log(x)  # log(0) = -inf: a zero weight counts in n
    lw = torch.where(valid, lw, torch.full_like(lw, float("-inf")))
    m = (
        lw.max()
        if lw.numel() > 0
        else torch.tensor(float("-inf"), dtype=torch.float64, device=x.device)
    )
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    z = lw - shift
    count = (
        torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)
        if keep is None
        else keep.sum().to(torch.float64)
    )
    return torch.stack(
        [
            m,
            torch.exp(z).sum(),
            torch.exp(2.0 * z).sum(),
            count,
            nan.sum().to(torch.float64),
            inf.sum().to(torch.float64),
            neg.sum().to(torch.float64),
            torch.zeros((), dtype=torch.float64, device=x.device),
            torch.ones((), dtype=torch.float64, device=x.device),
        ]
    )


def malformed_row(device: torch.device | str = "cpu") -> Tensor:
    """A statistics row that marks this rank's input as malformed."""
    row = torch.zeros(ROW_SIZE, dtype=torch.float64, device=device)
    row[MAX_LOG] = float("-inf")
    row[MALFORMED] = 1.0
    row[OBSERVED] = 1.0
    return row


def empty_row(device: torch.device | str = "cpu") -> Tensor:
    """The statistics row of zero weights (the identity of :func:`combine_statistics`)."""
    row = torch.zeros(ROW_SIZE, dtype=torch.float64, device=device)
    row[MAX_LOG] = float("-inf")
    return row


def combine_statistics(rows: Tensor) -> Tensor:
    """Combine a ``[k, 8]`` stack of statistics rows into one row, exactly.

    ``m = max_r m_r`` and ``S_j = sum_r S_{j,r} * exp(j * (m_r - m))``; rows
    with no positive weight (``m_r = -inf``) contribute nothing to ``S_j``.
    Counts add. Rows are combined in order, so every rank that combines the
    same gathered rows gets bit-identical results.
    """
    if rows.dim() == 1:
        return rows
    m_r = rows[:, MAX_LOG]
    m = m_r.max()
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    f = torch.where(torch.isfinite(m_r), torch.exp(m_r - shift), torch.zeros_like(m_r))
    out = rows.sum(0)
    out[MAX_LOG] = m
    out[SUM1] = (rows[:, SUM1] * f).sum()
    out[SUM2] = (rows[:, SUM2] * f * f).sum()
    return out


class StatisticsSummary(NamedTuple):
    """Host-side facts read from gathered statistics rows."""

    n: int  #: total number of (unmasked) weights
    observed: bool  #: any row came from weights (possibly empty ones)
    any_positive: bool  #: some weight is > 0


def check_statistics(rows: Tensor, name: str = "importance weights") -> StatisticsSummary:
    """Raise ``ValueError`` if any row reports invalid input, else summarise.

    ``rows`` is one row or a ``[k, 9]`` stack (one row per rank); the message
    names the offending ranks, so every rank raises the same error. This reads
    the rows on the host (one device sync).
    """
    table = rows.reshape(-1, ROW_SIZE).tolist()
    problems = []
    for rank, row in enumerate(table):
        where = f"rank {rank}: " if len(table) > 1 else ""
        if row[MALFORMED]:
            problems.append(f"{where}malformed input (see the error raised on that rank)")
        parts = [
            f"{int(row[col])} {what}"
            for col, what in ((N_NAN, "NaN"), (N_INF, "infinite"), (N_NEG, "negative"))
            if row[col]
        ]
        if parts:
            problems.append(where + ", ".join(parts) + f" value(s) among {int(row[COUNT])}")
    if problems:
        raise ValueError(f"invalid {name}: " + "; ".join(problems))
    return StatisticsSummary(
        n=int(sum(r[COUNT] for r in table)),
        observed=any(r[OBSERVED] for r in table),
        any_positive=any(r[MAX_LOG] != float("-inf") for r in table),
    )


def check_nonempty(summary: StatisticsSummary, name: str) -> None:
    """Raise if the combined batch has no entries or only zero weights."""
    if summary.n == 0:
        raise ValueError(f"empty batch: no (unmasked) {name} to compute an ESS from")
    if not summary.any_positive:
        raise ValueError(f"all {summary.n} {name} are zero: the ESS is undefined")


def ess_from_statistics(row: Tensor) -> ESSResult:
    """``ESS = S1^2 / S2`` and ``ratio = ESS / n`` from one combined row.

    Does not validate: an empty batch or all-zero weights give NaN here; use
    :func:`check_statistics` and the callers' checks first.
    """
    s1, s2, n = row[SUM1], row[SUM2], row[COUNT]
    ess = s1 * s1 / s2
    return ESSResult(ess=ess, ratio=ess / n, n=n.to(torch.int64))


def effective_sample_size(
    weights: Any = None,
    *,
    log_weights: Any = None,
    mask: Any = None,
    process_group: GroupArg = None,
) -> ESSResult:
    r"""Effective sample size :math:`(\sum w)^2 / \sum w^2` of importance weights.

    Computed in log space (see :mod:`vcpo_optim.ess`): exact for any finite log
    weight, in float64 on the input's device.

    Args:
        weights: importance weights :math:`w_i \ge 0`, any shape (flattened).
            Zero weights are allowed (they count in ``n``). Default ``None``.
        log_weights: :math:`\log w_i` instead of ``weights`` (exactly one of the
            two must be given); must be finite. Default ``None``.
        mask: boolean tensor of the same shape and device; ``False`` entries
            are excluded (neither counted nor checked). Default ``None`` (all).
        process_group: ``None`` (default) for no reduction; a
            ``torch.distributed`` process group, or ``"world"`` for the default
            group, to reduce the sufficient statistics over its ranks (one
            all-gather of 8 numbers per rank; local sizes may differ and may be
            zero). Every rank gets the same result.

    Returns:
        :class:`ESSResult` ``(ess, ratio, n)`` of scalar tensors (float64,
        float64, int64) on the input's device.

    Raises:
        ValueError: NaN, infinite or negative weights (with counts, and the
            ranks they came from), an empty (global) batch, all weights zero,
            a mask of the wrong shape or device. Under a process group every
            rank raises the same error.
    """
    group = resolve_group(process_group, default_world=False)
    try:
        row = local_statistics(weights, log_weights=log_weights, mask=mask)
        error: ValueError | None = None
    except ValueError as exc:
        if group is None:
            raise
        x = weights if weights is not None else log_weights
        row = malformed_row(x.device if isinstance(x, Tensor) else "cpu")
        error = exc
    rows = all_gather_rows(row, group)
    name = "log_weights" if weights is None else "importance weights"
    try:
        summary = check_statistics(rows, name)
    except ValueError as exc:
        if error is not None:
            raise ValueError(f"{exc}. On rank {get_rank(group)}: {error}") from error
        raise
    check_nonempty(summary, name)
    return ess_from_statistics(combine_statistics(rows))
