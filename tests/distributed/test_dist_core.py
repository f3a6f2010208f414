"""ESS and VCPOAdamW across 2 real gloo ranks: uneven and empty local batches, DDP, faults.

The module is also the worker script: pytest launches it once as a 2-process
job (one process group for every scenario below) and the tests compare each
rank's results with the single-process reference computed here.
"""

from __future__ import annotations

import math
import os

import _common as C
import pytest
import torch
from _harness import errors, launch, values, worker_main

WORLD = 2

# ---------------------------------------------------------------------------- worker side


def _rank() -> int:
    return int(os.environ["RANK"])


def _local_lw(seed: int, sizes: tuple[int, ...]) -> torch.Tensor:
    return C.local_slice(C.global_batch(seed, sizes), sizes, _rank())["lw"]


def s_ess_uneven():
    from vcpo_optim import effective_sample_size

    lw = _local_lw(1, (5, 2))
    r = effective_sample_size(log_weights=lw, process_group="world")
    return (r.ess, r.ratio, r.n)


def s_ess_explicit_group():
    import torch.distributed as dist

    from vcpo_optim import effective_sample_size

    group = dist.new_group([0, 1])
    w = _local_lw(2, (3, 6)).exp()
    r = effective_sample_size(w, process_group=group)
    return (r.ess, r.ratio, r.n)


def s_ess_empty_rank():
    from vcpo_optim import effective_sample_size

    lw = _local_lw(3, (4, 0))
    assert lw.numel() == (4 if _rank() == 0 else 0)
    r = effective_sample_size(log_weights=lw, process_group="world")
    return (r.ess, r.ratio, r.n)


def s_ess_masked_rank():
    from vcpo_optim import effective_sample_size

    lw = _local_lw(4, (3, 3))
    mask = torch.ones(3, dtype=torch.bool) if _rank() == 0 else torch.zeros(3, dtype=torch.bool)
    if _rank() == 1:
        lw = lw.clone()
        lw[0] = float("nan")  # masked out: never looked at
    r = effective_sample_size(log_weights=lw, mask=mask, process_group="world")
    return (r.ess, r.ratio, r.n)


def s_ess_huge_log_weights():
    from vcpo_optim import effective_sample_size

    lw = (
        torch.tensor([1000.0, 999.0], dtype=torch.float64)
        if _rank() == 0
        else torch.tensor([998.0, -1000.0, 1000.0], dtype=torch.float64)
    )
    r = effective_sample_size(log_weights=lw, process_group="world")
    return (r.ess, r.ratio, r.n)


def s_ess_nan_on_rank1():
    from vcpo_optim import effective_sample_size

    lw = _local_lw(5, (3, 3)).clone()
    if _rank() == 1:
        lw[2] = float("nan")
    effective_sample_size(log_weights=lw, process_group="world")


def s_ess_malformed_on_rank0():
    from vcpo_optim import effective_sample_size

    lw = _local_lw(6, (3, 3))
    mask = torch.ones(5, dtype=torch.bool) if _rank() == 0 else None  # wrong shape on rank 0
    effective_sample_size(log_weights=lw, mask=mask, process_group="world")


def s_ess_empty_global():
    from vcpo_optim import effective_sample_size

    effective_sample_size(log_weights=torch.empty(0, dtype=torch.float64), process_group="world")


def _shared_grad_model(seed: int = 0):
    """A model whose .grad is set identically on every rank (as after a DP all-reduce)."""
    model = C.make_mlp(seed)
    g = torch.Generator().manual_seed(123)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    return model


def s_opt_uneven_microbatches():
    """Rank 0 observes 2 micro-batches, rank 1 one; the step's ESS is global."""
    from vcpo_optim import VCPOAdamW

    model = _shared_grad_model()
    opt = VCPOAdamW(model.parameters(), lr=1e-2)
    lw = _local_lw(7, (5, 2))
    if _rank() == 0:
        opt.observe(log_weights=lw[:3])
        opt.observe(log_weights=lw[3:])
    else:
        opt.observe(importance_weights=lw.exp())
    opt.step()
    s = opt.last_stats
    return {"ess": s.ess, "n": s.n, "lr_scale": s.lr_scale, "params": C.params_of(model)}


def s_opt_rank_observes_nothing():
    from vcpo_optim import VCPOAdamW

    model = _shared_grad_model()
    opt = VCPOAdamW(model.parameters(), lr=1e-2)
    lw = _local_lw(8, (6, 0))
    if _rank() == 0:
        opt.step(log_weights=lw)
    else:
        opt.step()  # no observe() at all on this rank
    s = opt.last_stats
    return {"ess": s.ess, "n": s.n, "lr_scale": s.lr_scale, "params": C.params_of(model)}


def s_opt_nobody_observes():
    from vcpo_optim import VCPOAdamW

    model = _shared_grad_model()
    opt = VCPOAdamW(model.parameters(), lr=1e-2)
    opt.step()
    return {"observed": opt.last_stats.observed, "params": C.params_of(model)}


def s_opt_explicit_group():
    import torch.distributed as dist

    from vcpo_optim import VCPOSGD

    group = dist.new_group([0, 1])
    model = _shared_grad_model()
    opt = VCPOSGD(model.parameters(), lr=0.1, momentum=0.9, process_group=group)
    opt.step(log_weights=_local_lw(9, (2, 5)))
    return {
        "lr_scale": opt.last_stats.lr_scale,
        "n": opt.last_stats.n,
        "params": C.params_of(model),
    }


DDP_SEEDS = [11, 12, 13]


def _ddp_train(sizes: tuple[int, ...]):
    """DDP + VCPOAdamW; the loss of rank r is (W / B) * sum of its l_i (see README)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from vcpo_optim import VCPOAdamW

    model = DDP(C.make_mlp(0))
    opt = VCPOAdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scale = dist.get_world_size() / sum(sizes)
    out = {"params": [], "lr_scale": [], "ess": [], "n": []}
    for seed in DDP_SEEDS:
        batch = C.local_slice(C.global_batch(seed, sizes), sizes, _rank())
        loss = C.per_sample_loss(model, batch).sum() * scale
        opt.zero_grad()
        loss.backward()
        opt.step(log_weights=batch["lw"])
        out["params"].append(C.params_of(model.module))
        out["lr_scale"].append(opt.last_stats.lr_scale.item())
        out["ess"].append(opt.last_stats.ess.item())
        out["n"].append(int(opt.last_stats.n))
    return out


def s_ddp_uneven():
    return _ddp_train((5, 2))


def s_ddp_empty_rank():
    return _ddp_train((6, 0))


def s_ddp_equal_mean_loss():
    """Equal local sizes: the usual per-rank mean loss is the global mean under DDP."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from vcpo_optim import VCPOAdamW

    sizes = (3, 3)
    model = DDP(C.make_mlp(0))
    opt = VCPOAdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    out = {"params": [], "lr_scale": []}
    for seed in DDP_SEEDS:
        batch = C.local_slice(C.global_batch(seed, sizes), sizes, _rank())
        opt.zero_grad()
        C.per_sample_loss(model, batch).mean().backward()
        opt.step(log_weights=batch["lw"])
        out["params"].append(C.params_of(model.module))
        out["lr_scale"].append(opt.last_stats.lr_scale.item())
    return out


def _fault(make_bad):
    """One good step, then a step where ``make_bad`` corrupts one rank's input.

    Returns what changed when the bad step raised (it must be nothing), and
    then proves the ranks are still in step by taking another good step.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    from vcpo_optim import VCPOAdamW

    sizes = (3, 4)
    model = DDP(C.make_mlp(0))
    opt = VCPOAdamW(model.parameters(), lr=1e-2)

    def run(seed, bad):
        batch = C.local_slice(C.global_batch(seed, sizes), sizes, _rank())
        opt.zero_grad()
        (C.per_sample_loss(model, batch).sum() * 2 / 7).backward()
        if bad:
            make_bad(opt, batch)
            opt.step()
        else:
            opt.step(log_weights=batch["lw"])

    run(21, False)
    before = C.params_of(model.module)
    state_before = {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state.items()}
    lr_before = opt.param_groups[0]["lr"]
    err = None
    try:
        run(22, True)
    except ValueError as exc:
        err = (type(exc).__name__, str(exc))
    after = C.params_of(model.module)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, after)) and all(
        torch.equal(state_before[k][n], t) for k, v in opt.state.items() for n, t in v.items()
    )
    run(23, False)  # the ranks must still agree on every collective
    return {
        "error": err,
        "unchanged": unchanged,
        "lr_restored": opt.param_groups[0]["lr"] == lr_before,
        "params_after_recovery": C.params_of(model.module),
    }


def s_fault_nan_rank1():
    def bad(opt, batch):
        lw = batch["lw"].clone()
        if _rank() == 1:
            lw[1] = float("nan")
        opt.observe(log_weights=lw)

    return _fault(bad)


def s_fault_negative_rank0():
    def bad(opt, batch):
        w = batch["lw"].exp()
        if _rank() == 0:
            w[0] = -1.0
        opt.observe(importance_weights=w)

    return _fault(bad)


def s_fault_malformed_rank1():
    def bad(opt, batch):
        mask = torch.ones(len(batch["lw"]) + (1 if _rank() == 1 else 0), dtype=torch.bool)
        opt.observe(log_weights=batch["lw"], mask=mask)

    return _fault(bad)


def s_fault_empty_global():
    def bad(opt, batch):
        opt.observe(log_weights=batch["lw"][:0])

    return _fault(bad)


SCENARIOS = {name[2:]: fn for name, fn in list(globals().items()) if name.startswith("s_")}

# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def res():
    return launch(__file__, WORLD)


def _ref_ess(seed, sizes, **kw):
    from vcpo_optim import effective_sample_size

    lw = C.global_batch(seed, sizes)["lw"]
    return effective_sample_size(log_weights=lw, **kw)


def _check_ess(res, name, want):
    for ess, ratio, n in values(res, name):
        assert int(n) == int(want.n)
        torch.testing.assert_close(ess, want.ess, rtol=1e-12, atol=0)
        torch.testing.assert_close(ratio, want.ratio, rtol=1e-12, atol=0)
    # every rank got the bit-identical result
    v = values(res, name)
    assert all(torch.equal(v[0][0], x[0]) for x in v)


def test_ess_uneven_local_batches(res):
    _check_ess(res, "ess_uneven", _ref_ess(1, (5, 2)))


def test_ess_explicit_process_group(res):
    from vcpo_optim import effective_sample_size

    want = effective_sample_size(C.global_batch(2, (3, 6))["lw"].exp())
    _check_ess(res, "ess_explicit_group", want)


def test_ess_rank_with_no_samples(res):
    _check_ess(res, "ess_empty_rank", _ref_ess(3, (4, 0)))


def test_ess_rank_fully_masked(res):
    from vcpo_optim import effective_sample_size

    want = effective_sample_size(log_weights=C.global_batch(4, (3, 3))["lw"][:3])
    _check_ess(res, "ess_masked_rank", want)


def test_ess_huge_log_weights(res):
    from vcpo_optim import effective_sample_size

    want = effective_sample_size(
        log_weights=torch.tensor([1000.0, 999.0, 998.0, -1000.0, 1000.0], dtype=torch.float64)
    )
    assert math.isfinite(want.ess.item())
    _check_ess(res, "ess_huge_log_weights", want)


def test_ess_nan_on_one_rank_raises_everywhere(res):
    errs = errors(res, "ess_nan_on_rank1")
    assert [t for t, _ in errs] == ["ValueError", "ValueError"]
    assert errs[0][1] == errs[1][1]
    assert "rank 1" in errs[0][1] and "1 NaN" in errs[0][1]


def test_ess_malformed_on_one_rank_raises_everywhere(res):
    errs = errors(res, "ess_malformed_on_rank0")
    assert [t for t, _ in errs] == ["ValueError", "ValueError"]
    for _, msg in errs:
        assert "rank 0: malformed input" in msg
    assert "mask has shape (5,)" in errs[0][1]  # the offending rank names the cause


def test_ess_empty_global_batch_raises_everywhere(res):
    errs = errors(res, "ess_empty_global")
    assert errs[0] == errs[1] and "empty batch" in errs[0][1]


def _ref_opt_step(lw, cls_name="VCPOAdamW", **kw):
    import vcpo_optim

    model = C.make_mlp(0)
    g = torch.Generator().manual_seed(123)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    opt = getattr(vcpo_optim, cls_name)(model.parameters(), **kw)
    opt.step(log_weights=lw)
    return opt.last_stats, C.params_of(model)


def _check_same_on_ranks(vs, key="params"):
    for v in vs[1:]:
        for a, b in zip(vs[0][key], v[key]):
            assert torch.equal(a, b), "replicas diverged"


def test_optimizer_uneven_micro_batches(res):
    stats, params = _ref_opt_step(C.global_batch(7, (5, 2))["lw"], lr=1e-2)
    vs = values(res, "opt_uneven_microbatches")
    for v in vs:
        assert int(v["n"]) == 7
        torch.testing.assert_close(v["ess"], stats.ess, rtol=1e-12, atol=0)
        torch.testing.assert_close(v["lr_scale"], stats.lr_scale, rtol=1e-12, atol=0)
        C.assert_params_close(v["params"], params)
    assert stats.lr_scale.item() < 0.9  # the scaling is really active
    _check_same_on_ranks(vs)


def test_optimizer_rank_that_observes_nothing(res):
    stats, params = _ref_opt_step(C.global_batch(8, (6, 0))["lw"], lr=1e-2)
    vs = values(res, "opt_rank_observes_nothing")
    for v in vs:
        assert int(v["n"]) == 6
        torch.testing.assert_close(v["lr_scale"], stats.lr_scale, rtol=1e-12, atol=0)
        C.assert_params_close(v["params"], params)
    _check_same_on_ranks(vs)


def test_optimizer_nobody_observes_is_plain_adamw(res):
    model = C.make_mlp(0)
    g = torch.Generator().manual_seed(123)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    for v in values(res, "opt_nobody_observes"):
        assert v["observed"] is False
        for a, b in zip(v["params"], C.params_of(model)):
            assert torch.equal(a, b)


def test_optimizer_explicit_group_sgd(res):
    stats, params = _ref_opt_step(C.global_batch(9, (2, 5))["lw"], "VCPOSGD", lr=0.1, momentum=0.9)
    for v in values(res, "opt_explicit_group"):
        assert int(v["n"]) == 7
        torch.testing.assert_close(v["lr_scale"], stats.lr_scale, rtol=1e-12, atol=0)
        C.assert_params_close(v["params"], params)


@pytest.mark.parametrize(
    ("name", "sizes"),
    [("ddp_uneven", (5, 2)), ("ddp_empty_rank", (6, 0)), ("ddp_equal_mean_loss", (3, 3))],
)
def test_ddp_equals_single_process_on_concatenated_batch(res, name, sizes):
    ref = C.reference_train(DDP_SEEDS, sizes)
    vs = values(res, name)
    for v in vs:
        for step in range(len(DDP_SEEDS)):
            assert v["lr_scale"][step] == pytest.approx(ref["lr_scale"][step], rel=1e-12)
            C.assert_params_close(v["params"][step], ref["params"][step])
    assert min(ref["lr_scale"]) < 0.9
    for step in range(len(DDP_SEEDS)):
        for a, b in zip(vs[0]["params"][step], vs[1]["params"][step]):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("fault_nan_rank1", "rank 1: 1 NaN"),
        ("fault_negative_rank0", "rank 0: 1 negative"),
        ("fault_malformed_rank1", "rank 1: malformed input"),
        ("fault_empty_global", "empty batch"),
    ],
)
def test_fault_raises_on_every_rank_and_changes_nothing(res, name, needle):
    vs = values(res, name)
    for v in vs:
        assert v["error"] is not None, "the bad step did not raise"
        assert v["error"][0] == "ValueError"
        assert needle in v["error"][1]
        assert v["unchanged"] and v["lr_restored"]
    # the recovery step kept the replicas identical: nobody stepped alone
    for a, b in zip(vs[0]["params_after_recovery"], vs[1]["params_after_recovery"]):
        assert torch.equal(a, b)


def test_fault_messages_agree_across_ranks(res):
    for name in ("fault_nan_rank1", "fault_negative_rank0", "fault_empty_global"):
        e0, e1 = (v["error"] for v in values(res, name))
        assert e0 == e1
    # the malformed rank adds its own cause after the shared message
    e0, e1 = (v["error"][1] for v in values(res, "fault_malformed_rank1"))
    assert e1.startswith(e0) and "mask has shape" in e1


if __name__ == "__main__":
    worker_main(SCENARIOS)
