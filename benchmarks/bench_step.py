"""Step time of VCPOAdamW against torch.optim.AdamW with the same implementation.

Both optimizers own identical copies of a ~25M-parameter model with identical
gradients and are stepped alternately in one process (so machine noise hits
both alike); VCPOAdamW gets a fresh batch of log importance weights every step
(observe + log-space ESS + scaled lr). Reports the median step time of each,
the ratio ours/theirs per implementation (for-loop, foreach, fused) and the
optimizer-state memory, and writes them to benchmarks/results/.

    python benchmarks/bench_step.py                 # CPU, 1 thread
    python benchmarks/bench_step.py --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from vcpo_optim import VCPOAdamW

RESULTS = Path(__file__).resolve().parent / "results"


def make_params(width: int, depth: int, device: torch.device, seed: int = 0) -> list[nn.Parameter]:
    torch.manual_seed(seed)
    layers = [nn.Linear(width, width) for _ in range(depth)]
    params = [nn.Parameter(p.detach().to(device)) for layer in layers for p in layer.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )


def bench(impl: str, args: argparse.Namespace, device: torch.device) -> dict[str, float | str]:
    kwargs = {
        "for-loop": {"foreach": False},
        "foreach": {"foreach": True},
        "fused": {"fused": True},
    }[impl]
    pa = make_params(args.width, args.depth, device)
    pb = make_params(args.width, args.depth, device)
    theirs = torch.optim.AdamW(pa, lr=1e-4, **kwargs)
    ours = VCPOAdamW(pb, lr=1e-4, **kwargs)
    g = torch.Generator(device=device).manual_seed(0)
    t_theirs, t_ours = [], []
    for rep in range(args.warmup + args.reps):
        log_w = torch.randn(args.batch, generator=g, device=device)
        sync(device)
        t0 = time.perf_counter()
        theirs.step()
        sync(device)
        t1 = time.perf_counter()
        ours.step(log_weights=log_w)
        sync(device)
        t2 = time.perf_counter()
        if rep >= args.warmup:
            t_theirs.append(t1 - t0)
            t_ours.append(t2 - t1)
    med_t, med_o = statistics.median(t_theirs), statistics.median(t_ours)
    return {
        "impl": impl,
        "adamw_ms": 1e3 * med_t,
        "vcpo_ms": 1e3 * med_o,
        "ratio": med_o / med_t,
        "state_mib_adamw": state_bytes(theirs) / 2**20,
        "state_mib_vcpo": state_bytes(ours) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument(
        "--depth",
        type=int,
        default=24,
        help="Linear(width, width) layers (24 x 1024^2 = 25M params)",
    )
    parser.add_argument("--batch", type=int, default=256, help="importance weights per step")
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--impls", default="for-loop,foreach,fused")
    parser.add_argument(
        "--out", default=None, help="results file stem (default bench_step_<device>)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n_params = args.depth * (args.width * args.width + args.width)
    rows = [bench(impl, args, device) for impl in args.impls.split(",")]

    header = f"VCPOAdamW vs AdamW step time, {n_params / 1e6:.1f}M params, {args.batch} weights/step, device={device}"
    if device.type == "cpu":
        header += f", {args.threads} thread(s)"
    lines = [
        header,
        "",
        "| implementation | AdamW ms | VCPOAdamW ms | ratio ours/theirs | state MiB (both) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['impl']} | {r['adamw_ms']:.2f} | {r['vcpo_ms']:.2f} | {r['ratio']:.3f} | {r['state_mib_vcpo']:.0f} |"
        )
    text = "\n".join(lines)
    print(text)
    stem = args.out or f"bench_step_{device.type}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python benchmarks/bench_step.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "params": n_params,
        "median_over_reps": args.reps,
        "results": rows,
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(
        text + f"\n\nCommand: `{meta['command']}` (torch {torch.__version__})\n"
    )


if __name__ == "__main__":
    main()
