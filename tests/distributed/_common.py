"""Models, data and single-process references shared by the distributed tests.

Everything here is deterministic from a seed, so the workers (which each take
their rank's slice of a global batch) and the test process (which runs the
single-process reference on the concatenated batch) build the same numbers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

DTYPE = torch.float64


def global_batch(seed: int, sizes: tuple[int, ...], d_in: int = 4) -> dict[str, torch.Tensor]:
    """A global batch of ``sum(sizes)`` samples: inputs, targets, heavy-tailed log weights."""
    g = torch.Generator().manual_seed(seed)
    b = sum(sizes)
    return {
        "x": torch.randn(b, d_in, generator=g, dtype=DTYPE),
        "y": torch.randn(b, generator=g, dtype=DTYPE),
        "lw": 2.5 * torch.randn(b, generator=g, dtype=DTYPE),
        "reward": torch.randint(0, 2, (b,), generator=g).to(DTYPE),
    }


def local_slice(
    batch: dict[str, torch.Tensor], sizes: tuple[int, ...], rank: int
) -> dict[str, Any]:
    """Rank ``rank``'s contiguous slice of a global batch split by ``sizes``."""
    start = sum(sizes[:rank])
    return {k: v[start : start + sizes[rank]] for k, v in batch.items()}


def make_mlp(seed: int = 0, d_in: int = 4, hidden: int = 8, d_out: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.Tanh(),
        nn.Linear(hidden, d_out),
    ).to(DTYPE)


def per_sample_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """An importance-weighted per-sample surrogate ``l_i = w_i * (f(x_i) - y_i)^2``."""
    pred = model(batch["x"]).reshape(-1)
    return batch["lw"].exp() * (pred - batch["y"]) ** 2


def params_of(model: nn.Module) -> list[torch.Tensor]:
    """Full (unsharded) parameter values, detached, on CPU."""
    out = []
    for p in model.parameters():
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out.append(t.cpu().clone())
    return out


def reference_train(
    seeds: list[int],
    sizes: tuple[int, ...],
    *,
    lr: float = 1e-2,
    weight_decay: float = 0.01,
    model_seed: int = 0,
) -> dict[str, Any]:
    """Single-process VCPOAdamW on the concatenated batch, mean loss over the global batch."""
    from vcpo_optim import VCPOAdamW

    model = make_mlp(model_seed)
    opt = VCPOAdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    out: dict[str, Any] = {"params": [], "lr_scale": [], "ess": [], "n": []}
    for seed in seeds:
        batch = global_batch(seed, sizes)
        loss = per_sample_loss(model, batch).sum() / sum(sizes)
        opt.zero_grad()
        loss.backward()
        opt.step(log_weights=batch["lw"])
        out["params"].append(params_of(model))
        out["lr_scale"].append(opt.last_stats.lr_scale.item())
        out["ess"].append(opt.last_stats.ess.item())
        out["n"].append(int(opt.last_stats.n))
    return out


def assert_params_close(
    got: list[torch.Tensor], want: list[torch.Tensor], rtol: float = 1e-10, atol: float = 1e-12
) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
