"""OPOB cost against a plain backward and the other ways to get per-sample gradient norms.

A causal transformer (d=256, 4 layers, 4 heads, MLP 4d, vocab 1000, tied
input/output embeddings, learned positions) at B in {8, 32} and T in {64, 256};
per-sample loss ``l_i = -w_i * sum_t log pi(y_t)`` (a GRPO-style surrogate),
prompt groups of 8, rewards random. Methods, side by side in one process on
identical copies of the model:

(a) plain: batched forward + ``sum_i l_i`` backward (the floor: no norms at all);
(b) OPOB: batched forward + ``OPOB.backward`` (norms, baseline, ``sum_i c_i grad l_i``);
(c) reference: per-trajectory forward+backward (micro-batch 1), norm of each
    gradient, two gradient buffers (``sum R_i g_i`` and ``sum g_i``), combined;
(d) ``torch.func``: ``vmap(grad)`` per-sample gradients, norms, weighted sum;
(e) Opacus ghost clipping (two backward passes: norms, then ``sum_i c_i l_i``),
    if ``opacus`` is importable (optional ``bench`` extra, never a dependency);
    on an untied copy of the model, since Opacus refuses tied parameters.

Time: median wall-clock of the whole forward+backward (+ norms and gradient
write) over repeats, methods interleaved in every repeat. Peak memory: bytes
allocated by PyTorch above what existed before the call (parameters), peak
over the call, with ``.grad`` initially ``None`` for every method. On CPU this
is measured from the PyTorch profiler's allocation timeline
(``profile_memory=True``; the allocator has no peak counter on CPU), in a
separate untimed run; on CUDA from ``torch.cuda.max_memory_allocated``.
Ratios ours/theirs are printed and written to ``benchmarks/results/``.

    python benchmarks/bench_opob.py                     # CPU, 1 thread
    python benchmarks/bench_opob.py --device cuda       # on a GPU
    python benchmarks/bench_opob.py --quick             # B=8, T=64 only
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vcpo_optim import OPOB
from vcpo_optim.opob.baseline import scope_baselines

RESULTS = Path(__file__).resolve().parent / "results"
GROUP = 8


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (
            self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        )
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class LM(nn.Module):
    def __init__(
        self, vocab: int = 1000, d: int = 256, layers: int = 4, heads: int = 4, max_t: int = 256
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_t, d)
        self.blocks = nn.ModuleList([Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, ids: Tensor) -> Tensor:
        b, t = ids.shape
        x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device).expand(b, t).contiguous())
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def per_sample_loss(logits: Tensor, ids: Tensor, w: Tensor) -> Tensor:
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return -(w * logp.sum(-1))


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- methods


def baseline_coef(n: Tensor, r: Tensor, groups: Tensor) -> Tensor:
    uniq, sid = torch.unique(groups, return_inverse=True)
    b = scope_baselines(n.float(), r.float(), sid, uniq.numel())
    return r - b[sid]


def m_plain(model: nn.Module, ids: Tensor, w: Tensor, r: Tensor, groups: Tensor) -> Tensor:
    per_sample_loss(model(ids), ids, w).sum().backward()
    return torch.zeros(ids.shape[0])


def make_opob(model: nn.Module) -> Callable[..., Tensor]:
    opob = OPOB(model, scope="group")

    def run(model: nn.Module, ids: Tensor, w: Tensor, r: Tensor, groups: Tensor) -> Tensor:
        return opob.backward(per_sample_loss(model(ids), ids, w), r, groups).sq_norms

    return run


def m_loop_grouped(model: nn.Module, ids: Tensor, w: Tensor, r: Tensor, groups: Tensor) -> Tensor:
    """Reference: micro-batch 1 per trajectory, two gradient buffers per prompt group, combined per group."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = torch.zeros(ids.shape[0], device=ids.device)
    final = [torch.zeros_like(p) for p in params]
    for gid in torch.unique(groups).tolist():
        idx = (groups == gid).nonzero().flatten().tolist()
        buf_r = [torch.zeros_like(p) for p in params]
        buf_1 = [torch.zeros_like(p) for p in params]
        for i in idx:
            for p in params:
                p.grad = None
            per_sample_loss(model(ids[i : i + 1]), ids[i : i + 1], w[i : i + 1]).sum().backward()
            n[i] = sum((p.grad.float() ** 2).sum() for p in params)
            for p, br, b1 in zip(params, buf_r, buf_1):
                br.add_(p.grad, alpha=float(r[i]))
                b1.add_(p.grad)
        ni, ri = n[idx], r[idx].float()
        b = float((ni * ri).sum() / ni.sum()) if float(ni.sum()) > 0 else float(ri.mean())
        for f, br, b1 in zip(final, buf_r, buf_1):
            f.add_(br - b * b1)
    for p, f in zip(params, final):
        p.grad = f
    return n


def make_vmap(model: nn.Module) -> Callable[..., Tensor]:
    from torch.func import functional_call, grad, vmap

    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def run(model: nn.Module, ids: Tensor, w: Tensor, r: Tensor, groups: Tensor) -> Tensor:
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

        def f(ps: dict[str, Tensor], x: Tensor, wi: Tensor) -> Tensor:
            out = functional_call(model, ps, (x.unsqueeze(0),))
            return per_sample_loss(out, x.unsqueeze(0), wi.unsqueeze(0)).sum()

        gs = vmap(grad(f), in_dims=(None, 0, 0))(params, ids, w)
        n = sum((gs[k].float().reshape(ids.shape[0], -1) ** 2).sum(1) for k in names)
        c = baseline_coef(n, r, groups)
        for name, p in model.named_parameters():
            if name in gs:
                p.grad = torch.tensordot(c.to(gs[name].dtype), gs[name], dims=1)
        return n

    return run


def make_opacus(model: nn.Module) -> Callable[..., Tensor] | None:
    try:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
    except Exception:
        return None
    gsm = GradSampleModuleFastGradientClipping(
        model, batch_first=True, loss_reduction="sum", use_ghost_clipping=True, strict=False
    )

    def run(model: nn.Module, ids: Tensor, w: Tensor, r: Tensor, groups: Tensor) -> Tensor:
        gsm.enable_hooks()
        loss = per_sample_loss(gsm(ids), ids, w)
        loss.sum().backward(
            retain_graph=True
        )  # pass 1: ghost norms (Opacus also forms the gradient)
        n = gsm.get_norm_sample() ** 2
        for p in model.parameters():
            p.grad = None
        c = baseline_coef(n, r, groups)
        gsm.disable_hooks()
        (c.detach() * loss).sum().backward()  # pass 2: the reweighted gradient
        gsm.enable_hooks()
        return n

    return run


# ----------------------------------------------------------------------------- measurement


def peak_bytes(fn: Callable[[], Any], dev: torch.device) -> int:
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
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


def run_shape(b: int, t: int, args: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    base = LM(max_t=max(256, t)).to(dev)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (b, t), generator=g).to(dev)
    w = (0.5 + torch.rand(b, generator=g)).to(dev)
    r = torch.randn(b, generator=g).to(dev)
    groups = (torch.arange(b) // GROUP).to(dev)

    methods: dict[str, tuple[nn.Module, Callable[..., Tensor]]] = {}
    methods["a_plain"] = (copy.deepcopy(base), m_plain)
    mb = copy.deepcopy(base)
    methods["b_opob"] = (mb, make_opob(mb))
    methods["c_loop"] = (copy.deepcopy(base), m_loop_grouped)
    md = copy.deepcopy(base)
    methods["d_vmap"] = (md, make_vmap(md))
    me = copy.deepcopy(base)
    # Opacus ghost clipping refuses tied parameters ("Parameter tying is not supported with Ghost
    # Clipping"): it gets an untied copy (same cost; its norms/gradients then differ from the tied model's).
    me.head.weight = nn.Parameter(me.tok.weight.detach().clone())
    op = make_opacus(me) if not args.no_opacus else None
    if op is not None:
        methods["e_opacus"] = (me, op)

    def call(name: str) -> Tensor:
        m, fn = methods[name]
        for p in m.parameters():
            p.grad = None
        out = fn(m, ids, w, r, groups)
        sync(dev)
        return out

    # correctness: every method's gradient vs OPOB's, norms vs the exact loop
    norms = {k: call(k).detach().double().cpu() for k in methods}
    grads = {
        k: torch.cat(
            [p.grad.double().flatten().cpu() for p in m.parameters()][
                : len(list(base.parameters()))
            ]
        )
        for k, (m, _) in methods.items()
    }
    ref_n, ref_g = norms["c_loop"], grads["c_loop"]
    check = {
        k: {
            "norm_rel_err": float((norms[k] - ref_n).norm() / ref_n.norm()),
            "grad_rel_err": float((grads[k] - ref_g).norm() / ref_g.norm()),
        }
        for k in methods
        if k != "a_plain"
    }

    slow = b * t >= 4096
    reps = {k: (args.reps_big if slow else args.reps) for k in methods}
    for k in ("c_loop", "d_vmap"):
        reps[k] = max(1, reps[k] // 2) if slow else reps[k]
    times: dict[str, list[float]] = {k: [] for k in methods}
    for rep in range(max(reps.values())):
        for k in methods:
            if rep < reps[k]:
                t0 = time.perf_counter()
                call(k)
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}

    mem = {}
    for k in methods:
        m, _ = methods[k]
        for p in m.parameters():
            p.grad = None
        mem[k] = peak_bytes(lambda k=k: call(k), dev)

    res: dict[str, Any] = {
        "B": b,
        "T": t,
        "time_s": med,
        "reps": {k: len(v) for k, v in times.items()},
        "peak_mem_MB": {k: v / 2**20 for k, v in mem.items()},
        "check_vs_exact_loop": check,
        "ratios": {
            "b/a time": med["b_opob"] / med["a_plain"],
            "b/a mem": mem["b_opob"] / mem["a_plain"],
        },
    }
    for k in ("c_loop", "d_vmap", "e_opacus"):
        if k in med:
            res["ratios"][f"b/{k[0]} time"] = med["b_opob"] / med[k]
            res["ratios"][f"b/{k[0]} mem"] = mem["b_opob"] / mem[k]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--reps", type=int, default=7, help="timed repeats for small shapes")
    ap.add_argument("--reps-big", type=int, default=3, help="timed repeats when B*T >= 4096")
    ap.add_argument("--quick", action="store_true", help="B=8, T=64 only")
    ap.add_argument("--no-opacus", action="store_true")
    ap.add_argument("--out", default=None, help="results basename (default bench_opob_<device>)")
    ap.add_argument(
        "--render", default=None, help="only re-render the .md of an existing results .json"
    )
    args = ap.parse_args()
    if args.render:
        data = json.loads(Path(args.render).read_text())
        print(render(data["meta"], data["results"], Path(args.render).stem))
        return
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    shapes = [(8, 64)] if args.quick else [(8, 64), (8, 256), (32, 64), (32, 256)]
    try:
        import opacus

        opacus_version: str | None = opacus.__version__
    except Exception:
        opacus_version = None
    rows = []
    for b, t in shapes:
        res = run_shape(b, t, args, dev)
        rows.append(res)
        print(json.dumps(res, indent=1), flush=True)

    meta = {
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "opacus": opacus_version,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "command": "python benchmarks/bench_opob.py"
        + (f" --device {args.device}" if args.device != "cpu" else "")
        + (" --quick" if args.quick else ""),
    }
    name = args.out or f"bench_opob_{dev.type}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(
        json.dumps({"meta": meta, "results": rows}, indent=1) + "\n"
    )
    print(render(meta, rows, name))


def render(meta: dict[str, Any], rows: list[dict[str, Any]], name: str) -> str:
    """Write ``benchmarks/results/<name>.md`` from one run's results; return the text."""
    md = [
        f"# OPOB benchmark ({meta['device']}, {meta['threads']} thread(s), torch {meta['torch']}, "
        f"opacus {meta['opacus'] or 'not installed'})",
        "",
        f"Command: `{meta['command']}`. Causal LM d=256, 4 layers, vocab 1000, tied embeddings, "
        "groups of 8. Time: median seconds of forward+backward(+norms+write). Memory: peak MB allocated "
        "by torch above the parameters.",
        "",
        "| B | T | (a) plain s | (b) OPOB s | (c) loop s | (d) vmap s | (e) opacus s | b/a time | b/a mem "
        "| b/c time | b/d time | b/e time | b/c mem | b/d mem | b/e mem |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(x: float | None, p: int = 3) -> str:
        return "-" if x is None else f"{x:.{p}f}"

    for r in rows:
        ts, ra = r["time_s"], r["ratios"]
        md.append(
            f"| {r['B']} | {r['T']} | {f(ts['a_plain'])} | {f(ts['b_opob'])} | {f(ts['c_loop'])} | "
            f"{f(ts['d_vmap'])} | {f(ts.get('e_opacus'))} | {f(ra['b/a time'], 2)} | {f(ra['b/a mem'], 2)} | "
            f"{f(ra['b/c time'], 2)} | {f(ra['b/d time'], 2)} | {f(ra.get('b/e time'), 2)} | "
            f"{f(ra['b/c mem'], 2)} | {f(ra['b/d mem'], 2)} | {f(ra.get('b/e mem'), 2)} |"
        )
    md += [
        "",
        "Peak memory (MB):",
        "",
        "| B | T | (a) | (b) | (c) | (d) | (e) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pm = r["peak_mem_MB"]
        md.append(
            f"| {r['B']} | {r['T']} | {f(pm['a_plain'], 1)} | {f(pm['b_opob'], 1)} | {f(pm['c_loop'], 1)} | "
            f"{f(pm['d_vmap'], 1)} | {f(pm.get('e_opacus'), 1)} |"
        )
    md += [
        "",
        "Relative error against the exact loop (c): norms / final gradient. (e) runs on an untied copy of "
        "the model (Opacus ghost clipping refuses tied parameters), so its numbers differ by design; "
        "(c) and (d) materialise per-sample gradients, (b) never does for ghost layers.",
        "",
    ]
    for r in rows:
        md.append(
            f"- B={r['B']} T={r['T']}: "
            + ", ".join(
                f"{k}: {v['norm_rel_err']:.1e} / {v['grad_rel_err']:.1e}"
                for k, v in r["check_vs_exact_loop"].items()
            )
        )
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    return "\n".join(md)


if __name__ == "__main__":
    main()
