"""Policy-gradient advantages, sequence importance weights and per-sample surrogates.

Everything here produces the inputs the two VCPO controls take:

* :func:`sequence_log_weights` gives the log importance weight of each trajectory,
  ``lw_i = sum_t mask_it * (logp_new_it - logp_old_it)``, which is what
  ``VCPOAdamW.step(log_weights=lw)`` takes.
* :func:`per_sample_pg_loss` gives a loss *vector* ``l`` of shape ``[B]`` whose
  entry ``i`` depends only on trajectory ``i``, which is what
  ``OPOB.backward(per_sample_loss, rewards, groups)`` takes (called without
  advantages it is the score surrogate ``l_i = -w_i * s_i`` that carries the
  importance weight; OPOB then supplies the coefficient ``R_i - b*``). Called with
  advantages it is the ordinary policy-gradient loss: ``l.sum()`` is the batch
  loss of the chosen aggregation mode.

Notation: ``B`` trajectories, ``T`` padded response length, ``logp[i, t]`` the
log-probability of response token ``t`` of trajectory ``i`` under the current
policy (with grad), ``mask[i, t]`` 1 for response tokens and 0 for padding,
``L_i = sum_t mask[i, t]``.

Sign convention: losses are to be *minimised*, so the gradient of
``per_sample_pg_loss(logp, mask, A, w, agg="seq-mean-token-sum").sum()`` is
``-(1/B) sum_i w_i A_i grad log pi(tau_i)``.

All functions validate their inputs and raise ``ValueError`` naming the problem
(shape mismatch, NaN/Inf, negative weights, empty batch, bad group sizes).
Validation calls ``.item()`` on small reductions, i.e. it synchronises with the
device once per call; this is negligible next to a backward pass.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "AGGREGATIONS",
    "IS_MODES",
    "Aggregation",
    "ISMode",
    "OffPolicyLoss",
    "compute_advantages",
    "grpo_advantages",
    "importance_weights",
    "off_policy_pg_loss",
    "per_sample_pg_loss",
    "reinforce_advantages",
    "rloo_advantages",
    "sequence_log_weights",
]

Aggregation = Literal["seq-mean-token-mean", "seq-mean-token-sum", "token-mean"]
ISMode = Literal["none", "is", "tis", "mis"]
Estimator = Literal["reinforce", "rloo", "grpo"]

AGGREGATIONS: tuple[str, ...] = ("seq-mean-token-mean", "seq-mean-token-sum", "token-mean")
IS_MODES: tuple[str, ...] = ("none", "is", "tis", "mis")
ESTIMATORS: tuple[str, ...] = ("reinforce", "rloo", "grpo")


# --------------------------------------------------------------------------- validation


def _check_vector(x: Tensor, name: str, n: int | None = None) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D of shape [B], got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: the batch must contain at least one trajectory")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{name} has {x.shape[0]} entries but the batch has {n} trajectories")


def _check_finite(x: Tensor, name: str) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all().item()):
        bad = "NaN" if bool(torch.isnan(x).any().item()) else "Inf"
        raise ValueError(f"{name} contains {bad} values")


def _check_float(x: Tensor, name: str) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_same_device(*pairs: tuple[str, Tensor]) -> None:
    devices = {t.device for _, t in pairs}
    if len(devices) > 1:
        desc = ", ".join(f"{name} on {t.device}" for name, t in pairs)
        raise ValueError(f"tensors are on different devices: {desc}")


def _check_mask(mask: Tensor, shape: torch.Size, name: str = "mask") -> None:
    if not isinstance(mask, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != shape:
        raise ValueError(
            f"{name} must have the shape of the log-probs {tuple(shape)}, got {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all().item()):
        raise ValueError(f"{name} must be boolean or contain only 0 and 1")


def _check_logp(logp: Tensor, name: str) -> None:
    if not isinstance(logp, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(logp).__name__}")
    _check_float(logp, name)
    if logp.dim() != 2:
        raise ValueError(f"{name} must be 2-D of shape [B, T], got shape {tuple(logp.shape)}")
    if logp.shape[0] == 0:
        raise ValueError(f"{name} is empty: the batch must contain at least one trajectory")


def _masked_finite(x: Tensor, mask: Tensor, name: str) -> None:
    """Raise if ``x`` has NaN/Inf at a response position (padding may hold anything)."""
    bad = ~torch.isfinite(x.detach()) & mask.bool()
    if bool(bad.any().item()):
        kind = "NaN" if bool((torch.isnan(x.detach()) & mask.bool()).any().item()) else "Inf"
        raise ValueError(f"{name} contains {kind} values at response positions (mask == 1)")


def _group_index(groups: Tensor | None, n: int, device: torch.device) -> tuple[Tensor, int]:
    """Map arbitrary group ids to ``0..G-1``; ``None`` means one group."""
    if groups is None:
        return torch.zeros(n, dtype=torch.long, device=device), 1
    _check_vector(groups, "groups", n)
    if groups.is_floating_point() or groups.is_complex():
        raise ValueError(f"groups must hold integer ids, got dtype {groups.dtype}")
    if groups.device != device:
        raise ValueError(f"groups is on {groups.device} but rewards are on {device}")
    uniq, inv = torch.unique(groups, return_inverse=True)
    return inv, int(uniq.numel())


def _group_stats(rewards: Tensor, inv: Tensor, g: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample group count, group sum and population std (all float, shape [B])."""
    dtype = rewards.dtype
    count = torch.zeros(g, dtype=dtype, device=rewards.device).index_add_(
        0, inv, torch.ones_like(rewards)
    )
    total = torch.zeros(g, dtype=dtype, device=rewards.device).index_add_(0, inv, rewards)
    mean = total / count
    dev2 = (rewards - mean[inv]) ** 2
    var = torch.zeros(g, dtype=dtype, device=rewards.device).index_add_(0, inv, dev2) / count
    # A group whose rewards are all equal has std exactly 0 (float rounding in the mean
    # can leave a tiny nonzero var; we test equality directly instead).
    rmin = torch.full((g,), float("inf"), dtype=dtype, device=rewards.device).scatter_reduce(
        0, inv, rewards, reduce="amin"
    )
    rmax = torch.full((g,), float("-inf"), dtype=dtype, device=rewards.device).scatter_reduce(
        0, inv, rewards, reduce="amax"
    )
    std = torch.where(rmax == rmin, torch.zeros_like(var), var.sqrt())
    return count[inv], total[inv], std[inv]


def _prep_rewards(rewards: Tensor) -> Tensor:
    _check_vector(rewards, "rewards")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    _check_finite(rewards, "rewards")
    return rewards.detach()


# --------------------------------------------------------------------------- advantages


def reinforce_advantages(rewards: Tensor, baseline: float | Tensor | None = None) -> Tensor:
    """REINFORCE advantages ``A_i = R_i - b``.

    Args:
        rewards: ``[B]`` scalar reward per trajectory.
        baseline: a constant ``b`` (float or 0-d tensor) or a ``[B]`` tensor of
            per-sample baselines. Default ``None`` means ``b = 0`` (plain REINFORCE).

    Returns:
        ``[B]`` detached advantages, same dtype as ``rewards`` (float default dtype
        for integer rewards).
    """
    r = _prep_rewards(rewards)
    if baseline is None:
        return r.clone()
    b = torch.as_tensor(baseline, dtype=r.dtype, device=r.device).detach()
    if b.dim() not in (0, 1) or (b.dim() == 1 and b.shape[0] != r.shape[0]):
        raise ValueError(
            f"baseline must be a scalar or of shape [{r.shape[0]}], got {tuple(b.shape)}"
        )
    _check_finite(b, "baseline")
    return r - b


def rloo_advantages(
    rewards: Tensor, groups: Tensor | None = None, *, norm_by_std: bool = False
) -> Tensor:
    """RLOO (leave-one-out) advantages.

    ``A_i = R_i - (sum_{j in g(i), j != i} R_j) / (n_g - 1)``, equivalently
    ``n_g / (n_g - 1) * (R_i - mean_g R)``.

    Args:
        rewards: ``[B]`` scalar rewards.
        groups: ``[B]`` integer group (prompt) ids, any values; samples sharing an id
            form a group. Default ``None``: the whole batch is one group.
        norm_by_std: if ``True`` divide by the population std of the group's rewards
            (``unbiased=False``); groups with zero std get advantage exactly 0.
            Default ``False``.

    Raises:
        ValueError: a group has a single sample (leave-one-out undefined), or the
            usual shape/NaN problems.
    """
    r = _prep_rewards(rewards)
    inv, g = _group_index(groups, r.shape[0], r.device)
    count, total, std = _group_stats(r, inv, g)
    if bool((count < 2).any().item()):
        raise ValueError("RLOO needs at least 2 samples per group; some group has only 1")
    adv = r - (total - r) / (count - 1)
    if norm_by_std:
        adv = adv / torch.where(std > 0, std, torch.ones_like(std))
    # A group with equal rewards has advantage exactly 0 (rounding in the sums could
    # otherwise leave ~1e-16).
    return torch.where(std > 0, adv, torch.zeros_like(adv))


def grpo_advantages(
    rewards: Tensor,
    groups: Tensor | None = None,
    *,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """GRPO advantages ``A_i = (R_i - mean_g R) / (std_g R + eps)``.

    ``std_g`` is the population standard deviation (``unbiased=False``) of the
    rewards in the group of sample ``i``. A group whose rewards are all equal gets
    advantage exactly 0 (no ``eps`` blow-up from rounding).

    Args:
        rewards: ``[B]`` scalar rewards.
        groups: ``[B]`` integer group (prompt) ids. Default ``None``: one group.
        norm_by_std: divide by ``std_g + eps``. Default ``True`` (GRPO); ``False``
            gives the Dr.GRPO-style ``R_i - mean_g R``.
        eps: added to the std. Default ``1e-6``.
    """
    r = _prep_rewards(rewards)
    if eps < 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    inv, g = _group_index(groups, r.shape[0], r.device)
    count, total, std = _group_stats(r, inv, g)
    adv = r - total / count
    if norm_by_std:
        adv = adv / (std + eps)
    return torch.where(std > 0, adv, torch.zeros_like(adv))


def compute_advantages(
    rewards: Tensor,
    groups: Tensor | None = None,
    estimator: Estimator = "grpo",
    *,
    norm_by_std: bool | None = None,
) -> Tensor:
    """Dispatch to :func:`reinforce_advantages`, :func:`rloo_advantages` or
    :func:`grpo_advantages`.

    ``norm_by_std=None`` (default) uses each estimator's default (``True`` for GRPO,
    ``False`` for RLOO); REINFORCE ignores ``groups`` and accepts only ``None`` or
    ``False`` for ``norm_by_std``.
    """
    if estimator == "reinforce":
        if norm_by_std:
            raise ValueError("norm_by_std is not defined for REINFORCE")
        return reinforce_advantages(rewards)
    if estimator == "rloo":
        return rloo_advantages(rewards, groups, norm_by_std=bool(norm_by_std))
    if estimator == "grpo":
        return grpo_advantages(
            rewards, groups, norm_by_std=True if norm_by_std is None else norm_by_std
        )
    raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")


# --------------------------------------------------------------------------- importance weights


def sequence_log_weights(logp_new: Tensor, logp_old: Tensor, mask: Tensor) -> Tensor:
    """Sequence-level log importance weights ``lw_i = sum_t mask_it (logp_new_it - logp_old_it)``.

    ``logp_old`` are the behaviour log-probs recorded when the trajectory was sampled
    (the stale policy ``mu``), ``logp_new`` those of the current policy ``pi_theta``.
    Padding positions (``mask == 0``) are ignored and may hold anything, including
    ``-inf`` or NaN. The result is detached: it is a weight, not a loss.

    Args:
        logp_new: ``[B, T]`` float.
        logp_old: ``[B, T]`` float.
        mask: ``[B, T]`` bool or 0/1.

    Returns:
        ``[B]`` detached log weights in the dtype of ``logp_new`` (pass them to
        ``VCPOAdamW.step(log_weights=...)``; ``exp`` of them is ``w_i``).
    """
    _check_logp(logp_new, "logp_new")
    _check_logp(logp_old, "logp_old")
    if logp_old.shape != logp_new.shape:
        raise ValueError(
            f"logp_old has shape {tuple(logp_old.shape)} but logp_new has {tuple(logp_new.shape)}"
        )
    _check_mask(mask, logp_new.shape)
    _check_same_device(("logp_new", logp_new), ("logp_old", logp_old), ("mask", mask))
    _masked_finite(logp_new, mask, "logp_new")
    _masked_finite(logp_old, mask, "logp_old")
    m = mask.bool()
    diff = logp_new.detach() - logp_old.detach().to(logp_new.dtype)
    return torch.where(m, diff, torch.zeros_like(diff)).sum(dim=1)


def importance_weights(log_weights: Tensor, mode: ISMode = "tis", c: float = 8.0) -> Tensor:
    """Per-trajectory importance weights used in the surrogate, from log weights.

    With ``w_i = exp(lw_i)``:

    * ``"none"``: ``1`` (plain on-policy loss applied to whatever data it is given).
    * ``"is"``:   ``w_i`` (raw sequence-level importance sampling).
    * ``"tis"``:  ``min(w_i, c)`` (truncated IS); computed as ``exp(min(lw_i, log c))``
      so it never overflows.
    * ``"mis"``:  ``w_i`` if ``w_i <= c`` else ``0`` (masked IS / rejection).

    The result is always detached: the weight multiplies the score, it is not
    differentiated (see :func:`per_sample_pg_loss`).

    Args:
        log_weights: ``[B]`` finite log weights (e.g. from :func:`sequence_log_weights`).
        mode: one of ``"none"``, ``"is"``, ``"tis"``, ``"mis"``. Default ``"tis"``.
        c: threshold for ``"tis"`` and ``"mis"``, ``> 0``. Default ``8.0`` (the
            reference's ``rollout_is_threshold``).

    Raises:
        ValueError: non-finite log weights, ``c <= 0``, an unknown mode, or ``"is"``
            weights that overflow the dtype (use ``"tis"``/``"mis"`` or a wider dtype).
    """
    _check_vector(log_weights, "log_weights")
    _check_float(log_weights, "log_weights")
    _check_finite(log_weights, "log_weights")
    if mode not in IS_MODES:
        raise ValueError(f"unknown IS mode {mode!r}; expected one of {IS_MODES}")
    if not (c > 0 and math.isfinite(c)):
        raise ValueError(f"IS threshold c must be finite and > 0, got {c}")
    lw = log_weights.detach()
    if mode == "none":
        return torch.ones_like(lw)
    if mode == "is":
        w = lw.exp()
        if not bool(torch.isfinite(w).all().item()):
            raise ValueError(
                f"raw importance weights overflow {lw.dtype} (max log weight "
                f"{lw.max().item():.1f}); use mode='tis' or 'mis', or float64 log weights"
            )
        return w
    log_c = math.log(c)
    if mode == "tis":
        return lw.clamp(max=log_c).exp()
    # mis
    return torch.where(lw > log_c, torch.zeros_like(lw), lw.clamp(max=log_c).exp())


# --------------------------------------------------------------------------- surrogate losses


def per_sample_pg_loss(
    logp: Tensor,
    mask: Tensor,
    advantages: Tensor | None = None,
    weights: Tensor | None = None,
    agg: Aggregation = "seq-mean-token-mean",
) -> Tensor:
    """Per-trajectory policy-gradient surrogate ``l`` of shape ``[B]``.

    ``l_i = -w_i * A_i * s_i`` with ``w_i`` and ``A_i`` treated as constants
    (detached) and ``s_i`` the aggregated log-likelihood of trajectory ``i``:

    * ``"seq-mean-token-mean"``: ``s_i = (1/B) * (1/L_i) sum_t mask_it logp_it``
    * ``"seq-mean-token-sum"``:  ``s_i = (1/B) * sum_t mask_it logp_it``
    * ``"token-mean"``:          ``s_i = (sum_t mask_it logp_it) / (sum_{j,t} mask_jt)``

    so that in every mode ``l.sum()`` is the batch loss of that mode (e.g. for
    token-mean, the mean over all response tokens of ``-w A logp``), and
    ``grad l_i = -w_i A_i grad s_i``; for seq-mean-token-sum that is
    ``-(w_i A_i / B) grad log pi(tau_i)``. Entry ``i`` depends on trajectory ``i``
    only (the token-mean denominator is a constant of the batch), which is the
    contract ``OPOB.backward`` needs. A trajectory with no response tokens
    contributes ``0``.

    For OPOB, call without ``advantages`` (``A_i = 1``): ``l_i = -w_i s_i`` is the
    score surrogate carrying the importance weight, and OPOB applies ``R_i - b*``.

    Args:
        logp: ``[B, T]`` current-policy log-probs of the sampled tokens (with grad).
            Padding positions may hold anything (they are masked with ``where``).
        mask: ``[B, T]`` bool or 0/1 response mask.
        advantages: ``[B]`` advantages. Default ``None`` means all ones.
        weights: ``[B]`` non-negative importance weights (e.g. from
            :func:`importance_weights`). Default ``None`` means all ones.
        agg: aggregation mode. Default ``"seq-mean-token-mean"`` (the reference's
            ``loss_agg_mode``).

    Returns:
        ``[B]`` loss vector, differentiable w.r.t. ``logp``.
    """
    _check_logp(logp, "logp")
    _check_mask(mask, logp.shape)
    _masked_finite(logp, mask, "logp")
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {agg!r}; expected one of {AGGREGATIONS}")
    b = logp.shape[0]
    pairs: list[tuple[str, Tensor]] = [("logp", logp), ("mask", mask)]
    coef = torch.ones(b, dtype=logp.dtype, device=logp.device)
    if advantages is not None:
        _check_vector(advantages, "advantages", b)
        _check_float(advantages, "advantages")
        _check_finite(advantages, "advantages")
        pairs.append(("advantages", advantages))
        coef = coef * advantages.detach().to(logp.dtype)
    if weights is not None:
        _check_vector(weights, "weights", b)
        _check_float(weights, "weights")
        _check_finite(weights, "weights")
        if bool((weights < 0).any().item()):
            raise ValueError("weights contains negative values; importance weights are >= 0")
        pairs.append(("weights", weights))
        coef = coef * weights.detach().to(logp.dtype)
    _check_same_device(*pairs)

    m = mask.bool()
    tok_sum = torch.where(m, logp, torch.zeros_like(logp)).sum(dim=1)
    lengths = m.sum(dim=1).to(logp.dtype)
    if agg == "seq-mean-token-mean":
        s = tok_sum / lengths.clamp(min=1.0) / b
    elif agg == "seq-mean-token-sum":
        s = tok_sum / b
    else:  # token-mean
        s = tok_sum / lengths.sum().clamp(min=1.0)
    return -coef * s


class OffPolicyLoss(NamedTuple):
    """Result of :func:`off_policy_pg_loss`.

    Attributes:
        per_sample_loss: ``[B]`` loss vector (see :func:`per_sample_pg_loss`).
        log_weights: ``[B]`` detached raw sequence log weights ``lw_i`` (untruncated;
            what ``VCPOAdamW.step(log_weights=...)`` takes).
        weights: ``[B]`` detached weights actually used in the surrogate.
    """

    per_sample_loss: Tensor
    log_weights: Tensor
    weights: Tensor


def off_policy_pg_loss(
    logp: Tensor,
    logp_old: Tensor,
    mask: Tensor,
    advantages: Tensor | None = None,
    *,
    is_mode: ISMode = "tis",
    c: float = 8.0,
    agg: Aggregation = "seq-mean-token-mean",
) -> OffPolicyLoss:
    """Sequence-level importance-sampled policy-gradient loss in one call.

    Computes ``lw = sequence_log_weights(logp, logp_old, mask)``,
    ``w = importance_weights(lw, is_mode, c)`` and
    ``l = per_sample_pg_loss(logp, mask, advantages, w, agg)``. For
    seq-mean-token-sum the gradient of ``l.sum()`` is
    ``-(1/B) sum_i w_i A_i grad log pi_theta(tau_i)``.

    Args:
        logp: ``[B, T]`` current-policy token log-probs (with grad).
        logp_old: ``[B, T]`` behaviour token log-probs recorded at sampling time.
        mask: ``[B, T]`` response mask.
        advantages: ``[B]``; ``None`` (default) gives the OPOB score surrogate.
        is_mode: ``"none"``, ``"is"``, ``"tis"`` (default) or ``"mis"``.
        c: TIS/MIS threshold. Default ``8.0``.
        agg: aggregation mode. Default ``"seq-mean-token-mean"``.
    """
    lw = sequence_log_weights(logp, logp_old, mask)
    w = importance_weights(lw, is_mode, c)
    return OffPolicyLoss(per_sample_pg_loss(logp, mask, advantages, w, agg), lw, w)
