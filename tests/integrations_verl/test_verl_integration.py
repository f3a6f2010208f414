"""vcpo_optim.integrations.verl against the real verl 0.9.1 (its own environment: make test-verl).

verl's own code does all the work here: hydra composes verl's ppo_trainer.yaml
with the README's config lines, verl's build_optimizer builds the optimizer,
verl's FSDP2 engine (FSDPEngineWithLMHead) runs its micro-batch loop with verl's
ppo_loss on a tiny random Qwen2. The oracle for the importance weights is an
independent per-sequence forward of the same saved model with plain
transformers, in float64.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest

pytest.importorskip("verl", reason="verl runs in its own environment: `make test-verl`")

import _verl_setup as S
import torch
from verl.utils.metric import Metric
from verl.workers.config.optimizer import build_optimizer
from verl.workers.engine.base import BaseEngine
from verl.workers.engine.fsdp.transformer_impl import (
    FSDPEngine,
    FSDPEngineWithLMHead,
)
from verl.workers.utils.padding import no_padding_2_padding

import vcpo_optim.integrations.verl as vv

# prompt/response lengths of the 4 sequences of one optimizer step (2 micro-batches of 2)
PROMPTS = [3, 5, 4, 2]
RESPONSES = [4, 6, 3, 5]
LR = 0.01
BASE = 0.9  # base_ess_ratio set by S.VCPO_OVERRIDES


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_qwen2")
    S.save_tiny_model(path)
    return path


class Spy:
    """Records what the engine passes to ``optimizer.observe`` (and still observes it)."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.calls: list[dict] = []
        self._observe = opt.observe
        opt.observe = self  # type: ignore[method-assign]

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs)
        return self._observe(*args, **kwargs)


def _train(actor: S.Actor, td) -> dict:
    """One optimizer step, as verl's TrainingWorker.train_batch runs it."""
    with actor.engine.train_mode():
        return actor.engine.train_batch(td, loss_function=actor.loss_fn)


def _float64_ess(lw: torch.Tensor) -> tuple[float, float]:
    w = torch.exp(lw - lw.max())
    ess = float(w.sum() ** 2 / (w * w).sum())
    return ess, ess / lw.numel()


# ------------------------------------------------------------------- config
def test_verl_build_optimizer_returns_ours_from_the_readme_config(model_dir: Path) -> None:
    from verl.utils.config import omega_conf_to_dataclass

    cfg = S.compose(
        model_dir,
        [
            *S.VCPO_OVERRIDES,
            "+actor_rollout_ref.actor.optim.override_optimizer_config.min_lr_scale=0.25",
        ],
    )
    optim_cfg = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor.optim)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))]
    opt = build_optimizer(params, optim_cfg)
    assert type(opt) is vv.VCPOAdamW
    group = opt.param_groups[0]
    # verl's own settings (lr from ppo_trainer.yaml's override here, its default betas/wd) ...
    assert group["lr"] == optim_cfg.lr == LR
    assert group["weight_decay"] == optim_cfg.weight_decay == 0.01
    assert tuple(group["betas"]) == (0.9, 0.999)
    # ... and the ESS keywords through override_optimizer_config
    assert group["base_ess_ratio"] == BASE and group["min_lr_scale"] == 0.25
    assert group["ess_power"] == 0.5
    # importing the module through build_optimizer wrapped the engine
    assert vv._installed()

    sgd_cfg = omega_conf_to_dataclass(
        S.compose(
            model_dir, [*S.VCPO_OVERRIDES, "actor_rollout_ref.actor.optim.optimizer=VCPOSGD"]
        ).actor_rollout_ref.actor.optim
    )
    sgd = build_optimizer(params, sgd_cfg)
    assert type(sgd) is vv.VCPOSGD and sgd.param_groups[0]["ess_power"] == 1.0


def test_ess_keys_need_the_plus_prefix(model_dir: Path) -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="base_ess_ratio"):
        S.compose(
            model_dir,
            ["actor_rollout_ref.actor.optim.override_optimizer_config.base_ess_ratio=0.5"],
        )


# ------------------------------------------------------------------ install
def test_install_is_idempotent() -> None:
    fbb, tb = FSDPEngine.forward_backward_batch, FSDPEngine.train_batch
    assert getattr(fbb, vv._MARK) and getattr(tb, vv._MARK)
    assert vv._original(tb) is BaseEngine.train_batch
    vv.install()
    vv.install()
    assert FSDPEngine.forward_backward_batch is fbb and FSDPEngine.train_batch is tb
    # subclasses inherit the wrapper
    assert FSDPEngineWithLMHead.forward_backward_batch is fbb


@pytest.mark.parametrize(
    ("owner", "name", "replacement"),
    [
        (
            FSDPEngine,
            "forward_backward_batch",
            lambda self, data, loss_function, forward_only=False, micro_batch_hook=None: None,
        ),
        (
            FSDPEngine,
            "forward_backward_batch",
            lambda self, batch, loss_fn, forward_only=False: None,
        ),
        (FSDPEngineWithLMHead, "forward_step", lambda self, micro_batch, loss_function: None),
        (FSDPEngine, "train_batch", lambda self, data, loss_function, **kwargs: None),
    ],
    ids=["fbb-new-arg", "fbb-renamed", "forward_step", "train_batch-kwargs"],
)
def test_changed_verl_signature_fails_clearly_and_patches_nothing(
    monkeypatch: pytest.MonkeyPatch, owner, name, replacement
) -> None:
    import verl

    # a fresh, unpatched verl whose `owner.name` changed
    monkeypatch.setattr(
        FSDPEngine, "forward_backward_batch", vv._original(FSDPEngine.forward_backward_batch)
    )
    monkeypatch.setattr(FSDPEngine, "train_batch", vv._original(FSDPEngine.train_batch))
    monkeypatch.setattr(owner, name, replacement)
    before = (FSDPEngine.forward_backward_batch, FSDPEngine.train_batch)
    with pytest.raises(vv.VerlIntegrationError) as info:
        vv.install()
    message = str(info.value)
    assert f"verl {verl.__version__}" in message
    assert f"{owner.__qualname__}.{name}" in message
    assert "0.9.1" in message
    assert (FSDPEngine.forward_backward_batch, FSDPEngine.train_batch) == before


# ---------------------------------------------------------- the engine loop
@pytest.mark.parametrize(
    ("remove_padding", "behaviour"),
    [(False, "rollout_log_probs"), (True, "rollout_log_probs"), (False, "old_log_probs")],
)
def test_engine_observes_exact_sequence_log_weights(
    model_dir: Path, remove_padding: bool, behaviour: str
) -> None:
    actor = S.build_actor(S.compose(model_dir, S.VCPO_OVERRIDES, remove_padding=remove_padding))
    opt = actor.engine.optimizer
    assert type(opt) is vv.VCPOAdamW
    spy = Spy(opt)

    tensors = S.make_batch(prompt_lens=PROMPTS, response_lens=RESPONSES, seed=1)
    tensors["response_mask"][3] = 0  # sequence 3 dropped (e.g. by rejection sampling)
    ref = S.reference_log_probs(model_dir, tensors)
    g = torch.Generator().manual_seed(5)
    mask = tensors["response_mask"].bool()
    # behaviour policies that differ from pi_theta and from each other (a per-sequence drift
    # plus per-token noise); garbage off the mask
    noise = 0.3 * torch.randn((2, *ref.shape), generator=g, dtype=torch.float64)
    old = ref + noise[0] + torch.tensor([0.5, -0.4, 0.2, 0.0], dtype=torch.float64)[:, None]
    rollout = ref + noise[1] + torch.tensor([-0.6, 0.3, 0.1, 0.0], dtype=torch.float64)[:, None]
    tensors["old_log_probs"] = torch.where(mask, old, torch.full_like(old, -1e4)).float()
    if behaviour == "rollout_log_probs":
        tensors["rollout_log_probs"] = torch.where(mask, rollout, torch.nan).float()
    mu = tensors[behaviour].to(torch.float64)
    lw_ref = torch.where(mask, ref - mu, torch.zeros_like(ref)).sum(-1)

    out = _train(actor, S.to_engine_batch(tensors, actor.engine, global_batch_size=4))

    # one observe per micro-batch, each with that micro-batch's sequences
    assert [c["log_weights"].shape for c in spy.calls] == [(2,), (2,)]
    lw = torch.cat([c["log_weights"] for c in spy.calls])
    has_tokens = torch.cat([c["mask"] for c in spy.calls])
    assert lw.dtype == torch.float64
    assert has_tokens.tolist() == [True, True, True, False]
    torch.testing.assert_close(lw[:3], lw_ref[:3], rtol=0, atol=1e-5)

    stats = opt.last_stats
    ess, ratio = _float64_ess(lw_ref[:3])
    assert stats.observed and int(stats.n) == 3
    assert float(stats.ess) == pytest.approx(ess, rel=1e-5)
    assert float(stats.ess_ratio) == pytest.approx(ratio, rel=1e-5)
    scale = math.sqrt(min(1.0, ratio / BASE))
    assert scale < 0.99  # this batch is off-policy enough to be scaled
    assert float(stats.lr_scale) == pytest.approx(scale, rel=1e-5)

    # the metrics verl's train_batch returns, as verl Metric objects
    metrics = out["metrics"]
    assert "grad_norm" in metrics
    got = {k: v.aggregate() for k, v in metrics.items() if k.startswith("vcpo/")}
    assert all(isinstance(metrics[k], Metric) for k in got)
    assert got == pytest.approx(
        {
            "vcpo/ess": float(stats.ess),
            "vcpo/ess_ratio": float(stats.ess_ratio),
            "vcpo/lr_scale": float(stats.lr_scale),
            "vcpo/n": 3.0,
            "vcpo/lr": LR * float(stats.lr_scale),
        },
        rel=1e-12,
    )
    # they survive verl's DP aggregation (TrainingWorker.train_mini_batch: Metric.aggregate_dp)
    assert Metric.aggregate_dp([metrics["vcpo/ess_ratio"]]) == pytest.approx(float(stats.ess_ratio))


def _on_policy_batch(actor: S.Actor) -> tuple[dict, object]:
    """A batch whose old_log_probs come from verl's own forward-only pass (compute_log_prob)."""
    tensors = S.make_batch(prompt_lens=PROMPTS, response_lens=RESPONSES, seed=2)
    td = S.to_engine_batch(tensors, actor.engine, global_batch_size=4)
    with actor.engine.eval_mode():
        out = actor.engine.infer_batch(td)
    tensors["old_log_probs"] = no_padding_2_padding(out["model_output"]["log_probs"], td).float()
    return tensors, S.to_engine_batch(tensors, actor.engine, global_batch_size=4)


def test_on_policy_step_is_verls_plain_adamw_bitwise(model_dir: Path) -> None:
    ours = S.build_actor(
        S.compose(model_dir, [*S.VCPO_OVERRIDES[:2]])  # default base_ess_ratio=1: no slack
    )
    plain = S.build_actor(S.compose(model_dir, S.TORCH_OVERRIDES))
    assert type(plain.engine.optimizer) is torch.optim.AdamW
    spy = Spy(ours.engine.optimizer)

    tensors, td = _on_policy_batch(ours)
    assert spy.calls == []  # the forward-only pass observes nothing
    out = _train(ours, td)
    _train(plain, S.to_engine_batch(tensors, plain.engine, global_batch_size=4))

    lw = torch.cat([c["log_weights"] for c in spy.calls])
    assert lw.abs().max().item() == 0.0  # verl recomputes the same log-probs bitwise on the CPU
    assert float(ours.engine.optimizer.last_stats.lr_scale) == 1.0
    assert out["metrics"]["vcpo/ess_ratio"].aggregate() == 1.0
    a, b = S.params_of(ours.engine), S.params_of(plain.engine)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_off_policy_step_is_adamw_at_the_scaled_lr(model_dir: Path) -> None:
    ours = S.build_actor(S.compose(model_dir, S.VCPO_OVERRIDES))
    tensors, _ = _on_policy_batch(ours)
    g = torch.Generator().manual_seed(7)
    noise = 0.5 * torch.randn(tensors["old_log_probs"].shape, generator=g)
    tensors["rollout_log_probs"] = tensors["old_log_probs"] + noise * tensors["response_mask"]
    _train(ours, S.to_engine_batch(tensors, ours.engine, global_batch_size=4))
    scale = float(ours.engine.optimizer.last_stats.lr_scale)
    assert 0.0 < scale < 0.99

    # verl's torch.optim.AdamW at lr * scale (weight decay scales with the lr, as in the core)
    plain = S.build_actor(
        S.compose(
            model_dir, [*S.TORCH_OVERRIDES, f"actor_rollout_ref.actor.optim.lr={LR * scale!r}"]
        )
    )
    assert plain.engine.optimizer.param_groups[0]["lr"] == LR * scale
    _train(plain, S.to_engine_batch(tensors, plain.engine, global_batch_size=4))
    a, b = S.params_of(ours.engine), S.params_of(plain.engine)
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------ refusals
def test_step_outside_the_wrapped_loop_is_refused_before_any_change(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    actor = S.build_actor(S.compose(model_dir, S.VCPO_OVERRIDES))
    _, td = _on_policy_batch(actor)
    # as if verl's loop no longer went through the wrapper (another engine, a changed loop)
    monkeypatch.setattr(
        FSDPEngine, "forward_backward_batch", vv._original(FSDPEngine.forward_backward_batch)
    )
    before = S.params_of(actor.engine)
    with pytest.raises(RuntimeError, match="no importance weights were observed"):
        _train(actor, td)
    after = S.params_of(actor.engine)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(actor.engine.optimizer.state) == 0


def test_batch_without_behaviour_log_probs_warns_and_steps_unscaled(model_dir: Path) -> None:
    actor = S.build_actor(S.compose(model_dir, S.VCPO_OVERRIDES))
    tensors = S.make_batch(prompt_lens=PROMPTS, response_lens=RESPONSES, seed=3)
    td = S.to_engine_batch(tensors, actor.engine, global_batch_size=4)

    def nll(model_output, data, dp_group=None):  # an SFT-style loss with verl's signature
        logp = no_padding_2_padding(model_output["log_probs"], data)
        mask = data["response_mask"].to(logp.dtype)
        return -(logp * mask).sum() / mask.sum(), {}

    before = S.params_of(actor.engine)
    with (
        pytest.warns(UserWarning, match="neither 'rollout_log_probs' nor 'old_log_probs'"),
        actor.engine.train_mode(),
    ):
        out = actor.engine.train_batch(td, loss_function=nll)
    stats = actor.engine.optimizer.last_stats
    assert stats is not None and not stats.observed and float(stats.lr_scale) == 1.0
    assert not any(k.startswith("vcpo/") for k in out["metrics"])
    after = S.params_of(actor.engine)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_nan_behaviour_log_prob_is_refused_at_step(model_dir: Path) -> None:
    actor = S.build_actor(S.compose(model_dir, S.VCPO_OVERRIDES))
    tensors, _ = _on_policy_batch(actor)
    tensors["rollout_log_probs"] = tensors["old_log_probs"].clone()
    tensors["rollout_log_probs"][2, 0] = float("nan")  # inside the response mask
    before = S.params_of(actor.engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="NaN"):
            _train(actor, S.to_engine_batch(tensors, actor.engine, global_batch_size=4))
    after = S.params_of(actor.engine)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_model_output_without_log_probs_is_refused(model_dir: Path) -> None:
    """A value model (the critic) or distillation_only: nothing to weight, so refuse loudly."""
    actor = S.build_actor(S.compose(model_dir, S.VCPO_OVERRIDES))
    _, td = _on_policy_batch(actor)
    calls = []
    wrapped = vv._ObservingLoss(lambda **kw: calls.append(kw), actor.engine.optimizer)
    with pytest.raises(ValueError, match="no 'log_probs'"):
        wrapped(model_output={"values": torch.zeros(4)}, data=td, dp_group=None)
    assert calls == []  # refused before verl's loss runs
