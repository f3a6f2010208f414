"""OPOB faults across 2 real gloo ranks, one of them without samples: every rank raises the same error.

Each scenario makes one rank fail somewhere after the first collective of a
backward call (the graph audit, reentrant checkpointing, a rule, the vmap
fallback, a split group, non-finite norms, the gradient write) while the other
rank has an empty batch, or a batch that is fine. Every rank must raise the
same ``ValueError`` naming the failing rank and its cause, nobody may hang (the
harness fails a hang after its collective timeout), and ``.grad`` and the step
state must be unchanged. ``OPOB_FAULT_SCENARIOS=a,b`` runs a subset (debugging).
"""

from __future__ import annotations

import os

import _common as C
import pytest
import torch
import torch.nn.functional as F
from _harness import launch, value, worker_main
from torch import nn

WORLD = 2
DT = torch.float64


def _rank() -> int:
    return int(os.environ["RANK"])


# ----------------------------------------------------------------------------- models


class FunctionalTie(nn.Module):
    """A tied head through F.linear: the audit refuses it."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        ids = x.long().abs() % 10
        return F.linear(torch.tanh(self.lin(self.emb(ids))), self.emb.weight).sum((1, 2))


class Ckpt(nn.Module):
    """Reentrant activation checkpointing on rank 0's forward (refused)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 1)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = torch.tanh(self.a(x.requires_grad_()))
        h = checkpoint(lambda t: torch.tanh(self.b(t)), h, use_reentrant=True)
        return self.c(h).squeeze(-1)


class BrokenRuleScale(nn.Module):
    """A custom module whose registered rule raises a RuntimeError (not a ValueError)."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.ones(4, dtype=DT))

    def forward(self, x):
        return x * self.s


def _broken_rule(module, inputs, grad_output):
    raise RuntimeError("the custom rule broke")


class Gate(nn.Module):
    """Data-dependent control flow: the vmap fallback cannot run it."""

    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.ones(4, dtype=DT))

    def forward(self, x):
        if float(x.detach().sum()) > -1e9:
            return x * self.g
        return x  # pragma: no cover


def _mlp_with(tail: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4).to(DT), tail.to(DT), nn.Linear(4, 1).to(DT))


def _loss(model, x):
    out = model(x)
    return out if out.dim() == 1 else out.reshape(out.shape[0], -1).sum(1)


# ----------------------------------------------------------------------------- driver


def _fault(
    model,
    *,
    sizes=(4, 0),
    opob_kw=None,
    groups=None,
    forward_on_empty=False,
    poison=None,
    before=None,
    mix=False,
    fwd=None,
):
    """One backward call; returns how it ended on this rank, and whether .grad is unchanged.

    ``groups(rank)`` gives the rank's group ids (or None); ``poison(x)`` alters rank 0's
    inputs; ``before(opob)`` runs successful calls first (their gradients are the snapshot);
    ``mix``: rank 0's loss mixes its samples (``l - l.mean()``); ``fwd``: the module whose
    forward runs (e.g. the DDP wrapper of ``model``).
    """
    from vcpo_optim import OPOB

    rank = _rank()
    opob = OPOB(model, **(opob_kw or {}))
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    if before is not None:
        before(opob)
    snap = [p.grad.clone() for p in model.parameters()]
    batch = C.local_slice(C.global_batch(61, sizes), sizes, rank)
    x, r = batch["x"], batch["reward"]
    if rank == 0 and poison is not None:
        x = poison(x.clone())
    if len(x) or forward_on_empty:
        loss = _loss(model if fwd is None else fwd, x)
        if mix and rank == 0:
            loss = loss - loss.mean()
    else:
        loss = torch.zeros(0, dtype=DT, requires_grad=True)
    g = None if groups is None else groups(rank, len(x))
    out = {"raised": None}
    try:
        res = opob.backward(loss, r, g)
        out["sq_norms"] = res.sq_norms
    except Exception as exc:  # recorded, then compared across ranks by the test
        out["raised"] = (type(exc).__name__, str(exc))
    out["grads_same"] = all(torch.equal(p.grad, s) for p, s in zip(model.parameters(), snap))
    out["recorded"] = opob.num_recorded
    out["checked"] = opob._step.separable_checked
    opob.detach()
    return out


def s_loss_mixing_samples_other_rank_fine():
    return _fault(_mlp_with(nn.Tanh()), sizes=(4, 3), mix=True)


def s_loss_mixing_samples_other_rank_empty():
    return _fault(_mlp_with(nn.Tanh()), sizes=(4, 0), mix=True, opob_kw={"agg": "median"})


def s_loss_mixing_samples_under_ddp_batch_scope():
    from torch.nn.parallel import DistributedDataParallel as DDP

    policy = _mlp_with(nn.Tanh())
    ddp = DDP(policy)  # OPOB on the inner module; the forward through DDP (outside no_sync)
    kw = {"scope": "batch", "norm_by_std": True}
    return _fault(policy, sizes=(3, 5), mix=True, opob_kw=kw, fwd=ddp)


def s_audit_tied_head():
    return _fault(FunctionalTie().to(DT))


def s_audit_tied_head_empty_rank_ran_forward():
    return _fault(FunctionalTie().to(DT), forward_on_empty=True)


def s_audit_tied_head_median():
    return _fault(FunctionalTie().to(DT), opob_kw={"agg": "median"})


def s_audit_tied_head_batch_scope_std():
    return _fault(FunctionalTie().to(DT), opob_kw={"scope": "batch", "norm_by_std": True})


def s_reentrant_checkpoint():
    torch.manual_seed(0)
    return _fault(Ckpt().to(DT))


def s_rule_raises():
    from vcpo_optim.opob import register_rule

    register_rule(BrokenRuleScale)(_broken_rule)
    return _fault(_mlp_with(BrokenRuleScale()))


def s_fallback_fails():
    return _fault(_mlp_with(Gate()), opob_kw={"strict": False})


def s_nonfinite_norms_mean():
    return _fault(_mlp_with(nn.Tanh()), poison=lambda x: x.fill_(1e200))


def s_nonfinite_norms_median():
    return _fault(_mlp_with(nn.Tanh()), opob_kw={"agg": "median"}, poison=lambda x: x.fill_(1e200))


def s_nonfinite_norms_both_ranks_have_samples():
    return _fault(_mlp_with(nn.Tanh()), sizes=(4, 3), poison=lambda x: x.fill_(1e200))


def _split_groups(call):
    # call 1: rank 0 has groups 0 and 1; call 2: group 1 again (split); the empty rank passes None
    def groups(rank, n):
        if n == 0:
            return None
        return torch.tensor([0, 0, 1, 1][:n]) if call == 1 else torch.tensor([1, 2, 2, 2][:n])

    return groups


def _first_call(opob):
    rank = _rank()
    batch = C.local_slice(C.global_batch(60, (4, 0)), (4, 0), rank)
    loss = _loss(opob.model, batch["x"]) if rank == 0 else torch.zeros(0, dtype=DT)
    opob.backward(loss, batch["reward"], _split_groups(1)(rank, len(batch["x"])))


def _split_group_empty_rank_none(agg):
    return _fault(
        _mlp_with(nn.Tanh()), opob_kw={"agg": agg}, groups=_split_groups(2), before=_first_call
    )


def s_split_group_empty_rank_passes_none_mean():
    return _split_group_empty_rank_none("mean")


def s_split_group_empty_rank_passes_none_median():
    return _split_group_empty_rank_none("median")


def s_groups_on_one_rank_none_on_the_other():
    return _fault(
        _mlp_with(nn.Tanh()),
        sizes=(4, 3),
        groups=lambda rank, n: torch.arange(n) // 2 if rank == 0 else None,
    )


def s_failure_while_writing_the_gradient():
    """A failure after the statistics exchange (here injected into the weighted sum on rank 0)."""
    from vcpo_optim.opob import engine

    orig = engine.ParamWork.weighted_sum

    def broken(self, coeff):
        if _rank() == 0:
            raise MemoryError("out of memory in the weighted sum")
        return orig(self, coeff)

    engine.ParamWork.weighted_sum = broken
    try:
        return _fault(_mlp_with(nn.Tanh()), sizes=(4, 3))
    finally:
        engine.ParamWork.weighted_sum = orig


def _fsdp2_mlp_with_grads():
    """An FSDP2 MLP with OPOB attached and ``.grad`` preset to 0.25, and a snapshot of the
    local gradient shards (to check that a refused call changes nothing)."""
    from torch.distributed.fsdp import fully_shard

    from vcpo_optim import OPOB

    model = C.make_mlp(0)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opob = OPOB(model)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    return model, opob, [p.grad.to_local().clone() for p in model.parameters()]


def s_failure_while_writing_the_gradient_fsdp2():
    """The same under FSDP2: the flag travels in its own agreement before the reduce-scatter."""
    from vcpo_optim.opob import engine

    model, opob, snap = _fsdp2_mlp_with_grads()
    batch = C.local_slice(C.global_batch(63, (4, 3)), (4, 3), _rank())
    orig = engine.ParamWork.weighted_sum

    def broken(self, coeff):
        if _rank() == 1:
            raise MemoryError("out of memory in the weighted sum")
        return orig(self, coeff)

    engine.ParamWork.weighted_sum = broken
    out = {"raised": None}
    try:
        opob.backward(C.per_sample_loss(model, batch), batch["reward"])
    except Exception as exc:
        out["raised"] = (type(exc).__name__, str(exc))
    finally:
        engine.ParamWork.weighted_sum = orig
    out["grads_same"] = all(
        torch.equal(p.grad.to_local(), s) for p, s in zip(model.parameters(), snap)
    )
    return out


def _fsdp2_mixing(sizes):
    """FSDP2, rank 0's loss mixing its samples (l - l.mean()), then a correct call."""
    model, opob, snap = _fsdp2_mlp_with_grads()
    batch = C.local_slice(C.global_batch(63, sizes), sizes, _rank())
    out = {"raised": None}
    try:
        loss = C.per_sample_loss(model, batch)  # the empty rank runs its forward (FSDP2 needs it)
        if _rank() == 0:
            loss = loss - loss.mean()
        opob.backward(loss, batch["reward"])
    except Exception as exc:
        out["raised"] = (type(exc).__name__, str(exc))
    out["grads_same"] = all(
        torch.equal(p.grad.to_local(), s) for p, s in zip(model.parameters(), snap)
    )
    out["armed"] = not opob._step.separable_checked
    opob.backward(C.per_sample_loss(model, batch), batch["reward"])  # correct: passes
    out["checked"] = opob._step.separable_checked
    return out


def s_fsdp2_loss_mixing_samples_rank0():
    return _fsdp2_mixing((4, 3))


def s_fsdp2_loss_mixing_samples_other_rank_empty():
    return _fsdp2_mixing((4, 0))


def s_invalid_input_on_the_empty_rank():
    """Rewards of length 2 with an empty loss on rank 1."""
    from vcpo_optim import OPOB

    model = _mlp_with(nn.Tanh())
    opob = OPOB(model)
    x = torch.randn(4, 4, dtype=DT)
    loss = _loss(model, x) if _rank() == 0 else torch.zeros(0, dtype=DT)
    try:
        opob.backward(loss, torch.randn(4 if _rank() == 0 else 2, dtype=DT))
    except ValueError as exc:
        return {"raised": ("ValueError", str(exc)), "grads_same": model[0].weight.grad is None}
    return {"raised": None}


def s_batch_scope_failed_call_leaves_the_step_intact():
    """scope="batch": call 1 fine, call 2 fails on rank 0 (rank 1 empty), call 3 fine.

    The gradient after call 3 must be the one over calls 1 and 3 (per-sample oracle).
    """
    from vcpo_optim import OPOB

    rank = _rank()
    model = _mlp_with(nn.Tanh())
    opob = OPOB(model, scope="batch", norm_by_std=True)
    gb = C.global_batch(62, (5, 3))
    x, r = gb["x"], gb["reward"] + 0.3 * gb["y"]
    # (rank 0's slice, rank 1's slice) of the global batch in each of the three calls
    plan = [((0, 3), (3, 5)), ((5, 7), None), ((7, 8), None)]
    mine = [r0 if rank == 0 else r1 for r0, r1 in plan]
    errors = []
    for k, sl in enumerate(mine):
        if sl is None:
            loss, rr = torch.zeros(0, dtype=DT), torch.zeros(0, dtype=DT)
        else:
            xx = x[sl[0] : sl[1]].clone()
            if k == 1:
                xx.fill_(1e200)  # non-finite norms on rank 0 in call 2
            loss, rr = _loss(model, xx), r[sl[0] : sl[1]]
        try:
            opob.backward(loss, rr)
        except ValueError as exc:
            errors.append(str(exc))
    return {"errors": errors, "grads": [p.grad.clone() for p in model.parameters()]}


_ALL = {name[2:]: fn for name, fn in list(globals().items()) if name.startswith("s_")}
_ONLY = os.environ.get("OPOB_FAULT_SCENARIOS")
SCENARIOS = {k: v for k, v in _ALL.items() if not _ONLY or k in _ONLY.split(",")}

# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def res():
    return launch(__file__, WORLD)


def _same_error_everywhere(res, name, *needles, ranks=(0,)):
    got = [value(res, name, k) for k in range(WORLD)]
    raised = [g["raised"] for g in got]
    assert all(e is not None for e in raised), f"{name}: a rank did not raise: {raised}"
    assert raised[0] == raised[1], f"{name}: ranks raised different errors:\n{raised}"
    kind, msg = raised[0]
    assert kind == "ValueError", (name, kind, msg)
    assert f"rank(s) {list(ranks)}" in msg, (name, msg)
    for needle in needles:
        assert needle in msg, (name, needle, msg)
    for g in got:
        assert g["grads_same"], f"{name}: .grad changed"
        assert g.get("recorded", 0) == 0, f"{name}: activations kept"


def test_loss_mixing_samples_on_one_rank_is_refused_everywhere(res):
    """The first-call per-sample check runs on every rank under a process group; a failure
    on one rank rides in the next collective: every rank raises the same error, .grad is
    unchanged and the check stays armed on every rank (the call was refused)."""
    for name in (
        "loss_mixing_samples_other_rank_fine",
        "loss_mixing_samples_other_rank_empty",
        "loss_mixing_samples_under_ddp_batch_scope",
    ):
        _same_error_everywhere(res, name, "does not depend on row i of the batch alone")
        assert not any(value(res, name, k)["checked"] for k in range(WORLD)), name


def test_loss_mixing_samples_on_one_rank_is_refused_everywhere_under_fsdp2(res):
    """FSDP2: every rank runs the check's extra backward (its all-gathers match), whatever its
    B; the refusal is agreed, nothing changes, and a correct call then passes on every rank."""
    for name in ("fsdp2_loss_mixing_samples_rank0", "fsdp2_loss_mixing_samples_other_rank_empty"):
        _same_error_everywhere(res, name, "does not depend on row i of the batch alone")
        got = [value(res, name, k) for k in range(WORLD)]
        assert all(g["armed"] and g["checked"] for g in got), (name, got)


def test_audit_refusal_reaches_the_empty_rank(res):
    _same_error_everywhere(res, "audit_tied_head", "emb.weight", "F.linear")
    _same_error_everywhere(res, "audit_tied_head_median", "emb.weight")
    _same_error_everywhere(res, "audit_tied_head_batch_scope_std", "emb.weight")


def test_empty_rank_that_ran_a_forward_is_audited_too(res):
    _same_error_everywhere(
        res, "audit_tied_head_empty_rank_ran_forward", "emb.weight", ranks=(0, 1)
    )


def test_reentrant_checkpoint_refusal_reaches_the_empty_rank(res):
    _same_error_everywhere(res, "reentrant_checkpoint", "use_reentrant=False")


def test_a_rule_raising_reaches_the_empty_rank(res):
    _same_error_everywhere(
        res,
        "rule_raises",
        "the per-sample rule for module '1' (BrokenRuleScale) failed: RuntimeError: the custom rule broke",
    )


def test_fallback_failure_reaches_the_empty_rank(res):
    _same_error_everywhere(res, "fallback_fails", "fallback failed for module '1' (Gate)")


def test_nonfinite_norms_reach_the_empty_rank(res):
    for name in ("nonfinite_norms_mean", "nonfinite_norms_median"):
        _same_error_everywhere(res, name, "non-finite per-sample gradient norms")
    _same_error_everywhere(
        res, "nonfinite_norms_both_ranks_have_samples", "non-finite per-sample gradient norms"
    )


def test_split_group_with_groups_none_on_the_empty_rank(res):
    for name in (
        "split_group_empty_rank_passes_none_mean",
        "split_group_empty_rank_passes_none_median",
    ):
        got = [value(res, name, k) for k in range(WORLD)]
        raised = [g["raised"] for g in got]
        assert raised[0] == raised[1] and raised[0] is not None, (name, raised)
        assert raised[0][0] == "ValueError" and "split group" in raised[0][1]
        assert all(g["grads_same"] for g in got)


def test_groups_on_some_ranks_only_is_refused_everywhere(res):
    got = [value(res, "groups_on_one_rank_none_on_the_other", k) for k in range(WORLD)]
    raised = [g["raised"] for g in got]
    assert raised[0] == raised[1] and raised[0][0] == "ValueError", raised
    assert "rank(s) [0] passed group ids but rank(s) [1] passed groups=None" in raised[0][1]
    assert all(g["grads_same"] for g in got)


def test_failure_while_writing_the_gradient_reaches_every_rank(res):
    _same_error_everywhere(
        res, "failure_while_writing_the_gradient", "out of memory in the weighted sum"
    )


def test_failure_while_writing_the_gradient_under_fsdp2(res):
    _same_error_everywhere(
        res, "failure_while_writing_the_gradient_fsdp2", "out of memory", ranks=(1,)
    )


def test_invalid_input_on_the_empty_rank(res):
    got = [value(res, "invalid_input_on_the_empty_rank", k) for k in range(WORLD)]
    assert got[0]["raised"] == got[1]["raised"]
    assert "invalid input on rank(s) [1]" in got[0]["raised"][1]
    assert all(g["grads_same"] for g in got)


def test_failed_call_leaves_the_batch_scope_step_intact(res):
    """After a failed call, the step continues as if it had not happened (per-sample oracle)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "opob"))
    from opob_oracle import oracle

    got = [value(res, "batch_scope_failed_call_leaves_the_step_intact", k) for k in range(WORLD)]
    assert got[0]["errors"] == got[1]["errors"] and len(got[0]["errors"]) == 1
    assert "non-finite per-sample gradient norms on rank(s) [0]" in got[0]["errors"][0]
    gb = C.global_batch(62, (5, 3))
    keep = torch.tensor([0, 1, 2, 3, 4, 7])  # calls 1 and 3
    x, r = gb["x"][keep], (gb["reward"] + 0.3 * gb["y"])[keep]
    model = _mlp_with(nn.Tanh())
    _, _, _, ref = oracle(model, lambda m: _loss(m, x), r, [0] * len(keep), norm_by_std=True)
    for g in got:
        for (n, _), a in zip(model.named_parameters(), g["grads"]):
            torch.testing.assert_close(a, ref[n], rtol=1e-9, atol=1e-12)


if __name__ == "__main__":
    worker_main(SCENARIOS)
