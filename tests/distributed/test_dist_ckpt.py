"""OPOB with activation checkpointing on 2 real gloo ranks, against the per-sample oracle.

DDP: the two-pass path (:mod:`vcpo_optim.opob.recompute`) runs the same collectives as the
single pass, so every rank's norms, baselines, coefficients and ``.grad`` equal the
float64 loop with one backward per sample on the concatenated batch; a failure in pass 1
on one rank is raised on both. FSDP2: the inputs of checkpointed modules are held (one
pass, exact, with a warning); ``checkpointing=True`` is refused there.
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
from torch import nn

WORLD = 2
SIZES = (5, 3)
GROUPS = torch.tensor([0, 0, 1, 1, 2, 2, 1, 3])
STEPS = [51, 52]


class CkMLP(nn.Module):
    """``C.make_mlp`` with its first two layers in a checkpoint region (input without grad)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.net = C.make_mlp(seed)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net[2](torch.tanh(self.net[0](x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        return self.net[4](checkpoint(self.body, x, use_reentrant=False))


class Block(nn.Module):
    """FSDP2's unit: a checkpoint region inside a sharded module (its hooks outside the region)."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(lambda t: torch.tanh(self.lin(t)), x, use_reentrant=False)


class FsdpMLP(nn.Module):
    """``C.make_mlp``'s layers (and values), each hidden layer a sharded block with a region."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        net = C.make_mlp(seed)
        self.blocks = nn.ModuleList([Block(net[0]), Block(net[2])])
        self.out = net[4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.out(x)


def _rank() -> int:
    return int(os.environ["RANK"])


def _batch(seed, sizes, rank):
    b = C.global_batch(seed, sizes)
    b["groups"] = GROUPS if sum(sizes) == len(GROUPS) else torch.arange(sum(sizes)) // 2
    return b if rank is None else C.local_slice(b, sizes, rank)


def _run(model, opob, opt, sizes=SIZES, micro=1, ctx=None):
    import contextlib

    out = []
    for seed in STEPS:
        batch = _batch(seed, sizes, _rank())
        n = len(batch["x"])
        cuts = [round(k * n / micro) for k in range(micro + 1)]
        opt.zero_grad()
        res, deferred = [], []
        for lo, hi in itertools.pairwise(cuts):
            mb = {k: v[lo:hi] for k, v in batch.items()}
            with ctx() if ctx is not None else contextlib.nullcontext():
                loss = C.per_sample_loss(model, mb)
                deferred.append(sum(u.deferred for u in opob._tape))
                res.append(opob.backward(loss, mb["reward"], mb["groups"]))
        opt.step()
        grads = []
        for p in opob.model.parameters():
            g = p.grad
            grads.append(
                None if g is None else (g.full_tensor() if hasattr(g, "full_tensor") else g)
            )
        out.append(
            {
                "sq_norms": torch.cat([r.sq_norms for r in res]),
                "baselines": res[-1].baselines
                if micro > 1
                else torch.cat([r.baselines for r in res]),
                "coefficients": torch.cat([r.coefficients for r in res]),
                "grads": [None if g is None else g.clone() for g in grads],
                "params": C.params_of(opob.model),
                "deferred": deferred,
                "checked": opob._step.separable_checked,
            }
        )
    return out


def _ddp(scope, micro=1):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from vcpo_optim.opob import OPOB

    policy = CkMLP(0)
    model = DDP(policy)
    opob = OPOB(policy, scope=scope)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    return _run(model, opob, opt, micro=micro, ctx=model.no_sync)


def s_ddp_ckpt_group():
    return _ddp("group")


def s_ddp_ckpt_batch_accumulation():
    return _ddp("batch", micro=2)


def s_ddp_ckpt_fault_in_pass1_rank1():
    """A rule failing inside pass 1 on rank 1 only: both ranks raise the same error, no .grad."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from vcpo_optim.opob import OPOB
    from vcpo_optim.opob.rules import RULES

    policy = CkMLP(0)
    model = DDP(policy)
    opob = OPOB(policy, scope="group")
    batch = _batch(STEPS[0], SIZES, _rank())
    rule = RULES[nn.Linear]

    def broken(module, inputs, grad_output):
        if module is policy.net[2]:
            raise ValueError("rule broke on purpose")
        return rule(module, inputs, grad_output)

    if _rank() == 1:
        RULES[nn.Linear] = broken
    try:
        with model.no_sync():
            opob.backward(C.per_sample_loss(model, batch), batch["reward"], batch["groups"])
    except ValueError:
        assert all(p.grad is None for p in policy.parameters())
        assert opob.num_recorded == 0
        raise
    finally:
        RULES[nn.Linear] = rule


def s_ddp_ckpt_loss_mixing_samples_rank0():
    """The first-call per-sample check in the two-pass mode, failing on rank 0 only: both
    ranks raise the same error, no .grad, the check still armed; the next (correct) call
    passes it on both ranks."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from vcpo_optim.opob import OPOB

    policy = CkMLP(0)
    model = DDP(policy)
    opob = OPOB(policy, scope="group")
    batch = _batch(STEPS[0], SIZES, _rank())
    out = {}
    try:
        with model.no_sync():
            loss = C.per_sample_loss(model, batch)
            assert any(u.deferred for u in opob._tape)
            if _rank() == 0:
                loss = loss - loss.mean()
            opob.backward(loss, batch["reward"], batch["groups"])
    except ValueError as exc:
        out["raised"] = str(exc)
    out["grads_none"] = all(p.grad is None for p in policy.parameters())
    out["armed"] = not opob._step.separable_checked
    with model.no_sync():
        opob.backward(C.per_sample_loss(model, batch), batch["reward"], batch["groups"])
    out["checked"] = opob._step.separable_checked
    return out


def _fsdp(checkpointing="auto"):
    import warnings

    from torch.distributed.fsdp import fully_shard

    from vcpo_optim.opob import OPOB

    model = FsdpMLP(0)
    for blk in model.blocks:
        fully_shard(blk)
    fully_shard(model)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opob = OPOB(model, scope="group", checkpointing=checkpointing)
        out = _run(model, opob, torch.optim.SGD(model.parameters(), lr=1e-2))
    out[0]["warnings"] = [str(w.message) for w in rec if "FSDP2" in str(w.message)]
    return out


def s_fsdp_ckpt_auto_holds():
    return _fsdp()


def s_fsdp_ckpt_true_refused():
    _fsdp(checkpointing=True)


SCENARIOS = {name[2:]: fn for name, fn in list(globals().items()) if name.startswith("s_")}

# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def res():
    return launch(__file__, WORLD)


def _oracle_check(got_ranks, scopes_of, make, per_call=True):
    """Every rank's results against the per-sample oracle on the concatenated batch."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "opob"))
    from opob_oracle import oracle

    model = make(0)
    for k, seed in enumerate(STEPS):
        if k:
            with torch.no_grad():
                for p, v in zip(model.parameters(), got_ranks[0][k - 1]["params"]):
                    p.copy_(v)
        gb = _batch(seed, SIZES, None)
        n, b, c, g = oracle(
            model, lambda m, gb=gb: C.per_sample_loss(m, gb), gb["reward"], scopes_of(gb)
        )
        for rank, got in enumerate(got_ranks):
            lo, hi = sum(SIZES[:rank]), sum(SIZES[: rank + 1])
            r = got[k]
            torch.testing.assert_close(r["sq_norms"], n[lo:hi], rtol=1e-9, atol=1e-14)
            if per_call:
                torch.testing.assert_close(r["baselines"], b[lo:hi], rtol=1e-9, atol=1e-12)
                torch.testing.assert_close(r["coefficients"], c[lo:hi], rtol=1e-9, atol=1e-12)
            for (name, _), a in zip(model.named_parameters(), r["grads"]):
                torch.testing.assert_close(a, g[name], rtol=1e-9, atol=1e-12)


def test_ddp_checkpointed_equals_the_per_sample_oracle(res):
    got = values(res, "ddp_ckpt_group")
    assert all(d == [2] for rank in got for step in rank for d in [step["deferred"]])
    assert all(step["checked"] for rank in got for step in rank)  # the first-call check ran
    _oracle_check(got, lambda gb: gb["groups"].tolist(), CkMLP)


def test_ddp_checkpointed_batch_scope_accumulation(res):
    got = values(res, "ddp_ckpt_batch_accumulation")
    assert all(step["deferred"] == [2, 2] for rank in got for step in rank)
    _oracle_check(got, lambda gb: [0] * len(gb["x"]), CkMLP, per_call=False)


def test_failure_in_pass_1_is_raised_on_every_rank(res):
    errs = errors(res, "ddp_ckpt_fault_in_pass1_rank1")
    assert errs[0] == errs[1]
    assert errs[0][0] == "ValueError" and "rank(s) [1]" in errs[0][1]
    assert "rule broke on purpose" in errs[0][1]


def test_loss_mixing_samples_refused_on_every_rank_in_the_two_pass_mode(res):
    got = values(res, "ddp_ckpt_loss_mixing_samples_rank0")
    assert got[0]["raised"] == got[1]["raised"]
    assert "rank(s) [0]" in got[0]["raised"]
    assert "does not depend on row i of the batch alone" in got[0]["raised"]
    assert all(g["grads_none"] and g["armed"] and g["checked"] for g in got)


def test_fsdp2_holds_the_inputs_exactly_and_says_so(res):
    got = values(res, "fsdp_ckpt_auto_holds")
    assert all(step["deferred"] == [0] for rank in got for step in rank)
    assert all(len(rank[0]["warnings"]) == 1 for rank in got)
    _oracle_check(got, lambda gb: gb["groups"].tolist(), FsdpMLP)


def test_fsdp2_refuses_checkpointing_true(res):
    errs = errors(res, "fsdp_ckpt_true_refused")
    assert errs[0] == errs[1]
    assert errs[0][0] == "ValueError" and "FSDP2" in errs[0][1]


if __name__ == "__main__":
    worker_main(SCENARIOS)
