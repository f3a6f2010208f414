"""TokenLogProbs against the plain full-logits computation (float64 oracle), and its memory."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vcpo_optim.lm_head import TokenLogProbs


def plain_logp(
    h: Tensor,
    y: Tensor,
    w: Tensor,
    b: Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    scale: float = 1.0,
    entropy: bool = False,
) -> Tensor:
    """The reference: full logits, log_softmax in float32/float64, gather."""
    z = F.linear(h, w, b)
    z = z.to(torch.promote_types(z.dtype, torch.float32)) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lp = torch.log_softmax(z / temperature, dim=-1)
    out = lp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    if entropy:
        out = torch.stack([out, -(lp.exp() * lp).sum(-1)], dim=-1)
    return out


def rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def _setup(dtype, bias=True, v=1001, d=12, b=3, t=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = nn.Parameter(torch.randn(v, d, generator=g, dtype=dtype) * 0.4)
    bb = nn.Parameter(torch.randn(v, generator=g, dtype=dtype) * 0.3) if bias else None
    h = torch.randn(b, t, d, generator=g, dtype=dtype).requires_grad_()
    y = torch.randint(0, v, (b, t), generator=g)
    return w, bb, h, y


def _grads(out: Tensor, wts: Tensor, ins: list[Tensor]) -> list[Tensor]:
    gs = torch.autograd.grad((out * wts).sum(), [i for i in ins if i is not None])
    return list(gs)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "temperature,softcap,scale", [(1.0, None, 1.0), (0.7, None, 1.0), (1.3, 4.0, 0.8)]
)
@pytest.mark.parametrize("entropy", [False, True])
def test_matches_plain_float64(bias, temperature, softcap, scale, entropy):
    """Log-probs (and entropy) and gradients w.r.t. h, W, b equal the full-logits path in float64.

    Blocks of 7 x 53 logits over V=1001, 51 tokens: several ragged vocabulary and token blocks.
    """
    w, b, h, y = _setup(torch.float64, bias)
    mod = TokenLogProbs(
        w,
        b,
        temperature=temperature,
        softcap=softcap,
        scale=scale,
        vocab_chunk=53,
        chunk_size=7 * 53,
    )
    out = mod(h, y, return_entropy=entropy)
    ref = plain_logp(h, y, w, b, temperature, softcap, scale, entropy)
    assert out.dtype == torch.float64 and out.shape == ref.shape
    assert (out - ref).abs().max() < 1e-12
    wts = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for a, r in zip(_grads(out, wts, [h, w, b]), _grads(ref, wts, [h, w, b])):
        assert rel(a, r) < 1e-12


def test_padding_mask_and_float32():
    """Masked positions (any valid id) get no gradient; float32 matches float32 and float64 paths."""
    w, _, h, y = _setup(torch.float32, bias=False, v=777, t=11)
    lens = torch.tensor([11, 6, 1])
    mask = (torch.arange(11)[None, :] < lens[:, None]).float()
    y = y.masked_fill(mask == 0, 0)  # padding id
    mod = TokenLogProbs(w, vocab_chunk=100, chunk_size=500)
    out = mod(h, y)
    ref = plain_logp(h, y, w)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 1e-5
    ga = _grads(out, mask, [h, w])
    gr = _grads(ref, mask, [h, w])
    assert all(rel(a, r) < 1e-5 for a, r in zip(ga, gr))
    assert ga[0][mask == 0].abs().max() == 0  # masked positions: exactly zero gradient
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    g64 = _grads(plain_logp(h64, y, w64), mask.double(), [h64, w64])
    assert all(rel(a, r) < 1e-5 for a, r in zip(ga, g64))


def test_tied_embedding_gradient():
    """The same Parameter as input embedding and head: .grad equals the plain path's."""
    torch.manual_seed(0)
    emb = nn.Embedding(301, 10).double()
    mod = TokenLogProbs(emb.weight, temperature=0.9, vocab_chunk=64, chunk_size=256)
    assert mod.weight is emb.weight
    ids = torch.randint(0, 301, (4, 9))
    mix = nn.Linear(10, 10).double()

    def loss(lean: bool) -> Tensor:
        h = torch.tanh(mix(emb(ids)))
        lp = (
            mod(h[:, :-1], ids[:, 1:])
            if lean
            else plain_logp(h[:, :-1], ids[:, 1:], emb.weight, temperature=0.9)
        )
        return -(lp.sum())

    gl = torch.autograd.grad(loss(True), [emb.weight, mix.weight])
    gr = torch.autograd.grad(loss(False), [emb.weight, mix.weight])
    assert all(rel(a, r) < 1e-12 for a, r in zip(gl, gr))


def test_frozen_weight_and_any_rank():
    """A frozen head gives gradients to h only; tokens of any shape ([B], [B, T, K]) work."""
    w, _, _, _ = _setup(torch.float64, bias=False, v=97, d=5)
    w.requires_grad_(False)
    mod = TokenLogProbs(w, chunk_size=40, vocab_chunk=30)
    for shape in [(4,), (2, 3, 5)]:
        h = torch.randn(*shape, 5, dtype=torch.float64, requires_grad=True)
        y = torch.randint(0, 97, shape)
        out = mod(h, y)
        assert out.shape == shape
        (gh,) = torch.autograd.grad(out.sum(), [h])
        (rh,) = torch.autograd.grad(plain_logp(h, y, w).sum(), [h])
        assert rel(gh, rh) < 1e-12


def test_bf16_autocast_matches_plain_autocast_path():
    """Under bf16 autocast the linear logits are the bf16 ones of F.linear (forward agrees to
    float32 rounding); gradients agree with the plain autocast path to bf16 precision and both
    are within bf16 precision of float64. Output float32."""
    w, b, h, y = _setup(torch.float32, bias=True, v=3000, d=64, b=4, t=33)
    mod = TokenLogProbs(w, b, temperature=0.7, vocab_chunk=512, chunk_size=4096)
    wts = torch.randn(4, 33, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mod(h, y)
        ref = plain_logp(h, y, w, b, temperature=0.7)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 1e-5
    ga, gr = _grads(out, wts, [h, w, b]), _grads(ref, wts, [h, w, b])
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (h, w, b))
    g64 = _grads(plain_logp(h64, y, w64, b64, temperature=0.7), wts.double(), [h64, w64, b64])
    for a, r, t in zip(ga, gr, g64):
        assert a.dtype == torch.float32
        assert rel(a, r) < 1e-2
        assert rel(a, t) < 1e-2 and rel(r, t) < 1e-2


def test_bf16_model_outputs_float32():
    """A bf16 head without autocast: matmuls in bf16, log-probs in float32 (as .float() would)."""
    w, _, h, y = _setup(torch.bfloat16, bias=False, v=500, d=16)
    out = TokenLogProbs(w, chunk_size=1000)(h, y)
    assert out.dtype == torch.float32
    assert (out - plain_logp(h, y, w)).abs().max() < 1e-5
    gh, gw = _grads(out, torch.ones_like(out), [h, w])
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16


def test_errors():
    w, b, h, y = _setup(torch.float32, bias=True, v=50, d=4)
    mod = TokenLogProbs(w, b)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 50\)"):
        mod(h, y.masked_fill(y == y[0, 0], -100))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 50\)"):
        mod(h, torch.full_like(y, 50))
    with pytest.raises(ValueError, match="expected tokens of shape"):
        mod(h, y[:, 1:])
    with pytest.raises(ValueError, match="last dimension"):
        mod(h[..., :3], y)
    with pytest.raises(TypeError, match="integer"):
        mod(h, y.float())
    with pytest.raises(TypeError, match=r"nn\.Parameter"):
        TokenLogProbs(w.detach())
    with pytest.raises(TypeError, match="bias"):
        TokenLogProbs(w, nn.Parameter(torch.zeros(49)))
    for kw in ({"temperature": 0.0}, {"temperature": float("nan")}, {"softcap": -1.0}):
        with pytest.raises(ValueError):
            TokenLogProbs(w, **kw)  # type: ignore[arg-type]


class _DuckLM(nn.Module):
    """A user model with the Hugging Face head accessors (no transformers import)."""

    def __init__(self, cfg: types.SimpleNamespace, bias: bool = False) -> None:
        super().__init__()
        self.config = cfg
        self.emb = nn.Embedding(40, 6)
        self.lm_head = nn.Linear(6, 40, bias=bias)
        self.lm_head.weight = self.emb.weight

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


def test_from_model_reads_head_and_config():
    m = _DuckLM(types.SimpleNamespace(final_logit_softcapping=30.0), bias=True)
    head = TokenLogProbs.from_model(m, temperature=0.6)
    assert head.weight is m.emb.weight and head.bias is m.lm_head.bias
    assert head.softcap == 30.0 and head.temperature == 0.6 and head.scale == 1.0
    assert TokenLogProbs.from_model(m, softcap=None).softcap is None
    with pytest.raises(ValueError, match="logit_scale"):
        TokenLogProbs.from_model(_DuckLM(types.SimpleNamespace(logit_scale=0.0625)))
    with pytest.raises(ValueError, match="logits_scaling"):
        TokenLogProbs.from_model(_DuckLM(types.SimpleNamespace(logits_scaling=8.0)))
    assert TokenLogProbs.from_model(_DuckLM(types.SimpleNamespace(logits_scaling=1.0))).scale == 1
    assert (
        TokenLogProbs.from_model(_DuckLM(types.SimpleNamespace(logit_scale=0.5)), scale=0.5).scale
        == 0.5
    )
    with pytest.raises(ValueError, match="no output embedding"):
        TokenLogProbs.from_model(nn.Linear(3, 3))


class _NaNLogitsLM(_DuckLM):
    """Its own logits hold a NaN, which the lean head does not reproduce."""

    def forward(self, ids: Tensor) -> types.SimpleNamespace:
        logits = self.lm_head(self.emb(ids)).clone()
        logits[0, 1, 3] = float("nan")
        return types.SimpleNamespace(logits=logits)


def test_check_against_refuses_a_nan_difference():
    """A NaN difference is a disagreement (``not err <= tol``), not a pass."""
    torch.manual_seed(0)
    model = _NaNLogitsLM(types.SimpleNamespace()).double()
    head = TokenLogProbs.from_model(model)
    with pytest.raises(ValueError, match="differ from the model's by nan"):
        head.check_against(model, torch.randint(0, 40, (2, 5)))


# ----------------------------------------------------------------------------- Hugging Face


def _tiny_hf(family: str):
    transformers = pytest.importorskip("transformers", reason="transformers is an optional extra")
    torch.manual_seed(0)
    common = dict(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if family == "qwen2":
        cfg = transformers.Qwen2Config(tie_word_embeddings=True, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif family == "gemma2":
        cfg = transformers.Gemma2Config(head_dim=8, final_logit_softcapping=5.0, **common)
        model = transformers.Gemma2ForCausalLM(cfg)
    else:
        cfg = transformers.CohereConfig(logit_scale=0.25, **common)
        model = transformers.CohereForCausalLM(cfg)
    return model.double().eval()


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "cohere"])
def test_hf_models_check_against(family):
    """from_model + check_against on tiny random models of real transformers families.

    The decoder's last_hidden_state (model.base_model) is exactly what the lm_head sees.
    """
    model = _tiny_hf(family)
    ids = torch.randint(0, 300, (2, 7))
    if family == "cohere":
        with pytest.raises(ValueError, match="logit_scale"):
            TokenLogProbs.from_model(model)
        head = TokenLogProbs.from_model(model, scale=model.config.logit_scale)
    else:
        head = TokenLogProbs.from_model(model, temperature=0.8)
    assert head.weight is model.get_output_embeddings().weight
    if family == "qwen2":
        assert head.weight is model.get_input_embeddings().weight
    if family == "gemma2":
        assert head.softcap == 5.0
    assert head.check_against(model, ids, tol=1e-10) < 1e-10
    with torch.no_grad():
        h = model.base_model(input_ids=ids).last_hidden_state
        logits = model(input_ids=ids).logits.double()
    ref = torch.log_softmax(logits / head.temperature, -1)[:, :-1].gather(-1, ids[:, 1:, None])
    assert (head(h[:, :-1], ids[:, 1:]) - ref.squeeze(-1)).abs().max() < 1e-10
    wrong = TokenLogProbs.from_model(model, temperature=0.8, softcap=None, scale=1.0)
    if family != "qwen2":
        with pytest.raises(ValueError, match="differ from the model"):
            wrong.check_against(model, ids, tol=1e-9)


# ----------------------------------------------------------------------------- memory


def _peak_bytes(fn) -> int:
    """Peak bytes allocated by PyTorch during ``fn`` (profiler allocation timeline; CPU)."""
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


def test_peak_memory_far_below_logits():
    """V = 32768, d = 16, 256 tokens: forward + backward peak is a small fraction of the
    [B, T, V] float32 logits (32 MB), and far below the plain path's peak."""
    torch.manual_seed(0)
    v, d, b, t = 32768, 16, 2, 128
    w = nn.Parameter(torch.randn(v, d) * 0.1)
    h0 = torch.randn(b, t, d)
    y = torch.randint(0, v, (b, t))
    mod = TokenLogProbs(w, vocab_chunk=32768, chunk_size=1 << 20)  # 8 blocks of 32 x 32768

    def run(lean: bool) -> None:
        h = h0.clone().requires_grad_()
        out = mod(h, y) if lean else plain_logp(h, y, w)
        out.sum().backward()
        w.grad = None

    logits_bytes = b * t * v * 4
    lean, plain = _peak_bytes(lambda: run(True)), _peak_bytes(lambda: run(False))
    # the weight's gradient (v * d * 4 = 2 MB) is the floor of both; one block is 4 MB
    assert lean < 0.5 * logits_bytes, (lean, logits_bytes)
    assert plain > 3 * lean, (plain, lean)


def test_all_positions_masked_gives_zero_gradients():
    """Every output gradient zero (a fully masked batch): zero gradients, no error."""
    w, b, h, y = _setup(torch.float64, bias=True, v=80, d=6)
    out = TokenLogProbs(w, b, chunk_size=50)(h, y)
    gh, gw, gb = torch.autograd.grad((out * 0).sum(), [h, w, b])
    assert gh.abs().max() == 0 and gw.abs().max() == 0 and gb.abs().max() == 0


def test_weight_gradient_skipped_when_not_needed(monkeypatch):
    """autograd.grad w.r.t. h only (as OPOB's single backward): the V x d x N weight-gradient
    matmul is not run; .backward() runs it."""
    w, _, h, y = _setup(torch.float64, bias=False, v=60, d=4, b=2, t=3)
    mod = TokenLogProbs(w)  # one block
    calls = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(1) or mm(*a, **k))
    out = mod(h * 1.0, y)
    calls.clear()
    torch.autograd.grad(out.sum(), [h])
    assert len(calls) == 2  # recomputed logits, grad of h
    out = mod(h * 1.0, y)
    calls.clear()
    out.sum().backward()
    assert len(calls) == 3 and w.grad is not None


def test_hf_peft_lora():
    """PEFT LoRA on a tiny Qwen2: the frozen head of the base model is found and exact; a LoRA
    adapter on lm_head itself (which TokenLogProbs would ignore) is refused."""
    peft = pytest.importorskip("peft", reason="peft is an optional extra")
    model = _tiny_hf("qwen2")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    head = TokenLogProbs.from_model(pm)
    assert head.weight is model.get_output_embeddings().weight
    assert not head.weight.requires_grad
    ids = torch.randint(0, 300, (2, 7))
    assert head.check_against(pm, ids, tol=1e-10) < 1e-10
    h = pm.get_base_model().base_model(input_ids=ids).last_hidden_state
    ref = torch.log_softmax(pm(input_ids=ids).logits, -1).gather(-1, ids[..., None])[..., 0]
    assert (head(h, ids) - ref).abs().max() < 1e-10
    on_head = peft.get_peft_model(
        _tiny_hf("qwen2"), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"])
    )
    with pytest.raises(ValueError, match="LoRA adapter on lm_head"):
        TokenLogProbs.from_model(on_head)
