"""VCPOGRPOTrainer(use_opob=True) against the real TRL GRPOTrainer (CPU, tiny random float64 Qwen2).

- The gradient the trainer hands to the optimizer equals an independent
  float64 oracle: one backward per completion of its surrogate term (own
  forward, the importance weight from the parameters the batch was generated
  with, the reward recomputed from the decoded text), combined with
  ``(R_i - b*)`` (and ``1/std``, clipping) computed from those per-sample
  gradients; for every supported ``loss_type``, both scopes, gradient
  accumulation (groups kept whole across TRL's shuffle), off-policy steps,
  per-trajectory clipping, activation checkpointing and LoRA. (2-rank DDP:
  test_trl_dist.py.)
- The logged ESS is still the float64 ESS of the step.
- Every setting the surrogate would silently ignore, and group layouts that
  would split a group, are refused before training.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip(
    "trl", reason="the TRL integration tests need the 'trl' extra (make test installs it)"
)

import _trl_setup as S
import torch
from transformers import PrinterCallback

from vcpo_optim.integrations.trl import OPOBConfig, VCPOGRPOTrainer

pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")


def _build(tmp_path, *, opob_config=None, reward=S.reward, peft_config=None, **overrides) -> Any:
    overrides.setdefault("max_grad_norm", 0.0)  # the raw gradient reaches the optimizer
    rec = S.GradRecorder()
    trainer = rec.install(VCPOGRPOTrainer)(
        model=S.model().double(),
        reward_funcs=reward,
        args=S.config(str(tmp_path), **overrides),
        train_dataset=S.dataset(),
        processing_class=S.tokenizer(),
        callbacks=[rec.callback(), rec.grad_callback()],
        use_opob=True,
        opob_config=opob_config,
        peft_config=peft_config,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer, rec


CASES = {
    # loss_type, scope, scale_rewards, per_device, num_generations, ga, num_iterations, clip
    "grpo-group-offpolicy": ("grpo", "group", "group", 4, 2, 1, 2, None),
    "dapo-group-accumulation": ("dapo", "group", "none", 2, 2, 2, 1, None),
    "bnpo-batch-accumulation": ("bnpo", "batch", "batch", 2, 4, 2, 1, None),
    "dr_grpo-group-clipped": ("dr_grpo", "group", "group", 4, 4, 1, 2, 0.02),
    # transformers' (non-reentrant) activation checkpointing: OPOB's two-pass path
    "grpo-group-checkpointing": ("grpo", "group", "group", 4, 2, 2, 1, None),
    # PEFT LoRA (TRL's peft_config): only the adapters are trainable
    "grpo-group-lora": ("grpo", "group", "group", 4, 2, 1, 2, None),
}


def _lora() -> Any:
    peft = pytest.importorskip("peft", reason="the LoRA case needs peft")
    return peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0
    )


@pytest.mark.parametrize("case", list(CASES))
def test_gradient_matches_per_sample_oracle(tmp_path, case):
    loss_type, scope, scale, b, g, ga, iters, clip = CASES[case]
    peft_config = _lora() if case.endswith("lora") else None
    opob_config: dict[str, Any] = {"scope": scope}
    if clip is not None:
        opob_config["max_sample_grad_norm"] = clip
    trainer, rec = _build(
        tmp_path,
        opob_config=opob_config,
        peft_config=peft_config,
        loss_type=loss_type,
        scale_rewards=scale,
        per_device_train_batch_size=b,
        num_generations=g,
        gradient_accumulation_steps=ga,
        num_iterations=iters,
        max_steps=2,
        gradient_checkpointing=case.endswith("checkpointing"),
    )
    trainer.train()
    assert trainer.model.is_gradient_checkpointing == case.endswith("checkpointing")
    assert len(rec.grads) == 2 and all(len(x) == ga for x in rec.batches)
    logs = S.vcpo_logs(trainer)
    clipped = 0
    for step in range(2):
        for batch in rec.batches[step]:
            ids = batch["vcpo_groups"]
            if scope == "group":  # whole groups in every micro-batch (TRL's shuffle undone)
                assert all(int((ids == u).sum()) == g for u in ids.unique()), ids
            for u in ids.unique():  # a group is one prompt
                sel = (ids == u).nonzero()[:, 0]
                rows = {
                    tuple(batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist())
                    for i in sel
                }
                assert len(rows) == 1
        behaviour = step - step % iters
        expected, rewards, lw, factors = S.opob_oracle(
            rec.params[step],
            rec.params[behaviour],
            [rec.batches[step]],
            loss_type=loss_type,
            ga=ga,
            spg=ga,
            scope=scope,
            norm_by_std=scale != "none",
            clip=clip,
            peft_config=peft_config,
        )
        got_rewards = torch.cat([x["vcpo_rewards"] for x in rec.batches[step]]).double()
        assert torch.equal(got_rewards, rewards)  # TRL's raw reward, recomputed from the text
        assert rewards.unique().numel() > 1  # the baseline is not trivially the common reward
        scale_g = max(float(v.abs().max()) for v in expected.values())
        assert scale_g > 0
        assert sorted(rec.grads[step]) == sorted(expected)  # every trainable parameter
        if peft_config is not None:
            assert expected and all("lora_" in name for name in expected)
        for name, ref in expected.items():
            torch.testing.assert_close(
                rec.grads[step][name], ref, rtol=1e-9, atol=1e-11 * scale_g, msg=name
            )
        clipped += int((factors < 1).sum())
        # ESS: the float64 ESS of the step's sequence log weights.
        ess, ratio = S.oracle_ess(lw)
        assert logs[step]["vcpo/n"] == b * ga
        assert logs[step]["vcpo/ess"] == pytest.approx(ess, rel=1e-9)
        assert logs[step]["vcpo/ess_ratio"] == pytest.approx(ratio, rel=1e-9)
    if iters > 1:
        assert logs[1]["vcpo/ess_ratio"] < 0.999  # step 1 is off-policy: the check is not vacuous
    if clip is not None:
        assert 0 < clipped < 2 * b * ga  # the clip acts on some trajectories, not all


def _construct(tmp_path, *, use_opob=True, opob_config=None, **overrides) -> Any:
    model = S.model()
    before = [p.detach().clone() for p in model.parameters()]
    try:
        return VCPOGRPOTrainer(
            model=model,
            reward_funcs=S.reward,
            args=S.config(str(tmp_path), **overrides),
            train_dataset=S.dataset(),
            processing_class=S.tokenizer(),
            use_opob=use_opob,
            opob_config=opob_config,
        )
    finally:
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"loss_type": "cispo"}, "loss_type='cispo'"),
        ({"loss_type": "sapo"}, "loss_type='sapo'"),
        ({"importance_sampling_level": "sequence"}, "importance_sampling_level"),
        ({"epsilon_high": 0.28}, "epsilon"),
        ({"epsilon": 0.3}, "epsilon"),
        ({"delta": 2.0}, "delta"),
        ({"beta": 0.04}, "beta=0.04"),
        ({"top_entropy_quantile": 0.2}, "top_entropy_quantile"),
        ({"entropy_coef": 0.01}, "entropy bonus"),
        ({"off_policy_mask_threshold": 0.5}, "off_policy_mask_threshold"),
        ({"multi_objective_aggregation": "normalize_then_sum"}, "multi_objective_aggregation"),
        ({"scale_rewards": "batch"}, "scale_rewards='batch' with opob_config scope='group'"),
    ],
)
def test_settings_the_surrogate_would_ignore_are_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        _construct(tmp_path, **overrides)


def test_split_groups_are_refused(tmp_path):
    # Micro-batches of 2 cannot hold groups of 4 when a generation batch is split in 2.
    layout = {"per_device_train_batch_size": 2, "num_generations": 4}
    with pytest.raises(ValueError, match="would be split") as err:
        _construct(tmp_path, gradient_accumulation_steps=2, **layout)
    assert "per_device_train_batch_size to a multiple of num_generations" in str(err.value)
    # The same layout is fine with one baseline over the step.
    _construct(
        tmp_path,
        gradient_accumulation_steps=2,
        opob_config={"scope": "batch"},
        scale_rewards="batch",
        **layout,
    )
    # The same completions twice in one optimizer step.
    with pytest.raises(ValueError, match="twice in one optimizer step"):
        _construct(
            tmp_path,
            gradient_accumulation_steps=2,
            steps_per_generation=1,
            num_iterations=2,
        )


def test_opob_config_validation(tmp_path):
    with pytest.raises(ValueError, match="use_opob=False"):
        _construct(tmp_path, use_opob=False, opob_config={"scope": "batch"})
    with pytest.raises(ValueError, match="scale_rewards"):
        _construct(tmp_path, opob_config={"norm_by_std": True})
    with pytest.raises(TypeError):
        _construct(tmp_path, opob_config={"no_such_option": 1})
    with pytest.raises(ValueError, match="max_sample_grad_norm with scope='batch'"):
        _construct(
            tmp_path,
            opob_config={"scope": "batch", "max_sample_grad_norm": 1.0},
            scale_rewards="none",
            per_device_train_batch_size=2,
            num_generations=2,
            gradient_accumulation_steps=2,
        )
    with pytest.raises(TypeError, match="opob_config must be"):
        _construct(tmp_path, opob_config=0.5)
    for bad in (
        {"scope": "minibatch"},
        {"agg": "max"},
        {"is_mode": "clip"},
        {"is_cap": 0.0},
        {"max_sample_grad_norm": -1.0},
        {"winsor_q": 0.5},
        {"is_cap": True},
        # a cap the IS mode does not use would be silently ignored
        {"is_mode": "is", "is_cap": 2.0},
        {"is_mode": "none", "is_cap": 2.0},
    ):
        with pytest.raises(ValueError, match="opob_config"):
            OPOBConfig(**bad)
    assert OPOBConfig(is_mode="mis", is_cap=2.0).is_cap == 2.0
    assert OPOBConfig(is_mode="is").is_cap is None
    trainer = _construct(tmp_path, opob_config=OPOBConfig(scope="batch"), scale_rewards="none")
    assert trainer.opob is None  # attached at the first training micro-batch


def test_unscorable_completion_is_refused(tmp_path):
    def partial(completions, **kw):
        return [None if len(c) % 2 else 1.0 for c in completions]

    trainer, _ = _build(tmp_path, reward=partial, max_steps=1)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(ValueError, match="got None from every reward function"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_regroup_keeps_groups_whole_and_every_row():
    from vcpo_optim.integrations.trl import _regroup

    torch.manual_seed(0)
    n, g, chunks = 12, 3, 4
    groups = torch.arange(n) // g + 10
    perm = torch.randperm(n)
    batch = {
        "vcpo_groups": groups[perm],
        "x": torch.arange(n)[perm, None].repeat(1, 2),
        "names": [f"r{i}" for i in perm.tolist()],
        "num_items_in_batch": torch.tensor(7),
        "none": None,
    }
    split = [
        {
            k: (v[i * 3 : (i + 1) * 3] if k in ("vcpo_groups", "x", "names") else v)
            for k, v in batch.items()
        }
        for i in range(chunks)
    ]
    # TRL's split of a shuffled batch splits groups: the check below is not vacuous.
    assert any(len(set(c["vcpo_groups"].tolist())) > 1 for c in split)
    out = _regroup(split, g)
    assert len(out) == chunks
    rows = []
    for c in out:
        assert c["vcpo_groups"].unique().numel() == 1 and c["vcpo_groups"].numel() == g
        assert torch.equal(c["vcpo_groups"], groups[c["x"][:, 0]])  # rows move together
        assert c["names"] == [f"r{i}" for i in c["x"][:, 0].tolist()]
        assert c["num_items_in_batch"] is batch["num_items_in_batch"] and c["none"] is None
        rows += c["x"][:, 0].tolist()
    assert sorted(rows) == list(range(n))
    # Group order: the order in which the shuffled batch first met them.
    first = list(dict.fromkeys(batch["vcpo_groups"].tolist()))
    assert [int(c["vcpo_groups"][0]) for c in out] == first
    with pytest.raises(RuntimeError, match="not complete"):
        _regroup(split[:3], g)
