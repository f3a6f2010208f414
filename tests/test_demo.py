"""End-to-end and pipeline-invariant tests for the vcpo-demo experiment (seconds on CPU)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from vcpo_optim.demo import main, parse_args
from vcpo_optim.demo.arms import ARMS, parse_arms
from vcpo_optim.demo.pipeline import Config, run_arm, warmup
from vcpo_optim.demo.report import METRIC_COLUMNS

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
    rc = main([*TINY_ARGS, "--arms", "sync,sync-vcpo,no-is,tis,vcpo", "--out", str(out)])
    assert rc == 0
    md = (out / "results.md").read_text()
    assert "| Method | k | Held-out acc" in md
    for label in ("Base (supervised warm-up)", "Sync (k=0)", "Async, sequence TIS (c=8)"):
        assert label in md
    assert "Async, VCPO (TIS + ESS + OPOB) | 2 |" in md
    assert "![" in md and "vcpo_demo.png" in md

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_rows = [r for r in rows if r["step"] >= 0]
    # 2 seeds x (2 sync arms at k=0 + 3 async arms at k=2) x 5 steps
    assert len(step_rows) == 2 * 5 * 5
    for r in step_rows:
        assert set(METRIC_COLUMNS) <= set(r)
        assert 0.0 < r["ess_ratio"] <= 1.0 + 1e-12
        assert r["grad_norm"] >= 0.0 and 0.0 <= r["reward"] <= 1.0
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
    }
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
