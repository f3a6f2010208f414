"""offpolicy_stats and ess_truncation_cap across 2 real gloo ranks against the whole batch.

The module is also the worker script: pytest launches it once as a 2-process job
and compares each rank's results with the single-process result on the
concatenated batch (unequal and empty local batches, faults on one rank).
"""

from __future__ import annotations

import os

import pytest
import torch
from _harness import errors, launch, values, worker_main

WORLD = 2
T = 12
TIS_CAP = 2.0

# ---------------------------------------------------------------------------- shared data


def token_batch(seed: int, sizes: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """A global token batch of ``sum(sizes)`` trajectories with heavy-tailed log ratios."""
    g = torch.Generator().manual_seed(seed)
    b = sum(sizes)
    old = -3.0 * torch.rand(b, T, generator=g, dtype=torch.float64)
    x = 0.4 * torch.randn(b, T, generator=g, dtype=torch.float64)
    x = torch.where(torch.rand(b, T, generator=g) < 0.05, 40.0 * x, x)
    mask = torch.rand(b, T, generator=g) < 0.8
    if b:
        mask[b // 2] = False  # one trajectory without response tokens
    return {
        "new": (old + x).to(torch.bfloat16),  # a bf16 learner, float64 sampler
        "old": old,
        "mask": mask,
        "lag": torch.randint(0, 40, (b,), generator=g),
        "lw": 3.0 * torch.randn(b, generator=g, dtype=torch.float64),
    }


def local(batch: dict[str, torch.Tensor], sizes: tuple[int, ...], rank: int):
    start = sum(sizes[:rank])
    return {k: v[start : start + sizes[rank]] for k, v in batch.items()}


def stats_dict(stats) -> dict[str, torch.Tensor]:
    """Every tensor field of an OffPolicyStats, the per-lag ones prefixed with ``lag/``."""
    from vcpo_optim.diagnostics import OffPolicyStats

    out = {}
    for name in (*OffPolicyStats.FIELDS, "quantile_error"):
        if getattr(stats, name) is not None:
            out[name] = getattr(stats, name)
            if stats.by_lag is not None:
                out["lag/" + name] = getattr(stats.by_lag, name)
    return out


# ---------------------------------------------------------------------------- worker side


def _rank() -> int:
    return int(os.environ["RANK"])


def _diag(seed, sizes, group="world", **kw):
    from vcpo_optim.diagnostics import offpolicy_stats

    d = local(token_batch(seed, sizes), sizes, _rank())
    stats = offpolicy_stats(
        d["new"], d["old"], d["mask"], lag=d["lag"], tis_cap=TIS_CAP, process_group=group, **kw
    )
    return {"fields": stats_dict(stats), "as_dict": stats.as_dict()}


def s_diag_uneven():
    return _diag(1, (5, 2))


def s_diag_empty_rank():
    return _diag(2, (6, 0))


def s_diag_empty_rank0_explicit_group():
    import torch.distributed as dist

    return _diag(3, (0, 7), group=dist.new_group([0, 1]))


def s_diag_fine_quantiles():
    return _diag(4, (30, 17), quantile_bins_per_unit=64)


def _diag_error(mutate):
    """Run offpolicy_stats with a fault injected on one rank; report what each rank saw."""
    from vcpo_optim.diagnostics import offpolicy_stats

    sizes = (4, 3)
    d = local(token_batch(5, sizes), sizes, _rank())
    kw = {"lag": d["lag"], "tis_cap": TIS_CAP, "process_group": "world"}
    mutate(d, kw)
    try:
        stats = offpolicy_stats(d["new"], d["old"], d["mask"], **kw)
    except ValueError as exc:
        return {"raised": str(exc)}
    nan = bool(torch.isnan(stats.ess_ratio))
    try:
        stats.as_dict()
    except ValueError as exc:
        return {"nan": nan, "as_dict": str(exc)}
    return {"nan": nan, "as_dict": None}


def s_diag_nan_rank1():
    def mutate(d, kw):
        if _rank() == 1:
            d["new"] = d["new"].clone()
            d["mask"] = d["mask"].clone()
            d["new"][0, 0] = float("nan")
            d["mask"][0, 0] = True

    return _diag_error(mutate)


def s_diag_malformed_rank0():
    def mutate(d, kw):
        if _rank() == 0:
            d["mask"] = d["mask"][:, :-1]

    return _diag_error(mutate)


def s_diag_cap_mismatch():
    def mutate(d, kw):
        kw["tis_cap"] = 2.0 if _rank() == 0 else 3.0

    return _diag_error(mutate)


def _cap(seed, sizes, rho, **kw):
    from vcpo_optim.losses import ess_truncation_cap

    d = local(token_batch(seed, sizes), sizes, _rank())
    return ess_truncation_cap(d["lw"], rho, process_group="world", **kw)


def s_cap_uneven():
    return [_cap(6, (5, 2), rho) for rho in (0.2, 0.5, 0.9, 1.0)]


def s_cap_empty_rank():
    return [_cap(7, (0, 6), rho) for rho in (0.3, 0.8)]


def s_cap_masked():
    from vcpo_optim.losses import ess_truncation_cap

    sizes = (4, 4)
    d = local(token_batch(8, sizes), sizes, _rank())
    lw = d["lw"].clone()
    mask = torch.ones(4, dtype=torch.bool)
    if _rank() == 1:
        mask[:] = False  # everything masked: nothing contributed
        lw[0] = float("nan")
    return ess_truncation_cap(lw, 0.7, mask=mask, process_group="world")


def s_cap_importance_weights():
    from vcpo_optim.losses import importance_weights

    sizes = (3, 5)
    d = local(token_batch(9, sizes), sizes, _rank())
    return importance_weights(d["lw"], "tis", ess_target=0.6, process_group="world")


def s_cap_nan_rank1():
    lw = local(token_batch(10, (3, 3)), (3, 3), _rank())["lw"].clone()
    if _rank() == 1:
        lw[1] = float("nan")
    from vcpo_optim.losses import ess_truncation_cap

    ess_truncation_cap(lw, 0.5, process_group="world")


def s_cap_malformed_rank0():
    from vcpo_optim.losses import ess_truncation_cap

    lw = local(token_batch(11, (3, 3)), (3, 3), _rank())["lw"]
    mask = torch.ones(5, dtype=torch.bool) if _rank() == 0 else None
    ess_truncation_cap(lw, 0.5, mask=mask, process_group="world")


def s_cap_empty_global():
    from vcpo_optim.losses import ess_truncation_cap

    ess_truncation_cap(torch.zeros(0, dtype=torch.float64), 0.5, process_group="world")


SCENARIOS = {name[2:]: fn for name, fn in list(globals().items()) if name.startswith("s_")}

# ----------------------------------------------------------------------------- tests

# order statistics, counts and extremes are merged exactly (bitwise); sums to rounding
EXACT = {
    "n_sequences",
    "n_tokens",
    "log_weight_min",
    "log_weight_max",
    "log_weight_p50",
    "log_weight_p90",
    "log_weight_p99",
    "quantile_error",
    "length_min",
    "length_max",
    "frac_above_tis_cap",
}


@pytest.fixture(scope="module")
def res():
    return launch(__file__, WORLD)


def _single(seed, sizes, **kw):
    from vcpo_optim.diagnostics import offpolicy_stats

    d = token_batch(seed, sizes)
    return offpolicy_stats(d["new"], d["old"], d["mask"], lag=d["lag"], tis_cap=TIS_CAP, **kw)


@pytest.mark.parametrize(
    ("name", "seed", "sizes", "kw"),
    [
        ("diag_uneven", 1, (5, 2), {}),
        ("diag_empty_rank", 2, (6, 0), {}),
        ("diag_empty_rank0_explicit_group", 3, (0, 7), {}),
        ("diag_fine_quantiles", 4, (30, 17), {"quantile_bins_per_unit": 64}),
    ],
)
def test_offpolicy_stats_equal_single_process_on_concatenated_batch(res, name, seed, sizes, kw):
    ref_stats = _single(seed, sizes, **kw)
    ref = stats_dict(ref_stats)
    vs = values(res, name)
    for v in vs:
        assert set(v["fields"]) == set(ref)
        for field, want in ref.items():
            got = v["fields"][field]
            base = field.removeprefix("lag/")
            if base in EXACT:
                assert torch.equal(torch.nan_to_num(got, 7.0), torch.nan_to_num(want, 7.0)), field
            else:
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13, equal_nan=True)
        assert v["as_dict"].keys() == ref_stats.as_dict().keys()
    # every rank holds the bit-identical result
    for field in vs[0]["fields"]:
        a, b = vs[0]["fields"][field], vs[1]["fields"][field]
        assert torch.equal(torch.nan_to_num(a, 7.0), torch.nan_to_num(b, 7.0)), field
    assert float(ref_stats.ess_ratio) < 0.9  # the weights are really non-uniform


def test_offpolicy_stats_nan_on_one_rank_raises_on_every_rank_when_read(res):
    vs = values(res, "diag_nan_rank1")
    for v in vs:
        assert v["nan"] is True
        assert "rank 1: 1 NaN/Inf log-prob" in v["as_dict"]
    assert vs[0]["as_dict"] == vs[1]["as_dict"]


def test_offpolicy_stats_malformed_rank_raises_and_nobody_hangs(res):
    v0, v1 = values(res, "diag_malformed_rank0")
    assert "rank 0" in v0["raised"] and "same shape" in v0["raised"]
    assert v1["nan"] is True and "rank 0: malformed input" in v1["as_dict"]


def test_offpolicy_stats_different_caps_are_refused(res):
    for v in values(res, "diag_cap_mismatch"):
        assert "different tis_cap" in v["as_dict"]


def _ref_cap(seed, sizes, rho, **kw):
    from vcpo_optim.losses import ess_truncation_cap

    return ess_truncation_cap(token_batch(seed, sizes)["lw"], rho, **kw)


def test_ess_cap_equals_single_process(res):
    for name, seed, sizes, rhos in (
        ("cap_uneven", 6, (5, 2), (0.2, 0.5, 0.9, 1.0)),
        ("cap_empty_rank", 7, (0, 6), (0.3, 0.8)),
    ):
        vs = values(res, name)
        for rho, got0, got1 in zip(rhos, *vs):
            want = _ref_cap(seed, sizes, rho)
            # the same values in the same order: bit-identical to the single process
            assert torch.equal(got0, want) and torch.equal(got1, want), (name, rho)
    finite = [float(c) for c in values(res, "cap_uneven")[0]]
    assert sum(c != float("inf") for c in finite) >= 2  # the cap is really active


def test_ess_cap_masked_rank(res):
    want = _ref_cap(8, (4, 4), 0.7, mask=torch.tensor([True] * 4 + [False] * 4))
    for v in values(res, "cap_masked"):
        assert torch.equal(v, want)


def test_importance_weights_with_global_ess_target(res):
    from vcpo_optim.losses import importance_weights

    sizes = (3, 5)
    want = importance_weights(token_batch(9, sizes)["lw"], "tis", ess_target=0.6)
    got = torch.cat(values(res, "cap_importance_weights"))
    assert torch.equal(got, want)
    assert float(want.max()) < float(token_batch(9, sizes)["lw"].exp().max())


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("cap_nan_rank1", "rank 1: 1 NaN and 0 infinite"),
        ("cap_malformed_rank0", "rank 0: malformed input"),
        ("cap_empty_global", "empty batch"),
    ],
)
def test_ess_cap_errors_raise_on_every_rank(res, name, needle):
    errs = errors(res, name)
    for kind, msg in errs:
        assert kind == "ValueError" and needle in msg
    if name == "cap_malformed_rank0":
        assert errs[0][1].startswith(errs[1][1]) and "mask has shape" in errs[0][1]
    else:
        assert errs[0] == errs[1]


if __name__ == "__main__":
    worker_main(SCENARIOS)
