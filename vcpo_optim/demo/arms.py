"""The arms of the experiment: which stabilizers each learner uses.

Every arm uses the same policy, data stream, GRPO-style group rewards, optimizer
(``vcpo_optim.VCPOAdamW``), learning rate, batch, gradient clipping and number of
steps; they differ only in the importance weights in the loss and in whether the
two VCPO controls are switched on:

================  ==========================  =============  ============
arm               loss weight ``w_i``         ESS step scale  baseline
================  ==========================  =============  ============
``sync``          1 (lag 0: on-policy)        no              GRPO mean/std
``sync-vcpo``     1 (lag 0: on-policy)        yes (a no-op)   OPOB (group, /std)
``no-is``         1 (stale data, no IS)       no              GRPO mean/std
``is``            ``w_i`` raw sequence IS     no              GRPO mean/std
``tis``           ``min(w_i, 8)``             no              GRPO mean/std
``ess``           ``min(w_i, 8)``             yes             GRPO mean/std
``opob``          ``min(w_i, 8)``             no              OPOB (group, /std)
``vcpo``          ``min(w_i, 8)``             yes             OPOB (group, /std)
================  ==========================  =============  ============

``vcpo`` follows the reference configuration (mit-han-lab/vcpo,
``shell/vcpo/math/vcpo_k=*.sh``): sequence-level TIS with threshold 8 in the
loss, ESS step scaling with the sqrt rule computed on the *untruncated* weights
(``use_clipped=False``, ``base_ess_ratio=1``), and OPOB per prompt group with
std normalisation. So ``tis`` is the paper's baseline, and ``ess``/``opob`` are
the two ablations of ``vcpo`` (each adds one control to ``tis``). ``sync-vcpo``
separates what OPOB's baseline does on its own (at lag 0 every weight is 1, the ESS
ratio is exactly 1 and the step scale is exactly 1) from what it does against
staleness.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arm:
    """One learner configuration.

    Attributes:
        name: short id used on the command line and in the metrics.
        label: human-readable method name for tables and plots.
        is_mode: importance weights in the loss (see :func:`vcpo_optim.losses.importance_weights`).
        ess_scaling: pass the raw log weights to ``VCPOAdamW.step``.
        opob: use :class:`vcpo_optim.OPOB` (reward minus the off-policy optimal baseline)
            instead of GRPO advantages.
        sync: runs only at lag 0 (and async arms only at lag > 0).
    """

    name: str
    label: str
    is_mode: str
    ess_scaling: bool = False
    opob: bool = False
    sync: bool = False


ARMS: dict[str, Arm] = {
    a.name: a
    for a in (
        Arm("sync", "Sync (k=0)", "tis", sync=True),
        Arm("sync-vcpo", "Sync (k=0), VCPO", "tis", ess_scaling=True, opob=True, sync=True),
        Arm("no-is", "Async, no IS correction", "none"),
        Arm("is", "Async, sequence IS (untruncated)", "is"),
        Arm("tis", "Async, sequence TIS (c=8)", "tis"),
        Arm("ess", "Async, TIS + ESS step scaling", "tis", ess_scaling=True),
        Arm("opob", "Async, TIS + OPOB", "tis", opob=True),
        Arm("vcpo", "Async, VCPO (TIS + ESS + OPOB)", "tis", ess_scaling=True, opob=True),
    )
}

DEFAULT_ARMS: tuple[str, ...] = ("sync", "sync-vcpo", "no-is", "is", "tis", "ess", "opob", "vcpo")

# Plot colours, one per arm, stable across figures.
COLORS: dict[str, str] = {
    "sync": "black",
    "sync-vcpo": "tab:cyan",
    "no-is": "tab:gray",
    "is": "tab:brown",
    "tis": "tab:red",
    "ess": "tab:orange",
    "opob": "tab:purple",
    "vcpo": "tab:blue",
}


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
