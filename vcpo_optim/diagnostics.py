r"""Off-policy diagnostics as tensors, global over a process group by one reduction.

:func:`offpolicy_stats` summarises how far a batch of stale trajectories is from
the current policy: effective sample sizes, the distribution of the sequence log
weights, K3 KL, :math:`\chi^2`, the fraction above a TIS cap and the response
lengths, overall and per policy-lag bucket. Everything is computed in float64 and
in log space from the token log ratios :math:`x_{it} = \log\pi_\theta(y_{it}) -
\log\mu(y_{it})` (no weight is exponentiated unshifted, so :math:`|x|` of ``1e3``
and sequence log weights of ``1e4`` are fine).

Definitions (``i`` over the ``B`` trajectories of the global batch, ``t`` over the
response tokens, ``N = sum_i L_i`` tokens, ``lw_i = sum_t x_it``, ``w_i = exp(lw_i)``):

========================  =============================================================
field                     definition
========================  =============================================================
``ess_ratio``             :math:`(\sum_i w_i)^2 / (B \sum_i w_i^2)` (Kish ESS / B)
``token_ess_ratio``       the same over the ``N`` token ratios :math:`r_{it} = e^{x_{it}}`
``log_weight_mean/std``   mean and population std (``ddof=0``) of ``lw_i``
``log_weight_min/max``    exact extremes of ``lw_i``
``log_weight_p50/90/99``  order statistic of rank :math:`\lceil qB\rceil` of ``lw_i``
                          (inverted CDF), from a mergeable histogram, see below
``k3_kl_token_mean``      :math:`\frac1N\sum_{it} (r_{it} - 1 - x_{it})`, the K3 estimate
                          of :math:`\mathrm{KL}(\mu\|\pi_\theta)` per token
``k3_kl_sequence_mean``   :math:`\frac1B\sum_i\sum_t (r_{it} - 1 - x_{it})`, per sequence
``chi2``                  :math:`B\sum_i w_i^2/(\sum_i w_i)^2 - 1 = 1/\text{ess\_ratio} - 1`,
                          the self-normalised estimate of :math:`\chi^2(\pi_\theta\|\mu)
                          = E_\mu[w^2] - 1` (weights rescaled to mean 1), in ``[0, B-1]``
``log_mean_weight``       :math:`\log\frac1B\sum_i w_i` (``~0`` when the weights are
                          unbiased; ``chi2`` does not depend on it)
``frac_above_tis_cap``    fraction of trajectories with :math:`w_i > c` (``tis_cap=c``)
``length_mean/min/max``   response lengths :math:`L_i`
========================  =============================================================

A trajectory with no response token has ``lw_i = 0`` and counts in ``B``.

**Exactness.** Every field except the three interior quantiles is a function of
sufficient statistics that merge exactly: counts and extremes, log-space sums
shifted by the group maximum (as in :mod:`vcpo_optim.ess`), and per-rank mean and
centred second moment merged with Chan's formula. They agree with a direct float64
computation to rounding (relative ``~1e-15``), and the result on ranks holding
parts of a batch agrees with the single-process result on the whole batch.

**Quantiles.** Quantiles are not sufficient statistics. The log weights are
binned on a fixed grid, uniform in :math:`u = \operatorname{asinh}(lw)` with
``quantile_bins_per_unit`` bins per unit (default 16) for :math:`|lw| \le 10^4` and
two open-ended edge bins; each bin keeps its count and the exact minimum and
maximum of its values (merged by sum, min and max). The q-quantile is the value
of rank :math:`k = \lceil qB \rceil`; its bin is found from the merged counts, and
the reported value is the bin's exact minimum if ``k`` is the first rank in the
bin, its exact maximum if it is the last (so it is exact whenever the bin holds at
most two values, and min/max are always exact), and otherwise the midpoint of the
bin's minimum and maximum. The error is then at most half of (bin max - bin min),
which is at most half a bin width, :math:`\approx \sqrt{1+lw^2}/32` nats at the
default resolution (0.03 nats near 0, 0.3 at ``|lw| = 10``); ``quantile_error``
holds this bound per quantile (0 where exact). The result does not depend on how
the batch is split across ranks.

**Distributed.** With a process group, each rank builds one float64 row of these
statistics (``G * (17 + 3 * bins)`` numbers, ``G = 1 +`` the number of lag
buckets: 7.8 KB without lags at the default resolution, 86 KB with the 10
default lag buckets) and the ranks all-gather it once; every rank merges the
rows in rank order, so all ranks get bit-identical results.
Local batches may differ in size and may be empty. Every rank must pass ``lag``
(possibly empty) or none, the same ``lag_buckets`` and resolution.

**No host sync.** The function issues no device-to-host read and no
host-to-device copy (with a CPU/gloo group the reduction itself moves the row to
the CPU; a CUDA test checks this with ``torch.cuda.set_sync_debug_mode``). Invalid values (NaN/Inf log
probs at response positions, a mask that is not 0/1, negative lags, different
``tis_cap`` on different ranks) do not raise here: they make every field NaN on
every rank, and :meth:`OffPolicyStats.as_dict` (the point where values are read)
raises a ``ValueError`` naming the problem and the rank. Problems of shape, dtype
or device raise at once (under a process group, after taking part in the
reduction, so that no rank hangs).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from vcpo_optim.distributed import GroupArg, all_gather_rows, get_rank, resolve_group
from vcpo_optim.losses import _log_k3

__all__ = ["DEFAULT_LAG_BUCKETS", "OffPolicyStats", "offpolicy_stats"]

#: Lower edges of the default lag buckets: 0, 1, 2-3, 4-7, ..., 128-255, 256+.
DEFAULT_LAG_BUCKETS: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)

#: Quantiles reported besides min and max, as exact fractions (numerator, 100).
QUANTILES: tuple[int, ...] = (50, 90, 99)

#: The histogram grid covers |lw| <= this; beyond it values fall in two edge bins.
QUANTILE_RANGE = 1e4

# Layout of the per-group statistics (float64). Extremes of empty groups are +-inf.
(
    NSEQ,
    NTOK,
    LW_MAX,
    LW_MIN,
    LW_S1,
    LW_S2,
    LW_MEAN,
    LW_M2,
    TOK_MAX,
    TOK_S1,
    TOK_S2,
    K3_MAX,
    K3_S,
    ABOVE,
    LEN_SUM,
    LEN_MIN,
    LEN_MAX,
) = range(17)
N_FIELDS = 17

# Header of a rank's row.
MALFORMED, BAD_LOGP, BAD_MASK, BAD_LAG, HAS_CAP, LOG_CAP = range(6)
N_HEADER = 6


def _bins(bins_per_unit: int) -> tuple[int, int]:
    """(half, total): bin ``j`` covers ``u in [(j - half)/bpu, (j - half + 1)/bpu)``."""
    half = math.ceil(math.asinh(QUANTILE_RANGE) * bins_per_unit)
    return half, 2 * half


@dataclass(frozen=True)
class OffPolicyStats:
    """Result of :func:`offpolicy_stats`: float64 tensors, no host sync until read.

    Scalar (0-d) tensors for the whole batch; in :attr:`by_lag` the same fields
    have shape ``[K]``, one entry per lag bucket (NaN where a bucket is empty).
    Field definitions are in :mod:`vcpo_optim.diagnostics`. If the input was
    invalid every field is NaN and :meth:`as_dict` / :meth:`check` raise.
    """

    n_sequences: Tensor
    n_tokens: Tensor
    ess_ratio: Tensor
    token_ess_ratio: Tensor
    log_weight_mean: Tensor
    log_weight_std: Tensor
    log_weight_min: Tensor
    log_weight_p50: Tensor
    log_weight_p90: Tensor
    log_weight_p99: Tensor
    log_weight_max: Tensor
    k3_kl_token_mean: Tensor
    k3_kl_sequence_mean: Tensor
    chi2: Tensor
    log_mean_weight: Tensor
    length_mean: Tensor
    length_min: Tensor
    length_max: Tensor
    #: ``None`` unless ``tis_cap`` was given.
    frac_above_tis_cap: Tensor | None = None
    #: Error bound (nats) of p50, p90, p99: shape ``[3]`` (``[K, 3]`` per lag), 0 = exact.
    quantile_error: Tensor | None = field(default=None, repr=False)
    #: Per-lag-bucket statistics (fields of shape ``[K]``), ``None`` without ``lag``.
    by_lag: OffPolicyStats | None = field(default=None, repr=False)
    #: Labels of the lag buckets, e.g. ``("0", "1", "2-3", ..., "256+")``.
    lag_labels: tuple[str, ...] = ()
    #: ``[world, 6]`` header rows (problem counts per rank), read by :meth:`check`.
    problems: Tensor | None = field(default=None, repr=False)

    #: The scalar fields, in the order :meth:`as_dict` reports them.
    FIELDS: ClassVar[tuple[str, ...]] = (
        "n_sequences",
        "n_tokens",
        "ess_ratio",
        "token_ess_ratio",
        "log_weight_mean",
        "log_weight_std",
        "log_weight_min",
        "log_weight_p50",
        "log_weight_p90",
        "log_weight_p99",
        "log_weight_max",
        "k3_kl_token_mean",
        "k3_kl_sequence_mean",
        "chi2",
        "log_mean_weight",
        "length_mean",
        "length_min",
        "length_max",
        "frac_above_tis_cap",
    )

    def check(self) -> OffPolicyStats:
        """Raise ``ValueError`` if the input (on any rank) was invalid; else return self.

        Reads the small header tensor (one host sync). Every rank holds the same
        header, so every rank raises the same error.
        """
        if self.problems is None:
            return self
        rows = self.problems.reshape(-1, N_HEADER).tolist()
        msgs = []
        for rank, row in enumerate(rows):
            where = f"rank {rank}: " if len(rows) > 1 else ""
            if row[MALFORMED]:
                msgs.append(f"{where}malformed input (see the error raised on that rank)")
            for col, what in (
                (BAD_LOGP, "NaN/Inf log-prob(s) at response positions (mask == 1)"),
                (BAD_MASK, "mask value(s) other than 0 and 1"),
                (BAD_LAG, "negative lag(s)"),
            ):
                if row[col]:
                    msgs.append(f"{where}{int(row[col])} {what}")
        caps = {(r[HAS_CAP], r[LOG_CAP] if r[HAS_CAP] else 0.0) for r in rows if not r[MALFORMED]}
        if len(caps) > 1:
            msgs.append("ranks passed different tis_cap values (pass the same cap on every rank)")
        if msgs:
            raise ValueError("invalid input to offpolicy_stats: " + "; ".join(msgs))
        return self

    def as_dict(self, prefix: str = "offpolicy/") -> dict[str, float]:
        """All fields as Python floats for a logger (one host sync), after :meth:`check`.

        Keys are ``prefix + name``; per lag bucket ``prefix + "lag_<label>/" + name``,
        only for buckets that hold at least one trajectory. The quantile error
        bounds are not included (read :attr:`quantile_error`).

        Raises:
            ValueError: invalid input (see :meth:`check`) or an empty global batch.
        """
        self.check()
        names = [n for n in self.FIELDS if getattr(self, n) is not None]
        parts = [getattr(self, n).reshape(1) for n in names]
        lag = self.by_lag
        if lag is not None:
            parts += [getattr(lag, n).reshape(-1) for n in names]
        values = torch.cat([p.to(torch.float64) for p in parts]).tolist()
        out = {prefix + n: v for n, v in zip(names, values[: len(names)])}
        if out[prefix + "n_sequences"] == 0:
            raise ValueError("empty batch: offpolicy_stats saw no trajectory on any rank")
        if lag is not None:
            k = len(self.lag_labels)
            rest = values[len(names) :]
            for j, label in enumerate(self.lag_labels):
                if rest[j] == 0:  # n_sequences of this bucket (the first field)
                    continue
                for f, n in enumerate(names):
                    out[f"{prefix}lag_{label}/{n}"] = rest[f * k + j]
        return out


def _lag_labels(edges: tuple[int, ...]) -> tuple[str, ...]:
    labels = []
    for j, lo in enumerate(edges):
        if j + 1 == len(edges):
            labels.append(f"{lo}+")
        elif edges[j + 1] == lo + 1:
            labels.append(f"{lo}")
        else:
            labels.append(f"{lo}-{edges[j + 1] - 1}")
    return tuple(labels)


def _validate_meta(
    logp: Any, logp_behaviour: Any, mask: Any, lag: Any, tis_cap: Any, edges: tuple[int, ...]
) -> None:
    for name, t in (("logp", logp), ("logp_behaviour", logp_behaviour), ("mask", mask)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D of shape [B, T], got shape {tuple(t.shape)}")
    for name, t in (("logp", logp), ("logp_behaviour", logp_behaviour)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if logp_behaviour.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(
            f"logp {tuple(logp.shape)}, logp_behaviour {tuple(logp_behaviour.shape)} and "
            f"mask {tuple(mask.shape)} must have the same shape [B, T]"
        )
    if mask.is_complex():
        raise ValueError("mask must be boolean or contain only 0 and 1")
    devices = {logp.device, logp_behaviour.device, mask.device}
    if lag is not None:
        if not isinstance(lag, Tensor):
            raise ValueError(f"lag must be a torch.Tensor, got {type(lag).__name__}")
        if lag.is_floating_point() or lag.is_complex() or lag.dtype == torch.bool:
            raise ValueError(f"lag must hold integer policy lags, got dtype {lag.dtype}")
        if lag.shape != (logp.shape[0],):
            raise ValueError(f"lag must have shape [B] = [{logp.shape[0]}], got {tuple(lag.shape)}")
        devices.add(lag.device)
    if len(devices) > 1:
        raise ValueError(f"inputs are on different devices: {sorted(map(str, devices))}")
    if tis_cap is not None and not (
        isinstance(tis_cap, (int, float)) and tis_cap > 0 and math.isfinite(tis_cap)
    ):
        raise ValueError(f"tis_cap must be a finite number > 0, got {tis_cap!r}")
    if not edges or edges[0] != 0 or any(b <= a for a, b in itertools.pairwise(edges)):
        raise ValueError(f"lag_buckets must be increasing integers starting at 0, got {edges}")


def _per_sequence(x: Tensor, m: Tensor) -> dict[str, Tensor]:
    """Token-level sufficient statistics of each trajectory (``[B]`` each), one pass.

    ``tok_max`` is the largest token log ratio, ``tok_s1``/``tok_s2`` the sums of
    ``r`` and ``r^2`` relative to ``exp(tok_max)``; ``k3_max``/``k3_s`` the same for
    ``log K3``. Empty rows have maxima ``-inf`` and sums 0.
    """
    neg = torch.full_like(x, -float("inf"))
    out = {"length": m.sum(1).to(torch.float64)}
    for name, v in (("tok", torch.where(m, x, neg)), ("k3", torch.where(m, _log_k3(x), neg))):
        top = v.max(1).values if v.shape[1] else torch.full(v.shape[:1], -float("inf")).to(v)
        shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        e = torch.exp(v - shift[:, None])
        out[f"{name}_max"] = top
        out[f"{name}_s1"] = e.sum(1)
        if name == "tok":
            out["tok_s2"] = (e * e).sum(1)
    return out


def _group_table(
    lw: Tensor,
    seq: dict[str, Tensor],
    gid: Tensor,
    n_groups: int,
    log_cap: float | None,
    bins_per_unit: int,
) -> Tensor:
    """``[G, 17 + 3 * bins]`` statistics of the trajectories in each group ``gid``."""
    dev, f64 = lw.device, torch.float64
    g = n_groups
    inf = float("inf")
    zeros = torch.zeros(g, dtype=f64, device=dev)

    def gsum(v: Tensor) -> Tensor:
        return zeros.clone().index_add_(0, gid, v)

    def gmax(v: Tensor) -> Tensor:
        return torch.full((g,), -inf, dtype=f64, device=dev).scatter_reduce(0, gid, v, "amax")

    def gmin(v: Tensor) -> Tensor:
        return torch.full((g,), inf, dtype=f64, device=dev).scatter_reduce(0, gid, v, "amin")

    def shifted_sum(sums: Tensor, tops: Tensor, top: Tensor, k: int) -> Tensor:
        """sum_i sums_i exp(k (tops_i - top_g)): merge per-item sums at the group max."""
        s = top[gid]
        f = torch.exp(k * (tops - torch.where(torch.isfinite(s), s, torch.zeros_like(s))))
        return gsum(torch.where(torch.isfinite(tops), sums * f, torch.zeros_like(sums)))

    ones = torch.ones_like(lw)
    length = seq["length"]
    n = gsum(ones)
    cols: list[Tensor] = [zeros] * N_FIELDS
    cols[NSEQ] = n
    cols[NTOK] = gsum(length)
    cols[LW_MAX] = gmax(lw)
    cols[LW_MIN] = gmin(lw)
    cols[LW_S1] = shifted_sum(ones, lw, cols[LW_MAX], 1)
    cols[LW_S2] = shifted_sum(ones, lw, cols[LW_MAX], 2)
    mean = gsum(lw) / n.clamp(min=1)
    cols[LW_MEAN] = mean
    cols[LW_M2] = gsum((lw - mean[gid]) ** 2)
    cols[TOK_MAX] = gmax(seq["tok_max"])
    cols[TOK_S1] = shifted_sum(seq["tok_s1"], seq["tok_max"], cols[TOK_MAX], 1)
    cols[TOK_S2] = shifted_sum(seq["tok_s2"], seq["tok_max"], cols[TOK_MAX], 2)
    cols[K3_MAX] = gmax(seq["k3_max"])
    cols[K3_S] = shifted_sum(seq["k3_s1"], seq["k3_max"], cols[K3_MAX], 1)
    if log_cap is not None:
        cols[ABOVE] = gsum((lw > log_cap).to(f64))
    cols[LEN_SUM] = gsum(length)
    cols[LEN_MIN] = gmin(length)
    cols[LEN_MAX] = gmax(length)
    stats = torch.stack(cols, dim=1)  # [G, 17]

    half, nb = _bins(bins_per_unit)
    b = torch.floor(torch.asinh(lw) * bins_per_unit).clamp(-half, half - 1).to(torch.long) + half
    flat = gid * nb + b
    count = torch.zeros(g * nb, dtype=f64, device=dev).index_add_(0, flat, ones)
    bmin = torch.full((g * nb,), inf, dtype=f64, device=dev).scatter_reduce(0, flat, lw, "amin")
    bmax = torch.full((g * nb,), -inf, dtype=f64, device=dev).scatter_reduce(0, flat, lw, "amax")
    hist = torch.cat([count.view(g, nb), bmin.view(g, nb), bmax.view(g, nb)], dim=1)
    return torch.cat([stats, hist], dim=1)


def _merge(tables: Tensor) -> Tensor:
    """Merge ``[R, G, F]`` per-rank tables into ``[G, F]`` (rank order, deterministic)."""
    f64 = torch.float64
    out = tables[0].clone()
    for r in range(1, tables.shape[0]):
        a, b = out, tables[r]
        c = a.clone()
        na, nb = a[:, NSEQ], b[:, NSEQ]
        n = na + nb
        for top, sums in ((LW_MAX, (LW_S1, LW_S2)), (TOK_MAX, (TOK_S1, TOK_S2)), (K3_MAX, (K3_S,))):
            m = torch.maximum(a[:, top], b[:, top])
            shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            fa = torch.where(torch.isfinite(a[:, top]), torch.exp(a[:, top] - shift), 0.0)
            fb = torch.where(torch.isfinite(b[:, top]), torch.exp(b[:, top] - shift), 0.0)
            c[:, top] = m
            for k, col in enumerate(sums, start=1):
                c[:, col] = a[:, col] * fa**k + b[:, col] * fb**k
        # Chan et al.: merge (n, mean, M2)
        delta = b[:, LW_MEAN] - a[:, LW_MEAN]
        safe_n = n.clamp(min=1)
        c[:, LW_MEAN] = torch.where(n > 0, a[:, LW_MEAN] + delta * nb / safe_n, 0.0)
        c[:, LW_M2] = a[:, LW_M2] + b[:, LW_M2] + delta * delta * na * nb / safe_n
        for col in (NSEQ, NTOK, ABOVE, LEN_SUM):
            c[:, col] = a[:, col] + b[:, col]
        for col in (LW_MIN, LEN_MIN):
            c[:, col] = torch.minimum(a[:, col], b[:, col])
        for col in (LW_MAX, TOK_MAX, K3_MAX, LEN_MAX):
            c[:, col] = torch.maximum(a[:, col], b[:, col])
        nbins = (a.shape[1] - N_FIELDS) // 3
        h0 = N_FIELDS
        c[:, h0 : h0 + nbins] = a[:, h0 : h0 + nbins] + b[:, h0 : h0 + nbins]
        h1, h2 = h0 + nbins, h0 + 2 * nbins
        c[:, h1:h2] = torch.minimum(a[:, h1:h2], b[:, h1:h2])
        c[:, h2:] = torch.maximum(a[:, h2:], b[:, h2:])
        out = c.to(f64)
    return out


def _quantiles(table: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
    """``([G, 3] values, [G, 3] error bounds)`` of p50/p90/p99 from merged histograms."""
    nbins = (table.shape[1] - N_FIELDS) // 3
    count = table[:, N_FIELDS : N_FIELDS + nbins]
    bmin = table[:, N_FIELDS + nbins : N_FIELDS + 2 * nbins]
    bmax = table[:, N_FIELDS + 2 * nbins :]
    cum = count.cumsum(1)
    ni = n.round().to(torch.long)
    ranks = torch.stack([(q * ni + 99) // 100 for q in QUANTILES], dim=1).clamp(min=1)  # ceil
    b = torch.searchsorted(cum, ranks.to(cum.dtype)).clamp(max=nbins - 1)
    c_b = count.gather(1, b)
    pos = ranks.to(cum.dtype) - (cum.gather(1, b) - c_b)
    lo, hi = bmin.gather(1, b), bmax.gather(1, b)
    value = torch.where(pos == 1, lo, torch.where(pos == c_b, hi, 0.5 * (lo + hi)))
    err = torch.where((pos == 1) | (pos == c_b), torch.zeros_like(lo), 0.5 * (hi - lo))
    empty = (n == 0)[:, None]
    nan = torch.full_like(value, float("nan"))
    return torch.where(empty, nan, value), torch.where(empty, nan, err)


def _finalize(table: Tensor, has_cap: bool, valid: Tensor) -> dict[str, Tensor]:
    t = table
    n, ntok = t[:, NSEQ], t[:, NTOK]
    nan = torch.full_like(n, float("nan"))

    def guard(v: Tensor, count: Tensor) -> Tensor:
        return torch.where((count > 0) & valid, v, nan)

    log_s1 = torch.log(t[:, LW_S1])
    q, qerr = _quantiles(t, n)
    k3_log_sum = t[:, K3_MAX] + torch.log(t[:, K3_S])  # -inf when every K3 term is 0
    out = {
        "n_sequences": torch.where(valid, n, nan),
        "n_tokens": torch.where(valid, ntok, nan),
        "ess_ratio": guard(t[:, LW_S1] ** 2 / t[:, LW_S2] / n, n),
        "token_ess_ratio": guard(t[:, TOK_S1] ** 2 / t[:, TOK_S2] / ntok, ntok),
        "log_weight_mean": guard(t[:, LW_MEAN], n),
        "log_weight_std": guard(torch.sqrt(t[:, LW_M2] / n), n),
        "log_weight_min": guard(t[:, LW_MIN], n),
        "log_weight_p50": guard(q[:, 0], n),
        "log_weight_p90": guard(q[:, 1], n),
        "log_weight_p99": guard(q[:, 2], n),
        "log_weight_max": guard(t[:, LW_MAX], n),
        "k3_kl_token_mean": guard(torch.exp(k3_log_sum - torch.log(ntok)), ntok),
        "k3_kl_sequence_mean": guard(torch.exp(k3_log_sum - torch.log(n)), n),
        "chi2": guard(n * t[:, LW_S2] / t[:, LW_S1] ** 2 - 1.0, n),
        "log_mean_weight": guard(t[:, LW_MAX] + log_s1 - torch.log(n), n),
        "length_mean": guard(t[:, LEN_SUM] / n, n),
        "length_min": guard(t[:, LEN_MIN], n),
        "length_max": guard(t[:, LEN_MAX], n),
        "quantile_error": torch.where(valid, qerr, torch.full_like(qerr, float("nan"))),
    }
    if has_cap:
        out["frac_above_tis_cap"] = guard(t[:, ABOVE] / n, n)
    return out


def offpolicy_stats(
    logp: Tensor,
    logp_behaviour: Tensor,
    mask: Tensor,
    *,
    lag: Tensor | None = None,
    tis_cap: float | None = None,
    process_group: GroupArg = None,
    lag_buckets: tuple[int, ...] = DEFAULT_LAG_BUCKETS,
    quantile_bins_per_unit: int = 16,
) -> OffPolicyStats:
    """Off-policy diagnostics of a batch (global over ``process_group``), as tensors.

    See :mod:`vcpo_optim.diagnostics` for every field's definition, what is exact,
    and how the quantiles are computed. Typical use, once per optimizer step::

        stats = offpolicy_stats(logp, logp_old, mask, lag=lag, tis_cap=8.0,
                                process_group="world")
        if step % 10 == 0:
            wandb.log(stats.as_dict(prefix="offpolicy/"), step=step)

    Args:
        logp: ``[B, T]`` current-policy log-probs of the sampled tokens (any float
            dtype; read detached, converted to float64 exactly).
        logp_behaviour: ``[B, T]`` behaviour (sampler) log-probs.
        mask: ``[B, T]`` bool or 0/1 response mask; padding may hold anything.
        lag: optional ``[B]`` integer policy lag of each trajectory (learner
            version minus the version that sampled it, ``>= 0``); adds
            :attr:`OffPolicyStats.by_lag`. Default ``None``.
        tis_cap: optional TIS cap ``c > 0``: adds ``frac_above_tis_cap``, the
            fraction of trajectories with ``w_i > c``. Default ``None``.
        process_group: ``None`` (default, this process's batch only), a
            ``ProcessGroup`` or ``"world"``: one all-gather of one row per rank.
        lag_buckets: increasing lower edges of the lag buckets, starting at 0;
            bucket ``j`` holds lags in ``[e_j, e_{j+1})``, the last is open.
            Default ``(0, 1, 2, 4, ..., 256)``: ``0, 1, 2-3, ..., 128-255, 256+``.
        quantile_bins_per_unit: histogram resolution in ``asinh(lw)`` (see the
            module docstring). Default 16 (318 bins).

    Returns:
        :class:`OffPolicyStats` of float64 tensors on ``logp``'s device.

    Raises:
        ValueError: wrong shapes, dtypes or devices, bad ``tis_cap`` or
            ``lag_buckets`` (at once; under a process group after the reduction).
            Invalid values are reported by :meth:`OffPolicyStats.as_dict`.
    """
    group = resolve_group(process_group, default_world=False)
    edges = tuple(int(e) for e in lag_buckets)
    if not (isinstance(quantile_bins_per_unit, int) and quantile_bins_per_unit >= 1):
        raise ValueError(
            f"quantile_bins_per_unit must be an int >= 1, got {quantile_bins_per_unit}"
        )
    n_groups = 1 + (len(edges) if lag is not None else 0)
    _, nb = _bins(quantile_bins_per_unit)
    width = N_FIELDS + 3 * nb
    device = logp.device if isinstance(logp, Tensor) else torch.device("cpu")
    f64 = torch.float64
    error: ValueError | None = None
    try:
        _validate_meta(logp, logp_behaviour, mask, lag, tis_cap, edges)
        row = _local_row(logp, logp_behaviour, mask, lag, tis_cap, edges, quantile_bins_per_unit)
    except ValueError as exc:
        if group is None:
            raise
        error = exc
        row = torch.zeros(N_HEADER + n_groups * width, dtype=f64, device=device)
        row[MALFORMED] = 1.0
    rows = all_gather_rows(row, group)  # [R, N_HEADER + G * width]
    if error is not None:
        raise ValueError(
            f"offpolicy_stats on rank {get_rank(group)}: {error} "
            "(the other ranks get NaN statistics and as_dict() raises there)"
        ) from error
    header = rows[:, :N_HEADER]
    tables = rows[:, N_HEADER:].reshape(rows.shape[0], n_groups, width)
    bad = sum(header[:, col].sum() for col in (MALFORMED, BAD_LOGP, BAD_MASK, BAD_LAG))
    caps = header[:, HAS_CAP] * 2.0 + torch.nan_to_num(header[:, LOG_CAP])
    valid = (bad == 0) & (caps == caps[0]).all()
    merged = _merge(tables)
    vals = _finalize(merged, tis_cap is not None, valid)
    glob = {k: v[0] for k, v in vals.items()}
    by_lag = None
    labels: tuple[str, ...] = ()
    if lag is not None:
        by_lag = OffPolicyStats(**{k: v[1:] for k, v in vals.items()})
        labels = _lag_labels(edges)
        by_lag = replace(by_lag, lag_labels=labels)
    return OffPolicyStats(**glob, by_lag=by_lag, lag_labels=labels, problems=header)


def _local_row(
    logp: Tensor,
    logp_behaviour: Tensor,
    mask: Tensor,
    lag: Tensor | None,
    tis_cap: float | None,
    edges: tuple[int, ...],
    bins_per_unit: int,
) -> Tensor:
    """This rank's row: header followed by the flattened ``[G, width]`` table."""
    f64 = torch.float64
    dev = logp.device
    m = mask != 0
    bad_mask = (m & (mask != 1)).sum() if mask.dtype != torch.bool else torch.zeros((), device=dev)
    x = logp.detach().to(f64) - logp_behaviour.detach().to(f64)
    bad_x = m & ~torch.isfinite(x)
    x = torch.where(m & ~bad_x, x, torch.zeros_like(x))
    lw = x.sum(1)
    log_cap = math.log(tis_cap) if tis_cap is not None else None
    b = lw.shape[0]
    seq = _per_sequence(x, m)
    zero = torch.zeros(b, dtype=torch.long, device=dev)
    parts = [_group_table(lw, seq, zero, 1, log_cap, bins_per_unit)]
    bad_lag = torch.zeros((), device=dev)
    if lag is not None:
        lag_l = lag.to(torch.long)
        bad_lag = (lag_l < 0).sum()
        # bucket = number of edges <= lag, minus 1 (Python scalars: no host-to-device copy)
        gid = (sum((lag_l >= e).to(torch.long) for e in edges) - 1).clamp(min=0)
        parts.append(_group_table(lw, seq, gid, len(edges), log_cap, bins_per_unit))
    header = torch.zeros(N_HEADER, dtype=f64, device=dev)
    header[BAD_LOGP] = bad_x.sum()
    header[BAD_MASK] = bad_mask
    header[BAD_LAG] = bad_lag
    header[HAS_CAP] = float(tis_cap is not None)
    header[LOG_CAP] = log_cap if log_cap is not None else 0.0
    return torch.cat([header] + [p.reshape(-1) for p in parts])
