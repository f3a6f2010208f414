"""Refusals: every error is raised before .grad or OPOB state changes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from opob_oracle import MLP, TinyLM, assert_one_call_matches_oracle, lm_batch, lm_loss, proj_loss
from torch import nn

from vcpo_optim.opob import OPOB


class WithParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.gain = nn.Parameter(torch.ones(3))
        self.bias2 = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return self.lin(x) * self.gain + self.bias2


def _snapshot(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _same(model, snap):
    for n, p in model.named_parameters():
        if snap[n] is None:
            assert p.grad is None, n
        else:
            assert torch.equal(p.grad, snap[n]), n


def test_strict_lists_uncovered_params():
    with pytest.raises(ValueError, match=r"gain.*bias2|bias2.*gain"):
        OPOB(WithParam())


def test_fallback_is_exact():
    torch.manual_seed(0)
    model = WithParam().double()
    model.gain.data.normal_()
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    fn = proj_loss(x)
    r = torch.randn(5, dtype=torch.float64)
    assert_one_call_matches_oracle(model, fn, r, [0, 0, 1, 1, 1], strict=False)


def test_batchnorm_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="BatchNorm"):
        OPOB(model)
    model.eval()
    opob = OPOB(model, strict=False)
    model.train()
    with pytest.raises(ValueError, match="BatchNorm"):
        model(torch.randn(5, 3))
    opob.detach()


def test_broadcast_position_ids_refused():
    torch.manual_seed(0)
    model = TinyLM()
    ids, _mask = lm_batch()
    snap = _snapshot(model)
    with OPOB(model) as opob:
        logits = model(ids, expand_pos=False)  # pos ids [1, T] broadcast over the batch
        loss = -torch.log_softmax(logits, -1)[..., 1].sum(1)
        with pytest.raises(ValueError, match=r"expand"):
            opob.backward(loss, torch.randn(ids.shape[0]))
        assert opob.num_recorded == 0
    _same(model, snap)


def test_functional_use_of_tied_weight_refused():
    class FunctionalTie(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.lin = nn.Linear(4, 4)

        def forward(self, ids):
            return F.linear(torch.tanh(self.lin(self.emb(ids))), self.emb.weight)

    model = FunctionalTie()
    ids = torch.randint(0, 10, (3, 5))
    with OPOB(model) as opob, pytest.raises(ValueError, match=r"emb\.weight"):
        opob.backward(model(ids).sum((1, 2)), torch.randn(3))
    assert all(p.grad is None for p in model.parameters())


def test_uncovered_builtin_module_refused_strict():
    model = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Bilinear(4, 4, 2))
    with pytest.raises(ValueError, match=r"1\.weight.*2\.weight"):
        OPOB(model)


def test_sequence_first_modules_refused():
    # seq-first attention with T == B used to give silently wrong norms
    with pytest.raises(ValueError, match=r"\['0'\] have batch_first=False"):
        OPOB(nn.Sequential(nn.MultiheadAttention(4, 2), nn.Linear(4, 1)))
    layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0)
    with pytest.raises(ValueError, match=r"self_attn.*batch_first=True"):
        OPOB(layer)
    with pytest.raises(ValueError, match="batch_first=False"):
        OPOB(nn.GRU(3, 4), strict=False)
    OPOB(nn.MultiheadAttention(4, 2, batch_first=True)).detach()


def test_parameters_unknown_to_opob_refused():
    """A trainable Parameter outside the model (or added/unfrozen after attaching) would get no gradient."""
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    temperature = nn.Parameter(torch.tensor(2.0))
    snap = _snapshot(model)
    with OPOB(model) as opob, pytest.raises(ValueError, match=r"1 trainable parameter.*\(\)"):
        opob.backward(model(x).squeeze(-1) / temperature, torch.randn(3))
    _same(model, snap)
    assert temperature.grad is None
    with OPOB(model) as opob:
        model[2] = nn.Linear(4, 1)  # replaced after attaching
        with pytest.raises(ValueError, match="replaced or unfrozen after attaching"):
            opob.backward(model(x).squeeze(-1), torch.randn(3))
    model[0].weight.requires_grad_(False)
    with OPOB(model) as opob:
        model[0].weight.requires_grad_(True)  # unfrozen after attaching
        with pytest.raises(ValueError, match=r"shapes \[\(4, 4\)\]"):
            opob.backward(model(x).squeeze(-1), torch.randn(3))


def test_fallback_failure_is_a_clear_error():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.ones(3))

        def forward(self, x):
            if float(x.detach().sum()) > -1e9:  # data-dependent control flow: vmap cannot run it
                return x * self.g
            return x  # pragma: no cover

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), Gate())
    snap = _snapshot(model)
    with OPOB(model, strict=False) as opob:
        with pytest.raises(ValueError, match=r"fallback failed for module '1' \(Gate\)"):
            opob.backward(model(torch.randn(2, 3)).sum(1), torch.randn(2))
        assert opob.num_recorded == 0
    _same(model, snap)


def test_parametrized_weights_refused():
    """weight_norm & co.: with strict=False and B == out_features the norms were silently wrong."""
    import warnings

    from torch.nn.utils import parametrizations

    model = nn.Sequential(parametrizations.weight_norm(nn.Linear(3, 4)), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="compute their weight from other parameters"):
        OPOB(model, strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated
        old = nn.Sequential(torch.nn.utils.weight_norm(nn.Linear(3, 4)), nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"\['0'\] compute their weight"):
        OPOB(old)


def test_embedding_scale_grad_by_freq_refused():
    model = nn.Embedding(10, 3, scale_grad_by_freq=True)
    with OPOB(model) as opob, pytest.raises(ValueError, match="scale_grad_by_freq"):
        opob.backward(model(torch.randint(0, 10, (3, 4))).sum((1, 2)), torch.randn(3))
    assert model.weight.grad is None


@pytest.mark.parametrize(
    "bad",
    [
        "nan_reward",
        "inf_loss",
        "reward_shape",
        "loss_shape",
        "empty",
        "groups_shape",
        "groups_float",
        "device",
        "no_graph",
        "complex_reward",
    ],
)
def test_bad_inputs_leave_grad_unchanged(bad):
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(4, 7)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    snap = _snapshot(model)
    r = torch.randn(4)
    groups = None
    with OPOB(model, scope="group") as opob:
        loss = model(x).sum(1)
        if bad == "nan_reward":
            r[1] = float("nan")
        elif bad == "inf_loss":
            loss = loss * torch.tensor([1.0, float("inf"), 1.0, 1.0])
        elif bad == "reward_shape":
            r = torch.randn(5)
        elif bad == "loss_shape":
            loss = loss.unsqueeze(1)
        elif bad == "empty":
            loss, r = loss[:0], r[:0]
        elif bad == "groups_shape":
            groups = torch.tensor([0, 0, 1])
        elif bad == "groups_float":
            groups = torch.tensor([0.0, 0.0, 1.0, 1.0])
        elif bad == "complex_reward":
            r = torch.randn(4, dtype=torch.complex64)
        elif bad == "device":
            r = torch.randn(4, device="meta")
        elif bad == "no_graph":
            loss = loss.detach()
        with pytest.raises(ValueError):
            opob.backward(loss, r, groups)
        assert opob.num_recorded == 0
    _same(model, snap)


def test_split_group_refused_and_state_unchanged():
    torch.manual_seed(0)
    model = MLP()
    opob = OPOB(model, scope="group")
    x = torch.randn(6, 7)
    opob.backward(model(x[:3]).sum(1), torch.randn(3), torch.tensor([0, 0, 1]))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="split group"):
        opob.backward(model(x[3:]).sum(1), torch.randn(3), torch.tensor([1, 2, 2]))
    _same(model, snap)
    # the failed call did not register groups 2: a correct call still works
    opob.backward(model(x[3:]).sum(1), torch.randn(3), torch.tensor([2, 3, 3]))
    # a new optimizer step forgets the groups
    torch.optim.SGD(model.parameters(), lr=0.0).step()
    opob.backward(model(x[:3]).sum(1), torch.randn(3), torch.tensor([0, 0, 1]))
    opob.detach()


def test_no_recorded_forward():
    model = MLP()
    with OPOB(model) as opob:
        model.eval()
        loss = model(torch.randn(3, 7)).sum(1)
        with pytest.raises(ValueError, match="no forward pass was recorded"):
            opob.backward(loss, torch.randn(3))
        model.train()
        with torch.no_grad():
            model(torch.randn(3, 7))
        assert opob.num_recorded == 0


def test_trainable_module_in_eval_mode_named_in_the_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 1))
    model[1].eval()  # not recorded, but its parameters still get gradients
    x = torch.randn(3, 4)
    snap = _snapshot(model)
    with OPOB(model) as opob, pytest.raises(ValueError, match=r"eval mode.*\['1'\]"):
        opob.backward(model(x).squeeze(-1), torch.randn(3))
    _same(model, snap)


@pytest.mark.parametrize("kind", ["tensor_hook", "post_accumulate_grad_hook"])
def test_parameter_gradient_hooks_refused(kind):
    """A hook on a trainable Parameter never runs under OPOB, which writes ``.grad`` itself.

    A plain backward runs ``p.register_hook`` hooks on the gradient before it is
    accumulated (e.g. a mask that freezes embedding rows) and
    ``register_post_accumulate_grad_hook`` hooks after it (optimizer-in-backward,
    transformers' Trainer averaging replicated adapters under FSDP2). OPOB must refuse,
    naming the parameter and the hook, with nothing changed; without the hook the
    same call is exact, and after ``handle.remove()`` it runs.
    """
    torch.manual_seed(0)
    model = MLP().double()
    x = torch.randn(5, 7, dtype=torch.float64)
    r = torch.randn(5, dtype=torch.float64)

    def halve(arg):
        return arg * 0.5 if isinstance(arg, torch.Tensor) else None

    p = model.l2.weight
    if kind == "tensor_hook":
        handle = p.register_hook(halve)
    else:
        handle = p.register_post_accumulate_grad_hook(halve)
    with OPOB(model) as opob:
        snap = _snapshot(model)
        with pytest.raises(ValueError, match=r"l2\.weight.*halve"):
            opob.backward(proj_loss(x)(model), r)
        _same(model, snap)
        handle.remove()
    assert_one_call_matches_oracle(model, proj_loss(x), r, [0, 0, 1, 1, 1])


@pytest.mark.parametrize(
    "mix",
    [
        pytest.param(lambda x: x[torch.tensor([2, 0, 4, 1, 3])], id="reordered"),
        pytest.param(lambda x: x - x.mean(), id="centered"),
        pytest.param(lambda x: x + 0.5 * x.roll(1), id="neighbour"),
    ],
)
def test_loss_not_per_sample_refused(mix):
    """Entry i of per_sample_loss must depend on row i of the batch alone; a loss reordered
    against the batch rows (sorted for bucketing, then restored in another order) or mixing
    samples gave wrong norms silently. OPOB checks it once (a second autograd pass with
    power-of-two per-sample weights) and refuses with nothing changed; a per-sample loss in
    batch order passes the same check (the oracle comparison)."""
    torch.manual_seed(0)
    model = TinyLM().double()
    ids, mask = lm_batch()
    r = torch.randn(5, dtype=torch.float64)
    snap = _snapshot(model)
    with OPOB(model) as opob:
        loss = mix(lm_loss(ids, mask)(model))
        with pytest.raises(ValueError, match="does not depend on row i of the batch alone"):
            opob.backward(loss, r)
        _same(model, snap)
        res = opob.backward(lm_loss(ids, mask)(model), r)  # the check passes, then runs
    assert opob._step.separable_checked and res.sq_norms.shape == (5,)
    model.zero_grad(set_to_none=True)
    with OPOB(model, check_first_call=False) as opob:  # the opt-out: not checked
        opob.backward(mix(lm_loss(ids, mask)(model)), r)
    with pytest.raises(ValueError, match="check_first_call must be a bool"):
        OPOB(model, check_first_call="no")
    model.zero_grad(set_to_none=True)
    assert_one_call_matches_oracle(model, lm_loss(ids, mask), r, [0, 0, 1, 1, 1], tol=1e-9)


def test_gradient_hook_on_a_module_output_refused():
    """A ``Tensor.register_hook`` on a hooked module's output that rescales its gradient acts
    after OPOB captures that gradient: OPOB's per-sample gradients of the module's weight
    missed the factor silently. The first call's check (factors with unit coefficients
    against autograd's own gradient of sum_i l_i) refuses it; a hook that only reads the
    gradient changes nothing and passes."""
    torch.manual_seed(0)
    model = MLP().double()
    x = torch.randn(5, 7, dtype=torch.float64)
    r = torch.randn(5, dtype=torch.float64)
    seen = []

    def rescale(mod, args, out):
        out.register_hook(lambda g: g * 0.5)

    def observe(mod, args, out):
        out.register_hook(lambda g: seen.append(g.shape) and None)

    h = model.l2.register_forward_hook(rescale)
    snap = _snapshot(model)
    with OPOB(model) as opob:
        for _ in range(2):  # a refused call is checked again
            with pytest.raises(ValueError, match=r"'l2\.weight' do not add up.*register_hook"):
                opob.backward(proj_loss(x)(model), r)
            _same(model, snap)
    h.remove()
    model.l2.register_forward_hook(observe)
    assert_one_call_matches_oracle(model, proj_loss(x), r, [0, 0, 1, 1, 1])
    assert seen


def test_inplace_after_linear_is_exact():
    """nn.ReLU(inplace=True) right after a Linear on a 3-D input (a view output)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 2)).double()
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    fn = proj_loss(x)
    r = torch.randn(4, dtype=torch.float64)
    assert_one_call_matches_oracle(model, fn, r)


def test_detach_removes_hooks():
    model = TinyLM()
    ids, mask = lm_batch()
    opob = OPOB(model)
    opob.detach()
    lm_loss(ids, mask)(model).sum().backward()  # plain autograd still works
    assert opob.num_recorded == 0
    with pytest.raises(ValueError, match="detached"):
        opob.backward(lm_loss(ids, mask)(model), torch.randn(ids.shape[0]))


class Ckpt(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.reentrant = reentrant
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 2)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = torch.tanh(self.a(x))
        h = checkpoint(lambda t: torch.tanh(self.b(t)), h, use_reentrant=self.reentrant)
        return self.c(h)


def test_non_reentrant_checkpoint_is_exact():
    torch.manual_seed(0)
    model = Ckpt(reentrant=False).double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    fn = proj_loss(x)
    r = torch.randn(5, dtype=torch.float64)
    assert_one_call_matches_oracle(model, fn, r)


def test_reentrant_checkpoint_refused():
    torch.manual_seed(0)
    model = Ckpt(reentrant=True)
    x = torch.randn(5, 3, 4, requires_grad=True)
    with OPOB(model) as opob, pytest.raises(ValueError, match="use_reentrant=False"):
        opob.backward(model(x).sum((1, 2)), torch.randn(5))
