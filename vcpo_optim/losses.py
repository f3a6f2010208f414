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
* Masking corrections that compose with the TIS/MIS weights: :func:`icepop_mask`
  (token band), :func:`rejection_mask` (K1/K2/K3 and geometric-mean rejection at
  token or sequence level), :func:`m2po_mask` (second-moment masking) and GSPO's
  ``sequence_log_weights(..., reduce="mean")``; :func:`ess_truncation_cap` (the
  largest truncation cap that meets an ESS target).

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

Precision: log ratios and log weights are computed in float64 whatever the input
dtype (bf16/fp16/fp32 values convert exactly); every other sum (advantages,
weights, the surrogate) runs in the input dtype promoted to at least float32, so a
bf16 policy gets float32 losses and its gradient still flows to the bf16 log-probs.
A value that this dtype cannot hold is refused, never rounded to ``+-inf`` or
flushed to 0 wholesale: float64 weights of ``exp(120)`` with float32 log-probs,
weights that all lie below float32's normal range, rewards whose statistics
overflow (see each function's Raises).
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from vcpo_optim.distributed import GroupArg, all_gather_rows, get_rank, resolve_group

__all__ = [
    "AGGREGATIONS",
    "IS_MODES",
    "REJECTION_ESTIMATORS",
    "REJECTION_LEVELS",
    "Aggregation",
    "ISMode",
    "OffPolicyLoss",
    "compute_advantages",
    "ess_truncation_cap",
    "grpo_advantages",
    "icepop_mask",
    "importance_weights",
    "m2po_mask",
    "off_policy_pg_loss",
    "per_sample_pg_loss",
    "reinforce_advantages",
    "rejection_mask",
    "rloo_advantages",
    "sequence_log_weights",
    "token_log_ratios",
]

Aggregation = Literal["seq-mean-token-mean", "seq-mean-token-sum", "token-mean"]
ISMode = Literal["none", "is", "tis", "mis"]
Estimator = Literal["reinforce", "rloo", "grpo"]

AGGREGATIONS: tuple[str, ...] = ("seq-mean-token-mean", "seq-mean-token-sum", "token-mean")
IS_MODES: tuple[str, ...] = ("none", "is", "tis", "mis")
ESTIMATORS: tuple[str, ...] = ("reinforce", "rloo", "grpo")
Reduce = Literal["sum", "mean"]
REDUCTIONS: tuple[str, ...] = ("sum", "mean")


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
    if not bool((torch.isfinite(total).all() & torch.isfinite(var).all()).item()):
        raise ValueError(
            f"rewards up to {rewards.abs().max().item():.3g} overflow the {dtype} group "
            f"statistics (a group sum or squared deviation exceeds {torch.finfo(dtype).max:.3g})"
            + ("; pass float64 rewards" if dtype != torch.float64 else "")
        )
    return count[inv], total[inv], std[inv]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in: ``dtype`` promoted to at least float32.

    bf16/fp16 inputs are exact values, but sums and differences of them are not
    representable in bf16/fp16 (bf16 holds integers exactly only up to 256), so
    every reduction here runs in float32 or wider; float64 inputs stay float64.
    """
    return torch.promote_types(dtype, torch.float32)


def _prep_rewards(rewards: Tensor) -> Tensor:
    _check_vector(rewards, "rewards")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    _check_finite(rewards, "rewards")
    return rewards.detach().to(_compute_dtype(rewards.dtype))


# --------------------------------------------------------------------------- advantages


def reinforce_advantages(rewards: Tensor, baseline: float | Tensor | None = None) -> Tensor:
    """REINFORCE advantages ``A_i = R_i - b``.

    Args:
        rewards: ``[B]`` scalar reward per trajectory.
        baseline: a constant ``b`` (float or 0-d tensor) or a ``[B]`` tensor of
            per-sample baselines. Default ``None`` means ``b = 0`` (plain REINFORCE).

    Returns:
        ``[B]`` detached advantages in the dtype of ``rewards`` promoted to at least
        float32 (float default dtype for integer rewards). This holds for every
        advantage function here: bf16/fp16 rewards are summed in float32.

    Raises:
        ValueError: NaN/Inf rewards or baseline (checked in their own precision), or
            ``R - b`` beyond the range of that dtype (pass float64 rewards). The
            group statistics of :func:`rloo_advantages` and :func:`grpo_advantages`
            raise likewise when a group sum or squared deviation overflows.
    """
    r = _prep_rewards(rewards)
    if baseline is None:
        return r.clone()
    # validate in the baseline's own precision (a Python float is a float64), then cast
    if isinstance(baseline, Tensor):
        b_in = baseline.detach().to(r.device)
    else:
        b_in = torch.as_tensor(baseline, dtype=torch.float64, device=r.device)
    if not b_in.is_floating_point():
        b_in = b_in.to(torch.float64)
    if b_in.dim() not in (0, 1) or (b_in.dim() == 1 and b_in.shape[0] != r.shape[0]):
        raise ValueError(
            f"baseline must be a scalar or of shape [{r.shape[0]}], got {tuple(b_in.shape)}"
        )
    _check_finite(b_in, "baseline")
    adv = r - b_in.to(r.dtype)
    if not bool(torch.isfinite(adv).all().item()):
        raise ValueError(
            f"advantages R - b overflow {r.dtype} (|R| up to {r.abs().max().item():.3g}, "
            f"|b| up to {b_in.abs().max().item():.3g})"
            + ("; pass float64 rewards" if r.dtype != torch.float64 else "")
        )
    return adv


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


def _check_pair(logp_new: Tensor, logp_old: Tensor, mask: Tensor) -> Tensor:
    """Validate a (logp_new, logp_old, mask) triple; return the boolean mask."""
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
    return mask.bool()


def _log_ratio(logp_new: Tensor, logp_old: Tensor, m: Tensor) -> Tensor:
    """``logp_new - logp_old`` in float64 at response positions, exactly 0 at padding."""
    d = logp_new.detach().to(torch.float64) - logp_old.detach().to(torch.float64)
    return torch.where(m, d, torch.zeros_like(d))


def token_log_ratios(logp_new: Tensor, logp_old: Tensor, mask: Tensor) -> Tensor:
    """Token log ratios ``x_it = logp_new_it - logp_old_it`` in float64, detached.

    ``x_it = log r_it`` with ``r_it = pi_theta(y_it) / mu(y_it)``; padding positions
    (``mask == 0``) are exactly ``0`` whatever they hold. Every input dtype (bf16,
    fp16, fp32) converts to float64 exactly, so ``x`` is the exact difference of the
    given log-probs up to one float64 rounding. This is the quantity every masking
    rule below thresholds.

    Returns:
        ``[B, T]`` float64 tensor on the inputs' device.
    """
    m = _check_pair(logp_new, logp_old, mask)
    return _log_ratio(logp_new, logp_old, m)


def sequence_log_weights(
    logp_new: Tensor, logp_old: Tensor, mask: Tensor, *, reduce: Reduce = "sum"
) -> Tensor:
    """Sequence-level log importance weights, computed in float64.

    * ``reduce="sum"`` (default): ``lw_i = sum_t mask_it (logp_new_it - logp_old_it)``,
      the log of the trajectory ratio ``pi_theta(tau_i) / mu(tau_i)``.
    * ``reduce="mean"``: ``lw_i = (1/L_i) sum_t mask_it (logp_new_it - logp_old_it)``,
      GSPO's length-normalised sequence ratio ``s_i = exp(lw_i)`` (the geometric mean
      of the token ratios); a trajectory with no response token (``L_i = 0``) gets 0.

    ``logp_old`` are the behaviour log-probs recorded when the trajectory was sampled
    (the stale policy ``mu``), ``logp_new`` those of the current policy ``pi_theta``.
    Padding positions (``mask == 0``) are ignored and may hold anything, including
    ``-inf`` or NaN. The result is detached: it is a weight, not a loss.

    Precision: the differences and the sum run in float64 whatever the input dtypes
    (a bf16 policy with float32 sampler log-probs is the usual case); the result is
    float64. Against a correctly rounded reference (``math.fsum``) the error is at
    most ``5e-13`` nats up to T = 32768 (``|lw|`` up to 2900; measured by
    ``benchmarks/bench_logweight_precision.py``); the same in bf16 was off by up
    to 0.4 nats at T = 1024 and 9 nats at T = 32768, and float32 by up to
    ``3e-4`` nats at T = 32768.

    With ``reduce="mean"`` and ``weights = exp(lw)`` in
    :func:`per_sample_pg_loss` with ``agg="seq-mean-token-mean"``, the gradient is
    GSPO's (unclipped) ``-(1/B) sum_i s_i A_i (1/L_i) sum_t grad log pi(y_it)``.

    Args:
        logp_new: ``[B, T]`` float.
        logp_old: ``[B, T]`` float.
        mask: ``[B, T]`` bool or 0/1.
        reduce: ``"sum"`` (default) or ``"mean"``.

    Returns:
        ``[B]`` detached float64 log weights (pass them to
        ``VCPOAdamW.step(log_weights=...)``; ``exp`` of them is ``w_i``).
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduce {reduce!r}; expected one of {REDUCTIONS}")
    m = _check_pair(logp_new, logp_old, mask)
    lw = _log_ratio(logp_new, logp_old, m).sum(dim=1)
    if reduce == "mean":
        lw = lw / m.sum(dim=1).clamp(min=1).to(torch.float64)
    return lw


def importance_weights(
    log_weights: Tensor,
    mode: ISMode = "tis",
    c: float | None = None,
    *,
    ess_target: float | None = None,
    process_group: GroupArg = None,
) -> Tensor:
    """Per-trajectory importance weights used in the surrogate, from log weights.

    With ``w_i = exp(lw_i)``:

    * ``"none"``: ``1`` (plain on-policy loss applied to whatever data it is given).
    * ``"is"``:   ``w_i`` (raw sequence-level importance sampling).
    * ``"tis"``:  ``min(w_i, c)`` (truncated IS); computed as ``exp(min(lw_i, log c))``
      so it never overflows.
    * ``"mis"``:  ``w_i`` if ``w_i <= c`` else ``0`` (masked IS / rejection).

    ESS-targeted truncation (``mode="tis"``, ``ess_target=rho``): the cap is
    ``c_rho = exp(ess_truncation_cap(lw, rho))``, the largest cap with
    ``ESS(min(w, c_rho)) / B >= rho`` (see :func:`ess_truncation_cap`; global over
    ``process_group``). If ``c`` is also given the cap is ``min(c, c_rho)``, which
    still meets the target (the ESS only grows as the cap falls).

    The result is always detached: the weight multiplies the score, it is not
    differentiated (see :func:`per_sample_pg_loss`). It is computed in the dtype of
    ``log_weights`` promoted to at least float32 (bf16 log weights give float32
    weights; float64 ones, e.g. from :func:`sequence_log_weights`, float64).

    Args:
        log_weights: ``[B]`` finite log weights (e.g. from :func:`sequence_log_weights`).
        mode: one of ``"none"``, ``"is"``, ``"tis"``, ``"mis"``. Default ``"tis"``.
        c: threshold for ``"tis"`` and ``"mis"``, ``> 0``. Default ``None``: ``8.0``
            (the reference's ``rollout_is_threshold``), or no fixed cap when
            ``ess_target`` is given.
        ess_target: target ESS ratio ``rho`` in ``(0, 1]`` for ``"tis"``. Default
            ``None`` (fixed cap ``c``).
        process_group: with ``ess_target``, reduce over this group so that the cap
            is global (``None``, a ``ProcessGroup`` or ``"world"``). Default ``None``.

    Raises:
        ValueError: non-finite log weights, ``c <= 0``, an unknown mode,
            ``ess_target`` with a mode other than ``"tis"``, weights that overflow
            the dtype (``"is"``, or ``"tis"`` when the ESS target needs no cap), or
            weights that all underflow it (every weight that is positive in exact
            arithmetic below the smallest normal number, e.g. float32 log weights all
            below ~-87.3: subtract ``lw.max()`` first or pass float64 log weights).
    """
    _check_vector(log_weights, "log_weights")
    _check_float(log_weights, "log_weights")
    _check_finite(log_weights, "log_weights")
    if mode not in IS_MODES:
        raise ValueError(f"unknown IS mode {mode!r}; expected one of {IS_MODES}")
    if c is not None and not (c > 0 and math.isfinite(c)):
        raise ValueError(f"IS threshold c must be finite and > 0, got {c}")
    if ess_target is not None and mode != "tis":
        raise ValueError(
            f"ess_target sets a truncation cap, so it needs mode='tis' (got mode={mode!r})"
        )
    lw = log_weights.detach().to(_compute_dtype(log_weights.dtype))
    if mode == "none":
        return torch.ones_like(lw)
    if mode == "is":
        return _weight_range(lw.exp(), lw, None, "raw importance weights")
    if mode == "tis" and ess_target is not None:
        log_cap = ess_truncation_cap(lw, ess_target, process_group=process_group)
        if c is not None:
            log_cap = log_cap.clamp(max=math.log(c))
        w = torch.minimum(lw.to(torch.float64), log_cap).exp().to(lw.dtype)
        return _weight_range(w, lw, None, "importance weights (the ESS target needs no cap)")
    log_c = math.log(8.0 if c is None else c)
    if mode == "tis":
        return _weight_range(lw.clamp(max=log_c).exp(), lw, None, "truncated importance weights")
    # mis
    accepted = lw <= log_c
    w = torch.where(accepted, lw.clamp(max=log_c).exp(), torch.zeros_like(lw))
    return _weight_range(w, lw, accepted, "masked importance weights")


def _weight_range(w: Tensor, lw: Tensor, accepted: Tensor | None, what: str) -> Tensor:
    """Return ``w = exp(.)`` if its dtype holds it, else raise.

    Overflow (``inf``) and total underflow both raise: if every weight that is
    positive in exact arithmetic (all of them, or the ``accepted`` ones) is below the
    dtype's smallest normal number, the weights are 0 or denormal and so would be
    the loss and its gradient. A single tiny weight among normal ones rounds as any
    arithmetic in that dtype does.
    """
    fi = torch.finfo(w.dtype)
    live = w if accepted is None else torch.where(accepted, w, torch.zeros_like(w))
    n_live = w.new_tensor(w.numel()) if accepted is None else accepted.sum().to(w.dtype)
    stats = torch.stack([torch.isfinite(w).all().to(w.dtype), live.max(), n_live]).tolist()
    finite, top, n = stats
    if not finite:
        raise ValueError(
            f"{what} overflow {w.dtype} (max log weight {lw.max().item():.1f}); "
            "use mode='tis' with a cap c, mode='mis', or float64 log weights"
        )
    if n > 0 and top < fi.tiny:
        raise ValueError(
            f"{what} underflow {w.dtype}: the largest is {top:.3g} (max log weight "
            f"{lw.max().item():.1f}), below the smallest normal number {fi.tiny:.3g}, so the "
            "loss and its gradient would be 0 or denormal. Subtract the largest log weight "
            "first (lw - lw.max(): a common factor leaves the ESS unchanged) or use float64 "
            "log weights"
        )
    return w


# --------------------------------------------------------------------------- ESS-targeted cap


def _cap_inputs(log_weights: Any, mask: Any) -> tuple[Tensor, Tensor]:
    """Validate; return (float64 kept entries that are valid, header row)."""
    if not isinstance(log_weights, Tensor):
        raise ValueError(f"log_weights must be a torch.Tensor, got {type(log_weights).__name__}")
    _check_float(log_weights, "log_weights")
    x = log_weights.detach().reshape(-1).to(torch.float64)
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise ValueError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.shape != log_weights.shape:
            raise ValueError(
                f"mask has shape {tuple(mask.shape)} but log_weights have shape "
                f"{tuple(log_weights.shape)}"
            )
        if mask.device != log_weights.device:
            raise ValueError(f"mask is on {mask.device} but log_weights are on {x.device}")
        x = x[mask.reshape(-1) != 0]
    header = torch.zeros(4, dtype=torch.float64, device=x.device)
    header[0] = x.numel()
    header[1] = torch.isnan(x).sum()
    header[2] = torch.isinf(x).sum()
    return x, header


def ess_truncation_cap(
    log_weights: Tensor,
    target_ratio: float,
    mask: Tensor | None = None,
    process_group: GroupArg = None,
) -> Tensor:
    r"""Log of the largest cap ``c`` with ``ESS(min(w, c)) / n >= target_ratio``.

    For weights ``w_i = exp(lw_i)`` (the unmasked entries, ``n`` of them, over every
    rank of ``process_group``) and a cap ``c``, ``ESS(c) = (sum_i min(w_i, c))^2 /
    sum_i min(w_i, c)^2``. ``ESS(c)`` does not increase with ``c``
    (``dESS/dc`` has the sign of ``sum_{w_i < c} w_i (w_i - c) <= 0``), equals ``n``
    for ``c <= min w`` and the plain ESS for ``c >= max w``. So the feasible caps
    form an interval ``(0, c*]`` and this returns ``log c*``:

    * if the untruncated weights already meet the target, ``+inf`` (every cap is
      feasible; ``min(w, inf) = w``);
    * otherwise, with the weights sorted in decreasing order ``w_(1) >= ... >= w_(n)``,
      the suffix sums ``A_k = sum_{j>k} w_(j)`` and ``Q_k = sum_{j>k} w_(j)^2`` give
      the ESS at the cap ``w_(k)`` (``k`` weights capped) in closed form,
      ``(k w_(k) + A_k)^2 / (k w_(k)^2 + Q_k)``; the first ``k`` whose ESS meets the
      target brackets ``c*`` in ``[w_(k), w_(k-1))`` with ``k' = k - 1`` weights
      capped, and on that segment ``(k'c + A)^2 = rho n (k'c^2 + Q)`` (``A = A_{k'}``,
      ``Q = Q_{k'}``) has the single root
      ``c = (A + sqrt(rho n / k' (A^2 - (rho n - k') Q))) / (rho n - k')``
      (the ESS is at least the number of capped weights, so ``k' < rho n``).

    O(n log n) (one sort), in float64 and in log space: the suffix sums are
    ``logcumsumexp`` of the sorted log weights and every ratio is taken relative to
    the cap, so no weight is exponentiated unshifted and log weights spanning
    ``[-1e4, 1e4]`` work. Exact up to float64 rounding of the root (relative
    ``~1e-15`` for moderate log weights; the log weights themselves carry an
    absolute precision of ``|lw| * 1.1e-16``).

    Under a process group, ranks first all-gather ``(count, #NaN, #Inf, malformed)``
    (one small collective, so every rank raises the same error on bad input), then
    all-gather their log weights padded to the largest local count (one collective
    of ``max_count`` float64 per rank). The cap depends on the top order statistics
    of the whole batch, which no fixed-size summary determines exactly; an exact
    search over merged statistics (all-reducing count/sum/sum-of-squares at a grid
    of candidate caps, then refining the bracket until it holds no weight) needs
    2 to ~8 rounds of a few KB each, while the gather moves 8 bytes per trajectory
    in one round (8 KB for B = 1024) and is negligible next to any gradient
    all-reduce. Every rank then computes the same cap from the same rank-ordered
    values (bit-identical).

    Args:
        log_weights: log importance weights, any shape (flattened), float.
        target_ratio: ``rho`` in ``(0, 1]``. ``rho <= 1/n`` never needs a cap;
            ``rho = 1`` gives ``min w`` (all weights equal after capping) unless
            they are already equal.
        mask: ``False``/``0`` entries are ignored (their value may be anything).
            Default ``None``.
        process_group: ``None`` (default, no reduction), a ``ProcessGroup`` or
            ``"world"``. Local batches may differ in size and may be empty.

    Returns:
        ``log c*`` as a float64 scalar tensor on the input's device (``+inf`` when
        no cap is needed).

    Raises:
        ValueError: ``target_ratio`` outside ``(0, 1]``, NaN or infinite log weights
            (unmasked), an empty (global) batch, a mask of the wrong shape. Under a
            process group every rank raises the same error.
    """
    if not (isinstance(target_ratio, (int, float)) and 0 < target_ratio <= 1):
        raise ValueError(f"target_ratio must be a number in (0, 1], got {target_ratio!r}")
    group = resolve_group(process_group, default_world=False)
    error: ValueError | None = None
    try:
        x, header = _cap_inputs(log_weights, mask)
    except ValueError as exc:
        if group is None:
            raise
        error = exc
        device = log_weights.device if isinstance(log_weights, Tensor) else torch.device("cpu")
        x = torch.empty(0, dtype=torch.float64, device=device)
        header = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64, device=device)
    rows = all_gather_rows(header, group).tolist()
    problems = []
    for rank, (count, nan, inf, malformed) in enumerate(rows):
        where = f"rank {rank}: " if len(rows) > 1 else ""
        if malformed:
            problems.append(f"{where}malformed input (see the error raised on that rank)")
        if nan or inf:
            problems.append(
                f"{where}{int(nan)} NaN and {int(inf)} infinite value(s) among {int(count)}"
            )
    if problems:
        msg = "invalid log_weights: " + "; ".join(problems)
        if error is not None:
            raise ValueError(f"{msg}. On rank {get_rank(group)}: {error}") from error
        raise ValueError(msg)
    counts = [int(r[0]) for r in rows]
    if sum(counts) == 0:
        raise ValueError("empty batch: no (unmasked) log_weights to compute a cap from")
    if group is not None:
        pad = torch.full((max(counts),), float("nan"), dtype=torch.float64, device=x.device)
        pad[: x.numel()] = x
        table = all_gather_rows(pad, group)
        x = torch.cat([table[r, :n] for r, n in enumerate(counts)])
    return _cap_from_values(x, float(target_ratio))


def _cap_from_values(x: Tensor, rho: float) -> Tensor:
    """The closed form of :func:`ess_truncation_cap` on the (global) valid values ``x``."""
    n = x.numel()
    xs = torch.sort(x, descending=True).values  # x_0 >= x_1 >= ... >= x_{n-1}
    ninf = torch.full((1,), -float("inf"), dtype=torch.float64, device=x.device)
    # la[j] = log sum_{i >= j} exp(x_i), lq[j] = log sum_{i >= j} exp(2 x_i): suffix
    # sums in log space (summed from the smallest up), so no term under- or overflows
    la = torch.cat([torch.logcumsumexp(xs.flip(0), 0).flip(0), ninf])
    lq = torch.cat([torch.logcumsumexp(2.0 * xs.flip(0), 0).flip(0), ninf])
    k = torch.arange(1, n + 1, dtype=torch.float64, device=x.device)
    # ess[k-1]: x_0..x_{k-1} capped at x_{k-1}, the rest untouched; every sum is taken
    # relative to the cap exp(x_{k-1}), so each term is <= 1
    ess = (k + torch.exp(la[1:] - xs)) ** 2 / (k + torch.exp(lq[1:] - 2.0 * xs))
    ess[-1] = n  # every weight capped at the smallest: all equal, exactly n (no rounding)
    target = rho * n
    if bool(ess[0] >= target) or bool(xs[0] == xs[-1]):  # all equal: ESS = n exactly
        return torch.tensor(float("inf"), dtype=torch.float64, device=x.device)
    j = int(torch.nonzero(ess >= target)[0, 0])  # >= 1
    # weights tied with x_j give the same cap, so the same ESS: the solution segment starts
    # at the first of them (ess[] rounds, so at a tie it may cross the target late, and the
    # empty segment [x_j, x_{j-1}) would pin the cap to x_j)
    j = max(1, int(torch.searchsorted(-xs, -xs[j])))
    # solution segment: x_0..x_{j-1} capped at c in [exp(x_j), exp(x_{j-1})), in units of
    # exp(x_j): A = 1 + s and Q = 1 + t with s = sum_{i > j} exp(x_i - x_j) and t likewise with
    # squares. Where the ESS is flat at the root (two nearly equal top weights, or the cap
    # next to tied weights) the discriminant A^2 - m Q (m = rho n - k') cancels and the square
    # root amplifies any absolute error in it. So s and t are summed directly (each term
    # <= 1; tied weights give exact integers), not read from the log-space suffix sums (whose
    # rounding is |x_j| eps), and the discriminant is formed in exact rational arithmetic from
    # them and from m taken exactly from rho and n (rho * n rounded is off by eps): c is then
    # accurate to ~1e-16 relative where it was off by 1e-10 (lw = [0, 29, 28.5, -1],
    # rho = 0.5), 20% (lw = [0, 0, 0, 1], rho = 1 - 2^-53) or set to min w.
    m_exact = Fraction(rho) * n - j
    d = xs[j + 1 :] - xs[j]
    s = float(torch.exp(d).sum())
    t = float(torch.exp(2.0 * d).sum())
    bracket = (1 + Fraction(s)) ** 2 - m_exact * (1 + Fraction(t))
    disc = float(Fraction(rho) * n / j * bracket)
    gamma = torch.tensor(
        (1.0 + s + math.sqrt(max(disc, 0.0))) / float(m_exact),
        dtype=torch.float64,
        device=x.device,
    )
    return (xs[j] + torch.log(gamma)).clamp(min=xs[j], max=xs[j - 1])


# --------------------------------------------------------------------------- masking rules


def _k3_series(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(small, xs, p)``: ``|x| <= 0.5``, ``x`` there (else 0) and
    ``p = sum_{m<18} xs^m / (m+2)!`` (relative truncation error below 1e-21), so that
    ``K3 = xs^2 p`` on ``small`` without the cancellation of ``expm1(x) - x``."""
    small = x.abs() <= 0.5
    xs = torch.where(small, x, torch.zeros_like(x))
    p = torch.full_like(x, 1.0 / math.factorial(_K3_TERMS + 1))
    for m in range(_K3_TERMS - 2, -1, -1):  # Horner, in place
        p.mul_(xs).add_(1.0 / math.factorial(m + 2))
    return small, xs, p


def _k3(x: Tensor) -> Tensor:
    """``K3 = r - 1 - log r = expm1(x) - x`` for ``x = log r``, to float64 accuracy.

    For ``|x| <= 0.5`` the series ``x^2 sum_{m>=0} x^m / (m+2)!`` avoids the
    cancellation of ``expm1(x) - x``; ``x > 709.78`` gives ``+inf`` (the value
    exceeds the float64 range).
    """
    small, xs, p = _k3_series(x)
    return torch.where(small, xs * xs * p, torch.expm1(x) - x)


def _log_k3(x: Tensor) -> Tensor:
    """``log K3(x)`` without overflow for any finite ``x`` (``-inf`` at ``x = 0``).

    ``2 log|x| + log p`` for ``|x| <= 0.5``, ``log(expm1(x) - x)`` up to ``x = 700``,
    and ``x`` itself above (``log K3 = x + log1p(-(1 + x) e^-x)``, and the correction
    is below ``1e-300``).
    """
    small, xs, p = _k3_series(x)
    log_small = 2.0 * torch.log(xs.abs()) + torch.log(p)
    big = x > 700.0
    xm = torch.where(big | small, torch.ones_like(x), x)
    log_mid = torch.log(torch.expm1(xm) - xm)
    return torch.where(small, log_small, torch.where(big, x, log_mid))


_K3_TERMS = 18


def icepop_mask(
    logp_new: Tensor, logp_old: Tensor, mask: Tensor, low: float = 0.5, high: float = 5.0
) -> Tensor:
    """IcePop band mask: keep token ``t`` iff ``low <= r_t <= high``.

    ``r_t = pi_theta(y_t) / mu(y_t)``, tested in log space:
    ``keep_t = mask_t and log(low) <= x_t <= log(high)`` with ``x`` from
    :func:`token_log_ratios` (float64, so ``|x|`` of ``1e3`` is fine). IcePop zeroes
    the gradient of the tokens outside the band; compose it with the sequence weights
    of :func:`importance_weights` (TIS/MIS) by passing the result to
    :func:`per_sample_pg_loss` either as ``token_weights=keep`` (the masked tokens
    are dropped, the normaliser ``L_i`` is unchanged) or as ``mask & keep``
    (renormalised over the kept tokens). For IcePop's token-level weights pass
    ``token_weights=torch.where(keep, x.exp(), 0)``.

    Args:
        logp_new, logp_old, mask: ``[B, T]`` as for :func:`sequence_log_weights`.
        low: lower ratio bound, ``> 0``. Default ``0.5``.
        high: upper ratio bound, ``>= low``. Default ``5.0``.

    Returns:
        ``[B, T]`` bool keep-mask (``False`` at padding).
    """
    if not (0 < low <= high and math.isfinite(high)):
        raise ValueError(f"IcePop needs 0 < low <= high < inf, got low={low}, high={high}")
    m = _check_pair(logp_new, logp_old, mask)
    x = _log_ratio(logp_new, logp_old, m)
    return m & (x >= math.log(low)) & (x <= math.log(high))


DivergenceEstimator = Literal["k1", "k2", "k3"]
RejectionLevel = Literal["token", "seq-sum", "seq-mean", "seq-max"]
REJECTION_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")
REJECTION_LEVELS: tuple[str, ...] = ("token", "seq-sum", "seq-mean", "seq-max")


def rejection_mask(
    logp_new: Tensor,
    logp_old: Tensor,
    mask: Tensor,
    *,
    estimator: DivergenceEstimator = "k3",
    level: RejectionLevel = "token",
    upper: float,
    lower: float | None = None,
) -> Tensor:
    """Rejection by a per-token divergence estimate, at token or sequence level.

    With ``x_t = log r_t`` (:func:`token_log_ratios`, float64) the token statistics are

    * ``"k1"``: ``d_t = x_t`` (the log ratio), tested against ratio bounds
      ``log(lower) <= . <= log(upper)``; ``lower`` defaults to ``1 / upper``;
    * ``"k2"``: ``d_t = x_t^2 / 2``, tested ``<= upper``;
    * ``"k3"``: ``d_t = r_t - 1 - x_t`` (``>= 0``, unbiased for KL(mu || pi) under mu),
      tested ``<= upper``; computed without cancellation for small ``|x|`` and as
      ``+inf`` above ``x = 709.78``.

    and the levels aggregate them over the response tokens of trajectory ``i``:

    * ``"token"``: keep token ``t`` iff ``d_t`` passes; returns ``[B, T]``;
    * ``"seq-sum"``: ``D_i = sum_t d_t`` (for k1: the sequence ratio ``w_i``);
    * ``"seq-mean"``: ``D_i = (1/L_i) sum_t d_t`` (for k1: the geometric-mean ratio
      ``exp(mean_t x_t)``, i.e. geometric-mean rejection);
    * ``"seq-max"``: keep trajectory ``i`` iff every one of its tokens passes (for k1:
      ``min_t x_t >= log(lower)`` and ``max_t x_t <= log(upper)``);

    sequence levels return ``[B]``. A trajectory with no response token has ``D_i = 0``
    (ratio 1) and is kept iff that passes. Compose with TIS/MIS weights through
    :func:`per_sample_pg_loss`: ``token_weights=keep`` or ``mask & keep`` (token
    level), ``weights * keep`` or ``mask & keep[:, None]`` (sequence level).

    Args:
        logp_new, logp_old, mask: ``[B, T]`` as for :func:`sequence_log_weights`.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (default).
        level: ``"token"`` (default), ``"seq-sum"``, ``"seq-mean"`` or ``"seq-max"``.
        upper: upper bound (a ratio for k1, a divergence for k2/k3). Required.
        lower: k1 only: lower ratio bound, ``0 < lower <= upper``. Default
            ``1 / upper``.

    Returns:
        bool keep-mask: ``[B, T]`` for ``"token"`` (``False`` at padding), else ``[B]``.
    """
    if estimator not in REJECTION_ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {REJECTION_ESTIMATORS}")
    if level not in REJECTION_LEVELS:
        raise ValueError(f"unknown level {level!r}; expected one of {REJECTION_LEVELS}")
    if not (isinstance(upper, (int, float)) and math.isfinite(upper)):
        raise ValueError(f"upper must be a finite number, got {upper!r}")
    if estimator == "k1":
        lo = 1.0 / upper if (lower is None and upper > 0) else lower
        if lo is None or not (0 < lo <= upper):
            raise ValueError(f"k1 needs ratio bounds 0 < lower <= upper, got {lower}, {upper}")
        log_lo, log_hi = math.log(lo), math.log(upper)
    else:
        if lower is not None:
            raise ValueError(f"{estimator} is a one-sided (upper) test; lower must be None")
        if upper < 0:
            raise ValueError(f"{estimator} is >= 0, so upper must be >= 0, got {upper}")
    m = _check_pair(logp_new, logp_old, mask)
    x = _log_ratio(logp_new, logp_old, m)
    if estimator == "k1":
        d = x
    elif estimator == "k2":
        d = 0.5 * x * x
    else:
        d = torch.where(m, _k3(x), torch.zeros_like(x))

    def passes(s: Tensor) -> Tensor:
        if estimator == "k1":
            return (s >= log_lo) & (s <= log_hi)
        return s <= upper

    if level == "token":
        return m & passes(d)
    if level == "seq-max":
        return (passes(d) | ~m).all(dim=1)
    total = torch.where(m, d, torch.zeros_like(d)).sum(dim=1)
    if level == "seq-mean":
        total = total / m.sum(dim=1).clamp(min=1).to(torch.float64)
    return passes(total)


def m2po_mask(
    logp_new: Tensor,
    logp_old: Tensor,
    mask: Tensor,
    tau: float = 0.04,
    *,
    advantages: Tensor | None = None,
) -> Tensor:
    """M2PO second-moment mask: drop the tokens with the largest ``(log r)^2``.

    Rule (Algorithm 1 of Zheng et al. 2025, "Prosperity before Collapse", run to its
    fixed point): with ``q_t = x_t^2`` (``x`` from :func:`token_log_ratios`) over the
    candidate tokens ``C``, repeatedly remove the candidate with the largest ``q``
    (ties: the one first in row-major ``[B, T]`` order, as ``argmax`` picks it)
    while the mean of ``q`` over the remaining candidates exceeds ``tau``. Computed
    in closed form: sort ``C`` by ``q`` ascending (ties: later tokens first), keep the
    longest prefix whose mean is ``<= tau`` (prefix means never decrease), mask the
    rest. Only tokens with ``q > tau`` can ever be removed; if every candidate has
    ``q > tau`` all candidates are removed.

    Exactness: ``q_t`` is the float64 square ``fl(x_t * x_t)`` (``+inf`` if it
    overflows) and ``tau`` the float64 value of the argument; the comparison
    "mean ``<= tau``", i.e. ``sum_{t in S} q_t <= |S| * tau``, is decided in exact
    (rational) arithmetic on these values, so a mean that equals ``tau`` keeps its
    tokens and one that exceeds it by less than a rounding error does not. A float
    ``cumsum`` decides every prefix whose margin exceeds its rounding-error bound;
    the few within the bound (ties like ``q = 0.2**2`` against ``tau = 0.04``) are
    settled by an exact sum (``math.fsum``), so the result does not depend on the
    summation order of the CPU/GPU kernel.

    * ``advantages=None`` (default): ``C`` = every response token (the rule as
      usually quoted: the batch mean of ``(log r)^2`` over kept tokens is ``<= tau``).
    * ``advantages`` ``[B]`` given: ``C`` = the paper's trust-region tokens, those with
      ``A_i > 0`` and ``x_t > 0`` or ``A_i < 0`` and ``x_t < 0`` (where PPO clipping
      could act); other tokens are always kept and do not enter the mean.

    The batch is the one passed in: under data parallelism each rank applies the
    rule to its own tokens (as the reference implementations do per micro-batch).
    The paper normalises the loss by all response tokens, i.e.
    ``per_sample_pg_loss(logp, mask, ..., token_weights=keep)``.

    Args:
        logp_new, logp_old, mask: ``[B, T]`` as for :func:`sequence_log_weights`.
        tau: threshold on the mean of ``(log r)^2``, ``>= 0``. Default ``0.04``
            (the paper's value for every experiment).
        advantages: optional ``[B]`` advantages selecting the trust-region tokens.

    Returns:
        ``[B, T]`` bool keep-mask (``False`` at padding).
    """
    if not (isinstance(tau, (int, float)) and tau >= 0 and math.isfinite(tau)):
        raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
    m = _check_pair(logp_new, logp_old, mask)
    x = _log_ratio(logp_new, logp_old, m)
    cand = m
    if advantages is not None:
        _check_vector(advantages, "advantages", x.shape[0])
        _check_float(advantages, "advantages")
        _check_finite(advantages, "advantages")
        _check_same_device(("logp_new", logp_new), ("advantages", advantages))
        a = advantages.detach()[:, None]
        cand = m & (((a > 0) & (x > 0)) | ((a < 0) & (x < 0)))
    idx = torch.nonzero(cand.reshape(-1)).reshape(-1).flip(0)  # later tokens first
    q = (x * x).reshape(-1)[idx]
    order = torch.sort(q, stable=True)
    kept = _m2po_prefix(order.values, float(tau))
    keep = m.clone().reshape(-1)
    keep[idx[order.indices[kept:]]] = False
    return keep.reshape(m.shape)


def _m2po_prefix(q: Tensor, tau: float) -> int:
    """Largest ``n`` with ``sum(q[:n]) <= n * tau`` in exact arithmetic (``q`` ascending).

    ``P_n = sum_{i<n} (q_i - tau)`` is convex in ``n`` (its increments ``q_i - tau``
    never decrease) with ``P_0 = 0``, so ``{n : P_n <= 0}`` is ``[0, n*]``. A float64
    ``cumsum`` gives ``P_n`` up to ``E_n = 4 u n (S_n + n tau) + 2^-1000`` (``u =
    2^-53``; a bound for any summation order, with room for the rounding of ``n tau``
    and of the subtraction; the constant covers underflow and is a normal number, as
    subnormal operands are slow on x86), which settles every ``n`` with
    ``|P_n| > E_n``. ``n*`` lies between the last settled ``P_n <= 0`` and the first
    settled ``P_n > 0``; that bracket is bisected with exact signs of ``P_n``
    (:func:`math.fsum` is exact in sign; a :class:`~fractions.Fraction` sum if it
    overflows). For real data the bracket holds no undecided ``n`` (the crossing has
    slope ``q_n* - tau``, far above ``E_n``): one device sync.
    """
    n_all = q.numel()
    if n_all == 0:
        return 0
    if tau == 0.0:  # P_n <= 0 iff q_0 .. q_{n-1} are all 0
        return int((q == 0).sum())
    count = torch.arange(1, n_all + 1, dtype=torch.float64, device=q.device)
    prefix = q.cumsum(0)
    tc = tau * count
    excess = prefix - tc
    bound = (prefix + tc) * (count * (4.0 * 2.0**-53)) + 2.0**-1000
    # an overflow (inf bound, or inf - inf = nan) leaves n undecided
    sure_ok = (excess <= -bound) & torch.isfinite(bound)
    sure_bad = excess > bound
    ok_idx = torch.nonzero(sure_ok)
    bad_idx = torch.nonzero(sure_bad)
    lo = int(ok_idx[-1, 0]) + 1 if ok_idx.numel() else 0  # P_lo <= 0 is known
    hi = int(bad_idx[0, 0]) + 1 if bad_idx.numel() else n_all + 1  # P_hi > 0 is known
    if hi == lo + 1:
        return lo
    vals = q[: hi - 1].tolist()

    def within(n: int) -> bool:  # exact: sum(q[:n]) <= n * tau
        if math.isinf(vals[n - 1]):  # ascending: an infinite q is in this prefix
            return False
        try:
            return math.fsum(itertools.chain(vals[:n], itertools.repeat(-tau, n))) <= 0.0
        except OverflowError:  # finite values whose partial sums pass float64's range
            return sum(map(Fraction, vals[:n])) <= n * Fraction(tau)

    while hi - lo > 1:  # invariant: P_lo <= 0 < P_hi
        mid = (lo + hi) // 2
        if within(mid):
            lo = mid
        else:
            hi = mid
    return lo


# --------------------------------------------------------------------------- surrogate losses


def per_sample_pg_loss(
    logp: Tensor,
    mask: Tensor,
    advantages: Tensor | None = None,
    weights: Tensor | None = None,
    agg: Aggregation = "seq-mean-token-mean",
    *,
    token_weights: Tensor | None = None,
) -> Tensor:
    """Per-trajectory policy-gradient surrogate ``l`` of shape ``[B]``.

    ``l_i = -w_i * A_i * s_i`` with ``w_i`` and ``A_i`` treated as constants
    (detached) and ``s_i`` the aggregated log-likelihood of trajectory ``i``
    (``u_it = token_weights[i, t]``, ``1`` by default):

    * ``"seq-mean-token-mean"``: ``s_i = (1/B) * (1/L_i) sum_t mask_it u_it logp_it``
    * ``"seq-mean-token-sum"``:  ``s_i = (1/B) * sum_t mask_it u_it logp_it``
    * ``"token-mean"``:          ``s_i = (sum_t mask_it u_it logp_it) / (sum_{j,t} mask_jt)``

    so that in every mode ``l.sum()`` is the batch loss of that mode (e.g. for
    token-mean, the mean over all response tokens of ``-w A u logp``), and
    ``grad l_i = -w_i A_i grad s_i``; for seq-mean-token-sum that is
    ``-(w_i A_i / B) grad log pi(tau_i)``. Entry ``i`` depends on trajectory ``i``
    only (the token-mean denominator is a constant of the batch), which is the
    contract ``OPOB.backward`` needs. A trajectory with no response tokens
    contributes ``0``. The normalisers ``L_i`` count ``mask``, not ``u``: a 0/1
    ``token_weights`` drops tokens without renormalising (as IcePop and M2PO do).

    For OPOB, call without ``advantages`` (``A_i = 1``): ``l_i = -w_i s_i`` is the
    score surrogate carrying the importance weight, and OPOB applies ``R_i - b*``.

    Precision: the loss is computed and returned in the dtype of ``logp`` promoted
    to at least float32 (a bf16 policy gives a float32 loss: a bf16 sum over 1024
    tokens was off by ~0.3%); the gradient flows back through the cast, so
    ``logp.grad`` keeps the dtype of ``logp``. ``A_i w_i`` is formed in the widest
    dtype of ``advantages`` and ``weights`` (float64 weights from
    :func:`importance_weights` stay float64) and cast once to the loss dtype, after
    checking that it fits: a coefficient, token weight, gradient coefficient
    ``A_i w_i u_it / N_i`` or loss entry beyond that dtype's range raises (float32:
    ``|A w| > 3.4e38``, i.e. log weights above ~88.7 with raw IS), and so do weights
    that *all* lie below its smallest normal number (the loss would be 0 or
    denormal); a single tiny weight among normal ones rounds as float32 does. With
    float64 ``logp`` everything runs in float64. (For fp16 ``logp`` the gradient is
    cast to fp16 after any loss scaling, which ``torch.amp.GradScaler`` guards.)

    Args:
        logp: ``[B, T]`` current-policy log-probs of the sampled tokens (with grad).
            Padding positions may hold anything (they are masked with ``where``).
        mask: ``[B, T]`` bool or 0/1 response mask.
        advantages: ``[B]`` advantages. Default ``None`` means all ones.
        weights: ``[B]`` non-negative importance weights (e.g. from
            :func:`importance_weights`). Default ``None`` means all ones.
        agg: aggregation mode. Default ``"seq-mean-token-mean"`` (the reference's
            ``loss_agg_mode``).
        token_weights: ``[B, T]`` non-negative per-token weights ``u`` (detached;
            e.g. a keep-mask from :func:`icepop_mask`, :func:`rejection_mask` or
            :func:`m2po_mask`, or token-level IS weights). Padding may hold
            anything. Default ``None`` means all ones.

    Returns:
        ``[B]`` loss vector, differentiable w.r.t. ``logp``.

    Raises:
        ValueError: shape/device mismatches, NaN/Inf at response positions, negative
            weights, or coefficients the loss dtype cannot hold (see Precision), all
            before anything is computed or returned.
    """
    _check_logp(logp, "logp")
    _check_mask(mask, logp.shape)
    _masked_finite(logp, mask, "logp")
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {agg!r}; expected one of {AGGREGATIONS}")
    b = logp.shape[0]
    cd = _compute_dtype(logp.dtype)
    pairs: list[tuple[str, Tensor]] = [("logp", logp), ("mask", mask)]
    # coef = A * w in the widest input dtype (float64 weights stay float64), cast to the
    # compute dtype once, after checking that it fits (_check_loss_range)
    wd = cd
    if advantages is not None:
        _check_vector(advantages, "advantages", b)
        _check_float(advantages, "advantages")
        _check_finite(advantages, "advantages")
        pairs.append(("advantages", advantages))
        wd = torch.promote_types(wd, advantages.dtype)
    if weights is not None:
        _check_vector(weights, "weights", b)
        _check_float(weights, "weights")
        _check_finite(weights, "weights")
        if bool((weights < 0).any().item()):
            raise ValueError("weights contains negative values; importance weights are >= 0")
        pairs.append(("weights", weights))
        wd = torch.promote_types(wd, weights.dtype)
    coef_w = torch.ones(b, dtype=wd, device=logp.device)
    if advantages is not None:
        coef_w = coef_w * advantages.detach().to(wd)
    if weights is not None:
        coef_w = coef_w * weights.detach().to(wd)
    m = mask.bool()
    lp = logp.to(cd)
    u_w: Tensor | None = None
    if token_weights is not None:
        if not isinstance(token_weights, Tensor) or token_weights.shape != logp.shape:
            shape = getattr(token_weights, "shape", None)
            raise ValueError(
                f"token_weights must be a tensor of the log-probs' shape {tuple(logp.shape)}, "
                f"got {tuple(shape) if shape is not None else type(token_weights).__name__}"
            )
        pairs.append(("token_weights", token_weights))
        _check_same_device(*pairs)
        u_w = token_weights.detach()
        if u_w.dtype != torch.bool:
            _masked_finite(u_w, mask, "token_weights")
            if bool(((u_w < 0) & m).any().item()):
                raise ValueError("token_weights contains negative values at response positions")
    _check_same_device(*pairs)
    lengths = m.sum(dim=1).to(cd)
    _check_loss_range(coef_w, u_w, m, cd, agg, weights is not None, advantages is not None)
    coef = coef_w.to(cd)
    if u_w is not None:
        # padding may hold NaN: zero it before it meets the gradient (0 * NaN = NaN)
        u = torch.where(m, u_w.to(cd), torch.zeros((), dtype=cd, device=logp.device))
        lp = lp * u

    tok_sum = torch.where(m, lp, torch.zeros_like(lp)).sum(dim=1)
    if agg == "seq-mean-token-mean":
        s = tok_sum / lengths.clamp(min=1.0) / b
    elif agg == "seq-mean-token-sum":
        s = tok_sum / b
    else:  # token-mean
        s = tok_sum / lengths.sum().clamp(min=1.0)
    loss = -coef * s
    if not bool(torch.isfinite(loss.detach()).all().item()):
        i = int(torch.nonzero(~torch.isfinite(loss.detach()))[0, 0])
        raise ValueError(
            f"the loss of trajectory {i} overflows {cd} (|w_i A_i| = {abs(float(coef_w[i])):.3g}"
            f" times its aggregated log-probs): {_range_fix(cd)}"
        )
    return loss


def _f64_hint(cd: torch.dtype) -> str:
    return " or pass float64 logp" if cd != torch.float64 else ""


def _range_fix(cd: torch.dtype) -> str:
    fix = (
        "cap or rescale the weights (importance_weights with mode='tis' or 'mis' and a "
        "threshold c, or ess_target; a common factor leaves the ESS unchanged)"
    )
    return fix + _f64_hint(cd)


def _check_loss_range(
    coef: Tensor,
    u: Tensor | None,
    m: Tensor,
    cd: torch.dtype,
    agg: str,
    has_w: bool,
    has_a: bool,
) -> None:
    """Refuse coefficients that the compute dtype ``cd`` cannot carry.

    ``coef = A * w`` (``[B]``, in the widest input dtype) and ``u`` (token weights) are
    cast to ``cd``; the gradient w.r.t. ``logp_it`` is ``-coef_i u_it / N_i`` (``N_i``
    the aggregation's normaliser, ``>= 1``). Raises if a coefficient is non-finite or
    beyond ``cd``'s range (the loss and gradient would be +-inf or NaN), if the largest
    gradient coefficient reaches half of it (headroom for the few roundings of the
    backward pass, which this cannot observe), or if every nonzero coefficient is below
    ``cd``'s smallest normal number (the loss and gradient would be 0 or denormal,
    though the exact values are not). A single small coefficient among normal ones
    rounds as any ``cd`` arithmetic does.
    """
    fi = torch.finfo(cd)
    f64 = torch.float64
    name = " * ".join(n for n, on in (("weights", has_w), ("advantages", has_a)) if on)
    has_tok = m.any(dim=1)
    ac = coef.detach().abs().to(f64)
    if u is None:
        umax = has_tok.to(f64)
        u_all_small = torch.zeros((), dtype=torch.bool, device=m.device)
    else:
        au = torch.where(m, u.to(f64).abs(), torch.zeros((), dtype=f64, device=m.device))
        umax = au.amax(dim=1) if au.shape[1] else torch.zeros_like(ac)
        mx_u = umax.max()
        u_all_small = (mx_u > 0) & (mx_u < fi.tiny)
    if agg == "seq-mean-token-mean":
        norm = m.sum(dim=1).clamp(min=1).to(f64) * m.shape[0]
    elif agg == "seq-mean-token-sum":
        norm = torch.full_like(ac, float(m.shape[0]))
    else:
        norm = m.sum().clamp(min=1).to(f64).expand_as(ac)
    grad = ac * umax / norm
    live = ac * (umax > 0)  # coefficients that meet at least one response token
    stats = [ac.max(), umax.max(), grad.max(), live.max(), u_all_small.to(f64)]
    cmax, umx, gmax, lmax, u_small = torch.stack(stats).tolist()  # one device sync
    if not cmax <= fi.max:  # inf when A * w overflows even float64
        i = int(torch.nonzero(~(ac <= fi.max))[0, 0])
        raise ValueError(
            f"{name} = {float(coef[i]):.3g} for trajectory {i} overflows {cd} (max "
            f"{fi.max:.3g}), the dtype of the loss: the loss and its gradient would be inf; "
            + _range_fix(cd)
        )
    if umx > fi.max:
        raise ValueError(
            f"token_weights up to {umx:.3g} overflow {cd} (max {fi.max:.3g}), the dtype of "
            "the loss: cap the token weights" + _f64_hint(cd)
        )
    if gmax > fi.max / 2:
        raise ValueError(
            f"the gradient coefficient {name or '1'} * token_weights / normaliser reaches "
            f"{gmax:.3g}, within a factor 2 of the {cd} range of the loss (max "
            f"{fi.max:.3g}): the backward pass could overflow; " + _range_fix(cd)
        )
    if 0 < lmax < fi.tiny:
        raise ValueError(
            f"every nonzero {name} is below the smallest normal {cd} number ({fi.tiny:.3g};"
            f" largest {lmax:.3g}): in {cd}, the dtype of the loss, the loss and its gradient "
            "would be 0 or denormal although the exact values are not. Rescale the weights "
            "(e.g. subtract the largest log weight before exp: a common factor leaves the ESS "
            "unchanged)" + _f64_hint(cd)
        )
    if u_small:
        raise ValueError(
            f"every nonzero token weight is below the smallest normal {cd} number "
            f"({fi.tiny:.3g}): the loss and its gradient would be 0 or denormal; rescale "
            "the token weights" + _f64_hint(cd)
        )


class OffPolicyLoss(NamedTuple):
    """Result of :func:`off_policy_pg_loss`.

    Attributes:
        per_sample_loss: ``[B]`` loss vector (see :func:`per_sample_pg_loss`).
        log_weights: ``[B]`` detached raw sequence log weights ``lw_i`` (float64,
            untruncated; what ``VCPOAdamW.step(log_weights=...)`` takes).
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
    c: float | None = None,
    agg: Aggregation = "seq-mean-token-mean",
    reduce: Reduce = "sum",
    ess_target: float | None = None,
    process_group: GroupArg = None,
) -> OffPolicyLoss:
    """Sequence-level importance-sampled policy-gradient loss in one call.

    Computes ``lw = sequence_log_weights(logp, logp_old, mask, reduce=reduce)``,
    ``w = importance_weights(lw, is_mode, c, ess_target=..., process_group=...)`` and
    ``l = per_sample_pg_loss(logp, mask, advantages, w, agg)``. For
    seq-mean-token-sum the gradient of ``l.sum()`` is
    ``-(1/B) sum_i w_i A_i grad log pi_theta(tau_i)``.

    Args:
        logp: ``[B, T]`` current-policy token log-probs (with grad).
        logp_old: ``[B, T]`` behaviour token log-probs recorded at sampling time.
        mask: ``[B, T]`` response mask.
        advantages: ``[B]``; ``None`` (default) gives the OPOB score surrogate.
        is_mode: ``"none"``, ``"is"``, ``"tis"`` (default) or ``"mis"``.
        c: TIS/MIS threshold. Default ``None`` (``8.0`` unless ``ess_target``).
        agg: aggregation mode. Default ``"seq-mean-token-mean"``.
        reduce: ``"sum"`` (default, the trajectory ratio) or ``"mean"`` (GSPO).
        ess_target: ESS-targeted truncation, see :func:`importance_weights`.
        process_group: group for a global ESS-targeted cap. Default ``None``.
    """
    lw = sequence_log_weights(logp, logp_old, mask, reduce=reduce)
    w = importance_weights(lw, is_mode, c, ess_target=ess_target, process_group=process_group)
    return OffPolicyLoss(per_sample_pg_loss(logp, mask, advantages, w, agg), lw, w)
