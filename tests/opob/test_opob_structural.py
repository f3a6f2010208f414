"""Rules matched by structure, inherited by subclasses, or registered by users: checked on first use.

A rule that is not written for a module's exact class is compared with the
module's own forward the first time it is used; a look-alike module with a
different forward is refused (``strict=True``) or sent to the exact fallback
(``strict=False``), never silently wrong. These tests use small stand-in
modules; the real transformers / PEFT classes are in ``test_hf_models.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from opob_oracle import assert_one_call_matches_oracle, proj_loss
from torch import nn

from vcpo_optim.opob import OPOB, Dense, register_rule
from vcpo_optim.opob.rules import base as rules_base
from vcpo_optim.opob.rules import fallback as rules_fallback
from vcpo_optim.opob.rules import (
    register_structural_rule,
    resolve_rule,
    rule_status,
    structural_rules_disabled,
)
from vcpo_optim.opob.rules.layer_norm import layer_norm_rule
from vcpo_optim.opob.rules.rms_norm import rms_norm_rule

DT = torch.float64


@pytest.fixture
def registry():
    """Restore the global rule registry after a test that registers rules."""
    rules = dict(rules_base.RULES)
    specs = dict(rules_base._SPECS)
    structural = list(rules_base.STRUCTURAL_RULES)
    yield
    rules_base.RULES.clear()
    rules_base.RULES.update(rules)
    rules_base._SPECS.clear()
    rules_base._SPECS.update(specs)
    rules_base.STRUCTURAL_RULES[:] = structural
    rules_base._version[0] += 1


@pytest.fixture
def no_fallback(monkeypatch):
    """Fail the test if the vmap fallback runs."""

    def boom(*a, **k):
        raise AssertionError("the vmap fallback was used")

    monkeypatch.setattr(rules_fallback, "vmap", boom)


# ------------------------------------------------------------------ stand-in modules


class LlamaLikeRMSNorm(nn.Module):
    """transformers' Llama/Qwen2 RMSNorm (float32 normalisation, ``w * xhat.to(dtype)``)."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(input_dtype)


class OnePlusRMSNorm(nn.Module):
    """Gemma's form ``(xhat * (1 + w))``: same weight gradient as ``w * xhat``, so the rule fits."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class NoRsqrtRMSNorm(LlamaLikeRMSNorm):
    """Same structure, but no normalisation."""

    def forward(self, hidden_states):
        return self.weight * hidden_states


class SquaredRMSNorm(LlamaLikeRMSNorm):
    """``w**2 * xhat``: at the initial ``w = 1`` its OUTPUT equals an RMSNorm's, its gradient is 2x."""

    def forward(self, hidden_states):
        h = hidden_states.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight**2 * h.to(hidden_states.dtype)


class CenteredRMSNorm(LlamaLikeRMSNorm):
    """A LayerNorm without bias that calls itself RMSNorm."""

    def forward(self, hidden_states):
        h = hidden_states - hidden_states.mean(-1, keepdim=True)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h


class Net(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.norm = norm
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))))


def _data(b=5, t=3):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(b, t, 5, generator=g, dtype=DT)
    r = torch.randn(b, generator=g, dtype=DT)
    return x, r


def _net(norm, seed=0):
    torch.manual_seed(seed)
    return Net(norm).to(DT)


# ------------------------------------------------------------------ structural RMSNorm


# Gemma's form computes (1 + w.float()) in float32 even in a float64 model, so autograd's own
# gradient of w (the oracle) is float32-accurate there: 1e-6, not 1e-9.
@pytest.mark.parametrize(("norm_cls", "tol"), [(LlamaLikeRMSNorm, 1e-9), (OnePlusRMSNorm, 1e-6)])
def test_rms_norm_variants_matched_and_exact(norm_cls, tol, no_fallback):
    model = _net(norm_cls(6))
    model.norm.weight.data.normal_()
    assert resolve_rule(model.norm).source == "structural rule 'rms_norm'"
    assert rule_status(model.norm) == "unverified"
    x, r = _data()
    assert_one_call_matches_oracle(model, proj_loss(x), r, [0, 0, 1, 1, 1], tol=tol)
    assert rule_status(model.norm) == "verified"


@pytest.mark.parametrize("norm_cls", [NoRsqrtRMSNorm, SquaredRMSNorm, CenteredRMSNorm])
def test_rms_norm_look_alike_refused_strict(norm_cls):
    model = _net(norm_cls(6))  # weight = 1: SquaredRMSNorm's output is an RMSNorm's
    assert resolve_rule(model.norm) is not None  # matched by structure ...
    x, r = _data()
    with OPOB(model) as opob:
        with pytest.raises(ValueError, match=rf"module 'norm' \({norm_cls.__name__}; structural"):
            opob.backward(proj_loss(x)(model), r)
        assert opob.num_recorded == 0
    assert all(p.grad is None for p in model.parameters())  # ... and refused before any change
    assert rule_status(model.norm) == "rejected"
    with OPOB(model) as opob, pytest.raises(ValueError, match="does not fit"):
        opob.backward(proj_loss(x)(model), r)  # the verdict is kept


@pytest.mark.parametrize("norm_cls", [NoRsqrtRMSNorm, SquaredRMSNorm, CenteredRMSNorm])
def test_rms_norm_look_alike_falls_back_exactly(norm_cls):
    model = _net(norm_cls(6))
    x, r = _data()
    assert_one_call_matches_oracle(model, proj_loss(x), r, [0, 0, 1, 1, 1], tol=1e-9, strict=False)
    assert rule_status(model.norm) == "rejected"
    # later calls go straight to the fallback, still exact
    model.norm.weight.data.normal_()
    assert_one_call_matches_oracle(model, proj_loss(x), r, tol=1e-9, strict=False)


def test_inconclusive_check_waits_for_a_gradient(no_fallback):
    """A first call with a zero gradient proves nothing; the check runs again on the next call."""
    model = _net(LlamaLikeRMSNorm(6))
    model.norm.weight.data.normal_()
    x, r = _data()
    with OPOB(model) as opob:
        opob.backward(proj_loss(x)(model) * 0.0, r)  # all output gradients are zero
        assert rule_status(model.norm) == "unverified"
        model.zero_grad(set_to_none=True)
        opob.backward(proj_loss(x)(model), r)
        assert rule_status(model.norm) == "verified"


def test_gated_rms_norm_not_matched():
    class GatedRMSNorm(LlamaLikeRMSNorm):
        def forward(self, hidden_states, gate):
            return super().forward(hidden_states) * F.silu(gate)

    assert resolve_rule(GatedRMSNorm(4)) is None
    with pytest.raises(ValueError, match=r"GatedRMSNorm x1"):
        OPOB(GatedRMSNorm(4))


# ------------------------------------------------------------------ subclasses


class DoubledEmbedding(nn.Embedding):
    """An nn.Embedding subclass with its own forward (and no embed_scale)."""

    def forward(self, ids):
        return super().forward(ids) * 2.0


class ScaledEmbedding(nn.Embedding):
    """Gemma's pattern: ``embedding * embed_scale`` (buffer), cast to the weight dtype."""

    def __init__(self, n, d, padding_idx, embed_scale):
        super().__init__(n, d, padding_idx)
        self.embed_scale = nn.Buffer(torch.tensor(embed_scale), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


class OffsetScaledEmbedding(ScaledEmbedding):
    """Looks like a scaled embedding, but adds its weight's row mean."""

    def forward(self, ids):
        y = super().forward(ids)
        return y + y.mean(-1, keepdim=True)


class PlainSubEmbedding(nn.Embedding):
    """A subclass that keeps nn.Embedding's forward: the parent's rule applies as is."""


class EmbNet(nn.Module):
    def __init__(self, emb):
        super().__init__()
        self.emb = emb
        self.out = nn.Linear(4, 2)

    def forward(self, ids):
        return self.out(torch.tanh(self.emb(ids)))


def _ids():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 9, (5, 6), generator=g)
    ids[0, :2] = 0  # padding_idx
    return ids, torch.randn(5, generator=g, dtype=DT)


def test_scaled_embedding_rule(no_fallback):
    torch.manual_seed(0)
    model = EmbNet(ScaledEmbedding(9, 4, 0, 4**0.5)).to(DT)
    assert resolve_rule(model.emb).source == "structural rule 'scaled_embedding'"
    ids, r = _ids()
    assert_one_call_matches_oracle(model, proj_loss(ids), r, tol=1e-9)
    assert rule_status(model.emb) == "verified"


def test_plain_subclass_inherits_trusted_rule(no_fallback):
    torch.manual_seed(0)
    model = EmbNet(PlainSubEmbedding(9, 4, padding_idx=0)).to(DT)
    assert rule_status(model.emb) == "trusted"
    ids, r = _ids()
    assert_one_call_matches_oracle(model, proj_loss(ids), r, tol=1e-9)


@pytest.mark.parametrize(
    "make",
    [lambda: DoubledEmbedding(9, 4, padding_idx=0), lambda: OffsetScaledEmbedding(9, 4, 0, 2.0)],
    ids=["own_forward", "scaled_look_alike"],
)
def test_subclass_with_own_forward_checked(make):
    """The parent's (or the scaled-embedding) rule is checked: refused strict, exact as fallback."""
    torch.manual_seed(0)
    model = EmbNet(make()).to(DT)
    assert rule_status(model.emb) == "unverified"
    ids, r = _ids()
    with OPOB(model) as opob, pytest.raises(ValueError, match=type(model.emb).__name__):
        opob.backward(proj_loss(ids)(model), r)
    assert all(p.grad is None for p in model.parameters())
    torch.manual_seed(0)
    model = EmbNet(make()).to(DT)
    assert_one_call_matches_oracle(model, proj_loss(ids), r, tol=1e-9, strict=False)
    assert rule_status(model.emb) == "rejected"


def _replace_forward(module, pre, post):
    """What accelerate's ``add_hook_to_module`` does: ``module.forward`` set on the instance."""
    old = module.forward

    def forward(*args):
        return post(old(*(pre(a) for a in args)))

    module.forward = forward


class _TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("when", ["before_attach", "after_first_step"])
def test_instance_forward_replacement_checked(when):
    """A trusted built-in rule (nn.Linear) on a module whose forward is replaced on the instance
    (accelerate hooks, monkeypatching) is checked on first use like a subclass's own forward:
    a value-changing replacement is refused strict and exact through the fallback, a
    value-preserving one (accelerate's device-alignment hook) stays exact with the rule."""
    torch.manual_seed(0)
    x = torch.randn(5, 2, 4, dtype=DT)
    r = torch.randn(5, dtype=DT)
    model = _TwoLinear().to(DT)
    assert rule_status(model.a) == "trusted"
    opob = OPOB(model)
    if when == "after_first_step":  # trusted and used before the forward is replaced
        opob.backward(proj_loss(x)(model), r)
        model.zero_grad(set_to_none=True)
    _replace_forward(model.a, lambda t: 1.5 * t, lambda t: 0.7 * t)
    assert rule_status(model.a) == "unverified"
    with pytest.raises(ValueError, match=r"'a' \(Linear.*replaced on the instance"):
        opob.backward(proj_loss(x)(model), r)
    assert all(p.grad is None for p in model.parameters())
    opob.detach()
    assert_one_call_matches_oracle(model, proj_loss(x), r, tol=1e-9, strict=False)
    assert rule_status(model.a) == "rejected"

    torch.manual_seed(0)
    model = _TwoLinear().to(DT)
    _replace_forward(model.a, lambda t: t, lambda t: t)
    assert_one_call_matches_oracle(model, proj_loss(x), r, tol=1e-9)
    assert rule_status(model.a) == "verified"


# ------------------------------------------------------------------ transposed linear (GPT-2 Conv1D)


class TransposedLinear(nn.Module):
    """transformers.pytorch_utils.Conv1D's code."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.3)

    def forward(self, x):
        size_out = (*x.size()[:-1], self.nf)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class NotTransposedLinear(TransposedLinear):
    """Same structure, but squares its input."""

    def forward(self, x):
        return super().forward(x * x)


def test_transposed_linear_rule(no_fallback):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), TransposedLinear(3, 4)).to(DT)
    assert resolve_rule(model[1]).source == "structural rule 'transposed_linear'"
    x, r = _data()
    assert_one_call_matches_oracle(model, proj_loss(x), r, [0, 1, 0, 1, 1], tol=1e-9)


def test_transposed_linear_look_alike():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), NotTransposedLinear(3, 4)).to(DT)
    x, r = _data()
    with OPOB(model) as opob, pytest.raises(ValueError, match="NotTransposedLinear"):
        opob.backward(proj_loss(x)(model), r)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), NotTransposedLinear(3, 4)).to(DT)
    assert_one_call_matches_oracle(model, proj_loss(x), r, tol=1e-9, strict=False)


# ------------------------------------------------------------------ registrations


def test_bad_registrations_are_clear(registry):
    with pytest.raises(TypeError, match=r"nn\.Module subclasses"):
        register_rule("Qwen2RMSNorm")
    with pytest.raises(TypeError, match=r"nn\.Module subclasses"):
        register_rule(int)
    with pytest.raises(TypeError, match=r"must take \(module, inputs, grad_output\)"):
        register_rule(LlamaLikeRMSNorm)(lambda module: {})
    with pytest.raises(TypeError, match="match must be callable"):
        register_structural_rule("RMSNorm", rms_norm_rule)


def test_builtin_rms_rule_registered_for_hf_style_norm(registry, no_fallback):
    """Registering the built-in RMSNorm rule for a transformers-style RMSNorm works (was AttributeError)."""

    class MyRMSNorm(LlamaLikeRMSNorm):
        pass

    register_rule(MyRMSNorm)(rms_norm_rule)
    model = _net(MyRMSNorm(6))
    model.norm.weight.data.normal_()
    x, r = _data()
    assert_one_call_matches_oracle(model, proj_loss(x), r, tol=1e-9)
    assert rule_status(model.norm) == "verified"


def test_rule_that_does_not_fit_is_a_clear_error(registry):
    """A rule that crashes on the module (LayerNorm's rule needs normalized_shape) -> clear error."""

    class MyNorm(LlamaLikeRMSNorm):
        pass

    register_rule(MyNorm)(layer_norm_rule)
    x, r = _data()
    model = _net(MyNorm(6))
    match = r"module 'norm' \(MyNorm\) failed: AttributeError.*normalized_shape"
    with OPOB(model) as opob, pytest.raises(ValueError, match=match + ".*'layer_norm_rule'"):
        opob.backward(proj_loss(x)(model), r)
    assert all(p.grad is None for p in model.parameters())
    model = _net(MyNorm(6))
    assert_one_call_matches_oracle(model, proj_loss(x), r, tol=1e-9, strict=False)


def test_rule_with_wrong_factor_names_is_a_clear_error(registry):
    class Gain(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.ones(6))

        def forward(self, x):
            return x * self.g

    @register_rule(Gain)
    def wrong(module, inputs, grad_output):
        return {"weight": Dense(grad_output.sum(1))}

    model = _net(Gain())
    x, r = _data()
    with (
        OPOB(model) as opob,
        pytest.raises(ValueError, match=r"'weight', which is not a trainable"),
    ):
        opob.backward(proj_loss(x)(model), r)


def test_user_registered_wrong_rule_is_checked(registry):
    """verify=True (the default) catches a user rule that is wrong for its module."""

    class Gain(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.ones(6))

        def forward(self, x):
            return x * self.g * self.g

    @register_rule(Gain)
    def linear_in_g(module, inputs, grad_output):  # wrong: forgets the factor 2 g
        x = inputs[0]
        return {"g": Dense((x * grad_output).sum(1))}

    model = _net(Gain())
    x, r = _data()
    with OPOB(model) as opob, pytest.raises(ValueError, match=r"gradient of 'g' differs"):
        opob.backward(proj_loss(x)(model), r)


def test_user_structural_rule_and_kwargs(registry, no_fallback):
    """A user structural rule; a rule may take the call's keyword arguments."""

    class Modulated(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.randn(6))

        def forward(self, x, *, gate):
            return x * self.scale * gate

    def modulated_rule(module, inputs, grad_output, kwargs):
        x = inputs[0]
        return {"scale": Dense((x * kwargs["gate"] * grad_output).sum(1))}

    register_structural_rule(
        lambda m: hasattr(m, "scale") and isinstance(m.scale, nn.Parameter), modulated_rule
    )

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(5, 6)
            self.mod = Modulated()

        def forward(self, x):
            h = self.inp(x)
            return self.mod(h, gate=torch.sigmoid(h))

    torch.manual_seed(0)
    model = M().to(DT)
    x, r = _data()
    assert_one_call_matches_oracle(model, proj_loss(x), r, tol=1e-9)
    assert rule_status(model.mod) == "verified"


def test_structural_rules_can_be_disabled():
    model = _net(LlamaLikeRMSNorm(6))
    with structural_rules_disabled(), pytest.raises(ValueError, match="LlamaLikeRMSNorm x1"):
        OPOB(model)
    OPOB(model).detach()


def test_uncovered_message_lists_classes_then_a_few_names():
    class Gain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.ones(3))
            self.b = nn.Parameter(torch.ones(3))

    model = nn.Sequential(*[Gain() for _ in range(20)], nn.PReLU())
    with pytest.raises(ValueError) as e:
        OPOB(model)
    msg = str(e.value)
    assert "41 trainable parameter(s) in 21 module(s)" in msg
    assert "Gain x20" in msg and "PReLU x1" in msg
    assert "0.a, 0.b, 1.a, 1.b, 2.a, 2.b, ... (35 more)" in msg
    assert len(msg) < 700


# ------------------------------------------------------------------ recording


def test_call_that_never_reaches_the_loss_is_dropped():
    """A hooked call on another batch whose output is detached (PEFT DoRA's eye(in) call)."""

    class EyeUser(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6)

        def forward(self, x):
            w_eff = self.lin(torch.eye(6, dtype=x.dtype)).detach()  # batch 6, detached
            return self.lin(x) / w_eff.norm()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), EyeUser()).to(DT)
    x, r = _data()
    assert_one_call_matches_oracle(model, proj_loss(x), r, tol=1e-9)


def test_fallback_replays_under_autocast():
    """The fallback replays a module under the autocast state of its forward (was: autocast off,
    and a float32 weight met the bf16 input of the recorded call)."""

    class AutocastNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 4)
            self.b = TransposedLinear(3, 4)

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.b(self.a(x)).float()  # b's input is bf16, its weight float32

    x, r = _data()
    x, r = x.float(), r.float()
    torch.manual_seed(0)
    model = AutocastNet()
    with structural_rules_disabled():  # TransposedLinear has no rule: the fallback
        assert_one_call_matches_oracle(model, proj_loss(x), r, tol=2e-2, strict=False)
    torch.manual_seed(0)
    model = AutocastNet()  # the structural rule, checked under the recorded autocast state
    assert_one_call_matches_oracle(model, proj_loss(x), r, tol=2e-2)
    assert rule_status(model.b) == "verified"


def test_trusted_rule_that_breaks_is_never_bypassed(registry):
    """A built-in (trusted) rule that raises is an error even with strict=False, not the fallback;
    a function put into RULES directly is used too (the registry reads RULES)."""
    model = _net(LlamaLikeRMSNorm(6))
    x, r = _data()

    def broken(module, inputs, grad_output):
        raise RuntimeError("broken on purpose")

    with OPOB(model, strict=False) as opob:
        rules_base.RULES[nn.Linear] = broken
        with pytest.raises(ValueError, match=r"module 'inp' \(Linear\) failed: RuntimeError"):
            opob.backward(proj_loss(x)(model), r)
    assert all(p.grad is None for p in model.parameters())
