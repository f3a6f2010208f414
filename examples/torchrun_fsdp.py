"""Asynchronous GRPO with VCPOAdamW on an FSDP2 (``fully_shard``) model, with DCP checkpoints.

Run on CPU (gloo) or on GPUs (nccl), unchanged::

    torchrun --nproc_per_node=2 examples/torchrun_fsdp.py --ckpt /tmp/vcpo_ckpt
    torchrun --nproc_per_node=2 examples/torchrun_fsdp.py --ckpt /tmp/vcpo_ckpt --resume

The task, the policy and the stale sampler are those of ``torchrun_ddp.py``.
Differences that matter:

* ``fully_shard`` turns every parameter into a ``DTensor`` sharded over the
  data-parallel mesh; ``VCPOAdamW`` steps them like ``torch.optim.AdamW``
  does, with the ESS of the global batch (one all-gather of 9 numbers per
  rank per step).
* FSDP2 averages gradients over the data-parallel ranks (like DDP).
* The optimizer state (Adam moments, step counts, the VCPO configuration in
  the param groups) is saved and restored with ``torch.distributed.checkpoint``
  through ``get_state_dict`` / ``set_state_dict``: a resumed run continues the
  same trajectory. The sampler's staleness and the data stream are part of
  the saved state here, so ``--resume`` reproduces the uninterrupted run.
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torchrun_ddp import BigramPolicy, reward, sample, token_logps

from vcpo_optim import VCPOAdamW
from vcpo_optim.losses import grpo_advantages, per_sample_pg_loss, sequence_log_weights


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded parameters (every rank gets them; fine for a small sampler copy)."""
    return {
        k: v.full_tensor() if hasattr(v, "full_tensor") else v
        for k, v in model.state_dict().items()
    }


# FSDP2 warns that Linear on a 3-D input returns a view; nothing here modifies it in place.
warnings.filterwarnings("ignore", message=".*returned a view tensor")


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
    ap.add_argument("--ckpt", default=None, help="DCP checkpoint directory (saved at the end)")
    ap.add_argument("--save-at", type=int, default=None, help="save after this many steps")
    ap.add_argument("--resume", action="store_true", help="load --ckpt first")
    args = ap.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))

    torch.manual_seed(0)
    policy = BigramPolicy(args.vocab, args.dim).to(device)
    for layer in (policy.embed, policy.hidden, policy.head):
        fully_shard(layer, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    opt = VCPOAdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    sampler = BigramPolicy(args.vocab, args.dim).to(device).eval()
    gen = torch.Generator().manual_seed(1000 + rank)
    start = 0

    if args.resume:
        msd, osd = get_state_dict(policy, opt)
        state = {"model": msd, "optim": osd, "sampler": sampler.state_dict(), "meta": {}}
        state["meta"] = {"step": torch.zeros((), dtype=torch.int64)}
        dcp.load(state, checkpoint_id=args.ckpt)
        set_state_dict(
            policy, opt, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        sampler.load_state_dict(state["sampler"])
        start = int(state["meta"]["step"])
        # the per-rank generator state is saved next to the checkpoint by each rank
        gen.set_state(torch.load(os.path.join(args.ckpt, f"gen{rank}.pt")))
        if rank == 0:
            print(f"resumed from {args.ckpt} at step {start}", flush=True)

    def save(step: int) -> None:
        msd, osd = get_state_dict(policy, opt)
        state = {
            "model": msd,
            "optim": osd,
            "sampler": sampler.state_dict(),
            "meta": {"step": torch.tensor(step)},
        }
        dcp.save(state, checkpoint_id=args.ckpt)
        torch.save(gen.get_state(), os.path.join(args.ckpt, f"gen{rank}.pt"))
        if rank == 0:
            print(f"saved {args.ckpt} at step {step}", flush=True)

    for step in range(start, args.steps):
        if args.ckpt and args.save_at is not None and step == args.save_at:
            save(step)
        if step % args.lag == 0:
            sampler.load_state_dict(full_state(policy))
        prompts = torch.randint(0, args.vocab, (args.prompts,), generator=gen).to(device)
        prompts = prompts.repeat_interleave(args.group)
        groups = torch.arange(args.prompts, device=device).repeat_interleave(args.group)
        tokens, logp_old = sample(sampler, prompts, args.length, gen)
        rewards = reward(tokens, args.vocab)
        mask = torch.ones_like(logp_old, dtype=torch.bool)

        opt.zero_grad()
        logp = token_logps(policy, tokens)
        lw = sequence_log_weights(logp, logp_old, mask)
        adv = grpo_advantages(rewards, groups)
        per_sample_pg_loss(logp, mask, adv, lw.exp(), agg="seq-mean-token-sum").sum().backward()
        opt.step(log_weights=lw)

        mean_r = rewards.mean()
        dist.all_reduce(mean_r)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            s = opt.last_stats
            print(
                f"step {step:3d}  reward {mean_r.item() / world:.3f}  "
                f"ess/B {s.ess_ratio.item():.3f}  lr_scale {s.lr_scale.item():.3f}",
                flush=True,
            )
    if args.ckpt and args.save_at is None:
        save(args.steps)
    checksum = sum(float(v.double().sum()) for v in full_state(policy).values())
    if rank == 0:
        print(f"final parameter checksum {checksum:.12e}", flush=True)
    dist.barrier()  # both ranks are done with every collective before the group goes away
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
