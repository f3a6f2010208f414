"""OPOB on packed (padding-free) batches against the same batch padded, and against plain backward.

A causal transformer (d=256, 4 layers, 4 heads, MLP 4d, vocab 1000, tied
embeddings, learned positions) on B segments of very different lengths
(uniform in [L/16, L]), packed in one row ``[1, N]`` with block-diagonal causal
attention and position ids restarting at each segment, or padded to
``[B, L_max]``. Per-sample loss ``l_i = -w_i * sum_{t in i} log pi(y_t)``.
Methods, side by side in one process on identical copies of the model:

(a) plain packed: packed forward + ``sum_i l_i`` backward (the floor);
(b) OPOB packed: packed forward + ``OPOB.backward(..., cu_seqlens=cu)``;
(c) plain padded, (d) OPOB padded: the same segments as ``[B, L_max]``.

Time: median wall-clock of forward+backward (+ norms and gradient write) over
repeats, methods interleaved. Peak memory: bytes allocated above the
parameters, from the PyTorch profiler's allocation timeline on CPU
(``torch.cuda.max_memory_allocated`` on CUDA), in a separate untimed run. Ratios
are printed and written to ``benchmarks/results/``.

    python benchmarks/bench_packing.py            # CPU, 1 thread
    python benchmarks/bench_packing.py --quick    # a smaller model and batch
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
from bench_opob import peak_bytes
from torch import Tensor, nn

from vcpo_optim import OPOB

RESULTS = Path(__file__).resolve().parent / "results"


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

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class LM(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, max_t: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_t, d)
        self.blocks = nn.ModuleList([Block(d, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, ids: Tensor, pos: Tensor, mask: Tensor) -> Tensor:
        x = self.tok(ids) + self.pos(pos)
        for blk in self.blocks:
            x = blk(x, mask)
        return self.head(self.norm(x))


def make_batch(b: int, lmax: int, vocab: int, seed: int = 1) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(max(2, lmax // 16), lmax + 1, (b,), generator=g)
    lens[0] = lmax
    n = int(lens.sum())
    ids = torch.randint(0, vocab, (n,), generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    seg = torch.repeat_interleave(torch.arange(b), lens)
    pos = torch.arange(n) - cu[:-1][seg]
    w = 0.5 + torch.rand(b, generator=g)
    # packed: block-diagonal causal mask [1, 1, N, N]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    pmask = (causal & (seg[:, None] == seg[None, :]))[None, None]
    # padded: [B, L_max], right padding
    t = int(lens.max())
    valid = torch.arange(t)[None] < lens[:, None]
    bids = torch.zeros(b, t, dtype=torch.long)
    bids[valid] = ids
    bmask = (torch.ones(t, t, dtype=torch.bool).tril()[None] & valid[:, None, :])[:, None]
    bmask = bmask | torch.eye(t, dtype=torch.bool)  # padded rows attend to themselves
    return {
        "lens": lens,
        "cu": cu,
        "seg": seg,
        "ids": ids,
        "pos": pos,
        "pmask": pmask,
        "bids": bids,
        "bpos": torch.arange(t)[None].expand(b, t),
        "bmask": bmask,
        "valid": valid,
        "w": w,
        "r": torch.randn(b, generator=g),
        "groups": torch.arange(b) // 4,
    }


def packed_loss(model: LM, bt: dict[str, Any]) -> Tensor:
    ids, seg = bt["ids"], bt["seg"]
    logits = model(ids[None], bt["pos"][None], bt["pmask"])[0]
    lp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[1:, None])[:, 0]
    keep = seg[1:] == seg[:-1]  # next token within the same segment
    tok = torch.where(keep, lp, 0.0)
    per = torch.zeros(len(bt["lens"])).index_add(0, seg[:-1], tok)
    return -bt["w"] * per


def padded_loss(model: LM, bt: dict[str, Any]) -> Tensor:
    ids = bt["bids"]
    logits = model(ids, bt["bpos"], bt["bmask"])
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    keep = bt["valid"][:, 1:]
    return -bt["w"] * torch.where(keep, lp, 0.0).sum(1)


def methods(base: LM, bt: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    models = {
        k: copy.deepcopy(base)
        for k in ("plain_packed", "opob_packed", "plain_padded", "opob_padded")
    }
    opob_p = OPOB(models["opob_packed"])
    opob_b = OPOB(models["opob_padded"])

    def plain(key: str, loss_fn: Callable[[LM, dict[str, Any]], Tensor]) -> Callable[[], None]:
        def run() -> None:
            m = models[key]
            m.zero_grad(set_to_none=True)
            (loss_fn(m, bt) * bt["r"]).sum().backward()

        return run

    def packed() -> None:
        m = models["opob_packed"]
        m.zero_grad(set_to_none=True)
        opob_p.backward(packed_loss(m, bt), bt["r"], bt["groups"], cu_seqlens=bt["cu"])

    def padded() -> None:
        m = models["opob_padded"]
        m.zero_grad(set_to_none=True)
        opob_b.backward(padded_loss(m, bt), bt["r"], bt["groups"])

    return {
        "plain_packed": plain("plain_packed", packed_loss),
        "opob_packed": packed,
        "plain_padded": plain("plain_padded", padded_loss),
        "opob_padded": padded,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    base = LM(1000, args.d, args.layers, 4, args.lmax)
    bt = make_batch(args.batch, args.lmax, 1000)
    fns = methods(base, bt)
    # exactness of the packed norms against the padded ones (same segments, same weights)
    res = {}
    for key in ("opob_packed", "opob_padded"):
        m = copy.deepcopy(base)
        with OPOB(m) as o:
            loss = packed_loss(m, bt) if key == "opob_packed" else padded_loss(m, bt)
            kw = {"cu_seqlens": bt["cu"]} if key == "opob_packed" else {}
            res[key] = o.backward(loss, bt["r"], bt["groups"], **kw).sq_norms
    agree = float((res["opob_packed"] - res["opob_padded"]).norm() / res["opob_padded"].norm())
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {k: peak_bytes(fn, torch.device("cpu")) / 2**20 for k, fn in fns.items()}
    n = int(bt["cu"][-1])
    return {
        "config": {
            "d": args.d,
            "layers": args.layers,
            "B": args.batch,
            "L_max": int(bt["lens"].max()),
            "N": n,
            "B*L_max/N": args.batch * int(bt["lens"].max()) / n,
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.machine(),
        },
        "seconds": med,
        "peak_mem_MB": mem,
        "norms_packed_vs_padded_rel_err": agree,
    }


def report(r: dict[str, Any]) -> str:
    c, s, m = r["config"], r["seconds"], r["peak_mem_MB"]
    lines = [
        f"# OPOB on packed batches (CPU, {c['threads']} thread, torch {c['torch']}, {c['machine']})",
        "",
        f"d={c['d']}, {c['layers']} layers, B={c['B']} segments, L_max={c['L_max']}, "
        f"N={c['N']} packed tokens (B*L_max/N = {c['B*L_max/N']:.2f}); median of {c['repeats']}.",
        "",
        "| method | seconds | peak MB |",
        "|---|---|---|",
    ]
    for k in s:
        lines.append(f"| {k} | {s[k]:.3f} | {m[k]:.1f} |")
    lines += [
        "",
        "| ratio | time | memory |",
        "|---|---|---|",
        f"| OPOB packed / plain packed | {s['opob_packed'] / s['plain_packed']:.2f} | "
        f"{m['opob_packed'] / m['plain_packed']:.2f} |",
        f"| OPOB packed / OPOB padded | {s['opob_packed'] / s['opob_padded']:.2f} | "
        f"{m['opob_packed'] / m['opob_padded']:.2f} |",
        f"| OPOB padded / plain padded | {s['opob_padded'] / s['plain_padded']:.2f} | "
        f"{m['opob_padded'] / m['plain_padded']:.2f} |",
        "",
        f"Norms, packed vs padded (relative): {r['norms_packed_vs_padded_rel_err']:.1e}",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="d=64, 2 layers, B=8, L_max=128")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.d, args.layers, args.batch, args.lmax = 64, 2, 8, 128
    else:
        args.d, args.layers, args.batch, args.lmax = 256, 4, 16, 512
    r = run(args)
    text = report(r)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    name = "bench_packing_cpu" + ("_quick" if args.quick else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(r, indent=2))
    (RESULTS / f"{name}.md").write_text(text)


if __name__ == "__main__":
    main()
