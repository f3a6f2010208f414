"""The memory-lean LM head (``TokenLogProbs``) against the plain full-logits head.

Part A, the head alone: token log-probs of ``N = B*T`` tokens from hidden
states ``[B, T, d]`` and a ``[V, d]`` weight, forward + backward of
``sum_t logp_t`` (gradients to ``h`` and ``W``), at V in {32768, 151936},
d in {64, 256}, N in {1024, 4096} (B = 8). Contenders:

(p) plain: ``log_softmax(F.linear(h, W).float(), -1).gather(...)``;
(l) lean: ``TokenLogProbs(W)(h, y)`` (default blocks: 8192 vocabulary x 512 tokens).

Part B, OPOB on a small causal LM (d=64, 2 layers, tied embeddings, B=8,
T=128, groups of 4) at V in {32768, 151936}: per-sample loss
``-sum_t logp_t`` over the response half of each sequence. Contenders:

(a) plain batched backward, ``nn.Linear`` head (full logits);
(b) plain batched backward, lean head;
(c) ``OPOB.backward`` (norms, baseline, gradient), ``nn.Linear`` head;
(d) ``OPOB.backward``, lean head.

Time: median wall-clock seconds of forward + backward over repeats, contenders
interleaved. Peak memory: MB allocated by PyTorch above what existed before
the call, from the profiler's allocation timeline (CPU has no peak counter),
in a separate untimed run. The plain head is skipped where its estimated peak
(4 float32 copies of ``[N, V]``) exceeds ``--max-plain-gb`` (default 6 GB).
Correctness is checked in every configuration (relative error of the lean
results against the plain ones). Ratios are ours / theirs.

    python benchmarks/bench_lm_head.py            # CPU, 1 thread; writes benchmarks/results/
    python benchmarks/bench_lm_head.py --quick    # V = 32768, N = 1024 only
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vcpo_optim import OPOB
from vcpo_optim.lm_head import TokenLogProbs
from vcpo_optim.opob.engine import ParamWork

RESULTS = Path(__file__).resolve().parent / "results"


def peak_bytes(fn: Callable[[], Any]) -> int:
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


def timed(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ----------------------------------------------------------------------------- part A


def head_alone(v: int, d: int, n: int, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    b = 8
    w = nn.Parameter(torch.randn(v, d) / d**0.5)
    h0 = torch.randn(b, n // b, d)
    y = torch.randint(0, v, (b, n // b))
    lean_mod = TokenLogProbs(w)
    out: dict[str, Tensor] = {}

    def run(kind: str, keep: bool = False) -> None:
        h = h0.clone().requires_grad_()
        if kind == "plain":
            lp = torch.log_softmax(F.linear(h, w).float(), -1).gather(-1, y.unsqueeze(-1))
        else:
            lp = lean_mod(h, y)
        lp.sum().backward()
        if keep:  # the check run only: the copy must not count in time or memory
            out[kind] = torch.cat([h.grad.flatten(), w.grad.flatten()])
        w.grad = None

    est = 4 * n * v * 4
    kinds = ["lean"] + (["plain"] if est <= args.max_plain_gb * 2**30 else [])
    fns = {k: (lambda k=k: run(k)) for k in kinds}
    for k in kinds:
        run(k, keep=True)  # warm-up, and the gradients for the check
    check = rel(out["lean"], out["plain"]) if "plain" in out else None
    t = timed(fns, args.reps if n * v * d < 5e10 else max(1, args.reps // 2))
    mem = {k: peak_bytes(fn) / 2**20 for k, fn in fns.items()}
    row: dict[str, Any] = {
        "V": v,
        "d": d,
        "N": n,
        "time_s": t,
        "peak_mem_MB": mem,
        "logits_MB": n * v * 4 / 2**20,
        "grad_rel_err_lean_vs_plain": check,
    }
    if "plain" in t:
        row["ratios"] = {
            "lean/plain time": t["lean"] / t["plain"],
            "lean/plain mem": mem["lean"] / mem["plain"],
        }
    else:
        row["plain_skipped"] = (
            f"estimated {est / 2**30:.1f} GB > --max-plain-gb {args.max_plain_gb}"
        )
    print(json.dumps(row), flush=True)
    return row


# ----------------------------------------------------------------------------- part B


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
    """Tied-embedding causal LM; ``lean`` selects the head used by :meth:`logp`."""

    def __init__(self, vocab: int, d: int = 64, layers: int = 2, max_t: int = 256) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_t, d)
        self.blocks = nn.ModuleList([Block(d, 4) for _ in range(layers)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight
        self.lean = TokenLogProbs(self.tok.weight)

    def logp(self, ids: Tensor, lean: bool) -> Tensor:
        b, t = ids.shape
        x = self.tok(ids) + self.pos(torch.arange(t).expand(b, t))
        for blk in self.blocks:
            x = blk(x)
        h = self.norm(x)[:, :-1]
        if lean:
            return self.lean(h, ids[:, 1:])
        return torch.log_softmax(self.head(h).float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def opob_lm(v: int, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    b, t, d = 8, 128, 64
    model = LM(v, d)
    ids = torch.randint(0, v, (b, t + 1))
    mask = torch.zeros(b, t)
    mask[:, t // 2 :] = 1.0  # the response half
    r = torch.randn(b)
    groups = torch.arange(b) // 4
    strategies: dict[str, str] = {}
    orig = ParamWork.choose

    def choose(self: ParamWork, *a: Any, **k: Any) -> str:
        strategies[self.name] = orig(self, *a, **k)
        return strategies[self.name]

    ParamWork.choose = choose  # type: ignore[method-assign]
    opob = OPOB(model)
    res: dict[str, Any] = {}

    def run(kind: str, keep: bool = False) -> None:
        lean = kind in ("b", "d")
        loss = -(model.logp(ids, lean) * mask).sum(1)
        if kind in ("a", "b"):
            loss.sum().backward()
        else:
            n = opob.backward(loss, r, groups).sq_norms
            if keep:  # the check run only
                res[kind] = n
                res[kind + "_grad"] = torch.cat([p.grad.flatten() for p in model.parameters()])
        model.zero_grad(set_to_none=True)

    try:
        fns = {k: (lambda k=k: run(k)) for k in "abcd"}
        for k in "abcd":
            run(k, keep=True)
        check = {
            "norm_rel_err_d_vs_c": rel(res["d"], res["c"]),
            "grad_rel_err_d_vs_c": rel(res["d_grad"], res["c_grad"]),
        }
        tm = timed(fns, args.reps)
        mem = {k: peak_bytes(fn) / 2**20 for k, fn in fns.items()}
    finally:
        ParamWork.choose = orig  # type: ignore[method-assign]
        opob.detach()
    row = {
        "V": v,
        "d": d,
        "B": b,
        "T": t,
        "time_s": tm,
        "peak_mem_MB": mem,
        "check": check,
        "head_strategy": {"lean (d)": strategies.get("tok.weight")},
        "ratios": {
            "d/c time": tm["d"] / tm["c"],
            "d/c mem": mem["d"] / mem["c"],
            "d/b time": tm["d"] / tm["b"],
            "d/b mem": mem["d"] / mem["b"],
            "c/a time": tm["c"] / tm["a"],
            "c/a mem": mem["c"] / mem["a"],
        },
    }
    print(json.dumps(row), flush=True)
    return row


# ----------------------------------------------------------------------------- main


def render(meta: dict[str, Any], a_rows: list[dict[str, Any]], b_rows: list[dict[str, Any]]) -> str:
    def f(x: float | None, p: int = 3) -> str:
        return "-" if x is None else f"{x:.{p}f}"

    md = [
        f"# Memory-lean LM head benchmark ({meta['device']}, {meta['threads']} thread(s), "
        f"torch {meta['torch']})",
        "",
        f"Command: `{meta['command']}`. Time: median seconds of forward+backward. Memory: peak MB "
        "allocated by torch during the call (profiler timeline). Ratios ours/theirs.",
        "",
        "## A. The head alone: plain full logits vs TokenLogProbs (forward + backward, B = 8)",
        "",
        "| V | d | N=B*T | logits MB | plain s | lean s | lean/plain time | plain MB | lean MB "
        "| lean/plain mem | grad rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in a_rows:
        t, m = r["time_s"], r["peak_mem_MB"]
        ra = r.get("ratios", {})
        err = r["grad_rel_err_lean_vs_plain"]
        md.append(
            f"| {r['V']} | {r['d']} | {r['N']} | {r['logits_MB']:.0f} | {f(t.get('plain'))} | "
            f"{f(t['lean'])} | {f(ra.get('lean/plain time'), 2)} | {f(m.get('plain'), 1)} | "
            f"{f(m['lean'], 1)} | {f(ra.get('lean/plain mem'), 3)} | "
            f"{'-' if err is None else f'{err:.1e}'} |"
        )
    skipped = [r for r in a_rows if "plain_skipped" in r]
    for r in skipped:
        md.append("")
        md.append(f"Plain skipped at V={r['V']}, d={r['d']}, N={r['N']}: {r['plain_skipped']}.")
    md += [
        "",
        "## B. OPOB on a small causal LM (d=64, 2 layers, tied, B=8, T=128, loss on the last 64 tokens)",
        "",
        "(a) plain backward, nn.Linear head; (b) plain backward, lean head; (c) OPOB, nn.Linear "
        "head; (d) OPOB, lean head.",
        "",
        "| V | (a) s | (b) s | (c) s | (d) s | (a) MB | (b) MB | (c) MB | (d) MB | d/c time | d/c mem "
        "| d/b time | c/a time | lean head strategy | d vs c: norms / grad rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in b_rows:
        t, m, ra, c = r["time_s"], r["peak_mem_MB"], r["ratios"], r["check"]
        md.append(
            f"| {r['V']} | {f(t['a'])} | {f(t['b'])} | {f(t['c'])} | {f(t['d'])} | {f(m['a'], 1)} | "
            f"{f(m['b'], 1)} | {f(m['c'], 1)} | {f(m['d'], 1)} | {f(ra['d/c time'], 2)} | "
            f"{f(ra['d/c mem'], 3)} | {f(ra['d/b time'], 2)} | {f(ra['c/a time'], 2)} | "
            f"{r['head_strategy']['lean (d)']} | {c['norm_rel_err_d_vs_c']:.1e} / "
            f"{c['grad_rel_err_d_vs_c']:.1e} |"
        )
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-plain-gb", type=float, default=6.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--skip-b", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vs = [32768] if args.quick else [32768, 151936]
    ns = [1024] if args.quick else [1024, 4096]
    a_rows = (
        []
        if args.skip_a
        else [head_alone(v, d, n, args) for v in vs for d in (64, 256) for n in ns]
    )
    b_rows = [] if args.skip_b else [opob_lm(v, args) for v in vs]
    meta = {
        "device": "cpu",
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "command": "python " + " ".join(["benchmarks/bench_lm_head.py", *sys.argv[1:]]),
    }
    name = "bench_lm_head_cpu" + ("_quick" if args.quick else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(
        json.dumps({"meta": meta, "head_alone": a_rows, "opob_lm": b_rows}, indent=1) + "\n"
    )
    text = render(meta, a_rows, b_rows)
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
