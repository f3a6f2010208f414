"""Precision of sequence log weights and surrogate sums for a bf16 policy (issue 8, item 3).

The usual asynchronous-RL case: the learner computes ``logp_new`` in bf16, the
sampler recorded ``logp_old`` in float32. The log weight
``lw_i = sum_t (logp_new - logp_old)`` is compared, per method, against the
correctly rounded sum of the exact differences (``math.fsum``):

* ``bf16``: the old library path (``logp_old`` cast down to bf16, differences and
  sum in bf16);
* ``fp32``: differences and sum in float32;
* ``fp32+f64sum``: differences in float32, sum in float64;
* ``float64``: the library now (``vcpo_optim.losses.sequence_log_weights``).

It also measures the per-sample surrogate ``sum_t logp`` of a bf16 policy summed in
bf16 (old) and in float32 (now), against float64. Token log-probs: 70% confident
tokens (``-Exp(1e-3)``) and 30% others (``-Exp(2)``); ``logp_new = bf16(logp_old +
N(0, sigma^2))`` clamped at 0. Writes benchmarks/results/logweight_precision.{json,md}.

    python benchmarks/bench_logweight_precision.py
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

import torch

from vcpo_optim.losses import sequence_log_weights

RESULTS = Path(__file__).resolve().parent / "results"


def batch(b: int, t: int, sigma: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    confident = torch.rand(b, t, generator=g) < 0.7
    e = torch.empty(b, t, dtype=torch.float64).exponential_(1.0, generator=g)
    old = torch.where(confident, -1e-3 * e, -2.0 * e).to(torch.float32)
    noise = sigma * torch.randn(b, t, generator=g, dtype=torch.float64)
    new = (old.double() + noise).clamp(max=0.0).to(torch.bfloat16)
    return new, old


def reference(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    rows = []
    for i in range(new.shape[0]):
        terms = new[i].double().tolist() + [-v for v in old[i].double().tolist()]
        rows.append(math.fsum(terms))
    return torch.tensor(rows, dtype=torch.float64)


def methods(new: torch.Tensor, old: torch.Tensor) -> dict[str, torch.Tensor]:
    mask = torch.ones_like(new, dtype=torch.bool)
    return {
        "bf16": (new - old.to(torch.bfloat16)).sum(1).double(),
        "fp32": (new.float() - old.float()).sum(1).double(),
        "fp32+f64sum": (new.float() - old.float()).double().sum(1),
        "float64": sequence_log_weights(new, old, mask),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="128,1024,4096,16384,32768")
    ap.add_argument("--sigmas", default="0.05,0.3")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    lengths = [int(x) for x in args.lengths.split(",")]
    sigmas = [float(x) for x in args.sigmas.split(",")]
    rows = []
    for sigma in sigmas:
        for t in lengths:
            err: dict[str, float] = {}
            loss_err = {"bf16": 0.0, "float32": 0.0}
            max_lw = 0.0
            for seed in range(args.seeds):
                new, old = batch(args.batch, t, sigma, seed)
                ref = reference(new, old)
                max_lw = max(max_lw, float(ref.abs().max()))
                for name, lw in methods(new, old).items():
                    err[name] = max(err.get(name, 0.0), float((lw - ref).abs().max()))
                exact = new.double().sum(1)
                for name, dt in (("bf16", torch.bfloat16), ("float32", torch.float32)):
                    s = new.to(dt).sum(1).double()
                    loss_err[name] = max(loss_err[name], float(((s - exact) / exact).abs().max()))
            rows.append(
                {
                    "sigma": sigma,
                    "T": t,
                    "max_abs_lw": max_lw,
                    "lw_err_nats": err,
                    "loss_rel_err": loss_err,
                }
            )
            print(
                f"sigma={sigma} T={t:6d} |lw|max={max_lw:9.1f}  "
                + "  ".join(f"{k}={v:.2e}" for k, v in err.items())
                + f"  | loss sum rel err bf16={loss_err['bf16']:.2e} fp32={loss_err['float32']:.2e}"
            )
    cmd = (
        "python benchmarks/bench_logweight_precision.py "
        f"--lengths {args.lengths} --sigmas {args.sigmas} --batch {args.batch} --seeds {args.seeds}"
    )
    RESULTS.mkdir(exist_ok=True)
    meta = {"torch": torch.__version__, "machine": platform.machine(), "command": cmd}
    (RESULTS / "logweight_precision.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2)
    )
    names = list(rows[0]["lw_err_nats"])
    lines = [
        "Max |error| of the sequence log weight (nats) against math.fsum, bf16 logp_new and "
        f"float32 logp_old, B={args.batch} x {args.seeds} seeds; last two columns: relative "
        "error of a bf16 policy's token-sum surrogate summed in bf16 (old) and float32 (now).",
        "",
        "| sigma | T | max abs lw | " + " | ".join(names) + " | loss sum bf16 | loss sum fp32 |",
        "|---" * (len(names) + 5) + "|",
    ]
    for r in rows:
        e = r["lw_err_nats"]
        lines.append(
            f"| {r['sigma']} | {r['T']} | {r['max_abs_lw']:.1f} | "
            + " | ".join(f"{e[n]:.1e}" for n in names)
            + f" | {r['loss_rel_err']['bf16']:.1e} | {r['loss_rel_err']['float32']:.1e} |"
        )
    lines += ["", f"Command: `{cmd}` (torch {torch.__version__}, {platform.machine()})"]
    (RESULTS / "logweight_precision.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
