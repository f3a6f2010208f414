"""The off-policy optimal baseline b* per scope (DESIGN.md section 2).

For a scope ``s`` (a prompt group, or the whole batch) with per-sample squared
gradient norms ``n_i`` and rewards ``R_i``:

* ``agg="mean"``: ``b_s = sum_{i in s} n_i R_i / sum_{i in s} n_i``
  (the closed-form minimiser of the variance of ``sum_i (R_i - b) grad l_i``);
* ``agg="median"``: the lower weighted median of ``R`` with weights ``n``:
  ``b_s = min { r : sum_{i in s, R_i <= r} n_i >= 0.5 * sum_{i in s} n_i }``;
* ``agg="winsorized_mean"``: ``R`` clipped to the lower weighted
  ``q`` and ``1 - q`` quantiles (same definition as the median, ``q`` =
  ``winsor_q``, default 0.1), then the ``n``-weighted mean.

When every ``n_i`` in a scope is zero the weights fall back to 1 (plain mean,
median or winsorized mean). The GRPO-style scale is ``k_s = 1 / std_s(R)``
with the population standard deviation; a scope whose rewards are all equal
gets ``k_s = 0`` (its coefficients are zero). Everything is computed in the
dtype of ``sq_norms`` (float32 or float64), vectorised over scopes.

For ``agg="mean"`` the baseline and the scale of a scope are functions of a
few per-scope sums, which is what the data-parallel path reduces instead of
per-sample values (:func:`scope_stats`, :func:`merge_stats`,
:func:`stats_baselines`, :func:`stats_inv_std`; float64). The median and the
winsorized mean need the per-sample values themselves.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "AGGS",
    "N_STATS",
    "REFERENCE_LOSS_AGG_MODES",
    "merge_stats",
    "reference_norm_weights",
    "scope_baselines",
    "scope_inv_std",
    "scope_stats",
    "stats_baselines",
    "stats_inv_std",
    "weighted_quantile",
]

AGGS = ("mean", "median", "winsorized_mean")


def _scope_sum(x: Tensor, sid: Tensor, n_scopes: int) -> Tensor:
    return torch.zeros(n_scopes, dtype=x.dtype, device=x.device).index_add_(0, sid, x)


def _weights(sq_norms: Tensor, sid: Tensor, n_scopes: int) -> Tensor:
    """``n_i``, or 1 for every sample of a scope whose norms are all zero."""
    tot = _scope_sum(sq_norms, sid, n_scopes)
    return torch.where(tot[sid] > 0, sq_norms, torch.ones_like(sq_norms))


def weighted_quantile(
    values: Tensor, weights: Tensor, sid: Tensor, n_scopes: int, q: float
) -> Tensor:
    """Lower weighted ``q``-quantile of ``values`` per scope: ``[n_scopes]``.

    ``min { v : sum_{v_i <= v} w_i >= q * sum w_i }`` within each scope.
    """
    perm = torch.argsort(values, stable=True)
    perm = perm[torch.argsort(sid[perm], stable=True)]
    v, w, s = values[perm], weights[perm].to(torch.float64), sid[perm]
    # Cumulative weights within each scope, one row per scope: a single running sum over
    # all scopes would let a scope with large weights swamp the ones sorted after it.
    counts = torch.bincount(s, minlength=n_scopes)
    pos = torch.arange(v.numel(), device=v.device)
    col = pos - (torch.cumsum(counts, 0) - counts)[s]
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    rows = torch.zeros(n_scopes, width, dtype=torch.float64, device=v.device)
    rows[s, col] = w
    cum = rows.cumsum(1)
    within = cum[s, col]
    tot = cum[:, -1]
    big = torch.full((n_scopes,), v.numel() * 4 + 1, dtype=torch.long, device=v.device)
    last_pos = torch.full_like(big, -1).scatter_reduce_(0, s, pos, "amax")
    ok = within >= q * tot[s]
    pick = big.clone().scatter_reduce_(0, s, torch.where(ok, pos, big[s]), "amin")
    pick = torch.minimum(pick, last_pos).clamp(min=0)
    return v[pick]


def scope_baselines(
    sq_norms: Tensor,
    rewards: Tensor,
    sid: Tensor,
    n_scopes: int,
    agg: str = "mean",
    winsor_q: float = 0.1,
) -> Tensor:
    """``b_s`` for every scope ``s`` (``[n_scopes]``); ``sid[i]`` is sample ``i``'s scope index.

    ``sq_norms``, ``rewards``: ``[N]`` in one float dtype; ``agg`` one of :data:`AGGS`;
    ``winsor_q`` (default 0.1) only used by ``"winsorized_mean"``.
    """
    if agg not in AGGS:
        raise ValueError(f"OPOB: agg must be one of {AGGS}, got {agg!r}")
    w = _weights(sq_norms, sid, n_scopes)
    if agg == "median":
        return weighted_quantile(rewards, w, sid, n_scopes, 0.5)
    r = rewards
    if agg == "winsorized_mean":
        lo = weighted_quantile(rewards, w, sid, n_scopes, winsor_q)
        hi = weighted_quantile(rewards, w, sid, n_scopes, 1.0 - winsor_q)
        r = torch.minimum(torch.maximum(rewards, lo[sid]), hi[sid])
    return _scope_sum(w * r, sid, n_scopes) / _scope_sum(w, sid, n_scopes)


def scope_inv_std(rewards: Tensor, sid: Tensor, n_scopes: int) -> Tensor:
    """``1 / std_s(R)`` (population std) per scope, 0 where all rewards of the scope are equal."""
    cnt = _scope_sum(torch.ones_like(rewards), sid, n_scopes)
    mean = _scope_sum(rewards, sid, n_scopes) / cnt
    var = _scope_sum((rewards - mean[sid]) ** 2, sid, n_scopes) / cnt
    rmax = torch.full_like(mean, -torch.inf).scatter_reduce_(0, sid, rewards, "amax")
    rmin = torch.full_like(mean, torch.inf).scatter_reduce_(0, sid, rewards, "amin")
    const = (rmax == rmin) | (var <= 0)
    return torch.where(
        const, torch.zeros_like(var), torch.rsqrt(torch.where(const, torch.ones_like(var), var))
    )


#: Columns of a sufficient-statistics row: count, mean R, sum (R - mean)^2,
#: min R, max R, sum n, sum n R.
N_STATS = 7


def scope_stats(sq_norms: Tensor | None, rewards: Tensor, sid: Tensor, n_scopes: int) -> Tensor:
    """Per-scope sufficient statistics ``[n_scopes, N_STATS]`` in float64.

    Columns: count, mean ``R``, ``sum (R - mean)^2`` (two-pass, no
    cancellation), min ``R``, max ``R``, ``sum n``, ``sum n R``
    (the last two are 0 when ``sq_norms`` is ``None``). An empty scope has
    count 0, mean 0, min ``+inf`` and max ``-inf``.
    """
    r = rewards.to(torch.float64)
    cnt = _scope_sum(torch.ones_like(r), sid, n_scopes)
    mean = _scope_sum(r, sid, n_scopes) / cnt.clamp(min=1)
    m2 = _scope_sum((r - mean[sid]) ** 2, sid, n_scopes)
    rmin = torch.full_like(mean, torch.inf).scatter_reduce_(0, sid, r, "amin")
    rmax = torch.full_like(mean, -torch.inf).scatter_reduce_(0, sid, r, "amax")
    if sq_norms is None:
        sn = snr = torch.zeros_like(mean)
    else:
        n = sq_norms.to(torch.float64)
        sn = _scope_sum(n, sid, n_scopes)
        snr = _scope_sum(n * r, sid, n_scopes)
    return torch.stack([cnt, mean, m2, rmin, rmax, sn, snr], dim=1)


def merge_stats(rows: Tensor, idx: Tensor, n_scopes: int) -> Tensor:
    """Combine rows of :func:`scope_stats` (row ``j`` belongs to scope ``idx[j]``): ``[n_scopes, N_STATS]``.

    Means and squared deviations are combined exactly (Chan et al.):
    ``M2 = sum_j (M2_j + count_j (mean_j - mean)^2)``. Deterministic on CPU.
    """
    rows = rows.to(torch.float64)
    c = rows[:, 0]
    cnt = _scope_sum(c, idx, n_scopes)
    mean = _scope_sum(c * rows[:, 1], idx, n_scopes) / cnt.clamp(min=1)
    m2 = _scope_sum(rows[:, 2] + c * (rows[:, 1] - mean[idx]) ** 2, idx, n_scopes)
    rmin = torch.full_like(mean, torch.inf).scatter_reduce_(0, idx, rows[:, 3], "amin")
    rmax = torch.full_like(mean, -torch.inf).scatter_reduce_(0, idx, rows[:, 4], "amax")
    sn = _scope_sum(rows[:, 5], idx, n_scopes)
    snr = _scope_sum(rows[:, 6], idx, n_scopes)
    return torch.stack([cnt, mean, m2, rmin, rmax, sn, snr], dim=1)


def stats_baselines(stats: Tensor) -> Tensor:
    """``agg="mean"`` baseline per scope from :func:`scope_stats` rows (plain mean where ``sum n = 0``)."""
    sn, snr, mean = stats[:, 5], stats[:, 6], stats[:, 1]
    pos = sn > 0
    return torch.where(pos, snr / torch.where(pos, sn, torch.ones_like(sn)), mean)


def stats_inv_std(stats: Tensor) -> Tensor:
    """``1 / std_s(R)`` (population) from :func:`scope_stats` rows; 0 where all rewards are equal."""
    var = stats[:, 2] / stats[:, 0].clamp(min=1)
    const = (stats[:, 4] == stats[:, 3]) | (var <= 0)
    return torch.where(
        const, torch.zeros_like(var), torch.rsqrt(torch.where(const, torch.ones_like(var), var))
    )


# ----------------------------------------------------------------------------- the research code

#: ``loss_agg_mode`` values the research code allows with its gradient baseline.
REFERENCE_LOSS_AGG_MODES = ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def reference_norm_weights(
    lengths: Tensor,
    log_weights: Tensor | None = None,
    *,
    loss_agg_mode: str = "seq-mean-token-mean",
    normalize_by_length: bool = False,
    use_is_weights: bool = True,
    is_threshold: float | None = None,
) -> Tensor:
    r"""``norm_weights`` that make OPOB's baseline the research code's (mit-han-lab/vcpo).

    The research code (``compute_opob_baseline`` in
    ``recipe/fully_async_policy/staleness_utils.py``, with the per-trajectory norm of
    ``MegatronPPOActor._compute_grad_norms``) weights reward ``R_i`` by

        ``W_i = (L_i ||grad l_i||)^2 * w_i^2 / (L_i^2 if normalize_by_length)``

    where ``l_i`` is its per-trajectory loss (advantage 1, the truncated weight
    ``min(w_i, rollout_is_threshold)`` inside, token mean over the ``L_i``
    response tokens for ``loss_agg_mode="seq-mean-token-mean"``), the factor
    ``L_i`` appears only in that mode (it rescales the token-mean gradient to
    the token-sum one), and ``w_i = exp(lw_i)`` is the untruncated sequence
    weight (``use_clipped_is_ratios=True``: ``min(w_i, threshold)``; the factor
    is absent with ``use_is_weights=False``). With OPOB's ``n_i = ||grad l_i||^2``
    of the same loss, ``W_i = m_i n_i`` with the ``m_i`` returned here:

        ``m_i = L_i^2 [token mean] / L_i^2 [normalize_by_length] * w_i^2 [use_is_weights]``

    computed in float64 in log space. Pass ``opob.backward(loss, rewards, groups,
    norm_weights=m)`` with ``OPOB(..., agg=..., norm_by_std=...)`` as in the
    reference's config (``winsor_q=0.05`` for its winsorized mean; see the README,
    "Differences from the research code", for what is not reproduced: the
    ``eps=1e-8`` in its denominators and its float32 overflow).

    Args:
        lengths: ``[B]`` response lengths ``L_i >= 1`` (tokens in the loss).
        log_weights: ``[B]`` sequence log importance weights
            ``lw_i = sum_t (log pi_theta - log mu)`` (the reference's
            ``rollout_seq_is`` is ``exp(lw_i)``); required when ``use_is_weights``.
        loss_agg_mode: the reference's ``loss_agg_mode`` (one of
            :data:`REFERENCE_LOSS_AGG_MODES`; default ``"seq-mean-token-mean"``).
        normalize_by_length: ``grad_baselining.normalize_by_length`` (default ``False``).
        use_is_weights: ``grad_baselining.use_is_weights`` (default ``True``).
        is_threshold: ``rollout_is_threshold`` when ``use_clipped_is_ratios=True``
            (weights ``min(w_i, is_threshold)``); default ``None`` (untruncated,
            the reference's default ``use_clipped_is_ratios=False``).

    Returns:
        ``[B]`` float64 multipliers (on the device of ``lengths``).

    Raises:
        ValueError: a bad mode, lengths that are not finite and ``>= 1``, missing or
            non-finite log weights, a threshold that is not ``> 0``, or weights whose
            square overflows float64 (``lw_i`` above about 350; the reference's own
            float32 ``exp`` overflows from ``lw_i > 88.7``).
    """
    if loss_agg_mode not in REFERENCE_LOSS_AGG_MODES:
        raise ValueError(
            f"reference_norm_weights: loss_agg_mode must be one of {REFERENCE_LOSS_AGG_MODES} "
            f"(the modes the research code allows with its baseline), got {loss_agg_mode!r}"
        )
    length = torch.as_tensor(lengths).to(torch.float64)
    if length.dim() != 1:
        raise ValueError(f"reference_norm_weights: lengths must be [B], got {tuple(length.shape)}")
    if not bool(torch.isfinite(length).all()) or bool((length < 1).any()):
        raise ValueError("reference_norm_weights: lengths must be finite and >= 1")
    log_m = torch.zeros_like(length)
    if loss_agg_mode == "seq-mean-token-mean":
        log_m = log_m + 2 * length.log()
    if normalize_by_length:
        log_m = log_m - 2 * length.log()
    if use_is_weights:
        if log_weights is None:
            raise ValueError("reference_norm_weights: use_is_weights=True needs log_weights")
        lw = torch.as_tensor(log_weights).to(device=length.device, dtype=torch.float64)
        if tuple(lw.shape) != tuple(length.shape):
            raise ValueError(
                f"reference_norm_weights: log_weights must have the shape of lengths "
                f"{tuple(length.shape)}, got {tuple(lw.shape)}"
            )
        if not bool(torch.isfinite(lw).all()):
            raise ValueError("reference_norm_weights: log_weights contain NaN or Inf")
        if is_threshold is not None:
            if not is_threshold > 0:
                raise ValueError(
                    f"reference_norm_weights: is_threshold must be > 0, got {is_threshold}"
                )
            lw = lw.clamp(max=math.log(is_threshold))
        log_m = log_m + 2 * lw
    m = log_m.exp()
    if not bool(torch.isfinite(m).all()):
        raise ValueError(
            "reference_norm_weights: w_i^2 L_i^2 overflows float64 (log weights above about "
            "350); the research code itself is NaN from lw_i > 88.7 (float32 exp)"
        )
    return m
