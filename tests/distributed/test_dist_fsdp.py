"""FSDP2 (``fully_shard``) + VCPOAdamW on DTensor parameters, and DCP checkpoint/resume.

2 real gloo ranks, one process group for the module (see ``_harness``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import _common as C
import pytest
import torch
from _harness import launch, values, worker_main

WORLD = 2
SEEDS = [31, 32, 33, 34]
SIZES = (5, 2)


def _rank() -> int:
    return int(os.environ["RANK"])


def _sharded_model(seed: int = 0):
    from torch.distributed.fsdp import fully_shard

    model = C.make_mlp(seed)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _step(model, opt, seed, sizes=SIZES):
    import torch.distributed as dist

    batch = C.local_slice(C.global_batch(seed, sizes), sizes, _rank())
    opt.zero_grad()
    # FSDP2 averages gradients over the data-parallel ranks, like DDP.
    (C.per_sample_loss(model, batch).sum() * dist.get_world_size() / sum(sizes)).backward()
    opt.step(log_weights=batch["lw"])
    return C.params_of(model), opt.last_stats.lr_scale.item()


def s_fsdp_params_are_dtensors():
    from torch.distributed.tensor import DTensor

    model = _sharded_model()
    return [
        (type(p).__name__, isinstance(p, DTensor), tuple(p.to_local().shape))
        for p in model.parameters()
    ]


def _train(sizes):
    from vcpo_optim import VCPOAdamW

    model = _sharded_model()
    opt = VCPOAdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    out = {"params": [], "lr_scale": []}
    for seed in SEEDS:
        p, s = _step(model, opt, seed, sizes)
        out["params"].append(p)
        out["lr_scale"].append(s)
    return out


def s_fsdp_uneven():
    return _train(SIZES)


def s_fsdp_empty_rank():
    return _train((6, 0))


def _opt(model, **kw):
    from vcpo_optim import VCPOAdamW

    return VCPOAdamW(model.parameters(), lr=1e-2, weight_decay=0.01, **kw)


def s_fsdp_dcp_resume():
    """Save after 2 steps with DCP, resume in a fresh model/optimizer: same trajectory, bitwise."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    ckpt = str(Path(sys.argv[1]) / "ckpt")
    model = _sharded_model()
    opt = _opt(model, base_ess_ratio=0.5, min_lr_scale=0.1)
    for seed in SEEDS[:2]:
        _step(model, opt, seed)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    straight = [_step(model, opt, seed) for seed in SEEDS[2:]]

    fresh = _sharded_model(seed=1)  # different init: everything must come from the checkpoint
    fresh_opt = _opt(fresh)  # default base_ess_ratio / min_lr_scale: restored from the checkpoint
    msd, osd = get_state_dict(fresh, fresh_opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(
        fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    config = {k: fresh_opt.param_groups[0][k] for k in ("base_ess_ratio", "min_lr_scale", "lr")}
    resumed = [_step(fresh, fresh_opt, seed) for seed in SEEDS[2:]]
    steps = [int(s["step"]) for s in fresh_opt.state.values()]
    return {"straight": straight, "resumed": resumed, "config": config, "steps": steps}


SCENARIOS = {name[2:]: fn for name, fn in list(globals().items()) if name.startswith("s_")}

# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def res():
    return launch(__file__, WORLD)


def test_fsdp_parameters_are_sharded_dtensors(res):
    for v in values(res, "fsdp_params_are_dtensors"):
        assert all(is_dt for _, is_dt, _ in v)
    # dim-0 sharding: the first Linear(4, 8) weight is split 4 + 4 over two ranks
    assert values(res, "fsdp_params_are_dtensors")[0][0][2] == (4, 4)


@pytest.mark.parametrize(("name", "sizes"), [("fsdp_uneven", SIZES), ("fsdp_empty_rank", (6, 0))])
def test_fsdp_equals_single_process(res, name, sizes):
    ref = C.reference_train(SEEDS, sizes)
    vs = values(res, name)
    for v in vs:
        for step in range(len(SEEDS)):
            assert v["lr_scale"][step] == pytest.approx(ref["lr_scale"][step], rel=1e-12)
            C.assert_params_close(v["params"][step], ref["params"][step])
    assert min(ref["lr_scale"]) < 0.9


def test_dcp_resume_continues_the_same_trajectory_bitwise(res):
    for v in values(res, "fsdp_dcp_resume"):
        assert v["config"]["base_ess_ratio"] == 0.5
        assert v["config"]["min_lr_scale"] == 0.1
        assert v["steps"] and all(s == 4 for s in v["steps"])
        for (p_a, s_a), (p_b, s_b) in zip(v["straight"], v["resumed"]):
            assert s_a == s_b
            for a, b in zip(p_a, p_b):
                assert torch.equal(a, b)


if __name__ == "__main__":
    worker_main(SCENARIOS)
