"""A GRPO training loop with OPOB (off-policy optimal baseline) and VCPOAdamW.

The user story: an asynchronous RL pipeline samples responses with a policy
that is ``LAG`` updates stale. Each step:

1. the behaviour (stale) policy samples ``G`` responses for each of ``P``
   prompts, recording its log-probs;
2. the current policy scores them; the per-trajectory surrogate
   ``l_i = -w_i * s_i`` carries the sequence importance weight ``w_i``
   (``vcpo_optim.losses.per_sample_pg_loss`` without advantages);
3. ``OPOB.backward(l, rewards, groups)`` runs one batched backward, computes
   ``n_i = ||grad l_i||^2``, the per-group baseline
   ``b_g = sum n_i R_i / sum n_i``, and writes
   ``sum_i (R_i - b_g) / std_g(R) * grad l_i`` into ``.grad``
   (GRPO-style ``norm_by_std=True``);
4. ``VCPOAdamW.step(log_weights=lw)`` scales this step's lr by
   ``sqrt(ESS / B)``.

A tiny causal LM with tied input/output embeddings learns to answer with
tokens smaller than the first prompt token. Runs in a few seconds on a CPU:

    python examples/grpo_step.py
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vcpo_optim import OPOB, VCPOAdamW, effective_sample_size
from vcpo_optim.losses import importance_weights, per_sample_pg_loss, sequence_log_weights

torch.set_num_threads(1)
torch.manual_seed(0)

VOCAB, D, PROMPT, RESP = 12, 32, 3, 6
P, G, LAG, STEPS = 4, 8, 2, 60  # prompts per step, samples per prompt, staleness, steps


class TinyLM(nn.Module):
    """One pre-norm attention block, learned positions, tied embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.pos = nn.Embedding(PROMPT + RESP, D)
        self.ln1 = nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.ln2 = nn.RMSNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))
        self.head = nn.Linear(D, VOCAB, bias=False)
        self.head.weight = self.tok.weight  # tied: OPOB sums both uses before the norm
        nn.init.normal_(self.tok.weight, std=0.05)  # small logits at init: the sampler explores

    def forward(self, ids: Tensor) -> Tensor:
        b, t = ids.shape
        # position ids must be [B, T] (expand), not [1, T]: dim 0 is the sample for OPOB
        x = self.tok(ids) + self.pos(torch.arange(t).expand(b, t))
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        x = x + self.proj(
            F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, D)
        )
        x = x + self.mlp(self.ln2(x))
        return self.head(x)


def token_logp(model: nn.Module, seq: Tensor) -> Tensor:
    """Log-probs ``[B, RESP]`` of the response tokens of ``seq`` under ``model``."""
    logits = model(seq)[:, PROMPT - 1 : -1]
    return torch.log_softmax(logits.float(), -1).gather(-1, seq[:, PROMPT:, None]).squeeze(-1)


@torch.no_grad()
def sample(model: nn.Module, prompts: Tensor) -> Tensor:
    seq = prompts
    for _ in range(RESP):
        nxt = torch.multinomial(torch.softmax(model(seq)[:, -1], -1), 1)
        seq = torch.cat([seq, nxt], 1)
    return seq


def reward(seq: Tensor) -> Tensor:
    """Fraction of response tokens below the first prompt token (prompt-dependent)."""
    return (seq[:, PROMPT:] < seq[:, :1]).float().mean(1)


policy = TinyLM()
opt = VCPOAdamW(policy.parameters(), lr=3e-3, weight_decay=0.0)
opob = OPOB(policy, scope="group", norm_by_std=True)  # attach once; hooks stay until opob.detach()
history = [copy.deepcopy(policy)]

for step in range(STEPS):
    behaviour = history[max(0, len(history) - 1 - LAG)].eval()
    prompts = torch.randint(VOCAB, (P, PROMPT)).repeat_interleave(G, 0)  # [P*G, PROMPT]
    groups = torch.arange(P).repeat_interleave(G)  # prompt id of every trajectory
    seq = sample(behaviour, prompts)
    with torch.no_grad():
        logp_old = token_logp(behaviour, seq)
    r = reward(seq)
    mask = torch.ones_like(logp_old, dtype=torch.bool)

    policy.train()
    logp = token_logp(policy, seq)  # the forward OPOB records
    lw = sequence_log_weights(logp, logp_old, mask)  # log pi_theta / mu per trajectory
    w = importance_weights(lw, mode="tis", c=8.0)  # truncated IS weights
    loss = per_sample_pg_loss(
        logp, mask, weights=w, agg="seq-mean-token-mean"
    )  # l_i = -w_i s_i, [B]

    opt.zero_grad(set_to_none=True)
    res = opob.backward(loss, r, groups)  # .grad = sum_i (R_i - b_g) / std_g * grad l_i
    torch.nn.utils.clip_grad_norm_(
        policy.parameters(), 1.0
    )  # .grad is complete: clipping just works
    opt.step(log_weights=lw)  # lr scaled by sqrt(ESS / B) for this step only
    history.append(copy.deepcopy(policy))

    if step % 5 == 0 or step == STEPS - 1:
        print(
            f"step {step:3d}  reward {r.mean():.3f}  ESS/B {effective_sample_size(log_weights=lw).ratio:.2f}  "
            f"baseline[g0] {res.baselines[0]:+.3f}  mean n_i {res.sq_norms.mean():.2e}"
        )

opob.detach()
