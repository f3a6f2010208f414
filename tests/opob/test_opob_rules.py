"""Each layer rule alone against the exact per-sample loop, under every norm strategy."""

from __future__ import annotations

import pytest
import torch
from opob_oracle import assert_one_call_matches_oracle, proj_loss
from torch import nn

from vcpo_optim.opob.engine import ParamWork
from vcpo_optim.opob.rules.base import Dense


def _cases():
    g = torch.Generator().manual_seed(0)

    def rn(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    ids = torch.randint(0, 9, (5, 7), generator=g)
    ids[0, :3] = 2
    return [
        ("linear_2d", nn.Linear(6, 4), rn(5, 6)),
        ("linear_3d", nn.Linear(6, 4), rn(5, 3, 6)),
        ("linear_4d_nobias", nn.Linear(6, 4, bias=False), rn(5, 2, 3, 6)),
        ("embedding_pad", nn.Embedding(9, 4, padding_idx=2), ids),
        ("embedding_1d_input", nn.Embedding(9, 4), ids[:, 0]),
        ("layer_norm", nn.LayerNorm(6), rn(5, 3, 6) * 3 + 1),
        ("layer_norm_2d_shape", nn.LayerNorm((3, 6)), rn(5, 2, 3, 6)),
        ("layer_norm_nobias", nn.LayerNorm(6, bias=False), rn(5, 6)),
        # a non-default eps must reach the rule: 1e-5 there would be ~10% off at this scale
        ("layer_norm_eps", nn.LayerNorm(6, eps=0.3), rn(5, 3, 6) * 0.7),
        ("rms_norm", nn.RMSNorm(6), rn(5, 3, 6)),
        ("rms_norm_eps", nn.RMSNorm((2, 6), eps=1e-3), rn(5, 4, 2, 6)),
        ("group_norm", nn.GroupNorm(2, 6), rn(5, 6, 7)),
        ("group_norm_2d", nn.GroupNorm(3, 6), rn(5, 6, 3, 4)),
        ("group_norm_eps", nn.GroupNorm(2, 6, eps=0.3), rn(5, 6, 7) * 0.7),
        ("conv1d", nn.Conv1d(3, 4, 3), rn(5, 3, 9)),
        (
            "conv1d_full",
            nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
            rn(5, 4, 11),
        ),
        (
            "conv1d_same_circular",
            nn.Conv1d(3, 2, 4, padding="same", padding_mode="circular"),
            rn(5, 3, 8),
        ),
        ("conv2d", nn.Conv2d(2, 3, 3, padding=1), rn(5, 2, 5, 6)),
        (
            "conv2d_full",
            nn.Conv2d(4, 6, (2, 3), stride=(2, 1), dilation=(1, 2), groups=2, bias=False),
            rn(5, 4, 7, 8),
        ),
        (
            "conv2d_reflect",
            nn.Conv2d(2, 2, 3, padding=(1, 2), padding_mode="reflect"),
            rn(5, 2, 5, 6),
        ),
    ]


CASES = _cases()


@pytest.mark.parametrize("strategy", ["auto", "ghost", "direct", "acc"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rule_alone(monkeypatch, case, strategy):
    _, module, x = case
    module = module.double()
    if strategy != "auto":
        orig = ParamWork.choose

        def forced(self, *a):
            best = orig(self, *a)
            if strategy == "ghost" and any(isinstance(f, Dense) for f in self.factors):
                return best
            self.strategy = strategy
            return strategy

        monkeypatch.setattr(ParamWork, "choose", forced)
    torch.manual_seed(0)
    for p in module.parameters():  # non-trivial affine parameters for the norms
        p.data.normal_()
    fn = proj_loss(x)
    r = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5], dtype=torch.float64)
    groups = torch.tensor([0, 1, 0, 1, 1])
    assert_one_call_matches_oracle(module, fn, r, groups.tolist())


def test_register_rule_custom_module():
    from vcpo_optim.opob import register_rule

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.randn(4, dtype=torch.float64))

        def forward(self, x):
            return x * self.s

    @register_rule(Scale)
    def scale_rule(module, inputs, grad_output):
        (x,) = inputs
        return {"s": Dense((x * grad_output).reshape(x.shape[0], -1, 4).sum(1))}

    model = nn.Sequential(nn.Linear(3, 4).double(), Scale())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    fn = proj_loss(x)
    r = torch.randn(5, dtype=torch.float64)
    assert_one_call_matches_oracle(model, fn, r)
