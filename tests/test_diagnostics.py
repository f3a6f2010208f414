"""offpolicy_stats against a direct high-precision reference, its quantile sketch and its errors."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vcpo_optim import diagnostics as D
from vcpo_optim.diagnostics import OffPolicyStats, offpolicy_stats
from vcpo_optim.losses import sequence_log_weights

mpmath.mp.dps = 60

SUMS = (
    "ess_ratio",
    "token_ess_ratio",
    "log_weight_mean",
    "log_weight_std",
    "k3_kl_token_mean",
    "k3_kl_sequence_mean",
    "chi2",
    "log_mean_weight",
    "length_mean",
)
EXACT = ("n_sequences", "n_tokens", "log_weight_min", "log_weight_max", "length_min", "length_max")


def make_batch(
    b: int, t: int, seed: int, scale: float = 0.3, extreme: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 log-probs with ragged masks; ``extreme`` adds a few |log r| of that size."""
    g = torch.Generator().manual_seed(seed)
    old = -3.0 * torch.rand(b, t, generator=g, dtype=torch.float64)
    new = old + scale * torch.randn(b, t, generator=g, dtype=torch.float64)
    if extreme and b * t:
        hit = torch.rand(b, t, generator=g) < 0.05
        sign = torch.where(torch.rand(b, t, generator=g) < 0.5, -1.0, 1.0).double()
        new = torch.where(hit, old + sign * extreme, new)
    mask = torch.rand(b, t, generator=g) < 0.8
    if b:
        mask[0, :] = False  # a trajectory with no response token
    return new, old, mask


def reference(new, old, mask, cap=None) -> dict[str, float]:
    """Direct computation in 60-digit arithmetic from the token log ratios."""
    b = new.shape[0]
    xs = [
        [float(new[i, j]) - float(old[i, j]) for j in range(new.shape[1]) if mask[i, j]]
        for i in range(b)
    ]
    # the log weights are the library's float64 sums (checked against math.fsum in test_losses)
    lw = sequence_log_weights(new, old, mask).tolist()
    toks = [v for r in xs for v in r]
    mp = mpmath.mpf
    w = [mpmath.exp(mp(v)) for v in lw]
    r = [mpmath.exp(mp(v)) for v in toks]
    n, ntok = len(lw), len(toks)
    mean = mpmath.fsum(lw) / n
    k3 = mpmath.fsum(mpmath.exp(mp(v)) - 1 - mp(v) for v in toks)
    lengths = [len(rw) for rw in xs]
    out = {
        "n_sequences": n,
        "n_tokens": ntok,
        "ess_ratio": mpmath.fsum(w) ** 2 / mpmath.fsum(v * v for v in w) / n,
        "token_ess_ratio": mpmath.fsum(r) ** 2 / mpmath.fsum(v * v for v in r) / ntok,
        "log_weight_mean": mean,
        "log_weight_std": mpmath.sqrt(mpmath.fsum((mp(v) - mean) ** 2 for v in lw) / n),
        "log_weight_min": min(lw),
        "log_weight_max": max(lw),
        "k3_kl_token_mean": k3 / ntok,
        "k3_kl_sequence_mean": k3 / n,
        "chi2": n * mpmath.fsum(v * v for v in w) / mpmath.fsum(w) ** 2 - 1,
        "log_mean_weight": mpmath.log(mpmath.fsum(w) / n),
        "length_mean": mp(sum(lengths)) / n,
        "length_min": min(lengths),
        "length_max": max(lengths),
    }
    if cap is not None:
        out["frac_above_tis_cap"] = sum(v > math.log(cap) for v in lw) / n
    return {k: float(v) for k, v in out.items()}, sorted(lw)


def assert_matches(stats: OffPolicyStats, ref: dict[str, float], rtol: float = 1e-12) -> None:
    for name, want in ref.items():
        got = float(getattr(stats, name))
        if name in EXACT or name == "frac_above_tis_cap":
            assert got == want, name
        else:
            assert got == pytest.approx(want, rel=rtol, abs=1e-13), name


def exact_quantile(sorted_lw: list[float], q: int) -> float:
    k = max(1, -(-q * len(sorted_lw) // 100))  # ceil(q n / 100), integers only
    return sorted_lw[k - 1]


def check_quantiles(stats: OffPolicyStats, sorted_lw: list[float], bpu: int = 16) -> None:
    errs = stats.quantile_error.tolist()
    for q, name, err in zip(D.QUANTILES, ("p50", "p90", "p99"), errs):
        got = float(getattr(stats, f"log_weight_{name}"))
        want = exact_quantile(sorted_lw, q)
        assert abs(got - want) <= err, (name, got, want, err)
        if err == 0:
            assert got == want
        # the bound never exceeds half the width of want's bin (|lw| <= 1e4)
        j = math.floor(math.asinh(want) * bpu)
        width = math.sinh((j + 1) / bpu) - math.sinh(j / bpu)
        assert err <= 0.5 * width * (1 + 1e-12)


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    ("b", "t", "scale", "extreme"), [(9, 13, 0.3, 0.0), (40, 30, 0.05, 0.0), (12, 20, 0.3, 30.0)]
)
def test_every_field_matches_high_precision_reference(b, t, scale, extreme) -> None:
    new, old, mask = make_batch(b, t, seed=b, scale=scale, extreme=extreme)
    stats = offpolicy_stats(new, old, mask, tis_cap=2.0)
    ref, lw = reference(new, old, mask, cap=2.0)
    assert_matches(stats, ref)
    check_quantiles(stats, lw)
    assert set(stats.as_dict(prefix="p/")) == {f"p/{k}" for k in OffPolicyStats.FIELDS}


def test_extreme_log_ratios_stay_finite_in_log_space() -> None:
    """|log r| up to 1e3 per token, sequence log weights beyond 1e4: no overflow."""
    new, old, mask = make_batch(6, 40, seed=3, scale=0.1)
    mask[:, :] = True
    new = new.clone()
    new[1, :] = old[1, :] + 300.0  # lw = 12000: beyond the quantile grid
    new[2, :5] = old[2, :5] - 1000.0
    new[3, 0] = old[3, 0] + 700.0  # K3 term ~ 1e304: the sums stay finite
    stats = offpolicy_stats(new, old, mask)
    ref, _ = reference(new, old, mask)
    assert_matches(stats, ref, rtol=1e-11)
    assert float(stats.log_weight_max) == 12000.0 and float(stats.ess_ratio) == pytest.approx(1 / 6)
    # a token ratio of exp(1000): the K3 mean exceeds float64 and says so (inf), nothing else breaks
    new[4, 0] = old[4, 0] + 1000.0
    stats = offpolicy_stats(new, old, mask)
    assert math.isinf(float(stats.k3_kl_token_mean))
    assert math.isfinite(float(stats.ess_ratio)) and math.isfinite(float(stats.chi2))


def test_identical_policies() -> None:
    new, _, mask = make_batch(5, 7, seed=1)
    s = offpolicy_stats(new, new.clone(), mask, tis_cap=1.0)
    assert float(s.ess_ratio) == 1.0 and float(s.token_ess_ratio) == 1.0
    assert float(s.k3_kl_token_mean) == 0.0 and float(s.chi2) == 0.0
    assert float(s.log_weight_std) == 0.0 and float(s.frac_above_tis_cap) == 0.0
    assert s.quantile_error.tolist() == [0.0, 0.0, 0.0]


def test_low_precision_inputs_are_read_exactly() -> None:
    new, old, mask = make_batch(8, 300, seed=2)
    new16, old32 = new.to(torch.bfloat16), old.to(torch.float32)
    stats = offpolicy_stats(new16, old32, mask)
    ref, _ = reference(new16.double(), old32.double(), mask)
    assert_matches(stats, ref)
    assert stats.ess_ratio.dtype == torch.float64


# --------------------------------------------------------------------------- quantile sketch


@settings(max_examples=40, deadline=None)
@given(
    st.integers(min_value=1, max_value=400),
    st.sampled_from([1e-3, 0.05, 1.0, 30.0]),
    st.integers(min_value=0, max_value=2**31 - 1),
)
def test_quantiles_within_their_stated_bound(b: int, spread: float, seed: int) -> None:
    """Many values per bin (spread 1e-3) down to one per bin: the stated bound always holds."""
    g = torch.Generator().manual_seed(seed)
    lw = spread * torch.randn(b, generator=g, dtype=torch.float64)
    new, old = lw[:, None].clone(), torch.zeros(b, 1, dtype=torch.float64)
    stats = offpolicy_stats(new, old, torch.ones(b, 1, dtype=torch.bool))
    check_quantiles(stats, sorted(lw.tolist()))
    assert float(stats.log_weight_min) == float(lw.min()) and float(stats.log_weight_max) == float(
        lw.max()
    )


def test_quantiles_exact_when_bins_hold_at_most_two_values() -> None:
    lw = torch.tensor(
        [-3.0, -1.0, 0.0, 0.001, 0.5, 2.0, 7.0, 40.0, 300.0, 2e4], dtype=torch.float64
    )
    stats = offpolicy_stats(lw[:, None], torch.zeros(10, 1, dtype=torch.float64), torch.ones(10, 1))
    assert stats.quantile_error.tolist() == [0.0, 0.0, 0.0]
    assert [
        float(stats.log_weight_p50),
        float(stats.log_weight_p90),
        float(stats.log_weight_p99),
    ] == [
        0.5,
        300.0,
        2e4,
    ]


def test_resolution_parameter() -> None:
    g = torch.Generator().manual_seed(0)
    lw = 0.2 * torch.randn(3000, generator=g, dtype=torch.float64)
    args = (lw[:, None], torch.zeros(3000, 1, dtype=torch.float64), torch.ones(3000, 1))
    coarse = offpolicy_stats(*args, quantile_bins_per_unit=2)
    fine = offpolicy_stats(*args, quantile_bins_per_unit=256)
    check_quantiles(coarse, sorted(lw.tolist()), bpu=2)
    check_quantiles(fine, sorted(lw.tolist()), bpu=256)
    assert float(fine.quantile_error.max()) < float(coarse.quantile_error.max())


# --------------------------------------------------------------------------- lag buckets and merging


def test_lag_buckets_equal_the_stats_of_their_subsets() -> None:
    new, old, mask = make_batch(30, 11, seed=4)
    lag = torch.tensor([0, 1, 2, 3, 4, 9, 17, 300, 255, 256] * 3)
    stats = offpolicy_stats(new, old, mask, lag=lag, tis_cap=1.5)
    assert stats.lag_labels == (
        "0",
        "1",
        "2-3",
        "4-7",
        "8-15",
        "16-31",
        "32-63",
        "64-127",
        "128-255",
        "256+",
    )
    edges = D.DEFAULT_LAG_BUCKETS
    for j, lo in enumerate(edges):
        hi = edges[j + 1] if j + 1 < len(edges) else 10**9
        sel = (lag >= lo) & (lag < hi)
        if not sel.any():
            assert float(stats.by_lag.n_sequences[j]) == 0
            assert math.isnan(float(stats.by_lag.ess_ratio[j]))
            continue
        sub = offpolicy_stats(new[sel], old[sel], mask[sel], tis_cap=1.5)
        for name in OffPolicyStats.FIELDS:
            a, b = float(getattr(stats.by_lag, name)[j]), float(getattr(sub, name))
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(
                b, rel=1e-12, abs=1e-14
            ), name
        assert torch.equal(stats.by_lag.quantile_error[j], sub.quantile_error)
    d = stats.as_dict()
    assert "offpolicy/lag_256+/ess_ratio" in d and "offpolicy/lag_32-63/ess_ratio" not in d
    custom = offpolicy_stats(new, old, mask, lag=lag, lag_buckets=(0, 5))
    assert custom.lag_labels == ("0-4", "5+")
    assert float(custom.by_lag.n_sequences.sum()) == 30


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=4),
    st.integers(0, 2**31 - 1),
)
def test_merging_rank_rows_equals_the_whole_batch(sizes: list[int], seed: int) -> None:
    """The rows of any split (empty parts included) merge into the single-batch result."""
    new, old, mask = make_batch(sum(sizes), 5, seed=seed, scale=2.0)
    lag = torch.randint(0, 40, (sum(sizes),), generator=torch.Generator().manual_seed(seed))
    whole = offpolicy_stats(new, old, mask, lag=lag, tis_cap=3.0)
    rows, start = [], 0
    for n in sizes:
        sl = slice(start, start + n)
        rows.append(
            D._local_row(new[sl], old[sl], mask[sl], lag[sl], 3.0, D.DEFAULT_LAG_BUCKETS, 16)
        )
        start += n
    table = torch.stack(rows)[:, D.N_HEADER :].reshape(
        len(sizes), 1 + len(D.DEFAULT_LAG_BUCKETS), -1
    )
    merged = D._finalize(D._merge(table), True, torch.tensor(True))
    for name, v in merged.items():
        want = torch.cat(
            [
                getattr(whole, name).reshape(1, -1),
                getattr(whole.by_lag, name).reshape(len(D.DEFAULT_LAG_BUCKETS), -1),
            ]
        )
        torch.testing.assert_close(
            v.reshape(want.shape), want, rtol=1e-12, atol=1e-13, equal_nan=True
        )


# --------------------------------------------------------------------------- errors


def test_invalid_values_poison_the_result_and_raise_when_read() -> None:
    new, old, mask = make_batch(4, 6, seed=5)
    bad = new.clone()
    bad[1, 2] = float("nan")
    mask[1, 2] = True
    s = offpolicy_stats(bad, old, mask)
    assert math.isnan(float(s.ess_ratio)) and math.isnan(float(s.log_weight_p50))
    with pytest.raises(ValueError, match="1 NaN/Inf log-prob"):
        s.as_dict()
    # padding may hold anything
    pad = new.clone()
    pad[~mask] = float("nan")
    assert offpolicy_stats(pad, old, mask).as_dict()["offpolicy/n_sequences"] == 4
    with pytest.raises(ValueError, match="mask value"):
        offpolicy_stats(new, old, torch.full((4, 6), 0.5)).check()
    with pytest.raises(ValueError, match="negative lag"):
        offpolicy_stats(new, old, mask, lag=torch.tensor([0, -1, 2, 3])).as_dict()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"logp": torch.zeros(3)}, "2-D"),
        ({"mask": torch.ones(4, 5)}, "same shape"),
        ({"logp": torch.zeros(4, 6, dtype=torch.long)}, "floating-point"),
        ({"lag": torch.zeros(4)}, "integer"),
        ({"lag": torch.zeros(3, dtype=torch.long)}, "shape"),
        ({"tis_cap": 0.0}, "tis_cap"),
        ({"lag_buckets": (1, 2)}, "lag_buckets"),
        ({"lag_buckets": (0, 4, 4)}, "lag_buckets"),
        ({"quantile_bins_per_unit": 0}, "quantile_bins_per_unit"),
    ],
)
def test_malformed_input_raises_at_once(kwargs, match) -> None:
    new, old, mask = make_batch(4, 6, seed=6)
    args = {
        "logp": new,
        "logp_behaviour": old,
        "mask": mask,
        "lag": torch.zeros(4, dtype=torch.long),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        offpolicy_stats(**args)


def test_empty_batch() -> None:
    e = torch.zeros(0, 5, dtype=torch.float64)
    s = offpolicy_stats(
        e, e, torch.zeros(0, 5, dtype=torch.bool), lag=torch.zeros(0, dtype=torch.long)
    )
    assert float(s.n_sequences) == 0 and math.isnan(float(s.ess_ratio))
    with pytest.raises(ValueError, match="empty batch"):
        s.as_dict()


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="host syncs are only observable on a CUDA device"
)
def test_no_host_sync_on_cuda() -> None:
    new, old, mask = (t.cuda() for t in make_batch(64, 128, seed=7))
    lag = torch.randint(0, 50, (64,), device="cuda")
    offpolicy_stats(new, old, mask, lag=lag, tis_cap=8.0)  # warm-up (kernels, allocator)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = offpolicy_stats(new, old, mask, lag=lag, tis_cap=8.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = offpolicy_stats(new.cpu(), old.cpu(), mask.cpu(), lag=lag.cpu(), tis_cap=8.0)
    for name in OffPolicyStats.FIELDS:
        torch.testing.assert_close(
            getattr(stats, name).cpu(), getattr(ref, name), rtol=1e-12, atol=1e-13
        )
