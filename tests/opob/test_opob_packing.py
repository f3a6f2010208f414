"""Packed (padding-free) batches: ``opob.backward(..., cu_seqlens=cu)`` against the per-segment loop.

The oracle runs every segment alone, as its own unpacked sample ``[1, L_i]`` with
positions ``0..L_i-1``, and takes one backward per sample in float64; OPOB runs the
packed row ``[1, N]`` (position ids restarting at each segment, block-diagonal
causal attention, trailing padding after ``cu_seqlens[-1]``) once.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from opob_oracle import MLP, Block, TinyLM, oracle, rel_err
from torch import nn

from vcpo_optim.opob import OPOB
from vcpo_optim.opob.engine import ParamWork
from vcpo_optim.opob.rules.base import Dense, Softmax

VOCAB = 23


def _packed_case(lengths, pad, seed=0):
    """Segments of ``lengths`` packed in one row, ``pad`` padding tokens after them."""
    g = torch.Generator().manual_seed(seed)
    n_tok = sum(lengths)
    ids = torch.randint(1, VOCAB, (n_tok + pad,), generator=g)
    ids[n_tok:] = 0  # padding_idx
    tgt = torch.randint(0, VOCAB, (n_tok + pad,), generator=g)
    w = torch.rand(n_tok + pad, generator=g, dtype=torch.float64)
    w[::4] = 0.0  # masked positions (e.g. prompt tokens)
    w[n_tok:] = 0.0  # padding is never in the loss
    pos = torch.cat([torch.arange(n) for n in [*lengths, pad] if n])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return ids, tgt, w, pos, cu


def _token_loss(logits, tgt, w):
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
    return -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) * w.to(logp.dtype)


def _packed_loss(model, ids, tgt, w, pos, cu):
    """Per-segment loss from one packed forward: ``l_i = sum_{t in segment i} w_t nll_t``."""
    tok = _token_loss(model(ids[None], position_ids=pos[None])[0], tgt, w)
    b = cu.numel() - 1
    seg = torch.repeat_interleave(torch.arange(b), cu.diff().long())
    return tok.new_zeros(b).index_add(0, seg, tok[: int(cu[-1])])


def _alone_loss(ids, tgt, w, cu):
    """The oracle's loss: every segment run alone (its own unpacked sample)."""

    def fn(model):
        out = []
        for i in range(cu.numel() - 1):
            lo, hi = int(cu[i]), int(cu[i + 1])
            if hi == lo:  # a sample without tokens: l_i = 0, no gradient
                out.append(0.0 * model.tok.weight.sum())
                continue
            logits = model(ids[None, lo:hi])[0]
            out.append(_token_loss(logits, tgt[lo:hi], w[lo:hi]).sum())
        return torch.stack(out)

    return fn


def _check(res, ref, model, tol):
    ref_n, ref_b, ref_c, ref_g = ref
    assert rel_err(res.sq_norms, ref_n) < tol
    assert (res.baselines.double() - ref_b).abs().max() < tol * (1 + ref_b.abs().max())
    assert (res.coefficients.double() - ref_c).abs().max() < tol * (1 + ref_c.abs().max())
    for n, p in model.named_parameters():
        assert rel_err(p.grad, ref_g[n]) < tol, n


LENGTHS = [5, 1, 7, 3, 6, 2]  # different lengths, a segment of length 1


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize(
    "scope,agg,norm_by_std",
    [("group", "mean", False), ("batch", "median", True), ("group", "median", True)],
)
def test_tinylm_packed_matches_segments_alone(dtype, tol, scope, agg, norm_by_std):
    torch.manual_seed(0)
    model = TinyLM().to(dtype)
    ids, tgt, w, pos, cu = _packed_case(LENGTHS, pad=3)
    rewards = torch.tensor([0.5, -1.0, 2.0, 0.25, 1.5, -0.3], dtype=dtype)
    groups = torch.tensor([7, 7, 7, 2, 2, 2])
    scopes = groups.tolist() if scope == "group" else [0] * len(LENGTHS)
    ref = oracle(model, _alone_loss(ids, tgt, w, cu), rewards, scopes, agg, norm_by_std)
    model.zero_grad(set_to_none=True)
    with OPOB(model, scope=scope, agg=agg, norm_by_std=norm_by_std) as opob:
        loss = _packed_loss(model, ids, tgt, w, pos, cu)
        res = opob.backward(loss, rewards, groups, cu_seqlens=cu)
        assert opob.num_recorded == 0
    _check(res, ref, model, tol)


@pytest.mark.parametrize("strategy", ["ghost", "direct", "acc"])
def test_every_strategy_packed(monkeypatch, strategy):
    """Each norm/write strategy reads the packed factors (zero-length segment, no padding)."""
    orig = ParamWork.choose

    def forced(self, batch, n_scopes, n_writes):
        best = orig(self, batch, n_scopes, n_writes)
        if strategy == "ghost" and any(isinstance(f, Dense) for f in self.factors):
            return best
        self.strategy = strategy
        return strategy

    monkeypatch.setattr(ParamWork, "choose", forced)
    torch.manual_seed(1)
    model = TinyLM().double()
    lengths = [4, 0, 1, 6, 3]
    ids, tgt, w, pos, cu = _packed_case(lengths, pad=0, seed=1)
    rewards = torch.tensor([1.0, 0.0, -2.0, 0.5, 0.75], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1, 1])
    ref = oracle(model, _alone_loss(ids, tgt, w, cu), rewards, groups.tolist(), "mean", True)
    with OPOB(model, norm_by_std=True) as opob:
        res = opob.backward(
            _packed_loss(model, ids, tgt, w, pos, cu), rewards, groups, cu_seqlens=cu.tolist()
        )
    assert float(res.sq_norms[1]) == 0.0  # the zero-length segment
    _check(res, ref, model, 1e-9)


def test_flat_token_layout_and_accumulation():
    """Records of ``[N, k]`` tokens (no leading 1), and two packed calls in one step (batch scope)."""
    torch.manual_seed(2)
    model = MLP().double()
    calls = [([3, 1, 4], 2), ([2, 5], 0)]
    xs, cus, rs = [], [], []
    for lengths, pad in calls:
        xs.append(torch.randn(sum(lengths) + pad, 7, dtype=torch.float64))
        cus.append(torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()]))
        rs.append(torch.randn(len(lengths), dtype=torch.float64))

    def seg_loss(out, cu):
        tok = (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum(-1) + out.pow(
            2
        ).sum(-1)
        seg = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu.diff())
        return tok.new_zeros(cu.numel() - 1).index_add(0, seg, tok[: int(cu[-1])])

    def alone(model):
        return torch.cat(
            [
                torch.stack(
                    [
                        seg_loss(model(x[lo:hi]), torch.tensor([0, hi - lo]))[0]
                        for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist())
                    ]
                )
                for x, cu in zip(xs, cus)
            ]
        )

    r_all = torch.cat(rs)
    ref = oracle(model, alone, r_all, [0] * r_all.numel())
    with OPOB(model, scope="batch") as opob:
        for x, cu, r in zip(xs, cus, rs):
            opob.backward(seg_loss(model(x), cu), r, cu_seqlens=cu)
    for n, p in model.named_parameters():
        assert rel_err(p.grad, ref[3][n]) < 1e-9, n


# ----------------------------------------------------------------------------- refusals


def _snapshot(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _unchanged(model, snap):
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, snap[n]), n


def _lm_with_grads():
    torch.manual_seed(0)
    model = TinyLM().double()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


@pytest.mark.parametrize(
    "cu,match",
    [
        ([0.0, 5.0, 6.0, 13.0, 16.0, 22.0, 24.0], "must hold integers"),
        ([0, 5, 6, 13, 16, 22], r"shape \[B \+ 1\] = \[7\]"),
        ([1, 5, 6, 13, 16, 22, 24], r"cu_seqlens\[0\] must be 0"),
        ([0, 5, 6, 13, 12, 22, 24], r"non-decreasing.*cu_seqlens\[4\] = 12"),
        ([0, 5, 6, 13, 16, 22, 28], r"cu_seqlens\[-1\] = 28"),
        ("abc", "integer tensor or a sequence"),
    ],
)
def test_bad_cu_seqlens_refused(cu, match):
    model = _lm_with_grads()
    snap = _snapshot(model)
    ids, tgt, w, pos, good = _packed_case(LENGTHS, pad=3)
    with OPOB(model) as opob:
        loss = _packed_loss(model, ids, tgt, w, pos, good)
        with pytest.raises(ValueError, match=match):
            opob.backward(loss, torch.ones(6), cu_seqlens=cu)
        assert opob.num_recorded == 0
    _unchanged(model, snap)


def test_padding_that_reaches_the_loss_refused():
    model = _lm_with_grads()
    snap = _snapshot(model)
    ids, tgt, w, pos, cu = _packed_case(LENGTHS, pad=3)
    w[-2] = 1.0  # a padding token in the loss: it belongs to no sample
    with OPOB(model) as opob:
        tok = _token_loss(model(ids[None], position_ids=pos[None])[0], tgt, w)
        seg = torch.repeat_interleave(torch.arange(6), cu.diff().long())
        loss = tok.new_zeros(6).index_add(0, seg, tok[:24]) + tok[24:].sum() / 6
        with pytest.raises(ValueError, match=r"after cu_seqlens\[-1\] = 24 \(padding, 3 of"):
            opob.backward(loss, torch.ones(6), cu_seqlens=cu)
    _unchanged(model, snap)


class _Pooled(nn.Module):
    """Token layers, then a per-sample head on segment means ([B, d]): not packed tokens."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Linear(3, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x, cu):
        h = torch.tanh(self.tok(x))  # [1, N, 4]
        pooled = torch.stack([h[0, a:b].mean(0) for a, b in itertools.pairwise(cu)])
        return self.head(pooled).squeeze(-1)


class _ConvLM(nn.Module):
    def __init__(self, mixer):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.mixer = mixer
        self.out = nn.Linear(4, 1)

    def forward(self, x):  # x: [1, N, 3]
        h = self.inp(x)
        if isinstance(self.mixer, nn.MultiheadAttention):
            h = self.mixer(h, h, h, need_weights=False)[0]
        elif isinstance(self.mixer, nn.LayerNorm):
            h = self.mixer(h)
        else:  # channels-first mixers: [1, 4, N]
            h = self.mixer(h.transpose(1, 2)).transpose(1, 2)
        return self.out(h)[..., 0]  # [1, N]


@pytest.mark.parametrize(
    "mixer,match",
    [
        (
            nn.Conv1d(4, 4, 3, padding=1),
            r"'mixer' \(Conv1d.*not token-local|token-local.*'mixer' \(Conv1d",
        ),
        (nn.GroupNorm(2, 4), r"'mixer' \(GroupNorm"),
        (nn.MultiheadAttention(4, 2, batch_first=True), r"'mixer' \(MultiheadAttention"),
        (nn.LayerNorm((9, 4)), r"must not normalise over the token dimension.*'mixer' \(LayerNorm"),
    ],
)
@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_position_mixing_modules_refused(mixer, match):
    torch.manual_seed(0)
    model = _ConvLM(mixer).double()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    snap = _snapshot(model)
    x = torch.randn(1, 9, 3, dtype=torch.float64)
    cu = torch.tensor([0, 4, 9])
    with OPOB(model) as opob:
        tok = model(x)[0]
        loss = torch.stack([tok[:4].sum(), tok[4:].sum()])
        with pytest.raises(ValueError, match=match):
            opob.backward(loss, torch.tensor([1.0, -1.0]), cu_seqlens=cu)
        assert opob.num_recorded == 0
    _unchanged(model, snap)
    if isinstance(mixer, nn.LayerNorm):
        return
    # the same model unpacked ([B, T, ...]) is fine
    with OPOB(model) as opob:
        opob.backward(model(x.view(3, 3, 3)).sum(1), torch.tensor([1.0, -1.0, 0.5]))


def test_fallback_modules_refused_under_packing():
    class Gain(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.g

    model = nn.Sequential(nn.Linear(3, 4), Gain(), nn.Linear(4, 1))
    x = torch.randn(1, 5, 3)
    with OPOB(model, strict=False) as opob:
        tok = model(x)[0, :, 0]
        with pytest.raises(ValueError, match=r"'1' \(Gain.*token-local"):
            opob.backward(
                torch.stack([tok[:2].sum(), tok[2:].sum()]), [1.0, 0.0], cu_seqlens=[0, 2, 5]
            )
    assert all(p.grad is None for p in model.parameters())


def test_per_sample_module_in_a_packed_call_refused():
    torch.manual_seed(0)
    model = _Pooled()
    x = torch.randn(1, 7, 3)
    cu = [0, 3, 4, 7]
    with OPOB(model) as opob:
        loss = model(x, cu)
        with pytest.raises(
            ValueError, match=r"one N >= cu_seqlens\[-1\] = 7.*'head' \(Linear: input \[3, 4\]"
        ):
            opob.backward(loss, [1.0, 0.0, 2.0], cu_seqlens=cu)
    assert all(p.grad is None for p in model.parameters())


def test_unpacked_records_with_packed_cu_refused():
    """cu_seqlens passed for a padded [B, T] forward: the token count does not fit."""
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(3, 4, 7)
    with OPOB(model) as opob:
        loss = model(x).sum((1, 2))
        with pytest.raises(ValueError, match=r"Token counts seen: \[3\]"):
            opob.backward(loss, [1.0, 0.0, 2.0], cu_seqlens=[0, 4, 8, 12])
    assert all(p.grad is None for p in model.parameters())


def test_records_that_miss_the_loss_are_dropped():
    """A call of a hooked module whose output never reaches the loss (other shape) is ignored."""
    torch.manual_seed(0)
    model = MLP().double()
    x = torch.randn(6, 7, dtype=torch.float64)
    cu = torch.tensor([0, 2, 6])

    def loss_of(m):
        m.l1(torch.eye(7, dtype=torch.float64)).detach()  # PEFT DoRA does this with lora_A
        tok = m(x).sum(-1)
        return torch.stack([tok[:2].sum(), tok[2:].sum()])

    r = torch.tensor([1.0, -0.5], dtype=torch.float64)

    def alone(m):
        return torch.stack([m(x[a:b]).sum() for a, b in [(0, 2), (2, 6)]])

    ref = oracle(model, alone, r, [0, 0])
    with OPOB(model) as opob:
        res = opob.backward(loss_of(model), r, cu_seqlens=cu)
    assert rel_err(res.sq_norms, ref[0]) < 1e-9
    for n, p in model.named_parameters():
        assert rel_err(p.grad, ref[3][n]) < 1e-9, n


# ----------------------------------------------------------------------------- the lean head


class _LeanPacked(nn.Module):
    """Tied embedding, a transformer block (block-diagonal when packed), the lean head with a bias."""

    def __init__(self, vocab: int = 29, d: int = 12) -> None:
        super().__init__()
        from vcpo_optim.lm_head import TokenLogProbs

        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(16, d)
        self.block = Block(d, 2, nn.RMSNorm)
        self.norm = nn.LayerNorm(d)
        bias = nn.Parameter(torch.randn(vocab) * 0.2)  # the head's own
        self.head = TokenLogProbs(self.tok.weight, bias, vocab_chunk=8, chunk_size=64)

    def forward(self, ids, tgt, position_ids=None):
        t = ids.shape[1]
        pos = torch.arange(t)[None] if position_ids is None else position_ids
        seg = torch.cat([torch.ones_like(pos[:, :1]), pos[:, 1:] - pos[:, :-1] != 1], 1).cumsum(1)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        mask = (causal & (seg[:, :, None] == seg[:, None, :]))[:, None]
        h = self.norm(self.block(self.tok(ids) + self.pos(pos), None, mask))
        lp, ent = self.head(h, tgt, return_entropy=True).unbind(-1)
        return -lp - 0.1 * ent  # per-token loss


@pytest.mark.parametrize("strategy", ["ghost", "vchunk"])
def test_lean_head_packed(monkeypatch, strategy):
    """TokenLogProbs (token_local='padded') tied to a packed embedding (Segmented Rows partner)."""
    orig = ParamWork.choose

    def forced(self, batch, n_scopes, n_writes):
        best = orig(self, batch, n_scopes, n_writes)
        if any(isinstance(f, Softmax) for f in self.factors):
            self.strategy = strategy
            return strategy
        return best

    monkeypatch.setattr(ParamWork, "choose", forced)
    torch.manual_seed(3)
    model = _LeanPacked().double()
    lengths = [4, 1, 6, 3]
    ids, tgt, w, pos, cu = _packed_case(lengths, pad=2, seed=3)
    tgt = tgt % 29
    rewards = torch.tensor([1.0, -0.5, 0.25, 2.0], dtype=torch.float64)

    def seg_sum(tok):
        seg = torch.repeat_interleave(torch.arange(len(lengths)), cu.diff().long())
        return tok.new_zeros(len(lengths)).index_add(0, seg, tok[: int(cu[-1])] * w[: int(cu[-1])])

    def alone(m):
        return torch.stack(
            [
                (m(ids[None, a:b], tgt[None, a:b])[0] * w[a:b]).sum()
                for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())
            ]
        )

    ref = oracle(model, alone, rewards, [0] * 4, "mean", True)
    with OPOB(model, scope="batch", norm_by_std=True) as opob:
        res = opob.backward(
            seg_sum(model(ids[None], tgt[None], pos[None])[0]), rewards, cu_seqlens=cu
        )
    _check(res, ref, model, 1e-9)


def test_bf16_autocast_packed_equals_padded():
    """Under bf16 autocast the packed call agrees with the same segments padded to [B, L_max]."""
    torch.manual_seed(4)
    model = TinyLM()
    ids, tgt, w, pos, cu = _packed_case(LENGTHS, pad=2, seed=4)
    lens = cu.diff().tolist()
    t = max(lens)
    bids = torch.zeros(len(lens), t, dtype=torch.long)
    btgt = torch.zeros(len(lens), t, dtype=torch.long)
    bw = torch.zeros(len(lens), t, dtype=torch.float64)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        bids[i, : b - a], btgt[i, : b - a], bw[i, : b - a] = ids[a:b], tgt[a:b], w[a:b]
    rewards = torch.linspace(-1, 1, len(lens))
    out = {}
    for packed in (True, False):
        model.zero_grad(set_to_none=True)
        with OPOB(model) as opob, torch.autocast("cpu", dtype=torch.bfloat16):
            if packed:
                res = opob.backward(
                    _packed_loss(model, ids, tgt, w, pos, cu), rewards, cu_seqlens=cu
                )
            else:
                loss = _token_loss(model(bids), btgt, bw).sum(1)
                res = opob.backward(loss, rewards)
        out[packed] = (res.sq_norms, [p.grad.clone() for p in model.parameters()])
    assert out[True][0].dtype == torch.float32
    assert rel_err(out[True][0], out[False][0]) < 1e-2
    for a, b in zip(out[True][1], out[False][1]):
        assert rel_err(a, b) < 1e-2


def _padded_batch(ids, tgt, w, cu):
    lens = cu.diff().tolist()
    t = max(lens)
    bids = torch.zeros(len(lens), t, dtype=torch.long)
    btgt = torch.zeros(len(lens), t, dtype=torch.long)
    bw = torch.zeros(len(lens), t, dtype=torch.float64)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        bids[i, : b - a], btgt[i, : b - a], bw[i, : b - a] = ids[a:b], tgt[a:b], w[a:b]
    return bids, btgt, bw


def test_controls_packed_equal_padded():
    """Clipping, norm_weights and the noise scale see the same per-trajectory norms when packed."""
    torch.manual_seed(5)
    model = TinyLM().double()
    ids, tgt, w, pos, cu = _packed_case(LENGTHS, pad=3, seed=5)
    bids, btgt, bw = _padded_batch(ids, tgt, w, cu)
    rewards = torch.tensor([0.5, -1.0, 2.0, 0.25, 1.5, -0.3], dtype=torch.float64)
    groups = torch.tensor([7, 7, 7, 2, 2, 2])
    m = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.0, 3.0], dtype=torch.float64)
    out = {}
    for packed in (True, False):
        model.zero_grad(set_to_none=True)
        with OPOB(model, max_sample_grad_norm=20.0) as opob:
            if packed:
                loss = _packed_loss(model, ids, tgt, w, pos, cu)
                res = opob.backward(loss, rewards, groups, norm_weights=m, cu_seqlens=cu)
            else:
                loss = _token_loss(model(bids), btgt, bw).sum(1)
                res = opob.backward(loss, rewards, groups, norm_weights=m)
        out[packed] = (res, {n: p.grad.clone() for n, p in model.named_parameters()})
    (rp, gp), (rb, gb) = out[True], out[False]
    assert 0 < int(rb.num_clipped) < len(LENGTHS), int(rb.num_clipped)  # some clipped, not all
    for f in ("sq_norms", "baselines", "coefficients", "clip_factors"):
        assert rel_err(getattr(rp, f), getattr(rb, f)) < 1e-9, f
    assert abs(float(rp.noise_scale) / float(rb.noise_scale) - 1) < 1e-9
    for n in gb:
        assert rel_err(gp[n], gb[n]) < 1e-9, n


class _CkPacked(TinyLM):
    """TinyLM with its blocks in non-reentrant checkpoint regions (block 0 called twice)."""

    def forward(self, ids, expand_pos=True, position_ids=None):
        from torch.utils.checkpoint import checkpoint

        t = ids.shape[1]
        pos = torch.arange(t)[None] if position_ids is None else position_ids
        seg = torch.cat([torch.ones_like(pos[:, :1]), pos[:, 1:] - pos[:, :-1] != 1], 1).cumsum(1)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        mask = (causal & (seg[:, :, None] == seg[:, None, :]))[:, None]
        x = self.tok(ids) + self.pos(pos)

        def twice(x):
            return self.blocks[0](self.blocks[0](x, None, mask), None, mask)

        x = checkpoint(twice, x, use_reentrant=False)
        for blk in self.blocks[1:]:
            x = checkpoint(blk, x, None, mask, use_reentrant=False)
        return self.head(self.norm(x))


@pytest.mark.parametrize("scope", ["group", "batch"])
def test_packed_with_activation_checkpointing(scope):
    """The two passes of checkpointed calls (inputs captured in the recomputation) read packed
    records too: tied weights and a block called twice accumulate their uses per segment."""
    torch.manual_seed(6)
    model = _CkPacked(layers=3).double()
    ids, tgt, w, pos, cu = _packed_case(LENGTHS, pad=3, seed=6)
    rewards = torch.tensor([0.5, -1.0, 2.0, 0.25, 1.5, -0.3], dtype=torch.float64)
    groups = torch.tensor([7, 7, 7, 2, 2, 2])
    scopes = groups.tolist() if scope == "group" else [0] * len(LENGTHS)
    ref = oracle(model, _alone_loss(ids, tgt, w, cu), rewards, scopes, "mean", True)
    model.zero_grad(set_to_none=True)
    with OPOB(model, scope=scope, norm_by_std=True) as opob:
        loss = _packed_loss(model, ids, tgt, w, pos, cu)
        deferred = [u for u in opob._tape if u.deferred]
        assert deferred and all(u.args == () for u in deferred)  # the two-pass path
        res = opob.backward(loss, rewards, groups, cu_seqlens=cu)
    _check(res, ref, model, 1e-9)


def test_padding_in_the_loss_refused_under_checkpointing():
    torch.manual_seed(6)
    model = _CkPacked(layers=2).double()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    snap = _snapshot(model)
    ids, tgt, w, pos, cu = _packed_case(LENGTHS, pad=3, seed=6)
    w[25] = 1.0  # a padding token in the loss
    with OPOB(model) as opob:
        tok = _token_loss(model(ids[None], position_ids=pos[None])[0], tgt, w)
        seg = torch.repeat_interleave(torch.arange(6), cu.diff().long())
        loss = tok.new_zeros(6).index_add(0, seg, tok[:24]) + tok[25]
        with pytest.raises(ValueError, match=r"after cu_seqlens\[-1\] = 24"):
            opob.backward(loss, torch.ones(6, dtype=torch.float64), cu_seqlens=cu)
    _unchanged(model, snap)


class _MixRMSNorm(nn.Module):
    """Looks like a transformers RMSNorm (matched by structure: float32 statistics, as the
    built-in structural rule assumes) but normalises over the tokens too."""

    dims: tuple[int, ...] = (-2, -1)

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(d))
        self.eps = 1e-6

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(self.dims, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class _OwnRMSNorm(_MixRMSNorm):
    dims = (-1,)


@pytest.mark.parametrize("strict", [True, False])
def test_structural_look_alike_that_mixes_positions_refused(strict):
    """The first-use gradient check runs on the token view, where every token is alone; the
    position-wise check (forward on the packed row vs on the tokens one at a time) catches it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _MixRMSNorm(4), nn.Linear(4, 1)).double()
    x = torch.randn(1, 9, 3, dtype=torch.float64)
    with OPOB(model, strict=strict) as opob:
        tok = model(x)[0, :, 0]
        loss = torch.stack([tok[:4].sum(), tok[4:].sum()])
        with pytest.raises(ValueError, match=r"'1' \(_MixRMSNorm.*is not position-wise"):
            opob.backward(loss, [1.0, -1.0], cu_seqlens=[0, 4, 9])
    assert all(p.grad is None for p in model.parameters())
    # a position-wise look-alike passes both checks and is exact
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _OwnRMSNorm(4), nn.Linear(4, 1)).double()
    r = torch.tensor([1.0, -1.0], dtype=torch.float64)
    ref = oracle(model, lambda m: torch.stack([m(x[:, :4]).sum(), m(x[:, 4:]).sum()]), r, [0, 0])
    with OPOB(model, strict=strict) as opob:
        tok = model(x)[0, :, 0]
        res = opob.backward(torch.stack([tok[:4].sum(), tok[4:].sum()]), r, cu_seqlens=[0, 4, 9])
    assert rel_err(res.sq_norms, ref[0]) < 1e-9
    for n, p in model.named_parameters():
        assert rel_err(p.grad, ref[3][n]) < 1e-9, n


def test_rule_registered_without_token_local_refused():
    from vcpo_optim.opob import register_rule
    from vcpo_optim.opob.rules.base import _SPECS, RULES

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.weight

    def rule(module, inputs, grad_output):
        x = inputs[0]
        return {"weight": Dense((grad_output * x).reshape(x.shape[0], -1, 4).sum(1))}

    with pytest.raises(ValueError, match="token_local must be False, True or 'padded'"):
        register_rule(Scale, token_local="yes")
    register_rule(Scale)(rule)
    try:
        model = nn.Sequential(nn.Linear(3, 4), Scale())
        x = torch.randn(1, 5, 3)
        with OPOB(model) as opob:
            tok = model(x)[0].sum(-1)
            with pytest.raises(ValueError, match=r"'1' \(Scale.*token-local"):
                opob.backward(
                    torch.stack([tok[:2].sum(), tok[2:].sum()]), [1.0, 0.0], cu_seqlens=[0, 2, 5]
                )
        register_rule(Scale, token_local=True)(rule)  # now declared position-wise: exact
        model = model.double()
        x = x.double()
        r = torch.tensor([1.0, 0.5], dtype=torch.float64)
        ref = oracle(
            model, lambda m: torch.stack([m(x[:, :2]).sum(), m(x[:, 2:]).sum()]), r, [0, 0]
        )
        with OPOB(model) as opob:
            tok = model(x)[0].sum(-1)
            res = opob.backward(
                torch.stack([tok[:2].sum(), tok[2:].sum()]), r, cu_seqlens=[0, 2, 5]
            )
        assert rel_err(res.sq_norms, ref[0]) < 1e-9
    finally:
        RULES.pop(Scale, None)
        _SPECS.pop(Scale, None)


class _HeadNorm(nn.Module):
    """A per-head norm after the heads moved forward (Gemma 3's q_norm layout, [1, H, N, D])."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 12)
        self.norm = nn.RMSNorm(4)
        self.out = nn.Linear(12, 1)

    def forward(self, x):  # x: [1, N, 3]
        n = x.shape[1]
        h = self.inp(x).view(1, n, 3, 4).transpose(1, 2)  # [1, H=3, N, D=4]
        h = self.norm(h).transpose(1, 2).reshape(1, n, 12)
        return self.out(torch.tanh(h))[0, :, 0]  # [N]


def test_per_head_layout_and_an_ambiguous_token_axis():
    torch.manual_seed(7)
    model = _HeadNorm().double()
    x = torch.randn(1, 9, 3, dtype=torch.float64)
    cu = [0, 4, 5, 9]
    r = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)

    def seg_loss(tok, cu):
        return torch.stack([tok[a:b].sum() for a, b in itertools.pairwise(cu)])

    ref = oracle(
        model,
        lambda m: torch.stack([m(x[:, a:b]).sum() for a, b in [(0, 4), (4, 5), (5, 9)]]),
        r,
        [0, 0, 0],
    )
    with OPOB(model) as opob:
        res = opob.backward(seg_loss(model(x), cu), r, cu_seqlens=cu)
    assert rel_err(res.sq_norms, ref[0]) < 1e-9
    for n, p in model.named_parameters():
        assert rel_err(p.grad, ref[3][n]) < 1e-9, n
    # N = 3 tokens = 3 heads: [1, 3, 3, 4] could be [1, N, H, D] or [1, H, N, D]
    model.zero_grad(set_to_none=True)
    with (
        OPOB(model) as opob,
        pytest.raises(ValueError, match=r"N = 3 is also the size of another dimension.*'norm'"),
    ):
        opob.backward(seg_loss(model(x[:, :3]), [0, 1, 3]), r[:2], cu_seqlens=[0, 1, 3])
    assert all(p.grad is None for p in model.parameters())
