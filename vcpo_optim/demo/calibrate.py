"""Where the per-trajectory clip ``C`` of the ``vcpo-clip`` arm comes from.

``python -m vcpo_optim.demo.calibrate`` runs the synchronous VCPO arm
(``sync-vcpo``: lag 0, OPOB without clipping, every other setting the sweep's)
for every seed and prints the quantiles of the per-trajectory contribution norms
``|c_i| ||grad l_i||`` (``c_i`` OPOB's coefficient, ``||grad l_i||^2`` its
per-sample squared norm: what ``OPOB(..., max_sample_grad_norm=C)`` bounds) over
every trajectory of every step whose coefficient is nonzero (a prompt group
whose rewards are all equal contributes exactly 0 and cannot be clipped).

The demo's ``C`` (:data:`vcpo_optim.demo.arms.SAMPLE_CLIP_C`) is the 90th
percentile of these on-policy contributions, rounded to two significant digits
and fixed: on-policy, clipping would touch the largest tenth of the
contributions; off-policy it bounds any one stale trajectory to what a large
on-policy one contributes. Computed once with the default configuration and not
tuned on the async results.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

import torch

from vcpo_optim.demo.arms import ARMS
from vcpo_optim.demo.pipeline import Config, run_arm, warmup

#: The quantiles printed (the demo's C uses 0.9).
QUANTILES: tuple[float, ...] = (0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


def contribution_norms(cfg: Config) -> torch.Tensor:
    """Nonzero ``|c_i| ||grad l_i||`` of every step of ``sync-vcpo`` over ``cfg.seeds`` (float64)."""
    out: list[torch.Tensor] = []

    def collect(info: dict) -> None:
        res = info["opob"]
        size = res.coefficients.double().abs() * res.sq_norms.double().sqrt()
        out.append(size[res.coefficients != 0])

    for seed in cfg.seeds:
        base, _ = warmup(cfg, seed)
        run_arm(cfg, ARMS["sync-vcpo"], 0, seed, base, on_backward=collect)
    return torch.cat(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vcpo_optim.demo.calibrate", description=__doc__)
    p.add_argument("--seeds", type=str, help="comma-separated seeds (default: the sweep's)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = Config()
    if args.seeds:
        cfg = dataclasses.replace(cfg, seeds=tuple(int(s) for s in args.seeds.split(",")))
    sizes = contribution_norms(cfg)
    total = cfg.steps * cfg.prompts * cfg.group * len(cfg.seeds)
    print(
        f"sync-vcpo, seeds {list(cfg.seeds)}, lr {cfg.lr:g}, B {cfg.prompts * cfg.group}: "
        f"{sizes.numel()} nonzero contributions of {total} trajectories"
    )
    qs = torch.quantile(sizes, torch.tensor(QUANTILES, dtype=torch.float64))
    for q, v in zip(QUANTILES, qs.tolist()):
        print(f"  q{100 * q:g}: {v:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
