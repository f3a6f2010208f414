"""Asynchronous GRPO with VCPOAdamW under DistributedDataParallel.

Run on CPU (gloo) or on GPUs (nccl), unchanged::

    torchrun --nproc_per_node=2 examples/torchrun_ddp.py
    torchrun --nproc_per_node=8 examples/torchrun_ddp.py --steps 200

Multi-node: the same script with ``torchrun --nnodes=2 --node_rank=<0|1>
--nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=<host0>:29500``.

The toy policy is a bigram language model that must learn to continue a
prompt token ``p`` with ``p+1, p+2, ...`` (mod vocab). Rollouts come from a
copy of the policy that is ``--lag`` optimizer steps stale (as in an
asynchronous, PipelineRL-style sampler), so every trajectory carries a
sequence-level importance weight ``w_i = pi_theta(tau_i) / mu(tau_i)``.

Each rank samples its own prompts. What matters for distributed VCPO:

* ``VCPOAdamW`` reduces the ESS sufficient statistics over the data-parallel
  group (the world, by default) at ``step()``: every rank gets the ESS of the
  *global* batch and applies the same learning rate.
* DDP averages gradients over ranks. Each rank's loss here is the mean over
  its own (equal-sized) batch, so the averaged gradient is the gradient of the
  global-batch mean. With unequal local batch sizes scale each rank's summed
  loss by ``world_size / global_batch_size`` instead (see the README).
* With ``--opob`` the gradient comes from OPOB, the off-policy optimal
  baseline, reduced over the data-parallel group by
  ``vcpo_optim.OPOB`` (OPOB writes ``.grad`` itself, so DDP's
  gradient all-reduce would never fire: the policy is used unwrapped).
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from vcpo_optim import VCPOAdamW
from vcpo_optim.losses import grpo_advantages, per_sample_pg_loss, sequence_log_weights


class BigramPolicy(nn.Module):
    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits for every position: ``[B, T] -> [B, T, vocab]``."""
        return self.head(torch.tanh(self.hidden(self.embed(tokens))))


@torch.no_grad()
def sample(policy: nn.Module, prompts: torch.Tensor, length: int, gen: torch.Generator):
    """Sample ``length`` tokens after each prompt token; return tokens and behaviour log-probs."""
    tokens = prompts[:, None]
    logps = []
    for _ in range(length):
        logits = policy(tokens[:, -1:])[:, -1].float()
        probs = logits.softmax(-1)
        nxt = torch.multinomial(probs.cpu(), 1, generator=gen).to(tokens.device)
        logps.append(logits.log_softmax(-1).gather(1, nxt))
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens, torch.cat(logps, dim=1)


def token_logps(policy: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Current-policy log-probs of tokens[:, 1:] given their predecessors: ``[B, T]``."""
    logits = policy(tokens[:, :-1]).float()
    return logits.log_softmax(-1).gather(2, tokens[:, 1:, None]).squeeze(2)


def reward(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    target = (tokens[:, :1] + torch.arange(1, tokens.shape[1], device=tokens.device)) % vocab
    return (tokens[:, 1:] == target).float().mean(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per rank per step")
    ap.add_argument("--group", type=int, default=4, help="samples per prompt")
    ap.add_argument("--length", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=16)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--lag", type=int, default=4, help="staleness of the sampler, in steps")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--opob", action="store_true", help="use the OPOB baseline for the gradient")
    args = ap.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")

    torch.manual_seed(0)  # same init everywhere (DDP also broadcasts rank 0's)
    policy = BigramPolicy(args.vocab, args.dim).to(device)
    if args.opob:
        # OPOB reduces its own gradients, so DDP's wrapper has nothing to do;
        # only its start-up broadcast is needed. (Keeping DDP also works: run the forward
        # and opob.backward() under model.no_sync().)
        for p in policy.parameters():
            dist.broadcast(p.data, src=0)
        model = policy
    else:
        model = DDP(policy, device_ids=[device.index] if use_cuda else None)
    opt = VCPOAdamW(model.parameters(), lr=args.lr, weight_decay=0.0)  # ESS over the world
    sampler = copy.deepcopy(policy).eval()
    opob = None
    if args.opob:
        from vcpo_optim import OPOB

        # The seq-mean losses carry 1/B_local and local batches are equal: "mean" is
        # DDP's convention. "sum" (the default) is the right one for losses that do
        # not depend on the local batch size.
        opob = OPOB(policy, scope="group", grad_reduction="mean")
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own prompts

    for step in range(args.steps):
        if step % args.lag == 0:
            sampler.load_state_dict(policy.state_dict())  # the sampler catches up
        prompts = torch.randint(0, args.vocab, (args.prompts,), generator=gen).to(device)
        prompts = prompts.repeat_interleave(args.group)
        groups = torch.arange(args.prompts, device=device).repeat_interleave(args.group)
        groups = groups + rank * args.prompts  # prompt ids unique across ranks
        tokens, logp_old = sample(sampler, prompts, args.length, gen)
        rewards = reward(tokens, args.vocab)
        mask = torch.ones_like(logp_old, dtype=torch.bool)

        opt.zero_grad()
        if opob is None:
            logp = token_logps(model, tokens)
            lw = sequence_log_weights(logp, logp_old, mask)
            adv = grpo_advantages(rewards, groups)
            per_sample_pg_loss(logp, mask, adv, lw.exp(), agg="seq-mean-token-sum").sum().backward()
        else:
            logp = token_logps(model, tokens)
            lw = sequence_log_weights(logp, logp_old, mask)
            # score surrogate l_i = -w_i log pi(tau_i) / B; OPOB applies R_i - b* and
            # reduces sum_i c_i grad l_i over the data-parallel group
            l_vec = per_sample_pg_loss(logp, mask, None, lw.exp(), agg="seq-mean-token-sum")
            opob.backward(l_vec, rewards, groups)
        opt.step(log_weights=lw)

        mean_r = rewards.mean()
        dist.all_reduce(mean_r)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            s = opt.last_stats
            print(
                f"step {step:3d}  reward {mean_r.item() / world:.3f}  "
                f"ess/B {s.ess_ratio.item():.3f}  lr_scale {s.lr_scale.item():.3f}  "
                f"B {int(s.n)}",
                flush=True,
            )
    # Replicas must be identical: compare a parameter checksum across ranks.
    checksum = torch.stack([p.detach().double().sum() for p in policy.parameters()]).sum()
    sums = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(sums, checksum)
    if rank == 0:
        same = all(torch.equal(s, sums[0]) for s in sums)
        print(f"replicas identical: {same}", flush=True)
    # Release DDP (its reducer holds the process group) before tearing the group down.
    del model, opob
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
