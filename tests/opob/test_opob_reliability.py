"""Regression tests for issue 8 (items 4, 5, 8, 9, 10a, 10b): each failed before its fix.

Silent errors found by using OPOB as users do: inputs changed in place after the
forward, other libraries' forward hooks, custom rules with several inputs,
instances that are never detached, model snapshots, dropout in the fallback, and
gradients zeroed in place between optimizer steps.
"""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
from opob_oracle import (
    MLP,
    assert_one_call_matches_oracle,
    oracle,
    proj_loss,
    ref_coefficients,
    rel_err,
)
from torch import nn
from torch.nn.modules import module as torch_module
from torch.optim import optimizer as torch_optimizer

from vcpo_optim.opob import OPOB

DT = torch.float64


def _grads(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _unchanged(model, snap):
    for n, p in model.named_parameters():
        if snap[n] is None:
            assert p.grad is None, n
        else:
            assert torch.equal(p.grad, snap[n]), n


# ----------------------------------------------------------------------------- item 4


class RawResidual(nn.Module):
    """``x += fc(x)`` on raw features (no grad): fc's saved input changes after its forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        x += self.fc(x)
        return self.head(torch.tanh(x)).squeeze(-1)


def test_input_modified_in_place_after_the_forward_is_refused():
    """Measured before the fix: norms 7% off and fc.weight's gradient 46% off, no error."""
    torch.manual_seed(0)
    model = RawResidual().to(DT)
    x = torch.randn(5, 4, dtype=DT)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        model(x.clone()).sum().backward()  # plain autograd refuses it too
    model.zero_grad(set_to_none=True)
    with OPOB(model) as opob:
        loss = model(x.clone())
        with pytest.raises(ValueError, match=r"input 0 of module 'fc' \(Linear\) was modified by"):
            opob.backward(loss, torch.randn(5, dtype=DT))
        assert opob.num_recorded == 0
    assert all(p.grad is None for p in model.parameters())


def test_reused_input_buffer_is_refused():
    """An input buffer refilled for the next batch before the backward of this one."""
    torch.manual_seed(0)
    model = MLP().to(DT)
    buf = torch.randn(4, 7, dtype=DT)
    with OPOB(model) as opob:
        loss = model(buf).sum(1)
        buf.copy_(torch.randn(4, 7, dtype=DT))  # the next batch, loaded into the same buffer
        with pytest.raises(ValueError, match=r"module 'l1' \(Linear\) was modified by an inplace"):
            opob.backward(loss, torch.randn(4, dtype=DT))


class Scaled(nn.Module):
    """No rule: the vmap fallback replays it from its saved positional and keyword inputs."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, dtype=DT))

    def forward(self, x, *, scale):
        return x * self.w * scale


def test_keyword_input_of_a_fallback_module_modified_in_place_is_refused():
    """First layer: OPOB's autograd pass never runs its backward, so autograd cannot notice."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"lin": nn.Linear(4, 4).to(DT), "sc": Scaled()})
    x = torch.randn(3, 4, dtype=DT)
    scale = torch.rand(3, 1, dtype=DT) + 0.5
    with OPOB(model, strict=False) as opob:
        loss = model["lin"](model["sc"](x, scale=scale)).sum(1)
        scale.mul_(2)
        with pytest.raises(ValueError, match=r"a keyword input of module 'sc' \(Scaled\)"):
            opob.backward(loss, torch.randn(3, dtype=DT))


def test_unmodified_inputs_and_outputs_changed_in_place_stay_exact():
    """Only saved inputs matter: an output modified in place afterwards is still exact."""
    torch.manual_seed(0)

    class OutInPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 5)
            self.b = nn.Linear(5, 2)

        def forward(self, x):
            h = self.a(x)
            h.mul_(2.0)  # in place on a's (non-view) output, before b reads it
            return self.b(torch.tanh(h))

    model = OutInPlace().to(DT)
    x = torch.randn(5, 4, dtype=DT)
    assert_one_call_matches_oracle(model, proj_loss(x), torch.randn(5, dtype=DT))


class Part(nn.Module):
    """No rule (the vmap fallback): its output is part of a product, a partial view."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6, dtype=DT))

    def forward(self, x):
        return (x @ self.w)[:, :3]


def test_output_view_modified_in_place_is_refused():
    """An in-place op on a partial-view output moves it off the recorded autograd node: without
    the check the module's output gradient is never formed and its parameter gets no gradient."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"part": Part(), "head": nn.Linear(3, 1).to(DT)})
    x = torch.randn(5, 4, dtype=DT)
    with OPOB(model, strict=False) as opob:
        h = model["part"](x)
        h.mul_(2.0)
        loss = model["head"](torch.tanh(h)).squeeze(-1)
        with pytest.raises(ValueError, match=r"output of module 'part' \(a view\) was modified"):
            opob.backward(loss, torch.randn(5, dtype=DT))
        assert opob.num_recorded == 0
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- item 5


def _double(module, args, output):
    return 2 * output


@pytest.mark.parametrize("where", ["before", "prepend_after", "global", "global_after"])
def test_forward_hook_changing_the_output_is_exact(where):
    """A hook returning 2 * out used to halve that layer's gradient (OPOB saw the changed output).

    ``before``: registered before OPOB; ``prepend_after``: ``prepend=True`` after OPOB;
    ``global``/``global_after``: a global forward hook (runs before every module hook).
    """
    torch.manual_seed(0)
    model = MLP().to(DT)
    x = torch.randn(6, 7, dtype=DT)
    r = torch.randn(6, dtype=DT)

    def only_l2(module, args, output):
        return 2 * output if module is model.l2 else None

    def register():
        if where == "before":
            return model.l2.register_forward_hook(_double)
        if where == "prepend_after":
            return model.l2.register_forward_hook(_double, prepend=True)
        return torch_module.register_module_forward_hook(only_l2)

    handle = register() if where in ("before", "global") else None
    opob = OPOB(model)
    try:
        if handle is None:
            handle = register()
        ref_n, _, _, ref_g = oracle(model, proj_loss(x), r, [0] * 6)  # with the hook: the truth
        opob.clear()  # the oracle's forward was recorded
        model.zero_grad(set_to_none=True)
        res = opob.backward(proj_loss(x)(model), r)
    finally:
        handle.remove()
        opob.detach()
    assert rel_err(res.sq_norms, ref_n) < 1e-10
    for n, p in model.named_parameters():
        assert rel_err(p.grad, ref_g[n]) < 1e-10, n


def test_global_and_module_hooks_together_are_exact():
    torch.manual_seed(0)
    model = MLP().to(DT)
    x = torch.randn(6, 7, dtype=DT)
    r = torch.randn(6, dtype=DT)

    def only_l2(module, args, output):
        return output + 0.5 * output**2 if module is model.l2 else None

    handles = [torch_module.register_module_forward_hook(only_l2)]
    try:
        opob = OPOB(model)  # attached first; then a module hook prepended after it
        handles.append(model.l1.register_forward_hook(_double, prepend=True))
        ref_n, _, _, ref_g = oracle(model, proj_loss(x), r, [0] * 6)
        opob.clear()  # the oracle's forward was recorded
        model.zero_grad(set_to_none=True)
        res = opob.backward(proj_loss(x)(model), r)
        opob.detach()
    finally:
        for h in handles:
            h.remove()
    assert rel_err(res.sq_norms, ref_n) < 1e-10
    for n, p in model.named_parameters():
        assert rel_err(p.grad, ref_g[n]) < 1e-10, n
    assert not torch_module._global_forward_hooks  # OPOB's global hook left with it


def test_forward_pre_hook_changing_the_input_is_exact():
    torch.manual_seed(0)
    model = MLP().to(DT)
    x = torch.randn(6, 7, dtype=DT)
    h = model.l2.register_forward_pre_hook(lambda m, a: (torch.sin(a[0]) * 3,))
    try:
        assert_one_call_matches_oracle(model, proj_loss(x), torch.randn(6, dtype=DT))
    finally:
        h.remove()


# ----------------------------------------------------------------------------- item 8


def test_custom_rule_receives_every_tensor_input_bilinear():
    """nn.Bilinear(x1, x2): the rule gets both inputs (it got only x1 and failed to unpack)."""
    from vcpo_optim.opob import Dense, register_rule
    from vcpo_optim.opob.rules.base import RULES

    def bilinear_rule(module, inputs, grad_output):
        x1, x2 = inputs
        b = x1.shape[0]
        x1 = x1.reshape(b, -1, x1.shape[-1])
        x2 = x2.reshape(b, -1, x2.shape[-1])
        g = grad_output.reshape(b, -1, grad_output.shape[-1])
        out = {"weight": Dense(torch.einsum("btk,btp,btq->bkpq", g, x1, x2))}
        if module.bias is not None:
            out["bias"] = Dense(g.sum(1))
        return out

    register_rule(nn.Bilinear)(bilinear_rule)
    try:

        class Bi(nn.Module):
            def __init__(self):
                super().__init__()
                self.a = nn.Linear(3, 4)
                self.bi = nn.Bilinear(4, 3, 2)

            def forward(self, x):
                return self.bi(torch.tanh(self.a(x)), x)

        torch.manual_seed(0)
        model = Bi().to(DT)
        x = torch.randn(5, 2, 3, dtype=DT)
        assert_one_call_matches_oracle(
            model, proj_loss(x), torch.randn(5, dtype=DT), [0, 0, 1, 1, 1]
        )
    finally:
        del RULES[nn.Bilinear]


def test_rules_receive_keyword_tensor_inputs_after_positional_ones():
    from vcpo_optim.opob import Dense, register_rule
    from vcpo_optim.opob.rules.base import RULES

    seen = []

    class Gain(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.ones(4, dtype=DT))

        def forward(self, x, mask=None, *, shift):
            return (x + shift) * self.g * mask

    @register_rule(Gain)
    def gain_rule(module, inputs, grad_output):
        seen.append(len(inputs))
        x, mask, shift = inputs
        return {"g": Dense(((x + shift) * mask * grad_output).reshape(x.shape[0], -1, 4).sum(1))}

    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4).to(DT))
        gain = Gain()
        model.add_module("gain", gain)
        x = torch.randn(5, 3, dtype=DT)
        mask = (torch.rand(5, 4) > 0.3).to(DT)
        shift = torch.randn(5, 4, dtype=DT)

        def fn(m):
            return (m.gain(m[0](x), mask, shift=shift) ** 2).sum(1)

        assert_one_call_matches_oracle(model, fn, torch.randn(5, dtype=DT))
        assert seen == [3]
    finally:
        del RULES[Gain]


# ----------------------------------------------------------------------------- item 9


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_second_opob_on_a_model_replaces_the_first_with_a_warning():
    torch.manual_seed(0)
    model = MLP().to(DT)
    first = OPOB(model)
    n_hooks = _hook_count(model)
    opt_hooks = set(torch_optimizer._global_optimizer_post_hooks)
    with pytest.warns(UserWarning, match="detached and replaced"):
        second = OPOB(model)
    assert _hook_count(model) == n_hooks
    new = set(torch_optimizer._global_optimizer_post_hooks)
    assert len(new - opt_hooks) == 1 and len(opt_hooks - new) == 1  # the first's hook went
    x = torch.randn(4, 7, dtype=DT)
    loss = model(x).sum(1)
    assert first.num_recorded == 0 and second.num_recorded == 3
    with pytest.raises(ValueError, match="another OPOB was attached to the same model"):
        first.backward(loss, torch.randn(4, dtype=DT))
    second.backward(model(x).sum(1), torch.randn(4, dtype=DT))
    second.detach()
    assert _hook_count(model) == 0


def test_opob_created_every_step_does_not_pile_up():
    """Before: 1 to 41 hooks per module and ~2 MiB per step after 40 steps."""
    torch.manual_seed(0)
    model = MLP().to(DT)
    x = torch.randn(4, 7, dtype=DT)
    opt_hooks = set(torch_optimizer._global_optimizer_post_hooks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(40):
            opob = OPOB(model)
            model(x)  # a forward that is never backpropagated
    assert _hook_count(model) == 2 * 3  # one pre-hook and one forward hook per Linear
    assert len(set(torch_optimizer._global_optimizer_post_hooks) - opt_hooks) == 1
    del opob
    gc.collect()
    assert _hook_count(model) == 0  # a dropped OPOB removes its hooks
    assert not set(torch_optimizer._global_optimizer_post_hooks) - opt_hooks


def _live_tapes():
    from vcpo_optim.opob.tape import Tape

    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is Tape)


def test_deepcopy_of_the_model_does_not_record_into_the_original():
    """Copying the policy (an old-policy snapshot) copies the hook dicts, not OPOB's attachment."""
    torch.manual_seed(0)
    model = MLP().to(DT)
    x = torch.randn(4, 7, dtype=DT)
    r = torch.randn(4, dtype=DT)
    with OPOB(model) as opob:
        model(x)  # a recorded forward is pending while the copy is taken
        tapes = _live_tapes()
        snapshot = copy.deepcopy(model)
        assert _live_tapes() == tapes  # no copy of the tape (and of its activations)
        opob.clear()
        snapshot(torch.randn(6, 7, dtype=DT))  # grad enabled, training mode, another batch size
        assert opob.num_recorded == 0
        ref_n, _, _, ref_g = oracle(copy.deepcopy(snapshot), proj_loss(x), r, [0] * 4)
        opob.clear()
        res = opob.backward(proj_loss(x)(model), r)  # used to fail: "dimension 0 is 6, B=4"
    assert rel_err(res.sq_norms, ref_n) < 1e-10
    for n, p in model.named_parameters():
        assert rel_err(p.grad, ref_g[n]) < 1e-10, n
    with OPOB(snapshot) as other:  # the copy can have its own OPOB; the original is untouched
        snapshot(x)
        model(x)
        assert other.num_recorded == 3


# ----------------------------------------------------------------------------- item 10a


def test_dropout_in_a_fallback_module_names_the_fix():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True).to(DT)
    model = nn.Sequential(nn.Linear(4, 8).to(DT), layer)
    x = torch.randn(3, 5, 4, dtype=DT)
    snap = _grads(model)
    with OPOB(model) as opob:
        loss = model(x).sum((1, 2))
        with pytest.raises(ValueError, match=r"random.*dropout=0") as info:
            opob.backward(loss, torch.randn(3, dtype=DT))
    msg = str(info.value)
    assert "1.self_attn" in msg and "register_rule" not in msg, msg
    _unchanged(model, snap)


# ----------------------------------------------------------------------------- item 10b


@pytest.mark.parametrize("how", ["zero_", "zero_grad_in_place", "new_tensors", "none_then_aux"])
def test_batch_scope_new_step_without_optimizer_step(how):
    """scope="batch", no torch.optim step between steps: the previous step must not carry over.

    Measured before the fix (``p.grad.zero_()``): 120% gradient error at step 2.
    """
    torch.manual_seed(0)
    model = MLP().to(DT)
    x1, x2 = torch.randn(4, 7, dtype=DT), torch.randn(4, 7, dtype=DT)
    r1, r2 = torch.randn(4, dtype=DT), torch.randn(4, dtype=DT) + 3.0
    _, _, _, ref = oracle(model, proj_loss(x2), r2, [0] * 4)
    model.zero_grad(set_to_none=True)
    aux = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    with OPOB(model, scope="batch") as opob:
        opob.backward(proj_loss(x1)(model), r1)
        if how == "zero_":
            for p in model.parameters():
                p.grad.zero_()
        elif how == "zero_grad_in_place":
            model.zero_grad(set_to_none=False)
        elif how == "new_tensors":
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
        else:  # set to None, then another loss's gradient accumulates first
            model.zero_grad(set_to_none=True)
            for n, p in model.named_parameters():
                p.grad = aux[n].clone()
        opob.backward(proj_loss(x2)(model), r2)
    for n, p in model.named_parameters():
        got = p.grad - aux[n] if how == "none_then_aux" else p.grad
        assert rel_err(got, ref[n]) < 1e-10, (how, n)


def test_batch_scope_gradient_modified_in_place_mid_step_is_refused():
    """Neither OPOB's own write nor zero: OPOB cannot tell a reset from an accumulation."""
    torch.manual_seed(0)
    model = MLP().to(DT)
    x = torch.randn(4, 7, dtype=DT)
    with OPOB(model, scope="batch") as opob:
        opob.backward(proj_loss(x)(model), torch.randn(4, dtype=DT))
        for p in model.parameters():
            p.grad.mul_(0.5)  # e.g. clipping between micro-batches
        snap = _grads(model)
        with pytest.raises(ValueError, match="modified in place since OPOB's last backward"):
            opob.backward(proj_loss(x)(model), torch.randn(4, dtype=DT))
        _unchanged(model, snap)
        opob.finalize()  # the way out when a new step starts
        opob.backward(proj_loss(x)(model), torch.randn(4, dtype=DT))


def test_group_scope_in_place_zeroing_starts_a_new_step():
    """The same prompt ids in the next step must not look like a split group."""
    torch.manual_seed(0)
    model = MLP().to(DT)
    x = torch.randn(4, 7, dtype=DT)
    g = torch.tensor([0, 0, 1, 1])
    with OPOB(model, scope="group") as opob:
        opob.backward(proj_loss(x)(model), torch.randn(4, dtype=DT), g)
        model.zero_grad(set_to_none=False)
        opob.backward(proj_loss(x)(model), torch.randn(4, dtype=DT), g)


# ----------------------------------------------------------------------------- reward dtype


@pytest.mark.parametrize("agg", ["mean", "median"])
@pytest.mark.parametrize("scope", ["group", "batch"])
@pytest.mark.parametrize("norm_by_std", [False, True])
def test_float32_rewards_in_a_float64_model_give_float64_baselines(agg, scope, norm_by_std):
    """Rewards of a lower precision than the model are taken as exact values, not rounded into.

    The baselines and coefficients of a float64 model are float64 (as documented),
    whatever the rewards' dtype: float32 rewards used to pull them down to float32.
    """
    torch.manual_seed(0)
    model = MLP().to(DT)
    x = torch.randn(8, 7, dtype=DT)
    r32 = (torch.randn(8) * 3 + 0.1).to(torch.float32)
    groups = [0, 0, 0, 1, 1, 1, 1, 2]
    scopes = groups if scope == "group" else [0] * 8
    ref_n, _, _, ref_g = oracle(
        model, proj_loss(x), r32.to(DT), scopes, agg=agg, norm_by_std=norm_by_std
    )
    ref_b, ref_c = ref_coefficients(
        ref_n.tolist(), r32.to(DT).tolist(), scopes, agg=agg, norm_by_std=norm_by_std
    )
    model.zero_grad(set_to_none=True)
    with OPOB(model, scope=scope, agg=agg, norm_by_std=norm_by_std) as opob:
        res = opob.backward(proj_loss(x)(model), r32, torch.tensor(groups))
    assert res.baselines.dtype == DT and res.coefficients.dtype == DT
    assert rel_err(res.baselines, torch.tensor(ref_b, dtype=DT)) < 1e-12
    assert rel_err(res.coefficients, torch.tensor(ref_c, dtype=DT)) < 1e-12
    for n, p in model.named_parameters():
        assert rel_err(p.grad, ref_g[n]) < 1e-10, n
