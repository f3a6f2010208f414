"""OPOB against the exact per-sample loop (one backward per sample, float64 oracle)."""

from __future__ import annotations

import copy

import pytest
import torch
from opob_oracle import (
    MLP,
    Conv1dNet,
    Conv2dNet,
    TinyLM,
    lm_batch,
    lm_loss,
    oracle,
    proj_loss,
    rel_err,
)

from vcpo_optim.opob import OPOB
from vcpo_optim.opob.engine import ParamWork


def _case(name: str, dtype: torch.dtype):
    torch.manual_seed(0)
    if name == "lm":
        model = TinyLM()
        ids, mask = lm_batch()
        fn = lm_loss(ids, mask)
        b = ids.shape[0]
    elif name == "mlp":
        model = MLP()
        x = torch.randn(6, 7)
        fn, b = proj_loss(x), 6
    elif name == "conv1d":
        model = Conv1dNet()
        x = torch.randn(5, 3, 12)
        fn, b = proj_loss(x), 5
    else:
        model = Conv2dNet()
        x = torch.randn(4, 2, 6, 7)
        fn, b = proj_loss(x), 4
    model = model.to(dtype)
    if name != "lm":
        fn = proj_loss(x.to(dtype))

    return model, fn, b


def _check(model, fn, rewards, groups, scopes, tol, **kw):
    ref_n, ref_b, ref_c, ref_g = oracle(
        model, fn, rewards, scopes, kw.get("agg", "mean"), kw.get("norm_by_std", False)
    )
    model.zero_grad(set_to_none=True)
    with OPOB(model, **kw) as opob:
        res = opob.backward(fn(model), rewards, groups)
        assert opob.num_recorded == 0
    assert rel_err(res.sq_norms, ref_n) < tol
    assert (res.baselines.double() - ref_b).abs().max() < tol * (1 + ref_b.abs().max())
    assert (res.coefficients.double() - ref_c).abs().max() < tol * (1 + ref_c.abs().max())
    floor = 1e-4 * float(ref_n.max().sqrt()) * (1 + float(ref_c.abs().max()))
    for n, p in model.named_parameters():
        ref = ref_g[n]
        if not isinstance(ref, torch.Tensor):
            continue
        got = p.grad if p.grad is not None else torch.zeros_like(ref)
        err = float((got.double() - ref).norm())
        assert err <= tol * max(float(ref.norm()), floor), (n, err, float(ref.norm()))
    return res


MODELS = ["lm", "mlp", "conv1d", "conv2d"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_models_match_loop(name, dtype, tol):
    model, fn, b = _case(name, dtype)
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(b, generator=g, dtype=dtype)
    groups = torch.tensor([0, 0, 1, 1, 1, 2][:b])
    _check(model, fn, rewards, groups, groups.tolist(), tol, scope="group")
    model2, fn2, _ = _case(name, dtype)
    _check(model2, fn2, rewards, None, [0] * b, tol, scope="batch", norm_by_std=True)


@pytest.mark.parametrize("strategy", ["ghost", "direct", "acc"])
@pytest.mark.parametrize("scope", ["group", "batch"])
def test_every_strategy_exact(monkeypatch, strategy, scope):
    """Force each norm/write strategy on every parameter (Dense factors always materialise)."""
    orig = ParamWork.choose

    def forced(self, batch, n_scopes, n_writes):
        best = orig(self, batch, n_scopes, n_writes)
        from vcpo_optim.opob.rules.base import Dense

        if strategy == "ghost" and any(isinstance(f, Dense) for f in self.factors):
            return best
        self.strategy = strategy
        return strategy

    monkeypatch.setattr(ParamWork, "choose", forced)
    for name in ["lm", "conv1d"]:
        model, fn, b = _case(name, torch.float64)
        rewards = torch.linspace(-1, 2, b, dtype=torch.float64) ** 2
        groups = torch.tensor([4, 4, 9, 9, 9][:b])
        scopes = groups.tolist() if scope == "group" else [0] * b
        _check(model, fn, rewards, groups, scopes, 1e-9, scope=scope, norm_by_std=True)


@pytest.mark.parametrize("agg", ["mean", "median", "winsorized_mean"])
def test_aggregations(agg):
    model, fn, b = _case("lm", torch.float64)
    rewards = torch.tensor([0.3, -1.0, 2.0, 0.7, 0.1], dtype=torch.float64)
    _check(model, fn, rewards, torch.tensor([1, 1, 1, 2, 2]), [1, 1, 1, 2, 2], 1e-9, agg=agg)
    model, fn, b = _case("lm", torch.float64)
    _check(model, fn, rewards, None, [0] * b, 1e-9, agg=agg, scope="batch", norm_by_std=True)


def test_accumulates_into_existing_grad():
    model, fn, b = _case("mlp", torch.float64)
    rewards = torch.randn(b, dtype=torch.float64)
    _, _, _, ref_g = oracle(model, fn, rewards, [0] * b)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    with OPOB(model, scope="batch") as opob:
        opob.backward(fn(model), rewards)
    for n, p in model.named_parameters():
        assert rel_err(p.grad - 0.5, ref_g[n]) < 1e-9


def test_degenerate_cases():
    # all rewards equal -> all coefficients zero, grads zero
    model, fn, b = _case("lm", torch.float64)
    res = _check(model, fn, torch.full((b,), 0.7, dtype=torch.float64), None, [0] * b, 1e-9)
    assert res.coefficients.abs().max() < 1e-12
    # singleton groups: b = R_i, c = 0; zero-std groups with norm_by_std
    model, fn, b = _case("lm", torch.float64)
    r = torch.randn(b, dtype=torch.float64)
    res = _check(model, fn, r, torch.arange(b), list(range(b)), 1e-9)
    assert torch.allclose(res.baselines, r)
    model, fn, b = _case("lm", torch.float64)
    r = torch.tensor([1.0, 1.0, 2.0, 3.0, 3.0], dtype=torch.float64)
    res = _check(
        model, fn, r, torch.tensor([0, 0, 1, 2, 2]), [0, 0, 1, 2, 2], 1e-9, norm_by_std=True
    )
    assert res.coefficients.abs().max() == 0
    # B = 1
    torch.manual_seed(0)
    model = TinyLM().double()
    ids, mask = lm_batch(b=1)
    _check(model, lm_loss(ids, mask), torch.tensor([0.3], dtype=torch.float64), None, [0], 1e-9)


def test_all_norms_zero_plain_mean():
    model = MLP().double()
    x = torch.randn(4, 7, dtype=torch.float64)
    r = torch.tensor([1.0, 2.0, 4.0, 5.0], dtype=torch.float64)
    with OPOB(model, scope="batch") as opob:
        res = opob.backward(model(x).sum(1) * 0.0, r)
    assert res.sq_norms.abs().max() == 0
    assert torch.allclose(res.baselines, torch.full((4,), 3.0, dtype=torch.float64))
    assert all(p.grad.abs().max() == 0 for p in model.parameters())


def test_module_called_twice_and_tied():
    """A Linear applied twice (shared weights) and an Embedding tied to a Linear head."""

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 6, padding_idx=3)
            self.lin = torch.nn.Linear(6, 6)
            self.head = torch.nn.Linear(6, 10)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            h = self.emb(ids)
            h = torch.tanh(self.lin(torch.tanh(self.lin(h))))
            return self.head(h)

    torch.manual_seed(1)
    model = Twice().double()
    ids = torch.randint(0, 10, (4, 5))
    ids[0, :2] = 3

    def fn(m, _ids=ids):
        out = m(_ids)
        return (
            out * torch.linspace(-1, 1, out[0].numel(), dtype=out.dtype).view(out[0].shape)
        ).sum((1, 2))

    _check(model, fn, torch.randn(4, dtype=torch.float64), None, [0] * 4, 1e-9)
    copy.deepcopy(model)


def test_torch_transformer_layer_with_multihead_attention():
    """nn.TransformerEncoderLayer: nn.MultiheadAttention is covered as a unit by the exact vmap fallback."""
    import warnings

    class EncLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = torch.nn.Embedding(13, 8, padding_idx=0)
            self.layer = torch.nn.TransformerEncoderLayer(
                8, 2, 16, dropout=0.0, batch_first=True, norm_first=True
            )
            self.head = torch.nn.Linear(8, 13, bias=False)
            self.head.weight = self.tok.weight

        def forward(self, ids):
            t = ids.shape[1]
            causal = torch.nn.Transformer.generate_square_subsequent_mask(t, dtype=torch.float64)
            return self.head(self.layer(self.tok(ids), src_mask=causal, is_causal=True))

    torch.manual_seed(0)
    model = EncLM().double()
    ids = torch.randint(1, 13, (4, 6))
    ids[0, 4:] = 0

    def fn(m):
        logp = torch.log_softmax(m(ids), -1)
        return -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1).sum(1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check(
            model,
            fn,
            torch.randn(4, dtype=torch.float64),
            torch.tensor([0, 0, 1, 1]),
            [0, 0, 1, 1],
            1e-9,
        )
