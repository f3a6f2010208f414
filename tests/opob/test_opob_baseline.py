"""b* per scope against plain-loop references (hypothesis over random scopes)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opob_oracle import ref_coefficients

from vcpo_optim.opob.baseline import scope_baselines, scope_inv_std, weighted_quantile


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(
        st.tuples(
            st.integers(0, 3),
            st.floats(-5, 5, allow_nan=False, width=32),
            st.sampled_from([0.0, 0.0, 0.5, 1.0, 2.0, 7.25]),
        ),
        min_size=1,
        max_size=12,
    ),
    agg=st.sampled_from(["mean", "median", "winsorized_mean"]),
    norm_by_std=st.booleans(),
)
def test_matches_reference(data, agg, norm_by_std):
    sid_raw = [d[0] for d in data]
    r = [float(d[1]) for d in data]
    n = [d[2] for d in data]
    uniq = sorted(set(sid_raw))
    sid = torch.tensor([uniq.index(s) for s in sid_raw])
    rt, nt = torch.tensor(r, dtype=torch.float64), torch.tensor(n, dtype=torch.float64)
    b = scope_baselines(nt, rt, sid, len(uniq), agg)[sid]
    k = scope_inv_std(rt, sid, len(uniq))[sid] if norm_by_std else torch.ones_like(rt)
    ref_b, ref_c = ref_coefficients(n, r, sid_raw, agg, norm_by_std)
    assert torch.allclose(b, torch.tensor(ref_b, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(
        (rt - b) * k, torch.tensor(ref_c, dtype=torch.float64), atol=1e-6, rtol=1e-6
    )


def test_weighted_median_definition():
    v = torch.tensor([3.0, 1.0, 2.0, 10.0])
    w = torch.tensor([1.0, 1.0, 1.0, 1.0])
    sid = torch.zeros(4, dtype=torch.long)
    assert weighted_quantile(v, w, sid, 1, 0.5).item() == 2.0  # lower median
    w = torch.tensor([0.0, 0.0, 0.0, 5.0])
    assert weighted_quantile(v, w, sid, 1, 0.5).item() == 10.0


def test_quantiles_of_a_scope_ignore_other_scopes_weights():
    # scope 0 sorts first and carries huge weights; a running sum over all scopes lost
    # scope 1's weights (lower median of {3.0, 0.5} with equal weights is 0.5).
    for dt in (torch.float64, torch.float32):
        n = torch.tensor([1e30, 1e30, 2.0, 2.0], dtype=dt)
        r = torch.tensor([1.0, 3.0, 3.0, 0.5], dtype=dt)
        sid = torch.tensor([0, 0, 1, 1])
        assert scope_baselines(n, r, sid, 2, "median").tolist() == [1.0, 0.5]
        n = torch.tensor([1e4] * 8 + [1.0, 1.0], dtype=dt)  # float32: 8e4 + 1 - 8e4 != 1
        r = torch.tensor([0.0] * 8 + [5.0, 2.0], dtype=dt)
        sid = torch.tensor([0] * 8 + [1, 1])
        assert weighted_quantile(r, n, sid, 2, 0.5).tolist() == [0.0, 2.0]
        assert scope_baselines(n, r, sid, 2, "winsorized_mean", 0.4).tolist() == [0.0, 3.5]


def test_zero_norms_plain_mean_and_zero_std():
    r = torch.tensor([1.0, 3.0, 2.0, 2.0])
    sid = torch.tensor([0, 0, 1, 1])
    b = scope_baselines(torch.zeros(4), r, sid, 2)
    assert b.tolist() == [2.0, 2.0]
    inv = scope_inv_std(r, sid, 2)
    # a constant scope gives exactly 0 (the contract); 1/std = rsqrt(1) is only as exact as
    # the CPU's rsqrt path, so a tight float32 tolerance instead of bitwise 1.0
    assert inv[1].item() == 0.0
    torch.testing.assert_close(inv[0], torch.tensor(1.0), rtol=2.4e-7, atol=0)


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(
        st.tuples(
            st.integers(0, 3),
            st.floats(-5, 5, allow_nan=False).map(lambda v: 0.0 if abs(v) < 1e-6 else v),
            st.sampled_from([0.0, 0.0, 0.5, 1.0, 2.0, 7.25]),
            st.integers(0, 2),
        ),
        min_size=1,
        max_size=24,
    ),
    offset=st.sampled_from([0.0, 1e6]),
)
def test_sufficient_statistics_match_per_sample_baselines(data, offset):
    """Per-scope sums merged over arbitrary "ranks" give the per-sample mean baseline and 1/std."""
    from vcpo_optim.opob.baseline import merge_stats, scope_stats, stats_baselines, stats_inv_std

    sid = torch.tensor([d[0] for d in data])
    uniq, sid = torch.unique(sid, return_inverse=True)
    ns = uniq.numel()
    r = torch.tensor([d[1] for d in data], dtype=torch.float64) + offset
    n = torch.tensor([d[2] for d in data], dtype=torch.float64)
    part = torch.tensor([d[3] for d in data])
    rows, idx = [], []
    for k in range(3):  # each "rank" sends one row per scope it has samples of
        m = part == k
        if m.any():
            loc, ls = torch.unique(sid[m], return_inverse=True)
            rows.append(scope_stats(n[m], r[m], ls, loc.numel()))
            idx.append(loc)
    merged = merge_stats(torch.cat(rows), torch.cat(idx), ns)
    want_b = scope_baselines(n, r, sid, ns)
    torch.testing.assert_close(stats_baselines(merged), want_b, rtol=1e-12, atol=1e-9)
    want_k = scope_inv_std(r, sid, ns)
    got_k = stats_inv_std(merged)
    assert torch.equal(got_k == 0, want_k == 0)  # equal rewards: exactly zero, elsewhere not
    # both sides lose ~ eps * max|R| / std to the rounding of the inputs' mean: scale with it
    rmax = torch.zeros(ns, dtype=torch.float64).scatter_reduce_(0, sid, r.abs(), "amax")
    rtol = 1e-9 + 1e-15 * rmax * want_k
    assert torch.all((got_k - want_k).abs() <= rtol * want_k), (got_k, want_k)


def test_stats_inv_std_is_zero_for_equal_rewards_whose_spread_rounds_above_zero():
    """Equal rewards must give k = 0 even when the moments say the variance is a tiny positive.

    Rounding makes that happen (the mean of three 0.1 is not 0.1; per-rank means differ in
    the last bit when merged), and 1/sqrt(1e-34) would then scale the scope by 1e17. The
    rows are built by hand so that the case does not depend on the CPU's summation order.
    """
    from vcpo_optim.opob.baseline import merge_stats, scope_stats, stats_inv_std

    v = 0.1
    up = torch.nextafter(
        torch.tensor(v, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    )
    # one scope, three equal rewards, a rounded mean and a spread of ~1e-34
    one = torch.tensor([[3.0, float(up), 5.8e-34, v, v, 0.0, 0.0]], dtype=torch.float64)
    # the same rewards seen by two ranks whose means differ in the last bit, then merged
    rows = torch.tensor(
        [[1.0, v, 0.0, v, v, 0.0, 0.0], [6.0, float(up), 0.0, v, v, 0.0, 0.0]],
        dtype=torch.float64,
    )
    merged = merge_stats(rows, torch.zeros(2, dtype=torch.long), 1)
    assert float(merged[0, 2]) > 0  # the case this test is about: a positive spread
    for rows_of_scope in (one, merged):
        assert stats_inv_std(rows_of_scope).tolist() == [0.0]
    # not constant: a genuine spread keeps its 1/std
    spread = scope_stats(
        None, torch.tensor([v, v, 0.2], dtype=torch.float64), torch.zeros(3, dtype=torch.long), 1
    )
    assert float(stats_inv_std(spread)[0]) > 1.0


def test_scope_inv_std_is_zero_for_equal_rewards_whose_variance_rounds_above_zero():
    """The per-sample twin: three rewards of 0.1 have a mean of 0.10000000000000002.

    Three equal addends sum the same in any order, so the tiny positive variance
    below is the same on every CPU; 1/std would then scale the scope by ~1e17.
    """
    r = torch.full((3,), 0.1, dtype=torch.float64)
    m = r.sum() / 3
    assert float(((r - m) ** 2).sum()) > 0  # the case this test is about
    sid = torch.zeros(3, dtype=torch.long)
    assert scope_inv_std(r, sid, 1).tolist() == [0.0]
    # next to a scope with a spread, in one call
    r2 = torch.cat([r, torch.tensor([0.1, 0.3], dtype=torch.float64)])
    k = scope_inv_std(r2, torch.tensor([0, 0, 0, 1, 1]), 2)
    assert k[0] == 0 and abs(float(k[1]) - 10.0) < 1e-9
