"""The arms of the experiment: which stabilizers each learner uses.

Every arm uses the same policy, data stream, GRPO-style group rewards, optimizer
(``vcpo_optim.VCPOAdamW``), learning rate, batch, gradient clipping and number of
steps; they differ only in the importance weights in the loss and in whether the
two VCPO controls are switched on. With ``r_it = pi_theta(y_it) / mu(y_it)`` the
token ratio and ``w_i = prod_t r_it`` the sequence ratio:

============  ==========================================  ==============  ==================
arm           loss weights                                ESS step scale  baseline
============  ==========================================  ==============  ==================
``sync``      1 (lag 0: on-policy)                        no              GRPO mean/std
``sync-vcpo`` 1 (lag 0: on-policy)                        yes (a no-op)   OPOB (group, /std)
``no-is``     1 (stale data, no IS)                       no              GRPO mean/std
``is``        ``w_i`` raw sequence IS                     no              GRPO mean/std
``tis``       ``min(w_i, 8)``                             no              GRPO mean/std
``ess``       ``min(w_i, 8)``                             yes             GRPO mean/std
``opob``      ``min(w_i, 8)``                             no              OPOB (group, /std)
``vcpo``      ``min(w_i, 8)``                             yes             OPOB (group, /std)
``tis-rho``   ``min(w_i, c_rho)``, ESS-targeted cap       no              GRPO mean/std
``icepop``    token ``r_it`` if ``0.5 <= r_it <= 5`` else 0  no           GRPO mean/std
``m2po``      token ``r_it``, 0 on the M2PO mask          no              GRPO mean/std
``vcpo-rho``  ``min(w_i, c_rho)``, ESS-targeted cap       yes             OPOB (group, /std)
``vcpo-clip`` ``min(w_i, 8)``                             yes             OPOB, clip ``C``
============  ==========================================  ==============  ==================

``vcpo`` follows the reference configuration (mit-han-lab/vcpo,
``shell/vcpo/math/vcpo_k=*.sh``): sequence-level TIS with threshold 8 in the
loss, ESS step scaling with the sqrt rule computed on the *untruncated* weights
(``use_clipped=False``, ``base_ess_ratio=1``), and OPOB per prompt group with
std normalisation. So ``tis`` is the paper's baseline, and ``ess``/``opob`` are
the two ablations of ``vcpo`` (each adds one control to ``tis``). ``sync-vcpo``
separates what OPOB's baseline does on its own (at lag 0 every weight is 1, the ESS
ratio is exactly 1 and the step scale is exactly 1) from what it does against
staleness.

The corrections of issue 11 run as the field uses them, standalone on top of GRPO
(no ESS scaling, no OPOB), each with the one setting it is published with
(``Config.ess_target``, ``icepop_band``, ``m2po_tau``):

* ``tis-rho``: sequence TIS whose cap is chosen per batch as the largest cap with
  ``ESS(min(w, c)) / B >= rho`` (:func:`vcpo_optim.losses.ess_truncation_cap`,
  ``rho = 0.5``), instead of a fixed ``c = 8``. Why 0.5: by Kish's approximation
  the variance of a weighted mean of B samples is that of ESS unweighted ones, so
  ``rho = 0.5`` accepts at most twice the on-policy variance (chi2 of the used
  weights <= 1) and truncates as little as that allows. Chosen once, not tuned.
* ``icepop``: IcePop's token-level masked IS: token weight ``r_it`` inside the
  band ``[0.5, 5]``, 0 outside (:func:`vcpo_optim.losses.icepop_mask`).
* ``m2po``: M2PO (Zheng et al. 2025, Algorithm 1, ``tau = 0.04``): token weight
  ``r_it``, 0 on the tokens :func:`vcpo_optim.losses.m2po_mask` removes from the
  paper's trust-region candidates (``A > 0, r > 1`` or ``A < 0, r < 1``) until
  the mean ``(log r)^2`` of the rest is at most ``tau``; no PPO clipping.
* ``vcpo-rho``: ``vcpo`` with the ESS-targeted cap in place of ``c = 8`` (the
  combination the ESS-targeted cap was designed for: one number, the ESS one
  trusts, for every lag).
* ``vcpo-clip``: ``vcpo`` with OPOB's per-trajectory gradient clipping (issue
  11.4, ``OPOB(..., max_sample_grad_norm=C)``): each trajectory's contribution
  ``f_i c_i grad l_i`` to the gradient has norm at most ``C``, with
  ``f_i = min(1, C / (|c_i| ||grad l_i||))`` after the baseline. ``C`` =
  :data:`SAMPLE_CLIP_C` = 0.027, the 90th percentile of the nonzero on-policy
  contributions ``|c_i| ||grad l_i||`` of ``sync-vcpo`` (all steps, all seeds,
  :mod:`vcpo_optim.demo.calibrate`): on-policy it would touch the largest tenth;
  off-policy it bounds any one stale trajectory to what a large on-policy one
  contributes. Chosen once, not tuned. (For scale: the batch clip 1 over
  ``B = 128`` is 0.0078, about the median contribution, and ``1 / sqrt(B)`` = 0.088 lies
  above the 99th percentile.)

They run at the large lags only in the default sweep (``Arm.lags``; ``--all-lags``
or an explicit ``--lags`` runs every arm at every lag). Adding an arm is one line
in :data:`ARMS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: The lags at which the default sweep runs the issue-11 corrections.
LARGE_LAGS: tuple[int, ...] = (32, 128)

#: Per-trajectory clip ``C`` of ``vcpo-clip`` (``Config.max_sample_grad_norm``): the 90th
#: percentile of the nonzero on-policy contributions ``|c_i| ||grad l_i||`` of the
#: synchronous VCPO arm with the default configuration (:mod:`vcpo_optim.demo.calibrate`),
#: two significant digits; computed once, not tuned.
SAMPLE_CLIP_C: float = 0.027

TOKEN_CORRECTIONS: tuple[str, ...] = ("icepop", "m2po")


@dataclass(frozen=True)
class Arm:
    """One learner configuration.

    Attributes:
        name: short id used on the command line and in the metrics.
        label: human-readable method name for tables and plots.
        is_mode: sequence importance weights in the loss (``"none"``, ``"is"``,
            ``"tis"``; see :func:`vcpo_optim.losses.importance_weights`).
        ess_scaling: pass the raw log weights to ``VCPOAdamW.step``.
        opob: use :class:`vcpo_optim.OPOB` (reward minus the off-policy optimal baseline)
            instead of GRPO advantages.
        sync: runs only at lag 0 (and async arms only at lag > 0).
        ess_cap: with ``is_mode="tis"``, cap the weights at the ESS-targeted cap
            (``importance_weights(lw, "tis", ess_target=Config.ess_target)``)
            instead of ``Config.tis_c``.
        token_correction: ``None``, ``"icepop"`` or ``"m2po"``: token weights
            ``r_it`` on the tokens the rule keeps, 0 on the others (sequence
            weights then come from ``is_mode``, ``"none"`` for these arms).
        sample_clip: OPOB's per-trajectory gradient clipping,
            ``OPOB(..., max_sample_grad_norm=Config.max_sample_grad_norm)`` (needs
            ``opob``).
        lags: the lags at which the default sweep runs this arm (``None``: all).
        color: plot colour (``None``: matplotlib's next colour).
    """

    name: str
    label: str
    is_mode: str
    ess_scaling: bool = False
    opob: bool = False
    sync: bool = False
    ess_cap: bool = False
    token_correction: str | None = None
    sample_clip: bool = False
    lags: tuple[int, ...] | None = None
    color: str | None = None

    def __post_init__(self) -> None:
        if self.ess_cap and self.is_mode != "tis":
            raise ValueError(f"arm {self.name}: ess_cap needs is_mode='tis'")
        if self.token_correction not in (None, *TOKEN_CORRECTIONS):
            raise ValueError(f"arm {self.name}: unknown token correction {self.token_correction}")
        if self.sample_clip and not self.opob:
            raise ValueError(
                f"arm {self.name}: sample_clip (max_sample_grad_norm) is an OPOB option"
            )

    def opob_kwargs(self, cfg: Any) -> dict[str, Any]:
        """Keyword arguments for ``OPOB(model, scope="group", norm_by_std=True, **...)``
        under ``cfg`` (a :class:`~vcpo_optim.demo.pipeline.Config`)."""
        if not self.sample_clip:
            return {}
        return {"max_sample_grad_norm": cfg.max_sample_grad_norm}


ARMS: dict[str, Arm] = {
    a.name: a
    for a in (
        Arm("sync", "Sync (k=0)", "tis", sync=True, color="black"),
        Arm(
            "sync-vcpo",
            "Sync (k=0), VCPO",
            "tis",
            ess_scaling=True,
            opob=True,
            sync=True,
            color="tab:cyan",
        ),
        Arm("no-is", "Async, no IS correction", "none", color="tab:gray"),
        Arm("is", "Async, sequence IS (untruncated)", "is", color="tab:brown"),
        Arm("tis", "Async, sequence TIS (c=8)", "tis", color="tab:red"),
        Arm("ess", "Async, TIS + ESS step scaling", "tis", ess_scaling=True, color="tab:orange"),
        Arm("opob", "Async, TIS + OPOB", "tis", opob=True, color="tab:purple"),
        Arm(
            "vcpo",
            "Async, VCPO (TIS + ESS + OPOB)",
            "tis",
            ess_scaling=True,
            opob=True,
            color="tab:blue",
        ),
        Arm(
            "tis-rho",
            "Async, ESS-targeted TIS (rho=0.5)",
            "tis",
            ess_cap=True,
            lags=LARGE_LAGS,
            color="tab:pink",
        ),
        Arm(
            "icepop",
            "Async, IcePop [0.5, 5] (token)",
            "none",
            token_correction="icepop",
            lags=LARGE_LAGS,
            color="tab:green",
        ),
        Arm(
            "m2po",
            "Async, M2PO (tau=0.04)",
            "none",
            token_correction="m2po",
            lags=LARGE_LAGS,
            color="tab:olive",
        ),
        Arm(
            "vcpo-rho",
            "Async, VCPO with ESS-targeted TIS (rho=0.5)",
            "tis",
            ess_scaling=True,
            opob=True,
            ess_cap=True,
            lags=LARGE_LAGS,
            color="navy",
        ),
        Arm(
            "vcpo-clip",
            f"Async, VCPO + per-trajectory clip (C={SAMPLE_CLIP_C:g})",
            "tis",
            ess_scaling=True,
            opob=True,
            sample_clip=True,
            lags=LARGE_LAGS,
            color="teal",
        ),
    )
}

#: Every arm, in table order.
DEFAULT_ARMS: tuple[str, ...] = tuple(ARMS)

#: Plot colours, one per arm, stable across figures.
COLORS: dict[str, str | None] = {a.name: a.color for a in ARMS.values()}


def parse_arms(spec: str | list[str] | tuple[str, ...]) -> tuple[Arm, ...]:
    """``"sync,tis,vcpo"`` (or a list of names) -> arms; ``"all"`` gives every arm."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        names = list(ARMS)
    unknown = [n for n in names if n not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; choose from {list(ARMS)} or 'all'")
    if not names:
        raise ValueError("no arms given")
    return tuple(ARMS[n] for n in dict.fromkeys(names))
