"""Quickstart: swap AdamW for VCPOAdamW in an off-policy policy-gradient loop.

A tiny contextual-bandit policy learns from rollouts sampled by a policy that
is `LAG` updates stale. Each micro-batch's sequence log importance weights are
handed to the optimizer with `observe()`; `step()` scales that step's lr by
sqrt(ESS/B) over all micro-batches. Everything else is a plain torch loop.

    python examples/quickstart.py
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from vcpo_optim import VCPOAdamW

torch.set_num_threads(1)
torch.manual_seed(0)

N_CONTEXTS, N_ACTIONS, SEQ_LEN, LAG = 8, 6, 4, 4
BATCH, MICRO_BATCHES, STEPS = 32, 2, 60

policy = nn.Sequential(nn.Embedding(N_CONTEXTS, 32), nn.Tanh(), nn.Linear(32, SEQ_LEN * N_ACTIONS))
target = torch.randint(N_ACTIONS, (N_CONTEXTS, SEQ_LEN))  # the "correct answer" per context


def logits(model: nn.Module, ctx: torch.Tensor) -> torch.Tensor:
    return model(ctx).view(-1, SEQ_LEN, N_ACTIONS)


opt = VCPOAdamW(policy.parameters(), lr=3e-2, weight_decay=0.0)  # was: torch.optim.AdamW(...)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)  # sees the unscaled lr
snapshots = [copy.deepcopy(policy)]  # behaviour policies: the sampler runs LAG versions behind

for step in range(STEPS):
    behaviour = snapshots[max(0, len(snapshots) - 1 - LAG)]
    opt.zero_grad()
    for _ in range(MICRO_BATCHES):  # gradient accumulation
        ctx = torch.randint(N_CONTEXTS, (BATCH // MICRO_BATCHES,))
        with torch.no_grad():
            old = torch.log_softmax(logits(behaviour, ctx), -1)
            actions = torch.distributions.Categorical(logits=old).sample()
            old_lp = old.gather(-1, actions[..., None]).squeeze(-1).sum(-1)
            reward = (actions == target[ctx]).float().mean(-1)
        new_lp = (
            torch.log_softmax(logits(policy, ctx), -1)
            .gather(-1, actions[..., None])
            .squeeze(-1)
            .sum(-1)
        )
        log_w = (new_lp - old_lp).detach()  # sequence log importance weight
        advantage = reward - reward.mean()
        loss = -(log_w.exp() * advantage * new_lp).mean() / MICRO_BATCHES
        loss.backward()
        opt.observe(log_weights=log_w)  # this micro-batch's weights
    opt.step()  # lr_eff = lr * sqrt(ESS/B) for this step only
    sched.step()
    snapshots = [*snapshots[-LAG:], copy.deepcopy(policy)]
    if step % 10 == 0 or step == STEPS - 1:
        s = opt.last_stats
        print(
            f"step {step:3d}  reward {reward.mean():.3f}  ESS/B {s.ess_ratio:.3f}  "
            f"lr_scale {s.lr_scale:.3f}  lr {opt.param_groups[0]['lr']:.4f}"
        )
