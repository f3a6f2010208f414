"""End-to-end and pipeline-invariant tests for the vcpo-demo experiment (seconds on CPU)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from vcpo_optim import effective_sample_size
from vcpo_optim import losses as L
from vcpo_optim.demo import build_config, main, parse_args
from vcpo_optim.demo.arms import ARMS, LARGE_LAGS, SAMPLE_CLIP_C, Arm, parse_arms
from vcpo_optim.demo.calibrate import contribution_norms
from vcpo_optim.demo.experiment import Results, plan
from vcpo_optim.demo.pipeline import (
    Config,
    Diverged,
    correction,
    out_of_range_diverges,
    policy_loss,
    run_arm,
    warmup,
)
from vcpo_optim.demo.report import METRIC_COLUMNS, OFFPOLICY_COLUMNS, results_markdown, summarize
from vcpo_optim.diagnostics import offpolicy_stats

TINY = Config(
    length=2,
    warmup_lr=1e-2,
    warmup_steps=40,
    hidden=16,
    prompts=2,
    group=4,
    steps=6,
    eval_every=3,
    eval_prompts=16,
    lr=1e-2,
)

TINY_ARGS = [
    "--length",
    "2",
    "--prompts",
    "2",
    "--group",
    "4",
    "--steps",
    "5",
    "--warmup-steps",
    "5",
    "--eval-every",
    "2",
    "--seeds",
    "0,1",
    "--lags",
    "0,2",
    "--no-progress",
]


@pytest.fixture(scope="module")
def base_state() -> dict[str, torch.Tensor]:
    state, acc = warmup(TINY, seed=0)
    assert 0.0 <= acc <= 1.0
    return state


def test_end_to_end_outputs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    arms = "sync,sync-vcpo,no-is,tis,vcpo,icepop,vcpo-clip"
    rc = main([*TINY_ARGS, "--arms", arms, "--out", str(out)])
    assert rc == 0
    md = (out / "results.md").read_text()
    assert "| Method | k | Held-out acc" in md and "| K3 KL / token | Capped / masked |" in md
    for label in ("Base (supervised warm-up)", "Sync (k=0)", "Async, sequence TIS (c=8)"):
        assert label in md
    assert "Async, VCPO (TIS + ESS + OPOB) | 2 |" in md
    assert "Async, IcePop [0.5, 5] (token) | 2 |" in md  # explicit --lags: every arm at 2
    assert "![" in md and "vcpo_demo.png" in md

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_rows = [r for r in rows if r["step"] >= 0]
    # 2 seeds x (2 sync arms at k=0 + 5 async arms at k=2) x 5 steps
    assert len(step_rows) == 2 * 7 * 5
    for r in step_rows:
        assert set(METRIC_COLUMNS) <= set(r)
        assert 0.0 < r["ess_ratio"] <= 1.0 + 1e-12
        assert r["grad_norm"] >= 0.0 and 0.0 <= r["reward"] <= 1.0
        assert r["lag"] == r["step"] - r["behaviour_version"] == min(r["step"], r["k"])
        assert r["offpolicy/ess_ratio"] == pytest.approx(r["ess_ratio"], rel=1e-12)
        assert (r["token_masked_frac"] is None) == (r["arm"] != "icepop")
        opob = ARMS[r["arm"]].opob
        for key in ("opob/noise_trace", "opob/noise_grad_sq"):  # B = 8 >= 2: always defined
            assert (r[key] is not None) == opob and (not opob or math.isfinite(r[key]))
        assert (r["opob/num_clipped"] is not None) == (r["arm"] == "vcpo-clip")
    accs = [r["accuracy"] for r in rows if r["accuracy"] is not None]
    assert accs and all(0.0 <= a <= 1.0 for a in accs)

    png = (out / "vcpo_demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    with (out / "summary.csv").open() as fh:
        summary = list(csv.DictReader(fh))
    assert {(s["arm"], s["k"]) for s in summary} == {
        ("sync", "0"),
        ("sync-vcpo", "0"),
        ("no-is", "2"),
        ("tis", "2"),
        ("vcpo", "2"),
        ("icepop", "2"),
        ("vcpo-clip", "2"),
    }
    assert {"k3_token_mean", "capped_or_masked_mean", "weight_ess_ratio_mean"} <= set(summary[0])
    assert all(float(s["cpu_seconds_per_run"]) > 0 for s in summary)
    assert "CPU / run |" in md and ", CPU " in md
    assert "| Clipped per trajectory | B_simple" in md
    assert f"Async, VCPO + per-trajectory clip (C={SAMPLE_CLIP_C:g}) | 2 |" in md
    clip = next(s for s in summary if s["arm"] == "vcpo-clip")
    assert 0.0 <= float(clip["sample_clipped_mean"]) <= 1.0
    assert math.isnan(float(next(s for s in summary if s["arm"] == "vcpo")["sample_clipped_mean"]))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["steps"] == 5 and cfg["lags"] == [0, 2]


@pytest.mark.parametrize("arm", ["sync", "sync-vcpo"])
def test_lag_zero_is_exactly_on_policy(arm: str, base_state: dict[str, torch.Tensor]) -> None:
    rows = [r for r in run_arm(TINY, ARMS[arm], 0, 0, base_state) if r["step"] >= 0]
    assert len(rows) == TINY.steps
    for r in rows:
        assert r["behaviour_version"] == r["step"]
        assert r["lw_max"] == 0.0 and r["lw_min"] == 0.0
        assert r["ess_ratio"] == 1.0
        assert r["lr_scale"] == 1.0
        assert r["lag"] == 0
        assert r["offpolicy/ess_ratio"] == 1.0 and r["offpolicy/token_ess_ratio"] == 1.0
        assert r["offpolicy/k3_kl_token_mean"] == 0.0 and r["offpolicy/chi2"] == 0.0
        assert r["offpolicy/frac_above_tis_cap"] == 0.0


def test_rollouts_come_from_the_snapshot_of_step_t_minus_k(
    base_state: dict[str, torch.Tensor],
) -> None:
    lag = 3
    cfg = dataclasses.replace(TINY, steps=8)
    seen: list[dict[str, Any]] = []
    run_arm(cfg, ARMS["vcpo"], lag, 0, base_state, on_step=seen.append)
    assert [s["step"] for s in seen] == list(range(cfg.steps))
    current = [s["current_state"] for s in seen]
    probe = cfg.make_policy()
    for s in seen:
        t = s["step"]
        v = max(0, t - lag)
        assert s["behaviour_version"] == v
        for name, tensor in current[v].items():
            assert torch.equal(s["behaviour_state"][name], tensor), (t, name)
        # the recorded behaviour log-probs are those of that snapshot
        probe.load_state_dict(current[v])
        with torch.no_grad():
            assert torch.equal(probe.token_logp(s["prompts"], s["responses"]), s["logp_old"])
    # the learner really moved, so lag > 0 was stale: the snapshots differ
    assert any(not torch.equal(current[0][n], current[-1][n]) for n in current[0])


def test_async_rows_have_nonzero_log_weights(base_state: dict[str, torch.Tensor]) -> None:
    rows = [r for r in run_arm(TINY, ARMS["tis"], 2, 0, base_state) if r["step"] >= 0]
    assert [r["behaviour_version"] for r in rows] == [max(0, t - 2) for t in range(TINY.steps)]
    assert any(r["lw_max"] != 0.0 for r in rows[1:])
    assert all(r["lr_scale"] == 1.0 for r in rows)  # no ESS scaling in the tis arm


def test_ess_arm_scales_the_lr(base_state: dict[str, torch.Tensor]) -> None:
    rows = [r for r in run_arm(TINY, ARMS["ess"], 2, 0, base_state) if r["step"] >= 0]
    for r in rows:
        assert r["lr_scale"] == pytest.approx(min(1.0, r["ess_ratio"]) ** 0.5, rel=1e-9)


def test_default_sweep_runs_the_new_arms_at_the_large_lags_only() -> None:
    cfg = build_config(parse_args([]))
    assert not cfg.all_lags and cfg.arms == tuple(ARMS)
    runs = {(s.arm, s.lag) for s in plan(cfg) if s.seed == 0}
    new = [a for a in ARMS.values() if a.lags is not None]
    assert {a.name for a in new} == {"tis-rho", "icepop", "m2po", "vcpo-rho", "vcpo-clip"}
    for arm in ARMS.values():
        lags = [0] if arm.sync else ([8, 32, 128] if arm.lags is None else list(LARGE_LAGS))
        assert {k for a, k in runs if a == arm.name} == set(lags), arm.name
    assert len(plan(cfg)) == 3 * (2 + 6 * 3 + 5 * 2)
    # --all-lags, or explicit --lags, runs every arm at every lag
    for argv in (["--all-lags"], ["--lags", "0,8,32,128"]):
        full = build_config(parse_args(argv))
        assert full.all_lags and len(plan(full)) == 3 * (2 + 11 * 3)


@pytest.fixture(scope="module")
def replayed(base_state: dict[str, torch.Tensor]) -> dict[str, list[tuple[dict, dict]]]:
    """Per arm: (step row, batch as the learner saw it) for each step, lag 3, ESS target 0.9."""
    cfg = dataclasses.replace(TINY, steps=8, ess_target=0.9)
    out = {}
    for name in ("tis", "tis-rho", "icepop", "m2po", "vcpo-rho"):
        seen: list[dict[str, Any]] = []
        rows = [r for r in run_arm(cfg, ARMS[name], 3, 0, base_state, on_step=seen.append)]
        rows = [json.loads(json.dumps(r)) for r in rows if r["step"] >= 0]  # as in metrics.jsonl
        assert len(rows) == len(seen) == cfg.steps
        probe = cfg.make_policy()
        for s in seen:
            probe.load_state_dict(s["current_state"])
            with torch.no_grad():
                s["logp"] = probe.token_logp(s["prompts"], s["responses"])
            s["rewards"] = cfg.make_task().reward(s["prompts"], s["responses"])
        out[name] = list(zip(rows, seen))
    return out


MASK = torch.ones(TINY.prompts * TINY.group, TINY.length, dtype=torch.bool)
GROUPS = torch.arange(TINY.prompts).repeat_interleave(TINY.group)


@pytest.mark.parametrize("arm", ["tis", "icepop", "vcpo-rho"])
def test_metrics_diagnostics_equal_an_independent_offpolicy_stats_call(
    arm: str, replayed: dict[str, list[tuple[dict, dict]]]
) -> None:
    for row, s in replayed[arm]:
        ref = offpolicy_stats(s["logp"], s["logp_old"], MASK, tis_cap=TINY.tis_c).as_dict()
        assert {k: row[k] for k in OFFPOLICY_COLUMNS} == ref, row["step"]
    steps = [r for r, _ in replayed[arm]]
    assert any(r["offpolicy/k3_kl_token_mean"] > 0 for r in steps)  # really off-policy


def test_tis_arm_caps_at_c(replayed: dict[str, list[tuple[dict, dict]]]) -> None:
    for row, s in replayed["tis"]:
        assert row["log_cap"] == pytest.approx(math.log(TINY.tis_c), rel=1e-15)
        assert row["frac_capped"] == row["offpolicy/frac_above_tis_cap"]
        lw = L.sequence_log_weights(s["logp"], s["logp_old"], MASK)
        w = lw.exp().clamp(max=TINY.tis_c)
        assert row["weight_ess_ratio"] == pytest.approx(
            float(w.sum() ** 2 / (w.numel() * (w * w).sum())), rel=1e-12
        )


@pytest.mark.parametrize("arm", ["tis-rho", "vcpo-rho"])
def test_ess_targeted_arm_meets_its_target(
    arm: str, replayed: dict[str, list[tuple[dict, dict]]]
) -> None:
    rho, capped = 0.9, 0
    for row, s in replayed[arm]:
        lw = L.sequence_log_weights(s["logp"], s["logp_old"], MASK)
        assert row["weight_ess_ratio"] >= rho * (1 - 1e-12)
        if row["ess_ratio"] >= rho:  # the raw weights meet the target: no cap
            assert row["log_cap"] is None and row["frac_capped"] is None
            assert row["weight_ess_ratio"] == pytest.approx(row["ess_ratio"], rel=1e-12)
        else:  # the largest cap meeting the target: the ESS sits exactly on it
            capped += 1
            assert row["weight_ess_ratio"] == pytest.approx(rho, rel=1e-9)
            w = lw.clamp(max=row["log_cap"]).exp()
            assert float(effective_sample_size(weights=w).ratio) == pytest.approx(rho, rel=1e-9)
            assert row["frac_capped"] == float((lw > row["log_cap"]).double().mean()) > 0
        if arm == "vcpo-rho":  # ESS scaling on the raw weights, as in vcpo
            assert row["lr_scale"] == pytest.approx(min(1.0, row["ess_ratio"]) ** 0.5, rel=1e-9)
    assert capped >= 2  # the test saw the cap bind


def _oracle_contributions(
    cfg: Config, s: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One backward per trajectory, float64, written from the formulas (no OPOB, no
    per_sample_pg_loss): the unclipped OPOB coefficients c_i = (R_i - b_g) / std_g(R) with
    b_g = sum n R / sum n over the prompt group, n_i = |grad l_i|^2 of the arm's loss
    l_i = -min(w_i, c) mean_t logp_it / B, and the per-sample gradients."""
    policy = cfg.make_policy().double()
    policy.load_state_dict({k: v.double() for k, v in s["current_state"].items()})
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the policy's one-hot features
    try:
        logp = policy.token_logp(s["prompts"], s["responses"])
    finally:
        torch.set_default_dtype(default)
    lw = (logp.detach() - s["logp_old"].double()).sum(1)
    w = lw.exp().clamp(max=cfg.tis_c)
    n_b = logp.shape[0]
    losses = -w * logp.mean(1) / n_b
    params = list(policy.parameters())
    grads = []
    for i in range(n_b):
        g = torch.autograd.grad(losses[i], params, retain_graph=True)
        grads.append(torch.cat([x.reshape(-1) for x in g]))
    n = torch.stack([(g * g).sum() for g in grads])
    r = s["rewards"].double()
    c = torch.empty(n_b, dtype=torch.float64)
    for grp in GROUPS.unique():
        m = GROUPS.eq(grp)
        rg, ng = r[m], n[m]
        b = (ng * rg).sum() / ng.sum() if ng.sum() > 0 else rg.mean()
        std = rg.std(unbiased=False)
        c[m] = (rg - b) / std if std > 0 else torch.zeros_like(rg)
    return c, n, grads


@pytest.fixture(scope="module")
def clip_run(base_state: dict[str, torch.Tensor]) -> tuple[Config, list[tuple[dict, dict]]]:
    """vcpo-clip at lag 3 with a C that clips some trajectories of the tiny batch, not all."""
    cfg = dataclasses.replace(TINY, steps=8, max_sample_grad_norm=0.7)
    seen: list[dict[str, Any]] = []
    rows = run_arm(cfg, ARMS["vcpo-clip"], 3, 0, base_state, on_step=seen.append)
    rows = [json.loads(json.dumps(r)) for r in rows if r["step"] >= 0]  # as in metrics.jsonl
    for s in seen:
        s["rewards"] = cfg.make_task().reward(s["prompts"], s["responses"])
    return cfg, list(zip(rows, seen))


def test_clip_arm_counts_what_an_independent_oracle_clips(
    clip_run: tuple[Config, list[tuple[dict, dict]]],
) -> None:
    """opob/num_clipped = #{i : |c_i| |grad l_i| > C}, from a per-sample loop; and the noise
    fields are OPOB's unbiased estimates from the clipped contributions x_i = f_i c_i grad l_i."""
    cfg, steps = clip_run
    big = total = 0
    n_b = cfg.prompts * cfg.group
    for row, s in steps:
        c, n, grads = _oracle_contributions(cfg, s)
        size = c.abs() * n.sqrt()
        cap = cfg.max_sample_grad_norm
        lo, hi = int((size > cap * (1 + 1e-5)).sum()), int((size > cap * (1 - 1e-5)).sum())
        assert lo <= row["opob/num_clipped"] <= hi, (row["step"], size, cap)
        assert row["opob/frac_clipped"] == row["opob/num_clipped"] / n_b
        big, total = big + lo, total + int((size > 0).sum())
        # the noise scale of the clipped contributions (P - S cancels: absolute tolerance)
        f = torch.where(size > cap, cap / size, torch.ones_like(size))
        x = [fi * ci * g for fi, ci, g in zip(f, c, grads)]
        s_sum = sum(float((xi * xi).sum()) for xi in x)
        p_sum = float((torch.stack(x).sum(0) ** 2).sum())
        scale = (p_sum + s_sum) / (n_b * (n_b - 1))
        for key, ref in (
            ("opob/noise_trace", (n_b * s_sum - p_sum) / (n_b * (n_b - 1))),
            ("opob/noise_grad_sq", (p_sum - s_sum) / (n_b * (n_b - 1))),
        ):
            assert row[key] is not None and math.isfinite(row[key])
            assert row[key] == pytest.approx(ref, abs=1e-4 * scale), (row["step"], key)
        if row["opob/noise_scale"] is not None:
            assert row["opob/noise_scale"] == pytest.approx(
                row["opob/noise_trace"] / row["opob/noise_grad_sq"], rel=1e-9
            )
    assert 0 < big < total  # the clip bound some contributions, and not all of them


def test_icepop_arm_masks_outside_the_band(replayed: dict[str, list[tuple[dict, dict]]]) -> None:
    masked = 0.0
    for row, s in replayed["icepop"]:
        keep = L.icepop_mask(s["logp"], s["logp_old"], MASK, 0.5, 5.0)
        assert row["token_masked_frac"] == pytest.approx(
            1.0 - float(keep.double().mean()), abs=1e-15
        )
        r = (s["logp"].double() - s["logp_old"].double()).exp()
        outside = (r < 0.5) | (r > 5.0)
        assert torch.equal(~keep, outside)
        masked += row["token_masked_frac"]
        assert row["weight_ess_ratio"] is None and row["log_cap"] is None
        # the token weights the learner uses: r_t inside the band, 0 outside
        adv = L.grpo_advantages(s["rewards"], GROUPS)
        lw = L.sequence_log_weights(s["logp"], s["logp_old"], MASK)
        corr = correction(TINY, ARMS["icepop"], s["logp"], s["logp_old"], MASK, lw, adv)
        assert corr.token_weights is not None and torch.all(corr.weights == 1.0)
        torch.testing.assert_close(
            corr.token_weights, torch.where(outside, 0.0, r), rtol=1e-15, atol=0
        )
    assert masked > 0  # the band did cut something


def test_m2po_arm_masks_the_largest_second_moments(
    replayed: dict[str, list[tuple[dict, dict]]],
) -> None:
    masked = 0.0
    for row, s in replayed["m2po"]:
        adv = L.grpo_advantages(s["rewards"], GROUPS)
        keep = L.m2po_mask(s["logp"], s["logp_old"], MASK, 0.04, advantages=adv)
        assert row["token_masked_frac"] == pytest.approx(
            1.0 - float(keep.double().mean()), abs=1e-15
        )
        x = s["logp"].double() - s["logp_old"].double()
        cand = ((adv[:, None] > 0) & (x > 0)) | ((adv[:, None] < 0) & (x < 0))
        assert bool(keep[~cand].all())  # only trust-region candidates are ever masked
        kept = (x * x)[cand & keep]
        if kept.numel():
            assert float(kept.mean()) <= 0.04 + 1e-15
            if (~keep).any():  # the removed ones are the largest (log r)^2
                assert float((x * x)[~keep].min()) >= float(kept.max())
        masked += row["token_masked_frac"]
    assert masked > 0


def _weights_and_loss(arm: str, lw_value: float, adv: torch.Tensor) -> torch.Tensor:
    """The arm's loss on 4 trajectories of 2 tokens with every lw_i = lw_value (ESS/B = 1)."""
    logp = torch.zeros(4, 2, requires_grad=True)
    logp_old = torch.full((4, 2), -lw_value / 2)
    mask = torch.ones(4, 2, dtype=torch.bool)
    lw = L.sequence_log_weights(logp, logp_old, mask)
    corr = correction(TINY, ARMS[arm], logp, logp_old, mask, lw, adv)
    return policy_loss(TINY, ARMS[arm], logp, mask, adv, corr)


@pytest.mark.parametrize(
    ("arm", "lw_value", "where"),
    [
        ("is", 100.0, "exp(100) is finite in float64 (the weights), not in the float32 loss"),
        ("is", 800.0, "exp(800) overflows the float64 weights themselves"),
        ("tis-rho", 100.0, "ESS/B = 1 needs no cap: the weights are exp(100)"),
        ("tis", -120.0, "every weight exp(-120) is below float32's smallest normal"),
        ("vcpo-clip", -120.0, "the same on the OPOB path (no advantages in the loss)"),
        ("tis", -800.0, "exp(-800) underflows the float64 weights themselves"),
    ],
)
def test_weights_the_loss_dtype_cannot_hold_end_the_run(
    arm: str, lw_value: float, where: str
) -> None:
    """vcpo_optim.losses refuses them (overflow, or a loss flushed to 0): Diverged, not a crash."""
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    with pytest.raises(Diverged, match=r"overflow|underflow|smallest normal") as info:
        _weights_and_loss(arm, lw_value, adv)
    assert isinstance(info.value.__cause__, ValueError), where  # the library's refusal
    # TIS at c = 8 is bounded above whatever the log weights
    loss = _weights_and_loss("tis", abs(lw_value), adv)
    torch.testing.assert_close(loss.detach(), torch.zeros(4))  # logp = 0
    corr_w = L.importance_weights(torch.full((4,), abs(lw_value), dtype=torch.float64), "tis")
    torch.testing.assert_close(corr_w, torch.full((4,), 8.0, dtype=torch.float64))


def test_other_value_errors_are_not_divergence() -> None:
    """Only a dtype-range refusal is a divergence; a NaN log-prob or a bad shape is a bug."""
    logp = torch.zeros(4, 2)
    logp[0, 0] = math.nan
    mask = torch.ones(4, 2, dtype=torch.bool)
    corr = correction(
        TINY,
        ARMS["tis"],
        torch.zeros(4, 2),
        torch.zeros(4, 2),
        mask,
        torch.zeros(4, dtype=torch.float64),
        torch.ones(4),
    )
    with pytest.raises(ValueError, match="NaN") as info:
        policy_loss(TINY, ARMS["tis"], logp, mask, torch.ones(4), corr)
    assert not isinstance(info.value, Diverged)
    with pytest.raises(ValueError, match="shape"), out_of_range_diverges():
        raise ValueError("weights must have shape [4]")


def test_a_refused_step_ends_the_run_and_the_report_counts_it(
    base_state: dict[str, torch.Tensor],
) -> None:
    """A run whose loss vcpo_optim.losses refuses ends with a diverged row (no crash), at
    the first step too, and the report counts it as collapsed."""
    rows_by_step = {}
    for at in (0, 2):

        def push(s: dict[str, Any], at: int = at) -> None:
            if s["step"] == at:  # the learner's own behaviour log-probs: every lw_i ~ -120
                s["logp_old"] += 60.0

        rows = run_arm(TINY, ARMS["vcpo-clip"], 2, 0, base_state, on_step=push)
        assert [r["step"] for r in rows] == list(range(-1, at + 1))
        assert "smallest normal" in rows[-1]["diverged"]
        assert 0.0 <= rows[-1]["accuracy"] <= 1.0
        assert all("diverged" not in r for r in rows[:-1])
        rows_by_step[at] = rows
    cfg = dataclasses.replace(TINY, seeds=(0, 1), lags=(2,), arms=("vcpo-clip",), all_lags=True)
    res = Results(cfg=cfg, base_acc={0: 0.1, 1: 0.1})
    res.rows = rows_by_step[0] + [{**r, "seed": 1} for r in rows_by_step[2]]
    for seed in (0, 1):
        res.run_seconds[("vcpo-clip", 2, seed)] = res.run_cpu_seconds[("vcpo-clip", 2, seed)] = 1.0
    (summary,) = summarize(res)
    assert summary["collapsed"] == 2 and summary["n_seeds"] == 2
    assert "| 2/2 |" in results_markdown(res, [summary], None)


def test_an_arm_is_one_line_and_checks_its_options() -> None:
    clip = Arm("x", "X", "tis", opob=True, sample_clip=True, lags=LARGE_LAGS)
    cfg = dataclasses.replace(TINY, max_sample_grad_norm=0.5)
    assert clip.opob_kwargs(cfg) == {"max_sample_grad_norm": 0.5}
    assert ARMS["vcpo"].opob_kwargs(cfg) == {}
    assert ARMS["vcpo-clip"].opob_kwargs(Config()) == {"max_sample_grad_norm": SAMPLE_CLIP_C}
    with pytest.raises(ValueError, match="OPOB option"):
        Arm("x", "X", "tis", sample_clip=True)
    with pytest.raises(ValueError, match="ess_cap needs"):
        Arm("x", "X", "none", ess_cap=True)


def test_cli_parsing_and_errors(tmp_path: Path) -> None:
    args = parse_args(["--quick", "--out", str(tmp_path), "--lags", "0,8", "--arms", "sync,vcpo"])
    assert args.quick and args.lags == (0, 8)
    with pytest.raises(ValueError, match="unknown arm"):
        parse_arms("sync,ppo")
    assert {a.name for a in parse_arms("all")} == set(ARMS)
    assert main(["--arms", "nope", "--out", str(tmp_path)]) == 2
    # only async arms at lag 0 -> nothing to run
    assert main([*TINY_ARGS, "--lags", "0", "--arms", "tis", "--out", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        parse_args(["--lags", "a,b"])
    assert build_config(parse_args(["--max-sample-grad-norm", "0.5"])).max_sample_grad_norm == 0.5
    for bad in ("0", "-1", "inf", "nan"):
        with pytest.raises(SystemExit):
            build_config(parse_args(["--max-sample-grad-norm", bad]))


def test_calibration_measures_the_contributions_clipping_bounds() -> None:
    """calibrate: the nonzero |c_i| |grad l_i| of sync-vcpo, as the float64 oracle has them."""
    cfg = dataclasses.replace(TINY, seeds=(0,), steps=3)
    sizes = contribution_norms(cfg)
    base, _ = warmup(cfg, 0)
    seen: list[dict[str, Any]] = []
    run_arm(cfg, ARMS["sync-vcpo"], 0, 0, base, on_step=seen.append)
    ref = []
    for s in seen:
        s["rewards"] = cfg.make_task().reward(s["prompts"], s["responses"])
        c, n, _ = _oracle_contributions(cfg, s)
        ref.append((c.abs() * n.sqrt())[c != 0])
    torch.testing.assert_close(sizes, torch.cat(ref), rtol=1e-4, atol=1e-9)
    assert sizes.numel() > 0


def no_demo_extra_env(tmp_path: Path) -> dict[str, str]:
    """An environment where the [demo] extra is unimportable, as after a plain `pip install .`."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nsys.modules['matplotlib'] = None\nsys.modules['tqdm'] = None\n"
    )
    return {**os.environ, "PYTHONPATH": str(tmp_path)}


def test_python_dash_m_help_needs_no_demo_extra(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vcpo_optim.demo", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=no_demo_extra_env(tmp_path),
        check=False,
    )
    assert proc.returncode == 0
    assert "--quick" in proc.stdout and "--lags" in proc.stdout


def test_missing_demo_extra_prints_one_line_and_fails(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "vcpo_optim.demo", "--quick", "--out", str(tmp_path / "out")]
    env = no_demo_extra_env(tmp_path)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert 'pip install "vcpo-optim[demo]"' in lines[0]
    assert "matplotlib and tqdm" in lines[0]
    assert not (tmp_path / "out").exists()  # nothing was started
