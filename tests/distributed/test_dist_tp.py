"""Tensor parallelism and a 2-D (data x tensor) mesh on 4 real gloo ranks.

Mesh ``(dp=2, tp=2)``: ranks {0, 1} are data-parallel replica 0 and {2, 3}
replica 1; within a replica the MLP is split with ``ColwiseParallel`` (first
Linear) and ``RowwiseParallel`` (second Linear); the last Linear stays
replicated. Each data-parallel replica takes its own slice of the global
batch; the single-process reference runs on the concatenated batch.
"""

from __future__ import annotations

import os

import _common as C
import pytest
import torch
from _harness import errors, launch, values, worker_main

WORLD = 4
DP, TP = 2, 2
SIZES = (5, 3)
STEPS = [51, 52]
GROUPS = torch.tensor([0, 0, 1, 1, 2, 2, 1, 3])  # group 1 straddles the two replicas


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (DP, TP), mesh_dim_names=("dp", "tp"))


def _dp_rank() -> int:
    return int(os.environ["RANK"]) // TP


def _tp_model(mesh):
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    model = C.make_mlp(0)
    return parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def s_fsdp_tp_vcpo_adamw():
    """FSDP2 over dp on top of TP over tp (the canonical 2-D layout) + VCPOAdamW over dp."""
    from torch.distributed.fsdp import fully_shard

    from vcpo_optim import VCPOAdamW

    mesh = _mesh()
    model = _tp_model(mesh)
    fully_shard(model, mesh=mesh["dp"])
    placements = {n: str(p.placements) for n, p in model.named_parameters()}
    opt = VCPOAdamW(
        model.parameters(), lr=1e-2, weight_decay=0.01, process_group=mesh["dp"].get_group()
    )
    out = {"params": [], "lr_scale": [], "n": [], "placements": placements}
    for seed in STEPS:
        batch = C.local_slice(C.global_batch(seed, SIZES), SIZES, _dp_rank())
        opt.zero_grad()
        (C.per_sample_loss(model, batch).sum() * DP / sum(SIZES)).backward()
        opt.step(log_weights=batch["lw"])
        out["params"].append(C.params_of(model))
        out["lr_scale"].append(opt.last_stats.lr_scale.item())
        out["n"].append(int(opt.last_stats.n))
    return out


def _surrogate(model, batch):
    out = model(batch["x"]).reshape(-1)
    return -batch["lw"].exp() * torch.nn.functional.logsigmoid(out)


def _noise(r):
    """The noise-scale estimates of an OPOB result (|sum x_i|^2 needs the global gradient norm)."""
    return torch.stack([r.noise_scale, r.noise_trace, r.noise_grad_sq])


def _opob_run(scope: str, sizes=SIZES, **kw):
    from vcpo_optim import VCPOAdamW
    from vcpo_optim.opob import DistributedOPOB

    mesh = _mesh()
    model = _tp_model(mesh)
    dp_group = mesh["dp"].get_group()
    opob = DistributedOPOB(
        model,
        scope=scope,
        process_group=dp_group,
        tensor_parallel_group=mesh["tp"].get_group(),
        **kw,
    )
    opt = VCPOAdamW(model.parameters(), lr=1e-2, process_group=dp_group)
    out = []
    for seed in STEPS:
        gb = C.global_batch(seed, sizes)
        gb["groups"] = GROUPS
        batch = C.local_slice(gb, sizes, _dp_rank())
        opt.zero_grad()
        r = opob.backward(_surrogate(model, batch), batch["reward"], batch["groups"])
        grads = [_full(p.grad) for p in model.parameters()]
        grad_types = [type(p.grad).__name__ for p in model.parameters()]
        opt.step(log_weights=batch["lw"])
        out.append(
            {
                "sq_norms": r.sq_norms,
                "baselines": r.baselines,
                "coefficients": r.coefficients,
                "noise": _noise(r),
                "grads": grads,
                "grad_types": grad_types,
                "params": C.params_of(model),
                "lr_scale": opt.last_stats.lr_scale.item(),
            }
        )
    return out


def s_tp_dp_opob_group():
    return _opob_run("group")


def s_tp_dp_opob_batch_std():
    return _opob_run("batch", norm_by_std=True)


def s_tp_dp_opob_empty_replica():
    """Data-parallel replica 1 (ranks 2, 3) has no samples; it runs the forward on an empty batch."""
    return _opob_run("group", sizes=(8, 0))


def _tp_opob_with_grads():
    """The TP x DP model with OPOB attached, ``.grad`` preset to 0.25, and a snapshot of the
    full gradients (to check that a refused call changes nothing)."""
    from vcpo_optim import OPOB

    mesh = _mesh()
    model = _tp_model(mesh)
    opob = OPOB(
        model,
        process_group=mesh["dp"].get_group(),
        tensor_parallel_group=mesh["tp"].get_group(),
    )
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    return model, opob, [_full(p.grad) for p in model.parameters()]


def _tp_fault(stage: str, failing_rank: int):
    """One backward call in which a single global rank fails (replica 1 empty).

    ``stage="norms"``: before the TP norm completion; ``"write"``: after the statistics
    exchange, while writing the gradient. Returns how the call ended and whether .grad changed.
    """
    import torch.distributed as dist

    from vcpo_optim.opob import engine

    model, opob, snap = _tp_opob_with_grads()
    gb = C.global_batch(53, (8, 0))
    gb["groups"] = GROUPS
    batch = C.local_slice(gb, (8, 0), _dp_rank())
    name = "sq_norms" if stage == "norms" else "weighted_sum"
    orig = getattr(engine.ParamWork, name)

    def broken(self, *a, **k):
        if dist.get_rank() == failing_rank:
            raise RuntimeError(f"injected failure in {name}")
        return orig(self, *a, **k)

    setattr(engine.ParamWork, name, broken)
    try:
        opob.backward(_surrogate(model, batch), batch["reward"], batch["groups"])
        raised = None
    except Exception as exc:
        raised = (type(exc).__name__, str(exc))
    finally:
        setattr(engine.ParamWork, name, orig)
    same = all(torch.equal(_full(p.grad), s) for p, s in zip(model.parameters(), snap))
    return {"raised": raised, "grads_same": same}


def s_tp_loss_mixing_samples_on_replica_0():
    """The first-call per-sample check under TP x DP: replica 0's loss mixes its samples; every
    rank of the mesh runs the check's backward (replica 1 has 3 samples), all raise the same
    error, nothing changes; a correct call then passes and disarms it everywhere."""
    model, opob, snap = _tp_opob_with_grads()
    gb = C.global_batch(53, SIZES)
    gb["groups"] = GROUPS
    batch = C.local_slice(gb, SIZES, _dp_rank())
    loss = _surrogate(model, batch)
    if _dp_rank() == 0:
        loss = loss - loss.mean()
    try:
        opob.backward(loss, batch["reward"], batch["groups"])
        raised = None
    except Exception as exc:
        raised = (type(exc).__name__, str(exc))
    same = all(torch.equal(_full(p.grad), s) for p, s in zip(model.parameters(), snap))
    armed = not opob._step.separable_checked
    opob.backward(_surrogate(model, batch), batch["reward"], batch["groups"])
    return {
        "raised": raised,
        "grads_same": same,
        "armed": armed,
        "checked": opob._step.separable_checked,
    }


def s_tp_fault_norms_on_one_tp_rank():
    return _tp_fault("norms", 1)


def s_tp_fault_write_on_one_tp_rank():
    return _tp_fault("write", 0)


HSDP_SIZES = (3, 2, 2, 1)


def s_hsdp_opob():
    """HSDP (replicate x shard on the 2-D mesh): all 4 ranks are data parallel."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from vcpo_optim import OPOB, VCPOAdamW

    mesh = _mesh()
    model = C.make_mlp(0)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    placements = str(model[0].weight.placements)
    opob = OPOB(model, scope="group")
    opt = VCPOAdamW(model.parameters(), lr=1e-2)
    out = []
    for seed in STEPS:
        gb = C.global_batch(seed, HSDP_SIZES)
        gb["groups"] = GROUPS
        batch = C.local_slice(gb, HSDP_SIZES, dist.get_rank())
        opt.zero_grad()
        r = opob.backward(_surrogate(model, batch), batch["reward"], batch["groups"])
        grads = [_full(p.grad) for p in model.parameters()]
        opt.step(log_weights=batch["lw"])
        out.append(
            {
                "sq_norms": r.sq_norms,
                "noise": _noise(r),
                "grads": grads,
                "params": C.params_of(model),
            }
        )
    out[0]["placements"] = placements
    return out


def s_fsdp_tp_opob_refused():
    from torch.distributed.fsdp import fully_shard

    from vcpo_optim import OPOB

    mesh = _mesh()
    model = _tp_model(mesh)
    fully_shard(model, mesh=mesh["dp"])
    OPOB(model, process_group=mesh["dp"].get_group())


def s_tp_opob_needs_dp_group():
    from vcpo_optim import OPOB

    OPOB(_tp_model(_mesh()))  # default process_group (world) would mix TP shards


SCENARIOS = {name[2:]: fn for name, fn in list(globals().items()) if name.startswith("s_")}

# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def res():
    return launch(__file__, WORLD)


def test_fsdp_tp_2d_mesh_vcpo_adamw_equals_single_process(res):
    ref = C.reference_train(STEPS, SIZES)
    vs = values(res, "fsdp_tp_vcpo_adamw")
    # really 2-D: sharded over dp (FSDP2, strided) and over tp (column / row)
    assert vs[0]["placements"]["0.weight"].endswith("Shard(dim=0))")
    assert "Shard(dim=0, sf=2)" in vs[0]["placements"]["0.weight"]
    assert vs[0]["placements"]["2.weight"].endswith("Shard(dim=1))")
    for v in vs:
        assert v["n"] == [sum(SIZES)] * len(STEPS)
        for step in range(len(STEPS)):
            assert v["lr_scale"][step] == pytest.approx(ref["lr_scale"][step], rel=1e-12)
            C.assert_params_close(v["params"][step], ref["params"][step])
    assert min(ref["lr_scale"]) < 0.9


def _opob_reference(scope, sizes=SIZES, **kw):
    from vcpo_optim import VCPOAdamW
    from vcpo_optim.opob import OPOB

    model = C.make_mlp(0)
    opob = OPOB(model, scope=scope, **kw)
    opt = VCPOAdamW(model.parameters(), lr=1e-2)
    out = []
    for seed in STEPS:
        b = C.global_batch(seed, sizes)
        opt.zero_grad()
        r = opob.backward(_surrogate(model, b), b["reward"], GROUPS)
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step(log_weights=b["lw"])
        out.append(
            {
                "res": r,
                "grads": grads,
                "params": C.params_of(model),
                "lr_scale": opt.last_stats.lr_scale.item(),
            }
        )
    return out


def _check_opob(got_ranks, ref, sizes=SIZES):
    for rank, got in enumerate(got_ranks):
        d = rank // TP
        lo, hi = sum(sizes[:d]), sum(sizes[: d + 1])
        for g, r in zip(got, ref):
            torch.testing.assert_close(
                g["sq_norms"], r["res"].sq_norms[lo:hi], rtol=1e-9, atol=1e-14
            )
            torch.testing.assert_close(
                g["baselines"], r["res"].baselines[lo:hi], rtol=1e-9, atol=1e-12
            )
            torch.testing.assert_close(
                g["coefficients"], r["res"].coefficients[lo:hi], rtol=1e-9, atol=1e-12
            )
            for a, b in zip(g["grads"], r["grads"]):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
            C.assert_params_close(g["params"], r["params"])
            assert g["lr_scale"] == pytest.approx(r["lr_scale"], rel=1e-12)
            assert g["grad_types"][:4] == ["DTensor"] * 4  # TP shards get DTensor grads
            # TP shards summed, the replicated last layer counted once
            torch.testing.assert_close(g["noise"], _noise(r["res"]), rtol=1e-8, atol=0)


def test_tp_x_dp_opob_group_scope_equals_single_process(res):
    _check_opob(values(res, "tp_dp_opob_group"), _opob_reference("group"))


def test_tp_x_dp_opob_batch_scope_std_equals_single_process(res):
    _check_opob(values(res, "tp_dp_opob_batch_std"), _opob_reference("batch", norm_by_std=True))


def test_tp_x_dp_opob_with_an_empty_replica(res):
    _check_opob(
        values(res, "tp_dp_opob_empty_replica"),
        _opob_reference("group", sizes=(8, 0)),
        sizes=(8, 0),
    )


@pytest.mark.parametrize(
    ("name", "rank", "cause"),
    [
        ("tp_fault_norms_on_one_tp_rank", 1, "injected failure in sq_norms"),
        ("tp_fault_write_on_one_tp_rank", 0, "injected failure in weighted_sum"),
    ],
)
def test_a_failure_on_one_rank_of_the_mesh_reaches_every_rank(res, name, rank, cause):
    got = values(res, name)
    raised = [g["raised"] for g in got]
    assert all(r is not None for r in raised), raised
    assert len(set(raised)) == 1, raised  # the same error on all 4 ranks
    kind, msg = raised[0]
    assert kind == "ValueError" and cause in msg, msg
    assert "tensor-parallel group" in msg and f"rank {rank % TP}" in msg, msg
    assert all(g["grads_same"] for g in got)


def test_loss_mixing_samples_on_one_replica_is_refused_on_every_rank(res):
    got = values(res, "tp_loss_mixing_samples_on_replica_0")
    raised = [g["raised"] for g in got]
    assert all(r is not None for r in raised), raised
    assert len(set(raised)) == 1, raised  # the same error on all 4 ranks
    kind, msg = raised[0]
    assert kind == "ValueError" and "does not depend on row i of the batch alone" in msg, msg
    assert "rank(s) [0]" in msg, msg  # data-parallel rank 0 (replica 0)
    assert all(g["grads_same"] and g["armed"] and g["checked"] for g in got)


def test_hsdp_opob_equals_single_process(res):
    ref = _opob_reference("group")
    got = values(res, "hsdp_opob")
    assert got[0][0]["placements"] == "(Replicate(), Shard(dim=0))"
    for rank, steps in enumerate(got):
        lo, hi = sum(HSDP_SIZES[:rank]), sum(HSDP_SIZES[: rank + 1])
        for g, r in zip(steps, ref):
            torch.testing.assert_close(
                g["sq_norms"], r["res"].sq_norms[lo:hi], rtol=1e-9, atol=1e-14
            )
            for a, b in zip(g["grads"], r["grads"]):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
            C.assert_params_close(g["params"], r["params"])
            # HSDP: summed over the shard dimension only, the replicas counted once
            torch.testing.assert_close(g["noise"], _noise(r["res"]), rtol=1e-8, atol=0)


def test_fsdp_on_top_of_tp_is_refused_with_a_clear_error(res):
    for kind, msg in errors(res, "fsdp_tp_opob_refused"):
        assert kind == "ValueError" and "not supported" in msg


def test_tp_opob_without_dp_group_is_refused(res):
    for kind, msg in errors(res, "tp_opob_needs_dp_group"):
        assert kind == "ValueError" and "data-parallel group" in msg


if __name__ == "__main__":
    worker_main(SCENARIOS)
