"""Simulated PipelineRL-style asynchronous RL: the sampler runs ``k`` policy versions
behind the learner.

At learner step ``t`` (``t = 0, 1, ...``; version ``t`` = the parameters after ``t``
optimizer steps) the batch is sampled by the policy of version ``max(0, t - k)``,
kept in a ring buffer of parameter snapshots (the last ``k + 1`` versions). The
sampler records its behaviour log-probs ``log mu(y_t)`` at sampling time (with a
teacher-forced pass of its own parameters, so lag 0 is bit-for-bit on-policy);
the learner recomputes ``log pi_theta(y_t)`` with grad, forms the sequence log
importance weight ``lw_i = sum_t (log pi_theta - log mu)`` and takes one optimizer
step. With ``k = 0`` this is synchronous on-policy RL.
"""

from __future__ import annotations

import copy
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from vcpo_optim import OPOB, OPOBResult, VCPOAdamW, effective_sample_size
from vcpo_optim import losses as L
from vcpo_optim.demo.arms import DEFAULT_ARMS, SAMPLE_CLIP_C, Arm
from vcpo_optim.demo.policy import MLPPolicy
from vcpo_optim.demo.task import Task
from vcpo_optim.diagnostics import offpolicy_stats


@dataclass
class Config:
    """The whole experiment configuration (embedded defaults; no config file).

    Task and policy:
        task, vocab, length: the task (see :class:`vcpo_optim.demo.task.Task`).
        hidden, context, depth: the policy (see :class:`MLPPolicy`).
    Supervised warm-up ("Base" model, one per seed, shared by all arms):
        warmup_steps, warmup_lr, warmup_batch: Adam on noisy targets.
        warmup_noise: each target digit is replaced by a uniform random digit with
            this probability, so the base policy is calibrated to be right per digit
            with probability about ``1 - noise * (1 - 1/vocab)``, and its exact-match
            accuracy over ``length`` digits is low but nonzero.
    RL (identical for every arm):
        steps, prompts, group: optimizer steps; prompts per step and samples per
            prompt (batch ``B = prompts * group``).
        lr, weight_decay, betas, grad_clip: ``VCPOAdamW`` settings; ``grad_clip`` is
            the max total gradient norm (``<= 0`` disables clipping).
        tis_c: TIS threshold. agg: loss aggregation mode.
        ess_target: target ESS ratio rho of the ESS-targeted cap (arms with ``ess_cap``).
        max_sample_grad_norm: OPOB's per-trajectory clip ``C`` (arms with
            ``sample_clip``): each trajectory's contribution ``|c_i| ||grad l_i||``
            to the gradient is bounded by ``C`` (see :data:`SAMPLE_CLIP_C`).
        icepop_band: IcePop's ratio band ``(low, high)``. m2po_tau: M2PO's threshold.
        eval_every, eval_prompts: held-out accuracy schedule and set size.
    Sweep:
        lags, seeds, arms.
        all_lags: run every arm at every lag of ``lags`` (by default an arm with
            ``Arm.lags`` runs only at those).
    """

    task: str = "reverse"
    vocab: int = 10
    length: int = 12
    hidden: int = 128
    context: int = 4
    depth: int = 2
    warmup_steps: int = 1000
    warmup_lr: float = 1e-3
    warmup_batch: int = 128
    warmup_noise: float = 0.25
    steps: int = 300
    prompts: int = 16
    group: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    tis_c: float = 8.0
    agg: str = "seq-mean-token-mean"
    ess_target: float = 0.5
    max_sample_grad_norm: float = SAMPLE_CLIP_C
    icepop_band: tuple[float, float] = (0.5, 5.0)
    m2po_tau: float = 0.04
    eval_every: int = 10
    eval_prompts: int = 512
    lags: tuple[int, ...] = (0, 8, 32, 128)
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = DEFAULT_ARMS
    all_lags: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def make_task(self) -> Task:
        return Task(self.task, self.vocab, self.length)

    def make_policy(self) -> MLPPolicy:
        return MLPPolicy(self.make_task(), self.hidden, self.context, self.depth)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def heldout_prompts(cfg: Config) -> Tensor:
    """The fixed held-out evaluation prompts (independent of the seed)."""
    return cfg.make_task().sample_prompts(
        cfg.eval_prompts, torch.Generator().manual_seed(2**31 - 1)
    )


def heldout_accuracy(policy: MLPPolicy, prompts: Tensor) -> float:
    """Expected exact-match accuracy of one temperature-1 sample: mean of ``pi(y*|x)``."""
    return float(policy.target_prob(prompts).mean())


def warmup(cfg: Config, seed: int) -> tuple[dict[str, Tensor], float]:
    """Supervised warm-up on noisy targets; returns (state dict, held-out accuracy)."""
    task = cfg.make_task()
    torch.manual_seed(seed)
    policy = cfg.make_policy()
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.warmup_lr)
    gen = torch.Generator().manual_seed(10_000 + seed)
    for _ in range(cfg.warmup_steps):
        x = task.sample_prompts(cfg.warmup_batch, gen)
        y = task.targets(x)
        flip = torch.rand(y.shape, generator=gen) < cfg.warmup_noise
        y = torch.where(flip, torch.randint(0, task.vocab, y.shape, generator=gen), y)
        loss = -policy.token_logp(x, y).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    acc = heldout_accuracy(policy, heldout_prompts(cfg))
    return copy.deepcopy(policy.state_dict()), acc


class Correction(NamedTuple):
    """The off-policy correction an arm applies to one batch.

    Attributes:
        weights: ``[B]`` sequence weights in the loss.
        token_weights: ``[B, T]`` token weights in the loss, or ``None``.
        log_cap: log of the truncation cap of the sequence weights (``inf``: none).
        keep: ``[B, T]`` token keep-mask of a masking correction, or ``None``.
    """

    weights: Tensor
    token_weights: Tensor | None
    log_cap: float
    keep: Tensor | None


class Diverged(Exception):
    """The arm's run has diverged: :mod:`vcpo_optim.losses` refused its weights.

    Raised (by :func:`out_of_range_diverges`) when the importance weights or the
    loss coefficients built from them are out of the range of their dtype: an
    overflow (raw IS ``exp(lw)``, an ESS target met without a cap, unbounded token
    ratios), or every weight below the smallest normal number (the loss and its
    gradient would be flushed to 0). The run stops there; the report counts it as
    collapsed.
    """


#: Words that mark :mod:`vcpo_optim.losses`' refusals of values its dtype cannot hold
#: (``"... overflow(s) float32 ..."``, ``"... underflow ..."``, ``"every nonzero ...
#: below the smallest normal ... number"``); tested against the real refusals.
RANGE_REFUSALS: tuple[str, ...] = ("overflow", "underflow", "smallest normal")


@contextmanager
def out_of_range_diverges() -> Iterator[None]:
    """Turn a :mod:`vcpo_optim.losses` refusal of out-of-range weights into :class:`Diverged`.

    Wraps only the calls that turn the arm's weights into a loss
    (``importance_weights``, ``per_sample_pg_loss``). Any other ``ValueError`` (a
    shape, a NaN log-prob) is a bug, not a divergence, and propagates unchanged.
    """
    try:
        yield
    except ValueError as exc:
        if any(word in str(exc) for word in RANGE_REFUSALS):
            raise Diverged(str(exc)) from exc
        raise


def correction(
    cfg: Config,
    arm: Arm,
    logp: Tensor,
    logp_old: Tensor,
    mask: Tensor,
    lw: Tensor,
    advantages: Tensor,
) -> Correction:
    """The weights ``arm`` puts in the loss for one batch (see :mod:`vcpo_optim.demo.arms`).

    ``advantages`` (GRPO, one per trajectory) select M2PO's trust-region tokens.
    Raises :class:`Diverged` if ``importance_weights`` refuses the weights (beyond
    float64: the log weights are float64); :func:`policy_loss` checks them against
    the loss's dtype.
    """
    keep = token_weights = None
    if arm.token_correction is not None:
        if arm.token_correction == "icepop":
            keep = L.icepop_mask(logp, logp_old, mask, *cfg.icepop_band)
        else:
            keep = L.m2po_mask(logp, logp_old, mask, cfg.m2po_tau, advantages=advantages)
        x = L.token_log_ratios(logp, logp_old, mask)
        token_weights = torch.where(keep, x.exp(), torch.zeros_like(x))
    with out_of_range_diverges():
        if arm.ess_cap:
            log_cap = float(L.ess_truncation_cap(lw, cfg.ess_target))
            weights = L.importance_weights(lw, "tis", ess_target=cfg.ess_target)
        else:
            log_cap = math.log(cfg.tis_c) if arm.is_mode == "tis" else math.inf
            weights = L.importance_weights(lw, arm.is_mode, cfg.tis_c)  # type: ignore[arg-type]
    return Correction(weights, token_weights, log_cap, keep)


def policy_loss(
    cfg: Config, arm: Arm, logp: Tensor, mask: Tensor, advantages: Tensor, corr: Correction
) -> Tensor:
    """The ``[B]`` per-trajectory loss of ``arm``: ``per_sample_pg_loss`` with its weights.

    GRPO arms put the advantages in the loss; OPOB arms leave them out (OPOB
    multiplies each ``grad l_i`` by ``R_i - b``). Raises :class:`Diverged` if the
    loss's dtype cannot hold the weighted coefficients (see :class:`Diverged`).
    """
    with out_of_range_diverges():
        return L.per_sample_pg_loss(
            logp,
            mask,
            None if arm.opob else advantages,
            corr.weights,
            cfg.agg,  # type: ignore[arg-type]
            token_weights=corr.token_weights,
        )


StepCallback = Callable[[dict[str, Any]], None]

#: The OPOB fields of every step row (``None`` for the arms without OPOB).
OPOB_FIELDS: tuple[str, ...] = (
    "opob/noise_trace",
    "opob/noise_grad_sq",
    "opob/noise_scale",
    "opob/num_clipped",
    "opob/frac_clipped",
)


def _finite_or_none(x: Tensor | None) -> float | None:
    if x is None:
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def opob_metrics(res: OPOBResult | None, batch: int) -> dict[str, Any]:
    """The :data:`OPOB_FIELDS` of one step from its :class:`~vcpo_optim.OPOBResult`.

    ``opob/noise_trace``, ``opob/noise_grad_sq``, ``opob/noise_scale``: OPOB's
    unbiased estimates of ``tr(Sigma)`` and ``|G|^2`` of the per-trajectory
    contributions and their ratio ``B_simple`` (``None`` where undefined: 0/0
    when every coefficient is 0, i.e. every prompt group has equal rewards);
    ``opob/num_clipped`` and ``opob/frac_clipped`` (of the ``batch``
    trajectories): how many contributions per-trajectory clipping scaled down
    (``None`` without clipping). All ``None`` without OPOB.
    """
    if res is None:
        return dict.fromkeys(OPOB_FIELDS)
    clipped = None if res.num_clipped is None else int(res.num_clipped)
    return {
        "opob/noise_trace": _finite_or_none(res.noise_trace),
        "opob/noise_grad_sq": _finite_or_none(res.noise_grad_sq),
        "opob/noise_scale": _finite_or_none(res.noise_scale),
        "opob/num_clipped": clipped,
        "opob/frac_clipped": None if clipped is None else clipped / batch,
    }


def run_arm(
    cfg: Config,
    arm: Arm,
    lag: int,
    seed: int,
    base_state: dict[str, Tensor],
    *,
    on_step: StepCallback | None = None,
    on_backward: StepCallback | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Train one arm at one lag from the base policy; return per-step metric rows.

    Each row has: ``seed, arm, k, step, behaviour_version, lag`` (``step -
    behaviour_version``, the lag of every trajectory of the batch), ``reward, ess,
    ess_ratio`` (of the raw sequence weights), ``lr_scale, grad_norm`` (total norm
    before clipping), ``lw_max, lw_min, lw_std``, the weights the arm used:
    ``weight_ess_ratio`` (ESS/B of its sequence weights; ``None`` for the token
    corrections), ``log_cap`` (log of its truncation cap, ``None`` if uncapped),
    ``frac_capped`` (fraction of trajectories above the cap, ``None`` if uncapped),
    ``token_masked_frac`` (IcePop/M2PO: fraction of response tokens with weight 0,
    else ``None``); every field of :func:`vcpo_optim.diagnostics.offpolicy_stats`
    of the batch (``tis_cap=cfg.tis_c``) under ``offpolicy/<field>``; OPOB's noise
    scale and per-trajectory clip count under ``opob/<field>`` (see
    :func:`opob_metrics`; ``None`` for the arms without OPOB); ``accuracy``
    (held-out, every ``eval_every`` steps and at the end, else None) and
    ``elapsed_s``. If :mod:`vcpo_optim.losses` refuses the weights as out of range
    of their dtype (see :class:`Diverged`), a last row with a ``diverged`` message
    and the accuracy at that point ends the run. Row
    ``step = t`` describes the update from version ``t`` to ``t + 1``; accuracy
    on that row is measured *after* the update. One extra row with ``step = -1``
    holds the base accuracy.

    ``on_step`` (for tests) gets a dict with the step, the behaviour version, the
    behaviour and current state dicts and the batch before each update (the batch
    tensors are the learner's own). ``on_backward`` (for measurements) gets
    ``{"step": t, "opob": OPOBResult or None}`` after each step's backward.
    """
    task = cfg.make_task()
    heldout = heldout_prompts(cfg)
    policy = cfg.make_policy()
    policy.load_state_dict(base_state)
    behaviour = cfg.make_policy()
    opt = VCPOAdamW(
        policy.parameters(),
        lr=cfg.lr,
        betas=cfg.betas,
        weight_decay=cfg.weight_decay,
        base_ess_ratio=1.0,
    )
    opob = (
        OPOB(policy, scope="group", norm_by_std=True, **arm.opob_kwargs(cfg)) if arm.opob else None
    )
    n_b = cfg.prompts * cfg.group
    groups = torch.arange(cfg.prompts).repeat_interleave(cfg.group)
    mask = torch.ones(n_b, task.response_len, dtype=torch.bool)
    gen = torch.Generator().manual_seed(1_000_003 * (seed + 1) + 7919 * lag)
    ring: deque[tuple[int, dict[str, Tensor]]] = deque(maxlen=lag + 1)
    common = {"seed": seed, "arm": arm.name, "k": lag}
    rows: list[dict[str, Any]] = [
        {**common, "step": -1, "accuracy": heldout_accuracy(policy, heldout), "elapsed_s": 0.0}
    ]
    t0 = time.perf_counter()
    for t in range(cfg.steps):
        # --- sampler: the snapshot of version max(0, t - k), behaviour log-probs recorded now
        ring.append((t, {n: p.detach().clone() for n, p in policy.state_dict().items()}))
        version, snapshot = ring[0]
        behaviour.load_state_dict(snapshot)
        x = task.sample_prompts(cfg.prompts, gen).repeat_interleave(cfg.group, 0)
        y = behaviour.sample(x, gen)
        with torch.no_grad():
            logp_old = behaviour.token_logp(x, y)
        rewards = task.reward(x, y)
        if on_step is not None:
            on_step(
                {
                    "step": t,
                    "behaviour_version": version,
                    "behaviour_state": snapshot,
                    "current_state": {
                        n: p.detach().clone() for n, p in policy.state_dict().items()
                    },
                    "prompts": x,
                    "responses": y,
                    "logp_old": logp_old,
                }
            )
        # --- learner
        logp = policy.token_logp(x, y)
        lw = L.sequence_log_weights(logp, logp_old, mask)
        diagnostics = offpolicy_stats(logp, logp_old, mask, tis_cap=cfg.tis_c)
        adv = L.grpo_advantages(rewards, groups)
        try:
            corr = correction(cfg, arm, logp, logp_old, mask, lw, adv)
            loss_vec = policy_loss(cfg, arm, logp, mask, adv, corr)
        except Diverged as exc:  # the run has diverged
            rows.append(
                {
                    **common,
                    "step": t,
                    "behaviour_version": version,
                    "accuracy": heldout_accuracy(policy, heldout),
                    "elapsed_s": time.perf_counter() - t0,
                    "diverged": str(exc),
                }
            )
            if progress is not None:
                progress(cfg.steps - t)
            break
        opt.zero_grad(set_to_none=True)
        opob_res = None
        if opob is not None:
            opob_res = opob.backward(loss_vec, rewards, groups)
        else:
            loss_vec.sum().backward()
        if on_backward is not None:
            on_backward({"step": t, "opob": opob_res})
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm))
        if arm.ess_scaling:
            opt.step(log_weights=lw)
            stats = opt.last_stats
            ess, ess_ratio, lr_scale = (
                float(stats.ess),
                float(stats.ess_ratio),
                float(stats.lr_scale),
            )
        else:
            opt.step()
            res = effective_sample_size(log_weights=lw)
            ess, ess_ratio, lr_scale = float(res.ess), float(res.ratio), 1.0
        capped = math.isfinite(corr.log_cap)
        row: dict[str, Any] = {
            **common,
            "step": t,
            "behaviour_version": version,
            "lag": t - version,
            "reward": float(rewards.mean()),
            "ess": ess,
            "ess_ratio": ess_ratio,
            "lr_scale": lr_scale,
            "grad_norm": grad_norm,
            "lw_max": float(lw.max()),
            "lw_min": float(lw.min()),
            "lw_std": float(lw.std()) if lw.numel() > 1 else 0.0,
            "weight_ess_ratio": (
                None
                if corr.keep is not None
                else float(effective_sample_size(weights=corr.weights).ratio)
            ),
            "log_cap": corr.log_cap if capped else None,
            "frac_capped": float((lw > corr.log_cap).double().mean()) if capped else None,
            "token_masked_frac": (
                None if corr.keep is None else float(1.0 - corr.keep.sum() / mask.sum())
            ),
            **diagnostics.as_dict(prefix="offpolicy/"),
            **opob_metrics(opob_res, n_b),
            "accuracy": None,
        }
        if (t + 1) % cfg.eval_every == 0 or t == cfg.steps - 1:
            row["accuracy"] = heldout_accuracy(policy, heldout)
        row["elapsed_s"] = time.perf_counter() - t0
        rows.append(row)
        if progress is not None:
            progress(1)
    return rows
