"""The figure: held-out accuracy, ESS ratio and gradient norm against step, per lag."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from vcpo_optim.demo.arms import ARMS, COLORS
from vcpo_optim.demo.experiment import Results


def _smooth(y: np.ndarray, w: int) -> np.ndarray:
    if w <= 1 or y.size < w:
        return y
    kernel = np.ones(w) / w
    pad = np.concatenate([np.full(w - 1, y[0]), y])
    return np.convolve(pad, kernel, mode="valid")


def _series(rows: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    pts.sort()
    return np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)


def make_figure(res: Results, path: Path, smooth: int = 5) -> Path:
    """One column per lag > 0 (lag 0 alone if that is all there is); rows: accuracy,
    ESS ratio, gradient norm, K3 KL per token. Lines are means over seeds (accuracy
    with a min-max band); the other rows are smoothed with a ``smooth``-step moving
    average. The sync arms (k = 0) are drawn in every column for reference (not in
    the K3 row: their K3 is exactly 0)."""
    cfg = res.cfg
    runs: dict[tuple[str, int], list[list[dict[str, Any]]]] = {}
    by: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for r in res.rows:
        by.setdefault((r["arm"], r["k"], r["seed"]), []).append(r)
    for (arm, k, _seed), rows in by.items():
        runs.setdefault((arm, k), []).append(rows)
    lags = [k for k in cfg.lags if k > 0] or [0]
    sync_keys = [key for key in runs if key[1] == 0]
    width = max(9.0, 4.6 * len(lags))
    keys_by_row = ("accuracy", "ess_ratio", "grad_norm", "offpolicy/k3_kl_token_mean")
    fig, axes = plt.subplots(len(keys_by_row), len(lags), figsize=(width, 13.0), squeeze=False)
    for col, k in enumerate(lags):
        keys = [key for key in runs if key[1] == k and k > 0] + sync_keys
        for arm, kk in keys:
            color = COLORS.get(arm, None)
            ls = "--" if kk == 0 else "-"
            label = ARMS[arm].label if kk == 0 else f"{ARMS[arm].label}"
            for row_i, key in enumerate(keys_by_row):
                if kk == 0 and key.startswith("offpolicy/k3"):
                    continue
                series = [_series(rows, key) for rows in runs[(arm, kk)]]
                n = min(len(s[0]) for s in series)
                x = series[0][0][:n]
                ys = np.stack([s[1][:n] for s in series])
                ax = axes[row_i, col]
                if key == "accuracy":
                    ax.plot(x, ys.mean(0), color=color, ls=ls, label=label, lw=1.6)
                    if ys.shape[0] > 1:
                        ax.fill_between(x, ys.min(0), ys.max(0), color=color, alpha=0.12, lw=0)
                else:
                    ax.plot(x, _smooth(ys.mean(0), smooth), color=color, ls=ls, lw=1.2)
        axes[0, col].set_title(f"lag k = {k}" if k > 0 else "k = 0")
        axes[0, col].set_ylabel("held-out accuracy")
        axes[0, col].set_ylim(-0.02, 1.0)
        axes[1, col].set_ylabel(f"ESS / B (moving avg {smooth})")
        if any((line.get_ydata() > 0).any() for line in axes[1, col].get_lines()):
            axes[1, col].set_yscale("log")
        axes[1, col].set_ylim(max(1.0 / (cfg.prompts * cfg.group) / 2, 1e-3), 1.3)
        axes[2, col].set_ylabel(f"grad norm, pre-clip (moving avg {smooth})")
        if any((line.get_ydata() > 0).any() for line in axes[2, col].get_lines()):
            axes[2, col].set_yscale("log")
        axes[3, col].set_ylabel(f"K3 KL(mu ‖ pi) / token (moving avg {smooth})")
        if any((line.get_ydata() > 0).any() for line in axes[3, col].get_lines()):
            axes[3, col].set_yscale("log")
            axes[3, col].set_ylim(bottom=1e-4)
        axes[3, col].set_xlabel("learner step")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    legend: dict[str, Any] = {}  # every arm once, whichever columns it runs in
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    order = {a.label: i for i, a in enumerate(ARMS.values())}
    legend = dict(sorted(legend.items(), key=lambda kv: order.get(kv[0], len(order))))
    fig.legend(
        list(legend.values()),
        list(legend),
        loc="lower center",
        ncol=min(4, max(2, len(lags) + 1)),
        fontsize=9,
    )
    fig.suptitle(
        f"vcpo-demo: {cfg.task} {cfg.length} digits, B={cfg.prompts * cfg.group}, "
        f"lr={cfg.lr:g}, {len(cfg.seeds)} seed(s)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.09, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
