"""Log-space ESS against a float64 reference, its properties and its errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vcpo_optim import effective_sample_size

finite_logs = st.lists(
    st.floats(min_value=-30.0, max_value=30.0, allow_nan=False, allow_infinity=False),
    min_size=1,
    max_size=64,
)


def reference_ess(log_w: list[float]) -> float:
    """Direct float64 formula on weights shifted by their max (exact in exact arithmetic)."""
    m = max(log_w)
    w = [math.exp(x - m) for x in log_w]
    return sum(w) ** 2 / sum(v * v for v in w)


@settings(max_examples=200, deadline=None)
@given(finite_logs)
def test_matches_float64_reference(log_w: list[float]) -> None:
    res = effective_sample_size(log_weights=torch.tensor(log_w, dtype=torch.float64))
    ref = reference_ess(log_w)
    assert res.ess.dtype == torch.float64
    assert int(res.n) == len(log_w)
    assert math.isclose(float(res.ess), ref, rel_tol=1e-12)
    assert math.isclose(float(res.ratio), ref / len(log_w), rel_tol=1e-12)
    # the weights form and the log form agree where exp() is representable
    w = torch.tensor(log_w, dtype=torch.float64).exp()
    assert math.isclose(float(effective_sample_size(w).ess), ref, rel_tol=1e-10)


@settings(max_examples=100, deadline=None)
@given(finite_logs, st.randoms(use_true_random=False))
def test_bounds_and_permutation_invariance(log_w: list[float], rnd) -> None:
    lw = torch.tensor(log_w, dtype=torch.float64)
    res = effective_sample_size(log_weights=lw)
    n = len(log_w)
    assert 1.0 - 1e-12 <= float(res.ess) <= n * (1 + 1e-12)
    assert 1.0 / n - 1e-12 <= float(res.ratio) <= 1.0 + 1e-12
    perm = list(range(n))
    rnd.shuffle(perm)
    shuffled = effective_sample_size(log_weights=lw[perm])
    assert math.isclose(float(shuffled.ess), float(res.ess), rel_tol=1e-12)


@settings(max_examples=100, deadline=None)
@given(finite_logs, st.floats(min_value=-5e3, max_value=5e3))
def test_scale_invariance(log_w: list[float], shift: float) -> None:
    lw = torch.tensor(log_w, dtype=torch.float64)
    a = effective_sample_size(log_weights=lw)
    b = effective_sample_size(log_weights=lw + shift)
    assert math.isclose(float(a.ess), float(b.ess), rel_tol=1e-9)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 128, 1000])
@pytest.mark.parametrize("value", [0.0, 0.37, -12.5, 1000.0, 1e4, -1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equal_weights_give_ratio_exactly_one(n: int, value: float, dtype: torch.dtype) -> None:
    res = effective_sample_size(log_weights=torch.full((n,), value, dtype=dtype))
    assert float(res.ratio) == 1.0
    assert float(res.ess) == float(n)


def test_extreme_log_weights_in_float32() -> None:
    # exp(89) already overflows float32: the reference's exp(sum) becomes inf and its ESS NaN.
    lw = torch.tensor([1e4, 1e4 - math.log(2.0), -1e4, 500.0], dtype=torch.float32)
    naive = lw.exp()
    assert torch.isnan(naive.sum() ** 2 / (naive**2).sum())
    res = effective_sample_size(log_weights=lw)
    # exact for the float32 values given (relative weights ~1, ~1/2, 0, 0)
    assert math.isclose(float(res.ess), reference_ess(lw.double().tolist()), rel_tol=1e-12)
    assert math.isclose(float(res.ess), 1.5**2 / 1.25, rel_tol=1e-3)
    # weights in float32 spanning many orders of magnitude
    w = torch.tensor([3e38, 1e-38, 0.0, 2e38], dtype=torch.float32)
    ref = reference_ess([math.log(float(v)) for v in w.tolist() if v > 0] + [-math.inf])
    assert math.isclose(float(effective_sample_size(w).ess), ref, rel_tol=1e-12)


def test_single_dominant_weight_gives_ess_one() -> None:
    res = effective_sample_size(log_weights=torch.tensor([1000.0, 0.0, 0.0, 0.0]))
    assert math.isclose(float(res.ess), 1.0, rel_tol=1e-12)
    assert math.isclose(float(res.ratio), 0.25, rel_tol=1e-12)


def test_mask_excludes_entries_even_invalid_ones() -> None:
    lw = torch.tensor([0.5, float("nan"), 1.5, float("inf"), -2.0])
    mask = torch.tensor([True, False, True, False, True])
    res = effective_sample_size(log_weights=lw, mask=mask)
    assert int(res.n) == 3
    assert math.isclose(float(res.ess), reference_ess([0.5, 1.5, -2.0]), rel_tol=1e-12)
    # an integer 0/1 mask means the same
    res01 = effective_sample_size(log_weights=lw, mask=mask.to(torch.int64))
    assert float(res01.ess) == float(res.ess)


def test_zero_weights_count_in_n() -> None:
    res = effective_sample_size(torch.tensor([2.0, 0.0, 0.0, 2.0]))
    assert int(res.n) == 4
    assert float(res.ess) == 2.0
    assert float(res.ratio) == 0.5


def test_multidimensional_input_is_flattened() -> None:
    w = torch.rand(3, 4, dtype=torch.float64) + 0.1
    assert float(effective_sample_size(w).ess) == float(effective_sample_size(w.reshape(-1)).ess)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": torch.tensor([1.0, float("nan"), float("nan")])}, "2 NaN"),
        ({"weights": torch.tensor([1.0, float("inf")])}, "1 infinite"),
        ({"weights": torch.tensor([1.0, -0.5, -2.0, 3.0])}, "2 negative"),
        ({"log_weights": torch.tensor([0.0, float("inf")])}, "1 infinite"),
        ({"log_weights": torch.tensor([0.0, float("-inf")])}, "1 infinite"),
        ({"log_weights": torch.tensor([float("nan")])}, "1 NaN"),
        ({"weights": torch.tensor([])}, "empty batch"),
        (
            {"weights": torch.tensor([1.0, 2.0]), "mask": torch.tensor([False, False])},
            "empty batch",
        ),
        ({"weights": torch.zeros(5)}, "all 5 importance weights are zero"),
        ({"weights": torch.ones(3), "mask": torch.ones(4, dtype=torch.bool)}, "mask has shape"),
        ({"weights": torch.ones(3), "log_weights": torch.ones(3)}, "exactly one"),
        ({}, "exactly one"),
    ],
)
def test_bad_input_raises_value_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        effective_sample_size(**kwargs)


def test_error_message_counts_nan_inf_and_negative_together() -> None:
    w = torch.tensor([float("nan"), float("inf"), -1.0, 1.0, -3.0])
    with pytest.raises(ValueError, match=r"1 NaN, 1 infinite, 2 negative value\(s\) among 5"):
        effective_sample_size(w)


def test_lists_are_accepted() -> None:
    assert float(effective_sample_size([1.0, 1.0, 1.0]).ratio) == 1.0


def test_process_group_without_init_is_an_error() -> None:
    class FakeGroup:
        pass

    with pytest.raises(ValueError, match="not initialised"):
        effective_sample_size(torch.ones(3), process_group=FakeGroup())
    # "world" without an initialised default group simply means no reduction
    assert float(effective_sample_size(torch.ones(3), process_group="world").ess) == 3.0
