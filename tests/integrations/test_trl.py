"""VCPOGRPOTrainer against the real TRL GRPOTrainer (CPU, tiny random Qwen2, local tokenizer).

- On-policy (TRL's defaults): bitwise the same parameters and optimizer state
  as plain GRPOTrainer, for the optimizers the Trainer builds.
- Off-policy (num_iterations=2, with and without gradient accumulation): the
  logged ESS equals an independent float64 computation from the parameters
  each step started from, over all micro-batches of the step.
- Every configuration that would make VCPO a silent no-op is refused.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip(
    "trl", reason="the TRL integration tests need the 'trl' extra (make test installs it)"
)

import _trl_setup as S
import torch
from trl import GRPOTrainer

from vcpo_optim import VCPOSGD, VCPOAdamW, unwrap_optimizer
from vcpo_optim.integrations.trl import (
    VCPOConfig,
    VCPOGRPOTrainer,
    sequence_log_weights,
)

# transformers 5 deprecates the gradient_checkpointing names TRL still uses.
pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")

_ESS_KEYS = {"base_ess_ratio", "min_lr_scale", "scale_weight_decay", "ess_power"}


def _group_settings(opt: torch.optim.Optimizer) -> list[dict]:
    return [
        {k: v for k, v in g.items() if k != "params" and k not in _ESS_KEYS}
        | {"n_params": len(g["params"])}
        for g in opt.param_groups
    ]


@pytest.mark.parametrize(
    ("optim", "cls"),
    [("adamw_torch_fused", VCPOAdamW), ("adamw_torch", VCPOAdamW), ("sgd", VCPOSGD)],
)
def test_on_policy_is_bitwise_plain_grpo(tmp_path, optim, cls):
    overrides = {"optim": optim, "weight_decay": 0.1, "max_steps": 3}
    # Each trainer seeds the global RNG (generation samples from it) when it is
    # built: build and train one after the other.
    plain = S.trainer(GRPOTrainer, str(tmp_path / "plain"), **overrides)
    before = [p.detach().clone() for p in plain.model.parameters()]
    plain.train()
    ours = S.trainer(VCPOGRPOTrainer, str(tmp_path / "vcpo"), **overrides)
    ours.train()

    inner = unwrap_optimizer(ours.optimizer)
    assert type(inner) is cls
    ref = plain.optimizer.optimizer
    # The same groups (decay / no-decay), hyper-parameters, fused/foreach flags.
    assert _group_settings(inner) == _group_settings(ref)
    assert {k: v for k, v in inner.defaults.items() if k not in _ESS_KEYS} == ref.defaults
    assert any(g["weight_decay"] == 0.1 for g in inner.param_groups)
    assert any(g["weight_decay"] == 0.0 and g["params"] for g in inner.param_groups)

    changed = False
    for p0, a, b in zip(before, plain.model.parameters(), ours.model.parameters()):
        assert torch.equal(a, b)
        changed |= not torch.equal(p0, a)
    assert changed, "training did not move the parameters: the comparison would be vacuous"
    for pa, pb in zip(plain.model.parameters(), ours.model.parameters()):
        for key in ref.state[pa]:
            assert torch.equal(ref.state[pa][key], inner.state[pb][key]), key

    logs = S.vcpo_logs(ours)
    assert len(logs) == 3
    for entry in logs:
        assert entry["vcpo/ess_ratio"] == 1.0
        assert entry["vcpo/lr_scale"] == 1.0
        assert entry["vcpo/ess"] == entry["vcpo/n"] == 4.0
    assert [e["vcpo/lr"] for e in logs] == [
        h["learning_rate"] for h in ours.state.log_history if "loss" in h
    ]


def test_optimizer_cls_and_kwargs_is_honoured(tmp_path):
    """GRPOTrainer takes no optimizer_cls_and_kwargs argument; the Trainer attribute still works."""

    def build(cls, name, cls_and_kwargs, **kw):
        trainer = S.trainer(cls, str(tmp_path / name), **kw)
        trainer.optimizer_cls_and_kwargs = cls_and_kwargs
        return trainer

    sgd = (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9})
    plain = build(GRPOTrainer, "p", sgd)
    plain.train()
    ours = build(VCPOGRPOTrainer, "v", sgd)
    ours.train()
    inner = unwrap_optimizer(ours.optimizer)
    assert type(inner) is VCPOSGD and inner.defaults["ess_power"] == 1.0  # linear rule
    assert _group_settings(inner) == _group_settings(plain.optimizer.optimizer)
    for a, b in zip(plain.model.parameters(), ours.model.parameters()):
        assert torch.equal(a, b)

    # An ESS-scaled class with its own settings: they apply, unless vcpo_config disagrees.
    own = (VCPOAdamW, {"lr": 0.01, "base_ess_ratio": 0.5})
    trainer = build(VCPOGRPOTrainer, "o", own, max_steps=1)
    trainer.train()
    assert unwrap_optimizer(trainer.optimizer).defaults["base_ess_ratio"] == 0.5
    clash = {"vcpo_config": {"base_ess_ratio": 0.25}}
    trainer = build(VCPOGRPOTrainer, "c", own, max_steps=1, trainer_kwargs=clash)
    with pytest.raises(ValueError, match="set them in one place"):
        trainer.train()


@pytest.mark.parametrize(("batch", "accum"), [(4, 1), (2, 2)])
def test_off_policy_ess_matches_independent_computation(tmp_path, batch, accum):
    """num_iterations=2: step 1 trains on step 0's completions with updated parameters."""
    rec = S.Recorder()
    trainer = S.trainer(
        rec.install(VCPOGRPOTrainer),
        str(tmp_path),
        callbacks=[rec.callback()],
        per_device_train_batch_size=batch,
        num_generations=batch,
        gradient_accumulation_steps=accum,
        num_iterations=2,
        max_steps=2,
    )
    trainer.train()
    logs = S.vcpo_logs(trainer)
    assert len(logs) == 2 and len(rec.batches) == 2
    assert all(len(b) == accum for b in rec.batches)
    for step, entry in enumerate(logs):
        # The observed count is the whole step: every micro-batch, not the last one.
        assert entry["vcpo/n"] == batch * accum
        lw = S.oracle_log_weights(rec, step, behaviour_step=0)
        ess, ratio = S.oracle_ess(lw)
        assert entry["vcpo/ess"] == pytest.approx(ess, rel=2e-5)
        assert entry["vcpo/ess_ratio"] == pytest.approx(ratio, rel=2e-5)
        assert entry["vcpo/lr_scale"] == pytest.approx(math.sqrt(ratio), rel=2e-5)
    # Step 0 is on-policy (the behaviour is the current policy); step 1 is not.
    assert logs[0]["vcpo/ess_ratio"] == 1.0
    assert logs[1]["vcpo/lr_scale"] < 0.99
    lr = [h["learning_rate"] for h in trainer.state.log_history if "loss" in h]
    assert logs[1]["vcpo/lr"] == pytest.approx(lr[1] * logs[1]["vcpo/lr_scale"], rel=1e-12)
    # The check discriminates: GSPO's per-token mean would give another ESS.
    mean_ess, _ = S.oracle_ess(S.oracle_log_weights(rec, 1, 0, reduce="mean"))
    assert abs(mean_ess - logs[1]["vcpo/ess"]) > 1e-2 * logs[1]["vcpo/ess"]


def test_off_policy_steps_per_generation(tmp_path):
    """steps_per_generation=2 > accumulation: the second step trains on stale completions."""
    rec = S.Recorder()
    trainer = S.trainer(
        rec.install(VCPOGRPOTrainer),
        str(tmp_path),
        callbacks=[rec.callback()],
        per_device_train_batch_size=2,
        num_generations=2,
        steps_per_generation=2,
        max_steps=2,
    )
    trainer.train()
    logs = S.vcpo_logs(trainer)
    ess, _ = S.oracle_ess(S.oracle_log_weights(rec, 1, behaviour_step=0))
    assert logs[1]["vcpo/n"] == 2
    assert logs[1]["vcpo/ess"] == pytest.approx(ess, rel=2e-5)
    assert logs[1]["vcpo/lr_scale"] < 1.0


def test_vcpo_config_reaches_the_optimizer(tmp_path):
    trainer = VCPOGRPOTrainer(
        model=S.model(),
        reward_funcs=S.reward,
        args=S.config(str(tmp_path), num_iterations=2, max_steps=2),
        train_dataset=S.dataset(),
        processing_class=S.tokenizer(),
        vcpo_config={"base_ess_ratio": 0.25, "min_lr_scale": 0.5},
    )
    trainer.train()
    inner = unwrap_optimizer(trainer.optimizer)
    assert inner.defaults["base_ess_ratio"] == 0.25
    assert all(g["min_lr_scale"] == 0.5 for g in inner.param_groups)
    entry = S.vcpo_logs(trainer)[1]
    expected = max(0.5, min(1.0, entry["vcpo/ess_ratio"] / 0.25) ** 0.5)
    assert entry["vcpo/lr_scale"] == pytest.approx(expected, rel=1e-12)


def test_user_optimizer_must_be_ess_scaled(tmp_path):
    model = S.model()
    args = S.config(str(tmp_path))
    common = {
        "reward_funcs": S.reward,
        "args": args,
        "train_dataset": S.dataset(),
        "processing_class": S.tokenizer(),
    }
    with pytest.raises(TypeError, match="does no ESS step scaling"):
        VCPOGRPOTrainer(
            model=model, optimizers=(torch.optim.AdamW(model.parameters()), None), **common
        )
    opt = VCPOAdamW(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="vcpo_config would be ignored"):
        VCPOGRPOTrainer(model=model, optimizers=(opt, None), vcpo_config=VCPOConfig(), **common)
    trainer = VCPOGRPOTrainer(model=model, optimizers=(opt, None), **common)
    trainer.train()
    assert unwrap_optimizer(trainer.optimizer) is opt
    assert opt.last_stats is not None and opt.last_stats.observed
    assert S.vcpo_logs(trainer)[-1]["vcpo/n"] == 4


def test_refusals_leave_the_model_untouched(tmp_path):
    with pytest.raises(ValueError, match="base_ess_ratio"):
        VCPOConfig(base_ess_ratio=0.0)
    with pytest.raises(TypeError, match="vcpo_config must be"):
        VCPOGRPOTrainer(model=S.model(), vcpo_config=0.5)
    trainer = S.trainer(VCPOGRPOTrainer, str(tmp_path), optim="galore_adamw_layerwise")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(ValueError, match="inside backward"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert all(p.grad is None for p in trainer.model.parameters())


def test_loss_without_policy_logprobs_is_refused(tmp_path):
    """A TRL loss path that bypasses the log-prob method would make VCPO silently off."""

    class OtherLoss(VCPOGRPOTrainer):
        def _compute_loss(self, model, inputs):
            return sum(p.sum() for p in model.parameters()) * 0.0

    trainer = S.trainer(OtherLoss, str(tmp_path), max_steps=1)
    with pytest.raises(RuntimeError, match="could not find the policy log-probs"):
        trainer.train()


def test_sequence_log_weights():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5], [-1.0, -1.0, -1.0]])
    old = torch.tensor([[-1.5, -2.0, -9.0], [-0.5, -1.5, -0.5], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    lw, live = sequence_log_weights(logps, {"completion_mask": mask, "old_per_token_logps": old})
    assert lw.dtype == torch.float64
    assert lw.tolist() == [0.5, 1.0, 0.0]
    assert live.tolist() == [True, True, False]
    # vLLM's sampling log-probs take precedence; a NaN (unscored token) counts as ratio 1.
    sampling = torch.tensor([[-1.0, float("nan"), -3.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    tool = torch.tensor([[1, 1, 1], [1, 0, 1], [1, 1, 1]])
    lw, _ = sequence_log_weights(
        logps,
        {
            "completion_mask": mask,
            "tool_mask": tool,
            "old_per_token_logps": old,
            "sampling_per_token_logps": sampling,
        },
    )
    assert lw.tolist() == [0.0, -1.0, 0.0]
    # On-policy: exactly zero.
    lw, _ = sequence_log_weights(logps, {"completion_mask": mask})
    assert lw.tolist() == [0.0, 0.0, 0.0]
    # A NaN in the policy's (or TRL's old) log-probs is not hidden: observe() will raise.
    bad = logps.clone()
    bad[0, 0] = float("nan")
    for extra in ({}, {"old_per_token_logps": old}, {"sampling_per_token_logps": sampling}):
        lw, _ = sequence_log_weights(bad, {"completion_mask": mask, **extra})
        assert math.isnan(lw[0]) and not lw[1:].isnan().any()
    old_bad = old.clone()
    old_bad[1, 0] = float("nan")
    lw, _ = sequence_log_weights(logps, {"completion_mask": mask, "old_per_token_logps": old_bad})
    assert math.isnan(lw[1])
    with pytest.raises(ValueError, match="old_per_token_logps has shape"):
        sequence_log_weights(logps, {"completion_mask": mask, "old_per_token_logps": old[:, :2]})
