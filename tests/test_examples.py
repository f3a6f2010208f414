"""The runnable examples run and print what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, timeout: float = 120) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_quickstart_runs_and_scales_the_lr() -> None:
    out = run_example("quickstart.py")
    lines = [line for line in out.splitlines() if line.startswith("step")]
    assert len(lines) == 7
    scales = [float(line.split("lr_scale")[1].split()[0]) for line in lines]
    assert all(0.0 < s <= 1.0 for s in scales)
    assert min(scales) < 1.0  # stale rollouts did shrink some step
    assert float(lines[-1].split("reward")[1].split()[0]) > float(
        lines[0].split("reward")[1].split()[0]
    )
