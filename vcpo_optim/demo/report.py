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
from vcpo_optim.demo.pipeline import OPOB_FIELDS
from vcpo_optim.diagnostics import OffPolicyStats

#: The off-policy diagnostics of every step row (``offpolicy_stats(..., tis_cap=c)``).
OFFPOLICY_COLUMNS = tuple(f"offpolicy/{n}" for n in OffPolicyStats.FIELDS)

#: The keys of every step row (``step >= 0``) of ``metrics.jsonl`` that did not diverge.
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
    "lag",
    "weight_ess_ratio",
    "log_cap",
    "frac_capped",
    "token_masked_frac",
    *OFFPOLICY_COLUMNS,
    *OPOB_FIELDS,
    "accuracy",
    "elapsed_s",
)


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.pstdev(xs) if len(xs) > 1 else 0.0)


def _step_mean(steps: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in steps if r.get(key) is not None]
    return statistics.fmean(vals) if vals else None


def _mean_over_seeds(xs: list[float | None]) -> float:
    vals = [x for x in xs if x is not None]
    return statistics.fmean(vals) if vals else math.nan


def summarize(res: Results) -> list[dict[str, Any]]:
    """One dict per (arm, lag): final accuracies over seeds and step statistics.

    Step statistics are means over the steps of a run, then over seeds:
    ``ess_ratio_mean`` (raw weights), ``weight_ess_ratio_mean`` (the weights the
    arm used), ``k3_token_mean`` (K3 KL per token), ``capped_or_masked_mean``
    (fraction of trajectories above the truncation cap, or of tokens masked),
    ``sample_clipped_mean`` (fraction of trajectories whose contribution OPOB's
    per-trajectory clip scaled down; NaN without clipping) and ``noise_scale``
    (OPOB arms: ``B_simple`` of a run = the step mean of ``opob/noise_trace`` over
    the step mean of ``opob/noise_grad_sq``, as McCandlish et al. recommend, then
    the mean over seeds; NaN without OPOB)."""
    by_run: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for r in res.rows:
        by_run.setdefault((r["arm"], r["k"], r["seed"]), []).append(r)
    out = []
    seen: list[tuple[str, int]] = []
    for spec in plan(res.cfg):
        if (spec.arm, spec.lag) not in seen:
            seen.append((spec.arm, spec.lag))
    for arm, lag in seen:
        finals, peaks, ess, gmax, secs, cpus, collapsed = [], [], [], [], [], [], 0
        wess: list[float | None] = []
        k3: list[float | None] = []
        cut: list[float | None] = []
        clipped: list[float | None] = []
        noise: list[float | None] = []
        for seed in res.cfg.seeds:
            rows = by_run.get((arm, lag, seed))
            if not rows:
                continue
            accs = [r["accuracy"] for r in rows if r["accuracy"] is not None]
            steps = [r for r in rows if r["step"] >= 0 and "ess_ratio" in r]
            finals.append(accs[-1])
            peaks.append(max(accs))
            if steps:  # none if the run diverged at its first step
                ess.append(statistics.fmean(r["ess_ratio"] for r in steps))
                gmax.append(max(r["grad_norm"] for r in steps))
            clipped.append(_step_mean(steps, "opob/frac_clipped"))
            tr, g2 = _step_mean(steps, "opob/noise_trace"), _step_mean(steps, "opob/noise_grad_sq")
            noise.append(None if tr is None or g2 is None or g2 == 0 else tr / g2)
            wess.append(_step_mean(steps, "weight_ess_ratio"))
            k3.append(_step_mean(steps, "offpolicy/k3_kl_token_mean"))
            masked = _step_mean(steps, "token_masked_frac")
            cut.append(masked if masked is not None else _step_mean(steps, "frac_capped"))
            secs.append(res.run_seconds.get((arm, lag, seed), math.nan))
            cpus.append(res.run_cpu_seconds.get((arm, lag, seed), math.nan))
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
                "weight_ess_ratio_mean": _mean_over_seeds(wess),
                "k3_token_mean": _mean_over_seeds(k3),
                "capped_or_masked_mean": _mean_over_seeds(cut),
                "sample_clipped_mean": _mean_over_seeds(clipped),
                "noise_scale": _mean_over_seeds(noise),
                "grad_norm_max": max(gmax) if gmax else math.nan,
                "collapsed": collapsed,
                "steps": res.cfg.steps,
                "seconds_per_run": _mean_sd(secs)[0],
                "cpu_seconds_per_run": _mean_sd(cpus)[0],
            }
        )
    return out


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"


def _fmt(x: float, spec: str) -> str:
    return "–" if math.isnan(x) else format(x, spec)


def write_summary_csv(summary: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)


def _lag_note(cfg: Any) -> str:
    limited = [a for a in cfg.arms if ARMS[a].lags is not None]
    if not limited or cfg.all_lags:
        return "Every arm runs at every lag."
    lags = sorted({k for a in limited for k in ARMS[a].lags})  # type: ignore[union-attr]
    names = ", ".join(f"`{a}`" for a in limited)
    return (
        f"{names} run at k = {', '.join(map(str, lags))} only (`--all-lags` runs every arm "
        "at every lag)."
    )


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
        "| Method | k | Held-out acc ↑ | [min, max] | Collapsed | Mean ESS/B | ESS/B used "
        "| K3 KL / token | Capped / masked | Max grad norm | Steps | CPU / run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| Base (supervised warm-up) | – | {_pct(bm)} ± {_pct(bs)} | "
        f"[{_pct(min(base))}, {_pct(max(base))}] | – | – | – | – | – | – | – | "
        f"{res.warmup_cpu_seconds / max(1, n):.1f} s |",
    ]
    for s in summary:
        lines.append(
            f"| {s['method']} | {s['k']} | {_pct(s['acc_mean'])} ± {_pct(s['acc_sd'])} | "
            f"[{_pct(s['acc_min'])}, {_pct(s['acc_max'])}] | {s['collapsed']}/{s['n_seeds']} | "
            f"{s['ess_ratio_mean']:.3f} | {_fmt(s['weight_ess_ratio_mean'], '.3f')} | "
            f"{_fmt(s['k3_token_mean'], '.2g')} | "
            f"{'–' if math.isnan(s['capped_or_masked_mean']) else _pct(s['capped_or_masked_mean'])}"
            f" | {s['grad_norm_max']:.2f} | {s['steps']} | "
            f"{s['cpu_seconds_per_run']:.1f} s |"
        )
    lines += [
        "",
        "Collapsed = seeds whose final accuracy is below half of their base accuracy (or "
        "whose weights `vcpo_optim.losses` refused as out of the float32 range: a diverged run). "
        "Mean ESS/B = ESS ratio of the raw (untruncated) sequence weights averaged over "
        "steps (1 at k=0; after a collapse the policy is nearly deterministic and the ratio "
        "drifts back up, so read it with the accuracy). ESS/B used = the same for the "
        "sequence weights the arm put in its loss (– for the token corrections). "
        "K3 KL / token = K3 estimate of KL(mu ‖ pi_theta) per response token, averaged over "
        "steps (`offpolicy_stats`). Capped / masked = fraction of trajectories above the "
        "arm's truncation cap (TIS: c, ESS-targeted: the per-batch cap), or of response "
        "tokens IcePop/M2PO gave weight 0, averaged over steps. "
        "Max grad norm = largest total gradient norm before clipping at "
        f"{cfg.grad_clip:g}. CPU / run = CPU time (user + sys, one torch thread) of one "
        "simulated run, which does not depend on other jobs on the machine; the simulation "
        "runs sampler and learner in turn, so it does not model the overlap that makes real "
        "async RL faster.",
        "",
    ]
    opob_rows = [s for s in summary if ARMS[s["arm"]].opob]
    if opob_rows:
        lines += [
            "OPOB arms: per-trajectory clipping and the gradient noise scale "
            "(`OPOBResult`, per step in `metrics.jsonl` under `opob/...`).",
            "",
            "| Method | k | Held-out acc ↑ | Clipped per trajectory | B_simple = tr(Σ) / ‖G‖² |",
            "|---|---:|---:|---:|---:|",
        ]
        for s in opob_rows:
            clip = s["sample_clipped_mean"]
            lines.append(
                f"| {s['method']} | {s['k']} | {_pct(s['acc_mean'])} ± {_pct(s['acc_sd'])} | "
                f"{'–' if math.isnan(clip) else _pct(clip)} | {_fmt(s['noise_scale'], '.3g')} |"
            )
        lines += [
            "",
            "Clipped per trajectory = fraction of trajectories whose contribution "
            f"|c_i| ‖∇l_i‖ exceeded C = {cfg.max_sample_grad_norm:g} and was scaled down to "
            "it (`OPOBResult.num_clipped` / B), averaged over steps. B_simple = the simple "
            "gradient noise scale of the per-trajectory contributions c_i ∇l_i (McCandlish "
            "et al. 2018): OPOB's unbiased estimates of tr(Σ) and ‖G‖², each averaged over "
            "the steps of a run, their ratio, then the mean over seeds. It estimates the "
            "batch size beyond which larger batches stop reducing the update's noise "
            f"(B = {cfg.prompts * cfg.group} here).",
            "",
        ]
    if figure:
        lines += [
            f"![accuracy, ESS ratio, gradient norm and K3 KL per step]({figure})",
            "",
        ]
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
        f"- Issue-11 corrections, standalone on GRPO as the field uses them: `tis-rho` = "
        f"sequence TIS capped per batch at the largest cap with ESS/B >= "
        f"{cfg.ess_target:g} (`importance_weights(lw, 'tis', ess_target={cfg.ess_target:g})`"
        f"; Kish: the weighted batch is then worth at least {cfg.ess_target:g} B on-policy "
        "samples, one number chosen once, not tuned); "
        f"`icepop` = token weights r_t inside [{cfg.icepop_band[0]:g}, "
        f"{cfg.icepop_band[1]:g}], 0 outside; `m2po` = token weights r_t, 0 on the "
        f"M2PO mask (tau = {cfg.m2po_tau:g}, the paper's trust-region candidates by the sign "
        "of the GRPO advantage); `vcpo-rho` = `vcpo` with the ESS-targeted cap instead of "
        f"c; `vcpo-clip` = `vcpo` with OPOB's per-trajectory clip C = "
        f"{cfg.max_sample_grad_norm:g} (`OPOB(..., max_sample_grad_norm=C)`: the 90th "
        "percentile of the nonzero on-policy contributions |c_i| ‖∇l_i‖ of `sync-vcpo`, "
        "`python -m vcpo_optim.demo.calibrate`; chosen once, not tuned). " + _lag_note(cfg),
        f"- Total wall-clock {res.total_seconds:.0f} s"
        + (
            ""
            if res.total_cpu_seconds is None
            else f", CPU {res.total_cpu_seconds:.0f} s (user + sys of all processes)"
        )
        + f" ({res.jobs} process(es), "
        f"{res.threads} torch thread(s) each), torch {torch.__version__}, "
        f"{platform.machine()}, Python {platform.python_version()}.",
        "",
    ]
    return "\n".join(lines)
