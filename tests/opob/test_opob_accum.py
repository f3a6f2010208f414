"""Gradient accumulation (several backward calls per optimizer step), step boundaries, bf16 autocast."""

from __future__ import annotations

import copy

import pytest
import torch
from opob_oracle import TinyLM, lm_batch, lm_loss, oracle, rel_err
from torch import nn

from vcpo_optim.opob import OPOB


def _lm(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return TinyLM().to(dtype)


@pytest.mark.parametrize("agg", ["mean", "median", "winsorized_mean"])
@pytest.mark.parametrize("norm_by_std", [False, True])
def test_batch_scope_accumulation_equals_one_shot(agg, norm_by_std):
    ids, mask = lm_batch(b=7, seed=2)
    r = torch.tensor([0.1, -0.4, 1.3, 0.9, -2.0, 0.5, 0.0], dtype=torch.float64)
    one = _lm()
    ref_n, ref_b, ref_c, ref_g = oracle(one, lm_loss(ids, mask), r, [0] * 7, agg, norm_by_std)
    model = _lm()
    opob = OPOB(model, scope="batch", agg=agg, norm_by_std=norm_by_std)
    norms = []
    for lo, hi in [(0, 2), (2, 3), (3, 7)]:
        res = opob.backward(lm_loss(ids[lo:hi], mask[lo:hi])(model), r[lo:hi])
        norms.append(res.sq_norms)
    assert rel_err(torch.cat(norms), ref_n) < 1e-9
    assert torch.allclose(res.baselines, ref_b[3:], rtol=1e-9, atol=1e-12)
    assert torch.allclose(res.coefficients, ref_c[3:], rtol=1e-9, atol=1e-12)
    for n, p in model.named_parameters():
        assert rel_err(p.grad, ref_g[n]) < 1e-9, n
    opob.detach()


def test_batch_scope_param_used_in_one_micro_batch_only():
    """A parameter that only the first micro-batch touches still follows the step's final baseline."""

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(3, 4)
            self.a = nn.Linear(4, 1)
            self.b = nn.Linear(4, 1)
            self.use_a = True

        def forward(self, x):
            h = torch.tanh(self.body(x))
            return (self.a(h) if self.use_a else self.b(h)).squeeze(-1)

    torch.manual_seed(0)
    model = TwoHeads().double()
    ref_model = copy.deepcopy(model)
    x = torch.randn(6, 3, dtype=torch.float64)
    r = torch.randn(6, dtype=torch.float64)

    def both(m):
        m.use_a = True
        la = m(x[:3])
        m.use_a = False
        return torch.cat([la, m(x[3:])])

    _, _, _, ref_g = oracle(ref_model, both, r, [0] * 6)
    opob = OPOB(model, scope="batch")
    model.use_a = True
    opob.backward(model(x[:3]), r[:3])
    model.use_a = False
    opob.backward(model(x[3:]), r[3:])
    for n, p in model.named_parameters():
        assert rel_err(p.grad, ref_g[n]) < 1e-9, n
    opob.detach()


def test_group_scope_accumulation_equals_one_shot():
    ids, mask = lm_batch(b=6, seed=4)
    r = torch.randn(6, dtype=torch.float64)
    groups = torch.tensor([7, 7, 3, 3, 3, 5])
    ref_n, _, _, ref_g = oracle(_lm(), lm_loss(ids, mask), r, groups.tolist(), norm_by_std=True)
    model = _lm()
    with OPOB(model, scope="group", norm_by_std=True) as opob:
        a = opob.backward(lm_loss(ids[:2], mask[:2])(model), r[:2], groups[:2])
        b = opob.backward(lm_loss(ids[2:], mask[2:])(model), r[2:], groups[2:])
    assert rel_err(torch.cat([a.sq_norms, b.sq_norms]), ref_n) < 1e-9
    for n, p in model.named_parameters():
        assert rel_err(p.grad, ref_g[n]) < 1e-9, n


def test_step_boundaries_reset_batch_state():
    ids, mask = lm_batch(b=4, seed=5)
    r = torch.randn(4, dtype=torch.float64)
    model = _lm()
    ref = _lm()
    _, _, _, ref_g = oracle(ref, lm_loss(ids[2:], mask[2:]), r[2:], [0, 0])
    opob = OPOB(model, scope="batch")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for boundary in ["step", "set_to_none", "finalize"]:
        opob.backward(lm_loss(ids[:2], mask[:2])(model), r[:2])
        if boundary == "step":
            opt.step()
            opt.zero_grad(set_to_none=False)
        elif boundary == "set_to_none":
            model.zero_grad(set_to_none=True)
        else:
            opob.finalize()
            model.zero_grad(set_to_none=False)
        opob.backward(lm_loss(ids[2:], mask[2:])(model), r[2:])
        for n, p in model.named_parameters():
            assert rel_err(p.grad, ref_g[n]) < 1e-9, (boundary, n)
        opt.zero_grad(set_to_none=True)
        opob.finalize()
    opob.detach()


def test_bf16_autocast_norms_in_float32():
    ids, mask = lm_batch(b=4, seed=6)
    r = torch.tensor([0.3, -1.0, 2.0, 0.5])
    ref_model = _lm(dtype=torch.float32)
    with OPOB(ref_model) as opob:
        ref = opob.backward(lm_loss(ids, mask)(ref_model), r)
    model = _lm(dtype=torch.float32)
    with OPOB(model) as opob, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lm_loss(ids, mask)(model)
        res = opob.backward(loss, r)
    assert res.sq_norms.dtype == torch.float32
    assert res.baselines.dtype == torch.float32 and res.coefficients.dtype == torch.float32
    assert rel_err(res.sq_norms, ref.sq_norms) < 5e-2
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert p.grad.dtype == torch.float32
        assert rel_err(p.grad, q.grad) < 1e-1, n


@pytest.mark.parametrize("scope", ["group", "batch"])
@pytest.mark.parametrize("reward_dtype", [torch.float64, torch.float32])
def test_float32_model_with_large_reward_offset(scope, reward_dtype):
    """Rewards ~1e5 on a float32 model: c_i = R_i - b must not cancel catastrophically."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(8, 3)
    r = (1e5 + torch.randn(8, dtype=torch.float64)).to(reward_dtype)
    groups = [0, 0, 0, 1, 1, 2, 2, 2]
    ref64 = copy.deepcopy(model).double()
    scopes = groups if scope == "group" else [0] * 8
    _, base, coef, grads = oracle(
        ref64, lambda m: m(x.double()).squeeze(-1), r.double(), scopes, "mean", True
    )
    opob = OPOB(model, scope=scope, norm_by_std=True)
    res = [
        opob.backward(model(x[sl]).squeeze(-1), r[sl], groups[sl])
        for sl in (slice(0, 3), slice(3, 8))
    ]
    assert rel_err(res[-1].coefficients, coef[3:]) < 1e-5  # batch: earlier calls saw a partial b
    if scope == "group":
        assert rel_err(res[0].coefficients, coef[:3]) < 1e-5
    assert (res[-1].baselines.double() - base[3:]).abs().max() < 0.05  # float32 ulp at 1e5
    for n, p in model.named_parameters():
        assert rel_err(p.grad.double(), grads[n]) < 1e-5, n
    opob.detach()
