"""Tests for vcpo_optim.losses: hand-computed cases, autograd identities, properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
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
    # group 7: mean 0.5, population std 0.5 -> +-1; group 3: all equal -> 0
    assert torch.equal(a, torch.tensor([1.0, -1.0, -1.0, 1.0, 0.0, 0.0]))
    a2 = L.grpo_advantages(r, g, norm_by_std=False)
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
    assert torch.equal(a, torch.tensor([0.0, -1.0, 0.0, 1.0]))


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
