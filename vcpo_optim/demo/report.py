"""The results table (Markdown, in the paper's form) and a CSV of final numbers."""

from __future__ import annotations

import csv
import math
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

from vcpo_optim.demo.arms import ARMS
from vcpo_optim.demo.experiment import Results, plan

METRIC_COLUMNS = (
    "seed",
    "arm",
    "k",
    "step",
    "behaviour_version",
    "reward",
    "ess",
    "ess_ratio",
    "lr_scale",
    "grad_norm",
    "lw_max",
    "lw_min",
    "lw_std",
    "accuracy",
    "elapsed_s",
)


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.pstdev(xs) if len(xs) > 1 else 0.0)


def summarize(res: Results) -> list[dict[str, Any]]:
    """One dict per (arm, lag): final accuracies over seeds and step statistics."""
    by_run: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for r in res.rows:
        by_run.setdefault((r["arm"], r["k"], r["seed"]), []).append(r)
    out = []
    seen: list[tuple[str, int]] = []
    for spec in plan(res.cfg):
        if (spec.arm, spec.lag) not in seen:
            seen.append((spec.arm, spec.lag))
    for arm, lag in seen:
        finals, peaks, ess, gmax, secs, collapsed = [], [], [], [], [], 0
        for seed in res.cfg.seeds:
            rows = by_run.get((arm, lag, seed))
            if not rows:
                continue
            accs = [r["accuracy"] for r in rows if r["accuracy"] is not None]
            steps = [r for r in rows if r["step"] >= 0 and "ess_ratio" in r]
            finals.append(accs[-1])
            peaks.append(max(accs))
            ess.append(statistics.fmean(r["ess_ratio"] for r in steps))
            gmax.append(max(r["grad_norm"] for r in steps))
            secs.append(res.run_seconds.get((arm, lag, seed), math.nan))
            if accs[-1] < 0.5 * res.base_acc[seed] or any("diverged" in r for r in rows):
                collapsed += 1
        out.append(
            {
                "arm": arm,
                "method": ARMS[arm].label,
                "k": lag,
                "n_seeds": len(finals),
                "acc_mean": _mean_sd(finals)[0],
                "acc_sd": _mean_sd(finals)[1],
                "acc_min": min(finals) if finals else math.nan,
                "acc_max": max(finals) if finals else math.nan,
                "peak_mean": _mean_sd(peaks)[0],
                "ess_ratio_mean": _mean_sd(ess)[0],
                "grad_norm_max": max(gmax) if gmax else math.nan,
                "collapsed": collapsed,
                "steps": res.cfg.steps,
                "seconds_per_run": _mean_sd(secs)[0],
            }
        )
    return out


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"


def write_summary_csv(summary: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)


def results_markdown(res: Results, summary: list[dict[str, Any]], figure: str | None) -> str:
    cfg = res.cfg
    base = list(res.base_acc.values())
    bm, bs = _mean_sd(base)
    n = len(cfg.seeds)
    lines = [
        "# vcpo-demo results",
        "",
        f"Simulated PipelineRL-style asynchronous RL, {n} seed(s) per row "
        f"({', '.join(map(str, cfg.seeds))}). Task: `{cfg.task}` of {cfg.length} digits "
        f"(vocabulary {cfg.vocab}), binary exact-match reward. Held-out accuracy = expected "
        f"exact-match accuracy of one temperature-1 sample, mean of pi(y*|x) over "
        f"{cfg.eval_prompts} held-out prompts, after the last step. Mean ± population std "
        f"over seeds, [min, max] in brackets.",
        "",
        "| Method | k | Held-out acc ↑ | [min, max] | Collapsed | Mean ESS/B | Max grad norm "
        "| Steps | Wall-clock / run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| Base (supervised warm-up) | – | {_pct(bm)} ± {_pct(bs)} | "
        f"[{_pct(min(base))}, {_pct(max(base))}] | – | – | – | – | "
        f"{res.warmup_seconds / max(1, n):.1f} s |",
    ]
    for s in summary:
        lines.append(
            f"| {s['method']} | {s['k']} | {_pct(s['acc_mean'])} ± {_pct(s['acc_sd'])} | "
            f"[{_pct(s['acc_min'])}, {_pct(s['acc_max'])}] | {s['collapsed']}/{s['n_seeds']} | "
            f"{s['ess_ratio_mean']:.3f} | {s['grad_norm_max']:.2f} | {s['steps']} | "
            f"{s['seconds_per_run']:.1f} s |"
        )
    lines += [
        "",
        "Collapsed = seeds whose final accuracy is below half of their base accuracy (or "
        "whose raw IS weights overflowed float32). "
        "Mean ESS/B = ESS ratio of the raw (untruncated) sequence weights averaged over "
        "steps (1 at k=0; after a collapse the policy is nearly deterministic and the ratio "
        "drifts back up, so read it with the accuracy). Max grad norm = largest total "
        "gradient norm before clipping at "
        f"{cfg.grad_clip:g}. Wall-clock / run is the elapsed time of one simulated run "
        "(machine shared with other jobs); the simulation runs sampler and learner in "
        "turn, so it does not model the overlap that makes real async RL faster.",
        "",
    ]
    if figure:
        lines += [f"![accuracy, ESS ratio and gradient norm per step]({figure})", ""]
    lines += [
        "## Setup",
        "",
        f"- Policy: MLP over one-hot (prompt, previous {cfg.context} tokens, position), "
        f"{cfg.depth} hidden layers of {cfg.hidden}, Linear/LayerNorm only.",
        f"- Base: {cfg.warmup_steps} Adam steps (lr {cfg.warmup_lr:g}) of supervised "
        f"warm-up on targets with {cfg.warmup_noise:g} of the digits replaced at random.",
        f"- RL, identical for every arm: {cfg.steps} steps, {cfg.prompts} prompts x "
        f"{cfg.group} samples (B = {cfg.prompts * cfg.group}), `VCPOAdamW` lr {cfg.lr:g}, "
        f"betas {cfg.betas}, weight decay {cfg.weight_decay:g}, grad clip {cfg.grad_clip:g}, "
        f"loss aggregation `{cfg.agg}`, TIS threshold c = {cfg.tis_c:g}. No arm is tuned "
        "separately.",
        "- Lag k: the batch of learner step t is sampled by the parameter snapshot of "
        "step max(0, t - k), with behaviour log-probs recorded at sampling time; the "
        "learner recomputes its own log-probs; lw_i = sum_t (log pi - log mu).",
        "- Arms: `no-is` = the plain on-policy GRPO loss applied to stale data (no "
        "importance weights); `is` = raw sequence IS; `tis` = sequence TIS, the paper's "
        "baseline; `vcpo` = TIS + ESS step scaling (sqrt rule on the untruncated weights) "
        "+ OPOB (per prompt group, std-normalised), as in the reference scripts; `ess` and "
        "`opob` = the two ablations; `sync-vcpo` = VCPO at k = 0 (OPOB alone; the ESS "
        "scale is exactly 1 there).",
        f"- Total wall-clock {res.total_seconds:.0f} s ({res.jobs} process(es), "
        f"{res.threads} torch thread(s) each), torch {torch.__version__}, "
        f"{platform.machine()}, Python {platform.python_version()}.",
        "",
    ]
    return "\n".join(lines)
