"""No activation is held after a backward: memory stays flat over 1,000 steps."""

from __future__ import annotations

import gc
import weakref

import torch
from opob_oracle import MLP, TinyLM, lm_batch, lm_loss

from vcpo_optim.opob import OPOB


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, torch.nn.Parameter))


def test_no_activation_retained_after_backward():
    torch.manual_seed(0)
    model = TinyLM()
    ids, mask = lm_batch()
    opob = OPOB(model)
    for _ in range(2):
        loss = lm_loss(ids, mask)(model)
        saved = [weakref.ref(u.args[0]) for u in opob._tape] + [weakref.ref(loss)]
        opob.backward(loss, torch.randn(ids.shape[0]))
        del loss
        gc.collect()
        assert opob.num_recorded == 0
        assert all(w() is None for w in saved)
    opob.detach()


def test_memory_flat_over_1000_steps():
    """1,000 optimizer steps (2 backward calls each): no growth in live tensors or Python objects."""
    torch.manual_seed(0)
    model = MLP(k=8, h=16, m=4)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for scope, steps in (("group", 1000), ("batch", 100)):
        opob = OPOB(model, scope=scope)
        x = torch.randn(8, 8)
        groups = torch.arange(8) // 4

        def step(opob=opob, x=x, groups=groups):
            opob.backward(model(x).sum(1), torch.randn(8), groups)
            opob.backward(model(x).sum(1), torch.randn(8), groups + 2)
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(20):
            step()
        n_tensors = _live_tensors()
        n_objects = len(gc.get_objects())
        for _ in range(steps):
            step()
        assert _live_tensors() <= n_tensors
        assert len(gc.get_objects()) <= n_objects + 100
        assert (
            opob.num_recorded == 0
            and not opob._step.state.sums
            and opob._step.state.seen_groups is None
        )
        opob.detach()
