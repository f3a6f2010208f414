"""unwrap_optimizer: our API through framework wrappers (accelerate for real, others by shape)."""

from __future__ import annotations

import types

import pytest
import torch

from vcpo_optim import VCPOAdamW, ess_scaled, unwrap_optimizer
from vcpo_optim.wrappers import is_ess_scaled


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(4, 3, generator=g)),
        torch.nn.Parameter(torch.randn(3, generator=g)),
    ]


def _set_grads(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


class _Wrapper:
    """A wrapper shaped like DeepSpeed's ZeRO optimizers (``.optimizer``) or torch's ZeRO (``.optim``)."""

    def __init__(self, inner, attr: str = "optimizer") -> None:
        setattr(self, attr, inner)

    def step(self) -> None:
        pass


def test_unwrap_plain_and_chains():
    opt = VCPOAdamW(_params())
    assert unwrap_optimizer(opt) is opt
    plain = torch.optim.AdamW(_params())
    assert unwrap_optimizer(plain) is plain
    assert unwrap_optimizer(_Wrapper(_Wrapper(opt), "optim")) is opt
    # No ESS-scaled optimizer on the chain: the innermost object, for the caller to check.
    assert unwrap_optimizer(_Wrapper(_Wrapper(plain))) is plain
    assert not is_ess_scaled(unwrap_optimizer(_Wrapper(plain)))
    assert (
        is_ess_scaled(opt)
        and is_ess_scaled(VCPOAdamW)
        and is_ess_scaled(ess_scaled(torch.optim.RMSprop))
    )
    assert not is_ess_scaled(torch.optim.AdamW) and not is_ess_scaled(plain)


def test_an_attribute_that_is_not_an_optimizer_is_not_followed():
    """Only an ``optimizer`` / ``optim`` attribute with a ``step()`` is a wrapped optimizer."""
    opt = VCPOAdamW(_params())
    holder = types.SimpleNamespace(optimizer="adamw", optim=3, step=lambda: None)
    assert unwrap_optimizer(holder) is holder
    assert unwrap_optimizer(_Wrapper(holder)) is holder
    assert unwrap_optimizer(_Wrapper(_Wrapper(opt), "optim")) is opt


def test_unwrap_refuses_cycles():
    a = _Wrapper(None)
    b = _Wrapper(a)
    a.optimizer = b
    with pytest.raises(ValueError, match="cycle"):
        unwrap_optimizer(a)


@pytest.fixture
def accelerate():
    accelerate = pytest.importorskip("accelerate", reason="needs the 'trl' extra (accelerate)")
    yield accelerate
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)  # leave no accelerate singleton behind
    GradientState._reset_state()


def test_accelerate_forwards_step_but_not_our_api(accelerate):
    """What accelerate's AcceleratedOptimizer forwards (the README's table rests on this)."""
    from accelerate.optimizer import AcceleratedOptimizer

    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    twin_model = torch.nn.Linear(3, 4)
    twin_model.load_state_dict(model.state_dict())
    opt = VCPOAdamW(model.parameters(), lr=0.1)
    twin = VCPOAdamW(twin_model.parameters(), lr=0.1)
    model, wrapped = accelerator.prepare(model, opt)
    assert isinstance(wrapped, AcceleratedOptimizer)
    assert unwrap_optimizer(wrapped) is opt
    with pytest.raises(AttributeError):
        wrapped.observe(log_weights=torch.zeros(2))
    with pytest.raises(AttributeError):
        _ = wrapped.last_stats
    with pytest.raises(TypeError):
        wrapped.step(log_weights=torch.zeros(2))
    assert wrapped.param_groups is opt.param_groups

    # Gradient accumulation: the wrapper skips step() and zero_grad() until the
    # sync step, so weights observed on the unwrapped optimizer accumulate over
    # the micro-steps and the one real step uses them all.
    lw = [torch.tensor([0.0, -1.0]), torch.tensor([-3.0, 0.5])]
    for i, micro in enumerate(lw):
        with accelerator.accumulate(model):
            assert accelerator.sync_gradients == (i == len(lw) - 1)
            unwrap_optimizer(wrapped).observe(log_weights=micro)
            _set_grads(model.parameters(), seed=1)
            wrapped.step()
            wrapped.zero_grad()
        if i == 0:
            assert opt.last_stats is None  # no step yet
    assert opt.last_stats.n.item() == 4
    _set_grads(twin_model.parameters(), seed=1)
    for micro in lw:
        twin.observe(log_weights=micro)
    twin.step()
    assert torch.equal(opt.last_stats.ess, twin.last_stats.ess)
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)


def test_core_imports_no_framework():
    """``import vcpo_optim`` (and the integrations package) pulls in no optional dependency."""
    import subprocess
    import sys

    code = (
        "import sys, vcpo_optim, vcpo_optim.integrations, vcpo_optim.wrappers\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules}"
        " & {'trl', 'transformers', 'accelerate', 'datasets', 'deepspeed', 'verl', 'peft'})\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
