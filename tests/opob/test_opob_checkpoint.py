"""Activation checkpointing under OPOB: exact against the per-sample loop, and memory that is saved.

Non-reentrant ``torch.utils.checkpoint`` regions are recorded without their
inputs (captured while the backward recomputes them, :mod:`vcpo_optim.opob.recompute`);
every case here checks that the two-pass path ran (records deferred) and that
norms, baselines, coefficients and ``.grad`` equal the float64 loop with one
backward per sample.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from opob_oracle import (
    Block,
    TinyLM,
    bound_between,
    clipped_contributions,
    direct_noise,
    flat_grad,
    lm_batch,
    lm_loss,
    oracle,
    per_sample_grads,
    ref_coefficients,
    rel_err,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

from vcpo_optim.opob import OPOB
from vcpo_optim.opob import recompute as rc

DT = torch.float64


class CkLM(TinyLM):
    """TinyLM (tied embedding/head, padding) with its blocks in checkpoint regions.

    Block 0 is called twice in one region (``twice``: a module used twice, two calls
    per region of every Linear in it); every other block is a region of its own. ``p_drop``:
    dropout between the modules inside the regions (checkpoint restores the RNG).
    """

    def __init__(
        self, layers: int = 3, p_drop: float = 0.0, twice: bool = True, **kw: object
    ) -> None:
        super().__init__(layers=layers, **kw)  # type: ignore[arg-type]
        self.p_drop = p_drop
        self.twice = twice
        self.ckpt_kwargs: dict[str, object] = {"use_reentrant": False}
        self.region_kwargs: dict[int, dict[str, object]] = {}  # per region (block index)

    def _blk(self, i: int, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.blocks[i](x, pad), self.p_drop, self.training)

    def forward(self, ids: torch.Tensor, expand_pos: bool = True) -> torch.Tensor:
        b, t = ids.shape
        x = self.tok(ids) + self.pos(torch.arange(t).unsqueeze(0).expand(b, t))
        pad = ids != 0
        pad[:, 0] = True

        def twice(x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
            x = self._blk(0, x, pad)
            return self._blk(0, x, pad) if self.twice else x

        kw = [self.region_kwargs.get(i, self.ckpt_kwargs) for i in range(len(self.blocks))]
        x = checkpoint(twice, x, pad, **kw[0])
        for i in range(1, len(self.blocks)):
            x = checkpoint(functools.partial(self._blk, i), x, pad, **kw[i])
        return self.head(self.norm(x))


def _seeded(fn, seed=5):
    """The same dropout masks in the oracle's forward and in OPOB's."""

    def wrapped(m):
        torch.manual_seed(seed)
        return fn(m)

    return wrapped


def _check(
    model, fn, rewards, groups, scopes, tol=1e-9, expect_deferred=True, ref_model=None, **kw
):
    ref_n, ref_b, ref_c, ref_g = oracle(
        model if ref_model is None else ref_model,
        fn,
        rewards,
        scopes,
        kw.get("agg", "mean"),
        kw.get("norm_by_std", False),
    )
    model.zero_grad(set_to_none=True)
    with OPOB(model, **kw) as opob:
        loss = fn(model)
        deferred = [u for u in opob._tape if u.deferred]
        assert bool(deferred) == expect_deferred
        assert all(u.args == () and u.kwargs == {} for u in deferred)  # inputs are not held
        res = opob.backward(loss, rewards, groups)
        assert opob.num_recorded == 0
    assert rel_err(res.sq_norms, ref_n) < tol
    assert (res.baselines.double() - ref_b).abs().max() < tol * (1 + ref_b.abs().max())
    assert (res.coefficients.double() - ref_c).abs().max() < tol * (1 + ref_c.abs().max())
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert rel_err(p.grad, ref_g[n]) < tol, n
    return res


def _lm(p_drop=0.0, layers=3):
    torch.manual_seed(0)
    return CkLM(layers=layers, p_drop=p_drop).to(DT)


@pytest.mark.parametrize(
    "kw",
    [
        {"scope": "group"},
        {"scope": "batch"},
        {"scope": "group", "norm_by_std": True},
        {"scope": "group", "agg": "median"},
    ],
    ids=["group", "batch", "group-std", "median"],
)
def test_checkpointed_lm_matches_loop(kw):
    model = _lm()
    ids, mask = lm_batch(b=6)
    groups = [0, 0, 0, 1, 1, 1]
    r = torch.tensor([0.3, -1.0, 2.0, 0.5, 0.5, -0.2], dtype=DT)
    scopes = groups if kw["scope"] == "group" else [0] * 6
    _check(model, lm_loss(ids, mask), r, torch.tensor(groups), scopes, **kw)


def test_dropout_inside_regions_is_replayed_exactly():
    """checkpoint restores the RNG state for each recomputation (both passes)."""
    model = _lm(p_drop=0.3)
    ids, mask = lm_batch(b=5, seed=1)
    r = torch.randn(5, dtype=DT)
    _check(model, _seeded(lm_loss(ids, mask)), r, torch.tensor([0, 0, 1, 1, 1]), [0, 0, 1, 1, 1])


def test_without_early_stop():
    from torch.utils.checkpoint import set_checkpoint_early_stop

    ids, mask = lm_batch(b=4, seed=2)
    r = torch.randn(4, dtype=DT)
    with set_checkpoint_early_stop(False):
        _check(_lm(), lm_loss(ids, mask), r, None, [0] * 4)


def _sac(model, which):
    """Selective activation checkpointing (matmul outputs kept) on the regions ``which``."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        save = op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
        return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE

    sac = {
        "use_reentrant": False,
        "context_fn": functools.partial(create_selective_checkpoint_contexts, policy),
    }
    plain = dict(model.ckpt_kwargs)
    model.region_kwargs = {i: (sac if i in which else plain) for i in range(len(model.blocks))}
    return model


def test_selective_checkpointing_is_held_and_exact():
    """SAC keeps some outputs for one backward only: its inputs are held, one pass, exact."""
    ids, mask = lm_batch(b=4, seed=2)
    r = torch.randn(4, dtype=DT)
    model = _sac(_lm(), which={0, 1, 2})
    with pytest.warns(UserWarning, match="selective activation checkpointing"):
        _check(model, lm_loss(ids, mask), r, None, [0] * 4, expect_deferred=False, ref_model=_lm())


def test_selective_and_plain_regions_in_one_forward_are_refused():
    ids, mask = lm_batch(b=4, seed=2)
    r = torch.randn(4, dtype=DT)
    model = _sac(_lm(), which={1})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opob = OPOB(model)
        loss = lm_loss(ids, mask)(model)
    with pytest.raises(ValueError, match="checkpointing=False"):
        opob.backward(loss, r)
    assert all(p.grad is None for p in model.parameters()) and opob.num_recorded == 0
    opob.detach()
    _check(
        model,
        lm_loss(ids, mask),
        r,
        None,
        [0] * 4,
        expect_deferred=False,
        ref_model=_lm(),
        checkpointing=False,
    )


def test_batch_scope_accumulation_over_checkpointed_calls():
    ids, mask = lm_batch(b=7, seed=3)
    r = torch.tensor([0.1, -0.4, 1.3, 0.9, -2.0, 0.5, 0.0], dtype=DT)
    ref_n, ref_b, ref_c, ref_g = oracle(_lm(), lm_loss(ids, mask), r, [0] * 7)
    model = _lm()
    opob = OPOB(model, scope="batch")
    norms = []
    for lo, hi in [(0, 3), (3, 7)]:
        res = opob.backward(lm_loss(ids[lo:hi], mask[lo:hi])(model), r[lo:hi])
        norms.append(res.sq_norms)
    assert rel_err(torch.cat(norms), ref_n) < 1e-9
    assert torch.allclose(res.baselines, ref_b[3:], rtol=1e-9, atol=1e-12)
    assert torch.allclose(res.coefficients, ref_c[3:], rtol=1e-9, atol=1e-12)
    for n, p in model.named_parameters():
        assert rel_err(p.grad, ref_g[n]) < 1e-9, n
    opob.detach()


def test_clipping_and_noise_scale_under_checkpointing():
    """The coefficient stage (issue 11) sees the same norms; pass 2 writes the clipped sum."""
    model = _lm()
    ids, mask = lm_batch(b=8, seed=7)
    fn = lm_loss(ids, mask)
    g = per_sample_grads(model, fn)
    n = (g * g).sum(1)
    groups = [0, 0, 0, 0, 1, 1, 1, 1]
    r = torch.tensor([1.0, 0.0, 0.5, -1.0, 2.0, 0.3, -0.7, 0.1], dtype=DT)
    coef = torch.tensor(ref_coefficients(n.tolist(), r.tolist(), groups)[1], dtype=DT)
    c = bound_between(coef.abs() * n.sqrt(), 4)  # half of the samples clipped
    x, f = clipped_contributions(g, coef, c)
    model.zero_grad(set_to_none=True)
    with OPOB(model, max_sample_grad_norm=c) as opob:
        loss = fn(model)
        assert opob._tape.deferred
        res = opob.backward(loss, r, torch.tensor(groups))
    assert rel_err(flat_grad(model), x.sum(0)) < 1e-9
    torch.testing.assert_close(res.clip_factors, f, rtol=1e-9, atol=0)
    scale, trace, grad_sq = direct_noise(x)
    torch.testing.assert_close(res.noise_scale, scale, rtol=1e-7, atol=0)
    torch.testing.assert_close(res.noise_trace, trace, rtol=1e-8, atol=0)
    torch.testing.assert_close(res.noise_grad_sq, grad_sq, rtol=1e-8, atol=0)


class LeanCk(nn.Module):
    """Checkpointed blocks under the lean LM head, tied to the embedding (a Softmax factor)."""

    def __init__(self, vocab: int = 61, d: int = 12, layers: int = 2) -> None:
        super().__init__()
        from vcpo_optim.lm_head import TokenLogProbs

        self.tok = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d, 2, nn.LayerNorm) for _ in range(layers)])
        self.norm = nn.LayerNorm(d)
        self.head = TokenLogProbs(self.tok.weight, None, vocab_chunk=16, chunk_size=96)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = torch.ones(ids.shape, dtype=torch.bool)
        h = self.tok(ids)
        for blk in self.blocks:
            h = checkpoint(blk, h, pad, use_reentrant=False)
        return -self.head(self.norm(h)[:, :-1], ids[:, 1:]).sum(1)


def test_lean_lm_head_over_checkpointed_blocks():
    torch.manual_seed(0)
    model = LeanCk().to(DT)
    ids, _ = lm_batch(b=5, t=9, vocab=61)
    r = torch.randn(5, dtype=DT)
    _check(model, lambda m: m(ids), r, torch.tensor([0, 0, 1, 1, 1]), [0, 0, 1, 1, 1])


def test_bf16_autocast_two_passes_equal_the_single_pass():
    """The recomputation replays the forward's autocast; OPOB's own math runs without it."""
    ids, mask = lm_batch(b=6, seed=8)
    r = torch.randn(6)
    grads, norms = [], []
    for mode in ("auto", False):
        model = _lm().float()
        with OPOB(model, checkpointing=mode) as opob:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = lm_loss(ids, mask)(model)
            assert opob._tape.deferred == (mode == "auto")
            norms.append(opob.backward(loss, r).sq_norms)
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert rel_err(norms[0], norms[1]) < 1e-5
    assert rel_err(grads[0], grads[1]) < 1e-5


class Edge(nn.Module):
    """Regions whose first module sees an input without grad, a module that saves nothing, nesting.

    ``a`` is the lowest recorded module (its input needs no gradient), so pass 1 makes its
    autograd node run for the recomputation to capture its input. ``c`` has a frozen
    weight and a trainable bias on an input without grad: it saves nothing for the
    backward, so the recomputation (stopping after the last saved tensor) may never
    reach it, and its input is held. ``inner`` runs in a region nested in another.
    """

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(4, 6)
        self.c.weight.requires_grad_(False)
        self.inner = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def region(x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.a(x))
            h = checkpoint(lambda t: torch.tanh(self.inner(t)), h, use_reentrant=False)
            return torch.tanh(self.b(h)) * self.c(x)

        return self.out(checkpoint(region, x, use_reentrant=False))


def test_lowest_module_nested_region_and_a_module_that_saves_nothing():
    torch.manual_seed(0)
    model = Edge().to(DT)
    x = torch.randn(5, 3, 4, dtype=DT)
    r = torch.randn(5, dtype=DT)

    def fn(m):
        return m(x).pow(2).sum((1, 2))

    with OPOB(model) as opob:
        fn(model)
        state = {u.name: u.deferred for u in opob._tape}
        opob.clear()
    assert state == {"a": True, "inner": True, "b": True, "c": False, "out": False}
    _check(model, fn, r, torch.tensor([0, 0, 1, 1, 1]), [0, 0, 1, 1, 1])


class Flaky(nn.Module):
    """A checkpointed function that runs another module when recomputed (it must not).

    ``swap``: both modules run in the forward, in the other order when recomputed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.calls = 0
        self.swap = False
        self.fixed = False  # always a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def region(t: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            odd = self.fixed or self.calls % 2
            first, second = (self.a, self.b) if odd else (self.b, self.a)
            if self.swap:
                return torch.tanh(second(torch.tanh(first(t))))
            return torch.tanh(first(t))

        return checkpoint(region, x, use_reentrant=False)


def test_a_recomputation_that_runs_other_modules_is_refused_and_changes_nothing():
    torch.manual_seed(0)
    model = Flaky()
    x = torch.randn(3, 4)
    opob = OPOB(model)
    with pytest.raises(ValueError, match="must run the same modules when recomputed"):
        opob.backward(model(x).sum(1), torch.randn(3))
    assert all(p.grad is None for p in model.parameters()) and opob.num_recorded == 0
    model.swap, model.calls = True, 0  # a and b in the forward, b and a when recomputed
    with pytest.raises(ValueError, match="ran different modules the second time"):
        opob.backward(model(x).sum(1), torch.randn(3))
    assert all(p.grad is None for p in model.parameters()) and opob.num_recorded == 0
    model.swap, model.fixed = False, True  # deterministic again: the same OPOB works
    opob.backward(model(x).sum(1), torch.randn(3))
    assert model.a.weight.grad is not None and model.b.weight.grad is None
    opob.detach()


def test_checkpointing_false_holds_inputs_and_is_exact():
    model = _lm()
    ids, mask = lm_batch(b=4, seed=4)
    r = torch.randn(4, dtype=DT)
    _check(model, lm_loss(ids, mask), r, None, [0] * 4, expect_deferred=False, checkpointing=False)


def test_checkpointing_argument_is_validated():
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="checkpointing must be"):
            OPOB(nn.Linear(2, 2), checkpointing=bad)


def test_unrecognised_torch_falls_back_to_holding_the_inputs(monkeypatch):
    """A torch whose checkpoint internals differ: 'auto' holds the inputs (exact) and says so."""
    monkeypatch.setattr(rc, "_FWD_CODE", None)  # the pack hook of another torch version
    monkeypatch.setattr(rc, "_SUPPORTED", [])
    assert not rc.supported()  # the probe itself fails, not only the flag
    assert rc.region() is None
    with pytest.raises(ValueError, match="does not checkpoint the way OPOB recognises"):
        OPOB(_lm(), checkpointing=True)
    model = _lm()
    ids, mask = lm_batch(b=4, seed=5)
    r = torch.randn(4, dtype=DT)
    with pytest.warns(UserWarning, match="saves no memory under OPOB") as rec:
        _check(model, lm_loss(ids, mask), r, None, [0] * 4, expect_deferred=False)
    assert len([w for w in rec if "saves no memory" in str(w.message)]) == 1  # once
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checkpointing=False: no warning
        _check(
            _lm(), lm_loss(ids, mask), r, None, [0] * 4, expect_deferred=False, checkpointing=False
        )


def test_probe_recognises_this_torch():
    assert rc.supported()


class Reentrant(nn.Module):
    def __init__(self, trainable_first: bool = True) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.a.requires_grad_(trainable_first)
        self.b = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x).requires_grad_()  # as transformers' enable_input_require_grads does
        return checkpoint(lambda t: torch.tanh(self.b(t)), h, use_reentrant=True)


@pytest.mark.parametrize("trainable_first", [True, False], ids=["records", "nothing-recorded"])
def test_reentrant_checkpoint_refused_with_the_flag_to_set(trainable_first):
    """Nothing recorded (every trainable module in a reentrant region, as with LoRA) or not."""
    torch.manual_seed(0)
    model = Reentrant(trainable_first)
    x = torch.randn(5, 3, 4)
    with (
        OPOB(model) as opob,
        pytest.raises(
            ValueError, match=r'gradient_checkpointing_kwargs=\{"use_reentrant": False\}'
        ),
    ):
        opob.backward(model(x).sum((1, 2)), torch.randn(5))
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- transformers


def _qwen2(layers=2, tie=True):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.Qwen2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        pad_token_id=0,
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(cfg).to(DT).train()


def _hf_loss(ids, mask):
    def fn(m):
        logits = m(input_ids=ids, attention_mask=mask).logits
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return -torch.where(mask[:, 1:].bool(), lp, 0.0).sum(-1)

    return fn


def _hf_batch(b=4, t=7):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, -3:] = 0  # right padding
    return ids.masked_fill(mask == 0, 0), mask


def _enable(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renamed it
        model.gradient_checkpointing_enable(**kw)


def _strict(model):
    """Default strict mode where the transformers rules cover the model (issue 9 item 1)."""
    from vcpo_optim.opob.rules import get_rule

    norm = next(m for n, m in model.named_modules() if n.endswith("input_layernorm"))
    return {} if get_rule(norm) is not None else {"strict": False}


@pytest.mark.parametrize("scope", ["group", "batch"])
def test_transformers_gradient_checkpointing_matches_loop(scope):
    model = _qwen2()
    _enable(model)  # transformers 5: use_reentrant=False
    ids, mask = _hf_batch()
    r = torch.tensor([1.0, -0.5, 0.25, 2.0], dtype=DT)
    groups = [0, 0, 1, 1] if scope == "group" else [0] * 4
    _check(
        model, _hf_loss(ids, mask), r, torch.tensor(groups), groups, scope=scope, **_strict(model)
    )


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft reads a renamed transformers flag
def test_transformers_lora_gradient_checkpointing_matches_loop():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        _qwen2(),
        peft.LoraConfig(
            r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
        ),
    )
    _enable(model)
    ids, mask = _hf_batch()
    r = torch.tensor([1.0, -0.5, 0.25, 2.0], dtype=DT)
    _check(model, _hf_loss(ids, mask), r, None, [0] * 4)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_transformers_reentrant_checkpointing_names_the_flag(lora):
    model = _qwen2()
    if lora:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    _enable(model, gradient_checkpointing_kwargs={"use_reentrant": True})
    ids, mask = _hf_batch()
    opob = OPOB(model, **({} if lora else _strict(model)))
    loss = _hf_loss(ids, mask)(model)
    with pytest.raises(
        ValueError, match=r'gradient_checkpointing_kwargs=\{"use_reentrant": False\}'
    ):
        opob.backward(loss, torch.randn(4, dtype=DT))
    assert all(p.grad is None for p in model.parameters())
    opob.detach()


# ----------------------------------------------------------------------------- memory


def _peak_bytes(fn) -> int:
    """Peak bytes allocated by torch during ``fn()`` above what existed before.

    From the PyTorch profiler's allocation timeline (``profile_memory=True``):
    CPU has no allocator peak counter, and tracemalloc does not see torch's
    allocations. The same measure as ``benchmarks/bench_opob.py``.
    """
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        fn()
    cur = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            cur += size
        elif action == Action.DESTROY:
            cur -= size
        peak = max(peak, cur)
    return peak


def test_checkpointed_memory_within_1_3x_of_plain_checkpointed_training():
    """Activations dominate this model (6 blocks, tied head): OPOB must keep checkpointing's saving.

    Before (inputs held on the tape, one pass), OPOB's peak under checkpointing was
    about that of training without checkpointing; ``checkpointing=False`` still is.
    (A module called twice keeps its first call's factors until the second's
    arrive: one block's activations more, which this model does not have.)
    """
    torch.manual_seed(0)
    model = CkLM(layers=6, twice=False, vocab=512, d=64, heads=4, max_t=64)
    ids, mask = lm_batch(b=16, t=64, vocab=512, seed=6)
    fn = lm_loss(ids, mask)
    r = torch.randn(16)
    groups = torch.arange(16) // 4

    def plain(ckpt=True):
        def run():
            model.ckpt_kwargs = {"use_reentrant": False} if ckpt else {}
            model.zero_grad(set_to_none=True)
            fn(model).sum().backward()

        return run

    def opob(opob):
        def run():
            model.zero_grad(set_to_none=True)
            opob.backward(fn(model), r, groups)

        return run

    from torch.utils import checkpoint as ck

    free = ck.checkpoint
    try:  # "no checkpointing": the same model with checkpoint() as a plain call
        ck_globals = CkLM.forward.__globals__
        ck_globals["checkpoint"] = lambda f, *a, **k: f(*a)
        no_ckpt = _peak_bytes(plain(ckpt=False))
    finally:
        ck_globals["checkpoint"] = free
    base = _peak_bytes(plain())
    lean = OPOB(model)
    ours = _peak_bytes(opob(lean))
    lean.detach()
    held = OPOB(model, checkpointing=False)
    hungry = _peak_bytes(opob(held))
    held.detach()
    assert no_ckpt > 2.5 * base  # activations dominate: checkpointing saves most of the memory
    assert ours <= 1.3 * base, (ours / 2**20, base / 2**20, no_ckpt / 2**20, hungry / 2**20)
    assert hungry > 1.3 * base  # the memory the inputs held on the tape cost


def test_first_call_checks_run_in_the_two_pass_mode(monkeypatch):
    """The per-sample check and the total check run on checkpointed (deferred) records: a loss
    mixing samples is refused with nothing changed; so is a call whose per-sample sums miss
    autograd's own gradient (simulated: that gradient perturbed); a hook rescaling a recorded
    output's gradient is seen by pass 1 and 2 alike (exact, unlike the single pass, which
    refuses it); a correct call passes and disarms the check."""
    from vcpo_optim.opob import step as st

    model = _lm()
    ids, mask = lm_batch(b=5, t=7, seed=11)
    fn = lm_loss(ids, mask)
    r = torch.randn(5, dtype=DT)
    with OPOB(model) as opob:
        loss = fn(model)
        assert any(u.deferred for u in opob._tape)
        with pytest.raises(ValueError, match=r"does not depend on row i of the batch alone"):
            opob.backward(loss - loss.mean(), r)
        assert all(p.grad is None for p in model.parameters())
        assert not opob._step.separable_checked  # refused: still armed
        orig = st.Step._sketch_pass

        def off(self, loss, v, b, packed):
            sk, grads, dts = orig(self, loss, v, b, packed)
            pid = id(model.blocks[1].fc1.weight)
            grads[pid] = grads[pid] * 1.01
            return sk, grads, dts

        monkeypatch.setattr(st.Step, "_sketch_pass", off)
        with pytest.raises(ValueError, match=r"'blocks\.1\.fc1\.weight' do not add up"):
            opob.backward(fn(model), r)
        assert all(p.grad is None for p in model.parameters())
        assert not opob._step.separable_checked
    monkeypatch.undo()

    def rescale(mod, args, out):
        out.register_hook(lambda g: 2 * g)

    h = model.blocks[1].fc1.register_forward_hook(rescale)
    _check(model, fn, r, torch.tensor([0, 0, 1, 1, 1]), [0, 0, 1, 1, 1], scope="group")
    h.remove()
