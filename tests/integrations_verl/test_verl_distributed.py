"""Two data-parallel ranks (gloo, real processes) in verl's FSDP2 engine with VCPOAdamW.

The module is also the worker script (see tests/distributed/_harness.py): each
rank builds the actor from the README's config lines, trains one optimizer
step on its half of a 4-sequence batch (2 micro-batches of 1), and reports what
it observed and the step's statistics. The ESS must be the global one, the
same on both ranks, equal to a float64 computation over all 4 sequences.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("verl", reason="verl runs in its own environment: `make test-verl`")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))

import _verl_setup as S
import torch
from _harness import launch, values, worker_main

PROMPTS = [3, 5, 4, 2]
RESPONSES = [4, 6, 3, 5]
BIAS = [-0.6, 0.3, 0.1, 0.9]  # per-sequence drift of the behaviour policy
MODEL_ENV = "VCPO_VERL_TEST_MODEL"


def _batch(ref: torch.Tensor) -> dict[str, torch.Tensor]:
    """The global batch; ``ref`` is the oracle's log pi of its response tokens."""
    tensors = S.make_batch(prompt_lens=PROMPTS, response_lens=RESPONSES, seed=11)
    g = torch.Generator().manual_seed(12)
    noise = 0.2 * torch.randn(ref.shape, generator=g, dtype=torch.float64)
    rollout = ref + noise + torch.tensor(BIAS, dtype=torch.float64)[:, None]
    mask = tensors["response_mask"].bool()
    tensors["rollout_log_probs"] = torch.where(mask, rollout, 0.0).float()
    tensors["old_log_probs"] = torch.where(mask, ref, 0.0).float()
    return tensors


def _one_step() -> dict:
    import torch.distributed as dist

    rank = dist.get_rank()
    model_dir = Path(os.environ[MODEL_ENV])
    actor = S.build_actor(S.compose(model_dir, S.VCPO_OVERRIDES), micro_batch_size=1)
    opt = actor.engine.optimizer
    seen: list[torch.Tensor] = []
    observe = opt.observe

    def spy(*args, **kwargs):
        seen.append(kwargs["log_weights"])
        return observe(*args, **kwargs)

    opt.observe = spy
    ref = torch.load(model_dir / "ref.pt")
    tensors = _batch(ref)
    mine = {k: v[2 * rank : 2 * rank + 2] for k, v in tensors.items()}  # this rank's shard
    td = S.to_engine_batch(mine, actor.engine, global_batch_size=4)
    with actor.engine.train_mode():
        out = actor.engine.train_batch(td, loss_function=actor.loss_fn)
    stats = opt.last_stats
    return {
        "observed": [t.clone() for t in seen],
        "group_is_dp": opt.process_group is actor.engine.get_data_parallel_group(),
        "stats": {k: float(getattr(stats, k)) for k in ("ess", "ess_ratio", "n", "lr_scale")},
        "metrics": {k: v.aggregate() for k, v in out["metrics"].items() if k.startswith("vcpo/")},
        "params": S.params_of(actor.engine),
    }


OPOB_GROUP = [
    "+actor_rollout_ref.actor.optim.override_optimizer_config.opob=group",
    "+actor_rollout_ref.actor.optim.override_optimizer_config.opob_group_size=2",
    "+actor_rollout_ref.actor.optim.override_optimizer_config.opob_norm_by_std=true",
    "+actor_rollout_ref.actor.optim.override_optimizer_config.opob_is_cap=1.5",
    "actor_rollout_ref.actor.optim.clip_grad=1e6",
]


def _opob_step(rows: list[int], micro_batch_size: int, nan_on_rank: int | None = None) -> dict:
    """One OPOB step of the README's OPOB lines on this rank's ``rows`` of the 4-sequence batch."""
    import test_verl_opob as T
    import torch.distributed as dist

    model_dir = Path(os.environ[MODEL_ENV])
    cfg = S.compose(model_dir, [*S.VCPO_OVERRIDES, *OPOB_GROUP], remove_padding=True)
    actor = S.build_actor(cfg, micro_batch_size=micro_batch_size)
    tensors, _ = T._tensors(model_dir)
    mine = {k: v[rows] for k, v in tensors.items()}
    if nan_on_rank == dist.get_rank():
        mine["old_log_probs"][0, 0] = float("nan")  # inside the response mask
    td = S.to_engine_batch(mine, actor.engine, global_batch_size=4)
    from tensordict.tensorclass import NonTensorData, NonTensorStack

    td["uid"] = NonTensorStack.from_list([NonTensorData(T.UIDS[i]) for i in rows])
    before = S.params_of(actor.engine)
    try:
        out, grads = T._train_and_grads(actor, td)
    except Exception as exc:
        after = S.params_of(actor.engine)
        unchanged = all(torch.equal(before[k], after[k]) for k in before)
        raise type(exc)(f"{exc} [unchanged={unchanged}, rank={dist.get_rank()}]") from exc
    return {
        "grads": grads,
        "sq": torch.cat([r.sq_norms for r in actor.engine.optimizer.vcpo_opob_results]),
        "grad_norm": out["metrics"]["grad_norm"],
        "params": S.params_of(actor.engine),
    }


def _opob_groups_across_ranks() -> dict:
    """Every prompt group has one response on each rank (as verl's balance_batch may place them)."""
    import torch.distributed as dist

    return _opob_step([0, 2] if dist.get_rank() == 0 else [1, 3], micro_batch_size=2)


def _opob_group_split_over_calls() -> dict:
    """Rank 0 holds group p0, rank 1 group p1, one sequence per call: each call has half groups."""
    import torch.distributed as dist

    return _opob_step([0, 1] if dist.get_rank() == 0 else [2, 3], micro_batch_size=1)


def _opob_nan_on_one_rank() -> dict:
    """A NaN behaviour log-prob on rank 1 only: both ranks must raise, neither may hang."""
    import torch.distributed as dist

    return _opob_step([0, 2] if dist.get_rank() == 0 else [1, 3], 2, nan_on_rank=1)


SCENARIOS = {
    "one_step": _one_step,
    "opob_groups_across_ranks": _opob_groups_across_ranks,
    "opob_group_split_over_calls": _opob_group_split_over_calls,
    "opob_nan_on_one_rank": _opob_nan_on_one_rank,
}


@pytest.fixture(scope="module")
def res():
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        S.save_tiny_model(model_dir)
        tensors = S.make_batch(prompt_lens=PROMPTS, response_lens=RESPONSES, seed=11)
        torch.save(S.reference_log_probs(model_dir, tensors), model_dir / "ref.pt")
        os.environ[MODEL_ENV] = str(model_dir)
        try:
            yield launch(__file__, 2, timeout=240.0), torch.load(model_dir / "ref.pt")
        finally:
            os.environ.pop(MODEL_ENV, None)


def test_two_ranks_share_the_global_ess(res) -> None:
    results, ref = res
    r0, r1 = values(results, "one_step")
    tensors = _batch(ref)
    mask = tensors["response_mask"].bool()
    lw_ref = torch.where(mask, ref - tensors["rollout_log_probs"].double(), 0.0).sum(-1)

    # each rank observed its own two sequences, one per micro-batch
    for rank, r in enumerate((r0, r1)):
        assert [t.shape for t in r["observed"]] == [(1,), (1,)]
        lw = torch.cat(r["observed"])
        torch.testing.assert_close(lw, lw_ref[2 * rank : 2 * rank + 2], rtol=0, atol=1e-5)
        assert r["group_is_dp"]

    w = torch.exp(lw_ref - lw_ref.max())
    ess = float(w.sum() ** 2 / (w * w).sum())
    assert r0["stats"] == r1["stats"]  # one global reduction, bit-identical on both ranks
    assert r0["stats"]["n"] == 4.0
    assert r0["stats"]["ess"] == pytest.approx(ess, rel=1e-5)
    assert r0["stats"]["ess_ratio"] < 0.9  # scaled: base_ess_ratio is 0.9
    assert r0["metrics"] == r1["metrics"]
    assert r0["metrics"]["vcpo/ess_ratio"] == r0["stats"]["ess_ratio"]
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name


def test_opob_groups_across_ranks_match_the_oracle(res) -> None:
    import test_verl_opob as T

    results, _ = res
    r0, r1 = values(results, "opob_groups_across_ranks")
    model_dir = Path(os.environ[MODEL_ENV])
    tensors, _ = T._tensors(model_dir)
    o = {"is_mode": "tis", "cap": 1.5, "agg": "token-mean"}
    ref = T._oracle(*T._hf_per_sequence(model_dir, tensors, o), scope="group", norm_by_std=True)
    # rank 0 held sequences 0 and 2, rank 1 sequences 1 and 3
    torch.testing.assert_close(r0["sq"].double(), ref["sq"][[0, 2]], rtol=1e-5, atol=0)
    torch.testing.assert_close(r1["sq"].double(), ref["sq"][[1, 3]], rtol=1e-5, atol=0)
    want = torch.cat([ref["grad"][k].flatten() for k in r0["grads"]])
    for r in (r0, r1):  # the full gradient, the same on both ranks
        got = torch.cat([r["grads"][k].double().flatten() for k in r["grads"]])
        assert float((got - want).norm()) <= 1e-5 * float(want.norm())
        assert r["grad_norm"] == pytest.approx(float(want.norm()), rel=1e-5)
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name


def test_opob_group_split_over_calls_refused_on_every_rank(res) -> None:
    results, _ = res
    errs = [results[r]["opob_group_split_over_calls"] for r in range(2)]
    for rank, e in enumerate(errs):
        assert not e["ok"] and e["type"] == "ValueError", e
        assert "prompt group" in e["message"] and f"unchanged=True, rank={rank}" in e["message"]
    # the same refusal on both ranks (up to the rank tag)
    assert errs[0]["message"].split(" [")[0] == errs[1]["message"].split(" [")[0]


def test_opob_failure_on_one_rank_is_raised_on_every_rank(res) -> None:
    results, _ = res
    for rank in range(2):
        e = results[rank]["opob_nan_on_one_rank"]
        assert not e["ok"] and e["type"] == "ValueError", e
        assert "failed on rank(s) 1:" in e["message"] and "log_weights" in e["message"]
        assert f"unchanged=True, rank={rank}" in e["message"]


if __name__ == "__main__":
    worker_main(SCENARIOS)
