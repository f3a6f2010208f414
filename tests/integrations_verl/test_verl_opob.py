"""OPOB mode of vcpo_optim.integrations.verl in verl 0.9.1's own FSDP2 engine (CPU, one process).

verl's code does the work: hydra composes ppo_trainer.yaml with the README's
OPOB lines, build_optimizer builds VCPOAdamW, FSDPEngineWithLMHead runs its
micro-batch loop (packed rows with use_remove_padding, padded rows without),
and its ``loss.backward()`` becomes ``opob.backward``. The oracle is a fresh
Hugging Face model loaded from the same files in float64, one forward and one
backward per sequence, with the baseline and the coefficients computed from
those per-sequence gradients.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("verl", reason="verl runs in its own environment: `make test-verl`")

import _verl_setup as S
import torch
from tensordict.tensorclass import NonTensorData, NonTensorStack

import vcpo_optim.integrations.verl as vv

PROMPTS = [3, 5, 4, 2]
RESPONSES = [4, 6, 3, 5]
UIDS = ["p0", "p0", "p1", "p1"]  # two prompt groups of two responses
REWARDS = [1.0, 0.0, 0.5, 2.0]
DRIFT = [0.4, -0.3, 0.9, 0.1]  # per-sequence drift of the behaviour policy
OPT = "+actor_rollout_ref.actor.optim.override_optimizer_config."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_qwen2_opob")
    S.save_tiny_model(path)
    return path


def _overrides(*extra: str, agg: str = "token-mean") -> list[str]:
    return [
        *S.VCPO_OVERRIDES,
        "actor_rollout_ref.actor.optim.clip_grad=1e6",  # compare the unclipped gradient
        f"actor_rollout_ref.actor.loss_agg_mode={agg}",
        *extra,
    ]


def _tensors(model_dir: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    tensors = S.make_batch(prompt_lens=PROMPTS, response_lens=RESPONSES, seed=4)
    ref = S.reference_log_probs(model_dir, tensors)
    mask = tensors["response_mask"].bool()
    g = torch.Generator().manual_seed(9)
    noise = 0.2 * torch.randn(ref.shape, generator=g, dtype=torch.float64)
    mu = ref + noise + torch.tensor(DRIFT, dtype=torch.float64)[:, None]
    tensors["old_log_probs"] = torch.where(mask, mu, 0.0).float()
    rewards = torch.zeros(ref.shape)
    for i, n in enumerate(RESPONSES):  # the outcome reward sits on the last response token
        rewards[i, n - 1] = REWARDS[i]
    tensors["token_level_rewards"] = rewards
    return tensors, ref


def _engine_batch(tensors: dict[str, torch.Tensor], actor: S.Actor, uids: list[str] = UIDS):
    td = S.to_engine_batch(tensors, actor.engine, global_batch_size=len(uids))
    td["uid"] = NonTensorStack.from_list([NonTensorData(u) for u in uids])  # as DataProto gives it
    return td


def _train_and_grads(actor: S.Actor, td) -> tuple[dict, dict[str, torch.Tensor]]:
    """One verl training step; the full gradients before train_mode's exit zeroes them."""
    with actor.engine.train_mode():
        out = actor.engine.train_batch(td, loss_function=actor.loss_fn)
        grads = {
            n: p.grad.full_tensor().detach().clone()
            for n, p in actor.engine.module.named_parameters()
        }
    return out, grads


def _surrogate(logp: torch.Tensor, m: torch.Tensor, mu: torch.Tensor, o: dict, n_tokens: int):
    """l_i of one sequence (response log-probs ``logp``, mask ``m``) and its log weight."""
    lw = float((logp.detach().double() - mu)[m].sum())
    w = {"none": 1.0, "is": math.exp(lw), "tis": min(math.exp(lw), o["cap"])}[o["is_mode"]]
    b = len(REWARDS)  # verl's global_batch_size
    denom = {
        "token-mean": n_tokens,
        "token-sum": 1.0,
        "seq-mean-token-sum": b,
        "seq-mean-token-sum-norm": b * max(RESPONSES),  # default factor: padded response length
        "seq-mean-token-mean": b * (int(m.sum()) + 1e-8),
    }[o["agg"]]
    return -w * logp[m].sum() / denom, lw


def _hf_per_sequence(model_dir: Path, tensors: dict[str, torch.Tensor], o: dict):
    """float64 Hugging Face model, one forward and one backward per sequence: (names, grads, lws)."""
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    model = model.double().train()
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    prompts, responses = tensors["prompts"], tensors["responses"]
    attention, mask = tensors["attention_mask"], tensors["response_mask"].bool()
    mu = tensors["old_log_probs"].double()
    p_len = prompts.shape[1]
    grads, lws = [], []
    for i in range(prompts.shape[0]):
        pl, rl = int(attention[i, :p_len].sum()), int(attention[i, p_len:].sum())
        ids = torch.cat([prompts[i, p_len - pl :], responses[i, :rl]])
        logp_all = torch.log_softmax(model(ids[None]).logits[0], dim=-1)
        logp = logp_all[pl - 1 : pl - 1 + rl].gather(-1, responses[i, :rl, None])[:, 0]
        loss, lw = _surrogate(logp, mask[i, :rl], mu[i, :rl], o, int(mask.sum()))
        grads.append(torch.autograd.grad(loss, params))
        lws.append(lw)
    return names, grads, lws


def _engine_per_sequence(cfg, tensors: dict[str, torch.Tensor], o: dict):
    """verl's own engine (cfg's precision; plain torch AdamW actor), one backward per sequence."""
    from verl.workers.utils.padding import no_padding_2_padding

    cfg.actor_rollout_ref.actor.optim.optimizer_impl = "torch.optim"
    cfg.actor_rollout_ref.actor.optim.optimizer = "AdamW"
    cfg.actor_rollout_ref.actor.optim.override_optimizer_config = {}
    actor = S.build_actor(cfg, micro_batch_size=1)
    n_tokens = int(tensors["response_mask"].sum())
    names = [n for n, _ in actor.engine.module.named_parameters()]
    grads, lws = [], []
    for i in range(len(REWARDS)):
        seen: list[float] = []

        def loss_fn(model_output, data, dp_group=None, seen=seen):
            logp = no_padding_2_padding(model_output["log_probs"], data)[0]
            m = data["response_mask"][0].bool()
            loss, lw = _surrogate(logp, m, data["old_log_probs"][0].double(), o, n_tokens)
            seen.append(lw)
            return loss, {}

        one = {k: v[i : i + 1] for k, v in tensors.items()}
        td = S.to_engine_batch(one, actor.engine, global_batch_size=1)
        with actor.engine.train_mode():
            actor.engine.optimizer_zero_grad()
            actor.engine.forward_backward_batch(td, loss_fn)
            grads.append(
                [p.grad.full_tensor().double().clone() for p in actor.engine.module.parameters()]
            )
        lws.extend(seen)
    return names, grads, lws


def _oracle(names, grads, lws, *, scope: str, norm_by_std: bool) -> dict:
    """n_i = ||grad l_i||^2, the baselines, the coefficients and sum_i c_i grad l_i."""
    n_seq = len(grads)
    r = torch.tensor(REWARDS, dtype=torch.float64)
    n = torch.tensor([sum(float((t.double() ** 2).sum()) for t in g) for g in grads])
    n = n.to(torch.float64)
    scopes = [[0, 1], [2, 3]] if scope == "group" else [[0, 1, 2, 3]]
    c = torch.zeros(n_seq, dtype=torch.float64)
    b = torch.zeros(n_seq, dtype=torch.float64)
    for s in scopes:
        base = float((n[s] * r[s]).sum() / n[s].sum())
        std = float(r[s].std(unbiased=False))
        for i in s:
            b[i] = base
            c[i] = (r[i] - base) / std if norm_by_std else r[i] - base
    total = {
        name: sum(float(c[i]) * grads[i][k].double() for i in range(n_seq))
        for k, name in enumerate(names)
    }
    return {"sq": n, "baselines": b, "coef": c, "grad": total, "lw": torch.tensor(lws)}


CASES = {
    # scope, remove_padding, micro-batch size, norm_by_std, IS mode, cap, loss_agg_mode
    "group-packed-tis": ("group", True, 2, True, "tis", 1.5, "token-mean"),
    "batch-padded-is-4calls": ("batch", False, 1, False, "is", 8.0, "seq-mean-token-mean"),
    "batch-packed-none": ("batch", True, 2, False, "none", 8.0, "token-mean"),
    "group-padded-2groups-1call": ("group", False, 4, False, "tis", 1.5, "seq-mean-token-mean"),
    "group-packed-checkpointing": ("group", True, 2, True, "tis", 1.5, "token-mean"),
    "group-packed-bf16": ("group", True, 2, True, "tis", 1.5, "token-mean"),
    # verl's token-budget micro-batches (reordered by length) and a bucket pad at the row's tail
    "batch-packed-dynamic-bsz": ("batch", True, 2, False, "tis", 1.5, "token-mean"),
    "group-packed-pad-to-bucket": ("group", True, 2, True, "tis", 1.5, "token-mean"),
    # the other loss_agg_modes of verl
    "group-packed-token-sum": ("group", True, 2, False, "tis", 1.5, "token-sum"),
    "batch-padded-seq-mean-token-sum": ("batch", False, 2, False, "tis", 1.5, "seq-mean-token-sum"),
    "group-packed-seq-mean-token-sum-norm": (
        "group",
        True,
        2,
        True,
        "tis",
        1.5,
        "seq-mean-token-sum-norm",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_opob_step_matches_the_per_sequence_oracle(model_dir: Path, case: str) -> None:
    scope, remove_padding, mbs, norm, is_mode, cap, agg = CASES[case]
    extra = [f"{OPT}opob={scope}", f"{OPT}opob_is_mode={is_mode}"]
    if is_mode in ("tis", "mis"):
        extra.append(f"{OPT}opob_is_cap={cap}")
    if scope == "group":
        extra += [f"{OPT}opob_group_size=2", f"{OPT}opob_norm_by_std={str(norm).lower()}"]
    cfg = S.compose(model_dir, _overrides(*extra, agg=agg), remove_padding=remove_padding)
    # verl's defaults, which the other cases switch off: non-reentrant activation
    # checkpointing, and bf16 compute (FSDP2 mixed precision, autocast; fp32 master weights)
    if case.endswith("checkpointing"):
        cfg.actor_rollout_ref.model.enable_gradient_checkpointing = True
    bf16 = case.endswith("bf16")
    if bf16:
        cfg.actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype = "bf16"
    # fp32: against the float64 loop; bf16: against the same per-sequence loop run through
    # verl's own bf16 engine (bf16 itself is ~5% from float64 on this model)
    tol = 1e-2 if bf16 else 1e-5
    actor = S.build_actor(cfg, micro_batch_size=mbs)
    if case.endswith("dynamic-bsz"):
        actor.engine.engine_config.use_dynamic_bsz = True
        actor.engine.engine_config.max_token_len_per_gpu = 16  # the 4 sequences hold 38 tokens
    if case.endswith("pad-to-bucket"):
        actor.engine.pad_to_length, actor.engine.pad_to_length_bucket = True, 16
    opt = actor.engine.optimizer
    assert type(opt) is vv.VCPOAdamW
    assert opt.vcpo_opob == vv.OPOBSettings(
        scope, 2 if scope == "group" else None, norm, is_mode, cap
    )
    tensors, _ = _tensors(model_dir)
    o = {"is_mode": is_mode, "cap": cap, "agg": agg}
    if bf16:
        loop = _engine_per_sequence(cfg.copy(), tensors, o)
    else:
        loop = _hf_per_sequence(model_dir, tensors, o)
    ref = _oracle(*loop, scope=scope, norm_by_std=norm)
    if is_mode == "tis":  # the cap binds for some sequences and not others
        assert (ref["lw"].exp() > cap).any() and (ref["lw"].exp() < cap).any()

    out, grads = _train_and_grads(actor, _engine_batch(tensors, actor))

    results = opt.vcpo_opob_results
    sq = torch.cat([r.sq_norms for r in results]).double()
    if case.endswith("dynamic-bsz"):  # verl regrouped the sequences by token count
        assert len(results) >= 3
        torch.testing.assert_close(sq.sort().values, ref["sq"].sort().values, rtol=tol, atol=0)
    else:
        assert len(results) == 4 // mbs  # one opob.backward per verl micro-batch
        torch.testing.assert_close(sq, ref["sq"], rtol=tol, atol=0)
    if scope == "group":  # per call; with scope="batch" the baseline moves over the calls
        torch.testing.assert_close(
            torch.cat([r.baselines for r in results]).double(),
            ref["baselines"],
            rtol=tol,
            atol=tol * 1e-2,
        )
    # the gradient verl's optimizer stepped on: sum_i c_i grad l_i over the mini-batch
    assert grads.keys() == ref["grad"].keys()
    got = torch.cat([grads[k].double().flatten() for k in grads])
    want = torch.cat([ref["grad"][k].flatten() for k in grads])
    assert float(want.norm()) > 0
    assert float((got - want).norm()) <= tol * float(want.norm())
    assert out["metrics"]["grad_norm"] == pytest.approx(float(want.norm()), rel=tol)
    # OPOB's own metrics next to verl's
    got_m = {k: v.aggregate() for k, v in out["metrics"].items() if k.startswith("vcpo/opob/")}
    assert got_m == pytest.approx(
        {
            "vcpo/opob/calls": float(len(results)),
            "vcpo/opob/baseline": float(torch.cat([r.baselines for r in results]).double().mean()),
            "vcpo/opob/sq_norm": float(sq.mean()),
        },
        rel=1e-12,
    )
    # the ESS step scaling still observed every sequence
    assert opt.last_stats.observed and int(opt.last_stats.n) == 4


def test_opob_off_by_default_and_bad_settings_refused_at_build(model_dir: Path) -> None:
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config.optimizer import build_optimizer

    params = [torch.nn.Parameter(torch.randn(3, 2))]

    def build(*extra: str):
        cfg = S.compose(model_dir, [*S.VCPO_OVERRIDES, *extra])
        return build_optimizer(params, omega_conf_to_dataclass(cfg.actor_rollout_ref.actor.optim))

    assert build().vcpo_opob is None
    assert build(f"{OPT}opob=batch").vcpo_opob == vv.OPOBSettings("batch")
    assert build(f"{OPT}opob=batch", f"{OPT}opob_is_mode=mis", f"{OPT}opob_is_cap=2").vcpo_opob == (
        vv.OPOBSettings("batch", is_mode="mis", is_cap=2.0)
    )
    for extra, match in [
        ((f"{OPT}opob=grp",), "'group' or 'batch'"),
        ((f"{OPT}opob=group",), "opob_group_size"),
        # a group of one response is its own baseline: every coefficient would be 0
        ((f"{OPT}opob=group", f"{OPT}opob_group_size=1"), "opob_group_size=1"),
        ((f"{OPT}opob=batch", f"{OPT}opob_group_size=4"), "opob_group_size is for opob=group"),
        ((f"{OPT}opob_norm_by_std=true",), "without opob"),
        ((f"{OPT}opob=batch", f"{OPT}opob_is_mode=clip"), "opob_is_mode"),
        ((f"{OPT}opob=batch", f"{OPT}opob_is_cap=0"), "opob_is_cap"),
        # a cap the IS mode does not use would be silently ignored
        ((f"{OPT}opob=batch", f"{OPT}opob_is_mode=is", f"{OPT}opob_is_cap=2"), "is not used"),
        ((f"{OPT}opob=batch", f"{OPT}opob_is_mode=none", f"{OPT}opob_is_cap=2"), "is not used"),
    ]:
        with pytest.raises(ValueError, match=match):
            build(*extra)


#: The OPOB lines of README "OPOB in verl" (after the two optimizer lines).
README_OPOB = [
    "+actor_rollout_ref.actor.optim.override_optimizer_config.opob=group",
    "+actor_rollout_ref.actor.optim.override_optimizer_config.opob_group_size=8",
    "+actor_rollout_ref.actor.optim.override_optimizer_config.opob_norm_by_std=true",
    "actor_rollout_ref.actor.strategy=fsdp2",
    "trainer.balance_batch=false",
]


def test_readme_opob_lines_compose_and_build(model_dir: Path) -> None:
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config.optimizer import build_optimizer

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert all(f"    {line} \\" in readme or f"    {line}\n" in readme for line in README_OPOB)
    cfg = S.compose(model_dir, [*S.VCPO_OVERRIDES[:2], *README_OPOB])
    assert cfg.trainer.balance_batch is False
    assert cfg.actor_rollout_ref.actor.entropy_coeff == 0
    assert cfg.actor_rollout_ref.actor.use_kl_loss is False
    optim = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor.optim)
    opt = build_optimizer([torch.nn.Parameter(torch.randn(2))], optim)
    assert opt.vcpo_opob == vv.OPOBSettings("group", 8, True, "tis", 8.0)


def _assert_untouched(actor: S.Actor, before: dict[str, torch.Tensor]) -> None:
    after = S.params_of(actor.engine)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(actor.engine.optimizer.state) == 0


@pytest.mark.parametrize(
    ("extra", "mutate", "match"),
    [
        (
            ["actor_rollout_ref.actor.entropy_coeff=0.01"],
            None,
            "entropy_coeff",
        ),
        (
            ["actor_rollout_ref.actor.use_kl_loss=true"],
            None,
            "use_kl_loss",
        ),
        ([], "drop_rewards", "token_level_rewards"),
        ([], "drop_uid", "'uid'"),
        ([], "rollout_is_weights", "rollout_is_weights"),
        ([], "sp2", "Ulysses"),
        ([], "flash_ce", "VERL_DISABLE_FLASH_ATTN_CE=1"),
    ],
    ids=["entropy", "kl-loss", "no-rewards", "no-uid", "rollout-correction", "ulysses", "flash-ce"],
)
def test_unsupported_configuration_refused_before_any_change(
    model_dir: Path,
    extra: list[str],
    mutate: str | None,
    match: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = S.compose(model_dir, _overrides(f"{OPT}opob=group", f"{OPT}opob_group_size=2", *extra))
    actor = S.build_actor(cfg)
    tensors, _ = _tensors(model_dir)
    if mutate == "drop_rewards":
        del tensors["token_level_rewards"]
    if mutate == "rollout_is_weights":
        tensors["rollout_is_weights"] = torch.ones(tensors["response_mask"].shape)
    if mutate == "sp2":
        actor.engine.ulysses_sequence_parallel_size = 2  # as an sp=2 engine (needs several ranks)
    if mutate == "flash_ce":  # as on a GPU machine with flash-attn installed
        from verl.utils import torch_functional as tf

        monkeypatch.setattr(tf, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", True)
        monkeypatch.delenv("VERL_DISABLE_FLASH_ATTN_CE", raising=False)
    td = _engine_batch(tensors, actor)
    if mutate == "drop_uid":
        del td["uid"]
    before = S.params_of(actor.engine)
    with pytest.raises(vv.VerlIntegrationError, match=match):
        _train_and_grads(actor, td)
    _assert_untouched(actor, before)


def test_fused_logprob_kernel_is_off_with_the_documented_switch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from verl.utils import torch_functional as tf

    monkeypatch.setattr(tf, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", True)
    monkeypatch.setenv("VERL_DISABLE_FLASH_ATTN_CE", "1")
    assert vv._fused_logprob_kernel() is None
    monkeypatch.setenv("VERL_DISABLE_FLASH_ATTN_CE", "0")
    assert "flash-attn" in vv._fused_logprob_kernel()


def test_split_group_refused_before_any_change(model_dir: Path) -> None:
    """Groups of 4 responses declared, but each micro-batch holds 2: refused at the first call."""
    cfg = S.compose(model_dir, _overrides(f"{OPT}opob=group", f"{OPT}opob_group_size=4"))
    actor = S.build_actor(cfg)
    tensors, _ = _tensors(model_dir)
    before = S.params_of(actor.engine)
    with pytest.raises(ValueError, match="prompt group"):
        _train_and_grads(actor, _engine_batch(tensors, actor, ["q", "q", "q", "q"]))
    _assert_untouched(actor, before)
    # the recorded forward was dropped: OPOB holds no activation
    assert len(actor.engine._vcpo_opob._tape) == 0
