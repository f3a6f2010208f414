"""Packed batches on transformers models (tiny, from config): OPOB against each segment run alone.

The packed row is fed as ``input_ids [1, N]`` with ``position_ids`` restarting at
each segment, ``attention_mask=None`` and ``use_cache=False``: transformers 5.x
then builds a block-diagonal causal mask (its packed-sequence detection). The
oracle runs every segment alone as its own unpacked sample and takes one
backward per sample in float64. Trailing padding tokens (positions ``0..p-1``,
as verl pads) are outside ``cu_seqlens``.
"""

from __future__ import annotations

import pytest
import torch
from opob_oracle import oracle, rel_err

from vcpo_optim.opob import OPOB

transformers = pytest.importorskip("transformers", reason="transformers is in the hf/trl extras")
import test_hf_models as hf  # noqa: E402  (its tiny models of every family)
from test_hf_models import no_fallback  # noqa: E402, F401  (a fixture)

VOCAB = 50
LENGTHS = [4, 1, 6, 3]
PAD = 2


def _model(family: str, attn: str, dtype: torch.dtype):
    torch.manual_seed(0)
    if family == "qwen2":
        cfg = transformers.Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=True,
            attn_implementation=attn,
        )
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=16,
            n_layer=2,
            n_head=2,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
            attn_implementation=attn,
        )
        model = transformers.GPT2LMHeadModel(cfg)
    return model.to(dtype).train()


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = sum(LENGTHS)
    ids = torch.randint(1, VOCAB, (n + PAD,), generator=g)
    ids[n:] = 0
    pos = torch.cat([torch.arange(k) for k in [*LENGTHS, PAD] if k])
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    w = torch.rand(n + PAD, generator=g, dtype=torch.float64)
    w[cu[1:].long() - 1] = 0.0  # the last token of a segment predicts nothing of its own
    w[n:] = 0.0
    return ids, pos, cu, w


def _token_loss(logits, tgt, w):
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
    return -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) * w.to(logp.dtype)


def _segment_loss(logits, ids, cu, w):
    """Per-segment loss of a packed row's logits ``[N, V]``; targets are the rolled ids (as verl)."""
    tok = _token_loss(logits, torch.roll(ids, -1, -1), w)
    seg = torch.repeat_interleave(torch.arange(len(LENGTHS)), cu.diff().long())
    return tok.new_zeros(len(LENGTHS)).index_add(0, seg, tok[: int(cu[-1])])


def _packed_loss(model, ids, pos, cu, w):
    """Per-segment loss from one packed forward run as transformers needs it."""
    out = model(input_ids=ids[None], position_ids=pos[None], attention_mask=None, use_cache=False)
    return _segment_loss(out.logits[0], ids, cu, w)


def _alone(ids, cu, w):
    """The oracle's loss: every segment run alone, as its own unpacked sample."""
    tgt = torch.roll(ids, -1, -1)

    def fn(model):
        out = []
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            logits = model(input_ids=ids[None, a:b], use_cache=False).logits[0]
            out.append(_token_loss(logits, tgt[a:b], w[a:b]).sum())
        return torch.stack(out)

    return fn


def _check(res, ref, model, tol):
    ref_n, ref_b, ref_c, ref_g = ref
    assert rel_err(res.sq_norms, ref_n) < tol
    assert (res.baselines.double() - ref_b).abs().max() < tol * (1 + ref_b.abs().max())
    assert (res.coefficients.double() - ref_c).abs().max() < tol * (1 + ref_c.abs().max())
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert rel_err(p.grad, ref_g[n]) < tol, n


REWARDS = [0.5, -1.0, 2.0, 0.25]
GROUPS = [3, 3, 8, 8]


@pytest.mark.parametrize(
    "family,attn,dtype,tol,scope,agg",
    [
        ("qwen2", "sdpa", torch.float64, 1e-9, "group", "mean"),
        ("qwen2", "eager", torch.float64, 1e-9, "batch", "median"),
        ("qwen2", "sdpa", torch.float32, 1e-4, "group", "mean"),
        ("gpt2", "sdpa", torch.float64, 1e-9, "batch", "mean"),
        ("gpt2", "eager", torch.float64, 1e-9, "group", "median"),
    ],
)
def test_hf_packed_matches_segments_alone(family, attn, dtype, tol, scope, agg):
    """Against each segment run alone; and against the per-sample loop on the packed forward
    itself. Qwen2's eager attention takes its softmax in float32 even in a float64 model, so
    there the packed forward differs from the segments run alone at float32 rounding (a sum
    over N keys instead of L_i): that comparison is float32-tight, the other stays 1e-9."""
    model = _model(family, attn, dtype)
    ids, pos, cu, w = _batch()
    rewards = torch.tensor(REWARDS, dtype=dtype)
    groups = torch.tensor(GROUPS)
    scopes = GROUPS if scope == "group" else [0] * len(LENGTHS)
    alone = oracle(model, _alone(ids, cu, w), rewards, scopes, agg, True)
    same = oracle(model, lambda m: _packed_loss(m, ids, pos, cu, w), rewards, scopes, agg, True)
    model.zero_grad(set_to_none=True)
    with OPOB(model, scope=scope, agg=agg, norm_by_std=True) as opob:  # strict: no fallback
        loss = _packed_loss(model, ids, pos, cu, w)
        assert all(u.rule for u in opob._tape)
        res = opob.backward(loss, rewards, groups, cu_seqlens=cu)
    _check(res, same, model, tol)
    f32_inside = family == "qwen2" and attn == "eager" and dtype == torch.float64
    _check(res, alone, model, 1e-6 if f32_inside else tol)


def test_transformers_needs_use_cache_false_to_isolate_segments():
    """What the README tells users: without use_cache=False (or with a mask of ones) transformers
    5.x lets the packed segments attend to each other; with it they are isolated."""
    model = _model("qwen2", "sdpa", torch.float64)
    ids, pos, cu, _ = _batch()
    n = int(cu[-1])
    with torch.no_grad():
        alone = torch.cat(
            [
                model(input_ids=ids[None, a:b], use_cache=False).logits[0]
                for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())
            ]
        )

        def packed(**kw):
            return model(input_ids=ids[None], position_ids=pos[None], **kw).logits[0, :n]

        assert (packed(attention_mask=None, use_cache=False) - alone).abs().max() < 1e-12
        leaks = {
            "default use_cache": packed(),
            "mask of ones": packed(attention_mask=torch.ones_like(ids[None]), use_cache=False),
        }
    for what, out in leaks.items():  # if this fails, transformers changed: update the README
        assert (out - alone).abs().max() > 1e-6, what


@pytest.mark.parametrize(
    "kw",
    [{}, {"attention_mask": "ones", "use_cache": False}],
    ids=["default_use_cache", "mask_of_ones"],
)
def test_packed_segments_attending_to_each_other_refused(kw):
    """The two ways transformers 5.x silently lets packed segments attend to each other (see the
    test above) made OPOB's norms wrong without a word; the per-sample check refuses them,
    naming the fix, with nothing changed."""
    model = _model("qwen2", "sdpa", torch.float64)
    ids, pos, cu, w = _batch()
    if kw.get("attention_mask") == "ones":
        kw = dict(kw, attention_mask=torch.ones_like(ids[None]))
    with OPOB(model) as opob:
        out = model(input_ids=ids[None], position_ids=pos[None], **kw)
        loss = _segment_loss(out.logits[0], ids, cu, w)
        with pytest.raises(ValueError, match=r"attention across trajectories.*use_cache=False"):
            opob.backward(loss, torch.tensor(REWARDS, dtype=torch.float64), cu_seqlens=cu)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_packed_segments_attending_to_each_other_refused_under_gradient_checkpointing():
    """The leak with gradient_checkpointing_enable() (an all-ones mask; transformers turns the
    KV cache off itself under checkpointing in training): OPOB's two-pass recompute mode runs
    the per-sample check on the recomputed outputs (its lean, projected form) and refuses it."""
    model = _model("qwen2", "sdpa", torch.float64)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, pos, cu, w = _batch()
    with OPOB(model) as opob:
        out = model(
            input_ids=ids[None], position_ids=pos[None], attention_mask=torch.ones_like(ids[None])
        )
        assert opob._tape.deferred  # the two-pass mode, not held inputs
        loss = _segment_loss(out.logits[0], ids, cu, w)
        with pytest.raises(ValueError, match=r"attention across trajectories.*use_cache=False"):
            opob.backward(loss, torch.tensor(REWARDS, dtype=torch.float64), cu_seqlens=cu)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
@pytest.mark.parametrize("kw", [{}, {"use_cache": False}], ids=["default_use_cache", "no_cache"])
def test_packed_gradient_checkpointing_matches_segments_alone_and_is_checked(kw):
    """A correct packed, checkpointed run passes the first-call check (armed before, disarmed
    after) and is exact against each segment run alone. With checkpointing in training mode
    transformers sets use_cache=False itself, so the default is isolated too (unlike above)."""
    model = _model("qwen2", "sdpa", torch.float64)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, pos, cu, w = _batch()
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    alone = oracle(model, _alone(ids, cu, w), rewards, GROUPS, "mean", True)
    model.zero_grad(set_to_none=True)
    with OPOB(model, scope="group", norm_by_std=True) as opob:
        out = model(input_ids=ids[None], position_ids=pos[None], **kw)
        loss = _segment_loss(out.logits[0], ids, cu, w)
        assert opob._tape.deferred and not opob._step.separable_checked
        res = opob.backward(loss, rewards, torch.tensor(GROUPS), cu_seqlens=cu)
        assert opob._step.separable_checked  # ran, passed, disarmed
    _check(res, alone, model, 1e-9)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_peft_lora_and_dora_packed(dora):
    """PEFT adapters on Qwen2, packed: the adapters' Linear rules, DoRA's magnitude rule (kwargs
    in the token view; its lora_A(eye) call never reaches the loss and is dropped)."""
    peft = pytest.importorskip("peft", reason="peft is in the hf extra (pip install -e '.[dev]')")
    base = _model("qwen2", "sdpa", torch.float64)
    cfg = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["q_proj", "v_proj", "down_proj"],
        lora_dropout=0.0,
        use_dora=dora,
        init_lora_weights=False,
    )
    model = peft.get_peft_model(base, cfg).train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "magnitude" not in n:
                p.normal_(0.0, 0.3)
    ids, pos, cu, w = _batch(seed=1)
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    alone = oracle(model, _alone(ids, cu, w), rewards, [0] * 4, "mean", False)
    model.zero_grad(set_to_none=True)
    with OPOB(model, scope="batch") as opob:
        res = opob.backward(_packed_loss(model, ids, pos, cu, w), rewards, cu_seqlens=cu)
    _check(res, alone, model, 1e-9)
    if dora:
        from vcpo_optim.opob.rules import rule_status

        mags = [m for n, m in model.named_modules() if n.endswith("lora_magnitude_vector.default")]
        assert mags and all(rule_status(m) == "verified" for m in mags)


@pytest.mark.parametrize(
    "family", ["qwen3", "llama", "mistral", "phi3", "gemma", "gemma2", "gemma3"]
)
@pytest.mark.usefixtures("no_fallback")
def test_every_family_packed(family):
    """The other families of tests/opob/test_hf_models.py, packed: against the per-sample loop on
    the same packed forward (1e-9; Gemma's norm weights are float32-accurate in the model itself,
    as unpacked), and against each segment run alone (their isolation: float32 rounding inside
    the models, e.g. Gemma's norms, allows 1e-6)."""
    model = hf.build(family, attn="eager" if family == "gemma2" else "sdpa")
    g = torch.Generator().manual_seed(2)
    n = sum(LENGTHS)
    ids = torch.randint(3, hf.VOCAB, (n + PAD,), generator=g)
    ids[n:] = 0
    pos = torch.cat([torch.arange(k) for k in [*LENGTHS, PAD]])
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    w = torch.rand(n + PAD, generator=g, dtype=torch.float64)
    w[cu[1:] - 1] = 0.0
    w[n:] = 0.0
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    same = oracle(model, lambda m: _packed_loss(m, ids, pos, cu, w), rewards, GROUPS)
    alone = oracle(model, _alone(ids, cu, w), rewards, GROUPS)
    model.zero_grad(set_to_none=True)
    with OPOB(model) as opob:
        res = opob.backward(
            _packed_loss(model, ids, pos, cu, w), rewards, torch.tensor(GROUPS), cu_seqlens=cu
        )
    gemma = family in hf.GEMMA
    assert rel_err(res.sq_norms, same[0]) < (1e-7 if gemma else 1e-9)
    assert rel_err(res.sq_norms, alone[0]) < 1e-6
    for name, p in model.named_parameters():
        tol = 1e-6 if gemma and "norm" in name else (1e-7 if gemma else 1e-9)
        assert rel_err(p.grad, same[3][name]) < tol, name
        assert rel_err(p.grad, alone[3][name]) < 1e-6, name
