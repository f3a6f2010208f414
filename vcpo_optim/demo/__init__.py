"""``vcpo-demo``: a small asynchronous-RL experiment that reproduces the VCPO phenomenon.

Run ``vcpo-demo`` (or ``python -m vcpo_optim.demo``) for the default sweep, or
``vcpo-demo --quick --out DIR`` for a one-seed smoke run. Outputs in ``--out``:
``results.md`` (the table), ``vcpo_demo.png`` (the figure), ``metrics.jsonl`` (one
row per learner step and arm), ``summary.csv`` and ``config.json``.

Modules: :mod:`~vcpo_optim.demo.task` (the verifiable task),
:mod:`~vcpo_optim.demo.policy` (the tiny autoregressive policy),
:mod:`~vcpo_optim.demo.pipeline` (the simulated lagged sampler and the learner),
:mod:`~vcpo_optim.demo.arms`, :mod:`~vcpo_optim.demo.experiment`,
:mod:`~vcpo_optim.demo.report`, :mod:`~vcpo_optim.demo.plot`;
:mod:`~vcpo_optim.demo.calibrate` derives the per-trajectory clip ``C`` of ``vcpo-clip``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["QUICK", "build_config", "main", "parse_args"]

#: Overrides applied by ``--quick`` (one seed, lags 0 and 32, shorter runs).
QUICK: dict[str, object] = {
    "seeds": (0,),
    "lags": (0, 32),
    "steps": 150,
    "warmup_steps": 800,
}


def _ints(s: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from e
    if not vals:
        raise argparse.ArgumentTypeError("empty list")
    return vals


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="vcpo-demo",
        description=(
            "Simulated PipelineRL-style asynchronous RL on a tiny policy: sync vs async "
            "(no IS, TIS, VCPO and its ablations; ESS-targeted TIS, IcePop, M2PO, per-trajectory "
            "clipping) at several "
            "policy lags k."
        ),
    )
    p.add_argument("--quick", action="store_true", help="one seed, k in {0, 32}, 150 steps")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory")
    p.add_argument(
        "--lags",
        type=_ints,
        help="comma-separated lags k, every arm at each (default 0,8,32,128, with "
        "tis-rho,icepop,m2po,vcpo-rho,vcpo-clip at 32,128 only)",
    )
    p.add_argument(
        "--all-lags", action="store_true", help="run every arm at every lag (the full sweep)"
    )
    p.add_argument("--seeds", type=_ints, help="comma-separated seed ids (default 0,1,2)")
    p.add_argument("--steps", type=int, help="learner steps per run (default 300)")
    p.add_argument(
        "--arms",
        type=str,
        help="comma-separated arms, or 'all' (default: all of them, sync,sync-vcpo,"
        "no-is,is,tis,ess,opob,vcpo,tis-rho,icepop,m2po,vcpo-rho,vcpo-clip)",
    )
    p.add_argument("--lr", type=float, help="learning rate of every arm (default 1e-3)")
    p.add_argument("--prompts", type=int, help="prompts per step (default 16)")
    p.add_argument("--group", type=int, help="samples per prompt (default 8)")
    p.add_argument("--task", choices=("reverse", "sort", "cumsum"), help="default reverse")
    p.add_argument("--length", type=int, help="prompt/response length (default 12)")
    p.add_argument("--warmup-steps", type=int, help="supervised warm-up steps (default 1000)")
    p.add_argument("--eval-every", type=int, help="held-out evaluation period (default 10)")
    p.add_argument("--grad-clip", type=float, help="max grad norm, <= 0 disables (default 1)")
    p.add_argument("--tis-c", type=float, help="TIS threshold (default 8)")
    p.add_argument(
        "--max-sample-grad-norm",
        type=float,
        help="per-trajectory clip C of vcpo-clip (default 0.027, see vcpo_optim.demo.calibrate)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="worker processes, one torch thread each (default: min(2, CPU count)); "
        "results do not depend on it",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


#: Modules of the ``[demo]`` extra: the figure and the progress bar.
DEMO_EXTRA: tuple[str, ...] = ("matplotlib", "tqdm")


def missing_demo_modules() -> list[str]:
    """The modules of the ``[demo]`` extra that cannot be imported."""
    missing = []
    for name in DEMO_EXTRA:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def build_config(args: argparse.Namespace):  # -> Config (lazy import keeps --help fast)
    from vcpo_optim.demo.arms import parse_arms
    from vcpo_optim.demo.pipeline import Config

    over: dict[str, object] = dict(QUICK) if args.quick else {}
    mapping = {
        "lags": "lags",
        "seeds": "seeds",
        "steps": "steps",
        "lr": "lr",
        "prompts": "prompts",
        "group": "group",
        "task": "task",
        "length": "length",
        "warmup_steps": "warmup_steps",
        "eval_every": "eval_every",
        "grad_clip": "grad_clip",
        "tis_c": "tis_c",
        "max_sample_grad_norm": "max_sample_grad_norm",
    }
    for arg, key in mapping.items():
        v = getattr(args, arg)
        if v is not None:
            over[key] = v
    if args.all_lags or args.lags is not None:
        over["all_lags"] = True
    if args.arms is not None:
        over["arms"] = tuple(a.name for a in parse_arms(args.arms))
    cfg = dataclasses.replace(Config(), **over)  # type: ignore[arg-type]
    if cfg.steps < 1 or cfg.prompts < 1 or cfg.group < 2 or cfg.eval_every < 1:
        raise SystemExit("vcpo-demo: need steps >= 1, prompts >= 1, group >= 2, eval-every >= 1")
    if any(k < 0 for k in cfg.lags):
        raise SystemExit("vcpo-demo: lags must be >= 0")
    if not (math.isfinite(cfg.max_sample_grad_norm) and cfg.max_sample_grad_norm > 0):
        raise SystemExit("vcpo-demo: --max-sample-grad-norm must be a finite number > 0")
    return cfg


def _cpu_seconds() -> float | None:
    """User + sys CPU time of this process and its reaped children (the workers)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    args = parse_args(argv)
    missing = missing_demo_modules()
    if missing:
        print(
            f"vcpo-demo needs {' and '.join(missing)} (the [demo] extra): "
            'pip install "vcpo-optim[demo]"',
            file=sys.stderr,
        )
        return 1
    try:
        cfg = build_config(args)
    except ValueError as e:
        print(f"vcpo-demo: {e}", file=sys.stderr)
        return 2

    from vcpo_optim.demo.experiment import run_experiment
    from vcpo_optim.demo.plot import make_figure
    from vcpo_optim.demo.report import results_markdown, summarize, write_summary_csv

    out: Path = args.out
    t0 = time.perf_counter()
    try:
        res = run_experiment(
            cfg, out, jobs=args.jobs, threads=args.threads, progress=not args.no_progress
        )
    except ValueError as e:
        print(f"vcpo-demo: {e}", file=sys.stderr)
        return 2
    summary = summarize(res)
    fig = make_figure(res, out / "vcpo_demo.png")
    write_summary_csv(summary, out / "summary.csv")
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    res.total_seconds = time.perf_counter() - t0
    res.total_cpu_seconds = _cpu_seconds()
    md = results_markdown(res, summary, fig.name)
    (out / "results.md").write_text(md)
    print(md.split("\n## Setup")[0])
    cpu = "" if res.total_cpu_seconds is None else f" ({res.total_cpu_seconds:.0f} s CPU)"
    print(f"wrote {out}/results.md, {out}/metrics.jsonl, {fig} in {res.total_seconds:.0f} s{cpu}")
    return 0
