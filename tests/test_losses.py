"""Tests for vcpo_optim.losses: hand-computed cases, autograd identities, properties."""

from __future__ import annotations

import math
from fractions import Fraction

import mpmath
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vcpo_optim import losses as L


@pytest.fixture(autouse=True)
def _float64() -> object:
    """Run every test in float64 and restore the default dtype afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# --------------------------------------------------------------------------- advantages


def test_grpo_hand_computed() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    g = torch.tensor([7, 7, 7, 7, 3, 3])
    a = L.grpo_advantages(r, g, eps=0.0)
    # group 7: mean 0.5, population std 0.5 -> +-1, through a sqrt and a division: a tight
    # tolerance (bitwise would assume every CPU's vector sqrt/div is correctly rounded);
    # group 3: all equal -> exactly 0, which is the documented contract
    torch.testing.assert_close(
        a, torch.tensor([1.0, -1.0, -1.0, 1.0, 0.0, 0.0]), rtol=1e-15, atol=0
    )
    assert torch.equal(a[4:], torch.zeros(2))
    a2 = L.grpo_advantages(r, g, norm_by_std=False)
    # sums of 0/1 and a division by 4: every intermediate is exact, in any summation order
    assert torch.equal(a2, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0]))


def test_grpo_population_std_and_eps() -> None:
    r = torch.tensor([0.0, 1.0, 2.0])
    std = math.sqrt(2.0 / 3.0)  # population std
    a = L.grpo_advantages(r, eps=1e-6)
    expected = (r - 1.0) / (std + 1e-6)
    assert torch.allclose(a, expected, atol=0, rtol=1e-12)


def test_zero_std_gives_exact_zero_despite_rounding() -> None:
    r = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7], dtype=torch.float32)
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    for adv in (
        L.grpo_advantages(r, g),
        L.grpo_advantages(r, g, norm_by_std=False),
        L.rloo_advantages(r, g),
        L.rloo_advantages(r, g, norm_by_std=True),
    ):
        assert torch.equal(adv, torch.zeros_like(r))


def test_rloo_hand_computed() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 3.0, 5.0])
    g = torch.tensor([0, 0, 0, 1, 1])
    a = L.rloo_advantages(r, g)
    expected = torch.tensor([1.0, -0.5, -0.5, -2.0, 2.0])
    assert torch.allclose(a, expected)
    # equals n/(n-1) (R - mean)
    a_norm = L.rloo_advantages(r, g, norm_by_std=True)
    std0 = math.sqrt(((1 - 1 / 3) ** 2 + 2 * (1 / 3) ** 2) / 3)
    assert torch.allclose(a_norm[:3], expected[:3] / std0)
    assert torch.allclose(a_norm[3:], expected[3:] / 1.0)


def test_rloo_singleton_group_raises() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        L.rloo_advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]))


def test_reinforce_and_dispatch() -> None:
    r = torch.tensor([1.0, 0.0, 2.0])
    assert torch.equal(L.reinforce_advantages(r), r)
    assert torch.equal(L.reinforce_advantages(r, 0.5), r - 0.5)
    assert torch.equal(L.compute_advantages(r, estimator="reinforce"), r)
    g = torch.tensor([0, 0, 0])
    assert torch.equal(L.compute_advantages(r, g, "grpo"), L.grpo_advantages(r, g))
    assert torch.equal(L.compute_advantages(r, g, "rloo"), L.rloo_advantages(r, g))
    with pytest.raises(ValueError, match="unknown estimator"):
        L.compute_advantages(r, g, "ppo")  # type: ignore[arg-type]


def test_integer_rewards_and_noncontiguous_group_ids() -> None:
    r = torch.tensor([1, 0, 1, 1])
    g = torch.tensor([100, -5, 100, -5])
    a = L.grpo_advantages(r, g, eps=0.0)
    assert a.dtype == torch.get_default_dtype()
    # +-1 through sqrt and division: tight tolerance; the constant group is exactly 0
    torch.testing.assert_close(a, torch.tensor([0.0, -1.0, 0.0, 1.0]), rtol=1e-15, atol=0)
    assert a[0].item() == 0.0 and a[2].item() == 0.0


@pytest.mark.parametrize(
    "rewards, groups, match",
    [
        (torch.tensor([1.0, float("nan")]), None, "NaN"),
        (torch.tensor([1.0, float("inf")]), None, "Inf"),
        (torch.zeros(2, 2), None, "1-D"),
        (torch.zeros(0), None, "empty"),
        (torch.zeros(3), torch.tensor([0, 1]), "entries"),
        (torch.zeros(2), torch.tensor([0.0, 1.0]), "integer"),
    ],
)
def test_advantage_validation(
    rewards: torch.Tensor, groups: torch.Tensor | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        L.grpo_advantages(rewards, groups)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=3), min_size=2, max_size=24),
    st.integers(min_value=0, max_value=2**31 - 1),
)
def test_grpo_properties(group_list: list[int], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    g = torch.tensor(group_list)
    r = torch.randint(0, 3, (len(group_list),), generator=gen).double()
    a = L.grpo_advantages(r, g, norm_by_std=False)
    for gid in g.unique():
        sel = g == gid
        # advantages sum to zero in each group; exact zeros where the group is constant
        assert abs(a[sel].sum().item()) < 1e-9
        if r[sel].unique().numel() == 1:
            assert torch.equal(a[sel], torch.zeros_like(a[sel]))
    a_std = L.grpo_advantages(r, g, eps=0.0)
    for gid in g.unique():
        sel = g == gid
        if r[sel].unique().numel() > 1:
            # population std of normalized advantages is 1
            assert abs(a_std[sel].std(unbiased=False).item() - 1.0) < 1e-9


# --------------------------------------------------------------------------- weights


def test_sequence_log_weights_hand_computed() -> None:
    new = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, float("nan"), -float("inf")]])
    old = torch.tensor([[-1.5, -1.0, -9.0], [-0.25, 0.0, float("nan")]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    lw = L.sequence_log_weights(new, old, mask)
    assert torch.equal(lw, torch.tensor([0.5 - 1.0, -0.25]))
    assert not lw.requires_grad


def test_sequence_log_weights_identical_policies_exact_zero() -> None:
    x = torch.randn(5, 7)
    mask = torch.rand(5, 7) > 0.3
    assert torch.equal(L.sequence_log_weights(x, x.clone(), mask), torch.zeros(5))


def test_sequence_log_weights_validation() -> None:
    a = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="shape"):
        L.sequence_log_weights(a, torch.zeros(2, 4), m)
    with pytest.raises(ValueError, match="shape of the log-probs"):
        L.sequence_log_weights(a, a, torch.ones(2, 2))
    with pytest.raises(ValueError, match="NaN values at response"):
        L.sequence_log_weights(torch.tensor([[0.0, float("nan"), 0.0]] * 2), a, m)
    with pytest.raises(ValueError, match="0 and 1"):
        L.sequence_log_weights(a, a, torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="2-D"):
        L.sequence_log_weights(torch.zeros(3), torch.zeros(3), torch.ones(3))


def test_importance_weight_modes() -> None:
    lw = torch.tensor([0.0, math.log(2.0), math.log(8.0), math.log(20.0), -3.0, 1000.0])
    w_none = L.importance_weights(lw, "none")
    assert torch.equal(w_none, torch.ones(6))
    w_tis = L.importance_weights(lw, "tis", c=8.0)
    assert torch.allclose(w_tis, torch.tensor([1.0, 2.0, 8.0, 8.0, math.exp(-3.0), 8.0]))
    w_mis = L.importance_weights(lw, "mis", c=8.0)
    assert torch.allclose(w_mis, torch.tensor([1.0, 2.0, 8.0, 0.0, math.exp(-3.0), 0.0]))
    w_is = L.importance_weights(lw[:5], "is")
    assert torch.allclose(w_is, torch.tensor([1.0, 2.0, 8.0, 20.0, math.exp(-3.0)]))
    with pytest.raises(ValueError, match="overflow"):
        L.importance_weights(lw, "is")
    with pytest.raises(ValueError, match="threshold"):
        L.importance_weights(lw, "tis", c=0.0)
    with pytest.raises(ValueError, match="unknown IS mode"):
        L.importance_weights(lw, "clip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN"):
        L.importance_weights(torch.tensor([float("nan")]), "tis")


def test_importance_weights_are_detached() -> None:
    lw = torch.tensor([0.3, -0.2], requires_grad=True)
    for mode in L.IS_MODES:
        assert not L.importance_weights(lw, mode).requires_grad  # type: ignore[arg-type]


# --------------------------------------------------------------------------- surrogates


def _batch(b: int = 4, t: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=gen) * 3
    mask = torch.rand(b, t, generator=gen) > 0.3
    mask[:, 0] = True
    return logp, mask


def test_per_sample_loss_hand_computed() -> None:
    logp = torch.tensor([[-1.0, -3.0, -100.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([2.0, -1.0])
    w = torch.tensor([0.5, 4.0])
    l1 = L.per_sample_pg_loss(logp, mask, adv, w, "seq-mean-token-mean")
    # trajectory 0: -0.5*2*(-4/2)/2 = 1; trajectory 1: -4*(-1)*(-6/3)/2 = -4
    assert torch.allclose(l1, torch.tensor([1.0, -4.0]))
    l2 = L.per_sample_pg_loss(logp, mask, adv, w, "seq-mean-token-sum")
    assert torch.allclose(l2, torch.tensor([-0.5 * 2 * -4 / 2, -4 * -1 * -6 / 2]))
    l3 = L.per_sample_pg_loss(logp, mask, adv, w, "token-mean")
    assert torch.allclose(l3, torch.tensor([-0.5 * 2 * -4 / 5, -4 * -1 * -6 / 5]))
    # token-mean: the vector sums to the mean over all response tokens of -w A logp
    tok = -(w * adv)[:, None] * logp
    assert torch.allclose(l3.sum(), tok[mask].mean())


def test_defaults_are_ones() -> None:
    logp, mask = _batch()
    ones = torch.ones(logp.shape[0])
    for agg in L.AGGREGATIONS:
        a = L.per_sample_pg_loss(logp, mask, agg=agg)  # type: ignore[arg-type]
        b = L.per_sample_pg_loss(logp, mask, ones, ones, agg)  # type: ignore[arg-type]
        assert torch.equal(a, b)


def test_empty_response_contributes_zero() -> None:
    logp = torch.tensor([[-1.0, -2.0], [-5.0, -5.0]])
    mask = torch.tensor([[True, True], [False, False]])
    for agg in L.AGGREGATIONS:
        loss = L.per_sample_pg_loss(logp, mask, torch.ones(2), agg=agg)  # type: ignore[arg-type]
        assert loss[1].item() == 0.0
        assert torch.isfinite(loss).all()


@pytest.mark.parametrize("agg", L.AGGREGATIONS)
def test_entry_i_depends_only_on_sample_i(agg: str) -> None:
    logp, mask = _batch(b=4, t=6, seed=3)
    logp.requires_grad_(True)
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0])
    w = torch.tensor([0.2, 1.0, 7.0, 2.0])
    loss = L.per_sample_pg_loss(logp, mask, adv, w, agg)  # type: ignore[arg-type]
    for i in range(4):
        (g,) = torch.autograd.grad(loss[i], logp, retain_graph=True)
        others = torch.ones(4, dtype=torch.bool)
        others[i] = False
        assert torch.equal(g[others], torch.zeros_like(g[others]))


def test_sequence_is_gradient_identity() -> None:
    """grad of the seq-IS surrogate = -(1/B) sum_i w_i A_i grad log pi(tau_i)."""
    torch.manual_seed(0)
    b, t, v = 6, 5, 4
    logits_param = torch.randn(t, v, requires_grad=True)
    tokens = torch.randint(0, v, (b, t))
    mask = torch.rand(b, t) > 0.25
    mask[:, 0] = True

    def token_logp() -> torch.Tensor:
        lp = torch.log_softmax(logits_param, dim=-1)  # [t, v], same policy for every sample
        return lp.gather(1, tokens.T).T  # [b, t]

    logp_old = (token_logp() + 0.3 * torch.randn(b, t)).detach()
    adv = torch.randn(b)
    out = L.off_policy_pg_loss(
        token_logp(), logp_old, mask, adv, is_mode="is", agg="seq-mean-token-sum"
    )
    (g_loss,) = torch.autograd.grad(out.per_sample_loss.sum(), logits_param)

    expected = torch.zeros_like(logits_param)
    for i in range(b):
        lp = token_logp()
        log_pi = lp[i][mask[i]].sum()
        (g_i,) = torch.autograd.grad(log_pi, logits_param)
        w_i = math.exp((lp[i] - logp_old[i])[mask[i]].sum().item())
        expected += -(w_i * adv[i].item() / b) * g_i
    assert torch.allclose(g_loss, expected, rtol=1e-10, atol=1e-12)
    assert torch.allclose(out.weights, out.log_weights.exp())


def test_tis_gradient_uses_truncated_weight() -> None:
    logp = torch.tensor([[-1.0, -1.0], [-2.0, -0.5]], requires_grad=True)
    old = torch.tensor([[-4.0, -4.0], [-2.0, -0.5]])  # lw = 6 (w ~ 403) and 0 (w = 1)
    mask = torch.ones(2, 2, dtype=torch.bool)
    adv = torch.tensor([1.0, 1.0])
    out = L.off_policy_pg_loss(logp, old, mask, adv, is_mode="tis", c=8.0, agg="seq-mean-token-sum")
    assert torch.allclose(out.log_weights, torch.tensor([6.0, 0.0]))
    assert torch.allclose(out.weights, torch.tensor([8.0, 1.0]))
    (g,) = torch.autograd.grad(out.per_sample_loss.sum(), logp)
    assert torch.allclose(g, torch.tensor([[-4.0, -4.0], [-0.5, -0.5]]))
    out_mis = L.off_policy_pg_loss(logp, old, mask, adv, is_mode="mis", c=8.0)
    assert out_mis.per_sample_loss[0].item() == 0.0


def test_k0_on_policy_weights_exactly_one() -> None:
    logp, mask = _batch()
    out = L.off_policy_pg_loss(logp, logp.clone(), mask, torch.ones(4), is_mode="is")
    assert torch.equal(out.log_weights, torch.zeros(4))
    assert torch.equal(out.weights, torch.ones(4))


def test_surrogate_validation() -> None:
    logp, mask = _batch()
    with pytest.raises(ValueError, match="advantages has 3 entries"):
        L.per_sample_pg_loss(logp, mask, torch.ones(3))
    with pytest.raises(ValueError, match="negative"):
        L.per_sample_pg_loss(logp, mask, None, -torch.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        L.per_sample_pg_loss(logp, mask, torch.tensor([1.0, float("nan"), 0.0, 0.0]))
    with pytest.raises(ValueError, match="unknown aggregation"):
        L.per_sample_pg_loss(logp, mask, agg="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="floating-point"):
        L.per_sample_pg_loss(logp.long(), mask)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(min_value=1, max_value=8),
    st.integers(min_value=1, max_value=6),
    st.sampled_from(L.AGGREGATIONS),
    st.integers(min_value=0, max_value=2**31 - 1),
)
def test_sum_of_vector_matches_batch_loss(b: int, t: int, agg: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=gen) * 4
    mask = torch.rand(b, t, generator=gen) > 0.4
    adv = torch.randn(b, generator=gen)
    w = torch.rand(b, generator=gen) * 5
    vec = L.per_sample_pg_loss(logp, mask, adv, w, agg)  # type: ignore[arg-type]
    tok = -(w * adv)[:, None] * logp * mask
    lengths = mask.sum(1).clamp(min=1)
    if agg == "seq-mean-token-mean":
        ref = (tok.sum(1) / lengths).mean()
    elif agg == "seq-mean-token-sum":
        ref = tok.sum(1).mean()
    else:
        ref = tok.sum() / mask.sum().clamp(min=1)
    assert torch.allclose(vec.sum(), ref, atol=1e-12)


# --------------------------------------------------------------------------- precision (issue 8.3)


def _bf16_policy_batch(
    b: int, t: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 learner log-probs, float32 sampler log-probs, ragged response mask."""
    gen = torch.Generator().manual_seed(seed)
    confident = torch.rand(b, t, generator=gen) < 0.7
    e = torch.empty(b, t, dtype=torch.float64).exponential_(1.0, generator=gen)
    old = torch.where(confident, -1e-3 * e, -2.0 * e).to(torch.float32)
    new = (old.double() + 0.05 * torch.randn(b, t, generator=gen, dtype=torch.float64)).clamp(max=0)
    mask = torch.arange(t)[None, :] < torch.randint(t // 2, t + 1, (b, 1), generator=gen)
    return new.to(torch.bfloat16), old, mask


def _fsum_log_weights(new: torch.Tensor, old: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Correctly rounded sum_t mask (new - old) per row (math.fsum of the exact terms)."""
    out = []
    for i in range(new.shape[0]):
        m = mask[i]
        terms = new[i][m].double().tolist() + [-v for v in old[i][m].double().tolist()]
        out.append(math.fsum(terms))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("t", [1024, 8192])
def test_sequence_log_weights_bf16_policy_is_exact(t: int) -> None:
    """bf16 logp_new and float32 logp_old: the log weight is the float64 sum (was off by ~0.3 nats)."""
    new, old, mask = _bf16_policy_batch(8, t, seed=t)
    lw = L.sequence_log_weights(new, old, mask)
    ref = _fsum_log_weights(new, old, mask)
    torch.testing.assert_close(lw.double(), ref, rtol=0, atol=1e-10)
    assert lw.dtype == torch.float64
    # the mean (GSPO) form is the same sum divided by the length
    lw_mean = L.sequence_log_weights(new, old, mask, reduce="mean")
    torch.testing.assert_close(lw_mean, ref / mask.sum(1), rtol=1e-15, atol=0)


def test_importance_weights_from_low_precision_log_weights() -> None:
    """bf16 log weights are exact inputs; the weights are computed in at least float32."""
    lw = torch.tensor([0.5, -1.25, 3.0, 2.0], dtype=torch.bfloat16)
    exact = torch.tensor([0.5, -1.25, 3.0, 2.0], dtype=torch.float64).exp()
    for mode in ("is", "tis", "mis"):
        w = L.importance_weights(lw, mode, c=8.0)  # type: ignore[arg-type]
        ref = exact.clone()
        if mode == "tis":
            ref = ref.clamp(max=8.0)
        elif mode == "mis":
            ref = torch.where(ref > 8.0, torch.zeros_like(ref), ref)
        torch.testing.assert_close(w.double(), ref, rtol=2e-7, atol=0)
        assert w.dtype == torch.float32


@pytest.mark.parametrize("agg", L.AGGREGATIONS)
def test_per_sample_loss_of_bf16_logp_is_float32_and_grad_reaches_bf16(agg: str) -> None:
    """The surrogate of a bf16 policy is summed in float32; the gradient still flows to bf16 logp."""
    new, _, mask = _bf16_policy_batch(6, 1024, seed=1)
    logp = new.clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(2)
    adv = torch.randn(6, generator=gen, dtype=torch.float32)
    w = torch.rand(6, generator=gen, dtype=torch.float64) * 3
    loss = L.per_sample_pg_loss(logp, mask, adv, w, agg)  # type: ignore[arg-type]
    # float64 reference on the same (bf16-valued) inputs
    lp = new.double() * mask
    lengths = mask.sum(1).double()
    coef = -(adv.double() * w)
    if agg == "seq-mean-token-mean":
        ref = coef * lp.sum(1) / lengths / 6
        g_ref = (coef / lengths / 6)[:, None] * mask
    elif agg == "seq-mean-token-sum":
        ref = coef * lp.sum(1) / 6
        g_ref = (coef / 6)[:, None] * mask
    else:
        ref = coef * lp.sum(1) / lengths.sum()
        g_ref = (coef / lengths.sum())[:, None] * mask
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
    assert loss.dtype == torch.float32
    (g,) = torch.autograd.grad(loss.sum(), logp)
    assert g.dtype == torch.bfloat16
    # the bf16 gradient is the token coefficient rounded to bf16 (within half a bf16 ulp)
    torch.testing.assert_close(g.double(), g_ref, rtol=2**-8, atol=0)


def test_advantages_of_bf16_rewards_are_exact() -> None:
    """Group sums of bf16 rewards ran in bf16 (integers above 256 are not representable)."""
    gen = torch.Generator().manual_seed(0)
    r = (torch.rand(1200, generator=gen) < 0.3).to(torch.bfloat16)
    g = torch.arange(1200) % 2
    r64 = r.double()
    for fn in (L.grpo_advantages, L.rloo_advantages):
        a = fn(r, g)
        ref = fn(r64, g)
        torch.testing.assert_close(a.double(), ref, rtol=1e-6, atol=1e-6)
        assert a.dtype == torch.float32
    a = L.reinforce_advantages(r, 0.3)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a.double(), r64 - 0.3, rtol=0, atol=1e-7)


# --------------------------------------------------------------------------- masking rules (issue 11.2)


def _extreme_pair(b: int = 6, t: int = 9, seed: int = 0):
    """float64 log-probs with padding holding garbage and token log ratios up to |1e3|."""
    gen = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(b, t, generator=gen)
    x = 0.8 * torch.randn(b, t, generator=gen)
    x[0, 1], x[1, 2], x[2, 0], x[3, 3] = 1000.0, -1000.0, 700.0, -0.6931471805599453
    new = old + x
    mask = torch.rand(b, t, generator=gen) > 0.25
    mask[0, 1] = mask[1, 2] = mask[2, 0] = True
    mask[4] = False  # no response token
    new = torch.where(mask, new, torch.full_like(new, float("nan")))
    old = torch.where(mask, old, torch.full_like(old, -float("inf")))
    return new, old, mask


def _rows(new, old, mask):
    """Per row, the list of exact token log ratios (Python floats) of the response tokens."""
    return [
        [float(new[i, j]) - float(old[i, j]) for j in range(new.shape[1]) if mask[i, j]]
        for i in range(new.shape[0])
    ]


def test_token_log_ratios_and_gspo_mean() -> None:
    new, old, mask = _extreme_pair()
    x = L.token_log_ratios(new, old, mask)
    assert x.dtype == torch.float64 and torch.equal(x[~mask], torch.zeros_like(x[~mask]))
    rows = _rows(new, old, mask)
    mean = L.sequence_log_weights(new, old, mask, reduce="mean")
    for i, r in enumerate(rows):
        assert float(mean[i]) == pytest.approx(math.fsum(r) / len(r) if r else 0.0, rel=1e-15)
    with pytest.raises(ValueError, match="unknown reduce"):
        L.sequence_log_weights(new, old, mask, reduce="max")  # type: ignore[arg-type]


def test_icepop_mask_hand_reference() -> None:
    new, old, mask = _extreme_pair()
    keep = L.icepop_mask(new, old, mask, low=0.5, high=5.0)
    assert keep.dtype == torch.bool and not keep[~mask].any()
    for i in range(new.shape[0]):
        for j in range(new.shape[1]):
            if mask[i, j]:
                x = float(new[i, j]) - float(old[i, j])
                r = mpmath.exp(x)
                assert bool(keep[i, j]) == (0.5 <= r <= 5.0), (i, j, x)
    assert not keep[0, 1] and not keep[1, 2] and not keep[2, 0]  # log r = 1e3, -1e3, 700
    with pytest.raises(ValueError, match="low <= high"):
        L.icepop_mask(new, old, mask, low=2.0, high=1.0)


def test_icepop_band_is_closed() -> None:
    """Ratios exactly at ``low`` and ``high`` are kept (``low <= r <= high``), the next float64
    outside is not. (``_extreme_pair`` puts ``log 0.5`` in float32, so it misses the bound.)"""
    lo, hi = math.log(0.5), math.log(5.0)
    x = [lo, hi, math.nextafter(lo, -math.inf), math.nextafter(hi, math.inf), 0.0]
    new = torch.tensor([x], dtype=torch.float64)
    old = torch.zeros_like(new)  # x = new - old exactly
    keep = L.icepop_mask(new, old, torch.ones_like(new, dtype=torch.bool), low=0.5, high=5.0)
    assert keep.tolist() == [[True, True, False, False, True]]


def _k_stat(estimator: str, x: float):
    x = mpmath.mpf(x)
    if estimator == "k1":
        return x
    if estimator == "k2":
        return x * x / 2
    return mpmath.exp(x) - 1 - x


@pytest.mark.parametrize("estimator", L.REJECTION_ESTIMATORS)
@pytest.mark.parametrize("level", L.REJECTION_LEVELS)
def test_rejection_mask_hand_reference(estimator: str, level: str) -> None:
    new, old, mask = _extreme_pair(b=8, t=7, seed=1)
    upper, lower = (2.0, 0.6) if estimator == "k1" else (0.35, None)
    keep = L.rejection_mask(
        new, old, mask, estimator=estimator, level=level, upper=upper, lower=lower
    )  # type: ignore[arg-type]

    def passes(s) -> bool:
        if estimator == "k1":
            return mpmath.log(lower) <= s <= mpmath.log(upper)
        return s <= upper

    rows = _rows(new, old, mask)
    if level == "token":
        assert keep.shape == mask.shape and not keep[~mask].any()
        for i in range(new.shape[0]):
            js = [j for j in range(new.shape[1]) if mask[i, j]]
            for j, x in zip(js, rows[i]):
                assert bool(keep[i, j]) == passes(_k_stat(estimator, x)), (i, j, x)
        return
    assert keep.shape == (new.shape[0],)
    for i, r in enumerate(rows):
        stats = [_k_stat(estimator, x) for x in r]
        if level == "seq-max":
            want = all(passes(s) for s in stats)
        else:
            total = mpmath.fsum(stats) if stats else mpmath.mpf(0)
            want = passes(total / len(stats) if (level == "seq-mean" and stats) else total)
        assert bool(keep[i]) == want, (i, r)


def test_rejection_geometric_mean_and_k1_default_lower() -> None:
    new = torch.tensor([[0.0, -1.0, -2.0], [0.0, 0.0, 0.0]])
    old = torch.tensor([[-1.0, -1.0, -1.5], [-0.1, -0.1, -0.1]])  # x = [1, 0, -0.5], [0.1] * 3
    mask = torch.ones(2, 3, dtype=torch.bool)
    geo = L.rejection_mask(new, old, mask, estimator="k1", level="seq-mean", upper=1.2)
    # geometric means exp(1/6) = 1.18 and exp(0.1) = 1.105, both in [1/1.2, 1.2]
    assert geo.tolist() == [True, True]
    assert L.rejection_mask(
        new, old, mask, estimator="k1", level="seq-mean", upper=1.1
    ).tolist() == [False, False]
    assert L.rejection_mask(new, old, mask, estimator="k1", level="token", upper=2.0).tolist() == [
        [False, True, True],
        [True, True, True],
    ]
    for kw, match in (
        ({"estimator": "k5", "upper": 1.0}, "unknown estimator"),
        ({"level": "seq", "upper": 1.0}, "unknown level"),
        ({"estimator": "k2", "upper": 1.0, "lower": 0.5}, "lower must be None"),
        ({"estimator": "k3", "upper": -1.0}, "upper must be >= 0"),
        ({"estimator": "k1", "upper": 2.0, "lower": 3.0}, "ratio bounds"),
        ({"estimator": "k1", "upper": float("inf")}, "finite"),
    ):
        with pytest.raises(ValueError, match=match):
            L.rejection_mask(new, old, mask, **kw)  # type: ignore[arg-type]


def _m2po_loop(x, mask, tau, adv=None):
    """Algorithm 1 of the M2PO paper, literally: remove argmax while the mean exceeds tau.

    The mean is compared with tau in exact rational arithmetic on the float64 values
    ``q = x * x`` and ``tau`` (the rule m2po_mask documents); an infinite q makes the mean
    infinite.
    """
    b, t = len(x), len(x[0])
    cand = [
        (i * t + j)
        for i in range(b)
        for j in range(t)
        if mask[i][j]
        and (adv is None or (adv[i] > 0 and x[i][j] > 0) or (adv[i] < 0 and x[i][j] < 0))
    ]
    q = {k: x[k // t][k % t] * x[k // t][k % t] for k in cand}  # IEEE: inf on overflow
    keep = [[bool(mask[i][j]) for j in range(t)] for i in range(b)]
    live = list(cand)

    def mean_exceeds_tau() -> bool:
        if any(math.isinf(q[k]) for k in live):
            return True
        return sum(Fraction(q[k]) for k in live) > Fraction(tau) * len(live)

    while live and mean_exceeds_tau():
        top = max(q[k] for k in live)
        k = min(k for k in live if q[k] == top)  # argmax: first occurrence in [B, T] order
        live.remove(k)
        keep[k // t][k % t] = False
    return keep


# Knife-edge float64 cases (a prefix mean within rounding of tau) on which the former
# float cumsum test ``prefix <= tau * count`` kept the wrong number of tokens.
@example(4, 8, 0.01, False, 6, torch.float64)
@example(3, 6, 0.04, False, 18, torch.float64)
@example(5, 6, 0.01, True, 20, torch.float64)
@example(4, 7, 0.04, True, 23318, torch.float64)
@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    st.integers(min_value=1, max_value=5),
    st.integers(min_value=1, max_value=8),
    st.sampled_from([0.0, 0.01, 0.04, 0.3]),
    st.booleans(),
    st.integers(min_value=0, max_value=2**31 - 1),
    st.sampled_from([torch.float32, torch.float64]),
)
def test_m2po_mask_matches_algorithm_1(b, t, tau, use_adv, seed, dtype) -> None:
    """Closed form == Algorithm 1 (exact comparison with tau) on quantised log ratios.

    Deterministic: derandomized examples, explicit dtype (not the default dtype, which
    the autouse fixture sets once per test, not per example). In float64, ``old + x``
    rounds so that ``q = (new - old)^2`` lands within an ulp of ``0.01``/``0.04``
    (= tau): prefix means then tie with tau up to rounding.
    """
    gen = torch.Generator().manual_seed(seed)
    # quantised log ratios produce ties; a few extreme ones
    x = torch.round(torch.randn(b, t, generator=gen, dtype=dtype) * 4) / 10
    x = torch.where(torch.rand(b, t, generator=gen, dtype=dtype) < 0.05, x * 1e3, x)
    old = -torch.rand(b, t, generator=gen, dtype=dtype)
    new = old + x
    mask = torch.rand(b, t, generator=gen, dtype=dtype) > 0.3
    adv = torch.randn(b, generator=gen, dtype=dtype) if use_adv else None
    keep = L.m2po_mask(new, old, mask, tau, advantages=adv)
    xx = L.token_log_ratios(new, old, mask).tolist()
    ref = _m2po_loop(xx, mask.tolist(), tau, None if adv is None else adv.tolist())
    assert keep.tolist() == ref


def test_m2po_mean_equal_to_tau_is_kept_and_above_it_is_not() -> None:
    """Exact ties: the rule compares the mean of the float64 q with tau exactly."""
    for v in (0.1, 0.2, 0.3, 0.7, 1.1):
        for n in (1, 7, 10, 15, 40, 333):
            x = torch.full((1, n), v, dtype=torch.float64)
            zero, ones = torch.zeros_like(x), torch.ones_like(x)
            # every q equals tau (tau is the float64 square): mean == tau, all kept
            assert L.m2po_mask(x, zero, ones, v * v).all(), (v, n)
            # tau one ulp below q: every token has q > tau, all removed
            below = math.nextafter(v * v, 0.0)
            assert not L.m2po_mask(x, zero, ones, below).any(), (v, n)
    # 0.2**2 = 0.04000000000000001 > 0.04 (and 0.3**2 = 0.09 <= 0.09): exact verdicts
    x = torch.full((1, 12), 0.2, dtype=torch.float64)
    assert not L.m2po_mask(x, torch.zeros_like(x), torch.ones_like(x), 0.04).any()
    x = torch.full((1, 20), 0.3, dtype=torch.float64)
    assert L.m2po_mask(x, torch.zeros_like(x), torch.ones_like(x), 0.09).all()
    # one token of q = tau + (n - 1) ulps among n - 1 at tau: the mean exceeds tau by
    # less than a rounding error of the sum, so only exact arithmetic removes it
    tau = 0.04
    big = tau + 5 * (math.nextafter(tau, 1.0) - tau)
    x = torch.tensor([[math.sqrt(tau)] * 5 + [math.sqrt(big)]], dtype=torch.float64)
    q = (x * x)[0].tolist()
    keep = L.m2po_mask(x, torch.zeros_like(x), torch.ones_like(x), tau)
    assert keep.tolist() == _m2po_loop(x.tolist(), [[True] * 6], tau)
    assert bool(keep.all()) == (sum(map(Fraction, q)) <= 6 * Fraction(tau))


def test_m2po_exact_beyond_float64_range() -> None:
    """q that overflows (x^2 = inf) or whose sums overflow float64: still the exact rule."""
    x = torch.tensor([[1e200, 1e154, 1e154, 0.1, -1e154, 0.0]], dtype=torch.float64)
    zero, ones = torch.zeros_like(x), torch.ones_like(x)
    for tau in (0.0, 0.04, 1e307, 7e307, 1e308, 1.5e308, 1.7e308):
        keep = L.m2po_mask(x, zero, ones, tau)
        assert keep.tolist() == _m2po_loop(x.tolist(), [[True] * 6], tau), tau
    # q = 1e308 three times: the float sum is inf, the exact mean 1e308 <= tau
    assert L.m2po_mask(x, zero, ones, 1e308).tolist() == [[False] + [True] * 5]


def test_m2po_rule_and_validation() -> None:
    # q = [0, 0.01, 0.09, 0.25]: mean 0.0875 > 0.04; drop 0.25 -> mean 0.0333 <= 0.04
    x = torch.tensor([[0.0, 0.1, -0.3, 0.5]])
    old = torch.zeros(1, 4)
    keep = L.m2po_mask(x, old, torch.ones(1, 4, dtype=torch.bool))
    assert keep.tolist() == [[True, True, True, False]]
    # trust region (paper): with A < 0 only the x < 0 token is a candidate (q = 0.09 > 0.04)
    ones = torch.ones(1, 4)
    keep = L.m2po_mask(x, old, ones, 0.04, advantages=torch.tensor([-1.0]))
    assert keep.tolist() == [[True, True, False, True]]
    assert L.m2po_mask(x, old, ones, 0.1, advantages=torch.tensor([-1.0])).all()
    # with A > 0 the candidates are 0.1 and 0.5: mean 0.13 > 0.04, drop 0.5
    keep = L.m2po_mask(x, old, ones, 0.04, advantages=torch.tensor([2.0]))
    assert keep.tolist() == [[True, True, True, False]]
    # every candidate above tau: all of them go
    assert not L.m2po_mask(torch.tensor([[1.0, -1.0]]), torch.zeros(1, 2), torch.ones(1, 2)).any()
    with pytest.raises(ValueError, match="tau"):
        L.m2po_mask(x, old, torch.ones(1, 4), -1.0)
    with pytest.raises(ValueError, match="advantages has 2 entries"):
        L.m2po_mask(x, old, torch.ones(1, 4), advantages=torch.ones(2))


# --------------------------------------------------------------------------- dtype range (casts)


def test_pg_loss_refuses_coefficients_beyond_the_loss_dtype() -> None:
    """float64 weights / advantages that float32 cannot hold raise instead of giving +-inf."""
    logp32 = torch.full((2, 3), -1.0, dtype=torch.float32, requires_grad=True)
    mask = torch.ones(2, 3, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float32)
    big = torch.full((2,), math.exp(120), dtype=torch.float64)  # finite in float64
    with pytest.raises(
        ValueError, match=r"weights \* advantages = 1.3e\+52 .*overflows torch\.float32"
    ):
        L.per_sample_pg_loss(logp32, mask, adv, big)
    # the reported path: raw IS on sequence log weights of 120 (float64 weights)
    old = logp32.detach() - 40.0
    with pytest.raises(ValueError, match=r"overflows torch\.float32"):
        L.off_policy_pg_loss(logp32, old, mask, adv, is_mode="is")
    assert logp32.grad is None
    # float64 logp holds the product: the exact loss, finite gradient
    logp64 = logp32.detach().double().requires_grad_(True)
    loss = L.per_sample_pg_loss(logp64, mask, adv.double(), big, "seq-mean-token-sum")
    torch.testing.assert_close(loss, big * adv.double() * 3.0 / 2, rtol=1e-15, atol=0)
    loss.sum().backward()
    assert torch.isfinite(logp64.grad).all()
    # the product overflows although each factor fits float32
    with pytest.raises(ValueError, match=r"overflows torch\.float32"):
        L.per_sample_pg_loss(
            logp32, mask, torch.tensor([1e10, 1.0]).float(), torch.tensor([1e30, 1.0]).float()
        )
    with pytest.raises(ValueError, match=r"advantages = 1e\+40 for trajectory 0 overflows"):
        L.per_sample_pg_loss(logp32, mask, torch.tensor([1e40, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"token_weights up to 1e\+40 overflow torch\.float32"):
        L.per_sample_pg_loss(logp32, mask, token_weights=torch.full((2, 3), 1e40))
    # coefficients that fit, a gradient coefficient w * u / B that does not
    with pytest.raises(ValueError, match="gradient coefficient"):
        L.per_sample_pg_loss(
            logp32[:1], mask[:1], None, torch.tensor([10.0]).float(), "seq-mean-token-sum",
            token_weights=torch.full((1, 3), 1e38, dtype=torch.float32),
        )  # fmt: skip
    # coefficients and gradient fit, the loss w * sum_t logp does not
    with pytest.raises(ValueError, match=r"the loss of trajectory 0 overflows torch\.float32"):
        L.per_sample_pg_loss(
            torch.full((1, 3), -100.0, dtype=torch.float32),
            mask[:1],
            None,
            torch.tensor([1e37], dtype=torch.float32),
            "seq-mean-token-sum",
        )
    # a large coefficient on a trajectory without response tokens still has no +-inf * 0
    with pytest.raises(ValueError, match=r"overflows torch\.float32"):
        L.per_sample_pg_loss(logp32, torch.zeros(2, 3), None, big)


def test_pg_loss_refuses_coefficients_that_all_underflow() -> None:
    """Every weight below float32's normal range: the loss would be 0, the exact one is not."""
    logp32 = torch.full((2, 3), -1.0, dtype=torch.float32)
    mask = torch.ones(2, 3, dtype=torch.bool)
    tiny = torch.full((2,), math.exp(-120), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"below the smallest normal torch\.float32 number"):
        L.per_sample_pg_loss(logp32, mask, None, tiny)
    with pytest.raises(ValueError, match="every nonzero token weight"):
        L.per_sample_pg_loss(logp32, mask, token_weights=torch.full((2, 3), 1e-50))
    # float64 logp holds them
    loss = L.per_sample_pg_loss(logp32.double(), mask, None, tiny)
    torch.testing.assert_close(loss, tiny * 3.0 / 3 / 2, rtol=1e-15, atol=0)
    # one tiny weight next to a normal one rounds as float32 arithmetic does: no error
    mixed = torch.tensor([math.exp(-120), 1.0], dtype=torch.float64)
    loss = L.per_sample_pg_loss(logp32, mask, None, mixed)
    assert loss.tolist() == [0.0, 0.5]
    # zeros are exact, not underflow (MIS rejecting everything)
    assert torch.equal(
        L.per_sample_pg_loss(logp32, mask, None, torch.zeros(2, dtype=torch.float64)),
        torch.zeros(2, dtype=torch.float32),
    )


def test_importance_weights_refuse_total_underflow() -> None:
    lw32 = torch.full((3,), -120.0, dtype=torch.float32)  # exp(-120) < float32's tiny
    for kw in ({"mode": "is"}, {"mode": "tis"}, {"mode": "mis"}, {"ess_target": 0.5}):
        with pytest.raises(ValueError, match=r"underflow torch\.float32"):
            L.importance_weights(lw32, **kw)  # type: ignore[arg-type]
    w = L.importance_weights(lw32.double(), "is")
    torch.testing.assert_close(w, torch.full((3,), math.exp(-120), dtype=torch.float64))
    # one tiny weight among normal ones is ordinary rounding; MIS rejecting all is exact 0
    assert L.importance_weights(torch.tensor([-120.0, 0.0]).float(), "tis").tolist() == [0.0, 1.0]
    assert L.importance_weights(torch.full((3,), 5.0), "mis", 2.0).tolist() == [0.0] * 3


def test_advantages_refuse_overflow_of_their_dtype() -> None:
    r32 = torch.tensor([3e38, 0.0], dtype=torch.float32)
    with pytest.raises(ValueError, match=r"R - b overflow torch\.float32"):
        L.reinforce_advantages(r32, -3e38)
    # a finite float64 baseline beyond float32: named as such, not as "Inf values"
    with pytest.raises(ValueError, match=r"\|b\| up to 1e\+40"):
        L.reinforce_advantages(torch.zeros(2, dtype=torch.float32), 1e40)
    r64 = torch.tensor([3e38, 0.0], dtype=torch.float64)
    assert L.reinforce_advantages(r64, -3e38).tolist() == [6e38, 3e38]
    # float32 squared deviations overflow beyond |R| ~ 1.8e19 (the std would be inf, A = 0)
    r = torch.tensor([1e20, -1e20, 0.0, 1.0], dtype=torch.float32)
    for fn in (
        L.grpo_advantages,
        lambda x: L.rloo_advantages(x, norm_by_std=True),
    ):
        with pytest.raises(ValueError, match=r"overflow the torch\.float32 group statistics"):
            fn(r)
    a = L.grpo_advantages(r.double())
    torch.testing.assert_close(a, (r.double() - 0.25) / (r.double().std(unbiased=False) + 1e-6))


def test_token_weights_compose_masks_with_sequence_weights() -> None:
    new, old, mask = _extreme_pair(b=5, t=6, seed=2)
    logp = new.clone().requires_grad_(True)
    keep = L.icepop_mask(new, old, mask)
    lw = L.sequence_log_weights(new, old, keep)
    w = L.importance_weights(lw, "tis", c=4.0)
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.0])
    loss = L.per_sample_pg_loss(logp, mask, adv, w, "seq-mean-token-mean", token_weights=keep)
    lengths = mask.sum(1).clamp(min=1)
    ref = -(w * adv) * torch.where(keep, new, 0.0).sum(1) / lengths / 5
    torch.testing.assert_close(loss, ref, rtol=1e-14, atol=0)
    (g,) = torch.autograd.grad(loss.sum(), logp)
    assert torch.isfinite(g).all()  # padding held NaN
    assert torch.equal(g[~keep], torch.zeros_like(g[~keep]))
    # token-level IcePop weights r_t on the kept tokens
    u = torch.where(keep, L.token_log_ratios(new, old, mask).exp(), 0.0)
    u[~mask] = float("nan")  # padding may hold anything
    loss2 = L.per_sample_pg_loss(logp, mask, adv, None, "token-mean", token_weights=u)
    ref2 = -adv * torch.where(keep, u * new, 0.0).sum(1) / mask.sum()
    torch.testing.assert_close(loss2, ref2, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="negative"):
        L.per_sample_pg_loss(logp, mask, token_weights=-torch.ones_like(new))
    with pytest.raises(ValueError, match="shape"):
        L.per_sample_pg_loss(logp, mask, token_weights=torch.ones(5))


def test_gspo_sequence_mean_gradient_identity() -> None:
    """weights exp(mean_t log r) with seq-mean-token-mean give GSPO's unclipped gradient."""
    torch.manual_seed(1)
    b, t, v = 4, 5, 3
    theta = torch.randn(t, v, requires_grad=True)
    tokens = torch.randint(0, v, (b, t))
    mask = torch.rand(b, t) > 0.3
    mask[:, 0] = True

    def token_logp() -> torch.Tensor:
        return torch.log_softmax(theta, -1).gather(1, tokens.T).T

    old = (token_logp() + 0.2 * torch.randn(b, t)).detach()
    adv = torch.randn(b)
    out = L.off_policy_pg_loss(token_logp(), old, mask, adv, is_mode="is", reduce="mean")
    (g,) = torch.autograd.grad(out.per_sample_loss.sum(), theta)
    expected = torch.zeros_like(theta)
    for i in range(b):
        lp = token_logp()[i][mask[i]]
        s_i = math.exp((lp - old[i][mask[i]]).mean().item())
        (gi,) = torch.autograd.grad(lp.mean(), theta)
        expected += -(s_i * adv[i].item() / b) * gi
    torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- ESS-targeted cap (11.3)


def _mp_ratio(lw: list[float], log_c) -> mpmath.mpf:
    w = [mpmath.exp(min(mpmath.mpf(x), log_c)) for x in lw]
    return mpmath.fsum(w) ** 2 / mpmath.fsum(v * v for v in w) / len(w)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.floats(min_value=-40.0, max_value=40.0, allow_nan=False, allow_infinity=False),
        min_size=1,
        max_size=40,
    ),
    st.floats(min_value=0.01, max_value=1.0),
)
def test_ess_cap_is_the_largest_feasible_cap(lw: list[float], rho: float) -> None:
    """The target holds at c (to rounding) and fails just above it (in exact arithmetic)."""
    mpmath.mp.dps = 50
    log_c = L.ess_truncation_cap(torch.tensor(lw, dtype=torch.float64), rho)
    assert log_c.dtype == torch.float64
    if math.isinf(float(log_c)):
        assert float(log_c) > 0 and _mp_ratio(lw, mpmath.inf) >= rho * (1 - 1e-12)
        return
    c = mpmath.mpf(float(log_c))
    assert min(lw) <= float(log_c) <= max(lw)
    assert _mp_ratio(lw, c) >= rho * (1 - 1e-12)
    assert _mp_ratio(lw, c + mpmath.mpf("1e-9")) < rho
    # and the float64 ESS the optimizer computes agrees
    from vcpo_optim import effective_sample_size

    capped = torch.minimum(torch.tensor(lw, dtype=torch.float64), log_c)
    assert float(effective_sample_size(log_weights=capped).ratio) >= rho * (1 - 1e-12)


@pytest.mark.parametrize(
    ("lw", "rho"),
    [
        ([0.0, 29.0, 28.5, -1.0], 0.5),
        ([0.0, 0.0, 0.0, 0.0, 35.0, 36.0], 1 / 3),
        ([0.0, 0.0, 0.0, 1.0], 1 - 2**-53),
        ([0.0, -1.0, -1.0, -1.0, -1.0], 1 - 2**-53),
        ([0.0, -17.0, -17.0, -17.0], 1 - 2**-53),
    ],
)
def test_ess_cap_flat_ess_at_the_root(lw: list[float], rho: float) -> None:
    """The ESS is flat where it meets the target (two nearly equal top weights, or the cap
    next to tied weights), so the square root amplifies any absolute error in the
    discriminant. Found by hypothesis (seeds 0, 15, 38, 78): log c was off by 2e-9 and 1e-9 (the
    log-space suffix sums at |lw| ~ 30, rho * n rounded), by 20% of 2.4e-8, or set to min lw."""
    mpmath.mp.dps = 80
    lo, hi = mpmath.mpf(min(lw)), mpmath.mpf(max(lw))
    for _ in range(120):  # the exact root, by bisection (the ESS does not increase with c)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _mp_ratio(lw, mid) >= mpmath.mpf(rho) else (lo, mid)
    c = float(L.ess_truncation_cap(torch.tensor(lw, dtype=torch.float64), rho))
    assert abs(c - float(lo)) <= 1e-14 * max(1.0, abs(float(lo)))


def test_ess_cap_cases_and_errors() -> None:
    lw = torch.tensor([1.0, 0.3, -2.0, 5.0, 0.0, 0.1], dtype=torch.float64)
    assert float(L.ess_truncation_cap(lw, 1.0)) == -2.0  # all equal to the smallest
    assert math.isinf(float(L.ess_truncation_cap(lw, 1 / 6)))
    assert math.isinf(float(L.ess_truncation_cap(torch.zeros(4), 1.0)))
    # huge log weights: log space throughout
    big = torch.tensor([1e4, 1e4 - 1.0, 1e4 - 50.0, -1e4], dtype=torch.float64)
    c = float(L.ess_truncation_cap(big, 0.9))
    assert math.isfinite(c) and float(_mp_ratio(big.tolist(), mpmath.mpf(c))) == pytest.approx(0.9)
    # a mask drops entries (their values may be anything)
    m = torch.tensor([True, True, False, True, True, True])
    bad = lw.clone()
    bad[2] = float("nan")
    assert float(L.ess_truncation_cap(bad, 0.7, mask=m)) == float(L.ess_truncation_cap(lw[m], 0.7))
    # the optimizer-facing path
    w = L.importance_weights(lw, "tis", ess_target=0.7)
    torch.testing.assert_close(w, lw.clamp(max=float(L.ess_truncation_cap(lw, 0.7))).exp())
    w2 = L.importance_weights(lw, "tis", 2.0, ess_target=0.7)
    torch.testing.assert_close(w2, lw.clamp(max=math.log(2.0)).exp())
    for args, match in (
        ((lw, 0.0), "target_ratio"),
        ((lw, 1.5), "target_ratio"),
        ((torch.tensor([0.0, float("nan")]), 0.5), "1 NaN"),
        ((torch.tensor([0.0, float("inf")]), 0.5), "1 infinite"),
        ((torch.zeros(0), 0.5), "empty batch"),
        ((torch.zeros(3, dtype=torch.long), 0.5), "floating-point"),
    ):
        with pytest.raises(ValueError, match=match):
            L.ess_truncation_cap(*args)
    with pytest.raises(ValueError, match="mask has shape"):
        L.ess_truncation_cap(lw, 0.5, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs mode='tis'"):
        L.importance_weights(lw, "mis", ess_target=0.5)
    with pytest.raises(ValueError, match="overflow"):
        L.importance_weights(
            torch.tensor([800.0, 800.0], dtype=torch.float64), "tis", ess_target=0.5
        )


def test_k3_and_its_log_to_float64_accuracy() -> None:
    """K3 = expm1(x) - x without cancellation (tiny |x|) or overflow of its log (huge x)."""
    mpmath.mp.dps = 50
    xs = [1e-300, -1e-200, 1e-12, -3e-9, 1e-5, -3e-3, 0.1, -0.49, 0.5, 0.51, -0.51, 1.0]
    xs += [-2.0, 30.0, -1000.0, 700.0, 709.0]
    x = torch.tensor(xs, dtype=torch.float64)
    k3, log_k3 = L._k3(x), L._log_k3(x)
    for i, v in enumerate(xs):
        with mpmath.workdps(1300):  # enough digits for the cancellation at |x| = 1e-300
            ref = mpmath.exp(v) - 1 - v
            log_ref = float(mpmath.log(ref))
        assert float(k3[i]) == pytest.approx(float(ref), rel=1e-15, abs=0), v  # 0 if < 1e-308
        assert float(log_k3[i]) == pytest.approx(log_ref, rel=1e-15, abs=1e-15), v
    big = torch.tensor([710.0, 1000.0, 5e4], dtype=torch.float64)
    assert torch.isinf(L._k3(big)).all()  # beyond float64: +inf, which any threshold rejects
    torch.testing.assert_close(L._log_k3(big), big, rtol=1e-15, atol=0)  # log K3 = x + log1p(..)
    assert float(L._log_k3(torch.zeros(1, dtype=torch.float64))) == -math.inf
