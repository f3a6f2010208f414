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
from vcpo_optim.demo.arms import ARMS, LARGE_LAGS, Arm, parse_arms
from vcpo_optim.demo.experiment import plan
from vcpo_optim.demo.pipeline import Config, Diverged, correction, run_arm, warmup
from vcpo_optim.demo.report import METRIC_COLUMNS, OFFPOLICY_COLUMNS
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
    arms = "sync,sync-vcpo,no-is,tis,vcpo,icepop"
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
    # 2 seeds x (2 sync arms at k=0 + 4 async arms at k=2) x 5 steps
    assert len(step_rows) == 2 * 6 * 5
    for r in step_rows:
        assert set(METRIC_COLUMNS) <= set(r)
        assert 0.0 < r["ess_ratio"] <= 1.0 + 1e-12
        assert r["grad_norm"] >= 0.0 and 0.0 <= r["reward"] <= 1.0
        assert r["lag"] == r["step"] - r["behaviour_version"] == min(r["step"], r["k"])
        assert r["offpolicy/ess_ratio"] == pytest.approx(r["ess_ratio"], rel=1e-12)
        assert (r["token_masked_frac"] is None) == (r["arm"] != "icepop")
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
    }
    assert {"k3_token_mean", "capped_or_masked_mean", "weight_ess_ratio_mean"} <= set(summary[0])
    assert all(float(s["cpu_seconds_per_run"]) > 0 for s in summary)
    assert "CPU / run |" in md and ", CPU " in md
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
    assert {a.name for a in new} == {"tis-rho", "icepop", "m2po", "vcpo-rho"}
    for arm in ARMS.values():
        lags = [0] if arm.sync else ([8, 32, 128] if arm.lags is None else list(LARGE_LAGS))
        assert {k for a, k in runs if a == arm.name} == set(lags), arm.name
    assert len(plan(cfg)) == 3 * (2 + 6 * 3 + 4 * 2)
    # --all-lags, or explicit --lags, runs every arm at every lag
    for argv in (["--all-lags"], ["--lags", "0,8,32,128"]):
        full = build_config(parse_args(argv))
        assert full.all_lags and len(plan(full)) == 3 * (2 + 10 * 3)


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


def test_weights_that_overflow_the_loss_dtype_end_the_run() -> None:
    """float64 log weights: exp(100) is finite in float64 but not in the float32 loss."""
    logp = torch.zeros(4, 2)
    for lw_value, arm in ((100.0, "is"), (800.0, "is"), (100.0, "tis-rho")):
        logp_old = torch.full((4, 2), -lw_value / 2)  # every lw_i = lw_value: ESS/B = 1
        lw = L.sequence_log_weights(logp, logp_old, torch.ones(4, 2, dtype=torch.bool))
        with pytest.raises(Diverged, match="overflow"):
            correction(TINY, ARMS[arm], logp, logp_old, torch.ones(4, 2), lw, torch.ones(4))
        # TIS at c = 8 is bounded whatever the log weights
        corr = correction(TINY, ARMS["tis"], logp, logp_old, torch.ones(4, 2), lw, torch.ones(4))
        torch.testing.assert_close(corr.weights, torch.full((4,), 8.0, dtype=torch.float64))


def test_an_arm_is_one_line_and_checks_its_options() -> None:
    clip = Arm("x", "X", "tis", opob=True, max_sample_grad_norm=0.5, lags=LARGE_LAGS)
    assert clip.opob_kwargs() == {"max_sample_grad_norm": 0.5}
    assert ARMS["vcpo"].opob_kwargs() == {}
    with pytest.raises(ValueError, match="OPOB option"):
        Arm("x", "X", "tis", max_sample_grad_norm=0.5)
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
