"""ESS-scaled optimizers against plain torch.optim: bitwise, schedulers, state, errors."""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from vcpo_optim import VCPOSGD, VCPOAdam, VCPOAdamW, effective_sample_size, ess_scaled


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))


def param_groups(model: nn.Module, lr: Any, **extra: Any) -> list[dict[str, Any]]:
    """Two param groups with different settings (weights vs biases+norm)."""
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
    lr2 = lr * 0.5 if not isinstance(lr, torch.Tensor) else lr.clone() * 0.5
    return [{"params": decay, **extra}, {"params": rest, "lr": lr2, "weight_decay": 0.0}]


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)) for _ in range(n)]


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return (model(x) - y).pow(2).mean()


def assert_bitwise(
    a: nn.Module, b: nn.Module, oa: torch.optim.Optimizer, ob: torch.optim.Optimizer
) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for key, v in sa[k].items():
            w = sb[k][key]
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, w), (k, key)
            else:
                assert v == w, (k, key)


NEEDS_CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="capturable AdamW needs a CUDA device (CPU is not a capturable device)",
)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

ADAMW_CONFIGS = [
    {"foreach": False},
    {"foreach": True},
    {"fused": True},
    {"foreach": False, "amsgrad": True},
    {"foreach": True, "amsgrad": True, "maximize": True},
    {"fused": True, "amsgrad": True, "maximize": True},
    pytest.param({"foreach": True, "capturable": True, "tensor_lr": True}, marks=NEEDS_CUDA),
    pytest.param({"foreach": False, "capturable": True, "tensor_lr": True}, marks=NEEDS_CUDA),
    {"fused": True, "tensor_lr": True},
    {"foreach": False, "weight_decay": 0.3},
]


@pytest.mark.parametrize(
    "config", ADAMW_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
)
@pytest.mark.parametrize("weights_kind", ["log_equal", "weights_equal", "none"])
def test_equal_weights_are_bitwise_adamw(config: dict[str, Any], weights_kind: str) -> None:
    config = dict(config)
    tensor_lr = config.pop("tensor_lr", False)
    device = DEVICE if config.get("capturable") else torch.device("cpu")
    lr: Any = torch.tensor(0.01, device=device) if tensor_lr else 0.01
    ma, mb = make_model().to(device), make_model().to(device)
    oa = torch.optim.AdamW(param_groups(ma, lr), lr=lr, **config)
    ob = VCPOAdamW(param_groups(mb, lr), lr=lr, **config)
    for i, batch in enumerate(batches(6)):
        for m, o in ((ma, oa), (mb, ob)):
            o.zero_grad()
            loss_fn(m, tuple(t.to(device) for t in batch)).backward()
        oa.step()
        if weights_kind == "log_equal":
            ob.step(log_weights=torch.full((5 + i,), 0.37 * i - 3.0, device=device))
        elif weights_kind == "weights_equal":
            ob.step(importance_weights=torch.full((4,), 2.5, device=device))
        else:
            ob.step()
        assert_bitwise(ma, mb, oa, ob)
    assert ob.last_stats is not None
    assert float(ob.last_stats.lr_scale) == 1.0
    assert ob.last_stats.observed == (weights_kind != "none")


SGD_CONFIGS = [
    {"foreach": False},
    {"foreach": True, "momentum": 0.9, "nesterov": True},
    {"fused": True, "momentum": 0.5, "weight_decay": 0.1},
    {"foreach": False, "momentum": 0.9, "dampening": 0.1, "maximize": True},
]


@pytest.mark.parametrize("config", SGD_CONFIGS, ids=str)
def test_equal_weights_are_bitwise_sgd(config: dict[str, Any]) -> None:
    ma, mb = make_model(), make_model()
    oa = torch.optim.SGD(param_groups(ma, 0.05), lr=0.05, **config)
    ob = VCPOSGD(param_groups(mb, 0.05), lr=0.05, **config)
    for batch in batches(5):
        for m, o in ((ma, oa), (mb, ob)):
            o.zero_grad()
            loss_fn(m, batch).backward()
        oa.step()
        ob.step(importance_weights=torch.ones(8))
        assert_bitwise(ma, mb, oa, ob)


@pytest.mark.parametrize(
    "base",
    [
        torch.optim.Adam,
        torch.optim.RAdam,
        torch.optim.NAdam,
        torch.optim.Adagrad,
        torch.optim.RMSprop,
    ],
)
def test_ess_scaled_factory_is_bitwise_with_equal_weights(
    base: type[torch.optim.Optimizer],
) -> None:
    cls = ess_scaled(base)
    assert issubclass(cls, base) and issubclass(cls, torch.optim.Optimizer)
    assert ess_scaled(base) is cls  # cached
    ma, mb = make_model(), make_model()
    oa, ob = base(ma.parameters(), lr=0.01), cls(mb.parameters(), lr=0.01)
    for batch in batches(4):
        for m, o in ((ma, oa), (mb, ob)):
            o.zero_grad()
            loss_fn(m, batch).backward()
        oa.step()
        ob.step(log_weights=torch.zeros(3))
        assert_bitwise(ma, mb, oa, ob)


def oracle_scale(log_w: torch.Tensor, base: float, power: float, floor: float) -> float:
    lw = log_w.double().tolist()
    m = max(lw)
    w = [math.exp(v - m) for v in lw]
    rho = sum(w) ** 2 / sum(v * v for v in w) / len(w)
    return max(floor, min(1.0, rho / base) ** power)


@pytest.mark.parametrize(
    ("cls", "base", "power", "kwargs"),
    [
        (VCPOAdamW, torch.optim.AdamW, 0.5, {}),
        (VCPOAdamW, torch.optim.AdamW, 0.5, {"base_ess_ratio": 0.3, "min_lr_scale": 0.2}),
        (VCPOSGD, torch.optim.SGD, 1.0, {"momentum": 0.9}),
        (VCPOAdam, torch.optim.Adam, 0.5, {"weight_decay": 0.1}),
    ],
)
def test_random_weights_equal_manual_lr_scaling(
    cls: type[torch.optim.Optimizer],
    base: type[torch.optim.Optimizer],
    power: float,
    kwargs: dict[str, Any],
) -> None:
    base_kwargs = {k: v for k, v in kwargs.items() if k not in ("base_ess_ratio", "min_lr_scale")}
    ma, mb = make_model(), make_model()
    oa = base(param_groups(ma, 0.02), lr=0.02, **base_kwargs)
    ob = cls(param_groups(mb, 0.02), lr=0.02, **kwargs)
    g = torch.Generator().manual_seed(3)
    for batch in batches(6):
        log_w = torch.randn(16, generator=g) * 2.0
        scale = oracle_scale(
            log_w, kwargs.get("base_ess_ratio", 1.0), power, kwargs.get("min_lr_scale", 0.0)
        )
        for m, o in ((ma, oa), (mb, ob)):
            o.zero_grad()
            loss_fn(m, batch).backward()
        lrs = [grp["lr"] for grp in oa.param_groups]
        for grp, lr in zip(oa.param_groups, lrs):
            grp["lr"] = lr * scale
        oa.step()
        for grp, lr in zip(oa.param_groups, lrs):
            grp["lr"] = lr
        ob.step(log_weights=log_w)
        assert ob.last_stats is not None
        assert math.isclose(float(ob.last_stats.lr_scale), scale, rel_tol=1e-12)
        for p, q in zip(ma.parameters(), mb.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert [grp["lr"] for grp in ob.param_groups] == lrs


def test_last_stats_contents() -> None:
    model = make_model()
    opt = VCPOAdamW(param_groups(model, 0.1), lr=0.1)
    loss_fn(model, batches(1)[0]).backward()
    w = torch.tensor([4.0, 1.0, 1.0, 0.0])
    opt.step(importance_weights=w)
    stats = opt.last_stats
    assert stats is not None and stats.observed
    ref = effective_sample_size(w)
    assert float(stats.ess) == float(ref.ess)  # the same code path
    # exp(log(1) - log(4)) is within an ulp of 1/4, depending on the CPU's vector exp
    assert math.isclose(float(stats.ess), 36.0 / 18.0, rel_tol=1e-15)
    assert math.isclose(float(stats.ess_ratio), 0.5, rel_tol=1e-15) and int(stats.n) == 4
    assert math.isclose(float(stats.lr_scale), math.sqrt(0.5), rel_tol=1e-15)
    assert [float(x) for x in stats.lrs] == pytest.approx(
        [0.1 * math.sqrt(0.5), 0.05 * math.sqrt(0.5)], rel=1e-15
    )
    logged = stats.as_dict()
    assert logged["vcpo/ess_ratio"] == float(stats.ess_ratio) and "vcpo/lr_group1" in logged
    opt.step()
    assert not opt.last_stats.observed
    assert float(opt.last_stats.lr_scale) == 1.0 and math.isnan(float(opt.last_stats.ess))


def test_accumulated_observations_equal_one_concatenated_batch() -> None:
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, generator=g) * 3 for n in (3, 0, 7, 1)]
    masks = [torch.rand(p.shape, generator=g) > 0.2 for p in parts]
    model = make_model()
    opt = VCPOAdamW(model.parameters(), lr=0.1)
    for lw, mask in zip(parts, masks):
        opt.observe(log_weights=lw, mask=mask)
    opt.step()
    ref = effective_sample_size(log_weights=torch.cat(parts), mask=torch.cat(masks))
    assert int(opt.last_stats.n) == int(ref.n)
    assert math.isclose(float(opt.last_stats.ess), float(ref.ess), rel_tol=1e-13)
    # mixing weights and log weights across micro-batches is fine
    opt.observe(importance_weights=torch.tensor([1.0, 2.0]))
    opt.observe(log_weights=torch.tensor([math.log(3.0)], dtype=torch.float64))
    opt.step()
    assert math.isclose(float(opt.last_stats.ess), 36.0 / 14.0, rel_tol=1e-13)


def test_linear_rule_and_custom_power() -> None:
    w = torch.tensor([1.0, 0.0, 0.0, 0.0])  # rho = 1/4
    for cls, kwargs, expected in [
        (VCPOSGD, {}, 0.25),
        (ess_scaled(torch.optim.SGD, "sqrt"), {}, 0.5),
        (ess_scaled(torch.optim.AdamW, "linear"), {}, 0.25),
        (ess_scaled(torch.optim.AdamW, 2.0), {}, 0.0625),
        (VCPOAdamW, {"ess_power": 1.0}, 0.25),
        (VCPOAdamW, {"min_lr_scale": 0.7}, 0.7),
        (VCPOAdamW, {"base_ess_ratio": 0.25}, 1.0),
        (VCPOAdamW, {"base_ess_ratio": 0.5}, math.sqrt(0.5)),
    ]:
        model = make_model()
        opt = cls(model.parameters(), lr=0.1, **kwargs)
        opt.step(importance_weights=w)
        assert math.isclose(float(opt.last_stats.lr_scale), expected, rel_tol=1e-15), (cls, kwargs)


def test_lr_unchanged_after_step_float_and_tensor() -> None:
    for lr in (0.05, torch.tensor(0.05)):
        model = make_model()
        opt = VCPOAdamW(model.parameters(), lr=lr, fused=isinstance(lr, torch.Tensor))
        before = opt.param_groups[0]["lr"]
        loss_fn(model, batches(1)[0]).backward()
        opt.step(importance_weights=torch.tensor([5.0, 0.1, 0.1]))
        after = opt.param_groups[0]["lr"]
        assert after is before
        if isinstance(lr, torch.Tensor):
            assert torch.equal(after, torch.tensor(0.05))


def test_lr_and_weight_decay_restored_when_base_step_raises() -> None:
    emb = nn.Embedding(10, 4, sparse=True)
    opt = VCPOAdamW(emb.parameters(), lr=0.05, weight_decay=0.1, scale_weight_decay=False)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(importance_weights=torch.tensor([9.0, 1.0, 1.0]))
    assert opt.param_groups[0]["lr"] == 0.05
    assert opt.param_groups[0]["weight_decay"] == 0.1


def test_scale_weight_decay_false_keeps_lr_times_decay() -> None:
    # With zero gradients AdamW's update is the pure decay p *= 1 - lr*wd.
    p_scaled = nn.Parameter(torch.ones(3))
    p_kept = nn.Parameter(torch.ones(3))
    o1 = VCPOAdamW([p_scaled], lr=0.1, weight_decay=0.5)
    o2 = VCPOAdamW([p_kept], lr=0.1, weight_decay=0.5, scale_weight_decay=False)
    w = torch.tensor([1.0, 0.0, 0.0, 0.0])  # scale 1/2
    for p, o in ((p_scaled, o1), (p_kept, o2)):
        p.grad = torch.zeros(3)
        o.step(importance_weights=w)
    torch.testing.assert_close(p_scaled.detach(), torch.full((3,), 1 - 0.05 * 0.5))
    torch.testing.assert_close(p_kept.detach(), torch.full((3,), 1 - 0.1 * 0.5))
    assert o2.param_groups[0]["weight_decay"] == 0.5


SCHEDULERS: list[tuple[str, Callable[[torch.optim.Optimizer], Any]]] = [
    ("LambdaLR", lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s))),
    ("StepLR", lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)),
    ("CosineAnnealingLR", lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5)),
    ("OneCycleLR", lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=12)),
]


@pytest.mark.parametrize(("name", "make_sched"), SCHEDULERS, ids=[s[0] for s in SCHEDULERS])
def test_schedulers_see_the_unscaled_lr(
    name: str, make_sched: Callable[[torch.optim.Optimizer], Any]
) -> None:
    ma, mb = make_model(), make_model()
    oa = torch.optim.AdamW(ma.parameters(), lr=0.05)
    ob = VCPOAdamW(mb.parameters(), lr=0.05)
    sa, sb = make_sched(oa), make_sched(ob)
    g = torch.Generator().manual_seed(0)
    for batch in batches(10):
        for m, o in ((ma, oa), (mb, ob)):
            o.zero_grad()
            loss_fn(m, batch).backward()
        oa.step()
        ob.step(log_weights=torch.randn(8, generator=g) * 4)
        sa.step()
        sb.step()
        assert [grp["lr"] for grp in oa.param_groups] == [grp["lr"] for grp in ob.param_groups]
        assert sa.get_last_lr() == sb.get_last_lr()
        if name == "OneCycleLR":
            assert oa.param_groups[0]["betas"] == ob.param_groups[0]["betas"]


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_skipped_step_does_not_leak_weights(fused: bool) -> None:
    ma, mb = make_model(), make_model()
    oa = torch.optim.AdamW(ma.parameters(), lr=0.05, fused=fused)
    ob = VCPOAdamW(mb.parameters(), lr=0.05, fused=fused)
    sa, sb = (
        torch.amp.GradScaler("cpu", init_scale=2.0**4),
        torch.amp.GradScaler("cpu", init_scale=2.0**4),
    )
    data = batches(4)
    for i, batch in enumerate(data):
        for m, o, s in ((ma, oa, sa), (mb, ob, sb)):
            o.zero_grad()
            loss = loss_fn(m, batch)
            if i == 1:
                loss = loss * float("inf")  # an overflowing step: GradScaler skips it
            s.scale(loss).backward()
        before = [p.detach().clone() for p in mb.parameters()]
        # the skipped step carries extreme weights; they must not reach step 2
        ob.observe(log_weights=torch.tensor([50.0, 0.0, 0.0]) if i == 1 else torch.zeros(3))
        sa.step(oa)
        sb.step(ob)
        sa.update()
        sb.update()
        if i == 1:
            assert all(torch.equal(p, q) for p, q in zip(before, mb.parameters()))
        assert_bitwise(ma, mb, oa, ob)
        assert sa.get_scale() == sb.get_scale()


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[list[torch.Tensor], list, dict]:
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    return [p.detach().clone() for p in model.parameters()], grads, copy.deepcopy(opt.state_dict())


def assert_unchanged(model: nn.Module, opt: torch.optim.Optimizer, snap: tuple) -> None:
    params, grads, state = snap
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters()))
    for g, p in zip(grads, model.parameters()):
        assert (g is None and p.grad is None) or torch.equal(g, p.grad)
    now = opt.state_dict()
    assert now["param_groups"] == state["param_groups"]
    for k, v in state["state"].items():
        for key, t in v.items():
            assert torch.equal(t, now["state"][k][key])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"importance_weights": torch.tensor([1.0, float("nan")])}, "1 NaN"),
        ({"importance_weights": torch.tensor([1.0, float("inf"), 2.0])}, "1 infinite"),
        ({"importance_weights": torch.tensor([1.0, -1.0])}, "1 negative"),
        ({"log_weights": torch.tensor([float("-inf"), 0.0])}, "1 infinite"),
        ({"importance_weights": torch.tensor([])}, "empty batch"),
        ({"importance_weights": torch.zeros(4)}, "are zero"),
    ],
)
def test_bad_weights_leave_everything_unchanged(kwargs: dict[str, Any], message: str) -> None:
    model = make_model()
    opt = VCPOAdamW(model.parameters(), lr=0.05)
    for batch in batches(2):  # build some optimizer state first
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step(importance_weights=torch.ones(3))
    loss_fn(model, batches(1, seed=9)[0]).backward()
    snap = snapshot(model, opt)
    last = opt.last_stats
    with pytest.raises(ValueError, match=message):
        opt.step(**kwargs)
    assert_unchanged(model, opt, snap)
    assert opt.last_stats is last
    # the optimizer is still usable and the bad batch left nothing behind
    opt.zero_grad()
    loss_fn(model, batches(1)[0]).backward()
    opt.step(importance_weights=torch.ones(2))
    assert float(opt.last_stats.ess) == 2.0


def test_bad_mask_shape_raises_before_anything_changes() -> None:
    model = make_model()
    opt = VCPOAdamW(model.parameters())
    loss_fn(model, batches(1)[0]).backward()
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match="mask has shape"):
        opt.observe(torch.ones(3), mask=torch.ones(2, dtype=torch.bool))
    opt.step()  # nothing was observed
    assert not opt.last_stats.observed
    assert not all(torch.equal(p, q) for p, q in zip(snap[0], model.parameters()))


def test_step_takes_a_mask() -> None:
    opt = VCPOAdamW(make_model().parameters())
    opt.step(
        importance_weights=torch.tensor([1.0, 9.0, 0.0, 0.0]),
        mask=torch.tensor([True, False, True, True]),
    )
    assert int(opt.last_stats.n) == 3 and float(opt.last_stats.ess) == 1.0
    with pytest.raises(ValueError, match="mask but no"):
        opt.step(mask=torch.ones(2, dtype=torch.bool))


def test_zero_grad_starts_a_new_window() -> None:
    model = make_model()
    opt = VCPOAdamW(model.parameters())
    opt.observe(importance_weights=torch.tensor([1.0, 0.0]))
    opt.zero_grad()
    opt.observe(importance_weights=torch.ones(5))
    opt.step()
    assert int(opt.last_stats.n) == 5 and float(opt.last_stats.ess_ratio) == 1.0


def test_closure_is_called_once_and_may_observe() -> None:
    model = make_model()
    opt = VCPOAdamW(model.parameters())
    calls = []

    def closure() -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = loss_fn(model, batches(1)[0])
        loss.backward()
        opt.observe(importance_weights=torch.tensor([1.0, 0.0, 0.0, 0.0]))
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and calls == [True]
    assert math.isclose(float(opt.last_stats.lr_scale), 0.5, rel_tol=1e-15)


def test_state_dict_round_trip_and_bitwise_resume() -> None:
    g = torch.Generator().manual_seed(5)
    log_ws = [torch.randn(6, generator=g) * 2 for _ in range(8)]
    data = batches(8)

    def run(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
        for i in steps:
            opt.zero_grad()
            loss_fn(model, data[i]).backward()
            opt.step(log_weights=log_ws[i])

    ma = make_model()
    oa = VCPOAdamW(param_groups(ma, 0.03, base_ess_ratio=0.5), lr=0.03, amsgrad=True)
    run(ma, oa, range(8))

    mb = make_model()
    ob = VCPOAdamW(param_groups(mb, 0.03, base_ess_ratio=0.5), lr=0.03, amsgrad=True)
    run(mb, ob, range(4))
    saved = copy.deepcopy((mb.state_dict(), ob.state_dict()))
    assert saved[1]["param_groups"][0]["base_ess_ratio"] == 0.5
    mc = make_model(seed=99)
    mc.load_state_dict(saved[0])
    oc = VCPOAdamW(param_groups(mc, 0.03), lr=0.03, amsgrad=True)
    oc.load_state_dict(saved[1])
    assert oc.param_groups[0]["base_ess_ratio"] == 0.5
    run(mc, oc, range(4, 8))
    assert_bitwise(ma, mc, oa, oc)


def test_adamw_state_dict_loads_into_vcpo_and_back() -> None:
    ma = make_model()
    oa = torch.optim.AdamW(ma.parameters(), lr=0.02)
    for batch in batches(3):
        oa.zero_grad()
        loss_fn(ma, batch).backward()
        oa.step()
    ob = VCPOAdamW(ma.parameters(), lr=0.02, min_lr_scale=0.1)
    ob.load_state_dict(oa.state_dict())
    assert ob.param_groups[0]["min_lr_scale"] == 0.1  # filled from defaults
    assert ob.param_groups[0]["ess_power"] == 0.5
    oc = torch.optim.AdamW(ma.parameters(), lr=0.02)
    oc.load_state_dict(ob.state_dict())
    for k, v in oa.state_dict()["state"].items():
        for key, t in v.items():
            assert torch.equal(t, oc.state_dict()["state"][k][key])


def test_deepcopy_and_pickle_keep_stats_and_trajectory() -> None:
    model = make_model()
    opt = VCPOAdamW(model.parameters(), lr=0.05)
    loss_fn(model, batches(1)[0]).backward()
    opt.step(importance_weights=torch.tensor([3.0, 1.0, 1.0]))
    pair = copy.deepcopy((model, opt))
    for _m, o2 in (pair, pickle.loads(pickle.dumps((model, opt)))):
        assert type(o2) is VCPOAdamW
        assert float(o2.last_stats.ess) == float(opt.last_stats.ess)
        assert o2.param_groups[0]["base_ess_ratio"] == 1.0
    m2, o2 = pair
    for m, o in ((model, opt), (m2, o2)):
        o.zero_grad()
        loss_fn(m, batches(2)[1]).backward()
        o.step(importance_weights=torch.tensor([2.0, 1.0]))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), m2.parameters()))
    # classes made by ess_scaled() pickle too
    radam = ess_scaled(torch.optim.RAdam)(make_model().parameters())
    assert type(pickle.loads(pickle.dumps(radam))) is type(radam)


def test_step_hooks_fire_exactly_once() -> None:
    torch.optim.AdamW(make_model().parameters())  # a plain AdamW patches AdamW.step
    model = make_model()
    opt = VCPOAdamW(model.parameters())
    seen: list[str] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    handle = register_optimizer_step_pre_hook(lambda o, a, k: seen.append("global"))
    try:
        loss_fn(model, batches(1)[0]).backward()
        opt.step(importance_weights=torch.ones(2))
    finally:
        handle.remove()
    assert seen == ["global", "pre", "post"]


@contextmanager
def forbid_host_sync() -> Iterator[None]:
    """Make every Tensor -> Python conversion raise (the CPU stand-in for a CUDA sync check)."""
    names = ["item", "tolist", "__bool__", "__float__", "__int__", "__index__"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def boom(self: torch.Tensor, *a: Any, **k: Any) -> Any:
        raise AssertionError("host sync inside step()")

    try:
        for n in names:
            setattr(torch.Tensor, n, boom)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize(
    "config",
    [
        {"fused": True},
        pytest.param({"capturable": True, "foreach": True}, marks=NEEDS_CUDA),
        pytest.param({"capturable": True, "foreach": False}, marks=NEEDS_CUDA),
    ],
    ids=str,
)
def test_no_host_sync_in_step_with_tensor_lr(config: dict[str, Any]) -> None:
    device = DEVICE if config.get("capturable") else torch.device("cpu")
    model = make_model().to(device)
    opt = VCPOAdamW(model.parameters(), lr=torch.tensor(0.01, device=device), **config)
    loss_fn(model, tuple(t.to(device) for t in batches(1)[0])).backward()
    lw = torch.tensor([0.0, 2.0, -1.0], device=device)
    opt.observe(log_weights=lw)  # validation syncs here
    before = [p.detach().clone() for p in model.parameters()]
    with forbid_host_sync():
        opt.step()
    assert not all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    expected = float(torch.tensor(0.01)) * oracle_scale(lw.cpu(), 1.0, 0.5, 0.0)  # ~0.0057
    assert math.isclose(opt.last_stats.lrs[0].item(), expected, rel_tol=1e-6)


def test_config_validation() -> None:
    params = make_model().parameters
    with pytest.raises(ValueError, match="base_ess_ratio"):
        VCPOAdamW(params(), base_ess_ratio=0.0)
    with pytest.raises(ValueError, match="min_lr_scale"):
        VCPOAdamW(params(), min_lr_scale=1.5)
    with pytest.raises(ValueError, match="power"):
        VCPOAdamW(params(), ess_power=-1.0)
    with pytest.raises(ValueError, match="rule"):
        ess_scaled(torch.optim.AdamW, "cubic")
    with pytest.raises(TypeError):
        ess_scaled(nn.Linear)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="already"):
        ess_scaled(VCPOAdamW)
    with pytest.raises(TypeError, match="LBFGS"):
        ess_scaled(torch.optim.LBFGS)
    with pytest.raises(ValueError, match="base_ess_ratio"):
        VCPOAdamW([{"params": list(params()), "base_ess_ratio": 2.0}])


def test_group_rule_names_and_added_groups_are_validated() -> None:
    model = make_model()
    params = list(model.parameters())
    w = torch.tensor([1.0, 0.0])  # ESS ratio 1/2
    opt = VCPOAdamW(
        [{"params": params[:1], "ess_power": "linear"}, {"params": params[1:2]}], lr=0.1
    )
    loss_fn(model, batches(1)[0]).backward()
    opt.step(importance_weights=w)
    # torch's pow(0.5, 0.5) and math.sqrt(0.5) may differ in the last bit (CPU vector paths)
    got = [float(s) for s in opt.last_stats.lr_scales]
    assert got == pytest.approx([0.5, math.sqrt(0.5)], rel=1e-15, abs=0)
    opt.add_param_group({"params": params[2:3], "ess_power": "linear"})
    opt.step(importance_weights=w)
    assert math.isclose(float(opt.last_stats.lr_scales[2]), 0.5, rel_tol=1e-15)
    with pytest.raises(ValueError, match="min_lr_scale"):
        opt.add_param_group({"params": params[3:4], "min_lr_scale": 2.0})
    with pytest.raises(ValueError, match="power"):
        opt.add_param_group({"params": params[3:4], "ess_power": -1.0})
    assert len(opt.param_groups) == 3


def test_optimizer_without_lr_refused_at_construction() -> None:
    class NoLR(torch.optim.Optimizer):
        def __init__(self, params: Any) -> None:
            super().__init__(params, {"momentum": 0.9})

        def step(self, closure: Any = None) -> None:  # pragma: no cover - never reached
            return None

    with pytest.raises(TypeError, match="no 'lr'"):
        ess_scaled(NoLR, assume_lr_linear=True)(make_model().parameters())


def test_per_group_configuration() -> None:
    model = make_model()
    groups = param_groups(model, 0.1)
    groups[1]["base_ess_ratio"] = 0.25
    opt = VCPOAdamW(groups, lr=0.1)
    opt.step(importance_weights=torch.tensor([1.0, 0.0, 0.0, 0.0]))
    got = [float(s) for s in opt.last_stats.lr_scales]
    assert got == pytest.approx([0.5, 1.0], rel=1e-15, abs=0)  # pow(0.25, 0.5): CPU-dependent ulp


def test_apex_fused_adam_if_available() -> None:
    apex_optimizers = pytest.importorskip(
        "apex.optimizers", reason="NVIDIA apex is not installed (not on PyPI)"
    )
    if not torch.cuda.is_available():
        pytest.skip("apex FusedAdam needs CUDA")
    cls = ess_scaled(apex_optimizers.FusedAdam, assume_lr_linear=True)
    model = make_model().cuda()
    opt = cls(model.parameters(), lr=0.01)
    loss_fn(model, tuple(t.cuda() for t in batches(1)[0])).backward()
    opt.step(importance_weights=torch.ones(3, device="cuda"))
    assert float(opt.last_stats.lr_scale) == 1.0


# --------------------------------------------------------------------------------------------
# Closures (issue 8, item 1): the step's weights count whatever the closure's zero_grad() does.


def scaled_reference_step(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], lr: float, scale: float
) -> nn.Module:
    """The oracle: plain AdamW, one step at lr * scale."""
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(ref.parameters(), lr=lr * scale)
    loss_fn(ref, batch).backward()
    opt.step()
    return ref


@pytest.mark.parametrize("how", ["step_kwargs", "observe_before", "observed_in_closure"])
def test_closure_zero_grad_keeps_the_steps_weights(how: str) -> None:
    lw = torch.tensor([3.0, 0.0, -1.0, 0.5])
    scale = oracle_scale(lw, 1.0, 0.5, 0.0)
    model, batch = make_model(), batches(1)[0]
    ref = scaled_reference_step(model, batch, 0.05, scale)
    opt = VCPOAdamW(model.parameters(), lr=0.05)

    def closure() -> torch.Tensor:
        opt.zero_grad()  # the canonical torch.optim closure
        loss = loss_fn(model, batch)
        loss.backward()
        if how == "observed_in_closure":
            opt.observe(log_weights=lw)
        return loss

    if how == "step_kwargs":
        opt.step(closure, log_weights=lw)
    else:
        if how == "observe_before":
            opt.observe(log_weights=lw)
        opt.step(closure)
    stats = opt.last_stats
    assert stats is not None and stats.observed and int(stats.n) == 4
    assert math.isclose(float(stats.lr_scale), scale, rel_tol=1e-12)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)
    # the window closed with the step: the next one starts empty
    opt.step(closure)
    assert opt.last_stats.observed == (how == "observed_in_closure")


def test_zero_grad_outside_step_still_starts_a_new_window() -> None:
    model = make_model()
    opt = VCPOAdamW(model.parameters())
    opt.observe(log_weights=torch.tensor([50.0, 0.0]))  # e.g. a step GradScaler skipped
    opt.zero_grad()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(model, batches(1)[0])
        loss.backward()
        return loss

    opt.step(closure, importance_weights=torch.ones(3))
    assert int(opt.last_stats.n) == 3 and float(opt.last_stats.lr_scale) == 1.0


def test_a_step_that_raises_leaves_the_window_as_before() -> None:
    model = make_model()
    opt = VCPOAdamW(model.parameters(), lr=0.05)
    opt.observe(importance_weights=torch.ones(2))  # observed before: kept

    def failing_closure() -> torch.Tensor:
        opt.zero_grad()
        raise RuntimeError("data loader failed")

    with pytest.raises(RuntimeError, match="data loader"):
        opt.step(failing_closure, log_weights=torch.tensor([40.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="NaN"):
        opt.step(importance_weights=torch.tensor([float("nan")]))
    loss_fn(model, batches(1)[0]).backward()
    opt.step()
    # neither failing call left its weights behind
    assert int(opt.last_stats.n) == 2 and float(opt.last_stats.lr_scale) == 1.0
    # a window that is all zeros raises and keeps the observe()d part, drops the call's part
    opt.observe(importance_weights=torch.zeros(3))
    with pytest.raises(ValueError, match="are zero"):
        opt.step(importance_weights=torch.zeros(4))
    opt.step(importance_weights=torch.ones(1))
    assert int(opt.last_stats.n) == 4


# --------------------------------------------------------------------------------------------
# GradScaler and model.zero_grad() (issue 8, item 10c): the documented contract.


def overflowing_step(
    model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, **step_kwargs: Any
) -> None:
    loss = loss_fn(model, batches(1)[0]) * float("inf")
    scaler.scale(loss).backward()
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt, **step_kwargs)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))  # skipped


def test_weights_passed_through_scaler_step_never_reach_a_skipped_step() -> None:
    model = make_model()
    opt = VCPOAdamW(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    overflowing_step(model, opt, scaler, log_weights=torch.tensor([50.0, 0.0, 0.0]))
    model.zero_grad()  # not opt.zero_grad(): nothing was observed, so nothing leaks
    scaler.scale(loss_fn(model, batches(2)[1])).backward()
    scaler.step(opt, log_weights=torch.zeros(5))
    assert int(opt.last_stats.n) == 5 and float(opt.last_stats.lr_scale) == 1.0


def test_observe_then_skipped_step_then_model_zero_grad_keeps_the_weights() -> None:
    # The documented limit: model.zero_grad() does not know the optimizer's window.
    model = make_model()
    opt = VCPOAdamW(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    opt.observe(log_weights=torch.tensor([50.0, 0.0, 0.0]))
    overflowing_step(model, opt, scaler)
    model.zero_grad()
    opt.observe(log_weights=torch.zeros(5))
    scaler.scale(loss_fn(model, batches(2)[1])).backward()
    scaler.step(opt)
    scaler.update()
    assert int(opt.last_stats.n) == 8  # the skipped batch's 3 weights counted
    # the documented remedy: opt.zero_grad() between the steps
    opt.observe(log_weights=torch.tensor([50.0, 0.0, 0.0]))
    overflowing_step(model, opt, scaler)
    opt.zero_grad()
    opt.observe(log_weights=torch.zeros(5))
    scaler.scale(loss_fn(model, batches(2)[1])).backward()
    scaler.step(opt)
    assert int(opt.last_stats.n) == 5


# --------------------------------------------------------------------------------------------
# Weight decay with scale_weight_decay=False (issue 8, item 6).

COUPLED_DECAY = [
    (VCPOSGD, {"momentum": 0.9}),
    (VCPOAdam, {}),
    (ess_scaled(torch.optim.Adam), {"decoupled_weight_decay": False}),
    (ess_scaled(torch.optim.RAdam), {}),
    (ess_scaled(torch.optim.NAdam), {}),
    (ess_scaled(torch.optim.RMSprop), {"momentum": 0.5}),
    (ess_scaled(torch.optim.Adagrad), {}),
    (ess_scaled(torch.optim.Adadelta), {}),
    (ess_scaled(torch.optim.Adamax), {}),
]


def snapshot_params_and_state(params: list[nn.Parameter], opt: torch.optim.Optimizer) -> tuple:
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()["state"])


def assert_same_params_and_state(
    params: list[nn.Parameter], opt: torch.optim.Optimizer, snap: tuple
) -> None:
    assert all(torch.equal(p, q) for p, q in zip(snap[0], params))
    state = opt.state_dict()["state"]
    assert state.keys() == snap[1].keys()
    for k, v in snap[1].items():
        assert all(torch.equal(t, state[k][key]) for key, t in v.items())


@pytest.mark.parametrize(("cls", "kwargs"), COUPLED_DECAY, ids=lambda c: getattr(c, "__name__", ""))
def test_coupled_weight_decay_refuses_scale_weight_decay_false(
    cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]
) -> None:
    params = list(make_model().parameters())
    with pytest.raises(ValueError, match="coupled"):
        cls(params, lr=0.01, weight_decay=0.1, scale_weight_decay=False, **kwargs)
    with pytest.raises(ValueError, match="coupled"):
        cls(params, lr=0.01, weight_decay=torch.tensor(0.0), scale_weight_decay=False, **kwargs)
    # the same group with the decay scaled through the lr, or without decay, is fine
    cls(params, lr=0.01, weight_decay=0.1, **kwargs)
    opt = cls(params[:2], lr=0.01, weight_decay=0.0, scale_weight_decay=False, **kwargs)
    # add_param_group validates before adding
    with pytest.raises(ValueError, match="coupled"):
        opt.add_param_group({"params": params[2:3], "weight_decay": 0.1})
    assert len(opt.param_groups) == 1
    # load_state_dict validates before loading
    other = cls(params[:2], lr=0.01, weight_decay=0.1, **kwargs)
    saved = other.state_dict()
    saved["param_groups"][0]["scale_weight_decay"] = False
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="coupled"):
        opt.load_state_dict(saved)
    assert opt.state_dict()["param_groups"] == before["param_groups"]
    # a group edited in place is refused at the next step, before anything changes
    opt.param_groups[0]["weight_decay"] = 0.1
    for p in params[:2]:
        p.grad = torch.ones_like(p)
    snap = snapshot_params_and_state(params[:2], opt)
    with pytest.raises(ValueError, match="coupled"):
        opt.step(importance_weights=torch.tensor([1.0, 0.0]))
    assert_same_params_and_state(params[:2], opt, snap)
    opt.param_groups[0]["weight_decay"] = 0.0
    opt.step(importance_weights=torch.ones(3))  # the rejected weights were not kept
    assert int(opt.last_stats.n) == 3


DECOUPLED_DECAY = [
    (VCPOAdamW, torch.optim.AdamW, {}),
    (VCPOAdamW, torch.optim.AdamW, {"foreach": True, "amsgrad": True}),
    (VCPOAdamW, torch.optim.AdamW, {"fused": True}),
    (VCPOAdam, torch.optim.Adam, {"decoupled_weight_decay": True}),
    (ess_scaled(torch.optim.RAdam), torch.optim.RAdam, {"decoupled_weight_decay": True}),
    (ess_scaled(torch.optim.NAdam), torch.optim.NAdam, {"decoupled_weight_decay": True}),
]
if hasattr(torch.optim, "Muon"):
    DECOUPLED_DECAY.append((ess_scaled(torch.optim.Muon), torch.optim.Muon, {}))


@pytest.mark.parametrize(
    ("cls", "base", "kwargs"), DECOUPLED_DECAY, ids=lambda c: getattr(c, "__name__", str(c))
)
def test_decoupled_decay_keeps_lr_times_decay_and_a_clean_state(
    cls: type[torch.optim.Optimizer], base: type[torch.optim.Optimizer], kwargs: dict[str, Any]
) -> None:
    # Fixed gradients: the state of a decoupled-decay optimizer depends on them only, so after
    # steps at any lr scale it must equal the state of the plain optimizer at the plain lr.
    torch.manual_seed(0)
    init = [torch.randn(4, 3), torch.randn(3, 4)]
    grads = [[torch.randn_like(t) for t in init] for _ in range(4)]
    lr, wd = 0.02, 0.3
    ours = [nn.Parameter(t.clone()) for t in init]
    plain = [nn.Parameter(t.clone()) for t in init]
    oracle = [nn.Parameter(t.clone()) for t in init]
    o_ours = cls(ours, lr=lr, weight_decay=wd, scale_weight_decay=False, **kwargs)
    o_plain = base(plain, lr=lr, weight_decay=wd, **kwargs)
    o_oracle = base(oracle, lr=lr, weight_decay=wd, **kwargs)
    g = torch.Generator().manual_seed(1)
    for step_grads in grads:
        lw = torch.randn(8, generator=g) * 2
        scale = oracle_scale(lw, 1.0, 0.5, 0.0)
        for ps in (ours, plain, oracle):
            for p, grad in zip(ps, step_grads):
                p.grad = grad.clone()
        o_ours.step(log_weights=lw)
        o_plain.step()
        # the oracle: the update at lr * scale, the decay at lr * wd
        o_oracle.param_groups[0]["lr"] = lr * scale
        o_oracle.param_groups[0]["weight_decay"] = wd / scale
        o_oracle.step()
        o_oracle.param_groups[0].update(lr=lr, weight_decay=wd)
        for p, q in zip(ours, oracle):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        for p, q in zip(ours, plain):
            for key, v in o_plain.state[q].items():
                torch.testing.assert_close(o_ours.state[p][key], v, rtol=0, atol=0)
    assert o_ours.param_groups[0]["weight_decay"] == wd and o_ours.param_groups[0]["lr"] == lr


@pytest.mark.parametrize("tensor_decay", [False, True])
def test_scale_weight_decay_false_compensates_float_and_tensor_decay(tensor_decay: bool) -> None:
    # Zero gradients: AdamW's update is the pure decay p *= 1 - lr_eff * wd_eff.
    wd: Any = torch.tensor(0.5) if tensor_decay else 0.5
    p = nn.Parameter(torch.ones(3))
    opt = VCPOAdamW([p], lr=0.1, weight_decay=wd, scale_weight_decay=False)
    p.grad = torch.zeros(3)
    opt.step(importance_weights=torch.tensor([1.0, 0.0, 0.0, 0.0]))  # scale 1/2
    torch.testing.assert_close(p.detach(), torch.full((3,), 1 - 0.1 * 0.5))
    assert opt.param_groups[0]["weight_decay"] is wd


# --------------------------------------------------------------------------------------------
# Which optimizers ess_scaled() supports (issue 8, item 7).


def dense_params() -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [
        nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64)),
        nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64)),
    ]


def matrix_params() -> list[nn.Parameter]:
    return dense_params()  # Muon takes 2-D parameters only


def sparse_params() -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(10, 3, generator=g, dtype=torch.float64))]


def set_grads(params: list[nn.Parameter], seed: int, sparse: bool = False) -> None:
    """Gradients that depend on the parameters (so diverging trajectories show)."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        dense = torch.sin(3 * p.detach()) + 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype)
        if sparse:
            rows = torch.tensor([[1, 4, 7]])
            p.grad = torch.sparse_coo_tensor(rows, dense[rows[0]], p.shape, check_invariants=True)
        else:
            p.grad = dense


# (class, constructor kwargs, parameter factory, sparse gradients)
LR_LINEAR_CASES: list[tuple[type[torch.optim.Optimizer], dict[str, Any], Callable, bool]] = [
    (
        torch.optim.SGD,
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
        dense_params,
        False,
    ),
    (torch.optim.SGD, {"momentum": 0.5, "dampening": 0.2, "foreach": True}, dense_params, False),
    (torch.optim.Adam, {"weight_decay": 0.1, "amsgrad": True}, dense_params, False),
    (torch.optim.Adam, {"weight_decay": 0.1, "decoupled_weight_decay": True}, dense_params, False),
    (torch.optim.AdamW, {"weight_decay": 0.1, "foreach": True}, dense_params, False),
    (torch.optim.RAdam, {"weight_decay": 0.1}, dense_params, False),
    (torch.optim.RAdam, {"weight_decay": 0.1, "decoupled_weight_decay": True}, dense_params, False),
    (torch.optim.NAdam, {"weight_decay": 0.1, "momentum_decay": 0.01}, dense_params, False),
    (torch.optim.Adamax, {"weight_decay": 0.1}, dense_params, False),
    (torch.optim.Adagrad, {"weight_decay": 0.1, "lr_decay": 0.05}, dense_params, False),
    (torch.optim.Adadelta, {"weight_decay": 0.1}, dense_params, False),
    (
        torch.optim.RMSprop,
        {"weight_decay": 0.1, "momentum": 0.5, "centered": True},
        dense_params,
        False,
    ),
    (torch.optim.SparseAdam, {}, sparse_params, True),
]
if hasattr(torch.optim, "Muon"):
    LR_LINEAR_CASES.append((torch.optim.Muon, {"weight_decay": 0.1}, matrix_params, False))

NOT_LR_LINEAR_CASES: list[tuple[type[torch.optim.Optimizer], dict[str, Any]]] = [
    (torch.optim.Rprop, {}),
    (torch.optim.ASGD, {"lambd": 0.5}),
]
if hasattr(torch.optim, "Adafactor"):
    NOT_LR_LINEAR_CASES.append((torch.optim.Adafactor, {}))


def lr_linearity_gap(
    cls: type[torch.optim.Optimizer],
    kwargs: dict[str, Any],
    make_params: Callable[[], list[nn.Parameter]],
    sparse: bool,
    lr: float = 1.0,
    s: float = 0.3,
) -> tuple[float, bool]:
    """From one state (after 2 steps), step at lr and at lr * s.

    Returns the relative gap max|d_s - s d_1| / max|s d_1| between the displacements, and
    whether the optimizer states after the two steps are identical.
    """
    params = make_params()
    opt = cls(params, lr=lr, **kwargs)
    for seed in range(2):
        set_grads(params, seed, sparse)
        opt.step()
    outs = []
    for factor in (1.0, s):
        ps, o = copy.deepcopy((params, opt))
        set_grads(ps, 7, sparse)
        for group in o.param_groups:
            group["lr"] = lr * factor
        o.step()
        outs.append(([(p - q).detach() for p, q in zip(ps, params)], o.state_dict()["state"]))
    (d1, state1), (ds, state_s) = outs
    gap = max(float((a - s * b).abs().max()) for a, b in zip(ds, d1))
    size = max(float((s * b).abs().max()) for b in d1)
    same_state = all(
        torch.equal(v, state_s[k][key]) if isinstance(v, torch.Tensor) else v == state_s[k][key]
        for k in state1
        for key, v in state1[k].items()
    )
    return gap / size, same_state


@pytest.mark.parametrize(
    ("cls", "kwargs", "make_params", "sparse"),
    LR_LINEAR_CASES,
    ids=lambda c: getattr(c, "__name__", None) if isinstance(c, type) else None,
)
def test_supported_optimizers_update_in_proportion_to_lr(
    cls: type[torch.optim.Optimizer], kwargs: dict[str, Any], make_params: Callable, sparse: bool
) -> None:
    gap, same_state = lr_linearity_gap(cls, kwargs, make_params, sparse)
    assert gap < 1e-9 and same_state  # float64: only rounding separates d_s from s * d_1


@pytest.mark.parametrize(
    ("cls", "kwargs"), NOT_LR_LINEAR_CASES, ids=lambda c: getattr(c, "__name__", None)
)
def test_refused_optimizers_do_not_update_in_proportion_to_lr(
    cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]
) -> None:
    gap, same_state = lr_linearity_gap(cls, kwargs, dense_params, False)
    assert gap > 1e-2 or not same_state
    with pytest.raises(TypeError, match=f"ess_scaled\\({cls.__name__}\\) is refused"):
        ess_scaled(cls)
    with pytest.raises(TypeError, match="is refused"):
        ess_scaled(cls, assume_lr_linear=True)

    class Sub(cls):  # type: ignore[misc, valid-type]
        pass

    with pytest.raises(TypeError, match="is refused"):
        ess_scaled(Sub, assume_lr_linear=True)


@pytest.mark.parametrize(
    ("cls", "kwargs", "make_params", "sparse"),
    LR_LINEAR_CASES,
    ids=lambda c: getattr(c, "__name__", None) if isinstance(c, type) else None,
)
def test_ess_scaled_step_is_the_base_step_at_the_scaled_lr(
    cls: type[torch.optim.Optimizer], kwargs: dict[str, Any], make_params: Callable, sparse: bool
) -> None:
    ours, theirs = make_params(), make_params()
    lr = 0.05
    o_ours = ess_scaled(cls)(ours, lr=lr, **kwargs)
    o_theirs = cls(theirs, lr=lr, **kwargs)
    g = torch.Generator().manual_seed(2)
    for step in range(4):
        lw = torch.randn(6, generator=g) * (0.0 if step == 0 else 2.0)
        scale = oracle_scale(lw, 1.0, 0.5, 0.0)
        set_grads(ours, step, sparse)
        set_grads(theirs, step, sparse)
        o_ours.step(log_weights=lw)
        o_theirs.param_groups[0]["lr"] = lr * scale
        o_theirs.step()
        o_theirs.param_groups[0]["lr"] = lr
        assert math.isclose(float(o_ours.last_stats.lr_scale), scale, rel_tol=1e-12)
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


class UserAdamW(torch.optim.AdamW):
    """A user's subclass: not verified, even though it changes nothing."""


def test_unknown_optimizers_need_assume_lr_linear() -> None:
    with pytest.raises(TypeError, match="assume_lr_linear=True"):
        ess_scaled(UserAdamW)
    cls = ess_scaled(UserAdamW, assume_lr_linear=True)
    assert ess_scaled(UserAdamW, assume_lr_linear=True) is cls  # cached
    with pytest.raises(TypeError, match="assume_lr_linear"):  # the cache does not skip the check
        ess_scaled(UserAdamW)
    model = make_model()
    opt = cls(model.parameters(), lr=0.1, weight_decay=0.0)
    opt.step(importance_weights=torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert math.isclose(float(opt.last_stats.lr_scale), 0.5, rel_tol=1e-15)
    assert type(pickle.loads(pickle.dumps(opt))) is cls
    # its decay kind is unknown: keeping lr * wd fixed is refused
    with pytest.raises(ValueError, match="not known"):
        cls(model.parameters(), weight_decay=0.1, scale_weight_decay=False)


# --------------------------------------------------------------------------------------------
# A tensor lr (fused / capturable, no host sync) is scaled like a float one.


@pytest.mark.parametrize(
    ("cls", "base", "kwargs"),
    [
        (VCPOAdamW, torch.optim.AdamW, {"fused": True}),
        (VCPOAdamW, torch.optim.AdamW, {"fused": True, "amsgrad": True, "weight_decay": 0.1}),
        (VCPOSGD, torch.optim.SGD, {"fused": True, "momentum": 0.9}),
    ],
    ids=["adamw", "adamw-amsgrad", "sgd"],
)
def test_tensor_lr_is_scaled(
    cls: type[torch.optim.Optimizer], base: type[torch.optim.Optimizer], kwargs: dict[str, Any]
) -> None:
    lr = torch.tensor(0.02)
    ma, mb = make_model(), make_model()
    oa = base(param_groups(ma, lr), lr=lr.clone(), **kwargs)
    ob = cls(param_groups(mb, lr), lr=lr.clone(), **kwargs)
    g = torch.Generator().manual_seed(4)
    for batch in batches(4):
        log_w = torch.randn(12, generator=g) * 2.0
        scale = oracle_scale(log_w, 1.0, 0.5 if cls is not VCPOSGD else 1.0, 0.0)
        for m, o in ((ma, oa), (mb, ob)):
            o.zero_grad()
            loss_fn(m, batch).backward()
        lrs = [grp["lr"] for grp in oa.param_groups]
        for grp, group_lr in zip(oa.param_groups, lrs):
            grp["lr"] = group_lr * scale
        oa.step()
        for grp, group_lr in zip(oa.param_groups, lrs):
            grp["lr"] = group_lr
        ob.step(log_weights=log_w)
        for got, group_lr in zip(ob.last_stats.lrs, lrs):
            assert math.isclose(float(got), float(group_lr) * scale, rel_tol=1e-6)
        for p, q in zip(ma.parameters(), mb.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert all(isinstance(grp["lr"], torch.Tensor) for grp in ob.param_groups)
        assert [float(grp["lr"]) for grp in ob.param_groups] == [float(x) for x in lrs]
