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


SCENARIOS = {"off_policy_ess": s_off_policy_ess}


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


if __name__ == "__main__":
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from _harness import worker_main

    worker_main(SCENARIOS)
