"""OPOB's clipping, norm_weights and noise scale across 2 real gloo ranks (issue 11).

Every scenario is checked against per-sample gradients materialised on the
concatenated global batch (one backward per sample, float64): the clipped
gradient, the clip factors and counts, the baselines with norm_weights, and the
noise scale, which must be global (both ranks hold the estimate over all
samples). DDP (statistics path and per-sample gather path), a rank without
samples, grad_reduction="mean", FSDP2, and the refusals on every rank.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import _common as C
import pytest
import torch
from _harness import errors, launch, values, worker_main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "opob"))

WORLD = 2
SIZES = (5, 3)
GROUPS = torch.tensor([0, 0, 1, 1, 2, 2, 1, 3])  # groups 1 and 2 straddle the ranks
STEPS = [41, 42]
CLIP = 0.08


def _rank() -> int:
    return int(os.environ["RANK"])


def _batch(seed, sizes, rank):
    b = C.global_batch(seed, sizes)
    b["groups"] = GROUPS if sum(sizes) == len(GROUPS) else torch.arange(sum(sizes)) // 2
    b["m"] = (0.5 * b["lw"]).exp()  # norm_weights: any non-negative multipliers
    return b if rank is None else C.local_slice(b, sizes, rank)


def _surrogate(model, batch):
    out = model(batch["x"]).reshape(-1)
    return -batch["lw"].exp() * torch.nn.functional.logsigmoid(out)


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def run(model, opob, sizes, rank, *, micro=1, weights=True, ctx=None):
    """Two optimizer steps (SGD); per step the last call's result, the gradient and parameters."""
    import contextlib

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = []
    for seed in STEPS:
        batch = _batch(seed, sizes, rank)
        n = len(batch["x"])
        cuts = [round(k * n / micro) for k in range(micro + 1)]
        opt.zero_grad()
        res = []
        for lo, hi in itertools.pairwise(cuts):
            mb = {k: v[lo:hi] for k, v in batch.items()}
            with ctx() if ctx is not None else contextlib.nullcontext():
                r = opob.backward(
                    _surrogate(model, mb),
                    mb["reward"],
                    mb["groups"],
                    norm_weights=mb["m"] if weights else None,
                )
            res.append(r)
        last = res[-1]
        out.append(
            {
                "coefficients": torch.cat([r.coefficients for r in res]),
                "clip_factors": None
                if last.clip_factors is None
                else torch.cat([r.clip_factors for r in res]),
                "num_clipped": None if last.num_clipped is None else last.num_clipped.item(),
                "noise": torch.stack([last.noise_scale, last.noise_trace, last.noise_grad_sq]),
                "grads": [_full(p.grad) for p in opob.model.parameters()],
            }
        )
        opt.step()
        out[-1]["params"] = C.params_of(opob.model)  # after the step: where the next one starts
    return out


def _ddp(sizes=SIZES, micro=1, **kw):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from vcpo_optim.opob import OPOB

    policy = C.make_mlp(0)
    model = DDP(policy)
    opob = OPOB(policy, **kw)
    return run(policy, opob, sizes, _rank(), micro=micro, ctx=model.no_sync)


def s_ddp_group_clip_weights_std():
    return _ddp(scope="group", norm_by_std=True, max_sample_grad_norm=CLIP)


def s_ddp_group_median_clip_weights():
    return _ddp(scope="group", agg="median", max_sample_grad_norm=CLIP)


def s_ddp_batch_clip_weights():
    return _ddp(scope="batch", norm_by_std=True, max_sample_grad_norm=CLIP)


def s_ddp_batch_accumulation_noise():
    return _ddp(scope="batch", micro=2, norm_by_std=True)


def s_ddp_group_mean_reduction():
    return _ddp(scope="group", max_sample_grad_norm=CLIP, grad_reduction="mean")


def s_ddp_empty_rank():
    return _ddp(sizes=(8, 0), scope="group", max_sample_grad_norm=CLIP)


def s_fsdp_group_clip_weights():
    from torch.distributed.fsdp import fully_shard

    from vcpo_optim.opob import OPOB

    model = C.make_mlp(0)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opob = OPOB(model, scope="group", max_sample_grad_norm=CLIP)
    return run(model, opob, SIZES, _rank())


def s_fault_batch_clip_second_call():
    from vcpo_optim.opob import OPOB

    model = C.make_mlp(0)
    opob = OPOB(model, scope="batch", max_sample_grad_norm=CLIP)
    batch = _batch(43, SIZES, _rank())
    opob.backward(_surrogate(model, batch), batch["reward"])
    snap = [p.grad.clone() for p in model.parameters()]
    try:
        opob.backward(_surrogate(model, batch), batch["reward"])
        raised = None
    except ValueError as exc:
        raised = str(exc)
    same = all(torch.equal(p.grad, s) for p, s in zip(model.parameters(), snap))
    return {"raised": raised, "grads_same": same}


def s_fault_norm_weights_on_one_rank():
    from vcpo_optim.opob import OPOB

    model = C.make_mlp(0)
    opob = OPOB(model, scope="group")
    batch = _batch(44, SIZES, _rank())
    m = batch["m"] if _rank() == 0 else None
    opob.backward(_surrogate(model, batch), batch["reward"], batch["groups"], norm_weights=m)


def s_fault_negative_norm_weights_rank1():
    from vcpo_optim.opob import OPOB

    model = C.make_mlp(0)
    opob = OPOB(model, scope="group")
    batch = _batch(45, SIZES, _rank())
    m = batch["m"].clone()
    if _rank() == 1:
        m[0] = -1.0
    opob.backward(_surrogate(model, batch), batch["reward"], batch["groups"], norm_weights=m)


def s_collectives_with_controls():
    """Clipping, norm_weights and the noise scale add no collective (DDP, agg='mean')."""
    import torch.distributed as dist

    names = ("all_gather", "all_gather_into_tensor", "all_reduce", "reduce_scatter_tensor")
    from vcpo_optim.opob import OPOB

    out = {}
    for name, kw, weights in [
        ("plain", {}, False),
        ("controls", {"max_sample_grad_norm": CLIP}, True),
    ]:
        model = C.make_mlp(0)
        opob = OPOB(model, scope="group", norm_by_std=True, **kw)
        batch = _batch(46, SIZES, _rank())
        loss = _surrogate(model, batch)
        log = []
        saved = {n: getattr(dist, n) for n in names}

        def wrap(n, f, log=log):
            def w(*a, **k):
                log.append(n)
                return f(*a, **k)

            return w

        try:
            for n, f in saved.items():
                setattr(dist, n, wrap(n, f))
            opob.backward(
                loss, batch["reward"], batch["groups"], norm_weights=batch["m"] if weights else None
            )
        finally:
            for n, f in saved.items():
                setattr(dist, n, f)
        out[name] = log
    return out


SCENARIOS = {name[2:]: fn for name, fn in list(globals().items()) if name.startswith("s_")}

# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def res():
    return launch(__file__, WORLD)


def _oracle(got_ranks, sizes, scope, *, agg="mean", norm_by_std=False, clip=None):
    """Every rank's steps against materialised per-sample gradients of the global batch."""
    from opob_oracle import clipped_contributions, direct_noise, per_sample_grads, ref_coefficients

    model = C.make_mlp(0)
    clipped_total = 0
    for k, seed in enumerate(STEPS):
        if k:  # the oracle runs at the parameters this step started from
            with torch.no_grad():
                for p, v in zip(model.parameters(), got_ranks[0][k - 1]["params"]):
                    p.copy_(v)
        gb = _batch(seed, sizes, None)
        g = per_sample_grads(model, lambda m, gb=gb: _surrogate(m, gb))
        n = (g * g).sum(1)
        nb = n * gb["m"]
        scopes = gb["groups"].tolist() if scope == "group" else [0] * len(n)
        _, coef = ref_coefficients(nb.tolist(), gb["reward"].tolist(), scopes, agg, norm_by_std)
        coef = torch.tensor(coef, dtype=torch.float64)
        x, f = clipped_contributions(g, coef, clip)
        want_noise = torch.stack(direct_noise(x))
        grad = x.sum(0)
        for rank, got in enumerate(got_ranks):
            lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
            r = got[k]
            eff = coef if f is None else coef * f
            torch.testing.assert_close(r["coefficients"], eff[lo:hi], rtol=1e-9, atol=1e-12)
            if clip is not None:
                torch.testing.assert_close(r["clip_factors"], f[lo:hi], rtol=1e-9, atol=0)
                assert r["num_clipped"] == int((f < 1).sum())  # global, on every rank
            flat = torch.cat([t.reshape(-1) for t in r["grads"]])
            torch.testing.assert_close(flat, grad, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(r["noise"], want_noise, rtol=1e-8, atol=0)
        if f is not None:
            clipped_total += int((f < 1).sum())
    if clip is not None:  # the bound bit on some samples and not on others
        assert 0 < clipped_total < len(STEPS) * sum(sizes)


def test_ddp_group_scope_clipping_norm_weights_and_noise(res):
    got = values(res, "ddp_group_clip_weights_std")
    _oracle(got, SIZES, "group", norm_by_std=True, clip=CLIP)


def test_ddp_per_sample_path_median(res):
    _oracle(values(res, "ddp_group_median_clip_weights"), SIZES, "group", agg="median", clip=CLIP)


def test_ddp_batch_scope_one_call_with_clipping(res):
    got = values(res, "ddp_batch_clip_weights")
    _oracle(got, SIZES, "batch", norm_by_std=True, clip=CLIP)


def test_ddp_batch_scope_accumulation_noise_is_per_step(res):
    """Two calls per step on each rank: the last call's estimate covers the whole step."""
    from opob_oracle import direct_noise, per_sample_grads, ref_coefficients

    got = values(res, "ddp_batch_accumulation_noise")
    model = C.make_mlp(0)
    for k, seed in enumerate(STEPS):
        if k:
            with torch.no_grad():
                for p, v in zip(model.parameters(), got[0][k - 1]["params"]):
                    p.copy_(v)
        gb = _batch(seed, SIZES, None)
        g = per_sample_grads(model, lambda m, gb=gb: _surrogate(m, gb))
        n = (g * g).sum(1)
        _, coef = ref_coefficients(
            (n * gb["m"]).tolist(), gb["reward"].tolist(), [0] * 8, "mean", True
        )
        x = torch.tensor(coef, dtype=torch.float64)[:, None] * g
        for r in got:
            flat = torch.cat([t.reshape(-1) for t in r[k]["grads"]])
            torch.testing.assert_close(flat, x.sum(0), rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(
                r[k]["noise"], torch.stack(direct_noise(x)), rtol=1e-8, atol=0
            )


def test_ddp_mean_reduction_noise_counts_the_sum(res):
    mean = values(res, "ddp_group_mean_reduction")
    # .grad is the sum / 2 (DDP's convention); the noise scale is that of the summed contributions
    for rank_steps in mean:
        for step in rank_steps:
            step["grads"] = [2 * t for t in step["grads"]]
    _oracle(mean, SIZES, "group", clip=CLIP)


def test_rank_without_samples(res):
    _oracle(values(res, "ddp_empty_rank"), (8, 0), "group", clip=CLIP)


def test_fsdp2_noise_scale_from_sharded_gradients(res):
    _oracle(values(res, "fsdp_group_clip_weights"), SIZES, "group", clip=CLIP)


def test_clipping_with_batch_scope_second_call_is_refused_on_every_rank(res):
    got = values(res, "fault_batch_clip_second_call")
    for r in got:
        assert r["raised"] is not None and "max_sample_grad_norm with scope='batch'" in r["raised"]
        assert r["grads_same"]


def test_norm_weights_on_one_rank_only_is_refused_on_every_rank(res):
    errs = errors(res, "fault_norm_weights_on_one_rank")
    assert [t for t, _ in errs] == ["ValueError", "ValueError"]
    assert all("passed norm_weights but rank(s) [1] did not" in m for _, m in errs)
    errs = errors(res, "fault_negative_norm_weights_rank1")
    assert [t for t, _ in errs] == ["ValueError", "ValueError"]
    assert all("rank(s) [1]" in m and "norm_weights must be >= 0" in m for _, m in errs)


def test_controls_add_no_collective(res):
    for log in values(res, "collectives_with_controls"):
        assert log["controls"] == log["plain"]


if __name__ == "__main__":
    worker_main(SCENARIOS)
