"""VCPOGRPOTrainer under 2-rank DDP (real gloo processes, accelerate's MULTI_CPU).

The module is also the worker script (see tests/distributed/_harness.py):
each rank trains the same tiny GRPO set-up with ``num_iterations=2`` and
returns its logs and the float64 oracle log weights of its own micro-batches.
The test checks that both ranks log the same ESS, that it counts the global
batch, and that it equals the ESS of both ranks' oracle weights together.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent / "distributed"))
sys.path.insert(0, str(_HERE))

import pytest  # noqa: E402

WORLD = 2
BATCH = 2  # per rank and micro-batch
ACCUM = 2


def s_off_policy_ess():
    import _trl_setup as S
    import torch

    from vcpo_optim import unwrap_optimizer
    from vcpo_optim.integrations.trl import VCPOGRPOTrainer

    rec = S.Recorder()
    trainer = S.trainer(
        rec.install(VCPOGRPOTrainer),
        tempfile.mkdtemp(prefix="vcpo_trl_ddp_"),
        callbacks=[rec.callback()],
        per_device_train_batch_size=BATCH,
        num_generations=2,
        gradient_accumulation_steps=ACCUM,
        num_iterations=2,
        max_steps=2,
    )
    trainer.train()
    assert trainer.accelerator.num_processes == WORLD
    assert type(trainer.model).__name__ == "Qwen2ForCausalLM"  # unwrapped; DDP wraps model_wrapped
    assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel"
    return {
        "logs": S.vcpo_logs(trainer),
        "lw": [S.oracle_log_weights(rec, step, behaviour_step=0) for step in range(2)],
        "params": [p.detach().clone() for p in trainer.model.parameters()],
        "optimizer": type(unwrap_optimizer(trainer.optimizer)).__name__,
        "world": torch.distributed.get_world_size(),
    }


def _opob_run(**overrides):
    import _trl_setup as S
    from transformers import PrinterCallback

    from vcpo_optim.integrations.trl import VCPOGRPOTrainer

    rec = S.GradRecorder()
    syncs = []

    class Probe(rec.install(VCPOGRPOTrainer)):
        def compute_loss(self, model, inputs, *args, **kwargs):
            if self.model.training:  # model: the DDP wrapper; its reducer must stay idle
                syncs.append(bool(model.require_backward_grad_sync))
            return super().compute_loss(model, inputs, *args, **kwargs)

    trainer = Probe(
        model=S.model().double(),
        reward_funcs=S.reward,
        args=S.config(
            tempfile.mkdtemp(prefix="vcpo_trl_opob_ddp_"), max_grad_norm=0.0, **overrides
        ),
        train_dataset=S.dataset(),
        processing_class=S.tokenizer(),
        callbacks=[rec.callback(), rec.grad_callback()],
        use_opob=True,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel"
    return {
        "logs": S.vcpo_logs(trainer),
        "params": rec.params,
        "batches": rec.batches,
        "grads": rec.grads,
        "final": [p.detach().clone() for p in trainer.model.parameters()],
        "ddp_sync": syncs,
    }


def s_opob_groups_across_ranks():
    """3 completions per rank, groups of 2: the middle group has one completion on each rank."""
    return _opob_run(
        loss_type="grpo",
        per_device_train_batch_size=3,
        num_generations=2,
        num_iterations=2,
        max_steps=2,
    )


def s_opob_accumulation():
    """dapo, 2 micro-batches per step: each rank's groups reordered whole into micro-batches."""
    return _opob_run(
        loss_type="dapo",
        scale_rewards="none",
        per_device_train_batch_size=2,
        num_generations=2,
        gradient_accumulation_steps=2,
        max_steps=2,
    )


SCENARIOS = {
    "off_policy_ess": s_off_policy_ess,
    "opob_groups_across_ranks": s_opob_groups_across_ranks,
    "opob_accumulation": s_opob_accumulation,
}


@pytest.fixture(scope="module")
def results():
    pytest.importorskip("trl", reason="the TRL integration tests need the 'trl' extra")
    from _harness import launch

    return launch(__file__, WORLD, timeout=240)


def test_ddp_same_ess_on_both_ranks(results):
    import torch
    from _harness import values

    from vcpo_optim import effective_sample_size

    ranks = values(results, "off_policy_ess")
    assert all(r["world"] == WORLD and r["optimizer"] == "VCPOAdamW" for r in ranks)
    logs0, logs1 = ranks[0]["logs"], ranks[1]["logs"]
    assert len(logs0) == 2
    assert logs0 == logs1  # identical floats on both ranks
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert (a == b).all()  # DDP kept the replicas identical
    for step, entry in enumerate(logs0):
        assert entry["vcpo/n"] == WORLD * BATCH * ACCUM
        lw = torch.cat([r["lw"][step] for r in ranks])
        expected = effective_sample_size(log_weights=lw)
        assert entry["vcpo/ess"] == pytest.approx(float(expected.ess), rel=2e-5)
    assert logs0[0]["vcpo/ess_ratio"] == 1.0
    assert logs0[1]["vcpo/lr_scale"] < 0.99
    # Each rank's own weights give another ESS: the logged one is the global one.
    local = effective_sample_size(log_weights=ranks[0]["lw"][1])
    assert abs(float(local.ratio) - logs0[1]["vcpo/ess_ratio"]) > 1e-3


@pytest.mark.parametrize(
    ("name", "loss_type", "ga", "iters", "norm_by_std"),
    [
        ("opob_groups_across_ranks", "grpo", 1, 2, True),
        ("opob_accumulation", "dapo", 2, 1, False),
    ],
)
def test_ddp_opob_gradient_matches_oracle(results, name, loss_type, ga, iters, norm_by_std):
    """The gradient on every rank is the single-process oracle on both ranks' completions, /W."""
    import _trl_setup as S
    import torch
    from _harness import values

    from vcpo_optim import effective_sample_size

    ranks = values(results, name)
    for a, b in zip(ranks[0]["final"], ranks[1]["final"]):
        assert torch.equal(a, b)  # the replicas stayed identical
    assert ranks[0]["logs"] == ranks[1]["logs"]
    # OPOB all-reduces its own gradient; DDP's reducer is off (no_sync) in every micro-batch,
    # the last one of each step included, so nothing is averaged twice.
    assert all(len(r["ddp_sync"]) == 2 * ga and not any(r["ddp_sync"]) for r in ranks)
    spanning = 0
    for step in range(2):
        batches = [r["batches"][step] for r in ranks]
        assert all(len(b) == ga for b in batches)
        ids = [torch.cat([mb["vcpo_groups"] for mb in b]) for b in batches]
        spanning += len(set(ids[0].tolist()) & set(ids[1].tolist()))
        expected, rewards, lw, _ = S.opob_oracle(
            ranks[0]["params"][step],
            ranks[0]["params"][step - step % iters],
            batches,
            loss_type=loss_type,
            ga=ga,
            spg=ga,
            scope="group",
            norm_by_std=norm_by_std,
        )
        got_r = torch.cat([mb["vcpo_rewards"] for b in batches for mb in b]).double()
        assert torch.equal(got_r, rewards)
        scale = max(float(v.abs().max()) for v in expected.values())
        for r in ranks:
            assert torch.equal(
                r["params"][step]["lm_head.weight"], ranks[0]["params"][step]["lm_head.weight"]
            )
            for key, ref in expected.items():
                torch.testing.assert_close(
                    r["grads"][step][key], ref, rtol=1e-9, atol=1e-11 * scale
                )
        entry = ranks[0]["logs"][step]
        assert entry["vcpo/n"] == 2 * ga * ranks[0]["batches"][step][0]["completion_ids"].shape[0]
        assert entry["vcpo/ess"] == pytest.approx(
            float(effective_sample_size(log_weights=lw).ess), rel=1e-9
        )
    if name == "opob_groups_across_ranks":
        assert spanning == 2  # one group per step had a completion on each rank
        assert ranks[0]["logs"][1]["vcpo/ess_ratio"] < 0.99  # off-policy step: w_i != 1
    else:
        assert spanning == 0


if __name__ == "__main__":
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from _harness import worker_main

    worker_main(SCENARIOS)
