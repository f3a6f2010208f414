"""OPOB with the memory-lean LM head (TokenLogProbs) against the float64 per-sample loop.

The oracle runs the *plain* head (full logits, ``log_softmax``) with one
backward per sample; OPOB runs the lean head. Tied and untied weights, the
head's weight shared with an ``nn.Linear`` or a fallback module, the head
called twice, entropy in the loss, temperature / soft-cap / bias, prompt and
padding positions, both norm strategies, both scopes.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from opob_oracle import Block, oracle, rel_err
from torch import Tensor, nn

from vcpo_optim.lm_head import TokenLogProbs
from vcpo_optim.opob import OPOB
from vcpo_optim.opob.engine import ParamWork
from vcpo_optim.opob.rules.base import Softmax


class Gate(nn.Module):
    """A module without a rule that reads the head weight (the vmap fallback: a Dense factor)."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, h: Tensor) -> Tensor:
        return torch.tanh(F.linear(h, self.weight)[..., :5]).sum(-1)


class LeanLM(nn.Module):
    """Embedding + transformer block + LayerNorm, then the lean head (tied or not).

    ``extra``: an ``nn.Linear`` sharing the head weight (an Outer factor);
    ``gate``: a rule-less module reading it (Dense, needs strict=False);
    ``twice``: the head called a second time on other tokens.
    """

    def __init__(
        self,
        vocab: int = 61,
        d: int = 12,
        tied: bool = True,
        bias: bool = False,
        temperature: float = 1.0,
        softcap: float | None = None,
        extra: bool = False,
        gate: bool = False,
        twice: bool = False,
        ent_coef: float = 0.0,
        **chunks: int,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.block = Block(d, 2, nn.LayerNorm)
        self.norm = nn.LayerNorm(d)
        w = self.tok.weight if tied else nn.Parameter(torch.randn(vocab, d) * 0.3)
        b = nn.Parameter(torch.randn(vocab) * 0.2) if bias else None
        chunks = chunks or {"vocab_chunk": 16, "chunk_size": 96}
        self.head = TokenLogProbs(w, b, temperature=temperature, softcap=softcap, **chunks)
        self.extra = None
        if extra:
            self.extra = nn.Linear(d, vocab, bias=False)
            self.extra.weight = w
        self.gate = Gate(w) if gate else None
        self.twice = twice
        self.ent_coef = ent_coef

    def _plain(self, h: Tensor, y: Tensor, entropy: bool) -> Tensor:
        hd = self.head
        z = F.linear(h, hd.weight, hd.bias)
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        if hd.softcap is not None:
            z = hd.softcap * torch.tanh(z / hd.softcap)
        lp = torch.log_softmax(z / hd.temperature, -1)
        out = lp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        return torch.stack([out, -(lp.exp() * lp).sum(-1)], -1) if entropy else out

    def per_sample_loss(self, ids: Tensor, mask: Tensor, lean: bool) -> Tensor:
        b, t = ids.shape
        pad = torch.ones(b, t, dtype=torch.bool)
        h = self.norm(self.block(self.tok(ids), pad))
        head = self.head if lean else self._plain
        m = mask[:, 1:].to(h.dtype if h.dtype == torch.float64 else torch.float32)
        ent = self.ent_coef != 0.0
        out = (
            head(h[:, :-1], ids[:, 1:], ent)
            if not lean
            else head(h[:, :-1], ids[:, 1:], return_entropy=ent)
        )
        if ent:
            lp, en = out.unbind(-1)
            loss = -(lp * m).sum(1) - self.ent_coef * (en * m).sum(1)
        else:
            loss = -(out * m).sum(1)
        if self.twice:  # a second call on other tokens (e.g. a reference continuation)
            o2 = head(h[:, 1:], ids[:, :-1], False) if not lean else head(h[:, 1:], ids[:, :-1])
            loss = loss - 0.5 * (o2 * m).sum(1)
        if self.extra is not None:
            loss = loss + 0.05 * self.extra(h).pow(2).mean((1, 2))
        if self.gate is not None:
            loss = loss + 0.3 * self.gate(h).mean(1)
        return loss


def batch(b: int = 6, t: int = 9, vocab: int = 61, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Ids and a loss mask with a prompt (mask 0 at the start) and right padding (mask 0 at the end)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    start = torch.randint(0, 3, (b,), generator=g)
    end = torch.randint(t // 2 + 1, t + 1, (b,), generator=g)
    ar = torch.arange(t)[None, :]
    mask = (ar >= start[:, None]) & (ar < end[:, None])
    return ids, mask


def _force(monkeypatch: pytest.MonkeyPatch, strategy: str, seen: list[tuple[str, str]]) -> None:
    """Make the engine use ``strategy`` (ghost / vchunk) for the head's weight."""
    orig = ParamWork.choose

    def choose(self: ParamWork, *a: object, **k: object) -> str:
        st = orig(self, *a, **k)
        if any(isinstance(f, Softmax) for f in self.factors):
            if strategy != "auto":
                self.strategy = st = strategy
            seen.append((self.name, st))
        return st

    monkeypatch.setattr(ParamWork, "choose", choose)


def _check(
    model: LeanLM,
    ids: Tensor,
    mask: Tensor,
    rewards: Tensor,
    groups: list[int] | None,
    tol: float,
    **kw: object,
) -> None:
    scopes = (
        groups if groups is not None and kw.get("scope", "group") == "group" else [0] * len(rewards)
    )
    ref_n, ref_b, _, ref_g = oracle(
        model,
        lambda m: m.per_sample_loss(ids, mask, lean=False),
        rewards,
        scopes,
        norm_by_std=bool(kw.get("norm_by_std", False)),
    )
    model.zero_grad(set_to_none=True)
    with OPOB(model, **kw) as opob:  # type: ignore[arg-type]
        res = opob.backward(
            model.per_sample_loss(ids, mask, lean=True),
            rewards,
            None if groups is None else torch.tensor(groups),
        )
    assert rel_err(res.sq_norms, ref_n) < tol
    assert (res.baselines.double() - ref_b).abs().max() < tol * (1 + ref_b.abs().max())
    for n, p in model.named_parameters():
        assert rel_err(p.grad, ref_g[n]) < tol, n


CASES = {
    "base": {},
    "bias_temperature_softcap": {"bias": True, "temperature": 0.7, "softcap": 2.0},
    "entropy": {"ent_coef": 0.3, "temperature": 1.2},
    "shared_linear": {"extra": True},
    "called_twice": {"twice": True, "bias": True},
}


@pytest.mark.parametrize("strategy", ["ghost", "vchunk"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_lean_head_matches_per_sample_loop_float64(monkeypatch, case, tied, strategy):
    torch.manual_seed(0)
    model = LeanLM(tied=tied, **CASES[case]).double()  # type: ignore[arg-type]
    ids, mask = batch()
    r = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    seen: list[tuple[str, str]] = []
    _force(monkeypatch, strategy, seen)
    _check(model, ids, mask, r, [0, 0, 0, 1, 1, 1], 1e-9, norm_by_std=True)
    assert seen and all(s == strategy for _, s in seen)


@pytest.mark.parametrize("strategy", ["ghost", "vchunk"])
def test_fully_masked_samples(monkeypatch, strategy):
    """A sample without any loss token is exact (zero norm from the head); a call in which every
    token is masked gives zero norms and zero gradients."""
    torch.manual_seed(0)
    model = LeanLM(tied=False, bias=True).double()
    ids, mask = batch()
    mask[2] = False
    _force(monkeypatch, strategy, [])
    r = torch.randn(6, dtype=torch.float64)
    _check(model, ids, mask, r, None, 1e-9)
    model.zero_grad(set_to_none=True)
    with OPOB(model) as opob:
        res = opob.backward(model.per_sample_loss(ids, mask & False, lean=True), r)
    assert res.sq_norms.abs().max() == 0
    assert all(p.grad.abs().max() == 0 for p in model.parameters())


def test_fallback_module_sharing_the_head_weight(monkeypatch):
    """A rule-less module reading the head weight (Dense [B, V, d] factor): vocabulary-blocked path."""
    torch.manual_seed(0)
    model = LeanLM(gate=True, extra=True).double()
    ids, mask = batch()
    seen: list[tuple[str, str]] = []
    _force(monkeypatch, "auto", seen)
    r = torch.randn(6, dtype=torch.float64)
    _check(model, ids, mask, r, None, 1e-9, strict=False)
    assert seen == [("tok.weight", "vchunk")]


@pytest.mark.parametrize("tied", [True, False])
def test_scope_batch_accumulated_over_two_calls(tied):
    """scope='batch', two backward calls in one optimizer step: .grad equals the loop on all samples."""
    torch.manual_seed(0)
    model = LeanLM(tied=tied, bias=True, temperature=0.8).double()
    ids, mask = batch(b=8, seed=3)
    r = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref_n, ref_b, _, ref_g = oracle(
        model, lambda m: m.per_sample_loss(ids, mask, lean=False), r, [0] * 8
    )
    model.zero_grad(set_to_none=True)
    with OPOB(model, scope="batch") as opob:
        res = [
            opob.backward(model.per_sample_loss(ids[sl], mask[sl], lean=True), r[sl])
            for sl in (slice(0, 5), slice(5, 8))
        ]
    assert rel_err(torch.cat([x.sq_norms for x in res]), ref_n) < 1e-9
    assert (res[-1].baselines.double() - ref_b[5:]).abs().max() < 1e-9
    for n, p in model.named_parameters():
        assert rel_err(p.grad, ref_g[n]) < 1e-9, n


def test_engine_never_materialises_the_head():
    """T < d: ghost; T > d: vocabulary-blocked; never the [B, V, d] direct / acc strategies."""
    picked = {}
    for t, d in ((5, 32), (40, 4)):
        torch.manual_seed(0)
        model = LeanLM(vocab=4000, d=d, tied=False, vocab_chunk=512, chunk_size=1 << 14)
        ids = torch.randint(0, 4000, (3, t + 1))
        mask = torch.ones_like(ids, dtype=torch.bool)
        orig = ParamWork.choose
        strategies: dict[str, str] = {}

        def choose(self, *a, _orig=orig, _s=strategies, **k):
            _s[self.name] = _orig(self, *a, **k)
            return _s[self.name]

        ParamWork.choose = choose  # type: ignore[method-assign]
        try:
            with OPOB(model) as opob:
                opob.backward(model.per_sample_loss(ids, mask, lean=True), torch.randn(3))
        finally:
            ParamWork.choose = orig  # type: ignore[method-assign]
        picked[(t, d)] = strategies["head.weight"]
    assert picked == {(5, 32): "ghost", (40, 4): "vchunk"}


def _loop_same_module(model: LeanLM, ids: Tensor, mask: Tensor, r: Tensor):
    """Per-sample loop through the *lean* module itself (same roundings), float64 accumulation."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.per_sample_loss(ids, mask, lean=True)
    per = []
    for i in range(loss.shape[0]):
        gi = torch.autograd.grad(loss[i], [p for _, p in params], retain_graph=True)
        per.append([g.double() for g in gi])
    n = torch.tensor([float(sum((g**2).sum() for g in gs)) for gs in per], dtype=torch.float64)
    b = float((n * r.double()).sum() / n.sum())
    c = r.double() - b
    grads = {
        name: sum(c[i] * per[i][j] for i in range(len(per))) for j, (name, _) in enumerate(params)
    }
    return n, grads


@pytest.mark.parametrize("tied", [True, False])
def test_bf16_autocast_float32(tied):
    """bf16 autocast, float32 model: norms and .grad match the per-sample loop through the same
    module (norms ~1e-4, measured; the head's .grad ~2e-3: the loop's per-sample weight
    gradients are bfloat16 matmul outputs, OPOB sums the same rounded operands in float32), and
    the float64 plain loop to bfloat16 precision."""
    torch.manual_seed(0)
    model = LeanLM(tied=tied, bias=True, temperature=0.9, vocab=300, d=16)
    ids, mask = batch(vocab=300, seed=5)
    r = torch.randn(6, generator=torch.Generator().manual_seed(4))
    n_loop, g_loop = _loop_same_module(model, ids, mask, r)
    model.zero_grad(set_to_none=True)
    with OPOB(model, scope="batch") as opob, torch.autocast("cpu", dtype=torch.bfloat16):
        res = opob.backward(model.per_sample_loss(ids, mask, lean=True), r)
    assert res.sq_norms.dtype == torch.float32
    head_names = {"tok.weight", "head.weight", "head.bias"}
    assert rel_err(res.sq_norms, n_loop) < 1e-3
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float32
        if name in head_names:  # the lean head's own parameters
            assert rel_err(p.grad, g_loop[name]) < 5e-3, name
    # against the exact float64 plain path: bfloat16 precision
    m64 = LeanLM(tied=tied, bias=True, temperature=0.9, vocab=300, d=16).double()
    m64.load_state_dict(model.state_dict())
    ref_n, _, _, ref_g = oracle(
        m64, lambda m: m.per_sample_loss(ids, mask, lean=False), r.double(), [0] * 6
    )
    assert rel_err(res.sq_norms, ref_n) < 5e-2
    for name, p in model.named_parameters():
        assert rel_err(p.grad, ref_g[name]) < 1e-1, name


def test_no_activation_retained_and_head_outside_model_refused():
    torch.manual_seed(0)
    model = LeanLM().double()
    ids, mask = batch()
    with OPOB(model) as opob:
        loss = model.per_sample_loss(ids, mask, lean=True)
        saved = [weakref.ref(a) for u in opob._tape for a in u.args if isinstance(a, Tensor)]
        opob.backward(loss, torch.randn(6))
        del loss
        gc.collect()
        assert all(w() is None for w in saved)
    # the head must be inside the module given to OPOB: otherwise its weight is used unseen
    trunk = LeanLM().double()
    head = trunk.head
    del trunk.head
    with OPOB(trunk) as opob:
        h = trunk.norm(trunk.block(trunk.tok(ids), torch.ones_like(mask)))
        with pytest.raises(ValueError, match="outside the forward of a hooked module"):
            opob.backward(-head(h[:, :-1], ids[:, 1:]).sum(1), torch.randn(6))


def test_hf_qwen2_tied_with_lean_head():
    """A tiny Qwen2 (tied embeddings) from its transformers config: the decoder's last hidden
    state through the lean head, right padding with an attention mask, float64, against the
    per-sample loop on the model's own logits."""
    transformers = pytest.importorskip("transformers", reason="transformers is an optional extra")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    lm = transformers.Qwen2ForCausalLM(cfg).double()
    for n, p in lm.named_parameters():  # no RMSNorm rule on this branch: freeze the norms
        if "norm" in n:
            p.requires_grad_(False)
    head = TokenLogProbs.from_model(lm, temperature=0.7, vocab_chunk=64, chunk_size=1024)
    policy = nn.ModuleDict({"lm": lm, "logp": head})  # what OPOB sees: the model and its head
    ids, mask = batch(b=4, t=8, vocab=300, seed=7)
    att = torch.ones_like(ids)
    att[1, 6:] = 0
    att[3, 5:] = 0
    mask = mask & att.bool()
    m = mask[:, 1:].double()

    def lean(p: nn.Module) -> Tensor:
        h = p["lm"].base_model(input_ids=ids, attention_mask=att).last_hidden_state
        return -(p["logp"](h[:, :-1], ids[:, 1:]) * m).sum(1)

    def plain(p: nn.Module) -> Tensor:
        logits = p["lm"](input_ids=ids, attention_mask=att).logits[:, :-1]
        lp = torch.log_softmax(logits / 0.7, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return -(lp * m).sum(1)

    r = torch.randn(4, dtype=torch.float64)
    policy.train()
    ref_n, _, _, ref_g = oracle(policy, plain, r, [0, 0, 1, 1])
    policy.zero_grad(set_to_none=True)
    with OPOB(policy) as opob:
        res = opob.backward(lean(policy), r, torch.tensor([0, 0, 1, 1]))
    assert rel_err(res.sq_norms, ref_n) < 1e-9
    for n, p in policy.named_parameters():
        if p.requires_grad:
            assert rel_err(p.grad, ref_g[n]) < 1e-9, n


def test_opob_peak_memory_below_per_sample_weights():
    """OPOB.backward with the lean head at V = 32768: the [B, V, d] per-sample weight gradients
    (16 MB) are never formed: the whole call peaks below half of them."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    torch.manual_seed(0)
    v, d, b, t = 32768, 16, 8, 8
    model = LeanLM(vocab=v, d=d, tied=True, vocab_chunk=8192, chunk_size=1 << 18)
    ids = torch.randint(0, v, (b, t + 1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    opob = OPOB(model)

    def step() -> None:
        opob.backward(model.per_sample_loss(ids, mask, lean=True), torch.randn(b))
        model.zero_grad(set_to_none=True)

    step()
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        step()
    opob.detach()
    cur = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        cur += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, cur)
    per_sample = b * v * d * 4
    assert peak < 0.5 * per_sample, (peak, per_sample)
