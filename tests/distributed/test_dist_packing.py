"""Packed batches across 2 real gloo ranks: each rank its own packed row and ``cu_seqlens``.

DDP and FSDP2 on the tied-embedding transformer of ``tests/opob``; the norms,
baselines, coefficients and the (global) gradient are compared with the
per-sample oracle over every rank's segments, each run alone (float64). A rank
may be packed while another is not, or have no samples; a bad ``cu_seqlens`` on
one rank makes every rank raise the same error.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from _harness import errors, launch, values, worker_main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "opob"))
from opob_oracle import TinyLM, oracle, rel_err

WORLD = 2
VOCAB = 23
#: per rank: segment lengths (a segment of length 1) and trailing padding tokens
LAYOUT = {0: ([5, 1, 7], 2), 1: ([3, 6], 0)}
GROUPS = torch.tensor([0, 0, 1, 1, 2])  # group 1 straddles the ranks
REWARDS = torch.tensor([1.0, -0.5, 0.25, 2.0, -1.0], dtype=torch.float64)


def _rank() -> int:
    return int(os.environ["RANK"])


def _data(rank):
    """Rank ``rank``'s packed row: ids, targets, loss weights, position ids, cu_seqlens."""
    lengths, pad = LAYOUT[rank]
    g = torch.Generator().manual_seed(100 + rank)
    n = sum(lengths)
    ids = torch.randint(1, VOCAB, (n + pad,), generator=g)
    ids[n:] = 0
    tgt = torch.randint(0, VOCAB, (n + pad,), generator=g)
    w = torch.rand(n + pad, generator=g, dtype=torch.float64)
    w[n:] = 0.0
    pos = torch.cat([torch.arange(k) for k in [*lengths, pad] if k])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return ids, tgt, w, pos, cu


def _offset(rank):
    return sum(len(LAYOUT[r][0]) for r in range(rank))


def _token_loss(logits, tgt, w):
    logp = torch.log_softmax(logits, -1)
    return -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) * w


def _packed_loss(model, rank):
    ids, tgt, w, pos, cu = _data(rank)
    tok = _token_loss(model(ids[None], position_ids=pos[None])[0], tgt, w)
    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu.diff().long())
    return tok.new_zeros(cu.numel() - 1).index_add(0, seg, tok[: int(cu[-1])]), cu


def _padded_loss(model, rank):
    """The same segments unpacked: [B, L_max] with right padding (padding_idx 0)."""
    ids, tgt, w, _, cu = _data(rank)
    lens = cu.diff().tolist()
    t = max(lens)
    bids = torch.zeros(len(lens), t, dtype=torch.long)
    btgt = torch.zeros(len(lens), t, dtype=torch.long)
    bw = torch.zeros(len(lens), t, dtype=torch.float64)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        bids[i, : b - a], btgt[i, : b - a], bw[i, : b - a] = ids[a:b], tgt[a:b], w[a:b]
    return _token_loss(model(bids), btgt, bw).sum(1)


def _model():
    torch.manual_seed(0)
    return TinyLM().double()


class ToyRMSNorm(torch.nn.Module):
    """An RMSNorm written like transformers' (float32 inside): OPOB matches it by structure,
    so its rule is checked against this forward on first use (a replay of the module)."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(1.0 + 0.1 * torch.randn(d))
        self.variance_epsilon = eps

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


def _model_structural_norm():
    model = _model()
    torch.manual_seed(1)
    model.norm = ToyRMSNorm(model.norm.normalized_shape[0]).double()
    return model


def _result(res, model):
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad
        grads[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).clone()
    return {
        "sq_norms": res.sq_norms,
        "baselines": res.baselines,
        "coefficients": res.coefficients,
        "grads": grads,
    }


def _local(rank):
    lo = _offset(rank)
    hi = lo + len(LAYOUT[rank][0])
    return REWARDS[lo:hi], GROUPS[lo:hi]


def s_ddp_packed_group():
    from torch.nn.parallel import DistributedDataParallel as DDP

    from vcpo_optim.opob import OPOB

    policy = _model()
    model = DDP(policy)
    opob = OPOB(policy, scope="group")
    r, g = _local(_rank())
    with model.no_sync():
        loss, cu = _packed_loss(model, _rank())
        res = opob.backward(loss, r, g, cu_seqlens=cu)
    return _result(res, policy)


def s_ddp_packed_and_padded_ranks_median():
    """Rank 0 packed, rank 1 padded [B, T]: each rank's layout is its own business."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from vcpo_optim.opob import OPOB

    policy = _model()
    model = DDP(policy)
    opob = OPOB(policy, scope="batch", agg="median", norm_by_std=True)
    r, _ = _local(_rank())
    with model.no_sync():
        if _rank() == 0:
            loss, cu = _packed_loss(model, 0)
            res = opob.backward(loss, r, cu_seqlens=cu)
        else:
            res = opob.backward(_padded_loss(model, 1), r)
    return _result(res, policy)


def _fully_shard(model):
    """FSDP2 over each block, then the root (parameters become DTensor shards)."""
    from torch.distributed.fsdp import fully_shard

    for blk in model.blocks:
        fully_shard(blk)
    fully_shard(model)
    return model


def s_fsdp_packed_batch():
    from vcpo_optim.opob import OPOB

    model = _fully_shard(_model())
    opob = OPOB(model, scope="batch")
    r, _ = _local(_rank())
    loss, cu = _packed_loss(model, _rank())
    return _result(opob.backward(loss, r, cu_seqlens=cu), model)


def s_fsdp_packed_structural_norm():
    """FSDP2 reshards after the forward: the first-use checks replay the structurally matched
    norm (and check it is position-wise) while its parameter is a DTensor shard."""
    from vcpo_optim.opob import OPOB

    model = _fully_shard(_model_structural_norm())
    opob = OPOB(model, scope="group")
    r, g = _local(_rank())
    loss, cu = _packed_loss(model, _rank())
    return _result(opob.backward(loss, r, g, cu_seqlens=cu), model)


def s_fsdp_padded_structural_norm():
    from vcpo_optim.opob import OPOB

    model = _fully_shard(_model_structural_norm())
    opob = OPOB(model, scope="group")
    r, g = _local(_rank())
    return _result(opob.backward(_padded_loss(model, _rank()), r, g), model)


def s_ddp_packed_empty_rank():
    """Rank 1 has no samples: an empty loss and cu_seqlens [0], no forward."""
    from vcpo_optim.opob import OPOB

    model = _model()
    opob = OPOB(model, scope="group")
    if _rank() == 0:
        r, g = _local(0)
        loss, cu = _packed_loss(model, 0)
        res = opob.backward(loss, r, g, cu_seqlens=cu)
    else:
        empty = torch.zeros(0, dtype=torch.float64, requires_grad=True)
        res = opob.backward(empty, empty.detach(), torch.zeros(0, dtype=torch.long), cu_seqlens=[0])
    return _result(res, model)


def s_fault_bad_cu_seqlens_rank1():
    from vcpo_optim.opob import OPOB

    model = _model()
    opob = OPOB(model, scope="group")
    r, g = _local(_rank())
    loss, cu = _packed_loss(model, _rank())
    if _rank() == 1:
        cu = cu.flip(0)
    opob.backward(loss, r, g, cu_seqlens=cu)


SCENARIOS = {name[2:]: fn for name, fn in list(globals().items()) if name.startswith("s_")}

# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def res():
    return launch(__file__, WORLD)


def _reference(ranks, make=_model, **kw):
    """Oracle over the segments of ``ranks``, each run alone (one backward per sample)."""
    model = make()

    def alone(m):
        out = []
        for rank in ranks:
            ids, tgt, w, _, cu = _data(rank)
            for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
                out.append(_token_loss(m(ids[None, a:b])[0], tgt[a:b], w[a:b]).sum())
        return torch.stack(out)

    lo, hi = _offset(ranks[0]), _offset(ranks[-1]) + len(LAYOUT[ranks[-1]][0])
    r, g = REWARDS[lo:hi], GROUPS[lo:hi]
    scopes = g.tolist() if kw.get("scope", "group") == "group" else [0] * len(r)
    return oracle(model, alone, r, scopes, kw.get("agg", "mean"), kw.get("norm_by_std", False))


def _compare(got, ref, ranks=(0, 1), tol=1e-9):
    ref_n, ref_b, ref_c, ref_g = ref
    for k, rank in enumerate(ranks):
        lo = _offset(rank) - _offset(ranks[0])
        sl = slice(lo, lo + len(LAYOUT[rank][0]))
        assert rel_err(got[k]["sq_norms"], ref_n[sl]) < tol
        assert (got[k]["baselines"] - ref_b[sl]).abs().max() < tol
        assert (got[k]["coefficients"] - ref_c[sl]).abs().max() < tol
    for got_r in got:
        for n, g in got_r["grads"].items():
            assert rel_err(g, ref_g[n]) < tol, n


def test_ddp_packed_group_scope(res):
    _compare(values(res, "ddp_packed_group"), _reference([0, 1], scope="group"))


def test_packed_and_padded_ranks(res):
    ref = _reference([0, 1], scope="batch", agg="median", norm_by_std=True)
    _compare(values(res, "ddp_packed_and_padded_ranks_median"), ref)


def test_fsdp2_packed(res):
    _compare(values(res, "fsdp_packed_batch"), _reference([0, 1], scope="batch"))


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_fsdp2_structural_rule_checked_on_sharded_parameters(res, layout):
    """The norm computes in float32 inside the float64 model, as transformers' norms do."""
    got = values(res, f"fsdp_{layout}_structural_norm")
    _compare(got, _reference([0, 1], make=_model_structural_norm, scope="group"), tol=1e-6)


def test_packed_with_an_empty_rank(res):
    got = values(res, "ddp_packed_empty_rank")
    ref = _reference([0], scope="group")
    _compare(got[:1], ref, ranks=(0,))
    for n, g in got[1]["grads"].items():  # the empty rank receives the global gradient
        assert rel_err(g, ref[3][n]) < 1e-9, n


def test_bad_cu_seqlens_on_one_rank_raises_everywhere(res):
    errs = errors(res, "fault_bad_cu_seqlens_rank1")
    assert [t for t, _ in errs] == ["ValueError", "ValueError"]
    for _, msg in errs:
        assert "rank(s) [1]" in msg and "cu_seqlens" in msg


if __name__ == "__main__":
    worker_main(SCENARIOS)
