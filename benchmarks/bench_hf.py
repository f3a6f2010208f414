"""OPOB on Hugging Face transformers families (and PEFT LoRA / DoRA) against a plain backward.

Random-weight models built from the real transformers config classes (no hub
downloads), 4 layers, width 256, MLP 1024, 4 heads (2 key/value heads where the
family has GQA), vocab 4096, at B in {8, 16} and T in {64, 256}; per-sample loss
``l_i = -w_i * sum_t log pi(y_t)`` (a GRPO-style surrogate), prompt groups of 8,
random rewards. Contenders, side by side in one process on identical copies of
each model:

(a) plain: batched forward + ``sum_i l_i`` backward (no norms: the floor);
(b) OPOB with the built-in rules (default ``strict=True``; structural rules for
    the RMSNorm variants, Gemma's scaled embedding, GPT-2's Conv1D, DoRA);
(c) OPOB with ``strict=False`` and the structural rules disabled: the HF modules
    go through the exact torch.func vmap fallback (what OPOB did before);
(d) per-trajectory loop: micro-batch 1 forward+backward per trajectory, norm of
    each gradient, two gradient buffers per prompt group (the reference scheme);
(e) ``torch.func``: ``vmap(grad)`` per-sample gradients of the whole model, where it runs.

Time: median CPU time of this process (``time.process_time``; one compute thread) of
forward + backward (+ norms, baseline, gradient write), contenders interleaved in every
repeat. CPU time, not wall-clock, because the machine this runs on is shared: another
process's load stretches wall-clock time but not the CPU time spent by this one (the
median wall-clock is recorded too, ``wall_s`` in the json). Peak memory: bytes allocated by PyTorch
during the call above what existed before (the parameters), from the PyTorch
profiler's allocation timeline (``profile_memory=True``; CPU has no allocator peak
counter), in a separate untimed run -- the same method as ``bench_opob.py``.

    python benchmarks/bench_hf.py                      # CPU, 1 thread, all families and shapes
    python benchmarks/bench_hf.py --quick              # B=8, T=64, three families
    python benchmarks/bench_hf.py --families llama gpt2 --shapes 8x64 16x256
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_opob import baseline_coef, peak_bytes

from vcpo_optim import OPOB
from vcpo_optim.opob.rules import structural_rules_disabled

RESULTS = Path(__file__).resolve().parent / "results"
_NONE_KEEPALIVE: list[None] = []


def peak_mem(fn: Callable[[], Any]) -> int:
    """``bench_opob.peak_bytes`` on CPU, working around a PyTorch bug.

    The profiler's memory timeline (``prof._memory_profile()``, torch 2.13) drops
    references to ``None`` (60 to thousands per call, growing with the graph); after
    enough calls CPython frees ``None`` and aborts ("Fatal Python error: none_dealloc"),
    which this benchmark's 200 measurements reach. The lost references are put back.
    """
    gc.collect()
    before = sys.getrefcount(None)
    out = peak_bytes(fn, torch.device("cpu"))
    gc.collect()  # the profiler's objects drop their references to None when collected
    lost = before - sys.getrefcount(None)
    if lost > 0:
        _NONE_KEEPALIVE.extend([None] * lost)
    return out


GROUP = 8
VOCAB, WIDTH, LAYERS, HEADS, MLP = 4096, 256, 4, 4, 1024

FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 64}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 64}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 64}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 64}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),
    "llama_lora": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_dora": ("LlamaConfig", "LlamaForCausalLM", {}),
}


def build(family: str, max_t: int) -> nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    cfg_name, model_name, extra = FAMILIES[family]
    if family == "gpt2":
        kw: dict[str, Any] = dict(
            vocab_size=VOCAB, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, n_positions=max_t
        )
        kw.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        kw = dict(
            vocab_size=VOCAB,
            hidden_size=WIDTH,
            intermediate_size=MLP,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=2,
            max_position_embeddings=max_t,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            **extra,
        )
    attn = "eager" if family == "gemma2" else "sdpa"  # Gemma 2 has no sdpa in transformers 5
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(
        getattr(transformers, cfg_name)(**kw, attn_implementation=attn)
    )
    if family in ("llama_lora", "llama_dora"):
        import peft

        cfg = peft.LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
            lora_dropout=0.0,
            use_dora=family == "llama_dora",
            init_lora_weights=False,
        )
        model = peft.get_peft_model(model, cfg)
    return model.train()


def model_inputs(family: str, ids: Tensor) -> dict[str, Tensor]:
    kw = {"input_ids": ids}
    if family == "gpt2":  # learned positions: [B, T] ids (OPOB needs dim 0 = the sample)
        kw["position_ids"] = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    return kw


def make_fwd(family: str) -> Callable[[nn.Module, Tensor], Tensor]:
    def fwd(model: nn.Module, ids: Tensor) -> Tensor:
        return model(**model_inputs(family, ids)).logits

    return fwd


def per_sample_loss(logits: Tensor, ids: Tensor, w: Tensor) -> Tensor:
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return -(w * logp.sum(-1))


Method = Callable[[nn.Module, Tensor, Tensor, Tensor, Tensor], Tensor]


def make_plain(fwd: Callable[..., Tensor]) -> Method:
    def run(model: nn.Module, ids: Tensor, w: Tensor, r: Tensor, groups: Tensor) -> Tensor:
        per_sample_loss(fwd(model, ids), ids, w).sum().backward()
        return torch.zeros(ids.shape[0])

    return run


def make_opob(model: nn.Module, fwd: Callable[..., Tensor], fallback: bool) -> Method:
    if fallback:
        with structural_rules_disabled():
            opob = OPOB(model, scope="group", strict=False)
    else:
        opob = OPOB(model, scope="group")

    def run(model: nn.Module, ids: Tensor, w: Tensor, r: Tensor, groups: Tensor) -> Tensor:
        return opob.backward(per_sample_loss(fwd(model, ids), ids, w), r, groups).sq_norms

    return run


def make_loop(fwd: Callable[..., Tensor]) -> Method:
    def run(model: nn.Module, ids: Tensor, w: Tensor, r: Tensor, groups: Tensor) -> Tensor:
        params = [p for p in model.parameters() if p.requires_grad]
        n = torch.zeros(ids.shape[0])
        final = [torch.zeros_like(p) for p in params]
        for gid in torch.unique(groups).tolist():
            idx = (groups == gid).nonzero().flatten().tolist()
            buf_r = [torch.zeros_like(p) for p in params]
            buf_1 = [torch.zeros_like(p) for p in params]
            for i in idx:
                for p in params:
                    p.grad = None
                x = ids[i : i + 1]
                per_sample_loss(fwd(model, x), x, w[i : i + 1]).sum().backward()
                gs = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
                n[i] = sum((g.float() ** 2).sum() for g in gs)
                for g, br, b1 in zip(gs, buf_r, buf_1):
                    br.add_(g, alpha=float(r[i]))
                    b1.add_(g)
            ni, ri = n[idx], r[idx].float()
            b = float((ni * ri).sum() / ni.sum()) if float(ni.sum()) > 0 else float(ri.mean())
            for f, br, b1 in zip(final, buf_r, buf_1):
                f.add_(br - b * b1)
        for p, f in zip(params, final):
            p.grad = f
        return n

    return run


def make_vmap(model: nn.Module, family: str) -> Method:
    from torch.func import functional_call, grad, vmap

    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def run(model: nn.Module, ids: Tensor, w: Tensor, r: Tensor, groups: Tensor) -> Tensor:
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

        def f(ps: dict[str, Tensor], x: Tensor, wi: Tensor) -> Tensor:
            x = x.unsqueeze(0)
            logits = functional_call(model, ps, (), model_inputs(family, x)).logits
            return per_sample_loss(logits, x, wi.unsqueeze(0)).sum()

        gs = vmap(grad(f), in_dims=(None, 0, 0))(params, ids, w)
        n = sum((gs[k].float().reshape(ids.shape[0], -1) ** 2).sum(1) for k in names)
        c = baseline_coef(n, r, groups)
        for name, p in model.named_parameters():
            if name in gs:
                p.grad = torch.tensordot(c.to(gs[name].dtype), gs[name], dims=1)
        return n

    return run


def _grad_vec(model: nn.Module) -> Tensor:
    return torch.cat(
        [
            (torch.zeros_like(p) if p.grad is None else p.grad).double().flatten()
            for p in model.parameters()
            if p.requires_grad
        ]
    )


def run_shape(family: str, b: int, t: int, args: argparse.Namespace) -> dict[str, Any]:
    base = build(family, max(256, t))
    fwd = make_fwd(family)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    w = 0.5 + torch.rand(b, generator=g)
    r = torch.randn(b, generator=g)
    groups = torch.arange(b) // GROUP

    methods: dict[str, tuple[nn.Module, Method]] = {
        "a_plain": (copy.deepcopy(base), make_plain(fwd))
    }
    mb = copy.deepcopy(base)
    methods["b_opob"] = (mb, make_opob(mb, fwd, fallback=False))
    mc = copy.deepcopy(base)
    methods["c_fallback"] = (mc, make_opob(mc, fwd, fallback=True))
    methods["d_loop"] = (copy.deepcopy(base), make_loop(fwd))
    md = copy.deepcopy(base)
    methods["e_vmap"] = (md, make_vmap(md, family))

    def call(name: str) -> Tensor:
        m, fn = methods[name]
        for p in m.parameters():
            p.grad = None
        return fn(m, ids, w, r, groups)

    failed: dict[str, str] = {}
    norms: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}
    for k in list(methods):
        try:
            norms[k] = call(k).detach().double()
            grads[k] = _grad_vec(methods[k][0])
        except Exception as e:  # vmap does not run every HF model
            failed[k] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            del methods[k]
    ref_n, ref_g = norms["d_loop"], grads["d_loop"]
    check = {
        k: {
            "norm_rel_err": float((norms[k] - ref_n).norm() / ref_n.norm()),
            "grad_rel_err": float((grads[k] - ref_g).norm() / ref_g.norm()),
        }
        for k in methods
        if k not in ("a_plain", "d_loop")
    }

    big = b * t >= 2048
    reps = {k: args.reps for k in methods}
    if "e_vmap" in reps and big:  # the slowest by far: one repeat
        reps["e_vmap"] = 1
    times: dict[str, list[float]] = {k: [] for k in methods}
    walls: dict[str, list[float]] = {k: [] for k in methods}
    for rep in range(max(reps.values())):
        for k in methods:
            if rep < reps[k]:
                t0, w0 = time.process_time(), time.perf_counter()
                call(k)
                times[k].append(time.process_time() - t0)
                walls[k].append(time.perf_counter() - w0)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {}
    for k in methods:
        for p in methods[k][0].parameters():
            p.grad = None
        mem[k] = peak_mem(lambda k=k: call(k))

    res: dict[str, Any] = {
        "family": family,
        "B": b,
        "T": t,
        "params_M": sum(p.numel() for p in base.parameters() if p.requires_grad) / 1e6,
        "time_s": med,
        "wall_s": {k: statistics.median(v) for k, v in walls.items()},
        "reps": {k: len(v) for k, v in times.items()},
        "peak_mem_MB": {k: v / 2**20 for k, v in mem.items()},
        "failed": failed,
        "check_vs_loop": check,
        "ratios": {},
    }
    for k in ("b_opob", "c_fallback", "d_loop", "e_vmap"):
        if k in med:
            res["ratios"][f"{k}/plain time"] = med[k] / med["a_plain"]
            res["ratios"][f"{k}/plain mem"] = mem[k] / mem["a_plain"]
    for k in ("c_fallback", "d_loop", "e_vmap"):
        if k in med:
            res["ratios"][f"b_opob/{k} time"] = med["b_opob"] / med[k]
    return res


def render(meta: dict[str, Any], rows: list[dict[str, Any]], name: str) -> str:
    md = [
        f"# OPOB on Hugging Face models ({meta['device']}, {meta['threads']} thread(s), torch "
        f"{meta['torch']}, transformers {meta['transformers']}, peft {meta['peft']})",
        "",
        f"Command: `{meta['command']}`. {LAYERS} layers, width {WIDTH}, MLP {MLP}, vocab {VOCAB}; "
        "LoRA/DoRA r=16 on all linear layers of Llama. Time: median CPU seconds (process time) of "
        "forward+backward(+norms+baseline+write); memory: peak MB allocated by torch during the call "
        "(PyTorch profiler allocation timeline). (a) plain, (b) OPOB built-in rules, (c) OPOB with "
        "the HF modules through the vmap fallback, (d) per-trajectory loop, (e) torch.func vmap.",
        "",
        "| family | B | T | (a) s | (b) s | (c) s | (d) s | (e) s | b/a time | b/a mem | c/a time "
        "| c/a mem | b/d time | b/e time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(x: float | None, p: int = 3) -> str:
        return "-" if x is None else f"{x:.{p}f}"

    for r in rows:
        ts, ra = r["time_s"], r["ratios"]
        md.append(
            f"| {r['family']} | {r['B']} | {r['T']} | {f(ts['a_plain'])} | {f(ts.get('b_opob'))} | "
            f"{f(ts.get('c_fallback'))} | {f(ts.get('d_loop'))} | {f(ts.get('e_vmap'))} | "
            f"{f(ra.get('b_opob/plain time'), 2)} | {f(ra.get('b_opob/plain mem'), 2)} | "
            f"{f(ra.get('c_fallback/plain time'), 2)} | {f(ra.get('c_fallback/plain mem'), 2)} | "
            f"{f(ra.get('b_opob/d_loop time'), 2)} | {f(ra.get('b_opob/e_vmap time'), 2)} |"
        )
    md += ["", "Peak memory (MB):", "", "| family | B | T | (a) | (b) | (c) | (d) | (e) |"]
    md += ["|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pm = r["peak_mem_MB"]
        md.append(
            f"| {r['family']} | {r['B']} | {r['T']} | {f(pm['a_plain'], 1)} | "
            f"{f(pm.get('b_opob'), 1)} | {f(pm.get('c_fallback'), 1)} | {f(pm.get('d_loop'), 1)} | "
            f"{f(pm.get('e_vmap'), 1)} |"
        )
    md += ["", "Relative error against the loop (d), norms / final gradient; failures:", ""]
    for r in rows:
        errs = ", ".join(
            f"{k}: {v['norm_rel_err']:.1e} / {v['grad_rel_err']:.1e}"
            for k, v in r["check_vs_loop"].items()
        )
        fails = "; ".join(f"{k} failed ({v})" for k, v in r["failed"].items())
        md.append(
            f"- {r['family']} B={r['B']} T={r['T']}: {errs}" + (f"; {fails}" if fails else "")
        )
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3, help="timed repeats (vmap: one at B*T >= 2048)")
    ap.add_argument("--families", nargs="*", default=list(FAMILIES))
    ap.add_argument("--shapes", nargs="*", default=["8x64", "8x256", "16x64", "16x256"])
    ap.add_argument("--quick", action="store_true", help="B=8, T=64; qwen2, gemma3, gpt2")
    ap.add_argument("--out", default="bench_hf_cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.families, args.shapes = ["qwen2", "gemma3", "gpt2"], ["8x64"]
    import peft
    import transformers

    meta = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "command": "python " + " ".join(["benchmarks/bench_hf.py", *sys.argv[1:]]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    for fam in args.families:
        for shape in args.shapes:
            b, t = (int(v) for v in shape.split("x"))
            res = run_shape(fam, b, t, args)
            rows.append(res)
            ra = res["ratios"]
            print(
                f"{fam:11s} B={b:2d} T={t:3d}  OPOB/plain time {ra['b_opob/plain time']:.2f} mem "
                f"{ra['b_opob/plain mem']:.2f} | fallback/plain time "
                f"{ra.get('c_fallback/plain time', float('nan')):.2f} | OPOB/loop "
                f"{ra['b_opob/d_loop time']:.2f} | OPOB/vmap {ra.get('b_opob/e_vmap time', float('nan')):.2f}"
                + (f" | failed: {list(res['failed'])}" if res["failed"] else ""),
                flush=True,
            )
            (RESULTS / f"{args.out}.json").write_text(  # after every row: partial results survive
                json.dumps({"meta": meta, "results": rows}, indent=1) + "\n"
            )
    print(render(meta, rows, args.out))


if __name__ == "__main__":
    main()
